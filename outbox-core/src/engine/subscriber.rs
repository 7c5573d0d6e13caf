//! [`Subscriber`]: a handler bound to one or more queues, with its engine knobs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::handler::Handler;
use crate::engine::message::AckPolicy;
use crate::engine::retry::{ExponentialRetry, RetryStrategy};
use crate::error::{Error, Result};
use crate::publish::validate_queue;

/// The defaults of the knobs that differ between plain subscribers and
/// relays (see [`SubscriberOptions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KnobDefaults {
    /// `max_workers`.
    pub max_workers: usize,
    /// `fetch_batch_size`.
    pub fetch_batch_size: usize,
}

/// faststream-outbox's defaults: what a subscriber that only handles rows
/// gets.
pub const SUBSCRIBER_DEFAULTS: KnobDefaults = KnobDefaults {
    max_workers: 1,
    fetch_batch_size: 10,
};

/// What a relay (a route with a `#[publish_to]` target) gets for the knobs
/// it does not set: a relay's worker spends most of its time waiting for the
/// bus to confirm, so throughput is the number of publishes in flight over
/// the bus's round trip. Chosen from the benchmark (docs/performance.md,
/// "relay, README defaults").
pub const RELAY_DEFAULTS: KnobDefaults = KnobDefaults {
    max_workers: 256,
    fetch_batch_size: 512,
};

/// Every knob of a subscriber, with the reference defaults.
///
/// | knob | default | relay default | meaning |
/// |---|---|---|---|
/// | `max_workers` | 1 | 256 | handlers running at once |
/// | `fetch_batch_size` | 10 | 512 | in-memory buffer size and most rows per claim |
/// | `fetch_concurrency` | 1 (`Transaction`: 4) | same | claim statements in flight at once (each on its own connection); in `Transaction` mode, transactions open at once |
/// | `min_fetch_interval` | 1 s | 1 s | idle backoff base |
/// | `max_fetch_interval` | 10 s | 10 s | idle backoff ceiling (polling floor without NOTIFY) |
/// | `lease_ttl` | 60 s | 60 s | a claimed row is reclaimable after this |
/// | `lease_heartbeat` | `lease_ttl / 3` | same | how often the leases of rows in flight are extended; off: a lease lasts `lease_ttl` from the claim |
/// | `claim_mode` | [`ClaimMode::Lease`] | [`ClaimMode::Transaction`] | lease write per claim, or rows locked in a transaction held until their outcomes commit |
/// | `max_hold` | 5 s | 5 s | `Transaction` mode: longest a claim's transaction stays open |
/// | `max_deliveries` | none | none | claims allowed before a row goes terminal unhandled |
/// | `terminal_flush_batch_size` | 1 | 1 | deletes (acks) held to share one `DELETE`; 1: none held, concurrent ones still coalesce |
/// | `ack_policy` | [`AckPolicy::NackOnError`] | same | |
/// | `retry` | [`ExponentialRetry::default()`] | same | 1 s ×2 ≤ 300 s, 10 attempts, jitter 0.2 |
///
/// The "default" column is faststream-outbox's, for subscribers that only
/// handle rows. A relay (an App route with a `#[publish_to]` target) uses
/// [`RELAY_DEFAULTS`] for the knobs it does not set itself
/// ([`relay_defaults`](Self::relay_defaults)): its workers mostly wait for
/// the bus, so it needs many publishes in flight. A knob set explicitly
/// always wins.
#[derive(Clone)]
pub struct SubscriberOptions {
    max_workers: Option<usize>,
    fetch_batch_size: Option<usize>,
    fetch_concurrency: Option<usize>,
    min_fetch_interval: Duration,
    max_fetch_interval: Duration,
    lease_ttl: Duration,
    max_deliveries: Option<u64>,
    terminal_flush_batch_size: usize,
    ack_policy: Option<AckPolicy>,
    retry: Option<Arc<dyn RetryStrategy>>,
    relay: bool,
    ordered: bool,
    poison_policy: PoisonPolicy,
    claim_mode: Option<ClaimMode>,
    max_hold: Duration,
    /// `None`: the default (`lease_ttl / 3`); `Some(None)`: off.
    lease_heartbeat: Option<Option<Duration>>,
}

