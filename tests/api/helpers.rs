//! Starting a server for a test and talking to it.

use actix_web::dev::ServerHandle;
use serde_json::{json, Value};
use ticketflow::config::{LatencyModel, Settings, StageKind};
use ticketflow::server::Server;

use crate::backends::{Backend, TestDb};

/// A running server on its own fresh database.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    /// The server's database, to read behind its back.
    pub db: TestDb,
    handle: ServerHandle,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    settings: Settings,
    /// Stage saga: the payments node its payments participant calls, in this process.
    payments: Option<Running>,
    /// Stage saga: the inventory node holding every shard, its inventory participant, in
    /// this process.
    inventory: Option<Running>,
}

/// A server started in this process, to stop after the one that calls it.
struct Running {
    handle: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.handle.stop(true).await;
        self.task.await.unwrap().unwrap();
    }
}

/// A payments node (stage `services`, role payments) in this process, with `settings`'
/// payments, database and admin token: what stage saga's payments participant calls.
async fn payments_node_for(settings: &Settings) -> (String, Running) {
    let mut node = settings.clone();
    node.stage = StageKind::Services;
    node.services.role = ticketflow::config::NodeRole::Payments;
    node.services.node_id = "payments-test".into();
    node.bind = "127.0.0.1:0".parse().unwrap();
    let server = Server::build(node).await.expect("payments node starts");
    let url = format!("http://{}", server.addr());
    let handle = server.handle();
    let task = actix_rt::spawn(server.run());
    (url, Running { handle, task })
}

/// An inventory node (stage `services`, role inventory) in this process on `settings`'
/// database: stage saga's inventory participant. Alone, it takes every shard before it serves.
async fn inventory_node_for(settings: &Settings) -> Running {
    let mut node = settings.clone();
    node.stage = StageKind::Services;
    node.services.role = ticketflow::config::NodeRole::Inventory;
    node.services.node_id = "inventory-test".into();
    node.bind = "127.0.0.1:0".parse().unwrap();
    let server = Server::build(node).await.expect("inventory node starts");
    let handle = server.handle();
    let task = actix_rt::spawn(server.run());
    Running { handle, task }
}

/// Settings for tests: port 0, instant and always-successful payments, two HTTP workers.
pub fn test_settings(stage: StageKind, db: &TestDb) -> Settings {
    let mut settings = Settings::new(db.url());
    settings.stage = stage;
    settings.bind = "127.0.0.1:0".parse().unwrap();
    settings.payments.latency = LatencyModel::Zero;
    settings.payments.failure_rate = 0.0;
    settings.http_workers = 2;
    settings.arbiters = 2;
    settings.admin_token = Some(ADMIN_TOKEN.into());
    // Stampedes come from one address: the rate-limit tests switch the limits back on.
    settings.rate_limits = ticketflow::config::RateLimits::off();
    // A stampede's thousands of buyers share the test's one thread with its client: starved of
    // CPU, a connection's request head can take seconds to leave. At the 5 s default the server
    // then answers `408` on a connection the client is about to use (or has just written to),
    // which the client reports as an incomplete or unexpected message. The header timeout is
    // not what these tests are about; `limits.rs` tests its neighbour, the body timeout.
    settings.header_timeout = std::time::Duration::from_secs(120);
    settings
}

/// A buyer who keeps trying (pausing `backoff` after a decline, seats held by others or load
/// shed) until they hold a ticket or the event is sold out for good. Returns their ticket id.
pub async fn determined_buyer(
    app: std::sync::Arc<TestApp>,
    event: i64,
    user: String,
    backoff: std::time::Duration,
) -> Option<String> {
    for _ in 0..2_000 {
        let (status, body) = app.purchase(event, &user).await;
        match (status, body["code"].as_str()) {
            (201, _) => {
                assert_eq!(body["status"], "confirmed", "{body}");
                return Some(body["id"].as_str().unwrap().to_owned());
            }
            (400, Some("sold-out")) => return None,
            // 408: the server gave up waiting for this request's head (a client starved of
            // CPU by its own thousand buyers); nothing was read, so sending again is safe.
            (402, _) | (400, Some("tickets-held")) | (408, _) | (503, _) => {
                tokio::time::sleep(backoff).await
            }
            other => panic!("unexpected answer {other:?}: {body}"),
        }
    }
    panic!("buyer {user} gave up");
}

