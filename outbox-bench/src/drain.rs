//! `drain`: a prefilled backlog drained by a no-op handler through
//! `Engine` / `Subscriber`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use outbox_core::{ClaimMode, Engine, Message, Subscriber, SubscriberOptions};
use serde_json::{Map, json};
use tokio::sync::Notify;

use crate::db::{self, Db, Hold, Holder, QUEUE};
use crate::point::{Finished, Measured, WalScope, Window};
use crate::sys::round;

/// The subscriber knobs a drain or relay point sets.
#[derive(Debug, Clone)]
pub(crate) struct Knobs {
    pub(crate) workers: usize,
    pub(crate) fetch_batch_size: usize,
    pub(crate) ack_batch: usize,
    pub(crate) min_fetch: Duration,
    pub(crate) max_fetch: Duration,
    /// Claim statements in flight at once.
    pub(crate) fetch_concurrency: usize,
    /// Acks commit synchronously (`OutboxBroker::synchronous_relay_writes`).
    pub(crate) durable_acks: bool,
    /// An ordered subscriber (`SubscriberOptions::ordered`): per-key FIFO.
    pub(crate) ordered: bool,
    /// `SubscriberOptions::claim_mode`; `None`: the engine's default
    /// (`Lease` for a subscriber, `Transaction` for a relay route).
    pub(crate) claim: Option<ClaimMode>,
}

impl Knobs {
    /// The subscriber options these knobs stand for.
    pub(crate) fn options(&self) -> SubscriberOptions {
        let o = SubscriberOptions::default()
            .max_workers(self.workers)
            .fetch_batch_size(self.fetch_batch_size)
            .terminal_flush_batch_size(self.ack_batch)
            .fetch_concurrency(self.fetch_concurrency)
            .min_fetch_interval(self.min_fetch)
            .max_fetch_interval(self.max_fetch)
            .ordered(self.ordered);
        match self.claim {
            Some(mode) => o.claim_mode(mode),
            None => o,
        }
    }

    /// The knobs as result parameters, added to `params`. `relay`: the
    /// options go to an App route with a bus target (which gets the relay
    /// defaults for what is not set), for the effective claim mode.
    pub(crate) fn add_json(&self, params: &mut Map<String, serde_json::Value>, relay: bool) {
        let effective = self.options().relay_defaults(relay);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        for (k, v) in [
            ("workers", json!(self.workers)),
            ("fetch_batch_size", json!(self.fetch_batch_size)),
            ("ack_batch", json!(self.ack_batch)),
            ("min_fetch_ms", json!(ms(self.min_fetch))),
            ("max_fetch_ms", json!(ms(self.max_fetch))),
            ("fetch_concurrency", json!(self.fetch_concurrency)),
            ("durable_acks", json!(self.durable_acks)),
            ("ordered", json!(self.ordered)),
            (
                "claim_mode",
                json!(claim_mode_name(effective.get_claim_mode())),
            ),
            ("claim_mode_set", json!(self.claim.is_some())),
            ("max_hold_ms", json!(ms(effective.get_max_hold()))),
        ] {
            params.insert(k.to_owned(), v);
        }
    }
}

/// A claim mode's name in results and labels: `lease`, `transaction`.
pub(crate) fn claim_mode_name(mode: ClaimMode) -> &'static str {
    match mode {
        ClaimMode::Lease => "lease",
        ClaimMode::Transaction => "transaction",
        _ => "other",
    }
}

/// One drain point.
#[derive(Debug, Clone)]
pub(crate) struct DrainParams {
    pub(crate) backlog: u64,
    pub(crate) knobs: Knobs,
    pub(crate) listen: bool,
    pub(crate) payload_bytes: usize,
    /// Distinct ordering keys of the backlog (`k0`, `k1`, …, interleaved in
    /// id order); 0: rows without a key.
    pub(crate) keys: u64,
    /// A long transaction in another session for the whole point.
    pub(crate) hold: Hold,
    /// The handler always fails for the rows of key `k0` (retried every
    /// 10 ms, without limit): the other keys' rows are the workload.
    pub(crate) poison: bool,
}

/// Counts handled rows and timestamps each tenth of the drain.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) base: Instant,
    pub(crate) target: u64,
    pub(crate) handled: AtomicU64,
    /// Nanoseconds since `base` at which 10 %, 20 %, … 100 % were handled.
    pub(crate) marks: [AtomicU64; 10],
    pub(crate) done: Notify,
}

impl Progress {
    pub(crate) fn new(target: u64) -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            target,
            handled: AtomicU64::new(0),
            marks: Default::default(),
            done: Notify::new(),
        })
    }

    /// Records one handled row.
    pub(crate) fn hit(&self) {
        let n = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        // Boundary k (1..=10) is at ceil(target * k / 10).
        let t = self.target;
        let k_lo = (n * 10) / t.max(1);
        for k in k_lo.max(1)..=(k_lo + 1).min(10) {
            if (t * k).div_ceil(10) == n {
                let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.marks[(k - 1) as usize].store(ns, Ordering::Relaxed);
            }
        }
        if n == t {
            self.done.notify_one();
        }
    }

    /// Waits until `target` rows were handled, or errors after `timeout`.
    pub(crate) async fn wait(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.handled.load(Ordering::Relaxed) >= self.target {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {timeout:?}: {} of {} rows handled",
                    self.handled.load(Ordering::Relaxed),
                    self.target
                );
            }
            // Notify may have fired before we waited: re-check at least every 50 ms.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), self.done.notified())
                .await;
        }
    }

    /// Rate in each tenth of the run, msg/s, the clock starting at `start`
    /// (seconds since `base`).
    pub(crate) fn slices(&self, start: f64) -> Vec<serde_json::Value> {
        let t = self.target;
        let mut prev_t = start;
        let mut prev_n = 0u64;
        let mut out = Vec::with_capacity(10);
        for k in 1..=10u64 {
            let ns = self.marks[(k - 1) as usize].load(Ordering::Relaxed);
            let n = (t * k).div_ceil(10);
            if ns == 0 || n == prev_n {
                continue;
            }
            let at = ns as f64 / 1e9;
            let rate = (n - prev_n) as f64 / (at - prev_t).max(1e-9);
            out.push(
                json!({"upto_pct": k * 10, "at_s": round(at - start, 3), "msg_s": round(rate, 0)}),
            );
            prev_t = at;
            prev_n = n;
        }
        out
    }
}

