//! Helpers shared by the rabbitmq test binaries (`tests/tests/*rabbitmq*.rs`).
