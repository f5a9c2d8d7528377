//! Rate limits: one client flooding gets `429` with `Retry-After` and a problem document while
//! another is served; per-user caps hold under concurrency; account creation is limited per
//! client address.

use futures::future::join_all;
use reqwest::Method;
use serde_json::json;
use ticketflow::config::{RateLimits, StageKind};

use crate::helpers::{spawn_app, TestApp};

async fn new_user(app: &TestApp, name: &str) -> String {
    let reply = app
        .send(
            Method::POST,
            "/api/v2/users",
            None,
            None,
            Some(&json!({ "name": name })),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    reply.body["token"].as_str().unwrap().to_owned()
}

async fn order(app: &TestApp, token: &str, key: String, event: i64) -> crate::helpers::Reply {
    app.send(
        Method::POST,
        "/api/v2/orders",
        Some(token),
        Some(&key),
        Some(&json!({ "eventId": event, "quantity": 1 })),
    )
    .await
}

#[actix_rt::test]
async fn a_user_flooding_orders_gets_429s_past_their_bucket_while_another_is_served() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.rate_limits = RateLimits::off();
        s.rate_limits.apply("orders=5/min").unwrap();
        s.per_user_limit = 100;
    })
    .await;
    let event = app.create_event(1_000).await;
    let (flooder, other) = (
        new_user(&app, "flooder").await,
        new_user(&app, "other").await,
    );
    let flood = join_all((0..60).map(|i| order(&app, &flooder, format!("f{i}"), event)));
    let served = join_all((0..3).map(|i| order(&app, &other, format!("o{i}"), event)));
    let (flood, served) = futures::join!(flood, served);
    let limited: Vec<_> = flood.iter().filter(|r| r.status == 429).collect();
    let accepted = flood.iter().filter(|r| r.status == 202).count();
    eprintln!(
        "flooder: {accepted} accepted, {} answered 429",
        limited.len()
    );
    assert_eq!(
        accepted, 5,
        "the bucket holds 5, however many arrive at once"
    );
    assert_eq!(limited.len(), 55);
    for reply in &limited {
        assert_eq!(reply.content_type, "application/problem+json");
        assert_eq!(reply.body["code"], "rate-limited");
        let retry: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
    }
    assert!(
        served.iter().all(|r| r.status == 202),
        "the other user is served"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders").await,
        8,
        "a refused order wrote nothing"
    );
}

#[actix_rt::test]
async fn parallel_orders_from_one_user_never_pass_the_per_user_limit() {
    let app = spawn_app(StageKind::Actor, |s| s.per_user_limit = 4).await;
    let event = app.create_event(100).await;
    let user = new_user(&app, "greedy").await;
    let answers = join_all((0..30).map(|i| order(&app, &user, format!("k{i}"), event))).await;
    let accepted = answers.iter().filter(|r| r.status == 202).count();
    let limited = answers
        .iter()
        .filter(|r| r.status == 409 && r.body["code"] == "user-limit")
        .count();
    assert_eq!((accepted, limited), (4, 26));
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status != 'cancelled'")
            .await,
        4
    );
}

#[actix_rt::test]
async fn accounts_and_v1_purchases_are_limited_per_client_address() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.rate_limits = RateLimits::off();
        s.rate_limits.apply("accounts=3/min").unwrap();
        s.rate_limits.apply("purchases=3/min").unwrap();
    })
    .await;
    let event = app.create_event(100).await;
    let body = json!({ "name": "sock puppet" });
    let made = join_all((0..10).map(|_| app.post_json("/api/v2/users", &body))).await;
    assert_eq!(made.iter().filter(|r| r.status == 201).count(), 3);
    assert_eq!(made.iter().filter(|r| r.status == 429).count(), 7);
    assert_eq!(app.count("SELECT COUNT(*) FROM users").await, 3);

    let buyers: Vec<String> = (0..10).map(|i| format!("buyer{i}")).collect();
    let bought = join_all(buyers.iter().map(|b| app.purchase(event, b))).await;
    assert_eq!(bought.iter().filter(|(s, _)| *s == 201).count(), 3);
    assert_eq!(bought.iter().filter(|(s, _)| *s == 429).count(), 7);

    // Another client address (127.0.0.2, loopback too, as the source) has buckets of its own.
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let answer = elsewhere
        .post(app.url("/api/v1/tickets/purchase"))
        .json(&json!({ "eventId": event, "userId": "neighbour" }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 201);
}
