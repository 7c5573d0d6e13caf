//! What an attribute emits when it found errors: the user's item (so calls
//! to the fn, rust-analyzer and the rest of the crate keep type-checking),
//! every error as a `compile_error!`, and for `#[subscriber]` an inert
//! marker struct so `App::subscriber(handle {})` does not add an error of
//! its own.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{FnArg, ItemFn};

use crate::parse::is_attr;
use crate::paths::Paths;
use crate::symbol::{PUBLISH_TO, SUBSCRIBER};

/// The item exactly as given, plus the errors.
pub(crate) fn item(item: TokenStream, err: syn::Error) -> TokenStream {
    let errors = err.into_compile_error();
    quote!(#item #errors)
}

/// `#[subscriber]`'s fallback: the fn without our own attributes (a
/// misplaced `#[publish_to]` or a second `#[subscriber]` would only repeat
/// the errors), the marker struct, and the errors.
pub(crate) fn subscriber(func: &ItemFn, paths: &Paths, err: syn::Error) -> TokenStream {
    let mut func = func.clone();
    func.attrs
        .retain(|a| !is_attr(a, PUBLISH_TO) && !is_attr(a, SUBSCRIBER));
    let errors = err.into_compile_error();
    let is_method = matches!(func.sig.inputs.first(), Some(FnArg::Receiver(_)));
    if is_method {
        return quote!(#func #errors);
    }
    let ident = &func.sig.ident;
    let vis = &func.vis;
    let cfgs = crate::model::cfgs(&func);
    let root = paths.root();
    let marker = crate::expand::marker_struct(vis, ident, &cfgs);
    quote! {
        #func

        #marker

        #(#cfgs)*
        const _: () = {
            impl #root::IntoRoute for #ident {
                fn into_route(self) -> #root::Route {
                    ::core::unreachable!("`#[subscriber]` reported a compile error")
                }
            }
        };

        #errors
    }
}
