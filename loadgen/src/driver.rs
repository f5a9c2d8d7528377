//! The load models and the scenarios' iterations: who sends what, when, and what is measured.
//!
//! An *iteration* is one arrival: a buyer (who may retry), a read, a health check. Everything
//! an iteration does is drawn from an RNG seeded by `(seed, iteration index)`, so the same seed
//! replays the same workload whichever worker happens to run which iteration.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use serde::Deserialize;

use crate::http::{Conn, Failure, Response};
use crate::metrics::Recorder;
use crate::scenario::{ApiVersion, Arrivals, ModelKind, ScenarioKind, Settings};

/// An open-model arrival that starts this much after its intended time counts as late. Tokio's
/// timer has a 1 ms resolution, so a punctual arrival may start up to about 1 ms after its time.
pub const LATE_AFTER: Duration = Duration::from_millis(5);
/// Most arrivals an open-model schedule may hold.
const MAX_SCHEDULE: u64 = 50_000_000;

/// Operation names, as they appear in the report.
pub const OP_PURCHASE: &str = "purchase";
pub const OP_TO_CONFIRMED: &str = "purchase-to-confirmed";
pub const OP_LIST_EVENTS: &str = "list-events";
pub const OP_GET_EVENT: &str = "get-event";
pub const OP_HEALTH: &str = "health";
pub const OP_CREATE_USER: &str = "create-user";
pub const OP_ORDER: &str = "order";
pub const OP_ORDER_RESERVED: &str = "order-reserved";
pub const OP_ORDER_STATUS: &str = "order-status";
pub const OP_ORDER_TO_CONFIRMED: &str = "order-to-confirmed";

/// The stage does not serve what the scenario needs (e.g. API v2): the run is skipped.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

/// What the scenario created on the server before the load.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub event_ids: Vec<i64>,
}

/// How one buyer's story ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuyerEnd {
    Confirmed,
    SoldOut,
    /// Out of attempts, out of time, or a final error other than `sold-out`.
    GaveUp,
}

/// What one buyer saw: the client's side of I7.
#[derive(Debug, Clone)]
pub struct BuyerRecord {
    pub user_id: String,
    pub event_id: i64,
    /// Ids of the tickets answered `201` (v1), or of the orders seen confirmed (v2).
    pub tickets: Vec<String>,
    /// v2: the buyer's bearer token, to read its orders back.
    pub token: Option<String>,
    /// v2: distinct order ids the `202` answers named, one per Idempotency-Key at most.
    pub orders_seen: Vec<String>,
    /// v2: answers to a resent request that contradict the first `202` for its key (I8).
    pub disagreeing_answers: u32,
    /// v2: Idempotency-Keys this buyer used (one per attempt).
    pub keys_used: u32,
    /// Answers that say nothing was bought (4xx, `503 overloaded`).
    pub definite_failures: u32,
    /// Requests without a trustworthy answer (timeout, transport error, other 5xx).
    pub unknown: u32,
    pub end: BuyerEnd,
}

/// Everything a run measured, merged over workers.
#[derive(Debug)]
pub struct Outcome {
    pub recorder: Recorder,
    pub buyers: Vec<BuyerRecord>,
    /// Iterations started (warm-up included) and measured (warm-up excluded).
    pub iterations: u64,
    pub measured_iterations: u64,
    pub late: u64,
    pub dropped: u64,
    pub elapsed: Duration,
    pub measured_elapsed: Duration,
    /// CPU time this process used during the load (user + system), to show whether the load
    /// generator itself was busy.
    pub cpu: Duration,
}

