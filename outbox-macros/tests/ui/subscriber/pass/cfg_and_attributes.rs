// `#[cfg]` below `#[subscriber]` is still on the fn when the attribute
// expands: it is repeated on the generated items. Other attributes stay on
// the fn; calling a deprecated handler from the generated code is allowed.
#![deny(warnings)]

use outbox_core::subscriber;

#[subscriber("never")]
#[cfg(any())]
async fn never(n: i64) {
    let _ = n;
}

#[subscriber("always")]
#[cfg(all())]
#[deprecated = "use the new handler"]
#[allow(clippy::unused_async)]
async fn always(n: i64) {
    let _ = n;
}

fn main() {
    let _ = outbox_core::IntoRoute::into_route(always {});
}
