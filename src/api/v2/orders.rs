//! `/api/v2/orders`: place an order of N tickets (user, Idempotency-Key), answered `202
//! Accepted` while payment runs, and read it back; the `202` body is also what claim recovery
//! stores for an order a stopped run left open ([`accepted_answer`]).

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{fingerprint, idempotency_key, idempotent, order_view, parse_body, Answer, OrderView};
use crate::api::auth::require_user;
use crate::api::openapi::{BodyProblems, KeyReusedProblem, UnknownEventProblem, UserAuthProblems};
use crate::api::{AppState, Problem};
use crate::domain::{parse_quantity, DomainError, EventId, Order, OrderId, OrderStatus};
use crate::stages::OrderRequest;
use crate::store::OrderKey;

/// The `202 Accepted` body of a freshly placed order: the order as it was when accepted. It is
/// what the client is sent and what its Idempotency-Key stores (with the order itself, or by
/// recovery for a claim a stopped run left open), so every replay is the same bytes.
pub fn accepted_answer(order: &Order) -> String {
    let mut at_acceptance = order.clone();
    at_acceptance.status = OrderStatus::Pending;
    at_acceptance.cancel_reason = None;
    at_acceptance.updated_at = at_acceptance.created_at.clone();
    serde_json::to_value(order_view(&at_acceptance))
        .unwrap_or(Value::Null)
        .to_string()
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NewOrderBody {
    #[schema(minimum = 1)]
    event_id: i64,
    /// Tickets in the order, all or nothing.
    #[schema(minimum = 1, maximum = 100)]
    quantity: i64,
}

/// `POST /api/v2/orders` (user, Idempotency-Key): holds the seats and answers `202` with the
/// order and its status URL; payment goes on in the background.
#[utoipa::path(
    post,
    path = "/api/v2/orders",
    tag = "v2",
    operation_id = "v2CreateOrder",
    security(("user_token" = [])),
    params(("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$", description = "1 to 255 visible ASCII characters, e.g. a UUID. A retry with the same key and request gets the stored answer (with `Idempotent-Replayed: true`).")),
    request_body = NewOrderBody,
    responses(
        (status = 202, description = "Accepted: the seats are held and payment runs; poll the order's URL.", body = OrderView,
            headers(("Location" = String, description = "The order's status URL."), ("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same key."))),
        (status = 400, description = "Malformed JSON, a wrong, unknown or missing field, a value out of range, or a missing or invalid Idempotency-Key.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The event's state refuses the order: no tickets left (`sold-out`), every free ticket held by buyers still paying (`tickets-held`, with `Retry-After`), not enough tickets left (`not-enough-tickets`), the per-user limit (`user-limit`); or a request with this Idempotency-Key still running (`idempotency-key-in-use`).", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Past this client's rate limit (`rate-limited`), with `Retry-After`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or a dependency is down (`overloaded`, `dependency-unavailable`), with `Retry-After`.", body = Problem, content_type = "application/problem+json"),
        UserAuthProblems,
        UnknownEventProblem,
        KeyReusedProblem,
        BodyProblems,
    ),
)]
pub async fn create_order(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, Problem> {
    let user = require_user(&req, &state).await?;
    crate::meter::record_id("user_id", &user);
    state.limiters.order(user.as_str())?;
    let key = idempotency_key(&req)?;
    let body = crate::api::integral_numbers(body.into_inner());
    let print = fingerprint(&req, &body);
    let parsed: NewOrderBody = parse_body(body)?;
    if parsed.event_id <= 0 {
        return Err(DomainError::invalid("eventId", "must be a positive integer").into());
    }
    crate::meter::record_id("event_id", &parsed.event_id);
    let request = OrderRequest {
        event: EventId(parsed.event_id),
        user: user.clone(),
        quantity: parse_quantity(parsed.quantity)?,
        per_user_limit: state.settings.per_user_limit,
        // The key's answer is stored in the order's own transaction (where the stage can).
        idempotency: Some(OrderKey {
            key: key.clone(),
            status: StatusCode::ACCEPTED.as_u16(),
            render: accepted_answer,
        }),
        order: None,
    };
    let stage = Arc::clone(&state.stage);
    // The order is placed in a task of its own: it records its id on this request's span.
    let span = tracing::Span::current();
    idempotent(&state, &user, &key, print, async move {
        let started = std::time::Instant::now();
        let placed = stage.place_order(request).await;
        crate::meter::purchase_answered(started, placed.as_ref().err());
        let order = placed.map_err(order_refused)?;
        span.record("order_id", tracing::field::display(&order.id));
        Ok(Answer {
            status: StatusCode::ACCEPTED,
            body: accepted_answer(&order),
        })
    })
    .await
}

/// `GET /api/v2/orders/{id}`: the caller's own order; anyone else's is 404, like a missing one.
#[utoipa::path(
    get,
    path = "/api/v2/orders/{id}",
    tag = "v2",
    operation_id = "v2GetOrder",
    security(("user_token" = [])),
    params(("id" = String, Path, format = Uuid, description = "The order's id.")),
    responses(
        (status = 200, description = "The order, its status and tickets.", body = OrderView),
        (status = 404, description = "No such order, or another user's (`unknown-order`).", body = Problem, content_type = "application/problem+json"),
        UserAuthProblems,
    ),
)]
pub async fn get_order(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let user = require_user(&req, &state).await?;
    let missing = || Problem::not_found("unknown-order", format!("no order with id {id}"));
    let order_id = uuid::Uuid::parse_str(&id).map_err(|_| missing())?;
    match state.stage.order(OrderId(order_id)).await? {
        Some(order) if order.user_id == user.as_str() => {
            Ok(HttpResponse::Ok().json(order_view(&order)))
        }
        _ => Err(missing()),
    }
}

