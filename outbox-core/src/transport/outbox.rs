//! [`OutboxTransport`]: handler results become new outbox rows (queue chaining).
//!
//! When the transport's table lives in the database of the subscriber whose
//! handler produced the result ([`same_database`]), the row is not written
//! here: it is prepared and staged on the delivery ([`Chain`], a task-local
//! the engine sets around each handler), and the engine inserts it in the
//! transaction that deletes the inbound row (see the engine's `chain`
//! module). Otherwise it is inserted at once on a connection of its own.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

use super::headers::OUTBOX_ID;
use super::{Outgoing, Transport};
use crate::broker::{Backend, OutboxBroker};
use crate::envelope::Raw;
use crate::error::{BoxError, Error};
use crate::publish::{self, PublishOptions, validate_queue};
use crate::store::producer::{Insert, TimerConflict};

/// The default name of an [`OutboxTransport`].
pub const OUTBOX_TRANSPORT: &str = "outbox";

/// A transport that publishes each result as a new row of an outbox, so one
/// handler's output is the next queue's input (faststream-outbox's
/// `OutboxResponse`, as a `#[publish_to]` target).
///
/// The row keeps the result's encoding (its `content-type`), the correlation
/// id and the other headers the runtime assembled, except `outbox-id` (the
/// new row has its own id); the message key (the response's, else the
/// inbound row's) becomes the new row's ordering key. Destinations are queue
/// names, checked when the `App` starts.
///
/// **Exactly once.** When the transport's table is in the same database as
/// the subscriber's (its broker uses the same in-memory store, or its pool
/// connects to the same host, port, database and user, as with
/// `OutboxTransport::new(app_broker.clone())` or a broker on another table or
/// schema of the same pool), the follow-on row is written in the
/// transaction that deletes the inbound row: with
/// [`ClaimMode::Lease`](crate::ClaimMode::Lease), `INSERT` the follow-on
/// rows, then `DELETE` the inbound row guarded by its lease token, then
/// `COMMIT` (a lease lost meanwhile rolls the inserts back); with
/// [`ClaimMode::Transaction`](crate::ClaimMode::Transaction), the inserts go
/// into the lot's transaction, which holds the inbound row's lock. A crash,
/// a killed connection or a lost lease at any point leaves either both
/// writes or neither: the follow-on row exists exactly once per handled
/// inbound row. A retry or dead-letter outcome writes no follow-on row.
/// Such follow-on rows wake the relays with a NOTIFY, as a publish does.
/// Rows the database refuses (a missing table, a permission) are rolled
/// back with the ack and the delivery fails as a refused publish would
/// ([`Error::Transport`](crate::Error::Transport) naming this transport and
/// the queue; the retry strategy, then the dead-letter table); in a
/// transaction-mode lot, only that delivery fails.
///
/// A table in **another database** (a pool to another server or database,
/// or with other credentials) cannot share that transaction: the row is
/// inserted on its own connection before the inbound row is acked, so a
/// relay that dies between the two, or loses its lease, writes it twice (at
/// least once, like every other transport).
///
/// The response can delay the follow-on row or make it a timer
/// ([`Response::activate_in`](crate::Response::activate_in),
/// [`activate_at`](crate::Response::activate_at),
/// [`timer_id`](crate::Response::timer_id),
/// [`timer_conflict`](crate::Response::timer_conflict)), with the rules of
/// [`PublishOptions`]; delays are measured on the database clock, from the
/// start of the transaction that writes the row.
///
/// ```no_run
/// use std::time::Duration;
/// use outbox_core::{publish_to, subscriber, App, OutboxBroker, OutboxTransport, Response};
///
/// #[publish_to(outbox, "invoices")]
/// #[subscriber("orders")]
/// async fn bill(order_id: i64) -> i64 {
///     order_id * 100 // becomes a row of queue "invoices"
/// }
///
/// #[publish_to(outbox, "reminders")]
/// #[subscriber("invoices")]
/// async fn send(invoice: i64) -> Response<i64> {
///     println!("invoice {invoice}");
///     // A reminder in 7 days, at most one per invoice.
///     Response::new(invoice)
///         .activate_in(Duration::from_secs(7 * 24 * 3600))
///         .timer_id(format!("remind-{invoice}"))
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
        let name = self.name.clone();
        // The delivery this result belongs to, if its table shares our
        // database: then the row is staged, not written.
        let chain = CHAIN
            .try_with(Arc::clone)
            .ok()
            .filter(|c| same_database(&c.home, &broker));
        Box::pin(async move {
            let Outgoing {
                destination,
                payload,
                mut headers,
                key,
                follow_on,
                ..
            } = msg;
            headers.remove(OUTBOX_ID);
            let mut opts = follow_on.apply(PublishOptions::new().headers(headers));
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
            if let Some(chain) = chain {
                let insert = publish::prepare(&Raw(payload), &destination, &opts)?;
                chain.stage(Staged {
                    transport: name,
                    broker,
                    insert,
                });
                return Ok(());
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

    fn takes_follow_on(&self, _: super::Sealed) -> bool {
        true
    }
}

/// The outbox-only options of a handler's result: when the follow-on row
/// becomes due, and its timer. Set with `Response::activate_in` and its
/// siblings, carried by [`Outgoing`] to the transport; only an
/// [`OutboxTransport`] takes them (the App refuses to send a result that
/// has any to another transport).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FollowOn {
    pub(crate) activate_in: Option<Duration>,
    pub(crate) activate_at: Option<DateTime<Utc>>,
    pub(crate) timer_id: Option<String>,
    pub(crate) timer_conflict: TimerConflict,
}

impl FollowOn {
    /// The names of the options that are set (`activate_in`, …), empty when
    /// none is.
    pub(crate) fn set_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.activate_in.is_some() {
            names.push("activate_in");
        }
        if self.activate_at.is_some() {
            names.push("activate_at");
        }
        if self.timer_id.is_some() {
            names.push("timer_id");
        }
        if self.timer_conflict != TimerConflict::Ignore {
            names.push("timer_conflict");
        }
        names
    }

    /// Checks the options as a publish would (at most one of `activate_in`
    /// / `activate_at`; a `timer_conflict` needs a `timer_id`; the timer
    /// id's length), so a bad response fails where it is built.
    pub(crate) fn validate(&self) -> crate::error::Result<()> {
        publish::prepare(&Raw(Vec::new()), "q", &self.apply(PublishOptions::new())).map(drop)
    }

    /// `opts` with these options.
    fn apply(&self, mut opts: PublishOptions) -> PublishOptions {
        if let Some(d) = self.activate_in {
            opts = opts.activate_in(d);
        }
        if let Some(at) = self.activate_at {
            opts = opts.activate_at(at);
        }
        if let Some(id) = &self.timer_id {
            opts = opts.timer_id(id.clone());
        }
        opts.timer_conflict(self.timer_conflict)
    }
}

