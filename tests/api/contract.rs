//! The API v1 contract (SPEC section 4): the seed's routes, camelCase fields and status codes,
//! and for every kind of bad input a 4xx problem document that names what was wrong and a
//! database left exactly as it was.

use reqwest::Method;
use serde_json::{json, Value};
use ticketflow::config::StageKind;

use crate::helpers::{spawn_app, Reply, TestApp};

const EVENTS: &str = "/api/v1/events";
const PURCHASE: &str = "/api/v1/tickets/purchase";

/// A create-event body the server accepts.
fn valid_event() -> Value {
    json!({
        "name": "Comedy Night",
        "venue": "The Laugh Factory",
        "date": "2026-12-31T20:00:00Z",
        "totalTickets": 100,
        "price": 25.5,
    })
}

/// `valid_event()` with `field` set to `value`.
fn event_with(field: &str, value: Value) -> Value {
    let mut body = valid_event();
    body[field] = value;
    body
}

/// `valid_event()` without `field`.
fn event_without(field: &str) -> Value {
    let mut body = valid_event();
    body.as_object_mut().unwrap().remove(field);
    body
}

/// Checks `reply` is an RFC 9457 problem document with `status` and `code`, and returns it.
fn assert_problem<'a>(reply: &'a Reply, status: u16, code: &str, context: &str) -> &'a Value {
    let body = &reply.body;
    assert_eq!(reply.status, status, "{context}: {body}");
    assert!(
        reply.content_type.starts_with("application/problem+json"),
        "{context}: content type {:?}",
        reply.content_type
    );
    assert_eq!(body["code"], code, "{context}: {body}");
    assert_eq!(body["status"], status, "{context}: {body}");
    assert_eq!(
        body["type"],
        format!("/problems/{code}"),
        "{context}: {body}"
    );
    for key in ["title", "detail"] {
        let text = body[key].as_str().unwrap_or_default();
        assert!(!text.trim().is_empty(), "{context}: no {key} in {body}");
    }
    body
}

fn detail(problem: &Value) -> &str {
    problem["detail"].as_str().unwrap()
}

/// Posts each create-event body and expects 400 with `code`, naming `hint` in the detail (and
/// `field`, for validation failures).
async fn assert_creates_rejected(app: &TestApp, cases: &[(&str, Value, &str, &str)]) {
    for (what, body, code, hint) in cases {
        let reply = app.post_json(EVENTS, body).await;
        let problem = assert_problem(&reply, 400, code, what);
        if *code == "validation-failed" {
            assert_eq!(problem["field"], *hint, "{what}: {problem}");
        }
        assert!(
            detail(problem).contains(hint),
            "{what}: the detail should name {hint:?}: {problem}"
        );
    }
}

// ---------------------------------------------------------------- happy paths

#[actix_web::test]
async fn creating_an_event_answers_201_with_its_location_and_camel_case_fields() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;

    let reply = app
        .post_json(
            EVENTS,
            &json!({
                "name": "  Comedy Night ",
                "venue": "The Laugh Factory",
                "date": "2026-12-31T21:00:00+01:00",
                "totalTickets": 100,
                "price": 49.99,
            }),
        )
        .await;

    assert_eq!(reply.status, 201, "{}", reply.body);
    assert!(reply.content_type.starts_with("application/json"));
    let event = &reply.body;
    let id = event["id"].as_i64().expect("a numeric id");
    assert!(id > 0);
    assert_eq!(
        reply.headers.get("location").unwrap(),
        &format!("/api/v1/events/{id}")
    );
    assert_eq!(event["name"], "Comedy Night", "names are trimmed");
    assert_eq!(event["venue"], "The Laugh Factory");
    assert_eq!(event["totalTickets"], 100);
    assert_eq!(event["availableTickets"], 100);
    assert_eq!(event["price"], 49.99);
    assert_eq!(event["priceCents"], 4999);
    let date = chrono::DateTime::parse_from_rfc3339(event["date"].as_str().unwrap()).unwrap();
    assert_eq!(
        date,
        chrono::DateTime::parse_from_rfc3339("2026-12-31T20:00:00Z").unwrap()
    );
    assert!(chrono::DateTime::parse_from_rfc3339(event["createdAt"].as_str().unwrap()).is_ok());
    for snake in [
        "total_tickets",
        "available_tickets",
        "price_cents",
        "created_at",
    ] {
        assert!(event.get(snake).is_none(), "{snake} leaked: {event}");
    }
    assert_eq!(app.row_counts().await, [1, 0, 0]);
    app.stop().await;
}

