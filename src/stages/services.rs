//! Stage `services` (the seed's step 3): an inventory node. It runs the event actors of the
//! shards it holds, with the `actor` stage's core ([`ActorStage::start_sharded`]), and a lease
//! keeper that renews its shard leases, takes a fair share of the free or expired ones, and
//! gives back what it holds beyond that share, all by the database's clock
//! ([`crate::store::shards`]). Its writer proves each shard's epoch in every transaction, so a
//! node that paused past its lease cannot write once another node has taken over.
//!
//! It is stage `saga`'s inventory participant too: the saga's seat commands for the events of
//! its shards ([`super::saga_seats`]), written by a second writer behind the same fence.
//!
//! Built so far: the inventory node, and the payments node it calls
//! ([`crate::payments::service`]). Still to come (issue 8): the gateway that routes each
//! purchase to its owner, the catalog node, and `serve --stage services` supervising them as
//! processes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::actor::ActorStage;
use super::saga_seats::{SagaSeats, SeatCall};
use super::{OrderRequest, PurchaseError, Stage, StageParts};
use crate::audit::Activity;
use crate::config::{NodeRole, ServicesSettings, StageKind};
use crate::domain::{Event, EventId, NewEvent, Order, OrderId, Ticket, UserId};
use crate::store::shards::{ShardFence, ShardLease, NOT_OWNER, SHARDS};
use crate::store::{Records, Store, StoreError};

/// The role an inventory node reports itself under.
pub const INVENTORY: &str = "inventory";

pub struct InventoryNode {
    inner: Arc<Node>,
}

struct Node {
    actors: ActorStage,
    /// Stage `saga`'s seat commands for the events of this node's shards.
    seats: SagaSeats,
    store: Store,
    fence: Arc<ShardFence>,
    /// The leases this node holds, by shard, as its keeper last saw them.
    held: Mutex<BTreeMap<u32, ShardLease>>,
    addr: Mutex<String>,
    stopping: AtomicBool,
    /// Rounds of the lease keeper taking shards up: from the claim until the purchases the
    /// last owner left in them are resolved. Their rows are nobody's work under way to count
    /// meanwhile, so the node is not quiet ([`Stage::activity`]).
    taking_up: AtomicUsize,
}

/// Counts a round taking shards up ([`Node::taking_up`]) until dropped.
struct TakingUp<'a>(&'a AtomicUsize);

