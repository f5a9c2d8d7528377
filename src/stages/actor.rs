//! Stage `actor`: this project's answer. One [`EventActor`] per event owns its inventory and
//! serialises purchases in its mailbox; payments go to the payment actor pool; writes are
//! batched by the group-commit writer.
//!
//! A purchase runs as its own task, detached from the HTTP request: a client that hangs up
//! cannot strand a hold or a charge half-way. Holds are durable before the gateway is called,
//! and confirmations are durable before the client hears of them, so a restart finds every
//! acknowledged ticket, and every purchase it interrupted still `pending`, to be resolved by
//! asking the gateway again under the same payment key.
//!
//! Event actors are virtual, as in Orleans: none runs at start. An event's actor is activated
//! by the first purchase that needs it, rebuilt from what is stored (seats available, tickets
//! issued, tickets each user owns), and passivated once it has sat unused for
//! `Settings::actor_idle` with nothing under way, so start-up and memory cost what is in use,
//! not what is stored. Activation and passivation both run under one lock, and a purchase counts
//! itself on the actor under the registry's lock, so an event never has two actors, and an
//! actor with a purchase, a hold or a write of its own under way is never passivated.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_trait::async_trait;
use tokio::sync::oneshot;

use super::event_actor::{
    EventActor, Mailbox, MailboxGauge, Passivate, PaymentResult, ReadCounts, Reserve,
    ReserveRefusal, Settle, Settlement,
};
use super::{OrderRequest, PurchaseError, Stage, StageParts};
use crate::config::{cores, StageKind};
use chrono::Utc;

use crate::audit::Activity;
use crate::domain::{
    timestamp, CancelReason, Event, EventId, Money, NewEvent, Order, OrderId, OrderStatus,
    PaymentStatus, Ticket, TicketId, TicketStatus, UserId,
};
use crate::inventory::{Counts, Inventory, ReserveError};
use crate::payments::ChargeOutcome;
use crate::store::shards::{shard_of, ShardFence, ShardLease};
use crate::store::sql::payment_key;
use crate::store::{
    Catalog, OrderBook, OrderKey, Records, Stamp, StoreError, WriteHandle, WriteOp,
};

/// First pause before a payment whose outcome is unknown is asked about again; it doubles
/// up to [`SETTLE_RETRY_MAX`], for as long as the gateway does not answer.
const SETTLE_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const SETTLE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// How long an expired purchase waits for its cancellation to be stored, on a shard its node
/// still holds, before it leaves the refund to a task of its own that waits on
/// ([`Inner::cancelled_in_store`], [`Inner::refund_once_cancelled`]).
const CANCEL_SEEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// What storage says of an expired purchase's order ([`Inner::cancelled_in_store`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancellation {
    /// Stored `cancelled`: its charge is refunded.
    Stored,
    /// Settled by someone else, or theirs to settle: confirmed (by another run of the
    /// purchase), absent, or pending on a shard this node no longer holds. Nothing to refund.
    Elsewhere,
    /// Still pending on a shard this node holds, or not readable now: the cancellation is
    /// queued and not stored yet.
    Late,
}

/// One event's active actor, and what tells whether it may be passivated.
struct ActorSlot {
    /// actix's mailbox: `Passivate` and `ReadCounts`.
    addr: Addr<EventActor>,
    /// The purchase path: `Reserve` and `Settle`.
    mailbox: Mailbox,
    queued: MailboxGauge,
    /// The lease the actor decides under (inventory nodes), fixed at its activation.
    stamp: Option<Stamp>,
    /// Purchases using the actor, from taking it out of the registry until their payment is
    /// settled or handed over ([`InUse`]). Only ever raised under the registry's lock, and
    /// passivation checks it under the same lock held for writing: a purchase has either
    /// counted itself before passivation looks, or finds no actor and activates one.
    users: AtomicUsize,
    /// When the last use ended (or the actor was activated), in ms since the stage started.
    last_used: AtomicU64,
}

/// How to reach one event's active actor.
type EventHandle = Arc<ActorSlot>;

/// One purchase's use of an event's actor. Dropping it ends the use, and the actor's idle time
/// counts from then.
struct InUse {
    slot: EventHandle,
    clock: Instant,
}

impl InUse {
    fn mailbox(&self) -> &Mailbox {
        &self.slot.mailbox
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.slot
            .last_used
            .store(millis_since(self.clock), Ordering::Release);
        self.slot.users.fetch_sub(1, Ordering::AcqRel);
    }
}

fn millis_since(clock: Instant) -> u64 {
    clock.elapsed().as_millis() as u64
}

/// What an event's actor is rebuilt from when it activates.
struct Rebuilt {
    available: u32,
    issued: u64,
    owned: Vec<(String, u32)>,
}

pub struct ActorStage {
    inner: Arc<Inner>,
}

