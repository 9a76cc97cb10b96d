//! Dense GEMM through cuBLASLt: bf16 in, fp32 accumulate, bf16 (or f32) out, strided-batched,
//! with the descriptors and the chosen algorithm cached per shape.
//!
//! # Conventions (row-major, as everywhere in blr)
//! For each batch index `i` in `0..batch`:
//!
//! ```text
//! Y_i (rows, cols) = alpha * X_i (rows, inner) * op(W_i) + beta * Y_i
//!   WeightLayout::OutIn:  W_i stored (cols, inner), op(W) = W^T   -- nn.Linear: Y = X W^T
//!   WeightLayout::InOut:  W_i stored (inner, cols), op(W) = W
//! ```
//!
//! For a linear layer, `rows = T` tokens, `cols = m` outputs, `inner = n` inputs (BRIEF §2).
//! Each operand has a row stride (`ld_*`, elements between consecutive rows; defaults to the
//! dense width) and a batch stride (`stride_*`, elements between consecutive batch matrices;
//! 0 shares one matrix across the batch). Row strides let a GEMM read a column block of a
//! wider matrix in place, e.g. BLAST's `X_j = X[:, j*q..(j+1)*q]` is `inner = q, ld_x = n,
//! stride_x = q`: no copy.
//!
//! cuBLASLt is column-major. A row-major `(r, c)` matrix with row stride `ld` is the
//! column-major `(c, r)` matrix with the same `ld`, i.e. its transpose, so we compute
//! `Y^T (cols, rows) = op'(W) * X^T` with cuBLAS `m = cols, n = rows, k = inner`:
//! `B = X^T` untransposed; `A` is the stored W, transposed (`OutIn`, "TN" GEMM, the layout
//! Hopper's fastest kernels want) or not (`InOut`).
//!
//! # Plans
//! cudarc's safe wrapper builds the layouts, asks the heuristic and destroys everything on
//! every call (~10-30 us of host time, as long as the GEMM itself at decode sizes). Here a
//! [`GemmShape`] + output type + operand alignment is the key of a cached plan holding the matmul
//! descriptor, the three layouts and the algorithm the heuristic picked; a call with a known
//! key is one `cublasLtMatmul`.
//!
//! Alignment is part of the key because cuBLASLt's heuristic assumes 256-byte aligned operands
//! unless told otherwise: a sub-matrix at an odd offset gets a plan built for its real alignment.
//!
//! # Measured algorithm choices (the GEMM cache)
//! The heuristic's first algorithm is not always cuBLASLt's fastest: on the H100 the low-rank
//! GEMMs of llama7b down_proj (1024 x 1488 x 11008) ran 80.9 us with it and 64.0 us with its
//! third candidate (docs/perf/kernel-notes.md, "Low-rank prefill"). [`Blas::tune`] times the
//! candidates (and their split-K variants) with L2 flushed; `blr bench layer --tune-gemms` keeps
//! a layer's tuned algorithms only where the whole layer then ran faster in place, and writes
//! them to a per-device cache file (`$BLR_GEMM_CACHE`, else `~/.cache/blr/gemm-algos.tsv`;
//! `BLR_GEMM_CACHE=off` disables it). Every [`Blas`] reads that file: a plan whose key (device,
//! cuBLASLt version, shape, strides, output type, alignment) is in it uses the stored algorithm
//! once `cublasLtMatmulAlgoCheck` accepts it for these descriptors, else the heuristic's.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys as lt_sys};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::memory::{DeviceBuffer, Element};

/// How the weight operand is stored (see module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// `(cols, inner)` row-major, `Y = X W^T`: PyTorch's `nn.Linear.weight`, blr's `W (m, n)`.
    OutIn,
    /// `(inner, cols)` row-major, `Y = X W`.
    InOut,
}

/// The shape of a (batched) row-major GEMM; see the module docs for the meaning of each field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub rows: usize,
    pub cols: usize,
    pub inner: usize,
    pub w_layout: WeightLayout,
    pub batch: usize,
    pub ld_x: usize,
    pub ld_w: usize,
    pub ld_y: usize,
    pub stride_x: usize,
    pub stride_w: usize,
    pub stride_y: usize,
}

impl GemmShape {
    /// `Y (t, m) = X (t, n) W^T`, `W (m, n)`: one dense linear layer.
    pub fn linear(t: usize, m: usize, n: usize) -> Self {
        Self {
            rows: t,
            cols: m,
            inner: n,
            w_layout: WeightLayout::OutIn,
            batch: 1,
            ld_x: n,
            ld_w: n,
            ld_y: m,
            stride_x: t * n,
            stride_w: m * n,
            stride_y: t * m,
        }
    }

    /// `Y (rows, cols) = X (rows, inner) W`, `W (inner, cols)`.
    pub fn matmul(rows: usize, cols: usize, inner: usize) -> Self {
        Self {
            w_layout: WeightLayout::InOut,
            ld_w: cols,
            ..Self::linear(rows, cols, inner)
        }
    }

    /// Makes it a batch of `batch` GEMMs with the given element strides between matrices.
    pub fn batched(self, batch: usize, stride_x: usize, stride_w: usize, stride_y: usize) -> Self {
        Self {
            batch,
            stride_x,
            stride_w,
            stride_y,
            ..self
        }
    }

    /// Sets the row strides (elements) of X, W and Y.
    pub fn with_ld(self, ld_x: usize, ld_w: usize, ld_y: usize) -> Self {
        Self {
            ld_x,
            ld_w,
            ld_y,
            ..self
        }
    }

    /// `2 * batch * rows * cols * inner`.
    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.rows as f64 * self.cols as f64 * self.inner as f64
    }

    /// (rows, cols) of the stored W.
    fn w_dims(&self) -> (usize, usize) {
        match self.w_layout {
            WeightLayout::OutIn => (self.cols, self.inner),
            WeightLayout::InOut => (self.inner, self.cols),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Shape(format!("GEMM {self:?}: {msg}")));
        if self.rows == 0 || self.cols == 0 || self.inner == 0 || self.batch == 0 {
            return bad("rows, cols, inner and batch must all be >= 1".into());
        }
        let (_, w_cols) = self.w_dims();
        if self.ld_x < self.inner {
            return bad(format!("ld_x {} < inner {}", self.ld_x, self.inner));
        }
        if self.ld_w < w_cols {
            return bad(format!("ld_w {} < stored W width {w_cols}", self.ld_w));
        }
        if self.ld_y < self.cols {
            return bad(format!("ld_y {} < cols {}", self.ld_y, self.cols));
        }
        if self.batch > 1 && self.stride_y == 0 {
            return bad("stride_y = 0 with batch > 1 makes every batch write the same Y".into());
        }
        let limit = i32::MAX as usize;
        if [self.batch, self.rows, self.cols, self.inner]
            .iter()
            .any(|&d| d > limit)
        {
            return bad("a dimension exceeds i32::MAX".into());
        }
        Ok(())
    }

    /// Elements of a buffer an operand spans from its offset: last batch, last row, full width.
    /// Saturates instead of overflowing: an absurd shape then fails the bounds check.
    fn extent(batch: usize, stride: usize, rows: usize, ld: usize, width: usize) -> usize {
        batch
            .saturating_sub(1)
            .saturating_mul(stride)
            .saturating_add(rows.saturating_sub(1).saturating_mul(ld))
            .saturating_add(width)
    }
}

