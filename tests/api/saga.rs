//! Stage `saga` on PostgreSQL: the event log (optimistic concurrency, snapshots), the outbox
//! and its relay, and the stage through the API.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rand::{rngs::StdRng, Rng, SeedableRng};
use ticketflow::config::Durability;
use ticketflow::domain::{EventId, OrderId, TicketId};
use ticketflow::saga::{decide, place, Participant, Placed, Reply, Saga, SagaEvent};
use ticketflow::store::{Store, StoreError};
use uuid::Uuid;

use crate::backends::{Backend, TestDb};

fn placed(order: OrderId) -> Placed {
    Placed {
        order,
        event: EventId(1),
        user: "alice".into(),
        quantity: 1,
        unit_price_cents: 100,
        tickets: vec![TicketId(Uuid::new_v4())],
        idempotency_key: None,
        per_user_limit: None,
        hold_ttl_ms: 1_000,
        placed_at_ms: 1,
    }
}

/// Replies in a random order, some repeated, some out of place: what a saga's stream may see.
fn random_replies(rng: &mut StdRng, approve: bool) -> Vec<Reply> {
    let pool = [
        Reply::SeatsHeld { expires_at_ms: 50 },
        Reply::HoldTimeout,
        if approve {
            Reply::PaymentSucceeded {
                charge_id: "c".into(),
            }
        } else {
            Reply::PaymentDeclined
        },
        Reply::SeatsReleased,
        Reply::SeatsConfirmed,
        Reply::Refunded,
    ];
    (0..rng.gen_range(1..25))
        .map(|_| pool[rng.gen_range(0..pool.len())].clone())
        .collect()
}

/// Appends a decision for `reply` through the store, one transaction per decision.
async fn record(
    store: &Store,
    order: OrderId,
    reply: &Reply,
    at: i64,
    every: u64,
) -> Vec<SagaEvent> {
    let mut tx = store.begin_saga().await.unwrap();
    let before = tx.load(order).await.unwrap();
    let decision = decide(&before, reply, at);
    tx.append(order, &before, &decision.events, every)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    decision.events
}

async fn open(db: &TestDb) -> Store {
    Store::open(db.url(), Durability::Normal).await.unwrap()
}

#[test]
fn loading_a_saga_from_its_snapshot_and_tail_gives_the_state_of_a_full_replay() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = TestDb::new(Backend::Postgres);
    let store = runtime.block_on(open(&db));
    let mut runner = TestRunner::new(Config::with_cases(40));
    let snapshots_used = std::cell::Cell::new(0);
    runner
        .run(
            &(any::<u64>(), 1u64..6, any::<bool>()),
            |(seed, every, approve)| {
                let mut rng = StdRng::seed_from_u64(seed);
                let (from_store, replayed, in_memory, snapshot) = runtime.block_on(async {
                    let order = OrderId(Uuid::new_v4());
                    let mut tx = store.begin_saga().await.unwrap();
                    let first = place(placed(order));
                    tx.append(order, &Saga::default(), &first.events, every)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    let mut all = first.events;
                    for (t, reply) in random_replies(&mut rng, approve).iter().enumerate() {
                        all.extend(record(&store, order, reply, t as i64 + 2, every).await);
                    }
                    let snapshot = db
                        .count(&format!(
                            "SELECT COALESCE(MAX(version), 0) FROM saga_snapshots WHERE stream_id = '{}'",
                            order.0
                        ))
                        .await;
                    (
                        store.load_saga(order).await.unwrap(),
                        store.replay_saga(order).await.unwrap(),
                        Saga::replay(&all),
                        snapshot,
                    )
                });
                prop_assert_eq!(&from_store, &in_memory);
                prop_assert_eq!(&replayed, &in_memory);
                // The latest snapshot was taken by the decision that crossed the last
                // multiple of `every` the stream reached.
                let (snapshot, version) = (snapshot as u64, in_memory.version);
                prop_assert!(
                    snapshot <= version && snapshot >= version / every * every,
                    "snapshot at {} of {} events, every {}",
                    snapshot,
                    version,
                    every
                );
                if snapshot > 0 {
                    snapshots_used.set(snapshots_used.get() + 1);
                }
                Ok(())
            },
        )
        .unwrap();
    let used = snapshots_used.get();
    assert!(used > 10, "only {used} cases loaded from a snapshot");
    runtime.block_on(store.close());
}

#[actix_web::test]
async fn two_decisions_on_the_same_version_of_a_saga_cannot_both_be_appended() {
    let db = TestDb::new(Backend::Postgres);
    let store = open(&db).await;
    let order = OrderId(Uuid::new_v4());
    let mut tx = store.begin_saga().await.unwrap();
    tx.append(order, &Saga::default(), &place(placed(order)).events, 4)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let seen = store.load_saga(order).await.unwrap();
    let held = decide(&seen, &Reply::SeatsHeld { expires_at_ms: 9 }, 2);
    let refused = decide(
        &seen,
        &Reply::SeatsRefused {
            refusal: ticketflow::saga::Refusal::SoldOut,
        },
        2,
    );
    let mut first = store.begin_saga().await.unwrap();
    first.append(order, &seen, &held.events, 4).await.unwrap();
    first.commit().await.unwrap();
    let mut second = store.begin_saga().await.unwrap();
    let lost = second.append(order, &seen, &refused.events, 4).await;
    assert!(matches!(lost, Err(StoreError::Conflict(_))), "{lost:?}");
    drop(second);
    let now = store.load_saga(order).await.unwrap();
    assert_eq!(now.version, 3, "placed, held, charge requested");
    assert_eq!(
        now.outcome, None,
        "the refusal decided on a stale version was not kept"
    );
    store.close().await;
}

