//! `outbox-bench`: the benchmark harness of the outbox workspace.
//!
//! Runs one scenario (`produce`, `drain`, `relay`, `latency`, `ceiling`,
//! `explain`, `overview`) against its own
//! database and prints ONE JSON object per measured point on stdout:
//! throughput, latency percentiles, and what PostgreSQL did per message
//! (statements and round trips from `pg_stat_statements`, WAL bytes, tuples,
//! dead tuples), rows left, peak RSS, the CPU split between PostgreSQL and
//! this process, and the machine's load. `check` is the CI gate on the
//! machine-independent figures. See `docs/performance.md`.
//!
//! WAL per message (`pg_current_wal_lsn()` differences; the private cluster
//! has no other writer): `wal_bytes_per_msg` is the measured window's, as
//! always. Beside it, `wal_bytes_per_msg_produce` (the producer's INSERTs: for
//! a prefilled backlog, measured around the prefill's `INSERT`s, `VACUUM`
//! excluded), `wal_bytes_per_msg_drain` (the window: claims and outcomes) and
//! `wal_bytes_per_msg_total` (their sum; where the producer runs inside the
//! window, as in `latency` and the steady `relay --rate`, the window is the
//! total and there is no split); `wal_scope` says which applies. Each window
//! starts with a `CHECKPOINT`, so a drained backlog pays one full-page image
//! per page it touches: `wal_fpi_bytes_per_msg_window` /
//! `_produce` (from `pg_walinspect`) and `wal_bytes_per_msg_total_without_fpi`
//! give that share, `wal_by_rmgr_per_msg` the WAL by resource manager
//! (records, record bytes, FPI bytes per message). `dead_tuples_per_msg`:
//! `n_dead_tup` afterwards / messages (autovacuum is off on the table).
//!
//! `--claim lease,transaction` (drain, relay, latency) runs each point in
//! both claim modes back to back; every point names its effective
//! `claim_mode`.
//!
//! ```text
//! bash scripts/bench-pg.sh start          # private PostgreSQL with pg_stat_statements
//! cargo run --release -p outbox-bench -- drain --backlog 100000 --workers 1,4 --ack-batch 1,1000
//! ```

mod buses;
mod ceiling;
mod check;
mod db;
mod drain;
mod exactly_once;
mod explain;
mod kafka;
mod latency;
mod overview;
mod point;
mod produce;
mod relay;
mod sys;
mod timed;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::buses::{Bus, Target};
use crate::db::Db;
use crate::point::Finished;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5433/outbox_bench";

#[derive(Debug, Parser)]
#[command(
    name = "outbox-bench",
    about = "Benchmarks of the outbox engine; one JSON object per result on stdout",
    after_help = "Start the private PostgreSQL first: bash scripts/bench-pg.sh start"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// Server and database to use (created if missing; needs pg_stat_statements
    /// in shared_preload_libraries for statement counts).
    #[arg(long, env = "BENCH_DATABASE_URL", default_value = DEFAULT_URL, global = true)]
    database_url: String,
    /// Size of each message body (a JSON object), bytes.
    #[arg(long, default_value_t = 256, global = true)]
    payload_bytes: usize,
    /// Runs of each point (report the median over them).
    #[arg(long, default_value_t = 1, global = true)]
    repeats: u32,
    /// Before each point, wait up to this long for the machine to be quiet
    /// (no `rustc`, fewer than --quiet-cores busy); 0 = do not wait.
    #[arg(long, default_value_t = 1200, global = true)]
    wait_quiet_secs: u64,
    /// "Quiet": fewer cores than this busy over 2 s before a point.
    #[arg(long, default_value_t = 0.35, global = true)]
    quiet_cores: f64,
    /// A point is disturbed when a `rustc` ran during it or processes other
    /// than PostgreSQL, the bus servers and this one used more cores than this.
    #[arg(long, default_value_t = 0.35, global = true)]
    max_other_cores: f64,
    /// Let autovacuum work on the benchmark tables, tuned as `outbox
    /// autovacuum` advises, instead of turning it off on them (the default, as
    /// the Python harness does, so that dead tuples are a result). Needs
    /// `autovacuum = on` on the server (scripts/bench-pg.sh keeps it off; see
    /// docs/performance.md).
    #[arg(long, global = true)]
    autovacuum: bool,
    /// Re-run a disturbed point up to this many times (the last run is kept).
    #[arg(long, default_value_t = 2, global = true)]
    retries: u32,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Publishing throughput: single publishes per transaction, autocommit, or batches.
    Produce(ProduceArgs),
    /// A prefilled backlog drained by a no-op handler through Engine/Subscriber.
    Drain(DrainArgs),
    /// A backlog (or a steady producer) relayed to a bus (Kafka by default) through App.
    Relay(RelayArgs),
    /// Idle latency: commit -> handler start (or -> the bus's confirmation with --bus / --kafka).
    Latency(LatencyArgs),
    /// The bus's own confirmed-publish ceiling with its plain client (no outbox).
    Ceiling(CeilingArgs),
    /// CI gate: statements, round trips and tuples per scenario vs a baseline.
    Check(CheckArgs),
    /// EXPLAIN (ANALYZE, BUFFERS) of the claim and the batched delete at several sizes.
    Explain(ExplainArgs),
    /// The dashboard's capped `overview()` vs the exact `stats()` on one table (not gated).
    Overview(OverviewArgs),
    /// Issue 17: the transactional (exactly-once) Kafka relay vs the idempotent one, same
    /// run, on a broker with transactions (noida-db): throughput ratio, commit->visible.
    ExactlyOnce(ExactlyOnceArgs),
}

