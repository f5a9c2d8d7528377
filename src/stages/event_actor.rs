//! The event actor: sole owner of one event's inventory. Its mailbox serialises every decision
//! about that event's seats, so no lock is needed anywhere.
//!
//! The actor is a thin shell around the pure [`EventCore`], which does every deciding: each
//! handler reads the clock, calls [`EventCore::step`], queues the resulting write to the
//! group-commit writer in the same step, and answers with a future that only waits for
//! durability and never touches the actor again. Nothing can interleave between a decision and
//! its write being queued, so the writer sees each event's writes in decision order.
//!
//! Batched per mailbox drain: a decision takes its room in the writer's queue at once (so a
//! full queue still refuses the purchase then), but the writes and the `Reserve` answers are
//! sent together once the mailbox is empty ([`EventActor::flush`]): one wake of the writer and
//! of each waiting thread per batch rather than per message, which is where the actor's thread
//! spent most of its time (see the README, "The actor core").

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::BoxFuture;
use tokio::sync::oneshot;

use crate::domain::{EventId, Money, OrderId, TicketId, UserId};
use crate::event_core::{EventCore, Input, Output, ReserveRequest};
pub use crate::event_core::{PaymentResult, Settled};
use crate::inventory::{Counts, Inventory, Millis, ReserveError};
use crate::store::{OrderKey, Room, StoreError, StoreResult, WriteHandle, WriteOp};

/// A future that resolves once a write is committed. Not boxed when the write had room in the
/// writer's queue (nearly always), so answering a `Settle` allocates no future.
pub enum Durable {
    /// Queued (or about to be, with this drain's batch): the writer's answer.
    Queued(oneshot::Receiver<StoreResult<()>>),
    /// The queue was full: waits for room, then for the commit.
    Waiting(BoxFuture<'static, StoreResult<()>>),
    /// Nothing to write.
    Done,
}

impl Future for Durable {
    type Output = StoreResult<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Queued(done) => Pin::new(done)
                .poll(cx)
                .map(|answer| answer.map_err(|_| StoreError::WriterClosed)?),
            Self::Waiting(written) => written.as_mut().poll(cx),
            Self::Done => Poll::Ready(Ok(())),
        }
    }
}

type ReserveAnswer = Result<HoldGrant, ReserveRefusal>;

pub struct EventActor {
    core: EventCore,
    writer: WriteHandle,
    started: Instant,
    tick: Duration,
    /// Reservations sent but not yet handled; see [`MailboxGauge`].
    queued: MailboxGauge,
    /// Writes this actor queued that nobody waits on (expired and abandoned holds), not yet
    /// committed. The actor does not passivate while any is, so whoever activates the event
    /// next reads storage with them in it.
    unsettled: Arc<AtomicUsize>,
    /// Writes decided in this mailbox drain, each with its room in the writer's queue taken,
    /// in decision order; sent by [`Self::flush`].
    writes: Vec<(Room, WriteOp)>,
    /// `Reserve` answers decided in this drain, sent by [`Self::flush`] after the writes.
    answers: Vec<(oneshot::Sender<ReserveAnswer>, ReserveAnswer)>,
    /// A flush is scheduled for the end of this drain.
    flushing: bool,
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
        crate::meter::mailbox(1.0);
        true
    }

    /// Gives a slot back (the message was handled, or never sent).
    pub fn release(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        crate::meter::mailbox(-1.0);
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
        Self {
            core: EventCore::new(event, price, inventory, seed, issued),
            writer,
            started: Instant::now(),
            tick: (hold_ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)),
            queued,
            unsettled: Arc::default(),
            writes: Vec::new(),
            answers: Vec::new(),
            flushing: false,
        }
    }

    /// Runs [`Self::flush`] once the mailbox is drained: actix polls the actor's spawned
    /// futures only after handling every message waiting.
    fn flush_later(&mut self, ctx: &mut Context<Self>) {
        if !self.flushing {
            self.flushing = true;
            ctx.spawn(actix::fut::ready(()).map(|(), actor: &mut Self, ctx| actor.flush(ctx)));
        }
    }

    /// Sends this drain's writes, in decision order, then its `Reserve` answers, so a buyer
    /// hears of a hold only once its write is queued.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        self.flushing = false;
        for (room, op) in self.writes.drain(..) {
            room.send(op);
        }
        let answers = std::mem::take(&mut self.answers);
        for (reply, answer) in answers {
            if let Err(Ok(grant)) = reply.send(answer) {
                // The buyer went away before the answer: give the seats back once the hold is
                // written, so storage and memory agree.
                if let Output::Returned { write: Some(op) } = self.step(Input::Abandon(grant.order))
                {
                    self.write_in_background(op, ctx);
                }
            }
        }
        // Any written just now (abandoned holds) go at once too.
        for (room, op) in self.writes.drain(..) {
            room.send(op);
        }
    }

    /// Takes room for `op` in the writer's queue and sends it with this drain's batch; the
    /// answer resolves once it is committed. `Err(op)` when the queue is full.
    fn queue(&mut self, op: WriteOp, ctx: &mut Context<Self>) -> Result<Durable, WriteOp> {
        let Some((room, done)) = self.writer.try_reserve() else {
            return Err(op);
        };
        self.writes.push((room, op));
        self.flush_later(ctx);
        Ok(Durable::Queued(done))
    }

    /// Queues `op` as [`Self::queue`] does or, if the queue is full, after what this drain
    /// already decided, waiting for room.
    fn queue_or_wait(&mut self, op: WriteOp, ctx: &mut Context<Self>) -> Durable {
        match self.queue(op, ctx) {
            Ok(durable) => durable,
            Err(op) => {
                for (room, op) in self.writes.drain(..) {
                    room.send(op);
                }
                durable(&self.writer, op)
            }
        }
    }

    /// Queues `op`, which nobody waits on, and counts it until it is committed.
    fn write_in_background(&mut self, op: WriteOp, ctx: &mut Context<Self>) {
        let written = self.queue_or_wait(op, ctx);
        let unsettled = Arc::clone(&self.unsettled);
        unsettled.fetch_add(1, Ordering::AcqRel);
        actix::spawn(async move {
            // A failure is logged by the writer; a restart's recovery (or the shard's next
            // owner) resolves whatever it left pending.
            let _ = written.await;
            unsettled.fetch_sub(1, Ordering::AcqRel);
        });
    }

    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    fn step(&mut self, input: Input) -> Output {
        let now = self.now();
        self.core.step(input, now)
    }

    fn expire_due(&mut self, ctx: &mut Context<Self>) {
        let Output::Expired(cancels) = self.step(Input::Expire) else {
            unreachable!("Expire is answered with Expired")
        };
        for op in cancels {
            self.write_in_background(op, ctx);
        }
    }
}

