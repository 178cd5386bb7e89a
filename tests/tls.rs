//! TLS and mTLS on the gRPC port, through the real binary with certificates made here: a
//! client that trusts the CA is served; a plaintext client is refused on the TLS port; with
//! --client-ca a client without a certificate, or with one another CA signed, is refused and
//! one signed by it is served; a certificate rotated on disk is used by new connections
//! without a restart, while an open connection keeps working.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tollgate::proto::quota_client::QuotaClient;
use tollgate::proto::Decision;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const POLICY: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 100000
hold_seconds = 3600
"#;

/// A server on a fresh data directory in `dir`, with the test policy (and `extra_policy`
/// after it: callers) and `args`.
fn serve(dir: &Path, extra_policy: &str, args: &[String]) -> Serve {
    let policy = write_file(dir, "policy.toml", &format!("{POLICY}\n{extra_policy}"));
    Serve::new(&dir.join("data")).policy(&policy).args(args)
}

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `sans` signed by this CA: (certificate PEM, key PEM).
    fn leaf(&self, sans: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A server's TLS files in a test's directory: its certificate and key, signed by a CA for
/// localhost, and that CA's certificate.
struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    ca_file: PathBuf,
}

impl ServerTls {
    fn new(dir: &Path, ca: &Ca) -> Self {
        let (cert, key) = ca.leaf(&["localhost"]);
        Self {
            cert: write_file(dir, "server.pem", &cert),
            key: write_file(dir, "server.key", &key),
            ca_file: write_file(dir, "ca.pem", &ca.pem()),
        }
    }

    /// `--tls-cert` and `--tls-key`.
    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }

    /// The same, with `--client-ca client_ca` (mTLS).
    fn mutual(&self, client_ca: &Path) -> Vec<String> {
        let mut args = self.args();
        args.extend(["--client-ca".into(), client_ca.display().to_string()]);
        args
    }
}

/// A TLS client trusting `ca_pem`, with a client certificate if given.
async fn client(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<QuotaClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(QuotaClient::new(channel))
}