#[actix_web::test]
async fn the_event_list_and_a_single_event_show_what_was_created() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let (status, empty) = app.get_json(EVENTS).await;
    assert_eq!((status, empty), (200, json!([])));

    let first = app.create_event(10).await;
    let second = app.create_event(20).await;

    let (status, list) = app.get_json(EVENTS).await;
    assert_eq!(status, 200, "{list}");
    let list = list.as_array().expect("an array of events");
    let ids: Vec<i64> = list.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [first, second]);
    assert_eq!(list[1]["totalTickets"], 20);

    let (status, one) = app.get_json(&format!("{EVENTS}/{second}")).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one, list[1]);
    app.stop().await;
}

#[actix_web::test]
async fn a_purchase_confirms_a_ticket_and_takes_one_seat() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(10).await;

    let (status, ticket) = app.purchase(event, "alice").await;

    assert_eq!(status, 201, "{ticket}");
    assert_eq!(ticket["status"], "confirmed");
    assert_eq!(ticket["eventId"], event);
    assert_eq!(ticket["userId"], "alice");
    assert_eq!(ticket["price"], 25.5);
    assert_eq!(ticket["priceCents"], 2550);
    assert!(ticket["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(chrono::DateTime::parse_from_rfc3339(ticket["purchaseDate"].as_str().unwrap()).is_ok());
    let (_, after) = app.get_json(&format!("{EVENTS}/{event}")).await;
    assert_eq!(after["availableTickets"], 9);
    assert_eq!(after["totalTickets"], 10);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments WHERE status = 'completed'")
            .await,
        1
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_users_tickets_are_found_by_string_and_numeric_user_ids() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(10).await;
    let (status, alice) = app.purchase(event, "alice").await;
    assert_eq!(status, 201, "{alice}");
    let numeric = app
        .post_json(
            PURCHASE,
            &json!({ "eventId": event.to_string(), "userId": 42 }),
        )
        .await;
    assert_eq!(numeric.status, 201, "{}", numeric.body);
    assert_eq!(numeric.body["userId"], "42");

    let (status, tickets) = app.get_json("/api/v1/tickets/user/alice").await;
    assert_eq!(status, 200, "{tickets}");
    assert_eq!(tickets.as_array().unwrap().len(), 1);
    assert_eq!(tickets[0]["id"], alice["id"]);
    assert_eq!(tickets[0]["status"], "confirmed");

    let (status, tickets) = app.get_json("/api/v1/tickets/user/42").await;
    assert_eq!(status, 200, "{tickets}");
    assert_eq!(tickets.as_array().unwrap().len(), 1);
    assert_eq!(tickets[0]["id"], numeric.body["id"]);

    let (status, none) = app.get_json("/api/v1/tickets/user/nobody").await;
    assert_eq!((status, none), (200, json!([])));
    app.stop().await;
}

#[actix_web::test]
async fn the_buyer_after_the_last_seat_is_told_it_is_sold_out() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(2).await;
    assert_eq!(app.purchase(event, "alice").await.0, 201);
    assert_eq!(app.purchase(event, "bob").await.0, 201);

    let (status, problem) = app.purchase(event, "carol").await;

    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "sold-out");
    let (_, after) = app.get_json(&format!("{EVENTS}/{event}")).await;
    assert_eq!(after["availableTickets"], 0);
    assert_eq!(app.row_counts().await, [1, 2, 2]);
    let (_, carol) = app.get_json("/api/v1/tickets/user/carol").await;
    assert_eq!(carol, json!([]));
    app.stop().await;
}

