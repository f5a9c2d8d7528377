//! Scenarios and their settings: presets, a scenario file (TOML) and flags, in that order of
//! precedence from weakest to strongest.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// What the virtual clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// Many buyers, one hot event, demand far beyond supply; buyers retry until a ticket or
    /// `sold-out`.
    Stampede,
    /// Many events with Zipf popularity; buyers retry like in `stampede`.
    Spread,
    /// Read-heavy: about `reads-per-purchase` reads (event list, event page) per purchase.
    Browse,
    /// Buyers against a server started with payment declines, slow (log-normal) payments and a
    /// short hold TTL; client timeouts make unknown outcomes that the audit resolves.
    PaymentChaos,
    /// API v2: each buyer places one order and resends it `resends` times with the same
    /// `Idempotency-Key`, then polls it until confirmed. A stage without API v2 is reported as
    /// skipped, never faked.
    RetryStorm,
    /// `GET /health` only: the raw request rate, for comparing with wrk.
    Health,
}

impl ScenarioKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stampede => "stampede",
            Self::Spread => "spread",
            Self::Browse => "browse",
            Self::PaymentChaos => "payment-chaos",
            Self::RetryStorm => "retry-storm",
            Self::Health => "health",
        }
    }

    pub fn all() -> [Self; 6] {
        [
            Self::Stampede,
            Self::Spread,
            Self::Browse,
            Self::PaymentChaos,
            Self::RetryStorm,
            Self::Health,
        ]
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Stampede => {
                "many buyers, one hot event, demand >> supply; retry until ticket or sold-out"
            }
            Self::Spread => "many events with Zipf popularity; buyers retry like stampede",
            Self::Browse => "about 100 reads (event list, event page) per purchase",
            Self::PaymentChaos => {
                "buyers vs declines, slow log-normal payments, short holds, client timeouts"
            }
            Self::RetryStorm => {
                "same idempotency key resent (needs API v2: skipped on every stage today)"
            }
            Self::Health => "GET /health only: raw request rate, to compare with wrk",
        }
    }

    /// Whether iterations buy tickets (and so the client keeps a record for I7).
    pub fn buys(self) -> bool {
        !matches!(self, Self::Health)
    }
}

impl fmt::Display for ScenarioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// N virtual users, each sending its next iteration when the previous one is answered.
    Closed,
    /// Arrivals on a schedule, whatever the server does; latency from the intended send time.
    Open,
}

impl ApiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

/// Which API the buyers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ApiVersion {
    /// `POST /api/v1/tickets/purchase`, answered once confirmed or failed; every stage.
    V1,
    /// Users with tokens, `POST /api/v2/orders` with an Idempotency-Key answered `202` once the
    /// seats are held, then polled: reservation and confirmation measured apart. Stages without
    /// it are skipped.
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Arrivals {
    /// Evenly spaced, `1/rate` apart.
    Constant,
    /// Exponential gaps with mean `1/rate` (seeded).
    Poisson,
}