/// How a subscriber claims rows and records their outcomes.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::{ClaimMode, SubscriberOptions};
///
/// // A plain subscriber leases; a relay holds a transaction (see the table
/// // on `SubscriberOptions`); either can be chosen explicitly.
/// assert_eq!(SubscriberOptions::new().get_claim_mode(), ClaimMode::Lease);
/// assert_eq!(SubscriberOptions::new().relay_defaults(true).get_claim_mode(), ClaimMode::Transaction);
/// let opts = SubscriberOptions::new()
///     .claim_mode(ClaimMode::Transaction)
///     .max_hold(Duration::from_secs(2));
/// assert_eq!(opts.get_max_hold(), Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClaimMode {
    /// faststream-outbox's design: a claim writes a lease (token, time,
    /// `deliveries_count + 1`) and commits; each outcome is a later write
    /// guarded by the token. The [lease
    /// heartbeat](SubscriberOptions::lease_heartbeat) extends the lease while
    /// the handler runs; a crashed relay's rows wait for the lease to expire
    /// (`lease_ttl` after its last extension). Two writes (two dead tuples) per row.
    Lease,
    /// A claim locks its rows (`FOR UPDATE SKIP LOCKED`) in a transaction
    /// that stays open while their handlers run and the bus confirms; the
    /// outcomes (deletes, retries, dead-letter moves) are written in that
    /// transaction and commit together. No lease write: one write (one dead
    /// tuple) per delivered row, about half the WAL, and a crashed relay's
    /// rows are claimable again the moment its connection is gone. The
    /// handlers of a claimed batch all run at once (`max_workers` does not
    /// apply: `fetch_batch_size` × `fetch_concurrency` bounds the rows in
    /// flight), so a relay has the whole batch in flight on its bus. For short
    /// handlers (relays): the transaction is held at most
    /// [`max_hold`](SubscriberOptions::max_hold), and an open transaction
    /// holds back vacuum on the whole database while it lasts.
    ///
    /// Differences from [`Lease`](Self::Lease): `deliveries_count` is
    /// written with the outcome, not at the claim, so a delivery that
    /// crashes the whole process is not counted and `max_deliveries` cannot
    /// stop it; a graceful stop lets the open batches finish (their
    /// transactions commit) instead of releasing leases.
    Transaction,
}

/// What an [`ordered`](SubscriberOptions::ordered) subscriber does with a
/// key whose head row fails.
///
/// Either way no later row of the key ever overtakes the failing one: the
/// difference is whether the key waits for it.
///
/// ```
/// use outbox_core::{PoisonPolicy, SubscriberOptions};
///
/// let opts = SubscriberOptions::new()
///     .ordered(true)
///     .poison_policy(PoisonPolicy::DeadLetterAndContinue);
/// assert_eq!(opts.get_poison_policy(), PoisonPolicy::DeadLetterAndContinue);
/// assert_eq!(PoisonPolicy::default(), PoisonPolicy::Block);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoisonPolicy {
    /// The failing row stays at the head of its key and is retried by the
    /// subscriber's retry strategy; the key's later rows wait (other keys go
    /// on). The key moves on when the row succeeds, or when the strategy
    /// gives up and the row goes terminal (to the dead-letter table).
    #[default]
    Block,
    /// The first failure moves the row to the dead-letter table at once
    /// (reason `retry_terminal`, retry strategy not consulted) and the key's
    /// next row is delivered: the key never waits, at the price of a gap
    /// in its sequence that a replay can fill later
    /// ([`ops::ReplayOptions`](crate::ops::ReplayOptions), `outbox dlq replay`).
    DeadLetterAndContinue,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        Self {
            max_workers: None,
            fetch_batch_size: None,
            fetch_concurrency: None,
            min_fetch_interval: Duration::from_secs(1),
            max_fetch_interval: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(60),
            max_deliveries: None,
            terminal_flush_batch_size: 1,
            ack_policy: None,
            retry: None,
            relay: false,
            ordered: false,
            poison_policy: PoisonPolicy::Block,
            claim_mode: None,
            max_hold: DEFAULT_MAX_HOLD,
            lease_heartbeat: None,
        }
    }
}

/// Default [`SubscriberOptions::fetch_concurrency`] in
/// [`ClaimMode::Transaction`]: claims' transactions open at once. Chosen
/// from the Kafka relay benchmark (docs/performance.md, "claim modes"): one
/// lot leaves the bus idle while it claims and commits, four keep it busy.
pub const DEFAULT_LOTS: usize = 4;

/// Default [`SubscriberOptions::max_hold`].
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(5);

impl fmt::Debug for SubscriberOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriberOptions")
            .field("max_workers", &self.get_max_workers())
            .field("fetch_batch_size", &self.get_fetch_batch_size())
            .field("fetch_concurrency", &self.get_fetch_concurrency())
            .field("min_fetch_interval", &self.min_fetch_interval)
            .field("max_fetch_interval", &self.max_fetch_interval)
            .field("lease_ttl", &self.lease_ttl)
            .field("max_deliveries", &self.max_deliveries)
            .field("terminal_flush_batch_size", &self.terminal_flush_batch_size)
            .field("ack_policy", &self.get_ack_policy())
            .field("retry", &self.retry)
            .field("relay_defaults", &self.relay)
            .field("ordered", &self.ordered)
            .field("poison_policy", &self.poison_policy)
            .field("claim_mode", &self.get_claim_mode())
            .field("max_hold", &self.max_hold)
            .field("lease_heartbeat", &self.get_lease_heartbeat())
            .finish()
    }
}

