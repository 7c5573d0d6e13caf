//! Kafka support: topics, and a [`Transport`] wrapper (for every bus) that
//! timestamps every confirmed publish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use outbox_core::{BoxError, OUTBOX_ID, Outgoing, Transport};
use outbox_kafka::rdkafka::ClientConfig;
use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions};
use outbox_kafka::rdkafka::client::DefaultClientContext;
use outbox_kafka::{KafkaBroker, KafkaTransport};

use crate::drain::Progress;

/// Header carrying the row's `created_at` (µs since the epoch) to the
/// transport, for the lag of the steady-state relay.
pub(crate) const CREATED_HEADER: &str = "x-bench-created-us";

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

/// One confirmed publish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Confirm {
    pub(crate) id: i64,
    pub(crate) started: Instant,
    pub(crate) confirmed: Instant,
    /// Now minus the row's `created_at` at confirmation, ms (when the handler
    /// sent [`CREATED_HEADER`]).
    pub(crate) lag_ms: Option<f64>,
}

/// Shared by the transport wrapper and the scenario.
#[derive(Debug)]
pub(crate) struct Confirms {
    pub(crate) progress: Arc<Progress>,
    pub(crate) failed: AtomicU64,
    pub(crate) log: Option<Mutex<Vec<Confirm>>>,
}

/// A transport (outbox-kafka's, or another bus's), timestamping each
/// confirmation. Publishes are passed through untouched; the wrapper costs
/// two clock reads and a counter.
#[derive(Clone)]
pub(crate) struct Timed {
    inner: Arc<dyn Transport>,
    shared: Arc<Confirms>,
}

impl std::fmt::Debug for Timed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timed")
            .field("inner", &self.inner.name())
            .finish()
    }
}

impl Timed {
    pub(crate) fn new(inner: Arc<dyn Transport>, shared: Arc<Confirms>) -> Self {
        Self { inner, shared }
    }
}

impl Transport for Timed {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let shared = self.shared.clone();
        let started = Instant::now();
        let logged = shared.log.is_some().then(|| {
            let id = msg
                .headers
                .get(OUTBOX_ID)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(-1);
            let created = msg
                .headers
                .get(CREATED_HEADER)
                .and_then(|v| v.parse::<i64>().ok());
            (id, created)
        });
        let fut = self.inner.publish(msg);
        Box::pin(async move {
            let res = fut.await;
            if res.is_ok() {
                shared.progress.hit();
                if let (Some(log), Some((id, created))) = (&shared.log, logged) {
                    let lag_ms = created
                        .map(|us| (chrono::Utc::now().timestamp_micros() - us) as f64 / 1000.0);
                    let c = Confirm {
                        id,
                        started,
                        confirmed: Instant::now(),
                        lag_ms,
                    };
                    if let Ok(mut l) = log.lock() {
                        l.push(c);
                    }
                }
            } else {
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
            res
        })
    }

    fn max_publish_time(&self) -> Option<Duration> {
        self.inner.max_publish_time()
    }

    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        self.inner.close()
    }
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

/// The confirmation log as a map from row id.
pub(crate) fn by_id(log: &[Confirm]) -> HashMap<i64, Confirm> {
    log.iter().map(|c| (c.id, *c)).collect()
}
