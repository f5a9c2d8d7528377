//! API v2 on the actor stage: orders answered 202, Idempotency-Key, tokens and authorization,
//! searchable events, the availability stream.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use ticketflow::config::{LatencyModel, StageKind};

use crate::backends::{on_both_backends, Backend};
use crate::helpers::{spawn_app, spawn_app_on, Reply, TestApp, ADMIN_TOKEN};

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    app.send(method, path, token, key, body).await
}

async fn new_user(app: &TestApp, name: &str) -> String {
    let reply = send(
        app,
        reqwest::Method::POST,
        "/api/v2/users",
        None,
        None,
        Some(&json!({ "name": name })),
    )
    .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body.clone());
    reply.body.clone()["token"].as_str().unwrap().to_owned()
}

async fn order(app: &TestApp, token: &str, key: &str, event: i64, quantity: i64) -> Reply {
    send(
        app,
        reqwest::Method::POST,
        "/api/v2/orders",
        Some(token),
        Some(key),
        Some(&json!({ "eventId": event, "quantity": quantity })),
    )
    .await
}

async fn admin_event(app: &TestApp, key: &str, body: Value) -> Reply {
    send(
        app,
        reqwest::Method::POST,
        "/api/v2/events",
        Some(ADMIN_TOKEN),
        Some(key),
        Some(&body),
    )
    .await
}

fn event_body(name: &str, venue: &str, date: &str, total: i64, price_cents: i64) -> Value {
    json!({ "name": name, "venue": venue, "date": date, "totalTickets": total, "priceCents": price_cents })
}

/// Polls an order until it leaves `pending`.
async fn settled(app: &TestApp, token: &str, location: &str) -> Value {
    for _ in 0..200 {
        let reply = send(app, reqwest::Method::GET, location, Some(token), None, None).await;
        assert_eq!(reply.status, 200);
        if reply.body.clone()["status"] != "pending" {
            return reply.body.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("order {location} never settled");
}

#[actix_web::test]
async fn an_order_is_accepted_with_a_status_url_and_confirms_in_the_background() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(50))
    })
    .await;
    let event = app.create_event(10).await;
    let alice = new_user(&app, "alice").await;

    let reply = order(&app, &alice, "order-1", event, 3).await;

    assert_eq!(reply.status, 202, "{:?}", reply.body.clone());
    let body = reply.body.clone();
    assert_eq!(body["status"], "pending");
    assert_eq!(body["quantity"], 3);
    assert_eq!(body["amountCents"], 3 * 2550);
    assert_eq!(body["tickets"].as_array().unwrap().len(), 3);
    let location = reply.headers["location"].to_str().unwrap().to_owned();
    assert_eq!(location, body["links"]["self"].as_str().unwrap());
    let done = settled(&app, &alice, &location).await;
    assert_eq!(done["status"], "confirmed");
    let (_, event_now) = app.get_json(&format!("/api/v2/events/{event}")).await;
    assert_eq!(event_now["availableTickets"], 7);
    let mine = send(
        &app,
        reqwest::Method::GET,
        "/api/v2/users/me/tickets",
        Some(&alice),
        None,
        None,
    )
    .await;
    assert_eq!(mine.body.clone()["items"].as_array().unwrap().len(), 3);
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

on_both_backends!(
    a_retry_storm_makes_one_order_and_one_charge_and_every_replay_is_identical,
    retry_storm
);

