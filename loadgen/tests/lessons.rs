//! `loadgen lesson`: every lesson's `--quick` form against real servers, which exits 0 only
//! when the break appears and the fix holds; the list, an unknown name, a missing Redis, and the HTML page.
//!
//! Like `tests/loadgen.rs`, these start the workspace's `ticketflow` binary (built by
//! `cargo test --workspace`; with `-p loadgen` build it first or set `LOADGEN_SERVER_BIN`).
//! `lease` needs Redis at `REDIS_URL` (default 127.0.0.1:6379) and fails without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LOADGEN_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_BIN_EXE_loadgen")).parent().unwrap();
    let bin = dir.join(format!("ticketflow{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo test --workspace` or `cargo build -p ticketflow` first",
        bin.display()
    );
    bin
}

fn lesson(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("lesson")
        .args(args)
        .env("LOADGEN_SERVER_BIN", server_bin())
        .stdin(Stdio::null())
        .output()
        .expect("loadgen runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a lesson's quick form and checks it showed what it claims, with both numbers printed.
fn shows(name: &str) -> String {
    let out = lesson(&[name, "--quick"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "lesson {name}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.starts_with(&format!("lesson {name} (quick):")),
        "{stdout}"
    );
    for line in [
        "measured: ",
        "  breaks on ",
        "  fixed on  ",
        "why: ",
        "result: shown",
    ] {
        assert!(stdout.contains(line), "{name}: no `{line}` in\n{stdout}");
    }
    stdout
}

#[test]
fn race_quick_shows_the_oversell_on_monolith_and_none_on_actor() {
    let out = shows("race");
    assert!(out.contains("breaks on monolith@sqlite"), "{out}");
    assert!(out.contains("fixed on  actor@sqlite     0 "), "{out}");
}

#[test]
fn double_sale_quick_shows_i2() {
    let out = shows("double-sale");
    assert!(out.contains("I2 double sale"), "{out}");
}

#[test]
fn lost_update_quick_shows_the_counter_drifting() {
    let out = shows("lost-update");
    assert!(out.contains("0 seats of drift"), "{out}");
}

#[test]
fn slow_payment_quick_shows_v1_waiting_and_v2_answering_at_once() {
    let out = shows("slow-payment");
    assert!(
        out.contains("(API v1)") && out.contains("(API v2)"),
        "{out}"
    );
}

#[test]
fn payment_failure_quick_shows_pending_for_ever_against_recovered() {
    let out = shows("payment-failure");
    assert!(
        out.contains("fixed on  actor@sqlite     0 tickets still pending"),
        "{out}"
    );
}

#[test]
fn lease_quick_shows_the_double_sale_without_fencing_and_none_with_it() {
    let out = shows("lease");
    assert!(out.contains("2 buyers sold the one seat"), "{out}");
    assert!(out.contains("1 buyers sold the one seat"), "{out}");
}

#[test]
fn single_writer_quick_shows_two_processes_on_one_file_losing_purchases() {
    let out = shows("single-writer");
    assert!(
        out.contains("fixed on  1 × actor@sqlite             0 purchases failed"),
        "{out}"
    );
    assert!(out.contains("2 × actor@postgres"), "{out}");
    assert!(
        out.contains("services (3 inventory nodes, 1 payments node), one database: 0 purchases failed (5xx or no answer), 0 left pending"),
        "{out}"
    );
}

#[test]
fn db_locks_quick_shows_the_transaction_failing_purchases_and_overselling_none() {
    let out = shows("db-locks");
    assert!(out.contains("--purchase-transaction"), "{out}");
    assert!(
        out.contains("oversold (I1): 0 with the transaction"),
        "{out}"
    );
}

#[test]
fn failover_quick_shows_the_one_process_down_and_the_shards_moving() {
    let out = shows("failover");
    assert!(out.contains("breaks on actor@postgres"), "{out}");
    assert!(
        out.contains("fixed on  services        0 purchases after the kill failed"),
        "{out}"
    );
    assert!(out.contains("confirmed in PostgreSQL; audit ok"), "{out}");
}

#[test]
fn compensation_quick_shows_each_declined_order_undone_in_its_saga_log() {
    let out = shows("compensation");
    assert!(out.contains("breaks on actor@sqlite"), "{out}");
    assert!(out.contains("fixed on  saga@postgres  0 of "), "{out}");
    assert!(
        out.contains(
            "SeatsHeld → ChargeRequested → PaymentDeclined → ReleaseRequested → SeatsReleased"
        ),
        "{out}"
    );
    assert!(out.contains("audit ok"), "{out}");
}

#[test]
fn the_list_names_every_lesson() {
    let out = lesson(&[]);
    assert_eq!(out.status.code(), Some(0));
    let (stdout, _) = text(&out);
    for name in [
        "race",
        "double-sale",
        "lost-update",
        "slow-payment",
        "payment-failure",
        "db-locks",
        "single-writer",
        "lease",
        "failover",
        "compensation",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing from\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("not available"),
        "every lesson runs now:\n{stdout}"
    );
}

#[test]
fn an_unknown_lesson_is_a_usage_error_naming_the_known_ones() {
    let out = lesson(&["no-such-lesson"]);
    assert_eq!(out.status.code(), Some(2));
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("no-such-lesson") && stderr.contains("race"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn a_missing_redis_is_its_own_exit_code_never_a_pass() {
    // Port 1: nothing listens there, and no other test can take it meanwhile (a port freed
    // by a closed listener was once taken by another test between the check and the start).
    let out = lesson(&["lease", "--quick", "--redis-url", "redis://127.0.0.1:1"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout}{stderr}");
    assert!(stderr.contains("Redis does not answer"), "{stderr}");
    assert!(!stdout.contains("result: shown"), "{stdout}");
}

#[test]
fn html_writes_a_self_contained_page_with_both_numbers_and_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("race.html");
    let out = lesson(&["race", "--quick", "--html", page.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let html = std::fs::read_to_string(&page).expect("the page was written");
    assert!(html.contains("<h1>lesson race"), "a heading");
    assert!(html.contains("monolith@sqlite") && html.contains("actor@sqlite"));
    assert!(html.contains("<svg"), "charts inline");
    for fetch in ["<script src", "<link", "<img", "url("] {
        assert!(!html.contains(fetch), "fetches something: {fetch}");
    }
}
