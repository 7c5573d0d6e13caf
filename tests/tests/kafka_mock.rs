//! `outbox-kafka` against librdkafka's in-process `MockCluster`, for faults a
//! real broker cannot easily produce: every broker down for longer than
//! `message.timeout.ms`, and injected Produce errors. Real PostgreSQL.
//!
//! `MockCluster` is `!Send`: it stays in the test's own task (the test body
//! is not spawned), the `App` runs in a spawned task.

#![allow(clippy::unwrap_used)]

use tests::kafka as support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::{Relay, publish, read_back, retries_of, test_kafka};
use tests::{TestDb, wait_until};

type R = anyhow::Result<()>;

/// All brokers down for longer than `message.timeout.ms`: publishes fail
/// with a delivery timeout, rows are nacked and retried by the subscriber's
/// strategy (every 200 ms), and everything is delivered once the brokers are
/// back. Nothing lost, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_down_longer_than_the_message_timeout_are_ridden_out_by_retries() -> R {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let mock = MockCluster::new(1)?;
    let bootstrap = mock.bootstrap_servers();
    let topic = "mock.down";
    mock.create_topic(topic, 4, 1)?;
    let queue = "mock_down";

    let kafka = test_kafka(&bootstrap)
        .message_timeout(Duration::from_secs(1))
        .set("reconnect.backoff.max.ms", "200");
    let relay = Relay::start(&db, queue, topic, kafka);
    let mut ids: BTreeSet<i64> = publish(&db, queue, 0..10).await?.into_iter().collect();
    assert!(
        db.drained(Duration::from_secs(20)).await,
        "first rows not relayed"
    );

    mock.broker_down(-1)?;
    let down_at = Instant::now();
    ids.extend(publish(&db, queue, 10..18).await?);
    // Wait for rows to be nacked more than once: each attempt times out
    // after 1 s, then waits 200 ms.
    let retried = wait_until(Duration::from_secs(15), || async {
        db.scalar(format!(
            "SELECT coalesce(max(attempts_count), 0)::bigint FROM {}",
            db.t()
        ))
        .await
        .unwrap()
            >= 2
    })
    .await;
    assert!(
        retried,
        "rows were not nacked and retried while the brokers were down"
    );
    // The outage under test lasts at least 3 s.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down_at.elapsed())).await;
    let max_attempts = db
        .scalar(format!(
            "SELECT coalesce(max(attempts_count), 0)::bigint FROM {}",
            db.t()
        ))
        .await?;
    assert!(
        db.count().await? > 0,
        "rows were deleted while every broker was down"
    );
    mock.broker_up(-1)?;
    let outage = down_at.elapsed();

    assert!(
        db.drained(Duration::from_secs(30)).await,
        "rows left after the brokers came back"
    );
    assert_eq!(db.dlq_count().await?, 0);
    let warnings = retries_of(queue);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("did not confirm the record for topic \"mock.down\" within")),
        "the nack carries the transport's delivery timeout: {warnings:#?}"
    );
    let per_id = read_back(&bootstrap, topic, &ids).await?;
    let dups: usize = per_id.values().map(|n| n - 1).sum();
    relay.stop().await?;
    println!(
        "outage {outage:?}: {} nacks, max attempts {max_attempts}, {dups} duplicates, {:?} total",
        warnings.len(),
        t0.elapsed()
    );
    Ok(())
}

/// Produce requests answered with retriable errors are retried by the
/// producer itself: every row is delivered once. The only nack allowed is
/// for a record librdkafka reported without an offset (see
/// `a_record_confirmed_without_an_offset_is_not_counted_as_delivered`): the
/// mock does not check sequence numbers, so when a later batch of the
/// partition succeeds while a failed one is retried, it never has the
/// failed batch's records. Counting those as delivered lost 1 to 4 rows in
/// about one run in 25 on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_by_the_producer() -> R {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let mock = MockCluster::new(1)?;
    let bootstrap = mock.bootstrap_servers();
    let topic = "mock.retriable";
    mock.create_topic(topic, 4, 1)?;
    let queue = "mock_retriable";

    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    let kafka = test_kafka(&bootstrap).set("reconnect.backoff.max.ms", "200");
    let relay = Relay::start(&db, queue, topic, kafka);
    let ids: BTreeSet<i64> = publish(&db, queue, 0..40).await?.into_iter().collect();
    assert!(db.drained(Duration::from_secs(30)).await, "rows left");
    assert_eq!(db.dlq_count().await?, 0);
    let per_id = read_back(&bootstrap, topic, &ids).await?;
    assert!(
        per_id.values().all(|n| *n == 1),
        "the idempotent producer's retries must not duplicate: {per_id:?}"
    );
    let retries = retries_of(queue);
    assert!(
        retries.iter().all(|r| r.contains("without an offset")),
        "no row was nacked for another reason: {retries:#?}"
    );
    relay.stop().await?;
    println!("40 rows through 6 injected errors in {:?}", t0.elapsed());
    Ok(())
}

