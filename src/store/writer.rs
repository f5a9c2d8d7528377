//! Group commit: one task owns one connection and turns whatever writes are waiting into a
//! single transaction, so many purchases share one commit (and one fsync under
//! `synchronous=FULL`).
//!
//! Each write carries a oneshot that is answered only after its transaction committed: a caller
//! that has its answer knows the write is durable. If one write in a batch fails (a constraint
//! refused it), the batch is rolled back and every write retried in a transaction of its own, so
//! one bad write never takes its neighbours down with it.
//!
//! If the connection is lost (PostgreSQL restarted, or killed), the writer reconnects, with a
//! backoff, for as long as it takes, and writes the batch again: the writes wait in the queue
//! meanwhile, so what the event actors decided reaches storage in order once the database is
//! back. A connection lost during `COMMIT` leaves the batch in doubt; PostgreSQL is then asked
//! whether the batch's transaction committed (`txid_status`), so it is written exactly once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::Utc;
use sqlx::{AnyConnection, Connection};
use tokio::sync::{mpsc, oneshot};

use super::backend::{Backend, DatabaseUrl};
use super::changes::Changes;
use super::gateway::insert_ledger;
use super::lite::{Checkpointer, Lite};
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
    /// Stage `saga`: an inventory node's effect of one saga seat command, with the command's
    /// inbox row and the node's answer (PostgreSQL only).
    SagaSeats(Box<super::saga::SeatWrite>),
    /// Writes nothing: its answer means every write queued before it is committed.
    Barrier,
    /// Lines of the payment gateway's books, when the books share this writer
    /// ([`super::Store::start_thread_writer`]): on SQLite a second writer on the same file would
    /// take turns with this one for the database's write lock, each waiting in SQLite's busy
    /// handler (sleeps of 1 ms, then 2, 5, 10, ...) whenever the other holds it.
    Ledger(Vec<super::gateway::LedgerEntry>),
}

type Ack = oneshot::Sender<StoreResult<()>>;

/// Stage `services`: the shard lease under which an event actor decided a write. The fence
/// lets the write through only while this node still holds that shard at that very epoch, so
/// what an actor decided before its node lost the shard is refused even after the node has
/// taken the shard back at a newer epoch (and started a new actor, from what is stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub shard: u32,
    pub epoch: i64,
}

/// A write in the queue: what to write, under which lease, and who waits for it.
type Queued = (WriteOp, Option<Stamp>, Ack);

/// The writer's queue was full: the caller should shed load.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the database writer's queue is full")]
pub struct WriterFull(pub WriteOp);

/// Sends writes to the group-commit task; cheap to clone.
#[derive(Clone)]
pub struct WriteHandle {
    tx: mpsc::Sender<Queued>,
    stats: Arc<WriterStats>,
    stamp: Option<Stamp>,
}

/// A [`WriteHandle`] that does not keep the writer running: the writer stops once every
/// (strong) handle is dropped, as before.
#[derive(Clone)]
pub(super) struct WeakWriteHandle {
    tx: mpsc::WeakSender<Queued>,
    stats: Arc<WriterStats>,
}

impl WeakWriteHandle {
    /// A handle to the writer, unless it has stopped taking writes.
    pub(super) fn upgrade(&self) -> Option<WriteHandle> {
        Some(WriteHandle {
            tx: self.tx.upgrade()?,
            stats: Arc::clone(&self.stats),
            stamp: None,
        })
    }
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
    /// Times the writer lost its connection and opened a new one.
    pub reconnects: AtomicU64,
}

impl WriterStats {
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "batches": self.batches.load(Ordering::Relaxed),
            "writes": self.writes.load(Ordering::Relaxed),
            "fallbacks": self.fallbacks.load(Ordering::Relaxed),
            "unflushed": self.unflushed(),
            "reconnects": self.reconnects.load(Ordering::Relaxed),
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

    /// The same writer, for an actor that decides under `stamp`: each of its writes is
    /// refused unless this node still holds `stamp.shard` at `stamp.epoch` when it is written.
    pub fn stamped(&self, stamp: Stamp) -> Self {
        Self {
            stamp: Some(stamp),
            ..self.clone()
        }
    }

