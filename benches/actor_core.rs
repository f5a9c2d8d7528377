//! SPEC §9 "Actor core": how many purchase decisions one event actor makes per second
//! in-process, beside a bare tokio mpsc + oneshot round trip driven the same way.
//!
//! Every benchmark in the `actor_core` group counts decisions (one message answered: a reserve
//! or a confirm), so their throughputs compare directly:
//! - `mpsc_oneshot_round_trip`: the floor. A task on its own thread answers requests that come
//!   through a bounded tokio mpsc, each carrying a oneshot for the reply. Two round trips per
//!   iteration, to match a purchase.
//! - `event_actor_reserve`: the purchase decision alone. The real [`EventActor`] on its own
//!   arbiter, admitted through its [`MailboxGauge`] and sent through its [`Mailbox`] as the
//!   actor stage does, answers `Reserve` on a oneshot. Holds pile up, so every sample gets a
//!   fresh actor (on a fresh arbiter) with just enough seats; starting it is not timed.
//! - `event_actor_reserve_confirm`: the real [`EventActor`] on its own arbiter, admitted through
//!   its [`MailboxGauge`] as the actor stage does: `Reserve`, then `Settle { Approved }`, both
//!   through its [`Mailbox`] and answered on oneshots. Its writes go to a writer that
//!   acknowledges without storing, so the actor pays for queueing each write but no I/O; the
//!   buyers do not wait for those acknowledgements. Like the stage, the buyers borrow the
//!   actor's [`Mailbox`] rather than cloning it per purchase.
//! - `inventory_reserve_confirm`: the pure [`Inventory`] alone, no messages at all.
//!
//! Buyers run on the benchmark's thread, `BUYERS` of them in flight at once; the answering side
//! (the actor, or the bare task) runs on one other thread. Sized for a 2-core machine.
//!
//! `cargo bench --bench actor_core -- --warm-up-time 1 --measurement-time 3`

use std::time::{Duration, Instant};

use actix::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use ticketflow::domain::{EventId, Money, OrderId, UserId};
use ticketflow::inventory::Inventory;
use ticketflow::stages::event_actor::{
    EventActor, Mailbox, MailboxGauge, PaymentResult, Reserve, Settle, Settlement,
};
use ticketflow::store::{writer, WriteHandle};

/// Purchases in flight at once; enough to keep the answering thread busy.
/// An order's placing time, as the stage formats it before sending `Reserve`.
const CREATED_AT: &str = "2026-11-24T12:00:00.000Z";

const BUYERS: usize = 256;
/// Bounds both sides alike: the actor's mailbox and gauge, and the bare mpsc channel.
const MAILBOX_CAPACITY: usize = 1024;
/// Seats enough that no run sells out (every benchmark decision is a successful one).
const SEATS: u32 = u32::MAX;
/// Long enough that no hold expires during a run.
const HOLD_TTL: Duration = Duration::from_secs(3600);

/// Runs `iters` purchases spread over `BUYERS` concurrent buyers; returns the elapsed time.
async fn drive<F, Fut>(iters: u64, purchase: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let per_buyer = iters / BUYERS as u64;
    let extra = iters % BUYERS as u64;
    let start = Instant::now();
    join_all((0..BUYERS as u64).map(|buyer| {
        let count = per_buyer + u64::from(buyer < extra);
        let purchase = &purchase;
        async move {
            for _ in 0..count {
                purchase().await;
            }
        }
    }))
    .await;
    start.elapsed()
}

/// Starts an event actor with `seats` free seats on `host`; returns its purchase path.
fn start_actor(host: &Arbiter, seats: u32, writer: WriteHandle, queued: MailboxGauge) -> Mailbox {
    let actor = EventActor::new(
        EventId(1),
        Money::from_cents(2_500).expect("a valid price"),
        Inventory::new(seats, seats, HOLD_TTL.as_millis() as u64),
        writer,
        42,
        0,
        HOLD_TTL,
        queued,
    );
    let mailbox = actor.mailbox();
    EventActor::start_in_arbiter(&host.handle(), move |ctx| {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        actor
    });
    mailbox
}

