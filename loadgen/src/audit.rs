//! The audit after a run: the server's own check (I1-I6, `GET /api/v1/admin/audit`), the
//! payment gateway's ledger (`GET /api/v1/admin/ledger`) and the client's record of what each
//! buyer saw against what the server stored (I7). I8 needs idempotency keys (API v2).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::driver::{BuyerRecord, Fixture};
use crate::http::{Conn, Failure};

/// One invariant's verdict.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Invariant {
    /// `I1` ... `I8`.
    pub id: &'static str,
    pub name: &'static str,
    /// `pass`, `fail`, `not-applicable` or `unavailable`.
    pub status: &'static str,
    /// Violations counted; absent when not checked.
    pub violations: Option<i64>,
    pub detail: String,
}

/// The ledger summed up.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerSummary {
    pub charges: u64,
    pub declines: u64,
    pub refunds: u64,
    /// Charges minus refunds, in cents.
    pub net_charged_cents: i64,
}

/// The client's view against storage (I7).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientView {
    pub buyers: u64,
    /// `201` answers the buyers got.
    pub successes_seen: u64,
    /// Tickets stored confirmed for this run's buyers on this run's events.
    pub confirmed_stored: u64,
    /// A `201` whose ticket is not stored confirmed for that buyer.
    pub missing_successes: u64,
    /// Confirmed tickets beyond what a buyer's `201`s and unknown outcomes can explain
    /// (a definite failure that left a ticket).
    pub unexplained_confirmed: u64,
    /// Requests without a trustworthy answer, and what they turned out to be.
    pub unknown_outcomes: u64,
    pub unknown_resolved_confirmed: u64,
    pub unknown_resolved_nothing: u64,
    /// Buyers whose tickets could not be read back.
    pub unreadable_buyers: u64,
    /// I8 (API v2): idempotency keys used, one per buyer.
    pub idempotency_keys: u64,
    /// I8: stored orders that no `202` named and no unknown outcome explains (a key that made
    /// two orders, or an order from a refused request).
    pub extra_orders: u64,
    /// I8: answers to a resent request that named another order or contradicted the `202`.
    pub disagreeing_answers: u64,
}

/// Whether the server was quiet (nothing pending, held, in flight, queued or unflushed) when
/// it was audited. Only a quiet server's counts are a verdict: a payment still in flight is not
/// yet a violation.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Quiet {
    /// The server reported quiet before `--settle` ran out.
    pub quiet: bool,
    /// How long the load generator waited for it, in milliseconds.
    pub waited_ms: u64,
    /// The server's counts of work under way at the last look (its audit's `activity`).
    pub activity: Option<Value>,
}

impl Quiet {
    /// The counts that are not zero, as `name n, name n` (`-` if the server gave none).
    pub fn busy(&self) -> String {
        let Some(activity) = self.activity.as_ref().and_then(Value::as_object) else {
            return "-".into();
        };
        let busy: Vec<String> = activity
            .iter()
            .filter(|(_, v)| v.as_i64() != Some(0) && v.as_bool() != Some(false))
            .map(|(k, v)| match v.as_i64() {
                Some(n) => format!("{k} {n}"),
                None => format!("{k} {v}"),
            })
            .collect();
        if busy.is_empty() {
            "-".into()
        } else {
            busy.join(", ")
        }
    }
}

/// Everything the audit found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Audit {
    /// True when the server was quiet and every checked invariant passed.
    pub ok: bool,
    pub quiet: Quiet,
    pub invariants: Vec<Invariant>,
    pub client: ClientView,
    pub ledger: Option<LedgerSummary>,
    /// The server's audit document as it answered, for the details (per-event counts).
    pub server: Option<Value>,
    /// Why part of the audit could not be done, if so.
    pub notes: Vec<String>,
}

impl Audit {
    pub fn violations(&self, id: &str) -> Option<i64> {
        self.invariants
            .iter()
            .find(|i| i.id == id)
            .and_then(|i| i.violations)
    }

