//! Destinations: the syntax of the names handlers write in
//! `#[publish_to(rabbit, "...")]` ([`parse`], [`check_destination`]) and
//! declaring durable queues, exchanges and bindings ([`declare`]).
//!
//! | destination | exchange | routing key |
//! |---|---|---|
//! | `orders` | the default exchange (`""`) | `orders` (the queue) |
//! | `billing/orders.created` | `billing` | `orders.created` |
//! | `billing/` | `billing` | `""` (fanout, headers exchanges) |
//! | `/odd/queue` | the default exchange | `odd/queue` (a queue whose name has a `/`) |
//!
//! The first `/` separates the exchange from the routing key. That is
//! unambiguous because AMQP 0-9-1 exchange names are made of
//! `a-z A-Z 0-9 - _ . :` only (the spec's grammar; the transport enforces
//! it), while routing keys and queue names may hold any character.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use crate::config::Settings;
use crate::connection::open;
use crate::error::{Error, Result};

/// AMQP's `shortstr` limit: names and routing keys are at most 255 bytes.
pub(crate) const MAX_NAME_BYTES: usize = 255;

/// Where a destination sends a message: an exchange and a routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Address<'a> {
    /// The exchange; `""` is the default exchange.
    pub(crate) exchange: &'a str,
    /// The routing key (for the default exchange: the queue).
    pub(crate) routing_key: &'a str,
}

/// Splits and checks `destination` (see the module docs).
pub(crate) fn parse(destination: &str) -> std::result::Result<Address<'_>, String> {
    let address = match destination.split_once('/') {
        None => Address {
            exchange: "",
            routing_key: destination,
        },
        Some((exchange, routing_key)) => Address {
            exchange,
            routing_key,
        },
    };
    if destination.is_empty() {
        return Err(
            "the destination is empty; name a queue (`orders`) or an exchange and a \
                    routing key (`exchange/routing.key`)"
                .to_owned(),
        );
    }
    if address.exchange.is_empty() {
        check_queue_name(address.routing_key)
            .map_err(|e| format!("{e} (a destination without an exchange names a queue)"))?;
    } else {
        check_exchange_name(address.exchange)?;
        check_routing_key(address.routing_key)?;
    }
    Ok(address)
}

/// [`parse`], for [`Transport::check_destination`](outbox_core::Transport::check_destination).
pub(crate) fn check_destination(destination: &str) -> std::result::Result<(), String> {
    parse(destination).map(|_| ())
}

/// A queue name: 1 to 255 bytes of UTF-8.
pub(crate) fn check_queue_name(queue: &str) -> std::result::Result<(), String> {
    if queue.is_empty() {
        return Err("the queue name is empty".to_owned());
    }
    if queue.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the queue name is {} bytes long; AMQP allows at most {MAX_NAME_BYTES}",
            queue.len()
        ));
    }
    if let Some(bad) = queue.chars().find(|c| c.is_control()) {
        return Err(format!(
            "the queue name contains the control character {bad:?}"
        ));
    }
    Ok(())
}

/// An exchange name: 1 to 255 bytes of `a-z A-Z 0-9 - _ . :` (AMQP 0-9-1's
/// grammar for exchange names).
pub(crate) fn check_exchange_name(exchange: &str) -> std::result::Result<(), String> {
    if exchange.is_empty() {
        return Err("the exchange name is empty".to_owned());
    }
    if let Some(bad) = exchange
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "the exchange name `{exchange}` contains {bad:?}; AMQP exchange names consist of \
             ASCII letters, digits, '-', '_', '.' and ':' (the first '/' of a destination \
             separates the exchange from the routing key)"
        ));
    }
    if exchange.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the exchange name is {} characters long; AMQP allows at most {MAX_NAME_BYTES}",
            exchange.len()
        ));
    }
    Ok(())
}

/// A routing key: at most 255 bytes (may be empty, for fanout exchanges).
pub(crate) fn check_routing_key(key: &str) -> std::result::Result<(), String> {
    if key.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the routing key is {} bytes long; AMQP allows at most {MAX_NAME_BYTES}",
            key.len()
        ));
    }
    Ok(())
}

