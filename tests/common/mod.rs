//! Shared harness for the end-to-end tests: a real tollgate gRPC server on 127.0.0.1 (port 0)
//! with a manual clock, and clients for it. Also the real binary as a child process ([`Serve`],
//! [`Process`]: its log, signals, `kill -9`, its exit), for the tests that need one, and the
//! file helpers those tests share (policy files, atomic replacement, running a command).
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use tollgate::clock::ManualClock;
use tollgate::engine::Bounds;
use tollgate::ledger::LocalLedger;
use tollgate::policy::Policy;
use tollgate::proto::admin_client::AdminClient;
use tollgate::proto::quota_client::QuotaClient;
use tollgate::proto::{self, ReserveRequest};
use tollgate::server::ServeOptions;
use tollgate::store::Durability;

/// 2026-03-10T12:00:00Z: noon, so a test can move within the day or across midnight.
pub const T0: u64 = 1_773_144_000_000_000;
/// Microseconds in a second.
pub const SEC: u64 = 1_000_000;
/// The admin token every test server is started with.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The minimal policy of the documentation.
pub const POLICY_500: &str = "default_tier = \"free\"\n\n[tiers.free]\ntokens_per_day = 500\n";
/// A reservation id of the right shape that no server ever issued.
/// One tier no load test can exhaust, with hour-long holds (none expires during a test).
pub const POLICY_LOAD: &str = r#"
default_tier = "load"

[tiers.load]
tokens_per_minute = 1000000000000
requests_per_minute = 1000000000
tokens_per_day = 1000000000000
hold_seconds = 3600
"#;

pub const WELL_FORMED_UNKNOWN_ID: &str = "0192a8a4-1c2b-7cc0-8d1e-0123456789ab";

/// A server in this process, on loopback, with a clock the test moves.
pub struct TestServer {
    pub addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    pub ledger: Arc<LocalLedger>,
    pub dir: Arc<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl TestServer {
    /// A fresh server on `policy_toml`, in a new temporary data directory, at T0.
    pub async fn start(policy_toml: &str) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Self::start_in(
            policy_toml,
            dir,
            Arc::new(ManualClock::new(T0)),
            Bounds::default(),
        )
        .await
    }

