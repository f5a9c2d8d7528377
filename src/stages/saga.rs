//! Stage `saga` (the seed's step 4): every order is an orchestrated saga over an event-sourced
//! log in PostgreSQL, its effects leave through a transactional outbox, and the read models
//! every stage serves from (orders, tickets, payments, `events.available_tickets`) are
//! projections of the log written in the same transactions.
//!
//! The pieces, each a consumer of the outbox with an inbox of its own:
//! - the **orchestrator** ([`Inner::orchestrate`]): loads a saga (snapshot and tail), asks the
//!   pure [`crate::saga::decide`] what follows a reply, and appends the events, the commands
//!   and the projection in one transaction, guarded by the stream's version;
//! - the **inventory** participant ([`Inner::inventory`]): the inventory node of stage
//!   `services` owning the event's shard (found in `shard_leases`, as the gateway finds it:
//!   [`super::saga_seats::SeatClient`]), which applies `HoldSeats`, `ConfirmSeats` and
//!   `ReleaseSeats` once (its inbox, written by its epoch-fenced writer with the effect) and
//!   answers the outcome; the answer is recorded in the orchestrator's inbox in the
//!   transaction of the decision it causes. The seats and `events.available_tickets` are the
//!   node's: the projection here never writes them. `serve --stage saga` starts and keeps an
//!   inventory node unless one answers on the database already
//!   ([`crate::supervisor::SagaNode::inventory`]);
//! - the **payments** participant ([`Inner::payments`]): the payments node of stage
//!   `services` (`ticketflow node payments`, over HTTP: [`crate::payments::remote`]), which
//!   `serve --stage saga` starts and keeps as a child process unless one answers on the
//!   database already ([`crate::supervisor::SagaPayments`]), or the one `--payments-url`
//!   names. It is called under a key derived from the saga and its step, and the node's books
//!   answer a key once, so a redelivered `Charge` never charges twice; its answer is recorded
//!   in its inbox in the transaction of the decision it causes. A node that does not answer
//!   is asked again, never given up on (the hold's timer compensates meanwhile);
//! - the **relay** ([`Inner::relay`]): claims due messages with `FOR UPDATE SKIP LOCKED` and a
//!   lease, hands each to its consumer, and deletes it once handled. Timers (a hold's expiry)
//!   are messages due later. Several saga processes may share a database: claims are only
//!   ever leased (a stopped process's claims come back when their lease runs out, none is
//!   freed at start), and a process that queued messages wakes the others' relays with
//!   `NOTIFY saga_outbox` ([`Inner::announce`], [`Inner::listen`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify, Semaphore};
use uuid::Uuid;

use super::saga_seats::{SeatCall, SeatCallError, SeatClient};
use super::{OrderRequest, PurchaseError, Stage, StageParts, StartError};
use crate::audit::Activity;
use crate::config::{SagaStep, StageKind};
use crate::domain::{
    CancelReason, Event, EventId, NewEvent, Order, OrderId, OrderStatus, Ticket, TicketId,
    TicketStatus, UserId,
};
use crate::payments::{ChargeOutcome, GatewayUnavailable};
use crate::saga::projection::stored_time;
use crate::saga::{decide, place, Command, Outcome, Participant, Placed, Refusal, Reply, Saga};
use crate::store::saga::{OutboxMessage, StoredEvent};
use crate::store::{Catalog, Records, Store, StoreError, StoreResult};

/// A stream is snapshotted each time its version crosses a multiple of this.
pub const SNAPSHOT_EVERY: u64 = 4;
/// Most messages one claim takes.
const RELAY_BATCH: u32 = 64;
/// How long a claimed message is the claimer's before another relay may take it again.
const RELAY_LEASE_MS: i64 = 10_000;
/// How often an idle relay looks for due messages (timers, and notices missed while its
/// listener was reconnecting); work queued by this process wakes it at once, work queued by
/// another saga process on the database wakes it by `NOTIFY`.
const RELAY_IDLE_POLL: Duration = Duration::from_millis(100);
/// How often the announcer counts the relays listening on the database (a notice is sent
/// only when another one does).
const LISTENERS_EVERY: Duration = Duration::from_secs(1);
/// Pause before a lost listening session is opened again.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
/// Messages being handled at once (each holds a database connection only while it writes;
/// a charge waits for the gateway without one).
const HANDLERS_IN_FLIGHT: usize = 256;
/// First pause before a message whose handling failed is tried again; doubles per attempt.
const RETRY_FIRST_MS: i64 = 100;
const RETRY_MAX_MS: i64 = 2_000;
/// Deliveries of one message before it is given up on and moved to the dead letters (with
/// the backoff below, about half a minute of trying).
pub const MAX_ATTEMPTS: i32 = 20;
/// Times a decision is taken again after losing the race for its saga's next version.
const CONFLICT_RETRIES: usize = 16;
/// Connections of the consumers' own pool.
pub const SAGA_CONNECTIONS: u32 = 12;
/// The relay's own connection: its claims never queue behind the handlers it feeds.
const RELAY_CONNECTIONS: u32 = 1;
/// How often a request waiting on its saga reads the log in case a notice was missed.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// How long past the hold's expiry a v1 purchase waits for its saga to end before it answers
/// that the payment's outcome is not known yet.
const V1_GRACE: Duration = Duration::from_secs(10);

