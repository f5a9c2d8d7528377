//! API v2: discovery, users and tokens, searchable events with links, orders of N tickets
//! answered `202 Accepted`, an availability stream, and Idempotency-Key on unsafe requests.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::auth::{require_admin, require_user};
use super::v1::path_event_id;
use super::{AppState, Problem};
use crate::domain::{
    parse_quantity, timestamp, DomainError, Event, EventId, Money, NewEvent, Order, OrderId,
    OrderStatus, TicketId, UserId,
};
use crate::idempotency::{self, Claim};
use crate::stages::OrderRequest;
use crate::store::accounts::sha256_hex;
use crate::store::{EventQuery, EventSort};

/// Largest page of events one request may ask for.
pub const MAX_PAGE: u32 = 100;
const DEFAULT_PAGE: u32 = 20;
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

/// The `202 Accepted` body of a freshly placed order: the order as it was when accepted.
fn accepted_body(order: &Order) -> Value {
    let mut at_acceptance = order.clone();
    at_acceptance.status = OrderStatus::Pending;
    at_acceptance.cancel_reason = None;
    at_acceptance.updated_at = at_acceptance.created_at.clone();
    serde_json::to_value(order_view(&at_acceptance)).unwrap_or(Value::Null)
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
    body: Value,
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
        Ok(answer) => Some((answer.status.as_u16(), answer.body.to_string())),
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
        Claim::Ran(Ok(answer)) => Ok(respond(answer.status, &answer.body.to_string(), false)),
        Claim::Ran(Err(problem)) => Err(problem),
    }
}

/// The stored answer of an order's `202 Accepted`, for claims a stopped run left open.
pub fn accepted_answer(order: &Order) -> String {
    accepted_body(order).to_string()
}

// ---------- users ----------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUserBody {
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    name: String,
}

/// `POST /api/v2/users`: a user and its bearer token (shown once). Needs no Idempotency-Key:
/// there is no user yet to scope one to, and a retry only makes another unused account.
#[utoipa::path(
    post,
    path = "/api/v2/users",
    tag = "v2",
    operation_id = "v2CreateUser",
    request_body = NewUserBody,
    responses(
        (status = 201, description = "The user and its bearer token, shown once.", body = super::openapi::UserCreated,
            headers(("Location" = String, description = "The user's orders."))),
        (status = 400, description = "Malformed JSON, a wrong, unknown or missing field, or a bad name (`malformed-json`, `invalid-body`, `validation-failed`).", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large (`body-too-large`).", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json` (`unsupported-media-type`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn create_user(
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, Problem> {
    let body: NewUserBody = parse_body(body.into_inner())?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(DomainError::invalid("name", "must be 1 to 200 characters").into());
    }
    let user = state.stage.records().create_user(name).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, "/api/v2/users/me/orders"))
        .json(json!({
            "id": user.id,
            "name": user.name,
            "token": user.token,
            "createdAt": user.created_at,
            "links": { "orders": "/api/v2/users/me/orders", "tickets": "/api/v2/users/me/tickets" },
        })))
}