    /// A fresh server on `policy_toml` served with `options` exactly as given (its
    /// `admin_token` included), in a new temporary data directory, at T0.
    pub async fn start_with_options(policy_toml: &str, options: ServeOptions) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Self::start_in_with_options(
            policy_toml,
            dir,
            Arc::new(ManualClock::new(T0)),
            Bounds::default(),
            options,
        )
        .await
    }

    /// A server over an existing data directory and clock (for restarts).
    pub async fn start_in(
        policy_toml: &str,
        dir: Arc<tempfile::TempDir>,
        clock: Arc<ManualClock>,
        bounds: Bounds,
    ) -> Self {
        let options = ServeOptions {
            admin_token: Some(ADMIN_TOKEN.to_string()),
            ..Default::default()
        };
        Self::start_in_with_options(policy_toml, dir, clock, bounds, options).await
    }

    /// A server over an existing data directory and clock, served with `options`.
    pub async fn start_in_with_options(
        policy_toml: &str,
        dir: Arc<tempfile::TempDir>,
        clock: Arc<ManualClock>,
        bounds: Bounds,
        options: ServeOptions,
    ) -> Self {
        let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Self::launch(policy_toml, dir, clock, bounds, options, any_port).await
    }

    /// Open the ledger and serve it on `addr`. sled's background threads can hold the
    /// directory's lock, and the old listener its port, for a moment after a stopped server is
    /// dropped: a restart retries each for up to two seconds.
    async fn launch(
        policy_toml: &str,
        dir: Arc<tempfile::TempDir>,
        clock: Arc<ManualClock>,
        bounds: Bounds,
        options: ServeOptions,
        addr: SocketAddr,
    ) -> Self {
        let policy = Arc::new(Policy::from_toml(policy_toml, "test.toml").expect("test policy"));
        let ledger = match postgres::test_store_of(dir.path()) {
            Some(url) => {
                let (policy, clock) = (policy.clone(), clock.clone());
                tokio::task::spawn_blocking(move || {
                    use tollgate::store::postgres::{LeaseConfig, PostgresStore};
                    let store = PostgresStore::connect(&url, tollgate::store::Recovery::Refuse)?;
                    let failed = tollgate::failstop::FailStop::new();
                    // A restart in the same test takes over from the server just stopped,
                    // which released its lease.
                    let lease = LeaseConfig::new("test".into(), Duration::from_secs(30));
                    store.lead(lease, failed.clone(), |_| {})?;
                    LocalLedger::open_store(
                        Arc::new(store),
                        policy,
                        bounds,
                        Durability::Strict,
                        clock,
                        failed,
                    )
                })
                .await
                .expect("open the ledger")
                .unwrap_or_else(|e| panic!("open ledger on PostgreSQL: {e}"))
            }
            None => {
                retry("open ledger", || {
                    LocalLedger::open(
                        dir.path(),
                        policy.clone(),
                        bounds,
                        Durability::Strict,
                        clock.clone(),
                    )
                })
                .await
            }
        };
        let ledger = Arc::new(ledger);
        let mut attempt = 0;
        let (listener, addr) = loop {
            match tollgate::server::bind(addr).await {
                Ok(bound) => break bound,
                Err(_) if attempt < 100 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let (tx, rx) = oneshot::channel::<()>();
        let l = ledger.clone();
        let handle = tokio::spawn(async move {
            tollgate::server::serve(l, listener, options, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        Self {
            addr,
            clock,
            ledger,
            dir,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A Quota client (a new connection each call).
    pub async fn quota(&self) -> QuotaClient<Channel> {
        QuotaClient::connect(self.url()).await.expect("connect")
    }

    /// An Admin client that sends the right bearer token.
    pub async fn admin(&self) -> Admin {
        admin_client(self.url()).await
    }

    /// Move the clock forward by whole seconds.
    pub fn advance_secs(&self, secs: u64) {
        self.clock.advance_secs(secs);
    }

    /// Stop gracefully and wait until the server and its ledger are gone.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task");
        }
    }

    /// Stop, then start again over the same data directory and clock.
    pub async fn restart(self, policy_toml: &str) -> Self {
        self.restart_with(policy_toml, Bounds::default()).await
    }

    /// Stop, then start again over the same data directory and clock, with `bounds`.
    pub async fn restart_with(self, policy_toml: &str, bounds: Bounds) -> Self {
        let dir = self.dir.clone();
        let clock = self.clock.clone();
        let ledger = self.ledger.clone();
        self.stop().await;
        // The ledger (and the sled handle it owns) must be gone before the directory is reopened.
        drop(wait_unique(ledger).await);
        Self::start_in(policy_toml, dir, clock, bounds).await
    }
}

async fn wait_unique(mut ledger: Arc<LocalLedger>) -> LocalLedger {
    for _ in 0..500 {
        match Arc::try_unwrap(ledger) {
            Ok(l) => return l,
            Err(back) => {
                ledger = back;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    panic!("the ledger is still shared after the server stopped");
}

/// A Reserve of explicit token counts.
pub fn reserve(subject: &str, prompt_tokens: u64, max_output_tokens: u64) -> ReserveRequest {
    ReserveRequest {
        subject: subject.to_string(),
        model: "gpt-4o".to_string(),
        prompt_tokens: Some(prompt_tokens),
        max_output_tokens: Some(max_output_tokens),
        ..Default::default()
    }
}

/// A Reserve of explicit token counts on `model`.
pub fn on(model: &str, subject: &str, prompt: u64, output: u64) -> ReserveRequest {
    ReserveRequest {
        model: model.to_string(),
        ..reserve(subject, prompt, output)
    }
}

/// A Reserve of `prompt` text for `model`, counted on the server (`max_output` None: the
/// model's default).
pub fn reserve_text(
    subject: &str,
    model: &str,
    prompt: &str,
    max_output: Option<u64>,
) -> ReserveRequest {
    ReserveRequest {
        subject: subject.to_string(),
        model: model.to_string(),
        prompt: Some(prompt.to_string()),
        max_output_tokens: max_output,
        ..Default::default()
    }
}

/// A Reserve that must be answered OK (whatever it decides).
pub async fn rsv(q: &mut Quota, req: ReserveRequest) -> proto::ReserveResponse {
    q.reserve(req).await.expect("reserve").into_inner()
}

/// A protobuf Duration in microseconds.
pub fn dur_us(d: &prost_types::Duration) -> u64 {
    assert!(d.seconds >= 0 && d.nanos >= 0, "negative duration {d:?}");
    u64::try_from(d.seconds).unwrap() * SEC + u64::try_from(d.nanos).unwrap() / 1_000
}

/// `retry_after` of a response, in microseconds.
pub fn retry_us(r: &proto::ReserveResponse) -> Option<u64> {
    r.retry_after.as_ref().map(dur_us)
}

/// The decision of a response, as the enum.
pub fn decision(r: &proto::ReserveResponse) -> proto::Decision {
    proto::Decision::try_from(r.decision).expect("a known decision")
}

/// The status of limit `name` of the scope `scope` ("subject", "group", "ip", "global").
#[track_caller]
pub fn scoped_limit<'a>(
    limits: &'a [proto::LimitStatus],
    scope: &str,
    name: &str,
) -> &'a proto::LimitStatus {
    limits
        .iter()
        .find(|l| l.scope == scope && l.name == name)
        .unwrap_or_else(|| panic!("no {scope}.{name} in {limits:?}"))
}

/// A limit's status by name.
pub fn limit<'a>(limits: &'a [proto::LimitStatus], name: &str) -> &'a proto::LimitStatus {
    limits
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no limit {name} in {limits:?}"))
}

/// The real `tollgate` binary, started as a child process (see [`Serve`]).
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    /// The file its stderr goes to, if it was started with [`Serve::log_to`].
    pub log: Option<PathBuf>,
}

/// How long [`Process::log_line_until`] waits, and how often it looks.
pub const POLL_LIMIT: Duration = Duration::from_secs(10);
pub const POLL_STEP: Duration = Duration::from_millis(50);

/// A `tollgate serve` to start: the real binary on 127.0.0.1:0 over `data_dir`, with extra
/// arguments and environment (RUST_LOG=warn unless set), its stderr inherited or written to a
/// log file.
#[derive(Debug, Clone)]
pub struct Serve {
    data_dir: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    log: Option<PathBuf>,
    file_size_limit_kib: Option<u64>,
    open_files: Option<u64>,
    /// On sled even when the tests run on PostgreSQL (`TOLLGATE_TEST_STORE`): for what only
    /// sled does.
    sled_only: bool,
}

impl Serve {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            args: Vec::new(),
            envs: vec![("RUST_LOG".into(), "warn".into())],
            log: None,
            file_size_limit_kib: None,
            open_files: None,
            sled_only: false,
        }
    }

    /// On sled whatever `TOLLGATE_TEST_STORE` says.
    pub fn sled_only(mut self) -> Self {
        self.sled_only = true;
        self
    }

    /// Start it under `ulimit -f` (RLIMIT_FSIZE) with SIGXFSZ ignored: a write that would grow
    /// a file past `kib` KiB fails with EFBIG, as on a full disk, without killing the process.
    pub fn file_size_limit_kib(mut self, kib: u64) -> Self {
        self.file_size_limit_kib = Some(kib);
        self
    }

    /// Start it with both limits on open files (soft and hard) at `n`, so it cannot raise them.
    pub fn open_files_limit(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    /// More arguments after `serve --listen ... --data-dir ...`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// `--policy FILE --admin-token ADMIN_TOKEN`.
    pub fn policy(self, file: &Path) -> Self {
        self.args([
            OsStr::new("--policy"),
            file.as_os_str(),
            OsStr::new("--admin-token"),
            OsStr::new(ADMIN_TOKEN),
        ])
    }

    /// An environment variable (RUST_LOG replaces the default `warn`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Write stderr to `file` (created or truncated) instead of inheriting it.
    pub fn log_to(mut self, file: &Path) -> Self {
        self.log = Some(file.to_path_buf());
        self
    }

    /// Start it and wait for the address it prints.
    pub fn start(self) -> Process {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start it and wait for the address it prints; if it exits (or prints something else)
    /// instead, what it printed and logged.
    pub fn try_start(&self) -> Result<Process, String> {
        let stderr = match &self.log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("create the log")),
            None => Stdio::inherit(),
        };
        let binary = env!("CARGO_BIN_EXE_tollgate");
        let mut command = match self.file_size_limit_kib {
            // An ignored signal stays ignored across exec, and the limit is inherited.
            Some(kib) => {
                let mut c = Command::new("bash"); // ulimit -f counts KiB in bash (512 B in dash)
                c.arg("-c")
                    .arg(format!(
                        "ulimit -f {kib} && trap '' XFSZ && exec \"$0\" \"$@\""
                    ))
                    .arg(binary);
                c
            }
            None => Command::new(binary),
        };
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
            unsafe {
                command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, n, n));
            }
        }
        let store = match self.sled_only || self.args.iter().any(|a| a == "--store") {
            true => None,
            false => postgres::test_store_of(&self.data_dir),
        };
        let mut child = command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            // A short lease: a restart after `kill -9` waits for it to run out.
            .args(
                store
                    .iter()
                    .flat_map(|url| ["--store", url.as_str(), "--lease-ttl", "2"]),
            )
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn tollgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        match line.trim().strip_prefix("tollgate listening on ") {
            Some(a) => {
                let addr: SocketAddr = a.parse().expect("an address");
                // On PostgreSQL a restarted server first follows (relaying to the leader it
                // replaces) until that one's lease runs out: the tests want the ledger, so
                // wait until this server holds the lease.
                if let Some(url) = &store {
                    postgres::wait_until_leading(url, &addr.to_string());
                }
                Ok(Process {
                    child,
                    addr,
                    log: self.log.clone(),
                })
            }
            None => {
                let _ = child.kill();
                let status = child.wait();
                let log = self
                    .log
                    .as_deref()
                    .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                    .unwrap_or_default();
                Err(format!(
                    "tollgate serve did not start ({status:?}): first line {line:?}; log:\n{log}"
                ))
            }
        }
    }
}