/// The exit code of a process stopped by `--saga-crash-after`.
pub const CRASH_EXIT_CODE: i32 = 86;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub struct SagaStage {
    inner: Arc<Inner>,
}

/// Relay figures for `GET /api/v2/admin/stats`. Atomics: every handler bumps them, and they
/// are independent counters with no invariant between them.
#[derive(Default)]
struct RelayStats {
    delivered: AtomicU64,
    redelivered: AtomicU64,
    failed: AtomicU64,
    lag_last_ms: AtomicI64,
    lag_max_ms: AtomicI64,
    lag_total_ms: AtomicI64,
    /// Outbox notices heard from other saga processes on the database.
    notices: AtomicU64,
}

struct Inner {
    parts: StageParts,
    /// The consumers' own pool, so they never queue behind the API's reads.
    store: Store,
    /// The relay's pool, for claims and retries.
    relay_store: Store,
    waiters: Waiters,
    /// Each unfinished saga's state as this process last committed it, so a decision needs
    /// no read of the log (see [`Inner::orchestrate`]).
    cache: SagaCache,
    /// Wakes the relay when this process queued a message.
    wake: Notify,
    /// Bounds the handlers running at once.
    handlers: Arc<Semaphore>,
    in_hand: AtomicI64,
    stats: RelayStats,
    stopping: watch::Sender<bool>,
    /// This process's name in its outbox notices, so that its listener skips its own.
    me: String,
    /// Wakes the announcer: this process queued messages another process's relay may take.
    queued: Notify,
    /// Whether this process's listener is connected (it then counts among the listeners).
    listening: AtomicBool,
    /// Calls the inventory node owning an event's shard.
    seats: SeatClient,
}

/// Requests waiting for their saga to reach a point, told after each commit on it. A std
/// `Mutex`: held only to find a sender, never across an `.await`.
#[derive(Default)]
struct Waiters(Mutex<HashMap<OrderId, watch::Sender<Option<Saga>>>>);

/// The last committed state of each unfinished saga of this process. A std `Mutex`: held
/// only for a lookup or an insert, never across an `.await`. A saga leaves once it has ended
/// (a late reply to it then reads the log), so the map holds the sagas in flight.
#[derive(Default)]
struct SagaCache(Mutex<HashMap<OrderId, Saga>>);

impl SagaCache {
    fn get(&self, order: OrderId) -> Option<Saga> {
        self.0
            .lock()
            .expect("saga cache poisoned")
            .get(&order)
            .cloned()
    }

    /// Keeps `saga` unless a later version is there already (commits can be told out of
    /// order); forgets it once it has ended.
    fn put(&self, order: OrderId, saga: &Saga) {
        let mut map = self.0.lock().expect("saga cache poisoned");
        if saga.is_final() {
            map.remove(&order);
        } else if map
            .get(&order)
            .is_none_or(|known| known.version < saga.version)
        {
            map.insert(order, saga.clone());
        }
    }
}

/// One request's watch on its saga; leaving, the last watcher removes the entry.
struct Watch<'a> {
    waiters: &'a Waiters,
    order: OrderId,
    rx: watch::Receiver<Option<Saga>>,
}

impl Waiters {
    fn watch(&self, order: OrderId) -> Watch<'_> {
        let mut map = self.0.lock().expect("saga waiters poisoned");
        let rx = map
            .entry(order)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Watch {
            waiters: self,
            order,
            rx,
        }
    }

    fn tell(&self, order: OrderId, saga: &Saga) {
        let map = self.0.lock().expect("saga waiters poisoned");
        if let Some(tx) = map.get(&order) {
            tx.send_replace(Some(saga.clone()));
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.0.lock().expect("saga waiters poisoned");
        if map
            .get(&self.order)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            map.remove(&self.order);
        }
    }
}