/// Every setting a scenario file or a flag may give; `None` means "not given here".
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Overrides {
    /// Scenario to run (default `stampede`).
    #[arg(long, value_enum)]
    pub scenario: Option<ScenarioKind>,
    /// API the buyers use: `v1` (every stage) or `v2` (orders, idempotency keys; stages without
    /// it are skipped). `retry-storm` is always `v2`.
    #[arg(long, value_enum)]
    pub api: Option<ApiVersion>,
    /// Seed of the workload (user ids, event choices, arrivals, jitter) and of the spawned
    /// server; random when not given, always printed and recorded.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Load model: `closed` (virtual users) or `open` (arrival rate).
    #[arg(long, value_enum)]
    pub model: Option<ModelKind>,
    /// Closed model: number of virtual users, each with its own connection.
    #[arg(long)]
    pub vus: Option<u32>,
    /// Open model: arrivals per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open model: `constant` or `poisson` arrivals.
    #[arg(long, value_enum)]
    pub arrivals: Option<Arrivals>,
    /// Open model: connections (concurrent iterations at most).
    #[arg(long)]
    pub connections: Option<u32>,
    /// Open model: an arrival that cannot start within this much of its intended time is
    /// dropped (not sent) and counted.
    #[arg(long, value_parser = parse_duration_arg)]
    #[serde(default, deserialize_with = "de_duration")]
    pub max_lag: Option<Duration>,
    /// Stop after this long (e.g. `10s`). With `--requests`, whichever comes first.
    #[arg(long, value_parser = parse_duration_arg)]
    #[serde(default, deserialize_with = "de_duration")]
    pub duration: Option<Duration>,
    /// Stop after this many iterations (a buyer, a read, a health check).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Leading time whose measurements are left out of the figures (still sent and audited).
    #[arg(long, value_parser = parse_duration_arg)]
    #[serde(default, deserialize_with = "de_duration")]
    pub warmup: Option<Duration>,
    /// Per-request timeout; a purchase that times out is an unknown outcome.
    #[arg(long, value_parser = parse_duration_arg)]
    #[serde(default, deserialize_with = "de_duration")]
    pub timeout: Option<Duration>,
    /// Worker threads of the load generator (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seats per event the scenario creates.
    #[arg(long)]
    pub tickets: Option<u32>,
    /// Events the scenario creates (`spread`, `browse`, `payment-chaos`).
    #[arg(long)]
    pub events: Option<u32>,
    /// Zipf exponent of event popularity (`spread`, `browse`).
    #[arg(long)]
    pub zipf_s: Option<f64>,
    /// Reads per purchase (`browse`).
    #[arg(long)]
    pub reads_per_purchase: Option<u32>,
    /// Purchase attempts per buyer before it gives up.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// API v2: copies of each order sent with the same Idempotency-Key (3 for `retry-storm`,
    /// else 1).
    #[arg(long)]
    pub resends: Option<u32>,
    /// Longest pause between a buyer's attempts; `Retry-After` is honoured up to this.
    #[arg(long, value_parser = parse_duration_arg)]
    #[serde(default, deserialize_with = "de_duration")]
    pub max_backoff: Option<Duration>,
    /// After the load, how long to wait for the server to be quiet (nothing pending, held, in
    /// flight, queued or unflushed) before the audit; past it the audit is reported not quiet.
    #[arg(long, value_parser = parse_duration_arg)]
    #[serde(default, deserialize_with = "de_duration")]
    pub settle: Option<Duration>,
    /// Spawned server: `--payment-latency` (`0`, `50ms`, `1s..3s`, `lognormal:200ms:0.5`).
    #[arg(long)]
    pub payment_latency: Option<String>,
    /// Spawned server: `--payment-failure-rate` (0 to 1).
    #[arg(long)]
    pub payment_failure_rate: Option<f64>,
    /// Spawned server: `--hold-ttl`.
    #[arg(long)]
    pub hold_ttl: Option<String>,
}

/// The settings a run uses, all resolved; recorded in the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub scenario: ScenarioKind,
    pub api: ApiVersion,
    pub seed: u64,
    pub model: ModelKind,
    pub vus: u32,
    pub rate: Option<f64>,
    pub arrivals: Arrivals,
    pub connections: u32,
    #[serde(serialize_with = "ser_ms", rename = "maxLagMs")]
    pub max_lag: Duration,
    #[serde(serialize_with = "ser_opt_ms", rename = "durationMs")]
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    #[serde(serialize_with = "ser_ms", rename = "warmupMs")]
    pub warmup: Duration,
    #[serde(serialize_with = "ser_ms", rename = "timeoutMs")]
    pub timeout: Duration,
    pub threads: usize,
    pub tickets: u32,
    pub events: u32,
    pub zipf_s: f64,
    pub reads_per_purchase: u32,
    pub max_attempts: u32,
    pub resends: u32,
    #[serde(serialize_with = "ser_ms", rename = "maxBackoffMs")]
    pub max_backoff: Duration,
    #[serde(serialize_with = "ser_ms", rename = "settleMs")]
    pub settle: Duration,
    pub payment_latency: String,
    pub payment_failure_rate: f64,
    pub hold_ttl: String,
}

