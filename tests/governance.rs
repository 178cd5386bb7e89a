//! Governance end to end, against the README's complete example policy (parsed from the README
//! itself): tier model lists, auto-downgrade and its own budget, money budgets in whole
//! micro-dollars, unpriced models, and the money saved by denials and downgrades, per subject,
//! per group and for the fleet, across a restart. Everything goes through gRPC on loopback;
//! time moves only through the ManualClock.

mod common;
use common::*;

use tollgate::proto::{
    ChatMessage, CommitRequest, CountTokensRequest, Decision, GetUsageRequest, GetUsageResponse,
    LimitOverrides, ReserveRequest, ReserveResponse, SetSubjectRequest,
};

/// Seconds in a day.
const DAY_SECS: u64 = 86_400;
/// Seconds from T0 (noon) to the next UTC midnight.
const T0_TO_MIDNIGHT_SECS: u64 = DAY_SECS / 2;

/// A model's price in µUSD per million (input, output) tokens, as the example policy sets it.
type Price = (u64, u64);
const GPT_4O: Price = (2_500_000, 10_000_000);
const GPT_4O_MINI: Price = (150_000, 600_000);
const MY_LLAMA: Price = (200_000, 200_000);

/// The README's money rule: one rounding up per request, in whole micro-dollars.
fn cost(price: Price, prompt: u64, output: u64) -> u64 {
    (prompt * price.0 + output * price.1).div_ceil(1_000_000)
}

fn in_group(mut req: ReserveRequest, group: &str) -> ReserveRequest {
    req.group = group.to_string();
    req
}

fn dry(mut req: ReserveRequest) -> ReserveRequest {
    req.dry_run = true;
    req
}

fn keyed(mut req: ReserveRequest, key: &str) -> ReserveRequest {
    req.idempotency_key = key.to_string();
    req
}

/// The fleet's figures (GetUsage naming no subject, group or client IP).
async fn fleet(q: &mut Quota) -> GetUsageResponse {
    q.get_usage(GetUsageRequest::default())
        .await
        .expect("get_usage of the fleet")
        .into_inner()
}

/// A group's figures (GetUsage naming only the group).
async fn group_usage(q: &mut Quota, group: &str) -> GetUsageResponse {
    q.get_usage(GetUsageRequest {
        group: group.to_string(),
        ..Default::default()
    })
    .await
    .expect("get_usage of a group")
    .into_inner()
}

async fn count(q: &mut Quota, model: &str, text: &str) -> u64 {
    q.count_tokens(CountTokensRequest {
        model: model.to_string(),
        prompt: Some(text.to_string()),
        messages: Vec::new(),
    })
    .await
    .expect("count_tokens")
    .into_inner()
    .tokens
}

/// Assign `subject` to `tier` with `overrides` (and no group).
async fn set_subject(server: &TestServer, subject: &str, tier: &str, overrides: LimitOverrides) {
    server
        .admin()
        .await
        .set_subject(SetSubjectRequest {
            subject: subject.to_string(),
            tier: tier.to_string(),
            overrides: Some(overrides),
            ..Default::default()
        })
        .await
        .expect("set_subject");
}

#[track_caller]
fn assert_allowed(r: &ReserveResponse, model: &str, tokens: u64, micro_usd: u64) {
    assert_eq!(decision(r), Decision::Allowed, "{r:?}");
    assert_eq!(r.model, model, "{r:?}");
    assert_eq!(r.reserved_tokens, tokens, "{r:?}");
    assert_eq!(r.reserved_micro_usd, micro_usd, "{r:?}");
    assert_eq!(
        r.saved_micro_usd, 0,
        "an allowed Reserve saves nothing: {r:?}"
    );
    assert!(r.denied_by.is_empty() && r.retry_after.is_none(), "{r:?}");
    assert_eq!(r.reservation_id.len(), 36, "{r:?}");
}

#[track_caller]
fn assert_downgraded(r: &ReserveResponse, tokens: u64, micro_usd: u64, saved: u64) {
    assert_eq!(decision(r), Decision::Downgraded, "{r:?}");
    assert_eq!(
        r.model, "gpt-4o-mini",
        "the pro tier's downgrade model: {r:?}"
    );
    assert_eq!(r.reserved_tokens, tokens, "{r:?}");
    assert_eq!(r.reserved_micro_usd, micro_usd, "{r:?}");
    assert_eq!(r.saved_micro_usd, saved, "{r:?}");
    assert!(r.denied_by.is_empty() && r.retry_after.is_none(), "{r:?}");
    assert_eq!(r.reservation_id.len(), 36, "{r:?}");
    assert!(r.expires_at.is_some(), "{r:?}");
}

#[track_caller]
fn assert_denied(r: &ReserveResponse, by: &str, retry_after_us: Option<u64>, saved: u64) {
    assert_eq!(decision(r), Decision::Denied, "{r:?}");
    assert_eq!(r.denied_by, by, "{r:?}");
    assert_eq!(retry_us(r), retry_after_us, "retry_after of {r:?}");
    assert!(r.reservation_id.is_empty(), "{r:?}");
    assert_eq!(r.reserved_tokens, 0, "{r:?}");
    assert_eq!(r.reserved_micro_usd, 0, "{r:?}");
    assert!(r.expires_at.is_none(), "{r:?}");
    assert_eq!(r.saved_micro_usd, saved, "{r:?}");
}

