//! The `tollgate.v1.Quota` service: a thin adapter from gRPC to the ledger.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::validate::{self, to_duration, to_timestamp};
use crate::engine::{Decision, LimitStatus, ReserveInput, ScopeKey, UsageQuery};
use crate::ledger::Ledger;
use crate::policy::Policy;
use crate::proto;
use crate::tokens::{CountError, Encoding, Prompt, TokenCounter};

/// Serves Reserve, Commit, Refund, GetUsage and CountTokens.
#[derive(Debug, Clone)]
pub struct QuotaService {
    ledger: Arc<Ledger>,
    counter: TokenCounter,
    max_prompt_bytes: usize,
}

impl QuotaService {
    /// A service over `ledger`, counting prompts with `counter`, refusing prompts over
    /// `max_prompt_bytes` of text.
    pub fn new(ledger: Arc<Ledger>, counter: TokenCounter, max_prompt_bytes: usize) -> Self {
        Self {
            ledger,
            counter,
            max_prompt_bytes,
        }
    }

    /// The tokens of `prompt` for `model`, and the encoding that counted (none for a count the
    /// caller made).
    async fn count(
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
    async fn count_with(&self, encoding: Encoding, prompt: Prompt) -> Result<u64, Status> {
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
}

impl QuotaService {
    /// The tokens of `prompt` for `model`, and for each downgrade model of the policy whose
    /// tokenizer differs (a downgraded hold is counted with the granted model's own
    /// tokenizer). Counted here, before the engine lock, so the lock is never held while
    /// counting. The same text is counted once per distinct encoding.
    async fn count_for_downgrades(
        &self,
        policy: &Policy,
        model: &str,
        prompt: Prompt,
    ) -> Result<(u64, Vec<(String, u64)>), Status> {
        let downgrades: Vec<(&str, Encoding)> = policy
            .downgrade_models()
            .into_iter()
            .filter(|m| *m != model)
            .filter_map(|m| policy.encoding_for(m).map(|e| (m, e)))
            .collect();
        let asked = if matches!(prompt, Prompt::Tokens(_)) {
            None
        } else {
            policy.encoding_for(model)
        };
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

pub(super) fn limits(statuses: Vec<LimitStatus>) -> Vec<proto::LimitStatus> {
    statuses
        .into_iter()
        .map(|s| proto::LimitStatus {
            name: s.name.to_string(),
            limit: s.limit,
            remaining: s.remaining,
            reset_after: Some(to_duration(s.reset_after_us)),
            scope: s.scope.name().to_string(),
            scope_id: s.scope_id.to_string(),
        })
        .collect()
}

#[tonic::async_trait]
impl proto::quota_server::Quota for QuotaService {
    async fn reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        let call = validate::reserve(request.into_inner(), self.max_prompt_bytes)?;
        // The policy is read (a brief lock) only when it is needed: to pick the tokenizer, or
        // the output hold the caller left out. A caller that counts and sets both skips it.
        let (prompt_tokens, max_output_tokens, prompt_tokens_for) =
            match (&call.prompt, call.max_output_tokens) {
                (Prompt::Tokens(n), Some(max)) => (*n, max, Vec::new()),
                _ => {
                    let policy = self.ledger.policy()?;
                    let max = call
                        .max_output_tokens
                        .unwrap_or_else(|| policy.default_max_output_tokens(&call.input.model));
                    let (n, others) = self
                        .count_for_downgrades(&policy, &call.input.model, call.prompt)
                        .await?;
                    (n, max, others)
                }
            };
        validate::hold_total(prompt_tokens, max_output_tokens)?;
        let input = ReserveInput {
            prompt_tokens,
            max_output_tokens,
            prompt_tokens_for,
            ..call.input
        };
        let subject = input.subject.clone();
        let o = self.ledger.reserve(input).await?;
        let decision = match o.decision {
            Decision::Allowed => proto::Decision::Allowed,
            Decision::Downgraded => proto::Decision::Downgraded,
            Decision::Denied => {
                tracing::info!(
                    %subject,
                    denied_by = o.denied_by.as_deref().unwrap_or(""),
                    tokens = o.prompt_tokens,
                    "reserve denied"
                );
                proto::Decision::Denied
            }
        };
        Ok(Response::new(proto::ReserveResponse {
            decision: decision as i32,
            reservation_id: o
                .reservation_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            model: o.model,
            reserved_tokens: o.reserved_tokens,
            denied_by: o.denied_by.unwrap_or_default(),
            retry_after: o.retry_after_us.map(to_duration),
            limits: limits(o.limits),
            expires_at: o.expires_us.map(to_timestamp),
            prompt_tokens: o.prompt_tokens,
            replayed: o.replayed,
            shadow_denied_by: o.shadow_denied_by.unwrap_or_default(),
            reserved_micro_usd: o.reserved_usd,
            saved_micro_usd: o.saved_usd,
        }))
    }

    async fn commit(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        let (id, usage) = validate::commit(request.get_ref())?;
        let o = self.ledger.commit(id, usage).await?;
        Ok(Response::new(proto::CommitResponse {
            charged_tokens: o.settlement.charged_tokens,
            released_tokens: o.settlement.released_tokens,
            debt_tokens: o.settlement.debt_tokens,
            charged_micro_usd: o.settlement.charged_usd,
            limits: limits(o.limits),
        }))
    }

    async fn refund(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        let id = validate::reservation_id(&request.get_ref().reservation_id)?;
        let o = self.ledger.refund(id).await?;
        Ok(Response::new(proto::RefundResponse {
            released_tokens: o.released_tokens,
        }))
    }

    async fn count_tokens(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        let req = request.into_inner();
        if req.model.is_empty() {
            return Err(Status::invalid_argument(
                "model: is required (it picks the tokenizer)",
            ));
        }
        validate::model(&req.model)?;
        let prompt = validate::prompt(
            None,
            req.prompt,
            req.messages,
            &req.model,
            self.max_prompt_bytes,
        )
        .map_err(|s| {
            // CountTokens has no prompt_tokens: say what it does take.
            if s.message().starts_with("prompt: give exactly one") {
                Status::invalid_argument("prompt: give exactly one of prompt or messages")
            } else {
                s
            }
        })?;
        let policy = self.ledger.policy()?;
        let (tokens, encoding) = self.count(&policy, &req.model, prompt).await?;
        Ok(Response::new(proto::CountTokensResponse {
            tokens,
            encoding: encoding.map(|e| e.name().to_string()).unwrap_or_default(),
        }))
    }

    async fn extend(
        &self,
        request: Request<proto::ExtendRequest>,
    ) -> Result<Response<proto::ExtendResponse>, Status> {
        let req = request.into_inner();
        let id = validate::reservation_id(&req.reservation_id)?;
        let hold_us = validate::required_hold(req.hold.as_ref())?;
        let expires_us = self.ledger.extend(id, hold_us).await?;
        Ok(Response::new(proto::ExtendResponse {
            expires_at: Some(to_timestamp(expires_us)),
        }))
    }

    async fn get_usage(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        let req = request.into_inner();
        let subject = if req.subject.is_empty() {
            None
        } else {
            validate::subject(&req.subject)?;
            Some(req.subject)
        };
        let query = UsageQuery {
            subject,
            group: validate::group(&req.group)?,
            client_ip: validate::client_ip(&req.client_ip)?,
        };
        let u = self.ledger.usage(&query).await?;
        Ok(Response::new(proto::GetUsageResponse {
            scope: u.scope.name().to_string(),
            subject: u.subject,
            tier: u.tier,
            group: u.group.unwrap_or_default(),
            client_ip: query
                .client_ip
                .map(|ip| ScopeKey::Ip(ip).id().to_string())
                .unwrap_or_default(),
            spent_micro_usd: u.spent_usd,
            spent_micro_usd_month: u.spent_usd_month,
            saved_micro_usd: u.saved_usd,
            saved_micro_usd_month: u.saved_usd_month,
            denials: u.denials,
            downgrades: u.downgrades,
            downgraded_tokens: u.downgraded_tokens,
            held_micro_usd: u.held_usd,
            used_tokens: u.used_tokens,
            held_tokens: u.held_tokens,
            requests: u.requests,
            open_holds: u.open_holds,
            limits: limits(u.limits),
            used_tokens_month: u.used_tokens_month,
            shadow_denials: u.shadow_denials,
        }))
    }
}
