//! The `locked` stage against the real Redis (`REDIS_URL`, default 127.0.0.1:6379): the
//! stampede, payment declines, retried and crashed payment jobs, Redis going away, and the
//! Redlock lesson. Every test uses its own key prefix and deletes its keys afterwards.
//! Without Redis these tests fail; they never skip.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::Value;
use ticketflow::config::{LatencyModel, Settings, StageKind};
use ticketflow::server::Server;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::backends::{on_both_backends, Backend, TestDb};
use crate::helpers::{determined_buyer, spawn_app_on, test_settings, Reply, TestApp};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A unique key prefix, and the clean-up of every key under it when dropped (even when the
/// test panics).
pub(crate) struct Keys {
    pub(crate) prefix: String,
}

impl Keys {
    pub(crate) fn new() -> Self {
        let url = redis_url();
        let client = redis::Client::open(url.as_str()).expect("REDIS_URL is a valid URL");
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).unwrap_or_else(|e| {
            panic!("Redis is not reachable at {url} ({e}): the `locked` tests need it; start redis-server or set REDIS_URL")
        });
        let _: String = redis::cmd("PING")
            .query(&mut conn)
            .expect("Redis answers PING");
        Self {
            prefix: format!("tftest-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    fn apply(&self, settings: &mut Settings) {
        settings.locked.redis_url = redis_url();
        settings.locked.key_prefix = self.prefix.clone();
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(redis_url().as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
        // apalis registers every queue in one global set.
        let _: Result<i64, _> = redis::cmd("ZREM")
            .arg("core:apalis:queues:list")
            .arg(format!("{}:payments:workers", self.prefix))
            .query(&mut conn);
    }
}

async fn locked_app(keys: &Keys, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    locked_app_on(Backend::Sqlite, keys, tweak).await
}

async fn locked_app_on(
    backend: Backend,
    keys: &Keys,
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    spawn_app_on(backend, StageKind::Locked, |s| {
        keys.apply(s);
        tweak(s);
    })
    .await
}

async fn stats(app: &TestApp) -> Value {
    let (status, stats) = app.admin_json("/api/v1/admin/stats").await;
    assert_eq!(status, 200, "{stats}");
    stats
}

/// The stats once `ready` holds for them, or the last read after about five seconds: the queue
/// acknowledges a job just after its outcome has been answered.
async fn stats_when(app: &TestApp, ready: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let stats = stats(app).await;
        if ready(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stats(app).await
}

/// Ledger lines of `kind` under `key`.
async fn ledger_count(app: &TestApp, key_prefix: &str, kind: &str) -> usize {
    let (status, ledger) = app.admin_json("/api/v1/admin/ledger").await;
    assert_eq!(status, 200, "{ledger}");
    ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind && e["key"].as_str().unwrap().starts_with(key_prefix))
        .count()
}

const SEATS: u32 = 100;
const BUYERS: usize = 1_000;

async fn stampede_on_locked(backend: Backend, seed: u64) {
    let keys = Keys::new();
    let app = Arc::new(
        locked_app_on(backend, &keys, |s| {
            s.seed = seed;
            s.payments.latency =
                LatencyModel::Uniform(Duration::from_millis(1), Duration::from_millis(20));
            s.payments.failure_rate = 0.10;
        })
        .await,
    );
    let event = app.create_event(SEATS).await;

    let started = Instant::now();
    let buyers = (0..BUYERS).map(|i| {
        determined_buyer(
            Arc::clone(&app),
            event,
            format!("buyer-{i}"),
            Duration::from_millis(10),
        )
    });
    let tickets: Vec<String> = join_all(buyers).await.into_iter().flatten().collect();
    let elapsed = started.elapsed();

    assert_eq!(tickets.len(), SEATS as usize, "seed {seed}");
    let distinct: HashSet<&String> = tickets.iter().collect();
    assert_eq!(
        distinct.len(),
        tickets.len(),
        "seed {seed}: a ticket given twice"
    );

    let audit = app.audit().await;
    assert_eq!(audit["ok"], true, "seed {seed}: {audit}");
    let declines = ledger_count(&app, "order-", "decline").await;
    assert!(
        declines > 0,
        "seed {seed}: payments never failed, the test lost its teeth"
    );
    assert_eq!(ledger_count(&app, "order-", "charge").await, SEATS as usize);

    let stats = stats_when(&app, |s| {
        s["queue"]["waiting"] == 0 && s["queue"]["active"] == 0
    })
    .await;
    let lock = &stats["lock"];
    assert!(
        lock["granted"].as_u64().unwrap() >= u64::from(SEATS),
        "{stats}"
    );
    assert_eq!(stats["queue"]["failed"], 0, "{stats}");
    assert_eq!(stats["queue"]["waiting"], 0, "{stats}");
    assert_eq!(stats["queue"]["active"], 0, "{stats}");
    println!(
        "locked stampede seed {seed}: {SEATS} seats to {BUYERS} buyers in {elapsed:?} ({:.0} confirmed/s); lock grants {}, contended {}, wait p50 {} us, p99 {} us, max {} us; queue {}",
        f64::from(SEATS) / elapsed.as_secs_f64(),
        lock["granted"],
        lock["contended"],
        lock["waitP50Us"],
        lock["waitP99Us"],
        lock["waitMaxUs"],
        stats["queue"],
    );

    let app = Arc::try_unwrap(app).ok().expect("buyers finished");
    for (sql, expected) in [
        (
            "SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'",
            i64::from(SEATS),
        ),
        ("SELECT COUNT(*) FROM tickets WHERE status = 'pending'", 0),
        ("SELECT COUNT(*) FROM payments WHERE status = 'pending'", 0),
        ("SELECT available_tickets FROM events", 0),
    ] {
        assert_eq!(app.count(sql).await, expected, "seed {seed}: {sql}");
    }
    app.stop().await;
}

async fn locked_stampede(backend: Backend) {
    for seed in [1, 2, 3] {
        stampede_on_locked(backend, seed).await;
    }
}

on_both_backends!(
    the_locked_stage_sells_every_seat_exactly_once_under_a_stampede,
    locked_stampede
);

#[actix_web::test]
async fn a_declined_payment_cancels_the_order_and_returns_the_seat() {
    let keys = Keys::new();
    let app = locked_app(&keys, |s| s.payments.failure_rate = 1.0).await;
    let event = app.create_event(2).await;

    for i in 0..5 {
        let (status, body) = app.purchase(event, &format!("buyer-{i}")).await;
        assert_eq!(status, 402, "{body}");
        assert_eq!(body["code"], "payment-declined", "{body}");
    }

    assert_eq!(
        app.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        2
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders WHERE status = 'cancelled' AND cancel_reason = 'payment_declined'")
            .await,
        5
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments WHERE status = 'failed'")
            .await,
        5
    );
    assert_eq!(ledger_count(&app, "order-", "charge").await, 0);
    assert_eq!(app.audit().await["ok"], true);
    let stats = stats(&app).await;
    assert_eq!(stats["payments"]["declined"], 5, "{stats}");
    app.stop().await;
}

#[actix_web::test]
async fn a_payment_job_that_fails_is_retried_and_charges_once() {
    let keys = Keys::new();
    // Each job fails twice after charging, then succeeds on its third and last attempt.
    let app = locked_app(&keys, |s| s.locked.failpoints.fail_job_attempts = 2).await;
    let event = app.create_event(3).await;

    let (status, body) = app.purchase(event, "alice").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "confirmed");

    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(app.audit().await["ok"], true);
    let stats = stats_when(&app, |s| s["queue"]["completed"] == 1).await;
    assert_eq!(stats["payments"]["jobRuns"], 3, "{stats}");
    assert_eq!(stats["payments"]["jobFailures"], 2, "{stats}");
    assert_eq!(stats["queue"]["completed"], 1, "{stats}");
    app.stop().await;
}

#[actix_web::test]
async fn a_job_that_fails_its_last_attempt_is_dead_lettered_refunded_and_its_seat_returned() {
    let keys = Keys::new();
    let app = locked_app(&keys, |s| s.locked.failpoints.fail_job_attempts = 3).await;
    let event = app.create_event(1).await;

    let (status, body) = app.purchase(event, "alice").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "dependency-unavailable", "{body}");

    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(ledger_count(&app, "order-", "refund").await, 1);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments WHERE status = 'refunded'")
            .await,
        1
    );
    assert_eq!(
        app.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        1
    );
    assert_eq!(app.audit().await["ok"], true);
    let stats = stats_when(&app, |s| s["queue"]["failed"] == 1).await;
    assert_eq!(stats["queue"]["failed"], 1, "{stats}");
    assert_eq!(stats["payments"]["gaveUp"], 1, "{stats}");
    app.stop().await;
}