/// The subject-scope status of limit `name`: (limit, remaining).
#[track_caller]
fn subject_limit(limits: &[tollgate::proto::LimitStatus], name: &str) -> (u64, u64) {
    let l = scoped_limit(limits, "subject", name);
    (l.limit, l.remaining)
}

/// The money and governance figures of a GetUsage answer, to compare across a restart.
fn figures(u: &GetUsageResponse) -> [u64; 10] {
    [
        u.spent_micro_usd,
        u.spent_micro_usd_month,
        u.saved_micro_usd,
        u.saved_micro_usd_month,
        u.denials,
        u.downgrades,
        u.downgraded_tokens,
        u.held_micro_usd,
        u.used_tokens,
        u.held_tokens,
    ]
}

// ---------------------------------------------------------------------------------------------
// 1. Model lists.

/// A free user (the example's default tier) asking for an expert model is told no for good:
/// denied by "model", with no retry_after and nothing held, and the denial's saving is the
/// worst case of what was asked at gpt-4o's prices. The same request on a listed small model
/// is allowed and holds its exact worst-case cost. A subject never admitted nor assigned has
/// no scope of its own for a denial to count in (denials must not fill the table): the fleet
/// counts those; once admitted, its own figures count its denials too.
#[tokio::test]
async fn a_free_user_is_denied_an_expert_model_and_allowed_a_small_one() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, on("gpt-4o", "ann", 1_000, 500)).await;
    let asked = cost(GPT_4O, 1_000, 500);
    assert_eq!(asked, 7_500, "2,500 µUSD of prompt + 5,000 of output");
    assert_denied(&r, "model", None, asked);
    let u = usage(&mut q, "ann").await;
    assert_eq!(u.tier, "free");
    assert_eq!((u.held_tokens, u.open_holds, u.requests), (0, 0, 0));
    assert_eq!((u.held_micro_usd, u.spent_micro_usd), (0, 0));
    assert_eq!((u.denials, u.downgrades, u.saved_micro_usd), (0, 0, 0));
    let f = fleet(&mut q).await;
    assert_eq!((f.denials, f.downgrades, f.saved_micro_usd), (1, 0, asked));
    assert_eq!(subject_limit(&u.limits, "tokens_per_day"), (10_000, 10_000));

    // Another model outside the list, unpriced this time: the same answer, and it saved
    // nothing that can be priced.
    let r = rsv(&mut q, on("gpt-4", "ann", 1_000, 500)).await;
    assert_denied(&r, "model", None, 0);

    // The listed small model: allowed, holding its own worst case.
    let r = rsv(&mut q, on("gpt-4o-mini", "ann", 1_000, 500)).await;
    let held = cost(GPT_4O_MINI, 1_000, 500);
    assert_eq!(held, 450);
    assert_allowed(&r, "gpt-4o-mini", 1_500, held);
    let u = usage(&mut q, "ann").await;
    assert_eq!(
        (u.held_tokens, u.open_holds, u.held_micro_usd),
        (1_500, 1, held)
    );
    assert_eq!((u.denials, u.saved_micro_usd), (0, 0));
    let f = fleet(&mut q).await;
    assert_eq!((f.denials, f.saved_micro_usd), (2, asked));
    let denied = rsv(&mut q, on("gpt-4o", "ann", 1_000, 500)).await;
    assert_denied(&denied, "model", None, asked);
    let u = usage(&mut q, "ann").await;
    assert_eq!((u.denials, u.saved_micro_usd), (1, asked));
    let c = commit(&mut q, &r.reservation_id, 1_000, 200).await;
    assert_eq!(c.charged_micro_usd, cost(GPT_4O_MINI, 1_000, 200));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Auto-downgrade.

