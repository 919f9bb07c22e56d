//! Misuse of `export_plugin!` fails to compile with a message that points at the mistake.

#[test]
fn export_plugin_misuse_does_not_compile() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
