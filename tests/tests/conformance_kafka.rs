//! The transport conformance kit (`outbox-conformance`) against the real
//! Kafka-protocol broker (`KAFKA_BOOTSTRAP`): records are read back from
//! the topic, the outage is `scripts/kafka.sh pause` / `resume` (so that
//! check takes the Kafka test lock exclusively, the others shared), the
//! size limit is librdkafka's `message.max.bytes` (1,000,000 bytes).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outbox_conformance::{BusProbe, Cut, Received, Until};
use outbox_core::BoxError;
use outbox_core::transport::BoxFuture;
use outbox_kafka::KafkaBroker;
use tests::TestDb;
use tests::kafka::{
    Paused, TopicReader, bootstrap, broker_lock, create_topic, kafka_sh, test_kafka,
};

/// The broker at `KAFKA_BOOTSTRAP`.
struct Kafka {
    boot: String,
}

impl Kafka {
    fn new() -> Self {
        Self { boot: bootstrap() }
    }
}

impl BusProbe for Kafka {
    type Broker = KafkaBroker;

    fn broker(&self) -> KafkaBroker {
        test_kafka(&self.boot)
    }

    fn destination(&self, label: &str) -> BoxFuture<'static, Result<String, BoxError>> {
        let (boot, topic) = (
            self.boot.clone(),
            tests::kafka::unique_topic(&format!("conf.{label}")),
        );
        Box::pin(async move {
            create_topic(&boot, &topic, 2).await?;
            Ok(topic)
        })
    }

    fn read(
        &self,
        destination: &str,
        done: Until,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<Received>, BoxError>> {
        let (boot, topic) = (self.boot.clone(), destination.to_owned());
        Box::pin(async move {
            let mut reader = TopicReader::new(&boot, &topic).await?;
            let received = |recs: &[tests::kafka::Record]| -> Vec<Received> {
                recs.iter()
                    .map(|r| Received {
                        key: r.key.clone(),
                        payload: r.payload.clone(),
                        headers: r.headers.clone(),
                    })
                    .collect()
            };
            reader
                .read_until(timeout, |recs| done(&received(recs)))
                .await?;
            Ok(received(&reader.records))
        })
    }

    fn cut(&self) -> BoxFuture<'static, Result<Cut, BoxError>> {
        Box::pin(async move {
            let paused = Paused::pause()?;
            Ok(Cut::new(move || paused.resume().map_err(BoxError::from)))
        })
    }

    fn invalid_destination(&self) -> String {
        "not a topic!".to_owned()
    }

    fn oversized_len(&self) -> usize {
        2_000_000
    }

    fn unreachable_broker(&self) -> Option<KafkaBroker> {
        Some(
            KafkaBroker::new("127.0.0.1:1")
                .connect_timeout(Duration::from_secs(2))
                .set("reconnect.backoff.max.ms", "200"),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_publish_confirms() {
    let _lock = broker_lock(false).await.unwrap();
    outbox_conformance::publish_confirms(&Kafka::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_messages_arrive_as_documented() {
    let _lock = broker_lock(false).await.unwrap();
    let db = TestDb::new().await.unwrap();
    outbox_conformance::messages_arrive_as_documented(&Kafka::new(), &db.broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_keeps_rows() {
    kafka_sh();
    let _lock = broker_lock(true).await.unwrap();
    let db = TestDb::new().await.unwrap();
    outbox_conformance::outage_keeps_rows(&Kafka::new(), &db.broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_killed_relay_redelivers() {
    let _lock = broker_lock(false).await.unwrap();
    let db = TestDb::new().await.unwrap();
    outbox_conformance::killed_relay_redelivers(&Kafka::new(), &db.broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_invalid_destination_fails_startup() {
    let _lock = broker_lock(false).await.unwrap();
    let db = TestDb::new().await.unwrap();
    outbox_conformance::invalid_destination_fails_startup(&Kafka::new(), &db.broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_oversized_message_is_not_lost() {
    let _lock = broker_lock(false).await.unwrap();
    let db = TestDb::new().await.unwrap();
    outbox_conformance::oversized_message_is_not_lost(&Kafka::new(), &db.broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_unreachable_bus_fails_startup() {
    let db = TestDb::new().await.unwrap();
    let err = outbox_conformance::unreachable_bus_fails_startup(&Kafka::new(), &db.broker).await;
    assert!(
        err.contains("127.0.0.1:1"),
        "names the bootstrap address: {err}"
    );
}
