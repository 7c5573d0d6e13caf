//! The attributes' argument grammar, read into typed values.
//!
//! A mistake in one argument is recorded in the [`Ctxt`] and parsing goes on
//! with the next argument, so the user sees every mistake at once. Mostly
//! only what is syntactic is decided here (the kind of each literal); the
//! values themselves are the runtime's business (`max_workers = 0` fails at
//! `App::run`, with the same message as the hand-written builder). Duration
//! strings are the exception: they are read here (a malformed or zero one
//! is an error at the literal) and expand to a plain `Duration`.

use std::time::Duration;

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{ToTokens, quote};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Lit, LitBool, LitInt, LitStr, Token, token};

use crate::ctxt::Ctxt;
use crate::duration;
use crate::symbol::*;

const QUEUE_USAGE: &str =
    "`#[subscriber(\"orders\")]` or `#[subscriber([\"orders\", \"refunds\"])]`";
const PUBLISH_TO_USAGE: &str = "`#[publish_to(kafka, \"orders.kafka\")]`";

/// The queue argument: one string literal or a bracketed list of them.
pub(crate) struct Queues {
    /// The queue names, as written.
    pub(crate) names: Vec<LitStr>,
    /// The whole argument (`"orders"` or `[..]`), for "empty list" errors.
    pub(crate) tokens: TokenStream,
}

/// A duration option's value, read at compile time and split for
/// `Duration::new(secs, nanos)` so it cannot panic at run time.
pub(crate) struct DurationArg {
    pub(crate) secs: u64,
    pub(crate) nanos: u32,
    /// The value's span (where a type error in the expansion would point).
    pub(crate) span: Span,
}

impl DurationArg {
    fn new(d: Duration, span: Span) -> Self {
        DurationArg {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
            span,
        }
    }
}

/// A deprecated option spelling that was used: the expansion makes rustc
/// warn about it, once, at `key`.
pub(crate) struct Deprecated {
    /// The old option name, as written.
    pub(crate) key: Ident,
    /// The warning's text: the new spelling, with the value given.
    pub(crate) note: String,
}

/// Everything `#[subscriber(..)]` was given, each value already of the
/// right literal kind. `None` is "not given" (or given wrongly: the error is
/// in the `Ctxt`).
#[derive(Default)]
pub(crate) struct SubscriberArgs {
    pub(crate) queues: Option<Queues>,
    /// Whether a positional (queue) argument was written at all, even a
    /// wrong one: then "missing queue" would only repeat an error.
    pub(crate) positional_seen: bool,
    pub(crate) name: Option<LitStr>,
    pub(crate) max_workers: Option<LitInt>,
    pub(crate) fetch_batch_size: Option<LitInt>,
    pub(crate) fetch_concurrency: Option<LitInt>,
    pub(crate) lease_ttl: Option<DurationArg>,
    pub(crate) lease_heartbeat: Option<HeartbeatArg>,
    pub(crate) min_fetch_interval: Option<DurationArg>,
    pub(crate) max_fetch_interval: Option<DurationArg>,
    pub(crate) max_deliveries: Option<LitInt>,
    pub(crate) terminal_flush_batch_size: Option<LitInt>,
    pub(crate) ack_policy: Option<VariantArg>,
    pub(crate) retry: Option<Expr>,
    pub(crate) propagate_headers: Option<LitBool>,
    /// `ordered` (a bare flag, read as `true`) or `ordered = BOOL`.
    pub(crate) ordered: Option<LitBool>,
    /// Whether `ordered` was written at all, even with a wrong value: then
    /// "`poison_policy` needs `ordered`" would only add noise.
    pub(crate) ordered_seen: bool,
    pub(crate) poison_policy: Option<VariantArg>,
    /// The whole `poison_policy = ..` argument, if written (even with a
    /// wrong value): where "it needs `ordered`" is reported.
    pub(crate) poison_policy_seen: Option<TokenStream>,
    pub(crate) claim_mode: Option<VariantArg>,
    pub(crate) max_hold: Option<DurationArg>,
    /// The whole `max_hold = ..` argument, if written (even with a wrong
    /// value): where "it needs `claim_mode = Transaction`" is reported.
    pub(crate) max_hold_seen: Option<TokenStream>,
    /// `exactly_once = N`: the lanes (1 to 1024, checked here).
    pub(crate) exactly_once: Option<LitInt>,
    pub(crate) krate: Option<syn::Path>,
    /// Targets handed over by `#[publish_to]`, top-down.
    pub(crate) targets: Vec<PublishToArgs>,
    /// Deprecated spellings used (each option at most once).
    pub(crate) deprecated: Vec<Deprecated>,
}

