//! [`OutboxTransport`]: handler results become new outbox rows (queue chaining).

use futures_util::future::BoxFuture;

use super::headers::OUTBOX_ID;
use super::{Outgoing, Transport};
use crate::broker::OutboxBroker;
use crate::envelope::Raw;
use crate::error::{BoxError, Error};
use crate::publish::{PublishOptions, validate_queue};

/// The default name of an [`OutboxTransport`].
pub const OUTBOX_TRANSPORT: &str = "outbox";

/// A transport that publishes each result as a new row of an outbox, so one
/// handler's output is the next queue's input (faststream-outbox's
/// `OutboxResponse`, as a `#[publish_to]` target).
///
/// The row keeps the result's encoding (its `content-type`), the correlation
/// id and the other headers the runtime assembled, except `outbox-id` (the
/// new row has its own id); a response key is not stored (the outbox has no
/// partitions). The insert commits on its own connection before the inbound
/// row is acked: if the relay dies between the two, the inbound row is
/// handled again and the follow-on row is written twice (at least once, like
/// every transport). Destinations are queue names, checked when the `App`
/// starts.
///
/// ```no_run
/// use outbox_core::{publish_to, subscriber, App, OutboxBroker, OutboxTransport};
///
/// #[publish_to(outbox, "invoices")]
/// #[subscriber("orders")]
/// async fn bill(order_id: i64) -> i64 {
///     order_id * 100 // becomes a row of queue "invoices"
/// }
///
/// #[subscriber("invoices")]
/// async fn send(invoice: i64) {
///     println!("invoice {invoice}");
/// }
///
/// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
/// App::new(outbox.clone())
///     .transport(OutboxTransport::new(outbox)) // or App::outbox_transport()
///     .run()
///     .await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct OutboxTransport {
    name: String,
    broker: OutboxBroker,
}

impl OutboxTransport {
    /// A transport named `outbox` that writes into `broker`'s table (usually
    /// the App's own broker; another one chains into another table).
    pub fn new(broker: OutboxBroker) -> Self {
        Self {
            name: OUTBOX_TRANSPORT.to_owned(),
            broker,
        }
    }

    /// Registers the transport under another name (two outboxes in one App):
    /// `#[publish_to(name, "queue")]`.
    ///
    /// ```
    /// use outbox_core::{OutboxBroker, OutboxTable, OutboxTransport, Transport};
    ///
    /// # fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
    /// let billing = OutboxBroker::new(pool, OutboxTable::new("outbox")?.schema("billing")?);
    /// let t = OutboxTransport::new(billing).named("billing");
    /// assert_eq!(Transport::name(&t), "billing");
    /// # Ok(()) }
    /// ```
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl Transport for OutboxTransport {
    fn name(&self) -> &str {
        &self.name
    }

    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let broker = self.broker.clone();
        Box::pin(async move {
            let Outgoing {
                destination,
                payload,
                mut headers,
                key,
                ..
            } = msg;
            headers.remove(OUTBOX_ID);
            let mut opts = PublishOptions::new().headers(headers);
            // The key carries on as the follow-on row's ordering key.
            if let Some(key) = key {
                let key = String::from_utf8(key).map_err(|_| {
                    Error::arg(
                        "the message key is not UTF-8 text; an outbox row's ordering key \
                         must be (set a text key with Response::key)",
                    )
                })?;
                opts = opts.key(key);
            }
            broker
                .on_own_conn(async |conn| {
                    broker
                        .publish_on(&Raw(payload), &destination, &opts, conn)
                        .await
                })
                .await?;
            Ok(())
        })
    }

    fn check_destination(&self, destination: &str) -> Result<(), String> {
        validate_queue(destination).map_err(|e| e.to_string())
    }
}
