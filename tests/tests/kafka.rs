//! `outbox-kafka` end to end against a real Kafka-protocol broker over TCP
//! (`KAFKA_BOOTSTRAP`; scripts/test.sh starts Tansu) and real PostgreSQL.
//!
//! Topics are per test and pre-created; records are read back with
//! `assign()` on every partition. The broker outage tests live in
//! `kafka_outage.rs` (they pause the shared broker; a file lock keeps them
//! apart from these tests).

#![allow(clippy::unwrap_used)]

use tests::kafka as support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use outbox_core::{App, BoxError, Message, PublishOptions, Response, Route};
use support::{TopicReader, bootstrap, broker_lock, create_topic, has_all_ids};
use tests::crash::{self, Arrivals, Arrived, RelayChild};
use tests::{TestDb, wait_until};

type R = anyhow::Result<()>;

fn fast(b: outbox_core::RouteBuilder) -> outbox_core::RouteBuilder {
    b.min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
}

/// Committed rows reach the topic exactly once each, with their keys and
/// every header; rolled-back transactions leave nothing; the table empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_committed_rows_with_keys_and_headers_and_nothing_else() -> R {
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let topic = support::unique_topic("orders");
    create_topic(&boot, &topic, 4).await?;

    // value -> (row id, correlation id)
    let mut expected: BTreeMap<i64, (i64, String)> = BTreeMap::new();
    let publish = |v: i64, commit: bool| {
        let db = &db;
        async move {
            let mut tx = db.pool.begin().await?;
            let corr = format!("corr-{v}");
            let id = db
                .broker
                .publish_with(
                    &v,
                    "orders",
                    &PublishOptions::new()
                        .header("x-propagated", format!("p{v}"))
                        .correlation_id(corr.clone()),
                    &mut *tx,
                )
                .await?
                .unwrap();
            if commit {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            anyhow::Ok((id, corr))
        }
    };
    // Rows committed before the app starts.
    const N: i64 = 60;
    for v in 0..N / 2 {
        expected.insert(v, publish(v, true).await?);
        if v % 3 == 0 {
            publish(1_000 + v, false).await?;
        }
    }

    let route = fast(Route::builder(["orders"]))
        .max_workers(4)
        .propagate_headers(true)
        .publish_to("kafka", topic.clone())
        .handler(|msg: Message, _ctx| async move {
            let v: i64 = msg.decode()?;
            let mut resp = Response::new(v).header("x-explicit", format!("e{v}"));
            if v % 2 == 0 {
                resp = resp.key(format!("k{v}"));
            }
            Ok::<_, BoxError>(resp)
        });
    let app = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .subscriber(route)
        .on_startup(support::test_kafka(&boot).connect());
    let stop = app.handle();
    let run = tokio::spawn(app.run());

    // Rows committed while the relay runs, rolled-back ones interleaved.
    for v in N / 2..N {
        if v % 4 == 0 {
            publish(2_000 + v, false).await?;
        }
        expected.insert(v, publish(v, true).await?);
    }

    let ids: BTreeSet<i64> = expected.values().map(|(id, _)| *id).collect();
    let mut reader = TopicReader::new(&boot, &topic).await?;
    assert!(
        reader
            .read_until(Duration::from_secs(60), has_all_ids(&ids))
            .await?,
        "only {} of {N} records arrived",
        reader.records.len()
    );
    assert!(
        db.drained(Duration::from_secs(10)).await,
        "rows left in the table: {}",
        db.count().await?
    );
    // Nothing more comes: no duplicates, nothing from rolled-back transactions.
    let extra = reader.read_for(Duration::from_secs(2)).await?;
    assert_eq!(extra, 0, "unexpected extra records");
    assert_eq!(reader.records.len(), expected.len());

    for rec in &reader.records {
        let v = rec.value();
        let (id, corr) = expected
            .get(&v)
            .unwrap_or_else(|| panic!("unexpected value {v} (rolled back?) in {rec:?}"));
        let want_key = (v % 2 == 0).then(|| format!("k{v}").into_bytes());
        assert_eq!(rec.key, want_key, "key of {v}");
        let want: BTreeMap<String, String> = [
            ("content-type", "application/json".to_owned()),
            ("correlation_id", corr.clone()),
            ("outbox-id", id.to_string()),
            ("x-explicit", format!("e{v}")),
            ("x-propagated", format!("p{v}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(rec.headers, want, "headers of {v}");
    }
    assert_eq!(db.dlq_count().await?, 0);

    stop.shutdown();
    run.await??;
    println!(
        "relayed {} rows in {:?}",
        reader.records.len(),
        t0.elapsed()
    );
    Ok(())
}

/// An unreachable cluster makes `App::run` fail at startup, naming the
/// bootstrap address; no row is touched.
#[tokio::test]
async fn an_unreachable_cluster_fails_startup_with_a_clear_error() -> R {
    let db = TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    db.broker.publish(&1_i64, "orders", &mut *tx).await?;
    tx.commit().await?;

    let kafka = outbox_kafka::KafkaBroker::new("127.0.0.1:1")
        .connect_timeout(Duration::from_secs(2))
        .set("reconnect.backoff.max.ms", "200");
    let route = fast(Route::builder(["orders"]))
        .publish_to("kafka", "orders.kafka")
        .handler(|msg: Message, _ctx| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let t0 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        App::new(db.broker.clone())
            .without_discovery()
            .without_signals()
            .subscriber(route)
            .on_startup(kafka.connect())
            .run(),
    )
    .await?;
    let err = res.expect_err("startup must fail").to_string();
    println!("startup failed after {:?}: {err}", t0.elapsed());
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.contains("cannot reach the Kafka cluster"), "{err}");
    assert!(err.contains("kafka.connect"), "names the hook: {err}");
    // Nothing consumed: the row is untouched.
    assert_eq!(db.count().await?, 1);
    let attempts = db
        .scalar(format!(
            "SELECT attempts_count::bigint + deliveries_count::bigint FROM {}",
            db.t()
        ))
        .await?;
    assert_eq!(attempts, 0);
    Ok(())
}

/// The same through the embedding API: a typed error.
#[tokio::test]
async fn connect_transport_reports_unreachable_as_retryable() -> R {
    let err = outbox_kafka::KafkaBroker::new("127.0.0.1:1")
        .connect_timeout(Duration::from_secs(1))
        .connect_transport()
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(err, outbox_kafka::Error::Unreachable { .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    Ok(())
}

/// `ensure_topic` creates a missing topic with the requested partitions,
/// leaves an existing one alone, and refuses bad input before sending
/// anything.
#[tokio::test]
async fn ensure_topic_creates_a_missing_topic_once_and_checks_its_input() -> R {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let kafka = outbox_kafka::KafkaBroker::new(boot.clone());
    let topic = support::unique_topic("ensure");
    let partitions = |topic: String| {
        let boot = boot.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &boot)
                .create()?;
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            Ok(md.topics().first().map_or(0, |t| t.partitions().len()))
        })
    };

    assert!(kafka.ensure_topic(&topic, 3, 1).await?, "created");
    assert_eq!(partitions(topic.clone()).await??, 3);
    assert!(!kafka.ensure_topic(&topic, 3, 1).await?, "already there");
    assert!(!kafka.ensure_topic(&topic, 5, 1).await?, "left as it is");
    assert_eq!(partitions(topic.clone()).await??, 3);

    for (name, parts, expected) in [
        ("orders kafka", 1, "contains ' '"),
        ("", 1, "empty"),
        ("orders.kafka", 0, "partitions (0)"),
    ] {
        let err = kafka
            .ensure_topic(name, parts, 1)
            .await
            .expect_err("invalid input");
        let text = err.to_string();
        assert!(
            matches!(&err, outbox_kafka::Error::CreateTopic { source: None, .. }),
            "{err:?}"
        );
        assert!(text.contains(expected), "{text}");
        assert!(text.contains(&boot), "names the cluster: {text}");
        assert!(!err.is_retryable(), "{text}");
    }

    let t0 = Instant::now();
    let err = outbox_kafka::KafkaBroker::new("127.0.0.1:1")
        .connect_timeout(Duration::from_secs(1))
        .ensure_topic("orders.kafka", 1, 1)
        .await
        .expect_err("nothing listens on port 1");
    println!("unreachable after {:?}: {err}", t0.elapsed());
    assert!(
        matches!(err, outbox_kafka::Error::CreateTopic { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.topic(), Some("orders.kafka"));
    assert!(err.rdkafka_error_code().is_some(), "{err:?}");
    Ok(())
}

/// The lease warning names what the lease must cover (buffer wait, handler,
/// publish) and fires only when a publish can outlast the lease: a sane
/// short lease (10 s with a 5 s `message.timeout.ms`, so at most 6 s per
/// publish) starts without it (nor any other lease warning), a 5 s lease
/// with the default 30 s timeout gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_warning_fires_only_when_a_publish_can_outlast_the_lease() -> R {
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let db = TestDb::new().await?;
    let topic = support::unique_topic("lease");
    let secs = Duration::from_secs;
    for (queue, lease, timeout, warned) in [
        ("lease_sane", secs(10), secs(5), false),
        ("lease_short", secs(5), secs(30), true),
    ] {
        // Default poll intervals: the 10 s lease equals max_fetch_interval,
        // which used to warn as well.
        // Heartbeat off: with it, the lease is extended while a publish
        // waits and nothing is warned about (tests/app.rs).
        let route = Route::builder([queue])
            .lease_ttl(lease)
            .lease_heartbeat(None)
            .publish_to("kafka", topic.clone())
            .handler(|msg: Message, _ctx| async move {
                Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
            });
        let app = App::new(db.broker.clone())
            .without_discovery()
            .without_signals()
            .subscriber(route)
            .on_startup(
                support::test_kafka(&boot)
                    .message_timeout(timeout)
                    .connect(),
            );
        let stop = app.handle();
        let run = tokio::spawn(app.run());
        let of_queue =
            |c: &tests::Captured| c.fields.get("subscriber").map(String::as_str) == Some(queue);
        // Logged once the route passed its checks (the lease one included).
        let routed = wait_until(Duration::from_secs(30), || async {
            !tests::captured(|c| of_queue(c) && c.message == "outbox route").is_empty()
        })
        .await;
        stop.shutdown();
        run.await??;
        assert!(routed, "the app did not get to its routes");
        let warnings: Vec<String> = tests::captured(|c| {
            c.level == tracing::Level::WARN && of_queue(c) && c.message.contains("lease")
        })
        .into_iter()
        .map(|c| c.message)
        .collect();
        if !warned {
            assert_eq!(
                warnings,
                Vec::<String>::new(),
                "{queue}: {lease:?} lease, {timeout:?} timeout"
            );
            continue;
        }
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        let w = &warnings[0];
        println!("{w}");
        for part in [
            "lease_ttl (5s)",
            "31s",
            "transport `kafka`",
            "claimed",
            "buffer",
            "handler",
            "another relay may claim the row and publish it again",
        ] {
            assert!(w.contains(part), "{part:?} in {w}");
        }
    }
    Ok(())
}

/// The embedding API: publishes run concurrently (100 records with a 50 ms
/// linger would take 5 s one after the other), each resolves on its own
/// delivery report, and `close` flushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_publishes_concurrently_and_flushes_on_close() -> R {
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let topic = support::unique_topic("direct");
    create_topic(&boot, &topic, 4).await?;
    let kafka = support::test_kafka(&boot)
        .linger(Duration::from_millis(50))
        .connect_transport()
        .await?;
    assert_eq!(outbox_core::Transport::name(&kafka), "kafka");
    // Warm up: the idempotent producer's id takes ~0.5 s.
    kafka
        .send(outbox_core::Outgoing::new(topic.clone(), b"-1".to_vec()))
        .await?;

    let t0 = Instant::now();
    let sends = (0..100_i64).map(|v| {
        let mut out = outbox_core::Outgoing::new(topic.clone(), v.to_string().into_bytes());
        out.headers
            .insert("outbox-id".into(), (1_000 + v).to_string());
        outbox_core::Transport::publish(&kafka, out)
    });
    for r in futures_util::future::join_all(sends).await {
        r.map_err(|e| anyhow::anyhow!(e))?;
    }
    let took = t0.elapsed();
    // Concurrent: about one linger. The bound leaves a loaded CI machine room
    // and is still well below 5 s of serialized publishes.
    assert!(
        took < Duration::from_secs(3),
        "100 publishes took {took:?}: are they serialized?"
    );
    outbox_core::Transport::close(&kafka)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(kafka.in_flight_count(), 0);

    let ids: BTreeSet<i64> = (1_000..1_100).collect();
    let mut reader = TopicReader::new(&boot, &topic).await?;
    let got_all = reader
        .read_until(Duration::from_secs(30), |recs| {
            let seen: BTreeSet<i64> = recs
                .iter()
                .filter(|r| r.headers.contains_key("outbox-id"))
                .map(|r| r.outbox_id())
                .collect();
            ids.is_subset(&seen)
        })
        .await?;
    assert!(got_all, "records missing");
    println!("100 concurrent publishes confirmed in {took:?}");
    Ok(())
}

/// A relay process killed with SIGKILL mid-stream, then restarted: every row
/// arrives; duplicates only for rows that were in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_loses_nothing() -> R {
    let boot = bootstrap();
    let _lock = broker_lock(false).await?;
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let topic = support::unique_topic("crash");
    create_topic(&boot, &topic, 4).await?;

    const N: i64 = 400;
    let ids = crash::publish_rows(&db, N).await?;
    let killed = crash::kill_and_restart(&db, N - 80, |_run| {
        RelayChild::spawn(
            RelayChild::command(env!("CARGO_BIN_EXE_kafka_relay"), &db)
                .env("RELAY_TOPIC", &topic)
                .env("KAFKA_BOOTSTRAP", &boot),
        )
    })
    .await?;

    let mut reader = TopicReader::new(&boot, &topic).await?;
    assert!(
        reader
            .read_until(Duration::from_secs(30), has_all_ids(&ids))
            .await?,
        "missing ids after the restart"
    );
    reader.read_for(Duration::from_secs(1)).await?;
    let arrivals = Arrivals::tally(
        &ids,
        reader.records.iter().map(|r| Arrived {
            id: r.outbox_id(),
            value: r.value(),
            key: r.key.clone(),
        }),
    );
    arrivals.assert_duplicates_within(&killed);
    println!(
        "{} records for {N} rows ({} duplicates) in {:?}",
        reader.records.len(),
        arrivals.duplicates(),
        t0.elapsed()
    );
    Ok(())
}