/// librdkafka "implicitly acks" a record whose request failed once a later
/// batch of the same partition succeeds: right on brokers that check the
/// idempotent producer's sequence numbers, wrong on those that do not
/// (librdkafka's mock cluster, which then never has the record). The
/// transport does not count such a report as a confirmation: the publish
/// fails with `Error::Unconfirmed` (retryable), so the row is published
/// again instead of being deleted for a record the topic never got.
///
/// Set-up: every answer takes 300 ms, the first Produce request fails with
/// NOT_LEADER_FOR_PARTITION, and a second record of the same key (so the
/// same partition) is sent while the first request is still in flight.
#[tokio::test]
async fn a_record_confirmed_without_an_offset_is_not_counted_as_delivered() -> R {
    let mock = MockCluster::new(1)?;
    let bootstrap = mock.bootstrap_servers();
    let topic = "mock.implicit";
    mock.create_topic(topic, 1, 1)?;
    let kafka = test_kafka(&bootstrap).connect_transport().await?;
    let record = |v: &str| {
        let mut m = outbox_core::Outgoing::new(topic, v.as_bytes().to_vec());
        m.key = Some(b"k".to_vec());
        m
    };
    // The producer id is acquired before any fault.
    kafka.send(record("warm-up")).await?;

    mock.broker_round_trip_time(1, Duration::from_millis(300))?;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION],
    );
    let first = {
        let k = kafka.clone();
        let r = record("first");
        tokio::spawn(async move { k.send(r).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = kafka.send(record("second")).await;
    let first = first.await?;
    mock.broker_round_trip_time(1, Duration::ZERO)?;

    assert!(second.is_ok(), "{second:?}");
    let err = first.expect_err("a report without an offset is not a confirmation");
    assert!(
        matches!(&err, outbox_kafka::Error::Unconfirmed { topic: t, partition: 0 } if t == topic),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("without an offset"), "{err}");

    // Why it matters: the mock never wrote the first record.
    let mut reader = support::TopicReader::new(&bootstrap, topic).await?;
    reader
        .read_until(Duration::from_secs(10), |r| r.len() >= 2)
        .await?;
    reader.read_for(Duration::from_millis(500)).await?;
    let values: Vec<String> = reader
        .records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(values, ["warm-up", "second"]);
    outbox_core::Transport::close(&kafka).await.unwrap();
    Ok(())
}

/// With `acks=0` no delivery report has an offset (the producer waits for
/// no answer), so such a report is the confirmation, not `Unconfirmed`.
#[tokio::test]
async fn with_acks_0_a_report_without_an_offset_is_not_unconfirmed() -> R {
    let mock = MockCluster::new(1)?;
    let topic = "mock.acks0";
    mock.create_topic(topic, 1, 1)?;
    let kafka = test_kafka(&mock.bootstrap_servers())
        .acks(outbox_kafka::Acks::None)
        .idempotence(false)
        .connect_transport()
        .await?;
    kafka
        .send(outbox_core::Outgoing::new(topic, b"1".to_vec()))
        .await?;
    outbox_core::Transport::close(&kafka).await.unwrap();
    Ok(())
}

/// Produce requests refused with a permanent error fail the publish: the
/// row is nacked with the Kafka error and retried by the subscriber's
/// strategy, then delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_produce_errors_nack_the_row_and_the_strategy_retries_it() -> R {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let mock = MockCluster::new(1)?;
    let bootstrap = mock.bootstrap_servers();
    let topic = "mock.permanent";
    mock.create_topic(topic, 1, 1)?;
    let queue = "mock_permanent";

    let kafka = test_kafka(&bootstrap).set("reconnect.backoff.max.ms", "200");
    let relay = Relay::start(&db, queue, topic, kafka);
    // Warm up (producer id, metadata) before injecting.
    let mut ids: BTreeSet<i64> = publish(&db, queue, 0..1).await?.into_iter().collect();
    assert!(db.drained(Duration::from_secs(20)).await);
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ],
    );
    ids.extend(publish(&db, queue, 1..6).await?);
    assert!(db.drained(Duration::from_secs(30)).await, "rows left");
    assert_eq!(db.dlq_count().await?, 0);
    let warnings = retries_of(queue);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Kafka refused the record for topic \"mock.permanent\"")),
        "the nack carries the broker's refusal: {warnings:#?}"
    );
    read_back(&bootstrap, topic, &ids).await?;
    relay.stop().await?;
    println!(
        "{} nacks for 2 refused produce requests, {:?}",
        warnings.len(),
        t0.elapsed()
    );
    Ok(())
}

