//! `OUTBOX_MACROS_DEBUG=1`: print every expansion to stderr at build time.
//!
//! Cargo does not track this variable: touch the file (or `cargo clean -p
//! your-crate`) so the attribute runs again. The output is one line per
//! expansion; pipe it through `rustfmt` to read it.

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};

use crate::symbol::DEBUG_ENV;

/// Prints `tokens` if `OUTBOX_MACROS_DEBUG` is set to anything but `0`.
pub(crate) fn print(attr: &str, what: &str, tokens: &TokenStream) {
    let on = std::env::var_os(DEBUG_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    if on {
        let mut out = String::new();
        render(tokens.clone(), &mut out);
        eprintln!("// #[{attr}] {what} expands to:\n{out}\n");
    }
}

/// Tokens on one line, spaced so that `rustfmt` can format them (the
/// compiler's own rendering breaks lines inside paths).
fn render(tokens: TokenStream, out: &mut String) {
    let mut joint = false;
    for tt in tokens {
        if !joint && !out.is_empty() && !out.ends_with([' ', '(', '[', '{']) {
            out.push(' ');
        }
        joint = false;
        match tt {
            TokenTree::Group(g) => {
                let (open, close) = match g.delimiter() {
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::Brace => ("{ ", " }"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::None => ("", ""),
                };
                out.push_str(open);
                render(g.stream(), out);
                out.push_str(close);
            }
            TokenTree::Punct(p) => {
                out.push(p.as_char());
                joint = p.spacing() == Spacing::Joint;
            }
            TokenTree::Ident(i) => out.push_str(&i.to_string()),
            TokenTree::Literal(l) => out.push_str(&l.to_string()),
        }
    }
}
