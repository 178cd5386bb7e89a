//! The forwarding ledger's calls: each sent to the upstream, which decides; a Reserve it
//! cannot reach is retried with its key, then answered by the tier's fail mode.

use std::sync::Arc;

use tonic::Status;

use super::{unreachable, with_credentials, ForwardingLedger, LocalHold};
use crate::clock::MICROS_PER_SECOND;
use crate::engine::{ReservationId, ReserveInput, Settlement, Usage, UsageQuery};
use crate::ledger::{CallContext, ExportStream, Ledger};
use crate::proto::admin_client::AdminClient;
use crate::proto::quota_client::QuotaClient;
use crate::proto::{to_duration, to_timestamp};
use crate::sampled_log::UPSTREAM_FALLBACKS;
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

/// PERMISSION_DENIED unless `caller` made `hold` (or no caller did).
fn not_owner(hold: &LocalHold, caller: Option<&str>, id: ReservationId) -> Result<(), Status> {
    match &hold.caller {
        Some(owner) if Some(owner.as_str()) != caller => Err(Status::permission_denied(format!(
            "reservation {id} was made by another caller: only the caller that made a hold may Commit, Refund or Extend it"
        ))),
        _ => Ok(()),
    }
}

impl ForwardingLedger {
    fn client(&self) -> QuotaClient<tonic::transport::Channel> {
        QuotaClient::new(self.channel())
    }

    fn admin(&self) -> AdminClient<tonic::transport::Channel> {
        AdminClient::new(self.channel())
    }