#[derive(Debug, Args)]
struct ExactlyOnceArgs {
    /// Kafka bootstrap of a broker with transactions (scripts/noida.sh).
    #[arg(long, env = "NOIDA_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9392")]
    bootstrap: String,
    /// Backlog rows per throughput point.
    #[arg(long, default_value_t = 50_000)]
    rows: u64,
    /// Rows per lot (`fetch_batch_size`, both modes).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Lanes of the transactional mode (the idempotent mode runs as many
    /// concurrent lots: `fetch_concurrency`).
    #[arg(long, default_value_t = 4)]
    lanes: u32,
    /// Partitions of the data topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Rounds (each runs both modes, idempotent first).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Single-row transactions of the commit->visible measurement.
    #[arg(long, default_value_t = 500)]
    latency_rows: u64,
    /// Their rate, per second.
    #[arg(long, default_value_t = 100)]
    latency_rate: u64,
    /// A shell command run before every point, e.g. `bash scripts/noida.sh
    /// restart`: noida-db keeps every topic it had (deleted ones too) and
    /// snapshots all of it to one JSON file every few seconds, a cost that
    /// grows through a run and lands on whichever point runs then.
    #[arg(long)]
    before_point: Option<String>,
}

#[derive(Debug, Args)]
struct OverviewArgs {
    /// Rows prefilled (spread over --queues queues).
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Queues of the backlog and of the dead letters.
    #[arg(long, default_value_t = 4)]
    queues: u64,
    /// Rows of the dead-letter table.
    #[arg(long, default_value_t = 1_000)]
    dead_letters: u64,
    /// Timed calls of each (interleaved).
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// `OverviewOptions::cap`.
    #[arg(long, default_value_t = outbox_core::ops::DEFAULT_OVERVIEW_CAP)]
    cap: u64,
}

#[derive(Debug, Args)]
struct ExplainArgs {
    /// Rows prefilled.
    #[arg(long, default_value_t = 100_000)]
    backlog: u64,
    /// Claim sizes (LIMIT).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    limit: Vec<i64>,
    /// Runs per size (each rolled back).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Claim and delete this many rows first (committed), as part-way through a drain.
    #[arg(long, default_value_t = 0)]
    consume_first: u64,
}

#[derive(Debug, Args)]
struct ProduceArgs {
    /// single (BEGIN; publish; COMMIT), autocommit (publish alone), batch (BEGIN; publish_batch; COMMIT).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "single")]
    mode: Vec<produce::Mode>,
    /// Rows per transaction in batch mode.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    batch_size: Vec<usize>,
    /// Messages per point (default: 10,000 single/autocommit, 100 x batch size x 20 for batches, at least 200,000).
    #[arg(long)]
    messages: Option<u64>,
    /// Concurrent producers (one connection each).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Publish with `PublishOptions::key`, round robin over this many keys (a
    /// batch: one key); 0 = no key. A list sweeps.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    keys: Vec<u64>,
    /// keep: the table's `<t>_key_idx` as `migrate` made it; drop: dropped
    /// first (the baseline of its insert cost). A list sweeps.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "keep")]
    key_index: Vec<produce::KeyIndex>,
}

