//! Stage `services`: shard leases and the epoch fence, on PostgreSQL.
//!
//! Every event belongs to one of [`SHARDS`] shards ([`shard_of`]). An inventory node owns a
//! shard through a lease row in `shard_leases`: its owner, an epoch that grows on every
//! takeover, and an expiry that only this database's clock ever sets or reads (`now()`), so a
//! node with a wrong clock can neither stretch its lease nor cut another's short.
//!
//! The fence ([`ShardFence`]) is what makes a lease safe to trust. Every transaction of an
//! inventory node's writer first locks the lease rows of the shards it writes (`FOR SHARE`)
//! and checks that each is still this node's, at the epoch it took it with, and unexpired. A
//! takeover has to update those rows, so it waits for such a transaction to end; and a node
//! that paused past its lease finds a newer epoch when it wakes, and its writes are refused.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use sqlx::{AnyConnection, Row};

use super::{Store, StoreError, StoreResult};
use crate::domain::{EventId, OrderId};

/// How many shards the events are spread over. Fixed: changing it moves events between shards.
pub const SHARDS: u32 = 64;

/// The shard an event belongs to: a fixed mix of its id (the same on every node and every
/// run; consecutive ids land on different shards).
pub fn shard_of(event: EventId) -> u32 {
    // splitmix64's finaliser: every input bit moves every output bit.
    let mut x = event.0 as u64;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x % u64::from(SHARDS)) as u32
}

/// A shard held by a node, at the epoch it took it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShardLease {
    pub shard: u32,
    pub epoch: i64,
}

/// A shard's lease as the database has it, for the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub shard: u32,
    pub owner: Option<String>,
    pub epoch: i64,
    /// Milliseconds left by the database's clock (negative once expired).
    pub remaining_ms: i64,
}

/// A node of a `services` deployment as it last reported itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub role: String,
    pub addr: String,
    pub pid: i64,
    /// Reported recently enough to count as alive.
    pub up: bool,
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn lease(row: &sqlx::any::AnyRow) -> StoreResult<ShardLease> {
    let shard: i32 = row.try_get(0)?;
    Ok(ShardLease {
        shard: u32::try_from(shard).map_err(|_| StoreError::Corrupt(format!("shard {shard}")))?,
        epoch: row.try_get(1)?,
    })
}

