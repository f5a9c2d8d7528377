//! Storage shared by the stages, on SQLite (embedded, the default) or PostgreSQL, chosen by the
//! database URL ([`backend`]). Both run the same SQL, written in the subset the two share
//! (`$N` parameters, `CASE` rather than `max()`/`GREATEST()`, explicit casts on sums), over
//! sqlx's `Any` driver; the schema of each lives in `migrations/sqlite` and
//! `migrations/postgres`, with the same CHECKs and unique indexes. The payment simulator keeps
//! its own books in the same database ([`gateway`], table `gateway_ledger`).
//!
//! What the stages and the API may ask of storage is a set of traits, one per capability:
//! [`Catalog`] (events), [`OrderBook`] (orders and tickets), [`Accounts`] (API v2 users),
//! [`IdempotencyRecords`] (stored answers for Idempotency-Key) and [`AuditReads`] (what the
//! audit reconciles), together [`Records`]. A stage whose truth lives elsewhere implements them
//! its own way. They speak domain types and [`StoreError`], never a driver's types. The
//! group-commit [`writer`], the monolith's racy steps and the `locked` stage's fenced writes
//! ([`fenced`]) are the stages' own, on [`Store`].

pub mod accounts;
pub mod backend;
pub mod changes;
pub mod fenced;
pub mod gateway;
mod lite;
pub mod saga;
pub mod shards;
pub mod sql;
pub mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::{AnyPool, FromRow, Row};
use uuid::Uuid;

use crate::config::Durability;
use crate::domain::{
    timestamp, CancelReason, Event, EventId, Money, NewEvent, Order, OrderId, OrderStatus,
    PaymentStatus, Ticket, TicketId, TicketStatus, UserId,
};

pub use accounts::{KeyState, NewUser};
pub use backend::{Backend, DatabaseUrl};
pub use gateway::GatewayBooks;
pub use sql::{NewOrder, OrderKey};
pub use writer::{Room, Stamp, WriteHandle, WriteOp, WriterFull};

/// What went wrong in storage, said in the domain's terms rather than a driver's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached, refused the credentials, or kept every connection busy.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A CHECK, UNIQUE or FOREIGN KEY constraint refused the write.
    #[error("a constraint refused the write: {0}")]
    Constraint(String),
    /// A write found the row in another state than the caller expected.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored value does not read back as a domain value (a bug, or a database edited by hand).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// Applying the schema failed.
    #[error("migration failed: {0}")]
    Migrate(String),
    /// The group-commit writer has stopped (the server is shutting down).
    #[error("the database writer has stopped")]
    WriterClosed,
    /// Anything else the database said.
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// True when the write was refused by a constraint or found the row changed under it.
    pub fn is_constraint(&self) -> bool {
        matches!(self, Self::Constraint(_) | Self::Conflict(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::error::ErrorKind;
        match &e {
            sqlx::Error::Database(db) => match db.kind() {
                ErrorKind::UniqueViolation
                | ErrorKind::ForeignKeyViolation
                | ErrorKind::NotNullViolation
                | ErrorKind::CheckViolation => Self::Constraint(db.message().to_owned()),
                _ => Self::Internal(db.message().to_owned()),
            },
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Configuration(_) => Self::Unavailable(describe(&e)),
            sqlx::Error::RowNotFound => Self::Conflict("expected a row, found none".into()),
            sqlx::Error::Protocol(message) => Self::Conflict(message.clone()),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                Self::Corrupt(e.to_string())
            }
            _ => Self::Internal(e.to_string()),
        }
    }
}

/// A driver's error as one line, without its type names.
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Events: created, read, listed and searched.
#[async_trait]
pub trait Catalog: Send + Sync {
    async fn create_event(&self, new: &NewEvent) -> StoreResult<Event>;
    async fn event(&self, id: EventId) -> StoreResult<Option<Event>>;
    /// Every event, by id.
    async fn list_events(&self) -> StoreResult<Vec<Event>>;
    /// One page of events matching `query`, and how many match in all.
    async fn search_events(&self, query: &EventQuery) -> StoreResult<(Vec<Event>, i64)>;
}

