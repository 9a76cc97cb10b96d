//! Device buffers and the device-memory cap.
//!
//! Allocation is stream-ordered: cudarc allocates with `cuMemAllocAsync` on the [`Gpu`]'s stream
//! and frees with `cuMemFreeAsync`, from the device's default memory pool. [`Gpu::new`] raises
//! that pool's release threshold to "never", so freed blocks stay in the pool and the next
//! allocation of a similar size is a sub-microsecond pool hit instead of a `cudaMalloc`
//! (which synchronises the device).
//!
//! The cap (`--max-gpu-mem`, `BLR_MAX_GPU_MEM`) is enforced here, before the driver is asked:
//! every [`DeviceBuffer`] holds a [`Reservation`] of its size against one counter per [`Gpu`],
//! released when the buffer drops. So a model that does not fit a small GPU's budget (Jetson
//! Orin Nano: 8 GB shared with the CPU) fails with a message naming the buffer, instead of an
//! opaque `CUDA_ERROR_OUT_OF_MEMORY` at some later launch.
//!
//! [`Gpu`]: crate::Gpu
//! [`Gpu::new`]: crate::Gpu::new

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchArgs, PushKernelArg};

use crate::error::{Error, Result};

/// A byte count, printed in binary units (`8.00 GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.2} {}", UNITS[unit])
        }
    }
}

impl std::str::FromStr for Bytes {
    type Err = Error;

    /// Parses `8GiB`, `8G`, `8 gib` (binary, x1024), `8GB` (decimal, x1000), `512MiB`,
    /// `1.5G`, or a plain byte count.
    fn from_str(text: &str) -> Result<Self> {
        let invalid = || Error::InvalidSize {
            text: text.to_string(),
        };
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: f64 = number.parse().map_err(|_| invalid())?;
        let unit = unit.trim().to_ascii_lowercase();
        let scale: f64 = match unit.as_str() {
            "" | "b" => 1.0,
            "k" | "kib" => 1024.0,
            "m" | "mib" => 1024.0f64.powi(2),
            "g" | "gib" => 1024.0f64.powi(3),
            "t" | "tib" => 1024.0f64.powi(4),
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            _ => return Err(invalid()),
        };
        let bytes = number * scale;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(invalid());
        }
        Ok(Bytes(bytes.round() as u64))
    }
}

/// Counts the device bytes held by one [`Gpu`](crate::Gpu)'s buffers against an optional cap.
#[derive(Debug)]
pub struct MemTracker {
    cap: AtomicU64,
    in_use: AtomicU64,
    peak: AtomicU64,
}

/// Snapshot of a [`MemTracker`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemUsage {
    pub in_use: Bytes,
    pub peak: Bytes,
    /// `None`: no cap beyond the device itself.
    pub cap: Option<Bytes>,
}

