//! The command line: `loadgen run`, `loadgen compare`, `loadgen scenarios`, `loadgen lesson`,
//! `loadgen bench`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::scenario::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Ticketflow's load generator: drive, measure, audit and compare the stages",
    after_help = "Exit status: 0 all thresholds held; 1 runtime error (e.g. unreachable target); \
                  2 bad flags or settings; 3 a threshold was breached; 4 nothing was measured \
                  (every stage skipped)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a scenario against one server: a running one (`--target`) or a stage it starts.
    Run(RunArgs),
    /// Start each stage fresh, run the same scenario with the same seed, print them side by side.
    Compare(CompareArgs),
    /// List the scenarios.
    Scenarios,
    /// A lesson: one of the seed's problems shown on the stage that breaks and the stage that
    /// fixes it, with the number that shows it. No name: list them.
    #[command(
        after_help = "Exit status: 0 the lesson showed what it claims (the break appears \
                  and the fix holds); 1 runtime error; 2 bad flags or an unknown lesson; 3 the \
                  lesson did not show what it claims; 4 the lesson is not available yet (its \
                  stages are not built); 5 a service it needs (Redis, PostgreSQL) is missing."
    )]
    Lesson(LessonArgs),
    /// Every SPEC §9 ratio in one invocation, on fresh servers it starts: health rate, hot-event
    /// purchases on v1 and v2 and their ratios to it, p99 at half load (open model), `actor`
    /// against `locked`, group commit at `--synchronous full`, and loadgen against wrk (when
    /// installed). Prints a table; writes JSON and HTML.
    #[command(
        after_help = "Exit status: 0 every figure was measured (whatever the speeds: goals are \
                  reported, never asserted); 1 runtime error; 2 bad flags; 4 a figure could \
                  not be measured (a stage did not start, Redis missing). wrk not installed \
                  leaves its two figures out without failing."
    )]
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The short form, a smoke test for CI: 1 s per run, a 200-seat stampede; under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Measured time of each timed run (default 10 s after 1 s of warm-up; 1 s with --quick).
    #[arg(long, value_parser = crate::scenario::parse_duration_arg)]
    pub duration: Option<std::time::Duration>,
    /// Seed of the workload and of the servers.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the figures and the runs behind them as JSON (`schema`: `loadgen-bench-1`).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the table and the runs as a self-contained HTML page.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Server binary (default: `ticketflow` next to this executable).
    #[arg(long, env = "LOADGEN_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// Redis for the `locked` stage's run.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// No running commentary on stderr; the table is still printed.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct LessonArgs {
    /// The lesson to run (`loadgen lesson` lists them).
    pub name: Option<String>,
    /// The short form, for CI: at most about 10 s.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the workload and of the servers (default 42: a lesson replays the same way).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the lesson, with its charts, as a self-contained HTML page.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Server binary (default: `ticketflow` next to this executable).
    #[arg(long, env = "LOADGEN_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// Redis for the lessons on `locked`.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// PostgreSQL server for the lessons that compare with it (a fresh database each).
    #[arg(long, env = "POSTGRES_URL", default_value = crate::backend::DEFAULT_POSTGRES_URL)]
    pub postgres_url: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Root URL of a running server, e.g. `http://127.0.0.1:8080`.
    #[arg(long, conflicts_with = "stage")]
    pub target: Option<String>,
    /// Start this stage of the server binary fresh instead (as `compare` does):
    /// `STAGE` or `STAGE@BACKEND` (`actor@postgres`; a bare `actor` is `actor@sqlite`).
    #[arg(long, value_name = "STAGE[@BACKEND]")]
    pub stage: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Stages to compare, comma-separated, each `STAGE` or `STAGE@BACKEND` (`actor@postgres`;
    /// a bare `actor` is `actor@sqlite`); each is started fresh from the server binary.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "monolith,actor",
        value_name = "STAGE[@BACKEND],..."
    )]
    pub stages: Vec<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct Common {
    /// Scenario file (TOML): the same settings as the flags, without `--`; flags win.
    #[arg(long)]
    pub scenario_file: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
    /// Server binary for started stages (default: `ticketflow` next to this executable).
    #[arg(long, env = "LOADGEN_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// Extra argument for started servers, repeatable (e.g. `--server-arg=--workers=2`).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// The server's admin token, for its audit and ledger (`/api/v1/admin/...`). A started
    /// stage is given it as `--admin-token`; without it, a random one is made for the run.
    /// Against `--target`, give the token that server was started with.
    #[arg(long, env = "TICKETFLOW_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// PostgreSQL server for `STAGE@postgres`: each such stage gets a fresh database there
    /// (`loadgen_<hex>`), dropped when the stage stops.
    #[arg(long, env = "POSTGRES_URL", default_value = crate::backend::DEFAULT_POSTGRES_URL)]
    pub postgres_url: String,
    #[command(flatten)]
    pub chaos: ChaosArgs,
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub thresholds: Thresholds,
}

