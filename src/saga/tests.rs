//! The orchestrator without I/O: named paths, then a property test that drives one saga
//! against model participants over a network that reorders and duplicates every message.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use uuid::Uuid;

use super::*;

fn placed(quantity: u32) -> Placed {
    Placed {
        order: OrderId(Uuid::from_u128(7)),
        event: EventId(1),
        user: "alice".into(),
        quantity,
        unit_price_cents: 250,
        tickets: (0..quantity)
            .map(|i| TicketId(Uuid::from_u128(100 + u128::from(i))))
            .collect(),
        idempotency_key: None,
        per_user_limit: None,
        hold_ttl_ms: 1_000,
        placed_at_ms: 10,
    }
}

/// Applies a decision's events to `saga`, returning its commands.
fn step(saga: &mut Saga, reply: Reply, at_ms: i64) -> Vec<Command> {
    let decision = decide(saga, &reply, at_ms);
    for event in &decision.events {
        saga.apply(event);
    }
    decision.commands
}

fn started(quantity: u32) -> Saga {
    let decision = place(placed(quantity));
    Saga::replay(&decision.events)
}

fn kinds(commands: &[Command]) -> Vec<&'static str> {
    commands
        .iter()
        .map(|c| match c {
            Command::HoldSeats { .. } => "HoldSeats",
            Command::ReleaseSeats { .. } => "ReleaseSeats",
            Command::ConfirmSeats { .. } => "ConfirmSeats",
            Command::Charge { .. } => "Charge",
            Command::Refund { .. } => "Refund",
            Command::StartHoldTimer { .. } => "StartHoldTimer",
            Command::CancelTimers { .. } => "CancelTimers",
        })
        .collect()
}

#[test]
fn placing_an_order_asks_the_inventory_to_hold_its_seats() {
    let decision = place(placed(2));
    assert_eq!(kinds(&decision.commands), ["HoldSeats"]);
    assert_eq!(decision.events[0].kind(), "OrderPlaced");
    let saga = Saga::replay(&decision.events);
    assert_eq!((saga.version, saga.seats), (1, Seats::Requested));
    assert!(!saga.has_order());
}

#[test]
fn held_seats_are_charged_under_a_key_of_the_saga_and_its_step_and_confirmed() {
    let mut saga = started(2);
    let commands = step(
        &mut saga,
        Reply::SeatsHeld {
            expires_at_ms: 1_010,
        },
        11,
    );
    assert_eq!(kinds(&commands), ["StartHoldTimer", "Charge"]);
    let Command::Charge {
        payment_key: key,
        amount_cents,
        ..
    } = &commands[1]
    else {
        unreachable!()
    };
    assert_eq!(key, &format!("saga-{}-charge", Uuid::from_u128(7)));
    assert_eq!(*amount_cents, 500);
    assert_eq!(saga.money, Money::Requested);
    let commands = step(
        &mut saga,
        Reply::PaymentSucceeded {
            charge_id: "c1".into(),
        },
        12,
    );
    assert_eq!(kinds(&commands), ["ConfirmSeats"]);
    let commands = step(&mut saga, Reply::SeatsConfirmed, 13);
    assert_eq!(kinds(&commands), ["CancelTimers"]);
    assert_eq!(saga.outcome, Some(Outcome::Confirmed));
    assert_eq!(
        saga.version, 5,
        "placed, held, charge requested, succeeded, confirmed"
    );
}

#[test]
fn a_declined_charge_before_the_pivot_is_compensated_by_releasing_the_seats() {
    let mut saga = started(1);
    step(&mut saga, Reply::SeatsHeld { expires_at_ms: 99 }, 11);
    let commands = step(&mut saga, Reply::PaymentDeclined, 12);
    assert_eq!(kinds(&commands), ["ReleaseSeats"]);
    assert_eq!(saga.seats, Seats::Releasing);
    assert!(!saga.is_final(), "final only once the seats are back");
    let commands = step(&mut saga, Reply::SeatsReleased, 13);
    assert_eq!(kinds(&commands), ["CancelTimers"]);
    assert_eq!(
        saga.outcome,
        Some(Outcome::Cancelled {
            reason: CancelReason::PaymentDeclined
        })
    );
}

