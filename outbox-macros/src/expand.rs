//! Code generation for `#[subscriber]`: no decisions left, only tokens.
//!
//! Every path is absolute (`::core::..`, `::outbox_core::..` or the
//! `crate = "..."` root), helper items live in `const _: () = { .. };` and
//! generated names start with `__outbox_`. Code that puts a trait bound on a
//! user's type is emitted *located at* that type (with call-site hygiene),
//! so rustc reports an unsatisfied bound at the type the user wrote: a
//! parameter that is not `FromDelivery`, a return type that is not
//! `IntoReply`, a `retry` expression that is not a `RetryStrategy`, a fn
//! whose future is not `Send`.

use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Attribute, Visibility};

use crate::model::{Conv, Output, Subscriber};
use crate::parse::{HeartbeatArg, VariantArg};
use crate::paths::Paths;

/// Call-site hygiene (generated names resolve among themselves) at `span`'s
/// location (errors point at the user's tokens).
fn at(span: Span) -> Span {
    Span::call_site().located_at(span)
}

/// A generated name at `span`'s location.
fn name(name: &str, span: Span) -> Ident {
    Ident::new(name, at(span))
}

/// The unit struct named like the fn that `App::subscriber(handle {})`
/// takes (also emitted, inert, when the attribute reported errors).
pub(crate) fn marker_struct(vis: &Visibility, ident: &Ident, cfgs: &[&Attribute]) -> TokenStream {
    quote! {
        #(#cfgs)*
        #[doc(hidden)]
        #[allow(non_camel_case_types, dead_code, missing_docs, unreachable_pub)]
        #[derive(::core::fmt::Debug, ::core::clone::Clone, ::core::marker::Copy)]
        #vis struct #ident {}
    }
}

/// The user's fn followed by the marker struct, the route factory, the
/// `IntoRoute` impl and the inventory registration.
pub(crate) fn subscriber(model: &Subscriber<'_>, item: TokenStream) -> TokenStream {
    let paths = Paths::new(model.args.krate.as_ref());
    let root = paths.root();
    let private = paths.private();
    let ident = model.ident;
    let vis = model.vis;
    let cfgs = &model.cfgs;

    let route = builder(model, &paths);
    let handler = handler(model, &paths);
    let marker = marker_struct(vis, ident, cfgs);
    let deprecations = deprecations(model);

    quote! {
        #item

        #marker

        #(#cfgs)*
        const _: () = {
            fn __outbox_assert_send<F>(
                f: F,
            ) -> ::core::pin::Pin<
                ::std::boxed::Box<dyn ::core::future::Future<Output = F::Output> + ::core::marker::Send>,
            >
            where
                F: ::core::future::Future + ::core::marker::Send + 'static,
            {
                ::std::boxed::Box::pin(f)
            }

            #[allow(deprecated)]
            fn __outbox_route() -> #root::Route {
                #route #handler
            }

            impl #root::IntoRoute for #ident {
                fn into_route(self) -> #root::Route {
                    __outbox_route()
                }
            }

            #private::inventory::submit! {
                #private::RouteFactory { make: __outbox_route }
            }
        };

        #deprecations
    }
}

/// A deprecation warning for each deprecated option spelling used. Stable
/// Rust has no diagnostic API for proc macros, so each is a use of a
/// `#[deprecated]` unit struct named like the old option and located at it:
/// rustc warns once per option, at the option, with the note (an error under
/// `#![deny(deprecated)]`). Each sits in its own `const _` so that its name
/// cannot shadow anything the route refers to.
fn deprecations(model: &Subscriber<'_>) -> TokenStream {
    let cfgs = &model.cfgs;
    model
        .args
        .deprecated
        .iter()
        .map(|d| {
            let span = at(d.key.span());
            let old = Ident::new(&d.key.unraw().to_string(), span);
            let note = &d.note;
            quote_spanned! {span=>
                #(#cfgs)*
                const _: () = {
                    #[deprecated(note = #note)]
                    #[allow(non_camel_case_types)]
                    struct #old;
                    let _ = #old;
                };
            }
        })
        .collect()
}

