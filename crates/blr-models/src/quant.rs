//! ggml tensor types: their block layouts and dequantisation to f32.
//!
//! A ggml tensor row of `ne0` elements is stored as `ne0 / block_size` blocks of `type_size`
//! bytes each (all little-endian). The block layouts decoded here, for 32 weights per block:
//! - `Q8_0` (34 B): f16 scale `d`, then 32 × i8 `q`; `x = d * q`.
//! - `Q4_0` (18 B): f16 `d`, then 16 bytes of nibbles; byte `j` holds weight `j` in its low
//!   nibble and weight `j + 16` in its high nibble; `x = d * (nibble - 8)`.
//! - `Q4_1` (20 B): f16 `d`, f16 min `m`, then 16 bytes of nibbles laid out as in `Q4_0`;
//!   `x = d * nibble + m`.
//!
//! - `Q5_0` (22 B) / `Q5_1` (24 B): like `Q4_0` / `Q4_1` plus a `u32` of fifth bits (bit `j`
//!   for weight `j`, bit `j + 16` for weight `j + 16`), values `0..32` (`- 16` for `Q5_0`).
//!
//! The k-quants (llama.cpp's `Q*_K`, what `Q4_K_M`-style files mostly hold) use 256-weight
//! super-blocks with f16 super-scales and small per-16/32-weight sub-scales:
//! - `Q2_K` (84 B): 16 bytes of (4-bit scale, 4-bit min), 64 bytes of 2-bit quants, `d`, `dmin`.
//! - `Q3_K` (110 B): 32 bytes of high bits, 64 bytes of 2-bit quants, 12 bytes packing sixteen
//!   6-bit scales, `d`.
//! - `Q4_K` (144 B) / `Q5_K` (176 B): `d`, `dmin`, 12 bytes packing eight 6-bit (scale, min)
//!   pairs, (`Q5_K`: 32 bytes of fifth bits), 128 bytes of nibbles.
//! - `Q6_K` (210 B): 128 bytes of low nibbles, 64 bytes of 2-bit highs, sixteen i8 scales, `d`.
//!
//! F16 and BF16 are one element per "block". `Q8_1` and `Q8_K` (llama.cpp's intermediate
//! types, never stored in model files) and the integer types are listed with their sizes so
//! that a file containing them still validates; asking to dequantise one is a clear error.

use half::{bf16, f16};
use rayon::prelude::*;

/// The ggml element types, with the numbering used in GGUF tensor infos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

/// Types this crate can turn into f32.
pub const DEQUANTISABLE: &str =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

