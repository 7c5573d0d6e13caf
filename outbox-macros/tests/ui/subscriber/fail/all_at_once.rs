use outbox_core::subscriber;

// A non-async, generic fn with a typo in an option and an empty queue:
// every error is reported in one build.
#[subscriber("", max_worker = 4, ack_policy = Always)]
fn handle<T>(body: T) {
    let _ = body;
}

fn main() {}
