// `ordered` as a bare flag or with a bool, and `poison_policy` as a bare
// variant, through its enum, or through the `crate = "..."` facade.
mod facade {
    pub use ::outbox_core as outbox;
}

use outbox_core::{IntoRoute, PoisonPolicy, Route, subscriber};

#[subscriber("orders", ordered)]
async fn flag(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered = true, poison_policy = DeadLetterAndContinue)]
async fn continue_on_poison(order_id: i64) {
    let _ = order_id;
}

// The flag may come after the option it enables.
#[subscriber("orders", poison_policy = PoisonPolicy::Block, ordered)]
async fn block(order_id: i64) {
    let _ = order_id;
}

#[subscriber(
    "orders",
    ordered,
    poison_policy = outbox_core::PoisonPolicy::DeadLetterAndContinue
)]
async fn full_path(order_id: i64) {
    let _ = order_id;
}

#[subscriber(
    "orders",
    ordered,
    poison_policy = DeadLetterAndContinue,
    crate = "facade::outbox"
)]
async fn through_facade(order_id: i64) {
    let _ = order_id;
}

#[subscriber("orders", ordered = false)]
async fn unordered(order_id: i64) {
    let _ = order_id;
}

fn options(route: Route) -> String {
    let debug = format!("{route:?}");
    let ordered = debug.split("ordered: ").nth(1).unwrap();
    let policy = debug.split("poison_policy: ").nth(1).unwrap();
    let end = |s: &str| s.split([',', ' ', '}']).next().unwrap().to_owned();
    format!("{} {}", end(ordered), end(policy))
}

fn main() {
    assert_eq!(options(flag {}.into_route()), "true Block");
    assert_eq!(
        options(continue_on_poison {}.into_route()),
        "true DeadLetterAndContinue"
    );
    assert_eq!(options(block {}.into_route()), "true Block");
    assert_eq!(
        options(full_path {}.into_route()),
        "true DeadLetterAndContinue"
    );
    assert_eq!(
        options(through_facade {}.into_route()),
        "true DeadLetterAndContinue"
    );
    assert_eq!(options(unordered {}.into_route()), "false Block");
}
