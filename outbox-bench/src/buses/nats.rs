//! The nats bus for the `bus` scenario: the transport is `outbox-nats` with
//! its defaults (JetStream publish awaiting the PubAck, `Nats-Msg-Id` from
//! the `outbox-id`, one connection shared by all publishes, 30 s publish
//! timeout); the ceiling is a plain async-nats JetStream context doing the
//! same (publish with `Nats-Msg-Id` and the same headers, awaiting each
//! PubAck), with at most `in_flight` acks outstanding. Each destination
//! subject gets its own stream (`BENCH_<subject with '.' as '_'>`, the
//! server's defaults: file storage, 2 min duplicate window).

use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use outbox_nats::NatsBroker;

use super::{CeilingRun, PlainClient, confirm_window};

/// NATS (with JetStream) at one URL.
// Constructed by the `bus` scenario once it is wired.
pub(crate) struct NatsBench {
    url: String,
}

impl NatsBench {
    /// The server at `url` (`nats://127.0.0.1:4222`).
    pub(crate) fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }

    /// The stream that captures `subject`.
    fn stream_name(subject: &str) -> String {
        let s: String = subject
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("BENCH_{s}")
    }

    async fn connect(&self) -> anyhow::Result<jetstream::Context> {
        let client = async_nats::ConnectOptions::new()
            .name("outbox-bench-ceiling")
            .connection_timeout(Duration::from_secs(10))
            .connect(self.url.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {}", self.broker().url()))?;
        Ok(jetstream::ContextBuilder::new()
            .timeout(outbox_nats::DEFAULT_PUBLISH_TIMEOUT)
            .build(client))
    }
}

impl PlainClient for NatsBench {
    type Broker = NatsBroker;

    const NAME: &'static str = outbox_nats::DEFAULT_NAME;

    fn broker(&self) -> NatsBroker {
        NatsBroker::new(self.url.clone()).client_name("outbox-bench")
    }

    async fn prepare_destination(&self, destination: &str) -> anyhow::Result<()> {
        self.broker()
            .ensure_stream(&Self::stream_name(destination), [destination.to_owned()])
            .await?;
        Ok(())
    }

    async fn ceiling_run(
        &self,
        destination: &str,
        n: usize,
        payload: &[u8],
        in_flight: usize,
    ) -> anyhow::Result<CeilingRun> {
        let js = self.connect().await?;
        // Unique ids per run: the stream may hold an earlier run's ids
        // within its duplicate window.
        let run = uuid::Uuid::new_v4().simple().to_string();
        let js = &js;
        confirm_window(n, in_flight, |i| {
            // The transport's headers: content type, outbox id, message
            // id, and the dedup id.
            let id = format!("{run}-{i}");
            let mut headers = HeaderMap::new();
            headers.insert("content-type", "application/octet-stream");
            headers.insert(outbox_core::OUTBOX_ID, id.as_str());
            headers.insert(outbox_nats::MESSAGE_ID_HEADER, id.as_str());
            let msg = PublishMessage::build()
                .payload(payload.to_vec().into())
                .headers(headers)
                .message_id(&id);
            async move {
                let ack = js
                    .send_publish(destination.to_owned(), msg)
                    .await
                    .with_context(|| format!("ceiling publish to {destination}"))?;
                Ok(async move {
                    match ack.await {
                        Ok(a) if !a.duplicate => Ok(()),
                        Ok(a) => bail!("JetStream took a ceiling publish as a duplicate: {a:?}"),
                        Err(e) => bail!("JetStream did not acknowledge a ceiling publish: {e}"),
                    }
                })
            }
        })
        .await
    }

    async fn message_count(&self, destination: &str) -> anyhow::Result<u64> {
        let js = self.connect().await?;
        let name = Self::stream_name(destination);
        let stream = js
            .get_stream(&name)
            .await
            .with_context(|| format!("reading stream {name}"))?;
        Ok(stream.get_info().await?.state.messages)
    }

    async fn delete(&self, destination: &str) {
        let Ok(js) = self.connect().await else {
            return;
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            js.delete_stream(Self::stream_name(destination)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buses::Bus as _;
    use outbox_core::Outgoing;

    /// Against the real server (`NATS_URL`, default `nats://127.0.0.1:4222`):
    /// the ceiling's publishes are all acknowledged and stored, the
    /// transport's too, and the stream is deleted afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ceiling_and_the_transport_publish_to_a_prepared_stream() -> anyhow::Result<()> {
        let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let bench = NatsBench::new(url);
        let dest = format!(
            "bench.test.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        bench
            .prepare(&dest)
            .await
            .context("needs nats-server with JetStream at NATS_URL")?;
        let run = bench.ceiling(&dest, 200, b"payload", 32).await;
        let t = bench.transport().await?;
        let sent = t.publish(Outgoing::new(&dest, b"x".to_vec())).await;
        let count = bench.count(&dest).await;
        bench.cleanup(&dest).await;
        let run = run?;
        assert_eq!(run.confirm_latencies.len(), 200);
        sent.map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(count?, 201);
        assert!(bench.count(&dest).await.is_err(), "the stream was deleted");
        Ok(())
    }
}