/// Orders and their tickets, as buyers see them.
#[async_trait]
pub trait OrderBook: Send + Sync {
    async fn order(&self, id: OrderId) -> StoreResult<Option<Order>>;
    /// A user's orders, newest first.
    async fn user_orders(&self, user: &UserId) -> StoreResult<Vec<Order>>;
    /// A user's tickets, oldest first.
    async fn user_tickets(&self, user: &UserId) -> StoreResult<Vec<Ticket>>;
    /// The order a user placed under an Idempotency-Key, if any.
    async fn order_by_key(&self, user: &UserId, key: &str) -> StoreResult<Option<Order>>;
}

/// API v2's users and their bearer tokens (stored hashed).
#[async_trait]
pub trait Accounts: Send + Sync {
    /// Creates a user with a fresh random bearer token, shown once.
    async fn create_user(&self, name: &str) -> StoreResult<NewUser>;
    /// The user a bearer token belongs to.
    async fn user_by_token(&self, token: &str) -> StoreResult<Option<UserId>>;
}

/// Stored answers for Idempotency-Key, scoped to (user, key).
#[async_trait]
pub trait IdempotencyRecords: Send + Sync {
    /// Claims `(user, key)` for a request with `fingerprint`, or says why it cannot run.
    async fn begin_idempotent(
        &self,
        user: &UserId,
        key: &str,
        fingerprint: &str,
    ) -> StoreResult<KeyState>;
    /// Stores the final answer of a request that claimed `(user, key)`.
    async fn complete_idempotent(
        &self,
        user: &UserId,
        key: &str,
        status: u16,
        body: &str,
    ) -> StoreResult<()>;
    /// Releases a claim whose request did not reach an answer, so the client may retry.
    async fn abandon_idempotent(&self, user: &UserId, key: &str) -> StoreResult<()>;
    /// Claims still `in_flight` (left by a run that stopped).
    async fn interrupted_claims(&self) -> StoreResult<Vec<(UserId, String)>>;
    /// Forgets keys older than the retention period; returns how many.
    async fn purge_old_keys(&self) -> StoreResult<u64>;
}

/// What the audit reads of the stage's records: stored counters per event. (Payments are
/// reconciled against the gateway's books by [`GatewayBooks::reconciliation`].)
#[async_trait]
pub trait AuditReads: Send + Sync {
    /// Counters per event: the stored `available` beside counts of tickets by status.
    async fn event_counts(&self) -> StoreResult<Vec<StoredCounts>>;
    /// Orders still `pending` (held, payment not settled).
    async fn pending_orders(&self) -> StoreResult<i64>;
}

/// Every read capability a stage serves the API from, and the database's health.
#[async_trait]
pub trait Records: Catalog + OrderBook + Accounts + IdempotencyRecords + AuditReads {
    /// The engine's name, for health (`sqlite`, `postgres`).
    fn engine(&self) -> &'static str;
    /// Checks the database answers.
    async fn ping(&self) -> StoreResult<()>;
}

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    url: DatabaseUrl,
    /// Told after each committed change of an event's availability (the streams listen).
    changes: changes::Changes,
    /// The SQLite thread writer started from this store or a clone, if one runs: the gateway's
    /// books write through it ([`WriteOp::Ledger`]) rather than as a second writer on the file.
    /// Weak, so that it never keeps the writer running.
    ledger: Arc<std::sync::Mutex<Option<writer::WeakWriteHandle>>>,
}

/// An order whose payment was left `pending` by a run that stopped (found at start-up).
#[derive(Debug, Clone)]
pub struct PendingPurchase {
    /// The order was already cancelled (its hold expired) while the payment was in flight.
    pub order_cancelled: bool,
    pub order: OrderId,
    pub event: EventId,
    pub quantity: u32,
    pub amount: Money,
    pub payment_key: String,
    pub created_at: String,
}

