//! The `retort` binary: a thin wrapper over `retort_host::cli`.

fn main() {
    std::process::exit(retort_host::cli::main());
}
