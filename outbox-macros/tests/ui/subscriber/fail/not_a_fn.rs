use outbox_core::subscriber;

#[subscriber("orders")]
struct Handler;

fn main() {}
