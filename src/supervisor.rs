//! `ticketflow serve --stage services`: the whole deployment on one machine. It starts one
//! catalog, one payments node, N inventory nodes and the gateway (on `--bind`) as child
//! processes of this one, each on a free loopback port, and watches them.
//!
//! - Every child gets this command's own settings, so `--seed`, `--hold-ttl`, `--lease-ttl`,
//!   … mean the same for it; only what names one process (`--bind`, `--node-id`) differs.
//! - A child that dies is logged with the last line it wrote and shown as down in the
//!   topology; it is started again only with `--restart-nodes`, so a failover can be watched.
//! - SIGINT or SIGTERM stops them all (gateway first). Each child asks the kernel to kill it
//!   when this process dies (`PR_SET_PDEATHSIG`), so none outlives a `kill -9` of it.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::ServeArgs;
use crate::config::NodeRole;
use crate::store::{backend, Backend, Store};

/// How long a node may take to open the database and report its address.
const START_WITHIN: Duration = Duration::from_secs(60);
/// How long the nodes get to stop by themselves before they are killed.
const STOP_WITHIN: Duration = Duration::from_secs(15);
/// Lines of a node's output kept to explain its death.
const LAST_LINES: usize = 5;

/// Flags of `serve` that only the supervisor reads, or that it sets per child: (flag,
/// whether it takes a value).
const OWN_FLAGS: [(&str, bool); 6] = [
    ("--stage", true),
    ("--bind", true),
    ("--inventory-nodes", true),
    ("--restart-nodes", false),
    ("--demo-data", false),
    ("--admin-token", true),
];

/// `args` (what followed `serve`) without the flags the supervisor handles itself.
pub fn child_args(args: &[String]) -> Vec<String> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let own = OWN_FLAGS.iter().find(|(flag, _)| {
            arg == flag || arg.strip_prefix(flag).is_some_and(|r| r.starts_with('='))
        });
        match own {
            Some((flag, takes_value)) => skip_value = *takes_value && arg == flag,
            None => kept.push(arg.clone()),
        }
    }
    kept
}

/// One child process and what is known of it.
struct Node {
    id: String,
    role: NodeRole,
    child: Option<Child>,
    pid: u32,
    last_lines: Arc<Mutex<VecDeque<String>>>,
    restarts: u32,
}

struct Plan {
    exe: std::path::PathBuf,
    args: Vec<String>,
    token: String,
    gateway_bind: String,
    demo_data: bool,
}

impl Plan {
    fn spawn(&self, id: &str, role: NodeRole) -> anyhow::Result<Node> {
        let mut command = Command::new(&self.exe);
        command
            .arg("node")
            .arg(role.as_str())
            .args(&self.args)
            .args(["--node-id", id, "--admin-token", &self.token])
            .env_remove("TICKETFLOW_STAGE")
            .env_remove("TICKETFLOW_BIND")
            .env_remove("TICKETFLOW_NODE_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if role == NodeRole::Gateway {
            command.args(["--bind", &self.gateway_bind]);
            if self.demo_data {
                command.arg("--demo-data");
            }
        } else {
            command.args(["--bind", "127.0.0.1:0"]);
        }
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls: prctl and getppid.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the line above: then nobody would kill us.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting node {id} ({})", self.exe.display()))?;
        let pid = child.id().unwrap_or_default();
        let last_lines = Arc::new(Mutex::new(VecDeque::with_capacity(LAST_LINES)));
        if let Some(stderr) = child.stderr.take() {
            let lines = Arc::clone(&last_lines);
            let id = id.to_owned();
            actix_rt::spawn(async move {
                let mut reader = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    eprintln!("[{id}] {line}");
                    let mut kept = lines.lock().expect("log lines poisoned");
                    if kept.len() == LAST_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
            });
        }
        Ok(Node {
            id: id.to_owned(),
            role,
            child: Some(child),
            pid,
            last_lines,
            restarts: 0,
        })
    }
}

