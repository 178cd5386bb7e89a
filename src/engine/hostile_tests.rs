//! Accounting under hostile traffic and clocks: floods of denials, a full scope table, Commits
//! no real call can report, a clock stepped forward and back, and a settled record that is the
//! oldest of all.

use std::net::IpAddr;
use std::sync::Arc;

use super::tests::{check_invariants, of, one_token, Disk, POLICY, START};
use super::*;
use crate::clock::{until_end_of_utc_day, utc_day, MICROS_PER_MINUTE, MICROS_PER_SECOND};

fn policy(text: &str) -> Arc<Policy> {
    Arc::new(Policy::from_toml(text, "p.toml").unwrap())
}

fn used(prompt: u64, completion: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        usage_unknown: false,
    }
}

/// A distinct IPv4 address for each `i` below 65,536.
fn address(i: u32) -> IpAddr {
    IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8])
}

/// What each flooded Reserve asks: 6,000 prompt tokens of "m", more than the free tier's
/// bucket (5,000) ever holds, so it is denied whatever state the subject has.
fn too_large(subject: &str, ip: IpAddr, id: u128) -> ReserveInput {
    ReserveInput {
        caller: None,
        prompt_tokens: 6_000,
        client_ip: Some(ip),
        ..one_token(subject, id)
    }
}

/// Issue 9, item 1: denials, each with a new subject, a new client IP and a new group, leave
/// nothing behind that could fill the scope table, across a restart too; they are still
/// counted in the fleet's figures, and a new user is then admitted.
#[test]
fn a_flood_of_denials_leaves_no_scopes_and_a_new_user_is_admitted() {
    let policy = policy(POLICY);
    let bounds = Bounds {
        max_scopes: 50,
        ..Bounds::default()
    };
    let mut e = Engine::new(policy.clone(), bounds);
    let mut disk = Disk::default();
    for i in 0..500u32 {
        let mut input = too_large(&format!("flood-{i}"), address(i), u128::from(i) + 1);
        input.group = Some(format!("made-up-{i}"));
        let mut out = Vec::new();
        let o = e.reserve(input, START, &mut out).unwrap();
        assert_eq!(o.decision, Decision::Denied);
        assert_eq!(o.denied_by.as_deref(), Some("tokens_per_minute"));
        disk.apply(out);
    }
    // Before: the first 49 denials made a subject's and an IP's scope each (until the table
    // was full); now only the fleet's exists.
    assert_eq!(e.scope_count(), 1);
    let fleet = e.usage(&UsageQuery::default(), START);
    assert_eq!(fleet.denials, 500);
    // 6,000 prompt tokens of "m" at $2.50 per million: 15,000 µUSD each.
    assert_eq!(fleet.saved_usd, 500 * 15_000);
    assert_eq!(e.usage(&of("flood-7"), START).denials, 0);

    let mut out = Vec::new();
    let real = ReserveInput {
        caller: None,
        client_ip: Some(address(60_000)),
        ..one_token("real-user", 1_000)
    };
    let o = e.reserve(real, START, &mut out).unwrap();
    assert_eq!(o.decision, Decision::Allowed);
    disk.apply(out);
    assert_eq!(
        e.scope_count(),
        3,
        "the user's subject and IP, and the fleet"
    );

    // A restart loads what the mutations wrote: no flood comes back.
    let restored = disk.restore(policy, bounds);
    assert_eq!(restored.scope_count(), 3);
    assert_eq!(restored.usage(&UsageQuery::default(), START).denials, 500);
}

