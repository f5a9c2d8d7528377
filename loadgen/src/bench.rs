//! `loadgen bench`: every SPEC §9 ratio the load generator can measure, in one invocation, on
//! fresh servers it starts: the health rate; hot-event purchases on API v1 and v2 and their
//! ratio to it; p99 when offered half the v1 saturation rate (open model); `actor` against
//! `locked` in confirmed tickets per second; group commit against one transaction per write
//! through the real server at `--synchronous full`; and loadgen against wrk, when wrk is
//! installed. It prints a table and writes JSON and HTML.
//!
//! The exit status says whether every figure was measured, never whether a goal was met:
//! speeds are the machine's, and `--quick` is a smoke test for CI.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::app::{run_fresh, EXIT_RUNTIME, EXIT_USAGE};
use crate::backend::StageSpec;
use crate::cli::{BenchArgs, Common, Output, Thresholds};
use crate::report::{Results, RunReport};
use crate::scenario::{ApiVersion, ModelKind, Overrides, ScenarioKind, Settings};
use crate::{driver, server};

/// Exit status when a figure could not be measured (a stage did not start, Redis is missing).
pub const EXIT_NOT_MEASURED: u8 = 4;

pub const SCHEMA: &str = "loadgen-bench-1";

/// Seats of the hot event: more than any run sells, so no buyer meets `sold-out`.
const HOT_SEATS: u32 = 1_000_000;

/// One figure of the table.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Figure {
    /// Stable name, for scripts (`health-rps`, `v1-to-health`, ...).
    pub key: &'static str,
    pub name: &'static str,
    /// `None` when not measured; `why` says why.
    pub value: Option<f64>,
    pub unit: &'static str,
    /// SPEC §9's goal in words, when it sets one.
    pub goal: Option<&'static str>,
    /// Whether the goal was met, when there is a goal and a value.
    pub met: Option<bool>,
    /// Where the figure comes from, or why it was not measured.
    pub how: String,
    /// Left out on purpose (wrk not installed), which does not count as a failure.
    pub optional_missing: bool,
}

/// A run behind the figures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamedRun {
    pub name: String,
    pub settings: Settings,
    pub run: RunReport,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub schema: &'static str,
    pub tool: String,
    pub quick: bool,
    pub seed: u64,
    pub started_at: String,
    pub took_s: f64,
    pub machine: Machine,
    pub server_bin: String,
    /// Every figure that must be measured was.
    pub complete: bool,
    pub figures: Vec<Figure>,
    pub runs: Vec<NamedRun>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub cores: usize,
    pub os: String,
    pub kernel: String,
}

impl Machine {
    fn here() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS.to_owned(),
            kernel,
        }
    }
}

/// Runs `loadgen bench` and returns the exit status.
pub fn main(args: BenchArgs) -> ExitCode {
    let bin = match server::locate_server(args.server_bin.as_deref()) {
        Ok(b) => b,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    for path in [&args.json, &args.html].into_iter().flatten() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                eprintln!(
                    "error: {}: no such directory {}",
                    path.display(),
                    dir.display()
                );
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let report = match runtime.block_on(bench(&args, &bin)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: bench: {e:#}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).expect("the report serialises");
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("error: --json {}: cannot write: {e}", path.display());
            return ExitCode::from(EXIT_RUNTIME);
        }
    }
    if let Some(path) = &args.html {
        if let Err(e) = std::fs::write(path, crate::html::bench_html(&report, &table(&report))) {
            eprintln!("error: --html {}: cannot write: {e}", path.display());
            return ExitCode::from(EXIT_RUNTIME);
        }
    }
    if report.complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_MEASURED)
    }
}

struct Bench<'a> {
    args: &'a BenchArgs,
    bin: &'a Path,
    duration: Duration,
    warmup: Duration,
    runs: Vec<NamedRun>,
}