/// A pro user who spends the day's 500,000 tokens on gpt-4o is then served on gpt-4o-mini
/// against the 100,000-token downgrade budget (the tier's tokens_per_day stays exhausted, the
/// budget drops), then denied by "downgrade.tokens_per_day" until UTC midnight, and the next day
/// is back on gpt-4o.
#[tokio::test]
async fn a_pro_user_is_downgraded_when_the_day_is_spent_then_denied_then_restored() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    set_subject(&server, "pat", "pro", LimitOverrides::default()).await;

    let fresh = usage(&mut q, "pat").await;
    assert_eq!(fresh.tier, "pro");
    assert_eq!(
        subject_limit(&fresh.limits, "downgrade.tokens_per_day"),
        (100_000, 100_000)
    );
    assert_eq!(
        subject_limit(&fresh.limits, "usd_per_day"),
        (25_000_000, 25_000_000),
        "$25 a day, in micro-dollars"
    );

    // Four calls of 125,000 prompt tokens, three minutes apart so the 600k bucket (refilled at
    // 200k a minute) is always full again.
    let mut elapsed = 0;
    let mut spent = 0;
    for _ in 0..4 {
        server.advance_secs(180);
        elapsed += 180;
        let r = rsv(&mut q, reserve("pat", 125_000, 0)).await;
        assert_allowed(&r, "gpt-4o", 125_000, cost(GPT_4O, 125_000, 0));
        let c = commit(&mut q, &r.reservation_id, 125_000, 0).await;
        assert_eq!(c.charged_micro_usd, 312_500);
        spent += c.charged_micro_usd;
    }
    let u = usage(&mut q, "pat").await;
    assert_eq!((u.used_tokens, u.used_tokens_month), (500_000, 500_000));
    assert_eq!(subject_limit(&u.limits, "tokens_per_day"), (500_000, 0));
    assert_eq!(u.spent_micro_usd, spent);
    assert_eq!(spent, 1_250_000);

    // The day is spent: gpt-4o is granted as gpt-4o-mini, on the downgrade budget.
    server.advance_secs(180);
    elapsed += 180;
    let r = rsv(&mut q, reserve("pat", 30_000, 10_000)).await;
    let (asked, granted) = (
        cost(GPT_4O, 30_000, 10_000),
        cost(GPT_4O_MINI, 30_000, 10_000),
    );
    assert_eq!((asked, granted), (175_000, 10_500));
    assert_downgraded(&r, 40_000, granted, asked - granted);
    assert_eq!(
        r.prompt_tokens, 30_000,
        "a count given as prompt_tokens is used as is"
    );
    assert_eq!(subject_limit(&r.limits, "tokens_per_day"), (500_000, 0));
    assert_eq!(
        subject_limit(&r.limits, "downgrade.tokens_per_day"),
        (100_000, 60_000)
    );
    let u = usage(&mut q, "pat").await;
    assert_eq!(
        (u.held_tokens, u.held_micro_usd, u.open_holds),
        (40_000, granted, 1)
    );
    assert_eq!((u.downgrades, u.denials), (1, 0));
    assert_eq!(u.saved_micro_usd, asked - granted);
    assert_eq!(subject_limit(&u.limits, "tokens_per_day"), (500_000, 0));
    assert_eq!(
        subject_limit(&u.limits, "downgrade.tokens_per_day"),
        (100_000, 60_000)
    );
    let mut saved = asked - granted;

    // Committed at the downgrade model's prices, to the downgrade budget: the token quotas do
    // not move, the bill does.
    let c = commit(&mut q, &r.reservation_id, 30_000, 5_000).await;
    assert_eq!((c.charged_tokens, c.released_tokens), (35_000, 5_000));
    assert_eq!(c.charged_micro_usd, cost(GPT_4O_MINI, 30_000, 5_000));
    spent += c.charged_micro_usd;
    let u = usage(&mut q, "pat").await;
    assert_eq!(u.downgraded_tokens, 35_000);
    assert_eq!(
        u.used_tokens, 535_000,
        "today's tokens include downgraded use"
    );
    assert_eq!(
        u.used_tokens_month, 500_000,
        "the month's quota excludes it"
    );
    assert_eq!((u.spent_micro_usd, u.spent_micro_usd_month), (spent, spent));
    assert_eq!(subject_limit(&u.limits, "tokens_per_day"), (500_000, 0));
    assert_eq!(
        subject_limit(&u.limits, "downgrade.tokens_per_day"),
        (100_000, 65_000)
    );

    // The rest of the downgrade budget, exactly.
    server.advance_secs(180);
    elapsed += 180;
    let r = rsv(&mut q, reserve("pat", 65_000, 0)).await;
    let (asked, granted) = (cost(GPT_4O, 65_000, 0), cost(GPT_4O_MINI, 65_000, 0));
    assert_downgraded(&r, 65_000, granted, asked - granted);
    assert_eq!(
        subject_limit(&r.limits, "downgrade.tokens_per_day"),
        (100_000, 0)
    );
    saved += asked - granted;
    let c = commit(&mut q, &r.reservation_id, 65_000, 0).await;
    spent += c.charged_micro_usd;

    // Both budgets spent by charged usage: denied by the downgrade budget until midnight.
    server.advance_secs(180);
    elapsed += 180;
    let r = rsv(&mut q, reserve("pat", 1_000, 100)).await;
    let asked = cost(GPT_4O, 1_000, 100);
    let to_midnight = T0_TO_MIDNIGHT_SECS - elapsed;
    assert_denied(
        &r,
        "downgrade.tokens_per_day",
        Some(to_midnight * SEC),
        asked,
    );
    saved += asked;
    let u = usage(&mut q, "pat").await;
    assert_eq!((u.denials, u.downgrades), (1, 2));
    assert_eq!(u.saved_micro_usd, saved);
    assert_eq!(u.downgraded_tokens, 100_000);
    assert_eq!((u.spent_micro_usd, u.held_micro_usd), (spent, 0));

    // A new UTC day: back on gpt-4o, with both budgets whole again.
    server.advance_secs(to_midnight);
    let r = rsv(&mut q, reserve("pat", 1_000, 100)).await;
    assert_allowed(&r, "gpt-4o", 1_100, asked);
    assert_eq!(
        subject_limit(&r.limits, "tokens_per_day"),
        (500_000, 498_900)
    );
    assert_eq!(
        subject_limit(&r.limits, "downgrade.tokens_per_day"),
        (100_000, 100_000)
    );
    let u = usage(&mut q, "pat").await;
    assert_eq!(
        (u.used_tokens, u.downgraded_tokens, u.spent_micro_usd),
        (0, 0, 0)
    );
    assert_eq!((u.saved_micro_usd, u.denials, u.downgrades), (0, 0, 0));
    assert_eq!(
        u.saved_micro_usd_month, saved,
        "the month keeps the savings"
    );
    assert_eq!(u.spent_micro_usd_month, spent);
    assert_eq!(u.used_tokens_month, 500_000);
    server.stop().await;
}

