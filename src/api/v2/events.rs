//! `/api/v2/events`: search (filtered, sorted, paginated), read, create (admin,
//! Idempotency-Key), and the availability stream (Server-Sent Events).

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::DateTime;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::{event_view, fingerprint, idempotency_key, idempotent, parse_body, Answer, EventView};
use crate::api::auth::require_admin;
use crate::api::openapi::{
    self, AdminAuthProblems, BodyProblems, KeyReusedProblem, UnknownEventProblem,
};
use crate::api::v1::path_event_id;
use crate::api::{AppState, Problem};
use crate::domain::{timestamp, DomainError, Money, NewEvent, UserId};
use crate::store::{EventQuery, EventSort};

/// Largest page of events one request may ask for.
pub const MAX_PAGE: u32 = 100;
const DEFAULT_PAGE: u32 = 20;

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
        (status = 200, description = "One page of events.", body = openapi::EventPage),
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
        UnknownEventProblem,
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
        (status = 409, description = "A request with this Idempotency-Key is still running (`idempotency-key-in-use`, with `Retry-After`).", body = Problem, content_type = "application/problem+json"),
        AdminAuthProblems,
        KeyReusedProblem,
        BodyProblems,
    ),
)]
pub async fn create_event(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, Problem> {
    require_admin(&req, &state).await?;
    let key = idempotency_key(&req)?;
    let body = crate::api::integral_numbers(body.into_inner());
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
            body: serde_json::to_value(event_view(&event))
                .unwrap_or(Value::Null)
                .to_string(),
        })
    })
    .await
}

/// `GET /api/v2/events/{id}/availability`: Server-Sent Events, one `availability` event at
/// once and another whenever the count changes, with a comment every 15 s to keep proxies open.
///
/// Pushed, not polled: the stream sleeps until a committed write tells it the event's
/// availability moved ([`crate::store::changes`]), then reads the event once. Wake-ups within
/// [`STREAM_MIN_GAP`] of a read collapse into the next read. Streams are capped overall and
/// per client address (`--max-streams`, `--max-streams-per-client`).
#[utoipa::path(
    get,
    path = "/api/v2/events/{id}/availability",
    tag = "v2",
    operation_id = "v2AvailabilityStream",
    params(("id" = i64, Path, minimum = 1, description = "The event's id; anything else is a 404.")),
    responses(
        (status = 200, description = "A stream that does not end: `event: availability` frames whose `data` is an `Availability` object, and `: keep-alive` comments.",
            body = openapi::AvailabilityFrame, content_type = "text/event-stream"),
        (status = 429, description = "This client has the most streams open it may (`too-many-streams`), with `Retry-After`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The server has the most streams open it serves (`too-many-streams`), with `Retry-After`.", body = Problem, content_type = "application/problem+json"),
        UnknownEventProblem,
    ),
)]
pub async fn availability_stream(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let id = path_event_id(&id)?;
    let client = req
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let slot = state.streams.take(client)?;
    let hangup = req
        .conn_data::<crate::limits::ConnectionFd>()
        .and_then(|fd| crate::limits::Hangup::watch(*fd));
    // Subscribed before the first read: a change committed in between still wakes the stream.
    let changes = state.changes.subscribe(id);
    let stage = Arc::clone(&state.stage);
    crate::meter::stream_read();
    let first = stage
        .records()
        .event(id)
        .await?
        .ok_or_else(|| Problem::not_found("unknown-event", format!("no event with id {id}")))?;
    // Another inventory node's writes are not told to this one: re-read at each keep-alive.
    let reread_on_keep_alive = stage.kind() == crate::config::StageKind::Services;
    let open = OpenStream {
        _slot: slot,
        hangup,
        changes,
        stage,
        last: None,
        ready: Some(first),
    };
    let stream = futures::stream::unfold(open, move |mut open| async move {
        loop {
            if let Some(event) = open.ready.take() {
                if open.last != Some(event.available_tickets) {
                    open.last = Some(event.available_tickets);
                    let data = json!({
                        "eventId": event.id,
                        "availableTickets": event.available_tickets,
                        "totalTickets": event.total_tickets,
                    });
                    let frame = format!("event: availability\ndata: {data}\n\n");
                    return Some((Ok::<_, actix_web::Error>(web::Bytes::from(frame)), open));
                }
            }
            let hangup = async {
                match &open.hangup {
                    Some(hangup) => hangup.closed().await,
                    None => futures::future::pending().await,
                }
            };
            let woken = tokio::select! {
                changed = open.changes.changed() => changed.is_ok(),
                () = actix_rt::time::sleep(STREAM_KEEP_ALIVE) => false,
                // The client went away: the stream ends, and what it holds is dropped now.
                () = hangup => return None,
            };
            if woken || reread_on_keep_alive {
                if woken {
                    actix_rt::time::sleep(STREAM_MIN_GAP).await;
                    open.changes.borrow_and_update();
                }
                crate::meter::stream_read();
                open.ready = open.stage.records().event(id).await.ok().flatten();
                if woken {
                    continue;
                }
            }
            return Some((Ok(web::Bytes::from_static(b": keep-alive\n\n")), open));
        }
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream))
}

/// How often an idle stream sends a `: keep-alive` comment.
pub const STREAM_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Least time between two reads of one stream: changes closer than this share a read.
pub const STREAM_MIN_GAP: Duration = Duration::from_millis(100);

/// What an open availability stream holds; dropping it (the client went away) frees its slot
/// and its subscription.
struct OpenStream {
    _slot: crate::api::streams::StreamSlot,
    hangup: Option<crate::limits::Hangup>,
    changes: tokio::sync::watch::Receiver<u64>,
    stage: Arc<dyn crate::stages::Stage>,
    last: Option<u32>,
    ready: Option<crate::domain::Event>,
}