impl Bench<'_> {
    fn say(&self, what: &str) {
        if !self.args.quiet {
            eprintln!("bench: {what}");
        }
    }

    fn common(&self, server_args: &[&str]) -> Common {
        Common {
            scenario_file: None,
            overrides: Overrides::default(),
            server_bin: Some(self.bin.to_path_buf()),
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
            postgres_url: crate::backend::DEFAULT_POSTGRES_URL.into(),
            admin_token: None,
            chaos: Default::default(),
            output: Output {
                json: None,
                markdown: None,
                html: None,
                quiet: true,
            },
            thresholds: Thresholds::default(),
        }
    }

    /// The hot event (one event, more seats than any run sells, payments answered at once
    /// and never declined), for `duration` after `warmup`.
    fn hot(&self, scenario: ScenarioKind, api: ApiVersion) -> Overrides {
        Overrides {
            scenario: Some(scenario),
            api: Some(api),
            seed: Some(self.args.seed),
            vus: Some(64),
            duration: Some(self.duration),
            warmup: Some(self.warmup),
            tickets: Some(HOT_SEATS),
            events: Some(1),
            payment_latency: Some("0".into()),
            payment_failure_rate: Some(0.0),
            ..Overrides::default()
        }
    }

    /// Starts `stage` fresh, runs `settings` on it, and keeps the run under `name`.
    async fn run(
        &mut self,
        name: &str,
        stage: &str,
        settings: Overrides,
        server_args: &[&str],
    ) -> anyhow::Result<Result<Results, String>> {
        let settings = settings.resolve()?;
        self.say(&format!("{name}: {stage}, {}", settings.bound()));
        let spec = StageSpec::parse(stage, "bench").map_err(|e| anyhow::anyhow!(e))?;
        let run = run_fresh(&spec, &settings, &self.common(server_args)).await?;
        let results = match (&run.results, &run.skip_reason) {
            (Some(r), _) if r.measured_s > 0.0 => Ok(r.clone()),
            (Some(_), _) => Err(format!("{name}: no time was measured")),
            (None, why) => Err(format!(
                "{name}: {} did not run: {}",
                run.label(),
                why.as_deref().unwrap_or("no figures")
            )),
        };
        if let Some(audit) = &run.audit {
            if !audit.ok {
                self.say(&format!(
                    "{name}: the audit of {} is NOT clean",
                    run.label()
                ));
            }
        }
        self.runs.push(NamedRun {
            name: name.to_owned(),
            settings,
            run,
        });
        Ok(results)
    }
}

/// Requests of `op` answered per measured second.
fn op_rate(results: &Results, op: &str) -> Option<f64> {
    let count = results.latency.get(op)?.count;
    (count > 0).then(|| count as f64 / results.measured_s)
}

fn figure(key: &'static str, name: &'static str, unit: &'static str) -> Figure {
    Figure {
        key,
        name,
        value: None,
        unit,
        goal: None,
        met: None,
        how: String::new(),
        optional_missing: false,
    }
}

impl Figure {
    fn measured(mut self, value: Option<f64>, how: String) -> Self {
        match value.filter(|v| v.is_finite()) {
            Some(v) => {
                self.value = Some(v);
                self.how = how;
            }
            None => self.how = format!("not measured: {how}"),
        }
        self
    }

    fn missing(mut self, why: String) -> Self {
        self.how = format!("not measured: {why}");
        self
    }

    fn goal(mut self, goal: &'static str, met: impl Fn(f64) -> bool) -> Self {
        self.goal = Some(goal);
        self.met = self.value.map(met);
        self
    }
}

/// A ratio of two figures, measured only when both are.
fn ratio(key: &'static str, name: &'static str, top: &Figure, bottom: &Figure) -> Figure {
    let f = figure(key, name, "×");
    match (top.value, bottom.value) {
        (Some(t), Some(b)) if b > 0.0 => {
            f.measured(Some(t / b), format!("{} / {}", top.key, bottom.key))
        }
        _ => f.missing(format!("needs {} and {}", top.key, bottom.key)),
    }
}

