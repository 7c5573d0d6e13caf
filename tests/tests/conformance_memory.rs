//! The transport conformance kit (`outbox-conformance`) against the
//! in-process `MemoryTransport`: outages are `set_down`, the size limit is
//! `max_message_bytes`, destinations are checked by a rule.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
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

fn probe() -> Arc<Memory> {
    Arc::new(Memory::new())
}

#[tokio::test]
async fn memory_publish_confirms() {
    outbox_conformance::publish_confirms(&*probe()).await;
}

#[tokio::test]
async fn memory_messages_arrive_as_documented() {
    let db = TestDb::new().await.unwrap();
    outbox_conformance::messages_arrive_as_documented(&*probe(), &db.broker).await;
}

#[tokio::test]
async fn memory_outage_keeps_rows() {
    let db = TestDb::new().await.unwrap();
    outbox_conformance::outage_keeps_rows(&*probe(), &db.broker).await;
}

#[tokio::test]
async fn memory_killed_relay_redelivers() {
    let db = TestDb::new().await.unwrap();
    outbox_conformance::killed_relay_redelivers(&*probe(), &db.broker).await;
}

#[tokio::test]
async fn memory_invalid_destination_fails_startup() {
    let db = TestDb::new().await.unwrap();
    outbox_conformance::invalid_destination_fails_startup(&*probe(), &db.broker).await;
}

#[tokio::test]
async fn memory_oversized_message_is_not_lost() {
    let db = TestDb::new().await.unwrap();
    outbox_conformance::oversized_message_is_not_lost(&*probe(), &db.broker).await;
}
