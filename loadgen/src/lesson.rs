//! `loadgen lesson [NAME]`: the problems the seed names, each as a ready experiment. A lesson
//! starts the stages it needs fresh, runs a short seeded scenario on the stage that breaks and
//! on the stage that fixes it, and prints what is shown, the number that shows it on each, and
//! why. It exits 0 only when the break appears and the fix holds, so a lesson is also a test.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::app::{run_fresh, EXIT_RUNTIME, EXIT_USAGE};
use crate::backend::StageSpec;
use crate::cli::{Common, LessonArgs, Output, Thresholds};
use crate::http::Conn;
use crate::report::{Report, RunReport, SCHEMA_VERSION};
use crate::scenario::{ApiVersion, Overrides, ScenarioKind, Settings};
use crate::{driver, server};

/// The lesson did not show what it claims (the break did not appear, or the fix did not hold).
pub const EXIT_NOT_SHOWN: u8 = 3;
/// The lesson waits for stages not built yet.
pub const EXIT_NOT_AVAILABLE: u8 = 4;
/// A service the lesson needs (Redis, PostgreSQL) does not answer.
pub const EXIT_SERVICE_MISSING: u8 = 5;

/// One lesson: its name, the seed's problem in the seed's words, and what it shows.
pub struct Lesson {
    pub name: &'static str,
    pub problem: &'static str,
    pub shows: &'static str,
    pub why: &'static str,
    /// Why it cannot run yet, if so.
    pub unavailable: Option<&'static str>,
}

pub const LESSONS: &[Lesson] = &[
    Lesson {
        name: "race",
        problem: "Race conditions when checking event availability",
        shows: "every buyer reads `available` before any write-back, so all pass the check: \
                monolith sells seats that do not exist; actor sells each seat once",
        why: "The monolith checks availability, then waits for the payment, then writes \
              back. Between the check and the write every other buyer reads the same \
              `available` and passes the same check: check-then-act without anything that \
              makes the two one step. The actor stage gives each event one owner, an actor whose \
              mailbox takes one decision at a time; the check and the reservation are one \
              synchronous step of that owner, so no second buyer can slip between them.",
        unavailable: None,
    },
    Lesson {
        name: "double-sale",
        problem: "Multiple users can buy the same ticket",
        shows: "the same seat confirmed for more than one buyer (I2) on monolith; none on actor",
        why: "v1 seats are unnumbered, so a seat sold twice is a confirmed ticket beyond the \
              event's capacity: two buyers hold the same last seat. The monolith has no single \
              place where a seat is given out; each request gives one out on its own reading of \
              the counter. In the actor stage the event's actor is that single place: a seat is \
              held (committed) before the charge and can be held by one order only.",
        unavailable: None,
    },
    Lesson {
        name: "lost-update",
        problem: "Inconsistent inventory counts",
        shows: "the stored `available` counter drifts from what the tickets say (I6) on \
                monolith; stays exact on actor",
        why: "Each monolith purchase writes back `available = value_read - 1`. Two buyers who \
              read 57 both write 56: one decrement is lost, and the counter no longer matches the \
              tickets sold. The actor stage never writes a value computed from a stale read: the \
              owner moves `available` by its net change inside the same group commit that \
              stores the holds and confirmations, so the counter and the tickets agree.",
        unavailable: None,
    },
    Lesson {
        name: "slow-payment",
        problem: "Processing payment SLOW & causes problems",
        shows: "at the seed's payment settings (1-3 s, 10 % declines) a v1 purchase waits for \
                the payment; a v2 order is answered 202 as soon as its seat is held",
        why: "API v1 answers a purchase only when the payment has settled, so every buyer waits \
              the gateway's 1-3 s and holds a connection meanwhile. API v2 splits the two: the \
              order holds its seats (a durable hold, so nothing is lost if the server dies) and \
              is answered 202 with its status URL at once; the payment runs in the background \
              and the client polls or listens. The wait moves off the request path; the time to \
              a confirmed ticket stays the gateway's.",
        unavailable: None,
    },
    Lesson {
        name: "payment-failure",
        problem: "Lost tickets when payments fail",
        shows: "kill -9 the server while purchases wait for their payment, restart it on the \
                same database: monolith leaves tickets pending for ever; actor resolves every one",
        why: "The monolith stores a pending ticket, then waits for the payment in memory. When \
              the process dies, what it was waiting for dies with it: nothing on disk says \
              which charge belongs to which ticket or that anyone should ask again, so the \
              tickets stay pending and their seats are never sold nor returned. The actor stage \
              commits a hold with its payment key before charging; at start it finds every hold \
              still pending and asks the gateway again under the same key (the gateway \
              deduplicates, so nothing is charged twice), then confirms or releases it.",
        unavailable: None,
    },
    Lesson {
        name: "db-locks",
        problem: "Database locks cause timeouts",
        shows: "the obvious fix of the monolith, each purchase one write transaction (BEGIN \
                IMMEDIATE ... COMMIT) held across a 100 ms payment: nothing is oversold, and \
                purchases fail with `database is locked` instead; actor sells every seat",
        why: "A transaction around check, insert, payment and write-back does remove the race: \
              SQLite lets one connection at a time hold the write lock, so purchases run one \
              after another. But the lock is held for the whole payment: every other purchase \
              queues for it and gives up after the busy timeout (1 s here) with `database is \
              locked`. Here it is worse than a queue: the payment gateway records each charge \
              in its books, in the same database file, and that write waits for the very lock \
              the purchase holds while it waits for the charge, so even the holder fails when \
              the timeout breaks the deadlock. Never hold a lock across a slow call, least of \
              all one that needs the same lock. The actor stage holds nothing across the \
              payment: a committed hold, the charge, then a second short commit.",
        unavailable: None,
    },
    Lesson {
        name: "single-writer",
        problem: "Using sqlite which doesnt scale well in distributed systems",
        shows: "two `actor` server processes on one SQLite file, each selling its own event, \
                against one process selling both; and the same two processes on PostgreSQL, \
                and stage `services`, several processes sharing nothing, on PostgreSQL",
        why: "SQLite is a file with one writer at a time, built to be embedded in one process: \
              a second process can only queue for the same file lock (busy_timeout) and gains \
              nothing. Worse, a process that owns its writes, as this server does (one \
              group-commit writer, the gateway's books numbered by one task), assumes it is the \
              only writer: two of them number the books from the same counter, their writes \
              collide, purchases fail and are left pending. The fix is one process owning the \
              file (the single-writer principle), and scaling out needs a database built for \
              client/server and writers that share nothing (PostgreSQL takes the two processes' \
              writes without a busy wait, but the second writer's assumption still breaks). \
              That is the services stage: several processes on one PostgreSQL, each event \
              owned by one inventory node through a shard lease, the books by one payments \
              node, so no two processes ever write the same thing, and nothing is lost.",
        unavailable: None,
    },
    Lesson {
        name: "lease",
        problem: "A lease-based lock is unsafe without fencing (the seed's step 2)",
        shows: "a `locked` lock holder paused past its 100 ms lease sells the last seat a \
                second time without fencing tokens; with fencing its late write is refused",
        why: "A Redis lock with a TTL is a lease: when the holder stops (GC, SIGSTOP, a slow \
              disk) for longer than the lease, the lock expires and a second buyer takes it, \
              while the first still believes it holds it. When the first wakes it writes on \
              its stale read and sells the seat again. A lock cannot prevent that; the store \
              must: each grant carries a fencing token, increasing, recorded on the event row, \
              and a write carrying an older token than the row's is refused.",
        unavailable: None,
    },
    Lesson {
        name: "failover",
        problem: "One process is one point of failure (the seed's step 3: microservices)",
        shows: "kill -9 the process selling an event mid-load: `actor@postgres` (one process) \
                sells nothing more until someone restarts it; `services` moves the dead \
                inventory node's shards to the survivors and every buyer still gets a ticket",
        why: "The actor stage is one process: its event actors, its writer and its payment \
              pool die together, and until it is started again every purchase fails. The \
              services stage runs the same actors in several inventory nodes, each owning \
              the events of the shards it holds by a lease in PostgreSQL, renewed by the \
              database's clock. When a node dies its leases run out, a survivor takes the \
              shards at a higher epoch, resolves the purchases the dead node left pending \
              from what PostgreSQL holds, and sells on. The gateway, which chose every \
              order's id, reroutes the purchases it could not place and reads the outcome of \
              those it sent to the dead node from the database, so a buyer waits about a \
              lease, and is never told a wrong answer. The epoch fence is what makes the \
              takeover safe: a node that only paused cannot write once its shard moved.",
        unavailable: None,
    },
    Lesson {
        name: "compensation",
        problem: "A declined charge must undo its hold, and the system should say so (the seed's step 4: sagas)",
        shows: "orders placed at a 50 % decline rate: `actor` returns every declined order's \
                seats, but keeps no account of how; `saga` returns them too, and each \
                declined order's own event log shows the hold, the declined charge and its \
                compensation",
        why: "A purchase spans two resources that cannot share a transaction: the seats and \
              the payment. The actor stage keeps them consistent inside one process: its \
              event actor holds the seats, waits for the charge and releases them on a \
              decline, and what is stored is the outcome (an order `cancelled`, \
              `payment_declined`). The saga stage makes the same steps explicit: the order is \
              a saga, HoldSeats, then Charge (the pivot), then Confirm, and every step is an \
              event appended to the order's log, with the next command leaving through an \
              outbox in the same transaction. A declined charge before the pivot is answered \
              by a compensating step, ReleaseSeats, also an event. So the order's state, and \
              the seats, can be rebuilt from the log (`ticketflow replay`), and a learner, an \
              auditor or a support agent can read why an order ended as it did. The price is \
              more writes per purchase.",
        unavailable: None,
    },
];