/// A fatal producer error (`enable.gapless.guarantee` + an out-of-order
/// sequence) or a fenced producer id make the producer unusable; the
/// transport replaces it, the rows are retried and delivered.
async fn an_unusable_producer_is_replaced(
    queue: &str,
    extra: &[(&str, &str)],
    error: RDKafkaRespErr,
) -> R {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let mock = MockCluster::new(1)?;
    let bootstrap = mock.bootstrap_servers();
    let topic = format!("mock.{queue}");
    mock.create_topic(&topic, 1, 1)?;

    let mut kafka = test_kafka(&bootstrap).set("reconnect.backoff.max.ms", "200");
    for (k, v) in extra {
        kafka = kafka.set(*k, *v);
    }
    let relay = Relay::start(&db, queue, &topic, kafka);
    // Warm up (producer id, metadata) before injecting.
    let mut ids: BTreeSet<i64> = publish(&db, queue, 0..1).await?.into_iter().collect();
    assert!(db.drained(Duration::from_secs(20)).await);
    mock.request_errors(RDKafkaApiKey::Produce, &[error]);
    ids.extend(publish(&db, queue, 1..6).await?);
    assert!(db.drained(Duration::from_secs(30)).await, "rows left");
    assert_eq!(db.dlq_count().await?, 0);
    let warnings = retries_of(queue);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("became unusable") && w.contains("replaced by a new producer")),
        "the nack says the producer was replaced: {warnings:#?}"
    );
    read_back(&bootstrap, &topic, &ids).await?;
    relay.stop().await?;
    println!("{queue}: {} nacks, {:?}", warnings.len(), t0.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_replaces_the_producer() -> R {
    an_unusable_producer_is_replaced(
        "fatal",
        &[("enable.gapless.guarantee", "true")],
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_is_replaced() -> R {
    an_unusable_producer_is_replaced(
        "fenced",
        &[],
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
    )
    .await
}

/// A record for a topic that does not exist (and is not auto-created) fails
/// after `topic.metadata.propagation.max.ms` with a retryable error: the row
/// waits in the outbox until someone creates the topic (or the retry budget
/// ends). Through the embedding API, with the typed error.
#[tokio::test]
async fn a_missing_topic_fails_the_publish_with_a_retryable_error() -> R {
    let mock = MockCluster::new(1)?;
    let kafka = test_kafka(&mock.bootstrap_servers())
        .set("allow.auto.create.topics", "false")
        .set("topic.metadata.propagation.max.ms", "1000")
        .connect_transport()
        .await?;
    let t0 = Instant::now();
    let err = kafka
        .send(outbox_core::Outgoing::new("no.such.topic", b"1".to_vec()))
        .await
        .expect_err("the topic does not exist");
    assert!(
        matches!(&err, outbox_kafka::Error::Delivery { topic, .. } if topic == "no.such.topic"),
        "{err:?}"
    );
    assert_eq!(
        err.rdkafka_error_code(),
        Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("no.such.topic"), "{err}");
    outbox_core::Transport::close(&kafka).await.unwrap();
    println!("refused after {:?}: {err}", t0.elapsed());
    Ok(())
}

/// The Kafka transport refuses topic names Kafka would refuse, so a typo in
/// `#[publish_to(kafka, "...")]` fails `App::run` instead of every publish.
#[tokio::test]
async fn the_kafka_transport_checks_topic_names_at_startup() -> R {
    use outbox_core::{App, BoxError, Message, Response, Route, Transport};
    let mock = MockCluster::new(1)?;
    let kafka = test_kafka(&mock.bootstrap_servers())
        .connect_transport()
        .await?;
    assert_eq!(kafka.check_destination("orders.kafka"), Ok(()));
    let err = kafka.check_destination("orders kafka").unwrap_err();
    assert!(err.contains("' '"), "{err}");
    assert!(kafka.check_destination("").is_err());

    let db = TestDb::new().await?;
    let route = Route::builder(["orders"])
        .publish_to("kafka", "orders/kafka")
        .handler(|msg: Message, _ctx| async move {
            Ok::<_, BoxError>(Response::new(msg.decode::<i64>()?))
        });
    let err = App::new(db.broker.clone())
        .without_discovery()
        .without_signals()
        .transport(kafka)
        .subscriber(route)
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("orders/kafka") && err.contains("'/'"), "{err}");
    Ok(())
}
