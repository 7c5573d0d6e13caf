//! How many PostgreSQL connections the engine opens, against what the
//! server has left ([`Engine::connection_budget`]), checked when it starts.
//!
//! The engine's loops do not take their connections from the broker's
//! pool: each opens its own, with the pool's connect options (so that a
//! slow handler never starves a claim, and a claim never waits for the
//! application's queries). Per subscriber:
//!
//! | claim mode | connections |
//! |---|---|
//! | [`Lease`](ClaimMode::Lease) | `fetch_concurrency` (claims) + `min(max_workers, 4)` (the workers' retry and dead-letter writes) + 1 (the acker's deletes) |
//! | [`Transaction`](ClaimMode::Transaction) | `fetch_concurrency` (one per lot) + `min(max_workers, 4)` (rows that outlive `max_hold` finish under a lease) |
//!
//! plus, per engine, one LISTEN connection (none with
//! [`Engine::without_listen`]). The broker's pool comes on top, up to its
//! `max_connections`: publishes, handlers that open a transaction on it,
//! the gauge sampler and the health probe use it.

use super::Engine;
use super::worker::MAX_WORKER_CONNECTIONS;
use crate::engine::subscriber::{ClaimMode, Subscriber};
use crate::error::{Error, Result};

/// The connections of one subscriber: see [`Engine::connection_budget`].
pub fn subscriber_connections(sub: &Subscriber) -> usize {
    let o = sub.options();
    let writers = o.get_max_workers().clamp(1, MAX_WORKER_CONNECTIONS);
    let claims = o.get_fetch_concurrency().max(1);
    match o.get_claim_mode() {
        ClaimMode::Transaction => claims + writers,
        _ => claims + writers + 1,
    }
}

/// What [`Engine::connection_budget`] found: the connections the engine
/// wants and what the server and the pool have.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionBudget {
    /// Each subscriber's own connections: (name, count).
    pub subscribers: Vec<(String, usize)>,
    /// The LISTEN connection: 1, or 0 without LISTEN.
    pub listen: usize,
    /// The broker pool's `max_connections`.
    pub pool_max: u32,
    /// Connections the pool has open now (already counted in `in_use`).
    pub pool_open: u32,
    /// What the pool should hold at least: 1 for the gauge sampler, 1 for
    /// health probes, and `max_workers` for each subscriber without the
    /// relay defaults (its handlers may each hold a pooled connection
    /// while they run, e.g. to open a transaction and publish).
    pub pool_wanted: usize,
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// Connections only superusers (and, on PostgreSQL 16+, roles with
    /// `pg_use_reserved_connections`) may use:
    /// `superuser_reserved_connections` + `reserved_connections`.
    pub reserved: u32,
    /// Client connections open on the server now (`pg_stat_activity`,
    /// every database), this pool's included.
    pub in_use: u32,
}

impl ConnectionBudget {
    /// The engine's own connections: every subscriber's plus LISTEN.
    pub fn engine(&self) -> usize {
        self.subscribers.iter().map(|(_, n)| n).sum::<usize>() + self.listen
    }

    /// What the engine and the pool may still open: the engine's own
    /// connections plus the pool's room to grow.
    pub fn wanted(&self) -> usize {
        self.engine() + self.pool_max.saturating_sub(self.pool_open) as usize
    }

    /// What the server has left for ordinary roles now:
    /// `max_connections - reserved - in_use`.
    pub fn available(&self) -> usize {
        self.max_connections
            .saturating_sub(self.reserved)
            .saturating_sub(self.in_use) as usize
    }

