//! The deterministic simulator (`ticketflow simulate`): the real [`EventCore`] of every event,
//! driven by a seeded scheduler in simulated time, as TigerBeetle's VOPR and FoundationDB's
//! simulation drive their code. Everything around the core is a model of what the `actor`
//! stage does and of what it talks to:
//!
//! - buyers that arrive, retry with back-off, buy again, hang up, and see some answers lost;
//! - API v1 buyers (one seat, no limit) and v2 buyers (1 to 3 seats, a per-user limit);
//! - a payment gateway that decides each key once (approved or declined) with a latency that is
//!   sometimes longer than the hold (late successes), whose calls sometimes time out (the stage
//!   asks again under the same key) and whose answers sometimes arrive twice;
//! - hold expiry on the actor's tick;
//! - the group-commit writer: writes commit in the order they were queued, a batch at a time,
//!   and each waiter hears its acknowledgement after its commit, after a delay of its own (so
//!   acknowledgements arrive out of order, never before the commit);
//! - crash and restart: memory, the writer's uncommitted queue and every answer on its way are
//!   lost; the restarted process resolves pending payments as the stage's recovery does and
//!   rebuilds each core from what was committed.
//!
//! After every step it checks I1, I2, I3 (nothing charged twice; a confirmed order has exactly
//! one net charge), I5 (every charge has a payment record), I6, I8 (one charge per payment key)
//! and the per-user limit; once the run is quiet, I4 and I7, and the rest of I3 and I5 (nothing
//! unconfirmed keeps a charge; every payment is final). The checks look at what the step
//! touched, which is all that a step can change.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::Instant;

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::domain::{CancelReason, EventId, Money, OrderId, PaymentStatus, TicketId, UserId};
use crate::event_core::{
    EventCore, Granted, Input, Output, PaymentResult, PlantedBug, ReserveRequest, Settled,
};
use crate::inventory::{Inventory, Millis, ReserveError};
use crate::store::WriteOp;

/// How long a hold lasts, in simulated milliseconds.
const HOLD_TTL_MS: Millis = 500;
/// The actor's expiry tick (the real actor ticks at a tenth of the TTL).
const TICK_MS: Millis = HOLD_TTL_MS / 10;
/// Most tickets one v2 user may hold or own per event.
const PER_USER_LIMIT: u32 = 4;
/// Writes one group commit takes from the queue at most.
const MAX_BATCH: usize = 8;
/// Room in the writer's queue; a full queue sheds the reservation.
const WRITER_CAPACITY: usize = 64;
/// How long the stage waits for the gateway before asking again under the same key.
const CHARGE_TIMEOUT_MS: Millis = 1_000;
/// Attempts a buyer makes before giving up.
const MAX_ATTEMPTS: u32 = 8;
/// A run not quiet after this much simulated time has lost something (I4).
const RUN_LIMIT_MS: Millis = 300_000;
const PRICE_CENTS: i64 = 2_500;
const _: () = assert!(TICK_MS > 0 && CHARGE_TIMEOUT_MS > HOLD_TTL_MS);

/// What to simulate.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub events: u32,
    pub buyers: u32,
    pub planted: Option<PlantedBug>,
}

/// An invariant that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `I1` ... `I8`, or `limit` (the per-user limit).
    pub invariant: &'static str,
    pub step: u64,
    pub at_ms: Millis,
    pub detail: String,
}

/// One seed's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedRun {
    pub seed: u64,
    pub steps: u64,
    pub simulated_ms: Millis,
    /// FNV-1a over every step taken: the same seed always gives the same hash.
    pub trace: u64,
    pub faults: Faults,
    pub violation: Option<Violation>,
}

/// How often each modelled fault happened, so a test can tell the model still bites.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    pub crashes: u64,
    /// Approvals that came after their hold expired (refunded).
    pub late_successes: u64,
    pub declines: u64,
    /// Charge calls that timed out and were asked again under the same key.
    pub timeouts: u64,
    /// Gateway answers delivered a second time.
    pub duplicate_callbacks: u64,
    /// Buyers who hung up before hearing of their hold.
    pub hang_ups: u64,
    /// Reservations refused by the per-user limit.
    pub limit_refusals: u64,
}

impl Faults {
    fn add(&mut self, other: &Faults) {
        self.crashes += other.crashes;
        self.late_successes += other.late_successes;
        self.declines += other.declines;
        self.timeouts += other.timeouts;
        self.duplicate_callbacks += other.duplicate_callbacks;
        self.hang_ups += other.hang_ups;
        self.limit_refusals += other.limit_refusals;
    }
}

/// Runs one seed to quiet (or to the first violation).
pub fn run_seed(seed: u64, config: &SimConfig) -> SeedRun {
    let mut world = World::new(seed, config);
    let violation = world.run().err();
    SeedRun {
        seed,
        steps: world.steps,
        simulated_ms: world.now,
        trace: world.trace,
        faults: world.faults,
        violation,
    }
}

/// The command that replays one seed.
pub fn replay_command(seed: u64, config: &SimConfig) -> String {
    let mut cmd = format!(
        "ticketflow simulate --seeds 1 --seed-start {seed} --events {} --buyers {}",
        config.events, config.buyers
    );
    if let Some(bug) = config.planted {
        cmd.push_str(&format!(" --planted-bug {}", bug.name()));
    }
    cmd
}

