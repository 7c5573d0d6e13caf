//! Jittered exponential backoff, shared by polling and reconnects.

use std::time::Duration;

use rand::Rng;

/// `min(base · 2^(n-1) · U(0.5, 1.5), cap)`, with `n` clamped to `1..=30`.
pub(crate) fn compute(n: u32, base: Duration, cap: Duration) -> Duration {
    let n = n.clamp(1, 30);
    let factor = rand::rng().random_range(0.5..1.5);
    let secs = base.as_secs_f64() * 2f64.powi(i32::try_from(n - 1).unwrap_or(29)) * factor;
    Duration::from_secs_f64(secs.min(cap.as_secs_f64()))
}

/// Backoff for reconnect loops: grows with consecutive failures, capped at
/// 30 s, and starts from the minimum again for each new incident once a
/// connection has worked (a statement succeeded on it). Opening a connection
/// alone does not count: a server that accepts connections and then drops
/// them keeps the backoff growing.
#[derive(Debug, Default)]
pub(crate) struct Reconnect {
    failures: u32,
}

pub(crate) const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// The first wait of an incident is `RECONNECT_BASE · U(0.5, 1.5)`.
pub(crate) const RECONNECT_BASE: Duration = Duration::from_secs(1);

impl Reconnect {
    /// A statement succeeded: the incident, if any, is over.
    pub(crate) fn worked(&mut self) {
        self.failures = 0;
    }

    /// Records a failure and returns how long to wait before the next try.
    pub(crate) fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1).min(30);
        compute(self.failures, RECONNECT_BASE, RECONNECT_CAP)
    }

    #[cfg(test)]
    fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_jitter_bounds_and_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(10);
        for n in 1..=8 {
            let nominal = 0.1 * 2f64.powi(i32::try_from(n - 1).expect("small"));
            for _ in 0..100 {
                let d = compute(n, base, cap).as_secs_f64();
                assert!(d >= nominal * 0.5 - 1e-9, "{n}: {d}");
                assert!(d <= (nominal * 1.5).min(10.0) + 1e-9, "{n}: {d}");
            }
        }
        assert_eq!(compute(1000, base, cap), cap);
        assert!(compute(0, base, cap) <= Duration::from_millis(150));
    }

    #[test]
    fn reconnect_starts_over_once_a_connection_worked() {
        let mut r = Reconnect::default();
        r.failed();
        r.failed();
        assert_eq!(r.failures(), 2);
        r.failed(); // reconnected, but nothing worked on it: the same incident
        assert_eq!(r.failures(), 3);
        r.worked();
        let wait = r.failed(); // a new incident starts from the minimum
        assert_eq!(r.failures(), 1);
        assert!(wait <= RECONNECT_BASE.mul_f64(1.5), "{wait:?}");
    }
}
