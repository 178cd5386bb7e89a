//! The BPE encodings tollgate can count with, each loaded at most once per process.

use std::sync::OnceLock;

use super::tokenizer::Tokenizer;

/// A tokenizer encoding, by its tiktoken name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-5, o1, o3, o4.
    O200kBase,
    /// GPT-4, GPT-3.5-turbo, text-embedding-3.
    Cl100kBase,
    /// Codex-era models.
    P50kBase,
    /// GPT-3-era models.
    R50kBase,
}

/// Every encoding, for listing and validation.
pub const ALL: [Encoding; 4] = [
    Encoding::O200kBase,
    Encoding::Cl100kBase,
    Encoding::P50kBase,
    Encoding::R50kBase,
];

static O200K: OnceLock<Tokenizer> = OnceLock::new();
static CL100K: OnceLock<Tokenizer> = OnceLock::new();
static P50K: OnceLock<Tokenizer> = OnceLock::new();
static R50K: OnceLock<Tokenizer> = OnceLock::new();

impl Encoding {
    /// The tiktoken name.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::P50kBase => "p50k_base",
            Encoding::R50kBase => "r50k_base",
        }
    }

    /// The encoding of a tiktoken name.
    pub fn from_name(name: &str) -> Option<Self> {
        ALL.into_iter().find(|e| e.name() == name)
    }

    fn cell(self) -> &'static OnceLock<Tokenizer> {
        match self {
            Encoding::O200kBase => &O200K,
            Encoding::Cl100kBase => &CL100K,
            Encoding::P50kBase => &P50K,
            Encoding::R50kBase => &R50K,
        }
    }

    /// Whether the encoding is already loaded (so using it costs no load).
    pub fn is_loaded(self) -> bool {
        self.cell().get().is_some()
    }

    /// The tokenizer, loading it on first use (under 0.1 s for o200k_base: call from a
    /// blocking context, or after [`Self::is_loaded`]).
    pub fn tokenizer(self) -> &'static Tokenizer {
        self.cell().get_or_init(|| Tokenizer::load(self))
    }
}