impl SagaStage {
    /// Opens the stage's pool, gives every event a row of seats, frees the claims a stopped
    /// run left, and starts the relay: sagas a stopped run left half-way go on from where the
    /// log says they are.
    pub async fn start(parts: StageParts) -> Result<Self, StartError> {
        parts.store.require_saga_postgres()?;
        let store = parts.store.with_own_pool(SAGA_CONNECTIONS).await?;
        let relay_store = parts.store.with_own_pool(RELAY_CONNECTIONS).await?;
        store.seed_saga_seats().await?;
        let store_for_seats = store.clone();
        let admin_token = parts.settings.admin_token.clone();
        // Claims are never freed here: another saga process on this database may hold them.
        // A stopped process's claims come back when their lease runs out.
        let (stopping, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            parts,
            store,
            relay_store,
            waiters: Waiters::default(),
            cache: SagaCache::default(),
            wake: Notify::new(),
            handlers: Arc::new(Semaphore::new(HANDLERS_IN_FLIGHT)),
            in_hand: AtomicI64::new(0),
            stats: RelayStats::default(),
            stopping,
            me: Uuid::new_v4().to_string(),
            queued: Notify::new(),
            listening: AtomicBool::new(false),
            seats: SeatClient::new(store_for_seats, admin_token),
        });
        let relay = Arc::clone(&inner);
        actix_rt::spawn(async move { relay.relay().await });
        let listener = Arc::clone(&inner);
        actix_rt::spawn(async move { listener.listen().await });
        let announcer = Arc::clone(&inner);
        actix_rt::spawn(async move { announcer.announce().await });
        Ok(Self { inner })
    }

    /// A stream's events, in order.
    pub async fn events_of(&self, order: OrderId) -> StoreResult<Vec<StoredEvent>> {
        self.inner.store.saga_events(order).await
    }
}

impl Inner {
    /// The failpoint: exits the process at once, as a crash would (no shutdown, no flush),
    /// right after `step` if the settings ask for it.
    fn crash_after(&self, step: SagaStep) {
        if self.parts.settings.saga_crash_after == Some(step) {
            tracing::error!(?step, "saga failpoint: exiting right after this step");
            std::process::exit(CRASH_EXIT_CODE);
        }
    }

    // ---------- the relay ----------

