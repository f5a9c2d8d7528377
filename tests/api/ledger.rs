//! The payment gateway's books outlive the process: after `kill -9` and a restart, a charge
//! retried under the same key gets the answer it got before, and the audit reconciles I3 and I5
//! against everything ever charged. The admin ledger routes serve the books in pages.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::AnyPool;
use ticketflow::config::StageKind;

use crate::backends::{on_both_backends, Backend, TestDb};
use crate::helpers::{spawn_app_on, ADMIN_TOKEN};
use crate::process::{buy_until_killed, create_event, start_server};

const SEATS: i64 = 60;
const BUYERS: usize = 150;

/// What the gateway's books say it answered under each key: charged (with the charge's id) or
/// declined.
async fn answers(db: &TestDb) -> BTreeMap<String, (String, Option<String>)> {
    sqlx::any::install_default_drivers();
    let url = match db.backend {
        Backend::Sqlite => format!("sqlite://{}", db.url()),
        Backend::Postgres => db.url().to_owned(),
    };
    let pool = AnyPool::connect(&url).await.unwrap();
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT payment_key, kind, charge_id FROM gateway_ledger WHERE kind != 'refund'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.into_iter().map(|(k, o, c)| (k, (o, c))).collect()
}

/// Every ledger line, following the `next` links from the first page of `limit`.
async fn whole_ledger(client: &reqwest::Client, base: &str, limit: u32) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut next = Some(format!("/api/v1/admin/ledger?limit={limit}"));
    while let Some(path) = next.take() {
        let page: Value = client
            .get(format!("{base}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let entries = page["entries"].as_array().expect("a page of entries");
        assert!(entries.len() <= limit as usize, "{page}");
        lines.extend(entries.iter().cloned());
        next = page["next"].as_str().map(str::to_owned);
    }
    lines
}

on_both_backends!(
    a_restart_after_kill_9_keeps_the_gateways_books_so_i3_and_i5_hold_across_the_crash,
    kill_9_keeps_the_books
);

async fn kill_9_keeps_the_books(backend: Backend) {
    let db = TestDb::new(backend);
    let client = reqwest::Client::new();
    let mut server = start_server(&db, 9, &client).await;
    let event = create_event(&client, &server.base, "Books", SEATS).await;

    // At the kill, some charges are in the books with their purchase still pending (the
    // gateway had not answered yet).
    buy_until_killed(&mut server, &client, event, BUYERS).await;

    let before = answers(&db).await;
    let lines_before = db.count("SELECT COUNT(*) FROM gateway_ledger").await;
    let charged_in_flight = db.count("SELECT COUNT(*) FROM payments p JOIN gateway_ledger l ON l.payment_key = p.idempotency_key
         WHERE p.status = 'pending' AND l.kind != 'refund'",
    )
    .await;
    assert!(lines_before > 0, "nothing was charged before the kill");
    assert!(
        charged_in_flight > 0,
        "no charge was in the books with its purchase pending: the test proves nothing"
    );

    // Another seed draws other outcomes: recovery re-charging under the same keys gets the
    // old answers only if the gateway reads its books (a new process remembers nothing).
    let server = start_server(&db, 10, &client).await;

    let after = answers(&db).await;
    for (key, answer) in &before {
        assert_eq!(
            after.get(key),
            Some(answer),
            "{key} got another answer after the restart"
        );
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM payments WHERE status = 'pending'")
            .await,
        0,
        "every interrupted payment settled"
    );
    // I3 from the database itself: a confirmed order has one net charge, any other order none
    assert_eq!(
        db.count("SELECT COUNT(*) FROM payments p JOIN orders o ON o.id = p.order_id
             WHERE (CASE WHEN o.status = 'confirmed' THEN 1 ELSE 0 END) !=
                   (SELECT COUNT(*) FROM gateway_ledger l WHERE l.payment_key = p.idempotency_key AND l.kind = 'charge')
                 - (SELECT COUNT(*) FROM gateway_ledger l WHERE l.payment_key = p.idempotency_key AND l.kind = 'refund')"
        )
        .await,
        0
    );
    // I5: every key the gateway answered has its payment record
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM gateway_ledger l
             WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.idempotency_key = l.payment_key)"
        )
        .await,
        0
    );

    let audit: Value = client
        .get(format!("{}/api/v1/admin/audit", server.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit["ok"], true, "{audit}");
    assert_eq!(audit["invariants"]["I3_charge_exactly_once"], 0, "{audit}");
    assert_eq!(audit["invariants"]["I5_no_lost_payments"], 0, "{audit}");
    let audited = audit["ledgerEntries"].as_i64().unwrap();
    assert!(
        audited >= lines_before,
        "the audit read {audited} ledger lines, fewer than the {lines_before} written before the crash"
    );

    // the ledger served in pages is the whole of the books, before the crash and after
    let ledger = whole_ledger(&client, &server.base, 7).await;
    assert_eq!(ledger.len() as i64, audited);
    let seqs: Vec<i64> = ledger.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "pages overlap or skip back"
    );
    for key in before.keys() {
        let first_answers = ledger
            .iter()
            .filter(|l| l["key"] == key.as_str() && l["kind"] != "refund")
            .count();
        assert_eq!(first_answers, 1, "{key} answered {first_answers} times");
    }
    drop(server);
}

