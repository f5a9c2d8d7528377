//! `--chaos` against real processes: each stage's chaos run, a few seconds of load, then the
//! audit after waiting for quiet.
//!
//! Like `loadgen.rs`, these start `ticketflow` from the same target directory (or
//! `LOADGEN_SERVER_BIN`). The `locked` runs start their own `redis-server` and the `@postgres`
//! runs their own PostgreSQL cluster (`initdb`, as user `postgres` when run as root); the
//! shared services are never signalled. They do not skip when a program is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use loadgen::chaos::{Plan, Schedule};
use serde_json::Value;

fn server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LOADGEN_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_BIN_EXE_loadgen")).parent().unwrap();
    let bin = dir.join(format!("ticketflow{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: `cargo build -p ticketflow` first",
        bin.display()
    );
    bin
}

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .env("LOADGEN_SERVER_BIN", server_bin())
        .stdin(Stdio::null())
        .output()
        .expect("loadgen runs")
}

const GAP: &str = "400ms..700ms";
const OUTAGE: &str = "200ms..500ms";

/// One stage's chaos run: `payment-chaos` for 3 s of load with `faults`, a fault every
/// 0.4-0.7 s; returns the report's run and the whole output.
fn chaos_run(stage: &str, faults: &str, seed: u64) -> (Value, Output) {
    chaos_run_with(stage, faults, seed, &[])
}

/// [`chaos_run`] with more flags.
fn chaos_run_with(stage: &str, faults: &str, seed: u64, more: &[&str]) -> (Value, Output) {
    chaos_run_spans(stage, faults, seed, GAP, OUTAGE, more)
}

/// [`chaos_run_with`], with the time between faults and their outages given.
fn chaos_run_spans(
    stage: &str,
    faults: &str,
    seed: u64,
    gap: &str,
    outage: &str,
    more: &[&str],
) -> (Value, Output) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let seed = seed.to_string();
    let mut args = vec![
        "run",
        "--stage",
        stage,
        "--scenario",
        "payment-chaos",
        "--seed",
        &seed,
        "--duration",
        "3s",
        "--requests",
        "1000000",
        "--vus",
        "32",
        "--tickets",
        "2000",
        "--settle",
        "40s",
        "--chaos",
        faults,
        "--chaos-gap",
        gap,
        "--chaos-outage",
        outage,
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let out = loadgen(&args);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_else(|e| {
            panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr))
        }))
        .unwrap();
    let validator = jsonschema::validator_for(
        &serde_json::from_str(include_str!("../schema/report-v1.schema.json")).unwrap(),
    )
    .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&report)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "the report breaks the schema: {errors:?}"
    );
    (report["runs"][0].clone(), out)
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn injected(run: &Value) -> Vec<Value> {
    run["chaos"]["injected"].as_array().unwrap().clone()
}

/// The faults the seed's schedule draws first, in order, as loadgen draws them.
fn drawn(seed: u64, faults: &str, n: usize) -> Vec<&'static str> {
    let list: Vec<String> = faults.split(',').map(str::to_owned).collect();
    let plan = Plan::parse(&list, GAP, OUTAGE).unwrap().unwrap();
    let mut schedule = Schedule::new(seed, plan.faults.clone(), &plan);
    (0..n).map(|_| schedule.next().unwrap().1.name()).collect()
}

/// The first seed whose schedule starts with `first`: under load only the first two or three
/// faults may fit in the 3 s, so the fault a test is about is made one of them.
fn seed_starting_with(faults: &str, first: &[&str]) -> u64 {
    (1..10_000)
        .find(|seed| drawn(*seed, faults, first.len()) == first)
        .expect("some seed draws it")
}

/// Every fault was injected in the order the seed draws them, and each process came back.
fn assert_faults_as_scheduled(run: &Value, seed: u64, faults: &str, out: &Output) {
    let got = injected(run);
    assert!(
        got.len() >= 2,
        "at least two faults in 3 s of load: {got:?}\n{}",
        text(out)
    );
    let names: Vec<&str> = got.iter().map(|f| f["fault"].as_str().unwrap()).collect();
    assert_eq!(names, drawn(seed, faults, got.len()), "the seeded schedule");
    for f in &got {
        assert!(f["error"].is_null(), "{f}");
        assert!(f["backAfterMs"].as_u64().is_some(), "came back: {f}");
    }
}

