//! `/api/v2/health` and `/api/v2/admin/*`: health, the audit, the gateway's ledger, the stage's
//! figures and its payment queue's counts. The admin routes need the admin token; health, audit
//! and ledger answer as their v1 twins in [`crate::api::admin`] do.

use actix_web::{web, HttpRequest, HttpResponse};

use crate::api::admin::LedgerQuery;
use crate::api::auth::require_admin;
use crate::api::openapi::{self, AdminAuthProblems, GatewayProblem, PagingProblem};
use crate::api::{AppState, Problem};

/// `GET /api/v2/health`: each dependency's state; 503 when one is down.
#[utoipa::path(
    get,
    path = "/api/v2/health",
    tag = "health",
    operation_id = "v2Health",
    responses(
        (status = 200, description = "Every dependency answers.", body = openapi::Health),
        (status = 503, description = "A dependency is down.", body = openapi::Health),
    ),
)]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    crate::api::admin::health(state).await
}

/// `GET /api/v2/admin/audit`
#[utoipa::path(
    get,
    path = "/api/v2/admin/audit",
    tag = "v2",
    operation_id = "v2AdminAudit",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Violation counts per invariant, per event.", body = crate::audit::AuditReport),
        AdminAuthProblems,
        GatewayProblem,
    ),
)]
pub async fn audit(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    crate::api::admin::audit(req, state).await
}

/// `GET /api/v2/admin/ledger`
#[utoipa::path(
    get,
    path = "/api/v2/admin/ledger",
    tag = "v2",
    operation_id = "v2AdminLedger",
    security(("admin_token" = [])),
    params(LedgerQuery),
    responses(
        (status = 200, description = "One page of the gateway's ledger: every run on this database, in the order written.", body = openapi::Ledger),
        PagingProblem,
        AdminAuthProblems,
        GatewayProblem,
    ),
)]
pub async fn ledger(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    // The v1 twin checks the admin token first.
    crate::api::admin::ledger(req, state).await
}

/// `GET /api/v2/admin/stats`: the stage's own figures (lock waits, queue, cache for `locked`).
#[utoipa::path(
    get,
    path = "/api/v2/admin/stats",
    tag = "v2",
    operation_id = "v2AdminStats",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The stage's figures; their shape depends on the stage.", body = Object),
        AdminAuthProblems,
    ),
)]
pub async fn stats(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    Ok(HttpResponse::Ok().json(state.stage.stats().await))
}

/// `GET /api/v2/admin/queue-stats`: the payment queue's counts (waiting, active, completed,
/// failed). Only a stage with a job queue has one (`locked`); the others answer 404.
#[utoipa::path(
    get,
    path = "/api/v2/admin/queue-stats",
    tag = "v2",
    operation_id = "v2AdminQueueStats",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Jobs waiting, active, completed and failed (dead-lettered).", body = Object),
        (status = 404, description = "This stage has no job queue (`no-queue`).", body = Problem, content_type = "application/problem+json"),
        AdminAuthProblems,
    ),
)]
pub async fn queue_stats(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    match state.stage.stats().await.get("queue") {
        Some(queue) => Ok(HttpResponse::Ok().json(queue)),
        None => Err(Problem::not_found(
            "no-queue",
            format!(
                "the {} stage has no job queue; the locked stage has one",
                state.stage.kind()
            ),
        )),
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NodesQuery {
    /// Also say which shard this event is on and which inventory node owns it now.
    #[param(minimum = 1)]
    event: Option<i64>,
}

/// `GET /api/v2/admin/nodes`: stage `services`' topology, every node with its role, id, pid,
/// address and state, and for each inventory node the shards it holds with their epochs;
/// with `?event=ID`, also that event's shard and its owner.
#[utoipa::path(
    get,
    path = "/api/v2/admin/nodes",
    tag = "v2",
    operation_id = "v2AdminNodes",
    security(("admin_token" = [])),
    params(NodesQuery),
    responses(
        (status = 200, description = "The nodes and the shards each inventory node holds; with `event`, an `event` field: `{id, shard, owner}` (`owner` null while the shard has none).", body = Object),
        (status = 400, description = "`event` not a positive integer (`validation-failed`), or an unknown parameter (`invalid-query`).", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "This stage runs as one process (`not-services`).", body = Problem, content_type = "application/problem+json"),
        AdminAuthProblems,
    ),
)]
pub async fn nodes(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<NodesQuery>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let event = match query.event {
        Some(id) if id <= 0 => {
            return Err(
                crate::domain::DomainError::invalid("event", "must be a positive integer").into(),
            )
        }
        other => other,
    };
    let Some(topology) = state.stage.topology().await else {
        return Err(Problem::not_found(
            "not-services",
            format!(
                "the {} stage runs as one process; stage services has nodes",
                state.stage.kind()
            ),
        ));
    };
    let mut topology = topology?;
    if let Some(id) = event {
        let shard = crate::store::shards::shard_of(crate::domain::EventId(id));
        let owner = topology["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| {
                n["shards"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|l| l["shard"] == shard))
            })
            .map(|n| n["id"].clone())
            .unwrap_or(serde_json::Value::Null);
        topology["event"] = serde_json::json!({ "id": id, "shard": shard, "owner": owner });
    }
    Ok(HttpResponse::Ok().json(topology))
}