#[actix_web::test]
async fn a_declined_payment_answers_402_and_returns_the_seat() {
    let app = spawn_app(StageKind::Actor, |s| s.payments.failure_rate = 1.0).await;
    let event = app.create_event(1).await;

    let reply = app
        .post_json(PURCHASE, &json!({ "eventId": event, "userId": "alice" }))
        .await;

    assert_problem(&reply, 402, "payment-declined", "declined purchase");
    let (_, after) = app.get_json(&format!("{EVENTS}/{event}")).await;
    assert_eq!(after["availableTickets"], 1, "the seat came back: {after}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments WHERE status = 'completed'")
            .await,
        0
    );
    // the one seat is still for sale, not sold out
    let (status, again) = app.purchase(event, "bob").await;
    assert_eq!(status, 402, "{again}");
    app.stop().await;
}

#[actix_web::test]
async fn the_admin_ledger_and_audit_show_each_charge_and_decline() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;
    assert_eq!(app.purchase(event, "alice").await.0, 201);

    let (status, ledger) = app.admin_json("/api/v1/admin/ledger").await;

    assert_eq!(status, 200, "{ledger}");
    let entries = ledger["entries"].as_array().expect("ledger entries");
    assert_eq!(entries.len(), 1, "{ledger}");
    assert_eq!(entries[0]["kind"], "charge");
    let audit = app.audit().await;
    assert!(audit.is_object(), "{audit}");
    app.stop().await;
}

#[actix_web::test]
async fn health_answers_200_when_the_database_answers() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;

    let (status, health) = app.get_json("/health").await;

    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["stage"], "actor");
    app.stop().await;
}

// ---------------------------------------------------------------- bad input: creating events

