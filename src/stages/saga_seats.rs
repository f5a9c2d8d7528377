//! Stage `saga`'s inventory participant on an inventory node of stage `services`: the saga's
//! `HoldSeats`, `ConfirmSeats` and `ReleaseSeats`, relayed by a saga process to the node
//! owning the event's shard (`POST /internal/v1/saga/seats`), decided on the event's
//! [`SeatBook`] and written by the node's epoch-fenced writer together with the command's
//! inbox row and the answer given ([`WriteOp::SagaSeats`]).
//!
//! A command is applied once: before deciding, the node looks for its message in the inbox
//! (in the database, then among what the event's book decided since it was rebuilt) and
//! answers a redelivery with what it answered the first time. A node that does not hold the event's shard answers
//! "not owner", and the saga's relay delivers the message again, to the owner it finds then.
//!
//! The books are per event, each behind an async mutex held only while deciding and queueing
//! the write (never while the write commits), so one event's commands are decided one at a
//! time and in the order their writes commit, and many share a group commit. A book is
//! rebuilt from the database when its shard's epoch changes (taken again, or from another
//! node), and dropped when one of its writes is refused (the next command rebuilds it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::PurchaseError;
use crate::domain::{EventId, OrderId};
use crate::saga::seats::SeatBook;
use crate::saga::{Command, Reply};
use crate::store::saga::SeatWrite;
use crate::store::shards::{shard_of, ShardFence};
use crate::store::{Stamp, Store, StoreError, WriteHandle, WriteOp};

/// A saga seat command as the relay sends it to the inventory node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeatCall {
    /// The outbox message's id: the inbox key.
    pub message_id: String,
    pub order: OrderId,
    /// The saga's event (named by `HoldSeats`, known to the saga for the others).
    pub event: EventId,
    pub command: Command,
}

/// One event's book and what it was rebuilt under.
struct Loaded {
    book: SeatBook,
    epoch: i64,
    /// Which rebuild this is ([`SagaSeats::loads`] when it was made).
    generation: u64,
    /// The answer of every message this book decided, and whether its write is committed:
    /// a redelivery that looked in the database before that commit finds it here.
    decided: HashMap<String, (Reply, bool)>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Loaded>>>;

pub struct SagaSeats {
    store: Store,
    writer: WriteHandle,
    fence: Arc<ShardFence>,
    /// Event to its book. A std `Mutex`: held only to find or insert a slot.
    books: Mutex<HashMap<EventId, Slot>>,
    /// Books rebuilt so far, of every event: a command that looked in the inbox before a
    /// rebuild looks again. An atomic: one counter, no invariant with anything else.
    loads: AtomicU64,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl SagaSeats {
    /// The participant of an inventory node whose shards `fence` holds; its writes go through
    /// `writer`, fenced by the same epochs.
    pub fn new(store: Store, writer: WriteHandle, fence: Arc<ShardFence>) -> Self {
        Self {
            store,
            writer,
            fence,
            books: Mutex::new(HashMap::new()),
            loads: AtomicU64::new(0),
        }
    }

    fn slot(&self, event: EventId) -> Slot {
        let mut books = self.books.lock().expect("seat books poisoned");
        Arc::clone(books.entry(event).or_default())
    }

    /// Applies `call` once and answers what it did (the same answer for a redelivery).
    pub async fn apply(&self, call: SeatCall) -> Result<Reply, PurchaseError> {
        let shard = shard_of(call.event);
        let Some(epoch) = self.fence.epoch(shard) else {
            return Err(PurchaseError::NotOwner { shard });
        };
        // The inbox check, in the database first and outside the book's lock (a round trip
        // that would otherwise queue every command of the event behind it); what commits
        // after this look is in the book's memory of the messages it decided, looked at under
        // the lock below.
        let looked = self.loads.load(Ordering::Acquire);
        if let Some(answer) = self.store.seat_answer(&call.message_id).await? {
            return stored_answer(answer);
        }
        let slot = self.slot(call.event);
        let (reply, written) = {
            let mut loaded = slot.lock().await;
            if loaded.as_ref().is_none_or(|l| l.epoch != epoch) {
                // Rebuilt from the database under this epoch: an earlier owner's writes are
                // all in it (the fence refuses any of theirs from the claim on).
                let generation = self.loads.fetch_add(1, Ordering::AcqRel) + 1;
                *loaded = Some(Loaded {
                    book: self.store.seat_book(call.event).await?,
                    epoch,
                    generation,
                    decided: HashMap::new(),
                });
            }
            let current = loaded.as_mut().expect("loaded above");
            match current.decided.get(&call.message_id) {
                Some((reply, true)) => return Ok(reply.clone()),
                // Its first delivery's write is not committed yet: deliver it again shortly.
                Some((_, false)) => return Err(PurchaseError::Overloaded),
                None => {}
            }
            // Rebuilt since the look above: a write of an earlier book may have committed
            // between that look and the rebuild, so look again.
            if current.generation > looked {
                if let Some(answer) = self.store.seat_answer(&call.message_id).await? {
                    return stored_answer(answer);
                }
            }
            let Some((reply, change)) = current.book.decide(call.order, &call.command, now_ms())
            else {
                return Err(PurchaseError::Store(StoreError::Corrupt(format!(
                    "the inventory got {:?}",
                    call.command
                ))));
            };
            let write = SeatWrite {
                message_id: call.message_id.clone(),
                order: call.order,
                event: call.event,
                change,
                outcome: serde_json::to_value(&reply).unwrap_or_default(),
            };
            let writer = self.writer.stamped(Stamp { shard, epoch });
            // Queued while the book is locked, so writes commit in decision order.
            let written = match writer.try_submit(WriteOp::SagaSeats(Box::new(write))) {
                Ok(done) => done,
                Err(_) => {
                    // Nothing queued: the decision must not stand in memory either.
                    *loaded = None;
                    return Err(PurchaseError::Overloaded);
                }
            };
            current
                .decided
                .insert(call.message_id.clone(), (reply.clone(), false));
            (reply, written)
        };
        let result = written
            .await
            .map_err(|_| StoreError::WriterClosed)
            .and_then(|r| r);
        let mut loaded = slot.lock().await;
        match result {
            Ok(()) => {
                if let Some(current) = loaded.as_mut() {
                    if let Some(entry) = current.decided.get_mut(&call.message_id) {
                        entry.1 = true;
                    }
                }
                Ok(reply)
            }
            Err(error) => {
                // What this book decided after the refused write may rest on it: rebuilt from
                // the database by the next command.
                *loaded = None;
                Err(PurchaseError::Store(error))
            }
        }
    }
}

/// A redelivered message's answer, as stored with its inbox row.
fn stored_answer(answer: serde_json::Value) -> Result<Reply, PurchaseError> {
    serde_json::from_value(answer).map_err(|e| {
        PurchaseError::Store(StoreError::Corrupt(format!("a stored seat answer: {e}")))
    })
}

/// How long one call to an inventory node may take before the relay delivers the message
/// again (the node's inbox answers a redelivery as it did the first call).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// Connections kept open to each node.
const IDLE_PER_NODE: usize = 64;

/// Why a seat command got no answer to record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SeatCallError {
    /// No node owning the shard answered (none holds it now, it moved, the node is down or
    /// busy): the outcome is unknown, and the message is delivered again, never given up.
    #[error("no inventory node owning shard {shard} answered: {why}")]
    Unanswered { shard: u32, why: String },
    /// The owner answered with an error of its own: delivered again, up to the relay's limit.
    #[error("the inventory node owning shard {shard} refused the command: {why}")]
    Refused { shard: u32, why: String },
}

/// The saga's side of the seat commands: finds the node owning the event's shard in
/// `shard_leases` (as the gateway does, by the database's clock) and calls it.
pub struct SeatClient {
    store: Store,
    client: Option<reqwest::Client>,
    token: Option<String>,
    /// Shard to its owner's address as last looked up. A std `Mutex`: held for a lookup or an
    /// insert, never across an `.await`. An entry is forgotten when its node fails a call.
    owners: Mutex<HashMap<u32, String>>,
}

impl SeatClient {
    pub fn new(store: Store, token: Option<String>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(IDLE_PER_NODE)
            .tcp_nodelay(true)
            .build()
            .ok();
        Self {
            store,
            client,
            token,
            owners: Mutex::new(HashMap::new()),
        }
    }

