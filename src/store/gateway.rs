//! The payment gateway's own books ([`GatewayBooks`]): the ledger of every charge, decline and
//! refund, each line under the payment key it answered, in a table of its own
//! (`migrations/*/0004_gateway_books.sql`). A key's first line is its deduplication record: what
//! every retry under that key is answered. The gateway ([`crate::payments`]) is the only
//! writer, through one task that commits whatever is waiting as one transaction, so writes
//! come in whole batches.

use async_trait::async_trait;
use serde::Serialize;
use sqlx::{Connection, Row};
use uuid::Uuid;

use super::sql::{numbered, CHUNK};
use super::writer::WriteOp;
use super::{parse_uuid, Store, StoreError, StoreResult};

/// What the books say about one payment key, read from its lines; the answer never changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookedKey {
    pub key: String,
    /// The id of the approved charge; `None` when the charge was declined.
    pub charge_id: Option<Uuid>,
    pub amount_cents: i64,
    pub decided_at: String,
    /// The approved charge has been refunded.
    pub refunded: bool,
}

/// One line of the gateway's ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    /// Position in the ledger, in the order written; the paging cursor.
    pub seq: i64,
    pub key: String,
    pub kind: LedgerKind,
    pub amount_cents: i64,
    /// The gateway's id for an approved charge, on its `charge` line only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_id: Option<Uuid>,
    pub at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    Charge,
    Decline,
    Refund,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Decline => "decline",
            Self::Refund => "refund",
        }
    }

    fn parse(raw: &str) -> StoreResult<Self> {
        match raw {
            "charge" => Ok(Self::Charge),
            "decline" => Ok(Self::Decline),
            "refund" => Ok(Self::Refund),
            other => Err(StoreError::Corrupt(format!("unknown ledger kind {other}"))),
        }
    }
}

/// Payments of one kind, counted, as the audit reconciles them against the books: whether the
/// order is confirmed, the payment's status, and the net charges the books hold for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentClass {
    pub order_confirmed: bool,
    pub payment_status: String,
    /// Charges minus refunds under the payment's key; `None` when the gateway never saw it.
    pub net_charges: Option<i64>,
    pub payments: i64,
}

/// Everything the audit needs from the books, summed by the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    pub classes: Vec<PaymentClass>,
    /// Keys the gateway answered that no payment record names.
    pub unrecorded_keys: i64,
    /// Lines in the ledger.
    pub ledger_entries: i64,
}

/// The payment gateway's books. Written only by the gateway, in batches; read by the gateway
/// (a key it no longer holds in memory), the admin ledger routes and the audit.
#[async_trait]
pub trait GatewayBooks: Send + Sync {
    /// What the books hold for those of `keys` they know.
    async fn booked_keys(&self, keys: &[&str]) -> StoreResult<Vec<BookedKey>>;
    /// Appends `lines` in one transaction (a multi-row insert), or none of them.
    async fn write_books(&self, lines: &[LedgerEntry]) -> StoreResult<()>;
    /// The highest ledger position written so far (0 for an empty ledger).
    async fn last_ledger_seq(&self) -> StoreResult<i64>;
    /// Up to `limit` ledger lines after position `after`, in the order written.
    async fn ledger_page(&self, after: i64, limit: u32) -> StoreResult<Vec<LedgerEntry>>;
    /// Payments grouped by what the audit checks, against the net charges in the books.
    async fn reconciliation(&self) -> StoreResult<Reconciliation>;
}

#[async_trait]
impl GatewayBooks for Store {
    async fn booked_keys(&self, keys: &[&str]) -> StoreResult<Vec<BookedKey>> {
        let mut found: Vec<BookedKey> = Vec::new();
        for chunk in keys.chunks(CHUNK) {
            let sql = format!(
                "SELECT payment_key, kind, charge_id, amount_cents, at FROM gateway_ledger
                 WHERE payment_key IN ({}) ORDER BY payment_key, seq",
                numbered("?", chunk.len(), 1)
            );
            let mut query = sqlx::query(&sql);
            for key in chunk {
                query = query.bind(*key);
            }
            for row in query.fetch_all(&self.pool).await? {
                let key: String = row.try_get(0)?;
                let kind = LedgerKind::parse(&row.try_get::<String, _>(1)?)?;
                if kind == LedgerKind::Refund {
                    // ordered by seq: a refund comes after its key's answer
                    match found.last_mut() {
                        Some(booked) if booked.key == key => booked.refunded = true,
                        _ => {
                            return Err(StoreError::Corrupt(format!(
                                "the gateway refunded {key}, which it never charged"
                            )))
                        }
                    }
                    continue;
                }
                let charge_id: Option<String> = row.try_get(2)?;
                found.push(BookedKey {
                    key,
                    charge_id: charge_id.map(parse_uuid).transpose()?,
                    amount_cents: row.try_get(3)?,
                    decided_at: row.try_get(4)?,
                    refunded: false,
                });
            }
        }
        Ok(found)
    }