impl GgmlType {
    /// Decodes the GGUF type id, or `None` for an id this reader does not know.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            24 => GgmlType::I8,
            25 => GgmlType::I16,
            26 => GgmlType::I32,
            27 => GgmlType::I64,
            28 => GgmlType::F64,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::I8 => 24,
            GgmlType::I16 => 25,
            GgmlType::I32 => 26,
            GgmlType::I64 => 27,
            GgmlType::F64 => 28,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => 32,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Q8K => 256,
            _ => 1,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::I32 => 4,
            GgmlType::F16 | GgmlType::BF16 | GgmlType::I16 => 2,
            GgmlType::I8 => 1,
            GgmlType::I64 | GgmlType::F64 => 8,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
            GgmlType::Q8K => 292,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::I8 => "I8",
            GgmlType::I16 => "I16",
            GgmlType::I32 => "I32",
            GgmlType::I64 => "I64",
            GgmlType::F64 => "F64",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Bytes taken by `elements` elements, or `None` when `elements` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !elements.is_multiple_of(bs) {
            return None;
        }
        (elements / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Blocks per rayon task: large enough that scheduling is negligible next to decoding
/// (4096 blocks of 32 = 128 Ki weights), small enough to split the 28 M-weight embedding of
/// SmolLM2 across both cores.
const BLOCKS_PER_TASK: usize = 4096;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dequant_block(ty: GgmlType, block: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
        GgmlType::F16 => out[0] = f16_at(block, 0),
        GgmlType::BF16 => out[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32(),
        GgmlType::Q8_0 => {
            let d = f16_at(block, 0);
            for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                *o = d * f32::from(q as i8);
            }
        }
        GgmlType::Q4_0 => {
            let d = f16_at(block, 0);
            let (lo, hi) = out.split_at_mut(16);
            for (j, &q) in block[2..18].iter().enumerate() {
                lo[j] = d * (f32::from(q & 0x0F) - 8.0);
                hi[j] = d * (f32::from(q >> 4) - 8.0);
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(block, 0);
            let m = f16_at(block, 2);
            let (lo, hi) = out.split_at_mut(16);
            for (j, &q) in block[4..20].iter().enumerate() {
                lo[j] = d * f32::from(q & 0x0F) + m;
                hi[j] = d * f32::from(q >> 4) + m;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let d = f16_at(block, 0);
            let (m, rest) = if ty == GgmlType::Q5_1 {
                (f16_at(block, 2), &block[4..])
            } else {
                (-16.0 * d, &block[2..])
            };
            let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let qs = &rest[4..20];
            let (lo, hi) = out.split_at_mut(16);
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                lo[j] = d * ((u32::from(qs[j] & 0x0F) | h0) as f32) + m;
                hi[j] = d * ((u32::from(qs[j] >> 4) | h1) as f32) + m;
            }
        }
        GgmlType::Q2K => dequant_q2k(block, out),
        GgmlType::Q3K => dequant_q3k(block, out),
        GgmlType::Q4K | GgmlType::Q5K => dequant_q45k(ty == GgmlType::Q5K, block, out),
        GgmlType::Q6K => dequant_q6k(block, out),
        // Unreachable: `dequantize` rejects other types before calling this.
        _ => out.fill(f32::NAN),
    }
}

/// The `j`-th (scale, min) pair of the 12-byte 6-bit packing used by `Q4_K` and `Q5_K`: pairs
/// 0..4 are the low 6 bits of bytes `j` and `j + 4`; pairs 4..8 take their low 4 bits from byte
/// `j + 4` (scale: low nibble, min: high nibble) and their top 2 bits from the spare top bits
/// of bytes `j - 4` and `j`.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

fn dequant_q45k(five: bool, block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    let (qh, qs) = if five {
        (&block[16..48], &block[48..176])
    } else {
        (&block[0..0], &block[16..144])
    };
    // Four groups of 64 weights; each group's 32 bytes give 32 low-nibble weights (sub-block
    // 2g) then 32 high-nibble weights (sub-block 2g + 1); Q5_K's fifth bit of weight l in
    // sub-block s is bit s of qh[l].
    for g in 0..4 {
        let (s1, m1) = scale_min_k4(2 * g, scales);
        let (s2, m2) = scale_min_k4(2 * g + 1, scales);
        let q = &qs[32 * g..32 * g + 32];
        let o = &mut out[64 * g..64 * g + 64];
        for l in 0..32 {
            let (mut lo, mut hi) = (u32::from(q[l] & 0x0F), u32::from(q[l] >> 4));
            if five {
                lo |= u32::from((qh[l] >> (2 * g)) & 1) << 4;
                hi |= u32::from((qh[l] >> (2 * g + 1)) & 1) << 4;
            }
            o[l] = d * s1 * lo as f32 - dmin * m1;
            o[32 + l] = d * s2 * hi as f32 - dmin * m2;
        }
    }
}

fn dequant_q6k(block: &[u8], out: &mut [f32]) {
    let (ql, qh, sc) = (&block[0..128], &block[128..192], &block[192..208]);
    let d = f16_at(block, 208);
    // Two halves of 128 weights; in each, byte l of ql/qh feeds weights l, l+32, l+64, l+96.
    for h in 0..2 {
        let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
        let o = &mut out[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = |low: u8, shift: u32| -> f32 {
                f32::from(((low | (((qh[l] >> shift) & 3) << 4)) as i8) - 32)
            };
            o[l] = d * f32::from(sc[is] as i8) * q(ql[l] & 0x0F, 0);
            o[l + 32] = d * f32::from(sc[is + 2] as i8) * q(ql[l + 32] & 0x0F, 2);
            o[l + 64] = d * f32::from(sc[is + 4] as i8) * q(ql[l] >> 4, 4);
            o[l + 96] = d * f32::from(sc[is + 6] as i8) * q(ql[l + 32] >> 4, 6);
        }
    }
}

fn dequant_q2k(block: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&block[0..16], &block[16..80]);
    let d = f16_at(block, 80);
    let dmin = f16_at(block, 82);
    // Two halves of 128 weights, each from 32 bytes of 2-bit quants read at four shifts;
    // every 16 weights have their own (scale, min) byte.
    let mut idx = 0;
    for h in 0..2 {
        let q = &qs[32 * h..32 * h + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[idx];
                idx += 1;
                let (dl, ml) = (d * f32::from(sc & 0x0F), dmin * f32::from(sc >> 4));
                for l in 0..16 {
                    let v = (q[16 * half + l] >> shift) & 3;
                    out[128 * h + 32 * (shift as usize / 2) + 16 * half + l] =
                        dl * f32::from(v) - ml;
                }
            }
        }
    }
}

