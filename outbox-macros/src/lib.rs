//! Attribute macros of `outbox-core` (an implementation detail: use them as
//! `outbox_core::subscriber` and `outbox_core::publish_to`).

use proc_macro::TokenStream;

/// Placeholder until the macro lands.
#[proc_macro_attribute]
pub fn subscriber(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}

/// Placeholder until the macro lands.
#[proc_macro_attribute]
pub fn publish_to(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}