    pub fn total_violations(&self) -> i64 {
        self.invariants.iter().filter_map(|i| i.violations).sum()
    }
}

/// The invariants of SPEC section 5, by id and name.
pub const NAMES: [(&str, &str); 8] = [
    ("I1", "no oversell"),
    ("I2", "no double sale"),
    ("I3", "charge exactly once"),
    ("I4", "no lost tickets"),
    ("I5", "no lost payments"),
    ("I6", "conservation"),
    ("I7", "client and server agree"),
    ("I8", "idempotency"),
];

/// Audits the server after a run. Waits up to `settle` for the server to be quiet first; if it
/// is not quiet by then, no invariant is judged (each is `not-quiet`) and the counts of what
/// was still under way are reported instead.
pub async fn audit(
    addr: SocketAddr,
    fixture: &Fixture,
    buyers: &[BuyerRecord],
    settle: Duration,
    admin_token: &str,
) -> Audit {
    let mut conn = Conn::new(addr, Duration::from_secs(30));
    let mut notes = vec![];
    let admin = Admin(format!("Bearer {admin_token}"));
    let (server, quiet) = settled_audit(&mut conn, &admin, settle, &mut notes).await;
    let ledger = read_ledger(&mut conn, &admin, &mut notes).await;
    let client = check_client(addr, fixture, buyers, &mut notes).await;
    let mut invariants = judge(server.as_ref(), &client);
    if server.is_some() && !quiet.quiet {
        let why = format!(
            "not judged: the server was not quiet after waiting {} ({})",
            humantime::format_duration(Duration::from_millis(quiet.waited_ms)),
            quiet.busy()
        );
        notes.push(why.clone());
        for inv in &mut invariants {
            if inv.status != "not-applicable" {
                inv.status = "not-quiet";
                inv.violations = None;
                inv.detail = why.clone();
            }
        }
    }
    let ok = quiet.quiet && invariants.iter().all(|i| i.status != "fail");
    Audit {
        ok,
        quiet,
        invariants,
        client,
        ledger,
        server,
        notes,
    }
}

/// The verdict on each invariant, from the server's audit (I1-I6) and the client's view (I7,
/// I8).
fn judge(server: Option<&Value>, client: &ClientView) -> Vec<Invariant> {
    let mut invariants = Vec::with_capacity(8);
    for (id, name) in NAMES.iter().take(6) {
        let found = server.and_then(|s| server_count(s, id));
        invariants.push(match found {
            Some((key, n)) => Invariant {
                id,
                name,
                status: if n == 0 { "pass" } else { "fail" },
                violations: Some(n),
                detail: format!("server audit `{key}`"),
            },
            None => Invariant {
                id,
                name,
                status: "unavailable",
                violations: None,
                detail: "the server's audit did not report it".into(),
            },
        });
    }
    let i7 =
        (client.missing_successes + client.unexplained_confirmed + client.unreadable_buyers) as i64;
    invariants.push(Invariant {
        id: "I7",
        name: NAMES[6].1,
        status: if i7 == 0 { "pass" } else { "fail" },
        violations: Some(i7),
        detail: format!(
            "{} buyers: {} successes seen, {} confirmed stored, {} missing, {} unexplained, \
             {} unknown outcomes ({} resolved confirmed, {} to nothing)",
            client.buyers,
            client.successes_seen,
            client.confirmed_stored,
            client.missing_successes,
            client.unexplained_confirmed,
            client.unknown_outcomes,
            client.unknown_resolved_confirmed,
            client.unknown_resolved_nothing
        ),
    });
    invariants.push(if client.idempotency_keys == 0 {
        Invariant {
            id: "I8",
            name: NAMES[7].1,
            status: "not-applicable",
            violations: None,
            detail: "not applicable: no idempotency keys sent (API v1)".into(),
        }
    } else {
        let n = (client.extra_orders + client.disagreeing_answers) as i64;
        Invariant {
            id: "I8",
            name: NAMES[7].1,
            status: if n == 0 { "pass" } else { "fail" },
            violations: Some(n),
            detail: format!(
                "{} keys: {} stored orders no 202 named, {} answers disagreeing with their key's first 202",
                client.idempotency_keys, client.extra_orders, client.disagreeing_answers
            ),
        }
    });
    invariants
}

