//! The Quota and Admin services of a relay: validate and count here, decide upstream.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{unreachable, LocalHold, Relay};
use crate::clock::MICROS_PER_SECOND;
use crate::engine::{ReservationId, Settlement, Usage};
use crate::proto::admin_client::AdminClient;
use crate::proto::quota_client::QuotaClient;
use crate::server::prompt::PromptCounter;
use crate::server::sampled_log::UPSTREAM_FALLBACKS;
use crate::server::validate::{self, to_duration, to_timestamp};
use crate::telemetry as metrics;
use crate::{policy, proto};

/// What a closed relay tells a caller to wait before retrying: the upstream may be back any
/// moment (a restart of the central service takes seconds).
const UPSTREAM_RETRY_US: u64 = MICROS_PER_SECOND;

/// The first pause before a Reserve is sent again to an unreachable upstream; doubled each time.
const RETRY_FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(20);

/// The `denied_by` (fail closed) and `shadow_denied_by` (fail open) of a Reserve answered
/// without the upstream.
pub const UPSTREAM_UNAVAILABLE: &str = "upstream_unavailable";

/// Quota in relay mode.
#[derive(Debug, Clone)]
pub struct RelayQuota {
    relay: Arc<Relay>,
    prompts: PromptCounter,
    max_prompt_bytes: usize,
}

impl RelayQuota {
    /// The Quota service of `relay`, counting prompts with `prompts`.
    pub fn new(relay: Arc<Relay>, prompts: PromptCounter, max_prompt_bytes: usize) -> Self {
        Self {
            relay,
            prompts,
            max_prompt_bytes,
        }
    }

    fn client(&self) -> QuotaClient<tonic::transport::Channel> {
        QuotaClient::new(self.relay.channel())
    }

    async fn reserve_call(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        let call = validate::reserve(request.into_inner(), self.max_prompt_bytes)?;
        let policy = self.relay.policy();
        let input = self
            .prompts
            .reserve_input(call, || Ok(policy.clone()))
            .await?;
        // Every forwarded Reserve has a key, so that a retry, and the settling of one given up
        // on (`orphans.rs`), find the hold the first attempt made instead of making another.
        let key = input
            .idempotency_key
            .clone()
            .unwrap_or_else(|| format!("relay-{}", uuid::Uuid::now_v7()));
        let forwarded = proto::ReserveRequest {
            subject: input.subject.clone(),
            model: input.model.clone(),
            prompt_tokens: Some(input.prompt_tokens),
            max_output_tokens: Some(input.max_output_tokens),
            idempotency_key: key,
            hold: input.hold_us.map(to_duration),
            dry_run: input.dry_run,
            prompt: None,
            messages: Vec::new(),
            group: input.group.clone().unwrap_or_default(),
            client_ip: input.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            prompt_tokens_for: input
                .prompt_tokens_for
                .iter()
                .map(|(model, tokens)| proto::ModelTokens {
                    model: model.clone(),
                    tokens: *tokens,
                })
                .collect(),
        };
        // An unreachable upstream is asked again with the same key (20, 40, 80 ms apart) while
        // the call has time left within the upstream deadline: a refused or reset connection
        // (a restart, a failover) is often back within it.
        let started = std::time::Instant::now();
        let mut backoff = RETRY_FIRST_BACKOFF;
        let answer = loop {
            match self.client().reserve(forwarded.clone()).await {
                Err(status)
                    if unreachable(&status) && started.elapsed() + backoff < self.relay.timeout =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                other => break other,
            }
        };
        match answer {
            Ok(answer) => {
                self.relay
                    .remember_tier(&input.subject, &answer.get_ref().tier);
                Ok(answer)
            }
            Err(status) if unreachable(&status) => {
                // The upstream may hold tokens for it: settle that once it answers again.
                if !input.dry_run {
                    super::orphans::remember(&self.relay, forwarded);
                }
                self.without_upstream(&input, &policy, &status)
                    .map(Response::new)
            }
            Err(status) => Err(status),
        }
    }