    async fn relay(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        let mut backoff = RETRY_FIRST_MS;
        loop {
            if *stopping.borrow() {
                return;
            }
            let room = self.handlers.available_permits().min(RELAY_BATCH as usize) as u32;
            let claimed = if room == 0 {
                Ok(Vec::new())
            } else {
                self.relay_store.claim_outbox(room, RELAY_LEASE_MS).await
            };
            let messages = match claimed {
                Ok(messages) => {
                    backoff = RETRY_FIRST_MS;
                    messages
                }
                Err(error) => {
                    tracing::warn!(%error, "saga relay: cannot claim from the outbox; trying again");
                    tokio::time::sleep(Duration::from_millis(backoff as u64)).await;
                    backoff = (backoff * 2).min(RETRY_MAX_MS);
                    continue;
                }
            };
            if messages.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(RELAY_IDLE_POLL) => {}
                    _ = stopping.changed() => {}
                }
                continue;
            }
            for message in messages {
                let Ok(permit) = Arc::clone(&self.handlers).acquire_owned().await else {
                    return;
                };
                let inner = Arc::clone(&self);
                self.in_hand.fetch_add(1, Ordering::AcqRel);
                actix_rt::spawn(async move {
                    inner.deliver(message).await;
                    inner.in_hand.fetch_sub(1, Ordering::AcqRel);
                    drop(permit);
                });
            }
        }
    }

    /// Hands one message to its consumer; deletes it once handled, or sets it to be tried
    /// again later.
    async fn deliver(&self, message: OutboxMessage) {
        let stats = &self.stats;
        stats.lag_last_ms.store(message.lag_ms, Ordering::Relaxed);
        stats
            .lag_max_ms
            .fetch_max(message.lag_ms, Ordering::Relaxed);
        stats
            .lag_total_ms
            .fetch_add(message.lag_ms.max(0), Ordering::Relaxed);
        if message.attempts > 1 {
            stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let handled = self.handle(&message).await;
        let settled = match handled {
            // Acknowledged in the consumer's transaction.
            Ok(()) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // A payments node that does not answer is never a reason to give up: the charge's
            // outcome is unknown until it answers (asked again under the same key), and the
            // hold's timer compensates meanwhile.
            Err(error) if message.attempts >= MAX_ATTEMPTS && !error.is_unanswered() => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, saga = %message.saga, destination = message.destination.as_str(), attempts = message.attempts, "saga relay: giving up on a message; moved to saga_dead_letters");
                self.relay_store
                    .dead_letter(message.id, &error.to_string())
                    .await
            }
            Err(error) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let after =
                    (RETRY_FIRST_MS << message.attempts.clamp(1, 8) as u32 >> 1).min(RETRY_MAX_MS);
                tracing::info!(%error, saga = %message.saga, destination = message.destination.as_str(), attempts = message.attempts, "saga relay: delivery failed; trying again");
                self.relay_store.retry_outbox(message.id, after).await
            }
        };
        if let Err(error) = settled {
            // The claim runs out and the message is delivered again; its consumer's inbox
            // recognises it.
            tracing::warn!(%error, saga = %message.saga, "saga relay: could not settle a delivered message");
        }
    }

    async fn handle(&self, message: &OutboxMessage) -> Result<(), HandleError> {
        let order = OrderId(
            Uuid::parse_str(&message.saga)
                .map_err(|_| HandleError::Corrupt(format!("saga id {}", message.saga)))?,
        );
        let delivery = Delivery {
            outbox_id: message.id,
            message_id: message.message_id.clone(),
        };
        match message.destination {
            Participant::Orchestrator => {
                let reply: Reply = serde_json::from_value(message.body.clone())
                    .map_err(|e| HandleError::Corrupt(e.to_string()))?;
                self.orchestrate(order, Some((Participant::Orchestrator, &delivery)), &reply)
                    .await?;
                Ok(())
            }
            Participant::Inventory | Participant::Payments => {
                let command: Command = serde_json::from_value(message.body.clone())
                    .map_err(|e| HandleError::Corrupt(e.to_string()))?;
                if message.destination == Participant::Inventory {
                    self.inventory(order, &delivery, &command).await
                } else {
                    self.payments(order, &delivery, &command).await
                }
            }
        }
    }

    // ---------- the orchestrator ----------

    /// Decides what follows `reply` in `order`'s saga and records it: the events, the
    /// commands and the projection in one transaction. `delivery` is the message that carried
    /// the reply and the consumer whose inbox records it (the orchestrator for a reply that
    /// came through the outbox, the payments participant for its own answer, recorded with
    /// the decision it causes); a redelivered message (seen in the inbox) or a reply that
    /// changes nothing records only its inbox entry. Returns the saga as it stands after.
    async fn orchestrate(
        &self,
        order: OrderId,
        delivery: Option<(Participant, &Delivery)>,
        reply: &Reply,
    ) -> Result<Saga, HandleError> {
        for attempt in 0..CONFLICT_RETRIES {
            let mut tx = self.store.begin_saga().await?;
            if let Some((consumer, delivery)) = delivery {
                if !tx
                    .first_delivery(consumer, &delivery.message_id, delivery.outbox_id, order)
                    .await?
                {
                    tx.commit().await?;
                    return Ok(self.store.load_saga(order).await?);
                }
            }
            // The cached state may be behind the log (another decision's commit not cached
            // yet): a decision taken on it collides on the stream's version and is taken
            // again on the log's state, and a reply it finds nothing to do with is looked at
            // again on the log's state too, so the cache never decides anything alone.
            let cached = if attempt == 0 {
                self.cache.get(order)
            } else {
                None
            };
            let from_cache = cached.is_some();
            let mut before = match cached {
                Some(saga) => saga,
                None => tx.load(order).await?,
            };
            let mut decision = decide(&before, reply, now_ms());
            if decision.events.is_empty() && from_cache {
                before = tx.load(order).await?;
                decision = decide(&before, reply, now_ms());
            }
            if decision.events.is_empty() {
                tx.commit().await?;
                return Ok(before);
            }
            let (after, kinds) = match self.carry_out(&mut tx, order, &before, decision).await {
                Ok(done) => done,
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            tx.project(&before, &after).await?;
            tx.commit().await?;
            self.recorded(order, &kinds, &after);
            return Ok(after);
        }
        Err(HandleError::Busy)
    }

    /// Appends `decision`'s events after `before` and writes its commands into the outbox,
    /// in the caller's transaction: the seat commands for the inventory node owning the
    /// event's shard, the charges and refunds for the payments node, the hold's timer for the
    /// orchestrator. Returns the saga after the events, and their kinds.
    async fn carry_out(
        &self,
        tx: &mut crate::store::saga::SagaTx,
        order: OrderId,
        before: &Saga,
        decision: crate::saga::Decision,
    ) -> StoreResult<(Saga, Vec<&'static str>)> {
        let after = tx
            .append(order, before, &decision.events, SNAPSHOT_EVERY)
            .await?;
        self.queue(tx, order, &decision.commands).await?;
        Ok((after, decision.events.iter().map(|e| e.kind()).collect()))
    }

    /// After a commit that appended events of `kinds` to `order`'s saga: the failpoints of
    /// those steps, then the waiters are told and the relay woken.
    fn recorded(&self, order: OrderId, kinds: &[&str], after: &Saga) {
        if kinds.contains(&"SeatsHeld") {
            self.crash_after(SagaStep::SeatsHeld);
        }
        if after.outcome == Some(Outcome::Confirmed) && kinds.contains(&"OrderConfirmed") {
            self.crash_after(SagaStep::Confirmed);
        }
        self.committed(order, after);
    }

    /// Writes `commands` into the outbox, in the caller's transaction.
    async fn queue(
        &self,
        tx: &mut crate::store::saga::SagaTx,
        order: OrderId,
        commands: &[Command],
    ) -> StoreResult<()> {
        for command in commands {
            match command {
                Command::StartHoldTimer { at_ms, .. } => {
                    let body = serde_json::to_value(Reply::HoldTimeout).unwrap_or_default();
                    tx.send(
                        order,
                        Participant::Orchestrator,
                        "HoldTimeout",
                        &body,
                        Some(*at_ms),
                    )
                    .await?
                }
                Command::CancelTimers { .. } => tx.cancel_timers(order).await?,
                other => {
                    let body = serde_json::to_value(other).unwrap_or_default();
                    tx.send(order, other.participant(), command_kind(other), &body, None)
                        .await?
                }
            }
        }
        Ok(())
    }

    /// After a commit on `order`'s saga: its waiters are told, the relays woken (this one,
    /// and the other processes' by a notice).
    fn committed(&self, order: OrderId, saga: &Saga) {
        self.cache.put(order, saga);
        self.waiters.tell(order, saga);
        self.wake.notify_one();
        self.queued.notify_one();
    }

    // ---------- waking the other processes' relays ----------

    /// Listens for the outbox notices of the other saga processes on this database and wakes
    /// this relay on each. The session is named [`OUTBOX_LISTENER_NAME`], by which the others
    /// count it; a lost session is opened again (the idle poll covers the gap).
    async fn listen(self: Arc<Self>) {
        use crate::store::saga::{OUTBOX_CHANNEL, OUTBOX_LISTENER_NAME};
        let mut stopping = self.stopping.subscribe();
        while !*stopping.borrow() {
            let connected = async {
                let options: sqlx::postgres::PgConnectOptions =
                    self.parts.settings.database.parse()?;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(options.application_name(OUTBOX_LISTENER_NAME))
                    .await?;
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
                listener.listen(OUTBOX_CHANNEL).await?;
                Ok::<_, sqlx::Error>((pool, listener))
            };
            let mut session = match connected.await {
                Ok((pool, listener)) => Session {
                    pool: Some(pool),
                    listener: Some(listener),
                },
                Err(error) => {
                    tracing::warn!(%error, "saga relay: cannot listen for other processes' outbox notices; polling meanwhile");
                    tokio::select! {
                        _ = tokio::time::sleep(LISTEN_RETRY) => {}
                        _ = stopping.changed() => {}
                    }
                    continue;
                }
            };
            self.listening.store(true, Ordering::Release);
            let Some(listener) = session.listener.as_mut() else {
                continue;
            };
            loop {
                tokio::select! {
                    notice = listener.try_recv() => match notice {
                        Ok(Some(notice)) => {
                            if notice.payload() != self.me {
                                self.stats.notices.fetch_add(1, Ordering::Relaxed);
                                self.wake.notify_one();
                            }
                        }
                        // The session was lost and opened again: a notice sent meanwhile
                        // is lost, so look now.
                        Ok(None) => self.wake.notify_one(),
                        Err(_) => break,
                    },
                    _ = stopping.changed() => break,
                }
            }
            self.listening.store(false, Ordering::Release);
            drop(session.listener.take());
            if let Some(pool) = session.pool.take() {
                pool.close().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(LISTEN_RETRY) => {}
                _ = stopping.changed() => {}
            }
        }
    }

    /// Sends an outbox notice after this process queued messages, when another saga process
    /// listens on the database. Notices coalesce: at most one is on its way at a time, so
    /// under load this costs one short statement per round trip, none with one process.
    async fn announce(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        let mut others = false;
        let mut counted: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = self.queued.notified() => {}
                _ = stopping.changed() => return,
            }
            if counted.is_none_or(|at| at.elapsed() >= LISTENERS_EVERY) {
                counted = Some(tokio::time::Instant::now());
                match self.store.outbox_listeners().await {
                    Ok(n) => {
                        let mine = i64::from(self.listening.load(Ordering::Acquire));
                        others = n > mine;
                    }
                    // Unknown: notify, which is always safe.
                    Err(_) => others = true,
                }
            }
            if others {
                if let Err(error) = self.store.notify_outbox(&self.me).await {
                    tracing::debug!(%error, "saga relay: could not send an outbox notice");
                }
            }
        }
    }

    // ---------- the participants ----------

    /// The inventory participant: the inventory node owning the event's shard, called with
    /// the message's id, under which its inbox applies the command once and answers a
    /// redelivery as it did the first time. Its answer is recorded in the orchestrator's inbox
    /// in the transaction of the decision it causes. A node that is not the owner (the shard
    /// moved), or does not answer, leaves the message to be delivered again.
    async fn inventory(
        &self,
        order: OrderId,
        delivery: &Delivery,
        command: &Command,
    ) -> Result<(), HandleError> {
        if self
            .store
            .inbox_has(Participant::Orchestrator, &delivery.message_id)
            .await?
        {
            self.store.ack_outbox(delivery.outbox_id).await?;
            return Ok(());
        }
        let event = match crate::saga::seats::event_of(command) {
            Some(event) => event,
            None => {
                let saga = match self.cache.get(order) {
                    Some(saga) => saga,
                    None => self.store.load_saga(order).await?,
                };
                saga.placed.as_ref().map(|p| p.event).ok_or_else(|| {
                    HandleError::Corrupt(format!("{command:?} for a saga never placed"))
                })?
            }
        };
        let call = SeatCall {
            message_id: delivery.message_id.clone(),
            order,
            event,
            command: command.clone(),
        };
        let reply = self.seats.call(&call).await?;
        self.orchestrate(order, Some((Participant::Orchestrator, delivery)), &reply)
            .await?;
        Ok(())
    }

    /// The payments participant: charges or refunds at the gateway under the saga's payment
    /// key (the gateway answers a key once, so a redelivery is the same charge), then records
    /// the message in its inbox and queues the answer in one transaction.
    async fn payments(
        &self,
        order: OrderId,
        delivery: &Delivery,
        command: &Command,
    ) -> Result<(), HandleError> {
        if self
            .store
            .inbox_has(Participant::Payments, &delivery.message_id)
            .await?
        {
            self.store.ack_outbox(delivery.outbox_id).await?;
            return Ok(());
        }
        let gateway = &self.parts.payments;
        // In flight from the call until the answer is queued.
        let _in_flight = gateway.track();
        let reply = match command {
            Command::Charge {
                payment_key,
                amount_cents,
                ..
            } => {
                self.crash_after(SagaStep::ChargeRelayed);
                let amount = crate::domain::Money::from_cents(*amount_cents)
                    .map_err(|e| HandleError::Corrupt(e.to_string()))?;
                match gateway.charge(payment_key, amount).await? {
                    ChargeOutcome::Approved { charge_id } => {
                        self.crash_after(SagaStep::Charged);
                        Reply::PaymentSucceeded {
                            charge_id: charge_id.to_string(),
                        }
                    }
                    ChargeOutcome::Declined => Reply::PaymentDeclined,
                }
            }
            Command::Refund { payment_key, .. } => {
                gateway.refund(payment_key).await?;
                Reply::Refunded
            }
            other => return Err(HandleError::Corrupt(format!("payments got {other:?}"))),
        };
        // The answer is recorded in the payments inbox in the transaction of the decision it
        // causes (both on this database), instead of a reply through the outbox.
        self.orchestrate(order, Some((Participant::Payments, delivery)), &reply)
            .await?;
        Ok(())
    }

    // ---------- placing and waiting ----------

    /// Starts a saga for `request` (or finds the one its Idempotency-Key started before) and
    /// waits until its seats are held or refused.
    async fn place(
        &self,
        request: PlaceRequest,
        watch: &mut Watch<'_>,
    ) -> Result<Saga, PurchaseError> {
        let event = self
            .parts
            .store
            .event(request.event)
            .await?
            .ok_or(PurchaseError::UnknownEvent)?;
        let order = request.order;
        let placed = Placed {
            order,
            event: event.id,
            user: request.user.as_str().to_owned(),
            quantity: request.quantity,
            unit_price_cents: event.price_cents,
            tickets: (0..request.quantity)
                .map(|_| TicketId(Uuid::new_v4()))
                .collect(),
            idempotency_key: request.idempotency_key,
            per_user_limit: request.per_user_limit,
            hold_ttl_ms: self.parts.settings.hold_ttl.as_millis() as u64,
            placed_at_ms: now_ms(),
        };
        let decision = place(placed);
        let mut tx = self.store.begin_saga().await?;
        let before = Saga::default();
        // `OrderPlaced`, and `HoldSeats` into the outbox for the event's inventory node.
        match self.carry_out(&mut tx, order, &before, decision).await {
            Ok((after, kinds)) => {
                tx.project(&before, &after).await?;
                tx.commit().await?;
                self.crash_after(SagaStep::Placed);
                self.recorded(order, &kinds, &after);
            }
            // Placed before under the same Idempotency-Key: that saga is the answer.
            Err(StoreError::Conflict(_)) => drop(tx),
            Err(e) => return Err(e.into()),
        }
        self.answer_placed(watch).await
    }

    /// The answer to a placing request, once its saga's seats are held or refused.
    async fn answer_placed(&self, watch: &mut Watch<'_>) -> Result<Saga, PurchaseError> {
        // Bounded: a request is answered even when the relay cannot make progress (the
        // database down); the saga goes on without it, under the same id.
        let limit = self.parts.settings.hold_ttl + V1_GRACE;
        self.wait(
            watch,
            |saga| saga.has_order() || saga.is_final(),
            Some((limit, "the saga's relay")),
        )
        .await
    }

    /// Waits until `order`'s saga satisfies `done`, or `limit`'s time passes: then the answer
    /// is [`PurchaseError::Unavailable`] naming what it waited for.
    async fn wait(
        &self,
        watch: &mut Watch<'_>,
        done: impl Fn(&Saga) -> bool,
        limit: Option<(Duration, &'static str)>,
    ) -> Result<Saga, PurchaseError> {
        let deadline = limit.map(|(l, _)| tokio::time::Instant::now() + l);
        let waiting_for = limit.map_or("the saga", |(_, what)| what);
        loop {
            if let Some(saga) = watch.rx.borrow_and_update().clone() {
                if done(&saga) {
                    return Ok(saga);
                }
            }
            let until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + WAIT_POLL);
            tokio::select! {
                changed = watch.rx.changed() => {
                    if changed.is_err() {
                        return Err(PurchaseError::Overloaded);
                    }
                }
                _ = tokio::time::sleep(WAIT_POLL) => {
                    let saga = self.store.load_saga(watch.order).await?;
                    if done(&saga) {
                        return Ok(saga);
                    }
                }
                _ = tokio::time::sleep_until(until), if deadline.is_some() => {
                    return Err(PurchaseError::Unavailable(waiting_for));
                }
            }
        }
    }
}