/// Finds the count for `I1` under the server's name for it (`I1_no_oversell`).
fn server_count(server: &Value, id: &str) -> Option<(String, i64)> {
    let map = server.get("invariants")?.as_object()?;
    let prefix = format!("{id}_");
    map.iter()
        .find(|(k, _)| k.as_str() == id || k.starts_with(&prefix))
        .and_then(|(k, v)| v.as_i64().map(|n| (k.clone(), n)))
}

/// The `Authorization` header of the admin routes.
struct Admin(String);

impl Admin {
    async fn get(&self, conn: &mut Conn, path: &str) -> Result<crate::http::Response, Failure> {
        conn.send("GET", path, &[("Authorization", &self.0)], None)
            .await
    }
}

/// A note for an admin route's answer, with the fix for a refused token.
fn refused(path: &str, status: u16) -> String {
    if status == 401 || status == 403 {
        format!("GET {path} answered {status}: give loadgen the server's --admin-token")
    } else {
        format!("GET {path} answered {status}")
    }
}

/// Polls the server's audit until it says it is quiet, or `settle` runs out; returns the last
/// audit document. A server that does not report `quiet` counts as quiet once nothing is
/// pending (I4 zero).
async fn settled_audit(
    conn: &mut Conn,
    admin: &Admin,
    settle: Duration,
    notes: &mut Vec<String>,
) -> (Option<Value>, Quiet) {
    let started = Instant::now();
    let give_up = started + settle;
    let mut quiet = Quiet {
        quiet: false,
        waited_ms: 0,
        activity: None,
    };
    loop {
        let doc = match admin.get(conn, "/api/v1/admin/audit").await {
            Ok(r) if r.status == 200 => match serde_json::from_slice::<Value>(&r.body) {
                Ok(v) => v,
                Err(e) => {
                    notes.push(format!("the server's audit is not JSON: {e}"));
                    return (None, quiet);
                }
            },
            Ok(r) => {
                notes.push(refused("/api/v1/admin/audit", r.status));
                return (None, quiet);
            }
            Err(f) => {
                notes.push(format!("GET /api/v1/admin/audit: {}", f.as_str()));
                return (None, quiet);
            }
        };
        quiet.quiet = match doc.get("quiet").and_then(Value::as_bool) {
            Some(q) => q,
            None => server_count(&doc, "I4").is_some_and(|(_, n)| n == 0),
        };
        quiet.activity = doc.get("activity").cloned();
        quiet.waited_ms = started.elapsed().as_millis() as u64;
        if quiet.quiet || Instant::now() >= give_up {
            return (Some(doc), quiet);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sums the whole ledger, following its pages (`next`) to the end.
async fn read_ledger(
    conn: &mut Conn,
    admin: &Admin,
    notes: &mut Vec<String>,
) -> Option<LedgerSummary> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Entry {
        kind: String,
        amount_cents: i64,
    }
    #[derive(Deserialize)]
    struct Page {
        entries: Vec<Entry>,
        next: Option<String>,
    }
    let mut sum = LedgerSummary::default();
    let mut path = Some("/api/v1/admin/ledger?limit=1000".to_owned());
    while let Some(current) = path.take() {
        let answer = match admin.get(conn, &current).await {
            Ok(r) if r.status == 200 => r,
            Ok(r) => {
                notes.push(refused(&current, r.status));
                return None;
            }
            Err(f) => {
                notes.push(format!("GET {current}: {}", f.as_str()));
                return None;
            }
        };
        let page: Page = match serde_json::from_slice(&answer.body) {
            Ok(p) => p,
            Err(e) => {
                notes.push(format!("the ledger is not as expected: {e}"));
                return None;
            }
        };
        for e in page.entries {
            match e.kind.as_str() {
                "charge" => {
                    sum.charges += 1;
                    sum.net_charged_cents += e.amount_cents;
                }
                "refund" => {
                    sum.refunds += 1;
                    sum.net_charged_cents -= e.amount_cents;
                }
                _ => sum.declines += 1,
            }
        }
        path = page.next;
    }
    Some(sum)
}

/// Reads back every buyer's tickets (a few connections in parallel) and compares.
async fn check_client(
    addr: SocketAddr,
    fixture: &Fixture,
    buyers: &[BuyerRecord],
    notes: &mut Vec<String>,
) -> ClientView {
    const READERS: usize = 8;
    let events: HashSet<i64> = fixture.event_ids.iter().copied().collect();
    let mut view = ClientView {
        buyers: buyers.len() as u64,
        ..ClientView::default()
    };
    if buyers.is_empty() {
        return view;
    }
    let chunk = buyers.len().div_ceil(READERS);
    let mut tasks = Vec::new();
    for part in buyers.chunks(chunk) {
        let part: Vec<BuyerRecord> = part.to_vec();
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr, Duration::from_secs(30));
            let mut view = ClientView::default();
            let mut errors = BTreeMap::new();
            for b in &part {
                let stored = match &b.token {
                    Some(token) => stored_orders(&mut conn, token, &events).await,
                    None => stored_confirmed(&mut conn, &b.user_id, &events)
                        .await
                        .map(|confirmed| (confirmed, 0)),
                };
                match stored {
                    Ok((stored, orders)) => {
                        compare(b, &stored, &mut view);
                        if b.token.is_some() {
                            // every stored order must be one a 202 named, or one whose
                            // answer was lost (an unknown outcome)
                            let explained = b.orders_seen.len() as u64 + u64::from(b.unknown);
                            view.idempotency_keys += u64::from(b.keys_used);
                            view.extra_orders += orders.saturating_sub(explained);
                            view.disagreeing_answers += u64::from(b.disagreeing_answers);
                        }
                    }
                    Err(e) => {
                        view.unreadable_buyers += 1;
                        *errors.entry(e).or_insert(0u64) += 1;
                    }
                }
            }
            (view, errors)
        }));
    }
    for t in tasks {
        match t.await {
            Ok((v, errors)) => {
                view.successes_seen += v.successes_seen;
                view.confirmed_stored += v.confirmed_stored;
                view.missing_successes += v.missing_successes;
                view.unexplained_confirmed += v.unexplained_confirmed;
                view.unknown_outcomes += v.unknown_outcomes;
                view.unknown_resolved_confirmed += v.unknown_resolved_confirmed;
                view.unknown_resolved_nothing += v.unknown_resolved_nothing;
                view.unreadable_buyers += v.unreadable_buyers;
                view.idempotency_keys += v.idempotency_keys;
                view.extra_orders += v.extra_orders;
                view.disagreeing_answers += v.disagreeing_answers;
                for (e, n) in errors {
                    notes.push(format!("reading back tickets: {e} ({n} buyers)"));
                }
            }
            Err(e) => notes.push(format!("a read-back task failed: {e}")),
        }
    }
    view
}

