//! Stage `services` as it runs: `ticketflow serve --stage services` starting its nodes as real
//! processes on a real PostgreSQL, driven through the gateway, with nodes killed and paused.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};
use ticketflow::domain::EventId;
use ticketflow::store::shards::shard_of;
use ticketflow::store::Backend;

use crate::backends::TestDb;
use crate::process::{admin_get, assert_nothing_lost, create_event, start_binary_with, Process};

/// The payments of every test here unless it says otherwise: 20-400 ms, 30 % declined.
const PAYMENTS: [&str; 4] = [
    "--payment-failure-rate",
    "0.3",
    "--payment-latency",
    "20ms..400ms",
];

/// `serve --stage services` with `inventory` inventory nodes on short leases (1 s, renewed
/// every 250 ms), then `extra`; answers once the gateway does.
async fn deploy(
    db: &TestDb,
    inventory: u32,
    seed: u64,
    extra: &[&str],
    client: &reqwest::Client,
) -> Process {
    let nodes = inventory.to_string();
    let args = [
        &[
            "serve",
            "--stage",
            "services",
            "--inventory-nodes",
            &nodes,
            "--lease-ttl",
            "1s",
            "--renew-every",
            "250ms",
        ][..],
        extra,
    ]
    .concat();
    start_binary_with(&args, db, seed, client).await
}

async fn read_topology(client: &reqwest::Client, gateway: &Process) -> Value {
    let (status, topology) = admin_get(client, &gateway.base, "/api/v2/admin/nodes").await;
    assert_eq!(status, 200, "{topology}");
    topology
}

fn node<'a>(topology: &'a Value, id: &str) -> &'a Value {
    topology["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"] == id))
        .unwrap_or_else(|| panic!("no node {id}: {topology}"))
}

/// The inventory node holding `event`'s shard now, by the topology.
fn owner_of(topology: &Value, event: i64) -> Option<String> {
    let shard = shard_of(EventId(event));
    topology["nodes"].as_array()?.iter().find_map(|n| {
        let holds = n["shards"].as_array()?.iter().any(|s| s["shard"] == shard);
        (holds && n["state"] == "up").then(|| n["id"].as_str().unwrap().to_owned())
    })
}

