//! The `tollgate` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tollgate::clock::SystemClock;
use tollgate::engine::Bounds;
use tollgate::ledger::LocalLedger;
use tollgate::policy::Policy;
use tollgate::relay::{channel_to, ForwardingLedger, Settler, UpstreamTls};
use tollgate::sampled_log::SubjectLogging;
use tollgate::server::transport::tls::{TlsConfig, TlsFiles};
use tollgate::server::transport::DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT;
use tollgate::server::validate::DEFAULT_MAX_PROMPT_BYTES;
use tollgate::server::{Backend, ServeOptions, TransportOptions};
use tollgate::store::postgres::{LeaseConfig, PostgresStore};
use tollgate::store::sled::SledStore;
use tollgate::store::{Durability, Recovery, Store, StoreError};
use tollgate::tokens::{count_chat, count_text, ChatMessage};

use std::io::Read;
use std::time::Duration;

#[path = "cli/backup.rs"]
mod backup;
#[path = "cli/usage.rs"]
mod usage;

/// Tollgate: a gRPC quota decision service for LLM token budgets.
///
/// Every flag can also be set by the environment variable shown beside it; a flag on the
/// command line wins. The log level follows RUST_LOG (default: info).
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about, long_about)]
struct Cli {
    /// Log format on stderr: "text" (readable) or "json" (one object a line, for clusters).
    #[arg(long, global = true, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// How subjects appear in the log: as given, or hashed (`sha256:` and 16 hex digits of
    /// their SHA-256), since a subject is often an API key or an e-mail address.
    #[arg(long, global = true, env = "TOLLGATE_LOG_SUBJECTS", value_enum, default_value_t = SubjectLogging::AsGiven)]
    log_subjects: SubjectLogging,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Quota and Admin gRPC services (with health and reflection).
    Serve(Box<ServeArgs>),
    /// Check a policy file offline: print a summary of its tiers and models, or the file, line
    /// and reason it is refused (exit 2).
    CheckPolicy(CheckPolicyArgs),
    /// Count the tokens of text read from stdin (or, with --chat, of a JSON chat) with the
    /// model's tokenizer, as the server counts them, and print the count.
    CountTokens(CountTokensArgs),
    /// Print a subject's usage (or a group's, an IP's or the whole fleet's) from a running
    /// tollgate, as a table: figures for today and this month, and every limit that applies.
    Usage(UsageArgs),
    /// Back up every record of a ledger as a versioned JSON Lines file: from a stopped
    /// server's --data-dir, or from a running server (--addr) through its Admin Export call,
    /// as a consistent snapshot taken while it serves.
    Export(ExportArgs),
    /// Restore an export into a data directory that holds no store (or, with --replace, whose
    /// store is deleted first), checking every line, the counts and the checksum first.
    Import(ImportArgs),
    /// Print the SHA-256 (hex) of a token read from stdin (one line; the line end is not
    /// part of it): what a `[callers]` or `[operators]` entry's token_sha256 holds. Read from
    /// stdin, not an argument, so the token stays out of shell history and `ps`.
    HashToken,
}

#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// The data directory of a stopped tollgate (a running one holds its directory's lock:
    /// use --addr).
    #[arg(long, conflicts_with_all = ["addr", "store"], required_unless_present_any = ["addr", "store"])]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL store (postgres://...): read as one consistent snapshot, whether or not
    /// servers are running on it.
    #[arg(
        long,
        env = "TOLLGATE_STORE",
        hide_env_values = true,
        conflicts_with = "addr"
    )]
    store: Option<String>,
    /// A running tollgate, e.g. http://127.0.0.1:50051: exported through its Admin Export call.
    #[arg(long)]
    addr: Option<String>,
    /// The admin token of the running tollgate (with --addr).
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Where to write the export: a file (written as FILE.partial, renamed once complete), or
    /// "-" for stdout.
    #[arg(long, default_value = "-")]
    out: PathBuf,
    #[command(flatten)]
    connect: ClientConnect,
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// The export file to restore.
    file: PathBuf,
    /// The data directory to restore into: missing or holding no store.
    #[arg(long, conflicts_with = "store", required_unless_present = "store")]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL store (postgres://...) to restore into, holding no records, in one
    /// transaction: all of the file or nothing.
    #[arg(long, env = "TOLLGATE_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Delete the store the data directory (or database) holds first (refused while a server
    /// has the directory open; a server on the database stops at its next write).
    #[arg(long)]
    replace: bool,
}

