//! The limits of the scopes beside the subject: groups (organisations, teams), client IPs and
//! the whole fleet.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

use super::Limits;

/// Most `[groups.*]` entries in one policy.
pub const MAX_GROUP_ENTRIES: usize = 10_000;
/// Most `[ip.cidr.*]` entries in one policy (each Reserve with a client IP scans them).
pub const MAX_CIDR_ENTRIES: usize = 1_024;
/// IPv6 addresses are counted per /64: the smallest block a site is routed, so one host
/// cannot dodge its IP's limits by rotating through the 2⁶⁴ addresses it owns.
pub const IPV6_SCOPE_PREFIX: u8 = 64;

/// The limits of groups, client IPs and the fleet. A scope the policy says nothing about is
/// unlimited (and still counted, for GetUsage and the savings figures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeLimits {
    /// `[groups.default]`: every group without its own entry.
    pub group_default: Arc<Limits>,
    /// `[groups."name"]`, each already completed with `[groups.default]`'s values.
    pub groups: BTreeMap<String, Arc<Limits>>,
    /// `[ip]`: every client IP outside the CIDR entries.
    pub ip_default: Arc<Limits>,
    /// `[ip.cidr."net"]`, most specific (longest prefix) first, each completed with `[ip]`.
    pub ip_ranges: Vec<(IpNet, Arc<Limits>)>,
    /// `[global]`: all traffic together.
    pub global: Arc<Limits>,
}

impl Default for ScopeLimits {
    fn default() -> Self {
        let unlimited = Arc::new(Limits::unlimited());
        Self {
            group_default: unlimited.clone(),
            groups: BTreeMap::new(),
            ip_default: unlimited.clone(),
            ip_ranges: Vec::new(),
            global: unlimited,
        }
    }
}

impl ScopeLimits {
    /// A group's limits: its own entry, else `[groups.default]`.
    pub fn group(&self, name: &str) -> Arc<Limits> {
        self.groups.get(name).unwrap_or(&self.group_default).clone()
    }

    /// A client IP's limits (`ip` as [`ip_scope_key`] gives it): the most specific CIDR entry
    /// that contains it, else `[ip]`.
    pub fn ip(&self, ip: IpAddr) -> Arc<Limits> {
        self.ip_ranges
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map_or(&self.ip_default, |(_, l)| l)
            .clone()
    }

    /// The fleet's limits.
    pub fn global(&self) -> Arc<Limits> {
        self.global.clone()
    }
}

/// The address a client IP is counted under: IPv4 as it is (an IPv4-mapped IPv6 address is
/// the IPv4 address), IPv6 as its /64 network.
pub fn ip_scope_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let mask = u128::MAX << (128 - u32::from(IPV6_SCOPE_PREFIX));
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_scope_key(a), ip_scope_key(b));
        assert_ne!(ip_scope_key(a), ip_scope_key(c));
        assert_eq!(ip_scope_key(a).to_string(), "2001:db8:1:2::");
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(ip_scope_key(mapped).to_string(), "203.0.113.7");
    }
}
