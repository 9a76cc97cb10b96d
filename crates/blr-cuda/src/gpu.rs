//! [`Gpu`]: one device, one CUDA context, one stream. Everything this crate does goes through it.
//!
//! One stream on purpose: all of blr's work on a device is a single dependency chain (layer after
//! layer), and one stream makes every operation ordered without events, lets a whole decode step
//! be captured as one CUDA graph, and makes stream-ordered frees safe to reuse at once.
//! cudarc's per-buffer event tracking (which exists to order buffers across streams) is turned
//! off before the stream is created: it adds two events per buffer and it breaks stream capture
//! (`CUDA_ERROR_STREAM_CAPTURE_ISOLATION`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute as Attr};
use cudarc::driver::{
    result as drv, CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtrMut, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use half::bf16;

use crate::compile::{fnv1a_128, Arch, CompileOptions, KernelCache, KernelSource};
use crate::error::{Error, Result};
use crate::gemm::Blas;
use crate::libs;
use crate::memory::{Bytes, DeviceBuffer, Element, MemTracker, MemUsage};

/// How to open a device.
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// CUDA device ordinal (as `CUDA_VISIBLE_DEVICES` numbers them).
    pub ordinal: usize,
    /// Cap on the bytes blr allocates on the device; `None` = `BLR_MAX_GPU_MEM` or no cap.
    pub max_mem: Option<Bytes>,
    /// Where compiled kernels are cached.
    pub kernel_cache: KernelCache,
    /// Synchronise and check for faults after every launch (`BLR_CUDA_SYNC=1`): slow, but a
    /// fault names the kernel that caused it.
    pub sync_after_launch: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            ordinal: 0,
            max_mem: None,
            kernel_cache: KernelCache::from_env(),
            sync_after_launch: std::env::var_os("BLR_CUDA_SYNC").is_some_and(|v| v != "0"),
        }
    }
}

/// Static facts about a device, read once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (u32, u32),
    /// What NVRTC compiles for on this device (`sm_90a` on Hopper).
    pub arch: String,
    pub sm_count: u32,
    pub total_mem: Bytes,
    pub l2_cache: Bytes,
    /// Shared memory one block may use after opting in (`cuFuncSetAttribute`); 227 KiB on H100.
    pub max_smem_per_block_optin: Bytes,
    pub max_smem_per_sm: Bytes,
    pub max_threads_per_sm: u32,
    pub regs_per_sm: u32,
    pub sm_clock_mhz: u32,
    pub mem_clock_mhz: u32,
    pub mem_bus_bits: u32,
    /// `2 * mem clock * bus width`: the datasheet DRAM bandwidth, for comparison with the
    /// measured one. Zero where the driver reports no memory clock.
    pub theoretical_mem_bw_gbs: f64,
    /// e.g. `13000` for CUDA 13.0.
    pub driver_cuda_version: i32,
}

