//! `loadgen bench --quick`: the CI smoke test of the SPEC §9 figures. It asserts that every
//! figure was measured, in the table, the JSON and the HTML, and never a speed. wrk's two
//! figures are measured when wrk is on the PATH and left out on purpose when it is not.
//!
//! Like `tests/loadgen.rs`, it starts the workspace's `ticketflow` binary (built by
//! `cargo test --workspace`; with `-p loadgen` build it first or set `LOADGEN_SERVER_BIN`), and
//! needs Redis at `REDIS_URL` (default 127.0.0.1:6379) for the `locked` run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// One bench at a time: each starts eight servers, and the quick one must fit in a minute.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `loadgen bench ARGS`: its output, and how long it took (not counting the wait for
/// another test's bench).
fn bench(args: &[&str]) -> (Output, Duration) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("bench")
        .args(args)
        .env("LOADGEN_SERVER_BIN", server_bin())
        .stdin(Stdio::null())
        .output()
        .expect("loadgen runs");
    (out, started.elapsed())
}

const KEYS: [&str; 14] = [
    "health-rps",
    "v1-hot-rps",
    "v2-hot-rps",
    "v1-to-health",
    "v2-to-health",
    "p99-at-half-load",
    "actor-confirmed-per-s",
    "locked-confirmed-per-s",
    "actor-to-locked",
    "full-batched-rps",
    "full-batch-1-rps",
    "group-commit-ratio",
    "wrk-health-rps",
    "loadgen-to-wrk",
];

fn wrk_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("wrk").is_file()))
}

#[test]
fn quick_bench_measures_every_figure_and_writes_the_table_json_and_html() {
    let dir = tempfile::tempdir().unwrap();
    let (json, html) = (dir.path().join("bench.json"), dir.path().join("bench.html"));
    let (out, took) = bench(&[
        "--quick",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(60),
        "--quick took {took:?}, over its minute"
    );
    assert!(stdout.starts_with("loadgen bench --quick"), "{stdout}");
    assert!(stdout.contains("result: every figure measured"), "{stdout}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["schema"], "loadgen-bench-1");
    assert_eq!(report["complete"], true);
    let figures = report["figures"].as_array().unwrap();
    let keys: Vec<&str> = figures.iter().map(|f| f["key"].as_str().unwrap()).collect();
    assert_eq!(keys, KEYS);
    let wrk = wrk_installed();
    for f in figures {
        let key = f["key"].as_str().unwrap();
        let is_wrk = key.contains("wrk");
        if is_wrk && !wrk {
            assert_eq!(f["optionalMissing"], true, "{f}");
            assert!(f["value"].is_null(), "{f}");
            continue;
        }
        let value = f["value"]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} not measured: {f}"));
        assert!(value.is_finite() && value > 0.0, "{key}: {value}");
        // the table shows each figure by name, with no `not measured`
        let name = f["name"].as_str().unwrap();
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("{name} is not in the table:\n{stdout}"));
        assert!(!line.contains("not measured"), "{line}");
    }
    // the runs behind the figures: every stage started fresh, audited clean
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8, "{runs:?}");
    for r in runs {
        assert_eq!(r["run"]["status"], "completed", "{}", r["name"]);
        assert_eq!(r["run"]["audit"]["ok"], true, "{}", r["name"]);
    }
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!doctype html>"));
    for f in figures {
        assert!(page.contains(f["name"].as_str().unwrap()), "{}", f["name"]);
    }
}

#[test]
fn a_figure_that_cannot_be_measured_fails_the_bench_with_its_reason() {
    // Redis that does not answer: `locked` cannot start, so its figure and the ratio over it
    // are not measured, and the exit status says so (4) while the rest is still measured.
    let (out, _) = bench(&["--quick", "--quiet", "--redis-url", "redis://127.0.0.1:1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{stdout}"))
            .to_owned()
    };
    assert!(
        line("stampede: locked").contains("not measured"),
        "{stdout}"
    );
    assert!(line("actor / locked").contains("not measured"), "{stdout}");
    assert!(!line("GET /health").contains("not measured"), "{stdout}");
    assert!(
        stdout.contains("result: NOT every figure was measured"),
        "{stdout}"
    );
}

#[test]
fn an_output_in_a_missing_directory_is_one_line_and_exit_2_before_any_run() {
    let (out, _) = bench(&["--quick", "--json", "/nonexistent-dir/bench.json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent-dir"), "{stderr}");
    assert!(out.stdout.is_empty());
}