/// A matrix operand: a buffer and the element offset its first matrix starts at.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    pub buf: &'a DeviceBuffer<T>,
    pub offset: usize,
}

/// A writable matrix operand.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    pub buf: &'a mut DeviceBuffer<T>,
    pub offset: usize,
}

impl<T> DeviceBuffer<T> {
    /// This buffer as a GEMM input starting at element `offset`.
    pub fn at(&self, offset: usize) -> MatRef<'_, T> {
        MatRef { buf: self, offset }
    }

    /// This buffer as a GEMM output starting at element `offset`.
    pub fn at_mut(&mut self, offset: usize) -> MatMut<'_, T> {
        MatMut { buf: self, offset }
    }
}

impl<'a, T> From<&'a DeviceBuffer<T>> for MatRef<'a, T> {
    fn from(buf: &'a DeviceBuffer<T>) -> Self {
        Self { buf, offset: 0 }
    }
}

impl<'a, T> From<&'a mut DeviceBuffer<T>> for MatMut<'a, T> {
    fn from(buf: &'a mut DeviceBuffer<T>) -> Self {
        Self { buf, offset: 0 }
    }
}

/// Output element types cuBLASLt writes for bf16 inputs with fp32 accumulation.
pub trait GemmOutput: Element {
    #[doc(hidden)]
    const CUDA_TYPE: lt_sys::cudaDataType;
}

impl GemmOutput for bf16 {
    const CUDA_TYPE: lt_sys::cudaDataType = lt_sys::cudaDataType::CUDA_R_16BF;
}

impl GemmOutput for f32 {
    const CUDA_TYPE: lt_sys::cudaDataType = lt_sys::cudaDataType::CUDA_R_32F;
}

/// What [`Blas::tune`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TuneReport {
    /// `(heuristic rank, median ms)` of each candidate that ran; rank 0 is the default pick.
    pub candidates: Vec<(usize, f64)>,
    /// Median of the heuristic's first choice (NaN if it did not run).
    pub heuristic_ms: f64,
    pub best_ms: f64,
    /// Heuristic rank of the pinned algorithm (ranks past the heuristic's list are its
    /// split-K variants, `BLR_TUNE_SPLITK=1`).
    pub best_index: usize,
}

/// One measured algorithm choice of the GEMM cache (module docs).
#[derive(Debug, Clone, PartialEq)]
struct StoredAlgo {
    algo: [u64; 8],
    workspace: usize,
    heuristic_ms: f64,
    best_ms: f64,
}

/// Where the GEMM cache lives: `$BLR_GEMM_CACHE` (`off` or `0`: nowhere), else
/// `$XDG_CACHE_HOME/blr/gemm-algos.tsv` or `~/.cache/blr/gemm-algos.tsv`.
pub fn gemm_cache_path() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("BLR_GEMM_CACHE").filter(|v| !v.is_empty()) {
        if p == "off" || p == "0" {
            return None;
        }
        return Some(PathBuf::from(p));
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("blr").join("gemm-algos.tsv"))
}

/// Parses the GEMM cache text: `key<TAB>a0,..,a7 (hex)<TAB>workspace<TAB>heuristic_ms<TAB>best_ms`
/// per line, `#` comments. Returns the entries and the first malformed line, if any (that line
/// is skipped: a damaged cache costs speed, never correctness).
fn parse_gemm_cache(text: &str) -> (HashMap<String, StoredAlgo>, Option<String>) {
    let mut out = HashMap::new();
    let mut bad = None;
    for (no, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let parsed = (f.len() == 5)
            .then(|| {
                let words: Vec<u64> = f[1]
                    .split(',')
                    .filter_map(|w| u64::from_str_radix(w.trim(), 16).ok())
                    .collect();
                let algo: [u64; 8] = words.try_into().ok()?;
                Some(StoredAlgo {
                    algo,
                    workspace: f[2].trim().parse().ok()?,
                    heuristic_ms: f[3].trim().parse().ok()?,
                    best_ms: f[4].trim().parse().ok()?,
                })
            })
            .flatten();
        match parsed {
            Some(a) => {
                out.insert(f[0].to_string(), a);
            }
            None => {
                bad.get_or_insert_with(|| format!("line {}: '{line}'", no + 1));
            }
        }
    }
    (out, bad)
}

fn format_gemm_cache(entries: &std::collections::BTreeMap<String, StoredAlgo>) -> String {
    let mut text = String::from(
        "# blr GEMM cache: cuBLASLt algorithm measured fastest per device|cuBLASLt|GEMM key \
         (blr bench layer --tune-gemms); columns: key, algorithm words (hex), workspace bytes, \
         heuristic ms, best ms\n",
    );
    for (k, a) in entries {
        let words: Vec<String> = a.algo.iter().map(|w| format!("{w:x}")).collect();
        text.push_str(&format!(
            "{k}\t{}\t{}\t{:.6}\t{:.6}\n",
            words.join(","),
            a.workspace,
            a.heuristic_ms,
            a.best_ms
        ));
    }
    text
}

/// A validated GEMM call: its plan key and operand addresses.
struct Prepared {
    key: PlanKey,
    x_ptr: u64,
    w_ptr: u64,
    y_ptr: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    shape: GemmShape,
    out_type: i32,
    align: [u32; 3],
}

/// Descriptors + algorithm for one [`PlanKey`]. Destroys its cuBLASLt objects on drop.
struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
    workspace: usize,
}