#[actix_web::test]
async fn a_worker_that_dies_mid_job_loses_nothing_and_charges_once() {
    let keys = Keys::new();
    let app = locked_app(&keys, |s| {
        s.locked.failpoints.crash_worker_after_charge_once = true
    })
    .await;
    let event = app.create_event(2).await;

    // The worker panics after the charge; a new worker takes the orphaned job once the dead
    // one's heartbeats are overdue, and charges again under the same key.
    let (status, body) = app.purchase(event, "alice").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "confirmed");

    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(app.audit().await["ok"], true);
    let stats = stats(&app).await;
    assert!(
        stats["payments"]["workerRestarts"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert_eq!(stats["payments"]["jobRuns"], 2, "{stats}");
    app.stop().await;
}

#[actix_web::test]
async fn a_worker_that_stalls_mid_job_is_replaced_and_the_job_still_settles() {
    let keys = Keys::new();
    let app = locked_app(&keys, |s| s.locked.failpoints.freeze_worker_once = true).await;
    let event = app.create_event(2).await;

    // The worker freezes after the charge: its task lives on, but neither its jobs nor its
    // heartbeats move. Only the supervisor's heartbeat check replaces it; without that the
    // purchase would wait for ever (the bound below turns that into a failure).
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(30), app.purchase(event, "alice"))
            .await
            .expect("the purchase is answered although its worker stalled");
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "confirmed");

    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(app.audit().await["ok"], true);
    let stats = stats_when(&app, |s| s["queue"]["active"] == 0).await;
    assert_eq!(stats["payments"]["workerStalls"], 1, "{stats}");
    assert_eq!(stats["payments"]["jobRuns"], 2, "{stats}");
    assert_eq!(stats["queue"]["active"], 0, "{stats}");
    app.stop().await;
}

