//! The seed's own clients, unchanged: its race script and its load test call the unversioned
//! paths (`/api/events/3`, `/api/tickets/purchase`) on the demo data, with `eventId` a string,
//! exactly as the seed writes them. They show the race on `monolith` and none on `actor`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use ticketflow::config::{LatencyModel, StageKind};

use crate::helpers::{spawn_app, TestApp};

/// Racers sent at event 3 at once, more than its 100 seats.
const RACERS: usize = 150;

async fn demo_app(stage: StageKind) -> Arc<TestApp> {
    Arc::new(
        spawn_app(stage, |s| {
            s.demo_data = true;
            // slower than the time every racer takes to read `available`: the race is certain
            s.payments.latency = LatencyModel::Fixed(Duration::from_millis(300));
            s.payments.failure_rate = 0.0;
        })
        .await,
    )
}

/// No redirect is followed: the seed's clients must be served on the paths they call.
async fn seed_call(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = app.url(path);
    let request = match (method, body) {
        ("POST", Some(body)) => client.post(url).json(&body),
        _ => client.get(url),
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The race script: read event 3, then every racer buys it at once.
async fn race_script(app: &Arc<TestApp>) -> usize {
    let (status, event) = seed_call(app, "GET", "/api/events/3", None).await;
    assert_eq!(status, 200, "{event}");
    assert_eq!(
        event["totalTickets"], 100,
        "event 3 is the 100-seat show: {event}"
    );
    assert_eq!(event["availableTickets"], 100, "{event}");
    let racers = (1..=RACERS).map(|i| {
        let app = Arc::clone(app);
        async move {
            let body = json!({ "eventId": "3", "userId": format!("racer_{i}") });
            seed_call(&app, "POST", "/api/tickets/purchase", Some(body)).await
        }
    });
    let answers = join_all(racers).await;
    for (status, body) in &answers {
        assert!(
            *status == 201
                || (*status == 400
                    && (body["code"] == "sold-out" || body["code"] == "tickets-held")),
            "{status} {body}"
        );
    }
    answers.iter().filter(|(s, _)| *s == 201).count()
}

/// The load test: list the events, buy the third in the list.
async fn load_test(app: &Arc<TestApp>) -> usize {
    let (status, events) = seed_call(app, "GET", "/api/events", None).await;
    assert_eq!(status, 200, "{events}");
    let third = &events.as_array().expect("a list of events")[2];
    assert_eq!(third["totalTickets"], 100, "{events}");
    let id = third["id"].clone();
    let buyers = (0..RACERS).map(|i| {
        let (app, id) = (Arc::clone(app), id.clone());
        async move {
            let body = json!({ "eventId": id, "userId": format!("user_{i}") });
            seed_call(&app, "POST", "/api/tickets/purchase", Some(body))
                .await
                .0
        }
    });
    join_all(buyers)
        .await
        .into_iter()
        .filter(|s| *s == 201)
        .count()
}

async fn stop(app: Arc<TestApp>) {
    Arc::try_unwrap(app)
        .ok()
        .expect("clients done")
        .stop()
        .await;
}

#[actix_web::test]
async fn the_seeds_race_script_oversells_the_monolith_and_not_the_actor() {
    let monolith = demo_app(StageKind::Monolith).await;
    let sold = race_script(&monolith).await;
    assert!(sold > 100, "the monolith sold {sold} of 100: no race shown");
    let (_, tickets) = seed_call(&monolith, "GET", "/api/tickets/user/racer_1", None).await;
    assert_eq!(tickets.as_array().map(Vec::len), Some(1), "{tickets}");
    assert_eq!(monolith.audit().await["ok"], false);
    stop(monolith).await;

    // the actor may answer a racer `tickets-held` while others' payments are running: never more
    // than the 100 seats, and the audit is clean
    let actor = demo_app(StageKind::Actor).await;
    let sold = race_script(&actor).await;
    assert!((1..=100).contains(&sold), "the actor sold {sold} of 100");
    assert_eq!(actor.audit().await["ok"], true);
    stop(actor).await;
}

#[actix_web::test]
async fn the_seeds_load_test_buys_the_third_event_oversold_on_the_monolith_only() {
    let monolith = demo_app(StageKind::Monolith).await;
    let sold = load_test(&monolith).await;
    assert!(sold > 100, "the monolith sold {sold} of 100");
    stop(monolith).await;

    let actor = demo_app(StageKind::Actor).await;
    let sold = load_test(&actor).await;
    assert!((1..=100).contains(&sold), "the actor sold {sold} of 100");
    assert_eq!(actor.audit().await["ok"], true);
    stop(actor).await;
}

#[actix_web::test]
async fn demo_data_is_the_seeds_three_events_in_order() {
    let app = spawn_app(StageKind::Actor, |s| s.demo_data = true).await;
    let (status, events) = app.get_json("/api/events").await;
    assert_eq!(status, 200);
    let sizes: Vec<(i64, i64)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_i64().unwrap(),
                e["totalTickets"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(sizes, [(1, 50_000), (2, 2_000), (3, 100)]);
    // served the same on the versioned path
    assert_eq!(app.get_json("/api/v1/events").await.1, events);
    app.stop().await;
}