/// CPU time used by this process so far (user + system).
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Creates the events the scenario needs.
///
/// Fails with [`Unsupported`] when the stage does not serve what the scenario needs.
pub async fn setup(addr: SocketAddr, settings: &Settings) -> anyhow::Result<Fixture> {
    if !settings.scenario.buys() {
        return Ok(Fixture { event_ids: vec![] });
    }
    let mut conn = Conn::new(addr, Duration::from_secs(10));
    if settings.api == ApiVersion::V2 {
        match conn.get("/api/v2").await {
            Ok(r) if r.status == 200 => {}
            answer => {
                let said = outcome_label(&answer);
                return Err(Unsupported(format!(
                    "needs API v2 (Idempotency-Key), not served by this stage (GET /api/v2 answered {said})"
                ))
                .into());
            }
        }
    }
    let mut event_ids = Vec::with_capacity(settings.events as usize);
    for k in 0..settings.events {
        let body = serde_json::json!({
            "name": format!("loadgen {} #{k} (seed {})", settings.scenario, settings.seed),
            "venue": "Loadgen Arena",
            "date": "2030-01-01T20:00:00Z",
            "totalTickets": settings.tickets,
            "price": 25.5,
        });
        let answer = conn
            .post_json("/api/v1/events", body.to_string().as_bytes())
            .await
            .map_err(|f| anyhow::anyhow!("creating the scenario's events: {}", f.as_str()))?;
        if answer.status != 201 {
            bail!(
                "creating the scenario's events: the server answered {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
        #[derive(Deserialize)]
        struct Created {
            id: i64,
        }
        let created: Created = serde_json::from_slice(&answer.body)
            .context("creating the scenario's events: no `id` in the answer")?;
        event_ids.push(created.id);
    }
    Ok(Fixture { event_ids })
}

struct Shared {
    settings: Settings,
    fixture: Fixture,
    addr: SocketAddr,
    zipf: Option<Zipf<f64>>,
    start: Instant,
    warmup_end: Instant,
    deadline: Option<Instant>,
    /// Open model: intended start of each arrival, from `start`.
    schedule: Vec<Duration>,
    next: AtomicU64,
    progress: Arc<AtomicU64>,
}

#[derive(Default)]
struct WorkerOut {
    recorder: Recorder,
    buyers: Vec<BuyerRecord>,
    iterations: u64,
    measured_iterations: u64,
    late: u64,
    dropped: u64,
}

/// Runs the load: spawns the workers of the chosen model and merges what they measured.
/// `progress` counts finished iterations for the progress bar.
pub async fn drive(
    addr: SocketAddr,
    settings: &Settings,
    fixture: Fixture,
    progress: Arc<AtomicU64>,
) -> anyhow::Result<Outcome> {
    let schedule = match settings.model {
        ModelKind::Closed => vec![],
        ModelKind::Open => schedule(settings)?,
    };
    let zipf = if fixture.event_ids.len() > 1 {
        Some(Zipf::new(fixture.event_ids.len() as u64, settings.zipf_s).context("zipf")?)
    } else {
        None
    };
    let start = Instant::now() + Duration::from_millis(5);
    let cpu_before = process_cpu();
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        fixture,
        addr,
        zipf,
        start,
        warmup_end: start + settings.warmup,
        deadline: settings.duration.map(|d| start + d),
        schedule,
        next: AtomicU64::new(0),
        progress,
    });
    let workers = match settings.model {
        ModelKind::Closed => settings.vus,
        ModelKind::Open => settings.connections,
    };
    let mut handles = Vec::with_capacity(workers as usize);
    for _ in 0..workers {
        let shared = shared.clone();
        handles.push(tokio::spawn(async move {
            match shared.settings.model {
                ModelKind::Closed => closed_worker(&shared).await,
                ModelKind::Open => open_worker(&shared).await,
            }
        }));
    }
    let mut total = WorkerOut::default();
    for h in handles {
        let out = h.await.context("a load worker panicked")?;
        total.recorder.merge(out.recorder);
        total.buyers.extend(out.buyers);
        total.iterations += out.iterations;
        total.measured_iterations += out.measured_iterations;
        total.late += out.late;
        total.dropped += out.dropped;
    }
    let end = Instant::now();
    total.buyers.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    Ok(Outcome {
        recorder: total.recorder,
        buyers: total.buyers,
        iterations: total.iterations,
        measured_iterations: total.measured_iterations,
        late: total.late,
        dropped: total.dropped,
        elapsed: end.saturating_duration_since(start),
        measured_elapsed: end.saturating_duration_since(shared.warmup_end.min(end)),
        cpu: process_cpu().saturating_sub(cpu_before),
    })
}

