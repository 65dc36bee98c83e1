//! The budget's arithmetic as plain code, `now` passed in: windows, admission against
//! the caps, and settling a reservation into spend. The store calls it inside the
//! transaction that holds the account's ledger row, so the check and the reservation
//! are one atomic step on every path (submit, approval, retry) and across coordinators.
//!
//! Invariant: for every account and month, `0 <= reserved` and `0 <= spent`, and
//! `reserved + spent <= month cap` holds after any admission (the cap may be lowered
//! below what is already committed; then nothing more is admitted).

use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;

/// An account's caps. The default (no row) is zero: nothing paid runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// For one submission (a single job or a whole array).
    pub run: Decimal,
    /// For one calendar month, UTC.
    pub month: Decimal,
}

/// What an account has committed in one month.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub reserved: Decimal,
    pub spent: Decimal,
}

/// Why a submission does not fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The estimate alone passes the per-run cap.
    Run { account: String, cap: Decimal, estimate: Decimal },
    /// Reserved + spent + the estimate passes the month's cap.
    Month { account: String, month: String, cap: Decimal, reserved: Decimal, spent: Decimal, estimate: Decimal },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Run { account, cap, estimate } if cap.is_zero() => write!(
                f,
                "refused by the budget: account `{account}` has no budget for paid pools (this job may cost up to ${estimate}); an admin sets one with `berth budget set --account {account} --run N --month N`"
            ),
            Refusal::Run { account, cap, estimate } => {
                write!(f, "refused by the budget: run window of account `{account}`: this submission may cost up to ${estimate}, over the per-run cap of ${cap}")
            }
            Refusal::Month { account, month, cap, reserved, spent, estimate } => write!(
                f,
                "refused by the budget: month window {month} of account `{account}`: cap ${cap}, reserved ${reserved}, spent ${spent}, this submission up to ${estimate}: {} > {cap}",
                reserved + spent + estimate
            ),
        }
    }
}

/// The month window `now` falls in: `YYYY-MM`, UTC.
pub fn month_of(now: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", now.year(), now.month())
}

/// Whether a run estimated at `estimate` fits; on success, the usage after reserving.
/// A zero estimate (free pools only) always fits and reserves nothing.
pub fn admit(account: &str, month: &str, caps: Caps, usage: Usage, estimate: Decimal) -> Result<Usage, Refusal> {
    if estimate.is_zero() {
        return Ok(usage);
    }
    if estimate > caps.run {
        return Err(Refusal::Run { account: account.into(), cap: caps.run, estimate });
    }
    if usage.reserved + usage.spent + estimate > caps.month {
        return Err(Refusal::Month { account: account.into(), month: month.into(), cap: caps.month, reserved: usage.reserved, spent: usage.spent, estimate });
    }
    Ok(Usage { reserved: usage.reserved + estimate, spent: usage.spent })
}

/// Turns part of a reservation into spend: `actual` is charged (never more than the
/// part reserved for it: the reservation is the hard upper bound) and `part` leaves
/// the reservation. Returns the new usage and what was charged.
pub fn settle(usage: Usage, part: Decimal, actual: Decimal) -> (Usage, Decimal) {
    let part = part.max(Decimal::ZERO).min(usage.reserved);
    let charged = actual.max(Decimal::ZERO).min(part);
    (Usage { reserved: usage.reserved - part, spent: usage.spent + charged }, charged)
}

