//! The load generator against a real server.
//!
//! These tests start `ticketflow` (the workspace's server binary) themselves. They find it next
//! to the `loadgen` binary in the same target directory, which `cargo test --workspace` builds
//! (it is a workspace member's binary); with `cargo test -p loadgen` build it first with
//! `cargo build -p ticketflow`, or point `LOADGEN_SERVER_BIN` at one. The `@postgres` test needs
//! PostgreSQL at `POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`); it does
//! not skip without it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
}

fn server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LOADGEN_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_BIN_EXE_loadgen")).parent().unwrap();
    let bin = dir.join(format!("ticketflow{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo test --workspace` (it builds the server too) or \
         `cargo build -p ticketflow` first",
        bin.display()
    );
    bin
}

/// Runs loadgen with the server binary located the same way the tests do.
fn run(args: &[&str]) -> Output {
    loadgen()
        .args(args)
        .env("LOADGEN_SERVER_BIN", server_bin())
        .stdin(Stdio::null())
        .output()
        .expect("loadgen runs")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the report was written"))
        .expect("the report is JSON")
}

fn invariant(run: &Value, id: &str) -> i64 {
    run["audit"]["invariants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .unwrap()["violations"]
        .as_i64()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server this test started, on a free port with a fresh database; killed on drop.
struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a stage and waits for its `GET /health`; a port taken meanwhile by another test's
    /// server makes ours exit, and it is started again on another port.
    fn start(stage: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(server_bin())
                .args(["serve", "--stage", stage, "--bind"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--db")
                .arg(dir.path().join(format!("t{port}.db")))
                .args(["--payment-latency", "10ms", "--payment-failure-rate", "0"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the server starts");
            let give_up = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break; // exited: most likely the port was taken; try another
                }
                if healthy(port) {
                    return Self {
                        child,
                        url: format!("http://127.0.0.1:{port}"),
                        _dir: dir,
                    };
                }
                assert!(Instant::now() < give_up, "the server did not come up");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("the server exited three times at start");
    }
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    s.write_all(request.as_bytes()).is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const STAMPEDE: &[&str] = &[
    "--scenario",
    "stampede",
    "--requests",
    "200",
    "--tickets",
    "20",
    "--vus",
    "32",
    "--payment-latency",
    "20ms",
    "--seed",
    "11",
    "--quiet",
];

#[test]
fn a_monolith_stampede_shows_the_oversell_and_breaches_max_oversell() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let mut args = vec![
        "run",
        "--stage",
        "monolith",
        "--max-oversell",
        "0",
        "--json",
    ];
    args.push(json.to_str().unwrap());
    args.extend_from_slice(STAMPEDE);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    let report = read_json(&json);
    let run = &report["runs"][0];
    assert_eq!(run["status"], "completed");
    assert!(invariant(run, "I1") > 0, "monolith must oversell: {run}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["thresholds"][0]["name"], "max-oversell");
    assert_eq!(report["thresholds"][0]["passed"], false);
}

#[test]
fn an_actor_stampede_sells_each_seat_once_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let mut args = vec!["run", "--stage", "actor", "--max-violations", "0", "--json"];
    args.push(json.to_str().unwrap());
    args.extend_from_slice(STAMPEDE);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let report = read_json(&json);
    let run = &report["runs"][0];
    for id in ["I1", "I2", "I3", "I4", "I5", "I6", "I7"] {
        assert_eq!(invariant(run, id), 0, "{id} on actor: {run}");
    }
    assert_eq!(
        run["results"]["purchases"]["confirmed"], 20,
        "every seat sells"
    );
    assert_eq!(run["audit"]["client"]["successesSeen"], 20);
    assert_eq!(run["audit"]["client"]["confirmedStored"], 20);
    // --quiet drops the progress and the commentary, not the summary table
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("I1 no oversell") && stdout.contains("throughput (req/s)"),
        "--quiet still prints the summary: {stdout}"
    );
    assert!(
        !stderr(&out).contains("loadgen: starting stage"),
        "--quiet is quiet on stderr: {}",
        stderr(&out)
    );
}

/// Buyers whose payment takes far longer than their hold: each hold expires, the client gives
/// up (its timeout) and the load ends while the charges are still on the wire, to succeed late
/// and be refunded.
fn late_success_run(settle: &str, json: &Path) -> Output {
    run(&[
        "run",
        "--stage",
        "actor",
        "--scenario",
        "stampede",
        "--requests",
        "3",
        "--vus",
        "3",
        "--tickets",
        "5",
        "--max-attempts",
        "1",
        "--payment-latency",
        "1500ms",
        "--payment-failure-rate",
        "0",
        "--hold-ttl",
        "100ms",
        "--timeout",
        "300ms",
        "--settle",
        settle,
        "--seed",
        "3",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ])
}

#[test]
fn a_late_success_still_in_flight_when_the_load_ends_is_waited_for_not_reported_as_a_violation() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = late_success_run("10s", &json);
    let report = read_json(&json);
    assert_conforms(&schema_validator(), &report);
    let run = &report["runs"][0];
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}\n{run}",
        stderr(&out)
    );
    let audit = &run["audit"];
    // the test's teeth: the charges did succeed after their holds ran out, and were refunded
    assert!(
        audit["ledger"]["refunds"].as_u64().unwrap() >= 1,
        "no late success happened: {audit}"
    );
    assert_eq!(audit["quiet"]["quiet"], true, "{audit}");
    // the load ended about 0.3 s in, the charges answer at 1.5 s: auditing before then would
    // see a charge for a cancelled order and a payment still pending (I3, I5)
    let waited = audit["quiet"]["waitedMs"].as_u64().unwrap();
    assert!(
        waited >= 500,
        "the audit did not wait for the payments: {waited} ms"
    );
    for id in ["I1", "I2", "I3", "I4", "I5", "I6", "I7"] {
        assert_eq!(invariant(run, id), 0, "{id}: {audit}");
    }
    assert_eq!(audit["ok"], true);
}