/// A generous completion timeout: 2 minutes plus 2 ms per row.
pub(crate) fn timeout_for(n: u64) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(n.saturating_mul(2))
}

pub(crate) async fn run(db: &Db, p: &DrainParams) -> anyhow::Result<Finished> {
    db.with_fresh_table(async |table| {
        // The long transaction begins before the backlog is written: every
        // row is younger than it.
        let holder = Holder::open(db, p.hold).await?;
        let prefill = db::prefill_keyed(db, table, p.backlog, p.payload_bytes, p.keys).await?;
        let fence = if p.hold != Hold::None || p.knobs.ordered {
            Some(db::xmin_fence(db, table).await?)
        } else {
            None
        };
        measure(db, table, p, prefill, fence, holder).await
    })
    .await
}

async fn measure(
    db: &Db,
    table: &outbox_core::OutboxTable,
    p: &DrainParams,
    prefill: db::Prefilled,
    fence: Option<(i64, i64)>,
    mut holder: Option<Holder>,
) -> anyhow::Result<Finished> {
    // Closed once the engine stopped: the engine may read through it (the
    // table's settings at start), and an idle connection left in it would
    // outlive the point (the window waits for the workload's connections).
    let pool = db.lazy_pool();
    let broker =
        db::broker(pool.clone(), table.clone()).synchronous_relay_writes(p.knobs.durable_acks);
    let poisoned = if p.poison {
        db::rows_of_k0(p.backlog, p.keys)
    } else {
        0
    };
    let target = p.backlog - poisoned;
    let progress = Progress::new(target);
    let pr = progress.clone();
    let poison = p.poison;
    let mut opts = p.knobs.options();
    if poison {
        opts = opts.retry(outbox_core::retry::ConstantRetry::new(
            Duration::from_millis(10),
        ));
    }
    let sub = Subscriber::builder([QUEUE])
        .options(opts)
        .build(move |m: Message| {
            let fail = poison && m.ordering_key() == Some("k0");
            if !fail {
                pr.hit();
            }
            std::future::ready(if fail { Err("poisoned key k0") } else { Ok(()) })
        })?;
    let mut engine = Engine::new(broker)
        .gauge_interval(None)
        .application_name("outbox-bench")
        .subscriber(sub);
    if !p.listen {
        engine = engine.without_listen();
    }
    let window = Window::open(db, table, usize::from(holder.is_some())).await?;
    let t0 = Instant::now();
    let start = t0.duration_since(progress.base).as_secs_f64();
    engine.start().await.context("starting the engine")?;
    let waited = progress.wait(timeout_for(p.backlog)).await;
    let handled_s = t0.elapsed().as_secs_f64();
    let report = engine.stop().await;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_end = window.cpu_now();
    pool.close().await;
    if let Some(h) = holder.take() {
        h.end().await?;
    }
    waited?;
    let mut extra = Map::new();
    extra.insert("slices".into(), json!(progress.slices(start)));
    extra.insert(
        "handled".into(),
        json!(progress.handled.load(Ordering::Relaxed)),
    );
    extra.insert("handled_seconds".into(), json!(round(handled_s, 4)));
    extra.insert(
        "stop_ms".into(),
        json!(round((seconds - handled_s) * 1000.0, 2)),
    );
    extra.insert("released_at_stop".into(), json!(report.released));
    extra.insert(
        "prefill_seconds".into(),
        json!(round(prefill.took.as_secs_f64(), 2)),
    );
    if let Some((visible, rows)) = fence {
        // What a reader fenced on the oldest running transaction id would
        // have seen of the backlog when the drain started.
        extra.insert(
            "xmin_fence".into(),
            json!({"visible_rows": visible, "rows": rows}),
        );
    }
    if poisoned > 0 {
        extra.insert("poisoned_rows".into(), json!(poisoned));
    }
    window
        .close(Measured {
            scenario: "drain",
            params: {
                let mut params = Map::new();
                params.insert("backlog".into(), json!(p.backlog));
                params.insert("listen".into(), json!(p.listen));
                params.insert("payload_bytes".into(), json!(p.payload_bytes));
                params.insert("keys".into(), json!(p.keys));
                params.insert("hold".into(), json!(p.hold));
                params.insert("poison".into(), json!(p.poison));
                p.knobs.add_json(&mut params, false);
                params.into()
            },
            // The rows handled (a poisoned key's rows stay).
            messages: target,
            seconds,
            latency: serde_json::Value::Null,
            extra,
            cpu_end,
            expect_rows: Some(i64::try_from(poisoned)?),
            wal: WalScope::Prefilled(prefill),
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_marks_every_tenth() {
        let p = Progress::new(25);
        for _ in 0..25 {
            p.hit();
        }
        let marked = p
            .marks
            .iter()
            .filter(|m| m.load(Ordering::Relaxed) > 0)
            .count();
        assert_eq!(marked, 10);
        assert_eq!(p.slices(0.0).len(), 10);
    }
}
