//! Stage `saga`'s pure core: an order as an orchestrated saga over an event-sourced log.
//!
//! A saga is `HoldSeats` → `Charge` (the pivot) → `ConfirmSeats`. Before the pivot, a declined
//! charge or a hold that runs out is compensated with `ReleaseSeats`; once a charge has
//! succeeded there is only forward recovery: confirm the seats, or, when the hold was lost,
//! refund. One orchestrator decides every next step with [`decide`], a pure function of the
//! saga's state (folded from its events with [`Saga::apply`]) and what just happened (a
//! participant's reply, a timer): it yields the events to append and the commands to send.
//! No clock is read and nothing is written here; the stage ([`crate::stages::saga`]) appends
//! the events and the commands in one transaction ([`crate::store::saga`]).
//!
//! Events are typed and versioned: each is stored with [`EVENT_SCHEMA`], and [`upcast`] turns
//! an older stored form into today's before it is applied.

pub mod projection;
pub mod seats;

use serde::{Deserialize, Serialize};

use crate::domain::{CancelReason, EventId, OrderId, TicketId};

/// The schema version events are written with today.
pub const EVENT_SCHEMA: u32 = 1;

/// Every fact of a saga's life, in the order they happened. `at_ms` is when, in milliseconds
/// since the Unix epoch, as the process that recorded it read its clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all_fields = "camelCase")]
pub enum SagaEvent {
    /// A buyer asked for `quantity` seats; the saga begins.
    OrderPlaced {
        order: OrderId,
        event: EventId,
        user: String,
        quantity: u32,
        unit_price_cents: i64,
        /// Minted at placement, so a replay makes the same tickets.
        tickets: Vec<TicketId>,
        /// The client's Idempotency-Key (API v2).
        idempotency_key: Option<String>,
        /// Most seats the user may hold or own for the event (API v2); `None`: no limit.
        per_user_limit: Option<u32>,
        /// How long the seats wait for the payment once held.
        hold_ttl_ms: u64,
        at_ms: i64,
    },
    /// The inventory held the seats until `expires_at_ms`.
    SeatsHeld {
        expires_at_ms: i64,
        at_ms: i64,
    },
    /// The inventory refused the seats; the saga ends with no order.
    SeatsRefused {
        refusal: Refusal,
        at_ms: i64,
    },
    /// The charge was sent to the payments participant under `payment_key`: the pivot is near.
    ChargeRequested {
        payment_key: String,
        at_ms: i64,
    },
    /// The gateway charged: the pivot is passed.
    PaymentSucceeded {
        charge_id: String,
        at_ms: i64,
    },
    PaymentDeclined {
        at_ms: i64,
    },
    /// The hold ran out before the payment succeeded.
    HoldExpired {
        at_ms: i64,
    },
    /// The seats are to go back (the compensation), for `reason`.
    ReleaseRequested {
        reason: CancelReason,
        at_ms: i64,
    },
    SeatsReleased {
        at_ms: i64,
    },
    /// The charge succeeded after the seats were released (or lost): it is to be refunded.
    RefundRequested {
        at_ms: i64,
    },
    RefundIssued {
        at_ms: i64,
    },
    /// The inventory had no hold to confirm (forward recovery refunds).
    HoldLost {
        at_ms: i64,
    },
    OrderConfirmed {
        at_ms: i64,
    },
    OrderCancelled {
        reason: CancelReason,
        at_ms: i64,
    },
}

impl SagaEvent {
    /// The event's type, as stored beside it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::OrderPlaced { .. } => "OrderPlaced",
            Self::SeatsHeld { .. } => "SeatsHeld",
            Self::SeatsRefused { .. } => "SeatsRefused",
            Self::ChargeRequested { .. } => "ChargeRequested",
            Self::PaymentSucceeded { .. } => "PaymentSucceeded",
            Self::PaymentDeclined { .. } => "PaymentDeclined",
            Self::HoldExpired { .. } => "HoldExpired",
            Self::ReleaseRequested { .. } => "ReleaseRequested",
            Self::SeatsReleased { .. } => "SeatsReleased",
            Self::RefundRequested { .. } => "RefundRequested",
            Self::RefundIssued { .. } => "RefundIssued",
            Self::HoldLost { .. } => "HoldLost",
            Self::OrderConfirmed { .. } => "OrderConfirmed",
            Self::OrderCancelled { .. } => "OrderCancelled",
        }
    }

    pub fn at_ms(&self) -> i64 {
        match self {
            Self::OrderPlaced { at_ms, .. }
            | Self::SeatsHeld { at_ms, .. }
            | Self::SeatsRefused { at_ms, .. }
            | Self::ChargeRequested { at_ms, .. }
            | Self::PaymentSucceeded { at_ms, .. }
            | Self::PaymentDeclined { at_ms }
            | Self::HoldExpired { at_ms }
            | Self::ReleaseRequested { at_ms, .. }
            | Self::SeatsReleased { at_ms }
            | Self::RefundRequested { at_ms }
            | Self::RefundIssued { at_ms }
            | Self::HoldLost { at_ms }
            | Self::OrderConfirmed { at_ms }
            | Self::OrderCancelled { at_ms, .. } => *at_ms,
        }
    }
}

