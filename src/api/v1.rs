//! API v1: the seed's routes, fields (camelCase) and status codes, kept compatible.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use utoipa::ToSchema;

use super::openapi::{BodyProblems, UnknownEventProblem};
use super::{AppState, Problem};
use crate::domain::{Event, EventId, Money, NewEvent, Ticket, UserId};

/// `POST /api/v1/events`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateEventBody {
    /// 1 to 200 characters after trimming, no control characters.
    #[serde(deserialize_with = "field::name")]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub name: String,
    /// 1 to 200 characters after trimming, no control characters.
    #[serde(deserialize_with = "field::venue")]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub venue: String,
    /// RFC 3339 date-time.
    #[serde(deserialize_with = "field::date")]
    #[schema(format = DateTime, example = "2026-12-31T20:00:00Z")]
    pub date: String,
    #[serde(deserialize_with = "field::total_tickets")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub total_tickets: i64,
    /// Major units with at most two decimals, as in the seed (e.g. `49.99`).
    #[serde(deserialize_with = "field::price")]
    #[schema(minimum = 0, maximum = 1_000_000, multiple_of = 0.01, example = 49.99)]
    pub price: f64,
}

/// Deserializers that name the field and the JSON type it wants when a value has the wrong
/// type: serde alone answers "invalid type: string \"100\", expected i64", naming neither.
mod field {
    use std::fmt;

    use serde::de::{Deserializer, Error, Visitor};

    struct Text(&'static str);

    impl Visitor<'_> for Text {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "`{}` as a string", self.0)
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
    }

    struct Integer(&'static str);

    impl Visitor<'_> for Integer {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "`{}` as a whole number", self.0)
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        /// Beyond `i64` is out of range anyway; validation names the range.
        fn visit_u64<E: Error>(self, v: u64) -> Result<i64, E> {
            Ok(i64::try_from(v).unwrap_or(i64::MAX))
        }

        /// `5.0` is the integer 5, as JSON Schema has it; `5.5` is the wrong type.
        fn visit_f64<E: Error>(self, v: f64) -> Result<i64, E> {
            crate::api::integral(v)
                .ok_or_else(|| Error::invalid_type(serde::de::Unexpected::Float(v), &self))
        }
    }

    struct Number(&'static str);

    impl Visitor<'_> for Number {
        type Value = f64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "`{}` as a number", self.0)
        }

        fn visit_f64<E: Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
    }

    pub fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_str(Text("name"))
    }

    pub fn venue<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_str(Text("venue"))
    }

    pub fn date<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_str(Text("date"))
    }

    pub fn total_tickets<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        d.deserialize_i64(Integer("totalTickets"))
    }

    pub fn price<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_f64(Number("price"))
    }
}

/// `POST /api/v1/tickets/purchase`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PurchaseBody {
    #[schema(schema_with = super::openapi::event_id_input)]
    pub event_id: IdInput,
    #[schema(schema_with = super::openapi::user_id_input)]
    pub user_id: UserId,
}

/// An id sent as a number or as a string of digits (both appear in the seed's clients).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "eventId must be a positive integer or a string of digits"
)]
pub enum IdInput {
    Number(i64),
    Text(String),
    /// `5.0`: the integer 5 (see [`crate::api::integral`]).
    Float(crate::api::IntegralFloat),
}

impl IdInput {
    fn event_id(&self) -> Result<EventId, Problem> {
        let id = match self {
            Self::Number(n) => Some(*n),
            Self::Text(s) => s.trim().parse().ok(),
            Self::Float(f) => Some(f.0),
        };
        match id {
            Some(n) if n > 0 => Ok(EventId(n)),
            _ => Err(Problem::from(crate::domain::DomainError::invalid(
                "eventId",
                "must be a positive integer",
            ))),
        }
    }
}

/// An event id from a path: a positive integer; anything else is the same 404 as an unknown id.
pub(super) fn path_event_id(raw: &str) -> Result<EventId, Problem> {
    raw.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .map(EventId)
        .ok_or_else(|| Problem::not_found("unknown-event", format!("no event with id {raw}")))
}

