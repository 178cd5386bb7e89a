//! What server-side token counting costs, per input kind, with the counters side by side:
//!
//! - `tiktoken-rs`: `CoreBPE::encode_ordinary(..).len()`, tollgate's counter before (still the
//!   one for p50k_base and r50k_base).
//! - `bpe-openai`: GitHub's linear-time `bpe-openai`, what tollgate's [`count_text`] uses now
//!   for o200k_base and cl100k_base (the benches call it directly; each asserts that
//!   [`count_text`] gives the same count).
//! - `tiktoken`: the `tiktoken` crate (ASCII scanners, a per-thread piece cache), a
//!   dev-dependency measured only here: the fastest once warm, but see `cold` below.
//!
//! Groups (inputs generated here from a fixed seed; throughput in bytes of input, so criterion
//! prints MiB/s of one core):
//! - printed first, not a criterion benchmark: loading each encoding (what the first count of a
//!   process pays, or `TokenCounter::warm_up`) and the resident memory it adds. bpe-openai's
//!   encodings are process statics, so its load is timed once per run; the others are built
//!   five times and the median printed.
//! - `prompt_1KiB/*`: 1 KiB of English prose, Rust-like source code and CJK text with
//!   punctuation: a typical Reserve's prompt, the hot path. The same text every iteration, so
//!   the `tiktoken` crate's piece cache holds every piece: its best case.
//! - `real_1KiB/*`: real text instead, a different 1 KiB each iteration, cycling through this
//!   repository's README.md and BENCHMARKS.md (`docs`) and its `src/**/*.rs` (`source`): a
//!   piece cache helps only as much as real text repeats itself.
//! - `text_100KiB/*`: the same kinds, 100 KiB.
//! - `inline_16KiB/*`: the same kinds cut to `INLINE_MAX_BYTES` (what an async worker may
//!   count inline), plus the adversarial kinds below.
//! - `worst_512KiB/*`: the adversarial kinds. `no_space`: random lowercase letters, one piece
//!   of the split pattern (the slowest for all three); `spaces`: one run of spaces; `cjk_run`:
//!   CJK without punctuation (one piece); `latin_mix`: random characters from U+0080..U+07FF,
//!   many tiny pieces (where bpe-openai gains least). 512 KiB keeps the run of spaces within
//!   tiktoken-rs's limit (`MAX_WHITESPACE_RUN`).
//! - `chat/*`: a 50-message conversation.
//! - printed, not criterion: the adversarial kinds at 4 MiB (the default prompt bound), counted
//!   once by each counter, to show how each scales.
//! - printed, not criterion (`cold`): each counter's first count of 16 KiB of non-ASCII text
//!   on a new thread, where its regex's caches start empty, as on a fresh runtime worker or
//!   blocking thread.
//! - printed, not criterion: the reactor's longest stall while [`TokenCounter`] counts the
//!   worst 16 KiB inputs (inline) and longer ones (on a blocking thread), measured with a 1 ms
//!   ticker on a one-worker runtime.
//!
//! Run with `cargo bench --bench counting`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

use tollgate::tokens::{
    count_chat, count_text, ChatMessage, CountError, Encoding, Prompt, TokenCounter,
    INLINE_MAX_BYTES, MAX_WHITESPACE_RUN, REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
};

/// The encodings bpe-openai ships (and the built-in model table uses).
const ENCODINGS: [Encoding; 2] = [Encoding::O200kBase, Encoding::Cl100kBase];
const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const SEED: u64 = 0x7011_6a7e;

/// A token counter under measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    TiktokenRs,
    Tiktoken,
    BpeOpenai,
}

const COUNTERS: [Counter; 3] = [Counter::TiktokenRs, Counter::BpeOpenai, Counter::Tiktoken];

