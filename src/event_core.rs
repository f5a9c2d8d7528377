//! The event actor's decisions as a pure step function: one event's [`Inventory`], the ids it
//! mints, and the write each decision needs, with no actix, no I/O and the time passed in.
//!
//! [`crate::stages::event_actor::EventActor`] is a thin actix shell around an [`EventCore`]: it
//! reads the clock, calls [`EventCore::step`], and hands the resulting writes to the
//! group-commit writer. The simulator ([`crate::sim`]) drives the same core under a seeded
//! scheduler in simulated time.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::domain::{CancelReason, EventId, Money, OrderId, PaymentStatus, TicketId, UserId};
use crate::inventory::{Counts, HoldError, Inventory, Millis, ReserveError};
use crate::payments::fnv1a;
use crate::store::{NewOrder, OrderKey, WriteOp};

/// What the payment gateway said about a held order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentResult {
    Approved,
    Declined,
}

/// A buyer's request for seats.
#[derive(Debug, Clone)]
pub struct ReserveRequest {
    pub user: UserId,
    pub quantity: u32,
    /// API v2 caps what one user may hold or own; API v1 does not.
    pub per_user_limit: Option<u32>,
    pub idempotency: Option<OrderKey>,
    /// The order's id when the caller chose it (a `services` gateway, so that a retry names
    /// the same order); minted by the core otherwise.
    pub order: Option<OrderId>,
    /// When the order was placed (RFC 3339), as the sender formatted it.
    pub created_at: String,
}

/// One input to the core.
#[derive(Debug, Clone)]
pub enum Input {
    /// Hold seats for a buyer.
    Reserve(ReserveRequest),
    /// The hold just granted could not be queued for writing: take it back, nothing written.
    Withdraw(OrderId),
    /// The buyer went away before hearing of its hold: give the seats back and cancel it.
    Abandon(OrderId),
    /// A payment's outcome for a held order.
    Settle {
        order: OrderId,
        result: PaymentResult,
    },
    /// The clock moved on: return the seats of every hold whose time ran out.
    Expire,
}

/// Seats held for a buyer, and the write that makes the hold durable.
#[derive(Debug, Clone)]
pub struct Granted {
    pub order: OrderId,
    pub tickets: Vec<TicketId>,
    pub amount: Money,
    pub write: WriteOp,
}

/// What became of a held order once its payment result arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Confirmed (now, or by an earlier copy of the same answer).
    Confirmed,
    /// Declined: the seats went back.
    Released,
    /// The hold had already run out; the seats went back. A successful charge must be refunded.
    Expired,
}

/// What the core decided; `write`, when present, must be queued to the writer in decision
/// order.
#[derive(Debug, Clone)]
pub enum Output {
    Reserved(Result<Granted, ReserveError>),
    /// `Withdraw` or `Abandon`: the seats are back; `write` is set for `Abandon`.
    Returned {
        write: Option<WriteOp>,
    },
    Settled {
        settled: Settled,
        write: Option<WriteOp>,
    },
    /// The holds that expired, one cancellation each.
    Expired(Vec<WriteOp>),
}

/// A bug planted on purpose, to prove the simulator finds it. Only the simulator's
/// `--planted-bug` sets one; the server never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A payment approved after its hold was expired and removed is answered `Confirmed`:
    /// nothing confirms it in storage and nobody refunds the charge.
    ConfirmAfterExpiry,
    /// An expired hold's seats go back in memory but its cancellation is never written: the
    /// order stays `pending` in storage for ever (lost tickets).
    ExpiryNotWritten,
    /// A reservation of a single seat is not checked against the per-user limit.
    UncountedReservation,
}

impl PlantedBug {
    pub const ALL: [Self; 3] = [
        Self::ConfirmAfterExpiry,
        Self::ExpiryNotWritten,
        Self::UncountedReservation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ConfirmAfterExpiry => "confirm-after-expiry",
            Self::ExpiryNotWritten => "expiry-not-written",
            Self::UncountedReservation => "uncounted-reservation",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }
}

pub use crate::inventory::IdHasher;

/// One event's seats and the decisions about them.
pub struct EventCore {
    event: EventId,
    price: Money,
    inventory: Inventory<OrderId, UserId>,
    /// Mints order and ticket ids; seeded so a replayed run gets the same ids (and payment
    /// outcomes).
    ids: StdRng,
    /// Orders this core confirmed, so a repeated approval is answered `Confirmed` again rather
    /// than taken for an expired hold (whose charge would then be refunded). Bounded: each
    /// holds at least one of the event's seats.
    confirmed: HashSet<OrderId, BuildHasherDefault<IdHasher>>,
    planted: Option<PlantedBug>,
}

