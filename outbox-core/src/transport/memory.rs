//! [`MemoryTransport`], an in-process transport that captures what it gets.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::{Outgoing, Transport};
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