#[test]
fn a_server_not_quiet_by_the_settle_bound_is_reported_not_quiet_with_its_counts_never_violated() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = late_success_run("100ms", &json);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let report = read_json(&json);
    assert_conforms(&schema_validator(), &report);
    let audit = &report["runs"][0]["audit"];
    assert_eq!(audit["quiet"]["quiet"], false, "{audit}");
    assert!(
        audit["quiet"]["activity"]["paymentsInFlight"]
            .as_i64()
            .unwrap()
            >= 1,
        "{audit}"
    );
    assert_eq!(audit["ok"], false);
    for inv in audit["invariants"].as_array().unwrap() {
        assert_ne!(inv["status"], "fail", "{inv}");
        if inv["status"] != "not-applicable" {
            assert_eq!(inv["status"], "not-quiet", "{inv}");
            assert!(inv["violations"].is_null(), "{inv}");
        }
    }
}

#[test]
fn real_compare_output_validates_against_the_schema_and_lists_unknown_stages_as_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (json, html, md) = (
        dir.path().join("r.json"),
        dir.path().join("r.html"),
        dir.path().join("r.md"),
    );
    let out = run(&[
        "compare",
        "--stages",
        "monolith,actor,no-such-stage",
        "--scenario",
        "spread",
        "--events",
        "4",
        "--tickets",
        "10",
        "--requests",
        "120",
        "--vus",
        "16",
        "--seed",
        "5",
        "--quiet",
        "--p99-ms",
        "60000",
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let report = read_json(&json);
    let schema: Value =
        serde_json::from_str(include_str!("../schema/report-v1.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(&report)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "schema violations: {errors:#?}");
    let mut tampered = report.clone();
    tampered["schemaVersion"] = 2.into();
    tampered["runs"][0]["results"]["latency"]["purchase"]["p99Ms"] = "fast".into();
    assert_eq!(
        validator.iter_errors(&tampered).count(),
        2,
        "the schema has teeth"
    );
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for run in runs {
        assert_eq!(
            run["backend"], "sqlite",
            "a bare stage runs on SQLite: {run}"
        );
    }
    assert_eq!(runs[2]["stage"], "no-such-stage");
    assert_eq!(runs[2]["status"], "skipped");
    assert!(runs[2]["skipReason"]
        .as_str()
        .unwrap()
        .contains("no-such-stage"));

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("monolith@sqlite") && page.contains("I1"));
    assert!(
        !page.contains("src=") && !page.contains("href=") && !page.contains("@import"),
        "the HTML report must not fetch anything"
    );
    // the run second by second: requests, p99, seats sold against the capacity (4 x 10)
    for chart in [
        "Requests per second",
        "p99 per second: purchase",
        "Seats sold over time",
        "capacity 40",
    ] {
        assert!(page.contains(chart), "no `{chart}` in the HTML report");
    }
    assert!(
        page.matches("<polyline").count() >= 6,
        "a line per stage per chart"
    );
    for run in &runs[..2] {
        let seconds = run["results"]["timeline"]["seconds"].as_array().unwrap();
        let requests: u64 = seconds
            .iter()
            .map(|s| s["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(
            requests,
            run["results"]["requests"].as_u64().unwrap(),
            "{run}"
        );
        let last = seconds.last().unwrap()["confirmedTotal"].as_u64().unwrap();
        assert_eq!(
            last,
            run["results"]["purchases"]["confirmed"].as_u64().unwrap()
        );
    }
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(table.contains("| monolith@sqlite | actor@sqlite | no-such-stage@sqlite |"));
}

fn schema_validator() -> jsonschema::Validator {
    let schema: Value =
        serde_json::from_str(include_str!("../schema/report-v1.schema.json")).unwrap();
    jsonschema::validator_for(&schema).expect("the schema compiles")
}

fn assert_conforms(validator: &jsonschema::Validator, report: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(report)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "schema violations: {errors:#?}");
}

#[test]
fn an_open_model_run_reports_offered_and_achieved_rates_and_conforms_to_the_schema() {
    let server = Server::start("actor");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = run(&[
        "run",
        "--target",
        &server.url,
        "--scenario",
        "health",
        "--model",
        "open",
        "--rate",
        "400",
        "--arrivals",
        "poisson",
        "--duration",
        "1500ms",
        "--warmup",
        "500ms",
        "--connections",
        "16",
        "--seed",
        "9",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let report = read_json(&json);
    assert_conforms(&schema_validator(), &report);
    let res = &report["runs"][0]["results"];
    assert_eq!(
        report["runs"][0]["stage"], "actor",
        "named by the server's /health"
    );
    assert_eq!(res["offeredRps"], 400.0);
    let measured = res["measuredIterations"].as_u64().unwrap();
    let all = res["iterations"].as_u64().unwrap();
    assert!(
        measured < all,
        "the warm-up is left out: {measured} of {all}"
    );
    assert!(
        (250..=550).contains(&measured),
        "about one second at 400/s: {measured}"
    );
}

#[test]
fn the_same_seed_replays_the_same_workload() {
    // spread: which event each buyer picks is drawn from the seed; the actor stage sells
    // exactly what is asked, so per-event sales match run to run
    let sold = |seed: &str| {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("r.json");
        let out = run(&[
            "run",
            "--stage",
            "actor",
            "--scenario",
            "spread",
            "--events",
            "5",
            "--tickets",
            "1000",
            "--requests",
            "150",
            "--vus",
            "8",
            "--payment-failure-rate",
            "0",
            "--payment-latency",
            "0",
            "--quiet",
            "--seed",
            seed,
            "--json",
            json.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        let report = read_json(&json);
        assert_eq!(report["seed"], seed.parse::<u64>().unwrap());
        report["runs"][0]["audit"]["server"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["confirmed"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let a = sold("99");
    assert_eq!(a.iter().sum::<i64>(), 150);
    assert_eq!(a, sold("99"));
    assert_ne!(a, sold("100"), "another seed, another workload");
}

#[test]
fn thresholds_decide_the_exit_status_against_a_running_server() {
    let server = Server::start("actor");
    let base = [
        "run",
        "--target",
        &server.url,
        "--scenario",
        "health",
        "--requests",
        "300",
        "--quiet",
    ];
    let held = run(&[&base[..], &["--p99-ms", "60000", "--min-rps", "1"]].concat());
    assert_eq!(held.status.code(), Some(0), "stderr: {}", stderr(&held));
    let breached = run(&[&base[..], &["--min-rps", "100000000"]].concat());
    assert_eq!(
        breached.status.code(),
        Some(3),
        "stderr: {}",
        stderr(&breached)
    );
    let breached = run(&[&base[..], &["--p99-ms", "0.000001"]].concat());
    assert_eq!(
        breached.status.code(),
        Some(3),
        "stderr: {}",
        stderr(&breached)
    );
}

#[test]
fn a_scenario_file_sets_what_flags_do_not() {
    let server = Server::start("actor");
    let dir = tempfile::tempdir().unwrap();
    let (file, json) = (dir.path().join("s.toml"), dir.path().join("r.json"));
    std::fs::write(
        &file,
        "scenario = \"browse\"\nseed = 3\nrequests = 100\nvus = 4\nevents = 3\ntimeout = \"2s\"\n",
    )
    .unwrap();
    let out = run(&[
        "run",
        "--target",
        &server.url,
        "--scenario-file",
        file.to_str().unwrap(),
        "--vus",
        "2",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let s = &read_json(&json)["settings"];
    assert_eq!(s["scenario"], "browse");
    assert_eq!(s["seed"], 3);
    assert_eq!(s["requests"], 100);
    assert_eq!(s["timeoutMs"], 2000);
    assert_eq!(s["vus"], 2, "the flag wins over the file");
}

#[test]
fn retry_storm_keeps_one_order_per_key_on_actor_and_is_skipped_where_api_v2_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = run(&[
        "compare",
        "--stages",
        "monolith,actor",
        "--scenario",
        "retry-storm",
        "--requests",
        "60",
        "--tickets",
        "20",
        "--vus",
        "16",
        "--resends",
        "3",
        "--payment-latency",
        "10ms",
        "--seed",
        "4",
        "--quiet",
        "--max-violations",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let report = read_json(&json);
    assert_conforms(&schema_validator(), &report);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs[0]["status"], "skipped");
    assert!(
        runs[0]["skipReason"]
            .as_str()
            .unwrap()
            .contains("needs API v2"),
        "{}",
        runs[0]
    );
    let actor = &runs[1];
    assert_eq!(actor["status"], "completed");
    assert_eq!(invariant(actor, "I8"), 0, "{actor}");
    assert_eq!(invariant(actor, "I7"), 0, "{actor}");
    assert!(
        actor["audit"]["client"]["idempotencyKeys"]
            .as_u64()
            .unwrap()
            >= 60
    );
    assert_eq!(
        actor["results"]["purchases"]["confirmed"], 20,
        "every seat sells once"
    );
    let replays = actor["results"]["statuses"]["order"]["202"]
        .as_u64()
        .unwrap();
    assert!(
        replays > 20,
        "resends were answered with the stored 202: {replays}"
    );
}

#[test]
fn a_v2_stampede_measures_reservation_and_confirmation_apart() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = run(&[
        "run",
        "--stage",
        "actor",
        "--scenario",
        "stampede",
        "--api",
        "v2",
        "--requests",
        "80",
        "--tickets",
        "15",
        "--vus",
        "16",
        "--payment-latency",
        "20ms",
        "--seed",
        "6",
        "--quiet",
        "--max-violations",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let report = read_json(&json);
    assert_conforms(&schema_validator(), &report);
    let run = &report["runs"][0];
    let latency = &run["results"]["latency"];
    let reserved = latency["order-reserved"]["p50Ms"].as_f64().unwrap();
    let confirmed = latency["order-to-confirmed"]["p50Ms"].as_f64().unwrap();
    assert!(
        confirmed > reserved,
        "confirmation waits for the 20 ms payment: {reserved} vs {confirmed}"
    );
    assert_eq!(run["results"]["purchases"]["confirmed"], 15);
    assert_eq!(invariant(run, "I8"), 0);
}

#[test]
fn an_unreachable_target_is_one_clear_line_and_a_non_zero_exit() {
    // Port 1: nothing listens there, and no other test can take it meanwhile.
    let url = "http://127.0.0.1:1".to_owned();
    let out = run(&[
        "run",
        "--target",
        &url,
        "--scenario",
        "health",
        "--requests",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let last = err.trim_end().lines().last().unwrap();
    assert!(last.starts_with("error: cannot reach"), "{err}");
    assert!(last.contains(&url), "{err}");
}

#[test]
fn bad_flags_are_refused_with_a_clear_error_and_exit_two() {
    for (args, says) in [
        (
            vec!["run", "--target", "http://127.0.0.1:9", "--vus", "many"],
            "invalid value 'many'",
        ),
        (
            vec!["run", "--target", "http://127.0.0.1:9", "--model", "open"],
            "needs --rate",
        ),
        (
            vec!["run", "--target", "127.0.0.1:9"],
            "give an http:// URL",
        ),
        (vec!["run", "--scenario", "stampede"], "give --target URL"),
        (
            vec![
                "run",
                "--target",
                "http://127.0.0.1:9",
                "--duration",
                "soon",
            ],
            "is not a duration",
        ),
        (
            vec!["compare", "--stages", "actor", "--scenario", "nope"],
            "invalid value 'nope'",
        ),
        (
            vec!["compare", "--stages", "actor,actor@mysql"],
            "--stages actor@mysql: unknown backend 'mysql'",
        ),
        (
            vec!["run", "--stage", "monolith@postgres"],
            "--stage monolith@postgres: the monolith stage runs on SQLite only",
        ),
        (
            vec![
                "compare",
                "--stages",
                "actor@postgres",
                "--postgres-url",
                "127.0.0.1:5432",
            ],
            "--postgres-url 127.0.0.1:5432: give a postgres:// URL",
        ),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("error:"), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// The PostgreSQL server the tests use (trust authentication on this project's machines).
fn postgres_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The `loadgen_%` databases on that server now. Without PostgreSQL this fails: the tests that
/// need it never skip.
fn loadgen_databases() -> Vec<String> {
    use sqlx::Connection;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(&postgres_url())
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {} is needed: {e}", postgres_url()));
        let names: Vec<String> =
            sqlx::query_scalar(r"SELECT datname FROM pg_database WHERE datname LIKE 'loadgen\_%'")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let _ = conn.close().await;
        names
    })
}

#[test]
fn compare_names_the_backend_of_each_stage_and_drops_the_postgres_database_it_made() {
    let before = loadgen_databases();
    let dir = tempfile::tempdir().unwrap();
    let (json, md) = (dir.path().join("r.json"), dir.path().join("r.md"));
    let url = postgres_url();
    let mut args = vec![
        "compare",
        "--stages",
        "actor,actor@postgres",
        "--postgres-url",
        &url,
        "--max-violations",
        "0",
        "--json",
        json.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
    ];
    args.extend_from_slice(STAMPEDE);
    let out = run(&args);
    let report = read_json(&json);
    assert_conforms(&schema_validator(), &report);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(
        (&runs[0]["stage"], &runs[0]["backend"]),
        (&"actor".into(), &"sqlite".into())
    );
    assert_eq!(
        (&runs[1]["stage"], &runs[1]["backend"]),
        (&"actor".into(), &"postgres".into())
    );
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(
        table.contains("| actor@sqlite | actor@postgres |"),
        "{table}"
    );

    // the server got a database of its own, named in its command line, and it is gone now
    let server_args: Vec<&str> = runs[1]["serverArgs"]
        .as_array()
        .unwrap_or_else(|| panic!("the server was started: {}", runs[1]))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let db_url = server_args[server_args.iter().position(|a| *a == "--db").unwrap() + 1];
    let name = db_url.rsplit('/').next().unwrap();
    assert!(
        db_url.starts_with("postgres://") && name.starts_with("loadgen_"),
        "{db_url}"
    );
    let after = loadgen_databases();
    assert!(!after.iter().any(|d| d == name), "{name} was not dropped");
    let left: Vec<&String> = after.iter().filter(|d| !before.contains(d)).collect();
    assert!(left.is_empty(), "databases left behind: {left:?}");

    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    for run in runs {
        assert_eq!(run["status"], "completed", "{run}");
        for id in ["I1", "I2", "I3", "I4", "I5", "I6", "I7"] {
            assert_eq!(invariant(run, id), 0, "{id} on {}: {run}", run["backend"]);
        }
        assert_eq!(
            run["results"]["purchases"]["confirmed"], 20,
            "every seat sells"
        );
    }
}

#[test]
fn an_unreachable_postgres_makes_its_stage_skipped_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = run(&[
        "compare",
        "--stages",
        "actor@postgres",
        "--postgres-url",
        "postgres://postgres@127.0.0.1:1/postgres",
        "--scenario",
        "health",
        "--requests",
        "10",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "nothing measured: {}",
        stderr(&out)
    );
    let report = read_json(&json);
    assert_conforms(&schema_validator(), &report);
    let run = &report["runs"][0];
    assert_eq!(run["status"], "skipped");
    assert_eq!(run["backend"], "postgres");
    let why = run["skipReason"].as_str().unwrap();
    assert!(
        why.starts_with(
            "--postgres-url postgres://postgres@127.0.0.1:1/postgres: cannot reach PostgreSQL"
        ),
        "{why}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("skipped actor@postgres: {why}")),
        "the terminal names it: {stdout}"
    );
}

/// The Redis keys that start with `prefix`, and the entries of apalis's global list of queues that
/// start with `prefix`.
fn redis_keys_of(prefix: &str) -> (Vec<String>, Vec<String>) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("Redis at {url} is needed: {e}"));
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let queues: Vec<String> = redis::cmd("ZRANGE")
        .arg("core:apalis:queues:list")
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .unwrap();
    let queues = queues
        .into_iter()
        .filter(|q| q.starts_with(prefix))
        .collect();
    (keys, queues)
}

#[test]
fn a_locked_stage_loadgen_started_leaves_no_redis_keys_behind() {
    let mut args = vec!["run", "--stage", "locked", "--max-violations", "0"];
    args.extend_from_slice(STAMPEDE);
    let child = loadgen()
        .args(&args)
        .env("LOADGEN_SERVER_BIN", server_bin())
        .env_remove("TICKETFLOW_REDIS_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen runs");
    // Every key of the stage it starts is under `loadgen-PID-locked-PORT:`.
    let prefix = format!("loadgen-{}-locked-", child.id());
    let mut seen = false;
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    while child.try_wait().unwrap().is_none() && Instant::now() < give_up {
        let (keys, queues) = redis_keys_of(&prefix);
        seen |= !keys.is_empty() && !queues.is_empty();
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        seen,
        "the stage's keys and its apalis queue entry were never seen under {prefix}"
    );
    let (keys, queues) = redis_keys_of(&prefix);
    assert!(keys.is_empty(), "keys left behind: {keys:?}");
    assert!(
        queues.is_empty(),
        "apalis queue entries left behind: {queues:?}"
    );
}
