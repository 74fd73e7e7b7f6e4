//! What the targets' retry loops share: how a failure is handled ([`Class`]) and the backoff between tries
//! ([`Policy`]). Each target classifies its own SDK's errors into a `Class` (`aws::retry`, `azure::retry`).

use std::time::Duration;

/// How a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Try again after a backoff.
    Retry,
    /// Try again, and lower the request rate.
    Throttle,
    /// The resource may not be visible yet (eventual consistency).
    NotFoundYet,
    /// Give up.
    Fatal,
}

/// Retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Attempts for retryable failures (1 = no retry).
    pub max_attempts: u32,
    /// First backoff.
    pub base: Duration,
    /// Longest backoff.
    pub cap: Duration,
    /// How long "not found yet" is retried.
    pub not_found_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_attempts: 10,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(20),
            not_found_grace: Duration::from_secs(120),
        }
    }
}

impl Policy {
    /// Backoff before attempt `attempt` (1-based retry count): capped exponential with full jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.min(16));
        let max = exp.min(self.cap);
        let ms = rand::random_range(max.as_millis() as u64 / 2..=max.as_millis().max(1) as u64);
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        let p = Policy::default();
        for a in 1..40 {
            assert!(p.backoff(a) <= p.cap);
        }
    }
}
