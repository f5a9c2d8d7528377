//! A lock per event in Redis, with a fencing token.
//!
//! A grant is `SET key value NX PX ttl` with a value unique to the grant, and in the same Lua
//! call an `INCR` of the event's fence counter: the **fencing token**, larger for every grant.
//! Release is compare-and-delete (another Lua call), so a holder whose lease ran out cannot
//! delete its successor's lock.
//!
//! A lease alone is not safe: a holder paused (GC, SIGSTOP, a slow disk) past its TTL still
//! believes it holds the lock while a second holder has taken it. The token is what makes it
//! safe: a holder records its token on the event before reading it, and the store refuses any
//! inventory write whose token is older than the newest it has seen (`events.fence`,
//! [`crate::store::fenced`]), so the paused holder's late write fails instead of overwriting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use redis::aio::ConnectionManager;
use redis::Script;
use serde::Serialize;

use crate::domain::EventId;

/// Takes the lock and issues the token in one step, so no grant is ever without a token.
/// An urgent caller that is refused leaves a mark (for one TTL) that makes ordinary callers
/// stand back until an urgent one has had the lock: returning seats goes before selling them.
const ACQUIRE: &str = r"
local urgent = ARGV[3] == '1'
if not urgent and redis.call('EXISTS', KEYS[3]) == 1 then
  return false
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if urgent then
    redis.call('DEL', KEYS[3])
  end
  return redis.call('INCR', KEYS[2])
end
if urgent then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
end
return false
";

/// Deletes the lock only if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Raises the fence counter to at least `ARGV[1]` (Redis keeps nothing on disk here, so after a
/// Redis restart the counter is seeded from what the store has seen).
const SEED: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
";

/// The first wait between two tries, and the cap it doubles up to.
const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// How often a waiting caller asks whether it still wants the lock.
const RECHECK_EVERY: Duration = Duration::from_millis(250);

/// Why no lease was granted.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Others held the lock for longer than the caller was willing to wait.
    #[error("waited {0:?} for the event's lock")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A granted lock: valid until its TTL runs out or it is released, whichever comes first.
#[derive(Debug)]
pub struct Lease {
    pub event: EventId,
    /// The fencing token: pass it to every write made under this lease.
    pub token: i64,
    key: String,
    value: String,
}

/// The per-event Redis locks of one server; cheap to share behind an `Arc`.
pub struct EventLocks {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
    wait: Duration,
    acquire: Script,
    release: Script,
    seed: Script,
    stats: LockStats,
}

impl EventLocks {
    pub fn new(conn: ConnectionManager, prefix: &str, ttl: Duration, wait: Duration) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            ttl,
            wait,
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            seed: Script::new(SEED),
            stats: LockStats::default(),
        }
    }

    fn lock_key(&self, event: EventId) -> String {
        format!("{}:lock:event:{event}", self.prefix)
    }

    fn fence_key(&self, event: EventId) -> String {
        format!("{}:fence:event:{event}", self.prefix)
    }

    /// Waits (polling with capped, jittered exponential backoff) until the event's lock is
    /// granted, or until the configured wait runs out. The wait is recorded in the stats.
    /// `urgent` callers go first (see [`ACQUIRE`]).
    pub async fn acquire(&self, event: EventId, urgent: bool) -> Result<Lease, LockError> {
        self.acquire_while(event, urgent, || async { true })
            .await?
            .ok_or(LockError::Timeout(Duration::ZERO))
    }

    /// Like [`Self::acquire`], but asks `still_wanted` every [`RECHECK_EVERY`] of waiting and
    /// gives up with `Ok(None)` once it answers false (say, the event sold out meanwhile).
    #[tracing::instrument(skip(self, still_wanted), fields(event = %event))]
    pub async fn acquire_while<F, Fut>(
        &self,
        event: EventId,
        urgent: bool,
        mut still_wanted: F,
    ) -> Result<Option<Lease>, LockError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        let key = self.lock_key(event);
        let fence = self.fence_key(event);
        let urgent_key = format!("{key}:urgent");
        let value = uuid::Uuid::new_v4().to_string();
        let ttl_ms = self.ttl.as_millis().max(1) as u64;
        let mut backoff = FIRST_BACKOFF;
        let mut tries = 0u64;
        let mut rechecked = started;
        loop {
            tries += 1;
            let mut conn = self.conn.clone();
            let granted: Option<i64> = self
                .acquire
                .key(&key)
                .key(&fence)
                .key(&urgent_key)
                .arg(&value)
                .arg(ttl_ms)
                .arg(if urgent { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await?;
            if let Some(token) = granted {
                self.stats.record_grant(started.elapsed(), tries > 1);
                return Ok(Some(Lease {
                    event,
                    token,
                    key,
                    value,
                }));
            }
            if started.elapsed() >= self.wait {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(LockError::Timeout(started.elapsed()));
            }
            if rechecked.elapsed() >= RECHECK_EVERY {
                rechecked = Instant::now();
                if !still_wanted().await {
                    self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
            }
            let jitter = rand::thread_rng().gen_range(0..=backoff.as_micros() as u64);
            tokio::time::sleep(backoff / 2 + Duration::from_micros(jitter / 2)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Gives the lock back if it is still ours. Returns false when the lease had already run
    /// out (and perhaps been granted to someone else): the caller held it for too long.
    pub async fn release(&self, lease: Lease) -> Result<bool, LockError> {
        let mut conn = self.conn.clone();
        let deleted: i64 = self
            .release
            .key(&lease.key)
            .arg(&lease.value)
            .invoke_async(&mut conn)
            .await?;
        if deleted == 1 {
            self.stats.released.fetch_add(1, Ordering::Relaxed);
            Ok(true)
        } else {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event = %lease.event, token = lease.token, "the lock lease ran out before it was released");
            Ok(false)
        }
    }

    /// Makes sure the next token for `event` is above `seen`, the newest the store has seen.
    pub async fn seed_fence(&self, event: EventId, seen: i64) -> Result<(), LockError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .seed
            .key(self.fence_key(event))
            .arg(seen)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Whether Redis answers a PING within a second.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        let answer = ping.query_async::<String>(&mut conn);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), answer).await,
            Ok(Ok(_))
        )
    }

    pub fn stats(&self) -> &LockStats {
        &self.stats
    }
}

