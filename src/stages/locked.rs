//! Stage `locked`: the seed's step 2, on SQLite + Redis.
//!
//! A purchase takes the event's Redis lock ([`crate::lock`]), reads availability, writes the
//! reservation (seats taken, order, tickets and payment `pending`) in one SQLite transaction
//! whose inventory write carries the lock's fencing token, releases the lock, and queues a
//! payment job ([`crate::queue`]). The lock is never held across the payment. A worker charges
//! the order under its payment key, then confirms it, or gives its seats back (under the lock
//! again, fenced), each in one transaction. API v1 waits for the job's outcome; API v2 answers
//! as soon as the job is queued.
//!
//! The reservation reads availability outside its write transaction and writes back what it
//! computed, trusting the lock to make that safe, as the seed's step 2 does. The fencing token
//! is what makes the lock trustworthy: with fencing switched off
//! ([`crate::config::LockedSettings::fencing`]), a holder paused past its lease overwrites its
//! successor's write, and the last seat is sold twice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis::layers::retry::backoff::{ExponentialBackoffMaker, MakeBackoff};
use apalis::layers::retry::{HasherRng, RetryPolicy};
use apalis::prelude::*;
use async_trait::async_trait;
use chrono::Utc;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::json;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{OrderRequest, PurchaseError, Stage, StageParts, StartError};
use crate::audit::Activity;
use crate::cache::EventCache;
use crate::config::StageKind;
use crate::domain::{
    timestamp, CancelReason, Event, EventId, Money, NewEvent, Order, OrderId, OrderStatus,
    PaymentStatus, Ticket, TicketId, UserId,
};
use crate::lock::{EventLocks, Lease, LockError};
use crate::payments::{ChargeOutcome, RefundOutcome};
use crate::queue::{PaymentJob, PaymentQueue, MAX_ATTEMPTS, STALLED_AFTER};
use crate::store::fenced::{Availability, Fence};
use crate::store::{Catalog, NewOrder, OrderBook, OrderKey, Records, StoreError, StoreResult};

/// How often a reservation or a seat return retries after its write was refused as stale.
const STALE_RETRIES: usize = 3;
/// First and longest pause between two attempts of a payment job.
const JOB_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const JOB_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often finished payment jobs older than a day are deleted from Redis.
const VACUUM_EVERY: Duration = Duration::from_secs(600);
/// How often the supervisor reads the worker's last heartbeat.
const HEARTBEAT_CHECK_EVERY: Duration = Duration::from_millis(500);
/// How long one reading of an event's availability answers the buyers waiting for its lock.
const RECHECK_FRESH: Duration = Duration::from_millis(100);
const RECHECK_GIVE_UP: Duration = Duration::from_secs(1);

/// The latest availability read for buyers waiting on an event's lock.
struct Reading {
    at: Option<Instant>,
    available: i64,
    /// Since when one waiter has been reading the database; the others use the last reading.
    refreshing: Option<Instant>,
}

pub struct LockedStage {
    inner: Arc<Inner>,
}

/// What became of an order's payment job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Confirmed,
    Declined,
    /// The hold ran out before the payment succeeded: seats returned, any charge refunded.
    Expired,
    /// The job failed its last attempt; the order was cancelled (refunded if charged).
    GaveUp,
}

struct Inner {
    parts: StageParts,
    locks: EventLocks,
    cache: EventCache,
    queue: PaymentQueue,
    fencing: bool,
    /// API v1 purchases waiting for their job's outcome. A std `Mutex`: one insert or removal
    /// at a time, never held across an `.await`.
    waiters: Mutex<HashMap<OrderId, oneshot::Sender<Settled>>>,
    /// The running payment worker's task, so shutdown can stop it.
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set to freeze the running worker (the `freeze_worker_once` failpoint).
    freeze: Mutex<Option<Arc<AtomicBool>>>,
    /// Availability readings shared by the buyers waiting for each event's lock.
    seen: Mutex<HashMap<EventId, Reading>>,
    stopping: AtomicBool,
    /// Jobs being run right now by this process' worker.
    running_jobs: AtomicU64,
    /// Reservations that reached the pause failpoint.
    reads: AtomicUsize,
    crashed_once: AtomicBool,
    /// The `confirm_pause_once` failpoint fired.
    confirm_paused_once: AtomicBool,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    confirmed: AtomicU64,
    declined: AtomicU64,
    expired: AtomicU64,
    gave_up: AtomicU64,
    job_runs: AtomicU64,
    job_failures: AtomicU64,
    worker_restarts: AtomicU64,
    /// Replacements of a worker whose heartbeats stopped.
    worker_stalls: AtomicU64,
}