/// A denial is still counted where state exists already, and in a subject an operator
/// assigned and a group the policy names or an operator assigned (those cannot be invented by
/// the caller).
#[test]
fn a_denial_counts_in_existing_scopes_and_bounded_groups_only() {
    let policy = policy(&format!(
        "{POLICY}\n[groups.\"acme\"]\ntokens_per_day = 1000\n"
    ));
    let mut e = Engine::new(policy, Bounds::default());
    let mut out = Vec::new();
    e.set_subject(
        "assigned",
        "free",
        Some("team".into()),
        Default::default(),
        &mut out,
    )
    .unwrap();
    let ip = address(1);
    e.reserve(
        ReserveInput {
            caller: None,
            client_ip: Some(ip),
            ..one_token("known", 1)
        },
        START,
        &mut out,
    )
    .unwrap();
    let deny = |subject: &str, group: Option<&str>, id| ReserveInput {
        caller: None,
        group: group.map(str::to_string),
        ..too_large(subject, ip, id)
    };
    for (i, (subject, group)) in [
        ("known", None),
        ("stranger", Some("acme")),
        ("assigned", None),
        ("stranger", Some("invented")),
    ]
    .into_iter()
    .enumerate()
    {
        let o = e.reserve(deny(subject, group, 10 + i as u128), START, &mut out);
        assert_eq!(o.unwrap().decision, Decision::Denied);
    }
    let group = |g: &str| UsageQuery {
        group: Some(g.into()),
        ..UsageQuery::default()
    };
    let ip_usage = UsageQuery {
        client_ip: Some(ip),
        ..UsageQuery::default()
    };
    assert_eq!(e.usage(&of("known"), START).denials, 1);
    assert_eq!(
        e.usage(&ip_usage, START).denials,
        4,
        "the IP's scope exists"
    );
    assert_eq!(e.usage(&group("acme"), START).denials, 1);
    assert_eq!(e.usage(&group("team"), START).denials, 1);
    assert_eq!(e.usage(&of("assigned"), START).denials, 1);
    assert_eq!(e.usage(&UsageQuery::default(), START).denials, 4);
    // Neither the subject the caller made up nor the invented group got a scope.
    assert!(!e.scopes.contains_key(&ScopeKey::Subject("stranger".into())));
    assert!(!e.scopes.contains_key(&ScopeKey::Group("invented".into())));
}

