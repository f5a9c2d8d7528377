//! The OpenAPI 3.1 document for API v1 and v2, served at `GET /api/openapi.json`.
//!
//! The operations are described next to their handlers (`#[utoipa::path]`) and the bodies on
//! their types (`ToSchema`); this module assembles them, names the answers that handlers
//! build with `json!` so the document can describe them too, and holds the problem answers that
//! several operations share (`IntoResponses` sets such as [`UserAuthProblems`] and
//! [`BodyProblems`], listed in a handler's `responses(...)`).

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::openapi::schema::{
    KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use super::{admin, v1, v2, AppState, Problem};
use crate::domain::Ticket;
use crate::payments::LedgerEntry;

/// Where the document is served.
pub const PATH: &str = "/api/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ticketflow",
        description = "An event-ticketing server built as a concurrency lab. API v1 is the seed's \
            API, kept compatible; API v2 adds users and tokens, orders of N tickets answered \
            `202 Accepted`, Idempotency-Key on unsafe requests, searchable events and an \
            availability stream. Every error is an `application/problem+json` document with a \
            stable `code`. An integer field takes any JSON number with no fraction, as JSON \
            Schema's `integer` does: `5.0` is `5`; `5.5` is refused (400 `invalid-body`).",
    ),
    paths(
        openapi_json,
        admin::health,
        crate::meter::scrape,
        v2::root,
        v1::list_events,
        v1::create_event,
        v1::get_event,
        v1::purchase,
        v1::user_tickets,
        admin::ledger,
        admin::audit,
        admin::stats,
        v2::index,
        v2::users::create_user,
        v2::users::my_orders,
        v2::users::my_tickets,
        v2::events::list_events,
        v2::events::create_event,
        v2::events::get_event,
        v2::events::availability_stream,
        v2::orders::create_order,
        v2::orders::get_order,
        v2::orders::order_events,
        v2::admin::health,
        v2::admin::audit,
        v2::admin::ledger,
        v2::admin::stats,
        v2::admin::queue_stats,
        v2::admin::nodes,
    ),
    components(schemas(Availability, Problem)),
    modifiers(&BearerTokens, &V1UserIds, &SeedPaths),
    tags(
        (name = "discovery", description = "Where to start: versions and links."),
        (name = "health", description = "Liveness and each dependency's state."),
        (name = "v1", description = "The seed's API, kept compatible (camelCase, no tokens)."),
        (name = "v2", description = "Users and tokens, orders, idempotency keys, pagination."),
    ),
)]
pub struct ApiDoc;

/// The two bearer tokens: a user's (from `POST /api/v2/users`) and the admin's.
struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "user_token",
            bearer("A user's token, returned once by `POST /api/v2/users`."),
        );
        components.add_security_scheme(
            "admin_token",
            bearer("The admin token (`--admin-token`, or made at start and logged)."),
        );
    }
}

/// The seed's unversioned paths and the API v1 paths they serve, in `src/api/mod.rs`'s order.
pub const SEED_PATHS: [(&str, &str); 4] = [
    ("/api/events", "/api/v1/events"),
    ("/api/events/{id}", "/api/v1/events/{id}"),
    ("/api/tickets/purchase", "/api/v1/tickets/purchase"),
    (
        "/api/tickets/user/{userId}",
        "/api/v1/tickets/user/{userId}",
    ),
];

/// Describes each of the seed's unversioned paths as the v1 operation it serves, under an
/// operation id of its own (`seed` + the v1 id without its `v1`).
struct SeedPaths;

impl Modify for SeedPaths {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (seed, v1) in SEED_PATHS {
            let Some(mut item) = openapi.paths.paths.get(v1).cloned() else {
                continue;
            };
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                op.operation_id = op
                    .operation_id
                    .as_deref()
                    .map(|id| format!("seed{}", id.trim_start_matches("v1")));
                op.description = Some(format!(
                    "The seed's unversioned path, served exactly as `{v1}` so the seed's own \
                     clients run unchanged."
                ));
            }
            openapi.paths.paths.insert(seed.to_owned(), item);
        }
    }
}

/// The route only a stage with an event log serves (`StageKind::keeps_event_log`).
pub const ORDER_EVENTS_PATH: &str = "/api/v2/orders/{id}/events";

/// The document as JSON, rendered once for each kind of stage: a stage without an event log
/// does not list [`ORDER_EVENTS_PATH`], so no client (nor a fuzzer) expects an order's events
/// from it. It still answers that route, `404 no-event-log`, to say why.
pub fn document(keeps_event_log: bool) -> &'static str {
    static WITH_LOG: OnceLock<String> = OnceLock::new();
    static WITHOUT_LOG: OnceLock<String> = OnceLock::new();
    let cell = if keeps_event_log {
        &WITH_LOG
    } else {
        &WITHOUT_LOG
    };
    cell.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        if !keeps_event_log {
            doc.paths.paths.shift_remove(ORDER_EVENTS_PATH);
        }
        doc.to_json().expect("the OpenAPI document serializes")
    })
}