    async fn write_books(&self, lines: &[LedgerEntry]) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        if let Some(writer) = self.ledger_writer() {
            match writer.submit(WriteOp::Ledger(lines.to_vec())).await {
                Err(StoreError::WriterClosed) => {} // stopping: written on the pool below
                written => return written,
            }
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        insert_ledger(&mut tx, lines).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn last_ledger_seq(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM gateway_ledger",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn ledger_page(&self, after: i64, limit: u32) -> StoreResult<Vec<LedgerEntry>> {
        let rows = sqlx::query(
            "SELECT seq, payment_key, kind, amount_cents, charge_id, at FROM gateway_ledger
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(LedgerEntry {
                    seq: r.try_get(0)?,
                    key: r.try_get(1)?,
                    kind: LedgerKind::parse(&r.try_get::<String, _>(2)?)?,
                    amount_cents: r.try_get(3)?,
                    charge_id: r
                        .try_get::<Option<String>, _>(4)?
                        .map(parse_uuid)
                        .transpose()?,
                    at: r.try_get(5)?,
                })
            })
            .collect()
    }

    async fn reconciliation(&self) -> StoreResult<Reconciliation> {
        // One row per kind of payment (a handful), however many payments and ledger lines.
        let rows = sqlx::query(
            "SELECT CASE WHEN o.status = 'confirmed' THEN 1 ELSE 0 END AS confirmed,
                    p.status, n.net, CAST(COUNT(*) AS BIGINT)
             FROM payments p
             JOIN orders o ON o.id = p.order_id
             LEFT JOIN (
                 SELECT payment_key,
                        CAST(SUM(CASE kind WHEN 'charge' THEN 1 WHEN 'refund' THEN -1 ELSE 0 END) AS BIGINT) AS net
                 FROM gateway_ledger GROUP BY payment_key
             ) n ON n.payment_key = p.idempotency_key
             GROUP BY CASE WHEN o.status = 'confirmed' THEN 1 ELSE 0 END, p.status, n.net",
        )
        .fetch_all(&self.pool)
        .await?;
        let classes = rows
            .into_iter()
            .map(|r| {
                Ok(PaymentClass {
                    order_confirmed: r.try_get::<i64, _>(0)? == 1,
                    payment_status: r.try_get(1)?,
                    net_charges: r.try_get(2)?,
                    payments: r.try_get(3)?,
                })
            })
            .collect::<StoreResult<_>>()?;
        let unrecorded_keys = sqlx::query_scalar::<_, i64>(
            "SELECT CAST(COUNT(DISTINCT l.payment_key) AS BIGINT) FROM gateway_ledger l
             WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.idempotency_key = l.payment_key)",
        )
        .fetch_one(&self.pool)
        .await?;
        let ledger_entries =
            sqlx::query_scalar::<_, i64>("SELECT CAST(COUNT(*) AS BIGINT) FROM gateway_ledger")
                .fetch_one(&self.pool)
                .await?;
        Ok(Reconciliation {
            classes,
            unrecorded_keys,
            ledger_entries,
        })
    }
}

