//! The CUDA backend: every [`Backend`] op on one NVIDIA GPU (sm_80..sm_90), bf16 activations and
//! parameters, fp32 accumulation and fp32 softmax/normalisation statistics, so that every model
//! written over the trait (Llama, GPT-2, ViT, DiT) runs on the GPU unchanged. It is checked
//! against the CPU reference by [`crate::parity`] (`blr parity --device cuda` on a GPU machine).
//!
//! - Linear layers are `blr_cuda::layers::GpuLinear` (dense, low-rank, Monarch, BLAST) with the
//!   strategy the autotune cache recorded for this device, shape and token count, else the
//!   default heuristic ([`blr_cuda::layers::autotune::AutotuneCache::choose`]); scratch space
//!   is shared by all layers of one shape (everything runs on one stream, in order).
//! - Everything else is a fused kernel from the `.cu` files beside this one, one file per op
//!   family: `norm.cu` (RMSNorm, LayerNorm), `rope.cu`, `elementwise.cu` (residuals, per-column
//!   ops, activations, embedding gather, slices, KV-cache append) and `attention.cu` (flash-style
//!   tensor-core prefill for head_dim 64/128; split-over-keys decode kernels, vectorised for
//!   head_dim 64/128 and generic for every other head size up to 256).
//! - The KV cache lives on the device, per kv head (`[head][position][dim]`, `capacity`
//!   positions), so a head's keys are one contiguous matrix for the attention kernels.
//! - Tensors are never resized in place: each op returns a new buffer from the device's
//!   stream-ordered pool (a pool hit costs well under a microsecond), and drop frees it in stream
//!   order.
//!
//! blr-cuda loads libcuda/NVRTC/cuBLASLt at run time, so this module builds (and `Cuda::new`
//! fails cleanly with a reason) on machines without CUDA.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blr_cuda::layers::autotune::AutotuneCache;
use blr_cuda::layers::{GpuLinear, LayerKernels, Strategy, Workspace};
use blr_cuda::{
    bf16, CompileOptions, DeviceBuffer, Gpu, GpuOptions, Kernel, KernelSource, LaunchConfig,
};

use crate::backend::{check_attn_dims, check_cache, AttnSpec, Backend};
use crate::{Error, Result};

/// norm.cu: `blr_rms_norm`, `blr_layer_norm`.
pub const NORM_CU: KernelSource = blr_cuda::kernel_source!("norm.cu");
/// elementwise.cu: residual/per-column ops, activations, embedding, slices, KV append.
pub const ELEMENTWISE_CU: KernelSource = blr_cuda::kernel_source!("elementwise.cu");
/// rope.cu: `blr_rope`.
pub const ROPE_CU: KernelSource = blr_cuda::kernel_source!("rope.cu");
/// attention.cu: `blr_flash_attn_64`, `blr_flash_attn_128`, `blr_attn_rows`, `blr_attn_combine`.
pub const ATTENTION_CU: KernelSource = blr_cuda::kernel_source!("attention.cu");

/// sample.cu: `blr_sample` (greedy and top-p next-token choice on the device).
pub const SAMPLE_CU: KernelSource = blr_cuda::kernel_source!("sample.cu");

/// Every `.cu` file of this backend, for the compile check (tests/cuda_kernels_compile.rs).
pub const SOURCES: [KernelSource; 5] = [NORM_CU, ELEMENTWISE_CU, ROPE_CU, ATTENTION_CU, SAMPLE_CU];

/// Threads of `blr_sample` (one block; sample.cu's SAMPLE_THREADS).
const SAMPLE_THREADS: u32 = 1024;
/// `blr_sample` keys carry the token index in 20 bits.
const SAMPLE_MAX_VOCAB: usize = 1 << 20;

/// Up to this many token ids go to the embedding kernel as arguments (decode steps), not
/// through a host-to-device copy: see `blr_embedding_few` in elementwise.cu.
const EMBED_FEW: usize = 8;
/// Threads per block of the element-wise and norm kernels (norm.cu's NORM_THREADS).
const BLOCK: u32 = 256;
/// Key positions per block of `blr_attn_rows`: 256 keys x 4 warps keeps each warp on 64 keys,
/// and a 1024-position cache already splits 4 ways per head (32 heads -> 128 blocks).
const ATTN_CHUNK: usize = 256;
/// Key positions per block of `blr_attn_decode_{64,128}`: each block has 32 keys in flight, so
/// 128 keys is 4 steps per warp, and a 1024-position cache splits 8 ways per head (32 heads ->
/// 256 blocks, about two per SM on an H100).
const DECODE_CHUNK: usize = 128;
/// `blr_attn_rows` keeps `head_dim / 32` values per lane in registers, at most 8.
const ATTN_MAX_HEAD_DIM: usize = 256;
/// Threads of the flash kernel (4 warps x 16 query rows = the 64-row query tile).
const FLASH_THREADS: u32 = 128;
const FLASH_ROWS: usize = 64;