/// A search over events (API v2): filters, sort, one page.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

impl Store {
    /// Opens the database `database` names (a path or `sqlite:` URL, or a `postgres://` URL),
    /// creating it if missing, and applies the migrations.
    pub async fn open(database: &str, durability: Durability) -> StoreResult<Self> {
        let url = DatabaseUrl::parse(database, durability)?;
        let pool = url.open_pool().await?;
        Ok(Self {
            pool,
            url,
            changes: changes::Changes::default(),
            ledger: Arc::default(),
        })
    }

    /// Another handle on the same database with a pool of its own of at most `connections`,
    /// for a component that must not queue behind the stage's readers for a connection (the
    /// payment gateway's books: every charge waits on them).
    pub async fn with_own_pool(&self, connections: u32) -> StoreResult<Self> {
        Ok(Self {
            pool: self.url.pool_of(connections).await?,
            url: self.url.clone(),
            changes: self.changes.clone(),
            ledger: Arc::clone(&self.ledger),
        })
    }

    /// Who is told when an event's availability changes (shared by every clone).
    pub fn changes(&self) -> &changes::Changes {
        &self.changes
    }

    /// The writer the gateway's books write through, while one runs ([`Self::ledger`]).
    pub(super) fn ledger_writer(&self) -> Option<WriteHandle> {
        let route = self.ledger.lock().expect("ledger route poisoned");
        route.as_ref().and_then(writer::WeakWriteHandle::upgrade)
    }

    /// Which engine this store runs on.
    pub fn backend(&self) -> Backend {
        self.url.backend
    }

    /// Starts the group-commit writer on a connection of its own.
    /// The task ends once every handle is dropped and the queue is drained.
    ///
    /// On SQLite it is the one of [`Self::start_thread_writer`], unless
    /// `TICKETFLOW_SQLITE_WRITER=sqlx` in the environment asks for the earlier writer on a sqlx
    /// connection (kept to measure one against the other).
    pub async fn start_writer(
        &self,
        max_batch: usize,
        capacity: usize,
    ) -> StoreResult<(WriteHandle, tokio::task::JoinHandle<()>)> {
        if std::env::var("TICKETFLOW_SQLITE_WRITER").as_deref() != Ok("sqlx")
            && self.backend() == Backend::Sqlite
        {
            return self.start_thread_writer(max_batch, capacity).await;
        }
        let conn = self.url.connect().await?;
        Ok(writer::start(
            conn,
            self.url.clone(),
            max_batch,
            capacity,
            None,
            self.changes.clone(),
        ))
    }

    /// The SQLite writer on a thread and connection of its own ([`writer::start_sqlite`]):
    /// statements prepared once, no channel hop per statement, checkpoints on another thread.
    /// Refused on PostgreSQL.
    pub async fn start_thread_writer(
        &self,
        max_batch: usize,
        capacity: usize,
    ) -> StoreResult<(WriteHandle, tokio::task::JoinHandle<()>)> {
        if let Some(path) = self.url.sqlite_path()? {
            let (handle, task) = writer::start_sqlite(
                path,
                self.url.durability(),
                backend::sqlite_busy_timeout_ms(),
                max_batch,
                capacity,
                self.changes.clone(),
            )
            .await?;
            *self.ledger.lock().expect("ledger route poisoned") = Some(handle.downgrade());
            return Ok((handle, task));
        }
        Err(StoreError::Internal(
            "the thread writer is SQLite's only".into(),
        ))
    }

