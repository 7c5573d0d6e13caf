//! The nats bus for the `bus` scenario.
