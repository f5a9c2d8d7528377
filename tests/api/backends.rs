//! A fresh database per test on either backend, and a macro that runs one test body on both.
//!
//! SQLite gets a file in a temporary directory. PostgreSQL gets a database of its own,
//! `tf_test_<random>`, on the server named by `TICKETFLOW_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped when the test ends, pass or fail.
//! A PostgreSQL that does not answer fails the test: it is never skipped.

use sqlx::AnyPool;
use ticketflow::config::Durability;
pub use ticketflow::store::Backend;
use ticketflow::store::DatabaseUrl;

/// The PostgreSQL server tests make their databases on.
fn postgres_server() -> String {
    std::env::var("TICKETFLOW_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database that exists for one test.
pub struct TestDb {
    pub backend: Backend,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("ticketflow.db");
                Self {
                    backend,
                    url: path.to_string_lossy().into_owned(),
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let server = postgres_server();
                let (base, _) = server.rsplit_once('/').expect("a postgres://…/DB URL");
                let name = format!("tf_test_{}", uuid::Uuid::new_v4().simple());
                Self {
                    backend,
                    url: format!("{base}/{name}"),
                    _dir: None,
                }
            }
        }
    }

    /// What `--db` takes: a file path or a `postgres://` URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn pool(&self) -> AnyPool {
        sqlx::any::install_default_drivers();
        let url = match self.backend {
            Backend::Sqlite => format!("sqlite://{}", self.url),
            Backend::Postgres => self.url.clone(),
        };
        AnyPool::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot open the test database {url}: {e}"))
    }

    /// One number read straight from the database, bypassing the server.
    pub async fn count(&self, sql: &str) -> i64 {
        let pool = self.pool().await;
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
        n
    }

    /// A column of text read straight from the database, bypassing the server.
    pub async fn texts(&self, sql: &str) -> Vec<String> {
        let pool = self.pool().await;
        let rows: Vec<String> = sqlx::query_scalar(sql)
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
        rows
    }

    /// Whether the database exists yet (PostgreSQL: in `pg_database`; SQLite: the file).
    pub async fn exists(&self) -> bool {
        match self.backend {
            Backend::Sqlite => std::path::Path::new(&self.url).exists(),
            Backend::Postgres => {
                sqlx::any::install_default_drivers();
                let pool = AnyPool::connect(&postgres_server())
                    .await
                    .expect("the PostgreSQL test server answers");
                let name = self.url.rsplit('/').next().unwrap_or_default();
                let n: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
                        .bind(name)
                        .fetch_one(&pool)
                        .await
                        .expect("pg_database answers");
                pool.close().await;
                n == 1
            }
        }
    }

    /// Runs statements straight on the database (to stage a crash's leftovers).
    pub async fn execute(&self, statements: &[&str]) {
        let pool = self.pool().await;
        for sql in statements {
            sqlx::query(sql)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        pool.close().await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.backend != Backend::Postgres {
            return;
        }
        // Drop runs inside the test's runtime, which cannot block on itself: a thread of its
        // own with a runtime of its own drops the database.
        let url = self.url.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let db = DatabaseUrl::parse(&url, Durability::Normal)?;
                db.drop_database().await
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("could not drop the test database {}: {error}", self.url);
        }
    }
}

/// Runs the async test body `$body(backend)` once on SQLite and once on PostgreSQL, as two
/// tests named `$name::sqlite` and `$name::postgres`.
macro_rules! on_both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[actix_web::test]
            async fn sqlite() {
                super::$body(crate::backends::Backend::Sqlite).await
            }

            #[actix_web::test]
            async fn postgres() {
                super::$body(crate::backends::Backend::Postgres).await
            }
        }
    };
}
pub(crate) use on_both_backends;