impl EventCore {
    /// `issued` is how many tickets the event already has in storage, so a restarted core
    /// continues with fresh ids rather than repeating old ones.
    pub fn new(
        event: EventId,
        price: Money,
        inventory: Inventory<OrderId, UserId>,
        seed: u64,
        issued: u64,
    ) -> Self {
        let id_seed = seed ^ fnv1a(&event.0.to_le_bytes()) ^ issued.rotate_left(32);
        Self {
            event,
            price,
            inventory,
            ids: StdRng::seed_from_u64(id_seed),
            confirmed: HashSet::default(),
            planted: None,
        }
    }

    /// Plants `bug` (the simulator's `--planted-bug`; never the server).
    pub fn with_planted_bug(mut self, bug: Option<PlantedBug>) -> Self {
        self.planted = bug;
        self
    }

    pub fn event(&self) -> EventId {
        self.event
    }

    pub fn counts(&self) -> Counts {
        self.inventory.counts()
    }

    /// When the earliest hold runs out, if any is outstanding.
    pub fn next_expiry(&self) -> Option<Millis> {
        self.inventory.next_expiry()
    }

    /// Decides `input` at time `now`.
    pub fn step(&mut self, input: Input, now: Millis) -> Output {
        match input {
            Input::Reserve(request) => Output::Reserved(self.reserve(request, now)),
            Input::Withdraw(order) => {
                let _ = self.inventory.release(order);
                Output::Returned { write: None }
            }
            Input::Abandon(order) => {
                let _ = self.inventory.release(order);
                Output::Returned {
                    write: Some(self.cancel(
                        order,
                        CancelReason::Interrupted,
                        Some(PaymentStatus::Failed),
                    )),
                }
            }
            Input::Settle { order, result } => self.settle(order, result, now),
            Input::Expire => {
                let expired = self.inventory.expire(now);
                if self.planted == Some(PlantedBug::ExpiryNotWritten) {
                    return Output::Expired(Vec::new());
                }
                Output::Expired(
                    expired
                        .into_iter()
                        .map(|order| self.cancel(order, CancelReason::HoldExpired, None))
                        .collect(),
                )
            }
        }
    }

    fn mint_id(&mut self) -> uuid::Uuid {
        uuid::Builder::from_random_bytes(self.ids.gen()).into_uuid()
    }

    fn cancel(
        &self,
        order: OrderId,
        reason: CancelReason,
        payment: Option<PaymentStatus>,
    ) -> WriteOp {
        WriteOp::Cancel {
            order,
            event: self.event,
            reason,
            payment,
        }
    }

    fn reserve(&mut self, request: ReserveRequest, now: Millis) -> Result<Granted, ReserveError> {
        // Minted either way, so a chosen id leaves the ids that follow unchanged.
        let minted = OrderId(self.mint_id());
        let order = request.order.unwrap_or(minted);
        let limit = match self.planted {
            Some(PlantedBug::UncountedReservation) if request.quantity == 1 => None,
            _ => request.per_user_limit,
        };
        self.inventory
            .reserve_within(order, request.user.clone(), request.quantity, limit, now)?;
        let tickets: Vec<TicketId> = (0..request.quantity)
            .map(|_| TicketId(self.mint_id()))
            .collect();
        let hold = NewOrder {
            order,
            tickets: tickets.clone(),
            event: self.event,
            user: request.user.into_string(),
            unit_price: self.price,
            idempotency: request.idempotency,
            created_at: request.created_at,
        };
        Ok(Granted {
            order,
            tickets,
            amount: self.price.times(request.quantity),
            write: WriteOp::Hold(Box::new(hold)),
        })
    }

