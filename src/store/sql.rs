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

/// Most rows or ids one statement carries (well under SQLite's limit of bound parameters).
const CHUNK: usize = 400;

/// Inserts many orders with their tickets and payments in a few multi-row statements.
pub async fn insert_orders(
    conn: &mut SqliteConnection,
    orders: &[&NewOrder],
) -> Result<(), sqlx::Error> {
    for chunk in orders.chunks(CHUNK / 10) {
        let rows = vec!["(?, ?, ?, ?, ?, 'pending', ?, ?, ?)"; chunk.len()].join(", ");
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
                .bind(&o.idempotency_key)
                .bind(&o.created_at)
                .bind(&o.created_at);
        }
        query.execute(&mut *conn).await?;

        let rows = vec!["(?, ?, ?, ?, 'pending', ?, ?)"; chunk.len()].join(", ");
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
        let rows = vec!["(?, ?, ?, ?, ?, ?, 'pending')"; chunk.len()].join(", ");
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
    Ok(())
}

/// Confirms many `pending` orders (and their tickets) and completes their payments, in three
/// statements per chunk; an order that is not `pending` fails the whole call.
pub async fn confirm_orders(
    conn: &mut SqliteConnection,
    orders: &[OrderId],
    now: &str,
) -> Result<(), sqlx::Error> {
    for chunk in orders.chunks(CHUNK) {
        let ids = vec!["?"; chunk.len()].join(", ");
        let orders_sql = format!(
            "UPDATE orders SET status = 'confirmed', updated_at = ? WHERE status = 'pending' AND id IN ({ids})"
        );
        let confirmed = bind_ids(sqlx::query(&orders_sql).bind(now), chunk)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        let payments_sql = format!(
            "UPDATE payments SET status = 'completed', processed_at = ? WHERE status = 'pending' AND order_id IN ({ids})"
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
        let tickets_sql = format!(
            "UPDATE tickets SET status = 'confirmed' WHERE status = 'pending' AND order_id IN ({ids})"
        );
        bind_ids(sqlx::query(&tickets_sql), chunk)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

fn bind_ids<'q>(mut query: SqliteQuery<'q>, orders: &[OrderId]) -> SqliteQuery<'q> {
    for order in orders {
        query = query.bind(order.0.to_string());
    }
    query
}

/// The seats of these orders, summed per event.
pub async fn seats_per_event(
    conn: &mut SqliteConnection,
    orders: &[OrderId],
) -> Result<Vec<(EventId, i64)>, sqlx::Error> {
    let mut per_event: Vec<(EventId, i64)> = Vec::new();
    for chunk in orders.chunks(CHUNK) {
        let ids = vec!["?"; chunk.len()].join(", ");
        let sql = format!(
            "SELECT event_id, SUM(quantity) FROM orders WHERE id IN ({ids}) GROUP BY event_id"
        );
        let mut query = sqlx::query_as::<_, (i64, i64)>(&sql);
        for order in chunk {
            query = query.bind(order.0.to_string());
        }
        for (event, seats) in query.fetch_all(&mut *conn).await? {
            per_event.push((EventId(event), seats));
        }
    }
    Ok(per_event)
}

/// Adds `delta` (negative to take seats) to an event's `available_tickets`.
pub async fn add_available(
    conn: &mut SqliteConnection,
    event: EventId,
    delta: i64,
) -> Result<(), sqlx::Error> {
    let affected =
        sqlx::query("UPDATE events SET available_tickets = available_tickets + ? WHERE id = ?")
            .bind(delta)
            .bind(event.0)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    expect_one(affected, "event")
}
