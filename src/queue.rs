//! The `locked` stage's payment queue: jobs kept in Redis by apalis (`apalis-redis`), the Rust
//! counterpart of the seed's Bull queue.
//!
//! A job survives the process that enqueued it and the worker that took it: a worker that dies
//! mid-job stops sending heartbeats, and another worker puts its in-flight jobs back on the
//! queue once the heartbeats are overdue. A job runs at most [`MAX_ATTEMPTS`] times in a row
//! with exponential backoff between attempts (apalis' retry layer); after the last, the
//! handler gives up and the job goes to the dead set, the queue's dead-letter set.

use std::time::Duration;

use apalis::prelude::*;
use apalis_redis::{Config, RedisStorage};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::domain::{EventId, OrderId};

/// How often a job runs before it is given up.
pub const MAX_ATTEMPTS: usize = 3;
/// How often the worker looks for new jobs when the queue is empty.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How often a worker says it is alive; after [`MISSED_HEARTBEATS`] missed ones, others take
/// its jobs back.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
pub const MISSED_HEARTBEATS: usize = 2;
/// apalis-redis' own batch size, the least a worker fetches at once.
const DEFAULT_BATCH: usize = 10;
/// How long a finished job's data stays in Redis (and a payment key blocks a second push).
pub const KEEP_FINISHED: Duration = Duration::from_secs(24 * 3600);
/// A worker whose last heartbeat is older than this has stopped making progress: its jobs
/// are already anyone's (they are orphaned after [`MISSED_HEARTBEATS`] missed beats), and the
/// `locked` stage replaces it. One interval more than the orphan timeout, so a worker that is
/// merely slow to beat is not taken for a stalled one.
pub const STALLED_AFTER: Duration =
    Duration::from_secs(HEARTBEAT_INTERVAL.as_secs() * (MISSED_HEARTBEATS as u64 + 1));

/// Charge an order, then confirm it or give its seats back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentJob {
    pub order: OrderId,
    pub event: EventId,
    pub quantity: u32,
    pub amount_cents: i64,
    /// The gateway deduplicates on it, so a job that runs twice charges once.
    pub payment_key: String,
}

/// How many jobs are where, read from Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueStats {
    /// Queued, or waiting out a backoff before their next attempt.
    pub waiting: u64,
    /// Taken by a worker and not yet finished.
    pub active: u64,
    pub completed: u64,
    /// Given up after their last attempt: the dead-letter set.
    pub failed: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("payment queue: {0}")]
pub struct QueueError(String);

impl From<redis::RedisError> for QueueError {
    fn from(e: redis::RedisError) -> Self {
        Self(e.to_string())
    }
}

/// A handle on the queue; cheap to clone.
#[derive(Clone)]
pub struct PaymentQueue {
    storage: RedisStorage<PaymentJob>,
    conn: ConnectionManager,
    config: Config,
}

impl PaymentQueue {
    /// The queue `{prefix}:payments` on `conn`, for a worker running up to `concurrency` jobs
    /// at once.
    ///
    /// The batch size is never below `concurrency`. apalis 1.0 sizes the channel that carries
    /// each job's lock and completion events to four batches, and drains it only between two
    /// fetches: a worker running more jobs than that channel holds can fill it while a fetch is
    /// under way, and then its jobs wait on the channel, the worker waits on its jobs, and it
    /// stops fetching and sending heartbeats for good. Seen on PostgreSQL with 256 jobs at
    /// once and the default batch of 10 (issue 7); with the batch at least `concurrency`, the
    /// channel holds twice what the jobs in flight can send.
    pub fn new(conn: ConnectionManager, prefix: &str, concurrency: usize) -> Self {
        let config = Config::default()
            .queue(format!("{prefix}:payments"))
            .batch_size(concurrency.max(DEFAULT_BATCH))
            .heartbeat_interval(HEARTBEAT_INTERVAL)
            .missed_heartbeats(MISSED_HEARTBEATS)
            .emit_events(false)
            // Without a TTL, apalis-redis 1.0 sends `EXPIRE key 0`, which deletes the key at
            // once: pushes would never be deduplicated.
            .idempotency_ttl(Some(KEEP_FINISHED));
        let storage = RedisStorage::new(conn.clone()).with_config(config.clone());
        Self {
            storage,
            conn,
            config,
        }
    }

    /// Queues `job` once: a second push under the same `idempotency_key` within
    /// [`KEEP_FINISHED`] is dropped by the queue.
    pub async fn enqueue(&self, job: PaymentJob, idempotency_key: &str) -> Result<(), QueueError> {
        let task = TaskBuilder::new(job)
            .idempotency_key(idempotency_key)
            .max_attempts(MAX_ATTEMPTS)
            .build();
        self.storage
            .clone()
            .push_task(task)
            .await
            .map_err(|e| QueueError(e.to_string()))
    }

    /// Deletes the data of jobs finished more than [`KEEP_FINISHED`] ago (their counts stay),
    /// so Redis does not grow with every purchase ever made.
    pub async fn vacuum(&self) -> Result<usize, QueueError> {
        apalis_core::backend::Vacuum::vacuum_before(&mut self.storage.clone(), KEEP_FINISHED)
            .await
            .map_err(|e| QueueError(e.to_string()))
    }

    /// The storage a worker polls.
    pub fn storage(&self) -> RedisStorage<PaymentJob> {
        self.storage.clone()
    }

    /// How long ago the worker `name` last said it was alive, by the clock its heartbeats are
    /// written with (this machine's); `None` when it has not registered (or was removed).
    pub async fn heartbeat_age(&self, name: &str) -> Result<Option<Duration>, QueueError> {
        let mut conn = self.conn.clone();
        let beat: Option<f64> = redis::cmd("ZSCORE")
            .arg(self.config.workers_set())
            .arg(name)
            .query_async(&mut conn)
            .await?;
        Ok(beat.map(|at| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            Duration::from_secs_f64((now - at).max(0.0))
        }))
    }

    /// Counts read from the queue's Redis keys.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let mut conn = self.conn.clone();
        let workers: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.config.workers_set())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        pipe.cmd("LLEN")
            .arg(self.config.active_jobs_list())
            .cmd("ZCARD")
            .arg(self.config.scheduled_jobs_set())
            .cmd("SCARD")
            .arg(self.config.done_jobs_set())
            .cmd("SCARD")
            .arg(self.config.dead_jobs_set());
        for worker in &workers {
            pipe.cmd("SCARD")
                .arg(format!("{}:{worker}", self.config.inflight_jobs_set()));
        }
        let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(QueueStats {
            waiting: counts[0] + counts[1],
            active: counts[4..].iter().sum(),
            completed: counts[2],
            failed: counts[3],
        })
    }
}
