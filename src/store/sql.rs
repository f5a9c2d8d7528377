//! The purchase writes, as functions over one connection. The group-commit writer runs them
//! inside its transactions; the monolith runs them one autocommit statement at a time, exactly
//! as racy as the seed.

use sqlx::AnyConnection;
use uuid::Uuid;

use crate::domain::{
    timestamp, CancelReason, EventId, Money, Order, OrderId, OrderStatus, PaymentStatus, TicketId,
};

/// The client's Idempotency-Key (API v2) an order was placed with, and the answer that key
/// stores: written in the same transaction as the order, so no crash can leave an order whose
/// key still says `in_flight`.
#[derive(Debug, Clone)]
pub struct OrderKey {
    pub key: String,
    /// The stored answer's HTTP status.
    pub status: u16,
    /// Makes the stored answer's body from the order as placed.
    pub render: fn(&Order) -> String,
}

/// An order about to be held: its tickets, its price, and the keys it carries.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub order: OrderId,
    pub tickets: Vec<TicketId>,
    pub event: EventId,
    pub user: String,
    pub unit_price: Money,
    /// The client's Idempotency-Key (API v2), if the order came with one.
    pub idempotency: Option<OrderKey>,
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

    /// The client's Idempotency-Key, if any.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency.as_ref().map(|k| k.key.as_str())
    }

    /// The order as it stands once held: `pending`, not yet updated.
    pub fn placed(&self) -> Order {
        Order {
            id: self.order,
            event_id: self.event,
            user_id: self.user.clone(),
            quantity: self.tickets.len() as u32,
            amount_cents: self.amount_cents(),
            status: OrderStatus::Pending,
            cancel_reason: None,
            tickets: self.tickets.clone(),
            created_at: self.created_at.clone(),
            updated_at: self.created_at.clone(),
        }
    }
}

