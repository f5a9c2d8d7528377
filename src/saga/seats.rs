//! The inventory participant's decisions for one event, as a pure book: the seats free, and
//! each saga's hold. An inventory node of stage `services` keeps one per event of its shards
//! ([`crate::stages::saga_seats`]) and writes what it decides with its epoch-fenced writer.
//!
//! A hold made here has no time limit of its own: only `ReleaseSeats` (or `ConfirmSeats`)
//! ends it. The hold's expiry is the saga's timer, so the node never releases seats behind
//! the saga's back.

use std::collections::HashMap;

use super::{Command, Refusal, Reply};
use crate::domain::{EventId, OrderId};

/// Where one saga's hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStatus {
    Held,
    Confirmed,
    Released,
}

impl HoldStatus {
    /// As stored in `saga_holds.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Confirmed => "confirmed",
            Self::Released => "released",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Held, Self::Confirmed, Self::Released]
            .into_iter()
            .find(|s| s.as_str() == raw)
    }
}

/// One saga's hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub user: String,
    pub quantity: u32,
    pub status: HoldStatus,
}

/// What a decision changes in storage (beside the command's inbox row, always written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeatChange {
    /// Nothing: a refusal, or a command that finds its work done.
    Nothing,
    Hold {
        user: String,
        quantity: u32,
    },
    Release {
        quantity: u32,
    },
    Confirm,
}

/// One event's seats as the inventory node owning it sees them; `None` seats: the event does
/// not exist.
#[derive(Debug, Clone, Default)]
pub struct SeatBook {
    available: Option<u32>,
    holds: HashMap<OrderId, Hold>,
}

impl SeatBook {
    /// The book as storage has it: `available` seats free (`None`: no such event) and every
    /// hold ever made on the event.
    pub fn new(available: Option<u32>, holds: impl IntoIterator<Item = (OrderId, Hold)>) -> Self {
        Self {
            available,
            holds: holds.into_iter().collect(),
        }
    }

    pub fn available(&self) -> Option<u32> {
        self.available
    }

    pub fn hold(&self, order: OrderId) -> Option<&Hold> {
        self.holds.get(&order)
    }

    /// Seats `user` holds or owns.
    fn owned_by(&self, user: &str) -> u32 {
        self.holds
            .values()
            .filter(|h| h.user == user && h.status != HoldStatus::Released)
            .map(|h| h.quantity)
            .sum()
    }

    /// Decides `command` for `order` at `now_ms`: the reply to the orchestrator and what to
    /// write. `None` for a command that is not the inventory's. Each command is safe to apply
    /// twice (the second changes nothing), though the node's inbox sees to it that a message
    /// is applied once.
    pub fn decide(
        &mut self,
        order: OrderId,
        command: &Command,
        now_ms: i64,
    ) -> Option<(Reply, SeatChange)> {
        Some(match command {
            Command::HoldSeats {
                user,
                quantity,
                per_user_limit,
                hold_ttl_ms,
                ..
            } => {
                let held = Reply::SeatsHeld {
                    expires_at_ms: now_ms + *hold_ttl_ms as i64,
                };
                if self.holds.contains_key(&order) {
                    return Some((held, SeatChange::Nothing));
                }
                let Some(available) = self.available else {
                    return Some((refused(Refusal::UnknownEvent), SeatChange::Nothing));
                };
                if available < *quantity {
                    let refusal = if available > 0 {
                        Refusal::NotEnough { available }
                    } else if self.holds.values().any(|h| h.status == HoldStatus::Held) {
                        Refusal::AllHeld
                    } else {
                        Refusal::SoldOut
                    };
                    return Some((refused(refusal), SeatChange::Nothing));
                }
                if let Some(limit) = per_user_limit {
                    if self.owned_by(user) + quantity > *limit {
                        return Some((
                            refused(Refusal::UserLimit { limit: *limit }),
                            SeatChange::Nothing,
                        ));
                    }
                }
                self.available = Some(available - quantity);
                self.holds.insert(
                    order,
                    Hold {
                        user: user.clone(),
                        quantity: *quantity,
                        status: HoldStatus::Held,
                    },
                );
                (
                    held,
                    SeatChange::Hold {
                        user: user.clone(),
                        quantity: *quantity,
                    },
                )
            }
            Command::ReleaseSeats { .. } => match self.holds.get_mut(&order) {
                Some(hold) if hold.status == HoldStatus::Held => {
                    hold.status = HoldStatus::Released;
                    let quantity = hold.quantity;
                    self.available = self.available.map(|a| a + quantity);
                    (Reply::SeatsReleased, SeatChange::Release { quantity })
                }
                _ => (Reply::SeatsReleased, SeatChange::Nothing),
            },
            Command::ConfirmSeats { .. } => match self.holds.get_mut(&order) {
                Some(hold) if hold.status == HoldStatus::Held => {
                    hold.status = HoldStatus::Confirmed;
                    (Reply::SeatsConfirmed, SeatChange::Confirm)
                }
                Some(hold) if hold.status == HoldStatus::Confirmed => {
                    (Reply::SeatsConfirmed, SeatChange::Nothing)
                }
                _ => (Reply::HoldMissing, SeatChange::Nothing),
            },
            _ => return None,
        })
    }
}