/// Seats held durably for a purchase.
struct Held {
    order: OrderId,
    tickets: Vec<TicketId>,
    amount: Money,
    payment_key: String,
    created_at: String,
}

struct Inner {
    parts: StageParts,
    writer: WriteHandle,
    /// Stage `services`: the shards this inventory node holds, which its writer proves in
    /// every transaction. `None` for the `actor` stage, which owns every event.
    fence: Option<Arc<ShardFence>>,
    /// Serialises activating and passivating actors (and an inventory node taking a shard),
    /// so an event never gets two, and an activation reads storage only after the actor it
    /// replaces has stopped with all its writes committed.
    spawning: tokio::sync::Mutex<()>,
    /// Event id to its active actor. A std `RwLock`: read on every purchase, written when an
    /// actor is activated or passivated, and never held across an `.await`.
    actors: RwLock<HashMap<EventId, EventHandle>>,
    /// What [`ActorSlot::last_used`] counts from.
    clock: Instant,
    activations: AtomicU64,
    passivations: AtomicU64,
    /// Threads hosting the event actors, so purchases of different events use every core.
    arbiters: Vec<Arbiter>,
    next_arbiter: AtomicUsize,
}

impl ActorStage {
    /// Starts the writer and the arbiters, resolves purchases a previous run left pending, and
    /// starts one actor per stored event.
    pub async fn start(parts: StageParts) -> Result<Self, StoreError> {
        let settings = &parts.settings;
        let (writer, _writer_task) = parts
            .store
            .start_writer(settings.max_batch, settings.mailbox_capacity.max(1024))
            .await?;
        let arbiter_count = match settings.arbiters {
            0 => cores(),
            n => n,
        };
        let inner = Inner::new(parts, writer, None, arbiter_count);
        inner.recover().await?;
        Ok(Self::with_passivation(inner))
    }

    /// The stage around `inner`, with the task that passivates idle actors; the task ends
    /// once the stage is dropped.
    fn with_passivation(inner: Inner) -> Self {
        let inner = Arc::new(inner);
        let every = (inner.parts.settings.actor_idle / 4)
            .clamp(Duration::from_millis(5), Duration::from_secs(10));
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        actix_rt::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.passivate_idle().await;
            }
        });
        Self { inner }
    }

    /// An inventory node of stage `services`: owns no event until its lease keeper hands it
    /// shards ([`Self::adopt`]); its writer proves `fence`'s epochs in every transaction.
    pub async fn start_sharded(
        parts: StageParts,
        fence: Arc<ShardFence>,
    ) -> Result<Self, StoreError> {
        let settings = &parts.settings;
        let (writer, _writer_task) = parts
            .store
            .start_fenced_writer(
                settings.max_batch,
                settings.mailbox_capacity.max(1024),
                Arc::clone(&fence),
            )
            .await?;
        let arbiter_count = match settings.arbiters {
            0 => cores(),
            n => n,
        };
        Ok(Self::with_passivation(Inner::new(
            parts,
            writer,
            Some(fence),
            arbiter_count,
        )))
    }

    /// Takes over `lease`'s shard: from now on this node's writes to it carry the lease's
    /// epoch, and the purchases a previous owner left pending in it are resolved, as after a
    /// crash. Its events' actors are activated by their first purchase, from what PostgreSQL
    /// holds then, stamped with this lease's epoch; none is started here, so taking a shard
    /// costs its pending purchases, not its events.
    pub async fn adopt(&self, lease: ShardLease) -> Result<(), StoreError> {
        let inner = &self.inner;
        let fence = inner
            .fence
            .as_ref()
            .ok_or_else(|| StoreError::Internal("adopt: not an inventory node".into()))?;
        let _one_at_a_time = inner.spawning.lock().await;
        fence.hold(lease);
        // An actor left from an earlier lease of this shard decides under an older epoch, and
        // every write of it would be refused: the next purchase activates a fresh one instead.
        inner
            .actors
            .write()
            .expect("actor registry poisoned")
            .retain(|event, slot| {
                shard_of(*event) != lease.shard
                    || slot.stamp.is_some_and(|s| s.epoch >= lease.epoch)
            });
        inner
            .recover_where(&|event: EventId| shard_of(event) == lease.shard)
            .await
    }

    /// Gives up `shard`: its actors stop taking purchases (they are answered "not owner"),
    /// and its writes are refused from now on (a purchase under way stays `pending` for the
    /// next owner to resolve).
    pub fn release(&self, shard: u32) {
        if let Some(fence) = &self.inner.fence {
            fence.drop_shard(shard);
        }
        self.inner
            .actors
            .write()
            .expect("actor registry poisoned")
            .retain(|event, _| shard_of(*event) != shard);
    }

    /// The settings this stage was started with.
    /// A v1 purchase under `order` when the caller chose its id (a `services` gateway, so that
    /// a retry names the same order), or a new one.
    pub async fn purchase_as(
        &self,
        order: Option<OrderId>,
        event: EventId,
        user: UserId,
    ) -> Result<Ticket, PurchaseError> {
        let inner = Arc::clone(&self.inner);
        // Detached: runs to the end even if the client disconnects.
        let task = actix_rt::spawn(async move { inner.purchase(order, event, user).await });
        task.await.unwrap_or(Err(PurchaseError::Overloaded))
    }

    pub fn settings(&self) -> &crate::config::Settings {
        &self.inner.parts.settings
    }

    /// The live counters of an event's actor, if it is active (for tests and stats).
    pub async fn counts(&self, event: EventId) -> Option<Counts> {
        let handle = self.inner.actor(event)?;
        handle.addr.send(ReadCounts).await.ok()
    }
}

