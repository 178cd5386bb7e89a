//! Failover under load: three replicas of the real binary on one real PostgreSQL, clients
//! sending Reserve and Commit with idempotency keys to all three, and `kill -9` of the leader
//! in the middle. A follower takes over; every acknowledged hold and commit is in the ledger
//! afterwards, each exactly once, and no subject is admitted beyond its limit.

mod common;
use common::postgres::server;
use common::*;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tollgate::proto::quota_client::QuotaClient;
use tollgate::proto::{Decision, ReserveRequest};
use tonic::transport::{Channel, Endpoint};

/// Each subject's daily budget, and what each Reserve holds (and each Commit charges).
const LIMIT: u64 = 30_000;
const HOLD: u64 = 1_000;
const SUBJECTS: usize = 6;

const POLICY: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 30000
hold_seconds = 3600
"#;

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// What one client was told, and so what the ledger must hold afterwards.
#[derive(Debug, Default)]
struct Acknowledged {
    /// (subject, idempotency key) -> reservation id, for every Reserve answered ALLOWED.
    holds: HashMap<(String, String), String>,
    /// Tokens charged by acknowledged Commits, per subject.
    charged: HashMap<String, u64>,
    /// Answers by fail mode (the leader unreachable from the replica asked).
    fail_closed: u64,
    /// Calls answered with an error (and retried).
    errors: u64,
}