    /// Like [`Self::start_writer`], for an inventory node of stage `services`: every
    /// transaction first proves `fence`'s epochs for the shards it writes, and a write whose
    /// shard this node lost is refused ([`StoreError::Conflict`], [`shards::NOT_OWNER`]).
    pub async fn start_fenced_writer(
        &self,
        max_batch: usize,
        capacity: usize,
        fence: std::sync::Arc<shards::ShardFence>,
    ) -> StoreResult<(WriteHandle, tokio::task::JoinHandle<()>)> {
        self.require_postgres("an epoch-fenced writer")?;
        let conn = self.url.connect().await?;
        Ok(writer::start(
            conn,
            self.url.clone(),
            max_batch,
            capacity,
            Some(fence),
            self.changes.clone(),
        ))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // --- the monolith's steps: each its own autocommit statement, no transaction around them ---

    /// Step 1: the event's `available_tickets` and price as they are right now.
    pub async fn read_availability(&self, id: EventId) -> StoreResult<Option<(i64, Money)>> {
        let row = sqlx::query("SELECT available_tickets, price_cents FROM events WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, money(r.try_get(1)?)?)))
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
        sql::confirm_order(&mut conn, order, &now).await?;
        crate::meter::settled(None);
        Ok(())
    }

    /// Step 4b: the order cancelled, then its payment failed; inventory is not touched.
    pub async fn cancel_order(&self, order: OrderId, reason: CancelReason) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        let mut conn = self.pool.acquire().await?;
        sql::finish_order(&mut conn, order, OrderStatus::Cancelled, Some(reason), &now).await?;
        sql::settle_payment(&mut conn, order, PaymentStatus::Failed, &now).await?;
        crate::meter::settled(Some(reason));
        Ok(())
    }

    /// Step 5: writes back `available_tickets` as the caller computed it (a lost update waiting
    /// to happen: that is the monolith's lesson). Recovery uses it to repair a drifted counter.
    pub async fn write_available(&self, id: EventId, available: i64) -> StoreResult<()> {
        sqlx::query("UPDATE events SET available_tickets = $1 WHERE id = $2")
            .bind(available)
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        self.changes.changed(id);
        Ok(())
    }

    /// A write transaction on a connection of its own, begun with `BEGIN IMMEDIATE` (on
    /// SQLite it holds the file's write lock until it ends): the monolith's
    /// `--purchase-transaction`.
    pub async fn begin_write(&self) -> StoreResult<WriteTx> {
        let mut conn = self.pool.acquire().await?;
        let begin = match self.backend() {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        sqlx::query(begin).execute(&mut *conn).await?;
        Ok(WriteTx {
            conn,
            finished: false,
            settled: Vec::new(),
            moved: Vec::new(),
            changes: self.changes.clone(),
        })
    }

    // --- recovery ---

    /// Purchases that were interrupted: payments still `pending`, with their orders. Two
    /// lookups, each through its partial index (migration 0007), so the cost is the pending
    /// rows', not every order's.
    pub async fn pending_purchases(&self) -> StoreResult<Vec<PendingPurchase>> {
        let rows = sqlx::query(
            // A saga's order (its payment key `saga-…`) is its saga's to settle, never a
            // recovering purchase's: an inventory node serving the saga takes shards too.
            "SELECT o.id, o.event_id, o.amount_cents, p.idempotency_key, o.status, o.quantity, o.created_at
             FROM orders o JOIN payments p ON p.order_id = o.id
             WHERE o.status = 'pending' AND p.idempotency_key NOT LIKE 'saga-%'
             UNION
             SELECT o.id, o.event_id, o.amount_cents, p.idempotency_key, o.status, o.quantity, o.created_at
             FROM payments p JOIN orders o ON o.id = p.order_id
             WHERE p.status = 'pending' AND p.idempotency_key NOT LIKE 'saga-%'
             ORDER BY 7",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(PendingPurchase {
                    order: OrderId(parse_uuid(r.try_get(0)?)?),
                    event: EventId(r.try_get(1)?),
                    amount: money(r.try_get(2)?)?,
                    payment_key: r.try_get(3)?,
                    order_cancelled: r.try_get::<String, _>(4)? == "cancelled",
                    quantity: r.try_get::<i64, _>(5)? as u32,
                    created_at: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Tickets each user owns (confirmed) for one event, to rebuild per-user limits.
    pub async fn owned_by_user(&self, event: EventId) -> StoreResult<Vec<(String, u32)>> {
        let rows = sqlx::query(
            "SELECT user_id, COUNT(*) FROM tickets WHERE event_id = $1 AND status = 'confirmed' GROUP BY user_id",
        )
        .bind(event.0)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<i64, _>(1)? as u32)))
            .collect()
    }

    /// The first ticket of an order (an API v1 purchase has exactly one).
    pub async fn first_ticket(&self, order: OrderId) -> StoreResult<Option<Ticket>> {
        let row: Option<TicketRow> = sqlx::query_as(&format!(
            "{TICKET_COLUMNS} WHERE order_id = $1 ORDER BY id LIMIT 1"
        ))
        .bind(order.0.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Ticket::try_from).transpose()
    }

    /// One event's counters as stored ([`AuditReads::event_counts`] for one event), or `None`
    /// if there is no such event: what an event's actor is rebuilt from when it activates.
    pub async fn stored_counts(&self, event: EventId) -> StoreResult<Option<StoredCounts>> {
        let row = sqlx::query(
            "SELECT e.id, e.total_tickets, e.available_tickets,
                    CAST(COALESCE(SUM(CASE WHEN t.status = 'confirmed' THEN 1 ELSE 0 END), 0) AS BIGINT),
                    CAST(COALESCE(SUM(CASE WHEN t.status = 'pending' THEN 1 ELSE 0 END), 0) AS BIGINT),
                    CAST(COALESCE(SUM(CASE WHEN t.status = 'cancelled' THEN 1 ELSE 0 END), 0) AS BIGINT)
             FROM events e LEFT JOIN tickets t ON t.event_id = e.id
             WHERE e.id = $1
             GROUP BY e.id, e.total_tickets, e.available_tickets",
        )
        .bind(event.0)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| stored_counts(&r)).transpose()
    }

