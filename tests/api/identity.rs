//! One identity per user: a v1 `userId` never acts as a v2 user, v1 can be switched off, every
//! admin route (v1 and v2) needs the admin token, and `Bearer` is matched in any case.

use reqwest::Method;
use serde_json::{json, Value};
use ticketflow::config::{StageKind, V1Access};

use crate::helpers::{spawn_app, TestApp, ADMIN_TOKEN};

/// A v2 user: its id and its token.
async fn v2_user(app: &TestApp) -> (String, String) {
    let reply = app
        .send(
            Method::POST,
            "/api/v2/users",
            None,
            None,
            Some(&json!({ "name": "victim" })),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    (
        reply.body["id"].as_str().unwrap().to_owned(),
        reply.body["token"].as_str().unwrap().to_owned(),
    )
}

#[actix_rt::test]
async fn a_v1_purchase_naming_a_v2_user_neither_buys_as_them_nor_counts_against_their_limit() {
    let app = spawn_app(StageKind::Actor, |s| s.per_user_limit = 2).await;
    let event = app.create_event(10).await;
    let (id, token) = v2_user(&app).await;

    // The attack: no token, the victim's id as the v1 `userId`.
    let (status, body) = app.purchase(event, &id).await;
    assert_eq!(status, 400, "a v1 label may not take a v2 id: {body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("reserved for API v2 users"),
        "{body}"
    );
    // The id without its prefix is just another v1 label, apart from the v2 user.
    let bare = id.trim_start_matches("v2:").to_owned();
    assert_ne!(bare, id, "v2 ids carry their namespace: {id}");
    for _ in 0..2 {
        assert_eq!(app.purchase(event, &bare).await.0, 201);
    }

    // The victim still has their whole limit, and sees only their own tickets.
    let order = app
        .send(
            Method::POST,
            "/api/v2/orders",
            Some(&token),
            Some("k1"),
            Some(&json!({ "eventId": event, "quantity": 2 })),
        )
        .await;
    assert_eq!(order.status, 202, "{}", order.text);
    let mine = app
        .send(
            Method::GET,
            "/api/v2/users/me/tickets",
            Some(&token),
            None,
            None,
        )
        .await;
    let items = mine.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{}", mine.text);
    assert!(
        items.iter().all(|t| t["userId"] == id.as_str()),
        "{}",
        mine.text
    );
    let (_, v1_view) = app
        .get_json(&format!("/api/v1/tickets/user/{}", urlencode(&id)))
        .await;
    assert_eq!(v1_view["code"], "validation-failed", "{v1_view}");
}

fn urlencode(raw: &str) -> String {
    raw.replace(':', "%3A")
}

#[actix_rt::test]
async fn every_admin_route_v1_and_v2_needs_the_admin_token() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let (_, user) = v2_user(&app).await;
    for path in [
        "/api/v1/admin/ledger",
        "/api/v1/admin/audit",
        "/api/v1/admin/stats",
        "/api/v2/admin/ledger",
        "/api/v2/admin/audit",
        "/api/v2/admin/stats",
    ] {
        let none = app.send(Method::GET, path, None, None, None).await;
        assert_eq!(none.status, 401, "{path}: {}", none.text);
        assert_eq!(none.body["code"], "unauthenticated");
        assert!(
            none.text.len() < 1024,
            "{path}: a refused caller gets no data"
        );
        let buyer = app.send(Method::GET, path, Some(&user), None, None).await;
        assert_eq!(buyer.status, 403, "{path}");
        let admin = app
            .send(Method::GET, path, Some(ADMIN_TOKEN), None, None)
            .await;
        assert_eq!(admin.status, 200, "{path}: {}", admin.text);
    }
}

#[actix_rt::test]
async fn the_bearer_scheme_is_matched_in_any_case() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let (_, token) = v2_user(&app).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let answer = app
            .client
            .get(app.url("/api/v2/users/me/orders"))
            .header("Authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{scheme}");
        let admin = app
            .client
            .get(app.url("/api/v1/admin/audit"))
            .header("Authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(admin.status(), 200, "{scheme}");
    }
    let basic = app
        .client
        .get(app.url("/api/v2/users/me/orders"))
        .header("Authorization", format!("Basic {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401, "another scheme is not a bearer token");
}

#[actix_rt::test]
async fn with_v1_off_no_v1_route_answers_and_v2_still_does() {
    let app = spawn_app(StageKind::Actor, |s| s.v1 = Some(V1Access::Off)).await;
    let create = app
        .post_json(
            "/api/v1/events",
            &json!({
                "name": "Free seats", "venue": "Anywhere", "date": "2026-12-31T20:00:00Z",
                "totalTickets": 1_000_000, "price": 0,
            }),
        )
        .await;
    assert_eq!(create.status, 404, "{}", create.text);
    assert_eq!(create.body["code"], "api-v1-off");
    for path in ["/api/v1/events", "/api/v1/tickets/user/alice"] {
        let (status, body) = app.get_json(path).await;
        assert_eq!(
            (status, body["code"].clone()),
            (404, Value::from("api-v1-off"))
        );
    }
    assert_eq!(app.get("/api/v2/events").await.status, 200);
    assert_eq!(app.get("/health").await.status, 200);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events").await,
        0,
        "nothing was created"
    );
}