#[actix_web::test]
async fn malformed_json_is_rejected_and_writes_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;
    let json = Some("application/json");

    for (path, body) in [
        (EVENTS, "{"),
        (EVENTS, r#"{"name": "Show", "venue": "Hall",}"#),
        (EVENTS, "not json at all"),
        (EVENTS, ""),
        (PURCHASE, r#"{"eventId": 1, "userId": "alice""#),
        (PURCHASE, "{'eventId': 1}"),
    ] {
        let reply = app.send_raw(Method::POST, path, json, body).await;
        assert_problem(&reply, 400, "malformed-json", body);
    }
    for (path, body) in [(EVENTS, "[]"), (EVENTS, "null"), (PURCHASE, "42")] {
        let reply = app.send_raw(Method::POST, path, json, body).await;
        assert_problem(&reply, 400, "invalid-body", body);
    }
    let duplicate = format!(r#"{{"eventId": {event}, "userId": "alice", "eventId": {event}}}"#);
    let reply = app.send_raw(Method::POST, PURCHASE, json, duplicate).await;
    let problem = assert_problem(&reply, 400, "invalid-body", "duplicate field");
    assert!(
        detail(problem).contains("duplicate field `eventId`"),
        "{problem}"
    );
    // nested past serde_json's recursion limit where serde buffers the value (an untagged enum)
    let nested = format!(
        r#"{{"eventId": {}{}, "userId": "alice"}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let reply = app.send_raw(Method::POST, PURCHASE, json, nested).await;
    let problem = assert_problem(&reply, 400, "malformed-json", "deeply nested");
    assert!(detail(problem).contains("recursion limit"), "{problem}");
    let not_utf8 = b"{\"name\": \"\xff\xfe\"}".to_vec();
    let reply = app.send_raw(Method::POST, EVENTS, json, not_utf8).await;
    assert_problem(&reply, 400, "malformed-json", "invalid UTF-8");

    assert_eq!(app.row_counts().await, [1, 0, 0]);
    assert_eq!(app.purchase(event, "alice").await.0, 201, "still serving");
    app.stop().await;
}

#[actix_web::test]
async fn fields_of_the_wrong_type_are_rejected_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;

    assert_creates_rejected(
        &app,
        &[
            (
                "string totalTickets",
                event_with("totalTickets", json!("100")),
                "invalid-body",
                "expected `totalTickets` as a whole number",
            ),
            (
                "fractional totalTickets",
                event_with("totalTickets", json!(1.5)),
                "invalid-body",
                "expected `totalTickets` as a whole number",
            ),
            (
                "boolean totalTickets",
                event_with("totalTickets", json!(true)),
                "invalid-body",
                "expected `totalTickets` as a whole number",
            ),
            (
                "null totalTickets",
                event_with("totalTickets", Value::Null),
                "invalid-body",
                "expected `totalTickets` as a whole number",
            ),
            (
                "number name",
                event_with("name", json!(42)),
                "invalid-body",
                "expected `name` as a string",
            ),
            (
                "object venue",
                event_with("venue", json!({"city": "Paris"})),
                "invalid-body",
                "expected `venue` as a string",
            ),
            (
                "number date",
                event_with("date", json!(20261231)),
                "invalid-body",
                "expected `date` as a string",
            ),
            (
                "string price",
                event_with("price", json!("25.50")),
                "invalid-body",
                "expected `price` as a number",
            ),
            (
                "array price",
                event_with("price", json!([25])),
                "invalid-body",
                "expected `price` as a number",
            ),
        ],
    )
    .await;

    assert_eq!(app.row_counts().await, [0, 0, 0]);
    app.stop().await;
}

#[actix_web::test]
async fn unknown_and_missing_fields_are_rejected_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;

    assert_creates_rejected(
        &app,
        &[
            (
                "status",
                event_with("status", json!("open")),
                "invalid-body",
                "unknown field `status`",
            ),
            (
                "availableTickets",
                event_with("availableTickets", json!(1)),
                "invalid-body",
                "unknown field `availableTickets`",
            ),
            (
                "id",
                event_with("id", json!(7)),
                "invalid-body",
                "unknown field `id`",
            ),
            (
                "snake case",
                event_with("total_tickets", json!(100)),
                "invalid-body",
                "unknown field `total_tickets`",
            ),
            (
                "no name",
                event_without("name"),
                "invalid-body",
                "missing field `name`",
            ),
            (
                "no venue",
                event_without("venue"),
                "invalid-body",
                "missing field `venue`",
            ),
            (
                "no date",
                event_without("date"),
                "invalid-body",
                "missing field `date`",
            ),
            (
                "no totalTickets",
                event_without("totalTickets"),
                "invalid-body",
                "missing field `totalTickets`",
            ),
            (
                "no price",
                event_without("price"),
                "invalid-body",
                "missing field `price`",
            ),
            ("empty object", json!({}), "invalid-body", "missing field"),
        ],
    )
    .await;

    assert_eq!(app.row_counts().await, [0, 0, 0]);
    app.stop().await;
}

#[actix_web::test]
async fn zero_negative_and_absurd_ticket_counts_are_rejected_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;

    let mut cases = Vec::new();
    for total in [
        json!(0),
        json!(-1),
        json!(-100),
        json!(2_000_000),
        json!(1_000_001),
        json!(i64::MAX),
        json!(u64::MAX),
    ] {
        cases.push((
            "out-of-range totalTickets",
            event_with("totalTickets", total),
            "validation-failed",
            "totalTickets",
        ));
    }
    // An integral float is an integer (JSON Schema counts `5.0` one): 1e12 is out of range.
    cases.push((
        "integral float totalTickets out of range",
        event_with("totalTickets", json!(1e12)),
        "validation-failed",
        "totalTickets",
    ));
    // Past 2^53 a float is not an exact integer: the wrong type.
    cases.push((
        "float totalTickets past 2^53",
        event_with("totalTickets", json!(1e17)),
        "invalid-body",
        "expected `totalTickets` as a whole number",
    ));
    let huge = r#"{"name":"Show","venue":"Hall","date":"2026-12-31T20:00:00Z","totalTickets":99999999999999999999999,"price":1}"#;
    let reply = app
        .send_raw(Method::POST, EVENTS, Some("application/json"), huge)
        .await;
    let problem = assert_problem(&reply, 400, "invalid-body", "totalTickets beyond u64");
    assert!(
        detail(problem).contains("`totalTickets` as a whole number"),
        "{problem}"
    );
    assert_creates_rejected(&app, &cases).await;

    assert_eq!(app.row_counts().await, [0, 0, 0]);
    let largest = app
        .post_json(EVENTS, &event_with("totalTickets", json!(1_000_000)))
        .await;
    assert_eq!(
        largest.status, 201,
        "the limit itself is allowed: {}",
        largest.body
    );
    // Written as an integral float, a count is that integer (the document says integer, and
    // JSON Schema's integer admits 100.0).
    let float = app
        .post_json(EVENTS, &event_with("totalTickets", json!(1e2)))
        .await;
    assert_eq!(float.status, 201, "{}", float.body);
    assert_eq!(float.body["totalTickets"], 100);
    app.stop().await;
}

