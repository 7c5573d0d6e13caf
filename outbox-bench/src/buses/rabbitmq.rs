//! The rabbitmq bus for the `bus` scenario.