fn dequant_q3k(block: &[u8], out: &mut [f32]) {
    let (hmask, qs, packed) = (&block[0..32], &block[32..96], &block[96..108]);
    let d = f16_at(block, 108);
    // Sixteen 6-bit scales: low 4 bits from the nibbles of bytes 0..8, top 2 bits from the
    // 2-bit fields of bytes 8..12.
    let mut scales = [0i32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = i32::from(low | (high << 4)) - 32;
    }
    let mut idx = 0;
    let mut bit = 0;
    for h in 0..2 {
        let q = &qs[32 * h..32 * h + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d * scales[idx] as f32;
                idx += 1;
                for l in 0..16 {
                    let k = 16 * half + l;
                    let low = i32::from((q[k] >> shift) & 3);
                    let v = if hmask[k] & (1 << bit) != 0 {
                        low
                    } else {
                        low - 4
                    };
                    out[128 * h + 32 * (shift as usize / 2) + k] = dl * v as f32;
                }
            }
            bit += 1;
        }
    }
}

/// Whether [`dequantize`] supports `ty`.
pub fn is_dequantisable(ty: GgmlType) -> bool {
    !matches!(
        ty,
        GgmlType::Q8_1
            | GgmlType::Q8K
            | GgmlType::I8
            | GgmlType::I16
            | GgmlType::I32
            | GgmlType::I64
            | GgmlType::F64
    )
}

