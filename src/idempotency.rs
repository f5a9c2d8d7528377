//! The Idempotency-Key protocol (SPEC §6), below the HTTP layer: claim `(user, key)`, run the
//! request once, store its final answer, replay that answer to every retry, and release the
//! claim when the request ended in a server fault (so the client may try again).
//!
//! The claim, the work and the stored answer run as one task detached from the HTTP request:
//! a client that hangs up, or a handler that is dropped, cannot leave a claim `in_flight`, since
//! the task goes on to store the answer (or release the claim) regardless. Only a stopped
//! process can leave one, and [`recover_claims`] settles those at the next start.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;

use crate::domain::{Order, UserId};
use crate::stages::Stage;
use crate::store::{KeyState, StoreError, StoreResult};

/// What became of a request sent with an Idempotency-Key.
#[derive(Debug)]
pub enum Claim<T> {
    /// First time: the request ran, and this is what it produced.
    Ran(T),
    /// The request finished before: the answer stored then.
    Replay { status: u16, body: String },
    /// The same request is still running.
    InFlight,
    /// The key was used with another request (method, path or body).
    Mismatch,
}

/// Runs `work` at most once per `(user, key)`. `answer_of` says what to store as the final
/// answer (`(status, body)`), or `None` for a server fault, which releases the claim.
pub async fn run_once<T, Fut>(
    stage: Arc<dyn Stage>,
    user: UserId,
    key: String,
    fingerprint: String,
    work: Fut,
    answer_of: fn(&T) -> Option<(u16, String)>,
) -> StoreResult<Claim<T>>
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    // On the caller's arbiter (a local task): the stages start local tasks of their own.
    let task = actix_rt::spawn(async move {
        let records = stage.records();
        match records.begin_idempotent(&user, &key, &fingerprint).await? {
            KeyState::InFlight => return Ok(Claim::InFlight),
            KeyState::Mismatch => return Ok(Claim::Mismatch),
            KeyState::Replay { status, body } => return Ok(Claim::Replay { status, body }),
            KeyState::Proceed => {}
        }
        let done = AssertUnwindSafe(work).catch_unwind().await;
        let Ok(done) = done else {
            records.abandon_idempotent(&user, &key).await?;
            return Err(StoreError::Internal(
                "the request's handler panicked; its Idempotency-Key was released".into(),
            ));
        };
        match answer_of(&done) {
            Some((status, body)) => {
                records
                    .complete_idempotent(&user, &key, status, &body)
                    .await?
            }
            None => records.abandon_idempotent(&user, &key).await?,
        }
        Ok(Claim::Ran(done))
    });
    task.await.map_err(|e| {
        StoreError::Internal(format!("the Idempotency-Key task did not finish: {e}"))
    })?
}

/// Settles claims a stopped run left `in_flight`: one that created an order gets that order's
/// answer as `render` writes it (the same bytes the client would have received, status 202);
/// the others are released. Then forgets keys past their retention.
pub async fn recover_claims(
    stage: &dyn Stage,
    render: impl Fn(&Order) -> String,
) -> StoreResult<()> {
    let records = stage.records();
    for (user, key) in records.interrupted_claims().await? {
        match records.order_by_key(&user, &key).await? {
            Some(order) => {
                records
                    .complete_idempotent(&user, &key, 202, &render(&order))
                    .await?
            }
            None => records.abandon_idempotent(&user, &key).await?,
        }
    }
    let purged = records.purge_old_keys().await?;
    if purged > 0 {
        tracing::info!(purged, "forgot Idempotency-Keys past their retention");
    }
    Ok(())
}
