// A registration function must take `&mut dyn Registrar`.
fn register(_kinds: &mut Vec<String>) {}

retort_sdk::export_plugin!(register);

fn main() {}