on_both_backends!(
    the_admin_ledger_is_served_in_capped_pages_linked_by_next,
    ledger_pages
);

async fn ledger_pages(backend: Backend) {
    let app = spawn_app_on(backend, StageKind::Actor, |s| s.payments.failure_rate = 0.5).await;
    let event = app.create_event(40).await;
    for i in 0..25 {
        app.purchase(event, &format!("u{i}")).await;
    }
    for prefix in ["/api/v1/admin/ledger", "/api/v2/admin/ledger"] {
        let get = |query: String| {
            let app = &app;
            async move {
                app.send(
                    reqwest::Method::GET,
                    &format!("{prefix}{query}"),
                    Some(ADMIN_TOKEN),
                    None,
                    None,
                )
                .await
            }
        };
        let all = get(String::new()).await;
        assert_eq!(all.status, 200, "{}", all.text);
        let entries = all.body["entries"].as_array().unwrap().clone();
        assert_eq!(
            entries.len(),
            25,
            "one line per purchase (charge or decline)"
        );
        assert!(all.body["next"].is_null(), "{}", all.text);

        let mut seen = Vec::new();
        let mut query = "?limit=10".to_owned();
        let mut pages = 0;
        loop {
            let page = get(query).await;
            assert_eq!(page.status, 200, "{}", page.text);
            assert_eq!(page.body["limit"], 10);
            seen.extend(page.body["entries"].as_array().unwrap().iter().cloned());
            pages += 1;
            match page.body["next"].as_str() {
                Some(next) => {
                    let (path, rest) = next.split_once('?').unwrap();
                    assert_eq!(path, prefix, "the next link stays on the route asked");
                    query = format!("?{rest}");
                }
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(
            seen, entries,
            "the pages together are the whole ledger, in order"
        );

        for bad in [
            "?limit=0",
            "?limit=1001",
            "?after=-1",
            "?limit=many",
            "?page=2",
        ] {
            let refused = get(bad.to_owned()).await;
            assert_eq!(refused.status, 400, "{prefix}{bad}: {}", refused.text);
            assert_eq!(refused.content_type, "application/problem+json");
            let code = refused.body["code"].as_str().unwrap();
            assert!(
                ["validation-failed", "invalid-query"].contains(&code),
                "{prefix}{bad}: {}",
                refused.text
            );
        }
    }
    // v2's ledger needs the admin token before anything else
    let anonymous = app.get("/api/v2/admin/ledger?limit=0").await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text);
    app.stop().await;
}
