//! [`MemoryTransport`], an in-process transport that captures what it gets.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::{BusRejection, Outgoing, Transport, TransportBroker};
use crate::error::BoxError;

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
///
/// It is also its own [`TransportBroker`]: `App::on_startup(memory.connect())`
/// registers it as a transport crate's builder would, sharing what it
/// records with the clone you keep. For the conformance kit it can play a
/// bus that fails: [`set_down`](Self::set_down) (an outage: publishes fail
/// until it is up again), [`max_message_bytes`](Self::max_message_bytes) (a
/// larger payload is a [`BusRejection`]) and
/// [`check_destinations_with`](Self::check_destinations_with).
#[derive(Clone)]
pub struct MemoryTransport {
    name: String,
    inner: Arc<Mutex<MemoryInner>>,
    notify: Arc<tokio::sync::Notify>,
}

/// A destination rule (see [`MemoryTransport::check_destinations_with`]).
type DestinationCheck = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Default)]
struct MemoryInner {
    messages: Vec<Outgoing>,
    failures: VecDeque<String>,
    closed: bool,
    down: bool,
    max_bytes: Option<usize>,
    check: Option<DestinationCheck>,
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

    /// Simulates an outage: while `down`, every publish fails with a
    /// transient error (the rows are nacked and retried); nothing is
    /// recorded.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Whether [`set_down`](Self::set_down) made the transport fail.
    pub fn is_down(&self) -> bool {
        self.lock().down
    }

    /// Refuses payloads longer than `max` bytes with a [`BusRejection`] (as
    /// a bus refuses a record over its size limit).
    pub fn max_message_bytes(self, max: usize) -> Self {
        self.lock().max_bytes = Some(max);
        self
    }

    /// Checks the destinations handlers name with `check` when the App
    /// starts ([`Transport::check_destination`]); by default every
    /// destination is accepted.
    pub fn check_destinations_with(
        self,
        check: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.lock().check = Some(Arc::new(check));
        self
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
            if g.down {
                Err(Box::new(InjectedFailure(format!(
                    "transport `{}` is down (a simulated outage)",
                    self.name
                ))) as BoxError)
            } else if let Some(max) = g.max_bytes.filter(|m| msg.payload.len() > *m) {
                Err(Box::new(BusRejection::new(
                    self.name.clone(),
                    format!(
                        "message of {} bytes to `{}` is larger than the {max} bytes this \
                         transport accepts",
                        msg.payload.len(),
                        msg.destination
                    ),
                )) as BoxError)
            } else {
                match g.failures.pop_front() {
                    Some(reason) => Err(Box::new(InjectedFailure(reason)) as BoxError),
                    None => {
                        g.messages.push(msg);
                        Ok(())
                    }
                }
            }
        };
        self.notify.notify_waiters();
        Box::pin(async move { result })
    }

    fn check_destination(&self, destination: &str) -> Result<(), String> {
        let check = self.lock().check.clone();
        check.map_or(Ok(()), |c| c(destination))
    }

    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        self.lock().closed = true;
        Box::pin(async { Ok(()) })
    }
}

/// Connecting a `MemoryTransport` gives the transport itself (a clone that
/// shares what it records): nothing to reach.
impl TransportBroker for MemoryTransport {
    type Transport = MemoryTransport;

    fn transport_name(&self) -> &str {
        &self.name
    }

    fn connect_transport(&self) -> BoxFuture<'static, Result<MemoryTransport, BoxError>> {
        let this = self.clone();
        Box::pin(async move { Ok(this) })
    }
}
