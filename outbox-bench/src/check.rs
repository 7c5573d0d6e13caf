//! `check`: the CI gate on machine-independent figures.
//!
//! Runs a small fixed set of scenarios and compares, per scenario, the
//! statements per kind, the round trips, the tuple counters and the rows
//! left with a checked-in baseline. Timings are never gated.
//!
//! Rules (stored with each value in the baseline, so the file explains
//! itself):
//! - `exact`: counts that are deterministic (an INSERT per publish, BEGIN and
//!   COMMIT per transaction, one lease UPDATE per row, rows deleted, rows
//!   left) must be equal. A change either way fails: an improvement is a deliberate
//!   baseline update (`--write-baseline`).
//! - `max`: counts that depend on timing (claims and polls, batched deletes
//!   that flush early when the buffer runs dry, total round trips) may not
//!   exceed `value × (1 + rel) + abs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use outbox_core::ClaimMode;
use serde::{Deserialize, Serialize};

use crate::db::{Db, Delta, Hold};
use crate::drain::{self, DrainParams, Knobs};
use crate::latency::{self, LatencyParams};
use crate::point::Finished;
use crate::produce::{self, Mode, ProduceParams};

/// How a gated value may change.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "lowercase")]
pub(crate) enum Rule {
    /// Must be equal.
    Exact,
    /// May not exceed `value * (1 + rel) + abs`.
    Max { rel: f64, abs: f64 },
}

/// A gated value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Gated {
    pub(crate) value: i64,
    #[serde(flatten)]
    pub(crate) rule: Rule,
}

/// One scenario of the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ScenarioBaseline {
    pub(crate) messages: u64,
    pub(crate) metrics: BTreeMap<String, Gated>,
}

/// The baseline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Baseline {
    pub(crate) about: String,
    pub(crate) written_by: serde_json::Value,
    pub(crate) scenarios: BTreeMap<String, ScenarioBaseline>,
}

/// The CI-sized set: (name, scenario).
enum Case {
    Produce(ProduceParams),
    Drain(DrainParams),
    Latency(LatencyParams),
}

fn cases(payload_bytes: usize) -> Vec<(&'static str, Case)> {
    let produce = |mode, batch_size, messages| {
        Case::Produce(ProduceParams {
            mode,
            batch_size,
            messages,
            concurrency: 1,
            payload_bytes,
            keys: 0,
            drop_key_index: false,
        })
    };
    let drain_in = |claim, backlog, workers, fetch_batch_size, ack_batch, keys: u64| {
        Case::Drain(DrainParams {
            backlog,
            knobs: Knobs {
                workers,
                fetch_batch_size,
                ack_batch,
                min_fetch: Duration::from_millis(1),
                max_fetch: Duration::from_millis(10),
                fetch_concurrency: 1,
                durable_acks: false,
                // A keyed backlog is drained by an ordered subscriber.
                ordered: keys > 0,
                claim,
            },
            listen: true,
            payload_bytes,
            keys,
            hold: Hold::None,
            poison: false,
        })
    };
    // The subscriber's default claim (the lease) …
    let drain = |backlog, workers, fetch_batch_size, ack_batch, keys| {
        drain_in(None, backlog, workers, fetch_batch_size, ack_batch, keys)
    };
    // … and the transaction-held claim, set explicitly.
    let drain_tx = |backlog, workers, fetch_batch_size, ack_batch, keys| {
        drain_in(
            Some(ClaimMode::Transaction),
            backlog,
            workers,
            fetch_batch_size,
            ack_batch,
            keys,
        )
    };
    vec![
        ("produce/single", produce(Mode::Single, 1, 2_000)),
        ("produce/autocommit", produce(Mode::Autocommit, 1, 1_000)),
        ("produce/batch100", produce(Mode::Batch, 100, 5_000)),
        ("drain/w1/b100/ack1", drain(2_000, 1, 100, 1, 0)),
        ("drain/w4/b100/ack1", drain(2_000, 4, 100, 1, 0)),
        ("drain/w1/b1000/ack100", drain(5_000, 1, 1_000, 100, 0)),
        ("drain/w4/b1000/ack1000", drain(5_000, 4, 1_000, 1_000, 0)),
        // The ordered claim (head of each of 100 keys, key walk): one lease
        // UPDATE and one DELETE per row, as the unordered claim.
        (
            "drain/ordered/k100/w4/b1000/ack100",
            drain(5_000, 4, 1_000, 100, 100),
        ),
        // The transaction-held claim (ClaimMode::Transaction): rows locked
        // FOR UPDATE SKIP LOCKED, deleted in the claim's transaction. No
        // lease UPDATE: zero tuples updated and one DELETE per row, exactly;
        // one BEGIN / COMMIT per claim (timing-dependent, as the claims).
        // A claim's handlers all run at once (max_workers does not apply).
        (
            "drain/transaction/b1000",
            drain_tx(5_000, 4, 1_000, 1_000, 0),
        ),
        ("drain/transaction/b100", drain_tx(2_000, 4, 100, 100, 0)),
        (
            "drain/transaction/ordered/k100/b1000",
            drain_tx(5_000, 4, 1_000, 100, 100),
        ),
        (
            "latency/idle",
            Case::Latency(LatencyParams {
                samples: 100,
                warmup: 5,
                interval: Duration::from_millis(20),
                payload_bytes,
                relay: None,
                listen: true,
                ordered: false,
                keys: 0,
                claim: None,
            }),
        ),
    ]
}