    /// The answer to a Reserve when the upstream cannot be reached: as the tier's fail mode
    /// says.
    fn without_upstream(
        &self,
        input: &crate::engine::ReserveInput,
        policy: &policy::Policy,
        status: &Status,
    ) -> Result<proto::ReserveResponse, Status> {
        let tier = self.relay.tier_of(&input.subject, policy);
        let limits = policy.resolve(Some(&tier)).limits.clone();
        let now = self.relay.now_us();
        let tokens = input.prompt_tokens + input.max_output_tokens;
        let denied = proto::ReserveResponse {
            decision: proto::Decision::Denied as i32,
            model: input.model.clone(),
            prompt_tokens: input.prompt_tokens,
            denied_by: UPSTREAM_UNAVAILABLE.into(),
            retry_after: Some(to_duration(UPSTREAM_RETRY_US)),
            tier: tier.clone(),
            ..Default::default()
        };
        if !limits.fail_open {
            if !input.dry_run {
                metrics::upstream_failure(&tier, "closed");
            }
            if UPSTREAM_FALLBACKS.sample("closed") {
                tracing::warn!(subject = %input.subject, %tier, error = %status.message(), "upstream unreachable: denied (fail closed)");
            }
            return Ok(denied);
        }
        let max_hold_us = limits.max_hold_seconds * MICROS_PER_SECOND;
        // The central service's rule for a hold asked for, applied here too.
        if input.hold_us.is_some_and(|h| h > max_hold_us) {
            return Err(Status::invalid_argument(format!(
                "hold: must be at most {} seconds (max_hold_seconds of tier {tier:?})",
                limits.max_hold_seconds
            )));
        }
        let hold_us = input
            .hold_us
            .unwrap_or(limits.hold_seconds * MICROS_PER_SECOND);
        let key = input
            .idempotency_key
            .clone()
            .map(|k| (input.subject.clone(), k));
        if let Some((subject, k)) = &key {
            // A retry during the outage replays the hold the first attempt got here.
            if let Some((id, hold)) = self.relay.local().by_key(subject, k) {
                return Ok(proto::ReserveResponse {
                    decision: proto::Decision::Allowed as i32,
                    reservation_id: id.to_string(),
                    model: input.model.clone(),
                    reserved_tokens: hold.tokens,
                    prompt_tokens: input.prompt_tokens,
                    expires_at: Some(to_timestamp(hold.expires_us)),
                    shadow_denied_by: UPSTREAM_UNAVAILABLE.into(),
                    replayed: true,
                    tier,
                    ..Default::default()
                });
            }
        }
        let id = ReservationId::generate(now);
        let expires_us = now.saturating_add(hold_us);
        if !input.dry_run {
            let remembered = self.relay.local().insert(
                id,
                LocalHold {
                    tokens,
                    created_us: now,
                    expires_us,
                    committed: None,
                    refunded: false,
                    max_lifetime_us: limits.max_hold_lifetime_seconds * MICROS_PER_SECOND,
                    max_extend_us: max_hold_us,
                    key,
                },
                now,
            );
            if !remembered {
                metrics::upstream_failure(&tier, "closed");
                if UPSTREAM_FALLBACKS.sample("open_table_full") {
                    tracing::warn!(subject = %input.subject, %tier, "upstream unreachable and the fail-open table is full: denied");
                }
                return Ok(denied);
            }
        }
        if !input.dry_run {
            metrics::upstream_failure(&tier, "open");
        }
        if UPSTREAM_FALLBACKS.sample("open") {
            tracing::warn!(subject = %input.subject, %tier, tokens, error = %status.message(), "upstream unreachable: allowed (fail open)");
        }
        Ok(proto::ReserveResponse {
            decision: proto::Decision::Allowed as i32,
            reservation_id: if input.dry_run {
                String::new()
            } else {
                id.to_string()
            },
            model: input.model.clone(),
            reserved_tokens: tokens,
            prompt_tokens: input.prompt_tokens,
            expires_at: (!input.dry_run).then(|| to_timestamp(expires_us)),
            shadow_denied_by: UPSTREAM_UNAVAILABLE.into(),
            tier,
            ..Default::default()
        })
    }

