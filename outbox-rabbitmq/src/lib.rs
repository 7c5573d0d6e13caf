//! The RabbitMQ transport of [`outbox_core`] (under construction).
