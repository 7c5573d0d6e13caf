// Module map. Each file uses only files listed above it, so dependencies point
// one way (no import cycle) and the list reads from the foundations up. The
// `layering` test (tests/layering.rs: outbox_conformance::layering) checks it
// against the code (`crate::` and `super::` paths, tests included), the
// `[uses ..]` lists too.
//
//   error.rs      the crate's one error enum and its classification (is_retryable)
//   context.rs    the librdkafka client context: logging, the version-guess rewrite
//   config.rs     settings and defaults; the producer's and the admin client's
//                 ClientConfig; secret redaction [uses error]
//   topic.rs      topic-name rules; topic creation with an admin client
//                 [uses config, error]
//   lanes.rs      exactly-once lanes (KafkaBroker::transactional): a transactional
//                 producer per lane, a lot plus its progress per transaction
//                 [uses config, context, error]
//   transport.rs  KafkaTransport, the outbox_core::Transport impl: publish, the
//                 one deadline, BusRejection, close; its lanes [uses config, context, error, lanes, topic]
//   broker.rs     KafkaBroker: the typed builder, its TransportBroker impl
//                 (connect_transport creates the producer; connect() is outbox-core's
//                 shared registration step), ensure_topic()
//                 [uses config, context, error, lanes, topic, transport]
//   testing.rs    (feature testing) test_kafka(), a capturing stand-in [uses config]
//   lib.rs        these docs and the re-exports: the public API
//
// In short (A <- B: B uses A): error <- config <- topic <- transport <- broker
// <- lib, and context <- transport, broker; transport uses config in its tests only.

