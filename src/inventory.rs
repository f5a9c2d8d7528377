//! The pure inventory core: one event's seats as a state machine.
//!
//! No actix, no sqlx, no clock reads: time comes in as [`Millis`], ids come in from the caller.
//! The event actor wraps it, the store persists what it decides, and the property tests and the
//! benchmarks drive it directly. Every operation keeps `available + held + sold == total`.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// A point in time in milliseconds on whatever monotonic clock the caller uses.
pub type Millis = u64;

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// Every seat is sold: nothing will come back.
    #[error("sold out")]
    SoldOut,
    /// No seat is free now, but some are held and may return if their payment fails.
    #[error("all remaining tickets are held by other buyers")]
    AllHeld,
    /// Fewer seats are free than were asked for.
    #[error("only {available} tickets available")]
    NotEnough { available: u32 },
    /// The buyer would exceed the per-user limit for this event.
    #[error("limit of {limit} tickets per user reached")]
    UserLimit { limit: u32 },
    /// The same hold id was used twice.
    #[error("hold already exists")]
    DuplicateHold,
    /// A quantity of zero.
    #[error("quantity must be at least 1")]
    ZeroQuantity,
}

/// Why a hold could not be confirmed or released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// No such hold: never made, already settled, or already expired and removed.
    #[error("no such hold")]
    Unknown,
    /// The hold's time ran out before confirmation; its seats went back to inventory.
    #[error("hold expired")]
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Hold<U> {
    user: U,
    quantity: u32,
    expires_at: Millis,
}

/// A snapshot of the counters, for stats and assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub total: u32,
    pub available: u32,
    pub held: u32,
    pub sold: u32,
}

/// Hashes hold and order ids: an id is 16 bytes, nearly always random ones, so folding them
/// with a multiply is enough, and much cheaper than SipHash (which took a tenth of the actor's
/// thread in `benches/actor_core`). Not for keys a client chooses freely: a services gateway's
/// chosen ids are uuids too, and a collision only slows lookups.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One event's seats. `H` identifies a hold (a ticket or an order), `U` a buyer.
#[derive(Debug, Clone)]
pub struct Inventory<H, U> {
    total: u32,
    available: u32,
    held: u32,
    sold: u32,
    hold_ttl: Millis,
    per_user_limit: Option<u32>,
    /// Keyed by ids the server mints (or a services gateway chooses: uuids too), so hashed
    /// with [`IdHasher`] rather than SipHash.
    holds: HashMap<H, Hold<U>, BuildHasherDefault<IdHasher>>,
    /// Holds ordered by expiry, so `expire` touches only what is due.
    expiries: BTreeSet<(Millis, H)>,
    /// Seats held or bought per user, for per-user limits.
    per_user: HashMap<U, u32>,
}

