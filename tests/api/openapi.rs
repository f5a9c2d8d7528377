//! The OpenAPI document: served, OpenAPI 3.1, lists every route, and real answers use the
//! status codes and content types it declares.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};
use ticketflow::api::openapi::{self, ORDER_EVENTS_PATH};
use ticketflow::config::StageKind;

use crate::helpers::{spawn_app, Reply, TestApp, ADMIN_TOKEN};

/// Every route `src/api/mod.rs` registers, as (method, path pattern).
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api"),
    ("GET", "/api/openapi.json"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/events"),
    ("POST", "/api/v1/events"),
    ("GET", "/api/v1/events/{id}"),
    ("POST", "/api/v1/tickets/purchase"),
    ("GET", "/api/v1/tickets/user/{userId}"),
    ("GET", "/api/events"),
    ("POST", "/api/events"),
    ("GET", "/api/events/{id}"),
    ("POST", "/api/tickets/purchase"),
    ("GET", "/api/tickets/user/{userId}"),
    ("GET", "/api/v1/admin/ledger"),
    ("GET", "/api/v1/admin/audit"),
    ("GET", "/api/v1/admin/stats"),
    ("GET", "/api/v2"),
    ("POST", "/api/v2/users"),
    ("GET", "/api/v2/users/me/orders"),
    ("GET", "/api/v2/users/me/tickets"),
    ("GET", "/api/v2/events"),
    ("POST", "/api/v2/events"),
    ("GET", "/api/v2/events/{id}"),
    ("GET", "/api/v2/events/{id}/availability"),
    ("POST", "/api/v2/orders"),
    ("GET", "/api/v2/orders/{id}"),
    ("GET", "/api/v2/orders/{id}/events"),
    ("GET", "/api/v2/health"),
    ("GET", "/api/v2/admin/audit"),
    ("GET", "/api/v2/admin/ledger"),
    ("GET", "/api/v2/admin/stats"),
    ("GET", "/api/v2/admin/queue-stats"),
    ("GET", "/api/v2/admin/nodes"),
];

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch"];

/// The document `app` serves.
async fn document(app: &TestApp) -> Value {
    let (status, doc) = app.get_json("/api/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    doc
}

/// The whole document, as a stage with an event log (`saga`) serves it: the others leave out
/// [`ORDER_EVENTS_PATH`] and nothing else (checked below).
fn full_document() -> Value {
    serde_json::from_str(openapi::document(true)).expect("the document is JSON")
}

/// (method, path) of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(*method).is_some() {
                found.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    found
}

fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    let op = &doc["paths"][path][method.to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not in the document");
    op
}

async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    app.send(method, path, token, key, body).await
}

/// Asserts that `reply` is an answer the document declares for (method, path): its status
/// code, and its content type (problem documents for errors).
fn assert_declared(doc: &Value, method: &str, path: &str, reply: &Reply) {
    let op = operation(doc, method, path);
    let declared = &op["responses"][reply.status.to_string()];
    assert!(
        declared.is_object(),
        "{method} {path} answered {} which the document does not declare: {}",
        reply.status,
        reply.body
    );
    let media: Vec<&String> = declared["content"]
        .as_object()
        .map(|c| c.keys().collect())
        .unwrap_or_default();
    assert!(
        media
            .iter()
            .any(|m| reply.content_type.starts_with(m.as_str())),
        "{method} {path} {}: content type {} not among {media:?}",
        reply.status,
        reply.content_type
    );
}

#[actix_web::test]
async fn the_openapi_document_is_served_as_openapi_3_1() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let reply = app.get("/api/openapi.json").await;
    assert_eq!(reply.status, 200);
    assert!(reply.content_type.starts_with("application/json"));
    let version = reply.body["openapi"].as_str().expect("an openapi field");
    assert!(version.starts_with("3.1."), "openapi is {version}");
    assert_eq!(reply.body["info"]["title"], "Ticketflow");
    // The discovery documents point at it.
    let (_, root) = app.get_json("/api").await;
    assert_eq!(root["links"]["openapi"], "/api/openapi.json");
    let (_, v2) = app.get_json("/api/v2").await;
    assert_eq!(v2["links"]["openapi"], "/api/openapi.json");
}

#[actix_web::test]
async fn the_document_lists_every_registered_route_and_nothing_else() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let mut expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(operations(&full_document()), expected);
    // A stage without an event log serves it all but the route it answers `no-event-log`.
    expected.remove(&("GET".to_owned(), ORDER_EVENTS_PATH.to_owned()));
    assert_eq!(operations(&document(&app).await), expected);

    // The list above is itself checked against the routing code: every literal path registered
    // in src/api/mod.rs is in it.
    let source = include_str!("../../src/api/mod.rs");
    let listed: BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
    for chunk in source.split("resource(\"").skip(1) {
        let path = chunk.split('"').next().unwrap();
        assert!(
            listed.contains(path),
            "{path} is registered in src/api/mod.rs but not listed"
        );
    }
}