/// A pro user asking for a model outside the tier's list (gpt-4, which is also unpriced) is
/// granted gpt-4o-mini, and a prompt given as text or chat is counted with gpt-4o-mini's own
/// tokenizer (o200k_base), not gpt-4's (cl100k_base). A free user (no downgrade) asking for
/// gpt-4 is denied.
#[tokio::test]
async fn a_model_outside_the_list_is_downgraded_and_counted_with_the_granted_tokenizer() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    set_subject(&server, "polly", "pro", LimitOverrides::default()).await;

    // Hindi and a little Rust: o200k_base encodes both far more compactly than cl100k_base.
    let text = "नमस्ते दुनिया! यह एक परीक्षण है, और हम टोकन गिन रहे हैं। \
                fn main() { let v: Vec<u64> = (0..10).map(|x| x * x).collect(); }";
    let mini = count(&mut q, "gpt-4o-mini", text).await;
    let gpt4 = count(&mut q, "gpt-4", text).await;
    assert_ne!(
        mini, gpt4,
        "the text must count differently in the two encodings"
    );

    let r = rsv(
        &mut q,
        ReserveRequest {
            subject: "polly".into(),
            model: "gpt-4".into(),
            prompt: Some(text.to_string()),
            max_output_tokens: Some(200),
            ..Default::default()
        },
    )
    .await;
    // gpt-4 has no price, so the downgrade saved nothing that can be priced.
    assert_downgraded(&r, mini + 200, cost(GPT_4O_MINI, mini, 200), 0);
    assert_eq!(
        r.prompt_tokens, mini,
        "counted with gpt-4o-mini's tokenizer"
    );
    assert_eq!(
        subject_limit(&r.limits, "downgrade.tokens_per_day"),
        (100_000, 100_000 - mini - 200)
    );
    assert_eq!(
        subject_limit(&r.limits, "tokens_per_day"),
        (500_000, 500_000),
        "a downgraded hold is not on the tier's token quota"
    );

    // The same as chat messages: the chat count of the granted model.
    let messages = vec![
        ChatMessage {
            role: "system".into(),
            content: "Réponds en français, s'il te plaît.".into(),
            name: String::new(),
        },
        ChatMessage {
            role: "user".into(),
            content: text.into(),
            name: String::new(),
        },
    ];
    let chat_mini = q
        .count_tokens(CountTokensRequest {
            model: "gpt-4o-mini".into(),
            prompt: None,
            messages: messages.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let r = rsv(
        &mut q,
        ReserveRequest {
            subject: "polly".into(),
            model: "gpt-4".into(),
            messages,
            max_output_tokens: Some(0),
            ..Default::default()
        },
    )
    .await;
    assert_downgraded(&r, chat_mini, cost(GPT_4O_MINI, chat_mini, 0), 0);
    assert_eq!(r.prompt_tokens, chat_mini);

    // A count the caller made is used as is.
    let r = rsv(&mut q, on("gpt-4", "polly", 777, 23)).await;
    assert_downgraded(&r, 800, cost(GPT_4O_MINI, 777, 23), 0);
    assert_eq!(r.prompt_tokens, 777);

    let u = usage(&mut q, "polly").await;
    assert_eq!((u.downgrades, u.denials, u.open_holds), (3, 0, 3));
    assert_eq!(u.held_tokens, mini + 200 + chat_mini + 800);

    // The free tier has no downgrade: gpt-4 is denied outright.
    let r = rsv(&mut q, on("gpt-4", "fred", 777, 23)).await;
    assert_denied(&r, "model", None, 0);
    server.stop().await;
}

/// A downgraded request is still checked against the subject's rate limits and every other
/// scope: with its concurrency used up it is denied by max_concurrent, and when its group's day
/// is nearly spent it is denied by "group.tokens_per_day" until midnight, while a smaller one
/// that fits is downgraded.
#[tokio::test]
async fn a_downgraded_request_still_answers_to_rate_limits_and_other_scopes() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    set_subject(
        &server,
        "rl",
        "pro",
        LimitOverrides {
            tokens_per_day: Some(10),
            max_concurrent: Some(1),
            downgrade_tokens_per_day: Some(1_000_000),
            ..Default::default()
        },
    )
    .await;

    let r1 = rsv(&mut q, reserve("rl", 100, 0)).await;
    assert_downgraded(&r1, 100, cost(GPT_4O_MINI, 100, 0), 250 - 15);
    let r = rsv(&mut q, reserve("rl", 100, 0)).await;
    assert_denied(&r, "max_concurrent", Some(SEC), cost(GPT_4O, 100, 0));
    refund(&mut q, &r1.reservation_id).await;

    // An enterprise user fills 1.8M of the group's 2M-token day ([groups.default]).
    set_subject(&server, "big", "enterprise", LimitOverrides::default()).await;
    for _ in 0..2 {
        let r = rsv(&mut q, in_group(reserve("big", 900_000, 0), "team-x")).await;
        assert_allowed(&r, "gpt-4o", 900_000, cost(GPT_4O, 900_000, 0));
        commit(&mut q, &r.reservation_id, 900_000, 0).await;
        server.advance_secs(60);
    }
    let g = group_usage(&mut q, "team-x").await;
    assert_eq!(g.scope, "group");
    assert_eq!(g.used_tokens, 1_800_000);

    let r = rsv(&mut q, in_group(reserve("rl", 300_000, 0), "team-x")).await;
    assert_denied(
        &r,
        "group.tokens_per_day",
        Some((T0_TO_MIDNIGHT_SECS - 120) * SEC),
        cost(GPT_4O, 300_000, 0),
    );
    let r = rsv(&mut q, in_group(reserve("rl", 150_000, 0), "team-x")).await;
    assert_downgraded(
        &r,
        150_000,
        cost(GPT_4O_MINI, 150_000, 0),
        cost(GPT_4O, 150_000, 0) - cost(GPT_4O_MINI, 150_000, 0),
    );
    let g = group_usage(&mut q, "team-x").await;
    assert_eq!(g.held_tokens, 150_000, "the group counts downgraded holds");
    assert_eq!(
        scoped_limit(&g.limits, "group", "tokens_per_day").remaining,
        50_000
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Money.

/// Money budgets are exact integer micro-dollars: an enterprise subject with a 10,000 µUSD day
/// holds each Reserve's worst case exactly, is charged each Commit's exact cost (one rounding
/// up per request; the held cost when usage is unknown), is denied by "usd_per_day" when the
/// worst case does not fit (1 s while its own holds block, until midnight when charged money
/// does), and GetUsage's spent_micro_usd is the sum of the exact costs.
#[tokio::test]
async fn money_budgets_hold_and_charge_exact_micro_dollars() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    set_subject(
        &server,
        "ent",
        "enterprise",
        LimitOverrides {
            micro_usd_per_day: Some(10_000),
            ..Default::default()
        },
    )
    .await;
    let u = usage(&mut q, "ent").await;
    assert_eq!(subject_limit(&u.limits, "usd_per_day"), (10_000, 10_000));
    assert_eq!(
        subject_limit(&u.limits, "usd_per_month"),
        (5_000_000_000, 5_000_000_000)
    );

    // 1,001 prompt tokens at $2.50/M are 2,502.5 µUSD: the hold rounds the request up once.
    let r1 = rsv(&mut q, reserve("ent", 1_001, 500)).await;
    assert_eq!(cost(GPT_4O, 1_001, 500), 7_503);
    assert_allowed(&r1, "gpt-4o", 1_501, 7_503);
    assert_eq!(subject_limit(&r1.limits, "usd_per_day"), (10_000, 2_497));
    assert_eq!(
        subject_limit(&r1.limits, "usd_per_month"),
        (5_000_000_000, 5_000_000_000 - 7_503)
    );

    // 2,500 µUSD more does not fit, and the open hold is what blocks: try again in a second.
    let r = rsv(&mut q, reserve("ent", 1_000, 0)).await;
    assert_denied(&r, "usd_per_day", Some(SEC), 2_500);

    // Commit charges the reported usage, rounded up once: 2,502.5 + 1,230 -> 3,733.
    let c = commit(&mut q, &r1.reservation_id, 1_001, 123).await;
    assert_eq!(c.charged_micro_usd, 3_733);
    assert_eq!(c.charged_micro_usd, cost(GPT_4O, 1_001, 123));
    let mut spent = c.charged_micro_usd;

    // One prompt and one completion token of gpt-4o-mini: 0.15 + 0.6 = 0.75 -> 1, not 1 + 1.
    let r = rsv(&mut q, on("gpt-4o-mini", "ent", 1, 1)).await;
    assert_allowed(&r, "gpt-4o-mini", 2, 1);
    let c = commit(&mut q, &r.reservation_id, 1, 1).await;
    assert_eq!(c.charged_micro_usd, 1);
    spent += c.charged_micro_usd;

    // Usage unknown: the held worst case is charged.
    let r = rsv(&mut q, reserve("ent", 100, 100)).await;
    assert_allowed(&r, "gpt-4o", 200, 1_250);
    let c = q
        .commit(CommitRequest {
            reservation_id: r.reservation_id.clone(),
            usage_unknown: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.charged_tokens, c.charged_micro_usd), (200, 1_250));
    spent += c.charged_micro_usd;
    assert_eq!(spent, 4_984);

    let u = usage(&mut q, "ent").await;
    assert_eq!((u.spent_micro_usd, u.spent_micro_usd_month), (spent, spent));
    assert_eq!(u.held_micro_usd, 0);
    assert_eq!(
        subject_limit(&u.limits, "usd_per_day"),
        (10_000, 10_000 - spent)
    );

    // Charged money blocks now: retry at the next UTC midnight.
    server.advance_secs(60);
    let r = rsv(&mut q, reserve("ent", 1_000, 500)).await;
    assert_denied(
        &r,
        "usd_per_day",
        Some((T0_TO_MIDNIGHT_SECS - 60) * SEC),
        7_500,
    );
    // What still fits is allowed; refunding it gives the money back and charges nothing.
    let r = rsv(&mut q, reserve("ent", 2_002, 1)).await;
    assert_allowed(&r, "gpt-4o", 2_003, 5_015);
    assert_eq!(subject_limit(&r.limits, "usd_per_day"), (10_000, 1));
    refund(&mut q, &r.reservation_id).await;

    let u = usage(&mut q, "ent").await;
    assert_eq!((u.spent_micro_usd, u.held_micro_usd), (spent, 0));
    assert_eq!((u.denials, u.saved_micro_usd), (2, 2_500 + 7_500));

    // The next day the budget is whole; the month keeps the bill.
    server.advance_secs(T0_TO_MIDNIGHT_SECS - 60);
    let r = rsv(&mut q, reserve("ent", 1_000, 500)).await;
    assert_allowed(&r, "gpt-4o", 1_500, 7_500);
    let u = usage(&mut q, "ent").await;
    assert_eq!((u.spent_micro_usd, u.spent_micro_usd_month), (0, spent));
    assert_eq!(u.held_micro_usd, 7_500);
    server.stop().await;
}

/// A pro subject whose money runs out is downgraded to gpt-4o-mini rather than denied (the
/// downgraded call is cheaper and still billed), and is back on gpt-4o for a call that fits
/// what money is left.
#[tokio::test]
async fn a_pro_user_out_of_money_is_downgraded() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    set_subject(
        &server,
        "penny",
        "pro",
        LimitOverrides {
            micro_usd_per_day: Some(5_000),
            ..Default::default()
        },
    )
    .await;

    let r = rsv(&mut q, reserve("penny", 1_000, 100)).await;
    assert_allowed(&r, "gpt-4o", 1_100, 3_500);
    let c = commit(&mut q, &r.reservation_id, 1_000, 100).await;
    assert_eq!(c.charged_micro_usd, 3_500);

    // 3,500 more would pass the 5,000 µUSD day: granted on gpt-4o-mini instead.
    let r = rsv(&mut q, reserve("penny", 1_000, 100)).await;
    let granted = cost(GPT_4O_MINI, 1_000, 100);
    assert_eq!(granted, 210);
    assert_downgraded(&r, 1_100, granted, 3_500 - granted);
    let c = commit(&mut q, &r.reservation_id, 1_000, 100).await;
    assert_eq!(c.charged_micro_usd, granted);

    let u = usage(&mut q, "penny").await;
    assert_eq!(
        u.spent_micro_usd,
        3_500 + granted,
        "downgraded use is billed"
    );
    assert_eq!(u.downgraded_tokens, 1_100);
    assert_eq!((u.downgrades, u.saved_micro_usd), (1, 3_500 - granted));
    assert_eq!(subject_limit(&u.limits, "usd_per_day"), (5_000, 1_290));

    // A call that fits what is left is served on the model asked for.
    let r = rsv(&mut q, reserve("penny", 100, 0)).await;
    assert_allowed(&r, "gpt-4o", 100, 250);
    server.stop().await;
}