fn cuda(op: &str) -> impl Fn(blr_cuda::Error) -> Error + '_ {
    move |error| Error::Cuda {
        op: op.to_string(),
        error,
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::input(what, format!("{v} does not fit the kernels' i32")))
}

/// A row-major `(rows, cols)` bf16 matrix on the device.
#[derive(Debug)]
pub struct CudaTensor {
    buf: DeviceBuffer<bf16>,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    pub fn buffer(&self) -> &DeviceBuffer<bf16> {
        &self.buf
    }

    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A linear layer on the device, with the key of the workspace it shares with same-shaped layers.
#[derive(Debug)]
pub struct CudaLinear {
    layer: GpuLinear,
    ws_key: String,
}

impl CudaLinear {
    pub fn layer(&self) -> &GpuLinear {
        &self.layer
    }
}

/// Keys and values of one layer on the device: `k[h][pos][d]`, `capacity` positions per head.
#[derive(Debug)]
pub struct CudaKvCache {
    k: DeviceBuffer<bf16>,
    v: DeviceBuffer<bf16>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug)]
struct Kernels {
    rms_norm: Kernel,
    layer_norm: Kernel,
    add: Kernel,
    add_row: Kernel,
    modulate: Kernel,
    add_gated: Kernel,
    silu_mul: Kernel,
    gelu: Kernel,
    silu: Kernel,
    embedding: Kernel,
    embedding_few: Kernel,
    copy2d: Kernel,
    kv_append: Kernel,
    rope: Kernel,
    flash64: Kernel,
    flash128: Kernel,
    attn_rows: Kernel,
    decode64: Kernel,
    decode128: Kernel,
    attn_combine: Kernel,
    sample: Kernel,
}

impl Kernels {
    fn load(gpu: &Gpu) -> blr_cuda::Result<Self> {
        let opts = CompileOptions::default();
        let norm = gpu.load_module(&NORM_CU, &opts)?;
        let ew = gpu.load_module(&ELEMENTWISE_CU, &opts)?;
        let rope = gpu.load_module(&ROPE_CU, &opts)?;
        let attn = gpu.load_module(&ATTENTION_CU, &opts)?;
        let sample = gpu.load_module(&SAMPLE_CU, &opts)?;
        Ok(Kernels {
            rms_norm: norm.function("blr_rms_norm")?,
            layer_norm: norm.function("blr_layer_norm")?,
            add: ew.function("blr_add")?,
            add_row: ew.function("blr_add_row")?,
            modulate: ew.function("blr_modulate")?,
            add_gated: ew.function("blr_add_gated")?,
            silu_mul: ew.function("blr_silu_mul")?,
            gelu: ew.function("blr_gelu")?,
            silu: ew.function("blr_silu")?,
            embedding: ew.function("blr_embedding")?,
            embedding_few: ew.function("blr_embedding_few")?,
            copy2d: ew.function("blr_copy2d")?,
            kv_append: ew.function("blr_kv_append")?,
            rope: rope.function("blr_rope")?,
            flash64: attn.function("blr_flash_attn_64")?,
            flash128: attn.function("blr_flash_attn_128")?,
            attn_rows: attn.function("blr_attn_rows")?,
            decode64: attn.function("blr_attn_decode_64")?,
            decode128: attn.function("blr_attn_decode_128")?,
            attn_combine: attn.function("blr_attn_combine")?,
            sample: sample.function("blr_sample")?,
        })
    }
}

/// Per-shape layer workspace, with the token count it was made for.
type Workspaces = HashMap<String, (usize, Workspace)>;

struct Inner {
    gpu: Gpu,
    layer_kernels: LayerKernels,
    k: Kernels,
    autotune: AutotuneCache,
    /// Forces one layer strategy where it applies (`None`: autotune cache, then heuristic).
    strategy: Option<Strategy>,
    workspaces: Mutex<Workspaces>,
    /// RoPE frequency tables already on the device, keyed by their bits (a model has one).
    freqs: Mutex<Vec<(Vec<u32>, DeviceBuffer<f32>)>>,
}