/// Dequantises `elements` values of type `ty` from `bytes`. Returns `None` when the type is
/// not supported or `bytes` does not hold exactly that many elements (the caller turns that
/// into an error naming the tensor).
pub fn dequantize(ty: GgmlType, bytes: &[u8], elements: usize) -> Option<Vec<f32>> {
    if !is_dequantisable(ty) || ty.bytes_for(elements as u64)? != bytes.len() as u64 {
        return None;
    }
    let bs = ty.block_size();
    let ts = ty.type_size();
    let mut out = vec![0.0f32; elements];
    out.par_chunks_mut(bs * BLOCKS_PER_TASK)
        .zip(bytes.par_chunks(ts * BLOCKS_PER_TASK))
        .for_each(|(o, b)| {
            for (ob, bb) in o.chunks_exact_mut(bs).zip(b.chunks_exact(ts)) {
                dequant_block(ty, bb, ob);
            }
        });
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_block_by_hand() {
        // d = 0.5, q = -16..16 (minus one): x = 0.5 * q.
        let mut block = h(0.5).to_vec();
        let qs: Vec<i8> = (-16..16).collect();
        block.extend(qs.iter().map(|&q| q as u8));
        let x = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
        for (i, v) in x.iter().enumerate() {
            assert_eq!(*v, 0.5 * (i as f32 - 16.0));
        }
    }

    #[test]
    fn q4_0_nibble_order_by_hand() {
        // Byte j = (hi << 4) | lo with lo = j, hi = 15 - j; d = 2.
        // Element j = 2 * (j - 8); element j + 16 = 2 * (15 - j - 8).
        let mut block = h(2.0).to_vec();
        block.extend((0u8..16).map(|j| ((15 - j) << 4) | j));
        let x = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(x[j], 2.0 * (j as f32 - 8.0), "low nibble {j}");
            assert_eq!(x[j + 16], 2.0 * (7.0 - j as f32), "high nibble {j}");
        }
    }

    #[test]
    fn q4_1_scale_and_min_by_hand() {
        // Two blocks with different d and m to check that blocks do not bleed.
        let mut bytes = Vec::new();
        for (d, m) in [(0.25f32, -1.0f32), (-3.0, 10.0)] {
            bytes.extend(h(d));
            bytes.extend(h(m));
            bytes.extend((0u8..16).map(|j| (j << 4) | (15 - j)));
        }
        let x = dequantize(GgmlType::Q4_1, &bytes, 64).unwrap();
        for (blk, (d, m)) in [(0.25f32, -1.0f32), (-3.0, 10.0)].into_iter().enumerate() {
            for j in 0..16 {
                assert_eq!(x[blk * 32 + j], d * (15 - j) as f32 + m);
                assert_eq!(x[blk * 32 + j + 16], d * j as f32 + m);
            }
        }
    }

    #[test]
    fn floats_round_trip() {
        let vals = [1.5f32, -0.0, 65504.0, 3.0e-5, -2.75];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &f32b, 5).unwrap(), vals);
        let f16b: Vec<u8> = vals.iter().flat_map(|&v| h(v)).collect();
        let back = dequantize(GgmlType::F16, &f16b, 5).unwrap();
        for (a, b) in back.iter().zip(vals) {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1e-4), "{a} vs {b}");
        }
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let back = dequantize(GgmlType::BF16, &bf, 5).unwrap();
        for (a, b) in back.iter().zip(vals) {
            assert!((a - b).abs() <= 8e-3 * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn many_blocks_split_across_tasks_stay_in_order() {
        // More than BLOCKS_PER_TASK blocks, each with a distinct scale: a misaligned chunking
        // would put a block's scale on another block's weights.
        let nblocks = BLOCKS_PER_TASK * 2 + 7;
        let mut bytes = Vec::with_capacity(nblocks * 34);
        for b in 0..nblocks {
            bytes.extend(h((b % 1000) as f32));
            bytes.extend((0..32).map(|i| (i as i8 - 3) as u8));
        }
        let x = dequantize(GgmlType::Q8_0, &bytes, nblocks * 32).unwrap();
        for b in [0, 1, BLOCKS_PER_TASK - 1, BLOCKS_PER_TASK, nblocks - 1] {
            for i in 0..32 {
                assert_eq!(x[b * 32 + i], (b % 1000) as f32 * (i as f32 - 3.0));
            }
        }
    }

    /// Blocks filled with a fixed byte pattern (finite f16 scales written over it), checked
    /// against the `gguf` Python package's dequantiser (gguf.quants.dequantize) on the same
    /// bytes: element sum, sum of squares, and values at chosen indices.
    #[test]
    fn q5_and_k_quants_match_the_reference_dequantiser() {
        type Expect = (GgmlType, f64, f64, &'static [(usize, f64)]);
        let cases: &[Expect] = &[
            (
                GgmlType::Q4K,
                4466.9100341796875,
                55689.61644434836,
                &[
                    (0, 0.9801826477050781),
                    (1, 0.5600929260253906),
                    (31, 1.2602424621582031),
                    (32, 0.4440727233886719),
                    (64, 2.972606658935547),
                    (100, 5.305088043212891),
                    (128, 5.465129852294922),
                    (255, 3.516704559326172),
                    (767, 21.61717987060547),
                ],
            ),
            (
                GgmlType::Q5K,
                9438.66455078125,
                208708.48542017117,
                &[
                    (0, 2.100421905517578),
                    (31, 2.380481719970703),
                    (32, 2.4244956970214844),
                    (100, 8.605792999267578),
                    (127, 15.207202911376953),
                    (128, 12.986736297607422),
                    (255, 9.818050384521484),
                    (767, 25.277061462402344),
                ],
            ),
            (
                GgmlType::Q6K,
                -1018.0997314453125,
                762690.0030244645,
                &[
                    (0, 20.25432586669922),
                    (1, -8.251762390136719),
                    (17, -9.351997375488281),
                    (63, -33.797218322753906),
                    (100, -16.023422241210938),
                    (200, -20.904464721679688),
                    (767, -26.248931884765625),
                ],
            ),
            (
                GgmlType::Q5_0,
                3.520172119140625,
                4.001779388869181,
                &[
                    (0, 0.09001922607421875),
                    (1, -0.09001922607421875),
                    (17, 0.15003204345703125),
                    (32, 0.3000640869140625),
                    (95, 0.389984130859375),
                ],
            ),
            (
                GgmlType::Q5_1,
                32.41851806640625,
                17.408715164405294,
                &[
                    (0, 0.18404006958007812),
                    (1, 0.2840614318847656),
                    (17, 0.12402725219726562),
                    (63, 0.1310272216796875),
                    (95, 0.5579757690429688),
                ],
            ),
            (
                GgmlType::Q2K,
                249.11354064941406,
                143.18613021273632,
                &[
                    (0, 0.33007049560546875),
                    (1, 0.11002349853515625),
                    (17, 0.10401535034179688),
                    (100, 0.006000518798828125),
                    (200, 0.4560966491699219),
                    (767, 0.4919891357421875),
                ],
            ),
            (
                GgmlType::Q3K,
                8.803939819335938,
                810.3513781126821,
                &[
                    (0, 0.8101730346679688),
                    (17, -0.11002349853515625),
                    (31, -0.33007049560546875),
                    (63, 0.5701217651367188),
                    (200, -0.440093994140625),
                    (255, -0.8701858520507812),
                    (767, 2.789886474609375),
                ],
            ),
        ];
        for &(ty, sum, sumsq, points) in cases {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let nblocks = 3;
            let mut bytes: Vec<u8> = (0..nblocks * ts)
                .map(|i| ((i * 131 + 7 * i * i + 11) % 256) as u8)
                .collect();
            for k in 0..nblocks {
                let b = &mut bytes[k * ts..(k + 1) * ts];
                let (d, m) = (h(0.01 * (k + 1) as f32), h(-0.003 * (k + 2) as f32));
                let at: &[(usize, [u8; 2])] = match ty {
                    GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q5_1 => &[(0, d), (2, m)],
                    GgmlType::Q6K => &[(208, d)],
                    GgmlType::Q5_0 => &[(0, d)],
                    GgmlType::Q2K => &[(80, d), (82, m)],
                    _ => &[(108, d)],
                };
                for &(o, v) in at {
                    b[o..o + 2].copy_from_slice(&v);
                }
            }
            let x = dequantize(ty, &bytes, nblocks * bs).unwrap();
            let s: f64 = x.iter().map(|&v| f64::from(v)).sum();
            let s2: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            assert!(
                (s - sum).abs() <= 1e-6 * sumsq.max(1.0),
                "{ty}: sum {s} vs {sum}"
            );
            assert!(
                (s2 - sumsq).abs() <= 1e-6 * sumsq,
                "{ty}: sum of squares {s2} vs {sumsq}"
            );
            for &(i, v) in points {
                assert!(
                    (f64::from(x[i]) - v).abs() <= 1e-6 * v.abs().max(1.0),
                    "{ty}[{i}]: {} vs {v}",
                    x[i]
                );
            }
        }
    }

    #[test]
    fn wrong_length_or_type_is_refused() {
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_none());
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31).is_none());
        assert!(dequantize(GgmlType::Q8K, &[0u8; 292], 256).is_none());
        assert!(dequantize(GgmlType::Q6K, &[0u8; 209], 256).is_none());
    }
}