macro_rules! knob {
    ($(#[$doc:meta])* $name:ident, $get:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
        #[doc = concat!("The `", stringify!($name), "` setting.")]
        pub fn $get(&self) -> $ty {
            self.$name
        }
    };
}

/// A knob whose default differs for relays (see [`KnobDefaults`]).
macro_rules! relay_knob {
    ($(#[$doc:meta])* $name:ident, $get:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = Some(value);
            self
        }
        #[doc = concat!("The effective `", stringify!($name), "`: the value set, else the default (the relay default with [`relay_defaults`](Self::relay_defaults)).")]
        pub fn $get(&self) -> $ty {
            self.$name.unwrap_or(self.defaults().$name)
        }
    };
}

impl SubscriberOptions {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses [`RELAY_DEFAULTS`] instead of [`SUBSCRIBER_DEFAULTS`] for the
    /// knobs not set explicitly. The App turns this on for routes with a
    /// `#[publish_to]` target; a subscriber built by hand can opt in.
    pub fn relay_defaults(mut self, on: bool) -> Self {
        self.relay = on;
        self
    }

    /// Whether the relay defaults apply.
    pub fn get_relay_defaults(&self) -> bool {
        self.relay
    }

    fn defaults(&self) -> KnobDefaults {
        if self.relay {
            RELAY_DEFAULTS
        } else {
            SUBSCRIBER_DEFAULTS
        }
    }

    relay_knob!(
        /// Handlers running at once (>= 1).
        max_workers, get_max_workers: usize
    );
    relay_knob!(
        /// Size of the in-memory buffer and most rows claimed per fetch (>= 1).
        fetch_batch_size, get_fetch_batch_size: usize
    );
    /// Claim statements in flight at once, each on its own connection
    /// (>= 1; in [`ClaimMode::Lease`] at most `fetch_batch_size`). With
    /// large batches the claim (a row lock, a non-HOT update and two index
    /// inserts per row) is what bounds a drain; two concurrent claims use a
    /// second database core. Rows are still claimed in `(next_attempt_at,
    /// id)` order per claim, but two claims interleave. In
    /// [`ClaimMode::Transaction`], the claims' transactions open at once
    /// (default [`DEFAULT_LOTS`]): while one waits for its bus
    /// confirmations, the others claim and commit.
    pub fn fetch_concurrency(mut self, value: usize) -> Self {
        self.fetch_concurrency = Some(value);
        self
    }

    /// The effective `fetch_concurrency`: the value set, else 1 in
    /// [`ClaimMode::Lease`] and [`DEFAULT_LOTS`] in
    /// [`ClaimMode::Transaction`].
    pub fn get_fetch_concurrency(&self) -> usize {
        self.fetch_concurrency
            .unwrap_or(match self.get_claim_mode() {
                ClaimMode::Transaction => DEFAULT_LOTS,
                _ => 1,
            })
    }
    knob!(
        /// First idle wait (randomized ×0.5–1.5) and the doubling base (> 0).
        min_fetch_interval, get_min_fetch_interval: Duration
    );
    knob!(
        /// Longest idle wait between polls (>= `min_fetch_interval`).
        max_fetch_interval, get_max_fetch_interval: Duration
    );
    knob!(
        /// Time after which a claimed row may be claimed again (> 0): how
        /// long the rows of a crashed process wait for another claim. The
        /// [lease heartbeat](Self::lease_heartbeat) extends the leases of
        /// rows in flight; with it off, the lease must exceed the handler's
        /// worst case plus its wait in the buffer.
        lease_ttl, get_lease_ttl: Duration
    );
    knob!(
        /// How many deletes (acks, and terminal failures without a
        /// dead-letter table) to hold so they share one `DELETE` (>= 1).
        /// With 1, no delete is ever held: each is written as soon as the
        /// previous statement returned, and those that completed meanwhile go
        /// in the same statement. With more, deletes wait until that many
        /// are ready, none came for 5 ms, or the oldest is half a lease
        /// old: fewer statements, but an ungraceful crash then redelivers up
        /// to that many handled rows.
        terminal_flush_batch_size, get_terminal_flush_batch_size: usize
    );

    knob!(
        /// Per-key FIFO (default off). Rows published with the same
        /// [`PublishOptions::key`](crate::PublishOptions::key) are handled,
        /// and relayed, one at a time in the order their transactions
        /// committed; different keys run in parallel across workers and
        /// replicas. Rows without a key are claimed as usual, in parallel.
        ///
        /// How it works: a claim takes only the **head** of each key (its
        /// oldest row, leased or not), so at most one row per key is in
        /// flight anywhere and a retrying head keeps its key's later rows
        /// back; a keyed publish takes a transaction-scoped lock on its key
        /// before its row gets an id, so id order within a key is commit
        /// order. See the README's "Ordering" section for the guarantees and
        /// their costs.
        ordered, get_ordered: bool
    );
    knob!(
        /// What an [`ordered`](Self::ordered) subscriber does when a key's
        /// head row fails (default [`PoisonPolicy::Block`]). No effect on an
        /// unordered subscriber, nor on rows without a key.
        poison_policy, get_poison_policy: PoisonPolicy
    );

    /// How rows are claimed and their outcomes recorded (see [`ClaimMode`]).
    /// Default: [`ClaimMode::Transaction`] with the relay defaults (an App
    /// route with a `#[publish_to]` target), else [`ClaimMode::Lease`].
    pub fn claim_mode(mut self, mode: ClaimMode) -> Self {
        self.claim_mode = Some(mode);
        self
    }

    /// The effective claim mode.
    pub fn get_claim_mode(&self) -> ClaimMode {
        self.claim_mode.unwrap_or(if self.relay {
            ClaimMode::Transaction
        } else {
            ClaimMode::Lease
        })
    }

    knob!(
        /// [`ClaimMode::Transaction`] only: the longest a claim's transaction
        /// stays open (> 0, default [`DEFAULT_MAX_HOLD`]). When it is up, the
        /// rows whose handlers are still running get a lease
        /// ([`lease_ttl`](Self::lease_ttl)) in the transaction, which then
        /// commits with the outcomes recorded so far; those rows finish
        /// under their lease, as in [`ClaimMode::Lease`]. Bounds how long a
        /// slow bus or a wedged handler holds back vacuum.
        max_hold, get_max_hold: Duration
    );

    /// How often the engine extends the leases of the rows it holds
    /// (default `lease_ttl / 3`; `None` turns the heartbeat off). Every
    /// interval, one batched `UPDATE` per subscriber sets `acquired_at`
    /// again on every row it has claimed and not yet finished (buffered,
    /// running, or waiting for its outcome's write) whose lease is at least
    /// half an interval old, guarded by the lease token; with nothing due,
    /// nothing is written (rows finished within half an interval are never
    /// extended). So a handler (or a
    /// bus confirmation) may outlast `lease_ttl`: the lease expires only
    /// `lease_ttl` after the last extension, when the process died or lost
    /// the database. A row whose extension finds its lease taken is
    /// reported as `lease_lost` with phase `heartbeat` and no longer
    /// extended (its outcome's write is then refused too). In
    /// [`ClaimMode::Transaction`] it extends the leases of the rows that
    /// outlived [`max_hold`](Self::max_hold).
    ///
    /// A handler that never returns keeps its row for as long as its
    /// process lives (the lease no longer bounds it): bound slow work with a
    /// timeout of its own. A graceful stop ends the extensions after its
    /// drain, so rows abandoned there expire `lease_ttl` later.
    ///
    /// Must be shorter than [`lease_ttl`](Self::lease_ttl) (checked by
    /// [`validate`](Self::validate)); more than half of it is allowed but
    /// warned about (one failed extension would then lose the lease).
    ///
    /// ```
    /// use std::time::Duration;
    /// use outbox_core::SubscriberOptions;
    ///
    /// let opts = SubscriberOptions::new().lease_ttl(Duration::from_secs(30));
    /// assert_eq!(opts.get_lease_heartbeat(), Some(Duration::from_secs(10)));
    /// let opts = opts.lease_heartbeat(Some(Duration::from_secs(5)));
    /// assert_eq!(opts.get_lease_heartbeat(), Some(Duration::from_secs(5)));
    /// assert_eq!(opts.without_lease_heartbeat().get_lease_heartbeat(), None);
    /// assert!(SubscriberOptions::new()
    ///     .lease_ttl(Duration::from_secs(5))
    ///     .lease_heartbeat(Some(Duration::from_secs(5)))
    ///     .validate()
    ///     .is_err());
    /// ```
    pub fn lease_heartbeat(mut self, every: Option<Duration>) -> Self {
        self.lease_heartbeat = Some(every);
        self
    }

    /// Turns the lease heartbeat off: a lease lasts `lease_ttl` from its
    /// claim, however long the handler runs (faststream-outbox's behaviour).
    pub fn without_lease_heartbeat(self) -> Self {
        self.lease_heartbeat(None)
    }

    /// The effective heartbeat interval (`None`: off); the default is
    /// `lease_ttl / 3`.
    pub fn get_lease_heartbeat(&self) -> Option<Duration> {
        self.lease_heartbeat
            .unwrap_or_else(|| Some((self.lease_ttl / 3).max(Duration::from_millis(1))))
    }

    /// Claims allowed per row (>= 1). A row claimed more often (crashes, lease
    /// expiries) goes terminal with reason `max_deliveries` without running the
    /// handler. Default: unlimited.
    pub fn max_deliveries(mut self, n: u64) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// The `max_deliveries` setting.
    pub fn get_max_deliveries(&self) -> Option<u64> {
        self.max_deliveries
    }

    /// How handler results become outcomes (default [`AckPolicy::NackOnError`]).
    pub fn ack_policy(mut self, policy: AckPolicy) -> Self {
        self.ack_policy = Some(policy);
        self
    }

    /// The effective ack policy.
    pub fn get_ack_policy(&self) -> AckPolicy {
        self.ack_policy.unwrap_or_default()
    }

    /// The retry strategy (default [`ExponentialRetry::default()`]).
    pub fn retry(mut self, strategy: impl RetryStrategy) -> Self {
        self.retry = Some(Arc::new(strategy));
        self
    }

    /// The retry strategy, shared.
    pub fn retry_arc(mut self, strategy: Arc<dyn RetryStrategy>) -> Self {
        self.retry = Some(strategy);
        self
    }

    /// Whether a retry strategy was set (else the default applies, which
    /// also makes a bus's permanent refusal terminal at once).
    pub(crate) fn has_custom_retry(&self) -> bool {
        self.retry.is_some()
    }

    /// The effective retry strategy.
    pub fn get_retry(&self) -> Arc<dyn RetryStrategy> {
        self.retry
            .clone()
            .unwrap_or_else(|| Arc::new(ExponentialRetry::default()))
    }

    /// Checks every knob; returns the warnings for combinations that are legal
    /// but likely wrong, or an error naming the first invalid knob.
    pub fn validate(&self) -> Result<Vec<String>> {
        let err = |m: String| Err(Error::config(m));
        for (name, v) in [
            ("max_workers", self.get_max_workers()),
            ("fetch_batch_size", self.get_fetch_batch_size()),
            ("fetch_concurrency", self.get_fetch_concurrency()),
            ("terminal_flush_batch_size", self.terminal_flush_batch_size),
        ] {
            if v < 1 {
                return err(format!("{name} must be >= 1, got {v}"));
            }
        }
        for (name, v) in [
            ("min_fetch_interval", self.min_fetch_interval),
            ("max_fetch_interval", self.max_fetch_interval),
            ("lease_ttl", self.lease_ttl),
            ("max_hold", self.max_hold),
        ] {
            if v.is_zero() {
                return err(format!("{name} must be > 0"));
            }
        }
        if self.get_claim_mode() == ClaimMode::Lease
            && self.get_fetch_concurrency() > self.get_fetch_batch_size()
        {
            return err(format!(
                "fetch_concurrency ({}) must be <= fetch_batch_size ({}): each claim needs room in the buffer",
                self.get_fetch_concurrency(),
                self.get_fetch_batch_size()
            ));
        }
        if let Some(Some(every)) = self.lease_heartbeat {
            if every.is_zero() {
                return err(
                    "lease_heartbeat must be > 0 (use without_lease_heartbeat to turn it off)"
                        .into(),
                );
            }
            if every >= self.lease_ttl {
                return err(format!(
                    "lease_heartbeat ({every:?}) must be shorter than lease_ttl ({:?}): a lease \
                     extended less often than it lasts expires between two extensions",
                    self.lease_ttl
                ));
            }
        }
        if self.min_fetch_interval > self.max_fetch_interval {
            return err(format!(
                "min_fetch_interval ({:?}) must be <= max_fetch_interval ({:?})",
                self.min_fetch_interval, self.max_fetch_interval
            ));
        }
        if self.max_deliveries == Some(0) {
            return err("max_deliveries must be >= 1".into());
        }
        let retry = self.get_retry();
        if let Err(e) = retry.validate() {
            return err(format!("invalid retry strategy {retry:?}: {e}"));
        }
        let mut warnings = Vec::new();
        if let Some(Some(every)) = self.lease_heartbeat
            && every > self.lease_ttl / 2
        {
            warnings.push(format!(
                "lease_heartbeat ({every:?}) is more than half of lease_ttl ({:?}): a single \
                 failed extension loses the lease; the default is a third",
                self.lease_ttl
            ));
        }
        if self.max_workers.is_some() && self.get_claim_mode() == ClaimMode::Transaction {
            warnings.push(
                "max_workers has no effect with claim_mode Transaction: every handler of a claimed \
                 batch runs at once; size the batches with fetch_batch_size and fetch_concurrency"
                    .into(),
            );
        }
        if !self.ordered && self.poison_policy != PoisonPolicy::Block {
            warnings.push(format!(
                "poison_policy {:?} has no effect on an unordered subscriber; set ordered(true) \
                 or drop it",
                self.poison_policy
            ));
        }
        let no_retry = retry.never_retries();
        if self.ack_policy == Some(AckPolicy::RejectOnError) && self.retry.is_some() && !no_retry {
            warnings.push(format!(
                "ack_policy RejectOnError ignores the retry strategy {retry:?}: errors are terminal; \
                 drop the strategy or use NackOnError"
            ));
        }
        if self.ack_policy == Some(AckPolicy::NackOnError) && no_retry {
            warnings.push(
                "ack_policy NackOnError with NoRetry makes every error terminal; that is RejectOnError \
                 with reason retry_terminal"
                    .into(),
            );
        }
        if self.max_deliveries.is_some() && no_retry {
            warnings.push(
                "max_deliveries has no effect with NoRetry (the first failure is terminal)".into(),
            );
        }
        // No warning ties the lease to the poll interval: a claimed row is
        // handled as soon as a worker is free, whatever the poll interval.
        // What the lease must cover (buffer wait + handler + a transport's
        // publish time) is checked by the App, which knows the transports.
        Ok(warnings)
    }
}

/// A validated handler binding: queues, name, options, handler.
///
/// Build one with [`Subscriber::builder`]; every way of constructing a
/// subscriber (this builder, the `#[subscriber]` macro, the application
/// runtime) goes through [`SubscriberBuilder::build`], so the same validation
/// always applies.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::{AckPolicy, Message, Subscriber};
/// use outbox_core::retry::ConstantRetry;
///
/// let sub = Subscriber::builder(["orders"])
///     .name("orders-relay")
///     .max_workers(4)
///     .fetch_batch_size(100)
///     .retry(ConstantRetry::new(Duration::from_secs(5)).max_attempts(3))
///     .ack_policy(AckPolicy::NackOnError)
///     .build(|msg: Message| async move { println!("{}", msg.id()) })?;
/// assert_eq!(sub.name(), "orders-relay");
/// # Ok::<(), outbox_core::Error>(())
/// ```
#[derive(Clone)]
pub struct Subscriber {
    name: String,
    queues: Vec<String>,
    options: SubscriberOptions,
    retry: Arc<dyn RetryStrategy>,
    handler: Arc<dyn Handler>,
    warnings: Vec<String>,
    /// Exactly-once lanes (set by the App for a route with
    /// `exactly_once`): the subscriber runs lane loops.
    lanes: Option<super::lane::LaneSpec>,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("name", &self.name)
            .field("queues", &self.queues)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Starts building a subscriber on `queues` (a name, or a list of names).
    pub fn builder<I, S>(queues: I) -> SubscriberBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SubscriberBuilder {
            name: None,
            queues: queues.into_iter().map(Into::into).collect(),
            options: SubscriberOptions::default(),
        }
    }

    /// The subscriber's name (defaults to its queues, comma-separated).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queues it serves.
    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// Its options.
    pub fn options(&self) -> &SubscriberOptions {
        &self.options
    }

    /// Warnings found at validation (also logged once at WARN).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub(crate) fn retry(&self) -> &Arc<dyn RetryStrategy> {
        &self.retry
    }

    pub(crate) fn handler(&self) -> &Arc<dyn Handler> {
        &self.handler
    }
}

