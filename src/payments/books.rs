//! The gateway's group commit: one task owns the books and commits whatever charges and refunds
//! are waiting as one transaction, then answers each. A charge is answered only once it is in
//! the books, as a real gateway commits before it replies; sharing the commit keeps that from
//! costing a round trip per charge.
//!
//! The task is the books' only writer, and it settles a batch in order against what the books
//! already hold for the batch's keys (read just before), so a key is charged at most once and
//! refunded at most once even when a retry lands in the same batch as the first attempt, or
//! after a restart. The unique index of `gateway_ledger` is the second line of defence.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{ChargeOutcome, GatewayUnavailable, RefundOutcome};
use crate::domain::timestamp;
use crate::store::gateway::{BookedKey, LedgerEntry, LedgerKind};
use crate::store::{GatewayBooks, StoreResult};

/// Charges and refunds waiting for the books task; a caller waits for room when it is full.
pub const BOOKS_QUEUE: usize = 4096;
/// Most requests settled in one transaction.
pub const BOOKS_MAX_BATCH: usize = 1024;
const _: () = assert!(BOOKS_MAX_BATCH <= BOOKS_QUEUE);

/// What the books say about a key: the answer it got, and whether that charge was refunded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub outcome: ChargeOutcome,
    pub refunded: bool,
}

impl Known {
    fn from_books(booked: &BookedKey) -> Self {
        Self {
            outcome: match booked.charge_id {
                Some(charge_id) => ChargeOutcome::Approved { charge_id },
                None => ChargeOutcome::Declined,
            },
            refunded: booked.refunded,
        }
    }

    /// The newer of two views of the same key (a refund only ever goes from false to true).
    pub fn merge(self, other: Self) -> Self {
        Self {
            outcome: self.outcome,
            refunded: self.refunded || other.refunded,
        }
    }
}

enum Request {
    /// Charge `key` unless the books answered it before; `proposed` is the answer to give if
    /// not (the id of an approved charge, or `None` to decline).
    Charge {
        key: String,
        amount_cents: i64,
        proposed: Option<Uuid>,
    },
    Refund {
        key: String,
    },
}

