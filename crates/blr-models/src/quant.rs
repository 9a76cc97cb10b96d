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
//! F16 and BF16 are one element per "block". The other ggml types (k-quants, Q5) are listed
//! with their sizes so that a file containing them can still be validated and its supported
//! tensors read; asking to dequantise one of them is a clear error.

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
pub const DEQUANTISABLE: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

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
        // Unreachable: `dequantize` rejects other types before calling this.
        _ => out.fill(f32::NAN),
    }
}

/// Whether [`dequantize`] supports `ty`.
pub fn is_dequantisable(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
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

    #[test]
    fn wrong_length_or_type_is_refused() {
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_none());
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31).is_none());
        assert!(dequantize(GgmlType::Q6K, &[0u8; 210], 256).is_none());
    }
}