    async fn commit_call(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        let (id, usage) = validate::commit(request.get_ref())?;
        if let Some(answer) = self.commit_local(id, usage)? {
            return Ok(Response::new(answer));
        }
        self.client().commit(request.into_inner()).await
    }

    /// Commit a fail-open hold here (it is not known upstream).
    fn commit_local(
        &self,
        id: ReservationId,
        usage: Usage,
    ) -> Result<Option<proto::CommitResponse>, Status> {
        let mut local = self.relay.local();
        let Some(hold) = local.get_mut(id) else {
            return Ok(None);
        };
        if hold.refunded {
            return Err(Status::failed_precondition(format!(
                "reservation {id} is REFUNDED: a refunded hold cannot be committed"
            )));
        }
        if let Some(first) = hold.committed {
            if first != usage {
                return Err(Status::failed_precondition(format!(
                    "reservation {id} is COMMITTED with other usage"
                )));
            }
        }
        hold.committed = Some(usage);
        // Money is not counted for a hold the central ledger never saw.
        let s = Settlement::of(hold.tokens, &usage, 0);
        Ok(Some(proto::CommitResponse {
            charged_tokens: s.charged_tokens,
            released_tokens: s.released_tokens,
            debt_tokens: s.debt_tokens,
            ..Default::default()
        }))
    }

    async fn refund_call(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        let id = validate::reservation_id(&request.get_ref().reservation_id)?;
        {
            let mut local = self.relay.local();
            let now = self.relay.now_us();
            if let Some(hold) = local.get_mut(id) {
                if hold.committed.is_some() {
                    return Err(Status::failed_precondition(format!(
                        "reservation {id} is COMMITTED: a committed hold cannot be refunded"
                    )));
                }
                if !hold.refunded && hold.expires_us <= now {
                    return Err(Status::failed_precondition(format!(
                        "reservation {id} is EXPIRED: the hold expired; Commit the real usage"
                    )));
                }
                hold.refunded = true;
                return Ok(Response::new(proto::RefundResponse {
                    released_tokens: hold.tokens,
                }));
            }
        }
        self.client().refund(request.into_inner()).await
    }

    async fn extend_call(
        &self,
        request: Request<proto::ExtendRequest>,
    ) -> Result<Response<proto::ExtendResponse>, Status> {
        let id = validate::reservation_id(&request.get_ref().reservation_id)?;
        let hold_us = validate::required_hold(request.get_ref().hold.as_ref())?;
        {
            let now = self.relay.now_us();
            let mut local = self.relay.local();
            if let Some(hold) = local.get_mut(id) {
                if hold.committed.is_some() || hold.refunded || hold.expires_us <= now {
                    return Err(Status::failed_precondition(format!(
                        "reservation {id} is settled or expired: only a HELD reservation can be extended"
                    )));
                }
                if hold_us > hold.max_extend_us {
                    return Err(Status::invalid_argument(format!(
                        "hold: must be at most {} seconds (max_hold_seconds of the tier)",
                        hold.max_extend_us / MICROS_PER_SECOND
                    )));
                }
                let wanted = hold.expires_us.max(now.saturating_add(hold_us));
                if wanted.saturating_sub(hold.created_us) > hold.max_lifetime_us {
                    return Err(Status::invalid_argument(format!(
                        "hold: would make the hold live longer than max_hold_lifetime_seconds ({}) of the tier",
                        hold.max_lifetime_us / MICROS_PER_SECOND
                    )));
                }
                hold.expires_us = wanted;
                return Ok(Response::new(proto::ExtendResponse {
                    expires_at: Some(to_timestamp(hold.expires_us)),
                }));
            }
        }
        self.client().extend(request.into_inner()).await
    }

