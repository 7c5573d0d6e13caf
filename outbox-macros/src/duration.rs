//! Duration strings (`"10s"`, `"500ms"`, `"2m30s"`, `"1.5h"`), read at
//! compile time: a malformed one is an error at the literal, and the
//! expansion is a plain `Duration::new(secs, nanos)` that cannot panic.
//!
//! The grammar is Go's `time.ParseDuration` without a sign: one or more
//! parts, each a decimal number (optionally with a fraction) followed by a
//! unit; the parts add up.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Every unit, with its length in nanoseconds, largest first.
const UNITS: &[(&str, u128)] = &[
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("µs", 1_000), // U+00B5 MICRO SIGN
    ("μs", 1_000), // U+03BC GREEK SMALL LETTER MU
    ("ns", 1),
];

/// Fraction digits kept (more are below a nanosecond for every unit).
const MAX_FRACTION_DIGITS: usize = 20;

/// Parses `text`; `Err` says what is wrong with it, in words that follow
/// "invalid duration `"..."`: ".
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("the string is empty".to_owned());
    }
    if text.chars().any(char::is_whitespace) {
        let squeezed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        return Err(match parse(&squeezed) {
            Ok(_) => format!("remove the spaces: `\"{squeezed}\"`"),
            Err(_) => "it contains spaces".to_owned(),
        });
    }
    if text.starts_with('-') {
        return Err("a duration cannot be negative".to_owned());
    }
    if let Some(rest) = text.strip_prefix('+') {
        return Err(format!("remove the `+`: `\"{rest}\"`"));
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.');
        let (number, after) = rest.split_at(digits.unwrap_or(rest.len()));
        if number.is_empty() {
            return Err(format!("expected a number before `{rest}`"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if unit.is_empty() {
            let fix = if number == text {
                format!(": `\"{number}s\"` or `\"{number}ms\"`")
            } else {
                String::new()
            };
            return Err(format!("`{number}` has no unit{fix}"));
        }
        let Some(&(_, unit_nanos)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            let hint = match unit_alias(unit) {
                Some(u) => format!(" (write `{number}{u}`)"),
                None => String::new(),
            };
            return Err(format!("unknown unit `{unit}`{hint}"));
        };
        let nanos = part(number, unit_nanos)?;
        total = total.checked_add(nanos).ok_or_else(too_large)?;
        rest = next;
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| too_large())?;
    // The remainder is below 10^9.
    let nanos = (total % NANOS_PER_SEC) as u32;
    Ok(Duration::new(secs, nanos))
}

/// `number` (`"2"`, `"2.5"`) units of `unit_nanos` nanoseconds, truncated to
/// whole nanoseconds.
fn part(number: &str, unit_nanos: u128) -> Result<u128, String> {
    let (int, frac) = match number.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (number, None),
    };
    let bad = || format!("`{number}` is not a number");
    if int.is_empty() || frac.is_some_and(|f| f.is_empty() || f.contains('.')) {
        return Err(bad());
    }
    let int: u128 = int.parse().map_err(|_| too_large())?;
    let mut nanos = int.checked_mul(unit_nanos).ok_or_else(too_large)?;
    if let Some(frac) = frac {
        let digits = &frac[..frac.len().min(MAX_FRACTION_DIGITS)];
        let value: u128 = digits.parse().map_err(|_| bad())?;
        // < 10^20 × 3.6·10^12: no overflow.
        nanos += value * unit_nanos / 10u128.pow(digits.len() as u32);
    }
    Ok(nanos)
}

fn too_large() -> String {
    format!("too large (at most {} seconds)", u64::MAX)
}

/// Units people write that we spell differently.
fn unit_alias(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "H" | "hr" | "hrs" | "hour" | "hours" => "h",
        "M" | "min" | "mins" | "minute" | "minutes" => "m",
        "S" | "sec" | "secs" | "second" | "seconds" => "s",
        "MS" | "Ms" | "msec" | "msecs" | "millis" | "millisecond" | "milliseconds" => "ms",
        "US" | "usec" | "usecs" | "micros" | "microsecond" | "microseconds" => "us",
        "NS" | "nsec" | "nsecs" | "nanos" | "nanosecond" | "nanoseconds" => "ns",
        _ => return None,
    })
}

