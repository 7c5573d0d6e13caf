//! Kafka support: topics, the benchmarks' producer settings, a warmed-up
//! connection.

use std::time::Duration;

use anyhow::Context as _;
use outbox_core::Outgoing;
use outbox_kafka::rdkafka::ClientConfig;
use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions};
use outbox_kafka::rdkafka::client::DefaultClientContext;
use outbox_kafka::{KafkaBroker, KafkaTransport};

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
