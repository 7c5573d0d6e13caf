//! Helpers shared by the redis test binaries (`tests/tests/*redis*.rs`).
