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
    /// The seed's step 3: a gateway, a catalog and event actors sharded over inventory nodes,
    /// as separate processes on PostgreSQL.
    Services,
    /// The seed's step 4: every order an orchestrated saga over an event-sourced log with a
    /// transactional outbox, on PostgreSQL.
    Saga,
}

impl StageKind {
    /// Whether this stage runs on `backend`: the monolith is SQLite-only, as the seed's step 1;
    /// `services` and `saga` are PostgreSQL-only (shard leases; the event log and outbox).
    pub fn runs_on(self, backend: crate::store::Backend) -> bool {
        use crate::store::Backend;
        match self {
            Self::Monolith => backend == Backend::Sqlite,
            Self::Services | Self::Saga => backend == Backend::Postgres,
            Self::Actor | Self::Locked => true,
        }
    }

    /// Whether this stage keeps an event log of each order (`GET /api/v2/orders/{id}/events`
    /// is served, and in its OpenAPI document, only then).
    pub fn keeps_event_log(self) -> bool {
        self == Self::Saga
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Monolith => "monolith",
            Self::Actor => "actor",
            Self::Locked => "locked",
            Self::Services => "services",
            Self::Saga => "saga",
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A step of stage `saga`'s purchase after which a failpoint can stop the process at once
/// (`--saga-crash-after`, for the crash-recovery tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SagaStep {
    /// The transaction that records `OrderPlaced` (and queues `HoldSeats`), before the
    /// client hears.
    Placed,
    /// The orchestrator's transaction that records `SeatsHeld` (and `ChargeRequested`).
    SeatsHeld,
    /// The relay has handed the `Charge` command to the payments participant, before the
    /// gateway is called.
    ChargeRelayed,
    /// The gateway charged, before the payments participant records `PaymentSucceeded`.
    Charged,
    /// The orchestrator's transaction that records `OrderConfirmed`, before the client hears.
    Confirmed,
}

/// Whether API v1 (no tokens, as in the seed) is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum V1Access {
    /// Served as in the seed: events created and tickets bought without a token.
    Open,
    /// Not served: every `/api/v1/...` path answers `404 api-v1-off`.
    Off,
}

impl V1Access {
    /// The setting when none is given: open only on a loopback address.
    pub fn default_for(bind: SocketAddr) -> Self {
        if bind.ip().is_loopback() {
            Self::Open
        } else {
            Self::Off
        }
    }
}

/// A token bucket: `count` requests per `period`, in a burst or spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRule {
    pub count: u32,
    pub period: Duration,
}

/// Per-client rate limits; `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// v1 purchases per client address.
    pub purchases: Option<RateRule>,
    /// v2 orders per user.
    pub orders: Option<RateRule>,
    /// v2 accounts created per client address.
    pub accounts: Option<RateRule>,
}

impl Default for RateLimits {
    fn default() -> Self {
        let second = Duration::from_secs(1);
        Self {
            purchases: Some(RateRule {
                count: 20,
                period: second,
            }),
            orders: Some(RateRule {
                count: 10,
                period: second,
            }),
            accounts: Some(RateRule {
                count: 10,
                period: Duration::from_secs(60),
            }),
        }
    }
}

impl RateLimits {
    /// Every limit lifted (load tests, most integration tests).
    pub fn off() -> Self {
        Self {
            purchases: None,
            orders: None,
            accounts: None,
        }
    }

