//! Arguments several subcommands share.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use retort_core::config::RunConfig;
use retort_core::{Registry, Result};

use crate::assemble::config::{self, ConfigOrigin};
use crate::assemble::plugin_loader;

/// A run config: a file (or the built-in quickstart) and `--set` overrides.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Config file (TOML, YAML or JSON). Without one: the built-in quickstart.
    pub config: Option<PathBuf>,
    /// Override a key: `--set train.steps=100`, `--set loss[0].temperature=3`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ConfigArgs {
    /// The config, where it came from, and the registry with every plugin it and the
    /// environment name.
    pub fn load(&self) -> Result<(RunConfig, ConfigOrigin, Registry)> {
        let (cfg, origin) = config::load(self.config.as_deref(), &self.sets)?;
        let mut registry = crate::builtin_registry()?;
        plugin_loader::load_all(&mut registry, &cfg.plugins.paths).map_err(|e| origin.annotate(e))?;
        Ok((cfg, origin, registry))
    }
}

/// Whether to draw progress bars: not with `--quiet`, and only on a terminal.
pub fn progress_bars(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}