    /// This writer, without keeping it running.
    pub(super) fn downgrade(&self) -> WeakWriteHandle {
        WeakWriteHandle {
            tx: self.tx.downgrade(),
            stats: Arc::clone(&self.stats),
        }
    }

    /// Queues `op` without waiting for room; the receiver answers once it is committed.
    pub fn try_submit(
        &self,
        op: WriteOp,
    ) -> Result<oneshot::Receiver<StoreResult<()>>, WriterFull> {
        let (ack, done) = oneshot::channel();
        self.stats.queued();
        match self.tx.try_send((op, self.stamp, ack)) {
            Ok(()) => Ok(done),
            Err(mpsc::error::TrySendError::Full((op, _, _)))
            | Err(mpsc::error::TrySendError::Closed((op, _, _))) => {
                self.stats.answered();
                Err(WriterFull(op))
            }
        }
    }

    /// Takes room in the queue for one write without sending it yet, so a caller can decide
    /// now (the room is its own, nobody else can take it) and send a batch of writes at once
    /// later: one wake of the writer for the batch instead of one per write. The write counts
    /// as unflushed from now on. The receiver answers once the write is committed, or with an
    /// error if the [`Room`] is dropped unsent.
    pub fn try_reserve(&self) -> Option<(Room, oneshot::Receiver<StoreResult<()>>)> {
        let permit = self.tx.clone().try_reserve_owned().ok()?;
        let (ack, done) = oneshot::channel();
        self.stats.queued();
        let room = Room {
            permit: Some((permit, ack)),
            stamp: self.stamp,
            stats: Arc::clone(&self.stats),
        };
        Some((room, done))
    }

    /// Queues `op`, waiting for room, and waits until it is committed.
    pub async fn submit(&self, op: WriteOp) -> StoreResult<()> {
        let (ack, done) = oneshot::channel();
        self.stats.queued();
        if self.tx.send((op, self.stamp, ack)).await.is_err() {
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

/// Room in the writer's queue for one write, taken by [`WriteHandle::try_reserve`].
pub struct Room {
    permit: Option<(mpsc::OwnedPermit<Queued>, Ack)>,
    stamp: Option<Stamp>,
    stats: Arc<WriterStats>,
}

impl Room {
    /// Queues `op` in the room taken; never waits and never fails.
    pub fn send(mut self, op: WriteOp) {
        if let Some((permit, ack)) = self.permit.take() {
            permit.send((op, self.stamp, ack));
        }
    }
}

impl Drop for Room {
    /// Unsent: the write never reached the queue (its waiter's receiver errs).
    fn drop(&mut self) {
        if self.permit.take().is_some() {
            self.stats.answered();
        }
    }
}

/// Starts the writer task on `conn`, opened from `url` (and opened again from it if lost); it
/// stops when every handle is dropped, after draining the queue.
pub(super) fn start(
    conn: AnyConnection,
    url: DatabaseUrl,
    max_batch: usize,
    capacity: usize,
    fence: Option<Arc<ShardFence>>,
    changes: Changes,
) -> (WriteHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let stats = Arc::new(WriterStats::default());
    let link = Link {
        conn: Some(conn),
        url,
        stats: Arc::clone(&stats),
    };
    let told = Told {
        stats: Arc::clone(&stats),
        changes,
    };
    let task = tokio::spawn(run(link, rx, max_batch.max(1), told, fence));
    (
        WriteHandle {
            tx,
            stats,
            stamp: None,
        },
        task,
    )
}

/// Starts the SQLite writer: a thread of its own with its own connection ([`Lite`]), its
/// statements prepared once, taking from the queue whatever writes are waiting (up to
/// `max_batch`) and writing them in one transaction. Fails if the connection cannot be opened.
/// It stops when every handle is dropped, after draining the queue.
pub(super) async fn start_sqlite(
    path: std::path::PathBuf,
    durability: crate::config::Durability,
    busy_timeout_ms: u64,
    max_batch: usize,
    capacity: usize,
    changes: Changes,
) -> StoreResult<(WriteHandle, tokio::task::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let stats = Arc::new(WriterStats::default());
    let told = Told {
        stats: Arc::clone(&stats),
        changes,
    };
    let max_batch = max_batch.max(1);
    let (opened_tx, opened) = oneshot::channel();
    let (stopped_tx, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || {
            let checkpoints = match Checkpointer::start(path.clone(), durability, busy_timeout_ms) {
                Ok(started) => Some(started),
                Err(error) => {
                    tracing::warn!(%error, "no checkpointing thread; the writer checkpoints itself");
                    None
                }
            };
            let checkpointer = checkpoints.as_ref().map(|(c, _)| Arc::clone(c));
            let lite = match Lite::open(&path, durability, busy_timeout_ms, checkpointer) {
                Ok(lite) => lite,
                Err(error) => {
                    let _ = opened_tx.send(Err(error));
                    return;
                }
            };
            let _ = opened_tx.send(Ok(()));
            run_sqlite(&lite, rx, max_batch, &told);
            drop(lite);
            if let Some((checkpointer, thread)) = checkpoints {
                checkpointer.stop();
                let _ = thread.join();
            }
            let _ = stopped_tx.send(());
        })
        .map_err(|e| StoreError::Internal(format!("cannot start the SQLite writer: {e}")))?;
    match opened.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(StoreError::Unavailable(error.to_string())),
        Err(_) => return Err(StoreError::WriterClosed),
    }
    let task = tokio::spawn(async move {
        let _ = stopped.await;
    });
    Ok((
        WriteHandle {
            tx,
            stats,
            stamp: None,
        },
        task,
    ))
}

/// The SQLite writer's loop, on its own thread: waits for a write, takes every other write
/// already waiting (up to `max_batch`), commits them together.
fn run_sqlite(lite: &Lite, mut rx: mpsc::Receiver<Queued>, max_batch: usize, told: &Told) {
    let mut batch: Vec<Queued> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(_) => break,
            }
        }
        commit_sqlite(lite, &mut batch, told);
    }
}