#[actix_web::test]
async fn negative_absurd_and_over_precise_prices_are_rejected_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;

    let mut cases = Vec::new();
    for price in [
        json!(-1),
        json!(-0.01),
        json!(1_000_000.01),
        json!(2_000_000),
        json!(1e12),
        json!(1e300),
    ] {
        cases.push((
            "out-of-range price",
            event_with("price", price),
            "validation-failed",
            "price",
        ));
    }
    for price in [json!(25.555), json!(0.001), json!(49.999)] {
        cases.push((
            "three decimals",
            event_with("price", price),
            "validation-failed",
            "price",
        ));
    }
    assert_creates_rejected(&app, &cases).await;
    let reply = app
        .post_json(EVENTS, &event_with("price", json!(1.005)))
        .await;
    assert!(
        detail(&reply.body).contains("two decimal"),
        "{}",
        reply.body
    );

    assert_eq!(app.row_counts().await, [0, 0, 0]);
    for (price, cents) in [
        (json!(0), 0),
        (json!(1_000_000), 100_000_000),
        (json!(0.1), 10),
    ] {
        let reply = app.post_json(EVENTS, &event_with("price", price)).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_eq!(reply.body["priceCents"], cents);
    }
    app.stop().await;
}

#[actix_web::test]
async fn empty_names_and_venues_and_unparseable_dates_are_rejected_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let long = "x".repeat(201);

    assert_creates_rejected(
        &app,
        &[
            (
                "empty name",
                event_with("name", json!("")),
                "validation-failed",
                "name",
            ),
            (
                "whitespace name",
                event_with("name", json!(" \t ")),
                "validation-failed",
                "name",
            ),
            (
                "201-character name",
                event_with("name", json!(long)),
                "validation-failed",
                "name",
            ),
            (
                "control character in name",
                event_with("name", json!("Show\u{0}")),
                "validation-failed",
                "name",
            ),
            (
                "empty venue",
                event_with("venue", json!("")),
                "validation-failed",
                "venue",
            ),
            (
                "whitespace venue",
                event_with("venue", json!("   ")),
                "validation-failed",
                "venue",
            ),
            (
                "empty date",
                event_with("date", json!("")),
                "validation-failed",
                "date",
            ),
            (
                "words for a date",
                event_with("date", json!("next friday")),
                "validation-failed",
                "date",
            ),
            (
                "a date without a time",
                event_with("date", json!("2026-12-31")),
                "validation-failed",
                "date",
            ),
            (
                "month 13",
                event_with("date", json!("2026-13-01T20:00:00Z")),
                "validation-failed",
                "date",
            ),
            (
                "February 30th",
                event_with("date", json!("2026-02-30T20:00:00Z")),
                "validation-failed",
                "date",
            ),
            (
                "no offset",
                event_with("date", json!("2026-12-31T20:00:00")),
                "validation-failed",
                "date",
            ),
        ],
    )
    .await;

    assert_eq!(app.row_counts().await, [0, 0, 0]);
    app.stop().await;
}

