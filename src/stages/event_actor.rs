//! The event actor: sole owner of one event's inventory. Its mailbox serialises every decision
//! about that event's seats, so no lock is needed anywhere.
//!
//! Every handler decides synchronously (the pure [`Inventory`] does the deciding), queues the
//! resulting write to the group-commit writer in the same step, and answers with a future that
//! only waits for durability and never touches the actor again. Nothing can interleave between
//! a decision and its write being queued, so the writer sees each event's writes in decision
//! order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::BoxFuture;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::sync::oneshot;

use crate::domain::{CancelReason, EventId, Money, OrderId, PaymentStatus, TicketId, UserId};
use crate::inventory::{Counts, HoldError, Inventory, Millis, ReserveError};
use crate::payments::fnv1a;
use crate::store::{NewOrder, OrderKey, StoreError, StoreResult, WriteHandle, WriteOp};

/// A future that resolves once a write is committed.
pub type Durable = BoxFuture<'static, StoreResult<()>>;

pub struct EventActor {
    event: EventId,
    price: Money,
    inventory: Inventory<OrderId, UserId>,
    writer: WriteHandle,
    /// Mints ticket ids; seeded so a replayed run gets the same ids (and payment outcomes).
    ids: StdRng,
    started: Instant,
    tick: Duration,
    /// Reservations sent but not yet handled; see [`MailboxGauge`].
    queued: MailboxGauge,
}

/// Counts `Reserve` messages waiting in one event actor's mailbox, and bounds them.
///
/// actix bounds a mailbox per *sender*: every clone of an `Addr` may park one message beyond
/// the capacity, and each purchase clones the `Addr`, so the mailbox bound alone would let the
/// queue grow without limit. Admission therefore counts for itself: an atomic, because senders
/// on every HTTP worker thread touch it and it is one integer with no invariant to share.
#[derive(Clone, Default)]
pub struct MailboxGauge(Arc<AtomicUsize>);

impl MailboxGauge {
    /// Takes a slot if fewer than `capacity` are taken.
    pub fn try_admit(&self, capacity: usize) -> bool {
        if self.0.fetch_add(1, Ordering::AcqRel) >= capacity {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives a slot back (the message was handled, or never sent).
    pub fn release(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }

    /// Reservations waiting now.
    pub fn depth(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl EventActor {
    /// `issued` is how many tickets the event already has in storage, so a restarted actor
    /// continues with fresh ids rather than repeating old ones.
    #[allow(clippy::too_many_arguments)] // each is distinct actor state; public for the benchmarks
    pub fn new(
        event: EventId,
        price: Money,
        inventory: Inventory<OrderId, UserId>,
        writer: WriteHandle,
        seed: u64,
        issued: u64,
        hold_ttl: Duration,
        queued: MailboxGauge,
    ) -> Self {
        let id_seed = seed ^ fnv1a(&event.0.to_le_bytes()) ^ issued.rotate_left(32);
        Self {
            event,
            price,
            inventory,
            writer,
            ids: StdRng::seed_from_u64(id_seed),
            started: Instant::now(),
            tick: (hold_ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)),
            queued,
        }
    }

    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    fn mint_id(&mut self) -> uuid::Uuid {
        uuid::Builder::from_random_bytes(self.ids.gen()).into_uuid()
    }

    fn expire_due(&mut self) {
        let now = self.now();
        for order in self.inventory.expire(now) {
            let op = WriteOp::Cancel {
                order,
                event: self.event,
                reason: CancelReason::HoldExpired,
                payment: None,
            };
            // Nobody waits on this write; a failure is logged by the writer, and a restart's
            // recovery resolves whatever it left pending.
            actix::spawn(durable(&self.writer, op));
        }
    }
}

impl Actor for EventActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.tick, |actor, _| actor.expire_due());
    }
}

/// Queues `op` at once if the writer has room, else waits for room in the returned future.
fn durable(writer: &WriteHandle, op: WriteOp) -> Durable {
    match writer.try_submit(op) {
        Ok(done) => Box::pin(async move { done.await.map_err(|_| StoreError::WriterClosed)? }),
        Err(full) => {
            let writer = writer.clone();
            Box::pin(async move { writer.submit(full.0).await })
        }
    }
}

/// Seats held for a buyer; `durable` answers once the hold is on disk.
pub struct HoldGrant {
    pub order: OrderId,
    pub tickets: Vec<TicketId>,
    pub amount: Money,
    pub durable: oneshot::Receiver<StoreResult<()>>,
}

/// Why the actor refused a reservation.
#[derive(Debug)]
pub enum ReserveRefusal {
    Inventory(ReserveError),
    /// The writer's queue is full; nothing was held.
    WriterFull,
}