#[derive(Debug, clap::Args)]
struct UsageArgs {
    /// The subject (user id or API key). Leave it out for the whole fleet (or, with --group or
    /// --client-ip, for that group or IP).
    subject: Option<String>,
    /// The tollgate to ask.
    #[arg(long, env = "TOLLGATE_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// A group: its limits are shown too (for a subject: instead of its assigned group).
    #[arg(long)]
    group: Option<String>,
    /// A client IP: its limits are shown too.
    #[arg(long)]
    client_ip: Option<String>,
    /// A caller's bearer token, when the server names its callers (`[callers]`).
    #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    connect: ClientConnect,
}

/// How a command reaches a running tollgate whose port is secured.
#[derive(Debug, Clone, clap::Args)]
struct ClientConnect {
    /// With an https:// --addr: the CA certificate (PEM) that signs the server's certificate.
    #[arg(long, env = "TOLLGATE_CA")]
    ca: Option<PathBuf>,
    /// With --ca: the name the server's certificate is checked against (default: the host of
    /// --addr).
    #[arg(long, env = "TOLLGATE_SERVER_NAME", requires = "ca")]
    server_name: Option<String>,
    /// With --ca, for mTLS: this client's certificate (PEM).
    #[arg(long, env = "TOLLGATE_CLIENT_CERT", requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "TOLLGATE_CLIENT_KEY", requires = "cert")]
    key: Option<PathBuf>,
}

impl ClientConnect {
    /// The TLS settings, if any: read now, an error names the flag.
    fn tls(&self) -> Result<Option<UpstreamTls>, String> {
        self.ca
            .as_deref()
            .map(|ca| {
                let client = self.cert.as_deref().zip(self.key.as_deref());
                UpstreamTls::load(ca, self.server_name.as_deref(), client)
            })
            .transpose()
    }
}

#[derive(Debug, clap::Args)]
struct CheckPolicyArgs {
    /// The policy file (TOML).
    file: PathBuf,
}