impl MemTracker {
    pub fn new(cap: Option<Bytes>) -> Arc<Self> {
        Arc::new(Self {
            cap: AtomicU64::new(cap.map_or(u64::MAX, |c| c.0)),
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    pub fn set_cap(&self, cap: Option<Bytes>) {
        self.cap
            .store(cap.map_or(u64::MAX, |c| c.0), Ordering::SeqCst);
    }

    pub fn usage(&self) -> MemUsage {
        let cap = self.cap.load(Ordering::SeqCst);
        MemUsage {
            in_use: Bytes(self.in_use.load(Ordering::SeqCst)),
            peak: Bytes(self.peak.load(Ordering::SeqCst)),
            cap: (cap != u64::MAX).then_some(Bytes(cap)),
        }
    }

    /// Reserves `bytes` for `what`, or fails with [`Error::MemoryCap`] if that would pass the cap.
    pub fn reserve(self: &Arc<Self>, bytes: u64, what: &str) -> Result<Reservation> {
        let cap = self.cap.load(Ordering::SeqCst);
        let mut current = self.in_use.load(Ordering::SeqCst);
        loop {
            let would_be = current.saturating_add(bytes);
            if would_be > cap {
                return Err(Error::MemoryCap {
                    what: what.to_string(),
                    requested: Bytes(bytes),
                    in_use: Bytes(current),
                    would_be: Bytes(would_be),
                    cap: Bytes(cap),
                });
            }
            match self.in_use.compare_exchange_weak(
                current,
                would_be,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(would_be, Ordering::SeqCst);
                    return Ok(Reservation {
                        tracker: Arc::clone(self),
                        bytes,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// Bytes counted against the cap until dropped.
#[derive(Debug)]
pub struct Reservation {
    tracker: Arc<MemTracker>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.tracker.in_use.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Element types a [`DeviceBuffer`] may hold: plain numbers for which every bit pattern is a
/// valid value, so uninitialised or poisoned device memory can be copied back safely.
pub trait Element: DeviceRepr + Copy + Default + Send + Sync + 'static {}
impl Element for f32 {}
impl Element for f64 {}
impl Element for half::bf16 {}
impl Element for half::f16 {}
impl Element for i8 {}
impl Element for u8 {}
impl Element for i16 {}
impl Element for u16 {}
impl Element for i32 {}
impl Element for u32 {}
impl Element for i64 {}
impl Element for u64 {}

/// A device allocation of `len` elements of `T`, counted against the [`Gpu`](crate::Gpu)'s cap.
///
/// Create with [`Gpu::alloc`](crate::Gpu::alloc), [`Gpu::upload`](crate::Gpu::upload) or
/// [`Gpu::upload_bf16`](crate::Gpu::upload_bf16). Pass to a kernel with
/// [`Launch::arg`](crate::Launch::arg) (`&buf` for input, `&mut buf` for output).
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    pub(crate) slice: CudaSlice<T>,
    // Dropped after `slice` (field order), so the bytes are counted until the free is queued.
    pub(crate) _reservation: Reservation,
}

impl<T> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    pub fn num_bytes(&self) -> usize {
        self.slice.num_bytes()
    }

    /// The cudarc slice, for APIs this crate does not wrap.
    pub fn as_slice(&self) -> &CudaSlice<T> {
        &self.slice
    }

    pub fn as_slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }

    /// Raw device address of element `offset`, for passing a sub-range to a kernel as a
    /// pointer argument (`launch.arg(&ptr)` with `ptr: u64`). Fails if `offset > len`.
    pub fn device_ptr_at(&self, offset: usize) -> Result<u64> {
        if offset > self.len() {
            return Err(Error::Shape(format!(
                "element offset {offset} is past the end of a buffer of {} elements",
                self.len()
            )));
        }
        Ok(self.device_ptr() + (offset * std::mem::size_of::<T>()) as u64)
    }

    /// Raw device address of element 0 (for pointer arithmetic in GEMM batches). Valid while
    /// `self` lives. Event tracking is off on blr's contexts, so this records no event.
    pub fn device_ptr(&self) -> u64 {
        let stream = self.slice.stream().clone();
        let (ptr, _sync) = self.slice.device_ptr(&stream);
        ptr
    }
}

// Kernel arguments: `launch.arg(&buf)` passes the device pointer. Shared (`&`) for inputs and
// exclusive (`&mut`) for outputs, so the borrow checker sees which buffers a launch writes.
//
// SAFETY: forwards to cudarc's impls for `&CudaSlice<T>`, which push a pointer to the
// `CUdeviceptr` field; that field lives as long as the borrow `'b`, which outlives the launch.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b DeviceBuffer<T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b DeviceBuffer<T>) -> &mut Self {
        self.arg(&arg.slice)
    }
}

// SAFETY: as above, for `&mut CudaSlice<T>`.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut DeviceBuffer<T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut DeviceBuffer<T>) -> &mut Self {
        self.arg(&mut arg.slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        let p = |s: &str| s.parse::<Bytes>().map(|b| b.0).ok();
        assert_eq!(p("8GiB"), Some(8 << 30));
        assert_eq!(p("8G"), Some(8 << 30));
        assert_eq!(p(" 8 gib "), Some(8 << 30));
        assert_eq!(p("8GB"), Some(8_000_000_000));
        assert_eq!(p("512MiB"), Some(512 << 20));
        assert_eq!(p("1.5G"), Some(3 << 29));
        assert_eq!(p("1073741825"), Some(1_073_741_825));
        assert_eq!(p("12xb"), None);
        assert_eq!(p("GiB"), None);
        assert_eq!(p("-1G"), None);
        assert_eq!(p(""), None);
    }

    #[test]
    fn displays_binary_units() {
        assert_eq!(Bytes(8 << 30).to_string(), "8.00 GiB");
        assert_eq!(Bytes(1023).to_string(), "1023 B");
        assert_eq!(Bytes(1536).to_string(), "1.50 KiB");
    }

    #[test]
    fn cap_is_enforced_and_released() {
        let t = MemTracker::new(Some(Bytes(1000)));
        let a = t.reserve(600, "a").ok();
        assert!(a.is_some());
        let err = t.reserve(401, "the KV cache").err().map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(
            msg.contains("the KV cache") && msg.contains("--max-gpu-mem"),
            "{msg}"
        );
        assert!(t.reserve(400, "b").is_ok()); // dropped at once
        drop(a);
        assert_eq!(t.usage().in_use, Bytes(0));
        assert_eq!(t.usage().peak, Bytes(1000));
        assert!(t.reserve(1000, "c").is_ok());
    }
}