/// The value of `lease_heartbeat`: an interval, or `false` (off).
pub(crate) enum HeartbeatArg {
    Every(DurationArg),
    Off(LitBool),
}

/// The value of an option naming an enum variant of the runtime
/// (`ack_policy = Manual`, `poison_policy = Block`, `claim_mode = Lease`).
pub(crate) enum VariantArg {
    /// `Manual`: a variant of the enum (`outbox_core::AckPolicy`), which the
    /// expansion qualifies.
    Variant(Ident),
    /// `AckPolicy::Manual`, `outbox_core::AckPolicy::Manual`: used as written
    /// (so the user's import is used).
    Path(syn::Path),
}

impl VariantArg {
    /// The variant's name: the ident, or the path's last segment.
    pub(crate) fn name(&self) -> Option<&Ident> {
        match self {
            VariantArg::Variant(ident) => Some(ident),
            VariantArg::Path(path) => path.segments.last().map(|s| &s.ident),
        }
    }
}

/// One `#[publish_to]` target: a transport name and a destination.
pub(crate) struct PublishToArgs {
    /// The transport's registered name, as written (`kafka`).
    pub(crate) transport: Ident,
    /// The topic / exchange / subject (`"orders.kafka"`).
    pub(crate) destination: LitStr,
}

impl PublishToArgs {
    /// The transport name as a string literal at the ident's span.
    pub(crate) fn transport_name(&self) -> LitStr {
        LitStr::new(&self.transport.unraw().to_string(), self.transport.span())
    }

