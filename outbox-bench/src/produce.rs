//! `produce`: publishing throughput, per transaction.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::{Map, json};

use crate::db::{self, Body, Db, QUEUE};
use crate::point::{Finished, Measured, WalScope, Window, percentiles_ms};
use outbox_core::PublishOptions;

/// How rows are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// `BEGIN; publish; COMMIT` per message.
    Single,
    /// `publish` in autocommit (no explicit transaction): one round trip.
    Autocommit,
    /// `BEGIN; publish_batch(batch_size); COMMIT`.
    Batch,
}

/// One produce point.
#[derive(Debug, Clone)]
pub(crate) struct ProduceParams {
    pub(crate) mode: Mode,
    pub(crate) batch_size: usize,
    pub(crate) messages: u64,
    pub(crate) concurrency: usize,
    pub(crate) payload_bytes: usize,
    /// Publish with `PublishOptions::key`, round robin over this many keys
    /// (a batch: one key for all its rows); 0: no key.
    pub(crate) keys: u64,
    /// Drop `<t>_key_idx` first (the baseline of its insert cost).
    pub(crate) drop_key_index: bool,
}

/// `--key-index`: whether the fresh table keeps the ordering-key index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum KeyIndex {
    Keep,
    Drop,
}

pub(crate) async fn run(db: &Db, p: &ProduceParams) -> anyhow::Result<Finished> {
    db.with_fresh_table(async |table| {
        if p.drop_key_index {
            db::drop_key_index(db, table).await?;
        }
        measure(db, table, p).await
    })
    .await
}

async fn measure(
    db: &Db,
    table: &outbox_core::OutboxTable,
    p: &ProduceParams,
) -> anyhow::Result<Finished> {
    let per_tx = match p.mode {
        Mode::Batch => p.batch_size.max(1) as u64,
        Mode::Single | Mode::Autocommit => 1,
    };
    let conc = p.concurrency.max(1);
    let txs = p.messages.div_ceil(per_tx);
    let messages = txs * per_tx;
    // The pool is opened (all connections) before the window and closed
    // inside it, so the backends' statistics are flushed before the snapshot.
    let pool = db.pool(u32::try_from(conc)?).await?;
    let mut conns = Vec::with_capacity(conc);
    for _ in 0..conc {
        conns.push(pool.acquire().await?);
    }
    drop(conns);
    let broker = db::broker(pool.clone(), table.clone());
    let body = Arc::new(Body::new(p.payload_bytes));
    let window = Window::open(db, table, conc).await?;
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(conc);
    for w in 0..conc as u64 {
        let (broker, body) = (broker.clone(), body.clone());
        let mine = txs / conc as u64 + u64::from(w < txs % conc as u64);
        let mode = p.mode;
        let keys = p.keys;
        tasks.push(tokio::spawn(async move {
            let mut conn = broker.pool().acquire().await?;
            let mut lat = Vec::with_capacity(usize::try_from(mine).unwrap_or(0));
            let batch: Vec<&Body> = (0..per_tx).map(|_| &*body).collect();
            for j in 0..mine {
                let opts = if keys > 0 {
                    PublishOptions::new().key(db::key_of(j * conc as u64 + w, keys))
                } else {
                    PublishOptions::new()
                };
                let t = Instant::now();
                match mode {
                    Mode::Single => {
                        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                        broker.publish_with(&*body, QUEUE, &opts, &mut *tx).await?;
                        tx.commit().await?;
                    }
                    Mode::Autocommit => {
                        broker.publish_with(&*body, QUEUE, &opts, &mut conn).await?;
                    }
                    Mode::Batch => {
                        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                        broker
                            .publish_batch_with(batch.iter().copied(), QUEUE, &opts, &mut *tx)
                            .await?;
                        tx.commit().await?;
                    }
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::with_capacity(usize::try_from(txs).unwrap_or(0));
    for t in tasks {
        lat.extend(t.await.context("producer task")??);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_end = window.cpu_now();
    pool.close().await;
    let mut extra = Map::new();
    extra.insert("transactions".into(), json!(txs));
    window
        .close(Measured {
            scenario: "produce",
            params: json!({
                "mode": p.mode,
                "rows_per_tx": per_tx,
                "concurrency": conc,
                "payload_bytes": p.payload_bytes,
                "keys": p.keys,
                "key_index": !p.drop_key_index,
            }),
            messages,
            seconds,
            // Per transaction: BEGIN .. COMMIT returned.
            latency: percentiles_ms(&mut lat),
            extra,
            cpu_end,
            expect_rows: Some(i64::try_from(messages)?),
            wal: WalScope::ProducerOnly,
        })
        .await
}
