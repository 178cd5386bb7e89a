//! The `tollgate` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tollgate::clock::SystemClock;
use tollgate::engine::Bounds;
use tollgate::ledger::Ledger;
use tollgate::policy::Policy;
use tollgate::store::Durability;

/// Tollgate: a gRPC quota decision service for LLM token budgets.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Quota and Admin gRPC services (with health and reflection).
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to serve gRPC on. Port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory of the sled database (created if missing).
    #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "./tollgate-data")]
    data_dir: PathBuf,
    /// Policy file (TOML). Without it, the embedded default policy serves.
    #[arg(long, env = "TOLLGATE_POLICY")]
    policy: Option<PathBuf>,
    /// Bearer token that Admin calls must carry. Without it, every Admin call is refused.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// strict: answer a mutating call only once it is on disk. relaxed: answer at once and
    /// flush every 10 ms (a crash may lose the last 10 ms of answered calls).
    #[arg(long, env = "TOLLGATE_DURABILITY", value_enum, default_value_t = Durability::Strict)]
    durability: Durability,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let policy = match &args.policy {
        Some(path) => Policy::from_file(path),
        None => Ok(Policy::embedded_default()),
    };
    let policy = match policy {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("tollgate: policy refused: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let ledger = match Ledger::open(
            &args.data_dir,
            policy,
            Bounds::default(),
            args.durability,
            Arc::new(SystemClock),
        ) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                eprintln!("tollgate: cannot open {}: {e}", args.data_dir.display());
                return ExitCode::FAILURE;
            }
        };
        let (listener, addr) = match tollgate::server::bind(args.listen).await {
            Ok(bound) => bound,
            Err(e) => {
                eprintln!("tollgate: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        if args.admin_token.as_deref().is_none_or(str::is_empty) {
            tracing::warn!("no --admin-token: every Admin call will be refused");
        }
        // The bound address on stdout, for scripts and tests that start on port 0.
        println!("tollgate listening on {addr}");
        tracing::info!(%addr, durability = ?args.durability, "serving");
        match tollgate::server::serve(ledger, listener, args.admin_token, shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tollgate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
