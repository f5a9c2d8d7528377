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