/// One seed's line: its trace hash, and for a failure what failed and how to replay it.
pub fn seed_line(run: &SeedRun, config: &SimConfig) -> String {
    let head = format!(
        "seed {}: {} steps, {} ms simulated, {} crashes, trace {:016x}",
        run.seed, run.steps, run.simulated_ms, run.faults.crashes, run.trace
    );
    match &run.violation {
        None => format!("{head}: ok"),
        Some(v) => format!(
            "{head}: FAILED {} at step {} (t={} ms): {}; replay: {}",
            v.invariant,
            v.step,
            v.at_ms,
            v.detail,
            replay_command(run.seed, config)
        ),
    }
}

/// Totals over a range of seeds.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub seeds: u64,
    pub failed: u64,
    pub steps: u64,
    pub simulated_ms: u64,
    pub wall_ms: u128,
    pub first_failure: Option<u64>,
    pub faults: Faults,
}

/// Runs `seeds` seeds from `start`, handing each seed's line to `out`; with `stop_on_failure`,
/// stops after the first failing seed.
pub fn run_seeds(
    start: u64,
    seeds: u64,
    config: &SimConfig,
    stop_on_failure: bool,
    mut out: impl FnMut(&SeedRun, String),
) -> Summary {
    let began = Instant::now();
    let mut summary = Summary::default();
    for seed in start..start.saturating_add(seeds) {
        let run = run_seed(seed, config);
        summary.seeds += 1;
        summary.steps += run.steps;
        summary.simulated_ms += run.simulated_ms;
        summary.faults.add(&run.faults);
        if run.violation.is_some() {
            summary.failed += 1;
            summary.first_failure.get_or_insert(seed);
        }
        let line = seed_line(&run, config);
        out(&run, line);
        if stop_on_failure && run.violation.is_some() {
            break;
        }
    }
    summary.wall_ms = began.elapsed().as_millis();
    summary
}

impl Summary {
    pub fn line(&self) -> String {
        let wall_s = self.wall_ms as f64 / 1000.0;
        let f = &self.faults;
        format!(
            "simulated {} seeds: {} failed; {} steps, {:.1} s simulated time, {:.2} s wall time \
             ({:.0} seeds/s); faults: {} crashes, {} late successes, {} declines, {} timeouts, \
             {} duplicate callbacks, {} hang-ups, {} limit refusals",
            self.seeds,
            self.failed,
            self.steps,
            self.simulated_ms as f64 / 1000.0,
            wall_s,
            self.seeds as f64 / wall_s.max(1e-9),
            f.crashes,
            f.late_successes,
            f.declines,
            f.timeouts,
            f.duplicate_callbacks,
            f.hang_ups,
            f.limit_refusals
        )
    }
}

/// `ticketflow simulate`: one line per seed (its trace hash; for a failure, what failed and the
/// command that replays it), then the summary. Returns the exit status: 0 if every seed
/// passed, 1 if any failed.
pub fn main(args: &crate::cli::SimulateArgs, out: &mut impl std::io::Write) -> u8 {
    if args.list_planted_bugs {
        for bug in PlantedBug::ALL {
            let _ = writeln!(out, "{}", bug.name());
        }
        return 0;
    }
    let config = SimConfig {
        events: args.events,
        buyers: args.buyers,
        planted: args.planted_bug,
    };
    let summary = run_seeds(
        args.seed_start,
        args.seeds.unwrap_or(1),
        &config,
        args.stop_on_failure,
        |_, line| {
            let _ = writeln!(out, "{line}");
        },
    );
    let _ = writeln!(out, "{}", summary.line());
    u8::from(summary.failed > 0)
}

/// Who waits for a write's acknowledgement.
#[derive(Debug, Clone, Copy)]
enum Waiter {
    /// Nobody (an expiry's cancellation, a hang-up's).
    Nobody,
    Hold(usize),
    Settled(usize, Settled),
    Refunded(usize),
    /// A duplicate answer's follow-up write: nobody hears of it.
    Duplicate,
}

#[derive(Debug, Clone)]
enum Ev {
    Arrive(usize),
    /// A purchase's reservation reaches its event's actor.
    Reserve(usize),
    Commit,
    Ack(Waiter, bool),
    Tick(usize),
    /// A charge answer reaches the stage; `call` tells the live call from stale ones.
    ChargeAnswer {
        purchase: usize,
        call: u32,
        duplicate: bool,
    },
    ChargeTimeout {
        purchase: usize,
        call: u32,
    },
    /// A settlement reaches the event's actor.
    Settle {
        purchase: usize,
        result: PaymentResult,
        duplicate: bool,
    },
    Crash,
    Restart,
}

impl Ev {
    fn code(&self) -> u64 {
        match self {
            Ev::Arrive(b) => 1 | (*b as u64) << 8,
            Ev::Reserve(p) => 2 | (*p as u64) << 8,
            Ev::Commit => 3,
            Ev::Ack(_, ok) => 4 | u64::from(*ok) << 8,
            Ev::Tick(e) => 5 | (*e as u64) << 8,
            Ev::ChargeAnswer { purchase, call, .. } => {
                6 | (*purchase as u64) << 8 | u64::from(*call) << 40
            }
            Ev::ChargeTimeout { purchase, .. } => 7 | (*purchase as u64) << 8,
            Ev::Settle { purchase, .. } => 8 | (*purchase as u64) << 8,
            Ev::Crash => 9,
            Ev::Restart => 10,
        }
    }
}

