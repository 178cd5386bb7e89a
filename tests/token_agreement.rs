//! bpe-openai, which tollgate counts o200k_base and cl100k_base with (`src/tokens/tokenizer.rs`),
//! against tiktoken-rs's `encode_ordinary`, which runs OpenAI tiktoken's own split pattern and
//! merge: on the committed vectors, on thousands of generated short texts mixing the characters
//! the split pattern treats differently (letter cases and case folding, marks, digits,
//! apostrophes, every kind of whitespace, CJK, emoji, special-token look-alikes, any code
//! point), and on the long runs where the two libraries work most differently (bpe-openai
//! rewrites tiktoken's `\s+(?!\S)` without a look-ahead). `tests/token_vectors.rs` checks
//! the same counts against tiktoken itself, through the server.

use std::collections::BTreeMap;

use serde::Deserialize;
use tiktoken_rs::CoreBPE;
use tollgate::tokens::{count_text, Encoding, MAX_WHITESPACE_RUN};

/// SplitMix64: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// Fragments whose neighbours decide how the split pattern cuts: its classes (letters by case,
/// marks, numbers, other), its contractions, and its whitespace rules (`\s*[\r\n]+`,
/// `\s+(?!\S)`, `\s+`).
#[rustfmt::skip]
const FRAGMENTS: &[&str] = &[
    "a", "z", "A", "Z", "the", "The", "THE", "ing", "Hello", "hELLO", "ǅ", "ǆ", "ᾈ", "ʰ", "ß", "ẞ",
    "ſ", "\u{212a}", "İ", "ı", "ﬁ", "Ǆ", "'ſ", "'ᴅ",
    "é", "e\u{301}", "\u{300}", "Ä", "ก", "\u{e31}", "мир", "Мир", "مرحبا", "नमस्ते", "Ω",
    "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'LL", "'d", "'", "’s", "`",
    "0", "7", "12", "123", "2026", "٣", "½", "²", "Ⅻ",
    " ", " ", " ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", "\t\n", "    ",
    "\u{a0}", "\u{3000}", "\u{2003}", "\u{85}", "\u{2028}", "\u{b}", "\u{c}",
    ".", ",", "!", "?", "/", "//", "-", "_", "(", ")", "{", "}", "...", "->", "==", "#",
    "<|endoftext|>", "<|im_start|>", "<|", "|>", "<|fim_prefix|>",
    "中", "文", "日本", "カタカナ", "ｶ", "한국", "😀", "👨\u{200d}👩\u{200d}👧", "🇺🇸", "1️⃣",
    "\u{200b}", "\u{feff}", "\u{0}", "\u{7f}", "\u{10ffff}", "\u{e000}",
];

fn random_text(rng: &mut Rng, parts: usize) -> String {
    let mut s = String::new();
    for _ in 0..parts {
        if rng.below(6) == 0 {
            // Any code point, weighted towards the smaller planes.
            let limit = [0x800, 0x1_0000, 0x11_0000][rng.below(3)];
            s.extend(char::from_u32(rng.below(limit) as u32));
        } else {
            s.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]);
        }
    }
    s
}

fn reference(encoding: Encoding) -> &'static CoreBPE {
    match encoding {
        Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
        Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        other => panic!("{} is counted by tiktoken-rs itself", other.name()),
    }
}

/// bpe-openai's count of `text`, and tollgate's.
fn counts(encoding: Encoding, text: &str) -> [(&'static str, u64); 2] {
    let bpe = match encoding {
        Encoding::O200kBase => bpe_openai::o200k_base(),
        _ => bpe_openai::cl100k_base(),
    };
    [
        ("bpe-openai", bpe.count(text) as u64),
        ("count_text", count_text(encoding, text)),
    ]
}

/// Every disagreement with tiktoken-rs, as (encoding, library, text, its count, tiktoken-rs's).
type Disagreement = (&'static str, &'static str, String, u64, u64);

fn disagreements<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<Disagreement> {
    let texts: Vec<&str> = texts.into_iter().collect();
    let mut out = Vec::new();
    for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
        for text in &texts {
            let want = reference(encoding).encode_ordinary(text).len() as u64;
            for (library, got) in counts(encoding, text) {
                if got != want {
                    let shown: String = text.chars().take(200).collect();
                    out.push((encoding.name(), library, shown, got, want));
                }
            }
        }
    }
    out
}

