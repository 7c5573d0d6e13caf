//! UI tests of `#[subscriber]` and `#[publish_to]`: what compiles, and the
//! exact errors (with their spans) for what does not.
//!
//! The `.stderr` snapshots depend on the compiler, so the test runs only on
//! the toolchain they were taken with. Regenerate with
//! `TRYBUILD=overwrite cargo test -p outbox-macros --test compiletest` and review
//! the diff.

#[rustversion::attr(not(stable(1.95)), ignore = "stderr is compiler-specific")]
#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/subscriber/pass/*.rs");
    t.compile_fail("tests/ui/subscriber/fail/*.rs");
    t.pass("tests/ui/publish_to/pass/*.rs");
    t.compile_fail("tests/ui/publish_to/fail/*.rs");
}
