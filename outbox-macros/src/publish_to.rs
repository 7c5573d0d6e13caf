//! `#[publish_to]`: hands its target to the `#[subscriber]` below it.
//!
//! Attribute macros expand outside-in, so `#[publish_to]` (above) runs
//! first. It appends a hidden `__publish_to(transport, "destination")`
//! argument to the fn's `#[subscriber(..)]` attribute and re-emits the fn;
//! `#[subscriber]` then generates the whole route, targets included. It
//! generates nothing else.

use proc_macro2::{Delimiter, Group, Ident, Punct, Spacing, Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::{Meta, MetaList};

use crate::ctxt::Ctxt;
use crate::parse::{self, is_attr};
use crate::symbol::{HIDDEN_PUBLISH_TO, SUBSCRIBER};
use crate::{debug, fallback};

/// Expands `#[publish_to(args)] item`.
pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let cx = Ctxt::new();
    let target = parse::publish_to_args(args, Span::call_site(), &cx);
    let mut func: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            cx.error_at(
                Span::call_site(),
                "`#[publish_to]` applies to an `async fn` with a `#[subscriber(..)]` below it",
            );
            return match cx.check() {
                Err(e) => fallback::item(item, e),
                Ok(()) => item,
            };
        }
    };
    let subscriber = func.attrs.iter_mut().find(|a| is_attr(a, SUBSCRIBER));
    let Some(subscriber) = subscriber else {
        cx.error_at(
            Span::call_site(),
            "`#[publish_to]` needs a `#[subscriber(..)]` below it on the same fn",
        );
        return match cx.check() {
            Err(e) => fallback::item(item, e),
            Ok(()) => item,
        };
    };
    let Some(target) = target else {
        // Keep `#[subscriber]` so its own errors are reported too.
        return match cx.check() {
            Err(e) => fallback::item(item, e),
            Ok(()) => item,
        };
    };
    if let Err(e) = cx.check() {
        return fallback::item(item, e);
    }
    hand_over(&mut subscriber.meta, target.to_args());
    let out = func.into_token_stream();
    debug::print("publish_to", &target.destination.value(), &out);
    out
}

/// `#[subscriber(ARGS)]` → `#[subscriber(ARGS, __publish_to(TARGET))]`.
fn hand_over(meta: &mut Meta, target: TokenStream) {
    let hidden = {
        let mut t = TokenStream::new();
        t.extend([TokenTree::Ident(Ident::new(
            HIDDEN_PUBLISH_TO,
            Span::call_site(),
        ))]);
        t.extend([TokenTree::Group(Group::new(Delimiter::Parenthesis, target))]);
        t
    };
    match meta {
        Meta::List(list) => {
            let trailing_comma = matches!(
                list.tokens.clone().into_iter().last(),
                Some(TokenTree::Punct(p)) if p.as_char() == ','
            );
            if !list.tokens.is_empty() && !trailing_comma {
                list.tokens
                    .extend([TokenTree::Punct(Punct::new(',', Spacing::Alone))]);
            }
            list.tokens.extend(hidden);
        }
        Meta::Path(path) => {
            *meta = Meta::List(MetaList {
                path: path.clone(),
                delimiter: syn::MacroDelimiter::Paren(Default::default()),
                tokens: hidden,
            });
        }
        // `#[subscriber = ..]` is rejected by rustc itself.
        Meta::NameValue(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    #[test]
    fn hands_the_target_to_the_subscriber_below() {
        let out = super::expand(
            quote!(kafka, "orders.kafka"),
            quote! {
                #[doc = "d"]
                #[subscriber("orders", max_workers = 2,)]
                async fn handle(order_id: i64) -> i64 { order_id }
            },
        )
        .to_string();
        assert_eq!(
            out,
            quote! {
                #[doc = "d"]
                #[subscriber("orders", max_workers = 2, __publish_to(kafka, "orders.kafka"))]
                async fn handle(order_id: i64) -> i64 { order_id }
            }
            .to_string()
        );
    }

    #[test]
    fn without_a_subscriber_the_fn_is_kept_with_an_error() {
        let out = super::expand(
            quote!(kafka, "orders.kafka"),
            quote!(
                async fn handle() {}
            ),
        )
        .to_string();
        assert!(out.starts_with("async fn handle () { }"), "{out}");
        assert!(out.contains("compile_error"), "{out}");
    }
}