impl Overrides {
    /// Reads a scenario file (TOML, keys as the flags without `--`).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--scenario-file {}: cannot read it", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "--scenario-file {}: {}",
                path.display(),
                e.to_string().replace('\n', " ")
            )
        })
    }

    /// `self` wins over `weaker` field by field.
    pub fn over(self, weaker: Overrides) -> Overrides {
        macro_rules! pick {
            ($($f:ident),*) => { Overrides { $($f: self.$f.or(weaker.$f)),* } };
        }
        pick!(
            scenario,
            api,
            seed,
            model,
            vus,
            rate,
            arrivals,
            connections,
            max_lag,
            duration,
            requests,
            warmup,
            timeout,
            threads,
            tickets,
            events,
            zipf_s,
            reads_per_purchase,
            max_attempts,
            resends,
            max_backoff,
            settle,
            payment_latency,
            payment_failure_rate,
            hold_ttl
        )
    }

    /// Fills what is missing from the scenario's preset and checks the result.
    pub fn resolve(self) -> anyhow::Result<Settings> {
        let scenario = self.scenario.unwrap_or(ScenarioKind::Stampede);
        let p = preset(scenario);
        let seed = self.seed.unwrap_or_else(random_seed);
        let model = self.model.unwrap_or(ModelKind::Closed);
        let (mut duration, mut requests) = (self.duration, self.requests);
        if duration.is_none() && requests.is_none() {
            (duration, requests) = (p.duration, p.requests);
        }
        let api = match (scenario, self.api) {
            (ScenarioKind::RetryStorm, Some(ApiVersion::V1)) => {
                bail!("--api v1: retry-storm needs idempotency keys, which only API v2 has")
            }
            (ScenarioKind::RetryStorm, _) => ApiVersion::V2,
            (_, api) => api.unwrap_or(ApiVersion::V1),
        };
        let s = Settings {
            scenario,
            api,
            seed,
            model,
            vus: self.vus.unwrap_or(p.vus),
            rate: self.rate,
            arrivals: self.arrivals.unwrap_or(Arrivals::Constant),
            connections: self.connections.unwrap_or(p.vus),
            max_lag: self.max_lag.unwrap_or(Duration::from_secs(1)),
            duration,
            requests,
            warmup: self.warmup.unwrap_or(Duration::ZERO),
            timeout: self.timeout.unwrap_or(p.timeout),
            threads: self
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            tickets: self.tickets.unwrap_or(p.tickets),
            events: self.events.unwrap_or(p.events),
            zipf_s: self.zipf_s.unwrap_or(1.1),
            reads_per_purchase: self.reads_per_purchase.unwrap_or(100),
            max_attempts: self.max_attempts.unwrap_or(p.max_attempts),
            resends: self
                .resends
                .unwrap_or(if scenario == ScenarioKind::RetryStorm {
                    3
                } else {
                    1
                }),
            max_backoff: self.max_backoff.unwrap_or(Duration::from_millis(250)),
            settle: self.settle.unwrap_or(Duration::from_secs(5)),
            payment_latency: self
                .payment_latency
                .unwrap_or_else(|| p.payment_latency.to_owned()),
            payment_failure_rate: self.payment_failure_rate.unwrap_or(p.payment_failure_rate),
            hold_ttl: self.hold_ttl.unwrap_or_else(|| p.hold_ttl.to_owned()),
        };
        s.check()?;
        Ok(s)
    }
}

