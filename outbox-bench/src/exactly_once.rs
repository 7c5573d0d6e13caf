//! `exactly-once`: the cost of the transactional Kafka relay (issue 17,
//! `docs/exactly-once.md`) against the idempotent relay, in the same run,
//! on the same broker (noida-db: the local broker with Kafka transactions).
//!
//! Per round and mode (`idempotent`: a route on a plain `KafkaBroker`;
//! `transactional`: the same route with `exactly_once(lanes)` on
//! `KafkaBroker::transactional`), both with `fetch_batch_size` = `--batch`:
//!
//! 1. **throughput**: a backlog of `--rows` rows on a fresh table, relayed by
//!    an `App`, msg/s on two clocks: `throughput_msg_s`, the steady state,
//!    from 10 % of the rows deleted to 90 %; `drain_msg_s`, from the first
//!    row deleted to the last (the first lane's start, fencing and progress
//!    read are outside both; the other lanes open beside it, up to ~0.5 s
//!    later, which only the drain clock counts);
//! 2. **commit->visible**: with the relay running and idle, `--latency-rows`
//!    single-row transactions at `--latency-rate` per second, each carrying
//!    its commit time; a read_committed consumer of the topic takes the
//!    difference on arrival: p50/p99 in ms.
//!
//! One JSON object per mode and round, then a summary object with the
//! medians and the ratios (target: transactional at most 15 % below).
//! `--before-point` runs a command before every point (`bash
//! scripts/noida.sh restart`: noida-db keeps every topic it ever had and
//! snapshots all of it every few seconds, a growing cost that would land on
//! whichever point runs then).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use outbox_core::{App, BoxError, Message, OutboxTable, Raw, Response, Route};
use outbox_kafka::KafkaBroker;
use outbox_kafka::rdkafka::ClientConfig;
use outbox_kafka::rdkafka::consumer::{Consumer as _, StreamConsumer};
use outbox_kafka::rdkafka::message::Message as _;
use outbox_kafka::rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::db::{self, Db, QUEUE};
use crate::sys::round;

/// The scenario's parameters.
#[derive(Debug, Clone)]
pub(crate) struct EoParams {
    pub(crate) bootstrap: String,
    pub(crate) rows: u64,
    pub(crate) batch: usize,
    pub(crate) lanes: u32,
    pub(crate) partitions: i32,
    pub(crate) rounds: u32,
    pub(crate) payload_bytes: usize,
    pub(crate) latency_rows: u64,
    pub(crate) latency_rate: u64,
    /// A shell command run before every point (`--before-point`).
    pub(crate) before_point: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idempotent,
    Transactional,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Idempotent => "idempotent",
            Mode::Transactional => "transactional",
        }
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The relay App of `mode` on `table`, to `topic`.
fn relay_app(db: &Db, table: &OutboxTable, p: &EoParams, mode: Mode, topic: &str) -> App {
    let kafka = KafkaBroker::new(&p.bootstrap).client_id("outbox-bench-eo");
    let kafka = match mode {
        Mode::Idempotent => kafka,
        Mode::Transactional => kafka.transactional(unique("bench")),
    };
    let mut route = Route::builder([QUEUE])
        .name("eo-relay")
        .fetch_batch_size(p.batch)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .publish_to("kafka", topic.to_owned());
    if mode == Mode::Transactional {
        route = route.exactly_once(p.lanes);
    } else {
        // As many concurrent lots as the transactional mode has lanes.
        route = route.fetch_concurrency(p.lanes as usize);
    }
    let route = route.handler(|msg: Message, _ctx| async move {
        Ok::<_, BoxError>(Response::new(Raw(msg.payload().to_vec())))
    });
    App::new(db::broker(db.lazy_pool(), table.clone()))
        .without_discovery()
        .subscriber(route)
        .on_startup(kafka.connect())
}

async fn count(pool: &sqlx::PgPool, table: &OutboxTable) -> anyhow::Result<i64> {
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        table.qualified_name()
    )))
    .fetch_one(pool)
    .await?;
    Ok(n)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One mode, one round: throughput then commit->visible.
