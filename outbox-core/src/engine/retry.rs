//! Retry strategies: how long to wait before a failed row is tried again, and
//! when to give up.
//!
//! A strategy sees the attempt count (1-based, this attempt included), the
//! first and latest attempt times and the handler's error, so it can retry
//! only transient errors:
//!
//! ```
//! use std::time::Duration;
//! use outbox_core::retry::{ExponentialRetry, RetryContext, RetryStrategy};
//! use outbox_core::BoxError;
//!
//! /// Retries timeouts, gives up at once on anything else.
//! #[derive(Debug)]
//! struct OnlyTimeouts(ExponentialRetry);
//!
//! impl RetryStrategy for OnlyTimeouts {
//!     fn next_delay(&self, ctx: &RetryContext<'_>) -> Result<Option<Duration>, BoxError> {
//!         let transient = ctx.error.is_some_and(|e| e.to_string().contains("timed out"));
//!         if transient { self.0.next_delay(ctx) } else { Ok(None) }
//!     }
//! }
//! ```
//!
//! Returning `Ok(None)` makes the failure terminal (`retry_terminal`). A
//! strategy that returns `Err` or panics is logged and also yields
//! `retry_terminal`: the row goes to the dead-letter table (or is deleted when
//! none is configured), it is never lost silently nor retried forever.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;

use crate::error::BoxError;

/// The longest delay any built-in strategy returns: 100 years.
pub const MAX_DELAY: Duration = Duration::from_secs(3_153_600_000);

/// What a strategy knows about the failed attempt.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RetryContext<'a> {
    /// Attempts so far, this one included (1 on the first failure).
    pub attempts_count: u64,
    /// When the first attempt happened.
    pub first_attempt_at: DateTime<Utc>,
    /// When this attempt happened.
    pub last_attempt_at: DateTime<Utc>,
    /// The handler's error, if it returned or raised one (a `nack()` without an
    /// error has none).
    pub error: Option<&'a (dyn std::error::Error + Send + Sync + 'static)>,
}

impl<'a> RetryContext<'a> {
    /// A context, for tests of custom strategies.
    pub fn new(
        attempts_count: u64,
        first_attempt_at: DateTime<Utc>,
        last_attempt_at: DateTime<Utc>,
        error: Option<&'a (dyn std::error::Error + Send + Sync + 'static)>,
    ) -> Self {
        Self {
            attempts_count,
            first_attempt_at,
            last_attempt_at,
            error,
        }
    }

    /// Whether the error is (or was caused by) a bus's permanent refusal,
    /// a [`BusRejection`](crate::transport::BusRejection): retrying the row
    /// will fail the same way. The default strategy makes such rows terminal
    /// at once; a custom strategy can do the same by returning `Ok(None)`.
    pub fn is_bus_rejection(&self) -> bool {
        self.error.is_some_and(|e| {
            let e: &(dyn std::error::Error + 'static) = e;
            crate::transport::BusRejection::find(e).is_some()
        })
    }

    fn elapsed_secs(&self) -> f64 {
        (self.last_attempt_at - self.first_attempt_at)
            .to_std()
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

/// Decides the delay before the next attempt of a failed row.
pub trait RetryStrategy: Send + Sync + fmt::Debug + 'static {
    /// `Ok(Some(delay))` to retry after `delay` (measured on the database
    /// clock), `Ok(None)` to give up (`retry_terminal`).
    fn next_delay(&self, ctx: &RetryContext<'_>) -> Result<Option<Duration>, BoxError>;

    /// Checks the strategy's parameters; called when a subscriber is built, so
    /// a bad value is an error before anything runs.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// True for strategies that never retry (used to warn about settings that
    /// can then never apply, such as `max_deliveries`).
    fn never_retries(&self) -> bool {
        false
    }
}

/// Gives up at the first failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoRetry;

impl RetryStrategy for NoRetry {
    fn next_delay(&self, _: &RetryContext<'_>) -> Result<Option<Duration>, BoxError> {
        Ok(None)
    }
    fn never_retries(&self) -> bool {
        true
    }
}

/// Limits shared by the built-in strategies.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Caps {
    jitter: f64,
    max_attempts: Option<u64>,
    max_total_delay: Option<Duration>,
}

impl Caps {
    fn validate(&self) -> Result<(), String> {
        if !(0.0..=2.0).contains(&self.jitter) || !self.jitter.is_finite() {
            return Err(format!("jitter must be within [0, 2], got {}", self.jitter));
        }
        if self.max_attempts == Some(0) {
            return Err("max_attempts must be >= 1".into());
        }
        if self.max_total_delay == Some(Duration::ZERO) {
            return Err("max_total_delay must be > 0".into());
        }
        Ok(())
    }

    /// The shared template: attempt cap, then the strategy's delay, then the
    /// total-delay cap.
    fn apply(
        &self,
        ctx: &RetryContext<'_>,
        base_secs: impl FnOnce(u64) -> f64,
        clamp_secs: Option<f64>,
    ) -> Option<Duration> {
        let n = ctx.attempts_count.max(1);
        if self.max_attempts.is_some_and(|m| n >= m) {
            return None;
        }
        let mut secs = base_secs(n);
        if !secs.is_finite() {
            secs = MAX_DELAY.as_secs_f64();
        }
        secs *= self.jitter_factor();
        if let Some(max) = clamp_secs {
            secs = secs.min(max);
        }
        secs = secs.clamp(0.0, MAX_DELAY.as_secs_f64());
        if let Some(total) = self.max_total_delay
            && ctx.elapsed_secs() + secs > total.as_secs_f64()
        {
            return None;
        }
        Some(Duration::from_secs_f64(secs))
    }

    fn jitter_factor(&self) -> f64 {
        if self.jitter == 0.0 {
            1.0
        } else {
            let half = self.jitter / 2.0;
            1.0 + rand::rng().random_range(-half..=half)
        }
    }
}

macro_rules! caps_setters {
    () => {
        /// Multiplies each delay by a random factor in `[1 - j/2, 1 + j/2]`;
        /// `j` must be within `[0, 2]` (default 0).
        pub fn jitter(mut self, j: f64) -> Self {
            self.caps.jitter = j;
            self
        }

        /// Gives up once this many attempts were made (default: never).
        pub fn max_attempts(mut self, n: u64) -> Self {
            self.caps.max_attempts = Some(n);
            self
        }

        /// Gives up when the time since the first attempt plus the next delay
        /// would exceed `d` (default: never).
        pub fn max_total_delay(mut self, d: Duration) -> Self {
            self.caps.max_total_delay = Some(d);
            self
        }
    };
}

/// The same delay every time.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::retry::ConstantRetry;
/// let r = ConstantRetry::new(Duration::from_secs(5)).max_attempts(3);
/// # let _ = r;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConstantRetry {
    delay: Duration,
    caps: Caps,
}

