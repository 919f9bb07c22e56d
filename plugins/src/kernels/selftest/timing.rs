//! Wall time of a call on a device, and the bandwidth it implies.

use std::time::Instant;

use candle_core::{Device, Result};

/// Median wall time in ms of `repeats` calls of `f` after one warm-up call, with the device
/// synchronised before and after each call (so queued GPU work is inside the timed region).
pub fn median_ms(device: &Device, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        device.synchronize()?;
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// The median of `xs` (the mean of the middle two for an even count; NaN when empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// GB/s (1e9 bytes per second) of moving `bytes` in `ms` milliseconds.
pub fn gb_per_s(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn bandwidth_of_a_gigabyte_in_half_a_second() {
        assert!((gb_per_s(1e9, 500.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn median_ms_calls_once_to_warm_up_then_times_each_repeat() {
        let mut calls = 0;
        let ms = median_ms(&Device::Cpu, 3, || {
            calls += 1;
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        })
        .expect("time");
        assert_eq!(calls, 4);
        assert!(ms >= 2.0, "{ms}");
    }
}