/// A v1 `userId` may not start with `v2:` (any case, after trimming): those are API v2's
/// user ids. Said in the document as `not: {pattern}` on every `userId` string.
pub const V2_PREFIX_PATTERN: &str = r"^\s*[vV]2:";

/// Adds `not: {pattern: V2_PREFIX_PATTERN}` to a string schema. utoipa has no `not`; its
/// extensions are written flat into the schema object, so the keyword goes there.
fn refuse_v2_prefix(object: &mut utoipa::openapi::schema::Object) {
    object
        .extensions
        .get_or_insert_with(Default::default)
        .insert(
            "not".to_owned(),
            serde_json::json!({ "pattern": V2_PREFIX_PATTERN }),
        );
}

/// The `userId` path parameters of API v1 (and the seed's paths) refuse the `v2:` prefix.
struct V1UserIds;

impl Modify for V1UserIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{schema::Schema, RefOr};
        for item in openapi.paths.paths.values_mut() {
            let params = item
                .get
                .iter_mut()
                .flat_map(|op| op.parameters.iter_mut().flatten());
            for param in params.filter(|p| p.name == "userId") {
                if let Some(RefOr::T(Schema::Object(object))) = param.schema.as_mut() {
                    refuse_v2_prefix(object);
                }
            }
        }
    }
}

/// The methods the document lists for a route pattern (`/api/v2/events/{id}`), as an `Allow`
/// header's value.
pub fn allowed_methods(pattern: &str) -> Option<&'static str> {
    static ALLOW: OnceLock<HashMap<String, String>> = OnceLock::new();
    ALLOW
        .get_or_init(|| {
            ApiDoc::openapi()
                .paths
                .paths
                .into_iter()
                .map(|(path, item)| {
                    let methods = [
                        ("GET", item.get.is_some()),
                        ("HEAD", item.head.is_some()),
                        ("POST", item.post.is_some()),
                        ("PUT", item.put.is_some()),
                        ("PATCH", item.patch.is_some()),
                        ("DELETE", item.delete.is_some()),
                        ("OPTIONS", item.options.is_some()),
                    ];
                    let allow: Vec<&str> = methods
                        .iter()
                        .filter(|(_, present)| *present)
                        .map(|(method, _)| *method)
                        .collect();
                    (path, allow.join(", "))
                })
                .collect()
        })
        .get(pattern)
        .map(String::as_str)
}

/// `GET /api/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "discovery",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document.", body = Object)),
)]
pub async fn openapi_json(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document(state.stage.kind().keeps_event_log()))
}

// ---------- answers built with `json!`, named for the document ----------

const TEXT_PATTERN: &str = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$";

/// `eventId` in API v1: a positive integer, or a string of its digits.
pub fn event_id_input() -> Schema {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(1))
                .maximum(Some(i64::MAX)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^0*[1-9][0-9]{0,17}$")),
        )
        .description(Some("A positive integer, or a string of its digits."))
        .into()
}

/// A buyer's id in API v1: a string (1 to 200 characters after trimming, no control characters)
/// or a non-negative integer.
pub fn user_id_input() -> Schema {
    OneOfBuilder::new()
        .item({
            let mut text = ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(200))
                .pattern(Some(TEXT_PATTERN))
                .build();
            refuse_v2_prefix(&mut text);
            text
        })
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .maximum(Some(utoipa::Number::UInt(u64::MAX as usize))),
        )
        .description(Some(
            "A string (1 to 200 characters after trimming, no control characters, not \
             starting with `v2:`, which API v2's user ids do) or a non-negative integer.",
        ))
        .into()
}

/// The server's health: overall, its stage, and each dependency.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `degraded`.
    #[schema(pattern = "^(ok|degraded)$")]
    status: String,
    /// The purchase stage this server runs.
    stage: String,
    /// Each dependency's state: `ok` or `down`.
    dependencies: BTreeMap<String, String>,
}

/// One page of the payment gateway's ledger, oldest line first.
#[derive(Serialize, ToSchema)]
pub struct Ledger {
    entries: Vec<LedgerEntry>,
    /// The page size used.
    limit: u32,
    /// The position this page starts after (0: the start of the ledger).
    after: i64,
    /// The next page's URL; `null` on the last page.
    next: Option<String>,
}

/// `GET /api`
#[derive(Serialize, ToSchema)]
pub struct Discovery {
    name: String,
    versions: Vec<ApiVersion>,
    links: RootLinks,
}

#[derive(Serialize, ToSchema)]
pub struct ApiVersion {
    version: String,
    href: String,
    description: String,
}

#[derive(Serialize, ToSchema)]
pub struct RootLinks {
    openapi: String,
    health: String,
}