    fn settle(&mut self, order: OrderId, result: PaymentResult, now: Millis) -> Output {
        let (settled, write) = match result {
            PaymentResult::Approved => match self.inventory.confirm(order, now) {
                Ok(_) => {
                    self.confirmed.insert(order);
                    (Settled::Confirmed, Some(WriteOp::Confirm { order }))
                }
                // Expired just now: cancel the order; the caller refunds the charge.
                Err(HoldError::Expired) => (
                    Settled::Expired,
                    Some(self.cancel(order, CancelReason::HoldExpired, None)),
                ),
                // The same approval again: the order stands confirmed.
                Err(HoldError::Unknown) if self.confirmed.contains(&order) => {
                    (Settled::Confirmed, None)
                }
                Err(HoldError::Unknown) if self.planted == Some(PlantedBug::ConfirmAfterExpiry) => {
                    (Settled::Confirmed, None)
                }
                // Expired earlier, already cancelled by `Expire`.
                Err(HoldError::Unknown) => (Settled::Expired, None),
            },
            PaymentResult::Declined => match self.inventory.release(order) {
                Ok(_) => {
                    let cancel = self.cancel(
                        order,
                        CancelReason::PaymentDeclined,
                        Some(PaymentStatus::Failed),
                    );
                    (Settled::Released, Some(cancel))
                }
                Err(_) => (
                    Settled::Released,
                    Some(WriteOp::SettlePayment {
                        order,
                        status: PaymentStatus::Failed,
                    }),
                ),
            },
        };
        Output::Settled { settled, write }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(seats: u32) -> EventCore {
        let inventory = Inventory::new(seats, seats, 100);
        EventCore::new(EventId(1), Money::from_cents(500).unwrap(), inventory, 7, 0)
    }

    fn reserve(core: &mut EventCore, user: &str, quantity: u32, now: Millis) -> Granted {
        let request = ReserveRequest {
            user: UserId::parse(user).unwrap(),
            quantity,
            per_user_limit: Some(2),
            idempotency: None,
            order: None,
            created_at: String::new(),
        };
        match core.step(Input::Reserve(request), now) {
            Output::Reserved(Ok(granted)) => granted,
            other => panic!("not granted: {other:?}"),
        }
    }

    fn settle(core: &mut EventCore, order: OrderId, result: PaymentResult, now: Millis) -> Output {
        core.step(Input::Settle { order, result }, now)
    }

    #[test]
    fn a_grant_carries_its_hold_write_and_an_approval_its_confirmation() {
        let mut core = core(3);
        let granted = reserve(&mut core, "a", 2, 0);
        assert_eq!(granted.tickets.len(), 2);
        assert_eq!(granted.amount.cents(), 1_000);
        assert!(matches!(&granted.write, WriteOp::Hold(h) if h.order == granted.order));
        // the hold is written under its buyer (the user moves into the write, not cloned)
        assert!(matches!(&granted.write, WriteOp::Hold(h) if h.user == "a"));
        let out = settle(&mut core, granted.order, PaymentResult::Approved, 10);
        assert!(matches!(
            out,
            Output::Settled { settled: Settled::Confirmed, write: Some(WriteOp::Confirm { order }) }
                if order == granted.order
        ));
        assert_eq!(core.counts().sold, 2);
    }

    #[test]
    fn the_same_approval_twice_stays_confirmed_and_is_never_taken_for_an_expired_hold() {
        let mut core = core(3);
        let granted = reserve(&mut core, "a", 1, 0);
        settle(&mut core, granted.order, PaymentResult::Approved, 10);
        let again = settle(&mut core, granted.order, PaymentResult::Approved, 500);
        assert!(
            matches!(
                again,
                Output::Settled {
                    settled: Settled::Confirmed,
                    write: None
                }
            ),
            "a repeated approval would otherwise be refunded: {again:?}"
        );
    }

    #[test]
    fn an_approval_after_expiry_is_expired_with_or_without_the_tick_having_run() {
        let mut core = core(2);
        let early = reserve(&mut core, "a", 1, 0);
        let late = reserve(&mut core, "b", 1, 0);
        // expired just now: the cancellation comes with the answer
        let out = settle(&mut core, early.order, PaymentResult::Approved, 100);
        assert!(matches!(
            out,
            Output::Settled {
                settled: Settled::Expired,
                write: Some(WriteOp::Cancel { .. })
            }
        ));
        // expired by the tick first: the tick wrote the cancellation
        let Output::Expired(cancels) = core.step(Input::Expire, 150) else {
            panic!()
        };
        assert_eq!(cancels.len(), 1);
        let out = settle(&mut core, late.order, PaymentResult::Approved, 160);
        assert!(matches!(
            out,
            Output::Settled {
                settled: Settled::Expired,
                write: None
            }
        ));
        assert_eq!(core.counts().available, 2);
    }

    #[test]
    fn a_withdrawn_hold_writes_nothing_and_an_abandoned_one_is_cancelled() {
        let mut core = core(2);
        let a = reserve(&mut core, "a", 1, 0);
        let b = reserve(&mut core, "b", 1, 0);
        assert!(matches!(
            core.step(Input::Withdraw(a.order), 1),
            Output::Returned { write: None }
        ));
        assert!(matches!(
            core.step(Input::Abandon(b.order), 1),
            Output::Returned {
                write: Some(WriteOp::Cancel {
                    reason: CancelReason::Interrupted,
                    ..
                })
            }
        ));
        assert_eq!(core.counts().available, 2);
    }

    #[test]
    fn planted_bugs_are_off_unless_planted_and_each_name_parses_back() {
        let mut core = core(5);
        let first = reserve(&mut core, "a", 2, 0);
        let request = ReserveRequest {
            user: UserId::parse("a").unwrap(),
            quantity: 1,
            per_user_limit: Some(2),
            idempotency: None,
            order: None,
            created_at: String::new(),
        };
        assert!(matches!(
            core.step(Input::Reserve(request.clone()), 1),
            Output::Reserved(Err(ReserveError::UserLimit { limit: 2 }))
        ));
        let mut planted = self::core(5).with_planted_bug(Some(PlantedBug::UncountedReservation));
        reserve(&mut planted, "a", 2, 0);
        assert!(matches!(
            planted.step(Input::Reserve(request), 1),
            Output::Reserved(Ok(_))
        ));
        let _ = first;
        for bug in PlantedBug::ALL {
            assert_eq!(PlantedBug::parse(bug.name()), Some(bug));
        }
    }
}
