//! The report: one document for `run` and `compare` (a run per stage), written as a terminal
//! table, JSON (schema `loadgen/schema/report-v1.schema.json`), Markdown and HTML.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::audit::Audit;
use crate::backend::{self, Backend};
use crate::driver::{self, BuyerEnd, Outcome};
use crate::metrics::{LatencySummary, Timeline};
use crate::scenario::{ModelKind, Settings};

/// Version of the JSON report's shape; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub schema_version: u32,
    pub tool: String,
    /// `run` or `compare`.
    pub command: &'static str,
    pub started_at: String,
    pub seed: u64,
    pub settings: Settings,
    pub runs: Vec<RunReport>,
    pub thresholds: Vec<ThresholdResult>,
    /// True when every threshold held (and at least one run completed).
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// The stage's name; for `--target`, the stage its `/health` names, else `external`.
    pub stage: String,
    /// The storage it ran on: `sqlite` or `postgres`; for `--target`, the one its `/health`
    /// names, else null.
    pub backend: Option<Backend>,
    /// `completed` or `skipped`.
    pub status: &'static str,
    pub skip_reason: Option<String>,
    pub target: Option<String>,
    /// The server's command line when the load generator started it.
    pub server_args: Option<Vec<String>>,
    pub results: Option<Results>,
    pub audit: Option<Audit>,
    /// `--chaos`: the faults injected during the load (null without `--chaos`).
    pub chaos: Option<crate::chaos::ChaosReport>,
}

impl RunReport {
    /// `STAGE@BACKEND` (the bare stage when the backend is not known): the run's name in
    /// every table, chart and line.
    pub fn label(&self) -> String {
        backend::label(&self.stage, self.backend)
    }
}

impl ThresholdResult {
    pub fn label(&self) -> String {
        backend::label(&self.stage, self.backend)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Results {
    pub elapsed_s: f64,
    /// Time the figures cover (warm-up excluded).
    pub measured_s: f64,
    pub iterations: u64,
    pub measured_iterations: u64,
    /// HTTP requests measured, and requests per second over the measured time.
    pub requests: u64,
    pub achieved_rps: f64,
    /// Iterations (arrivals) per second over the measured time; compare with `offeredRps`.
    pub achieved_iterations_per_s: f64,
    /// Open model: arrivals per second asked for.
    pub offered_rps: Option<f64>,
    /// Open model: arrivals that started more than 5 ms after their intended time.
    pub late: u64,
    /// Open model: arrivals not sent because they could not start within `maxLagMs`.
    pub dropped: u64,
    /// Requests with no HTTP answer or a 5xx.
    pub errors: u64,
    /// CPU seconds the load generator used during the load, and that as a share of the cores
    /// its worker threads could use (near 100 % means loadgen may be the bottleneck).
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_pct: f64,
    /// Latency per operation, from the intended send time.
    pub latency: BTreeMap<String, LatencySummary>,
    /// Answers per operation: `"201"`, `"400 sold-out"`, `"timeout"`, ...
    pub statuses: BTreeMap<String, BTreeMap<String, u64>>,
    pub purchases: Option<Purchases>,
    /// Second by second: requests, the main operation's p99, tickets confirmed so far.
    pub timeline: Option<Timeline>,
}

/// Buyers' stories.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Purchases {
    pub buyers: u64,
    pub confirmed: u64,
    pub sold_out: u64,
    pub gave_up: u64,
    pub attempts: u64,
    /// What "reservation latency" and "time to confirmed" mean against this API.
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ThresholdResult {
    pub name: String,
    pub stage: String,
    pub backend: Option<Backend>,
    pub limit: f64,
    pub actual: Option<f64>,
    pub passed: bool,
}

pub const PURCHASE_NOTE: &str = "API v1 answers a purchase only once it is confirmed (or failed), \
    so the reservation is not observable apart: `purchase` is each attempt's latency (reservation \
    and payment together) and `purchase-to-confirmed` is a buyer's arrival to its 201, retries \
    and back-off included.";

/// API v2 (`retry-storm`): orders are answered `202` once the seats are held.
pub const ORDER_NOTE: &str = "API v2 answers an order `202 Accepted` once its seats are held: \
    `order` is each POST /api/v2/orders (resends with the same Idempotency-Key included), \
    `order-reserved` the buyer's first send to its first 202 (the reservation latency), and \
    `order-to-confirmed` is a buyer's arrival to its \
    order polled `confirmed` (user creation, resends and polling included).";

fn purchase_note(settings: &Settings) -> &'static str {
    match settings.api {
        crate::scenario::ApiVersion::V2 => ORDER_NOTE,
        crate::scenario::ApiVersion::V1 => PURCHASE_NOTE,
    }
}

impl Results {
    pub fn from_outcome(outcome: &Outcome, settings: &Settings) -> Self {
        let r = &outcome.recorder;
        let measured_s = outcome.measured_elapsed.as_secs_f64();
        let mut statuses: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for ((op, label), n) in &r.outcomes {
            statuses
                .entry(op.to_string())
                .or_default()
                .insert(label.clone(), *n);
        }
        let purchases = settings.scenario.buys().then(|| {
            let count = |end| outcome.buyers.iter().filter(|b| b.end == end).count() as u64;
            Purchases {
                buyers: outcome.buyers.len() as u64,
                confirmed: count(BuyerEnd::Confirmed),
                sold_out: count(BuyerEnd::SoldOut),
                gave_up: count(BuyerEnd::GaveUp),
                attempts: r
                    .latency
                    .get(driver::OP_PURCHASE)
                    .or(r.latency.get(driver::OP_ORDER))
                    .map_or(0, |h| h.len()),
                note: purchase_note(settings).into(),
            }
        });
        Self {
            elapsed_s: round3(outcome.elapsed.as_secs_f64()),
            measured_s: round3(measured_s),
            iterations: outcome.iterations,
            measured_iterations: outcome.measured_iterations,
            requests: r.requests,
            achieved_rps: round1(if measured_s > 0.0 {
                r.requests as f64 / measured_s
            } else {
                0.0
            }),
            achieved_iterations_per_s: round1(if measured_s > 0.0 {
                outcome.measured_iterations as f64 / measured_s
            } else {
                0.0
            }),
            offered_rps: match settings.model {
                ModelKind::Open => settings.rate,
                ModelKind::Closed => None,
            },
            late: outcome.late,
            dropped: outcome.dropped,
            errors: r.errors,
            loadgen_cpu_s: round3(outcome.cpu.as_secs_f64()),
            loadgen_cpu_pct: round1({
                let cores = settings
                    .threads
                    .min(std::thread::available_parallelism().map_or(settings.threads, |n| n.get()))
                    as f64;
                let wall = outcome.elapsed.as_secs_f64() * cores;
                if wall > 0.0 {
                    100.0 * outcome.cpu.as_secs_f64() / wall
                } else {
                    0.0
                }
            }),
            latency: r
                .latency
                .iter()
                .map(|(op, h)| (op.to_string(), LatencySummary::of(h)))
                .collect(),
            statuses,
            purchases,
            timeline: [driver::OP_PURCHASE, driver::OP_ORDER]
                .into_iter()
                .find(|op| r.latency.contains_key(op))
                .or_else(|| r.latency.keys().next().copied())
                .and_then(|op| Timeline::of(r, op)),
        }
    }