#[test]
fn a_hold_that_runs_out_before_the_pivot_is_released_and_a_late_decline_ends_it() {
    let mut saga = started(1);
    step(&mut saga, Reply::SeatsHeld { expires_at_ms: 99 }, 11);
    assert_eq!(
        kinds(&step(&mut saga, Reply::HoldTimeout, 99)),
        ["ReleaseSeats"]
    );
    assert!(
        step(&mut saga, Reply::SeatsReleased, 100).is_empty(),
        "the charge is still out"
    );
    assert!(!saga.is_final());
    assert_eq!(
        kinds(&step(&mut saga, Reply::PaymentDeclined, 101)),
        ["CancelTimers"]
    );
    assert_eq!(
        saga.outcome,
        Some(Outcome::Cancelled {
            reason: CancelReason::HoldExpired
        })
    );
}

#[test]
fn a_success_after_the_hold_was_released_goes_forward_to_a_refund() {
    let mut saga = started(1);
    step(&mut saga, Reply::SeatsHeld { expires_at_ms: 99 }, 11);
    step(&mut saga, Reply::HoldTimeout, 99);
    step(&mut saga, Reply::SeatsReleased, 100);
    let commands = step(
        &mut saga,
        Reply::PaymentSucceeded {
            charge_id: "late".into(),
        },
        101,
    );
    assert_eq!(kinds(&commands), ["Refund"]);
    assert_eq!(
        kinds(&step(&mut saga, Reply::Refunded, 102)),
        ["CancelTimers"]
    );
    assert_eq!(
        saga.outcome,
        Some(Outcome::Cancelled {
            reason: CancelReason::HoldExpired
        })
    );
}

#[test]
fn after_the_pivot_the_hold_timer_no_longer_compensates() {
    let mut saga = started(1);
    step(&mut saga, Reply::SeatsHeld { expires_at_ms: 99 }, 11);
    step(
        &mut saga,
        Reply::PaymentSucceeded {
            charge_id: "c".into(),
        },
        50,
    );
    let before = saga.clone();
    assert!(step(&mut saga, Reply::HoldTimeout, 99).is_empty());
    assert_eq!(saga, before, "ignored: nothing recorded");
    step(&mut saga, Reply::SeatsConfirmed, 100);
    assert_eq!(saga.outcome, Some(Outcome::Confirmed));
}

#[test]
fn a_lost_hold_after_the_pivot_is_refunded() {
    let mut saga = started(1);
    step(&mut saga, Reply::SeatsHeld { expires_at_ms: 99 }, 11);
    step(
        &mut saga,
        Reply::PaymentSucceeded {
            charge_id: "c".into(),
        },
        12,
    );
    assert_eq!(kinds(&step(&mut saga, Reply::HoldMissing, 13)), ["Refund"]);
    step(&mut saga, Reply::Refunded, 14);
    assert!(matches!(saga.outcome, Some(Outcome::Cancelled { .. })));
}

#[test]
fn refused_seats_end_the_saga_without_an_order_or_a_charge() {
    let mut saga = started(3);
    let commands = step(
        &mut saga,
        Reply::SeatsRefused {
            refusal: Refusal::NotEnough { available: 2 },
        },
        11,
    );
    assert!(commands.is_empty());
    assert!(!saga.has_order());
    assert_eq!(
        saga.outcome,
        Some(Outcome::Rejected {
            refusal: Refusal::NotEnough { available: 2 }
        })
    );
}

#[test]
fn duplicate_replies_are_ignored() {
    let mut saga = started(1);
    step(&mut saga, Reply::SeatsHeld { expires_at_ms: 99 }, 11);
    let held = saga.clone();
    assert!(step(&mut saga, Reply::SeatsHeld { expires_at_ms: 99 }, 12).is_empty());
    assert_eq!(saga, held);
    let success = Reply::PaymentSucceeded {
        charge_id: "c".into(),
    };
    step(&mut saga, success.clone(), 13);
    let charged = saga.clone();
    assert!(step(&mut saga, success, 14).is_empty());
    assert!(step(&mut saga, Reply::PaymentDeclined, 14).is_empty());
    assert_eq!(saga, charged);
    step(&mut saga, Reply::SeatsConfirmed, 15);
    let done = saga.clone();
    for reply in [
        Reply::SeatsConfirmed,
        Reply::SeatsReleased,
        Reply::Refunded,
        Reply::HoldTimeout,
    ] {
        assert!(step(&mut saga, reply, 16).is_empty());
    }
    assert_eq!(saga, done);
}

