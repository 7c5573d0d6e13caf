//! `relay`: rows relayed to a bus (Kafka through outbox-kafka by default;
//! RabbitMQ, NATS, Redis with `--bus`) through `App`, each row deleted only
//! after the bus acknowledged it. Two modes: drain a prefilled
//! backlog, or a steady state with a producer publishing at a fixed rate.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use outbox_core::{App, BoxError, Message, OutboxTable, Raw, Response, Route, SubscriberOptions};
use serde_json::{Map, Value, json};

use crate::buses::Target;
use crate::db::{self, Body, Db, QUEUE};
use crate::drain::{Knobs, Progress, claim_mode_name, timeout_for};
use crate::point::{Finished, Measured, WalScope, Window, percentiles_ms};
use crate::sys::round;
use crate::timed::{CREATED_HEADER, Confirms, Timed};

/// One relay point.
#[derive(Debug, Clone)]
pub(crate) struct RelayParams {
    /// The bus (Kafka: bootstrap, partitions, linger).
    pub(crate) target: Target,
    pub(crate) backlog: u64,
    pub(crate) knobs: Knobs,
    pub(crate) payload_bytes: usize,
    /// Steady state: publish this many msg/s while relaying …
    pub(crate) rate: Option<u64>,
    /// … for this long.
    pub(crate) duration: Duration,
    /// Rows per producer transaction in steady state.
    pub(crate) producer_batch: usize,
    pub(crate) keep_topic: bool,
    /// The README's relay: a route with no tuning at all (the relay
    /// defaults) and the transport's default settings; `knobs` and the
    /// Kafka linger are ignored.
    pub(crate) readme_defaults: bool,
    /// Distinct ordering keys of the backlog (see `drain`); 0: no key. The
    /// key is the Kafka record key.
    pub(crate) keys: u64,
    /// The broker's own ingest ceiling measured in the same run with the
    /// same producer settings (`relay --ceiling`), msg/s.
    pub(crate) ceiling_msg_s: Option<f64>,
}

impl RelayParams {
    fn json(&self) -> Value {
        let mut params = self.target.json(self.readme_defaults);
        for (k, v) in [
            ("backlog", json!(self.backlog)),
            ("payload_bytes", json!(self.payload_bytes)),
            ("rate", json!(self.rate)),
            (
                "duration_s",
                json!(self.rate.map(|_| self.duration.as_secs_f64())),
            ),
            (
                "producer_batch",
                json!(self.rate.map(|_| self.producer_batch)),
            ),
            ("keys", json!(self.keys)),
            ("ordered", json!(self.knobs.ordered)),
        ] {
            params.insert(k.to_owned(), v);
        }
        if self.readme_defaults {
            let d = outbox_core::RELAY_DEFAULTS;
            let mut o = SubscriberOptions::default().relay_defaults(true);
            if let Some(mode) = self.knobs.claim {
                o = o.claim_mode(mode);
            }
            for (k, v) in [
                ("readme_defaults", json!(true)),
                ("workers", json!(d.max_workers)),
                ("fetch_batch_size", json!(d.fetch_batch_size)),
                ("ack_batch", json!(o.get_terminal_flush_batch_size())),
                ("fetch_concurrency", json!(o.get_fetch_concurrency())),
                ("claim_mode", json!(claim_mode_name(o.get_claim_mode()))),
                ("claim_mode_set", json!(self.knobs.claim.is_some())),
                (
                    "max_hold_ms",
                    json!(o.get_max_hold().as_secs_f64() * 1000.0),
                ),
            ] {
                params.insert(k.to_owned(), v);
            }
        } else {
            self.knobs.add_json(&mut params, true);
        }
        params.into()
    }
}

/// The relay application: one route forwarding each row's payload verbatim.
fn app(
    broker: outbox_core::OutboxBroker,
    p: &RelayParams,
    topic: &str,
    transport: Timed,
    stamp_created: bool,
) -> App {
    let mut route = Route::builder([QUEUE]);
    if p.readme_defaults {
        route = route.ordered(p.knobs.ordered);
        if let Some(mode) = p.knobs.claim {
            route = route.claim_mode(mode);
        }
    } else {
        route = route.options(p.knobs.options());
    }
    let route =
        route
            .publish_to(p.target.name(), topic)
            .handler(move |msg: Message, _ctx| async move {
                let mut r = Response::new(Raw(msg.payload().to_vec()));
                if stamp_created {
                    r = r.header(
                        CREATED_HEADER,
                        msg.created_at().timestamp_micros().to_string(),
                    );
                }
                Ok::<_, BoxError>(r)
            });
    App::new(broker.synchronous_relay_writes(p.knobs.durable_acks))
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .transport(transport)
        .configure_engine(|e| e.gauge_interval(None).application_name("outbox-bench"))
}

