//! Choosing the backend by URL, and the errors a user sees when a database cannot be used.

use std::process::Command;

use crate::backends::{Backend, TestDb};

/// Runs the real binary with `args`: its exit code and what it wrote to stderr.
fn ticketflow(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ticketflow"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "error")
        .output()
        .expect("the ticketflow binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_inventory_node_on_sqlite_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.db");
    let (code, stderr) = ticketflow(&[
        "node",
        "inventory",
        "--admin-token",
        "t",
        "--db",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("PostgreSQL only"), "{stderr}");
    assert!(!path.exists(), "a database was created before the refusal");
}

#[test]
fn a_node_without_the_deployments_admin_token_is_refused_in_one_line() {
    let (code, stderr) = ticketflow(&["node", "gateway", "--db", "postgres://x@127.0.0.1/y"]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--admin-token"), "{stderr}");
}

#[test]
fn an_unreachable_postgres_is_one_line_naming_db_and_the_fix() {
    let url = format!("postgres://postgres:s3cret@127.0.0.1:{}/x", closed_port());
    for command in [
        &["serve"][..],
        &["migrate"],
        &["node", "inventory", "--admin-token", "t"],
        &["serve", "--stage", "services"],
    ] {
        let (code, stderr) = ticketflow(&[command, &["--db", &url]].concat());
        let command = command.join(" ");
        assert_eq!(code, 2, "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command}: {stderr}");
        assert!(
            stderr.contains("--db postgres://postgres:***@127.0.0.1:"),
            "{stderr}"
        );
        assert!(stderr.contains("cannot reach PostgreSQL"), "{stderr}");
        assert!(stderr.contains("DATABASE_URL"), "{stderr}");
        assert!(!stderr.contains("s3cret"), "the password leaked: {stderr}");
    }
}

#[test]
fn a_login_postgres_refuses_is_one_line_naming_db() {
    let (code, stderr) = ticketflow(&[
        "migrate",
        "--db",
        "postgres://no_such_role_here@127.0.0.1:5432/postgres",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--db postgres://no_such_role_here@"),
        "{stderr}"
    );
    assert!(stderr.contains("no_such_role_here"), "{stderr}");
}

#[test]
fn a_url_of_another_database_is_refused() {
    let (code, stderr) = ticketflow(&["migrate", "--db", "mysql://root@127.0.0.1/x"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--db mysql://"), "{stderr}");
    assert!(stderr.contains("postgres://"), "{stderr}");
}

#[actix_web::test]
async fn the_monolith_refuses_postgres_with_the_reason_and_creates_nothing() {
    let db = TestDb::new(Backend::Postgres);
    let (code, stderr) = ticketflow(&["serve", "--stage", "monolith", "--db", db.url()]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--stage monolith runs on SQLite only"),
        "{stderr}"
    );
    assert!(
        !db.exists().await,
        "a database was created for a stage that refused it"
    );
}

#[actix_web::test]
async fn migrate_creates_the_postgres_database_and_its_schema() {
    let db = TestDb::new(Backend::Postgres);
    let (code, stderr) = ticketflow(&["migrate", "--db", db.url()]);
    assert_eq!(code, 0, "{stderr}");
    for table in [
        "events",
        "orders",
        "tickets",
        "payments",
        "users",
        "idempotency_keys",
    ] {
        let n = db
            .count(&format!(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = '{table}'"
            ))
            .await;
        assert_eq!(n, 1, "no table {table}");
    }
    // the CHECKs came along: a negative availability is refused by the database itself
    let refused = std::panic::AssertUnwindSafe(db.execute(&[
        "INSERT INTO events (name, venue, date, total_tickets, available_tickets, price_cents, created_at)
         VALUES ('x', 'y', '2026-12-31T20:00:00Z', 10, -1, 100, '2026-12-01T00:00:00Z')",
    ]));
    assert!(
        futures::FutureExt::catch_unwind(refused).await.is_err(),
        "PostgreSQL accepted available_tickets = -1"
    );
    // and migrating again is a no-op
    let (code, stderr) = ticketflow(&["migrate", "--db", db.url()]);
    assert_eq!(code, 0, "{stderr}");
}
