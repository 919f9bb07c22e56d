//! The per-token coding of a teacher's top-`k` distribution inside a cache frame (see
//! docs/cache-format.md).
//!
//! A token's `k` entries are stored in ascending order of their id's *rank* in the shard's
//! frequency table (ids that appear most often in the shard's top-k lists first), as LEB128
//! gaps between consecutive ranks; the probabilities in the same order as value codes:
//!
//! - `sqrt` (default): `c = round(L sqrt(p))` with `L` levels, one byte for `L <= 255`, two up
//!   to 65,535. Quantising `sqrt(p)` with step `s = 1/L` changes `p` by `2 sqrt(p) d` with `d`
//!   uniform in `[-s/2, s/2]`, so each entry adds about `E[dp^2] / 2p = s^2 / 6` to
//!   KL(exact || reconstructed) whatever its probability (a log-domain step would spend its
//!   bits on entries that carry no mass): `KL ~ k / (6 L^2)` nats/token. A build picks the
//!   fewest levels that keep this under a target, `L = ceil(sqrt(k / (6 KL_max)))` (default
//!   `KL_max = 4e-4`: `L = 164` at `k = 64`, i.e. ~7.4 bits before entropy coding). The tail
//!   mass `m = 1 - sum p` is one more byte per token (`round(255 sqrt(m))`, adding ~3e-6); a
//!   reader renormalises the `k + 1` decoded masses to 1.
//! - `f32`: the exact log-probabilities (4 bytes each, no tail code: `m = 1 - sum p`). A student
//!   trained from an `f32` cache sees bit-identical targets to the live teacher.
//!
//! Ids never enter the order of the values: the reader sorts the decoded entries by
//! probability, descending, which is the `topk.{k}` tap contract. Ties (equal codes) keep the
//! shard's frequency order for `sqrt` and ascending ids for `f32`.

use retort_core::{Error, Result};

/// How probabilities are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum ValueCoding {
    /// `round(levels * sqrt(p))`, 1 byte (levels <= 255) or 2 bytes; tail mass in 1 byte.
    Sqrt {
        /// Quantisation levels of `sqrt(p)` (1..=65535).
        levels: u32,
    },
    /// Exact `f32` log-probabilities.
    F32,
}

/// Levels of the tail-mass code.
const TAIL_LEVELS: f64 = 255.0;

impl ValueCoding {
    /// The `sqrt` coding with the fewest levels whose expected KL(exact || reconstructed) over
    /// `k` entries, `k / (6 L^2)`, is at most `max_kl` nats/token.
    pub fn sqrt_for(k: usize, max_kl: f64) -> Self {
        let levels = (k as f64 / (6.0 * max_kl)).sqrt().ceil().clamp(1.0, 65535.0) as u32;
        ValueCoding::Sqrt { levels }
    }
    /// Expected KL(exact || reconstructed) per token from quantising `k` entries (0 for f32).
    pub fn expected_kl(self, k: usize) -> f64 {
        match self {
            Self::Sqrt { levels } => k as f64 / (6.0 * (levels as f64).powi(2)),
            Self::F32 => 0.0,
        }
    }
    /// A short name: `sqrt164`, `f32`.
    pub fn name(self) -> String {
        match self {
            Self::Sqrt { levels } => format!("sqrt{levels}"),
            Self::F32 => "f32".into(),
        }
    }
    /// The coding's id in shard headers: 0 for f32, else the number of levels.
    pub fn id(self) -> u32 {
        match self {
            Self::Sqrt { levels } => levels,
            Self::F32 => 0,
        }
    }
    /// The coding with header id `id`.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(Self::F32),
            1..=65535 => Some(Self::Sqrt { levels: id }),
            _ => None,
        }
    }
    /// Bytes per stored value.
    pub fn value_bytes(self) -> usize {
        match self {
            Self::Sqrt { levels } if levels <= 255 => 1,
            Self::Sqrt { .. } => 2,
            Self::F32 => 4,
        }
    }
    /// Bytes of the per-token tail code.
    pub fn tail_bytes(self) -> usize {
        match self {
            Self::Sqrt { .. } => 1,
            Self::F32 => 0,
        }
    }
}

/// `round(levels * sqrt(p))`, clamped to the code range.
fn sqrt_code(p: f64, levels: f64) -> u32 {
    (p.clamp(0.0, 1.0).sqrt() * levels).round() as u32
}

