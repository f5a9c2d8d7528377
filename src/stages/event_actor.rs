//! The event actor: sole owner of one event's inventory. Its mailbox serialises every decision
//! about that event's seats, so no lock is needed anywhere.
//!
//! The actor is a thin shell around the pure [`EventCore`], which does every deciding: each
//! handler reads the clock, calls [`EventCore::step`], queues the resulting write to the
//! group-commit writer in the same step, and answers with a future that only waits for
//! durability and never touches the actor again. Nothing can interleave between a decision and
//! its write being queued, so the writer sees each event's writes in decision order.
//!
//! A mailbox of its own for the purchase path: `Reserve` and `Settle` come through a tokio
//! channel ([`Mailbox`]) that an actor future ([`Drain`]) empties up to [`DRAIN_BATCH`] at a
//! time, so a purchase pays for no actix envelope (a box per message) and no actix `send`
//! oneshot. actix's own mailbox keeps the rare messages (`Passivate`, `ReadCounts`) and the
//! expiry timer.
//!
//! Batched per drain: a decision takes its room in the writer's queue at once (so a full queue
//! still refuses the purchase then), but the writes and the answers are sent together at the
//! end of the batch ([`EventActor::flush`]), writes first: one wake of the writer per batch
//! rather than per message, which is where the actor's thread spent most of its time (see the
//! README, "Benchmarks (criterion)").

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

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

/// Requests taken from the actor's own mailbox per batch, at most.
pub const DRAIN_BATCH: usize = 256;
/// Batches one poll of [`Drain`] decides at most before letting actix's mailbox and timer
/// have their turn.
const DRAIN_ROUNDS: usize = 4;

/// What comes through the actor's own mailbox.
enum Request {
    Reserve(Reserve),
    Settle(Settle, oneshot::Sender<Settlement>),
}

/// An answer decided in this batch, sent by [`EventActor::flush`] after the batch's writes.
enum Answer {
    Reserve(oneshot::Sender<ReserveAnswer>, ReserveAnswer),
    Settle(oneshot::Sender<Settlement>, Settlement),
}

/// The purchase path into one event actor: `Reserve` and `Settle`, through a channel the
/// actor drains in batches ([`Drain`]) rather than through actix's mailbox.
///
/// Unbounded by itself: `Reserve` is bounded by the event's [`MailboxGauge`], which admission
/// takes before [`Mailbox::reserve`], and every `Settle` settles a hold, so there are never
/// more of them than holds granted. Once the actor has stopped, a request is dropped and its
/// answer is an error.
#[derive(Clone)]
pub struct Mailbox(mpsc::UnboundedSender<Request>);

/// The actor has stopped (shutdown, or passivated): the request was not decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorGone;

impl Mailbox {
    /// Sends `msg`, already admitted through the gauge; its answer comes on `msg.reply`.
    pub fn reserve(&self, msg: Reserve) {
        // Stopped: `msg.reply` is dropped with it, which is the buyer's answer.
        let _ = self.0.send(Request::Reserve(msg));
    }

    /// Settles a held order. Never shed: a purchase already under way must be finished.
    pub fn settle(
        &self,
        msg: Settle,
    ) -> impl Future<Output = Result<Settlement, ActorGone>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let _ = self.0.send(Request::Settle(msg, reply));
        async move { answer.await.map_err(|_| ActorGone) }
    }
}

/// The actor future that empties the actor's own mailbox: up to [`DRAIN_BATCH`] requests at a
/// time, each decided in turn, then the batch flushed ([`EventActor::flush`]). It ends when
/// every [`Mailbox`] is gone.
struct Drain {
    inbox: mpsc::UnboundedReceiver<Request>,
    batch: Vec<Request>,
}

