//! Who is calling: a user (bearer token from `POST /api/v2/users`), the admin (the configured
//! admin token), or nobody.

use actix_web::http::{header, StatusCode};
use actix_web::HttpRequest;

use super::{AppState, Problem};
use crate::domain::UserId;

/// The caller behind a request's `Authorization: Bearer` header.
pub enum Caller {
    Anonymous,
    User(UserId),
    Admin,
}

fn unauthenticated(detail: &str) -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Unauthenticated",
        detail,
    )
}

fn forbidden(detail: &str) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
}

/// Identifies the caller; a token that matches nobody is a 401.
pub async fn caller(req: &HttpRequest, state: &AppState) -> Result<Caller, Problem> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(Caller::Anonymous);
    };
    // The scheme is case-insensitive (RFC 7235 section 2.1): `bearer` and `BEARER` are `Bearer`.
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthenticated("send `Authorization: Bearer <token>`"))?;
    if constant_time_eq(token.as_bytes(), state.admin_token.as_bytes()) {
        return Ok(Caller::Admin);
    }
    match state.stage.records().user_by_token(token).await? {
        Some(user) => Ok(Caller::User(user)),
        None => Err(unauthenticated("the bearer token is not valid")),
    }
}

/// A buyer's routes: a user token is required.
pub async fn require_user(req: &HttpRequest, state: &AppState) -> Result<UserId, Problem> {
    match caller(req, state).await? {
        Caller::User(user) => Ok(user),
        Caller::Admin => Err(forbidden(
            "the admin token cannot act as a buyer; create a user with POST /api/v2/users",
        )),
        Caller::Anonymous => Err(unauthenticated(
            "this route needs a user's bearer token; create a user with POST /api/v2/users",
        )),
    }
}

/// Admin routes: the admin token is required; a user token is a 403.
pub async fn require_admin(req: &HttpRequest, state: &AppState) -> Result<(), Problem> {
    match caller(req, state).await? {
        Caller::Admin => Ok(()),
        Caller::User(_) => Err(forbidden("this route is for the admin only")),
        Caller::Anonymous => Err(unauthenticated("this route needs the admin token")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
