//! Who is calling: the bearer token (or mTLS identity) a call carries, checked against the
//! policy's `[callers]` (Quota API) and `[operators]` with `--admin-token` (Admin API).
//!
//! UNAUTHENTICATED: no credentials, or credentials nobody in the policy has; PERMISSION_DENIED:
//! a known caller outside its rights. Both name what is missing or not allowed, and never
//! echo what was presented.

use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::Status;

use super::transport::tls::PeerIdentity;
use crate::policy::callers::{Access, Caller};

/// The token of the one `authorization: Bearer <token>` header, if there is one. The scheme is
/// matched case-insensitively (RFC 7235); several `authorization` headers, another scheme, or
/// an empty token are refused, since a proxy and the server might each read a different one.
pub fn bearer(metadata: &MetadataMap) -> Result<Option<&str>, Status> {
    let mut values = metadata.get_all("authorization").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Status::unauthenticated(
            "authorization: send one `authorization` header, not several",
        ));
    }
    let value = value.to_str().map_err(|_| {
        Status::unauthenticated("authorization: must be `Bearer <token>` in visible ASCII")
    })?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Status::unauthenticated(
            "authorization: must use the Bearer scheme (`authorization: Bearer <token>`)",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Status::unauthenticated(
            "authorization: the Bearer token is empty",
        ));
    }
    Ok(Some(token))
}

pub use crate::ledger::FORWARDED_CALLER;

/// The caller a Quota call comes from: none when the policy has no `[callers]` (the API is
/// open); else the one a trusted replica names (`x-tollgate-caller`, believed only on an mTLS
/// connection whose certificate carries `replica_san`, the name replicas reach each other
/// by), else the one whose token it carries, else the one whose SAN its mTLS client
/// certificate has.
pub fn caller<'a>(
    access: &'a Access,
    metadata: &MetadataMap,
    peer: Option<&Arc<PeerIdentity>>,
    replica_san: Option<&str>,
) -> Result<Option<&'a Arc<Caller>>, Status> {
    if !access.callers_required() {
        return Ok(None);
    }
    let from_replica = matches!(
        (peer, replica_san),
        (Some(p), Some(name)) if p.sans.iter().any(|s| s == name)
    );
    if from_replica {
        if let Some(name) = metadata.get(FORWARDED_CALLER) {
            let name = name.to_str().unwrap_or_default();
            let named = access
                .callers
                .iter()
                .find(|c| c.name == name)
                .ok_or_else(|| {
                    Status::unauthenticated(
                        "the replica that forwarded this call named no caller of this policy",
                    )
                })?;
            // A token forwarded with it is checked here too, and must be that caller's: a
            // follower whose policy is not reloaded yet cannot keep a revoked token working.
            if let Some(token) = bearer(metadata)? {
                if access.caller_by_token(token).map(|c| &c.name) != Some(&named.name) {
                    return Err(Status::unauthenticated(
                        "authorization: the bearer token is not a known caller's",
                    ));
                }
            }
            return Ok(Some(named));
        }
    }
    if let Some(token) = bearer(metadata)? {
        return access.caller_by_token(token).map(Some).ok_or_else(|| {
            Status::unauthenticated("authorization: the bearer token is not a known caller's")
        });
    }
    if let Some(peer) = peer {
        return access.caller_by_san(&peer.sans).map(Some).ok_or_else(|| {
            Status::unauthenticated(
                "the client certificate names no caller of the policy (no SAN matches a [callers] san)",
            )
        });
    }
    Err(Status::unauthenticated(
        "no credentials: this tollgate requires a known caller; send `authorization: Bearer <token>` or connect with a caller's client certificate",
    ))
}

/// PERMISSION_DENIED unless `caller` may make `call`.
pub fn may_call(caller: Option<&Caller>, call: &str) -> Result<(), Status> {
    match caller {
        Some(c) if !c.may_call(call) => Err(Status::permission_denied(format!(
            "caller {:?} may not call {call} (its calls: {})",
            c.name,
            c.calls.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// PERMISSION_DENIED unless `caller` may name `subject`.
pub fn may_name(caller: Option<&Caller>, subject: &str) -> Result<(), Status> {
    match caller {
        Some(c) if !c.may_name(subject) => Err(Status::permission_denied(format!(
            "subject: caller {:?} may only name subjects that start with {:?}",
            c.name,
            c.subject_prefix.as_deref().unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

/// PERMISSION_DENIED unless `caller` may act in `group`.
pub fn may_use_group(caller: Option<&Caller>, group: Option<&str>) -> Result<(), Status> {
    match caller {
        Some(c) if !c.may_use_group(group) => Err(Status::permission_denied(match &c.groups {
            Some(groups) => format!(
                "group: caller {:?} must name one of its groups ({})",
                c.name,
                groups.join(", ")
            ),
            None => format!(
                "group: caller {:?} may not name a group (list those it may use in its groups)",
                c.name
            ),
        })),
        _ => Ok(()),
    }
}

/// PERMISSION_DENIED for a caller bound to subjects or groups asking about the fleet or a
/// client IP: those figures are everyone's.
pub fn may_read_shared(caller: Option<&Caller>) -> Result<(), Status> {
    match caller {
        Some(c) if c.bound() => {
            Err(Status::permission_denied(format!(
                "caller {:?} is bound to its subjects or groups: it may not read the usage of the fleet or of a client IP",
                c.name
            )))
        }
        _ => Ok(()),
    }
}