#[test]
fn events_round_trip_through_their_stored_form_and_schema() {
    let decision = place(placed(2));
    let mut saga = Saga::replay(&decision.events);
    let mut events = decision.events;
    for reply in [
        Reply::SeatsHeld { expires_at_ms: 9 },
        Reply::HoldTimeout,
        Reply::SeatsReleased,
        Reply::PaymentSucceeded {
            charge_id: "x".into(),
        },
        Reply::Refunded,
    ] {
        let d = decide(&saga, &reply, 5);
        for e in &d.events {
            saga.apply(e);
        }
        events.extend(d.events);
    }
    for event in &events {
        let stored = serde_json::to_value(event).unwrap();
        assert_eq!(stored["type"], event.kind());
        assert_eq!(&upcast(EVENT_SCHEMA, stored.clone()).unwrap(), event);
        assert!(upcast(EVENT_SCHEMA + 1, stored).is_err());
    }
    let snapshot: Saga = serde_json::from_str(&serde_json::to_string(&saga).unwrap()).unwrap();
    assert_eq!(snapshot, Saga::replay(&events));
}

/// The participants as the saga expects them to behave: each dedupes by message id.
struct Model {
    available: u32,
    /// order's hold: true while held, false once released; confirmed separately.
    hold: Option<bool>,
    confirmed: bool,
    approve: bool,
    charged: bool,
    refunded: bool,
    charges_made: u32,
    seen: HashSet<u64>,
}

#[derive(Clone)]
enum Message {
    Command(Command),
    Reply(Reply),
}

/// Runs one saga to its end over a network that delivers in any order and duplicates, and
/// returns the saga, the model and every event recorded.
fn run(seed: u64, seats: u32, quantity: u32, approve: bool, duplicate_pct: u32) -> (Saga, Model) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model {
        available: seats,
        hold: None,
        confirmed: false,
        approve,
        charged: false,
        refunded: false,
        charges_made: 0,
        seen: HashSet::new(),
    };
    let decision = place(placed(quantity));
    let mut saga = Saga::replay(&decision.events);
    let mut next_id = 0u64;
    let mut queue: Vec<(u64, Message)> = Vec::new();
    let mut send = |queue: &mut Vec<(u64, Message)>, message: Message| {
        next_id += 1;
        queue.push((next_id, message));
    };
    for command in decision.commands {
        send(&mut queue, Message::Command(command));
    }
    let mut replies_seen: HashMap<u64, ()> = HashMap::new();
    let mut clock = 20;
    let mut steps = 0;
    while !queue.is_empty() {
        steps += 1;
        assert!(steps < 10_000, "the saga does not settle");
        clock += 1;
        let index = rng.gen_range(0..queue.len());
        let duplicated = rng.gen_range(0..100) < duplicate_pct;
        let (id, message) = if duplicated {
            queue[index].clone()
        } else {
            queue.swap_remove(index)
        };
        match message {
            Message::Reply(reply) => {
                // The orchestrator's inbox drops a message it has seen; a reply that a
                // participant sent twice (under two ids) reaches `decide` twice.
                if replies_seen.insert(id, ()).is_some() {
                    continue;
                }
                let d = decide(&saga, &reply, clock);
                for e in &d.events {
                    assert!(!saga.is_final(), "an event after the end: {e:?}");
                    saga.apply(e);
                }
                for command in d.commands {
                    match command {
                        Command::StartHoldTimer { .. } => {
                            send(&mut queue, Message::Reply(Reply::HoldTimeout))
                        }
                        Command::CancelTimers { .. } => {
                            queue.retain(|(_, m)| !matches!(m, Message::Reply(Reply::HoldTimeout)))
                        }
                        other => send(&mut queue, Message::Command(other)),
                    }
                }
            }
            Message::Command(command) => {
                if !model.seen.insert(id) {
                    continue;
                }
                let reply = match command {
                    Command::HoldSeats { quantity, .. } => {
                        if model.available >= quantity {
                            model.available -= quantity;
                            model.hold = Some(true);
                            Reply::SeatsHeld {
                                expires_at_ms: clock + 50,
                            }
                        } else {
                            Reply::SeatsRefused {
                                refusal: Refusal::NotEnough {
                                    available: model.available,
                                },
                            }
                        }
                    }
                    Command::ReleaseSeats { .. } => {
                        if model.hold == Some(true) {
                            model.available += quantity;
                            model.hold = Some(false);
                        }
                        Reply::SeatsReleased
                    }
                    Command::ConfirmSeats { .. } => {
                        if model.hold == Some(true) {
                            model.confirmed = true;
                            Reply::SeatsConfirmed
                        } else {
                            Reply::HoldMissing
                        }
                    }
                    Command::Charge { .. } => {
                        model.charges_made += 1;
                        if model.approve {
                            model.charged = true;
                            Reply::PaymentSucceeded {
                                charge_id: "c".into(),
                            }
                        } else {
                            Reply::PaymentDeclined
                        }
                    }
                    Command::Refund { .. } => {
                        if model.charged {
                            model.refunded = true;
                        }
                        Reply::Refunded
                    }
                    Command::StartHoldTimer { .. } | Command::CancelTimers { .. } => {
                        unreachable!("handled by the orchestrator")
                    }
                };
                // A participant may answer twice (a redelivery it had not recorded yet).
                let twice = rng.gen_range(0..100) < duplicate_pct;
                send(&mut queue, Message::Reply(reply.clone()));
                if twice {
                    send(&mut queue, Message::Reply(reply));
                }
            }
        }
    }
    (saga, model)
}

