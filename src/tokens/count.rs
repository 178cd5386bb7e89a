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
