//! The log of the real binary sent to a file: no colour codes, and in JSON each request's
//! lines carry its ids.

use std::fs::File;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::backends::{Backend, TestDb};
use crate::process::{create_event, start_stage_with, Process};

/// Debug for the server's own lines (each request's `answered` line), info for the rest.
const FILTER: &str = "info,ticketflow=debug";

fn log_file() -> (tempfile::TempPath, File) {
    let path = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let file = File::create(&path).unwrap();
    (path, file)
}

/// Stops the server and reads what it logged, after its last line is written.
fn read_log(server: Process, path: &std::path::Path) -> String {
    drop(server);
    std::fs::read_to_string(path).unwrap()
}

/// Waits until the log holds a line with `needle`: the `answered` line is written after the
/// answer is sent.
async fn wait_for(path: &std::path::Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(path).unwrap().contains(needle) {
        assert!(Instant::now() < deadline, "the log never had `{needle}`");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn a_log_sent_to_a_file_has_no_colour_codes() {
    let db = TestDb::new(Backend::Sqlite);
    let client = reqwest::Client::new();
    let (path, file) = log_file();
    let server = start_stage_with(
        &["serve", "--stage", "actor"],
        &[],
        (Some(Stdio::from(file)), FILTER),
        &db,
        1,
        &client,
    )
    .await;
    let event = create_event(&client, &server.base, "Plain", 5).await;
    let r = client
        .post(format!("{}/api/v1/tickets/purchase", server.base))
        .json(&json!({"eventId": event, "userId": "plain"}))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    wait_for(&path, &id).await;
    let log = read_log(server, &path);
    assert!(log.contains("listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "an ANSI escape in a log written to a file:\n{log}"
    );
    // The request's line names it, and its event and user.
    let line = log.lines().find(|l| l.contains(&id)).unwrap();
    assert!(line.contains(&format!("event_id={event}")), "{line}");
    assert!(line.contains("user_id=plain"), "{line}");
}

#[actix_rt::test]
async fn json_log_lines_carry_the_request_event_order_and_user_ids() {
    let db = TestDb::new(Backend::Sqlite);
    let client = reqwest::Client::new();
    let (path, file) = log_file();
    let server = start_stage_with(
        &["serve", "--stage", "actor"],
        &["--log-format", "json"],
        (Some(Stdio::from(file)), FILTER),
        &db,
        1,
        &client,
    )
    .await;
    let event = create_event(&client, &server.base, "Json", 5).await;

    // API v1: the client's own request id is kept.
    let r = client
        .post(format!("{}/api/v1/tickets/purchase", server.base))
        .header("X-Request-Id", "client-chosen-1")
        .json(&json!({"eventId": event, "userId": "json-buyer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-chosen-1");

    // API v2: a user and an order; the order's id is known only once it is placed.
    let user: Value = client
        .post(format!("{}/api/v2/users", server.base))
        .json(&json!({"name": "json"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = user["token"].as_str().unwrap();
    let r = client
        .post(format!("{}/api/v2/orders", server.base))
        .bearer_auth(token)
        .header("Idempotency-Key", "json-order-1")
        .json(&json!({"eventId": event, "quantity": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let order_request = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let order: Value = r.json().await.unwrap();
    wait_for(&path, &order_request).await;

    let log = read_log(server, &path);
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!log.contains('\u{1b}'));
    let answered = |request: &str| {
        lines
            .iter()
            .find(|l| l["span"]["request_id"] == request && l["fields"]["message"] == "answered")
            .unwrap_or_else(|| panic!("no `answered` line of request {request}:\n{log}"))
            .clone()
    };
    let v1 = answered("client-chosen-1");
    assert_eq!(v1["span"]["event_id"], event.to_string(), "{v1}");
    assert_eq!(v1["span"]["user_id"], "json-buyer", "{v1}");
    assert_eq!(v1["fields"]["status"], 201, "{v1}");

    let v2 = answered(&order_request);
    assert_eq!(v2["span"]["event_id"], event.to_string(), "{v2}");
    assert_eq!(v2["span"]["order_id"], order["id"], "{v2}");
    let user_id = v2["span"]["user_id"].as_str().unwrap_or_default();
    assert!(user_id.starts_with("v2:"), "{v2}");
}