impl Counter {
    fn name(self) -> &'static str {
        match self {
            Counter::TiktokenRs => "tiktoken-rs",
            Counter::Tiktoken => "tiktoken",
            Counter::BpeOpenai => "bpe-openai",
        }
    }

    fn tiktoken_rs(encoding: Encoding) -> &'static tiktoken_rs::CoreBPE {
        match encoding {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            _ => tiktoken_rs::cl100k_base_singleton(),
        }
    }

    fn tiktoken(encoding: Encoding) -> &'static tiktoken::CoreBpe {
        tiktoken::get_encoding(encoding.name()).expect("tiktoken ships o200k and cl100k")
    }

    fn bpe_openai(encoding: Encoding) -> &'static bpe_openai::Tokenizer {
        match encoding {
            Encoding::O200kBase => bpe_openai::o200k_base(),
            _ => bpe_openai::cl100k_base(),
        }
    }

    /// Load `encoding` for this counter (kept for the process).
    fn load(self, encoding: Encoding) {
        match self {
            Counter::TiktokenRs => {
                black_box(Self::tiktoken_rs(encoding));
            }
            Counter::Tiktoken => {
                black_box(Self::tiktoken(encoding));
            }
            Counter::BpeOpenai => {
                black_box(Self::bpe_openai(encoding));
            }
        }
    }

    /// Tokens of `text`, everything ordinary text.
    fn count(self, encoding: Encoding, text: &str) -> u64 {
        match self {
            Counter::TiktokenRs => Self::tiktoken_rs(encoding).encode_ordinary(text).len() as u64,
            Counter::Tiktoken => Self::tiktoken(encoding).count(text) as u64,
            Counter::BpeOpenai => Self::bpe_openai(encoding).count(text) as u64,
        }
    }

    /// Tokens of a chat, by the rule of `count_chat`.
    fn count_chat(self, encoding: Encoding, messages: &[ChatMessage]) -> u64 {
        let mut total = REPLY_PRIMING_TOKENS;
        for m in messages {
            total += TOKENS_PER_MESSAGE + self.count(encoding, &m.role);
            total += self.count(encoding, &m.content);
            if !m.name.is_empty() {
                total += self.count(encoding, &m.name) + TOKENS_PER_NAME;
            }
        }
        total
    }
}

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

/// Random lowercase letters with no space: one piece of the split pattern, the slowest input
/// for every counter measured.
fn no_space(rng: &mut Rng, bytes: usize) -> String {
    (0..bytes)
        .map(|_| char::from(b'a' + rng.below(26) as u8))
        .collect()
}

/// `bytes` of characters drawn by `pick`, cut at a character boundary.
fn filled(rng: &mut Rng, bytes: usize, pick: impl Fn(&mut Rng) -> char) -> String {
    let mut out = String::with_capacity(bytes + 4);
    while out.len() < bytes {
        out.push(pick(rng));
    }
    cut(out, bytes)
}

/// CJK without punctuation: one piece of the split pattern.
fn cjk_run(rng: &mut Rng, bytes: usize) -> String {
    filled(rng, bytes, |r| {
        char::from_u32(0x4E00 + r.below(0x9FA5 - 0x4E00) as u32).unwrap_or('中')
    })
}

/// Random characters from U+0080..U+07FF (Latin, Greek, Cyrillic, Hebrew, Arabic letters and
/// combining marks): many tiny pieces, where the cost per piece, not the merge, dominates.
fn latin_mix(rng: &mut Rng, bytes: usize) -> String {
    filled(rng, bytes, |r| {
        char::from_u32(0x80 + r.below(0x780) as u32).unwrap_or('é')
    })
}

/// The adversarial kinds, each `bytes` long (multi-byte kinds within 3 bytes).
fn adversarial(seed: u64, bytes: usize) -> Vec<(&'static str, String)> {
    let mut rng = Rng(seed);
    vec![
        ("no_space", no_space(&mut rng, bytes)),
        ("spaces", " ".repeat(bytes)),
        ("cjk_run", cjk_run(&mut rng, bytes)),
        ("latin_mix", latin_mix(&mut rng, bytes)),
    ]
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

fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Loading: once per counter and encoding, kept, with the resident memory it added (measured
/// before anything is freed, so the allocator cannot hand one counter another's memory); then
/// tiktoken-rs and tiktoken built and dropped five times more for a median. tollgate loads
/// both `tiktoken` and `bpe-openai` for each of these encodings.
fn load(_: &mut Criterion) {
    println!(
        "\nload: first load of each encoding in this process, and the resident memory it adds"
    );
    for counter in [Counter::BpeOpenai, Counter::Tiktoken, Counter::TiktokenRs] {
        for encoding in ENCODINGS {
            let before = resident_bytes();
            let start = Instant::now();
            counter.load(encoding);
            let took = start.elapsed();
            let grew = before
                .zip(resident_bytes())
                .map_or(String::new(), |(a, b)| {
                    format!(
                        ", +{:.0} MiB resident",
                        b.saturating_sub(a) as f64 / MIB as f64
                    )
                });
            println!(
                "  {:11} {:11} {took:>9.1?}{grew}",
                counter.name(),
                encoding.name()
            );
        }
    }
    println!("load: median of 5 fresh builds (bpe-openai's are process statics: first load above)");
    for encoding in ENCODINGS {
        let rs = median(
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    let bpe = match encoding {
                        Encoding::O200kBase => tiktoken_rs::o200k_base(),
                        _ => tiktoken_rs::cl100k_base(),
                    };
                    let took = start.elapsed();
                    drop(black_box(bpe));
                    took
                })
                .collect(),
        );
        let t4 = median(
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    let bpe = match encoding {
                        Encoding::O200kBase => tiktoken::encoding::o200k_base(),
                        _ => tiktoken::encoding::cl100k_base(),
                    };
                    let took = start.elapsed();
                    drop(black_box(bpe));
                    took
                })
                .collect(),
        );
        println!(
            "  {:11} tiktoken-rs {rs:>9.1?}   tiktoken {t4:>9.1?}",
            encoding.name()
        );
    }
    println!();
}

