//! Group commit: one task owns one connection and turns whatever writes are waiting into a
//! single transaction, so many purchases share one commit (and one fsync under
//! `synchronous=FULL`).
//!
//! Each write carries a oneshot that is answered only after its transaction committed: a caller
//! that has its answer knows the write is durable. If one write in a batch fails (a constraint
//! refused it), the batch is rolled back and every write retried in a transaction of its own, so
//! one bad write never takes its neighbours down with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::Utc;
use sqlx::{AnyConnection, Connection};
use tokio::sync::{mpsc, oneshot};

use super::changes::Changes;
use super::shards::ShardFence;
use super::sql::{self, NewOrder};
use super::{StoreError, StoreResult};
use crate::domain::{timestamp, CancelReason, EventId, OrderId, OrderStatus, PaymentStatus};

/// One durable step of a purchase.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Seats held: the order, its tickets and its payment `pending`, `available` lower.
    Hold(Box<NewOrder>),
    /// The payment succeeded in time: order and tickets `confirmed`, payment `completed`.
    Confirm { order: OrderId },
    /// The seats go back: order and tickets `cancelled`, `available` higher, and the payment
    /// settled as `payment` if its outcome is already known.
    Cancel {
        order: OrderId,
        event: EventId,
        reason: CancelReason,
        payment: Option<PaymentStatus>,
    },
    /// A payment's outcome arrived after its order was already cancelled.
    SettlePayment {
        order: OrderId,
        status: PaymentStatus,
    },
    /// Writes nothing: its answer means every write queued before it is committed.
    Barrier,
}

type Ack = oneshot::Sender<StoreResult<()>>;

/// The writer's queue was full: the caller should shed load.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the database writer's queue is full")]
pub struct WriterFull(pub WriteOp);

/// Sends writes to the group-commit task; cheap to clone.
#[derive(Clone)]
pub struct WriteHandle {
    tx: mpsc::Sender<(WriteOp, Ack)>,
    stats: Arc<WriterStats>,
}

/// What the writer has done, for stats and tests. Atomics: written by the writer task, read
/// by anyone, no invariant between them.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed as one group.
    pub batches: AtomicU64,
    /// Writes in those groups.
    pub writes: AtomicU64,
    /// Groups that failed as a whole and were retried write by write.
    pub fallbacks: AtomicU64,
    /// Writes queued and not yet answered (committed or refused), for the audit's quiet check.
    pub unflushed: AtomicU64,
}

impl WriterStats {
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "batches": self.batches.load(Ordering::Relaxed),
            "writes": self.writes.load(Ordering::Relaxed),
            "fallbacks": self.fallbacks.load(Ordering::Relaxed),
            "unflushed": self.unflushed(),
        })
    }

    /// Writes queued and not yet answered.
    pub fn unflushed(&self) -> u64 {
        self.unflushed.load(Ordering::Acquire)
    }

    /// Counted before the write is queued, so a write is never in the queue uncounted.
    fn queued(&self) {
        self.unflushed.fetch_add(1, Ordering::AcqRel);
    }

    /// Counted once the write's answer is sent, or if it never reached the queue.
    fn answered(&self) {
        self.unflushed.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers one write, counted as no longer unflushed first: it is committed (or refused), and
/// its waiter must not find it still counted once woken.
fn answer(stats: &WriterStats, ack: Ack, result: StoreResult<()>) {
    stats.answered();
    let _ = ack.send(result);
}

impl WriteHandle {
    /// The writer's counters.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Queues `op` without waiting for room; the receiver answers once it is committed.
    pub fn try_submit(
        &self,
        op: WriteOp,
    ) -> Result<oneshot::Receiver<StoreResult<()>>, WriterFull> {
        let (ack, done) = oneshot::channel();
        self.stats.queued();
        match self.tx.try_send((op, ack)) {
            Ok(()) => Ok(done),
            Err(mpsc::error::TrySendError::Full((op, _)))
            | Err(mpsc::error::TrySendError::Closed((op, _))) => {
                self.stats.answered();
                Err(WriterFull(op))
            }
        }
    }

    /// Queues `op`, waiting for room, and waits until it is committed.
    pub async fn submit(&self, op: WriteOp) -> StoreResult<()> {
        let (ack, done) = oneshot::channel();
        self.stats.queued();
        if self.tx.send((op, ack)).await.is_err() {
            self.stats.answered();
            return Err(StoreError::WriterClosed);
        }
        done.await.map_err(|_| StoreError::WriterClosed)?
    }

    /// Waits until every write queued before this call is committed.
    pub async fn flush(&self) -> StoreResult<()> {
        self.submit(WriteOp::Barrier).await
    }
}

/// Starts the writer task; it stops when every handle is dropped, after draining the queue.
pub(super) fn start(
    conn: AnyConnection,
    max_batch: usize,
    capacity: usize,
    fence: Option<Arc<ShardFence>>,
    changes: Changes,
) -> (WriteHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let stats = Arc::new(WriterStats::default());
    let told = Told {
        stats: Arc::clone(&stats),
        changes,
    };
    let task = tokio::spawn(run(conn, rx, max_batch.max(1), told, fence));
    (WriteHandle { tx, stats }, task)
}

/// Starts a writer that stores nothing and acknowledges every write as soon as it arrives, for
/// benchmarks and simulation: the caller pays for queueing and acknowledging a write exactly as
/// with [`super::Store::start_writer`], but no I/O. Must be called inside a tokio runtime; the
/// task stops when every handle is dropped.
pub fn start_acknowledging(
    max_batch: usize,
    capacity: usize,
) -> (WriteHandle, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<(WriteOp, Ack)>(capacity.max(1));
    let max_batch = max_batch.max(1);
    let stats = Arc::new(WriterStats::default());
    let acknowledged = Arc::clone(&stats);
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(max_batch);
        while rx.recv_many(&mut batch, max_batch).await > 0 {
            for (_, ack) in batch.drain(..) {
                answer(&acknowledged, ack, Ok(()));
            }
        }
    });
    (WriteHandle { tx, stats }, task)
}

