//! Kafka support: topics, the benchmarks' producer settings, a warmed-up
//! connection, and the broker's own ingest ceiling ([`KafkaBench`]).

use std::time::Duration;

use anyhow::Context as _;
use outbox_core::Outgoing;
use outbox_kafka::rdkafka::ClientConfig;
use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions};
use outbox_kafka::rdkafka::client::DefaultClientContext;
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use outbox_kafka::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use outbox_kafka::rdkafka::message::{Header, OwnedHeaders};
use outbox_kafka::rdkafka::producer::{
    DeliveryFuture, FutureProducer, FutureRecord, Producer as _,
};
use outbox_kafka::rdkafka::{Offset, TopicPartitionList};
use outbox_kafka::{KafkaBroker, KafkaTransport};

use crate::buses::{CeilingRun, PlainClient, confirm_window};

fn admin(bootstrap: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating the Kafka admin client")
}

/// Creates `topic` (replication 1); an existing topic is fine.
pub(crate) async fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    KafkaBroker::new(bootstrap)
        .ensure_topic(topic, partitions, 1)
        .await
        .context("is the broker up (`bash scripts/kafka.sh start`)?")?;
    Ok(())
}

/// Deletes `topic`, best effort (the local broker keeps records in memory).
pub(crate) async fn delete_topic(bootstrap: &str, topic: &str) {
    let Ok(admin) = admin(bootstrap) else { return };
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match tokio::time::timeout(
        Duration::from_secs(20),
        admin.delete_topics(&[topic], &opts),
    )
    .await
    {
        Ok(Ok(rs)) => {
            for r in rs {
                if let Err((name, code)) = r {
                    eprintln!("outbox-bench: deleting topic {name}: {code}");
                }
            }
        }
        Ok(Err(e)) => eprintln!("outbox-bench: deleting topic {topic}: {e}"),
        Err(_) => eprintln!("outbox-bench: deleting topic {topic} timed out"),
    }
}

/// The transport configuration of the benchmarks: outbox-kafka's defaults
/// (acks=all, idempotence, linger 5 ms, no compression) unless overridden.
pub(crate) fn broker(bootstrap: &str, linger: Option<Duration>) -> KafkaBroker {
    let mut k = KafkaBroker::new(bootstrap).client_id("outbox-bench");
    if let Some(l) = linger {
        k = k.linger(l);
    }
    k
}

/// Connects, and sends one record to `topic` so that the idempotent
/// producer's id (about 0.5 s) is acquired before any clock starts.
pub(crate) async fn connect_warm(
    kafka: &KafkaBroker,
    topic: &str,
) -> anyhow::Result<KafkaTransport> {
    let t = kafka.connect_transport().await.with_context(|| {
        format!(
            "cannot reach Kafka at {}; start the local broker with `bash scripts/kafka.sh start` \
             or pass --bootstrap",
            kafka.bootstrap()
        )
    })?;
    t.send(Outgoing::new(topic, b"warm-up".to_vec()))
        .await
        .context("warm-up publish")?;
    Ok(t)
}

/// Kafka in the `ceiling` scenario: the broker's own ingest ceiling with a
/// plain rdkafka `FutureProducer` created from the same librdkafka
/// configuration as the transport under test ([`broker`]`(..).client_config()`:
/// outbox-kafka's defaults, acks=all, idempotence, linger 5 ms unless
/// overridden), sending the same payloads with the envelope headers the
/// relay sends (`content-type`, `correlation_id`, `outbox-id`), at most
/// `in_flight` records without a delivery report.
#[derive(Debug, Clone)]
pub(crate) struct KafkaBench {
    bootstrap: String,
    partitions: i32,
    linger: Option<Duration>,
}

impl KafkaBench {
    /// The broker at `bootstrap`; topics get `partitions` partitions;
    /// `linger`: `None` for outbox-kafka's default.
    pub(crate) fn new(bootstrap: &str, partitions: i32, linger: Option<Duration>) -> Self {
        Self {
            bootstrap: bootstrap.to_owned(),
            partitions,
            linger,
        }
    }

    fn producer(&self) -> anyhow::Result<FutureProducer> {
        let config = broker(&self.bootstrap, self.linger)
            .client_config()
            .map_err(|e| anyhow::anyhow!("Kafka producer settings: {e}"))?;
        config
            .create()
            .context("creating the Kafka ceiling producer")
    }
}