    async fn get_usage_call(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        validate::usage_query(request.get_ref())?;
        let answer = self.client().get_usage(request.into_inner()).await?;
        if answer.get_ref().scope == "subject" {
            self.relay
                .remember_tier(&answer.get_ref().subject, &answer.get_ref().tier);
        }
        Ok(answer)
    }

    async fn count_tokens_call(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        let policy = self.relay.policy();
        crate::server::prompt::count_tokens(
            &self.prompts,
            &policy,
            request.into_inner(),
            self.max_prompt_bytes,
        )
        .await
        .map(Response::new)
    }
}

#[tonic::async_trait]
impl proto::quota_server::Quota for RelayQuota {
    async fn reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        metrics::timed("Reserve", self.reserve_call(request)).await
    }

    async fn commit(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        metrics::timed("Commit", self.commit_call(request)).await
    }

    async fn refund(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        metrics::timed("Refund", self.refund_call(request)).await
    }

    async fn extend(
        &self,
        request: Request<proto::ExtendRequest>,
    ) -> Result<Response<proto::ExtendResponse>, Status> {
        metrics::timed("Extend", self.extend_call(request)).await
    }

    async fn get_usage(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        metrics::timed("GetUsage", self.get_usage_call(request)).await
    }

    async fn count_tokens(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        metrics::timed("CountTokens", self.count_tokens_call(request)).await
    }
}

/// Admin in relay mode: every call forwarded with its `authorization` header, which the
/// central service checks (a relay holds no admin token of its own).
#[derive(Debug, Clone)]
pub struct RelayAdmin {
    relay: Arc<Relay>,
}

impl RelayAdmin {
    /// The Admin service of `relay`.
    pub fn new(relay: Arc<Relay>) -> Self {
        Self { relay }
    }

    fn client(&self) -> AdminClient<tonic::transport::Channel> {
        AdminClient::new(self.relay.channel())
    }
}

/// `request`'s message in a new request that carries its `authorization` header.
fn with_credentials<T>(request: Request<T>) -> Request<T> {
    let auth = request.metadata().get("authorization").cloned();
    let mut forwarded = Request::new(request.into_inner());
    if let Some(auth) = auth {
        forwarded.metadata_mut().insert("authorization", auth);
    }
    forwarded
}

#[tonic::async_trait]
impl proto::admin_server::Admin for RelayAdmin {
    async fn set_subject(
        &self,
        request: Request<proto::SetSubjectRequest>,
    ) -> Result<Response<proto::SetSubjectResponse>, Status> {
        let answer = metrics::timed(
            "SetSubject",
            self.client().set_subject(with_credentials(request)),
        )
        .await?;
        self.relay
            .remember_tier(&answer.get_ref().subject, &answer.get_ref().tier);
        Ok(answer)
    }

    async fn get_subject(
        &self,
        request: Request<proto::GetSubjectRequest>,
    ) -> Result<Response<proto::GetSubjectResponse>, Status> {
        let answer = metrics::timed(
            "GetSubject",
            self.client().get_subject(with_credentials(request)),
        )
        .await?;
        self.relay
            .remember_tier(&answer.get_ref().subject, &answer.get_ref().tier);
        Ok(answer)
    }

    async fn reset_usage(
        &self,
        request: Request<proto::ResetUsageRequest>,
    ) -> Result<Response<proto::ResetUsageResponse>, Status> {
        metrics::timed(
            "ResetUsage",
            self.client().reset_usage(with_credentials(request)),
        )
        .await
    }

    type ExportStream = tonic::Streaming<proto::ExportChunk>;

    /// The central service's export, streamed through.
    async fn export(
        &self,
        request: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        metrics::timed("Export", self.client().export(with_credentials(request))).await
    }
}
