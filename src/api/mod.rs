//! The thin HTTP front: parse and validate, hand the request to the stage, map the outcome.

pub mod admin;
pub mod auth;
pub mod internal;
pub mod openapi;
pub mod problem;
pub mod rate;
pub mod streams;
pub mod v1;
pub mod v2;

use std::sync::Arc;

use actix_web::{http::StatusCode, web, HttpRequest};

use crate::config::Settings;
use crate::payments::PaymentGateway;
use crate::stages::Stage;
pub use problem::Problem;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub stage: Arc<dyn Stage>,
    pub payments: PaymentGateway,
    pub settings: Settings,
    /// The admin's bearer token (configured, or made at start and logged).
    pub admin_token: String,
    /// Per-client rate limits.
    pub limiters: rate::Limiters,
    /// The availability streams open, under their caps.
    pub streams: streams::StreamSlots,
    /// Told when an event's availability changes (the streams wait on it).
    pub changes: crate::store::changes::Changes,
}

/// Registers every route, with problem documents for bad bodies, paths and methods. API v2 is
/// served only when `serve_v2` (the monolith, like the seed's step 1, serves v1 only), API v1
/// only when `serve_v1` (`--v1`).
pub fn configure(
    cfg: &mut web::ServiceConfig,
    max_body_bytes: usize,
    serve_v2: bool,
    serve_v1: bool,
) {
    cfg.service(resource("/api").route(web::get().to(v2::root)))
        .service(resource(openapi::PATH).route(web::get().to(openapi::openapi_json)));
    if serve_v2 {
        cfg.service(resource("/api/v2").route(web::get().to(v2::index)))
            .service(resource("/api/v2/users").route(web::post().to(v2::users::create_user)))
            .service(resource("/api/v2/users/me/orders").route(web::get().to(v2::users::my_orders)))
            .service(
                resource("/api/v2/users/me/tickets").route(web::get().to(v2::users::my_tickets)),
            )
            .service(
                resource("/api/v2/events")
                    .route(web::get().to(v2::events::list_events))
                    .route(web::post().to(v2::events::create_event)),
            )
            .service(resource("/api/v2/events/{id}").route(web::get().to(v2::events::get_event)))
            .service(
                resource("/api/v2/events/{id}/availability")
                    .route(web::get().to(v2::events::availability_stream)),
            )
            .service(resource("/api/v2/orders").route(web::post().to(v2::orders::create_order)))
            .service(resource("/api/v2/orders/{id}").route(web::get().to(v2::orders::get_order)))
            .service(
                resource("/api/v2/orders/{id}/events")
                    .route(web::get().to(v2::orders::order_events)),
            )
            .service(resource("/api/v2/health").route(web::get().to(v2::admin::health)))
            .service(resource("/api/v2/admin/audit").route(web::get().to(v2::admin::audit)))
            .service(resource("/api/v2/admin/ledger").route(web::get().to(v2::admin::ledger)))
            .service(resource("/api/v2/admin/stats").route(web::get().to(v2::admin::stats)))
            .service(
                resource("/api/v2/admin/queue-stats").route(web::get().to(v2::admin::queue_stats)),
            )
            .service(resource("/api/v2/admin/nodes").route(web::get().to(v2::admin::nodes)));
    } else {
        cfg.service(web::scope("/api/v2").default_service(web::to(v2_not_served)));
    }
    cfg.app_data(
        web::JsonConfig::default()
            .limit(max_body_bytes)
            .error_handler(problem::json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(problem::query_error))
    .service(resource("/health").route(web::get().to(admin::health)))
    .service(resource("/metrics").route(web::get().to(crate::meter::scrape)));
    if !serve_v1 {
        cfg.service(web::scope("/api/v1").default_service(web::to(v1_off)))
            .default_service(web::to(not_found));
        return;
    }
    cfg.service(
        resource("/api/v1/events")
            .route(web::get().to(v1::list_events))
            .route(web::post().to(v1::create_event)),
    )
    .service(resource("/api/v1/events/{id}").route(web::get().to(v1::get_event)))
    .service(resource("/api/v1/tickets/purchase").route(web::post().to(v1::purchase)))
    .service(resource("/api/v1/tickets/user/{userId}").route(web::get().to(v1::user_tickets)))
    // The seed's own paths, unversioned, served as API v1 so its scripts run unchanged.
    .service(
        resource("/api/events")
            .route(web::get().to(v1::list_events))
            .route(web::post().to(v1::create_event)),
    )
    .service(resource("/api/events/{id}").route(web::get().to(v1::get_event)))
    .service(resource("/api/tickets/purchase").route(web::post().to(v1::purchase)))
    .service(resource("/api/tickets/user/{userId}").route(web::get().to(v1::user_tickets)))
    .service(resource("/api/v1/admin/ledger").route(web::get().to(admin::ledger)))
    .service(resource("/api/v1/admin/audit").route(web::get().to(admin::audit)))
    .service(resource("/api/v1/admin/stats").route(web::get().to(admin::stats)))
    .default_service(web::to(not_found));
}

/// The integer a float stands for, if it has no fraction and is exact (within 2^53): `5.0`
/// is 5, as JSON Schema (the OpenAPI 3.1 document's dialect) counts `5.0` an integer.
pub fn integral(f: f64) -> Option<i64> {
    (f.fract() == 0.0 && f.abs() <= 2f64.powi(53)).then_some(f as i64)
}

/// A number written with a zero fraction (`5.0`), read as its integer; `5.5` does not read.
#[derive(Debug, Clone, Copy)]
pub struct IntegralFloat(pub i64);

impl<'de> serde::Deserialize<'de> for IntegralFloat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = f64::deserialize(d)?;
        integral(f)
            .map(Self)
            .ok_or_else(|| serde::de::Error::custom(format!("{f} is not a whole number")))
    }
}