/// Unordered or ordered (`SubscriberOptions::ordered`) subscribers / routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Order {
    Unordered,
    Ordered,
}

/// `--claim`: `SubscriberOptions::claim_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Claim {
    /// `ClaimMode::Lease`: a lease write per claimed row, outcomes later.
    Lease,
    /// `ClaimMode::Transaction`: rows locked in a transaction held across
    /// the handlers (and the bus confirmation); outcomes commit in it.
    Transaction,
}

impl Claim {
    fn mode(self) -> outbox_core::ClaimMode {
        match self {
            Self::Lease => outbox_core::ClaimMode::Lease,
            Self::Transaction => outbox_core::ClaimMode::Transaction,
        }
    }
}

/// The claim modes of a `--claim` list: each one set explicitly, or (an
/// empty list) the engine's default only.
fn claims_for(claim: &[Claim]) -> Vec<Option<outbox_core::ClaimMode>> {
    if claim.is_empty() {
        vec![None]
    } else {
        claim.iter().map(|c| Some(c.mode())).collect()
    }
}

/// A label part naming the claim mode (empty for the default).
fn claim_label(claim: Option<outbox_core::ClaimMode>) -> String {
    claim.map_or_else(String::new, |m| {
        format!("/claim-{}", drain::claim_mode_name(m))
    })
}

/// `--poison`: whether key `k0`'s handler always fails (Block policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Poison {
    Off,
    /// Every row of key `k0` fails (retried every 10 ms, never terminal).
    Block,
}

/// The backlog's keys for `--keys` (a list) and `--order`: as given, else
/// 1,000 keys when any point is ordered and none (0) otherwise.
fn keys_for(keys: &[u64], order: &[Order]) -> Vec<u64> {
    if !keys.is_empty() {
        keys.to_vec()
    } else if order.contains(&Order::Ordered) {
        vec![1000]
    } else {
        vec![0]
    }
}

#[derive(Debug, Args)]
struct DrainArgs {
    /// Rows prefilled before the clock starts.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    backlog: Vec<u64>,
    /// Subscriber max_workers.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    workers: Vec<usize>,
    /// Subscriber fetch_batch_size.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    fetch_batch_size: Vec<usize>,
    /// Subscriber terminal_flush_batch_size (1 = a DELETE per row).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    ack_batch: Vec<usize>,
    #[command(flatten)]
    fetch: FetchArgs,
    /// Poll only (no LISTEN connection).
    #[arg(long)]
    no_listen: bool,
    /// Subscriber fetch_concurrency (claim statements in flight at once).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    fetch_concurrency: Vec<usize>,
    /// unordered, ordered, or both (same backlog each; a list runs each
    /// configuration in both orders, side by side).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "unordered")]
    order: Vec<Order>,
    /// Distinct ordering keys of the backlog (row i gets `k<i mod K>`); 0 =
    /// rows without a key. Default: 1000 when an ordered point runs, else 0.
    #[arg(long, value_delimiter = ',')]
    keys: Vec<u64>,
    /// A long transaction held open in another session from before the
    /// prefill to the end of the point: none, snapshot (REPEATABLE READ +
    /// SELECT 1, no xid), xid (BEGIN + txid_current()). A list sweeps.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none")]
    hold: Vec<db::Hold>,
    /// off, or block: key k0's handler always fails (Block policy), the other
    /// keys' rows are the workload. A list sweeps.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off")]
    poison: Vec<Poison>,
    /// Claim modes (`SubscriberOptions::claim_mode`): lease, transaction,
    /// or both (a list runs each configuration in every mode, back to back).
    /// Default: the engine's default (lease for a subscriber, transaction
    /// for a relay route); results name the effective mode (`claim_mode`).
    #[arg(long, value_enum, value_delimiter = ',')]
    claim: Vec<Claim>,
}

/// The knobs drain and relay share.
#[derive(Debug, Args)]
struct FetchArgs {
    /// min_fetch_interval, ms (the Python harness uses 1).
    #[arg(long, default_value_t = 1.0)]
    min_fetch_ms: f64,
    /// max_fetch_interval, ms (the Python harness uses 10).
    #[arg(long, default_value_t = 10.0)]
    max_fetch_ms: f64,
    /// Durable acks: OutboxBroker::synchronous_relay_writes(true) (default: async commit).
    #[arg(long)]
    durable_acks: bool,
}

