//! The exactly-once lane's error paths (`outbox-kafka`'s `Lane::commit`)
//! against librdkafka's in-process `MockCluster`, with errors injected on
//! EndTxn (the commit). MockCluster implements the transactional requests
//! and checks epochs, but neither fences nor hides aborted records
//! (docs/exactly-once.md): only the classification of errors is tested
//! here (lane kept or lost), visibility and fencing are on noida-db
//! (tests/exactly_once.rs). No PostgreSQL.

#![allow(clippy::unwrap_used)]

use outbox_core::Outgoing;
use outbox_core::transport::{LaneId, LotOutcome, Opened, Transport as _};
use outbox_kafka::KafkaBroker;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

type R = anyhow::Result<()>;

/// A MockCluster with the data topic and the progress topic (2 partitions
/// each), a transactional transport on it, and its lane `lane` of 2 opened.
async fn open_lane(
    lane: u32,
) -> anyhow::Result<(
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    outbox_kafka::KafkaTransport,
    Opened,
)> {
    let mock = MockCluster::new(1)?;
    let bootstrap = mock.bootstrap_servers();
    mock.create_topic("mock.eo", 2, 1)?;
    mock.create_topic("mock-app.outbox.relay.progress", 2, 1)?;
    let kafka = KafkaBroker::new(&bootstrap)
        .set("reconnect.backoff.max.ms", "200")
        // MockCluster does not answer CreateTopics (the progress topic is
        // created above): do not wait the default 10 s for it.
        .connect_timeout(std::time::Duration::from_secs(2))
        .transactional("mock-app");
    let transport = kafka.connect_transport().await?;
    let lanes = transport
        .lanes()
        .expect("a transactional transport has lanes");
    let opened = lanes
        .open(LaneId::new("outbox", "relay", lane, 2))
        .await
        .map_err(|e| anyhow::anyhow!("open: {e}"))?;
    Ok((mock, transport, opened))
}

fn records(n: i64) -> Vec<Outgoing> {
    (0..n)
        .map(|i| Outgoing::new("mock.eo", i.to_string().into_bytes()))
        .collect()
}

/// A lot commits; a retriable EndTxn error (concurrent transactions) is
/// retried by librdkafka and the lot commits; a fenced EndTxn loses the
/// lane (`Err`: the caller drops it and gives up the lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_txn_errors_keep_or_lose_the_lane() -> R {
    let (mock, _transport, (mut lane, last)) = open_lane(1).await?;
    assert!(last.is_empty(), "a new lane has no progress: {last:?}");

    let first = lane
        .commit(records(5), vec![1, 2, 3, 4, 5])
        .await
        .map_err(|e| anyhow::anyhow!("commit: {e}"))?;
    assert!(matches!(first, LotOutcome::Committed), "{first:?}");

    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[
            RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
            RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
        ],
    );
    let retried = lane
        .commit(records(3), vec![6, 7, 8])
        .await
        .map_err(|e| anyhow::anyhow!("commit: {e}"))?;
    assert!(matches!(retried, LotOutcome::Committed), "{retried:?}");

    mock.request_errors(RDKafkaApiKey::EndTxn, &[RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
    let fenced = lane.commit(records(3), vec![9, 10, 11]).await;
    let err = fenced.expect_err("a fenced commit loses the lane");
    println!("fenced: {err}");
    assert!(
        err.to_string().contains("commit_transaction"),
        "the error names the step: {err}"
    );
    drop(lane);
    Ok(())
}

/// A record the broker refuses for good (too large) aborts the lot: the
/// outcome names the refused record and says retrying cannot help (a
/// `BusRejection`, which dead-letters the row). On MockCluster the next
/// transaction of that producer timed out (30 s), so the engine reopens the
/// lane with a fresh producer after such a lot instead of going on with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_aborts_the_lot_and_is_named() -> R {
    let (mock, _transport, (mut lane, _last)) = open_lane(0).await?;
    // The error answers one Produce request: the record's and the progress
    // record's may travel in one or in two, so both are refused.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ],
    );
    let refused = lane
        .commit(records(1), vec![1])
        .await
        .map_err(|e| anyhow::anyhow!("commit: {e}"))?;
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    match &refused {
        LotOutcome::Refused { index, error } => {
            assert_eq!(*index, 0);
            assert!(
                outbox_core::BusRejection::find(&**error).is_some(),
                "too large is for good: {error}"
            );
        }
        other => panic!("expected the record refused, got {other:?}"),
    }
    Ok(())
}
