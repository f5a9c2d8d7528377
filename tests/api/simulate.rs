//! The deterministic simulator: the same seed gives the same trace, a clean core passes, and
//! every planted bug is found and its failing seed replays to the same failure.

use std::process::Command;

use ticketflow::event_core::PlantedBug;
use ticketflow::sim::{run_seed, run_seeds, SimConfig};

fn config(planted: Option<PlantedBug>) -> SimConfig {
    SimConfig {
        events: 3,
        buyers: 24,
        planted,
    }
}

fn simulate(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ticketflow"))
        .arg("simulate")
        .args(args)
        .output()
        .expect("ticketflow runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn one_seed_run_twice_gives_the_same_trace_and_another_seed_another() {
    let first = run_seed(42, &config(None));
    let again = run_seed(42, &config(None));
    assert_eq!(first, again);
    assert!(first.steps > 100, "{first:?}");
    assert_ne!(run_seed(43, &config(None)).trace, first.trace);
}

#[test]
fn the_real_core_passes_every_seed_and_every_modelled_fault_happens() {
    let summary = run_seeds(1, 300, &config(None), false, |run, line| {
        assert!(run.violation.is_none(), "{line}");
    });
    assert_eq!(summary.failed, 0);
    let f = summary.faults;
    // the model still bites: each fault it claims to inject was injected
    for (name, n) in [
        ("crashes", f.crashes),
        ("late successes", f.late_successes),
        ("declines", f.declines),
        ("timeouts", f.timeouts),
        ("duplicate callbacks", f.duplicate_callbacks),
        ("hang-ups", f.hang_ups),
        ("limit refusals", f.limit_refusals),
    ] {
        assert!(n > 0, "no {name} in 300 seeds: {f:?}");
    }
}

#[test]
fn every_planted_bug_is_found_within_ten_thousand_seeds_and_its_seed_replays_the_failure() {
    for bug in PlantedBug::ALL {
        let config = config(Some(bug));
        let found = (1..=10_000u64)
            .map(|seed| run_seed(seed, &config))
            .find(|run| run.violation.is_some())
            .unwrap_or_else(|| panic!("{} not found in 10,000 seeds", bug.name()));
        let replay = run_seed(found.seed, &config);
        assert_eq!(replay, found, "{} did not replay", bug.name());
    }
}

#[test]
fn the_command_prints_a_trace_line_per_seed_and_a_summary_and_exits_by_the_outcome() {
    let (code, out, err) = simulate(&["--seeds", "5", "--seed-start", "10"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(lines[..5].iter().all(|l| l.contains(" trace ")), "{out}");
    assert!(lines[5].starts_with("simulated 5 seeds: 0 failed"), "{out}");
    assert!(lines[5].contains("wall time"), "{out}");

    let (code, out, _) = simulate(&["--seeds", "50", "--planted-bug", "expiry-not-written"]);
    assert_eq!(code, Some(1), "{out}");
    let (_, first, _) = simulate(&[
        "--seeds",
        "50",
        "--planted-bug",
        "expiry-not-written",
        "--stop-on-failure",
    ]);
    assert_eq!(first.lines().filter(|l| l.contains("FAILED")).count(), 1);
    assert!(first.lines().count() < 50, "did not stop: {first}");
    let failed = out
        .lines()
        .find(|l| l.contains("FAILED"))
        .expect("a failing seed");
    let replay = failed.split("replay: ticketflow simulate ").nth(1).unwrap();
    let (code, again, _) = simulate(&replay.split(' ').collect::<Vec<_>>());
    assert_eq!(code, Some(1));
    assert_eq!(again.lines().next().unwrap(), failed, "the replay differs");
}

#[test]
fn planted_bugs_are_listed_and_a_wrong_name_or_a_serve_flag_is_refused_with_exit_two() {
    let (code, out, _) = simulate(&["--list-planted-bugs"]);
    assert_eq!(code, Some(0));
    let names: Vec<&str> = PlantedBug::ALL.iter().map(|b| b.name()).collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), names);

    let (code, _, err) = simulate(&["--seeds", "1", "--planted-bug", "nope"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--planted-bug") && err.lines().count() == 1,
        "{err}"
    );
    let (code, _, err) = simulate(&["--seeds", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--seeds"), "{err}");

    // the server has no way to plant one
    let serve = Command::new(env!("CARGO_BIN_EXE_ticketflow"))
        .args(["serve", "--planted-bug", "expiry-not-written"])
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(2));
}