#[actix_web::test]
async fn the_document_declares_security_and_problem_answers() {
    let doc = full_document();
    let schemes = &doc["components"]["securitySchemes"];
    for name in ["user_token", "admin_token"] {
        assert_eq!(schemes[name]["type"], "http", "{name}");
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }
    let secured = [
        ("GET", "/api/v2/users/me/orders", "user_token"),
        ("GET", "/api/v2/users/me/tickets", "user_token"),
        ("POST", "/api/v2/orders", "user_token"),
        ("GET", "/api/v2/orders/{id}", "user_token"),
        ("GET", "/api/v2/orders/{id}/events", "user_token"),
        ("POST", "/api/v2/events", "admin_token"),
        ("GET", "/api/v2/admin/audit", "admin_token"),
        ("GET", "/api/v2/admin/ledger", "admin_token"),
        ("GET", "/api/v2/admin/stats", "admin_token"),
        ("GET", "/api/v2/admin/queue-stats", "admin_token"),
        ("GET", "/api/v2/admin/nodes", "admin_token"),
    ];
    for (method, path, scheme) in secured {
        let op = operation(&doc, method, path);
        assert!(op["security"][0][scheme].is_array(), "{method} {path}");
        for status in ["401", "403"] {
            assert!(
                op["responses"][status].is_object(),
                "{method} {path} {status}"
            );
        }
    }
    for (method, path) in [("POST", "/api/v2/events"), ("POST", "/api/v2/orders")] {
        let op = operation(&doc, method, path);
        let key = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "Idempotency-Key")
            .unwrap_or_else(|| panic!("{method} {path} has no Idempotency-Key"));
        assert_eq!(key["in"], "header");
        assert_eq!(key["required"], true);
    }
    // Every error answer is a problem document; every body-taking route declares 400, 413, 415.
    for (method, path) in operations(&doc) {
        let op = operation(&doc, &method, &path);
        for (status, response) in op["responses"].as_object().unwrap() {
            if status.starts_with('4') {
                assert!(
                    response["content"]["application/problem+json"].is_object(),
                    "{method} {path} {status}"
                );
            }
        }
        if op.get("requestBody").is_some() {
            for status in ["400", "413", "415"] {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path} {status}"
                );
            }
        }
    }
}