/// Quiet, and every invariant checked and holding; returns the unknown outcomes the client
/// had (requests cut off by the faults), all resolved by I7.
fn assert_clean_audit(run: &Value, out: &Output) -> u64 {
    let audit = &run["audit"];
    assert_eq!(audit["quiet"]["quiet"], true, "{}", text(out));
    for inv in audit["invariants"].as_array().unwrap() {
        if inv["id"] == "I8" {
            continue;
        }
        assert_eq!(inv["status"], "pass", "{inv}\n{}", text(out));
    }
    assert_eq!(audit["ok"], true);
    assert!(out.status.success(), "{}", text(out));
    audit["client"]["unknownOutcomes"].as_u64().unwrap()
}

#[test]
fn actor_survives_kill_and_pause_of_the_server_with_a_full_clean_audit() {
    let faults = "kill-server,pause-server";
    let seed = seed_starting_with(faults, &["kill-server", "pause-server"]);
    let (run, out) = chaos_run("actor", faults, seed);
    assert_faults_as_scheduled(&run, seed, faults, &out);
    let unknown = assert_clean_audit(&run, &out);
    assert!(
        unknown > 0,
        "the faults cut requests off (unknown outcomes): {}",
        text(&out)
    );
    assert!(
        run["results"]["purchases"]["confirmed"].as_u64().unwrap() > 0,
        "{run}"
    );
    assert!(
        text(&out).contains("chaos (actor@sqlite): "),
        "{}",
        text(&out)
    );
}

