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

/// The Kafka test lock of `check`: exclusive for the outage (which pauses
/// the broker), shared for the others; none for the unreachable bus (it
/// does not use the broker).
async fn lock(check: &str) -> Option<std::fs::File> {
    match check {
        "unreachable_bus_fails_startup" => None,
        "outage_keeps_rows" => {
            kafka_sh();
            Some(broker_lock(true).await.unwrap())
        }
        _ => Some(broker_lock(false).await.unwrap()),
    }
}

outbox_conformance::conformance_tests! {
    mod kafka;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    probe: Kafka::new(),
    outbox: TestDb::new().await.unwrap(),
    guard: lock,
    unreachable: |err: String| {
        assert!(
            err.contains("127.0.0.1:1"),
            "names the bootstrap address: {err}"
        );
    },
}
