//! The stampede: many buyers released together on one small event (I1-I7).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use ticketflow::config::{LatencyModel, StageKind};

use crate::backends::{on_both_backends, Backend};
use crate::helpers::{determined_buyer, spawn_app, spawn_app_on};

const SEATS: u32 = 100;
const BUYERS: usize = 2_000;

async fn stampede_on_actor(backend: Backend, seed: u64) {
    let app = Arc::new(
        spawn_app_on(backend, StageKind::Actor, |s| {
            s.seed = seed;
            s.payments.latency =
                LatencyModel::Uniform(Duration::from_millis(1), Duration::from_millis(20));
            s.payments.failure_rate = 0.10;
        })
        .await,
    );
    let event = app.create_event(SEATS).await;

    let buyers = (0..BUYERS).map(|i| {
        determined_buyer(
            Arc::clone(&app),
            event,
            format!("buyer-{i}"),
            Duration::from_millis(2),
        )
    });
    let tickets: Vec<String> = join_all(buyers).await.into_iter().flatten().collect();

    // every seat sold exactly once, and each buyer saw a distinct ticket (I1, I2, I4)
    assert_eq!(tickets.len(), SEATS as usize, "seed {seed}");
    let distinct: HashSet<&String> = tickets.iter().collect();
    assert_eq!(
        distinct.len(),
        tickets.len(),
        "seed {seed}: a ticket was given twice"
    );

    let audit = app.audit().await;
    assert_eq!(audit["ok"], true, "seed {seed}: {audit}");
    // the writer grouped the writes and never had to fall back to one transaction per write
    let (_, stats) = app.admin_json("/api/v1/admin/stats").await;
    let writer = &stats["writer"];
    assert_eq!(writer["fallbacks"], 0, "seed {seed}: {stats}");
    assert!(
        writer["writes"].as_u64().unwrap() > writer["batches"].as_u64().unwrap(),
        "seed {seed}: no write shared a commit: {stats}"
    );
    let declines = audit["ledgerEntries"].as_i64().unwrap() - i64::from(SEATS);
    assert!(
        declines > 0,
        "seed {seed}: payments never failed, the test lost its teeth"
    );

    // the same facts straight from the database (I3, I4, I5, I6, I7)
    let app = Arc::try_unwrap(app).ok().expect("buyers finished");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'confirmed'")
            .await,
        i64::from(SEATS)
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tickets WHERE status = 'pending'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments WHERE status = 'pending'")
            .await,
        0
    );
    assert_eq!(
        app.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {event}"
        ))
        .await,
        0
    );
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM tickets t WHERE t.status = 'confirmed' AND
             (SELECT COUNT(*) FROM payments p WHERE p.order_id = t.order_id AND p.status = 'completed') != 1"
        )
        .await,
        0,
        "seed {seed}: a confirmed ticket without exactly one completed payment"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payments p JOIN orders o ON o.id = p.order_id WHERE o.status != 'confirmed' AND p.status = 'completed'").await,
        0
    );
    let confirmed_ids = {
        let mut ids = Vec::new();
        for id in &tickets {
            ids.push(
                app.count(&format!(
                    "SELECT COUNT(*) FROM tickets WHERE id = '{id}' AND status = 'confirmed'"
                ))
                .await,
            );
        }
        ids
    };
    assert!(
        confirmed_ids.iter().all(|n| *n == 1),
        "seed {seed}: a ticket the client was given is not confirmed"
    );
    app.stop().await;
}

async fn actor_stampede(backend: Backend) {
    for seed in [1, 2, 3] {
        stampede_on_actor(backend, seed).await;
    }
}

on_both_backends!(
    the_actor_stage_sells_every_seat_exactly_once_under_a_stampede,
    actor_stampede
);

#[actix_web::test]
async fn the_monolith_oversells_and_loses_updates_under_the_same_stampede() {
    // A payment slower than the time it takes every buyer to read `available` makes the race
    // certain: all of them pass the check before the first write-back.
    let app = Arc::new(
        spawn_app(StageKind::Monolith, |s| {
            s.payments.latency = LatencyModel::Fixed(Duration::from_millis(300));
            s.payments.failure_rate = 0.0;
        })
        .await,
    );
    let event = app.create_event(SEATS).await;

    let buyers = (0..BUYERS).map(|i| {
        let app = Arc::clone(&app);
        async move { app.purchase(event, &format!("buyer-{i}")).await.0 }
    });
    let statuses = join_all(buyers).await;
    let sold = statuses.iter().filter(|s| **s == 201).count();

    assert!(
        sold > SEATS as usize,
        "expected an oversell, sold {sold} of {SEATS}"
    );
    let audit = app.audit().await;
    assert_eq!(audit["ok"], false, "{audit}");
    assert!(
        audit["invariants"]["I1_no_oversell"].as_i64().unwrap() > 0,
        "{audit}"
    );
    // lost updates: the stored counter no longer matches the tickets
    assert_eq!(audit["invariants"]["I6_conservation"], 1, "{audit}");
    Arc::try_unwrap(app)
        .ok()
        .expect("buyers finished")
        .stop()
        .await;
}
