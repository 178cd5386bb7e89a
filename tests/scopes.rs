//! End-to-end tests of the scopes beside the subject, over real gRPC on loopback: per client IP
//! (IPv4 per address, IPv6 per /64, CIDR entries), per group (assigned by SetSubject or named in
//! the Reserve, with `[groups.default]` inheritance), and the whole fleet (`[global]`). Every
//! applicable scope is checked and charged atomically, and Commit and Refund settle them all.
//! Time only moves through the ManualClock.

mod common;
use common::*;

use tonic::Code;

use tollgate::proto::{
    Decision, GetSubjectRequest, GetUsageRequest, GetUsageResponse, LimitStatus, ReserveRequest,
    ReserveResponse, SetSubjectRequest,
};

/// Microseconds from now to the next UTC midnight, at T0 (noon).
const HALF_DAY: u64 = 12 * 3600 * SEC;

/// `req` with a group and a client IP (empty: none).
fn with(req: ReserveRequest, group: &str, client_ip: &str) -> ReserveRequest {
    ReserveRequest {
        group: group.to_string(),
        client_ip: client_ip.to_string(),
        ..req
    }
}

/// A Reserve on the README's free tier (which allows gpt-4o-mini, not gpt-4o).
fn mini(subject: &str, client_ip: &str) -> ReserveRequest {
    ReserveRequest {
        model: "gpt-4o-mini".to_string(),
        client_ip: client_ip.to_string(),
        ..reserve(subject, 10, 10)
    }
}

/// GetUsage with every field (empty: not given).
async fn usage_of(q: &mut Quota, subject: &str, group: &str, client_ip: &str) -> GetUsageResponse {
    q.get_usage(GetUsageRequest {
        subject: subject.to_string(),
        group: group.to_string(),
        client_ip: client_ip.to_string(),
    })
    .await
    .expect("get_usage")
    .into_inner()
}

#[track_caller]
fn assert_allowed(r: &ReserveResponse) {
    assert_eq!(decision(r), Decision::Allowed, "{r:?}");
    assert!(r.denied_by.is_empty(), "{r:?}");
    assert_eq!(r.reservation_id.len(), 36, "{r:?}");
}

#[track_caller]
fn assert_denied(r: &ReserveResponse, by: &str, retry_after_us: Option<u64>) {
    assert_eq!(decision(r), Decision::Denied, "{r:?}");
    assert_eq!(r.denied_by, by, "{r:?}");
    assert_eq!(retry_us(r), retry_after_us, "retry_after of {r:?}");
    assert!(r.reservation_id.is_empty(), "{r:?}");
    assert_eq!(r.reserved_tokens, 0, "{r:?}");
}

/// The status of `scope`.`name`, checking that it is reported for `scope_id`.
#[track_caller]
fn status<'a>(
    limits: &'a [LimitStatus],
    scope: &str,
    scope_id: &str,
    name: &str,
) -> &'a LimitStatus {
    let s = scoped_limit(limits, scope, name);
    assert_eq!(s.scope_id, scope_id, "{s:?}");
    s
}