/// A model without a price cannot be spent against a money budget: an enterprise subject (its
/// tier has usd_per_month, no downgrade) asking for gpt-4.5 is denied by "unpriced_model" with
/// no retry_after; a priced model the policy added is allowed; a tier without a money budget
/// may use the unpriced model, holding 0 µUSD.
#[tokio::test]
async fn an_unpriced_model_is_denied_against_a_money_budget() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    set_subject(&server, "corp", "enterprise", LimitOverrides::default()).await;
    set_subject(&server, "tess", "trial", LimitOverrides::default()).await;

    let r = rsv(&mut q, on("gpt-4.5", "corp", 100, 100)).await;
    assert_denied(&r, "unpriced_model", None, 0);
    let u = usage(&mut q, "corp").await;
    assert_eq!((u.held_tokens, u.open_holds, u.denials), (0, 0, 1));

    let r = rsv(&mut q, on("my-llama", "corp", 100, 100)).await;
    assert_allowed(&r, "my-llama", 200, cost(MY_LLAMA, 100, 100));
    assert_eq!(r.reserved_micro_usd, 40);

    let r = rsv(&mut q, on("gpt-4.5", "tess", 100, 100)).await;
    assert_allowed(&r, "gpt-4.5", 200, 0);
    assert!(r.shadow_denied_by.is_empty(), "{r:?}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Savings.

/// saved_micro_usd after a mix of denials and downgrades across subjects is exactly the priced
/// sum (a denial saves its worst case at the asked model's prices; a downgrade saves that minus
/// the granted hold's worst case, never below 0), per subject, for the group "acme" and for the
/// fleet; dry runs and idempotent replays add nothing; denials and downgrades are counted.
#[tokio::test]
async fn savings_add_up_per_subject_group_and_fleet() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;
    set_subject(&server, "p1", "pro", LimitOverrides::default()).await;
    // p2 counts in acme by assignment, not by naming the group in each Reserve.
    admin
        .set_subject(SetSubjectRequest {
            subject: "p2".into(),
            tier: "pro".into(),
            overrides: Some(LimitOverrides {
                tokens_per_day: Some(1_000),
                downgrade_tokens_per_day: Some(6_000),
                ..Default::default()
            }),
            group: "acme".into(),
        })
        .await
        .unwrap();
    set_subject(&server, "e1", "enterprise", LimitOverrides::default()).await;

    // f1 (free, in acme): an expert model is denied; a dry run of it counts nothing.
    let f1_saved = cost(GPT_4O, 2_000, 1_000);
    let r = rsv(&mut q, in_group(on("gpt-4o", "f1", 2_000, 1_000), "acme")).await;
    assert_denied(&r, "model", None, f1_saved);
    let r = rsv(
        &mut q,
        dry(in_group(on("gpt-4o", "f1", 2_000, 1_000), "acme")),
    )
    .await;
    assert_eq!(
        (decision(&r), r.denied_by.as_str()),
        (Decision::Denied, "model")
    );
    let r = rsv(
        &mut q,
        in_group(on("gpt-4o-mini", "f1", 2_000, 1_000), "acme"),
    )
    .await;
    assert_eq!(decision(&r), Decision::Allowed);

    // p1 (pro, in acme): my-llama is not in pro's list. Downgraded twice: once cheaper than
    // asked, once dearer (the saving saturates at 0); and once as a dry run.
    let asked = cost(MY_LLAMA, 10_000, 1_000);
    let granted = cost(GPT_4O_MINI, 10_000, 1_000);
    assert_eq!((asked, granted), (2_200, 2_100));
    let r = rsv(
        &mut q,
        in_group(on("my-llama", "p1", 10_000, 1_000), "acme"),
    )
    .await;
    assert_downgraded(&r, 11_000, granted, asked - granted);
    let p1_saved = asked - granted;
    let asked = cost(MY_LLAMA, 1_000, 10_000);
    let granted = cost(GPT_4O_MINI, 1_000, 10_000);
    assert!(granted > asked);
    let r = rsv(
        &mut q,
        in_group(on("my-llama", "p1", 1_000, 10_000), "acme"),
    )
    .await;
    assert_downgraded(&r, 11_000, granted, 0);
    let r = rsv(
        &mut q,
        dry(in_group(on("my-llama", "p1", 10_000, 1_000), "acme")),
    )
    .await;
    assert_eq!(decision(&r), Decision::Downgraded, "{r:?}");
    assert!(r.reservation_id.is_empty());

    // p2 (pro, 1,000 tokens a day, 6,000 downgraded): downgraded, replayed, then denied by the
    // downgrade budget while its own hold blocks.
    let asked = cost(GPT_4O, 5_000, 500);
    let granted = cost(GPT_4O_MINI, 5_000, 500);
    assert_eq!((asked, granted), (17_500, 1_050));
    let first = rsv(&mut q, keyed(reserve("p2", 5_000, 500), "p2-job")).await;
    assert_downgraded(&first, 5_500, granted, asked - granted);
    let again = rsv(&mut q, keyed(reserve("p2", 5_000, 500), "p2-job")).await;
    assert!(again.replayed, "{again:?}");
    assert_eq!(again.reservation_id, first.reservation_id);
    assert_eq!(decision(&again), Decision::Downgraded);
    assert_eq!(again.saved_micro_usd, 0, "a replay saves nothing again");
    // 1,001 tokens are more than the tier's whole (overridden) day: downgraded or nothing.
    let denied_asked = cost(GPT_4O, 1_001, 0);
    let r = rsv(&mut q, reserve("p2", 1_001, 0)).await;
    assert_denied(&r, "downgrade.tokens_per_day", Some(SEC), denied_asked);
    let p2_saved = asked - granted + denied_asked;

    // e1 (enterprise, no group): an unpriced model (saves nothing priced) and a request larger
    // than its 1M-token bucket.
    let r = rsv(&mut q, on("gpt-4.5", "e1", 100, 100)).await;
    assert_denied(&r, "unpriced_model", None, 0);
    let big = cost(GPT_4O, 1_200_000, 0);
    assert_eq!(big, 3_000_000);
    let r = rsv(&mut q, reserve("e1", 1_200_000, 0)).await;
    assert_denied(&r, "tokens_per_minute", None, big);
    let r = rsv(&mut q, reserve("e1", 100, 0)).await;
    assert_allowed(&r, "gpt-4o", 100, 250);
    let e1_saved = big;

    // Per subject: (saved, denials, downgrades). f1 was neither admitted nor assigned when it
    // was denied: that denial is in acme's and the fleet's figures, not its own.
    for (subject, saved, denials, downgrades) in [
        ("f1", 0, 0, 0),
        ("p1", p1_saved, 0, 2),
        ("p2", p2_saved, 1, 1),
        ("e1", e1_saved, 2, 0),
    ] {
        let u = usage(&mut q, subject).await;
        assert_eq!(
            (
                u.saved_micro_usd,
                u.saved_micro_usd_month,
                u.denials,
                u.downgrades
            ),
            (saved, saved, denials, downgrades),
            "{subject}: {u:?}"
        );
    }

    let g = group_usage(&mut q, "acme").await;
    assert_eq!((g.scope.as_str(), g.group.as_str()), ("group", "acme"));
    let acme = f1_saved + p1_saved + p2_saved;
    assert_eq!(acme, 15_000 + 100 + 16_450 + 2_503);
    assert_eq!(
        (
            g.saved_micro_usd,
            g.saved_micro_usd_month,
            g.denials,
            g.downgrades
        ),
        (acme, acme, 2, 3),
        "{g:?}"
    );

    let f = fleet(&mut q).await;
    assert_eq!(f.scope, "global");
    assert!(f.subject.is_empty() && f.group.is_empty(), "{f:?}");
    let all = acme + e1_saved;
    assert_eq!(
        (
            f.saved_micro_usd,
            f.saved_micro_usd_month,
            f.denials,
            f.downgrades
        ),
        (all, all, 4, 3),
        "{f:?}"
    );
    // The fleet's bill so far is its open holds' worst case: nothing is committed yet.
    assert_eq!(f.spent_micro_usd, 0);
    assert_eq!(
        f.held_micro_usd,
        cost(GPT_4O_MINI, 2_000, 1_000)
            + cost(GPT_4O_MINI, 10_000, 1_000)
            + cost(GPT_4O_MINI, 1_000, 10_000)
            + cost(GPT_4O_MINI, 5_000, 500)
            + cost(GPT_4O, 100, 0)
    );
    server.stop().await;
}

