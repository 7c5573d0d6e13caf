//! Keywords of the attributes' grammar, in one place.

/// The `#[subscriber]` attribute (matched on the last path segment).
pub(crate) const SUBSCRIBER: &str = "subscriber";
/// The `#[publish_to]` attribute (matched on the last path segment).
pub(crate) const PUBLISH_TO: &str = "publish_to";
/// The hidden `#[subscriber]` argument `#[publish_to]` appends.
pub(crate) const HIDDEN_PUBLISH_TO: &str = "__publish_to";

pub(crate) const NAME: &str = "name";
pub(crate) const MAX_WORKERS: &str = "max_workers";
pub(crate) const FETCH_BATCH_SIZE: &str = "fetch_batch_size";
pub(crate) const FETCH_CONCURRENCY: &str = "fetch_concurrency";
pub(crate) const LEASE_TTL: &str = "lease_ttl";
pub(crate) const LEASE_HEARTBEAT: &str = "lease_heartbeat";
pub(crate) const MIN_FETCH_INTERVAL: &str = "min_fetch_interval";
pub(crate) const MAX_FETCH_INTERVAL: &str = "max_fetch_interval";
pub(crate) const MAX_DELIVERIES: &str = "max_deliveries";
pub(crate) const TERMINAL_FLUSH_BATCH_SIZE: &str = "terminal_flush_batch_size";
pub(crate) const ACK_POLICY: &str = "ack_policy";
pub(crate) const RETRY: &str = "retry";
pub(crate) const PROPAGATE_HEADERS: &str = "propagate_headers";
pub(crate) const ORDERED: &str = "ordered";
pub(crate) const POISON_POLICY: &str = "poison_policy";
pub(crate) const CLAIM_MODE: &str = "claim_mode";
pub(crate) const MAX_HOLD: &str = "max_hold";
pub(crate) const EXACTLY_ONCE: &str = "exactly_once";
pub(crate) const CRATE: &str = "crate";

/// Every named `#[subscriber]` option, in documentation order.
pub(crate) const OPTIONS: &[&str] = &[
    NAME,
    MAX_WORKERS,
    FETCH_BATCH_SIZE,
    FETCH_CONCURRENCY,
    LEASE_TTL,
    LEASE_HEARTBEAT,
    MIN_FETCH_INTERVAL,
    MAX_FETCH_INTERVAL,
    MAX_DELIVERIES,
    TERMINAL_FLUSH_BATCH_SIZE,
    ACK_POLICY,
    RETRY,
    PROPAGATE_HEADERS,
    ORDERED,
    POISON_POLICY,
    CLAIM_MODE,
    MAX_HOLD,
    EXACTLY_ONCE,
    CRATE,
];

/// The options that may be written bare, as a flag: `ordered` is
/// `ordered = true`.
pub(crate) const FLAGS: &[&str] = &[ORDERED];

/// Deprecated: `lease_ttl_secs = 30` (seconds, integer or float).
pub(crate) const LEASE_TTL_SECS: &str = "lease_ttl_secs";
/// Deprecated: `min_fetch_interval_ms = 500` (milliseconds).
pub(crate) const MIN_FETCH_INTERVAL_MS: &str = "min_fetch_interval_ms";
/// Deprecated: `max_fetch_interval_ms = 5000` (milliseconds).
pub(crate) const MAX_FETCH_INTERVAL_MS: &str = "max_fetch_interval_ms";

/// Old spellings that still work (with a deprecation warning), each with
/// the option that replaced it.
pub(crate) const DEPRECATED: &[(&str, &str)] = &[
    (LEASE_TTL_SECS, LEASE_TTL),
    (MIN_FETCH_INTERVAL_MS, MIN_FETCH_INTERVAL),
    (MAX_FETCH_INTERVAL_MS, MAX_FETCH_INTERVAL),
];

/// The option that replaced the deprecated spelling `old`.
pub(crate) fn replacement(old: &str) -> Option<&'static str> {
    DEPRECATED
        .iter()
        .find(|(o, _)| *o == old)
        .map(|(_, new)| *new)
}

/// What a duration string looks like, for error messages.
pub(crate) const DURATION_USAGE: &str = "a string such as `\"10s\"`, `\"500ms\"`, `\"1m\"`, \
     `\"1h\"` or `\"2m30s\"` (one or more numbers, each with a unit: `h`, `m`, `s`, `ms`, \
     `us`, `ns`)";

