//! Absolute paths used by generated code, and the `crate = "..."` override
//! for crates that re-export `outbox-core` under another name.

use proc_macro2::{Group, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote_spanned};

/// Where `outbox-core` is reachable from the user's crate.
pub(crate) struct Paths {
    /// The `crate = "..."` path, if given.
    krate: Option<TokenStream>,
}

impl Paths {
    /// `::outbox_core`, or the path given with `crate = "..."`.
    pub(crate) fn new(krate: Option<&syn::Path>) -> Self {
        Paths {
            krate: krate.map(ToTokens::to_token_stream),
        }
    }

    /// The runtime crate (`::outbox_core`), at the macro's call site.
    pub(crate) fn root(&self) -> TokenStream {
        self.root_at(Span::call_site())
    }

    /// The runtime crate with every token at `span` (for code whose type
    /// errors must point at a user's token).
    pub(crate) fn root_at(&self, span: Span) -> TokenStream {
        match &self.krate {
            Some(path) => respan(path.clone(), span),
            None => quote_spanned!(span=> ::outbox_core),
        }
    }

    /// Items used only by generated code (`::outbox_core::__private`).
    pub(crate) fn private(&self) -> TokenStream {
        self.private_at(Span::call_site())
    }

    /// [`Paths::private`] with every token at `span`.
    pub(crate) fn private_at(&self, span: Span) -> TokenStream {
        let root = self.root_at(span);
        quote_spanned!(span=> #root::__private)
    }
}

fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tt| {
            if let TokenTree::Group(g) = &tt {
                let mut group = Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                tt = TokenTree::Group(group);
            } else {
                tt.set_span(span);
            }
            tt
        })
        .collect()
}
