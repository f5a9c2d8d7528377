//! The simulated payment gateway: a pool of payment actors standing in for a slow, failing
//! external service, and the books it keeps as a real gateway keeps its own.
//!
//! Each payment key always lands on the same actor (keys are sharded by hash). Each outcome
//! (approved or declined, and how long it takes) is drawn from an RNG seeded with the run's seed
//! and the key, so the k-th purchase of a replayed run meets the same fate however requests
//! interleave. The gateway's truth is its [`books`]: every charge, decline and refund, each under
//! the key it answered, in a table of its own ([`crate::store::gateway`]), committed before the
//! caller hears the answer. They outlive the process, so a charge retried after `kill -9` gets the answer it
//! got before, and the audit reconciles against everything ever charged. Each actor remembers
//! the keys it answered last ([`recent`], bounded) so a retry rarely needs the books; nothing
//! else about charges is held in memory.
//!
//! Stage `services` runs the pool in one process, the payments node ([`service`]); the other
//! nodes hold a [`PaymentGateway::remote`] handle with the same methods, whose charges and
//! refunds go to it over HTTP ([`remote`]) and whose ledger reads go to the same books.

pub mod books;
pub mod recent;
pub mod remote;
pub mod service;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use uuid::Uuid;

use self::books::{BooksHandle, Known};
use self::recent::RecentKeys;
use self::remote::{RemoteError, RemotePayments};
use crate::config::{LatencyModel, PaymentSettings, ServicesSettings};
use crate::domain::Money;
pub use crate::store::gateway::{LedgerEntry, LedgerKind, Reconciliation};
use crate::store::{GatewayBooks, Store, StoreError, StoreResult};

/// Room in each payment actor's mailbox; callers wait (backpressure) when it is full.
const PAYMENT_MAILBOX: usize = 1024;
/// Keys each payment actor remembers after answering them; older ones are read from the books.
pub const RECENT_KEYS_PER_ACTOR: usize = 4096;

/// What the gateway answered to a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeOutcome {
    Approved { charge_id: Uuid },
    Declined,
}

/// What the gateway answered to a refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundOutcome {
    Refunded,
    /// Refunded before: refunds are idempotent too.
    AlreadyRefunded,
    /// The key was never charged successfully.
    NothingToRefund,
}

/// The gateway did not answer: its actors have stopped, or its books could not be written (the
/// charge may or may not have happened; asking again under the same key says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the payment gateway is not running")]
pub struct GatewayUnavailable;

/// A handle on the pool and its books; cheap to clone.
#[derive(Clone)]
pub struct PaymentGateway {
    pool: Pool,
    books: Arc<dyn GatewayBooks>,
    /// Payments under way, for the audit's quiet check. An atomic: every purchase task touches
    /// it, and it is one integer with no invariant to share.
    in_flight: Arc<AtomicUsize>,
}

/// Where charges and refunds are answered.
#[derive(Clone)]
enum Pool {
    /// This process's payment actors: the stages of one process, and the payments node.
    Local(Vec<Addr<PaymentActor>>),
    /// The payments node, over HTTP: the other nodes of stage `services`.
    Remote(Arc<RemotePayments>),
}

/// One payment under way; counted in [`PaymentGateway::in_flight`] until dropped.
#[must_use = "the payment counts as in flight only while this is held"]
pub struct PaymentInFlight(Arc<AtomicUsize>);

impl Drop for PaymentInFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PaymentGateway {
    /// Starts the books task and `settings.pool_size` payment actors, spread over `arbiters`
    /// (or the current one). Must be called inside an actix `System`.
    pub async fn start(
        settings: &PaymentSettings,
        seed: u64,
        books: Arc<dyn GatewayBooks>,
        arbiters: &[ArbiterHandle],
    ) -> StoreResult<Self> {
        let writer = BooksHandle::start(Arc::clone(&books)).await?;
        let pool_size = settings.pool_size.max(1);
        let actors = (0..pool_size)
            .map(|i| {
                let actor = PaymentActor {
                    seed,
                    latency: settings.latency,
                    failure_rate: settings.failure_rate,
                    books: writer.clone(),
                    recent: RecentKeys::new(RECENT_KEYS_PER_ACTOR),
                };
                match arbiters.get(i % arbiters.len().max(1)) {
                    Some(arbiter) => PaymentActor::start_in_arbiter(arbiter, |ctx| {
                        ctx.set_mailbox_capacity(PAYMENT_MAILBOX);
                        actor
                    }),
                    None => PaymentActor::create(|ctx| {
                        ctx.set_mailbox_capacity(PAYMENT_MAILBOX);
                        actor
                    }),
                }
            })
            .collect();
        Ok(Self {
            pool: Pool::Local(actors),
            books,
            in_flight: Arc::default(),
        })
    }

