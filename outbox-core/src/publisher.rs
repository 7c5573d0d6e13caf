//! [`OutboxPublisher`]: a publish handle bound to one queue, with default
//! options (faststream-outbox's `OutboxPublisher`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::PgConnection;

use crate::broker::OutboxBroker;
use crate::error::{Error, Result};
use crate::publish::{self, PublishOptions};

/// A publish handle bound to one queue and to default options: what a
/// producer passes around instead of the broker and a queue name
/// (faststream-outbox's `broker.publisher("orders")`).
///
/// Made by [`OutboxBroker::publisher`], which checks the queue name. Cheap to
/// clone. Every publish runs on the caller's connection or transaction
/// (`&mut *tx`), exactly as [`OutboxBroker::publish`] does: the row and its
/// NOTIFY commit or roll back with it.
///
/// Per-call [`PublishOptions`] are merged over the publisher's defaults:
/// headers of both (the per-call value wins on a shared name); the schedule
/// (`activate_in` / `activate_at`), the key and the correlation id of the
/// call where it sets them, else the defaults'; a timer only per call.
///
/// Registered with [`App::publisher`](crate::App::publisher), it is listed in
/// the [AsyncAPI document](crate::App::asyncapi) as a `send` operation on its
/// queue's channel, named by [`title`](Self::title) (default
/// `"<queue>:Publisher"`).
///
/// ```no_run
/// use outbox_core::{OutboxBroker, OutboxPublisher, OutboxTable, PublishOptions};
///
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
/// let outbox = OutboxBroker::new(pool.clone(), OutboxTable::new("outbox")?);
/// let orders: OutboxPublisher = outbox
///     .publisher("orders")?
///     .header("x-source", "checkout")
///     .description("Orders placed at checkout");
///
/// let mut tx = pool.begin().await?;
/// // ... your domain writes on `tx` ...
/// orders.publish(&serde_json::json!({"order_id": 1}), &mut *tx).await?;
/// // Per-call options: merged over the defaults.
/// let urgent = PublishOptions::new().header("x-priority", "high");
/// orders.publish_with(&serde_json::json!({"order_id": 2}), &urgent, &mut *tx).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct OutboxPublisher {
    broker: OutboxBroker,
    queue: Arc<str>,
    defaults: PublishOptions,
    title: Option<String>,
    description: Option<String>,
}

impl fmt::Debug for OutboxPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxPublisher")
            .field("queue", &self.queue)
            .field("defaults", &self.defaults)
            .field("title", &self.title)
            .field("description", &self.description)
            .field("table", &self.broker.table().qualified_name())
            .finish()
    }
}

impl OutboxBroker {
    /// A publisher bound to `queue` (see [`OutboxPublisher`]).
    ///
    /// Fails with [`Error::InvalidArgument`] for an empty queue name or one
    /// longer than [`MAX_NAME_CHARS`](crate::MAX_NAME_CHARS) characters.
    ///
    /// ```
    /// # fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let orders = outbox.publisher("orders")?;
    /// assert_eq!(orders.queue(), "orders");
    /// assert!(outbox.publisher("").is_err());
    /// # Ok(()) }
    /// ```
    pub fn publisher(&self, queue: impl Into<String>) -> Result<OutboxPublisher> {
        let queue: String = queue.into();
        publish::validate_queue(&queue)
            .map_err(|e| Error::arg(format!("OutboxBroker::publisher: {}", error_text(&e))))?;
        Ok(OutboxPublisher {
            broker: self.clone(),
            queue: Arc::from(queue),
            defaults: PublishOptions::new(),
            title: None,
            description: None,
        })
    }
}

/// The message of an argument error, without its variant's prefix.
fn error_text(e: &Error) -> String {
    match e {
        Error::InvalidArgument(m) => m.clone(),
        other => other.to_string(),
    }
}