impl ConstantRetry {
    /// Retries after `delay` (must be > 0).
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            caps: Caps::default(),
        }
    }
    caps_setters!();
}

impl RetryStrategy for ConstantRetry {
    fn next_delay(&self, ctx: &RetryContext<'_>) -> Result<Option<Duration>, BoxError> {
        let d = self.delay.as_secs_f64();
        Ok(self.caps.apply(ctx, |_| d, None))
    }
    fn validate(&self) -> Result<(), String> {
        if self.delay.is_zero() {
            return Err("ConstantRetry delay must be > 0".into());
        }
        self.caps.validate()
    }
}

/// `initial + step × (n - 1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearRetry {
    initial: Duration,
    step: Duration,
    caps: Caps,
}

impl LinearRetry {
    /// Starts at `initial` (> 0) and grows by `step` per attempt.
    pub fn new(initial: Duration, step: Duration) -> Self {
        Self {
            initial,
            step,
            caps: Caps::default(),
        }
    }
    caps_setters!();
}

impl RetryStrategy for LinearRetry {
    fn next_delay(&self, ctx: &RetryContext<'_>) -> Result<Option<Duration>, BoxError> {
        let (i, s) = (self.initial.as_secs_f64(), self.step.as_secs_f64());
        Ok(self
            .caps
            .apply(ctx, |n| i + s * (n.saturating_sub(1)) as f64, None))
    }
    fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("LinearRetry initial delay must be > 0".into());
        }
        self.caps.validate()
    }
}

/// `initial × multiplier^(n - 1)`, jittered, then capped at `max_delay`.
///
/// The default is the subscriber default: 1 s, ×2, at most 300 s, 10 attempts,
/// jitter 0.2 (delays ≈ 1, 2, 4, … 256 s; the 10th failure is terminal).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialRetry {
    initial: Duration,
    multiplier: f64,
    max_delay: Option<Duration>,
    caps: Caps,
}

impl Default for ExponentialRetry {
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
            .multiplier(2.0)
            .max_delay(Duration::from_secs(300))
            .max_attempts(10)
            .jitter(0.2)
    }
}

impl ExponentialRetry {
    /// Starts at `initial` (> 0), doubling by default, with no cap.
    pub fn new(initial: Duration) -> Self {
        Self {
            initial,
            multiplier: 2.0,
            max_delay: None,
            caps: Caps::default(),
        }
    }

    /// The growth factor (> 0, default 2).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = m;
        self
    }

    /// The longest single delay (> 0, default: none).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = Some(d);
        self
    }
    caps_setters!();
}

