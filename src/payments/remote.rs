//! The payment gateway as the other nodes of stage `services` see it: the payments node
//! ([`super::service`]) over HTTP/JSON.
//!
//! A charge or refund retried under the same payment key is safe (the gateway answers a key
//! once and repeats that answer), so every failure that leaves the outcome unknown is retried:
//! a refused or dropped connection, a timeout, a body cut short, a `503` (the node could not
//! write its books). Retries back off and stop after [`RETRY_FOR`]; the caller then hears
//! [`GatewayUnavailable`] and may ask again later under the same key. The node is found at
//! `--payments-url`, or else in `service_nodes` (the live `payments` row), looked up again
//! after a failure, since a restarted node may answer elsewhere.

use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{Mutex, Semaphore};

use super::service::{
    ChargeAnswer, ChargeRequest, RefundAnswer, RefundRequest, CHARGE_PATH, PAYMENTS, REFUND_PATH,
};
use super::{ChargeOutcome, GatewayUnavailable, RefundOutcome};
use crate::domain::Money;
use crate::store::Store;

/// Longest one call may take, the gateway's own latency included (the seed's is at most 3 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection to the payments node may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a charge or refund keeps being retried before the caller hears the gateway is
/// unavailable (the attempt under way when it runs out is finished first).
pub const RETRY_FOR: Duration = Duration::from_secs(3);
/// Calls to the payments node open at once from this process, which bounds its connections
/// (HTTP/1.1: one call per connection); a call past it waits for a free slot.
pub const MAX_CALLS: usize = 256;
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Least time between two reads of `service_nodes` when no payments node is found, so that
/// many purchases failing together do not each query the database.
const LOOKUP_EVERY: Duration = Duration::from_millis(100);

/// Why the remote gateway could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("--payments-url {url}: {why}; give http://HOST:PORT")]
    BadUrl { url: String, why: String },
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
}

/// A client of the payments node; shared by every purchase of this process.
pub struct RemotePayments {
    client: reqwest::Client,
    route: Route,
    /// Bounds the calls open at once ([`MAX_CALLS`]). A semaphore: reqwest bounds only the
    /// idle connections it keeps, not the ones in use.
    calls: Semaphore,
    /// The deployment's admin token, which the payments node asks of its callers.
    token: Option<String>,
}

/// Where the payments node answers.
enum Route {
    /// Given on the command line: always there.
    Fixed(String),
    /// The live `payments` row of `service_nodes`, reported within `window`.
    Lookup {
        store: Store,
        window: Duration,
        /// A tokio mutex, held across the lookup's query on purpose: callers that find no
        /// address wait for the one lookup under way instead of each making their own.
        found: Mutex<Found>,
    },
}

#[derive(Default)]
struct Found {
    base: Option<String>,
    looked_up: Option<Instant>,
}

/// One attempt's failure: worth retrying under the same key, or not.
enum Failure {
    Retry(String),
    Final(String),
}

