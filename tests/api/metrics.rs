//! `GET /metrics` after a stampede, on the real binary: the recorder is process-wide, so each
//! server here is a process of its own and its counts are its own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::json;

use crate::backends::{Backend, TestDb};
use crate::helpers::{spawn_app, ADMIN_TOKEN};
use crate::locked::Keys;
use crate::process::{admin_get, create_event, start_stage_with, Process};
use ticketflow::config::StageKind;

const SEATS: i64 = 40;
const BUYERS: usize = 160;

/// One sample of the Prometheus text format: its name, labels and value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value
                    .parse()
                    .unwrap_or_else(|_| panic!("value of `{line}`")),
            }
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn has(samples: &[Sample], name: &str) -> bool {
    samples.iter().any(|s| s.name == name)
}

async fn scrape(client: &reqwest::Client, server: &Process) -> (String, Vec<Sample>) {
    let r = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "/metrics on loopback is open");
    let text = r.text().await.unwrap();
    let samples = parse(&text);
    (text, samples)
}

/// Waits until the audit says nothing is in flight, so storage holds every outcome.
async fn wait_quiet(client: &reqwest::Client, server: &Process) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, audit) = admin_get(client, &server.base, "/api/v1/admin/audit").await;
        if audit["quiet"] == true {
            assert_eq!(audit["ok"], true, "{audit}");
            return;
        }
        assert!(Instant::now() < deadline, "never quiet: {audit}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `BUYERS` buyers race for `SEATS` seats (30 % of payments declined); then the scrape must
/// agree with what storage holds.
async fn stampede_then_scrape(stage: &str, extra: &[&str]) {
    let db = TestDb::new(Backend::Sqlite);
    let client = reqwest::Client::new();
    let command = ["serve", "--stage", stage];
    // A later --rate-limit wins: account creation is limited, to see the 429 counter.
    let extra = [extra, &["--rate-limit", "accounts=2/min"]].concat();
    let server = start_stage_with(&command, &extra, (None, "warn"), &db, 5, &client).await;
    let event = create_event(&client, &server.base, "Metrics", SEATS).await;

    let answers = join_all((0..BUYERS).map(|i| {
        let client = client.clone();
        let url = format!("{}/api/v1/tickets/purchase", server.base);
        async move {
            client
                .post(url)
                .json(&json!({"eventId": event, "userId": format!("buyer-{i}")}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    }))
    .await;
    let created = answers.iter().filter(|s| **s == 201).count();
    let refused_400 = answers.iter().filter(|s| **s == 400).count();
    // Paths no route matches, each different: they must all share one label.
    for i in 0..3 {
        let r = client
            .get(format!(
                "{}/no-such-{i}-{}",
                server.base,
                uuid::Uuid::new_v4()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    // Four accounts from one address under accounts=2/min: two are answered 429.
    let mut limited = 0;
    for _ in 0..4 {
        let r = client
            .post(format!("{}/api/v2/users", server.base))
            .json(&json!({"name": "m"}))
            .send()
            .await
            .unwrap();
        limited += usize::from(r.status() == 429);
    }
    assert_eq!(limited, 2, "accounts=2/min lets two of four through");
    wait_quiet(&client, &server).await;

    let (text, samples) = scrape(&client, &server).await;
    // The scrape's purchase, payment and limit lines, for the record (`--nocapture`).
    for line in text.lines().filter(|l| {
        [
            "ticketflow_purchases_total",
            "ticketflow_payments_total",
            "ticketflow_holds_expired_total",
            "ticketflow_rate_limited_total",
            "ticketflow_queue_depth",
            "ticketflow_event_mailbox_depth",
        ]
        .iter()
        .any(|n| l.starts_with(n))
            || (l.starts_with("ticketflow_http_requests_total") && l.contains("purchase"))
    }) {
        println!("{stage} scrape: {line}");
    }
    let confirmed_db = db
        .count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
        .await;
    let declined_db = db
        .count("SELECT COUNT(*) FROM orders WHERE status = 'cancelled' AND cancel_reason = 'payment_declined'")
        .await;
    let expired_db = db
        .count("SELECT COUNT(*) FROM orders WHERE status = 'cancelled' AND cancel_reason = 'hold_expired'")
        .await;
    println!(
        "{stage}: {created} answered 201, {refused_400} answered 400, {confirmed_db} confirmed and {declined_db} declined in storage"
    );
    // The stampede is one: some bought, some were declined, some found it sold out.
    assert!(
        confirmed_db > 0 && declined_db > 0 && refused_400 > 0,
        "{answers:?}"
    );
    assert_eq!(
        created as i64, confirmed_db,
        "each 201 is one confirmed ticket"
    );

    let confirmed = sum(
        &samples,
        "ticketflow_purchases_total",
        &[("stage", stage), ("outcome", "confirmed")],
    );
    assert_eq!(
        confirmed, confirmed_db as f64,
        "purchases_total{{outcome=confirmed}} against storage\n{text}"
    );
    let declined = sum(
        &samples,
        "ticketflow_purchases_total",
        &[("stage", stage), ("outcome", "declined")],
    );
    assert_eq!(
        declined, declined_db as f64,
        "declined against storage\n{text}"
    );
    let expired = sum(
        &samples,
        "ticketflow_purchases_total",
        &[("outcome", "hold_expired")],
    );
    assert_eq!(expired, expired_db as f64, "hold_expired against storage");
    assert_eq!(
        sum(&samples, "ticketflow_holds_expired_total", &[]),
        expired_db as f64
    );
    let refused: f64 = ["sold_out", "not_enough", "all_held"]
        .iter()
        .map(|o| sum(&samples, "ticketflow_purchases_total", &[("outcome", o)]))
        .sum();
    assert_eq!(
        refused, refused_400 as f64,
        "every 400 was a refusal counted once\n{text}"
    );

    let route = "/api/v1/tickets/purchase";
    let http = |status: &str| {
        sum(
            &samples,
            "ticketflow_http_requests_total",
            &[("route", route), ("method", "POST"), ("status", status)],
        )
    };
    assert_eq!(http("201"), created as f64, "{text}");
    assert_eq!(http("400"), refused_400 as f64);
    assert_eq!(
        sum(
            &samples,
            "ticketflow_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        3.0,
        "{text}"
    );
    assert!(
        !text.contains("no-such-"),
        "an unmatched path became a label"
    );
    assert_eq!(
        sum(
            &samples,
            "ticketflow_http_request_duration_seconds_count",
            &[("route", route)]
        ),
        BUYERS as f64
    );
    // One charge per purchase that reached payment: confirmed plus declined.
    let charges = sum(&samples, "ticketflow_payments_total", &[]);
    assert_eq!(charges, (confirmed_db + declined_db) as f64, "{text}");
    assert_eq!(
        sum(&samples, "ticketflow_payment_duration_seconds_count", &[]),
        charges
    );
    assert_eq!(
        sum(
            &samples,
            "ticketflow_purchase_duration_seconds_count",
            &[("stage", stage)]
        ),
        BUYERS as f64
    );
    assert_eq!(
        sum(
            &samples,
            "ticketflow_rate_limited_total",
            &[("limit", "accounts")]
        ),
        2.0
    );
    match stage {
        "actor" => {
            assert!(
                has(&samples, "ticketflow_writer_batch_size_count"),
                "{text}"
            );
            assert!(
                sum(&samples, "ticketflow_writer_batch_size_sum", &[])
                    >= (created + declined_db as usize) as f64
            );
            assert_eq!(
                sum(&samples, "ticketflow_event_mailbox_depth", &[]),
                0.0,
                "quiet: no reservation waits"
            );
        }
        "locked" => {
            assert!(
                sum(&samples, "ticketflow_lock_wait_seconds_count", &[]) > 0.0,
                "{text}"
            );
            assert_eq!(
                sum(&samples, "ticketflow_queue_depth", &[("state", "waiting")]),
                0.0,
                "{text}"
            );
            assert!(has(&samples, "ticketflow_queue_depth"), "{text}");
        }
        _ => unreachable!(),
    }
}

#[actix_rt::test]
async fn actor_purchases_confirmed_in_metrics_equal_confirmed_tickets_in_storage() {
    stampede_then_scrape("actor", &[]).await;
}

#[actix_rt::test]
async fn locked_purchases_confirmed_in_metrics_equal_confirmed_tickets_in_storage() {
    let keys = Keys::new();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    stampede_then_scrape(
        "locked",
        &["--redis-url", &url, "--redis-prefix", &keys.prefix],
    )
    .await;
}

#[actix_rt::test]
async fn metrics_off_loopback_need_the_admin_token() {
    // Bound to every address, not only loopback: the scrape is an admin route.
    let app = spawn_app(StageKind::Actor, |s| s.bind = "0.0.0.0:0".parse().unwrap()).await;
    let status = |r: reqwest::Response| r.status().as_u16();
    let url = app.url("/metrics");
    assert_eq!(status(app.client.get(&url).send().await.unwrap()), 401);
    let user = app
        .post_json("/api/v2/users", &json!({"name": "not admin"}))
        .await;
    let token = user.body["token"]
        .as_str()
        .expect("a user token")
        .to_owned();
    assert_eq!(
        status(
            app.client
                .get(&url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
        ),
        403
    );
    let r = app
        .client
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("ticketflow_http_requests_total"), "{text}");
}
