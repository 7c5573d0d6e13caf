//! The source identity of an outbox table: a stable text naming the table
//! across clusters, databases and schemas, which transports combine with the
//! outbox row id where a bus deduplicates on an id (NATS `Nats-Msg-Id`).
//!
//! Row ids are unique within one table only: two outbox tables (two
//! services, two databases, two schemas) produce the same ids, so a bus-side
//! deduplication id made of the row id alone makes one table's message a
//! "duplicate" of the other's. The identity read here tells them apart:
//!
//! - on PostgreSQL, `<system_identifier>/<database oid>/<schema>.<table>`:
//!   the cluster's `system_identifier` (`pg_control_system()`, fixed when the
//!   cluster was initialised, kept by physical replicas), the database's oid
//!   and the table's schema-qualified name; one statement, run once;
//! - where `pg_control_system()` is not permitted (some managed services
//!   revoke it): `<server address>:<port>/<database name>/<schema>.<table>`,
//!   with a WARN (two clusters behind the same address, e.g. containers or a
//!   proxy, can then collide);
//! - on the in-memory backend of the test harness: `memory/<schema>.<table>`;
//! - or whatever the user set (`OutboxBroker::source_id`).
//!
//! Characters a bus header cannot carry (control characters) and `%` are
//! percent-encoded, so the identity is always one line of text.

use sqlx::PgPool;

use super::table::OutboxTable;
use crate::error::{Error, Result};

/// The longest explicit source id accepted, in bytes (it becomes part of
/// every deduplication id; JetStream keeps each one for the window).
pub(crate) const MAX_SOURCE_BYTES: usize = 255;

/// The first statement: the cluster, the database, the table's schema.
/// `$1`: the configured schema (NULL: resolve the table through the
/// `search_path`, else the current schema); `$2`: the quoted table name.
/// `pg_control_system()` is left unqualified on purpose: resolved through
/// the `search_path` like any function (`pg_catalog` comes first unless the
/// path names it later), which lets a test stand a refusing function in for it.
const CLUSTER_SQL: &str = "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
     (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())::text, \
     COALESCE($1, (SELECT n.nspname::text FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($2)), \
     current_schema()::text)";

/// The fallback statement: the server's address and port, the database name
/// and the table's schema (as in [`CLUSTER_SQL`]).
const FALLBACK_SQL: &str = "SELECT host(inet_server_addr()), inet_server_port(), \
     current_database()::text, \
     COALESCE($1, (SELECT n.nspname::text FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($2)), \
     current_schema()::text)";

