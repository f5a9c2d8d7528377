//! Stage `services`: the gateway node. It serves API v1 and v2 to clients and holds no
//! inventory: each purchase goes to the inventory node that owns the event's shard, each event
//! read to the catalog node, and orders, tickets, accounts and Idempotency-Keys are read from
//! PostgreSQL, where the nodes wrote them.
//!
//! The gateway chooses every order's id itself, so a retry names the same order (and so the
//! same payment key): it can never make a second order or a second charge. It retries only
//! where nothing happened: a node answered "not owner", or the connection was refused. When a
//! call was sent and no answer came (the node died or paused mid-call), the outcome is read
//! from PostgreSQL instead of guessed: a settled order is the answer; an absent one is sent
//! again, with the same id, once the shard's epoch shows another owner (the old one can no
//! longer write it); otherwise the client gets `503` with the order id to look up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{OrderRequest, PurchaseError, Stage, StageParts};
use crate::api::internal::{
    EventPage, NewEventCall, OrderCall, PurchaseCall, Reply, WireError, PREFIX,
};
use crate::audit::Activity;
use crate::config::{NodeRole, ServicesSettings, StageKind};
use crate::domain::{
    Event, EventId, Money, NewEvent, Order, OrderId, OrderStatus, Ticket, TicketStatus, UserId,
};
use crate::store::shards::{shard_of, SHARDS};
use crate::store::{EventQuery, OrderBook, Records, Store, StoreError, StoreResult};

/// How long the gateway waits to connect to a node: they are on the same network.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Idle connections kept per node.
const POOL_PER_NODE: usize = 64;
/// How often the outcome of an unanswered call is looked up in the database.
const RESOLVE_EVERY: Duration = Duration::from_millis(100);
/// How many times one purchase is sent (the same order each time) across failovers.
const MAX_ATTEMPTS: usize = 3;
/// The shard map is read again at most this often on demand (many buyers meeting the same
/// "not owner" share one read).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(50);

/// An inventory node owning a shard, as the gateway last read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    node: String,
    addr: String,
    epoch: i64,
}

#[derive(Debug, Default)]
struct ShardMap {
    owners: Vec<Option<Owner>>,
    catalogs: Vec<String>,
    inventory: Vec<String>,
}

/// Why a call to a node brought no answer.
#[derive(Debug)]
enum CallError {
    /// Nothing reached the node (the connection was refused or could not be made): safe to
    /// send again.
    NotSent(String),
    /// The request may have reached the node; what it did is unknown.
    Unknown(String),
}

pub struct GatewayNode {
    inner: Arc<Gateway>,
}

struct Gateway {
    store: Store,
    settings: crate::config::Settings,
    services: ServicesSettings,
    http: reqwest::Client,
    token: String,
    map: RwLock<ShardMap>,
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    /// The bound address, reported only once known: a report before the bind could make the
    /// supervisor take a gateway that failed to bind for one that is up.
    addr: Mutex<Option<String>>,
    stopping: AtomicBool,
    figures: Figures,
}

/// What the gateway counts, for its stats.
#[derive(Default)]
struct Figures {
    /// Calls sent again after "not owner" or a refused connection.
    rerouted: AtomicU64,
    /// Calls whose answer never came, settled from the database.
    resolved: AtomicU64,
    /// Calls whose outcome was still unknown when the gateway gave up (`503` + order id).
    unresolved: AtomicU64,
}