impl DeviceInfo {
    fn query(ctx: &Arc<CudaContext>) -> Result<Self> {
        let attr = |a: Attr| -> Result<u32> {
            ctx.attribute(a)
                .map(|v| u32::try_from(v).unwrap_or(0))
                .map_err(Error::driver(format!("reading device attribute {a:?}")))
        };
        let (major, minor) = (
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let mem_clock_khz = attr(Attr::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?;
        let bus = attr(Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?;
        let mut driver_version = 0;
        // SAFETY: driver loaded (a context exists); out-pointer valid.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(Error::driver("reading the driver version"))?;
        Ok(Self {
            ordinal: ctx.ordinal(),
            name: ctx
                .name()
                .map_err(Error::driver("reading the device name"))?,
            compute_capability: (major, minor),
            arch: Arch::new(major, minor).sm_name(),
            sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            total_mem: Bytes(
                ctx.total_mem()
                    .map_err(Error::driver("reading total memory"))? as u64,
            ),
            l2_cache: Bytes(u64::from(attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?)),
            max_smem_per_block_optin: Bytes(u64::from(attr(
                Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?)),
            max_smem_per_sm: Bytes(u64::from(attr(
                Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )?)),
            max_threads_per_sm: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)?,
            regs_per_sm: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR)?,
            sm_clock_mhz: attr(Attr::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)? / 1000,
            mem_clock_mhz: mem_clock_khz / 1000,
            mem_bus_bits: bus,
            theoretical_mem_bw_gbs: 2.0 * f64::from(mem_clock_khz) * 1e3 * f64::from(bus)
                / 8.0
                / 1e9,
            driver_cuda_version: driver_version,
        })
    }

    /// The arch kernels are compiled for.
    pub fn nvrtc_arch(&self) -> Arch {
        Arch::new(self.compute_capability.0, self.compute_capability.1)
    }
}

/// One CUDA device opened for blr: context, stream, memory cap, kernel and GEMM-plan caches.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    mem: Arc<MemTracker>,
    kernel_cache: KernelCache,
    modules: Mutex<HashMap<u128, Module>>,
    blas: OnceLock<Blas>,
    sync_after_launch: bool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

/// Number of CUDA devices, or the reason there are none usable. Never panics.
pub fn device_count() -> Result<usize> {
    libs::ensure_driver()?;
    let n = CudaContext::device_count().map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_DEVICE => Error::NoDevice,
        _ => Error::Driver {
            during: "initialising the driver (cuInit) and counting devices".into(),
            source: e,
        },
    })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

impl Gpu {
    /// Opens device `opts.ordinal`. Fails cleanly (never panics) when there is no driver, no
    /// device, or the device is older than sm_80.
    pub fn new(opts: GpuOptions) -> Result<Self> {
        let count = device_count()?;
        if count == 0 {
            return Err(Error::NoDevice);
        }
        if opts.ordinal >= count {
            return Err(Error::DeviceOutOfRange {
                ordinal: opts.ordinal,
                count,
            });
        }
        let ctx = CudaContext::new(opts.ordinal).map_err(Error::driver(format!(
            "creating a context on device {}",
            opts.ordinal
        )))?;
        // SAFETY: no stream or buffer of this context exists yet (see module docs).
        unsafe { ctx.disable_event_tracking() };
        let info = DeviceInfo::query(&ctx)?;
        if info.compute_capability.0 < 8 {
            return Err(Error::UnsupportedDevice {
                name: info.name,
                major: info.compute_capability.0 as i32,
                minor: info.compute_capability.1 as i32,
            });
        }
        let stream = ctx
            .new_stream()
            .map_err(Error::driver("creating the stream"))?;
        keep_freed_memory_in_pool(&ctx)?;
        let cap = match opts.max_mem {
            Some(cap) => Some(cap),
            None => match std::env::var("BLR_MAX_GPU_MEM") {
                Ok(text) => Some(text.parse::<Bytes>()?),
                Err(_) => None,
            },
        };
        Ok(Self {
            ctx,
            stream,
            info,
            mem: MemTracker::new(cap),
            kernel_cache: opts.kernel_cache,
            modules: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            sync_after_launch: opts.sync_after_launch,
        })
    }

    /// Device 0 with default options.
    pub fn open_default() -> Result<Self> {
        Self::new(GpuOptions::default())
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn kernel_cache(&self) -> &KernelCache {
        &self.kernel_cache
    }

    /// Bytes held by this Gpu's buffers, their peak, and the cap.
    pub fn mem_usage(&self) -> MemUsage {
        self.mem.usage()
    }

    /// Changes the cap; buffers already allocated are kept even if now over it.
    pub fn set_mem_cap(&self, cap: Option<Bytes>) {
        self.mem.set_cap(cap);
    }

    /// Free and total device memory as the driver sees it (all processes).
    pub fn device_mem_info(&self) -> Result<(Bytes, Bytes)> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(Error::driver("reading free device memory"))?;
        Ok((Bytes(free as u64), Bytes(total as u64)))
    }

    /// Waits for all work queued on the stream; surfaces any asynchronous fault.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(Error::driver("synchronising the stream"))
    }

    // ---------------------------------------------------------------- memory