/// The gated values of one result, with their rules.
fn metrics(case: &Case, f: &Finished) -> anyhow::Result<BTreeMap<String, Gated>> {
    let d: &Delta = &f.delta;
    let Some(by_kw) = &d.by_keyword else {
        bail!("pg_stat_statements is not available: the gate needs it (use scripts/bench-pg.sh)");
    };
    let exact = |value| Gated {
        value,
        rule: Rule::Exact,
    };
    let loose = |value, rel, abs| Gated {
        value,
        rule: Rule::Max { rel, abs },
    };
    // Spaced single publishes: each row is claimed and acked on its own.
    let one_by_one = matches!(case, Case::Latency(_));
    // A transaction-held claim opens a transaction per claim: BEGIN and
    // COMMIT follow the claims (timing), not the rows.
    let tx_claims = match case {
        Case::Drain(p) => p.knobs.options().get_claim_mode() == ClaimMode::Transaction,
        _ => false,
    };
    let mut m = BTreeMap::new();
    // What the statements may add up to when each kind stays within its own
    // allowance: the bound of `calls.total`.
    let mut total_allowed = 0.0;
    for (kw, calls) in by_kw {
        let rule = match *kw {
            "begin" | "commit" | "rollback" if tx_claims => loose(*calls, 0.5, 10.0),
            "insert" | "begin" | "commit" | "rollback" => exact(*calls),
            // Spaced single messages: a DELETE each. Fewer is fine (two rows
            // a slow subscriber claimed together share one); more is not.
            "delete" if one_by_one => loose(*calls, 0.0, 2.0),
            // Deletes are coalesced (terminal_flush_batch_size, early flushes
            // when the buffer runs dry, and the engine may coalesce per-row
            // acks too): timing-dependent.
            "delete" => loose(*calls, 1.0, 20.0),
            // Claims (WITH … UPDATE) and polls depend on timing.
            "with" | "select" | "update" => loose(*calls, 0.5, 10.0),
            _ => loose(*calls, 0.5, 3.0),
        };
        total_allowed += max_allowed(&rule);
        m.insert(format!("calls.{kw}"), rule);
    }
    if let Some(c) = d.calls {
        // The total may grow by what its parts may (deletes and claims vary
        // with timing, e.g. when other work shares the cores and fewer acks
        // coalesce), not less: a tighter total would fail runs in which every
        // statement kind is within its own bound.
        let slack = (total_allowed - c as f64).max(10.0).ceil();
        m.insert("calls.total".into(), loose(c, 0.0, slack));
    }
    m.insert("tuples.inserted".into(), exact(d.tup_ins));
    m.insert("tuples.updated".into(), exact(d.tup_upd));
    m.insert("tuples.deleted".into(), exact(d.tup_del));
    m.insert("rows_left".into(), exact(f.rows_left));
    Ok(m)
}

/// The largest value `g` allows (`Exact`: the value itself).
fn max_allowed(g: &Gated) -> f64 {
    match g.rule {
        Rule::Exact => g.value as f64,
        Rule::Max { rel, abs } => g.value as f64 * (1.0 + rel) + abs,
    }
}

