//! Counting a request's prompt before the engine lock: for the model asked for, and for each
//! downgrade model of the policy whose tokenizer differs. Shared by the ledger's Quota service
//! and the relay, which counts locally so the CPU-heavy part scales with the app pods.

use tonic::Status;

use super::validate::{self, ReserveCall};
use crate::engine::ReserveInput;
use crate::policy::Policy;
use crate::proto;
use crate::tokens::{CountError, Encoding, Prompt, TokenCounter};

/// Counts prompts with the machine's tokenizer pool (see [`TokenCounter`]).
#[derive(Debug, Clone)]
pub struct PromptCounter {
    counter: TokenCounter,
}

impl PromptCounter {
    /// A counter over `counter`.
    pub fn new(counter: TokenCounter) -> Self {
        Self { counter }
    }

    /// Load the encodings `policy` needs, off the reactor.
    pub fn warm_up(&self, policy: &Policy) {
        self.counter.warm_up(&policy.encodings_in_use());
    }

    /// The engine's input for a checked Reserve: its prompt counted (for the model asked for,
    /// and for the policy's downgrade models whose tokenizers differ) and its output hold filled
    /// in. The policy is read only when needed: a caller that gives both `prompt_tokens` and
    /// `max_output_tokens` needs none, and a count the caller made is never counted again.
    pub async fn reserve_input(
        &self,
        call: ReserveCall,
        policy: impl FnOnce() -> Result<std::sync::Arc<Policy>, Status>,
    ) -> Result<ReserveInput, Status> {
        let ReserveCall {
            mut input,
            prompt,
            max_output_tokens,
        } = call;
        match (prompt, max_output_tokens) {
            (Prompt::Tokens(n), Some(max)) => {
                input.prompt_tokens = n;
                input.max_output_tokens = max;
            }
            (prompt, max) => {
                let policy = policy()?;
                input.max_output_tokens =
                    max.unwrap_or_else(|| policy.default_max_output_tokens(&input.model));
                match prompt {
                    // A count the caller made comes with the counts it made for other models.
                    Prompt::Tokens(n) => input.prompt_tokens = n,
                    prompt => {
                        let (n, others) = self
                            .count_for_downgrades(&policy, &input.model, prompt)
                            .await?;
                        input.prompt_tokens = n;
                        input.prompt_tokens_for = others;
                    }
                }
            }
        }
        validate::hold_total(input.prompt_tokens, input.max_output_tokens)?;
        Ok(input)
    }

    /// The tokens of `prompt` for `model`, and the encoding that counted (none for a count the
    /// caller made).
    pub async fn count(
        &self,
        policy: &Policy,
        model: &str,
        prompt: Prompt,
    ) -> Result<(u64, Option<Encoding>), Status> {
        if let Prompt::Tokens(n) = prompt {
            return Ok((n, None));
        }
        let encoding = policy.encoding_for(model).ok_or_else(|| {
            Status::invalid_argument(format!(
                "model: {model:?} has no known tokenizer; add it to the policy, e.g. \
                 [models.\"{model}\"] encoding = \"o200k_base\" (or cl100k_base)"
            ))
        })?;
        Ok((self.count_with(encoding, prompt).await?, Some(encoding)))
    }

    /// The tokens of a text or chat with `encoding`.
    pub async fn count_with(&self, encoding: Encoding, prompt: Prompt) -> Result<u64, Status> {
        let field = if matches!(prompt, Prompt::Chat(_)) {
            "messages"
        } else {
            "prompt"
        };
        self.counter
            .count(encoding, prompt)
            .await
            .map_err(|e| match e {
                CountError::Busy(_) => Status::resource_exhausted(e.to_string()),
                CountError::Uncountable(_) => Status::invalid_argument(format!("{field}: {e}")),
                CountError::Closed => Status::unavailable(e.to_string()),
                CountError::Tokenizer => Status::internal(e.to_string()),
            })
    }

    /// The tokens of a text or chat `prompt` for `model`, and for each downgrade model of the policy whose
    /// tokenizer differs (a downgraded hold is counted with the granted model's own
    /// tokenizer). Counted here, before the engine lock, so the lock is never held while
    /// counting. The same text is counted once per distinct encoding.
    pub async fn count_for_downgrades(
        &self,
        policy: &Policy,
        model: &str,
        prompt: Prompt,
    ) -> Result<(u64, Vec<(String, u64)>), Status> {
        let downgrades: Vec<(&str, Encoding)> = policy
            .downgrades()
            .iter()
            .filter(|(m, _)| m != model)
            .map(|(m, e)| (m.as_str(), *e))
            .collect();
        let asked = policy.encoding_for(model);
        let mut extra: Vec<Encoding> = downgrades
            .iter()
            .map(|(_, e)| *e)
            .filter(|e| Some(*e) != asked)
            .collect();
        extra.sort_unstable_by_key(|e| e.name());
        extra.dedup();
        let mut counts: Vec<(Encoding, u64)> = Vec::new();
        // The model asked for first: if it cannot be counted, nothing else is. Only a prompt
        // that must be counted again is copied.
        let (n, encoding) = if extra.is_empty() {
            self.count(policy, model, prompt).await?
        } else {
            let first = self.count(policy, model, prompt.clone()).await?;
            for e in &extra {
                counts.push((*e, self.count_with(*e, prompt.clone()).await?));
            }
            first
        };
        if let Some(e) = encoding {
            counts.push((e, n));
        }
        let others = downgrades
            .into_iter()
            .filter_map(|(m, e)| {
                counts
                    .iter()
                    .find(|(x, _)| *x == e)
                    .map(|(_, c)| (m.to_string(), *c))
            })
            .collect();
        Ok((n, others))
    }
}

/// The answer to a CountTokens request, checked and counted.
pub async fn count_tokens(
    prompts: &PromptCounter,
    policy: &Policy,
    req: proto::CountTokensRequest,
    max_prompt_bytes: usize,
) -> Result<proto::CountTokensResponse, Status> {
    if req.model.is_empty() {
        return Err(Status::invalid_argument(
            "model: is required (it picks the tokenizer)",
        ));
    }
    validate::model(&req.model)?;
    let prompt = validate::prompt(None, req.prompt, req.messages, &req.model, max_prompt_bytes)?;
    let (tokens, encoding) = prompts.count(policy, &req.model, prompt).await?;
    Ok(proto::CountTokensResponse {
        tokens,
        encoding: encoding.map(|e| e.name().to_string()).unwrap_or_default(),
    })
}
