//! `kill -9` in the middle of purchases, then a restart on the same database (actor stage).

use serde_json::{json, Value};

use crate::backends::{on_both_backends, Backend, TestDb};
use crate::helpers::ADMIN_TOKEN;
use crate::process::{
    admin_get, assert_nothing_lost, buy_until_killed, create_event, start_server,
};

const SEATS: i64 = 60;
const BUYERS: usize = 150;

on_both_backends!(
    purchases_interrupted_by_kill_9_are_resolved_on_restart_and_acknowledged_ones_survive,
    kill_9_mid_purchase
);

async fn kill_9_mid_purchase(backend: Backend) {
    let db = TestDb::new(backend);
    let client = reqwest::Client::new();
    let mut server = start_server(&db, 9, &client).await;

    let event = create_event(&client, &server.base, "Crash Test", SEATS).await;

    let acknowledged = buy_until_killed(&mut server, &client, event, BUYERS).await;
    let pending_at_crash = db
        .count("SELECT COUNT(*) FROM tickets WHERE status = 'pending'")
        .await;
    assert!(
        !acknowledged.is_empty(),
        "no purchase finished before the kill: the test proves nothing"
    );
    assert!(
        pending_at_crash > 0,
        "nothing was in flight at the kill: the test proves nothing"
    );

    let mut server = start_server(&db, 9, &client).await;

    // every acknowledged ticket survived, confirmed; every interrupted purchase reached a
    // final state, and inventory adds up
    assert_nothing_lost(&db, &acknowledged).await;
    let confirmed = db
        .count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
        .await;
    assert!(confirmed <= SEATS);
    assert_eq!(
        db.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        SEATS - confirmed
    );
    // at most one charge per ticket, and one completed payment per confirmed ticket
    assert_eq!(
        db.count("SELECT COUNT(*) FROM tickets t WHERE t.status = 'confirmed' AND
                    (SELECT COUNT(*) FROM payments p WHERE p.order_id = t.order_id AND p.status = 'completed') != 1").await,
        0
    );
    // each buyer bought once, so holds at most one ticket that is not cancelled
    assert_eq!(
        db.count("SELECT COUNT(*) FROM (SELECT user_id FROM tickets WHERE status != 'cancelled' GROUP BY user_id HAVING COUNT(*) > 1) AS twice").await,
        0
    );
    let (_, audit) = admin_get(&client, &server.base, "/api/v1/admin/audit").await;
    assert_eq!(audit["ok"], true, "{audit}");

    // the restarted server keeps selling what is left
    let r = client
        .post(format!("{}/api/v1/tickets/purchase", server.base))
        .json(&json!({"eventId": event, "userId": "after-restart"}))
        .send()
        .await
        .unwrap();
    assert!(
        [201, 402].contains(&r.status().as_u16()) || confirmed == SEATS,
        "{}",
        r.status()
    );

    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

#[actix_web::test]
async fn a_payment_left_pending_behind_an_expired_hold_is_settled_and_refunded_on_restart() {
    use ticketflow::config::StageKind;
    use ticketflow::server::Server;

    let db = TestDb::new(Backend::Sqlite);
    // A previous run: the hold expired (ticket cancelled, seat returned) while the charge was
    // in flight, then the process died before the payment's outcome was recorded.
    let settings = crate::helpers::test_settings(StageKind::Actor, &db);
    let first = Server::build(settings.clone()).await.unwrap();
    let handle = first.handle();
    let task = actix_rt::spawn(first.run());
    handle.stop(true).await;
    task.await.unwrap().unwrap();
    db.execute(&[
        "INSERT INTO events (id, name, venue, date, total_tickets, available_tickets, price_cents, created_at)
         VALUES (1, 'Late', 'Hall', '2026-12-31T20:00:00Z', 1, 1, 1000, '2026-11-01T00:00:00Z')",
        "INSERT INTO orders (id, event_id, user_id, quantity, amount_cents, status, cancel_reason, created_at, updated_at)
         VALUES ('00000000-0000-4000-8000-000000000002', 1, 'late', 1, 1000, 'cancelled', 'hold_expired', '2026-11-01T00:00:00Z', '2026-11-01T00:00:00Z')",
        "INSERT INTO tickets (id, order_id, event_id, user_id, purchase_date, price_cents, status, cancel_reason)
         VALUES ('00000000-0000-4000-8000-000000000001', '00000000-0000-4000-8000-000000000002', 1, 'late', '2026-11-01T00:00:00Z', 1000, 'cancelled', 'hold_expired')",
        "INSERT INTO payments (id, order_id, user_id, amount_cents, status, idempotency_key, created_at)
         VALUES ('p1', '00000000-0000-4000-8000-000000000002', 'late', 1000, 'pending', 'order-late', '2026-11-01T00:00:00Z')",
    ])
    .await;

    let second = Server::build(settings).await.unwrap();
    let base = format!("http://{}", second.addr());
    let handle = second.handle();
    let task = actix_rt::spawn(second.run());

    assert_eq!(
        db.count("SELECT COUNT(*) FROM payments WHERE status = 'pending'")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM payments WHERE status IN ('refunded', 'failed')")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT available_tickets FROM events WHERE id = 1")
            .await,
        1
    );
    let admin = reqwest::Client::new();
    let audit: Value = admin
        .get(format!("{base}/api/v1/admin/audit"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit["ok"], true, "{audit}");
    // the test settings approve every charge, so the gateway must show it refunded
    let ledger: Value = admin
        .get(format!("{base}/api/v1/admin/ledger"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["charge", "refund"]);
    handle.stop(true).await;
    task.await.unwrap().unwrap();
}