    /// A handle on the payments node of a `services` deployment: at `services.payments_url`
    /// if given, else the live `payments` node of `store`'s `service_nodes`. Charges and
    /// refunds go to it over HTTP; the ledger and the reconciliation are read from its books
    /// in `store`. Needs no actix `System` until it is used.
    /// A gateway whose charges and refunds go to the payments node, authenticated with the
    /// deployment's admin token (`token`).
    pub fn remote(
        services: &ServicesSettings,
        store: Store,
        token: Option<String>,
    ) -> Result<Self, RemoteError> {
        // The address of the node seen last within a generous window: a report late under
        // load is still worth a try, and a dead node's address fails fast (refused).
        let window = (services.lease_ttl * 5).max(Duration::from_secs(10));
        let remote = RemotePayments::new(
            services.payments_url.as_deref(),
            store.clone(),
            window,
            token,
        )?;
        Ok(Self {
            pool: Pool::Remote(Arc::new(remote)),
            books: Arc::new(store),
            in_flight: Arc::default(),
        })
    }

    /// Counts a payment as in flight until the guard is dropped. Each charge and refund counts
    /// itself; a stage holds one guard more from its charge until the outcome is written (the
    /// refund of a late success included), so no gap between the steps looks quiet.
    pub fn track(&self) -> PaymentInFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        PaymentInFlight(Arc::clone(&self.in_flight))
    }

    /// Payments under way now: charges and refunds on the wire, and payments whose outcome a
    /// stage has not yet written.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn shard<'a>(actors: &'a [Addr<PaymentActor>], key: &str) -> &'a Addr<PaymentActor> {
        &actors[(fnv1a(key.as_bytes()) % actors.len() as u64) as usize]
    }

    /// Charges `amount` under `key`; the same key never charges twice, in this run or any other
    /// on the same books.
    pub async fn charge(
        &self,
        key: &str,
        amount: Money,
    ) -> Result<ChargeOutcome, GatewayUnavailable> {
        let _counted = self.track();
        let started = std::time::Instant::now();
        let answer = match &self.pool {
            Pool::Local(actors) => Self::shard(actors, key)
                .send(Charge {
                    key: key.to_owned(),
                    amount_cents: amount.cents(),
                })
                .await
                .map_err(|_| GatewayUnavailable)
                .and_then(|answer| answer),
            Pool::Remote(remote) => remote.charge(key, amount).await,
        };
        let outcome = match &answer {
            Ok(ChargeOutcome::Approved { .. }) => "approved",
            Ok(ChargeOutcome::Declined) => "declined",
            Err(_) => "unavailable",
        };
        crate::meter::payment(outcome, started.elapsed());
        answer
    }

    /// Refunds the successful charge made under `key`, if there is one.
    pub async fn refund(&self, key: &str) -> Result<RefundOutcome, GatewayUnavailable> {
        let _counted = self.track();
        match &self.pool {
            Pool::Local(actors) => Self::shard(actors, key)
                .send(Refund {
                    key: key.to_owned(),
                })
                .await
                .map_err(|_| GatewayUnavailable)?,
            Pool::Remote(remote) => remote.refund(key).await,
        }
    }

    /// Up to `limit` ledger lines after position `after` (0: from the start), in the order the
    /// gateway wrote them.
    pub async fn ledger_page(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, GatewayUnavailable> {
        self.books
            .ledger_page(after, limit)
            .await
            .map_err(unreadable)
    }

    /// The payments against the books, summed for the audit.
    pub async fn reconciliation(&self) -> Result<Reconciliation, GatewayUnavailable> {
        self.books.reconciliation().await.map_err(unreadable)
    }
}

/// The books could not be read: logged with its cause, answered as the gateway being down.
fn unreadable(error: StoreError) -> GatewayUnavailable {
    tracing::error!(%error, "the payment gateway's books cannot be read");
    GatewayUnavailable
}

/// FNV-1a: a stable hash (std's hasher is randomly keyed per process, which would break replay).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct PaymentActor {
    seed: u64,
    latency: LatencyModel,
    failure_rate: f64,
    books: BooksHandle,
    /// Keys this actor answered lately, as the books hold them. Only this actor's keys land
    /// here, and only its own handlers touch it, so no lock.
    recent: RecentKeys<Known>,
}

impl Actor for PaymentActor {
    type Context = Context<Self>;
}

impl PaymentActor {
    /// The outcome a new key gets, and how long the gateway takes to answer it.
    fn decide(&self, key: &str) -> (ChargeOutcome, Duration) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ fnv1a(key.as_bytes()));
        let declined = rng.gen_bool(self.failure_rate.clamp(0.0, 1.0));
        let latency = sample_latency(self.latency, &mut rng);
        let outcome = if declined {
            ChargeOutcome::Declined
        } else {
            ChargeOutcome::Approved {
                charge_id: Uuid::from_bytes(rng.gen()),
            }
        };
        (outcome, latency)
    }

    /// Remembers what the books said about `key`, never forgetting a refund seen before.
    fn remember(&mut self, key: String, known: Known) {
        let merged = match self.recent.get(&key) {
            Some(held) => held.merge(known),
            None => known,
        };
        self.recent.insert(key, merged);
    }
}