/// Counters and the wait histogram of one server's locks.
pub struct LockStats {
    /// Microseconds from the first try to the grant. A std `Mutex`: held for one `record`,
    /// never across an `.await`.
    wait_us: Mutex<Histogram<u64>>,
    pub granted: AtomicU64,
    /// Grants that were not immediate (someone else held the lock at the first try).
    pub contended: AtomicU64,
    pub timeouts: AtomicU64,
    /// Waits given up because the caller no longer wanted the lock (e.g. sold out meanwhile).
    pub abandoned: AtomicU64,
    pub released: AtomicU64,
    /// Releases that found the lease gone: the holder outlived its TTL.
    pub expired: AtomicU64,
    /// Writes the store refused because a newer token had written first.
    pub stale_writes_refused: AtomicU64,
}

impl Default for LockStats {
    fn default() -> Self {
        Self {
            wait_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
            granted: AtomicU64::new(0),
            contended: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            released: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            stale_writes_refused: AtomicU64::new(0),
        }
    }
}

/// A snapshot of [`LockStats`], as served by the stats endpoint.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LockReport {
    pub granted: u64,
    pub contended: u64,
    pub timeouts: u64,
    pub abandoned: u64,
    pub released: u64,
    pub expired: u64,
    pub stale_writes_refused: u64,
    pub wait_mean_us: f64,
    pub wait_p50_us: u64,
    pub wait_p90_us: u64,
    pub wait_p99_us: u64,
    pub wait_max_us: u64,
}

impl LockStats {
    fn record_grant(&self, waited: Duration, contended: bool) {
        crate::meter::lock_wait(waited);
        self.granted.fetch_add(1, Ordering::Relaxed);
        if contended {
            self.contended.fetch_add(1, Ordering::Relaxed);
        }
        let us = (waited.as_micros() as u64).clamp(1, 3_600_000_000);
        self.wait_us
            .lock()
            .expect("lock-wait histogram poisoned")
            .saturating_record(us);
    }

    pub fn report(&self) -> LockReport {
        let h = self.wait_us.lock().expect("lock-wait histogram poisoned");
        LockReport {
            granted: self.granted.load(Ordering::Relaxed),
            contended: self.contended.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            stale_writes_refused: self.stale_writes_refused.load(Ordering::Relaxed),
            wait_mean_us: if h.is_empty() { 0.0 } else { h.mean() },
            wait_p50_us: h.value_at_quantile(0.50),
            wait_p90_us: h.value_at_quantile(0.90),
            wait_p99_us: h.value_at_quantile(0.99),
            wait_max_us: h.max(),
        }
    }
}
