//! The availability stream: pushed from the committed writes, not polled; capped per client
//! and overall; a closed stream's place freed at once.

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::json;
use ticketflow::config::StageKind;

use crate::backends::{Backend, TestDb};
use crate::helpers::{spawn_app, TestApp};
use crate::locked::Keys;
use crate::process::{create_event, start_stage_with, Process};

const STREAMS: usize = 20;

/// `ticketflow_availability_reads_total` from the server's scrape.
async fn reads(client: &reqwest::Client, server: &Process) -> f64 {
    let text = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ticketflow_availability_reads_total "))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

async fn next_frame(stream: &mut reqwest::Response) -> String {
    let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
        .await
        .expect("a frame within 10 s")
        .unwrap()
        .expect("the stream is open");
    String::from_utf8(chunk.to_vec()).unwrap()
}

async fn idle_streams_cost_no_reads_and_a_purchase_is_pushed(
    stage: &str,
    backend: Backend,
    extra: &[&str],
) {
    let db = TestDb::new(backend);
    let client = reqwest::Client::new();
    // Payments always succeed here, so a purchase is one change (its hold) and no more.
    let extra = [extra, &["--payment-failure-rate", "0"]].concat();
    let server = start_stage_with(
        &["serve", "--stage", stage],
        &extra,
        (None, "warn"),
        &db,
        2,
        &client,
    )
    .await;
    let event = create_event(&client, &server.base, "Pushed", 10).await;
    let url = format!("{}/api/v2/events/{event}/availability", server.base);
    // Several clients' worth of streams: each source address may open 8.
    let mut streams = join_all((0..STREAMS).map(|i| {
        let source = std::net::IpAddr::from([127, 0, 1, (i / 4) as u8 + 1]);
        let client = reqwest::Client::builder()
            .local_address(source)
            .build()
            .unwrap();
        let url = url.clone();
        async move { client.get(url).send().await.unwrap() }
    }))
    .await;
    for stream in &mut streams {
        assert_eq!(stream.status(), 200);
        assert!(next_frame(stream).await.contains("\"availableTickets\":10"));
    }
    let at_start = reads(&client, &server).await;
    assert_eq!(at_start, STREAMS as f64, "one read per stream to start");
    // Idle for longer than several polls of the old stream (4 a second): no read at all.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        reads(&client, &server).await,
        at_start,
        "idle streams read the database"
    );

    let started = Instant::now();
    let r = client
        .post(format!("{}/api/v1/tickets/purchase", server.base))
        .json(&json!({"eventId": event, "userId": "pushed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for stream in &mut streams {
        let frame = next_frame(stream).await;
        assert!(frame.contains("\"availableTickets\":9"), "{frame}");
    }
    println!(
        "{stage}: {STREAMS} streams told of a purchase {} ms after it was sent",
        started.elapsed().as_millis()
    );
    let after = reads(&client, &server).await - at_start;
    assert_eq!(
        after, STREAMS as f64,
        "one read per stream for the purchase's one change"
    );
}

#[actix_rt::test]
async fn actor_idle_streams_cost_no_reads_and_a_purchase_is_pushed() {
    idle_streams_cost_no_reads_and_a_purchase_is_pushed("actor", Backend::Sqlite, &[]).await;
}

/// Stage `saga`: the stream is told by the projection's commit, fed from the log.
#[actix_rt::test]
async fn saga_idle_streams_cost_no_reads_and_a_purchase_is_pushed() {
    idle_streams_cost_no_reads_and_a_purchase_is_pushed("saga", Backend::Postgres, &[]).await;
}

#[actix_rt::test]
async fn locked_idle_streams_cost_no_reads_and_a_purchase_is_pushed() {
    let keys = Keys::new();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    idle_streams_cost_no_reads_and_a_purchase_is_pushed(
        "locked",
        Backend::Sqlite,
        &["--redis-url", &url, "--redis-prefix", &keys.prefix],
    )
    .await;
}

async fn open_from(app: &TestApp, source: [u8; 4], event: i64) -> reqwest::Response {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(source))
        .build()
        .unwrap()
        .get(app.url(&format!("/api/v2/events/{event}/availability")))
        .send()
        .await
        .unwrap()
}

#[actix_rt::test]
async fn streams_are_capped_per_client_and_overall_and_a_closed_one_frees_its_place() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.max_streams = 3;
        s.max_streams_per_client = 2;
    })
    .await;
    let event = app.create_event(5).await;
    let (a, b) = ([127, 0, 0, 1], [127, 0, 0, 2]);
    let mut a1 = open_from(&app, a, event).await;
    let a2 = open_from(&app, a, event).await;
    assert_eq!(a1.status(), 200);
    next_frame(&mut a1).await;
    let refused = open_from(&app, a, event).await;
    assert_eq!(refused.status(), 429, "past this client's cap");
    assert!(refused.headers().contains_key("retry-after"));
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "too-many-streams");

    let b1 = open_from(&app, b, event).await;
    assert_eq!(b1.status(), 200, "another client still gets one");
    let refused = open_from(&app, b, event).await;
    assert_eq!(refused.status(), 503, "past the server's cap");

    // The client hangs up: its place is free again at once (the stream is idle, so nothing
    // is being written to it when it goes).
    drop(a1);
    let closed = Instant::now();
    loop {
        let r = open_from(&app, a, event).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            closed.elapsed() < Duration::from_secs(2),
            "a closed stream still held its place after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "a closed stream's place was free {} ms after the client hung up",
        closed.elapsed().as_millis()
    );
    // A graceful stop waits for open responses: the streams go first.
    drop((a2, b1));
    app.stop().await;
}
