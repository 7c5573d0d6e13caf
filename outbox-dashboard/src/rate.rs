//! The relay rate: a sampler of the outbox table's cumulative insert and
//! delete counters ([`table_activity`](outbox_core::OutboxBroker::table_activity))
//! every 5 s, kept for 15 minutes in memory, drawn as an inline SVG chart.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use maud::{Markup, html};

use crate::web::Shared;

/// How often the sampler reads the counters.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How far back the chart goes.
pub(crate) const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Samples kept: the window plus one (rates are differences).
const KEEP: usize = (WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize + 1;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    inserted: u64,
    deleted: u64,
}

/// The samples, and the last sampling error.
#[derive(Debug, Default)]
pub(crate) struct Sampler {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    samples: VecDeque<Sample>,
    error: Option<String>,
    running: bool,
}

impl Sampler {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn push(&self, inserted: u64, deleted: u64, at: Instant) {
        self.with(|i| {
            i.error = None;
            i.samples.push_back(Sample {
                at,
                inserted,
                deleted,
            });
            while i.samples.len() > KEEP {
                i.samples.pop_front();
            }
        });
    }

    /// Rates between consecutive samples: (seconds before `now`, inserted/s,
    /// deleted/s). A counter that went back (statistics reset) gives no point.
    fn rates(&self, now: Instant) -> Vec<(f64, f64, f64)> {
        self.with(|i| {
            i.samples
                .iter()
                .zip(i.samples.iter().skip(1))
                .filter_map(|(a, b)| {
                    let dt = b.at.checked_duration_since(a.at)?.as_secs_f64();
                    let ins = b.inserted.checked_sub(a.inserted)?;
                    let del = b.deleted.checked_sub(a.deleted)?;
                    if dt <= 0.0 {
                        return None;
                    }
                    let ago = now.saturating_duration_since(b.at).as_secs_f64();
                    #[allow(clippy::cast_precision_loss)]
                    Some((ago, ins as f64 / dt, del as f64 / dt))
                })
                .collect()
        })
    }
}

/// Starts the sampler of `shared` on the current Tokio runtime (none: no
/// chart). It stops once the router (the last `Arc`) is dropped.
pub(crate) fn start(shared: &Arc<Shared>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no Tokio runtime: the dashboard's relay-rate sampler does not run");
        return;
    };
    shared.sampler.with(|i| i.running = true);
    let weak = Arc::downgrade(shared);
    rt.spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(s) = weak.upgrade() else { return };
            match s.broker().table_activity().await {
                Ok(a) => s.sampler.push(a.inserted, a.deleted, Instant::now()),
                Err(e) => {
                    tracing::debug!("dashboard sampler: {e}");
                    s.sampler.with(|i| i.error = Some(e.to_string()));
                }
            }
        }
    });
}

/// Rounds up to 1, 2 or 5 times a power of ten.
fn nice_max(v: f64) -> f64 {
    if v <= 1.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn rate_text(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}/s")
    } else {
        format!("{v:.1}/s")
    }
}

