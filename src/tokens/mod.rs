//! Token counting on the server, with the model's own tokenizer, so callers in any language
//! need no tokenizer of their own.
//!
//! - [`Encoding`]: the BPE encodings, each loaded once per process and shared.
//! - [`Tokenizer`]: which library counts which encoding (bpe-openai, linear time, for
//!   o200k_base and cl100k_base; tiktoken-rs for the others), and the one input tiktoken-rs
//!   cannot count.
//! - [`built_in_encoding`]: model name to encoding, after OpenAI's table.
//! - [`count_text`], [`count_chat`]: the counting rules.
//! - [`TokenCounter`]: counts for requests: small inputs inline, large ones on blocking threads
//!   with bounded concurrency, so a 4 MiB prompt never stalls small requests.

mod count;
mod counter;
mod encoding;
mod models;
mod tokenizer;

pub use count::{
    check_countable, count_chat, count_text, ChatMessage, Uncountable, REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE, TOKENS_PER_NAME,
};
pub use counter::{CountError, Prompt, TokenCounter, INLINE_MAX_BYTES, WAITING_PER_CORE};
pub use encoding::{Encoding, ALL as ALL_ENCODINGS};
pub use models::built_in_encoding;
pub use tokenizer::{Tokenizer, MAX_WHITESPACE_RUN};
