//! The payments node of stage `services` (`ticketflow node payments`): the one process that
//! runs the payment actor pool and writes its books, behind two internal routes (not in the
//! public OpenAPI document):
//!
//! - `POST /internal/v1/payments/charge` `{"key", "amountCents"}` → `200 {"outcome":
//!   "approved", "chargeId"}` or `{"outcome": "declined"}`; `503` when the books cannot be
//!   written (the outcome is unknown: the caller asks again under the same key);
//! - `POST /internal/v1/payments/refund` `{"key"}` → `200 {"outcome": "refunded" |
//!   "already-refunded" | "nothing-to-refund"}`.
//!
//! One node, because the books task plans ledger positions from its own memory: two writers
//! would collide on them. The node reports itself in `service_nodes` (role `payments`) at
//! start and every `--renew-every`, so the others find it and the topology shows it; a second
//! payments node on the same database refuses to start while the first is up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};

use crate::api::auth::require_admin;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{ChargeOutcome, RefundOutcome};
use crate::api::{AppState, Problem};
use crate::config::StageKind;
use crate::domain::{Event, EventId, Money, NewEvent, Ticket, UserId};
use crate::stages::{PurchaseError, Stage, StageParts};
use crate::store::{Records, Store, StoreError};

/// The role the payments node reports itself under in `service_nodes`.
pub const PAYMENTS: &str = "payments";
pub const CHARGE_PATH: &str = "/internal/v1/payments/charge";
pub const REFUND_PATH: &str = "/internal/v1/payments/refund";
/// Largest body the internal routes take (a key and an amount).
const MAX_BODY_BYTES: usize = 4 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChargeRequest {
    pub key: String,
    pub amount_cents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ChargeAnswer {
    Approved {
        #[serde(rename = "chargeId")]
        charge_id: Uuid,
    },
    Declined,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum RefundAnswer {
    Refunded,
    AlreadyRefunded,
    NothingToRefund,
}

impl From<ChargeOutcome> for ChargeAnswer {
    fn from(outcome: ChargeOutcome) -> Self {
        match outcome {
            ChargeOutcome::Approved { charge_id } => Self::Approved { charge_id },
            ChargeOutcome::Declined => Self::Declined,
        }
    }
}

impl From<ChargeAnswer> for ChargeOutcome {
    fn from(answer: ChargeAnswer) -> Self {
        match answer {
            ChargeAnswer::Approved { charge_id } => Self::Approved { charge_id },
            ChargeAnswer::Declined => Self::Declined,
        }
    }
}

impl From<RefundOutcome> for RefundAnswer {
    fn from(outcome: RefundOutcome) -> Self {
        match outcome {
            RefundOutcome::Refunded => Self::Refunded,
            RefundOutcome::AlreadyRefunded => Self::AlreadyRefunded,
            RefundOutcome::NothingToRefund => Self::NothingToRefund,
        }
    }
}

impl From<RefundAnswer> for RefundOutcome {
    fn from(answer: RefundAnswer) -> Self {
        match answer {
            RefundAnswer::Refunded => Self::Refunded,
            RefundAnswer::AlreadyRefunded => Self::AlreadyRefunded,
            RefundAnswer::NothingToRefund => Self::NothingToRefund,
        }
    }
}

/// The payments node's routes: the two internal ones and `GET /health`. Nothing else is
/// served (`404`): clients talk to the gateway and the inventory nodes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(MAX_BODY_BYTES)
            .error_handler(crate::api::problem::json_error),
    )
    .service(web::resource(CHARGE_PATH).route(web::post().to(charge)))
    .service(web::resource(REFUND_PATH).route(web::post().to(refund)))
    .service(web::resource("/health").route(web::get().to(crate::api::admin::health)))
    .default_service(web::to(|| async {
        Err::<HttpResponse, _>(Problem::not_found(
            "not-found",
            "a payments node serves only its internal routes and /health",
        ))
    }));
}

fn payment_key(key: &str) -> Result<&str, Problem> {
    let key = key.trim();
    if key.is_empty() || key.len() > 200 {
        return Err(Problem::bad_request(
            "invalid-body",
            "key must be 1 to 200 characters",
        ));
    }
    Ok(key)
}

