//! The fetch loop: one per subscriber, on its own connection. Claims rows into
//! the bounded in-memory buffer the workers drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::SubShared;
use super::backoff::{self, Reconnect};
use crate::engine::message::Delivery;
use crate::store::conn as store;

/// The longest time between two claims that look for expired leases while
/// the queue is busy.
const MAX_EXPIRED_SCAN_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) async fn run(shared: Arc<SubShared>) {
    let mut c = Claimer::new(shared.clone());
    loop {
        match c.ready().await {
            Flow::Go => {}
            Flow::Again => continue,
            Flow::Stop => return,
        }
        let free = shared.tx.capacity();
        // Reserve the slots this claim may fill, so that a concurrent
        // fetch loop of the same subscriber cannot claim them too.
        let permits = if free >= shared.refill_at {
            shared.tx.try_reserve_many(free).ok()
        } else {
            None
        };
        let Some(permits) = permits else {
            // Workers wake us as soon as enough slots are free.
            if shared.wait(shared.opts().get_min_fetch_interval()).await {
                return;
            }
            continue;
        };
        let token = Uuid::new_v4();
        let with_expired = c.scan_expired();
        shared.claim_begins();
        let cursor = shared.key_cursor();
        let args = store::ClaimArgs {
            token,
            ordered: cursor.as_deref(),
            ..shared.claim_args(free, with_expired)
        };
        let Some(conn) = c.conn.as_mut() else {
            continue;
        };
        // The leases start at the claim's `now()`, no earlier than this.
        let asked = Instant::now();
        let claimed = store::claim(shared.broker.stmts(), conn, &args).await;
        shared.claim_ends(claimed.as_deref().unwrap_or_default());
        match claimed {
            Ok(rows) => {
                let n = rows.len();
                shared.metrics.fetched(n);
                // `rows.len() <= free`: a permit for each; unused ones
                // return to the buffer when dropped.
                for (row, permit) in rows.into_iter().zip(permits) {
                    let d = Arc::new(Delivery::new(row, token));
                    shared.leases.track(&d, asked);
                    permit.send(d);
                }
                if n > 0 {
                    tracing::debug!(subscriber = %shared.sub.name(), count = n, "claimed");
                    c.worked();
                    continue;
                }
                if c.empty().await {
                    return;
                }
            }
            Err(e) => {
                if c.failed(e).await {
                    return;
                }
            }
        }
    }
}

/// What a claim loop does next.
pub(super) enum Flow {
    /// Claim now (connected).
    Go,
    /// Loop again (after a backoff or a wait).
    Again,
    /// The subscriber stops claiming.
    Stop,
}

/// What the claim loops (the fetch loop, the lot loops) share: their own
/// connection with its reconnect backoff, the idle backoff with its wake-ups,
/// and when to look for expired leases.
pub(super) struct Claimer {
    shared: Arc<SubShared>,
    pub(super) conn: Option<store::Conn>,
    reconnect: Reconnect,
    idle: u32,
    /// Expired leases can only appear `lease_ttl` after a claim, so the
    /// claim looks for them (a scan of the leased index, which holds every
    /// in-flight row) at most every quarter lease while rows keep coming,
    /// and on every poll once the queue is idle.
    expired_every: Duration,
    last_expired_scan: Option<Instant>,
}

impl Claimer {
    pub(super) fn new(shared: Arc<SubShared>) -> Self {
        let expired_every = (shared.opts().get_lease_ttl() / 4).min(MAX_EXPIRED_SCAN_INTERVAL);
        Self {
            shared,
            conn: None,
            reconnect: Reconnect::default(),
            idle: 0,
            expired_every,
            last_expired_scan: None,
        }
    }