/// Sends one record, waiting for room while librdkafka's queue is full;
/// returns its delivery report future.
async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    payload: &[u8],
    id: &str,
) -> anyhow::Result<DeliveryFuture> {
    let headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "content-type",
            value: Some("application/json"),
        })
        .insert(Header {
            key: "correlation_id",
            value: Some(id),
        })
        .insert(Header {
            key: "outbox-id",
            value: Some(id),
        });
    let mut record: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(topic).payload(payload).headers(headers);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(e).context("enqueueing a ceiling record"),
        }
    }
}

async fn delivered(delivery: DeliveryFuture) -> anyhow::Result<()> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e).context("Kafka refused a ceiling record"),
        Err(_) => anyhow::bail!("the ceiling producer dropped a record"),
    }
}

impl PlainClient for KafkaBench {
    type Broker = KafkaBroker;

    const NAME: &'static str = "kafka";

    fn broker(&self) -> KafkaBroker {
        broker(&self.bootstrap, self.linger)
    }

    async fn prepare_destination(&self, destination: &str) -> anyhow::Result<()> {
        create_topic(&self.bootstrap, destination, self.partitions).await
    }

    async fn ceiling_run(
        &self,
        destination: &str,
        n: usize,
        payload: &[u8],
        in_flight: usize,
    ) -> anyhow::Result<CeilingRun> {
        let producer = self.producer()?;
        // The idempotent producer's id and the partition leaders, off the clock.
        delivered(enqueue(&producer, destination, b"warm-up", "0").await?).await?;
        let producer = &producer;
        let run = confirm_window(n, in_flight, |i| {
            let id = (i + 1).to_string();
            async move {
                let delivery = enqueue(producer, destination, payload, &id).await?;
                Ok(delivered(delivery))
            }
        })
        .await;
        producer.flush(Duration::from_secs(10)).ok();
        run
    }

    /// Reads the topic back from the beginning of every partition (Tansu's
    /// high watermarks are wrong, see scripts/kafka.sh), until nothing came
    /// for 1.5 s.
    async fn message_count(&self, destination: &str) -> anyhow::Result<u64> {
        let bootstrap = self.bootstrap.clone();
        let topic = destination.to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set(
                    "group.id",
                    format!(
                        "outbox-bench-{}",
                        &uuid::Uuid::new_v4().simple().to_string()[..10]
                    ),
                )
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                .create()
                .context("creating a Kafka consumer to count records")?;
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .context("Kafka metadata")?;
            let mut tpl = TopicPartitionList::new();
            for t in md.topics().iter().filter(|t| t.name() == topic) {
                for p in t.partitions() {
                    tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
                }
            }
            consumer.assign(&tpl)?;
            let (mut n, mut idle) = (0u64, 0);
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while idle < 3 && std::time::Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(500)) {
                    Some(Ok(_)) => {
                        n += 1;
                        idle = 0;
                    }
                    Some(Err(_)) => {}
                    None => idle += 1,
                }
            }
            Ok(n)
        })
        .await
        .context("counting task")?
    }

    async fn delete(&self, destination: &str) {
        delete_topic(&self.bootstrap, destination).await;
    }

    fn settings(&self) -> serde_json::Value {
        let linger = self.linger.unwrap_or(outbox_kafka::DEFAULT_LINGER);
        let mut m = serde_json::Map::new();
        m.insert("partitions".into(), self.partitions.into());
        m.insert(
            "linger_ms".into(),
            serde_json::json!(linger.as_secs_f64() * 1000.0),
        );
        m.insert("linger_overridden".into(), self.linger.is_some().into());
        if let Ok(c) = self.broker().client_config() {
            // The librdkafka settings both the ceiling and the transport use
            // (outbox-kafka's typed defaults; no secrets are set here).
            let map = c.config_map();
            let mut keys: Vec<_> = map.iter().collect();
            keys.sort();
            m.insert(
                "librdkafka".into(),
                keys.into_iter()
                    .filter(|(k, _)| !k.contains("password") && !k.contains("secret"))
                    .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.to_string())))
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            );
        }
        m.into()
    }
}