impl Request {
    fn key(&self) -> &str {
        match self {
            Self::Charge { key, .. } | Self::Refund { key } => key,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Charge(Known),
    Refund(RefundOutcome),
}

enum Reply {
    Charge(oneshot::Sender<Result<Known, GatewayUnavailable>>),
    Refund(oneshot::Sender<Result<RefundOutcome, GatewayUnavailable>>),
}

impl Reply {
    fn send(self, answer: Result<Answer, GatewayUnavailable>) {
        // A caller that stopped waiting is no reason to stop: the books are written either way.
        match (self, answer) {
            (Self::Charge(tx), Ok(Answer::Charge(known))) => {
                let _ = tx.send(Ok(known));
            }
            (Self::Refund(tx), Ok(Answer::Refund(outcome))) => {
                let _ = tx.send(Ok(outcome));
            }
            (Self::Charge(tx), _) => {
                let _ = tx.send(Err(GatewayUnavailable));
            }
            (Self::Refund(tx), _) => {
                let _ = tx.send(Err(GatewayUnavailable));
            }
        }
    }
}

/// Sends charges and refunds to the books task; cheap to clone.
#[derive(Clone)]
pub struct BooksHandle {
    tx: mpsc::Sender<(Request, Reply)>,
}

impl BooksHandle {
    /// Starts the books task, which ends once every handle is dropped and its queue is drained.
    /// Must be called inside a tokio runtime.
    pub async fn start(books: Arc<dyn GatewayBooks>) -> StoreResult<Self> {
        let next_seq = books.last_ledger_seq().await? + 1;
        let (tx, rx) = mpsc::channel(BOOKS_QUEUE);
        tokio::spawn(run(books, rx, next_seq));
        Ok(Self { tx })
    }

    /// Charges `key`, or answers what the books hold for it: durable either way.
    pub async fn charge(
        &self,
        key: String,
        amount_cents: i64,
        proposed: ChargeOutcome,
    ) -> Result<Known, GatewayUnavailable> {
        let proposed = match proposed {
            ChargeOutcome::Approved { charge_id } => Some(charge_id),
            ChargeOutcome::Declined => None,
        };
        let (tx, rx) = oneshot::channel();
        let request = Request::Charge {
            key,
            amount_cents,
            proposed,
        };
        self.tx
            .send((request, Reply::Charge(tx)))
            .await
            .map_err(|_| GatewayUnavailable)?;
        rx.await.map_err(|_| GatewayUnavailable)?
    }

    /// Refunds the approved charge under `key` once; durable before it answers.
    pub async fn refund(&self, key: String) -> Result<RefundOutcome, GatewayUnavailable> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((Request::Refund { key }, Reply::Refund(tx)))
            .await
            .map_err(|_| GatewayUnavailable)?;
        rx.await.map_err(|_| GatewayUnavailable)?
    }
}

async fn run(
    books: Arc<dyn GatewayBooks>,
    mut rx: mpsc::Receiver<(Request, Reply)>,
    mut next_seq: i64,
) {
    let mut waiting = Vec::with_capacity(BOOKS_MAX_BATCH);
    while rx.recv_many(&mut waiting, BOOKS_MAX_BATCH).await > 0 {
        let (requests, replies): (Vec<Request>, Vec<Reply>) = waiting.drain(..).unzip();
        match settle(books.as_ref(), &requests, &mut next_seq).await {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    reply.send(Ok(answer));
                }
            }
            Err(error) => {
                // Settle each alone, so one refused write does not fail its neighbours.
                tracing::warn!(%error, requests = requests.len(), "the gateway's books refused a batch; retrying one by one");
                for (request, reply) in requests.iter().zip(replies) {
                    let alone =
                        settle(books.as_ref(), std::slice::from_ref(request), &mut next_seq)
                            .await
                            .map(|mut answers| answers.remove(0));
                    if let Err(error) = &alone {
                        tracing::error!(%error, key = request.key(), "the gateway's books refused a write");
                    }
                    reply.send(alone.map_err(|_| GatewayUnavailable));
                }
            }
        }
    }
}

/// Settles `requests` in order against the books and commits what they add; answers each.
async fn settle(
    books: &dyn GatewayBooks,
    requests: &[Request],
    next_seq: &mut i64,
) -> StoreResult<Vec<Answer>> {
    let mut keys: Vec<&str> = requests.iter().map(Request::key).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut known: HashMap<String, BookedKey> = books
        .booked_keys(&keys)
        .await?
        .into_iter()
        .map(|booked| (booked.key.clone(), booked))
        .collect();
    let (answers, lines) = plan(requests, &mut known, next_seq, &timestamp(Utc::now()));
    books.write_books(&lines).await?;
    Ok(answers)
}

