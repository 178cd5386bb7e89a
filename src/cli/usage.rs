//! `tollgate usage`: a client of the running server that prints one scope's usage as a table.

use std::process::ExitCode;
use std::time::Duration;

use tollgate::proto::quota_client::QuotaClient;
use tollgate::proto::{GetUsageRequest, GetUsageResponse};
use tollgate::relay::{channel_to, UpstreamTls};

/// Ask `addr` (over TLS with `tls`, as the caller whose token is `token`) for the usage of
/// `subject` (or of the group, IP or fleet) and print it.
pub fn print(
    addr: &str,
    tls: Option<&UpstreamTls>,
    token: Option<String>,
    subject: Option<String>,
    group: Option<String>,
    client_ip: Option<String>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let request = GetUsageRequest {
        subject: subject.unwrap_or_default(),
        group: group.unwrap_or_default(),
        client_ip: client_ip.unwrap_or_default(),
    };
    let answer = runtime.block_on(async {
        let channel = connect(addr, tls).await?;
        let mut request = tonic::Request::new(request);
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| "--token is not valid header text".to_string())?;
            request.metadata_mut().insert("authorization", value);
        }
        QuotaClient::new(channel)
            .get_usage(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    });
    match answer {
        Ok(u) => {
            print!("{}", table(&u));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A channel to the tollgate at `addr` (http://, or https:// with `tls`), connected now.
pub async fn connect(
    addr: &str,
    tls: Option<&UpstreamTls>,
) -> Result<tonic::transport::Channel, String> {
    let channel = channel_to(addr, Duration::from_secs(10), tls).map_err(|e| match e {
        tollgate::relay::RelayError::BadUrl { url, reason } => {
            format!("--addr {url:?} is not a URL: {reason}")
        }
    })?;
    // Lazy channels connect on the first call: ask once here so that an unreachable server is
    // reported as such.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map_err(|s| format!("cannot connect to {addr}: {}", s.message()))?;
    Ok(channel)
}

/// Micro-dollars as dollars with six decimals.
fn usd(micro: u64) -> String {
    format!("${}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

fn duration(d: Option<&prost_types::Duration>) -> String {
    let Some(d) = d else {
        return "-".into();
    };
    let s = d.seconds.max(0);
    match s {
        0 if d.nanos > 0 => "<1s".into(),
        0 => "now".into(),
        1..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3_600, (s % 3_600) / 60),
    }
}

/// The readable table.
fn table(u: &GetUsageResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let who = match u.scope.as_str() {
        "subject" => format!("subject {} (tier {})", u.subject, u.tier),
        "group" => format!("group {}", u.group),
        "ip" => format!("client IP {}", u.client_ip),
        _ => "the whole fleet".to_string(),
    };
    let _ = writeln!(out, "{who}");
    if u.scope == "subject" && !u.group.is_empty() {
        let _ = writeln!(out, "group {}", u.group);
    }
    let rows = [
        ("tokens used today", u.used_tokens.to_string()),
        ("  of which downgraded", u.downgraded_tokens.to_string()),
        ("tokens used this month", u.used_tokens_month.to_string()),
        ("tokens held now", u.held_tokens.to_string()),
        ("open holds", u.open_holds.to_string()),
        ("requests today", u.requests.to_string()),
        ("denied today", u.denials.to_string()),
        ("downgraded today", u.downgrades.to_string()),
        ("shadow denials today", u.shadow_denials.to_string()),
        ("spent today", usd(u.spent_micro_usd)),
        ("spent this month", usd(u.spent_micro_usd_month)),
        ("held now (worst case)", usd(u.held_micro_usd)),
        ("saved today", usd(u.saved_micro_usd)),
        ("saved this month", usd(u.saved_micro_usd_month)),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "  {name:<24} {value:>16}");
    }
    if u.limits.is_empty() {
        let _ = writeln!(out, "no limits apply");
        return out;
    }
    let _ = writeln!(
        out,
        "\n  {:<8} {:<20} {:<26} {:>16} {:>16} {:>9}",
        "scope", "id", "limit", "configured", "remaining", "resets in"
    );
    for l in &u.limits {
        let money = l.name.starts_with("usd_");
        let (limit, remaining) = if money {
            (usd(l.limit), usd(l.remaining))
        } else {
            (l.limit.to_string(), l.remaining.to_string())
        };
        let id: String = l.scope_id.chars().take(20).collect();
        let _ = writeln!(
            out,
            "  {:<8} {:<20} {:<26} {:>16} {:>16} {:>9}",
            l.scope,
            id,
            l.name,
            limit,
            remaining,
            duration(l.reset_after.as_ref())
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_and_durations_read_well() {
        assert_eq!(usd(7_500), "$0.007500");
        assert_eq!(usd(25_000_000), "$25.000000");
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(duration(d(0, 0).as_ref()), "now");
        assert_eq!(duration(d(0, 5).as_ref()), "<1s");
        assert_eq!(duration(d(61, 0).as_ref()), "1m01s");
        assert_eq!(duration(d(43_200, 0).as_ref()), "12h00m");
    }
}
