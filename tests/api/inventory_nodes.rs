//! Stage `services`' inventory nodes, several in one process on one real PostgreSQL: they
//! share the shards fairly, each serves only the events of its own shards (`NotOwner`
//! otherwise), and when one dies its shards move to the survivor within the lease TTL plus
//! one renewal, which resolves the purchases it left pending. (Nodes as separate processes,
//! behind a gateway, come with the rest of the stage.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ticketflow::audit::{audit, Activity};
use ticketflow::config::{LatencyModel, Settings, StageKind};
use ticketflow::domain::{EventId, Money, NewEvent, UserId};
use ticketflow::payments::PaymentGateway;
use ticketflow::stages::services::{failover_bound, InventoryNode};
use ticketflow::stages::{PurchaseError, Stage, StageParts};
use ticketflow::store::shards::{shard_of, SHARDS};
use ticketflow::store::{AuditReads, Store};

use crate::backends::{Backend, TestDb};
use crate::helpers::test_settings;

struct Cluster {
    _db: TestDb,
    store: Store,
    payments: PaymentGateway,
    settings: Settings,
}

impl Cluster {
    async fn new(tweak: impl FnOnce(&mut Settings)) -> Self {
        let db = TestDb::new(Backend::Postgres);
        let mut settings = test_settings(StageKind::Services, &db);
        settings.services.lease_ttl = Duration::from_millis(900);
        settings.services.renew_every = Duration::from_millis(250);
        tweak(&mut settings);
        let store = Store::open(db.url(), settings.durability).await.unwrap();
        // One payment gateway for the whole cluster, as the payments node will be.
        let books = Arc::new(store.with_own_pool(2).await.unwrap());
        let payments = PaymentGateway::start(&settings.payments, settings.seed, books, &[])
            .await
            .unwrap();
        Self {
            _db: db,
            store,
            payments,
            settings,
        }
    }

    async fn node(&self, id: &str) -> InventoryNode {
        let mut settings = self.settings.clone();
        settings.services.node_id = id.into();
        InventoryNode::start(StageParts {
            store: self.store.clone(),
            payments: self.payments.clone(),
            settings,
        })
        .await
        .unwrap()
    }

    async fn event(&self, seats: u32) -> EventId {
        use ticketflow::store::Catalog;
        self.store
            .create_event(&NewEvent {
                name: format!("Show of {seats}"),
                venue: "Hall".into(),
                date: Utc::now(),
                total_tickets: seats,
                price: Money::from_cents(1_000).unwrap(),
            })
            .await
            .unwrap()
            .id
    }

    async fn audit_ok(&self) -> bool {
        let counts = self.store.event_counts().await.unwrap();
        let books = self.payments.reconciliation().await.unwrap();
        // Every node is stopped by now: nothing is under way.
        let report = audit(&counts, &books, Activity::default());
        if !report.ok {
            eprintln!("audit: {:?}", report.invariants);
        }
        report.ok
    }
}

