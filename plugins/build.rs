//! With the `cuda` feature: compiles every `.cu` file under `src/kernels/` to PTX (portable
//! `compute_80`, loaded by the driver on Ampere, Hopper and later) and writes
//! `$OUT_DIR/ptx.rs`, one `pub const NAME: &str` per file (`divergence.cu` -> `DIVERGENCE`).
//! Needs `nvcc` (CUDA 13.0; `scripts/cuda_toolchain.sh` installs one without a GPU). Without
//! the feature it does nothing.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build()?;
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
