//! The relay processes of the crash tests (`src/bin/<bus>_relay`): an `App`
//! that relays the JSON `i64` rows of one outbox queue to one destination of
//! one bus (key `k<value>`), until SIGTERM/SIGINT, or until it is killed.
//! Each binary only builds its bus's broker; the environment, the route and
//! the `App` are here.
//!
//! Configuration, all from the environment (each binary documents its own
//! destination and bus variables):
//!
//! | variable | meaning |
//! |---|---|
//! | `OUTBOX_TEST_DATABASE_URL` | PostgreSQL (default as in [`crate::database_url`]) |
//! | `RELAY_SCHEMA`, `RELAY_TABLE`, `RELAY_DLQ` | the outbox and dead-letter tables |
//! | `RELAY_QUEUE` | the outbox queue to relay |
//! | `RELAY_DELAY_MS` | handler sleep per row (default 0), to slow the stream down |
//! | `RELAY_WORKERS` | `max_workers` (default 4) |
//! | `RELAY_LEASE_MS` | `lease_ttl` (default 3000) |
//! | `RELAY_BATCH` | `fetch_batch_size` (default 10) |
//! | `RELAY_LOTS` | `fetch_concurrency` (default 1: at most one claim's rows in flight, which bounds the duplicates of a kill) |
//! | `RELAY_CLAIM` | `lease` or `transaction` (default: the relay default, `transaction`) |
//! | `RELAY_MAX_HOLD_MS` | `max_hold` (default: the default, 5 s) |
//! | `RELAY_STALL_AFTER_PUBLISH_MS` | after each publish the bus confirmed, wait this long before the row's outcome is recorded (default 0): a kill then lands between the publish and the ack |
//! | `RELAY_EXACTLY_ONCE` | the route's `exactly_once(lanes)` (default: off); the transport must have lanes (`kafka_relay` with `RELAY_TRANSACTIONAL`) |
//! | `RUST_LOG` | the stderr log filter (default `warn`) |

use std::time::Duration;

use anyhow::Context as _;
use outbox_core::retry::ConstantRetry;
use outbox_core::transport::{BoxFuture, Outgoing, ServerInfo, Transport, TransportBroker};
use outbox_core::{
    App, BoxError, ClaimMode, DlqTable, Message, OutboxBroker, OutboxTable, Response, Route,
};
use sqlx::postgres::PgPoolOptions;

/// The environment of one relay binary (its name prefixes every error).
#[derive(Debug, Clone)]
pub struct RelayEnv {
    bin: &'static str,
    /// `RELAY_LEASE_MS`: the route's `lease_ttl`; brokers set their publish
    /// deadline below it.
    pub lease: Duration,
}

impl RelayEnv {
    /// The environment of the binary `bin`, with `lease` from
    /// `RELAY_LEASE_MS` (or `default_lease_ms`).
    pub fn new(bin: &'static str, default_lease_ms: u64) -> anyhow::Result<Self> {
        let mut env = Self {
            bin,
            lease: Duration::ZERO,
        };
        env.lease = Duration::from_millis(env.num("RELAY_LEASE_MS", default_lease_ms)?);
        Ok(env)
    }

    /// The stderr log of a child (`RUST_LOG`, default `warn`).
    pub fn init_tracing() {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .init();
    }

    /// The test's outbox (`RELAY_SCHEMA`, `RELAY_TABLE`, `RELAY_DLQ`, on a
    /// pool of 4 connections) and the queue to relay (`RELAY_QUEUE`).
    pub async fn outbox(&self) -> anyhow::Result<(OutboxBroker, String)> {
        let schema = self.var("RELAY_SCHEMA")?;
        let table = OutboxTable::new(&self.var("RELAY_TABLE")?)?.schema(&schema)?;
        let dlq = DlqTable::new(&self.var("RELAY_DLQ")?)?.schema(&schema)?;
        let queue = self.var("RELAY_QUEUE")?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&crate::database_url())
            .await
            .with_context(|| format!("{}: connecting to PostgreSQL", self.bin))?;
        Ok((OutboxBroker::new(pool, table).dead_letter_table(dlq), queue))
    }

    /// The variable `name`, required.
    pub fn var(&self, name: &str) -> anyhow::Result<String> {
        std::env::var(name).with_context(|| format!("{}: {name} is not set", self.bin))
    }

    /// `RELAY_CLAIM`: the claim mode asked for, if any.
    pub fn claim_mode(&self) -> anyhow::Result<Option<ClaimMode>> {
        match std::env::var("RELAY_CLAIM").as_deref() {
            Err(_) => Ok(None),
            Ok("lease") => Ok(Some(ClaimMode::Lease)),
            Ok("transaction") => Ok(Some(ClaimMode::Transaction)),
            Ok(other) => anyhow::bail!(
                "{}: RELAY_CLAIM={other:?}: expected lease or transaction",
                self.bin
            ),
        }
    }

    /// The number in `name`, or `default` when it is not set.
    pub fn num(&self, name: &str, default: u64) -> anyhow::Result<u64> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .with_context(|| format!("{}: {name}={v:?} is not a number", self.bin)),
            Err(_) => Ok(default),
        }
    }
}