#[actix_web::test]
async fn real_answers_use_the_status_codes_the_document_declares() {
    let app = spawn_app(StageKind::Actor, |s| s.max_body_bytes = 1024).await;
    // The whole document: the actor stage's leaves out the events route it is sent below.
    let doc = full_document();
    let event = json!({
        "name": "Comedy Night",
        "venue": "The Laugh Factory",
        "date": "2026-12-31T20:00:00Z",
        "totalTickets": 2,
        "price": 25.5,
    });
    let v2_event = json!({
        "name": "Jazz", "venue": "Blue Note", "date": "2026-12-31T20:00:00Z",
        "totalTickets": 5, "priceCents": 1000,
    });
    let admin = Some(ADMIN_TOKEN);
    let user = send(
        &app,
        Method::POST,
        "/api/v2/users",
        None,
        None,
        Some(&json!({ "name": "ada" })),
    )
    .await;
    assert_declared(&doc, "POST", "/api/v2/users", &user);
    assert_eq!(user.status, 201);
    let token = user.body["token"].as_str().unwrap().to_owned();
    let user = Some(token.as_str());

    let mut checked = vec![("POST".to_owned(), "/api/v2/users".to_owned())];
    let mut check = |method: &str, pattern: &str, reply: Reply, status: u16| {
        assert_eq!(reply.status, status, "{method} {pattern}: {}", reply.body);
        assert_declared(&doc, method, pattern, &reply);
        checked.push((method.to_owned(), pattern.to_owned()));
        reply
    };

    let blank = json!({ "name": " " });
    check(
        "POST",
        "/api/v2/users",
        send(
            &app,
            Method::POST,
            "/api/v2/users",
            None,
            None,
            Some(&blank),
        )
        .await,
        400,
    );

    // v1
    let created = check(
        "POST",
        "/api/v1/events",
        send(
            &app,
            Method::POST,
            "/api/v1/events",
            None,
            None,
            Some(&event),
        )
        .await,
        201,
    );
    let id = created.body["id"].as_i64().unwrap();
    let bad = json!({ "name": "x" });
    check(
        "POST",
        "/api/v1/events",
        send(&app, Method::POST, "/api/v1/events", None, None, Some(&bad)).await,
        400,
    );
    check(
        "POST",
        "/api/v1/events",
        app.send_raw(Method::POST, "/api/v1/events", Some("text/plain"), "{}")
            .await,
        415,
    );
    check(
        "POST",
        "/api/v1/events",
        app.send_raw(
            Method::POST,
            "/api/v1/events",
            Some("application/json"),
            format!("{{\"name\": \"{}\"}}", "x".repeat(2048)),
        )
        .await,
        413,
    );
    check(
        "GET",
        "/api/v1/events",
        app.get("/api/v1/events").await,
        200,
    );
    check(
        "GET",
        "/api/v1/events/{id}",
        app.get(&format!("/api/v1/events/{id}")).await,
        200,
    );
    check(
        "GET",
        "/api/v1/events/{id}",
        app.get("/api/v1/events/999999").await,
        404,
    );
    let purchase = json!({ "eventId": id, "userId": "u1" });
    let path = "/api/v1/tickets/purchase";
    for _ in 0..2 {
        check(
            "POST",
            path,
            send(&app, Method::POST, path, None, None, Some(&purchase)).await,
            201,
        );
    }
    check(
        "POST",
        path,
        send(&app, Method::POST, path, None, None, Some(&purchase)).await,
        400,
    );
    let unknown = json!({ "eventId": 999999, "userId": "u1" });
    check(
        "POST",
        path,
        send(&app, Method::POST, path, None, None, Some(&unknown)).await,
        404,
    );
    check(
        "GET",
        "/api/v1/tickets/user/{userId}",
        app.get("/api/v1/tickets/user/u1").await,
        200,
    );
    check(
        "GET",
        "/api/v1/tickets/user/{userId}",
        app.get("/api/v1/tickets/user/%20").await,
        400,
    );
    // the seed's unversioned paths, served as v1
    let seeded = check(
        "POST",
        "/api/events",
        send(&app, Method::POST, "/api/events", None, None, Some(&event)).await,
        201,
    );
    let seeded = seeded.body["id"].as_i64().unwrap();
    check("GET", "/api/events", app.get("/api/events").await, 200);
    check(
        "GET",
        "/api/events/{id}",
        app.get(&format!("/api/events/{seeded}")).await,
        200,
    );
    check(
        "GET",
        "/api/events/{id}",
        app.get("/api/events/999999").await,
        404,
    );
    let purchase = json!({ "eventId": seeded.to_string(), "userId": "racer_1" });
    let path = "/api/tickets/purchase";
    check(
        "POST",
        path,
        send(&app, Method::POST, path, None, None, Some(&purchase)).await,
        201,
    );
    check(
        "GET",
        "/api/tickets/user/{userId}",
        app.get("/api/tickets/user/racer_1").await,
        200,
    );
    for path in [
        "/api/v1/admin/ledger",
        "/api/v1/admin/audit",
        "/api/v1/admin/stats",
    ] {
        check("GET", path, app.get(path).await, 401);
        check(
            "GET",
            path,
            send(&app, Method::GET, path, user, None, None).await,
            403,
        );
        check(
            "GET",
            path,
            send(&app, Method::GET, path, admin, None, None).await,
            200,
        );
    }
    for path in [
        "/health",
        "/metrics",
        "/api",
        "/api/v2",
        "/api/v2/health",
        "/api/openapi.json",
    ] {
        check("GET", path, app.get(path).await, 200);
    }

    // v2 events
    let path = "/api/v2/events";
    check(
        "POST",
        path,
        send(&app, Method::POST, path, None, Some("k1"), Some(&v2_event)).await,
        401,
    );
    check(
        "POST",
        path,
        send(&app, Method::POST, path, user, Some("k1"), Some(&v2_event)).await,
        403,
    );
    check(
        "POST",
        path,
        send(&app, Method::POST, path, admin, None, Some(&v2_event)).await,
        400,
    );
    let created = check(
        "POST",
        path,
        send(&app, Method::POST, path, admin, Some("k1"), Some(&v2_event)).await,
        201,
    );
    let v2_id = created.body["id"].as_i64().unwrap();
    let other = json!({ "name": "Other", "venue": "Hall", "date": "2026-12-31T20:00:00Z",
        "totalTickets": 5, "priceCents": 1000 });
    check(
        "POST",
        path,
        send(&app, Method::POST, path, admin, Some("k1"), Some(&other)).await,
        422,
    );
    check("GET", path, app.get("/api/v2/events?limit=5").await, 200);
    check("GET", path, app.get("/api/v2/events?limit=0").await, 400);
    check("GET", path, app.get("/api/v2/events?colour=red").await, 400);
    check(
        "GET",
        "/api/v2/events/{id}",
        app.get(&format!("/api/v2/events/{v2_id}")).await,
        200,
    );
    check(
        "GET",
        "/api/v2/events/{id}",
        app.get("/api/v2/events/abc").await,
        404,
    );
    check(
        "GET",
        "/api/v2/events/{id}/availability",
        app.get("/api/v2/events/999999/availability").await,
        404,
    );

    // v2 orders and the user's views
    let path = "/api/v2/orders";
    let order = json!({ "eventId": v2_id, "quantity": 2 });
    check(
        "POST",
        path,
        send(&app, Method::POST, path, None, Some("o1"), Some(&order)).await,
        401,
    );
    check(
        "POST",
        path,
        send(&app, Method::POST, path, admin, Some("o1"), Some(&order)).await,
        403,
    );
    let placed = check(
        "POST",
        path,
        send(&app, Method::POST, path, user, Some("o1"), Some(&order)).await,
        202,
    );
    let too_many = json!({ "eventId": v2_id, "quantity": 101 });
    check(
        "POST",
        path,
        send(&app, Method::POST, path, user, Some("o2"), Some(&too_many)).await,
        400,
    );
    let unknown = json!({ "eventId": 999999, "quantity": 1 });
    check(
        "POST",
        path,
        send(&app, Method::POST, path, user, Some("o3"), Some(&unknown)).await,
        404,
    );
    let order_path = placed.headers["location"].to_str().unwrap().to_owned();
    check(
        "GET",
        "/api/v2/orders/{id}",
        send(&app, Method::GET, &order_path, user, None, None).await,
        200,
    );
    check(
        "GET",
        "/api/v2/orders/{id}",
        send(&app, Method::GET, &order_path, None, None, None).await,
        401,
    );
    check(
        "GET",
        "/api/v2/orders/{id}",
        send(&app, Method::GET, "/api/v2/orders/nope", user, None, None).await,
        404,
    );
    // The actor stage keeps no event log: its own order's events are 404 `no-event-log`.
    let events_path = format!("{order_path}/events");
    check(
        "GET",
        "/api/v2/orders/{id}/events",
        send(&app, Method::GET, &events_path, user, None, None).await,
        404,
    );
    check(
        "GET",
        "/api/v2/orders/{id}/events",
        send(&app, Method::GET, &events_path, None, None, None).await,
        401,
    );
    for path in ["/api/v2/users/me/orders", "/api/v2/users/me/tickets"] {
        check(
            "GET",
            path,
            send(&app, Method::GET, path, user, None, None).await,
            200,
        );
        check(
            "GET",
            path,
            send(&app, Method::GET, path, None, None, None).await,
            401,
        );
        check(
            "GET",
            path,
            send(&app, Method::GET, path, admin, None, None).await,
            403,
        );
    }
    for path in [
        "/api/v2/admin/audit",
        "/api/v2/admin/ledger",
        "/api/v2/admin/stats",
        "/api/v2/admin/queue-stats",
        "/api/v2/admin/nodes",
    ] {
        // The actor stage has no queue, and runs as one process (no nodes).
        let expected = if path.ends_with("queue-stats") || path.ends_with("nodes") {
            404
        } else {
            200
        };
        check(
            "GET",
            path,
            send(&app, Method::GET, path, admin, None, None).await,
            expected,
        );
        check(
            "GET",
            path,
            send(&app, Method::GET, path, user, None, None).await,
            403,
        );
        check(
            "GET",
            path,
            send(&app, Method::GET, path, None, None, None).await,
            401,
        );
    }

    // The sample reaches every operation (the endless availability stream by its 404 only).
    let reached: BTreeSet<(String, String)> = checked.into_iter().collect();
    let unreached: Vec<_> = operations(&doc).difference(&reached).cloned().collect();
    assert!(unreached.is_empty(), "not sampled: {unreached:?}");
}

#[actix_web::test]
async fn a_wrong_method_is_a_405_whose_allow_header_matches_the_document() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let doc = document(&app).await;
    for (method, path, pattern) in [
        (Method::DELETE, "/api/v1/events", "/api/v1/events"),
        (Method::PUT, "/api/v2/events/1", "/api/v2/events/{id}"),
        (Method::POST, "/health", "/health"),
    ] {
        let reply = send(&app, method.clone(), path, None, None, None).await;
        assert_eq!(reply.status, 405, "{method} {path}");
        assert!(reply.content_type.starts_with("application/problem+json"));
        let allow = reply.headers["allow"].to_str().unwrap();
        let listed: BTreeSet<String> = METHODS
            .iter()
            .filter(|m| doc["paths"][pattern].get(**m).is_some())
            .map(|m| m.to_uppercase())
            .collect();
        let allowed: BTreeSet<String> = allow.split(", ").map(str::to_owned).collect();
        assert_eq!(allowed, listed, "{method} {path}");
    }
}
