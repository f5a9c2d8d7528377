//! Starting a stage fresh for `compare` (or `run --stage`): the server binary on a free port,
//! a fresh database (a SQLite file in a temporary directory, or the PostgreSQL database
//! `backend::TempDatabase` made for it), the run's seed; stopped with SIGTERM.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::backend::TempDatabase;
use crate::http::Conn;
use crate::scenario::Settings;

/// How long a stage may take to answer `GET /health` before it is reported as skipped.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running server this process started. Dropped without [`Spawned::stop`] (an interrupted
/// run), it is killed and its temporary directory removed.
pub struct Spawned {
    pub addr: SocketAddr,
    /// Its command line as reported (a password in a `--db` URL hidden).
    pub args: Vec<String>,
    child: Child,
    dir: PathBuf,
    /// Whether stopping it removes `dir` (false while another process shares the directory).
    owns_dir: bool,
    port: u16,
    /// The Redis keys this run gave it (stage `locked`), removed with `dir`.
    redis: Option<RedisKeys>,
}

/// Where a started server keeps its SQLite file: a fresh directory, or one given (to restart
/// on the same file, or to share it with another process), removed at stop when `own`.
#[derive(Debug, Clone)]
pub struct Place {
    pub dir: PathBuf,
    pub own: bool,
    /// Bind this port again (a server restarted by `--chaos` keeps its address); `None`: a
    /// free one.
    pub port: Option<u16>,
}