    /// Connects if needed (backing off after a failure).
    pub(super) async fn ready(&mut self) -> Flow {
        if self.shared.stop_fetch.is_cancelled() {
            return Flow::Stop;
        }
        if self.conn.is_some() {
            return Flow::Go;
        }
        match self.shared.broker.store_conn(&self.shared.fetch_opts).await {
            Ok(c) => {
                self.conn = Some(c);
                Flow::Go
            }
            Err(e) => {
                let wait = self.reconnect.failed();
                if backs_off(&self.shared, wait, "cannot connect", &e, "retrying").await {
                    Flow::Stop
                } else {
                    Flow::Again
                }
            }
        }
    }

    /// Whether this claim looks for expired leases too.
    pub(super) fn scan_expired(&mut self) -> bool {
        let with_expired = self.idle > 0
            || self
                .last_expired_scan
                .is_none_or(|t| t.elapsed() >= self.expired_every);
        if with_expired {
            self.last_expired_scan = Some(Instant::now());
        }
        with_expired
    }

    /// A claim returned rows (or a lot committed): the connection works and
    /// the queue is busy.
    pub(super) fn worked(&mut self) {
        // A later incident starts its reconnect backoff from the minimum.
        self.reconnect.worked();
        self.idle = 0;
    }

    /// A claim came back empty: waits (until a wake-up, the earliest row
    /// known to become due, or the next poll); `true` if stopping.
    pub(super) async fn empty(&mut self) -> bool {
        let shared = self.shared.clone();
        self.reconnect.worked();
        self.idle = (self.idle + 1).min(30);
        // Wake up when the earliest future-dated row becomes due (a delayed
        // publish, another relay's retry), not only at the next poll.
        if let Some(conn) = self.conn.as_mut() {
            match store::next_due(shared.broker.stmts(), conn, shared.sub.queues()).await {
                Ok(Some(after)) => shared.due_in(after),
                Ok(None) => {}
                Err(e) if store::is_connection_error(&e) => {
                    self.conn = None;
                    let wait = self.reconnect.failed();
                    return backs_off(&shared, wait, "lost its connection", &e, "reconnecting")
                        .await;
                }
                Err(e) => tracing::warn!(
                    subscriber = %shared.sub.name(),
                    "outbox fetch loop cannot look up the next due row ({e}); polling instead"
                ),
            }
        }
        let opts = shared.opts();
        let wait = backoff::compute(
            self.idle,
            opts.get_min_fetch_interval(),
            opts.get_max_fetch_interval(),
        );
        shared.wait_idle(wait).await
    }

    /// A statement failed: drops the connection and backs off; `true` if
    /// stopping.
    pub(super) async fn failed(&mut self, e: sqlx::Error) -> bool {
        let wait = if store::is_connection_error(&e) {
            self.reconnect.failed()
        } else {
            // A refused statement (schema drift, permissions): slow down,
            // but keep trying.
            self.reconnect.failed().max(Duration::from_secs(1))
        };
        self.conn = None;
        let e = with_schema_hint(e);
        backs_off(&self.shared, wait, "error", &e, "reconnecting").await
    }
}

/// Logs why the fetch loop gives up its connection (`outbox fetch loop
/// {what}: {error}; {then} in {wait}`) and waits `wait`; `true` if stopping
/// meanwhile.
async fn backs_off(
    shared: &SubShared,
    wait: Duration,
    what: &str,
    error: &(dyn std::fmt::Display + Sync),
    then: &str,
) -> bool {
    tracing::error!(
        subscriber = %shared.sub.name(),
        "outbox fetch loop {what}: {error}; {then} in {wait:.1?}"
    );
    shared.sleep_or_stop(wait).await
}

/// A claim refused because the table predates a column (a faststream-outbox
/// table, or one created by an older version): says what to run.
fn with_schema_hint(e: sqlx::Error) -> String {
    let undefined_column =
        matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42703"));
    if undefined_column && e.to_string().contains("ordering_key") {
        format!(
            "{e} (the outbox table has no ordering_key column yet: run OutboxTable::migrate, \
             or `outbox migrate`, which adds it and its index; OutboxBroker::validate_schema \
             prints the DDL)"
        )
    } else {
        e.to_string()
    }
}