/// Waits until `ready` holds, for at most `bound`; returns how long it took.
async fn within(bound: Duration, mut ready: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < bound, "not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// A buyer in front of several nodes, as the gateway will be: asks the nodes in turn until
/// the owner answers, and retries what is safe to retry.
async fn buy(nodes: &[&InventoryNode], event: EventId, user: &str) -> Option<String> {
    for attempt in 0..2_000 {
        let node = nodes[attempt % nodes.len()];
        match node.purchase(event, UserId::parse(user).unwrap()).await {
            Ok(ticket) => return Some(ticket.id.to_string()),
            Err(PurchaseError::SoldOut) => return None,
            Err(PurchaseError::NotOwner { .. }) => {}
            Err(
                PurchaseError::PaymentDeclined | PurchaseError::AllHeld | PurchaseError::Overloaded,
            ) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(other) => panic!("{user}: {other}"),
        }
    }
    panic!("{user} gave up")
}

#[actix_web::test]
async fn two_nodes_share_the_shards_and_each_serves_only_its_own_events() {
    let cluster = Cluster::new(|_| {}).await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    // a took every shard alone; once it sees b alive it gives half back, and b takes them.
    let bound = failover_bound(&cluster.settings.services) * 3;
    within(bound, || a.leases().len() == 32 && b.leases().len() == 32).await;
    let mut shards: Vec<u32> = a
        .leases()
        .iter()
        .chain(b.leases().iter())
        .map(|l| l.shard)
        .collect();
    shards.sort_unstable();
    shards.dedup();
    assert_eq!(shards.len(), SHARDS as usize, "every shard held once");

    let event = cluster.event(10).await;
    let owns = |node: &InventoryNode| node.leases().iter().any(|l| l.shard == shard_of(event));
    let (owner, other) = if owns(&a) { (&a, &b) } else { (&b, &a) };
    let refused = other
        .purchase(event, UserId::parse("lost").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(refused, PurchaseError::NotOwner { .. }),
        "{refused}"
    );
    owner
        .purchase(event, UserId::parse("found").unwrap())
        .await
        .expect("the owner sells (its actor starts on first use)");
    a.shutdown().await;
    b.shutdown().await;
}

#[actix_web::test]
async fn a_stampede_over_three_nodes_sells_exactly_the_capacity() {
    for seed in [1, 2, 3] {
        stampede_over_three_nodes(seed).await;
    }
}

async fn stampede_over_three_nodes(seed: u64) {
    let cluster = Cluster::new(|s| {
        s.seed = seed;
        s.payments.latency =
            LatencyModel::Uniform(Duration::from_millis(1), Duration::from_millis(10));
        s.payments.failure_rate = 0.1;
    })
    .await;
    let nodes = [
        cluster.node("n1").await,
        cluster.node("n2").await,
        cluster.node("n3").await,
    ];
    let bound = failover_bound(&cluster.settings.services) * 4;
    // A fair share is ceil(64 / 3) = 22: two nodes hold 22 and the third the 20 left.
    within(bound, || {
        let held: Vec<usize> = nodes.iter().map(|n| n.leases().len()).collect();
        held.iter().sum::<usize>() == SHARDS as usize && held.iter().all(|h| *h >= 20)
    })
    .await;
    let refs: Vec<&InventoryNode> = nodes.iter().collect();

    // One event of 30 seats on each node.
    let mut events: Vec<Option<EventId>> = vec![None; nodes.len()];
    while events.iter().any(Option::is_none) {
        let event = cluster.event(30).await;
        let owner = nodes
            .iter()
            .position(|n| n.leases().iter().any(|l| l.shard == shard_of(event)))
            .expect("every shard has an owner");
        events[owner].get_or_insert(event);
    }
    let events: Vec<EventId> = events.into_iter().flatten().collect();
    let buyers = (0..300).map(|i| {
        let event = events[i % events.len()];
        let refs = &refs;
        async move { buy(refs, event, &format!("buyer-{i}")).await }
    });
    let tickets: Vec<String> = futures::future::join_all(buyers)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(
        tickets.len(),
        90,
        "seed {seed}: exactly the capacity of the three events"
    );
    let distinct: std::collections::HashSet<&String> = tickets.iter().collect();
    assert_eq!(distinct.len(), 90, "seed {seed}: a ticket given twice");
    for node in &nodes {
        node.shutdown().await;
    }
    assert!(cluster.audit_ok().await, "seed {seed}");
}

#[actix_web::test]
async fn a_dead_nodes_shards_move_and_its_pending_purchases_are_resolved() {
    use ticketflow::store::Catalog;
    let cluster = Cluster::new(|s| {
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(400));
    })
    .await;
    let a = Arc::new(cluster.node("a").await);
    let b = cluster.node("b").await;
    let bound = failover_bound(&cluster.settings.services) * 3;
    within(bound, || a.leases().len() == 32 && b.leases().len() == 32).await;
    // An event on one of a's shards.
    let mut event = cluster.event(5).await;
    while !a.leases().iter().any(|l| l.shard == shard_of(event)) {
        event = cluster.event(5).await;
    }

    // A purchase is under way on a (seat held, payment running) when a dies.
    let buying = {
        let a = Arc::clone(&a);
        actix_rt::spawn(async move { a.purchase(event, UserId::parse("alice").unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.abandon();
    let died = Instant::now();
    let cut_short = buying.await.unwrap();
    assert!(
        matches!(cut_short, Err(PurchaseError::OwnerChanged)),
        "the dead node's confirmation was not refused by the fence: {cut_short:?}"
    );
    assert_eq!(
        cluster
            .store
            .event(event)
            .await
            .unwrap()
            .unwrap()
            .available_tickets,
        4,
        "the hold was durable before the charge"
    );

    // b takes a's shards once their leases run out, within the TTL plus one round.
    let took = within(
        failover_bound(&cluster.settings.services) + Duration::from_millis(500),
        || b.leases().len() == SHARDS as usize,
    )
    .await;
    eprintln!("failover: b held every shard {took:?} after a died");
    let first = b
        .purchase(event, UserId::parse("after-0").unwrap())
        .await
        .expect("the new owner sells");
    eprintln!(
        "failover: first purchase of a's event served by b {:?} after a died (its 400 ms payment included); ticket {}",
        died.elapsed(),
        first.id
    );

    // b resolved alice's purchase from PostgreSQL when it took the shard: charged once (the
    // gateway deduplicates on the payment key), and confirmed.
    let counts = cluster
        .store
        .event_counts()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.event == event)
        .unwrap();
    assert_eq!((counts.confirmed, counts.pending), (2, 0), "{counts:?}");
    for i in 1..4 {
        b.purchase(event, UserId::parse(&format!("after-{i}")).unwrap())
            .await
            .expect("the new owner sells");
    }
    let sold_out = b.purchase(event, UserId::parse("late").unwrap()).await;
    assert!(
        matches!(sold_out, Err(PurchaseError::SoldOut)),
        "{sold_out:?}"
    );
    b.shutdown().await;
    assert!(cluster.audit_ok().await);
}

/// The chaos runs' I3 on `services` (a confirmed order with its charge refunded), without
/// chaos timing: node a loses the shard of a purchase whose payment is slow. Its hold then
/// runs out on a's timer, and that cancellation is refused, since b holds the shard now; b has
/// found the order pending, charges its key again and confirms it once the gateway answers.
/// When a's own charge comes back approved, a finds the hold expired and must not refund:
/// the order was never cancelled in storage, and b confirms it. Refunding there (as a did)
/// leaves a confirmed order with its charge refunded.
#[actix_web::test]
async fn a_node_that_lost_the_shard_never_refunds_a_purchase_its_new_owner_confirms() {
    let cluster = Cluster::new(|s| {
        // a's payment answers after its hold has run out, and the hold runs out after b
        // has taken the shard (900 ms lease, 250 ms renewals)
        s.payments.latency = LatencyModel::Fixed(Duration::from_secs(3));
        s.hold_ttl = Duration::from_secs(2);
    })
    .await;
    let a = Arc::new(cluster.node("a").await);
    let b = cluster.node("b").await;
    let bound = failover_bound(&cluster.settings.services) * 3;
    within(bound, || a.leases().len() == 32 && b.leases().len() == 32).await;
    let mut event = cluster.event(5).await;
    while !a.leases().iter().any(|l| l.shard == shard_of(event)) {
        event = cluster.event(5).await;
    }

    let buying = {
        let a = Arc::clone(&a);
        actix_rt::spawn(async move { a.purchase(event, UserId::parse("alice").unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.abandon();
    // b's takeover resolves alice's purchase first, its 3 s charge included
    within(
        failover_bound(&cluster.settings.services) + Duration::from_secs(5),
        || b.leases().len() == SHARDS as usize,
    )
    .await;
    let answered = buying.await.unwrap();
    assert!(
        matches!(answered, Err(PurchaseError::OwnerChanged)),
        "a answers that the event moved, not that it refunded an expired hold: {answered:?}"
    );
    // b confirms alice's order once the gateway answers its charge of the same key
    let mut counts = None;
    for _ in 0..100 {
        let now = cluster
            .store
            .event_counts()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.event == event)
            .unwrap();
        if now.pending == 0 {
            counts = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = counts.expect("b settled alice's purchase");
    assert_eq!(counts.confirmed, 1, "{counts:?}");
    let refunds = cluster
        .payments
        .ledger_page(0, 1_000)
        .await
        .unwrap()
        .iter()
        .filter(|l| l.kind == ticketflow::payments::LedgerKind::Refund)
        .count();
    assert_eq!(refunds, 0, "the confirmed order's charge is never refunded");
    b.shutdown().await;
    assert!(cluster.audit_ok().await);
}

#[actix_web::test]
async fn an_inventory_node_killed_mid_stampede_is_replaced_and_nothing_acknowledged_is_lost() {
    use crate::process::{
        admin_get, assert_nothing_lost, buy_until_killed, create_event, start_inventory_node,
        start_payments_node,
    };
    const SEATS: i64 = 60;
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let _payments = start_payments_node(&db, "pay", 5, &client).await;
    let mut first = start_inventory_node(&db, "inv-1", 5, &client).await;
    let event = create_event(&client, &first.base, "Node crash", SEATS).await;

    let acknowledged = buy_until_killed(&mut first, &client, event, 150).await;
    let pending_at_crash = db
        .count("SELECT COUNT(*) FROM tickets WHERE status = 'pending'")
        .await;
    assert!(!acknowledged.is_empty(), "nothing finished before the kill");
    assert!(pending_at_crash > 0, "nothing was in flight at the kill");

    // A new node takes the dead one's shards once their leases run out (its epoch is higher),
    // and resolves what was left pending, from PostgreSQL, before it serves the shard.
    let killed = Instant::now();
    let second = start_inventory_node(&db, "inv-2", 5, &client).await;
    let answer = loop {
        let r = client
            .post(format!("{}/api/v1/tickets/purchase", second.base))
            .json(&serde_json::json!({"eventId": event, "userId": "after-the-crash"}))
            .send()
            .await
            .unwrap();
        if r.status() != 421 {
            break r.status();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the shard never moved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "node failover: first purchase answered by the new node {:?} after kill -9 ({answer})",
        killed.elapsed()
    );
    assert_nothing_lost(&db, &acknowledged).await;
    let epochs = db
        .count("SELECT MAX(epoch) FROM shard_leases WHERE owner = 'inv-2'")
        .await;
    assert!(epochs >= 2, "the new owner's epoch is above the dead one's");
    let (status, audit) = admin_get(&client, &second.base, "/api/v1/admin/audit").await;
    assert_eq!(status, 200, "{audit}");
    assert_eq!(audit["ok"], true, "{audit}");

    // The topology: the dead node down and holding nothing, the new one up with every shard.
    let (status, topology) = admin_get(&client, &second.base, "/api/v2/admin/nodes").await;
    assert_eq!(status, 200, "{topology}");
    let nodes = topology["nodes"].as_array().expect("nodes");
    let node = |id: &str| {
        nodes
            .iter()
            .find(|n| n["id"] == id)
            .unwrap_or_else(|| panic!("{id}: {topology}"))
    };
    assert_eq!(node("inv-1")["state"], "down", "{topology}");
    assert_eq!(
        node("inv-1")["shards"].as_array().unwrap().len(),
        0,
        "{topology}"
    );
    let alive = node("inv-2");
    assert_eq!(alive["state"], "up", "{topology}");
    assert_eq!(alive["role"], "inventory");
    assert_eq!(alive["pid"], second.child.id());
    assert_eq!(alive["address"], second.base.trim_start_matches("http://"));
    let shards = alive["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 64, "{topology}");
    assert!(
        shards.iter().all(|s| s["epoch"].as_i64().unwrap() >= 2),
        "{topology}"
    );
    drop(second);
}

#[actix_web::test]
async fn a_node_restarted_under_the_same_id_takes_its_shards_again_at_a_higher_epoch() {
    let cluster = Cluster::new(|_| {}).await;
    let first = cluster.node("same").await;
    within(Duration::from_secs(5), || {
        first.leases().len() == SHARDS as usize
    })
    .await;
    assert!(first.leases().iter().all(|l| l.epoch == 1));
    let event = cluster.event(3).await;
    first
        .purchase(event, UserId::parse("before").unwrap())
        .await
        .expect("the first process sells");
    // The process dies; another starts at once under the same --node-id, well within the TTL,
    // so the database still shows every lease as this id's.
    first.abandon();
    let second = cluster.node("same").await;
    // Its first round gives the leases it did not take back and takes them at a new epoch.
    assert_eq!(
        second.leases().len(),
        SHARDS as usize,
        "{:?}",
        second.leases()
    );
    assert!(
        second.leases().iter().all(|l| l.epoch == 2),
        "{:?}",
        second.leases()
    );
    second
        .purchase(event, UserId::parse("after").unwrap())
        .await
        .expect("the restarted node sells");
    second.shutdown().await;
    assert!(cluster.audit_ok().await);
}
