//! The `locked` stage's inventory writes, each guarded by the fencing token of the Redis lock
//! it was made under (`events.fence`, migration 0002).
//!
//! A holder first claims the event with its token ([`Store::claim_fence`]), then reads it; a
//! write carries the token and succeeds only if no newer token has claimed or written the
//! event (`fence <= token`). Claiming before reading matters: a stale holder whose write lands
//! between a new holder's read and its write would otherwise pass the check and be
//! overwritten. Zero rows touched means a holder with a newer lease has claimed the event
//! since: the caller's lease ran out, and its write is refused before anything else in its
//! transaction commits.

use chrono::Utc;
use sqlx::Row;

use super::sql::{self, NewOrder};
use super::{money, Store, StoreResult};
use crate::domain::{timestamp, CancelReason, EventId, Money, OrderId, OrderStatus, PaymentStatus};

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

/// The lock token a write was made under, and whether the store checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub token: i64,
    /// `false` records the token without checking it (unsafe: the Redlock lesson).
    pub checked: bool,
}

impl Store {
    /// Reads an event's availability (`None` if there is no such event).
    pub async fn availability(&self, event: EventId) -> StoreResult<Option<Availability>> {
        let row = sqlx::query(
            "SELECT e.available_tickets, e.price_cents, e.fence,
                    (SELECT COUNT(*) FROM tickets t WHERE t.event_id = e.id AND t.status = 'pending')
             FROM events e WHERE e.id = $1",
        )
        .bind(event.0)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Availability {
                available: r.try_get(0)?,
                price: money(r.try_get(1)?)?,
                fence: r.try_get(2)?,
                held: r.try_get(3)?,
            })
        })
        .transpose()
    }

    /// Records `token` as the event's newest before its holder reads, so that a holder with an
    /// older token can no longer write (its lease ran out). Returns false if a newer token has
    /// already claimed or written the event.
    pub async fn claim_fence(&self, event: EventId, token: i64) -> StoreResult<bool> {
        let affected = sqlx::query("UPDATE events SET fence = $1 WHERE id = $2 AND fence <= $1")
            .bind(token)
            .bind(event.0)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(affected == 1)
    }

    /// Holds seats for `order`: `available` written as the lock holder computed it, and the
    /// order, its tickets and payment inserted `pending`, in one transaction. Returns false
    /// (and writes nothing) if the fence refused the token as stale.
    pub async fn reserve_fenced(
        &self,
        order: &NewOrder,
        available: i64,
        fence: Fence,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let written = sqlx::query(&format!(
            "UPDATE events SET available_tickets = $1, {FENCE_RAISED} WHERE id = $3 AND {FENCE_HOLDS}"
        ))
        .bind(available)
        .bind(fence.token)
        .bind(order.event.0)
        .bind(i64::from(fence.checked))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if written != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sql::insert_order(&mut tx, order).await?;
        tx.commit().await?;
        self.changes().changed(order.event);
        Ok(true)
    }

    /// Gives an order's `quantity` seats back under `fence`, cancels the order for `reason` and
    /// settles its payment as `payment` (leaves it `pending` if `None`: a refund is still to
    /// be asked for, [`Store::settle_cancelled_payment`]), in one transaction. Returns false
    /// (and writes nothing) if the fence refused the token as stale.
    pub async fn release_fenced(
        &self,
        order: OrderId,
        event: EventId,
        quantity: u32,
        reason: CancelReason,
        payment: Option<PaymentStatus>,
        fence: Fence,
    ) -> StoreResult<bool> {
        let now = timestamp(Utc::now());
        let mut tx = self.pool.begin().await?;
        let written = sqlx::query(&format!(
            "UPDATE events SET available_tickets = available_tickets + $1, {FENCE_RAISED} WHERE id = $3 AND {FENCE_HOLDS}"
        ))
        .bind(i64::from(quantity))
        .bind(fence.token)
        .bind(event.0)
        .bind(i64::from(fence.checked))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if written != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sql::finish_order(&mut tx, order, OrderStatus::Cancelled, Some(reason), &now).await?;
        if let Some(payment) = payment {
            sql::settle_payment(&mut tx, order, payment, &now).await?;
        }
        tx.commit().await?;
        self.changes().changed(event);
        crate::meter::settled(Some(reason));
        Ok(true)
    }

    /// Records what the refund of a cancelled order's payment found: `refunded` if its key
    /// had been charged, else `failed` (nothing was taken). Idempotent: a payment already
    /// settled stays as it is, except that a `failed` one becomes `refunded` when a charge
    /// under its key turned up and was refunded after all (a run that charged while another
    /// cancelled the order).
    pub async fn settle_cancelled_payment(
        &self,
        order: OrderId,
        refunded: bool,
    ) -> StoreResult<()> {
        let (status, from) = if refunded {
            (PaymentStatus::Refunded, "('pending', 'failed')")
        } else {
            (PaymentStatus::Failed, "('pending')")
        };
        sqlx::query(&format!(
            "UPDATE payments SET status = $1, processed_at = $2 WHERE order_id = $3 AND status IN {from}"
        ))
        .bind(status.as_str())
        .bind(timestamp(Utc::now()))
        .bind(order.0.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The order and its tickets confirmed and the payment completed, in one transaction.
    /// Inventory is untouched (the seats were taken at reservation), so no fence is needed.
    pub async fn confirm_paid(&self, order: OrderId) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        let mut tx = self.pool.begin().await?;
        sql::confirm_order(&mut tx, order, &now).await?;
        tx.commit().await?;
        crate::meter::settled(None);
        Ok(())
    }

    /// Every event's newest token, to seed Redis' counters at start.
    pub async fn fences(&self) -> StoreResult<Vec<(EventId, i64)>> {
        let rows = sqlx::query("SELECT id, fence FROM events WHERE fence > 0")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| Ok((EventId(r.try_get(0)?), r.try_get(1)?)))
            .collect()
    }

    /// Tickets `user` holds or owns for `event` (for the per-user limit).
    pub async fn held_or_owned(&self, event: EventId, user: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM tickets WHERE event_id = $1 AND user_id = $2 AND status IN ('pending', 'confirmed')",
        )
        .bind(event.0)
        .bind(user)
        .fetch_one(&self.pool)
        .await?)
    }
}

/// `fence` raised to the writer's token ($2), written without `max()`/`GREATEST()`, which the
/// two engines spell differently.
const FENCE_RAISED: &str = "fence = CASE WHEN fence > $2 THEN fence ELSE $2 END";
/// The write goes through if fencing is off ($4 = 0) or no newer token has claimed the event.
const FENCE_HOLDS: &str = "($4 = 0 OR fence <= $2)";
