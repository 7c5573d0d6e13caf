//! A relay process for the crash test of `tests/tests/redis.rs`: an `App`
//! that relays the JSON `i64` rows of one outbox queue to one Redis stream
//! (key `k<value>`), until SIGTERM/SIGINT, or until it is killed.
//!
//! Configured from the environment: the variables of every relay child
//! (`tests::relay_child`: `RELAY_SCHEMA`, `RELAY_TABLE`, `RELAY_DLQ`,
//! `RELAY_QUEUE`, `RELAY_DELAY_MS`, `RELAY_WORKERS`, `RELAY_LEASE_MS`, ...),
//! plus:
//!
//! | variable | meaning |
//! |---|---|
//! | `RELAY_DESTINATION` | where to relay (`stream:<key>`, ...) |
//! | `REDIS_URL` | the Redis server |

use outbox_redis::RedisBroker;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tests::relay_child::run("redis_relay", "RELAY_DESTINATION", |env| {
        Ok(RedisBroker::new(env.var("REDIS_URL")?).publish_timeout(env.lease / 2))
    })
    .await
}