    /// Applies one `--rate-limit` value: `off`, or `KIND=N/UNIT` (`s`, `min`, `h`) or
    /// `KIND=off`, KIND one of `purchases`, `orders`, `accounts`.
    pub fn apply(&mut self, raw: &str) -> Result<(), String> {
        let raw = raw.trim();
        if raw == "off" {
            *self = Self::off();
            return Ok(());
        }
        let (kind, rule) = raw
            .split_once('=')
            .ok_or_else(|| format!("`{raw}`: write off, or KIND=N/UNIT such as purchases=20/s"))?;
        let slot = match kind.trim() {
            "purchases" => &mut self.purchases,
            "orders" => &mut self.orders,
            "accounts" => &mut self.accounts,
            other => {
                return Err(format!(
                    "`{other}` is not a limit; use purchases, orders or accounts"
                ))
            }
        };
        *slot = match rule.trim() {
            "off" => None,
            rule => {
                let (count, unit) = rule
                    .split_once('/')
                    .ok_or_else(|| format!("`{rule}`: write N/UNIT, e.g. 20/s or 10/min"))?;
                let count: u32 = count
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or_else(|| format!("`{count}`: the count must be 1 to 1000000"))?;
                let period = match unit.trim() {
                    "s" => Duration::from_secs(1),
                    "min" => Duration::from_secs(60),
                    "h" => Duration::from_secs(3600),
                    other => return Err(format!("`{other}`: the unit must be s, min or h")),
                };
                Some(RateRule { count, period })
            }
        };
        Ok(())
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
    /// The first run about to confirm an approved charge sleeps this long first: a
    /// confirmation held up by a database paused or gone away.
    pub confirm_pause_once: Option<Duration>,
    /// Every run that finds its order pending past the hold sleeps this long before it
    /// cancels the order: its reading of the order goes stale meanwhile.
    pub hold_over_pause: Option<Duration>,
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
    /// How long an event's actor stays in memory unused (`actor` stage and inventory nodes)
    /// before it is passivated; the next purchase activates it again from storage.
    pub actor_idle: Duration,
    /// Most writes one group commit takes.
    pub max_batch: usize,
    /// HTTP worker threads; 0 means one per core.
    pub http_workers: usize,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Most connections open at once, across every HTTP worker; past it a new connection is
    /// answered 503 and closed at once.
    pub max_connections: usize,
    /// Longest a request body may take to arrive in full (408 and the connection closed after).
    pub body_timeout: Duration,
    /// Most availability streams open at once (503 past it).
    pub max_streams: usize,
    /// Most availability streams one client address may have open (429 past it).
    pub max_streams_per_client: usize,
    /// Longest a client may take to send a request's headers (408 after).
    pub header_timeout: Duration,
    /// Bearer token for admin routes (API v2); when `None` the server makes one and logs it.
    pub admin_token: Option<String>,
    /// Most tickets one user may hold or own per event through API v2 orders.
    pub per_user_limit: u32,
    /// Whether API v1 is served; `None`: open on a loopback address only.
    pub v1: Option<V1Access>,
    /// Per-client rate limits.
    pub rate_limits: RateLimits,
    /// The `locked` stage's Redis settings.
    pub locked: LockedSettings,
    /// Stage `services`: this node's id and its shard leases.
    pub services: ServicesSettings,
    /// `monolith` only: each purchase is one write transaction (`BEGIN IMMEDIATE` … `COMMIT`)
    /// held across the payment — the obvious fix of its races, for the db-locks lesson.
    pub purchase_transaction: bool,
    /// Stage `saga`, tests only: the process exits at once right after this step.
    pub saga_crash_after: Option<SagaStep>,
}

impl Settings {
    /// Whether API v1 is served: the setting, or by default open on a loopback address only.
    pub fn v1_access(&self) -> V1Access {
        self.v1.unwrap_or_else(|| V1Access::default_for(self.bind))
    }

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
            actor_idle: Duration::from_secs(300),
            max_batch: 512,
            http_workers: 0,
            max_body_bytes: 16 * 1024,
            max_connections: 10_000,
            body_timeout: Duration::from_secs(10),
            max_streams: 2_000,
            max_streams_per_client: 8,
            header_timeout: Duration::from_secs(5),
            admin_token: None,
            per_user_limit: 4,
            v1: None,
            rate_limits: RateLimits::default(),
            locked: LockedSettings::default(),
            services: ServicesSettings::default(),
            purchase_transaction: false,
            saga_crash_after: None,
        }
    }
}

/// The roles a process of stage `services` can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Serves API v1 and v2 to clients and routes each purchase to its event's inventory node.
    Gateway,
    /// Owns the events: creates them and answers the event reads.
    Catalog,
    /// Runs the event actors of the shards it holds a lease on.
    Inventory,
    /// The payment actor pool and its books, behind an endpoint of its own.
    Payments,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Catalog => "catalog",
            Self::Inventory => "inventory",
            Self::Payments => "payments",
        }
    }
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of a node of stage `services` (ignored by the other stages).
#[derive(Debug, Clone)]
pub struct ServicesSettings {
    /// What this process does.
    pub role: NodeRole,
    /// Where the payments node answers (`http://HOST:PORT`); `None`: look the live one up in
    /// the database's node list.
    pub payments_url: Option<String>,
    /// This node's id, unique in the deployment: it names the owner of its shard leases.
    pub node_id: String,
    /// How long a shard lease lasts without renewal; a dead node's shards move after it.
    pub lease_ttl: Duration,
    /// How often a node renews its leases and looks for shards to take (well under the TTL).
    pub renew_every: Duration,
    /// `false` only for the lesson: inventory writes stop proving their shard's epoch.
    pub epoch_fence: bool,
    /// A failpoint for the tests: an inventory node's writer waits this long before each
    /// transaction.
    pub delay_writes: Option<Duration>,
}

impl Default for ServicesSettings {
    fn default() -> Self {
        Self {
            role: NodeRole::Inventory,
            payments_url: None,
            node_id: format!("inventory-{}", std::process::id()),
            lease_ttl: Duration::from_secs(3),
            renew_every: Duration::from_secs(1),
            epoch_fence: true,
            delay_writes: None,
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

    #[test]
    fn rate_limits_parse_off_and_per_kind_rules() {
        let mut limits = RateLimits::default();
        limits.apply("purchases=5/min").unwrap();
        assert_eq!(
            limits.purchases,
            Some(RateRule {
                count: 5,
                period: Duration::from_secs(60)
            })
        );
        limits.apply("orders=off").unwrap();
        assert_eq!(limits.orders, None);
        assert!(limits.accounts.is_some());
        limits.apply("off").unwrap();
        assert_eq!(limits, RateLimits::off());
        for bad in [
            "purchases",
            "seats=1/s",
            "orders=0/s",
            "orders=3/day",
            "orders=x/s",
        ] {
            assert!(RateLimits::default().apply(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v1_is_open_by_default_on_loopback_only() {
        for (bind, access) in [
            ("127.0.0.1:8080", V1Access::Open),
            ("[::1]:8080", V1Access::Open),
            ("0.0.0.0:8080", V1Access::Off),
            ("192.168.1.10:8080", V1Access::Off),
        ] {
            let mut settings = Settings::new("x.db");
            settings.bind = bind.parse().unwrap();
            assert_eq!(settings.v1_access(), access, "{bind}");
        }
        let mut settings = Settings::new("x.db");
        settings.bind = "0.0.0.0:8080".parse().unwrap();
        settings.v1 = Some(V1Access::Open);
        assert_eq!(
            settings.v1_access(),
            V1Access::Open,
            "an explicit setting wins"
        );
    }
}