impl RetryStrategy for ExponentialRetry {
    fn next_delay(&self, ctx: &RetryContext<'_>) -> Result<Option<Duration>, BoxError> {
        let (i, m) = (self.initial.as_secs_f64(), self.multiplier);
        let exp = |n: u64| {
            let e = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
            i * m.powi(e)
        };
        Ok(self
            .caps
            .apply(ctx, exp, self.max_delay.map(|d| d.as_secs_f64())))
    }
    fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("ExponentialRetry initial delay must be > 0".into());
        }
        if !(self.multiplier > 0.0 && self.multiplier.is_finite()) {
            return Err(format!(
                "ExponentialRetry multiplier must be > 0, got {}",
                self.multiplier
            ));
        }
        if self.max_delay == Some(Duration::ZERO) {
            return Err("ExponentialRetry max_delay must be > 0".into());
        }
        self.caps.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(n: u64, elapsed_secs: i64) -> RetryContext<'static> {
        let first = Utc::now();
        RetryContext::new(
            n,
            first,
            first + chrono::Duration::seconds(elapsed_secs),
            None,
        )
    }

    fn secs(r: &dyn RetryStrategy, n: u64) -> Option<f64> {
        r.next_delay(&ctx(n, 0))
            .expect("no error")
            .map(|d| d.as_secs_f64())
    }

    #[test]
    fn default_schedule_is_the_documented_one() {
        let r = ExponentialRetry::default();
        for n in 1..10 {
            let expected = f64::from(2u32.pow(u32::try_from(n - 1).expect("small")));
            for _ in 0..50 {
                let d = secs(&r, n).expect("retries");
                assert!(
                    d >= expected * 0.9 - 1e-9 && d <= expected * 1.1 + 1e-9,
                    "attempt {n}: {d} not within ±10% of {expected}"
                );
            }
        }
        assert_eq!(secs(&r, 10), None, "the 10th failure is terminal");
    }

    #[test]
    fn exponential_caps_and_never_overflows() {
        let r = ExponentialRetry::new(Duration::from_secs(1)).max_delay(Duration::from_secs(30));
        assert_eq!(secs(&r, 20), Some(30.0));
        let r = ExponentialRetry::new(Duration::from_secs(1)).multiplier(10.0);
        assert_eq!(secs(&r, 5000), Some(MAX_DELAY.as_secs_f64()));
        assert_eq!(secs(&r, u64::MAX), Some(MAX_DELAY.as_secs_f64()));
    }

    #[test]
    fn jitter_stays_in_bounds_including_the_maximum() {
        let r = ConstantRetry::new(Duration::from_secs(10)).jitter(2.0);
        for _ in 0..500 {
            let d = secs(&r, 1).expect("retries");
            assert!((0.0..=20.0).contains(&d), "{d}");
        }
        let r = LinearRetry::new(Duration::from_secs(2), Duration::from_secs(3)).jitter(0.5);
        for _ in 0..200 {
            let d = secs(&r, 3).expect("retries"); // 2 + 3*2 = 8
            assert!((6.0..=10.0).contains(&d), "{d}");
        }
        let r = ExponentialRetry::new(Duration::from_secs(4))
            .max_delay(Duration::from_secs(5))
            .jitter(1.0);
        for _ in 0..200 {
            let d = secs(&r, 2).expect("retries");
            assert!(d <= 5.0, "max_delay applies after jitter: {d}");
        }
    }

    #[test]
    fn linear_and_constant_are_deterministic_without_jitter() {
        let r = LinearRetry::new(Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(
            (1..=4).map(|n| secs(&r, n)).collect::<Vec<_>>(),
            [Some(1.0), Some(3.0), Some(5.0), Some(7.0)]
        );
        let r = ConstantRetry::new(Duration::from_millis(1500)).max_attempts(3);
        assert_eq!(
            (1..=3).map(|n| secs(&r, n)).collect::<Vec<_>>(),
            [Some(1.5), Some(1.5), None]
        );
    }

    #[test]
    fn total_delay_cap() {
        let r =
            ConstantRetry::new(Duration::from_secs(10)).max_total_delay(Duration::from_secs(25));
        assert!(r.next_delay(&ctx(2, 10)).expect("ok").is_some()); // 10 + 10 <= 25
        assert!(r.next_delay(&ctx(3, 20)).expect("ok").is_none()); // 20 + 10 > 25
    }

    #[test]
    fn no_retry_is_terminal() {
        assert_eq!(secs(&NoRetry, 1), None);
        assert!(NoRetry.never_retries());
    }

    #[test]
    fn invalid_parameters_are_reported() {
        let bad: Vec<Box<dyn RetryStrategy>> = vec![
            Box::new(ConstantRetry::new(Duration::ZERO)),
            Box::new(ConstantRetry::new(Duration::from_secs(1)).jitter(2.5)),
            Box::new(ConstantRetry::new(Duration::from_secs(1)).jitter(-0.1)),
            Box::new(ConstantRetry::new(Duration::from_secs(1)).max_attempts(0)),
            Box::new(ConstantRetry::new(Duration::from_secs(1)).max_total_delay(Duration::ZERO)),
            Box::new(LinearRetry::new(Duration::ZERO, Duration::from_secs(1))),
            Box::new(ExponentialRetry::new(Duration::ZERO)),
            Box::new(ExponentialRetry::new(Duration::from_secs(1)).multiplier(0.0)),
            Box::new(ExponentialRetry::new(Duration::from_secs(1)).max_delay(Duration::ZERO)),
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?} should be invalid");
        }
        assert!(ExponentialRetry::default().validate().is_ok());
    }
}