#[derive(Debug, clap::Args)]
struct CountTokensArgs {
    /// The model whose tokenizer counts (e.g. gpt-4o, gpt-4, or a model of the policy).
    #[arg(long)]
    model: String,
    /// stdin is a JSON array of {"role", "content", "name"?} messages; counted as the chat API
    /// counts them (per-message framing and reply priming included).
    #[arg(long)]
    chat: bool,
    /// Policy file whose [models] table adds or overrides models (default: the embedded one).
    #[arg(long, env = "TOLLGATE_POLICY")]
    policy: Option<PathBuf>,
    /// Also print the encoding, as "COUNT ENCODING".
    #[arg(long)]
    verbose: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to serve gRPC on. Port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory of the sled database (created if missing). Not used with --store.
    #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "./tollgate-data")]
    data_dir: PathBuf,
    /// Keep the ledger in PostgreSQL instead of sled: a URL such as
    /// postgres://tollgate@db.internal/tollgate (password in the URL or PGPASSWORD-style
    /// `password=` parameter; it is never logged). The schema is created at start.
    #[arg(
        long,
        env = "TOLLGATE_STORE",
        hide_env_values = true,
        conflicts_with = "upstream"
    )]
    store: Option<String>,
    /// With --store: how long the leader's lease holds after each renewal (it renews every
    /// third of it). A replica waiting as a standby takes over within about this long after
    /// the leader dies; a clean stop hands over at once.
    #[arg(long, env = "TOLLGATE_LEASE_TTL", default_value_t = 5.0, value_parser = lease_seconds)]
    lease_ttl: f64,
    /// With --store: the address other replicas reach this one at (followers relay every call
    /// to the leader's), recorded with the lease. Default: the address bound, which is right on
    /// one machine; with --listen 0.0.0.0:PORT give the pod's IP and port.
    #[arg(long, env = "TOLLGATE_ADVERTISE")]
    advertise: Option<String>,
    /// This replica's name, e.g. the pod's (`tollgate-central-0`). On sled, a name ending in
    /// `-N` with N above 0 (a second StatefulSet replica) is refused at start: each replica
    /// would keep its own ledger and every quota would count once per replica. Replicas share
    /// one ledger only with --store.
    #[arg(long, env = "TOLLGATE_REPLICA_NAME")]
    replica_name: Option<String>,
    /// Policy file (TOML). Without it, the embedded default policy serves.
    #[arg(long, env = "TOLLGATE_POLICY")]
    policy: Option<PathBuf>,
    /// TLS on --listen: the certificate chain (PEM, leaf first). Read again when it changes
    /// (certificate rotation), without dropping connections. Needs --tls-key. --health-listen
    /// stays plaintext, for kubelet probes.
    #[arg(long, env = "TOLLGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM). Never logged.
    #[arg(long, env = "TOLLGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// mTLS: the CA certificates (PEM) that must sign every client's certificate; a client
    /// without one, or with one another CA signed, is refused during the handshake. Needs
    /// --tls-cert. Read again when it changes.
    #[arg(long, env = "TOLLGATE_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Bearer token that Admin calls must carry. Without it, every Admin call is refused.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// strict: answer a mutating call only once it is on disk. relaxed: answer at once; write
    /// and sync every 10 ms (a crash may lose the last 10 ms of answered calls).
    #[arg(long, env = "TOLLGATE_DURABILITY", value_enum, default_value_t = Durability::Strict)]
    durability: Durability,
    /// The most bytes of prompt text (or chat text) one request may carry; larger ones are
    /// refused with INVALID_ARGUMENT. The gRPC message limit is set to match.
    #[arg(long, env = "TOLLGATE_MAX_PROMPT_BYTES", default_value_t = DEFAULT_MAX_PROMPT_BYTES)]
    max_prompt_bytes: usize,
    /// Serve Prometheus metrics (text format, at /metrics) on this address, e.g.
    /// 0.0.0.0:9464. Without it no metrics are kept.
    #[arg(long, env = "TOLLGATE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Also serve grpc.health.v1 alone on this address, e.g. 0.0.0.0:50052: a tollgate whose
    /// --listen is 127.0.0.1 (a sidecar) can then be probed by the kubelet on the pod address.
    #[arg(long, env = "TOLLGATE_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// On SIGTERM or SIGINT: health turns NOT_SERVING, new calls are refused, calls in flight
    /// get this many seconds to finish, the store is flushed, and the process exits 0.
    #[arg(long, env = "TOLLGATE_SHUTDOWN_TIMEOUT", default_value_t = 10.0, value_parser = positive_seconds)]
    shutdown_timeout: f64,
    /// Relay mode: keep no ledger (and no data directory); count prompts here and forward
    /// every call to the central tollgate at this URL, e.g. http://tollgate-central:50051.
    /// When it cannot be reached, each tier's `fail` ("closed" or "open") decides.
    #[arg(long, env = "TOLLGATE_UPSTREAM")]
    upstream: Option<String>,
    /// TLS to the upstream (an https:// --upstream) and, with --store, to the leader a
    /// follower relays to: the CA certificate (PEM) that signs its certificate.
    #[arg(long, env = "TOLLGATE_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// With --upstream-ca: the name the upstream's (or leader's) certificate is checked
    /// against, whatever address is dialed (a follower dials the leader's pod address, which
    /// no certificate names). Default: the host of the URL.
    #[arg(long, env = "TOLLGATE_UPSTREAM_SERVER_NAME", requires = "upstream_ca")]
    upstream_server_name: Option<String>,
    /// With --upstream-ca: a client certificate (PEM) for mTLS to the upstream or leader.
    #[arg(long, env = "TOLLGATE_UPSTREAM_CERT", requires_all = ["upstream_ca", "upstream_key"])]
    upstream_cert: Option<PathBuf>,
    /// The private key of --upstream-cert (PEM). Never logged.
    #[arg(long, env = "TOLLGATE_UPSTREAM_KEY", requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
    /// Relay mode: the deadline of each call to the upstream, in seconds.
    #[arg(long, env = "TOLLGATE_UPSTREAM_TIMEOUT", default_value_t = 2.0, value_parser = positive_seconds)]
    upstream_timeout: f64,
    /// Connections open at once on --listen. At the bound a new connection closes the one idle
    /// the longest; when every one has a call in flight, the new one is refused. Default: the
    /// open-files limit (raised to its hard limit at start) less 128, at most 10,000.
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// A connection with no call in flight for this many seconds is closed (HTTP/2 GOAWAY);
    /// its client reconnects for its next call.
    #[arg(long, env = "TOLLGATE_IDLE_TIMEOUT", default_value_t = 300.0, value_parser = positive_seconds)]
    idle_timeout: f64,
    /// Seconds a request may take to arrive whole, and a new connection to send its HTTP/2
    /// preface; a later request is answered DEADLINE_EXCEEDED, a silent connection closed.
    /// Processing (counting a prompt, the disk) is not counted.
    #[arg(long, env = "TOLLGATE_REQUEST_ARRIVAL_TIMEOUT", default_value_t = 10.0, value_parser = positive_seconds)]
    request_arrival_timeout: f64,
    /// Bytes of requests being received at once, all connections together (one connection:
    /// at most 16 MiB); a request whose bytes do not fit is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TOLLGATE_MAX_REQUEST_BYTES_IN_FLIGHT", default_value_t = DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT)]
    max_request_bytes_in_flight: usize,
    /// Start even if the data directory has lost acknowledged records (sled's data truncated,
    /// damaged or deleted): log what was found against what was expected, serve what is left,
    /// and start the watermark afresh from it. Without it such a directory is refused (exit 1).
    #[arg(long, env = "TOLLGATE_ACCEPT_DATA_LOSS")]
    accept_data_loss: bool,
}

