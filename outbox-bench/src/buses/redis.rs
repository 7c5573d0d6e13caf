//! The redis bus for the `bus` scenario: the transport is `outbox-redis`
//! with its defaults (one multiplexed connection shared by all publishes,
//! `XADD key * __data__ <FastStream frame>`, no `MAXLEN`, confirmed by the
//! entry id); the ceiling is a plain redis-rs client doing the same: `XADD`
//! of the same FastStream-layout bytes (headers `correlation_id`,
//! `outbox-id`, `message_id` and the payload) on one multiplexed
//! connection, with at most `in_flight` commands outstanding, each
//! confirmed by its reply. Destinations are stream keys (a bare name, or
//! `stream:` / `list:` as the transport reads them; a `channel:` cannot be
//! counted).

use std::time::Duration;

use anyhow::{Context as _, bail};
use outbox_redis::faststream::{DATA_FIELD, encode};
use outbox_redis::{Destination, Kind, RedisBroker};
use redis::aio::MultiplexedConnection;

use super::{CeilingRun, PlainClient, confirm_window};

/// Redis at one URL.
// Constructed by the `bus` scenario once it is wired.
pub(crate) struct RedisBench {
    url: String,
}

impl RedisBench {
    /// The server at `url` (`redis://127.0.0.1:6379`).
    pub(crate) fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }

    async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str())
            .with_context(|| format!("opening Redis at {}", self.broker().url()))?;
        client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to Redis at {}", self.broker().url()))
    }
}

impl PlainClient for RedisBench {
    type Broker = RedisBroker;

    const NAME: &'static str = outbox_redis::DEFAULT_NAME;

    fn broker(&self) -> RedisBroker {
        RedisBroker::new(self.url.clone())
    }

    /// Streams and lists are created by their first write: deletes what a
    /// previous run left under that key.
    async fn prepare_destination(&self, destination: &str) -> anyhow::Result<()> {
        Destination::parse(destination)?;
        self.delete(destination).await;
        Ok(())
    }

    async fn ceiling_run(
        &self,
        destination: &str,
        n: usize,
        payload: &[u8],
        in_flight: usize,
    ) -> anyhow::Result<CeilingRun> {
        let dest = Destination::parse(destination)?;
        let conn = self.connect().await?;
        let (dest, conn) = (&dest, &conn);
        confirm_window(n, in_flight, |i| {
            // The transport's layout: a FastStream frame with the envelope
            // headers, in the stream entry's __data__ field.
            let id = i.to_string();
            let cmd = encode(
                [
                    ("correlation_id", id.as_str()),
                    ("outbox-id", id.as_str()),
                    ("message_id", id.as_str()),
                ],
                payload,
            )
            .map(|frame| match dest.kind() {
                Kind::List => {
                    let mut c = redis::cmd("RPUSH");
                    c.arg(dest.name()).arg(frame);
                    c
                }
                _ => {
                    let mut c = redis::cmd("XADD");
                    c.arg(dest.name()).arg("*").arg(DATA_FIELD).arg(frame);
                    c
                }
            });
            let mut conn = conn.clone();
            async move {
                let cmd = cmd?;
                // Sent when the confirmation is awaited: one command in
                // flight per outstanding reply.
                Ok(async move {
                    cmd.query_async::<redis::Value>(&mut conn)
                        .await
                        .context("Redis did not confirm a ceiling publish")?;
                    Ok(())
                })
            }
        })
        .await
    }

    async fn message_count(&self, destination: &str) -> anyhow::Result<u64> {
        let dest = Destination::parse(destination)?;
        let command = match dest.kind() {
            Kind::Stream => "XLEN",
            Kind::List => "LLEN",
            _ => bail!("messages on a Redis channel cannot be counted ({destination})"),
        };
        let mut conn = self.connect().await?;
        redis::cmd(command)
            .arg(dest.name())
            .query_async(&mut conn)
            .await
            .with_context(|| format!("{command} {}", dest.name()))
    }

    async fn delete(&self, destination: &str) {
        let Ok(dest) = Destination::parse(destination) else {
            return;
        };
        if dest.kind() == Kind::Channel {
            return;
        }
        let Ok(mut conn) = self.connect().await else {
            return;
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            redis::cmd("DEL")
                .arg(dest.name())
                .query_async::<i64>(&mut conn),
        )
        .await;
    }
}