/// Stores the key answers of `orders` that carry one, completing their claims.
async fn complete_keys(conn: &mut AnyConnection, orders: &[&NewOrder]) -> Result<(), sqlx::Error> {
    let now = timestamp(chrono::Utc::now());
    for o in orders {
        let Some(key) = &o.idempotency else {
            continue;
        };
        sqlx::query(
            "UPDATE idempotency_keys SET state = 'done', status = $1, body = $2, completed_at = $3
             WHERE user_id = $4 AND key = $5 AND state = 'in_flight'",
        )
        .bind(i64::from(key.status))
        .bind((key.render)(&o.placed()))
        .bind(&now)
        .bind(&o.user)
        .bind(&key.key)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Inserts the order, its tickets and its payment, all `pending`, and stores its key's answer.
/// Inventory is not touched.
pub async fn insert_order(conn: &mut AnyConnection, o: &NewOrder) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO orders (id, event_id, user_id, quantity, amount_cents, status, idempotency_key, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8)",
    )
    .bind(o.order.0.to_string())
    .bind(o.event.0)
    .bind(&o.user)
    .bind(o.tickets.len() as i64)
    .bind(o.amount_cents())
    .bind(o.idempotency_key())
    .bind(&o.created_at)
    .bind(&o.created_at)
    .execute(&mut *conn)
    .await?;
    for ticket in &o.tickets {
        sqlx::query(
            "INSERT INTO tickets (id, order_id, event_id, user_id, purchase_date, price_cents, status)
             VALUES ($1, $2, $3, $4, $5, $6, 'pending')",
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
         VALUES ($1, $2, $3, $4, 'pending', $5, $6)",
    )
    .bind(Uuid::new_v4().to_string())
    .bind(o.order.0.to_string())
    .bind(&o.user)
    .bind(o.amount_cents())
    .bind(o.payment_key())
    .bind(&o.created_at)
    .execute(&mut *conn)
    .await?;
    complete_keys(conn, &[o]).await
}

/// Moves a `pending` order and its tickets to `status`; refuses any other starting state.
pub async fn finish_order(
    conn: &mut AnyConnection,
    order: OrderId,
    status: OrderStatus,
    reason: Option<CancelReason>,
    now: &str,
) -> Result<(), sqlx::Error> {
    let reason = reason.map(CancelReason::as_str);
    let affected = sqlx::query(
        "UPDATE orders SET status = $1, cancel_reason = $2, updated_at = $3 WHERE id = $4 AND status = 'pending'",
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
        "UPDATE tickets SET status = $1, cancel_reason = $2 WHERE order_id = $3 AND status = 'pending'",
    )
    .bind(status.as_str())
    .bind(reason)
    .bind(order.0.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The order and its tickets `confirmed`, then its payment `completed` (two statements).
pub async fn confirm_order(
    conn: &mut AnyConnection,
    order: OrderId,
    now: &str,
) -> Result<(), sqlx::Error> {
    finish_order(conn, order, OrderStatus::Confirmed, None, now).await?;
    settle_payment(conn, order, PaymentStatus::Completed, now).await
}

/// Takes an order's seats out of (`sign = -1`) or back into (`sign = 1`) `available_tickets`.
pub async fn move_seats(
    conn: &mut AnyConnection,
    order: OrderId,
    event: EventId,
    sign: i64,
) -> Result<(), sqlx::Error> {
    let affected = sqlx::query(
        "UPDATE events SET available_tickets = available_tickets + $1 * (SELECT quantity FROM orders WHERE id = $2)
         WHERE id = $3",
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
    conn: &mut AnyConnection,
    order: OrderId,
    status: PaymentStatus,
    now: &str,
) -> Result<(), sqlx::Error> {
    let affected = sqlx::query(
        "UPDATE payments SET status = $1, processed_at = $2 WHERE order_id = $3 AND status = 'pending'",
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

/// Most rows or ids one statement carries (well under SQLite's and PostgreSQL's limits of
/// bound parameters).
pub(super) const CHUNK: usize = 400;

/// `rows` groups of `columns` numbered parameters, `($1, $2), ($3, $4)`, each group written
/// with `shape`, where `?` stands for the next parameter; numbering starts after `first - 1`.
pub(super) fn numbered(shape: &str, rows: usize, first: usize) -> String {
    let mut next = first;
    let mut out = String::with_capacity(rows * (shape.len() + 8));
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        for c in shape.chars() {
            if c == '?' {
                out.push('$');
                out.push_str(&next.to_string());
                next += 1;
            } else {
                out.push(c);
            }
        }
    }
    out
}

/// Inserts many orders with their tickets and payments in a few multi-row statements, and
/// stores their keys' answers.
pub async fn insert_orders(
    conn: &mut AnyConnection,
    orders: &[&NewOrder],
) -> Result<(), sqlx::Error> {
    for chunk in orders.chunks(CHUNK / 10) {
        let rows = numbered("(?, ?, ?, ?, ?, 'pending', ?, ?, ?)", chunk.len(), 1);
        let sql = format!(
            "INSERT INTO orders (id, event_id, user_id, quantity, amount_cents, status, idempotency_key, created_at, updated_at) VALUES {rows}"
        );
        let mut query = sqlx::query(&sql);
        for o in chunk {
            query = query
                .bind(o.order.0.to_string())
                .bind(o.event.0)
                .bind(&o.user)
                .bind(o.tickets.len() as i64)
                .bind(o.amount_cents())
                .bind(o.idempotency_key())
                .bind(&o.created_at)
                .bind(&o.created_at);
        }
        query.execute(&mut *conn).await?;

        let rows = numbered("(?, ?, ?, ?, 'pending', ?, ?)", chunk.len(), 1);
        let sql = format!(
            "INSERT INTO payments (id, order_id, user_id, amount_cents, status, idempotency_key, created_at) VALUES {rows}"
        );
        let mut query = sqlx::query(&sql);
        for o in chunk {
            query = query
                .bind(Uuid::new_v4().to_string())
                .bind(o.order.0.to_string())
                .bind(&o.user)
                .bind(o.amount_cents())
                .bind(o.payment_key())
                .bind(&o.created_at);
        }
        query.execute(&mut *conn).await?;
    }
    let tickets: Vec<(&NewOrder, &TicketId)> = orders
        .iter()
        .flat_map(|o| o.tickets.iter().map(move |t| (*o, t)))
        .collect();
    for chunk in tickets.chunks(CHUNK / 7) {
        let rows = numbered("(?, ?, ?, ?, ?, ?, 'pending')", chunk.len(), 1);
        let sql = format!(
            "INSERT INTO tickets (id, order_id, event_id, user_id, purchase_date, price_cents, status) VALUES {rows}"
        );
        let mut query = sqlx::query(&sql);
        for (o, ticket) in chunk {
            query = query
                .bind(ticket.0.to_string())
                .bind(o.order.0.to_string())
                .bind(o.event.0)
                .bind(&o.user)
                .bind(&o.created_at)
                .bind(o.unit_price.cents());
        }
        query.execute(&mut *conn).await?;
    }
    complete_keys(conn, orders).await
}

/// Confirms many `pending` orders (and their tickets) and completes their payments, in three
/// statements per chunk; an order that is not `pending` fails the whole call.
pub async fn confirm_orders(
    conn: &mut AnyConnection,
    orders: &[OrderId],
    now: &str,
) -> Result<(), sqlx::Error> {
    for chunk in orders.chunks(CHUNK) {
        // $1 is the time; the ids follow.
        let ids = numbered("?", chunk.len(), 2);
        let orders_sql = format!(
            "UPDATE orders SET status = 'confirmed', updated_at = $1 WHERE status = 'pending' AND id IN ({ids})"
        );
        let confirmed = bind_ids(sqlx::query(&orders_sql).bind(now), chunk)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        let payments_sql = format!(
            "UPDATE payments SET status = 'completed', processed_at = $1 WHERE status = 'pending' AND order_id IN ({ids})"
        );
        let completed = bind_ids(sqlx::query(&payments_sql).bind(now), chunk)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if confirmed != chunk.len() as u64 || completed != chunk.len() as u64 {
            return Err(sqlx::Error::Protocol(format!(
                "expected {} pending orders and payments to confirm, found {confirmed} and {completed}",
                chunk.len()
            )));
        }
        let ids = numbered("?", chunk.len(), 1);
        let tickets_sql = format!(
            "UPDATE tickets SET status = 'confirmed' WHERE status = 'pending' AND order_id IN ({ids})"
        );
        bind_ids(sqlx::query(&tickets_sql), chunk)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn bind_ids<'q>(mut query: AnyQuery<'q>, orders: &[OrderId]) -> AnyQuery<'q> {
    for order in orders {
        query = query.bind(order.0.to_string());
    }
    query
}

/// The seats of these orders, summed per event.
pub async fn seats_per_event(
    conn: &mut AnyConnection,
    orders: &[OrderId],
) -> Result<Vec<(EventId, i64)>, sqlx::Error> {
    let mut per_event: Vec<(EventId, i64)> = Vec::new();
    for chunk in orders.chunks(CHUNK) {
        let ids = numbered("?", chunk.len(), 1);
        let sql = format!(
            "SELECT event_id, CAST(SUM(quantity) AS BIGINT) FROM orders WHERE id IN ({ids}) GROUP BY event_id"
        );
        let query = bind_ids(sqlx::query(&sql), chunk);
        for row in query.fetch_all(&mut *conn).await? {
            use sqlx::Row;
            per_event.push((EventId(row.try_get(0)?), row.try_get(1)?));
        }
    }
    Ok(per_event)
}

/// Adds `delta` (negative to take seats) to an event's `available_tickets`.
pub async fn add_available(
    conn: &mut AnyConnection,
    event: EventId,
    delta: i64,
) -> Result<(), sqlx::Error> {
    let affected =
        sqlx::query("UPDATE events SET available_tickets = available_tickets + $1 WHERE id = $2")
            .bind(delta)
            .bind(event.0)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    expect_one(affected, "event")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parameters_are_numbered_across_rows() {
        assert_eq!(
            super::numbered("(?, 'x', ?)", 2, 1),
            "($1, 'x', $2), ($3, 'x', $4)"
        );
        assert_eq!(super::numbered("?", 3, 2), "$2, $3, $4");
    }
}
