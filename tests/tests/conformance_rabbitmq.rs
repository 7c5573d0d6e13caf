//! The transport conformance kit (`outbox-conformance`) against the real
//! RabbitMQ (`RABBITMQ_URL`): the transport connects through an in-test
//! TCP proxy (the outage is the proxy's cut, so the shared broker is never
//! touched and the checks run in parallel); messages are read back from
//! their queue with lapin (unacknowledged, so the queue keeps them); the
//! destination is a plain queue name (the default exchange); the size limit
//! is the transport's `max_message_bytes`, set to 1 MiB here (the broker's
//! own `max_message_size` refusal is tested in `tests/tests/rabbitmq.rs`).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outbox_conformance::{BusProbe, Cut, Received, Until};
use outbox_core::BoxError;
use outbox_core::transport::BoxFuture;
use outbox_rabbitmq::RabbitBroker;
use tests::TestDb;
use tests::proxy::TcpProxy;
use tests::rabbitmq::{Msg, declare_queue, proxy, read_queue, test_rabbit, unique};

/// The size limit of the transport under test.
const LIMIT: usize = 1024 * 1024;

/// The broker at `RABBITMQ_URL`, behind a proxy of this probe's own.
struct Rabbit {
    proxy: TcpProxy,
    via: String,
}

impl Rabbit {
    async fn new() -> Self {
        let (proxy, via) = proxy().await.unwrap();
        Self { proxy, via }
    }
}

fn received(m: &Msg) -> Received {
    Received {
        key: m.key.clone(),
        payload: m.payload.clone(),
        headers: m.headers.clone(),
    }
}

impl BusProbe for Rabbit {
    type Broker = RabbitBroker;

    fn broker(&self) -> RabbitBroker {
        test_rabbit(&self.via).max_message_bytes(Some(LIMIT))
    }

    fn destination(&self, label: &str) -> BoxFuture<'static, Result<String, BoxError>> {
        let queue = unique(&format!("conf.{label}"));
        Box::pin(async move {
            declare_queue(&queue).await?;
            Ok(queue)
        })
    }

    fn read(
        &self,
        destination: &str,
        done: Until,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<Received>, BoxError>> {
        let queue = destination.to_owned();
        Box::pin(async move {
            let got = read_queue(&queue, timeout, |msgs| {
                done(&msgs.iter().map(received).collect::<Vec<_>>())
            })
            .await?;
            Ok(got.iter().map(received).collect())
        })
    }

    fn cut(&self) -> BoxFuture<'static, Result<Cut, BoxError>> {
        self.proxy.cut_until_restored()
    }

    fn invalid_destination(&self) -> String {
        "not an exchange!/orders".to_owned()
    }

    fn oversized_len(&self) -> usize {
        LIMIT + 1
    }

    fn unreachable_broker(&self) -> Option<RabbitBroker> {
        Some(
            RabbitBroker::new("amqp://guest:hunter2@127.0.0.1:1/%2f")
                .connect_timeout(Duration::from_secs(2)),
        )
    }
}

outbox_conformance::conformance_tests! {
    mod rabbitmq;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    probe: Rabbit::new().await,
    outbox: TestDb::new().await.unwrap(),
    unreachable: |err: String| {
        assert!(
            err.contains("amqp://guest:***@127.0.0.1:1/%2f"),
            "names the URL, password redacted: {err}"
        );
        assert!(!err.contains("hunter2"), "leaks the password: {err}");
    },
}
