//! One measured point: the probe window around a workload, and the JSON
//! result it turns into.

use std::time::Duration;

use outbox_core::OutboxTable;
use serde_json::{Map, Value, json};

use crate::db::{Db, Delta, Prefilled, Probe, Snapshot, WalStats};
use crate::sys::{self, CpuSnap, LoadWatch, round};

/// Latency percentiles (nearest rank) of `samples`, in milliseconds.
pub(crate) fn percentiles_ms(samples: &mut [f64]) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let at = |p: f64| {
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        samples[rank.clamp(1, n) - 1]
    };
    let mean = samples.iter().sum::<f64>() / n as f64;
    json!({
        "samples": n,
        "p50": round(at(50.0), 3),
        "p95": round(at(95.0), 3),
        "p99": round(at(99.0), 3),
        "max": round(samples[n - 1], 3),
        "min": round(samples[0], 3),
        "mean": round(mean, 3),
    })
}

/// An open measurement window.
#[derive(Debug)]
pub(crate) struct Window {
    probe: Probe,
    table: OutboxTable,
    before: Snapshot,
    watch: LoadWatch,
    rss_reset: bool,
}

/// Where a point's producer wrote its rows, for the WAL split of the result
/// (`wal_bytes_per_msg_produce` / `_drain` / `_total`, `wal_scope`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum WalScope {
    /// A backlog written before the window (server-side `INSERT … SELECT`,
    /// see `db::prefill_keyed`): its WAL is the producer's share, the
    /// window's the consumer's (claims and outcomes).
    Prefilled(Prefilled),
    /// The producer ran inside the window (latency, steady relay): the
    /// window's WAL is the total; no split. A backlog written before the
    /// window as well (steady relay with `--backlog`) is added to the total.
    ProducerInWindow(Option<Prefilled>),
    /// The window is the producer alone (`produce`).
    ProducerOnly,
}

impl WalScope {
    /// (produce, drain, total) WAL bytes per message, and what they cover.
    fn split(self, window_bytes: u64, messages: u64) -> (Value, Value, Value, &'static str) {
        let per = |b: u64, n: u64| b as f64 / n.max(1) as f64;
        let window = per(window_bytes, messages);
        match self {
            Self::Prefilled(p) => {
                let produce = per(p.wal_bytes, p.rows);
                (
                    json!(round(produce, 1)),
                    json!(round(window, 1)),
                    json!(round(produce + window, 1)),
                    "produce: the backlog's INSERTs (server-side INSERT ... SELECT before the                      window, the same rows publish_batch writes, VACUUM excluded) / its rows;                      drain: the measured window (claims, outcomes; full-page images after its                      CHECKPOINT included) / messages; total: their sum",
                )
            }
            Self::ProducerInWindow(pre) => (
                Value::Null,
                Value::Null,
                json!(round(
                    per(window_bytes + pre.map_or(0, |p| p.wal_bytes), messages),
                    1
                )),
                "total: the measured window, with the producer's INSERTs and the consumer                  inside it (full-page images after its CHECKPOINT included) / messages; no split",
            ),
            Self::ProducerOnly => (
                json!(round(window, 1)),
                Value::Null,
                json!(round(window, 1)),
                "produce = total: the producer's window / messages",
            ),
        }
    }
}

/// What a scenario measured, before PostgreSQL's side is added.
#[derive(Debug)]
pub(crate) struct Measured {
    pub(crate) scenario: &'static str,
    pub(crate) params: Value,
    pub(crate) messages: u64,
    pub(crate) seconds: f64,
    /// Latency percentiles, where the scenario has them.
    pub(crate) latency: Value,
    /// Scenario-specific fields (slices, lag, …), merged into the result.
    pub(crate) extra: Map<String, Value>,
    /// When the measured window ended (CPU counters).
    pub(crate) cpu_end: CpuSnap,
    /// Rows the table must hold afterwards.
    pub(crate) expect_rows: Option<i64>,
    /// Where the producer's WAL is (the WAL split).
    pub(crate) wal: WalScope,
}

/// The finished result: one JSON object, plus whether a compile ran during it.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) json: Value,
    pub(crate) rustc_max: usize,
    pub(crate) delta: Delta,
    pub(crate) rows_left: i64,
}

impl Window {
    /// CHECKPOINT, then the "before" snapshot; resets the peak RSS. `keep`:
    /// connections the workload opened beforehand on purpose (a producer
    /// pool); any other is waited for, so its statistics are flushed first.
    pub(crate) async fn open(db: &Db, table: &OutboxTable, keep: usize) -> anyhow::Result<Self> {
        let mut probe = Probe::connect(db).await?;
        probe
            .wait_backends_gone(i64::try_from(keep)?, Duration::from_secs(10))
            .await?;
        probe.checkpoint().await?;
        let before = probe.snapshot(table).await?;
        let rss_reset = sys::reset_peak_rss();
        Ok(Self {
            probe,
            table: table.clone(),
            before,
            watch: LoadWatch::start(),
            rss_reset,
        })
    }

    /// The probe (for sampling during the run; its statements are not counted).
    pub(crate) fn probe(&mut self) -> &mut Probe {
        &mut self.probe
    }