/// A relay's listening session. sqlx closes a listener by spawning a task, which needs a
/// Tokio runtime; dropped without one (the runtime's own teardown, with the task still
/// listening), the session is left to the process's end instead of panicking.
struct Session {
    pool: Option<sqlx::postgres::PgPool>,
    listener: Option<sqlx::postgres::PgListener>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_err() {
            std::mem::forget(self.listener.take());
            std::mem::forget(self.pool.take());
        }
    }
}

/// A message as its consumer receives it: its id (for the inbox) and its outbox row (deleted
/// in the consumer's own transaction, so a handled message is acknowledged exactly when its
/// effect commits).
#[derive(Debug, Clone)]
struct Delivery {
    outbox_id: i64,
    message_id: String,
}

/// What a request asks the saga for.
struct PlaceRequest {
    order: OrderId,
    event: EventId,
    user: UserId,
    quantity: u32,
    per_user_limit: Option<u32>,
    idempotency_key: Option<String>,
}

/// Why a message could not be handled now (it is delivered again later).
#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gateway(#[from] GatewayUnavailable),
    #[error(transparent)]
    Inventory(#[from] SeatCallError),
    #[error("the saga's next version kept being taken by other decisions")]
    Busy,
    #[error("a message that cannot be read: {0}")]
    Corrupt(String),
}

