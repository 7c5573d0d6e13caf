//! The buses other than Kafka (RabbitMQ, NATS, Redis) for the `bus`
//! scenario: each file gives the transport under test and the bus's own
//! ceiling, measured with the bus's plain client publishing the same
//! payloads with the same confirm settings.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use outbox_core::transport::TransportBroker;
use outbox_core::{Outgoing, Transport};
use serde_json::{Map, Value, json};

use crate::kafka;

/// What the plain client achieved: `n` confirmed publishes.
#[derive(Debug, Clone)]
pub(crate) struct CeilingRun {
    /// First publish to last confirmation.
    pub(crate) elapsed: Duration,
    /// Per message: publish call -> the bus's confirmation.
    pub(crate) confirm_latencies: Vec<Duration>,
}

/// The ceiling's publish loop, the same for every bus: publishes messages
/// `0..n`, keeping at most `in_flight` unconfirmed, and records each one's
/// latency from its send to its confirmation. `publish(i)` prepares message
/// `i` when called (not timed) and returns the send, timed from its first
/// poll: it resolves once the message is handed to the client, to the
/// confirmation still to await (an error if the bus refused or did not
/// confirm).
pub(crate) async fn confirm_window<P, S, C>(
    n: usize,
    in_flight: usize,
    mut publish: P,
) -> anyhow::Result<CeilingRun>
where
    P: FnMut(usize) -> S,
    S: Future<Output = anyhow::Result<C>>,
    C: Future<Output = anyhow::Result<()>>,
{
    let in_flight = in_flight.max(1);
    let mut pending = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(n);
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < n || !pending.is_empty() {
        while sent < n && pending.len() < in_flight {
            let send = publish(sent);
            let t0 = Instant::now();
            let confirm = send.await?;
            pending.push(async move { (confirm.await, t0.elapsed()) });
            sent += 1;
        }
        if let Some((confirmation, latency)) = pending.next().await {
            confirmation?;
            latencies.push(latency);
        }
    }
    Ok(CeilingRun {
        elapsed: start.elapsed(),
        confirm_latencies: latencies,
    })
}

/// One bus in the benchmark harness.
pub(crate) trait Bus: Send + Sync {
    /// The transport name (`rabbit`, `nats`, `redis`).
    fn name(&self) -> &'static str;

    /// Creates `destination` (queue, stream, ...) so publishes to it are confirmed.
    fn prepare(&self, destination: &str) -> BoxFuture<'_, anyhow::Result<()>>;

    /// The connected transport, with the crate's default (confirmed) settings.
    fn transport(&self) -> BoxFuture<'_, anyhow::Result<Arc<dyn Transport>>>;

    /// The plain client publishing `n` copies of `payload` to `destination`,
    /// at most `in_flight` unconfirmed at once, with the confirm settings
    /// the transport uses.
    fn ceiling(
        &self,
        destination: &str,
        n: usize,
        payload: &[u8],
        in_flight: usize,
    ) -> BoxFuture<'_, anyhow::Result<CeilingRun>>;

    /// Messages that arrived at `destination` (to check nothing is missing).
    fn count(&self, destination: &str) -> BoxFuture<'_, anyhow::Result<u64>>;

    /// Deletes `destination`, best effort.
    fn cleanup(&self, destination: &str) -> BoxFuture<'_, ()>;

    /// The client settings the ceiling ran with, for its result (`null`:
    /// the crate's defaults, nothing to add).
    fn settings(&self) -> Value;
}

/// What each bus file writes: its transport crate's builder and its plain
/// client's steps; [`Bus`] follows from it (the same for every bus: the
/// transport connected with `connect_transport`, the steps boxed).
pub(crate) trait PlainClient: Send + Sync {
    /// The transport crate's builder.
    type Broker: TransportBroker;

    /// The transport name (`rabbit`, `nats`, `redis`).
    const NAME: &'static str;

    /// The builder of the transport under test, with the crate's defaults.
    fn broker(&self) -> Self::Broker;

    /// As [`Bus::prepare`].
    fn prepare_destination(
        &self,
        destination: &str,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// As [`Bus::ceiling`] (with [`confirm_window`]).
    fn ceiling_run(
        &self,
        destination: &str,
        n: usize,
        payload: &[u8],
        in_flight: usize,
    ) -> impl Future<Output = anyhow::Result<CeilingRun>> + Send;

    /// As [`Bus::count`].
    fn message_count(&self, destination: &str) -> impl Future<Output = anyhow::Result<u64>> + Send;

    /// As [`Bus::cleanup`].
    fn delete(&self, destination: &str) -> impl Future<Output = ()> + Send;

    /// As [`Bus::settings`].
    fn settings(&self) -> Value {
        Value::Null
    }
}

impl<T: PlainClient> Bus for T {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn prepare(&self, destination: &str) -> BoxFuture<'_, anyhow::Result<()>> {
        let destination = destination.to_owned();
        Box::pin(async move { self.prepare_destination(&destination).await })
    }

