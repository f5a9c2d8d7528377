//! Assembles a running server from [`Settings`]: storage, payment gateway, stage, HTTP front.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::{dev::ServerHandle, dev::Service, web, App, HttpServer};
use anyhow::Context;

use crate::api::{self, AppState};
use crate::config::{cores, NodeRole, Settings, StageKind};
use crate::demo;
use crate::limits::{self, ConnectionGate};
use crate::payments::PaymentGateway;
use crate::stages::{self, Stage, StageParts};
use crate::store::{backend, DatabaseUrl, Store};

/// Connections of the payment gateway's own pool: its books task writes on one, and the admin
/// routes read the ledger on the other.
const BOOKS_CONNECTIONS: u32 = 2;
/// Connections of a `services` node's pool (its writer has one more of its own).
const NODE_CONNECTIONS: u32 = 4;

/// A bound server, not yet running. Must be built and run inside an actix `System`.
pub struct Server {
    addr: SocketAddr,
    http: actix_web::dev::Server,
    stage: Arc<dyn Stage>,
    store: Store,
}

impl Server {
    /// Opens the database (migrating it), recovers interrupted purchases, binds the address.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let url = DatabaseUrl::parse(&settings.database, settings.durability)
            .map_err(|e| anyhow::anyhow!(backend::open_failure(&settings.database, &e)))?;
        if !settings.stage.runs_on(url.backend) {
            match settings.stage {
                StageKind::Services => anyhow::bail!(
                    "stage services runs on PostgreSQL only (its shard leases live there): give \
                     --db postgres://USER@HOST:PORT/DATABASE"
                ),
                StageKind::Saga => anyhow::bail!(
                    "stage saga runs on PostgreSQL only (its event log, outbox and inboxes live \
                     there): give --db postgres://USER@HOST:PORT/DATABASE"
                ),
                _ => anyhow::bail!(
                    "--stage {} runs on SQLite only, like the seed's step 1: give --db a file \
                     path, or run --stage actor or locked on {}",
                    settings.stage,
                    url.backend
                ),
            }
        }
        let store = Store::open(&settings.database, settings.durability)
            .await
            .map_err(|e| anyhow::anyhow!(backend::open_failure(&settings.database, &e)))?;
        // Stage services: five or more processes share one PostgreSQL, whose connections
        // (`max_connections`, 100 by default) count for every database on it; each node
        // reads little, so each gets a small pool.
        let store = if settings.stage == StageKind::Services {
            let small = store
                .with_own_pool(NODE_CONNECTIONS)
                .await
                .map_err(|e| anyhow::anyhow!(backend::open_failure(&settings.database, &e)))?;
            store.close().await;
            small
        } else {
            store
        };
        // Stage services: the payments node runs the gateway, the other nodes call it. Stage
        // saga calls it too (its payments participant is that node). Every other process runs
        // its own. The books are a table of their own in the same database.
        let payments_node =
            settings.stage == StageKind::Services && settings.services.role == NodeRole::Payments;
        let payments =
            if (settings.stage == StageKind::Services && !payments_node)
                || settings.stage == StageKind::Saga
            {
                PaymentGateway::remote(
                    &settings.services,
                    store.clone(),
                    settings.admin_token.clone(),
                )?
            } else {
                PaymentGateway::start(
                    &settings.payments,
                    settings.seed,
                    Arc::new(store.with_own_pool(BOOKS_CONNECTIONS).await.map_err(|e| {
                        anyhow::anyhow!(backend::open_failure(&settings.database, &e))
                    })?),
                    &[],
                )
                .await
                .map_err(|e| anyhow::anyhow!(backend::open_failure(&settings.database, &e)))?
            };
        let parts = StageParts {
            store: store.clone(),
            payments: payments.clone(),
            settings: settings.clone(),
        };
        let stage = stages::build(parts)
            .await
            .context("starting the stage failed")?;
        // Stage services: only the gateway takes Idempotency-Key claims; another node settling
        // them would take the claims of a gateway still running.
        let claims_here =
            settings.stage != StageKind::Services || settings.services.role == NodeRole::Gateway;
        if claims_here {
            crate::idempotency::recover_claims(stage.as_ref(), api::v2::accepted_answer)
                .await
                .context("settling Idempotency-Key claims left by the previous run failed")?;
        }
        let admin_token = match &settings.admin_token {
            Some(token) => token.clone(),
            None => {
                let token = format!("tfa_{}", uuid::Uuid::new_v4().simple());
                tracing::warn!(
                    admin_token = %token,
                    "no --admin-token given; made one for this run (API v2 admin routes need it)"
                );
                token
            }
        };
        if settings.demo_data {
            demo::load(stage.as_ref())
                .await
                .context("--demo-data: loading the demo events failed")?;
        }
        let listener = TcpListener::bind(settings.bind).with_context(|| {
            format!(
                "--bind {}: cannot listen there (is another server using the port? pick another with --bind)",
                settings.bind
            )
        })?;
        let addr = listener.local_addr()?;
        stage.bound(addr);
        crate::meter::install(settings.stage.as_str());
        crate::meter::spawn_upkeep(std::time::Duration::from_secs(5));
        let limiters = api::rate::Limiters::new(&settings.rate_limits);
        let state = web::Data::new(AppState {
            stage: Arc::clone(&stage),
            payments,
            settings: settings.clone(),
            admin_token,
            limiters: limiters.clone(),
            streams: api::streams::StreamSlots::new(
                settings.max_streams,
                settings.max_streams_per_client,
            ),
            changes: store.changes().clone(),
        });
        // Buckets full again are forgotten now and then, so memory follows active clients.
        actix_rt::spawn(async move {
            loop {
                actix_rt::time::sleep(api::rate::FORGET_EVERY).await;
                limiters.forget_idle();
            }
        });
        let serve_v2 = settings.stage != StageKind::Monolith;
        let internal = settings.stage == StageKind::Services;
        let serve_v1 = settings.v1_access() == crate::config::V1Access::Open;
        let max_body = settings.max_body_bytes;
        let workers = match settings.http_workers {
            0 => cores(),
            n => n,
        };
        let gate = ConnectionGate::new(settings.max_connections);
        let body_timeout = settings.body_timeout;
        let http = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .configure(|cfg| match payments_node {
                    true => crate::payments::service::configure(cfg),
                    false => {
                        if internal {
                            api::internal::configure(cfg);
                        }
                        api::configure(cfg, max_body, serve_v2, serve_v1)
                    }
                })
                .wrap_fn(move |mut req, srv| {
                    limits::body_deadline(&mut req, body_timeout);
                    srv.call(req)
                })
                .wrap(actix_web::middleware::from_fn(crate::meter::observe))
        })
        .on_connect(move |io, ext| gate.on_connect(io, ext))
        .client_request_timeout(settings.header_timeout)
        // actix's own per-worker cap stays above ours, which counts all workers together.
        .max_connections(settings.max_connections + 1)
        .workers(workers)
        .backlog(4096)
        .max_connection_rate(4096)
        .shutdown_timeout(30)
        .listen(listener)
        .with_context(|| format!("--bind {}: cannot serve HTTP there", settings.bind))?
        .run();
        Ok(Self {
            addr,
            http,
            stage,
            store,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server; `graceful` lets in-flight requests finish first.
    pub fn handle(&self) -> ServerHandle {
        self.http.handle()
    }

    /// Serves until stopped (SIGINT/SIGTERM or the handle), drains in-flight purchases, then
    /// flushes the stage's pending writes and closes the database.
    pub async fn run(self) -> std::io::Result<()> {
        let result = self.http.await;
        self.stage.shutdown().await;
        self.store.close().await;
        result
    }
}
