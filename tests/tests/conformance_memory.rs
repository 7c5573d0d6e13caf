//! The transport conformance kit (`outbox-conformance`) against the
//! in-process `MemoryTransport`: outages are `set_down`, the size limit is
//! `max_message_bytes`, destinations are checked by a rule.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use outbox_conformance::{BusProbe, Cut, Received, Until};
use outbox_core::BoxError;
use outbox_core::MemoryTransport;
use outbox_core::transport::BoxFuture;
use tests::TestDb;

/// The bus: one `MemoryTransport` whose clones share what it recorded.
struct Memory(MemoryTransport);

const LIMIT: usize = 64 * 1024;

impl Memory {
    fn new() -> Self {
        let t = MemoryTransport::new("memory")
            .max_message_bytes(LIMIT)
            .check_destinations_with(|d| {
                if d.is_empty() || d.contains(' ') {
                    Err(format!(
                        "`{d}` is not a destination name (empty, or with a space)"
                    ))
                } else {
                    Ok(())
                }
            });
        Self(t)
    }
}

impl BusProbe for Memory {
    type Broker = MemoryTransport;

    fn broker(&self) -> MemoryTransport {
        self.0.clone()
    }

    fn destination(&self, label: &str) -> BoxFuture<'static, Result<String, BoxError>> {
        let d = format!("conf.{label}.{}", tests::suffix());
        Box::pin(async move { Ok(d) })
    }

    fn read(
        &self,
        destination: &str,
        done: Until,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<Received>, BoxError>> {
        let (t, dest) = (self.0.clone(), destination.to_owned());
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            loop {
                let got: Vec<Received> = t
                    .messages_to(&dest)
                    .into_iter()
                    .map(|m| Received {
                        key: m.key,
                        payload: m.payload,
                        headers: m.headers.into_iter().collect(),
                    })
                    .collect();
                if done(&got) || Instant::now() >= deadline {
                    return Ok(got);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    fn cut(&self) -> BoxFuture<'static, Result<Cut, BoxError>> {
        let t = self.0.clone();
        Box::pin(async move {
            t.set_down(true);
            Ok(Cut::new(move || {
                t.set_down(false);
                Ok(())
            }))
        })
    }

    fn invalid_destination(&self) -> String {
        "not a destination".to_owned()
    }

    fn oversized_len(&self) -> usize {
        LIMIT + 1
    }
}

outbox_conformance::conformance_tests! {
    mod memory;
    #[tokio::test]
    probe: Memory::new(),
    outbox: TestDb::new().await.unwrap(),
}