/// What the writer reports to: its counters, and the availability streams.
struct Told {
    stats: Arc<WriterStats>,
    changes: Changes,
}

async fn run(
    mut conn: AnyConnection,
    mut rx: mpsc::Receiver<(WriteOp, Ack)>,
    max_batch: usize,
    told: Told,
    fence: Option<Arc<ShardFence>>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        commit(&mut conn, &mut batch, &told, fence.as_deref()).await;
    }
    let _ = sqlx::Connection::close(conn).await;
}

async fn commit(
    conn: &mut AnyConnection,
    batch: &mut Vec<(WriteOp, Ack)>,
    told: &Told,
    fence: Option<&ShardFence>,
) {
    let stats = told.stats.as_ref();
    if let Some(delay) = fence.and_then(ShardFence::write_delay) {
        tokio::time::sleep(delay).await;
    }
    let together = async {
        let mut tx = conn.begin().await?;
        if let Some(fence) = fence {
            let ops: Vec<&WriteOp> = batch.iter().map(|(op, _)| op).collect();
            prove_epochs(&mut tx, fence, &ops).await?;
        }
        apply_batch(&mut tx, batch).await?;
        tx.commit().await
    }
    .await;
    match together {
        Ok(()) => {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .writes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            crate::meter::writer_batch(batch.len());
            for (op, ack) in batch.drain(..) {
                committed(&op, &told.changes);
                answer(stats, ack, Ok(()));
            }
        }
        Err(error) => {
            stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, writes = batch.len(), "group commit failed; retrying writes one by one");
            for (op, ack) in batch.drain(..) {
                let alone = async {
                    let mut tx = conn.begin().await?;
                    if let Some(fence) = fence {
                        prove_epochs(&mut tx, fence, &[&op]).await?;
                    }
                    apply(&mut tx, &op).await?;
                    tx.commit().await?;
                    Ok(())
                }
                .await;
                match &alone {
                    Ok(()) => {
                        crate::meter::writer_batch(1);
                        committed(&op, &told.changes);
                    }
                    Err(error) => tracing::error!(%error, ?op, "write refused"),
                }
                answer(stats, ack, alone);
            }
        }
    }
}

/// Counts a committed write that settled a purchase in the metrics, and tells the event's
/// availability streams when seats moved.
fn committed(op: &WriteOp, changes: &Changes) {
    match op {
        WriteOp::Hold(order) => changes.changed(order.event),
        WriteOp::Confirm { .. } => crate::meter::settled(None),
        WriteOp::Cancel { reason, event, .. } => {
            crate::meter::settled(Some(*reason));
            changes.changed(*event);
        }
        WriteOp::SettlePayment { .. } | WriteOp::Barrier => {}
    }
}

/// Stage `services`: before writing `ops`, proves in the same transaction that this node still
/// holds the shard of every event they touch, at its epoch ([`ShardFence::check`]).
async fn prove_epochs(
    conn: &mut AnyConnection,
    fence: &ShardFence,
    ops: &[&WriteOp],
) -> Result<(), sqlx::Error> {
    let mut events = Vec::new();
    let mut orders = Vec::new();
    for op in ops {
        match op {
            WriteOp::Hold(order) => events.push(order.event),
            WriteOp::Cancel { event, .. } => events.push(*event),
            WriteOp::Confirm { order } | WriteOp::SettlePayment { order, .. } => {
                orders.push(*order)
            }
            WriteOp::Barrier => {}
        }
    }
    fence.check(conn, &events, &orders).await
}

