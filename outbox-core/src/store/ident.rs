//! SQL identifier validation and quoting.
//!
//! Every identifier that reaches SQL text goes through [`quote`]; every name a
//! user gives goes through [`validate`] first, so a bad name is an error when the
//! table definition is built, never a SQL error later.

use crate::error::{Error, Result};

/// PostgreSQL truncates identifiers longer than this many bytes (NAMEDATALEN - 1).
pub(crate) const MAX_IDENT_BYTES: usize = 63;

/// Checks a base name and every identifier derived from it by appending one of
/// `suffixes` (and prepending one of `prefixes`).
pub(crate) fn validate(
    kind: &'static str,
    name: &str,
    prefixes: &[&str],
    suffixes: &[&str],
) -> Result<()> {
    let fail = |reason: String| {
        Err(Error::InvalidName {
            kind,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("the name must not be empty".into());
    }
    if name.contains('\0') {
        return fail("the name must not contain a NUL byte".into());
    }
    let derived = std::iter::once(name.to_owned())
        .chain(suffixes.iter().map(|s| format!("{name}{s}")))
        .chain(prefixes.iter().map(|p| format!("{p}{name}")));
    for ident in derived {
        if ident.len() > MAX_IDENT_BYTES {
            return fail(format!(
                "the derived identifier {ident:?} must fit in {MAX_IDENT_BYTES} bytes (got {}); \
                 PostgreSQL would silently truncate it. Use a shorter name",
                ident.len()
            ));
        }
    }
    Ok(())
}

/// Double-quotes an identifier, doubling embedded quotes.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Single-quotes a string literal, doubling embedded quotes.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_quotes() {
        assert_eq!(quote("outbox"), "\"outbox\"");
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn long_derived_name_is_refused() {
        let ok = "a".repeat(51);
        validate("table", &ok, &["outbox_"], &["_pending_idx"]).expect("51 + 12 = 63 fits");
        let too_long = "a".repeat(52);
        let err = validate("table", &too_long, &[], &["_pending_idx"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("_pending_idx"), "{msg}");
        assert!(msg.contains("63 bytes (got 64)"), "{msg}");
    }

    #[test]
    fn multibyte_names_count_bytes() {
        // 26 two-byte characters = 52 bytes, + "_pending_idx" = 64 bytes.
        let name = "é".repeat(26);
        assert!(validate("table", &name, &[], &["_pending_idx"]).is_err());
    }

    #[test]
    fn empty_and_nul_are_refused() {
        assert!(validate("table", "", &[], &[]).is_err());
        assert!(validate("table", "a\0b", &[], &[]).is_err());
    }
}