/// One batch on SQLite: together, or (if that fails) each write in a transaction of its own.
fn commit_sqlite(lite: &Lite, batch: &mut Vec<Queued>, told: &Told) {
    let stats = told.stats.as_ref();
    let together = {
        let ops: Vec<&WriteOp> = batch.iter().map(|(op, _, _)| op).collect();
        lite.transaction(&ops)
    };
    match together {
        Ok(()) => {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .writes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            crate::meter::writer_batch(batch.len());
            for (op, _, ack) in batch.drain(..) {
                committed(&op, &told.changes);
                answer(stats, ack, Ok(()));
            }
        }
        Err(error) => {
            stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, writes = batch.len(), "group commit failed; retrying writes one by one");
            for (op, _, ack) in batch.drain(..) {
                let alone = lite.transaction(&[&op]);
                match &alone {
                    Ok(()) => {
                        crate::meter::writer_batch(1);
                        committed(&op, &told.changes);
                    }
                    Err(error) => tracing::error!(%error, ?op, "write refused"),
                }
                answer(stats, ack, alone.map_err(StoreError::from));
            }
        }
    }
}

/// Starts a writer that stores nothing and acknowledges every write as soon as it arrives, for
/// benchmarks and simulation: the caller pays for queueing and acknowledging a write exactly as
/// with [`super::Store::start_writer`], but no I/O. Must be called inside a tokio runtime; the
/// task stops when every handle is dropped.
pub fn start_acknowledging(
    max_batch: usize,
    capacity: usize,
) -> (WriteHandle, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Queued>(capacity.max(1));
    let max_batch = max_batch.max(1);
    let stats = Arc::new(WriterStats::default());
    let acknowledged = Arc::clone(&stats);
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(max_batch);
        while rx.recv_many(&mut batch, max_batch).await > 0 {
            for (_, _, ack) in batch.drain(..) {
                answer(&acknowledged, ack, Ok(()));
            }
        }
    });
    (
        WriteHandle {
            tx,
            stats,
            stamp: None,
        },
        task,
    )
}

/// What the writer reports to: its counters, and the availability streams.
struct Told {
    stats: Arc<WriterStats>,
    changes: Changes,
}