/// The chart (`<svg id="rate-chart">`) and a line with the latest rates.
pub(crate) fn chart(sampler: &Sampler) -> Markup {
    let now = Instant::now();
    let points = sampler.rates(now);
    let (error, running) = sampler.with(|i| (i.error.clone(), i.running));
    const W: f64 = 720.0;
    const H: f64 = 160.0;
    const LEFT: f64 = 56.0;
    const BOTTOM: f64 = 22.0;
    const TOP: f64 = 10.0;
    let window = WINDOW.as_secs_f64();
    let max = nice_max(points.iter().map(|(_, i, d)| i.max(*d)).fold(0.0, f64::max));
    let x = |ago: f64| LEFT + (W - LEFT - 8.0) * (1.0 - (ago / window).min(1.0));
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / max);
    let line = |pick: fn(&(f64, f64, f64)) -> f64| {
        let mut s = String::new();
        for p in &points {
            let _ = write!(s, "{:.1},{:.1} ", x(p.0), y(pick(p)));
        }
        s
    };
    let (ins, del) = (line(|p| p.1), line(|p| p.2));
    let status = if let Some(e) = &error {
        format!("cannot read the table's statistics: {e}")
    } else if !running {
        "the sampler is not running (no Tokio runtime)".to_owned()
    } else if points.is_empty() {
        format!(
            "collecting samples (one every {} s)…",
            SAMPLE_EVERY.as_secs()
        )
    } else {
        String::new()
    };
    let latest = points.last();
    html! {
        svg #rate-chart xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (W) " " (H) }
            role="img" aria-label="rows relayed (deleted) and inserted per second, last 15 minutes" {
            title { "rows relayed (deleted) and inserted per second, last 15 minutes" }
            line x1=(LEFT) y1=(H - BOTTOM) x2=(W - 8.0) y2=(H - BOTTOM) stroke="#999" {}
            line x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(H - BOTTOM) stroke="#999" {}
            line x1=(LEFT) y1=(TOP) x2=(W - 8.0) y2=(TOP) stroke="#ddd" stroke-dasharray="3 3" {}
            text x=(LEFT - 4.0) y=(TOP + 4.0) text-anchor="end" font-size="11" { (rate_text(max)) }
            text x=(LEFT - 4.0) y=(H - BOTTOM) text-anchor="end" font-size="11" { "0" }
            text x=(LEFT) y=(H - 6.0) font-size="11" { "−15 min" }
            text x=(W - 8.0) y=(H - 6.0) text-anchor="end" font-size="11" { "now" }
            polyline.deleted points=(del) fill="none" stroke="#2b7a0b" stroke-width="2" {}
            polyline.inserted points=(ins) fill="none" stroke="#1f5fbf" stroke-width="1.5" stroke-dasharray="4 2" {}
            @if !status.is_empty() {
                text x=((W + LEFT) / 2.0) y=(H / 2.0) text-anchor="middle" font-size="13" fill="#666" { (status) }
            }
        }
        p.legend {
            span.key.deleted { "■" } " relayed (deleted)"
            @if let Some(p) = latest { " " strong { (rate_text(p.2)) } }
            " · "
            span.key.inserted { "■" } " inserted"
            @if let Some(p) = latest { " " strong { (rate_text(p.1)) } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_over_time_and_skip_resets() {
        let s = Sampler::default();
        let t0 = Instant::now();
        s.push(100, 50, t0);
        s.push(150, 100, t0 + Duration::from_secs(5));
        s.push(10, 5, t0 + Duration::from_secs(10)); // statistics reset
        s.push(20, 25, t0 + Duration::from_secs(15));
        let r = s.rates(t0 + Duration::from_secs(15));
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(
            (r[0].1 - 10.0).abs() < 1e-9 && (r[0].2 - 10.0).abs() < 1e-9,
            "{r:?}"
        );
        assert!(
            (r[1].1 - 2.0).abs() < 1e-9 && (r[1].2 - 4.0).abs() < 1e-9,
            "{r:?}"
        );
        assert!(r[1].0.abs() < 1e-9);
    }

    #[test]
    fn the_ring_keeps_fifteen_minutes() {
        let s = Sampler::default();
        let t0 = Instant::now();
        for n in 0..500u64 {
            s.push(n, n, t0 + Duration::from_secs(5 * n));
        }
        assert_eq!(s.with(|i| i.samples.len()), KEEP);
        assert_eq!(KEEP, 181);
    }

    #[test]
    fn the_scale_is_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.2), 5.0);
        assert_eq!(nice_max(12.0), 20.0);
        assert_eq!(nice_max(5000.0), 5000.0);
    }

    #[test]
    fn the_chart_has_its_id_before_any_sample() {
        let html = chart(&Sampler::default()).into_string();
        assert!(html.contains(r#"<svg id="rate-chart""#), "{html}");
        assert!(html.contains("the sampler is not running"), "{html}");
    }
}