pub(crate) async fn run(db: &Db, p: &RelayParams) -> anyhow::Result<Finished> {
    db.with_fresh_table(async |table| {
        let topic = Target::fresh_destination("bench");
        p.target.prepare(&topic).await?;
        let result = async {
            let prefill = db::prefill_keyed(db, table, p.backlog, p.payload_bytes, p.keys).await?;
            match p.rate {
                None => backlog(db, table, p, &topic, prefill).await,
                Some(rate) => steady(db, table, p, &topic, rate, prefill).await,
            }
        }
        .await
        .map(|mut f| {
            if let (Some(ceiling), Value::Object(o)) = (p.ceiling_msg_s, &mut f.json) {
                // Steady points relay at the producer's rate: their ratio is
                // the relay's rate in the window.
                let rate = o
                    .get("relay_rate_in_window_msg_s")
                    .or_else(|| o.get("throughput_msg_s"))
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0);
                o.insert("broker_ceiling_msg_s".into(), json!(round(ceiling, 1)));
                o.insert(
                    "ratio_to_ceiling".into(),
                    json!(round(rate / ceiling.max(1e-9), 3)),
                );
            }
            f
        });
        if !p.keep_topic {
            p.target.cleanup(&topic).await;
        }
        result
    })
    .await
}

async fn backlog(
    db: &Db,
    table: &OutboxTable,
    p: &RelayParams,
    topic: &str,
    prefill: db::Prefilled,
) -> anyhow::Result<Finished> {
    let inner = p.target.connect_warm(topic, p.readme_defaults).await?;
    let progress = Progress::new(p.backlog);
    let confirms = Arc::new(Confirms {
        progress: progress.clone(),
        failed: Default::default(),
        log: None,
    });
    // Closed once the App stopped: App::run reads the outbox's source
    // identity through it, and an idle connection left in it would outlive
    // the point (the window waits for the workload's connections to go).
    let app_pool = db.lazy_pool();
    let app = app(
        db::broker(app_pool.clone(), table.clone()),
        p,
        topic,
        Timed::new(inner, confirms.clone()),
        false,
    );
    let handle = app.handle();
    let window = Window::open(db, table, 0).await?;
    let t0 = Instant::now();
    let start = t0.duration_since(progress.base).as_secs_f64();
    let mut run = tokio::spawn(app.run());
    let mut early = None;
    let waited = tokio::select! {
        w = progress.wait(timeout_for(p.backlog)) => w,
        r = &mut run => {
            early = Some(r);
            Err(anyhow::anyhow!("the relay App stopped before every row was confirmed"))
        }
    };
    let confirmed_s = t0.elapsed().as_secs_f64();
    handle.shutdown();
    let ran = match early {
        Some(r) => r,
        None => run.await,
    }
    .context("relay task")?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_end = window.cpu_now();
    app_pool.close().await;
    ran.context("the relay App failed")?;
    waited?;
    let mut extra = Map::new();
    extra.insert("slices".into(), json!(progress.slices(start)));
    extra.insert(
        "confirmed".into(),
        json!(progress.handled.load(Ordering::Relaxed)),
    );
    extra.insert(
        "publish_failures".into(),
        json!(confirms.failed.load(Ordering::Relaxed)),
    );
    extra.insert("confirmed_seconds".into(), json!(round(confirmed_s, 4)));
    extra.insert(
        "shutdown_ms".into(),
        json!(round((seconds - confirmed_s) * 1000.0, 1)),
    );
    extra.insert(
        "prefill_seconds".into(),
        json!(round(prefill.took.as_secs_f64(), 2)),
    );
    extra.insert("topic".into(), json!(topic));
    window
        .close(Measured {
            scenario: "relay",
            params: p.json(),
            messages: p.backlog,
            seconds,
            latency: Value::Null,
            extra,
            cpu_end,
            expect_rows: Some(0),
            wal: WalScope::Prefilled(prefill),
        })
        .await
}