/// A follow-on row prepared by an [`OutboxTransport`] and staged on the
/// delivery, for the engine to insert with the inbound row's ack.
#[derive(Debug, Clone)]
pub(crate) struct Staged {
    /// The transport's name (for the error when the row is refused).
    pub(crate) transport: String,
    /// The transport's broker (its table, statements and NOTIFY channel).
    pub(crate) broker: OutboxBroker,
    /// The validated, encoded row.
    pub(crate) insert: Insert,
}

/// The follow-on rows staged while one delivery's handler runs.
#[derive(Debug)]
pub(crate) struct Chain {
    /// The subscriber's broker: rows of a table in its database are staged.
    home: OutboxBroker,
    staged: Mutex<Vec<Staged>>,
}

impl Chain {
    /// An empty chain for a delivery of `home`'s subscriber.
    pub(crate) fn new(home: OutboxBroker) -> Arc<Self> {
        Arc::new(Self {
            home,
            staged: Mutex::new(Vec::new()),
        })
    }

    fn stage(&self, s: Staged) {
        self.lock().push(s);
    }

    /// The staged rows, in the order the transports were called (leaves
    /// none).
    pub(crate) fn take(&self) -> Vec<Staged> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Staged>> {
        self.staged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

tokio::task_local! {
    /// The chain of the delivery whose handler runs in this task.
    static CHAIN: Arc<Chain>;
}

/// Runs `f` (a delivery's handler, with the publishes of its result) with
/// `chain` as the delivery's chain: an [`OutboxTransport`] on the same
/// database called meanwhile, in this task, stages its row there.
pub(crate) async fn scope<F: Future>(chain: Arc<Chain>, f: F) -> F::Output {
    CHAIN.scope(chain, f).await
}

/// Whether a transaction on `a`'s database can write `b`'s table: the same
/// in-process store, or pools that connect to the same server (host and
/// port, or socket), database and user. Anything else (another server,
/// another database, other credentials, or a host spelled differently) is
/// treated as another database: safe, only not exactly once.
pub(crate) fn same_database(a: &OutboxBroker, b: &OutboxBroker) -> bool {
    match (a.backend(), b.backend()) {
        (Backend::Local(x), Backend::Local(y)) => std::ptr::addr_eq(Arc::as_ptr(x), Arc::as_ptr(y)),
        (Backend::Postgres(x), Backend::Postgres(y)) => {
            let (x, y) = (x.connect_options(), y.connect_options());
            x.get_host() == y.get_host()
                && x.get_port() == y.get_port()
                && x.get_socket() == y.get_socket()
                && x.get_database() == y.get_database()
                && x.get_username() == y.get_username()
        }
        _ => false,
    }
}
