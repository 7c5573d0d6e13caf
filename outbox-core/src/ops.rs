//! Operations: queue statistics, dead-letter inspection, replay and purge,
//! autovacuum tuning. The `outbox` command-line tool is built on these.