    /// How many tickets an event has issued so far, in any state.
    pub async fn tickets_issued(&self, event: EventId) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM tickets WHERE event_id = $1")
                .bind(event.0)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn with_tickets(&self, row: OrderRow) -> StoreResult<Order> {
        let tickets: Vec<String> =
            sqlx::query_scalar("SELECT id FROM tickets WHERE order_id = $1 ORDER BY id")
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
                .ok_or_else(|| StoreError::Corrupt(format!("unknown status {}", row.status)))?,
            cancel_reason: row.cancel_reason,
            tickets: tickets
                .into_iter()
                .map(|t| parse_uuid(t).map(TicketId))
                .collect::<StoreResult<_>>()?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }

    async fn orders_with_tickets(&self, rows: Vec<OrderRow>) -> StoreResult<Vec<Order>> {
        let mut orders = Vec::with_capacity(rows.len());
        for row in rows {
            orders.push(self.with_tickets(row).await?);
        }
        Ok(orders)
    }
}

#[async_trait]
impl Catalog for Store {
    async fn create_event(&self, new: &NewEvent) -> StoreResult<Event> {
        let created_at = timestamp(Utc::now());
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO events (name, venue, date, total_tickets, available_tickets, price_cents, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
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

    async fn event(&self, id: EventId) -> StoreResult<Option<Event>> {
        let row: Option<EventRow> = sqlx::query_as(&format!("{EVENT_COLUMNS} WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Event::from))
    }

    async fn list_events(&self) -> StoreResult<Vec<Event>> {
        let rows: Vec<EventRow> = sqlx::query_as(&format!("{EVENT_COLUMNS} ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }

    async fn search_events(&self, query: &EventQuery) -> StoreResult<(Vec<Event>, i64)> {
        let mut filters = Vec::new();
        let mut values = Vec::new();
        for (value, filter) in [
            (&query.venue, "lower(venue) = lower($)"),
            (&query.from, "date >= $"),
            (&query.to, "date <= $"),
        ] {
            if let Some(value) = value {
                values.push(value.clone());
                filters.push(filter.replace('$', &format!("${}", values.len())));
            }
        }
        match query.available {
            Some(true) => filters.push("available_tickets > 0".into()),
            Some(false) => filters.push("available_tickets = 0".into()),
            None => {}
        }
        let filter = if filters.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", filters.join(" AND "))
        };
        let order = format!(
            " ORDER BY {} {}, id ASC LIMIT ${} OFFSET ${}",
            query.sort.column(),
            if query.descending { "DESC" } else { "ASC" },
            values.len() + 1,
            values.len() + 2,
        );
        let count_sql = format!("SELECT COUNT(*) FROM events{filter}");
        let page_sql = format!("{EVENT_COLUMNS}{filter}{order}");
        let mut count = sqlx::query_scalar::<_, i64>(&count_sql);
        let mut page = sqlx::query_as::<_, EventRow>(&page_sql);
        for value in values {
            count = count.bind(value.clone());
            page = page.bind(value);
        }
        let total = count.fetch_one(&self.pool).await?;
        let rows = page
            .bind(i64::from(query.limit))
            .bind(i64::try_from(query.offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok((rows.into_iter().map(Event::from).collect(), total))
    }
}

#[async_trait]
impl OrderBook for Store {
    async fn order(&self, id: OrderId) -> StoreResult<Option<Order>> {
        let row: Option<OrderRow> = sqlx::query_as(&format!("{ORDER_COLUMNS} WHERE id = $1"))
            .bind(id.0.to_string())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Some(self.with_tickets(row).await?)),
            None => Ok(None),
        }
    }

    async fn user_orders(&self, user: &UserId) -> StoreResult<Vec<Order>> {
        let rows: Vec<OrderRow> = sqlx::query_as(&format!(
            "{ORDER_COLUMNS} WHERE user_id = $1 ORDER BY created_at DESC, id"
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        self.orders_with_tickets(rows).await
    }

    async fn user_tickets(&self, user: &UserId) -> StoreResult<Vec<Ticket>> {
        let rows: Vec<TicketRow> = sqlx::query_as(&format!(
            "{TICKET_COLUMNS} WHERE user_id = $1 ORDER BY purchase_date, id"
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Ticket::try_from).collect()
    }

    async fn order_by_key(&self, user: &UserId, key: &str) -> StoreResult<Option<Order>> {
        let rows: Vec<OrderRow> = sqlx::query_as(&format!(
            "{ORDER_COLUMNS} WHERE user_id = $1 AND idempotency_key = $2"
        ))
        .bind(user.as_str())
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        Ok(self.orders_with_tickets(rows).await?.pop())
    }
}

#[async_trait]
impl AuditReads for Store {
    async fn event_counts(&self) -> StoreResult<Vec<StoredCounts>> {
        let rows = sqlx::query(
            "SELECT e.id, e.total_tickets, e.available_tickets,
                    CAST(COALESCE(SUM(CASE WHEN t.status = 'confirmed' THEN 1 ELSE 0 END), 0) AS BIGINT),
                    CAST(COALESCE(SUM(CASE WHEN t.status = 'pending' THEN 1 ELSE 0 END), 0) AS BIGINT),
                    CAST(COALESCE(SUM(CASE WHEN t.status = 'cancelled' THEN 1 ELSE 0 END), 0) AS BIGINT)
             FROM events e LEFT JOIN tickets t ON t.event_id = e.id
             GROUP BY e.id, e.total_tickets, e.available_tickets ORDER BY e.id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored_counts).collect()
    }

    async fn pending_orders(&self) -> StoreResult<i64> {
        let row =
            sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) FROM orders WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await?;
        Ok(row.try_get(0)?)
    }
}

#[async_trait]
impl Records for Store {
    fn engine(&self) -> &'static str {
        self.url.backend.as_str()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
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
                .ok_or_else(|| StoreError::Corrupt(format!("unknown status {}", r.status)))?,
            cancel_reason: r.cancel_reason,
        })
    }
}

/// A row of `id, total, available, confirmed, pending, cancelled`.
fn stored_counts(r: &sqlx::any::AnyRow) -> StoreResult<StoredCounts> {
    Ok(StoredCounts {
        event: EventId(r.try_get(0)?),
        total: r.try_get(1)?,
        available: r.try_get(2)?,
        confirmed: r.try_get(3)?,
        pending: r.try_get(4)?,
        cancelled: r.try_get(5)?,
    })
}

fn parse_uuid(raw: String) -> StoreResult<Uuid> {
    Uuid::parse_str(&raw).map_err(|_| StoreError::Corrupt(format!("stored id {raw} is not a UUID")))
}

fn money(cents: i64) -> StoreResult<Money> {
    Money::from_cents(cents).map_err(|e| StoreError::Corrupt(format!("stored amount invalid: {e}")))
}

/// An open write transaction ([`Store::begin_write`]). Dropped before `commit` or `rollback`
/// (its task cancelled), its connection is closed rather than handed back mid-transaction, and
/// the transaction goes with it.
pub struct WriteTx {
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    finished: bool,
    /// Outcomes written in this transaction, counted in the metrics once it commits.
    settled: Vec<Option<CancelReason>>,
    /// Events whose availability this transaction moved, told once it commits.
    moved: Vec<EventId>,
    changes: changes::Changes,
}

impl WriteTx {
    pub async fn read_availability(&mut self, id: EventId) -> StoreResult<Option<(i64, Money)>> {
        let row = sqlx::query("SELECT available_tickets, price_cents FROM events WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&mut *self.conn)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, money(r.try_get(1)?)?)))
            .transpose()
    }

    pub async fn insert_pending_order(&mut self, order: &NewOrder) -> StoreResult<()> {
        Ok(sql::insert_order(&mut self.conn, order).await?)
    }

    /// The order confirmed, its payment completed and one seat taken off `available`.
    pub async fn confirm_and_take_seat(
        &mut self,
        order: OrderId,
        event: EventId,
    ) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        sql::confirm_order(&mut self.conn, order, &now).await?;
        sqlx::query("UPDATE events SET available_tickets = available_tickets - 1 WHERE id = $1")
            .bind(event.0)
            .execute(&mut *self.conn)
            .await?;
        self.settled.push(None);
        self.moved.push(event);
        Ok(())
    }

    pub async fn cancel_order(&mut self, order: OrderId, reason: CancelReason) -> StoreResult<()> {
        let now = timestamp(Utc::now());
        sql::finish_order(
            &mut self.conn,
            order,
            OrderStatus::Cancelled,
            Some(reason),
            &now,
        )
        .await?;
        sql::settle_payment(&mut self.conn, order, PaymentStatus::Failed, &now).await?;
        self.settled.push(Some(reason));
        Ok(())
    }

    pub async fn commit(mut self) -> StoreResult<()> {
        self.end("COMMIT").await?;
        for outcome in self.settled.drain(..) {
            crate::meter::settled(outcome);
        }
        for event in self.moved.drain(..) {
            self.changes.changed(event);
        }
        Ok(())
    }

    pub async fn rollback(mut self) -> StoreResult<()> {
        self.end("ROLLBACK").await
    }

    async fn end(&mut self, sql: &str) -> StoreResult<()> {
        let done = sqlx::query(sql).execute(&mut *self.conn).await;
        // a failed COMMIT or ROLLBACK leaves the transaction's state unknown: drop the link
        self.finished = done.is_ok();
        done?;
        Ok(())
    }

    /// The first ticket of an order, read inside the transaction.
    pub async fn first_ticket(&mut self, order: OrderId) -> StoreResult<Option<Ticket>> {
        let row: Option<TicketRow> = sqlx::query_as(&format!(
            "{TICKET_COLUMNS} WHERE order_id = $1 ORDER BY id LIMIT 1"
        ))
        .bind(order.0.to_string())
        .fetch_optional(&mut *self.conn)
        .await?;
        row.map(Ticket::try_from).transpose()
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}