/// Faults injected into real processes during the load (`--chaos`).
#[derive(Debug, Args, Clone, Default)]
pub struct ChaosArgs {
    /// Faults to inject during the load, comma-separated, on a schedule drawn from the seed:
    /// `kill-server` (SIGKILL, restarted on the same database and port), `pause-server`
    /// (SIGSTOP, then SIGCONT); `kill-redis`, `pause-redis` (stage `locked`: loadgen starts it
    /// its own redis-server); `kill-postgres`, `pause-postgres` (`STAGE@postgres`: loadgen
    /// starts it its own PostgreSQL cluster); `kill-node` (stage `services`: SIGKILL of one
    /// inventory node, a child of the supervisor loadgen started, which restarts it). Faults
    /// that do not apply to a stage are left out of its schedule (`kill-server` and
    /// `pause-server` do not apply to `services`). Only for stages loadgen starts: it signals
    /// no other process.
    #[arg(long, value_delimiter = ',', value_name = "FAULT,...")]
    pub chaos: Vec<String>,
    /// Time before each fault (from the start of the load, then from the end of the previous
    /// fault), drawn uniformly from `MIN..MAX`.
    #[arg(long, default_value = "1s..2s", value_name = "MIN..MAX")]
    pub chaos_gap: String,
    /// How long a paused process stays stopped, and a killed Redis or PostgreSQL down, drawn
    /// from `MIN..MAX`. A killed server is started again at once.
    #[arg(long, default_value = "300ms..1s", value_name = "MIN..MAX")]
    pub chaos_outage: String,
}

impl ChaosArgs {
    /// The plan, or why the flags are wrong (`None` without `--chaos`).
    pub fn plan(&self) -> Result<Option<crate::chaos::Plan>, String> {
        crate::chaos::Plan::parse(&self.chaos, &self.chaos_gap, &self.chaos_outage)
    }
}

#[derive(Debug, Args)]
pub struct Output {
    /// Write the JSON report (schema `loadgen/schema/report-v1.schema.json`).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a Markdown report.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Write a self-contained HTML report with inline SVG charts.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// No progress bar and no running commentary on stderr; the final summary is still
    /// printed (and files written).
    #[arg(long, short)]
    pub quiet: bool,
}

/// Limits for CI: any breach makes the exit status 3.
#[derive(Debug, Args, Clone, Default)]
pub struct Thresholds {
    /// Most oversold tickets allowed (I1), per run.
    #[arg(long)]
    pub max_oversell: Option<i64>,
    /// Most invariant violations allowed, I1 to I7 summed, per run.
    #[arg(long)]
    pub max_violations: Option<i64>,
    /// Highest p99 latency allowed of the scenario's main operation (purchase, else the first).
    #[arg(long)]
    pub p99_ms: Option<f64>,
    /// Lowest throughput allowed, requests per second over the measured time.
    #[arg(long)]
    pub min_rps: Option<f64>,
    /// Highest share of requests allowed with no answer or a 5xx, in percent.
    #[arg(long)]
    pub max_error_pct: Option<f64>,
}
