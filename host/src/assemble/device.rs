//! The device named in `run.device`.

use candle_core::Device;
use retort_core::{Error, Result};

/// What this build can do about a device that did not open.
fn build_hint(spec: &str) -> &'static str {
    match spec {
        "metal" => "this build has no Metal backend",
        _ if !cfg!(feature = "cuda") => "this build has no CUDA backend: build with `--features cuda`",
        _ => {
            "this CUDA build could not open it: check `nvidia-smi` (the GPUs and their numbers) and that \
             libcuda.so.1 is NVIDIA's driver"
        }
    }
}

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`; a device this build cannot use is a config error.
pub fn parse_device(spec: &str) -> Result<Device> {
    let unavailable = |e: candle_core::Error| {
        // Only the error's first line: candle appends a backtrace when RUST_BACKTRACE is set.
        let reason = e.to_string();
        let reason = reason.lines().next().unwrap_or_default();
        Error::config(
            "run.device",
            format!("device \"{spec}\" is not available: {reason} ({})", build_hint(spec)),
        )
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(unavailable),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    Error::config("run.device", format!("expected cuda:N with N an integer, got \"{s}\""))
                })?,
                None => 0,
            };
            Device::new_cuda(ordinal).map_err(unavailable)
        }
        other => Err(Error::config(
            "run.device",
            format!("expected \"cpu\", \"cuda\", \"cuda:N\" or \"metal\", got \"{other}\""),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_malformed_devices() {
        assert!(parse_device("cpu").expect("cpu").is_cpu());
        for bad in ["gpu", "cuda:x", "cuda:-1"] {
            let e = parse_device(bad).expect_err(bad).to_string();
            assert!(e.contains("run.device"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_cuda_device_that_does_not_open_says_what_this_build_lacks() {
        // On a machine with a GPU and a CUDA build this opens; everywhere else the message
        // must say why not for this build, in one line (no backtrace).
        match parse_device("cuda") {
            Ok(d) => assert!(d.is_cuda()),
            Err(e) => {
                let e = e.to_string();
                let hint = if cfg!(feature = "cuda") {
                    "could not open it: check `nvidia-smi`"
                } else {
                    "--features cuda"
                };
                assert!(e.contains(hint) && e.contains("run.device"), "{e}");
                assert!(!e.contains("backtrace"), "{e}");
            }
        }
    }
}