/// Where the server binary is: `--server-bin`, else `ticketflow` next to this executable
/// (the same Cargo target directory).
pub fn locate_server(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(format!("--server-bin {}: no such file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe.parent().ok_or("this executable has no directory")?;
    let name = format!("ticketflow{}", std::env::consts::EXE_SUFFIX);
    for candidate in [dir.join(&name), dir.join("..").join(&name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "no `{name}` next to {}; build it (`cargo build -p ticketflow`, with --release for \
         figures) or pass --server-bin",
        dir.display()
    ))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Why a stage did not start, and the command line it was started with if it got that far.
#[derive(Debug)]
pub struct StartFailure {
    pub reason: String,
    pub args: Option<Vec<String>>,
}

impl From<String> for StartFailure {
    fn from(reason: String) -> Self {
        Self { reason, args: None }
    }
}

/// Starts `stage` on `database` (`None`: a fresh SQLite file in the temporary directory),
/// waits for `GET /health`, or says why it could not. A port taken between choosing it and
/// the server binding it (another run starting at the same moment) is retried on another port.
static ADMIN_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the admin token this run uses (`--admin-token`); without one, a random one is made.
/// The first call wins.
pub fn set_admin_token(token: Option<String>) {
    let _ = ADMIN_TOKEN
        .set(token.unwrap_or_else(|| format!("loadgen-{:032x}", rand::random::<u128>())));
}

/// The admin token of this run: handed to every server loadgen starts, sent to the admin routes.
pub fn admin_token() -> &'static str {
    ADMIN_TOKEN.get_or_init(|| format!("loadgen-{:032x}", rand::random::<u128>()))
}

pub async fn start(
    bin: &Path,
    stage: &str,
    database: Option<&TempDatabase>,
    settings: &Settings,
    extra_args: &[String],
) -> Result<Spawned, StartFailure> {
    start_in(bin, stage, None, database, settings, extra_args).await
}

/// [`start`], with the SQLite file in `place` when given (`ticketflow.db` there).
pub async fn start_in(
    bin: &Path,
    stage: &str,
    place: Option<&Place>,
    database: Option<&TempDatabase>,
    settings: &Settings,
    extra_args: &[String],
) -> Result<Spawned, StartFailure> {
    let mut last = StartFailure::from(String::new());
    for _ in 0..3 {
        match start_once(bin, stage, place, database, settings, extra_args).await {
            Ok(spawned) => return Ok(spawned),
            Err(why) if why.reason.to_ascii_lowercase().contains("in use") => {
                last = why;
                if place.is_some_and(|p| p.port.is_some()) {
                    // the same port again, once whatever held it lets go
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Err(why) => return Err(why),
        }
    }
    Err(last)
}

async fn start_once(
    bin: &Path,
    stage: &str,
    place: Option<&Place>,
    database: Option<&TempDatabase>,
    settings: &Settings,
    extra_args: &[String],
) -> Result<Spawned, StartFailure> {
    let admin_token = admin_token();
    let port = match place.and_then(|p| p.port) {
        Some(port) => port,
        None => free_port().map_err(|e| format!("no free port: {e}"))?,
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (dir, owns_dir) = match place {
        Some(p) => (p.dir.clone(), p.own),
        None => (
            std::env::temp_dir().join(format!("loadgen-{}-{stage}-{port}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (db, shown_db) = match database {
        Some(pg) => (pg.url.clone(), pg.shown_url.clone()),
        None => {
            let file = dir.join("ticketflow.db").display().to_string();
            (file.clone(), file)
        }
    };
    let command_line = |db: String| {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--stage".into(),
            stage.into(),
            "--bind".into(),
            addr.to_string(),
            "--db".into(),
            db,
            "--seed".into(),
            settings.seed.to_string(),
            "--payment-latency".into(),
            settings.payment_latency.clone(),
            "--payment-failure-rate".into(),
            settings.payment_failure_rate.to_string(),
            "--hold-ttl".into(),
            settings.hold_ttl.clone(),
            // Every virtual user comes from 127.0.0.1: lift the per-client limits so a run
            // measures the stage, not the limiter (a `--server-arg` may set them again).
            "--rate-limit".into(),
            "off".into(),
        ];
        args.extend(extra_args.iter().cloned());
        args
    };
    let (args, shown_args) = (command_line(db), command_line(shown_db));
    let log = std::fs::File::create(dir.join(format!("server-{port}.log")))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut command = Command::new(bin);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to send SIGTERM to the server
    // if loadgen dies first (killed, Ctrl-C'd in a script), so no server outlives a run.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    // Each fresh stage gets its own Redis key prefix (the `locked` stage's locks, fences and
    // queue), so runs never see one another's keys; an explicit setting wins, and its keys
    // are the user's to keep. The prefix names the port, so a server restarted in place
    // (`--chaos kill-server`) finds its queue again.
    let mut redis = None;
    if std::env::var_os("TICKETFLOW_REDIS_PREFIX").is_none() {
        let prefix = format!("loadgen-{}-{stage}-{port}", std::process::id());
        command.env("TICKETFLOW_REDIS_PREFIX", &prefix);
        if stage.starts_with("locked") && flag_value(extra_args, "--redis-prefix").is_none() {
            let url = flag_value(extra_args, "--redis-url")
                .or_else(|| std::env::var("REDIS_URL").ok())
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
            redis = Some(RedisKeys { url, prefix });
        }
    }
    let child = command
        .args(&args)
        .env("TICKETFLOW_LOG_FORMAT", "human")
        // In the environment, not the arguments, so the report's command line never shows it.
        .env("TICKETFLOW_ADMIN_TOKEN", admin_token)
        // `LOADGEN_SERVER_RUST_LOG` chooses the server's log filter instead (chasing a bug)
        .env(
            "RUST_LOG",
            std::env::var("LOADGEN_SERVER_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut spawned = Spawned {
        addr,
        args: shown_args,
        child,
        dir,
        owns_dir,
        port,
        redis,
    };
    let give_up = Instant::now() + STARTUP_TIMEOUT;
    let mut conn = Conn::new(addr, Duration::from_secs(2));
    loop {
        if let Ok(Some(status)) = spawned.child.try_wait() {
            let reason = spawned.log_reason();
            spawned.cleanup();
            return Err(StartFailure {
                reason: format!("{reason} (the server exited, {status})"),
                args: Some(spawned.args.clone()),
            });
        }
        if let Ok(r) = conn.get("/health").await {
            // healthy, and still ours: a server that lost the port to another exits at once
            if r.status == 200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(None) = spawned.child.try_wait() {
                    return Ok(spawned);
                }
                continue;
            }
        }
        if Instant::now() >= give_up {
            let reason = spawned.log_reason();
            spawned.stop().await;
            return Err(StartFailure {
                reason: format!(
                    "no healthy answer on {addr} within {}s: {reason}",
                    STARTUP_TIMEOUT.as_secs()
                ),
                args: Some(spawned.args.clone()),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Spawned {
    /// The most telling line of the server's log: the first `error`, else the last line.
    fn log_reason(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("server-{}.log", self.port)))
            .unwrap_or_default();
        let clean = |l: &str| strip_ansi(l).trim().to_owned();
        text.lines()
            .find(|l| l.contains("error"))
            .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
            .map(clean)
            .unwrap_or_else(|| "it printed nothing".into())
    }

    /// SIGTERM, then up to 10 s for a graceful stop, then SIGKILL; removes the database.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: sending a signal to a child process we started and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
        self.cleanup();
    }

    /// `kill -9`: the server dies mid-whatever, its SQLite file stays; returns where it is, to
    /// start a server again on it.
    pub async fn kill9(mut self) -> Place {
        let place = self.kill9_in_place().await;
        Place {
            port: None,
            ..place
        }
    }

    /// [`Self::kill9`], leaving this handle as the dead server's (it no longer owns the
    /// directory: the returned place does); the place names the port, to bind it again.
    pub async fn kill9_in_place(&mut self) -> Place {
        let _ = self.child.kill().await;
        let place = Place {
            dir: self.dir.clone(),
            own: self.owns_dir,
            port: Some(self.port),
        };
        self.owns_dir = false;
        place
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What the server has logged so far (warnings and errors).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("server-{}.log", self.port)))
            .unwrap_or_default()
    }

    /// Where its SQLite file is, for a second process to share (not owning it).
    pub fn shared_place(&self) -> Place {
        Place {
            dir: self.dir.clone(),
            own: false,
            port: None,
        }
    }

    fn cleanup(&self) {
        if self.owns_dir {
            // `LOADGEN_KEEP_LOGS=DIR`: the server's log outlives its directory, there
            if let Some(keep) = std::env::var_os("LOADGEN_KEEP_LOGS") {
                let name = format!("server-{}-{}.log", std::process::id(), self.port);
                let _ = std::fs::create_dir_all(&keep);
                let _ = std::fs::copy(
                    self.dir.join(format!("server-{}.log", self.port)),
                    Path::new(&keep).join(name),
                );
            }
            let _ = std::fs::remove_dir_all(&self.dir);
            if let Some(keys) = &self.redis {
                if let Err(e) = keys.remove() {
                    eprintln!(
                        "loadgen: could not remove the Redis keys `{}:*` at {}: {e}",
                        keys.prefix, keys.url
                    );
                }
            }
        }
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE` in a command line; the last one wins.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut found = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == flag {
            found = args.next().cloned();
        } else if let Some(value) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            found = Some(value.to_owned());
        }
    }
    found
}

/// The keys a `locked` server wrote under a prefix this run chose: its locks, fences and job
/// queue, plus the queue's entry in apalis's one global list of queues.
#[derive(Debug, Clone)]
struct RedisKeys {
    url: String,
    prefix: String,
}

/// apalis lists every queue's workers key here, whatever its prefix.
const APALIS_QUEUES: &str = "core:apalis:queues:list";

impl RedisKeys {
    /// Deletes every key under the prefix (SCAN, so a large Redis is never blocked) and the
    /// prefix's entries in [`APALIS_QUEUES`]. Returns how many keys went. Synchronous, with
    /// short timeouts, so a drop can call it; a Redis that is gone (a chaos run's own, already
    /// stopped) fails fast.
    fn remove(&self) -> redis::RedisResult<usize> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(1))?;
        con.set_read_timeout(Some(Duration::from_secs(2)))?;
        con.set_write_timeout(Some(Duration::from_secs(2)))?;
        let ours = format!("{}:", self.prefix);
        let pattern = format!("{}*", glob_escape(&ours));
        let mut removed = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut con)?;
            if !keys.is_empty() {
                removed += redis::cmd("DEL").arg(&keys).query::<usize>(&mut con)?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let queues: Vec<String> = redis::cmd("ZRANGE")
            .arg(APALIS_QUEUES)
            .arg(0)
            .arg(-1)
            .query(&mut con)?;
        let listed: Vec<&String> = queues.iter().filter(|q| q.starts_with(&ours)).collect();
        if !listed.is_empty() {
            redis::cmd("ZREM")
                .arg(APALIS_QUEUES)
                .arg(&listed)
                .query::<usize>(&mut con)?;
        }
        Ok(removed)
    }
}

/// `text` with Redis's glob characters escaped, to match it literally in `SCAN MATCH`.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // after `stop` the child is reaped and the directory gone: both are no-ops then
        let _ = self.child.start_kill();
        self.cleanup();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
