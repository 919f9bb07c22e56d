//! The cross-rank parameter check: every rank hashes its parameters (xxh3 over their f32 bits)
//! and the hashes are gathered; a rank whose hash differs from rank 0's has drifted (a
//! nondeterministic kernel, a rank that read other data) and the run stops, on every rank,
//! naming it.

use candle_core::{DType, Var};
use xxhash_rust::xxh3::Xxh3;

use retort_core::{Error, Result};

use super::Collective;

/// An error naming the first rank whose parameters differ from rank 0's after step `step`.
pub fn check(comm: &dyn Collective, vars: &[(String, Var)], step: usize) -> Result<()> {
    let hashes = comm.all_gather_u64(checksum(vars)?)?;
    match hashes.iter().position(|h| *h != hashes[0]) {
        None => Ok(()),
        Some(rank) => Err(Error::Runtime(format!(
            "after step {step} the parameters of rank {rank} differ from rank 0's (checksums \
             {:016x} and {:016x}): the ranks no longer train the same model (a nondeterministic \
             kernel, or ranks that read different data); stopping",
            hashes[rank], hashes[0]
        ))),
    }
}

/// xxh3 of every parameter's values as f32 bits, in order.
pub fn checksum(vars: &[(String, Var)]) -> Result<u64> {
    let mut hasher = Xxh3::new();
    let mut bytes = Vec::new();
    for (_, v) in vars {
        let values = v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for chunk in values.chunks(1 << 14) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|x| x.to_bits().to_le_bytes()));
            hasher.update(&bytes);
        }
    }
    Ok(hasher.digest())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::super::local;
    use super::*;

    fn vars(values: &[f32]) -> Vec<(String, Var)> {
        let t = Tensor::new(values, &Device::Cpu).expect("t");
        vec![("w".to_string(), Var::from_tensor(&t).expect("var"))]
    }

    #[test]
    fn equal_parameters_pass_and_a_drifted_rank_is_named() {
        let same = local::run(3, |comm| Ok(check(comm, &vars(&[1.0, 2.0]), 50).is_ok()));
        assert_eq!(same, vec![true; 3]);
        let drifted = local::run(3, |comm| {
            let last = if comm.rank() == 2 {
                2.0 + f32::EPSILON * 2.0
            } else {
                2.0
            };
            Ok(check(comm, &vars(&[1.0, last]), 50).map_err(|e| e.to_string()))
        });
        for verdict in drifted {
            let message = verdict.expect_err("drift found on every rank");
            assert!(message.contains("after step 50 the parameters of rank 2"), "{message}");
        }
    }

    #[test]
    fn the_checksum_sees_every_bit_and_the_order() {
        let a = checksum(&vars(&[1.0, 2.0])).expect("a");
        assert_eq!(a, checksum(&vars(&[1.0, 2.0])).expect("a again"));
        assert_ne!(a, checksum(&vars(&[2.0, 1.0])).expect("swapped"));
        assert_ne!(
            a,
            checksum(&vars(&[1.0, f32::from_bits(2.0f32.to_bits() + 1)])).expect("one ulp")
        );
    }
}
