//! The redis bus for the `bus` scenario.
