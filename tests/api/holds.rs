//! Holds that outlive their TTL, and a full mailbox.

use std::time::Duration;

use ticketflow::config::{LatencyModel, StageKind};

use crate::helpers::spawn_app;

#[actix_web::test]
async fn a_payment_that_succeeds_after_the_hold_expired_is_refunded_and_the_seat_returned() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.hold_ttl = Duration::from_millis(50);
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(300));
    })
    .await;
    let event = app.create_event(1).await;

    let (status, body) = app.purchase(event, "slow-payer").await;

    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "hold-expired");
    let (_, ledger) = app.admin_json("/api/v1/admin/ledger").await;
    let kinds: Vec<&str> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["charge", "refund"]);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'cancelled' AND cancel_reason = 'hold_expired'").await,
        1
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments WHERE status = 'refunded'")
            .await,
        1
    );
    assert_eq!(app.count("SELECT available_tickets FROM events").await, 1);
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}

#[actix_web::test]
async fn the_audit_is_not_quiet_while_a_late_success_is_in_flight_and_passes_once_refunded() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.hold_ttl = Duration::from_millis(50);
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(800));
    })
    .await;
    let event = app.create_event(1).await;
    let buyer = {
        let (client, url) = (app.client.clone(), app.url("/api/v1/tickets/purchase"));
        tokio::spawn(async move {
            client
                .post(url)
                .json(&serde_json::json!({"eventId": event, "userId": "slow-payer"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };

    // Once the hold has expired and before the charge answers: nothing pending, yet the books
    // hold a charge for a cancelled order whose payment is not settled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = app.audit().await;
    assert_eq!(during["activity"]["pendingTickets"], 0, "{during}");
    assert_eq!(during["quiet"], false, "{during}");
    assert_eq!(during["verdict"], "not-quiet", "{during}");
    assert!(
        during["activity"]["paymentsInFlight"].as_i64().unwrap() >= 1,
        "{during}"
    );

    assert_eq!(buyer.await.unwrap(), 409);
    let after = app.audit().await;
    assert_eq!(after["quiet"], true, "{after}");
    assert_eq!(after["verdict"], "pass", "{after}");
    assert_eq!(after["activity"]["paymentsInFlight"], 0, "{after}");
    assert_eq!(after["activity"]["unflushedWrites"], 0, "{after}");
    app.stop().await;
}

#[actix_web::test]
async fn a_full_mailbox_is_answered_503_with_retry_after_and_nothing_is_lost() {
    let app = spawn_app(StageKind::Actor, |s| {
        s.mailbox_capacity = 1;
        s.arbiters = 1;
        s.payments.latency = LatencyModel::Fixed(Duration::from_millis(20));
    })
    .await;
    let event = app.create_event(1_000).await;

    let buyers = (0..300).map(|i| {
        let (client, url) = (app.client.clone(), app.url("/api/v1/tickets/purchase"));
        async move {
            let r = client
                .post(url)
                .json(&serde_json::json!({"eventId": event, "userId": format!("u{i}")}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().get("retry-after").is_some(),
            )
        }
    });
    let answers = futures::future::join_all(buyers).await;

    let shed = answers.iter().filter(|(s, _)| *s == 503).count();
    let sold = answers.iter().filter(|(s, _)| *s == 201).count() as i64;
    assert!(
        shed > 0,
        "a one-slot mailbox never overflowed under 300 buyers"
    );
    assert!(answers
        .iter()
        .filter(|(s, _)| *s == 503)
        .all(|(_, retry)| *retry));
    assert!(
        answers.iter().all(|(s, _)| [201, 503].contains(s)),
        "{answers:?}"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        sold
    );
    assert_eq!(
        app.count("SELECT available_tickets FROM events").await,
        1_000 - sold
    );
    assert_eq!(app.audit().await["ok"], true);
    app.stop().await;
}