// SAFETY: the handles are plain pointers to immutable-after-creation cuBLASLt objects; cuBLASLt
// allows using descriptors from any thread as long as they are not modified concurrently, and
// a Plan is never modified after it is built.
unsafe impl Send for Plan {}
// SAFETY: as above.
unsafe impl Sync for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once in `Blas::plan` and is destroyed only here.
        unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = lt::destroy_matrix_layout(layout);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// A cuBLASLt handle, its workspace and the plan cache. Get it with [`Gpu::blas`].
pub struct Blas {
    handle: lt_sys::cublasLtHandle_t,
    workspace: DeviceBuffer<u8>,
    plans: Mutex<HashMap<PlanKey, std::sync::Arc<Plan>>>,
    /// `BLR_POISON_GEMM_OUTPUTS=1` (set by scripts/sanitize.sh for initcheck): before every
    /// GEMM with `beta = 0`, the exact elements it owns in Y are set to 0xFF (NaN) by a 2-D
    /// memset. compute-sanitizer's initcheck does not see cuBLASLt's stores on sm_90
    /// (bench/sanitize/cublaslt_initcheck.cu reproduces it), so without this every later read
    /// of a GEMM output (a kernel of ours, a download) is reported as uninitialised. With it,
    /// initcheck still checks everything else, and an element the GEMM failed to write stays
    /// NaN, which every test's NaN check catches. Off in normal runs (it costs a write of Y).
    poison_outputs: bool,
    /// `device|cuBLASLt version` prefix of this handle's GEMM cache keys.
    cache_prefix: String,
    /// Measured choices read from the GEMM cache at creation (module docs).
    stored: HashMap<String, StoredAlgo>,
    /// Why the GEMM cache was (partly) not used, if it was not.
    cache_problem: Option<String>,
    /// Choices [`Blas::tune`] pinned in this process, in order (for [`Blas::save_tuned`]).
    tuned: Mutex<Vec<(PlanKey, StoredAlgo)>>,
}

// SAFETY: a cuBLASLt handle may be used from several threads (calls are serialised on our one
// stream by the caller); the plan map is behind a Mutex.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `Blas::new`, destroyed only here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas")
            .field("workspace", &self.workspace.len())
            .field("plans", &self.plan_count())
            .finish()
    }
}

/// cuBLASLt's version as `(major, minor, patch)`.
pub fn cublaslt_version() -> Result<(usize, usize, usize)> {
    crate::libs::ensure_cublaslt()?;
    // SAFETY: library loaded (checked above); takes no arguments.
    let v = unsafe { lt_sys::cublasLtGetVersion() };
    Ok((v / 10000, (v / 100) % 100, v % 100))
}

/// cuBLAS's version as `(major, minor, patch)`.
pub fn cublas_version() -> Result<(i32, i32, i32)> {
    crate::libs::ensure_cublas()?;
    use cudarc::cublas::sys as cb;
    let get = |p| {
        let mut v = 0;
        // SAFETY: library loaded; out-pointer valid.
        unsafe { cb::cublasGetProperty(p, &mut v) }
            .result()
            .map(|()| v)
            .map_err(|e| Error::LibraryCall {
                during: "reading the cuBLAS version".into(),
                status: format!("{e:?}"),
            })
    };
    Ok((
        get(cb::libraryPropertyType::MAJOR_VERSION)?,
        get(cb::libraryPropertyType::MINOR_VERSION)?,
        get(cb::libraryPropertyType::PATCH_LEVEL)?,
    ))
}

fn alignment_of(addr: u64) -> u32 {
    // Largest power of two dividing the address, capped at the 256 bytes cuBLASLt asks for.
    if addr == 0 {
        256
    } else {
        (1u64 << addr.trailing_zeros().min(8)) as u32
    }
}

impl Blas {
    /// Workspace size per NVIDIA's recommendation: 32 MiB on Hopper, 4 MiB before.
    pub(crate) fn new(gpu: &Gpu) -> Result<Self> {
        Self::with_cache(gpu, gemm_cache_path().as_deref())
    }