impl Process {
    /// Start `tollgate serve` on 127.0.0.1:0 with `extra` arguments, and wait for its address.
    pub fn serve<I, S>(data_dir: &Path, extra: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Serve::new(data_dir).args(extra).start()
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A Quota client (a new connection).
    pub async fn quota(&self) -> Quota {
        QuotaClient::connect(self.url()).await.expect("connect")
    }

    /// An Admin client that sends the right bearer token.
    pub async fn admin(&self) -> Admin {
        admin_client(self.url()).await
    }

    /// `kill -SIGNAL <pid>`, e.g. "HUP" or "TERM".
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal}: {status:?}");
    }

    /// `kill -HUP <pid>`.
    pub fn sighup(&self) {
        self.signal("HUP");
    }

    /// `kill -TERM <pid>`.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Wait up to `limit` for the process to exit; its status, or None if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What it has written to its log file so far (empty without one).
    pub fn log_text(&self) -> String {
        self.log
            .as_deref()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Poll the log until a line satisfies `ok` (at most POLL_LIMIT); returns that line.
    pub async fn log_line_until(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| ok(l)) {
                return line.to_string();
            }
            if start.elapsed() > POLL_LIMIT {
                panic!("{what}: no such log line within {POLL_LIMIT:?}; server log:\n{text}");
            }
            tokio::time::sleep(POLL_STEP).await;
        }
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `text` as `name` in `dir`, and return its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// Write `text` to `path` atomically (a new file renamed over it), so a server polling the file
/// never reads half of it.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).expect("write the new file");
    std::fs::rename(&tmp, path).expect("rename the new file into place");
}