/// Money spent and saved, the denial and downgrade counts and the open holds' worst case
/// survive a restart, and an idempotent retry of a downgraded Reserve replays
/// DECISION_DOWNGRADED with the same reservation (before and after the restart) without
/// adding savings; its Commit after the restart is charged at the downgrade model's prices.
#[tokio::test]
async fn money_and_savings_survive_a_restart_and_replays_add_nothing() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    set_subject(
        &server,
        "r1",
        "pro",
        LimitOverrides {
            tokens_per_day: Some(1_000),
            ..Default::default()
        },
    )
    .await;
    set_subject(&server, "r2", "enterprise", LimitOverrides::default()).await;

    let asked = cost(GPT_4O, 5_000, 500);
    let granted = cost(GPT_4O_MINI, 5_000, 500);
    let first = rsv(&mut q, keyed(reserve("r1", 5_000, 500), "job-1")).await;
    assert_downgraded(&first, 5_500, granted, asked - granted);
    let again = rsv(&mut q, keyed(reserve("r1", 5_000, 500), "job-1")).await;
    assert!(again.replayed, "{again:?}");
    assert_eq!(decision(&again), Decision::Downgraded);
    assert_eq!(again.reservation_id, first.reservation_id);
    assert_eq!(
        (again.model.as_str(), again.saved_micro_usd),
        ("gpt-4o-mini", 0)
    );
    assert_eq!(again.reserved_micro_usd, granted);

    let r = rsv(&mut q, reserve("r2", 1_001, 500)).await;
    let c = commit(&mut q, &r.reservation_id, 1_001, 123).await;
    assert_eq!(c.charged_micro_usd, 3_733);
    let r = rsv(&mut q, on("gpt-4o", "r3", 2_000, 1_000)).await;
    assert_denied(&r, "model", None, 15_000);

    let mut before = Vec::new();
    for s in ["r1", "r2", "r3"] {
        before.push(figures(&usage(&mut q, s).await));
    }
    let fleet_before = figures(&fleet(&mut q).await);
    assert_eq!(before[0][2], asked - granted, "r1 saved");
    assert_eq!(before[0][7], granted, "r1 holds the downgrade's worst case");
    assert_eq!(before[1][0], 3_733, "r2 spent");
    // r3 was never admitted nor assigned: its denial is in the fleet's figures only.
    assert_eq!(before[2][2], 0, "r3 saved");
    assert_eq!(fleet_before[0], 3_733);
    assert_eq!(fleet_before[2], asked - granted + 15_000);
    assert_eq!((fleet_before[4], fleet_before[5]), (1, 1));

    drop(q);
    let server = server.restart(&policy).await;
    let mut q = server.quota().await;
    for (s, b) in ["r1", "r2", "r3"].into_iter().zip(&before) {
        assert_eq!(
            &figures(&usage(&mut q, s).await),
            b,
            "{s} after the restart"
        );
    }
    assert_eq!(figures(&fleet(&mut q).await), fleet_before);

    // The retry after the restart: the same downgraded answer, no saving added.
    let again = rsv(&mut q, keyed(reserve("r1", 5_000, 500), "job-1")).await;
    assert!(again.replayed, "{again:?}");
    assert_eq!(decision(&again), Decision::Downgraded);
    assert_eq!(again.reservation_id, first.reservation_id);
    assert_eq!(again.saved_micro_usd, 0);
    assert_eq!(figures(&usage(&mut q, "r1").await), before[0]);
    assert_eq!(figures(&fleet(&mut q).await), fleet_before);

    // Committed at gpt-4o-mini's prices, to the downgrade budget.
    let c = commit(&mut q, &first.reservation_id, 5_000, 200).await;
    assert_eq!(c.charged_micro_usd, cost(GPT_4O_MINI, 5_000, 200));
    let u = usage(&mut q, "r1").await;
    assert_eq!(u.spent_micro_usd, cost(GPT_4O_MINI, 5_000, 200));
    assert_eq!((u.downgraded_tokens, u.held_micro_usd), (5_200, 0));
    assert_eq!(u.saved_micro_usd, asked - granted);
    let f = fleet(&mut q).await;
    assert_eq!(f.spent_micro_usd, 3_733 + cost(GPT_4O_MINI, 5_000, 200));
    server.stop().await;
}