/// An example of each option, quoted in error messages.
pub(crate) fn example(option: &str) -> &'static str {
    match option {
        NAME => "name = \"billing::handle\"",
        MAX_WORKERS => "max_workers = 4",
        FETCH_BATCH_SIZE => "fetch_batch_size = 100",
        FETCH_CONCURRENCY => "fetch_concurrency = 2",
        LEASE_TTL => "lease_ttl = \"30s\"",
        LEASE_HEARTBEAT => "lease_heartbeat = \"10s\"",
        MIN_FETCH_INTERVAL => "min_fetch_interval = \"500ms\"",
        MAX_FETCH_INTERVAL => "max_fetch_interval = \"5s\"",
        MAX_DELIVERIES => "max_deliveries = 20",
        TERMINAL_FLUSH_BATCH_SIZE => "terminal_flush_batch_size = 50",
        ACK_POLICY => "ack_policy = RejectOnError",
        RETRY => "retry = ConstantRetry::new(Duration::from_secs(5))",
        PROPAGATE_HEADERS => "propagate_headers = false",
        ORDERED => "ordered = true",
        POISON_POLICY => "poison_policy = DeadLetterAndContinue",
        CLAIM_MODE => "claim_mode = Transaction",
        MAX_HOLD => "max_hold = \"5s\"",
        EXACTLY_ONCE => "exactly_once = 4",
        CRATE => "crate = \"my_app::outbox\"",
        _ => "",
    }
}

/// The example value of a duration option (as in [`example`]).
pub(crate) fn example_duration(option: &str) -> &'static str {
    match option {
        LEASE_TTL => "30s",
        MIN_FETCH_INTERVAL => "500ms",
        MAX_FETCH_INTERVAL => "5s",
        _ => "10s",
    }
}

/// Spellings users reach for (other frameworks, the runtime's setter
/// names), mapped to ours.
pub(crate) fn alias(unknown: &str) -> Option<&'static str> {
    Some(match unknown {
        "workers" | "concurrency" | "max_concurrency" => MAX_WORKERS,
        "batch_size" | "fetch_batch" | "prefetch" => FETCH_BATCH_SIZE,
        "lease_ttl_s" | "lease_ttl_sec" | "lease_ttl_ms" | "lease" | "lease_timeout"
        | "lease_duration" | "ttl" | "visibility_timeout" => LEASE_TTL,
        "min_fetch_interval_s"
        | "min_fetch_interval_secs"
        | "min_poll_interval"
        | "min_interval"
        | "poll_interval"
        | "fetch_interval" => MIN_FETCH_INTERVAL,
        "max_fetch_interval_s"
        | "max_fetch_interval_secs"
        | "max_poll_interval"
        | "max_interval" => MAX_FETCH_INTERVAL,
        "max_attempts" | "max_retries" => MAX_DELIVERIES,
        "terminal_flush_batch" => TERMINAL_FLUSH_BATCH_SIZE,
        "ack" | "ack_mode" | "ackpolicy" => ACK_POLICY,
        "retry_strategy" | "retries" | "backoff" => RETRY,
        "propagate" | "forward_headers" => PROPAGATE_HEADERS,
        "fifo" | "ordering" | "in_order" | "sequential" | "keyed" | "per_key" => ORDERED,
        "poison" | "on_poison" | "poison_pill" => POISON_POLICY,
        "claim" | "claim_strategy" | "claiming" | "lock_mode" => CLAIM_MODE,
        "hold"
        | "max_hold_time"
        | "hold_timeout"
        | "max_transaction_time"
        | "transaction_timeout" => MAX_HOLD,
        "heartbeat"
        | "lease_heartbeat_interval"
        | "lease_renewal"
        | "lease_extension"
        | "renew_lease"
        | "keep_alive"
        | "keepalive" => LEASE_HEARTBEAT,
        "krate" | "outbox_crate" => CRATE,
        _ => return None,
    })
}

/// The three `AckPolicy` variants.
pub(crate) const ACK_POLICIES: &[&str] = &["NackOnError", "RejectOnError", "Manual"];

/// The two `PoisonPolicy` variants.
pub(crate) const POISON_POLICIES: &[&str] = &["Block", "DeadLetterAndContinue"];

/// The two `ClaimMode` variants.
pub(crate) const CLAIM_MODES: &[&str] = &["Lease", "Transaction"];

/// Longest queue name the runtime accepts (`outbox_core::MAX_NAME_CHARS`).
pub(crate) const MAX_QUEUE_CHARS: usize = 255;

/// The environment variable that makes the macros print their expansion.
pub(crate) const DEBUG_ENV: &str = "OUTBOX_MACROS_DEBUG";

/// `` `a`, `b`, `c` `` for error messages.
pub(crate) fn list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The option the user probably meant by `unknown`: a known alias, else the
/// closest option (or deprecated spelling, then its replacement) within a
/// small edit distance.
pub(crate) fn suggest(unknown: &str) -> Option<&'static str> {
    if let Some(known) = alias(unknown) {
        return Some(known);
    }
    let current = OPTIONS.iter().map(|o| (*o, *o));
    let old = DEPRECATED.iter().copied();
    current
        .chain(old)
        .map(|(spelling, option)| (edit_distance(unknown, spelling), spelling, option))
        .filter(|(d, spelling, _)| *d <= 2.max(spelling.len() / 5))
        .min_by_key(|(d, _, _)| *d)
        .map(|(_, _, option)| option)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