impl Settings {
    fn check(&self) -> anyhow::Result<()> {
        if self.model == ModelKind::Open {
            match self.rate {
                Some(r) if r > 0.0 && r.is_finite() => {}
                Some(r) => bail!("--rate {r}: give a positive number of arrivals per second"),
                None => bail!("--model open needs --rate (arrivals per second)"),
            }
            if self.duration.is_none() && self.requests.is_none() {
                bail!("--model open needs --duration or --requests");
            }
        } else if self.rate.is_some() {
            bail!("--rate applies to --model open only; the closed model uses --vus");
        }
        if self.vus == 0 || self.connections == 0 {
            bail!("--vus and --connections must be at least 1");
        }
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        if self.scenario.buys() && (self.tickets == 0 || self.events == 0) {
            bail!("--tickets and --events must be at least 1");
        }
        if !(self.zipf_s > 0.0 && self.zipf_s.is_finite()) {
            bail!("--zipf-s {}: give a positive exponent", self.zipf_s);
        }
        if self.max_attempts == 0 {
            bail!("--max-attempts must be at least 1");
        }
        if self.resends == 0 {
            bail!("--resends must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.payment_failure_rate) {
            bail!(
                "--payment-failure-rate {}: give a probability from 0 to 1",
                self.payment_failure_rate
            );
        }
        if self.requests == Some(0) {
            bail!("--requests must be at least 1");
        }
        Ok(())
    }

    /// The load bound in words, for the summary.
    pub fn bound(&self) -> String {
        match (self.duration, self.requests) {
            (Some(d), Some(n)) => format!("{n} iterations or {}", humantime::format_duration(d)),
            (Some(d), None) => humantime::format_duration(d).to_string(),
            (None, Some(n)) => format!("{n} iterations"),
            (None, None) => "unbounded".into(),
        }
    }
}

struct Preset {
    vus: u32,
    duration: Option<Duration>,
    requests: Option<u64>,
    timeout: Duration,
    tickets: u32,
    events: u32,
    max_attempts: u32,
    payment_latency: &'static str,
    payment_failure_rate: f64,
    hold_ttl: &'static str,
}

fn preset(kind: ScenarioKind) -> Preset {
    let base = Preset {
        vus: 64,
        duration: None,
        requests: Some(2000),
        timeout: Duration::from_secs(5),
        tickets: 100,
        events: 1,
        max_attempts: 20,
        payment_latency: "20ms",
        payment_failure_rate: 0.1,
        hold_ttl: "30s",
    };
    match kind {
        ScenarioKind::Stampede => base,
        ScenarioKind::RetryStorm => Preset {
            requests: Some(500),
            tickets: 100,
            ..base
        },
        ScenarioKind::Spread => Preset {
            requests: Some(3000),
            tickets: 50,
            events: 20,
            ..base
        },
        ScenarioKind::Browse => Preset {
            vus: 32,
            requests: None,
            duration: Some(Duration::from_secs(10)),
            tickets: 1000,
            events: 20,
            ..base
        },
        ScenarioKind::PaymentChaos => Preset {
            requests: Some(1000),
            timeout: Duration::from_secs(1),
            tickets: 200,
            events: 2,
            max_attempts: 10,
            payment_latency: "lognormal:100ms:1.0",
            payment_failure_rate: 0.3,
            hold_ttl: "500ms",
            ..base
        },
        ScenarioKind::Health => Preset {
            requests: None,
            duration: Some(Duration::from_secs(10)),
            payment_latency: "0",
            payment_failure_rate: 0.0,
            ..base
        },
    }
}

fn random_seed() -> u64 {
    use rand::RngCore;
    rand::rngs::OsRng.next_u64() >> 11 // fits a JSON number exactly
}

pub fn parse_duration_arg(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    if raw == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(raw)
        .map_err(|e| format!("`{raw}` is not a duration ({e}); write e.g. 500ms, 10s or 2m"))
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let raw = String::deserialize(d)?;
    parse_duration_arg(&raw)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn ser_opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_scenario_files_parse_and_resolve() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let s = Overrides::from_file(&path).unwrap().resolve().unwrap();
            assert!(s.seed > 0, "{}", path.display());
            seen += 1;
        }
        assert!(seen >= 2);
    }

    #[test]
    fn a_flag_wins_over_the_file_and_the_file_over_the_preset() {
        let file: Overrides = toml::from_str("vus = 5\ntickets = 9\n").unwrap();
        let flags = Overrides {
            vus: Some(7),
            ..Overrides::default()
        };
        let s = flags.over(file).resolve().unwrap();
        assert_eq!((s.vus, s.tickets, s.events), (7, 9, 1));
    }

    #[test]
    fn an_unknown_key_in_a_scenario_file_is_refused() {
        assert!(toml::from_str::<Overrides>("vu = 5").is_err());
    }
}
