//! With the `cuda` feature: compiles every `.cu` file under `src/kernels/` to PTX (portable
//! `compute_80`, loaded by the driver on Ampere, Hopper and later) and writes
//! `$OUT_DIR/ptx.rs`, one `pub const NAME: &str` per file (`divergence.cu` -> `DIVERGENCE`).
//! Needs `nvcc` (CUDA 13.0; `scripts/cuda_toolchain.sh` installs one without a GPU). Without
//! the feature it does nothing.
//!
//! With `cuda-emulate`: compiles the same `.cu` files as C++ for the CPU (`RETORT_EMULATE`,
//! `src/kernels/cuda/emulate.h`) into a static library kept whole (each kernel registers itself
//! by name at load), for the tests that run the device code without a GPU.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build()?;
    #[cfg(feature = "cuda-emulate")]
    emulate::build()?;
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    /// The PTX target of retort's own kernels: portable to every GPU from Ampere on.
    const COMPUTE_CAP: usize = 80;

    pub fn build() -> Result<(), Box<dyn std::error::Error>> {
        println!("cargo::rerun-if-changed=src/kernels");
        let out = PathBuf::from(std::env::var("OUT_DIR")?);
        let ptx = cudaforge::KernelBuilder::new()
            .source_glob("src/kernels/**/*.cu")
            .include_path("src/kernels/cuda")
            .watch(["src/kernels/cuda/common.cuh"])
            .compute_cap(COMPUTE_CAP)
            .arg("-std=c++17")
            .arg("-O3")
            .arg("--expt-relaxed-constexpr")
            .build_ptx()?;
        ptx.write(out.join("ptx.rs"))?;
        Ok(())
    }
}

#[cfg(feature = "cuda-emulate")]
mod emulate {
    use std::path::{Path, PathBuf};

    /// Every `.cu` file below `dir`, sorted.
    fn kernel_sources(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                out.extend(kernel_sources(&path)?);
            } else if path.extension().is_some_and(|e| e == "cu") {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn build() -> Result<(), Box<dyn std::error::Error>> {
        println!("cargo::rerun-if-changed=src/kernels");
        let sources = kernel_sources(Path::new("src/kernels"))?;
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++20")
            .opt_level(2)
            .define("RETORT_EMULATE", None)
            .include("src/kernels/cuda")
            .flag("-pthread")
            .warnings(false)
            .link_lib_modifier("+whole-archive")
            .file("src/kernels/cuda/emulate.cpp");
        // The `.cu` files as C++ (the compiler would not know the suffix).
        build.flag("-x").flag("c++");
        for source in &sources {
            build.file(source);
        }
        build.compile("retort_cuda_emulated");
        println!("cargo::rustc-link-lib=pthread");
        Ok(())
    }
}
