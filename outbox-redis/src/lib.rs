//! The Redis transport of [`outbox_core`] (under construction).
