//! Settings of a running server, independent of how they were given (CLI, environment, tests).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// Which back end serves the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    /// The seed's step 1: racy on purpose (oversells, loses updates).
    Monolith,
    /// One actor per event serialises purchases; payments go to an actor pool; group commit.
    Actor,
    /// The seed's step 2: a Redis lock per event (with a fencing token), a Redis payment queue.
    Locked,
    /// The seed's step 3: event actors sharded over inventory nodes on PostgreSQL. So far only
    /// the inventory node is built (`ticketflow node inventory`), so `serve --stage` does not
    /// offer it yet.
    #[value(skip)]
    Services,
}

impl StageKind {
    /// Whether this stage runs on `backend`: the monolith is SQLite-only, as the seed's step 1;
    /// `services` is PostgreSQL-only (its shard leases live there).
    pub fn runs_on(self, backend: crate::store::Backend) -> bool {
        use crate::store::Backend;
        match self {
            Self::Monolith => backend == Backend::Sqlite,
            Self::Services => backend == Backend::Postgres,
            Self::Actor | Self::Locked => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Monolith => "monolith",
            Self::Actor => "actor",
            Self::Locked => "locked",
            Self::Services => "services",
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long the simulated payment gateway takes to answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatencyModel {
    /// Answers at once (throughput runs).
    Zero,
    Fixed(Duration),
    /// Uniform between the two bounds (the seed's `1s..3s`).
    Uniform(Duration, Duration),
    /// Log-normal with the given median and shape `sigma`: a long tail like real gateways.
    LogNormal {
        median: Duration,
        sigma: f64,
    },
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self::Uniform(Duration::from_secs(1), Duration::from_secs(3))
    }
}

impl FromStr for LatencyModel {
    type Err = String;

    /// Accepts `0`, a duration (`50ms`), a range (`1s..3s`) or `lognormal:MEDIAN:SIGMA`.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = raw.trim();
        if raw == "0" {
            return Ok(Self::Zero);
        }
        if let Some(rest) = raw.strip_prefix("lognormal:") {
            let (median, sigma) = rest
                .split_once(':')
                .ok_or("expected lognormal:MEDIAN:SIGMA, e.g. lognormal:200ms:0.5")?;
            let median = parse_duration(median)?;
            let sigma: f64 = sigma
                .parse()
                .map_err(|_| format!("sigma `{sigma}` is not a number"))?;
            if !(sigma.is_finite() && sigma > 0.0 && sigma <= 5.0) {
                return Err("sigma must be in (0, 5]".into());
            }
            return Ok(Self::LogNormal { median, sigma });
        }
        if let Some((low, high)) = raw.split_once("..") {
            let (low, high) = (parse_duration(low)?, parse_duration(high)?);
            if low > high {
                return Err(format!("range `{raw}` has its low end above its high end"));
            }
            return Ok(Self::Uniform(low, high));
        }
        let fixed = parse_duration(raw)?;
        Ok(if fixed.is_zero() {
            Self::Zero
        } else {
            Self::Fixed(fixed)
        })
    }
}

impl fmt::Display for LatencyModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero => f.write_str("0"),
            Self::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
            Self::Uniform(a, b) => write!(
                f,
                "{}..{}",
                humantime::format_duration(*a),
                humantime::format_duration(*b)
            ),
            Self::LogNormal { median, sigma } => {
                write!(
                    f,
                    "lognormal:{}:{sigma}",
                    humantime::format_duration(*median)
                )
            }
        }
    }
}

/// Parses a human duration such as `250ms`, `2s` or `1m`; a bare number is refused as ambiguous.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let d = humantime::parse_duration(raw)
        .map_err(|_| format!("`{raw}` is not a duration (write e.g. 50ms, 2s, 1m)"))?;
    if d > Duration::from_secs(3600) {
        return Err(format!("`{raw}` is longer than one hour"));
    }
    Ok(d)
}

/// How hard SQLite works to keep a commit (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// WAL + NORMAL: a commit survives the process being killed, not a power cut.
    Normal,
    /// WAL + FULL: every commit is fsynced; survives a power cut.
    Full,
}

/// The simulated payment gateway.
#[derive(Debug, Clone)]
pub struct PaymentSettings {
    /// Number of payment actors; each serves its share of payment keys.
    pub pool_size: usize,
    pub latency: LatencyModel,
    /// Probability in [0, 1] that a charge is declined.
    pub failure_rate: f64,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            pool_size: 8,
            latency: LatencyModel::default(),
            failure_rate: 0.10,
        }
    }
}