impl HandleError {
    /// The payments node did not answer (down, restarting, its books unwritable), or no
    /// inventory node owning the event's shard did (down, the shard moving, busy).
    fn is_unanswered(&self) -> bool {
        matches!(
            self,
            Self::Gateway(_) | Self::Inventory(SeatCallError::Unanswered { .. })
        )
    }
}

impl From<HandleError> for PurchaseError {
    fn from(e: HandleError) -> Self {
        match e {
            HandleError::Store(e) => Self::Store(e),
            HandleError::Gateway(e) => Self::Gateway(e),
            HandleError::Inventory(_) => Self::Unavailable("the event's inventory node"),
            HandleError::Busy => Self::Overloaded,
            HandleError::Corrupt(what) => Self::Store(StoreError::Corrupt(what)),
        }
    }
}

fn command_kind(command: &Command) -> &'static str {
    match command {
        Command::HoldSeats { .. } => "HoldSeats",
        Command::ReleaseSeats { .. } => "ReleaseSeats",
        Command::ConfirmSeats { .. } => "ConfirmSeats",
        Command::Charge { .. } => "Charge",
        Command::Refund { .. } => "Refund",
        Command::StartHoldTimer { .. } => "StartHoldTimer",
        Command::CancelTimers { .. } => "CancelTimers",
    }
}