impl GatewayNode {
    pub async fn start(parts: StageParts) -> Result<Self, StoreError> {
        let settings = parts.settings.clone();
        let services = settings.services.clone();
        let token = settings.admin_token.clone().ok_or_else(|| {
            StoreError::Internal(
                "the gateway needs --admin-token, the same on every node of the deployment".into(),
            )
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(POOL_PER_NODE)
            .build()
            .map_err(|e| StoreError::Internal(format!("the gateway's HTTP client: {e}")))?;
        let gateway = Arc::new(Gateway {
            store: parts.store.clone(),
            settings: settings.clone(),
            services: services.clone(),
            http,
            token,
            map: RwLock::new(ShardMap::default()),
            refreshed: tokio::sync::Mutex::new(None),
            addr: Mutex::new(None),
            stopping: AtomicBool::new(false),
            figures: Figures::default(),
        });
        gateway.refresh(true).await?;
        let keeper = Arc::clone(&gateway);
        actix_rt::spawn(async move {
            while !keeper.stopping.load(Ordering::Acquire) {
                let addr = keeper
                    .addr
                    .lock()
                    .expect("gateway address poisoned")
                    .clone();
                if let Some(addr) = addr {
                    keeper.report(&addr).await;
                }
                if let Err(error) = keeper.refresh(true).await {
                    tracing::warn!(%error, "could not read the shard map");
                }
                tokio::time::sleep(keeper.services.renew_every).await;
            }
        });
        Ok(Self { inner: gateway })
    }
}

impl Gateway {
    async fn report(&self, addr: &str) {
        if let Err(error) = self
            .store
            .node_seen(
                &self.services.node_id,
                NodeRole::Gateway.as_str(),
                addr,
                std::process::id(),
            )
            .await
        {
            tracing::warn!(%error, "could not report the gateway alive");
        }
    }

    /// Reads the shard owners and the live nodes again, unless that was done just now and
    /// `force` is false.
    async fn refresh(&self, force: bool) -> StoreResult<()> {
        let mut last = self.refreshed.lock().await;
        if !force && last.is_some_and(|at| at.elapsed() < REFRESH_AT_MOST_EVERY) {
            return Ok(());
        }
        let nodes = self.store.service_nodes(self.live_window()).await?;
        let leases = self.store.shard_leases().await?;
        let mut owners = vec![None; SHARDS as usize];
        for lease in leases.iter().filter(|l| l.remaining_ms > 0) {
            let Some(owner) = &lease.owner else { continue };
            let Some(node) = nodes.iter().find(|n| &n.id == owner) else {
                continue;
            };
            if let Some(slot) = owners.get_mut(lease.shard as usize) {
                *slot = Some(Owner {
                    node: owner.clone(),
                    addr: node.addr.clone(),
                    epoch: lease.epoch,
                });
            }
        }
        let up = |role: NodeRole| -> Vec<String> {
            nodes
                .iter()
                .filter(|n| n.up && n.role == role.as_str())
                .map(|n| n.addr.clone())
                .collect()
        };
        *self.map.write().expect("shard map poisoned") = ShardMap {
            owners,
            catalogs: up(NodeRole::Catalog),
            inventory: up(NodeRole::Inventory),
        };
        *last = Some(Instant::now());
        Ok(())
    }

    /// Nodes that reported within this long count as up.
    fn live_window(&self) -> Duration {
        self.services.lease_ttl
    }

    fn owner(&self, shard: u32) -> Option<Owner> {
        self.map.read().expect("shard map poisoned").owners[shard as usize].clone()
    }

    /// How long a call may wait for its answer: a v1 purchase waits for its payment, which
    /// the hold's TTL bounds.
    fn call_timeout(&self) -> Duration {
        (self.settings.hold_ttl + Duration::from_secs(5)).min(Duration::from_secs(60))
    }

    /// How long a purchase may go on looking for its outcome: a failover (a lease's TTL and a
    /// renewal), the new owner's recovery, and a payment.
    fn resolve_budget(&self) -> Duration {
        self.services.lease_ttl + self.services.renew_every * 2 + self.call_timeout()
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<Reply<T>, CallError> {
        let url = format!("http://{addr}{PREFIX}{path}");
        let request = match body {
            Some(body) => self.http.post(&url).json(body),
            None => self.http.get(&url),
        };
        let response = request
            .bearer_auth(&self.token)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    CallError::NotSent(format!("{url}: {e}"))
                } else {
                    CallError::Unknown(format!("{url}: {e}"))
                }
            })?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Ok(Reply::Err(WireError::Store {
                message: format!("{url} answered {status}: {text}"),
            }));
        }
        response
            .json::<Reply<T>>()
            .await
            .map_err(|e| CallError::Unknown(format!("{url}: unreadable answer: {e}")))
    }

    /// Sends `body` to the owner of `event`'s shard, following the shard as it moves, until a
    /// node answers. `Err` carries the epoch of the owner that got the call and never answered.
    async fn route<B: Serialize, T: DeserializeOwned>(
        &self,
        event: EventId,
        path: &str,
        body: &B,
        deadline: Instant,
    ) -> Result<Result<T, WireError>, i64> {
        let shard = shard_of(event);
        loop {
            let Some(owner) = self.owner(shard) else {
                if Instant::now() >= deadline {
                    return Ok(Err(WireError::Unavailable {
                        what: "inventory".into(),
                    }));
                }
                tokio::time::sleep(RESOLVE_EVERY).await;
                let _ = self.refresh(false).await;
                continue;
            };
            // A node that hangs (paused, partitioned) is not waited for past the moment its
            // shard moves: the call is dropped, and its outcome read from the database.
            let answer = tokio::select! {
                answer = self.call::<B, T>(&owner.addr, path, Some(body), self.call_timeout()) => answer,
                () = self.moved(shard, owner.epoch) => {
                    tracing::warn!(shard, node = %owner.node, "the shard moved while its old owner held a call; reading the outcome from the database");
                    return Err(owner.epoch);
                }
            };
            match answer {
                Ok(Reply::Ok(value)) => return Ok(Ok(value)),
                Ok(Reply::Err(WireError::OwnerChanged)) => return Err(owner.epoch),
                Ok(Reply::Err(WireError::NotOwner { .. })) | Err(CallError::NotSent(_))
                    if Instant::now() < deadline =>
                {
                    self.figures.rerouted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(shard, node = %owner.node, "rerouting after a refusal");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = self.refresh(false).await;
                }
                Ok(Reply::Err(error)) => return Ok(Err(error)),
                Err(CallError::NotSent(_)) => {
                    return Ok(Err(WireError::Unavailable {
                        what: "inventory".into(),
                    }))
                }
                Err(CallError::Unknown(error)) => {
                    tracing::warn!(shard, node = %owner.node, %error, "an inventory node did not answer; reading the outcome from the database");
                    return Err(owner.epoch);
                }
            }
        }
    }

    /// Returns once the shard map shows `shard` at another epoch than `epoch` (the map is
    /// read again every renewal interval).
    async fn moved(&self, shard: u32, epoch: i64) {
        loop {
            tokio::time::sleep(RESOLVE_EVERY).await;
            if self.owner(shard).is_some_and(|o| o.epoch != epoch) {
                return;
            }
        }
    }

    /// What became of `order`, sent to the owner at `epoch` that never answered: the order
    /// as stored once it has one (settled, or pending when `pending_is_final`), `None` when it
    /// was never written and the shard now has another owner (so it is safe to send again).
    async fn resolve(
        &self,
        order: OrderId,
        event: EventId,
        epoch: i64,
        pending_is_final: bool,
        deadline: Instant,
    ) -> Result<Option<Order>, PurchaseError> {
        let shard = shard_of(event);
        loop {
            // The lease first, then the order: a write the old owner committed before its
            // shard moved is visible by then, and it can commit none after.
            let moved = self
                .store
                .shard_leases()
                .await?
                .iter()
                .any(|l| l.shard == shard && l.epoch > epoch && l.remaining_ms > 0);
            match self.store.order(order).await? {
                Some(stored) if stored.status != OrderStatus::Pending || pending_is_final => {
                    self.figures.resolved.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(stored));
                }
                None if moved => {
                    let _ = self.refresh(true).await;
                    return Ok(None);
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                self.figures.unresolved.fetch_add(1, Ordering::Relaxed);
                return Err(PurchaseError::Unresolved { order });
            }
            tokio::time::sleep(RESOLVE_EVERY).await;
        }
    }

    /// Routes a purchase or an order under its id, resolving unanswered calls, until an
    /// answer or the budget's end.
    async fn place<B: Serialize, T: DeserializeOwned>(
        &self,
        order: OrderId,
        event: EventId,
        path: &str,
        body: &B,
        pending_is_final: bool,
    ) -> Result<Result<T, Order>, PurchaseError> {
        // Each attempt gets the whole budget: a failover may follow another.
        for _ in 0..MAX_ATTEMPTS {
            let deadline = Instant::now() + self.resolve_budget();
            match self.route::<B, T>(event, path, body, deadline).await {
                Ok(answer) => return answer.map(Ok).map_err(PurchaseError::from),
                Err(epoch) => {
                    if let Some(stored) = self
                        .resolve(order, event, epoch, pending_is_final, deadline)
                        .await?
                    {
                        return Ok(Err(stored));
                    }
                    // Never written, and the old owner cannot write it now: send it again.
                    self.figures.rerouted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.figures.unresolved.fetch_add(1, Ordering::Relaxed);
        Err(PurchaseError::Unresolved { order })
    }

    async fn catalog<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> StoreResult<T> {
        let mut catalogs = self
            .map
            .read()
            .expect("shard map poisoned")
            .catalogs
            .clone();
        if catalogs.is_empty() {
            self.refresh(false).await?;
            catalogs = self
                .map
                .read()
                .expect("shard map poisoned")
                .catalogs
                .clone();
        }
        let mut last = "no catalog node is up".to_owned();
        for addr in &catalogs {
            match self
                .call::<B, T>(addr, path, body, Duration::from_secs(5))
                .await
            {
                Ok(Reply::Ok(value)) => return Ok(value),
                Ok(Reply::Err(error)) => return Err(error.into()),
                Err(CallError::NotSent(e) | CallError::Unknown(e)) => last = e,
            }
        }
        Err(StoreError::Unavailable(format!(
            "the catalog node does not answer ({last})"
        )))
    }
}

/// A v1 ticket from its settled order, as the owner would have answered.
fn ticket_of(order: &Order) -> Result<Ticket, PurchaseError> {
    match order.status {
        OrderStatus::Confirmed => {
            let id = *order
                .tickets
                .first()
                .ok_or_else(|| StoreError::Corrupt(format!("order {} has no ticket", order.id)))?;
            let price = Money::from_cents(order.amount_cents)
                .map_err(|e| StoreError::Corrupt(format!("order {}: {e}", order.id)))?;
            Ok(Ticket {
                id,
                event_id: order.event_id,
                user_id: order.user_id.clone(),
                purchase_date: order.created_at.clone(),
                price: price.major(),
                price_cents: price.cents(),
                status: TicketStatus::Confirmed,
                cancel_reason: None,
            })
        }
        OrderStatus::Cancelled => Err(match order.cancel_reason.as_deref() {
            Some("hold_expired") => PurchaseError::HoldExpired,
            Some("payment_declined") => PurchaseError::PaymentDeclined,
            // Interrupted: the owner died and nothing was charged; buying again is safe.
            _ => PurchaseError::OwnerChanged,
        }),
        OrderStatus::Pending => Err(PurchaseError::Unresolved { order: order.id }),
    }
}

#[async_trait]
impl Stage for GatewayNode {
    fn kind(&self) -> StageKind {
        StageKind::Services
    }

    fn records(&self) -> &dyn Records {
        &self.inner.store
    }

    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError> {
        self.inner
            .catalog("/events", Some(&NewEventCall::from(&new)))
            .await
    }

    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        let order = OrderId(uuid::Uuid::new_v4());
        let call = PurchaseCall {
            order,
            event,
            user: user.as_str().to_owned(),
        };
        match self
            .inner
            .place::<_, Ticket>(order, event, "/purchase", &call, false)
            .await?
        {
            Ok(ticket) => Ok(ticket),
            Err(stored) => ticket_of(&stored),
        }
    }

    async fn place_order(&self, request: OrderRequest) -> Result<Order, PurchaseError> {
        // A retry of an order whose outcome the client was never told (`503 outcome-unknown`
        // released its Idempotency-Key) finds the order its first try placed, if that one
        // was written meanwhile, instead of placing a second under the same key.
        if let Some(key) = &request.idempotency {
            if let Some(placed) = self
                .inner
                .store
                .order_by_key(&request.user, &key.key)
                .await?
            {
                return Ok(placed);
            }
        }
        let order = request.order.unwrap_or(OrderId(uuid::Uuid::new_v4()));
        let call = OrderCall {
            order,
            event: request.event,
            user: request.user.as_str().to_owned(),
            quantity: request.quantity,
            per_user_limit: request.per_user_limit,
            idempotency: request
                .idempotency
                .as_ref()
                .map(|k| (k.key.clone(), k.status)),
        };
        match self
            .inner
            .place::<_, Order>(order, request.event, "/orders", &call, true)
            .await?
        {
            Ok(placed) | Err(placed) => Ok(placed),
        }
    }

    async fn event(&self, id: EventId) -> StoreResult<Option<Event>> {
        self.inner
            .catalog::<(), _>(&format!("/events/{}", id.0), None)
            .await
    }

    async fn events(&self) -> StoreResult<Vec<Event>> {
        self.inner.catalog::<(), _>("/events", None).await
    }

    async fn search_events(&self, query: &EventQuery) -> StoreResult<(Vec<Event>, i64)> {
        let page: EventPage = self.inner.catalog("/events/search", Some(query)).await?;
        Ok((page.events, page.total))
    }

    async fn stats(&self) -> serde_json::Value {
        let map = self.inner.map.read().expect("shard map poisoned");
        let routed = map.owners.iter().filter(|o| o.is_some()).count();
        let f = &self.inner.figures;
        serde_json::json!({
            "stage": StageKind::Services,
            "node": { "id": self.inner.services.node_id, "role": NodeRole::Gateway },
            "shardsRouted": routed,
            "inventoryNodes": map.inventory.len(),
            "catalogNodes": map.catalogs.len(),
            "rerouted": f.rerouted.load(Ordering::Relaxed),
            "resolvedFromDatabase": f.resolved.load(Ordering::Relaxed),
            "unresolved": f.unresolved.load(Ordering::Relaxed),
        })
    }

    /// The inventory nodes' work under way, summed: every node that is up, and every node
    /// holding a shard's lease even if its reports are late (it may be resolving what a
    /// previous owner left there). A node that does not answer, or a shard nobody holds (what
    /// it holds is nobody's to count until it is taken up), makes the sum unreadable (not
    /// quiet).
    async fn activity(&self) -> Activity {
        let _ = self.inner.refresh(false).await;
        let mut sum = Activity::default();
        let nodes = {
            let map = self.inner.map.read().expect("shard map poisoned");
            let mut nodes = map.inventory.clone();
            for (shard, owner) in map.owners.iter().enumerate() {
                match owner {
                    Some(owner) if !nodes.contains(&owner.addr) => nodes.push(owner.addr.clone()),
                    Some(_) => {}
                    None => sum.unreadable.push(format!("shard {shard}: no owner")),
                }
            }
            nodes
        };
        for addr in nodes {
            match self
                .inner
                .call::<(), Activity>(&addr, "/activity", None, Duration::from_secs(2))
                .await
            {
                Ok(Reply::Ok(a)) => {
                    sum.held_seats += a.held_seats;
                    sum.payments_in_flight += a.payments_in_flight;
                    sum.unflushed_writes += a.unflushed_writes;
                    sum.jobs_queued += a.jobs_queued;
                    sum.jobs_running += a.jobs_running;
                    sum.unreadable.extend(a.unreadable);
                }
                Ok(Reply::Err(e)) => sum.unreadable.push(format!("inventory node {addr}: {e:?}")),
                Err(CallError::NotSent(e) | CallError::Unknown(e)) => {
                    sum.unreadable.push(format!("inventory node {addr}: {e}"))
                }
            }
        }
        sum
    }

    async fn dependencies(&self) -> Vec<(&'static str, bool)> {
        let database = super::database_health(self.records()).await;
        let catalog = self
            .inner
            .catalog::<(), Option<Event>>("/events/0", None)
            .await
            .is_ok();
        vec![database, ("catalog", catalog)]
    }

    async fn topology(&self) -> Option<StoreResult<serde_json::Value>> {
        Some(super::services::topology(&self.inner.store, &self.inner.services).await)
    }

    fn bound(&self, addr: std::net::SocketAddr) {
        *self.inner.addr.lock().expect("gateway address poisoned") = Some(addr.to_string());
        let gateway = Arc::clone(&self.inner);
        actix_rt::spawn(async move { gateway.report(&addr.to_string()).await });
    }

    async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }
}