impl Inner {
    fn new(
        parts: StageParts,
        writer: WriteHandle,
        fence: Option<Arc<ShardFence>>,
        arbiters: usize,
    ) -> Self {
        Self {
            writer,
            fence,
            spawning: tokio::sync::Mutex::new(()),
            actors: RwLock::new(HashMap::new()),
            clock: Instant::now(),
            activations: AtomicU64::new(0),
            passivations: AtomicU64::new(0),
            arbiters: (0..arbiters).map(|_| Arbiter::new()).collect(),
            next_arbiter: AtomicUsize::new(0),
            parts,
        }
    }

    fn actor(&self, event: EventId) -> Option<EventHandle> {
        self.actors
            .read()
            .expect("actor registry poisoned")
            .get(&event)
            .cloned()
    }

    /// The event's active actor, counted in use until the answer is dropped.
    fn take(&self, event: EventId) -> Option<InUse> {
        let actors = self.actors.read().expect("actor registry poisoned");
        let slot = actors.get(&event)?;
        // Under the registry's lock: see `ActorSlot::users`.
        slot.users.fetch_add(1, Ordering::AcqRel);
        Some(InUse {
            slot: Arc::clone(slot),
            clock: self.clock,
        })
    }

    /// The actor to buy from, activated from storage if the event has none active. On an
    /// inventory node, an event of a shard it does not hold is answered
    /// [`PurchaseError::NotOwner`].
    async fn actor_for_purchase(&self, event: EventId) -> Result<InUse, PurchaseError> {
        if let Some(using) = self.take(event) {
            return Ok(using);
        }
        let owner = |fence: &ShardFence| {
            let shard = shard_of(event);
            match fence.epoch(shard) {
                Some(_) => Ok(()),
                None => Err(PurchaseError::NotOwner { shard }),
            }
        };
        if let Some(fence) = &self.fence {
            owner(fence)?;
        }
        // The event's own row (what never changes) is read before taking the lock, so a
        // purchase of an event that does not exist never waits on it.
        let stored = self
            .parts
            .store
            .event(event)
            .await?
            .ok_or(PurchaseError::UnknownEvent)?;
        let _one_at_a_time = self.spawning.lock().await;
        if let Some(using) = self.take(event) {
            return Ok(using);
        }
        if let Some(fence) = &self.fence {
            owner(fence)?;
        }
        let rebuilt = self.rebuild(&stored).await?;
        self.spawn_actor(&stored, rebuilt)?;
        self.take(event).ok_or(PurchaseError::UnknownEvent)
    }

    /// An event's actor state as storage has it. Called with `spawning` held and no actor of
    /// the event active, so no write of the event is under way. Repairs a stored `available`
    /// that disagrees with the tickets (left by the monolith stage, say) first.
    async fn rebuild(&self, event: &Event) -> Result<Rebuilt, StoreError> {
        let store = &self.parts.store;
        let counts = store
            .stored_counts(event.id)
            .await?
            .ok_or_else(|| StoreError::Conflict("event vanished during activation".into()))?;
        let expected = (counts.total - counts.confirmed - counts.pending).max(0);
        if counts.available != expected {
            tracing::error!(
                event = %counts.event,
                stored = counts.available,
                expected,
                confirmed = counts.confirmed,
                total = counts.total,
                "stored availability disagrees with the tickets (left by the monolith stage?); repairing it"
            );
            store.write_available(counts.event, expected).await?;
        }
        Ok(Rebuilt {
            available: expected as u32,
            issued: (counts.confirmed + counts.pending + counts.cancelled) as u64,
            owned: store.owned_by_user(event.id).await?,
        })
    }