async fn point(db: &Db, p: &EoParams, mode: Mode, round_no: u32) -> anyhow::Result<Value> {
    db.with_fresh_table(async |table| {
        let topic = unique("bench-eo");
        crate::kafka::create_topic(&p.bootstrap, &topic, p.partitions).await?;
        db::prefill(db, table, p.rows, p.payload_bytes).await?;
        let pool = db.pool(2).await?;
        let app = relay_app(db, table, p, mode, &topic);
        let handle = app.handle();
        let run = tokio::spawn(app.run());
        let total = i64::try_from(p.rows)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        // Two clocks: the whole drain, from the first delete to the last;
        // and the steady state, from 10 % of the rows deleted to 90 % (the
        // transactional mode opens its lanes side by side, and one often
        // opens ~0.45 s after the others: its init_transactions retried).
        let (lo, hi) = (total - total / 10, total / 10);
        let mut marks: [Option<(Instant, i64)>; 3] = [None; 3];
        loop {
            let left = count(&pool, table).await?;
            let now = Instant::now();
            if marks[0].is_none() && left < total {
                marks[0] = Some((now, left));
            }
            if marks[1].is_none() && left <= lo {
                marks[1] = Some((now, left));
            }
            if marks[2].is_none() && left <= hi {
                marks[2] = Some((now, left));
            }
            if left == 0 {
                break;
            }
            if now > deadline || run.is_finished() {
                bail!("{}: the relay did not drain the backlog", mode.name());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ended = Instant::now();
        let (Some(first), Some(from), Some(to)) = (marks[0], marks[1], marks[2]) else {
            bail!("{}: the backlog drained between two polls", mode.name());
        };
        let seconds = (ended - first.0).as_secs_f64();
        let drain_throughput = p.rows as f64 / seconds;
        let steady_seconds = (to.0 - from.0).as_secs_f64();
        let throughput = (from.1 - to.1) as f64 / steady_seconds;

        // Commit -> visible to a read_committed consumer, relay idle.
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &p.bootstrap)
            .set("group.id", unique("bench-eo-reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("creating the read_committed consumer")?;
        let mut tpl = TopicPartitionList::new();
        for part in 0..p.partitions {
            tpl.add_partition_offset(&topic, part, Offset::End)?;
        }
        consumer.assign(&tpl)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(i64, i64)>();
        let reader = tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let seen = now_us();
                let Some(body) = m.payload() else { continue };
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                if let Some(sent) = v.get("sent_us").and_then(Value::as_i64)
                    && tx.send((sent, seen)).is_err()
                {
                    return;
                }
            }
        });
        let broker = db::broker(pool.clone(), table.clone());
        let every = Duration::from_secs_f64(1.0 / p.latency_rate.max(1) as f64);
        for i in 0..p.latency_rows {
            let mut t = pool.begin().await?;
            // Stamped just before the commit (which takes well under 1 ms
            // here): the row becomes visible to the relay at the commit.
            broker
                .publish(&json!({ "i": i, "sent_us": now_us() }), QUEUE, &mut t)
                .await?;
            t.commit().await?;
            tokio::time::sleep(every).await;
        }
        let mut lat: Vec<f64> = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while (lat.len() as u64) < p.latency_rows {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some((sent, seen))) => lat.push((seen - sent) as f64 / 1000.0),
                _ => break,
            }
        }
        drop(broker);
        reader.abort();
        handle.shutdown();
        run.await
            .context("relay task")?
            .context("the relay App failed")?;
        pool.close().await;
        crate::kafka::delete_topic(&p.bootstrap, &topic).await;
        if (lat.len() as u64) < p.latency_rows {
            bail!(
                "{}: {} of {} latency rows seen by the read_committed consumer within 30 s",
                mode.name(),
                lat.len(),
                p.latency_rows
            );
        }
        lat.sort_by(f64::total_cmp);
        Ok(json!({
            "scenario": "exactly-once",
            "mode": mode.name(),
            "round": round_no,
            "rows": p.rows,
            "batch": p.batch,
            "lanes": p.lanes,
            "partitions": p.partitions,
            "payload_bytes": p.payload_bytes,
            "seconds": round(seconds, 3),
            "drain_msg_s": round(drain_throughput, 1),
            "steady_seconds": round(steady_seconds, 3),
            "throughput_msg_s": round(throughput, 1),
            "latency_rows": p.latency_rows,
            "latency_rate_msg_s": p.latency_rate,
            "commit_to_visible_ms_p50": round(percentile(&lat, 0.5), 2),
            "commit_to_visible_ms_p99": round(percentile(&lat, 0.99), 2),
        }))
    })
    .await
}

/// Runs every round of both modes and prints the points and the summary.
pub(crate) async fn run(db: &Db, p: &EoParams) -> anyhow::Result<()> {
    let mut by_mode: HashMap<&'static str, Vec<Value>> = HashMap::new();
    for r in 0..p.rounds {
        for mode in [Mode::Idempotent, Mode::Transactional] {
            if let Some(cmd) = &p.before_point {
                let c = cmd.clone();
                let status = tokio::task::spawn_blocking(move || {
                    std::process::Command::new("sh")
                        .arg("-c")
                        .arg(c)
                        .stdout(std::process::Stdio::null())
                        .status()
                })
                .await?
                .with_context(|| format!("running --before-point `{cmd}`"))?;
                if !status.success() {
                    bail!("--before-point `{cmd}` failed: {status}");
                }
            }
            let v = point(db, p, mode, r).await?;
            println!("{v}");
            by_mode.entry(mode.name()).or_default().push(v);
        }
    }
    let median = |mode: &str, key: &str| -> f64 {
        let mut xs: Vec<f64> = by_mode
            .get(mode)
            .map(|vs| vs.iter().filter_map(|v| v.get(key)?.as_f64()).collect())
            .unwrap_or_default();
        xs.sort_by(f64::total_cmp);
        percentile(&xs, 0.5)
    };
    let idem = median("idempotent", "throughput_msg_s");
    let tx = median("transactional", "throughput_msg_s");
    let idem_drain = median("idempotent", "drain_msg_s");
    let tx_drain = median("transactional", "drain_msg_s");
    let summary = json!({
        "scenario": "exactly-once-summary",
        "rounds": p.rounds,
        "idempotent_msg_s_median": round(idem, 1),
        "transactional_msg_s_median": round(tx, 1),
        "transactional_vs_idempotent": round(tx / idem, 3),
        "idempotent_drain_msg_s_median": round(idem_drain, 1),
        "transactional_drain_msg_s_median": round(tx_drain, 1),
        "transactional_vs_idempotent_drain": round(tx_drain / idem_drain, 3),
        "target_ratio": 0.85,
        "before_point": p.before_point,
        "idempotent_commit_to_visible_ms_p50_median": median("idempotent", "commit_to_visible_ms_p50"),
        "idempotent_commit_to_visible_ms_p99_median": median("idempotent", "commit_to_visible_ms_p99"),
        "transactional_commit_to_visible_ms_p50_median": median("transactional", "commit_to_visible_ms_p50"),
        "transactional_commit_to_visible_ms_p99_median": median("transactional", "commit_to_visible_ms_p99"),
    });
    println!("{summary}");
    Ok(())
}
