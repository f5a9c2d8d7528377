//! `--chaos LIST`: faults injected into real processes during the load, on a schedule drawn
//! from the run's seed, then the usual wait for quiet and audit (Jepsen's way: break real
//! processes, then check the recorded history).
//!
//! Only processes this load generator started are ever signalled: the server it started, for
//! the service faults a `redis-server` or a PostgreSQL cluster (`initdb` in a temporary
//! directory, on a free port) it starts for that one stage and points the stage at, and for
//! `kill-node` an inventory node of stage `services`, a child of the supervisor it started
//! (checked in `/proc` before the signal). A shared Redis or PostgreSQL is never touched.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::backend::{Backend, StageSpec, TempDatabase};
use crate::http::Conn;
use crate::scenario::Settings;
use crate::server::{self, Spawned};

/// How long an own service may take to answer after it was started.
const SERVICE_STARTUP: Duration = Duration::from_secs(60);

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the server, then start it again on the same database and port.
    KillServer,
    /// SIGSTOP the server for the outage, then SIGCONT.
    PauseServer,
    /// SIGKILL the stage's own `redis-server`; started again after the outage on its data.
    KillRedis,
    /// SIGSTOP the stage's own `redis-server` for the outage.
    PauseRedis,
    /// SIGKILL every process of the stage's own PostgreSQL cluster; started again after the
    /// outage (crash recovery from its WAL).
    KillPostgres,
    /// SIGSTOP every process of the stage's own PostgreSQL cluster for the outage.
    PausePostgres,
    /// SIGKILL one inventory node of stage `services` (a child of the supervisor loadgen
    /// started, which starts it again: loadgen gives it `--restart-nodes`).
    KillNode,
}

/// What a fault is done to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    Server,
    Redis,
    Postgres,
    /// An inventory node of stage `services`.
    Node,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::KillServer,
        Fault::PauseServer,
        Fault::KillRedis,
        Fault::PauseRedis,
        Fault::KillPostgres,
        Fault::PausePostgres,
        Fault::KillNode,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillServer => "kill-server",
            Fault::PauseServer => "pause-server",
            Fault::KillRedis => "kill-redis",
            Fault::PauseRedis => "pause-redis",
            Fault::KillPostgres => "kill-postgres",
            Fault::PausePostgres => "pause-postgres",
            Fault::KillNode => "kill-node",
        }
    }

    pub fn victim(self) -> Victim {
        match self {
            Fault::KillServer | Fault::PauseServer => Victim::Server,
            Fault::KillRedis | Fault::PauseRedis => Victim::Redis,
            Fault::KillPostgres | Fault::PausePostgres => Victim::Postgres,
            Fault::KillNode => Victim::Node,
        }
    }

    pub fn is_kill(self) -> bool {
        matches!(
            self,
            Fault::KillServer | Fault::KillRedis | Fault::KillPostgres | Fault::KillNode
        )
    }

    /// Whether the fault means anything for `spec`: the server faults for every stage (on
    /// `services` they hit the whole deployment, the supervisor and its nodes), Redis faults
    /// for `locked` (the only stage using Redis), PostgreSQL faults for a stage on
    /// PostgreSQL, `kill-node` for `services`.
    pub fn applies_to(self, spec: &StageSpec) -> bool {
        match self.victim() {
            Victim::Server => true,
            Victim::Redis => spec.stage == "locked",
            Victim::Postgres => spec.backend == Backend::Postgres,
            Victim::Node => spec.stage == "services",
        }
    }
}

/// `MIN..MAX` (or one duration), drawn uniformly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub min: Duration,
    pub max: Duration,
}

impl Span {
    pub fn parse(raw: &str, flag: &str) -> Result<Self, String> {
        let one = |s: &str| {
            crate::scenario::parse_duration_arg(s).map_err(|e| format!("{flag} {raw}: {e}"))
        };
        let (min, max) = match raw.split_once("..") {
            Some((a, b)) => (one(a)?, one(b)?),
            None => {
                let d = one(raw)?;
                (d, d)
            }
        };
        if min > max {
            return Err(format!("{flag} {raw}: the first bound is above the second"));
        }
        Ok(Self { min, max })
    }

    fn draw(&self, rng: &mut StdRng) -> Duration {
        if self.min == self.max {
            return self.min;
        }
        let ms = rng.gen_range(self.min.as_millis() as u64..=self.max.as_millis() as u64);
        Duration::from_millis(ms)
    }

