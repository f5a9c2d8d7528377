//! Health, the payment gateway's ledger and the audit.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use super::auth::require_admin;
use super::openapi::{AdminAuthProblems, GatewayProblem, PagingProblem};
use super::{AppState, Problem};
use crate::audit;
use crate::domain::DomainError;
use crate::payments::LedgerEntry;

/// `GET /health`: 200 when every dependency (the database first) answers, 503 otherwise.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    operation_id = "health",
    responses(
        (status = 200, description = "The database answers.", body = super::openapi::Health),
        (status = 503, description = "The database does not answer.", body = super::openapi::Health),
    ),
)]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let dependencies = state.stage.dependencies().await;
    let healthy = dependencies.iter().all(|(_, up)| *up);
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "stage": state.stage.kind(),
        "dependencies": dependencies
            .iter()
            .map(|(name, up)| (name.to_string(), json!(if *up { "ok" } else { "down" })))
            .collect::<serde_json::Map<_, _>>(),
    });
    if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Largest page of ledger lines one request may ask for.
pub const MAX_LEDGER_PAGE: u32 = 1000;
/// Ledger lines per page when the request does not say.
const DEFAULT_LEDGER_PAGE: u32 = 500;
const _: () = assert!(DEFAULT_LEDGER_PAGE <= MAX_LEDGER_PAGE);

/// Paging through the ledger: up to `limit` lines after position `after`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    /// Page size, 1 to 1000 (default 500).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only lines after this position (a line's `seq`; default 0, from the start). Each page's
    /// `next` link carries the right value.
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    after: Option<i64>,
}

/// One page of the ledger, as asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerPage {
    pub limit: u32,
    pub after: i64,
}

impl LedgerQuery {
    /// Reads the query string: 400 `invalid-query` if it does not parse, `validation-failed`
    /// (with `field`) for a value out of range.
    pub fn from_request(req: &HttpRequest) -> Result<Self, Problem> {
        web::Query::<Self>::from_query(req.query_string())
            .map(web::Query::into_inner)
            .map_err(super::problem::invalid_query)
    }

    pub fn page(&self) -> Result<LedgerPage, Problem> {
        let limit = self.limit.unwrap_or(DEFAULT_LEDGER_PAGE);
        if !(1..=MAX_LEDGER_PAGE).contains(&limit) {
            return Err(DomainError::invalid("limit", "must be between 1 and 1000").into());
        }
        let after = self.after.unwrap_or(0);
        if after < 0 {
            return Err(DomainError::invalid("after", "must not be negative").into());
        }
        Ok(LedgerPage { limit, after })
    }
}

impl LedgerPage {
    /// The link to the page after `entries`, which holds this page's lines and, beyond
    /// `limit`, one more if the ledger goes on.
    fn next(&self, path: &str, entries: &[LedgerEntry]) -> Option<String> {
        if entries.len() <= self.limit as usize {
            return None;
        }
        let last = &entries[self.limit as usize - 1];
        Some(format!("{path}?limit={}&after={}", self.limit, last.seq))
    }
}

/// `GET /api/v1/admin/ledger`: every charge, decline and refund the gateway made, one page at a
/// time, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/admin/ledger",
    tag = "v1",
    operation_id = "v1AdminLedger",
    security(("admin_token" = [])),
    params(LedgerQuery),
    responses(
        (status = 200, description = "One page of the gateway's ledger: every run on this database, in the order written.", body = super::openapi::Ledger),
        PagingProblem,
        AdminAuthProblems,
        GatewayProblem,
    ),
)]
pub async fn ledger(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    // The token first: a caller without one learns nothing from the paging parameters.
    require_admin(&req, &state).await?;
    let page = LedgerQuery::from_request(&req)?.page()?;
    // One line more than the page tells whether another page follows.
    let mut entries = state
        .payments
        .ledger_page(page.after, page.limit + 1)
        .await?;
    let next = page.next(req.path(), &entries);
    entries.truncate(page.limit as usize);
    Ok(HttpResponse::Ok().json(json!({
        "entries": entries,
        "limit": page.limit,
        "after": page.after,
        "next": next,
    })))
}