impl Node {
    /// The last line the node wrote that says what went wrong (or just its last line).
    fn last_words(&self) -> String {
        let lines = self.last_lines.lock().expect("log lines poisoned");
        lines
            .iter()
            .rev()
            .find(|l| l.contains("error"))
            .or(lines.back())
            .cloned()
            .unwrap_or_else(|| "(it wrote nothing)".into())
    }
}

/// Waits until `node` has reported itself in the database with its pid and a real port, or
/// fails with what it said if it exits first.
async fn wait_ready(store: &Store, node: &mut Node) -> anyhow::Result<String> {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Some(child) = node.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                // Let the last lines arrive.
                tokio::time::sleep(Duration::from_millis(200)).await;
                bail!(
                    "node {} exited during start ({status}): {}",
                    node.id,
                    node.last_words()
                );
            }
        }
        let rows = store.service_nodes(Duration::from_secs(3600)).await?;
        if let Some(row) = rows.iter().find(|r| r.id == node.id) {
            let ported = row.addr.rsplit(':').next().is_some_and(|p| p != "0");
            if row.pid == i64::from(node.pid) && ported && answers(&row.addr).await {
                return Ok(row.addr.clone());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "node {} did not report itself within {START_WITHIN:?}: {}",
                node.id,
                node.last_words()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a server answers `GET /health` at `addr` (any status: it is up and serving).
async fn answers(addr: &str) -> bool {
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return false;
    };
    client
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .is_ok()
}

/// Stops every node: SIGTERM (gateway first), then SIGKILL for those still running after
/// [`STOP_WITHIN`].
async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter().rev() {
        if node.child.is_some() {
            // SAFETY: kill(2) on a pid this process started and has not reaped.
            unsafe {
                libc::kill(node.pid as i32, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + STOP_WITHIN;
    for node in nodes.iter_mut().rev() {
        let Some(child) = node.child.as_mut() else {
            continue;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(node = %node.id, "did not stop in time; killing it");
                let _ = child.kill().await;
            }
        }
        node.child = None;
    }
}

/// Runs the deployment until SIGINT or SIGTERM. `raw` is what followed `serve` on the
/// command line.
pub async fn run(args: &ServeArgs, raw: &[String]) -> anyhow::Result<()> {
    let settings = args.settings();
    args.services.check().map_err(anyhow::Error::msg)?;
    let url = crate::store::DatabaseUrl::parse(&settings.database, settings.durability)
        .map_err(|e| anyhow::anyhow!(backend::open_failure(&settings.database, &e)))?;
    if url.backend != Backend::Postgres {
        bail!("stage services runs on PostgreSQL only (its shard leases live there): give --db postgres://USER@HOST:PORT/DATABASE");
    }
    // Opened here first, so a wrong --db is one line from this process, not five from its
    // children; the migrations run once.
    let store = Store::open(&settings.database, settings.durability)
        .await
        .map_err(|e| anyhow::anyhow!(backend::open_failure(&settings.database, &e)))?;
    store.ensure_shards().await?;
    let token = settings
        .admin_token
        .clone()
        .unwrap_or_else(|| format!("tfa_{}", uuid::Uuid::new_v4().simple()));
    if settings.admin_token.is_none() {
        tracing::warn!(admin_token = %token, "no --admin-token given; made one for this run (the admin routes and the nodes' calls need it)");
    }
    let plan = Plan {
        exe: std::env::current_exe().context("finding this program to start the nodes")?,
        args: child_args(raw),
        token,
        gateway_bind: settings.bind.to_string(),
        demo_data: settings.demo_data,
    };
    let inventory = args.services.inventory_nodes.unwrap_or(3);
    let mut order: Vec<(String, NodeRole)> = vec![
        ("catalog-1".into(), NodeRole::Catalog),
        ("payments-1".into(), NodeRole::Payments),
    ];
    order.extend((1..=inventory).map(|i| (format!("inventory-{i}"), NodeRole::Inventory)));
    order.push(("gateway-1".into(), NodeRole::Gateway));

    let mut nodes: Vec<Node> = Vec::new();
    for (id, role) in &order {
        if *role == NodeRole::Gateway {
            // Clients come through the gateway: let the inventory nodes spread the shards
            // first, so that no purchase meets a shard being handed from node to node.
            balanced(&store, inventory as usize, &settings.services).await?;
        }
        let started = match plan.spawn(id, *role) {
            Ok(node) => node,
            Err(error) => {
                stop_all(&mut nodes).await;
                return Err(error);
            }
        };
        nodes.push(started);
        let node = nodes.last_mut().expect("just pushed");
        match wait_ready(&store, node).await {
            Ok(addr) => tracing::info!(node = %id, role = %role, %addr, pid = node.pid, "node up"),
            Err(error) => {
                stop_all(&mut nodes).await;
                return Err(error);
            }
        }
    }
    tracing::info!(
        addr = %settings.bind,
        inventory_nodes = inventory,
        restart_nodes = args.services.restart_nodes,
        "ticketflow services listening; Ctrl-C stops every node"
    );
    watch(&store, &plan, &mut nodes, args.services.restart_nodes).await;
    stop_all(&mut nodes).await;
    store.close().await;
    Ok(())
}

/// Waits (for at most a lease and ten renewals) until every shard has an owner and each of the
/// `inventory` nodes holds its fair share, as their lease keepers reckon it: at most
/// `ceil(SHARDS / inventory)`, and at least what the others leave. Past the bound it goes on
/// with a warning: the nodes keep balancing while the gateway serves.
async fn balanced(
    store: &Store,
    inventory: usize,
    services: &crate::config::ServicesSettings,
) -> anyhow::Result<()> {
    use crate::store::shards::SHARDS;
    let shards = SHARDS as usize;
    let fair = shards.div_ceil(inventory.max(1));
    let least = shards.saturating_sub(fair * (inventory.max(1) - 1));
    let deadline = std::time::Instant::now() + services.lease_ttl + services.renew_every * 10;
    loop {
        let leases = store.shard_leases().await?;
        let mut held: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let mut unowned = 0;
        for lease in &leases {
            match lease.owner.as_deref() {
                Some(owner) if lease.remaining_ms > 0 => *held.entry(owner).or_default() += 1,
                _ => unowned += 1,
            }
        }
        let spread = held.len() == inventory && held.values().all(|n| (least..=fair).contains(n));
        if unowned == 0 && spread {
            tracing::info!(?held, "the inventory nodes hold their shares of the shards");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                ?held,
                unowned,
                "the shards are not balanced yet; starting the gateway anyway"
            );
            return Ok(());
        }
        tokio::time::sleep(services.renew_every / 4).await;
    }
}

/// Watches the nodes until a stop signal: logs each death, marks the node down, restarts it
/// if asked to.
async fn watch(store: &Store, plan: &Plan, nodes: &mut [Node], restart: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stopping the nodes");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping every node"); return; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping every node"); return; }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for node in nodes.iter_mut() {
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            node.child = None;
            tracing::error!(node = %node.id, role = %node.role, pid = node.pid, %status, last = %node.last_words(), "a node died");
            if let Err(error) = store.node_gone(&node.id).await {
                tracing::warn!(%error, "could not mark the node down");
            }
            if restart {
                match plan.spawn(&node.id, node.role) {
                    Ok(mut again) => {
                        again.restarts = node.restarts + 1;
                        tracing::info!(node = %node.id, pid = again.pid, restarts = again.restarts, "restarted the node");
                        *node = again;
                    }
                    Err(error) => {
                        tracing::error!(node = %node.id, %error, "could not restart the node")
                    }
                }
            }
        }
    }
}