proptest! {
    #[test]
    fn every_saga_reaches_exactly_one_final_state_with_the_money_and_seats_to_match(
        seed in any::<u64>(),
        seats in 0u32..4,
        quantity in 1u32..3,
        approve in any::<bool>(),
        duplicate_pct in 0u32..40,
    ) {
        let (saga, model) = run(seed, seats, quantity, approve, duplicate_pct);
        prop_assert!(model.charges_made <= 1, "one Charge command per saga");
        let net_charge = model.charged && !model.refunded;
        match saga.outcome {
            Some(Outcome::Confirmed) => {
                prop_assert!(net_charge);
                prop_assert!(model.confirmed);
                prop_assert_eq!(model.available, seats - quantity);
            }
            Some(Outcome::Cancelled { .. }) => {
                prop_assert!(!net_charge);
                prop_assert!(!model.confirmed);
                prop_assert_eq!(model.available, seats);
                prop_assert_eq!(model.hold, Some(false));
            }
            Some(Outcome::Rejected { .. }) => {
                prop_assert!(seats < quantity);
                prop_assert_eq!(model.charges_made, 0);
                prop_assert_eq!(model.available, seats);
            }
            None => prop_assert!(false, "the saga did not end: {:?}", saga),
        }
        if !approve {
            prop_assert!(!matches!(saga.outcome, Some(Outcome::Confirmed)));
        }
    }

    #[test]
    fn a_snapshot_plus_the_tail_is_the_state_of_the_full_replay(
        seed in any::<u64>(),
        approve in any::<bool>(),
        cut in 0usize..12,
    ) {
        // Record the events of a random run, then cut the stream anywhere.
        let mut rng = StdRng::seed_from_u64(seed);
        let decision = place(placed(1));
        let mut saga = Saga::replay(&decision.events);
        let mut events = decision.events;
        let replies = [
            Reply::SeatsHeld { expires_at_ms: 50 },
            Reply::HoldTimeout,
            if approve { Reply::PaymentSucceeded { charge_id: "c".into() } } else { Reply::PaymentDeclined },
            Reply::SeatsReleased,
            Reply::SeatsConfirmed,
            Reply::Refunded,
        ];
        for t in 0..20 {
            let reply = &replies[rng.gen_range(0..replies.len())];
            let d = decide(&saga, reply, t);
            for e in &d.events {
                saga.apply(e);
            }
            events.extend(d.events);
        }
        let cut = cut.min(events.len());
        let stored = serde_json::to_string(&Saga::replay(&events[..cut])).unwrap();
        let mut from_snapshot: Saga = serde_json::from_str(&stored).unwrap();
        for e in &events[cut..] {
            from_snapshot.apply(e);
        }
        prop_assert_eq!(from_snapshot, Saga::replay(&events));
    }
}