fn actor_core(c: &mut Criterion) {
    let system = actix_rt::System::new();
    // The answering side's thread: hosts the bare task, then the event actor.
    let server = Arbiter::new();

    let mut group = c.benchmark_group("actor_core");
    group.throughput(Throughput::Elements(2));

    // (b) The floor: a bounded mpsc of requests, each answered on its own oneshot.
    let (requests, mut inbox) = mpsc::channel::<(u64, oneshot::Sender<u64>)>(MAILBOX_CAPACITY);
    server.spawn(async move {
        while let Some((n, reply)) = inbox.recv().await {
            let _ = reply.send(n + 1);
        }
    });
    let round_trip = |n: u64| {
        let requests = requests.clone();
        async move {
            let (reply, answer) = oneshot::channel();
            requests
                .try_send((n, reply))
                .unwrap_or_else(|_| panic!("bare channel full"));
            answer.await.expect("bare server answers")
        }
    };
    group.bench_function("mpsc_oneshot_round_trip", |b| {
        b.iter_custom(|iters| {
            system.block_on(drive(iters, || async {
                let n = round_trip(1).await;
                std::hint::black_box(round_trip(n).await);
            }))
        })
    });
    drop(requests);

    // (a) The real event actor, with a writer that acknowledges without storing.
    let (write_handle, _writer_task) =
        system.block_on(async { writer::start_acknowledging(512, MAILBOX_CAPACITY) });
    let user = UserId::parse("bench-buyer").expect("a valid user id");

    group.throughput(Throughput::Elements(1));
    group.bench_function("event_actor_reserve", |b| {
        b.iter_custom(|iters| {
            // Stopping the arbiter is the only way to stop the actor (its expiry timer keeps
            // it alive), and frees the holds this sample piled up.
            let host = Arbiter::new();
            let seats = u32::try_from(iters).expect("fewer than 2^32 reservations per sample");
            let queued = MailboxGauge::default();
            let mailbox = start_actor(&host, seats, write_handle.clone(), queued.clone());
            let (mailbox, queued, user) = (&mailbox, &queued, &user);
            let elapsed = system.block_on(drive(iters, || {
                let user = user.clone();
                async move {
                    assert!(queued.try_admit(MAILBOX_CAPACITY), "event mailbox full");
                    let (reply, answer) = oneshot::channel();
                    mailbox.reserve(Reserve {
                        user,
                        quantity: 1,
                        per_user_limit: None,
                        idempotency: None,
                        order: None,
                        // the stage formats this on the buyer's side, not the actor's
                        created_at: CREATED_AT.to_owned(),
                        reply,
                    });
                    match answer.await.expect("the actor answers") {
                        Ok(grant) => {
                            std::hint::black_box(grant.order);
                        }
                        Err(refusal) => panic!("reservation refused: {refusal:?}"),
                    }
                }
            }));
            host.stop();
            host.join().expect("the arbiter stops");
            elapsed
        })
    });

    group.throughput(Throughput::Elements(2));
    let queued = MailboxGauge::default();
    let mailbox = start_actor(&server, SEATS, write_handle, queued.clone());
    let (mailbox, queued, buyer) = (&mailbox, &queued, &user);
    let purchase = || {
        let user = buyer.clone();
        async move {
            // Admission as the actor stage does it: the gauge is the bound.
            assert!(queued.try_admit(MAILBOX_CAPACITY), "event mailbox full");
            let (reply, answer) = oneshot::channel();
            mailbox.reserve(Reserve {
                user,
                quantity: 1,
                per_user_limit: None,
                idempotency: None,
                order: None,
                created_at: CREATED_AT.to_owned(),
                reply,
            });
            let grant = match answer.await.expect("the actor answers") {
                Ok(grant) => grant,
                Err(refusal) => panic!("reservation refused: {refusal:?}"),
            };
            let settled = mailbox
                .settle(Settle {
                    order: grant.order,
                    result: PaymentResult::Approved,
                })
                .await
                .expect("the actor answers");
            assert!(matches!(settled, Settlement::Confirmed(_)), "not confirmed");
        }
    };
    group.bench_function("event_actor_reserve_confirm", |b| {
        b.iter_custom(|iters| system.block_on(drive(iters, purchase)))
    });

    // (c) The pure core alone.
    let mut inventory: Inventory<OrderId, UserId> =
        Inventory::new(SEATS, SEATS, HOLD_TTL.as_millis() as u64);
    let mut next_order = 0u128;
    group.bench_function("inventory_reserve_confirm", |b| {
        b.iter(|| {
            next_order += 1;
            let order = OrderId(Uuid::from_u128(next_order));
            let now = 1;
            inventory
                .reserve(order, user.clone(), 1, now)
                .expect("a seat is free");
            std::hint::black_box(inventory.confirm(order, now).expect("the hold is live"));
        })
    });
    group.finish();

    server.stop();
    System::current().stop();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = actor_core
}
criterion_main!(benches);