    /// Like [`Blas::new`], reading measured choices from the GEMM cache at `cache` (none: the
    /// heuristic everywhere).
    pub fn with_cache(gpu: &Gpu, cache: Option<&std::path::Path>) -> Result<Self> {
        crate::libs::ensure_cublaslt()?;
        let handle = lt::create_handle().map_err(Error::cublas("creating the cuBLASLt handle"))?;
        let ws_bytes = if gpu.info().compute_capability.0 >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        // Zeroed once: cuBLASLt owns its contents, but a workspace nobody ever wrote would be
        // the first suspect for any uninitialised read inside the library (initcheck).
        let workspace = match gpu.alloc_zeros::<u8>(ws_bytes, "the cuBLASLt workspace") {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: just created, not shared.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e);
            }
        };
        let version = cublaslt_version()
            .map(|(a, b, c)| format!("{a}.{b}.{c}"))
            .unwrap_or_else(|_| "?".into());
        let cache_prefix = format!("{}|cublaslt {version}", gpu.info().name);
        let (stored, cache_problem) = match cache {
            None => (HashMap::new(), None),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    let (all, bad) = parse_gemm_cache(&text);
                    let mine = all
                        .into_iter()
                        .filter(|(k, _)| k.starts_with(&cache_prefix))
                        .collect();
                    let problem =
                        bad.map(|b| format!("{}: skipped a malformed {b}", path.display()));
                    (mine, problem)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (HashMap::new(), None),
                Err(e) => (
                    HashMap::new(),
                    Some(format!("cannot read {}: {e}", path.display())),
                ),
            },
        };
        Ok(Self {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            poison_outputs: std::env::var_os("BLR_POISON_GEMM_OUTPUTS").is_some_and(|v| v != "0"),
            cache_prefix,
            stored,
            cache_problem,
            tuned: Mutex::new(Vec::new()),
        })
    }

    /// How many measured choices this handle read from the GEMM cache for its device, and why
    /// the cache was (partly) unusable, if it was.
    pub fn gemm_cache_status(&self) -> (usize, Option<&str>) {
        (self.stored.len(), self.cache_problem.as_deref())
    }

    /// The GEMM cache key of a plan key (module docs).
    fn cache_key(&self, key: &PlanKey) -> String {
        let s = &key.shape;
        format!(
            "{}|{}x{}x{}|{:?}|batch {}|ld {},{},{}|stride {},{},{}|out {}|align {},{},{}",
            self.cache_prefix,
            s.rows,
            s.cols,
            s.inner,
            s.w_layout,
            s.batch,
            s.ld_x,
            s.ld_w,
            s.ld_y,
            s.stride_x,
            s.stride_w,
            s.stride_y,
            key.out_type,
            key.align[0],
            key.align[1],
            key.align[2]
        )
    }

    /// How many choices [`Blas::tune`] pinned so far (a mark for [`Blas::discard_tuned_since`]).
    pub fn tuned_len(&self) -> usize {
        self.tuned.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// Drops the choices pinned after `mark` (their plans are rebuilt on next use, from the
    /// GEMM cache or the heuristic): for tuning that did not make the caller's work faster.
    pub fn discard_tuned_since(&self, mark: usize) {
        let dropped: Vec<PlanKey> = match self.tuned.lock() {
            Ok(mut t) if t.len() > mark => t.drain(mark..).map(|(k, _)| k).collect(),
            _ => return,
        };
        if let Ok(mut plans) = self.plans.lock() {
            for k in &dropped {
                plans.remove(k);
            }
        }
    }

    /// Merges the choices pinned in this process into the GEMM cache file at `path` (creating
    /// its directory; an unreadable or damaged file is replaced by valid entries). Returns how
    /// many were written.
    pub fn save_tuned(&self, path: &std::path::Path) -> Result<usize> {
        let io = |what: &str, e: std::io::Error| {
            Error::Shape(format!(
                "cannot {what} the GEMM cache {}: {e}",
                path.display()
            ))
        };
        let mut entries: std::collections::BTreeMap<String, StoredAlgo> =
            match std::fs::read_to_string(path) {
                Ok(text) => parse_gemm_cache(&text).0.into_iter().collect(),
                Err(_) => Default::default(),
            };
        let tuned = self.tuned.lock().map(|t| t.clone()).unwrap_or_default();
        for (k, a) in &tuned {
            entries.insert(self.cache_key(k), a.clone());
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
        }
        blr_core::safetensors::write_atomic(path, format_gemm_cache(&entries).as_bytes())
            .map_err(|e| Error::Shape(format!("cannot write the GEMM cache: {e}")))?;
        Ok(tuned.len())
    }

    /// How many distinct GEMM plans are cached.
    pub fn plan_count(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// `Y = alpha * X op(W) + beta * Y` (module docs), bf16 inputs, fp32 accumulation, output
    /// `O` (bf16 or f32). Every operand's extent is checked against its buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<'x, 'w, 'y, O: GemmOutput>(
        &self,
        gpu: &Gpu,
        shape: &GemmShape,
        x: impl Into<MatRef<'x, bf16>>,
        w: impl Into<MatRef<'w, bf16>>,
        y: impl Into<MatMut<'y, O>>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let prepared = Self::prepare::<O>(shape, &x.into(), &w.into(), &y.into())?;
        let plan = self.plan::<O>(&prepared.key)?;
        self.launch(
            gpu,
            &prepared,
            &plan,
            &plan.algo,
            plan.workspace,
            alpha,
            beta,
        )
    }

    /// Times every algorithm cuBLASLt's heuristic offers for this GEMM (up to 8; median of
    /// `reps` event-timed runs each) and pins the fastest in the plan cache, so later
    /// [`Blas::gemm`] calls with the same shape, output type and alignment use it. Writes Y.
    #[allow(clippy::too_many_arguments)]
    pub fn tune<'x, 'w, 'y, O: GemmOutput>(
        &self,
        gpu: &Gpu,
        shape: &GemmShape,
        x: impl Into<MatRef<'x, bf16>>,
        w: impl Into<MatRef<'w, bf16>>,
        y: impl Into<MatMut<'y, O>>,
        reps: usize,
    ) -> Result<TuneReport> {
        let prepared = Self::prepare::<O>(shape, &x.into(), &w.into(), &y.into())?;
        let knobs = TuneKnobs::from_env();
        let (mut plan, mut candidates) = self.build_plan::<O>(&prepared.key, knobs.count)?;
        if knobs.splitk {
            let extra = self.splitk_variants(&plan, &candidates);
            candidates.extend(extra);
        }
        let mut timed = Vec::new();
        for (i, c) in candidates.iter().enumerate() {
            let run = || self.launch(gpu, &prepared, &plan, &c.algo, c.workspaceSize, 1.0, 0.0);
            // An algorithm that fails to run is skipped, not fatal: the heuristic may list
            // ones this exact problem cannot use.
            if run().is_err() {
                continue;
            }
            // L2 flushed before every run: back to back, weights that fit in L2 (a 33 MB
            // low-rank factor) stay there and favour algorithms that re-read them (measured:
            // picks that won unflushed lost in the layer).
            let stats = crate::timing::bench(
                gpu,
                &crate::timing::BenchOptions {
                    warmup: 2,
                    reps: reps.max(3),
                    flush_l2: true,
                },
                run,
            )?;
            timed.push((i, stats.median_ms));
            if knobs.verbose {
                eprintln!(
                    "    tune {}x{}x{} batch {}: #{i} {} ws {} B: {:.4} ms",
                    shape.rows,
                    shape.cols,
                    shape.inner,
                    shape.batch,
                    algo_config(&c.algo),
                    c.workspaceSize,
                    stats.median_ms
                );
            }
        }
        let Some(&(best, best_ms)) = timed.iter().min_by(|a, b| a.1.total_cmp(&b.1)) else {
            return Err(Error::NoGemmAlgorithm {
                gemm: format!("{shape:?} (no candidate ran)"),
            });
        };
        let heuristic_ms = timed.iter().find(|t| t.0 == 0).map_or(f64::NAN, |t| t.1);
        plan.algo = candidates[best].algo;
        plan.workspace = candidates[best].workspaceSize.min(self.workspace.len());
        if let Ok(mut plans) = self.plans.lock() {
            plans.insert(prepared.key, std::sync::Arc::new(plan));
        }
        if let Ok(mut t) = self.tuned.lock() {
            t.push((
                prepared.key,
                StoredAlgo {
                    algo: candidates[best].algo.data,
                    workspace: candidates[best].workspaceSize,
                    heuristic_ms,
                    best_ms,
                },
            ));
        }
        Ok(TuneReport {
            candidates: timed,
            heuristic_ms,
            best_ms,
            best_index: best,
        })
    }

    /// Copies of each candidate that supports split-K with `SPLITK_NUM` in 2..=16 and the first
    /// reduction scheme it offers, those `cublasLtMatmulAlgoCheck` accepts within our workspace.
    fn splitk_variants(
        &self,
        plan: &Plan,
        candidates: &[lt_sys::cublasLtMatmulHeuristicResult_t],
    ) -> Vec<lt_sys::cublasLtMatmulHeuristicResult_t> {
        use lt_sys::cublasLtMatmulAlgoCapAttributes_t as Cap;
        use lt_sys::cublasLtMatmulAlgoConfigAttributes_t as Cfg;
        let mut out = Vec::new();
        for c in candidates {
            let mut support = 0i32;
            let mut mask = 0u32;
            let mut written = 0usize;
            // SAFETY: `c.algo` is an initialised algorithm from the heuristic; each buffer has
            // the documented size of its attribute (int32 / uint32).
            let ok = unsafe {
                lt_sys::cublasLtMatmulAlgoCapGetAttribute(
                    &c.algo,
                    Cap::CUBLASLT_ALGO_CAP_SPLITK_SUPPORT,
                    (&mut support as *mut i32).cast(),
                    4,
                    &mut written,
                )
                .result()
                .and_then(|()| {
                    lt_sys::cublasLtMatmulAlgoCapGetAttribute(
                        &c.algo,
                        Cap::CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK,
                        (&mut mask as *mut u32).cast(),
                        4,
                        &mut written,
                    )
                    .result()
                })
            };
            if ok.is_err() || support == 0 {
                continue;
            }
            let scheme: u32 = [2u32, 4, 1]
                .into_iter()
                .find(|b| mask & b != 0)
                .unwrap_or(0);
            for splits in [2u32, 3, 4, 6, 8, 16] {
                let mut algo = c.algo;
                let mut result = *c;
                // SAFETY: `algo` is a copy of an initialised algorithm; values are uint32 as
                // documented for SPLITK_NUM and REDUCTION_SCHEME; the plan's descriptors are live.
                let checked = unsafe {
                    lt_sys::cublasLtMatmulAlgoConfigSetAttribute(
                        &mut algo,
                        Cfg::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                        (&splits as *const u32).cast(),
                        4,
                    )
                    .result()
                    .and_then(|()| {
                        lt_sys::cublasLtMatmulAlgoConfigSetAttribute(
                            &mut algo,
                            Cfg::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                            (&scheme as *const u32).cast(),
                            4,
                        )
                        .result()
                    })
                    .and_then(|()| {
                        lt_sys::cublasLtMatmulAlgoCheck(
                            self.handle,
                            plan.desc,
                            plan.a,
                            plan.b,
                            plan.c,
                            plan.c,
                            &algo,
                            &mut result,
                        )
                        .result()
                    })
                };
                if checked.is_ok() && result.workspaceSize <= self.workspace.len() {
                    result.algo = algo;
                    out.push(result);
                }
            }
        }
        out
    }

    /// Validates `shape` against the operands and computes pointers and the plan key.
    fn prepare<O: GemmOutput>(
        shape: &GemmShape,
        x: &MatRef<'_, bf16>,
        w: &MatRef<'_, bf16>,
        y: &MatMut<'_, O>,
    ) -> Result<Prepared> {
        shape.validate()?;
        let s = shape;
        let (w_rows, w_cols) = s.w_dims();
        let check = |name: &str, offset: usize, len: usize, extent: usize| {
            if offset.checked_add(extent).is_none_or(|end| end > len) {
                Err(Error::Shape(format!(
                    "GEMM {s:?}: operand {name} needs elements {offset}..{} but its buffer has {len}",
                    offset.saturating_add(extent)
                )))
            } else {
                Ok(())
            }
        };
        check(
            "X",
            x.offset,
            x.buf.len(),
            GemmShape::extent(s.batch, s.stride_x, s.rows, s.ld_x, s.inner),
        )?;
        check(
            "W",
            w.offset,
            w.buf.len(),
            GemmShape::extent(s.batch, s.stride_w, w_rows, s.ld_w, w_cols),
        )?;
        check(
            "Y",
            y.offset,
            y.buf.len(),
            GemmShape::extent(s.batch, s.stride_y, s.rows, s.ld_y, s.cols),
        )?;

        let x_ptr = x.buf.device_ptr() + (x.offset * 2) as u64;
        let w_ptr = w.buf.device_ptr() + (w.offset * 2) as u64;
        let out_size = std::mem::size_of::<O>() as u64;
        let y_ptr = y.buf.device_ptr() + y.offset as u64 * out_size;
        // Batch strides shift each matrix's start, so they bound the alignment too.
        // Only the low bits matter here, so wrapping products are exact enough.
        let bytes = |elems: usize, size: u64| (elems as u64).wrapping_mul(size);
        let stride_bits = |stride: usize, size: u64| {
            if s.batch > 1 {
                bytes(stride, size)
            } else {
                0
            }
        };
        let align = [
            alignment_of(w_ptr | stride_bits(s.stride_w, 2) | bytes(s.ld_w, 2)),
            alignment_of(x_ptr | stride_bits(s.stride_x, 2) | bytes(s.ld_x, 2)),
            alignment_of(y_ptr | stride_bits(s.stride_y, out_size) | bytes(s.ld_y, out_size)),
        ];
        Ok(Prepared {
            key: PlanKey {
                shape: *s,
                out_type: O::CUDA_TYPE as i32,
                align,
            },
            x_ptr,
            w_ptr,
            y_ptr,
        })
    }

    /// Queues one `cublasLtMatmul` with `plan`'s descriptors and `algo`.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        gpu: &Gpu,
        p: &Prepared,
        plan: &Plan,
        algo: &lt_sys::cublasLtMatmulAlgo_t,
        workspace: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if self.poison_outputs && beta == 0.0 {
            self.poison_output(gpu, p)?;
        }
        let ws_ptr = self.workspace.device_ptr();
        // SAFETY: `prepare` checked every operand extent against its buffer; the plan's
        // layouts describe exactly those extents; the workspace outlives the call (owned by
        // self) and is only used on this stream, so consecutive GEMMs never share it at once.
        unsafe {
            lt_sys::cublasLtMatmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast::<c_void>(),
                p.w_ptr as *const c_void,
                plan.a,
                p.x_ptr as *const c_void,
                plan.b,
                (&beta as *const f32).cast::<c_void>(),
                p.y_ptr as *const c_void,
                plan.c,
                p.y_ptr as *mut c_void,
                plan.c,
                algo,
                ws_ptr as *mut c_void,
                workspace.min(self.workspace.len()),
                gpu.stream().cu_stream() as _,
            )
        }
        .result()
        .map_err(Error::cublas(format!("running the GEMM {:?}", p.key.shape)))
    }

    /// Sets the elements the GEMM owns in Y (rows x cols of each batch, never the gaps between
    /// rows or matrices, which may hold other data) to 0xFF bytes: see `poison_outputs`.
    fn poison_output(&self, gpu: &Gpu, p: &Prepared) -> Result<()> {
        let s = &p.key.shape;
        let size = if p.key.out_type == lt_sys::cudaDataType::CUDA_R_32F as i32 {
            4
        } else {
            2
        };
        for b in 0..s.batch {
            let start = p.y_ptr + (b * s.stride_y * size) as u64;
            // SAFETY: `prepare` checked that rows x ld_y (last row: cols) of every batch lie
            // inside Y's buffer; the memset writes cols elements of each of those rows.
            unsafe {
                cudarc::driver::sys::cuMemsetD2D8Async(
                    start,
                    s.ld_y * size,
                    0xFF,
                    s.cols * size,
                    s.rows,
                    gpu.stream().cu_stream(),
                )
            }
            .result()
            .map_err(Error::driver("poisoning a GEMM output"))?;
        }
        Ok(())
    }

    fn plan<O: GemmOutput>(&self, key: &PlanKey) -> Result<std::sync::Arc<Plan>> {
        if let Some(p) = self.plans.lock().ok().and_then(|p| p.get(key).cloned()) {
            return Ok(p);
        }
        let (mut plan, _) = self.build_plan::<O>(key, 1)?;
        if let Some(stored) = self.stored.get(&self.cache_key(key)) {
            let algo = lt_sys::cublasLtMatmulAlgo_t { data: stored.algo };
            // SAFETY: zeroed plain-data output struct, filled by the call below.
            let mut result: lt_sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
            // SAFETY: the plan's descriptors are live; `algo` is read-only input (a stored
            // copy of an algorithm this cuBLASLt version on this device produced); `result` is
            // a valid output location.
            let ok = unsafe {
                lt_sys::cublasLtMatmulAlgoCheck(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    &algo,
                    &mut result,
                )
            };
            // A stored choice this library or these descriptors reject is ignored.
            if ok == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && result.workspaceSize <= self.workspace.len()
            {
                plan.algo = algo;
                plan.workspace = result.workspaceSize;
            }
        }
        let plan = std::sync::Arc::new(plan);
        if let Ok(mut plans) = self.plans.lock() {
            plans.insert(*key, std::sync::Arc::clone(&plan));
        }
        Ok(plan)
    }

    /// Descriptors for `key` and up to `count` algorithms from the heuristic, best first; the
    /// plan uses the first.
    fn build_plan<O: GemmOutput>(
        &self,
        key: &PlanKey,
        count: usize,
    ) -> Result<(Plan, Vec<lt_sys::cublasLtMatmulHeuristicResult_t>)> {
        let s = &key.shape;
        let during = |what: &str| format!("{what} for the GEMM {s:?}");
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: lt_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            workspace: 0,
        };
        plan.desc = lt::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(Error::cublas(during("creating the matmul descriptor")))?;
        let trans_a: i32 = match s.w_layout {
            WeightLayout::OutIn => 1,
            WeightLayout::InOut => 0,
        };
        let trans_b: i32 = 0;
        // SAFETY: `plan.desc` is live; the attribute values are i32 as cuBLASLt documents
        // for CUBLASLT_MATMUL_DESC_TRANSA/B (cublasOperation_t).
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&trans_a as *const i32).cast(),
                std::mem::size_of::<i32>(),
            )
            .map_err(Error::cublas(during("setting TRANSA")))?;
            lt::set_matmul_desc_attribute(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                (&trans_b as *const i32).cast(),
                std::mem::size_of::<i32>(),
            )
            .map_err(Error::cublas(during("setting TRANSB")))?;
        }
        // Column-major views (module docs): A = stored W, B = X^T, C = D = Y^T.
        let (w_rows, w_cols) = s.w_dims();
        let layout = |ty, rows: usize, cols: usize, ld: usize, stride: usize, what: &str| {
            let l = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                .map_err(Error::cublas(during(what)))?;
            if s.batch > 1 {
                let count = s.batch as i32;
                let stride = stride as i64;
                // SAFETY: `l` is live; BATCH_COUNT is i32 and STRIDED_BATCH_OFFSET is i64.
                let set = unsafe {
                    lt::set_matrix_layout_attribute(
                        l,
                        lt_sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count as *const i32).cast(),
                        std::mem::size_of::<i32>(),
                    )
                    .and_then(|()| {
                        lt::set_matrix_layout_attribute(
                            l,
                            lt_sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            (&stride as *const i64).cast(),
                            std::mem::size_of::<i64>(),
                        )
                    })
                };
                if let Err(e) = set {
                    // SAFETY: created above, not stored anywhere yet.
                    let _ = unsafe { lt::destroy_matrix_layout(l) };
                    return Err(Error::Cublas {
                        during: during(what),
                        source: e,
                    });
                }
            }
            Ok(l)
        };
        let bf = lt_sys::cudaDataType::CUDA_R_16BF;
        plan.a = layout(bf, w_cols, w_rows, s.ld_w, s.stride_w, "the W layout")?;
        plan.b = layout(bf, s.inner, s.rows, s.ld_x, s.stride_x, "the X layout")?;
        plan.c = layout(
            O::CUDA_TYPE,
            s.cols,
            s.rows,
            s.ld_y,
            s.stride_y,
            "the Y layout",
        )?;

        let pref =
            lt::create_matmul_pref().map_err(Error::cublas(during("creating preferences")))?;
        let ws = self.workspace.len();
        let set_pref = |attr, value: *const c_void, size| {
            // SAFETY: `pref` is live; each value matches the attribute's documented type.
            unsafe { lt::set_matmul_pref_attribute(pref, attr, value, size) }
        };
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        let prefs = set_pref(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws as *const usize).cast(),
            std::mem::size_of::<usize>(),
        )
        .and_then(|()| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                (&key.align[0] as *const u32).cast(),
                4,
            )
        })
        .and_then(|()| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                (&key.align[1] as *const u32).cast(),
                4,
            )
        })
        .and_then(|()| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                (&key.align[2] as *const u32).cast(),
                4,
            )
        })
        .and_then(|()| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                (&key.align[2] as *const u32).cast(),
                4,
            )
        });
        let heuristics = prefs.and_then(|()| {
            let mut results: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> =
                Vec::with_capacity(count.max(1));
            let mut returned = 0i32;
            // SAFETY: all descriptors are live; `results` has room for `count` entries, and
            // only the `returned` first are read (set_len after the call).
            unsafe {
                lt_sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                    i32::try_from(count.max(1)).unwrap_or(1),
                    results.as_mut_ptr(),
                    &mut returned,
                )
                .result()
                .map(|()| {
                    results.set_len(usize::try_from(returned).unwrap_or(0).min(count.max(1)));
                    results
                })
            }
        });
        // SAFETY: created above; no longer needed once the heuristic answered.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let no_algo = || Error::NoGemmAlgorithm {
            gemm: format!("{s:?} with operand alignments {:?} bytes", key.align),
        };
        let heuristics: Vec<_> = heuristics
            .map_err(|e| {
                if e.0 == lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
                    no_algo()
                } else {
                    Error::Cublas {
                        during: during("asking the algorithm heuristic"),
                        source: e,
                    }
                }
            })?
            .into_iter()
            .filter(|h| h.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .collect();
        let first = heuristics.first().ok_or_else(no_algo)?;
        plan.algo = first.algo;
        plan.workspace = first.workspaceSize.min(ws);
        Ok((plan, heuristics))
    }
}