// ---------------------------------------------------------------- bad input: ids and purchases

#[actix_web::test]
async fn unknown_and_non_numeric_event_ids_in_the_path_answer_404() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;

    for id in [
        (event + 1).to_string(),
        "0".into(),
        "-1".into(),
        "abc".into(),
        "1.5".into(),
        "1e3".into(),
        "99999999999999999999999".into(),
        "%20".into(),
    ] {
        let reply = app.get(&format!("{EVENTS}/{id}")).await;
        let problem = assert_problem(&reply, 404, "unknown-event", &id);
        assert!(detail(problem).contains("no event"), "{problem}");
    }
    app.stop().await;
}

#[actix_web::test]
async fn purchases_naming_no_real_event_are_rejected_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;

    for unknown in [
        json!(event + 1),
        json!(i64::MAX),
        json!((event + 1).to_string()),
    ] {
        let reply = app
            .post_json(PURCHASE, &json!({ "eventId": unknown, "userId": "alice" }))
            .await;
        assert_problem(&reply, 404, "unknown-event", &unknown.to_string());
    }
    for invalid in [json!(0), json!(-1), json!("abc"), json!(""), json!("-3")] {
        let reply = app
            .post_json(PURCHASE, &json!({ "eventId": invalid, "userId": "alice" }))
            .await;
        let problem = assert_problem(&reply, 400, "validation-failed", &invalid.to_string());
        assert_eq!(problem["field"], "eventId");
    }
    for wrong in [
        json!(1.5),
        json!(true),
        Value::Null,
        json!([1]),
        json!({ "id": 1 }),
    ] {
        let reply = app
            .post_json(PURCHASE, &json!({ "eventId": wrong, "userId": "alice" }))
            .await;
        let problem = assert_problem(&reply, 400, "invalid-body", &wrong.to_string());
        assert!(
            detail(problem).contains("eventId must be a positive integer"),
            "{problem}"
        );
    }
    for (what, body, hint) in [
        (
            "price",
            json!({ "eventId": event, "userId": "alice", "price": 0 }),
            "unknown field `price`",
        ),
        (
            "quantity",
            json!({ "eventId": event, "userId": "alice", "quantity": 2 }),
            "unknown field `quantity`",
        ),
        (
            "no eventId",
            json!({ "userId": "alice" }),
            "missing field `eventId`",
        ),
        (
            "no userId",
            json!({ "eventId": event }),
            // UserId's own deserializer answers for a missing value too
            "userId",
        ),
        ("empty object", json!({}), "missing field"),
    ] {
        let reply = app.post_json(PURCHASE, &body).await;
        let problem = assert_problem(&reply, 400, "invalid-body", what);
        assert!(detail(problem).contains(hint), "{what}: {problem}");
    }

    assert_eq!(app.row_counts().await, [1, 0, 0]);
    let (_, after) = app.get_json(&format!("{EVENTS}/{event}")).await;
    assert_eq!(after["availableTickets"], 5);
    app.stop().await;
}

#[actix_web::test]
async fn empty_or_overlong_user_ids_are_rejected_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;
    let long = "u".repeat(500);

    for user in [
        json!(""),
        json!("   "),
        json!(long),
        json!("bad\nid"),
        json!(-3),
        json!(1.5),
        json!(true),
        Value::Null,
    ] {
        let reply = app
            .post_json(PURCHASE, &json!({ "eventId": event, "userId": user }))
            .await;
        let problem = assert_problem(&reply, 400, "invalid-body", &user.to_string());
        assert!(detail(problem).contains("userId"), "{problem}");
    }
    for user in ["%20%20", long.as_str(), "a%0Ab"] {
        let reply = app.get(&format!("/api/v1/tickets/user/{user}")).await;
        let problem = assert_problem(&reply, 400, "validation-failed", user);
        assert_eq!(problem["field"], "userId");
    }
    let reply = app.get("/api/v1/tickets/user/").await;
    assert_problem(&reply, 404, "no-such-route", "no user id");

    assert_eq!(app.row_counts().await, [1, 0, 0]);
    let (status, ok) = app.purchase(event, &"u".repeat(200)).await;
    assert_eq!(status, 201, "200 characters are allowed: {ok}");
    app.stop().await;
}