/// Applies a whole batch in a few multi-row statements: every hold inserted, every confirmation
/// made, then cancellations and late payment outcomes one by one, and last each event's
/// `available` moved once by its net change. The net change is what the event actor decided
/// in sequence, so it is valid; moving seats op by op in another order than the actor's could
/// cross `0 <= available <= total` on the way (a seat returned and taken again in one batch).
async fn apply_batch(
    conn: &mut AnyConnection,
    batch: &[(WriteOp, Ack)],
) -> Result<(), sqlx::Error> {
    let now = timestamp(Utc::now());
    let mut holds = Vec::new();
    let mut confirms = Vec::new();
    let mut cancelled = Vec::new();
    for (op, _) in batch {
        match op {
            WriteOp::Hold(order) => holds.push(order.as_ref()),
            WriteOp::Confirm { order } => confirms.push(*order),
            _ => {}
        }
    }
    sql::insert_orders(conn, &holds).await?;
    sql::confirm_orders(conn, &confirms, &now).await?;
    for (op, _) in batch {
        match op {
            WriteOp::Cancel {
                order,
                reason,
                payment,
                ..
            } => {
                sql::finish_order(conn, *order, OrderStatus::Cancelled, Some(*reason), &now)
                    .await?;
                if let Some(status) = payment {
                    sql::settle_payment(conn, *order, *status, &now).await?;
                }
                cancelled.push(*order);
            }
            WriteOp::SettlePayment { order, status } => {
                sql::settle_payment(conn, *order, *status, &now).await?;
            }
            WriteOp::Hold(_) | WriteOp::Confirm { .. } | WriteOp::Barrier => {}
        }
    }
    let mut net: Vec<(EventId, i64)> = Vec::new();
    let mut add = |event: EventId, delta: i64| match net.iter_mut().find(|(e, _)| *e == event) {
        Some((_, total)) => *total += delta,
        None => net.push((event, delta)),
    };
    for hold in &holds {
        add(hold.event, -(hold.tickets.len() as i64));
    }
    for (event, seats) in sql::seats_per_event(conn, &cancelled).await? {
        add(event, seats);
    }
    for (event, delta) in net {
        if delta != 0 {
            sql::add_available(conn, event, delta).await?;
        }
    }
    Ok(())
}

/// Applies one write on its own (the path a batch falls back to when it fails as a whole).
async fn apply(conn: &mut AnyConnection, op: &WriteOp) -> Result<(), sqlx::Error> {
    let now = timestamp(Utc::now());
    match op {
        WriteOp::Hold(order) => {
            sql::insert_order(conn, order).await?;
            sql::move_seats(conn, order.order, order.event, -1).await
        }
        WriteOp::Confirm { order } => sql::confirm_order(conn, *order, &now).await,
        WriteOp::Cancel {
            order,
            event,
            reason,
            payment,
        } => {
            sql::finish_order(conn, *order, OrderStatus::Cancelled, Some(*reason), &now).await?;
            sql::move_seats(conn, *order, *event, 1).await?;
            match payment {
                Some(status) => sql::settle_payment(conn, *order, *status, &now).await,
                None => Ok(()),
            }
        }
        WriteOp::SettlePayment { order, status } => {
            sql::settle_payment(conn, *order, *status, &now).await
        }
        WriteOp::Barrier => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::domain::{Money, NewEvent, Order, TicketId, UserId};
    use crate::store::{Catalog, IdempotencyRecords, KeyState, OrderKey, Store};

    fn render(order: &Order) -> String {
        format!("placed {} x{}", order.id, order.quantity)
    }

    #[tokio::test]
    async fn a_held_order_and_its_keys_answer_commit_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let store = Store::open(path.to_str().unwrap(), Durability::Normal)
            .await
            .unwrap();
        let event = store
            .create_event(&NewEvent {
                name: "Keys".into(),
                venue: "Hall".into(),
                date: Utc::now(),
                total_tickets: 10,
                price: Money::from_cents(100).unwrap(),
            })
            .await
            .unwrap();
        let user = UserId::parse("alice").unwrap();
        let claimed = store.begin_idempotent(&user, "k1", "print").await.unwrap();
        assert_eq!(claimed, KeyState::Proceed);

        let (writer, task) = store.start_writer(8, 8).await.unwrap();
        let order = OrderId(uuid::Uuid::new_v4());
        let hold = NewOrder {
            order,
            tickets: vec![
                TicketId(uuid::Uuid::new_v4()),
                TicketId(uuid::Uuid::new_v4()),
            ],
            event: event.id,
            user: "alice".into(),
            unit_price: Money::from_cents(100).unwrap(),
            idempotency: Some(OrderKey {
                key: "k1".into(),
                status: 202,
                render,
            }),
            created_at: timestamp(Utc::now()),
        };
        writer.submit(WriteOp::Hold(Box::new(hold))).await.unwrap();

        // No one called complete_idempotent: the hold's own transaction stored the answer.
        let replay = store.begin_idempotent(&user, "k1", "print").await.unwrap();
        assert_eq!(
            replay,
            KeyState::Replay {
                status: 202,
                body: format!("placed {order} x2"),
            }
        );
        drop(writer);
        task.await.unwrap();
    }
}