/// Waits until every shard has an owner and each of `inventory` nodes holds some.
async fn balanced(client: &reqwest::Client, gateway: &Process, inventory: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let topology = read_topology(client, gateway).await;
        let holding: Vec<usize> = topology["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["role"] == "inventory" && n["state"] == "up")
            .map(|n| n["shards"].as_array().map_or(0, Vec::len))
            .collect();
        let unowned = topology["unownedShards"].as_array().map_or(64, Vec::len);
        if holding.len() == inventory && holding.iter().all(|n| *n > 0) && unowned == 0 {
            return topology;
        }
        assert!(
            Instant::now() < deadline,
            "the shards were never spread: {topology}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(pid: i64, signal: i32) {
    // SAFETY: kill(2) on a pid the test read from the topology of its own deployment.
    let done = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(done, 0, "signal {signal} to {pid}");
}

fn pid_of(topology: &Value, id: &str) -> i64 {
    node(topology, id)["pid"].as_i64().expect("pid")
}

/// Dead: gone, or a zombie waiting for its parent to collect it.
fn dead(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// One v1 purchase through the gateway: the status and the body.
async fn buy(client: &reqwest::Client, base: &str, event: i64, user: &str) -> (u16, Value) {
    let r = client
        .post(format!("{base}/api/v1/tickets/purchase"))
        .json(&json!({"eventId": event, "userId": user}))
        .timeout(Duration::from_secs(60))
        .send()
        .await;
    match r {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(e) => (0, json!({ "error": e.to_string() })),
    }
}

/// What one determined buyer met: the ticket it got, or the order whose outcome the gateway
/// could not learn.
#[derive(Debug, Default)]
struct Outcome {
    ticket: Option<String>,
    unresolved: Option<String>,
    answers: Vec<u16>,
}

/// Buys one ticket of `event`, trying again after a decline or a seat held by someone else,
/// until it has one or the event is sold out.
async fn determined(client: reqwest::Client, base: String, event: i64, user: String) -> Outcome {
    let mut outcome = Outcome::default();
    for _ in 0..40 {
        let (status, body) = buy(&client, &base, event, &user).await;
        outcome.answers.push(status);
        match status {
            201 => {
                outcome.ticket = body["id"].as_str().map(str::to_owned);
                return outcome;
            }
            400 if body["code"] == "sold-out" => return outcome,
            503 if body["code"] == "outcome-unknown" => {
                outcome.unresolved = body["orderId"].as_str().map(str::to_owned);
                return outcome;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    outcome
}

/// A [`determined`] buyer that must end with a ticket.
async fn must_buy(client: &reqwest::Client, base: &str, event: i64, user: &str) {
    let bought = determined(client.clone(), base.to_owned(), event, user.to_owned()).await;
    assert!(bought.ticket.is_some(), "{user}: {bought:?}");
}

/// Sends `request` and reads its answer as JSON.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Waits for the deployment to be quiet, then returns its audit.
async fn quiet_audit(client: &reqwest::Client, gateway: &Process) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, audit) = admin_get(client, &gateway.base, "/api/v1/admin/audit").await;
        assert_eq!(status, 200, "{audit}");
        if audit["quiet"] == true {
            return audit;
        }
        assert!(Instant::now() < deadline, "never quiet: {audit}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events of `seats` seats until their shards are held by at least two nodes.
async fn events_over_nodes(
    client: &reqwest::Client,
    gateway: &Process,
    topology: &Value,
    count: usize,
    seats: i64,
) -> Vec<i64> {
    let mut events = Vec::new();
    for i in 0..count {
        events.push(create_event(client, &gateway.base, &format!("Show {i}"), seats).await);
    }
    let owners: BTreeSet<String> = events
        .iter()
        .filter_map(|e| owner_of(topology, *e))
        .collect();
    assert!(
        owners.len() >= 2,
        "the events all landed on one node: {owners:?}"
    );
    events
}

#[actix_web::test]
async fn the_deployment_serves_both_apis_through_the_gateway_and_dies_with_its_parent() {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let mut deployment = deploy(&db, 2, 1, &PAYMENTS, &client).await;
    // The gateway starts once the inventory nodes hold their shares: no purchase meets a
    // shard being handed over from node to node.
    let first = read_topology(&client, &deployment).await;
    assert_eq!(first["unownedShards"], json!([]), "{first}");
    for id in ["inventory-1", "inventory-2"] {
        let held = node(&first, id)["shards"].as_array().unwrap().len();
        assert_eq!(held, 32, "{id}: {first}");
    }
    let topology = balanced(&client, &deployment, 2).await;
    for (id, role) in [
        ("catalog-1", "catalog"),
        ("gateway-1", "gateway"),
        ("inventory-1", "inventory"),
        ("inventory-2", "inventory"),
    ] {
        let n = node(&topology, id);
        assert_eq!(n["role"], role, "{topology}");
        assert_eq!(n["state"], "up", "{topology}");
        assert!(n["pid"].as_i64().unwrap() > 0);
    }
    assert_eq!(
        node(&topology, "gateway-1")["address"],
        deployment.base.trim_start_matches("http://")
    );

    // API v1, as the seed's clients call it, through the gateway.
    let event = create_event(&client, &deployment.base, "Gateway show", 5).await;
    // Which node sells it: the topology says, for one event.
    let (status, located) = admin_get(
        &client,
        &deployment.base,
        &format!("/api/v2/admin/nodes?event={event}"),
    )
    .await;
    assert_eq!(status, 200, "{located}");
    assert_eq!(
        located["event"]["shard"],
        shard_of(EventId(event)),
        "{located}"
    );
    assert_eq!(
        located["event"]["owner"].as_str(),
        owner_of(&located, event).as_deref(),
        "{located}"
    );
    let (status, refused) =
        admin_get(&client, &deployment.base, "/api/v2/admin/nodes?event=0").await;
    assert_eq!(
        (status, &refused["code"]),
        (400, &json!("validation-failed"))
    );
    let listed = json_of(client.get(format!("{}/api/events/{event}", deployment.base))).await;
    assert_eq!(listed["totalTickets"], 5, "{listed}");
    must_buy(&client, &deployment.base, event, "v1-buyer").await;

    // API v2: a user, an order, its Idempotency-Key replayed.
    let user = json_of(
        client
            .post(format!("{}/api/v2/users", deployment.base))
            .json(&json!({"name": "v2 buyer"})),
    )
    .await;
    let token = user["token"].as_str().expect("a token").to_owned();
    let order = |key: &'static str| {
        client
            .post(format!("{}/api/v2/orders", deployment.base))
            .bearer_auth(&token)
            .header("Idempotency-Key", key)
            .json(&json!({"eventId": event, "quantity": 2}))
            .send()
    };
    let first = order("k-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = order("k-1").await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"], "one order per key");
    // A `503 outcome-unknown` releases the key (the client was told nothing final), while the
    // order its try placed may be written all the same. The retry must find that order, not
    // place a second one under the key.
    db.execute(&["DELETE FROM idempotency_keys WHERE key = 'k-1'"])
        .await;
    let retried = order("k-1").await.unwrap();
    assert_eq!(retried.status(), 202);
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(first["id"], retried["id"], "{retried}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM orders WHERE idempotency_key = 'k-1'")
            .await,
        1
    );
    let audit = quiet_audit(&client, &deployment).await;
    assert_eq!(audit["ok"], true, "{audit}");

    // kill -9 of the supervisor: every node dies with it.
    let pids: Vec<i64> = topology["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].as_i64().unwrap())
        .collect();
    deployment.child.kill().unwrap();
    deployment.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|p| dead(*p)) {
        assert!(
            Instant::now() < deadline,
            "nodes outlived their parent: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stampede_through_the_gateway(seed: u64) {
    const SEATS: i64 = 15;
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let deployment = deploy(&db, 3, seed, &PAYMENTS, &client).await;
    let topology = balanced(&client, &deployment, 3).await;
    let events = events_over_nodes(&client, &deployment, &topology, 6, SEATS).await;
    let base = deployment.base.clone();
    let buyers = events.iter().flat_map(|&event| {
        let (client, base) = (client.clone(), base.clone());
        (0..(SEATS * 2)).map(move |i| {
            determined(
                client.clone(),
                base.clone(),
                event,
                format!("buyer-{event}-{i}"),
            )
        })
    });
    let outcomes = join_all(buyers).await;
    let sold = outcomes.iter().filter(|o| o.ticket.is_some()).count();
    let unresolved: Vec<_> = outcomes.iter().filter(|o| o.unresolved.is_some()).collect();
    assert!(unresolved.is_empty(), "no node died: {unresolved:?}");
    assert_eq!(
        sold as i64,
        SEATS * events.len() as i64,
        "seed {seed}: every seat sold once"
    );
    let audit = quiet_audit(&client, &deployment).await;
    assert_eq!(audit["ok"], true, "seed {seed}: {audit}");
    let confirmed = db
        .count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
        .await;
    assert_eq!(confirmed, SEATS * events.len() as i64, "seed {seed}");
}

#[actix_web::test]
async fn a_stampede_through_the_gateway_over_three_inventory_nodes_sells_exactly_the_capacity() {
    for seed in 1..=3 {
        stampede_through_the_gateway(seed).await;
    }
}

#[actix_web::test]
async fn an_inventory_node_killed_mid_stampede_loses_nothing_and_its_shards_move() {
    const SEATS: i64 = 20;
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let deployment = deploy(&db, 3, 4, &PAYMENTS, &client).await;
    let topology = balanced(&client, &deployment, 3).await;
    let events = events_over_nodes(&client, &deployment, &topology, 6, SEATS).await;
    let victim = owner_of(&topology, events[0]).expect("an owner");
    let victim_pid = pid_of(&topology, &victim);
    let doomed: Vec<i64> = events
        .iter()
        .copied()
        .filter(|e| owner_of(&topology, *e).as_deref() == Some(victim.as_str()))
        .collect();

    let base = deployment.base.clone();
    let buyers = events.iter().flat_map(|&event| {
        let (client, base) = (client.clone(), base.clone());
        (0..(SEATS * 2)).map(move |i| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                tokio::time::sleep(Duration::from_millis((i % 30) as u64 * 20)).await;
                determined(client, base, event, format!("buyer-{event}-{i}")).await
            }
        })
    });
    // The failover as a client sees it: a purchase of the dead node's event sent right after
    // the kill, answered once the gateway has found the shard's new owner.
    let killer = async {
        tokio::time::sleep(Duration::from_millis(450)).await;
        signal(victim_pid, libc::SIGKILL);
        let killed = Instant::now();
        let answer = buy(&client, &deployment.base, doomed[0], "right-after-the-kill").await;
        (answer, killed.elapsed())
    };
    let (outcomes, ((status, body), failover)) = futures::join!(join_all(buyers), killer);
    eprintln!(
        "services failover: a purchase of the dead node's event sent at its kill -9 was answered {status} by the new owner {failover:?} later"
    );
    assert!(
        [201, 400, 402].contains(&status),
        "the new owner answers: {status} {body}"
    );

    let acknowledged: Vec<String> = outcomes.iter().filter_map(|o| o.ticket.clone()).collect();
    assert!(!acknowledged.is_empty());
    let audit = quiet_audit(&client, &deployment).await;
    assert_nothing_lost(&db, &acknowledged).await;
    // An outcome the gateway could not learn in time has one by now (I7).
    for order in outcomes.iter().filter_map(|o| o.unresolved.as_ref()) {
        let pending = db
            .count(&format!(
                "SELECT COUNT(*) FROM orders WHERE id = '{order}' AND status = 'pending'"
            ))
            .await;
        assert_eq!(pending, 0, "order {order} never resolved");
    }
    assert_eq!(audit["ok"], true, "{audit}");
    let confirmed = db
        .count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
        .await;
    assert!(confirmed <= SEATS * events.len() as i64, "no oversell");

    let after = topology_after_failover(&client, &deployment, &victim).await;
    for event in &doomed {
        let owner = owner_of(&after, *event).expect("an owner");
        assert_ne!(owner, victim, "{after}");
    }
}

/// The topology once `victim` is down and holds nothing.
async fn topology_after_failover(
    client: &reqwest::Client,
    gateway: &Process,
    victim: &str,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let topology = read_topology(client, gateway).await;
        let dead = node(&topology, victim);
        if dead["state"] == "down" && dead["shards"].as_array().is_some_and(Vec::is_empty) {
            return topology;
        }
        assert!(Instant::now() < deadline, "{victim} still up: {topology}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the buyers of [`pause_past_the_lease`] were answered, and what was stored.
struct PauseRun {
    /// The buyers who asked the paused node itself, whose holds it decided but had not
    /// written when it was paused.
    late: Vec<(u16, Value)>,
    /// The buyers the new owner served, through the gateway, while the old one was paused.
    current: Vec<(u16, Value)>,
    confirmed: i64,
    audit: Value,
}

/// The schedule of a node paused past its lease, on a 5-seat event, with every inventory
/// write held back 800 ms (a failpoint) so that the pause can fall between a decision and
/// its write:
/// 1. the owner sells one seat;
/// 2. two buyers ask the owner directly; its event actor grants their holds in memory and,
///    while those wait to be written, the owner is paused (SIGSTOP);
/// 3. the other node takes the shard and, from PostgreSQL (4 seats free), sells all 4;
/// 4. the paused node goes on (SIGCONT) and its writer writes the two holds it had queued.
async fn pause_past_the_lease(fence: bool) -> PauseRun {
    const SEATS: i64 = 5;
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let mut args = vec![
        "--payment-failure-rate",
        "0",
        "--payment-latency",
        "50ms",
        "--hold-ttl",
        "5s",
        "--failpoint-delay-writes",
        "800ms",
    ];
    if !fence {
        args.push("--unsafe-no-epoch");
    }
    let deployment = deploy(&db, 2, 9, &args, &client).await;
    let topology = balanced(&client, &deployment, 2).await;
    let event = create_event(&client, &deployment.base, "Paused", SEATS).await;
    let paused = owner_of(&topology, event).expect("an owner");
    let pid = pid_of(&topology, &paused);
    let paused_base = format!(
        "http://{}",
        node(&topology, &paused)["address"].as_str().unwrap()
    );
    let sell = |base: String, user: String| {
        let client = client.clone();
        async move { buy(&client, &base, event, &user).await }
    };
    let gateway = deployment.base.clone();
    let (status, body) = sell(gateway.clone(), "early".into()).await;
    assert_eq!(status, 201, "{body}");

    let late = join_all((0..2).map(|i| sell(paused_base.clone(), format!("late-{i}"))));
    let schedule = async {
        // Pause once both holds are decided and waiting for the writer.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = json_of(
                client
                    .get(format!("{paused_base}/internal/v1/activity"))
                    .bearer_auth(crate::helpers::ADMIN_TOKEN),
            )
            .await;
            if r["ok"]["unflushedWrites"].as_i64() >= Some(2) {
                break;
            }
            assert!(Instant::now() < deadline, "the holds never queued: {r}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        signal(pid, libc::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = read_topology(&client, &deployment).await;
            if owner_of(&now, event).is_some_and(|o| o != paused) {
                break;
            }
            assert!(Instant::now() < deadline, "the shard never moved: {now}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let current = join_all((0..4).map(|i| sell(gateway.clone(), format!("current-{i}")))).await;
        signal(pid, libc::SIGCONT);
        current
    };
    let (late, current) = futures::join!(late, schedule);
    let audit = quiet_audit(&client, &deployment).await;
    let confirmed = db
        .count(&format!(
            "SELECT COUNT(*) FROM tickets WHERE event_id = {event} AND status = 'confirmed'"
        ))
        .await;
    eprintln!("fence {fence}: late {late:?}; current {current:?}");
    PauseRun {
        late,
        current,
        confirmed,
        audit,
    }
}

fn statuses(answers: &[(u16, Value)]) -> Vec<u16> {
    answers.iter().map(|(status, _)| *status).collect()
}

/// Once failed 1 of 4 CI runs with `[503, 409]`: after SIGCONT the paused node took the shard
/// back at a newer epoch (to balance the two nodes) before its writer reached the second
/// stale hold, which then passed a fence that checked the node's current epoch. Writes now
/// carry the epoch their actor decided under (`store::Stamp`).
#[actix_web::test]
async fn a_node_paused_past_its_lease_cannot_sell_again_but_without_the_epoch_check_it_does() {
    // The fence: the paused node's late holds are refused (its epoch is old), and its buyers
    // are told the event moved.
    let run = pause_past_the_lease(true).await;
    assert_eq!(statuses(&run.current), [201, 201, 201, 201]);
    assert_eq!(statuses(&run.late), [503, 503]);
    assert!(
        run.late.iter().all(|(_, b)| b["code"] == "owner-changed"),
        "{:?}",
        run.late
    );
    assert_eq!(run.confirmed, 5);
    assert_eq!(run.audit["ok"], true, "{}", run.audit);

    // Without it: the paused node writes the holds it granted from memory, for seats the new
    // owner has sold meanwhile. Nothing but the database's last line (available_tickets >= 0)
    // stops that double sale; its buyers get 409.
    let run = pause_past_the_lease(false).await;
    assert_eq!(statuses(&run.current), [201, 201, 201, 201]);
    assert_eq!(
        statuses(&run.late),
        [409, 409],
        "the stale holds reached the database: {:?}",
        run.late
    );
    assert_eq!(run.confirmed, 5, "the CHECK kept the count");
}

#[actix_web::test]
async fn with_the_catalog_down_event_reads_answer_503_and_purchases_go_on() {
    let db = TestDb::new(Backend::Postgres);
    let client = reqwest::Client::new();
    let deployment = deploy(&db, 1, 3, &PAYMENTS, &client).await;
    let event = create_event(&client, &deployment.base, "No catalog", 10).await;
    let topology = read_topology(&client, &deployment).await;
    signal(pid_of(&topology, "catalog-1"), libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    for path in [
        format!("/api/v1/events/{event}"),
        "/api/v1/events".into(),
        "/api/v2/events".into(),
    ] {
        let r = client
            .get(format!("{}{path}", deployment.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{path}");
        assert!(r.headers().contains_key("retry-after"), "{path}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["code"], "dependency-unavailable", "{problem}");
    }
    must_buy(&client, &deployment.base, event, "still-buying").await;
    assert!(Instant::now() < deadline);
    // The supervisor saw it die and marked it down.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = read_topology(&client, &deployment).await;
        if node(&now, "catalog-1")["state"] == "down" {
            break;
        }
        assert!(Instant::now() < deadline, "catalog still up: {now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_wrong_database_is_one_line_and_a_non_zero_exit_for_the_supervisor_and_a_node() {
    for args in [
        &["serve", "--stage", "services"][..],
        &["node", "inventory", "--admin-token", "t"][..],
    ] {
        let started = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ticketflow"))
            .args(args)
            .args(["--db", "postgres://postgres@127.0.0.1:1/nowhere"])
            .args(["--bind", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let last = lines.last().copied().unwrap_or_default();
        assert!(last.starts_with("error: --db"), "{args:?}: {stderr}");
        assert!(last.contains("cannot reach PostgreSQL"), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(20), "{args:?} hung");
    }
}

#[test]
fn a_node_that_fails_to_start_is_reported_by_the_supervisor_with_its_own_words() {
    let db = TestDb::new(Backend::Postgres);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ticketflow"))
        .args(["serve", "--stage", "services", "--inventory-nodes", "1"])
        .args(["--db", db.url(), "--bind", &bind, "--admin-token", "t"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the supervisor did not give up on a node that cannot start");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: node gateway-1 exited during start")
            && last.contains("cannot listen there"),
        "{stderr}"
    );
}
