//! `retort plugins [CONFIG] [--json]`: every registered kind by category.

use clap::Args;

use retort_core::{Registry, Result};

use super::common::ConfigArgs;
use crate::assemble::plugin_loader;

/// Arguments of `retort plugins`.
#[derive(Debug, Args)]
pub struct PluginsArgs {
    /// A config whose `[plugins] paths` to load as well.
    #[command(flatten)]
    config: ConfigArgs,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

impl PluginsArgs {
    /// Lists the kinds: a table, or JSON with their parameters' schemas.
    pub fn run(self) -> Result<()> {
        let registry = match self.config.config {
            Some(_) => self.config.load()?.2,
            None => {
                let mut r = crate::builtin_registry()?;
                plugin_loader::load_all(&mut r, &[])?;
                r
            }
        };
        if self.json {
            println!("{}", listing_json(&registry)?);
        } else {
            print!("{}", listing_text(&registry));
        }
        Ok(())
    }
}

fn listing_json(registry: &Registry) -> Result<String> {
    let v: Vec<_> = registry
        .listing()
        .iter()
        .map(|k| {
            serde_json::json!({"category": k.category, "kind": k.kind, "description": k.description,
                               "source": k.source, "params": (k.params)()})
        })
        .collect();
    serde_json::to_string_pretty(&v).map_err(|e| retort_core::Error::failed("serialising the listing", e))
}

fn listing_text(registry: &Registry) -> String {
    let mut out = String::new();
    let mut last = "";
    for k in &registry.listing() {
        if k.category != last {
            out.push_str(&format!("{}:\n", k.category));
            last = k.category;
        }
        out.push_str(&format!("  {:<14} {} [{}]\n", k.kind, k.description, k.source));
    }
    out
}
