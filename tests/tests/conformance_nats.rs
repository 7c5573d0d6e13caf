//! The transport conformance kit (`outbox-conformance`) against the real
//! nats-server with JetStream (`NATS_URL`). The transport connects through
//! an in-test TCP proxy (`tests::proxy::TcpProxy`), so the outage check cuts
//! only this probe's connections, never the shared server. Each destination
//! is a fresh subject with its own stream (deleted when the probe drops);
//! messages are read back from the stream by sequence, headers mapped back
//! to `docs/transports.md`'s names (`outbox-key` -> the key; `Nats-Msg-Id`
//! and `message_id`, both derived from `outbox-id`, dropped). The size limit
//! is the server's `max_payload` (1 MiB by default).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outbox_conformance::{BusProbe, Cut, Received, Until};
use outbox_core::BoxError;
use outbox_core::transport::BoxFuture;
use outbox_nats::{KEY_HEADER, MESSAGE_ID_HEADER, NATS_MSG_ID, NatsBroker};
use tests::TestDb;
use tests::nats::{self as support, Streams};
use tests::proxy::TcpProxy;

struct Nats {
    proxy: TcpProxy,
    streams: Arc<Streams>,
}

impl Nats {
    async fn new() -> Self {
        // Fails loudly when the server does not answer.
        drop(support::connect().await);
        Self {
            proxy: TcpProxy::start(&support::addr()).await.unwrap(),
            streams: Arc::new(Streams::default()),
        }
    }
}

/// A stored message as the kit compares it.
fn received(m: &support::StoredMsg) -> Received {
    let mut headers = m.headers.clone();
    let key = headers.remove(KEY_HEADER).map(String::into_bytes);
    headers.remove(NATS_MSG_ID);
    headers.remove(MESSAGE_ID_HEADER);
    Received {
        key,
        payload: m.payload.clone(),
        headers,
    }
}

impl BusProbe for Nats {
    type Broker = NatsBroker;

    fn broker(&self) -> NatsBroker {
        NatsBroker::new(format!("nats://{}", self.proxy.addr()))
            .publish_timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
    }

    fn destination(&self, label: &str) -> BoxFuture<'static, Result<String, BoxError>> {
        let (stream, subject) = support::unique(&format!("conf_{label}"));
        let streams = self.streams.clone();
        Box::pin(async move {
            support::create_stream(&stream, &[&subject], None).await?;
            streams.add(&stream);
            Ok(subject)
        })
    }

    fn read(
        &self,
        destination: &str,
        done: Until,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<Received>, BoxError>> {
        // unique() puts the suffix last: T_<LABEL>_<suffix> for t.<label>.<suffix>.
        let subject = destination.to_owned();
        Box::pin(async move {
            let js = support::js().await;
            let stream = js
                .stream_by_subject(&subject)
                .await
                .map_err(|e| format!("no stream for {subject}: {e}"))?;
            let msgs = support::read_stream(&stream, timeout, |got| {
                done(&got.iter().map(received).collect::<Vec<_>>())
            })
            .await?;
            Ok(msgs.iter().map(received).collect())
        })
    }

    fn cut(&self) -> BoxFuture<'static, Result<Cut, BoxError>> {
        self.proxy.cut_until_restored()
    }

    fn invalid_destination(&self) -> String {
        "orders.*".to_owned()
    }

    fn oversized_len(&self) -> usize {
        2_000_000
    }

    fn unreachable_broker(&self) -> Option<NatsBroker> {
        Some(NatsBroker::new("nats://127.0.0.1:1").connect_timeout(Duration::from_secs(2)))
    }
}

outbox_conformance::conformance_tests! {
    mod nats;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    probe: Nats::new().await,
    outbox: TestDb::new().await.unwrap(),
    unreachable: |err: String| assert!(err.contains("127.0.0.1:1"), "names the server URL: {err}"),
}