    /// Reserve upstream; by the tier's fail mode if it cannot be reached.
    async fn forward_reserve(
        &self,
        cx: &CallContext,
        input: ReserveInput,
    ) -> Result<proto::ReserveResponse, Status> {
        let policy = self.current_policy();
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
            match self
                .client()
                .reserve(with_credentials(forwarded.clone(), cx))
                .await
            {
                Err(status)
                    if unreachable(&status) && started.elapsed() + backoff < self.timeout =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                other => break other,
            }
        };
        match answer {
            Ok(answer) => {
                let answer = answer.into_inner();
                self.remember_tier(&input.subject, &answer.tier);
                Ok(answer)
            }
            Err(status) if unreachable(&status) => {
                // The upstream may hold tokens for it: settle that once it answers again.
                if !input.dry_run {
                    super::orphans::remember(&self.orphans, forwarded, cx.clone());
                }
                self.without_upstream(cx, &input, &policy, &status)
            }
            Err(status) => Err(status),
        }
    }

    /// The answer to a Reserve when the upstream cannot be reached: as the tier's fail mode
    /// says.
    fn without_upstream(
        &self,
        cx: &CallContext,
        input: &ReserveInput,
        policy: &policy::Policy,
        status: &Status,
    ) -> Result<proto::ReserveResponse, Status> {
        let tier = self.tier_of(&input.subject, policy);
        let limits = policy.resolve(Some(&tier)).limits.clone();
        let now = self.now_us();
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
                tracing::warn!(subject = %crate::sampled_log::subject(&input.subject), %tier, error = %status.message(), "upstream unreachable: denied (fail closed)");
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
            if let Some((id, hold)) = self.local().by_key(subject, k) {
                if hold.caller != cx.caller {
                    return Err(Status::failed_precondition(format!(
                        "idempotency_key {k:?} was first used by another caller; use a new key"
                    )));
                }
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
            let remembered = self.local().insert(
                id,
                LocalHold {
                    caller: cx.caller.clone(),
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
                    tracing::warn!(subject = %crate::sampled_log::subject(&input.subject), %tier, "upstream unreachable and the fail-open table is full: denied");
                }
                return Ok(denied);
            }
        }
        if !input.dry_run {
            metrics::upstream_failure(&tier, "open");
        }
        if UPSTREAM_FALLBACKS.sample("open") {
            tracing::warn!(subject = %crate::sampled_log::subject(&input.subject), %tier, tokens, error = %status.message(), "upstream unreachable: allowed (fail open)");
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

    /// Commit a fail-open hold here (it is not known upstream).
    fn commit_local(
        &self,
        caller: Option<&str>,
        id: ReservationId,
        usage: Usage,
    ) -> Result<Option<proto::CommitResponse>, Status> {
        let mut local = self.local();
        let Some(hold) = local.get_mut(id) else {
            return Ok(None);
        };
        not_owner(hold, caller, id)?;
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

    /// Refund a fail-open hold here (it is not known upstream).
    fn refund_local(
        &self,
        caller: Option<&str>,
        id: ReservationId,
    ) -> Result<Option<proto::RefundResponse>, Status> {
        {
            let mut local = self.local();
            let now = self.now_us();
            if let Some(hold) = local.get_mut(id) {
                not_owner(hold, caller, id)?;
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
                return Ok(Some(proto::RefundResponse {
                    released_tokens: hold.tokens,
                }));
            }
        }
        Ok(None)
    }

    /// Extend a fail-open hold here (it is not known upstream).
    fn extend_local(
        &self,
        caller: Option<&str>,
        id: ReservationId,
        hold_us: u64,
    ) -> Result<Option<proto::ExtendResponse>, Status> {
        {
            let now = self.now_us();
            let mut local = self.local();
            if let Some(hold) = local.get_mut(id) {
                not_owner(hold, caller, id)?;
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
                return Ok(Some(proto::ExtendResponse {
                    expires_at: Some(to_timestamp(hold.expires_us)),
                }));
            }
        }
        Ok(None)
    }
}

#[tonic::async_trait]
impl Ledger for ForwardingLedger {
    fn policy(&self) -> Result<Arc<policy::Policy>, Status> {
        Ok(self.current_policy())
    }

    async fn reserve(
        &self,
        cx: &CallContext,
        input: ReserveInput,
    ) -> Result<proto::ReserveResponse, Status> {
        self.forward_reserve(cx, input).await
    }

    async fn commit(
        &self,
        cx: &CallContext,
        id: ReservationId,
        usage: Usage,
    ) -> Result<proto::CommitResponse, Status> {
        if let Some(answer) = self.commit_local(cx.caller.as_deref(), id, usage)? {
            return Ok(answer);
        }
        let request = proto::CommitRequest {
            reservation_id: id.to_string(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            usage_unknown: usage.usage_unknown,
        };
        Ok(self
            .client()
            .commit(with_credentials(request, cx))
            .await?
            .into_inner())
    }

    async fn refund(
        &self,
        cx: &CallContext,
        id: ReservationId,
    ) -> Result<proto::RefundResponse, Status> {
        if let Some(answer) = self.refund_local(cx.caller.as_deref(), id)? {
            return Ok(answer);
        }
        let request = proto::RefundRequest {
            reservation_id: id.to_string(),
        };
        Ok(self
            .client()
            .refund(with_credentials(request, cx))
            .await?
            .into_inner())
    }

    async fn extend(
        &self,
        cx: &CallContext,
        id: ReservationId,
        hold_us: u64,
    ) -> Result<proto::ExtendResponse, Status> {
        if let Some(answer) = self.extend_local(cx.caller.as_deref(), id, hold_us)? {
            return Ok(answer);
        }
        let request = proto::ExtendRequest {
            reservation_id: id.to_string(),
            hold: Some(to_duration(hold_us)),
        };
        Ok(self
            .client()
            .extend(with_credentials(request, cx))
            .await?
            .into_inner())
    }

    async fn usage(
        &self,
        cx: &CallContext,
        query: UsageQuery,
    ) -> Result<proto::GetUsageResponse, Status> {
        let request = proto::GetUsageRequest {
            subject: query.subject.unwrap_or_default(),
            group: query.group.unwrap_or_default(),
            client_ip: query.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        };
        let answer = self
            .client()
            .get_usage(with_credentials(request, cx))
            .await?
            .into_inner();
        if answer.scope == "subject" {
            self.remember_tier(&answer.subject, &answer.tier);
        }
        Ok(answer)
    }

    async fn set_subject(
        &self,
        cx: &CallContext,
        request: proto::SetSubjectRequest,
    ) -> Result<proto::SetSubjectResponse, Status> {
        let answer = self
            .admin()
            .set_subject(with_credentials(request, cx))
            .await?
            .into_inner();
        self.remember_tier(&answer.subject, &answer.tier);
        Ok(answer)
    }

    async fn get_subject(
        &self,
        cx: &CallContext,
        subject: String,
    ) -> Result<proto::GetSubjectResponse, Status> {
        let request = proto::GetSubjectRequest { subject };
        let answer = self
            .admin()
            .get_subject(with_credentials(request, cx))
            .await?
            .into_inner();
        self.remember_tier(&answer.subject, &answer.tier);
        Ok(answer)
    }

    async fn reset_usage(
        &self,
        cx: &CallContext,
        subject: String,
    ) -> Result<proto::ResetUsageResponse, Status> {
        let request = proto::ResetUsageRequest { subject };
        Ok(self
            .admin()
            .reset_usage(with_credentials(request, cx))
            .await?
            .into_inner())
    }

    /// The upstream's export, streamed through.
    async fn export(&self, cx: &CallContext) -> Result<ExportStream, Status> {
        let chunks = self
            .admin()
            .export(with_credentials(proto::ExportRequest {}, cx))
            .await?
            .into_inner();
        Ok(Box::pin(chunks))
    }
}
