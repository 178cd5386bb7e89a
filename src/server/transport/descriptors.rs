//! The open-files limit: raised at start, and what it leaves for connections.
//!
//! Every connection is a descriptor. A soft limit below the hard one (1,024 is common) is
//! raised to the hard one, since nothing is gained by running out early; the `rlimit` crate
//! does it portably (on macOS the kernel's own ceiling applies too). The connection bound's
//! default is what the limit leaves after a reserve for everything else the process opens:
//! sled's files, the listeners, the metrics endpoint and its scrapes, the relay's upstream
//! connection, stdio and the runtime's own descriptors. It is capped, since each connection
//! also holds memory (see the README's Bounds table).

use std::sync::OnceLock;

/// Descriptors kept for the process's other files and sockets.
pub(super) const RESERVED_DESCRIPTORS: u64 = 128;

/// The default connection bound never exceeds this, whatever the open-files limit.
pub(super) const MAX_CONNECTIONS_CAP: u64 = 10_000;

/// Raise the soft open-files limit to the hard one (once a process); the soft limit now in
/// force.
pub(super) fn raise_open_files_limit() -> u64 {
    static SOFT: OnceLock<u64> = OnceLock::new();
    *SOFT.get_or_init(|| match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
            tracing::warn!(error = %e, open_files = soft, "cannot raise the open-files limit");
            soft
        }
    })
}

/// The default of `--max-connections` for a soft open-files limit of `open_files`.
pub(super) fn default_max_connections(open_files: u64) -> usize {
    let n = open_files
        .saturating_sub(RESERVED_DESCRIPTORS)
        .clamp(1, MAX_CONNECTIONS_CAP);
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_bound_leaves_a_reserve_and_is_capped() {
        assert_eq!(default_max_connections(1024), 896);
        assert_eq!(default_max_connections(256), 128);
        assert_eq!(default_max_connections(100), 1);
        assert_eq!(default_max_connections(1 << 20), 10_000);
    }
}
