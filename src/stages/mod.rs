//! The stages: interchangeable back ends behind one purchase contract, [`Stage`].
//!
//! Reads (event lists, a user's tickets) go straight to the shared [`Store`]; what differs
//! between stages is how an event is created and, above all, how a purchase is decided.

pub mod actor;
pub mod event_actor;
pub mod monolith;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Settings, StageKind};
use crate::domain::{Event, EventId, NewEvent, Ticket, UserId};
use crate::payments::{GatewayUnavailable, PaymentGateway};
use crate::store::{Store, StoreError};

/// Why a purchase did not end with a confirmed ticket.
#[derive(Debug, thiserror::Error)]
pub enum PurchaseError {
    #[error("no event with that id")]
    UnknownEvent,
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

    /// Stops background work after the HTTP server has drained its requests.
    async fn shutdown(&self) {}
}

/// What every stage is built from.
#[derive(Clone)]
pub struct StageParts {
    pub store: Store,
    pub payments: PaymentGateway,
    pub settings: Settings,
}

/// Builds the stage `settings.stage` asks for (recovering interrupted purchases first).
pub async fn build(parts: StageParts) -> Result<Arc<dyn Stage>, StoreError> {
    Ok(match parts.settings.stage {
        StageKind::Monolith => Arc::new(monolith::Monolith::new(parts)),
        StageKind::Actor => Arc::new(actor::ActorStage::start(parts).await?),
    })
}
