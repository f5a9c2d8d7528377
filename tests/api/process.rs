//! The real `ticketflow` binary as a child process, for tests that `kill -9` it.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;

use serde_json::{json, Value};

use crate::backends::TestDb;

/// A running server process; killed when dropped, so a failing test leaves none behind.
pub struct Process {
    pub child: Child,
    pub base: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary on `db` (stage `actor`), payments of 20-400 ms with 30 % declined, outcomes
/// drawn from `seed`; answers once `GET /health` does.
pub async fn start_server(db: &TestDb, seed: u64, client: &reqwest::Client) -> Process {
    start_binary(&["serve", "--stage", "actor"], db, seed, client).await
}

/// `ticketflow node inventory --node-id ID` on `db` (stage `services`, PostgreSQL), with
/// short leases (1 s, renewed every 250 ms). Its payments go to the payments node it finds
/// in the database's node list ([`start_payments_node`]).
pub async fn start_inventory_node(
    db: &TestDb,
    id: &str,
    seed: u64,
    client: &reqwest::Client,
) -> Process {
    start_inventory_node_with(db, id, seed, client, &[]).await
}

/// [`start_inventory_node`] with `extra` arguments (`--hold-ttl 2s`, `--payments-url URL`).
pub async fn start_inventory_node_with(
    db: &TestDb,
    id: &str,
    seed: u64,
    client: &reqwest::Client,
    extra: &[&str],
) -> Process {
    let args = ["node", "inventory", "--node-id", id, "--lease-ttl", "1s"];
    start_binary(
        &[&args[..], &["--renew-every", "250ms"], extra].concat(),
        db,
        seed,
        client,
    )
    .await
}

/// `ticketflow node payments --node-id ID` on `db`: the payment actors and their books, with
/// the payments of [`start_server`], reported in the node list every 250 ms (up for 1 s).
pub async fn start_payments_node(
    db: &TestDb,
    id: &str,
    seed: u64,
    client: &reqwest::Client,
) -> Process {
    let args = ["node", "payments", "--node-id", id, "--lease-ttl", "1s"];
    start_binary(
        &[&args[..], &["--renew-every", "250ms"]].concat(),
        db,
        seed,
        client,
    )
    .await
}

/// The binary run with `command` (its first arguments) on `db`, payments of 20-400 ms with
/// 30 % declined, outcomes drawn from `seed`; answers once `GET /health` does.
async fn start_binary(
    command: &[&str],
    db: &TestDb,
    seed: u64,
    client: &reqwest::Client,
) -> Process {
    start_stage_with(command, &[], (None, "warn"), db, seed, client).await
}

/// [`start_binary`] with `extra` arguments after the usual ones (a later flag wins, e.g.
/// `--rate-limit`; a payment default is left out when `extra` gives the same flag), and the
/// server's log (`stderr`, filtered by `RUST_LOG`) sent where `log` says (`None`: nowhere, or
/// to `$TF_TEST_LOGS/PORT.log` when that is set).
pub async fn start_stage_with(
    command: &[&str],
    extra: &[&str],
    log: (Option<Stdio>, &str),
    db: &TestDb,
    seed: u64,
    client: &reqwest::Client,
) -> Process {
    let defaults = [
        ["--payment-failure-rate", "0.3"],
        ["--payment-latency", "20ms..400ms"],
    ];
    let mut args: Vec<&str> = command.to_vec();
    args.extend(
        defaults
            .iter()
            .filter(|[flag, _]| !extra.contains(flag))
            .flatten()
            .copied(),
    );
    spawn(&args, extra, log, db, seed, client).await
}

/// The binary run with `args` on `db` (the payment settings among them), outcomes drawn
/// from `seed`; answers once `GET /health` does.
pub async fn start_binary_with(
    args: &[&str],
    db: &TestDb,
    seed: u64,
    client: &reqwest::Client,
) -> Process {
    spawn(args, &[], (None, "warn"), db, seed, client).await
}

/// Starts the binary with `args`, then the test settings, then `last` (which can override
/// them), logging as `log` says; answers once `GET /health` does.
async fn spawn(
    args: &[&str],
    last: &[&str],
    log: (Option<Stdio>, &str),
    db: &TestDb,
    seed: u64,
    client: &reqwest::Client,
) -> Process {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_ticketflow"))
        .args(args)
        .args(["--seed", &seed.to_string()])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args(["--db", db.url()])
        .args(["--admin-token", crate::helpers::ADMIN_TOKEN])
        // The buyers all come from loopback: measure the stage, not the limiter.
        .args(["--rate-limit", "off"])
        .args(last)
        .env("RUST_LOG", log.1)
        .stdout(Stdio::null())
        .stderr(match (log.0, std::env::var_os("TF_TEST_LOGS")) {
            (Some(sink), _) => sink,
            (None, Some(dir)) => Stdio::from(
                std::fs::File::create(std::path::Path::new(&dir).join(format!("{port}.log")))
                    .unwrap(),
            ),
            (None, None) => Stdio::null(),
        })
        .spawn()
        .expect("the ticketflow binary starts");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Process { child, base }
}

/// Creates an event of `seats` tickets through API v1 and returns its id.
pub async fn create_event(client: &reqwest::Client, base: &str, name: &str, seats: i64) -> i64 {
    let created: Value = client
        .post(format!("{base}/api/v1/events"))
        .json(
            &json!({"name": name, "venue": "Lab", "date": "2026-12-31T20:00:00Z",
                      "totalTickets": seats, "price": 10}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_i64().expect("the event's id")
}

/// `buyers` v1 purchases of `event`, released in waves of 20 ms, while the server is
/// `kill -9`ed 450 ms in: payments take up to 400 ms, so at the kill some purchases are
/// acknowledged, some held and in payment, some not yet begun. Returns the ids of the tickets
/// the server acknowledged (`201`) before it died.
pub async fn buy_until_killed(
    server: &mut Process,
    client: &reqwest::Client,
    event: i64,
    buyers: usize,
) -> Vec<String> {
    let base = Arc::new(server.base.clone());
    let purchases = (0..buyers).map(|i| {
        let (client, base) = (client.clone(), Arc::clone(&base));
        async move {
            tokio::time::sleep(Duration::from_millis((i % 30) as u64 * 20)).await;
            let answer = client
                .post(format!("{base}/api/v1/tickets/purchase"))
                .json(&json!({"eventId": event, "userId": format!("buyer-{i}")}))
                .send()
                .await;
            match answer {
                Ok(r) if r.status() == 201 => {
                    let ticket: Value = r.json().await.ok()?;
                    ticket["id"].as_str().map(str::to_owned)
                }
                _ => None,
            }
        }
    });
    let killer = async {
        tokio::time::sleep(Duration::from_millis(450)).await;
        server.child.kill().expect("SIGKILL"); // kill -9
        server.child.wait().unwrap();
    };
    let (outcomes, ()) = futures::join!(join_all(purchases), killer);
    outcomes.into_iter().flatten().collect()
}

/// After a crash and a restart: every ticket in `acknowledged` (answered `201` before the
/// crash) is confirmed, and no ticket or payment is left `pending`.
pub async fn assert_nothing_lost(db: &TestDb, acknowledged: &[String]) {
    for ticket in acknowledged {
        let n = db
            .count(&format!(
                "SELECT COUNT(*) FROM tickets WHERE id = '{ticket}' AND status = 'confirmed'"
            ))
            .await;
        assert_eq!(n, 1, "acknowledged ticket {ticket} was lost");
    }
    for table in ["tickets", "payments"] {
        let pending = db
            .count(&format!(
                "SELECT COUNT(*) FROM {table} WHERE status = 'pending'"
            ))
            .await;
        assert_eq!(pending, 0, "{table} left pending");
    }
}

/// `GET base+path` with the admin token: the status and the JSON body.
pub async fn admin_get(client: &reqwest::Client, base: &str, path: &str) -> (u16, Value) {
    let r = client
        .get(format!("{base}{path}"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}
