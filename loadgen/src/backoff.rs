//! The OCPP 2.0.1 reconnect back-off (`RetryBackOffWaitMinimum`,
//! `RetryBackOffRandomRange`, `RetryBackOffRepeatTimes`): a minimum wait
//! that doubles per failed attempt up to a number of doublings, plus a
//! uniformly random part so a fleet that lost power together does not
//! reconnect in lockstep.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Wait before the first attempt (without the random part).
    pub min: Duration,
    /// Upper bound (exclusive) of the random part added to every wait.
    pub random_range: Duration,
    /// How many times the minimum doubles: attempts past this one wait as
    /// long as the last doubled one.
    pub doublings: u32,
}

impl Backoff {
    /// The deterministic part of the wait before attempt `attempt` (0 = the
    /// first reconnect): `min * 2^min(attempt, doublings)`.
    pub fn base(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.min(self.doublings).min(20);
        self.min.saturating_mul(factor)
    }

    /// The full wait: [`Self::base`] plus a uniform value in `[0, random_range)`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let random = if self.random_range.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(rng.random_range(0.0..self.random_range.as_secs_f64()))
        };
        self.base(attempt) + random
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn doubles_up_to_the_cap_plus_random() {
        let b = Backoff {
            min: Duration::from_secs(1),
            random_range: Duration::from_secs(2),
            doublings: 3,
        };
        let bases: Vec<u64> = (0..6).map(|a| b.base(a).as_secs()).collect();
        assert_eq!(bases, [1, 2, 4, 8, 8, 8]);
        let mut rng = StdRng::seed_from_u64(7);
        let mut saw_low = false;
        let mut saw_high = false;
        for attempt in 0..6 {
            for _ in 0..200 {
                let d = b.delay(attempt, &mut rng);
                let extra = d - b.base(attempt);
                assert!(extra < Duration::from_secs(2), "{d:?}");
                saw_low |= extra < Duration::from_millis(500);
                saw_high |= extra > Duration::from_millis(1500);
            }
        }
        assert!(saw_low && saw_high, "random part spans its range");
    }

    #[test]
    fn zero_range_is_deterministic() {
        let b = Backoff {
            min: Duration::from_millis(250),
            random_range: Duration::ZERO,
            doublings: 1,
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(b.delay(0, &mut rng), Duration::from_millis(250));
        assert_eq!(b.delay(9, &mut rng), Duration::from_millis(500));
    }
}