impl OutboxPublisher {
    /// Adds a default header, sent with every publish unless the call sets
    /// the same name.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.defaults = self.defaults.header(key, value);
        self
    }

    /// Adds several default headers.
    pub fn headers<K, V>(mut self, headers: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.defaults = self.defaults.headers(headers);
        self
    }

    /// Delays every publish by `delay` (on the database clock) unless the
    /// call sets its own `activate_in` or `activate_at`.
    pub fn activate_in(mut self, delay: Duration) -> Self {
        self.defaults = self.defaults.activate_in(delay);
        self
    }

    /// A default ordering key ([`PublishOptions::key`]) for the calls that
    /// set none: every row of this publisher then belongs to one key (an
    /// ordered subscriber handles them one at a time, in commit order).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.defaults = self.defaults.key(key);
        self
    }

    /// The name of the publisher in the AsyncAPI document (default
    /// `"<queue>:Publisher"`).
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// A description for the AsyncAPI document.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The queue the rows go to.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The outbox it publishes through.
    pub fn broker(&self) -> &OutboxBroker {
        &self.broker
    }

    /// The default options (headers, schedule, key).
    pub fn defaults(&self) -> &PublishOptions {
        &self.defaults
    }

    /// The name in the AsyncAPI document: the [`title`](Self::title), else
    /// `"<queue>:Publisher"`.
    pub fn get_title(&self) -> String {
        self.title
            .clone()
            .unwrap_or_else(|| format!("{}:Publisher", self.queue))
    }

    /// The description, if set.
    pub fn get_description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The options of one call: `opts` merged over the defaults (see
    /// [`OutboxPublisher`]).
    pub fn merged(&self, opts: &PublishOptions) -> PublishOptions {
        opts.over(&self.defaults)
    }

    /// Inserts one row into the queue, with the default options, on the
    /// caller's connection or transaction, and returns its id (see
    /// [`OutboxBroker::publish`]).
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        body: &T,
        conn: &mut PgConnection,
    ) -> Result<i64> {
        self.publish_with(body, &PublishOptions::new(), conn)
            .await?
            // Without a timer id the INSERT always returns its row.
            .ok_or(Error::Database(sqlx::Error::RowNotFound))
    }

    /// [`publish`](Self::publish) with per-call options merged over the
    /// defaults. With a `timer_id`, `None` when the publish was a no-op (see
    /// [`OutboxBroker::publish_with`]).
    pub async fn publish_with<T: Serialize + ?Sized>(
        &self,
        body: &T,
        opts: &PublishOptions,
        conn: &mut PgConnection,
    ) -> Result<Option<i64>> {
        self.broker
            .publish_on(body, &self.queue, &self.merged(opts), Some(conn))
            .await
    }

    /// Inserts many rows into the queue in one statement (one NOTIFY), with
    /// the default options, and returns how many (see
    /// [`OutboxBroker::publish_batch`]).
    pub async fn publish_batch<T, I>(&self, bodies: I, conn: &mut PgConnection) -> Result<u64>
    where
        I: IntoIterator<Item = T>,
        T: Serialize,
    {
        self.publish_batch_with(bodies, &PublishOptions::new(), conn)
            .await
    }

    /// [`publish_batch`](Self::publish_batch) with per-call options merged
    /// over the defaults (a `timer_id` or `correlation_id` is an error, as
    /// in [`OutboxBroker::publish_batch_with`]).
    pub async fn publish_batch_with<T, I>(
        &self,
        bodies: I,
        opts: &PublishOptions,
        conn: &mut PgConnection,
    ) -> Result<u64>
    where
        I: IntoIterator<Item = T>,
        T: Serialize,
    {
        self.broker
            .publish_batch_on(bodies, &self.queue, &self.merged(opts), Some(conn))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutboxTable;

    fn broker() -> OutboxBroker {
        let pool = sqlx::PgPool::connect_lazy("postgres://localhost/none").unwrap();
        OutboxBroker::new(pool, OutboxTable::new("outbox").unwrap())
    }

    #[tokio::test]
    async fn the_queue_is_checked_at_construction() {
        let b = broker();
        let err = b.publisher("").unwrap_err().to_string();
        assert!(
            err.contains("OutboxBroker::publisher: queue must be a non-empty string"),
            "{err}"
        );
        let err = b.publisher("q".repeat(256)).unwrap_err().to_string();
        assert!(err.contains("at most 255 characters (got 256)"), "{err}");
        let p = b.publisher("orders").unwrap();
        assert_eq!(p.queue(), "orders");
        assert_eq!(p.get_title(), "orders:Publisher");
        assert_eq!(p.clone().title("Orders").get_title(), "Orders");
        assert!(format!("{p:?}").contains("orders"));
    }

    #[tokio::test]
    async fn per_call_options_win_over_the_defaults() {
        let p = broker()
            .publisher("orders")
            .unwrap()
            .header("a", "default")
            .header("b", "default")
            .activate_in(Duration::from_secs(60))
            .key("k0");
        let m = p.merged(
            &PublishOptions::new()
                .header("b", "call")
                .header("c", "call"),
        );
        let h = m.get_headers();
        assert_eq!(h.get("a").map(String::as_str), Some("default"));
        assert_eq!(h.get("b").map(String::as_str), Some("call"));
        assert_eq!(h.get("c").map(String::as_str), Some("call"));
        assert_eq!(m.get_key(), Some("k0"));
        assert_eq!(
            m,
            PublishOptions::new()
                .header("a", "default")
                .header("b", "call")
                .header("c", "call")
                .activate_in(Duration::from_secs(60))
                .key("k0")
        );
        // A per-call schedule replaces the default one (never both).
        let at = chrono::Utc::now();
        let m = p.merged(&PublishOptions::new().activate_at(at).key("k1"));
        assert_eq!(
            m,
            PublishOptions::new()
                .header("a", "default")
                .header("b", "default")
                .activate_at(at)
                .key("k1")
        );
    }
}
