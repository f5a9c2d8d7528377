//! `/api/v2/users`: make a user and its bearer token; the caller's orders and tickets.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::{order_view, parse_body, OrderView};
use crate::api::auth::require_user;
use crate::api::openapi::{self, BodyProblems, UserAuthProblems};
use crate::api::{AppState, Problem};
use crate::domain::DomainError;

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
        (status = 201, description = "The user and its bearer token, shown once.", body = openapi::UserCreated,
            headers(("Location" = String, description = "The user's orders."))),
        (status = 400, description = "Malformed JSON, a wrong, unknown or missing field, or a bad name (`malformed-json`, `invalid-body`, `validation-failed`).", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Past this client's rate limit (`rate-limited`), with `Retry-After`.", body = Problem, content_type = "application/problem+json"),
        BodyProblems,
    ),
)]
pub async fn create_user(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, Problem> {
    state.limiters.account(&req)?;
    let body: NewUserBody = parse_body(crate::api::integral_numbers(body.into_inner()))?;
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
        (status = 200, description = "The caller's orders.", body = openapi::OrderList),
        UserAuthProblems,
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
        (status = 200, description = "The caller's tickets.", body = openapi::TicketList),
        UserAuthProblems,
    ),
)]
pub async fn my_tickets(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, Problem> {
    let user = require_user(&req, &state).await?;
    Ok(HttpResponse::Ok().json(json!({ "items": state.stage.user_tickets(&user).await? })))
}