async fn retry_storm(backend: Backend) {
    let app = spawn_app_on(backend, StageKind::Actor, |s| {
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(30))
    })
    .await;
    let event = app.create_event(10).await;
    let bob = new_user(&app, "bob").await;

    // three at once ...
    let first_three = join_all((0..3).map(|_| order(&app, &bob, "storm-key", event, 2))).await;
    // ... and two after the answer
    let later = [
        order(&app, &bob, "storm-key", event, 2).await,
        order(&app, &bob, "storm-key", event, 2).await,
    ];

    let accepted: Vec<&Reply> = first_three
        .iter()
        .chain(&later)
        .filter(|r| r.status == 202)
        .collect();
    assert!(
        first_three
            .iter()
            .all(|r| r.status == 202 || r.status == 409),
        "{:?}",
        first_three.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for busy in first_three.iter().filter(|r| r.status == 409) {
        assert_eq!(busy.body.clone()["code"], "idempotency-key-in-use");
        assert!(busy.headers.contains_key("retry-after"));
    }
    let original = accepted
        .iter()
        .find(|r| !r.headers.contains_key("idempotent-replayed"))
        .expect("one original answer");
    for replay in &later {
        assert_eq!(replay.status, 202);
        assert_eq!(replay.headers["idempotent-replayed"], "true");
        assert_eq!(
            replay.text, original.text,
            "a replay differs from the original answer"
        );
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM tickets").await, 2);
    let location = original.headers["location"].to_str().unwrap().to_owned();
    settled(&app, &bob, &location).await;
    let (_, ledger) = app.admin_json("/api/v1/admin/ledger").await;
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 1, "{ledger}");
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

on_both_backends!(
    idempotency_key_misuse_gets_the_documented_codes_and_writes_nothing,
    key_misuse
);

async fn key_misuse(backend: Backend) {
    let app = spawn_app_on(backend, StageKind::Actor, |_| {}).await;
    let event = app.create_event(10).await;
    let carol = new_user(&app, "carol").await;
    let body = json!({ "eventId": event, "quantity": 1 });
    let post = |key: Option<String>, body: Value| {
        let (app, carol) = (&app, carol.clone());
        async move {
            send(
                app,
                reqwest::Method::POST,
                "/api/v2/orders",
                Some(&carol),
                key.as_deref(),
                Some(&body),
            )
            .await
        }
    };

    let missing = post(None, body.clone()).await;
    assert_eq!(
        (missing.status, missing.body.clone()["code"].clone()),
        (400, json!("idempotency-key-missing"))
    );
    let empty = post(Some(String::new()), body.clone()).await;
    assert_eq!(
        (empty.status, empty.body.clone()["code"].clone()),
        (400, json!("idempotency-key-invalid"))
    );
    let too_long = post(Some("k".repeat(256)), body.clone()).await;
    assert_eq!(
        (too_long.status, too_long.body.clone()["code"].clone()),
        (400, json!("idempotency-key-invalid"))
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM idempotency_keys").await, 0);

    assert_eq!(post(Some("k1".into()), body.clone()).await.status, 202);
    let other_body = post(
        Some("k1".into()),
        json!({ "eventId": event, "quantity": 2 }),
    )
    .await;
    assert_eq!(
        (other_body.status, other_body.body.clone()["code"].clone()),
        (422, json!("idempotency-key-reused"))
    );
    // the same key on another path is another request too (admin scope)
    let first = admin_event(
        &app,
        "k2",
        event_body("A", "Hall", "2027-01-01T20:00:00Z", 5, 100),
    )
    .await;
    assert_eq!(first.status, 201);
    let other = admin_event(
        &app,
        "k2",
        event_body("B", "Hall", "2027-01-01T20:00:00Z", 5, 100),
    )
    .await;
    assert_eq!(other.status, 422);
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM events").await, 2);

    // the key is scoped to the user: another user may use the same key
    let dave = new_user(&app, "dave").await;
    assert_eq!(order(&app, &dave, "k1", event, 1).await.status, 202);
    app.stop().await;
}

on_both_backends!(
    answers_stored_under_a_key_survive_a_restart,
    stored_answers_survive_a_restart
);

async fn stored_answers_survive_a_restart(backend: Backend) {
    let app = spawn_app_on(backend, StageKind::Actor, |_| {}).await;
    let event = app.create_event(10).await;
    let erin = new_user(&app, "erin").await;
    let first = order(&app, &erin, "keep-me", event, 1).await;
    assert_eq!(first.status, 202);

    let app = app.restart().await;
    let again = order(&app, &erin, "keep-me", event, 1).await;

    assert_eq!(again.status, 202);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.text, first.text);
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);
    app.stop().await;
}

on_both_backends!(
    users_see_only_their_own_orders_and_buyers_cannot_use_admin_routes,
    authorization_matrix
);

