//! The transport conformance kit (`outbox-conformance`) against the real
//! Redis server (`REDIS_URL`): messages go to streams (the default kind),
//! are read back with `XRANGE` and decoded from FastStream's format; the
//! outage cuts an in-test TCP proxy in front of the server (each check has
//! its own proxy, so no check disturbs another); the size limit is the
//! transport's `max_message_bytes`, set to 1 MiB here.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_conformance::{BusProbe, Cut, Received, Until};
use outbox_core::BoxError;
use outbox_core::transport::BoxFuture;
use outbox_redis::RedisBroker;
use tests::TestDb;
use tests::proxy::TcpProxy;
use tests::redis::{Keys, addr, conn, read_stream, test_redis, unique_key, url_via};

/// The server at `REDIS_URL`, through a proxy the outage check cuts.
struct Redis {
    proxy: TcpProxy,
    keys: Arc<Mutex<Keys>>,
}

impl Redis {
    async fn new() -> Self {
        // Fail loudly (naming REDIS_URL) when the server does not answer.
        drop(conn().await);
        Self {
            proxy: TcpProxy::start(&addr()).await.unwrap(),
            keys: Arc::new(Mutex::new(Keys::new())),
        }
    }
}

impl BusProbe for Redis {
    type Broker = RedisBroker;

    fn broker(&self) -> RedisBroker {
        test_redis(&url_via(&self.proxy.addr().to_string())).max_message_bytes(1024 * 1024)
    }

    fn destination(&self, label: &str) -> BoxFuture<'static, Result<String, BoxError>> {
        let key = unique_key(&format!("conf-{label}"));
        self.keys.lock().unwrap().add(key.clone());
        // Streams are created by the first XADD.
        Box::pin(async move { Ok(format!("stream:{key}")) })
    }

    fn read(
        &self,
        destination: &str,
        done: Until,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<Received>, BoxError>> {
        let key = destination
            .strip_prefix("stream:")
            .unwrap_or(destination)
            .to_owned();
        Box::pin(async move {
            let mut c = conn().await;
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let got: Vec<Received> = read_stream(&mut c, &key)
                    .await?
                    .into_iter()
                    .map(|m| Received {
                        key: m.key,
                        payload: m.payload,
                        headers: m.headers,
                    })
                    .collect();
                if done(&got) || std::time::Instant::now() >= deadline {
                    return Ok(got);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    fn cut(&self) -> BoxFuture<'static, Result<Cut, BoxError>> {
        self.proxy.cut_until_restored()
    }

    fn invalid_destination(&self) -> String {
        "list:".to_owned()
    }

    fn oversized_len(&self) -> usize {
        2 * 1024 * 1024
    }

    fn unreachable_broker(&self) -> Option<RedisBroker> {
        Some(
            RedisBroker::new("redis://relay:hunter2@127.0.0.1:1")
                .connect_timeout(Duration::from_secs(2)),
        )
    }
}

outbox_conformance::conformance_tests! {
    mod redis;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    probe: Redis::new().await,
    outbox: TestDb::new().await.unwrap(),
    unreachable: |err: String| {
        println!("{err}");
        assert!(
            err.contains("redis://relay:***@127.0.0.1:1"),
            "names the URL, password redacted: {err}"
        );
        assert!(!err.contains("hunter2"), "leaks the password: {err}");
    },
}