/// Every event, as in the seed.
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "v1",
    operation_id = "v1ListEvents",
    responses((status = 200, description = "All events.", body = Vec<Event>)),
)]
pub async fn list_events(state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    Ok(HttpResponse::Ok().json(state.stage.events().await?))
}

/// One event.
#[utoipa::path(
    get,
    path = "/api/v1/events/{id}",
    tag = "v1",
    operation_id = "v1GetEvent",
    params(("id" = i64, Path, minimum = 1, description = "The event's id; anything else is a 404.")),
    responses(
        (status = 200, description = "The event.", body = Event),
        UnknownEventProblem,
    ),
)]
pub async fn get_event(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let id = path_event_id(&id)?;
    match state.stage.event(id).await? {
        Some(event) => Ok(HttpResponse::Ok().json(event)),
        None => Err(Problem::not_found(
            "unknown-event",
            format!("no event with id {id}"),
        )),
    }
}

/// Creates an event (no authentication in v1, as in the seed).
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "v1",
    operation_id = "v1CreateEvent",
    request_body = CreateEventBody,
    responses(
        (status = 201, description = "Created.", body = Event,
            headers(("Location" = String, description = "The event's URL."))),
        (status = 400, description = "Malformed JSON, a wrong or missing field, or a value out of range (`malformed-json`, `invalid-body`, `validation-failed` with `field`).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Refused by a storage constraint (`conflict`).", body = Problem, content_type = "application/problem+json"),
        BodyProblems,
    ),
)]
pub async fn create_event(
    state: web::Data<AppState>,
    body: web::Json<CreateEventBody>,
) -> Result<HttpResponse, Problem> {
    let price = Money::from_major(body.price)?;
    let new = NewEvent::parse(
        &body.name,
        &body.venue,
        &body.date,
        body.total_tickets,
        price,
    )?;
    let event = state.stage.create_event(new).await?;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/events/{}", event.id)))
        .json(event))
}

/// Buys one ticket; answers once payment has settled.
#[utoipa::path(
    post,
    path = "/api/v1/tickets/purchase",
    tag = "v1",
    operation_id = "v1Purchase",
    request_body = PurchaseBody,
    responses(
        (status = 201, description = "A confirmed ticket.", body = Ticket),
        (status = 400, description = "No tickets left (`sold-out`, the seed's code), all remaining seats held (`tickets-held`, with `Retry-After`), or a bad body.", body = Problem, content_type = "application/problem+json"),
        (status = 402, description = "Payment failed; the ticket is cancelled and the seat returned (`payment-declined`).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The per-user limit is reached (`user-limit`), or the hold expired during payment (`hold-expired`).", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Past this client's rate limit (`rate-limited`), with `Retry-After`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or a dependency is down (`overloaded`, `dependency-unavailable`, `payment-gateway-unavailable`), with `Retry-After`.", body = Problem, content_type = "application/problem+json"),
        UnknownEventProblem,
        BodyProblems,
    ),
)]
pub async fn purchase(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<PurchaseBody>,
) -> Result<HttpResponse, Problem> {
    state.limiters.purchase(&req)?;
    let body = body.into_inner();
    let event = body.event_id.event_id()?;
    crate::meter::record_id("event_id", &event);
    crate::meter::record_id("user_id", &body.user_id);
    let started = std::time::Instant::now();
    let bought = state.stage.purchase(event, body.user_id).await;
    crate::meter::purchase_answered(started, bought.as_ref().err());
    let ticket = bought?;
    Ok(HttpResponse::Created().json(ticket))
}

/// A user's tickets (any status).
#[utoipa::path(
    get,
    path = "/api/v1/tickets/user/{userId}",
    tag = "v1",
    operation_id = "v1UserTickets",
    params(("userId" = String, Path, min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$", description = "The buyer's id as sent at purchase.")),
    responses(
        (status = 200, description = "The user's tickets.", body = Vec<Ticket>),
        (status = 400, description = "The id is blank, too long or has control characters (`validation-failed`).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn user_tickets(
    state: web::Data<AppState>,
    user: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let user = UserId::v1_label(&user)?;
    Ok(HttpResponse::Ok().json(state.stage.user_tickets(&user).await?))
}