// ---------------------------------------------------------------- bad input: the HTTP envelope

#[actix_web::test]
async fn bodies_over_the_limit_answer_413_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;
    let padding = "x".repeat(20 * 1024);

    let reply = app
        .post_json(EVENTS, &event_with("name", json!(padding)))
        .await;
    assert_problem(&reply, 413, "body-too-large", "create");
    let reply = app
        .post_json(PURCHASE, &json!({ "eventId": event, "userId": padding }))
        .await;
    let problem = assert_problem(&reply, 413, "body-too-large", "purchase");
    assert!(detail(problem).contains("16384"), "{problem}");
    // chunked, with no Content-Length: the limit still holds while the body streams in
    let (status, head, body) = send_chunked(&app, EVENTS, &"y".repeat(1024), 40).await;
    assert_eq!(status, 413, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("application/problem+json"),
        "{head}"
    );
    assert!(body.contains("body-too-large"), "{body}");

    assert_eq!(app.row_counts().await, [1, 0, 0]);
    app.stop().await;
}

/// A JSON POST with `Transfer-Encoding: chunked`, written by hand (reqwest here cannot stream a
/// body): the status, the response head and body.
async fn send_chunked(
    app: &TestApp,
    path: &str,
    chunk: &str,
    chunks: usize,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for _ in 0..chunks {
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    // the server may answer and close before reading everything; what it said still counts
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

#[actix_web::test]
async fn bodies_that_are_not_declared_json_answer_415_and_write_nothing() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;
    let create = valid_event().to_string();
    let purchase = json!({ "eventId": event, "userId": "alice" }).to_string();

    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/xml"),
        None,
    ] {
        let what = format!("{content_type:?}");
        let reply = app
            .send_raw(Method::POST, EVENTS, content_type, create.clone())
            .await;
        assert_problem(&reply, 415, "unsupported-media-type", &what);
        let reply = app
            .send_raw(Method::POST, PURCHASE, content_type, purchase.clone())
            .await;
        let problem = assert_problem(&reply, 415, "unsupported-media-type", &what);
        assert!(detail(problem).contains("application/json"), "{problem}");
    }

    assert_eq!(app.row_counts().await, [1, 0, 0]);
    let reply = app
        .send_raw(
            Method::POST,
            PURCHASE,
            Some("application/json; charset=utf-8"),
            purchase,
        )
        .await;
    assert_eq!(reply.status, 201, "a charset is fine: {}", reply.body);
    app.stop().await;
}

#[actix_web::test]
async fn unknown_routes_answer_404_and_wrong_methods_405() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;

    for path in [
        "/",
        "/api/v1/nothing",
        "/api/v1/events/1/tickets",
        "/api/v1/events/",
        "/api/v3/events",
    ] {
        let reply = app.get(path).await;
        let problem = assert_problem(&reply, 404, "no-such-route", path);
        assert!(detail(problem).contains(path), "{problem}");
    }
    let event_path = format!("{EVENTS}/{event}");
    for (method, path) in [
        (Method::DELETE, EVENTS),
        (Method::PUT, EVENTS),
        (Method::POST, event_path.as_str()),
        (Method::DELETE, event_path.as_str()),
        (Method::GET, PURCHASE),
        (Method::POST, "/health"),
        (Method::POST, "/api/v1/tickets/user/alice"),
        (Method::DELETE, "/api/v1/admin/ledger"),
    ] {
        let what = format!("{method} {path}");
        let reply = app
            .send_raw(
                method,
                path,
                Some("application/json"),
                valid_event().to_string(),
            )
            .await;
        assert_problem(&reply, 405, "method-not-allowed", &what);
    }

    assert_eq!(app.row_counts().await, [1, 0, 0]);
    let (_, after) = app.get_json(&event_path).await;
    assert_eq!(after["availableTickets"], 5);
    app.stop().await;
}