/// One stage's number.
#[derive(Debug, Clone)]
pub struct Side {
    pub label: String,
    pub value: f64,
    pub text: String,
}

/// What a lesson measured.
#[derive(Debug)]
pub struct Finding {
    pub metric: String,
    pub breaking: Side,
    pub fixing: Side,
    pub passed: bool,
    /// Why it did not show what it claims, when so.
    pub failure: Option<String>,
    pub details: Vec<String>,
    /// The runs behind the numbers, for the HTML page, when the compare machinery ran them.
    pub report: Option<Report>,
}

enum Ran {
    Found(Box<Finding>),
    ServiceMissing(String),
}

struct Ctx<'a> {
    args: &'a LessonArgs,
    bin: PathBuf,
}

impl Ctx<'_> {
    fn quick(&self) -> bool {
        self.args.quick
    }

    fn common(&self, server_args: &[&str]) -> Common {
        Common {
            scenario_file: None,
            overrides: Overrides::default(),
            server_bin: Some(self.bin.clone()),
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
            postgres_url: self.args.postgres_url.clone(),
            admin_token: None,
            chaos: Default::default(),
            output: Output {
                json: None,
                markdown: None,
                html: None,
                quiet: true,
            },
            thresholds: Thresholds::default(),
        }
    }

    fn say(&self, what: &str) {
        eprintln!("lesson: {what}");
    }
}