/// What [`declare`] declares.
#[derive(Debug, Clone)]
pub(crate) enum Declare<'a> {
    /// A durable queue.
    Queue(&'a str),
    /// A durable exchange of a kind.
    Exchange(&'a str, ExchangeKind),
    /// A binding of a queue to an exchange with a routing key.
    Binding {
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
    },
}

impl Declare<'_> {
    fn describe(&self) -> String {
        match self {
            Declare::Queue(q) => format!("queue `{q}`"),
            Declare::Exchange(x, kind) => format!("{kind:?} exchange `{x}`"),
            Declare::Binding {
                queue,
                exchange,
                routing_key,
            } => format!(
                "a binding of queue `{queue}` to exchange `{exchange}` with routing key `{routing_key}`"
            ),
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        match self {
            Declare::Queue(q) => check_queue_name(q),
            Declare::Exchange(x, _) => check_exchange_name(x),
            Declare::Binding {
                queue,
                exchange,
                routing_key,
            } => {
                check_queue_name(queue)?;
                check_exchange_name(exchange)?;
                check_routing_key(routing_key)
            }
        }
    }
}

/// Declares `what` (durable, idempotent: nothing changes if it exists with
/// the same settings) on a connection of its own, opened and closed within
/// the connect timeout.
pub(crate) async fn declare(settings: &Settings, what: Declare<'_>) -> Result<()> {
    let fail = |reason: String, source: Option<lapin::Error>| Error::Declare {
        what: what.describe(),
        url: settings.redacted_url(),
        reason,
        source: source.map(Box::new),
    };
    what.check().map_err(|r| fail(r, None))?;
    let timeout = settings.connect_timeout;
    let conn = open(settings, timeout).await?;
    let done = tokio::time::timeout(timeout, declare_on(&conn, &what)).await;
    let _ = tokio::time::timeout(timeout, conn.close(200, "declared".into())).await;
    match done {
        Ok(Ok(())) => {
            tracing::info!(transport = %settings.name, "declared {}", what.describe());
            Ok(())
        }
        Ok(Err(e)) => Err(fail(
            "the broker refused it (an existing one with other settings, a missing queue or \
             exchange, or no permission)"
                .to_owned(),
            Some(e),
        )),
        Err(_) => Err(fail(format!("no answer within {timeout:?}"), None)),
    }
}

async fn declare_on(conn: &Connection, what: &Declare<'_>) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match what {
        Declare::Queue(q) => {
            ch.queue_declare((*q).into(), durable, FieldTable::default())
                .await?;
        }
        Declare::Exchange(x, kind) => {
            let opts = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            ch.exchange_declare((*x).into(), kind.clone(), opts, FieldTable::default())
                .await?;
        }
        Declare::Binding {
            queue,
            exchange,
            routing_key,
        } => {
            ch.queue_bind(
                (*queue).into(),
                (*exchange).into(),
                (*routing_key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_name_a_queue_or_an_exchange_and_a_routing_key() {
        let a = |d| parse(d).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(
            a("orders"),
            Address {
                exchange: "",
                routing_key: "orders"
            }
        );
        assert_eq!(
            a("billing/orders.created"),
            Address {
                exchange: "billing",
                routing_key: "orders.created"
            }
        );
        assert_eq!(
            a("amq.topic/a/b"),
            Address {
                exchange: "amq.topic",
                routing_key: "a/b"
            }
        );
        assert_eq!(
            a("fan/"),
            Address {
                exchange: "fan",
                routing_key: ""
            }
        );
        assert_eq!(
            a("/odd/queue"),
            Address {
                exchange: "",
                routing_key: "odd/queue"
            }
        );
        assert_eq!(a(&"q".repeat(255)).routing_key.len(), 255);
    }

    #[test]
    fn invalid_destinations_are_refused_with_the_rule() {
        let err = |d: &str| parse(d).expect_err(d);
        assert!(err("").contains("empty"));
        assert!(err("/").contains("queue name is empty"));
        assert!(err(&"q".repeat(256)).contains("at most 255"));
        assert!(err("not an exchange!/orders").contains("' '"));
        assert!(err(&format!("x/{}", "k".repeat(256))).contains("routing key"));
        assert!(err(&format!("{}/k", "x".repeat(256))).contains("at most 255"));
        assert!(err("bad\nqueue").contains("control"));
    }
}