    /// `kafka, "orders.kafka"`: the arguments in canonical form, spans kept.
    pub(crate) fn to_args(&self) -> TokenStream {
        let (t, d) = (&self.transport, &self.destination);
        quote!(#t, #d)
    }
}

// ---------------------------------------------------------------------------
// #[subscriber(..)]

/// Parses `#[subscriber(..)]`'s arguments.
pub(crate) fn subscriber_args(args: TokenStream, cx: &Ctxt) -> SubscriberArgs {
    let mut out = SubscriberArgs::default();
    let parser = |input: ParseStream| {
        parse_list(input, &mut out, cx);
        Ok(())
    };
    if let Err(e) = parser.parse2(args) {
        cx.syn_error(e);
    }
    out
}

/// The options given so far: (option, as spelled), to catch an option given
/// twice, under its name or its deprecated spelling.
type Seen = Vec<(&'static str, String)>;

fn parse_list(input: ParseStream, out: &mut SubscriberArgs, cx: &Ctxt) {
    let mut seen = Seen::new();
    let mut index = 0;
    while !input.is_empty() {
        if let Err(e) = parse_one(input, index, out, &mut seen, cx) {
            cx.syn_error(e);
            skip_past_comma(input);
            index += 1;
            continue;
        }
        index += 1;
        if input.is_empty() {
            break;
        }
        if let Err(e) = input.parse::<Token![,]>() {
            cx.syn_error(e);
            skip_past_comma(input);
        }
    }
}

/// Skips the rest of a malformed argument, up to and including its comma.
fn skip_past_comma(input: ParseStream) {
    let _ = input.step(|cursor| {
        let mut rest = *cursor;
        while let Some((tt, next)) = rest.token_tree() {
            rest = next;
            if matches!(&tt, TokenTree::Punct(p) if p.as_char() == ',') {
                break;
            }
        }
        Ok(((), rest))
    });
}

fn parse_one(
    input: ParseStream,
    index: usize,
    out: &mut SubscriberArgs,
    seen: &mut Seen,
    cx: &Ctxt,
) -> syn::Result<()> {
    // `key = value`
    if input.peek(Ident::peek_any) && input.peek2(Token![=]) && !input.peek2(Token![==]) {
        let key = input.call(Ident::parse_any)?;
        input.parse::<Token![=]>()?;
        let value: Expr = input.parse()?;
        option(&key, &value, out, seen, cx);
        return Ok(());
    }
    // `__publish_to(..)` from `#[publish_to]`, or `key(value)` by mistake
    if input.peek(Ident::peek_any) && input.peek2(token::Paren) {
        let key = input.call(Ident::parse_any)?;
        let content;
        let paren = syn::parenthesized!(content in input);
        let tokens: TokenStream = content.parse()?;
        if key == HIDDEN_PUBLISH_TO {
            if let Some(target) = publish_to_args(tokens, paren.span.join(), cx) {
                out.targets.push(target);
            }
        } else {
            let k = key.unraw().to_string();
            let k = replacement(&k).unwrap_or(&k);
            if OPTIONS.contains(&k) {
                let mut whole = key.to_token_stream();
                paren.surround(&mut whole, |t| t.extend(tokens));
                let msg = if FLAGS.contains(&k) {
                    format!("expected `{k}` or `{k} = true` / `{k} = false`, not `{k}(..)`")
                } else {
                    format!("expected `{k} = ...`, e.g. `{}`", example(k))
                };
                cx.error_spanned_by(whole, msg);
            } else {
                unknown_option(&key, cx);
            }
        }
        return Ok(());
    }
    let value: Expr = input.parse()?;
    positional(value, index, out, seen, cx);
    Ok(())
}

/// A bare argument: the queue(s), a flag (`ordered`), or a mistake.
fn positional(value: Expr, index: usize, out: &mut SubscriberArgs, seen: &mut Seen, cx: &Ctxt) {
    let bare = unwrap_groups(&value);
    if let Expr::Path(p) = bare
        && let Some(ident) = p.path.get_ident()
        && FLAGS.contains(&ident.unraw().to_string().as_str())
    {
        // `ordered` is `ordered = true`, at the flag.
        let on = Expr::Lit(syn::ExprLit {
            attrs: Vec::new(),
            lit: Lit::Bool(LitBool::new(true, ident.span())),
        });
        option(ident, &on, out, seen, cx);
        return;
    }
    out.positional_seen = true;
    if let Expr::Path(p) = bare
        && let Some(ident) = p.path.get_ident()
    {
        let k = ident.unraw().to_string();
        let k = replacement(&k).unwrap_or(&k);
        if OPTIONS.contains(&k) {
            cx.error_spanned_by(
                &value,
                format!("`{k}` needs a value, e.g. `{}`", example(k)),
            );
            return;
        }
        if index > 0 {
            unknown_option(ident, cx);
            return;
        }
    }
    let names = match bare {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) => vec![s.clone()],
        Expr::Array(list) => list
            .elems
            .iter()
            .filter_map(|e| match unwrap_groups(e) {
                Expr::Lit(syn::ExprLit {
                    lit: Lit::Str(s), ..
                }) => Some(s.clone()),
                other => {
                    cx.error_spanned_by(
                        e,
                        format!(
                            "expected a queue name as a string literal, found {}: {QUEUE_USAGE}",
                            describe(other)
                        ),
                    );
                    None
                }
            })
            .collect(),
        Expr::Path(p) if p.path.get_ident().is_some() => {
            let name = p.path.to_token_stream().to_string();
            cx.error_spanned_by(
                &value,
                format!("expected the queue name as a string literal: `#[subscriber(\"{name}\")]`"),
            );
            return;
        }
        other => {
            cx.error_spanned_by(
                &value,
                format!(
                    "expected the queue name as a string literal or a bracketed list of them, \
                     found {}: {QUEUE_USAGE}",
                    describe(other)
                ),
            );
            return;
        }
    };
    if out.queues.is_some() {
        cx.error_spanned_by(
            &value,
            "`#[subscriber]` takes one queue argument; to subscribe to several queues, list them \
             in brackets: `#[subscriber([\"orders\", \"refunds\"])]`",
        );
        return;
    }
    if index > 0 {
        cx.error_spanned_by(
            &value,
            "the queue must be the first argument: `#[subscriber(\"orders\", name = \"...\")]`",
        );
    }
    out.queues = Some(Queues {
        names,
        tokens: value.to_token_stream(),
    });
}

fn unknown_option(key: &Ident, cx: &Ctxt) {
    let k = key.unraw().to_string();
    let hint = match suggest(&k) {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    };
    cx.error_spanned_by(
        key,
        format!(
            "unknown `#[subscriber]` argument `{k}`{hint}; expected one of: {}",
            list(OPTIONS)
        ),
    );
}

fn option(key: &Ident, value: &Expr, out: &mut SubscriberArgs, seen: &mut Seen, cx: &Ctxt) {
    let k = key.unraw().to_string();
    if matches!(
        k.as_str(),
        "queue" | "queues" | "topic" | "topics" | "channel" | "subject"
    ) {
        out.positional_seen = true;
        let fix = match unwrap_groups(value) {
            Expr::Lit(_) | Expr::Array(_) => format!(
                "`#[subscriber({})]`",
                value.to_token_stream().to_string().replace(" ,", ",")
            ),
            _ => QUEUE_USAGE.to_owned(),
        };
        cx.error_spanned_by(
            key,
            format!("the queue is the first argument, not `{k} = ...`: write {fix}"),
        );
        return;
    }
    let Some(option) = OPTIONS
        .iter()
        .copied()
        .find(|o| *o == k)
        .or_else(|| replacement(&k))
    else {
        unknown_option(key, cx);
        return;
    };
    if let Some((_, first)) = seen.iter().find(|(o, _)| *o == option) {
        let spellings = match (first.as_str(), k.as_str()) {
            (a, b) if a == b => String::new(),
            (a, b) => format!(" (given as `{a}` and as `{b}`; `{option}` is the current name)"),
        };
        cx.error_spanned_by(
            key,
            format!("duplicate `#[subscriber]` argument `{option}`{spellings}"),
        );
        return;
    }
    seen.push((option, k.clone()));
    let whole = || {
        let mut whole = key.to_token_stream();
        whole.extend(quote!(=));
        value.to_tokens(&mut whole);
        whole
    };
    match option {
        ORDERED => out.ordered_seen = true,
        POISON_POLICY => out.poison_policy_seen = Some(whole()),
        MAX_HOLD => out.max_hold_seen = Some(whole()),
        _ => {}
    }
    if option != k {
        out.deprecated_option(key, &k, option, value, cx);
        return;
    }
    let k = option;
    match k {
        NAME => out.name = name(value, cx),
        MAX_WORKERS => out.max_workers = int(k, value, cx),
        FETCH_BATCH_SIZE => out.fetch_batch_size = int(k, value, cx),
        FETCH_CONCURRENCY => out.fetch_concurrency = int(k, value, cx),
        LEASE_TTL => out.lease_ttl = duration_value(k, value, cx),
        LEASE_HEARTBEAT => out.lease_heartbeat = heartbeat(k, value, cx),
        MIN_FETCH_INTERVAL => out.min_fetch_interval = duration_value(k, value, cx),
        MAX_FETCH_INTERVAL => out.max_fetch_interval = duration_value(k, value, cx),
        MAX_DELIVERIES => out.max_deliveries = int(k, value, cx),
        TERMINAL_FLUSH_BATCH_SIZE => out.terminal_flush_batch_size = int(k, value, cx),
        ACK_POLICY => out.ack_policy = variant(k, "AckPolicy", ACK_POLICIES, value, cx),
        RETRY => out.retry = Some(value.clone()),
        PROPAGATE_HEADERS => out.propagate_headers = boolean(k, value, cx),
        ORDERED => out.ordered = boolean(k, value, cx),
        POISON_POLICY => {
            out.poison_policy = variant(k, "PoisonPolicy", POISON_POLICIES, value, cx);
        }
        CLAIM_MODE => out.claim_mode = variant(k, "ClaimMode", CLAIM_MODES, value, cx),
        MAX_HOLD => out.max_hold = duration_value(k, value, cx),
        EXACTLY_ONCE => out.exactly_once = lanes(k, value, cx),
        CRATE => out.krate = krate(value, cx),
        _ => unknown_option(key, cx),
    }
}

/// How a value of the wrong kind is described in errors.
fn describe(expr: &Expr) -> &'static str {
    match unwrap_groups(expr) {
        Expr::Lit(l) => match &l.lit {
            Lit::Str(_) => "a string literal",
            Lit::Int(_) => "an integer",
            Lit::Float(_) => "a float",
            Lit::Bool(_) => "a boolean",
            Lit::Char(_) => "a character literal",
            Lit::ByteStr(_) | Lit::CStr(_) | Lit::Byte(_) => "a byte literal",
            _ => "a literal",
        },
        Expr::Path(p) if p.path.get_ident().is_some() => "an identifier",
        Expr::Path(_) => "a path",
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => "a negative number",
        _ => "an expression",
    }
}

