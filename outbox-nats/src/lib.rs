//! The NATS transport of [`outbox_core`] (under construction).