/// The open model's arrival times, drawn once from the seed.
fn schedule(settings: &Settings) -> anyhow::Result<Vec<Duration>> {
    let rate = settings.rate.expect("checked: open model has a rate");
    let by_time = settings
        .duration
        .map(|d| (d.as_secs_f64() * rate).ceil() as u64);
    let n = match (by_time, settings.requests) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => unreachable!("checked: open model is bounded"),
    };
    if n > MAX_SCHEDULE {
        bail!("--rate x --duration asks for {n} arrivals; at most {MAX_SCHEDULE} per run");
    }
    let mut rng = StdRng::seed_from_u64(mix(settings.seed, u64::MAX));
    let exp = Exp::new(rate).context("--rate")?;
    let mut at = 0.0f64;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = match settings.arrivals {
            Arrivals::Constant => i as f64 / rate,
            Arrivals::Poisson => {
                let t = at;
                at += exp.sample(&mut rng);
                t
            }
        };
        if settings.duration.is_some_and(|d| t >= d.as_secs_f64()) {
            break;
        }
        out.push(Duration::from_secs_f64(t));
    }
    Ok(out)
}

async fn closed_worker(shared: &Shared) -> WorkerOut {
    let mut out = WorkerOut::default();
    out.recorder.origin = Some(shared.start);
    let mut conn = Conn::new(shared.addr, shared.settings.timeout);
    tokio::time::sleep_until(shared.start.into()).await;
    loop {
        let now = Instant::now();
        if shared.deadline.is_some_and(|d| now >= d) {
            break;
        }
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if shared.settings.requests.is_some_and(|n| i >= n) {
            break;
        }
        iterate(shared, &mut conn, &mut out, i, now).await;
    }
    out
}

async fn open_worker(shared: &Shared) -> WorkerOut {
    let mut out = WorkerOut::default();
    out.recorder.origin = Some(shared.start);
    let mut conn = Conn::new(shared.addr, shared.settings.timeout);
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(offset) = shared.schedule.get(i as usize) else {
            break;
        };
        let intended = shared.start + *offset;
        tokio::time::sleep_until(intended.into()).await;
        let lag = Instant::now().saturating_duration_since(intended);
        if lag > shared.settings.max_lag {
            out.dropped += 1;
            shared.progress.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if lag > LATE_AFTER {
            out.late += 1;
        }
        iterate(shared, &mut conn, &mut out, i, intended).await;
    }
    out
}

