//! What `#[memoize]` refuses, and the message it gives: each `tests/ui/*.rs` must fail to
//! compile with exactly the errors in its `.stderr` (all from the macro's own `syn::Error`s,
//! so they do not change with the compiler). `TRYBUILD=overwrite` rewrites the snapshots.

/// Unsupported signatures and malformed options are compile errors saying what to do.
#[test]
fn unsupported_uses_are_refused_with_a_reason() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