/// The id the payments node of `serve --stage saga` reports under: one id for every saga
/// process on a database, so a node started again (by this process or another) after one died
/// starts at once instead of waiting for the dead one's report to age.
pub const SAGA_PAYMENTS_ID: &str = "saga-payments";
/// The id of the inventory node `serve --stage saga` starts, for the same reason: a node
/// started again under it gives back the leases its dead predecessor held and takes them
/// again at a higher epoch at once ([`crate::stages::services`]).
pub const SAGA_INVENTORY_ID: &str = "saga-inventory";

/// A participant node a saga process keeps: its role, the id it runs under, and the advisory
/// lock a saga process holds while it starts one, so that of two processes finding none, one
/// starts it (the payments books have one writer; an inventory node id one process).
#[derive(Debug, Clone, Copy)]
struct Kept {
    role: NodeRole,
    id: &'static str,
    lock: i64,
}

const PAYMENTS: Kept = Kept {
    role: NodeRole::Payments,
    id: SAGA_PAYMENTS_ID,
    lock: 0x7466_7061_7973, // "tfpays"
};
const INVENTORY: Kept = Kept {
    role: NodeRole::Inventory,
    id: SAGA_INVENTORY_ID,
    lock: 0x7466_696e_7673, // "tfinvs"
};

/// A participant node of a `serve --stage saga` process (the payments node, or the inventory
/// node owning the events' shards): a child process (`ticketflow node payments|inventory`) it
/// starts when no node of that role answers on its database, and starts again when it dies.
/// Another saga process on the same database uses the node that is up instead of starting its
/// own; if that one dies with its parent, a survivor starts the next. The same keeper as the
/// `services` supervisor's nodes ([`Plan::spawn`], [`wait_ready`], [`stop_all`]).
pub struct SagaNode {
    stop: Arc<tokio::sync::Notify>,
    task: actix_rt::task::JoinHandle<()>,
}