async fn authorization_matrix(backend: Backend) {
    let app = spawn_app_on(backend, StageKind::Actor, |_| {}).await;
    let event = app.create_event(10).await;
    let (alice, mallory) = (
        new_user(&app, "alice").await,
        new_user(&app, "mallory").await,
    );
    let placed = order(&app, &alice, "a1", event, 1).await;
    let location = placed.headers["location"].to_str().unwrap().to_owned();

    let own = send(
        &app,
        reqwest::Method::GET,
        &location,
        Some(&alice),
        None,
        None,
    )
    .await;
    let other = send(
        &app,
        reqwest::Method::GET,
        &location,
        Some(&mallory),
        None,
        None,
    )
    .await;
    let missing = send(
        &app,
        reqwest::Method::GET,
        "/api/v2/orders/00000000-0000-4000-8000-000000000000",
        Some(&mallory),
        None,
        None,
    )
    .await;
    assert_eq!(own.status, 200);
    assert_eq!(other.status, 404);
    assert_eq!(other.body.clone()["code"], missing.body.clone()["code"]);
    assert_eq!(missing.status, 404);
    let mallorys = send(
        &app,
        reqwest::Method::GET,
        "/api/v2/users/me/orders",
        Some(&mallory),
        None,
        None,
    )
    .await;
    assert_eq!(mallorys.body.clone()["items"].as_array().unwrap().len(), 0);

    let anonymous = send(&app, reqwest::Method::GET, &location, None, None, None).await;
    assert_eq!(anonymous.status, 401);
    let bad_token = send(
        &app,
        reqwest::Method::GET,
        &location,
        Some("nope"),
        None,
        None,
    )
    .await;
    assert_eq!(bad_token.status, 401);
    for path in ["/api/v2/admin/audit", "/api/v2/admin/ledger"] {
        assert_eq!(
            send(&app, reqwest::Method::GET, path, Some(&alice), None, None)
                .await
                .status,
            403
        );
        assert_eq!(
            send(&app, reqwest::Method::GET, path, None, None, None)
                .await
                .status,
            401
        );
        assert_eq!(
            send(
                &app,
                reqwest::Method::GET,
                path,
                Some(ADMIN_TOKEN),
                None,
                None
            )
            .await
            .status,
            200
        );
    }
    let buyer_creates = send(
        &app,
        reqwest::Method::POST,
        "/api/v2/events",
        Some(&alice),
        Some("e1"),
        Some(&event_body("X", "Y", "2027-01-01T20:00:00Z", 5, 100)),
    )
    .await;
    assert_eq!(buyer_creates.status, 403);

    // extra fields such as price or status are refused and nothing is written
    for extra in [
        json!({"eventId": event, "quantity": 1, "price": 0}),
        json!({"eventId": event, "quantity": 1, "status": "confirmed"}),
    ] {
        let reply = send(
            &app,
            reqwest::Method::POST,
            "/api/v2/orders",
            Some(&mallory),
            Some("x"),
            Some(&extra),
        )
        .await;
        assert_eq!(reply.status, 400, "{:?}", reply.body.clone());
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM orders").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM events").await, 1);
    app.stop().await;
}

#[actix_web::test]
async fn the_per_user_limit_holds_across_orders() {
    let app = spawn_app(StageKind::Actor, |s| s.per_user_limit = 4).await;
    let event = app.create_event(100).await;
    let frank = new_user(&app, "frank").await;

    let too_many = order(&app, &frank, "l1", event, 5).await;
    assert_eq!(
        (too_many.status, too_many.body.clone()["code"].clone()),
        (409, json!("user-limit"))
    );
    assert_eq!(order(&app, &frank, "l2", event, 3).await.status, 202);
    let over = order(&app, &frank, "l3", event, 2).await;
    assert_eq!(over.status, 409);
    assert_eq!(order(&app, &frank, "l4", event, 1).await.status, 202);
    assert_eq!(
        app.count("SELECT COALESCE(SUM(quantity), 0) FROM orders WHERE status != 'cancelled'")
            .await,
        4
    );
    let zero = order(&app, &frank, "l5", event, 0).await;
    assert_eq!(zero.status, 400);
    app.stop().await;
}

on_both_backends!(
    events_can_be_paged_filtered_and_sorted_with_links,
    paging_filtering_sorting
);