async fn run(
    mut link: Link,
    mut rx: mpsc::Receiver<Queued>,
    max_batch: usize,
    told: Told,
    fence: Option<Arc<ShardFence>>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        commit(&mut link, &mut batch, &told, fence.as_deref()).await;
    }
    if let Some(conn) = link.conn.take() {
        let _ = sqlx::Connection::close(conn).await;
    }
}

async fn commit(link: &mut Link, batch: &mut Vec<Queued>, told: &Told, fence: Option<&ShardFence>) {
    let stats = told.stats.as_ref();
    if let Some(delay) = fence.and_then(ShardFence::write_delay) {
        tokio::time::sleep(delay).await;
    }
    let together = {
        let ops: Vec<(&WriteOp, Option<Stamp>)> =
            batch.iter().map(|(op, stamp, _)| (op, *stamp)).collect();
        link.write(&ops, fence, false).await
    };
    match together {
        Ok(()) => {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .writes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            crate::meter::writer_batch(batch.len());
            for (op, _, ack) in batch.drain(..) {
                committed(&op, &told.changes);
                answer(stats, ack, Ok(()));
            }
        }
        Err(error) => {
            stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, writes = batch.len(), "group commit failed; retrying writes one by one");
            for (op, stamp, ack) in batch.drain(..) {
                let alone = link.write(&[(&op, stamp)], fence, true).await;
                match &alone {
                    Ok(()) => {
                        crate::meter::writer_batch(1);
                        committed(&op, &told.changes);
                    }
                    Err(error) => tracing::error!(%error, ?op, "write refused"),
                }
                answer(stats, ack, alone.map_err(StoreError::from));
            }
        }
    }
}

/// How far a transaction got before it failed.
enum Failed {
    /// Before `COMMIT` was sent: nothing was written.
    Before(sqlx::Error),
    /// `COMMIT` itself failed: written or not, PostgreSQL knows (`xid`, if it was read).
    AtCommit(sqlx::Error, Option<i64>),
}

/// The writer's connection, opened again when it is lost.
struct Link {
    conn: Option<AnyConnection>,
    url: DatabaseUrl,
    stats: Arc<WriterStats>,
}

impl Link {
    /// Writes `ops` in one transaction. A lost connection is not an answer: the link
    /// reconnects (as long as it takes) and writes them again, unless the lost `COMMIT` turns
    /// out to have committed. Returns the database's refusal, if it refused. `alone`: one
    /// write on its own, the fallback path ([`apply`] rather than [`apply_batch`]).
    async fn write(
        &mut self,
        ops: &[(&WriteOp, Option<Stamp>)],
        fence: Option<&ShardFence>,
        alone: bool,
    ) -> Result<(), sqlx::Error> {
        loop {
            let postgres = self.url.backend == Backend::Postgres;
            let conn = self.connected().await;
            let error = match transaction(conn, ops, fence, postgres, alone).await {
                Ok(()) => return Ok(()),
                Err(Failed::Before(e)) if postgres && connection_lost(&e) => e,
                Err(Failed::AtCommit(e, xid)) if postgres && connection_lost(&e) => {
                    self.lost(&e);
                    match xid {
                        Some(xid) if self.committed(xid).await => return Ok(()),
                        _ => continue,
                    }
                }
                Err(Failed::Before(e) | Failed::AtCommit(e, _)) => return Err(e),
            };
            self.lost(&error);
        }
    }

    fn lost(&mut self, error: &sqlx::Error) {
        tracing::warn!(%error, "the database writer lost its connection; reconnecting");
        self.conn = None;
    }

