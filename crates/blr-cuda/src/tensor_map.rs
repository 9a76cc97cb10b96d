//! Tensor maps for the tensor memory accelerator (TMA, `cp.async.bulk.tensor`, sm_90+): a
//! 128-byte description of a strided bf16 view in device memory and of the box one copy moves,
//! built on the host with `cuTensorMapEncodeTiled` and passed to a kernel by value (a
//! `const __grid_constant__` parameter of the same 128 bytes, see monarch.cu `blr_tmap`).
//!
//! A map embeds the view's base address: it is valid only while that buffer lives at that
//! address, and must be rebuilt when the pointer or a dimension changes (callers cache maps per
//! pointer and shape, e.g. Monarch `partial`'s stage 1 in layers/monarch.rs).
//!
//! Views the copy engine cannot describe (base not 16-byte aligned, a stride that is not a
//! multiple of 16 bytes, a box too large for the swizzle) are reported by [`check_tiled_bf16`]
//! as a sentence, so that callers pick a kernel without TMA instead of failing.

use cudarc::driver::{sys, DeviceRepr};

/// A `CUtensorMap`, passed to a kernel by value with [`crate::Launch::arg`].
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorMap(sys::CUtensorMap);

// SAFETY: a plain 128-byte C struct (64-byte aligned or more), which the driver copies into the
// kernel's parameter space; the kernel side declares the same size (monarch.cu `blr_tmap`).
unsafe impl DeviceRepr for TensorMap {}

/// A bf16 view for the copy engine, innermost dimension first (as the driver takes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TiledBf16 {
    /// Device address of element (0, 0, ...).
    pub addr: u64,
    /// Elements per dimension, innermost first (dimension 0 is contiguous).
    pub dims: Vec<u64>,
    /// Byte strides of dimensions 1.. (one fewer than `dims`).
    pub strides: Vec<u64>,
    /// Elements per dimension of one copy's box; the box lands in shared memory as rows of
    /// `boxes[0]` elements, dimension 1 next, and so on.
    pub boxes: Vec<u32>,
}

/// Bytes one row of a 128-byte-swizzled box may span.
const SWIZZLE_128B_SPAN: u64 = 128;

/// Why the copy engine cannot move `v` with the 128-byte swizzle (a sentence), or None.
pub(crate) fn check_tiled_bf16(v: &TiledBf16) -> Option<String> {
    let rank = v.dims.len();
    if !(1..=5).contains(&rank) || v.strides.len() + 1 != rank || v.boxes.len() != rank {
        return Some(format!(
            "tensor map of rank {rank} with {} strides and {} box sizes (rank 1..=5, one \
             stride fewer than dimensions, one box size per dimension)",
            v.strides.len(),
            v.boxes.len()
        ));
    }
    if !v.addr.is_multiple_of(16) {
        return Some(format!("base address {:#x} is not 16-byte aligned", v.addr));
    }
    if let Some((i, d)) = v
        .dims
        .iter()
        .enumerate()
        .find(|(_, &d)| d == 0 || d > 1u64 << 32)
    {
        return Some(format!("dimension {i} has {d} elements (1..=2^32)"));
    }
    if let Some((i, s)) = v
        .strides
        .iter()
        .enumerate()
        .find(|(_, &s)| !s.is_multiple_of(16) || s >= 1u64 << 40)
    {
        return Some(format!(
            "stride {} of {s} bytes is not a multiple of 16 below 2^40",
            i + 1
        ));
    }
    if let Some((i, b)) = v.boxes.iter().enumerate().find(|(_, &b)| b == 0 || b > 256) {
        return Some(format!("box size {b} in dimension {i} (1..=256)"));
    }
    if u64::from(v.boxes[0]) * 2 > SWIZZLE_128B_SPAN {
        return Some(format!(
            "box rows of {} bf16 exceed the 128-byte swizzle span",
            v.boxes[0]
        ));
    }
    None
}

/// Encodes `v` (bf16, 128-byte swizzle, out-of-bounds elements read as zero, L2 promotion of
/// 256 bytes). `Err` carries the reason (from [`check_tiled_bf16`] or the driver's refusal).
pub(crate) fn encode_tiled_bf16(v: &TiledBf16) -> std::result::Result<TensorMap, String> {
    if let Some(why) = check_tiled_bf16(v) {
        return Err(why);
    }
    let elem_strides = vec![1u32; v.dims.len()];
    let rank = u32::try_from(v.dims.len()).map_err(|_| "tensor map rank".to_string())?;
    let mut map = TensorMap(sys::CUtensorMap { opaque: [0; 16] });
    // SAFETY: `map` is a writable, suitably aligned CUtensorMap; the dimension, stride, box and
    // element-stride arrays hold `rank`, `rank - 1`, `rank` and `rank` entries (checked above)
    // and outlive the call. The call only writes the map (no device access).
    let res = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map.0,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            rank,
            v.addr as *mut std::ffi::c_void,
            v.dims.as_ptr(),
            v.strides.as_ptr(),
            v.boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    match res {
        sys::CUresult::CUDA_SUCCESS => Ok(map),
        err => Err(format!("cuTensorMapEncodeTiled refused the view: {err:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> TiledBf16 {
        TiledBf16 {
            addr: 0x7f00_0000_0000,
            dims: vec![256, 16, 1000],
            strides: vec![512, 8192],
            boxes: vec![64, 1, 128],
        }
    }

    #[test]
    fn tiled_view_requirements() {
        assert_eq!(check_tiled_bf16(&view()), None);
        let unaligned = TiledBf16 {
            addr: 0x7f00_0000_0008,
            ..view()
        };
        assert!(check_tiled_bf16(&unaligned)
            .unwrap()
            .contains("16-byte aligned"));
        let odd_stride = TiledBf16 {
            strides: vec![520 - 2, 8192],
            ..view()
        };
        assert!(check_tiled_bf16(&odd_stride)
            .unwrap()
            .contains("multiple of 16"));
        let wide_box = TiledBf16 {
            boxes: vec![128, 1, 128],
            ..view()
        };
        assert!(check_tiled_bf16(&wide_box).unwrap().contains("swizzle"));
        let tall_box = TiledBf16 {
            boxes: vec![64, 1, 512],
            ..view()
        };
        assert!(check_tiled_bf16(&tall_box).unwrap().contains("box size"));
        let ranks = TiledBf16 {
            strides: vec![512],
            ..view()
        };
        assert!(check_tiled_bf16(&ranks).unwrap().contains("rank"));
        let empty = TiledBf16 {
            dims: vec![256, 0, 1000],
            ..view()
        };
        assert!(check_tiled_bf16(&empty).unwrap().contains("dimension 1"));
    }
}