async fn paging_filtering_sorting(backend: Backend) {
    let app = spawn_app_on(backend, StageKind::Actor, |_| {}).await;
    for (i, venue) in ["Hall", "Arena", "Hall", "Club", "Hall"].iter().enumerate() {
        let body = event_body(
            &format!("Show {i}"),
            venue,
            &format!("2027-0{}-01T20:00:00Z", i + 1),
            10,
            1000 + i as i64 * 100,
        );
        assert_eq!(admin_event(&app, &format!("ev{i}"), body).await.status, 201);
    }

    let (status, page) = app.get_json("/api/v2/events?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(page["total"], 5);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["items"][0]["name"], "Show 0");
    let next = page["links"]["next"].as_str().unwrap().to_owned();
    let (_, second) = app.get_json(&next).await;
    assert_eq!(second["items"][0]["name"], "Show 2");
    assert!(second["links"]["prev"].is_string());

    let (_, halls) = app.get_json("/api/v2/events?venue=hall&sort=-price").await;
    let names: Vec<&str> = halls["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Show 4", "Show 2", "Show 0"]);
    let (_, ranged) = app
        .get_json("/api/v2/events?from=2027-02-01T00:00:00Z&to=2027-03-31T00:00:00Z")
        .await;
    assert_eq!(ranged["total"], 2);
    assert!(ranged["items"][0]["links"]["self"].is_string());

    for bad in [
        "limit=0",
        "limit=101",
        "sort=colour",
        "from=yesterday",
        "page=2",
    ] {
        let (status, problem) = app.get_json(&format!("/api/v2/events?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {problem}");
    }
    app.stop().await;
}

#[actix_web::test]
async fn the_availability_stream_reports_the_count_and_its_changes() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(5).await;
    let mut stream = app
        .client
        .get(app.url(&format!("/api/v2/events/{event}/availability")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");

    let first = String::from_utf8(stream.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(first.starts_with("event: availability\n"), "{first}");
    assert!(first.contains("\"availableTickets\":5"), "{first}");
    assert_eq!(app.purchase(event, "gina").await.0, 201);
    let next = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&next).contains("\"availableTickets\":4"));
    drop(stream);
    app.stop().await;
}

#[actix_web::test]
async fn the_monolith_serves_api_v1_only_and_discovery_says_so() {
    let app = spawn_app(StageKind::Monolith, |_| {}).await;
    let (status, body) = app.get_json("/api/v2/events").await;
    assert_eq!(
        (status, body["code"].clone()),
        (404, json!("api-v2-not-served"))
    );
    let (status, api) = app.get_json("/api").await;
    assert_eq!(status, 200);
    assert_eq!(api["versions"][0]["version"], "v1");
    app.stop().await;
}

#[actix_web::test]
async fn the_actor_stage_has_no_job_queue_to_report() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let reply = send(
        &app,
        reqwest::Method::GET,
        "/api/v2/admin/queue-stats",
        Some(ADMIN_TOKEN),
        None,
        None,
    )
    .await;
    assert_eq!(
        (reply.status, reply.body.clone()["code"].clone()),
        (404, json!("no-queue"))
    );
    let stats = send(
        &app,
        reqwest::Method::GET,
        "/api/v2/admin/stats",
        Some(ADMIN_TOKEN),
        None,
        None,
    )
    .await;
    assert_eq!(stats.status, 200);
    app.stop().await;
}

#[actix_web::test]
async fn an_order_for_a_sold_out_event_is_a_409_and_an_integral_float_is_an_integer() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(2).await;
    let alice = new_user(&app, "alice").await;
    let bob = new_user(&app, "bob").await;

    // `2.0` is the integer 2 (JSON Schema's integer admits it), and the same request as `2`
    // under one Idempotency-Key: the retry is answered from the stored answer.
    let body = |quantity: Value| json!({ "eventId": event, "quantity": quantity });
    let first = send(
        &app,
        reqwest::Method::POST,
        "/api/v2/orders",
        Some(&alice),
        Some("float-1"),
        Some(&body(json!(2.0))),
    )
    .await;
    assert_eq!(first.status, 202, "{}", first.text);
    assert_eq!(first.body["quantity"], 2);
    let again = send(
        &app,
        reqwest::Method::POST,
        "/api/v2/orders",
        Some(&alice),
        Some("float-1"),
        Some(&body(json!(2))),
    )
    .await;
    assert_eq!(again.status, 202, "{}", again.text);
    assert_eq!(again.body["id"], first.body["id"], "one order for the key");
    let fraction = send(
        &app,
        reqwest::Method::POST,
        "/api/v2/orders",
        Some(&bob),
        Some("float-2"),
        Some(&body(json!(1.5))),
    )
    .await;
    assert_eq!(
        (fraction.status, fraction.body["code"].clone()),
        (400, json!("invalid-body"))
    );

    // Both seats taken (held or sold): API v2 says 409, the event's state refuses the order.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = send(
        &app,
        reqwest::Method::POST,
        "/api/v2/orders",
        Some(&bob),
        Some("late-1"),
        Some(&body(json!(1))),
    )
    .await;
    assert_eq!(late.status, 409, "{}", late.text);
    assert!(
        ["sold-out", "tickets-held"].contains(&late.body["code"].as_str().unwrap_or_default()),
        "{}",
        late.text
    );
    // API v1 keeps the seed's 400.
    let (status, v1) = app.purchase(event, "carol").await;
    assert_eq!(status, 400, "{v1}");
    app.stop().await;
}