    /// The operation a scenario is about: purchases if any, else the first one measured.
    pub fn primary_op(&self) -> Option<&str> {
        for op in [driver::OP_PURCHASE, driver::OP_ORDER] {
            if self.latency.contains_key(op) {
                return Some(op);
            }
        }
        self.latency.keys().next().map(String::as_str)
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Rows of the side-by-side table: a label and one cell per run.
pub fn table_rows(report: &Report) -> Vec<(String, Vec<String>)> {
    let runs = &report.runs;
    let mut rows: Vec<(String, Vec<String>)> = vec![];
    let mut row = |label: &str, f: &dyn Fn(&RunReport) -> String| {
        rows.push((label.to_owned(), runs.iter().map(f).collect()));
    };
    row("status", &|r| match &r.skip_reason {
        Some(why) => format!("skipped: {why}"),
        None => r.status.to_owned(),
    });
    let res = |r: &RunReport| r.results.clone();
    row("iterations (measured)", &|r| {
        res(r).map_or("-".into(), |x| x.measured_iterations.to_string())
    });
    row("requests", &|r| {
        res(r).map_or("-".into(), |x| x.requests.to_string())
    });
    row("throughput (req/s)", &|r| {
        res(r).map_or("-".into(), |x| format!("{:.1}", x.achieved_rps))
    });
    if report.settings.model == ModelKind::Open {
        row("arrivals/s offered / achieved", &|r| {
            res(r).map_or("-".into(), |x| {
                format!(
                    "{:.1} / {:.1}",
                    x.offered_rps.unwrap_or(0.0),
                    x.achieved_iterations_per_s
                )
            })
        });
        row("late / dropped", &|r| {
            res(r).map_or("-".into(), |x| format!("{} / {}", x.late, x.dropped))
        });
    }
    row("errors (no answer or 5xx)", &|r| {
        res(r).map_or("-".into(), |x| x.errors.to_string())
    });
    row("loadgen CPU (s, % of its cores)", &|r| {
        res(r).map_or("-".into(), |x| {
            format!("{:.2} s, {:.0} %", x.loadgen_cpu_s, x.loadgen_cpu_pct)
        })
    });
    let ops: Vec<String> = {
        let mut ops: Vec<String> = runs
            .iter()
            .filter_map(|r| r.results.as_ref())
            .flat_map(|x| x.latency.keys().cloned())
            .collect();
        ops.sort();
        ops.dedup();
        ops
    };
    for op in &ops {
        row(&format!("{op} p50 / p90 / p99 (ms)"), &|r| {
            res(r)
                .and_then(|x| x.latency.get(op).cloned())
                .map_or("-".into(), |l| {
                    format!("{} / {} / {}", ms(l.p50_ms), ms(l.p90_ms), ms(l.p99_ms))
                })
        });
        row(&format!("{op} p99.9 / max (ms)"), &|r| {
            res(r)
                .and_then(|x| x.latency.get(op).cloned())
                .map_or("-".into(), |l| {
                    format!("{} / {}", ms(l.p999_ms), ms(l.max_ms))
                })
        });
    }
    if report.settings.scenario.buys() {
        row("buyers: confirmed / sold-out / gave up", &|r| {
            res(r).and_then(|x| x.purchases).map_or("-".into(), |p| {
                format!("{} / {} / {}", p.confirmed, p.sold_out, p.gave_up)
            })
        });
        row("seats on sale", &|_| {
            (u64::from(report.settings.tickets) * u64::from(report.settings.events)).to_string()
        });
    }
    for (id, name) in crate::audit::NAMES {
        row(&format!("{id} {name}"), &|r| {
            r.audit
                .as_ref()
                .and_then(|a| a.invariants.iter().find(|inv| inv.id == id))
                .map_or("-".into(), |inv| match (inv.status, inv.violations) {
                    ("pass", _) => "0 ok".into(),
                    ("fail", Some(n)) => format!("{n} VIOLATED"),
                    ("not-applicable", _) => "n/a".into(),
                    (s, _) => s.to_owned(),
                })
        });
    }
    if runs.iter().any(|r| r.chaos.is_some()) {
        row("chaos: faults injected", &|r| {
            r.chaos.as_ref().map_or("-".into(), |c| c.summary())
        });
    }
    row("audit", &|r| {
        r.audit.as_ref().map_or("-".into(), |a| {
            if !a.quiet.quiet && a.server.is_some() {
                format!("NOT QUIET ({})", a.quiet.busy())
            } else if a.ok {
                "ok".into()
            } else {
                "FAILED".into()
            }
        })
    });
    rows
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The terminal summary.
pub fn terminal(report: &Report) -> String {
    let s = &report.settings;
    let mut out = format!(
        "loadgen {} · scenario {} (API {}) · seed {} · {} model ({}) · bound {}\n",
        report.command,
        s.scenario,
        s.api.as_str(),
        report.seed,
        s.model.as_str(),
        match s.model {
            ModelKind::Closed => format!("{} virtual users", s.vus),
            ModelKind::Open => format!(
                "{} req/s {:?}, {} connections",
                s.rate.unwrap_or(0.0),
                s.arrivals,
                s.connections
            )
            .to_lowercase(),
        },
        s.bound(),
    );
    let headers: Vec<String> = report.runs.iter().map(RunReport::label).collect();
    let mut rows = table_rows(report);
    for (_, cells) in &mut rows {
        for c in cells.iter_mut() {
            if c.chars().count() > 40 {
                *c = c.chars().take(39).collect::<String>() + "…";
            }
        }
    }
    out.push_str(&aligned(&headers, &rows));
    for r in &report.runs {
        if let Some(why) = &r.skip_reason {
            out.push_str(&format!("skipped {}: {why}\n", r.label()));
        }
    }
    if s.scenario.buys() {
        out.push_str(&format!("note: {}\n", purchase_note(s)));
    }
    for r in &report.runs {
        if let Some(c) = &r.chaos {
            for l in c.lines() {
                out.push_str(&format!("chaos ({}): {l}\n", r.label()));
            }
            for n in &c.notes {
                out.push_str(&format!("chaos note ({}): {n}\n", r.label()));
            }
        }
        if let Some(a) = &r.audit {
            for n in &a.notes {
                out.push_str(&format!("note ({}): {n}\n", r.label()));
            }
        }
    }
    for t in &report.thresholds {
        out.push_str(&format!(
            "threshold {} {} (limit {}, actual {}) on {}\n",
            t.name,
            if t.passed { "held" } else { "BREACHED" },
            t.limit,
            t.actual.map_or("-".into(), |a| format!("{a}")),
            t.label()
        ));
    }
    let chaos = report
        .runs
        .iter()
        .find_map(|r| r.chaos.as_ref())
        .map_or(String::new(), |c| {
            let mut faults = c.faults_drawn_from.clone();
            faults.extend(&c.not_applicable);
            faults.sort_by_key(|f| crate::chaos::Fault::ALL.iter().position(|a| a.name() == *f));
            format!(
                " --chaos {} --chaos-gap {} --chaos-outage {}",
                faults.join(","),
                c.gap,
                c.outage
            )
        });
    out.push_str(&format!(
        "replay with: --seed {} --scenario {}{chaos}\n",
        report.seed, s.scenario
    ));
    out
}

fn aligned(headers: &[String], rows: &[(String, Vec<String>)]) -> String {
    let label_w = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|(_, cells)| cells[i].chars().count())
                .chain([h.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |label: &str, cells: &[String]| {
        let mut l = format!("{label:<label_w$}");
        for (c, w) in cells.iter().zip(&widths) {
            l.push_str(" │ ");
            l.push_str(&format!("{c:<w$}"));
        }
        l.trim_end().to_owned() + "\n"
    };
    out.push_str(&line("", headers));
    out.push_str(&"─".repeat(label_w + widths.iter().map(|w| w + 3).sum::<usize>()));
    out.push('\n');
    for (label, cells) in rows {
        out.push_str(&line(label, cells));
    }
    out
}

/// The Markdown report: settings, the side-by-side table, the invariants' details.
pub fn markdown(report: &Report) -> String {
    let s = &report.settings;
    let mut out = format!(
        "# loadgen {}: {}\n\nseed `{}` · {} model · bound {} · started {}\n\n",
        report.command,
        s.scenario,
        report.seed,
        s.model.as_str(),
        s.bound(),
        report.started_at
    );
    out.push_str("| | ");
    out.push_str(
        &report
            .runs
            .iter()
            .map(RunReport::label)
            .collect::<Vec<_>>()
            .join(" | "),
    );
    out.push_str(" |\n|---|");
    out.push_str(&"---|".repeat(report.runs.len()));
    out.push('\n');
    for (label, cells) in table_rows(report) {
        out.push_str(&format!(
            "| {} | {} |\n",
            md_escape(&label),
            cells
                .iter()
                .map(|c| md_escape(c))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    if s.scenario.buys() {
        out.push_str(&format!("\n{}\n", purchase_note(s)));
    }
    for r in &report.runs {
        if let Some(c) = &r.chaos {
            out.push_str(&format!(
                "\n## Chaos: {}\n\nFaults drawn from: {} · gap {} · outage {}\n\n",
                r.label(),
                if c.faults_drawn_from.is_empty() {
                    "none".to_owned()
                } else {
                    c.faults_drawn_from.join(", ")
                },
                c.gap,
                c.outage
            ));
            for s in &c.services {
                out.push_str(&format!("- service: {s}\n"));
            }
            for l in c.lines() {
                out.push_str(&format!("- {l}\n"));
            }
            for n in &c.notes {
                out.push_str(&format!("- note: {n}\n"));
            }
        }
        if let Some(a) = &r.audit {
            out.push_str(&format!("\n## Audit: {}\n\n", r.label()));
            out.push_str(&format!(
                "- quiet: {} after {} ms (under way at the last look: {})\n",
                if a.quiet.quiet { "yes" } else { "NO" },
                a.quiet.waited_ms,
                a.quiet.busy()
            ));
            for inv in &a.invariants {
                out.push_str(&format!(
                    "- **{} {}**: {}{} — {}\n",
                    inv.id,
                    inv.name,
                    inv.status,
                    inv.violations.map_or(String::new(), |n| format!(" ({n})")),
                    inv.detail
                ));
            }
            for n in &a.notes {
                out.push_str(&format!("- note: {n}\n"));
            }
        }
    }
    if !report.thresholds.is_empty() {
        out.push_str("\n## Thresholds\n\n| threshold | stage | limit | actual | result |\n|---|---|---|---|---|\n");
        for t in &report.thresholds {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                t.name,
                t.label(),
                t.limit,
                t.actual.map_or("-".into(), |a| a.to_string()),
                if t.passed { "held" } else { "breached" }
            ));
        }
    }
    out
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The table's column headers and rows (for the HTML report).
pub fn markdown_cells(report: &Report) -> (Vec<String>, Vec<(String, Vec<String>)>) {
    (
        report.runs.iter().map(RunReport::label).collect(),
        table_rows(report),
    )
}