/// Unvalidated subscriber settings; [`build`](Self::build) checks them.
#[derive(Debug, Clone)]
pub struct SubscriberBuilder {
    name: Option<String>,
    queues: Vec<String>,
    options: SubscriberOptions,
}

/// The setters of every [`SubscriberOptions`] knob, for a builder that holds
/// its options in `self.options` ([`SubscriberBuilder`], and the App's
/// `RouteBuilder`).
///
/// `option_setters!(names)` is the knobs' names: the list is written once,
/// here, and [`SUBSCRIBER_OPTION_NAMES`] (which the `#[subscriber]` macro's
/// option table is tested against) comes from it.
macro_rules! option_setters {
    () => {
        $crate::engine::subscriber::option_setters!(@list @knobs);
    };
    (names) => {
        $crate::engine::subscriber::option_setters!(@list @names)
    };
    (@list @$mode:ident) => {
        $crate::engine::subscriber::option_setters! {@$mode
            /// See [`SubscriberOptions::max_workers`](crate::SubscriberOptions::max_workers).
            max_workers: usize,
            /// See [`SubscriberOptions::fetch_batch_size`](crate::SubscriberOptions::fetch_batch_size).
            fetch_batch_size: usize,
            /// See [`SubscriberOptions::fetch_concurrency`](crate::SubscriberOptions::fetch_concurrency).
            fetch_concurrency: usize,
            /// See [`SubscriberOptions::min_fetch_interval`](crate::SubscriberOptions::min_fetch_interval).
            min_fetch_interval: ::std::time::Duration,
            /// See [`SubscriberOptions::max_fetch_interval`](crate::SubscriberOptions::max_fetch_interval).
            max_fetch_interval: ::std::time::Duration,
            /// See [`SubscriberOptions::lease_ttl`](crate::SubscriberOptions::lease_ttl).
            lease_ttl: ::std::time::Duration,
            /// See [`SubscriberOptions::lease_heartbeat`](crate::SubscriberOptions::lease_heartbeat).
            lease_heartbeat: ::core::option::Option<::std::time::Duration>,
            /// See [`SubscriberOptions::max_deliveries`](crate::SubscriberOptions::max_deliveries).
            max_deliveries: u64,
            /// See [`SubscriberOptions::terminal_flush_batch_size`](crate::SubscriberOptions::terminal_flush_batch_size).
            terminal_flush_batch_size: usize,
            /// See [`SubscriberOptions::ack_policy`](crate::SubscriberOptions::ack_policy).
            ack_policy: $crate::engine::message::AckPolicy,
            /// See [`SubscriberOptions::ordered`](crate::SubscriberOptions::ordered).
            ordered: bool,
            /// See [`SubscriberOptions::poison_policy`](crate::SubscriberOptions::poison_policy).
            poison_policy: $crate::engine::subscriber::PoisonPolicy,
            /// See [`SubscriberOptions::claim_mode`](crate::SubscriberOptions::claim_mode).
            claim_mode: $crate::engine::subscriber::ClaimMode,
            /// See [`SubscriberOptions::max_hold`](crate::SubscriberOptions::max_hold).
            max_hold: ::std::time::Duration,
        }
    };
    (@knobs $($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $($(#[$doc])* pub fn $name(mut self, value: $ty) -> Self {
            self.options = self.options.$name(value);
            self
        })*
    };
    (@names $($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        &[$(::core::stringify!($name)),*]
    };
}
pub(crate) use option_setters;

/// The name of every option a subscriber's builders take (the
/// `option_setters!` knobs, then `retry`): what `#[subscriber(..)]` must
/// accept too (`tests/tests/macros.rs` compares the two lists).
#[doc(hidden)]
pub const SUBSCRIBER_OPTION_NAMES: &[&str] = &{
    const KNOBS: &[&str] = option_setters!(names);
    let mut all = [""; KNOBS.len() + 1];
    let mut i = 0;
    while i < KNOBS.len() {
        all[i] = KNOBS[i];
        i += 1;
    }
    all[KNOBS.len()] = "retry";
    all
};

impl SubscriberBuilder {
    /// The queues given so far.
    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// The options given so far.
    pub fn options_ref(&self) -> &SubscriberOptions {
        &self.options
    }

    /// Names the subscriber (logs, metrics, duplicate detection).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Replaces all options at once.
    pub fn options(mut self, options: SubscriberOptions) -> Self {
        self.options = options;
        self
    }

    option_setters!();

    /// See [`SubscriberOptions::relay_defaults`].
    pub fn relay_defaults(mut self, on: bool) -> Self {
        self.options = self.options.relay_defaults(on);
        self
    }

    /// See [`SubscriberOptions::without_lease_heartbeat`].
    pub fn without_lease_heartbeat(mut self) -> Self {
        self.options = self.options.without_lease_heartbeat();
        self
    }

    // Not in `option_setters!`: a bound error on `strategy` would then point
    // into the macro instead of only at the caller's expression.
    /// See [`SubscriberOptions::retry`].
    pub fn retry(mut self, strategy: impl RetryStrategy) -> Self {
        self.options = self.options.retry(strategy);
        self
    }

    /// Validates the settings and binds `handler`.
    ///
    /// Errors: no queue, an empty / over-long / duplicate queue name, or an
    /// invalid knob (see [`SubscriberOptions::validate`]). Warnings are logged
    /// and kept in [`Subscriber::warnings`].
    pub fn build(self, handler: impl Handler) -> Result<Subscriber> {
        self.build_arc(Arc::new(handler))
    }

    /// [`build`](Self::build) with a shared handler.
    pub fn build_arc(self, handler: Arc<dyn Handler>) -> Result<Subscriber> {
        if self.queues.is_empty() {
            return Err(Error::config("a subscriber needs at least one queue name"));
        }
        for (i, q) in self.queues.iter().enumerate() {
            validate_queue(q).map_err(|e| Error::config(format!("subscriber queue: {e}")))?;
            if self.queues[..i].contains(q) {
                return Err(Error::config(format!(
                    "queue {q:?} is listed twice in one subscriber"
                )));
            }
        }
        let warnings = self.options.validate()?;
        let name = self.name.unwrap_or_else(|| self.queues.join(","));
        if name.is_empty() {
            return Err(Error::config("a subscriber name must not be empty"));
        }
        for w in &warnings {
            // The log target this warning has always had (RUST_LOG filters).
            tracing::warn!(target: "outbox_core::subscriber", subscriber = %name, "{w}");
        }
        Ok(Subscriber {
            name,
            queues: self.queues,
            retry: self.options.get_retry(),
            options: self.options,
            handler,
            warnings,
            lanes: None,
        })
    }
}

impl Subscriber {
    /// This subscriber with exactly-once lanes (`docs/exactly-once.md`).
    pub(crate) fn with_lanes(mut self, spec: super::lane::LaneSpec) -> Self {
        self.lanes = Some(spec);
        self
    }

    /// The exactly-once lanes, if any.
    pub(crate) fn lanes(&self) -> Option<&super::lane::LaneSpec> {
        self.lanes.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::message::Message;
    use crate::engine::retry::NoRetry;

    fn noop(_: Message) -> std::future::Ready<()> {
        std::future::ready(())
    }

    fn build(b: SubscriberBuilder) -> Result<Subscriber> {
        b.build(noop)
    }

    #[test]
    fn defaults_are_the_reference_ones() {
        let s = build(Subscriber::builder(["q"])).expect("valid");
        let o = s.options();
        assert_eq!(o.get_max_workers(), 1);
        assert_eq!(o.get_fetch_batch_size(), 10);
        assert_eq!(o.get_min_fetch_interval(), Duration::from_secs(1));
        assert_eq!(o.get_max_fetch_interval(), Duration::from_secs(10));
        assert_eq!(o.get_lease_ttl(), Duration::from_secs(60));
        assert_eq!(o.get_max_deliveries(), None);
        assert_eq!(o.get_terminal_flush_batch_size(), 1);
        assert_eq!(o.get_ack_policy(), AckPolicy::NackOnError);
        assert_eq!(o.get_lease_heartbeat(), Some(Duration::from_secs(20)));
        assert!(s.warnings().is_empty(), "{:?}", s.warnings());
        assert_eq!(s.name(), "q");
        assert!(format!("{:?}", o.get_retry()).contains("ExponentialRetry"));
    }

    #[test]
    fn invalid_knobs_are_errors() {
        let cases: Vec<(SubscriberBuilder, &str)> = vec![
            (
                Subscriber::builder(Vec::<String>::new()),
                "at least one queue",
            ),
            (Subscriber::builder([""]), "non-empty"),
            (Subscriber::builder(["q".repeat(256)]), "at most 255"),
            (Subscriber::builder(["a", "a"]), "listed twice"),
            (
                Subscriber::builder(["q"]).max_workers(0),
                "max_workers must be >= 1",
            ),
            (
                Subscriber::builder(["q"]).fetch_batch_size(0),
                "fetch_batch_size must be >= 1",
            ),
            (
                Subscriber::builder(["q"]).terminal_flush_batch_size(0),
                "terminal_flush_batch_size must be >= 1",
            ),
            (
                Subscriber::builder(["q"]).lease_ttl(Duration::ZERO),
                "lease_ttl must be > 0",
            ),
            (
                Subscriber::builder(["q"]).min_fetch_interval(Duration::ZERO),
                "min_fetch_interval must be > 0",
            ),
            (
                Subscriber::builder(["q"])
                    .min_fetch_interval(Duration::from_secs(5))
                    .max_fetch_interval(Duration::from_secs(2)),
                "must be <= max_fetch_interval",
            ),
            (
                Subscriber::builder(["q"]).max_deliveries(0),
                "max_deliveries must be >= 1",
            ),
            (
                Subscriber::builder(["q"])
                    .retry(crate::engine::retry::ConstantRetry::new(Duration::ZERO)),
                "invalid retry strategy",
            ),
        ];
        let ttl = Duration::from_secs(3);
        let cases = cases.into_iter().chain([
            (
                Subscriber::builder(["q"])
                    .lease_ttl(ttl)
                    .lease_heartbeat(Some(ttl)),
                "lease_heartbeat (3s) must be shorter than lease_ttl (3s)",
            ),
            (
                Subscriber::builder(["q"]).lease_heartbeat(Some(Duration::ZERO)),
                "lease_heartbeat must be > 0",
            ),
        ]);
        for (b, needle) in cases {
            let err = build(b).expect_err(needle).to_string();
            assert!(err.contains(needle), "{err:?} should contain {needle:?}");
        }
    }

    #[test]
    fn likely_wrong_combinations_warn() {
        let warns = |b: SubscriberBuilder| build(b).expect("valid").warnings().join("\n");
        assert!(
            warns(Subscriber::builder(["q"]).max_deliveries(3).retry(NoRetry))
                .contains("max_deliveries has no effect")
        );
        assert!(
            warns(
                Subscriber::builder(["q"])
                    .ack_policy(AckPolicy::RejectOnError)
                    .retry(crate::engine::retry::ConstantRetry::new(
                        Duration::from_secs(1)
                    ))
            )
            .contains("ignores the retry strategy")
        );
        assert!(
            warns(
                Subscriber::builder(["q"])
                    .ack_policy(AckPolicy::NackOnError)
                    .retry(NoRetry)
            )
            .contains("NackOnError with NoRetry")
        );
        assert!(
            warns(Subscriber::builder(["q"]).poison_policy(PoisonPolicy::DeadLetterAndContinue))
                .contains("no effect on an unordered subscriber")
        );
        assert!(
            warns(
                Subscriber::builder(["q"])
                    .ordered(true)
                    .poison_policy(PoisonPolicy::DeadLetterAndContinue)
            )
            .is_empty()
        );
        // A short lease is sane (fast redelivery after a crash): no warning.
        assert!(warns(Subscriber::builder(["q"]).lease_ttl(Duration::from_secs(5))).is_empty());
        assert!(
            warns(
                Subscriber::builder(["q"])
                    .lease_ttl(Duration::from_secs(10))
                    .lease_heartbeat(Some(Duration::from_secs(6)))
            )
            .contains("more than half of lease_ttl")
        );
        assert!(
            warns(
                Subscriber::builder(["q"])
                    .ack_policy(AckPolicy::RejectOnError)
                    .retry(NoRetry)
            )
            .is_empty()
        );
    }
}
