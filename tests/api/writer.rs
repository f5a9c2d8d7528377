//! The group-commit writer on PostgreSQL when its connection is lost, through a TCP proxy that
//! cuts the writer's connection at its `COMMIT`: just before it (nothing committed: the writer
//! must write the batch again) or just after it reached PostgreSQL (committed, answer lost:
//! the writer must find out, and not write it twice). Either way the write is answered `Ok`
//! and stored exactly once.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use ticketflow::config::Durability;
use ticketflow::domain::{timestamp, Money, NewEvent, OrderId, TicketId};
use ticketflow::store::{Catalog, NewOrder, Store, WriteOp};

use crate::backends::{Backend, TestDb};

/// Where the proxy cuts the next `COMMIT` it sees.
const OFF: u8 = 0;
const BEFORE_COMMIT: u8 = 1;
const AFTER_COMMIT: u8 = 2;

/// A proxy to the PostgreSQL the tests use; `trap` is armed with where to cut, and disarms
/// itself once it fired.
async fn proxy(upstream: String, trap: Arc<AtomicU8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            tokio::spawn(pipe(client, server, trap.clone()));
        }
    });
    port
}

async fn pipe(client: TcpStream, server: TcpStream, trap: Arc<AtomicU8>) {
    let (mut c_read, mut c_write) = client.into_split();
    let (mut s_read, mut s_write) = server.into_split();
    // set once this connection is cut: nothing more goes back to the client
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let back = {
        let cut = cut.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match s_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if cut.load(Ordering::SeqCst) || c_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = c_write.shutdown().await;
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match c_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        // sqlx commits with a simple query: 'Q', length, "COMMIT\0"
        let commits = chunk.windows(7).any(|w| w == b"COMMIT\0");
        let armed = trap.load(Ordering::SeqCst);
        if commits && armed != OFF {
            trap.store(OFF, Ordering::SeqCst);
            cut.store(true, Ordering::SeqCst);
            if armed == AFTER_COMMIT {
                let _ = s_write.write_all(chunk).await;
                // let PostgreSQL commit before the connection goes
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            break;
        }
        if s_write.write_all(chunk).await.is_err() {
            break;
        }
    }
    let _ = s_write.shutdown().await;
    back.abort();
}

async fn cut_at_commit(where_: u8) {
    let db = TestDb::new(Backend::Postgres);
    let upstream_url = db.url().to_owned();
    let authority = upstream_url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(a, _)| a.rsplit('@').next().unwrap().to_owned())
        .unwrap();
    let trap = Arc::new(AtomicU8::new(OFF));
    let port = proxy(authority.clone(), trap.clone()).await;
    let proxied = upstream_url.replace(&authority, &format!("127.0.0.1:{port}"));
    let store = Store::open(&proxied, Durability::Full).await.unwrap();
    let event = store
        .create_event(&NewEvent {
            name: "Cut".into(),
            venue: "Hall".into(),
            date: Utc::now(),
            total_tickets: 10,
            price: Money::from_cents(100).unwrap(),
        })
        .await
        .unwrap();
    let (writer, task) = store.start_writer(8, 8).await.unwrap();
    let order = OrderId(uuid::Uuid::new_v4());
    let hold = NewOrder {
        order,
        tickets: vec![TicketId(uuid::Uuid::new_v4())],
        event: event.id,
        user: "alice".into(),
        unit_price: Money::from_cents(100).unwrap(),
        idempotency: None,
        created_at: timestamp(Utc::now()),
    };
    trap.store(where_, Ordering::SeqCst);
    let written = tokio::time::timeout(
        Duration::from_secs(30),
        writer.submit(WriteOp::Hold(Box::new(hold))),
    )
    .await
    .expect("the write is answered once the writer has reconnected");
    assert_eq!(trap.load(Ordering::SeqCst), OFF, "the proxy cut the COMMIT");
    written.expect("the write is acknowledged, not refused");
    assert_eq!(writer.stats().reconnects.load(Ordering::Relaxed), 1);
    let id = order.to_string();
    assert_eq!(
        db.count(&format!("SELECT COUNT(*) FROM orders WHERE id = '{id}'"))
            .await,
        1,
        "the order is stored once"
    );
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM tickets WHERE order_id = '{id}'"
        ))
        .await,
        1
    );
    assert_eq!(
        db.count(&format!(
            "SELECT available_tickets FROM events WHERE id = {}",
            event.id.0
        ))
        .await,
        9,
        "one seat taken, not two"
    );
    drop(writer);
    task.await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn a_connection_lost_before_commit_is_written_again_once() {
    cut_at_commit(BEFORE_COMMIT).await;
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_found_committed_and_not_written_twice() {
    cut_at_commit(AFTER_COMMIT).await;
}
