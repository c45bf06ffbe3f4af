//! Scheduling math: when to renew, how long to back off. Pure functions of
//! their inputs (the random draw is passed in) so they are testable.

use std::time::{Duration, SystemTime};

use crate::attributes::RenewBefore;

/// Share of the window before the renewal point over which explicit
/// `renew-before` times are spread.
const EXPLICIT_JITTER: f64 = 0.1;

/// The moment to renew a certificate valid from `not_before` to `not_after`.
/// `draw` is a uniform random number in `[0, 1)`.
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: RenewBefore,
    draw: f64,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let draw = draw.clamp(0.0, 1.0);
    let before = match renew_before {
        RenewBefore::Default => None,
        RenewBefore::Duration(d) => Some(d),
        RenewBefore::Fraction(f) => Some(lifetime.mul_f64(f)),
    };
    match before {
        // The CA may have shortened the lifetime below the requested
        // renew-before: fall back to the default window.
        Some(before) if before < lifetime => {
            let base = lifetime - before;
            let jitter = base.min(before).mul_f64(EXPLICIT_JITTER * draw);
            not_before + (base - jitter)
        }
        _ => not_before + lifetime.mul_f64(0.5 + 0.2 * draw),
    }
}

/// Exponential backoff with jitter for the `attempt`-th consecutive failure
/// (0-based): `min(cap, base·2^attempt)`, then a uniform draw between half
/// and all of it.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, draw: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(20));
    let full = exp.min(cap);
    full.mul_f64(0.5 + 0.5 * draw.clamp(0.0, 1.0))
}

/// How long from `now` until `at` (zero if it has passed).
pub fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn default_window_is_50_to_70_percent() {
        let nb = t0();
        let na = nb + 10 * HOUR;
        assert_eq!(
            renewal_time(nb, na, RenewBefore::Default, 0.0),
            nb + 5 * HOUR
        );
        assert_eq!(
            renewal_time(nb, na, RenewBefore::Default, 1.0),
            nb + 7 * HOUR
        );
        let mid = renewal_time(nb, na, RenewBefore::Default, 0.5);
        assert_eq!(mid, nb + 6 * HOUR);
    }

    #[test]
    fn explicit_renew_before_with_small_jitter() {
        let nb = t0();
        let na = nb + 24 * HOUR;
        let at = renewal_time(nb, na, RenewBefore::Duration(8 * HOUR), 0.0);
        assert_eq!(at, na - 8 * HOUR);
        let early = renewal_time(nb, na, RenewBefore::Duration(8 * HOUR), 1.0);
        // Jitter is 10 % of min(16h, 8h) = 48 minutes.
        assert_eq!(early, na - 8 * HOUR - Duration::from_secs(48 * 60));
        let frac = renewal_time(nb, na, RenewBefore::Fraction(0.25), 0.0);
        assert_eq!(frac, na - 6 * HOUR);
    }

    #[test]
    fn renew_before_longer_than_issued_lifetime_falls_back() {
        let nb = t0();
        let na = nb + HOUR;
        let at = renewal_time(nb, na, RenewBefore::Duration(2 * HOUR), 0.0);
        assert_eq!(at, nb + HOUR / 2);
    }

    #[test]
    fn renewal_is_never_before_issuance_or_after_expiry() {
        let nb = t0();
        for secs in [1u64, 2, 7, 60, 3600, 86_400 * 90] {
            let na = nb + Duration::from_secs(secs);
            for rb in [
                RenewBefore::Default,
                RenewBefore::Fraction(0.01),
                RenewBefore::Fraction(0.99),
                RenewBefore::Duration(Duration::from_secs(secs / 2)),
            ] {
                for draw in [0.0, 0.3, 0.999] {
                    let at = renewal_time(nb, na, rb, draw);
                    assert!(at >= nb && at <= na, "{secs}s {rb:?} {draw}");
                }
            }
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(300);
        assert_eq!(backoff(0, base, cap, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(3, base, cap, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(20, base, cap, 1.0), cap);
        assert_eq!(backoff(u32::MAX, base, cap, 0.0), cap / 2);
    }

    #[test]
    fn until_saturates() {
        assert_eq!(until(t0(), t0() + HOUR), Duration::ZERO);
        assert_eq!(until(t0() + HOUR, t0()), HOUR);
    }
}