//! # outbox-kafka
//!
//! The Kafka transport of [`outbox_core`]: handler results of routes with
//! `publish_to("kafka", "topic")` become Kafka records, produced with
//! [rdkafka](https://docs.rs/rdkafka) (librdkafka).
//!
//! ```no_run
//! use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route};
//! use outbox_kafka::KafkaBroker;
//!
//! # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
//! let kafka = KafkaBroker::new("localhost:9092");
//! let relay = Route::builder(["orders"])
//!     .publish_to("kafka", "orders.kafka")
//!     .handler(|msg: Message, _| async move {
//!         let order_id: i64 = msg.decode()?;
//!         Ok::<_, BoxError>(Response::new(order_id).key(order_id.to_string()))
//!     });
//! App::new(outbox)
//!     .subscriber(relay)
//!     .on_startup(kafka.connect()) // creates the producer, checks the cluster, registers "kafka"
//!     .run()
//!     .await
//! # }
//! ```
//!
//! [`KafkaBroker::connect`] is a startup hook: it creates the producer,
//! checks that the cluster answers a metadata request within
//! [`connect_timeout`](KafkaBroker::connect_timeout) (10 s) and registers the
//! transport. If the cluster does not answer, `App::run` fails before
//! anything is consumed, with an error naming the bootstrap address and what
//! to check. [`KafkaBroker::connect_transport`] gives a [`KafkaTransport`]
//! without an `App` (tests, embedding).
//!
//! `KafkaBroker` is a
//! [`TransportBroker`](outbox_core::transport::TransportBroker), like every
//! transport: `connect` is the registration step all transports share, and
//! the crate passes the transport conformance kit (`outbox-conformance`,
//! `tests/tests/conformance_kafka.rs`) against a real broker.
//!
//! ## Delivery contract: at least once
//!
//! [`Transport::publish`](outbox_core::Transport::publish) resolves only on a
//! **positive delivery report** from librdkafka (with the default `acks=all`:
//! the record is on every in-sync replica). The runtime deletes the outbox
//! row only after that. Any failure (broker down, timeout, refusal) is an
//! error: the row is nacked and retried by the subscriber's retry strategy.
//!
//! A record can arrive **more than once**: when the relay crashes (or its
//! database connection fails) between Kafka's acknowledgement and the row's
//! delete, or when a delivery times out after the record was in fact written,
//! the row is handled again and produced again. Consumers deduplicate with
//! the `outbox-id` header, which is the outbox row id and is the same on every
//! copy. The idempotent producer (default) rules out duplicates caused by
//! librdkafka's own internal retries.
//!
//! A positive report **without an offset** is not counted as a
//! confirmation. librdkafka gives one when a record's request failed and a
//! later batch of the same partition then succeeded: it infers ("implicitly
//! acks") that the earlier record was written too. That inference holds only
//! on brokers that check the idempotent producer's sequence numbers (Apache
//! Kafka does); librdkafka's own mock cluster does not, and in our tests it
//! lost 1 to 4 records of 40 this way in one run in 25 to 100 under load.
//! The publish
//! fails with [`Error::Unconfirmed`] (retryable) and the row is published
//! again: on a broker that had the record, a duplicate with the same
//! `outbox-id`; on one that did not, the record that would have been lost.
//! (With `acks=0` no report has an offset, and none is asked for.)
//!
//! ## Keys, partitions and order
//!
//! - **Key.** A record's key is the handler's
//!   [`Response::key`](outbox_core::Response::key), else the row's
//!   **ordering key** ([`PublishOptions::key`](outbox_core::PublishOptions::key)),
//!   as UTF-8 bytes; a row without either gives a record without a key.
//! - **Partition.** The producer uses librdkafka's `murmur2_random`
//!   partitioner ([`DEFAULT_PARTITIONER`]), which is the Java client's
//!   default partitioner for keyed records: partition =
//!   `(murmur2(key) & 0x7fffffff) % partitions`. A key lands on the same
//!   partition as when Java, kafka-python / aiokafka or Kafka Streams
//!   produce it, so their consumers, joins and co-partitioned topics agree.
//!   Records without a key go to a random partition. librdkafka's own
//!   default (`consistent_random`, CRC32) would place keys elsewhere; set
//!   it back with `.set("partitioner", "consistent_random")`.
//! - **Order.** The idempotent producer (`enable.idempotence=true`, the
//!   default; librdkafka then uses `acks=all`, at most 5 requests in flight
//!   per connection and retries until `message.timeout.ms`) keeps
//!   per-partition order across its internal retries. Combined with an
//!   [`ordered`](outbox_core::SubscriberOptions::ordered) subscriber, which
//!   relays one row per key at a time in commit order and publishes the next
//!   only after Kafka acknowledged the previous one, the records of one key
//!   reach their partition in commit order (a row retried after an
//!   uncertain failure can appear twice, as everywhere: deduplicate on
//!   `outbox-id`). Keep `lease_ttl` above the publish time (see below), or
//!   another relay may take over a key while a record is still on its way.
//!   An unordered subscriber handles rows concurrently (`max_workers`) and
//!   retries them independently, so the outbox order is not preserved on
//!   the topic. `idempotence(false)` gives up the per-partition guarantee
//!   (connect logs a WARN unless `max.in.flight.requests.per.connection` is
//!   1).
//!
//! ## What a record looks like
//!
//! | record part | value |
//! |---|---|
//! | topic | the route's destination (`publish_to("kafka", "orders.kafka")`) |
//! | key | [`Response::key`](outbox_core::Response::key), else the row's ordering key, else none (a random partition) |
//! | partition | `murmur2(key)`, as the Java client's default partitioner (see above) |
//! | value | the handler's result, encoded like a published body (JSON by default) |
//! | headers | exactly the headers the runtime assembled, one Kafka header each, UTF-8 values |
//!
//! The headers are:
//!
//! | header | content |
//! |---|---|
//! | `content-type` | `application/json`, `text/plain`, … (from the result's encoding) |
//! | `correlation_id` | the response's correlation id, else the inbound row's |
//! | `outbox-id` | the outbox row id, for consumer-side deduplication |
//! | explicit headers | [`Response::header`](outbox_core::Response::header) |
//! | propagated headers | the inbound row's own headers (by default; `propagate_headers(false)` on the route turns it off); the envelope keys above are re-derived, never copied |
//!
//! ## Configuration
//!
//! [`KafkaBroker`] has typed setters for the keys an outbox relies on, with
//! defaults chosen for it, and [`KafkaBroker::set`] for any other librdkafka
//! producer property:
//!
//! | key | default | why |
//! |---|---|---|
//! | `bootstrap.servers` | (required) | |
//! | `client.id` | `outbox-kafka` | |
//! | `acks` | `all` | a record acknowledged only by a leader that then dies is lost, though its row is gone |
//! | `enable.idempotence` | `true` | librdkafka's internal retries cannot duplicate or reorder |
//! | `partitioner` | `murmur2_random` | the Java client's partition for a key (see above) |
//! | `compression.type` | `none` | |
//! | `linger.ms` | `5` | librdkafka's default; each row waits up to that long |
//! | `message.timeout.ms` | `30000` | with the 1 s margin, below the default `lease_ttl` (60 s) of subscribers, see below |
//!
//! plus, outside librdkafka, the transport name (`kafka`), the startup
//! connect timeout (10 s) and the flush timeout at shutdown (10 s). Secret
//! properties are redacted in `Debug` and error messages. For TLS, SASL/GSSAPI
//! or zstd, enable the matching feature of `rdkafka` in your own `Cargo.toml`
//! (`rdkafka = { version = "0.39", features = ["ssl", "zstd"] }`): cargo
//! unifies features, and this crate re-exports that [`rdkafka`].
//!
//! One publish takes at most `message.timeout.ms` plus
//! [`DELIVERY_REPORT_MARGIN`] (1 s), waiting for room in a full producer
//! queue included: that is [`KafkaTransport::max_publish_time`] (31 s with
//! the defaults). Keep the subscriber's `lease_ttl` above it plus the
//! handler's own run time (and the time a claimed row may wait in the
//! subscriber's buffer): the lease clock starts at the claim and is not
//! extended while a publish waits, so a longer wait lets another relay claim
//! the row and produce it again. `App::run` warns when `lease_ttl` is not
//! longer than the publish time alone; a 10 s lease with a 5 s
//! `message.timeout.ms` is fine.
//!
//! ## Topics
//!
//! A cluster with `auto.create.topics.enable=false` (the usual production
//! setting) refuses records for a topic that does not exist: the publish
//! fails and the row is retried until the topic appears.
//! [`KafkaBroker::ensure_topic`] creates a destination topic with your
//! partition and replication counts when it is missing, for example in a
//! startup hook before [`KafkaBroker::connect`].
//!
//! ## Kafka outages and the dead-letter table
//!
//! During an outage librdkafka keeps each record queued and retries on its own
//! until `message.timeout.ms`; an outage shorter than that only delays the
//! records. The App says so: when a transport has confirmed nothing for
//! `App::outage_warning_after` (5 s) while messages wait, one WARN names the
//! transport, the topic, how many messages wait and since when, and one INFO
//! follows when it confirms again. After `message.timeout.ms`, the publish
//! fails with
//! [`Error::DeliveryTimeout`], the row is nacked, and the subscriber's
//! [retry strategy](outbox_core::retry) schedules the next attempt. Each
//! attempt costs up to `message.timeout.ms` plus the strategy's delay, so
//! rows survive an outage of about
//!
//! ```text
//! max_attempts × message.timeout.ms + sum of the strategy's delays
//! ```
//!
//! With the defaults (`ExponentialRetry`: 1 s × 2 up to 300 s, 10 attempts;
//! 30 s timeout) that is 10 × 30 s + (1 + 2 + … + 256) s ≈ 13.5 minutes (±10 %
//! jitter). When the strategy gives up, the row goes to the dead-letter table
//! (`failure_reason = retry_terminal`, the Kafka error in `last_exception`),
//! or is deleted when the broker has no dead-letter table configured. Size the
//! budget to the longest outage you want to ride out, e.g.
//! `ExponentialRetry::new(1s).max_delay(60s).max_total_delay(2h)` on the
//! route, and configure a dead-letter table so that nothing is dropped
//! silently.
//!
//! ## Permanent refusals
//!
//! A record Kafka will never take (larger than `message.max.bytes`, a topic
//! or cluster the producer is not authorized for, an invalid topic name or
//! record: [`Error::is_retryable`] is false) is not worth retrying:
//! [`Transport::publish`](outbox_core::Transport::publish) returns it wrapped
//! in an [`outbox_core::BusRejection`] (with the [`enum@Error`] as its
//! source), and a subscriber with the default retry strategy moves the row
//! to the dead-letter table at once (`failure_reason = rejected`,
//! `last_exception` naming `kafka`, the topic and librdkafka's text); the
//! other rows are not held up. A route with its own retry strategy decides
//! itself (`RetryContext::is_bus_rejection`). A topic that does not exist
//! yet is not permanent: it may be created later.
//!
//! A 2 MB record, for example, is refused by librdkafka before it is sent:
//! the producer's `message.max.bytes` defaults to 1,000,000 bytes, like the
//! brokers' own limit. Raise both (`.set("message.max.bytes", ..)` and the
//! broker's or topic's setting) if you mean to send such records.
//!
//! A producer that cannot recover by itself (a librdkafka fatal error, or a
//! producer id fenced by the cluster, as can happen after in-flight requests
//! timed out during an outage) is replaced by a fresh one: the publishes it
//! failed return [`Error::Fatal`] and their rows are retried as usual.
//!
//! ## Using a real cluster
//!
//! Any Kafka-protocol cluster works: point [`KafkaBroker::new`] at its
//! bootstrap servers. The single-broker KRaft `confluentinc/cp-kafka:7.6.0`
//! docker-compose service of the outbox tutorial (host listener advertised
//! as `localhost:9092`) works unchanged with `KafkaBroker::new("localhost:9092")`;
//! it auto-creates topics on first produce. Clusters with
//! `auto.create.topics.enable=false` need the topics created beforehand: a
//! record for a missing topic fails with [`Error::Delivery`] /
//! `UnknownTopicOrPartition` after `topic.metadata.propagation.max.ms` (30 s)
//! and is retried like any transient failure, so its row waits in the outbox
//! until the topic exists or the retry budget ends. Replicated clusters should
//! set the topic's `min.insync.replicas` ≥ 2 for `acks=all` to mean
//! something.
//!
//! librdkafka's log lines and client errors are forwarded to `tracing`
//! (target `librdkafka`, field `transport`). Its guess that a broker which
//! does not answer a new connection's first request is older than Kafka 0.10
//! is replaced by what that almost always means (the broker is down, hung,
//! overloaded or restarting).

mod broker;
mod config;
mod context;
mod error;
mod lanes;
mod topic;
mod transport;

pub use broker::KafkaBroker;
pub use config::{
    Acks, Compression, DEFAULT_CLIENT_ID, DEFAULT_CONNECT_TIMEOUT, DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_LINGER, DEFAULT_MESSAGE_TIMEOUT, DEFAULT_NAME, DEFAULT_PARTITIONER,
};
pub use error::{Error, Result};
pub use transport::{DELIVERY_REPORT_MARGIN, KafkaTransport};

/// The `rdkafka` crate this transport is built on (for `ClientConfig`,
/// error codes and the mock cluster).
pub use rdkafka;

#[cfg(feature = "testing")]
pub mod testing;
