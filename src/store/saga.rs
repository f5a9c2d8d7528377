//! Stage `saga`'s storage (PostgreSQL only, migration 0008): the event log with optimistic
//! concurrency and snapshots, the outbox and its relays' claims (`FOR UPDATE SKIP LOCKED` and
//! a lease: several saga processes may share a database, and a stopped one's claims come back
//! when their lease runs out), the notices that wake the other processes' relays,
//! the consumers' inboxes, the inventory node's writes of the saga's seats and holds (its
//! fenced writer's [`SeatWrite`]), and the projections into the tables every stage's reads
//! use (`events.available_tickets` aside: the inventory node's).
//!
//! A consumer works inside one [`SagaTx`]: it records the message in its inbox (a redelivery
//! stops there), applies the effect, appends events and queues the messages that follow, and
//! commits all of it at once.

use serde_json::Value;
use sqlx::{Any, Row, Transaction};
use uuid::Uuid;

use super::{changes::Changes, Store, StoreError, StoreResult};
use crate::domain::{EventId, OrderId};
use crate::saga::projection::{rows, Projected};
use crate::saga::seats::{Hold, HoldStatus, SeatBook, SeatChange};
use crate::saga::{upcast, Participant, Saga, SagaEvent, Seats, EVENT_SCHEMA};

/// The format of a stored snapshot ([`Saga`] serialised); a snapshot of another format is
/// ignored and its stream replayed from the start.
pub const SNAPSHOT_SCHEMA: i32 = 1;

/// The channel saga processes `NOTIFY` when they queue messages, and `LISTEN` on.
pub const OUTBOX_CHANNEL: &str = "saga_outbox";
/// The `application_name` of a relay's listening session, by which the others count it.
pub const OUTBOX_LISTENER_NAME: &str = "ticketflow-saga-relay";

/// The unique index that makes two appends at the same version collide.
const VERSION_TAKEN: &str = "saga_events_stream_id_version_key";

/// A message claimed from the outbox, to deliver.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub id: i64,
    pub message_id: String,
    pub saga: String,
    pub destination: Participant,
    pub body: Value,
    pub attempts: i32,
    /// How long the message waited since it was due (or written), in milliseconds.
    pub lag_ms: i64,
}

/// How much the outbox holds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxDepth {
    /// Messages due now, not yet delivered.
    pub due: i64,
    /// Timers waiting for their time.
    pub timers: i64,
    /// Age of the oldest message due, in milliseconds (0 when none).
    pub oldest_due_ms: i64,
    /// Messages given up on after too many failed deliveries (`saga_dead_letters`).
    pub dead_letters: i64,
}

/// One stored event, as `GET /api/v2/orders/{id}/events` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    pub version: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub schema_version: i32,
    pub at: String,
    pub data: Value,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

impl Store {
    /// Refuses a store that is not PostgreSQL, naming `what` needs it.
    pub fn require_saga_postgres(&self) -> StoreResult<()> {
        self.require_postgres("stage saga (its event log, outbox and inboxes)")
    }

    /// A transaction for one consumer's step.
    pub async fn begin_saga(&self) -> StoreResult<SagaTx> {
        Ok(SagaTx {
            tx: self.pool.begin().await?,
            moved: Vec::new(),
            changes: self.changes.clone(),
        })
    }

    /// Whether `consumer` has applied `message_id` already.
    pub async fn inbox_has(&self, consumer: Participant, message_id: &str) -> StoreResult<bool> {
        let seen: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM saga_inbox WHERE consumer = $1 AND message_id = $2",
        )
        .bind(consumer.as_str())
        .bind(message_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(seen > 0)
    }