impl<'a> TakingUp<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for TakingUp<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InventoryNode {
    /// Starts the node's actors (none yet) and its lease keeper, after one first round of
    /// leases, so a node that starts alone serves at once.
    pub async fn start(parts: StageParts) -> Result<Self, StoreError> {
        let services = parts.settings.services.clone();
        let store = parts.store.clone();
        store.ensure_shards().await?;
        let fence = Arc::new(
            ShardFence::new(services.node_id.clone(), services.epoch_fence)
                .with_write_delay(services.delay_writes),
        );
        if !services.epoch_fence {
            tracing::warn!("the epoch fence is OFF: a node paused past its lease can double-sell (unsafe; for the lesson only)");
        }
        let actors = ActorStage::start_sharded(parts.clone(), Arc::clone(&fence)).await?;
        // A writer of its own for the saga's seats, behind the same fence: a saga's commands
        // never queue behind the purchases' writes, nor those behind them.
        let (seat_writer, _seat_writer_task) = parts
            .store
            .start_fenced_writer(
                parts.settings.max_batch,
                parts.settings.mailbox_capacity.max(1024),
                Arc::clone(&fence),
            )
            .await?;
        let seats = SagaSeats::new(store.clone(), seat_writer, Arc::clone(&fence));
        let node = Arc::new(Node {
            actors,
            seats,
            store,
            fence,
            held: Mutex::new(BTreeMap::new()),
            addr: Mutex::new(parts.settings.bind.to_string()),
            stopping: AtomicBool::new(false),
            taking_up: AtomicUsize::new(0),
        });
        node.keep_leases(&services).await?;
        // Reporting and renewal on their own beat as well: a keeper round that adopts many
        // shards, resolving their pending purchases through a slow gateway, can outlast a lease.
        let renewer = Arc::clone(&node);
        actix_rt::spawn(async move {
            let services = renewer.actors_settings();
            while !renewer.stopping.load(Ordering::Acquire) {
                tokio::time::sleep(services.renew_every).await;
                if renewer.stopping.load(Ordering::Acquire) {
                    break;
                }
                if let Err(error) = renewer.report_and_renew(&services).await {
                    tracing::warn!(%error, "could not renew the shard leases");
                }
            }
        });
        let keeper = Arc::clone(&node);
        actix_rt::spawn(async move {
            let services = keeper.actors_settings();
            while !keeper.stopping.load(Ordering::Acquire) {
                tokio::time::sleep(services.renew_every).await;
                if keeper.stopping.load(Ordering::Acquire) {
                    break;
                }
                if let Err(error) = keeper.keep_leases(&services).await {
                    // The database is away: leases cannot be renewed, and the fence refuses
                    // writes once they run out; the next round tries again.
                    tracing::warn!(%error, "could not keep the shard leases");
                }
            }
        });
        Ok(Self { inner: node })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        self.inner.fence.node()
    }

    /// The shards this node holds now, with their epochs.
    pub fn leases(&self) -> Vec<ShardLease> {
        self.inner
            .held
            .lock()
            .expect("held leases poisoned")
            .values()
            .copied()
            .collect()
    }

    /// The address the node is reachable at (reported in `service_nodes`), once bound.
    pub fn set_addr(&self, addr: String) {
        *self.inner.addr.lock().expect("node address poisoned") = addr;
    }

    /// Stops renewing and gives every shard back at once, so the other nodes need not wait
    /// for the leases to run out (a graceful stop; a killed node's leases just expire).
    pub async fn hand_back(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        let held: Vec<ShardLease> =
            std::mem::take(&mut *self.inner.held.lock().expect("held leases poisoned"))
                .into_values()
                .collect();
        for lease in held {
            self.inner.actors.release(lease.shard);
            if let Err(error) = self.inner.store.release_shard(self.node_id(), lease).await {
                tracing::warn!(%error, shard = lease.shard, "could not give a shard back; its lease runs out by itself");
            }
        }
    }

    /// Stops the keeper without giving anything back, as if the node had died: its leases run
    /// out and the others take them (tests of failover within one process).
    pub fn abandon(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        let shards: Vec<u32> = self
            .inner
            .held
            .lock()
            .expect("held leases poisoned")
            .keys()
            .copied()
            .collect();
        for shard in shards {
            self.inner.actors.release(shard);
        }
    }
}

/// A node that is neither inventory nor payments reporting itself alive in `service_nodes`
/// (role, address, pid) at start, as soon as it is bound, and every renewal interval.
pub struct Presence {
    store: Store,
    id: String,
    role: NodeRole,
    addr: Mutex<String>,
    stopping: AtomicBool,
}

impl Presence {
    pub async fn start(
        store: Store,
        services: &ServicesSettings,
        role: NodeRole,
        addr: String,
    ) -> Result<Arc<Self>, StoreError> {
        let presence = Arc::new(Self {
            store,
            id: services.node_id.clone(),
            role,
            addr: Mutex::new(addr),
            stopping: AtomicBool::new(false),
        });
        presence.report().await?;
        let every = services.renew_every;
        let keeper = Arc::clone(&presence);
        actix_rt::spawn(async move {
            while !keeper.stopping.load(Ordering::Acquire) {
                tokio::time::sleep(every).await;
                if let Err(error) = keeper.report().await {
                    tracing::warn!(%error, role = %keeper.role, "could not report the node alive");
                }
            }
        });
        Ok(presence)
    }

    async fn report(&self) -> Result<(), StoreError> {
        let addr = self.addr.lock().expect("node address poisoned").clone();
        self.store
            .node_seen(&self.id, self.role.as_str(), &addr, std::process::id())
            .await
    }