    /// The problems found, worst first, each a sentence naming the
    /// numbers and what to change (empty: the budget fits).
    ///
    /// - the engine and the pool can never fit, even on an idle server
    ///   (`engine + pool_max > max_connections - reserved`);
    /// - they do not fit in what is left now (`wanted > available`);
    /// - the pool is smaller than [`pool_wanted`](Self::pool_wanted).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let per_sub = self
            .subscribers
            .iter()
            .map(|(n, c)| format!("{n}: {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let capacity = self.max_connections.saturating_sub(self.reserved) as usize;
        let fix = "lower fetch_concurrency or max_workers (at most 4 worker connections per \
                   subscriber), make the pool smaller, or raise the server's max_connections";
        if self.engine() + self.pool_max as usize > capacity {
            out.push(format!(
                "the outbox engine needs {} PostgreSQL connections of its own ({per_sub}; LISTEN: \
                 {}) plus up to {} for the pool, but the server allows {capacity} \
                 (max_connections {} - {} reserved) in all: connections will be refused \
                 (\"too many clients\") and the loops will retry; {fix}",
                self.engine(),
                self.listen,
                self.pool_max,
                self.max_connections,
                self.reserved
            ));
        } else if self.wanted() > self.available() {
            out.push(format!(
                "the outbox engine may open {} more PostgreSQL connections ({} of its own: \
                 {per_sub}; LISTEN: {}; and {} more the pool may open up to its {}), but the \
                 server has {} left (max_connections {} - {} reserved - {} in use): some will \
                 be refused (\"too many clients\") and retried; {fix}",
                self.wanted(),
                self.engine(),
                self.listen,
                self.pool_max.saturating_sub(self.pool_open),
                self.pool_max,
                self.available(),
                self.max_connections,
                self.reserved,
                self.in_use
            ));
        }
        if (self.pool_max as usize) < self.pool_wanted {
            out.push(format!(
                "the broker's pool holds at most {} connections, fewer than the {} it should \
                 (1 for the gauge sampler, 1 for health probes, and max_workers for each \
                 subscriber whose handlers may use it): handlers that open a transaction on it \
                 wait for each other (PoolTimedOut after the acquire timeout); raise the pool's \
                 max_connections (PgPoolOptions::max_connections) or lower max_workers",
                self.pool_max, self.pool_wanted
            ));
        }
        out
    }
}

impl Engine {
    /// Counts the PostgreSQL connections this engine opens (see the
    /// [table](crate::health#connection-budget): per subscriber `fetch_concurrency` +
    /// `min(max_workers, 4)` + 1 acker in lease mode, no acker in
    /// transaction mode; one LISTEN per engine) and reads the server's
    /// `max_connections`, its reserved connections and the client
    /// connections open now. [`start`](Self::start) runs it once and logs
    /// each of [`ConnectionBudget::problems`] at WARN (`event =
    /// "connection_budget"`); it does not refuse to start (connections in
    /// use come and go, and the loops retry a refused connection).
    ///
    /// Fails on the in-memory backend, or if the settings cannot be read.
    ///
    /// ```no_run
    /// # async fn demo(engine: outbox_core::Engine) -> Result<(), outbox_core::Error> {
    /// let budget = engine.connection_budget().await?;
    /// println!("the engine opens {} connections, the server has {} left", budget.engine(), budget.available());
    /// for p in budget.problems() {
    ///     eprintln!("{p}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn connection_budget(&self) -> Result<ConnectionBudget> {
        let pool = self.broker.backend().pool_for("connection_budget")?;
        let row: (i32, i32, i32, i64) = sqlx::query_as(
            "SELECT current_setting('max_connections')::int, \
                    current_setting('superuser_reserved_connections')::int, \
                    coalesce(current_setting('reserved_connections', true)::int, 0), \
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
        )
        .fetch_one(pool)
        .await
        .map_err(|e| Error::config(format!("cannot read the server's connection limits: {e}")))?;
        let to_u32 = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        let subscribers = self
            .subscribers
            .iter()
            .map(|s| (s.name().to_owned(), subscriber_connections(s)))
            .collect();
        let pool_wanted = 1
            + usize::from(self.gauge_interval.is_some())
            + self
                .subscribers
                .iter()
                .filter(|s| !s.options().get_relay_defaults())
                .map(|s| s.options().get_max_workers())
                .sum::<usize>();
        Ok(ConnectionBudget {
            subscribers,
            listen: usize::from(!matches!(self.listen, super::ListenMode::Off)),
            pool_max: pool.options().get_max_connections(),
            pool_open: pool.size(),
            pool_wanted,
            max_connections: to_u32(row.0.into()),
            reserved: to_u32(i64::from(row.1) + i64::from(row.2)),
            in_use: to_u32(row.3),
        })
    }

