//! SQLite storage shared by the stages: the schema (`migrations/sqlite`), reads, the monolith's
//! step-by-step writes, and the group-commit [`writer`] the actor stage uses.

pub mod accounts;
pub mod fenced;
pub mod sql;
pub mod writer;

use std::str::FromStr;
use std::time::Duration;

use chrono::Utc;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, FromRow, Row};
use uuid::Uuid;

use crate::config::Durability;
use crate::domain::{
    timestamp, CancelReason, Event, EventId, Money, NewEvent, Order, OrderId, OrderStatus,
    PaymentStatus, Ticket, TicketId, TicketStatus, UserId,
};

pub use sql::NewOrder;
pub use writer::{WriteHandle, WriteOp, WriterFull};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A write found the row in another state than the caller expected.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The group-commit writer has stopped (the server is shutting down).
    #[error("the database writer has stopped")]
    WriterClosed,
}

impl StoreError {
    /// True when a CHECK, UNIQUE or FOREIGN KEY constraint refused the write.
    pub fn is_constraint(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::Database(e)) => e.kind() != sqlx::error::ErrorKind::Other,
            Self::Conflict(_) => true,
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    options: SqliteConnectOptions,
}

/// An order whose payment was left `pending` by a run that stopped (found at start-up).
#[derive(Debug, Clone)]
pub struct PendingPurchase {
    /// The order was already cancelled (its hold expired) while the payment was in flight.
    pub order_cancelled: bool,
    pub order: OrderId,
    pub event: EventId,
    pub amount: Money,
    pub payment_key: String,
}

/// A search over events (API v2): filters, sort, one page.
#[derive(Debug, Clone)]
pub struct EventQuery {
    /// Exact venue, ignoring case.
    pub venue: Option<String>,
    /// Earliest and latest date, as stored timestamps (RFC 3339, UTC, milliseconds).
    pub from: Option<String>,
    pub to: Option<String>,
    /// Only events with (true) or without (false) tickets left.
    pub available: Option<bool>,
    pub sort: EventSort,
    pub descending: bool,
    pub limit: u32,
    pub offset: u64,
}

/// What events can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSort {
    Date,
    Name,
    Price,
    Available,
    Created,
}

impl EventSort {
    fn column(self) -> &'static str {
        match self {
            Self::Date => "date",
            Self::Name => "name",
            Self::Price => "price_cents",
            Self::Available => "available_tickets",
            Self::Created => "id",
        }
    }
}

/// Per-event counters as stored, for recovery and the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredCounts {
    pub event: EventId,
    pub total: i64,
    pub available: i64,
    pub confirmed: i64,
    pub pending: i64,
    pub cancelled: i64,
}

/// A payment row as the audit needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRecord {
    pub order: String,
    pub order_status: String,
    pub status: String,
    pub key: String,
}

