//! Health, the payment gateway's ledger and the audit.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::openapi::GatewayProblem;
use super::{AppState, Problem};
use crate::audit;

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

/// `GET /api/v1/admin/ledger`: every charge, decline and refund the gateway made.
#[utoipa::path(
    get,
    path = "/api/v1/admin/ledger",
    tag = "v1",
    operation_id = "v1AdminLedger",
    responses(
        (status = 200, description = "The gateway's ledger (this process).", body = super::openapi::Ledger),
        GatewayProblem,
    ),
)]
pub async fn ledger(state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    let entries = state.payments.ledger().await?;
    Ok(HttpResponse::Ok().json(json!({ "entries": entries })))
}

/// `GET /api/v1/admin/audit`: the invariants I1-I6 checked against storage and the ledger.
#[utoipa::path(
    get,
    path = "/api/v1/admin/audit",
    tag = "v1",
    operation_id = "v1AdminAudit",
    responses(
        (status = 200, description = "Violation counts per invariant, per event.", body = audit::AuditReport),
        GatewayProblem,
    ),
)]
pub async fn audit(state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    let records = state.stage.records();
    let counts = records.event_counts().await?;
    let payments = records.payment_records().await?;
    let ledger = state.payments.ledger().await?;
    Ok(HttpResponse::Ok().json(audit::audit(&counts, &payments, &ledger)))
}

/// `GET /api/v1/admin/stats`: the stage's own figures (for `locked`: lock waits and the queue).
#[utoipa::path(
    get,
    path = "/api/v1/admin/stats",
    tag = "v1",
    operation_id = "v1AdminStats",
    responses(
        (status = 200, description = "The stage's own figures; their shape depends on the stage.", body = Object),
    ),
)]
pub async fn stats(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.stage.stats().await)
}