impl Actor for EventActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.tick, |actor, ctx| actor.expire_due(ctx));
    }

    /// Nothing decided is left unsent (actix polls no spawned future once stopping).
    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.flush(ctx);
    }
}

/// Queues `op` at once if the writer has room, else waits for room in the returned future.
fn durable(writer: &WriteHandle, op: WriteOp) -> Durable {
    match writer.try_submit(op) {
        Ok(done) => Durable::Queued(done),
        Err(full) => {
            let writer = writer.clone();
            Durable::Waiting(Box::pin(async move { writer.submit(full.0).await }))
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
    /// The order's id, when the caller chose it.
    pub order: Option<crate::domain::OrderId>,
    /// When the order was placed (RFC 3339), formatted by the sender so that the actor's
    /// thread, which every purchase of the event goes through, does not.
    pub created_at: String,
    pub reply: oneshot::Sender<Result<HoldGrant, ReserveRefusal>>,
}

impl Handler<Reserve> for EventActor {
    type Result = ();

    fn handle(&mut self, msg: Reserve, ctx: &mut Self::Context) {
        self.queued.release();
        let request = ReserveRequest {
            user: msg.user,
            quantity: msg.quantity,
            per_user_limit: msg.per_user_limit,
            idempotency: msg.idempotency,
            order: msg.order,
            created_at: msg.created_at,
        };
        let Output::Reserved(decided) = self.step(Input::Reserve(request)) else {
            unreachable!("Reserve is answered with Reserved")
        };
        let answer = match decided {
            Err(refusal) => Err(ReserveRefusal::Inventory(refusal)),
            Ok(granted) => match self.writer.try_reserve() {
                Some((room, durable)) => {
                    self.writes.push((room, granted.write));
                    Ok(HoldGrant {
                        order: granted.order,
                        tickets: granted.tickets,
                        amount: granted.amount,
                        durable,
                    })
                }
                None => {
                    self.step(Input::Withdraw(granted.order));
                    Err(ReserveRefusal::WriterFull)
                }
            },
        };
        // Answered with this drain's batch, after its hold's write is queued.
        self.answers.push((msg.reply, answer));
        self.flush_later(ctx);
    }
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

    fn handle(&mut self, msg: Settle, ctx: &mut Self::Context) -> Self::Result {
        let input = Input::Settle {
            order: msg.order,
            result: msg.result,
        };
        let Output::Settled { settled, write } = self.step(input) else {
            unreachable!("Settle is answered with Settled")
        };
        let written = match write {
            Some(op) => self.queue_or_wait(op, ctx),
            None => Durable::Done,
        };
        MessageResult(match settled {
            Settled::Confirmed => Settlement::Confirmed(written),
            Settled::Released => Settlement::Released(written),
            Settled::Expired => Settlement::Expired(written),
        })
    }
}

/// Read the actor's counters.
#[derive(Message)]
#[rtype(result = "Counts")]
pub struct ReadCounts;

impl Handler<ReadCounts> for EventActor {
    type Result = MessageResult<ReadCounts>;

    fn handle(&mut self, _: ReadCounts, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.core.counts())
    }
}

/// Stop, if nothing is left to decide: no seat held and no write of this actor's own still
/// uncommitted. Answers whether the actor stopped. The sender makes sure first that no purchase
/// is using the actor (see `stages::actor`), so nothing new can arrive after it.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Passivate;

impl Handler<Passivate> for EventActor {
    type Result = bool;

    fn handle(&mut self, _: Passivate, ctx: &mut Self::Context) -> bool {
        self.flush(ctx);
        if self.core.counts().held > 0 || self.unsettled.load(Ordering::Acquire) > 0 {
            return false;
        }
        ctx.stop();
        true
    }
}