/// Turns an event stored under `schema` into today's form. Version 1 is the only one so far;
/// a later version adds a branch here instead of rewriting the log.
pub fn upcast(schema: u32, body: serde_json::Value) -> Result<SagaEvent, String> {
    match schema {
        1 => serde_json::from_value(body).map_err(|e| format!("event of schema 1: {e}")),
        other => Err(format!(
            "event schema {other} is newer than this build knows"
        )),
    }
}

/// Why the inventory refused seats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum Refusal {
    UnknownEvent,
    SoldOut,
    /// None free now, but some held by buyers still paying.
    AllHeld,
    NotEnough {
        available: u32,
    },
    UserLimit {
        limit: u32,
    },
}

/// What a participant (or a timer) tells the orchestrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all_fields = "camelCase")]
pub enum Reply {
    SeatsHeld {
        expires_at_ms: i64,
    },
    SeatsRefused {
        refusal: Refusal,
    },
    SeatsReleased,
    SeatsConfirmed,
    /// `ConfirmSeats` found no live hold.
    HoldMissing,
    PaymentSucceeded {
        charge_id: String,
    },
    PaymentDeclined,
    Refunded,
    /// The hold's timer fired.
    HoldTimeout,
}

/// What the orchestrator asks of the participants and of the timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all_fields = "camelCase")]
pub enum Command {
    HoldSeats {
        order: OrderId,
        event: EventId,
        user: String,
        quantity: u32,
        per_user_limit: Option<u32>,
        hold_ttl_ms: u64,
    },
    ReleaseSeats {
        order: OrderId,
    },
    ConfirmSeats {
        order: OrderId,
    },
    Charge {
        order: OrderId,
        payment_key: String,
        amount_cents: i64,
    },
    Refund {
        order: OrderId,
        payment_key: String,
    },
    /// Tell the orchestrator [`Reply::HoldTimeout`] at `at_ms`.
    StartHoldTimer {
        order: OrderId,
        at_ms: i64,
    },
    /// The saga is over: its timer, if still waiting, is not needed.
    CancelTimers {
        order: OrderId,
    },
}

impl Command {
    /// Who carries the command out.
    pub fn participant(&self) -> Participant {
        match self {
            Self::HoldSeats { .. } | Self::ReleaseSeats { .. } | Self::ConfirmSeats { .. } => {
                Participant::Inventory
            }
            Self::Charge { .. } | Self::Refund { .. } => Participant::Payments,
            Self::StartHoldTimer { .. } | Self::CancelTimers { .. } => Participant::Orchestrator,
        }
    }
}

/// The consumers of the outbox, each with an inbox of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Participant {
    Orchestrator,
    Inventory,
    Payments,
}

impl Participant {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orchestrator => "orchestrator",
            Self::Inventory => "inventory",
            Self::Payments => "payments",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Orchestrator, Self::Inventory, Self::Payments]
            .into_iter()
            .find(|p| p.as_str() == raw)
    }
}

/// The payment key of a saga's charge: its id and its step, so a redelivered `Charge` is the
/// same charge at the gateway, which deduplicates on it.
pub fn payment_key(order: OrderId) -> String {
    format!("saga-{order}-charge")
}

/// What an order placed in the saga carries, from its `OrderPlaced`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Placed {
    pub order: OrderId,
    pub event: EventId,
    pub user: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
    pub tickets: Vec<TicketId>,
    pub idempotency_key: Option<String>,
    pub per_user_limit: Option<u32>,
    pub hold_ttl_ms: u64,
    pub placed_at_ms: i64,
}

impl Placed {
    pub fn amount_cents(&self) -> i64 {
        self.unit_price_cents * i64::from(self.quantity)
    }
}

/// Where the seats stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Seats {
    /// `HoldSeats` sent, no answer yet (or nothing placed).
    Requested,
    Held,
    Refused,
    Releasing,
    Released,
    Confirmed,
}

/// Where the money stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Money {
    NotRequested,
    /// `Charge` sent, no answer yet.
    Requested,
    Succeeded,
    Declined,
    Refunding,
    Refunded,
}