#[test]
fn the_monolith_killed_leaves_tickets_pending_for_ever_counted_by_i4() {
    // clients wait 10 s for an answer, so none hangs up on a purchase (which leaves the
    // monolith's ticket pending too): what is left pending is the kills' doing
    let (run, out) = chaos_run_with("monolith", "kill-server", 11, &["--timeout", "10s"]);
    assert_faults_as_scheduled(&run, 11, "kill-server", &out);
    let audit = &run["audit"];
    // nothing of the monolith's is under way any more: its pending rows are stranded, and
    // the audit is a verdict, not "not quiet"
    assert_eq!(audit["quiet"]["quiet"], true, "{}", text(&out));
    assert_eq!(audit["quiet"]["activity"]["pendingStranded"], true);
    let i4 = audit["invariants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "I4")
        .unwrap()
        .clone();
    assert_eq!(i4["status"], "fail", "{i4}");
    assert!(i4["violations"].as_i64().unwrap() > 0, "{i4}");
    assert_eq!(
        i4["violations"].as_i64(),
        audit["quiet"]["activity"]["pendingTickets"].as_i64(),
        "I4 counts the pending tickets"
    );
    assert_eq!(audit["ok"], false);
}

#[test]
fn locked_survives_kill_and_pause_of_its_own_redis_and_of_the_server() {
    let faults = "kill-redis,pause-redis,kill-server";
    let seed = seed_starting_with(faults, &["kill-redis", "pause-redis"]);
    let (run, out) = chaos_run("locked", faults, seed);
    assert_faults_as_scheduled(&run, seed, faults, &out);
    let services = run["chaos"]["services"].as_array().unwrap();
    assert!(
        services.len() == 1 && services[0].as_str().unwrap().contains("own redis-server"),
        "{services:?}"
    );
    // pointed at its own Redis, never the shared one
    let args: Vec<&str> = run["serverArgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let redis = args[args.iter().position(|a| *a == "--redis-url").unwrap() + 1];
    assert!(
        redis.starts_with("redis://127.0.0.1:") && !redis.ends_with(":6379"),
        "{redis}"
    );
    assert!(
        injected(&run)
            .iter()
            .any(|f| f["fault"].as_str().unwrap().ends_with("-redis")),
        "a Redis fault among the injected: {}",
        text(&out)
    );
    assert_clean_audit(&run, &out);
}

#[test]
fn actor_on_postgres_survives_kill_and_pause_of_its_own_cluster() {
    let faults = "kill-postgres,pause-postgres,kill-server";
    let seed = seed_starting_with(faults, &["kill-postgres", "pause-postgres"]);
    let (run, out) = chaos_run("actor@postgres", faults, seed);
    assert_faults_as_scheduled(&run, seed, faults, &out);
    assert!(
        injected(&run).iter().any(|f| f["fault"] == "kill-postgres"),
        "kill-postgres among the injected: {}",
        text(&out)
    );
    let services = run["chaos"]["services"].as_array().unwrap();
    assert!(
        services[0]
            .as_str()
            .unwrap()
            .contains("own PostgreSQL cluster"),
        "{services:?}"
    );
    let args = run["serverArgs"].to_string();
    assert!(
        !args.contains("127.0.0.1:5432"),
        "never the shared cluster: {args}"
    );
    assert!(args.contains("\"--synchronous\",\"full\""), "{args}");
    assert_clean_audit(&run, &out);
}

#[test]
fn saga_survives_kill_and_pause_of_the_server_and_of_its_own_cluster() {
    let faults = "kill-server,kill-postgres,pause-postgres,pause-server";
    let seed = seed_starting_with(faults, &["kill-server", "kill-postgres"]);
    // A purchase is three hops to the inventory node and one to the payments node, each a
    // relayed message: with the scenario's 500 ms hold and 1 s client timeout, in a debug
    // build on a loaded machine, nearly every charge came back after its hold and no buyer
    // saw a 201 (20 confirmed, all as unknown outcomes). A hold and a timeout that fit the
    // hops; the faults are the same.
    let (run, out) = chaos_run_with(
        "saga",
        faults,
        seed,
        &["--hold-ttl", "2s", "--timeout", "3s"],
    );
    assert_faults_as_scheduled(&run, seed, faults, &out);
    for fault in ["kill-server", "kill-postgres"] {
        assert!(
            injected(&run).iter().any(|f| f["fault"] == fault),
            "{fault} among the injected: {}",
            text(&out)
        );
    }
    assert_clean_audit(&run, &out);
    assert!(
        run["results"]["purchases"]["confirmed"].as_u64().unwrap() > 0,
        "{run}"
    );
    assert!(
        text(&out).contains("chaos (saga@postgres): "),
        "{}",
        text(&out)
    );
}

/// Once ignored (issue 10): in 1 of 2 CI runs this schedule ended with an I3 violation on
/// `locked`, a payment run that found its hold over after an outage cancelling an order that
/// an earlier attempt had charged, without a refund. `tests/api/locked.rs` reproduces that
/// (and the race a refund-first fix opened) without chaos timing.
#[test]
fn locked_on_postgres_survives_kill_of_its_own_cluster_and_redis() {
    let faults = "kill-postgres,kill-redis,pause-postgres";
    let seed = seed_starting_with(faults, &["kill-postgres", "kill-redis"]);
    let (run, out) = chaos_run("locked@postgres", faults, seed);
    assert_faults_as_scheduled(&run, seed, faults, &out);
    assert_eq!(run["chaos"]["services"].as_array().unwrap().len(), 2);
    assert_clean_audit(&run, &out);
}

const SERVICES_FAULTS: &str = "kill-node,kill-postgres,pause-postgres";

/// Stage `services` under `kill-node` (an inventory node, a child of the supervisor loadgen
/// started, SIGKILLed and started again by it) and its own PostgreSQL cluster killed and
/// paused; returns the run and its output, once the faults were checked.
fn services_chaos_run() -> (Value, Output) {
    let seed = seed_starting_with(SERVICES_FAULTS, &["kill-node", "pause-postgres"]);
    let (run, out) = chaos_run("services", SERVICES_FAULTS, seed);
    assert_faults_as_scheduled(&run, seed, SERVICES_FAULTS, &out);
    let killed: Vec<String> = injected(&run)
        .iter()
        .filter(|f| f["fault"] == "kill-node")
        .map(|f| f["victim"].as_str().unwrap().to_owned())
        .collect();
    assert!(!killed.is_empty(), "{}", text(&out));
    for victim in &killed {
        assert!(
            victim.starts_with("inventory-") && victim.contains("(pid "),
            "an inventory node and its pid: {victim}"
        );
    }
    let args = run["serverArgs"].to_string();
    assert!(args.contains("\"--restart-nodes\""), "{args}");
    assert!(
        !args.contains("127.0.0.1:5432"),
        "never the shared cluster: {args}"
    );
    let chaos = &run["chaos"];
    assert!(
        chaos["services"][0]
            .as_str()
            .unwrap()
            .contains("own PostgreSQL cluster"),
        "{chaos}"
    );
    (run, out)
}

#[test]
fn services_nodes_are_killed_only_among_the_supervisors_children_and_come_back() {
    let (run, out) = services_chaos_run();
    let drawn: Vec<&str> = run["chaos"]["faultsDrawnFrom"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(drawn, ["kill-postgres", "pause-postgres", "kill-node"]);
    // the load went on through the faults, and the audit waited for quiet
    assert!(
        run["results"]["purchases"]["confirmed"].as_u64().unwrap() > 0,
        "{run}"
    );
    assert_eq!(run["audit"]["quiet"]["quiet"], true, "{}", text(&out));
    // no seat oversold or sold twice, none lost from the counts, client and server agree:
    // these always held; I3 and I5 are the next test's, ignored for now
    for inv in run["audit"]["invariants"].as_array().unwrap() {
        if ["I1", "I2", "I4", "I6", "I7"].contains(&inv["id"].as_str().unwrap()) {
            assert_eq!(inv["status"], "pass", "{inv}\n{}", text(&out));
        }
    }
}

/// Once ignored (issue 10). This run found that stage `services` confirmed orders whose charge
/// it had also refunded (I3), chaos or not: an inventory node refunded an expired hold whose
/// cancellation had been refused (the node had lost the shard), and the new owner confirmed
/// it. Then, about 1 run in 20, a charge kept on a cancelled order, its payment left
/// `pending` (I3 1, I5 1): an expired purchase that could not read its order back (its
/// PostgreSQL killed just then) gave up without a refund, and nothing else would refund it.
/// Both are fixed (`stages::actor`, the Expired settlement and `refund_once_cancelled`); see
/// the README's *Chaos runs*.
#[test]
fn services_survives_kill_node_and_kill_and_pause_of_its_own_cluster() {
    let (run, out) = services_chaos_run();
    assert_clean_audit(&run, &out);
}

/// `kill-server` and `pause-server` on `services` hit the whole deployment: the supervisor
/// and its nodes are stopped together, or the supervisor is killed and its nodes die with
/// it; the deployment started again on the same database settles what they left.
#[test]
fn services_survives_kill_and_pause_of_the_whole_deployment() {
    let faults = "kill-server,pause-server";
    let seed = seed_starting_with(faults, &["pause-server", "kill-server"]);
    let (run, out) = chaos_run("services", faults, seed);
    assert_faults_as_scheduled(&run, seed, faults, &out);
    let got = injected(&run);
    assert_eq!(got[1]["fault"], "kill-server", "{}", text(&out));
    for f in &got[..2] {
        let victim = f["victim"].as_str().unwrap_or_default();
        // the catalog, the payments node, three inventory nodes and the gateway
        assert!(
            victim.starts_with("the supervisor (pid ") && victim.ends_with(" and its 6 nodes"),
            "{f}"
        );
    }
    assert_clean_audit(&run, &out);
    assert!(
        run["results"]["purchases"]["confirmed"].as_u64().unwrap() > 0,
        "{run}"
    );
}

/// Stage `actor` on PostgreSQL (no fence) with its cluster paused longer than an expired
/// purchase waits for its cancellation to be stored (5 s): every charge made for a hold that
/// ran out meanwhile is refunded once its cancellation is stored, none is kept (I3) and no
/// payment is left `pending` (I5).
#[test]
fn actor_on_postgres_refunds_expired_charges_after_a_pause_longer_than_the_wait() {
    let faults = "pause-postgres";
    let (run, out) = chaos_run_spans("actor@postgres", faults, 1, "1s", "7s", &[]);
    let got = injected(&run);
    assert_eq!(
        got.len(),
        1,
        "one pause of 7 s fits in 3 s of load: {got:?}"
    );
    assert_eq!(got[0]["fault"], "pause-postgres");
    assert_eq!(got[0]["outageMs"], 7000);
    assert!(got[0]["error"].is_null(), "{}", got[0]);
    let unknown = assert_clean_audit(&run, &out);
    assert!(unknown > 0, "the pause cut requests off: {}", text(&out));
    assert!(
        run["results"]["purchases"]["confirmed"].as_u64().unwrap() > 0,
        "{run}"
    );
}

#[test]
fn chaos_is_refused_against_a_target_and_for_unknown_faults() {
    let refused = |args: &[&str], says: &str| {
        let out = loadgen(args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    };
    refused(
        &[
            "run",
            "--target",
            "http://127.0.0.1:9",
            "--chaos",
            "kill-server",
        ],
        "only processes loadgen started",
    );
    refused(
        &["compare", "--stages", "actor", "--chaos", "kill-everything"],
        "--chaos kill-everything: unknown fault",
    );
    refused(
        &[
            "run",
            "--stage",
            "actor",
            "--chaos",
            "kill-server",
            "--chaos-gap",
            "3s..1s",
        ],
        "--chaos-gap",
    );
}