/// Draws one gateway latency from `model`.
pub fn sample_latency(model: LatencyModel, rng: &mut impl Rng) -> Duration {
    match model {
        LatencyModel::Zero => Duration::ZERO,
        LatencyModel::Fixed(d) => d,
        LatencyModel::Uniform(low, high) if low == high => low,
        LatencyModel::Uniform(low, high) => rng.gen_range(low..=high),
        LatencyModel::LogNormal { median, sigma } => {
            let mu = median.as_secs_f64().max(1e-9).ln();
            let secs = LogNormal::new(mu, sigma)
                .map(|d| d.sample(rng))
                .unwrap_or(median.as_secs_f64());
            Duration::from_secs_f64(secs.min(3600.0))
        }
    }
}

async fn pause(latency: Duration) {
    if !latency.is_zero() {
        actix_rt::time::sleep(latency).await;
    }
}

#[derive(Message)]
#[rtype(result = "Result<ChargeOutcome, GatewayUnavailable>")]
struct Charge {
    key: String,
    amount_cents: i64,
}

impl Handler<Charge> for PaymentActor {
    type Result = ResponseActFuture<Self, Result<ChargeOutcome, GatewayUnavailable>>;

    fn handle(&mut self, msg: Charge, _: &mut Self::Context) -> Self::Result {
        let (proposed, latency) = self.decide(&msg.key);
        if let Some(known) = self.recent.get(&msg.key) {
            let outcome = known.outcome;
            return Box::pin(
                async move {
                    pause(latency).await;
                    Ok(outcome)
                }
                .into_actor(self),
            );
        }
        // The gateway's latency and its commit run side by side: the answer comes when both
        // are done, and never before the charge is in the books. Other messages are handled
        // meanwhile (this future is spawned on the actor, not waited on).
        let books = self.books.clone();
        let Charge { key, amount_cents } = msg;
        let booked = async move {
            let (booked, ()) = futures::join!(
                books.charge(key.clone(), amount_cents, proposed),
                pause(latency)
            );
            (key, booked)
        };
        Box::pin(booked.into_actor(self).map(|(key, booked), actor, _| {
            let known = booked?;
            actor.remember(key, known);
            Ok(known.outcome)
        }))
    }
}

#[derive(Message)]
#[rtype(result = "Result<RefundOutcome, GatewayUnavailable>")]
struct Refund {
    key: String,
}

impl Handler<Refund> for PaymentActor {
    type Result = ResponseActFuture<Self, Result<RefundOutcome, GatewayUnavailable>>;

    fn handle(&mut self, msg: Refund, _: &mut Self::Context) -> Self::Result {
        let settled = match self.recent.get(&msg.key) {
            Some(Known {
                outcome: ChargeOutcome::Declined,
                ..
            }) => Some(RefundOutcome::NothingToRefund),
            Some(Known { refunded: true, .. }) => Some(RefundOutcome::AlreadyRefunded),
            _ => None,
        };
        if let Some(outcome) = settled {
            return Box::pin(fut::ready(Ok(outcome)));
        }
        let books = self.books.clone();
        let key = msg.key;
        let refunded = async move {
            let outcome = books.refund(key.clone()).await;
            (key, outcome)
        };
        Box::pin(refunded.into_actor(self).map(|(key, outcome), actor, _| {
            let outcome = outcome?;
            if outcome != RefundOutcome::NothingToRefund {
                if let Some(known) = actor.recent.get_mut(&key) {
                    known.refunded = true;
                }
            }
            Ok(outcome)
        }))
    }
}

#[cfg(test)]
#[derive(Message)]
#[rtype(result = "usize")]
struct CountRecent;

#[cfg(test)]
impl Handler<CountRecent> for PaymentActor {
    type Result = usize;

    fn handle(&mut self, _: CountRecent, _: &mut Self::Context) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::store::Store;

