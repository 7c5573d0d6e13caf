//! [`AppContext`]: what hooks and handlers can reach at run time.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use tokio_util::sync::CancellationToken;

use crate::broker::OutboxBroker;
use crate::error::{Error, Result};
use crate::transport::Transport;

type StateMap = HashMap<TypeId, Arc<dyn Any + Send + Sync>>;

/// The running application as hooks and handlers see it: the broker (to
/// publish), the registered transports, the shared state, and a way to ask
/// for shutdown. Cheap to clone.
#[derive(Clone)]
pub struct AppContext {
    inner: Arc<Inner>,
}

struct Inner {
    broker: OutboxBroker,
    transports: RwLock<BTreeMap<String, Arc<dyn Transport>>>,
    state: RwLock<StateMap>,
    stop: CancellationToken,
    /// The broker's source identity, set once by `App::run`.
    source: OnceLock<Arc<str>>,
}

impl fmt::Debug for AppContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppContext")
            .field("broker", &self.inner.broker)
            .field("transports", &self.transport_names())
            .finish_non_exhaustive()
    }
}

impl AppContext {
    pub(crate) fn new(broker: OutboxBroker) -> Self {
        Self {
            inner: Arc::new(Inner {
                broker,
                transports: RwLock::default(),
                state: RwLock::default(),
                stop: CancellationToken::new(),
                source: OnceLock::new(),
            }),
        }
    }

    /// The outbox broker (publish on your transaction with it).
    pub fn broker(&self) -> &OutboxBroker {
        &self.inner.broker
    }

    /// Registers a transport under its [`Transport::name`]; a second transport
    /// with the same name is an error.
    pub fn add_transport(&self, transport: Arc<dyn Transport>) -> Result<()> {
        let mut map = self
            .inner
            .transports
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let name = transport.name().to_owned();
        if map.contains_key(&name) {
            return Err(Error::config(format!(
                "a transport named `{name}` is already registered; give the second one another name"
            )));
        }
        map.insert(name, transport);
        Ok(())
    }

    /// The transport registered as `name`.
    pub fn transport(&self, name: &str) -> Option<Arc<dyn Transport>> {
        self.inner
            .transports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Names of the registered transports, sorted.
    pub fn transport_names(&self) -> Vec<String> {
        self.inner
            .transports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn transports(&self) -> Vec<Arc<dyn Transport>> {
        self.inner
            .transports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Stores shared state (replacing a previous value of the same type).
    pub fn insert_state<S: Send + Sync + 'static>(&self, value: S) {
        self.inner
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(TypeId::of::<S>(), Arc::new(value));
    }

    /// The shared state of type `S`, if registered.
    pub fn state<S: Send + Sync + 'static>(&self) -> Option<Arc<S>> {
        let any = self
            .inner
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&TypeId::of::<S>())?
            .clone();
        any.downcast::<S>().ok()
    }

    pub(crate) fn has_state(&self, id: TypeId) -> bool {
        self.inner
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// The source identity of this App's outbox, as `App::run` resolved it
    /// at startup ([`OutboxBroker::resolve_source`]) and stamps on every
    /// [`Outgoing`](crate::Outgoing); `None` until then (in `on_startup`
    /// hooks, it is resolved after them).
    pub fn source(&self) -> Option<Arc<str>> {
        self.inner.source.get().cloned()
    }

    /// Records the resolved source identity (once; `App::run`).
    pub(crate) fn set_source(&self, source: Arc<str>) {
        let _ = self.inner.source.set(source);
    }

    /// Asks the application to shut down gracefully (as SIGTERM does).
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    pub(crate) fn stop_token(&self) -> &CancellationToken {
        &self.inner.stop
    }
}
