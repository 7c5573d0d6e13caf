//! The choreography of the killed-relay tests (`tests/tests/<bus>.rs`,
//! `a_relay_killed_mid_stream_…`), the same for every bus: rows published
//! to [`QUEUE`] ([`publish_rows`]), a relay child process
//! (`src/bin/<bus>_relay`, see [`crate::relay_child`]) SIGKILLed
//! mid-stream and started again until the outbox is empty
//! ([`kill_and_restart`]), then what arrived counted per row
//! ([`Arrivals`]). Each test reads back its own bus and adds its own
//! assertions.
//!
//! ```no_run
//! # async fn demo(db: tests::TestDb, destination: String) -> anyhow::Result<()> {
//! use tests::crash::{self, Arrivals, RelayChild};
//! let ids = crash::publish_rows(&db, 400).await?;
//! let killed = crash::kill_and_restart(&db, 400 - 80, |_run| {
//!     RelayChild::spawn(
//!         RelayChild::command("path/to/rabbitmq_relay", &db)
//!             .env("RELAY_DESTINATION", &destination),
//!     )
//! })
//! .await?;
//! let arrived = Vec::new(); // read back from the bus
//! let arrivals = Arrivals::tally(&ids, arrived);
//! arrivals.assert_duplicates_within(&killed);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::{TestDb, wait_until};

/// The outbox queue the relay children relay in the crash tests.
pub const QUEUE: &str = "crash";

/// How long each relay may take: the first to make progress, the second to
/// empty the outbox.
const PATIENCE: Duration = Duration::from_secs(60);

/// A relay child process; killed (SIGKILL) when dropped, so that a failing
/// test leaves no process behind.
#[derive(Debug)]
pub struct RelayChild(Child);

impl RelayChild {
    /// The command of the relay binary `exe`
    /// (`env!("CARGO_BIN_EXE_<bus>_relay")`) on `db`'s tables and
    /// [`QUEUE`], slowed to 15 ms per row, 4 workers, a 3 s lease. Add the
    /// bus's variables (destination, server), then [`spawn`](Self::spawn).
    pub fn command(exe: &str, db: &TestDb) -> Command {
        let mut cmd = Command::new(exe);
        cmd.env("RELAY_SCHEMA", &db.schema)
            .env("RELAY_TABLE", db.table.name())
            .env("RELAY_DLQ", db.dlq.name())
            .env("RELAY_QUEUE", QUEUE)
            .env("RELAY_DELAY_MS", "15")
            .env("RELAY_WORKERS", "4")
            .env("RELAY_LEASE_MS", "3000");
        cmd
    }

    /// Starts the relay process of `cmd` (from [`command`](Self::command)).
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        Ok(Self(cmd.spawn()?))
    }

    /// Kills the process with SIGKILL (no graceful stop) and reaps it.
    pub fn sigkill(mut self) -> anyhow::Result<()> {
        // std's Child::kill sends SIGKILL on Unix.
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }

    /// Stops the process with SIGTERM (graceful) and waits for its exit.
    pub fn sigterm(mut self) -> anyhow::Result<ExitStatus> {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        Ok(self.0.wait()?)
    }
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Publishes the JSON values `0..n` to [`QUEUE`] in one transaction;
/// returns their row ids.
pub async fn publish_rows(db: &TestDb, n: i64) -> anyhow::Result<BTreeSet<i64>> {
    let mut ids = BTreeSet::new();
    let mut tx = db.pool.begin().await?;
    for v in 0..n {
        ids.insert(db.broker.publish(&v, QUEUE, &mut *tx).await?);
    }
    tx.commit().await?;
    Ok(ids)
}

/// The outbox when the first relay was killed.
#[derive(Debug, Clone, Copy)]
pub struct Killed {
    /// Rows left in the outbox.
    pub left: i64,
    /// Rows of those leased (in flight) at the kill.
    pub leased: i64,
}

/// The crash: starts the first relay (`spawn(0)`), waits until at most
/// `kill_at` rows are left, SIGKILLs it and asserts that rows were left;
/// starts the second relay (`spawn(1)`), asserts that it empties the
/// outbox and exits cleanly on SIGTERM, and that nothing was
/// dead-lettered. Returns what the kill left.
pub async fn kill_and_restart(
    db: &TestDb,
    kill_at: i64,
    mut spawn: impl FnMut(usize) -> anyhow::Result<RelayChild>,
) -> anyhow::Result<Killed> {
    let relay = spawn(0)?;
    assert!(
        wait_until(PATIENCE, || async { db.count().await.unwrap() <= kill_at }).await,
        "the first relay did not make progress"
    );
    relay.sigkill()?;
    let left = db.count().await?;
    let leased = db
        .scalar(format!(
            "SELECT count(*) FROM {} WHERE acquired_token IS NOT NULL",
            db.t()
        ))
        .await?;
    println!("killed the relay with {left} rows left ({leased} leased)");
    assert!(left > 0, "the relay finished before the kill; raise N");

    let relay = spawn(1)?;
    assert!(
        db.drained(PATIENCE).await,
        "rows left after the restart: {}",
        db.count().await?
    );
    let status = relay.sigterm()?;
    assert!(status.success(), "the relay exited with {status}");
    assert_eq!(db.dlq_count().await?, 0);
    Ok(Killed { left, leased })
}

/// One message as it arrived on the bus.
#[derive(Debug, Clone)]
pub struct Arrived {
    /// Its `outbox-id`.
    pub id: i64,
    /// The JSON `i64` in its body.
    pub value: i64,
    /// Its key, as the bus carries it.
    pub key: Option<Vec<u8>>,
}

/// What arrived, per row.
#[derive(Debug, Clone)]
pub struct Arrivals {
    /// Messages per row id.
    pub per_id: BTreeMap<i64, usize>,
    /// Messages in all.
    pub total: usize,
}

impl Arrivals {
    /// Counts `arrived`, asserting that each message's key is `k<value>`
    /// and that every row of `ids`, and only these, arrived.
    pub fn tally(ids: &BTreeSet<i64>, arrived: impl IntoIterator<Item = Arrived>) -> Self {
        let mut per_id: BTreeMap<i64, usize> = BTreeMap::new();
        let mut total = 0;
        for m in arrived {
            *per_id.entry(m.id).or_default() += 1;
            total += 1;
            assert_eq!(
                m.key,
                Some(format!("k{}", m.value).into_bytes()),
                "row {}",
                m.id
            );
        }
        let seen: BTreeSet<i64> = per_id.keys().copied().collect();
        assert_eq!(&seen, ids, "every row, and only these rows, arrive");
        Self { per_id, total }
    }

    /// Messages beyond the first of each row.
    pub fn duplicates(&self) -> usize {
        self.per_id.values().map(|n| n - 1).sum()
    }

    /// Asserts that only rows in flight at the kill arrived twice: no more
    /// duplicates than rows leased at the kill, or than the claimed batch
    /// (`fetch_batch_size` 10) plus what the 4 workers held (14), whichever
    /// is more.
    pub fn assert_duplicates_within(&self, killed: &Killed) {
        let dups = self.duplicates();
        assert!(
            i64::try_from(dups).unwrap() <= killed.leased.max(14),
            "{dups} duplicates, but only {} rows were leased at the kill",
            killed.leased
        );
    }
}