/// `Route::builder([..]).name(..)...` up to (not including) `.handler(..)`.
fn builder(model: &Subscriber<'_>, paths: &Paths) -> TokenStream {
    let root = paths.root();
    let args = &model.args;
    let queues = &model.queues;
    let route_name = match &args.name {
        Some(name) => quote!(#name),
        None => {
            let fn_name = &model.fn_name;
            quote!(::core::concat!(::core::module_path!(), "::", #fn_name))
        }
    };
    let mut chain = quote! {
        #root::Route::builder([#(#queues),*])
            .name(#route_name)
            .location(::core::file!(), ::core::line!(), ::core::column!())
    };
    let ints = [
        ("max_workers", &args.max_workers),
        ("fetch_batch_size", &args.fetch_batch_size),
        ("fetch_concurrency", &args.fetch_concurrency),
        ("max_deliveries", &args.max_deliveries),
        ("terminal_flush_batch_size", &args.terminal_flush_batch_size),
    ];
    for (setter, lit) in ints {
        let Some(lit) = lit else { continue };
        let span = lit.span();
        let setter = name(setter, span);
        chain.extend(quote_spanned!(at(span)=> .#setter(#lit)));
    }
    let durations = [
        ("lease_ttl", &args.lease_ttl),
        ("min_fetch_interval", &args.min_fetch_interval),
        ("max_fetch_interval", &args.max_fetch_interval),
        ("max_hold", &args.max_hold),
    ];
    for (setter, d) in durations {
        let Some(d) = d else { continue };
        let setter = name(setter, d.span);
        let mut secs = Literal::u64_suffixed(d.secs);
        secs.set_span(d.span);
        let mut nanos = Literal::u32_suffixed(d.nanos);
        nanos.set_span(d.span);
        chain.extend(quote_spanned!(at(d.span)=>
            .#setter(::core::time::Duration::new(#secs, #nanos))
        ));
    }
    match &args.lease_heartbeat {
        Some(HeartbeatArg::Every(d)) => {
            let setter = name("lease_heartbeat", d.span);
            let mut secs = Literal::u64_suffixed(d.secs);
            secs.set_span(d.span);
            let mut nanos = Literal::u32_suffixed(d.nanos);
            nanos.set_span(d.span);
            chain.extend(quote_spanned!(at(d.span)=>
                .#setter(::core::option::Option::Some(::core::time::Duration::new(#secs, #nanos)))
            ));
        }
        Some(HeartbeatArg::Off(b)) => {
            let setter = name("lease_heartbeat", b.span());
            chain.extend(quote_spanned!(at(b.span())=> .#setter(::core::option::Option::None)));
        }
        None => {}
    }
    let variants = [
        ("ack_policy", "AckPolicy", &args.ack_policy),
        ("poison_policy", "PoisonPolicy", &args.poison_policy),
        ("claim_mode", "ClaimMode", &args.claim_mode),
    ];
    for (setter, ty, value) in variants {
        match value {
            Some(VariantArg::Variant(variant)) => {
                let span = variant.span();
                let root = paths.root_at(at(span));
                let (setter, ty) = (name(setter, span), name(ty, span));
                chain.extend(quote_spanned!(at(span)=> .#setter(#root::#ty::#variant)));
            }
            Some(VariantArg::Path(path)) => {
                let span = path.span();
                let setter = name(setter, span);
                chain.extend(quote_spanned!(at(span)=> .#setter(#path)));
            }
            None => {}
        }
    }
    if let Some(retry) = &args.retry {
        chain.extend(quote_spanned!(at(retry.span())=> .retry(#retry)));
    }
    for target in model.targets() {
        let transport = target.transport_name();
        let destination = &target.destination;
        chain.extend(quote_spanned!(at(transport.span())=>
            .publish_to(#transport, #destination)
        ));
    }
    if let Some(lit) = &args.exactly_once {
        let span = lit.span();
        let setter = name("exactly_once", span);
        chain.extend(quote_spanned!(at(span)=> .#setter(#lit)));
    }
    let bools = [
        ("propagate_headers", &args.propagate_headers),
        ("ordered", &args.ordered),
    ];
    for (setter, on) in bools {
        let Some(on) = on else { continue };
        let setter = name(setter, on.span);
        chain.extend(quote_spanned!(at(on.span)=> .#setter(#on)));
    }
    // The check of each parameter, at its type: `.to(..)` below collects
    // the requirements itself.
    for param in model.params.iter().filter(|p| !p.headers) {
        let ty = param.ty;
        chain.extend(quote_spanned!(at(ty.span())=> .requires::<#ty>()));
    }
    // The AsyncAPI payload schemas: the body (the first parameter that is
    // one) and the forwarded value.
    for param in model.params.iter().filter(|p| !p.headers) {
        let probe = schema_probe(param.ty, paths);
        chain.extend(quote!(.payload_schema(#probe)));
    }
    if let Some(ty) = model.reply_ty {
        let probe = schema_probe(ty, paths);
        chain.extend(quote!(.reply_schema(#probe)));
    }
    chain
}

/// `Option<PayloadSchema>` of `ty`, by autoref specialisation
/// (`outbox_core::asyncapi::SchemaProbe`): `None` for parameters that are
/// not a body, the JSON Schema for `schemars::JsonSchema` types (feature
/// `schemars`), else a placeholder naming the type.
fn schema_probe(ty: &syn::Type, paths: &Paths) -> TokenStream {
    let private = paths.private();
    quote! {{
        #[allow(unused_imports)]
        use #private::{ProbeJsonSchema as _, ProbeNotBody as _, ProbePlaceholder as _};
        (&&&#private::SchemaProbe::<#ty>::new()).outbox_schema()
    }}
}

/// `.to::<_, (T1, ..)>(|arg0: T1, ..| async move { .. })`: the parameters
/// are extracted by `RouteBuilder::to` (`HandlerFn`); the closure calls the
/// user's fn and converts its return value into a reply. A parameter written
/// `Headers` is taken as `MessageHeaders` and unwrapped.
///
/// Every bound the closure must meet holds by construction except the
/// parameters' `FromDelivery`, which `.requires::<T>()` reports at each type
/// (and `.to` once more, at the fn's name): the fn's future is boxed by a
/// `Send` check at the fn's name, the result converted by a check at the
/// return type.
fn handler(model: &Subscriber<'_>, paths: &Paths) -> TokenStream {
    let ident = model.ident;
    let (tys, bindings): (Vec<TokenStream>, Vec<&Ident>) = model
        .params
        .iter()
        .map(|p| {
            let (ty, binding) = (p.ty, &p.binding);
            let span = at(ty.span());
            let ty = if p.headers {
                let root = paths.root_at(span);
                quote_spanned!(span=> #root::MessageHeaders)
            } else {
                quote_spanned!(span=> #ty)
            };
            (ty, binding)
        })
        .unzip();
    // The call is located at the fn's name, where a non-`Send` future is
    // reported.
    let call = {
        let span = at(ident.span());
        let args = model.params.iter().map(|p| {
            let arg = name(&p.binding.to_string(), span);
            if p.headers {
                quote_spanned!(span=> #arg.0)
            } else {
                quote!(#arg)
            }
        });
        let check = name("__outbox_assert_send", span);
        quote_spanned!(span=> #check(#ident(#(#args),*)).await)
    };
    let value = match &model.output {
        Output::Discard => {
            let span = at(ident.span());
            let private = paths.private_at(span);
            quote_spanned! {span=>
                let _ = #call;
                #private::reply(())
            }
        }
        Output::ErrOnly { span } => {
            let span = at(*span);
            let private = paths.private_at(span);
            let ret = name("__outbox_ret", span);
            quote_spanned! {span=>
                let #ret = #call;
                #private::reply(::core::result::Result::map(#ret, |_| ()))
            }
        }
        Output::Forward { conv: c, span } => {
            let span = at(*span);
            let private = paths.private_at(span);
            let ret = name("__outbox_ret", span);
            let converted = conv(c, quote!(#ret), paths, span);
            quote_spanned! {span=>
                let #ret = #call;
                #private::reply(#converted)
            }
        }
    };
    let bindings = bindings
        .iter()
        .zip(&model.params)
        .map(|(b, p)| Ident::new(&b.to_string(), at(p.ty.span())));
    // Where `.to`'s own report of a parameter that is not `FromDelivery` goes
    // (each such type is also reported at itself, by `.requires`): the fn.
    let infer = quote_spanned!(at(ident.span())=> _);
    let span = at(ident.span());
    quote_spanned! {span=>
        .to::<#infer, (#(#tys,)*)>(move |#(#bindings: #tys),*| async move {
            #value
        })
    }
}

/// `value` converted to something implementing `IntoReply`, at `span`.
fn conv(c: &Conv, value: TokenStream, paths: &Paths, span: Span) -> TokenStream {
    let v = name("__outbox_v", span);
    match c {
        Conv::Identity => value,
        Conv::Response => {
            let root = paths.root_at(span);
            quote_spanned!(span=> #root::Response::new(#value))
        }
        Conv::MapOk(inner) => {
            let inner = conv(inner, quote!(#v), paths, span);
            quote_spanned!(span=> ::core::result::Result::map(#value, |#v| #inner))
        }
        Conv::MapSome(inner) => {
            let inner = conv(inner, quote!(#v), paths, span);
            quote_spanned!(span=> ::core::option::Option::map(#value, |#v| #inner))
        }
    }
}