/// `d` in the largest unit that counts it exactly: `"30s"`, `"2500ms"`,
/// `"2m"` (what [`parse`] reads back as `d`).
pub(crate) fn format(d: Duration) -> String {
    let total = d.as_nanos();
    if total == 0 {
        return "0s".to_owned();
    }
    UNITS
        .iter()
        .filter(|(u, _)| u.is_ascii())
        .find(|(_, n)| total.is_multiple_of(*n))
        .map_or_else(
            || format!("{total}ns"),
            |(u, n)| format!("{}{u}", total / n),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Duration {
        parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(d) => panic!("{text:?} parsed as {d:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn reads_every_unit_and_compound_durations() {
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1m"), Duration::from_secs(60));
        assert_eq!(ok("1h"), Duration::from_secs(3_600));
        assert_eq!(ok("2m30s"), Duration::from_secs(150));
        assert_eq!(ok("1h2m3s4ms5us6ns"), Duration::new(3_723, 4_005_006));
        assert_eq!(ok("7us"), Duration::from_micros(7));
        assert_eq!(ok("7µs"), Duration::from_micros(7));
        assert_eq!(ok("7μs"), Duration::from_micros(7));
        assert_eq!(ok("0010s"), Duration::from_secs(10));
        assert_eq!(ok("0s"), Duration::ZERO);
    }

    #[test]
    fn reads_fractions_down_to_the_nanosecond() {
        assert_eq!(ok("2.5s"), Duration::from_millis(2_500));
        assert_eq!(ok("1.5h"), Duration::from_secs(5_400));
        assert_eq!(ok("0.1ms"), Duration::from_micros(100));
        assert_eq!(ok("1.9ns"), Duration::from_nanos(1));
        assert_eq!(
            ok("0.333333333333333333333333333333s"),
            Duration::from_nanos(333_333_333)
        );
    }

    #[test]
    fn the_largest_duration_fits_and_one_more_nanosecond_does_not() {
        let max = format!("{}s999999999ns", u64::MAX);
        assert_eq!(ok(&max), Duration::MAX);
        assert!(err(&format!("{}s1000000000ns", u64::MAX)).starts_with("too large"));
        assert!(err("99999999999999999999999999999999999999999h").starts_with("too large"));
        assert!(err(&format!("{}h", u64::MAX)).starts_with("too large"));
    }

    #[test]
    fn says_what_is_wrong() {
        assert_eq!(err(""), "the string is empty");
        assert_eq!(err("10"), "`10` has no unit: `\"10s\"` or `\"10ms\"`");
        assert_eq!(err("2m30"), "`30` has no unit");
        assert_eq!(err("10 s"), "remove the spaces: `\"10s\"`");
        assert_eq!(err(" 10x"), "it contains spaces");
        assert_eq!(err("-1s"), "a duration cannot be negative");
        assert_eq!(err("+1s"), "remove the `+`: `\"1s\"`");
        assert_eq!(err("10sec"), "unknown unit `sec` (write `10s`)");
        assert_eq!(err("10S"), "unknown unit `S` (write `10s`)");
        assert_eq!(err("1d"), "unknown unit `d`");
        assert_eq!(err("s"), "expected a number before `s`");
        assert_eq!(err("1s m"), "it contains spaces");
        assert_eq!(err("1.s"), "`1.` is not a number");
        assert_eq!(err(".5s"), "`.5` is not a number");
        assert_eq!(err("1.2.3s"), "`1.2.3` is not a number");
    }

    #[test]
    fn formats_in_the_largest_exact_unit_and_reads_back() {
        for (d, text) in [
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(2_500), "2500ms"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(7_200), "2h"),
            (Duration::from_nanos(1_001), "1001ns"),
            (Duration::from_micros(3), "3us"),
            (Duration::ZERO, "0s"),
            (Duration::MAX, "18446744073709551615999999999ns"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(ok(text), d);
        }
    }
}
