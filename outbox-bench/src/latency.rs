//! `latency`: single publishes spaced apart on an idle subscriber (default
//! fetch intervals, LISTEN on). Commit returned → handler start, and, with
//! `--kafka` or `--bus`, commit returned → the bus's confirmation (Kafka's
//! delivery report, RabbitMQ's publisher confirm, JetStream's ack, Redis's
//! reply).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outbox_core::{
    App, BoxError, ClaimMode, Engine, Message, OutboxBroker, OutboxTable, PublishOptions, Raw,
    Response, Route, Subscriber, SubscriberOptions,
};
use serde_json::{Map, Value, json};

use crate::buses::Target;
use crate::db::{self, Body, Db, QUEUE};
use crate::drain::Progress;
use crate::point::{Finished, Measured, WalScope, Window, percentiles_ms};
use crate::timed::{self, Confirms, Timed};

/// One latency point.
#[derive(Debug, Clone)]
pub(crate) struct LatencyParams {
    pub(crate) samples: u64,
    pub(crate) warmup: u64,
    pub(crate) interval: Duration,
    pub(crate) payload_bytes: usize,
    /// `Some(bus)`: relay each row to the bus and time its confirmation.
    pub(crate) relay: Option<Target>,
    pub(crate) listen: bool,
    /// An ordered subscriber (or route).
    pub(crate) ordered: bool,
    /// Publish each row with an ordering key, round robin over this many
    /// (`PublishOptions::key`: the key lock is taken); 0: no key.
    pub(crate) keys: u64,
    /// `SubscriberOptions::claim_mode`; `None`: the default (`Lease` for
    /// the bare subscriber, `Transaction` for the relay route).
    pub(crate) claim: Option<ClaimMode>,
}

type Stamps = Arc<Mutex<Vec<(i64, Instant)>>>;

fn stamp(stamps: &Stamps, id: i64) {
    let now = Instant::now();
    if let Ok(mut v) = stamps.lock() {
        v.push((id, now));
    }
}

pub(crate) async fn run(db: &Db, p: &LatencyParams) -> anyhow::Result<Finished> {
    db.with_fresh_table(async |table| {
        let topic = Target::fresh_destination("bench.lat");
        if let Some(t) = &p.relay {
            t.prepare(&topic).await?;
        }
        let result = measure(db, table, p, &topic).await;
        if let Some(t) = &p.relay {
            t.cleanup(&topic).await;
        }
        result
    })
    .await
}

/// The subscriber side: either a bare engine or a relay App.
enum Side {
    Engine(Engine),
    App(
        outbox_core::AppHandle,
        tokio::task::JoinHandle<outbox_core::Result<()>>,
    ),
}

