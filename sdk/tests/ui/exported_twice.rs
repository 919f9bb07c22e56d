// One library exports one plugin declaration.
fn register(_: &mut dyn retort_sdk::Registrar) {}
fn register_again(_: &mut dyn retort_sdk::Registrar) {}

retort_sdk::export_plugin!(register);
retort_sdk::export_plugin!(register_again);

fn main() {}
