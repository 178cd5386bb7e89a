//! Token counts checked against an independent reference: OpenAI's `tiktoken` from PyPI.
//!
//! `tests/vectors/tokens.json` holds texts and chats with the counts tiktoken gives for them
//! (written by `scripts/make_token_vectors.py`; CI regenerates it with
//! `scripts/check-token-vectors.sh` and fails if the committed file differs). Every vector is
//! checked, for both models, through the CountTokens RPC, through a dry-run Reserve, and
//! through the `tollgate count-tokens` CLI.

mod common;

use common::*;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tollgate::proto::{self, CountTokensRequest, ReserveRequest};

/// No limit but a day's budget far above any vector.
const POLICY: &str = "default_tier = \"t\"\n[tiers.t]\ntokens_per_day = 1000000000000\n";

/// The models every vector is counted for, and the encoding each must report.
const MODELS: [(&str, &str); 2] = [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vectors {
    generator: String,
    models: BTreeMap<String, String>,
    texts: Vec<TextVector>,
    chats: Vec<ChatVector>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextVector {
    id: String,
    text: String,
    counts: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatVector {
    id: String,
    messages: Vec<Message>,
    counts: BTreeMap<String, u64>,
}

/// A chat message as the file holds it, and as `count-tokens --chat` reads it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

fn vectors() -> Vectors {
    serde_json::from_str(include_str!("vectors/tokens.json")).expect("tests/vectors/tokens.json")
}

fn proto_messages(messages: &[Message]) -> Vec<proto::ChatMessage> {
    messages
        .iter()
        .map(|m| proto::ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
            name: m.name.clone().unwrap_or_default(),
        })
        .collect()
}

/// The expected count of a vector for `model`.
fn expected(id: &str, counts: &BTreeMap<String, u64>, model: &str) -> u64 {
    *counts
        .get(model)
        .unwrap_or_else(|| panic!("vector {id} has no count for {model}"))
}

/// One check: a text or a chat, for one model.
struct Case {
    label: String,
    model: &'static str,
    encoding: &'static str,
    chat: bool,
    /// The text, or the chat as JSON, as the CLI reads it on stdin.
    stdin: String,
    expected: u64,
}

fn cases(v: &Vectors) -> Vec<Case> {
    let mut out = Vec::new();
    for (model, encoding) in MODELS {
        for t in &v.texts {
            out.push(Case {
                label: format!("text {} ({} bytes)", t.id, t.text.len()),
                model,
                encoding,
                chat: false,
                stdin: t.text.clone(),
                expected: expected(&t.id, &t.counts, model),
            });
        }
        for c in &v.chats {
            out.push(Case {
                label: format!("chat {} ({} messages)", c.id, c.messages.len()),
                model,
                encoding,
                chat: true,
                stdin: serde_json::to_string(&c.messages).unwrap(),
                expected: expected(&c.id, &c.counts, model),
            });
        }
    }
    out
}

fn assert_no_mismatches(what: &str, checked: usize, mismatches: &[String]) {
    assert!(
        mismatches.is_empty(),
        "{what}: {} of {checked} checks disagree with tiktoken:\n  {}",
        mismatches.len(),
        mismatches.join("\n  ")
    );
}

#[test]
fn the_vectors_come_from_tiktoken_and_cover_both_models() {
    let v = vectors();
    assert!(
        v.generator.contains("tiktoken"),
        "generator: {:?}",
        v.generator
    );
    let models: BTreeMap<String, String> = MODELS
        .iter()
        .map(|(m, e)| (m.to_string(), e.to_string()))
        .collect();
    assert_eq!(v.models, models);
    assert!(v.texts.len() >= 40, "{} texts", v.texts.len());
    assert!(v.chats.len() >= 10, "{} chats", v.chats.len());
    let mut ids = std::collections::BTreeSet::new();
    for (id, counts) in v
        .texts
        .iter()
        .map(|t| (&t.id, &t.counts))
        .chain(v.chats.iter().map(|c| (&c.id, &c.counts)))
    {
        assert!(ids.insert(id.clone()), "duplicate id {id}");
        let keys: Vec<&str> = counts.keys().map(String::as_str).collect();
        assert_eq!(keys, ["gpt-4", "gpt-4o"], "{id}");
    }
    for c in &v.chats {
        assert!(!c.messages.is_empty(), "chat {} has no messages", c.id);
    }
    // The long inputs are there, and the special-token look-alikes count as several tokens.
    assert!(v
        .texts
        .iter()
        .any(|t| t.text.len() >= 100_000 && !t.text.contains(char::is_whitespace)));
    let eot = v.texts.iter().find(|t| t.text == "<|endoftext|>").unwrap();
    assert!(eot.counts.values().all(|&n| n > 1), "{:?}", eot.counts);
}

#[tokio::test]
async fn every_vector_through_count_tokens() {
    let v = vectors();
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for (model, encoding) in MODELS {
        let texts = v.texts.iter().map(|t| {
            let req = CountTokensRequest {
                model: model.to_string(),
                prompt: Some(t.text.clone()),
                messages: vec![],
            };
            (format!("text {}", t.id), req, &t.counts)
        });
        let chats = v.chats.iter().map(|c| {
            let req = CountTokensRequest {
                model: model.to_string(),
                prompt: None,
                messages: proto_messages(&c.messages),
            };
            (format!("chat {}", c.id), req, &c.counts)
        });
        for (label, req, counts) in texts.chain(chats) {
            checked += 1;
            let want = expected(&label, counts, model);
            match q.count_tokens(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if (r.tokens, r.encoding.as_str()) != (want, encoding) {
                        mismatches.push(format!(
                            "{label} {model}: tiktoken {want} ({encoding}), CountTokens {} ({})",
                            r.tokens, r.encoding
                        ));
                    }
                }
                Err(s) => mismatches.push(format!("{label} {model}: CountTokens failed: {s}")),
            }
        }
    }
    assert_no_mismatches("CountTokens", checked, &mismatches);
    server.stop().await;
}

#[tokio::test]
async fn every_vector_through_a_dry_run_reserve() {
    let v = vectors();
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for (model, _) in MODELS {
        let base = ReserveRequest {
            subject: "vectors".to_string(),
            model: model.to_string(),
            max_output_tokens: Some(0),
            dry_run: true,
            ..Default::default()
        };
        let texts = v.texts.iter().map(|t| {
            let req = ReserveRequest {
                prompt: Some(t.text.clone()),
                ..base.clone()
            };
            (format!("text {}", t.id), req, &t.counts)
        });
        let chats = v.chats.iter().map(|c| {
            let req = ReserveRequest {
                messages: proto_messages(&c.messages),
                ..base.clone()
            };
            (format!("chat {}", c.id), req, &c.counts)
        });
        for (label, req, counts) in texts.chain(chats) {
            checked += 1;
            let want = expected(&label, counts, model);
            match q.reserve(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if decision(&r) != proto::Decision::Allowed
                        || r.prompt_tokens != want
                        || r.reserved_tokens != want
                    {
                        mismatches.push(format!(
                            "{label} {model}: tiktoken {want}, Reserve {:?} prompt_tokens {} reserved_tokens {}",
                            decision(&r),
                            r.prompt_tokens,
                            r.reserved_tokens
                        ));
                    }
                }
                Err(s) => mismatches.push(format!("{label} {model}: Reserve failed: {s}")),
            }
        }
    }
    assert!(checked >= 100, "only {checked} Reserve checks");
    assert_no_mismatches("Reserve (dry run)", checked, &mismatches);
    // A dry run holds nothing.
    let u = usage(&mut q, "vectors").await;
    assert_eq!((u.used_tokens, u.held_tokens, u.open_holds), (0, 0, 0));
    server.stop().await;
}

