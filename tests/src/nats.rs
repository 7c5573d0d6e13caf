//! Helpers shared by the nats test binaries (`tests/tests/*nats*.rs`).
