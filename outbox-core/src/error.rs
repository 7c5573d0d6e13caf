//! The crate's error types. A leaf: it depends on no other module of the
//! crate (every layer reports through it).

use std::fmt;

/// A boxed error, as handlers, transports and hooks return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`enum@Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `outbox-core`.
///
/// The variants name the problem and, where there is one, the fix. Match on the
/// variant to tell misconfiguration (a bug to fix: [`Error::InvalidName`],
/// [`Error::InvalidArgument`], [`Error::InvalidConfig`]) from runtime failures
/// ([`Error::Database`], [`Error::Transport`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A table, schema or index name cannot be used (empty, too long once a
    /// suffix is added, or containing a NUL byte). Raised when the table
    /// definition is built, never later as a SQL error.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// What the name is for (`table`, `schema`, `dead-letter table`).
        kind: &'static str,
        /// The name as given.
        name: String,
        /// Why it was refused and what to do.
        reason: String,
    },

    /// An argument of a publish, cancel or inspection call is invalid
    /// (empty queue, both activation times set, `Extend` without a timer id…).
    /// Raised before any SQL runs.
    #[error("{0}")]
    InvalidArgument(String),

    /// A subscriber, engine or application is misconfigured (bad knob values,
    /// duplicate names, unknown transport…). Raised before anything is consumed.
    #[error("{0}")]
    InvalidConfig(String),

    /// The message body could not be serialized to JSON.
    #[error("cannot serialize the message body: {0}")]
    Encode(#[source] serde_json::Error),

    /// A payload could not be decoded into the type the handler asked for.
    #[error(transparent)]
    Decode(#[from] DecodeError),

    /// The database refused or failed a statement, or the connection broke.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// A transport (Kafka, the in-process transport, …) did not confirm a
    /// publish. The transport's own error is the source: a retry strategy can
    /// downcast it (e.g. to `outbox_kafka::Error` and its `is_retryable()`).
    #[error("transport `{transport}` could not publish to {destination:?}: {source}")]
    Transport {
        /// The transport's registered name.
        transport: String,
        /// The destination (topic, exchange, subject…).
        destination: String,
        /// What the transport reported.
        #[source]
        source: BoxError,
    },

    /// A lifecycle hook of an application failed.
    #[error("{stage} hook `{name}` failed: {source}")]
    Hook {
        /// `on_startup`, `after_startup`, `on_shutdown`, `after_shutdown`,
        /// or `service` (an [`App::service`](crate::App::service)).
        stage: &'static str,
        /// The hook's name.
        name: String,
        /// The hook's error.
        #[source]
        source: BoxError,
    },

    /// The live outbox (or dead-letter) table differs from what the engine
    /// needs; the value lists every problem and the DDL that fixes them.
    #[error("{0}")]
    SchemaDrift(SchemaDrift),

    /// An operation did not finish within its time budget.
    #[error("{0} timed out")]
    Timeout(String),

    /// The outbox's source identity could not be read from PostgreSQL at
    /// startup (the connection failed, or even the fallback statement was
    /// refused). `App::run` needs it before relaying: transports combine it
    /// with the outbox id into bus-side deduplication ids. It retries a
    /// connection failure until the database answers or shutdown is
    /// requested (then returns this).
    #[error(
        "cannot read this outbox's source identity from PostgreSQL (needed before relaying, for \
         bus-side deduplication ids such as NATS Nats-Msg-Id): {0}; check that the database is \
         reachable, or set the identity yourself with OutboxBroker::source_id(\"orders-service\")"
    )]
    SourceIdentity(#[source] sqlx::Error),

    /// The broker's storage backend cannot run this operation (for example
    /// `validate_schema` on the in-memory store of the test harness, which
    /// has no schema). Run it against PostgreSQL.
    #[error("{operation} is not supported by {backend}; run it against PostgreSQL")]
    Unsupported {
        /// The operation, as its method is named (`validate_schema`, `stats`, …).
        operation: &'static str,
        /// The backend that refused it (`the in-memory store`).
        backend: &'static str,
    },
}

impl Error {
    /// True for errors that come from a bad argument or configuration (fix the
    /// code), false for runtime failures (retrying may help).
    pub fn is_misuse(&self) -> bool {
        matches!(
            self,
            Error::InvalidName { .. }
                | Error::InvalidArgument(_)
                | Error::InvalidConfig(_)
                | Error::Unsupported { .. }
        )
    }

