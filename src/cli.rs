//! The command line: `ticketflow serve`, `migrate`, `simulate`, `node` and `replay`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::config::NodeRole;
use crate::config::{
    parse_duration, Durability, Failpoints, LatencyModel, LockedSettings, PaymentSettings,
    Settings, StageKind, V1Access,
};

#[derive(Debug, Parser)]
#[command(
    name = "ticketflow",
    version,
    about = "An event-ticketing server built as a concurrency lab"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "TICKETFLOW_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API on one stage.
    Serve(Box<ServeArgs>),
    /// Create the database if needed and apply the migrations, then exit.
    Migrate(DbArgs),
    /// Run the deterministic simulator over a range of seeds (exit 1 if any seed fails).
    Simulate(SimulateArgs),
    /// Run one node of stage `services` (PostgreSQL only), for deployments over machines.
    Node(Box<NodeArgs>),
    /// Stage `saga` (PostgreSQL only): rebuild every projection (orders, tickets, payments,
    /// event availability) from the event log alone and compare it with the live tables row by
    /// row; exit 0 only when they are equal, 1 (printing each difference) otherwise.
    Replay(DbArgs),
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// What this node does.
    #[arg(value_enum)]
    pub role: NodeRole,
    /// This node's id, unique in the deployment (it names the owner of its shard leases).
    /// Defaults to `ROLE-PID`.
    #[arg(long, env = "TICKETFLOW_NODE_ID")]
    pub node_id: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Settings of stage `services` (ignored by the other stages).
#[derive(Debug, Args)]
#[command(next_help_heading = "Stage services")]
pub struct ServicesArgs {
    /// How many inventory nodes `serve --stage services` starts.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub inventory_nodes: Option<u32>,
    /// Where the payments node answers (`http://HOST:PORT`): for `ticketflow node`, and for
    /// `serve --stage saga`, which then starts none of its own. By default the live payments
    /// node is looked up in the database's node list.
    #[arg(long, env = "TICKETFLOW_PAYMENTS_URL")]
    pub payments_url: Option<String>,
    /// Restart a node of `serve --stage services` that dies. Off by default, so that a
    /// failover can be watched.
    #[arg(long)]
    pub restart_nodes: bool,
    /// How long a shard lease lasts without renewal: a dead node's shards move to the others
    /// after at most this plus one renewal interval.
    #[arg(long, default_value = "3s", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,
    /// How often a node renews its leases and looks for shards to take; under the TTL.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub renew_every: Duration,
    /// UNSAFE, for the lesson only: inventory writes stop proving their shard's epoch, so a
    /// node paused past its lease can double-sell.
    #[arg(long)]
    pub unsafe_no_epoch: bool,
    /// A failpoint for the tests: an inventory node's writer waits this long before each
    /// transaction.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub failpoint_delay_writes: Option<Duration>,
}

impl ServicesArgs {
    /// Whether the lease settings fit together.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_every >= self.lease_ttl {
            return Err(format!(
                "--renew-every {:?} must be shorter than --lease-ttl {:?}, or leases run out between renewals",
                self.renew_every, self.lease_ttl
            ));
        }
        Ok(())
    }
}

fn parse_lease_ttl(raw: &str) -> Result<Duration, String> {
    let ttl = parse_duration(raw)?;
    if ttl < Duration::from_millis(100) {
        return Err("the lease TTL must be at least 100ms".into());
    }
    Ok(ttl)
}

impl NodeArgs {
    /// The node's settings, or why they do not fit together.
    pub fn settings(&self) -> Result<Settings, String> {
        if self.serve.stage != StageKind::Actor {
            return Err(format!(
                "--stage {} does not apply to `ticketflow node`: a node is always stage services",
                self.serve.stage
            ));
        }
        let services = &self.serve.services;
        services.check()?;
        if services.inventory_nodes.is_some() || services.restart_nodes {
            return Err("--inventory-nodes and --restart-nodes belong to `ticketflow serve --stage services`, which starts the nodes; `ticketflow node` runs one".into());
        }
        let mut settings = self.serve.settings();
        if settings.admin_token.is_none() {
            return Err("`ticketflow node` needs --admin-token (TICKETFLOW_ADMIN_TOKEN), the same on every node: the nodes call each other with it".into());
        }
        settings.stage = StageKind::Services;
        settings.services = crate::config::ServicesSettings {
            role: self.role,
            payments_url: services.payments_url.clone(),
            node_id: self
                .node_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", self.role, std::process::id())),
            lease_ttl: services.lease_ttl,
            renew_every: services.renew_every,
            epoch_fence: !services.unsafe_no_epoch,
            delay_writes: services.failpoint_delay_writes,
        };
        Ok(settings)
    }
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// How many seeds to run.
    #[arg(long, required_unless_present = "list_planted_bugs", value_parser = clap::value_parser!(u64).range(1..))]
    pub seeds: Option<u64>,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    pub seed_start: u64,
    /// Events per run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub events: u32,
    /// Buyers per run.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub buyers: u32,
    /// Plant a known bug in the event core, to show the simulator finds it (see
    /// `--list-planted-bugs`). Only the simulator can plant one; `serve` never does.
    #[arg(long, value_parser = parse_planted_bug)]
    pub planted_bug: Option<crate::event_core::PlantedBug>,
    /// Stop after the first failing seed (to find a planted bug quickly).
    #[arg(long)]
    pub stop_on_failure: bool,
    /// Print the names of the bugs `--planted-bug` can plant, one per line, and exit.
    #[arg(long)]
    pub list_planted_bugs: bool,
}