/// Runs the relay binary `bin` (also the route's name): rows of
/// `RELAY_QUEUE` go to the destination in the variable `destination_var`
/// (`RELAY_TOPIC`, `RELAY_SUBJECT`, `RELAY_DESTINATION`) through the
/// transport `broker` builds from the environment, registered under its
/// own name. Returns when the `App` stops.
pub async fn run<B, F>(bin: &'static str, destination_var: &str, broker: F) -> anyhow::Result<()>
where
    B: TransportBroker,
    F: FnOnce(&RelayEnv) -> anyhow::Result<B>,
{
    RelayEnv::init_tracing();
    let env = RelayEnv::new(bin, 3000)?;
    let (outbox, queue) = env.outbox().await?;
    let destination = env.var(destination_var)?;
    let delay = Duration::from_millis(env.num("RELAY_DELAY_MS", 0)?);
    let workers = usize::try_from(env.num("RELAY_WORKERS", 4)?)?;
    let broker = Stall {
        inner: broker(&env)?,
        after_publish: Duration::from_millis(env.num("RELAY_STALL_AFTER_PUBLISH_MS", 0)?),
    };

    let batch = usize::try_from(env.num("RELAY_BATCH", 10)?)?;
    let mut route = Route::builder([queue])
        .name(bin)
        .max_workers(workers)
        .fetch_batch_size(batch)
        .fetch_concurrency(usize::try_from(env.num("RELAY_LOTS", 1)?)?)
        .lease_ttl(env.lease);
    if let Some(mode) = env.claim_mode()? {
        route = route.claim_mode(mode);
    }
    if let Ok(lanes) = std::env::var("RELAY_EXACTLY_ONCE") {
        route = route.exactly_once(lanes.parse()?);
    }
    if let Ok(ms) = std::env::var("RELAY_MAX_HOLD_MS") {
        route = route.max_hold(Duration::from_millis(ms.parse()?));
    }
    let route = route
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .retry(ConstantRetry::new(Duration::from_millis(200)))
        .publish_to(broker.transport_name(), destination)
        .handler(move |msg: Message, _ctx| async move {
            let v: i64 = msg.decode()?;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, BoxError>(Response::new(v).key(format!("k{v}")))
        });
    App::new(outbox)
        .without_discovery()
        .subscriber(route)
        .on_startup(broker.connect())
        .run()
        .await?;
    Ok(())
}

/// A transport broker whose transports wait `after_publish` after every
/// publish the bus confirmed (`RELAY_STALL_AFTER_PUBLISH_MS`): the row is
/// on the bus and not yet acked for that long. Everything else is the
/// inner broker's.
#[derive(Clone)]
struct Stall<B> {
    inner: B,
    after_publish: Duration,
}

struct Stalled<T> {
    inner: T,
    after_publish: Duration,
}

impl<B: TransportBroker> TransportBroker for Stall<B> {
    type Transport = Stalled<B::Transport>;

    fn transport_name(&self) -> &str {
        self.inner.transport_name()
    }

    fn connect_transport(&self) -> BoxFuture<'static, Result<Self::Transport, BoxError>> {
        let connect = self.inner.connect_transport();
        let after_publish = self.after_publish;
        Box::pin(async move {
            Ok(Stalled {
                inner: connect.await?,
                after_publish,
            })
        })
    }

    fn server(&self) -> Option<ServerInfo> {
        self.inner.server()
    }
}

impl<T: Transport> Transport for Stalled<T> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>> {
        let publish = self.inner.publish(msg);
        let after_publish = self.after_publish;
        Box::pin(async move {
            publish.await?;
            tokio::time::sleep(after_publish).await;
            Ok(())
        })
    }

    fn max_publish_time(&self) -> Option<Duration> {
        self.inner.max_publish_time()
    }

    fn lanes(&self) -> Option<std::sync::Arc<dyn outbox_core::transport::Lanes>> {
        self.inner.lanes()
    }

    fn check_destination(&self, destination: &str) -> Result<(), String> {
        self.inner.check_destination(destination)
    }

    fn verify_destination(&self, destination: &str) -> BoxFuture<'static, Result<(), String>> {
        self.inner.verify_destination(destination)
    }

    fn server(&self) -> Option<ServerInfo> {
        self.inner.server()
    }

    fn health(&self) -> BoxFuture<'static, Result<(), String>> {
        self.inner.health()
    }

    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        self.inner.close()
    }
}