/// How a saga ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum Outcome {
    /// Seats confirmed, charged once.
    Confirmed,
    /// Seats released, nothing charged net (declined, or refunded).
    Cancelled { reason: CancelReason },
    /// The inventory refused the seats; there never was an order.
    Rejected { refusal: Refusal },
}

/// A saga's state: the fold of its events. `version` is how many events it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saga {
    pub version: u64,
    pub placed: Option<Placed>,
    pub seats: Seats,
    pub money: Money,
    pub hold_expires_at_ms: Option<i64>,
    /// Why the seats are going back, once a compensation began.
    pub release_reason: Option<CancelReason>,
    pub charge_id: Option<String>,
    pub outcome: Option<Outcome>,
    /// When the last event happened.
    pub updated_at_ms: i64,
}

impl Default for Saga {
    fn default() -> Self {
        Self {
            version: 0,
            placed: None,
            seats: Seats::Requested,
            money: Money::NotRequested,
            hold_expires_at_ms: None,
            release_reason: None,
            charge_id: None,
            outcome: None,
            updated_at_ms: 0,
        }
    }
}

/// What [`decide`] concluded: the events to append (in order) and the commands to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub events: Vec<SagaEvent>,
    pub commands: Vec<Command>,
}

impl Saga {
    /// The state of a stream of events, folded from the start.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a SagaEvent>) -> Self {
        let mut saga = Self::default();
        for event in events {
            saga.apply(event);
        }
        saga
    }

    /// Folds one event into the state. Total: an event that makes no sense here (which
    /// [`decide`] never yields) changes nothing but the version.
    pub fn apply(&mut self, event: &SagaEvent) {
        self.version += 1;
        self.updated_at_ms = event.at_ms();
        match event {
            SagaEvent::OrderPlaced {
                order,
                event,
                user,
                quantity,
                unit_price_cents,
                tickets,
                idempotency_key,
                per_user_limit,
                hold_ttl_ms,
                at_ms,
            } => {
                self.placed = Some(Placed {
                    order: *order,
                    event: *event,
                    user: user.clone(),
                    quantity: *quantity,
                    unit_price_cents: *unit_price_cents,
                    tickets: tickets.clone(),
                    idempotency_key: idempotency_key.clone(),
                    per_user_limit: *per_user_limit,
                    hold_ttl_ms: *hold_ttl_ms,
                    placed_at_ms: *at_ms,
                });
                self.seats = Seats::Requested;
            }
            SagaEvent::SeatsHeld { expires_at_ms, .. } => {
                self.seats = Seats::Held;
                self.hold_expires_at_ms = Some(*expires_at_ms);
            }
            SagaEvent::SeatsRefused { refusal, .. } => {
                self.seats = Seats::Refused;
                self.outcome = Some(Outcome::Rejected { refusal: *refusal });
            }
            SagaEvent::ChargeRequested { .. } => self.money = Money::Requested,
            SagaEvent::PaymentSucceeded { charge_id, .. } => {
                self.money = Money::Succeeded;
                self.charge_id = Some(charge_id.clone());
            }
            SagaEvent::PaymentDeclined { .. } => self.money = Money::Declined,
            SagaEvent::HoldExpired { .. } => {}
            SagaEvent::ReleaseRequested { reason, .. } => {
                self.seats = Seats::Releasing;
                self.release_reason = Some(*reason);
            }
            SagaEvent::SeatsReleased { .. } => self.seats = Seats::Released,
            SagaEvent::RefundRequested { .. } => self.money = Money::Refunding,
            SagaEvent::RefundIssued { .. } => self.money = Money::Refunded,
            SagaEvent::HoldLost { .. } => {
                self.seats = Seats::Released;
                self.release_reason.get_or_insert(CancelReason::HoldExpired);
            }
            SagaEvent::OrderConfirmed { .. } => {
                self.seats = Seats::Confirmed;
                self.outcome = Some(Outcome::Confirmed);
            }
            SagaEvent::OrderCancelled { reason, .. } => {
                self.outcome = Some(Outcome::Cancelled { reason: *reason });
            }
        }
    }

    /// The saga has ended (confirmed, cancelled or rejected).
    pub fn is_final(&self) -> bool {
        self.outcome.is_some()
    }

    /// The seats were held at some point, so an order (with tickets and a payment) exists.
    pub fn has_order(&self) -> bool {
        !matches!(self.seats, Seats::Requested | Seats::Refused)
    }
}