fn parse_planted_bug(raw: &str) -> Result<crate::event_core::PlantedBug, String> {
    use crate::event_core::PlantedBug;
    PlantedBug::parse(raw).ok_or_else(|| {
        let names: Vec<&str> = PlantedBug::ALL.iter().map(|b| b.name()).collect();
        format!("`{raw}` is not a planted bug; one of {}", names.join(", "))
    })
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// Database: a SQLite file path or `sqlite://PATH` (created if missing), or PostgreSQL as
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DATABASE` (the database is created if missing).
    #[arg(long = "db", env = "DATABASE_URL", default_value = "ticketflow.db")]
    pub database: String,
    /// Durability: `normal` survives a killed process, `full` also a power cut (SQLite
    /// `synchronous`; PostgreSQL `synchronous_commit` off or on).
    #[arg(long, value_enum, default_value_t = Durability::Normal)]
    pub synchronous: Durability,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Back end that decides purchases.
    #[arg(long, value_enum, default_value_t = StageKind::Actor, env = "TICKETFLOW_STAGE")]
    pub stage: StageKind,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "TICKETFLOW_BIND")]
    pub bind: SocketAddr,
    #[command(flatten)]
    pub db: DbArgs,
    /// Seed of the payment simulator and of ticket ids: the same seed replays the same run.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Payment gateway latency: `0`, a fixed duration (`50ms`), a uniform range (`1s..3s`) or
    /// `lognormal:MEDIAN:SIGMA` (e.g. `lognormal:200ms:0.5`).
    #[arg(long, default_value = "1s..3s", value_parser = parse_latency)]
    pub payment_latency: LatencyModel,
    /// Probability (0 to 1) that the gateway declines a charge.
    #[arg(long, default_value_t = 0.10, value_parser = parse_rate)]
    pub payment_failure_rate: f64,
    /// Number of payment actors in the gateway pool.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub payment_pool: u16,
    /// How long a held seat waits for its payment before it returns to inventory.
    #[arg(long, default_value = "30s", value_parser = parse_hold_ttl)]
    pub hold_ttl: Duration,
    /// Load the seed's three sample events into an empty database (the third, id 3, has 100 tickets).
    #[arg(long)]
    pub demo_data: bool,
    /// Threads hosting event actors (`actor` stage); 0 means one per core.
    #[arg(long, default_value_t = 0)]
    pub arbiters: usize,
    /// Bound of each event actor's mailbox; when full, purchases are answered 503.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub mailbox_capacity: u32,
    /// How long an event's actor may sit unused, with no purchase under way, before it is
    /// passivated (`actor` stage and inventory nodes); the next purchase activates it again
    /// from storage.
    #[arg(long, default_value = "5min", value_parser = parse_positive_duration)]
    pub actor_idle: Duration,
    /// Most writes one group commit may take (`actor` stage); 1 means a transaction per write.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_batch: u32,
    /// HTTP worker threads; 0 means one per core.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Most connections open at once (all workers together); past it a new connection is
    /// answered 503 and closed at once. Keep it below the descriptor limit (`ulimit -n`).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Longest a request body may take to arrive in full; past it the request is answered 408
    /// and its connection closed.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub body_timeout: Duration,
    /// Most availability streams (`GET /api/v2/events/{id}/availability`) open at once; past
    /// it a new one is answered 503. Each costs a connection, so keep it under
    /// --max-connections.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams: u32,
    /// Most availability streams one client address may have open; past it, 429.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams_per_client: u32,
    /// Longest a client may take to send a request's headers (answered 408 past it).
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pub header_timeout: Duration,
    /// Bearer token for API v2's admin routes; if unset, a random one is made and logged.
    #[arg(long, env = "TICKETFLOW_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Serve API v1 (no tokens, as in the seed) `open`, or `off`. Default: open when bound to a
    /// loopback address, off otherwise.
    #[arg(long, value_enum, env = "TICKETFLOW_V1")]
    pub v1: Option<V1Access>,
    /// Rate limit, repeatable: `off` (every limit lifted, for load tests), or `KIND=N/UNIT`
    /// (unit `s`, `min` or `h`) or `KIND=off`, KIND one of `purchases` (v1, per client
    /// address; default 20/s), `orders` (v2, per user; 10/s), `accounts` (v2 users created per
    /// client address; 10/min).
    #[arg(long = "rate-limit", value_parser = parse_rate_limit)]
    pub rate_limit: Vec<String>,
    /// Most tickets one user may hold or own per event through API v2 orders.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub per_user_limit: u32,
    /// `monolith` only: wrap each purchase in one write transaction (`BEGIN IMMEDIATE` …
    /// `COMMIT`) held across the payment. Correct, and the price of it is the db-locks lesson.
    #[arg(long)]
    pub purchase_transaction: bool,
    /// `saga` only, for the crash-recovery tests: exit the process at once right after this
    /// step (its exit code is 86).
    #[arg(long, value_enum, hide = true)]
    pub saga_crash_after: Option<crate::config::SagaStep>,
    /// How long a SQLite connection waits for the file's write lock before `database is
    /// locked` (`PRAGMA busy_timeout`).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sqlite_busy_timeout: Duration,
    #[command(flatten)]
    pub locked: LockedArgs,
    #[command(flatten)]
    pub services: ServicesArgs,
}

