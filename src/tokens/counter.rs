//! Counting for requests, without stalling the async runtime.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{check_countable, count_chat, count_text, ChatMessage, Encoding};

/// Inputs up to this many bytes, with their encoding loaded, are counted inline on the async
/// worker; larger ones go to a blocking thread. Measured on the project's 2-core machine (see
/// BENCHMARKS.md): with bpe-openai, 16 KiB of ordinary text takes about 0.6-0.9 ms and the
/// worst 16 KiB (one unbroken run of letters) about 1.5-1.9 ms, against 3-5 ms with
/// tiktoken-rs before (a run of spaces). Kept at 16 KiB rather than raised: a larger prompt
/// costs only a hand-off to a blocking thread, and the lower bound on a worker's stall is
/// worth more.
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
    /// The text is beyond what the tokenizer can split (see [`super::check_countable`]).
    #[error(transparent)]
    Uncountable(#[from] super::Uncountable),
    /// The tokenizer panicked on this input (a defect in it); the request fails, the service
    /// does not.
    #[error("the tokenizer failed on this input")]
    Tokenizer,
    /// The process is shutting down.
    #[error("token counting is shutting down")]
    Closed,
    /// Too many large prompts are waiting to be counted; retry shortly.
    #[error("{0} large prompts are already waiting to be counted; retry shortly")]
    Busy(usize),
}

/// Counts prompts for requests.
///
/// Why a semaphore over `spawn_blocking`: tokio's blocking pool grows to hundreds of threads,
/// and a burst of megabyte prompts would then take every core; with one permit a core, big
/// prompts queue among themselves while small ones, counted inline, keep flowing.
///
/// Why a bound on waiting too: each waiting request holds its prompt (up to the prompt bound,
/// 4 MiB by default) in memory, so at most [`WAITING_PER_CORE`] per core may wait; beyond that
/// a request is refused at once (RESOURCE_EXHAUSTED) rather than memory growing.
#[derive(Debug, Clone)]
pub struct TokenCounter {
    permits: Arc<Semaphore>,
    waiting: Arc<Semaphore>,
    waiting_bound: usize,
}

/// Large prompts that may wait for a counting thread, per core.
pub const WAITING_PER_CORE: usize = 16;

impl TokenCounter {
    /// A counter that runs at most `parallel` large counts at once, with at most
    /// `parallel * WAITING_PER_CORE` waiting.
    pub fn new(parallel: usize) -> Self {
        let parallel = parallel.max(1);
        let waiting_bound = parallel * WAITING_PER_CORE;
        Self {
            permits: Arc::new(Semaphore::new(parallel)),
            waiting: Arc::new(Semaphore::new(waiting_bound)),
            waiting_bound,
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
                e.tokenizer();
            });
        }
    }

    /// The tokens of `prompt` under `encoding`.
    pub async fn count(&self, encoding: Encoding, prompt: Prompt) -> Result<u64, CountError> {
        if let Prompt::Tokens(n) = prompt {
            return Ok(n);
        }
        match &prompt {
            Prompt::Text(t) => check_countable(encoding, t)?,
            Prompt::Chat(messages) => {
                for m in messages {
                    check_countable(encoding, &m.content)?;
                }
            }
            Prompt::Tokens(_) => {}
        }
        if prompt.text_bytes() <= INLINE_MAX_BYTES && encoding.is_loaded() {
            return guarded(encoding, &prompt);
        }
        let _place = self
            .waiting
            .try_acquire()
            .map_err(|_| CountError::Busy(self.waiting_bound))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_prompts_wait_within_a_bound_and_small_ones_do_not_wait() {
        let counter = TokenCounter::new(1);
        Encoding::O200kBase.tokenizer();
        // Occupy the only counting thread.
        let busy = counter.permits.clone().acquire_owned().await.unwrap();
        let big = Prompt::Text("word ".repeat(INLINE_MAX_BYTES));
        let mut waiters = Vec::new();
        for _ in 0..WAITING_PER_CORE {
            let (c, p) = (counter.clone(), big.clone());
            waiters.push(tokio::spawn(async move {
                c.count(Encoding::O200kBase, p).await
            }));
        }
        while counter.waiting.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        // The waiting room is full: the next large prompt is refused at once ...
        assert_eq!(
            counter.count(Encoding::O200kBase, big.clone()).await,
            Err(CountError::Busy(WAITING_PER_CORE))
        );
        // ... while a small one is still counted inline.
        let small = Prompt::Text("hello world".into());
        assert_eq!(counter.count(Encoding::O200kBase, small).await, Ok(2));
        drop(busy);
        let expected = count_text(Encoding::O200kBase, &"word ".repeat(INLINE_MAX_BYTES));
        for w in waiters {
            assert_eq!(w.await.unwrap(), Ok(expected));
        }
    }
}
