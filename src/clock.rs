//! Instants from configured durations. Validation bounds every configured duration (one year,
//! `config::parse`), and a deadline is still computed here with a checked addition, so that no
//! value that slips past validation (a bug, a future key) can panic a core with "overflow when
//! adding duration to instant": the deadline saturates at a year from now instead.

use std::time::{Duration, Instant};

/// Far enough to mean "never" for any timeout, small enough to add to any `Instant`.
const FAR: Duration = Duration::from_secs(366 * 24 * 3600);

/// `now + d`, saturating at about a year from now.
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(FAR))
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// `Instant::now() + d`, saturating.
pub(crate) fn deadline(d: Duration) -> Instant {
    after(Instant::now(), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_durations_saturate_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(after(now, Duration::MAX), now + FAR);
        assert_eq!(after(now, Duration::from_secs(u64::MAX)), now + FAR);
        assert!(deadline(Duration::MAX) > Instant::now());
    }
}
