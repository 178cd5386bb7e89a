//! Relay mode end to end: relays (no ledger) in front of one central tollgate, all over gRPC on
//! loopback. Relays share the central quota, count prompts themselves, fail closed or open per
//! tier when the central service is gone, answer their own fail-open holds, reconnect when it
//! comes back, and forward Admin calls with their credentials.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Code, Request};

use common::*;
use tollgate::clock::ManualClock;
use tollgate::policy::Policy;
use tollgate::proto::admin_client::AdminClient;
use tollgate::proto::quota_client::QuotaClient;
use tollgate::proto::{
    ChatMessage, CountTokensRequest, Decision, ExtendRequest, GetSubjectRequest, GetUsageRequest,
    ReserveRequest, ReserveResponse, ResetUsageRequest, SetSubjectRequest,
};
use tollgate::relay::ForwardingLedger;
use tollgate::server::{serve_backend, Backend, ServeOptions};

/// The relay's answer (denied_by / shadow_denied_by) when the central service is unreachable.
const UNAVAILABLE: &str = "upstream_unavailable";

/// A relay served in this process on loopback, forwarding to `upstream`.
struct TestRelay {
    addr: SocketAddr,
    _shutdown: oneshot::Sender<()>,
    _handle: JoinHandle<()>,
}

impl TestRelay {
    /// A relay on `policy_toml` with an upstream deadline of `timeout`, on `clock`. Served with
    /// the default options: no admin token of its own (Admin calls are checked upstream).
    async fn start(
        upstream: &str,
        policy_toml: &str,
        timeout: Duration,
        clock: Arc<ManualClock>,
    ) -> Self {
        let policy = Arc::new(Policy::from_toml(policy_toml, "relay.toml").expect("relay policy"));
        let relay =
            Arc::new(ForwardingLedger::new(upstream, policy, timeout, clock, None).expect("relay"));
        let (listener, addr) = tollgate::server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            serve_backend(
                Backend::Forwarding(relay),
                listener,
                None,
                ServeOptions::default(),
                async {
                    let _ = rx.await;
                },
            )
            .await
            .expect("serve relay");
        });
        Self {
            addr,
            _shutdown: tx,
            _handle: handle,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A Quota client on a new connection.
    async fn quota(&self) -> Quota {
        QuotaClient::connect(self.url()).await.expect("connect")
    }

    /// An Admin client on a new connection (credentials are added per request, see `bearer`).
    async fn admin(&self) -> AdminClient<tonic::transport::Channel> {
        AdminClient::connect(self.url()).await.expect("connect")
    }
}

/// `message` with metadata `authorization: Bearer <token>`.
fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A loopback address nothing listens on (bound, noted, released): connections are refused.
fn dead_address() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn count(q: &mut Quota, model: &str, prompt: Option<&str>, chat: &[ChatMessage]) -> u64 {
    q.count_tokens(CountTokensRequest {
        model: model.into(),
        prompt: prompt.map(str::to_string),
        messages: chat.to_vec(),
    })
    .await
    .expect("count_tokens")
    .into_inner()
    .tokens
}

/// The figures of a subject's GetUsage answer that must agree wherever it is asked:
/// (used, held, requests, open holds, tokens_per_day remaining).
fn figures(u: &tollgate::proto::GetUsageResponse) -> (u64, u64, u64, u32, u64) {
    (
        u.used_tokens,
        u.held_tokens,
        u.requests,
        u.open_holds,
        scoped_limit(&u.limits, "subject", "tokens_per_day").remaining,
    )
}

#[track_caller]
fn assert_allowed(r: &ReserveResponse, tokens: u64) {
    assert_eq!(decision(r), Decision::Allowed, "{r:?}");
    assert_eq!(r.reserved_tokens, tokens, "{r:?}");
    assert_eq!(r.reservation_id.len(), 36, "{r:?}");
    assert!(
        r.denied_by.is_empty() && r.shadow_denied_by.is_empty(),
        "{r:?}"
    );
}

/// A fail-closed answer: denied by upstream_unavailable, retry after exactly one second.
#[track_caller]
fn assert_failed_closed(r: &ReserveResponse, tier: &str) {
    assert_eq!(decision(r), Decision::Denied, "{r:?}");
    assert_eq!(r.denied_by, UNAVAILABLE, "{r:?}");
    let retry = r.retry_after.as_ref().expect("retry_after");
    assert_eq!((retry.seconds, retry.nanos), (1, 0), "{r:?}");
    assert!(r.reservation_id.is_empty(), "{r:?}");
    assert_eq!(r.reserved_tokens, 0, "{r:?}");
    assert!(r.expires_at.is_none(), "{r:?}");
    assert!(r.shadow_denied_by.is_empty(), "{r:?}");
    assert_eq!(r.tier, tier, "{r:?}");
}

/// The process-wide Prometheus recorder, so the relay's counters can be read back.
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| tollgate::telemetry::install_recorder().expect("install the recorder"))
}

