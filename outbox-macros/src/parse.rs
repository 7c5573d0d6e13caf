//! The attributes' argument grammar, read into typed values.
//!
//! A mistake in one argument is recorded in the [`Ctxt`] and parsing goes on
//! with the next argument, so the user sees every mistake at once. Only what
//! is purely syntactic is decided here (the kind of each literal); the values
//! themselves are the runtime's business (`max_workers = 0` fails at
//! `App::run`, with the same message as the hand-written builder).

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{ToTokens, quote};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Lit, LitBool, LitInt, LitStr, Token, token};

use crate::ctxt::Ctxt;
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

/// A duration given in seconds (integer or float), split for
/// `Duration::new(secs, nanos)` so it cannot panic at run time.
pub(crate) struct Seconds {
    pub(crate) secs: u64,
    pub(crate) nanos: u32,
    pub(crate) span: Span,
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
    pub(crate) lease_ttl: Option<Seconds>,
    pub(crate) min_fetch_interval_ms: Option<LitInt>,
    pub(crate) max_fetch_interval_ms: Option<LitInt>,
    pub(crate) max_deliveries: Option<LitInt>,
    pub(crate) terminal_flush_batch_size: Option<LitInt>,
    pub(crate) ack_policy: Option<AckPolicyArg>,
    pub(crate) retry: Option<Expr>,
    pub(crate) propagate_headers: Option<LitBool>,
    pub(crate) krate: Option<syn::Path>,
    /// Targets handed over by `#[publish_to]`, top-down.
    pub(crate) targets: Vec<PublishToArgs>,
}

/// An `ack_policy` value.
pub(crate) enum AckPolicyArg {
    /// `Manual`: a variant of `outbox_core::AckPolicy`.
    Variant(Ident),
    /// `AckPolicy::Manual`, `outbox_core::AckPolicy::Manual`: used as written
    /// (so the user's import is used).
    Path(syn::Path),
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

fn parse_list(input: ParseStream, out: &mut SubscriberArgs, cx: &Ctxt) {
    let mut seen: Vec<String> = Vec::new();
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
    seen: &mut Vec<String>,
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
            if OPTIONS.contains(&k.as_str()) {
                let mut whole = key.to_token_stream();
                paren.surround(&mut whole, |t| t.extend(tokens));
                cx.error_spanned_by(
                    whole,
                    format!("expected `{k} = ...`, e.g. `{}`", example(&k)),
                );
            } else {
                unknown_option(&key, cx);
            }
        }
        return Ok(());
    }
    let value: Expr = input.parse()?;
    positional(value, index, out, cx);
    Ok(())
}