/// The exit status after a fail-stop (a failed write or sync, a panic under the engine lock):
/// distinct from 1 (could not start) so that an operator can tell the two apart.
const FAIL_STOP_EXIT: u8 = 3;

/// How the server is configured beyond its backend, from the flags; `admin_token` apart, since
/// a follower does not check it.
fn serve_options(args: &ServeArgs, admin_token: Option<String>) -> ServeOptions {
    ServeOptions {
        admin_token,
        max_prompt_bytes: args.max_prompt_bytes,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout),
        transport: TransportOptions {
            max_connections: args
                .max_connections
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            request_arrival_timeout: Duration::from_secs_f64(args.request_arrival_timeout),
            idle_timeout: Duration::from_secs_f64(args.idle_timeout),
            max_request_bytes_in_flight: args.max_request_bytes_in_flight,
        },
        tls: TLS.get().cloned().flatten(),
        // Replicas reach each other by this name (their certificates carry it): only with
        // mTLS between them (a client CA) and a shared store is a forwarded caller believed.
        replica_san: args
            .upstream_server_name
            .as_deref()
            .filter(|_| args.store.is_some() && args.client_ca.is_some())
            .map(Arc::from),
    }
}

/// Run `work` (a blocking PostgreSQL call) on a blocking thread; a thread that panicked is a
/// store failure like any other.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(StoreError::Failed(format!("a blocking store call: {e}"))))
}

/// Print the bound address on stdout (for scripts and tests that start on port 0), once.
fn announce(addr: SocketAddr, announced: &mut bool) {
    if !*announced {
        println!("tollgate listening on {addr}");
        *announced = true;
    }
}

/// A listener for one phase on the health-only socket bound at start (a duplicate of it, so
/// the port stays the same and probes wait in its backlog between phases).
fn health_phase(
    socket: Option<&std::net::TcpListener>,
) -> std::io::Result<Option<tokio::net::TcpListener>> {
    socket
        .map(|s| s.try_clone().and_then(tokio::net::TcpListener::from_std))
        .transpose()
}

/// Completes once SIGTERM or SIGINT has come.
async fn signalled(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// With --store, while another replica leads: follow it. Every call on --listen is relayed to
/// the leader's advertised address (relay mode, with its fail modes), until the leader's lease
/// runs out or changes hands; then this replica tries to take it. `Ok(true)`: this replica now
/// leads (and keeps the lease renewed, tripping `failed` if it loses it); `Ok(false)`: a
/// shutdown signal came while following.
///
/// Why relay rather than wait unseen: a follower answers health and calls like any replica, so
/// a Service can send traffic to every ready pod and a rolling update is never stuck on
/// replicas that cannot lead. Each phase serves a duplicate of the one `socket`.
#[allow(clippy::too_many_arguments)]
async fn follow(
    store: &Arc<PostgresStore>,
    lease: &LeaseConfig,
    failed: &tollgate::failstop::FailStop,
    args: &ServeArgs,
    policy: &Arc<Policy>,
    socket: &std::net::TcpListener,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    announced: &mut bool,
    settler: &Arc<Settler>,
    health_socket: Option<&std::net::TcpListener>,
) -> Result<bool, ExitCode> {
    let poll = PostgresStore::poll_every(lease);
    loop {
        if *shutdown.borrow() {
            return Ok(false);
        }
        let (s, l, f) = (store.clone(), lease.clone(), failed.clone());
        let taken = blocking(move || s.try_lead(&l, &f)).await;
        let s = store.clone();
        let leader = match taken {
            Ok(Some(epoch)) => {
                tracing::info!(epoch, "took the lease");
                return Ok(true);
            }
            Ok(None) => blocking(move || s.leader()).await,
            Err(e) => Err(e),
        };
        let leader = match leader {
            Ok(leader) => leader,
            Err(e) => {
                eprintln!("tollgate: cannot read the lease: {e}");
                return Err(ExitCode::FAILURE);
            }
        };
        if leader.expired {
            continue; // taken by someone else since, or free: look again at once
        }
        let upstream = replica_url(&leader.address);
        let relay = match ForwardingLedger::new(
            &upstream,
            policy.clone(),
            Duration::from_secs_f64(args.upstream_timeout),
            Arc::new(SystemClock),
            upstream_tls(),
        ) {
            Ok(r) => Arc::new(r.as_follower().settling_with(settler.clone())),
            Err(e) => {
                eprintln!("tollgate: the leader's advertised address: {e}");
                return Err(ExitCode::FAILURE);
            }
        };
        let listening = socket.try_clone().and_then(|s| {
            let addr = s.local_addr()?;
            Ok((tokio::net::TcpListener::from_std(s)?, addr))
        });
        let (listener, addr) = match listening {
            Ok(bound) => bound,
            Err(e) => {
                eprintln!("tollgate: cannot listen on {}: {e}", args.listen);
                return Err(ExitCode::FAILURE);
            }
        };
        announce(addr, announced);
        tracing::info!(
            leader = %leader.holder,
            address = %leader.address,
            epoch = leader.epoch,
            %addr,
            "following: relaying every call to the leader until its lease runs out"
        );
        let epoch = leader.epoch;
        let watched = store.clone();
        let signal = signalled(shutdown.clone());
        let until = async move {
            let lease_moved = async {
                loop {
                    tokio::time::sleep(poll).await;
                    let s = watched.clone();
                    if let Ok(l) = blocking(move || s.leader()).await {
                        if l.expired || l.epoch != epoch {
                            return;
                        }
                    }
                }
            };
            tokio::select! {
                () = signal => {}
                () = lease_moved => {}
            }
        };
        // A follower checks no admin token: the leader checks the Admin calls relayed to it.
        let options = serve_options(args, None);
        let health = match health_phase(health_socket) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tollgate: cannot listen on the health port: {e}");
                return Err(ExitCode::FAILURE);
            }
        };
        if let Err(e) = tollgate::server::serve_backend(
            Backend::Forwarding(relay),
            listener,
            health,
            options,
            until,
        )
        .await
        {
            eprintln!("tollgate: following: {e}");
            return Err(ExitCode::FAILURE);
        }
    }
}