impl Store {
    /// Makes sure a lease row exists for every shard (unowned at first).
    pub async fn ensure_shards(&self) -> StoreResult<()> {
        self.require_postgres("shard leases")?;
        sqlx::query(
            "INSERT INTO shard_leases (shard) SELECT s FROM generate_series(0, $1) AS s
             ON CONFLICT (shard) DO NOTHING",
        )
        .bind(i64::from(SHARDS) - 1)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Extends, by `ttl` from the database's now, every unexpired lease `node` holds, and
    /// returns them: the shards it still owns. A lease that ran out is not renewed (another
    /// node may be taking it); its owner lost it.
    pub async fn renew_leases(&self, node: &str, ttl: Duration) -> StoreResult<Vec<ShardLease>> {
        let rows = sqlx::query(
            "UPDATE shard_leases
                SET expires_at = now() + CAST($2 AS DOUBLE PRECISION) * interval '1 millisecond'
              WHERE owner = $1 AND expires_at > now()
             RETURNING shard, epoch",
        )
        .bind(node)
        .bind(millis(ttl))
        .fetch_all(&self.pool)
        .await?;
        let mut leases = rows.iter().map(lease).collect::<StoreResult<Vec<_>>>()?;
        leases.sort();
        Ok(leases)
    }

    /// Takes up to `want` shards that nobody holds or whose lease has run out, each at a new
    /// epoch, for `ttl`. Shards being taken by another node at the same moment are skipped.
    pub async fn claim_shards(
        &self,
        node: &str,
        want: usize,
        ttl: Duration,
    ) -> StoreResult<Vec<ShardLease>> {
        if want == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "UPDATE shard_leases
                SET owner = $1, epoch = epoch + 1,
                    expires_at = now() + CAST($3 AS DOUBLE PRECISION) * interval '1 millisecond'
              WHERE shard IN (SELECT shard FROM shard_leases
                               WHERE owner IS NULL OR expires_at <= now()
                               ORDER BY shard LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING shard, epoch",
        )
        .bind(node)
        .bind(want as i64)
        .bind(millis(ttl))
        .fetch_all(&self.pool)
        .await?;
        let mut leases = rows.iter().map(lease).collect::<StoreResult<Vec<_>>>()?;
        leases.sort();
        Ok(leases)
    }

    /// Gives a shard back at once (its epoch stays, so the next owner's is higher). Only the
    /// holder at `lease.epoch` can; returns whether it did.
    pub async fn release_shard(&self, node: &str, lease: ShardLease) -> StoreResult<bool> {
        let affected = sqlx::query(
            "UPDATE shard_leases SET owner = NULL, expires_at = now()
              WHERE shard = $1 AND owner = $2 AND epoch = $3",
        )
        .bind(lease.shard as i32)
        .bind(node)
        .bind(lease.epoch)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(affected == 1)
    }

    /// Every shard's lease, by shard.
    pub async fn shard_leases(&self) -> StoreResult<Vec<LeaseRow>> {
        let rows = sqlx::query(
            "SELECT shard, owner, epoch,
                    CAST(EXTRACT(EPOCH FROM (expires_at - now())) * 1000 AS BIGINT)
               FROM shard_leases ORDER BY shard",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let shard: i32 = r.try_get(0)?;
                Ok(LeaseRow {
                    shard: shard as u32,
                    owner: r.try_get(1)?,
                    epoch: r.try_get(2)?,
                    remaining_ms: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The address of the node holding `shard`'s lease now (unexpired, by the database's
    /// clock), as it last reported itself; `None` while nobody holds it.
    pub async fn shard_owner(&self, shard: u32) -> StoreResult<Option<String>> {
        let addr: Option<String> = sqlx::query_scalar(
            "SELECT n.addr FROM shard_leases l JOIN service_nodes n ON n.id = l.owner
              WHERE l.shard = $1 AND l.expires_at > now()",
        )
        .bind(shard as i32)
        .fetch_optional(&self.pool)
        .await?;
        Ok(addr)
    }

    /// Records that node `id` (`role`, reachable at `addr`, process `pid`) is alive now.
    pub async fn node_seen(&self, id: &str, role: &str, addr: &str, pid: u32) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO service_nodes (id, role, addr, pid, seen_at) VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (id) DO UPDATE
                SET role = EXCLUDED.role, addr = EXCLUDED.addr, pid = EXCLUDED.pid, seen_at = now()",
        )
        .bind(id)
        .bind(role)
        .bind(addr)
        .bind(i64::from(pid))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks node `id` down at once (its supervisor saw it die), instead of waiting for its
    /// reports to age.
    pub async fn node_gone(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE service_nodes SET seen_at = '-infinity' WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A transaction holding PostgreSQL's advisory lock `key` until it ends (dropped or
    /// committed), or `None` when another session holds it: so that of several processes
    /// about to start the same node, one does.
    pub async fn try_advisory_lock(
        &self,
        key: i64,
    ) -> StoreResult<Option<sqlx::Transaction<'static, sqlx::Any>>> {
        let mut tx = self.pool.begin().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
        Ok(got.then_some(tx))
    }

    /// How many nodes of `role` reported themselves within `within` (by the database's clock).
    pub async fn live_nodes(&self, role: &str, within: Duration) -> StoreResult<usize> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM service_nodes
              WHERE role = $1
                AND seen_at > now() - CAST($2 AS DOUBLE PRECISION) * interval '1 millisecond'",
        )
        .bind(role)
        .bind(millis(within))
        .fetch_one(&self.pool)
        .await?;
        let count: i64 = row.try_get(0)?;
        Ok(count as usize)
    }

    /// The node of `role` that reported itself last, if it did within `within`: its id and
    /// address (the payments node, for the nodes that call it).
    pub async fn live_node(
        &self,
        role: &str,
        within: Duration,
    ) -> StoreResult<Option<(String, String)>> {
        let row = sqlx::query(
            "SELECT id, addr FROM service_nodes
              WHERE role = $1
                AND seen_at > now() - CAST($2 AS DOUBLE PRECISION) * interval '1 millisecond'
              ORDER BY seen_at DESC LIMIT 1",
        )
        .bind(role)
        .bind(millis(within))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    /// Every node that ever reported itself, with whether it did within `within` (up).
    pub async fn service_nodes(&self, within: Duration) -> StoreResult<Vec<NodeRow>> {
        let rows = sqlx::query(
            "SELECT id, role, addr, pid,
                    CASE WHEN seen_at > now() - CAST($1 AS DOUBLE PRECISION) * interval '1 millisecond'
                         THEN 1 ELSE 0 END
               FROM service_nodes ORDER BY role, id",
        )
        .bind(millis(within))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let up: i32 = r.try_get(4)?;
                Ok(NodeRow {
                    id: r.try_get(0)?,
                    role: r.try_get(1)?,
                    addr: r.try_get(2)?,
                    pid: r.try_get(3)?,
                    up: up == 1,
                })
            })
            .collect()
    }

    pub(super) fn require_postgres(&self, what: &str) -> StoreResult<()> {
        match self.backend() {
            super::Backend::Postgres => Ok(()),
            super::Backend::Sqlite => Err(StoreError::Internal(format!(
                "{what} need PostgreSQL (stage services)"
            ))),
        }
    }
}

/// The epochs a node's writer must prove before it writes: shard to the epoch this node took
/// it with. Shared between the node's lease keeper, which sets and removes shards, and its
/// writer, which checks them in every transaction.
#[derive(Debug)]
pub struct ShardFence {
    node: String,
    epochs: RwLock<HashMap<u32, i64>>,
    /// `false` only for the lesson that shows why the check exists (`--unsafe-no-epoch`).
    enforce: bool,
    /// A failpoint for the tests: the writer waits this long before each transaction, so a
    /// test can pause the node while writes it decided are still unwritten.
    write_delay: Option<std::time::Duration>,
}

impl ShardFence {
    pub fn new(node: impl Into<String>, enforce: bool) -> Self {
        Self {
            node: node.into(),
            epochs: RwLock::new(HashMap::new()),
            enforce,
            write_delay: None,
        }
    }

