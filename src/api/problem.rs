//! The one place errors become HTTP: `application/problem+json` (RFC 9457) with a stable `code`.

use actix_web::error::{JsonPayloadError, QueryPayloadError};
use actix_web::http::{header, StatusCode};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

use crate::domain::DomainError;
use crate::payments::GatewayUnavailable;
use crate::stages::PurchaseError;
use crate::store::StoreError;

/// An error answer. `code` is stable and documented; `detail` is for humans.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI reference naming the problem: `/problems/{code}`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    /// Stage `services`: the order whose outcome is not known yet, to look up later.
    #[serde(rename = "orderId", skip_serializing_if = "Option::is_none")]
    /// Boxed: a problem is every handler's error, so it stays small.
    pub order_id: Option<Box<crate::domain::OrderId>>,
    #[serde(skip)]
    pub retry_after_secs: Option<u32>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: format!("/problems/{code}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            code,
            field: None,
            order_id: None,
            retry_after_secs: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        self
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, "Not found", detail)
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, "Bad request", detail)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
            "the server failed to handle the request; it has been logged",
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)
    }
}

impl ResponseError for Problem {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((header::CONTENT_TYPE, "application/problem+json"));
        if let Some(secs) = self.retry_after_secs {
            response.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        response.body(serde_json::to_string(self).unwrap_or_default())
    }
}

impl From<DomainError> for Problem {
    fn from(e: DomainError) -> Self {
        let mut p = Self::bad_request("validation-failed", e.to_string());
        p.field = Some(e.field);
        p
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        if e.is_constraint() {
            tracing::warn!(error = %e, "a write was refused by a constraint");
            return Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                "the request conflicts with the current state",
            );
        }
        if let StoreError::Unavailable(cause) = &e {
            tracing::warn!(%cause, "a dependency is unavailable");
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "dependency-unavailable",
                "Service unavailable",
                e.to_string(),
            )
            .retry_after(1);
        }
        tracing::error!(error = %e, "storage failure");
        Self::internal()
    }
}

impl From<PurchaseError> for Problem {
    fn from(e: PurchaseError) -> Self {
        let detail = e.to_string();
        match e {
            PurchaseError::UnknownEvent => Self::not_found("unknown-event", detail),
            PurchaseError::NotEnough { .. } => Self::new(
                StatusCode::CONFLICT,
                "not-enough-tickets",
                "Not enough tickets",
                detail,
            ),
            PurchaseError::UserLimit { .. } => Self::new(
                StatusCode::CONFLICT,
                "user-limit",
                "Per-user limit reached",
                detail,
            ),
            PurchaseError::NotServed => Self::not_found(
                "api-v2-not-served",
                "this stage serves API v1 only; start the server with another --stage for API v2",
            ),
            PurchaseError::SoldOut => Self::new(
                StatusCode::BAD_REQUEST,
                "sold-out",
                "No tickets left",
                detail,
            ),
            PurchaseError::AllHeld => Self::new(
                StatusCode::BAD_REQUEST,
                "tickets-held",
                "No tickets available right now",
                detail,
            )
            .retry_after(1),
            PurchaseError::PaymentDeclined => Self::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment-declined",
                "Payment failed",
                detail,
            ),
            PurchaseError::HoldExpired => {
                Self::new(StatusCode::CONFLICT, "hold-expired", "Hold expired", detail)
            }
            PurchaseError::Overloaded => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Overloaded",
                detail,
            )
            .retry_after(1),
            PurchaseError::NotOwner { .. } => Self::new(
                StatusCode::MISDIRECTED_REQUEST,
                "not-owner",
                "Not this event's owner",
                detail,
            ),
            PurchaseError::OwnerChanged => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "owner-changed",
                "Event moved to another node",
                detail,
            )
            .retry_after(1),
            PurchaseError::Unresolved { order } => {
                let mut problem = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outcome-unknown",
                    "Outcome not known yet",
                    detail,
                )
                .retry_after(2);
                problem.order_id = Some(Box::new(order));
                problem
            }
            PurchaseError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "dependency-unavailable",
                "Service unavailable",
                detail,
            )
            .retry_after(1),
            PurchaseError::Gateway(e) => e.into(),
            PurchaseError::Store(e) => e.into(),
        }
    }
}

impl From<GatewayUnavailable> for Problem {
    fn from(e: GatewayUnavailable) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "payment-gateway-unavailable",
            "Payment gateway unavailable",
            e.to_string(),
        )
        .retry_after(1)
    }
}

/// Maps a JSON body the server could not take to a problem: 413, 415 or 400, never 500.
pub fn json_error(err: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let problem = match &err {
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Body too large",
            format!("the request body is larger than {limit} bytes"),
        ),
        JsonPayloadError::ContentType => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonPayloadError::Deserialize(e) if e.is_data() => {
            Problem::bad_request("invalid-body", format!("invalid request body: {e}"))
        }
        JsonPayloadError::Deserialize(e) => {
            Problem::bad_request("malformed-json", format!("the body is not valid JSON: {e}"))
        }
        JsonPayloadError::Payload(e) if crate::limits::is_body_timeout(e) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            "Request body too slow",
            e.to_string(),
        ),
        other => Problem::bad_request("invalid-body", format!("could not read the body: {other}")),
    };
    problem.into()
}

/// Maps a query string the server could not take (an unknown parameter, a wrong type) to a 400
/// problem, like a bad body, instead of actix's plain-text answer.
pub fn query_error(err: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    invalid_query(err).into()
}

/// A query string that does not parse (an unknown parameter, a wrong type): 400 `invalid-query`.
pub fn invalid_query(err: QueryPayloadError) -> Problem {
    Problem::bad_request("invalid-query", format!("invalid query string: {err}"))
}