/// Settings of the `locked` stage (ignored by the others).
#[derive(Debug, Args)]
pub struct LockedArgs {
    /// Redis for the `locked` stage's locks and payment queue.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of every Redis key the `locked` stage writes.
    #[arg(long, env = "TICKETFLOW_REDIS_PREFIX", default_value = "ticketflow")]
    pub redis_prefix: String,
    /// Lease of an event's Redis lock (`locked` stage).
    #[arg(long, default_value = "2s", value_parser = parse_lock_ttl)]
    pub lock_ttl: Duration,
    /// Longest a purchase waits for an event's lock before it is answered 503.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lock_wait: Duration,
    /// UNSAFE, for the Redlock lesson only: stop checking fencing tokens on inventory writes.
    #[arg(long)]
    pub unsafe_no_fencing: bool,
    /// For the Redlock lesson and tests only (`locked` stage): the first reservations pause
    /// this long between reading and writing the inventory, one duration per reservation
    /// (comma-separated, e.g. `1s`), as a lock holder stopped by GC or SIGSTOP would.
    #[arg(long, value_delimiter = ',', value_parser = parse_duration, value_name = "DURATION,...")]
    pub pause_after_read: Vec<Duration>,
}

fn parse_latency(raw: &str) -> Result<LatencyModel, String> {
    raw.parse()
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "`{raw}` is not a probability; give a number from 0 to 1, e.g. 0.1"
        )),
    }
}

fn parse_hold_ttl(raw: &str) -> Result<Duration, String> {
    let ttl = parse_duration(raw)?;
    if ttl < Duration::from_millis(10) {
        return Err("the hold TTL must be at least 10ms".into());
    }
    Ok(ttl)
}

fn parse_rate_limit(raw: &str) -> Result<String, String> {
    crate::config::RateLimits::default().apply(raw)?;
    Ok(raw.to_owned())
}

fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
    let d = parse_duration(raw)?;
    if d < Duration::from_millis(10) {
        return Err("must be at least 10ms".into());
    }
    Ok(d)
}

fn parse_lock_ttl(raw: &str) -> Result<Duration, String> {
    let ttl = parse_duration(raw)?;
    if ttl < Duration::from_millis(10) {
        return Err("the lock TTL must be at least 10ms".into());
    }
    Ok(ttl)
}

impl ServeArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            stage: self.stage,
            bind: self.bind,
            database: self.db.database.clone(),
            durability: self.db.synchronous,
            seed: self.seed,
            payments: PaymentSettings {
                pool_size: usize::from(self.payment_pool),
                latency: self.payment_latency,
                failure_rate: self.payment_failure_rate,
            },
            hold_ttl: self.hold_ttl,
            demo_data: self.demo_data,
            arbiters: self.arbiters,
            mailbox_capacity: self.mailbox_capacity as usize,
            actor_idle: self.actor_idle,
            max_batch: self.max_batch as usize,
            http_workers: self.workers,
            max_connections: self.max_connections as usize,
            body_timeout: self.body_timeout,
            max_streams: self.max_streams as usize,
            max_streams_per_client: self.max_streams_per_client as usize,
            header_timeout: self.header_timeout,
            admin_token: self.admin_token.clone(),
            per_user_limit: self.per_user_limit,
            v1: self.v1,
            rate_limits: {
                let mut limits = crate::config::RateLimits::default();
                for rule in &self.rate_limit {
                    limits.apply(rule).expect("checked by the parser");
                }
                limits
            },
            purchase_transaction: self.purchase_transaction,
            saga_crash_after: self.saga_crash_after,
            locked: LockedSettings {
                redis_url: self.locked.redis_url.clone(),
                key_prefix: self.locked.redis_prefix.clone(),
                lock_ttl: self.locked.lock_ttl,
                lock_wait: self.locked.lock_wait,
                fencing: !self.locked.unsafe_no_fencing,
                failpoints: Failpoints {
                    pauses_after_read: self.locked.pause_after_read.clone(),
                    ..Failpoints::default()
                },
                ..LockedSettings::default()
            },
            // Stage saga calls a payments node: where it is, and how fresh its report must be.
            services: crate::config::ServicesSettings {
                payments_url: self.services.payments_url.clone(),
                lease_ttl: self.services.lease_ttl,
                renew_every: self.services.renew_every,
                ..crate::config::ServicesSettings::default()
            },
            ..Settings::new(self.db.database.clone())
        }
    }
}