fn set_subject(subject: &str, tier: &str, group: &str) -> SetSubjectRequest {
    SetSubjectRequest {
        subject: subject.to_string(),
        tier: tier.to_string(),
        group: group.to_string(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Client IPs.

/// With the README's policy (`[ip] requests_per_minute = 120`), one address making Reserves for
/// 120 different subjects uses up its minute: the 121st, for yet another new subject, is denied
/// `ip.requests_per_minute` with a retry_after that works, while another address is still
/// allowed at the same instant, the same address written as IPv4-mapped IPv6 is the same
/// client, and an address of the office network (`[ip.cidr."10.0.0.0/8"]`, 100000 a minute) is
/// not stopped at 121.
#[tokio::test]
async fn an_abusive_ip_is_denied_across_many_subjects() {
    let server = TestServer::start(&readme_policy_example()).await;
    let mut q = server.quota().await;
    const ABUSER: &str = "203.0.113.7";

    for i in 0..120 {
        let r = rsv(&mut q, mini(&format!("visitor-{i}"), ABUSER)).await;
        assert_allowed(&r);
        let ip = status(&r.limits, "ip", ABUSER, "requests_per_minute");
        assert_eq!((ip.limit, ip.remaining), (120, 119 - i), "{ip:?}");
    }
    let r = rsv(&mut q, mini("visitor-120", ABUSER)).await;
    // 120 requests in the minute that began at T0: the estimate falls to 119 half a second
    // (1/120 of a minute) into the next minute.
    assert_denied(&r, "ip.requests_per_minute", Some(60 * SEC + SEC / 2));
    assert_eq!(
        status(&r.limits, "ip", ABUSER, "requests_per_minute").remaining,
        0
    );
    // The new subject is far under its own limits, and nothing was held for it.
    assert_eq!(
        status(&r.limits, "subject", "visitor-120", "requests_per_minute").remaining,
        20
    );
    let u = usage_of(&mut q, "visitor-120", "", "").await;
    assert_eq!((u.requests, u.held_tokens, u.open_holds), (0, 0, 0));
    // The address as IPv4-mapped IPv6 is the same client.
    let r = rsv(&mut q, mini("visitor-121", "::ffff:203.0.113.7")).await;
    assert_denied(&r, "ip.requests_per_minute", Some(60 * SEC + SEC / 2));
    let u = usage_of(&mut q, "", "", ABUSER).await;
    assert_eq!(u.scope, "ip");
    assert_eq!(u.client_ip, ABUSER);
    assert_eq!((u.requests, u.open_holds, u.denials), (120, 120, 2));

    // Another address at the same instant is its own client.
    let r = rsv(&mut q, mini("visitor-120", "198.51.100.1")).await;
    assert_allowed(&r);
    assert_eq!(
        status(&r.limits, "ip", "198.51.100.1", "requests_per_minute").remaining,
        119
    );

    // Half a second too early is still too early; waiting as told is admitted.
    server.clock.advance(60 * SEC);
    let r = rsv(&mut q, mini("visitor-121", ABUSER)).await;
    assert_denied(&r, "ip.requests_per_minute", Some(SEC / 2));
    server.clock.advance(SEC / 2);
    let r = rsv(&mut q, mini("visitor-121", ABUSER)).await;
    assert_allowed(&r);

    // The office network allows 100000 a minute and inherits tokens_per_minute from [ip]; each
    // address in it is still counted on its own.
    for i in 0..121 {
        let r = rsv(&mut q, mini(&format!("staff-{i}"), "10.1.2.3")).await;
        assert_allowed(&r);
        let rpm = status(&r.limits, "ip", "10.1.2.3", "requests_per_minute");
        assert_eq!((rpm.limit, rpm.remaining), (100_000, 99_999 - i), "{rpm:?}");
        let tpm = status(&r.limits, "ip", "10.1.2.3", "tokens_per_minute");
        assert_eq!(tpm.limit, 200_000, "{tpm:?}");
    }
    let r = rsv(&mut q, mini("staff-0", "10.200.0.1")).await;
    assert_allowed(&r);
    assert_eq!(
        status(&r.limits, "ip", "10.200.0.1", "requests_per_minute").remaining,
        99_999
    );
    server.stop().await;
}

const IPV6: &str = r#"
default_tier = "t"

[tiers.t]
tokens_per_day = 1000000

[ip]
requests_per_minute = 2
"#;

/// IPv6 clients are counted per /64: two addresses of one /64 share one counter (and a third of
/// it is denied), an address of another /64 has its own, and limits and GetUsage name the
/// network as "2001:db8:1:2::/64".
#[tokio::test]
async fn ipv6_addresses_are_counted_per_64() {
    let server = TestServer::start(IPV6).await;
    let mut q = server.quota().await;
    const NET: &str = "2001:db8:1:2::/64";

    let r = rsv(&mut q, with(reserve("a", 10, 10), "", "2001:db8:1:2::1")).await;
    assert_allowed(&r);
    assert_eq!(
        status(&r.limits, "ip", NET, "requests_per_minute").remaining,
        1
    );
    let r = rsv(&mut q, with(reserve("b", 10, 10), "", "2001:db8:1:2::ffff")).await;
    assert_allowed(&r);
    assert_eq!(
        status(&r.limits, "ip", NET, "requests_per_minute").remaining,
        0
    );
    let r = rsv(
        &mut q,
        with(reserve("c", 10, 10), "", "2001:db8:1:2:abcd:ef01:2345:6789"),
    )
    .await;
    assert_denied(&r, "ip.requests_per_minute", Some(60 * SEC + 30 * SEC));
    status(&r.limits, "ip", NET, "requests_per_minute");

    // The neighbouring /64 is another client.
    let r = rsv(&mut q, with(reserve("c", 10, 10), "", "2001:db8:1:3::1")).await;
    assert_allowed(&r);
    assert_eq!(
        status(&r.limits, "ip", "2001:db8:1:3::/64", "requests_per_minute").remaining,
        1
    );

    let u = usage_of(&mut q, "", "", "2001:db8:1:2::42").await;
    assert_eq!(u.scope, "ip");
    assert_eq!(u.client_ip, NET);
    assert_eq!((u.requests, u.held_tokens, u.denials), (2, 40, 1));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Groups.

const GROUPS: &str = r#"
default_tier = "t"

[tiers.t]
tokens_per_day = 100000

[groups.default]
tokens_per_day = 1000
max_concurrent = 2

[groups."acme"]
tokens_per_day = 3000
"#;

/// A group's limit is shared by its members, whether assigned by SetSubject or named in the
/// Reserve: their Commits add up in the group until the next member is denied
/// `group.tokens_per_day`, though each is far under its own limit. Another group is unaffected
/// and takes `[groups.default]`; "acme" inherits `max_concurrent` from it. GetUsage of the group
/// alone reports the group's figures.
#[tokio::test]
async fn a_group_limit_is_shared_by_its_members() {
    let server = TestServer::start(GROUPS).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;

    for who in ["alice", "bob"] {
        let set = admin
            .set_subject(set_subject(who, "t", "acme"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.group, "acme");
    }
    let got = admin
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.tier.as_str(), got.group.as_str()), ("t", "acme"));

    // alice and bob by assignment, carol by naming the group: 900 each is charged to acme.
    let mut remaining = 3000;
    for req in [
        reserve("alice", 500, 500),
        reserve("bob", 500, 500),
        with(reserve("carol", 500, 500), "acme", ""),
    ] {
        let r = rsv(&mut q, req).await;
        assert_allowed(&r);
        let day = status(&r.limits, "group", "acme", "tokens_per_day");
        assert_eq!((day.limit, day.remaining), (3000, remaining - 1000));
        // Inherited from [groups.default].
        let conc = status(&r.limits, "group", "acme", "max_concurrent");
        assert_eq!((conc.limit, conc.remaining), (2, 1));
        assert_eq!(
            commit(&mut q, &r.reservation_id, 500, 400)
                .await
                .released_tokens,
            100
        );
        remaining -= 900;
    }
    assert_eq!(remaining, 300);

    // 2700 + 400 > 3000: the next member is denied by the group until midnight, with her own
    // day untouched.
    let r = rsv(&mut q, with(reserve("dave", 200, 200), "acme", "")).await;
    assert_denied(&r, "group.tokens_per_day", Some(HALF_DAY));
    assert_eq!(
        status(&r.limits, "subject", "dave", "tokens_per_day").remaining,
        100_000
    );
    assert_eq!(
        status(&r.limits, "group", "acme", "tokens_per_day").remaining,
        300
    );
    let r = rsv(&mut q, reserve("alice", 200, 200)).await;
    assert_denied(&r, "group.tokens_per_day", Some(HALF_DAY));
    assert_eq!(
        status(&r.limits, "subject", "alice", "tokens_per_day").remaining,
        99_100
    );

    // A member of another group is unaffected; that group has [groups.default]'s limits.
    let r = rsv(&mut q, with(reserve("erin", 200, 200), "globex", "")).await;
    assert_allowed(&r);
    let day = status(&r.limits, "group", "globex", "tokens_per_day");
    assert_eq!((day.limit, day.remaining), (1000, 600));
    let r = rsv(&mut q, with(reserve("erin", 600, 600), "globex", "")).await;
    assert_denied(&r, "group.tokens_per_day", None);

    // The group's own figures.
    let u = usage_of(&mut q, "", "acme", "").await;
    assert_eq!(u.scope, "group");
    assert_eq!(u.group, "acme");
    assert!(u.subject.is_empty() && u.tier.is_empty(), "{u:?}");
    assert_eq!(
        (
            u.used_tokens,
            u.requests,
            u.held_tokens,
            u.open_holds,
            u.denials
        ),
        (2700, 3, 0, 0, 2)
    );
    assert_eq!(
        status(&u.limits, "group", "acme", "tokens_per_day").remaining,
        300
    );
    // A member's usage is its own, with its assigned group's limits.
    let u = usage_of(&mut q, "alice", "", "").await;
    assert_eq!((u.scope.as_str(), u.group.as_str()), ("subject", "acme"));
    assert_eq!((u.used_tokens, u.requests), (900, 1));
    assert_eq!(
        status(&u.limits, "group", "acme", "tokens_per_day").remaining,
        300
    );

    // What still fits is admitted; the third concurrent hold in acme is refused by the
    // max_concurrent acme inherits.
    let r = rsv(&mut q, with(reserve("carol", 100, 100), "acme", "")).await;
    assert_allowed(&r);
    let r = rsv(&mut q, reserve("alice", 10, 0)).await;
    assert_allowed(&r);
    let r = rsv(&mut q, reserve("bob", 10, 0)).await;
    assert_denied(&r, "group.max_concurrent", Some(SEC));
    let u = usage_of(&mut q, "", "acme", "").await;
    assert_eq!((u.held_tokens, u.open_holds, u.requests), (210, 2, 5));
    server.stop().await;
}

/// A subject's assigned group is persisted: after a restart GetSubject still reports it and
/// Reserves without a group still count in it. A Reserve (or GetUsage) naming another group
/// counts there instead, and assigning no group takes the subject out of it.
#[tokio::test]
async fn an_assigned_group_survives_a_restart_and_an_explicit_group_overrides_it() {
    let server = TestServer::start(GROUPS).await;
    let mut admin = server.admin().await;
    admin
        .set_subject(set_subject("alice", "t", "acme"))
        .await
        .unwrap();
    let mut q = server.quota().await;
    let r = rsv(&mut q, reserve("alice", 100, 100)).await;
    assert_allowed(&r);
    assert_eq!(
        status(&r.limits, "group", "acme", "tokens_per_day").remaining,
        2800
    );

    let server = server.restart(GROUPS).await;
    let mut q = server.quota().await;
    // The group's and the fleet's figures are persisted too.
    let u = usage_of(&mut q, "", "acme", "").await;
    assert_eq!((u.held_tokens, u.open_holds, u.requests), (200, 1, 1));
    let u = usage_of(&mut q, "", "", "").await;
    assert_eq!((u.held_tokens, u.open_holds, u.requests), (200, 1, 1));
    let mut admin = server.admin().await;
    let got = admin
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.assigned, "{got:?}");
    assert_eq!(got.group, "acme");

    let r = rsv(&mut q, reserve("alice", 100, 100)).await;
    assert_allowed(&r);
    let day = status(&r.limits, "group", "acme", "tokens_per_day");
    assert_eq!((day.limit, day.remaining), (3000, 2600));
    let u = usage_of(&mut q, "", "acme", "").await;
    assert_eq!((u.held_tokens, u.open_holds, u.requests), (400, 2, 2));

    // An explicit group wins over the assigned one, for Reserve and GetUsage alike.
    let r = rsv(&mut q, with(reserve("alice", 100, 100), "other", "")).await;
    assert_allowed(&r);
    let day = status(&r.limits, "group", "other", "tokens_per_day");
    assert_eq!((day.limit, day.remaining), (1000, 800));
    assert!(
        !r.limits.iter().any(|l| l.scope_id == "acme"),
        "{:?}",
        r.limits
    );
    let u = usage_of(&mut q, "", "acme", "").await;
    assert_eq!((u.held_tokens, u.requests), (400, 2));
    let u = usage_of(&mut q, "alice", "other", "").await;
    assert_eq!((u.scope.as_str(), u.group.as_str()), ("subject", "other"));
    assert_eq!(u.held_tokens, 600);
    status(&u.limits, "group", "other", "tokens_per_day");

    // SetSubject replaces the assignment: without a group, alice's Reserves count in none.
    admin
        .set_subject(set_subject("alice", "t", ""))
        .await
        .unwrap();
    let r = rsv(&mut q, reserve("alice", 100, 100)).await;
    assert_allowed(&r);
    assert!(
        !r.limits.iter().any(|l| l.scope == "group"),
        "{:?}",
        r.limits
    );
    let u = usage_of(&mut q, "", "acme", "").await;
    assert_eq!((u.held_tokens, u.requests), (400, 2));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The fleet.

const GLOBAL: &str = r#"
default_tier = "t"

[tiers.t]
tokens_per_day = 1000000

[global]
tokens_per_minute = 3000
"#;

/// `[global]` counts all traffic: three subjects with neither group nor IP take the fleet's
/// bucket and a fourth is denied `global.tokens_per_minute` with the exact refill time. GetUsage
/// with no subject reports the fleet: requests, holds and (after Commits) used tokens summed
/// over every subject, and what the Commits gave back admits the fourth at once.
#[tokio::test]
async fn a_global_limit_counts_all_traffic() {
    let server = TestServer::start(GLOBAL).await;
    let mut q = server.quota().await;

    let mut ids = Vec::new();
    for (i, who) in ["s1", "s2", "s3"].into_iter().enumerate() {
        let r = rsv(&mut q, reserve(who, 500, 500)).await;
        assert_allowed(&r);
        let tpm = status(&r.limits, "global", "", "tokens_per_minute");
        assert_eq!((tpm.limit, tpm.remaining), (3000, 2000 - 1000 * i as u64));
        ids.push(r.reservation_id);
    }
    // 1000 tokens at 3000 a minute: 20 s.
    let r = rsv(&mut q, reserve("s4", 500, 500)).await;
    assert_denied(&r, "global.tokens_per_minute", Some(20 * SEC));

    let u = usage_of(&mut q, "", "", "").await;
    assert_eq!(u.scope, "global");
    assert!(u.subject.is_empty() && u.group.is_empty() && u.client_ip.is_empty());
    assert_eq!(
        (
            u.requests,
            u.held_tokens,
            u.open_holds,
            u.used_tokens,
            u.denials
        ),
        (3, 3000, 3, 0, 1)
    );
    assert_eq!(
        status(&u.limits, "global", "", "tokens_per_minute").remaining,
        0
    );

    // Each call used 600: 400 each flows back to the fleet's bucket.
    for id in &ids {
        assert_eq!(commit(&mut q, id, 300, 300).await.released_tokens, 400);
    }
    let u = usage_of(&mut q, "", "", "").await;
    assert_eq!((u.used_tokens, u.held_tokens, u.open_holds), (1800, 0, 0));
    assert_eq!(
        status(&u.limits, "global", "", "tokens_per_minute").remaining,
        1200
    );
    let r = rsv(&mut q, reserve("s4", 500, 500)).await;
    assert_allowed(&r);
    let u = usage_of(&mut q, "", "", "").await;
    assert_eq!((u.requests, u.used_tokens, u.held_tokens), (4, 1800, 1000));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Atomicity and settlement across scopes.

const ATOMIC: &str = r#"
default_tier = "t"

[tiers.t]
tokens_per_minute = 60000
tokens_per_day = 5000

[groups.default]
tokens_per_day = 100000

[ip]
requests_per_minute = 1

[global]
tokens_per_minute = 600000
"#;

/// A Reserve denied by one scope holds nothing in any other: denied by its IP, the subject,
/// group and fleet hold no tokens and count no request for it; denied by the subject's own
/// day, the IP's minute is not used up either.
#[tokio::test]
async fn a_denial_in_one_scope_holds_nothing_in_the_others() {
    let server = TestServer::start(ATOMIC).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, with(reserve("s1", 500, 500), "g", "192.0.2.1")).await;
    assert_allowed(&r);
    let r = rsv(&mut q, with(reserve("s2", 500, 500), "g", "192.0.2.1")).await;
    assert_denied(&r, "ip.requests_per_minute", Some(120 * SEC));

    let u = usage_of(&mut q, "s2", "g", "192.0.2.1").await;
    assert_eq!((u.requests, u.held_tokens, u.open_holds), (0, 0, 0));
    assert_eq!(
        status(&u.limits, "subject", "s2", "tokens_per_minute").remaining,
        60_000
    );
    assert_eq!(
        status(&u.limits, "subject", "s2", "tokens_per_day").remaining,
        5000
    );
    // The group and the fleet carry s1's hold only.
    let g = usage_of(&mut q, "", "g", "").await;
    assert_eq!(
        (g.requests, g.held_tokens, g.open_holds, g.denials),
        (1, 1000, 1, 1)
    );
    assert_eq!(
        status(&g.limits, "group", "g", "tokens_per_day").remaining,
        99_000
    );
    let f = usage_of(&mut q, "", "", "").await;
    assert_eq!((f.requests, f.held_tokens, f.open_holds), (1, 1000, 1));
    assert_eq!(
        status(&f.limits, "global", "", "tokens_per_minute").remaining,
        599_000
    );
    let ip = usage_of(&mut q, "", "", "192.0.2.1").await;
    assert_eq!((ip.requests, ip.held_tokens), (1, 1000));

    // Denied by the subject's own day: the IP, group and fleet are as they were.
    let r = rsv(&mut q, with(reserve("s3", 3000, 3000), "g", "192.0.2.2")).await;
    assert_denied(&r, "tokens_per_day", None);
    // (An IP never admitted has no scope for the denial to count in: the fleet counts it.)
    let ip = usage_of(&mut q, "", "", "192.0.2.2").await;
    assert_eq!((ip.requests, ip.held_tokens, ip.denials), (0, 0, 0));
    assert_eq!(
        status(&ip.limits, "ip", "192.0.2.2", "requests_per_minute").remaining,
        1
    );
    let g = usage_of(&mut q, "", "g", "").await;
    assert_eq!((g.requests, g.held_tokens), (1, 1000));
    let f = usage_of(&mut q, "", "", "").await;
    assert_eq!((f.requests, f.held_tokens, f.denials), (1, 1000, 2));
    // ...so the same IP is still admitted for a Reserve that fits.
    let r = rsv(&mut q, with(reserve("s3", 100, 100), "g", "192.0.2.2")).await;
    assert_allowed(&r);
    server.stop().await;
}

const SETTLE: &str = r#"
default_tier = "t"

[tiers.t]
tokens_per_minute = 6000
tokens_per_day = 100000

[groups.default]
tokens_per_minute = 6000
tokens_per_day = 100000

[ip]
tokens_per_minute = 6000
tokens_per_day = 100000
requests_per_minute = 10

[global]
tokens_per_minute = 6000
tokens_per_day = 100000
"#;

/// Commit and Refund settle every scope a hold was charged to: a Commit for less than the hold
/// gives the rest back to the subject's, group's, IP's and fleet's buckets and charges each day
/// the actual usage; a Refund gives the whole hold back everywhere (but not the IP's request).
#[tokio::test]
async fn commit_and_refund_settle_every_scope() {
    let server = TestServer::start(SETTLE).await;
    let mut q = server.quota().await;
    const IP: &str = "198.51.100.9";
    let scopes = [("subject", "s"), ("group", "g"), ("ip", IP), ("global", "")];

    /// (used_tokens, held_tokens, tokens_per_minute remaining, tokens_per_day remaining) of
    /// each scope, read through GetUsage of that scope.
    async fn figures(q: &mut Quota) -> Vec<(u64, u64, u64, u64)> {
        let mut out = Vec::new();
        for (subject, group, ip, scope, id) in [
            ("s", "g", IP, "subject", "s"),
            ("", "g", "", "group", "g"),
            ("", "", IP, "ip", IP),
            ("", "", "", "global", ""),
        ] {
            let u = usage_of(q, subject, group, ip).await;
            assert_eq!(u.scope, scope);
            out.push((
                u.used_tokens,
                u.held_tokens,
                status(&u.limits, scope, id, "tokens_per_minute").remaining,
                status(&u.limits, scope, id, "tokens_per_day").remaining,
            ));
        }
        out
    }

    let r = rsv(&mut q, with(reserve("s", 1000, 1000), "g", IP)).await;
    assert_allowed(&r);
    for (scope, id) in scopes {
        assert_eq!(
            status(&r.limits, scope, id, "tokens_per_minute").remaining,
            4000
        );
        assert_eq!(
            status(&r.limits, scope, id, "tokens_per_day").remaining,
            98_000
        );
    }
    assert_eq!(figures(&mut q).await, vec![(0, 2000, 4000, 98_000); 4]);

    // 1000 of the 2000 used: the other 1000 flows back to every scope.
    let back = commit(&mut q, &r.reservation_id, 600, 400)
        .await
        .released_tokens;
    assert_eq!(back, 1000);
    assert_eq!(figures(&mut q).await, vec![(1000, 0, 5000, 99_000); 4]);

    // A Refund gives all of a hold back everywhere.
    let r = rsv(&mut q, with(reserve("s", 1000, 1000), "g", IP)).await;
    assert_allowed(&r);
    assert_eq!(figures(&mut q).await, vec![(1000, 2000, 3000, 97_000); 4]);
    assert_eq!(refund(&mut q, &r.reservation_id).await, 2000);
    assert_eq!(figures(&mut q).await, vec![(1000, 0, 5000, 99_000); 4]);
    // The requests stay counted: the call rate is what requests_per_minute guards.
    let u = usage_of(&mut q, "", "", IP).await;
    assert_eq!(u.requests, 2);
    assert_eq!(
        status(&u.limits, "ip", IP, "requests_per_minute").remaining,
        8
    );

    // A hold left to expire (after the default 300 s) is charged in full everywhere; by then
    // every bucket has refilled.
    let r = rsv(&mut q, with(reserve("s", 1000, 1000), "g", IP)).await;
    assert_allowed(&r);
    server.advance_secs(301);
    assert_eq!(figures(&mut q).await, vec![(3000, 0, 6000, 97_000); 4]);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Validation.

/// A client_ip that is not an address, or a group with control characters or over 256 bytes,
/// is INVALID_ARGUMENT naming the field, in Reserve, GetUsage and SetSubject, and changes
/// nothing.
#[tokio::test]
async fn a_bad_client_ip_or_group_is_invalid_and_changes_nothing() {
    let server = TestServer::start(GROUPS).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;

    for ip in [
        "not-an-ip",
        "203.0.113.7/32",
        "999.1.1.1",
        "203.0.113.7:80",
        " 10.0.0.1",
    ] {
        assert_status(
            q.reserve(with(reserve("ann", 10, 10), "", ip)).await,
            Code::InvalidArgument,
            &["client_ip"],
        );
        assert_status(
            q.get_usage(GetUsageRequest {
                client_ip: ip.to_string(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["client_ip"],
        );
    }
    let long = "g".repeat(257);
    for (group, rule) in [
        ("ac\nme", "control"),
        ("a\u{7f}", "control"),
        (&*long, "256"),
    ] {
        assert_status(
            q.reserve(with(reserve("ann", 10, 10), group, "")).await,
            Code::InvalidArgument,
            &["group", rule],
        );
        assert_status(
            q.get_usage(GetUsageRequest {
                group: group.to_string(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["group", rule],
        );
        assert_status(
            admin.set_subject(set_subject("ann", "t", group)).await,
            Code::InvalidArgument,
            &["group", rule],
        );
    }

    // Nothing changed anywhere.
    let u = usage_of(&mut q, "ann", "", "").await;
    assert_eq!((u.requests, u.held_tokens, u.denials), (0, 0, 0));
    let f = usage_of(&mut q, "", "", "").await;
    assert_eq!((f.requests, f.held_tokens, f.denials), (0, 0, 0));
    let got = admin
        .get_subject(GetSubjectRequest {
            subject: "ann".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.assigned && got.group.is_empty(), "{got:?}");

    // The bounds themselves are accepted: 256 bytes, and an IPv6 address in full.
    let group = "g".repeat(256);
    let full = "2001:0db8:0000:0000:0000:ff00:0042:8329";
    let r = rsv(&mut q, with(reserve("ann", 10, 10), &group, full)).await;
    assert_allowed(&r);
    status(&r.limits, "group", &group, "tokens_per_day");
    let u = usage_of(&mut q, "", "", full).await;
    assert_eq!(
        (u.scope.as_str(), u.client_ip.as_str()),
        ("ip", "2001:db8::/64")
    );
    assert_eq!(u.requests, 1);
    server.stop().await;
}

/// The policy error for `text`, as shown to an operator.
fn policy_error(text: &str) -> String {
    tollgate::policy::Policy::from_toml(text, "p.toml")
        .expect_err("the policy must be refused")
        .to_string()
}

/// Tier-only keys in a scope table, a CIDR key that is not a block, and an IPv6 block longer
/// than /64 are refused at load with the file, line and reason.
#[test]
fn scope_tables_refuse_tier_only_keys_and_bad_cidrs_with_their_line() {
    const HEAD: &str = "default_tier = \"t\"\n[tiers.t]\ntokens_per_day = 5\n";
    let cases: [(&str, &str, &[&str]); 9] = [
        (
            "[ip]\nrequests_per_minute = 5\nhold_seconds = 60\n",
            "p.toml:4:",
            &["[ip]", "hold_seconds applies to tiers only"],
        ),
        (
            "[groups.default]\ntokens_per_day = 5\nmodels = [\"gpt-4o\"]\n",
            "p.toml:4:",
            &["default", "models applies to tiers only"],
        ),
        (
            "[groups.\"acme\"]\ndowngrade = { model = \"gpt-4o-mini\" }\n",
            "p.toml:4:",
            &["acme", "downgrade applies to tiers only"],
        ),
        (
            "[global]\nmax_hold_seconds = 60\n",
            "p.toml:4:",
            &["[global]", "max_hold_seconds applies to tiers only"],
        ),
        (
            "[ip]\nrequests_per_minute = 5\n\n[ip.cidr.\"10.0.0.0/33\"]\nrequests_per_minute = 9\n",
            "p.toml:7:",
            &["10.0.0.0/33", "CIDR"],
        ),
        (
            "[ip]\nrequests_per_minute = 5\n\n[ip.cidr.\"office\"]\nrequests_per_minute = 9\n",
            "p.toml:7:",
            &["office", "CIDR"],
        ),
        (
            "[ip]\nrequests_per_minute = 5\n\n[ip.cidr.\"2001:db8::/96\"]\nrequests_per_minute = 9\n",
            "p.toml:7:",
            &["2001:db8::/96", "/64"],
        ),
        // CIDR entries belong to [ip] alone: elsewhere they are refused, not ignored.
        (
            "[groups.\"acme\"]\ntokens_per_day = 5\n[groups.\"acme\".cidr.\"10.0.0.0/8\"]\n",
            "p.toml:4:",
            &["acme", "cidr applies to [ip] only"],
        ),
        (
            "[tiers.t.cidr.\"10.0.0.0/8\"]\nrequests_per_minute = 9\n",
            "p.toml:2:",
            &["[tiers.\"t\"]", "cidr applies to [ip] only"],
        ),
    ];
    for (tail, at, needles) in cases {
        let e = policy_error(&format!("{HEAD}{tail}"));
        assert!(e.starts_with(at), "{tail:?} gave {e}");
        for n in needles {
            assert!(
                e.contains(n),
                "{tail:?} gave {e}, which should contain {n:?}"
            );
        }
    }
    // The same keys in a tier, and a /64 block, are fine.
    tollgate::policy::Policy::from_toml(
        &format!("{HEAD}hold_seconds = 60\n[ip]\n[ip.cidr.\"2001:db8:1:2::/64\"]\nrequests_per_minute = 9\n"),
        "p.toml",
    )
    .expect("a valid policy");
}

/// An idempotent retry must carry the same client IP, and the same group when it names one; a
/// retry that names no group replays the first answer, counted where it was counted.
#[tokio::test]
async fn an_idempotent_retry_with_another_ip_or_group_is_refused() {
    let server = TestServer::start(&readme_policy_example()).await;
    let mut q = server.quota().await;
    let first = ReserveRequest {
        idempotency_key: "turn-1".into(),
        group: "acme".into(),
        client_ip: "203.0.113.7".into(),
        model: "gpt-4o-mini".into(),
        ..reserve("ivy", 100, 50)
    };
    let r = rsv(&mut q, first.clone()).await;
    assert_eq!(decision(&r), Decision::Allowed);
    for (field, retry) in [
        (
            "client_ip",
            ReserveRequest {
                client_ip: "203.0.113.8".into(),
                ..first.clone()
            },
        ),
        (
            "group",
            ReserveRequest {
                group: "globex".into(),
                ..first.clone()
            },
        ),
    ] {
        assert_status(
            q.reserve(retry).await,
            tonic::Code::FailedPrecondition,
            &[field, "turn-1"],
        );
    }
    let replay = rsv(
        &mut q,
        ReserveRequest {
            group: String::new(),
            ..first.clone()
        },
    )
    .await;
    assert!(replay.replayed);
    assert_eq!(replay.reservation_id, r.reservation_id);
    server.stop().await;
}