/// The mass a code stands for: `(c / levels)^2`; code 0 stands for the mean mass of the
/// interval it covers, `(0.5 / levels)^2 / 3` (never 0, so every log-prob is finite).
fn code_mass(c: u32, levels: f64) -> f64 {
    if c == 0 {
        (0.5 / levels).powi(2) / 3.0
    } else {
        (c as f64 / levels).powi(2)
    }
}

/// The mass and log-mass of every code of a coding (built once per shard).
#[derive(Debug, Clone)]
pub struct ValueLut {
    mass: Vec<f64>,
    ln_mass: Vec<f64>,
    ln_mass_f32: Vec<f32>,
    tail_mass: Vec<f64>,
}

impl ValueLut {
    /// The tables of `coding` (empty for `f32`).
    pub fn new(coding: ValueCoding) -> Self {
        let (mass, ln_mass) = match coding {
            ValueCoding::Sqrt { levels } => {
                let m: Vec<f64> = (0..=levels).map(|c| code_mass(c, levels as f64)).collect();
                let l = m.iter().map(|x| x.ln()).collect();
                (m, l)
            }
            ValueCoding::F32 => (Vec::new(), Vec::new()),
        };
        ValueLut {
            ln_mass_f32: ln_mass.iter().map(|&x| x as f32).collect(),
            mass,
            ln_mass,
            tail_mass: (0..=255).map(|c| code_mass(c, TAIL_LEVELS)).collect(),
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut x: u32) {
    while x >= 0x80 {
        out.push((x as u8 & 0x7f) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

#[inline]
fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u32> {
    let first = *buf.get(*pos)?;
    if first < 0x80 {
        *pos += 1;
        return Some(first as u32);
    }
    let mut x = 0u32;
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        x |= ((b & 0x7f) as u32) << shift;
        if b < 0x80 {
            return Some(x);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Encodes `tokens` tokens of top-`k` rows (`ids`, `logprobs`: `[tokens * k]`, any order inside
/// a row) into one uncompressed frame. `rank_of[id]` is the id's rank in the shard's frequency
/// table.
pub fn encode_frame(ids: &[u32], logprobs: &[f32], k: usize, coding: ValueCoding, rank_of: &[u32]) -> Vec<u8> {
    let tokens = ids.len() / k;
    let mut tails = Vec::with_capacity(tokens * coding.tail_bytes());
    let mut values = Vec::with_capacity(tokens * k * coding.value_bytes());
    let mut gaps = Vec::with_capacity(tokens * k * 2);
    let mut order: Vec<(u32, usize)> = Vec::with_capacity(k);
    for t in 0..tokens {
        let row_ids = &ids[t * k..(t + 1) * k];
        let row_lp = &logprobs[t * k..(t + 1) * k];
        order.clear();
        order.extend(row_ids.iter().enumerate().map(|(j, &id)| (rank_of[id as usize], j)));
        order.sort_unstable();
        let mut prev: Option<u32> = None;
        let mut head = 0.0f64;
        for &(rank, j) in &order {
            put_varint(&mut gaps, prev.map_or(rank, |p| rank - p - 1));
            prev = Some(rank);
            let lp = row_lp[j];
            head += (lp as f64).exp();
            match coding {
                ValueCoding::Sqrt { levels } => {
                    let c = sqrt_code((lp as f64).exp(), levels as f64).min(levels);
                    if levels <= 255 {
                        values.push(c as u8);
                    } else {
                        values.extend_from_slice(&(c as u16).to_le_bytes());
                    }
                }
                ValueCoding::F32 => values.extend_from_slice(&lp.to_le_bytes()),
            }
        }
        if coding.tail_bytes() > 0 {
            let tail = (1.0 - head).max(0.0);
            tails.push(sqrt_code(tail, TAIL_LEVELS).min(255) as u8);
        }
    }
    let mut out = tails;
    out.extend_from_slice(&values);
    out.extend_from_slice(&gaps);
    out
}

/// Decodes a frame of `tokens` tokens into the top-`k_out` entries of each (`k_out <= k`):
/// ids and log-probabilities, descending by probability (ties by ascending id), appended to
/// `ids_out` / `lp_out`. `id_of_rank` inverts the shard's frequency table.
#[allow(clippy::too_many_arguments)]
pub fn decode_frame(
    frame: &[u8],
    tokens: usize,
    k: usize,
    k_out: usize,
    coding: ValueCoding,
    lut: &ValueLut,
    id_of_rank: &[u32],
    ids_out: &mut Vec<u32>,
    lp_out: &mut Vec<f32>,
) -> Result<()> {
    let bad = |what: &str| Error::Runtime(format!("corrupt cache frame: {what}"));
    if k == 0 || k_out > k || k > u16::MAX as usize {
        return Err(Error::Runtime(format!(
            "decode_frame: top-{k_out} of {k} entries per token (k: 1 to 65,535)"
        )));
    }
    // Every entry has a value and at least one byte of id gap.
    let tail_len = tokens.checked_mul(coding.tail_bytes());
    let values_len = tokens.checked_mul(k).and_then(|e| e.checked_mul(coding.value_bytes()));
    let (Some(tail_len), Some(values_len)) = (tail_len, values_len) else {
        return Err(bad("its size overflows"));
    };
    let min_len = tail_len.checked_add(values_len).and_then(|n| n.checked_add(tokens * k));
    if min_len.is_none_or(|n| frame.len() < n) {
        return Err(bad("shorter than its values"));
    }
    let (tails, rest) = frame.split_at(tail_len);
    let (values, gaps) = rest.split_at(values_len);
    if let ValueCoding::Sqrt { levels } = coding {
        if lut.mass.len() != levels as usize + 1 {
            return Err(Error::Runtime("decode_frame: value table of another coding".into()));
        }
    }
    let mut pos = 0usize;
    let mut keys: Vec<u64> = Vec::with_capacity(k);
    let mut row_ids = vec![0u32; k];
    let mut counts = [0u16; 256];
    let mut order = vec![0u16; k];
    for t in 0..tokens {
        let mut rank: Option<u32> = None;
        for id in row_ids.iter_mut() {
            let g = get_varint(gaps, &mut pos).ok_or_else(|| bad("truncated id gaps"))?;
            let r = match rank {
                None => g,
                Some(p) => p
                    .checked_add(g)
                    .and_then(|r| r.checked_add(1))
                    .ok_or_else(|| bad("id rank overflows"))?,
            };
            rank = Some(r);
            *id = *id_of_rank
                .get(r as usize)
                .ok_or_else(|| bad("id rank outside the shard's table"))?;
        }
        keys.clear();
        match coding {
            ValueCoding::F32 => {
                // -lp >= 0, whose f32 bits order like the values: descending probability, ties
                // by ascending id.
                for (j, &id) in row_ids.iter().enumerate() {
                    let o = (t * k + j) * 4;
                    let lp = f32::from_le_bytes([values[o], values[o + 1], values[o + 2], values[o + 3]]);
                    keys.push((((-lp).max(0.0).to_bits() as u64) << 32) | id as u64);
                }
                keys.sort_unstable();
                ids_out.extend(keys[..k_out].iter().map(|&key| key as u32));
                lp_out.extend(keys[..k_out].iter().map(|&key| -f32::from_bits((key >> 32) as u32)));
            }
            ValueCoding::Sqrt { levels } if levels <= 255 => {
                // One-byte codes: a counting sort by code (descending), stable in rank order,
                // which is the order of the entries in the frame.
                let codes = &values[t * k..(t + 1) * k];
                let mut total = 0f64;
                let (mut lo, mut hi) = (usize::MAX, 0usize);
                for &c in codes {
                    let c = (c as u32).min(levels) as usize;
                    total += lut.mass[c];
                    counts[c] += 1;
                    lo = lo.min(c);
                    hi = hi.max(c);
                }
                let tc = tails[t] as usize;
                total += if tc == 0 { 0.0 } else { lut.tail_mass[tc] };
                let log_total = total.ln() as f32;
                // Start of each code's run, highest code first (only the codes in use).
                let mut at = 0u16;
                for c in (lo..=hi).rev() {
                    let n = counts[c];
                    counts[c] = at;
                    at += n;
                }
                for (j, &c) in codes.iter().enumerate() {
                    let c = (c as u32).min(levels) as usize;
                    order[counts[c] as usize] = j as u16;
                    counts[c] += 1;
                }
                counts[lo..=hi].iter_mut().for_each(|c| *c = 0);
                let base = ids_out.len();
                ids_out.resize(base + k_out, 0);
                lp_out.resize(base + k_out, 0.0);
                for ((&j, id), lp) in order[..k_out].iter().zip(&mut ids_out[base..]).zip(&mut lp_out[base..]) {
                    let c = (codes[j as usize] as u32).min(levels) as usize;
                    *id = row_ids[j as usize];
                    *lp = lut.ln_mass_f32[c] - log_total;
                }
            }
            ValueCoding::Sqrt { levels } => {
                // Two-byte codes: sort (levels - code, rank position).
                let mut total = 0f64;
                for j in 0..k {
                    let o = (t * k + j) * 2;
                    let c = (u16::from_le_bytes([values[o], values[o + 1]]) as u32).min(levels);
                    total += lut.mass[c as usize];
                    keys.push(((levels - c) as u64) << 32 | j as u64);
                }
                let tc = tails[t] as usize;
                total += if tc == 0 { 0.0 } else { lut.tail_mass[tc] };
                let log_total = total.ln();
                keys.sort_unstable();
                for &key in &keys[..k_out] {
                    ids_out.push(row_ids[(key as u32) as usize]);
                    lp_out.push((lut.ln_mass[(levels - (key >> 32) as u32) as usize] - log_total) as f32);
                }
            }
        }
    }
    if pos != gaps.len() {
        return Err(bad("trailing bytes after the id gaps"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(k: usize, v: u32, seed: u32) -> (Vec<u32>, Vec<f32>) {
        // A peaked distribution over distinct ids.
        let ids: Vec<u32> = (0..k as u32).map(|j| (j * 7919 + seed * 31) % v).collect();
        let raw: Vec<f64> = (0..k).map(|j| -(j as f64) * 0.3 - (seed % 3) as f64).collect();
        let z = raw.iter().map(|x| x.exp()).sum::<f64>() / 0.9; // 10% tail
        (ids, raw.iter().map(|x| (x - z.ln()) as f32).collect())
    }

    fn identity_table(v: u32) -> (Vec<u32>, Vec<u32>) {
        ((0..v).collect(), (0..v).collect())
    }

    #[test]
    fn f32_round_trip_is_exact_and_sorted() {
        let (k, v) = (8, 1000);
        let (rank_of, id_of_rank) = identity_table(v);
        let mut ids = Vec::new();
        let mut lps = Vec::new();
        for s in 0..5 {
            let (i, l) = row(k, v, s);
            ids.extend(i);
            lps.extend(l);
        }
        let frame = encode_frame(&ids, &lps, k, ValueCoding::F32, &rank_of);
        let (mut oi, mut ol) = (Vec::new(), Vec::new());
        decode_frame(
            &frame,
            5,
            k,
            k,
            ValueCoding::F32,
            &ValueLut::new(ValueCoding::F32),
            &id_of_rank,
            &mut oi,
            &mut ol,
        )
        .expect("decode");
        // Rows were generated descending already, so the decoded order is the input order.
        assert_eq!(oi, ids);
        assert_eq!(ol, lps);
        // A prefix of the top-k.
        let (mut pi, mut pl) = (Vec::new(), Vec::new());
        decode_frame(
            &frame,
            5,
            k,
            3,
            ValueCoding::F32,
            &ValueLut::new(ValueCoding::F32),
            &id_of_rank,
            &mut pi,
            &mut pl,
        )
        .expect("decode");
        assert_eq!(pi[..3], ids[..3]);
        assert_eq!(pl[3..6], lps[8..11]);
    }

    #[test]
    fn quantised_codings_stay_within_their_kl_bound() {
        let (k, v) = (64, 5000);
        let (rank_of, id_of_rank) = identity_table(v);
        for coding in [
            ValueCoding::sqrt_for(k, 4e-4),
            ValueCoding::Sqrt { levels: 255 },
            ValueCoding::Sqrt { levels: 65535 },
        ] {
            // The expected value, with room for one draw (and the tail code's share).
            let bound = 3.0 * coding.expected_kl(k) + 1e-5;
            let (ids, lps) = row(k, v, 1);
            let frame = encode_frame(&ids, &lps, k, coding, &rank_of);
            let (mut oi, mut ol) = (Vec::new(), Vec::new());
            decode_frame(
                &frame,
                1,
                k,
                k,
                coding,
                &ValueLut::new(coding),
                &id_of_rank,
                &mut oi,
                &mut ol,
            )
            .expect("decode");
            // KL over the k + 1 outcomes (top-k and the tail bucket).
            let p: std::collections::HashMap<u32, f64> =
                ids.iter().zip(&lps).map(|(&i, &l)| (i, (l as f64).exp())).collect();
            let q: std::collections::HashMap<u32, f64> =
                oi.iter().zip(&ol).map(|(&i, &l)| (i, (l as f64).exp())).collect();
            assert_eq!(p.len(), q.len());
            let mut kl = 0.0;
            for (i, pi) in &p {
                kl += pi * (pi / q[i]).ln();
            }
            let (mp, mq) = (1.0 - p.values().sum::<f64>(), 1.0 - q.values().sum::<f64>());
            kl += mp * (mp / mq).ln();
            assert!(kl >= 0.0 && kl < bound, "{coding:?}: KL {kl} over bound {bound}");
            assert!(ol.windows(2).all(|w| w[0] >= w[1]), "not descending");
        }
    }

    #[test]
    fn levels_follow_the_kl_target() {
        assert_eq!(ValueCoding::sqrt_for(64, 4e-4), ValueCoding::Sqrt { levels: 164 });
        assert_eq!(ValueCoding::sqrt_for(16, 4e-4), ValueCoding::Sqrt { levels: 82 });
        assert_eq!(ValueCoding::sqrt_for(64, 1e-12), ValueCoding::Sqrt { levels: 65535 });
        for c in [
            ValueCoding::F32,
            ValueCoding::Sqrt { levels: 7 },
            ValueCoding::Sqrt { levels: 300 },
        ] {
            assert_eq!(ValueCoding::from_id(c.id()), Some(c));
        }
        assert!(ValueCoding::sqrt_for(64, 4e-4).expected_kl(64) <= 4e-4);
    }

    #[test]
    fn corrupt_frames_are_errors_not_panics() {
        let (k, v) = (4, 100);
        let (rank_of, id_of_rank) = identity_table(v);
        let (ids, lps) = row(k, v, 2);
        let frame = encode_frame(&ids, &lps, k, ValueCoding::Sqrt { levels: 255 }, &rank_of);
        let (mut oi, mut ol) = (Vec::new(), Vec::new());
        for cut in [0, 3, frame.len() - 1] {
            assert!(decode_frame(
                &frame[..cut],
                1,
                k,
                k,
                ValueCoding::Sqrt { levels: 255 },
                &ValueLut::new(ValueCoding::Sqrt { levels: 255 }),
                &id_of_rank,
                &mut oi,
                &mut ol
            )
            .is_err());
        }
        let mut long = frame.clone();
        long.push(0);
        assert!(decode_frame(
            &long,
            1,
            k,
            k,
            ValueCoding::Sqrt { levels: 255 },
            &ValueLut::new(ValueCoding::Sqrt { levels: 255 }),
            &id_of_rank,
            &mut oi,
            &mut ol
        )
        .is_err());
        // A rank past the table.
        assert!(decode_frame(
            &frame,
            1,
            k,
            k,
            ValueCoding::Sqrt { levels: 255 },
            &ValueLut::new(ValueCoding::Sqrt { levels: 255 }),
            &id_of_rank[..5],
            &mut oi,
            &mut ol
        )
        .is_err());
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz::config())]

        /// Any bytes, with any shape and coding, decode or are an error; nothing panics.
        #[test]
        fn arbitrary_frames_never_panic(
            frame in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            tokens in 0usize..5,
            k in 0usize..6,
            k_out in 0usize..7,
            coding in proptest::sample::select(vec![
                ValueCoding::F32,
                ValueCoding::Sqrt { levels: 1 },
                ValueCoding::Sqrt { levels: 255 },
                ValueCoding::Sqrt { levels: 256 },
                ValueCoding::Sqrt { levels: 65535 },
            ]),
            table in proptest::collection::vec(0u32..100, 0..20),
        ) {
            let (mut oi, mut ol) = (Vec::new(), Vec::new());
            if decode_frame(&frame, tokens, k, k_out, coding, &ValueLut::new(coding), &table, &mut oi, &mut ol).is_ok() {
                proptest::prop_assert_eq!(oi.len(), tokens * k_out);
                proptest::prop_assert_eq!(ol.len(), tokens * k_out);
            }
        }
    }
}