/// Each counter on each input and encoding; every counter must give the same count.
fn side_by_side(
    c: &mut Criterion,
    group: &str,
    inputs: &[(&'static str, String)],
    measure: Duration,
) {
    let mut g = c.benchmark_group(group);
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(measure);
    for (kind, text) in inputs {
        g.throughput(Throughput::Bytes(text.len() as u64));
        for encoding in ENCODINGS {
            let expected = Counter::TiktokenRs.count(encoding, text);
            assert_eq!(count_text(encoding, text), expected, "tollgate on {kind}");
            for counter in COUNTERS {
                counter.load(encoding);
                assert_eq!(
                    counter.count(encoding, text),
                    expected,
                    "{} on {kind} ({})",
                    counter.name(),
                    encoding.name()
                );
                g.bench_with_input(
                    BenchmarkId::new(format!("{kind}/{}", encoding.name()), counter.name()),
                    text,
                    |b, t| b.iter(|| counter.count(encoding, black_box(t))),
                );
            }
        }
    }
    g.finish();
}

fn ordinary(seed: u64, bytes: usize) -> Vec<(&'static str, String)> {
    let mut rng = Rng(seed);
    vec![
        ("prose", prose(&mut rng, bytes)),
        ("code", code(&mut rng, bytes)),
        ("cjk", cjk(&mut rng, bytes)),
    ]
}

fn prompt_1k(c: &mut Criterion) {
    side_by_side(
        c,
        "prompt_1KiB",
        &ordinary(SEED ^ 6, KIB),
        Duration::from_secs(1),
    );
}

/// The repository's own files under `dir` whose names end in `ext`, in name order, joined.
fn repository_text(paths: &[&str], ext: &str) -> String {
    fn walk(path: &std::path::Path, ext: &str, out: &mut Vec<std::path::PathBuf>) {
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .expect("readable")
                .map(|e| e.expect("entry").path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, ext, out);
            }
        } else if path.to_string_lossy().ends_with(ext) {
            out.push(path.to_path_buf());
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for p in paths {
        walk(&root.join(p), ext, &mut files);
    }
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("UTF-8 text"))
        .collect()
}

/// `text` in consecutive slices of about `bytes` (cut at character boundaries).
fn slices(text: &str, bytes: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    while start + bytes <= text.len() {
        let mut end = start + bytes;
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(text[start..end].to_string());
        start = end;
    }
    out
}

fn real_1k(c: &mut Criterion) {
    let inputs = [
        (
            "docs",
            slices(
                &repository_text(&["README.md", "BENCHMARKS.md"], ".md"),
                KIB,
            ),
        ),
        ("source", slices(&repository_text(&["src"], ".rs"), KIB)),
    ];
    let mut g = c.benchmark_group("real_1KiB");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(KIB as u64));
    for (kind, texts) in &inputs {
        for encoding in ENCODINGS {
            for counter in COUNTERS {
                counter.load(encoding);
                let mut next = 0;
                g.bench_function(
                    BenchmarkId::new(
                        format!("{kind}_{}_slices/{}", texts.len(), encoding.name()),
                        counter.name(),
                    ),
                    |b| {
                        b.iter(|| {
                            next = (next + 1) % texts.len();
                            counter.count(encoding, black_box(&texts[next]))
                        })
                    },
                );
            }
            // Same counts, slice by slice.
            for t in texts {
                let want = Counter::TiktokenRs.count(encoding, t);
                assert_eq!(count_text(encoding, t), want);
                for counter in COUNTERS {
                    assert_eq!(counter.count(encoding, t), want, "{}", counter.name());
                }
            }
        }
    }
    g.finish();
}

fn text_large(c: &mut Criterion) {
    side_by_side(
        c,
        "text_100KiB",
        &ordinary(SEED, 100 * KIB),
        Duration::from_secs(2),
    );
}

fn text_inline(c: &mut Criterion) {
    let mut inputs = ordinary(SEED ^ 1, INLINE_MAX_BYTES);
    inputs.extend(adversarial(SEED ^ 7, INLINE_MAX_BYTES));
    side_by_side(c, "inline_16KiB", &inputs, Duration::from_secs(1));
}

fn worst(c: &mut Criterion) {
    const BYTES: usize = 512 * KIB;
    const _: () = assert!(BYTES <= MAX_WHITESPACE_RUN);
    side_by_side(
        c,
        "worst_512KiB",
        &adversarial(SEED ^ 5, BYTES),
        Duration::from_secs(3),
    );
}