impl FetchArgs {
    fn knobs(
        &self,
        workers: usize,
        fetch_batch_size: usize,
        ack_batch: usize,
        fetch_concurrency: usize,
        order: Order,
        claim: Option<outbox_core::ClaimMode>,
    ) -> drain::Knobs {
        drain::Knobs {
            workers,
            fetch_batch_size,
            ack_batch,
            min_fetch: ms(self.min_fetch_ms),
            max_fetch: ms(self.max_fetch_ms),
            fetch_concurrency,
            durable_acks: self.durable_acks,
            ordered: order == Order::Ordered,
            claim,
        }
    }
}

/// The buses the relay scenarios can forward to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BusKind {
    Kafka,
    /// outbox-core's in-process MemoryTransport (confirms at once): the
    /// outbox side's ceiling for the same route settings.
    Memory,
    Rabbitmq,
    Nats,
    Redis,
}

/// Where the buses are.
#[derive(Debug, Clone, Args)]
struct BusUrls {
    /// RabbitMQ URL (--bus rabbitmq).
    #[arg(
        long,
        env = "RABBITMQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    rabbitmq_url: String,
    /// NATS URL (--bus nats).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Redis URL (--bus redis).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
}

impl BusUrls {
    /// The benchmark side of a bus other than Kafka.
    fn bus(&self, kind: BusKind) -> anyhow::Result<Arc<dyn Bus>> {
        Ok(match kind {
            BusKind::Kafka | BusKind::Memory => anyhow::bail!(
                "no plain-client ceiling for {kind:?} here; use --bus kafka, rabbitmq, nats or redis"
            ),
            BusKind::Rabbitmq => Arc::new(buses::rabbitmq::RabbitBench::new(&self.rabbitmq_url)),
            BusKind::Nats => Arc::new(buses::nats::NatsBench::new(&self.nats_url)),
            BusKind::Redis => Arc::new(buses::redis::RedisBench::new(&self.redis_url)),
        })
    }

    fn target(
        &self,
        kind: BusKind,
        bootstrap: &str,
        partitions: i32,
        linger: Option<Duration>,
    ) -> anyhow::Result<Target> {
        Ok(match kind {
            BusKind::Kafka => Target::Kafka {
                bootstrap: bootstrap.to_owned(),
                partitions,
                linger,
            },
            BusKind::Memory => Target::Memory,
            other => Target::Bus(self.bus(other)?),
        })
    }
}

#[derive(Debug, Args)]
struct CeilingArgs {
    /// The bus.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rabbitmq,nats,redis"
    )]
    bus: Vec<BusKind>,
    /// Messages per point.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Unconfirmed publishes at once (the relay defaults have 256 workers,
    /// one publish in flight each).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    in_flight: Vec<usize>,
    #[command(flatten)]
    urls: BusUrls,
    /// Kafka bootstrap servers (--bus kafka).
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Partitions of the (fresh) Kafka topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// librdkafka linger.ms for --bus kafka (default: outbox-kafka's, which
    /// is librdkafka's own default, 5 ms).
    #[arg(long)]
    linger_ms: Option<f64>,
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// The bus to relay to.
    #[arg(long, value_enum, default_value = "kafka")]
    bus: BusKind,
    #[command(flatten)]
    urls: BusUrls,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Rows prefilled before the clock starts.
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    backlog: Vec<u64>,
    /// Route max_workers (each has one publish in flight).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    workers: Vec<usize>,
    /// Route fetch_batch_size.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    fetch_batch_size: Vec<usize>,
    /// Route terminal_flush_batch_size.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    ack_batch: Vec<usize>,
    #[command(flatten)]
    fetch: FetchArgs,
    /// Partitions of the (fresh) topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// librdkafka linger.ms (default: outbox-kafka's, 5 ms); a list sweeps.
    #[arg(long, value_delimiter = ',')]
    linger_ms: Vec<f64>,
    /// Steady state: publish this many msg/s alongside the relay (no backlog
    /// unless --backlog is given explicitly).
    #[arg(long, value_delimiter = ',')]
    rate: Vec<u64>,
    /// Steady state: how long the producer runs, seconds.
    #[arg(long, default_value_t = 20.0)]
    duration_secs: f64,
    /// Steady state: rows per producer transaction (publish_batch).
    #[arg(long, default_value_t = 100)]
    producer_batch: usize,
    /// Keep the topic (default: deleted after the point; the local broker is in-memory).
    #[arg(long)]
    keep_topic: bool,
    /// Route fetch_concurrency (claim statements in flight at once).
    #[arg(long, default_value_t = 1)]
    fetch_concurrency: usize,
    /// The relay as the README writes it: a route with no tuning (the relay
    /// defaults) and outbox-kafka's default producer settings; the knob and
    /// linger flags are ignored.
    #[arg(long)]
    readme_defaults: bool,
    /// unordered, ordered, or both (same backlog each).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "unordered")]
    order: Vec<Order>,
    /// Kafka only: before the relay points of each linger setting, measure
    /// the broker's own ingest ceiling (`ceiling --bus kafka`, a plain
    /// producer with the same librdkafka settings) in the same run; each
    /// relay point then reports `broker_ceiling_msg_s` (the median) and
    /// `ratio_to_ceiling`.
    #[arg(long)]
    ceiling: bool,
    /// With --ceiling: records without a delivery report at once.
    #[arg(long, default_value_t = 10_000)]
    ceiling_in_flight: usize,
    /// With --ceiling: records per ceiling point.
    #[arg(long, default_value_t = 100_000)]
    ceiling_messages: u64,
    /// Distinct ordering keys of the backlog (the Kafka record key); 0 = no
    /// key. Default: 1000 when an ordered point runs, else 0.
    #[arg(long, value_delimiter = ',')]
    keys: Vec<u64>,
    /// Claim modes (`SubscriberOptions::claim_mode`): lease, transaction,
    /// or both (a list runs each configuration in every mode, back to back).
    /// Default: the engine's default (lease for a subscriber, transaction
    /// for a relay route); results name the effective mode (`claim_mode`).
    #[arg(long, value_enum, value_delimiter = ',')]
    claim: Vec<Claim>,
}