    fn show(&self) -> String {
        let f = |d: Duration| match d.as_millis() {
            ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
            ms => format!("{ms}ms"),
        };
        if self.min == self.max {
            f(self.min)
        } else {
            format!("{}..{}", f(self.min), f(self.max))
        }
    }
}

/// What `--chaos`, `--chaos-gap` and `--chaos-outage` asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub faults: Vec<Fault>,
    /// Time before each fault (after the load starts, then after the previous fault ended).
    pub gap: Span,
    /// How long a pause lasts, and how long a killed Redis or PostgreSQL stays down. A killed
    /// server is started again at once (its restart is what takes time).
    pub outage: Span,
}

impl Plan {
    /// `None` when `--chaos` is not given. The error names the flag.
    pub fn parse(list: &[String], gap: &str, outage: &str) -> Result<Option<Self>, String> {
        let mut faults = vec![];
        for name in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let fault = Fault::ALL
                .into_iter()
                .find(|f| f.name() == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    format!(
                        "--chaos {name}: unknown fault (known: {})",
                        known.join(", ")
                    )
                })?;
            if !faults.contains(&fault) {
                faults.push(fault);
            }
        }
        // one order whatever the order given: the schedule depends on the set of faults only
        faults.sort_by_key(|f| Fault::ALL.iter().position(|a| a == f));
        if faults.is_empty() {
            if list.is_empty() {
                return Ok(None);
            }
            return Err("--chaos names no fault; e.g. --chaos kill-server,pause-server".into());
        }
        let gap = Span::parse(gap, "--chaos-gap")?;
        if gap.min < Duration::from_millis(10) {
            return Err(format!(
                "--chaos-gap {}: give at least 10ms between faults",
                gap.show()
            ));
        }
        Ok(Some(Self {
            faults,
            gap,
            outage: Span::parse(outage, "--chaos-outage")?,
        }))
    }

    /// The faults that apply to `spec`, and those that do not.
    pub fn split(&self, spec: &StageSpec) -> (Vec<Fault>, Vec<Fault>) {
        self.faults.iter().partition(|f| f.applies_to(spec))
    }
}

/// The faults of one run in order, drawn from the seed alone: the same seed and flags give the
/// same faults, with the same gaps between them and the same outages (when each lands in the
/// load also depends on how long the previous one took to recover).
pub struct Schedule {
    rng: StdRng,
    faults: Vec<Fault>,
    gap: Span,
    outage: Span,
}

impl Schedule {
    pub fn new(seed: u64, faults: Vec<Fault>, plan: &Plan) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed ^ 0xC4A0_5C4A_05C4_A05C),
            faults,
            gap: plan.gap,
            outage: plan.outage,
        }
    }
}

/// The next fault: the wait before it, which fault, and its outage (endless; none without
/// faults).
impl Iterator for Schedule {
    type Item = (Duration, Fault, Duration);

    fn next(&mut self) -> Option<Self::Item> {
        if self.faults.is_empty() {
            return None;
        }
        let gap = self.gap.draw(&mut self.rng);
        let fault = self.faults[self.rng.gen_range(0..self.faults.len())];
        let outage = self.outage.draw(&mut self.rng);
        Some((gap, fault, outage))
    }
}

/// One fault as it was injected.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultRecord {
    pub fault: &'static str,
    /// When it was injected, from the start of the load.
    pub at_ms: u64,
    /// How long the process was stopped or down by design (0 for a killed server, started
    /// again at once).
    pub outage_ms: u64,
    /// From the signal to the process answering again (health for the server, PING for Redis,
    /// a connection for PostgreSQL); absent if it never did.
    pub back_after_ms: Option<u64>,
    /// What went wrong injecting or recovering, if anything.
    pub error: Option<String>,
    /// Which process, when the fault picks one (`kill-node`: `inventory-2 (pid 4242)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub victim: Option<String>,
}

/// The chaos part of a run's report.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChaosReport {
    /// The faults asked for that apply to this stage, drawn from in the schedule.
    pub faults_drawn_from: Vec<&'static str>,
    /// The faults asked for that do not apply to this stage (e.g. `kill-redis` on `actor`).
    pub not_applicable: Vec<&'static str>,
    pub gap: String,
    pub outage: String,
    /// The services loadgen started for this stage, to fault them.
    pub services: Vec<String>,
    /// Every fault injected, in order.
    pub injected: Vec<FaultRecord>,
    pub notes: Vec<String>,
}

