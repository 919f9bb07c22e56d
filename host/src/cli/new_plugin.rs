//! `retort new-plugin NAME --kind loss|router [--dir PATH]`: scaffold a plugin crate.

use std::path::PathBuf;

use clap::Args;

use retort_core::Result;

use crate::artifacts::plugin_crate::{new_plugin, PluginKind};

/// Arguments of `retort new-plugin`.
#[derive(Debug, Args)]
pub struct NewPluginArgs {
    /// Crate name; the kind is the name with '-' replaced by '_'.
    name: String,
    /// What the plugin provides.
    #[arg(long, value_enum)]
    kind: PluginKind,
    /// Parent directory (default: the current directory).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

impl NewPluginArgs {
    /// Writes the crate and says how to build and load it.
    pub fn run(self) -> Result<()> {
        let root = new_plugin(&self.name, self.kind, &self.dir)?;
        println!("created {}", root.display());
        println!("build:   cd {} && cargo build --release", root.display());
        println!(
            "then add its library to `[plugins] paths` (see {}/README.md)",
            root.display()
        );
        Ok(())
    }
}