#[derive(Debug, Args)]
struct LatencyArgs {
    /// Measured samples.
    #[arg(long, default_value_t = 1000)]
    samples: u64,
    /// Samples discarded first.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Spacing of the publishes, ms.
    #[arg(long, default_value_t = 20.0)]
    interval_ms: f64,
    /// Relay each row to Kafka and time the delivery report (= --bus kafka).
    #[arg(long)]
    kafka: bool,
    /// Relay each row to this bus and time its confirmation.
    #[arg(long, value_enum, conflicts_with = "kafka")]
    bus: Option<BusKind>,
    #[command(flatten)]
    urls: BusUrls,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// librdkafka linger.ms (default: outbox-kafka's, 5 ms).
    #[arg(long)]
    linger_ms: Option<f64>,
    /// Partitions of the (fresh) topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Poll only (no LISTEN connection).
    #[arg(long)]
    no_listen: bool,
    /// unordered, ordered, or both (one point each).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "unordered")]
    order: Vec<Order>,
    /// Publish each row with `PublishOptions::key`, round robin over this
    /// many keys; 0 = no key. Default: 1000 for ordered points, 0 for
    /// unordered ones.
    #[arg(long)]
    keys: Option<u64>,
    /// Claim modes (`SubscriberOptions::claim_mode`): lease, transaction,
    /// or both (a list runs each configuration in every mode, back to back).
    /// Default: the engine's default (lease for a subscriber, transaction
    /// for a relay route); results name the effective mode (`claim_mode`).
    #[arg(long, value_enum, value_delimiter = ',')]
    claim: Vec<Claim>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The baseline file.
    #[arg(long, default_value = "bench/baseline.json")]
    baseline: PathBuf,
    /// Write the baseline instead of checking.
    #[arg(long)]
    write_baseline: bool,
    /// With --write-baseline: runs per scenario (timing-dependent values keep
    /// the maximum seen; deterministic ones must agree).
    #[arg(long, default_value_t = 3)]
    baseline_runs: u32,
}