    /// Books in a fresh SQLite file; keep the directory alive as long as the books.
    async fn books() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("books.db");
        let store = Store::open(path.to_str().unwrap(), Durability::Normal)
            .await
            .unwrap();
        (store, dir)
    }

    async fn gateway_on(
        store: &Store,
        pool_size: usize,
        seed: u64,
        failure_rate: f64,
    ) -> PaymentGateway {
        PaymentGateway::start(
            &PaymentSettings {
                pool_size,
                latency: LatencyModel::Zero,
                failure_rate,
            },
            seed,
            Arc::new(store.clone()),
            &[],
        )
        .await
        .unwrap()
    }

    async fn ledger(gw: &PaymentGateway) -> Vec<LedgerEntry> {
        gw.ledger_page(0, 10_000).await.unwrap()
    }

    #[actix::test]
    async fn the_same_key_is_charged_once_and_answers_the_same() {
        let (store, _dir) = books().await;
        let gw = gateway_on(&store, 3, 7, 0.0).await;
        let amount = Money::from_cents(500).unwrap();
        let first = gw.charge("k1", amount).await.unwrap();
        let again = gw.charge("k1", amount).await.unwrap();
        assert_eq!(first, again);
        let ledger = ledger(&gw).await;
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger[0].kind, LedgerKind::Charge);
        assert_eq!(ledger[0].amount_cents, 500);
    }

    #[actix::test]
    async fn a_refund_happens_once_and_only_after_a_charge() {
        let (store, _dir) = books().await;
        let gw = gateway_on(&store, 3, 7, 0.0).await;
        let amount = Money::from_cents(500).unwrap();
        assert_eq!(
            gw.refund("k1").await.unwrap(),
            RefundOutcome::NothingToRefund
        );
        gw.charge("k1", amount).await.unwrap();
        assert_eq!(gw.refund("k1").await.unwrap(), RefundOutcome::Refunded);
        assert_eq!(
            gw.refund("k1").await.unwrap(),
            RefundOutcome::AlreadyRefunded
        );
        let kinds: Vec<LedgerKind> = ledger(&gw).await.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [LedgerKind::Charge, LedgerKind::Refund]);
    }

    #[actix::test]
    async fn outcomes_depend_on_seed_and_key_only() {
        let amount = Money::from_cents(1).unwrap();
        let ((store_a, _a), (store_b, _b)) = (books().await, books().await);
        let a = gateway_on(&store_a, 3, 7, 0.5).await;
        let b = gateway_on(&store_b, 3, 7, 0.5).await;
        let mut declined = 0;
        for i in 0..200 {
            let key = format!("key-{i}");
            let x = a.charge(&key, amount).await.unwrap();
            let y = b.charge(&key, amount).await.unwrap();
            assert_eq!(x, y);
            declined += usize::from(x == ChargeOutcome::Declined);
        }
        assert!((60..140).contains(&declined), "declined {declined} of 200");
    }

    #[actix::test]
    async fn a_gateway_started_again_on_the_same_books_answers_as_before() {
        let (store, _dir) = books().await;
        let amount = Money::from_cents(700).unwrap();
        let keys: Vec<String> = (0..100).map(|i| format!("order-{i}")).collect();
        let first = gateway_on(&store, 2, 1, 0.5).await;
        let before = futures::future::join_all(keys.iter().map(|k| first.charge(k, amount))).await;
        let lines = ledger(&first).await.len();
        assert_eq!(lines, keys.len());
        drop(first);

        // Another seed decides differently: only the books can give the same answers.
        let second = gateway_on(&store, 3, 2, 0.5).await;
        let after = futures::future::join_all(keys.iter().map(|k| second.charge(k, amount))).await;
        assert_eq!(before, after);
        let approved = keys
            .iter()
            .zip(&before)
            .find(|(_, outcome)| matches!(outcome, Ok(ChargeOutcome::Approved { .. })))
            .map(|(key, _)| key)
            .expect("some charge was approved");
        assert_eq!(
            second.refund(approved).await.unwrap(),
            RefundOutcome::Refunded
        );
        let ledger = ledger(&second).await;
        assert_eq!(ledger.len(), lines + 1, "nothing charged twice, one refund");
        assert!(ledger.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[actix::test]
    async fn an_actor_remembers_a_bounded_number_of_keys_and_reads_older_ones_from_the_books() {
        let (store, _dir) = books().await;
        let gw = gateway_on(&store, 1, 3, 0.5).await;
        let amount = Money::from_cents(100).unwrap();
        let keys: Vec<String> = (0..RECENT_KEYS_PER_ACTOR + 50)
            .map(|i| format!("k-{i}"))
            .collect();
        let first = futures::future::join_all(keys.iter().map(|k| gw.charge(k, amount))).await;
        let Pool::Local(actors) = &gw.pool else {
            unreachable!("a local gateway")
        };
        let remembered = actors[0].send(CountRecent).await.unwrap();
        assert_eq!(remembered, RECENT_KEYS_PER_ACTOR);
        // the oldest keys are forgotten: their retries are answered from the books
        for (key, outcome) in keys.iter().zip(&first).take(50) {
            assert_eq!(&gw.charge(key, amount).await, outcome);
        }
        assert_eq!(ledger(&gw).await.len(), keys.len());
        assert!(actors[0].send(CountRecent).await.unwrap() <= RECENT_KEYS_PER_ACTOR);
    }
}