    fn transport(&self) -> BoxFuture<'_, anyhow::Result<Arc<dyn Transport>>> {
        Box::pin(async move {
            let t = self
                .broker()
                .connect_transport()
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            Ok(Arc::new(t) as Arc<dyn Transport>)
        })
    }

    fn ceiling(
        &self,
        destination: &str,
        n: usize,
        payload: &[u8],
        in_flight: usize,
    ) -> BoxFuture<'_, anyhow::Result<CeilingRun>> {
        let (destination, payload) = (destination.to_owned(), payload.to_vec());
        Box::pin(async move { self.ceiling_run(&destination, n, &payload, in_flight).await })
    }

    fn count(&self, destination: &str) -> BoxFuture<'_, anyhow::Result<u64>> {
        let destination = destination.to_owned();
        Box::pin(async move { self.message_count(&destination).await })
    }

    fn cleanup(&self, destination: &str) -> BoxFuture<'_, ()> {
        let destination = destination.to_owned();
        Box::pin(async move { self.delete(&destination).await })
    }

    fn settings(&self) -> Value {
        PlainClient::settings(self)
    }
}

/// Where the relay scenarios (`relay`, `latency --bus`) forward rows.
#[derive(Clone)]
pub(crate) enum Target {
    /// Kafka through outbox-kafka.
    Kafka {
        bootstrap: String,
        partitions: i32,
        /// librdkafka linger.ms; `None`: outbox-kafka's default.
        linger: Option<Duration>,
    },
    /// RabbitMQ, NATS or Redis through its transport crate.
    Bus(Arc<dyn Bus>),
    /// outbox-core's in-process `MemoryTransport`, which confirms at once:
    /// the outbox side's own ceiling for the same route settings (the
    /// reference of the bus relays).
    Memory,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kafka {
                bootstrap,
                partitions,
                linger,
            } => f
                .debug_struct("Kafka")
                .field("bootstrap", bootstrap)
                .field("partitions", partitions)
                .field("linger", linger)
                .finish(),
            Self::Bus(b) => f.debug_tuple("Bus").field(&b.name()).finish(),
            Self::Memory => f.write_str("Memory"),
        }
    }
}

impl Target {
    /// The transport name routes publish to.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Kafka { .. } => "kafka",
            Self::Bus(b) => b.name(),
            Self::Memory => "memory",
        }
    }

    /// A fresh destination name (`<prefix>.<random>`), valid on every bus.
    pub(crate) fn fresh_destination(prefix: &str) -> String {
        format!(
            "{prefix}.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        )
    }

    /// Creates the destination.
    pub(crate) async fn prepare(&self, destination: &str) -> anyhow::Result<()> {
        match self {
            Self::Kafka {
                bootstrap,
                partitions,
                ..
            } => kafka::create_topic(bootstrap, destination, *partitions).await,
            Self::Bus(b) => b
                .prepare(destination)
                .await
                .with_context(|| format!("creating {destination} on {}", b.name())),
            Self::Memory => Ok(()),
        }
    }

    /// Connects the transport and sends one message to `destination`, so
    /// that connection set-up is done before any clock starts. `defaults`:
    /// the transport's own defaults (no linger override).
    pub(crate) async fn connect_warm(
        &self,
        destination: &str,
        defaults: bool,
    ) -> anyhow::Result<Arc<dyn Transport>> {
        match self {
            Self::Kafka {
                bootstrap, linger, ..
            } => {
                let k = kafka::broker(bootstrap, linger.filter(|_| !defaults));
                Ok(Arc::new(kafka::connect_warm(&k, destination).await?))
            }
            Self::Bus(b) => {
                let t = b.transport().await?;
                t.publish(Outgoing::new(destination, b"warm-up".to_vec()))
                    .await
                    .map_err(|e| anyhow::anyhow!("warm-up publish to {}: {e}", b.name()))?;
                Ok(t)
            }
            Self::Memory => Ok(Arc::new(outbox_core::MemoryTransport::new("memory"))),
        }
    }

    /// Deletes the destination, best effort.
    pub(crate) async fn cleanup(&self, destination: &str) {
        match self {
            Self::Kafka { bootstrap, .. } => kafka::delete_topic(bootstrap, destination).await,
            Self::Bus(b) => b.cleanup(destination).await,
            Self::Memory => {}
        }
    }

    /// The target's parameters for a result.
    pub(crate) fn json(&self, defaults: bool) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("bus".into(), json!(self.name()));
        if let Self::Kafka {
            partitions, linger, ..
        } = self
        {
            let overridden = linger.is_some() && !defaults;
            let linger = match linger {
                Some(l) if !defaults => *l,
                _ => outbox_kafka::DEFAULT_LINGER,
            };
            m.insert("partitions".into(), json!(partitions));
            m.insert("linger_ms".into(), json!(linger.as_secs_f64() * 1000.0));
            // false: outbox-kafka's producer defaults (librdkafka's linger).
            m.insert("linger_overridden".into(), json!(overridden));
        }
        m
    }
}

pub(crate) mod nats;
pub(crate) mod rabbitmq;
pub(crate) mod redis;