/// Whether a Reserve through `q` is answered (any decision).
async fn answered(q: Result<QuotaClient<Channel>, tonic::transport::Error>) -> Result<(), String> {
    let mut q = q.map_err(|e| format!("connect: {e:?}"))?;
    q.reserve(reserve("alice", 10, 10))
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let p = serve(dir.path(), "", &ServerTls::new(dir.path(), &ca).args()).start();
    let mut q = client(p.addr, &ca.pem(), None).await.expect("TLS connect");
    let r = rsv(&mut q, reserve("alice", 100, 100)).await;
    assert_eq!(decision(&r), Decision::Allowed);

    // A plaintext client on the TLS port gets no answer.
    let plain = Channel::from_shared(p.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let refused = QuotaClient::new(channel)
            .reserve(reserve("alice", 1, 1))
            .await;
        assert!(
            refused.is_err(),
            "a plaintext call was answered: {refused:?}"
        );
    }
    // A client that trusts another CA refuses the server (and is not served).
    let other = Ca::new("another CA");
    assert!(answered(client(p.addr, &other.pem(), None).await)
        .await
        .is_err());
    // Nothing the refused clients did reached the ledger: alice has one hold.
    assert_eq!(usage(&mut q, "alice").await.open_holds, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate_signed_by_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let clients_ca = Ca::new("clients CA");
    let rogue_ca = Ca::new("rogue CA");
    let client_ca = write_file(dir.path(), "clients-ca.pem", &clients_ca.pem());
    let tls = ServerTls::new(dir.path(), &ca);
    let p = serve(dir.path(), "", &tls.mutual(&client_ca)).start();
    let good = clients_ca.leaf(&["chat-app.internal"]);
    let rogue = rogue_ca.leaf(&["chat-app.internal"]);

    let none = answered(client(p.addr, &ca.pem(), None).await).await;
    assert!(none.is_err(), "a client without a certificate was served");
    let other = answered(client(p.addr, &ca.pem(), Some(&rogue)).await).await;
    assert!(
        other.is_err(),
        "a certificate another CA signed was accepted"
    );
    answered(client(p.addr, &ca.pem(), Some(&good)).await)
        .await
        .expect("a client certificate signed by --client-ca is served");
    let mut q = client(p.addr, &ca.pem(), Some(&good)).await.unwrap();
    assert_eq!(
        usage(&mut q, "alice").await.open_holds,
        1,
        "only the accepted client's Reserve reached the ledger"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_on_disk_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let tls = ServerTls::new(dir.path(), &old_ca);
    let (cert, key) = (tls.cert.clone(), tls.key.clone());
    let log = dir.path().join("server.log");
    let p = serve(dir.path(), "", &tls.args())
        .env("RUST_LOG", "info")
        .log_to(&log)
        .start();
    let mut open = client(p.addr, &old_ca.pem(), None).await.unwrap();
    rsv(&mut open, reserve("alice", 1, 1)).await;
    assert!(answered(client(p.addr, &new_ca.pem(), None).await)
        .await
        .is_err());

    // A half-written rotation (a key that does not parse) is refused; the old one stays.
    replace_file(&key, "not a key");
    let started = Instant::now();
    while !p.log_text().contains("the changed files are refused") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answered(client(p.addr, &old_ca.pem(), None).await)
        .await
        .expect("the previous certificate still serves");

    // The rotation, as cert-manager writes it: new certificate and key.
    let (new_cert, new_key) = new_ca.leaf(&["localhost"]);
    replace_file(&key, &new_key);
    replace_file(&cert, &new_cert);
    let started = Instant::now();
    loop {
        if answered(client(p.addr, &new_ca.pem(), None).await)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the rotated certificate was not used: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New connections get the new certificate only; the open connection kept its session.
    assert!(answered(client(p.addr, &old_ca.pem(), None).await)
        .await
        .is_err());
    rsv(&mut open, reserve("alice", 1, 1)).await;
    // Two through the open connection, one through the old certificate after the refused
    // rotation, one through the new certificate.
    assert_eq!(usage(&mut open, "alice").await.open_holds, 4);
    assert!(!p.log_text().contains("BEGIN"), "key material in the log");
}

#[test]
fn a_key_that_does_not_match_is_refused_at_start_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let mut tls = ServerTls::new(dir.path(), &ca);
    let (_, other_key) = ca.leaf(&["localhost"]);
    tls.key = write_file(dir.path(), "other.key", &other_key);
    let log = dir.path().join("refused.log");
    let refused = serve(dir.path(), "", &tls.args()).log_to(&log).try_start();
    assert!(refused.is_err(), "a key of another certificate was served");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("--tls-cert and --tls-key") && !text.contains("PRIVATE KEY"),
        "{text}"
    );
}

/// A relay reaches a central tollgate over mTLS (`--upstream https://`, `--upstream-ca`, a
/// client certificate), and a relay without the client certificate cannot: its Reserves are
/// answered by the tier's fail mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_reaches_its_upstream_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("replicas CA");
    let tls = ServerTls::new(dir.path(), &ca);
    let ca_file = tls.ca_file.clone();
    let central = serve(dir.path(), "", &tls.mutual(&ca_file)).start();
    let (relay_cert, relay_key) = ca.leaf(&["relay.internal"]);
    let relay_cert = write_file(dir.path(), "relay.pem", &relay_cert);
    let relay_key = write_file(dir.path(), "relay.key", &relay_key);
    let upstream = format!("https://localhost:{}", central.addr.port());
    let policy = write_file(dir.path(), "relay-policy.toml", POLICY);
    let relay = Serve::new(&dir.path().join("relay-data"))
        .sled_only()
        .args([
            "--policy",
            policy.to_str().unwrap(),
            "--upstream",
            &upstream,
            "--upstream-ca",
            ca_file.to_str().unwrap(),
            "--upstream-cert",
            relay_cert.to_str().unwrap(),
            "--upstream-key",
            relay_key.to_str().unwrap(),
        ])
        .start();
    let mut q = relay.quota().await;
    let r = rsv(&mut q, reserve("alice", 100, 100)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_eq!(usage(&mut q, "alice").await.open_holds, 1);

    // Without the client certificate the central service refuses the relay's handshake.
    let bare = Serve::new(&dir.path().join("bare-data"))
        .sled_only()
        .args([
            "--policy",
            policy.to_str().unwrap(),
            "--upstream",
            &upstream,
            "--upstream-ca",
            ca_file.to_str().unwrap(),
            "--upstream-timeout",
            "0.5",
        ])
        .start();
    let mut q = bare.quota().await;
    let r = rsv(&mut q, reserve("alice", 100, 100)).await;
    assert_eq!(decision(&r), Decision::Denied, "{r:?}");
    assert_eq!(r.denied_by, tollgate::relay::UPSTREAM_UNAVAILABLE);
}

/// A caller known by its mTLS identity: a SAN of its client certificate names it in
/// `[callers]`; a certificate of the same CA with another SAN is no caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_is_known_by_the_san_of_its_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mesh CA");
    let tls = ServerTls::new(dir.path(), &ca);
    let callers =
        "[callers.chat-app]\nsan = \"spiffe://mesh/chat-app\"\nsubject_prefix = \"chat:\"\n";
    let p = serve(dir.path(), callers, &tls.mutual(&tls.ca_file)).start();
    let chat = ca.leaf(&["spiffe://mesh/chat-app"]);
    let other = ca.leaf(&["spiffe://mesh/batch"]);
    let mut q = client(p.addr, &ca.pem(), Some(&chat)).await.unwrap();
    let r = rsv(&mut q, reserve("chat:alice", 10, 10)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    let refused = q.reserve(reserve("search:bob", 10, 10)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let mut q = client(p.addr, &ca.pem(), Some(&other)).await.unwrap();
    let refused = q.reserve(reserve("chat:alice", 10, 10)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("names no caller"), "{refused:?}");
}

/// Replicas on PostgreSQL with TLS everywhere: a follower relays to its leader over mTLS
/// (checking the leader's certificate against one name, whatever address it dials), and takes
/// over when the leader is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_relays_to_its_leader_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("replicas CA");
    // One certificate for every replica: a server and client certificate for the Service's
    // name (here localhost).
    let tls = ServerTls::new(dir.path(), &ca);
    let (cert, key, ca_file) = (&tls.cert, &tls.key, &tls.ca_file);
    let url = common::postgres::server().database();
    // The app is a caller known only by its certificate: through a follower too, which names
    // it to the leader (believed because the follower's own certificate is a replica's).
    let policy = write_file(
        dir.path(),
        "policy.toml",
        &format!("{POLICY}\n[callers.app]\nsan = \"app.internal\"\n"),
    );
    let args = [
        "--store",
        url.as_str(),
        "--lease-ttl",
        "2",
        "--policy",
        policy.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--client-ca",
        ca_file.to_str().unwrap(),
        "--upstream-ca",
        ca_file.to_str().unwrap(),
        "--upstream-server-name",
        "localhost",
        "--upstream-cert",
        cert.to_str().unwrap(),
        "--upstream-key",
        key.to_str().unwrap(),
    ];
    let leader = Serve::new(&dir.path().join("a")).args(args).start();
    let leader_address = leader.addr.to_string();
    let u = url.clone();
    tokio::task::spawn_blocking(move || common::postgres::wait_until_leading(&u, &leader_address))
        .await
        .unwrap();
    // The follower's plaintext health port answers while it follows (probes cannot use the
    // TLS port).
    let health_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let health_flag = health_port.to_string();
    let follower = Serve::new(&dir.path().join("b"))
        .args(args)
        .args(["--health-listen", health_flag.as_str()])
        .start();
    let mut probe = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{health_port}"))
            .unwrap()
            .connect()
            .await
            .expect("the follower's health port"),
    );
    let status = probe
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tollgate.v1.Quota".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let me = ca.leaf(&["app.internal"]);
    let mut qb = client(follower.addr, &ca.pem(), Some(&me)).await.unwrap();
    let r = rsv(&mut qb, reserve("alice", 100, 100)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    let mut qa = client(leader.addr, &ca.pem(), Some(&me)).await.unwrap();
    assert_eq!(usage(&mut qa, "alice").await.open_holds, 1, "one ledger");
    // A hold made through the follower is the app's: the app settles it through the leader.
    rsv(&mut qa, reserve("alice", 1, 1)).await;
    // Naming a caller is believed only from a replica's certificate.
    let impostor = ca.leaf(&["impostor.internal"]);
    let mut qi = client(leader.addr, &ca.pem(), Some(&impostor))
        .await
        .unwrap();
    let mut claim = tonic::Request::new(reserve("alice", 1, 1));
    claim
        .metadata_mut()
        .insert("x-tollgate-caller", "app".parse().unwrap());
    let refused = qi.reserve(claim).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    leader.kill9();
    let follower_address = follower.addr.to_string();
    tokio::task::spawn_blocking(move || {
        common::postgres::wait_until_leading(&url, &follower_address)
    })
    .await
    .unwrap();
    let mut qb = client(follower.addr, &ca.pem(), Some(&me)).await.unwrap();
    assert_eq!(usage(&mut qb, "alice").await.open_holds, 2);
    let r = rsv(&mut qb, reserve("alice", 100, 100)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
}

/// The CLI reaches a secured port: `tollgate usage` over TLS with a caller's token, and
/// `tollgate export --addr` over TLS with the admin token; without the CA it is refused.
#[test]
fn the_cli_reaches_a_tls_port() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cli CA");
    let tls = ServerTls::new(dir.path(), &ca);
    let ca_file = &tls.ca_file;
    let token = "cli-token-0123456789abcdef";
    let digest = tollgate::policy::callers::token_sha256_hex(token);
    let callers = format!("[callers.ops]\ntoken_sha256 = \"{digest}\"\n");
    let p = serve(dir.path(), &callers, &tls.args()).start();
    let addr = format!("https://localhost:{}", p.addr.port());
    let tollgate = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(args);
        run_to_exit(cmd, std::time::Duration::from_secs(60))
    };
    let ok = tollgate(&[
        "usage",
        "alice",
        "--addr",
        &addr,
        "--ca",
        ca_file.to_str().unwrap(),
        "--token",
        token,
    ]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("alice"),
        "{ok:?}"
    );
    let no_token = tollgate(&[
        "usage",
        "alice",
        "--addr",
        &addr,
        "--ca",
        ca_file.to_str().unwrap(),
    ]);
    assert!(!no_token.status.success());
    assert!(
        String::from_utf8_lossy(&no_token.stderr).contains("Unauthenticated"),
        "{no_token:?}"
    );
    let no_ca = tollgate(&["usage", "alice", "--addr", &addr, "--token", token]);
    assert!(!no_ca.status.success());
    assert!(
        String::from_utf8_lossy(&no_ca.stderr).contains("--upstream-ca")
            || String::from_utf8_lossy(&no_ca.stderr).contains("CA"),
        "{no_ca:?}"
    );
    let out = dir.path().join("export.jsonl");
    let exported = tollgate(&[
        "export",
        "--addr",
        &addr,
        "--ca",
        ca_file.to_str().unwrap(),
        "--admin-token",
        ADMIN_TOKEN,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(exported.status.success(), "{exported:?}");
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .contains("\"kind\":\"end\""));
}
