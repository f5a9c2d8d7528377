//! SPEC §9 "Durability": group commit against one transaction per purchase, at full durability
//! on both backends: SQLite in WAL with `synchronous=FULL` (every commit is fsynced), and
//! PostgreSQL with `synchronous_commit = on` (every commit waits for its WAL flush).
//!
//! Each iteration creates a fresh event of `PURCHASES` seats (untimed), then times `PURCHASES`
//! concurrent purchases through the real group-commit writer: each purchase queues the `Hold` of
//! a new one-ticket order, waits until it is committed, then queues its `Confirm` and waits
//! again, as the actor stage does. `max_batch = 512` lets one transaction carry every write that
//! is waiting; `max_batch = 1` commits each write alone. Throughput counts purchases.
//!
//! The SQLite database lives in a temporary directory on the default temp filesystem (`TMPDIR`);
//! on a RAM-backed filesystem fsync is free and the comparison says nothing. The PostgreSQL one
//! is a fresh database on the server `TICKETFLOW_BENCH_POSTGRES_URL` names (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped afterwards; if that server does not
//! answer, the PostgreSQL rows are skipped with a message saying so.
//!
//! `cargo bench --bench group_commit -- --warm-up-time 1 --measurement-time 3`

use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use futures::future::join_all;
use uuid::Uuid;

use ticketflow::config::Durability;
use ticketflow::domain::{timestamp, EventId, Money, NewEvent, OrderId, TicketId};
use ticketflow::store::{Catalog, DatabaseUrl, NewOrder, Store, WriteHandle, WriteOp};

/// Purchases in flight at once, each a new one-ticket order for the same event.
const PURCHASES: usize = 256;
/// Room in the writer's queue for every purchase in flight.
const WRITER_CAPACITY: usize = 1024;

async fn purchase(writer: &WriteHandle, event: EventId, price: Money) {
    let order = OrderId(Uuid::new_v4());
    writer
        .submit(WriteOp::Hold(Box::new(NewOrder {
            order,
            tickets: vec![TicketId(Uuid::new_v4())],
            event,
            user: "bench-buyer".to_owned(),
            unit_price: price,
            idempotency: None,
            created_at: timestamp(Utc::now()),
        })))
        .await
        .expect("hold committed");
    writer
        .submit(WriteOp::Confirm { order })
        .await
        .expect("confirm committed");
}

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sqlite = dir.path().join("group_commit.db");
    bench_backend(
        c,
        &runtime,
        "sqlite",
        sqlite.to_str().expect("a UTF-8 path"),
    );

    let server = std::env::var("TICKETFLOW_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let (base, _) = server.rsplit_once('/').expect("a postgres://…/DB URL");
    let postgres = format!("{base}/tf_bench_{}", Uuid::new_v4().simple());
    bench_backend(c, &runtime, "postgres", &postgres);
    let dropped = DatabaseUrl::parse(&postgres, Durability::Full)
        .map(|url| runtime.block_on(url.drop_database()));
    if let Ok(Err(error)) | Err(error) = dropped {
        eprintln!("could not drop the bench database {postgres}: {error}");
    }
}

fn bench_backend(c: &mut Criterion, runtime: &tokio::runtime::Runtime, name: &str, url: &str) {
    let store = match runtime.block_on(Store::open(url, Durability::Full)) {
        Ok(store) => store,
        Err(error) => {
            eprintln!("group_commit/{name}: SKIPPED, the database cannot be opened: {error}");
            return;
        }
    };
    let price = Money::from_cents(2_500).expect("a valid price");
    let new_event = NewEvent {
        name: "Group commit bench".to_owned(),
        venue: "Nowhere".to_owned(),
        date: Utc::now() + chrono::Duration::days(30),
        total_tickets: PURCHASES as u32,
        price,
    };

    let mut group = c.benchmark_group(format!("group_commit/{name}"));
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(PURCHASES as u64));
    for max_batch in [512, 1] {
        let (writer, task) = runtime
            .block_on(store.start_writer(max_batch, WRITER_CAPACITY))
            .expect("the writer starts");
        group.bench_with_input(
            BenchmarkId::new("max_batch", max_batch),
            &max_batch,
            |b, _| {
                b.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut elapsed = Duration::ZERO;
                        for _ in 0..iters {
                            let event = store.create_event(&new_event).await.expect("an event");
                            let start = Instant::now();
                            join_all((0..PURCHASES).map(|_| purchase(&writer, event.id, price)))
                                .await;
                            elapsed += start.elapsed();
                        }
                        elapsed
                    })
                })
            },
        );
        drop(writer);
        runtime.block_on(task).expect("the writer stops cleanly");
    }
    group.finish();
    runtime.block_on(store.close());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = group_commit
}
criterion_main!(benches);
