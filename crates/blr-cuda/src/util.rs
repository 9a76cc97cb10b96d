//! Launchers for `util.cu`: device-side random fill, the bandwidth copy kernel and `axpy`.
//! Also the example to follow for a kernel launcher: one `.cu` next to one `.rs`, the kernels
//! loaded once into a struct, one safe method per kernel that checks buffer lengths before the
//! `unsafe` launch.

use cudarc::driver::LaunchConfig;
use half::bf16;

use crate::compile::{CompileOptions, KernelSource};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::memory::{DeviceBuffer, Element};

/// The source of `util.cu`.
pub const UTIL_CU: KernelSource = crate::kernel_source!("util.cu");

/// Threads per block for the grid-stride kernels: 256 keeps 8 blocks resident per SM on every
/// supported arch (2048 threads/SM on sm_80/90, 1536 on sm_86/89 -> 6).
const BLOCK: u32 = 256;

/// The loaded `util.cu` kernels.
#[derive(Debug, Clone)]
pub struct UtilKernels {
    /// Blocks of `BLOCK` threads resident at once on the device (same for every util kernel
    /// at its register count; read once at load so a launch costs no occupancy query).
    resident: u32,
    fill_bf16: Kernel,
    fill_f32: Kernel,
    copy: Kernel,
    axpy: Kernel,
    coop: Kernel,
}

impl UtilKernels {
    /// Compiles (or loads from cache) `util.cu` for this device.
    pub fn load(gpu: &Gpu) -> Result<Self> {
        let module = gpu.load_module(&UTIL_CU, &CompileOptions::default())?;
        let copy = module.function("copy_vec16")?;
        // copy_vec16 uses the most registers of the grid-stride kernels: its residency bounds
        // the others'.
        let resident = gpu.persistent_grid(&copy, BLOCK, 0)?;
        Ok(Self {
            resident,
            fill_bf16: module.function("fill_uniform_bf16")?,
            fill_f32: module.function("fill_uniform_f32")?,
            copy,
            axpy: module.function("axpy_f32")?,
            coop: module.function("coop_neighbour")?,
        })
    }

    fn grid(&self, n: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (self.resident.min(Gpu::grid_1d(n, BLOCK)), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// Fills `buf` with uniform values in `[-scale, scale)`, element `i` a function of
    /// `(seed, i)` only ([`uniform_at`] gives the same value on the host).
    pub fn fill_uniform_bf16(
        &self,
        gpu: &Gpu,
        buf: &mut DeviceBuffer<bf16>,
        seed: u64,
        scale: f32,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len() as u64;
        let cfg = self.grid(buf.len())?;
        // SAFETY: fill_uniform_bf16(bf16* out, u64 n, u64 seed, float scale) writes out[0..n),
        // and `buf` holds n elements.
        unsafe {
            gpu.launch(&self.fill_bf16)
                .arg(buf)
                .arg(&n)
                .arg(&seed)
                .arg(&scale)
                .launch(cfg)
        }
    }

    /// f32 version of [`UtilKernels::fill_uniform_bf16`].
    pub fn fill_uniform_f32(
        &self,
        gpu: &Gpu,
        buf: &mut DeviceBuffer<f32>,
        seed: u64,
        scale: f32,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len() as u64;
        let cfg = self.grid(buf.len())?;
        // SAFETY: fill_uniform_f32(float* out, u64 n, u64 seed, float scale) writes out[0..n).
        unsafe {
            gpu.launch(&self.fill_f32)
                .arg(buf)
                .arg(&n)
                .arg(&seed)
                .arg(&scale)
                .launch(cfg)
        }
    }

    /// Copies `src` into `dst` with 16-byte vector loads/stores. Both must have the same size in
    /// bytes, a multiple of 16 (allocations themselves are 256-byte aligned).
    pub fn copy_vec16<T: Element>(
        &self,
        gpu: &Gpu,
        src: &DeviceBuffer<T>,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let bytes = src.num_bytes();
        if bytes != dst.num_bytes() || !bytes.is_multiple_of(16) {
            return Err(Error::Shape(format!(
                "copy_vec16 needs equal sizes that are multiples of 16 bytes, got {bytes} and {}",
                dst.num_bytes()
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        let n16 = (bytes / 16) as u64;
        let cfg = self.grid(bytes / 16)?;
        // SAFETY: copy_vec16(const uint4* src, uint4* dst, u64 n16) touches n16 16-byte vectors
        // of each; both buffers hold exactly that many bytes (checked above).
        unsafe {
            gpu.launch(&self.copy)
                .arg(src)
                .arg(dst)
                .arg(&n16)
                .launch(cfg)
        }
    }

    /// `y += alpha * x` elementwise.
    pub fn axpy(
        &self,
        gpu: &Gpu,
        y: &mut DeviceBuffer<f32>,
        x: &DeviceBuffer<f32>,
        alpha: f32,
    ) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::Shape(format!(
                "axpy of x with {} elements into y with {}",
                x.len(),
                y.len()
            )));
        }
        if y.is_empty() {
            return Ok(());
        }
        let n = y.len() as u64;
        let cfg = self.grid(y.len())?;
        // SAFETY: axpy_f32(float* y, const float* x, float alpha, u64 n) touches [0, n) of
        // both; both hold n elements (checked above).
        unsafe {
            gpu.launch(&self.axpy)
                .arg(y)
                .arg(x)
                .arg(&alpha)
                .arg(&n)
                .launch(cfg)
        }
    }
}

impl UtilKernels {
    /// Runs `coop_neighbour` cooperatively on `blocks` blocks (a grid-wide barrier) and returns
    /// what each block read from its neighbour: block `b` must see `((b + 1) % blocks) * 3 + 1`.
    pub fn coop_neighbour(&self, gpu: &Gpu, blocks: u32) -> Result<Vec<u32>> {
        let n = blocks as usize;
        let mut published = gpu.alloc_zeros::<u32>(n, "coop published")?;
        let mut out = gpu.alloc::<u32>(n, "coop out")?;
        gpu.memset_bytes(&mut out, 0xFF)?;
        let mut barrier = gpu.alloc_zeros::<u32>(1, "coop barrier")?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: coop_neighbour(u32* published, u32* out, u32* barrier) touches
        // published/out[0..gridDim.x) and barrier[0]; buffers hold n, n and 1 elements.
        unsafe {
            gpu.launch(&self.coop)
                .arg(&mut published)
                .arg(&mut out)
                .arg(&mut barrier)
                .launch_cooperative(cfg)?;
        }
        gpu.download(&out)
    }

    /// The `coop_neighbour` kernel, for tests of the cooperative-launch checks.
    pub fn coop_kernel(&self) -> &Kernel {
        &self.coop
    }
}

/// Host mirror of `util.cu`'s random fill: the value element `i` gets for `seed` and `scale`.
pub fn uniform_at(seed: u64, i: u64, scale: f32) -> f32 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let unit = (z >> 40) as f32 * (1.0 / 16_777_216.0);
    scale * (2.0 * unit - 1.0)
}

/// `n` host values of [`uniform_at`].
pub fn uniform_vec(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64).map(|i| uniform_at(seed, i, scale)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_in_range_and_spread() {
        let v = uniform_vec(42, 10_007, 0.5);
        assert!(v.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!(v.iter().filter(|&&x| x == 0.0).count() < 3);
        assert_ne!(uniform_vec(43, 16, 0.5), uniform_vec(42, 16, 0.5));
    }
}