/// `GET /api/v2/users/me/orders`
#[utoipa::path(
    get,
    path = "/api/v2/users/me/orders",
    tag = "v2",
    operation_id = "v2MyOrders",
    security(("user_token" = [])),
    responses(
        (status = 200, description = "The caller's orders.", body = super::openapi::OrderList),
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The admin token cannot act as a buyer (`forbidden`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn my_orders(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Problem> {
    let user = require_user(&req, &state).await?;
    let orders = state.stage.user_orders(&user).await?;
    let items: Vec<OrderView> = orders.iter().map(order_view).collect();
    Ok(HttpResponse::Ok().json(json!({ "items": items })))
}

/// `GET /api/v2/users/me/tickets`
#[utoipa::path(
    get,
    path = "/api/v2/users/me/tickets",
    tag = "v2",
    operation_id = "v2MyTickets",
    security(("user_token" = [])),
    responses(
        (status = 200, description = "The caller's tickets.", body = super::openapi::TicketList),
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The admin token cannot act as a buyer (`forbidden`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn my_tickets(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Problem> {
    let user = require_user(&req, &state).await?;
    Ok(HttpResponse::Ok().json(json!({ "items": state.stage.user_tickets(&user).await? })))
}

// ---------- events ----------

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventListQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Events to skip (default 0).
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_u64)]
    offset: Option<u64>,
    /// Only events at this venue (exact match).
    venue: Option<String>,
    /// Only events on or after this RFC 3339 date-time.
    #[param(format = DateTime)]
    from: Option<String>,
    /// Only events on or before this RFC 3339 date-time.
    #[param(format = DateTime)]
    to: Option<String>,
    /// `true`: only events with tickets left; `false`: only sold-out ones.
    available: Option<bool>,
    /// `date` (default), `name`, `price`, `available` or `created`; prefix `-` for descending.
    #[param(pattern = "^-?(date|name|price|available|created)$")]
    sort: Option<String>,
}

fn parse_date(field: &'static str, raw: &str) -> Result<String, Problem> {
    DateTime::parse_from_rfc3339(raw)
        .map(|d| timestamp(d.with_timezone(&chrono::Utc)))
        .map_err(|_| DomainError::invalid(field, "must be an RFC 3339 date-time").into())
}

impl EventListQuery {
    fn parse(&self) -> Result<EventQuery, Problem> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(DomainError::invalid("limit", "must be between 1 and 100").into());
        }
        // Storage takes an i64, and `offset + limit` must not overflow.
        let offset = self.offset.unwrap_or(0);
        if offset > i64::MAX as u64 {
            return Err(DomainError::invalid(
                "offset",
                "must be between 0 and 9223372036854775807",
            )
            .into());
        }
        let sort_raw = self.sort.as_deref().unwrap_or("date");
        let (descending, key) = match sort_raw.strip_prefix('-') {
            Some(key) => (true, key),
            None => (false, sort_raw),
        };
        let sort = match key {
            "date" => EventSort::Date,
            "name" => EventSort::Name,
            "price" => EventSort::Price,
            "available" => EventSort::Available,
            "created" => EventSort::Created,
            _ => return Err(DomainError::invalid(
                "sort",
                "must be one of date, name, price, available, created (prefix - for descending)",
            )
            .into()),
        };
        Ok(EventQuery {
            venue: self.venue.clone(),
            from: self
                .from
                .as_deref()
                .map(|d| parse_date("from", d))
                .transpose()?,
            to: self
                .to
                .as_deref()
                .map(|d| parse_date("to", d))
                .transpose()?,
            available: self.available,
            sort,
            descending,
            limit,
            offset,
        })
    }
}

/// `GET /api/v2/events`: filtered, sorted, paginated, with links.
#[utoipa::path(
    get,
    path = "/api/v2/events",
    tag = "v2",
    operation_id = "v2ListEvents",
    params(EventListQuery),
    responses(
        (status = 200, description = "One page of events.", body = super::openapi::EventPage),
        (status = 400, description = "A query parameter out of range (`validation-failed` with `field`), unknown or of the wrong type (`invalid-query`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn list_events(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<EventListQuery>,
) -> Result<HttpResponse, Problem> {
    let parsed = query.parse()?;
    let (events, total) = state.stage.search_events(&parsed).await?;
    let page_link = |offset: u64| {
        let mut pairs: Vec<(String, String)> = url_pairs(req.query_string())
            .into_iter()
            .filter(|(k, _)| k != "offset" && k != "limit")
            .collect();
        pairs.push(("limit".into(), parsed.limit.to_string()));
        pairs.push(("offset".into(), offset.to_string()));
        let qs: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("/api/v2/events?{}", qs.join("&"))
    };
    let mut links = json!({ "self": page_link(parsed.offset) });
    let next = parsed.offset + u64::from(parsed.limit);
    if (next as i64) < total {
        links["next"] = json!(page_link(next));
    }
    if parsed.offset > 0 {
        links["prev"] = json!(page_link(
            parsed.offset.saturating_sub(u64::from(parsed.limit))
        ));
    }
    let items: Vec<EventView> = events.iter().map(event_view).collect();
    Ok(HttpResponse::Ok().json(json!({
        "items": items,
        "total": total,
        "limit": parsed.limit,
        "offset": parsed.offset,
        "links": links,
    })))
}

/// The query string's pairs, still percent-encoded (they are echoed into links as they came).
fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// `GET /api/v2/events/{id}`
#[utoipa::path(
    get,
    path = "/api/v2/events/{id}",
    tag = "v2",
    operation_id = "v2GetEvent",
    params(("id" = i64, Path, minimum = 1, description = "The event's id; anything else is a 404.")),
    responses(
        (status = 200, description = "The event with its links.", body = EventView),
        (status = 404, description = "No such event (`unknown-event`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn get_event(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let id = path_event_id(&id)?;
    match state.stage.event(id).await? {
        Some(event) => Ok(HttpResponse::Ok().json(event_view(&event))),
        None => Err(Problem::not_found(
            "unknown-event",
            format!("no event with id {id}"),
        )),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NewEventBody {
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    name: String,
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    venue: String,
    /// RFC 3339 date-time.
    #[schema(format = DateTime, example = "2026-12-31T20:00:00Z")]
    date: String,
    #[schema(minimum = 1, maximum = 1_000_000)]
    total_tickets: i64,
    /// Exact price in minor units.
    #[schema(minimum = 0, maximum = 100_000_000)]
    price_cents: i64,
}

/// `POST /api/v2/events` (admin, Idempotency-Key).
#[utoipa::path(
    post,
    path = "/api/v2/events",
    tag = "v2",
    operation_id = "v2CreateEvent",
    security(("admin_token" = [])),
    params(("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$", description = "1 to 255 visible ASCII characters, e.g. a UUID. A retry with the same key and request gets the stored answer (with `Idempotent-Replayed: true`).")),
    request_body = NewEventBody,
    responses(
        (status = 201, description = "Created.", body = EventView,
            headers(("Location" = String, description = "The event's URL."), ("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same key."))),
        (status = 400, description = "Malformed JSON, a wrong, unknown or missing field, a value out of range, or a missing or invalid Idempotency-Key.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user's token (`forbidden`).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A request with this Idempotency-Key is still running (`idempotency-key-in-use`, with `Retry-After`).", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "This Idempotency-Key was used with a different request (`idempotency-key-reused`).", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large (`body-too-large`).", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json` (`unsupported-media-type`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn create_event(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let key = idempotency_key(&req)?;
    let body = body.into_inner();
    let print = fingerprint(&req, &body);
    let parsed: NewEventBody = parse_body(body)?;
    let price = Money::from_cents(parsed.price_cents)
        .ok()
        .filter(|m| m.cents() <= crate::domain::MAX_PRICE_CENTS)
        .ok_or_else(|| DomainError::invalid("priceCents", "must be between 0 and 100000000"))?;
    let new = NewEvent::parse(
        &parsed.name,
        &parsed.venue,
        &parsed.date,
        parsed.total_tickets,
        price,
    )?;
    let admin = UserId::parse("admin").expect("a valid id");
    let stage = Arc::clone(&state.stage);
    idempotent(&state, &admin, &key, print, async move {
        let event = stage.create_event(new).await?;
        Ok(Answer {
            status: StatusCode::CREATED,
            body: serde_json::to_value(event_view(&event)).unwrap_or(Value::Null),
        })
    })
    .await
}

/// `GET /api/v2/events/{id}/availability`: Server-Sent Events, one `availability` event at
/// once and another whenever the count changes, with a comment every 15 s to keep proxies open.
#[utoipa::path(
    get,
    path = "/api/v2/events/{id}/availability",
    tag = "v2",
    operation_id = "v2AvailabilityStream",
    params(("id" = i64, Path, minimum = 1, description = "The event's id; anything else is a 404.")),
    responses(
        (status = 200, description = "A stream that does not end: `event: availability` frames whose `data` is an `Availability` object, and `: keep-alive` comments.",
            body = super::openapi::AvailabilityFrame, content_type = "text/event-stream"),
        (status = 404, description = "No such event (`unknown-event`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn availability_stream(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let id = path_event_id(&id)?;
    let first = state
        .stage
        .event(id)
        .await?
        .ok_or_else(|| Problem::not_found("unknown-event", format!("no event with id {id}")))?;
    let stage = Arc::clone(&state.stage);
    let poll = Duration::from_millis(250);
    let heartbeat_every = 60; // polls, i.e. 15 s
    let stream = futures::stream::unfold(
        (stage, None::<u32>, 0u32, Some(first)),
        move |(stage, last, mut quiet, mut ready)| async move {
            loop {
                let event = match ready.take() {
                    Some(event) => Some(event),
                    None => {
                        actix_rt::time::sleep(poll).await;
                        stage.event(id).await.ok().flatten()
                    }
                };
                if let Some(event) = event.filter(|e| last != Some(e.available_tickets)) {
                    let data = json!({
                        "eventId": event.id,
                        "availableTickets": event.available_tickets,
                        "totalTickets": event.total_tickets,
                    });
                    let frame = format!("event: availability\ndata: {data}\n\n");
                    let next = (stage, Some(event.available_tickets), 0, None);
                    return Some((Ok::<_, actix_web::Error>(web::Bytes::from(frame)), next));
                }
                quiet += 1;
                if quiet >= heartbeat_every {
                    let next = (stage, last, 0, None);
                    return Some((Ok(web::Bytes::from_static(b": keep-alive\n\n")), next));
                }
            }
        },
    );
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream))
}

// ---------- orders ----------

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
        (status = 400, description = "Malformed JSON, a wrong, unknown or missing field, a value out of range, a missing or invalid Idempotency-Key, or no tickets left (`sold-out`, `tickets-held`).", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The admin token cannot act as a buyer (`forbidden`).", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such event (`unknown-event`).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not enough tickets left (`not-enough-tickets`), the per-user limit (`user-limit`), or a request with this Idempotency-Key still running (`idempotency-key-in-use`).", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "This Idempotency-Key was used with a different request (`idempotency-key-reused`).", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large (`body-too-large`).", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json` (`unsupported-media-type`).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or a dependency is down (`overloaded`, `dependency-unavailable`), with `Retry-After`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn create_order(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, Problem> {
    let user = require_user(&req, &state).await?;
    let key = idempotency_key(&req)?;
    let body = body.into_inner();
    let print = fingerprint(&req, &body);
    let parsed: NewOrderBody = parse_body(body)?;
    if parsed.event_id <= 0 {
        return Err(DomainError::invalid("eventId", "must be a positive integer").into());
    }
    let request = OrderRequest {
        event: EventId(parsed.event_id),
        user: user.clone(),
        quantity: parse_quantity(parsed.quantity)?,
        per_user_limit: state.settings.per_user_limit,
        idempotency_key: Some(key.clone()),
    };
    let stage = Arc::clone(&state.stage);
    idempotent(&state, &user, &key, print, async move {
        let order = stage.place_order(request).await?;
        Ok(Answer {
            status: StatusCode::ACCEPTED,
            body: accepted_body(&order),
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
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The admin token cannot act as a buyer (`forbidden`).", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or another user's (`unknown-order`).", body = Problem, content_type = "application/problem+json"),
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

// ---------- health and admin ----------

/// `GET /api/v2/health`: each dependency's state; 503 when one is down.
#[utoipa::path(
    get,
    path = "/api/v2/health",
    tag = "health",
    operation_id = "v2Health",
    responses(
        (status = 200, description = "Every dependency answers.", body = super::openapi::Health),
        (status = 503, description = "A dependency is down.", body = super::openapi::Health),
    ),
)]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    super::admin::health(state).await
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
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user's token (`forbidden`).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The payment gateway is unavailable (`payment-gateway-unavailable`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn admin_audit(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    super::admin::audit(state).await
}

/// `GET /api/v2/admin/ledger`
#[utoipa::path(
    get,
    path = "/api/v2/admin/ledger",
    tag = "v2",
    operation_id = "v2AdminLedger",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The gateway's ledger (this process).", body = super::openapi::Ledger),
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user's token (`forbidden`).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The payment gateway is unavailable (`payment-gateway-unavailable`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn admin_ledger(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    super::admin::ledger(state).await
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
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user's token (`forbidden`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn admin_stats(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Problem> {
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
        (status = 401, description = "No token, or one that matches nobody (`unauthenticated`).", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user's token (`forbidden`).", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "This stage has no job queue (`no-queue`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn admin_queue_stats(
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
