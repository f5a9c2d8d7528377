//! API v2's users (bearer tokens, stored hashed) and Idempotency-Key records.

use chrono::{Duration, Utc};
use sha2::{Digest, Sha256};
use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreResult};
use crate::domain::{timestamp, UserId};

/// A user just created; `token` is shown once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewUser {
    pub id: String,
    pub name: String,
    pub token: String,
    pub created_at: String,
}

/// What to do with a request that carries an Idempotency-Key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// First time: the request runs, and its answer is stored afterwards.
    Proceed,
    /// The same request is still running: answer 409 and ask to retry.
    InFlight,
    /// The key was used with another request: answer 422.
    Mismatch,
    /// The request finished before: answer with what was answered then.
    Replay { status: u16, body: String },
}

/// How long a key is kept after its first use (SPEC: at least 24 h).
pub const KEY_RETENTION_HOURS: i64 = 48;

/// SHA-256 in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

impl Store {
    /// Creates a user with a fresh random bearer token.
    pub async fn create_user(&self, name: &str) -> StoreResult<NewUser> {
        let id = Uuid::new_v4().to_string();
        let token =
            format!("tf_{}", Uuid::new_v4().simple()) + &Uuid::new_v4().simple().to_string();
        let created_at = timestamp(Utc::now());
        sqlx::query("INSERT INTO users (id, name, token_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(&id)
            .bind(name)
            .bind(sha256_hex(token.as_bytes()))
            .bind(&created_at)
            .execute(self.pool())
            .await?;
        Ok(NewUser {
            id,
            name: name.to_owned(),
            token,
            created_at,
        })
    }

    /// The user a bearer token belongs to.
    pub async fn user_by_token(&self, token: &str) -> StoreResult<Option<UserId>> {
        let id: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE token_hash = ?")
            .bind(sha256_hex(token.as_bytes()))
            .fetch_optional(self.pool())
            .await?;
        Ok(id.and_then(|id| UserId::parse(&id).ok()))
    }

    /// Claims `(user, key)` for a request with `fingerprint`, or says why it cannot run.
    pub async fn begin_idempotent(
        &self,
        user: &UserId,
        key: &str,
        fingerprint: &str,
    ) -> StoreResult<KeyState> {
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (user_id, key, fingerprint, state, created_at)
             VALUES (?, ?, ?, 'in_flight', ?) ON CONFLICT (user_id, key) DO NOTHING",
        )
        .bind(user.as_str())
        .bind(key)
        .bind(fingerprint)
        .bind(timestamp(Utc::now()))
        .execute(self.pool())
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(KeyState::Proceed);
        }
        let row = sqlx::query(
            "SELECT fingerprint, state, status, body FROM idempotency_keys WHERE user_id = ? AND key = ?",
        )
        .bind(user.as_str())
        .bind(key)
        .fetch_one(self.pool())
        .await?;
        let stored: String = row.get(0);
        if stored != fingerprint {
            return Ok(KeyState::Mismatch);
        }
        let state: String = row.get(1);
        if state == "in_flight" {
            return Ok(KeyState::InFlight);
        }
        Ok(KeyState::Replay {
            status: row.get::<i64, _>(2) as u16,
            body: row.get(3),
        })
    }

    /// Stores the final answer of a request that claimed `(user, key)`.
    pub async fn complete_idempotent(
        &self,
        user: &UserId,
        key: &str,
        status: u16,
        body: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET state = 'done', status = ?, body = ?, completed_at = ?
             WHERE user_id = ? AND key = ? AND state = 'in_flight'",
        )
        .bind(i64::from(status))
        .bind(body)
        .bind(timestamp(Utc::now()))
        .bind(user.as_str())
        .bind(key)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Releases a claim whose request failed on the server's side, so the client may retry.
    pub async fn abandon_idempotent(&self, user: &UserId, key: &str) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE user_id = ? AND key = ? AND state = 'in_flight'",
        )
        .bind(user.as_str())
        .bind(key)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Claims left `in_flight` by a run that stopped, with the order each one created, if any.
    pub async fn interrupted_claims(&self) -> StoreResult<Vec<(String, String, Option<String>)>> {
        let rows = sqlx::query(
            "SELECT k.user_id, k.key, o.id FROM idempotency_keys k
             LEFT JOIN orders o ON o.user_id = k.user_id AND o.idempotency_key = k.key
             WHERE k.state = 'in_flight'",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Forgets keys older than the retention period.
    pub async fn purge_old_keys(&self) -> StoreResult<u64> {
        let cutoff = timestamp(Utc::now() - Duration::hours(KEY_RETENTION_HOURS));
        Ok(
            sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?")
                .bind(cutoff)
                .execute(self.pool())
                .await?
                .rows_affected(),
        )
    }
}
