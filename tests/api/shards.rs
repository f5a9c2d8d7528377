//! Stage `services`' shard leases and epoch fence, on a real PostgreSQL: leases kept by the
//! database's clock, takeovers at a higher epoch, and a node that paused past its lease
//! refused by the fence (and, with the fence off, writing anyway: the check has teeth).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ticketflow::config::Durability;
use ticketflow::domain::{timestamp, EventId, Money, NewEvent, OrderId, TicketId};
use ticketflow::store::shards::{shard_of, ShardFence, ShardLease, NOT_OWNER, SHARDS};
use ticketflow::store::{Catalog, NewOrder, Store, StoreError, WriteOp};
use uuid::Uuid;

use crate::backends::{Backend, TestDb};

async fn store(db: &TestDb) -> Store {
    let store = Store::open(db.url(), Durability::Normal).await.unwrap();
    store.ensure_shards().await.unwrap();
    store
}

async fn event(store: &Store) -> EventId {
    store
        .create_event(&NewEvent {
            name: "Shards".into(),
            venue: "Hall".into(),
            date: Utc::now(),
            total_tickets: 10,
            price: Money::from_cents(100).unwrap(),
        })
        .await
        .unwrap()
        .id
}

fn hold(event: EventId, user: &str) -> WriteOp {
    WriteOp::Hold(Box::new(NewOrder {
        order: OrderId(Uuid::new_v4()),
        tickets: vec![TicketId(Uuid::new_v4())],
        event,
        user: user.into(),
        unit_price: Money::from_cents(100).unwrap(),
        idempotency: None,
        created_at: timestamp(Utc::now()),
    }))
}

fn lease_of(leases: &[ShardLease], shard: u32) -> Option<ShardLease> {
    leases.iter().copied().find(|l| l.shard == shard)
}

#[actix_web::test]
async fn a_lease_is_taken_over_only_after_it_ran_out_and_at_a_higher_epoch() {
    let db = TestDb::new(Backend::Postgres);
    let store = store(&db).await;
    let ttl = Duration::from_millis(400);

    let a = store.claim_shards("a", SHARDS as usize, ttl).await.unwrap();
    assert_eq!(
        a.len(),
        SHARDS as usize,
        "a free table: a takes every shard"
    );
    assert!(a.iter().all(|l| l.epoch == 1), "{a:?}");
    let b = store.claim_shards("b", SHARDS as usize, ttl).await.unwrap();
    assert!(b.is_empty(), "b took live leases: {b:?}");

    // Renewed, a keeps them past the first TTL.
    tokio::time::sleep(ttl / 2).await;
    assert_eq!(
        store.renew_leases("a", ttl).await.unwrap().len(),
        SHARDS as usize
    );
    tokio::time::sleep(ttl / 2 + Duration::from_millis(50)).await;
    assert!(store.claim_shards("b", 4, ttl).await.unwrap().is_empty());

    // a stops renewing: once the database's clock passes the expiry, b takes them, one epoch up.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let b = store.claim_shards("b", 4, ttl).await.unwrap();
    assert_eq!(b.len(), 4, "{b:?}");
    assert!(b.iter().all(|l| l.epoch == 2), "{b:?}");
    // a's renewal no longer finds the ones it lost, nor the ones that merely ran out.
    let renewed = store.renew_leases("a", ttl).await.unwrap();
    assert!(renewed.is_empty(), "{renewed:?}");

    let rows = store.shard_leases().await.unwrap();
    assert_eq!(rows.len(), SHARDS as usize);
    for lease in &b {
        let row = &rows[lease.shard as usize];
        assert_eq!(row.owner.as_deref(), Some("b"));
        assert_eq!(row.epoch, 2);
        assert!(row.remaining_ms > 0, "{row:?}");
    }

    // Given back, a shard is free at once, and its next owner's epoch is higher still.
    assert!(store.release_shard("b", b[0]).await.unwrap());
    assert!(
        !store.release_shard("b", b[0]).await.unwrap(),
        "released twice"
    );
    let again = store.claim_shards("c", 1, ttl).await.unwrap();
    assert_eq!(
        again,
        vec![ShardLease {
            shard: b[0].shard,
            epoch: 3
        }]
    );
    store.close().await;
}

/// Node `a` holds an event's shard and writes; it pauses past its lease; `b` takes the shard.
/// Returns what `a`'s late write got, and `b`'s write after it.
async fn late_write_after_takeover(
    enforce: bool,
) -> (Result<(), StoreError>, Result<(), StoreError>) {
    let db = TestDb::new(Backend::Postgres);
    let store = store(&db).await;
    let ttl = Duration::from_millis(300);
    let event = event(&store).await;
    let shard = shard_of(event);

    let a_fence = Arc::new(ShardFence::new("a", enforce));
    let a_leases = store.claim_shards("a", SHARDS as usize, ttl).await.unwrap();
    a_fence.hold(lease_of(&a_leases, shard).unwrap());
    let (a_writer, a_task) = store
        .start_fenced_writer(8, 64, Arc::clone(&a_fence))
        .await
        .unwrap();
    a_writer.submit(hold(event, "early")).await.unwrap();

    // `a` pauses (it neither renews nor learns that it lost the shard); `b` takes over.
    tokio::time::sleep(ttl + Duration::from_millis(150)).await;
    let b_fence = Arc::new(ShardFence::new("b", enforce));
    let b_lease = lease_of(
        &store.claim_shards("b", SHARDS as usize, ttl).await.unwrap(),
        shard,
    )
    .expect("b takes the expired shard");
    assert_eq!(b_lease.epoch, 2);
    b_fence.hold(b_lease);
    let (b_writer, b_task) = store.start_fenced_writer(8, 64, b_fence).await.unwrap();

    // `a` wakes up and writes what it decided before its pause.
    let late = a_writer.submit(hold(event, "late")).await;
    let current = b_writer.submit(hold(event, "current")).await;
    drop((a_writer, b_writer));
    a_task.await.unwrap();
    b_task.await.unwrap();
    store.close().await;
    (late, current)
}