/// `tollgate count-tokens --model M [--chat] --verbose` with `case.stdin` on stdin: the count
/// and the encoding it prints.
fn run_cli(case: &Case) -> Result<(u64, String), String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(["count-tokens", "--model", case.model, "--verbose"]);
    if case.chat {
        cmd.arg("--chat");
    }
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .env_remove("TOLLGATE_POLICY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    // The CLI reads all of stdin before it writes anything, so writing first cannot deadlock.
    let written = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(case.stdin.as_bytes());
    let out = child.wait_with_output().map_err(|e| format!("wait: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || written.is_err() {
        return Err(format!(
            "{} (stdin write: {written:?}), stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let parsed = stdout
        .strip_suffix('\n')
        .and_then(|line| line.split_once(' '))
        .and_then(|(n, e)| Some((n.parse().ok()?, e.to_string())));
    parsed.ok_or_else(|| format!("unexpected output {stdout:?}"))
}

#[test]
fn every_vector_through_the_cli() {
    let v = vectors();
    let cases = cases(&v);
    // Each process loads its encoding (a few tenths of a second), so run several at once.
    let workers = std::thread::available_parallelism()
        .map_or(4, usize::from)
        .clamp(4, 16);
    let next = AtomicUsize::new(0);
    let mismatches = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(case) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let wrong = match run_cli(case) {
                        Ok((n, e)) if (n, e.as_str()) == (case.expected, case.encoding) => continue,
                        Ok((n, e)) => format!(
                            "{} {}: tiktoken {} ({}), count-tokens {n} ({e})",
                            case.label, case.model, case.expected, case.encoding
                        ),
                        Err(e) => {
                            format!("{} {}: count-tokens failed: {e}", case.label, case.model)
                        }
                    };
                    mismatches.lock().unwrap().push(wrong);
                }
            });
        }
    });
    let mut mismatches = mismatches.into_inner().unwrap();
    mismatches.sort();
    assert_no_mismatches("count-tokens CLI", cases.len(), &mismatches);
}