    /// Gives the inventory participant a row of seats for every event that has none (events
    /// created before the stage first ran on this database).
    pub async fn seed_saga_seats(&self) -> StoreResult<u64> {
        Ok(sqlx::query(
            "INSERT INTO saga_seats (event_id, total, available)
             SELECT id, total_tickets, available_tickets FROM events ON CONFLICT DO NOTHING",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Claims up to `limit` due messages for `lease_ms`, skipping rows another relay holds
    /// locked, oldest first.
    pub async fn claim_outbox(&self, limit: u32, lease_ms: i64) -> StoreResult<Vec<OutboxMessage>> {
        let rows = sqlx::query(
            "UPDATE saga_outbox SET claimed_until = now() + $2 * interval '1 millisecond',
                    attempts = attempts + 1
             WHERE id IN (
                 SELECT id FROM saga_outbox
                 WHERE deliver_after <= now() AND (claimed_until IS NULL OR claimed_until < now())
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, message_id, saga_id, destination, body::text, attempts,
                 CAST(EXTRACT(EPOCH FROM (now() - deliver_after)) * 1000 AS BIGINT)",
        )
        .bind(i64::from(limit))
        .bind(lease_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = rows
            .into_iter()
            .map(|r| {
                let destination: String = r.try_get(3)?;
                let body: String = r.try_get(4)?;
                Ok(OutboxMessage {
                    id: r.try_get(0)?,
                    message_id: r.try_get(1)?,
                    saga: r.try_get(2)?,
                    destination: Participant::parse(&destination)
                        .ok_or_else(|| corrupt(format!("outbox destination {destination}")))?,
                    body: serde_json::from_str(&body).map_err(corrupt)?,
                    attempts: r.try_get(5)?,
                    lag_ms: r.try_get(6)?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        claimed.sort_by_key(|m| m.id);
        Ok(claimed)
    }

    /// A delivered message leaves the outbox.
    pub async fn ack_outbox(&self, id: i64) -> StoreResult<()> {
        sqlx::query("DELETE FROM saga_outbox WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A message whose delivery failed is tried again after `after_ms`.
    pub async fn retry_outbox(&self, id: i64, after_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE saga_outbox SET claimed_until = now() + $2 * interval '1 millisecond' WHERE id = $1",
        )
        .bind(id)
        .bind(after_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves a message that failed too often out of the outbox, with its last error.
    pub async fn dead_letter(&self, id: i64, error: &str) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO saga_dead_letters (id, message_id, saga_id, destination, kind, body, attempts, error, created_at)
             SELECT id, message_id, saga_id, destination, kind, body, attempts, $2, created_at
             FROM saga_outbox WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM saga_outbox WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Tells the relays of the other saga processes on this database (`LISTEN
    /// saga_outbox`) that messages were queued; `from` names this process, so its own
    /// listener can ignore its notices.
    pub async fn notify_outbox(&self, from: &str) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(OUTBOX_CHANNEL)
            .bind(from)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// How many saga relays listen for outbox notices on this database (this process's
    /// among them when its listener is connected): their sessions' `application_name`.
    pub async fn outbox_listeners(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(OUTBOX_LISTENER_NAME)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn outbox_depth(&self) -> StoreResult<OutboxDepth> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) FILTER (WHERE deliver_after <= now()) AS BIGINT),
                    CAST(COUNT(*) FILTER (WHERE deliver_after > now()) AS BIGINT),
                    CAST(COALESCE(EXTRACT(EPOCH FROM (now() - MIN(deliver_after)
                        FILTER (WHERE deliver_after <= now()))) * 1000, 0) AS BIGINT),
                    (SELECT CAST(COUNT(*) AS BIGINT) FROM saga_dead_letters)
             FROM saga_outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxDepth {
            due: row.try_get(0)?,
            timers: row.try_get(1)?,
            oldest_due_ms: row.try_get(2)?,
            dead_letters: row.try_get(3)?,
        })
    }

    /// A stream's events, in order.
    pub async fn saga_events(&self, stream: OrderId) -> StoreResult<Vec<StoredEvent>> {
        let rows = sqlx::query(
            "SELECT version, kind, schema_version, at_ms, body::text FROM saga_events
             WHERE stream_id = $1 ORDER BY version",
        )
        .bind(stream.0.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let body: String = r.try_get(4)?;
                Ok(StoredEvent {
                    version: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    schema_version: r.try_get(2)?,
                    at: crate::saga::projection::stored_time(r.try_get(3)?),
                    data: serde_json::from_str(&body).map_err(corrupt)?,
                })
            })
            .collect()
    }

    /// A saga's state from its snapshot and the events after it (outside any transaction).
    pub async fn load_saga(&self, stream: OrderId) -> StoreResult<Saga> {
        let mut conn = self.pool.acquire().await?;
        load(&mut conn, stream, true).await
    }

    /// A saga's state replayed from its first event, ignoring the snapshot.
    pub async fn replay_saga(&self, stream: OrderId) -> StoreResult<Saga> {
        let mut conn = self.pool.acquire().await?;
        load(&mut conn, stream, false).await
    }

    /// Every saga's state, replayed from the log alone (snapshots ignored), in stream order.
    pub async fn replay_all_sagas(&self) -> StoreResult<Vec<Saga>> {
        let rows = sqlx::query(
            "SELECT stream_id, schema_version, body::text FROM saga_events ORDER BY stream_id, version",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut sagas: Vec<Saga> = Vec::new();
        let mut current: Option<String> = None;
        for r in rows {
            let stream: String = r.try_get(0)?;
            if current.as_deref() != Some(stream.as_str()) {
                sagas.push(Saga::default());
                current = Some(stream);
            }
            let event = decode(r.try_get(1)?, &r.try_get::<String, _>(2)?)?;
            if let Some(saga) = sagas.last_mut() {
                saga.apply(&event);
            }
        }
        Ok(sagas)
    }
}

fn decode(schema: i32, body: &str) -> StoreResult<SagaEvent> {
    let value: Value = serde_json::from_str(body).map_err(corrupt)?;
    upcast(schema as u32, value).map_err(corrupt)
}

async fn load(
    conn: &mut sqlx::AnyConnection,
    stream: OrderId,
    use_snapshot: bool,
) -> StoreResult<Saga> {
    let id = stream.0.to_string();
    let mut saga = Saga::default();
    if use_snapshot {
        let snapshot = sqlx::query(
            "SELECT state::text FROM saga_snapshots WHERE stream_id = $1 AND schema = $2",
        )
        .bind(&id)
        .bind(SNAPSHOT_SCHEMA)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = snapshot {
            saga = serde_json::from_str(&row.try_get::<String, _>(0)?).map_err(corrupt)?;
        }
    }
    let tail = sqlx::query(
        "SELECT schema_version, body::text FROM saga_events
         WHERE stream_id = $1 AND version > $2 ORDER BY version",
    )
    .bind(&id)
    .bind(saga.version as i64)
    .fetch_all(&mut *conn)
    .await?;
    for row in tail {
        saga.apply(&decode(row.try_get(0)?, &row.try_get::<String, _>(1)?)?);
    }
    Ok(saga)
}

/// One consumer's step, in one transaction. Dropped without [`SagaTx::commit`], it rolls
/// back.
pub struct SagaTx {
    tx: Transaction<'static, Any>,
    /// Events whose availability this step moves (by how much), written just before the
    /// commit and told once it is done.
    moved: Vec<(EventId, i64)>,
    changes: Changes,
}

impl SagaTx {
    /// Records `message_id` in `consumer`'s inbox, and takes outbox row `outbox_id` (the
    /// message's delivery) out of the outbox, both in this transaction; false when the inbox
    /// had the message already (a redelivery, to drop).
    pub async fn first_delivery(
        &mut self,
        consumer: Participant,
        message_id: &str,
        outbox_id: i64,
        saga: OrderId,
    ) -> StoreResult<bool> {
        // One statement (a round trip): the data-modifying CTE runs whatever the insert does.
        let inserted = sqlx::query(
            "WITH acked AS (DELETE FROM saga_outbox WHERE id = $4)
             INSERT INTO saga_inbox (consumer, message_id, saga_id) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(consumer.as_str())
        .bind(message_id)
        .bind(saga.0.to_string())
        .bind(outbox_id)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// The saga's state from its snapshot and tail, read in this transaction.
    pub async fn load(&mut self, stream: OrderId) -> StoreResult<Saga> {
        load(&mut self.tx, stream, true).await
    }

    /// Appends `events` after `before.version`, and snapshots the stream when its new version
    /// crosses a multiple of `snapshot_every`. A version already taken (another decision won
    /// the race) is [`StoreError::Conflict`]: roll back, load again, decide again.
    pub async fn append(
        &mut self,
        stream: OrderId,
        before: &Saga,
        events: &[SagaEvent],
        snapshot_every: u64,
    ) -> StoreResult<Saga> {
        let id = stream.0.to_string();
        let mut after = before.clone();
        if !events.is_empty() {
            // One statement for all of them: a round trip, not one per event.
            let values = (0..events.len())
                .map(|i| {
                    let b = i * 5;
                    format!(
                        "($1, ${}, ${}, ${}, CAST(${} AS JSONB), ${})",
                        b + 2,
                        b + 3,
                        b + 4,
                        b + 5,
                        b + 6
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO saga_events (stream_id, version, kind, schema_version, body, at_ms) VALUES {values}"
            );
            let mut query = sqlx::query(&sql).bind(&id);
            for event in events {
                after.apply(event);
                let body = serde_json::to_string(event).map_err(corrupt)?;
                query = query
                    .bind(after.version as i64)
                    .bind(event.kind())
                    .bind(EVENT_SCHEMA as i32)
                    .bind(body)
                    .bind(event.at_ms());
            }
            let appended = query.execute(&mut *self.tx).await;
            if let Err(sqlx::Error::Database(db)) = &appended {
                if db.constraint() == Some(VERSION_TAKEN) {
                    return Err(StoreError::Conflict(format!(
                        "saga {stream}: a version after {} was appended meanwhile",
                        before.version
                    )));
                }
            }
            appended?;
        }
        let every = snapshot_every.max(1);
        if !events.is_empty() && after.version / every > before.version / every {
            let state = serde_json::to_string(&after).map_err(corrupt)?;
            sqlx::query(
                "INSERT INTO saga_snapshots (stream_id, version, schema, state)
                 VALUES ($1, $2, $3, CAST($4 AS JSONB))
                 ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version,
                     schema = EXCLUDED.schema, state = EXCLUDED.state",
            )
            .bind(&id)
            .bind(after.version as i64)
            .bind(SNAPSHOT_SCHEMA)
            .bind(state)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(after)
    }

    /// Queues a message for `destination`, due at once or at `due_at_ms` (a timer).
    pub async fn send(
        &mut self,
        saga: OrderId,
        destination: Participant,
        kind: &str,
        body: &Value,
        due_at_ms: Option<i64>,
    ) -> StoreResult<()> {
        let body = serde_json::to_string(body).map_err(corrupt)?;
        let query = match due_at_ms {
            None => sqlx::query(
                "INSERT INTO saga_outbox (message_id, saga_id, destination, kind, body)
                 VALUES ($1, $2, $3, $4, CAST($5 AS JSONB))",
            ),
            Some(_) => sqlx::query(
                "INSERT INTO saga_outbox (message_id, saga_id, destination, kind, body, is_timer, deliver_after)
                 VALUES ($1, $2, $3, $4, CAST($5 AS JSONB), TRUE,
                         TIMESTAMPTZ 'epoch' + $6 * interval '1 millisecond')",
            ),
        };
        let mut query = query
            .bind(Uuid::new_v4().to_string())
            .bind(saga.0.to_string())
            .bind(destination.as_str())
            .bind(kind)
            .bind(body);
        if let Some(at) = due_at_ms {
            query = query.bind(at);
        }
        query.execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Drops the saga's timers still waiting (the saga is over).
    pub async fn cancel_timers(&mut self, saga: OrderId) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM saga_outbox WHERE saga_id = $1 AND is_timer AND claimed_until IS NULL",
        )
        .bind(saga.0.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Brings the read models from `before`'s rows to `after`'s.
    pub async fn project(&mut self, before: &Saga, after: &Saga) -> StoreResult<()> {
        let old = rows(before);
        let Some(new) = rows(after) else {
            return Ok(());
        };
        if old.as_ref() == Some(&new) {
            return Ok(());
        }
        match &old {
            None => insert_rows(&mut self.tx, &new).await?,
            Some(_) => update_rows(&mut self.tx, &new).await?,
        }
        let delta = old.as_ref().map_or(0, Projected::seats_taken) - new.seats_taken();
        if delta != 0 {
            // Not written here: `available_tickets` is the inventory node's, which moved it
            // before answering. Only the availability streams are told, after the commit.
            self.moved.push((new.event, delta));
        }
        Ok(())
    }

    /// Commits; the availability streams of the events whose seats the saga saw move are
    /// told (the seats themselves are the inventory node's, moved by its own writes).
    pub async fn commit(self) -> StoreResult<()> {
        self.tx.commit().await?;
        for (event, _) in self.moved {
            self.changes.changed(event);
        }
        Ok(())
    }
}

async fn insert_rows(conn: &mut sqlx::AnyConnection, p: &Projected) -> StoreResult<()> {
    let order = p.order.0.to_string();
    // $1..$10 the order, $11..$14 the payment, then 2 per ticket; the rest are shared.
    let tickets = (0..p.tickets.len())
        .map(|i| {
            format!(
                "(${}, $1, $2, $3, $9, ${}, $15, $16)",
                17 + 2 * i,
                18 + 2 * i
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "WITH o AS (
             INSERT INTO orders (id, event_id, user_id, quantity, amount_cents, status, cancel_reason,
                                 idempotency_key, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)),
         pay AS (
             INSERT INTO payments (id, order_id, user_id, amount_cents, status, idempotency_key, processed_at, created_at)
             VALUES ($11, $1, $3, $5, $12, $13, $14, $9))
         INSERT INTO tickets (id, order_id, event_id, user_id, purchase_date, price_cents, status, cancel_reason)
         VALUES {tickets}"
    );
    let mut query = sqlx::query(&sql)
        .bind(&order)
        .bind(p.event.0)
        .bind(&p.user)
        .bind(i64::from(p.quantity))
        .bind(p.amount_cents)
        .bind(p.order_status.as_str())
        .bind(p.order_reason.map(|r| r.as_str()))
        .bind(p.idempotency_key.as_deref())
        .bind(&p.created_at)
        .bind(&p.updated_at)
        .bind(p.payment_id.to_string())
        .bind(p.payment_status.as_str())
        .bind(&p.payment_key)
        .bind(p.processed_at.as_deref())
        .bind(p.ticket_status.as_str())
        .bind(p.ticket_reason.map(|r| r.as_str()));
    for ticket in &p.tickets {
        query = query.bind(ticket.0.to_string()).bind(p.unit_price_cents);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// The order's, its tickets' and its payment's status, in one statement.
async fn update_rows(conn: &mut sqlx::AnyConnection, p: &Projected) -> StoreResult<()> {
    let order = p.order.0.to_string();
    sqlx::query(
        "WITH o AS (
             UPDATE orders SET status = $1, cancel_reason = $2, updated_at = $3 WHERE id = $4),
         t AS (
             UPDATE tickets SET status = $5, cancel_reason = $6 WHERE order_id = $4)
         UPDATE payments SET status = $7, processed_at = $8 WHERE order_id = $4",
    )
    .bind(p.order_status.as_str())
    .bind(p.order_reason.map(|r| r.as_str()))
    .bind(&p.updated_at)
    .bind(&order)
    .bind(p.ticket_status.as_str())
    .bind(p.ticket_reason.map(|r| r.as_str()))
    .bind(p.payment_status.as_str())
    .bind(p.processed_at.as_deref())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What `ticketflow replay` found: the projections rebuilt from the log alone against the
/// live tables, row by row.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub sagas: usize,
    pub events: i64,
    /// Rows compared per table (`orders`, `tickets`, `payments`, `events`, `saga_holds`,
    /// `saga_seats`).
    pub compared: Vec<(&'static str, usize)>,
    /// Every row that differs, one line each.
    pub differences: Vec<String>,
}

/// One table's rows by key, every column as text (`None` for NULL).
struct Rows {
    table: &'static str,
    columns: &'static [&'static str],
    rows: std::collections::BTreeMap<String, Vec<Option<String>>>,
}

impl Rows {
    fn new(table: &'static str, columns: &'static [&'static str]) -> Self {
        Self {
            table,
            columns,
            rows: Default::default(),
        }
    }

    /// The live table, read with `sql` (the key first, then `columns`, all as text).
    async fn read(
        table: &'static str,
        columns: &'static [&'static str],
        sql: &str,
        pool: &sqlx::AnyPool,
    ) -> StoreResult<Self> {
        let mut rows = Self::new(table, columns);
        for row in sqlx::query(sql).fetch_all(pool).await? {
            let key: String = row.try_get(0)?;
            let values = (1..=columns.len())
                .map(|i| row.try_get::<Option<String>, _>(i))
                .collect::<Result<Vec<_>, _>>()?;
            rows.rows.insert(key, values);
        }
        Ok(rows)
    }

    /// Lines saying how `live` differs from `self` (the rows rebuilt from the log).
    fn differences(&self, live: &Rows, out: &mut Vec<String>) {
        let show = |v: &Option<String>| match v {
            Some(v) => format!("{v:?}"),
            None => "NULL".into(),
        };
        for (key, expected) in &self.rows {
            match live.rows.get(key) {
                None => out.push(format!(
                    "{} {key}: rebuilt from the log, missing from the live table",
                    self.table
                )),
                Some(actual) => {
                    for ((column, want), have) in self.columns.iter().zip(expected).zip(actual) {
                        if want != have {
                            out.push(format!(
                                "{} {key}: {column} is {} live, {} from the log",
                                self.table,
                                show(have),
                                show(want)
                            ));
                        }
                    }
                }
            }
        }
        for key in live.rows.keys() {
            if !self.rows.contains_key(key) {
                out.push(format!(
                    "{} {key}: in the live table, explained by no saga in the log",
                    self.table
                ));
            }
        }
    }
}

const ORDER_COLUMNS: &[&str] = &[
    "event_id",
    "user_id",
    "quantity",
    "amount_cents",
    "status",
    "cancel_reason",
    "idempotency_key",
    "created_at",
    "updated_at",
];
const TICKET_COLUMNS: &[&str] = &[
    "order_id",
    "event_id",
    "user_id",
    "purchase_date",
    "price_cents",
    "status",
    "cancel_reason",
];
const PAYMENT_COLUMNS: &[&str] = &[
    "order_id",
    "user_id",
    "amount_cents",
    "status",
    "idempotency_key",
    "processed_at",
    "created_at",
];
const EVENT_COLUMNS: &[&str] = &["available_tickets"];
const HOLD_COLUMNS: &[&str] = &["event_id", "user_id", "quantity", "status"];
const SEAT_COLUMNS: &[&str] = &["available"];

/// `columns` of `table` as text, keyed by `key`: the SQL that reads a live table.
fn select_text(table: &str, key: &str, columns: &[&str]) -> String {
    let cast = |c: &str| format!("CAST({c} AS TEXT)");
    let mut list = vec![cast(key)];
    list.extend(columns.iter().map(|c| cast(c)));
    format!("SELECT {} FROM {table}", list.join(", "))
}

impl Store {
    /// Rebuilds every projection from the log alone (no snapshot, no live row consulted but
    /// each event's size) and compares it with the live tables, row by row; the seats, which
    /// are the inventory node's, are compared with its tables: each saga's hold in
    /// `saga_holds` as its log says, and each event's availability (in `events` and in
    /// `saga_seats`) what the node's holds leave of its total.
    pub async fn compare_projections(&self) -> StoreResult<ReplayReport> {
        self.require_saga_postgres()?;
        let sagas = self.replay_all_sagas().await?;
        let events: i64 = sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM saga_events")
            .fetch_one(&self.pool)
            .await?;
        let mut orders = Rows::new("orders", ORDER_COLUMNS);
        let mut tickets = Rows::new("tickets", TICKET_COLUMNS);
        let mut payments = Rows::new("payments", PAYMENT_COLUMNS);
        let text = |v: i64| Some(v.to_string());
        for p in sagas.iter().filter_map(rows) {
            let order = p.order.0.to_string();
            orders.rows.insert(
                order.clone(),
                vec![
                    text(p.event.0),
                    Some(p.user.clone()),
                    text(i64::from(p.quantity)),
                    text(p.amount_cents),
                    Some(p.order_status.as_str().into()),
                    p.order_reason.map(|r| r.as_str().into()),
                    p.idempotency_key.clone(),
                    Some(p.created_at.clone()),
                    Some(p.updated_at.clone()),
                ],
            );
            for ticket in &p.tickets {
                tickets.rows.insert(
                    ticket.0.to_string(),
                    vec![
                        Some(order.clone()),
                        text(p.event.0),
                        Some(p.user.clone()),
                        Some(p.created_at.clone()),
                        text(p.unit_price_cents),
                        Some(p.ticket_status.as_str().into()),
                        p.ticket_reason.map(|r| r.as_str().into()),
                    ],
                );
            }
            payments.rows.insert(
                p.payment_id.to_string(),
                vec![
                    Some(order.clone()),
                    Some(p.user.clone()),
                    text(p.amount_cents),
                    Some(p.payment_status.as_str().into()),
                    Some(p.payment_key.clone()),
                    p.processed_at.clone(),
                    Some(p.created_at.clone()),
                ],
            );
        }
        // The seats are the inventory node's: each saga's hold must stand in its table as the
        // saga's log says, and the availability must be what the node's holds leave.
        let mut holds = Rows::new("saga_holds", HOLD_COLUMNS);
        for saga in &sagas {
            let Some(placed) = saga.placed.as_ref() else {
                continue;
            };
            let status = match saga.seats {
                Seats::Held | Seats::Releasing => "held",
                Seats::Confirmed => "confirmed",
                Seats::Released => "released",
                Seats::Requested | Seats::Refused => continue,
            };
            holds.rows.insert(
                placed.order.0.to_string(),
                vec![
                    text(placed.event.0),
                    Some(placed.user.clone()),
                    text(i64::from(placed.quantity)),
                    Some(status.into()),
                ],
            );
        }
        let mut node_taken: std::collections::HashMap<i64, i64> = Default::default();
        for row in sqlx::query(
            "SELECT event_id, CAST(SUM(quantity) AS BIGINT) FROM saga_holds
              WHERE status IN ('held', 'confirmed') GROUP BY event_id",
        )
        .fetch_all(&self.pool)
        .await?
        {
            node_taken.insert(row.try_get(0)?, row.try_get(1)?);
        }
        let mut availability = Rows::new("events", EVENT_COLUMNS);
        let mut seats = Rows::new("saga_seats", SEAT_COLUMNS);
        let seated: std::collections::HashSet<i64> =
            sqlx::query_scalar("SELECT event_id FROM saga_seats")
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .collect();
        for row in sqlx::query("SELECT id, total_tickets FROM events")
            .fetch_all(&self.pool)
            .await?
        {
            let (id, total): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            let left = text(total - node_taken.get(&id).copied().unwrap_or(0));
            availability.rows.insert(id.to_string(), vec![left.clone()]);
            if seated.contains(&id) {
                seats.rows.insert(id.to_string(), vec![left]);
            }
        }
        let pool = &self.pool;
        let live = [
            Rows::read(
                "orders",
                ORDER_COLUMNS,
                &select_text("orders", "id", ORDER_COLUMNS),
                pool,
            )
            .await?,
            Rows::read(
                "tickets",
                TICKET_COLUMNS,
                &select_text("tickets", "id", TICKET_COLUMNS),
                pool,
            )
            .await?,
            Rows::read(
                "payments",
                PAYMENT_COLUMNS,
                &select_text("payments", "id", PAYMENT_COLUMNS),
                pool,
            )
            .await?,
            Rows::read(
                "events",
                EVENT_COLUMNS,
                &select_text("events", "id", EVENT_COLUMNS),
                pool,
            )
            .await?,
            Rows::read(
                "saga_holds",
                HOLD_COLUMNS,
                &select_text("saga_holds", "order_id", HOLD_COLUMNS),
                pool,
            )
            .await?,
            Rows::read(
                "saga_seats",
                SEAT_COLUMNS,
                &select_text("saga_seats", "event_id", SEAT_COLUMNS),
                pool,
            )
            .await?,
        ];
        let mut report = ReplayReport {
            sagas: sagas.len(),
            events,
            ..ReplayReport::default()
        };
        for (rebuilt, live) in [orders, tickets, payments, availability, holds, seats]
            .iter()
            .zip(&live)
        {
            report.compared.push((rebuilt.table, rebuilt.rows.len()));
            rebuilt.differences(live, &mut report.differences);
        }
        Ok(report)
    }
}

/// An inventory node's write for one saga seat command ([`crate::saga::seats`]): the
/// command's inbox row, with the answer the node gives, and the seats it moves, in the node's
/// epoch-fenced writer's transaction ([`super::WriteOp::SagaSeats`]).
#[derive(Debug, Clone)]
pub struct SeatWrite {
    pub message_id: String,
    pub order: OrderId,
    pub event: EventId,
    pub change: SeatChange,
    /// The node's answer ([`crate::saga::Reply`] as JSON), kept with the inbox row.
    pub outcome: Value,
}

impl SeatWrite {
    /// Whether the write moves the event's free seats.
    pub fn moves_seats(&self) -> bool {
        matches!(
            self.change,
            SeatChange::Hold { .. } | SeatChange::Release { .. }
        )
    }
}

/// Writes `w` on the writer's connection. The inbox row has no `ON CONFLICT`: the node looks
/// for it before deciding, so finding it here is a bug, and the write is refused.
pub(super) async fn write_seats(
    conn: &mut sqlx::AnyConnection,
    w: &SeatWrite,
) -> Result<(), sqlx::Error> {
    let order = w.order.0.to_string();
    let outcome = serde_json::to_string(&w.outcome)
        .map_err(|e| sqlx::Error::Protocol(format!("a seat answer that cannot be stored: {e}")))?;
    sqlx::query(
        "INSERT INTO saga_inbox (consumer, message_id, saga_id, outcome)
         VALUES ('inventory', $1, $2, CAST($3 AS JSONB))",
    )
    .bind(&w.message_id)
    .bind(&order)
    .bind(outcome)
    .execute(&mut *conn)
    .await?;
    let moved = match &w.change {
        SeatChange::Nothing => 0,
        SeatChange::Hold { user, quantity } => {
            sqlx::query(
                "INSERT INTO saga_holds (order_id, event_id, user_id, quantity, status)
                 VALUES ($1, $2, $3, $4, 'held')",
            )
            .bind(&order)
            .bind(w.event.0)
            .bind(user)
            .bind(i64::from(*quantity))
            .execute(&mut *conn)
            .await?;
            -i64::from(*quantity)
        }
        SeatChange::Release { quantity } => {
            let released = sqlx::query(
                "UPDATE saga_holds SET status = 'released' WHERE order_id = $1 AND status = 'held'",
            )
            .bind(&order)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if released != 1 {
                return Err(sqlx::Error::Protocol(format!(
                    "saga hold {order}: no held row to release"
                )));
            }
            i64::from(*quantity)
        }
        SeatChange::Confirm => {
            let confirmed = sqlx::query(
                "UPDATE saga_holds SET status = 'confirmed' WHERE order_id = $1 AND status = 'held'",
            )
            .bind(&order)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if confirmed != 1 {
                return Err(sqlx::Error::Protocol(format!(
                    "saga hold {order}: no held row to confirm"
                )));
            }
            0
        }
    };
    if moved != 0 {
        // Both counters in one statement; their CHECKs refuse a move past 0 or the total.
        let rows = sqlx::query(
            "WITH s AS (UPDATE saga_seats SET available = available + $1 WHERE event_id = $2 RETURNING 1)
             UPDATE events SET available_tickets = available_tickets + $1
              WHERE id = $2 AND EXISTS (SELECT 1 FROM s)",
        )
        .bind(moved)
        .bind(w.event.0)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if rows != 1 {
            return Err(sqlx::Error::Protocol(format!(
                "event {}: no seats row to move",
                w.event
            )));
        }
    }
    Ok(())
}

impl Store {
    /// What the inventory node answered `message_id` with, if it applied it already.
    pub async fn seat_answer(&self, message_id: &str) -> StoreResult<Option<Value>> {
        let row: Option<Option<String>> = sqlx::query_scalar(
            "SELECT CAST(outcome AS TEXT) FROM saga_inbox WHERE consumer = 'inventory' AND message_id = $1",
        )
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(Some(text)) => Ok(Some(serde_json::from_str(&text).map_err(corrupt)?)),
            // Applied by the in-process participant of an older build, which kept no answer:
            // not to be applied again, and not answerable (its saga recorded the answer then).
            Some(None) => Err(StoreError::Corrupt(format!(
                "inbox message {message_id} was applied by an older build, with no answer kept"
            ))),
            None => Ok(None),
        }
    }

    /// One event's seats as the inventory node rebuilds its book from them: the free seats
    /// (`None`: no such event) and every saga hold on it. The seats' row is made from the
    /// event's availability the first time.
    pub async fn seat_book(&self, event: EventId) -> StoreResult<SeatBook> {
        sqlx::query(
            "INSERT INTO saga_seats (event_id, total, available)
             SELECT id, total_tickets, available_tickets FROM events WHERE id = $1
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event.0)
        .execute(&self.pool)
        .await?;
        let available: Option<i64> =
            sqlx::query_scalar("SELECT available FROM saga_seats WHERE event_id = $1")
                .bind(event.0)
                .fetch_optional(&self.pool)
                .await?;
        let rows = sqlx::query(
            "SELECT order_id, user_id, quantity, status FROM saga_holds WHERE event_id = $1",
        )
        .bind(event.0)
        .fetch_all(&self.pool)
        .await?;
        let mut holds = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get(0)?;
            let order = OrderId(Uuid::parse_str(&id).map_err(corrupt)?);
            let status: String = row.try_get(3)?;
            holds.push((
                order,
                Hold {
                    user: row.try_get(1)?,
                    quantity: row.try_get::<i64, _>(2)? as u32,
                    status: HoldStatus::parse(&status).ok_or_else(|| corrupt(&status))?,
                },
            ));
        }
        Ok(SeatBook::new(available.map(|a| a as u32), holds))
    }
}
