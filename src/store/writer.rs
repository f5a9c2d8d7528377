//! Group commit: one task owns one connection and turns whatever writes are waiting into a
//! single transaction, so many purchases share one commit (and one fsync under
//! `synchronous=FULL`).
//!
//! Each write carries a oneshot that is answered only after its transaction committed: a caller
//! that has its answer knows the write is durable. If one write in a batch fails (a constraint
//! refused it), the batch is rolled back and every write retried in a transaction of its own, so
//! one bad write never takes its neighbours down with it.

use chrono::Utc;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{
    StoreError, StoreResult, CANCEL_TICKET, CONFIRM_TICKET, INSERT_PAYMENT, INSERT_TICKET,
    SETTLE_PAYMENT,
};
use crate::domain::{timestamp, CancelReason, EventId, Money, PaymentStatus, TicketId};

/// One durable step of a purchase.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A seat held: the ticket `pending`, its payment `pending`, `available` one lower.
    Hold {
        ticket: TicketId,
        event: EventId,
        user: String,
        price: Money,
        payment_key: String,
    },
    /// The payment succeeded in time: ticket `confirmed`, payment `completed`.
    Confirm { ticket: TicketId },
    /// The seat goes back: ticket `cancelled`, `available` one higher, and the payment settled
    /// as `payment` if its outcome is already known.
    Cancel {
        ticket: TicketId,
        event: EventId,
        reason: CancelReason,
        payment: Option<PaymentStatus>,
    },
    /// A payment's outcome arrived after its ticket was already cancelled.
    SettlePayment {
        ticket: TicketId,
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
}

impl WriteHandle {
    /// Queues `op` without waiting for room; the receiver answers once it is committed.
    pub fn try_submit(
        &self,
        op: WriteOp,
    ) -> Result<oneshot::Receiver<StoreResult<()>>, WriterFull> {
        let (ack, done) = oneshot::channel();
        match self.tx.try_send((op, ack)) {
            Ok(()) => Ok(done),
            Err(mpsc::error::TrySendError::Full((op, _)))
            | Err(mpsc::error::TrySendError::Closed((op, _))) => Err(WriterFull(op)),
        }
    }

    /// Queues `op`, waiting for room, and waits until it is committed.
    pub async fn submit(&self, op: WriteOp) -> StoreResult<()> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send((op, ack))
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        done.await.map_err(|_| StoreError::WriterClosed)?
    }

    /// Waits until every write queued before this call is committed.
    pub async fn flush(&self) -> StoreResult<()> {
        self.submit(WriteOp::Barrier).await
    }
}

/// Starts the writer task; it stops when every handle is dropped, after draining the queue.
pub(super) fn start(
    conn: SqliteConnection,
    max_batch: usize,
    capacity: usize,
) -> (WriteHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let task = tokio::spawn(run(conn, rx, max_batch.max(1)));
    (WriteHandle { tx }, task)
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
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(max_batch);
        while rx.recv_many(&mut batch, max_batch).await > 0 {
            for (_, ack) in batch.drain(..) {
                let _ = ack.send(Ok(()));
            }
        }
    });
    (WriteHandle { tx }, task)
}

async fn run(mut conn: SqliteConnection, mut rx: mpsc::Receiver<(WriteOp, Ack)>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        commit(&mut conn, &mut batch).await;
    }
    let _ = conn.close().await;
}

async fn commit(conn: &mut SqliteConnection, batch: &mut Vec<(WriteOp, Ack)>) {
    let together = async {
        let mut tx = conn.begin().await?;
        for (op, _) in batch.iter() {
            apply(&mut tx, op).await?;
        }
        tx.commit().await
    }
    .await;
    match together {
        Ok(()) => {
            for (_, ack) in batch.drain(..) {
                let _ = ack.send(Ok(()));
            }
        }
        Err(error) => {
            tracing::warn!(%error, writes = batch.len(), "group commit failed; retrying writes one by one");
            for (op, ack) in batch.drain(..) {
                let alone = async {
                    let mut tx = conn.begin().await?;
                    apply(&mut tx, &op).await?;
                    tx.commit().await?;
                    Ok(())
                }
                .await;
                if let Err(error) = &alone {
                    tracing::error!(%error, ?op, "write refused");
                }
                let _ = ack.send(alone);
            }
        }
    }
}

async fn apply(conn: &mut SqliteConnection, op: &WriteOp) -> Result<(), sqlx::Error> {
    let now = timestamp(Utc::now());
    match op {
        WriteOp::Hold {
            ticket,
            event,
            user,
            price,
            payment_key,
        } => {
            sqlx::query(INSERT_TICKET)
                .bind(ticket.0.to_string())
                .bind(event.0)
                .bind(user)
                .bind(&now)
                .bind(price.cents())
                .execute(&mut *conn)
                .await?;
            sqlx::query(INSERT_PAYMENT)
                .bind(Uuid::new_v4().to_string())
                .bind(ticket.0.to_string())
                .bind(user)
                .bind(price.cents())
                .bind(payment_key)
                .bind(&now)
                .execute(&mut *conn)
                .await?;
            expect_one(
                sqlx::query(
                    "UPDATE events SET available_tickets = available_tickets - 1 WHERE id = ?",
                )
                .bind(event.0)
                .execute(&mut *conn)
                .await?
                .rows_affected(),
                "event to hold a seat of",
            )
        }
        WriteOp::Confirm { ticket } => {
            expect_one(
                sqlx::query(CONFIRM_TICKET)
                    .bind(ticket.0.to_string())
                    .execute(&mut *conn)
                    .await?
                    .rows_affected(),
                "pending ticket to confirm",
            )?;
            settle(conn, *ticket, PaymentStatus::Completed, &now).await
        }
        WriteOp::Cancel {
            ticket,
            event,
            reason,
            payment,
        } => {
            expect_one(
                sqlx::query(CANCEL_TICKET)
                    .bind(reason.as_str())
                    .bind(ticket.0.to_string())
                    .execute(&mut *conn)
                    .await?
                    .rows_affected(),
                "pending ticket to cancel",
            )?;
            expect_one(
                sqlx::query(
                    "UPDATE events SET available_tickets = available_tickets + 1 WHERE id = ?",
                )
                .bind(event.0)
                .execute(&mut *conn)
                .await?
                .rows_affected(),
                "event to return a seat to",
            )?;
            match payment {
                Some(status) => settle(conn, *ticket, *status, &now).await,
                None => Ok(()),
            }
        }
        WriteOp::SettlePayment { ticket, status } => settle(conn, *ticket, *status, &now).await,
        WriteOp::Barrier => Ok(()),
    }
}

async fn settle(
    conn: &mut SqliteConnection,
    ticket: TicketId,
    status: PaymentStatus,
    now: &str,
) -> Result<(), sqlx::Error> {
    let affected = sqlx::query(SETTLE_PAYMENT)
        .bind(status.as_str())
        .bind(now)
        .bind(ticket.0.to_string())
        .execute(&mut *conn)
        .await?
        .rows_affected();
    expect_one(affected, "pending payment to settle")
}

fn expect_one(affected: u64, what: &str) -> Result<(), sqlx::Error> {
    if affected == 1 {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!(
            "expected one {what}, found {affected}"
        )))
    }
}
