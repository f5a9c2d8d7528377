//! What the commands do: resolve the settings, start stages, drive, audit, report, decide the
//! exit status.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::backend::{Backend, StageSpec, TempDatabase};
use crate::cli::{Cli, Command, Common, Thresholds};
use crate::report::{Report, Results, RunReport, ThresholdResult, SCHEMA_VERSION};
use crate::scenario::{Overrides, ScenarioKind, Settings};
use crate::{audit, chaos, driver, html, http, report, server};

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_THRESHOLD: u8 = 3;
pub const EXIT_NOTHING_MEASURED: u8 = 4;

/// Runs a parsed command line and returns the exit status.
pub fn main(cli: Cli) -> ExitCode {
    let (kind, target, stages, common) = match cli.command {
        Command::Lesson(args) => return crate::lesson::main(args),
        Command::Bench(args) => return crate::bench::main(args),
        Command::Scenarios => {
            for s in ScenarioKind::all() {
                println!("{:<14} {}", s.as_str(), s.describe());
            }
            return ExitCode::SUCCESS;
        }
        Command::Run(args) => {
            let stages = match args
                .stage
                .as_deref()
                .map(|s| StageSpec::parse(s, "--stage"))
            {
                None => vec![],
                Some(Ok(spec)) => vec![spec],
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            if args.target.is_none() && stages.is_empty() {
                eprintln!(
                    "error: give --target URL (a running server) or --stage NAME (started fresh)"
                );
                return ExitCode::from(EXIT_USAGE);
            }
            ("run", args.target, stages, args.common)
        }
        Command::Compare(args) => {
            let parsed: Result<Vec<StageSpec>, String> = args
                .stages
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| StageSpec::parse(s, "--stages"))
                .collect();
            let stages = match parsed {
                Ok(stages) => stages,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            if stages.is_empty() {
                eprintln!("error: --stages names no stage; e.g. --stages monolith,actor");
                return ExitCode::from(EXIT_USAGE);
            }
            ("compare", None, stages, args.common)
        }
    };
    match common.chaos.plan() {
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Ok(Some(_)) if target.is_some() => {
            eprintln!(
                "error: --chaos signals only processes loadgen started itself: give --stage \
                 (or use compare), not --target"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        Ok(_) => {}
    }
    if stages.iter().any(|s| s.backend == Backend::Postgres) {
        if let Err(e) = crate::backend::check_url(&common.postgres_url) {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let settings = match resolve(&common) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let target = match target.as_deref().map(http::parse_target).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(execute(kind, target, &stages, &common, settings)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn resolve(common: &Common) -> anyhow::Result<Settings> {
    let file = match &common.scenario_file {
        Some(path) => Overrides::from_file(path)?,
        None => Overrides::default(),
    };
    common.overrides.clone().over(file).resolve()
}

async fn execute(
    kind: &'static str,
    target: Option<SocketAddr>,
    stages: &[StageSpec],
    common: &Common,
    settings: Settings,
) -> anyhow::Result<u8> {
    let quiet = common.output.quiet;
    if !quiet {
        eprintln!(
            "loadgen: scenario {} · seed {} (replay with --seed {})",
            settings.scenario, settings.seed, settings.seed
        );
    }
    server::set_admin_token(common.admin_token.clone());
    let admin_token = server::admin_token();
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut runs = Vec::new();
    if let Some(addr) = target {
        let url = format!("http://{addr}");
        let (stage, backend) = check_reachable(addr, &url).await?;
        let stage = stage.unwrap_or_else(|| "external".into());
        let label = crate::backend::label(&stage, backend);
        runs.push(
            match measure(addr, &settings, &label, quiet, admin_token, None).await? {
                Err(why) => skipped(&stage, backend, why, Some(url)),
                Ok((results, audit)) => RunReport {
                    stage,
                    backend,
                    status: "completed",
                    skip_reason: None,
                    target: Some(url),
                    server_args: None,
                    results: Some(results),
                    audit: Some(audit),
                    chaos: None,
                },
            },
        );
    } else {
        let bin = server::locate_server(common.server_bin.as_deref());
        let mut interrupts = Interrupts::new();
        for spec in stages {
            let bin = bin.as_deref();
            let run = run_interruptible(
                spec,
                bin,
                &settings,
                common,
                quiet,
                admin_token,
                &mut interrupts,
            );
            runs.push(run.await?);
        }
    }
    let thresholds = check_thresholds(&common.thresholds, &runs);
    let completed = runs.iter().any(|r| r.status == "completed");
    let breached = thresholds.iter().any(|t| !t.passed);
    let report = Report {
        schema_version: SCHEMA_VERSION,
        tool: format!("loadgen {}", env!("CARGO_PKG_VERSION")),
        command: kind,
        started_at,
        seed: settings.seed,
        settings,
        runs,
        thresholds,
        ok: completed && !breached,
    };
    // `--quiet` hides the progress and the running commentary, never the summary (as wrk and
    // oha do).
    print!("{}", report::terminal(&report));
    write_outputs(&report, common)?;
    Ok(if breached {
        EXIT_THRESHOLD
    } else if !completed {
        EXIT_NOTHING_MEASURED
    } else {
        0
    })
}

/// Starts one stage fresh (as `compare` does), runs `settings` against it, audits, stops it:
/// what a lesson uses for the stages it compares.
pub(crate) async fn run_fresh(
    spec: &StageSpec,
    settings: &Settings,
    common: &Common,
) -> anyhow::Result<RunReport> {
    let bin = server::locate_server(common.server_bin.as_deref());
    let mut interrupts = Interrupts::new();
    let quiet = common.output.quiet;
    run_interruptible(
        spec,
        bin.as_deref(),
        settings,
        common,
        quiet,
        server::admin_token(),
        &mut interrupts,
    )
    .await
}

/// Runs `settings` against the server at `addr` (started by the caller) and audits it, as
/// `run --target` does, quietly: the results, or why there are none.
pub(crate) async fn measure_target(
    addr: SocketAddr,
    settings: &Settings,
    label: &str,
) -> anyhow::Result<Result<Results, String>> {
    Ok(
        measure(addr, settings, label, true, server::admin_token(), None)
            .await?
            .map(|(results, _audit)| results),
    )
}

/// The services loadgen started for one stage's `--chaos` faults; dropped (killed, their
/// directories removed) once the stage and its database are gone.
#[derive(Default)]
struct OwnServices {
    redis: Option<chaos::OwnService>,
    postgres: Option<chaos::OwnService>,
}

/// Starts one stage fresh on its backend, measures (injecting `--chaos` faults, if asked),
/// stops it. A PostgreSQL database made for it is left in `database`, and the services started
/// for its faults in `services`, for [`run_interruptible`] to drop whatever happened here.
#[allow(clippy::too_many_arguments)]
async fn run_stage(
    spec: &StageSpec,
    bin: Result<&Path, &String>,
    settings: &Settings,
    common: &Common,
    quiet: bool,
    admin_token: &str,
    database: &mut Option<TempDatabase>,
    services: &mut OwnServices,
) -> anyhow::Result<RunReport> {
    let label = spec.label();
    let skip = |why: String, target: Option<String>| {
        if !quiet {
            eprintln!("loadgen: stage {label} skipped: {why}");
        }
        skipped(&spec.stage, Some(spec.backend), why, target)
    };
    let bin = match bin {
        Ok(b) => b,
        Err(why) => return Ok(skipped(&spec.stage, Some(spec.backend), why.clone(), None)),
    };
    // validated in `main`
    let plan = common.chaos.plan().ok().flatten();
    let mut chaos_report = plan.as_ref().map(|p| chaos::ChaosReport::new(p, spec));
    let faults = plan.as_ref().map(|p| p.split(spec).0).unwrap_or_default();
    let faulted = |v: chaos::Victim| faults.iter().any(|f| f.victim() == v);
    // loadgen's own arguments first, so a `--server-arg` given by hand wins
    let mut server_args: Vec<String> = vec![];
    let mut postgres_url = common.postgres_url.clone();
    if faulted(chaos::Victim::Redis) {
        match chaos::OwnService::redis().await {
            Ok(svc) => {
                server_args.extend(["--redis-url".into(), svc.url()]);
                if let Some(r) = chaos_report.as_mut() {
                    r.services.push(svc.describe());
                }
                services.redis = Some(svc);
            }
            Err(why) => return Ok(skip(why, None)),
        }
    }
    if faulted(chaos::Victim::Postgres) {
        match chaos::OwnService::postgres().await {
            Ok(svc) => {
                postgres_url = svc.url();
                if let Some(r) = chaos_report.as_mut() {
                    r.services.push(svc.describe());
                }
                services.postgres = Some(svc);
            }
            Err(why) => return Ok(skip(why, None)),
        }
    }
    if faults.contains(&chaos::Fault::KillPostgres) {
        // `normal` (synchronous_commit off) lets PostgreSQL acknowledge a commit before its
        // WAL is flushed: a killed PostgreSQL loses it. That promise is for a killed server.
        server_args.extend(["--synchronous".into(), "full".into()]);
        if let Some(r) = chaos_report.as_mut() {
            r.notes.push(
                "kill-postgres: the stage runs with --synchronous full (synchronous_commit on): \
                 with `normal` PostgreSQL acknowledges commits it has not flushed, and a \
                 killed PostgreSQL loses them"
                    .into(),
            );
        }
    }
    if faults.contains(&chaos::Fault::KillNode) {
        // the supervisor starts a killed node again only when asked to
        server_args.push("--restart-nodes".into());
        if let Some(r) = chaos_report.as_mut() {
            r.notes.push(
                "kill-node: the stage runs with --restart-nodes, so its supervisor starts a \
                 killed inventory node again"
                    .into(),
            );
        }
    }
    if let Some(r) = chaos_report.as_mut() {
        if !r.not_applicable.is_empty() {
            r.notes.push(format!(
                "not applicable to {label}, left out: {}",
                r.not_applicable.join(", ")
            ));
        }
        if faults.is_empty() {
            r.notes.push(format!(
                "no fault asked for applies to {label}: none injected"
            ));
        }
    }
    server_args.extend(common.server_args.iter().cloned());
    if spec.backend == Backend::Postgres {
        match TempDatabase::create(&postgres_url).await {
            Ok(db) => {
                if !quiet {
                    eprintln!("loadgen: {label}: created database {}", db.shown_url);
                }
                *database = Some(db);
            }
            Err(why) => return Ok(skip(why, None)),
        }
    }
    if !quiet {
        eprintln!("loadgen: starting stage {label} ({})", bin.display());
    }
    let started = server::start(bin, &spec.stage, database.as_ref(), settings, &server_args).await;
    let mut spawned = match started {
        Ok(s) => s,
        Err(failure) => {
            let mut run = skip(failure.reason, None);
            run.server_args = failure.args;
            return Ok(run);
        }
    };
    let addr = spawned.addr;
    let measured = match (plan.as_ref(), chaos_report.as_mut()) {
        (Some(plan), Some(report)) => {
            let injector = chaos::Injector {
                spawned: &mut spawned,
                restart: chaos::Restart {
                    bin,
                    stage: &spec.stage,
                    database: database.as_ref(),
                    settings,
                    extra_args: &server_args,
                },
                redis: services.redis.as_mut(),
                postgres: services.postgres.as_mut(),
                schedule: chaos::Schedule::new(settings.seed, faults.clone(), plan),
                report,
                quiet,
                label: &label,
                node_pick: chaos::node_picker(settings.seed),
            };
            measure(addr, settings, &label, quiet, admin_token, Some(injector)).await
        }
        _ => measure(addr, settings, &label, quiet, admin_token, None).await,
    };
    spawned.stop().await;
    let target = Some(format!("http://{}", spawned.addr));
    let (results, audit) = match measured? {
        Ok(done) => done,
        Err(why) => {
            let mut run = skip(why, target);
            run.server_args = Some(spawned.args.clone());
            return Ok(run);
        }
    };
    Ok(RunReport {
        stage: spec.stage.clone(),
        backend: Some(spec.backend),
        status: "completed",
        skip_reason: None,
        target,
        server_args: Some(spawned.args.clone()),
        results: Some(results),
        audit: Some(audit),
        chaos: chaos_report,
    })
}

/// Runs a stage until it ends or loadgen gets SIGINT or SIGTERM; either way, drops the
/// PostgreSQL database made for it. Interrupted, the server is killed (dropping the run drops
/// it) and the command ends with an error.
async fn run_interruptible(
    spec: &StageSpec,
    bin: Result<&Path, &String>,
    settings: &Settings,
    common: &Common,
    quiet: bool,
    admin_token: &str,
    interrupts: &mut Interrupts,
) -> anyhow::Result<RunReport> {
    let mut database = None;
    let mut services = OwnServices::default();
    let outcome = tokio::select! {
        run = run_stage(
            spec, bin, settings, common, quiet, admin_token, &mut database, &mut services,
        ) => run,
        signal = interrupts.next() => Err(anyhow::anyhow!(
            "interrupted by {signal}: stage {} stopped", spec.label()
        )),
    };
    if let Some(db) = database {
        match db.drop_database().await {
            Ok(()) if !quiet => {
                eprintln!("loadgen: {}: dropped database {}", spec.label(), db.name)
            }
            Ok(()) => {}
            Err(why) => eprintln!("loadgen: warning: {why}"),
        }
    }
    drop(services);
    outcome
}

/// SIGINT and SIGTERM, listened to while stages run so their databases can be dropped.
struct Interrupts {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Interrupts {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next signal's name; pending forever when none can be listened to.
    async fn next(&mut self) -> &'static str {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.int) => "SIGINT",
            _ = recv(&mut self.term) => "SIGTERM",
        }
    }
}

fn skipped(
    stage: &str,
    backend: Option<Backend>,
    why: String,
    target: Option<String>,
) -> RunReport {
    RunReport {
        stage: stage.to_owned(),
        backend,
        status: "skipped",
        skip_reason: Some(why),
        target,
        server_args: None,
        results: None,
        audit: None,
        chaos: None,
    }
}

/// Checks `GET /health` and returns the stage and the backend the server says it runs, if it
/// says.
async fn check_reachable(
    addr: SocketAddr,
    url: &str,
) -> anyhow::Result<(Option<String>, Option<Backend>)> {
    let mut conn = http::Conn::new(addr, Duration::from_secs(5));
    match conn.get("/health").await {
        Ok(r) if r.status == 200 => {
            let health = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap_or_default();
            let stage = health
                .get("stage")
                .and_then(|s| s.as_str())
                .map(str::to_owned);
            Ok((stage, Backend::from_health(&health)))
        }
        Ok(r) => anyhow::bail!(
            "{url}/health answered {}: the server is not healthy",
            r.status
        ),
        Err(f) => anyhow::bail!(
            "cannot reach {url}: {} (is the server running there?)",
            f.as_str()
        ),
    }
}

/// Setup, load, audit against one server; `Ok(Err(reason))` when the stage does not serve
/// what the scenario needs.
async fn measure(
    addr: SocketAddr,
    settings: &Settings,
    label: &str,
    quiet: bool,
    admin_token: &str,
    chaos: Option<chaos::Injector<'_>>,
) -> anyhow::Result<Result<(Results, audit::Audit), String>> {
    let fixture = match driver::setup(addr, settings).await {
        Ok(f) => f,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<driver::Unsupported>() {
                return Ok(Err(u.0.clone()));
            }
            return Err(e.context(format!("stage {label}")));
        }
    };
    let progress = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(settings, label, quiet);
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        let by_time = settings.requests.is_none();
        let total = settings
            .duration
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_default();
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let done = progress.load(Ordering::Relaxed);
                if by_time {
                    bar.set_position(start.elapsed().as_millis() as u64);
                    bar.set_message(format!("{done} iterations · run of {total}"));
                } else {
                    bar.set_position(done);
                }
            }
        })
    };
    let (done, load_over) = tokio::sync::watch::channel(false);
    let load_start = Instant::now();
    let load = async {
        let outcome = driver::drive(addr, settings, fixture.clone(), progress).await;
        let _ = done.send(true);
        outcome
    };
    let faults = async {
        if let Some(mut injector) = chaos {
            injector.run(load_over, load_start).await;
        }
    };
    let (outcome, ()) = tokio::join!(load, faults);
    ticker.abort();
    bar.finish_and_clear();
    let outcome = outcome?;
    if !quiet {
        eprintln!("loadgen: {label}: load done, auditing");
    }
    let audit = audit::audit(
        addr,
        &fixture,
        &outcome.buyers,
        settings.settle,
        admin_token,
    )
    .await;
    Ok(Ok((Results::from_outcome(&outcome, settings), audit)))
}

fn progress_bar(settings: &Settings, label: &str, quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (len, template) = match (settings.requests, settings.duration) {
        (Some(n), _) => (n, "{prefix} [{bar:40}] {pos}/{len} iterations · {elapsed}"),
        (None, Some(d)) => (
            d.as_millis() as u64,
            "{prefix} [{bar:40}] {elapsed_precise} · {msg}",
        ),
        (None, None) => (0, "{prefix} {elapsed}"),
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_owned());
    bar
}

fn check_thresholds(t: &Thresholds, runs: &[RunReport]) -> Vec<ThresholdResult> {
    let mut out = vec![];
    for r in runs.iter().filter(|r| r.status == "completed") {
        let (Some(res), Some(audit)) = (&r.results, &r.audit) else {
            continue;
        };
        let mut check = |name: &str, limit: Option<f64>, actual: Option<f64>, upper: bool| {
            if let Some(limit) = limit {
                let passed = actual.is_some_and(|a| if upper { a <= limit } else { a >= limit });
                out.push(ThresholdResult {
                    name: name.into(),
                    stage: r.stage.clone(),
                    backend: r.backend,
                    limit,
                    actual,
                    passed,
                });
            }
        };
        check(
            "max-oversell",
            t.max_oversell.map(|v| v as f64),
            audit.violations("I1").map(|v| v as f64),
            true,
        );
        let checked_all = audit
            .invariants
            .iter()
            .all(|i| i.violations.is_some() || i.status == "not-applicable");
        check(
            "max-violations",
            t.max_violations.map(|v| v as f64),
            checked_all.then(|| audit.total_violations() as f64),
            true,
        );
        check(
            "p99-ms",
            t.p99_ms,
            res.primary_op()
                .and_then(|op| res.latency.get(op))
                .map(|l| l.p99_ms),
            true,
        );
        check("min-rps", t.min_rps, Some(res.achieved_rps), false);
        let error_pct = if res.requests == 0 {
            0.0
        } else {
            (res.errors as f64 * 10000.0 / res.requests as f64).round() / 100.0
        };
        check("max-error-pct", t.max_error_pct, Some(error_pct), true);
    }
    out
}

fn write_outputs(report: &Report, common: &Common) -> anyhow::Result<()> {
    let o = &common.output;
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("--json {}: cannot write", path.display()))?;
    }
    if let Some(path) = &o.markdown {
        std::fs::write(path, report::markdown(report))
            .with_context(|| format!("--markdown {}: cannot write", path.display()))?;
    }
    if let Some(path) = &o.html {
        std::fs::write(path, html::html(report))
            .with_context(|| format!("--html {}: cannot write", path.display()))?;
    }
    Ok(())
}
