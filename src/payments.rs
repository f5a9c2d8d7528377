//! The simulated payment gateway: a pool of payment actors standing in for a slow, failing
//! external service.
//!
//! Each payment key always lands on the same actor (keys are sharded by hash), so the actor's
//! own map deduplicates charges without a lock, as a real gateway deduplicates by idempotency
//! key. Each outcome (approved or declined, and how long it takes) is drawn from an RNG seeded
//! with the run's seed and the key, so the k-th purchase of a replayed run meets the same fate
//! however requests interleave, and a charge retried after a crash gets the answer it got
//! before. The actors keep the gateway's own ledger of every charge and refund: the external
//! truth the audit reconciles against.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use chrono::Utc;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use serde::Serialize;
use uuid::Uuid;

use crate::config::{LatencyModel, PaymentSettings};
use crate::domain::{timestamp, Money};

/// Room in each payment actor's mailbox; callers wait (backpressure) when it is full.
const PAYMENT_MAILBOX: usize = 1024;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the payment gateway is not running")]
pub struct GatewayUnavailable;

/// One line of the gateway's ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub key: String,
    pub kind: LedgerKind,
    pub amount_cents: i64,
    pub at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    Charge,
    Decline,
    Refund,
}

/// A handle on the pool; cheap to clone.
#[derive(Clone)]
pub struct PaymentGateway {
    actors: Vec<Addr<PaymentActor>>,
}

impl PaymentGateway {
    /// Starts `settings.pool_size` payment actors, spread over `arbiters` (or the current one).
    pub fn start(settings: &PaymentSettings, seed: u64, arbiters: &[ArbiterHandle]) -> Self {
        let pool_size = settings.pool_size.max(1);
        let actors = (0..pool_size)
            .map(|i| {
                let actor = PaymentActor {
                    seed,
                    latency: settings.latency,
                    failure_rate: settings.failure_rate,
                    keys: HashMap::new(),
                    ledger: Vec::new(),
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
        Self { actors }
    }

    fn shard(&self, key: &str) -> &Addr<PaymentActor> {
        &self.actors[(fnv1a(key.as_bytes()) % self.actors.len() as u64) as usize]
    }

    /// Charges `amount` under `key`; the same key never charges twice.
    pub async fn charge(
        &self,
        key: &str,
        amount: Money,
    ) -> Result<ChargeOutcome, GatewayUnavailable> {
        self.shard(key)
            .send(Charge {
                key: key.to_owned(),
                amount_cents: amount.cents(),
            })
            .await
            .map_err(|_| GatewayUnavailable)
    }

    /// Refunds the successful charge made under `key`, if there is one.
    pub async fn refund(&self, key: &str) -> Result<RefundOutcome, GatewayUnavailable> {
        self.shard(key)
            .send(Refund {
                key: key.to_owned(),
            })
            .await
            .map_err(|_| GatewayUnavailable)
    }

    /// The whole ledger, in no particular order across actors.
    pub async fn ledger(&self) -> Result<Vec<LedgerEntry>, GatewayUnavailable> {
        let mut all = Vec::new();
        for actor in &self.actors {
            all.extend(
                actor
                    .send(ReadLedger)
                    .await
                    .map_err(|_| GatewayUnavailable)?,
            );
        }
        Ok(all)
    }
}

/// FNV-1a: a stable hash (std's hasher is randomly keyed per process, which would break replay).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct KeyState {
    outcome: ChargeOutcome,
    amount_cents: i64,
    latency: Duration,
    refunded: bool,
}

struct PaymentActor {
    seed: u64,
    latency: LatencyModel,
    failure_rate: f64,
    keys: HashMap<String, KeyState>,
    ledger: Vec<LedgerEntry>,
}

impl Actor for PaymentActor {
    type Context = Context<Self>;
}

impl PaymentActor {
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

    fn record(&mut self, key: &str, kind: LedgerKind, amount_cents: i64) {
        self.ledger.push(LedgerEntry {
            key: key.to_owned(),
            kind,
            amount_cents,
            at: timestamp(Utc::now()),
        });
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

#[derive(Message)]
#[rtype(result = "ChargeOutcome")]
struct Charge {
    key: String,
    amount_cents: i64,
}

impl Handler<Charge> for PaymentActor {
    type Result = ResponseFuture<ChargeOutcome>;

    fn handle(&mut self, msg: Charge, _: &mut Self::Context) -> Self::Result {
        // The charge happens (and is in the ledger) as soon as the gateway decides, whether or
        // not the caller is still waiting when the latency has passed.
        let (outcome, latency) = match self.keys.get(&msg.key) {
            Some(seen) => (seen.outcome, seen.latency),
            None => {
                let (outcome, latency) = self.decide(&msg.key);
                let kind = match outcome {
                    ChargeOutcome::Approved { .. } => LedgerKind::Charge,
                    ChargeOutcome::Declined => LedgerKind::Decline,
                };
                self.record(&msg.key, kind, msg.amount_cents);
                self.keys.insert(
                    msg.key,
                    KeyState {
                        outcome,
                        amount_cents: msg.amount_cents,
                        latency,
                        refunded: false,
                    },
                );
                (outcome, latency)
            }
        };
        Box::pin(async move {
            if !latency.is_zero() {
                actix_rt::time::sleep(latency).await;
            }
            outcome
        })
    }
}

#[derive(Message)]
#[rtype(result = "RefundOutcome")]
struct Refund {
    key: String,
}

impl Handler<Refund> for PaymentActor {
    type Result = MessageResult<Refund>;

    fn handle(&mut self, msg: Refund, _: &mut Self::Context) -> Self::Result {
        let Some(state) = self.keys.get_mut(&msg.key) else {
            return MessageResult(RefundOutcome::NothingToRefund);
        };
        if !matches!(state.outcome, ChargeOutcome::Approved { .. }) {
            return MessageResult(RefundOutcome::NothingToRefund);
        }
        if state.refunded {
            return MessageResult(RefundOutcome::AlreadyRefunded);
        }
        state.refunded = true;
        let amount = state.amount_cents;
        self.record(&msg.key, LedgerKind::Refund, amount);
        MessageResult(RefundOutcome::Refunded)
    }
}

#[derive(Message)]
#[rtype(result = "Vec<LedgerEntry>")]
struct ReadLedger;

impl Handler<ReadLedger> for PaymentActor {
    type Result = MessageResult<ReadLedger>;

    fn handle(&mut self, _: ReadLedger, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.ledger.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(failure_rate: f64) -> PaymentGateway {
        PaymentGateway::start(
            &PaymentSettings {
                pool_size: 3,
                latency: LatencyModel::Zero,
                failure_rate,
            },
            7,
            &[],
        )
    }

    #[actix::test]
    async fn the_same_key_is_charged_once_and_answers_the_same() {
        let gw = gateway(0.0);
        let amount = Money::from_cents(500).unwrap();
        let first = gw.charge("k1", amount).await.unwrap();
        let again = gw.charge("k1", amount).await.unwrap();
        assert_eq!(first, again);
        let ledger = gw.ledger().await.unwrap();
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger[0].kind, LedgerKind::Charge);
    }

    #[actix::test]
    async fn a_refund_happens_once_and_only_after_a_charge() {
        let gw = gateway(0.0);
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
        assert_eq!(gw.ledger().await.unwrap().len(), 2);
    }

    #[actix::test]
    async fn outcomes_depend_on_seed_and_key_only() {
        let amount = Money::from_cents(1).unwrap();
        let (a, b) = (gateway(0.5), gateway(0.5));
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
}