/// The CUDA backend. Cheap to clone (models take their backend by value; clones share the
/// device, kernels and workspaces).
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Cuda {
    /// Opens the device, compiles (or loads from the kernel cache) every kernel, reads the
    /// autotune cache. Fails with the reason when there is no driver, device or NVRTC.
    pub fn new(opts: GpuOptions) -> Result<Self> {
        Self::with_strategy(opts, None)
    }

    /// Device 0, default options (`BLR_MAX_GPU_MEM` caps memory).
    pub fn open_default() -> Result<Self> {
        Self::new(GpuOptions::default())
    }

    /// Like [`Cuda::new`], with every linear layer run by `strategy` where it applies (others
    /// keep the automatic choice): for comparing strategies end to end (`blr e2e --strategy`).
    pub fn with_strategy(opts: GpuOptions, strategy: Option<Strategy>) -> Result<Self> {
        let gpu = Gpu::new(opts).map_err(cuda("opening the device"))?;
        let layer_kernels = LayerKernels::load(&gpu).map_err(cuda("loading the layer kernels"))?;
        let k = Kernels::load(&gpu).map_err(cuda("loading the model kernels"))?;
        let autotune = match AutotuneCache::default_path() {
            Some(p) => AutotuneCache::load(&p).map_err(cuda("reading the autotune cache"))?,
            None => AutotuneCache::default(),
        };
        Ok(Cuda {
            inner: Arc::new(Inner {
                gpu,
                layer_kernels,
                k,
                autotune,
                strategy,
                workspaces: Mutex::new(HashMap::new()),
                freqs: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The device (timing events, synchronisation, memory usage).
    pub fn gpu(&self) -> &Gpu {
        &self.inner.gpu
    }

    /// Waits for all queued work; surfaces asynchronous faults.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.gpu.synchronize().map_err(cuda("synchronising"))
    }

    /// The strategy a layer runs with at `tokens` tokens.
    pub fn strategy_for(&self, layer: &CudaLinear, tokens: usize) -> Strategy {
        let inner = &self.inner;
        if let Some(s) = inner.strategy {
            if layer.layer.check(s, tokens).is_ok() {
                return s;
            }
        }
        inner
            .autotune
            .choose(&inner.gpu.info().name, layer.layer.shape(), tokens)
    }

    fn alloc(&self, rows: usize, cols: usize, what: &str) -> Result<CudaTensor> {
        // A zero-element allocation is not a valid device pointer: keep at least one element.
        let buf = self
            .inner
            .gpu
            .alloc::<bf16>((rows * cols).max(1), what)
            .map_err(cuda(what))?;
        Ok(CudaTensor { buf, rows, cols })
    }

    /// Grid-stride launch over `n` elements.
    fn grid(&self, n: usize) -> LaunchConfig {
        let cap = self.inner.gpu.info().sm_count.max(1) * 16;
        LaunchConfig {
            grid_dim: (Gpu::grid_1d(n, BLOCK).min(cap), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn k(&self) -> &Kernels {
        &self.inner.k
    }

    fn gpu_ref(&self) -> &Gpu {
        &self.inner.gpu
    }

    /// Runs attention of `q (T, heads*hd)` at positions `pos0..pos0+T` over `l` keys read from
    /// `k`/`v` with the given strides (see attention.cu).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &CudaTensor,
        k: &DeviceBuffer<bf16>,
        v: &DeviceBuffer<bf16>,
        head_stride: usize,
        row_stride: usize,
        l: usize,
        pos0: usize,
        spec: AttnSpec,
    ) -> Result<CudaTensor> {
        let gpu = self.gpu_ref();
        let t = q.rows;
        let hd = spec.head_dim;
        let mut out = self.alloc(t, q.cols, "attention output")?;
        if t == 0 {
            return Ok(out);
        }
        let head_stride = i64::try_from(head_stride)
            .map_err(|_| Error::input("attention", "kv head stride overflows i64"))?;
        let row_stride = i32_of(row_stride, "attention kv row stride")?;
        let (t_i, l_i, pos0_i) = (
            i32_of(t, "attention rows")?,
            i32_of(l, "attention keys")?,
            i32_of(pos0, "attention position")?,
        );
        let causal = i32::from(spec.causal);
        let heads = i32_of(spec.heads, "attention heads")?;
        let group = i32_of(spec.heads / spec.kv_heads, "attention group")?;
        let scale_log2 = spec.scale * std::f32::consts::LOG2_E;
        let flash = match hd {
            64 => Some(&self.k().flash64),
            128 => Some(&self.k().flash128),
            _ => None,
        };
        if let (Some(kernel), true) = (flash, t > 1) {
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(t.div_ceil(FLASH_ROWS)).unwrap_or(u32::MAX),
                    u32::try_from(spec.heads).unwrap_or(u32::MAX),
                    1,
                ),
                block_dim: (FLASH_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: blr_flash_attn_HD(q, k, v, out, i64 head_stride, i32 row_stride, T, L,
            // pos0, causal, heads, group, f32 scale): q and out hold T x heads*HD, k and v hold
            // kv_heads heads of L rows at these strides (checked by the callers).
            return unsafe {
                gpu.launch(kernel)
                    .arg(&q.buf)
                    .arg(k)
                    .arg(v)
                    .arg(&mut out.buf)
                    .arg(&head_stride)
                    .arg(&row_stride)
                    .arg(&t_i)
                    .arg(&l_i)
                    .arg(&pos0_i)
                    .arg(&causal)
                    .arg(&heads)
                    .arg(&group)
                    .arg(&scale_log2)
                    .launch(cfg)
            }
            .map(|()| out)
            .map_err(cuda("flash attention"));
        }
        if hd > ATTN_MAX_HEAD_DIM {
            return Err(Error::input(
                "attention",
                format!("head_dim {hd} is over the CUDA backend's {ATTN_MAX_HEAD_DIM}"),
            ));
        }
        let (rows_kernel, chunk_len) = match hd {
            64 => (&self.k().decode64, DECODE_CHUNK),
            128 => (&self.k().decode128, DECODE_CHUNK),
            _ => (&self.k().attn_rows, ATTN_CHUNK),
        };
        let splits = l.div_ceil(chunk_len).max(1);
        let mut part = gpu
            .alloc::<f32>(t * spec.heads * splits * (hd + 2), "attention partials")
            .map_err(cuda("attention partials"))?;
        let hd_i = i32_of(hd, "head_dim")?;
        let chunk = i32_of(chunk_len, "attention chunk")?;
        let rows_heads = u32::try_from(t * spec.heads)
            .map_err(|_| Error::input("attention", "rows x heads overflows the grid"))?;
        let cfg = LaunchConfig {
            grid_dim: (rows_heads, u32::try_from(splits).unwrap_or(u32::MAX), 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: blr_attn_rows / blr_attn_decode_HD (same parameters: q, k, v, part, i64, i32,
        // T, L, pos0, causal, heads, group, hd, f32, chunk) write part[(rh * splits + split) * (hd + 2) ..] for every block: the
        // buffer holds T * heads * splits * (hd + 2) floats.
        unsafe {
            gpu.launch(rows_kernel)
                .arg(&q.buf)
                .arg(k)
                .arg(v)
                .arg(&mut part)
                .arg(&head_stride)
                .arg(&row_stride)
                .arg(&t_i)
                .arg(&l_i)
                .arg(&pos0_i)
                .arg(&causal)
                .arg(&heads)
                .arg(&group)
                .arg(&hd_i)
                .arg(&scale_log2)
                .arg(&chunk)
                .launch(cfg)
        }
        .map_err(cuda("attention (split rows)"))?;
        let splits_i = i32_of(splits, "attention splits")?;
        let cfg = LaunchConfig {
            grid_dim: (rows_heads, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: blr_attn_combine(part, out, heads, hd, splits) reads the partials written
        // above and writes out (T, heads * hd).
        unsafe {
            gpu.launch(&self.k().attn_combine)
                .arg(&part)
                .arg(&mut out.buf)
                .arg(&heads)
                .arg(&hd_i)
                .arg(&splits_i)
                .launch(cfg)
        }
        .map_err(cuda("attention (combine)"))?;
        Ok(out)
    }

    fn check_attn(q: &CudaTensor, k: &CudaTensor, v: &CudaTensor, spec: AttnSpec) -> Result<()> {
        check_attn_dims((q.rows, q.cols), (k.rows, k.cols), (v.rows, v.cols), spec)
    }

    fn same_dims(what: &str, a: &CudaTensor, b: &CudaTensor) -> Result<()> {
        if (a.rows, a.cols) != (b.rows, b.cols) {
            return Err(Error::input(
                what,
                format!(
                    "operands are ({}, {}) and ({}, {})",
                    a.rows, a.cols, b.rows, b.cols
                ),
            ));
        }
        Ok(())
    }

    fn row_vector(what: &str, x: &CudaTensor, w: &CudaTensor) -> Result<()> {
        if w.len() != x.cols {
            return Err(Error::input(
                what,
                format!(
                    "per-column parameter has {} values, rows have {}",
                    w.len(),
                    x.cols
                ),
            ));
        }
        Ok(())
    }

    /// `x op= (row-broadcast operands)`: add_row, modulate, add_gated share one launch shape.
    fn per_column(
        &self,
        op: &str,
        kernel: &Kernel,
        x: &mut CudaTensor,
        operands: &[&DeviceBuffer<bf16>],
    ) -> Result<()> {
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let cols = i32_of(x.cols, op)?;
        let cfg = self.grid(n);
        let n = n as u64;
        let gpu = self.gpu_ref();
        let mut launch = gpu.launch(kernel);
        launch.arg(&mut x.buf);
        for o in operands {
            launch.arg(*o);
        }
        // SAFETY: blr_add_row(x, row, n, cols), blr_modulate(x, shift, scale, n, cols),
        // blr_add_gated(x, y, gate, n, cols): x (and y) hold n elements, per-column operands
        // `cols` (checked by the callers).
        unsafe { launch.arg(&n).arg(&cols).launch(cfg) }.map_err(cuda(op))
    }

    fn in_place(
        &self,
        op: &str,
        kernel: &Kernel,
        x: &mut CudaTensor,
        flag: Option<i32>,
    ) -> Result<()> {
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let cfg = self.grid(n);
        let n = n as u64;
        let gpu = self.gpu_ref();
        let mut launch = gpu.launch(kernel);
        launch.arg(&mut x.buf).arg(&n);
        if let Some(f) = &flag {
            launch.arg(f);
        }
        // SAFETY: blr_silu(x, n) / blr_gelu(x, n, tanh): x holds n elements.
        unsafe { launch.launch(cfg) }.map_err(cuda(op))
    }

    fn copy2d(
        &self,
        x: &CudaTensor,
        row0: usize,
        rows: usize,
        col0: usize,
        cols: usize,
    ) -> Result<CudaTensor> {
        let mut out = self.alloc(rows, cols, "slice")?;
        let n = rows * cols;
        if n == 0 {
            return Ok(out);
        }
        let cfg = self.grid(n);
        let (n, cols_i, src_cols, row0, col0) = (
            n as u64,
            i32_of(cols, "slice")?,
            i32_of(x.cols, "slice")?,
            i32_of(row0, "slice")?,
            i32_of(col0, "slice")?,
        );
        // SAFETY: blr_copy2d(src, dst, n, cols, src_cols, row0, col0) reads rows row0.. of src
        // within its bounds (checked by the callers) and writes n = rows x cols elements.
        unsafe {
            self.gpu_ref()
                .launch(&self.k().copy2d)
                .arg(&x.buf)
                .arg(&mut out.buf)
                .arg(&n)
                .arg(&cols_i)
                .arg(&src_cols)
                .arg(&row0)
                .arg(&col0)
                .launch(cfg)
        }
        .map_err(cuda("slice"))?;
        Ok(out)
    }

    /// Writes `x (T, kv_heads * head_dim)` into `cache` at positions `pos0..pos0+T`;
    /// `geom = (kv_heads, head_dim, capacity, pos0)`.
    fn kv_append(
        &self,
        x: &CudaTensor,
        cache: &mut DeviceBuffer<bf16>,
        geom: (usize, usize, usize, usize),
    ) -> Result<()> {
        let (kv_heads, head_dim, capacity, pos0) = geom;
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let cfg = self.grid(n);
        let (n, kvh, hd, cap, pos0) = (
            n as u64,
            i32_of(kv_heads, "kv cache")?,
            i32_of(head_dim, "kv cache")?,
            i32_of(capacity, "kv cache")?,
            i32_of(pos0, "kv cache")?,
        );
        // SAFETY: blr_kv_append(x, cache, n, kv_heads, hd, capacity, pos0) writes positions
        // pos0..pos0 + T < capacity of each head (checked by the caller).
        unsafe {
            self.gpu_ref()
                .launch(&self.k().kv_append)
                .arg(&x.buf)
                .arg(cache)
                .arg(&n)
                .arg(&kvh)
                .arg(&hd)
                .arg(&cap)
                .arg(&pos0)
                .launch(cfg)
        }
        .map_err(cuda("kv cache append"))
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Linear = CudaLinear;
    type KvCache = CudaKvCache;

    fn name(&self) -> String {
        let info = self.inner.gpu.info();
        format!("cuda (bf16, {}, {})", info.name, info.arch)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(Error::input(
                "tensor",
                format!(
                    "{} values cannot form a ({rows}, {cols}) matrix",
                    data.len()
                ),
            ));
        }
        let mut t = self.alloc(rows, cols, "uploaded tensor")?;
        let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        self.inner
            .gpu
            .copy_to_device(&host, &mut t.buf)
            .map_err(cuda("upload"))?;
        Ok(t)
    }

    fn download(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        // Only the tensor's own elements: an empty tensor keeps a one-element buffer that no
        // kernel writes.
        let v = self
            .inner
            .gpu
            .download_prefix(&x.buf, x.len())
            .map_err(cuda("download"))?;
        Ok(v.into_iter().map(bf16::to_f32).collect())
    }

    fn dims(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn slice_rows(&self, x: &CudaTensor, start: usize, end: usize) -> Result<CudaTensor> {
        if start > end || end > x.rows {
            return Err(Error::input(
                "slice_rows",
                format!("rows {start}..{end} of a {}-row tensor", x.rows),
            ));
        }
        self.copy2d(x, start, end - start, 0, x.cols)
    }

    fn slice_cols(&self, x: &CudaTensor, start: usize, end: usize) -> Result<CudaTensor> {
        if start > end || end > x.cols {
            return Err(Error::input(
                "slice_cols",
                format!("columns {start}..{end} of a {}-column tensor", x.cols),
            ));
        }
        self.copy2d(x, 0, x.rows, start, end - start)
    }

    fn load_linear(&self, layer: blr_core::Linear) -> Result<CudaLinear> {
        let layer =
            GpuLinear::upload(&self.inner.gpu, &layer).map_err(cuda("uploading a linear layer"))?;
        let s = layer.shape();
        let ws_key = format!(
            "{}|{}x{}|{}x{}|{}",
            s.format, s.m, s.n, s.b_out, s.b_in, s.rank
        );
        Ok(CudaLinear { layer, ws_key })
    }

    fn linear_dims(&self, layer: &CudaLinear) -> (usize, usize) {
        let s = layer.layer.shape();
        (s.m, s.n)
    }

    fn linear(&self, layer: &CudaLinear, x: &CudaTensor) -> Result<CudaTensor> {
        let (m, n) = self.linear_dims(layer);
        if x.cols != n {
            return Err(Error::input(
                "linear",
                format!("input has {} columns, the layer takes {n}", x.cols),
            ));
        }
        let t = x.rows;
        let mut y = self.alloc(t, m, "linear output")?;
        if t == 0 {
            return Ok(y);
        }
        let strategy = self.strategy_for(layer, t);
        let inner = &self.inner;
        let mut all = inner
            .workspaces
            .lock()
            .map_err(|_| Error::input("linear", "workspace lock poisoned by an earlier panic"))?;
        let fresh = match all.get(&layer.ws_key) {
            Some((max, _)) => *max < t,
            None => true,
        };
        if fresh {
            // Drop the old one first so the pool can reuse its memory.
            all.remove(&layer.ws_key);
            let ws = layer
                .layer
                .workspace(&inner.gpu, t)
                .map_err(cuda("allocating a layer workspace"))?;
            all.insert(layer.ws_key.clone(), (t, ws));
        }
        let (_, ws) = all
            .get_mut(&layer.ws_key)
            .ok_or_else(|| Error::input("linear", "workspace vanished"))?;
        layer
            .layer
            .forward(
                &inner.gpu,
                &inner.layer_kernels,
                &x.buf,
                t,
                &mut y.buf,
                ws,
                strategy,
            )
            .map_err(cuda("linear layer"))?;
        Ok(y)
    }

    fn embedding(&self, table: &CudaTensor, ids: &[u32]) -> Result<CudaTensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(Error::input(
                "embedding",
                format!("token id {id} is past the {}-row table", table.rows),
            ));
        }
        let mut out = self.alloc(ids.len(), table.cols, "embedding output")?;
        let n = out.len();
        if n == 0 {
            return Ok(out);
        }
        let gpu = self.gpu_ref();
        let cfg = self.grid(n);
        let (n, cols) = (n as u64, i32_of(table.cols, "embedding")?);
        if ids.len() <= EMBED_FEW {
            let mut few = [0u32; EMBED_FEW];
            few[..ids.len()].copy_from_slice(ids);
            // SAFETY: blr_embedding_few(table, out, n, cols, i0..i7): ids (< table rows,
            // checked above) are arguments; out holds n = ids x cols elements.
            return unsafe {
                let mut l = gpu.launch(&self.k().embedding_few);
                l.arg(&table.buf).arg(&mut out.buf).arg(&n).arg(&cols);
                for id in &few {
                    l.arg(id);
                }
                l.launch(cfg)
            }
            .map(|()| out)
            .map_err(cuda("embedding"));
        }
        let ids_dev = gpu.upload(ids, "token ids").map_err(cuda("embedding"))?;
        // SAFETY: blr_embedding(table, ids, out, n, cols): every id < table rows (checked
        // above), out holds n = ids x cols elements.
        unsafe {
            gpu.launch(&self.k().embedding)
                .arg(&table.buf)
                .arg(&ids_dev)
                .arg(&mut out.buf)
                .arg(&n)
                .arg(&cols)
                .launch(cfg)
        }
        .map_err(cuda("embedding"))?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        Self::row_vector("rms_norm", x, weight)?;
        let mut out = self.alloc(x.rows, x.cols, "rms_norm output")?;
        if x.len() == 0 {
            return Ok(out);
        }
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(x.rows).unwrap_or(u32::MAX), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols = i32_of(x.cols, "rms_norm")?;
        // SAFETY: blr_rms_norm(x, w, y, cols, eps): one block per row of x/y, w has cols.
        unsafe {
            self.gpu_ref()
                .launch(&self.k().rms_norm)
                .arg(&x.buf)
                .arg(&weight.buf)
                .arg(&mut out.buf)
                .arg(&cols)
                .arg(&eps)
                .launch(cfg)
        }
        .map_err(cuda("rms_norm"))?;
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        Self::row_vector("layer_norm weight", x, weight)?;
        Self::row_vector("layer_norm bias", x, bias)?;
        let mut out = self.alloc(x.rows, x.cols, "layer_norm output")?;
        if x.len() == 0 {
            return Ok(out);
        }
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(x.rows).unwrap_or(u32::MAX), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols = i32_of(x.cols, "layer_norm")?;
        // SAFETY: blr_layer_norm(x, w, b, y, cols, eps): one block per row; w, b have cols.
        unsafe {
            self.gpu_ref()
                .launch(&self.k().layer_norm)
                .arg(&x.buf)
                .arg(&weight.buf)
                .arg(&bias.buf)
                .arg(&mut out.buf)
                .arg(&cols)
                .arg(&eps)
                .launch(cfg)
        }
        .map_err(cuda("layer_norm"))?;
        Ok(out)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        Self::same_dims("add", x, y)?;
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let cfg = self.grid(n);
        let n = n as u64;
        // SAFETY: blr_add(x, y, n): both hold n elements (same dims, checked).
        unsafe {
            self.gpu_ref()
                .launch(&self.k().add)
                .arg(&mut x.buf)
                .arg(&y.buf)
                .arg(&n)
                .launch(cfg)
        }
        .map_err(cuda("add"))
    }

    fn add_row(&self, x: &mut CudaTensor, row: &CudaTensor) -> Result<()> {
        Self::row_vector("add_row", x, row)?;
        let k = &self.inner.k.add_row;
        self.per_column("add_row", k, x, &[&row.buf])
    }

    fn modulate(&self, x: &mut CudaTensor, shift: &CudaTensor, scale: &CudaTensor) -> Result<()> {
        Self::row_vector("modulate shift", x, shift)?;
        Self::row_vector("modulate scale", x, scale)?;
        let k = &self.inner.k.modulate;
        self.per_column("modulate", k, x, &[&shift.buf, &scale.buf])
    }

    fn add_gated(&self, x: &mut CudaTensor, y: &CudaTensor, gate: &CudaTensor) -> Result<()> {
        Self::same_dims("add_gated", x, y)?;
        Self::row_vector("add_gated gate", x, gate)?;
        let k = &self.inner.k.add_gated;
        self.per_column("add_gated", k, x, &[&y.buf, &gate.buf])
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        Self::same_dims("silu_mul", gate, up)?;
        let mut out = self.alloc(gate.rows, gate.cols, "silu_mul output")?;
        let n = gate.len();
        if n == 0 {
            return Ok(out);
        }
        let cfg = self.grid(n);
        let n = n as u64;
        // SAFETY: blr_silu_mul(gate, up, out, n): all three hold n elements.
        unsafe {
            self.gpu_ref()
                .launch(&self.k().silu_mul)
                .arg(&gate.buf)
                .arg(&up.buf)
                .arg(&mut out.buf)
                .arg(&n)
                .launch(cfg)
        }
        .map_err(cuda("silu_mul"))?;
        Ok(out)
    }

    fn gelu(&self, x: &mut CudaTensor, tanh_approx: bool) -> Result<()> {
        let k = &self.inner.k.gelu;
        self.in_place("gelu", k, x, Some(i32::from(tanh_approx)))
    }

    fn silu(&self, x: &mut CudaTensor) -> Result<()> {
        let k = &self.inner.k.silu;
        self.in_place("silu", k, x, None)
    }

    fn rope(&self, x: &mut CudaTensor, heads: usize, pos0: usize, inv_freq: &[f32]) -> Result<()> {
        let half = inv_freq.len();
        let d = 2 * half;
        if heads == 0 || x.cols != heads * d {
            return Err(Error::input(
                "rope",
                format!(
                    "{} columns are not {heads} heads of {d} (2 x {half} frequencies)",
                    x.cols
                ),
            ));
        }
        if x.len() == 0 {
            return Ok(());
        }
        let bits: Vec<u32> = inv_freq.iter().map(|f| f.to_bits()).collect();
        let mut freqs = self.inner.freqs.lock().map_err(|_| {
            Error::input("rope", "frequency cache lock poisoned by an earlier panic")
        })?;
        let at = match freqs.iter().position(|(b, _)| *b == bits) {
            Some(i) => i,
            None => {
                let buf = self
                    .inner
                    .gpu
                    .upload(inv_freq, "RoPE frequencies")
                    .map_err(cuda("rope"))?;
                freqs.push((bits, buf));
                freqs.len() - 1
            }
        };
        let table = &freqs[at].1;
        let cfg = self.grid(x.rows * half);
        let (rows, heads_i, half_i, pos0_i) = (
            i32_of(x.rows, "rope")?,
            i32_of(heads, "rope")?,
            i32_of(half, "rope")?,
            i32_of(pos0, "rope")?,
        );
        // SAFETY: blr_rope(x, inv_freq, rows, heads, half, pos0): x is rows x heads*2*half
        // (checked), inv_freq holds half floats.
        unsafe {
            self.gpu_ref()
                .launch(&self.k().rope)
                .arg(&mut x.buf)
                .arg(table)
                .arg(&rows)
                .arg(&heads_i)
                .arg(&half_i)
                .arg(&pos0_i)
                .launch(cfg)
        }
        .map_err(cuda("rope"))
    }

    fn new_kv_cache(
        &self,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<CudaKvCache> {
        let n = kv_heads
            .checked_mul(head_dim)
            .and_then(|x| x.checked_mul(capacity))
            .ok_or_else(|| Error::input("kv cache", "size overflows"))?;
        let gpu = self.gpu_ref();
        let k = gpu
            .alloc::<bf16>(n.max(1), "KV cache (keys)")
            .map_err(cuda("kv cache"))?;
        let v = gpu
            .alloc::<bf16>(n.max(1), "KV cache (values)")
            .map_err(cuda("kv cache"))?;
        Ok(CudaKvCache {
            k,
            v,
            len: 0,
            capacity,
            kv_heads,
            head_dim,
        })
    }

    fn kv_len(&self, cache: &CudaKvCache) -> usize {
        cache.len
    }

    fn kv_clear(&self, cache: &mut CudaKvCache) {
        cache.len = 0;
    }

    fn attention_cached(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        cache: &mut CudaKvCache,
        spec: AttnSpec,
    ) -> Result<CudaTensor> {
        Self::check_attn(q, k, v, spec)?;
        let pos0 = check_cache(
            (cache.kv_heads, cache.head_dim),
            cache.len,
            cache.capacity,
            q.rows,
            spec,
        )?;
        let l = pos0 + q.rows;
        let geom = (cache.kv_heads, cache.head_dim, cache.capacity, pos0);
        self.kv_append(k, &mut cache.k, geom)?;
        self.kv_append(v, &mut cache.v, geom)?;
        cache.len = l;
        let d = spec.head_dim;
        self.attend(q, &cache.k, &cache.v, cache.capacity * d, d, l, pos0, spec)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        spec: AttnSpec,
    ) -> Result<CudaTensor> {
        Self::check_attn(q, k, v, spec)?;
        let d = spec.head_dim;
        self.attend(q, &k.buf, &v.buf, d, spec.kv_heads * d, q.rows, 0, spec)
    }

    fn sample_last(
        &self,
        logits: &CudaTensor,
        temperature: f32,
        top_p: f32,
        u: f64,
    ) -> Result<u32> {
        let (rows, vocab) = (logits.rows, logits.cols);
        if rows == 0 || vocab == 0 {
            return Err(Error::input("sampler", "no logits"));
        }
        if vocab > SAMPLE_MAX_VOCAB {
            // Past the kernel's key width: choose on the host (same result, one row download).
            let row = self.slice_rows(logits, rows - 1, rows)?;
            return crate::lm::choose(&self.download(&row)?, temperature, top_p, u);
        }
        // Validates temperature and top_p exactly as the host path does.
        crate::lm::choose(&[0.0], temperature, top_p, u)?;
        let gpu = self.gpu_ref();
        let greedy = temperature == 0.0;
        let row = logits
            .buf
            .device_ptr_at((rows - 1) * vocab)
            .map_err(cuda("sample"))?;
        let scratch_len = if greedy { 1 } else { vocab };
        let mut weights = gpu
            .alloc::<u64>(scratch_len, "sampling weights")
            .map_err(cuda("sample"))?;
        let mut out = gpu
            .alloc::<u32>(2, "sampled token")
            .map_err(cuda("sample"))?;
        let v_i = i32_of(vocab, "sample vocabulary")?;
        let greedy_i = i32::from(greedy);
        let inv_t = if greedy {
            0.0
        } else {
            1.0 / f64::from(temperature)
        };
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: blr_sample(logits, V, greedy, inv_t, top_p, u, weights, out): `row` points at
        // the last row's V bf16 values inside `logits`; weights holds V u64 when sampling (the
        // kernel does not touch it when greedy); out holds the 2 u32 the kernel writes.
        unsafe {
            gpu.launch(&self.k().sample)
                .arg(&row)
                .arg(&v_i)
                .arg(&greedy_i)
                .arg(&inv_t)
                .arg(&top_p)
                .arg(&u)
                .arg(&mut weights)
                .arg(&mut out)
                .launch(cfg)
        }
        .map_err(cuda("sample"))?;
        let got = gpu.download(&out).map_err(cuda("sample"))?;
        match got[1] {
            0 => Ok(got[0]),
            1 => Err(Error::input(
                "sampler",
                "logits contain NaN or +Inf: the model's forward pass diverged",
            )),
            _ => Err(Error::input("sampler", "every logit is -Inf")),
        }
    }
}
