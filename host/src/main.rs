//! The `retort` binary: a thin wrapper over `retort_host::cli`.

fn main() {
    retort_host::allocator::keep_freed_memory();
    std::process::exit(retort_host::cli::main());
}