/// The order an API v2 request with an Idempotency-Key makes: the same id for the same
/// (user, key), so a retry finds the saga the first request started, even after a crash
/// between placing it and storing the key's answer.
fn order_for_key(user: &UserId, key: &str) -> OrderId {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{}\u{0}{key}", user.as_str()).as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    OrderId(uuid::Builder::from_random_bytes(bytes).into_uuid())
}

fn refused(refusal: Refusal) -> PurchaseError {
    match refusal {
        Refusal::UnknownEvent => PurchaseError::UnknownEvent,
        Refusal::SoldOut => PurchaseError::SoldOut,
        Refusal::AllHeld => PurchaseError::AllHeld,
        Refusal::NotEnough { available } => PurchaseError::NotEnough { available },
        Refusal::UserLimit { limit } => PurchaseError::UserLimit { limit },
    }
}

/// The order as it stood when its seats were held (API v2's `202`).
fn order_of(saga: &Saga) -> Option<Order> {
    let placed = saga.placed.as_ref()?;
    let created_at = stored_time(placed.placed_at_ms);
    Some(Order {
        id: placed.order,
        event_id: placed.event,
        user_id: placed.user.clone(),
        quantity: placed.quantity,
        amount_cents: placed.amount_cents(),
        status: OrderStatus::Pending,
        cancel_reason: None,
        tickets: placed.tickets.clone(),
        created_at: created_at.clone(),
        updated_at: created_at,
    })
}

#[async_trait]
impl Stage for SagaStage {
    fn kind(&self) -> StageKind {
        StageKind::Saga
    }

    fn records(&self) -> &dyn Records {
        &self.inner.parts.store
    }

    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError> {
        let event = self.inner.parts.store.create_event(&new).await?;
        self.inner.store.seed_saga_seats().await?;
        Ok(event)
    }

