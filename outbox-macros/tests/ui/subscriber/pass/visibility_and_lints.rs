// The marker struct follows the fn's visibility, and the generated code is
// clean under strict lints.
#![forbid(unsafe_code)]
#![deny(
    warnings,
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    unused_qualifications
)]
//! Handlers.

/// Handlers of the orders queues.
pub mod handlers {
    use outbox_core::subscriber;

    /// Handles an order.
    #[subscriber("orders")]
    pub async fn handle(order_id: i64) {
        let _ = order_id;
    }

    #[subscriber("private")]
    async fn private(order_id: i64) {
        let _ = order_id;
    }

    /// Crate-visible.
    #[subscriber("crate")]
    pub(crate) async fn crate_visible(order_id: i64) {
        let _ = order_id;
    }
}

fn main() {
    let _ = handlers::handle {};
    let _ = handlers::crate_visible {};
}
