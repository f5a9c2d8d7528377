//! Stage `services`: the catalog node. It owns the events: it creates them and answers the
//! event reads the gateway forwards. It sells nothing; an inventory node starts an event's
//! actor from what the catalog stored, the first time someone buys from it.

use std::sync::Arc;

use async_trait::async_trait;

use super::{PurchaseError, Stage, StageParts};
use crate::config::{NodeRole, ServicesSettings, StageKind};
use crate::domain::{Event, EventId, NewEvent, Ticket, UserId};
use crate::store::{Catalog, Records, Store, StoreError};

pub struct CatalogNode {
    store: Store,
    services: ServicesSettings,
    presence: Arc<super::services::Presence>,
}

impl CatalogNode {
    pub async fn start(parts: StageParts) -> Result<Self, StoreError> {
        let services = parts.settings.services.clone();
        let presence = super::services::Presence::start(
            parts.store.clone(),
            &services,
            NodeRole::Catalog,
            parts.settings.bind.to_string(),
        )
        .await?;
        Ok(Self {
            store: parts.store,
            services,
            presence,
        })
    }
}

#[async_trait]
impl Stage for CatalogNode {
    fn kind(&self) -> StageKind {
        StageKind::Services
    }

    fn records(&self) -> &dyn Records {
        &self.store
    }

    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError> {
        self.store.create_event(&new).await
    }

    /// Purchases go to the gateway, which sends them to the event's inventory node.
    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        let _ = (event, user);
        Err(PurchaseError::NotServed)
    }

    async fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "stage": StageKind::Services,
            "node": { "id": self.services.node_id, "role": NodeRole::Catalog },
        })
    }

    async fn topology(&self) -> Option<Result<serde_json::Value, StoreError>> {
        Some(super::services::topology(&self.store, &self.services).await)
    }

    fn bound(&self, addr: std::net::SocketAddr) {
        self.presence.bound(addr);
    }

    async fn shutdown(&self) {
        self.presence.stop();
    }
}
