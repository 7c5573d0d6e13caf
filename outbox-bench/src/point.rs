//! One measured point: the probe window around a workload, and the JSON
//! result it turns into.

use std::time::Duration;

use outbox_core::OutboxTable;
use serde_json::{Map, Value, json};

use crate::db::{Db, Delta, Probe, Snapshot};
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
