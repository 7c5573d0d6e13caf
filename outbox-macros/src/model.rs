//! The handler as the expansion sees it: an owned, checked view of the
//! user's `async fn` and its arguments, with every decision taken (which
//! parameter binds to what, how the return value is forwarded). It keeps
//! references to the original syntax for spans.

use proc_macro2::Span;
use quote::format_ident;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    Attribute, FnArg, GenericArgument, Ident, ItemFn, LitStr, PathArguments, ReturnType, Type,
    Visibility,
};

use crate::parse::{PublishToArgs, SubscriberArgs};

/// A `#[subscriber]` fn that passed validation.
pub(crate) struct Subscriber<'a> {
    /// Its name (also the marker struct's name).
    pub(crate) ident: &'a Ident,
    /// Its visibility (also the marker struct's).
    pub(crate) vis: &'a Visibility,
    /// Its `#[cfg(..)]` attributes, repeated on every generated item (they
    /// may sit below `#[subscriber]`, and then are still on the fn).
    pub(crate) cfgs: Vec<&'a Attribute>,
    /// `"handle"`: the last segment of the default route name.
    pub(crate) fn_name: LitStr,
    /// The queues, as written.
    pub(crate) queues: Vec<LitStr>,
    /// The attribute's options.
    pub(crate) args: SubscriberArgs,
    /// One per fn parameter, in order.
    pub(crate) params: Vec<Param<'a>>,
    /// What happens to the return value.
    pub(crate) output: Output,
    /// The type of the forwarded value (`T` of `T`, `Result<T, _>`,
    /// `Option<T>`, `Response<T>`), for its AsyncAPI schema; `None` when
    /// nothing is forwarded or the shape hides it (an alias).
    pub(crate) reply_ty: Option<&'a Type>,
}

/// A handler parameter, extracted with `FromDelivery`.
pub(crate) struct Param<'a> {
    /// The declared type.
    pub(crate) ty: &'a Type,
    /// The local holding the extracted value (`__outbox_arg0`).
    pub(crate) binding: Ident,
    /// Written `Headers` (any path ending so, without arguments): given the
    /// row's headers (`MessageHeaders`), not the body decoded as a map.
    pub(crate) headers: bool,
}

/// What the generated handler does with the fn's return value.
pub(crate) enum Output {
    /// Nothing is forwarded: `()`, or any non-`Result` without `#[publish_to]`.
    Discard,
    /// No `#[publish_to]` and a `Result`: its `Err` is the handler error.
    ErrOnly {
        /// The return type's span (where a bad error type is reported).
        span: Span,
    },
    /// `#[publish_to]`: the value is converted and forwarded.
    Forward {
        /// Value → `IntoReply`.
        conv: Conv,
        /// The return type's span (where an unserializable type is reported).
        span: Span,
    },
}

/// How a returned value becomes something implementing `IntoReply`,
/// decided from the return type's syntactic shape only.
pub(crate) enum Conv {
    /// Already `IntoReply` (`()`, `Response<T>`, an opaque `Result` alias).
    Identity,
    /// A plain value: `Response::new(v)`.
    Response,
    /// `Result<T, E>`: convert the `Ok` value.
    MapOk(Box<Conv>),
    /// `Option<T>`: convert the `Some` value.
    MapSome(Box<Conv>),
}

impl<'a> Subscriber<'a> {
    /// Builds the model; call only once validation passed (receivers and
    /// other rejected shapes are skipped here, not reported).
    pub(crate) fn new(original: &'a ItemFn, mut args: SubscriberArgs) -> Self {
        let sig = &original.sig;
        let params = sig
            .inputs
            .iter()
            .filter_map(|arg| match arg {
                FnArg::Typed(pt) => Some(&*pt.ty),
                FnArg::Receiver(_) => None,
            })
            .enumerate()
            .map(|(i, ty)| Param {
                ty,
                binding: format_ident!("__outbox_arg{}", i),
                headers: is_headers(ty),
            })
            .collect();
        let forwards = !args.targets.is_empty();
        let output = match &sig.output {
            ReturnType::Default => Output::Discard,
            ReturnType::Type(_, ty) => output(ty, forwards),
        };
        let reply_ty = match &sig.output {
            ReturnType::Type(_, ty) if forwards => payload_type(ty),
            _ => None,
        };
        let queues = args.queues.take().map(|q| q.names).unwrap_or_default();
        Subscriber {
            ident: &sig.ident,
            vis: &original.vis,
            cfgs: cfgs(original),
            fn_name: LitStr::new(&sig.ident.unraw().to_string(), sig.ident.span()),
            queues,
            args,
            params,
            output,
            reply_ty,
        }
    }

