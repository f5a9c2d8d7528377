//! Which database a URL names, and how to connect to it: SQLite (a path or `sqlite:` URL, the
//! embedded default) or PostgreSQL (`postgres://`). Everything that differs between the two
//! outside the SQL text lives here: connection settings, the migrations, creating a database.

use std::fmt;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::{Any, AnyConnection, AnyPool, ConnectOptions, Executor};

use super::{StoreError, StoreResult};
use crate::config::Durability;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections in the read pool. PostgreSQL counts connections against `max_connections`
/// (100 by default) for every database on the server, so it gets fewer.
const SQLITE_POOL: u32 = 16;
const POSTGRES_POOL: u32 = 10;
/// How long a request waits for a pooled connection before the database counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SQLite waits on a locked database before giving up (`busy_timeout`), unless
/// [`set_sqlite_busy_timeout`] chose another.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 30_000;

/// The `busy_timeout` connections opened from now on get, in milliseconds.
pub fn sqlite_busy_timeout_ms() -> u64 {
    BUSY_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed)
}

static BUSY_TIMEOUT_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(SQLITE_BUSY_TIMEOUT_MS);

/// The process's SQLite `busy_timeout` for connections opened from now on (`serve
/// --sqlite-busy-timeout`).
pub fn set_sqlite_busy_timeout(timeout: Duration) {
    BUSY_TIMEOUT_MS.store(
        timeout.as_millis().min(u128::from(u32::MAX)) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The two storage engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A database location, parsed once: which backend and the URL sqlx connects to.
#[derive(Debug, Clone)]
pub struct DatabaseUrl {
    pub backend: Backend,
    url: String,
    durability: Durability,
}

impl DatabaseUrl {
    /// `postgres://` or `postgresql://` is PostgreSQL; `sqlite:` or anything else is a SQLite
    /// file (created if missing).
    pub fn parse(raw: &str, durability: Durability) -> StoreResult<Self> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(StoreError::Unavailable(
                "no database given; pass a file path, sqlite://PATH or postgres://USER@HOST:PORT/DB"
                    .into(),
            ));
        }
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            return Ok(Self {
                backend: Backend::Postgres,
                url: raw.to_owned(),
                durability,
            });
        }
        if raw.contains("://") && !raw.starts_with("sqlite://") {
            return Err(StoreError::Unavailable(format!(
                "`{raw}` is neither a SQLite path nor a postgres:// URL"
            )));
        }
        let path = raw
            .strip_prefix("sqlite://")
            .or_else(|| raw.strip_prefix("sqlite:"))
            .unwrap_or(raw);
        let url = if path.contains('?') {
            format!("sqlite://{path}")
        } else {
            format!("sqlite://{path}?mode=rwc")
        };
        Ok(Self {
            backend: Backend::Sqlite,
            url,
            durability,
        })
    }

    /// The SQLite file this URL names, as sqlx resolves it (`None` for PostgreSQL).
    pub fn sqlite_path(&self) -> StoreResult<Option<std::path::PathBuf>> {
        if self.backend != Backend::Sqlite {
            return Ok(None);
        }
        let options: sqlx::sqlite::SqliteConnectOptions = self
            .url
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Unavailable(format!("not a SQLite URL: {e}")))?;
        Ok(Some(options.get_filename().to_path_buf()))
    }

    /// How hard commits are kept.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    fn options(&self) -> StoreResult<AnyConnectOptions> {
        install_drivers();
        let options: AnyConnectOptions = self.url.parse().map_err(|e: sqlx::Error| {
            StoreError::Unavailable(format!("not a database URL: {e}"))
        })?;
        Ok(options)
    }

    /// Settings each new connection runs first.
    fn session_sql(&self) -> String {
        match self.backend {
            Backend::Sqlite => format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; PRAGMA busy_timeout = {}; PRAGMA foreign_keys = ON;",
                match self.durability {
                    Durability::Normal => "NORMAL",
                    Durability::Full => "FULL",
                },
                BUSY_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed)
            ),
            Backend::Postgres => format!(
                "SET synchronous_commit = {}",
                match self.durability {
                    // Each commit waits for its WAL flush (PostgreSQL's default); `normal`
                    // lets PostgreSQL acknowledge before the flush, as SQLite's NORMAL does.
                    Durability::Normal => "off",
                    Durability::Full => "on",
                }
            ),
        }
    }

    /// Creates the database if it does not exist (a PostgreSQL database on a reachable server,
    /// a SQLite file), then opens the pool and applies the migrations.
    pub async fn open_pool(&self) -> StoreResult<AnyPool> {
        install_drivers();
        if self.backend == Backend::Postgres
            && !Any::database_exists(&self.url).await.map_err(unavailable)?
        {
            Any::create_database(&self.url).await.map_err(unavailable)?;
        }
        let pool = self
            .pool_of(match self.backend {
                Backend::Sqlite => SQLITE_POOL,
                Backend::Postgres => POSTGRES_POOL,
            })
            .await?;
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(pool)
    }

    /// Whether the database exists already (a PostgreSQL database on a reachable server, a
    /// SQLite file), without creating it.
    pub async fn exists(&self) -> StoreResult<bool> {
        install_drivers();
        Any::database_exists(&self.url).await.map_err(unavailable)
    }

    /// A pool of at most `connections` on the (existing, migrated) database.
    pub async fn pool_of(&self, connections: u32) -> StoreResult<AnyPool> {
        let session = self.session_sql();
        AnyPoolOptions::new()
            .max_connections(connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _| {
                let session = session.clone();
                Box::pin(async move {
                    conn.execute(session.as_str()).await?;
                    Ok(())
                })
            })
            .connect_with(self.options()?)
            .await
            .map_err(unavailable)
    }

    /// One connection of its own, set up like the pool's (for the group-commit writer).
    pub async fn connect(&self) -> StoreResult<AnyConnection> {
        let mut conn = self.options()?.connect().await.map_err(unavailable)?;
        conn.execute(self.session_sql().as_str()).await?;
        Ok(conn)
    }

    /// Drops a PostgreSQL database, closing whatever is still connected to it (tests and the
    /// load generator make one per run). Does nothing for SQLite.
    pub async fn drop_database(&self) -> StoreResult<()> {
        if self.backend == Backend::Postgres {
            install_drivers();
            Any::force_drop_database(&self.url)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

/// `raw` with any password in it replaced by `***`, for logs and error messages.
pub fn redacted(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return raw.to_owned();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return raw.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => raw.to_owned(),
    }
}

/// The one line a user sees when `--db` cannot be opened: the setting, what happened, the fix.
pub fn open_failure(raw: &str, error: &StoreError) -> String {
    let shown = redacted(raw);
    let postgres = DatabaseUrl::parse(raw, Durability::Normal)
        .map(|u| u.backend == Backend::Postgres)
        .unwrap_or(false);
    match error {
        StoreError::Unavailable(cause) if postgres => format!(
            "--db {shown}: cannot reach PostgreSQL or it refused the login ({cause}); start \
             PostgreSQL, or point --db (DATABASE_URL) at a running server as \
             postgres://USER[:PASSWORD]@HOST:PORT/DATABASE"
        ),
        StoreError::Unavailable(cause) => format!(
            "--db {shown}: cannot open the SQLite database ({cause}); check that its directory \
             exists and is writable, or pass another path with --db"
        ),
        other => format!("--db {shown}: cannot open and migrate the database: {other}"),
    }
}

fn install_drivers() {
    static DRIVERS: Once = Once::new();
    DRIVERS.call_once(sqlx::any::install_default_drivers);
}

/// The database could not be reached or opened: down, refused the credentials, no such file.
fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(super::describe(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_chooses_the_backend() {
        let parse = |raw| DatabaseUrl::parse(raw, Durability::Normal).unwrap();
        assert_eq!(parse("ticketflow.db").backend, Backend::Sqlite);
        assert_eq!(parse("sqlite://x.db").url, "sqlite://x.db?mode=rwc");
        assert_eq!(parse("sqlite:x.db").url, "sqlite://x.db?mode=rwc");
        assert_eq!(parse("/tmp/a b.db").backend, Backend::Sqlite);
        assert_eq!(
            parse("postgres://postgres@127.0.0.1:5432/test").backend,
            Backend::Postgres
        );
        assert_eq!(parse("postgresql://u@h/db").backend, Backend::Postgres);
        assert!(DatabaseUrl::parse("mysql://u@h/db", Durability::Normal).is_err());
        assert!(DatabaseUrl::parse(" ", Durability::Normal).is_err());
    }

    #[test]
    fn passwords_never_reach_a_message() {
        assert_eq!(
            redacted("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redacted("ticketflow.db"), "ticketflow.db");
        let line = open_failure(
            "postgres://u:secret@h/db",
            &StoreError::Unavailable("refused".into()),
        );
        assert!(line.starts_with("--db postgres://u:***@h/db: cannot reach PostgreSQL"));
        assert!(!line.contains("secret"));
    }
}
