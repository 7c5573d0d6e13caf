//! [`TransportBroker`]: how a transport crate's builder connects and
//! registers its transport, and [`Connect`], the startup step it returns.

use std::fmt;

use futures_util::future::BoxFuture;

use super::Transport;
use crate::error::BoxError;

/// The configuration of a transport (a bus client's builder, such as
/// `outbox_kafka::KafkaBroker`): it knows the name the transport registers
/// under and how to connect to the bus.
///
/// Every transport crate implements this trait for its builder, and nothing
/// else to take part in an application: the provided
/// [`connect`](Self::connect) is the one registration path. Its result goes
/// to [`App::on_startup`](crate::App::on_startup): when the application
/// starts, it calls [`connect_transport`](Self::connect_transport), checks
/// that the transport carries the name announced by
/// [`transport_name`](Self::transport_name), and registers it under that
/// name; a failure aborts startup with an error naming the transport
/// (`on_startup hook `kafka.connect` failed: transport `kafka` could not
/// connect: …`).
///
/// The [`Transport`] it returns owns the rest: its name, the check of the
/// destinations handlers name ([`Transport::check_destination`]), the
/// longest a publish may take ([`Transport::max_publish_time`]) and
/// [`close`](Transport::close) at shutdown. See `docs/transports.md` for the
/// whole contract and the conformance kit (`outbox-conformance`) every
/// transport crate runs against its real server.
///
/// ```
/// use outbox_core::transport::{BoxFuture, TransportBroker};
/// use outbox_core::{App, BoxError, MemoryTransport, OutboxBroker};
///
/// /// A transport crate's builder: where the bus is, what to call it.
/// #[derive(Clone)]
/// struct EchoBroker {
///     url: String,
/// }
///
/// impl TransportBroker for EchoBroker {
///     // A real crate returns its own transport (`KafkaTransport`, …).
///     type Transport = MemoryTransport;
///
///     fn transport_name(&self) -> &str {
///         "echo"
///     }
///
///     fn connect_transport(&self) -> BoxFuture<'static, Result<MemoryTransport, BoxError>> {
///         let url = self.url.clone();
///         Box::pin(async move {
///             // Connect to the bus at `url` and check that it answers; an
///             // error here fails `App::run` before anything is consumed.
///             if url.is_empty() {
///                 return Err("no URL given for the echo bus".into());
///             }
///             Ok(MemoryTransport::new("echo"))
///         })
///     }
/// }
///
/// # fn demo(outbox: OutboxBroker) {
/// let echo = EchoBroker { url: "echo://localhost".into() };
/// let app = App::new(outbox).on_startup(echo.connect()); // registers `echo`
/// # let _ = app;
/// # }
/// ```
pub trait TransportBroker: Clone + Send + Sync + 'static {
    /// The connected transport.
    type Transport: Transport;

    /// The name the transport registers under, as handlers write it in
    /// `#[publish_to(name, "destination")]` (e.g. `kafka`).
    fn transport_name(&self) -> &str;

    /// Connects to the bus and returns the transport, failing when the bus
    /// cannot be reached or refuses the configuration (the error should
    /// name the address it tried). Also usable without an `App` (tests,
    /// embedding).
    fn connect_transport(&self) -> BoxFuture<'static, Result<Self::Transport, BoxError>>;

    /// Where the bus is (host, protocol; never credentials), known before
    /// connecting: the AsyncAPI document (`App::asyncapi`) lists it under
    /// `servers` for a transport registered with [`connect`](Self::connect).
    /// Default: none.
    fn server(&self) -> Option<super::ServerInfo> {
        None
    }

    /// The startup step that connects and registers the transport: pass it
    /// to [`App::on_startup`](crate::App::on_startup). The hook is named
    /// `<name>.connect`.
    fn connect(&self) -> Connect<Self> {
        Connect {
            broker: self.clone(),
        }
    }
}

/// The startup step of a [`TransportBroker`] (from
/// [`TransportBroker::connect`]): a hook for
/// [`App::on_startup`](crate::App::on_startup) that connects, then
/// registers the transport.
#[derive(Clone)]
pub struct Connect<B> {
    broker: B,
}

impl<B: TransportBroker> fmt::Debug for Connect<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("transport", &self.broker.transport_name())
            .finish()
    }
}

impl<B: TransportBroker> Connect<B> {
    /// The broker this step connects.
    pub fn broker(&self) -> &B {
        &self.broker
    }

    /// The hook's name: `<transport name>.connect`.
    pub fn hook_name(&self) -> String {
        format!("{}.connect", self.broker.transport_name())
    }

    /// Connects and checks the transport's name; what the hook runs before
    /// it registers the transport.
    pub async fn open(self) -> Result<B::Transport, ConnectError> {
        let name = self.broker.transport_name().to_owned();
        let transport = self
            .broker
            .connect_transport()
            .await
            .map_err(|source| ConnectError {
                transport: name.clone(),
                source,
            })?;
        if transport.name() != name {
            let got = transport.name().to_owned();
            // Not registered: close what was opened.
            let _ = transport.close().await;
            return Err(ConnectError {
                transport: name,
                source: format!(
                    "the connected transport is named `{got}`; a TransportBroker's \
                     transport must carry the name of transport_name()"
                )
                .into(),
            });
        }
        Ok(transport)
    }
}

/// A transport could not connect at startup; names the transport, with the
/// bus's error as the source.
#[derive(Debug, thiserror::Error)]
#[error("transport `{transport}` could not connect: {source}")]
pub struct ConnectError {
    transport: String,
    #[source]
    source: BoxError,
}

impl ConnectError {
    /// The transport's name.
    pub fn transport(&self) -> &str {
        &self.transport
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::MemoryTransport;

    #[derive(Clone)]
    struct Named(&'static str, &'static str);

    impl TransportBroker for Named {
        type Transport = MemoryTransport;
        fn transport_name(&self) -> &str {
            self.0
        }
        fn connect_transport(&self) -> BoxFuture<'static, Result<MemoryTransport, BoxError>> {
            let inner = self.1;
            Box::pin(async move {
                if inner.is_empty() {
                    Err("bus at nowhere:1 does not answer".into())
                } else {
                    Ok(MemoryTransport::new(inner))
                }
            })
        }
    }

    #[tokio::test]
    async fn open_names_the_transport_in_errors() {
        let c = Named("bus", "").connect();
        assert_eq!(c.hook_name(), "bus.connect");
        let err = c.open().await.err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("transport `bus` could not connect: bus at nowhere:1 does not answer")
        );
        let err = Named("bus", "other").connect().open().await.err();
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("named `other`"), "{err}");
        let ok = Named("bus", "bus").connect().open().await;
        assert!(ok.is_ok_and(|t| t.name() == "bus"));
    }
}