/// The saga's payments node (the name it had when it was the only one).
pub type SagaPayments = SagaNode;

impl SagaNode {
    /// Makes sure a payments node answers on `settings`' database (starting one if none
    /// does), and keeps it so. See [`SagaNode::keep`].
    pub async fn start(
        raw: &[String],
        settings: &mut crate::config::Settings,
    ) -> anyhow::Result<Option<Self>> {
        Self::keep(raw, settings, PAYMENTS).await
    }

    /// Makes sure an inventory node answers on `settings`' database, holding the events'
    /// shards (starting one if none does), and keeps it so.
    pub async fn inventory(
        raw: &[String],
        settings: &mut crate::config::Settings,
    ) -> anyhow::Result<Option<Self>> {
        Self::keep(raw, settings, INVENTORY).await
    }

    /// Sets `settings.admin_token` (made up when not given), which the nodes and this process
    /// share. `None` on a database that is not PostgreSQL: the stage refuses it in its own
    /// words.
    async fn keep(
        raw: &[String],
        settings: &mut crate::config::Settings,
        kept: Kept,
    ) -> anyhow::Result<Option<Self>> {
        let url = crate::store::DatabaseUrl::parse(&settings.database, settings.durability)
            .map_err(|e| anyhow::anyhow!(backend::open_failure(&settings.database, &e)))?;
        if url.backend != Backend::Postgres {
            return Ok(None);
        }
        // Opened (and migrated) here first; the keeper needs only a connection or two.
        let opened = Store::open(&settings.database, settings.durability)
            .await
            .map_err(|e| anyhow::anyhow!(backend::open_failure(&settings.database, &e)))?;
        let store = opened.with_own_pool(2).await?;
        opened.close().await;
        let token = match &settings.admin_token {
            Some(token) => token.clone(),
            None => {
                let token = format!("tfa_{}", uuid::Uuid::new_v4().simple());
                tracing::warn!(admin_token = %token, "no --admin-token given; made one for this run (API v2 admin routes and the saga's nodes need it)");
                settings.admin_token = Some(token.clone());
                token
            }
        };
        let plan = Plan {
            exe: std::env::current_exe()
                .context("finding this program to start the saga's nodes")?,
            args: child_args(raw),
            token,
            gateway_bind: String::new(),
            demo_data: false,
        };
        let ttl = settings.services.lease_ttl;
        let every = settings.services.renew_every;
        let mut own = None;
        // At start a node must answer, or the command fails with what the node said.
        let deadline = Instant::now() + START_WITHIN;
        while !usable(&store, kept, ttl).await {
            match ensure_node(&store, &plan, kept, ttl).await {
                Ok(Some(node)) => {
                    own = Some(node);
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(every).await;
                }
                Ok(None) => bail!("no {} node answered within {START_WITHIN:?}", kept.role),
                Err(error) => return Err(error),
            }
        }
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = actix_rt::spawn(keep_node(
            store,
            plan,
            kept,
            own,
            ttl,
            every,
            Arc::clone(&stop),
        ));
        Ok(Some(Self { stop, task }))
    }