/// Run `cmd` to its exit (killing it after `limit`, a failure), with its output captured.
pub fn run_to_exit(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap");
            panic!(
                "tollgate did not exit within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Adds `authorization: Bearer ADMIN_TOKEN` to every call.
#[derive(Debug, Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// An Admin client with the right bearer token.
pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

/// An Admin client of `url` (a new connection) that sends the right bearer token.
pub async fn admin_client(url: String) -> Admin {
    let channel = Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let bearer = format!("Bearer {ADMIN_TOKEN}").parse().unwrap();
    AdminClient::with_interceptor(channel, Bearer(bearer))
}

/// A Quota client.
pub type Quota = QuotaClient<Channel>;

/// Commit `prompt` + `completion` tokens of usage to reservation `id`.
pub async fn commit(
    q: &mut Quota,
    id: &str,
    prompt: u64,
    completion: u64,
) -> proto::CommitResponse {
    q.commit(commit_req(id, prompt, completion))
        .await
        .expect("commit")
        .into_inner()
}

/// A Commit of `prompt_tokens` + `completion_tokens` of usage to reservation `id`.
pub fn commit_req(id: &str, prompt_tokens: u64, completion_tokens: u64) -> proto::CommitRequest {
    proto::CommitRequest {
        reservation_id: id.to_string(),
        prompt_tokens,
        completion_tokens,
        usage_unknown: false,
    }
}

/// A Refund of reservation `id`.
pub fn refund_req(id: &str) -> proto::RefundRequest {
    proto::RefundRequest {
        reservation_id: id.to_string(),
    }
}

/// Refund reservation `id`; the tokens it released.
pub async fn refund(q: &mut Quota, id: &str) -> u64 {
    q.refund(refund_req(id))
        .await
        .expect("refund")
        .into_inner()
        .released_tokens
}

/// A SetSubject of `subject` to `tier` (no group, no overrides).
pub fn set_subject_req(subject: &str, tier: &str) -> proto::SetSubjectRequest {
    proto::SetSubjectRequest {
        subject: subject.to_string(),
        tier: tier.to_string(),
        ..Default::default()
    }
}

/// GetUsage of `subject`.
pub async fn usage(q: &mut Quota, subject: &str) -> proto::GetUsageResponse {
    q.get_usage(proto::GetUsageRequest {
        subject: subject.to_string(),
        ..Default::default()
    })
    .await
    .expect("get_usage")
    .into_inner()
}

/// Assert `result` is an error with `code` whose message contains every one of `needles`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    needles: &[&str],
) {
    let status = match result {
        Ok(r) => panic!("expected {code:?}, got OK: {:?}", r.into_inner()),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "message {:?} should contain {needle:?}",
            status.message()
        );
    }
}

