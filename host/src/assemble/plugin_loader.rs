//! Loading plugin libraries at run time.
//!
//! Paths come from `[plugins] paths = [...]` in the config and from `RETORT_PLUGIN_PATH`
//! (colon-separated files or directories; a directory contributes every `.so`, `.dylib` or
//! `.dll` in it, sorted). For each library: open it, read its fingerprint through the C-ABI
//! symbol, compare it field by field with this build's, and only then call the Rust-ABI
//! registration function. Libraries stay loaded for the life of the process (never unloaded:
//! their factories and vtables are referenced from the registry).

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::c_char;
use std::path::{Path, PathBuf};

use retort_core::plugin::{fingerprint_mismatch, RegisterFn, FINGERPRINT, FINGERPRINT_SYMBOL, REGISTER_SYMBOL};
use retort_core::{Error, Registry, Result};

/// Environment variable with extra plugin paths.
pub const PLUGIN_PATH_ENV: &str = "RETORT_PLUGIN_PATH";

fn is_library(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

/// Expands `RETORT_PLUGIN_PATH` into library files.
pub fn env_plugin_paths() -> Result<Vec<PathBuf>> {
    let Ok(value) = std::env::var(PLUGIN_PATH_ENV) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for part in value.split(':').filter(|p| !p.is_empty()) {
        let p = PathBuf::from(part);
        if p.is_dir() {
            let mut libs: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(|e| Error::input_failed(format!("{PLUGIN_PATH_ENV} entry {}", p.display()), "cannot list", e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && is_library(f))
                .collect();
            libs.sort();
            out.extend(libs);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// Loads one plugin library into `registry`. `origin` says where the path was named (for errors).
pub fn load_plugin(registry: &mut Registry, path: &Path, origin: &str) -> Result<()> {
    let what = || format!("plugin {} ({origin})", path.display());
    if !path.is_file() {
        return Err(Error::input(what(), "file not found"));
    }
    // SAFETY: opening a library runs its initialisers. Plugins are code the user chose to load
    // by naming them; this is the trust boundary of any plugin system.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| Error::input_failed(what(), "not a loadable shared library", e))?;
    // SAFETY: the symbol, if present, is the C-ABI function `export_plugin!` writes:
    // `extern "C" fn() -> *const c_char` returning a pointer to a static NUL-terminated string.
    let fingerprint_fn = unsafe { lib.get::<extern "C" fn() -> *const c_char>(FINGERPRINT_SYMBOL.as_bytes()) }.map_err(|_| {
        Error::input(
            what(),
            format!("not a retort plugin: it exports no `{FINGERPRINT_SYMBOL}` (build it with retort_sdk::export_plugin!)"),
        )
    })?;
    let ptr = fingerprint_fn();
    if ptr.is_null() {
        return Err(Error::input(what(), "its fingerprint is a null pointer"));
    }
    // SAFETY: non-null pointer to a NUL-terminated static string (see above).
    let theirs = unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned();
    if let Some((field, ours, other)) = fingerprint_mismatch(FINGERPRINT, &theirs) {
        return Err(Error::input(
            what(),
            format!(
                "built for a different retort ABI: {field} is `{other}` in the plugin but `{ours}` in this retort; \
                 rebuild the plugin against this retort-sdk with the same toolchain and features"
            ),
        ));
    }
    // SAFETY: the fingerprint matched field for field: the same retort, rustc, candle, features
    // and target built the library, so its Rust-ABI `fn(&mut dyn Registrar)` has our layout.
    let register: RegisterFn = *unsafe { lib.get::<RegisterFn>(REGISTER_SYMBOL.as_bytes()) }.map_err(|_| {
        Error::input(
            what(),
            format!("the plugin exports a fingerprint but no `{REGISTER_SYMBOL}`"),
        )
    })?;
    // Never unloaded: the registry now holds pointers into the library.
    std::mem::forget(lib);
    registry.register_plugin(&path.display().to_string(), register)
}

/// Loads the config's plugin paths and those of `RETORT_PLUGIN_PATH`.
pub fn load_all(registry: &mut Registry, config_paths: &[PathBuf]) -> Result<()> {
    for (i, p) in config_paths.iter().enumerate() {
        load_plugin(registry, p, &format!("plugins.paths[{i}]"))?;
    }
    for p in env_plugin_paths()? {
        load_plugin(registry, &p, PLUGIN_PATH_ENV)?;
    }
    Ok(())
}
