use std::process::ExitCode;

use clap::Parser;
use ticketflow::cli::{Cli, Command};
use ticketflow::server::Server;
use ticketflow::store::{backend, Store};

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line naming the setting and the fix; `--help` has the rest.
            let rendered = e.render().to_string();
            let line: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    if let Command::Simulate(args) = &cli.command {
        return ExitCode::from(ticketflow::sim::main(args, &mut std::io::stdout().lock()));
    }
    ticketflow::telemetry::init(cli.log_format);
    if let Command::Replay(db) = &cli.command {
        return match ticketflow::replay::run(db, &mut std::io::stdout().lock()).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(line) => {
                eprintln!("error: {line}");
                ExitCode::from(2)
            }
        };
    }
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The setting and the fix (the outermost context), then what went wrong underneath.
            let root = error.root_cause().to_string();
            let top = error.to_string();
            if root == top {
                eprintln!("error: {top}");
            } else {
                eprintln!("error: {top}: {root}");
            }
            // Now, not after the runtime's teardown: background tasks dropped then could log
            // (or panic) after the one line that says what went wrong.
            std::process::exit(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate(db) => {
            let store = Store::open(&db.database, db.synchronous)
                .await
                .map_err(|e| anyhow::anyhow!(backend::open_failure(&db.database, &e)))?;
            store.close().await;
            println!(
                "database {} ({}) is up to date",
                backend::redacted(&db.database),
                store.backend()
            );
            Ok(())
        }
        Command::Simulate(_) => unreachable!("answered before the runtime is needed"),
        Command::Replay(_) => unreachable!("answered before"),
        Command::Node(args) => {
            let settings = args.settings().map_err(|e| anyhow::anyhow!(e))?;
            let role = settings.services.role;
            let server = Server::build(settings.clone()).await?;
            tracing::info!(
                addr = %server.addr(),
                role = %role,
                node = %settings.services.node_id,
                db = %backend::redacted(&settings.database),
                lease_ttl = ?settings.services.lease_ttl,
                "ticketflow node listening; Ctrl-C hands its shards back and stops it"
            );
            server.run().await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Serve(args) if args.stage == ticketflow::config::StageKind::Services => {
            // What followed `serve`, passed on to every node.
            let raw: Vec<String> = std::env::args()
                .skip_while(|a| a != "serve")
                .skip(1)
                .collect();
            ticketflow::supervisor::run(&args, &raw).await
        }
        Command::Serve(args) => {
            if args.services.inventory_nodes.is_some() || args.services.restart_nodes {
                anyhow::bail!(
                    "--inventory-nodes and --restart-nodes apply to --stage services only"
                );
            }
            backend::set_sqlite_busy_timeout(args.sqlite_busy_timeout);
            let mut settings = args.settings();
            // Stage saga: its participants are nodes of stage services: the inventory node
            // owning the events' shards, and the payments node (at --payments-url, or else
            // one this process starts and keeps), each started here unless one answers on
            // the database already.
            let mut saga_nodes = Vec::new();
            if settings.stage == ticketflow::config::StageKind::Saga {
                let raw: Vec<String> = std::env::args()
                    .skip_while(|a| a != "serve")
                    .skip(1)
                    .collect();
                if settings.services.payments_url.is_none() {
                    saga_nodes.extend(
                        ticketflow::supervisor::SagaNode::start(&raw, &mut settings).await?,
                    );
                }
                saga_nodes.extend(
                    ticketflow::supervisor::SagaNode::inventory(&raw, &mut settings).await?,
                );
            }
            let server = Server::build(settings.clone()).await?;
            tracing::info!(
                addr = %server.addr(),
                stage = %settings.stage,
                db = %backend::redacted(&settings.database),
                seed = settings.seed,
                payment_latency = %settings.payments.latency,
                "ticketflow listening; Ctrl-C stops it gracefully"
            );
            server.run().await?;
            for node in saga_nodes {
                node.stop().await;
            }
            tracing::info!("stopped");
            Ok(())
        }
    }
}
