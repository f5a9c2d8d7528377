//! Starting a server for a test and talking to it.

use std::path::PathBuf;

use actix_web::dev::ServerHandle;
use serde_json::{json, Value};
use ticketflow::config::{LatencyModel, Settings, StageKind};
use ticketflow::server::Server;

/// A running server on its own temporary database.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub db_path: PathBuf,
    handle: ServerHandle,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// Settings for tests: port 0, instant and always-successful payments, two HTTP workers.
pub fn test_settings(stage: StageKind, db: &std::path::Path) -> Settings {
    let mut settings = Settings::new(db.to_string_lossy().into_owned());
    settings.stage = stage;
    settings.bind = "127.0.0.1:0".parse().unwrap();
    settings.payments.latency = LatencyModel::Zero;
    settings.payments.failure_rate = 0.0;
    settings.http_workers = 2;
    settings.arbiters = 2;
    settings
}

/// Starts a server on `stage`; `tweak` adjusts the test settings first.
pub async fn spawn_app(stage: StageKind, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("ticketflow.db");
    let mut settings = test_settings(stage, &db_path);
    tweak(&mut settings);
    let server = Server::build(settings).await.expect("server starts");
    let base = format!("http://{}", server.addr());
    let handle = server.handle();
    let task = actix_rt::spawn(server.run());
    TestApp {
        base,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap(),
        db_path,
        handle,
        task: Some(task),
        _dir: dir,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Creates an event and returns its id.
    pub async fn create_event(&self, total: u32) -> i64 {
        let response = self
            .client
            .post(self.url("/api/v1/events"))
            .json(&json!({
                "name": "Comedy Night",
                "venue": "The Laugh Factory",
                "date": "2026-12-31T20:00:00Z",
                "totalTickets": total,
                "price": 25.5,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"]
            .as_i64()
            .unwrap()
    }

    /// One v1 purchase: the status and the body.
    pub async fn purchase(&self, event: i64, user: &str) -> (u16, Value) {
        let response = self
            .client
            .post(self.url("/api/v1/tickets/purchase"))
            .json(&json!({ "eventId": event, "userId": user }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn audit(&self) -> Value {
        let (status, audit) = self.get_json("/api/v1/admin/audit").await;
        assert_eq!(status, 200, "{audit}");
        audit
    }

    /// Rows counted straight from the database file, bypassing the server.
    pub async fn count(&self, sql: &str) -> i64 {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", self.db_path.display()))
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
        pool.close().await;
        n
    }

    /// Stops gracefully and waits until the database is flushed and closed.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}
