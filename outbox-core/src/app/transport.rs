//! [`Transport`]: where handlers' results go (Kafka, RabbitMQ, NATS, …), and
//! [`MemoryTransport`], an in-process transport that captures what it gets.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use crate::envelope::Headers;
use crate::error::BoxError;

/// A message on its way to a bus: the handler's encoded result plus the
/// headers the runtime assembled (content type, correlation id, `outbox-id`,
/// explicit and propagated headers).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outgoing {
    /// Topic, exchange, subject, stream… as named in `#[publish_to]`.
    pub destination: String,
    /// Partitioning / routing key, if the handler gave one.
    pub key: Option<Vec<u8>>,
    /// The encoded body.
    pub payload: Vec<u8>,
    /// Headers, all strings.
    pub headers: Headers,
}

impl Outgoing {
    /// An outgoing message (for transport tests).
    pub fn new(destination: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            destination: destination.into(),
            key: None,
            payload,
            headers: Headers::new(),
        }
    }

    /// The `content-type` header, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .get(crate::envelope::CONTENT_TYPE)
            .map(String::as_str)
    }
}

/// A bus's refusal that retrying cannot fix: the record is larger than the
/// bus accepts, the relay is not authorized for the destination, the
/// destination name is invalid, and so on.
///
/// A [`Transport`] returns it (boxed) from [`Transport::publish`] for such
/// refusals, with the bus's own error as its source. A subscriber that keeps
/// the default retry strategy then moves the row to the dead-letter table at
/// once (reason `rejected`, `last_exception` naming the bus and its error
/// text) instead of retrying for minutes; a subscriber with its own
/// [`RetryStrategy`](crate::RetryStrategy) decides itself (see
/// [`RetryContext::is_bus_rejection`](crate::retry::RetryContext::is_bus_rejection)).
/// Transient failures (timeouts, a broker that is down) must not use it.
///
/// ```
/// use outbox_core::transport::BusRejection;
///
/// let err = BusRejection::new("kafka", "Broker: Message size too large");
/// assert_eq!(err.bus(), "kafka");
/// assert_eq!(
///     err.to_string(),
///     "kafka refused the message, and retrying cannot change that"
/// );
/// let boxed: outbox_core::BoxError = Box::new(err);
/// assert!(BusRejection::find(&*boxed).is_some());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{bus} refused the message, and retrying cannot change that")]
pub struct BusRejection {
    bus: String,
    #[source]
    source: BoxError,
}

impl BusRejection {
    /// A permanent refusal by `bus` (a transport name such as `kafka`),
    /// caused by `source` (the bus's own error).
    pub fn new(bus: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            bus: bus.into(),
            source: source.into(),
        }
    }

    /// The bus that refused the message.
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// The first `BusRejection` in `err` or its chain of sources.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a BusRejection> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<BusRejection>() {
                return Some(r);
            }
            cur = e.source();
        }
        None
    }
}

/// A bus the runtime forwards handler results to.
///
/// Implementations live in their own crates (`outbox-kafka`, …) and depend on
/// `outbox-core` only. [`publish`](Self::publish) must resolve only once the bus
/// has confirmed the message (for Kafka: a positive delivery report): the
/// outbox row is deleted right after, so an early `Ok` would lose messages.
/// Many publishes are in flight at once (one per worker), so the future must
/// not hold a lock across the confirmation wait.
pub trait Transport: Send + Sync + 'static {
    /// The name handlers use in `#[publish_to(name, "destination")]`.
    fn name(&self) -> &str;

    /// Sends `msg`; resolves when the bus confirmed it, or with the error.
    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>>;

    /// The longest a [`publish`](Self::publish) may wait for the bus (for
    /// Kafka, `message.timeout.ms`), if bounded. `App::run` warns when a
    /// subscriber's `lease_ttl` is not longer: the lease is not extended while
    /// a publish waits, so the row could be claimed and published again.
    fn max_publish_time(&self) -> Option<std::time::Duration> {
        None
    }

    /// Checks a destination named in `#[publish_to(name, "destination")]`
    /// (a topic name, a queue name…) when `App::run` starts, before anything
    /// is consumed; `Err(reason)` makes startup fail with it, naming the
    /// handler. The default accepts every destination.
    fn check_destination(&self, destination: &str) -> Result<(), String> {
        let _ = destination;
        Ok(())
    }

    /// Flushes and closes; called once at shutdown, after the subscribers
    /// have drained.
    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async { Ok(()) })
    }
}

impl fmt::Debug for dyn Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Transport({:?})", self.name())
    }
}

/// An in-process transport that records every message it receives, for tests
/// and for running an application without a bus.
///
/// ```
/// use outbox_core::{MemoryTransport, Outgoing, Transport};
///
/// # futures_executor_block_on(async {
/// let kafka = MemoryTransport::new("kafka");
/// kafka.fail_next(1);
/// assert!(kafka.publish(Outgoing::new("orders.kafka", b"1".to_vec())).await.is_err());
/// kafka.publish(Outgoing::new("orders.kafka", b"1".to_vec())).await.unwrap();
/// assert_eq!(kafka.messages_to("orders.kafka").len(), 1);
/// # });
/// # fn futures_executor_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryTransport {
    name: String,
    inner: Arc<Mutex<MemoryInner>>,
    notify: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct MemoryInner {
    messages: Vec<Outgoing>,
    failures: VecDeque<String>,
    closed: bool,
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The error a [`MemoryTransport`] returns for a failure set up with
/// [`MemoryTransport::fail_next`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InjectedFailure(String);

impl MemoryTransport {
    /// A transport registered under `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            inner: Arc::default(),
            notify: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next `n` publishes fail (the nack/retry path).
    pub fn fail_next(&self, n: usize) {
        let mut g = self.lock();
        for _ in 0..n {
            g.failures
                .push_back(format!("injected failure of transport `{}`", self.name));
        }
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> Vec<Outgoing> {
        self.lock().messages.clone()
    }

    /// The messages sent to `destination`.
    pub fn messages_to(&self, destination: &str) -> Vec<Outgoing> {
        self.lock()
            .messages
            .iter()
            .filter(|m| m.destination == destination)
            .cloned()
            .collect()
    }

    /// Whether [`Transport::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Waits until at least `n` messages were received, or `timeout` passes;
    /// returns the messages received by then.
    pub async fn wait_for(&self, n: usize, timeout: std::time::Duration) -> Vec<Outgoing> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            let msgs = self.messages();
            if msgs.len() >= n {
                return msgs;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.messages();
            }
        }
    }
}

impl Transport for MemoryTransport {
    fn name(&self) -> &str {
        &self.name
    }

    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let result = {
            let mut g = self.lock();
            match g.failures.pop_front() {
                Some(reason) => Err(Box::new(InjectedFailure(reason)) as BoxError),
                None => {
                    g.messages.push(msg);
                    Ok(())
                }
            }
        };
        self.notify.notify_waiters();
        Box::pin(async move { result })
    }

    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        self.lock().closed = true;
        Box::pin(async { Ok(()) })
    }
}