/// The ledger over `store`, loaded and checked, with the server's clock, tripping `failed`.
fn open_ledger(
    store: Arc<dyn Store>,
    policy: Arc<Policy>,
    durability: Durability,
    failed: tollgate::failstop::FailStop,
) -> Result<LocalLedger, StoreError> {
    LocalLedger::open_store(
        store,
        policy,
        Bounds::default(),
        durability,
        Arc::new(SystemClock),
        failed,
    )
}

/// A PostgreSQL URL (the only networked store so far); anything else is refused at once,
/// naming the rule. Checked here rather than by clap, whose error would echo the value, and a
/// store URL may hold a password.
fn check_store_url(s: &str) -> Result<(), &'static str> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(())
    } else {
        Err("must be a PostgreSQL URL starting with postgres:// or postgresql://")
    }
}

/// The ordinal of a StatefulSet-style replica name (`name-3` is 3), if it has one.
fn replica_ordinal(name: &str) -> Option<u64> {
    let (_, n) = name.rsplit_once('-')?;
    (!n.is_empty() && n.len() <= 9 && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// A lease TTL: from 0.3 s (renewals every 0.1 s) to 10 minutes.
fn lease_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if (0.3..=600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} s is outside 0.3 to 600 seconds"))
    }
}

/// A number of seconds above zero and at most a day.
fn positive_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v <= 86_400.0) {
        return Err(format!("{s} must be above 0 and at most 86400 seconds"));
    }
    Ok(v)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Everything tollgate creates (the data directory, sled's files, the watermark, exports)
    // is the owner's alone: subjects are often API keys.
    // SAFETY: umask only sets this process's file-mode mask; no memory is involved.
    unsafe {
        libc::umask(0o077);
    }
    tollgate::sampled_log::log_subjects(cli.log_subjects);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let store = match &cli.command {
        Command::Serve(a) => a.store.as_deref(),
        Command::Export(a) => a.store.as_deref(),
        Command::Import(a) => a.store.as_deref(),
        _ => None,
    };
    if let Some(Err(e)) = store.map(check_store_url) {
        eprintln!("error: --store (or TOLLGATE_STORE) {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::CountTokens(args) => count_tokens(args),
        Command::CheckPolicy(args) => check_policy(&args.file),
        Command::HashToken => hash_token(),
        Command::Usage(args) => match args.connect.tls() {
            Ok(tls) => usage::print(
                &args.addr,
                tls.as_ref(),
                args.token,
                args.subject,
                args.group,
                args.client_ip,
            ),
            Err(e) => {
                eprintln!("tollgate: {e}");
                ExitCode::from(2)
            }
        },
        Command::Export(args) => match args.connect.tls() {
            Ok(tls) => backup::export(
                args.data_dir,
                args.store,
                args.addr.map(|a| (a, tls)),
                args.admin_token,
                &args.out,
            ),
            Err(e) => {
                eprintln!("tollgate: {e}");
                ExitCode::from(2)
            }
        },
        Command::Import(args) => match (&args.data_dir, &args.store) {
            (Some(dir), _) => backup::import(&args.file, dir, args.replace),
            (None, Some(url)) => backup::import_postgres(&args.file, url, args.replace),
            (None, None) => unreachable!("clap requires --data-dir or --store"),
        },
    }
}

fn hash_token() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("tollgate: reading the token from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let token = line.trim_end_matches(['\n', '\r']);
    if token.is_empty() {
        eprintln!("tollgate: no token on stdin");
        return ExitCode::from(2);
    }
    println!("{}", tollgate::policy::callers::token_sha256_hex(token));
    ExitCode::SUCCESS
}

fn check_policy(file: &std::path::Path) -> ExitCode {
    let policy = match load_policy(Some(file)) {
        Ok(p) => p,
        Err(code) => return code,
    };
    println!("{}: OK", file.display());
    print!("{}", policy.summary());
    ExitCode::SUCCESS
}

/// One chat message as `--chat` reads it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessageJson {
    role: String,
    content: String,
    #[serde(default)]
    name: Option<String>,
}

