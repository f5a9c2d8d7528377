//! Per-client rate limits (token buckets, `governor`) on purchases, orders and account
//! creation: `429 rate-limited` with `Retry-After` past a client's bucket. Keys: the user on
//! API v2 orders, the client's address on v1 purchases and on account creation.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::HttpRequest;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::Problem;
use crate::config::{RateLimits, RateRule};

/// One bucket per key, refilled at the rule's rate, holding at most its count.
struct Limiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl Limiter {
    fn new(rule: RateRule) -> Self {
        let count = NonZeroU32::new(rule.count.max(1)).expect("count ≥ 1");
        let quota = Quota::with_period(rule.period / count.get())
            .unwrap_or_else(|| Quota::per_second(count))
            .allow_burst(count);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }

    fn check(&self, what: &'static str, key: String) -> Result<(), Problem> {
        match self.limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Err(Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate-limited",
                    "Too many requests",
                    format!("too many {what} from this client; retry after {secs} s"),
                )
                .retry_after(secs.max(1)))
            }
        }
    }
}

/// The server's limiters; a kind set `off` has none.
#[derive(Clone, Default)]
pub struct Limiters {
    purchases: Option<Arc<Limiter>>,
    orders: Option<Arc<Limiter>>,
    accounts: Option<Arc<Limiter>>,
}

impl Limiters {
    pub fn new(limits: &RateLimits) -> Self {
        let make = |rule: Option<RateRule>| rule.map(|r| Arc::new(Limiter::new(r)));
        Self {
            purchases: make(limits.purchases),
            orders: make(limits.orders),
            accounts: make(limits.accounts),
        }
    }

    /// Forgets buckets that are full again, so memory follows the clients active lately.
    pub fn forget_idle(&self) {
        for limiter in [&self.purchases, &self.orders, &self.accounts]
            .into_iter()
            .flatten()
        {
            limiter.limiter.retain_recent();
            limiter.limiter.shrink_to_fit();
        }
    }

    /// A v1 purchase, keyed by the client's address.
    pub fn purchase(&self, req: &HttpRequest) -> Result<(), Problem> {
        check(&self.purchases, "purchases", "purchases", client(req))
    }

    /// A v2 order, keyed by the user.
    pub fn order(&self, user: &str) -> Result<(), Problem> {
        check(&self.orders, "orders", "orders", user.to_owned())
    }

    /// A new account, keyed by the client's address.
    pub fn account(&self, req: &HttpRequest) -> Result<(), Problem> {
        check(&self.accounts, "accounts", "new accounts", client(req))
    }
}

fn check(
    limiter: &Option<Arc<Limiter>>,
    kind: &'static str,
    what: &'static str,
    key: String,
) -> Result<(), Problem> {
    let Some(limiter) = limiter else {
        return Ok(());
    };
    let checked = limiter.check(what, key);
    if checked.is_err() {
        crate::meter::rate_limited(kind);
        tracing::debug!(what, "rate limited");
    }
    checked
}

/// The peer's address (never a forwarded header, which any client can write).
fn client(req: &HttpRequest) -> String {
    req.peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
        .to_string()
}

/// How often idle buckets are forgotten.
pub const FORGET_EVERY: Duration = Duration::from_secs(60);
