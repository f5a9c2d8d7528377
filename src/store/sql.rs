//! The purchase writes, as functions over one connection. The group-commit writer runs them
//! inside its transactions; the monolith runs them one autocommit statement at a time, exactly
//! as racy as the seed.

use sqlx::SqliteConnection;
use uuid::Uuid;

use crate::domain::{CancelReason, EventId, Money, OrderId, OrderStatus, PaymentStatus, TicketId};

/// An order about to be held: its tickets, its price, and the keys it carries.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub order: OrderId,
    pub tickets: Vec<TicketId>,
    pub event: EventId,
    pub user: String,
    pub unit_price: Money,
    /// The client's Idempotency-Key (API v2), if the order came with one.
    pub idempotency_key: Option<String>,
    pub created_at: String,
}

/// The key an order's payment uses with the gateway, which deduplicates on it.
pub fn payment_key(order: OrderId) -> String {
    format!("order-{order}")
}

impl NewOrder {
    /// The key the payment gateway deduplicates on.
    pub fn payment_key(&self) -> String {
        payment_key(self.order)
    }

    pub fn amount_cents(&self) -> i64 {
        self.unit_price.cents() * self.tickets.len() as i64
    }
}

/// Inserts the order, its tickets and its payment, all `pending`. Inventory is not touched.
pub async fn insert_order(conn: &mut SqliteConnection, o: &NewOrder) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO orders (id, event_id, user_id, quantity, amount_cents, status, idempotency_key, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
    )
    .bind(o.order.0.to_string())
    .bind(o.event.0)
    .bind(&o.user)
    .bind(o.tickets.len() as i64)
    .bind(o.amount_cents())
    .bind(&o.idempotency_key)
    .bind(&o.created_at)
    .bind(&o.created_at)
    .execute(&mut *conn)
    .await?;
    for ticket in &o.tickets {
        sqlx::query(
            "INSERT INTO tickets (id, order_id, event_id, user_id, purchase_date, price_cents, status)
             VALUES (?, ?, ?, ?, ?, ?, 'pending')",
        )
        .bind(ticket.0.to_string())
        .bind(o.order.0.to_string())
        .bind(o.event.0)
        .bind(&o.user)
        .bind(&o.created_at)
        .bind(o.unit_price.cents())
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "INSERT INTO payments (id, order_id, user_id, amount_cents, status, idempotency_key, created_at)
         VALUES (?, ?, ?, ?, 'pending', ?, ?)",
    )
    .bind(Uuid::new_v4().to_string())
    .bind(o.order.0.to_string())
    .bind(&o.user)
    .bind(o.amount_cents())
    .bind(o.payment_key())
    .bind(&o.created_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves a `pending` order and its tickets to `status`; refuses any other starting state.
pub async fn finish_order(
    conn: &mut SqliteConnection,
    order: OrderId,
    status: OrderStatus,
    reason: Option<CancelReason>,
    now: &str,
) -> Result<(), sqlx::Error> {
    let reason = reason.map(CancelReason::as_str);
    let affected = sqlx::query(
        "UPDATE orders SET status = ?, cancel_reason = ?, updated_at = ? WHERE id = ? AND status = 'pending'",
    )
    .bind(status.as_str())
    .bind(reason)
    .bind(now)
    .bind(order.0.to_string())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    expect_one(affected, "pending order")?;
    sqlx::query(
        "UPDATE tickets SET status = ?, cancel_reason = ? WHERE order_id = ? AND status = 'pending'",
    )
    .bind(status.as_str())
    .bind(reason)
    .bind(order.0.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Takes an order's seats out of (`sign = -1`) or back into (`sign = 1`) `available_tickets`.
pub async fn move_seats(
    conn: &mut SqliteConnection,
    order: OrderId,
    event: EventId,
    sign: i64,
) -> Result<(), sqlx::Error> {
    let affected = sqlx::query(
        "UPDATE events SET available_tickets = available_tickets + ? * (SELECT quantity FROM orders WHERE id = ?)
         WHERE id = ?",
    )
    .bind(sign)
    .bind(order.0.to_string())
    .bind(event.0)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    expect_one(affected, "event")
}

/// Records a `pending` payment's outcome.
pub async fn settle_payment(
    conn: &mut SqliteConnection,
    order: OrderId,
    status: PaymentStatus,
    now: &str,
) -> Result<(), sqlx::Error> {
    let affected = sqlx::query(
        "UPDATE payments SET status = ?, processed_at = ? WHERE order_id = ? AND status = 'pending'",
    )
    .bind(status.as_str())
    .bind(now)
    .bind(order.0.to_string())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    expect_one(affected, "pending payment")
}

fn expect_one(affected: u64, what: &str) -> Result<(), sqlx::Error> {
    if affected == 1 {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!(
            "expected one {what}, found {affected}"
        )))
    }
}