/// Experiment knobs of [`Blas::tune`]: `BLR_TUNE_CANDIDATES` (how many algorithms to ask the
/// heuristic for, default 8), `BLR_TUNE_SPLITK=1` (also time split-K variants of those that
/// support it), `BLR_TUNE_VERBOSE=1` (print each candidate's configuration and time).
struct TuneKnobs {
    count: usize,
    splitk: bool,
    verbose: bool,
}

impl TuneKnobs {
    fn from_env() -> Self {
        let on = |name: &str| std::env::var_os(name).is_some_and(|v| v != "0" && !v.is_empty());
        Self {
            count: std::env::var("BLR_TUNE_CANDIDATES")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&c| c > 0)
                .unwrap_or(8)
                .min(64),
            splitk: on("BLR_TUNE_SPLITK"),
            verbose: on("BLR_TUNE_VERBOSE"),
        }
    }
}

/// `id/tile/splitK/reduction/stages/cluster/swizzle/custom` of a cuBLASLt algorithm, for logs.
fn algo_config(algo: &lt_sys::cublasLtMatmulAlgo_t) -> String {
    use lt_sys::cublasLtMatmulAlgoConfigAttributes_t as Cfg;
    let get = |attr, size: usize| -> i64 {
        let mut v = 0u32;
        let mut written = 0usize;
        // SAFETY: `algo` is initialised; at most 4 bytes are written into `v` (size <= 4).
        let st = unsafe {
            lt_sys::cublasLtMatmulAlgoConfigGetAttribute(
                algo,
                attr,
                (&mut v as *mut u32).cast(),
                size.min(4),
                &mut written,
            )
        };
        if st == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            i64::from(if size == 2 { v & 0xFFFF } else { v })
        } else {
            -1
        }
    };
    format!(
        "algo {} tile {} splitK {} red {} stages {} cluster {} swizzle {} custom {}",
        get(Cfg::CUBLASLT_ALGO_CONFIG_ID, 4),
        get(Cfg::CUBLASLT_ALGO_CONFIG_TILE_ID, 4),
        get(Cfg::CUBLASLT_ALGO_CONFIG_SPLITK_NUM, 4),
        get(Cfg::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, 4),
        get(Cfg::CUBLASLT_ALGO_CONFIG_STAGES_ID, 4),
        get(Cfg::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, 2),
        get(Cfg::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, 4),
        get(Cfg::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, 4),
    )
}

