//! Counting for requests, without stalling the async runtime.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{count_chat, count_text, ChatMessage, Encoding};

/// Inputs up to this many bytes, with their encoding loaded, are counted inline on the async
/// worker: at tiktoken's worst case (~0.3 s of CPU per MB, a long run without spaces) that is
/// under 5 ms, and usually tens of microseconds. Larger ones go to a blocking thread.
pub const INLINE_MAX_BYTES: usize = 16 * 1024;

/// A prompt as a request gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// The caller counted.
    Tokens(u64),
    /// Text to count.
    Text(String),
    /// Chat messages to count.
    Chat(Vec<ChatMessage>),
}

impl Prompt {
    /// Bytes of text to count (0 for a count).
    pub fn text_bytes(&self) -> usize {
        match self {
            Prompt::Tokens(_) => 0,
            Prompt::Text(t) => t.len(),
            Prompt::Chat(m) => m
                .iter()
                .map(|m| m.role.len() + m.content.len() + m.name.len())
                .sum(),
        }
    }
}

/// Why counting failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CountError {
    /// The tokenizer panicked on this input (a defect in it); the request fails, the service
    /// does not.
    #[error("the tokenizer failed on this input")]
    Tokenizer,
    /// The process is shutting down.
    #[error("token counting is shutting down")]
    Closed,
}

/// Counts prompts for requests.
///
/// Why a semaphore over `spawn_blocking`: tokio's blocking pool grows to hundreds of threads,
/// and a burst of megabyte prompts would then take every core; with one permit a core, big
/// prompts queue among themselves while small ones, counted inline, keep flowing.
#[derive(Debug, Clone)]
pub struct TokenCounter {
    permits: Arc<Semaphore>,
}

impl TokenCounter {
    /// A counter that runs at most `parallel` large counts at once.
    pub fn new(parallel: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(parallel.max(1))),
        }
    }

    /// A counter sized to the machine's cores.
    pub fn for_this_machine() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, usize::from))
    }

    /// Load `encodings` on blocking threads now, so the first requests do not pay for it.
    pub fn warm_up(&self, encodings: &[Encoding]) {
        for &e in encodings {
            tokio::task::spawn_blocking(move || {
                e.bpe();
            });
        }
    }

    /// The tokens of `prompt` under `encoding`.
    pub async fn count(&self, encoding: Encoding, prompt: Prompt) -> Result<u64, CountError> {
        if let Prompt::Tokens(n) = prompt {
            return Ok(n);
        }
        if prompt.text_bytes() <= INLINE_MAX_BYTES && encoding.is_loaded() {
            return guarded(encoding, &prompt);
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| CountError::Closed)?;
        tokio::task::spawn_blocking(move || guarded(encoding, &prompt))
            .await
            .map_err(|_| CountError::Tokenizer)?
    }
}

/// Count, turning a panic inside the tokenizer into an error for this request only.
fn guarded(encoding: Encoding, prompt: &Prompt) -> Result<u64, CountError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| match prompt {
        Prompt::Tokens(n) => *n,
        Prompt::Text(t) => count_text(encoding, t),
        Prompt::Chat(m) => count_chat(encoding, m),
    }))
    .map_err(|_| CountError::Tokenizer)
}