/// `s` with `%` and control characters percent-encoded (UTF-8 bytes).
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '%' || c.is_control() {
            let mut buf = [0_u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `<schema>.<table>` (or `<table>` when no schema is known), escaped.
fn table_part(schema: Option<&str>, table: &str) -> String {
    match schema.filter(|s| !s.is_empty()) {
        Some(s) => format!("{}.{}", escape(s), escape(table)),
        None => escape(table),
    }
}

/// The identity on the in-memory backend: `memory/<schema>.<table>`.
pub(crate) fn memory(table: &OutboxTable) -> String {
    format!("memory/{}", table_part(table.schema_name(), table.name()))
}

/// The identity from the cluster: `<system_identifier>/<db oid>/<schema>.<table>`.
fn cluster(system_identifier: &str, db_oid: &str, schema: Option<&str>, table: &str) -> String {
    format!(
        "{}/{}/{}",
        escape(system_identifier),
        escape(db_oid),
        table_part(schema, table)
    )
}

/// The fallback identity: `<addr>:<port>/<database>/<schema>.<table>`; a
/// Unix-socket connection (no address) is `local`.
fn fallback(
    addr: Option<&str>,
    port: Option<i32>,
    database: &str,
    schema: Option<&str>,
    table: &str,
) -> String {
    let addr = addr.unwrap_or("local");
    let port = port.map_or_else(String::new, |p| format!(":{p}"));
    format!(
        "{}{port}/{}/{}",
        escape(addr),
        escape(database),
        table_part(schema, table)
    )
}

/// Checks an explicit source id (`OutboxBroker::source_id`).
pub(crate) fn check_explicit(id: &str) -> Result<()> {
    let fail = |reason: &str| {
        Err(Error::config(format!(
            "invalid outbox source id {id:?} (OutboxBroker::source_id): {reason}; use a short, \
             stable, one-line name unique among the outboxes that publish to the same bus, such \
             as \"orders-service\""
        )))
    };
    if id.trim().is_empty() {
        return fail("it is empty");
    }
    if id.chars().any(char::is_control) {
        return fail(
            "it holds a control character (a line break?), which bus headers cannot carry",
        );
    }
    if id.len() > MAX_SOURCE_BYTES {
        return fail(&format!(
            "it is {} bytes long, more than {MAX_SOURCE_BYTES}",
            id.len()
        ));
    }
    Ok(())
}

/// Whether `e` is the server's answer to a statement (a permission refused,
/// a function missing) rather than a connection or protocol failure.
fn answered(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(_))
}

/// Reads the identity of `table` from PostgreSQL: one statement, or two
/// when `pg_control_system()` is refused (then a WARN).
pub(crate) async fn read(pool: &PgPool, table: &OutboxTable) -> Result<String> {
    let schema = table.schema_name();
    let qualified = table.qualified_name();
    let first = sqlx::query_as::<_, (Option<String>, Option<String>, Option<String>)>(CLUSTER_SQL)
        .bind(schema)
        .bind(&qualified)
        .fetch_one(pool)
        .await;
    let refused = match first {
        Ok((Some(sysid), Some(oid), resolved)) => {
            return Ok(cluster(&sysid, &oid, resolved.as_deref(), table.name()));
        }
        Ok(_) => "pg_control_system() or pg_database returned no row".to_owned(),
        Err(e) if answered(&e) => e.to_string(),
        Err(e) => return Err(Error::SourceIdentity(e)),
    };
    let (addr, port, database, resolved) =
        sqlx::query_as::<_, (Option<String>, Option<i32>, String, Option<String>)>(FALLBACK_SQL)
            .bind(schema)
            .bind(&qualified)
            .fetch_one(pool)
            .await
            .map_err(Error::SourceIdentity)?;
    let id = fallback(
        addr.as_deref(),
        port,
        &database,
        resolved.as_deref(),
        table.name(),
    );
    tracing::warn!(
        source = %id,
        error = %refused,
        "cannot read the PostgreSQL cluster's system_identifier (pg_control_system(): \
         {refused}); this outbox's source identity falls back to `{id}` (server address, port, \
         database name, table). Deduplication ids built from it (NATS Nats-Msg-Id) may collide \
         with another cluster's outbox reached at the same address, port and database name \
         (containers, a proxy), which makes the bus drop its messages as duplicates, and they \
         change when the address does. Set an explicit, unique source with \
         OutboxBroker::source_id(\"orders-service\"), or grant EXECUTE on pg_control_system() \
         to the relay's role"
    );
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_identity_names_cluster_database_schema_and_table() {
        assert_eq!(
            cluster("7716180956082555048", "16384", Some("billing"), "outbox"),
            "7716180956082555048/16384/billing.outbox"
        );
        assert_eq!(cluster("1", "2", None, "outbox"), "1/2/outbox");
        assert_eq!(cluster("1", "2", Some(""), "outbox"), "1/2/outbox");
    }

    #[test]
    fn the_fallback_names_address_port_and_database() {
        assert_eq!(
            fallback(
                Some("10.0.0.5"),
                Some(5432),
                "shop",
                Some("public"),
                "outbox"
            ),
            "10.0.0.5:5432/shop/public.outbox"
        );
        assert_eq!(
            fallback(None, None, "shop", Some("public"), "outbox"),
            "local/shop/public.outbox",
            "a Unix socket has no address"
        );
        assert_eq!(
            fallback(Some("::1"), Some(5433), "shop", None, "outbox"),
            "::1:5433/shop/outbox"
        );
    }

    #[test]
    fn the_memory_identity_names_the_table() -> Result<()> {
        assert_eq!(memory(&OutboxTable::new("outbox")?), "memory/outbox");
        assert_eq!(
            memory(&OutboxTable::new("outbox")?.schema("billing")?),
            "memory/billing.outbox"
        );
        Ok(())
    }

    #[test]
    fn control_characters_and_percent_are_escaped() {
        assert_eq!(escape("a\nb"), "a%0Ab");
        assert_eq!(escape("100%"), "100%25");
        assert_eq!(escape("é b:c/d"), "é b:c/d");
        assert_eq!(
            cluster("1", "2", Some("s\r"), "t\u{85}"),
            "1/2/s%0D.t%C2%85"
        );
    }

    #[test]
    fn an_explicit_id_must_be_one_short_line() {
        assert!(check_explicit("orders-service").is_ok());
        for (bad, why) in [
            ("", "empty"),
            ("  ", "empty"),
            ("a\nb", "control character"),
        ] {
            let e = check_explicit(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains(why) && e.contains("source_id")),
                "{bad:?}: {e:?}"
            );
        }
        let long = "x".repeat(MAX_SOURCE_BYTES + 1);
        let e = check_explicit(&long).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("256 bytes")),
            "{e:?}"
        );
        assert!(check_explicit(&"x".repeat(MAX_SOURCE_BYTES)).is_ok());
    }
}