    /// Stops the node this process started, if it did.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// Whether the node of `kept`'s role that reported itself last (within ten lease TTLs: a
/// report late under load still counts) answers at its address. A dead node's address
/// refuses at once.
async fn usable(store: &Store, kept: Kept, ttl: Duration) -> bool {
    match store.live_node(kept.role.as_str(), ttl * 10).await {
        Ok(Some((_, addr))) => answers(&addr).await,
        _ => false,
    }
}

/// Starts this process's node of `kept` and waits for it to answer, unless another process
/// is starting one (then `None`).
async fn ensure_node(
    store: &Store,
    plan: &Plan,
    kept: Kept,
    ttl: Duration,
) -> anyhow::Result<Option<Node>> {
    let Some(lock) = store.try_advisory_lock(kept.lock).await? else {
        return Ok(None);
    };
    // Started by another process between our look and the lock.
    if usable(store, kept, ttl).await {
        return Ok(None);
    }
    let mut node = plan.spawn(kept.id, kept.role)?;
    let addr = wait_ready(store, &mut node).await?;
    tracing::info!(node = kept.id, %addr, pid = node.pid, "a node of the saga is up");
    drop(lock);
    Ok(Some(node))
}

/// Watches the node: when this process's own dies, it is marked down and, unless another one
/// answers by then, started again (under the same id, on a new port; the saga's calls find it
/// in `service_nodes`).
async fn keep_node(
    store: Store,
    plan: Plan,
    kept: Kept,
    mut own: Option<Node>,
    ttl: Duration,
    every: Duration,
    stop: Arc<tokio::sync::Notify>,
) {
    // Rounds in a row that found no node answering (this process's own not running).
    let mut missed = 0;
    loop {
        tokio::select! {
            () = stop.notified() => break,
            () = tokio::time::sleep(every) => {}
        }
        if let Some(node) = own.as_mut() {
            let exited = node.child.as_mut().map(|c| c.try_wait());
            match exited {
                Some(Ok(None)) => continue,
                Some(Ok(Some(status))) => {
                    tracing::error!(node = %node.id, pid = node.pid, %status, last = %node.last_words(), "a node of the saga died; starting it again");
                }
                _ => {}
            }
            if let Err(error) = store.node_gone(&node.id).await {
                tracing::warn!(%error, node = %node.id, "could not mark the node down");
            }
            own = None;
            // Ours died: start the next one at once unless another answers.
            missed = 1;
        }
        if usable(&store, kept, ttl).await {
            missed = 0;
            continue;
        }
        // Another process's node: one slow answer under load is no reason to start a second
        // one (a second writer of the books), so it must fail two rounds in a row.
        missed += 1;
        if missed < 2 {
            continue;
        }
        match ensure_node(&store, &plan, kept, ttl).await {
            Ok(node) => own = node,
            Err(error) => {
                tracing::error!(%error, role = %kept.role, "could not start a node of the saga; trying again")
            }
        }
    }
    if let Some(node) = own.as_mut() {
        stop_all(std::slice::from_mut(node)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_supervisors_own_flags_are_not_passed_to_the_nodes() {
        let raw = strings(&[
            "--stage",
            "services",
            "--db",
            "postgres://x/y",
            "--inventory-nodes=2",
            "--restart-nodes",
            "--bind",
            "0.0.0.0:9000",
            "--seed",
            "7",
            "--admin-token=secret",
            "--demo-data",
            "--hold-ttl",
            "5s",
        ]);
        assert_eq!(
            child_args(&raw),
            strings(&["--db", "postgres://x/y", "--seed", "7", "--hold-ttl", "5s"])
        );
    }

    #[test]
    fn a_flag_that_only_starts_like_an_own_flag_is_kept() {
        let raw = strings(&["--stagger", "1", "--bind-extra=3"]);
        assert_eq!(child_args(&raw), raw);
    }
}