fn refused(refusal: Refusal) -> Reply {
    Reply::SeatsRefused { refusal }
}

/// The event a seat command is about, when it names it (`HoldSeats`); the others name only
/// their order, whose event the caller knows from the saga.
pub fn event_of(command: &Command) -> Option<EventId> {
    match command {
        Command::HoldSeats { event, .. } => Some(*event),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn order(n: u128) -> OrderId {
        OrderId(Uuid::from_u128(n))
    }

    fn hold(n: u128, user: &str, quantity: u32, limit: Option<u32>) -> Command {
        Command::HoldSeats {
            order: order(n),
            event: EventId(1),
            user: user.into(),
            quantity,
            per_user_limit: limit,
            hold_ttl_ms: 1_000,
        }
    }

    #[test]
    fn a_hold_takes_seats_until_a_release_and_nothing_releases_it_by_time() {
        let mut book = SeatBook::new(Some(3), []);
        let (reply, change) = book.decide(order(1), &hold(1, "a", 2, None), 0).unwrap();
        assert_eq!(
            reply,
            Reply::SeatsHeld {
                expires_at_ms: 1_000
            }
        );
        assert!(matches!(change, SeatChange::Hold { quantity: 2, .. }));
        assert_eq!(book.available(), Some(1));
        // Much later: still held, the book has no clock of its own.
        let (reply, _) = book
            .decide(order(2), &hold(2, "b", 2, None), 1 << 40)
            .unwrap();
        assert_eq!(
            reply,
            Reply::SeatsRefused {
                refusal: Refusal::NotEnough { available: 1 }
            }
        );
        let release = Command::ReleaseSeats { order: order(1) };
        let (reply, change) = book.decide(order(1), &release, 5).unwrap();
        assert_eq!(reply, Reply::SeatsReleased);
        assert_eq!(change, SeatChange::Release { quantity: 2 });
        assert_eq!(book.available(), Some(3));
        // Twice: nothing more comes back.
        let (_, change) = book.decide(order(1), &release, 6).unwrap();
        assert_eq!(change, SeatChange::Nothing);
        assert_eq!(book.available(), Some(3));
    }

    #[test]
    fn refusals_name_why_and_change_nothing() {
        let mut book = SeatBook::new(None, []);
        let (reply, change) = book.decide(order(1), &hold(1, "a", 1, None), 0).unwrap();
        assert_eq!(
            reply,
            Reply::SeatsRefused {
                refusal: Refusal::UnknownEvent
            }
        );
        assert_eq!(change, SeatChange::Nothing);
        let mut book = SeatBook::new(Some(1), []);
        book.decide(order(1), &hold(1, "a", 1, None), 0).unwrap();
        let (reply, _) = book.decide(order(2), &hold(2, "b", 1, None), 0).unwrap();
        assert_eq!(
            reply,
            Reply::SeatsRefused {
                refusal: Refusal::AllHeld
            }
        );
        book.decide(order(1), &Command::ConfirmSeats { order: order(1) }, 0)
            .unwrap();
        let (reply, _) = book.decide(order(2), &hold(2, "b", 1, None), 0).unwrap();
        assert_eq!(
            reply,
            Reply::SeatsRefused {
                refusal: Refusal::SoldOut
            }
        );
        let mut book = SeatBook::new(Some(10), []);
        book.decide(order(1), &hold(1, "a", 2, Some(3)), 0).unwrap();
        let (reply, change) = book.decide(order(2), &hold(2, "a", 2, Some(3)), 0).unwrap();
        assert_eq!(
            reply,
            Reply::SeatsRefused {
                refusal: Refusal::UserLimit { limit: 3 }
            }
        );
        assert_eq!(change, SeatChange::Nothing);
        assert_eq!(book.available(), Some(8));
    }

    #[test]
    fn a_confirmation_needs_a_live_hold_and_stands_when_repeated() {
        let mut book = SeatBook::new(Some(2), []);
        let confirm = Command::ConfirmSeats { order: order(1) };
        assert_eq!(
            book.decide(order(1), &confirm, 0).unwrap(),
            (Reply::HoldMissing, SeatChange::Nothing)
        );
        book.decide(order(1), &hold(1, "a", 1, None), 0).unwrap();
        assert_eq!(
            book.decide(order(1), &confirm, 0).unwrap(),
            (Reply::SeatsConfirmed, SeatChange::Confirm)
        );
        assert_eq!(
            book.decide(order(1), &confirm, 0).unwrap(),
            (Reply::SeatsConfirmed, SeatChange::Nothing)
        );
        // A confirmed hold is not released.
        let (_, change) = book
            .decide(order(1), &Command::ReleaseSeats { order: order(1) }, 0)
            .unwrap();
        assert_eq!(change, SeatChange::Nothing);
        assert_eq!(book.available(), Some(1));
        assert_eq!(
            book.decide(
                order(1),
                &Command::Refund {
                    order: order(1),
                    payment_key: "k".into()
                },
                0
            ),
            None
        );
    }
}