    /// Allocates `len` elements. The contents are unspecified (whatever the pool block held):
    /// use [`Gpu::alloc_zeros`], or write every element before reading.
    pub fn alloc<T: Element>(&self, len: usize, what: &str) -> Result<DeviceBuffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Shape(format!("{what}: {len} elements overflow usize bytes")))?;
        let reservation = self.mem.reserve(bytes as u64, what)?;
        // SAFETY: `T: Element` is plain data valid for any bit pattern, so unset memory is a
        // valid (if meaningless) value.
        let slice = unsafe { self.stream.alloc::<T>(len) }.map_err(|e| Error::Driver {
            during: format!("allocating {} for {what}", Bytes(bytes as u64)),
            source: e,
        })?;
        Ok(DeviceBuffer {
            slice,
            _reservation: reservation,
        })
    }

    /// Allocates `len` zeroed elements.
    pub fn alloc_zeros<T: Element>(&self, len: usize, what: &str) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc::<T>(len, what)?;
        self.memset_bytes(&mut buf, 0)?;
        Ok(buf)
    }

    /// Sets every byte of `buf` to `byte`. `0xFF` poisons bf16/f32 outputs with NaN, so a test
    /// can check that a kernel wrote every element.
    pub fn memset_bytes<T: Element>(&self, buf: &mut DeviceBuffer<T>, byte: u8) -> Result<()> {
        let num_bytes = buf.num_bytes();
        let (ptr, _sync) = buf.slice.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` is a live allocation of `num_bytes` bytes on this stream's context.
        unsafe { drv::memset_d8_async(ptr, byte, num_bytes, self.stream.cu_stream()) }
            .map_err(Error::driver("memset"))
    }

    /// Copies `host` into a new device buffer.
    pub fn upload<T: Element>(&self, host: &[T], what: &str) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc::<T>(host.len(), what)?;
        self.copy_to_device(host, &mut buf)?;
        Ok(buf)
    }

    /// Converts `host` to bf16 (round to nearest even) and uploads it.
    pub fn upload_bf16(&self, host: &[f32], what: &str) -> Result<DeviceBuffer<bf16>> {
        let converted: Vec<bf16> = host.iter().map(|&v| bf16::from_f32(v)).collect();
        self.upload(&converted, what)
    }

    /// Copies `host` into the first `host.len()` elements of `buf`.
    pub fn copy_to_device<T: Element>(&self, host: &[T], buf: &mut DeviceBuffer<T>) -> Result<()> {
        if host.len() > buf.len() {
            return Err(Error::Shape(format!(
                "host-to-device copy of {} elements into a buffer of {}",
                host.len(),
                buf.len()
            )));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, &mut buf.slice)
            .map_err(Error::driver("copying host to device"))
    }

    /// Copies `buf` to a new host vector (waits for the stream).
    pub fn download<T: Element>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>> {
        let mut host = vec![T::default(); buf.len()];
        if !host.is_empty() {
            self.stream
                .memcpy_dtoh(&buf.slice, &mut host)
                .map_err(Error::driver("copying device to host"))?;
        }
        self.synchronize()?;
        Ok(host)
    }

    /// Downloads a bf16 buffer as f32.
    pub fn download_f32(&self, buf: &DeviceBuffer<bf16>) -> Result<Vec<f32>> {
        Ok(self.download(buf)?.into_iter().map(bf16::to_f32).collect())
    }

    /// Copies the first `len` elements of `buf` to the host (waits for the stream). Buffers
    /// are often larger than what they hold (a pool block kept for reuse, a one-element stand-in
    /// for an empty tensor): copying only the written part keeps unwritten bytes off the bus,
    /// and out of compute-sanitizer initcheck's reports.
    pub fn download_prefix<T: Element>(&self, buf: &DeviceBuffer<T>, len: usize) -> Result<Vec<T>> {
        if len > buf.len() {
            return Err(Error::Shape(format!(
                "download of {len} elements from a buffer of {}",
                buf.len()
            )));
        }
        let mut host = vec![T::default(); len];
        if len > 0 {
            let view = buf.slice.slice(0..len);
            self.stream
                .memcpy_dtoh(&view, &mut host)
                .map_err(Error::driver("copying device to host"))?;
        }
        self.synchronize()?;
        Ok(host)
    }

    /// Device-to-device copy of all of `src` into the start of `dst`.
    pub fn copy_device<T: Element>(
        &self,
        src: &DeviceBuffer<T>,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        if src.len() > dst.len() {
            return Err(Error::Shape(format!(
                "device copy of {} elements into a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        self.stream
            .memcpy_dtod(&src.slice, &mut dst.slice)
            .map_err(Error::driver("copying device to device"))
    }

    // ---------------------------------------------------------------- kernels

    /// Compiles (or loads from the disk cache) `src` for this device's arch and loads it.
    /// Loaded modules are also kept in memory: a second call with the same source and options
    /// returns at once.
    pub fn load_module(&self, src: &KernelSource, opts: &CompileOptions) -> Result<Module> {
        let key = fnv1a_128(format!("{}\0{}\0{:?}", src.name, src.code, opts.extra).as_bytes());
        if let Some(m) = self.modules.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(m);
        }
        let cubin = self
            .kernel_cache
            .compile(src, self.info.nvrtc_arch(), opts)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.image))
            .map_err(|e| Error::Driver {
                during: format!("loading the cubin of {} for {}", src.name, self.info.arch),
                source: e,
            })?;
        let module = Module {
            name: src.name.to_string(),
            inner: module,
            from_cache: cubin.from_cache,
            compile_ms: cubin.millis,
        };
        if let Ok(mut m) = self.modules.lock() {
            m.insert(key, module.clone());
        }
        Ok(module)
    }

    /// Starts a launch of `kernel` on this Gpu's stream: push arguments with
    /// [`Launch::arg`], then call [`Launch::launch`].
    pub fn launch<'a>(&'a self, kernel: &'a Kernel) -> Launch<'a> {
        Launch {
            gpu: self,
            kernel,
            args: self.stream.launch_builder(&kernel.func),
        }
    }

    /// Blocks for a 1-D launch over `n` items, `block` threads each.
    pub fn grid_1d(n: usize, block: u32) -> u32 {
        let per = block.max(1) as usize;
        u32::try_from(n.div_ceil(per)).unwrap_or(u32::MAX).max(1)
    }

    /// Blocks for a persistent (grid-stride) kernel: as many as are resident at once,
    /// `SMs x blocks-per-SM` from the occupancy calculator for this block size and smem.
    pub fn persistent_grid(&self, kernel: &Kernel, block: u32, dyn_smem: u32) -> Result<u32> {
        let per_sm = kernel
            .func
            .occupancy_max_active_blocks_per_multiprocessor(block, dyn_smem as usize, None)
            .map_err(Error::driver(format!("occupancy of {}", kernel.name)))?;
        Ok(self.info.sm_count * per_sm.max(1))
    }

    // ---------------------------------------------------------------- GEMM

    /// The cuBLASLt handle with its plan cache (created on first use).
    pub fn blas(&self) -> Result<&Blas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let blas = Blas::new(self)?;
        Ok(self.blas.get_or_init(|| blas))
    }

    // ---------------------------------------------------------------- timing & graphs

    /// A timing event (records with [`Event::record`]).
    pub fn event(&self) -> Result<Event> {
        let inner = self
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(Error::driver("creating an event"))?;
        Ok(Event { inner })
    }

    /// Runs `work` once and returns the device time it took, in milliseconds (events around it).
    pub fn time_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        let (start, end) = (self.event()?, self.event()?);
        start.record(self)?;
        work()?;
        end.record(self)?;
        start.elapsed_ms(&end)
    }

    /// Captures everything `work` queues on the stream into a CUDA graph instead of running it.
    /// Allocate buffers before capturing: the graph replays the same pointers every time.
    pub fn capture(&self, work: impl FnOnce() -> Result<()>) -> Result<Graph> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::Graph {
                during: "beginning stream capture".into(),
                reason: e.to_string(),
            })?;
        let queued = work();
        // Always end the capture, even if `work` failed, so the stream is usable again.
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        queued?;
        match ended {
            Ok(Some(graph)) => Ok(Graph {
                inner: graph,
                stream: Arc::clone(&self.stream),
            }),
            Ok(None) => Err(Error::Graph {
                during: "ending stream capture".into(),
                reason: "nothing was captured".into(),
            }),
            Err(e) => Err(Error::Graph {
                during: "ending stream capture / instantiating the graph".into(),
                reason: e.to_string(),
            }),
        }
    }
}

/// Keeps freed memory in the device's default pool instead of returning it to the OS at each
/// synchronisation (the default threshold is 0), so stream-ordered alloc/free cycles are cheap.
fn keep_freed_memory_in_pool(ctx: &Arc<CudaContext>) -> Result<()> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: the driver is loaded; out-pointer valid; device handle from a live context.
    let got = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result();
    if got.is_err() || pool.is_null() {
        // No memory pools on this device/driver: cudarc then falls back to cuMemAlloc.
        return Ok(());
    }
    let mut threshold: u64 = u64::MAX;
    // SAFETY: `pool` is the device's default pool; the attribute takes a cuuint64_t.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(Error::driver("setting the memory pool's release threshold"))
}

/// A loaded module (one compiled .cu file). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Module {
    name: String,
    inner: Arc<CudaModule>,
    /// Whether the cubin came from the disk cache.
    pub from_cache: bool,
    /// Milliseconds spent compiling or reading the cache.
    pub compile_ms: f64,
}

impl Module {
    /// The `extern "C" __global__` function `name`.
    pub fn function(&self, name: &str) -> Result<Kernel> {
        if name.contains('\0') {
            return Err(Error::Shape(format!(
                "kernel name {name:?} contains a NUL byte"
            )));
        }
        let func = self
            .inner
            .load_function(name)
            .map_err(|e| Error::FunctionNotFound {
                module: self.name.clone(),
                function: name.to_string(),
                source: e,
            })?;
        Ok(Kernel {
            name: format!("{}::{name}", self.name),
            func,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A kernel function ready to launch.
#[derive(Debug, Clone)]
pub struct Kernel {
    name: String,
    func: CudaFunction,
}

impl Kernel {
    /// `file.cu::function`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Allows up to `bytes` of dynamic shared memory per block. Needed above 48 KiB (up to
    /// 227 KiB on H100, 163 KiB on A100, 99 KiB on sm_86/89).
    pub fn set_max_dynamic_smem(&self, bytes: u32) -> Result<()> {
        self.func
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(bytes).unwrap_or(i32::MAX),
            )
            .map_err(|e| Error::LaunchConfig {
                kernel: self.name.clone(),
                reason: format!("cannot allow {bytes} bytes of dynamic shared memory: {e}"),
            })
    }

    /// Registers per thread, static shared memory and local (spill) bytes, as compiled.
    pub fn resources(&self) -> Result<KernelResources> {
        let get = |a| {
            self.func.get_attribute(a).map_err(Error::driver(format!(
                "reading attributes of {}",
                self.name
            )))
        };
        use sys::CUfunction_attribute as F;
        Ok(KernelResources {
            registers: get(F::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
            static_smem: get(F::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
            local_bytes: get(F::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?,
            max_threads: get(F::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
        })
    }

    pub fn cuda_function(&self) -> &CudaFunction {
        &self.func
    }
}

/// What the compiler gave a kernel.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct KernelResources {
    pub registers: i32,
    pub static_smem: i32,
    /// Non-zero means spills or a run-time-indexed array in local memory.
    pub local_bytes: i32,
    pub max_threads: i32,
}

/// A kernel launch being built: `gpu.launch(&k).arg(&x).arg(&mut y).arg(&n).launch(cfg)?`.
///
/// Arguments are passed by reference and must match the kernel's C signature in order and type:
/// `&DeviceBuffer<T>` / `&mut DeviceBuffer<T>` for `const T*` / `T*`, `&i32`, `&u32`, `&f32`...
/// for scalars. A mismatch is not detectable here: that is why `launch` is `unsafe`.
pub struct Launch<'a> {
    gpu: &'a Gpu,
    kernel: &'a Kernel,
    args: LaunchArgs<'a>,
}

impl<'a> Launch<'a> {
    /// Pushes the next kernel argument.
    pub fn arg<T>(&mut self, value: T) -> &mut Self
    where
        LaunchArgs<'a>: PushKernelArg<T>,
    {
        self.args.arg(value);
        self
    }

    /// Checks the configuration against the device, launches, and checks the result. With
    /// `BLR_CUDA_SYNC=1` it also waits for the kernel and reports a fault under its name.
    ///
    /// # Safety
    /// The pushed arguments must match the kernel's parameters, and the kernel must stay within
    /// the buffers it is given for this configuration.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        self.check(&cfg)?;
        // SAFETY: forwarded to the caller.
        let launched = unsafe { self.args.launch(cfg) };
        self.finish(launched.map(|_| ()))
    }

    /// Like [`Launch::launch`], as a cooperative launch: every block of the grid is resident at
    /// once, so the kernel may synchronise the whole grid (a global-memory barrier or
    /// `cooperative_groups::this_grid().sync()`). The grid must not exceed what fits on the
    /// device at once (see [`Gpu::persistent_grid`]); that is checked here first.
    ///
    /// # Safety
    /// As for [`Launch::launch`].
    pub unsafe fn launch_cooperative(&mut self, cfg: LaunchConfig) -> Result<()> {
        self.check(&cfg)?;
        let blocks =
            u64::from(cfg.grid_dim.0) * u64::from(cfg.grid_dim.1) * u64::from(cfg.grid_dim.2);
        let threads = cfg.block_dim.0 * cfg.block_dim.1 * cfg.block_dim.2;
        let resident = self
            .gpu
            .persistent_grid(self.kernel, threads, cfg.shared_mem_bytes)?;
        if blocks > u64::from(resident) {
            return Err(Error::LaunchConfig {
                kernel: self.kernel.name.clone(),
                reason: format!(
                    "cooperative launch of {blocks} blocks, but only {resident} blocks of \
                     {threads} threads and {} dynamic shared memory fit on the device at once",
                    Bytes(u64::from(cfg.shared_mem_bytes))
                ),
            });
        }
        // SAFETY: forwarded to the caller.
        let launched = unsafe { self.args.launch_cooperative(cfg) };
        self.finish(launched.map(|_| ()))
    }

    fn check(&self, cfg: &LaunchConfig) -> Result<()> {
        let bad = |reason: String| Error::LaunchConfig {
            kernel: self.kernel.name.clone(),
            reason,
        };
        let (bx, by, bz) = cfg.block_dim;
        let threads = u64::from(bx) * u64::from(by) * u64::from(bz);
        if threads == 0 || threads > 1024 {
            return Err(bad(format!(
                "block of {bx}x{by}x{bz} = {threads} threads (must be 1..=1024)"
            )));
        }
        let (gx, gy, gz) = cfg.grid_dim;
        if gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535 {
            return Err(bad(format!(
                "grid of {gx}x{gy}x{gz} blocks (each must be >= 1; y and z <= 65535)"
            )));
        }
        if u64::from(cfg.shared_mem_bytes) > self.gpu.info.max_smem_per_block_optin.0 {
            return Err(bad(format!(
                "{} of dynamic shared memory, over this device's {} per block",
                Bytes(u64::from(cfg.shared_mem_bytes)),
                self.gpu.info.max_smem_per_block_optin
            )));
        }
        Ok(())
    }

    fn finish(&self, launched: std::result::Result<(), cudarc::driver::DriverError>) -> Result<()> {
        launched.map_err(|e| Error::Launch {
            kernel: self.kernel.name.clone(),
            source: e,
        })?;
        if self.gpu.sync_after_launch && !self.gpu.is_capturing() {
            self.gpu.stream.synchronize().map_err(|e| Error::Launch {
                kernel: self.kernel.name.clone(),
                source: e,
            })?;
        }
        Ok(())
    }
}

impl Gpu {
    /// For launches that do not go through [`Launch`] (cluster launches via `cuLaunchKernelEx`):
    /// with `sync_after_launch` (`BLR_CUDA_SYNC=1`) waits for the stream and reports a fault
    /// under `kernel`'s name; does nothing otherwise or while a graph is being captured.
    pub(crate) fn check_after_launch(&self, kernel: &str) -> Result<()> {
        if self.sync_after_launch && !self.is_capturing() {
            self.stream.synchronize().map_err(|e| Error::Launch {
                kernel: kernel.to_string(),
                source: e,
            })?;
        }
        Ok(())
    }

    fn is_capturing(&self) -> bool {
        !matches!(
            self.stream.capture_status(),
            Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
        )
    }
}

/// A CUDA event for timing on the Gpu's stream.
#[derive(Debug)]
pub struct Event {
    inner: cudarc::driver::CudaEvent,
}

impl Event {
    pub fn record(&self, gpu: &Gpu) -> Result<()> {
        self.inner
            .record(&gpu.stream)
            .map_err(Error::driver("recording an event"))
    }

    /// Milliseconds from `self` to `end`; waits for both.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        self.inner
            .elapsed_ms(&end.inner)
            .map(f64::from)
            .map_err(Error::driver("reading event times"))
    }
}

/// An instantiated CUDA graph, replayed on the Gpu's stream.
pub struct Graph {
    inner: cudarc::driver::CudaGraph,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

impl Graph {
    /// Queues one replay of the captured work.
    pub fn replay(&self) -> Result<()> {
        self.inner.launch().map_err(|e| Error::Graph {
            during: "replaying the graph".into(),
            reason: e.to_string(),
        })
    }

    /// Uploads the graph's resources so that the first replay is not slower than the rest.
    pub fn upload(&self) -> Result<()> {
        self.inner.upload().map_err(|e| Error::Graph {
            during: "uploading the graph".into(),
            reason: e.to_string(),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}