impl Store {
    /// Opens (creating if missing) the database at `database`, a path or `sqlite:` URL, and
    /// applies the migrations.
    pub async fn open(database: &str, durability: Durability) -> StoreResult<Self> {
        let options = connect_options(database, durability)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool, options })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Starts the group-commit writer on its own connection.
    /// The task ends once every handle is dropped and the queue is drained.
    pub async fn start_writer(
        &self,
        max_batch: usize,
        capacity: usize,
    ) -> StoreResult<(WriteHandle, tokio::task::JoinHandle<()>)> {
        let conn = self.options.clone().connect().await?;
        Ok(writer::start(conn, max_batch, capacity))
    }

    /// Checks the database answers (for health).
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn create_event(&self, new: &NewEvent) -> StoreResult<Event> {
        let created_at = timestamp(Utc::now());
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO events (name, venue, date, total_tickets, available_tickets, price_cents, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&new.name)
        .bind(&new.venue)
        .bind(timestamp(new.date))
        .bind(i64::from(new.total_tickets))
        .bind(i64::from(new.total_tickets))
        .bind(new.price.cents())
        .bind(&created_at)
        .fetch_one(&self.pool)
        .await?;
        self.event(EventId(id))
            .await?
            .ok_or_else(|| StoreError::Conflict("event vanished after insert".into()))
    }

    pub async fn list_events(&self) -> StoreResult<Vec<Event>> {
        let rows: Vec<EventRow> = sqlx::query_as(&format!("{EVENT_COLUMNS} ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }

    /// One page of events matching `query`, and how many match in all.
    pub async fn search_events(&self, query: &EventQuery) -> StoreResult<(Vec<Event>, i64)> {
        let mut filters = Vec::new();
        if query.venue.is_some() {
            filters.push("lower(venue) = lower(?)");
        }
        if query.from.is_some() {
            filters.push("date >= ?");
        }
        if query.to.is_some() {
            filters.push("date <= ?");
        }
        match query.available {
            Some(true) => filters.push("available_tickets > 0"),
            Some(false) => filters.push("available_tickets = 0"),
            None => {}
        }
        let filter = if filters.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", filters.join(" AND "))
        };
        let order = format!(
            " ORDER BY {} {}, id ASC LIMIT ? OFFSET ?",
            query.sort.column(),
            if query.descending { "DESC" } else { "ASC" }
        );
        let count_sql = format!("SELECT COUNT(*) FROM events{filter}");
        let page_sql = format!("{EVENT_COLUMNS}{filter}{order}");
        let mut count = sqlx::query_scalar::<_, i64>(&count_sql);
        let mut page = sqlx::query_as::<_, EventRow>(&page_sql);
        for value in [&query.venue, &query.from, &query.to].into_iter().flatten() {
            count = count.bind(value.clone());
            page = page.bind(value.clone());
        }
        let total = count.fetch_one(&self.pool).await?;
        let rows = page
            .bind(i64::from(query.limit))
            .bind(query.offset as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok((rows.into_iter().map(Event::from).collect(), total))
    }

    pub async fn event(&self, id: EventId) -> StoreResult<Option<Event>> {
        let row: Option<EventRow> = sqlx::query_as(&format!("{EVENT_COLUMNS} WHERE id = ?"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Event::from))
    }

    pub async fn user_tickets(&self, user: &UserId) -> StoreResult<Vec<Ticket>> {
        let rows: Vec<TicketRow> = sqlx::query_as(&format!(
            "{TICKET_COLUMNS} WHERE user_id = ? ORDER BY purchase_date, id"
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Ticket::try_from).collect()
    }

    pub async fn ticket(&self, id: TicketId) -> StoreResult<Option<Ticket>> {
        let row: Option<TicketRow> = sqlx::query_as(&format!("{TICKET_COLUMNS} WHERE id = ?"))
            .bind(id.0.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(Ticket::try_from).transpose()
    }

    // --- the monolith's steps: each its own autocommit statement, no transaction around them ---

    /// Step 1: the event's `available_tickets` and price as they are right now.
    pub async fn read_availability(&self, id: EventId) -> StoreResult<Option<(i64, Money)>> {
        let row = sqlx::query("SELECT available_tickets, price_cents FROM events WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let cents: i64 = r.get(1);
            let price = Money::from_cents(cents)
                .map_err(|e| StoreError::Conflict(format!("stored price invalid: {e}")))?;
            Ok((r.get(0), price))
        })
        .transpose()
    }

    /// Step 2: a pending order with its tickets and payment, each its own autocommit
    /// statement.
    pub async fn insert_pending_order(&self, order: &NewOrder) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        sql::insert_order(&mut conn, order).await?;
        Ok(())
    }

    /// Step 4a: the order confirmed, then its payment completed (two statements).
    pub async fn confirm_order(&self, order: OrderId) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        let mut conn = self.pool.acquire().await?;
        sql::finish_order(&mut conn, order, OrderStatus::Confirmed, None, &now).await?;
        sql::settle_payment(&mut conn, order, PaymentStatus::Completed, &now).await?;
        Ok(())
    }

    /// Step 4b: the order cancelled, then its payment failed; inventory is not touched.
    pub async fn cancel_order(&self, order: OrderId, reason: CancelReason) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        let mut conn = self.pool.acquire().await?;
        sql::finish_order(&mut conn, order, OrderStatus::Cancelled, Some(reason), &now).await?;
        sql::settle_payment(&mut conn, order, PaymentStatus::Failed, &now).await?;
        Ok(())
    }

    /// Step 5: writes back `available_tickets` as the caller computed it (a lost update waiting
    /// to happen: that is the monolith's lesson).
    pub async fn write_available(&self, id: EventId, available: i64) -> StoreResult<()> {
        sqlx::query("UPDATE events SET available_tickets = ? WHERE id = ?")
            .bind(available)
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // --- recovery and audit ---

    /// Purchases that were interrupted: payments still `pending`, with their orders.
    pub async fn pending_purchases(&self) -> StoreResult<Vec<PendingPurchase>> {
        let rows = sqlx::query(
            "SELECT o.id, o.event_id, o.amount_cents, p.idempotency_key, o.status
             FROM orders o JOIN payments p ON p.order_id = o.id
             WHERE p.status = 'pending' OR o.status = 'pending' ORDER BY o.created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(PendingPurchase {
                    order: OrderId(parse_uuid(r.get::<String, _>(0))?),
                    event: EventId(r.get(1)),
                    amount: Money::from_cents(r.get(2))
                        .map_err(|e| StoreError::Conflict(e.to_string()))?,
                    payment_key: r.get(3),
                    order_cancelled: r.get::<String, _>(4) == "cancelled",
                })
            })
            .collect()
    }

    /// Counters per event: the stored `available` beside counts of tickets by status.
    pub async fn event_counts(&self) -> StoreResult<Vec<StoredCounts>> {
        let rows = sqlx::query(
            "SELECT e.id, e.total_tickets, e.available_tickets,
                    COALESCE(SUM(t.status = 'confirmed'), 0),
                    COALESCE(SUM(t.status = 'pending'), 0),
                    COALESCE(SUM(t.status = 'cancelled'), 0)
             FROM events e LEFT JOIN tickets t ON t.event_id = e.id
             GROUP BY e.id ORDER BY e.id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| StoredCounts {
                event: EventId(r.get(0)),
                total: r.get(1),
                available: r.get(2),
                confirmed: r.get(3),
                pending: r.get(4),
                cancelled: r.get(5),
            })
            .collect())
    }

    /// Every payment row with its ticket's status.
    pub async fn payment_records(&self) -> StoreResult<Vec<PaymentRecord>> {
        let rows = sqlx::query(
            "SELECT p.order_id, o.status, p.status, p.idempotency_key
             FROM payments p JOIN orders o ON o.id = p.order_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| PaymentRecord {
                order: r.get(0),
                order_status: r.get(1),
                status: r.get(2),
                key: r.get(3),
            })
            .collect())
    }

    /// Tickets each user owns (confirmed) for one event, to rebuild per-user limits.
    pub async fn owned_by_user(&self, event: EventId) -> StoreResult<Vec<(String, u32)>> {
        let rows = sqlx::query(
            "SELECT user_id, COUNT(*) FROM tickets WHERE event_id = ? AND status = 'confirmed' GROUP BY user_id",
        )
        .bind(event.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get::<i64, _>(1) as u32))
            .collect())
    }

    pub async fn order(&self, id: OrderId) -> StoreResult<Option<Order>> {
        let row: Option<OrderRow> = sqlx::query_as(&format!("{ORDER_COLUMNS} WHERE id = ?"))
            .bind(id.0.to_string())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Some(self.with_tickets(row).await?)),
            None => Ok(None),
        }
    }

    /// A user's orders, newest first.
    pub async fn user_orders(&self, user: &UserId) -> StoreResult<Vec<Order>> {
        let rows: Vec<OrderRow> = sqlx::query_as(&format!(
            "{ORDER_COLUMNS} WHERE user_id = ? ORDER BY created_at DESC, id"
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut orders = Vec::with_capacity(rows.len());
        for row in rows {
            orders.push(self.with_tickets(row).await?);
        }
        Ok(orders)
    }

    async fn with_tickets(&self, row: OrderRow) -> StoreResult<Order> {
        let tickets: Vec<String> =
            sqlx::query_scalar("SELECT id FROM tickets WHERE order_id = ? ORDER BY id")
                .bind(&row.id)
                .fetch_all(&self.pool)
                .await?;
        Ok(Order {
            id: OrderId(parse_uuid(row.id)?),
            event_id: EventId(row.event_id),
            user_id: row.user_id,
            quantity: row.quantity as u32,
            amount_cents: row.amount_cents,
            status: TicketStatus::parse(&row.status)
                .ok_or_else(|| StoreError::Conflict(format!("unknown status {}", row.status)))?,
            cancel_reason: row.cancel_reason,
            tickets: tickets
                .into_iter()
                .map(|t| parse_uuid(t).map(TicketId))
                .collect::<StoreResult<_>>()?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }

    /// The first ticket of an order (an API v1 purchase has exactly one).
    pub async fn first_ticket(&self, order: OrderId) -> StoreResult<Option<Ticket>> {
        let row: Option<TicketRow> = sqlx::query_as(&format!(
            "{TICKET_COLUMNS} WHERE order_id = ? ORDER BY id LIMIT 1"
        ))
        .bind(order.0.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Ticket::try_from).transpose()
    }

    /// How many tickets an event has issued so far, in any state.
    pub async fn tickets_issued(&self, event: EventId) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM tickets WHERE event_id = ?")
                .bind(event.0)
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

fn connect_options(database: &str, durability: Durability) -> StoreResult<SqliteConnectOptions> {
    let base = if database.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(database)?
    } else {
        SqliteConnectOptions::new().filename(database)
    };
    Ok(base
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match durability {
            Durability::Normal => SqliteSynchronous::Normal,
            Durability::Full => SqliteSynchronous::Full,
        })
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true))
}

const EVENT_COLUMNS: &str = "SELECT id, name, venue, date, total_tickets, available_tickets, price_cents, created_at FROM events";
const ORDER_COLUMNS: &str = "SELECT id, event_id, user_id, quantity, amount_cents, status, cancel_reason, created_at, updated_at FROM orders";
const TICKET_COLUMNS: &str =
    "SELECT id, event_id, user_id, purchase_date, price_cents, status, cancel_reason FROM tickets";

#[derive(FromRow)]
struct EventRow {
    id: i64,
    name: String,
    venue: String,
    date: String,
    total_tickets: i64,
    available_tickets: i64,
    price_cents: i64,
    created_at: String,
}

impl From<EventRow> for Event {
    fn from(r: EventRow) -> Self {
        Event {
            id: EventId(r.id),
            name: r.name,
            venue: r.venue,
            date: r.date,
            total_tickets: r.total_tickets as u32,
            available_tickets: r.available_tickets as u32,
            price: r.price_cents as f64 / 100.0,
            price_cents: r.price_cents,
            created_at: r.created_at,
        }
    }
}

#[derive(FromRow)]
struct OrderRow {
    id: String,
    event_id: i64,
    user_id: String,
    quantity: i64,
    amount_cents: i64,
    status: String,
    cancel_reason: Option<String>,
    created_at: String,
    updated_at: String,
}

#[derive(FromRow)]
struct TicketRow {
    id: String,
    event_id: i64,
    user_id: String,
    purchase_date: String,
    price_cents: i64,
    status: String,
    cancel_reason: Option<String>,
}

impl TryFrom<TicketRow> for Ticket {
    type Error = StoreError;

    fn try_from(r: TicketRow) -> Result<Self, Self::Error> {
        Ok(Ticket {
            id: TicketId(parse_uuid(r.id)?),
            event_id: EventId(r.event_id),
            user_id: r.user_id,
            purchase_date: r.purchase_date,
            price: r.price_cents as f64 / 100.0,
            price_cents: r.price_cents,
            status: TicketStatus::parse(&r.status)
                .ok_or_else(|| StoreError::Conflict(format!("unknown status {}", r.status)))?,
            cancel_reason: r.cancel_reason,
        })
    }
}

fn parse_uuid(raw: String) -> StoreResult<Uuid> {
    Uuid::parse_str(&raw)
        .map_err(|_| StoreError::Conflict(format!("stored id {raw} is not a UUID")))
}