    #[tracing::instrument(skip(self), fields(stage = "saga"))]
    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        let inner = Arc::clone(&self.inner);
        // Detached: the saga goes on even if the client hangs up.
        let task = actix_rt::spawn(async move {
            let order = OrderId(Uuid::new_v4());
            let mut watch = inner.waiters.watch(order);
            let held = inner
                .place(
                    PlaceRequest {
                        order,
                        event,
                        user,
                        quantity: 1,
                        per_user_limit: None,
                        idempotency_key: None,
                    },
                    &mut watch,
                )
                .await?;
            if let Some(Outcome::Rejected { refusal }) = held.outcome {
                return Err(refused(refusal));
            }
            let limit = inner.parts.settings.hold_ttl + V1_GRACE;
            let done = inner
                .wait(
                    &mut watch,
                    Saga::is_final,
                    Some((limit, "the payment gateway")),
                )
                .await?;
            let placed = done.placed.clone().ok_or(PurchaseError::UnknownEvent)?;
            match done.outcome {
                Some(Outcome::Confirmed) => Ok(Ticket {
                    id: placed.tickets[0],
                    event_id: placed.event,
                    user_id: placed.user.clone(),
                    purchase_date: stored_time(placed.placed_at_ms),
                    price: placed.unit_price_cents as f64 / 100.0,
                    price_cents: placed.unit_price_cents,
                    status: TicketStatus::Confirmed,
                    cancel_reason: None,
                }),
                Some(Outcome::Cancelled {
                    reason: CancelReason::HoldExpired,
                }) => Err(PurchaseError::HoldExpired),
                Some(Outcome::Cancelled { .. }) => Err(PurchaseError::PaymentDeclined),
                Some(Outcome::Rejected { refusal }) => Err(refused(refusal)),
                None => Err(PurchaseError::Unavailable("the payment gateway")),
            }
        });
        task.await.unwrap_or(Err(PurchaseError::Overloaded))
    }

    #[tracing::instrument(skip(self), fields(stage = "saga"))]
    async fn place_order(&self, request: OrderRequest) -> Result<Order, PurchaseError> {
        let inner = Arc::clone(&self.inner);
        let order = match (&request.order, &request.idempotency) {
            (Some(order), _) => *order,
            (None, Some(key)) => order_for_key(&request.user, &key.key),
            (None, None) => OrderId(Uuid::new_v4()),
        };
        let task = actix_rt::spawn(async move {
            let mut watch = inner.waiters.watch(order);
            let request = PlaceRequest {
                order,
                event: request.event,
                user: request.user,
                quantity: request.quantity,
                per_user_limit: Some(request.per_user_limit),
                idempotency_key: request.idempotency.map(|k| k.key),
            };
            let held = inner.place(request, &mut watch).await?;
            if let Some(Outcome::Rejected { refusal }) = held.outcome {
                return Err(refused(refusal));
            }
            order_of(&held).ok_or(PurchaseError::UnknownEvent)
        });
        task.await.unwrap_or(Err(PurchaseError::Overloaded))
    }

    async fn order_events(&self, order: OrderId) -> Option<StoreResult<Vec<StoredEvent>>> {
        Some(self.events_of(order).await)
    }

    async fn stats(&self) -> serde_json::Value {
        let stats = &self.inner.stats;
        let delivered = stats.delivered.load(Ordering::Relaxed);
        let outbox = match self.inner.store.outbox_depth().await {
            Ok(depth) => serde_json::to_value(depth).unwrap_or_default(),
            Err(error) => serde_json::json!({ "error": error.to_string() }),
        };
        serde_json::json!({
            "stage": StageKind::Saga,
            "outbox": outbox,
            "relay": {
                "delivered": delivered,
                "redelivered": stats.redelivered.load(Ordering::Relaxed),
                "notices": stats.notices.load(Ordering::Relaxed),
                "failed": stats.failed.load(Ordering::Relaxed),
                "inHand": self.inner.in_hand.load(Ordering::Relaxed),
                "lagMs": {
                    "last": stats.lag_last_ms.load(Ordering::Relaxed),
                    "max": stats.lag_max_ms.load(Ordering::Relaxed),
                    "mean": stats.lag_total_ms.load(Ordering::Relaxed) / (delivered.max(1) as i64),
                },
            },
        })
    }

    async fn activity(&self) -> Activity {
        let mut activity = Activity {
            jobs_running: self.inner.in_hand.load(Ordering::Relaxed),
            ..Activity::default()
        };
        match self.inner.store.outbox_depth().await {
            Ok(depth) => activity.jobs_queued = depth.due + depth.timers,
            Err(_) => activity.unreadable.push("the saga outbox".into()),
        }
        activity
    }

    async fn shutdown(&self) {
        self.inner.stopping.send_replace(true);
        self.inner.store.close().await;
        self.inner.relay_store.close().await;
    }
}
