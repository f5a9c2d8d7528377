//! API v2's users (bearer tokens, stored hashed) and Idempotency-Key records.

use async_trait::async_trait;
use chrono::{Duration, Utc};
use sha2::{Digest, Sha256};
use sqlx::Row;
use uuid::Uuid;

use super::{Accounts, IdempotencyRecords, Store, StoreResult};
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

#[async_trait]
impl Accounts for Store {
    async fn create_user(&self, name: &str) -> StoreResult<NewUser> {
        let id = format!("{}{}", crate::domain::V2_USER_PREFIX, Uuid::new_v4());
        let token =
            format!("tf_{}", Uuid::new_v4().simple()) + &Uuid::new_v4().simple().to_string();
        let created_at = timestamp(Utc::now());
        sqlx::query("INSERT INTO users (id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&id)
            .bind(name)
            .bind(sha256_hex(token.as_bytes()))
            .bind(&created_at)
            .execute(&self.pool)
            .await?;
        Ok(NewUser {
            id,
            name: name.to_owned(),
            token,
            created_at,
        })
    }

    async fn user_by_token(&self, token: &str) -> StoreResult<Option<UserId>> {
        let id: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE token_hash = $1")
            .bind(sha256_hex(token.as_bytes()))
            .fetch_optional(&self.pool)
            .await?;
        Ok(id.and_then(|id| UserId::parse(&id).ok()))
    }
}

#[async_trait]
impl IdempotencyRecords for Store {
    async fn begin_idempotent(
        &self,
        user: &UserId,
        key: &str,
        fingerprint: &str,
    ) -> StoreResult<KeyState> {
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (user_id, key, fingerprint, state, created_at)
             VALUES ($1, $2, $3, 'in_flight', $4) ON CONFLICT (user_id, key) DO NOTHING",
        )
        .bind(user.as_str())
        .bind(key)
        .bind(fingerprint)
        .bind(timestamp(Utc::now()))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(KeyState::Proceed);
        }
        let row = sqlx::query(
            "SELECT fingerprint, state, status, body FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        )
        .bind(user.as_str())
        .bind(key)
        .fetch_one(&self.pool)
        .await?;
        let stored: String = row.try_get(0)?;
        if stored != fingerprint {
            return Ok(KeyState::Mismatch);
        }
        let state: String = row.try_get(1)?;
        if state == "in_flight" {
            return Ok(KeyState::InFlight);
        }
        Ok(KeyState::Replay {
            status: row.try_get::<i64, _>(2)? as u16,
            body: row.try_get(3)?,
        })
    }

    async fn complete_idempotent(
        &self,
        user: &UserId,
        key: &str,
        status: u16,
        body: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET state = 'done', status = $1, body = $2, completed_at = $3
             WHERE user_id = $4 AND key = $5 AND state = 'in_flight'",
        )
        .bind(i64::from(status))
        .bind(body)
        .bind(timestamp(Utc::now()))
        .bind(user.as_str())
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn abandon_idempotent(&self, user: &UserId, key: &str) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND state = 'in_flight'",
        )
        .bind(user.as_str())
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn interrupted_claims(&self) -> StoreResult<Vec<(UserId, String)>> {
        let rows =
            sqlx::query("SELECT user_id, key FROM idempotency_keys WHERE state = 'in_flight'")
                .fetch_all(&self.pool)
                .await?;
        let mut claims = Vec::with_capacity(rows.len());
        for row in rows {
            let user: String = row.try_get(0)?;
            // Every key was claimed by a parsed user id; one that does not parse was not.
            if let Ok(user) = UserId::parse(&user) {
                claims.push((user, row.try_get(1)?));
            }
        }
        Ok(claims)
    }

    async fn purge_old_keys(&self) -> StoreResult<u64> {
        let cutoff = timestamp(Utc::now() - Duration::hours(KEY_RETENTION_HOURS));
        Ok(
            sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
                .bind(cutoff)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
