//! Counting: text as ordinary text, chats as the chat API counts them.

use super::Encoding;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// system, user, assistant, tool, ...
    pub role: String,
    /// The text.
    pub content: String,
    /// The optional participant name (empty: none).
    pub name: String,
}

/// Tokens every chat message costs besides its role and content (the message framing).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens a `name` costs besides its own text.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the assistant's reply, once per chat.
pub const REPLY_PRIMING_TOKENS: u64 = 3;

/// The longest run of whitespace the tokenizer is given. tiktoken's pre-tokenizing pattern
/// (`\s+(?!\S)`) overflows its regex engine's stack on a whitespace run of about a million
/// characters; no real prompt holds one, so a longer run is refused up front with a clear error
/// rather than failing inside the tokenizer.
pub const MAX_WHITESPACE_RUN: usize = 900_000;

/// Why a text cannot be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("it holds a run of more than {MAX_WHITESPACE_RUN} whitespace characters, which the tokenizer cannot split; shorten the run, or send prompt_tokens")]
pub struct Uncountable;

/// Check that `text` is within what the tokenizer can split. O(n), no allocation.
pub fn check_countable(text: &str) -> Result<(), Uncountable> {
    let mut run = 0usize;
    for c in text.chars() {
        if c.is_whitespace() {
            run += 1;
            if run > MAX_WHITESPACE_RUN {
                return Err(Uncountable);
            }
        } else {
            run = 0;
        }
    }
    Ok(())
}

/// Tokens of `text`. Everything is ordinary text: a `<|endoftext|>` inside a prompt is user
/// input, not a special token, and is counted as the characters it is.
pub fn count_text(encoding: Encoding, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    encoding.bpe().encode_ordinary(text).len() as u64
}

/// Tokens of a chat, as OpenAI documents for its chat models: each message costs
/// 3 + tokens(role) + tokens(content), a name adds tokens(name) + 1, and the reply is primed
/// with 3 more.
pub fn count_chat(encoding: Encoding, messages: &[ChatMessage]) -> u64 {
    let mut total = REPLY_PRIMING_TOKENS;
    for m in messages {
        total +=
            TOKENS_PER_MESSAGE + count_text(encoding, &m.role) + count_text(encoding, &m.content);
        if !m.name.is_empty() {
            total += count_text(encoding, &m.name) + TOKENS_PER_NAME;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_known_texts() {
        // Reference counts from OpenAI's tiktoken.
        assert_eq!(count_text(Encoding::O200kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::O200kBase, ""), 0);
    }

    #[test]
    fn whitespace_runs_past_the_tokenizer_limit_are_refused_up_front() {
        let at_limit = " ".repeat(MAX_WHITESPACE_RUN);
        assert_eq!(check_countable(&at_limit), Ok(()));
        assert!(count_text(Encoding::O200kBase, &at_limit) > 0);
        let over = format!("word{} word", "\t".repeat(MAX_WHITESPACE_RUN + 1));
        assert_eq!(check_countable(&over), Err(Uncountable));
        // Long runs of anything else are fine (a million letters is one word to the tokenizer).
        assert_eq!(check_countable(&"a".repeat(MAX_WHITESPACE_RUN * 2)), Ok(()));
    }

    #[test]
    fn special_token_look_alikes_are_text() {
        let n = count_text(Encoding::Cl100kBase, "<|endoftext|>");
        assert!(n > 1, "counted as text, not as one special token: {n}");
    }

    #[test]
    fn chat_adds_framing_names_and_priming() {
        let msg = |role: &str, content: &str, name: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
            name: name.into(),
        };
        let e = Encoding::O200kBase;
        assert_eq!(count_chat(e, &[]), 3);
        let one = count_chat(e, &[msg("user", "hello world", "")]);
        assert_eq!(one, 3 + 3 + count_text(e, "user") + 2);
        let named = count_chat(e, &[msg("user", "hello world", "ann")]);
        assert_eq!(named, one + count_text(e, "ann") + 1);
    }
}
