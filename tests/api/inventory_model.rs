//! Property tests: the pure inventory core against a simple reference model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use ticketflow::inventory::{HoldError, Inventory, ReserveError};

const TTL: u64 = 100;
const LIMIT: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
    Reserve { user: u8, quantity: u32 },
    Confirm { pick: usize },
    Release { pick: usize },
    Wait { ms: u64 },
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..5, 0u32..4).prop_map(|(user, quantity)| Op::Reserve { user, quantity }),
        2 => any::<usize>().prop_map(|pick| Op::Confirm { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        2 => (0u64..60).prop_map(|ms| Op::Wait { ms }),
        1 => Just(Op::Expire),
    ]
}

/// The reference: plain counters and a list of holds, written for clarity, not speed.
#[derive(Default)]
struct Model {
    total: u32,
    sold: u32,
    holds: BTreeMap<u32, (u8, u32, u64)>, // id -> (user, quantity, expires_at)
    owned: BTreeMap<u8, u32>,
}

impl Model {
    fn held(&self) -> u32 {
        self.holds.values().map(|h| h.1).sum()
    }
    fn available(&self) -> u32 {
        self.total - self.sold - self.held()
    }
    fn drop_hold(&mut self, id: u32) {
        let (user, quantity, _) = self.holds.remove(&id).unwrap();
        *self.owned.get_mut(&user).unwrap() -= quantity;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_core_agrees_with_the_reference_model(
        total in 1u32..12,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut core: Inventory<u32, u8> = Inventory::new(total, total, TTL).with_per_user_limit(LIMIT);
        let mut model = Model { total, ..Model::default() };
        let mut now = 0u64;
        let mut next_id = 0u32;
        let mut issued: Vec<u32> = Vec::new();

        for op in ops {
            match op {
                Op::Reserve { user, quantity } => {
                    next_id += 1;
                    let got = core.reserve(next_id, user, quantity, now);
                    let owned = model.owned.get(&user).copied().unwrap_or(0);
                    let expected = if quantity == 0 {
                        Err(ReserveError::ZeroQuantity)
                    } else if model.available() == 0 && model.held() == 0 {
                        Err(ReserveError::SoldOut)
                    } else if model.available() == 0 {
                        Err(ReserveError::AllHeld)
                    } else if quantity > model.available() {
                        Err(ReserveError::NotEnough { available: model.available() })
                    } else if owned + quantity > LIMIT {
                        Err(ReserveError::UserLimit { limit: LIMIT })
                    } else {
                        Ok(now + TTL)
                    };
                    prop_assert_eq!(got, expected);
                    if got.is_ok() {
                        model.holds.insert(next_id, (user, quantity, now + TTL));
                        *model.owned.entry(user).or_default() += quantity;
                        issued.push(next_id);
                    }
                }
                Op::Confirm { pick } if !issued.is_empty() => {
                    let id = issued[pick % issued.len()];
                    let got = core.confirm(id, now);
                    let expected = match model.holds.get(&id) {
                        None => Err(HoldError::Unknown),
                        Some(&(_, _, expires)) if now >= expires => Err(HoldError::Expired),
                        Some(&(_, quantity, _)) => Ok(quantity),
                    };
                    prop_assert_eq!(got, expected);
                    match got {
                        Ok(quantity) => { model.holds.remove(&id); model.sold += quantity; }
                        Err(HoldError::Expired) => model.drop_hold(id),
                        Err(HoldError::Unknown) => {}
                    }
                }
                Op::Release { pick } if !issued.is_empty() => {
                    let id = issued[pick % issued.len()];
                    let got = core.release(id);
                    let expected = model.holds.get(&id).map(|h| h.1).ok_or(HoldError::Unknown);
                    prop_assert_eq!(got, expected);
                    if got.is_ok() { model.drop_hold(id); }
                }
                Op::Wait { ms } => now += ms,
                Op::Expire => {
                    let mut got = core.expire(now);
                    got.sort_unstable();
                    let due: Vec<u32> = model.holds.iter().filter(|(_, h)| h.2 <= now).map(|(id, _)| *id).collect();
                    for id in &due { model.drop_hold(*id); }
                    prop_assert_eq!(got, due);
                }
                _ => {}
            }
            let counts = core.counts();
            prop_assert_eq!(counts.available, model.available());
            prop_assert_eq!(counts.held, model.held());
            prop_assert_eq!(counts.sold, model.sold);
            prop_assert_eq!(counts.available + counts.held + counts.sold, total);
        }
    }
}
