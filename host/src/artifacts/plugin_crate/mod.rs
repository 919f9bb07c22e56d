//! `retort new-plugin NAME --kind loss|router [--dir PATH]`: a plugin crate that builds and
//! loads without edits.

use std::path::{Path, PathBuf};

use retort_core::{fsutil, Error, Result};

const CARGO_TOML: &str = include_str!("templates/Cargo.toml.txt");
const LOSS_LIB: &str = include_str!("templates/loss_lib.rs.txt");
const ROUTER_LIB: &str = include_str!("templates/router_lib.rs.txt");
const README: &str = include_str!("templates/README.md.txt");

/// What kind of plugin to scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PluginKind {
    /// A loss term.
    Loss,
    /// A router.
    Router,
}

/// The retort-sdk this binary was built with (the plugin must be built against the same one).
pub fn sdk_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    p.canonicalize().unwrap_or(p)
}

/// The retort-sdk features of this binary, as a dependency's `features = [...]` (the ABI
/// fingerprint names the features: a plugin of a CUDA build is built with `cuda`).
fn sdk_features() -> &'static str {
    if cfg!(feature = "cuda") {
        r#", features = ["cuda"]"#
    } else {
        ""
    }
}

fn pascal(kind: &str) -> String {
    kind.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Writes the crate `NAME` into `dir/NAME`; returns its path.
pub fn new_plugin(name: &str, kind: PluginKind, dir: &Path) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if !valid {
        return Err(Error::input(
            format!("plugin name `{name}`"),
            "expected lowercase letters, digits, '-' or '_', starting with a letter",
        ));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(Error::input(
            format!("plugin directory {}", root.display()),
            "already exists; nothing was written",
        ));
    }
    let kind_name = name.replace('-', "_");
    let lib_name = kind_name.clone();
    let lib_path = format!(
        "{}/target/release/{}{lib_name}{}",
        root.display(),
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let fill = |t: &str| {
        t.replace("{name}", name)
            .replace("{kind}", &kind_name)
            .replace("{Type}", &pascal(&kind_name))
            .replace("{lib_path}", &lib_path)
            .replace("{sdk_path}", &sdk_path().display().to_string())
            .replace("{sdk_features}", sdk_features())
            .replace("{category}", if kind == PluginKind::Loss { "loss" } else { "router" })
    };
    std::fs::create_dir_all(root.join("src")).map_err(|e| Error::io("creating plugin directory", &root, e))?;
    fsutil::write_atomic(&root.join("Cargo.toml"), fill(CARGO_TOML).as_bytes())?;
    let lib = if kind == PluginKind::Loss { LOSS_LIB } else { ROUTER_LIB };
    fsutil::write_atomic(&root.join("src/lib.rs"), fill(lib).as_bytes())?;
    fsutil::write_atomic(&root.join("README.md"), fill(README).as_bytes())?;
    Ok(root)
}