impl ChaosReport {
    pub fn new(plan: &Plan, spec: &StageSpec) -> Self {
        let (drawn, not) = plan.split(spec);
        Self {
            faults_drawn_from: drawn.iter().map(|f| f.name()).collect(),
            not_applicable: not.iter().map(|f| f.name()).collect(),
            gap: plan.gap.show(),
            outage: plan.outage.show(),
            ..Self::default()
        }
    }

    /// `kill-server ×2, pause-server ×1` (`none` if nothing was injected).
    pub fn summary(&self) -> String {
        let mut counts: Vec<(&str, usize)> = vec![];
        for r in &self.injected {
            match counts.iter_mut().find(|(f, _)| *f == r.fault) {
                Some((_, n)) => *n += 1,
                None => counts.push((r.fault, 1)),
            }
        }
        if counts.is_empty() {
            return "none".into();
        }
        let failed = self.injected.iter().filter(|r| r.error.is_some()).count();
        let mut s = counts
            .iter()
            .map(|(f, n)| format!("{f} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        if failed > 0 {
            s.push_str(&format!(" ({failed} with errors)"));
        }
        s
    }

    /// One line per fault: `kill-server at 1.20 s, back after 0.85 s`.
    pub fn lines(&self) -> Vec<String> {
        self.injected
            .iter()
            .map(|r| {
                let mut l = format!("{} at {:.2} s", r.fault, r.at_ms as f64 / 1000.0);
                if let Some(victim) = &r.victim {
                    l.push_str(&format!(" ({victim})"));
                }
                if r.outage_ms > 0 {
                    l.push_str(&format!(
                        ", {} {:.2} s",
                        if r.fault.starts_with("pause") {
                            "stopped"
                        } else {
                            "down"
                        },
                        r.outage_ms as f64 / 1000.0
                    ));
                }
                match r.back_after_ms {
                    Some(ms) => l.push_str(&format!(", back after {:.2} s", ms as f64 / 1000.0)),
                    None => l.push_str(", NOT back"),
                }
                if let Some(e) = &r.error {
                    l.push_str(&format!(" ({e})"));
                }
                l
            })
            .collect()
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Sends `signal` to `pid` (a child this process started and has not reaped), or to its
/// whole process group when `group`.
pub fn signal(pid: u32, signal: libc::c_int, group: bool) -> Result<(), String> {
    // SAFETY: kill/killpg only send a signal; the pid is a child of ours not yet reaped, so it
    // (and the group it leads) cannot have been reused by another process.
    let rc = unsafe {
        if group {
            libc::killpg(pid as libc::pid_t, signal)
        } else {
            libc::kill(pid as libc::pid_t, signal)
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "signal {signal} to {pid}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// A `redis-server` or PostgreSQL cluster of this run: its command, its data directory (kept
/// across kills), and the running process.
pub struct OwnService {
    pub kind: Victim,
    pub port: u16,
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    /// Run as this user and group (PostgreSQL refuses to run as root).
    user: Option<(u32, u32)>,
    /// Signal the whole process group (PostgreSQL's postmaster and its backends).
    group: bool,
    child: Option<Child>,
}

impl OwnService {
    /// Starts a `redis-server` on a free port, its append-only file in a new temporary
    /// directory. Every write is in the AOF before Redis answers it (`appendonly yes`), so a
    /// SIGKILL loses nothing it acknowledged (the kernel keeps what was written; `everysec`
    /// only bounds what a power cut could lose).
    pub async fn redis() -> Result<Self, String> {
        let program = find_program("redis-server", &[]).ok_or(
            "--chaos kill-redis/pause-redis: no `redis-server` on PATH; install Redis to fault its own instance",
        )?;
        let port = free_port()?;
        let dir = temp_dir("redis", port)?;
        let args = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.display().to_string(),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut svc = Self {
            kind: Victim::Redis,
            port,
            program,
            args,
            dir,
            user: None,
            group: false,
            child: None,
        };
        svc.spawn().await?;
        Ok(svc)
    }

    /// `initdb` in a new temporary directory, then `postgres` on a free port (as user
    /// `postgres` when this process is root). `fsync=off`: a killed process loses nothing the
    /// kernel has, and this cluster never outlives a power cut; whether a commit waits for its
    /// WAL flush is still the server's `synchronous_commit`.
    pub async fn postgres() -> Result<Self, String> {
        let initdb = find_program("initdb", PG_BIN_DIRS).ok_or(
            "--chaos kill-postgres/pause-postgres: no `initdb` on PATH or in /usr/lib/postgresql/*/bin",
        )?;
        let program = initdb.with_file_name("postgres");
        if !program.is_file() {
            return Err(format!("no `postgres` next to {}", initdb.display()));
        }
        let port = free_port()?;
        let dir = temp_dir("postgres", port)?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let user =
            if root {
                Some(postgres_user().ok_or(
                    "running as root, and there is no `postgres` user to run PostgreSQL as",
                )?)
            } else {
                None
            };
        let data = dir.join("data");
        if let Some((uid, gid)) = user {
            chown(&dir, uid, gid)?;
        }
        let mut init = Command::new(&initdb);
        init.args(["-D", &data.display().to_string()])
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some((uid, gid)) = user {
            init.uid(uid).gid(gid);
        }
        let out = init
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", initdb.display()))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "initdb failed ({}): {}",
                out.status,
                err.lines().last().unwrap_or("").trim()
            ));
        }
        let args = [
            "-D",
            &data.display().to_string(),
            "-p",
            &port.to_string(),
            "-k",
            &dir.display().to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "shared_buffers=32MB",
            "-c",
            "max_connections=60",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut svc = Self {
            kind: Victim::Postgres,
            port,
            program,
            args,
            dir,
            user,
            group: true,
            child: None,
        };
        svc.spawn().await?;
        Ok(svc)
    }

    /// The URL the stage (or `TempDatabase`) is given.
    pub fn url(&self) -> String {
        match self.kind {
            Victim::Postgres => format!("postgres://postgres@127.0.0.1:{}/postgres", self.port),
            _ => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn describe(&self) -> String {
        match self.kind {
            Victim::Postgres => format!(
                "own PostgreSQL cluster on 127.0.0.1:{} (initdb in {})",
                self.port,
                self.dir.display()
            ),
            _ => format!(
                "own redis-server on 127.0.0.1:{} (AOF in {})",
                self.port,
                self.dir.display()
            ),
        }
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("service.log"))
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        if self.group {
            command.process_group(0);
        }
        // If loadgen dies first, the service goes too: SIGQUIT is PostgreSQL's immediate
        // shutdown, SIGTERM Redis's.
        let death = if self.kind == Victim::Postgres {
            libc::SIGQUIT
        } else {
            libc::SIGTERM
        };
        // SAFETY: prctl is async-signal-safe and only asks for a signal when the parent dies.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, death);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        self.child = Some(child);
        self.wait_ready(SERVICE_STARTUP).await
    }

    fn pid(&self) -> Result<u32, String> {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .ok_or_else(|| "the service is not running".to_owned())
    }

    /// Waits until the service answers (PING, or a PostgreSQL connection that is accepted).
    async fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let give_up = Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "{} exited ({status}); see {}",
                        self.program.display(),
                        self.dir.join("service.log").display()
                    ));
                }
            }
            if self.answers().await {
                return Ok(());
            }
            if Instant::now() >= give_up {
                return Err(format!(
                    "{} did not answer on port {} within {} s",
                    self.program.display(),
                    self.port,
                    within.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn answers(&self) -> bool {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        match self.kind {
            Victim::Postgres => {
                use sqlx::Connection;
                let url = self.url();
                let attempt = tokio::time::timeout(
                    Duration::from_secs(2),
                    sqlx::postgres::PgConnection::connect(&url),
                )
                .await;
                match attempt {
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        true
                    }
                    _ => false,
                }
            }
            _ => {
                let ping = async {
                    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
                    s.write_all(b"PING\r\n").await.ok()?;
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf).await.ok()?;
                    Some(buf[..n].starts_with(b"+PONG"))
                };
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), ping).await,
                    Ok(Some(true))
                )
            }
        }
    }

    /// SIGKILL (the whole cluster for PostgreSQL), reaped.
    pub async fn kill(&mut self) -> Result<(), String> {
        let pid = self.pid()?;
        signal(pid, libc::SIGKILL, self.group)?;
        if let Some(mut child) = self.child.take() {
            let _ = child.wait().await;
        }
        if self.group {
            // the backends die with their group; wait until none is left before a restart
            let give_up = Instant::now() + Duration::from_secs(10);
            // SAFETY: signal 0 only checks whether the group still has a member.
            while unsafe { libc::killpg(pid as libc::pid_t, 0) } == 0 && Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Starts it again on its data (Redis replays its AOF, PostgreSQL recovers from its WAL).
    pub async fn restart(&mut self) -> Result<(), String> {
        self.spawn().await
    }

    pub fn pause(&self) -> Result<(), String> {
        signal(self.pid()?, libc::SIGSTOP, self.group)
    }

    pub fn resume(&self) -> Result<(), String> {
        signal(self.pid()?, libc::SIGCONT, self.group)
    }
}

impl Drop for OwnService {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(pid) = child.id() {
                // resumed first, in case it was left paused by an interrupted run
                let _ = signal(pid, libc::SIGCONT, self.group);
                let _ = signal(pid, libc::SIGKILL, self.group);
            }
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How to start the server again after `kill-server`: what it was started with.
pub struct Restart<'a> {
    pub bin: &'a Path,
    pub stage: &'a str,
    pub database: Option<&'a TempDatabase>,
    pub settings: &'a Settings,
    pub extra_args: &'a [String],
}

/// Injects the schedule's faults while the load runs.
pub struct Injector<'a> {
    pub spawned: &'a mut Spawned,
    pub restart: Restart<'a>,
    pub redis: Option<&'a mut OwnService>,
    pub postgres: Option<&'a mut OwnService>,
    pub schedule: Schedule,
    pub report: &'a mut ChaosReport,
    pub quiet: bool,
    pub label: &'a str,
    /// Picks which inventory node `kill-node` kills ([`node_picker`]).
    pub node_pick: StdRng,
}