/// Splits a seed and an index into an independent seed (splitmix64).
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One iteration, measured from `intended` (the open model's schedule, or the moment a closed
/// virtual user was free).
async fn iterate(shared: &Shared, conn: &mut Conn, out: &mut WorkerOut, i: u64, intended: Instant) {
    let measured = intended >= shared.warmup_end;
    let mut rng = StdRng::seed_from_u64(mix(shared.settings.seed, i));
    out.iterations += 1;
    if measured {
        out.measured_iterations += 1;
    }
    match shared.settings.scenario {
        ScenarioKind::Health => {
            let answer = conn.get("/health").await;
            record(out, measured, OP_HEALTH, intended, &answer);
        }
        ScenarioKind::Browse => {
            let reads = shared.settings.reads_per_purchase;
            if rng.gen_range(0..=reads) == 0 {
                buyer(shared, conn, out, i, intended, measured, &mut rng).await;
            } else if rng.gen_ratio(1, 10) {
                let answer = conn.get("/api/v1/events").await;
                record(out, measured, OP_LIST_EVENTS, intended, &answer);
            } else {
                let event = pick_event(shared, &mut rng);
                let answer = conn.get(&format!("/api/v1/events/{event}")).await;
                record(out, measured, OP_GET_EVENT, intended, &answer);
            }
        }
        ScenarioKind::Stampede
        | ScenarioKind::Spread
        | ScenarioKind::PaymentChaos
        | ScenarioKind::RetryStorm => {
            buyer(shared, conn, out, i, intended, measured, &mut rng).await;
        }
    }
    shared.progress.fetch_add(1, Ordering::Relaxed);
}

/// A buyer on the API version the run uses.
async fn buyer(
    shared: &Shared,
    conn: &mut Conn,
    out: &mut WorkerOut,
    i: u64,
    intended: Instant,
    measured: bool,
    rng: &mut StdRng,
) {
    match shared.settings.api {
        ApiVersion::V1 => buy(shared, conn, out, i, intended, measured, rng).await,
        ApiVersion::V2 => buy_v2(shared, conn, out, i, intended, measured, rng).await,
    }
}

fn pick_event(shared: &Shared, rng: &mut StdRng) -> i64 {
    let ids = &shared.fixture.event_ids;
    match &shared.zipf {
        Some(z) => ids[(z.sample(rng) as usize - 1).min(ids.len() - 1)],
        None => ids[0],
    }
}

#[derive(Deserialize)]
struct ProblemCode {
    code: Option<String>,
}

/// The `id` of a created ticket (v1) or order (v2).
#[derive(Deserialize)]
struct IdAnswer {
    id: String,
}

fn problem_code(answer: &Response) -> Option<String> {
    serde_json::from_slice::<ProblemCode>(&answer.body)
        .ok()
        .and_then(|p| p.code)
}

/// `201`, `400 sold-out`, `timeout`, ...
fn outcome_label(answer: &Result<Response, Failure>) -> String {
    match answer {
        Ok(r) if r.status >= 400 => match problem_code(r) {
            Some(code) => format!("{} {code}", r.status),
            None => r.status.to_string(),
        },
        Ok(r) => r.status.to_string(),
        Err(f) => f.as_str().to_owned(),
    }
}

fn record(
    out: &mut WorkerOut,
    measured: bool,
    op: &'static str,
    since: Instant,
    answer: &Result<Response, Failure>,
) {
    if !measured {
        return;
    }
    let latency = since.elapsed();
    out.recorder.record_latency(op, latency);
    out.recorder.sample(op, latency);
    out.recorder.record_outcome(op, outcome_label(answer));
    out.recorder.requests += 1;
    if !matches!(answer, Ok(r) if r.status < 500) {
        out.recorder.errors += 1;
    }
}

/// A buyer: purchase, and on a retryable answer back off and try again, until a ticket,
/// `sold-out`, a final error, the attempt limit or the end of the run.
async fn buy(
    shared: &Shared,
    conn: &mut Conn,
    out: &mut WorkerOut,
    i: u64,
    intended: Instant,
    measured: bool,
    rng: &mut StdRng,
) {
    let s = &shared.settings;
    let event_id = pick_event(shared, rng);
    let user_id = format!("lg-{}-{i}", s.seed);
    let body = format!(r#"{{"eventId":{event_id},"userId":"{user_id}"}}"#);
    let mut buyer = BuyerRecord::new(user_id, event_id);
    let mut sent_at = intended;
    for attempt in 0..s.max_attempts {
        let answer = conn
            .post_json("/api/v1/tickets/purchase", body.as_bytes())
            .await;
        record(out, measured, OP_PURCHASE, sent_at, &answer);
        let retry_after = match &answer {
            Ok(r) if r.status == 201 => {
                match serde_json::from_slice::<IdAnswer>(&r.body) {
                    Ok(t) => buyer.tickets.push(t.id),
                    Err(_) => buyer.unknown += 1,
                }
                if measured {
                    out.recorder
                        .record_latency(OP_TO_CONFIRMED, intended.elapsed());
                    out.recorder.confirmed_now();
                }
                buyer.end = BuyerEnd::Confirmed;
                break;
            }
            Ok(r) if r.status == 503 || r.status == 402 || r.status == 409 => {
                // overloaded, gateway unavailable, declined, hold expired: nothing was bought
                buyer.definite_failures += 1;
                r.retry_after_secs
            }
            Ok(r) if r.status == 400 => {
                buyer.definite_failures += 1;
                match problem_code(r).as_deref() {
                    Some("sold-out") => {
                        buyer.end = BuyerEnd::SoldOut;
                        break;
                    }
                    Some("tickets-held") => r.retry_after_secs,
                    _ => break,
                }
            }
            Ok(r) if r.status < 500 => {
                buyer.definite_failures += 1;
                break;
            }
            // a 5xx or no answer: the purchase may or may not have happened
            Ok(r) => {
                buyer.unknown += 1;
                r.retry_after_secs
            }
            Err(_) => {
                buyer.unknown += 1;
                None
            }
        };
        if attempt + 1 == s.max_attempts {
            break;
        }
        let pause = backoff(attempt, retry_after, s.max_backoff, rng);
        if shared.deadline.is_some_and(|d| Instant::now() + pause >= d) {
            break;
        }
        tokio::time::sleep(pause).await;
        sent_at = Instant::now();
    }
    out.buyers.push(buyer);
}

impl BuyerRecord {
    fn new(user_id: String, event_id: i64) -> Self {
        Self {
            user_id,
            event_id,
            tickets: vec![],
            token: None,
            orders_seen: vec![],
            disagreeing_answers: 0,
            keys_used: 0,
            definite_failures: 0,
            unknown: 0,
            end: BuyerEnd::GaveUp,
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: String,
}

#[derive(Deserialize)]
struct StatusAnswer {
    status: String,
}

/// How one attempt (one Idempotency-Key, sent `resends` times) ended.
enum Attempt {
    Accepted(String),
    Retry(Option<u64>),
    SoldOut,
    Final,
}

/// An API v2 buyer: a user, then orders of one ticket until one is confirmed. Each attempt has
/// its own Idempotency-Key and is sent `resends` times (1–5 ms apart, whatever the answers: the
/// retry storm); an accepted order is polled until `confirmed` or `cancelled` (then the buyer
/// tries again with a new key), like a v1 buyer on `tickets-held`, `503` or no answer.
async fn buy_v2(
    shared: &Shared,
    conn: &mut Conn,
    out: &mut WorkerOut,
    i: u64,
    intended: Instant,
    measured: bool,
    rng: &mut StdRng,
) {
    let s = &shared.settings;
    let event_id = pick_event(shared, rng);
    let name = format!("lg-{}-{i}", s.seed);
    let mut buyer = BuyerRecord::new(name.clone(), event_id);
    let answer = conn
        .post_json(
            "/api/v2/users",
            format!(r#"{{"name":"{name}"}}"#).as_bytes(),
        )
        .await;
    record(out, measured, OP_CREATE_USER, intended, &answer);
    let token = match &answer {
        Ok(r) if r.status == 201 => serde_json::from_slice::<TokenAnswer>(&r.body)
            .ok()
            .map(|t| t.token),
        _ => None,
    };
    let Some(token) = token else {
        buyer.definite_failures += 1;
        out.buyers.push(buyer);
        return;
    };
    let auth = format!("Bearer {token}");
    buyer.token = Some(token);
    let body = format!(r#"{{"eventId":{event_id},"quantity":1}}"#);
    let first_sent = Instant::now();
    let mut reserved = false;
    for attempt in 0..s.max_attempts {
        let key = format!("lg-{}-{i}-{attempt}", s.seed);
        buyer.keys_used += 1;
        let headers = [
            ("Authorization", auth.as_str()),
            ("Idempotency-Key", key.as_str()),
        ];
        let mut accepted: Option<String> = None;
        let mut outcome = Attempt::Retry(None);
        for copy in 0..s.resends {
            let sent_at = Instant::now();
            let answer = conn
                .send("POST", "/api/v2/orders", &headers, Some(body.as_bytes()))
                .await;
            record(out, measured, OP_ORDER, sent_at, &answer);
            match &answer {
                Ok(r) if r.status == 202 => match serde_json::from_slice::<IdAnswer>(&r.body) {
                    Ok(order) => match &accepted {
                        None => {
                            if !reserved && measured {
                                out.recorder
                                    .record_latency(OP_ORDER_RESERVED, first_sent.elapsed());
                            }
                            reserved = true;
                            buyer.orders_seen.push(order.id.clone());
                            accepted = Some(order.id.clone());
                            outcome = Attempt::Accepted(order.id);
                        }
                        Some(first) if *first != order.id => {
                            buyer.disagreeing_answers += 1;
                            buyer.orders_seen.push(order.id);
                        }
                        Some(_) => {}
                    },
                    Err(_) => buyer.unknown += 1,
                },
                // the first request of this key is still running: not an answer yet
                Ok(r)
                    if r.status == 409
                        && problem_code(r).as_deref() == Some("idempotency-key-in-use") => {}
                Ok(r) if r.status < 500 && accepted.is_some() => buyer.disagreeing_answers += 1,
                // v2 answers an event with no tickets left `409 sold-out`: final.
                Ok(r) if r.status == 409 && problem_code(r).as_deref() == Some("sold-out") => {
                    buyer.definite_failures += 1;
                    outcome = Attempt::SoldOut;
                }
                Ok(r) if r.status == 503 || r.status == 402 || r.status == 409 => {
                    buyer.definite_failures += 1;
                    outcome = Attempt::Retry(r.retry_after_secs);
                }
                Ok(r) if r.status < 500 => {
                    buyer.definite_failures += 1;
                    outcome = match problem_code(r).as_deref() {
                        Some("sold-out") => Attempt::SoldOut,
                        Some("tickets-held") => Attempt::Retry(r.retry_after_secs),
                        _ => Attempt::Final,
                    };
                }
                _ => {
                    buyer.unknown += 1;
                    if accepted.is_none() {
                        outcome = Attempt::Retry(None);
                    }
                }
            }
            if copy + 1 < s.resends {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1..=5))).await;
            }
        }
        let retry_after = match outcome {
            Attempt::Accepted(order) => {
                let status = poll_order(shared, conn, out, measured, &auth, &order).await;
                if status == "confirmed" {
                    if measured {
                        out.recorder
                            .record_latency(OP_ORDER_TO_CONFIRMED, intended.elapsed());
                        out.recorder.confirmed_now();
                    }
                    buyer.tickets.push(order);
                    buyer.end = BuyerEnd::Confirmed;
                    break;
                }
                if status != "cancelled" {
                    break; // still pending when the buyer stopped waiting
                }
                None
            }
            Attempt::Retry(after) => after,
            Attempt::SoldOut => {
                buyer.end = BuyerEnd::SoldOut;
                break;
            }
            Attempt::Final => break,
        };
        if attempt + 1 == s.max_attempts {
            break;
        }
        let pause = backoff(attempt, retry_after, s.max_backoff, rng);
        if shared.deadline.is_some_and(|d| Instant::now() + pause >= d) {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    out.buyers.push(buyer);
}

/// Polls an order until it is final or the buyer stops waiting; returns its last status.
async fn poll_order(
    shared: &Shared,
    conn: &mut Conn,
    out: &mut WorkerOut,
    measured: bool,
    auth: &str,
    order: &str,
) -> String {
    let s = &shared.settings;
    let path = format!("/api/v2/orders/{order}");
    let give_up = Instant::now() + s.settle.max(Duration::from_secs(1)) + s.timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        let polled_at = Instant::now();
        let answer = conn
            .send("GET", &path, &[("Authorization", auth)], None)
            .await;
        record(out, measured, OP_ORDER_STATUS, polled_at, &answer);
        let status = match &answer {
            Ok(r) if r.status == 200 => serde_json::from_slice::<StatusAnswer>(&r.body)
                .map(|a| a.status)
                .unwrap_or_default(),
            _ => String::new(),
        };
        if status == "confirmed" || status == "cancelled" || Instant::now() >= give_up {
            return status;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Exponential backoff from 5 ms with full jitter, `Retry-After` honoured up to the cap.
fn backoff(
    attempt: u32,
    retry_after_secs: Option<u64>,
    cap: Duration,
    rng: &mut StdRng,
) -> Duration {
    let exp = Duration::from_millis(5u64 << attempt.min(8)).min(cap);
    let jittered = exp.mul_f64(rng.gen_range(0.5..=1.0));
    match retry_after_secs {
        Some(secs) => Duration::from_secs(secs).min(cap).max(jittered),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_and_index_give_the_same_stream() {
        let a: Vec<u32> = StdRng::seed_from_u64(mix(7, 3))
            .sample_iter(rand::distributions::Standard)
            .take(4)
            .collect();
        let b: Vec<u32> = StdRng::seed_from_u64(mix(7, 3))
            .sample_iter(rand::distributions::Standard)
            .take(4)
            .collect();
        let c: Vec<u32> = StdRng::seed_from_u64(mix(7, 4))
            .sample_iter(rand::distributions::Standard)
            .take(4)
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn backoff_honours_retry_after_up_to_the_cap() {
        let mut rng = StdRng::seed_from_u64(1);
        let cap = Duration::from_millis(250);
        assert_eq!(backoff(0, Some(1), cap, &mut rng), cap);
        assert!(backoff(0, None, cap, &mut rng) <= Duration::from_millis(5));
        assert!(backoff(20, None, cap, &mut rng) <= cap);
    }
}