fn str_lit(expr: &Expr) -> Option<&LitStr> {
    match unwrap_groups(expr) {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) => Some(s),
        _ => None,
    }
}

fn name(value: &Expr, cx: &Ctxt) -> Option<LitStr> {
    let Some(s) = str_lit(value) else {
        cx.error_spanned_by(
            value,
            format!(
                "expected a string literal for `name`, found {}: `{}`",
                describe(value),
                example(NAME)
            ),
        );
        return None;
    };
    if s.value().is_empty() {
        cx.error_spanned_by(
            s,
            "the subscriber name must not be empty; omit `name` to default to `module::path::fn_name`",
        );
        return None;
    }
    Some(s.clone())
}

/// `exactly_once = N`: an integer from 1 to 1024 (the lanes).
fn lanes(key: &str, value: &Expr, cx: &Ctxt) -> Option<LitInt> {
    let lit = int(key, value, cx)?;
    match lit.base10_parse::<u64>() {
        Ok(n) if (1..=1024).contains(&n) => Some(lit),
        _ => {
            cx.error_spanned_by(
                &lit,
                format!(
                    "`{key}` is the number of lanes, from 1 to 1024, e.g. `{}`",
                    example(key)
                ),
            );
            None
        }
    }
}

fn int(key: &str, value: &Expr, cx: &Ctxt) -> Option<LitInt> {
    let bare = unwrap_groups(value);
    if let Expr::Lit(syn::ExprLit {
        lit: Lit::Int(i), ..
    }) = bare
    {
        return match i.base10_parse::<u64>() {
            Ok(_) => Some(i.clone()),
            Err(e) => {
                cx.error_spanned_by(i, format!("`{key}`: {e}"));
                None
            }
        };
    }
    if matches!(bare, Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_))) {
        cx.error_spanned_by(
            value,
            format!(
                "expected a non-negative integer for `{key}`, e.g. `{}`",
                example(key)
            ),
        );
        return None;
    }
    let fix = match str_lit(value) {
        Some(s) if s.value().trim().parse::<u64>().is_ok() => {
            format!("remove the quotes, `{key} = {}`", s.value().trim())
        }
        _ => format!("e.g. `{}`", example(key)),
    };
    cx.error_spanned_by(
        value,
        format!(
            "expected an integer for `{key}`, found {}: {fix}",
            describe(value)
        ),
    );
    None
}

