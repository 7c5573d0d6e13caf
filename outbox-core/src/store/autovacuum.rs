//! Autovacuum tuning for the outbox table: [`autovacuum_sql`] builds the
//! `ALTER TABLE … SET (…)` that [`schema`](super::schema) reports as the fix
//! and `ops` exposes (`outbox_core::ops::autovacuum_sql`).

use std::time::Duration;

use super::table::OutboxTable;

/// Per-table autovacuum settings for the outbox; see [`autovacuum_sql`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutovacuumOptions {
    /// `autovacuum_vacuum_threshold`: dead rows that trigger a vacuum (the
    /// scale factor is set to 0, so this is absolute). Default 1000.
    pub vacuum_threshold: u64,
    /// `autovacuum_vacuum_insert_threshold` (PostgreSQL 13+): inserted rows
    /// that trigger a vacuum (scale factor 0). Default 1000.
    pub insert_threshold: u64,
    /// `autovacuum_vacuum_cost_delay` (PostgreSQL takes 0 to 100 ms); unset
    /// by default (the server's setting applies).
    pub cost_delay: Option<Duration>,
    /// `autovacuum_vacuum_cost_limit` (1 to 10000); unset by default.
    pub cost_limit: Option<u32>,
}

impl Default for AutovacuumOptions {
    fn default() -> Self {
        Self {
            vacuum_threshold: 1000,
            insert_threshold: 1000,
            cost_delay: None,
            cost_limit: None,
        }
    }
}

/// The `ALTER TABLE … SET (…)` that tunes autovacuum for the outbox table
/// (faststream-outbox's `outbox_autovacuum_ddl`, with the identifiers always
/// quoted).
///
/// Every message costs an insert, a lease update that cannot be HOT (it
/// changes indexed columns) and a delete, so the table churns through dead
/// tuples while staying small: the default scale factors (a vacuum after 20%
/// of the table changed) let a hot outbox bloat. The scale factors go to 0 and
/// the thresholds become absolute row counts.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::OutboxTable;
/// use outbox_core::ops::{autovacuum_sql, AutovacuumOptions};
///
/// let table = OutboxTable::new("outbox")?;
/// assert_eq!(
///     autovacuum_sql(&table, AutovacuumOptions::default()),
///     r#"ALTER TABLE "outbox" SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 1000)"#
/// );
/// let sql = autovacuum_sql(
///     &table.schema("app")?,
///     AutovacuumOptions { cost_delay: Some(Duration::ZERO), cost_limit: Some(2000), ..Default::default() },
/// );
/// assert!(sql.starts_with(r#"ALTER TABLE "app"."outbox" SET ("#));
/// assert!(sql.ends_with("autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_cost_limit = 2000)"));
/// # Ok::<(), outbox_core::Error>(())
/// ```
pub fn autovacuum_sql(table: &OutboxTable, opts: AutovacuumOptions) -> String {
    let mut settings = vec![
        "autovacuum_vacuum_scale_factor = 0".to_owned(),
        format!("autovacuum_vacuum_threshold = {}", opts.vacuum_threshold),
        "autovacuum_vacuum_insert_scale_factor = 0".to_owned(),
        format!(
            "autovacuum_vacuum_insert_threshold = {}",
            opts.insert_threshold
        ),
    ];
    if let Some(delay) = opts.cost_delay {
        // Milliseconds, fractional allowed; `{}` of an f64 prints 2.0 as "2".
        let ms = delay.as_secs_f64() * 1000.0;
        settings.push(format!("autovacuum_vacuum_cost_delay = {ms}"));
    }
    if let Some(limit) = opts.cost_limit {
        settings.push(format!("autovacuum_vacuum_cost_limit = {limit}"));
    }
    format!(
        "ALTER TABLE {} SET ({})",
        table.qualified_name(),
        settings.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autovacuum_fractional_cost_delay() {
        let t = OutboxTable::new("outbox").expect("valid");
        let sql = autovacuum_sql(
            &t,
            AutovacuumOptions {
                cost_delay: Some(Duration::from_micros(2500)),
                ..Default::default()
            },
        );
        assert!(
            sql.ends_with("autovacuum_vacuum_cost_delay = 2.5)"),
            "{sql}"
        );
    }
}
