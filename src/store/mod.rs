//! SQLite storage shared by the stages: the schema (`migrations/sqlite`), reads, the monolith's
//! step-by-step writes, and the group-commit [`writer`] the actor stage uses.

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
    timestamp, CancelReason, Event, EventId, Money, NewEvent, PaymentStatus, Ticket, TicketId,
    TicketStatus, UserId,
};

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

/// A purchase whose payment was left `pending` by a run that stopped (found at start-up).
#[derive(Debug, Clone)]
pub struct PendingPurchase {
    /// The ticket was already cancelled (its hold expired) while the payment was in flight.
    pub ticket_cancelled: bool,
    pub ticket: TicketId,
    pub event: EventId,
    pub user: String,
    pub price: Money,
    pub payment_key: String,
}

/// Per-event counters as stored, for recovery and the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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
    pub ticket: String,
    pub ticket_status: String,
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

    /// Step 2: a pending ticket and its pending payment.
    pub async fn insert_pending_ticket(
        &self,
        ticket: TicketId,
        event: EventId,
        user: &UserId,
        price: Money,
        payment_key: &str,
    ) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        sqlx::query(INSERT_TICKET)
            .bind(ticket.0.to_string())
            .bind(event.0)
            .bind(user.as_str())
            .bind(&now)
            .bind(price.cents())
            .execute(&self.pool)
            .await?;
        sqlx::query(INSERT_PAYMENT)
            .bind(Uuid::new_v4().to_string())
            .bind(ticket.0.to_string())
            .bind(user.as_str())
            .bind(price.cents())
            .bind(payment_key)
            .bind(&now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Step 4a: the ticket confirmed and its payment completed.
    pub async fn confirm_ticket(&self, ticket: TicketId) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        sqlx::query(CONFIRM_TICKET)
            .bind(ticket.0.to_string())
            .execute(&self.pool)
            .await?;
        sqlx::query(SETTLE_PAYMENT)
            .bind(PaymentStatus::Completed.as_str())
            .bind(&now)
            .bind(ticket.0.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Step 4b: the ticket cancelled and its payment failed; inventory is not touched.
    pub async fn cancel_ticket(&self, ticket: TicketId, reason: CancelReason) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        sqlx::query(CANCEL_TICKET)
            .bind(reason.as_str())
            .bind(ticket.0.to_string())
            .execute(&self.pool)
            .await?;
        sqlx::query(SETTLE_PAYMENT)
            .bind(PaymentStatus::Failed.as_str())
            .bind(&now)
            .bind(ticket.0.to_string())
            .execute(&self.pool)
            .await?;
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

    /// Purchases that were interrupted: payments still `pending`, with their tickets.
    pub async fn pending_purchases(&self) -> StoreResult<Vec<PendingPurchase>> {
        let rows = sqlx::query(
            "SELECT t.id, t.event_id, t.user_id, t.price_cents, p.idempotency_key, t.status
             FROM tickets t JOIN payments p ON p.ticket_id = t.id
             WHERE p.status = 'pending' OR t.status = 'pending' ORDER BY t.purchase_date",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(PendingPurchase {
                    ticket_cancelled: r.get::<String, _>(5) == "cancelled",
                    ticket: parse_ticket_id(r.get::<String, _>(0))?,
                    event: EventId(r.get(1)),
                    user: r.get(2),
                    price: Money::from_cents(r.get(3))
                        .map_err(|e| StoreError::Conflict(e.to_string()))?,
                    payment_key: r.get(4),
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
            "SELECT p.ticket_id, t.status, p.status, p.idempotency_key
             FROM payments p JOIN tickets t ON t.id = p.ticket_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| PaymentRecord {
                ticket: r.get(0),
                ticket_status: r.get(1),
                status: r.get(2),
                key: r.get(3),
            })
            .collect())
    }

    /// Users and how many confirmed tickets each owns, for one event (to rebuild per-user limits).
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

pub(crate) const INSERT_TICKET: &str =
    "INSERT INTO tickets (id, event_id, user_id, purchase_date, price_cents, status)
     VALUES (?, ?, ?, ?, ?, 'pending')";
pub(crate) const INSERT_PAYMENT: &str =
    "INSERT INTO payments (id, ticket_id, user_id, amount_cents, status, idempotency_key, created_at)
     VALUES (?, ?, ?, ?, 'pending', ?, ?)";
pub(crate) const CONFIRM_TICKET: &str =
    "UPDATE tickets SET status = 'confirmed' WHERE id = ? AND status = 'pending'";
pub(crate) const CANCEL_TICKET: &str =
    "UPDATE tickets SET status = 'cancelled', cancel_reason = ? WHERE id = ? AND status = 'pending'";
pub(crate) const SETTLE_PAYMENT: &str =
    "UPDATE payments SET status = ?, processed_at = ? WHERE ticket_id = ? AND status = 'pending'";

const EVENT_COLUMNS: &str = "SELECT id, name, venue, date, total_tickets, available_tickets, price_cents, created_at FROM events";
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
            id: parse_ticket_id(r.id)?,
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

fn parse_ticket_id(raw: String) -> StoreResult<TicketId> {
    Uuid::parse_str(&raw)
        .map(TicketId)
        .map_err(|_| StoreError::Conflict(format!("stored ticket id {raw} is not a UUID")))
}