/// Hold `quantity` seats for `user`. Admitted through the event's [`MailboxGauge`], so a full
/// mailbox is an immediate 503; the answer travels back on `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reserve {
    pub user: UserId,
    pub quantity: u32,
    /// API v2 caps what one user may hold or own; API v1 does not.
    pub per_user_limit: Option<u32>,
    pub idempotency: Option<OrderKey>,
    /// When the order was placed (RFC 3339), formatted by the sender so that the actor's
    /// thread, which every purchase of the event goes through, does not.
    pub created_at: String,
    pub reply: oneshot::Sender<Result<HoldGrant, ReserveRefusal>>,
}

impl Handler<Reserve> for EventActor {
    type Result = ();

    fn handle(&mut self, msg: Reserve, _: &mut Self::Context) {
        self.queued.release();
        let order = OrderId(self.mint_id());
        let now = self.now();
        let decided = self.inventory.reserve_within(
            order,
            msg.user.clone(),
            msg.quantity,
            msg.per_user_limit,
            now,
        );
        let answer = match decided {
            Err(refusal) => Err(ReserveRefusal::Inventory(refusal)),
            Ok(_) => {
                let tickets: Vec<TicketId> = (0..msg.quantity)
                    .map(|_| TicketId(self.mint_id()))
                    .collect();
                let hold = NewOrder {
                    order,
                    tickets: tickets.clone(),
                    event: self.event,
                    user: msg.user.as_str().to_owned(),
                    unit_price: self.price,
                    idempotency: msg.idempotency,
                    created_at: msg.created_at,
                };
                match self.writer.try_submit(WriteOp::Hold(Box::new(hold))) {
                    Ok(durable) => Ok(HoldGrant {
                        order,
                        tickets,
                        amount: self.price.times(msg.quantity),
                        durable,
                    }),
                    Err(_) => {
                        let _ = self.inventory.release(order);
                        Err(ReserveRefusal::WriterFull)
                    }
                }
            }
        };
        if let Err(Ok(grant)) = msg.reply.send(answer) {
            // The buyer went away before the answer: give the seats back once the hold is
            // written, so storage and memory agree.
            let _ = self.inventory.release(grant.order);
            let op = WriteOp::Cancel {
                order: grant.order,
                event: self.event,
                reason: CancelReason::Interrupted,
                payment: Some(PaymentStatus::Failed),
            };
            actix::spawn(durable(&self.writer, op));
        }
    }
}

/// What the payment gateway said about a held order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentResult {
    Approved,
    Declined,
}

/// What became of a held order once its payment result arrived.
pub enum Settlement {
    /// Confirmed; `durable` resolves once that is on disk.
    Confirmed(Durable),
    /// Declined: the seat is back and the ticket cancelled once `durable` resolves.
    Released(Durable),
    /// The hold had already run out; the seat went back. A successful charge must be refunded.
    Expired(Durable),
}

/// Settle a held order with its payment result. Sent with `send` (waits for room): a purchase
/// already under way must be finished, never shed.
#[derive(Message)]
#[rtype(result = "Settlement")]
pub struct Settle {
    pub order: OrderId,
    pub result: PaymentResult,
}

impl Handler<Settle> for EventActor {
    type Result = MessageResult<Settle>;

    fn handle(&mut self, msg: Settle, _: &mut Self::Context) -> Self::Result {
        let now = self.now();
        let order = msg.order;
        let cancel = |reason, payment| WriteOp::Cancel {
            order,
            event: self.event,
            reason,
            payment,
        };
        let settled = match msg.result {
            PaymentResult::Approved => match self.inventory.confirm(order, now) {
                Ok(_) => Settlement::Confirmed(durable(&self.writer, WriteOp::Confirm { order })),
                // Expired just now: cancel the ticket; the caller records the refund.
                Err(HoldError::Expired) => Settlement::Expired(durable(
                    &self.writer,
                    cancel(CancelReason::HoldExpired, None),
                )),
                // Expired earlier, already cancelled by `expire_due`.
                Err(HoldError::Unknown) => Settlement::Expired(Box::pin(async { Ok(()) })),
            },
            PaymentResult::Declined => match self.inventory.release(order) {
                Ok(_) => Settlement::Released(durable(
                    &self.writer,
                    cancel(CancelReason::PaymentDeclined, Some(PaymentStatus::Failed)),
                )),
                Err(_) => Settlement::Released(durable(
                    &self.writer,
                    WriteOp::SettlePayment {
                        order,
                        status: PaymentStatus::Failed,
                    },
                )),
            },
        };
        MessageResult(settled)
    }
}

/// Read the actor's counters.
#[derive(Message)]
#[rtype(result = "Counts")]
pub struct ReadCounts;

impl Handler<ReadCounts> for EventActor {
    type Result = MessageResult<ReadCounts>;

    fn handle(&mut self, _: ReadCounts, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.inventory.counts())
    }
}
