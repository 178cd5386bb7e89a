//! A settled reservation, packed, answers every retry exactly as it did while it was open: a
//! replayed Reserve, a retried or conflicting Commit, a Refund, a late Commit, in this engine
//! and in one restored from its records.

use std::net::IpAddr;
use std::sync::Arc;

use super::tests::{check_invariants, one_token, Disk, POLICY, START};
use super::*;
use crate::clock::MICROS_PER_SECOND;

const S: u64 = MICROS_PER_SECOND;

fn used(prompt: u64, completion: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        usage_unknown: false,
    }
}

/// A Reserve of ann's with every field that a retry is compared on or answered with: a
/// downgrade (7,000 tokens is beyond the `open` tier's 6,000 a day), a group, a client IP, a
/// hold life and an idempotency key.
fn downgraded(key: &str, id: u128) -> ReserveInput {
    ReserveInput {
        caller: None,
        subject: "ann".into(),
        model: "m".into(),
        prompt_tokens: 5_000,
        prompt_tokens_for: vec![("small".into(), 4_000)],
        max_output_tokens: 2_000,
        idempotency_key: Some(key.into()),
        hold_us: Some(10 * S),
        dry_run: false,
        group: Some("acme".into()),
        client_ip: Some(IpAddr::from([10, 0, 0, 1])),
        id: ReservationId(id),
    }
}

/// The fields of a Reserve's answer that a replay repeats (the limits are as of the retry).
fn replayed_part(o: &ReserveOutcome) -> impl PartialEq + std::fmt::Debug {
    (
        o.decision,
        o.tier.clone(),
        o.reservation_id,
        o.model.clone(),
        o.reserved_tokens,
        o.reserved_usd,
        o.prompt_tokens,
        o.expires_us,
        o.replayed,
    )
}

#[test]
fn a_settled_reservation_answers_every_retry_as_it_did_when_open() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let mut e = Engine::new(policy.clone(), Bounds::default());
    let mut out = Vec::new();
    e.set_subject("ann", "open", None, Overrides::default(), &mut out)
        .unwrap();

    let first = e.reserve(downgraded("k", 1), START, &mut out).unwrap();
    assert_eq!(first.decision, Decision::Downgraded);
    let id = first.reservation_id.unwrap();
    let while_open = e.reserve(downgraded("k", 2), START + S, &mut out).unwrap();
    assert!(while_open.replayed);
    let conflict_while_open = e.reserve(
        ReserveInput {
            caller: None,
            max_output_tokens: 1,
            ..downgraded("k", 3)
        },
        START + S,
        &mut out,
    );

    let committed = e
        .commit(id, used(3_000, 500), START + 2 * S, &mut out)
        .unwrap();
    assert!(!committed.replayed);
    check_invariants(&e, 0);
    let mut disk = Disk::default();
    disk.apply(std::mem::take(&mut out));
    let restored = disk.restore(policy, Bounds::default());

    for engine in [e, restored] {
        let mut e = engine;
        let mut out = Vec::new();
        let settled = e
            .reserve(downgraded("k", 4), START + 3 * S, &mut out)
            .unwrap();
        assert_eq!(replayed_part(&settled), replayed_part(&while_open));
        let conflict = e.reserve(
            ReserveInput {
                caller: None,
                max_output_tokens: 1,
                ..downgraded("k", 5)
            },
            START + 3 * S,
            &mut out,
        );
        assert_eq!(
            conflict,
            conflict_while_open.clone().map(|_| unreachable!())
        );
        // Another subject's key of the same name makes its own hold.
        let other = e
            .reserve(
                ReserveInput {
                    caller: None,
                    idempotency_key: Some("k".into()),
                    ..one_token("bob", 6)
                },
                START + 3 * S,
                &mut out,
            )
            .unwrap();
        assert!(!other.replayed);
        assert_eq!(other.reservation_id, Some(ReservationId(6)));

        let again = e
            .commit(id, used(3_000, 500), START + 4 * S, &mut out)
            .unwrap();
        assert_eq!(
            (again.settlement, again.replayed),
            (committed.settlement, true)
        );
        assert_eq!(
            e.commit(id, used(3_000, 501), START + 4 * S, &mut out),
            Err(EngineError::IllegalTransition {
                id,
                state: "COMMITTED",
                detail: "it was committed with prompt_tokens = 3000, completion_tokens = 500; \
                         a Commit with prompt_tokens = 3000, completion_tokens = 501 conflicts"
                    .into(),
            })
        );
        assert_eq!(
            e.refund(id, START + 4 * S, &mut out).unwrap_err(),
            EngineError::IllegalTransition {
                id,
                state: "COMMITTED",
                detail: "a committed hold cannot be refunded".into(),
            }
        );
        check_invariants(&e, 1);
    }
}

#[test]
fn an_expired_reservation_takes_its_late_commit_and_then_answers_its_retries() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let mut e = Engine::new(policy, Bounds::default());
    let mut out = Vec::new();
    e.set_subject("ann", "open", None, Overrides::default(), &mut out)
        .unwrap();
    let id = e
        .reserve(downgraded("k", 1), START, &mut out)
        .unwrap()
        .reservation_id
        .unwrap();
    assert_eq!(e.expire_due(START + 11 * S, &mut out), 1);
    check_invariants(&e, 0);
    assert_eq!(
        e.refund(id, START + 12 * S, &mut out).unwrap_err(),
        EngineError::IllegalTransition {
            id,
            state: "EXPIRED",
            detail: "the hold expired and was charged in full; Commit the real usage \
                     (within 24 h) to reconcile"
                .into(),
        }
    );
    let late = e
        .commit(id, used(100, 0), START + 13 * S, &mut out)
        .unwrap();
    assert_eq!(late.settlement.released_tokens, 6_000 - 100);
    check_invariants(&e, 1);
    let again = e
        .commit(id, used(100, 0), START + 14 * S, &mut out)
        .unwrap();
    assert_eq!((again.settlement, again.replayed), (late.settlement, true));
    // Settled again at the Commit's time: kept a full retention from then.
    let day = e.bounds.retention_us;
    assert!(
        e.reserve(downgraded("k", 2), START + 12 * S + day, &mut out)
            .unwrap()
            .replayed
    );
    e.purge_settled(START + 13 * S + day, &mut out);
    assert_eq!(e.reservation_count(), 0);
    check_invariants(&e, 2);
}
