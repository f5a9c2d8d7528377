//! Virtual event actors (`actor` stage): none runs at start; a purchase activates its event's
//! actor from storage, and an actor unused for `actor_idle` with nothing under way is
//! passivated. What it is rebuilt from must be right, and passivation must never take an actor
//! from a purchase still using it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ticketflow::config::{LatencyModel, StageKind};

use crate::helpers::{spawn_app, TestApp};

/// The stage's actor figures: whether `event` has an active actor, activations, passivations.
async fn actors(app: &TestApp, event: i64) -> (bool, u64, u64) {
    let (status, stats) = app.admin_json("/api/v1/admin/stats").await;
    assert_eq!(status, 200, "{stats}");
    let active = stats["mailboxDepth"].get(event.to_string()).is_some();
    let figures = &stats["actors"];
    (
        active,
        figures["activations"].as_u64().unwrap(),
        figures["passivations"].as_u64().unwrap(),
    )
}

/// Waits until `event` has no active actor.
async fn passivated(app: &TestApp, event: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while actors(app, event).await.0 {
        assert!(
            Instant::now() < deadline,
            "event {event}'s actor was never passivated"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_web::test]
async fn an_idle_actor_passivates_and_the_next_purchase_reactivates_it_with_what_is_stored() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.actor_idle = Duration::from_millis(100)
    })
    .await;
    let event = app.create_event(5).await;
    assert!(actors(&app, event).await.0, "a new event's actor is active");
    for user in ["a", "b"] {
        assert_eq!(app.purchase(event, user).await.0, 201);
    }
    passivated(&app, event).await;
    // (On a loaded machine the actor may also have passivated between the two purchases.)
    let (_, first, passivations) = actors(&app, event).await;
    assert!(
        first >= 1 && passivations == first,
        "{first} {passivations}"
    );

    // Rebuilt with 3 seats left (not 5), and minting ids past the 2 tickets issued (the same
    // ids again would collide with the stored ones).
    for user in ["c", "d", "e"] {
        let (status, body) = app.purchase(event, user).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = app.purchase(event, "f").await;
    assert_eq!((status, body["code"].clone()), (400, json!("sold-out")));
    let (active, activations, passivations) = actors(&app, event).await;
    assert!(
        activations > first,
        "reactivated: {activations} after {first}"
    );
    assert_eq!(activations - passivations, u64::from(active));
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        5
    );
    assert_eq!(app.count("SELECT available_tickets FROM events").await, 0);
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

#[actix_web::test]
async fn an_event_stored_before_the_start_gets_its_actor_on_first_use_only() {
    let app = spawn_app(StageKind::Actor, |_| {}).await;
    let event = app.create_event(3).await;
    assert_eq!(app.purchase(event, "before").await.0, 201);
    let app = app.restart().await;
    let (active, activations, _) = actors(&app, event).await;
    assert!(
        !active,
        "no actor runs for an event nobody bought since the start"
    );
    assert_eq!(activations, 0);
    assert_eq!(app.purchase(event, "after").await.0, 201);
    let (active, activations, _) = actors(&app, event).await;
    assert!(active);
    assert_eq!(activations, 1);
    let (status, _) = app.purchase(9_999, "nobody").await;
    assert_eq!(status, 404, "an unknown event activates nothing");
    assert_eq!(actors(&app, event).await.1, 1);
    app.stop().await;
}

async fn new_user(app: &TestApp, name: &str) -> String {
    let reply = app
        .send(
            reqwest::Method::POST,
            "/api/v2/users",
            None,
            None,
            Some(&json!({ "name": name })),
        )
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    reply.body["token"].as_str().unwrap().to_owned()
}

async fn order(app: &TestApp, token: &str, key: &str, event: i64, quantity: i64) -> Value {
    let reply = app
        .send(
            reqwest::Method::POST,
            "/api/v2/orders",
            Some(token),
            Some(key),
            Some(&json!({ "eventId": event, "quantity": quantity })),
        )
        .await;
    json!({ "status": reply.status, "body": reply.body })
}