/// The upper-bound estimate of one task: (max runtime + idle tail) × rate × attempts,
/// where `usd_per_s` is the costliest eligible pool's rate for the job's resources.
pub fn task_estimate(max_runtime_ms: u64, idle_tail_s: u64, usd_per_s: Decimal, attempts: u32) -> Decimal {
    let secs = Decimal::from(max_runtime_ms) / Decimal::from(1000) + Decimal::from(idle_tail_s);
    (secs * usd_per_s * Decimal::from(attempts)).round_dp_with_strategy(6, rust_decimal::RoundingStrategy::AwayFromZero)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("decimal")
    }

    #[test]
    fn the_month_window_rolls_at_midnight_utc_on_the_first() {
        let before = DateTime::parse_from_rfc3339("2026-11-30T23:59:59.999Z").expect("time").with_timezone(&Utc);
        let after = DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z").expect("time").with_timezone(&Utc);
        assert_eq!(month_of(before), "2026-11");
        assert_eq!(month_of(after), "2026-12");
        let jan = DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z").expect("time").with_timezone(&Utc);
        assert_eq!(month_of(jan), "2027-01");
    }

    #[test]
    fn admission_checks_both_windows() {
        let caps = Caps { run: d("50"), month: d("100") };
        let u = admit("a", "2026-11", caps, Usage::default(), d("40")).expect("fits");
        assert_eq!(u.reserved, d("40"));
        assert!(matches!(admit("a", "2026-11", caps, u, d("51")), Err(Refusal::Run { .. })));
        let u = admit("a", "2026-11", caps, u, d("50")).expect("fits: 90");
        let e = admit("a", "2026-11", caps, u, d("10.000001")).expect_err("over the month");
        assert!(e.to_string().contains("month window 2026-11"), "{e}");
        // Free work never needs a budget.
        assert_eq!(admit("a", "2026-11", Caps::default(), u, Decimal::ZERO), Ok(u));
        let e = admit("b", "2026-11", Caps::default(), Usage::default(), d("0.01")).expect_err("no budget");
        assert!(e.to_string().contains("no budget"), "{e}");
    }

    #[test]
    fn ten_thousand_tiny_charges_sum_exactly() {
        let mut u = Usage { reserved: d("1"), spent: Decimal::ZERO };
        for _ in 0..10_000 {
            u = settle(u, d("0.0001"), d("0.0001")).0;
        }
        assert_eq!((u.reserved, u.spent), (Decimal::ZERO, d("1")));
    }

    #[derive(Clone, Debug)]
    enum Step {
        Admit(i64),
        Settle { job: usize, actual_frac: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![(1i64..5_000_000).prop_map(Step::Admit), (any::<usize>(), 0u8..=120).prop_map(|(job, actual_frac)| Step::Settle { job, actual_frac })]
    }

    proptest! {
        /// Any interleaving of admissions and settlements (full, partial, over-run
        /// charges, releases) keeps reserved and spent non-negative and within the caps,
        /// and the reservations of open jobs add up to `reserved` exactly.
        #[test]
        fn the_ledger_never_passes_a_cap(steps in proptest::collection::vec(step(), 1..200), run in 1i64..10_000_000, month in 1i64..50_000_000) {
            let caps = Caps { run: Decimal::new(run, 6), month: Decimal::new(month, 6) };
            let mut u = Usage::default();
            let mut open: Vec<Decimal> = Vec::new();
            for s in steps {
                match s {
                    Step::Admit(micro) => {
                        let est = Decimal::new(micro, 6);
                        if let Ok(next) = admit("a", "m", caps, u, est) {
                            u = next;
                            open.push(est);
                        }
                    }
                    Step::Settle { job, actual_frac } if !open.is_empty() => {
                        let part = open.remove(job % open.len());
                        // Up to 120 % of the reservation: an over-run is capped.
                        let actual = part * Decimal::from(actual_frac) / Decimal::from(100);
                        let (next, charged) = settle(u, part, actual);
                        prop_assert!(charged <= part);
                        u = next;
                    }
                    Step::Settle { .. } => {}
                }
                prop_assert!(u.reserved >= Decimal::ZERO && u.spent >= Decimal::ZERO);
                prop_assert!(u.reserved + u.spent <= caps.month, "{u:?} over {caps:?}");
                prop_assert_eq!(u.reserved, open.iter().copied().sum::<Decimal>());
            }
        }
    }
}
