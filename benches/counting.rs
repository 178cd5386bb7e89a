//! What server-side token counting costs, with tiktoken-rs, for o200k_base and cl100k_base.
//!
//! - `load/*`: building an encoding from the data compiled into the binary (what the first
//!   count of a process pays, or `TokenCounter::warm_up`). The time excludes dropping it.
//! - `text_100KiB/*`: [`count_text`] over 100 KiB of English prose, Rust-like source code and
//!   CJK text with punctuation, all generated here from a fixed seed.
//! - `inline_16KiB/*`: the same kinds cut to `INLINE_MAX_BYTES`, plus the adversarial ones: a
//!   run of random lowercase letters without spaces and a run of spaces. Each of those is one
//!   piece of tiktoken's split pattern, and its merge loop is quadratic in a piece's length:
//!   the worst an inline count can hold an async worker.
//! - `no_space_1MiB/*`: [`count_text`] over a megabyte of random lowercase letters. Skipped
//!   (with a note) when 32 KiB of them takes over 100 ms, as it does when the text goes to
//!   tiktoken whole: a run just under 1,000,000 bytes then takes over ten minutes, and one of
//!   1,000,000 or more fails (tiktoken-rs's regex, fancy-regex, runs out of backtracking
//!   stack and tiktoken-rs panics; `TokenCounter` reports the panic as a tokenizer error).
//! - `chat/*`: [`count_chat`] over a 50-message conversation.
//! - Printed once, not a criterion benchmark: the reactor's longest stall while
//!   [`TokenCounter`] counts the worst 16 KiB inputs (inline) and longer runs without spaces
//!   (on a blocking thread), measured with a 1 ms ticker on a one-worker runtime. The 1 MiB
//!   run is included when it is fast, or when `TOLLGATE_BENCH_1MIB=1` asks for it anyway.
//!
//! Throughput is in bytes of input (criterion prints MiB/s). Run with
//! `cargo bench --bench counting`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

use tollgate::tokens::{
    count_chat, count_text, ChatMessage, CountError, Encoding, Prompt, TokenCounter,
    INLINE_MAX_BYTES,
};

const ENCODINGS: [Encoding; 2] = [Encoding::O200kBase, Encoding::Cl100kBase];
const KIB: usize = 1024;
const LARGE: usize = 100 * KIB;
const SEED: u64 = 0x7011_6a7e;

/// SplitMix64: deterministic, and good enough to vary generated text.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
    "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has",
    "there", "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "people",
    "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye",
    "woman", "place", "work", "week", "case", "point", "government", "company", "number",
    "group", "problem", "fact", "system", "program", "question", "night", "water", "money",
    "story", "month", "study", "book", "room", "market", "budget", "request", "service",
    "model", "token", "limit", "minute", "reply", "answer", "window", "bucket", "ledger",
    "quickly", "slowly", "often", "never", "always", "together", "however", "because",
    "although", "before", "after", "between", "through", "during", "without", "within",
    "good", "new", "first", "last", "long", "great", "little", "own", "other", "old", "right",
    "big", "high", "different", "small", "large", "next", "early", "young", "important",
    "public", "bad", "same", "able", "make", "know", "take", "see", "come", "think", "look",
    "want", "give", "use", "find", "tell", "ask", "seem", "feel", "try", "leave", "call",
    "keep", "begin", "show", "hear", "play", "run", "move", "live", "believe", "bring",
    "happen", "write", "provide", "sit", "stand", "lose", "pay", "meet", "include", "continue",
    "learn", "change", "lead", "understand", "watch", "follow", "stop", "create", "speak",
    "read", "allow", "spend", "grow", "open", "walk", "win", "offer", "remember", "consider",
];

#[rustfmt::skip]
const TYPES: &[&str] = &[
    "u64", "usize", "i32", "bool", "&str", "String", "Vec<u8>", "Option<u64>", "&[Entry]",
    "Duration", "HashMap<String, u64>",
];

/// Common CJK characters, typed out; some text also draws from the whole unified block.
const CJK_COMMON: &str = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下\
以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方\
又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全\
工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真\
听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张\
活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物\
台象记边共风战干接它许八特觉望直服毛林题建南度统色请交爱让认算论百吃义科怎元社术结六功指思非流\
每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即\
求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黑断线";