impl Gpu {
    /// Shorthand for [`Blas::gemm`] with `alpha = 1, beta = 0`: `Y = X op(W)`.
    pub fn gemm<'x, 'w, 'y, O: GemmOutput>(
        &self,
        shape: &GemmShape,
        x: impl Into<MatRef<'x, bf16>>,
        w: impl Into<MatRef<'w, bf16>>,
        y: impl Into<MatMut<'y, O>>,
    ) -> Result<()> {
        self.blas()?.gemm(self, shape, x, w, y, 1.0, 0.0)
    }
}

/// CPU reference of [`Blas::gemm`] (f64 accumulation) on host copies of the operands, with the
/// same shape/stride semantics. Used by the self-test and by tests of other kernels.
pub fn gemm_reference(
    shape: &GemmShape,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    alpha: f32,
    beta: f32,
) -> Result<()> {
    shape.validate()?;
    let s = shape;
    let (w_rows, w_cols) = s.w_dims();
    let need = [
        (
            "X",
            x.len(),
            GemmShape::extent(s.batch, s.stride_x, s.rows, s.ld_x, s.inner),
        ),
        (
            "W",
            w.len(),
            GemmShape::extent(s.batch, s.stride_w, w_rows, s.ld_w, w_cols),
        ),
        (
            "Y",
            y.len(),
            GemmShape::extent(s.batch, s.stride_y, s.rows, s.ld_y, s.cols),
        ),
    ];
    for (name, len, extent) in need {
        if extent > len {
            return Err(Error::Shape(format!(
                "reference GEMM {s:?}: {name} needs {extent} elements, has {len}"
            )));
        }
    }
    for b in 0..s.batch {
        for r in 0..s.rows {
            for c in 0..s.cols {
                let mut acc = 0.0f64;
                for k in 0..s.inner {
                    let xv = x[b * s.stride_x + r * s.ld_x + k];
                    let wv = match s.w_layout {
                        WeightLayout::OutIn => w[b * s.stride_w + c * s.ld_w + k],
                        WeightLayout::InOut => w[b * s.stride_w + k * s.ld_w + c],
                    };
                    acc += f64::from(xv) * f64::from(wv);
                }
                let yi = b * s.stride_y + r * s.ld_y + c;
                y[yi] = (f64::from(alpha) * acc + f64::from(beta) * f64::from(y[yi])) as f32;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_shapes() {
        assert!(GemmShape::linear(3, 5, 7).validate().is_ok());
        assert!(GemmShape::linear(0, 5, 7).validate().is_err());
        assert!(GemmShape::linear(3, 5, 7)
            .with_ld(6, 7, 5)
            .validate()
            .is_err());
        assert!(GemmShape::linear(3, 5, 7)
            .batched(2, 21, 35, 0)
            .validate()
            .is_err());
        assert!(GemmShape::matmul(3, 5, 7)
            .with_ld(7, 4, 5)
            .validate()
            .is_err());
    }

    #[test]
    fn reference_matches_hand_computation() {
        // X (2,3) = [[1,2,3],[4,5,6]], W (2,3) = [[1,0,-1],[2,1,0]] -> Y = X W^T
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut y = [0.0; 4];
        gemm_reference(&GemmShape::linear(2, 2, 3), &x, &w, &mut y, 1.0, 0.0).ok();
        assert_eq!(y, [-2.0, 4.0, -2.0, 13.0]);
        // Same product with W stored transposed (3,2).
        let wt = [1.0, 2.0, 0.0, 1.0, -1.0, 0.0];
        let mut y2 = [1.0; 4];
        gemm_reference(&GemmShape::matmul(2, 2, 3), &x, &wt, &mut y2, 2.0, 1.0).ok();
        assert_eq!(y2, [-3.0, 9.0, -3.0, 27.0]);
    }

    #[test]
    fn absurd_extents_saturate_instead_of_overflowing() {
        assert_eq!(GemmShape::extent(3, usize::MAX, 2, 5, 5), usize::MAX);
        assert_eq!(GemmShape::extent(1, usize::MAX, 2, 5, 5), 10);
        let s = GemmShape::linear(2, 3, 4).batched(2, usize::MAX / 2, 12, 6);
        let x = vec![0.0f32; 64];
        let w = vec![0.0f32; 64];
        let mut y = vec![0.0f32; 64];
        assert!(gemm_reference(&s, &x, &w, &mut y, 1.0, 0.0).is_err());
    }

    #[test]
    fn gemm_cache_round_trips_and_skips_damaged_lines() {
        let a = StoredAlgo {
            algo: [1, 0xdead_beef, 3, 4, 5, 6, 7, u64::MAX],
            workspace: 4096,
            heuristic_ms: 0.0809,
            best_ms: 0.064,
        };
        let mut m = std::collections::BTreeMap::new();
        m.insert(
            "H100|cublaslt 13.0.0|1024x1488x11008|OutIn".to_string(),
            a.clone(),
        );
        let text = format_gemm_cache(&m);
        let (back, bad) = parse_gemm_cache(&text);
        assert_eq!(bad, None);
        assert_eq!(
            back.get("H100|cublaslt 13.0.0|1024x1488x11008|OutIn"),
            Some(&a)
        );
        let damaged = format!("{text}key\t1,2,3\t0\t1\t1\nnot a line\n");
        let (back, bad) = parse_gemm_cache(&damaged);
        assert_eq!(back.len(), 1);
        assert!(
            bad.is_some_and(|b| b.contains("line 3")),
            "first bad line reported"
        );
    }

    /// A choice tuned and saved by one handle is read and used by a fresh one (the plan holds
    /// the stored algorithm, the result matches the f64 reference); a stored entry cuBLASLt
    /// rejects is ignored (heuristic, still correct). Skips without a GPU.
    #[test]
    fn gpu_gemm_cache_is_used_and_checked() {
        let gpu = match Gpu::open_default() {
            Ok(g) => g,
            Err(e) => {
                eprintln!("SKIP gpu_gemm_cache_is_used_and_checked: no GPU ({e})");
                return;
            }
        };
        let dir = std::env::temp_dir().join(format!("blr-gemm-cache-{}", std::process::id()));
        let path = dir.join("gemm-algos.tsv");
        let shape = GemmShape::linear(136, 1000, 2056);
        let mut rng = blr_core::rng::Rng::new(41);
        let round = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
        };
        let x = round(rng.normal_vec(136 * 2056, 1.0));
        let w = round(rng.normal_vec(1000 * 2056, 1.0));
        let mut want = vec![0f32; 136 * 1000];
        gemm_reference(&shape, &x, &w, &mut want, 1.0, 0.0).expect("reference");
        let xd = gpu.upload_bf16(&x, "x").expect("x");
        let wd = gpu.upload_bf16(&w, "w").expect("w");
        let mut yd = gpu.alloc::<bf16>(136 * 1000, "y").expect("y");
        let check = |blas: &Blas, yd: &mut DeviceBuffer<bf16>, what: &str| {
            gpu.memset_bytes(yd, 0xFF).expect("poison");
            blas.gemm(&gpu, &shape, &xd, &wd, &mut *yd, 1.0, 0.0)
                .expect("gemm");
            let got = gpu.download_f32(yd).expect("download");
            let (mut num, mut den) = (0f64, 0f64);
            for (g, r) in got.iter().zip(&want) {
                assert!(g.is_finite(), "{what}: unwritten or NaN output");
                num += (f64::from(*g) - f64::from(*r)).powi(2);
                den += f64::from(*r).powi(2);
            }
            let err = (num / den).sqrt();
            assert!(err < 1e-2, "{what}: rel err {err:.3e}");
        };
        let first = Blas::with_cache(&gpu, None).expect("blas");
        first
            .tune(&gpu, &shape, &xd, &wd, &mut yd, 3)
            .expect("tune");
        assert_eq!(first.tuned_len(), 1);
        assert_eq!(first.save_tuned(&path).expect("save"), 1);
        let second = Blas::with_cache(&gpu, Some(&path)).expect("blas from cache");
        assert_eq!(second.gemm_cache_status(), (1, None));
        check(&second, &mut yd, "stored algorithm");
        let (stored_words, key) = {
            let plans = second.plans.lock().expect("plans");
            let (key, plan) = plans.iter().next().expect("one plan");
            (plan.algo.data, *key)
        };
        let tuned = first.tuned.lock().expect("tuned")[0].1.algo;
        assert_eq!(stored_words, tuned, "the plan uses the stored algorithm");
        // A damaged entry (words no cuBLASLt algorithm has) must be rejected, not run.
        let bad = format_gemm_cache(
            &[(
                second.cache_key(&key),
                StoredAlgo {
                    algo: [u64::MAX; 8],
                    workspace: 0,
                    heuristic_ms: 1.0,
                    best_ms: 0.5,
                },
            )]
            .into_iter()
            .collect(),
        );
        std::fs::write(&path, bad).expect("write damaged cache");
        let third = Blas::with_cache(&gpu, Some(&path)).expect("blas from damaged cache");
        assert_eq!(third.gemm_cache_status().0, 1);
        check(&third, &mut yd, "damaged entry ignored");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn alignment() {
        assert_eq!(alignment_of(0x1000), 256);
        assert_eq!(alignment_of(0x1002), 2);
        assert_eq!(alignment_of(0x1010), 16);
    }
}
