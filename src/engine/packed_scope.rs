//! How the engine keeps a scope's state in memory: [`ScopeState`] packed, with the counters
//! few scopes ever touch kept apart.
//!
//! Why not `ScopeState` itself: it is the record the store writes (one fixed shape for every
//! scope), and in memory it costs 288 bytes, because its 13 period counters are
//! `{u32, u64}` padded to 16 bytes each, its `Option<TokenBucket>` is aligned to 16, and a
//! subject that only spends tokens pays for denials, downgrades, savings and the downgrade
//! budget it never uses. A million subjects made that most of a gigabyte. Packed, a subject
//! with usage takes 144 bytes: the periods of the counters every charge touches side by side,
//! the bucket's level as two words, and the rest (shadow denials, denials, downgrades, savings,
//! the downgrade budget) boxed, allocated only while one of them is not a fresh counter's.
//!
//! The conversion is exact both ways ([`PackedScope::pack`] then [`PackedScope::state`] gives
//! back the same `ScopeState`, field for field), so decisions, records and GetUsage read
//! exactly what they read before.

use super::{PeriodCounter, RequestWindow, ScopeState, TokenBucket};

/// The counters every charge writes, by index into [`PackedScope`]'s arrays.
const DAY_TOKENS: usize = 0;
const MONTH_TOKENS: usize = 1;
const DAY_REQUESTS: usize = 2;
const DAY_USD: usize = 3;
const MONTH_USD: usize = 4;

/// A scope's state as kept in the engine's scope table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PackedScope {
    /// The bucket's level, low and high words of the `i128` (two `u64`s keep the alignment at
    /// 8 rather than 16).
    bucket_level: [u64; 2],
    bucket_updated_us: u64,
    window: RequestWindow,
    /// Periods of the common counters (see the index constants).
    periods: [u32; 5],
    open_holds: u32,
    /// Counts of the common counters.
    values: [u64; 5],
    held_tokens: u64,
    held_usd: u64,
    has_bucket: bool,
    /// The counters few scopes touch; `None` while all are a fresh counter's.
    rare: Option<Box<RareCounters>>,
}

/// The part of a scope's state that only denials, shadow mode, downgrades and the downgrade
/// budget write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RareCounters {
    day_shadow_denials: PeriodCounter,
    day_denials: PeriodCounter,
    day_downgrades: PeriodCounter,
    day_saved_usd: PeriodCounter,
    month_saved_usd: PeriodCounter,
    downgrade_day_tokens: PeriodCounter,
    downgrade_held_tokens: u64,
}

impl PackedScope {
    /// `state`, packed.
    pub(super) fn pack(state: &ScopeState) -> Self {
        let common = [
            state.day_tokens,
            state.month_tokens,
            state.day_requests,
            state.day_usd,
            state.month_usd,
        ]
        .map(|c| c.parts());
        let (level, updated_us) = state.bucket.map_or((0, 0), |b| b.parts());
        let rare = RareCounters {
            day_shadow_denials: state.day_shadow_denials,
            day_denials: state.day_denials,
            day_downgrades: state.day_downgrades,
            day_saved_usd: state.day_saved_usd,
            month_saved_usd: state.month_saved_usd,
            downgrade_day_tokens: state.downgrade_day_tokens,
            downgrade_held_tokens: state.downgrade_held_tokens,
        };
        Self {
            // The i128 split into its low and high 64 bits (the casts keep the bits).
            bucket_level: [level as u64, (level >> 64) as u64],
            bucket_updated_us: updated_us,
            window: state.window,
            periods: common.map(|(p, _)| p),
            open_holds: state.open_holds,
            values: common.map(|(_, v)| v),
            held_tokens: state.held_tokens,
            held_usd: state.held_usd,
            has_bucket: state.bucket.is_some(),
            rare: (rare != RareCounters::default()).then(|| Box::new(rare)),
        }
    }

    /// The state, unpacked.
    pub(super) fn state(&self) -> ScopeState {
        let counter = |i: usize| PeriodCounter::from_parts(self.periods[i], self.values[i]);
        let level =
            (i128::from(self.bucket_level[1] as i64) << 64) | i128::from(self.bucket_level[0]);
        let rare = self.rare.as_deref().copied().unwrap_or_default();
        ScopeState {
            bucket: self
                .has_bucket
                .then(|| TokenBucket::from_parts(level, self.bucket_updated_us)),
            window: self.window,
            day_tokens: counter(DAY_TOKENS),
            month_tokens: counter(MONTH_TOKENS),
            day_requests: counter(DAY_REQUESTS),
            day_shadow_denials: rare.day_shadow_denials,
            day_denials: rare.day_denials,
            day_downgrades: rare.day_downgrades,
            day_usd: counter(DAY_USD),
            month_usd: counter(MONTH_USD),
            day_saved_usd: rare.day_saved_usd,
            month_saved_usd: rare.month_saved_usd,
            downgrade_day_tokens: rare.downgrade_day_tokens,
            held_tokens: self.held_tokens,
            downgrade_held_tokens: rare.downgrade_held_tokens,
            held_usd: self.held_usd,
            open_holds: self.open_holds,
        }
    }

    /// Replace the state with `state`, keeping the rare counters' box when it is still needed
    /// (a scope that is denied again and again does not allocate each time).
    pub(super) fn set(&mut self, state: &ScopeState) {
        let mut packed = Self::pack(state);
        if let (Some(old), Some(new)) = (self.rare.as_mut(), packed.rare.as_deref()) {
            **old = *new;
            packed.rare = self.rare.take();
        }
        *self = packed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(period: u32, value: u64) -> PeriodCounter {
        PeriodCounter::from_parts(period, value)
    }

    /// Every field survives packing, including the bucket's negative level (debt), a level
    /// beyond 64 bits, a counter whose count is zero in a later period (it still names the
    /// period a clock that stepped back counts in), and the rare counters.
    #[test]
    fn packing_gives_back_the_same_state() {
        let full = ScopeState {
            bucket: Some(TokenBucket::from_parts(-(1i128 << 70) - 3, 17)),
            window: RequestWindow::default(),
            day_tokens: counter(20_000, 5),
            month_tokens: counter(660, u64::MAX),
            day_requests: counter(20_000, 1),
            day_shadow_denials: counter(20_001, 2),
            day_denials: counter(20_000, 3),
            day_downgrades: counter(19_999, 4),
            day_usd: counter(20_002, 0),
            month_usd: counter(661, 6),
            day_saved_usd: counter(1, 7),
            month_saved_usd: counter(2, 8),
            downgrade_day_tokens: counter(3, 9),
            held_tokens: 10,
            downgrade_held_tokens: 11,
            held_usd: 12,
            open_holds: 13,
        };
        let plain = ScopeState {
            bucket: Some(TokenBucket::from_parts(1i128 << 100, u64::MAX)),
            day_tokens: counter(20_000, 5),
            ..ScopeState::default()
        };
        let only_rare = ScopeState {
            day_denials: counter(20_000, 0),
            ..ScopeState::default()
        };
        for state in [full, plain, only_rare, ScopeState::default()] {
            let packed = PackedScope::pack(&state);
            assert_eq!(packed.state(), state);
            assert_eq!(packed.rare.is_some(), state == full || state == only_rare);
            let mut reused = PackedScope::pack(&full);
            reused.set(&state);
            assert_eq!(reused, packed);
        }
    }

    /// The point of the packing: a subject's state takes half of a `ScopeState` (288 bytes).
    #[test]
    fn a_packed_scope_is_small() {
        assert!(std::mem::size_of::<PackedScope>() <= 144);
    }
}