    /// The underlying database error, if this is one.
    pub fn as_database_error(&self) -> Option<&sqlx::Error> {
        match self {
            Error::Database(e) | Error::SourceIdentity(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn arg(msg: impl fmt::Display) -> Self {
        Error::InvalidArgument(msg.to_string())
    }

    pub(crate) fn unsupported(operation: &'static str, backend: &'static str) -> Self {
        Error::Unsupported { operation, backend }
    }

    pub(crate) fn config(msg: impl fmt::Display) -> Self {
        Error::InvalidConfig(msg.to_string())
    }
}

/// A payload that does not decode into the requested type.
///
/// The message says which row, which queue, which content type and what the
/// decoder expected, then why in plain words, so that a poison row can be
/// found and fixed:
///
/// ```text
/// cannot decode the payload of row 42 (queue "orders", content-type application/json) as `i64`: number 1e20 does not fit in i64
/// cannot decode the payload of row 43 (queue "orders", content-type application/json) as `i64`: not valid JSON: key must be a string at line 1 column 2
/// cannot decode the payload of row 44 (queue "orders", no content-type) as `app::Order`: JSON does not match the expected type: missing field `id` at line 1 column 2
/// ```
///
/// The reasons are those of [`envelope::decode`](crate::envelope::decode).
#[derive(Debug)]
pub struct DecodeError {
    /// `row` or `dead letter`.
    pub(crate) what: &'static str,
    pub(crate) row_id: i64,
    pub(crate) queue: String,
    pub(crate) content_type: Option<String>,
    pub(crate) target: &'static str,
    pub(crate) reason: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot decode the payload of {} {} (queue {:?}, ",
            self.what, self.row_id, self.queue
        )?;
        match &self.content_type {
            Some(ct) => write!(f, "content-type {ct}")?,
            None => f.write_str("no content-type")?,
        }
        write!(f, ") as `{}`: {}", self.target, self.reason)
    }
}

impl std::error::Error for DecodeError {}

impl DecodeError {
    /// The id of the row (or dead letter) whose payload did not decode.
    ///
    /// ```
    /// fn log(e: &outbox_core::DecodeError) {
    ///     eprintln!("poison row {} in queue {}", e.row_id(), e.queue());
    /// }
    /// ```
    pub fn row_id(&self) -> i64 {
        self.row_id
    }

    /// The queue of the row.
    ///
    /// ```
    /// fn is_orders(e: &outbox_core::DecodeError) -> bool {
    ///     e.queue() == "orders"
    /// }
    /// ```
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The row's `content-type` header, if it has one.
    ///
    /// ```
    /// fn was_json(e: &outbox_core::DecodeError) -> bool {
    ///     e.content_type() == Some("application/json")
    /// }
    /// ```
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The type the payload was to be decoded into, as
    /// [`std::any::type_name`] spells it (`i64`, `my_app::Order`).
    ///
    /// ```
    /// fn wanted_i64(e: &outbox_core::DecodeError) -> bool {
    ///     e.expected_type() == "i64"
    /// }
    /// ```
    pub fn expected_type(&self) -> &str {
        self.target
    }

    /// Why decoding failed, in plain words (`number 1e20 does not fit in
    /// i64`, `not valid JSON: …`); the [`Display`](fmt::Display) of the error
    /// adds the row, queue, content type and expected type.
    ///
    /// ```
    /// fn reason_only(e: &outbox_core::DecodeError) -> String {
    ///     e.reason().to_owned()
    /// }
    /// ```
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Everything that differs between the live schema and what the engine needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaDrift {
    /// One plain-words line per problem.
    pub problems: Vec<String>,
    /// DDL that fixes them (review it before running it).
    pub fix: String,
}

impl fmt::Display for SchemaDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "outbox schema mismatch:")?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        write!(
            f,
            "fix (review, then run it or put it in a migration):\n{}",
            self.fix
        )
    }
}

/// A handler panic, turned into an error (the engine catches it; the
/// metrics label it `error_kind="panic"`).
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
pub(crate) struct HandlerPanic(pub(crate) String);

/// How the engine renders an error for its logs and for `last_exception`:
/// the error's text, then each source whose text the line does not already
/// end with, `": "`-separated (so an error that prints its source is not
/// repeated). Useful in an
/// [`OutboxBroker::last_exception_renderer`](crate::OutboxBroker::last_exception_renderer)
/// that redacts some errors and renders the rest as the engine would.
///
/// ```
/// #[derive(Debug, thiserror::Error)]
/// #[error("write failed")]
/// struct Outer(#[source] std::io::Error);
///
/// let e = Outer(std::io::Error::other("disk on fire"));
/// assert_eq!(outbox_core::render_error_chain(&e), "write failed: disk on fire");
/// ```
pub fn render_error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