/// tollgate_relay_upstream_unavailable_total{tier, mode}, 0 when never counted.
fn upstream_unavailable_count(tier: &str, mode: &str) -> u64 {
    let tier = format!("tier=\"{tier}\"");
    let mode = format!("mode=\"{mode}\"");
    metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(tollgate::telemetry::UPSTREAM_FAILURES))
        .find(|l| l.contains(&tier) && l.contains(&mode))
        .map_or(0, |l| {
            l.rsplit(' ')
                .next()
                .unwrap()
                .parse::<f64>()
                .expect("a number") as u64
        })
}

// ---------------------------------------------------------------------------------------------
// 1. One quota, whatever the number of relays.

const SHARED: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 1000
"#;

/// The point of relay mode: N relays (pods) never mean N ledgers. Reserves through two relays
/// on their own connections add up at the one central ledger; once the subject's 1000 tokens a
/// day are spent (though neither relay has passed more than 600 of them), the next Reserve is
/// denied through either relay and at the central service alike, and GetUsage agrees
/// wherever it is asked.
#[tokio::test]
async fn two_relays_share_one_quota_at_the_central_ledger() {
    let central = TestServer::start(SHARED).await;
    let a = TestRelay::start(
        &central.url(),
        SHARED,
        Duration::from_secs(2),
        central.clock.clone(),
    )
    .await;
    let b = TestRelay::start(
        &central.url(),
        SHARED,
        Duration::from_secs(2),
        central.clock.clone(),
    )
    .await;
    let (mut qa, mut qb, mut qc) = (a.quota().await, b.quota().await, central.quota().await);

    let r1 = rsv(&mut qa, reserve("uma", 100, 200)).await;
    assert_allowed(&r1, 300);
    assert_eq!(
        r1.tier, "free",
        "the central service's tier comes back: {r1:?}"
    );
    let r2 = rsv(&mut qb, reserve("uma", 200, 100)).await;
    assert_allowed(&r2, 300);

    // Both holds are in the one ledger, whoever asks.
    for q in [&mut qa, &mut qb, &mut qc] {
        assert_eq!(figures(&usage(q, "uma").await), (0, 600, 2, 2, 400));
    }

    // A hold made through one relay is settled through the other: it lives centrally.
    let c1 = commit(&mut qb, &r1.reservation_id, 100, 150).await;
    assert_eq!((c1.charged_tokens, c1.released_tokens), (250, 50));
    let c2 = commit(&mut qa, &r2.reservation_id, 200, 50).await;
    assert_eq!((c2.charged_tokens, c2.released_tokens), (250, 50));
    for q in [&mut qa, &mut qb, &mut qc] {
        assert_eq!(figures(&usage(q, "uma").await), (500, 0, 2, 0, 500));
    }

    // 500 used + 300 + 200 held = the whole 1000. Relay A has passed 600 tokens in all, relay B
    // 500: a relay keeping its own ledger would still allow.
    assert_allowed(&rsv(&mut qa, reserve("uma", 200, 100)).await, 300);
    assert_allowed(&rsv(&mut qb, reserve("uma", 100, 100)).await, 200);
    for q in [&mut qa, &mut qb, &mut qc] {
        let r = rsv(q, reserve("uma", 1, 0)).await;
        assert_eq!(decision(&r), Decision::Denied, "{r:?}");
        assert_eq!(r.denied_by, "tokens_per_day", "{r:?}");
        assert!(r.reservation_id.is_empty(), "{r:?}");
    }
    let seen: Vec<_> = [
        usage(&mut qa, "uma").await,
        usage(&mut qb, "uma").await,
        usage(&mut qc, "uma").await,
    ]
    .iter()
    .map(figures)
    .collect();
    assert_eq!(
        seen,
        vec![(500, 500, 4, 2, 0); 3],
        "one quota, seen alike from everywhere"
    );
    let u = usage(&mut qc, "uma").await;
    assert_eq!(
        u.denials, 3,
        "the three denials were all decided centrally: {u:?}"
    );

    // Only uma's quota is spent: another subject is allowed through either relay.
    assert_allowed(&rsv(&mut qb, reserve("vic", 10, 10)).await, 20);
}

// ---------------------------------------------------------------------------------------------
// 2. Prompts are counted in the relay.

const COUNTING: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 1000000

# Only gpt-4o-mini; anything else is downgraded to it.
[tiers.thrifty]
models = ["gpt-4o-mini"]
downgrade = { model = "gpt-4o-mini" }

[models."gpt-4o"]
default_max_output_tokens = 64
"#;