/// The client's view of one purchase, for I7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Waiting,
    Success,
    /// A definite refusal or failure: nothing may be left confirmed or charged.
    Failure,
    /// No trustworthy answer (a crash, a hang-up): resolves to one of the two.
    Unknown,
}

struct Purchase {
    buyer: usize,
    event: usize,
    quantity: u32,
    order: Option<OrderId>,
    seen: Seen,
    /// Process incarnation it belongs to; a crash ends it.
    epoch: u32,
    /// The live charge call; answers to older calls are stale.
    call: u32,
    charging: bool,
    hung_up: bool,
}

struct Buyer {
    user: UserId,
    /// API v2 (a per-user limit, up to 3 seats) or v1 (one seat, no limit).
    v2: bool,
    event: usize,
    attempts: u32,
    done: bool,
    told_sold_out: bool,
    buys_left: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    Confirmed,
    Cancelled,
}

/// An order as the simulated store holds it: what is committed.
#[derive(Debug, Clone)]
struct StoredOrder {
    event: usize,
    user: String,
    limited: bool,
    quantity: u32,
    status: Status,
    payment: PaymentStatus,
}

struct StoredEvent {
    total: i64,
    available: i64,
    pending: i64,
    confirmed: i64,
    issued: u64,
}

/// What the database has committed. Each write applies whole or not at all, with the same
/// preconditions as the SQL (an order is finished only from `pending`, a payment settled only
/// from `pending`, `0 <= available <= total`).
struct Store {
    orders: HashMap<OrderId, StoredOrder>,
    events: Vec<StoredEvent>,
    tickets: HashSet<TicketId>,
    /// Seats of limited (v2) orders not cancelled, per (event, user).
    limited_seats: HashMap<(usize, String), u32>,
}

/// The gateway's books: each key's fate, decided once, and its ledger lines.
#[derive(Default)]
struct Gateway {
    fate: HashMap<OrderId, PaymentResult>,
    charges: HashMap<OrderId, u32>,
    refunds: HashMap<OrderId, u32>,
}

impl Gateway {
    fn net(&self, order: OrderId) -> i64 {
        i64::from(self.charges.get(&order).copied().unwrap_or(0))
            - i64::from(self.refunds.get(&order).copied().unwrap_or(0))
    }
}

struct World {
    rng: StdRng,
    seed: u64,
    config: SimConfig,
    now: Millis,
    seq: u64,
    queue: BinaryHeap<Reverse<(Millis, u64)>>,
    pending: HashMap<u64, (u32, Ev)>,
    /// Scheduled events other than expiry ticks: when none is left and no hold is out, the
    /// ticks stop and the run is over.
    live: usize,
    epoch: u32,
    up: bool,
    faults: Faults,
    cores: Vec<EventCore>,
    writer: VecDeque<(WriteOp, Waiter)>,
    committing: bool,
    store: Store,
    gateway: Gateway,
    buyers: Vec<Buyer>,
    purchases: Vec<Purchase>,
    by_order: HashMap<OrderId, usize>,
    trace: u64,
    steps: u64,
}

type Checked = Result<(), Violation>;