/// `GET /api/v1/admin/audit`: the invariants I1-I6 checked against storage and the gateway's
/// books, summed by the database (never the whole ledger in memory).
#[utoipa::path(
    get,
    path = "/api/v1/admin/audit",
    tag = "v1",
    operation_id = "v1AdminAudit",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Violation counts per invariant, per event.", body = audit::AuditReport),
        AdminAuthProblems,
        GatewayProblem,
    ),
)]
pub async fn audit(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    // What is under way is read first: work that ends between this read and the counts below
    // can only make the counts more settled, never hide a payment still in flight.
    let mut activity = state.stage.activity().await;
    // added to what the stage counted: stage `services` sums its inventory nodes' payments
    // under way there, which this process's gateway handle never sees
    activity.payments_in_flight += state.payments.in_flight() as i64;
    let records = state.stage.records();
    activity.pending_orders = records.pending_orders().await?;
    let counts = records.event_counts().await?;
    activity.pending_tickets = counts.iter().map(|c| c.pending).sum();
    if activity.pending_stranded {
        // stranded only if no purchase started while the rows were counted
        let again = state.stage.activity().await;
        if !again.pending_stranded || again.work_started != activity.work_started {
            activity.pending_stranded = false;
            activity.purchases_running = activity.purchases_running.max(1);
        }
    }
    let books = state.payments.reconciliation().await?;
    Ok(HttpResponse::Ok().json(audit::audit(&counts, &books, activity)))
}

/// `GET /api/v1/admin/stats`: the stage's own figures (for `locked`: lock waits and the queue).
#[utoipa::path(
    get,
    path = "/api/v1/admin/stats",
    tag = "v1",
    operation_id = "v1AdminStats",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The stage's own figures; their shape depends on the stage.", body = Object),
        AdminAuthProblems,
    ),
)]
pub async fn stats(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    Ok(HttpResponse::Ok().json(state.stage.stats().await))
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;
    use crate::payments::LedgerKind;

    fn page(query: &str) -> Result<LedgerPage, Problem> {
        let req = TestRequest::with_uri(&format!("/api/v1/admin/ledger?{query}")).to_http_request();
        LedgerQuery::from_request(&req)?.page()
    }

    fn lines(seqs: impl IntoIterator<Item = i64>) -> Vec<LedgerEntry> {
        seqs.into_iter()
            .map(|seq| LedgerEntry {
                seq,
                key: format!("order-{seq}"),
                kind: LedgerKind::Charge,
                amount_cents: 100,
                charge_id: None,
                at: "2026-01-01T00:00:00.000Z".into(),
            })
            .collect()
    }

    #[test]
    fn no_parameters_ask_for_the_first_default_page() {
        assert_eq!(
            page("").unwrap(),
            LedgerPage {
                limit: DEFAULT_LEDGER_PAGE,
                after: 0
            }
        );
        assert_eq!(
            page("limit=1000&after=42").unwrap(),
            LedgerPage {
                limit: 1000,
                after: 42
            }
        );
    }

    #[test]
    fn a_page_size_beyond_the_cap_or_a_negative_cursor_is_a_400_naming_the_field() {
        for (query, field) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("after=-1", "after"),
        ] {
            let problem = page(query).unwrap_err();
            assert_eq!(problem.status, 400, "{query}");
            assert_eq!(problem.code, "validation-failed", "{query}");
            assert_eq!(problem.field, Some(field), "{query}");
        }
    }

    #[test]
    fn a_paging_parameter_of_the_wrong_type_or_an_unknown_one_is_an_invalid_query() {
        for query in [
            "limit=ten",
            "after=x",
            "limit=-5",
            "offset=3",
            "after=99999999999999999999",
        ] {
            let problem = page(query).unwrap_err();
            assert_eq!(problem.status, 400, "{query}");
            assert_eq!(problem.code, "invalid-query", "{query}");
        }
    }

    #[test]
    fn a_next_link_follows_a_full_page_only_and_starts_after_its_last_line() {
        let page = LedgerPage {
            limit: 3,
            after: 10,
        };
        let path = "/api/v2/admin/ledger";
        assert_eq!(
            page.next(path, &lines(11..=13)),
            None,
            "exactly one page left"
        );
        assert_eq!(page.next(path, &lines([])), None);
        assert_eq!(
            page.next(path, &lines([11, 12, 15, 16])).as_deref(),
            Some("/api/v2/admin/ledger?limit=3&after=15"),
            "gaps in the positions are skipped"
        );
    }
}