fn allowed(g: &Gated) -> String {
    match g.rule {
        Rule::Exact => format!("== {}", g.value),
        Rule::Max { rel, abs } => format!("<= {:.0}", g.value as f64 * (1.0 + rel) + abs),
    }
}

/// Compares; returns (failures, notes).
fn compare(
    name: &str,
    base: &ScenarioBaseline,
    got: &BTreeMap<String, Gated>,
) -> (Vec<String>, Vec<String>) {
    let (mut fails, mut notes) = (Vec::new(), Vec::new());
    for (k, b) in &base.metrics {
        let v = got.get(k).map_or(0, |g| g.value);
        match b.rule {
            Rule::Exact if v != b.value => fails.push(format!(
                "{name}: {k} = {v}, baseline {} (exact); {}",
                b.value,
                if v < b.value {
                    "fewer: if intended, refresh the baseline with --write-baseline"
                } else {
                    "more: a regression"
                }
            )),
            Rule::Max { rel, abs } if v as f64 > b.value as f64 * (1.0 + rel) + abs => {
                fails.push(format!(
                    "{name}: {k} = {v}, allowed {} (baseline {}): a regression",
                    allowed(b),
                    b.value
                ));
            }
            Rule::Max { rel, abs } if (v as f64) < (b.value as f64 * (1.0 - rel) - abs) => {
                notes.push(format!(
                    "{name}: {k} = {v}, well below baseline {}: consider --write-baseline",
                    b.value
                ));
            }
            _ => {}
        }
    }
    for (k, g) in got {
        if !base.metrics.contains_key(k) && g.value != 0 {
            fails.push(format!(
                "{name}: new statement kind {k} = {} (not in the baseline); if intended, refresh \
                 the baseline with --write-baseline",
                g.value
            ));
        }
    }
    (fails, notes)
}

async fn run_case(db: &Db, case: &Case) -> anyhow::Result<Finished> {
    match case {
        Case::Produce(p) => produce::run(db, p).await,
        Case::Drain(p) => drain::run(db, p).await,
        Case::Latency(p) => latency::run(db, p).await,
    }
}

fn messages_of(case: &Case) -> u64 {
    match case {
        Case::Produce(p) => p.messages,
        Case::Drain(p) => p.backlog,
        Case::Latency(p) => p.samples + p.warmup,
    }
}