    /// Passivates every actor unused for `actor_idle` with no purchase under way, unless it
    /// still holds seats or has a write of its own uncommitted (it is kept, and tried again
    /// later).
    async fn passivate_idle(&self) {
        let idle_ms = self.parts.settings.actor_idle.as_millis() as u64;
        let idle = |slot: &ActorSlot, now: u64| {
            slot.users.load(Ordering::Acquire) == 0
                && now.saturating_sub(slot.last_used.load(Ordering::Acquire)) >= idle_ms
        };
        let now = millis_since(self.clock);
        let any = self
            .actors
            .read()
            .expect("actor registry poisoned")
            .values()
            .any(|slot| idle(slot, now));
        if !any {
            return;
        }
        let _one_at_a_time = self.spawning.lock().await;
        let now = millis_since(self.clock);
        let taken: Vec<(EventId, EventHandle)> = {
            let mut actors = self.actors.write().expect("actor registry poisoned");
            let events: Vec<EventId> = actors
                .iter()
                .filter(|(_, slot)| idle(slot, now))
                .map(|(event, _)| *event)
                .collect();
            events
                .into_iter()
                .filter_map(|event| actors.remove(&event).map(|slot| (event, slot)))
                .collect()
        };
        // Out of the registry, and no purchase holds them: nothing new reaches these actors,
        // and a purchase of their events waits on `spawning` until each has stopped or is back.
        let answers =
            futures::future::join_all(taken.iter().map(|(_, slot)| slot.addr.send(Passivate)))
                .await;
        let mut actors = self.actors.write().expect("actor registry poisoned");
        for ((event, slot), answer) in taken.into_iter().zip(answers) {
            match answer {
                Ok(true) => {
                    self.passivations.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%event, "passivated an idle event actor");
                }
                // Seats still held or a write uncommitted: it stays, unless its shard was
                // released meanwhile (an inventory node), which took it out for good.
                Ok(false) if self.still_owned(&slot) => {
                    actors.insert(event, slot);
                }
                Ok(false) => {}
                // Stopped already (shutdown).
                Err(_) => {}
            }
        }
    }

    /// Whether the lease `slot`'s actor decides under is still held (always, on the `actor`
    /// stage).
    fn still_owned(&self, slot: &ActorSlot) -> bool {
        match (&self.fence, slot.stamp) {
            (Some(fence), Some(stamp)) => fence.epoch(stamp.shard) == Some(stamp.epoch),
            (Some(_), None) => false,
            (None, _) => true,
        }
    }

    /// Whether `handle` is still `event`'s active actor.
    fn is_active(&self, event: EventId, handle: &EventHandle) -> bool {
        self.actor(event)
            .is_some_and(|active| Arc::ptr_eq(&active, handle))
    }

    /// The seed of the ids an event's actor mints: the run's seed, and on an inventory node
    /// the epoch it holds the event's shard at, so two owners of one shard never mint the same
    /// ids (an owner that lost its shard is stopped by the epoch fence, not by an id clash).
    fn id_seed(&self, stamp: Option<Stamp>) -> u64 {
        let seed = self.parts.settings.seed;
        match stamp {
            Some(stamp) => seed ^ (stamp.epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            None => seed,
        }
    }

    /// On an inventory node, the lease an event's new actor decides under: its writes are
    /// fenced at that epoch, whatever the node holds later.
    fn stamp(&self, event: EventId) -> Option<Stamp> {
        let shard = shard_of(event);
        let epoch = self.fence.as_ref()?.epoch(shard)?;
        Some(Stamp { shard, epoch })
    }

    /// Starts `event`'s actor from `state` and makes it the event's active one. Called with
    /// `spawning` held.
    fn spawn_actor(&self, event: &Event, state: Rebuilt) -> Result<(), StoreError> {
        let price = Money::from_cents(event.price_cents)
            .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", event.id)))?;
        let settings = &self.parts.settings;
        let hold_ttl_ms = settings.hold_ttl.as_millis() as u64;
        let mut inventory = Inventory::new(event.total_tickets, state.available, hold_ttl_ms);
        for (user, owned) in state.owned {
            if let Ok(user) = UserId::parse(&user) {
                inventory.count_owned(user, owned);
            }
        }
        let queued = MailboxGauge::default();
        let stamp = self.stamp(event.id);
        let writer = match stamp {
            Some(stamp) => self.writer.stamped(stamp),
            None => self.writer.clone(),
        };
        let actor = EventActor::new(
            event.id,
            price,
            inventory,
            writer,
            self.id_seed(stamp),
            state.issued,
            settings.hold_ttl,
            queued.clone(),
        );
        let capacity = settings.mailbox_capacity.max(1);
        let mailbox = actor.mailbox();
        let index = self.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        let addr = EventActor::start_in_arbiter(&self.arbiters[index].handle(), move |ctx| {
            ctx.set_mailbox_capacity(capacity);
            actor
        });
        let slot = ActorSlot {
            addr,
            mailbox,
            queued,
            stamp,
            users: AtomicUsize::new(0),
            last_used: AtomicU64::new(millis_since(self.clock)),
        };
        self.actors
            .write()
            .expect("actor registry poisoned")
            .insert(event.id, Arc::new(slot));
        self.activations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Resolves purchases a previous run left `pending`: the gateway is asked again under the
    /// same key (it deduplicates, so nothing is charged twice) and the answer settles the
    /// ticket. Only the pending purchases are read; each event's stored `available` is
    /// checked against its tickets when its actor activates ([`Self::rebuild`]).
    async fn recover(&self) -> Result<(), StoreError> {
        self.recover_where(&|_| true).await
    }

    /// [`Self::recover`] for the events `mine` accepts (an inventory node's shard).
    async fn recover_where(&self, mine: &dyn Fn(EventId) -> bool) -> Result<(), StoreError> {
        let mut pending = self.parts.store.pending_purchases().await?;
        pending.retain(|p| mine(p.event));
        if !pending.is_empty() {
            tracing::warn!(
                count = pending.len(),
                "resolving purchases interrupted by a restart"
            );
        }
        let resolutions = pending.into_iter().map(|p| async move {
            let gateway = &self.parts.payments;
            let unavailable =
                |e: crate::payments::GatewayUnavailable| StoreError::Unavailable(e.to_string());
            let outcome = gateway
                .charge(&p.payment_key, p.amount)
                .await
                .map_err(unavailable)?;
            let order = p.order;
            let op = match (outcome, p.order_cancelled) {
                (ChargeOutcome::Approved { .. }, false) => WriteOp::Confirm { order },
                (ChargeOutcome::Declined, false) => WriteOp::Cancel {
                    order,
                    event: p.event,
                    // What the buyer is told: the charge under its key was declined.
                    reason: CancelReason::PaymentDeclined,
                    payment: Some(PaymentStatus::Failed),
                },
                // The hold expired before the crash: a successful charge is refunded.
                (ChargeOutcome::Approved { .. }, true) => {
                    gateway.refund(&p.payment_key).await.map_err(unavailable)?;
                    WriteOp::SettlePayment {
                        order,
                        status: PaymentStatus::Refunded,
                    }
                }
                (ChargeOutcome::Declined, true) => WriteOp::SettlePayment {
                    order,
                    status: PaymentStatus::Failed,
                },
            };
            tracing::info!(%order, event = %p.event, ?outcome, "recovered purchase");
            self.writer.submit(op).await
        });
        for result in futures::future::join_all(resolutions).await {
            result?;
        }
        Ok(())
    }

    /// Holds seats through the event's actor and waits until the hold is durable.
    async fn reserve(
        &self,
        event: EventId,
        user: UserId,
        quantity: u32,
        per_user_limit: Option<u32>,
        idempotency: Option<OrderKey>,
        order: Option<OrderId>,
    ) -> Result<(InUse, Held), PurchaseError> {
        let using = self.actor_for_purchase(event).await?;
        if !using
            .slot
            .queued
            .try_admit(self.parts.settings.mailbox_capacity.max(1))
        {
            return Err(PurchaseError::Overloaded);
        }
        let (reply, answer) = oneshot::channel();
        let created_at = timestamp(Utc::now());
        // The gauge above is the bound. If the actor has stopped (shutdown), `reply` is
        // dropped and the answer below is an error.
        using.mailbox().reserve(Reserve {
            user,
            quantity,
            per_user_limit,
            idempotency,
            order,
            created_at: created_at.clone(),
            reply,
        });
        let grant = match answer.await.map_err(|_| PurchaseError::Overloaded)? {
            Ok(grant) => grant,
            Err(ReserveRefusal::WriterFull) => return Err(PurchaseError::Overloaded),
            Err(ReserveRefusal::Inventory(refusal)) => {
                return Err(match refusal {
                    ReserveError::AllHeld => PurchaseError::AllHeld,
                    ReserveError::NotEnough { available } => PurchaseError::NotEnough { available },
                    ReserveError::UserLimit { limit } => PurchaseError::UserLimit { limit },
                    ReserveError::SoldOut
                    | ReserveError::DuplicateHold
                    | ReserveError::ZeroQuantity => PurchaseError::SoldOut,
                })
            }
        };
        // The hold must be on disk before money moves, or a crash could leave a charge that
        // no record explains.
        grant
            .durable
            .await
            .map_err(|_| StoreError::WriterClosed)??;
        Ok((
            using,
            Held {
                payment_key: payment_key(grant.order),
                order: grant.order,
                tickets: grant.tickets,
                amount: grant.amount,
                created_at,
            },
        ))
    }

    /// Charges a durable hold and settles it: confirmed, released, or refunded if it expired.
    /// When the gateway does not answer, the outcome is unknown: the purchase fails with
    /// [`PurchaseError::Gateway`] and is settled later, in the background ([`Self::settle_later`]).
    async fn pay(
        self: &Arc<Self>,
        using: InUse,
        order: OrderId,
        key: String,
        amount: Money,
    ) -> Result<(), PurchaseError> {
        // In flight until the outcome is written, the refund of a late success included.
        let _in_flight = self.parts.payments.track();
        let settled = self
            .charge_and_settle(using.mailbox(), order, &key, amount)
            .await;
        if let Err(PurchaseError::Gateway(_)) = &settled {
            // The actor stays in use (not passivated) until the payment is settled.
            self.settle_later(using, order, key, amount);
        }
        settled
    }

    async fn charge_and_settle(
        self: &Arc<Self>,
        mailbox: &Mailbox,
        order: OrderId,
        key: &str,
        amount: Money,
    ) -> Result<(), PurchaseError> {
        let result = match self.parts.payments.charge(key, amount).await? {
            ChargeOutcome::Approved { .. } => PaymentResult::Approved,
            ChargeOutcome::Declined => PaymentResult::Declined,
        };
        let settlement = mailbox
            .settle(Settle { order, result })
            .await
            .map_err(|_| PurchaseError::Overloaded)?;
        match settlement {
            Settlement::Confirmed(durable) => Ok(durable.await?),
            Settlement::Released(durable) => {
                durable.await?;
                Err(PurchaseError::PaymentDeclined)
            }
            Settlement::Expired(durable) => {
                durable.await?;
                // Refunded only once the order is cancelled in storage. A hold that ran out on
                // the actor's timer was cancelled by a write nobody waited for; on an inventory
                // node that lost the shard meanwhile, that write was refused, and the order is
                // still pending for the shard's new owner, which charges the same key again
                // and confirms it: a refund here would leave a confirmed order refunded (I3).
                match self.cancelled_in_store(order).await? {
                    Cancellation::Stored => {}
                    Cancellation::Elsewhere => return Err(PurchaseError::OwnerChanged),
                    Cancellation::Late => {
                        // The database is away (or slow) longer than the wait: the refund
                        // waits on, in the background, for the cancellation to land.
                        self.refund_once_cancelled(order, key.to_owned());
                        return Err(PurchaseError::HoldExpired);
                    }
                }
                self.refund_and_record(order, key).await?;
                Err(PurchaseError::HoldExpired)
            }
        }
    }

    /// Refunds `key`'s charge and records the payment `refunded`: only for an order stored
    /// `cancelled` (both steps are idempotent).
    async fn refund_and_record(&self, order: OrderId, key: &str) -> Result<(), PurchaseError> {
        self.parts.payments.refund(key).await?;
        self.writer
            .submit(WriteOp::SettlePayment {
                order,
                status: PaymentStatus::Refunded,
            })
            .await?;
        Ok(())
    }

    /// What storage says of an expired purchase's `order`, once every write queued before
    /// this call is committed or refused (a barrier), asked again while the answer is
    /// [`Cancellation::Late`] for up to [`CANCEL_SEEN_WITHIN`] after the barrier. The
    /// cancellation may only be late: queued after the barrier (while the writer was full, or
    /// with the actor's next batch), or the database away. Errors only when the writer has
    /// stopped.
    async fn cancelled_in_store(&self, order: OrderId) -> Result<Cancellation, PurchaseError> {
        let mut give_up = None;
        loop {
            let seen = self.cancellation(order).await?;
            // counted from the first answer: a barrier held up by the database being away
            // is not the cancellation being late
            let give_up = *give_up.get_or_insert_with(|| Instant::now() + CANCEL_SEEN_WITHIN);
            if seen != Cancellation::Late || Instant::now() >= give_up {
                return Ok(seen);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One look at `order` in storage after a barrier ([`Self::cancelled_in_store`]). Pending
    /// on a shard this node no longer holds, the cancellation was refused and the new owner
    /// settles the order; pending on a shard it holds (always, on the `actor` stage), or
    /// unreadable (the database away), the cancellation is late.
    async fn cancellation(&self, order: OrderId) -> Result<Cancellation, PurchaseError> {
        match self.writer.submit(WriteOp::Barrier).await {
            Ok(()) => {}
            Err(StoreError::WriterClosed) => return Err(StoreError::WriterClosed.into()),
            Err(error) => {
                tracing::debug!(%order, %error, "a barrier failed; asking again");
                return Ok(Cancellation::Late);
            }
        }
        let stored = match self.parts.store.order(order).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Ok(Cancellation::Elsewhere),
            Err(error) => {
                tracing::debug!(%order, %error, "cannot read an expired order yet; asking again");
                return Ok(Cancellation::Late);
            }
        };
        Ok(match stored.status {
            OrderStatus::Cancelled => Cancellation::Stored,
            OrderStatus::Confirmed => Cancellation::Elsewhere,
            OrderStatus::Pending => {
                let ours = match &self.fence {
                    Some(fence) => fence.epoch(shard_of(stored.event_id)).is_some(),
                    None => true,
                };
                if ours {
                    Cancellation::Late
                } else {
                    Cancellation::Elsewhere
                }
            }
        })
    }

    /// An expired purchase whose cancellation was not stored within [`CANCEL_SEEN_WITHIN`]:
    /// its charge is refunded once the cancellation is stored, never before, by a task of its
    /// own that asks again (backing off) for as long as it takes. Counted in flight meanwhile,
    /// so the audit waits for it. It ends without a refund if the order turns out confirmed, or
    /// pending on a shard this node no longer holds (its new owner settles it); a refund the
    /// gateway does not answer is asked for again.
    fn refund_once_cancelled(self: &Arc<Self>, order: OrderId, key: String) {
        tracing::warn!(%order, "an expired purchase's cancellation is not stored yet; its refund waits for it");
        self.retry_in_flight(move |inner| {
            let key = key.clone();
            async move {
                match inner.cancellation(order).await {
                    Ok(Cancellation::Late) => return ControlFlow::Continue(()),
                    Ok(Cancellation::Stored) => {}
                    Ok(Cancellation::Elsewhere) => {
                        tracing::info!(%order, "an expired purchase was settled elsewhere: nothing to refund here");
                        return ControlFlow::Break(());
                    }
                    Err(error) => {
                        tracing::warn!(%order, %error, "gave up waiting for an expired purchase's cancellation; a restart resolves it");
                        return ControlFlow::Break(());
                    }
                }
                match inner.refund_and_record(order, &key).await {
                    Ok(()) => {
                        tracing::info!(%order, "an expired purchase's late cancellation is stored: refunded");
                    }
                    Err(PurchaseError::Gateway(_)) => return ControlFlow::Continue(()),
                    Err(error) => {
                        tracing::warn!(%order, %error, "could not record an expired purchase's refund; a restart or the shard's next owner resolves it");
                    }
                }
                ControlFlow::Break(())
            }
        });
    }

    /// The gateway did not answer `key`'s charge (or the refund after it): asks again under
    /// the same key, backing off, until it answers, then settles the order as [`Self::pay`]
    /// would have; a hold that ran out meanwhile has its seats back already, and a charge
    /// approved late is refunded. Every step is safe to repeat: the gateway answers a key
    /// once, an approval settled twice stays confirmed, and an order whose hold is gone
    /// settles as expired again, so only the (idempotent) refund is asked for again. Counted
    /// in flight meanwhile, so the audit waits for it. Given up when the settlement cannot be
    /// written (the shard moved, say: its new owner resolves the purchase from the database).
    fn settle_later(self: &Arc<Self>, using: InUse, order: OrderId, key: String, amount: Money) {
        self.retry_in_flight(move |inner| {
            let (mailbox, key) = (using.mailbox().clone(), key.clone());
            async move {
                match inner.charge_and_settle(&mailbox, order, &key, amount).await {
                    Err(PurchaseError::Gateway(_)) => return ControlFlow::Continue(()),
                    Ok(()) => {
                        tracing::info!(%order, "a payment unknown at first is settled: confirmed")
                    }
                    Err(
                        outcome @ (PurchaseError::PaymentDeclined | PurchaseError::HoldExpired),
                    ) => {
                        tracing::info!(%order, %outcome, "a payment unknown at first is settled")
                    }
                    Err(error) => {
                        tracing::warn!(%order, %error, "gave up settling a payment unknown at first; a restart or the shard's next owner resolves it")
                    }
                }
                ControlFlow::Break(())
            }
        });
    }

    /// Runs `attempt` on a task of its own, first after [`SETTLE_RETRY_FIRST`], then again,
    /// the pause doubling up to [`SETTLE_RETRY_MAX`], for as long as it answers `Continue`.
    /// Counted in flight until it ends, so the audit waits for it.
    fn retry_in_flight<F, Fut>(self: &Arc<Self>, mut attempt: F)
    where
        F: FnMut(Arc<Self>) -> Fut + 'static,
        Fut: std::future::Future<Output = ControlFlow<()>> + 'static,
    {
        let inner = Arc::clone(self);
        let counted = self.parts.payments.track();
        actix_rt::spawn(async move {
            let _counted = counted;
            let mut backoff = SETTLE_RETRY_FIRST;
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SETTLE_RETRY_MAX);
                if attempt(Arc::clone(&inner)).await.is_break() {
                    return;
                }
            }
        });
    }

    async fn purchase(
        self: &Arc<Self>,
        order: Option<OrderId>,
        event: EventId,
        user: UserId,
    ) -> Result<Ticket, PurchaseError> {
        let user_id = user.as_str().to_owned();
        let (using, grant) = self.reserve(event, user, 1, None, None, order).await?;
        self.pay(using, grant.order, grant.payment_key, grant.amount)
            .await?;
        // The confirmation is durable; the ticket is answered from what was written rather than
        // read back (one query less per purchase).
        let ticket = *grant
            .tickets
            .first()
            .ok_or_else(|| StoreError::Conflict("an order of one without its ticket".into()))?;
        Ok(Ticket {
            id: ticket,
            event_id: event,
            user_id,
            purchase_date: grant.created_at,
            price: grant.amount.major(),
            price_cents: grant.amount.cents(),
            status: TicketStatus::Confirmed,
            cancel_reason: None,
        })
    }
}

#[async_trait]
impl Stage for ActorStage {
    fn kind(&self) -> StageKind {
        StageKind::Actor
    }

    fn records(&self) -> &dyn Records {
        &self.inner.parts.store
    }

    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError> {
        let event = self.inner.parts.store.create_event(&new).await?;
        let owned = match &self.inner.fence {
            None => true,
            Some(fence) => fence.epoch(shard_of(event.id)).is_some(),
        };
        if owned {
            let _one_at_a_time = self.inner.spawning.lock().await;
            if self.inner.actor(event.id).is_none() {
                // A new event: nothing issued, nobody owns anything yet.
                let fresh = Rebuilt {
                    available: event.available_tickets,
                    issued: 0,
                    owned: Vec::new(),
                };
                self.inner.spawn_actor(&event, fresh)?;
            }
        }
        Ok(event)
    }

    #[tracing::instrument(skip(self), fields(stage = "actor"))]
    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        self.purchase_as(None, event, user).await
    }

    #[tracing::instrument(skip(self), fields(stage = "actor"))]
    async fn place_order(&self, request: OrderRequest) -> Result<Order, PurchaseError> {
        let inner = Arc::clone(&self.inner);
        let OrderRequest {
            event,
            user,
            quantity,
            per_user_limit,
            idempotency,
            order,
        } = request;
        let user_id = user.as_str().to_owned();
        // Detached, like a v1 purchase; the payment goes on after the 202.
        let task = actix_rt::spawn(async move {
            let (using, grant) = inner
                .reserve(
                    event,
                    user,
                    quantity,
                    Some(per_user_limit),
                    idempotency,
                    order,
                )
                .await?;
            let (order, key, amount) = (grant.order, grant.payment_key.clone(), grant.amount);
            actix_rt::spawn(async move {
                if let Err(error) = inner.pay(using, order, key, amount).await {
                    tracing::info!(%order, %error, "order not confirmed");
                }
            });
            Ok::<_, PurchaseError>(grant)
        });
        let grant = task.await.unwrap_or(Err(PurchaseError::Overloaded))?;
        Ok(Order {
            id: grant.order,
            event_id: event,
            user_id,
            quantity,
            amount_cents: grant.amount.cents(),
            status: OrderStatus::Pending,
            cancel_reason: None,
            tickets: grant.tickets,
            created_at: grant.created_at.clone(),
            updated_at: grant.created_at,
        })
    }

    async fn stats(&self) -> serde_json::Value {
        let mailboxes: serde_json::Map<String, serde_json::Value> = self
            .inner
            .actors
            .read()
            .expect("actor registry poisoned")
            .iter()
            .map(|(event, handle)| (event.to_string(), handle.queued.depth().into()))
            .collect();
        serde_json::json!({
            "stage": StageKind::Actor,
            "writer": self.inner.writer.stats().report(),
            "mailboxDepth": mailboxes,
            "actors": {
                "active": mailboxes.len(),
                "activations": self.inner.activations.load(Ordering::Relaxed),
                "passivations": self.inner.passivations.load(Ordering::Relaxed),
            },
        })
    }

    async fn activity(&self) -> Activity {
        let handles: Vec<(EventId, EventHandle)> = self
            .inner
            .actors
            .read()
            .expect("actor registry poisoned")
            .iter()
            .map(|(event, handle)| (*event, Arc::clone(handle)))
            .collect();
        let mut activity = Activity {
            unflushed_writes: self.inner.writer.stats().unflushed() as i64,
            ..Activity::default()
        };
        for (event, handle) in handles {
            match handle.addr.send(ReadCounts).await {
                Ok(counts) => activity.held_seats += i64::from(counts.held),
                // Passivated meanwhile, which it only is with no seat held.
                Err(_) if !self.inner.is_active(event, &handle) => {}
                Err(_) => activity.unreadable.push("an event actor".into()),
            }
        }
        activity
    }

    async fn shutdown(&self) {
        self.inner
            .actors
            .write()
            .expect("actor registry poisoned")
            .clear();
        for arbiter in &self.inner.arbiters {
            arbiter.stop();
        }
        if let Err(error) = self.inner.writer.flush().await {
            tracing::error!(%error, "could not flush the database writer at shutdown");
        }
    }
}