async fn bench(args: &BenchArgs, bin: &Path) -> anyhow::Result<BenchReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // --quick: one second each, no warm-up; else 10 s after 1 s of warm-up.
    let (duration, warmup) = if args.quick {
        (
            args.duration.unwrap_or(Duration::from_secs(1)),
            Duration::ZERO,
        )
    } else {
        (
            args.duration.unwrap_or(Duration::from_secs(10)),
            Duration::from_secs(1),
        )
    };
    let mut b = Bench {
        args,
        bin,
        duration,
        warmup,
        runs: Vec::new(),
    };
    let mut figures = Vec::new();

    // The cheapest endpoint.
    let health = b
        .run(
            "health",
            "actor",
            b.hot(ScenarioKind::Health, ApiVersion::V1),
            &[],
        )
        .await?;
    let health_rps = match &health {
        Ok(r) => figure("health-rps", "GET /health", "req/s")
            .measured(Some(r.achieved_rps), "actor, 64 VUs, closed model".into()),
        Err(why) => figure("health-rps", "GET /health", "req/s").missing(why.clone()),
    };

    // Hot-event purchases, API v1 (answered once paid) and v2 (answered once held).
    let v1 = b
        .run(
            "v1-hot",
            "actor",
            b.hot(ScenarioKind::Stampede, ApiVersion::V1),
            &[],
        )
        .await?;
    let v1_rps = match &v1 {
        Ok(r) => figure("v1-hot-rps", "hot event, v1 purchases", "req/s").measured(
            op_rate(r, driver::OP_PURCHASE),
            format!("actor, one event of {HOT_SEATS} seats, 0 ms payments, 64 VUs"),
        ),
        Err(why) => figure("v1-hot-rps", "hot event, v1 purchases", "req/s").missing(why.clone()),
    };
    let v2 = b
        .run(
            "v2-hot",
            "actor",
            b.hot(ScenarioKind::Stampede, ApiVersion::V2),
            &[],
        )
        .await?;
    let v2_rps = match &v2 {
        Ok(r) => figure("v2-hot-rps", "hot event, v2 orders", "req/s").measured(
            op_rate(r, driver::OP_ORDER),
            "actor, the same event; POST /api/v2/orders answered per second (each buyer also makes a user and polls its order)".into(),
        ),
        Err(why) => figure("v2-hot-rps", "hot event, v2 orders", "req/s").missing(why.clone()),
    };
    let v1_ratio = ratio(
        "v1-to-health",
        "v1 purchases / health",
        &v1_rps,
        &health_rps,
    )
    .goal("≥ 0.5", |v| v >= 0.5);
    let v2_ratio = ratio("v2-to-health", "v2 orders / health", &v2_rps, &health_rps);

    // p99 when offered half the v1 saturation rate, on the open model.
    let half = match &v1 {
        Ok(r) if r.achieved_iterations_per_s > 0.0 => {
            let rate = (r.achieved_iterations_per_s / 2.0).max(1.0);
            let settings = Overrides {
                model: Some(ModelKind::Open),
                rate: Some(rate),
                ..b.hot(ScenarioKind::Stampede, ApiVersion::V1)
            };
            let name = "p99-at-half-load";
            let f = figure(name, "v1 purchase p99 at half the saturation rate", "ms");
            match b.run(name, "actor", settings, &[]).await? {
                Ok(r) => {
                    let p99 = r.latency.get(driver::OP_PURCHASE).map(|l| l.p99_ms);
                    f.measured(
                        p99,
                        format!(
                            "open model, {rate:.0} arrivals/s offered, {:.0}/s achieved, {} dropped",
                            r.achieved_iterations_per_s, r.dropped
                        ),
                    )
                }
                Err(why) => f.missing(why),
            }
        }
        _ => figure("p99-at-half-load", "v1 purchase p99 at half the saturation rate", "ms")
            .missing("needs the v1 saturation rate".into()),
    }
    .goal("< 10 ms", |v| v < 10.0);

    // `actor` against `locked` on the stampede: confirmed tickets per second.
    let seats = if args.quick { 200 } else { 4_000 };
    let stampede = Overrides {
        scenario: Some(ScenarioKind::Stampede),
        seed: Some(args.seed),
        vus: Some(if args.quick { 64 } else { 256 }),
        tickets: Some(seats),
        requests: Some(u64::from(seats)),
        payment_latency: Some("0".into()),
        payment_failure_rate: Some(0.1),
        ..Overrides::default()
    };
    let mut confirmed = Vec::new();
    for stage in ["actor", "locked"] {
        let key = match stage {
            "actor" => "actor-confirmed-per-s",
            _ => "locked-confirmed-per-s",
        };
        let name = match stage {
            "actor" => "stampede: actor, confirmed tickets",
            _ => "stampede: locked, confirmed tickets",
        };
        let mut extra: Vec<String> = Vec::new();
        if stage == "locked" {
            // The key prefix is the one `server::start` gives every fresh stage, and whose
            // keys it removes when the stage stops.
            extra.extend(["--redis-url".into(), args.redis_url.clone()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let f = figure(key, name, "tickets/s");
        confirmed.push(match b.run(key, stage, stampede.clone(), &extra).await? {
            Ok(r) => {
                let per_s = r
                    .purchases
                    .as_ref()
                    .map(|p| p.confirmed as f64 / r.measured_s);
                f.measured(
                    per_s,
                    format!(
                        "{seats} seats, {seats} buyers who retry, 0 ms payments declining 10 %"
                    ),
                )
            }
            Err(why) => f.missing(why),
        });
    }
    let locked = confirmed.pop().expect("two stages");
    let actor = confirmed.pop().expect("two stages");
    let stages_ratio = ratio(
        "actor-to-locked",
        "actor / locked, confirmed/s",
        &actor,
        &locked,
    )
    .goal("≥ 10×", |v| v >= 10.0);

    // Group commit against one transaction per write, through the real server, fsync on.
    let mut durability = Vec::new();
    for (key, name, args) in [
        (
            "full-batched-rps",
            "v1 purchases, --synchronous full",
            &["--synchronous", "full"][..],
        ),
        (
            "full-batch-1-rps",
            "v1 purchases, --synchronous full --max-batch 1",
            &["--synchronous", "full", "--max-batch", "1"][..],
        ),
    ] {
        let f = figure(key, name, "req/s");
        durability.push(
            match b
                .run(
                    key,
                    "actor",
                    b.hot(ScenarioKind::Stampede, ApiVersion::V1),
                    args,
                )
                .await?
            {
                Ok(r) => f.measured(
                    op_rate(&r, driver::OP_PURCHASE),
                    format!("actor@sqlite {}, the hot event", args.join(" ")),
                ),
                Err(why) => f.missing(why),
            },
        );
    }
    let one = durability.pop().expect("two runs");
    let batched = durability.pop().expect("two runs");
    let group_ratio = ratio(
        "group-commit-ratio",
        "group commit / one transaction per write",
        &batched,
        &one,
    )
    .goal("≥ 10×", |v| v >= 10.0);

    // loadgen against wrk on /health, the same server.
    let (wrk_rps, loadgen_to_wrk) = against_wrk(&mut b).await?;

    figures.extend([
        health_rps,
        v1_rps,
        v2_rps,
        v1_ratio,
        v2_ratio,
        half,
        actor,
        locked,
        stages_ratio,
        batched,
        one,
        group_ratio,
        wrk_rps,
        loadgen_to_wrk,
    ]);
    let complete = figures
        .iter()
        .all(|f| f.value.is_some() || f.optional_missing);
    Ok(BenchReport {
        schema: SCHEMA,
        tool: format!("loadgen {}", env!("CARGO_PKG_VERSION")),
        quick: args.quick,
        seed: args.seed,
        started_at,
        took_s: started.elapsed().as_secs_f64(),
        machine: Machine::here(),
        server_bin: bin.display().to_string(),
        complete,
        figures,
        runs: b.runs,
    })
}

/// `wrk` on the PATH, if installed.
fn find_wrk() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("wrk"))
        .find(|p| p.is_file())
}