// ---------------------------------------------------------------- the monolith stage

#[actix_web::test]
async fn the_monolith_serves_the_same_v1_contract() {
    let app = spawn_app(StageKind::Monolith, |_| {}).await;
    let (_, health) = app.get_json("/health").await;
    assert_eq!(health["stage"], "monolith");
    let event = app.create_event(1).await;
    let (_, listed) = app.get_json(EVENTS).await;
    assert_eq!(listed[0]["id"], event);

    let (status, ticket) = app.purchase(event, "alice").await;
    assert_eq!(status, 201, "{ticket}");
    assert_eq!(ticket["status"], "confirmed");
    let (_, after) = app.get_json(&format!("{EVENTS}/{event}")).await;
    assert_eq!(after["availableTickets"], 0);
    let reply = app
        .post_json(PURCHASE, &json!({ "eventId": event, "userId": "bob" }))
        .await;
    assert_problem(&reply, 400, "sold-out", "monolith sold out");

    let reply = app
        .post_json(PURCHASE, &json!({ "eventId": event + 1, "userId": "bob" }))
        .await;
    assert_problem(&reply, 404, "unknown-event", "monolith unknown event");
    let reply = app
        .post_json(
            PURCHASE,
            &json!({ "eventId": event, "userId": "bob", "price": 0 }),
        )
        .await;
    assert_problem(&reply, 400, "invalid-body", "monolith unknown field");
    assert_creates_rejected(
        &app,
        &[
            (
                "zero tickets",
                event_with("totalTickets", json!(0)),
                "validation-failed",
                "totalTickets",
            ),
            (
                "string totalTickets",
                event_with("totalTickets", json!("5")),
                "invalid-body",
                "expected `totalTickets` as a whole number",
            ),
        ],
    )
    .await;
    assert_eq!(app.row_counts().await, [1, 1, 1]);
    app.stop().await;
}

#[actix_web::test]
async fn the_monolith_returns_the_seat_of_a_declined_payment() {
    let app = spawn_app(StageKind::Monolith, |s| s.payments.failure_rate = 1.0).await;
    let event = app.create_event(1).await;

    let reply = app
        .post_json(PURCHASE, &json!({ "eventId": event, "userId": "alice" }))
        .await;

    assert_problem(&reply, 402, "payment-declined", "monolith declined");
    let (_, after) = app.get_json(&format!("{EVENTS}/{event}")).await;
    assert_eq!(after["availableTickets"], 1);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        0
    );
    app.stop().await;
}

#[actix_web::test]
async fn integral_floats_are_integers_in_v1_bodies_and_fractions_are_not() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;
    let purchase = |body: Value| {
        let app = &app;
        async move { app.post_json("/api/v1/tickets/purchase", &body).await }
    };
    let bought = purchase(json!({"eventId": event as f64, "userId": 7.0})).await;
    assert_eq!(bought.status, 201, "{}", bought.text);
    assert_eq!(bought.body["eventId"], event);
    assert_eq!(bought.body["userId"], "7", "the label of the integer 7");
    let fraction = purchase(json!({"eventId": event as f64 + 0.5, "userId": "u"})).await;
    assert_eq!(
        (fraction.status, fraction.body["code"].clone()),
        (400, json!("invalid-body"))
    );
    let fraction = purchase(json!({"eventId": event, "userId": 7.5})).await;
    assert_eq!(
        (fraction.status, fraction.body["code"].clone()),
        (400, json!("invalid-body"))
    );
    app.stop().await;
}