/// A TCP proxy to Redis that the test can cut, as if Redis went down, and restore.
struct RedisProxy {
    url: String,
    addr: std::net::SocketAddr,
    cut: watch::Sender<bool>,
}

impl RedisProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(false);
        let proxy = Self {
            url: format!("redis://{addr}"),
            addr,
            cut,
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let target = redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let cut_rx = self.cut.subscribe();
        actix_rt::spawn(async move {
            let mut cut_accept = cut_rx.clone();
            loop {
                let (mut inbound, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    _ = cut_accept.changed() => return,
                };
                let target = target.clone();
                let mut cut_conn = cut_rx.clone();
                actix_rt::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_conn.changed() => {}
                    }
                });
            }
        });
    }

    /// Closes the listener and every connection through it.
    fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Listens again on the same address.
    async fn restore(&self) {
        self.cut.send_replace(false);
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

#[actix_web::test]
async fn redis_going_down_answers_503_with_a_problem_document_not_a_hang() {
    let keys = Keys::new();
    let proxy = RedisProxy::start().await;
    let app = locked_app(&keys, |s| s.locked.redis_url = proxy.url.clone()).await;
    let event = app.create_event(10).await;
    let (status, body) = app.purchase(event, "alice").await;
    assert_eq!(status, 201, "{body}");
    let (status, health) = app.get_json("/api/v2/health").await;
    assert_eq!(
        (status, &health["dependencies"]["redis"]),
        (200, &Value::from("ok")),
        "{health}"
    );

    proxy.cut();
    let started = Instant::now();
    let response = app
        .client
        .post(app.url("/api/v1/tickets/purchase"))
        .json(&serde_json::json!({ "eventId": event, "userId": "bob" }))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .expect("an answer, not a hang");
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "dependency-unavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let (status, health) = app.get_json("/api/v2/health").await;
    assert_eq!(
        (status, &health["dependencies"]["redis"]),
        (503, &Value::from("down")),
        "{health}"
    );
    // Nothing half-written: only alice's ticket exists, and every seat but hers is free.
    assert_eq!(app.count("SELECT COUNT(*) FROM tickets").await, 1);
    assert_eq!(
        app.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        9
    );
    app.stop().await;
}

#[actix_web::test]
async fn an_unreachable_redis_at_start_is_an_error_naming_the_setting() {
    let db = TestDb::new(Backend::Sqlite);
    let mut settings = test_settings(StageKind::Locked, &db);
    // Port 1: nothing listens there, and no other test can take it meanwhile.
    settings.locked.redis_url = "redis://127.0.0.1:1".into();
    let Err(error) = Server::build(settings).await else {
        panic!("the server started without Redis");
    };
    let message = format!("{error:#}");
    assert!(message.contains("--redis-url"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

/// The Redlock lesson: the holder of the lock pauses between its read and its write for
/// longer than the lease (100 ms); a second buyer takes the lock meanwhile. `pauses` are the
/// pauses of the first and second reservations to read.
async fn paused_holder_race(fencing: bool, pauses: &[u64]) -> (TestApp, Keys, u16, u16) {
    let keys = Keys::new();
    let app = locked_app(&keys, |s| {
        s.locked.fencing = fencing;
        s.locked.lock_ttl = Duration::from_millis(100);
        s.locked.failpoints.pauses_after_read =
            pauses.iter().map(|ms| Duration::from_millis(*ms)).collect();
    })
    .await;
    let event = app.create_event(1).await;
    let app = Arc::new(app);
    let first = {
        let app = Arc::clone(&app);
        actix_rt::spawn(async move { app.purchase(event, "paused-holder").await })
    };
    // Let the first buyer take the lock (it pauses right after its read).
    stats_when(&app, |s| s["lock"]["granted"] == 1).await;
    let (second_status, second) = app.purchase(event, "second-holder").await;
    let (first_status, first) = first.await.unwrap();
    println!("fencing {fencing}: paused holder {first_status} {first}, second holder {second_status} {second}");
    let app = Arc::try_unwrap(app).ok().expect("buyers finished");
    (app, keys, first_status, second_status)
}

#[actix_web::test]
async fn without_fencing_a_lock_holder_paused_past_its_lease_sells_the_last_seat_twice() {
    let (app, _keys, first, second) = paused_holder_race(false, &[1000]).await;
    assert_eq!(
        (first, second),
        (201, 201),
        "both buyers were sold the one seat"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        2
    );
    let audit = app.audit().await;
    assert_eq!(audit["ok"], false, "{audit}");
    assert_eq!(audit["invariants"]["I1_no_oversell"], 1, "{audit}");
    let stats = stats(&app).await;
    assert!(stats["lock"]["expired"].as_u64().unwrap() >= 1, "{stats}");
    app.stop().await;
}

#[actix_web::test]
async fn with_fencing_the_paused_holders_late_write_is_refused_and_the_seat_sells_once() {
    let (app, _keys, first, second) = paused_holder_race(true, &[1000]).await;
    assert_eq!(second, 201);
    assert_eq!(first, 400, "the paused holder must find the seat gone");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        1
    );
    assert_eq!(app.audit().await["ok"], true);
    let stats = stats(&app).await;
    assert!(
        stats["lock"]["staleWritesRefused"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn with_fencing_a_stale_write_between_the_successors_read_and_write_is_refused() {
    // The paused holder wakes while its successor (also paused) sits between its read and its
    // write. The successor claimed the event with its token before reading, so the stale write
    // is refused even though the successor has not written yet; one seat, one sale.
    let (app, _keys, first, second) = paused_holder_race(true, &[600, 1000]).await;
    let mut statuses = [first, second];
    statuses.sort();
    assert_eq!(statuses, [201, 400], "exactly one buyer gets the seat");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        1
    );
    assert_eq!(app.audit().await["ok"], true);
    let stats = stats(&app).await;
    assert!(
        stats["lock"]["staleWritesRefused"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_payment_that_succeeds_after_the_hold_ran_out_is_refunded_and_the_seat_returned() {
    let keys = Keys::new();
    // The job must start charging within the hold (else it only gives the seats back, with
    // nothing to refund), and the charge must come back after it: a 1 s hold leaves the queue
    // room to hand the job to its worker on a loaded machine (200 ms did not, once in CI).
    let app = locked_app(&keys, |s| {
        s.hold_ttl = Duration::from_secs(1);
        s.payments.latency = LatencyModel::Fixed(Duration::from_secs(2));
    })
    .await;
    let event = app.create_event(1).await;

    let (status, body) = app.purchase(event, "slow-payer").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "hold-expired", "{body}");

    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(ledger_count(&app, "order-", "refund").await, 1);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders WHERE cancel_reason = 'hold_expired'")
            .await,
        1
    );
    assert_eq!(
        app.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        1
    );
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

/// The audit once nothing is under way (every job run finished), or the last one after 10 s.
async fn quiet_audit(app: &TestApp) -> Value {
    let started = Instant::now();
    let mut audit = app.audit().await;
    while audit["quiet"] != true && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        audit = app.audit().await;
    }
    assert_eq!(audit["quiet"], true, "{audit}");
    audit
}

/// What a PostgreSQL (or Redis) outage between the charge and the confirmation does, without
/// chaos timing luck: the job's first attempt is charged (approved just after the hold ran
/// out) and then fails before it settles anything, as a `confirm` on a database that went away
/// fails. Its retry finds the order still pending and past its hold, and must refund what an
/// earlier attempt charged under the key as it gives the seat back: the chaos run's I3
/// violation (`chargedNotConfirmed`) was that retry cancelling the order with the charge kept.
/// (The sweep may run the order's job once more meanwhile; whichever run cancels, the charge
/// is refunded and the payment recorded `refunded`.)
#[actix_web::test]
async fn a_retry_that_finds_the_hold_over_refunds_what_an_earlier_attempt_charged() {
    let keys = Keys::new();
    let app = locked_app(&keys, |s| {
        s.hold_ttl = Duration::from_secs(1);
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(1_500));
        s.locked.failpoints.fail_job_attempts = 1;
    })
    .await;
    let event = app.create_event(1).await;

    let (status, body) = app.purchase(event, "interrupted").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "hold-expired", "{body}");
    let audit = quiet_audit(&app).await;

    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(
        ledger_count(&app, "order-", "refund").await,
        1,
        "the charge of the first attempt is refunded"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments WHERE status = 'refunded'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders WHERE cancel_reason = 'hold_expired'")
            .await,
        1
    );
    assert_eq!(
        app.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        1
    );
    assert_eq!(audit["chargedNotConfirmed"], 0, "{audit}");
    assert_eq!(audit["ok"], true, "{audit}");
    let stats = stats(&app).await;
    assert!(
        stats["payments"]["jobRuns"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    assert!(
        stats["payments"]["expired"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    app.stop().await;
}

/// The other half of the same outage: two runs of one order's job at once. The first run is
/// charged before the hold ends and its confirmation is held up (a database paused); the sweep
/// queues the order again once it is a hold old, and that second run finds it pending past its
/// hold. While the second run sits between that reading and its action, the first confirms.
/// The second must then leave the order alone: it may cancel (and refund) only an order still
/// pending, so it cancels before it refunds. Refunding first, it left a confirmed order with
/// its charge refunded (`confirmedNotCharged`, I3).
#[actix_web::test]
async fn a_run_that_finds_the_hold_over_never_refunds_an_order_another_run_confirms() {
    let keys = Keys::new();
    let app = locked_app(&keys, |s| {
        // the sweep runs every second and queues orders a second old again
        s.hold_ttl = Duration::from_secs(1);
        s.payments.latency = LatencyModel::Zero;
        // the first run confirms 3.5 s after the purchase; the swept run, queued 1-2 s
        // after it, waits 4 s after finding the hold over: the confirmation lands in between,
        // with 1.5 s to spare on either side for a loaded machine
        s.locked.failpoints.confirm_pause_once = Some(Duration::from_millis(3_500));
        s.locked.failpoints.hold_over_pause = Some(Duration::from_secs(4));
    })
    .await;
    let event = app.create_event(1).await;

    let (status, body) = app.purchase(event, "confirmed-late").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "confirmed", "{body}");

    // the swept run acts 5-6 s after the purchase; then nothing is under way
    let audit = quiet_audit(&app).await;
    let stats = stats(&app).await;
    assert!(
        stats["payments"]["jobRuns"].as_u64().unwrap() >= 2,
        "the sweep ran the job again: {stats}"
    );
    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(
        ledger_count(&app, "order-", "refund").await,
        0,
        "the confirmed order's charge is never refunded"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders WHERE status = 'confirmed'")
            .await,
        1
    );
    assert_eq!(audit["confirmedNotCharged"], 0, "{audit}");
    assert_eq!(audit["ok"], true, "{audit}");
    app.stop().await;
}

#[actix_web::test]
async fn a_hold_stranded_while_redis_was_down_is_swept_once_redis_is_back() {
    let keys = Keys::new();
    let proxy = RedisProxy::start().await;
    let app = locked_app(&keys, |s| {
        s.locked.redis_url = proxy.url.clone();
        s.hold_ttl = Duration::from_secs(1);
        // Redis goes down while the buyer sits between its read and its write: the seat is
        // taken in SQLite, then neither the job nor the seat's return reaches Redis.
        s.locked.failpoints.pauses_after_read = vec![Duration::from_millis(300)];
    })
    .await;
    let event = app.create_event(1).await;
    let app = Arc::new(app);
    let buyer = {
        let app = Arc::clone(&app);
        actix_rt::spawn(async move { app.purchase(event, "stranded").await })
    };
    stats_when(&app, |s| s["lock"]["granted"] == 1).await;
    proxy.cut();
    let (status, body) = buyer.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "dependency-unavailable", "{body}");
    let held = format!("SELECT available_tickets FROM events WHERE id = {event}");
    assert_eq!(
        app.count(&held).await,
        0,
        "the seat is stranded in a pending order"
    );

    proxy.restore().await;
    let mut available = 0;
    for _ in 0..100 {
        available = app.count(&held).await;
        if available == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(available, 1, "the sweep never gave the seat back");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders WHERE cancel_reason = 'hold_expired'")
            .await,
        1
    );
    assert_eq!(ledger_count(&app, "order-", "charge").await, 0);
    assert_eq!(app.audit().await["ok"], true);
    Arc::try_unwrap(app)
        .ok()
        .expect("buyer finished")
        .stop()
        .await;
}

/// API v2 on `locked`: a user, then an order with an Idempotency-Key.
async fn v2_user(app: &TestApp, name: &str) -> String {
    let reply = app
        .post_json("/api/v2/users", &serde_json::json!({ "name": name }))
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    reply.body["token"].as_str().unwrap().to_owned()
}

async fn v2_order(app: &TestApp, token: &str, key: &str, event: i64, quantity: i64) -> Reply {
    let response = app
        .client
        .post(app.url("/api/v2/orders"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&serde_json::json!({ "eventId": event, "quantity": quantity }))
        .send()
        .await
        .unwrap();
    Reply::read(response).await
}

#[actix_web::test]
async fn api_v2_orders_are_accepted_at_once_and_settle_through_the_queue() {
    let keys = Keys::new();
    let app = locked_app(&keys, |s| {
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(50));
        s.per_user_limit = 4;
    })
    .await;
    let event = app.create_event(10).await;
    let alice = v2_user(&app, "alice").await;

    let placed = v2_order(&app, &alice, "locked-1", event, 3).await;
    assert_eq!(placed.status, 202, "{:?}", placed.body);
    assert_eq!(placed.body["status"], "pending");
    assert_eq!(placed.body["tickets"].as_array().unwrap().len(), 3);
    let replay = v2_order(&app, &alice, "locked-1", event, 3).await;
    assert_eq!(replay.status, 202);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body["id"], placed.body["id"]);
    let over = v2_order(&app, &alice, "locked-2", event, 2).await;
    assert_eq!(
        (over.status, over.body["code"].as_str()),
        (409, Some("user-limit"))
    );

    let location = placed.headers["location"].to_str().unwrap().to_owned();
    let mut status = Value::Null;
    for _ in 0..200 {
        let reply = app
            .client
            .get(app.url(&location))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        status = Reply::read(reply).await.body["status"].clone();
        if status != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, "confirmed");
    assert_eq!(
        app.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        7
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);
    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

#[actix_web::test]
async fn the_payment_queue_drops_a_second_push_under_the_same_key() {
    use ticketflow::domain::{EventId, OrderId};
    use ticketflow::queue::{PaymentJob, PaymentQueue};

    let keys = Keys::new();
    let client = redis::Client::open(redis_url().as_str()).unwrap();
    let queue = PaymentQueue::new(
        client.get_connection_manager().await.unwrap(),
        &keys.prefix,
        8,
    );
    let job = PaymentJob {
        order: OrderId(uuid::Uuid::new_v4()),
        event: EventId(1),
        quantity: 1,
        amount_cents: 100,
        payment_key: "order-x".into(),
    };

    queue.enqueue(job.clone(), "order-x").await.unwrap();
    queue.enqueue(job.clone(), "order-x").await.unwrap();
    assert_eq!(queue.stats().await.unwrap().waiting, 1);
    queue.enqueue(job, "order-x:swept:1").await.unwrap();
    assert_eq!(queue.stats().await.unwrap().waiting, 2);
}

#[actix_web::test]
async fn event_reads_are_served_from_the_redis_cache_and_a_purchase_invalidates_them() {
    let keys = Keys::new();
    let app = locked_app(&keys, |_| {}).await;
    let event = app.create_event(10).await;
    let path = format!("/api/v1/events/{event}");

    let (_, first) = app.get_json(&path).await;
    let (_, second) = app.get_json(&path).await;
    let cache = stats(&app).await["cache"].clone();
    assert_eq!(first, second);
    assert_eq!(cache["misses"], 1, "{cache}");
    assert_eq!(cache["hits"], 1, "{cache}");

    // the purchase's reservation deletes the cached copy, so the next read sees it
    assert_eq!(app.purchase(event, "reader").await.0, 201);
    let (_, after) = app.get_json(&path).await;
    assert_eq!(after["availableTickets"], 9);
    let cache = stats(&app).await["cache"].clone();
    assert_eq!(cache["misses"], 2, "{cache}");
    assert_eq!(cache["errors"], 0, "{cache}");

    // the list is cached and invalidated too
    let (_, list) = app.get_json("/api/v1/events").await;
    assert_eq!(list[0]["availableTickets"], 9);
    app.create_event(5).await;
    let (_, list) = app.get_json("/api/v1/events").await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    app.stop().await;
}

#[actix_web::test]
async fn queue_stats_are_served_to_the_admin_only() {
    let keys = Keys::new();
    let app = locked_app(&keys, |_| {}).await;
    let event = app.create_event(10).await;
    assert_eq!(app.purchase(event, "queued").await.0, 201);

    let admin = app
        .client
        .get(app.url("/api/v2/admin/queue-stats"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    let queue: Value = admin.json().await.unwrap();
    for field in ["waiting", "active", "completed", "failed"] {
        assert!(queue[field].is_number(), "{field} missing in {queue}");
    }
    let anonymous = app
        .client
        .get(app.url("/api/v2/admin/queue-stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    app.stop().await;
}

on_both_backends!(
    a_retry_storm_on_locked_makes_one_order_and_one_charge_with_identical_replays,
    locked_retry_storm
);

async fn locked_retry_storm(backend: Backend) {
    let keys = Keys::new();
    let app = locked_app_on(backend, &keys, |s| {
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(30));
    })
    .await;
    let event = app.create_event(10).await;
    let bob = v2_user(&app, "bob").await;

    // the same key three times at once, then twice after the answer
    let first_three = join_all((0..3).map(|_| v2_order(&app, &bob, "storm", event, 2))).await;
    let later = [
        v2_order(&app, &bob, "storm", event, 2).await,
        v2_order(&app, &bob, "storm", event, 2).await,
    ];

    let statuses: Vec<u16> = first_three.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|s| [202, 409].contains(s)),
        "{statuses:?}"
    );
    let original = first_three
        .iter()
        .find(|r| r.status == 202 && !r.headers.contains_key("idempotent-replayed"))
        .expect("one request ran");
    for replay in &later {
        assert_eq!(replay.status, 202);
        assert_eq!(replay.headers["idempotent-replayed"], "true");
        assert_eq!(
            replay.text, original.text,
            "a replay differs from the original"
        );
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);
    let settled = stats_when(&app, |s| s["payments"]["confirmed"] == 1).await;
    assert_eq!(settled["payments"]["confirmed"], 1, "{settled}");
    assert_eq!(ledger_count(&app, "order-", "charge").await, 1);
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

on_both_backends!(
    key_misuse_and_authorization_answer_the_same_on_locked,
    locked_key_misuse_and_authorization
);

async fn locked_key_misuse_and_authorization(backend: Backend) {
    let keys = Keys::new();
    let app = locked_app_on(backend, &keys, |_| {}).await;
    let event = app.create_event(10).await;
    let (alice, mallory) = (v2_user(&app, "alice").await, v2_user(&app, "mallory").await);

    let missing_key = app
        .client
        .post(app.url("/api/v2/orders"))
        .bearer_auth(&alice)
        .json(&serde_json::json!({ "eventId": event, "quantity": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(missing_key.status(), 400);
    let too_long = v2_order(&app, &alice, &"k".repeat(256), event, 1).await;
    assert_eq!(too_long.body["code"], "idempotency-key-invalid");
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 0);

    let placed = v2_order(&app, &alice, "same", event, 1).await;
    assert_eq!(placed.status, 202);
    let other_body = v2_order(&app, &alice, "same", event, 2).await;
    assert_eq!(
        (other_body.status, other_body.body["code"].as_str()),
        (422, Some("idempotency-key-reused"))
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);

    let location = placed.headers["location"].to_str().unwrap().to_owned();
    let theirs = app
        .client
        .get(app.url(&location))
        .bearer_auth(&mallory)
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), 404);
    let admin_route = app
        .client
        .get(app.url("/api/v2/admin/queue-stats"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(admin_route.status(), 403);
    let extra_field = app
        .client
        .post(app.url("/api/v2/orders"))
        .bearer_auth(&mallory)
        .header("Idempotency-Key", "x")
        .json(&serde_json::json!({ "eventId": event, "quantity": 1, "price": 0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(extra_field.status(), 400);
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);
    app.stop().await;
}

#[actix_web::test]
async fn a_client_that_hangs_up_mid_order_never_strands_its_idempotency_key() {
    use tokio::io::AsyncWriteExt;

    let keys = Keys::new();
    // The reservation pauses after its read, so the client is gone long before it answers.
    let app = locked_app(&keys, |s| {
        s.locked.failpoints.pauses_after_read = vec![Duration::from_millis(700)];
    })
    .await;
    let event = app.create_event(10).await;
    let token = v2_user(&app, "hangs-up").await;

    let body = serde_json::json!({ "eventId": event, "quantity": 1 }).to_string();
    let request = format!(
        "POST /api/v2/orders HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: gone\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut socket = TcpStream::connect(&addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    // Let the server claim the key and start the reservation, then hang up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(socket);
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM idempotency_keys WHERE key = 'gone' AND state = 'in_flight'"
        )
        .await,
        1,
        "the request never claimed its key: the test proves nothing"
    );

    // The retry after the work would have finished gets the stored answer, not `409` forever.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let retry = v2_order(&app, &token, "gone", event, 1).await;
    assert_eq!(retry.status, 202, "{:?}", retry.body);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM idempotency_keys WHERE state = 'in_flight'")
            .await,
        0
    );
    app.stop().await;
}