impl World {
    fn new(seed: u64, config: &SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5151_0f0f_a5a5_c3c3);
        let events = config.events.max(1) as usize;
        let store = Store {
            orders: HashMap::new(),
            events: (0..events)
                .map(|_| {
                    let total = rng.gen_range(3..=16);
                    StoredEvent {
                        total,
                        available: total,
                        pending: 0,
                        confirmed: 0,
                        issued: 0,
                    }
                })
                .collect(),
            tickets: HashSet::new(),
            limited_seats: HashMap::new(),
        };
        let users = (config.buyers / 2).max(1);
        let buyers = (0..config.buyers as usize)
            .map(|b| {
                let user = b as u32 % users;
                Buyer {
                    user: UserId::parse(&format!("u{user}")).expect("a valid user id"),
                    v2: user % 2 == 0,
                    event: rng.gen_range(0..events),
                    attempts: 0,
                    done: false,
                    told_sold_out: false,
                    buys_left: rng.gen_range(1..=3),
                }
            })
            .collect();
        let crashes_planned = match rng.gen_range(0..10) {
            0..=5 => 0,
            6..=8 => 1,
            _ => 2,
        };
        let mut world = Self {
            rng,
            seed,
            config: *config,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            live: 0,
            epoch: 0,
            up: true,
            faults: Faults::default(),
            cores: Vec::new(),
            writer: VecDeque::new(),
            committing: false,
            store,
            gateway: Gateway::default(),
            buyers,
            purchases: Vec::new(),
            by_order: HashMap::new(),
            trace: 0xcbf2_9ce4_8422_2325,
            steps: 0,
        };
        world.start_process();
        for b in 0..world.buyers.len() {
            let at = world.rng.gen_range(0..2_000);
            world.at(at, Ev::Arrive(b));
        }
        for _ in 0..crashes_planned {
            let at = world.rng.gen_range(100..4_000);
            world.at(at, Ev::Crash);
        }
        world
    }

    fn mix(&mut self, value: u64) {
        self.trace = fnv1a_u64(self.trace, value);
    }

    /// Schedules `ev` at `delay` from now, in this process incarnation.
    fn at(&mut self, delay: Millis, ev: Ev) {
        self.seq += 1;
        if !matches!(ev, Ev::Tick(_)) {
            self.live += 1;
        }
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.pending.insert(self.seq, (self.epoch, ev));
    }

    fn run(&mut self) -> Checked {
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            let Some((epoch, ev)) = self.pending.remove(&seq) else {
                continue;
            };
            self.now = at;
            if !matches!(ev, Ev::Tick(_)) {
                self.live -= 1;
            }
            // Answers and deliveries of a crashed incarnation are lost with it; buyers, the
            // gateway and the clock (crash, restart) live outside the process.
            let outside = matches!(ev, Ev::Arrive(_) | Ev::Crash | Ev::Restart);
            if epoch != self.epoch && !outside {
                continue;
            }
            self.steps += 1;
            self.mix(at);
            self.mix(ev.code());
            self.step(ev)?;
            if self.now > RUN_LIMIT_MS {
                return Err(self.violation(
                    "I4",
                    format!("not quiet after {RUN_LIMIT_MS} ms of simulated time"),
                ));
            }
        }
        self.check_quiet()
    }

    fn violation(&self, invariant: &'static str, detail: String) -> Violation {
        Violation {
            invariant,
            step: self.steps,
            at_ms: self.now,
            detail,
        }
    }

    fn start_process(&mut self) {
        self.cores = (0..self.store.events.len())
            .map(|e| {
                let stored = &self.store.events[e];
                let total = stored.total as u32;
                let mut inventory = Inventory::new(total, stored.available as u32, HOLD_TTL_MS);
                let mut owned: BTreeMap<&str, u32> = BTreeMap::new();
                for o in self.store.orders.values() {
                    if o.event == e && o.status == Status::Confirmed {
                        *owned.entry(o.user.as_str()).or_default() += o.quantity;
                    }
                }
                for (user, n) in owned {
                    inventory.count_owned(UserId::parse(user).expect("stored user id"), n);
                }
                let event = EventId(e as i64 + 1);
                let price = Money::from_cents(PRICE_CENTS).expect("a valid price");
                EventCore::new(event, price, inventory, self.seed, stored.issued)
                    .with_planted_bug(self.config.planted)
            })
            .collect();
        for e in 0..self.cores.len() {
            self.at(TICK_MS, Ev::Tick(e));
        }
    }

    fn step(&mut self, ev: Ev) -> Checked {
        match ev {
            Ev::Arrive(b) => self.arrive(b),
            Ev::Reserve(p) => self.reserve(p),
            Ev::Commit => self.commit(),
            Ev::Ack(waiter, ok) => self.ack(waiter, ok),
            Ev::Tick(e) => {
                let Output::Expired(cancels) = self.cores[e].step(Input::Expire, self.now) else {
                    unreachable!()
                };
                for op in cancels {
                    self.submit(op, Waiter::Nobody);
                }
                if self.live > 0 || self.cores.iter().any(|c| c.next_expiry().is_some()) {
                    self.at(TICK_MS, Ev::Tick(e));
                }
                self.check_event(e)
            }
            Ev::ChargeAnswer {
                purchase,
                call,
                duplicate,
            } => {
                let live = {
                    let p = &self.purchases[purchase];
                    p.epoch == self.epoch && (duplicate || (p.charging && p.call == call))
                };
                if !live {
                    return Ok(());
                }
                if duplicate {
                    self.faults.duplicate_callbacks += 1;
                }
                let order = self.purchases[purchase].order.expect("a charged order");
                let result = self.gateway.fate[&order];
                let delay = self.rng.gen_range(0..3);
                self.at(
                    delay,
                    Ev::Settle {
                        purchase,
                        result,
                        duplicate,
                    },
                );
                if !duplicate {
                    self.purchases[purchase].call += 1;
                    if self.rng.gen_bool(0.03) {
                        // The gateway's callback, delivered twice.
                        let later = self.rng.gen_range(1..800);
                        self.at(
                            later,
                            Ev::ChargeAnswer {
                                purchase,
                                call,
                                duplicate: true,
                            },
                        );
                    }
                }
                Ok(())
            }
            Ev::ChargeTimeout { purchase, call } => {
                let p = &self.purchases[purchase];
                if p.epoch == self.epoch && p.charging && p.call == call {
                    self.faults.timeouts += 1;
                    self.purchases[purchase].call += 1;
                    self.charge(purchase)?;
                }
                Ok(())
            }
            Ev::Settle {
                purchase,
                result,
                duplicate,
            } => self.settle(purchase, result, duplicate),
            Ev::Crash => self.crash(),
            Ev::Restart => self.restart(),
        }
    }

    fn arrive(&mut self, b: usize) -> Checked {
        let buyer = &mut self.buyers[b];
        if buyer.done {
            return Ok(());
        }
        buyer.attempts += 1;
        let quantity = if buyer.v2 {
            self.rng.gen_range(1..=3)
        } else {
            1
        };
        let event = self.buyers[b].event;
        let id = self.purchases.len();
        self.purchases.push(Purchase {
            buyer: b,
            event,
            quantity,
            order: None,
            seen: Seen::Waiting,
            epoch: self.epoch,
            call: 0,
            charging: false,
            hung_up: false,
        });
        if !self.up {
            // Connection refused: nothing reached the server.
            self.purchases[id].seen = Seen::Failure;
            self.retry(b);
            return Ok(());
        }
        let delay = self.rng.gen_range(0..3);
        self.at(delay, Ev::Reserve(id));
        Ok(())
    }

    /// The buyer tries again later, or gives up.
    fn retry(&mut self, b: usize) {
        if self.buyers[b].attempts >= MAX_ATTEMPTS {
            self.buyers[b].done = true;
            return;
        }
        let backoff = self.rng.gen_range(20..400);
        self.at(backoff, Ev::Arrive(b));
    }

    fn answer(&mut self, purchase: usize, seen: Seen) {
        let p = &mut self.purchases[purchase];
        if p.seen != Seen::Waiting {
            return;
        }
        p.seen = if p.hung_up { Seen::Unknown } else { seen };
        let b = p.buyer;
        match seen {
            Seen::Success => {
                let buyer = &mut self.buyers[b];
                buyer.buys_left -= 1;
                if buyer.buys_left == 0 {
                    buyer.done = true;
                } else {
                    let later = self.rng.gen_range(10..300);
                    self.at(later, Ev::Arrive(b));
                }
            }
            _ => self.retry(b),
        }
    }

    fn reserve(&mut self, purchase: usize) -> Checked {
        let (b, event, quantity) = {
            let p = &self.purchases[purchase];
            (p.buyer, p.event, p.quantity)
        };
        let buyer = &self.buyers[b];
        let request = ReserveRequest {
            order: None,
            user: buyer.user.clone(),
            quantity,
            per_user_limit: buyer.v2.then_some(PER_USER_LIMIT),
            idempotency: None,
            created_at: String::new(),
        };
        let Output::Reserved(decided) = self.cores[event].step(Input::Reserve(request), self.now)
        else {
            unreachable!()
        };
        match decided {
            Err(refusal) => {
                self.mix(0x100 + refusal_code(refusal));
                match refusal {
                    ReserveError::SoldOut => {
                        self.buyers[b].told_sold_out = true;
                        self.buyers[b].done = true;
                        self.purchases[purchase].seen = Seen::Failure;
                    }
                    ReserveError::UserLimit { .. } => {
                        self.faults.limit_refusals += 1;
                        self.buyers[b].done = true;
                        self.purchases[purchase].seen = Seen::Failure;
                    }
                    _ => self.answer(purchase, Seen::Failure),
                }
                self.check_event(event)
            }
            Ok(Granted { order, write, .. }) => {
                if self.writer.len() >= WRITER_CAPACITY {
                    self.cores[event].step(Input::Withdraw(order), self.now);
                    self.answer(purchase, Seen::Failure);
                    return self.check_event(event);
                }
                self.purchases[purchase].order = Some(order);
                self.by_order.insert(order, purchase);
                if self.rng.gen_bool(0.02) {
                    // The buyer hung up before the answer: the seats go back.
                    self.faults.hang_ups += 1;
                    self.purchases[purchase].hung_up = true;
                    self.purchases[purchase].seen = Seen::Unknown;
                    self.submit(write, Waiter::Nobody);
                    if let Output::Returned { write: Some(op) } =
                        self.cores[event].step(Input::Abandon(order), self.now)
                    {
                        self.submit(op, Waiter::Nobody);
                    }
                    self.retry(b);
                } else {
                    self.submit(write, Waiter::Hold(purchase));
                }
                self.check_event(event)
            }
        }
    }

    fn submit(&mut self, op: WriteOp, waiter: Waiter) {
        self.writer.push_back((op, waiter));
        if !self.committing {
            self.committing = true;
            let delay = self.rng.gen_range(1..10);
            self.at(delay, Ev::Commit);
        }
    }

    /// One group commit: the oldest writes, in queue order; each waiter hears after a delay.
    fn commit(&mut self) -> Checked {
        let n = self.rng.gen_range(1..=MAX_BATCH).min(self.writer.len());
        for _ in 0..n {
            let (op, waiter) = self.writer.pop_front().expect("counted");
            let ok = self.apply(&op)?;
            self.mix(u64::from(ok));
            if !matches!(waiter, Waiter::Nobody) {
                let delay = self.rng.gen_range(0..20);
                self.at(delay, Ev::Ack(waiter, ok));
            }
        }
        if self.writer.is_empty() {
            self.committing = false;
        } else {
            let delay = self.rng.gen_range(1..10);
            self.at(delay, Ev::Commit);
        }
        Ok(())
    }

    /// Applies one write to the store; `false` if the store refuses it (nothing changes).
    fn apply(&mut self, op: &WriteOp) -> Result<bool, Violation> {
        match op {
            WriteOp::Hold(hold) => {
                let e = (hold.event.0 - 1) as usize;
                let q = hold.tickets.len() as i64;
                let ev = &self.store.events[e];
                if ev.available < q || self.store.orders.contains_key(&hold.order) {
                    return Ok(false);
                }
                for t in &hold.tickets {
                    if !self.store.tickets.insert(*t) {
                        return Err(self.violation("I2", format!("ticket {t} issued twice")));
                    }
                }
                let purchase = self.by_order.get(&hold.order).copied();
                let limited = purchase.is_some_and(|p| self.buyers[self.purchases[p].buyer].v2);
                let ev = &mut self.store.events[e];
                ev.available -= q;
                ev.pending += q;
                ev.issued += q as u64;
                self.store.orders.insert(
                    hold.order,
                    StoredOrder {
                        event: e,
                        user: hold.user.clone(),
                        limited,
                        quantity: q as u32,
                        status: Status::Pending,
                        payment: PaymentStatus::Pending,
                    },
                );
                if limited {
                    let seats = self
                        .store
                        .limited_seats
                        .entry((e, hold.user.clone()))
                        .or_default();
                    *seats += q as u32;
                    if *seats > PER_USER_LIMIT {
                        let detail = format!(
                            "user {} holds or owns {seats} seats of event {}, limit {PER_USER_LIMIT}",
                            hold.user,
                            e + 1
                        );
                        return Err(self.violation("limit", detail));
                    }
                }
                self.check_stored_event(e)?;
                Ok(true)
            }
            WriteOp::Confirm { order } => {
                let Some(o) = self.store.orders.get_mut(order) else {
                    return Ok(false);
                };
                if o.status != Status::Pending || o.payment != PaymentStatus::Pending {
                    return Ok(false);
                }
                o.status = Status::Confirmed;
                o.payment = PaymentStatus::Completed;
                let (e, q) = (o.event, i64::from(o.quantity));
                let ev = &mut self.store.events[e];
                ev.pending -= q;
                ev.confirmed += q;
                self.check_charge(*order)?;
                self.check_stored_event(e)?;
                Ok(true)
            }
            WriteOp::Cancel { order, payment, .. } => {
                let Some(o) = self.store.orders.get(order) else {
                    return Ok(false);
                };
                if o.status != Status::Pending
                    || (payment.is_some() && o.payment != PaymentStatus::Pending)
                {
                    return Ok(false);
                }
                let o = self.store.orders.get_mut(order).expect("checked");
                o.status = Status::Cancelled;
                if let Some(status) = payment {
                    o.payment = *status;
                }
                let (e, q) = (o.event, i64::from(o.quantity));
                if o.limited {
                    if let Some(seats) = self.store.limited_seats.get_mut(&(e, o.user.clone())) {
                        *seats -= o.quantity;
                    }
                }
                let ev = &mut self.store.events[e];
                ev.pending -= q;
                ev.available += q;
                self.check_stored_event(e)?;
                Ok(true)
            }
            WriteOp::SettlePayment { order, status } => {
                let Some(o) = self.store.orders.get_mut(order) else {
                    return Ok(false);
                };
                if o.payment != PaymentStatus::Pending {
                    return Ok(false);
                }
                o.payment = *status;
                Ok(true)
            }
            // The simulator drives the actor core only, which never decides a saga's seats.
            WriteOp::SagaSeats(_) => Ok(false),
            // the simulated gateway keeps its books apart; none reach the simulated writer
            WriteOp::Barrier | WriteOp::Ledger(_) => Ok(true),
        }
    }

    fn ack(&mut self, waiter: Waiter, ok: bool) -> Checked {
        match waiter {
            Waiter::Nobody | Waiter::Duplicate => Ok(()),
            Waiter::Hold(purchase) => {
                if !ok {
                    // The store refused the hold: a 500, the buyer does not know.
                    self.answer(purchase, Seen::Unknown);
                    return Ok(());
                }
                self.purchases[purchase].charging = true;
                self.charge(purchase)
            }
            Waiter::Settled(purchase, settled) => {
                if !ok {
                    self.purchases[purchase].charging = false;
                    self.answer(purchase, Seen::Unknown);
                    return Ok(());
                }
                match settled {
                    Settled::Confirmed => {
                        self.purchases[purchase].charging = false;
                        self.answer(purchase, Seen::Success);
                    }
                    Settled::Released => {
                        self.purchases[purchase].charging = false;
                        self.answer(purchase, Seen::Failure);
                    }
                    Settled::Expired => self.refund(purchase, Waiter::Refunded(purchase))?,
                }
                Ok(())
            }
            Waiter::Refunded(purchase) => {
                self.purchases[purchase].charging = false;
                self.answer(purchase, if ok { Seen::Failure } else { Seen::Unknown });
                Ok(())
            }
        }
    }

    /// The gateway refunds the order's charge (if any) at once, and the stage records it.
    fn refund(&mut self, purchase: usize, waiter: Waiter) -> Checked {
        let order = self.purchases[purchase].order.expect("a charged order");
        self.refund_order(order)?;
        self.submit(
            WriteOp::SettlePayment {
                order,
                status: PaymentStatus::Refunded,
            },
            waiter,
        );
        Ok(())
    }

    fn refund_order(&mut self, order: OrderId) -> Checked {
        if self.gateway.net(order) > 0 {
            *self.gateway.refunds.entry(order).or_default() += 1;
        }
        self.check_charge(order)
    }

    /// The gateway's fate for a key, decided the first time it is asked.
    fn fate(&mut self, order: OrderId) -> PaymentResult {
        if let Some(result) = self.gateway.fate.get(&order) {
            return *result;
        }
        let result = if self.rng.gen_bool(0.15) {
            PaymentResult::Declined
        } else {
            PaymentResult::Approved
        };
        self.gateway.fate.insert(order, result);
        result
    }

    /// Asks the gateway to charge the purchase's key; it books the charge at once and
    /// answers after its latency, unless the call times out first.
    fn charge(&mut self, purchase: usize) -> Checked {
        let order = self.purchases[purchase].order.expect("a held order");
        let result = self.fate(order);
        if result == PaymentResult::Approved && !self.gateway.charges.contains_key(&order) {
            self.gateway.charges.insert(order, 1);
        }
        self.check_gateway_key(order)?;
        let latency = match self.rng.gen_range(0..100) {
            0..=69 => self.rng.gen_range(1..50),
            70..=89 => self.rng.gen_range(50..400),
            _ => self.rng.gen_range(400..2_500),
        };
        let call = self.purchases[purchase].call;
        if latency < CHARGE_TIMEOUT_MS {
            self.at(
                latency,
                Ev::ChargeAnswer {
                    purchase,
                    call,
                    duplicate: false,
                },
            );
        }
        self.at(CHARGE_TIMEOUT_MS, Ev::ChargeTimeout { purchase, call });
        Ok(())
    }

    fn settle(&mut self, purchase: usize, result: PaymentResult, duplicate: bool) -> Checked {
        let (event, order) = {
            let p = &self.purchases[purchase];
            (p.event, p.order.expect("a charged order"))
        };
        let input = Input::Settle { order, result };
        let Output::Settled { settled, write } = self.cores[event].step(input, self.now) else {
            unreachable!()
        };
        self.mix(0x200 + settled as u64);
        if !duplicate {
            match (settled, result) {
                (Settled::Expired, PaymentResult::Approved) => self.faults.late_successes += 1,
                (Settled::Released, _) => self.faults.declines += 1,
                _ => {}
            }
        }
        let waiter = if duplicate {
            Waiter::Duplicate
        } else {
            Waiter::Settled(purchase, settled)
        };
        match write {
            Some(op) => self.submit(op, waiter),
            None if duplicate => {
                if settled == Settled::Expired {
                    self.refund(purchase, Waiter::Duplicate)?;
                }
            }
            None => self.ack(waiter, true)?,
        }
        self.check_event(event)
    }

    fn crash(&mut self) -> Checked {
        if !self.up {
            return Ok(());
        }
        self.up = false;
        self.faults.crashes += 1;
        self.epoch += 1;
        self.writer.clear();
        self.committing = false;
        self.cores.clear();
        let mut reset = Vec::new();
        for p in &mut self.purchases {
            if p.epoch + 1 == self.epoch {
                p.charging = false;
                if p.seen == Seen::Waiting {
                    // The buyer saw its connection reset: it does not know, and tries again.
                    p.seen = Seen::Unknown;
                    reset.push(p.buyer);
                }
            }
        }
        for b in reset {
            self.retry(b);
        }
        let down = self.rng.gen_range(50..600);
        self.at(down, Ev::Restart);
        Ok(())
    }

    /// The stage's recovery: every payment left pending is asked again under its key, and
    /// settled by the answer; then each core is rebuilt from what was committed.
    fn restart(&mut self) -> Checked {
        let mut pending: Vec<(OrderId, Status)> = self
            .store
            .orders
            .iter()
            .filter(|(_, o)| o.payment == PaymentStatus::Pending)
            .map(|(id, o)| (*id, o.status))
            .collect();
        pending.sort_by_key(|(id, _)| *id);
        for (order, status) in pending {
            let result = self.fate(order);
            if result == PaymentResult::Approved && !self.gateway.charges.contains_key(&order) {
                self.gateway.charges.insert(order, 1);
            }
            self.check_gateway_key(order)?;
            let event = EventId(self.store.orders[&order].event as i64 + 1);
            let op = match (result, status == Status::Cancelled) {
                (PaymentResult::Approved, false) => WriteOp::Confirm { order },
                (PaymentResult::Declined, false) => WriteOp::Cancel {
                    order,
                    event,
                    reason: CancelReason::PaymentDeclined,
                    payment: Some(PaymentStatus::Failed),
                },
                (PaymentResult::Approved, true) => {
                    self.refund_order(order)?;
                    WriteOp::SettlePayment {
                        order,
                        status: PaymentStatus::Refunded,
                    }
                }
                (PaymentResult::Declined, true) => WriteOp::SettlePayment {
                    order,
                    status: PaymentStatus::Failed,
                },
            };
            self.apply(&op)?;
        }
        self.up = true;
        self.start_process();
        for e in 0..self.cores.len() {
            self.check_event(e)?;
        }
        Ok(())
    }

    /// I1 and I6 in the event's memory, and in its stored counts.
    fn check_event(&self, e: usize) -> Checked {
        if let Some(core) = self.cores.get(e) {
            let c = core.counts();
            if c.held + c.sold > c.total {
                return Err(self.violation(
                    "I1",
                    format!(
                        "event {}: held {} + sold {} > total {}",
                        e + 1,
                        c.held,
                        c.sold,
                        c.total
                    ),
                ));
            }
            if c.available + c.held + c.sold != c.total {
                return Err(self.violation("I6", format!("event {} in memory: {c:?}", e + 1)));
            }
        }
        self.check_stored_event(e)
    }

    fn check_stored_event(&self, e: usize) -> Checked {
        let ev = &self.store.events[e];
        if ev.confirmed + ev.pending > ev.total {
            return Err(self.violation(
                "I1",
                format!(
                    "event {} stored: confirmed {} + pending {} > total {}",
                    e + 1,
                    ev.confirmed,
                    ev.pending,
                    ev.total
                ),
            ));
        }
        if ev.available != ev.total - ev.confirmed - ev.pending || ev.available < 0 {
            return Err(self.violation(
                "I6",
                format!(
                    "event {} stored: available {} but total {} - confirmed {} - pending {}",
                    e + 1,
                    ev.available,
                    ev.total,
                    ev.confirmed,
                    ev.pending
                ),
            ));
        }
        Ok(())
    }

    /// I8 and I5 for one key: charged at most once, and only with a payment record.
    fn check_gateway_key(&self, order: OrderId) -> Checked {
        if self.gateway.charges.get(&order).copied().unwrap_or(0) > 1 {
            return Err(self.violation("I8", format!("order {order} charged twice")));
        }
        if self.gateway.charges.contains_key(&order) && !self.store.orders.contains_key(&order) {
            return Err(self.violation(
                "I5",
                format!("order {order} charged with no payment record"),
            ));
        }
        Ok(())
    }

    /// I3 for one key: never more than one net charge; a confirmed order has exactly one.
    fn check_charge(&self, order: OrderId) -> Checked {
        let net = self.gateway.net(order);
        if !(0..=1).contains(&net) {
            return Err(self.violation("I3", format!("order {order}: net charges {net}")));
        }
        if let Some(o) = self.store.orders.get(&order) {
            if o.status == Status::Confirmed && net != 1 {
                return Err(self.violation(
                    "I3",
                    format!("order {order} confirmed with net charges {net}"),
                ));
            }
        }
        Ok(())
    }

    /// Once quiet: I3 and I5 in full, I4, I6 memory against storage, I7.
    fn check_quiet(&self) -> Checked {
        let mut ids: Vec<&OrderId> = self.store.orders.keys().collect();
        ids.sort();
        for id in ids {
            let o = &self.store.orders[id];
            let net = self.gateway.net(*id);
            if o.status != Status::Confirmed && net != 0 {
                return Err(self.violation(
                    "I3",
                    format!("order {id} not confirmed keeps net charges {net}"),
                ));
            }
            if o.payment == PaymentStatus::Pending {
                return Err(self.violation(
                    "I5",
                    format!("order {id}: payment still pending when quiet"),
                ));
            }
            if o.status == Status::Pending {
                return Err(self.violation("I4", format!("order {id} still pending when quiet")));
            }
        }
        for (e, core) in self.cores.iter().enumerate() {
            let c = core.counts();
            let stored = &self.store.events[e];
            if c.held != 0 {
                return Err(self.violation(
                    "I4",
                    format!("event {}: {} seats held when quiet", e + 1, c.held),
                ));
            }
            if i64::from(c.available) != stored.available || i64::from(c.sold) != stored.confirmed {
                return Err(self.violation(
                    "I6",
                    format!(
                        "event {}: memory {c:?} but stored available {} confirmed {}",
                        e + 1,
                        stored.available,
                        stored.confirmed
                    ),
                ));
            }
        }
        for b in &self.buyers {
            if b.told_sold_out && self.store.events[b.event].available > 0 {
                return Err(self.violation(
                    "I4",
                    format!(
                        "{} was told event {} is sold out, yet {} seats are left",
                        b.user.as_str(),
                        b.event + 1,
                        self.store.events[b.event].available
                    ),
                ));
            }
        }
        for (i, p) in self.purchases.iter().enumerate() {
            let stored = p.order.and_then(|o| self.store.orders.get(&o));
            let confirmed = stored.is_some_and(|o| o.status == Status::Confirmed);
            let charged = p.order.is_some_and(|o| self.gateway.net(o) != 0);
            let wrong = match p.seen {
                Seen::Success => !confirmed,
                Seen::Failure => confirmed || charged,
                // exactly one of: confirmed (and charged), or nothing left
                Seen::Unknown => confirmed != charged,
                Seen::Waiting => true,
            };
            if wrong {
                return Err(self.violation(
                    "I7",
                    format!(
                        "purchase {i} ({} x{}) seen {:?}, stored confirmed {confirmed}, charged {charged}",
                        self.buyers[p.buyer].user.as_str(),
                        p.quantity,
                        p.seen
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn refusal_code(refusal: ReserveError) -> u64 {
    match refusal {
        ReserveError::SoldOut => 1,
        ReserveError::AllHeld => 2,
        ReserveError::NotEnough { .. } => 3,
        ReserveError::UserLimit { .. } => 4,
        ReserveError::DuplicateHold => 5,
        ReserveError::ZeroQuantity => 6,
    }
}

fn fnv1a_u64(hash: u64, value: u64) -> u64 {
    fnv1a_from(hash, &value.to_le_bytes())
}

fn fnv1a_from(start: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(start, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
