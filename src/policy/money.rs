//! Money: model prices and costs, in integer micro-dollars.
//!
//! Why integers: a budget is compared and summed millions of times, and a float sum depends on
//! the order of its terms. Every amount tollgate keeps is a `u64` of micro-dollars (µUSD,
//! 10⁻⁶ USD); prices are µUSD per million tokens. The policy writes dollars as decimals
//! (`2.5`), converted once, at load, and refused if they have more than six decimal places.

use serde::{Deserialize, Serialize};

/// Micro-dollars in a dollar.
pub const MICRO_USD_PER_USD: u64 = 1_000_000;
/// Highest price a model may have: $100,000 per million tokens. Far above any model's, and
/// low enough that no cost of one request can overflow.
pub const MAX_PRICE_USD_PER_MILLION: f64 = 100_000.0;

/// What a model costs, in µUSD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Price {
    /// Per million prompt (input) tokens.
    pub input_per_million: u64,
    /// Per million completion (output) tokens.
    pub output_per_million: u64,
}

impl Price {
    /// The cost of `input` prompt tokens and `output` completion tokens, in µUSD, rounded up
    /// to a whole micro-dollar: a call is never priced below what it costs, and a priced call
    /// never costs nothing. One rounding per request, so the figure a caller computes from the
    /// same prices is exactly tollgate's.
    pub fn cost(&self, input: u64, output: u64) -> u64 {
        let micro_millionths = (u128::from(input) * u128::from(self.input_per_million))
            .saturating_add(u128::from(output) * u128::from(self.output_per_million));
        u64::try_from(micro_millionths.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// Dollars (as written in the policy) in whole micro-dollars, if the value is a non-negative
/// number of at most six decimal places no larger than `max`.
pub fn micro_usd(dollars: f64, max: f64) -> Result<u64, String> {
    if !dollars.is_finite() || dollars < 0.0 {
        return Err("must be a non-negative number of dollars".into());
    }
    if dollars > max {
        return Err(format!("must be at most {max} dollars"));
    }
    let micros = dollars * MICRO_USD_PER_USD as f64;
    let whole = micros.round();
    // A decimal of at most six places lands within float noise of a whole micro-dollar.
    if (micros - whole).abs() > 1e-3 {
        return Err(
            "must have at most six decimal places (amounts are whole micro-dollars)".into(),
        );
    }
    Ok(whole as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_convert_exactly() {
        assert_eq!(micro_usd(2.5, 1e9), Ok(2_500_000));
        assert_eq!(micro_usd(0.15, 1e9), Ok(150_000));
        assert_eq!(micro_usd(0.000001, 1e9), Ok(1));
        assert_eq!(micro_usd(10.0, 1e9), Ok(10_000_000));
        assert!(micro_usd(0.0000001, 1e9).is_err());
        assert!(micro_usd(-1.0, 1e9).is_err());
        assert!(micro_usd(f64::NAN, 1e9).is_err());
        assert!(micro_usd(2e9, 1e9).is_err());
    }

    #[test]
    fn cost_rounds_up_once_per_request() {
        // gpt-4o at $2.50 / $10.00 per million: 1,000 in + 500 out = 2,500 + 5,000 µUSD.
        let p = Price {
            input_per_million: 2_500_000,
            output_per_million: 10_000_000,
        };
        assert_eq!(p.cost(1_000, 500), 7_500);
        // gpt-4o-mini at $0.15 / $0.60: 7 in + 3 out = 1.05 + 1.8 = 2.85 µUSD -> 3.
        let mini = Price {
            input_per_million: 150_000,
            output_per_million: 600_000,
        };
        assert_eq!(mini.cost(7, 3), 3);
        assert_eq!(mini.cost(0, 0), 0);
        let max = Price {
            input_per_million: u64::MAX,
            output_per_million: u64::MAX,
        };
        assert_eq!(
            max.cost(u64::MAX, u64::MAX),
            u64::MAX,
            "saturates, never wraps"
        );
    }
}