/// The policy file given, or the embedded default; a refused file is reported (exit 2).
fn load_policy(path: Option<&std::path::Path>) -> Result<Policy, ExitCode> {
    path.map_or_else(|| Ok(Policy::embedded_default()), Policy::from_file)
        .map_err(|e| {
            eprintln!("tollgate: policy refused: {e}");
            ExitCode::from(2)
        })
}

fn count_tokens(args: CountTokensArgs) -> ExitCode {
    let policy = match load_policy(args.policy.as_deref()) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let Some(encoding) = policy.encoding_for(&args.model) else {
        eprintln!(
            "tollgate: model {:?} has no known tokenizer; add [models.\"{}\"] encoding = \"o200k_base\" (or cl100k_base) to a policy and pass --policy",
            args.model, args.model
        );
        return ExitCode::from(2);
    };
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("tollgate: cannot read stdin as UTF-8 text: {e}");
        return ExitCode::from(2);
    }
    if !args.chat {
        if let Err(e) = tollgate::tokens::check_countable(encoding, &input) {
            eprintln!("tollgate: cannot count stdin: {e}");
            return ExitCode::from(2);
        }
    }
    let tokens = if args.chat {
        let messages: Vec<ChatMessageJson> = match serde_json::from_str(&input) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("tollgate: stdin is not a JSON array of {{\"role\", \"content\", \"name\"?}} messages: {e}");
                return ExitCode::from(2);
            }
        };
        if let Some(e) = messages
            .iter()
            .find_map(|m| tollgate::tokens::check_countable(encoding, &m.content).err())
        {
            eprintln!("tollgate: cannot count stdin: {e}");
            return ExitCode::from(2);
        }
        let chat: Vec<ChatMessage> = messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
                name: m.name.unwrap_or_default(),
            })
            .collect();
        count_chat(encoding, &chat)
    } else {
        count_text(encoding, &input)
    };
    if args.verbose {
        println!("{tokens} {}", encoding.name());
    } else {
        println!("{tokens}");
    }
    ExitCode::SUCCESS
}

/// The port's TLS, loaded once at start and shared by every phase (following, leading).
static TLS: std::sync::OnceLock<Option<Arc<TlsConfig>>> = std::sync::OnceLock::new();

/// TLS to the upstream or leader, read once at start (see `UpstreamTls`).
static UPSTREAM_TLS: std::sync::OnceLock<Option<UpstreamTls>> = std::sync::OnceLock::new();

fn upstream_tls() -> Option<&'static UpstreamTls> {
    UPSTREAM_TLS.get().and_then(Option::as_ref)
}

/// The URL of a replica at `address` (as advertised): over TLS when this replica was given
/// the CA of the replicas' certificates.
fn replica_url(address: &str) -> String {
    if address.contains("://") {
        return address.to_string();
    }
    let scheme = if upstream_tls().is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{address}")
}

