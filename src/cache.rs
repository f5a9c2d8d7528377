//! A read-through cache of event reads in Redis: the seed's step-2 query caching, used by the
//! `locked` stage.
//!
//! Reads try Redis first and fill it from SQLite on a miss; every write that changes an event
//! (a reservation, seats returned, a new event) deletes its entries after committing. A reader
//! that missed just before such a write can still put the old value back, so an entry may be
//! stale for at most [`CACHE_TTL`]: the price of caching a value that every purchase changes.
//! Purchases never read the cache; they read SQLite under the event's lock. A Redis failure
//! never fails a read: it is counted and the read goes to SQLite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::domain::{Event, EventId};
use crate::store::{Catalog, StoreResult};

/// Longest time a cached event read may outlive the value it copied.
pub const CACHE_TTL: Duration = Duration::from_secs(2);

pub struct EventCache {
    conn: ConnectionManager,
    prefix: String,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    invalidations: AtomicU64,
}

impl EventCache {
    pub fn new(conn: ConnectionManager, key_prefix: &str) -> Self {
        Self {
            conn,
            prefix: format!("{key_prefix}:cache"),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    fn event_key(&self, id: EventId) -> String {
        format!("{}:event:{id}", self.prefix)
    }

    fn list_key(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// One event, from the cache or else from the store (then cached).
    pub async fn event(&self, store: &dyn Catalog, id: EventId) -> StoreResult<Option<Event>> {
        let key = self.event_key(id);
        if let Some(event) = self.get::<Event>(&key).await {
            return Ok(Some(event));
        }
        let event = store.event(id).await?;
        if let Some(event) = &event {
            self.put(&key, event).await;
        }
        Ok(event)
    }

    /// Every event, from the cache or else from the store (then cached).
    pub async fn events(&self, store: &dyn Catalog) -> StoreResult<Vec<Event>> {
        let key = self.list_key();
        if let Some(events) = self.get::<Vec<Event>>(&key).await {
            return Ok(events);
        }
        let events = store.list_events().await?;
        self.put(&key, &events).await;
        Ok(events)
    }

    /// Drops what is cached about `event` (and the list). Call after the change committed.
    pub async fn invalidate(&self, event: Option<EventId>) {
        let mut keys = vec![self.list_key()];
        keys.extend(event.map(|id| self.event_key(id)));
        let mut conn = self.conn.clone();
        let deleted: redis::RedisResult<i64> =
            redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        match deleted {
            Ok(_) => self.invalidations.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.errors.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Hit, miss, error and invalidation counts.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "hits": self.hits.load(Ordering::Relaxed),
            "misses": self.misses.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "invalidations": self.invalidations.load(Ordering::Relaxed),
            "ttlMs": CACHE_TTL.as_millis() as u64,
        })
    }

    async fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let mut conn = self.conn.clone();
        let cached: redis::RedisResult<Option<String>> =
            redis::cmd("GET").arg(key).query_async(&mut conn).await;
        match cached.map(|raw| raw.and_then(|raw| serde_json::from_str(&raw).ok())) {
            Ok(Some(value)) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(value)
            }
            Ok(None) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    async fn put<T: Serialize>(&self, key: &str, value: &T) {
        let Ok(raw) = serde_json::to_string(value) else {
            return;
        };
        let mut conn = self.conn.clone();
        let stored: redis::RedisResult<()> = redis::cmd("SET")
            .arg(key)
            .arg(raw)
            .arg("PX")
            .arg(CACHE_TTL.as_millis() as u64)
            .query_async(&mut conn)
            .await;
        if stored.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