/// API v2 answers an order that the event's state refuses `409 Conflict` (RFC 9110: the
/// request conflicts with the target's current state), `sold-out` and `tickets-held` included;
/// API v1 keeps the seed's `400` for those two.
fn order_refused(e: crate::stages::PurchaseError) -> Problem {
    use crate::stages::PurchaseError as E;
    let state_refused = matches!(e, E::SoldOut | E::AllHeld);
    let mut problem = Problem::from(e);
    if state_refused {
        problem.status = StatusCode::CONFLICT.as_u16();
    }
    problem
}

/// One event of an order's saga, as `GET /api/v2/orders/{id}/events` lists it.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SagaEventView {
    /// The event's place in its saga, from 1.
    version: i64,
    /// `OrderPlaced`, `SeatsHeld`, `ChargeRequested`, `PaymentSucceeded`, `PaymentDeclined`,
    /// `HoldExpired`, `ReleaseRequested`, `SeatsReleased`, `RefundRequested`, `RefundIssued`,
    /// `HoldLost`, `OrderConfirmed`, `OrderCancelled`.
    #[serde(rename = "type")]
    kind: String,
    /// The version of the event's stored form.
    schema_version: i32,
    #[schema(format = DateTime)]
    at: String,
    /// The event's fields as stored.
    #[schema(value_type = Object)]
    data: Value,
}

/// `GET /api/v2/orders/{id}/events` (stage `saga`): the caller's own order's saga events, in
/// order; anyone else's order is 404, like a missing one.
#[utoipa::path(
    get,
    path = "/api/v2/orders/{id}/events",
    tag = "v2",
    operation_id = "v2GetOrderEvents",
    security(("user_token" = [])),
    params(("id" = String, Path, format = Uuid, description = "The order's id.")),
    responses(
        (status = 200, description = "The order's saga events, oldest first.", body = Vec<SagaEventView>),
        (status = 404, description = "No such order, or another user's (`unknown-order`); or this stage keeps no event log (`no-event-log`).", body = Problem, content_type = "application/problem+json"),
        UserAuthProblems,
    ),
)]
pub async fn order_events(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let user = require_user(&req, &state).await?;
    let missing = || Problem::not_found("unknown-order", format!("no order with id {id}"));
    let order_id = OrderId(uuid::Uuid::parse_str(&id).map_err(|_| missing())?);
    match state.stage.order(order_id).await? {
        Some(order) if order.user_id == user.as_str() => {}
        _ => return Err(missing()),
    }
    let Some(events) = state.stage.order_events(order_id).await else {
        return Err(Problem::not_found(
            "no-event-log",
            format!(
                "the {} stage keeps no event log; stage saga does",
                state.stage.kind()
            ),
        ));
    };
    let views: Vec<SagaEventView> = events?
        .into_iter()
        .map(|e| SagaEventView {
            version: e.version,
            kind: e.kind,
            schema_version: e.schema_version,
            at: e.at,
            data: e.data,
        })
        .collect();
    Ok(HttpResponse::Ok().json(views))
}