async fn charge(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<ChargeRequest>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let key = payment_key(&body.key)?;
    let amount = Money::from_cents(body.amount_cents)
        .map_err(|e| Problem::bad_request("invalid-body", format!("amountCents: {e}")))?;
    let outcome = state.payments.charge(key, amount).await?;
    Ok(HttpResponse::Ok().json(ChargeAnswer::from(outcome)))
}

async fn refund(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<RefundRequest>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let key = payment_key(&body.key)?;
    let outcome = state.payments.refund(key).await?;
    Ok(HttpResponse::Ok().json(RefundAnswer::from(outcome)))
}

/// The payments node as a [`Stage`]: it holds no events and sells nothing; it keeps its row
/// in `service_nodes` fresh. The gateway it serves is the server's local one.
pub struct PaymentsNode {
    inner: Arc<Node>,
}

struct Node {
    store: Store,
    id: String,
    /// The bound address, once known (`bind` may name port 0). A std mutex: set once, read
    /// once a round, never held across an `.await`.
    addr: Mutex<String>,
    /// Wakes the reporter as soon as the address is bound, so the others need not wait a round.
    bound: Notify,
    stopping: AtomicBool,
}

impl PaymentsNode {
    /// Reports the node in `service_nodes` and keeps reporting it every `--renew-every`.
    /// Refuses to start while another payments node is up on the same database, after waiting
    /// once for its row to go stale (a node restarted after `kill -9` under a new id).
    pub async fn start(parts: StageParts) -> Result<Self, StoreError> {
        let services = parts.settings.services.clone();
        let store = parts.store.clone();
        let other =
            |found: Option<(String, String)>| found.filter(|(id, _)| *id != services.node_id);
        if let Some((id, addr)) = other(store.live_node(PAYMENTS, services.lease_ttl).await?) {
            tracing::warn!(other = %id, %addr, "another payments node reported itself lately; waiting for its report to go stale");
            tokio::time::sleep(services.lease_ttl + services.renew_every).await;
            if let Some((id, addr)) = other(store.live_node(PAYMENTS, services.lease_ttl).await?) {
                return Err(StoreError::Conflict(format!(
                    "payments node {id} is up at {addr} on this database: run one payments node \
                     per database (the books have one writer), or restart it under --node-id {id}"
                )));
            }
        }
        let node = Arc::new(Node {
            store,
            id: services.node_id.clone(),
            addr: Mutex::new(parts.settings.bind.to_string()),
            bound: Notify::new(),
            stopping: AtomicBool::new(false),
        });
        node.report().await?;
        let reporter = Arc::clone(&node);
        let every = services.renew_every;
        actix_rt::spawn(async move { reporter.keep_reporting(every).await });
        Ok(Self { inner: node })
    }
}

impl Node {
    async fn report(&self) -> Result<(), StoreError> {
        let addr = self.addr.lock().expect("node address poisoned").clone();
        self.store
            .node_seen(&self.id, PAYMENTS, &addr, std::process::id())
            .await
    }

    async fn keep_reporting(&self, every: Duration) {
        while !self.stopping.load(Ordering::Acquire) {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.bound.notified() => {}
            }
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            if let Err(error) = self.report().await {
                // The others stop counting this node as up; the next round tries again.
                tracing::warn!(%error, "could not report the payments node in service_nodes");
            }
        }
    }
}

#[async_trait]
impl Stage for PaymentsNode {
    fn kind(&self) -> StageKind {
        StageKind::Services
    }

    fn records(&self) -> &dyn Records {
        &self.inner.store
    }

    async fn create_event(&self, _: NewEvent) -> Result<Event, StoreError> {
        Err(StoreError::Conflict(
            "the payments node keeps no events; create them through an inventory node".into(),
        ))
    }

    async fn purchase(&self, _: EventId, _: UserId) -> Result<Ticket, PurchaseError> {
        Err(PurchaseError::NotServed)
    }

    async fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "stage": StageKind::Services,
            "node": { "id": self.inner.id, "role": PAYMENTS },
        })
    }

    fn bound(&self, addr: std::net::SocketAddr) {
        *self.inner.addr.lock().expect("node address poisoned") = addr.to_string();
        self.inner.bound.notify_one();
    }

    async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.bound.notify_one();
    }
}