    /// CPU counters now (the end of the measured window).
    pub(crate) fn cpu_now(&self) -> CpuSnap {
        self.probe.cpu()
    }

    /// Closes the window: waits until the workload's connections are gone
    /// (so their statistics are flushed), takes the "after" snapshot and
    /// builds the result.
    pub(crate) async fn close(mut self, m: Measured) -> anyhow::Result<Finished> {
        let peak = sys::peak_rss_mib();
        let rss = sys::rss_mib();
        let (load, rustc_max) = self.watch.finish().await;
        self.probe
            .wait_backends_gone(0, Duration::from_secs(10))
            .await?;
        // Backends leave pg_stat_activity just before they exit and are reaped.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cpu_end = m.cpu_end.with_postgres_from(&self.probe.cpu());
        let after = self.probe.snapshot(&self.table).await?;
        let delta = Delta::between(&self.before, &after, &cpu_end);
        let wal_detail = self.probe.wal_between(&self.before, &after).await;
        let rows_left = self.probe.count(&self.table).await?;
        let mut out = Map::new();
        out.insert("scenario".into(), json!(m.scenario));
        out.insert("impl".into(), json!("rust"));
        out.insert("params".into(), m.params);
        out.insert("messages".into(), json!(m.messages));
        out.insert("seconds".into(), json!(round(m.seconds, 4)));
        out.insert(
            "throughput_msg_s".into(),
            json!(round(m.messages as f64 / m.seconds.max(1e-9), 1)),
        );
        out.insert("latency_ms".into(), m.latency);
        if let Value::Object(pg) = delta.to_json(m.messages, 8) {
            out.extend(pg);
        }
        let (produce, drain, total, scope) = m.wal.split(delta.wal_bytes, m.messages);
        out.insert("wal_bytes_per_msg_produce".into(), produce);
        out.insert("wal_bytes_per_msg_drain".into(), drain);
        let total_f = total.as_f64();
        out.insert("wal_bytes_per_msg_total".into(), total);
        out.insert("wal_scope".into(), json!(scope));
        // Full-page images: the first change of each page after a
        // CHECKPOINT (the window starts with one) writes the whole page. A
        // backlog drained right after a CHECKPOINT pays one per heap page; a
        // steady relay, whose rows are deleted soon after their INSERT,
        // rarely does.
        let msgs = m.messages.max(1) as f64;
        let window_fpi = wal_detail.as_ref().map(WalStats::fpi_bytes);
        out.insert(
            "wal_fpi_bytes_per_msg_window".into(),
            json!(window_fpi.map(|b| round(b as f64 / msgs, 1))),
        );
        let produce_fpi = match m.wal {
            WalScope::Prefilled(p) => p
                .wal_fpi_bytes
                .map(|b| json!(round(b as f64 / p.rows.max(1) as f64, 1))),
            _ => None,
        };
        out.insert(
            "wal_fpi_bytes_per_msg_produce".into(),
            produce_fpi.unwrap_or(Value::Null),
        );
        out.insert(
            "wal_bytes_per_msg_total_without_fpi".into(),
            match (total_f, window_fpi, &m.wal) {
                (Some(t), Some(w), WalScope::Prefilled(p)) => {
                    p.wal_fpi_bytes.map_or(Value::Null, |pf| {
                        json!(round(
                            t - w as f64 / msgs - pf as f64 / p.rows.max(1) as f64,
                            1
                        ))
                    })
                }
                (Some(t), Some(w), WalScope::ProducerInWindow(None) | WalScope::ProducerOnly) => {
                    json!(round(t - w as f64 / msgs, 1))
                }
                (Some(t), Some(w), WalScope::ProducerInWindow(Some(p))) => {
                    p.wal_fpi_bytes.map_or(Value::Null, |pf| {
                        json!(round(t - (w + pf) as f64 / msgs, 1))
                    })
                }
                _ => Value::Null,
            },
        );
        if let Some(w) = &wal_detail {
            // By resource manager: [records, record bytes, FPI bytes] per message.
            let per = |v: i64| round(v as f64 / msgs, 2);
            out.insert(
                "wal_by_rmgr_per_msg".into(),
                w.0.iter()
                    .map(|(name, n, rec, fpi)| {
                        (name.clone(), json!([per(*n), per(*rec), per(*fpi)]))
                    })
                    .collect::<Map<_, _>>()
                    .into(),
            );
        }
        out.insert("rows_left".into(), json!(rows_left));
        out.insert(
            "peak_rss_mib".into(),
            json!(peak.filter(|_| self.rss_reset).map(|v| round(v, 1))),
        );
        out.insert("rss_end_mib".into(), json!(rss.map(|v| round(v, 1))));
        out.insert("load".into(), load);
        out.insert("build".into(), crate::build_info());
        out.insert(
            "at".into(),
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
        out.extend(m.extra);
        if let Some(want) = m.expect_rows
            && rows_left != want
        {
            out.insert(
                "error".into(),
                json!(format!("{rows_left} rows left, expected {want}")),
            );
        }
        Ok(Finished {
            json: Value::Object(out),
            rustc_max,
            delta,
            rows_left,
        })
    }
}
