//! Prometheus metrics, recorded through the `metrics` facade and rendered by
//! `metrics-exporter-prometheus` at `GET /metrics`.
//!
//! The recorder is process-wide (the facade has one global recorder), so a process that runs
//! several servers, as the integration tests do, sums them in one scrape; the `ticketflow`
//! binary runs one. Every name is defined here, and so is every label value: no label takes a
//! value from a request (an event id, a path, a user), so the number of series is fixed by this
//! file, not by traffic.
//!
//! Where each is counted:
//! - purchases that *settled* (confirmed, declined, hold expired, interrupted) are counted after
//!   the transaction that wrote their outcome committed, in the storage layer (the group-commit
//!   writer, the fenced writes of `locked`, the monolith's statements), so the `confirmed`
//!   count is what storage holds; purchases *refused* before any seat was held (sold out, not
//!   enough, per-user limit, all held, overloaded) are counted where they are answered;
//! - the HTTP counters in [`observe`], a middleware around every route.

use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

use crate::api::{AppState, Problem};
use crate::domain::CancelReason;

pub const HTTP_REQUESTS: &str = "ticketflow_http_requests_total";
pub const HTTP_DURATION: &str = "ticketflow_http_request_duration_seconds";
pub const PURCHASES: &str = "ticketflow_purchases_total";
pub const PURCHASE_DURATION: &str = "ticketflow_purchase_duration_seconds";
pub const HOLDS_EXPIRED: &str = "ticketflow_holds_expired_total";
pub const PAYMENTS: &str = "ticketflow_payments_total";
pub const PAYMENT_DURATION: &str = "ticketflow_payment_duration_seconds";
pub const MAILBOX_DEPTH: &str = "ticketflow_event_mailbox_depth";
pub const WRITER_BATCH: &str = "ticketflow_writer_batch_size";
pub const LOCK_WAIT: &str = "ticketflow_lock_wait_seconds";
pub const QUEUE_DEPTH: &str = "ticketflow_queue_depth";
pub const RATE_LIMITED: &str = "ticketflow_rate_limited_total";
pub const STREAMS_OPEN: &str = "ticketflow_availability_streams_open";
pub const STREAM_READS: &str = "ticketflow_availability_reads_total";

/// The label every path that matched no route shares.
pub const UNMATCHED: &str = "unmatched";

/// Bucket bounds, in seconds, of the duration histograms (1 ms to 30 s).
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Bucket bounds of the writer's batch sizes (writes per transaction).
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
/// The stage this process serves, the `stage` label of the purchase metrics.
static STAGE: RwLock<&'static str> = RwLock::new("none");

/// Installs the process's recorder (once; later calls return the same handle) and names the
/// stage the purchase metrics are labelled with.
pub fn install(stage: &'static str) -> PrometheusHandle {
    *STAGE.write().expect("stage label poisoned") = stage;
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(WRITER_BATCH.into()), BATCH))
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by matched route pattern, method and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time to answer an HTTP request"
    );
    describe_counter!(
        PURCHASES,
        "Purchases by outcome: settled ones counted once their outcome is committed, refused ones when answered"
    );
    describe_histogram!(
        PURCHASE_DURATION,
        Unit::Seconds,
        "Time of a purchase call to the stage (v1: until settled; v2: until its seats are held)"
    );
    describe_counter!(
        HOLDS_EXPIRED,
        "Holds that expired before their payment settled"
    );
    describe_counter!(PAYMENTS, "Charges sent to the payment gateway, by outcome");
    describe_histogram!(
        PAYMENT_DURATION,
        Unit::Seconds,
        "Time the gateway took to answer a charge"
    );
    describe_gauge!(
        MAILBOX_DEPTH,
        "Reservations waiting in event actors' mailboxes, summed over every event"
    );
    describe_histogram!(WRITER_BATCH, "Writes per group-commit transaction");
    describe_histogram!(
        LOCK_WAIT,
        Unit::Seconds,
        "Wait for an event's Redis lock (stage locked)"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Payment jobs by state (stage locked), read at each scrape"
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests answered 429 by a rate limit, by limit"
    );
    describe_gauge!(STREAMS_OPEN, "Availability streams open now");
    describe_counter!(
        STREAM_READS,
        "Reads of an event by its availability streams (one at the start, then one per change)"
    );
}

fn stage() -> &'static str {
    *STAGE.read().expect("stage label poisoned")
}

/// A purchase whose outcome was committed: `None` is confirmed, else the cancel's reason.
pub fn settled(cancel: Option<CancelReason>) {
    let outcome = match cancel {
        None => "confirmed",
        Some(CancelReason::PaymentDeclined) => "declined",
        Some(CancelReason::HoldExpired) => "hold_expired",
        Some(CancelReason::Interrupted) => "interrupted",
    };
    counter!(PURCHASES, "stage" => stage(), "outcome" => outcome).increment(1);
    if cancel == Some(CancelReason::HoldExpired) {
        counter!(HOLDS_EXPIRED).increment(1);
    }
}