/// A duration option: a string such as `"10s"`, read at compile time.
fn duration_value(key: &str, value: &Expr, cx: &Ctxt) -> Option<DurationArg> {
    if let Some(s) = str_lit(value) {
        let text = s.value();
        return match duration::parse(&text) {
            Ok(d) if d.is_zero() => {
                cx.error_spanned_by(
                    s,
                    format!("`{key}` must be greater than zero, e.g. `{}`", example(key)),
                );
                None
            }
            Ok(d) => Some(DurationArg::new(d, s.span())),
            Err(reason) => {
                cx.error_spanned_by(
                    s,
                    format!(
                        "invalid duration `{text:?}` for `{key}`: {reason}; expected {DURATION_USAGE}"
                    ),
                );
                None
            }
        };
    }
    let bare = unwrap_groups(value);
    let number = match bare {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Int(i), ..
        }) => Some(i.base10_digits().to_owned()),
        Expr::Lit(syn::ExprLit {
            lit: Lit::Float(f), ..
        }) => Some(f.base10_digits().to_owned()),
        _ => None,
    };
    let fix = match number {
        Some(n) => {
            format!("write it as a string with a unit, `{key} = \"{n}s\"` or `{key} = \"{n}ms\"`")
        }
        None => format!("e.g. `{}`", example(key)),
    };
    let found = match bare {
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => {
            "a negative number (a duration cannot be negative)"
        }
        _ => describe(value),
    };
    cx.error_spanned_by(
        value,
        format!("expected a duration string for `{key}`, found {found}: {fix}"),
    );
    None
}