fn serve(args: ServeArgs) -> ExitCode {
    let policy = match load_policy(args.policy.as_deref()) {
        Ok(p) => Arc::new(p),
        Err(code) => return code,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match TlsConfig::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.client_ca.clone(),
        }) {
            Ok(tls) => Some(Arc::new(tls)),
            Err(e) => {
                eprintln!("tollgate: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    if !args.listen.ip().is_loopback() && !policy.access().callers_required() {
        tracing::warn!(
            listen = %args.listen,
            "listening beyond loopback with no caller authentication: anyone who reaches the port can spend and read any budget; name the app servers in [callers] of the policy"
        );
    }
    let _ = TLS.set(tls);
    let loaded = match &args.upstream_ca {
        Some(ca) => {
            let client = args
                .upstream_cert
                .as_deref()
                .zip(args.upstream_key.as_deref());
            match UpstreamTls::load(ca, args.upstream_server_name.as_deref(), client) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    let _ = UPSTREAM_TLS.set(loaded);
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
    let code = runtime.block_on(async move {
        // SIGTERM and SIGINT, registered now, seen by every phase (following, then leading).
        let mut shutdown = {
            let (tx, rx) = tokio::sync::watch::channel(false);
            let signal = shutdown_signal();
            tokio::spawn(async move {
                signal.await;
                let _ = tx.send(true);
            });
            rx
        };
        // Certificate rotation is watched from the start, whatever phase serves.
        let _tls_reloader = TLS
            .get()
            .cloned()
            .flatten()
            .map(tollgate::server::transport::tls::spawn_reloader);
        // Whether the address has been printed (once, by the first phase that listens).
        let mut announced = false;
        // The socket bound by an earlier phase (following), if any.
        let mut bound: Option<std::net::TcpListener> = None;
        // The health-only port, bound once and served by every phase (a follower's probes
        // must be answered too: with TLS on --listen, kubelet probes can only use this port).
        let health_socket = match args.health_listen {
            Some(health) => match tollgate::server::bind(health)
                .await
                .and_then(|(l, bound)| Ok((l.into_std()?, bound)))
            {
                Ok((l, bound)) => {
                    tracing::info!(addr = %bound, "health alone");
                    Some(l)
                }
                Err(e) => {
                    eprintln!("tollgate: cannot listen on {health}: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        if let Some(addr) = args.metrics_listen {
            if let Err(e) = tollgate::telemetry::install(addr) {
                eprintln!("tollgate: cannot serve metrics on {addr}: {e}");
                return ExitCode::FAILURE;
            }
            tracing::info!(%addr, "metrics at /metrics");
        }
        let backend = match &args.upstream {
            Some(url) => {
                let relay = match ForwardingLedger::new(
                    url,
                    policy,
                    Duration::from_secs_f64(args.upstream_timeout),
                    Arc::new(SystemClock),
                    upstream_tls(),
                ) {
                    Ok(r) => Arc::new(r),
                    Err(e) => {
                        eprintln!("tollgate: {e}");
                        return ExitCode::from(2);
                    }
                };
                if args.admin_token.is_some() {
                    tracing::warn!("relay mode: --admin-token is not used here; the upstream checks Admin calls");
                }
                Backend::Forwarding(relay)
            }
            None => {
                let recovery = if args.accept_data_loss {
                    Recovery::AcceptLoss
                } else {
                    Recovery::Refuse
                };
                if let (None, Some(name)) = (&args.store, &args.replica_name) {
                    if replica_ordinal(name).is_some_and(|n| n > 0) {
                        eprintln!(
                            "tollgate: refusing to start replica {name:?} on sled: sled keeps one ledger per data directory, so a second replica would be a second ledger and every quota would count once per replica. Run one replica on sled (replicas: 1), or several sharing --store postgres://..."
                        );
                        return ExitCode::FAILURE;
                    }
                }
                let durability = args.durability;
                let opened = match args.store.clone() {
                    // The PostgreSQL client blocks: connect and load on a blocking thread.
                    Some(url) => {
                        let failed = tollgate::failstop::FailStop::new();
                        let connected =
                            blocking(move || PostgresStore::connect(&url, recovery).map(Arc::new));
                        let store = match connected.await {
                            Ok(store) => store,
                            Err(e) => {
                                eprintln!("tollgate: cannot open the store: {e}");
                                return ExitCode::FAILURE;
                            }
                        };
                        // One socket for every phase: bound now, handed to each in turn, so the
                        // address stays the same and connections wait in its backlog between.
                        let socket = match tollgate::server::bind(args.listen)
                            .await
                            .and_then(|(l, _)| l.into_std())
                        {
                            Ok(socket) => socket,
                            Err(e) => {
                                eprintln!("tollgate: cannot listen on {}: {e}", args.listen);
                                return ExitCode::FAILURE;
                            }
                        };
                        // Where the others reach this replica: --advertise, else the address
                        // bound (with --listen 0.0.0.0:..., give --advertise: the pod's IP).
                        let advertise = match (&args.advertise, socket.local_addr()) {
                            (Some(a), _) => a.clone(),
                            (None, Ok(addr)) => addr.to_string(),
                            (None, Err(_)) => args.listen.to_string(),
                        };
                        let lease =
                            LeaseConfig::new(advertise, Duration::from_secs_f64(args.lease_ttl));
                        // Reserves given up on while following (the leader died under them)
                        // are settled with the next leader, or with this replica once it leads:
                        // through its own port, like any call.
                        let upstream_timeout = Duration::from_secs_f64(args.upstream_timeout);
                        let to_self = socket
                            .local_addr()
                            .map(|mut a| {
                                if a.ip().is_unspecified() {
                                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                                }
                                replica_url(&a.to_string())
                            })
                            .map_err(|e| e.to_string())
                            .and_then(|url| {
                                channel_to(&url, upstream_timeout, upstream_tls())
                                    .map_err(|e| e.to_string())
                            });
                        let to_self = match to_self {
                            Ok(channel) => channel,
                            Err(e) => {
                                eprintln!("tollgate: cannot reach this replica's own port: {e}");
                                return ExitCode::FAILURE;
                            }
                        };
                        let settler = Arc::new(Settler::new(to_self.clone()));
                        let following = follow(
                            &store,
                            &lease,
                            &failed,
                            &args,
                            &policy,
                            &socket,
                            &mut shutdown,
                            &mut announced,
                            &settler,
                            health_socket.as_ref(),
                        )
                        .await;
                        bound = Some(socket);
                        match following {
                            Ok(true) => settler.point_at(to_self),
                            Ok(false) => return ExitCode::SUCCESS,
                            Err(code) => return code,
                        }
                        tracing::info!(store = %store.location(), "leading: loading the ledger");
                        blocking(move || open_ledger(store, policy, durability, failed))
                            .await
                            .map_err(|e| ("the store".to_string(), e))
                    }
                    None => SledStore::open(&args.data_dir, recovery)
                        .and_then(|store| {
                            let failed = tollgate::failstop::FailStop::new();
                            open_ledger(Arc::new(store), policy, durability, failed)
                        })
                        .map_err(|e| (args.data_dir.display().to_string(), e)),
                };
                let ledger = match opened {
                    Ok(l) => Arc::new(l),
                    Err((location, e)) => {
                        eprintln!("tollgate: cannot open {location}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if args.admin_token.as_deref().is_none_or(str::is_empty) {
                    tracing::warn!("no --admin-token: every Admin call will be refused");
                }
                Backend::Local(ledger)
            }
        };
        let reloader = args.policy.clone().map(|path| {
            tollgate::server::reload::spawn_reloader(Arc::new(backend.clone()), path)
        });
        let listening = match bound.take() {
            Some(socket) => socket
                .local_addr()
                .and_then(|addr| Ok((tokio::net::TcpListener::from_std(socket)?, addr))),
            None => tollgate::server::bind(args.listen).await,
        };
        let (listener, addr) = match listening {
            Ok(bound) => bound,
            Err(e) => {
                eprintln!("tollgate: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        // The last phase owns the socket, so that it closes when this phase stops listening
        // (at shutdown a probe is then refused, not left waiting in the backlog).
        let health_listener = match health_socket.map(tokio::net::TcpListener::from_std).transpose() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tollgate: cannot listen on the health port: {e}");
                return ExitCode::FAILURE;
            }
        };
        announce(addr, &mut announced);
        match &backend {
            Backend::Local(_) => {
                tracing::info!(%addr, durability = ?args.durability, "serving")
            }
            Backend::Forwarding(r) => tracing::info!(%addr, upstream = %r.upstream(), "relaying"),
        }
        let options = serve_options(&args, args.admin_token.clone());
        let result = tollgate::server::serve_backend(
            backend,
            listener,
            health_listener,
            options,
            signalled(shutdown.clone()),
        )
        .await;
        if let Some(r) = reloader {
            r.abort();
        }
        match result {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            // Logged already, as the one line that says why.
            Err(tollgate::server::ServeError::FailStop(_)) => ExitCode::from(FAIL_STOP_EXIT),
            Err(e) => {
                tracing::error!(error = %e, "stopped");
                eprintln!("tollgate: {e}");
                ExitCode::FAILURE
            }
        }
    });
    // Dropping the runtime would wait for every blocking task, so a prompt still being counted
    // (seconds, for megabytes) would hold the exit past --shutdown-timeout. The store is
    // flushed by now: give the tasks a moment to stop, not the counts.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// A future that completes on SIGINT or SIGTERM, with both handlers registered when this is
/// called, not when the future is first polled. Why eagerly: the address is printed before the
/// server polls this future, and a supervisor (or a test) that reads the address and at once
/// sends SIGTERM must get a clean stop (drain, flush, exit 0), not the default action of the
/// signal, which kills the process before the store is flushed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        let _ = s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let interrupt = async {
                match interrupt.as_mut() {
                    Some(s) => {
                        let _ = s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = term => {},
                () = interrupt => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
