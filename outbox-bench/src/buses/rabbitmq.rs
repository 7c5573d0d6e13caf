//! The rabbitmq bus for the `bus` scenario: the transport is
//! `outbox-rabbitmq` with its defaults (confirm channel, `mandatory`,
//! persistent, one connection and channel shared by all publishes); the
//! ceiling is a plain lapin client doing the same (one confirm channel,
//! `mandatory`, `delivery_mode = 2`, the same properties), with at most
//! `in_flight` publisher confirms outstanding. Destinations are durable
//! queues reached through the default exchange.

use std::time::Duration;

use anyhow::{Context as _, bail};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use outbox_rabbitmq::RabbitBroker;

use super::{CeilingRun, PlainClient, confirm_window};

/// RabbitMQ at one AMQP URL.
// Constructed by the `bus` scenario once it is wired.
pub(crate) struct RabbitBench {
    url: String,
}

impl RabbitBench {
    /// The broker at `url` (`amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub(crate) fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        let props =
            ConnectionProperties::default().with_connection_name("outbox-bench-ceiling".into());
        Connection::connect(&self.url, props)
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", self.broker().url()))
    }
}

impl PlainClient for RabbitBench {
    type Broker = RabbitBroker;

    const NAME: &'static str = outbox_rabbitmq::DEFAULT_NAME;

    fn broker(&self) -> RabbitBroker {
        RabbitBroker::new(self.url.clone()).connection_name("outbox-bench")
    }

    async fn prepare_destination(&self, destination: &str) -> anyhow::Result<()> {
        self.broker().ensure_queue(destination).await?;
        Ok(())
    }

    async fn ceiling_run(
        &self,
        destination: &str,
        n: usize,
        payload: &[u8],
        in_flight: usize,
    ) -> anyhow::Result<CeilingRun> {
        let conn = self.connect().await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let channel = &channel;
        let run = confirm_window(n, in_flight, |i| {
            // The transport's properties: content type, message id,
            // persistent.
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/octet-stream".into())
                .with_message_id(i.to_string().into());
            async move {
                let confirm = channel
                    .basic_publish("".into(), destination.into(), options, payload, props)
                    .await?;
                Ok(async move {
                    match confirm.await? {
                        Confirmation::Ack(None) => Ok(()),
                        other => bail!("RabbitMQ did not confirm a ceiling publish: {other:?}"),
                    }
                })
            }
        })
        .await;
        // The channel first: closing a connection with a channel open makes
        // lapin log an ERROR.
        let _ = channel.close(200, "ceiling done".into()).await;
        let _ = conn.close(200, "ceiling done".into()).await;
        run
    }

    async fn message_count(&self, destination: &str) -> anyhow::Result<u64> {
        let conn = self.connect().await?;
        let channel = conn.create_channel().await?;
        let q = channel
            .queue_declare(
                destination.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("reading the length of queue {destination}"))?;
        let _ = channel.close(200, "counted".into()).await;
        let _ = conn.close(200, "counted".into()).await;
        Ok(u64::from(q.message_count()))
    }

    async fn delete(&self, destination: &str) {
        let Ok(conn) = self.connect().await else {
            return;
        };
        if let Ok(channel) = conn.create_channel().await {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                channel.queue_delete(destination.into(), QueueDeleteOptions::default()),
            )
            .await;
            let _ = channel.close(200, "cleaned up".into()).await;
        }
        let _ = conn.close(200, "cleaned up".into()).await;
    }
}