/// A Reserve with prompt text or chat messages through a relay is counted there with the
/// model's tokenizer (the same count CountTokens gives, at the relay or centrally) and reaches
/// the central ledger as prompt_tokens + max_output_tokens (the policy's output default filled
/// in when absent).
#[tokio::test]
async fn prompts_and_chats_are_counted_in_the_relay() {
    let central = TestServer::start(COUNTING).await;
    // The central service could not count: the relay would have to. Its policy is the same.
    let relay = TestRelay::start(
        &central.url(),
        COUNTING,
        Duration::from_secs(2),
        central.clock.clone(),
    )
    .await;
    let (mut qr, mut qc) = (relay.quota().await, central.quota().await);

    let text = "Summarise the quarterly report in three bullet points, please. Keep it short.";
    let n = count(&mut qr, "gpt-4o", Some(text), &[]).await;
    assert_eq!(n, count(&mut qc, "gpt-4o", Some(text), &[]).await);
    assert!(n > 5, "{n}");
    let r = rsv(&mut qr, reserve_text("pat", "gpt-4o", text, Some(50))).await;
    assert_allowed(&r, n + 50);
    assert_eq!(r.prompt_tokens, n, "{r:?}");
    let u = usage(&mut qc, "pat").await;
    assert_eq!((u.held_tokens, u.open_holds), (n + 50, 1), "{u:?}");

    // A chat, counted as the chat API counts it (per-message overhead included).
    let chat = vec![
        ChatMessage {
            role: "system".into(),
            content: "You are terse.".into(),
            name: String::new(),
        },
        ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
            name: "pat".into(),
        },
    ];
    let m = count(&mut qr, "gpt-4o", None, &chat).await;
    assert_eq!(m, count(&mut qc, "gpt-4o", None, &chat).await);
    let r = rsv(
        &mut qr,
        ReserveRequest {
            subject: "pat".into(),
            model: "gpt-4o".into(),
            messages: chat,
            max_output_tokens: Some(7),
            ..Default::default()
        },
    )
    .await;
    assert_allowed(&r, m + 7);
    assert_eq!(r.prompt_tokens, m, "{r:?}");
    let u = usage(&mut qc, "pat").await;
    assert_eq!((u.held_tokens, u.open_holds), (n + 50 + m + 7, 2), "{u:?}");

    // No max_output_tokens: the policy's default for the model (64) is held.
    let r = rsv(
        &mut qr,
        ReserveRequest {
            max_output_tokens: None,
            ..reserve_text("quin", "gpt-4o", text, Some(0))
        },
    )
    .await;
    assert_allowed(&r, n + 64);
    assert_eq!(usage(&mut qc, "quin").await.held_tokens, n + 64);
}

/// A downgrade to a model with another tokenizer is held at the granted model's count, which
/// only the relay could make (it forwards prompt_tokens_for; the central service never sees
/// the text).
#[tokio::test]
async fn a_downgrade_through_a_relay_holds_the_granted_models_count() {
    let central = TestServer::start(COUNTING).await;
    let relay = TestRelay::start(
        &central.url(),
        COUNTING,
        Duration::from_secs(2),
        central.clock.clone(),
    )
    .await;
    let (mut qr, mut qc) = (relay.quota().await, central.quota().await);
    central
        .admin()
        .await
        .set_subject(set_subject_req("tess", "thrifty"))
        .await
        .expect("set_subject");

    let text = "Привет! Как дела? 你好，世界。こんにちは、元気ですか。Übersetze das bitte.";
    let asked = count(&mut qr, "gpt-4", Some(text), &[]).await; // cl100k_base
    let granted = count(&mut qr, "gpt-4o-mini", Some(text), &[]).await; // o200k_base
    assert_ne!(
        asked, granted,
        "the test needs a text the two tokenizers count differently"
    );

    let r = rsv(&mut qr, reserve_text("tess", "gpt-4", text, Some(10))).await;
    assert_eq!(decision(&r), Decision::Downgraded, "{r:?}");
    assert_eq!(r.model, "gpt-4o-mini", "{r:?}");
    assert_eq!(r.prompt_tokens, granted, "{r:?}");
    assert_eq!(r.reserved_tokens, granted + 10, "{r:?}");
    assert_eq!(r.tier, "thrifty", "{r:?}");
    assert_eq!(usage(&mut qc, "tess").await.held_tokens, granted + 10);

    // Given the count alone (what a relay forwarding no prompt_tokens_for would send), the
    // central service could only hold the asked model's count.
    let r = rsv(
        &mut qc,
        ReserveRequest {
            model: "gpt-4".into(),
            ..reserve("tess", asked, 10)
        },
    )
    .await;
    assert_eq!(decision(&r), Decision::Downgraded, "{r:?}");
    assert_eq!(r.reserved_tokens, asked + 10, "{r:?}");
}