impl SubscriberArgs {
    /// A deprecated spelling (`lease_ttl_secs = 30`, `min_fetch_interval_ms =
    /// 500`, `max_fetch_interval_ms = 5000`): read as before, stored as the
    /// option `new`, and recorded for the deprecation warning.
    fn deprecated_option(
        &mut self,
        key: &Ident,
        old: &str,
        new: &'static str,
        value: &Expr,
        cx: &Ctxt,
    ) {
        let Some(d) = deprecated_value(old, new, value, cx) else {
            return;
        };
        self.deprecated.push(Deprecated {
            key: key.clone(),
            note: format!(
                "`#[subscriber]` option `{old}` is deprecated: write `{new} = \"{}\"`",
                duration::format(d)
            ),
        });
        let arg = Some(DurationArg::new(d, value.span()));
        match new {
            LEASE_TTL => self.lease_ttl = arg,
            MIN_FETCH_INTERVAL => self.min_fetch_interval = arg,
            MAX_FETCH_INTERVAL => self.max_fetch_interval = arg,
            _ => cx.error_spanned_by(key, format!("`{old}` is not supported")),
        }
    }
}

/// The value of a deprecated option: `lease_ttl_secs` takes seconds (an
/// integer or a float), the `_ms` options integer milliseconds.
fn deprecated_value(old: &str, new: &str, value: &Expr, cx: &Ctxt) -> Option<Duration> {
    let (unit, what) = if old == LEASE_TTL_SECS {
        ("s", "a number of seconds (an integer or a float)")
    } else {
        ("ms", "an integer number of milliseconds")
    };
    let number = match unwrap_groups(value) {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Int(i), ..
        }) => Some(i.base10_digits()),
        Expr::Lit(syn::ExprLit {
            lit: Lit::Float(f), ..
        }) if unit == "s" => Some(f.base10_digits()),
        _ => None,
    };
    if let Some(digits) = number {
        let digits = digits.trim_end_matches('.');
        let parsed = if digits.contains(['e', 'E']) {
            Err("write the number without an exponent".to_owned())
        } else {
            duration::parse(&format!("{digits}{unit}"))
        };
        return match parsed {
            Ok(d) if d.is_zero() => {
                cx.error_spanned_by(value, format!("`{old}` must be greater than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(reason) => {
                cx.error_spanned_by(value, format!("`{old}`: {reason}"));
                None
            }
        };
    }
    // A value of the wrong kind: show the new spelling, with the value if
    // it makes sense as a duration.
    let fix = match str_lit(value).map(|s| s.value()) {
        Some(s) if duration::parse(&s).is_ok() => s,
        Some(s) if duration::parse(&format!("{}{unit}", s.trim())).is_ok() => {
            format!("{}{unit}", s.trim())
        }
        _ => match unwrap_groups(value) {
            Expr::Lit(syn::ExprLit {
                lit: Lit::Float(f), ..
            }) => format!("{}{unit}", f.base10_digits()),
            _ => example_duration(new).to_owned(),
        },
    };
    cx.error_spanned_by(
        value,
        format!(
            "expected {what} for `{old}`, found {}: `{old}` is deprecated, write `{new} = \"{fix}\"`",
            describe(value)
        ),
    );
    None
}

/// `lease_heartbeat`: a duration, or `false` to turn it off.
fn heartbeat(key: &str, value: &Expr, cx: &Ctxt) -> Option<HeartbeatArg> {
    if let Expr::Lit(syn::ExprLit {
        lit: Lit::Bool(b), ..
    }) = unwrap_groups(value)
    {
        if b.value {
            cx.error_spanned_by(
                b,
                format!(
                    "`{key} = true` is the default; write an interval, `{}`, or `{key} = false` \
                     to turn the heartbeat off",
                    example(key)
                ),
            );
            return None;
        }
        return Some(HeartbeatArg::Off(b.clone()));
    }
    duration_value(key, value, cx).map(HeartbeatArg::Every)
}

fn boolean(key: &str, value: &Expr, cx: &Ctxt) -> Option<LitBool> {
    if let Expr::Lit(syn::ExprLit {
        lit: Lit::Bool(b), ..
    }) = unwrap_groups(value)
    {
        return Some(b.clone());
    }
    let fix = match str_lit(value) {
        Some(s) if matches!(s.value().as_str(), "true" | "false") => {
            format!("remove the quotes, `{key} = {}`", s.value())
        }
        _ => format!("e.g. `{}`", example(key)),
    };
    cx.error_spanned_by(
        value,
        format!(
            "expected `true` or `false` for `{key}`, found {}: {fix}",
            describe(value)
        ),
    );
    None
}

/// An option naming a variant of the runtime's enum `ty` (`ack_policy =
/// Manual`): the bare variant, or a path to it through `ty`
/// (`AckPolicy::Manual`, `outbox_core::AckPolicy::Manual`).
fn variant(key: &str, ty: &str, variants: &[&str], value: &Expr, cx: &Ctxt) -> Option<VariantArg> {
    let expected = list(variants);
    let a = if ty.starts_with(['A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    };
    match unwrap_groups(value) {
        Expr::Path(p) if p.qself.is_none() => {
            let segments = &p.path.segments;
            let last = segments.last().map(|s| &s.ident);
            // `Manual`, or `AckPolicy::Manual` / `outbox_core::AckPolicy::Manual`.
            let prefix_ok = segments.len() == 1
                || segments
                    .iter()
                    .nth(segments.len().wrapping_sub(2))
                    .is_some_and(|s| s.ident == ty);
            let known = last.filter(|l| variants.iter().any(|v| *l == v));
            if let Some(last) = known
                && prefix_ok
            {
                return Some(if segments.len() == 1 {
                    VariantArg::Variant(last.clone())
                } else {
                    VariantArg::Path(p.path.clone())
                });
            }
            if let Some(last) = known {
                // A known variant through another path (`AckPolicy::Block`
                // for `poison_policy`).
                cx.error_spanned_by(
                    value,
                    format!(
                        "`{key}` takes {a} `{ty}` variant: write `{key} = {last}` (or `{ty}::{last}`)"
                    ),
                );
                return None;
            }
            let shown = last.map_or_else(String::new, |l| format!(" `{l}`"));
            cx.error_spanned_by(
                value,
                format!("unknown `{key}`{shown}; expected one of: {expected}"),
            );
            None
        }
        _ => {
            let fix = match str_lit(value) {
                Some(s) if variants.contains(&s.value().as_str()) => {
                    format!("remove the quotes, `{key} = {}`", s.value())
                }
                _ => format!("expected one of: {expected}"),
            };
            cx.error_spanned_by(
                value,
                format!(
                    "expected {a} `{ty}` variant name for `{key}`, found {}: {fix}",
                    describe(value)
                ),
            );
            None
        }
    }
}

fn krate(value: &Expr, cx: &Ctxt) -> Option<syn::Path> {
    let Some(s) = str_lit(value) else {
        let fix = match unwrap_groups(value) {
            Expr::Path(p) => format!(
                "write the path as a string, `crate = \"{}\"`",
                p.path.to_token_stream().to_string().replace(' ', "")
            ),
            _ => format!("e.g. `{}`", example(CRATE)),
        };
        cx.error_spanned_by(
            value,
            format!(
                "expected the path of `outbox_core` as a string literal for `crate`, found {}: {fix}",
                describe(value)
            ),
        );
        return None;
    };
    match s.parse_with(syn::Path::parse_mod_style) {
        Ok(path) => Some(path),
        Err(_) => {
            cx.error_spanned_by(
                s,
                format!(
                    "`crate` must be a path such as `\"my_app::outbox\"` or `\"::outbox_core\"`, got {:?}",
                    s.value()
                ),
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------
// #[publish_to(..)]

/// Parses `#[publish_to(..)]`'s arguments (or the hidden `__publish_to(..)`
/// copy of them); `whole` is where to report a missing argument.
pub(crate) fn publish_to_args(args: TokenStream, whole: Span, cx: &Ctxt) -> Option<PublishToArgs> {
    let elems = match Punctuated::<Expr, Token![,]>::parse_terminated.parse2(args) {
        Ok(elems) => elems,
        Err(e) => {
            cx.syn_error(e);
            return None;
        }
    };
    let mut elems = elems.into_iter();
    let Some(first) = elems.next() else {
        cx.error_at(
            whole,
            format!("`#[publish_to]` needs a transport and a destination: {PUBLISH_TO_USAGE}"),
        );
        return None;
    };
    let transport = transport(&first, cx);
    let destination = match elems.next() {
        Some(second) => destination(&second, cx),
        None => {
            cx.error_spanned_by(
                &first,
                format!(
                    "`#[publish_to]` needs a destination after the transport: {PUBLISH_TO_USAGE}"
                ),
            );
            None
        }
    };
    let extra: TokenStream = elems.map(|e| e.into_token_stream()).collect();
    if !extra.is_empty() {
        cx.error_spanned_by(
            extra,
            format!(
                "unexpected argument: `#[publish_to]` takes a transport and a destination, \
                 {PUBLISH_TO_USAGE}; to publish to several destinations, stack one \
                 `#[publish_to]` per destination"
            ),
        );
        return None;
    }
    Some(PublishToArgs {
        transport: transport?,
        destination: destination?,
    })
}

fn transport(expr: &Expr, cx: &Ctxt) -> Option<Ident> {
    match unwrap_groups(expr) {
        Expr::Path(p) if p.qself.is_none() => {
            if let Some(ident) = p.path.get_ident() {
                return Some(ident.clone());
            }
        }
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) => {
            let fix = if syn::parse_str::<Ident>(&s.value()).is_ok() {
                format!("`#[publish_to({}, ...)]`", s.value())
            } else {
                PUBLISH_TO_USAGE.to_owned()
            };
            cx.error_spanned_by(
                expr,
                format!("the transport is a name, not a string: write it without quotes, {fix}"),
            );
            return None;
        }
        _ => {}
    }
    cx.error_spanned_by(
        expr,
        format!(
            "expected the transport's registered name, an identifier such as `kafka`, found {}: \
             {PUBLISH_TO_USAGE}",
            describe(expr)
        ),
    );
    None
}

fn destination(expr: &Expr, cx: &Ctxt) -> Option<LitStr> {
    let Some(s) = str_lit(expr) else {
        cx.error_spanned_by(
            expr,
            format!(
                "expected the destination as a string literal, found {}: {PUBLISH_TO_USAGE}",
                describe(expr)
            ),
        );
        return None;
    };
    if s.value().is_empty() {
        cx.error_spanned_by(
            s,
            format!("the destination must not be empty: {PUBLISH_TO_USAGE}"),
        );
        return None;
    }
    Some(s.clone())
}

// ---------------------------------------------------------------------------
// helpers

/// `expr` without the invisible groups `macro_rules!` wraps `$x:expr` in,
/// and without parentheses.
pub(crate) fn unwrap_groups(mut expr: &Expr) -> &Expr {
    loop {
        match expr {
            Expr::Group(g) => expr = &g.expr,
            Expr::Paren(p) => expr = &p.expr,
            _ => return expr,
        }
    }
}

/// Whether `attr` is `#[NAME]`, `#[NAME(..)]` or `#[some::path::NAME(..)]`.
pub(crate) fn is_attr(attr: &syn::Attribute, name: &str) -> bool {
    attr.path().segments.last().is_some_and(|s| s.ident == name)
}
