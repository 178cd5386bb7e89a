//! Which library counts each encoding, and the one input one of them cannot count.
//!
//! Why two libraries, both giving OpenAI tiktoken's counts (checked on the committed vectors by
//! `tests/token_vectors.rs`, and against tiktoken-rs on generated text by
//! `tests/token_agreement.rs`); the figures are in BENCHMARKS.md:
//! - o200k_base and cl100k_base (every model in the built-in table): GitHub's `bpe-openai`.
//!   Its merge is linear in the input and its split pattern a DFA: 1.3-4x faster than
//!   tiktoken-rs on ordinary text, 3-50x on one unbroken run, and no whitespace run is too
//!   long. (The `tiktoken` crate is faster still on ordinary text once warm, but its regex
//!   costs 0.2-0.5 s on a thread's first 16 KiB of non-ASCII text, and it is nearly as slow
//!   as tiktoken-rs on long runs: measured in `benches/counting.rs`, not used.)
//! - p50k_base and r50k_base (only reachable through a policy's `[models."NAME"] encoding`),
//!   which bpe-openai does not ship: tiktoken-rs, as before. Its split pattern needs a
//!   backtracking regex, hence [`MAX_WHITESPACE_RUN`].

use tiktoken_rs::CoreBPE;

use super::Encoding;

/// The longest run of whitespace tiktoken-rs is given. tiktoken's pre-tokenizing pattern
/// (`\s+(?!\S)`) overflows its backtracking regex's stack on a whitespace run of about a
/// million characters; no real prompt holds one, so a longer run is refused up front with a
/// clear error rather than failing inside the tokenizer. bpe-openai has no such limit.
pub const MAX_WHITESPACE_RUN: usize = 900_000;

/// A loaded tokenizer: what counts one encoding.
pub enum Tokenizer {
    /// bpe-openai: linear time, no input it cannot count.
    Linear(&'static bpe_openai::Tokenizer),
    /// tiktoken-rs: for the encodings bpe-openai does not ship.
    Tiktoken(CoreBPE),
}

impl Tokenizer {
    /// Load `encoding`'s tokenizer from the data compiled into the binary (tens of
    /// milliseconds: see [`Encoding::tokenizer`], which does it once per process). It cannot
    /// fail at run time; a failure is a build defect.
    pub(super) fn load(encoding: Encoding) -> Self {
        const SHIPPED: &str = "the encodings shipped inside tiktoken-rs load";
        match encoding {
            Encoding::O200kBase => Tokenizer::Linear(bpe_openai::o200k_base()),
            Encoding::Cl100kBase => Tokenizer::Linear(bpe_openai::cl100k_base()),
            Encoding::P50kBase => Tokenizer::Tiktoken(tiktoken_rs::p50k_base().expect(SHIPPED)),
            Encoding::R50kBase => Tokenizer::Tiktoken(tiktoken_rs::r50k_base().expect(SHIPPED)),
        }
    }

    /// Tokens of `text`, everything ordinary text: neither library is asked to recognise
    /// special tokens (bpe-openai knows none), so `<|endoftext|>` counts as the characters it
    /// is.
    pub fn count(&self, text: &str) -> usize {
        match self {
            Tokenizer::Linear(t) => t.count(text),
            Tokenizer::Tiktoken(t) => t.encode_ordinary(text).len(),
        }
    }

    /// Which library this is, for diagnostics.
    pub fn library(&self) -> &'static str {
        match self {
            Tokenizer::Linear(_) => "bpe-openai",
            Tokenizer::Tiktoken(_) => "tiktoken-rs",
        }
    }
}

/// The longest whitespace run `encoding`'s tokenizer can split, if it has a limit. Known
/// without loading it, so a request can be checked before the load.
pub fn max_whitespace_run(encoding: Encoding) -> Option<usize> {
    match encoding {
        Encoding::O200kBase | Encoding::Cl100kBase => None,
        Encoding::P50kBase | Encoding::R50kBase => Some(MAX_WHITESPACE_RUN),
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.library())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whitespace_limit_is_that_of_the_library_loaded() {
        for e in crate::tokens::ALL_ENCODINGS {
            let limited = matches!(e.tokenizer(), Tokenizer::Tiktoken(_));
            assert_eq!(max_whitespace_run(e).is_some(), limited, "{}", e.name());
        }
    }
}