async fn steady(
    db: &Db,
    table: &OutboxTable,
    p: &RelayParams,
    topic: &str,
    rate: u64,
    prefill: db::Prefilled,
) -> anyhow::Result<Finished> {
    if rate == 0 {
        bail!("--rate must be > 0");
    }
    let inner = p.target.connect_warm(topic, p.readme_defaults).await?;
    // Counted without a target: the scenario decides when to stop.
    let progress = Progress::new(u64::MAX);
    let confirms = Arc::new(Confirms {
        progress: progress.clone(),
        failed: Default::default(),
        log: Some(Mutex::new(Vec::new())),
    });
    let producer_pool = db.pool(2).await?;
    drop(producer_pool.acquire().await?);
    let app_pool = db.lazy_pool(); // closed once the App stopped (see `backlog`)
    let app = app(
        db::broker(app_pool.clone(), table.clone()),
        p,
        topic,
        Timed::new(inner, confirms.clone()),
        true,
    );
    let handle = app.handle();
    let mut window = Window::open(db, table, 1).await?;
    let t0 = Instant::now();
    let run = tokio::spawn(app.run());

    // The producer: every tick, one transaction with the rows due by then.
    let producer = {
        let broker = db::broker(producer_pool.clone(), table.clone());
        let body = Body::new(p.payload_bytes);
        let duration = p.duration;
        let tick = Duration::from_secs_f64((p.producer_batch as f64 / rate as f64).max(0.001));
        tokio::spawn(async move {
            let mut conn = broker.pool().acquire().await?;
            let mut published: u64 = 0;
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let start = Instant::now();
            loop {
                interval.tick().await;
                let el = start.elapsed();
                if el >= duration {
                    break;
                }
                let due = ((el.as_secs_f64() + tick.as_secs_f64()) * rate as f64) as u64;
                let n = due.saturating_sub(published);
                if n == 0 {
                    continue;
                }
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                broker
                    .publish_batch((0..n).map(|_| &body), QUEUE, &mut *tx)
                    .await?;
                tx.commit().await?;
                published += n;
            }
            anyhow::Ok((published, start.elapsed()))
        })
    };

    // Backlog samples (probe statements are not counted).
    let mut backlog = Vec::new();
    let mut sampler = tokio::time::interval(Duration::from_millis(500));
    let mut producer = producer;
    let (published, produce_time) = loop {
        tokio::select! {
            r = &mut producer => break r.context("producer task")??,
            _ = sampler.tick() => {
                let n = window.probe().count(table).await?;
                backlog.push((t0.elapsed().as_secs_f64(), n));
            }
        }
    };
    let relayed_in_window = progress.handled.load(Ordering::Relaxed);
    let window_s = t0.elapsed().as_secs_f64();
    let backlog_at_stop = window.probe().count(table).await?;
    // Catch up: wait until every published row is confirmed.
    let total = p.backlog + published;
    let deadline = Instant::now() + timeout_for(total);
    while progress.handled.load(Ordering::Relaxed) < total {
        if Instant::now() >= deadline {
            bail!(
                "the relay did not catch up: {} of {total} confirmed",
                progress.handled.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let caught_up_s = t0.elapsed().as_secs_f64() - window_s;
    handle.shutdown();
    let ran = run.await.context("relay task")?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_end = window.cpu_now();
    app_pool.close().await;
    producer_pool.close().await;
    ran.context("the relay App failed")?;

    let log = confirms
        .log
        .as_ref()
        .and_then(|l| l.lock().ok().map(|l| l.clone()))
        .unwrap_or_default();
    let mut lag: Vec<f64> = log.iter().filter_map(|c| c.lag_ms).collect();
    let mut publish_ms: Vec<f64> = log
        .iter()
        .map(|c| c.confirmed.duration_since(c.started).as_secs_f64() * 1000.0)
        .collect();
    let max_backlog = backlog.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let mut extra = Map::new();
    extra.insert("published".into(), json!(published));
    extra.insert(
        "produce_rate_msg_s".into(),
        json!(round(
            published as f64 / produce_time.as_secs_f64().max(1e-9),
            1
        )),
    );
    extra.insert(
        "relay_rate_in_window_msg_s".into(),
        json!(round(relayed_in_window as f64 / window_s.max(1e-9), 1)),
    );
    extra.insert("backlog_at_stop".into(), json!(backlog_at_stop));
    extra.insert("backlog_max".into(), json!(max_backlog));
    extra.insert(
        "backlog_samples".into(),
        json!(
            backlog
                .iter()
                .map(|(t, n)| json!([round(*t, 2), n]))
                .collect::<Vec<_>>()
        ),
    );
    extra.insert("catch_up_s".into(), json!(round(caught_up_s, 3)));
    extra.insert("publish_ms".into(), percentiles_ms(&mut publish_ms));
    extra.insert(
        "publish_failures".into(),
        json!(confirms.failed.load(Ordering::Relaxed)),
    );
    extra.insert("topic".into(), json!(topic));
    window
        .close(Measured {
            scenario: "relay-steady",
            params: p.json(),
            messages: total,
            seconds,
            // created_at (the producer's transaction start) -> Kafka ack.
            latency: percentiles_ms(&mut lag),
            extra,
            cpu_end,
            expect_rows: Some(0),
            // The steady producer is inside the window; a --backlog given
            // with --rate was prefilled before it (added to the total).
            wal: WalScope::ProducerInWindow((prefill.rows > 0).then_some(prefill)),
        })
        .await
}