/// `s` cut to at most `bytes`, at a character boundary.
fn cut(mut s: String, bytes: usize) -> String {
    let mut end = bytes.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn sentence(rng: &mut Rng, out: &mut String) {
    let words = 6 + rng.below(15);
    for w in 0..words {
        let word = *rng.pick(WORDS);
        if w == 0 {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.extend(first.to_uppercase());
                out.push_str(chars.as_str());
            }
        } else {
            out.push(' ');
            if rng.below(40) == 0 {
                let _ = write!(out, "{} ", rng.below(2_000));
            }
            out.push_str(word);
        }
        if w + 1 < words && rng.below(9) == 0 {
            out.push(',');
        }
    }
    out.push(if rng.below(10) == 0 { '?' } else { '.' });
}

/// English prose: sentences of common words, in paragraphs.
fn prose(rng: &mut Rng, bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 512);
    while out.len() < bytes {
        for _ in 0..3 + rng.below(5) {
            sentence(rng, &mut out);
            out.push(' ');
        }
        out.pop();
        out.push_str("\n\n");
    }
    cut(out, bytes)
}

fn ident(rng: &mut Rng) -> String {
    let mut s = String::new();
    for i in 0..1 + rng.below(3) {
        if i > 0 {
            s.push('_');
        }
        let word = *rng.pick(&WORDS[60..]);
        s.push_str(word);
    }
    s
}

fn camel(rng: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..1 + rng.below(2) {
        let word = *rng.pick(&WORDS[60..]);
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            s.extend(first.to_uppercase());
            s.push_str(chars.as_str());
        }
    }
    s
}

/// Rust-like source: documented structs and functions with indented bodies.
fn code(rng: &mut Rng, bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 2048);
    while out.len() < bytes {
        let ty = camel(rng);
        out.push_str("/// ");
        sentence(rng, &mut out);
        let _ = writeln!(out, "\n#[derive(Debug, Clone)]\npub struct {ty} {{");
        for _ in 0..2 + rng.below(4) {
            let _ = writeln!(out, "    pub {}: {},", ident(rng), rng.pick(TYPES));
        }
        out.push_str("}\n\n");
        let _ = writeln!(out, "impl {ty} {{");
        for _ in 0..1 + rng.below(3) {
            let (f, a, b, x) = (ident(rng), ident(rng), ident(rng), ident(rng));
            out.push_str("    /// ");
            sentence(rng, &mut out);
            let _ = writeln!(
                out,
                "\n    pub fn {f}(&mut self, {a}: u64, {b}: &str) -> Result<u64, Error> {{"
            );
            let _ = writeln!(
                out,
                "        let mut {x} = {a}.wrapping_mul({}) + {b}.len() as u64;",
                rng.below(100_000)
            );
            for _ in 0..1 + rng.below(4) {
                match rng.below(4) {
                    0 => {
                        let _ = writeln!(
                            out,
                            "        if {x} > {} {{\n            return Err(Error::new(\"{} {}\"));\n        }}",
                            rng.below(10_000),
                            rng.pick(WORDS),
                            rng.pick(WORDS)
                        );
                    }
                    1 => {
                        let i = ident(rng);
                        let _ = writeln!(
                            out,
                            "        for {i} in 0..{} {{\n            {x} += {i} * {}; // {} {}\n        }}",
                            rng.below(64),
                            rng.below(1_000),
                            rng.pick(WORDS),
                            rng.pick(WORDS)
                        );
                    }
                    2 => {
                        let _ = writeln!(
                            out,
                            "        let {} = self.{}.get(&{x}).copied().unwrap_or_default();",
                            ident(rng),
                            ident(rng)
                        );
                    }
                    _ => {
                        let _ = writeln!(
                            out,
                            "        tracing::debug!({x}, \"{} {} {{}}\", {b});",
                            rng.pick(WORDS),
                            rng.pick(WORDS)
                        );
                    }
                }
            }
            let _ = writeln!(out, "        Ok({x})\n    }}\n");
        }
        out.push_str("}\n\n");
    }
    cut(out, bytes)
}

