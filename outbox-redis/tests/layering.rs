//! The files of `src/` form no cycle and follow the module map in `lib.rs`.

#[test]
fn the_files_of_src_form_no_cycle_and_follow_the_module_map() {
    outbox_conformance::layering::assert_module_map(env!("CARGO_MANIFEST_DIR"));
}
