// A handler declared by a `macro_rules!` (the attribute sees the invisible
// groups around `$queue`, `$ty` and `$workers`).
use outbox_core::{publish_to, subscriber};

macro_rules! handler {
    ($name:ident, $queue:literal, $ty:ty, $workers:expr) => {
        #[publish_to(kafka, "out")]
        #[subscriber($queue, max_workers = $workers)]
        async fn $name(value: $ty) -> Option<$ty> {
            Some(value)
        }
    };
}

handler!(first, "first", i64, 2);
handler!(second, "second", String, 3);

fn main() {
    let _ = outbox_core::IntoRoute::into_route(first {});
    let _ = outbox_core::IntoRoute::into_route(second {});
}