/// Why a payment job's run failed (it is retried, up to [`MAX_ATTEMPTS`]).
#[derive(Debug, thiserror::Error)]
enum SettleError {
    #[error("order {0} is not in the database")]
    UnknownOrder(OrderId),
    #[error("failpoint: attempt {0} fails after the charge")]
    Failpoint(usize),
    #[error("the seats could not be returned: the lock lease kept running out")]
    Stale,
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Gateway(#[from] crate::payments::GatewayUnavailable),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn lock_refusal(e: LockError) -> PurchaseError {
    match e {
        LockError::Timeout(_) => PurchaseError::Overloaded,
        LockError::Redis(error) => {
            tracing::warn!(%error, "Redis did not answer the lock request");
            PurchaseError::Unavailable("Redis")
        }
    }
}

impl LockedStage {
    /// Connects to Redis (failing at once if it does not answer), seeds the fence counters from
    /// the store, re-queues the payments a previous run left pending, and starts the worker.
    pub async fn start(parts: StageParts) -> Result<Self, StartError> {
        let settings = parts.settings.locked.clone();
        let redis_error = |cause: String| StartError::Redis {
            url: settings.redis_url.clone(),
            cause: format!("cannot reach Redis ({cause})"),
        };
        let client =
            redis::Client::open(settings.redis_url.as_str()).map_err(|e| StartError::Redis {
                url: settings.redis_url.clone(),
                cause: format!("not a Redis URL ({e}); write redis://HOST:PORT"),
            })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let mut conn: ConnectionManager = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| redis_error(e.to_string()))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(e.to_string()))?;

        let locks = EventLocks::new(
            conn.clone(),
            &settings.key_prefix,
            settings.lock_ttl,
            settings.lock_wait,
        );
        for (event, fence) in parts.store.fences().await? {
            locks
                .seed_fence(event, fence)
                .await
                .map_err(|e| redis_error(e.to_string()))?;
        }
        if !settings.fencing {
            tracing::warn!("fencing is OFF: a lock holder paused past its lease can double-sell (unsafe; for the Redlock lesson only)");
        }
        let inner = Arc::new(Inner {
            cache: EventCache::new(conn.clone(), &settings.key_prefix),
            queue: PaymentQueue::new(conn, &settings.key_prefix, settings.worker_concurrency),
            locks,
            fencing: settings.fencing,
            waiters: Mutex::new(HashMap::new()),
            worker: Mutex::new(None),
            freeze: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            running_jobs: AtomicU64::new(0),
            reads: AtomicUsize::new(0),
            crashed_once: AtomicBool::new(false),
            confirm_paused_once: AtomicBool::new(false),
            counters: Counters::default(),
            parts,
        });
        let queued = inner
            .requeue_pending(Duration::ZERO)
            .await
            .map_err(|e| redis_error(e.to_string()))?;
        if queued > 0 {
            tracing::warn!(queued, "re-queued payments a previous run left pending");
        }
        actix_rt::spawn(supervise(Arc::clone(&inner)));
        actix_rt::spawn(sweep(Arc::clone(&inner)));
        Ok(Self { inner })
    }
}

