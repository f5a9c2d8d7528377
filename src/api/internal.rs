//! The routes the processes of stage `services` call on each other (HTTP/JSON, behind the
//! admin token every node of a deployment shares). Not part of the public API, nor of its
//! OpenAPI document.
//!
//! Each answer is a [`Reply`]: the value, or a [`WireError`] naming exactly which
//! [`PurchaseError`] the node met, so the gateway answers its client as the node's own API
//! would, and knows which failures leave the outcome unknown.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::auth::require_admin;
use super::{AppState, Problem};
use crate::audit::Activity;
use crate::domain::{Event, EventId, NewEvent, Order, OrderId, Ticket, UserId};
use crate::stages::{OrderRequest, PurchaseError};
use crate::store::{EventQuery, OrderKey, StoreError};

/// The prefix of every internal route.
pub const PREFIX: &str = "/internal/v1";

/// A v1 purchase under the order id the gateway chose.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PurchaseCall {
    pub order: OrderId,
    pub event: EventId,
    /// The buyer's id as the gateway validated it (a v1 label or a v2 user's id).
    pub user: String,
}

/// A v2 order under the order id the gateway chose.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCall {
    pub order: OrderId,
    pub event: EventId,
    pub user: String,
    pub quantity: u32,
    pub per_user_limit: u32,
    /// The client's Idempotency-Key and the status its answer is stored under; the node
    /// stores it on the order, rendered as API v2 renders an accepted order.
    pub idempotency: Option<(String, u16)>,
}

/// An event to create, as the gateway validated it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewEventCall {
    pub name: String,
    pub venue: String,
    /// RFC 3339.
    pub date: String,
    pub total_tickets: u32,
    pub price_cents: i64,
}

impl From<&NewEvent> for NewEventCall {
    fn from(new: &NewEvent) -> Self {
        Self {
            name: new.name.clone(),
            venue: new.venue.clone(),
            date: new.date.to_rfc3339(),
            total_tickets: new.total_tickets,
            price_cents: new.price.cents(),
        }
    }
}

impl NewEventCall {
    /// Validated again on the catalog, as any input from the network is.
    pub fn parse(&self) -> Result<NewEvent, crate::domain::DomainError> {
        let price = crate::domain::Money::from_cents(self.price_cents)?;
        NewEvent::parse(
            &self.name,
            &self.venue,
            &self.date,
            i64::from(self.total_tickets),
            price,
        )
    }
}

/// One page of an event search, and how many match in all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub total: i64,
}

/// What a node met instead of an answer: one variant per [`PurchaseError`] (the store's
/// errors by kind, with their message).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum WireError {
    UnknownEvent,
    NotEnough { available: u32 },
    UserLimit { limit: u32 },
    NotServed,
    SoldOut,
    AllHeld,
    PaymentDeclined,
    HoldExpired,
    Overloaded,
    NotOwner { shard: u32 },
    OwnerChanged,
    Unresolved { order: OrderId },
    Unavailable { what: String },
    PaymentsUnavailable,
    StoreUnavailable { message: String },
    StoreConflict { message: String },
    Store { message: String },
}

/// A node's answer: `{"ok": value}` or `{"error": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reply<T> {
    Ok(T),
    Err(WireError),
}

impl From<PurchaseError> for WireError {
    fn from(e: PurchaseError) -> Self {
        match e {
            PurchaseError::UnknownEvent => Self::UnknownEvent,
            PurchaseError::NotEnough { available } => Self::NotEnough { available },
            PurchaseError::UserLimit { limit } => Self::UserLimit { limit },
            PurchaseError::NotServed => Self::NotServed,
            PurchaseError::SoldOut => Self::SoldOut,
            PurchaseError::AllHeld => Self::AllHeld,
            PurchaseError::PaymentDeclined => Self::PaymentDeclined,
            PurchaseError::HoldExpired => Self::HoldExpired,
            PurchaseError::Overloaded => Self::Overloaded,
            PurchaseError::NotOwner { shard } => Self::NotOwner { shard },
            PurchaseError::OwnerChanged => Self::OwnerChanged,
            PurchaseError::Unresolved { order } => Self::Unresolved { order },
            PurchaseError::Unavailable(what) => Self::Unavailable { what: what.into() },
            PurchaseError::Gateway(_) => Self::PaymentsUnavailable,
            PurchaseError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(message) => Self::StoreUnavailable { message },
            StoreError::Constraint(message) | StoreError::Conflict(message) => {
                Self::StoreConflict { message }
            }
            other => Self::Store {
                message: other.to_string(),
            },
        }
    }
}