    /// [`connection_budget`](Self::connection_budget), logged: its problems
    /// at WARN, else one DEBUG line.
    pub(crate) async fn log_connection_budget(&self) {
        match self.connection_budget().await {
            Ok(b) => {
                let problems = b.problems();
                for p in &problems {
                    tracing::warn!(
                        event = "connection_budget",
                        engine_connections = b.engine(),
                        pool_max = b.pool_max,
                        available = b.available(),
                        "{p}"
                    );
                }
                if problems.is_empty() {
                    tracing::debug!(
                        engine_connections = b.engine(),
                        available = b.available(),
                        "the outbox engine's connections fit the server's budget"
                    );
                }
            }
            Err(e) => tracing::debug!("cannot check the connection budget: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> ConnectionBudget {
        ConnectionBudget {
            subscribers: vec![("a".into(), 6), ("b".into(), 3)],
            listen: 1,
            pool_max: 10,
            pool_open: 2,
            pool_wanted: 4,
            max_connections: 100,
            reserved: 3,
            in_use: 20,
        }
    }

    #[test]
    fn a_budget_that_fits_has_no_problem() {
        let b = budget();
        assert_eq!(b.engine(), 10);
        assert_eq!(b.wanted(), 18);
        assert_eq!(b.available(), 77);
        assert!(b.problems().is_empty(), "{:?}", b.problems());
    }

    #[test]
    fn too_few_connections_left_names_the_numbers() {
        let b = ConnectionBudget {
            in_use: 85,
            ..budget()
        };
        assert_eq!(b.available(), 12);
        let p = b.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("may open 18 more"), "{}", p[0]);
        assert!(p[0].contains("has 12 left"), "{}", p[0]);
        assert!(p[0].contains("a: 6, b: 3"), "{}", p[0]);
        assert!(p[0].contains("fetch_concurrency"), "{}", p[0]);
    }

    #[test]
    fn a_server_too_small_in_all_is_reported_first() {
        let b = ConnectionBudget {
            max_connections: 18,
            reserved: 3,
            in_use: 2,
            ..budget()
        };
        let p = b.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("allows 15"), "{}", p[0]);
        assert!(p[0].contains("needs 10"), "{}", p[0]);
    }

    #[test]
    fn a_small_pool_is_reported() {
        let b = ConnectionBudget {
            pool_max: 2,
            pool_wanted: 6,
            ..budget()
        };
        let p = b.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("at most 2 connections, fewer than the 6"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn subscriber_connections_follow_the_claim_mode() {
        use crate::engine::message::Message;
        use crate::engine::subscriber::Subscriber;
        let h = |_m: Message| async { Ok::<_, crate::error::BoxError>(()) };
        let lease = Subscriber::builder(["q"])
            .max_workers(16)
            .fetch_concurrency(2)
            .build(h)
            .expect("valid");
        assert_eq!(subscriber_connections(&lease), 2 + 4 + 1);
        let one = Subscriber::builder(["q"]).build(h).expect("valid");
        assert_eq!(subscriber_connections(&one), 1 + 1 + 1);
        let lots = Subscriber::builder(["q"])
            .claim_mode(ClaimMode::Transaction)
            .fetch_concurrency(3)
            .max_workers(2)
            .build(h)
            .expect("valid");
        assert_eq!(subscriber_connections(&lots), 3 + 2);
    }
}
