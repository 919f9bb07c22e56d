//! How much memory a device has, so that an allocation (or a whole run) that cannot fit is
//! refused with a message before it is attempted: a failed allocation aborts the process.

use candle_core::Device;

use crate::{Error, Result};

/// Memory of a device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Free now (host: available RAM; GPU: free device memory).
    pub available: u64,
    /// The most it could ever have (host: RAM plus swap; GPU: device memory).
    pub total: u64,
}

/// The memory of `device`, when it can be asked.
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    match device {
        Device::Cpu => host_memory(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(DeviceMemory {
                available: free as u64,
                total: total as u64,
            })
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

fn host_memory() -> Option<DeviceMemory> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory();
    let total = sys.total_memory().checked_add(sys.total_swap())?;
    (total > 0).then(|| DeviceMemory {
        available: sys.available_memory(),
        total,
    })
}

/// Refuses `bytes` for `what` (the component at config key `key`) when they exceed everything
/// this host could ever hold (RAM and swap): a failed host allocation aborts the process
/// instead of returning an error. Does nothing where the host cannot be asked.
pub fn ensure_host_can_allocate(key: &str, what: &str, bytes: u128) -> Result<()> {
    match host_memory() {
        Some(m) if bytes > m.total as u128 => Err(Error::config(
            key,
            format!(
                "{what} needs {} of memory, more than this host has in all ({}); make it smaller",
                human_bytes(bytes.min(u64::MAX as u128) as u64),
                human_bytes(m.total)
            ),
        )),
        _ => Ok(()),
    }
}

/// `bytes` in binary units with three significant digits (`1.50 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if v >= 100.0 => format!("{v:.0} {}", UNITS[unit]),
        _ if v >= 10.0 => format!("{v:.1} {}", UNITS[unit]),
        _ => format!("{v:.2} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(20 * 1024 * 1024 * 1024), "20.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384 PiB");
    }

    #[test]
    fn the_host_knows_its_memory_and_refuses_the_impossible() {
        let m = device_memory(&Device::Cpu).expect("this host reports its memory");
        assert!(m.total >= m.available && m.available > 0, "{m:?}");
        let err = ensure_host_can_allocate("student", "the student's parameters", u128::MAX / 2).expect_err("refused");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("`student`"), "{err}");
        ensure_host_can_allocate("student", "a little", 1 << 20).expect("fits");
    }
}