/// Keeps one payment worker running: a worker that stops (Redis went away), dies (a panic
/// mid-job) or stalls (its heartbeats stopped while its task lives on) is replaced under a new
/// name; the jobs it held go back on the queue once its heartbeats are overdue, and run again
/// under the same payment key.
async fn supervise(inner: Arc<Inner>) {
    let prefix = inner.parts.settings.locked.key_prefix.clone();
    let concurrency = inner.parts.settings.locked.worker_concurrency.max(1);
    while !inner.stopping.load(Ordering::Acquire) {
        let name = format!(
            "{prefix}-payments-{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let backoff = ExponentialBackoffMaker::new(
            JOB_BACKOFF_FIRST,
            JOB_BACKOFF_MAX,
            0.5,
            HasherRng::default(),
        )
        .expect("valid backoff bounds")
        .make_backoff();
        let worker = WorkerBuilder::new(name.as_str())
            .backend(
                inner
                    .queue
                    .storage()
                    .poll_with_interval(crate::queue::POLL_INTERVAL),
            )
            .data(Arc::clone(&inner))
            .retry(RetryPolicy::retries(MAX_ATTEMPTS - 1).with_backoff(backoff))
            .concurrency(concurrency)
            .build(run_job);
        let freeze = Arc::new(AtomicBool::new(false));
        *inner.freeze.lock().expect("freeze slot poisoned") = Some(Arc::clone(&freeze));
        let mut run = Box::pin(worker.run());
        // The failpoint `freeze_worker_once` stops polling the worker, jobs and heartbeats
        // with it: what a worker that deadlocks inside the queue library looks like.
        let run = std::future::poll_fn(move |cx| {
            if freeze.load(Ordering::Acquire) {
                return std::task::Poll::Pending;
            }
            run.as_mut().poll(cx)
        });
        let task = tokio::spawn(async move {
            if let Err(error) = run.await {
                tracing::warn!(%error, "the payment worker stopped");
            }
        });
        let abort = task.abort_handle();
        *inner.worker.lock().expect("worker slot poisoned") = Some(task);
        let started = Instant::now();
        let mut last_check = Instant::now();
        // Wait for the worker to end (stopped, failed or panicked) or stall, without holding
        // the slot.
        let stalled = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if abort.is_finished() || inner.stopping.load(Ordering::Acquire) {
                break false;
            }
            if last_check.elapsed() < HEARTBEAT_CHECK_EVERY {
                continue;
            }
            last_check = Instant::now();
            match inner.queue.heartbeat_age(&name).await {
                Ok(Some(age)) if age > STALLED_AFTER => break true,
                Ok(None) if started.elapsed() > STALLED_AFTER => break true,
                Ok(_) => {}
                // Redis is away: the worker will fail on it too and end; nothing to judge.
                Err(error) => tracing::debug!(%error, "could not read the worker's heartbeat"),
            }
        };
        if inner.stopping.load(Ordering::Acquire) {
            break;
        }
        inner
            .counters
            .worker_restarts
            .fetch_add(1, Ordering::Relaxed);
        if stalled {
            abort.abort();
            inner.counters.worker_stalls.fetch_add(1, Ordering::Relaxed);
            tracing::error!(worker = %name, after = ?STALLED_AFTER, "the payment worker stopped sending heartbeats; replacing it (its jobs go back on the queue)");
        } else {
            tracing::warn!(worker = %name, "the payment worker ended; starting another");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every hold TTL, queues again the payment of orders pending for longer than a hold: their
/// job was never queued (Redis refused it, and the seats could not be returned either), or is
/// gone. The job expires the hold (refunding whatever its key charged). Cancelled orders whose
/// payment is still pending (a refund never asked for) are queued again too.
async fn sweep(inner: Arc<Inner>) {
    let every = inner.parts.settings.hold_ttl.max(Duration::from_secs(1));
    let mut last_vacuum = Instant::now();
    while !inner.stopping.load(Ordering::Acquire) {
        tokio::time::sleep(every).await;
        match inner.requeue_pending(inner.parts.settings.hold_ttl).await {
            Ok(0) => {}
            Ok(queued) => tracing::warn!(queued, "re-queued payments of holds past their TTL"),
            Err(error) => tracing::warn!(%error, "could not sweep holds past their TTL"),
        }
        // The vacuum scans every job Redis holds (one Lua call), so not too often.
        if last_vacuum.elapsed() >= VACUUM_EVERY {
            last_vacuum = Instant::now();
            if let Err(error) = inner.queue.vacuum().await {
                tracing::warn!(%error, "could not vacuum finished payment jobs");
            }
        }
    }
}

/// One run of a payment job.
async fn run_job(
    job: PaymentJob,
    attempt: Attempt,
    inner: Data<Arc<Inner>>,
) -> Result<(), BoxDynError> {
    let attempt = attempt.current();
    let result = {
        // Counted down on drop too: a stalled worker's jobs are dropped mid-run.
        let _running = RunningJob::start(&inner.running_jobs);
        inner.counters.job_runs.fetch_add(1, Ordering::Relaxed);
        inner.settle(&job, attempt).await
    };
    match result {
        Ok(settled) => {
            inner.notify(job.order, settled);
            Ok(())
        }
        // A job for an order this database never had (another database behind the same key
        // prefix): nothing to settle or give back; dead-letter it at once.
        Err(error @ SettleError::UnknownOrder(_)) => {
            inner.counters.job_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(order = %job.order, %error, "payment job for an unknown order; dead-lettered");
            Err(AbortError::new(error).into())
        }
        Err(error) if attempt < MAX_ATTEMPTS => {
            inner.counters.job_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(order = %job.order, attempt, %error, "payment job failed; it will be retried");
            Err(error.into())
        }
        Err(error) => {
            inner.counters.job_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(order = %job.order, attempt, %error, "payment job failed its last attempt; cancelling the order");
            if let Err(cause) = inner.give_up(&job).await {
                tracing::error!(order = %job.order, error = %cause, "could not cancel the order; the next start re-queues it");
            }
            inner.notify(job.order, Settled::GaveUp);
            Err(AbortError::new(error).into())
        }
    }
}

/// One job being run, counted in `running_jobs` for as long as it lives.
struct RunningJob<'a>(&'a AtomicU64);

impl<'a> RunningJob<'a> {
    fn start(running: &'a AtomicU64) -> Self {
        running.fetch_add(1, Ordering::AcqRel);
        Self(running)
    }
}

impl Drop for RunningJob<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    fn settings(&self) -> &crate::config::LockedSettings {
        &self.parts.settings.locked
    }

    fn notify(&self, order: OrderId, settled: Settled) {
        match settled {
            Settled::Confirmed => &self.counters.confirmed,
            Settled::Declined => &self.counters.declined,
            Settled::Expired => &self.counters.expired,
            Settled::GaveUp => &self.counters.gave_up,
        }
        .fetch_add(1, Ordering::Relaxed);
        let waiter = self
            .waiters
            .lock()
            .expect("waiters poisoned")
            .remove(&order);
        if let Some(waiter) = waiter {
            let _ = waiter.send(settled);
        }
    }

    /// Whether `event` may still have `quantity` seats, as a buyer waiting for its lock asks
    /// every few hundred milliseconds. Answered from one shared reading per event per
    /// [`RECHECK_FRESH`]: a thousand waiters asking the database each on their own kept every
    /// pooled connection busy, and the lock holder queued behind them for its own writes (a
    /// convoy: two grants a second on PostgreSQL). A stale "no" costs nothing, since the waiter
    /// reads the database itself before it refuses; a stale "yes" only makes it wait longer.
    async fn may_have(&self, event: EventId, quantity: u32) -> bool {
        let wanted = i64::from(quantity);
        let cached = {
            let mut seen = self.seen.lock().expect("availability readings poisoned");
            let reading = seen.entry(event).or_insert(Reading {
                at: None,
                available: wanted,
                refreshing: None,
            });
            let fresh = reading.at.is_some_and(|at| at.elapsed() < RECHECK_FRESH);
            // A reader that never came back (its task was dropped) holds no one up for long.
            let being_read = reading
                .refreshing
                .is_some_and(|since| since.elapsed() < RECHECK_GIVE_UP);
            if fresh || being_read {
                Some(reading.available)
            } else {
                reading.refreshing = Some(Instant::now());
                None
            }
        };
        if let Some(available) = cached {
            return available >= wanted;
        }
        let read = self.parts.store.availability(event).await;
        let mut seen = self.seen.lock().expect("availability readings poisoned");
        let reading = seen.entry(event).or_insert(Reading {
            at: None,
            available: wanted,
            refreshing: None,
        });
        reading.refreshing = None;
        match read {
            Ok(Some(now)) => {
                reading.at = Some(Instant::now());
                reading.available = now.available;
                now.available >= wanted
            }
            // Unknown event or an unreadable database: keep waiting; the lock decides.
            _ => true,
        }
    }

    /// Holds `quantity` seats for `user`: the order and its tickets `pending`, written under
    /// the event's lock with its fencing token. Returns the payment job to queue.
    async fn reserve(
        &self,
        event: EventId,
        user: &UserId,
        quantity: u32,
        per_user_limit: Option<u32>,
        idempotency: Option<OrderKey>,
    ) -> Result<PaymentJob, PurchaseError> {
        // Refuse without the lock when there is plainly nothing to sell.
        let store = &self.parts.store;
        let seen = store
            .availability(event)
            .await?
            .ok_or(PurchaseError::UnknownEvent)?;
        if seen.available < i64::from(quantity) {
            return Err(refusal(seen, quantity));
        }
        let worth_waiting = || async move { self.may_have(event, quantity).await };
        for _ in 0..STALE_RETRIES {
            let lease = self
                .locks
                .acquire_while(event, false, worth_waiting)
                .await
                .map_err(lock_refusal)?;
            let Some(lease) = lease else {
                // Sold (or held) out while this buyer waited: no need for the lock to say so.
                let seen = store
                    .availability(event)
                    .await?
                    .ok_or(PurchaseError::UnknownEvent)?;
                if seen.available < i64::from(quantity) {
                    return Err(refusal(seen, quantity));
                }
                continue;
            };
            let result = self
                .reserve_under(&lease, user, quantity, per_user_limit, idempotency.clone())
                .await;
            if let Err(error) = self.locks.release(lease).await {
                tracing::warn!(%error, "could not release the lock; its lease runs out by itself");
            }
            match result {
                Ok(Some(job)) => return Ok(job),
                Ok(None) => {
                    self.locks
                        .stats()
                        .stale_writes_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(event = %event, "reservation refused: a newer lock holder wrote first; retrying");
                }
                Err(error) => return Err(error),
            }
        }
        Err(PurchaseError::Overloaded)
    }

    /// The reservation proper; `Ok(None)` when the store refused the token as stale.
    async fn reserve_under(
        &self,
        lease: &Lease,
        user: &UserId,
        quantity: u32,
        per_user_limit: Option<u32>,
        idempotency: Option<OrderKey>,
    ) -> Result<Option<PaymentJob>, PurchaseError> {
        let store = &self.parts.store;
        let event = lease.event;
        // Claim the event with our token before reading it: a stale holder's write that lands
        // after this is refused, and one that landed before is in what we read.
        if self.fencing && !store.claim_fence(event, lease.token).await? {
            return Ok(None);
        }
        let seen = store
            .availability(event)
            .await?
            .ok_or(PurchaseError::UnknownEvent)?;
        if seen.available < i64::from(quantity) {
            return Err(refusal(seen, quantity));
        }
        if let Some(limit) = per_user_limit {
            let owned = store.held_or_owned(event, user.as_str()).await?;
            if owned + i64::from(quantity) > i64::from(limit) {
                return Err(PurchaseError::UserLimit { limit });
            }
        }
        let nth = self.reads.fetch_add(1, Ordering::AcqRel);
        if let Some(pause) = self.settings().failpoints.pauses_after_read.get(nth) {
            tracing::warn!(
                ?pause,
                token = lease.token,
                "failpoint: the lock holder pauses between its read and its write"
            );
            tokio::time::sleep(*pause).await;
        }
        let order = OrderId(Uuid::new_v4());
        let new = NewOrder {
            order,
            tickets: (0..quantity).map(|_| TicketId(Uuid::new_v4())).collect(),
            event,
            user: user.as_str().to_owned(),
            unit_price: seen.price,
            idempotency,
            created_at: timestamp(Utc::now()),
        };
        let available = seen.available - i64::from(quantity);
        if !store
            .reserve_fenced(&new, available, self.fence(lease))
            .await?
        {
            return Ok(None);
        }
        self.cache.invalidate(Some(event)).await;
        Ok(Some(PaymentJob {
            order,
            event,
            quantity,
            amount_cents: new.amount_cents(),
            payment_key: new.payment_key(),
        }))
    }

    /// Queues the job; if Redis refuses, gives the seats back (or leaves the order pending
    /// for the next start to re-queue, if even that fails).
    async fn enqueue(&self, job: &PaymentJob) -> Result<(), PurchaseError> {
        let Err(error) = self.queue.enqueue(job.clone(), &job.payment_key).await else {
            return Ok(());
        };
        tracing::warn!(order = %job.order, %error, "could not queue the payment");
        if let Err(cause) = self
            .release(job, CancelReason::Interrupted, Some(PaymentStatus::Failed))
            .await
        {
            tracing::error!(order = %job.order, error = %cause, "could not return the seats either; the next start re-queues the payment");
        }
        Err(PurchaseError::Unavailable("Redis"))
    }

    /// Charges the order and settles it. Safe to run again for the same job: a settled order
    /// is reported as it stands, and the gateway charges a payment key once.
    async fn settle(&self, job: &PaymentJob, attempt: usize) -> Result<Settled, SettleError> {
        let order = self
            .parts
            .store
            .order(job.order)
            .await?
            .ok_or(SettleError::UnknownOrder(job.order))?;
        match order.status {
            OrderStatus::Confirmed => return Ok(Settled::Confirmed),
            OrderStatus::Cancelled => {
                // Cancelled by another run of this job (a swept duplicate that expired the
                // hold while this run was charging), or by an earlier run of this one that
                // stopped before its refund: whatever this key charged goes back.
                self.refund_cancelled(job).await?;
                return Ok(Settled::Declined);
            }
            OrderStatus::Pending => {}
        }
        let hold_ends = chrono::DateTime::parse_from_rfc3339(&order.created_at)
            .map_err(|e| StoreError::Conflict(format!("order {}: created_at: {e}", job.order)))?
            .with_timezone(&Utc)
            + self.parts.settings.hold_ttl;
        if Utc::now() >= hold_ends {
            // Too late to start charging (the queue, its worker or the database was down):
            // give the seats back. This may not be the job's first run: an earlier one may
            // have been charged and then lost its confirmation (the database went away), the
            // gateway's answer, or its worker; so whatever the key charged is refunded. And
            // another run may be confirming the order right now: the order read above can be
            // stale by the time this run cancels, which is why it cancels before it refunds.
            if let Some(pause) = self.settings().failpoints.hold_over_pause {
                tracing::warn!(
                    ?pause,
                    "failpoint: a run that found the hold over pauses before cancelling"
                );
                tokio::time::sleep(pause).await;
            }
            self.cancel_and_refund(job, CancelReason::HoldExpired)
                .await?;
            return Ok(Settled::Expired);
        }
        let amount = Money::from_cents(job.amount_cents)
            .map_err(|e| StoreError::Conflict(format!("order {}: {e}", job.order)))?;
        let outcome = self.parts.payments.charge(&job.payment_key, amount).await?;
        let failpoints = &self.settings().failpoints;
        if failpoints.freeze_worker_once && !self.crashed_once.swap(true, Ordering::AcqRel) {
            tracing::warn!("failpoint: the payment worker freezes mid-job, after the charge");
            if let Some(freeze) = self.freeze.lock().expect("freeze slot poisoned").as_ref() {
                freeze.store(true, Ordering::Release);
            }
            // The worker is not polled again, this job with it.
            std::future::pending::<()>().await;
        }
        if failpoints.crash_worker_after_charge_once
            && !self.crashed_once.swap(true, Ordering::AcqRel)
        {
            panic!(
                "failpoint: the payment worker dies mid-job, after the charge and before settling"
            );
        }
        if attempt <= failpoints.fail_job_attempts as usize {
            return Err(SettleError::Failpoint(attempt));
        }
        match outcome {
            ChargeOutcome::Approved { .. } if Utc::now() >= hold_ends => {
                // The charge came back after the hold ran out: return the seats, refund it.
                self.cancel_and_refund(job, CancelReason::HoldExpired)
                    .await?;
                Ok(Settled::Expired)
            }
            ChargeOutcome::Approved { .. } => {
                if let Some(pause) = failpoints.confirm_pause_once {
                    if !self.confirm_paused_once.swap(true, Ordering::AcqRel) {
                        tracing::warn!(?pause, "failpoint: the confirmation is held up");
                        tokio::time::sleep(pause).await;
                    }
                }
                self.confirm(job.order).await?;
                Ok(Settled::Confirmed)
            }
            ChargeOutcome::Declined => {
                self.release(
                    job,
                    CancelReason::PaymentDeclined,
                    Some(PaymentStatus::Failed),
                )
                .await?;
                Ok(Settled::Declined)
            }
        }
    }

    /// The order and its tickets confirmed and the payment completed, in one transaction.
    /// Inventory is untouched (the seats were taken at reservation), so no lock is needed.
    async fn confirm(&self, order: OrderId) -> Result<(), SettleError> {
        Ok(self.parts.store.confirm_paid(order).await?)
    }

    fn fence(&self, lease: &Lease) -> Fence {
        Fence {
            token: lease.token,
            checked: self.fencing,
        }
    }

    /// The seats back (under the lock, fenced), the order cancelled and the payment settled
    /// as `payment` (left `pending` if `None`), in one transaction.
    async fn release(
        &self,
        job: &PaymentJob,
        reason: CancelReason,
        payment: Option<PaymentStatus>,
    ) -> Result<(), SettleError> {
        for _ in 0..STALE_RETRIES {
            let lease = self.locks.acquire(job.event, true).await?;
            let result = self.release_under(&lease, job, reason, payment).await;
            if let Err(error) = self.locks.release(lease).await {
                tracing::warn!(%error, "could not release the lock; its lease runs out by itself");
            }
            match result {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    self.locks
                        .stats()
                        .stale_writes_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => return Err(error),
            }
        }
        Err(SettleError::Stale)
    }

    async fn release_under(
        &self,
        lease: &Lease,
        job: &PaymentJob,
        reason: CancelReason,
        payment: Option<PaymentStatus>,
    ) -> Result<bool, SettleError> {
        let released = self
            .parts
            .store
            .release_fenced(
                job.order,
                job.event,
                job.quantity,
                reason,
                payment,
                self.fence(lease),
            )
            .await?;
        if !released {
            return Ok(false);
        }
        self.cache.invalidate(Some(job.event)).await;
        Ok(true)
    }

    /// After the last attempt failed: cancel the order and refund whatever was charged.
    async fn give_up(&self, job: &PaymentJob) -> Result<(), SettleError> {
        self.cancel_and_refund(job, CancelReason::Interrupted).await
    }

    /// Cancels the order (its seats back, its payment left `pending`), then refunds whatever
    /// its key charged and settles the payment. In that order: the cancellation is the
    /// decision, one transaction that only a pending order passes, so once it is made no other
    /// run of this job (a swept duplicate, a run taken over from a worker judged dead) can
    /// confirm the order any more. A refund issued first could meet such a confirmation and
    /// leave a confirmed order with its charge refunded. A run that stops between the two
    /// leaves a cancelled order with its payment pending: counted by the audit (I5), and
    /// queued again by the sweep and at start, whose run refunds it.
    async fn cancel_and_refund(
        &self,
        job: &PaymentJob,
        reason: CancelReason,
    ) -> Result<(), SettleError> {
        self.release(job, reason, None).await?;
        self.refund_cancelled(job).await
    }

    /// Refunds whatever the cancelled order's key charged (nothing, if it never was), and
    /// records its payment `refunded` or `failed` accordingly.
    async fn refund_cancelled(&self, job: &PaymentJob) -> Result<(), SettleError> {
        let refunded = match self.parts.payments.refund(&job.payment_key).await? {
            RefundOutcome::Refunded | RefundOutcome::AlreadyRefunded => true,
            RefundOutcome::NothingToRefund => false,
        };
        Ok(self
            .parts
            .store
            .settle_cancelled_payment(job.order, refunded)
            .await?)
    }

    /// Queues again the payment of every order still pending (or cancelled with its payment
    /// still pending) that was placed at least `min_age` ago. At start (`min_age` zero) the push carries the payment key, so the queue
    /// drops it when the job is still there (waiting, or held by a dead worker). A sweep
    /// (`min_age` one hold) pushes under a fresh key, so an order whose job is gone for good
    /// (dead-lettered without its cancellation landing) still gets one; a duplicate run is
    /// harmless, and the run expires the hold.
    async fn requeue_pending(&self, min_age: Duration) -> Result<usize, SettleError> {
        let pending = self.parts.store.pending_purchases().await?;
        let placed_before = Utc::now() - min_age;
        let mut queued = 0;
        // Cancelled orders whose payment is still pending are there too: a run stopped between
        // the cancellation and its refund ([`Inner::cancel_and_refund`]); their run refunds.
        for purchase in pending {
            // The pending purchase carries what the job needs: no read of the order per row.
            let placed = chrono::DateTime::parse_from_rfc3339(&purchase.created_at)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(placed_before);
            if placed > placed_before {
                continue;
            }
            let job = PaymentJob {
                order: purchase.order,
                event: purchase.event,
                quantity: purchase.quantity,
                amount_cents: purchase.amount.cents(),
                payment_key: purchase.payment_key,
            };
            let key = if min_age.is_zero() {
                job.payment_key.clone()
            } else {
                format!(
                    "{}:swept:{}",
                    job.payment_key,
                    Utc::now().timestamp_millis()
                )
            };
            self.queue
                .enqueue(job, &key)
                .await
                .map_err(|e| StoreError::Conflict(e.to_string()))?;
            queued += 1;
        }
        Ok(queued)
    }

    /// Waits for the job's outcome (API v1). Past the hold TTL the outcome is read from the
    /// store; a purchase still pending then is answered 503 and settles later.
    async fn wait_settled(
        &self,
        order: OrderId,
        outcome: oneshot::Receiver<Settled>,
    ) -> Result<Settled, PurchaseError> {
        let wait = self.parts.settings.hold_ttl.max(Duration::from_secs(10));
        if let Ok(Ok(settled)) = tokio::time::timeout(wait, outcome).await {
            return Ok(settled);
        }
        self.waiters
            .lock()
            .expect("waiters poisoned")
            .remove(&order);
        match self.parts.store.order(order).await?.map(|o| o.status) {
            Some(OrderStatus::Confirmed) => Ok(Settled::Confirmed),
            Some(OrderStatus::Cancelled) => Ok(Settled::Declined),
            _ => Err(PurchaseError::Unavailable("the payment queue")),
        }
    }

    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        let job = self.reserve(event, &user, 1, None, None).await?;
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters poisoned")
            .insert(job.order, tx);
        if let Err(error) = self.enqueue(&job).await {
            self.waiters
                .lock()
                .expect("waiters poisoned")
                .remove(&job.order);
            return Err(error);
        }
        match self.wait_settled(job.order, rx).await? {
            Settled::Confirmed => self
                .parts
                .store
                .first_ticket(job.order)
                .await?
                .ok_or_else(|| StoreError::Conflict("confirmed ticket vanished".into()).into()),
            Settled::Declined => Err(PurchaseError::PaymentDeclined),
            Settled::Expired => Err(PurchaseError::HoldExpired),
            Settled::GaveUp => Err(PurchaseError::Unavailable("the payment queue")),
        }
    }

    async fn place_order(&self, request: OrderRequest) -> Result<Order, PurchaseError> {
        let job = self
            .reserve(
                request.event,
                &request.user,
                request.quantity,
                Some(request.per_user_limit),
                request.idempotency,
            )
            .await?;
        self.enqueue(&job).await?;
        self.parts
            .store
            .order(job.order)
            .await?
            .ok_or_else(|| StoreError::Conflict("placed order vanished".into()).into())
    }
}