impl RemotePayments {
    /// A client of the node at `url` if given, else of the one `store`'s `service_nodes`
    /// reports up within `window`.
    pub fn new(
        url: Option<&str>,
        store: Store,
        window: Duration,
        token: Option<String>,
    ) -> Result<Self, RemoteError> {
        let route = match url {
            Some(url) => Route::Fixed(base_url(url)?),
            None => Route::Lookup {
                store,
                window,
                found: Mutex::new(Found::default()),
            },
        };
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(MAX_CALLS)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| RemoteError::Client(e.to_string()))?;
        Ok(Self {
            client,
            route,
            calls: Semaphore::new(MAX_CALLS),
            token,
        })
    }

    pub async fn charge(
        &self,
        key: &str,
        amount: Money,
    ) -> Result<ChargeOutcome, GatewayUnavailable> {
        let request = ChargeRequest {
            key: key.to_owned(),
            amount_cents: amount.cents(),
        };
        let answer: ChargeAnswer = self.call(CHARGE_PATH, &request, key).await?;
        Ok(answer.into())
    }

    pub async fn refund(&self, key: &str) -> Result<RefundOutcome, GatewayUnavailable> {
        let request = RefundRequest {
            key: key.to_owned(),
        };
        let answer: RefundAnswer = self.call(REFUND_PATH, &request, key).await?;
        Ok(answer.into())
    }

    /// POSTs `body` to `path` until the node answers, or [`RETRY_FOR`] has passed.
    async fn call<B: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        key: &str,
    ) -> Result<A, GatewayUnavailable> {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1.. {
            let why = match self.attempt(path, body).await {
                Ok(answer) => return Ok(answer),
                Err(Failure::Final(why)) => {
                    tracing::error!(key, %why, "the payments node refused the call");
                    return Err(GatewayUnavailable);
                }
                Err(Failure::Retry(why)) => why,
            };
            if started.elapsed() + backoff >= RETRY_FOR {
                tracing::warn!(key, attempt, %why, "the payments node did not answer; the outcome is unknown for now");
                return Err(GatewayUnavailable);
            }
            tracing::debug!(key, attempt, %why, "retrying the payments node under the same key");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        unreachable!("the loop returns")
    }

    async fn attempt<B: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<A, Failure> {
        let base = self.route.base().await.map_err(Failure::Retry)?;
        let _slot = self
            .calls
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut request = self.client.post(format!("{base}{path}")).json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                // Refused, reset, timed out: the node may have died or moved.
                self.route.forget(&base).await;
                return Err(Failure::Retry(format!("{base}: {error}")));
            }
        };
        let status = response.status().as_u16();
        match status {
            200 => response
                .json::<A>()
                .await
                .map_err(|e| Failure::Retry(format!("{base}: the answer was cut short: {e}"))),
            // The books could not be written: the node is there, the outcome unknown.
            503 => Err(Failure::Retry(format!(
                "{base}: 503 (its books are unwritable)"
            ))),
            400 | 413 | 415 => {
                let text = response.text().await.unwrap_or_default();
                Err(Failure::Final(format!("{base}: {status}: {text}")))
            }
            _ => {
                // Not a payments node (a stale address another process took), or a bug.
                self.route.forget(&base).await;
                Err(Failure::Retry(format!(
                    "{base}: unexpected status {status}"
                )))
            }
        }
    }
}

impl Route {
    /// The payments node's base URL (`http://HOST:PORT`), or why there is none now.
    async fn base(&self) -> Result<String, String> {
        let (store, window, found) = match self {
            Self::Fixed(base) => return Ok(base.clone()),
            Self::Lookup {
                store,
                window,
                found,
            } => (store, *window, found),
        };
        let mut found = found.lock().await;
        if let Some(base) = &found.base {
            return Ok(base.clone());
        }
        if let Some(at) = found.looked_up {
            if at.elapsed() < LOOKUP_EVERY {
                return Err("no payments node has reported itself in service_nodes lately".into());
            }
        }
        found.looked_up = Some(Instant::now());
        match store.live_node(PAYMENTS, window).await {
            Ok(Some((id, addr))) => {
                let base = format!("http://{addr}");
                tracing::info!(node = %id, %base, "calling the payments node");
                found.base = Some(base.clone());
                Ok(base)
            }
            Ok(None) => Err("no payments node has reported itself in service_nodes lately".into()),
            Err(error) => Err(format!("service_nodes cannot be read: {error}")),
        }
    }

    /// Forgets `base` after it failed, so the next call looks the node up again.
    async fn forget(&self, base: &str) {
        if let Self::Lookup { found, .. } = self {
            let mut found = found.lock().await;
            if found.base.as_deref() == Some(base) {
                found.base = None;
            }
        }
    }
}

/// `url` checked and without a trailing slash.
fn base_url(url: &str) -> Result<String, RemoteError> {
    let bad = |why: &str| RemoteError::BadUrl {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(bad("the scheme must be http"));
    }
    if parsed.host_str().is_none() {
        return Err(bad("no host"));
    }
    if parsed.path() != "/" || parsed.query().is_some() {
        return Err(bad("give the node's address only, without a path"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::base_url;

    #[test]
    fn a_payments_url_is_an_address_without_a_path() {
        assert_eq!(
            base_url("http://127.0.0.1:9000/").unwrap(),
            "http://127.0.0.1:9000"
        );
        for bad in ["127.0.0.1:9000", "ftp://h:1", "http://h:1/pay", "nonsense"] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }
}
