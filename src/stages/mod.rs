//! The stages: interchangeable back ends behind one purchase contract, [`Stage`].
//!
//! The stage owns every domain read as well: the API asks the stage for events, orders,
//! tickets, accounts and Idempotency-Key records ([`Stage::records`]), never the database, so
//! a stage whose truth lives elsewhere can serve the same API. What differs most between
//! stages is how a purchase is decided.

pub mod actor;
pub mod catalog;
pub mod event_actor;
pub mod gateway;
pub mod locked;
pub mod monolith;
pub mod saga;
pub mod saga_seats;
pub mod services;

use std::sync::Arc;

use async_trait::async_trait;

use crate::audit::Activity;
use crate::config::{NodeRole, Settings, StageKind};
use crate::domain::{Event, EventId, NewEvent, Order, OrderId, Ticket, UserId};
use crate::payments::{GatewayUnavailable, PaymentGateway};
use crate::store::{EventQuery, OrderKey, Records, Store, StoreError, StoreResult};

/// Why a purchase did not end with a confirmed ticket.
#[derive(Debug, thiserror::Error)]
pub enum PurchaseError {
    #[error("no event with that id")]
    UnknownEvent,
    /// Fewer tickets are free than the order asks for.
    #[error("only {available} tickets are available")]
    NotEnough { available: u32 },
    /// The order would take the user past the per-user limit for this event.
    #[error("at most {limit} tickets per user for this event")]
    UserLimit { limit: u32 },
    /// This stage serves API v1 only (the monolith, like the seed's step 1).
    #[error("this stage serves API v1 only")]
    NotServed,
    /// Every ticket is sold; none will come back.
    #[error("no tickets left")]
    SoldOut,
    /// No ticket is free now, but some are held by buyers whose payment is still running.
    #[error("all remaining tickets are held by other buyers; try again shortly")]
    AllHeld,
    #[error("the payment was declined; the ticket was cancelled and its seat returned")]
    PaymentDeclined,
    /// Payment succeeded after the hold ran out: the seat went back and the charge was refunded.
    #[error("the hold expired before payment completed; the charge was refunded")]
    HoldExpired,
    /// The event's mailbox or the database writer is full: shed load, retry later.
    #[error("the server is overloaded; try again shortly")]
    Overloaded,
    /// Stage `services`: this inventory node does not hold the event's shard (it never did, or
    /// it lost it); ask the node that does.
    #[error("this node does not own shard {shard}; ask its owner")]
    NotOwner { shard: u32 },
    /// Stage `services`: the node lost the event's shard while the purchase was under way, and
    /// its write was refused; the new owner settles the purchase from what was stored.
    #[error("the event moved to another node during the purchase; its new owner settles it, so look the ticket or order up shortly")]
    OwnerChanged,
    /// Stage `services`: the gateway sent the purchase to its event's node and heard nothing
    /// back, and the database did not show its outcome in time. The order keeps this id.
    #[error("the purchase's outcome is not known yet (its node stopped answering); look order {order} up shortly")]
    Unresolved { order: OrderId },
    /// A service the stage depends on (Redis for `locked`) does not answer.
    #[error("{0} is unavailable; try again shortly")]
    Unavailable(&'static str),
    #[error(transparent)]
    Gateway(#[from] GatewayUnavailable),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The purchase contract every stage implements.
#[async_trait]
pub trait Stage: Send + Sync + 'static {
    fn kind(&self) -> StageKind;

    /// Creates an event and makes it purchasable.
    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError>;

    /// Buys one ticket; answers when payment has settled (API v1 semantics).
    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError>;

    /// A v1 purchase under an order id the caller chose (a `services` gateway, so that a
    /// retry can never make a second order or a second charge). Only inventory nodes serve it.
    async fn purchase_as(
        &self,
        order: OrderId,
        event: EventId,
        user: UserId,
    ) -> Result<Ticket, PurchaseError> {
        let _ = (order, event, user);
        Err(PurchaseError::NotServed)
    }

    /// Places an order (API v2): answers once its seats are held durably, with the order
    /// `pending`; payment and confirmation continue in the background.
    async fn place_order(&self, request: OrderRequest) -> Result<Order, PurchaseError> {
        let _ = request;
        Err(PurchaseError::NotServed)
    }

    /// Stage `saga`'s seat command, relayed to the inventory node owning its event's shard.
    /// Only inventory nodes serve it.
    async fn saga_seats(
        &self,
        call: saga_seats::SeatCall,
    ) -> Result<crate::saga::Reply, PurchaseError> {
        let _ = call;
        Err(PurchaseError::NotServed)
    }

    /// The stage's own figures (lock waits, queue depths, ...) for `GET /api/v1/admin/stats`.
    async fn stats(&self) -> serde_json::Value {
        serde_json::json!({ "stage": self.kind() })
    }

    /// Where this stage keeps its records: events, orders, tickets, accounts,
    /// Idempotency-Key records and what the audit reads.
    fn records(&self) -> &dyn Records;

    /// One event, for reads. A stage may serve it from a cache (`locked` does).
    async fn event(&self, id: EventId) -> StoreResult<Option<Event>> {
        self.records().event(id).await
    }

    /// Every event, for API v1's list. A stage may serve it from a cache.
    async fn events(&self) -> StoreResult<Vec<Event>> {
        self.records().list_events().await
    }

    /// One page of events (API v2's search), and how many match in all.
    async fn search_events(&self, query: &EventQuery) -> StoreResult<(Vec<Event>, i64)> {
        self.records().search_events(query).await
    }

    async fn order(&self, id: OrderId) -> StoreResult<Option<Order>> {
        self.records().order(id).await
    }

    /// A user's orders, newest first.
    async fn user_orders(&self, user: &UserId) -> StoreResult<Vec<Order>> {
        self.records().user_orders(user).await
    }

    /// A user's tickets, oldest first.
    async fn user_tickets(&self, user: &UserId) -> StoreResult<Vec<Ticket>> {
        self.records().user_tickets(user).await
    }

    /// Work the stage has under way that its stored rows do not show: seats held in memory,
    /// payment jobs, writes not yet committed. The audit adds the pending rows and the
    /// gateway's payments in flight, and calls the system quiet when all are zero.
    async fn activity(&self) -> Activity {
        Activity::default()
    }

    /// What the stage depends on (its database, and e.g. Redis) and whether each answers.
    async fn dependencies(&self) -> Vec<(&'static str, bool)> {
        vec![database_health(self.records()).await]
    }

    /// Stage `services`: every node with its role, id, pid, address and state, and the shards
    /// each inventory node holds with their epochs. `None` for a stage of one process.
    async fn topology(&self) -> Option<StoreResult<serde_json::Value>> {
        None
    }

    /// Stage `saga`: an order's saga events, in order. `None` for a stage that keeps no event
    /// log.
    async fn order_events(
        &self,
        order: OrderId,
    ) -> Option<StoreResult<Vec<crate::store::saga::StoredEvent>>> {
        let _ = order;
        None
    }

    /// The address the server is bound to, once it is (a node of `services` reports it).
    fn bound(&self, addr: std::net::SocketAddr) {
        let _ = addr;
    }

    /// Stops background work after the HTTP server has drained its requests.
    async fn shutdown(&self) {}
}

/// The database's name and whether it answers, for health.
pub async fn database_health(records: &dyn Records) -> (&'static str, bool) {
    (records.engine(), records.ping().await.is_ok())
}

/// An API v2 order, validated.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub event: EventId,
    pub user: UserId,
    pub quantity: u32,
    /// Most tickets one user may hold or own for the event.
    pub per_user_limit: u32,
    /// The client's Idempotency-Key; stored on the order so a key yields at most one order.
    pub idempotency: Option<OrderKey>,
    /// The order's id when the caller chose it (a `services` gateway, so that a retry names
    /// the same order and the same payment key); `None` lets the stage mint one.
    pub order: Option<OrderId>,
}

/// What every stage is built from.
#[derive(Clone)]
pub struct StageParts {
    pub store: Store,
    pub payments: PaymentGateway,
    pub settings: Settings,
}

/// Why a stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis did not answer at start (`locked`).
    #[error("--redis-url {url}: {cause}; start Redis or point --redis-url (REDIS_URL) at it")]
    Redis { url: String, cause: String },
}

/// Builds the stage `settings.stage` asks for (recovering interrupted purchases first).
pub async fn build(parts: StageParts) -> Result<Arc<dyn Stage>, StartError> {
    Ok(match parts.settings.stage {
        StageKind::Monolith => Arc::new(monolith::Monolith::new(parts)),
        StageKind::Actor => Arc::new(actor::ActorStage::start(parts).await?),
        StageKind::Locked => Arc::new(locked::LockedStage::start(parts).await?),
        StageKind::Saga => Arc::new(saga::SagaStage::start(parts).await?),
        StageKind::Services => match parts.settings.services.role {
            NodeRole::Inventory => Arc::new(services::InventoryNode::start(parts).await?),
            NodeRole::Gateway => Arc::new(gateway::GatewayNode::start(parts).await?),
            NodeRole::Catalog => Arc::new(catalog::CatalogNode::start(parts).await?),
            NodeRole::Payments => {
                Arc::new(crate::payments::service::PaymentsNode::start(parts).await?)
            }
        },
    })
}
