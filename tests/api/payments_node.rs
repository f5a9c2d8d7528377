//! Stage `services`' payments node: one process runs the payment actors and writes the books;
//! the inventory nodes call it over HTTP. Real processes on a real PostgreSQL, bounded in time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ticketflow::config::ServicesSettings;
use ticketflow::domain::{EventId, Money};
use ticketflow::payments::{ChargeOutcome, LedgerKind, PaymentGateway, RefundOutcome};
use ticketflow::store::shards::shard_of;
use ticketflow::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::backends::{Backend, TestDb};
use crate::process::{
    admin_get, assert_nothing_lost, create_event, start_inventory_node, start_inventory_node_with,
    start_payments_node, Process,
};

/// Polls `ready` every 50 ms until it answers `Some`, for at most `bound`.
async fn within<T, F: std::future::Future<Output = Option<T>>>(
    bound: Duration,
    what: &str,
    mut ready: impl FnMut() -> F,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = ready().await {
            return found;
        }
        assert!(started.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shards each node of the topology holds, by node id.
fn shards_by_node(topology: &Value) -> HashMap<String, Vec<u32>> {
    topology["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["role"] == "inventory" && n["state"] == "up")
        .map(|n| {
            let shards = n["shards"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["shard"].as_u64().map(|s| s as u32))
                .collect();
            (n["id"].as_str().unwrap_or_default().to_owned(), shards)
        })
        .collect()
}

/// One v1 purchase: the status and the problem's code, if any.
async fn purchase(client: &reqwest::Client, base: &str, event: i64, user: &str) -> (u16, Value) {
    let r = client
        .post(format!("{base}/api/v1/tickets/purchase"))
        .json(&json!({"eventId": event, "userId": user}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The audit read from `base`, once nothing is under way (bounded).
async fn quiet_audit(client: &reqwest::Client, base: &str, bound: Duration) -> Value {
    within(bound, "the audit to be quiet", || async {
        let (status, audit) = admin_get(client, base, "/api/v1/admin/audit").await;
        assert_eq!(status, 200, "{audit}");
        (audit["quiet"] == true).then_some(audit)
    })
    .await
}

/// The books' own checks: no key has two answers, and the ledger is one writer's: its
/// positions run 1, 2, 3… with no gap and in the order the lines were written.
async fn assert_one_writer(db: &TestDb) {
    let doubled = db
        .count(
            "SELECT COUNT(*) FROM (SELECT payment_key FROM gateway_ledger
              WHERE kind IN ('charge', 'decline') GROUP BY payment_key HAVING COUNT(*) > 1) d",
        )
        .await;
    assert_eq!(doubled, 0, "a payment key was answered twice");
    let lines = db.count("SELECT COUNT(*) FROM gateway_ledger").await;
    let last = db
        .count("SELECT COALESCE(MAX(seq), 0) FROM gateway_ledger")
        .await;
    assert!(lines > 0, "nothing was charged");
    assert_eq!(last, lines, "gaps in the ledger: a write was refused");
    let out_of_order = db
        .count(
            "SELECT COUNT(*) FROM gateway_ledger a JOIN gateway_ledger b
                ON b.seq = a.seq + 1 WHERE b.at < a.at",
        )
        .await;
    assert_eq!(out_of_order, 0, "ledger positions out of time order");
}

#[actix_web::test]
async fn two_inventory_nodes_share_one_payments_node_and_each_key_is_charged_once() {
    const SEATS: i64 = 15;
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let payments = start_payments_node(&db, "pay-1", 21, &client).await;
    // One node is told where the payments node is, the other finds it in the node list.
    let a = start_inventory_node_with(
        &db,
        "inv-a",
        21,
        &client,
        &["--payments-url", &payments.base],
    )
    .await;
    let b = start_inventory_node(&db, "inv-b", 21, &client).await;
    let nodes: HashMap<&str, &Process> = [("inv-a", &a), ("inv-b", &b)].into();
    let held = within(
        Duration::from_secs(20),
        "the shards to split 32/32",
        || async {
            let (_, topology) = admin_get(&client, &a.base, "/api/v2/admin/nodes").await;
            let held = shards_by_node(&topology);
            (held.len() == 2 && held.values().all(|s| s.len() == 32)).then_some(held)
        },
    )
    .await;

    // Two events on each node's shards.
    let mut events: Vec<(i64, &str)> = Vec::new();
    for n in 0..100 {
        let event = create_event(&client, &a.base, &format!("Show {n}"), SEATS).await;
        let shard = shard_of(EventId(event));
        let owner = held
            .iter()
            .find(|(_, shards)| shards.contains(&shard))
            .map(|(id, _)| if id == "inv-a" { "inv-a" } else { "inv-b" })
            .expect("every shard has an owner");
        if events.iter().filter(|(_, o)| *o == owner).count() < 2 {
            events.push((event, owner));
        }
        if events.len() == 4 {
            break;
        }
    }
    assert_eq!(events.len(), 4, "four events, two per node");

    // 160 buyers for 60 seats, each at the event's owner. A shard may move under load (a
    // lease running out): a 421 sends the buyer to the other node, and a 503 owner-changed
    // leaves the purchase to its new owner, who settles it.
    let buyers = (0..160).map(|i| {
        let (event, owner) = events[i % events.len()];
        let (client, nodes) = (client.clone(), nodes.clone());
        async move {
            tokio::time::sleep(Duration::from_millis((i % 20) as u64 * 10)).await;
            let other = if owner == "inv-a" { "inv-b" } else { "inv-a" };
            let user = format!("buyer-{i}");
            for attempt in 0..20 {
                let served = if attempt % 2 == 0 { owner } else { other };
                let (status, body) = purchase(&client, &nodes[served].base, event, &user).await;
                if status != 421 {
                    return (status, body, served);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{user}: twenty 421s")
        }
    });
    let answers = futures::future::join_all(buyers).await;
    let mut sold: HashMap<&str, usize> = HashMap::new();
    let mut acknowledged = Vec::new();
    for (status, body, served) in &answers {
        match (status, body["code"].as_str()) {
            (201, _) => {
                *sold.entry(served).or_default() += 1;
                acknowledged.push(body["id"].as_str().unwrap().to_owned());
            }
            (402 | 400 | 409, _) | (503, Some("owner-changed")) => {}
            (other, _) => panic!("{served} answered {other}: {body}"),
        }
    }
    eprintln!("payments node: tickets sold per inventory node {sold:?}");
    assert!(
        sold.len() == 2,
        "both nodes sold tickets through the payments node: {sold:?}"
    );
    let declined = answers.iter().filter(|(s, _, _)| *s == 402).count();
    assert!(
        declined > 0,
        "no payment was declined: the test lost its teeth"
    );

    for base in [&a.base, &b.base] {
        let audit = quiet_audit(&client, base, Duration::from_secs(20)).await;
        assert_eq!(audit["ok"], true, "{audit}");
    }
    assert_one_writer(&db).await;
    let charges = db
        .count("SELECT COUNT(*) FROM gateway_ledger WHERE kind = 'charge'")
        .await;
    let refunds = db
        .count("SELECT COUNT(*) FROM gateway_ledger WHERE kind = 'refund'")
        .await;
    let confirmed = db
        .count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
        .await;
    assert_eq!(
        charges - refunds,
        confirmed,
        "one net charge per confirmed ticket"
    );
    assert_nothing_lost(&db, &acknowledged).await;

    // The topology shows the payments node, up, where it answers.
    let (_, topology) = admin_get(&client, &b.base, "/api/v2/admin/nodes").await;
    let node = topology["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "pay-1")
        .unwrap_or_else(|| panic!("{topology}"))
        .clone();
    assert_eq!(node["role"], "payments", "{topology}");
    assert_eq!(node["state"], "up", "{topology}");
    assert_eq!(node["pid"], payments.child.id(), "{topology}");
    assert_eq!(node["address"], payments.base.trim_start_matches("http://"));
}

#[actix_web::test]
async fn with_the_payments_node_down_purchases_answer_503_and_holds_come_back() {
    const SEATS: i64 = 20;
    const HOLD_TTL: Duration = Duration::from_secs(5);
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let mut payments = start_payments_node(&db, "pay", 22, &client).await;
    let inventory = start_inventory_node_with(&db, "inv", 22, &client, &["--hold-ttl", "5s"]).await;
    let event = create_event(&client, &inventory.base, "Payments down", SEATS).await;
    let available = || async {
        let (_, e) = admin_get(&client, &inventory.base, &format!("/api/v1/events/{event}")).await;
        e["availableTickets"].as_i64().expect("availableTickets")
    };
    let buy_one = |user: String| {
        let (client, base) = (client.clone(), inventory.base.clone());
        async move {
            // Payments are declined 30 % of the time: retry until one is approved.
            let mut last = Value::Null;
            for attempt in 0..50 {
                let (status, body) =
                    purchase(&client, &base, event, &format!("{user}-{attempt}")).await;
                match (status, body["code"].as_str()) {
                    (201, _) => return body["id"].as_str().unwrap().to_owned(),
                    (402, _) => {}
                    // The shard's lease ran out under load and is taken again.
                    (503, Some("owner-changed")) | (421, _) => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    (other, _) => panic!("{user}: {other} {body}"),
                }
                last = body;
            }
            panic!("{user}: no ticket in 50 tries; the last answer: {last}")
        }
    };
    let mut acknowledged = vec![buy_one("before".into()).await];
    let before = available().await;

    payments.child.kill().expect("SIGKILL"); // kill -9
    payments.child.wait().unwrap();
    let killed = Instant::now();
    let refused = futures::future::join_all((0..5).map(|i| {
        let (client, base) = (client.clone(), inventory.base.clone());
        async move { purchase(&client, &base, event, &format!("down-{i}")).await }
    }))
    .await;
    let answered_in = killed.elapsed();
    for (status, body) in &refused {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["code"], "dependency-unavailable", "{body}");
    }
    eprintln!("payments node down: 5 purchases answered 503 in {answered_in:?}");
    assert!(
        answered_in < HOLD_TTL,
        "the callers waited past the hold TTL"
    );
    // Their seats are held until the hold TTL, then come back; nothing was charged.
    assert_eq!(available().await, before - 5, "the five holds");
    // Bounded generously: in a full parallel run at load average 18 the seats took over
    // 10 s (the node's own rounds starved); alone they come back at the TTL.
    within(HOLD_TTL * 4, "the held seats to come back", || async {
        (available().await == before).then_some(())
    })
    .await;
    eprintln!(
        "payments node down: held seats back {:?} after the kill",
        killed.elapsed()
    );
    let charged_unconfirmed = db
        .count(
            "SELECT COUNT(*) FROM gateway_ledger l
               JOIN payments p ON p.idempotency_key = l.payment_key
               JOIN orders o ON o.id = p.order_id
              WHERE o.status <> 'confirmed' AND l.kind = 'charge'",
        )
        .await;
    assert_eq!(charged_unconfirmed, 0, "charged without a confirmed order");
    // Their payments are still unknown: the node keeps asking, and the audit waits for it.
    let (_, audit) = admin_get(&client, &inventory.base, "/api/v1/admin/audit").await;
    assert_eq!(audit["verdict"], "not-quiet", "{audit}");
    assert!(
        audit["activity"]["paymentsInFlight"].as_i64().unwrap() >= 5,
        "{audit}"
    );

    // Back up (a new port, found through the node list): the unknown payments are settled
    // (each expired hold's charge is declined or refunded), and purchases work again.
    let _payments = start_payments_node(&db, "pay", 22, &client).await;
    let restarted = Instant::now();
    let audit = quiet_audit(&client, &inventory.base, Duration::from_secs(20)).await;
    assert_eq!(audit["ok"], true, "{audit}");
    eprintln!(
        "payments node back: unknown payments settled {:?} after the restart",
        restarted.elapsed()
    );
    let unsettled = db
        .count(
            "SELECT COUNT(*) FROM payments p JOIN orders o ON o.id = p.order_id
              WHERE o.status <> 'confirmed' AND p.status NOT IN ('failed', 'refunded')",
        )
        .await;
    assert_eq!(
        unsettled, 0,
        "an unconfirmed order's payment is not settled"
    );
    acknowledged.push(buy_one("after".into()).await);
    assert_eq!(available().await, before - 1);
    assert_nothing_lost(&db, &acknowledged).await;
    assert_one_writer(&db).await;
}

/// A TCP proxy to `upstream` that, while `drops` is above zero, takes one from it per new
/// connection and drops that connection as soon as the answer begins: the request reached the
/// payments node and was answered, but the caller never hears it.
async fn dropping_proxy(upstream: String, drops: Arc<AtomicUsize>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            let drop_this = drops
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut server = TcpStream::connect(&upstream).await.unwrap();
                if !drop_this {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    return;
                }
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let forward =
                    tokio::spawn(
                        async move { tokio::io::copy(&mut from_client, &mut to_server).await },
                    );
                let mut first = [0u8; 1];
                let _ = from_server.read(&mut first).await;
                forward.abort();
                let _ = to_client.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), connections)
}

#[actix_web::test]
async fn a_charge_whose_answer_was_lost_is_retried_under_its_key_and_charged_once() {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let payments = start_payments_node(&db, "pay", 23, &client).await;
    let store = Store::open(db.url(), ticketflow::config::Durability::Normal)
        .await
        .unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let upstream = payments.base.trim_start_matches("http://").to_owned();
    let (proxy, connections) = dropping_proxy(upstream, Arc::clone(&drops)).await;
    let remote = || {
        let services = ServicesSettings {
            payments_url: Some(proxy.clone()),
            ..ServicesSettings::default()
        };
        // A fresh client each time, so the call opens a new connection for the proxy to drop.
        PaymentGateway::remote(
            &services,
            store.clone(),
            Some(crate::helpers::ADMIN_TOKEN.into()),
        )
        .unwrap()
    };
    let amount = Money::from_cents(1_500).unwrap();

    // Keys until one is approved (30 % are declined), each charged through a lost answer.
    let mut approved = None;
    for i in 0..20 {
        let key = format!("lost-answer-{i}");
        drops.store(1, Ordering::SeqCst);
        let before = connections.load(Ordering::SeqCst);
        let outcome = remote()
            .charge(&key, amount)
            .await
            .expect("the retry gets the answer the dropped connection lost");
        assert_eq!(
            drops.load(Ordering::SeqCst),
            0,
            "the first answer was dropped"
        );
        assert!(
            connections.load(Ordering::SeqCst) >= before + 2,
            "the charge was sent again"
        );
        let lines = remote().ledger_page(0, 1_000).await.unwrap();
        let mine: Vec<_> = lines.iter().filter(|l| l.key == key).collect();
        assert_eq!(mine.len(), 1, "{key}: answered once in the books: {mine:?}");
        match outcome {
            ChargeOutcome::Approved { charge_id } => {
                assert_eq!(mine[0].kind, LedgerKind::Charge);
                assert_eq!(mine[0].charge_id, Some(charge_id), "the same charge");
                approved = Some(key);
                break;
            }
            ChargeOutcome::Declined => assert_eq!(mine[0].kind, LedgerKind::Decline),
        }
    }
    let key = approved.expect("some charge was approved");

    // The refund's answer lost too: the lost attempt refunded the charge, so the retry hears
    // it was refunded already; refunded once.
    drops.store(1, Ordering::SeqCst);
    assert_eq!(
        remote().refund(&key).await.unwrap(),
        RefundOutcome::AlreadyRefunded
    );
    assert_eq!(
        drops.load(Ordering::SeqCst),
        0,
        "the first answer was dropped"
    );
    assert_eq!(
        remote().refund(&key).await.unwrap(),
        RefundOutcome::AlreadyRefunded
    );
    let refunds = remote()
        .ledger_page(0, 1_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.key == key && l.kind == LedgerKind::Refund)
        .count();
    assert_eq!(refunds, 1);
    store.close().await;
}

#[actix_web::test]
async fn a_second_payments_node_on_the_same_database_refuses_to_start() {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let _first = start_payments_node(&db, "pay-1", 24, &client).await;
    let started = Instant::now();
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_ticketflow"))
        .args([
            "node",
            "payments",
            "--node-id",
            "pay-2",
            "--lease-ttl",
            "1s",
        ])
        .args(["--renew-every", "250ms", "--bind", "127.0.0.1:0"])
        .args(["--db", db.url()])
        .args(["--admin-token", crate::helpers::ADMIN_TOKEN])
        .env("RUST_LOG", "error")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second payments node neither started nor gave up")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("payments node pay-1 is up"),
        "{stderr}"
    );
    eprintln!(
        "second payments node refused after {:?}: {last}",
        started.elapsed()
    );
}