    /// The failpoint of [`Self::write_delay`].
    pub fn with_write_delay(mut self, delay: Option<std::time::Duration>) -> Self {
        self.write_delay = delay;
        self
    }

    pub fn write_delay(&self) -> Option<std::time::Duration> {
        self.write_delay
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn enforced(&self) -> bool {
        self.enforce
    }

    /// This node now holds `lease`.
    pub fn hold(&self, lease: ShardLease) {
        self.epochs
            .write()
            .expect("shard epochs poisoned")
            .insert(lease.shard, lease.epoch);
    }

    /// This node no longer holds `shard`.
    pub fn drop_shard(&self, shard: u32) {
        self.epochs
            .write()
            .expect("shard epochs poisoned")
            .remove(&shard);
    }

    /// The epoch this node holds `shard` at, if it holds it.
    pub fn epoch(&self, shard: u32) -> Option<i64> {
        self.epochs
            .read()
            .expect("shard epochs poisoned")
            .get(&shard)
            .copied()
    }

    /// Inside the writer's transaction, before it writes: locks the lease rows of every shard
    /// the writes touch and checks each is still this node's, unexpired, at the right epoch.
    /// A `stamped` write must find its shard held at its stamp's epoch, here and in the
    /// database; the shards of `events` and of `orders` (a confirmation names only its order,
    /// so its event is looked up) at the epoch this node holds them at now.
    pub(crate) async fn check(
        &self,
        conn: &mut AnyConnection,
        stamped: &[super::Stamp],
        events: &[EventId],
        orders: &[OrderId],
    ) -> Result<(), sqlx::Error> {
        if !self.enforce {
            return Ok(());
        }
        let mut shards: Vec<u32> = events.iter().map(|e| shard_of(*e)).collect();
        if !orders.is_empty() {
            let sql = format!(
                "SELECT DISTINCT event_id FROM orders WHERE id IN ({})",
                super::sql::numbered("?", orders.len(), 1)
            );
            let mut query = sqlx::query(&sql);
            for order in orders {
                query = query.bind(order.0.to_string());
            }
            for row in query.fetch_all(&mut *conn).await? {
                shards.push(shard_of(EventId(row.try_get(0)?)));
            }
        }
        let mut held: Vec<(u32, i64)> = {
            let epochs = self.epochs.read().expect("shard epochs poisoned");
            let mut held = Vec::with_capacity(shards.len() + stamped.len());
            for shard in &shards {
                match epochs.get(shard) {
                    Some(epoch) => held.push((*shard, *epoch)),
                    None => return Err(not_owner(&self.node, *shard)),
                }
            }
            for stamp in stamped {
                if epochs.get(&stamp.shard) != Some(&stamp.epoch) {
                    return Err(not_owner(&self.node, stamp.shard));
                }
                held.push((stamp.shard, stamp.epoch));
            }
            held
        };
        held.sort_unstable();
        held.dedup();
        if held.is_empty() {
            return Ok(());
        }
        let pairs = (0..held.len())
            .map(|i| format!("(shard = ${} AND epoch = ${})", 2 + 2 * i, 3 + 2 * i))
            .collect::<Vec<_>>()
            .join(" OR ");
        let sql = format!(
            "SELECT shard FROM shard_leases
              WHERE owner = $1 AND expires_at > now() AND ({pairs})
             FOR SHARE"
        );
        let mut query = sqlx::query(&sql).bind(self.node.clone());
        for (shard, epoch) in &held {
            query = query.bind(*shard as i32).bind(*epoch);
        }
        let rows = query.fetch_all(&mut *conn).await?;
        if rows.len() == held.len() {
            return Ok(());
        }
        let current: Vec<i32> = rows
            .iter()
            .filter_map(|r| r.try_get::<i32, _>(0).ok())
            .collect();
        let lost = held
            .iter()
            .find(|(shard, _)| !current.contains(&(*shard as i32)))
            .map_or(held[0].0, |(shard, _)| *shard);
        Err(not_owner(&self.node, lost))
    }
}

/// The error a fenced write fails with; [`StoreError::from`] turns it into
/// [`StoreError::Conflict`] with this text, which says which shard was lost.
fn not_owner(node: &str, shard: u32) -> sqlx::Error {
    sqlx::Error::Protocol(format!(
        "{NOT_OWNER}: node {node} no longer holds shard {shard} at its epoch"
    ))
}

/// The start of the message of a write refused by the epoch fence.
pub const NOT_OWNER: &str = "stale shard epoch";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_spread_consecutive_events_and_stay_put() {
        let mut seen = std::collections::HashSet::new();
        for id in 1..=1000 {
            let shard = shard_of(EventId(id));
            assert!(shard < SHARDS);
            assert_eq!(shard, shard_of(EventId(id)));
            seen.insert(shard);
        }
        assert_eq!(
            seen.len(),
            SHARDS as usize,
            "1,000 events reach every shard"
        );
        assert_ne!(shard_of(EventId(1)), shard_of(EventId(2)));
    }
}
