//! The `locked` stage's inventory writes, each guarded by the fencing token of the Redis lock
//! it was made under (`events.fence`, migration 0002).
//!
//! A holder first claims the event with its token ([`claim`]), then reads it; a write carries
//! the token and succeeds only if no newer token has claimed or written the event
//! (`fence <= token`). Claiming before reading matters: a stale holder whose write lands
//! between a new holder's read and its write would otherwise pass the check and be
//! overwritten. Zero rows touched means a holder with a newer lease has claimed the event
//! since: the caller's lease ran out, and its write is refused before anything else in its
//! transaction commits.

use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::domain::{EventId, Money};

use super::{StoreError, StoreResult};

/// An event's inventory as read under the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Availability {
    pub available: i64,
    /// Tickets held by purchases whose payment is still running.
    pub held: i64,
    pub price: Money,
    /// The newest token that wrote this event.
    pub fence: i64,
}

/// Reads an event's availability (`None` if there is no such event).
pub async fn availability(pool: &SqlitePool, event: EventId) -> StoreResult<Option<Availability>> {
    let row = sqlx::query(
        "SELECT e.available_tickets, e.price_cents, e.fence,
                (SELECT COUNT(*) FROM tickets t WHERE t.event_id = e.id AND t.status = 'pending')
         FROM events e WHERE e.id = ?",
    )
    .bind(event.0)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Availability {
            available: r.get(0),
            price: Money::from_cents(r.get(1))
                .map_err(|e| StoreError::Conflict(format!("stored price invalid: {e}")))?,
            fence: r.get(2),
            held: r.get(3),
        })
    })
    .transpose()
}

/// Records `token` as the event's newest before its holder reads, so that a holder with an
/// older token can no longer write (its lease ran out). Returns false if a newer token has
/// already claimed or written the event.
pub async fn claim(pool: &SqlitePool, event: EventId, token: i64) -> StoreResult<bool> {
    let affected = sqlx::query("UPDATE events SET fence = ? WHERE id = ? AND fence <= ?")
        .bind(token)
        .bind(event.0)
        .bind(token)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(affected == 1)
}

/// Writes `available` as the holder of `token` computed it. Without `fencing` the token is
/// recorded but not checked (unsafe: the Redlock lesson). Returns false if refused.
pub async fn write_available(
    conn: &mut SqliteConnection,
    event: EventId,
    available: i64,
    token: i64,
    fencing: bool,
) -> StoreResult<bool> {
    let affected = sqlx::query(
        "UPDATE events SET available_tickets = ?, fence = max(fence, ?)
         WHERE id = ? AND (? = 0 OR fence <= ?)",
    )
    .bind(available)
    .bind(token)
    .bind(event.0)
    .bind(fencing)
    .bind(token)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(affected == 1)
}

/// Gives `quantity` seats back under `token`. Returns false if refused.
pub async fn return_seats(
    conn: &mut SqliteConnection,
    event: EventId,
    quantity: u32,
    token: i64,
    fencing: bool,
) -> StoreResult<bool> {
    let affected = sqlx::query(
        "UPDATE events SET available_tickets = available_tickets + ?, fence = max(fence, ?)
         WHERE id = ? AND (? = 0 OR fence <= ?)",
    )
    .bind(i64::from(quantity))
    .bind(token)
    .bind(event.0)
    .bind(fencing)
    .bind(token)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(affected == 1)
}

/// Every event's newest token, to seed Redis' counters at start.
pub async fn fences(pool: &SqlitePool) -> StoreResult<Vec<(EventId, i64)>> {
    let rows = sqlx::query("SELECT id, fence FROM events WHERE fence > 0")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (EventId(r.get(0)), r.get(1)))
        .collect())
}

/// Tickets `user` holds or owns for `event` (for the per-user limit).
pub async fn held_or_owned(pool: &SqlitePool, event: EventId, user: &str) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM tickets WHERE event_id = ? AND user_id = ? AND status IN ('pending', 'confirmed')",
    )
    .bind(event.0)
    .bind(user)
    .fetch_one(pool)
    .await?)
}
