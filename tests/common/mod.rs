//! Shared harness for the end-to-end tests: a real tollgate gRPC server on 127.0.0.1 (port 0)
//! with a manual clock, and clients for it. Also a spawner for the real binary, for the tests
//! that must `kill -9` a process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use tollgate::clock::ManualClock;
use tollgate::engine::Bounds;
use tollgate::ledger::Ledger;
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

/// A server in this process, on loopback, with a clock the test moves.
pub struct TestServer {
    pub addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    pub ledger: Arc<Ledger>,
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
        let policy = Arc::new(Policy::from_toml(policy_toml, "test.toml").expect("test policy"));
        // sled's background threads can hold the directory's lock for a moment after the last
        // handle of a stopped server is dropped: a restart retries for up to two seconds.
        let mut attempt = 0;
        let ledger = loop {
            match Ledger::open(
                dir.path(),
                policy.clone(),
                bounds,
                Durability::Strict,
                clock.clone(),
            ) {
                Ok(l) => break Arc::new(l),
                Err(e) if attempt < 100 => {
                    attempt += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("open ledger: {e}"),
            }
        };
        let (listener, addr) = tollgate::server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind");
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
    pub async fn admin(
        &self,
    ) -> AdminClient<
        InterceptedService<Channel, impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone>,
    > {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let bearer: MetadataValue<_> = format!("Bearer {ADMIN_TOKEN}").parse().unwrap();
        AdminClient::with_interceptor(channel, move |mut req: Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        })
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
        let dir = self.dir.clone();
        let clock = self.clock.clone();
        let ledger = self.ledger.clone();
        self.stop().await;
        // The ledger (and the sled handle it owns) must be gone before the directory is reopened.
        drop(wait_unique(ledger).await);
        Self::start_in(policy_toml, dir, clock, Bounds::default()).await
    }
}

async fn wait_unique(mut ledger: Arc<Ledger>) -> Ledger {
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

/// The decision of a response, as the enum.
pub fn decision(r: &proto::ReserveResponse) -> proto::Decision {
    proto::Decision::try_from(r.decision).expect("a known decision")
}

/// A limit's status by name.
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

pub fn limit<'a>(limits: &'a [proto::LimitStatus], name: &str) -> &'a proto::LimitStatus {
    limits
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no limit {name} in {limits:?}"))
}

/// The real `tollgate` binary, started as a child process.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Process {
    /// Start `tollgate serve` on 127.0.0.1:0 with `args`, and wait for its address.
    pub fn serve(data_dir: &std::path::Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tollgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("tollgate listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .expect("an address");
        Self { child, addr }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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

/// A Quota client.
pub type Quota = QuotaClient<Channel>;

/// Commit `prompt` + `completion` tokens of usage to reservation `id`.
pub async fn commit(
    q: &mut Quota,
    id: &str,
    prompt: u64,
    completion: u64,
) -> proto::CommitResponse {
    q.commit(proto::CommitRequest {
        reservation_id: id.to_string(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        usage_unknown: false,
    })
    .await
    .expect("commit")
    .into_inner()
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