/// The generator of `kill-node`'s choices, from the run's seed alone.
pub fn node_picker(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ 0x0DE5_0DE5_0DE5_0DE5)
}

impl Injector<'_> {
    /// Injects faults, one after another with the schedule's gaps, until `done` says the load
    /// is over. A fault under way is finished (the process resumed or restarted) first, so the
    /// audit finds everything running.
    pub async fn run(&mut self, mut done: tokio::sync::watch::Receiver<bool>, load_start: Instant) {
        while let Some((gap, fault, outage)) = self.schedule.next() {
            tokio::select! {
                _ = tokio::time::sleep(gap) => {}
                _ = done.wait_for(|d| *d) => return,
            }
            if *done.borrow() {
                return;
            }
            let at = load_start.elapsed();
            let record = self.inject(fault, outage, at).await;
            if !self.quiet {
                let line = ChaosReport {
                    injected: vec![record.clone()],
                    ..ChaosReport::default()
                }
                .lines()
                .remove(0);
                eprintln!("loadgen: {}: chaos: {line}", self.label);
            }
            self.report.injected.push(record);
        }
    }

    async fn inject(&mut self, fault: Fault, outage: Duration, at: Duration) -> FaultRecord {
        let started = Instant::now();
        let mut record = FaultRecord {
            fault: fault.name(),
            at_ms: at.as_millis() as u64,
            outage_ms: if matches!(fault, Fault::KillServer | Fault::KillNode) {
                0
            } else {
                outage.as_millis() as u64
            },
            back_after_ms: None,
            error: None,
            victim: None,
        };
        let result = match fault {
            Fault::KillServer => self.kill_server(&mut record.victim).await,
            Fault::KillNode => self.kill_node(&mut record.victim).await,
            Fault::PauseServer => self.pause_server(outage, &mut record.victim).await,
            Fault::KillRedis | Fault::PauseRedis | Fault::KillPostgres | Fault::PausePostgres => {
                let service = match fault.victim() {
                    Victim::Redis => self.redis.as_deref_mut(),
                    _ => self.postgres.as_deref_mut(),
                };
                match service {
                    None => Err(format!("{}: no own service to fault", fault.name())),
                    Some(svc) if fault.is_kill() => match svc.kill().await {
                        Ok(()) => {
                            tokio::time::sleep(outage).await;
                            svc.restart().await
                        }
                        Err(e) => Err(e),
                    },
                    Some(svc) => match svc.pause() {
                        Ok(()) => {
                            tokio::time::sleep(outage).await;
                            match svc.resume() {
                                Ok(()) => svc.wait_ready(SERVICE_STARTUP).await,
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    },
                }
            }
        };
        match result {
            Ok(()) => record.back_after_ms = Some(started.elapsed().as_millis() as u64),
            Err(e) => record.error = Some(e),
        }
        record
    }

    /// Stage `services`: the server loadgen started is the supervisor of the deployment.
    fn supervises(&self) -> bool {
        self.restart.stage == "services"
    }

    /// SIGKILL, then the same stage started again on the same database and port. On
    /// `services` the supervisor is killed, its nodes die with it (each asked the kernel for
    /// SIGKILL when its parent dies, `PR_SET_PDEATHSIG`), and the deployment is started again
    /// once every one of them is gone (two payments nodes must never write the books at once).
    async fn kill_server(&mut self, victim: &mut Option<String>) -> Result<(), String> {
        let Some(pid) = self.spawned.pid() else {
            return Err("the server is not running".into());
        };
        let nodes = if self.supervises() {
            let nodes = children_of(pid);
            *victim = Some(format!(
                "the supervisor (pid {pid}) and its {} nodes",
                nodes.len()
            ));
            nodes
        } else {
            vec![]
        };
        let place = self.spawned.kill9_in_place().await;
        let give_up = Instant::now() + Duration::from_secs(10);
        while let Some(left) = nodes.iter().find(|n| n.alive()) {
            if Instant::now() >= give_up {
                return Err(format!(
                    "node pid {} still running 10 s after its supervisor was killed",
                    left.pid
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = &self.restart;
        match server::start_in(
            r.bin,
            r.stage,
            Some(&place),
            r.database,
            r.settings,
            r.extra_args,
        )
        .await
        {
            Ok(new) => {
                // the dead server's handle goes; the new one owns the directory now
                *self.spawned = new;
                Ok(())
            }
            Err(failure) => Err(format!("restart failed: {}", failure.reason)),
        }
    }

    /// `GET /api/v2/admin/nodes` on the stage (its gateway): its inventory nodes, and how
    /// many shards no live node holds.
    async fn topology(&self, conn: &mut Conn) -> Result<(Vec<NodeSeen>, usize), String> {
        let auth = format!("Bearer {}", server::admin_token());
        let r = conn
            .send(
                "GET",
                "/api/v2/admin/nodes",
                &[("Authorization", &auth)],
                None,
            )
            .await
            .map_err(|f| format!("GET /api/v2/admin/nodes: {}", f.as_str()))?;
        if r.status != 200 {
            return Err(format!("GET /api/v2/admin/nodes: status {}", r.status));
        }
        let doc: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("GET /api/v2/admin/nodes: not JSON ({e})"))?;
        let unowned = doc["unownedShards"].as_array().map_or(0, |a| a.len());
        let nodes = doc["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter(|n| n["role"] == "inventory")
                    .filter_map(|n| {
                        Some(NodeSeen {
                            id: n["id"].as_str()?.to_owned(),
                            pid: u32::try_from(n["pid"].as_i64()?).ok()?,
                            up: n["state"] == "up",
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((nodes, unowned))
    }

    /// SIGKILL one inventory node that is up (drawn from the seed), once `/proc` shows it is
    /// a child of the supervisor loadgen started; then until the supervisor has started it
    /// again (the same id up under a new pid, its child too) and every shard has an owner.
    async fn kill_node(&mut self, victim: &mut Option<String>) -> Result<(), String> {
        let supervisor = self.spawned.pid().ok_or("the server is not running")?;
        let mut conn = Conn::new(self.spawned.addr, Duration::from_secs(2));
        let mut up: Vec<NodeSeen> = self
            .topology(&mut conn)
            .await?
            .0
            .into_iter()
            .filter(|n| n.up)
            .collect();
        if up.is_empty() {
            return Err("no inventory node is up".into());
        }
        up.sort_by(|a, b| a.id.cmp(&b.id));
        let node = up.swap_remove(self.node_pick.gen_range(0..up.len()));
        *victim = Some(format!("{} (pid {})", node.id, node.pid));
        let parent = parent_of(node.pid);
        if parent != Some(supervisor) {
            let seen = match parent {
                Some(p) => format!("its parent is pid {p}"),
                None => "no such process".into(),
            };
            return Err(format!(
                "{} (pid {}) is not a child of the supervisor loadgen started (pid {supervisor}; {seen}): left alone",
                node.id, node.pid
            ));
        }
        signal(node.pid, libc::SIGKILL, false)?;
        let give_up = Instant::now() + SERVICE_STARTUP;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok((nodes, unowned)) = self.topology(&mut conn).await {
                let back = nodes.iter().any(|n| {
                    n.id == node.id
                        && n.up
                        && n.pid != node.pid
                        && parent_of(n.pid) == Some(supervisor)
                });
                if back && unowned == 0 {
                    return Ok(());
                }
            }
            if Instant::now() >= give_up {
                return Err(format!(
                    "{} not back (up under a new pid, every shard owned) within {} s",
                    node.id,
                    SERVICE_STARTUP.as_secs()
                ));
            }
        }
    }

    /// SIGSTOP for `outage`, SIGCONT, then until the server answers its health check. On
    /// `services`, the whole deployment: the supervisor first (so it starts no node
    /// meanwhile), then each of its children as `/proc` lists them; resumed in the reverse
    /// order.
    async fn pause_server(
        &mut self,
        outage: Duration,
        victim: &mut Option<String>,
    ) -> Result<(), String> {
        let pid = self.spawned.pid().ok_or("the server is not running")?;
        signal(pid, libc::SIGSTOP, false)?;
        // Listed once the supervisor is stopped: it can start no new child now, and one that
        // exits stays a zombie (its pid not reusable) until the supervisor reaps it.
        let nodes = if self.supervises() {
            children_of(pid)
        } else {
            vec![]
        };
        let mut stopped = vec![];
        let mut failed = None;
        for node in &nodes {
            match signal(node.pid, libc::SIGSTOP, false) {
                Ok(()) => stopped.push(node.pid),
                Err(e) => failed = Some(e),
            }
        }
        if self.supervises() {
            *victim = Some(format!(
                "the supervisor (pid {pid}) and its {} nodes",
                stopped.len()
            ));
        }
        if failed.is_none() {
            tokio::time::sleep(outage).await;
        }
        for node in stopped.iter().rev() {
            if let Err(e) = signal(*node, libc::SIGCONT, false) {
                failed.get_or_insert(e);
            }
        }
        signal(pid, libc::SIGCONT, false)?;
        if let Some(e) = failed {
            return Err(e);
        }
        let give_up = Instant::now() + SERVICE_STARTUP;
        let mut conn = Conn::new(self.spawned.addr, Duration::from_secs(2));
        loop {
            if matches!(conn.get("/health").await, Ok(r) if r.status == 200) {
                return Ok(());
            }
            if Instant::now() >= give_up {
                return Err("no health answer after SIGCONT".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An inventory node as the topology lists it.
struct NodeSeen {
    id: String,
    pid: u32,
    up: bool,
}

/// `/proc/PID/stat` after the command's name: `state ppid pgrp …` (the name may hold spaces
/// and parentheses: split after the last `)`).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The parent of `pid`, from `/proc/PID/stat` (`None` if there is no such process).
fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// A process as `/proc` showed it: its pid and its start time, so a pid reused later is not
/// taken for it.
struct Proc {
    pid: u32,
    started: String,
}

impl Proc {
    /// Still running: there, not a zombie, and the same process.
    fn alive(&self) -> bool {
        stat_fields(self.pid).is_some_and(|f| {
            f.first().is_some_and(|state| state != "Z")
                && f.get(19).is_some_and(|s| *s == self.started)
        })
    }
}

/// The live children of `parent`, from `/proc`.
fn children_of(parent: u32) -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let f = stat_fields(pid)?;
            let child = f.get(1)?.parse::<u32>().ok()? == parent && f.first()? != "Z";
            child.then(|| Proc {
                pid,
                started: f.get(19).cloned().unwrap_or_default(),
            })
        })
        .collect()
}

const PG_BIN_DIRS: &[&str] = &["/usr/lib/postgresql"];

/// `name` on PATH, else in `<dir>/*/bin/` for each of `extra` (Debian's PostgreSQL layout).
fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    for base in extra {
        let mut found: Vec<PathBuf> = std::fs::read_dir(base)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin").join(name))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
    }
    None
}

fn temp_dir(what: &str, port: u16) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("loadgen-{}-{what}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// The uid and gid of user `postgres`.
fn postgres_user() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; read at once, and this
    // process calls it from one place only.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> StageSpec {
        StageSpec::parse(s, "--stages").unwrap()
    }

    #[test]
    fn faults_are_parsed_named_in_errors_and_kept_to_the_stages_they_apply_to() {
        let plan = Plan::parse(
            &[
                "kill-server".into(),
                "kill-redis".into(),
                "kill-postgres".into(),
            ],
            "1s..2s",
            "300ms",
        )
        .unwrap()
        .unwrap();
        let names = |v: Vec<Fault>| v.iter().map(|f| f.name()).collect::<Vec<_>>();
        let (on, off) = plan.split(&spec("actor"));
        assert_eq!(names(on), ["kill-server"]);
        assert_eq!(names(off), ["kill-redis", "kill-postgres"]);
        let (on, _) = plan.split(&spec("locked@postgres"));
        assert_eq!(names(on), ["kill-server", "kill-redis", "kill-postgres"]);
        // `services`: its own faults, PostgreSQL's, and the server's (on the whole deployment)
        let all = Plan::parse(
            &Fault::ALL
                .iter()
                .map(|f| f.name().to_owned())
                .collect::<Vec<_>>(),
            "1s",
            "1s",
        )
        .unwrap()
        .unwrap();
        let (on, off) = all.split(&spec("services"));
        assert_eq!(
            names(on),
            [
                "kill-server",
                "pause-server",
                "kill-postgres",
                "pause-postgres",
                "kill-node"
            ]
        );
        assert_eq!(names(off), ["kill-redis", "pause-redis"]);
        let (on, _) = all.split(&spec("actor@postgres"));
        assert!(!names(on).contains(&"kill-node"));
        // the order given does not change the schedule
        let reversed = Plan::parse(&["kill-redis".into(), "kill-server".into()], "1s", "1s")
            .unwrap()
            .unwrap();
        assert_eq!(names(reversed.faults), ["kill-server", "kill-redis"]);
        let e = Plan::parse(&["kill-everything".into()], "1s", "1s").unwrap_err();
        assert!(
            e.starts_with("--chaos kill-everything: unknown fault"),
            "{e}"
        );
        assert!(Plan::parse(&[], "1s", "1s").unwrap().is_none());
        let e = Plan::parse(&["kill-server".into()], "2s..1s", "1s").unwrap_err();
        assert!(e.contains("--chaos-gap"), "{e}");
        let e = Plan::parse(&["kill-server".into()], "1s", "soon").unwrap_err();
        assert!(e.starts_with("--chaos-outage soon"), "{e}");
    }

    #[test]
    fn a_processs_parent_is_read_from_proc() {
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(parent_of(child.id()), Some(std::process::id()));
        // listed among this process's children, and alive until killed (a zombie is not)
        let listed = children_of(std::process::id());
        let seen = listed.iter().find(|p| p.pid == child.id()).expect("listed");
        assert!(seen.alive());
        child.kill().unwrap();
        let give_up = std::time::Instant::now() + Duration::from_secs(5);
        while seen.alive() && std::time::Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!seen.alive(), "killed, not yet reaped: a zombie");
        assert!(children_of(std::process::id())
            .iter()
            .all(|p| p.pid != child.id()));
        child.wait().unwrap();
        assert_eq!(parent_of(child.id()), None, "reaped: no such process");
        assert!(!seen.alive());
    }

    #[test]
    fn the_same_seed_draws_the_same_schedule_and_another_seed_another() {
        let plan = Plan::parse(
            &["kill-server".into(), "pause-server".into()],
            "100ms..2s",
            "50ms..1s",
        )
        .unwrap()
        .unwrap();
        let draw = |seed| {
            let mut s = Schedule::new(seed, plan.faults.clone(), &plan);
            (0..8).map(|_| s.next().unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        for (gap, _, outage) in draw(7) {
            assert!(gap >= Duration::from_millis(100) && gap <= Duration::from_secs(2));
            assert!(outage >= Duration::from_millis(50) && outage <= Duration::from_secs(1));
        }
        let kinds: std::collections::HashSet<&str> =
            draw(7).iter().map(|(_, f, _)| f.name()).collect();
        assert_eq!(kinds.len(), 2, "both faults drawn in 8: {kinds:?}");
    }
}