/// Why a reservation found too few seats.
fn refusal(seen: Availability, quantity: u32) -> PurchaseError {
    if seen.available > 0 {
        PurchaseError::NotEnough {
            available: seen.available as u32,
        }
    } else if seen.held > 0 {
        PurchaseError::AllHeld
    } else {
        let _ = quantity;
        PurchaseError::SoldOut
    }
}

#[async_trait]
impl Stage for LockedStage {
    fn kind(&self) -> StageKind {
        StageKind::Locked
    }

    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError> {
        let event = self.inner.parts.store.create_event(&new).await?;
        self.inner.cache.invalidate(None).await;
        Ok(event)
    }

    fn records(&self) -> &dyn Records {
        &self.inner.parts.store
    }

    async fn event(&self, id: EventId) -> StoreResult<Option<Event>> {
        self.inner.cache.event(&self.inner.parts.store, id).await
    }

    async fn events(&self) -> StoreResult<Vec<Event>> {
        self.inner.cache.events(&self.inner.parts.store).await
    }

    #[tracing::instrument(skip(self), fields(stage = "locked"))]
    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        let inner = Arc::clone(&self.inner);
        // Detached: a client that hangs up cannot strand a reservation before its job is queued.
        let task = actix_rt::spawn(async move { inner.purchase(event, user).await });
        task.await.unwrap_or(Err(PurchaseError::Overloaded))
    }

    #[tracing::instrument(skip(self), fields(stage = "locked", event = %request.event))]
    async fn place_order(&self, request: OrderRequest) -> Result<Order, PurchaseError> {
        let inner = Arc::clone(&self.inner);
        let task = actix_rt::spawn(async move { inner.place_order(request).await });
        task.await.unwrap_or(Err(PurchaseError::Overloaded))
    }

    async fn stats(&self) -> serde_json::Value {
        let inner = &self.inner;
        let queue = match inner.queue.stats().await {
            Ok(stats) => json!(stats),
            Err(error) => json!({ "error": error.to_string() }),
        };
        let c = &inner.counters;
        json!({
            "stage": StageKind::Locked,
            "fencing": inner.fencing,
            "lockTtlMs": inner.settings().lock_ttl.as_millis() as u64,
            "lock": inner.locks.stats().report(),
            "cache": inner.cache.stats(),
            "queue": queue,
            "payments": {
                "confirmed": c.confirmed.load(Ordering::Relaxed),
                "declined": c.declined.load(Ordering::Relaxed),
                "expired": c.expired.load(Ordering::Relaxed),
                "gaveUp": c.gave_up.load(Ordering::Relaxed),
                "jobRuns": c.job_runs.load(Ordering::Relaxed),
                "jobFailures": c.job_failures.load(Ordering::Relaxed),
                "workerRestarts": c.worker_restarts.load(Ordering::Relaxed),
                "workerStalls": c.worker_stalls.load(Ordering::Relaxed),
            },
        })
    }

    async fn activity(&self) -> Activity {
        let inner = &self.inner;
        let running = inner.running_jobs.load(Ordering::Acquire) as i64;
        match inner.queue.stats().await {
            Ok(queue) => Activity {
                jobs_queued: queue.waiting as i64,
                jobs_running: (queue.active as i64).max(running),
                ..Activity::default()
            },
            Err(error) => Activity {
                jobs_running: running,
                unreadable: vec![error.to_string()],
                ..Activity::default()
            },
        }
    }

    async fn dependencies(&self) -> Vec<(&'static str, bool)> {
        vec![
            super::database_health(self.records()).await,
            ("redis", self.inner.locks.ping().await),
        ]
    }

    async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::Release);
        // Let jobs under way finish (a job cut short is re-run by the next start, but
        // finishing it now is kinder), then stop the worker.
        for _ in 0..100 {
            if inner.running_jobs.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(task) = inner.worker.lock().expect("worker slot poisoned").take() {
            task.abort();
        }
    }
}