/// The `locked` stage: where Redis is, and how its lock and payment queue behave.
#[derive(Debug, Clone)]
pub struct LockedSettings {
    /// `redis://host:port[/db]`.
    pub redis_url: String,
    /// Prefix of every Redis key the stage writes, so several servers (or tests) share a Redis.
    pub key_prefix: String,
    /// How long a lock lease lives if its holder never releases it.
    pub lock_ttl: Duration,
    /// Longest a purchase waits for an event's lock before it is answered 503.
    pub lock_wait: Duration,
    /// Check the fencing token on every inventory write. **Switching it off is unsafe**: a
    /// holder paused past its lease then writes over its successor (a double sale). It exists
    /// only to show that lesson.
    pub fencing: bool,
    /// Payment jobs the worker runs at once.
    pub worker_concurrency: usize,
    /// Faults to inject, for tests and demonstrations only.
    pub failpoints: Failpoints,
}

impl Default for LockedSettings {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "ticketflow".into(),
            lock_ttl: Duration::from_secs(2),
            lock_wait: Duration::from_secs(10),
            fencing: true,
            worker_concurrency: 256,
            failpoints: Failpoints::default(),
        }
    }
}

/// Faults the `locked` stage can inject on purpose (tests and the Redlock lesson).
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    /// The n-th reservation (counting from 0) sleeps `pauses_after_read[n]` between reading
    /// availability and writing it, as a holder paused by GC or SIGSTOP would; later ones
    /// do not pause.
    pub pauses_after_read: Vec<Duration>,
    /// The payment worker dies (panics) right after its first charge, mid-job.
    pub crash_worker_after_charge_once: bool,
    /// The payment worker stops making progress (neither jobs nor heartbeats) right after its
    /// first charge, mid-job, while its task lives on: what a deadlock inside the queue
    /// library looks like.
    pub freeze_worker_once: bool,
    /// Every payment job fails its first `n` attempts after charging.
    pub fail_job_attempts: u32,
}

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub stage: StageKind,
    pub bind: SocketAddr,
    /// A path or `sqlite:` URL.
    pub database: String,
    pub durability: Durability,
    pub seed: u64,
    pub payments: PaymentSettings,
    pub hold_ttl: Duration,
    pub demo_data: bool,
    /// Arbiters (threads) that host event actors; 0 means one per core.
    pub arbiters: usize,
    /// Bound of each event actor's mailbox; a full mailbox is answered 503.
    pub mailbox_capacity: usize,
    /// Most writes one group commit takes.
    pub max_batch: usize,
    /// HTTP worker threads; 0 means one per core.
    pub http_workers: usize,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Bearer token for admin routes (API v2); when `None` the server makes one and logs it.
    pub admin_token: Option<String>,
    /// Most tickets one user may hold or own per event through API v2 orders.
    pub per_user_limit: u32,
    /// The `locked` stage's Redis settings.
    pub locked: LockedSettings,
    /// Stage `services`: this node's id and its shard leases.
    pub services: ServicesSettings,
}

impl Settings {
    /// Defaults for a given database: the actor stage, the seed's payment gateway.
    pub fn new(database: impl Into<String>) -> Self {
        Self {
            stage: StageKind::Actor,
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database: database.into(),
            durability: Durability::Normal,
            seed: 42,
            payments: PaymentSettings::default(),
            hold_ttl: Duration::from_secs(30),
            demo_data: false,
            arbiters: 0,
            mailbox_capacity: 4096,
            max_batch: 512,
            http_workers: 0,
            max_body_bytes: 16 * 1024,
            admin_token: None,
            per_user_limit: 4,
            locked: LockedSettings::default(),
            services: ServicesSettings::default(),
        }
    }
}

/// Settings of a node of stage `services` (ignored by the other stages).
#[derive(Debug, Clone)]
pub struct ServicesSettings {
    /// This node's id, unique in the deployment: it names the owner of its shard leases.
    pub node_id: String,
    /// How long a shard lease lasts without renewal; a dead node's shards move after it.
    pub lease_ttl: Duration,
    /// How often a node renews its leases and looks for shards to take (well under the TTL).
    pub renew_every: Duration,
    /// `false` only for the lesson: inventory writes stop proving their shard's epoch.
    pub epoch_fence: bool,
}

impl Default for ServicesSettings {
    fn default() -> Self {
        Self {
            node_id: format!("inventory-{}", std::process::id()),
            lease_ttl: Duration::from_secs(3),
            renew_every: Duration::from_secs(1),
            epoch_fence: true,
        }
    }
}

/// Cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_accepts_zero_fixed_ranges_and_lognormal() {
        assert_eq!("0".parse::<LatencyModel>(), Ok(LatencyModel::Zero));
        assert_eq!(
            "50ms".parse::<LatencyModel>(),
            Ok(LatencyModel::Fixed(Duration::from_millis(50)))
        );
        assert_eq!(
            "1s..3s".parse::<LatencyModel>(),
            Ok(LatencyModel::Uniform(
                Duration::from_secs(1),
                Duration::from_secs(3)
            ))
        );
        assert!(matches!(
            "lognormal:200ms:0.5".parse::<LatencyModel>(),
            Ok(LatencyModel::LogNormal { .. })
        ));
        assert!("3s..1s".parse::<LatencyModel>().is_err());
        assert!("fast".parse::<LatencyModel>().is_err());
        assert!("50".parse::<LatencyModel>().is_err());
    }
}