/// Issue 9, item 1: a table full of scopes whose only state is figures (this month's use of
/// subjects without a month quota) evicts them for a new user instead of refusing it until
/// the month ends; a scope a limit still reads is kept, and once only those are left the new
/// user is refused.
#[test]
fn a_full_table_evicts_scopes_no_limit_reads_before_refusing_a_new_user() {
    let policy = policy(POLICY);
    let bounds = Bounds {
        // Three subjects and the fleet.
        max_scopes: 4,
        ..Bounds::default()
    };
    let mut e = Engine::new(policy.clone(), bounds);
    let mut disk = Disk::default();
    let mut out = Vec::new();
    let month_quota = crate::policy::Overrides {
        tokens_per_month: Some(1_000_000),
        ..Default::default()
    };
    e.set_subject("monthly", "free", None, month_quota, &mut out)
        .unwrap();
    for (i, s) in ["monthly", "a", "b"].into_iter().enumerate() {
        let id = e
            .reserve(one_token(s, i as u128 + 1), START, &mut out)
            .unwrap()
            .reservation_id
            .unwrap();
        e.commit(id, used(1, 0), START, &mut out).unwrap();
    }
    assert_eq!(e.scope_count(), 4);
    // The next day (the same month), nothing is at rest: every scope has this month's use.
    let tomorrow = START + crate::clock::MICROS_PER_DAY;
    assert_eq!(e.forget_scopes_at_rest(tomorrow, &mut out), 0);
    disk.apply(out);

    let mut out = Vec::new();
    let c = e.reserve(one_token("c", 10), tomorrow, &mut out);
    assert_eq!(c.unwrap().decision, Decision::Allowed, "room was made");
    let d = e.reserve(one_token("d", 11), tomorrow, &mut out);
    assert_eq!(d.unwrap().decision, Decision::Allowed);
    let evicted: Vec<_> = out
        .iter()
        .filter_map(|m| match m {
            Mutation::Scope { key, state: None } => Some(key.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        evicted,
        [ScopeKey::Subject("a".into()), ScopeKey::Subject("b".into())]
    );
    // Left: "monthly" (its month quota reads its month's use), c and d (open holds), the
    // fleet. Nothing more can go.
    assert_eq!(
        e.reserve(one_token("e", 12), tomorrow, &mut out)
            .unwrap_err(),
        EngineError::Exhausted {
            what: "scopes with live state",
            bound: 4
        }
    );
    disk.apply(out);
    // An evicted scope's figures start again; the fleet's keep its use.
    assert_eq!(e.usage(&of("a"), tomorrow).used_tokens_month, 0);
    assert_eq!(e.usage(&of("monthly"), tomorrow).used_tokens_month, 1);
    let fleet = e.usage(&UsageQuery::default(), tomorrow);
    assert_eq!(fleet.used_tokens_month, 3);
    check_invariants(&e, 0);
    let restored = disk.restore(policy, bounds);
    assert_eq!(restored.scopes, e.scopes);
}

/// A late Commit that brings debt to a scope evicted since needs room for it like a Reserve:
/// with the table full of scopes in use it is refused with nothing changed, and goes through
/// once room can be made.
#[test]
fn a_late_commit_needs_room_like_a_reserve() {
    let bounds = Bounds {
        max_scopes: 3,
        ..Bounds::default()
    };
    let mut e = Engine::new(policy(POLICY), bounds);
    let mut out = Vec::new();
    let ann = e.reserve(one_token("ann", 1), START, &mut out).unwrap();
    let ann = ann.reservation_id.unwrap();
    // 23:50:30: ann's hold expires, charged to yesterday by tomorrow.
    let later = START + 20 * MICROS_PER_MINUTE;
    assert_eq!(e.expire_due(later, &mut out), 1);
    e.reserve(one_token("ben", 2), later, &mut out).unwrap();
    let cat = e.reserve(one_token("cat", 3), later, &mut out).unwrap();
    let cat = cat.reservation_id.unwrap();
    assert!(
        !e.scopes.contains_key(&ScopeKey::Subject("ann".into())),
        "ann's scope was evicted for cat's"
    );
    // ann's late Commit reports more than was held: the debt needs ann's scope again.
    let mut muts = Vec::new();
    assert_eq!(
        e.commit(ann, used(500, 0), later, &mut muts).unwrap_err(),
        EngineError::Exhausted {
            what: "scopes with live state",
            bound: 3
        }
    );
    assert!(muts.is_empty(), "{muts:?}");
    assert_eq!(e.scope_count(), 3);
    // cat's call never happened; once its request has left the minute window (two
    // minutes on, at most), no limit needs cat's scope.
    e.refund(cat, later, &mut out).unwrap();
    let minute_on = later + 2 * MICROS_PER_MINUTE;
    let c = e.commit(ann, used(500, 0), minute_on, &mut out).unwrap();
    assert_eq!(c.settlement.debt_tokens, 499);
    assert_eq!(e.usage(&of("ann"), minute_on).used_tokens, 499);
    assert_eq!(e.scope_count(), 3);
    check_invariants(&e, 0);
}

const DAY_500: &str = "default_tier = \"t\"\n[tiers.t]\ntokens_per_day = 500\nhold_seconds = 30\n";

/// Issue 9, item 10: after a forward step of the clock that is corrected, the later day's
/// charges still count: the day quota reads them, an expiry in the corrected time lands on
/// them, and the retry hint points at the end of that later day.
#[test]
fn a_clock_stepped_forward_and_back_grants_no_second_day() {
    let mut e = Engine::new(policy(DAY_500), Bounds::default());
    let mut out = Vec::new();
    let hour = 3_600 * MICROS_PER_SECOND;
    // Noon.
    let noon = START + 10 * MICROS_PER_MINUTE + 12 * hour;
    let take = |e: &mut Engine, tokens, id, at, out: &mut Vec<Mutation>| {
        let input = ReserveInput {
            caller: None,
            prompt_tokens: tokens,
            ..one_token("ann", id)
        };
        e.reserve(input, at, out).unwrap()
    };
    let a = take(&mut e, 100, 1, noon, &mut out);
    e.commit(a.reservation_id.unwrap(), used(100, 0), noon, &mut out)
        .unwrap();
    // The clock steps a day forward: 300 tokens are used "tomorrow".
    let ahead = noon + crate::clock::MICROS_PER_DAY;
    let b = take(&mut e, 300, 2, ahead, &mut out);
    e.commit(b.reservation_id.unwrap(), used(300, 0), ahead, &mut out)
        .unwrap();
    // Corrected an hour later: the day of the charges is still the day that counts.
    let back = noon + hour;
    assert_eq!(e.usage(&of("ann"), back).used_tokens, 300);
    let o = take(&mut e, 300, 3, back, &mut out);
    assert_eq!(o.decision, Decision::Denied, "{o:?}");
    assert_eq!(o.denied_by.as_deref(), Some("tokens_per_day"));
    let end_of_later_day = until_end_of_utc_day(utc_day(ahead), back);
    assert_eq!(o.retry_after_us, Some(end_of_later_day));
    let status = o
        .limits
        .iter()
        .find(|l| l.name == "tokens_per_day")
        .unwrap();
    assert_eq!(
        (status.remaining, status.reset_after_us),
        (200, end_of_later_day)
    );
    // A hold made now and left to expire lands on the same count.
    let c = take(&mut e, 150, 4, back, &mut out);
    assert_eq!(c.decision, Decision::Allowed);
    assert_eq!(e.expire_due(back + 31 * MICROS_PER_SECOND, &mut out), 1);
    assert_eq!(e.usage(&of("ann"), back + hour).used_tokens, 450);
    let o = take(&mut e, 100, 5, back + hour, &mut out);
    assert_eq!(o.decision, Decision::Denied, "{o:?}");
}

/// Issue 9, item 11: when the record just settled is the oldest settled one (expired at a
/// deadline older than every other settled record, or settled after the clock stepped back)
/// and the settled set is at its bound, it is purged whole: record, index and key together,
/// in memory and in the mutations, rather than purged and then written back into no index.
#[test]
fn a_settled_record_that_is_the_oldest_is_purged_whole() {
    let policy = policy(POLICY);
    let bounds = Bounds {
        max_settled: 1,
        ..Bounds::default()
    };
    let mut e = Engine::new(policy.clone(), bounds);
    let mut disk = Disk::default();
    let mut out = Vec::new();
    let s = MICROS_PER_SECOND;
    let short = ReserveInput {
        caller: None,
        hold_us: Some(5 * s),
        idempotency_key: Some("turn-1".into()),
        ..one_token("ann", 1)
    };
    let a = e.reserve(short, START, &mut out).unwrap();
    let a = a.reservation_id.unwrap();
    let b = e.reserve(one_token("ben", 2), START, &mut out).unwrap();
    let b = b.reservation_id.unwrap();
    e.commit(b, used(1, 0), START + 10 * s, &mut out).unwrap();
    // The expiry pass finds ann's hold: expired at START + 5 s, older than ben's Commit.
    assert_eq!(e.expire_due(START + 10 * s, &mut out), 1);
    disk.apply(std::mem::take(&mut out));
    check_invariants(&e, 0);
    assert_eq!(e.reservation_count(), 1);
    assert_eq!(
        e.commit(a, used(1, 0), START + 10 * s, &mut out)
            .unwrap_err(),
        EngineError::NotFound(a)
    );
    // The same when a Commit lands after the clock stepped back before ben's Commit.
    let c = e.reserve(one_token("cat", 3), START, &mut out).unwrap();
    let c = c.reservation_id.unwrap();
    e.commit(c, used(1, 0), START + 2 * s, &mut out).unwrap();
    disk.apply(out);
    check_invariants(&e, 1);
    assert_eq!(e.reservation_count(), 1);
    let restored = disk.restore(policy, bounds);
    assert_eq!(restored.all_reservations(), e.all_reservations());
    assert_eq!(restored.idempotency_keys(), e.idempotency_keys());
}

/// Issue 9, item 9: a Commit reporting more tokens than the policy's `max_commit_tokens` (and
/// than its hold) is refused before anything changes, an overdue hold's expiry included; at
/// the bound, or within a larger hold, it is charged.
#[test]
fn a_commit_beyond_max_commit_tokens_is_refused_before_anything_changes() {
    let text = format!("max_commit_tokens = 1000\n{DAY_500}");
    let text = text.replace("tokens_per_day = 500", "tokens_per_day = 100000");
    let mut e = Engine::new(policy(&text), Bounds::default());
    let mut out = Vec::new();
    let small = e.reserve(one_token("ann", 1), START, &mut out).unwrap();
    let small = small.reservation_id.unwrap();
    let big = ReserveInput {
        caller: None,
        prompt_tokens: 4_000,
        max_output_tokens: 1_000,
        ..one_token("ann", 2)
    };
    let big = e.reserve(big, START, &mut out).unwrap();
    let big = big.reservation_id.unwrap();
    let before = (
        e.usage(&of("ann"), START),
        e.usage(&UsageQuery::default(), START),
    );
    // 31 s on, both holds are overdue; the refusal does not even expire them.
    let now = START + 31 * MICROS_PER_SECOND;
    let mut muts = Vec::new();
    let err = e.commit(small, used(0, 100_000_000), now, &mut muts);
    match err.unwrap_err() {
        EngineError::InvalidArgument { field, rule } => {
            assert_eq!(field, "completion_tokens");
            assert!(rule.contains("max_commit_tokens (1000)"), "{rule}");
        }
        other => panic!("{other}"),
    }
    assert!(muts.is_empty(), "{muts:?}");
    let err = e.commit(big, used(4_000, 1_001), now, &mut muts);
    assert!(matches!(err, Err(EngineError::InvalidArgument { .. })));
    assert!(muts.is_empty(), "{muts:?}");
    assert_eq!(
        (
            e.usage(&of("ann"), START),
            e.usage(&UsageQuery::default(), START)
        ),
        before
    );
    // At the bound; and within the larger hold.
    let c = e.commit(small, used(600, 400), now, &mut out).unwrap();
    assert_eq!(c.settlement.debt_tokens, 999);
    let c = e.commit(big, used(4_000, 1_000), now, &mut out).unwrap();
    assert_eq!(c.settlement.debt_tokens, 0);
    // A retry of a Commit already made replays, whatever the bound says.
    assert!(
        e.commit(big, used(4_000, 1_000), now, &mut out)
            .unwrap()
            .replayed
    );
}