fn compare(b: &BuyerRecord, stored: &[String], view: &mut ClientView) {
    view.successes_seen += b.tickets.len() as u64;
    view.confirmed_stored += stored.len() as u64;
    view.unknown_outcomes += u64::from(b.unknown);
    let stored_set: HashSet<&str> = stored.iter().map(String::as_str).collect();
    let seen: HashSet<&str> = b.tickets.iter().map(String::as_str).collect();
    view.missing_successes += b
        .tickets
        .iter()
        .filter(|t| !stored_set.contains(t.as_str()))
        .count() as u64;
    let extra = stored.iter().filter(|t| !seen.contains(t.as_str())).count() as u64;
    let explained = extra.min(u64::from(b.unknown));
    view.unexplained_confirmed += extra - explained;
    view.unknown_resolved_confirmed += explained;
    view.unknown_resolved_nothing += u64::from(b.unknown) - explained;
}

/// API v2: the ids of the buyer's confirmed orders on this run's events, and how many orders
/// it has there in all.
async fn stored_orders(
    conn: &mut Conn,
    token: &str,
    events: &HashSet<i64>,
) -> Result<(Vec<String>, u64), String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Order {
        id: String,
        event_id: i64,
        status: String,
    }
    #[derive(Deserialize)]
    struct Orders {
        items: Vec<Order>,
    }
    let auth = format!("Bearer {token}");
    let answer = conn
        .send(
            "GET",
            "/api/v2/users/me/orders",
            &[("Authorization", &auth)],
            None,
        )
        .await
        .map_err(|f| f.as_str().to_owned())?;
    if answer.status != 200 {
        return Err(format!(
            "GET /api/v2/users/me/orders answered {}",
            answer.status
        ));
    }
    let orders: Orders =
        serde_json::from_slice(&answer.body).map_err(|e| format!("unexpected order list: {e}"))?;
    let ours: Vec<Order> = orders
        .items
        .into_iter()
        .filter(|o| events.contains(&o.event_id))
        .collect();
    let count = ours.len() as u64;
    Ok((
        ours.into_iter()
            .filter(|o| o.status == "confirmed")
            .map(|o| o.id)
            .collect(),
        count,
    ))
}

