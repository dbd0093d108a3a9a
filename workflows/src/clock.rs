//! Time as an input. The scheduler and the alert engine ask a [`Clock`] for
//! "now" instead of calling `Utc::now()`, so tests can stand on the last day
//! of February or jump over a downtime without waiting for it.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use parking_lot::Mutex;

/// A source of the current UTC time.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to (tests). Clones share the time.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(Arc::new(Mutex::new(at)))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock() = at;
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let t0 = "2027-02-28T23:59:00Z".parse::<DateTime<Utc>>().unwrap();
        let c = ManualClock::new(t0);
        let shared = c.clone();
        assert_eq!(c.now(), t0);
        shared.advance(Duration::minutes(2));
        assert_eq!(c.now(), t0 + Duration::minutes(2));
        c.set(t0);
        assert_eq!(shared.now(), t0);
    }
}