/// How long the test client keeps an idle connection; under actix-web's keep-alive of 5 s.
const CLIENT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The admin token every test server is started with.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Starts a server on `stage` on SQLite; `tweak` adjusts the test settings first.
pub async fn spawn_app(stage: StageKind, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(Backend::Sqlite, stage, tweak).await
}

/// Starts a server on `stage` on a fresh database of `backend`.
pub async fn spawn_app_on(
    backend: Backend,
    stage: StageKind,
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    let db = TestDb::new(backend);
    let mut settings = test_settings(stage, &db);
    tweak(&mut settings);
    start_on(db, settings).await
}

async fn start_on(db: TestDb, mut settings: Settings) -> TestApp {
    let settings_copy = settings.clone();
    let payments = if settings.stage == StageKind::Saga && settings.services.payments_url.is_none()
    {
        let (url, node) = payments_node_for(&settings).await;
        settings.services.payments_url = Some(url);
        Some(node)
    } else {
        None
    };
    let inventory = if settings.stage == StageKind::Saga {
        Some(inventory_node_for(&settings).await)
    } else {
        None
    };
    let server = Server::build(settings).await.expect("server starts");
    let base = format!("http://{}", server.addr());
    let handle = server.handle();
    let task = actix_rt::spawn(server.run());
    TestApp {
        base,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            // Forget idle connections well before the server's 5 s keep-alive closes them, so
            // a request is never sent on a connection the server is closing at that moment
            // (an `IncompleteMessage` error that says nothing about the server).
            .pool_idle_timeout(CLIENT_IDLE_TIMEOUT)
            .build()
            .unwrap(),
        db,
        handle,
        task: Some(task),
        settings: settings_copy,
        payments,
        inventory,
    }
}

impl TestApp {
    /// Stops gracefully and starts again on the same database (a new port).
    pub async fn restart(mut self) -> TestApp {
        self.handle.stop(true).await;
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        if let Some(payments) = self.payments.take() {
            payments.stop().await;
        }
        if let Some(inventory) = self.inventory.take() {
            inventory.stop().await;
        }
        let TestApp { db, settings, .. } = self;
        start_on(db, settings).await
    }

    /// Any request: optional bearer token, Idempotency-Key and JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Reply::read(request.send().await.unwrap()).await
    }

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

    /// A GET with the admin token: the status and the body.
    pub async fn admin_json(&self, path: &str) -> (u16, Value) {
        let reply = self
            .send(reqwest::Method::GET, path, Some(ADMIN_TOKEN), None, None)
            .await;
        (reply.status, reply.body)
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts `body` as JSON and reads the whole answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        Reply::read(response).await
    }

    /// A GET, read whole.
    pub async fn get(&self, path: &str) -> Reply {
        Reply::read(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    /// Sends raw bytes with the given content type (none if `None`): the whole answer.
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut request = self.client.request(method, self.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        Reply::read(request.send().await.unwrap()).await
    }

    /// Rows in `events`, `tickets` and `payments`, read from the database.
    pub async fn row_counts(&self) -> [i64; 3] {
        [
            self.count("SELECT COUNT(*) FROM events").await,
            self.count("SELECT COUNT(*) FROM tickets").await,
            self.count("SELECT COUNT(*) FROM payments").await,
        ]
    }

    pub async fn audit(&self) -> Value {
        let (status, audit) = self.admin_json("/api/v1/admin/audit").await;
        assert_eq!(status, 200, "{audit}");
        audit
    }

    /// A number read straight from the database, bypassing the server.
    pub async fn count(&self, sql: &str) -> i64 {
        self.db.count(sql).await
    }

    /// Stops gracefully and waits until the database is flushed and closed.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        if let Some(payments) = self.payments.take() {
            payments.stop().await;
        }
        if let Some(inventory) = self.inventory.take() {
            inventory.stop().await;
        }
    }
}

/// An answer read whole: status, content type and body (`Null` if the body is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    /// The body exactly as sent.
    pub text: String,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            content_type,
            headers,
            body,
            text,
        }
    }
}