/// A bare argument: the queue(s), or a mistake.
fn positional(value: Expr, index: usize, out: &mut SubscriberArgs, cx: &Ctxt) {
    out.positional_seen = true;
    let bare = unwrap_groups(&value);
    if let Expr::Path(p) = bare
        && let Some(ident) = p.path.get_ident()
    {
        let k = ident.unraw().to_string();
        if OPTIONS.contains(&k.as_str()) {
            cx.error_spanned_by(
                &value,
                format!("`{k}` needs a value, e.g. `{}`", example(&k)),
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

fn option(key: &Ident, value: &Expr, out: &mut SubscriberArgs, seen: &mut Vec<String>, cx: &Ctxt) {
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
    if !OPTIONS.contains(&k.as_str()) {
        unknown_option(key, cx);
        return;
    }
    if seen.contains(&k) {
        cx.error_spanned_by(key, format!("duplicate `#[subscriber]` argument `{k}`"));
        return;
    }
    seen.push(k.clone());
    let k = k.as_str();
    match k {
        NAME => out.name = name(value, cx),
        MAX_WORKERS => out.max_workers = int(k, value, cx),
        FETCH_BATCH_SIZE => out.fetch_batch_size = int(k, value, cx),
        FETCH_CONCURRENCY => out.fetch_concurrency = int(k, value, cx),
        LEASE_TTL_SECS => out.lease_ttl = seconds(k, value, cx),
        MIN_FETCH_INTERVAL_MS => out.min_fetch_interval_ms = int(k, value, cx),
        MAX_FETCH_INTERVAL_MS => out.max_fetch_interval_ms = int(k, value, cx),
        MAX_DELIVERIES => out.max_deliveries = int(k, value, cx),
        TERMINAL_FLUSH_BATCH_SIZE => out.terminal_flush_batch_size = int(k, value, cx),
        ACK_POLICY => out.ack_policy = ack_policy(value, cx),
        RETRY => out.retry = Some(value.clone()),
        PROPAGATE_HEADERS => out.propagate_headers = boolean(k, value, cx),
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

fn seconds(key: &str, value: &Expr, cx: &Ctxt) -> Option<Seconds> {
    let bare = unwrap_groups(value);
    if let Expr::Lit(l) = bare {
        match &l.lit {
            Lit::Int(i) => {
                return match i.base10_parse::<u64>() {
                    Ok(secs) => Some(Seconds {
                        secs,
                        nanos: 0,
                        span: i.span(),
                    }),
                    Err(e) => {
                        cx.error_spanned_by(i, format!("`{key}`: {e}"));
                        None
                    }
                };
            }
            Lit::Float(f) => {
                let v = match f.base10_parse::<f64>() {
                    Ok(v) => v,
                    Err(e) => {
                        cx.error_spanned_by(f, format!("`{key}`: {e}"));
                        return None;
                    }
                };
                // u64::MAX seconds, the largest `Duration` we can build.
                if !(v.is_finite() && v < 18_446_744_073_709_551_615.0) {
                    cx.error_spanned_by(f, format!("`{key}` is too large"));
                    return None;
                }
                let mut secs = v.trunc() as u64;
                let mut nanos = ((v - v.trunc()) * 1e9).round() as u32;
                if nanos >= 1_000_000_000 {
                    secs = secs.saturating_add(1);
                    nanos = 0;
                }
                return Some(Seconds {
                    secs,
                    nanos,
                    span: f.span(),
                });
            }
            _ => {}
        }
    }
    if matches!(bare, Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_))) {
        cx.error_spanned_by(
            value,
            format!(
                "expected a non-negative number of seconds for `{key}`, e.g. `{}`",
                example(key)
            ),
        );
        return None;
    }
    let fix = match str_lit(value) {
        Some(s) if s.value().trim().parse::<f64>().is_ok() => {
            format!("remove the quotes, `{key} = {}`", s.value().trim())
        }
        _ => format!("e.g. `{}` or `{key} = 2.5`", example(key)),
    };
    cx.error_spanned_by(
        value,
        format!(
            "expected a number of seconds (an integer or a float) for `{key}`, found {}: {fix}",
            describe(value)
        ),
    );
    None
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

fn ack_policy(value: &Expr, cx: &Ctxt) -> Option<AckPolicyArg> {
    let expected = list(ACK_POLICIES);
    match unwrap_groups(value) {
        Expr::Path(p) if p.qself.is_none() => {
            let segments = &p.path.segments;
            let last = segments.last().map(|s| &s.ident);
            // `Manual`, or `AckPolicy::Manual` / `outbox_core::AckPolicy::Manual`.
            let prefix_ok = segments.len() == 1
                || segments
                    .iter()
                    .nth(segments.len().wrapping_sub(2))
                    .is_some_and(|s| s.ident == "AckPolicy");
            if let Some(last) = last
                && prefix_ok
                && ACK_POLICIES.iter().any(|v| last == v)
            {
                return Some(if segments.len() == 1 {
                    AckPolicyArg::Variant(last.clone())
                } else {
                    AckPolicyArg::Path(p.path.clone())
                });
            }
            let shown = last.map_or_else(String::new, |l| format!(" `{l}`"));
            cx.error_spanned_by(
                value,
                format!("unknown `ack_policy`{shown}; expected one of: {expected}"),
            );
            None
        }
        _ => {
            let fix = match str_lit(value) {
                Some(s) if ACK_POLICIES.contains(&s.value().as_str()) => {
                    format!("remove the quotes, `ack_policy = {}`", s.value())
                }
                _ => format!("expected one of: {expected}"),
            };
            cx.error_spanned_by(
                value,
                format!(
                    "expected an `AckPolicy` variant name for `ack_policy`, found {}: {fix}",
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