/// CJK text: common characters (one in eight from anywhere in the unified block), with
/// Chinese punctuation and paragraph breaks.
fn cjk(rng: &mut Rng, bytes: usize) -> String {
    let common: Vec<char> = CJK_COMMON.chars().collect();
    let mut out = String::with_capacity(bytes + 256);
    while out.len() < bytes {
        for _ in 0..2 + rng.below(5) {
            let chars = 4 + rng.below(22);
            for i in 0..chars {
                let c = if rng.below(8) == 0 {
                    char::from_u32(0x4E00 + rng.below(0x9FA5 - 0x4E00) as u32).unwrap_or('中')
                } else {
                    *rng.pick(&common)
                };
                out.push(c);
                if i + 1 < chars && rng.below(9) == 0 {
                    out.push(*rng.pick(&['，', '、', '；', '：']));
                }
            }
            out.push(*rng.pick(&['。', '。', '。', '？', '！']));
        }
        out.push('\n');
    }
    cut(out, bytes)
}

/// Random lowercase letters with no space: one regex piece, tiktoken's slow case.
fn no_space(rng: &mut Rng, bytes: usize) -> String {
    (0..bytes)
        .map(|_| char::from(b'a' + rng.below(26) as u8))
        .collect()
}

/// A conversation: a system prompt, then users (some named) and assistants taking turns.
fn chat(rng: &mut Rng, messages: usize) -> Vec<ChatMessage> {
    (0..messages)
        .map(|i| {
            let role = match i {
                0 => "system",
                _ if i % 2 == 1 => "user",
                _ => "assistant",
            };
            let name = if role == "user" && rng.below(3) == 0 {
                ident(rng)
            } else {
                String::new()
            };
            ChatMessage {
                role: role.to_string(),
                content: {
                    let bytes = 200 + rng.below(1_300);
                    prose(rng, bytes)
                },
                name,
            }
        })
        .collect()
}

fn loaded(encoding: Encoding) {
    black_box(encoding.bpe());
}

fn load(c: &mut Criterion) {
    let mut g = c.benchmark_group("load");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(4));
    for encoding in ENCODINGS {
        g.bench_function(encoding.name(), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let bpe = match encoding {
                        Encoding::O200kBase => tiktoken_rs::o200k_base(),
                        _ => tiktoken_rs::cl100k_base(),
                    };
                    took += start.elapsed();
                    drop(black_box(bpe));
                }
                took
            });
        });
    }
    g.finish();
}

fn text_large(c: &mut Criterion) {
    let mut rng = Rng(SEED);
    let inputs = [
        ("prose", prose(&mut rng, LARGE)),
        ("code", code(&mut rng, LARGE)),
        ("cjk", cjk(&mut rng, LARGE)),
    ];
    let mut g = c.benchmark_group("text_100KiB");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    for (kind, text) in &inputs {
        g.throughput(Throughput::Bytes(text.len() as u64));
        for encoding in ENCODINGS {
            loaded(encoding);
            g.bench_with_input(BenchmarkId::new(*kind, encoding.name()), text, |b, t| {
                b.iter(|| count_text(encoding, black_box(t)));
            });
        }
    }
    g.finish();
}

/// The inputs an inline count may get, each exactly `INLINE_MAX_BYTES` (CJK: within 2 bytes).
fn inline_inputs() -> Vec<(&'static str, String)> {
    let mut rng = Rng(SEED ^ 1);
    vec![
        ("prose", prose(&mut rng, INLINE_MAX_BYTES)),
        ("code", code(&mut rng, INLINE_MAX_BYTES)),
        ("cjk", cjk(&mut rng, INLINE_MAX_BYTES)),
        ("no_space", no_space(&mut rng, INLINE_MAX_BYTES)),
        ("spaces_run", " ".repeat(INLINE_MAX_BYTES)),
    ]
}

fn text_inline(c: &mut Criterion) {
    let mut g = c.benchmark_group("inline_16KiB");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for (kind, text) in &inline_inputs() {
        g.throughput(Throughput::Bytes(text.len() as u64));
        for encoding in ENCODINGS {
            loaded(encoding);
            g.bench_with_input(BenchmarkId::new(*kind, encoding.name()), text, |b, t| {
                b.iter(|| count_text(encoding, black_box(t)));
            });
        }
    }
    g.finish();
}