impl<H, U> Inventory<H, U>
where
    H: Copy + Eq + Hash + Ord,
    U: Clone + Eq + Hash,
{
    /// A fresh inventory with `available` of `total` seats free and the rest already sold.
    pub fn new(total: u32, available: u32, hold_ttl: Millis) -> Self {
        assert!(available <= total, "available must not exceed total");
        Self {
            total,
            available,
            held: 0,
            sold: total - available,
            hold_ttl,
            per_user_limit: None,
            holds: HashMap::default(),
            expiries: BTreeSet::new(),
            per_user: HashMap::new(),
        }
    }

    /// Caps how many seats one user may hold or own (the v2 per-user limit).
    pub fn with_per_user_limit(mut self, limit: u32) -> Self {
        self.per_user_limit = Some(limit);
        self
    }

    /// Records seats a user already owns (when rebuilding from storage).
    pub fn count_owned(&mut self, user: U, quantity: u32) {
        *self.per_user.entry(user).or_default() += quantity;
    }

    pub fn counts(&self) -> Counts {
        Counts {
            total: self.total,
            available: self.available,
            held: self.held,
            sold: self.sold,
        }
    }

    /// When the earliest hold runs out, if any is outstanding.
    pub fn next_expiry(&self) -> Option<Millis> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// Holds `quantity` seats for `user` under `hold` until `now + hold_ttl`, within the
    /// inventory's per-user limit if it has one.
    pub fn reserve(
        &mut self,
        hold: H,
        user: U,
        quantity: u32,
        now: Millis,
    ) -> Result<Millis, ReserveError> {
        self.reserve_within(hold, user, quantity, self.per_user_limit, now)
    }

    /// Like [`Self::reserve`], with the per-user limit given for this call (API v2 applies one,
    /// API v1 does not).
    pub fn reserve_within(
        &mut self,
        hold: H,
        user: U,
        quantity: u32,
        per_user_limit: Option<u32>,
        now: Millis,
    ) -> Result<Millis, ReserveError> {
        if quantity == 0 {
            return Err(ReserveError::ZeroQuantity);
        }
        if self.holds.contains_key(&hold) {
            return Err(ReserveError::DuplicateHold);
        }
        if self.available == 0 {
            return Err(if self.held == 0 {
                ReserveError::SoldOut
            } else {
                ReserveError::AllHeld
            });
        }
        if quantity > self.available {
            return Err(ReserveError::NotEnough {
                available: self.available,
            });
        }
        // One lookup, and the user cloned only for a first hold (`entry` would clone it always).
        let owned = self.per_user.get_mut(&user);
        if let Some(limit) = per_user_limit {
            if owned.as_deref().copied().unwrap_or(0) + quantity > limit {
                return Err(ReserveError::UserLimit { limit });
            }
        }
        match owned {
            Some(owned) => *owned += quantity,
            None => {
                self.per_user.insert(user.clone(), quantity);
            }
        }
        let expires_at = now.saturating_add(self.hold_ttl);
        self.available -= quantity;
        self.held += quantity;
        self.holds.insert(
            hold,
            Hold {
                user,
                quantity,
                expires_at,
            },
        );
        self.expiries.insert((expires_at, hold));
        self.debug_check();
        Ok(expires_at)
    }

    /// Turns a live hold into sold seats. A hold past its expiry is expired instead.
    pub fn confirm(&mut self, hold: H, now: Millis) -> Result<u32, HoldError> {
        let entry = self.holds.get(&hold).ok_or(HoldError::Unknown)?;
        if now >= entry.expires_at {
            self.release_inner(hold);
            return Err(HoldError::Expired);
        }
        let entry = self.take(hold);
        self.held -= entry.quantity;
        self.sold += entry.quantity;
        self.debug_check();
        Ok(entry.quantity)
    }

    /// Returns a hold's seats to inventory (its payment failed).
    pub fn release(&mut self, hold: H) -> Result<u32, HoldError> {
        if !self.holds.contains_key(&hold) {
            return Err(HoldError::Unknown);
        }
        Ok(self.release_inner(hold))
    }

    /// Returns the seats of every hold whose time ran out by `now`; yields their ids.
    pub fn expire(&mut self, now: Millis) -> Vec<H> {
        let mut expired = Vec::new();
        while let Some(&(at, hold)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.release_inner(hold);
            expired.push(hold);
        }
        expired
    }

    fn take(&mut self, hold: H) -> Hold<U> {
        let entry = self.holds.remove(&hold).expect("hold checked by caller");
        self.expiries.remove(&(entry.expires_at, hold));
        entry
    }

    fn release_inner(&mut self, hold: H) -> u32 {
        let entry = self.take(hold);
        self.held -= entry.quantity;
        self.available += entry.quantity;
        if let Some(owned) = self.per_user.get_mut(&entry.user) {
            *owned -= entry.quantity;
            if *owned == 0 {
                self.per_user.remove(&entry.user);
            }
        }
        self.debug_check();
        entry.quantity
    }

    fn debug_check(&self) {
        debug_assert_eq!(
            self.available + self.held + self.sold,
            self.total,
            "conservation broken"
        );
        debug_assert_eq!(
            self.holds.values().map(|h| h.quantity).sum::<u32>(),
            self.held
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory(total: u32) -> Inventory<u32, &'static str> {
        Inventory::new(total, total, 1_000)
    }

    #[test]
    fn the_last_seat_goes_to_exactly_one_buyer() {
        let mut inv = inventory(1);
        assert!(inv.reserve(1, "a", 1, 0).is_ok());
        assert_eq!(inv.reserve(2, "b", 1, 0), Err(ReserveError::AllHeld));
        assert_eq!(inv.confirm(1, 10), Ok(1));
        assert_eq!(inv.reserve(3, "c", 1, 20), Err(ReserveError::SoldOut));
    }

    #[test]
    fn a_failed_payment_returns_the_seat_at_once() {
        let mut inv = inventory(1);
        inv.reserve(1, "a", 1, 0).unwrap();
        assert_eq!(inv.release(1), Ok(1));
        assert_eq!(inv.counts().available, 1);
        assert!(inv.reserve(2, "b", 1, 0).is_ok());
    }

    #[test]
    fn a_hold_past_its_ttl_cannot_be_confirmed() {
        let mut inv = inventory(2);
        inv.reserve(1, "a", 1, 0).unwrap();
        assert_eq!(inv.confirm(1, 1_000), Err(HoldError::Expired));
        assert_eq!(inv.counts().available, 2);
        assert_eq!(inv.confirm(1, 1_001), Err(HoldError::Unknown));
    }

    #[test]
    fn expire_returns_only_the_holds_that_are_due() {
        let mut inv = inventory(3);
        inv.reserve(1, "a", 1, 0).unwrap();
        inv.reserve(2, "b", 1, 500).unwrap();
        assert_eq!(inv.expire(999), Vec::<u32>::new());
        assert_eq!(inv.expire(1_000), vec![1]);
        assert_eq!(inv.next_expiry(), Some(1_500));
        assert_eq!(inv.counts().held, 1);
    }

    #[test]
    fn the_per_user_limit_counts_holds_and_purchases() {
        let mut inv = Inventory::new(10, 10, 1_000).with_per_user_limit(2);
        inv.reserve(1, "a", 2, 0).unwrap();
        assert_eq!(
            inv.reserve(2, "a", 1, 0),
            Err(ReserveError::UserLimit { limit: 2 })
        );
        inv.release(1).unwrap();
        assert!(inv.reserve(3, "a", 1, 0).is_ok());
        // a second hold of a user already counted adds to the count
        assert!(inv.reserve(4, "a", 1, 0).is_ok());
        assert_eq!(
            inv.reserve(5, "a", 1, 0),
            Err(ReserveError::UserLimit { limit: 2 })
        );
    }
}