/// Which build produced a result.
pub(crate) fn build_info() -> Value {
    json!({
        "git": env!("OUTBOX_BENCH_GIT"),
        "engine_diff": env!("OUTBOX_BENCH_ENGINE_DIFF"),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

/// Runs one point `repeats` times (re-running a repeat a compile disturbed)
/// and prints each result. Returns whether every run succeeded.
async fn points<F, Fut>(c: &Common, label: &str, f: F) -> bool
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<Finished>>,
{
    points_collect(c, label, f).await.0
}

/// The median of `v` (`None` when empty).
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// [`points`], also returning the throughput of every undisturbed run
/// without an error.
async fn points_collect<F, Fut>(c: &Common, label: &str, f: F) -> (bool, Vec<f64>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<Finished>>,
{
    let mut ok = true;
    let mut rates = Vec::new();
    for repeat in 0..c.repeats.max(1) {
        let mut attempt = 0;
        loop {
            let (rustc, busy) = if c.wait_quiet_secs > 0 {
                sys::wait_for_quiet(Duration::from_secs(c.wait_quiet_secs), c.quiet_cores).await
            } else {
                (0, 0.0)
            };
            if rustc > 0 || busy >= c.quiet_cores {
                eprintln!(
                    "outbox-bench: WARNING: machine still busy ({rustc} rustc, {busy:.2} cores); measuring anyway"
                );
            }
            match f().await {
                Ok(mut done) => {
                    let other = done.json["cpu"]["other_cores"].as_f64().unwrap_or(0.0);
                    let disturbed = done.rustc_max > 0 || other > c.max_other_cores;
                    if disturbed && attempt < c.retries {
                        attempt += 1;
                        eprintln!(
                            "outbox-bench: {label}: disturbed ({} rustc, {other:.2} other cores busy); re-running",
                            done.rustc_max
                        );
                        continue;
                    }
                    if let Value::Object(o) = &mut done.json {
                        o.insert("disturbed".into(), json!(disturbed));
                        o.insert("busy_before_cores".into(), json!(sys::round(busy, 2)));
                    }
                    if let Value::Object(o) = &mut done.json {
                        o.insert("repeat".into(), json!(repeat));
                        o.insert("autovacuum".into(), json!(c.autovacuum));
                        o.insert("attempt".into(), json!(attempt));
                        if o.contains_key("error") {
                            ok = false;
                        } else if !disturbed
                            && let Some(r) = o.get("throughput_msg_s").and_then(Value::as_f64)
                        {
                            rates.push(r);
                        }
                    }
                    println!("{}", done.json);
                    eprintln!(
                        "outbox-bench: {label} #{repeat}: {} msg/s",
                        done.json["throughput_msg_s"]
                    );
                }
                Err(e) => {
                    ok = false;
                    eprintln!("outbox-bench: {label}: ERROR: {e:#}");
                    println!(
                        "{}",
                        json!({"scenario": label, "impl": "rust", "repeat": repeat, "error": format!("{e:#}")})
                    );
                }
            }
            break;
        }
    }
    (ok, rates)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let c = &cli.common;
    let db = Db::prepare(&c.database_url, c.autovacuum).await?;
    let pb = c.payload_bytes;
    let mut ok = true;
    match cli.cmd {
        Cmd::Produce(a) => {
            for &mode in &a.mode {
                let sizes: Vec<usize> = if mode == produce::Mode::Batch {
                    a.batch_size.clone()
                } else {
                    vec![1]
                };
                for &batch_size in &sizes {
                    for &concurrency in &a.concurrency {
                        for (&keys, &key_index) in a
                            .keys
                            .iter()
                            .flat_map(|k| a.key_index.iter().map(move |i| (k, i)))
                        {
                            let messages = a.messages.unwrap_or(match mode {
                                produce::Mode::Batch => (batch_size as u64 * 2_000).max(200_000),
                                _ => 10_000,
                            });
                            let p = produce::ProduceParams {
                                mode,
                                batch_size,
                                messages,
                                concurrency,
                                payload_bytes: pb,
                                keys,
                                drop_key_index: key_index == produce::KeyIndex::Drop,
                            };
                            let label = format!(
                                "produce/{mode:?}/{batch_size}/c{concurrency}/keys{keys}/index-{key_index:?}"
                            );
                            ok &= points(c, &label, || produce::run(&db, &p)).await;
                        }
                    }
                }
            }
        }
        Cmd::Drain(a) => {
            for &backlog in &a.backlog {
                for &ack_batch in &a.ack_batch {
                    for &workers in &a.workers {
                        for (&fetch_batch_size, &fetch_concurrency) in a
                            .fetch_batch_size
                            .iter()
                            .flat_map(|b| a.fetch_concurrency.iter().map(move |c| (b, c)))
                        {
                            for &keys in &keys_for(&a.keys, &a.order) {
                                for &hold in &a.hold {
                                    for &poison in &a.poison {
                                        // Innermost: the two orders (and the claim
                                        // modes) of one configuration run back to back.
                                        for (&order, claim) in a.order.iter().flat_map(|o| {
                                            claims_for(&a.claim).into_iter().map(move |c| (o, c))
                                        }) {
                                            let p = drain::DrainParams {
                                                backlog,
                                                knobs: a.fetch.knobs(
                                                    workers,
                                                    fetch_batch_size,
                                                    ack_batch,
                                                    fetch_concurrency,
                                                    order,
                                                    claim,
                                                ),
                                                listen: !a.no_listen,
                                                payload_bytes: pb,
                                                keys,
                                                hold,
                                                poison: poison == Poison::Block,
                                            };
                                            let label = format!(
                                                "drain/{backlog}/w{workers}/b{fetch_batch_size}/ack{ack_batch}/fc{fetch_concurrency}/{order:?}/keys{keys}/hold-{hold:?}/poison-{poison:?}{}",
                                                claim_label(claim)
                                            );
                                            ok &= points(c, &label, || drain::run(&db, &p)).await;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Cmd::Relay(a) => {
            let rates: Vec<Option<u64>> = if a.rate.is_empty() {
                vec![None]
            } else {
                a.rate.iter().map(|r| Some(*r)).collect()
            };
            let explicit_backlog = std::env::args().any(|x| x.starts_with("--backlog"));
            let lingers: Vec<Option<f64>> = if a.linger_ms.is_empty() {
                vec![None]
            } else {
                a.linger_ms.iter().map(|l| Some(*l)).collect()
            };
            // The broker's ceiling per linger setting (same run, same
            // librdkafka settings as the relay's transport).
            let mut ceilings: Vec<(Option<f64>, Option<f64>)> = Vec::new();
            if a.ceiling {
                anyhow::ensure!(
                    a.bus == BusKind::Kafka,
                    "--ceiling is for --bus kafka (the other buses: `ceiling --bus ...`)"
                );
                for &linger in &lingers {
                    let linger_eff = linger.filter(|_| !a.readme_defaults);
                    let cp = ceiling::CeilingParams {
                        bus: Arc::new(kafka::KafkaBench::new(
                            &a.bootstrap,
                            a.partitions,
                            linger_eff.map(ms),
                        )),
                        messages: a.ceiling_messages.max(1),
                        in_flight: a.ceiling_in_flight.max(1),
                        payload_bytes: pb,
                    };
                    let label = format!("ceiling/kafka/if{}/linger{linger_eff:?}", cp.in_flight);
                    let (good, got) = points_collect(c, &label, || ceiling::run(&cp)).await;
                    ok &= good;
                    ceilings.push((linger, median(got)));
                }
            }
            let ceiling_of = |linger: Option<f64>| {
                ceilings
                    .iter()
                    .find(|(l, _)| *l == linger)
                    .and_then(|(_, m)| *m)
            };
            for (rate, linger) in rates
                .iter()
                .flat_map(|r| lingers.iter().map(move |l| (*r, *l)))
            {
                let backlogs = if rate.is_some() && !explicit_backlog {
                    vec![0]
                } else {
                    a.backlog.clone()
                };
                for &backlog in &backlogs {
                    for &workers in &a.workers {
                        for &fetch_batch_size in &a.fetch_batch_size {
                            let mut combos = Vec::new();
                            for &ab in &a.ack_batch {
                                for k in keys_for(&a.keys, &a.order) {
                                    for &o in &a.order {
                                        for c in claims_for(&a.claim) {
                                            combos.push((ab, k, o, c));
                                        }
                                    }
                                }
                            }
                            for (ack_batch, keys, order, claim) in combos {
                                let p = relay::RelayParams {
                                    target: a.urls.target(
                                        a.bus,
                                        &a.bootstrap,
                                        a.partitions,
                                        linger.map(ms),
                                    )?,
                                    backlog,
                                    knobs: a.fetch.knobs(
                                        workers,
                                        fetch_batch_size,
                                        ack_batch,
                                        a.fetch_concurrency,
                                        order,
                                        claim,
                                    ),
                                    payload_bytes: pb,
                                    rate,
                                    duration: Duration::from_secs_f64(a.duration_secs.max(0.1)),
                                    producer_batch: a.producer_batch.max(1),
                                    keep_topic: a.keep_topic,
                                    readme_defaults: a.readme_defaults,
                                    keys,
                                    ceiling_msg_s: ceiling_of(linger),
                                };
                                let bus = p.target.name();
                                let suffix = if keys > 0 || order == Order::Ordered {
                                    format!("/{order:?}/keys{keys}")
                                } else {
                                    String::new()
                                };
                                let label = match rate {
                                    None if a.readme_defaults => {
                                        format!("relay/{bus}/{backlog}/readme-defaults")
                                    }
                                    Some(r) if a.readme_defaults => {
                                        format!("relay-steady/{bus}/{r}/readme-defaults")
                                    }
                                    None => format!(
                                        "relay/{backlog}/w{workers}/b{fetch_batch_size}/ack{ack_batch}/linger{linger:?}"
                                    ),
                                    Some(r) => format!("relay-steady/{r}/w{workers}"),
                                } + &suffix
                                    + &claim_label(claim);
                                ok &= points(c, &label, || relay::run(&db, &p)).await;
                            }
                        }
                    }
                }
            }
        }
        Cmd::Latency(a) => {
            let bus = if a.kafka { Some(BusKind::Kafka) } else { a.bus };
            let relay = bus
                .map(|b| {
                    a.urls
                        .target(b, &a.bootstrap, a.partitions, a.linger_ms.map(ms))
                })
                .transpose()?;
            let label = relay
                .as_ref()
                .map_or_else(|| "latency".to_owned(), |t| format!("latency-{}", t.name()));
            for (&order, claim) in a
                .order
                .iter()
                .flat_map(|o| claims_for(&a.claim).into_iter().map(move |c| (o, c)))
            {
                let ordered = order == Order::Ordered;
                let keys = a.keys.unwrap_or(if ordered { 1000 } else { 0 });
                let p = latency::LatencyParams {
                    samples: a.samples.max(1),
                    warmup: a.warmup,
                    interval: ms(a.interval_ms),
                    payload_bytes: pb,
                    relay: relay.clone(),
                    listen: !a.no_listen,
                    ordered,
                    keys,
                    claim,
                };
                let label = format!("{label}/{order:?}/keys{keys}{}", claim_label(claim));
                ok &= points(c, &label, || latency::run(&db, &p)).await;
            }
        }
        Cmd::Ceiling(a) => {
            for &kind in &a.bus {
                for &in_flight in &a.in_flight {
                    let bus: Arc<dyn Bus> = if kind == BusKind::Kafka {
                        Arc::new(kafka::KafkaBench::new(
                            &a.bootstrap,
                            a.partitions,
                            a.linger_ms.map(ms),
                        ))
                    } else {
                        a.urls.bus(kind)?
                    };
                    let p = ceiling::CeilingParams {
                        bus,
                        messages: a.messages.max(1),
                        in_flight: in_flight.max(1),
                        payload_bytes: pb,
                    };
                    let label = format!("ceiling/{}/if{in_flight}", p.bus.name());
                    ok &= points(c, &label, || ceiling::run(&p)).await;
                }
            }
        }
        Cmd::Explain(a) => {
            let p = explain::ExplainParams {
                backlog: a.backlog,
                limits: a.limit,
                runs: a.runs,
                payload_bytes: pb,
                consume_first: a.consume_first,
            };
            for doc in explain::run(&db, &p).await? {
                println!("{doc}");
            }
        }
        Cmd::Overview(a) => {
            let p = overview::OverviewParams {
                backlog: a.backlog,
                queues: a.queues,
                dead_letters: a.dead_letters,
                runs: a.runs,
                cap: a.cap,
                payload_bytes: pb,
            };
            let doc = overview::run(&db, &p).await?;
            eprintln!(
                "outbox-bench: overview p50 {} ms vs stats p50 {} ms",
                doc["overview_ms"]["p50"], doc["stats_ms"]["p50"]
            );
            println!("{doc}");
        }
        Cmd::ExactlyOnce(a) => {
            let p = exactly_once::EoParams {
                bootstrap: a.bootstrap,
                rows: a.rows,
                batch: a.batch,
                lanes: a.lanes,
                partitions: a.partitions,
                rounds: a.rounds,
                payload_bytes: pb,
                latency_rows: a.latency_rows,
                latency_rate: a.latency_rate,
                before_point: a.before_point,
            };
            exactly_once::run(&db, &p).await?;
        }
        Cmd::Check(a) => {
            ok = check::run(&db, &a.baseline, a.write_baseline, a.baseline_runs, pb).await?;
        }
    }
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("outbox-bench: ERROR: {e:#}");
            ExitCode::FAILURE
        }
    }
}