/// wrk's and loadgen's rates on `GET /health` of one server, one after the other.
async fn against_wrk(b: &mut Bench<'_>) -> anyhow::Result<(Figure, Figure)> {
    let wrk_f = figure("wrk-health-rps", "wrk, GET /health", "req/s");
    let ratio_f = figure("loadgen-to-wrk", "loadgen / wrk on /health", "×");
    let Some(wrk) = find_wrk() else {
        let mut w = wrk_f.missing("wrk is not installed (apt-get install wrk)".into());
        let mut r = ratio_f.missing("wrk is not installed".into());
        w.optional_missing = true;
        r.optional_missing = true;
        return Ok((w, r));
    };
    let settings = b.hot(ScenarioKind::Health, ApiVersion::V1).resolve()?;
    b.say("wrk: actor, GET /health with wrk, then with loadgen, on one server");
    let mut spawned = match server::start(b.bin, "actor", None, &settings, &[]).await {
        Ok(s) => s,
        Err(failure) => {
            let why = format!("actor did not start: {}", failure.reason);
            return Ok((wrk_f.missing(why.clone()), ratio_f.missing(why)));
        }
    };
    let addr: SocketAddr = spawned.addr;
    let seconds = b.duration.as_secs().max(1);
    let out = tokio::process::Command::new(&wrk)
        .args([
            "-t2",
            "-c64",
            &format!("-d{seconds}s"),
            &format!("http://{addr}/health"),
        ])
        .output()
        .await;
    let wrk_rate = match &out {
        Ok(o) if o.status.success() => parse_wrk(&String::from_utf8_lossy(&o.stdout)),
        _ => None,
    };
    let loadgen = crate::app::measure_target(addr, &settings, "actor (wrk pair)").await;
    spawned.stop().await;
    let wrk_fig = match (wrk_rate, &out) {
        (Some(rate), _) => wrk_f.measured(
            Some(rate),
            format!("wrk -t2 -c64 -d{seconds}s http://HOST/health"),
        ),
        (None, Ok(o)) => wrk_f.missing(format!(
            "wrk gave no rate: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        (None, Err(e)) => wrk_f.missing(format!("wrk did not run: {e}")),
    };
    let loadgen_rps = match loadgen? {
        Ok(results) => Some(results.achieved_rps),
        Err(_) => None,
    };
    let ratio_fig = match (loadgen_rps, wrk_fig.value) {
        (Some(l), Some(w)) if w > 0.0 => ratio_f.measured(
            Some(l / w),
            format!("loadgen {l:.0} req/s (64 VUs, the same server, right after wrk)"),
        ),
        _ => ratio_f.missing("needs both rates".into()),
    };
    Ok((wrk_fig, ratio_fig))
}

/// wrk's `Requests/sec:` line.
fn parse_wrk(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

fn value_text(f: &Figure) -> String {
    match f.value {
        None => "–".into(),
        Some(v) if f.unit == "×" => format!("{v:.2}×"),
        Some(v) if f.unit == "ms" => format!("{v:.2} ms"),
        Some(v) => format!("{} {}", thousands(v), f.unit),
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The table as printed.
pub fn table(r: &BenchReport) -> String {
    let mut out = format!(
        "loadgen bench{} · seed {} · {} · {} cores, {} {} · {:.0} s\n",
        if r.quick { " --quick" } else { "" },
        r.seed,
        r.started_at,
        r.machine.cores,
        r.machine.os,
        r.machine.kernel,
        r.took_s
    );
    let name_w = r
        .figures
        .iter()
        .map(|f| f.name.chars().count())
        .max()
        .unwrap_or(10);
    let values: Vec<String> = r.figures.iter().map(value_text).collect();
    let value_w = values.iter().map(|v| v.chars().count()).max().unwrap_or(5);
    for (f, v) in r.figures.iter().zip(&values) {
        let goal = match (f.goal, f.met) {
            (Some(g), Some(true)) => format!("goal {g}: met"),
            (Some(g), Some(false)) => format!("goal {g}: NOT met"),
            (Some(g), None) => format!("goal {g}"),
            (None, _) => String::new(),
        };
        out.push_str(&format!(
            "  {:<name_w$}  {:>value_w$}  {:<22}  {}\n",
            f.name, v, goal, f.how
        ));
    }
    let left_out = r.figures.iter().filter(|f| f.optional_missing).count();
    out.push_str(&match (r.complete, left_out) {
        (true, 0) => {
            "result: every figure measured (speeds are this machine's; none is asserted)\n".into()
        }
        (true, n) => format!(
            "result: every figure measured but {n} left out on purpose (above); speeds are this \
             machine's, none is asserted\n"
        ),
        (false, _) => "result: NOT every figure was measured (see `not measured` above)\n".into(),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_gives_its_rate() {
        let out = "Running 1s test @ http://127.0.0.1:1/health\n  2 threads and 64 connections\n\
                   Requests/sec:  22344.51\nTransfer/sec:      2.62MB\n";
        assert_eq!(parse_wrk(out), Some(22344.51));
        assert_eq!(parse_wrk("nothing"), None);
    }

    #[test]
    fn a_ratio_needs_both_sides_and_a_missing_one_says_so() {
        let a = figure("a", "a", "req/s").measured(Some(10.0), String::new());
        let b = figure("b", "b", "req/s").measured(Some(4.0), String::new());
        let none = figure("c", "c", "req/s").missing("down".into());
        assert_eq!(ratio("r", "r", &a, &b).value, Some(2.5));
        let missing = ratio("r", "r", &a, &none);
        assert_eq!(missing.value, None);
        assert!(missing.how.starts_with("not measured"), "{}", missing.how);
        assert_eq!(thousands(1234567.4), "1,234,567");
    }
}