/// `GET /api/v2`
#[derive(Serialize, ToSchema)]
pub struct V2Index {
    version: String,
    links: V2Links,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct V2Links {
    events: String,
    orders: String,
    users: String,
    my_orders: String,
    my_tickets: String,
    health: String,
    openapi: String,
}

/// An event's links.
#[derive(Serialize, ToSchema)]
pub struct EventLinks {
    #[serde(rename = "self")]
    this: String,
    availability: String,
    orders: String,
}

/// An order's links.
#[derive(Serialize, ToSchema)]
pub struct OrderLinks {
    #[serde(rename = "self")]
    this: String,
    event: String,
}

/// A new user and its bearer token (shown once).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserCreated {
    id: String,
    name: String,
    /// Send as `Authorization: Bearer <token>`.
    token: String,
    #[schema(format = DateTime)]
    created_at: String,
    links: UserLinks,
}

#[derive(Serialize, ToSchema)]
pub struct UserLinks {
    orders: String,
    tickets: String,
}

/// The caller's orders.
#[derive(Serialize, ToSchema)]
pub struct OrderList {
    items: Vec<v2::OrderView>,
}

/// The caller's tickets.
#[derive(Serialize, ToSchema)]
pub struct TicketList {
    items: Vec<Ticket>,
}

/// One page of events.
#[derive(Serialize, ToSchema)]
pub struct EventPage<'a> {
    items: Vec<v2::EventView<'a>>,
    /// Events matching the filters, over all pages.
    total: i64,
    limit: u32,
    offset: u64,
    links: PageLinks,
}

/// A page's links; `next` and `prev` only when there is such a page.
#[derive(Serialize, ToSchema)]
pub struct PageLinks {
    #[serde(rename = "self")]
    this: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev: Option<String>,
}

/// One Server-Sent Event of `GET /api/v2/events/{id}/availability` (`: keep-alive` comments
/// between them are not events).
#[derive(Serialize, ToSchema)]
pub struct AvailabilityFrame {
    #[schema(pattern = "^availability$")]
    event: String,
    /// An `Availability` object as JSON.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// The `data` of an `availability` frame on `GET /api/v2/events/{id}/availability`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Availability {
    event_id: i64,
    available_tickets: u32,
    total_tickets: u32,
}

// ---------- problem answers that several operations share ----------
//
// Named for the document only (a handler lists them in `responses(...)`; none is ever built):
// each text is written once, and every operation that can give that answer says so the same way.
// utoipa does not collect the schemas an `IntoResponses` type refers to, hence `Problem` in
// `components(schemas(...))` above.

const PROBLEM_JSON: &str = "application/problem+json";
const UNAUTHENTICATED: &str = "No token, or one that matches nobody (`unauthenticated`).";

/// What a route for buyers refuses: no user token, or the admin's.
#[derive(IntoResponses)]
pub enum UserAuthProblems {
    #[response(status = 401, description = UNAUTHENTICATED, content_type = PROBLEM_JSON)]
    Unauthenticated(Problem),
    #[response(
        status = 403,
        description = "The admin token cannot act as a buyer (`forbidden`).",
        content_type = PROBLEM_JSON
    )]
    Forbidden(Problem),
}

/// What an admin route refuses: no admin token, or a user's.
#[derive(IntoResponses)]
pub enum AdminAuthProblems {
    #[response(status = 401, description = UNAUTHENTICATED, content_type = PROBLEM_JSON)]
    Unauthenticated(Problem),
    #[response(
        status = 403,
        description = "A user's token (`forbidden`).",
        content_type = PROBLEM_JSON
    )]
    Forbidden(Problem),
}

/// What a route with a JSON body refuses before reading it (`problem::json_error`).
#[derive(IntoResponses)]
pub enum BodyProblems {
    #[response(
        status = 413,
        description = "The body is too large (`body-too-large`).",
        content_type = PROBLEM_JSON
    )]
    TooLarge(Problem),
    #[response(
        status = 415,
        description = "The body is not `application/json` (`unsupported-media-type`).",
        content_type = PROBLEM_JSON
    )]
    NotJson(Problem),
}

/// An Idempotency-Key sent again with a different request.
#[derive(IntoResponses)]
#[response(
    status = 422,
    description = "This Idempotency-Key was used with a different request (`idempotency-key-reused`).",
    content_type = PROBLEM_JSON
)]
pub struct KeyReusedProblem(pub Problem);

/// An event id, in the path or the body, that names no event.
#[derive(IntoResponses)]
#[response(
    status = 404,
    description = "No such event (`unknown-event`).",
    content_type = PROBLEM_JSON
)]
pub struct UnknownEventProblem(pub Problem);

/// The payment gateway's ledger cannot be read.
#[derive(IntoResponses)]
#[response(
    status = 503,
    description = "The payment gateway is unavailable (`payment-gateway-unavailable`).",
    content_type = PROBLEM_JSON
)]
pub struct GatewayProblem(pub Problem);

/// A paging parameter (`limit`, `after`) that cannot be used.
#[derive(IntoResponses)]
#[response(
    status = 400,
    description = "A paging parameter out of range (`validation-failed` with `field`), unknown or of the wrong type (`invalid-query`).",
    content_type = PROBLEM_JSON
)]
pub struct PagingProblem(pub Problem);