impl From<WireError> for PurchaseError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::UnknownEvent => Self::UnknownEvent,
            WireError::NotEnough { available } => Self::NotEnough { available },
            WireError::UserLimit { limit } => Self::UserLimit { limit },
            WireError::NotServed => Self::NotServed,
            WireError::SoldOut => Self::SoldOut,
            WireError::AllHeld => Self::AllHeld,
            WireError::PaymentDeclined => Self::PaymentDeclined,
            WireError::HoldExpired => Self::HoldExpired,
            WireError::Overloaded => Self::Overloaded,
            WireError::NotOwner { shard } => Self::NotOwner { shard },
            WireError::OwnerChanged => Self::OwnerChanged,
            WireError::Unresolved { order } => Self::Unresolved { order },
            WireError::Unavailable { what } => Self::Unavailable(dependency_name(&what)),
            WireError::PaymentsUnavailable => Self::Gateway(crate::payments::GatewayUnavailable),
            other => Self::Store(other.into()),
        }
    }
}

impl From<WireError> for StoreError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::StoreUnavailable { message } => Self::Unavailable(message),
            WireError::StoreConflict { message } => Self::Conflict(message),
            WireError::Store { message } => Self::Internal(message),
            other => Self::Internal(format!("a node answered {other:?}")),
        }
    }
}

/// The names a dependency can go by, as `&'static str` for [`PurchaseError::Unavailable`].
pub fn dependency_name(what: &str) -> &'static str {
    match what {
        "redis" | "Redis" => "Redis",
        "catalog" => "the catalog node",
        "payments" => "the payments node",
        "inventory" => "the event's inventory node",
        "postgresql" | "PostgreSQL" => "PostgreSQL",
        _ => "a service this node depends on",
    }
}

fn reply<T: Serialize>(result: Result<T, WireError>) -> HttpResponse {
    let body = match result {
        Ok(value) => Reply::Ok(value),
        Err(error) => Reply::Err(error),
    };
    HttpResponse::Ok().json(body)
}

/// Registers the internal routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope(PREFIX)
            .route("/purchase", web::post().to(purchase))
            .route("/orders", web::post().to(place_order))
            .route("/saga/seats", web::post().to(saga_seats))
            .route("/activity", web::get().to(activity))
            .route("/events", web::get().to(list_events))
            .route("/events", web::post().to(create_event))
            .route("/events/search", web::post().to(search_events))
            .route("/events/{id}", web::get().to(get_event)),
    );
}

async fn purchase(
    req: HttpRequest,
    state: web::Data<AppState>,
    call: web::Json<PurchaseCall>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let PurchaseCall { order, event, user } = call.into_inner();
    let user = UserId::parse(&user).map_err(Problem::from)?;
    let result: Result<Ticket, _> = state.stage.purchase_as(order, event, user).await;
    Ok(reply(result.map_err(WireError::from)))
}

async fn place_order(
    req: HttpRequest,
    state: web::Data<AppState>,
    call: web::Json<OrderCall>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let call = call.into_inner();
    let request = OrderRequest {
        event: call.event,
        user: UserId::parse(&call.user).map_err(Problem::from)?,
        quantity: call.quantity,
        per_user_limit: call.per_user_limit,
        idempotency: call.idempotency.map(|(key, status)| OrderKey {
            key,
            status,
            render: super::v2::accepted_answer,
        }),
        order: Some(call.order),
    };
    let result: Result<Order, _> = state.stage.place_order(request).await;
    Ok(reply(result.map_err(WireError::from)))
}

/// A saga's seat command for the inventory node owning its event's shard (stage `saga`).
async fn saga_seats(
    req: HttpRequest,
    state: web::Data<AppState>,
    call: web::Json<crate::stages::saga_seats::SeatCall>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let result = state.stage.saga_seats(call.into_inner()).await;
    Ok(reply(result.map_err(WireError::from)))
}

async fn activity(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let mut activity: Activity = state.stage.activity().await;
    // the node's own payments under way (its charges and refunds sent to the payments node,
    // and outcomes not yet written), which the gateway's audit adds up with the other nodes'
    activity.payments_in_flight += state.payments.in_flight() as i64;
    Ok(reply::<Activity>(Ok(activity)))
}

async fn list_events(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    Ok(reply(state.stage.events().await.map_err(WireError::from)))
}

async fn get_event(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<i64>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let event: Result<Option<Event>, _> = state.stage.event(EventId(id.into_inner())).await;
    Ok(reply(event.map_err(WireError::from)))
}

async fn search_events(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Json<EventQuery>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let page = state
        .stage
        .search_events(&query)
        .await
        .map(|(events, total)| EventPage { events, total });
    Ok(reply(page.map_err(WireError::from)))
}

async fn create_event(
    req: HttpRequest,
    state: web::Data<AppState>,
    new: web::Json<NewEventCall>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let new = new.parse()?;
    Ok(reply(
        state.stage.create_event(new).await.map_err(WireError::from),
    ))
}
