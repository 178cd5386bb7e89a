//! Every request field checked for shape and bounds before the engine is reached. A failure
//! names the field and the rule, and nothing has changed.

use tonic::Status;

use crate::engine::{ReservationId, ReserveInput, Usage};
use crate::policy::HOLD_SECONDS_CEILING;
use crate::proto;
use crate::tokens::{ChatMessage, Prompt};

/// Longest subject, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// Longest model name, in bytes.
pub const MAX_MODEL_BYTES: usize = crate::policy::MAX_MODEL_NAME_BYTES;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
pub use crate::policy::MAX_TOKENS_PER_REQUEST;

fn invalid(field: &str, rule: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {rule}"))
}

fn check_text(field: &str, value: &str, max: usize, required: bool) -> Result<(), Status> {
    if value.is_empty() && required {
        return Err(invalid(field, "is required and must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(
            field,
            format!("must be at most {max} bytes (got {})", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A subject: 1 to 256 bytes of UTF-8 without control characters.
pub fn subject(value: &str) -> Result<(), Status> {
    check_text("subject", value, MAX_SUBJECT_BYTES, true)
}

/// A model name: up to 128 bytes without control characters.
pub fn model(value: &str) -> Result<(), Status> {
    check_text("model", value, MAX_MODEL_BYTES, false)
}

/// Longest group name, in bytes.
pub const MAX_GROUP_BYTES: usize = 256;

/// A group: empty (none) or up to 256 bytes without control characters.
pub fn group(value: &str) -> Result<Option<String>, Status> {
    check_text("group", value, MAX_GROUP_BYTES, false)?;
    Ok((!value.is_empty()).then(|| value.to_string()))
}

/// A client IP: empty (none) or an IPv4 or IPv6 address, returned as the address it is counted
/// under (IPv6: its /64).
pub fn client_ip(value: &str) -> Result<Option<std::net::IpAddr>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > 64 {
        return Err(invalid("client_ip", "must be at most 64 bytes"));
    }
    value
        .parse::<std::net::IpAddr>()
        .map(|ip| Some(crate::policy::ip_scope_key(ip)))
        .map_err(|_| {
            invalid(
                "client_ip",
                format!("{value:?} is not an IPv4 or IPv6 address (e.g. \"203.0.113.7\" or \"2001:db8::1\")"),
            )
        })
}

/// Most entries in `prompt_tokens_for` (one per downgrade model of a policy, in practice few).
pub const MAX_PROMPT_TOKENS_FOR: usize = 16;

/// The counts a relay made for other models: at most 16, each a model name and a token count
/// within bounds, and only beside `prompt_tokens` (a text prompt is counted here).
fn prompt_tokens_for(
    entries: &[proto::ModelTokens],
    prompt_tokens: Option<u64>,
) -> Result<Vec<(String, u64)>, Status> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    if prompt_tokens.is_none() {
        return Err(invalid(
            "prompt_tokens_for",
            "may be given only with prompt_tokens (a prompt sent as text is counted here)",
        ));
    }
    if entries.len() > MAX_PROMPT_TOKENS_FOR {
        return Err(invalid(
            "prompt_tokens_for",
            format!(
                "must have at most {MAX_PROMPT_TOKENS_FOR} entries (got {})",
                entries.len()
            ),
        ));
    }
    entries
        .iter()
        .map(|e| {
            check_text("prompt_tokens_for.model", &e.model, MAX_MODEL_BYTES, true)?;
            Ok((
                e.model.clone(),
                tokens("prompt_tokens_for.tokens", e.tokens)?,
            ))
        })
        .collect()
}

/// A GetUsage request, checked: an empty subject means none (the group's, the IP's or the
/// fleet's usage).
pub fn usage_query(req: &proto::GetUsageRequest) -> Result<crate::engine::UsageQuery, Status> {
    let subject = if req.subject.is_empty() {
        None
    } else {
        subject(&req.subject)?;
        Some(req.subject.clone())
    };
    Ok(crate::engine::UsageQuery {
        subject,
        group: group(&req.group)?,
        client_ip: client_ip(&req.client_ip)?,
    })
}

/// A tier name as given to SetSubject.
pub fn tier(value: &str) -> Result<(), Status> {
    check_text("tier", value, 64, true)
}

fn tokens(field: &str, value: u64) -> Result<u64, Status> {
    if value > MAX_TOKENS_PER_REQUEST {
        return Err(invalid(
            field,
            format!("must be at most {MAX_TOKENS_PER_REQUEST} (got {value})"),
        ));
    }
    Ok(value)
}

fn duration_us(field: &str, d: &prost_types::Duration) -> Result<u64, Status> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(invalid(field, "must be a positive duration"));
    }
    let secs = u64::try_from(d.seconds).unwrap_or(u64::MAX);
    if secs > HOLD_SECONDS_CEILING {
        return Err(invalid(
            field,
            format!("must be at most {HOLD_SECONDS_CEILING} seconds"),
        ));
    }
    let us = secs * 1_000_000 + u64::try_from(d.nanos).unwrap_or(0) / 1_000;
    if us == 0 {
        return Err(invalid(field, "must be longer than zero"));
    }
    Ok(us)
}

/// Most messages in one chat.
pub const MAX_MESSAGES: usize = 10_000;
/// Longest `role` or `name` of a chat message, in bytes.
pub const MAX_ROLE_BYTES: usize = 64;
/// Default bound on the text of one prompt (or the roles, contents and names of one chat).
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 4 * 1024 * 1024;

/// A Reserve, checked, before its prompt is counted.
#[derive(Debug, Clone)]
pub struct ReserveCall {
    /// Everything but the prompt count and output hold.
    pub input: ReserveInput,
    /// The prompt in the form given.
    pub prompt: Prompt,
    /// `max_output_tokens`, if given.
    pub max_output_tokens: Option<u64>,
}

/// The prompt of a request: exactly one of a count, a text or a chat.
///
/// `prompt_tokens` is `None` for a request that has no such field (CountTokens): the error
/// then names only the fields it has.
pub fn prompt(
    prompt_tokens: Option<Option<u64>>,
    text: Option<String>,
    messages: Vec<proto::ChatMessage>,
    model: &str,
    max_prompt_bytes: usize,
) -> Result<Prompt, Status> {
    let counted = prompt_tokens.flatten();
    let given = usize::from(counted.is_some())
        + usize::from(text.is_some())
        + usize::from(!messages.is_empty());
    if given != 1 {
        return Err(invalid(
            "prompt",
            match prompt_tokens {
                Some(_) => {
                    format!("give exactly one of prompt_tokens, prompt or messages (got {given})")
                }
                None => "give exactly one of prompt or messages".to_string(),
            },
        ));
    }
    let prompt_tokens = counted;
    let prompt = match (prompt_tokens, text) {
        (Some(n), _) => Prompt::Tokens(tokens("prompt_tokens", n)?),
        (None, Some(t)) => Prompt::Text(t),
        (None, None) => {
            if messages.len() > MAX_MESSAGES {
                return Err(invalid(
                    "messages",
                    format!(
                        "must be at most {MAX_MESSAGES} messages (got {})",
                        messages.len()
                    ),
                ));
            }
            let mut chat = Vec::with_capacity(messages.len());
            for (i, m) in messages.into_iter().enumerate() {
                check_text(
                    &format!("messages[{i}].role"),
                    &m.role,
                    MAX_ROLE_BYTES,
                    true,
                )?;
                check_text(
                    &format!("messages[{i}].name"),
                    &m.name,
                    MAX_ROLE_BYTES,
                    false,
                )?;
                chat.push(ChatMessage {
                    role: m.role,
                    content: m.content,
                    name: m.name,
                });
            }
            Prompt::Chat(chat)
        }
    };
    let bytes = prompt.text_bytes();
    if bytes > max_prompt_bytes {
        let field = if matches!(prompt, Prompt::Text(_)) {
            "prompt"
        } else {
            "messages"
        };
        return Err(invalid(
            field,
            format!("must be at most {max_prompt_bytes} bytes of text (got {bytes}); the server's --max-prompt-bytes sets this"),
        ));
    }
    if !matches!(prompt, Prompt::Tokens(_)) && model.is_empty() {
        return Err(invalid(
            "model",
            "is required when the prompt is given as text or messages (it picks the tokenizer)",
        ));
    }
    Ok(prompt)
}

/// A Reserve request, checked.
pub fn reserve(req: proto::ReserveRequest, max_prompt_bytes: usize) -> Result<ReserveCall, Status> {
    subject(&req.subject)?;
    check_text("model", &req.model, MAX_MODEL_BYTES, false)?;
    check_text(
        "idempotency_key",
        &req.idempotency_key,
        MAX_IDEMPOTENCY_KEY_BYTES,
        false,
    )?;
    let max_output_tokens = req
        .max_output_tokens
        .map(|n| tokens("max_output_tokens", n))
        .transpose()?;
    let hold_us = req
        .hold
        .as_ref()
        .map(|d| duration_us("hold", d))
        .transpose()?;
    let group = group(&req.group)?;
    let client_ip = client_ip(&req.client_ip)?;
    let prompt_tokens_for = prompt_tokens_for(&req.prompt_tokens_for, req.prompt_tokens)?;
    let prompt = prompt(
        Some(req.prompt_tokens),
        req.prompt,
        req.messages,
        &req.model,
        max_prompt_bytes,
    )?;
    Ok(ReserveCall {
        input: ReserveInput {
            caller: None,
            subject: req.subject,
            model: req.model,
            prompt_tokens: 0,
            prompt_tokens_for,
            group,
            client_ip,
            max_output_tokens: 0,
            idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
            hold_us,
            dry_run: req.dry_run,
            id: ReservationId(0),
        },
        prompt,
        max_output_tokens,
    })
}

/// The hold of a Reserve whose prompt is counted: prompt + output within the per-request bound.
pub fn hold_total(prompt_tokens: u64, max_output_tokens: u64) -> Result<(), Status> {
    if prompt_tokens.saturating_add(max_output_tokens) > MAX_TOKENS_PER_REQUEST {
        return Err(invalid(
            "max_output_tokens",
            format!("prompt_tokens + max_output_tokens must be at most {MAX_TOKENS_PER_REQUEST} (got {prompt_tokens} + {max_output_tokens})"),
        ));
    }
    Ok(())
}

/// The `hold` of an Extend: required and positive.
pub fn required_hold(hold: Option<&prost_types::Duration>) -> Result<u64, Status> {
    match hold {
        Some(d) => duration_us("hold", d),
        None => Err(invalid(
            "hold",
            "is required (how long the hold must live from now)",
        )),
    }
}

/// A reservation id as returned by Reserve.
pub fn reservation_id(value: &str) -> Result<ReservationId, Status> {
    if value.is_empty() {
        return Err(invalid(
            "reservation_id",
            "is required and must not be empty",
        ));
    }
    value.parse().map_err(|_| {
        invalid(
            "reservation_id",
            "must be a reservation id as returned by Reserve (a 36-character UUID)",
        )
    })
}

/// A Commit request, checked.
pub fn commit(req: &proto::CommitRequest) -> Result<(ReservationId, Usage), Status> {
    let id = reservation_id(&req.reservation_id)?;
    let prompt_tokens = tokens("prompt_tokens", req.prompt_tokens)?;
    let completion_tokens = tokens("completion_tokens", req.completion_tokens)?;
    if req.usage_unknown && (prompt_tokens != 0 || completion_tokens != 0) {
        return Err(invalid(
            "usage_unknown",
            "when set, prompt_tokens and completion_tokens must be 0 (the full hold is charged)",
        ));
    }
    Ok((
        id,
        Usage {
            prompt_tokens,
            completion_tokens,
            usage_unknown: req.usage_unknown,
        },
    ))
}