/// Malformed requests are refused by the relay itself, before any upstream call: they are
/// INVALID_ARGUMENT even with no central service at all. CountTokens needs none either.
#[tokio::test]
async fn bad_input_is_refused_by_the_relay_itself_even_with_the_central_down() {
    let clock = Arc::new(ManualClock::new(T0));
    let relay = TestRelay::start(
        &format!("http://{}", dead_address()),
        COUNTING,
        Duration::from_millis(500),
        clock,
    )
    .await;
    let mut q = relay.quota().await;

    // The central service is indeed gone: a valid Reserve fails closed.
    assert_failed_closed(&rsv(&mut q, reserve("ok", 1, 1)).await, "free");

    let bad: Vec<(ReserveRequest, &str)> = vec![
        (reserve("", 1, 1), "subject"),
        (
            ReserveRequest {
                client_ip: "not-an-ip".into(),
                ..reserve("ann", 1, 1)
            },
            "client_ip",
        ),
        (
            ReserveRequest {
                prompt: Some("hello".into()),
                ..reserve("ann", 1, 1)
            },
            "prompt",
        ),
        (
            reserve_text("ann", "no-such-model", "hello", Some(1)),
            "no known tokenizer",
        ),
        (
            ReserveRequest {
                subject: "ann\u{7}".into(),
                ..reserve("ann", 1, 1)
            },
            "subject",
        ),
    ];
    for (req, needle) in bad {
        assert_status(q.reserve(req).await, Code::InvalidArgument, &[needle]);
    }
    assert_status(
        q.get_usage(GetUsageRequest {
            subject: "ann".into(),
            client_ip: "300.1.1.1".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["client_ip"],
    );
    assert_status(
        q.commit(commit_req("nope", 0, 0)).await,
        Code::InvalidArgument,
        &["reservation_id"],
    );
    assert_status(
        q.extend(ExtendRequest {
            reservation_id: "0190b3a0-0000-7000-8000-000000000000".into(),
            hold: None,
        })
        .await,
        Code::InvalidArgument,
        &["hold"],
    );

    // CountTokens is answered locally.
    assert!(count(&mut q, "gpt-4o", Some("hello world"), &[]).await > 0);
}

// ---------------------------------------------------------------------------------------------
// 3. Fail closed.

const CLOSED: &str = r#"
default_tier = "closed_default"

[tiers.closed_default]
tokens_per_day = 100000
"#;

/// With the central service stopped, a Reserve for a subject of a fail-closed tier (the
/// default) is denied with "upstream_unavailable" and retry_after 1 s, promptly, and counted;
/// calls about central holds answer UNAVAILABLE (to be retried), never a made-up answer.
#[tokio::test]
async fn fail_closed_denies_and_central_holds_answer_unavailable() {
    metrics();
    let central = TestServer::start(CLOSED).await;
    let relay = TestRelay::start(
        &central.url(),
        CLOSED,
        Duration::from_millis(500),
        central.clock.clone(),
    )
    .await;
    let mut q = relay.quota().await;
    let held = rsv(&mut q, reserve("cal", 10, 10)).await;
    assert_allowed(&held, 20);
    assert_eq!(held.tier, "closed_default");
    central.stop().await;

    let before = upstream_unavailable_count("closed_default", "closed");
    let started = Instant::now();
    let r = rsv(&mut q, reserve("cal", 10, 10)).await;
    assert_failed_closed(&r, "closed_default");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered without waiting long: {:?}",
        started.elapsed()
    );
    // A prompt is still counted (and reported) when the answer is a denial.
    let r = rsv(
        &mut q,
        reserve_text("cal", "gpt-4o", "hello there", Some(5)),
    )
    .await;
    assert_failed_closed(&r, "closed_default");
    assert_eq!(
        r.prompt_tokens,
        count(&mut q, "gpt-4o", Some("hello there"), &[]).await
    );
    assert_eq!(
        upstream_unavailable_count("closed_default", "closed") - before,
        2
    );

    // The hold made before the outage is central: only the central service can settle it.
    let id = held.reservation_id.clone();
    let commit = q.commit(commit_req(&id, 10, 5)).await;
    assert_status(commit, Code::Unavailable, &[]);
    assert_status(q.refund(refund_req(&id)).await, Code::Unavailable, &[]);
    assert_status(
        q.extend(ExtendRequest {
            reservation_id: id,
            hold: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await,
        Code::Unavailable,
        &[],
    );
    assert_status(
        q.get_usage(GetUsageRequest {
            subject: "cal".into(),
            ..Default::default()
        })
        .await,
        Code::Unavailable,
        &[],
    );
    let mut admin = relay.admin().await;
    assert_status(
        admin
            .get_subject(bearer(
                GetSubjectRequest {
                    subject: "cal".into(),
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::Unavailable,
        &[],
    );
}

/// An upstream that accepts the connection but never answers (a hung central service, a
/// black-holed route): the upstream deadline passes and the Reserve fails closed, within about
/// that deadline.
#[tokio::test]
async fn a_hung_upstream_fails_closed_when_the_deadline_passes() {
    // Its own tier name, so the metric counted in the test above is not disturbed.
    const POLICY: &str = r#"
default_tier = "hung_default"

[tiers.hung_default]
"#;
    // Bound and listening (the kernel completes the handshake) but never accepted or read.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = TestRelay::start(
        &format!("http://{}", hung.local_addr().unwrap()),
        POLICY,
        Duration::from_millis(300),
        Arc::new(ManualClock::new(T0)),
    )
    .await;
    let mut q = relay.quota().await;
    let started = Instant::now();
    let r = rsv(&mut q, reserve("hal", 1, 1)).await;
    assert_failed_closed(&r, "hung_default");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 300 ms deadline bounds the wait: {:?}",
        started.elapsed()
    );
    drop(hung);
}

// ---------------------------------------------------------------------------------------------
// 4. Fail open.

const OPEN: &str = r#"
default_tier = "closed_std"

[tiers.closed_std]
tokens_per_day = 100000

[tiers.always_on]
fail = "open"
tokens_per_day = 100000
hold_seconds = 60
max_hold_seconds = 3600
"#;

/// A subject whose tier (learned from the central service's answers) fails open is allowed
/// while the central service is gone, with shadow_denied_by "upstream_unavailable" and a
/// reservation id the relay keeps: its Commit, Refund and Extend are answered by the relay with
/// the usual lifecycle rules. A subject the relay has never seen gets the default tier's mode
/// (closed here).
#[tokio::test]
async fn fail_open_allows_and_the_relay_settles_its_own_holds() {
    metrics();
    let central = TestServer::start(OPEN).await;
    let clock = central.clock.clone();
    let relay = TestRelay::start(
        &central.url(),
        OPEN,
        Duration::from_millis(500),
        clock.clone(),
    )
    .await;
    let mut q = relay.quota().await;

    // Assigned through the relay (forwarded); the relay learns the tier from a Reserve.
    relay
        .admin()
        .await
        .set_subject(bearer(set_subject_req("olga", "always_on"), ADMIN_TOKEN))
        .await
        .expect("set_subject");
    let r = rsv(&mut q, reserve("olga", 1, 1)).await;
    assert_allowed(&r, 2);
    assert_eq!(r.tier, "always_on");
    let r = rsv(&mut q, reserve("sam", 1, 1)).await;
    assert_eq!(r.tier, "closed_std");
    central.stop().await;

    let open_before = upstream_unavailable_count("always_on", "open");
    let closed_before = upstream_unavailable_count("closed_std", "closed");

    // Allowed, said to be so only because the upstream is unavailable.
    let r = rsv(&mut q, reserve("olga", 40, 60)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_eq!(r.shadow_denied_by, UNAVAILABLE, "{r:?}");
    assert!(r.denied_by.is_empty() && r.retry_after.is_none(), "{r:?}");
    assert_eq!(r.reserved_tokens, 100, "{r:?}");
    assert_eq!(r.prompt_tokens, 40, "{r:?}");
    assert_eq!(r.tier, "always_on", "{r:?}");
    assert_eq!(r.reservation_id.len(), 36, "{r:?}");
    let expires = r.expires_at.as_ref().expect("expires_at");
    assert_eq!(
        (expires.seconds as u64, expires.nanos),
        (T0 / SEC + 60, 0),
        "the tier's hold_seconds from now: {r:?}"
    );
    let first = r.reservation_id.clone();

    // Commit: charged what was reported; a retry returns the same; other numbers conflict.
    let c = commit(&mut q, &first, 30, 20).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (50, 50, 0)
    );
    assert_eq!(commit(&mut q, &first, 30, 20).await, c, "a retried Commit");
    let conflict = q.commit(commit_req(&first, 30, 21)).await;
    assert_status(conflict, Code::FailedPrecondition, &["COMMITTED"]);
    assert_status(
        q.refund(refund_req(&first)).await,
        Code::FailedPrecondition,
        &["COMMITTED"],
    );
    assert_status(
        q.extend(ExtendRequest {
            reservation_id: first.clone(),
            hold: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await,
        Code::FailedPrecondition,
        &[],
    );

    // A second hold: extended (never shortened), refunded (a retry returns the same), then a
    // Commit conflicts.
    clock.advance_secs(10);
    let second = rsv(&mut q, reserve("olga", 5, 15)).await;
    assert_eq!(decision(&second), Decision::Allowed, "{second:?}");
    assert_eq!(second.shadow_denied_by, UNAVAILABLE);
    let second = second.reservation_id;
    assert_ne!(second, first);
    let extend = |secs: i64| ExtendRequest {
        reservation_id: second.clone(),
        hold: Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        }),
    };
    let e = q.extend(extend(300)).await.expect("extend").into_inner();
    assert_eq!(e.expires_at.unwrap().seconds as u64, T0 / SEC + 10 + 300);
    let e = q.extend(extend(30)).await.expect("extend").into_inner();
    assert_eq!(
        e.expires_at.unwrap().seconds as u64,
        T0 / SEC + 10 + 300,
        "an Extend never brings the expiry forward"
    );
    let f = q
        .refund(refund_req(&second))
        .await
        .expect("refund")
        .into_inner();
    assert_eq!(f.released_tokens, 20);
    let f = q
        .refund(refund_req(&second))
        .await
        .expect("refund retried")
        .into_inner();
    assert_eq!(f.released_tokens, 20, "a retried Refund");
    let late = q.commit(commit_req(&second, 5, 0)).await;
    assert_status(late, Code::FailedPrecondition, &["REFUNDED"]);

    // Usage is truth: a Commit above the hold is charged in full, the excess as debt; an
    // unknown usage is charged the whole hold.
    let third = rsv(&mut q, reserve("olga", 10, 10)).await.reservation_id;
    let c = commit(&mut q, &third, 25, 5).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (30, 0, 10)
    );
    let fourth = rsv(&mut q, reserve("olga", 10, 10)).await.reservation_id;
    let c = q
        .commit(tollgate::proto::CommitRequest {
            reservation_id: fourth,
            usage_unknown: true,
            ..Default::default()
        })
        .await
        .expect("commit usage_unknown")
        .into_inner();
    assert_eq!((c.charged_tokens, c.released_tokens), (20, 0));

    // A known fail-closed subject, and one never seen (the default tier: closed), are denied.
    assert_failed_closed(&rsv(&mut q, reserve("sam", 1, 1)).await, "closed_std");
    assert_failed_closed(&rsv(&mut q, reserve("nemo", 1, 1)).await, "closed_std");

    // Counted: the four Reserves for olga, the two denials.
    assert_eq!(
        upstream_unavailable_count("always_on", "open") - open_before,
        4
    );
    assert_eq!(
        upstream_unavailable_count("closed_std", "closed") - closed_before,
        2
    );

    // A dry run is allowed too, but holds nothing and has no id.
    let dry = rsv(
        &mut q,
        ReserveRequest {
            dry_run: true,
            ..reserve("olga", 1, 1)
        },
    )
    .await;
    assert_eq!(decision(&dry), Decision::Allowed, "{dry:?}");
    assert_eq!(dry.shadow_denied_by, UNAVAILABLE);
    assert!(
        dry.reservation_id.is_empty() && dry.expires_at.is_none(),
        "{dry:?}"
    );

    // A hold the relay never made is still the central service's: UNAVAILABLE, not NOT_FOUND.
    let unknown = q
        .commit(commit_req("0190b3a0-0000-7000-8000-000000000000", 1, 1))
        .await;
    assert_status(unknown, Code::Unavailable, &[]);
}

const OPEN_BY_DEFAULT: &str = r#"
default_tier = "open_default"

[tiers.open_default]
fail = "open"

[tiers.strict]
fail = "closed"
"#;

/// The other way round: the default tier fails open, so a subject the relay has never seen is
/// allowed; a subject the central service reported in a fail-closed tier is denied.
#[tokio::test]
async fn an_unseen_subject_gets_the_default_tiers_fail_mode() {
    let central = TestServer::start(OPEN_BY_DEFAULT).await;
    let relay = TestRelay::start(
        &central.url(),
        OPEN_BY_DEFAULT,
        Duration::from_millis(500),
        central.clock.clone(),
    )
    .await;
    let mut q = relay.quota().await;
    // Assigned directly at the central service; the relay learns it from a Reserve.
    central
        .admin()
        .await
        .set_subject(set_subject_req("stu", "strict"))
        .await
        .expect("set_subject");
    assert_eq!(rsv(&mut q, reserve("stu", 1, 1)).await.tier, "strict");
    central.stop().await;

    assert_failed_closed(&rsv(&mut q, reserve("stu", 1, 1)).await, "strict");
    let r = rsv(&mut q, reserve("newbie", 3, 4)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_eq!(r.shadow_denied_by, UNAVAILABLE, "{r:?}");
    assert_eq!(
        (r.reserved_tokens, r.tier.as_str()),
        (7, "open_default"),
        "{r:?}"
    );
    let c = commit(&mut q, &r.reservation_id, 3, 1).await;
    assert_eq!((c.charged_tokens, c.released_tokens), (4, 3));
}

// ---------------------------------------------------------------------------------------------
// 5. Recovery.

/// The central service goes away and comes back on the same address: the relay, never
/// restarted, fails closed meanwhile and then forwards again, and the holds made before the
/// outage are still there to settle. A fail-open hold made during the outage stays the
/// relay's (its Commit is answered locally, and is not charged centrally).
#[tokio::test]
async fn the_relay_forwards_again_when_the_central_service_comes_back() {
    const POLICY: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 1000

[tiers.vip]
fail = "open"
tokens_per_day = 1000
"#;
    let central = TestServer::start(POLICY).await;
    let (addr, dir, clock) = (central.addr, central.dir.clone(), central.clock.clone());
    let relay = TestRelay::start(
        &central.url(),
        POLICY,
        Duration::from_millis(500),
        clock.clone(),
    )
    .await;
    let mut q = relay.quota().await;
    central
        .admin()
        .await
        .set_subject(set_subject_req("vera", "vip"))
        .await
        .expect("set_subject");
    let before = rsv(&mut q, reserve("rob", 100, 100)).await;
    assert_allowed(&before, 200);
    assert_allowed(&rsv(&mut q, reserve("vera", 1, 1)).await, 2);

    central.stop().await;
    assert_failed_closed(&rsv(&mut q, reserve("rob", 10, 10)).await, "free");
    let local = rsv(&mut q, reserve("vera", 50, 50)).await;
    assert_eq!(local.shadow_denied_by, UNAVAILABLE, "{local:?}");

    let central = TestServer::start_in_at(POLICY, dir, clock, addr).await;
    // Bounded wait for the relay's connection to be remade.
    let mut attempts = 0;
    let after = loop {
        attempts += 1;
        let r = rsv(&mut q, reserve("rob", 10, 10)).await;
        if r.denied_by != UNAVAILABLE {
            break r;
        }
        assert!(
            attempts < 50,
            "the relay never reached the restarted central service"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_allowed(&after, 20);

    // The pre-outage hold survived the restart and is settled through the relay.
    let c = commit(&mut q, &before.reservation_id, 100, 50).await;
    assert_eq!(c.charged_tokens, 150);
    let mut qc = central.quota().await;
    let u = usage(&mut qc, "rob").await;
    assert_eq!((u.used_tokens, u.held_tokens), (150, 20), "{u:?}");
    assert_eq!(figures(&usage(&mut q, "rob").await), figures(&u));

    // The fail-open hold is still the relay's: answered locally, never charged centrally.
    let c = commit(&mut q, &local.reservation_id, 50, 10).await;
    assert_eq!((c.charged_tokens, c.released_tokens), (60, 40));
    let u = usage(&mut qc, "vera").await;
    assert_eq!((u.used_tokens, u.held_tokens), (0, 2), "{u:?}");
    // vera's Reserves go to the central service again.
    let r = rsv(&mut q, reserve("vera", 1, 1)).await;
    assert_allowed(&r, 2);
}

// ---------------------------------------------------------------------------------------------
// 6. Admin through a relay.

/// Admin calls go through the relay with their bearer token, which only the central service
/// checks: the right one works (and its effect is seen centrally and in later Reserves), a
/// wrong or missing one is UNAUTHENTICATED and changes nothing.
#[tokio::test]
async fn admin_calls_are_forwarded_with_their_credentials() {
    const POLICY: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 1000

[tiers.pro]
tokens_per_day = 100000
"#;
    let central = TestServer::start(POLICY).await;
    let relay = TestRelay::start(
        &central.url(),
        POLICY,
        Duration::from_secs(2),
        central.clock.clone(),
    )
    .await;
    let mut admin = relay.admin().await;
    let mut q = relay.quota().await;
    let set = || SetSubjectRequest {
        subject: "ada".into(),
        tier: "pro".into(),
        group: "acme".into(),
        ..Default::default()
    };

    for wrong in [
        bearer(set(), "not-the-token"),
        bearer(set(), ""),
        Request::new(set()),
    ] {
        assert_status(admin.set_subject(wrong).await, Code::Unauthenticated, &[]);
    }
    let get = |token: &str| {
        bearer(
            GetSubjectRequest {
                subject: "ada".into(),
            },
            token,
        )
    };
    assert_status(
        admin.get_subject(get("wrong")).await,
        Code::Unauthenticated,
        &[],
    );
    let g = central
        .admin()
        .await
        .get_subject(GetSubjectRequest {
            subject: "ada".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (g.tier.as_str(), g.assigned),
        ("free", false),
        "nothing was assigned"
    );

    let s = admin
        .set_subject(bearer(set(), ADMIN_TOKEN))
        .await
        .expect("set_subject")
        .into_inner();
    assert_eq!((s.tier.as_str(), s.group.as_str()), ("pro", "acme"));
    let g = admin
        .get_subject(get(ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (g.tier.as_str(), g.assigned, g.group.as_str()),
        ("pro", true, "acme")
    );
    let g = central
        .admin()
        .await
        .get_subject(GetSubjectRequest {
            subject: "ada".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (g.tier.as_str(), g.assigned),
        ("pro", true),
        "assigned centrally"
    );
    let r = rsv(&mut q, reserve("ada", 2000, 0)).await;
    assert_allowed(&r, 2000);
    assert_eq!(r.tier, "pro", "{r:?}");
    commit(&mut q, &r.reservation_id, 2000, 0).await;

    // ResetUsage likewise: refused without the token, done with it.
    let reset = |token: &str| {
        bearer(
            ResetUsageRequest {
                subject: "ada".into(),
            },
            token,
        )
    };
    assert_status(
        admin.reset_usage(reset("wrong")).await,
        Code::Unauthenticated,
        &[],
    );
    assert_eq!(usage(&mut q, "ada").await.used_tokens, 2000);
    admin
        .reset_usage(reset(ADMIN_TOKEN))
        .await
        .expect("reset_usage");
    assert_eq!(usage(&mut q, "ada").await.used_tokens, 0);
}

// ---------------------------------------------------------------------------------------------
// 6. Exactly-once forwarding.

/// A TCP proxy in front of the central service that can hold back every byte the central
/// service sends (its answers) while still passing the relay's requests: a Reserve arrives
/// and makes its hold, but its answer is lost to the relay's deadline. Released, the held
/// bytes flow on (the relay has reset those streams by then, and ignores them).
struct AnswerHoldingProxy {
    addr: SocketAddr,
    holding: Arc<std::sync::atomic::AtomicBool>,
}

impl AnswerHoldingProxy {
    async fn start(upstream: SocketAddr) -> Self {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let holding = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = holding.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                });
                let held = held.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut pending = Vec::new();
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let read = tokio::time::timeout(
                            Duration::from_millis(10),
                            server_read.read(&mut buf),
                        )
                        .await;
                        match read {
                            Ok(Ok(0)) | Ok(Err(_)) => break,
                            Ok(Ok(n)) => pending.extend_from_slice(&buf[..n]),
                            Err(_) => {}
                        }
                        if !held.load(std::sync::atomic::Ordering::SeqCst) && !pending.is_empty() {
                            if client_write.write_all(&pending).await.is_err() {
                                break;
                            }
                            pending.clear();
                        }
                    }
                });
            }
        });
        Self { addr, holding }
    }

    fn hold(&self, on: bool) {
        self.holding.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A Reserve whose answer is lost (the relay's deadline passes after the central service made
/// the hold) is answered by the fail mode; once the central service's answers flow again, the
/// relay asks again with the same idempotency key and refunds the hold: nothing stays held for
/// a call that never happened (before, it stayed held until it expired, and was then charged
/// in full).
#[tokio::test]
async fn a_reserve_whose_answer_was_lost_is_refunded_once_the_upstream_answers() {
    let central = TestServer::start(CLOSED).await;
    let proxy = AnswerHoldingProxy::start(central.addr).await;
    let relay = TestRelay::start(
        &format!("http://{}", proxy.addr),
        CLOSED,
        Duration::from_millis(300),
        central.clock.clone(),
    )
    .await;
    let mut q = relay.quota().await;
    let mut direct = central.quota().await;
    // The connection is up and the subject's tier known.
    let warm = rsv(&mut q, reserve("lou", 1, 0)).await;
    assert_allowed(&warm, 1);
    commit(&mut q, &warm.reservation_id, 1, 0).await;

    proxy.hold(true);
    let r = rsv(&mut q, reserve("lou", 1000, 0)).await;
    assert_failed_closed(&r, "closed_default");
    // The central service did make the hold: the lost answer is real.
    let u = usage(&mut direct, "lou").await;
    assert_eq!((u.held_tokens, u.open_holds), (1000, 1), "{u:?}");

    proxy.hold(false);
    let mut waited = 0;
    loop {
        let u = usage(&mut direct, "lou").await;
        if (u.held_tokens, u.open_holds) == (0, 0) {
            assert_eq!(u.used_tokens, 1, "only the warm-up was charged: {u:?}");
            break;
        }
        waited += 1;
        assert!(
            waited < 200,
            "the lost Reserve's hold is still there after 10 s: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that refuses connections for a moment (a restart, a failover) is asked again,
/// with the same key, while the call is within the upstream deadline: the caller gets the
/// central service's own answer, not the fail mode, and one hold is made.
#[tokio::test]
async fn a_reserve_is_retried_within_the_deadline_while_the_upstream_restarts() {
    let central = TestServer::start(CLOSED).await;
    let (addr, dir, clock) = (central.addr, central.dir.clone(), central.clock.clone());
    let relay = TestRelay::start(
        &central.url(),
        CLOSED,
        Duration::from_secs(3),
        clock.clone(),
    )
    .await;
    let mut q = relay.quota().await;
    assert_allowed(&rsv(&mut q, reserve("rae", 1, 0)).await, 1);
    central.stop().await;
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        TestServer::start_in_at(CLOSED, dir, clock, addr).await
    });
    let r = rsv(&mut q, reserve("rae", 10, 0)).await;
    assert_allowed(&r, 10);
    assert!(
        r.denied_by.is_empty() && r.shadow_denied_by.is_empty(),
        "{r:?}"
    );
    let central = restart.await.expect("restart");
    let mut direct = central.quota().await;
    let u = usage(&mut direct, "rae").await;
    assert_eq!((u.held_tokens, u.open_holds), (11, 2), "{u:?}");
}

/// A hold the relay granted on its own (fail open, the central service gone) is its caller's
/// too: another caller can neither settle nor extend it, nor replay its idempotency key.
#[tokio::test]
async fn a_fail_open_hold_is_its_callers() {
    let hash = tollgate::policy::callers::token_sha256_hex;
    let policy = format!(
        r#"
default_tier = "always_on"

[tiers.always_on]
fail = "open"
tokens_per_day = 100000

[callers.a]
token_sha256 = "{}"

[callers.b]
token_sha256 = "{}"
"#,
        hash("token-of-a-0123456789"),
        hash("token-of-b-0123456789")
    );
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let relay = TestRelay::start(
        &format!("http://{}", dead_address()),
        &policy,
        Duration::from_millis(200),
        clock,
    )
    .await;
    let mut q = relay.quota().await;
    let keyed = ReserveRequest {
        idempotency_key: "k".into(),
        ..reserve("olga", 10, 10)
    };
    let r = q
        .reserve(bearer(keyed.clone(), "token-of-a-0123456789"))
        .await
        .expect("a's Reserve")
        .into_inner();
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_eq!(
        r.shadow_denied_by, UNAVAILABLE,
        "granted by the relay, fail open"
    );
    let id = r.reservation_id.clone();
    let as_b = "token-of-b-0123456789";
    let denied = |r: Result<_, tonic::Status>| {
        let s = r.expect_err("another caller's hold");
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    };
    denied(
        q.commit(bearer(commit_req(&id, 1, 1), as_b))
            .await
            .map(|_| ()),
    );
    denied(q.refund(bearer(refund_req(&id), as_b)).await.map(|_| ()));
    let extend = tollgate::proto::ExtendRequest {
        reservation_id: id.clone(),
        hold: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
    };
    denied(q.extend(bearer(extend, as_b)).await.map(|_| ()));
    let replay = q
        .reserve(bearer(keyed, as_b))
        .await
        .expect_err("b replays a's key");
    assert_eq!(replay.code(), tonic::Code::FailedPrecondition, "{replay:?}");
    assert!(!replay.message().contains(&id));
    // a settles it.
    q.commit(bearer(commit_req(&id, 5, 5), "token-of-a-0123456789"))
        .await
        .expect("a's Commit");
}
