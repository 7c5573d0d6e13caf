//! `ceiling`: the bus's own confirmed-publish ceiling, with its plain client
//! (no outbox, no PostgreSQL): the same payloads, the same confirm settings
//! as the transport, `in_flight` unconfirmed publishes at once. The relay's
//! figures are read against it (`relay --bus`, `latency --bus`).

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use serde_json::{Map, Value, json};

use crate::buses::{Bus, Target};
use crate::db::Body;
use crate::point::{Finished, percentiles_ms};
use crate::sys::{LoadWatch, round};

/// One ceiling point.
#[derive(Clone)]
pub(crate) struct CeilingParams {
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) messages: u64,
    pub(crate) in_flight: usize,
    pub(crate) payload_bytes: usize,
}

pub(crate) async fn run(p: &CeilingParams) -> anyhow::Result<Finished> {
    let payload = serde_json::to_vec(&Body::new(p.payload_bytes))?;
    let dest = Target::fresh_destination("bench.ceiling");
    p.bus.prepare(&dest).await?;
    let result = measure(p, &dest, &payload).await;
    p.bus.cleanup(&dest).await;
    result
}

async fn measure(p: &CeilingParams, dest: &str, payload: &[u8]) -> anyhow::Result<Finished> {
    let n = usize::try_from(p.messages)?;
    // Warm-up: connection and channel set-up off the clock.
    p.bus
        .ceiling(dest, 100.min(n), payload, p.in_flight)
        .await?;
    let watch = LoadWatch::start();
    let t0 = Instant::now();
    let run = p.bus.ceiling(dest, n, payload, p.in_flight).await?;
    let seconds = t0.elapsed().as_secs_f64();
    let (load, rustc_max) = watch.finish().await;
    let arrived = p.bus.count(dest).await?;
    let want = p.messages + 100.min(p.messages);
    if run.confirm_latencies.len() != n {
        bail!(
            "{} confirmations for {n} publishes",
            run.confirm_latencies.len()
        );
    }
    let mut lat: Vec<f64> = run
        .confirm_latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    let mut out = Map::new();
    out.insert("scenario".into(), json!("ceiling"));
    out.insert("impl".into(), json!("plain-client"));
    out.insert(
        "params".into(),
        json!({
            "bus": p.bus.name(),
            "in_flight": p.in_flight,
            "payload_bytes": p.payload_bytes,
            "settings": p.bus.settings(),
        }),
    );
    out.insert("messages".into(), json!(p.messages));
    out.insert("seconds".into(), json!(round(seconds, 4)));
    out.insert(
        "throughput_msg_s".into(),
        json!(round(
            p.messages as f64 / run.elapsed.as_secs_f64().max(1e-9),
            1
        )),
    );
    out.insert("latency_ms".into(), percentiles_ms(&mut lat));
    out.insert(
        "latency_what".into(),
        json!("publish call -> the bus confirmed it"),
    );
    out.insert("arrived".into(), json!(arrived));
    out.insert("load".into(), load);
    out.insert("build".into(), crate::build_info());
    out.insert(
        "at".into(),
        json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    );
    // `cpu.other_cores` is what `points` checks for disturbance; the ceiling
    // has no PostgreSQL split, so only a compile marks it disturbed.
    out.insert("cpu".into(), json!({ "other_cores": 0.0 }));
    if arrived < want {
        out.insert(
            "error".into(),
            json!(format!("{arrived} messages arrived, {want} were confirmed")),
        );
    }
    Ok(Finished {
        json: Value::Object(out),
        rustc_max,
        delta: Default::default(),
        rows_left: 0,
    })
}