/// The ids of the user's tickets that are confirmed, on this run's events.
async fn stored_confirmed(
    conn: &mut Conn,
    user: &str,
    events: &HashSet<i64>,
) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Ticket {
        id: String,
        event_id: i64,
        status: String,
    }
    let answer = conn
        .get(&format!("/api/v1/tickets/user/{user}"))
        .await
        .map_err(|f| f.as_str().to_owned())?;
    if answer.status != 200 {
        return Err(format!(
            "GET /api/v1/tickets/user answered {}",
            answer.status
        ));
    }
    let tickets: Vec<Ticket> =
        serde_json::from_slice(&answer.body).map_err(|e| format!("unexpected ticket list: {e}"))?;
    Ok(tickets
        .into_iter()
        .filter(|t| t.status == "confirmed" && events.contains(&t.event_id))
        .map(|t| t.id)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::BuyerEnd;

    fn buyer(tickets: &[&str], unknown: u32) -> BuyerRecord {
        BuyerRecord {
            user_id: "u".into(),
            event_id: 1,
            tickets: tickets.iter().map(|t| t.to_string()).collect(),
            token: None,
            orders_seen: vec![],
            disagreeing_answers: 0,
            keys_used: 0,
            definite_failures: 1,
            unknown,
            end: BuyerEnd::Confirmed,
        }
    }

    #[test]
    fn a_success_the_server_lost_is_a_violation() {
        let mut v = ClientView::default();
        compare(&buyer(&["a"], 0), &[], &mut v);
        assert_eq!(v.missing_successes, 1);
    }

    #[test]
    fn a_ticket_after_a_definite_failure_is_a_violation_but_an_unknown_outcome_explains_one() {
        let mut v = ClientView::default();
        compare(&buyer(&[], 0), &["x".into()], &mut v);
        assert_eq!(v.unexplained_confirmed, 1);
        let mut v = ClientView::default();
        compare(&buyer(&[], 1), &["x".into()], &mut v);
        assert_eq!(
            (v.unexplained_confirmed, v.unknown_resolved_confirmed),
            (0, 1)
        );
    }
}