/// The complete policy example of the README (between `<!-- policy-example:start -->` and
/// `<!-- policy-example:end -->`), so the tests run against exactly what the README documents.
pub fn readme_policy_example() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("<!-- policy-example:start -->")
        .expect("README has the policy example start marker");
    let end = readme
        .find("<!-- policy-example:end -->")
        .expect("README has the policy example end marker");
    let block = &readme[start..end];
    let body = block
        .split_once("```toml\n")
        .expect("the example is a toml code block")
        .1;
    body.rsplit_once("```")
        .expect("the code block is closed")
        .0
        .to_string()
}

impl TestServer {
    /// A server over an existing data directory and clock, bound to exactly `addr` rather than
    /// a new port: a restart that clients and relays holding the old URL must find again.
    /// Binding retries for up to two seconds while the old listener's port is released.
    pub async fn start_in_at(
        policy_toml: &str,
        dir: Arc<tempfile::TempDir>,
        clock: Arc<ManualClock>,
        addr: SocketAddr,
    ) -> Self {
        let options = ServeOptions {
            admin_token: Some(ADMIN_TOKEN.to_string()),
            ..Default::default()
        };
        Self::launch(policy_toml, dir, clock, Bounds::default(), options, addr).await
    }
}

/// `attempt()` until it succeeds, at most 100 times 20 ms apart; then panic naming `what`.
async fn retry<T, E: std::fmt::Display>(
    what: &str,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> T {
    for _ in 0..100 {
        if let Ok(v) = attempt() {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    attempt().unwrap_or_else(|e| panic!("{what}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Metrics of the real binary (`--metrics-listen`)

/// How long a scrape of /metrics may take.
const SCRAPE_LIMIT: Duration = Duration::from_secs(10);

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// Start `serve` with `--metrics-listen` on a free port (a few tries, in case another process
/// takes the port between the pick and the bind). Returns the process and the metrics address.
pub fn start_with_metrics(serve: Serve) -> (Process, SocketAddr) {
    let mut last = String::new();
    for _ in 0..5 {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let attempt = serve
            .clone()
            .args(["--metrics-listen".to_string(), addr.to_string()]);
        match attempt.try_start() {
            Ok(p) => return (p, addr),
            Err(e) => last = e,
        }
    }
    panic!("could not start with --metrics-listen: {last}");
}

/// `GET /metrics` over plain HTTP/1.1; the body.
pub fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics listener");
    stream.set_read_timeout(Some(SCRAPE_LIMIT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the response");
    let raw = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/plain"), "{head}");
    if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The value of the unlabelled series `name` in a scrape, if it is there.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
pub mod postgres;