#[actix_web::test]
async fn the_relay_claims_each_due_message_once_until_its_lease_runs_out() {
    let db = TestDb::new(Backend::Postgres);
    let store = open(&db).await;
    let order = OrderId(Uuid::new_v4());
    let mut tx = store.begin_saga().await.unwrap();
    for i in 0..10 {
        tx.send(
            order,
            Participant::Payments,
            "Charge",
            &serde_json::json!({ "n": i }),
            None,
        )
        .await
        .unwrap();
    }
    // A timer far in the future is not due.
    tx.send(
        order,
        Participant::Orchestrator,
        "HoldTimeout",
        &serde_json::json!({}),
        Some(chrono::Utc::now().timestamp_millis() + 3_600_000),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // Two relays at once take disjoint messages.
    let (a, b) = futures::join!(store.claim_outbox(6, 60_000), store.claim_outbox(6, 60_000));
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut ids: Vec<i64> = a.iter().chain(&b).map(|m| m.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        10,
        "every due message claimed exactly once: {ids:?}"
    );
    assert!(store.claim_outbox(10, 60_000).await.unwrap().is_empty());
    let depth = store.outbox_depth().await.unwrap();
    assert_eq!((depth.due, depth.timers), (10, 1));

    // A claim that runs out (its relay died) is delivered again.
    store.retry_outbox(ids[0], 0).await.unwrap();
    let again = store.claim_outbox(10, 60_000).await.unwrap();
    assert_eq!(again.iter().map(|m| m.id).collect::<Vec<_>>(), [ids[0]]);
    assert_eq!(again[0].attempts, 2);
    for id in ids {
        store.ack_outbox(id).await.unwrap();
    }
    assert_eq!(store.outbox_depth().await.unwrap().due, 0);
    store.close().await;
}

// ---------- the stage through the API ----------

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use ticketflow::config::{LatencyModel, StageKind};

use crate::helpers::{determined_buyer, spawn_app_on, TestApp};

async fn saga_app(tweak: impl FnOnce(&mut ticketflow::config::Settings)) -> TestApp {
    spawn_app_on(Backend::Postgres, StageKind::Saga, tweak).await
}

/// The audit once the stage is quiet (its outbox empty, nothing pending), within `bound`.
async fn quiet_audit(app: &TestApp, bound: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let audit = app.audit().await;
        if audit["quiet"] == true || tokio::time::Instant::now() > deadline {
            return audit;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn new_user(app: &TestApp, name: &str) -> String {
    let reply = app
        .post_json("/api/v2/users", &json!({ "name": name }))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    reply.body["token"].as_str().unwrap().to_owned()
}

/// The types of an order's saga events, as its owner reads them.
async fn event_types(app: &TestApp, token: &str, order: &str) -> Vec<String> {
    let reply = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v2/orders/{order}/events"),
            Some(token),
            None,
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply
        .body
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, e)| {
            assert_eq!(e["version"], i as i64 + 1, "in order: {e}");
            e["type"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Polls the order until it is no longer pending.
async fn settled_order(app: &TestApp, token: &str, order: &str) -> Value {
    for _ in 0..200 {
        let reply = app
            .send(
                reqwest::Method::GET,
                &format!("/api/v2/orders/{order}"),
                Some(token),
                None,
                None,
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        if reply.body["status"] != "pending" {
            return reply.body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("order {order} stayed pending");
}

#[actix_web::test]
async fn stage_saga_refuses_sqlite_in_one_line() {
    let db = TestDb::new(Backend::Sqlite);
    let mut settings = crate::helpers::test_settings(StageKind::Saga, &db);
    settings.stage = StageKind::Saga;
    let error = match ticketflow::server::Server::build(settings).await {
        Ok(_) => panic!("stage saga started on SQLite"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.starts_with("stage saga runs on PostgreSQL only"),
        "{error}"
    );
    assert!(!error.contains('\n'), "{error}");
}

#[actix_web::test]
async fn a_v2_order_unfolds_as_a_saga_its_owner_can_watch_and_nobody_else_can() {
    let app = saga_app(|_| {}).await;
    // This stage's OpenAPI document lists the route (the others' do not).
    let (_, doc) = app.get_json("/api/openapi.json").await;
    assert!(
        doc["paths"]["/api/v2/orders/{id}/events"]["get"].is_object(),
        "the saga stage's document lists the events route"
    );
    let event = app.create_event(10).await;
    let alice = new_user(&app, "alice").await;
    let reply = app
        .send(
            reqwest::Method::POST,
            "/api/v2/orders",
            Some(&alice),
            Some("order-1"),
            Some(&json!({ "eventId": event, "quantity": 2 })),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let order = reply.body["id"].as_str().unwrap().to_owned();
    let settled = settled_order(&app, &alice, &order).await;
    assert_eq!(settled["status"], "confirmed", "{settled}");
    assert_eq!(
        event_types(&app, &alice, &order).await,
        [
            "OrderPlaced",
            "SeatsHeld",
            "ChargeRequested",
            "PaymentSucceeded",
            "OrderConfirmed"
        ]
    );
    // The same key again: the same order, replayed, no second saga.
    let again = app
        .send(
            reqwest::Method::POST,
            "/api/v2/orders",
            Some(&alice),
            Some("order-1"),
            Some(&json!({ "eventId": event, "quantity": 2 })),
        )
        .await;
    assert_eq!(
        (again.status, again.text.as_str()),
        (202, reply.text.as_str())
    );
    // Another user's order is 404, exactly like a missing one.
    let bob = new_user(&app, "bob").await;
    for id in [order.as_str(), "00000000-0000-0000-0000-000000000000"] {
        let reply = app
            .send(
                reqwest::Method::GET,
                &format!("/api/v2/orders/{id}/events"),
                Some(&bob),
                None,
                None,
            )
            .await;
        assert_eq!(reply.status, 404, "{}", reply.text);
        assert_eq!(reply.body["code"], "unknown-order");
    }
    let (_, events) = app.get_json(&format!("/api/v1/events/{event}")).await;
    assert_eq!(events["availableTickets"], 8);
    let audit = quiet_audit(&app, Duration::from_secs(10)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM saga_events").await,
        5,
        "one saga"
    );
}

#[actix_web::test]
async fn a_declined_charge_is_compensated_and_the_seat_comes_back() {
    let app = saga_app(|s| s.payments.failure_rate = 1.0).await;
    let event = app.create_event(1).await;
    let (status, body) = app.purchase(event, "carol").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "payment-declined");
    let (_, stored) = app.get_json(&format!("/api/v1/events/{event}")).await;
    assert_eq!(stored["availableTickets"], 1, "the seat is back");
    let kinds: Vec<String> = logged_kinds(&app).await;
    assert_eq!(
        kinds,
        [
            "OrderPlaced",
            "SeatsHeld",
            "ChargeRequested",
            "PaymentDeclined",
            "ReleaseRequested",
            "SeatsReleased",
            "OrderCancelled"
        ]
    );
    let audit = quiet_audit(&app, Duration::from_secs(10)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders WHERE status = 'cancelled' AND cancel_reason = 'payment_declined'")
            .await,
        1
    );
}

/// Every event type in the log, in order (for tests with one saga).
async fn logged_kinds(app: &TestApp) -> Vec<String> {
    app.db
        .texts("SELECT kind FROM saga_events ORDER BY seq")
        .await
}

#[actix_web::test]
async fn a_success_after_the_hold_expired_goes_forward_to_a_refund() {
    let app = saga_app(|s| {
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(600));
        s.hold_ttl = Duration::from_millis(100);
    })
    .await;
    let event = app.create_event(1).await;
    let (status, body) = app.purchase(event, "dave").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "hold-expired");
    let kinds = logged_kinds(&app).await;
    assert_eq!(
        kinds,
        [
            "OrderPlaced",
            "SeatsHeld",
            "ChargeRequested",
            "HoldExpired",
            "ReleaseRequested",
            "SeatsReleased",
            "PaymentSucceeded",
            "RefundRequested",
            "RefundIssued",
            "OrderCancelled"
        ]
    );
    let audit = quiet_audit(&app, Duration::from_secs(10)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments WHERE status = 'refunded'")
            .await,
        1
    );
}

#[actix_web::test]
async fn a_stampede_with_declines_sells_every_seat_exactly_once_and_the_audit_passes() {
    let app = Arc::new(
        saga_app(|s| {
            s.payments.failure_rate = 0.3;
            s.seed = 7;
        })
        .await,
    );
    let seats = 20;
    let event = app.create_event(seats).await;
    let buyers = (0..60).map(|i| {
        let app = Arc::clone(&app);
        tokio::spawn(determined_buyer(
            app,
            event,
            format!("buyer-{i}"),
            Duration::from_millis(20),
        ))
    });
    let tickets: Vec<String> = futures::future::join_all(buyers)
        .await
        .into_iter()
        .filter_map(|t| t.unwrap())
        .collect();
    assert_eq!(tickets.len(), seats as usize);
    let audit = quiet_audit(&app, Duration::from_secs(20)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    let declined = app
        .count("SELECT COUNT(*) FROM saga_events WHERE kind = 'PaymentDeclined'")
        .await;
    assert!(
        declined > 0,
        "no charge was declined: the test lost its teeth"
    );
    let (status, stats) = app.admin_json("/api/v2/admin/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["stage"], "saga");
    assert_eq!(stats["outbox"]["due"], 0, "{stats}");
    // Every charge and every seat command went through the outbox and its relay (the seats
    // to the inventory node, which kept one inbox row for each).
    let charges = app
        .count("SELECT COUNT(*) FROM saga_events WHERE kind = 'ChargeRequested'")
        .await;
    let seat_commands = app
        .count("SELECT COUNT(*) FROM saga_inbox WHERE consumer = 'inventory'")
        .await;
    let sagas = app
        .count("SELECT COUNT(DISTINCT stream_id) FROM saga_events")
        .await;
    assert!(
        seat_commands >= sagas + charges,
        "{seat_commands} seat commands"
    );
    assert!(
        stats["relay"]["delivered"].as_u64().unwrap() >= (charges + seat_commands) as u64
            && charges >= 20,
        "{charges} charges: {stats}"
    );
    assert!(stats["relay"]["lagMs"]["max"].is_i64(), "{stats}");
}

/// `ticketflow replay --db URL`: its exit code and what it printed.
fn replay(url: &str) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ticketflow"))
        .args(["replay", "--db", url])
        .output()
        .expect("ticketflow runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[actix_web::test]
async fn replay_rebuilds_every_projection_from_the_log_and_names_each_row_that_differs() {
    // Declines, holds that run out before a slow charge (refunds), confirmations.
    let app = Arc::new(
        saga_app(|s| {
            s.payments.failure_rate = 0.3;
            // About half the charges outlast the 2 s hold, and the others have time to spare.
            // (A lognormal of median 150 ms on a 500 ms hold once gave no late success in CI;
            // one of median 300 ms, with the payments node's hop on a machine at load average
            // 13, gave no success in time: every answer took a second or more.)
            // Then the seats' three hops to the inventory node came in (under load, about a
            // second before the charge leaves): a 4 s hold, charges of 10 ms to 8 s.
            s.payments.latency =
                LatencyModel::Uniform(Duration::from_millis(10), Duration::from_secs(8));
            s.hold_ttl = Duration::from_secs(4);
            s.seed = 3;
        })
        .await,
    );
    let event = app.create_event(15).await;
    let buyers = (0..40).map(|i| {
        let app = Arc::clone(&app);
        tokio::spawn(async move { app.purchase(event, &format!("r-{i}")).await })
    });
    futures::future::join_all(buyers).await;
    let audit = quiet_audit(&app, Duration::from_secs(20)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    for kind in ["OrderConfirmed", "PaymentDeclined", "RefundIssued"] {
        let n = app
            .count(&format!(
                "SELECT COUNT(*) FROM saga_events WHERE kind = '{kind}'"
            ))
            .await;
        assert!(n > 0, "no {kind}: the run does not cover every path");
    }
    let app = Arc::into_inner(app).expect("the buyers are done");
    let url = app.db.url().to_owned();
    let (code, out, err) = replay(&url);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("the live projections equal the log's"),
        "{out}"
    );

    // Tamper with three projected rows behind the log's back.
    let ticket = app
        .db
        .texts("SELECT id FROM tickets ORDER BY id LIMIT 1")
        .await
        .remove(0);
    app.db
        .execute(&[
            &format!(
                "UPDATE events SET available_tickets = CASE WHEN available_tickets < total_tickets
                 THEN available_tickets + 1 ELSE available_tickets - 1 END WHERE id = {event}"
            ),
            &format!("DELETE FROM tickets WHERE id = '{ticket}'"),
            "UPDATE orders SET updated_at = '2000-01-01T00:00:00.000Z' WHERE id = (SELECT MIN(id) FROM orders)",
        ])
        .await;
    let (code, out, _) = replay(&url);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("differs: events {event}: available_tickets")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "differs: tickets {ticket}: rebuilt from the log, missing"
        )),
        "{out}"
    );
    assert!(
        out.contains(": updated_at is \"2000-01-01T00:00:00.000Z\" live"),
        "{out}"
    );
    assert!(out.contains("3 rows differ"), "{out}");
    // The seats are the inventory node's: its own counter is compared too.
    app.db
        .execute(&[&format!(
            "UPDATE saga_seats SET available = CASE WHEN available < total
             THEN available + 1 ELSE available - 1 END WHERE event_id = {event}"
        )])
        .await;
    let (code, out, _) = replay(&url);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("differs: saga_seats {event}: available")),
        "{out}"
    );
    assert!(out.contains("4 rows differ"), "{out}");
    app.stop().await;
}

#[test]
fn replay_refuses_a_database_that_is_not_postgresql_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let (code, out, err) = replay(path.to_str().unwrap());
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.starts_with("error: --db "), "{err}");
    assert!(err.contains("PostgreSQL only"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!path.exists(), "nothing written");
}

// ---------- crash recovery: the process exits right after each step ----------

use crate::process::{admin_get, create_event, start_stage_with, Process};

/// Waits for the audit of the server at `base` to be quiet, within `bound`.
async fn quiet_audit_of(client: &reqwest::Client, base: &str, bound: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let (status, audit) = admin_get(client, base, "/api/v1/admin/audit").await;
        assert_eq!(status, 200, "{audit}");
        if audit["quiet"] == true || tokio::time::Instant::now() > deadline {
            return audit;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn saga_process(db: &TestDb, client: &reqwest::Client, extra: &[&str]) -> Process {
    let settings = [
        &[
            "--payment-failure-rate",
            "0",
            "--payment-latency",
            "20ms..80ms",
        ][..],
        extra,
    ]
    .concat();
    start_stage_with(
        &["serve", "--stage", "saga"],
        &settings,
        (None, "warn"),
        db,
        1,
        client,
    )
    .await
}

/// Buys with `--saga-crash-after STEP` until the process exits there, starts it again on the
/// same database, and checks that every saga reached exactly one final state, with one net
/// charge for each confirmed order and none for any other, and that replay agrees.
async fn every_saga_ends_once_after_a_crash_right_after(step: &str) {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let mut server = saga_process(&db, &client, &["--saga-crash-after", step]).await;
    let event = create_event(&client, &server.base, "crash", 5).await;
    let buyers = (0..3).map(|i| {
        let (client, base) = (client.clone(), server.base.clone());
        async move {
            let _ = client
                .post(format!("{base}/api/v1/tickets/purchase"))
                .json(&json!({ "eventId": event, "userId": format!("c-{i}") }))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
        }
    });
    futures::future::join_all(buyers).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failpoint {step} never fired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(86), "exited at the failpoint {step}");
    let unfinished = db
        .count(
            "SELECT COUNT(DISTINCT stream_id) FROM saga_events WHERE stream_id NOT IN
             (SELECT stream_id FROM saga_events WHERE kind IN ('OrderConfirmed', 'OrderCancelled', 'SeatsRefused'))",
        )
        .await;
    assert!(unfinished > 0, "the crash after {step} interrupted no saga");
    drop(server);

    let server = saga_process(&db, &client, &[]).await;
    let audit = quiet_audit_of(&client, &server.base, Duration::from_secs(30)).await;
    assert_eq!(audit["verdict"], "pass", "after {step}: {audit}");
    let sagas = db
        .count("SELECT COUNT(DISTINCT stream_id) FROM saga_events")
        .await;
    let ended = db
        .count("SELECT COUNT(*) FROM saga_events WHERE kind IN ('OrderConfirmed', 'OrderCancelled', 'SeatsRefused')")
        .await;
    // A purchase the process never received started no saga; every saga it did start ended,
    // exactly once.
    assert!(sagas >= 1);
    assert_eq!(ended, sagas, "each saga ended exactly once");
    // One net charge per confirmed order, none for any other: by the gateway's own books.
    let charged_twice = db
        .count(
            "SELECT COUNT(*) FROM (SELECT payment_key FROM gateway_ledger WHERE kind = 'charge'
             GROUP BY payment_key HAVING COUNT(*) > 1) twice",
        )
        .await;
    assert_eq!(charged_twice, 0);
    let confirmed = db
        .count("SELECT COUNT(*) FROM orders WHERE status = 'confirmed'")
        .await;
    let net_charges = db
        .count(
            "SELECT COALESCE(SUM(CASE kind WHEN 'charge' THEN 1 WHEN 'refund' THEN -1 ELSE 0 END), 0)
             FROM gateway_ledger",
        )
        .await;
    assert_eq!(net_charges, confirmed, "after {step}");
    assert_eq!(
        confirmed, sagas,
        "payments all succeed: every saga ends confirmed"
    );
    drop(server);
    let (code, out, err) = replay(db.url());
    assert_eq!(code, 0, "{out}{err}");
}

#[actix_web::test]
async fn after_a_crash_right_after_seats_held_every_saga_ends_once() {
    every_saga_ends_once_after_a_crash_right_after("seats-held").await;
}

#[actix_web::test]
async fn after_a_crash_right_after_the_charge_was_relayed_every_saga_ends_once() {
    every_saga_ends_once_after_a_crash_right_after("charge-relayed").await;
}

#[actix_web::test]
async fn after_a_crash_between_the_charge_and_its_record_every_saga_ends_once() {
    every_saga_ends_once_after_a_crash_right_after("charged").await;
}

#[actix_web::test]
async fn after_a_crash_right_after_order_confirmed_every_saga_ends_once() {
    every_saga_ends_once_after_a_crash_right_after("confirmed").await;
}

#[actix_web::test]
async fn the_per_user_limit_and_sold_out_refuse_an_order_without_making_one() {
    let app = saga_app(|s| s.per_user_limit = 4).await;
    let event = app.create_event(6).await;
    let alice = new_user(&app, "alice").await;
    let order = |key: &'static str, quantity: i64| {
        let (app, alice) = (&app, alice.clone());
        async move {
            app.send(
                reqwest::Method::POST,
                "/api/v2/orders",
                Some(&alice),
                Some(key),
                Some(&json!({ "eventId": event, "quantity": quantity })),
            )
            .await
        }
    };
    assert_eq!(order("a", 3).await.status, 202);
    let over = order("b", 2).await;
    assert_eq!(
        (over.status, over.body["code"].as_str()),
        (409, Some("user-limit"))
    );
    let bob = new_user(&app, "bob").await;
    let too_many = app
        .send(
            reqwest::Method::POST,
            "/api/v2/orders",
            Some(&bob),
            Some("c"),
            Some(&json!({ "eventId": event, "quantity": 4 })),
        )
        .await;
    assert_eq!(
        (too_many.status, too_many.body["code"].as_str()),
        (409, Some("not-enough-tickets")),
        "{}",
        too_many.text
    );
    let audit = quiet_audit(&app, Duration::from_secs(10)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders").await,
        1,
        "refusals make no order"
    );
    let (_, stored) = app.get_json(&format!("/api/v1/events/{event}")).await;
    assert_eq!(stored["availableTickets"], 3);
}

#[actix_web::test]
async fn a_v2_order_interrupted_by_a_crash_is_found_again_under_its_idempotency_key() {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    // Right after `OrderPlaced`: no order row yet, so the key's claim is released at the
    // restart, and only the order id derived from the key finds the first saga again.
    let mut server = saga_process(&db, &client, &["--saga-crash-after", "placed"]).await;
    let event = create_event(&client, &server.base, "crash-v2", 5).await;
    let user: Value = client
        .post(format!("{}/api/v2/users", server.base))
        .json(&json!({ "name": "erin" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = user["token"].as_str().unwrap().to_owned();
    let place = |base: String| {
        let (client, token) = (client.clone(), token.clone());
        async move {
            client
                .post(format!("{base}/api/v2/orders"))
                .bearer_auth(token)
                .header("Idempotency-Key", "erin-1")
                .json(&json!({ "eventId": event, "quantity": 2 }))
                .timeout(Duration::from_secs(5))
                .send()
                .await
        }
    };
    assert!(
        place(server.base.clone()).await.is_err(),
        "the process died before answering"
    );
    assert_eq!(server.child.wait().unwrap().code(), Some(86));
    drop(server);

    let server = saga_process(&db, &client, &[]).await;
    let again = place(server.base.clone()).await.unwrap();
    assert_eq!(again.status(), 202);
    let order: Value = again.json().await.unwrap();
    let logged = db.texts("SELECT DISTINCT stream_id FROM saga_events").await;
    assert_eq!(
        logged,
        [order["id"].as_str().unwrap()],
        "one saga, the first one"
    );
    let audit = quiet_audit_of(&client, &server.base, Duration::from_secs(30)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM orders WHERE status = 'confirmed'")
            .await,
        1
    );
}

#[actix_web::test]
async fn a_message_no_consumer_can_apply_ends_in_the_dead_letters_instead_of_looping() {
    let app = saga_app(|_| {}).await;
    let attempts = ticketflow::stages::saga::MAX_ATTEMPTS - 1;
    app.db
        .execute(&[&format!(
            "INSERT INTO saga_outbox (message_id, saga_id, destination, kind, body, attempts)
             VALUES ('poison-1', '{}', 'inventory', 'Nonsense', '{{\"type\": \"Nonsense\"}}', {attempts})",
            Uuid::new_v4()
        )])
        .await;
    let mut stats = Value::Null;
    for _ in 0..100 {
        stats = app.admin_json("/api/v2/admin/stats").await.1;
        if stats["outbox"]["deadLetters"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats["outbox"]["deadLetters"], 1, "{stats}");
    assert_eq!(stats["outbox"]["due"], 0, "{stats}");
    let errors = app
        .db
        .texts("SELECT error FROM saga_dead_letters WHERE message_id = 'poison-1'")
        .await;
    assert!(errors[0].contains("cannot be read"), "{errors:?}");
    // The relay goes on: a purchase after it is confirmed.
    let event = app.create_event(1).await;
    assert_eq!(app.purchase(event, "after-poison").await.0, 201);
}

// ---------- the payments participant is a payments node; several saga processes ----------

/// The payments node of the saga processes on `db` as `service_nodes` has it: its pid, if
/// one reported itself within the last 2 s.
/// The pid of the node of `role` (`payments` or `inventory`) that reported itself lately.
async fn node_pid(db: &TestDb, role: &str) -> Option<i64> {
    let pids = db
        .texts(&format!(
            "SELECT CAST(pid AS TEXT) FROM service_nodes
             WHERE role = '{role}' AND seen_at > now() - interval '2 seconds'"
        ))
        .await;
    pids.first().map(|p| p.parse().unwrap())
}

/// A stampede of 16 buyers on `event` through `server`, during which the saga process's node
/// of `role` is SIGKILLed once 20 purchases are confirmed (with sagas still under way), and
/// must be started again under a new pid. Returns the purchases confirmed.
async fn stampede_killing_the_node(
    db: &TestDb,
    client: &reqwest::Client,
    server: &Process,
    event: i64,
    role: &str,
) -> usize {
    let first = node_pid(db, role)
        .await
        .unwrap_or_else(|| panic!("the saga process started a {role} node"));
    let buying = stampede(
        client,
        vec![server.base.clone()],
        event,
        16,
        Duration::from_secs(90),
    );
    let killing = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while db
            .count("SELECT COUNT(*) FROM orders WHERE status = 'confirmed'")
            .await
            < 20
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no purchase confirmed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // SAFETY: kill(2) on the node this test's saga process started.
        assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
        let waiting = db
            .count(
                "SELECT COUNT(DISTINCT stream_id) FROM saga_events WHERE stream_id NOT IN
                 (SELECT stream_id FROM saga_events WHERE kind IN ('OrderConfirmed', 'OrderCancelled', 'SeatsRefused'))",
            )
            .await;
        assert!(waiting > 0, "the kill met no saga on its way");
        // Started again, under a new pid, by the saga process.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = node_pid(db, role).await {
                if pid != first {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the {role} node was not started again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (bought, ()) = futures::future::join(buying, killing).await;
    assert!(bought > 20, "{bought}");
    bought
}

/// Buyers of `event` in `tasks` loops, each sending v1 purchases to the first of `bases`
/// that answers (a refused connection moves it to the next), until the event is sold out or
/// `within` has passed. Returns the number of `201`s.
async fn stampede(
    client: &reqwest::Client,
    bases: Vec<String>,
    event: i64,
    tasks: usize,
    within: Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    let buyers = (0..tasks).map(|t| {
        let (client, bases) = (client.clone(), bases.clone());
        async move {
            let mut bought = 0;
            let mut at = t % bases.len();
            for i in 0.. {
                if tokio::time::Instant::now() > deadline {
                    break;
                }
                let sent = client
                    .post(format!("{}/api/v1/tickets/purchase", bases[at]))
                    .json(&json!({ "eventId": event, "userId": format!("s-{t}-{i}") }))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let Ok(answer) = sent else {
                    // That process is gone: its sagas go on in the others.
                    at = (at + 1) % bases.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let status = answer.status().as_u16();
                let body: Value = answer.json().await.unwrap_or(Value::Null);
                match (status, body["code"].as_str()) {
                    (201, _) => bought += 1,
                    (400, Some("sold-out")) => break,
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            bought
        }
    });
    futures::future::join_all(buyers).await.into_iter().sum()
}

/// Every saga on `db` ended exactly once; no payment key was charged twice; the net charges
/// (charges less refunds, by the gateway's books) are the confirmed orders; replay agrees.
async fn every_saga_ended_once_with_one_net_charge(db: &TestDb, what: &str) {
    let sagas = db
        .count("SELECT COUNT(DISTINCT stream_id) FROM saga_events")
        .await;
    let ended = db
        .count("SELECT COUNT(*) FROM saga_events WHERE kind IN ('OrderConfirmed', 'OrderCancelled', 'SeatsRefused')")
        .await;
    assert!(sagas > 0, "{what}: no saga");
    assert_eq!(ended, sagas, "{what}: each saga ended exactly once");
    let charged_twice = db
        .count(
            "SELECT COUNT(*) FROM (SELECT payment_key FROM gateway_ledger WHERE kind = 'charge'
             GROUP BY payment_key HAVING COUNT(*) > 1) twice",
        )
        .await;
    assert_eq!(charged_twice, 0, "{what}");
    let confirmed = db
        .count("SELECT COUNT(*) FROM orders WHERE status = 'confirmed'")
        .await;
    let net_charges = db
        .count(
            "SELECT COALESCE(SUM(CASE kind WHEN 'charge' THEN 1 WHEN 'refund' THEN -1 ELSE 0 END), 0)
             FROM gateway_ledger",
        )
        .await;
    assert_eq!(
        net_charges, confirmed,
        "{what}: one net charge per confirmed order"
    );
    let (code, out, err) = replay(db.url());
    assert_eq!(code, 0, "{what}: {out}{err}");
}

#[actix_web::test]
async fn the_payments_node_killed_mid_run_is_started_again_and_every_saga_ends_once() {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    // Holds of 2 s: some run out while the payments node is down, so the late answers are
    // refunded (the compensation), besides the charges simply asked again.
    let server = saga_process(&db, &client, &["--hold-ttl", "2s"]).await;
    let event = create_event(&client, &server.base, "node-kill", 400).await;
    stampede_killing_the_node(&db, &client, &server, event, "payments").await;
    let audit = quiet_audit_of(&client, &server.base, Duration::from_secs(60)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    drop(server);
    every_saga_ended_once_with_one_net_charge(&db, "after the payments node's kill").await;
}

#[actix_web::test]
async fn two_saga_processes_share_a_database_and_one_killed_mid_run_loses_nothing() {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let mut first = saga_process(&db, &client, &[]).await;
    let second = saga_process(&db, &client, &[]).await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM service_nodes WHERE role = 'payments'")
            .await,
        1,
        "the second process uses the payments node the first started"
    );
    let event = create_event(&client, &first.base, "two-sagas", 400).await;
    let buying = stampede(
        &client,
        vec![first.base.clone(), second.base.clone()],
        event,
        16,
        Duration::from_secs(120),
    );
    let killing = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while db
            .count("SELECT COUNT(*) FROM orders WHERE status = 'confirmed'")
            .await
            < 40
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no purchase confirmed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.child.kill().expect("SIGKILL"); // kill -9; its payments node dies with it
        first.child.wait().unwrap();
        db.count(
            "SELECT COUNT(DISTINCT stream_id) FROM saga_events WHERE stream_id NOT IN
             (SELECT stream_id FROM saga_events WHERE kind IN ('OrderConfirmed', 'OrderCancelled', 'SeatsRefused'))",
        )
        .await
    };
    let (bought, unfinished) = futures::future::join(buying, killing).await;
    assert!(unfinished > 0, "the kill interrupted no saga");
    assert!(bought > 40, "{bought}");
    // The survivor takes the dead process's claims once their lease runs out, and starts a
    // payments node of its own.
    let (_, stats) = admin_get(&client, &second.base, "/api/v2/admin/stats").await;
    assert!(
        stats["relay"]["notices"].as_u64().unwrap() > 0,
        "the first process's commits never woke the second's relay: {stats}"
    );
    let audit = quiet_audit_of(&client, &second.base, Duration::from_secs(60)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    drop(second);
    every_saga_ended_once_with_one_net_charge(&db, "after one of two saga processes was killed")
        .await;
}

#[actix_web::test]
async fn a_claim_another_process_holds_is_not_taken_before_its_lease_runs_out() {
    let app = saga_app(|_| {}).await;
    // A claim of 4 s more, as a saga process that is still running (or just died) holds it.
    let body = serde_json::to_string(&Reply::HoldTimeout).unwrap();
    app.db
        .execute(&[&format!(
            "INSERT INTO saga_outbox (message_id, saga_id, destination, kind, body, attempts, claimed_until)
             VALUES ('claimed-1', '{}', 'orchestrator', 'HoldTimeout', '{body}', 1,
                     now() + interval '4 seconds')",
            Uuid::new_v4()
        )])
        .await;
    // A saga process starting on the database leaves it alone.
    let app = app.restart().await;
    let left = "SELECT COUNT(*) FROM saga_outbox WHERE message_id = 'claimed-1'";
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        app.db.count(left).await,
        1,
        "taken while another's claim stood"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.db.count(left).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered once the claim ran out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

// ---------- the inventory participant is an inventory node ----------

/// The inventory node of the saga processes on `db` as `service_nodes` has it: its pid, if
/// one reported itself within the last 2 s.
/// Sends a seat command to the inventory node holding `event`'s shard, as the saga's relay
/// does, and returns its answer (`{"ok": reply}` or `{"err": ...}`).
async fn seat_command(
    app: &TestApp,
    message_id: &str,
    order: &str,
    event: i64,
    command: Value,
) -> Value {
    let addr = app
        .db
        .texts(
            "SELECT n.addr FROM shard_leases l JOIN service_nodes n ON n.id = l.owner
             WHERE l.expires_at > now() LIMIT 1",
        )
        .await
        .pop()
        .expect("an inventory node holds the shards");
    let answer = app
        .client
        .post(format!("http://{addr}/internal/v1/saga/seats"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .json(&json!({
            "messageId": message_id,
            "order": order,
            "event": event,
            "command": command,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

fn hold_seats(order: &str, event: i64, user: &str) -> Value {
    json!({
        "type": "HoldSeats", "order": order, "event": event, "user": user,
        "quantity": 1, "perUserLimit": null, "holdTtlMs": 1000,
    })
}

#[actix_web::test]
async fn a_redelivered_hold_seats_holds_once_and_is_answered_as_the_first_time() {
    let app = saga_app(|_| {}).await;
    let event = app.create_event(1).await;
    let (first, second) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let held = seat_command(&app, "m-1", &first, event, hold_seats(&first, event, "a")).await;
    assert_eq!(held["ok"]["type"], "SeatsHeld", "{held}");
    // The same message again: the same answer, nothing held twice.
    let again = seat_command(&app, "m-1", &first, event, hold_seats(&first, event, "a")).await;
    assert_eq!(again, held);
    let holds = || app.count("SELECT COUNT(*) FROM saga_holds");
    assert_eq!(holds().await, 1);
    assert_eq!(
        app.count("SELECT available FROM saga_seats").await,
        0,
        "one seat held of one"
    );
    // Another saga's hold of the same seat is refused: none is free.
    let refused = seat_command(&app, "m-2", &second, event, hold_seats(&second, event, "b")).await;
    assert_eq!(refused["ok"]["type"], "SeatsRefused", "{refused}");
    // The seat comes back; the refused hold delivered again is still refused (its first answer),
    // never a hold the saga already heard was refused.
    let release = json!({ "type": "ReleaseSeats", "order": first });
    let released = seat_command(&app, "m-3", &first, event, release).await;
    assert_eq!(released["ok"]["type"], "SeatsReleased", "{released}");
    assert_eq!(app.count("SELECT available FROM saga_seats").await, 1);
    let redelivered =
        seat_command(&app, "m-2", &second, event, hold_seats(&second, event, "b")).await;
    assert_eq!(redelivered, refused);
    assert_eq!(app.count("SELECT available FROM saga_seats").await, 1);
    assert_eq!(
        app.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        1
    );
    assert_eq!(holds().await, 1, "the refused saga holds nothing");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM saga_inbox WHERE consumer = 'inventory'")
            .await,
        3,
        "one inbox row per message"
    );
}

#[actix_web::test]
async fn the_inventory_node_killed_mid_run_is_started_again_and_every_saga_ends_once() {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let server = saga_process(&db, &client, &["--hold-ttl", "2s"]).await;
    let event = create_event(&client, &server.base, "inventory-kill", 300).await;
    stampede_killing_the_node(&db, &client, &server, event, "inventory").await;
    // The shards were taken again at a higher epoch by the node started again.
    assert!(
        db.count("SELECT MIN(epoch) FROM shard_leases").await >= 2,
        "the shards were taken again"
    );
    let audit = quiet_audit_of(&client, &server.base, Duration::from_secs(60)).await;
    assert_eq!(audit["verdict"], "pass", "{audit}");
    drop(server);
    assert_eq!(
        db.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        300 - db
            .count("SELECT COUNT(*) FROM saga_holds WHERE status IN ('held', 'confirmed')")
            .await,
        "the node's availability is what its holds leave"
    );
    every_saga_ended_once_with_one_net_charge(&db, "after the inventory node's kill").await;
}