/// Starts a saga: the `OrderPlaced` event and the `HoldSeats` command. `placed.placed_at_ms`
/// is the time.
pub fn place(placed: Placed) -> Decision {
    let command = Command::HoldSeats {
        order: placed.order,
        event: placed.event,
        user: placed.user.clone(),
        quantity: placed.quantity,
        per_user_limit: placed.per_user_limit,
        hold_ttl_ms: placed.hold_ttl_ms,
    };
    Decision {
        events: vec![SagaEvent::OrderPlaced {
            order: placed.order,
            event: placed.event,
            user: placed.user,
            quantity: placed.quantity,
            unit_price_cents: placed.unit_price_cents,
            tickets: placed.tickets,
            idempotency_key: placed.idempotency_key,
            per_user_limit: placed.per_user_limit,
            hold_ttl_ms: placed.hold_ttl_ms,
            at_ms: placed.placed_at_ms,
        }],
        commands: vec![command],
    }
}

/// The orchestrator: what follows `reply` in a saga standing at `saga`, at time `at_ms`. A
/// reply that does not apply (a duplicate, a timer after the pivot, anything after the end)
/// yields nothing.
pub fn decide(saga: &Saga, reply: &Reply, at_ms: i64) -> Decision {
    let Some(placed) = &saga.placed else {
        return Decision::default();
    };
    if saga.is_final() {
        return Decision::default();
    }
    let order = placed.order;
    let mut d = Decision::default();
    let release = |d: &mut Decision, reason| {
        d.events.push(SagaEvent::ReleaseRequested { reason, at_ms });
        d.commands.push(Command::ReleaseSeats { order });
    };
    let refund = |d: &mut Decision| {
        d.events.push(SagaEvent::RefundRequested { at_ms });
        d.commands.push(Command::Refund {
            order,
            payment_key: payment_key(order),
        });
    };
    let cancel = |d: &mut Decision, reason| {
        d.events.push(SagaEvent::OrderCancelled { reason, at_ms });
        d.commands.push(Command::CancelTimers { order });
    };
    let released = saga.release_reason.unwrap_or(CancelReason::HoldExpired);
    match (reply, saga.seats, saga.money) {
        (Reply::SeatsHeld { expires_at_ms }, Seats::Requested, _) => {
            d.events.push(SagaEvent::SeatsHeld {
                expires_at_ms: *expires_at_ms,
                at_ms,
            });
            d.events.push(SagaEvent::ChargeRequested {
                payment_key: payment_key(order),
                at_ms,
            });
            d.commands.push(Command::StartHoldTimer {
                order,
                at_ms: *expires_at_ms,
            });
            d.commands.push(Command::Charge {
                order,
                payment_key: payment_key(order),
                amount_cents: placed.amount_cents(),
            });
        }
        (Reply::SeatsRefused { refusal }, Seats::Requested, _) => {
            d.events.push(SagaEvent::SeatsRefused {
                refusal: *refusal,
                at_ms,
            });
        }
        // The pivot: from here on, only forward.
        (Reply::PaymentSucceeded { charge_id }, seats, Money::Requested) => {
            d.events.push(SagaEvent::PaymentSucceeded {
                charge_id: charge_id.clone(),
                at_ms,
            });
            match seats {
                Seats::Held => d.commands.push(Command::ConfirmSeats { order }),
                // The hold went (it expired while the charge was on the wire): refund.
                _ => refund(&mut d),
            }
        }
        (Reply::PaymentDeclined, seats, Money::Requested) => {
            d.events.push(SagaEvent::PaymentDeclined { at_ms });
            match seats {
                Seats::Held => release(&mut d, CancelReason::PaymentDeclined),
                Seats::Released => cancel(&mut d, released),
                _ => {} // releasing: the release's answer ends it
            }
        }
        (Reply::HoldTimeout, Seats::Held, Money::Requested) => {
            d.events.push(SagaEvent::HoldExpired { at_ms });
            release(&mut d, CancelReason::HoldExpired);
        }
        (Reply::SeatsReleased, Seats::Releasing, money) => {
            d.events.push(SagaEvent::SeatsReleased { at_ms });
            match money {
                Money::Declined | Money::Refunded | Money::NotRequested => cancel(&mut d, released),
                // A charge still on the wire may succeed late; its answer ends the saga.
                Money::Requested | Money::Refunding => {}
                Money::Succeeded => refund(&mut d),
            }
        }
        (Reply::SeatsConfirmed, Seats::Held, Money::Succeeded) => {
            d.events.push(SagaEvent::OrderConfirmed { at_ms });
            d.commands.push(Command::CancelTimers { order });
        }
        (Reply::HoldMissing, Seats::Held, Money::Succeeded) => {
            d.events.push(SagaEvent::HoldLost { at_ms });
            refund(&mut d);
        }
        (Reply::Refunded, seats, Money::Refunding) => {
            d.events.push(SagaEvent::RefundIssued { at_ms });
            if seats == Seats::Released {
                cancel(&mut d, released);
            }
        }
        _ => {}
    }
    d
}

#[cfg(test)]
mod tests;