    /// The publish targets, top-down.
    pub(crate) fn targets(&self) -> &[PublishToArgs] {
        &self.args.targets
    }
}

/// The fn's `#[cfg(..)]` attributes.
pub(crate) fn cfgs(func: &ItemFn) -> Vec<&Attribute> {
    func.attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg"))
        .collect()
}

fn output(ty: &Type, forwards: bool) -> Output {
    let span = ty.span();
    if is_unit(ty) {
        return Output::Discard;
    }
    if !forwards {
        return if matches!(shape(ty), Shape::Result(_)) {
            Output::ErrOnly { span }
        } else {
            Output::Discard
        };
    }
    Output::Forward {
        conv: conv(ty),
        span,
    }
}

/// The syntactic shapes the macro distinguishes (by last path segment).
enum Shape<'a> {
    Unit,
    /// `Result<T, ..>`; `None` for an alias written without arguments.
    Result(Option<&'a Type>),
    Option(Option<&'a Type>),
    Response,
    Other,
}

fn shape(ty: &Type) -> Shape<'_> {
    match strip(ty) {
        Type::Tuple(t) if t.elems.is_empty() => Shape::Unit,
        Type::Path(p) if p.qself.is_none() => {
            let Some(last) = p.path.segments.last() else {
                return Shape::Other;
            };
            if last.ident == "Result" {
                Shape::Result(first_type_arg(&last.arguments))
            } else if last.ident == "Option" {
                Shape::Option(first_type_arg(&last.arguments))
            } else if last.ident == "Response" {
                Shape::Response
            } else {
                Shape::Other
            }
        }
        _ => Shape::Other,
    }
}

/// The type of the value a return type forwards (see
/// [`Subscriber::reply_ty`]).
fn payload_type(ty: &Type) -> Option<&Type> {
    match shape(ty) {
        Shape::Unit | Shape::Result(None) | Shape::Option(None) => None,
        Shape::Result(Some(inner)) | Shape::Option(Some(inner)) => payload_type(inner),
        Shape::Response => match strip(ty) {
            Type::Path(p) => p
                .path
                .segments
                .last()
                .and_then(|last| first_type_arg(&last.arguments))
                .and_then(payload_type),
            _ => None,
        },
        // `impl Trait` cannot be named elsewhere: no schema.
        Shape::Other if has_impl_trait(ty) => None,
        Shape::Other => Some(ty),
    }
}

/// Whether `impl` appears anywhere in the type (`impl Serialize`,
/// `Vec<impl Serialize>`).
fn has_impl_trait(ty: &Type) -> bool {
    fn walk(tokens: proc_macro2::TokenStream) -> bool {
        tokens.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Ident(i) => i == "impl",
            proc_macro2::TokenTree::Group(g) => walk(g.stream()),
            _ => false,
        })
    }
    walk(quote::ToTokens::to_token_stream(ty))
}

/// `Headers`, `outbox_core::Headers`, `envelope::Headers`…: the type the
/// runtime names for a row's headers.
fn is_headers(ty: &Type) -> bool {
    match strip(ty) {
        Type::Path(p) if p.qself.is_none() => p
            .path
            .segments
            .last()
            .is_some_and(|last| last.ident == "Headers" && last.arguments.is_none()),
        _ => false,
    }
}

fn is_unit(ty: &Type) -> bool {
    matches!(shape(ty), Shape::Unit)
}

fn conv(ty: &Type) -> Conv {
    match shape(ty) {
        Shape::Unit | Shape::Response | Shape::Result(None) | Shape::Option(None) => Conv::Identity,
        Shape::Result(Some(ok)) => match conv(ok) {
            Conv::Identity => Conv::Identity,
            inner => Conv::MapOk(Box::new(inner)),
        },
        Shape::Option(Some(some)) => match conv(some) {
            Conv::Identity => Conv::Identity,
            inner => Conv::MapSome(Box::new(inner)),
        },
        Shape::Other => Conv::Response,
    }
}

/// The type without the invisible groups of `macro_rules!` and parentheses.
fn strip(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Group(g) => ty = &g.elem,
            Type::Paren(p) => ty = &p.elem,
            _ => return ty,
        }
    }
}

fn first_type_arg(args: &PathArguments) -> Option<&Type> {
    match args {
        PathArguments::AngleBracketed(a) => a.args.iter().find_map(|arg| match arg {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}