fn chat_50(c: &mut Criterion) {
    let messages = chat(&mut Rng(SEED ^ 2), 50);
    let bytes = Prompt::Chat(messages.clone()).text_bytes();
    let mut g = c.benchmark_group("chat");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes(bytes as u64));
    for encoding in ENCODINGS {
        let expected = Counter::TiktokenRs.count_chat(encoding, &messages);
        assert_eq!(count_chat(encoding, &messages), expected);
        for counter in COUNTERS {
            counter.load(encoding);
            assert_eq!(counter.count_chat(encoding, &messages), expected);
            g.bench_function(
                BenchmarkId::new(
                    format!("50_messages_{bytes}B/{}", encoding.name()),
                    counter.name(),
                ),
                |b| b.iter(|| counter.count_chat(encoding, black_box(&messages))),
            );
        }
    }
    g.finish();
}

/// The adversarial kinds at 4 MiB, once per counter: how each scales (a run of spaces that
/// long is beyond tiktoken-rs's limit, so tollgate refuses it for p50k_base and r50k_base).
/// tollgate counts these with bpe-openai.
fn at_4_mib(_: &mut Criterion) {
    println!("\n4 MiB adversarial inputs, counted once (o200k_base)");
    let encoding = Encoding::O200kBase;
    for (kind, text) in adversarial(SEED ^ 8, 4 * MIB) {
        let mut line = format!("  {kind:10}");
        for counter in COUNTERS {
            counter.load(encoding);
            if counter == Counter::TiktokenRs && kind == "spaces" {
                let _ = write!(line, "  {}: over its whitespace limit", counter.name());
                continue;
            }
            let start = Instant::now();
            let tokens = counter.count(encoding, &text);
            let took = start.elapsed();
            let _ = write!(
                line,
                "  {}: {took:>8.1?} ({:>5.1} MiB/s, {tokens} tokens)",
                counter.name(),
                text.len() as f64 / MIB as f64 / took.as_secs_f64()
            );
        }
        println!("{line}");
    }
    println!();
}

/// Each counter's first count of 16 KiB of `latin_mix` (and of CJK) on three new threads in
/// turn: a regex builds its lazy DFA's states as input needs them, per cache, and a new thread
/// may get a new cache.
fn cold(_: &mut Criterion) {
    let encoding = Encoding::O200kBase;
    let texts = [
        ("latin_mix", latin_mix(&mut Rng(SEED ^ 9), INLINE_MAX_BYTES)),
        ("cjk", cjk(&mut Rng(SEED ^ 10), INLINE_MAX_BYTES)),
    ];
    println!("\ncold: first count of 16 KiB on a new thread, three threads in turn (o200k_base)");
    for (kind, text) in &texts {
        let mut line = format!("  {kind:10}");
        for counter in COUNTERS {
            counter.load(encoding);
            let firsts: Vec<String> = (0..3)
                .map(|_| {
                    std::thread::scope(|s| {
                        s.spawn(|| {
                            let start = Instant::now();
                            black_box(counter.count(encoding, text));
                            format!("{:.1?}", start.elapsed())
                        })
                        .join()
                        .expect("count thread")
                    })
                })
                .collect();
            let _ = write!(line, "  {}: {}", counter.name(), firsts.join(" / "));
        }
        println!("{line}");
    }
    println!();
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
    let mut cases: Vec<(String, String)> = adversarial(SEED ^ 3, INLINE_MAX_BYTES)
        .into_iter()
        .map(|(kind, text)| (format!("16 KiB {kind} (inline)"), text))
        .collect();
    let mut rng = Rng(SEED ^ 4);
    cases.push((
        "32 KiB no_space (blocking thread)".into(),
        no_space(&mut rng, 32 * KIB),
    ));
    cases.push((
        "1 MiB no_space (blocking thread)".into(),
        no_space(&mut rng, MIB),
    ));
    println!("\nreactor: longest gap of a 1 ms ticker while TokenCounter counts (1 worker)");
    for (label, text) in &cases {
        for encoding in ENCODINGS {
            encoding.tokenizer();
            let bytes = text.len();
            let (took, gap, tokens) = count_beside_ticker(encoding, text.clone());
            let tokens = match tokens {
                Ok(n) => format!("{n:>7} tokens"),
                Err(e) => format!("error ({e})"),
            };
            println!(
                "  {label:36} {:11} {tokens} in {took:>9.1?} ({:>6.2} MiB/s); \
                 longest tick gap {gap:.1?}",
                encoding.name(),
                bytes as f64 / MIB as f64 / took.as_secs_f64(),
            );
        }
    }
    println!();
}

criterion_group!(
    benches,
    load,
    cold,
    prompt_1k,
    real_1k,
    text_large,
    text_inline,
    worst,
    chat_50,
    at_4_mib,
    reactor_stall
);
criterion_main!(benches);