    /// The connection, opened again (with a backoff up to 1 s) if it was lost.
    async fn connected(&mut self) -> &mut AnyConnection {
        let mut pause = std::time::Duration::from_millis(50);
        while self.conn.is_none() {
            match self.url.connect().await {
                Ok(conn) => {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("the database writer reconnected");
                    self.conn = Some(conn);
                }
                Err(error) => {
                    tracing::debug!(%error, "the database writer cannot reconnect yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
            }
        }
        self.conn.as_mut().expect("connected above")
    }

    /// Whether the transaction `xid`, whose `COMMIT` got no answer, committed. Asked on a new
    /// connection until PostgreSQL answers; a transaction it does not know (lost in its crash
    /// recovery, `xid` "in the future") did not.
    async fn committed(&mut self, xid: i64) -> bool {
        loop {
            let conn = self.connected().await;
            let status: Result<Option<String>, sqlx::Error> =
                sqlx::query_scalar("SELECT CAST(txid_status($1) AS TEXT)")
                    .bind(xid)
                    .fetch_one(&mut *conn)
                    .await;
            match status {
                Ok(Some(s)) if s == "committed" => return true,
                Ok(Some(s)) if s == "in progress" => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                Ok(_) => return false,
                Err(e) if connection_lost(&e) => self.lost(&e),
                Err(error) => {
                    tracing::warn!(%error, xid, "transaction status unknown; taken as not committed");
                    return false;
                }
            }
        }
    }
}

/// One transaction: the fence's proof if any, the writes, `COMMIT`. On PostgreSQL it first
/// reads its transaction id, to ask after a `COMMIT` whose answer was lost.
async fn transaction(
    conn: &mut AnyConnection,
    ops: &[(&WriteOp, Option<Stamp>)],
    fence: Option<&ShardFence>,
    postgres: bool,
    alone: bool,
) -> Result<(), Failed> {
    let mut tx = conn.begin().await.map_err(Failed::Before)?;
    let xid = if postgres {
        let xid: i64 = sqlx::query_scalar("SELECT CAST(txid_current() AS BIGINT)")
            .fetch_one(&mut *tx)
            .await
            .map_err(Failed::Before)?;
        Some(xid)
    } else {
        None
    };
    let body = async {
        if let Some(fence) = fence {
            prove_epochs(&mut tx, fence, ops).await?;
        }
        let writes: Vec<&WriteOp> = ops.iter().map(|(op, _)| *op).collect();
        match writes[..] {
            [op] if alone => apply(&mut tx, op).await,
            _ => apply_batch(&mut tx, &writes).await,
        }
    }
    .await;
    body.map_err(Failed::Before)?;
    tx.commit().await.map_err(|e| Failed::AtCommit(e, xid))
}

/// The connection is gone (or the server is going down), as opposed to the database refusing
/// the statement: the writes must be tried again on a new connection.
fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        // not `Protocol`: the epoch fence refuses a write with it (`shards::not_owner`)
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        // SQLSTATE class 08 (connection exception) and 57P01-57P03 (shutdown, crash, cannot
        // connect now)
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
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
        WriteOp::SagaSeats(w) if w.moves_seats() => changes.changed(w.event),
        WriteOp::SagaSeats(_)
        | WriteOp::SettlePayment { .. }
        | WriteOp::Barrier
        | WriteOp::Ledger(_) => {}
    }
}

/// Stage `services`: before writing `ops`, proves in the same transaction that this node still
/// holds the shard of every event they touch, at the epoch each was decided under (its
/// [`Stamp`]) or, unstamped, at the epoch it holds now ([`ShardFence::check`]).
async fn prove_epochs(
    conn: &mut AnyConnection,
    fence: &ShardFence,
    ops: &[(&WriteOp, Option<Stamp>)],
) -> Result<(), sqlx::Error> {
    let mut stamped = Vec::new();
    let mut events = Vec::new();
    let mut orders = Vec::new();
    for (op, stamp) in ops {
        if let Some(stamp) = stamp {
            if !matches!(op, WriteOp::Barrier | WriteOp::Ledger(_)) {
                stamped.push(*stamp);
            }
            continue;
        }
        match op {
            WriteOp::Hold(order) => events.push(order.event),
            WriteOp::Cancel { event, .. } => events.push(*event),
            WriteOp::Confirm { order } | WriteOp::SettlePayment { order, .. } => {
                orders.push(*order)
            }
            WriteOp::SagaSeats(w) => events.push(w.event),
            WriteOp::Barrier | WriteOp::Ledger(_) => {}
        }
    }
    fence.check(conn, &stamped, &events, &orders).await
}