    /// The address the node is bound to, reported at once.
    pub fn bound(self: &Arc<Self>, addr: std::net::SocketAddr) {
        *self.addr.lock().expect("node address poisoned") = addr.to_string();
        let presence = Arc::clone(self);
        actix_rt::spawn(async move {
            if let Err(error) = presence.report().await {
                tracing::warn!(%error, "could not report the node's address");
            }
        });
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// Every node with its role, id, pid, address and state, and the shards each inventory node
/// holds with their epochs (`GET /api/v2/admin/nodes`).
pub async fn topology(
    store: &Store,
    services: &ServicesSettings,
) -> Result<serde_json::Value, StoreError> {
    let nodes = store.service_nodes(services.lease_ttl).await?;
    let leases = store.shard_leases().await?;
    let listed: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            let mut node = serde_json::json!({
                "id": n.id,
                "role": n.role,
                "pid": n.pid,
                "address": n.addr,
                "state": if n.up { "up" } else { "down" },
            });
            if n.role == INVENTORY {
                node["shards"] = leases
                    .iter()
                    .filter(|l| l.owner.as_deref() == Some(n.id.as_str()) && l.remaining_ms > 0)
                    .map(|l| serde_json::json!({ "shard": l.shard, "epoch": l.epoch }))
                    .collect::<Vec<_>>()
                    .into();
            }
            node
        })
        .collect();
    let unowned = leases
        .iter()
        .filter(|l| l.owner.is_none() || l.remaining_ms <= 0)
        .map(|l| l.shard)
        .collect::<Vec<_>>();
    Ok(serde_json::json!({
        "shards": SHARDS,
        "nodes": listed,
        "unownedShards": unowned,
    }))
}

impl Node {
    fn actors_settings(&self) -> crate::config::ServicesSettings {
        self.actors.settings().services.clone()
    }

    /// Reports the node alive and extends its leases, nothing more.
    async fn report_and_renew(
        &self,
        services: &crate::config::ServicesSettings,
    ) -> Result<(), StoreError> {
        let node = self.fence.node();
        let addr = self.addr.lock().expect("node address poisoned").clone();
        self.store
            .node_seen(node, INVENTORY, &addr, std::process::id())
            .await?;
        self.store.renew_leases(node, services.lease_ttl).await?;
        Ok(())
    }

    /// One round: report alive, renew, drop what was lost, take or give back shards to hold
    /// a fair share of them among the live inventory nodes.
    async fn keep_leases(
        &self,
        services: &crate::config::ServicesSettings,
    ) -> Result<(), StoreError> {
        let node = self.fence.node().to_owned();
        let addr = self.addr.lock().expect("node address poisoned").clone();
        self.store
            .node_seen(&node, INVENTORY, &addr, std::process::id())
            .await?;
        let mut renewed = self.store.renew_leases(&node, services.lease_ttl).await?;
        // Leases under this node's id that it never took: left by an earlier process with the
        // same --node-id. Given back, to be taken again at a higher epoch (below), so nothing
        // that process still had queued could pass the fence.
        let strays: Vec<ShardLease> = {
            let held = self.held.lock().expect("held leases poisoned");
            renewed
                .iter()
                .filter(|l| !held.contains_key(&l.shard))
                .copied()
                .collect()
        };
        for lease in &strays {
            self.store.release_shard(&node, *lease).await?;
        }
        renewed.retain(|l| !strays.contains(l));
        let lost: Vec<u32> = {
            let mut held = self.held.lock().expect("held leases poisoned");
            let lost = held
                .keys()
                .filter(|shard| !renewed.iter().any(|l| l.shard == **shard))
                .copied()
                .collect::<Vec<_>>();
            for shard in &lost {
                held.remove(shard);
            }
            lost
        };
        for shard in lost {
            tracing::warn!(shard, "lost a shard lease (it ran out before renewal)");
            self.actors.release(shard);
        }
        // Live: reported within three rounds (and a round less than a lease). So a dead node stops
        // counting before its leases run out, and the survivors keep what they take from it
        // instead of giving half back to a node that is gone.
        let window = (services.renew_every * 3).min(
            services
                .lease_ttl
                .saturating_sub(services.renew_every)
                .max(services.renew_every),
        );
        let live = self.store.live_nodes(INVENTORY, window).await?.max(1);
        let fair = (SHARDS as usize).div_ceil(live);
        let holding = renewed.len();
        if holding < fair {
            // from the claim on: a shard claimed is not yet counted by anyone until adopted
            let _taking_up = TakingUp::new(&self.taking_up);
            for lease in self
                .store
                .claim_shards(&node, fair - holding, services.lease_ttl)
                .await?
            {
                self.adopt(lease).await?;
            }
        } else if holding > fair {
            // Another node joined: give back the excess, newest shards first, so it can take
            // them without waiting for a lease to run out.
            for lease in renewed.iter().rev().take(holding - fair) {
                self.held
                    .lock()
                    .expect("held leases poisoned")
                    .remove(&lease.shard);
                self.actors.release(lease.shard);
                self.store.release_shard(&node, *lease).await?;
                tracing::info!(
                    shard = lease.shard,
                    "gave a shard back to balance the nodes"
                );
            }
        }
        Ok(())
    }