#[actix_web::test]
async fn a_node_that_paused_past_its_lease_cannot_write_after_a_takeover() {
    let (late, current) = late_write_after_takeover(true).await;
    match late {
        Err(StoreError::Conflict(message)) => {
            assert!(message.contains(NOT_OWNER), "{message}");
            assert!(message.contains("node a"), "{message}");
        }
        other => panic!("the paused node's write was not refused: {other:?}"),
    }
    current.expect("the new owner writes");
}

#[actix_web::test]
async fn without_the_epoch_check_the_paused_node_writes_anyway() {
    // `--unsafe-no-epoch`: what the check prevents. Both writers write the same event.
    let (late, current) = late_write_after_takeover(false).await;
    late.expect("with the fence off, the stale write goes through");
    current.expect("the new owner writes");
}

/// Node `a` loses a shard and takes it back at a higher epoch while a write its old actor
/// decided is still queued: that write carries the old epoch and is refused; the new actor's
/// writes (stamped with the new epoch) go through. Unstamped, the old write would pass, which
/// is the double sale the stamp prevents (the node holds the shard again, but not the lease
/// the old actor decided under).
#[actix_web::test]
async fn a_write_decided_before_the_node_took_its_shard_back_is_refused() {
    use ticketflow::store::Stamp;
    let db = TestDb::new(Backend::Postgres);
    let store = store(&db).await;
    let ttl = Duration::from_secs(30);
    let event = event(&store).await;
    let shard = shard_of(event);
    let fence = Arc::new(ShardFence::new("a", true));
    let first = lease_of(
        &store.claim_shards("a", SHARDS as usize, ttl).await.unwrap(),
        shard,
    )
    .unwrap();
    fence.hold(first);
    let (writer, task) = store
        .start_fenced_writer(8, 64, Arc::clone(&fence))
        .await
        .unwrap();
    let old = writer.stamped(Stamp {
        shard,
        epoch: first.epoch,
    });
    old.submit(hold(event, "early")).await.unwrap();

    // Given back (to balance the nodes), then taken again: a higher epoch.
    fence.drop_shard(shard);
    assert!(store.release_shard("a", first).await.unwrap());
    let again = lease_of(&store.claim_shards("a", 1, ttl).await.unwrap(), shard).unwrap();
    assert!(again.epoch > first.epoch, "{again:?}");
    fence.hold(again);

    let stale = old.submit(hold(event, "decided-before")).await;
    assert!(
        matches!(&stale, Err(StoreError::Conflict(m)) if m.contains(NOT_OWNER)),
        "{stale:?}"
    );
    let new = writer.stamped(Stamp {
        shard,
        epoch: again.epoch,
    });
    new.submit(hold(event, "decided-after")).await.unwrap();
    writer
        .submit(hold(event, "unstamped"))
        .await
        .expect("an unstamped write is checked against the epoch held now");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM orders WHERE user_id = 'decided-before'")
            .await,
        0
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM orders").await, 3);
    drop((writer, old, new));
    task.await.unwrap();
    store.close().await;
}

#[actix_web::test]
async fn a_write_for_a_shard_the_node_never_held_is_refused() {
    let db = TestDb::new(Backend::Postgres);
    let store = store(&db).await;
    let event = event(&store).await;
    let fence = Arc::new(ShardFence::new("a", true));
    let (writer, task) = store.start_fenced_writer(8, 64, fence).await.unwrap();
    let refused = writer.submit(hold(event, "nobody")).await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains(NOT_OWNER)),
        "{refused:?}"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM orders").await,
        0,
        "nothing written"
    );
    drop(writer);
    task.await.unwrap();
    store.close().await;
}

#[actix_web::test]
async fn nodes_report_themselves_and_only_recent_ones_count_as_live() {
    let db = TestDb::new(Backend::Postgres);
    let store = store(&db).await;
    store
        .node_seen("inv-1", "inventory", "127.0.0.1:1", 11)
        .await
        .unwrap();
    store
        .node_seen("inv-2", "inventory", "127.0.0.1:2", 12)
        .await
        .unwrap();
    store
        .node_seen("gw", "gateway", "127.0.0.1:3", 13)
        .await
        .unwrap();
    let within = Duration::from_millis(500);
    assert_eq!(store.live_nodes("inventory", within).await.unwrap(), 2);
    tokio::time::sleep(within + Duration::from_millis(100)).await;
    store
        .node_seen("inv-2", "inventory", "127.0.0.1:2", 12)
        .await
        .unwrap();
    assert_eq!(store.live_nodes("inventory", within).await.unwrap(), 1);
    store.close().await;
}