/// Applies a whole batch in a few multi-row statements: every hold inserted, every confirmation
/// made, then cancellations and late payment outcomes one by one, and last each event's
/// `available` moved once by its net change. The net change is what the event actor decided
/// in sequence, so it is valid; moving seats op by op in another order than the actor's could
/// cross `0 <= available <= total` on the way (a seat returned and taken again in one batch).
async fn apply_batch(conn: &mut AnyConnection, batch: &[&WriteOp]) -> Result<(), sqlx::Error> {
    let now = timestamp(Utc::now());
    let mut holds = Vec::new();
    let mut confirms = Vec::new();
    let mut cancelled = Vec::new();
    for op in batch {
        match op {
            WriteOp::Hold(order) => holds.push(order.as_ref()),
            WriteOp::Confirm { order } => confirms.push(*order),
            _ => {}
        }
    }
    sql::insert_orders(conn, &holds).await?;
    sql::confirm_orders(conn, &confirms, &now).await?;
    for op in batch {
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
            WriteOp::Ledger(lines) => insert_ledger(conn, lines).await?,
            // In decision order: each moves its own event's seats, valid in that order.
            WriteOp::SagaSeats(w) => super::saga::write_seats(conn, w).await?,
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
        WriteOp::Ledger(lines) => insert_ledger(conn, lines).await,
        WriteOp::SagaSeats(w) => super::saga::write_seats(conn, w).await,
        WriteOp::Barrier => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::domain::{Money, NewEvent, Order, TicketId, UserId};
    use crate::store::{Catalog, IdempotencyRecords, KeyState, OrderBook, OrderKey, Store};

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

    fn hold(event: EventId, seats: usize) -> (OrderId, WriteOp) {
        let order = OrderId(uuid::Uuid::new_v4());
        let op = WriteOp::Hold(Box::new(NewOrder {
            order,
            tickets: (0..seats).map(|_| TicketId(uuid::Uuid::new_v4())).collect(),
            event,
            user: "bob".into(),
            unit_price: Money::from_cents(100).unwrap(),
            idempotency: None,
            created_at: timestamp(Utc::now()),
        }));
        (order, op)
    }

    /// A batch with one write the database refuses is retried write by write: the refused one
    /// gets its error, its neighbours commit, and what they wrote is there after the database
    /// is opened again (acknowledged means durable). The batch is made certain by holding
    /// SQLite's write lock from another connection while the writes queue up.
    #[tokio::test]
    async fn a_refused_write_falls_back_alone_and_its_neighbours_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fallback.db");
        let path = path.to_str().unwrap();
        let store = Store::open(path, Durability::Full).await.unwrap();
        let event = store
            .create_event(&NewEvent {
                name: "Fallback".into(),
                venue: "Hall".into(),
                date: Utc::now(),
                total_tickets: 10,
                price: Money::from_cents(100).unwrap(),
            })
            .await
            .unwrap();
        let (writer, task) = store.start_thread_writer(64, 64).await.unwrap();

        let mut lock = store.pool.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *lock)
            .await
            .unwrap();
        // Blocks in the writer (busy) until the lock is released; the rest queue behind it.
        let first = writer.try_submit(WriteOp::Barrier).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (a, hold_a) = hold(event.id, 2);
        let (b, hold_b) = hold(event.id, 3);
        let ghost = OrderId(uuid::Uuid::new_v4());
        let a_done = writer.try_submit(hold_a).unwrap();
        let bad = writer
            .try_submit(WriteOp::Confirm { order: ghost })
            .unwrap();
        let b_done = writer.try_submit(hold_b).unwrap();
        let confirm_a = writer.try_submit(WriteOp::Confirm { order: a }).unwrap();
        sqlx::query("COMMIT").execute(&mut *lock).await.unwrap();
        drop(lock);

        first.await.unwrap().unwrap();
        a_done.await.unwrap().unwrap();
        let refused = bad.await.unwrap().unwrap_err();
        assert!(matches!(refused, StoreError::Conflict(_)), "{refused:?}");
        b_done.await.unwrap().unwrap();
        confirm_a.await.unwrap().unwrap();
        let stats = writer.stats().report();
        assert_eq!(stats["fallbacks"], 1, "{stats}");
        assert_eq!(stats["unflushed"], 0, "{stats}");
        drop(writer);
        task.await.unwrap();
        store.close().await;

        let store = Store::open(path, Durability::Full).await.unwrap();
        let a = store.order(a).await.unwrap().expect("a stored");
        let b = store.order(b).await.unwrap().expect("b stored");
        assert_eq!(
            (a.status, a.tickets.len()),
            (OrderStatus::Confirmed, 2),
            "{a:?}"
        );
        assert_eq!(
            (b.status, b.tickets.len()),
            (OrderStatus::Pending, 3),
            "{b:?}"
        );
        assert!(store.order(ghost).await.unwrap().is_none());
        let event = store.event(event.id).await.unwrap().unwrap();
        assert_eq!(event.available_tickets, 5);
        store.close().await;
    }

    /// Holds and cancellations of one event in one batch move `available` by their net: a
    /// seat taken, returned and taken again never crosses `0 <= available <= total`, and the
    /// cancelled order's payment is settled with it.
    #[tokio::test]
    async fn a_batch_moves_each_events_seats_by_its_net_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.db");
        let store = Store::open(path.to_str().unwrap(), Durability::Normal)
            .await
            .unwrap();
        let event = store
            .create_event(&NewEvent {
                name: "Net".into(),
                venue: "Hall".into(),
                date: Utc::now(),
                total_tickets: 2,
                price: Money::from_cents(100).unwrap(),
            })
            .await
            .unwrap();
        let (writer, task) = store.start_thread_writer(64, 64).await.unwrap();
        let (first, hold_first) = hold(event.id, 2);
        writer.submit(hold_first).await.unwrap();

        let mut lock = store.pool.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *lock)
            .await
            .unwrap();
        let barrier = writer.try_submit(WriteOp::Barrier).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let cancel = writer
            .try_submit(WriteOp::Cancel {
                order: first,
                event: event.id,
                reason: CancelReason::PaymentDeclined,
                payment: Some(PaymentStatus::Failed),
            })
            .unwrap();
        let (second, hold_second) = hold(event.id, 2);
        let again = writer.try_submit(hold_second).unwrap();
        sqlx::query("COMMIT").execute(&mut *lock).await.unwrap();
        drop(lock);
        barrier.await.unwrap().unwrap();
        cancel.await.unwrap().unwrap();
        again.await.unwrap().unwrap();
        assert_eq!(writer.stats().report()["fallbacks"], 0);

        let first = store.order(first).await.unwrap().unwrap();
        assert_eq!(first.status, OrderStatus::Cancelled);
        assert_eq!(first.cancel_reason.as_deref(), Some("payment_declined"));
        let second = store.order(second).await.unwrap().unwrap();
        assert_eq!(second.status, OrderStatus::Pending);
        let event = store.event(event.id).await.unwrap().unwrap();
        assert_eq!(event.available_tickets, 0);
        drop(writer);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_books_write_through_the_thread_writer_while_it_runs() {
        use crate::store::gateway::{GatewayBooks, LedgerEntry, LedgerKind};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("books.db");
        let store = Store::open(path.to_str().unwrap(), Durability::Normal)
            .await
            .unwrap();
        // the gateway's books have a pool of their own, as the server gives them
        let books = store.with_own_pool(2).await.unwrap();
        let line = |seq: i64| LedgerEntry {
            seq,
            key: format!("key-{seq}"),
            kind: LedgerKind::Charge,
            amount_cents: 100,
            charge_id: Some(uuid::Uuid::new_v4()),
            at: timestamp(Utc::now()),
        };
        let (writer, task) = store.start_thread_writer(64, 64).await.unwrap();
        books.write_books(&[line(1), line(2)]).await.unwrap();
        let stats = writer.stats().report();
        assert_eq!(
            stats["writes"], 1,
            "the lines went around the writer: {stats}"
        );
        assert_eq!(stats["batches"], 1, "{stats}");

        // once the writer has stopped, the books write on their own pool again
        drop(writer);
        task.await.unwrap();
        books.write_books(&[line(3)]).await.unwrap();
        assert_eq!(books.last_ledger_seq().await.unwrap(), 3);
        let page = books.ledger_page(0, 10).await.unwrap();
        let keys: Vec<&str> = page.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["key-1", "key-2", "key-3"]);
        assert!(page[0].charge_id.is_some());
    }
}