/// A downgraded hold that expires is charged in full to the downgrade budget and its worst-case
/// cost to the bill (the tier's token quota untouched); a late Commit reconciles both to the
/// reported usage at the downgrade model's prices.
#[tokio::test]
async fn an_expired_downgraded_hold_is_charged_to_the_downgrade_budget() {
    let policy = readme_policy_example();
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    set_subject(
        &server,
        "late",
        "pro",
        LimitOverrides {
            tokens_per_day: Some(1_000),
            ..Default::default()
        },
    )
    .await;

    let granted = cost(GPT_4O_MINI, 5_000, 500);
    let r = rsv(&mut q, reserve("late", 5_000, 500)).await;
    assert_downgraded(&r, 5_500, granted, cost(GPT_4O, 5_000, 500) - granted);

    // The pro tier's default hold is 300 s.
    server.advance_secs(301);
    let u = usage(&mut q, "late").await;
    assert_eq!((u.open_holds, u.held_tokens, u.held_micro_usd), (0, 0, 0));
    assert_eq!((u.downgraded_tokens, u.used_tokens_month), (5_500, 0));
    assert_eq!(
        u.spent_micro_usd, granted,
        "an expiry charges the held worst case"
    );
    assert_eq!(subject_limit(&u.limits, "tokens_per_day"), (1_000, 1_000));
    assert_eq!(
        subject_limit(&u.limits, "downgrade.tokens_per_day"),
        (100_000, 94_500)
    );

    let c = commit(&mut q, &r.reservation_id, 5_000, 200).await;
    assert_eq!(c.charged_micro_usd, cost(GPT_4O_MINI, 5_000, 200));
    let u = usage(&mut q, "late").await;
    assert_eq!(u.downgraded_tokens, 5_200);
    assert_eq!(u.spent_micro_usd, cost(GPT_4O_MINI, 5_000, 200));
    assert_eq!(
        subject_limit(&u.limits, "downgrade.tokens_per_day"),
        (100_000, 94_800)
    );
    server.stop().await;
}
