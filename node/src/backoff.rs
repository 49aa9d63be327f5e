//! Crash backoff, as the kubelet does it: the delay before restarting a
//! container that exited starts at `base` (10 s), doubles with each further
//! exit up to `max` (5 min), and resets once the container has run for
//! `reset_after` (10 min) without exiting.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub base: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// One container's backoff state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    /// Exits counted since the last reset.
    pub crashes: u32,
}

impl Backoff {
    /// The delay for the `n`-th consecutive exit (1-based): base · 2^(n−1), capped.
    pub fn delay_for(policy: &BackoffPolicy, n: u32) -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        let shift = (n - 1).min(31);
        policy
            .base
            .checked_mul(1u32 << shift)
            .unwrap_or(policy.max)
            .min(policy.max)
    }

    /// Records an exit after the container ran for `ran`; returns the delay
    /// to wait before the next start.
    pub fn on_exit(&mut self, policy: &BackoffPolicy, ran: Duration) -> Duration {
        if ran >= policy.reset_after {
            self.crashes = 0;
        }
        self.crashes = self.crashes.saturating_add(1);
        Self::delay_for(policy, self.crashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_ten_seconds_to_five_minutes() {
        let p = BackoffPolicy::default();
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8)
            .map(|_| b.on_exit(&p, Duration::from_secs(1)).as_secs())
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn resets_after_ten_minutes_of_running() {
        let p = BackoffPolicy::default();
        let mut b = Backoff::default();
        for _ in 0..4 {
            b.on_exit(&p, Duration::from_secs(5));
        }
        assert_eq!(b.on_exit(&p, Duration::from_secs(599)).as_secs(), 160);
        assert_eq!(b.on_exit(&p, Duration::from_secs(600)).as_secs(), 10);
        assert_eq!(b.crashes, 1);
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let p = BackoffPolicy::default();
        assert_eq!(Backoff::delay_for(&p, u32::MAX), p.max);
        assert_eq!(Backoff::delay_for(&p, 0), Duration::ZERO);
    }
}