/// A request body with every integral number as an integer ([`integral`]): `5.0` becomes `5`;
/// `5.5` stays, and a field that wants an integer still refuses it. API v2 normalises its
/// bodies before anything reads them, Idempotency-Key fingerprints included, so `5` and `5.0`
/// are the same request. (API v1's typed bodies take `5.0` in their integer fields instead.)
pub fn integral_numbers(mut body: serde_json::Value) -> serde_json::Value {
    fn walk(value: &mut serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::Number(n) if n.is_f64() => {
                if let Some(i) = n.as_f64().and_then(integral) {
                    *value = Value::from(i);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            Value::Object(fields) => fields.values_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut body);
    body
}

fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn v2_not_served() -> Problem {
    Problem::not_found(
        "api-v2-not-served",
        "this stage serves API v1 only, like the seed's step 1; start the server with another --stage for API v2",
    )
}

async fn v1_off() -> Problem {
    Problem::not_found(
        "api-v1-off",
        "API v1 is off on this server (`--v1 off`, the default off loopback); use API v2",
    )
}

async fn not_found(req: HttpRequest) -> Problem {
    Problem::not_found(
        "no-such-route",
        format!("no route for {} {}", req.method(), req.path()),
    )
}

/// A 405 with the `Allow` header RFC 9110 requires, read from the OpenAPI document (which lists
/// every route, as a test checks).
async fn method_not_allowed(req: HttpRequest) -> actix_web::HttpResponse {
    let problem = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{} is not allowed on {}", req.method(), req.path()),
    );
    let mut response = actix_web::ResponseError::error_response(&problem);
    if let Some(allow) = req
        .match_pattern()
        .and_then(|pattern| openapi::allowed_methods(&pattern))
    {
        if let Ok(value) = actix_web::http::header::HeaderValue::from_str(allow) {
            response
                .headers_mut()
                .insert(actix_web::http::header::ALLOW, value);
        }
    }
    response
}

impl actix_web::Responder for Problem {
    type Body = actix_web::body::BoxBody;

    fn respond_to(self, _: &HttpRequest) -> actix_web::HttpResponse {
        actix_web::ResponseError::error_response(&self)
    }
}