    async fn adopt(&self, lease: ShardLease) -> Result<(), StoreError> {
        self.held
            .lock()
            .expect("held leases poisoned")
            .insert(lease.shard, lease);
        if let Err(error) = self.actors.adopt(lease).await {
            // Not serving it: give it back for another node to try.
            self.held
                .lock()
                .expect("held leases poisoned")
                .remove(&lease.shard);
            self.actors.release(lease.shard);
            let _ = self.store.release_shard(self.fence.node(), lease).await;
            return Err(error);
        }
        tracing::info!(shard = lease.shard, epoch = lease.epoch, "took a shard");
        Ok(())
    }
}

#[async_trait]
impl Stage for InventoryNode {
    fn kind(&self) -> StageKind {
        StageKind::Services
    }

    fn records(&self) -> &dyn Records {
        self.inner.actors.records()
    }

    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError> {
        self.inner.actors.create_event(new).await
    }

    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        self.inner
            .actors
            .purchase(event, user)
            .await
            .map_err(owner_changed)
    }

    async fn purchase_as(
        &self,
        order: OrderId,
        event: EventId,
        user: UserId,
    ) -> Result<Ticket, PurchaseError> {
        self.inner
            .actors
            .purchase_as(Some(order), event, user)
            .await
            .map_err(owner_changed)
    }

    async fn place_order(&self, request: OrderRequest) -> Result<Order, PurchaseError> {
        self.inner
            .actors
            .place_order(request)
            .await
            .map_err(owner_changed)
    }

    async fn saga_seats(&self, call: SeatCall) -> Result<crate::saga::Reply, PurchaseError> {
        self.inner.seats.apply(call).await.map_err(owner_changed)
    }

    async fn stats(&self) -> serde_json::Value {
        let mut stats = self.inner.actors.stats().await;
        stats["stage"] = serde_json::json!(StageKind::Services);
        stats["node"] = serde_json::json!({
            "id": self.node_id(),
            "role": INVENTORY,
            "shards": self.leases().iter().map(|l| serde_json::json!({
                "shard": l.shard, "epoch": l.epoch,
            })).collect::<Vec<_>>(),
        });
        stats
    }

    fn bound(&self, addr: std::net::SocketAddr) {
        self.set_addr(addr.to_string());
        // Reported at once, so the gateway can reach the node before its next round.
        let node = Arc::clone(&self.inner);
        actix_rt::spawn(async move {
            let id = node.fence.node().to_owned();
            if let Err(error) = node
                .store
                .node_seen(&id, INVENTORY, &addr.to_string(), std::process::id())
                .await
            {
                tracing::warn!(%error, "could not report the node's address");
            }
        });
    }

    async fn topology(&self) -> Option<Result<serde_json::Value, StoreError>> {
        Some(topology(&self.inner.store, &self.inner.actors_settings()).await)
    }

    async fn activity(&self) -> Activity {
        let mut activity = self.inner.actors.activity().await;
        if self.inner.taking_up.load(Ordering::Acquire) > 0 {
            // what the last owner left in them is not counted until it is read
            activity
                .unreadable
                .push(format!("{}: shards being taken up", self.node_id()));
        }
        activity
    }

    async fn shutdown(&self) {
        self.hand_back().await;
        self.inner.actors.shutdown().await;
    }
}

/// A write the epoch fence refused mid-purchase: the shard moved, and the new owner settles it.
/// The payments node not answering is a dependency down (`503 dependency-unavailable`): the
/// node keeps asking it under the same key in the background and settles the purchase then.
fn owner_changed(error: PurchaseError) -> PurchaseError {
    match error {
        PurchaseError::Store(StoreError::Conflict(message)) if message.contains(NOT_OWNER) => {
            PurchaseError::OwnerChanged
        }
        PurchaseError::Gateway(_) => PurchaseError::Unavailable("the payments node"),
        other => other,
    }
}

/// How long a failover can take at most with `settings`: a dead node's leases run out, and a
/// survivor notices at its next round.
pub fn failover_bound(settings: &crate::config::ServicesSettings) -> Duration {
    settings.lease_ttl + settings.renew_every
}
