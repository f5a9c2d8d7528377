//! The read models as a pure function of a saga's state: the order, its tickets and its
//! payment as the API and the audit read them (the same tables every stage writes). The stage
//! writes these rows in the transaction that appends the events ([`crate::store::saga`]), and
//! `ticketflow replay` derives them again from the log alone and compares.

use chrono::DateTime;
use uuid::Uuid;

use super::{Money, Outcome, Saga, Seats};
use crate::domain::{
    timestamp, CancelReason, EventId, OrderId, PaymentStatus, TicketId, TicketStatus,
};

/// Mixed into an order's id to make its payment's: the same on every replay.
const PAYMENT_ID_MASK: u128 = 0x5a6a_0000_0000_0000_0000_0000_0000_0001;

/// One saga's rows in `orders`, `tickets` and `payments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projected {
    pub order: OrderId,
    pub event: EventId,
    pub user: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
    pub amount_cents: i64,
    pub idempotency_key: Option<String>,
    pub tickets: Vec<TicketId>,
    pub order_status: TicketStatus,
    pub order_reason: Option<CancelReason>,
    pub ticket_status: TicketStatus,
    pub ticket_reason: Option<CancelReason>,
    pub payment_id: Uuid,
    pub payment_key: String,
    pub payment_status: PaymentStatus,
    pub created_at: String,
    pub updated_at: String,
    pub processed_at: Option<String>,
}

impl Projected {
    /// Seats this order takes from the event's `available_tickets`: its tickets while pending
    /// or confirmed.
    pub fn seats_taken(&self) -> i64 {
        match self.ticket_status {
            TicketStatus::Pending | TicketStatus::Confirmed => i64::from(self.quantity),
            TicketStatus::Cancelled => 0,
        }
    }
}

/// Milliseconds since the epoch as a stored timestamp.
pub fn stored_time(at_ms: i64) -> String {
    timestamp(DateTime::from_timestamp_millis(at_ms).unwrap_or_default())
}

/// The rows a saga stands for, or `None` before its seats were held (or when they were
/// refused: such a saga never made an order).
pub fn rows(saga: &Saga) -> Option<Projected> {
    let placed = saga.placed.as_ref()?;
    if !saga.has_order() {
        return None;
    }
    let (ticket_status, ticket_reason) = match saga.seats {
        Seats::Released => (
            TicketStatus::Cancelled,
            Some(saga.release_reason.unwrap_or(CancelReason::HoldExpired)),
        ),
        Seats::Confirmed => (TicketStatus::Confirmed, None),
        _ => (TicketStatus::Pending, None),
    };
    let (order_status, order_reason, payment_status) = match saga.outcome {
        Some(Outcome::Confirmed) => (TicketStatus::Confirmed, None, PaymentStatus::Completed),
        Some(Outcome::Cancelled { reason }) => (
            TicketStatus::Cancelled,
            Some(reason),
            if saga.money == Money::Refunded {
                PaymentStatus::Refunded
            } else {
                PaymentStatus::Failed
            },
        ),
        _ => (TicketStatus::Pending, None, PaymentStatus::Pending),
    };
    let updated_at = stored_time(saga.updated_at_ms);
    Some(Projected {
        order: placed.order,
        event: placed.event,
        user: placed.user.clone(),
        quantity: placed.quantity,
        unit_price_cents: placed.unit_price_cents,
        amount_cents: placed.amount_cents(),
        idempotency_key: placed.idempotency_key.clone(),
        tickets: placed.tickets.clone(),
        order_status,
        order_reason,
        // A cancelled order's tickets are cancelled for the order's reason.
        ticket_status: if order_status == TicketStatus::Cancelled {
            TicketStatus::Cancelled
        } else {
            ticket_status
        },
        ticket_reason: order_reason.or(ticket_reason),
        payment_id: Uuid::from_u128(placed.order.0.as_u128() ^ PAYMENT_ID_MASK),
        payment_key: super::payment_key(placed.order),
        processed_at: (payment_status != PaymentStatus::Pending).then(|| updated_at.clone()),
        payment_status,
        created_at: stored_time(placed.placed_at_ms),
        updated_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::{decide, place, Placed, Reply};

    fn saga_after(replies: &[Reply]) -> Saga {
        let placed = Placed {
            order: OrderId(Uuid::from_u128(1)),
            event: EventId(3),
            user: "bob".into(),
            quantity: 2,
            unit_price_cents: 100,
            tickets: vec![TicketId(Uuid::from_u128(2)), TicketId(Uuid::from_u128(3))],
            idempotency_key: Some("k".into()),
            per_user_limit: Some(4),
            hold_ttl_ms: 10,
            placed_at_ms: 1_000,
        };
        let mut saga = Saga::replay(&place(placed).events);
        for (t, reply) in replies.iter().enumerate() {
            for e in decide(&saga, reply, 2_000 + t as i64).events {
                saga.apply(&e);
            }
        }
        saga
    }

    #[test]
    fn an_order_appears_once_its_seats_are_held_and_takes_them_until_released() {
        assert_eq!(rows(&saga_after(&[])), None);
        let held = rows(&saga_after(&[Reply::SeatsHeld { expires_at_ms: 5 }])).unwrap();
        assert_eq!(held.order_status, TicketStatus::Pending);
        assert_eq!(held.seats_taken(), 2);
        assert_eq!(held.amount_cents, 200);
        assert_eq!(held.processed_at, None);
        let released = rows(&saga_after(&[
            Reply::SeatsHeld { expires_at_ms: 5 },
            Reply::HoldTimeout,
            Reply::SeatsReleased,
        ]))
        .unwrap();
        assert_eq!(
            released.order_status,
            TicketStatus::Pending,
            "the charge is out"
        );
        assert_eq!(released.ticket_status, TicketStatus::Cancelled);
        assert_eq!(released.seats_taken(), 0);
    }

    #[test]
    fn a_confirmed_order_is_paid_and_a_refunded_one_says_so() {
        let success = Reply::PaymentSucceeded {
            charge_id: "c".into(),
        };
        let confirmed = rows(&saga_after(&[
            Reply::SeatsHeld { expires_at_ms: 5 },
            success.clone(),
            Reply::SeatsConfirmed,
        ]))
        .unwrap();
        assert_eq!(confirmed.order_status, TicketStatus::Confirmed);
        assert_eq!(confirmed.ticket_status, TicketStatus::Confirmed);
        assert_eq!(confirmed.payment_status, PaymentStatus::Completed);
        assert!(confirmed.processed_at.is_some());
        let refunded = rows(&saga_after(&[
            Reply::SeatsHeld { expires_at_ms: 5 },
            Reply::HoldTimeout,
            Reply::SeatsReleased,
            success,
            Reply::Refunded,
        ]))
        .unwrap();
        assert_eq!(refunded.payment_status, PaymentStatus::Refunded);
        assert_eq!(refunded.order_reason, Some(CancelReason::HoldExpired));
        assert_eq!(refunded.ticket_reason, Some(CancelReason::HoldExpired));
    }
}
