//! API v2: discovery, users and tokens, searchable events with links, orders of N tickets
//! answered `202 Accepted`, an availability stream, and Idempotency-Key on unsafe requests.
//!
//! One file per resource, each the same shape (its request bodies, then its handlers with their
//! `#[utoipa::path]`): [`events`], [`orders`], [`users`], and [`admin`] (health and the admin
//! routes). This module holds what they share: discovery (`GET /api`, `GET /api/v2`), the views
//! of events and orders, request parsing, and the Idempotency-Key wrapper `idempotent` around
//! [`crate::idempotency::run_once`].

pub mod admin;
pub mod events;
pub mod orders;
pub mod users;

use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::{AppState, Problem};
use crate::domain::{Event, EventId, Order, OrderId, OrderStatus, TicketId, UserId};
use crate::idempotency::{self, Claim};
use crate::store::accounts::sha256_hex;

pub use events::MAX_PAGE;
pub use orders::accepted_answer;

const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

// ---------- discovery ----------

/// `GET /api`
#[utoipa::path(
    get,
    path = "/api",
    tag = "discovery",
    operation_id = "apiRoot",
    responses((status = 200, description = "The API's versions and links.", body = super::openapi::Discovery)),
)]
pub async fn root() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": "ticketflow",
        "versions": [
            { "version": "v1", "href": "/api/v1/events", "description": "the seed's API, kept compatible" },
            { "version": "v2", "href": "/api/v2", "description": "orders, idempotency keys, pagination, tokens" },
        ],
        "links": { "openapi": "/api/openapi.json", "health": "/health" },
    }))
}

/// `GET /api/v2`
#[utoipa::path(
    get,
    path = "/api/v2",
    tag = "discovery",
    operation_id = "v2Index",
    responses((status = 200, description = "API v2's links.", body = super::openapi::V2Index)),
)]
pub async fn index() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "version": "v2",
        "links": {
            "events": "/api/v2/events",
            "orders": "/api/v2/orders",
            "users": "/api/v2/users",
            "myOrders": "/api/v2/users/me/orders",
            "myTickets": "/api/v2/users/me/tickets",
            "health": "/api/v2/health",
            "openapi": "/api/openapi.json",
        },
    }))
}

// ---------- views ----------

/// An event with its links.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EventView<'a> {
    #[serde(flatten)]
    event: &'a Event,
    #[schema(value_type = super::openapi::EventLinks)]
    links: Value,
}

fn event_view(event: &Event) -> EventView<'_> {
    EventView {
        event,
        links: json!({
            "self": format!("/api/v2/events/{}", event.id),
            "availability": format!("/api/v2/events/{}/availability", event.id),
            "orders": "/api/v2/orders",
        }),
    }
}

/// An order as API v2 shows it. Rendering is deterministic (tickets sorted), so an answer
/// replayed for an Idempotency-Key is byte-identical to the first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OrderView {
    id: OrderId,
    event_id: EventId,
    quantity: u32,
    amount_cents: i64,
    status: OrderStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    cancel_reason: Option<String>,
    tickets: Vec<TicketId>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    #[schema(value_type = super::openapi::OrderLinks)]
    links: Value,
}

fn order_view(order: &Order) -> OrderView {
    let mut tickets = order.tickets.clone();
    tickets.sort_unstable();
    OrderView {
        id: order.id,
        event_id: order.event_id,
        quantity: order.quantity,
        amount_cents: order.amount_cents,
        status: order.status,
        cancel_reason: order.cancel_reason.clone(),
        tickets,
        created_at: order.created_at.clone(),
        updated_at: order.updated_at.clone(),
        links: json!({
            "self": format!("/api/v2/orders/{}", order.id),
            "event": format!("/api/v2/events/{}", order.event_id),
        }),
    }
}

// ---------- request parsing ----------

/// Parses a JSON value already read (size and content type checked) into `T`.
fn parse_body<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, Problem> {
    serde_json::from_value(body)
        .map_err(|e| Problem::bad_request("invalid-body", format!("invalid request body: {e}")))
}

/// The request's Idempotency-Key: 1 to 255 visible ASCII characters.
fn idempotency_key(req: &HttpRequest) -> Result<String, Problem> {
    let value = req.headers().get(IDEMPOTENCY_KEY).ok_or_else(|| {
        Problem::bad_request(
            "idempotency-key-missing",
            "this request needs an `Idempotency-Key` header (e.g. a UUID) so it can be retried safely",
        )
    })?;
    let key = value.to_str().unwrap_or_default();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(Problem::bad_request(
            "idempotency-key-invalid",
            "the `Idempotency-Key` must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(key.to_owned())
}

/// What identifies "the same request" under one key: method, path and the body (as canonical
/// JSON, so key order and whitespace do not matter).
fn fingerprint(req: &HttpRequest, body: &Value) -> String {
    sha256_hex(format!("{} {}\n{}", req.method(), req.path(), body).as_bytes())
}

/// An answer ready to be stored under an Idempotency-Key and sent.
struct Answer {
    status: StatusCode,
    /// The body as sent and stored, serialized once.
    body: String,
}

fn respond(status: StatusCode, body: &str, replayed: bool) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        "application/problem+json"
    };
    response.insert_header((header::CONTENT_TYPE, content_type));
    if status == StatusCode::CREATED || status == StatusCode::ACCEPTED {
        if let Some(location) = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["links"]["self"].as_str().map(str::to_owned))
        {
            response.insert_header((header::LOCATION, location));
        }
    }
    if replayed {
        response.insert_header(("Idempotent-Replayed", "true"));
    }
    response.body(body.to_owned())
}

/// What a request run under an Idempotency-Key produced: the answer to store and send, or a
/// problem (stored too, unless it is a server fault).
type Outcome = Result<Answer, Problem>;

/// What to store for an outcome; `None` (a server fault) releases the key so the client can
/// retry.
fn stored_answer(outcome: &Outcome) -> Option<(u16, String)> {
    match outcome {
        Ok(answer) => Some((answer.status.as_u16(), answer.body.clone())),
        Err(problem) if problem.status >= 500 => None,
        Err(problem) => Some((
            problem.status,
            serde_json::to_string(problem).unwrap_or_default(),
        )),
    }
}

/// Runs `work` at most once per (user, key) and answers every retry with its stored answer.
async fn idempotent<Fut>(
    state: &AppState,
    user: &UserId,
    key: &str,
    fingerprint: String,
    work: Fut,
) -> Result<HttpResponse, Problem>
where
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let claim = idempotency::run_once(
        Arc::clone(&state.stage),
        user.clone(),
        key.to_owned(),
        fingerprint,
        work,
        stored_answer,
    )
    .await?;
    match claim {
        Claim::InFlight => Err(Problem::new(
            StatusCode::CONFLICT,
            "idempotency-key-in-use",
            "Request in progress",
            "a request with this Idempotency-Key is still running; retry after it finishes",
        )
        .retry_after(1)),
        Claim::Mismatch => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was already used with a different request (method, path or body)",
        )),
        Claim::Replay { status, body } => Ok(respond(
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            &body,
            true,
        )),
        Claim::Ran(Ok(answer)) => Ok(respond(answer.status, &answer.body, false)),
        Claim::Ran(Err(problem)) => Err(problem),
    }
}