async fn measure(
    db: &Db,
    table: &OutboxTable,
    p: &LatencyParams,
    topic: &str,
) -> anyhow::Result<Finished> {
    let total = p.warmup + p.samples;
    let progress = Progress::new(total);
    let handled: Stamps = Arc::new(Mutex::new(Vec::with_capacity(
        usize::try_from(total).unwrap_or(0),
    )));
    // Closed once the subscriber side stopped: App::run reads the outbox's
    // source identity through it (see relay.rs).
    let sub_pool = db.lazy_pool();
    let sub_broker = db::broker(sub_pool.clone(), table.clone());
    let confirms = Arc::new(Confirms {
        progress: progress.clone(),
        failed: Default::default(),
        log: Some(Mutex::new(Vec::new())),
    });
    let pool = db.pool(1).await?;
    drop(pool.acquire().await?);
    let producer = OutboxBroker::new(pool.clone(), table.clone());
    let body = Body::new(p.payload_bytes);

    // Default subscriber options on purpose (1 worker, fetch_batch_size 10,
    // fetch intervals 1 s / 10 s): the idle subscriber is woken by NOTIFY.
    let (side, bus_inner) = match &p.relay {
        None => {
            let (h, pr) = (handled.clone(), progress.clone());
            let mut b = Subscriber::builder([QUEUE]).ordered(p.ordered);
            if let Some(mode) = p.claim {
                b = b.claim_mode(mode);
            }
            let sub = b.build(move |m: Message| {
                stamp(&h, m.id());
                pr.hit();
                std::future::ready(())
            })?;
            let mut engine = Engine::new(sub_broker.clone())
                .gauge_interval(None)
                .application_name("outbox-bench")
                .subscriber(sub);
            if !p.listen {
                engine = engine.without_listen();
            }
            (Some(engine), None)
        }
        Some(t) => (None, Some(t.connect_warm(topic, false).await?)),
    };

    let window = Window::open(db, table, 1).await?;
    let side = match (side, bus_inner) {
        (Some(engine), _) => {
            engine.start().await.context("starting the engine")?;
            Side::Engine(engine)
        }
        (None, Some(inner)) => {
            let h = handled.clone();
            let bus = p.relay.as_ref().map_or("kafka", Target::name);
            let mut route = Route::builder([QUEUE]).ordered(p.ordered);
            if let Some(mode) = p.claim {
                route = route.claim_mode(mode);
            }
            let route = route
                .publish_to(bus, topic)
                .handler(move |m: Message, _ctx| {
                    stamp(&h, m.id());
                    async move { Ok::<_, BoxError>(Response::new(Raw(m.payload().to_vec()))) }
                });
            let listen = p.listen;
            let app = App::new(sub_broker)
                .without_discovery()
                .without_signals()
                .subscriber(route)
                .transport(Timed::new(inner, confirms.clone()))
                .configure_engine(move |e| {
                    let e = e.gauge_interval(None).application_name("outbox-bench");
                    if listen { e } else { e.without_listen() }
                });
            let handle = app.handle();
            let run = tokio::spawn(app.run());
            Side::App(handle, run)
        }
        (None, None) => anyhow::bail!("no subscriber side"),
    };
    // Let the subscriber connect and LISTEN, and go idle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t0 = Instant::now();
    // (row id, BEGIN sent, COMMIT sent, COMMIT returned)
    let mut commits: Vec<(i64, Instant, Instant, Instant)> =
        Vec::with_capacity(usize::try_from(total)?);
    let mut conn = pool.acquire().await?;
    let mut tick = tokio::time::interval(p.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..total {
        tick.tick().await;
        let opts = if p.keys > 0 {
            PublishOptions::new().key(db::key_of(i, p.keys))
        } else {
            PublishOptions::new()
        };
        let begin = Instant::now();
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let id = producer
            .publish_with(&body, QUEUE, &opts, &mut *tx)
            .await?
            .context("publish_with returned no row id")?;
        let commit_sent = Instant::now();
        tx.commit().await?;
        commits.push((id, begin, commit_sent, Instant::now()));
    }
    drop(conn);
    let waited = progress.wait(Duration::from_secs(60)).await;
    let seconds = t0.elapsed().as_secs_f64();
    match side {
        Side::Engine(e) => {
            e.stop().await;
        }
        Side::App(h, run) => {
            h.shutdown();
            run.await
                .context("relay task")?
                .context("the relay App failed")?;
        }
    }
    let cpu_end = window.cpu_now();
    pool.close().await;
    sub_pool.close().await;
    waited?;

    let handled: HashMap<i64, Instant> = handled
        .lock()
        .map(|v| v.iter().copied().collect())
        .unwrap_or_default();
    let confirmed = confirms
        .log
        .as_ref()
        .and_then(|l| l.lock().ok().map(|l| timed::by_id(&l)))
        .unwrap_or_default();
    let ms = |a: Instant, b: Instant| {
        if b >= a {
            b.duration_since(a).as_secs_f64() * 1000.0
        } else {
            -(a.duration_since(b).as_secs_f64() * 1000.0)
        }
    };
    let measured = &commits[usize::try_from(p.warmup)?..];
    let mut to_handler = Vec::new();
    let mut to_ack = Vec::new();
    let mut publish_ms = Vec::new();
    let mut txn_ms = Vec::new();
    let mut commit_ms = Vec::new();
    let mut sent_to_handler = Vec::new();
    for (id, begin, sent, committed) in measured {
        txn_ms.push(ms(*begin, *committed));
        commit_ms.push(ms(*sent, *committed));
        if let Some(h) = handled.get(id) {
            to_handler.push(ms(*committed, *h));
            sent_to_handler.push(ms(*sent, *h));
        }
        if let Some(c) = confirmed.get(id) {
            to_ack.push(ms(*committed, c.confirmed));
            publish_ms.push(ms(c.started, c.confirmed));
        }
    }
    let mut extra = Map::new();
    extra.insert(
        "commit_to_handler_ms".into(),
        percentiles_ms(&mut to_handler.clone()),
    );
    extra.insert(
        "commit_sent_to_handler_ms".into(),
        percentiles_ms(&mut sent_to_handler),
    );
    extra.insert("publish_txn_ms".into(), percentiles_ms(&mut txn_ms));
    extra.insert(
        "commit_round_trip_ms".into(),
        percentiles_ms(&mut commit_ms),
    );
    let bus = p.relay.as_ref().map(Target::name);
    let latency = if let Some(bus) = bus {
        extra.insert(format!("{bus}_publish_ms"), percentiles_ms(&mut publish_ms));
        percentiles_ms(&mut to_ack)
    } else {
        percentiles_ms(&mut to_handler)
    };
    // The options as the engine sees them (a relay route gets the relay
    // defaults for what it does not set).
    let mut effective = SubscriberOptions::default().relay_defaults(p.relay.is_some());
    if let Some(mode) = p.claim {
        effective = effective.claim_mode(mode);
    }
    window
        .close(Measured {
            scenario: match bus {
                None => "latency",
                Some("kafka") => "latency-kafka",
                Some(_) => "latency-bus",
            },
            params: {
                let mut params = p.relay.as_ref().map(|t| t.json(false)).unwrap_or_default();
                params.extend(
                    json!({
                    "samples": p.samples,
                    "warmup": p.warmup,
                    "interval_ms": p.interval.as_secs_f64() * 1000.0,
                    "listen": p.listen,
                    "payload_bytes": p.payload_bytes,
                    "ordered": p.ordered,
                    "keys": p.keys,
                    "subscriber": "defaults (1 worker, fetch_batch_size 10, fetch 1 s / 10 s)",
                    "claim_mode": crate::drain::claim_mode_name(effective.get_claim_mode()),
                    "claim_mode_set": p.claim.is_some(),
                    "max_hold_ms": effective.get_max_hold().as_secs_f64() * 1000.0,
                    })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                );
                params.into()
            },
            messages: total,
            seconds,
            latency,
            extra,
            cpu_end,
            expect_rows: Some(0),
            wal: WalScope::ProducerInWindow(None),
        })
        .await
        .map(|mut f| {
            if let Value::Object(o) = &mut f.json {
                o.insert(
                    "latency_what".into(),
                    json!(match bus {
                        None => "COMMIT returned -> handler start".to_owned(),
                        Some(b) => format!("COMMIT returned -> {b} confirmed the publish"),
                    }),
                );
            }
            f
        })
}