/// The pure part of [`settle`]: each request decided against `known` (updated as it goes), and
/// the ledger lines that adds. Ledger positions are taken from `next_seq` whether or not the write
/// succeeds: a gap in the ledger is harmless, a position used twice is not.
fn plan(
    requests: &[Request],
    known: &mut HashMap<String, BookedKey>,
    next_seq: &mut i64,
    now: &str,
) -> (Vec<Answer>, Vec<LedgerEntry>) {
    let mut lines = Vec::new();
    let mut line = |booked: &BookedKey, kind: LedgerKind| LedgerEntry {
        seq: std::mem::replace(next_seq, *next_seq + 1),
        key: booked.key.clone(),
        kind,
        amount_cents: booked.amount_cents,
        charge_id: booked.charge_id.filter(|_| kind == LedgerKind::Charge),
        at: now.to_owned(),
    };
    let answers = requests
        .iter()
        .map(|request| match request {
            Request::Charge {
                key,
                amount_cents,
                proposed,
            } => {
                if let Some(booked) = known.get(key) {
                    if booked.amount_cents != *amount_cents {
                        tracing::warn!(
                            key,
                            booked = booked.amount_cents,
                            asked = amount_cents,
                            "a payment key was charged again with another amount; answering as before"
                        );
                    }
                    return Answer::Charge(Known::from_books(booked));
                }
                let booked = BookedKey {
                    key: key.clone(),
                    charge_id: *proposed,
                    amount_cents: *amount_cents,
                    decided_at: now.to_owned(),
                    refunded: false,
                };
                let kind = match proposed {
                    Some(_) => LedgerKind::Charge,
                    None => LedgerKind::Decline,
                };
                lines.push(line(&booked, kind));
                let answer = Known::from_books(&booked);
                known.insert(key.clone(), booked);
                Answer::Charge(answer)
            }
            Request::Refund { key } => Answer::Refund(match known.get_mut(key) {
                Some(booked) if booked.charge_id.is_some() && !booked.refunded => {
                    booked.refunded = true;
                    lines.push(line(booked, LedgerKind::Refund));
                    RefundOutcome::Refunded
                }
                Some(booked) if booked.refunded => RefundOutcome::AlreadyRefunded,
                _ => RefundOutcome::NothingToRefund,
            }),
        })
        .collect();
    (answers, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(key: &str, approve: bool) -> Request {
        Request::Charge {
            key: key.into(),
            amount_cents: 500,
            proposed: approve.then(Uuid::new_v4),
        }
    }

    fn refund(key: &str) -> Request {
        Request::Refund { key: key.into() }
    }

    #[test]
    fn a_retry_in_the_same_batch_gets_the_first_answer_and_writes_nothing() {
        let mut known = HashMap::new();
        let mut seq = 1;
        let (answers, lines) = plan(
            &[charge("k", true), charge("k", false)],
            &mut known,
            &mut seq,
            "t",
        );
        let [Answer::Charge(first), Answer::Charge(again)] = answers[..] else {
            panic!("{answers:?}");
        };
        assert_eq!(first, again);
        let ChargeOutcome::Approved { charge_id } = first.outcome else {
            panic!("{first:?}");
        };
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].kind, LedgerKind::Charge);
        assert_eq!(lines[0].charge_id, Some(charge_id));
        assert_eq!(seq, 2);
    }

    #[test]
    fn a_key_in_the_books_is_answered_from_them() {
        let charge_id = Uuid::new_v4();
        let mut known = HashMap::from([(
            "k".to_owned(),
            BookedKey {
                key: "k".into(),
                charge_id: Some(charge_id),
                amount_cents: 500,
                decided_at: "before".into(),
                refunded: false,
            },
        )]);
        let mut seq = 7;
        let (answers, lines) = plan(
            &[charge("k", false), refund("k"), refund("k")],
            &mut known,
            &mut seq,
            "t",
        );
        assert!(matches!(
            answers[0],
            Answer::Charge(Known {
                outcome: ChargeOutcome::Approved { charge_id: id },
                refunded: false
            }) if id == charge_id
        ));
        assert!(matches!(
            answers[1],
            Answer::Refund(RefundOutcome::Refunded)
        ));
        assert!(matches!(
            answers[2],
            Answer::Refund(RefundOutcome::AlreadyRefunded)
        ));
        assert_eq!(lines.len(), 1, "the key's answer is not written again");
        assert_eq!(lines[0].kind, LedgerKind::Refund);
        assert_eq!(lines[0].seq, 7);
        assert_eq!(lines[0].charge_id, None);
    }

    #[test]
    fn only_an_approved_charge_is_refunded() {
        let mut known = HashMap::new();
        let mut seq = 1;
        let (answers, lines) = plan(
            &[refund("never"), charge("d", false), refund("d")],
            &mut known,
            &mut seq,
            "t",
        );
        assert!(matches!(
            answers[0],
            Answer::Refund(RefundOutcome::NothingToRefund)
        ));
        assert!(matches!(
            answers[2],
            Answer::Refund(RefundOutcome::NothingToRefund)
        ));
        let kinds: Vec<LedgerKind> = lines.iter().map(|l| l.kind).collect();
        assert_eq!(kinds, [LedgerKind::Decline]);
    }
}