/// Whether [`count_text`] is fast enough on runs without spaces to count a megabyte of them in
/// a benchmark. Measured once.
fn long_runs_are_fast() -> bool {
    static FAST: OnceLock<bool> = OnceLock::new();
    *FAST.get_or_init(|| {
        let text = no_space(&mut Rng(SEED ^ 4), 32 * KIB);
        loaded(Encoding::O200kBase);
        let start = Instant::now();
        black_box(count_text(Encoding::O200kBase, &text));
        let took = start.elapsed();
        let fast = took < Duration::from_millis(100);
        if !fast {
            println!(
                "no_space_1MiB: skipped: 32 KiB without spaces took {took:.1?}, so a run just \
                 under 1 MB would take {:.0?} or more (quadratic); TOLLGATE_BENCH_1MIB=1 \
                 counts 1 MiB once per encoding at the end",
                took * 900
            );
        }
        fast
    })
}

fn no_space_large(c: &mut Criterion) {
    if !long_runs_are_fast() {
        return;
    }
    let text = no_space(&mut Rng(SEED ^ 5), 1024 * KIB);
    let mut g = c.benchmark_group("no_space_1MiB");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(text.len() as u64));
    for encoding in ENCODINGS {
        loaded(encoding);
        g.bench_with_input(
            BenchmarkId::from_parameter(encoding.name()),
            &text,
            |b, t| {
                b.iter(|| count_text(encoding, black_box(t)));
            },
        );
    }
    g.finish();
}

fn chat_50(c: &mut Criterion) {
    let messages = chat(&mut Rng(SEED ^ 2), 50);
    let bytes = Prompt::Chat(messages.clone()).text_bytes();
    let mut g = c.benchmark_group("chat");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(bytes as u64));
    for encoding in ENCODINGS {
        loaded(encoding);
        g.bench_function(
            BenchmarkId::new(format!("50_messages_{bytes}B"), encoding.name()),
            |b| b.iter(|| count_chat(encoding, black_box(&messages))),
        );
    }
    g.finish();
}

/// Counts `text` through a [`TokenCounter`] on a runtime with one worker while a task there
/// ticks every millisecond; returns the count's wall time and the longest gap between ticks
/// (about 1 ms when nothing holds the worker).
fn count_beside_ticker(
    encoding: Encoding,
    text: String,
) -> (Duration, Duration, Result<u64, CountError>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let counter = TokenCounter::new(1);
    rt.block_on(async move {
        let done = Arc::new(AtomicBool::new(false));
        let ticker = tokio::spawn({
            let done = done.clone();
            async move {
                let mut worst = Duration::ZERO;
                let mut last = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let now = Instant::now();
                    worst = worst.max(now - last);
                    last = now;
                }
                worst
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Spawned, so the count runs on the worker as a request handler's would.
        let start = Instant::now();
        let tokens = tokio::spawn(async move { counter.count(encoding, Prompt::Text(text)).await })
            .await
            .expect("count task");
        let took = start.elapsed();
        done.store(true, Ordering::Relaxed);
        (took, ticker.await.expect("ticker"), tokens)
    })
}

fn reactor_stall(_: &mut Criterion) {
    let mut rng = Rng(SEED ^ 3);
    let mut cases = vec![
        (
            "16 KiB run of spaces (inline)",
            " ".repeat(INLINE_MAX_BYTES),
        ),
        (
            "16 KiB without spaces (inline)",
            no_space(&mut rng, INLINE_MAX_BYTES),
        ),
        (
            "32 KiB without spaces (blocking thread)",
            no_space(&mut rng, 32 * KIB),
        ),
    ];
    if long_runs_are_fast() || std::env::var_os("TOLLGATE_BENCH_1MIB").is_some() {
        cases.push((
            "1 MiB without spaces (blocking thread)",
            no_space(&mut rng, 1024 * KIB),
        ));
    }
    println!("\nreactor: longest gap of a 1 ms ticker while TokenCounter counts (1 worker)");
    for (label, text) in &cases {
        for encoding in ENCODINGS {
            loaded(encoding);
            let bytes = text.len();
            let (took, gap, tokens) = count_beside_ticker(encoding, text.clone());
            let tokens = match tokens {
                Ok(n) => format!("{n:>7} tokens"),
                Err(e) => format!("error ({e})"),
            };
            println!(
                "  {label:40} {:11} {tokens} in {took:>9.1?} ({:>6.2} MiB/s); \
                 longest tick gap {gap:.1?}",
                encoding.name(),
                bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64(),
            );
        }
    }
    println!();
}

criterion_group!(
    benches,
    load,
    text_large,
    text_inline,
    no_space_large,
    chat_50,
    reactor_stall
);
criterion_main!(benches);