/// Runs the gate; `Ok(false)` when something regressed.
pub(crate) async fn run(
    db: &Db,
    baseline: &Path,
    write: bool,
    runs: u32,
    payload_bytes: usize,
) -> anyhow::Result<bool> {
    let started = std::time::Instant::now();
    let base: Option<Baseline> = if write {
        None
    } else {
        let text = std::fs::read_to_string(baseline)
            .with_context(|| format!("reading the baseline {}", baseline.display()))?;
        Some(
            serde_json::from_str(&text)
                .with_context(|| format!("parsing the baseline {}", baseline.display()))?,
        )
    };
    let mut fresh = BTreeMap::new();
    let (mut fails, mut notes) = (Vec::new(), Vec::new());
    // Writing: each scenario runs `runs` times; timing-dependent values keep
    // their maximum, deterministic ones must agree.
    let runs = if write { runs.max(1) } else { 1 };
    for (name, case) in cases(payload_bytes) {
        let mut got: BTreeMap<String, Gated> = BTreeMap::new();
        for run in 0..runs {
            let t = std::time::Instant::now();
            let f = run_case(db, &case)
                .await
                .with_context(|| format!("scenario {name}"))?;
            let this = metrics(&case, &f)?;
            println!("{}", f.json);
            let summary: Vec<String> = this
                .iter()
                .filter(|(k, _)| k.starts_with("calls."))
                .map(|(k, g)| format!("{}={}", &k[6..], g.value))
                .collect();
            eprintln!(
                "check: {name:<24} {:>5} msgs  {}  ({:.1?})",
                messages_of(&case),
                summary.join(" "),
                t.elapsed()
            );
            if run == 0 {
                got = this;
                continue;
            }
            for (k, g) in this {
                match got.get_mut(&k) {
                    None => {
                        got.insert(k, g);
                    }
                    Some(prev) => match g.rule {
                        Rule::Exact if prev.value != g.value => bail!(
                            "{name}: {k} is gated as exact but differed between runs ({} vs {}); \
                             it is not deterministic: make its rule `max` in outbox-bench/src/check.rs",
                            prev.value,
                            g.value
                        ),
                        Rule::Exact => {}
                        Rule::Max { .. } => prev.value = prev.value.max(g.value),
                    },
                }
            }
        }
        if let Some(base) = &base {
            match base.scenarios.get(name) {
                None => fails.push(format!(
                    "{name}: not in the baseline; refresh it with --write-baseline"
                )),
                Some(b) if b.messages != messages_of(&case) => fails.push(format!(
                    "{name}: the baseline was made with {} messages, this check runs {}; refresh it \
                     with --write-baseline",
                    b.messages,
                    messages_of(&case)
                )),
                Some(b) => {
                    let (f, n) = compare(name, b, &got);
                    fails.extend(f);
                    notes.extend(n);
                }
            }
        }
        fresh.insert(
            name.to_owned(),
            ScenarioBaseline {
                messages: messages_of(&case),
                metrics: got,
            },
        );
    }
    if write {
        let b = Baseline {
            about: "outbox-bench CI gate: PostgreSQL statements and tuples per scenario (machine \
                    independent). `exact` values must match; `max` values may not exceed value × \
                    (1 + rel) + abs. Timings are never gated. Regenerate with `cargo run --release \
                    -p outbox-bench -- check --baseline bench/baseline.json --write-baseline` \
                    against `bash scripts/bench-pg.sh start`."
                .to_owned(),
            written_by: crate::build_info(),
            scenarios: fresh,
        };
        let text = serde_json::to_string_pretty(&b)? + "\n";
        std::fs::write(baseline, text)
            .with_context(|| format!("writing {}", baseline.display()))?;
        eprintln!(
            "check: wrote {} ({:.1?})",
            baseline.display(),
            started.elapsed()
        );
        return Ok(true);
    }
    for n in &notes {
        eprintln!("check: note: {n}");
    }
    if fails.is_empty() {
        eprintln!(
            "check: OK, every gated figure matches {} ({:.1?})",
            baseline.display(),
            started.elapsed()
        );
        Ok(true)
    } else {
        for f in &fails {
            eprintln!("check: FAIL: {f}");
        }
        eprintln!(
            "check: {} regression(s) against {} ({:.1?})",
            fails.len(),
            baseline.display(),
            started.elapsed()
        );
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(metrics: &[(&str, Gated)]) -> ScenarioBaseline {
        ScenarioBaseline {
            messages: 10,
            metrics: metrics.iter().map(|(k, g)| ((*k).to_owned(), *g)).collect(),
        }
    }

    #[test]
    fn exact_values_must_match_and_max_values_may_not_grow() {
        let exact = Gated {
            value: 100,
            rule: Rule::Exact,
        };
        let loose = Gated {
            value: 100,
            rule: Rule::Max {
                rel: 0.5,
                abs: 10.0,
            },
        };
        let b = base(&[("calls.insert", exact), ("calls.with", loose)]);
        let got = |i: i64, w: i64| -> BTreeMap<String, Gated> {
            [
                ("calls.insert".to_owned(), Gated { value: i, ..exact }),
                ("calls.with".to_owned(), Gated { value: w, ..loose }),
            ]
            .into_iter()
            .collect()
        };
        assert!(compare("s", &b, &got(100, 160)).0.is_empty());
        assert_eq!(compare("s", &b, &got(100, 161)).0.len(), 1);
        assert_eq!(compare("s", &b, &got(99, 100)).0.len(), 1);
        assert_eq!(compare("s", &b, &got(100, 20)).1.len(), 1);
        let mut extra = got(100, 100);
        extra.insert("calls.select".into(), Gated { value: 3, ..loose });
        assert_eq!(compare("s", &b, &extra).0.len(), 1);
    }

    #[test]
    fn rules_round_trip_through_json() {
        let g = Gated {
            value: 7,
            rule: Rule::Max { rel: 0.5, abs: 3.0 },
        };
        let s = serde_json::to_string(&g).unwrap_or_default();
        assert_eq!(s, r#"{"value":7,"rule":"max","rel":0.5,"abs":3.0}"#);
        let back: Gated = serde_json::from_str(&s).unwrap_or(Gated {
            value: 0,
            rule: Rule::Exact,
        });
        assert_eq!(back, g);
    }
}