/// How long a purchase call took, and the outcome if it was refused before any seat was held
/// (a settled outcome is counted where it is committed, by [`settled`]).
pub fn purchase_answered(started: Instant, error: Option<&crate::stages::PurchaseError>) {
    use crate::stages::PurchaseError as E;
    histogram!(PURCHASE_DURATION, "stage" => stage()).record(started.elapsed().as_secs_f64());
    let refused = match error {
        Some(E::SoldOut) => "sold_out",
        Some(E::NotEnough { .. }) => "not_enough",
        Some(E::UserLimit { .. }) => "user_limit",
        Some(E::AllHeld) => "all_held",
        Some(E::Overloaded) => "overloaded",
        _ => return,
    };
    counter!(PURCHASES, "stage" => stage(), "outcome" => refused).increment(1);
}

/// A charge answered by the gateway (`approved`, `declined`) or not at all (`unavailable`).
pub fn payment(outcome: &'static str, took: Duration) {
    counter!(PAYMENTS, "outcome" => outcome).increment(1);
    histogram!(PAYMENT_DURATION).record(took.as_secs_f64());
}

/// One group-commit transaction of `writes`.
pub fn writer_batch(writes: usize) {
    histogram!(WRITER_BATCH).record(writes as f64);
}

/// A Redis lock granted after `waited`.
pub fn lock_wait(waited: Duration) {
    histogram!(LOCK_WAIT).record(waited.as_secs_f64());
}

/// One reservation more (`+1.0`) or less (`-1.0`) waiting in some event actor's mailbox.
pub fn mailbox(delta: f64) {
    gauge!(MAILBOX_DEPTH).increment(delta);
}

/// A request refused by the rate limit `limit` (`purchases`, `orders`, `accounts`).
pub fn rate_limited(limit: &'static str) {
    counter!(RATE_LIMITED, "limit" => limit).increment(1);
}

/// One availability stream more (`+1.0`) or fewer (`-1.0`).
pub fn stream(delta: f64) {
    gauge!(STREAMS_OPEN).increment(delta);
}

/// An availability stream read its event.
pub fn stream_read() {
    counter!(STREAM_READS).increment(1);
}

/// The `X-Request-Id` header: the client's if it sent a short printable one, else made here.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Middleware around every route: a `request` span carrying the request's id (and the event,
/// order and user ids the handlers record on it), the HTTP counters, and the id sent back in
/// `X-Request-Id`.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let id = request_id(&req);
    let method = req.method().clone();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        path = %req.path(),
        event_id = tracing::field::Empty,
        order_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
    );
    let result = next.call(req).instrument(span.clone()).await;
    let (status, route, response) = match result {
        Ok(mut res) => {
            let route = res.request().match_pattern();
            if let Ok(value) = HeaderValue::from_str(&id) {
                res.headers_mut().insert(REQUEST_ID.clone(), value);
            }
            (res.status(), route, Ok(res))
        }
        Err(e) => (e.as_response_error().status_code(), None, Err(e)),
    };
    let route = route.unwrap_or_else(|| UNMATCHED.to_owned());
    let method = method_label(&method);
    let took = started.elapsed();
    counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status.as_u16().to_string())
        .increment(1);
    histogram!(HTTP_DURATION, "route" => route, "method" => method).record(took.as_secs_f64());
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            took_ms = took.as_millis() as u64,
            "answered"
        )
    });
    response
}

/// Methods outside the usual set share one label, so a client inventing methods adds no series.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Records an id (`event_id`, `order_id` or `user_id`) on the current request's span, so
/// every later log line of the request carries it (the JSON log's `span` field).
pub fn record_id(field: &'static str, id: &dyn std::fmt::Display) {
    tracing::Span::current().record(field, tracing::field::display(id));
}

/// `GET /metrics`: the Prometheus text format. Open when the server is bound to a loopback
/// address, behind the admin token otherwise.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "metrics",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4. No token is needed when the server is bound to a loopback address; otherwise the admin token is.", body = String, content_type = "text/plain"),
        crate::api::openapi::AdminAuthProblems,
    ),
)]
pub async fn scrape(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, Problem> {
    if !state.settings.bind.ip().is_loopback() {
        crate::api::auth::require_admin(&req, &state).await?;
    }
    // Gauges read from the stage at each scrape: the payment queue of `locked`.
    let stats = state.stage.stats().await;
    if let Some(queue) = stats.get("queue").and_then(|q| q.as_object()) {
        for state in ["waiting", "active", "failed"] {
            if let Some(n) = queue.get(state).and_then(|n| n.as_f64()) {
                gauge!(QUEUE_DEPTH, "state" => state).set(n);
            }
        }
    }
    let body = HANDLE
        .get()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body))
}

/// Runs the recorder's upkeep (drains histogram samples) every `every`, for a server nobody
/// scrapes for a while.
pub fn spawn_upkeep(every: Duration) {
    if let Some(handle) = HANDLE.get().cloned() {
        actix_rt::spawn(async move {
            loop {
                actix_rt::time::sleep(every).await;
                handle.run_upkeep();
            }
        });
    }
}