/// Appends `lines` to the ledger on `conn` (in the caller's transaction), in multi-row
/// inserts: the books' own path, and the group-commit writer's when the books share it.
pub(super) async fn insert_ledger(
    conn: &mut sqlx::AnyConnection,
    lines: &[LedgerEntry],
) -> Result<(), sqlx::Error> {
    const COLUMNS: usize = 6;
    for chunk in lines.chunks(CHUNK / COLUMNS) {
        let sql = format!(
            "INSERT INTO gateway_ledger (seq, payment_key, kind, amount_cents, charge_id, at) VALUES {}",
            numbered("(?, ?, ?, ?, ?, ?)", chunk.len(), 1)
        );
        let mut query = sqlx::query(&sql);
        for line in chunk {
            query = query
                .bind(line.seq)
                .bind(&line.key)
                .bind(line.kind.as_str())
                .bind(line.amount_cents)
                .bind(line.charge_id.map(|id| id.to_string()))
                .bind(&line.at);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::store::DatabaseUrl;

    /// A fresh database of each backend: a SQLite file, and a PostgreSQL database of its own on
    /// the server `TICKETFLOW_TEST_POSTGRES_URL` names (default: the local one), dropped after.
    async fn each_backend(test: impl AsyncFn(Store)) {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = dir.path().join("books.db");
        test(
            Store::open(sqlite.to_str().unwrap(), Durability::Normal)
                .await
                .unwrap(),
        )
        .await;

        let server = std::env::var("TICKETFLOW_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let (base, _) = server.rsplit_once('/').unwrap();
        let url = format!("{base}/tf_books_{}", Uuid::new_v4().simple());
        let store = Store::open(&url, Durability::Normal)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {server}: {e}"));
        test(store.clone()).await;
        store.close().await;
        DatabaseUrl::parse(&url, Durability::Normal)
            .unwrap()
            .drop_database()
            .await
            .unwrap();
    }

    fn line(seq: i64, key: &str, kind: LedgerKind) -> LedgerEntry {
        LedgerEntry {
            seq,
            key: key.into(),
            kind,
            amount_cents: 500,
            charge_id: (kind == LedgerKind::Charge).then(Uuid::new_v4),
            at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    #[tokio::test]
    async fn the_books_read_back_what_was_written_and_page_in_order() {
        each_backend(async |store: Store| {
            let lines = [
                line(1, "a", LedgerKind::Charge),
                line(2, "d", LedgerKind::Decline),
                line(5, "a", LedgerKind::Refund),
            ];
            store.write_books(&lines).await.unwrap();
            let mut found = store.booked_keys(&["a", "d", "never"]).await.unwrap();
            found.sort_by(|x, y| x.key.cmp(&y.key));
            let booked = |key: &str, charge_id, refunded| BookedKey {
                key: key.into(),
                charge_id,
                amount_cents: 500,
                decided_at: "2026-01-01T00:00:00.000Z".into(),
                refunded,
            };
            assert_eq!(
                found,
                [
                    booked("a", lines[0].charge_id, true),
                    booked("d", None, false)
                ]
            );
            assert_eq!(store.last_ledger_seq().await.unwrap(), 5);
            assert_eq!(store.ledger_page(0, 2).await.unwrap(), lines[..2]);
            assert_eq!(store.ledger_page(2, 10).await.unwrap(), lines[2..]);
            let books = store.reconciliation().await.unwrap();
            assert_eq!(books.ledger_entries, 3);
            assert_eq!(books.unrecorded_keys, 2, "no payment records these keys");
        })
        .await;
    }

    #[tokio::test]
    async fn the_database_refuses_a_second_answer_or_a_second_refund_for_a_key() {
        each_backend(async |store: Store| {
            let first = [
                line(1, "a", LedgerKind::Charge),
                line(2, "a", LedgerKind::Refund),
            ];
            store.write_books(&first).await.unwrap();
            let mut without_id = line(3, "b", LedgerKind::Charge);
            without_id.charge_id = None;
            let mut decline_with_id = line(3, "b", LedgerKind::Decline);
            decline_with_id.charge_id = Some(Uuid::new_v4());
            for (what, refused) in [
                ("a second charge", line(3, "a", LedgerKind::Charge)),
                (
                    "a decline beside the charge",
                    line(3, "a", LedgerKind::Decline),
                ),
                ("a second refund", line(3, "a", LedgerKind::Refund)),
                ("a position used twice", line(2, "b", LedgerKind::Charge)),
                ("a charge without its id", without_id),
                ("a decline with a charge id", decline_with_id),
            ] {
                // beside a good line, so the whole batch must be refused
                let batch = [line(10, "good", LedgerKind::Charge), refused];
                let result = store.write_books(&batch).await;
                assert!(
                    matches!(result, Err(StoreError::Constraint(_))),
                    "{what}: {result:?}"
                );
            }
            assert_eq!(
                store.ledger_page(0, 10).await.unwrap(),
                first,
                "nothing half-written"
            );
        })
        .await;
    }
}
