//! The device named in `run.device`.

use candle_core::Device;
use retort_core::{Error, Result};

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`; a device this build cannot use is a config error.
pub fn parse_device(spec: &str) -> Result<Device> {
    let unavailable = |e: candle_core::Error| {
        Error::config(
            "run.device",
            format!("device \"{spec}\" is not available: {e} (the CUDA build needs `--features cuda`)"),
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