/// One app server's loop for `subject`: Reserve with a key (the same key again after an
/// error, a new one after an answer), Commit what was held (again after an error, until
/// acknowledged), until the subject's budget is spent. On an error it moves to the next
/// replica, as a client behind a Service would be sent elsewhere.
async fn client(
    name: String,
    subject: String,
    urls: Vec<String>,
    first: usize,
    seen: Arc<Mutex<Acknowledged>>,
    mut first_answer_after_kill: watch::Receiver<bool>,
    answered_after_kill: Arc<Mutex<Option<Instant>>>,
) {
    let channels: Vec<Channel> = urls.iter().map(|u| channel(u)).collect();
    let mut at = first;
    let mut n = 0u64;
    let start = Instant::now();
    let mut note_answer = || {
        if *first_answer_after_kill.borrow_and_update() {
            let mut first = answered_after_kill.lock().unwrap();
            if first.is_none() {
                *first = Some(Instant::now());
            }
        }
    };
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{name}: not done in 120 s"
        );
        let key = format!("{name}-{n}");
        let request = ReserveRequest {
            idempotency_key: key.clone(),
            ..reserve(&subject, HOLD / 2, HOLD / 2)
        };
        let answer = QuotaClient::new(channels[at].clone())
            .reserve(request)
            .await;
        let answer = match answer {
            Ok(a) => a.into_inner(),
            Err(_) => {
                seen.lock().unwrap().errors += 1;
                at = (at + 1) % channels.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue; // the same key: a hold the first attempt made is replayed
            }
        };
        n += 1;
        if decision(&answer) == Decision::Denied {
            if answer.denied_by == tollgate::relay::UPSTREAM_UNAVAILABLE {
                // Fail closed: the replica could not reach the leader. Its hold, if the leader
                // made one, is refunded by that replica; a new key asks afresh.
                seen.lock().unwrap().fail_closed += 1;
                at = (at + 1) % channels.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            assert_eq!(answer.denied_by, "tokens_per_day", "{answer:?}");
            return; // the budget is spent
        }
        note_answer();
        assert_eq!(answer.reserved_tokens, HOLD, "{answer:?}");
        let id = answer.reservation_id.clone();
        seen.lock()
            .unwrap()
            .holds
            .insert((subject.clone(), key), id.clone());
        loop {
            let committed = QuotaClient::new(channels[at].clone())
                .commit(commit_req(&id, HOLD / 2, HOLD / 2))
                .await;
            match committed {
                Ok(c) => {
                    note_answer();
                    let charged = c.into_inner().charged_tokens;
                    assert_eq!(charged, HOLD);
                    *seen
                        .lock()
                        .unwrap()
                        .charged
                        .entry(subject.clone())
                        .or_default() += charged;
                    break;
                }
                Err(status) => {
                    assert!(
                        matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::DeadlineExceeded
                                | tonic::Code::Cancelled
                                | tonic::Code::Unknown
                        ),
                        "{name}: a Commit of an acknowledged hold was refused: {status:?}"
                    );
                    seen.lock().unwrap().errors += 1;
                    at = (at + 1) % channels.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        // An app's pace: the failover lands in the middle of the load.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_lose_nothing_acknowledged_and_admit_nothing_extra_across_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().database();
    let ttl = 2.0;
    let args: Vec<String> = vec![
        "--store".into(),
        url.clone(),
        "--policy".into(),
        policy.display().to_string(),
        "--lease-ttl".into(),
        ttl.to_string(),
    ];
    let a = Serve::new(&dir.path().join("a")).args(&args).start();
    let a_address = a.addr.to_string();
    {
        let url = url.clone();
        tokio::task::spawn_blocking(move || common::postgres::wait_until_leading(&url, &a_address))
            .await
            .unwrap();
    }
    let b = Serve::new(&dir.path().join("b"))
        .args(&args)
        .log_to(&dir.path().join("b.log"))
        .env("RUST_LOG", "info")
        .start();
    let c = Serve::new(&dir.path().join("c"))
        .args(&args)
        .log_to(&dir.path().join("c.log"))
        .env("RUST_LOG", "info")
        .start();
    let urls = vec![a.url(), b.url(), c.url()];

    // Two app servers per subject, on different replicas: both share one budget.
    let seen = Arc::new(Mutex::new(Acknowledged::default()));
    let (killed_tx, killed_rx) = watch::channel(false);
    let answered_after_kill = Arc::new(Mutex::new(None));
    let mut clients = Vec::new();
    for s in 0..SUBJECTS {
        for k in 0..2 {
            clients.push(tokio::spawn(client(
                format!("s{s}-app{k}"),
                format!("s{s}"),
                urls.clone(),
                (s + k) % 3,
                seen.clone(),
                killed_rx.clone(),
                answered_after_kill.clone(),
            )));
        }
    }
    // Let a part of the budget be spent, then kill the leader in the middle of the load.
    let spent = || seen.lock().unwrap().charged.values().sum::<u64>();
    let begun = Instant::now();
    while spent() < (SUBJECTS as u64 * LIMIT) / 4 {
        assert!(begun.elapsed() < Duration::from_secs(60), "no load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let spent_at_kill = spent();
    a.kill9();
    let killed_at = Instant::now();
    killed_tx.send(true).unwrap();

    for c in clients {
        c.await.expect("a client failed");
    }
    let failover = answered_after_kill
        .lock()
        .unwrap()
        .expect("nothing was answered after the kill")
        .duration_since(killed_at);

    // Who leads now: B or C.
    let leader_address = server().psql(
        common::postgres::PgServer::name_of(&url),
        "SELECT address FROM tollgate_lease WHERE expires_at > now()",
    );
    let (leader, follower) = if leader_address == b.addr.to_string() {
        (&b, &c)
    } else {
        assert_eq!(leader_address, c.addr.to_string(), "B or C leads");
        (&c, &b)
    };
    let mut ql = leader.quota().await;
    let mut qf = follower.quota().await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "failover: {} holds and {} tokens acknowledged ({} before the kill), {} fail-closed answers, {} errors retried; first answer {:.2} s after the kill (lease TTL {ttl} s)",
        seen.holds.len(),
        seen.charged.values().sum::<u64>(),
        spent_at_kill,
        seen.fail_closed,
        seen.errors,
        failover.as_secs_f64()
    );
    for s in 0..SUBJECTS {
        let subject = format!("s{s}");
        let charged = seen.charged.get(&subject).copied().unwrap_or(0);
        assert!(
            charged <= LIMIT,
            "{subject}: {charged} tokens admitted and charged, beyond its limit of {LIMIT}"
        );
        // Holds a replica gave up on (fail closed) are refunded once the new leader answers.
        let start = Instant::now();
        loop {
            let u = usage(&mut ql, &subject).await;
            if u.held_tokens == 0 || start.elapsed() > Duration::from_secs(30) {
                assert_eq!(
                    (u.used_tokens, u.held_tokens, u.open_holds),
                    (charged, 0, 0),
                    "{subject}: the ledger holds exactly the acknowledged commits"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The follower answers from the same ledger.
        assert_eq!(usage(&mut qf, &subject).await.used_tokens, charged);
    }
    // Every acknowledged Reserve is still known by its key: asked again, it is replayed.
    for ((subject, key), id) in seen.holds.iter() {
        let again = rsv(
            &mut ql,
            ReserveRequest {
                idempotency_key: key.clone(),
                ..reserve(subject, HOLD / 2, HOLD / 2)
            },
        )
        .await;
        assert!(
            again.replayed && &again.reservation_id == id,
            "{subject} {key}: {again:?}"
        );
    }
    assert!(
        failover < Duration::from_secs_f64(ttl) + Duration::from_secs(20),
        "a follower served {failover:?} after the kill"
    );
}
