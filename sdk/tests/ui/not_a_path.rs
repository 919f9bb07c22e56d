// export_plugin! takes the path of a registration function, not an expression.
retort_sdk::export_plugin!(|r: &mut dyn retort_sdk::Registrar| {});

fn main() {}