#[actix_web::test]
async fn a_per_user_limit_survives_passivation() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.actor_idle = Duration::from_millis(100);
        s.per_user_limit = 2;
    })
    .await;
    let event = app.create_event(10).await;
    let frank = new_user(&app, "frank").await;
    let placed = order(&app, &frank, "first", event, 2).await;
    assert_eq!(placed["status"], 202, "{placed}");
    // confirmed in the background; passivation waits for it
    passivated(&app, event).await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        2
    );

    let over = order(&app, &frank, "second", event, 1).await;
    assert_eq!(
        (over["status"].clone(), over["body"]["code"].clone()),
        (json!(409), json!("user-limit")),
        "{over}"
    );
    let grace = new_user(&app, "grace").await;
    assert_eq!(order(&app, &grace, "first", event, 2).await["status"], 202);
    app.stop().await;
}

#[actix_web::test]
async fn a_hold_waiting_for_its_payment_keeps_its_actor_active() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.actor_idle = Duration::from_millis(20);
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(1_000));
    })
    .await;
    let event = app.create_event(1).await;
    let buyer = {
        let (client, url) = (app.client.clone(), app.url("/api/v1/tickets/purchase"));
        tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"eventId": event, "userId": "patient"}))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let (active, _, passivations) = actors(&app, event).await;
        assert!(active && passivations == 0, "passivated with a hold");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(buyer.await.unwrap(), 201);
    passivated(&app, event).await;
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

#[actix_web::test]
async fn a_payment_outstanding_behind_an_expired_hold_keeps_its_actor_until_it_is_refunded() {
    // The hold runs out at 50 ms and its seat goes back, so the actor holds nothing; the
    // charge is still under way until 800 ms. Passivated meanwhile, the late approval would
    // find no actor to settle with, and the charge would never be refunded.
    let app = spawn_app(StageKind::Actor, |s| {
        s.actor_idle = Duration::from_millis(20);
        s.hold_ttl = Duration::from_millis(50);
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(800));
    })
    .await;
    let event = app.create_event(1).await;
    let (status, body) = app.purchase(event, "slow-payer").await;
    assert_eq!((status, body["code"].clone()), (409, json!("hold-expired")));
    assert_eq!(actors(&app, event).await.2, 0, "passivated mid-payment");
    let (_, ledger) = app.admin_json("/api/v1/admin/ledger").await;
    let kinds: Vec<&str> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["charge", "refund"]);
    passivated(&app, event).await;
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

#[actix_web::test]
async fn purchases_racing_passivation_sell_every_seat_once_and_lose_no_hold() {
    const SEATS: i64 = 30;
    let app = std::sync::Arc::new(
        spawn_app(StageKind::Actor, |s| {
            s.actor_idle = Duration::from_millis(10);
            s.payments.latency =
                LatencyModel::Uniform(Duration::from_millis(0), Duration::from_millis(15));
        })
        .await,
    );
    let event = app.create_event(SEATS as u32).await;
    // Buyers in waves of 3, each wave after the last one's answers and a pause around the idle
    // time (10 ms, swept every 5 ms): actors are passivated and activated again while the
    // next purchases arrive.
    let buy = |user: String, offset: u64| {
        let app = std::sync::Arc::clone(&app);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(offset)).await;
            for _ in 0..200 {
                let (status, body) = app.purchase(event, &user).await;
                match (status, body["code"].as_str()) {
                    (201, _) => return 1,
                    (400, Some("sold-out")) => return 0,
                    (400, Some("tickets-held")) => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    other => panic!("unexpected answer {other:?}: {body}"),
                }
            }
            panic!("{user} gave up")
        })
    };
    let mut confirmed = 0;
    for wave in 0..20u64 {
        let gap = [0, 8, 12, 15, 18, 25, 11, 14, 9, 16][wave as usize % 10];
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let buyers = (0..3u64).map(|n| buy(format!("w{wave}-{n}"), n * n));
        for bought in futures::future::join_all(buyers).await {
            confirmed += bought.unwrap();
        }
    }
    let (_, activations, passivations) = actors(&app, event).await;
    assert!(
        passivations >= 3 && activations >= passivations,
        "the race was not run: {activations} activations, {passivations} passivations"
    );
    // 60 buyers for 30 seats, none declined: every seat sold, none twice
    assert_eq!(confirmed, SEATS);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        confirmed
    );
    assert_eq!(
        app.count("SELECT available_tickets FROM events").await,
        SEATS - confirmed
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM orders WHERE status = 'pending'")
            .await,
        0
    );
    assert_eq!(app.audit().await["ok"], true);
    std::sync::Arc::try_unwrap(app)
        .ok()
        .expect("buyers done")
        .stop()
        .await;
}