/// Runs `loadgen lesson [NAME]` and returns the exit status.
pub fn main(args: LessonArgs) -> ExitCode {
    let Some(name) = args.name.as_deref() else {
        for l in LESSONS {
            match l.unavailable {
                None => println!("{:<16} {}", l.name, l.problem),
                Some(why) => println!("{:<16} {} (not available: {why})", l.name, l.problem),
            }
        }
        return ExitCode::SUCCESS;
    };
    let Some(lesson) = LESSONS.iter().find(|l| l.name == name) else {
        let known: Vec<&str> = LESSONS.iter().map(|l| l.name).collect();
        eprintln!(
            "error: lesson `{name}`: no such lesson (known: {}); `loadgen lesson` lists them",
            known.join(", ")
        );
        return ExitCode::from(EXIT_USAGE);
    };
    if let Some(why) = lesson.unavailable {
        eprintln!("lesson {name}: not available: {why}");
        return ExitCode::from(EXIT_NOT_AVAILABLE);
    }
    let bin = match server::locate_server(args.server_bin.as_deref()) {
        Ok(b) => b,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let ctx = Ctx { args: &args, bin };
    let started = Instant::now();
    let ran = runtime.block_on(async {
        match lesson.name {
            "race" => stampede_lesson(&ctx, Count::Oversold).await,
            "double-sale" => stampede_lesson(&ctx, Count::DoubleSold).await,
            "lost-update" => stampede_lesson(&ctx, Count::Drift).await,
            "slow-payment" => slow_payment(&ctx).await,
            "payment-failure" => payment_failure(&ctx).await,
            "lease" => lease(&ctx).await,
            "single-writer" => single_writer(&ctx).await,
            "db-locks" => db_locks(&ctx).await,
            "failover" => failover(&ctx).await,
            "compensation" => compensation(&ctx).await,
            other => unreachable!("lesson {other} is listed without a runner"),
        }
    });
    match ran {
        Err(e) => {
            eprintln!("error: lesson {name}: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
        Ok(Ran::ServiceMissing(why)) => {
            eprintln!("lesson {name}: cannot run: {why}");
            ExitCode::from(EXIT_SERVICE_MISSING)
        }
        Ok(Ran::Found(finding)) => {
            let text = render(lesson, &finding, &ctx, started.elapsed());
            print!("{text}");
            let _ = std::io::stdout().flush();
            if let Some(path) = &args.html {
                let page = crate::html::lesson_html(lesson, &finding, &text);
                if let Err(e) = std::fs::write(path, page) {
                    eprintln!("error: --html {}: cannot write: {e}", path.display());
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
            if finding.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_SHOWN)
            }
        }
    }
}

/// The lesson as the terminal shows it.
fn render(lesson: &Lesson, f: &Finding, ctx: &Ctx, took: Duration) -> String {
    let mut out = format!(
        "lesson {}{}: {}\nshows: {}\nmeasured: {}\n",
        lesson.name,
        if ctx.quick() { " (quick)" } else { "" },
        lesson.problem,
        lesson.shows,
        f.metric
    );
    let w = f.breaking.label.len().max(f.fixing.label.len());
    out.push_str(&format!(
        "  breaks on {:<w$}  {}\n  fixed on  {:<w$}  {}\n",
        f.breaking.label, f.breaking.text, f.fixing.label, f.fixing.text
    ));
    for d in &f.details {
        out.push_str(&format!("  {d}\n"));
    }
    out.push_str(&format!("why: {}\n", lesson.why));
    match &f.failure {
        None => out.push_str(&format!(
            "result: shown (the break appears and the fix holds) · seed {} · {:.1} s\n",
            ctx.args.seed,
            took.as_secs_f64()
        )),
        Some(why) => out.push_str(&format!("result: NOT SHOWN: {why}\n")),
    }
    out
}

fn report_of(settings: &Settings, runs: Vec<RunReport>) -> Report {
    Report {
        schema_version: SCHEMA_VERSION,
        tool: format!("loadgen {}", env!("CARGO_PKG_VERSION")),
        command: "lesson",
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        seed: settings.seed,
        settings: settings.clone(),
        ok: runs.iter().all(|r| r.audit.as_ref().is_some_and(|a| a.ok)),
        runs,
        thresholds: vec![],
    }
}

/// A run's audit, or why there is none.
fn audited(run: &RunReport) -> Result<&crate::audit::Audit, String> {
    match (&run.audit, &run.skip_reason) {
        (Some(a), _) => Ok(a),
        (None, Some(why)) => Err(format!("{} did not run: {why}", run.label())),
        (None, None) => Err(format!("{} has no audit", run.label())),
    }
}

#[derive(Clone, Copy)]
enum Count {
    Oversold,
    DoubleSold,
    Drift,
}

/// The stored counter's drift from the tickets, summed over events (the server's audit).
fn drift(audit: &crate::audit::Audit) -> Option<i64> {
    let events = audit.server.as_ref()?.get("events")?.as_array()?;
    Some(
        events
            .iter()
            .filter_map(|e| e.get("drift").and_then(Value::as_i64))
            .map(i64::abs)
            .sum(),
    )
}

/// `race`, `double-sale`, `lost-update`: the stampede on `monolith` and on `actor`.
async fn stampede_lesson(ctx: &Ctx<'_>, count: Count) -> anyhow::Result<Ran> {
    let (requests, tickets) = if ctx.quick() { (300, 50) } else { (2000, 100) };
    let settings = Overrides {
        scenario: Some(ScenarioKind::Stampede),
        seed: Some(ctx.args.seed),
        requests: Some(requests),
        tickets: Some(tickets),
        vus: Some(64),
        payment_latency: Some("20ms".into()),
        payment_failure_rate: Some(0.1),
        ..Overrides::default()
    }
    .resolve()?;
    let mut runs = vec![];
    for stage in ["monolith", "actor"] {
        ctx.say(&format!(
            "{stage}: {requests} buyers, one event of {tickets} seats, 20 ms payments declining 10 %"
        ));
        let spec = StageSpec::parse(stage, "lesson").map_err(|e| anyhow::anyhow!(e))?;
        runs.push(run_fresh(&spec, &settings, &ctx.common(&[])).await?);
    }
    let metric = match count {
        Count::Oversold => format!("seats sold beyond the {tickets} that exist (I1 oversell)"),
        Count::DoubleSold => "seats confirmed to a second buyer (I2 double sale)".to_owned(),
        Count::Drift => {
            "stored `available` minus what the tickets say it should be (I6 drift, seats)"
                .to_owned()
        }
    };
    let measure = |run: &RunReport| -> Result<(f64, String), String> {
        let audit = audited(run)?;
        let value = match count {
            Count::Oversold => audit.violations("I1"),
            Count::DoubleSold => audit.violations("I2"),
            Count::Drift => drift(audit),
        }
        .ok_or_else(|| format!("{}: the audit could not count it", run.label()))?;
        let confirmed = audit.client.confirmed_stored;
        let text = match count {
            Count::Drift => format!("{value} seats of drift ({confirmed} tickets confirmed)"),
            _ => format!("{value} ({confirmed} tickets confirmed for {tickets} seats)"),
        };
        Ok((value as f64, text))
    };
    let sides: Vec<Result<(f64, String), String>> = runs.iter().map(measure).collect();
    let side = |i: usize| match &sides[i] {
        Ok((v, t)) => Side {
            label: runs[i].label(),
            value: *v,
            text: t.clone(),
        },
        Err(why) => Side {
            label: runs[i].label(),
            value: f64::NAN,
            text: format!("not measured: {why}"),
        },
    };
    let (breaking, fixing) = (side(0), side(1));
    let fix_clean = runs[1].audit.as_ref().is_some_and(|a| a.ok);
    let failure = match (&sides[0], &sides[1]) {
        (Err(why), _) | (_, Err(why)) => Some(why.clone()),
        (Ok((b, _)), _) if *b <= 0.0 => {
            Some(format!("{} did not break this time ({b})", breaking.label))
        }
        (_, Ok((f, _))) if *f != 0.0 => Some(format!("{} did not hold ({f})", fixing.label)),
        _ if !fix_clean => Some(format!("the audit of {} is not clean", fixing.label)),
        _ => None,
    };
    let mut details = vec![];
    for r in &runs {
        if let Some(res) = &r.results {
            details.push(format!(
                "{}: {:.0} req/s, audit {}",
                r.label(),
                res.achieved_rps,
                if r.audit.as_ref().is_some_and(|a| a.ok) {
                    "ok"
                } else {
                    "FAILED"
                }
            ));
        }
    }
    Ok(Ran::Found(Box::new(Finding {
        metric,
        breaking,
        fixing,
        passed: failure.is_none(),
        failure,
        details,
        report: Some(report_of(&settings, runs)),
    })))
}

/// `slow-payment`: v1 on `monolith` against v2 on `actor`, at the seed's payment settings.
async fn slow_payment(ctx: &Ctx<'_>) -> anyhow::Result<Ran> {
    let requests = if ctx.quick() { 10 } else { 40 };
    let base = |api| Overrides {
        scenario: Some(ScenarioKind::Stampede),
        api: Some(api),
        seed: Some(ctx.args.seed),
        requests: Some(requests),
        tickets: Some(100),
        vus: Some(10),
        payment_latency: Some("1s..3s".into()),
        payment_failure_rate: Some(0.1),
        ..Overrides::default()
    };
    let v1 = base(ApiVersion::V1).resolve()?;
    let v2 = base(ApiVersion::V2).resolve()?;
    ctx.say(&format!(
        "monolith, API v1: {requests} buyers, payments of 1-3 s declining 10 % (the seed's)"
    ));
    let monolith = run_fresh(
        &StageSpec::parse("monolith", "lesson").map_err(|e| anyhow::anyhow!(e))?,
        &v1,
        &ctx.common(&[]),
    )
    .await?;
    ctx.say(&format!("actor, API v2: the same {requests} buyers"));
    let actor = run_fresh(
        &StageSpec::parse("actor", "lesson").map_err(|e| anyhow::anyhow!(e))?,
        &v2,
        &ctx.common(&[]),
    )
    .await?;
    let latency = |run: &RunReport, op: &str| {
        run.results
            .as_ref()
            .and_then(|r| r.latency.get(op).cloned())
    };
    let purchase = latency(&monolith, driver::OP_PURCHASE);
    let reserved = latency(&actor, driver::OP_ORDER_RESERVED);
    let confirmed = latency(&actor, driver::OP_ORDER_TO_CONFIRMED);
    let breaking = Side {
        label: format!("{} (API v1)", monolith.label()),
        value: purchase.as_ref().map_or(f64::NAN, |l| l.p50_ms),
        text: purchase.as_ref().map_or_else(
            || format!("not measured: {}", skip_reason(&monolith)),
            |l| format!("p50 {:.0} ms, p99 {:.0} ms", l.p50_ms, l.p99_ms),
        ),
    };
    let fixing = Side {
        label: format!("{} (API v2)", actor.label()),
        value: reserved.as_ref().map_or(f64::NAN, |l| l.p50_ms),
        text: reserved.as_ref().map_or_else(
            || format!("not measured: {}", skip_reason(&actor)),
            |l| format!("p50 {:.1} ms, p99 {:.1} ms", l.p50_ms, l.p99_ms),
        ),
    };
    // The payment takes at least 1 s: a v1 answer under that did not wait for it, a v2 answer
    // over it may have.
    let failure = match (&purchase, &reserved) {
        (None, _) => Some(format!("{} was not measured", breaking.label)),
        (_, None) => Some(format!("{} was not measured", fixing.label)),
        (Some(p), _) if p.p50_ms < 1000.0 => Some(format!(
            "v1 purchases answered in {:.0} ms (p50), under the 1 s payment",
            p.p50_ms
        )),
        (_, Some(r)) if r.p99_ms >= 1000.0 => Some(format!(
            "v2 reservations took {:.0} ms (p99), as long as a payment",
            r.p99_ms
        )),
        _ => None,
    };
    let mut details = vec![];
    if let Some(c) = confirmed {
        details.push(format!(
            "on {}, arrival to a confirmed order: p50 {:.0} ms (the payment still takes its time, off the request)",
            actor.label(),
            c.p50_ms
        ));
    }
    let mut runs = vec![monolith, actor];
    for r in &mut runs {
        if let Some(a) = &r.audit {
            details.push(format!(
                "{}: audit {}",
                r.label(),
                if a.ok { "ok" } else { "FAILED" }
            ));
        }
    }
    Ok(Ran::Found(Box::new(Finding {
        metric: "how long a buyer waits for the answer to a purchase (ms)".into(),
        breaking,
        fixing,
        passed: failure.is_none(),
        failure,
        details,
        report: Some(report_of(&v1, runs)),
    })))
}

fn skip_reason(run: &RunReport) -> String {
    run.skip_reason
        .clone()
        .unwrap_or_else(|| "no figures".into())
}

/// Settings for a server started by hand (seed, payments, hold TTL).
fn server_settings(
    ctx: &Ctx,
    payment_latency: &str,
    failure_rate: f64,
) -> anyhow::Result<Settings> {
    Overrides {
        seed: Some(ctx.args.seed),
        tickets: Some(100),
        payment_latency: Some(payment_latency.into()),
        payment_failure_rate: Some(failure_rate),
        ..Overrides::default()
    }
    .resolve()
}

async fn start(
    ctx: &Ctx<'_>,
    stage: &str,
    place: Option<&server::Place>,
    settings: &Settings,
    extra: &[String],
) -> anyhow::Result<server::Spawned> {
    server::start_in(&ctx.bin, stage, place, None, settings, extra)
        .await
        .map_err(|f| anyhow::anyhow!("stage {stage} did not start: {}", f.reason))
}

/// The server's own audit (`GET /api/v1/admin/audit`).
async fn server_audit(addr: SocketAddr) -> anyhow::Result<Value> {
    let mut conn = Conn::new(addr, Duration::from_secs(10));
    let auth = format!("Bearer {}", crate::server::admin_token());
    let answer = conn
        .send(
            "GET",
            "/api/v1/admin/audit",
            &[("Authorization", &auth)],
            None,
        )
        .await
        .map_err(|f| anyhow::anyhow!("reading the audit: {}", f.as_str()))?;
    Ok(serde_json::from_slice(&answer.body)?)
}

fn invariant(audit: &Value, key: &str) -> i64 {
    audit["invariants"][key].as_i64().unwrap_or(-1)
}

/// `payment-failure`: purchases waiting for their payment when the server is killed.
async fn payment_failure(ctx: &Ctx<'_>) -> anyhow::Result<Ran> {
    let quick = ctx.quick();
    let (latency, kill_after, settle, buyers) = if quick {
        (
            "300ms..800ms",
            Duration::from_millis(200),
            Duration::from_secs(2),
            30,
        )
    } else {
        (
            "1s..3s",
            Duration::from_millis(600),
            Duration::from_secs(6),
            60,
        )
    };
    let settings = server_settings(ctx, latency, 0.1)?;
    let mut sides = vec![];
    let mut details = vec![];
    for stage in ["monolith", "actor"] {
        ctx.say(&format!(
            "{stage}: {buyers} buyers, payments of {latency}; kill -9 after {} ms, restart on the same file",
            kill_after.as_millis()
        ));
        let spawned = start(ctx, stage, None, &settings, &[]).await?;
        let fixture = driver::setup(spawned.addr, &settings).await?;
        let event = fixture.event_ids[0];
        let addr = spawned.addr;
        let mut tasks = vec![];
        for i in 0..buyers {
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::new(addr, Duration::from_secs(10));
                let body = format!(r#"{{"eventId":{event},"userId":"killed-{i}"}}"#);
                conn.post_json("/api/v1/tickets/purchase", body.as_bytes())
                    .await
                    .map(|r| r.status)
            }));
        }
        tokio::time::sleep(kill_after).await;
        let place = spawned.kill9().await;
        let mut answered = 0;
        for t in tasks {
            if matches!(t.await, Ok(Ok(s)) if s == 201) {
                answered += 1;
            }
        }
        let mut restarted = start(ctx, stage, Some(&place), &settings, &[]).await?;
        let deadline = Instant::now() + settle;
        let audit = loop {
            let audit = server_audit(restarted.addr).await;
            let done = audit
                .as_ref()
                .is_ok_and(|a| invariant(a, "I4_no_lost_tickets") == 0);
            if done || Instant::now() >= deadline {
                break audit;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        restarted.stop().await;
        let audit = audit?;
        let pending = invariant(&audit, "I4_no_lost_tickets");
        let confirmed: i64 = audit["events"]
            .as_array()
            .map(|es| es.iter().filter_map(|e| e["confirmed"].as_i64()).sum())
            .unwrap_or(0);
        details.push(format!(
            "{stage}@sqlite: {answered} buyers got 201 before the kill; after the restart and {} s: {confirmed} confirmed, {pending} pending, audit {}",
            settle.as_secs(),
            if audit["ok"] == true { "ok" } else { "FAILED" }
        ));
        sides.push(Side {
            label: format!("{stage}@sqlite"),
            value: pending as f64,
            text: format!("{pending} tickets still pending"),
        });
    }
    let fixing = sides.pop().expect("two stages");
    let breaking = sides.pop().expect("two stages");
    let failure = if breaking.value <= 0.0 {
        Some(format!(
            "{} left nothing pending: the kill came when no purchase was waiting",
            breaking.label
        ))
    } else if fixing.value != 0.0 {
        Some(format!(
            "{} still had {} pending after the restart",
            fixing.label, fixing.value
        ))
    } else {
        None
    };
    Ok(Ran::Found(Box::new(Finding {
        metric: format!(
            "tickets still pending {} s after the restart (I4: they never resolve on their own)",
            settle.as_secs()
        ),
        breaking,
        fixing,
        passed: failure.is_none(),
        failure,
        details,
        report: None,
    })))
}

/// `host:port` of a `redis://` or `postgres://` URL.
fn service_addr(url: &str, default_port: u16) -> Option<SocketAddr> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let with_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    with_port.to_socket_addrs().ok()?.next()
}

/// `Some` (the lesson cannot run) when PostgreSQL does not answer at `pg_url`; `needs` says
/// what the lesson needs it for.
async fn postgres_missing(pg_url: &str, needs: &str) -> Option<Ran> {
    match service_addr(pg_url, 5432) {
        Some(addr) if answers(addr).await => None,
        _ => Some(Ran::ServiceMissing(format!(
            "PostgreSQL does not answer at {} (--postgres-url, POSTGRES_URL); {needs}",
            crate::backend::redact(pg_url)
        ))),
    }
}

async fn answers(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// `lease`: the Redlock lesson on `locked`, without and with fencing tokens.
async fn lease(ctx: &Ctx<'_>) -> anyhow::Result<Ran> {
    let url = &ctx.args.redis_url;
    match service_addr(url, 6379) {
        Some(addr) if answers(addr).await => {}
        _ => {
            return Ok(Ran::ServiceMissing(format!(
                "Redis does not answer at {url} (--redis-url, REDIS_URL); the `locked` stage \
                 needs it: start one, e.g. `redis-server --port 6379`"
            )))
        }
    }
    let settings = server_settings(ctx, "0", 0.0)?;
    let settings = Settings {
        tickets: 1,
        ..settings
    };
    let mut sides = vec![];
    let mut details = vec![];
    for fencing in [false, true] {
        let label = if fencing {
            "locked@sqlite".to_owned()
        } else {
            "locked@sqlite --unsafe-no-fencing".to_owned()
        };
        ctx.say(&format!(
            "{label}: one seat, lease 100 ms, the first holder pauses 1 s after its read"
        ));
        let mut extra: Vec<String> = vec![
            "--lock-ttl=100ms".into(),
            "--pause-after-read=1s".into(),
            format!("--redis-url={url}"),
        ];
        if !fencing {
            extra.push("--unsafe-no-fencing".into());
        }
        let mut spawned = start(ctx, "locked", None, &settings, &extra).await?;
        let outcome = paused_holder(spawned.addr, &settings).await;
        let audit = server_audit(spawned.addr).await;
        spawned.stop().await;
        let (first, second) = outcome?;
        let audit = audit?;
        let sold = [first, second].iter().filter(|s| **s == 201).count();
        details.push(format!(
            "{label}: paused holder answered {first}, second holder {second}; I1 oversell {}",
            invariant(&audit, "I1_no_oversell")
        ));
        sides.push(Side {
            label,
            value: sold as f64,
            text: format!("{sold} buyers sold the one seat"),
        });
    }
    let fixing = sides.pop().expect("two runs");
    let breaking = sides.pop().expect("two runs");
    let failure = if breaking.value < 2.0 {
        Some(format!("{} sold the seat once only", breaking.label))
    } else if fixing.value != 1.0 {
        Some(format!(
            "{} sold the seat {} times",
            fixing.label, fixing.value
        ))
    } else {
        None
    };
    Ok(Ran::Found(Box::new(Finding {
        metric: "buyers sold the event's only seat".into(),
        breaking,
        fixing,
        passed: failure.is_none(),
        failure,
        details,
        report: None,
    })))
}

/// The first buyer takes the lock and pauses past its lease; once the lock is granted, a
/// second buyer buys. Returns both statuses.
async fn paused_holder(addr: SocketAddr, settings: &Settings) -> anyhow::Result<(u16, u16)> {
    let fixture = driver::setup(addr, settings).await?;
    let event = fixture.event_ids[0];
    let first = tokio::spawn(async move {
        let mut conn = Conn::new(addr, Duration::from_secs(10));
        let body = format!(r#"{{"eventId":{event},"userId":"paused-holder"}}"#);
        conn.post_json("/api/v1/tickets/purchase", body.as_bytes())
            .await
            .map(|r| r.status)
    });
    let mut conn = Conn::new(addr, Duration::from_secs(10));
    let give_up = Instant::now() + Duration::from_secs(5);
    let auth = format!("Bearer {}", crate::server::admin_token());
    loop {
        let granted = match conn
            .send(
                "GET",
                "/api/v1/admin/stats",
                &[("Authorization", &auth)],
                None,
            )
            .await
        {
            Ok(r) => serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|s| s["lock"]["granted"].as_u64())
                .unwrap_or(0),
            Err(_) => 0,
        };
        if granted >= 1 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "the first buyer never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = format!(r#"{{"eventId":{event},"userId":"second-holder"}}"#);
    let second = conn
        .post_json("/api/v1/tickets/purchase", body.as_bytes())
        .await
        .map_err(|f| anyhow::anyhow!("the second buyer: {}", f.as_str()))?
        .status;
    let first = first
        .await?
        .map_err(|f| anyhow::anyhow!("the paused holder: {}", f.as_str()))?;
    Ok((first, second))
}

/// What one arrangement of servers did with the same buyers.
struct Served {
    confirmed: u64,
    failed: u64,
    per_s: f64,
    stuck: i64,
    busy_lines: usize,
    audit_ok: bool,
}

impl Served {
    fn text(&self) -> String {
        format!(
            "{} purchases failed (5xx or no answer), {} left pending; {} confirmed at {:.0}/s; \
             {} `database is locked` lines logged",
            self.failed, self.stuck, self.confirmed, self.per_s, self.busy_lines
        )
    }
}

/// `buyers` one-shot purchases, spread over `targets` (server address, event), 32 at a time.
async fn buy_spread(targets: &[(SocketAddr, i64)], buyers: u64) -> (u64, u64, f64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = vec![];
    for w in 0..32usize {
        let (addr, event) = targets[w % targets.len()];
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr, Duration::from_secs(10));
            let (mut ok, mut failed) = (0u64, 0u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= buyers {
                    break;
                }
                let body = format!(r#"{{"eventId":{event},"userId":"sw-{i}"}}"#);
                match conn
                    .post_json("/api/v1/tickets/purchase", body.as_bytes())
                    .await
                {
                    Ok(r) if r.status == 201 => ok += 1,
                    Ok(r) if r.status < 500 => {}
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        if let Ok((o, f)) = t.await {
            ok += o;
            failed += f;
        }
    }
    let per_s = ok as f64 / started.elapsed().as_secs_f64().max(1e-3);
    (ok, failed, per_s)
}

/// Starts `processes` actor servers on one database (a shared SQLite file, or `pg`), two
/// events, and the buyers spread over them; audits, stops.
async fn serve_together(
    ctx: &Ctx<'_>,
    processes: usize,
    pg: Option<&crate::backend::TempDatabase>,
    settings: &Settings,
    buyers: u64,
) -> anyhow::Result<Served> {
    serve_stage_together(ctx, "actor", processes, pg, settings, buyers).await
}

/// [`serve_together`] with `processes` servers of `stage`.
async fn serve_stage_together(
    ctx: &Ctx<'_>,
    stage: &str,
    processes: usize,
    pg: Option<&crate::backend::TempDatabase>,
    settings: &Settings,
    buyers: u64,
) -> anyhow::Result<Served> {
    let first = server::start_in(&ctx.bin, stage, None, pg, settings, &[])
        .await
        .map_err(|f| anyhow::anyhow!("stage {stage} did not start: {}", f.reason))?;
    let fixture = driver::setup(first.addr, settings).await?;
    let mut servers = vec![first];
    while servers.len() < processes {
        let place = servers[0].shared_place();
        let next = server::start_in(&ctx.bin, "actor", Some(&place), pg, settings, &[])
            .await
            .map_err(|f| anyhow::anyhow!("a second actor did not start: {}", f.reason))?;
        servers.push(next);
    }
    let targets: Vec<(SocketAddr, i64)> = fixture
        .event_ids
        .iter()
        .enumerate()
        .map(|(k, e)| (servers[k % servers.len()].addr, *e))
        .collect();
    let (confirmed, failed, per_s) = buy_spread(&targets, buyers).await;
    // let what is in flight settle, then audit the whole database through the first
    tokio::time::sleep(Duration::from_millis(500)).await;
    let audit = server_audit(servers[0].addr).await;
    let busy_lines = servers
        .iter()
        .map(|s| s.log_text().matches("database is locked").count())
        .sum();
    for s in servers.iter_mut().rev() {
        s.stop().await;
    }
    let audit = audit?;
    Ok(Served {
        confirmed,
        failed,
        per_s,
        stuck: invariant(&audit, "I4_no_lost_tickets"),
        busy_lines,
        audit_ok: audit["ok"] == true,
    })
}

/// `single-writer`: two processes on one SQLite file, one process, two on PostgreSQL.
async fn single_writer(ctx: &Ctx<'_>) -> anyhow::Result<Ran> {
    let pg_url = &ctx.args.postgres_url;
    if let Some(missing) = postgres_missing(pg_url, "this lesson compares with it").await {
        return Ok(missing);
    }
    let buyers = if ctx.quick() { 200 } else { 2000 };
    let settings = Settings {
        events: 2,
        tickets: buyers as u32,
        ..server_settings(ctx, "20ms", 0.0)?
    };
    ctx.say(&format!(
        "two actor processes on one SQLite file, each selling its own event: {buyers} buyers"
    ));
    let two = serve_together(ctx, 2, None, &settings, buyers).await?;
    ctx.say("one actor process selling both events: the same buyers");
    let one = serve_together(ctx, 1, None, &settings, buyers).await?;
    ctx.say("two actor processes on one PostgreSQL database: the same buyers");
    let db = crate::backend::TempDatabase::create(pg_url)
        .await
        .map_err(|why| anyhow::anyhow!(why))?;
    let on_pg = serve_together(ctx, 2, Some(&db), &settings, buyers).await;
    if let Err(why) = db.drop_database().await {
        eprintln!("lesson: warning: {why}");
    }
    let on_pg = on_pg?;
    ctx.say("stage services on one PostgreSQL database (inventory nodes owning their shards): the same buyers");
    let db = crate::backend::TempDatabase::create(pg_url)
        .await
        .map_err(|why| anyhow::anyhow!(why))?;
    let sharded = serve_stage_together(ctx, "services", 1, Some(&db), &settings, buyers).await;
    if let Err(why) = db.drop_database().await {
        eprintln!("lesson: warning: {why}");
    }
    let sharded = sharded?;
    let broken = |s: &Served| s.stuck.max(s.failed as i64);
    let breaking = Side {
        label: "2 × actor@sqlite, one file".into(),
        value: broken(&two) as f64,
        text: two.text(),
    };
    let fixing = Side {
        label: "1 × actor@sqlite".into(),
        value: broken(&one) as f64,
        text: one.text(),
    };
    let details = vec![
        format!("2 × actor@postgres, one database: {}", on_pg.text()),
        format!(
            "services (3 inventory nodes, 1 payments node), one database: {}",
            sharded.text()
        ),
        format!(
            "audits: two on SQLite {}, one on SQLite {}, two on PostgreSQL {}, services {}",
            ok_word(two.audit_ok),
            ok_word(one.audit_ok),
            ok_word(on_pg.audit_ok),
            ok_word(sharded.audit_ok)
        ),
    ];
    let failure = if breaking.value <= 0.0 {
        Some("the two processes on one file lost nothing this time".to_owned())
    } else if fixing.value != 0.0 || !one.audit_ok {
        Some(format!("one process lost {} purchases", fixing.value))
    } else if broken(&sharded) != 0 || !sharded.audit_ok {
        Some(format!(
            "services lost {} purchases on one PostgreSQL database",
            broken(&sharded)
        ))
    } else {
        None
    };
    Ok(Ran::Found(Box::new(Finding {
        metric: "purchases that failed and were left pending, when processes share one database"
            .into(),
        breaking,
        fixing,
        passed: failure.is_none(),
        failure,
        details,
        report: None,
    })))
}

fn ok_word(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAILED"
    }
}

/// `db-locks`: `monolith --purchase-transaction` against `actor`, each buyer trying once.
async fn db_locks(ctx: &Ctx<'_>) -> anyhow::Result<Ran> {
    let (requests, tickets) = if ctx.quick() { (48, 24) } else { (240, 100) };
    let settings = Overrides {
        scenario: Some(ScenarioKind::Stampede),
        seed: Some(ctx.args.seed),
        requests: Some(requests),
        tickets: Some(tickets),
        vus: Some(16),
        max_attempts: Some(1),
        payment_latency: Some("100ms".into()),
        payment_failure_rate: Some(0.0),
        ..Overrides::default()
    }
    .resolve()?;
    ctx.say(&format!(
        "monolith --purchase-transaction (busy timeout 1 s): {requests} buyers, one try each, {tickets} seats, 100 ms payments"
    ));
    let monolith = run_fresh(
        &StageSpec::parse("monolith", "lesson").map_err(|e| anyhow::anyhow!(e))?,
        &settings,
        &ctx.common(&["--purchase-transaction", "--sqlite-busy-timeout=1s"]),
    )
    .await?;
    ctx.say("actor: the same buyers");
    let actor = run_fresh(
        &StageSpec::parse("actor", "lesson").map_err(|e| anyhow::anyhow!(e))?,
        &settings,
        &ctx.common(&[]),
    )
    .await?;
    let side = |run: &RunReport, label: String| -> Result<(Side, i64, bool), String> {
        let audit = audited(run)?;
        let res = run.results.as_ref().ok_or("no figures")?;
        let confirmed = res.purchases.as_ref().map_or(0, |p| p.confirmed);
        let rate = confirmed as f64 / res.measured_s.max(1e-3);
        let answers: Vec<String> = res
            .statuses
            .get(driver::OP_PURCHASE)
            .map(|m| {
                m.iter()
                    .filter(|(answer, _)| !answer.starts_with('2'))
                    .map(|(answer, n)| format!("{n} × {answer}"))
                    .collect()
            })
            .unwrap_or_default();
        let p99 = res
            .latency
            .get(driver::OP_PURCHASE)
            .map_or(f64::NAN, |l| l.p99_ms);
        Ok((
            Side {
                label,
                value: res.errors as f64,
                text: format!(
                    "{} of {} purchases failed (5xx or no answer){}; {confirmed} confirmed, {rate:.0}/s; p99 {p99:.0} ms",
                    res.errors,
                    res.requests,
                    if answers.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", answers.join(", "))
                    }
                ),
            },
            audit.violations("I1").unwrap_or(-1),
            audit.ok,
        ))
    };
    let broken = side(
        &monolith,
        format!("{} --purchase-transaction", monolith.label()),
    );
    let fixed = side(&actor, actor.label());
    let (failure, breaking, fixing, details) = match (broken, fixed) {
        (Err(why), _) | (_, Err(why)) => {
            let none = |label: String| Side {
                label,
                value: f64::NAN,
                text: "not measured".into(),
            };
            (
                Some(why),
                none(monolith.label()),
                none(actor.label()),
                vec![],
            )
        }
        (Ok((b, b_oversold, _)), Ok((f, f_oversold, f_ok))) => {
            let details = vec![format!(
                "oversold (I1): {b_oversold} with the transaction (the fix is correct), {f_oversold} on {}",
                f.label
            )];
            let failure = if b.value <= 0.0 {
                Some(format!("{} lost no purchase to the lock", b.label))
            } else if b_oversold != 0 {
                Some(format!("{} oversold {b_oversold}", b.label))
            } else if f.value != 0.0 || f_oversold != 0 || !f_ok {
                Some(format!("{} did not hold", f.label))
            } else {
                None
            };
            (failure, b, f, details)
        }
    };
    Ok(Ran::Found(Box::new(Finding {
        metric: "purchases that failed (`database is locked`, the gateway timing out, no answer)"
            .into(),
        breaking,
        fixing,
        passed: failure.is_none(),
        failure,
        details,
        report: Some(report_of(&settings, vec![monolith, actor])),
    })))
}

/// What the buyers saw around a kill.
struct AfterKill {
    /// Purchases sent after the kill that got no ticket: a 5xx or no answer.
    failed: u64,
    /// Purchases sent after the kill that got their ticket.
    served: u64,
    /// From the kill to the first ticket of a purchase sent after it.
    first_served: Option<Duration>,
    /// The longest a purchase in flight at the kill, or sent after it, waited for its answer.
    longest_wait: Duration,
    /// Tickets the buyers were given, before and after the kill.
    told: u64,
}

impl AfterKill {
    fn text(&self) -> String {
        format!(
            "{} purchases after the kill failed (5xx or no answer), {} got a ticket",
            self.failed, self.served
        )
    }
}

/// 16 buyers, each buying one ticket after another under a new user id, against `addr`'s
/// `event`, for `before + after`; `kill` runs at `before`. A failed attempt is retried after
/// 50 ms. Counts what the purchases sent after the kill got.
async fn buy_through_a_kill<F, Fut>(
    addr: SocketAddr,
    event: i64,
    before: Duration,
    after: Duration,
    kill: F,
) -> anyhow::Result<AfterKill>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let start = Instant::now();
    let end = start + before + after;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![];
    for _ in 0..16 {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            // (got a ticket, sent, answered)
            let mut seen: Vec<(bool, Instant, Instant)> = vec![];
            let mut conn = Conn::new(addr, Duration::from_secs(30));
            while Instant::now() < end {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let body = format!(r#"{{"eventId":{event},"userId":"failover-{i}"}}"#);
                let sent = Instant::now();
                let answer = conn
                    .post_json("/api/v1/tickets/purchase", body.as_bytes())
                    .await;
                let ticket = matches!(&answer, Ok(r) if r.status == 201);
                let failed = !matches!(&answer, Ok(r) if r.status < 500);
                seen.push((ticket, sent, Instant::now()));
                if failed {
                    conn = Conn::new(addr, Duration::from_secs(30));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            seen
        }));
    }
    tokio::time::sleep(before).await;
    let at = Instant::now();
    kill().await?;
    let mut out = AfterKill {
        failed: 0,
        served: 0,
        first_served: None,
        longest_wait: Duration::ZERO,
        told: 0,
    };
    for task in tasks {
        for (ticket, sent, answered) in task.await? {
            out.told += u64::from(ticket);
            if answered > at {
                // in flight at the kill, or sent after it
                out.longest_wait = out.longest_wait.max(answered - sent);
            }
            if sent < at {
                continue;
            }
            if ticket {
                out.served += 1;
                let since = answered - at;
                out.first_served = Some(out.first_served.map_or(since, |f| f.min(since)));
            } else {
                out.failed += 1;
            }
        }
    }
    Ok(out)
}

/// `GET path` with the admin token, as JSON.
async fn admin_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut conn = Conn::new(addr, Duration::from_secs(10));
    let auth = format!("Bearer {}", crate::server::admin_token());
    let answer = conn
        .send("GET", path, &[("Authorization", &auth)], None)
        .await
        .map_err(|f| anyhow::anyhow!("GET {path}: {}", f.as_str()))?;
    anyhow::ensure!(
        answer.status == 200,
        "GET {path} answered {}",
        answer.status
    );
    Ok(serde_json::from_slice(&answer.body)?)
}

/// The pid of the inventory node that owns `event` now, once every shard has an owner.
async fn owner_pid(gateway: SocketAddr, event: i64) -> anyhow::Result<(String, u32)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let topology = admin_json(gateway, &format!("/api/v2/admin/nodes?event={event}")).await?;
        let settled = topology["unownedShards"]
            .as_array()
            .is_some_and(|u| u.is_empty());
        if let (true, Some(owner)) = (settled, topology["event"]["owner"].as_str()) {
            let pid = topology["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["id"] == owner)
                .and_then(|n| n["pid"].as_i64())
                .ok_or_else(|| anyhow::anyhow!("no pid for {owner}: {topology}"))?;
            return Ok((owner.to_owned(), pid as u32));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the shards never all had an owner: {topology}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The server's audit once it is quiet (nothing pending, nothing in flight), or the last
/// one read when `within` runs out.
async fn quiet_audit(addr: SocketAddr, within: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let audit = server_audit(addr).await?;
        if audit["quiet"] == true || Instant::now() >= deadline {
            return Ok(audit);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `failover`: `kill -9` of what sells the event, on `actor@postgres` and on `services`.
async fn failover(ctx: &Ctx<'_>) -> anyhow::Result<Ran> {
    let pg_url = &ctx.args.postgres_url;
    if let Some(missing) = postgres_missing(pg_url, "both stages of this lesson run on it").await {
        return Ok(missing);
    }
    let (before, after) = if ctx.quick() {
        (Duration::from_millis(500), Duration::from_secs(3))
    } else {
        (Duration::from_secs(2), Duration::from_secs(8))
    };
    let settings = Settings {
        tickets: 1_000_000,
        ..server_settings(ctx, "20ms", 0.0)?
    };
    let lease = ["--lease-ttl", "1s", "--renew-every", "250ms"];

    ctx.say(&format!(
        "actor@postgres: 16 buyers; kill -9 of the server after {} ms, watched {} s more",
        before.as_millis(),
        after.as_secs()
    ));
    let db = crate::backend::TempDatabase::create(pg_url)
        .await
        .map_err(|why| anyhow::anyhow!(why))?;
    let one = actor_through_a_kill(ctx, &db, &settings, before, after).await;
    if let Err(why) = db.drop_database().await {
        eprintln!("lesson: warning: {why}");
    }
    let one = one?;

    ctx.say(&format!(
        "services (3 inventory nodes, 1 s leases): the same buyers; kill -9 of the event's \
         inventory node after {} ms",
        before.as_millis()
    ));
    let db = crate::backend::TempDatabase::create(pg_url)
        .await
        .map_err(|why| anyhow::anyhow!(why))?;
    let many = services_through_a_kill(ctx, &db, &settings, &lease, before, after).await;
    if let Err(why) = db.drop_database().await {
        eprintln!("lesson: warning: {why}");
    }
    let (many, victim, audit) = many?;
    let stored: i64 = audit["events"]
        .as_array()
        .map(|es| es.iter().filter_map(|e| e["confirmed"].as_i64()).sum())
        .unwrap_or(-1);

    let first = |a: &AfterKill| {
        a.first_served
            .map_or("none".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
    };
    let details = vec![
        format!(
            "services: killed {victim}; the first ticket of a purchase sent after the kill came \
             {} after it; the longest a purchase in flight at the kill or after it waited: {:.2} s; {} tickets given, {stored} \
             confirmed in PostgreSQL; audit {}",
            first(&many),
            many.longest_wait.as_secs_f64(),
            many.told,
            ok_word(audit["ok"] == true && audit["quiet"] == true),
        ),
        format!(
            "actor@postgres: first ticket after the kill: {} (nobody restarted it)",
            first(&one)
        ),
    ];
    let breaking = Side {
        label: "actor@postgres".into(),
        value: one.failed as f64,
        text: one.text(),
    };
    let fixing = Side {
        label: "services".into(),
        value: many.failed as f64,
        text: many.text(),
    };
    let failure = if one.failed == 0 {
        Some("the killed actor server failed no purchase: the kill came too late".to_owned())
    } else if many.failed != 0 {
        Some(format!("services failed {} purchases", many.failed))
    } else if many.served == 0 {
        Some("services sold nothing after the kill".to_owned())
    } else if audit["ok"] != true || audit["quiet"] != true {
        Some(format!(
            "the services audit is not clean and quiet: {audit}"
        ))
    } else if stored != many.told as i64 {
        Some(format!(
            "services gave {} tickets but PostgreSQL holds {stored} confirmed",
            many.told
        ))
    } else {
        None
    };
    Ok(Ran::Found(Box::new(Finding {
        metric: format!(
            "purchases sent in the {} s after the kill that got no ticket (5xx or no answer)",
            after.as_secs()
        ),
        breaking,
        fixing,
        passed: failure.is_none(),
        failure,
        details,
        report: None,
    })))
}

async fn actor_through_a_kill(
    ctx: &Ctx<'_>,
    db: &crate::backend::TempDatabase,
    settings: &Settings,
    before: Duration,
    after: Duration,
) -> anyhow::Result<AfterKill> {
    let mut spawned = server::start_in(&ctx.bin, "actor", None, Some(db), settings, &[])
        .await
        .map_err(|f| anyhow::anyhow!("stage actor did not start: {}", f.reason))?;
    let fixture = driver::setup(spawned.addr, settings).await?;
    let addr = spawned.addr;
    let pid = spawned
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the actor server is gone"))?;
    let seen = buy_through_a_kill(addr, fixture.event_ids[0], before, after, || async move {
        crate::chaos::signal(pid, libc::SIGKILL, false).map_err(anyhow::Error::msg)
    })
    .await;
    spawned.stop().await;
    seen
}

async fn services_through_a_kill(
    ctx: &Ctx<'_>,
    db: &crate::backend::TempDatabase,
    settings: &Settings,
    lease: &[&str],
    before: Duration,
    after: Duration,
) -> anyhow::Result<(AfterKill, String, Value)> {
    let extra: Vec<String> = ["--inventory-nodes", "3"]
        .iter()
        .chain(lease)
        .map(|s| s.to_string())
        .collect();
    let mut spawned = server::start_in(&ctx.bin, "services", None, Some(db), settings, &extra)
        .await
        .map_err(|f| anyhow::anyhow!("stage services did not start: {}", f.reason))?;
    let result = async {
        let addr = spawned.addr;
        let fixture = driver::setup(addr, settings).await?;
        let event = fixture.event_ids[0];
        let (victim, pid) = owner_pid(addr, event).await?;
        let seen = buy_through_a_kill(addr, event, before, after, || async move {
            crate::chaos::signal(pid, libc::SIGKILL, false).map_err(anyhow::Error::msg)
        })
        .await?;
        let audit = quiet_audit(addr, Duration::from_secs(15)).await?;
        Ok((seen, victim, audit))
    }
    .await;
    spawned.stop().await;
    result
}

/// What became of the orders placed on one stage.
struct Placed {
    declined: u64,
    /// Declined orders whose event log shows the hold, the declined charge and the release.
    explained: u64,
    /// One declined order's story, event types in order (or why there is none).
    story: String,
    confirmed: u64,
    audit_ok: bool,
}

/// `orders` v2 orders of one seat, each by a user of its own, then polled until settled; the
/// declined ones' event logs read back.
async fn place_and_read_back(addr: SocketAddr, event: i64, orders: u64) -> anyhow::Result<Placed> {
    let mut conn = Conn::new(addr, Duration::from_secs(10));
    let mut placed = vec![];
    for i in 0..orders {
        let user = conn
            .post_json(
                "/api/v2/users",
                format!(r#"{{"name":"compensation-{i}"}}"#).as_bytes(),
            )
            .await
            .map_err(|f| anyhow::anyhow!("POST /api/v2/users: {}", f.as_str()))?;
        anyhow::ensure!(
            user.status == 201,
            "POST /api/v2/users answered {}",
            user.status
        );
        let token = serde_json::from_slice::<Value>(&user.body)?["token"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no token in the new user"))?
            .to_owned();
        let auth = format!("Bearer {token}");
        let key = format!("compensation-{i}");
        let body = format!(r#"{{"eventId":{event},"quantity":1}}"#);
        let answer = conn
            .send(
                "POST",
                "/api/v2/orders",
                &[("Authorization", &auth), ("Idempotency-Key", &key)],
                Some(body.as_bytes()),
            )
            .await
            .map_err(|f| anyhow::anyhow!("POST /api/v2/orders: {}", f.as_str()))?;
        anyhow::ensure!(
            answer.status == 202,
            "POST /api/v2/orders answered {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        let id = serde_json::from_slice::<Value>(&answer.body)?["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no id in the placed order"))?
            .to_owned();
        placed.push((auth, id));
    }
    let mut out = Placed {
        declined: 0,
        explained: 0,
        story: "no order was declined".into(),
        confirmed: 0,
        audit_ok: false,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    for (auth, id) in &placed {
        let order = loop {
            let r = conn
                .send(
                    "GET",
                    &format!("/api/v2/orders/{id}"),
                    &[("Authorization", auth)],
                    None,
                )
                .await
                .map_err(|f| anyhow::anyhow!("GET /api/v2/orders/{id}: {}", f.as_str()))?;
            let order: Value = serde_json::from_slice(&r.body)?;
            if order["status"] != "pending" {
                break order;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "order {id} still pending after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if order["status"] == "confirmed" {
            out.confirmed += 1;
            continue;
        }
        if order["cancelReason"] != "payment_declined" {
            continue;
        }
        out.declined += 1;
        let r = conn
            .send(
                "GET",
                &format!("/api/v2/orders/{id}/events"),
                &[("Authorization", auth)],
                None,
            )
            .await
            .map_err(|f| anyhow::anyhow!("GET /api/v2/orders/{id}/events: {}", f.as_str()))?;
        let told: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if r.status != 200 {
            out.story = format!(
                "GET /api/v2/orders/{{id}}/events answers {} {}",
                r.status,
                told["code"].as_str().unwrap_or("")
            );
            continue;
        }
        let kinds: Vec<&str> = told
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["type"].as_str())
            .collect();
        let at = |kind: &str| kinds.iter().position(|k| *k == kind);
        let compensated = match (at("SeatsHeld"), at("PaymentDeclined"), at("SeatsReleased")) {
            (Some(held), Some(declined), Some(released)) => held < declined && declined < released,
            _ => false,
        };
        if compensated {
            out.explained += 1;
            out.story = kinds.join(" → ");
        }
    }
    let audit = quiet_audit(addr, Duration::from_secs(15)).await?;
    out.audit_ok = audit["ok"] == true && audit["quiet"] == true;
    Ok(out)
}

/// `compensation`: declined orders on `actor` and on `saga`, and what each can say of them.
async fn compensation(ctx: &Ctx<'_>) -> anyhow::Result<Ran> {
    let pg_url = &ctx.args.postgres_url;
    if let Some(missing) = postgres_missing(pg_url, "stage saga runs on it").await {
        return Ok(missing);
    }
    let orders: u64 = if ctx.quick() { 16 } else { 60 };
    let settings = Settings {
        tickets: orders as u32,
        ..server_settings(ctx, "20ms", 0.5)?
    };
    let mut sides = vec![];
    let mut details = vec![];
    for stage in ["actor", "saga"] {
        ctx.say(&format!(
            "{stage}: {orders} v2 orders of one seat, payments of 20 ms declining half"
        ));
        let db = match stage {
            "saga" => Some(
                crate::backend::TempDatabase::create(pg_url)
                    .await
                    .map_err(|why| anyhow::anyhow!(why))?,
            ),
            _ => None,
        };
        let ran = async {
            let mut spawned = server::start_in(&ctx.bin, stage, None, db.as_ref(), &settings, &[])
                .await
                .map_err(|f| anyhow::anyhow!("stage {stage} did not start: {}", f.reason))?;
            let result = async {
                let fixture = driver::setup(spawned.addr, &settings).await?;
                place_and_read_back(spawned.addr, fixture.event_ids[0], orders).await
            }
            .await;
            spawned.stop().await;
            result
        }
        .await;
        if let Some(db) = &db {
            if let Err(why) = db.drop_database().await {
                eprintln!("lesson: warning: {why}");
            }
        }
        let placed = ran?;
        let label = match stage {
            "saga" => "saga@postgres",
            _ => "actor@sqlite",
        };
        details.push(format!(
            "{label}: {} confirmed, {} declined, audit {} (clean: every declined order's seats \
             came back); a declined order's story: {}",
            placed.confirmed,
            placed.declined,
            ok_word(placed.audit_ok),
            placed.story
        ));
        sides.push((label, placed));
    }
    let (fix_label, fix) = sides.pop().expect("two stages");
    let (break_label, broke) = sides.pop().expect("two stages");
    let unexplained = |p: &Placed| p.declined - p.explained;
    let side = |label: &str, p: &Placed| Side {
        label: label.into(),
        value: unexplained(p) as f64,
        text: format!(
            "{} of {} declined orders without their compensation on record",
            unexplained(p),
            p.declined
        ),
    };
    let (breaking, fixing) = (side(break_label, &broke), side(fix_label, &fix));
    let failure = if broke.declined == 0 || fix.declined == 0 {
        Some("no order was declined on one of the stages: nothing to compensate".to_owned())
    } else if unexplained(&broke) == 0 {
        Some(format!("{break_label} told every declined order's story"))
    } else if unexplained(&fix) != 0 {
        Some(format!(
            "{fix_label}: {} declined orders without SeatsHeld → PaymentDeclined → SeatsReleased in their log",
            unexplained(&fix)
        ))
    } else if !broke.audit_ok || !fix.audit_ok {
        Some("an audit was not clean: a declined order's seats did not come back".to_owned())
    } else {
        None
    };
    Ok(Ran::Found(Box::new(Finding {
        metric: "declined orders whose compensation (the hold, the declined charge, the \
                 release) cannot be read back from the order"
            .into(),
        breaking,
        fixing,
        passed: failure.is_none(),
        failure,
        details,
        report: None,
    })))
}