#[derive(Deserialize)]
struct Vectors {
    texts: Vec<TextVector>,
}

#[derive(Deserialize)]
struct TextVector {
    id: String,
    text: String,
    counts: BTreeMap<String, u64>,
}

#[test]
fn every_vector_through_bpe_openai() {
    let v: Vectors = serde_json::from_str(include_str!("vectors/tokens.json")).expect("vectors");
    let mut bad = Vec::new();
    for t in &v.texts {
        for (model, encoding) in [
            ("gpt-4o", Encoding::O200kBase),
            ("gpt-4", Encoding::Cl100kBase),
        ] {
            let want = t.counts[model];
            for (library, got) in counts(encoding, &t.text) {
                if got != want {
                    bad.push(format!(
                        "{} {model} {library}: {got}, tiktoken {want}",
                        t.id
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(v.texts.len() >= 40);
}

#[test]
fn counts_equal_tiktoken_on_generated_mixed_text() {
    let mut rng = Rng(0x70_11_6a_7e);
    let texts: Vec<String> = (0..6_000)
        .map(|i| {
            let parts = 1 + rng.below(if i % 10 == 0 { 300 } else { 24 });
            random_text(&mut rng, parts)
        })
        .collect();
    let bad = disagreements(texts.iter().map(String::as_str));
    assert!(
        bad.is_empty(),
        "{} of {} counts differ; first: {:?}",
        bad.len(),
        4 * texts.len(),
        &bad[..bad.len().min(5)]
    );
}

#[test]
fn counts_equal_tiktoken_on_long_runs() {
    let mut rng = Rng(7);
    let letters: String = (0..64 * 1024)
        .map(|_| char::from(b'a' + rng.below(26) as u8))
        .collect();
    let cjk: String = (0..20_000)
        .map(|_| char::from_u32(0x4E00 + rng.below(20_000) as u32).unwrap())
        .collect();
    let punctuation: String = (0..50_000)
        .map(|_| char::from(b"!#$%&*+-<=>@^|~;:"[rng.below(17)]))
        .collect();
    let whitespace: String = (0..50_000)
        .map(|_| [' ', '\t', '\n', '\r', '\u{a0}', '\u{3000}'][rng.below(6)])
        .collect();
    let texts = vec![
        letters.clone(),
        letters.to_uppercase(),
        cjk,
        punctuation,
        format!("a{whitespace}b"),
        whitespace,
        "7".repeat(30_001),
        // The longest whitespace run tiktoken-rs can split, between words and at the end:
        // bpe-openai rewrites `\s+(?!\S)` without look-ahead, and this is where it shows.
        format!("x{}y", " ".repeat(MAX_WHITESPACE_RUN - 2)),
        format!("x{}", "\t".repeat(MAX_WHITESPACE_RUN - 1)),
    ];
    let bad = disagreements(texts.iter().map(String::as_str));
    assert!(bad.is_empty(), "{:?}", bad);
}

/// What lets `tests/counting.rs` know the count of a whitespace run too long for tiktoken
/// itself: both encodings' longest run-of-spaces token is 128 spaces, and 128 more spaces in
/// a run always cost exactly one more token.
#[test]
fn a_run_of_spaces_costs_one_more_token_per_128_more_spaces() {
    for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
        let reference = reference(encoding);
        let count = |run: usize| {
            reference
                .encode_ordinary(&format!("a{}b", " ".repeat(run)))
                .len()
        };
        for run in (1..300).chain([1_000, 4_097, 77_777, 871_873]) {
            assert_eq!(
                count(run + 128),
                count(run) + 1,
                "{} {run}",
                encoding.name()
            );
            assert_eq!(
                count(run + 5 * 128),
                count(run) + 5,
                "{} {run}",
                encoding.name()
            );
        }
    }
}
