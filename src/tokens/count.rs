//! Counting: text as ordinary text, chats as the chat API counts them.

use super::tokenizer::max_whitespace_run;
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

/// Why a text cannot be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("it holds a run of more than {max} whitespace characters, which the {encoding} tokenizer cannot split; shorten the run, or send prompt_tokens")]
pub struct Uncountable {
    /// The encoding's name.
    pub encoding: &'static str,
    /// The longest whitespace run it can split.
    pub max: usize,
}

/// Check that `text` is within what `encoding`'s tokenizer can split: only tiktoken-rs has a
/// limit (see [`super::MAX_WHITESPACE_RUN`]). O(n), no allocation, and nothing at all for the
/// encodings without one.
pub fn check_countable(encoding: Encoding, text: &str) -> Result<(), Uncountable> {
    let Some(max) = max_whitespace_run(encoding) else {
        return Ok(());
    };
    let mut run = 0usize;
    for c in text.chars() {
        if c.is_whitespace() {
            run += 1;
            if run > max {
                return Err(Uncountable {
                    encoding: encoding.name(),
                    max,
                });
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
    encoding.tokenizer().count(text) as u64
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
    use crate::tokens::MAX_WHITESPACE_RUN;

    #[test]
    fn counts_known_texts() {
        // Reference counts from OpenAI's tiktoken.
        assert_eq!(count_text(Encoding::O200kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::O200kBase, ""), 0);
    }

    #[test]
    fn only_tiktoken_rs_refuses_whitespace_runs_past_its_limit() {
        let at_limit = " ".repeat(MAX_WHITESPACE_RUN);
        let over = format!("word{} word", "\t".repeat(MAX_WHITESPACE_RUN + 1));
        for e in [Encoding::P50kBase, Encoding::R50kBase] {
            assert_eq!(check_countable(e, &at_limit), Ok(()));
            let refused = check_countable(e, &over).unwrap_err();
            assert_eq!(
                (refused.encoding, refused.max),
                (e.name(), MAX_WHITESPACE_RUN)
            );
            // Long runs of anything else are fine (a million letters is one word to it).
            assert_eq!(
                check_countable(e, &"a".repeat(MAX_WHITESPACE_RUN * 2)),
                Ok(())
            );
        }
        assert!(count_text(Encoding::R50kBase, &at_limit) > 0);
        // The libraries counting these split with a DFA: any run is counted.
        for e in [Encoding::O200kBase, Encoding::Cl100kBase] {
            assert_eq!(check_countable(e, &over), Ok(()));
            assert!(count_text(e, &over) > 2);
        }
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