impl ActorFuture<EventActor> for Drain {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        actor: &mut EventActor,
        ctx: &mut Context<EventActor>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        let this = self.get_mut();
        for _ in 0..DRAIN_ROUNDS {
            match this
                .inbox
                .poll_recv_many(task, &mut this.batch, DRAIN_BATCH)
            {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(0) => return Poll::Ready(()),
                Poll::Ready(_) => {
                    for request in this.batch.drain(..) {
                        actor.decide(request, ctx);
                    }
                    actor.flush(ctx);
                }
            }
        }
        // More may be waiting: poll again after actix's mailbox and timer had their turn.
        task.waker().wake_by_ref();
        Poll::Pending
    }
}

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
    /// Writes decided in this batch, each with its room in the writer's queue taken, in
    /// decision order; sent by [`Self::flush`].
    writes: Vec<(Room, WriteOp)>,
    /// Answers decided in this batch, sent by [`Self::flush`] after the writes.
    answers: Vec<Answer>,
    /// A flush is scheduled for the end of actix's mailbox drain (writes queued outside a
    /// [`Drain`] batch: expiries).
    flushing: bool,
    /// The sending side of the actor's own mailbox, handed out by [`Self::mailbox`].
    mailbox: Mailbox,
    /// The receiving side, until [`Actor::started`] gives it to the [`Drain`].
    inbox: Option<mpsc::UnboundedReceiver<Request>>,
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
        let (mailbox, inbox) = mpsc::unbounded_channel();
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
            mailbox: Mailbox(mailbox),
            inbox: Some(inbox),
        }
    }

    /// The purchase path into this actor: `Reserve` and `Settle`.
    pub fn mailbox(&self) -> Mailbox {
        self.mailbox.clone()
    }

    /// Decides one request from the actor's own mailbox; its answer and write wait for the
    /// batch's [`Self::flush`].
    fn decide(&mut self, request: Request, ctx: &mut Context<Self>) {
        match request {
            Request::Reserve(msg) => {
                // Out of the mailbox: its gauge slot is free again.
                self.queued.release();
                let (request, reply) = msg.split();
                let answer = self.reserve(request);
                self.answers.push(Answer::Reserve(reply, answer));
            }
            Request::Settle(msg, reply) => {
                let settlement = self.settle(msg, ctx);
                self.answers.push(Answer::Settle(reply, settlement));
            }
        }
    }

    /// Decides a reservation and takes room for its write.
    fn reserve(&mut self, request: ReserveRequest) -> ReserveAnswer {
        let Output::Reserved(decided) = self.step(Input::Reserve(request)) else {
            unreachable!("Reserve is answered with Reserved")
        };
        match decided {
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
        }
    }

    /// Decides a payment's outcome and queues its write.
    fn settle(&mut self, msg: Settle, ctx: &mut Context<Self>) -> Settlement {
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
        match settled {
            Settled::Confirmed => Settlement::Confirmed(written),
            Settled::Released => Settlement::Released(written),
            Settled::Expired => Settlement::Expired(written),
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

    /// Sends this batch's writes, in decision order, then its answers, so a buyer hears of a
    /// hold only once its write is queued.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        self.flushing = false;
        for (room, op) in self.writes.drain(..) {
            room.send(op);
        }
        let mut answers = std::mem::take(&mut self.answers);
        for answer in answers.drain(..) {
            let gone = match answer {
                Answer::Reserve(reply, answer) => match reply.send(answer) {
                    Err(Ok(grant)) => Some(grant.order),
                    _ => None,
                },
                // A buyer gone before its settlement leaves the write to finish on its own.
                Answer::Settle(reply, settlement) => {
                    let _ = reply.send(settlement);
                    None
                }
            };
            if let Some(order) = gone {
                // The buyer went away before the answer: give the seats back once the hold is
                // written, so storage and memory agree.
                if let Output::Returned { write: Some(op) } = self.step(Input::Abandon(order)) {
                    self.write_in_background(op, ctx);
                }
            }
        }
        // Keep the allocation for the next batch.
        if self.answers.is_empty() {
            self.answers = answers;
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
        if let Some(inbox) = self.inbox.take() {
            ctx.spawn(Drain {
                inbox,
                batch: Vec::with_capacity(DRAIN_BATCH),
            });
        }
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

/// Hold `quantity` seats for `user`, sent with [`Mailbox::reserve`]. Admitted through the
/// event's [`MailboxGauge`], so a full mailbox is an immediate 503; the answer travels back on
/// `reply`.
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

impl Reserve {
    /// What the core decides on, and where its answer goes.
    fn split(self) -> (ReserveRequest, oneshot::Sender<ReserveAnswer>) {
        let request = ReserveRequest {
            user: self.user,
            quantity: self.quantity,
            per_user_limit: self.per_user_limit,
            idempotency: self.idempotency,
            order: self.order,
            created_at: self.created_at,
        };
        (request, self.reply)
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

/// Settle a held order with its payment result, sent with [`Mailbox::settle`].
pub struct Settle {
    pub order: OrderId,
    pub result: PaymentResult,
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
