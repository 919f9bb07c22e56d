// export_plugin! needs the registration function.
retort_sdk::export_plugin!();

fn main() {}