    fn forget(&self, shard: u32) {
        self.owners
            .lock()
            .expect("shard owners poisoned")
            .remove(&shard);
    }

    /// Sends `call` to the owner of its event's shard, once.
    pub async fn call(&self, call: &SeatCall) -> Result<Reply, SeatCallError> {
        use crate::api::internal::{Reply as Wire, WireError, PREFIX};
        let shard = shard_of(call.event);
        let unanswered = |why: String| SeatCallError::Unanswered { shard, why };
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| unanswered("no HTTP client could be made".into()))?;
        let known = self
            .owners
            .lock()
            .expect("shard owners poisoned")
            .get(&shard)
            .cloned();
        let addr = match known {
            Some(addr) => addr,
            None => {
                let found = self
                    .store
                    .shard_owner(shard)
                    .await
                    .map_err(|e| unanswered(e.to_string()))?
                    .ok_or_else(|| unanswered("nobody holds the shard now".into()))?;
                self.owners
                    .lock()
                    .expect("shard owners poisoned")
                    .insert(shard, found.clone());
                found
            }
        };
        let mut request = client
            .post(format!("http://{addr}{PREFIX}/saga/seats"))
            .json(call);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                self.forget(shard);
                return Err(unanswered(format!("{addr}: {error}")));
            }
        };
        let status = response.status();
        if !status.is_success() {
            self.forget(shard);
            return Err(SeatCallError::Refused {
                shard,
                why: format!("{addr} answered {status}"),
            });
        }
        let answer: Wire<Reply> = match response.json().await {
            Ok(answer) => answer,
            Err(error) => {
                self.forget(shard);
                return Err(unanswered(format!("{addr}: {error}")));
            }
        };
        match answer {
            Wire::Ok(reply) => Ok(reply),
            Wire::Err(
                error @ (WireError::NotOwner { .. }
                | WireError::OwnerChanged
                | WireError::Overloaded
                | WireError::NotServed
                | WireError::StoreUnavailable { .. }),
            ) => {
                // Looked up again on the next delivery.
                self.forget(shard);
                Err(unanswered(format!("{addr}: {error:?}")))
            }
            Wire::Err(error) => Err(SeatCallError::Refused {
                shard,
                why: format!("{addr}: {error:?}"),
            }),
        }
    }
}
