// Standalone development harness for the BLR layer kernels in crates/blr-cuda/src/layers/.
//
// Builds on the GPU machine with nvcc (see run.sh next to this file). For each layer config and
// token count it: makes fresh random bf16 inputs and factors, computes an fp32 reference on the
// GPU with naive kernels (no bf16 rounding of intermediates), runs every strategy with the
// output poisoned with NaN first, checks ||out-ref||/||ref|| and that no NaN survived, and times
// each strategy with CUDA events (median of N, L2 flushed by a 256 MB memset before every
// iteration; CUDA graphs for T <= 16). Ceilings (copy bandwidth, cuBLAS bf16 GEMM rate) are
// measured in the same run and give each row's roofline floor.
//
//   harness [--check-only] [--small | --tiny] [--only CONFIG] [--tokens 1,16,...] [--iters N] [--json FILE]
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "blast.cu"
#include "decode.cu"
#include "gemm.cu"
#include "monarch.cu"

#define CK(x) check_cuda((x), #x, __FILE__, __LINE__)
#define CB(x) check_cublas((x), #x, __FILE__, __LINE__)
static void check_cuda(cudaError_t e, const char* what, const char* f, int l) {
    if (e != cudaSuccess) {
        fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e), f, l, what);
        exit(2);
    }
}
static void check_cublas(cublasStatus_t e, const char* what, const char* f, int l) {
    if (e != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "cuBLAS error %d at %s:%d: %s\n", (int)e, f, l, what);
        exit(2);
    }
}
#define LAUNCH_CHECK() CK(cudaGetLastError())

// ------------------------------------------------------------------ helpers
__global__ void k_fill_rand(bf16* p, long n, unsigned seed, float scale) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ (seed * 0x9E3779B9u + (unsigned)(i >> 32) * 0x85EBCA6Bu);
        h ^= h >> 16;
        h *= 0x7feb352du;
        h ^= h >> 15;
        h *= 0x846ca68bu;
        h ^= h >> 16;
        float u = (float)(h >> 8) * (1.0f / 16777216.0f) * 2.f - 1.f;
        p[i] = __float2bfloat16(u * scale);
    }
}
__global__ void k_fill_nan(bf16* p, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        p[i] = __ushort_as_bfloat16((unsigned short)0x7fff);
}
// S (b_out, b_in, r) canonical -> device (r, 16, 16) zero padded.
__global__ void k_pack_s(const bf16* s, bf16* sd, int b_out, int b_in, int r) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)r * 256) return;
    int j = idx % 16, i = (idx / 16) % 16;
    long k = idx / 256;
    sd[idx] = (i < b_out && j < b_in) ? s[((long)i * b_in + j) * r + k] : __float2bfloat16(0.f);
}

// fp32 references -------------------------------------------------------------------------
// out[t][rowmap(o)] = sum_c A[t][xoff(o) + c] * W[o][c]   (generic row-dot, fp32 in/out)
__global__ void k_ref_rowdot_bf(const bf16* x, long ldx, const bf16* w, float* out, long ldo, int T, int rows,
                                int K, int rows_per_blk, int blk_xoff) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * rows) return;
    int o = idx % rows;
    long t = idx / rows;
    const bf16* xr = x + t * ldx + (long)(o / rows_per_blk) * blk_xoff;
    const bf16* wr = w + (long)o * K;
    float acc = 0.f;
    for (int c = 0; c < K; ++c) acc += __bfloat162float(xr[c]) * __bfloat162float(wr[c]);
    out[t * ldo + o] = acc;
}
__global__ void k_ref_rowdot_f(const float* x, long ldx, const bf16* w, float* out, long ldo, int T, int rows,
                               int K, int rows_per_blk, int blk_xoff) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * rows) return;
    int o = idx % rows;
    long t = idx / rows;
    const float* xr = x + t * ldx + (long)(o / rows_per_blk) * blk_xoff;
    const bf16* wr = w + (long)o * K;
    float acc = 0.f;
    for (int c = 0; c < K; ++c) acc += xr[c] * __bfloat162float(wr[c]);
    out[t * ldo + o] = acc;
}
// BLAST mixing on fp32: z (T, b_in, r) -> w (T, b_out, r), s canonical (b_out, b_in, r)
__global__ void k_ref_mix(const float* z, const bf16* s, float* w, int T, int b_in, int b_out, int r) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * b_out * r) return;
    int k = idx % r;
    int i = (idx / r) % b_out;
    long t = idx / ((long)r * b_out);
    float acc = 0.f;
    for (int j = 0; j < b_in; ++j) acc += __bfloat162float(s[((long)i * b_in + j) * r + k]) * z[(t * b_in + j) * r + k];
    w[idx] = acc;
}
// Monarch middle permutation on fp32: P[t][l][s] = flat[t][s*b + l]
__global__ void k_ref_perm(const float* flat, float* P, int T, int b, int R) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * b * R) return;
    int s = idx % R;
    int l = (idx / R) % b;
    long t = idx / ((long)R * b);
    P[idx] = flat[t * b * R + (long)s * b + l];
}
__global__ void k_ref_perm_out(const float* out2, float* y, int T, int b, int mb) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * b * mb) return;
    int s = idx % mb;
    int l = (idx / mb) % b;
    long t = idx / ((long)mb * b);
    y[t * b * mb + (long)s * b + l] = out2[idx];
}

// L2 flush by READING a 256 MB buffer: a memset would leave ~50 MB of dirty lines in L2 whose
// write-back then lands inside the timed region (seen: ~2x on memory-bound rows).
__global__ void k_flush_read(const uint4* p, long n, unsigned* sink) {
    unsigned acc = 0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        uint4 v = __ldcg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) *sink = acc;
}

static unsigned g_seed = 12345;
static int nblk(long n, int t = 256) { return (int)std::min<long>((n + t - 1) / t, 1 << 30); }
static bf16* dalloc_bf(long n) {
    bf16* p;
    CK(cudaMalloc(&p, std::max<long>(n, 8) * 2));
    return p;
}
// Buffers that cuBLAS writes and our kernels then read (BLAST Z, low-rank XV, Monarch stage
// outputs): NaN-filled by one of our kernels at allocation. compute-sanitizer initcheck does not
// see cuBLAS's stores on sm_90 (bench/sanitize/cublaslt_initcheck.cu reproduces it), so without
// this every later read of a cuBLAS output is reported as uninitialised; with it, an element
// cuBLAS failed to write stays NaN and fails the NaN check of the final output instead.
static bf16* dalloc_bf_nan(long n) {
    bf16* p = dalloc_bf(n);
    k_fill_nan<<<std::min(nblk(std::max<long>(n, 8)), 4096), 256>>>(p, std::max<long>(n, 8));
    CK(cudaGetLastError());
    return p;
}
static float* dalloc_f(long n) {
    float* p;
    CK(cudaMalloc(&p, std::max<long>(n, 8) * 4));
    return p;
}
static bf16* drand(long n, float scale) {
    bf16* p = dalloc_bf(n);
    k_fill_rand<<<std::min(nblk(n), 4096), 256>>>(p, n, g_seed++, scale);
    LAUNCH_CHECK();
    return p;
}

static cublasHandle_t g_cublas;
// Row-major NT GEMM through cuBLAS (column-major): C^T = B A^T.
static void cublas_nt(const bf16* A, long lda, long sA, const bf16* B, long ldb, long sB, bf16* C, long ldc, long sC,
                      int M, int N, int K, int batch) {
    float alpha = 1.f, beta = 0.f;
    CB(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, B, CUDA_R_16BF, (int)ldb, sB,
                                  A, CUDA_R_16BF, (int)lda, sA, &beta, C, CUDA_R_16BF, (int)ldc, sC, batch,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
static void own_nt(const bf16* A, long lda, long sA, const bf16* B, long ldb, long sB, bf16* C, long ldc, long sC,
                   int M, int N, int K, int batch) {
    if (N >= 256) {
        dim3 grid((N + 255) / 256, (M + 127) / 128, batch);
        blr_gemm_nt_128x256<<<grid, 256, blr_gemm::Cfg<128, 256>::SMEM_BYTES>>>(A, B, C, M, N, K, lda, ldb, ldc, sA,
                                                                                 sB, sC);
    } else {
        dim3 grid((N + 127) / 128, (M + 127) / 128, batch);
        blr_gemm_nt_128x128<<<grid, 256, blr_gemm::Cfg<128, 128>::SMEM_BYTES>>>(A, B, C, M, N, K, lda, ldb, ldc, sA,
                                                                                 sB, sC);
    }
    LAUNCH_CHECK();
}

// ------------------------------------------------------------------ timing
static bf16* g_flush = nullptr;
static const long FLUSH_BYTES = 256l << 20;
static int g_iters = 30;

struct Timing {
    double ms;
    bool graph;
};
static bool g_capture_failed = false;
static Timing time_fn(const std::function<void()>& fn, bool use_graph) {
    // Built with --default-stream per-thread: stream 0 below and every <<<>>> launch without a
    // stream go to cudaStreamPerThread, which is also the stream that is captured.
    cudaStream_t st = cudaStreamPerThread;
    cudaGraphExec_t exec = nullptr;
    bool graph = false;
    if (use_graph) {
        cudaGraph_t gph = nullptr;
        g_capture_failed = false;
        cudaError_t e = cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
        if (e == cudaSuccess) {
            fn();
            e = cudaStreamEndCapture(st, &gph);
            if (e == cudaSuccess && !g_capture_failed && cudaGraphInstantiate(&exec, gph, 0) == cudaSuccess)
                graph = true;
            if (gph) cudaGraphDestroy(gph);
        }
        cudaGetLastError();
    }
    for (int w = 0; w < 3; ++w) {
        if (graph)
            CK(cudaGraphLaunch(exec, st));
        else
            fn();
    }
    CK(cudaDeviceSynchronize());
    std::vector<cudaEvent_t> ev(2 * g_iters);
    for (auto& e : ev) CK(cudaEventCreate(&e));
    for (int i = 0; i < g_iters; ++i) {
        k_flush_read<<<1024, 512, 0, st>>>(reinterpret_cast<const uint4*>(g_flush), FLUSH_BYTES / 16,
                                            reinterpret_cast<unsigned*>(g_flush));
        CK(cudaGetLastError());
        CK(cudaEventRecord(ev[2 * i], st));
        if (graph)
            CK(cudaGraphLaunch(exec, st));
        else
            fn();
        CK(cudaEventRecord(ev[2 * i + 1], st));
    }
    CK(cudaDeviceSynchronize());
    std::vector<float> ms(g_iters);
    for (int i = 0; i < g_iters; ++i) CK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
    for (auto& e : ev) CK(cudaEventDestroy(e));
    if (exec) CK(cudaGraphExecDestroy(exec));
    std::sort(ms.begin(), ms.end());
    return {ms[g_iters / 2], graph};
}

static double g_bw = 0, g_peak = 0;  // bytes/s, FLOP/s
static void measure_ceilings() {
    long bytes = 1l << 30;
    bf16 *a = dalloc_bf(bytes / 2), *b = dalloc_bf(bytes / 2);
    auto t = time_fn([&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0)); }, false);
    g_bw = 2.0 * bytes / (t.ms * 1e-3);
    CK(cudaFree(a));
    CK(cudaFree(b));
    int N = 8192;
    bf16 *A = drand((long)N * N, 1.f), *B = drand((long)N * N, 1.f), *C = dalloc_bf((long)N * N);
    auto t2 = time_fn([&] { cublas_nt(A, N, 0, B, N, 0, C, N, 0, N, N, N, 1); }, false);
    g_peak = 2.0 * N * (double)N * N / (t2.ms * 1e-3);
    CK(cudaFree(A));
    CK(cudaFree(B));
    CK(cudaFree(C));
}

// ------------------------------------------------------------------ configs
struct Cfg {
    const char* name;
    int m, n;
    int blast_bo, blast_bi, blast_r;
    int lr_r;
    int mon_b, mon_R;
};

struct Row {
    std::string config, format, strategy;
    int m, n, T;
    double params, ms, floor_ms, frac, speedup, rel;
    bool graph, ok;
};
static std::vector<Row> g_rows;
static bool g_check_only = false;
static int g_failures = 0;

static double rel_err(const bf16* dy, const float* dref, long n, long* nan_count) {
    std::vector<unsigned short> y(n);
    std::vector<float> ref(n);
    CK(cudaMemcpy(y.data(), dy, n * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(ref.data(), dref, n * 4, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    long nans = 0;
    for (long i = 0; i < n; ++i) {
        unsigned u = (unsigned)y[i] << 16;
        float v;
        memcpy(&v, &u, 4);
        if (!std::isfinite(v)) {
            ++nans;
            continue;
        }
        double d = (double)v - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    *nan_count = nans;
    return den > 0 ? std::sqrt(num / den) : (num > 0 ? 1e9 : 0);
}

static double g_dense_ms = 0;
static void run_row(const Cfg& c, int T, const char* fmt, const char* strat, double params, double flops,
                    bf16* y, const float* ref, const std::function<void()>& fn) {
    long ny = (long)T * c.m;
    k_fill_nan<<<std::min(nblk(ny), 4096), 256>>>(y, ny);
    LAUNCH_CHECK();
    fn();
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    long nans = 0;
    double rel = rel_err(y, ref, ny, &nans);
    bool ok = nans == 0 && rel < 2e-2;
    if (!ok) {
        ++g_failures;
        fprintf(stderr, "FAIL %s T=%d %s/%s rel=%.3e unwritten_or_nan=%ld\n", c.name, T, fmt, strat, rel, nans);
    }
    Row r{c.name, fmt, strat, c.m, c.n, T, params, 0, 0, 0, 0, rel, false, ok};
    double bytes = 2.0 * (params + (double)T * (c.m + c.n));
    r.floor_ms = std::max(bytes / g_bw, flops / g_peak) * 1e3;
    if (!g_check_only) {
        Timing t = time_fn(fn, T <= 16);
        r.ms = t.ms;
        r.graph = t.graph;
        r.frac = r.floor_ms / r.ms;
        if (!strcmp(fmt, "dense")) g_dense_ms = r.ms;
        r.speedup = g_dense_ms / r.ms;
    }
    printf("%-14s %5d %-8s %-15s %8.4f %8.4f %6.2f %6.2fx %9.2e %s%s\n", c.name, T, fmt, strat, r.ms, r.floor_ms,
           r.frac, r.speedup, rel, ok ? "ok" : "FAIL", r.graph ? " (graph)" : "");
    fflush(stdout);
    g_rows.push_back(r);
}

static int g_sms = 132;
// The decode kernel as the product launches it (crates/blr-cuda/src/layers/decode.rs): one block
// per SM, phase-2 rows staged in shared memory up to the opt-in limit; cooperative, or (pdl) an
// ordinary launch with programmatic stream serialization allowed.
static void launch_decode(const bf16* x, const bf16* w1, const bf16* s, const bf16* w2, bf16* y, bf16* wbuf,
                          unsigned* bar, int T, int n, int m, int mode, int nb1, int r1, int q1, int nb2, int p2,
                          int r2, bool pdl) {
    static int max_optin = -1;
    if (max_optin < 0) {
        CK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
        CK(cudaFuncSetAttribute(blr_decode, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    }
    int tasks2 = nb2 * ((p2 + 15) / 16);
    size_t zs_bytes = (size_t)std::max(nb1 * 128, 1024) * 4 + blr_dec::S_TASKS * 4096;
    size_t task_bytes = (size_t)16 * (r2 + 8) * 2;
    int grid = g_sms;
    int want = (tasks2 + grid - 1) / grid;
    int fit = (int)((max_optin - zs_bytes) / task_bytes);
    int smem_tasks = std::max(0, std::min(want, fit));
    int flags = 0;
    size_t smem = zs_bytes + smem_tasks * task_bytes;
    int occ = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, blr_decode, blr_dec::THREADS, smem));
    if (occ < 1) {
        fprintf(stderr, "decode does not fit: smem %zu\n", smem);
        exit(2);
    }
    cudaLaunchAttribute attr;
    if (pdl) {
        attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr.val.programmaticStreamSerializationAllowed = 1;
    } else {
        attr.id = cudaLaunchAttributeCooperative;
        attr.val.cooperative = 1;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(blr_dec::THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = cudaStreamPerThread;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    cudaError_t e = cudaLaunchKernelEx(&cfg, blr_decode, x, w1, s, w2, y, wbuf, bar, T, n, m, mode, nb1, r1, q1,
                                       nb2, p2, r2, smem_tasks, flags);
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(cudaStreamPerThread, &cs);
    if (e != cudaSuccess && cs != cudaStreamCaptureStatusNone) {
        g_capture_failed = true;  // not capturable here: time it directly
        cudaGetLastError();
        return;
    }
    CK(e);
}

// Phase timing of one decode launch after an L2 flush (builds with -DBLR_DEC_TIMING only).
static void decode_phase_report(const char* what, const std::function<void()>& fn) {
#ifdef BLR_DEC_TIMING
    unsigned long long init[8] = {~0ull, 0, 0, 0, 0, 0, 0, 0}, t[8];
    for (int rep = 0; rep < 2; ++rep) {
        CK(cudaMemcpyToSymbol(blr_dec_times, init, sizeof(init)));
        k_flush_read<<<1024, 512>>>(reinterpret_cast<const uint4*>(g_flush), FLUSH_BYTES / 16,
                                    reinterpret_cast<unsigned*>(g_flush));
        fn();
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpyFromSymbol(t, blr_dec_times, sizeof(t)));
    }
    printf("  phases %-22s phase1 %6.2f us | barrier %6.2f us | phase2 %6.2f us | total %6.2f us", what,
           (t[1] - t[0]) * 1e-3, (t[2] - t[1]) * 1e-3, (t[3] - t[2]) * 1e-3, (t[3] - t[0]) * 1e-3);
    if (t[4]) printf(" | p1 loads+mma %6.2f us", (t[4] - t[0]) * 1e-3);
    printf("\n");
#else
    (void)what;
    (void)fn;
#endif
}

static void run_config(const Cfg& c, const std::vector<int>& tokens) {
    const int m = c.m, n = c.n;
    int Tmax = *std::max_element(tokens.begin(), tokens.end());
    int ldzmax = (Tmax + 7) / 8 * 8;
    bf16* x = drand((long)Tmax * n, 1.f);
    bf16* y = dalloc_bf((long)Tmax * m);
    float* ref = dalloc_f((long)Tmax * m);
    // dense
    bf16* Wd = drand((long)m * n, 1.f / sqrtf((float)n));
    // BLAST factors (canonical layouts)
    const int bo = c.blast_bo, bi = c.blast_bi, r = c.blast_r, p = m / bo, q = n / bi;
    bf16* U = drand((long)bo * p * r, 1.f / sqrtf((float)r));
    bf16* Vt = drand((long)bi * r * q, 1.f / sqrtf((float)q));
    bf16* S = drand((long)bo * bi * r, 1.f);
    bf16* Sd = dalloc_bf((long)r * 256);
    k_pack_s<<<nblk((long)r * 256), 256>>>(S, Sd, bo, bi, r);
    LAUNCH_CHECK();
    long zel = (long)bi * r * ldzmax, wel = (long)bo * r * Tmax;
    bf16* Zb = dalloc_bf_nan(std::max(zel, (long)bi * Tmax * r));
    bf16* Wb = dalloc_bf(wel);
    // LR
    const int lr = c.lr_r;
    bf16* LU = drand((long)m * lr, 1.f / sqrtf((float)lr));
    bf16* LV = drand((long)lr * n, 1.f / sqrtf((float)n));
    bf16* LZ = dalloc_bf_nan((long)Tmax * lr);
    // Monarch
    const int mb = c.mon_b, R = c.mon_R, nbk = n / mb, mbk = m / mb;
    bf16* M1 = drand((long)mb * R * nbk, 1.f / sqrtf((float)nbk));
    bf16* M2 = drand((long)mb * mbk * R, 1.f / sqrtf((float)R));
    bf16* MO1 = dalloc_bf_nan((long)Tmax * mb * R);
    bf16* MP = dalloc_bf((long)Tmax * mb * R);
    bf16* MO2 = dalloc_bf_nan((long)Tmax * m);
    // decode scratch
    int wrows = std::max(std::max(r, lr), R);
    bf16* dwbuf = dalloc_bf((long)std::max(bo, mb) * 16 * wrows);
    unsigned* bar;
    CK(cudaMalloc(&bar, 64));
    CK(cudaMemset(bar, 0, 64));
    // fp32 scratch for references
    long fz = (long)Tmax * std::max((long)bi * r, std::max((long)lr, (long)mb * R));
    float* fz1 = dalloc_f(fz);
    float* fz2 = dalloc_f(std::max(fz, (long)Tmax * bo * r));
    float* fz3 = dalloc_f((long)Tmax * m);

    for (int T : tokens) {
        const int ldz = (T + 7) / 8 * 8;
        // dense
        k_ref_rowdot_bf<<<nblk((long)T * m), 256>>>(x, n, Wd, ref, m, T, m, n, m, 0);
        LAUNCH_CHECK();
        run_row(c, T, "dense", "cublas", (double)m * n, 2.0 * T * m * n, y, ref,
                [&] { cublas_nt(x, n, 0, Wd, n, 0, y, m, 0, T, m, n, 1); });

        // BLAST reference: z (T, bi, r), w (T, bo, r), y
        k_ref_rowdot_bf<<<nblk((long)T * bi * r), 256>>>(x, n, Vt, fz1, (long)bi * r, T, bi * r, q, r, q);
        k_ref_mix<<<nblk((long)T * bo * r), 256>>>(fz1, S, fz2, T, bi, bo, r);
        k_ref_rowdot_f<<<nblk((long)T * m), 256>>>(fz2, (long)bo * r, U, ref, m, T, m, r, p, r);
        LAUNCH_CHECK();
        double bparams = (double)r * (m + n + bo * bi), bflops = 2.0 * T * r * (m + n + bo * bi);
        run_row(c, T, "blast", "unfused", bparams, bflops, y, ref, [&] {
            cublas_nt(x, n, q, Vt, q, (long)r * q, Zb, r, (long)T * r, T, r, q, bi);
            blr_blast_mix_naive<<<nblk((long)T * r), 256>>>(Zb, Sd, Wb, T, r, bi, bo);
            cublas_nt(Wb, r, (long)T * r, U, r, (long)p * r, y, m, p, T, p, r, bo);
        });
        auto mix_tc = [&] {
            dim3 grid((T + blr_mix::BT - 1) / blr_mix::BT, (r + blr_mix::BKR - 1) / blr_mix::BKR);
            blr_blast_mix_tc<<<grid, 128, blr_mix::JP * blr_mix::PLANE * 2>>>(Zb, Sd, Wb, T, ldz, r, bi, bo);
        };
        auto mix_tc2 = [&] {
            dim3 grid((T + blr_mix2::BT - 1) / blr_mix2::BT, (r + blr_mix2::BKR - 1) / blr_mix2::BKR);
            blr_blast_mix_tc2<<<grid, 256, blr_mix2::SMEM_BYTES>>>(Zb, Sd, Wb, T, ldz, r, bi, bo);
        };
        run_row(c, T, "blast", "partial-cublas-v1", bparams, bflops, y, ref, [&] {
            cublas_nt(Vt, q, (long)r * q, x, n, q, Zb, ldz, (long)r * ldz, r, T, q, bi);
            mix_tc();
            cublas_nt(Wb, r, (long)T * r, U, r, (long)p * r, y, m, p, T, p, r, bo);
        });
        run_row(c, T, "blast", "partial-cublas", bparams, bflops, y, ref, [&] {
            cublas_nt(Vt, q, (long)r * q, x, n, q, Zb, ldz, (long)r * ldz, r, T, q, bi);
            mix_tc2();
            cublas_nt(Wb, r, (long)T * r, U, r, (long)p * r, y, m, p, T, p, r, bo);
        });
        run_row(c, T, "blast", "partial-cublas-v3", bparams, bflops, y, ref, [&] {
            cublas_nt(Vt, q, (long)r * q, x, n, q, Zb, ldz, (long)r * ldz, r, T, q, bi);
            dim3 grid((T + 31) / 32, (r + 31) / 32);
            blr_blast_mix_tc3<<<grid, 256, Mix2Cfg<32>::SMEM_BYTES>>>(Zb, Sd, Wb, T, ldz, r, bi, bo);
            cublas_nt(Wb, r, (long)T * r, U, r, (long)p * r, y, m, p, T, p, r, bo);
        });
        run_row(c, T, "blast", "partial-own", bparams, bflops, y, ref, [&] {
            own_nt(Vt, q, (long)r * q, x, n, q, Zb, ldz, (long)r * ldz, r, T, q, bi);
            mix_tc2();
            own_nt(Wb, r, (long)T * r, U, r, (long)p * r, y, m, p, T, p, r, bo);
        });
        if (T <= 16) {
            auto f = [&] { launch_decode(x, Vt, Sd, U, y, dwbuf, bar, T, n, m, 0, bi, r, q, bo, p, r, false); };
            run_row(c, T, "blast", "decode", bparams, bflops, y, ref, f);
            decode_phase_report("blast", f);
            run_row(c, T, "blast", "decode-pdl", bparams, bflops, y, ref, [&] {
                launch_decode(x, Vt, Sd, U, y, dwbuf, bar, T, n, m, 0, bi, r, q, bo, p, r, true);
            });
        }

        // LR
        k_ref_rowdot_bf<<<nblk((long)T * lr), 256>>>(x, n, LV, fz1, lr, T, lr, n, lr, 0);
        k_ref_rowdot_f<<<nblk((long)T * m), 256>>>(fz1, lr, LU, ref, m, T, m, lr, m, 0);
        LAUNCH_CHECK();
        double lparams = (double)lr * (m + n), lflops = 2.0 * T * lr * (m + n);
        run_row(c, T, "lowrank", "unfused", lparams, lflops, y, ref, [&] {
            cublas_nt(x, n, 0, LV, n, 0, LZ, lr, 0, T, lr, n, 1);
            cublas_nt(LZ, lr, 0, LU, lr, 0, y, m, 0, T, m, lr, 1);
        });
        run_row(c, T, "lowrank", "partial-own", lparams, lflops, y, ref, [&] {
            own_nt(x, n, 0, LV, n, 0, LZ, lr, 0, T, lr, n, 1);
            own_nt(LZ, lr, 0, LU, lr, 0, y, m, 0, T, m, lr, 1);
        });
        if (T <= 16) {
            auto f = [&] { launch_decode(x, LV, nullptr, LU, y, dwbuf, bar, T, n, m, 1, 1, lr, n, 1, m, lr, false); };
            run_row(c, T, "lowrank", "decode", lparams, lflops, y, ref, f);
            decode_phase_report("lowrank", f);
        }

        // Monarch reference: out1 flat (T, b*R); P (T, b, R); out2 (T, b, m/b); y
        k_ref_rowdot_bf<<<nblk((long)T * mb * R), 256>>>(x, n, M1, fz1, (long)mb * R, T, mb * R, nbk, R, nbk);
        k_ref_perm<<<nblk((long)T * mb * R), 256>>>(fz1, fz2, T, mb, R);
        k_ref_rowdot_f<<<nblk((long)T * m), 256>>>(fz2, (long)mb * R, M2, fz3, m, T, m, R, mbk, R);
        k_ref_perm_out<<<nblk((long)T * m), 256>>>(fz3, ref, T, mb, mbk);
        LAUNCH_CHECK();
        double mparams = (double)R * (m + n), mflops = 2.0 * T * R * (m + n);
        run_row(c, T, "monarch", "unfused", mparams, mflops, y, ref, [&] {
            cublas_nt(x, n, nbk, M1, nbk, (long)R * nbk, MO1, (long)mb * R, R, T, R, nbk, mb);
            blr_monarch_perm_mid<<<nblk((long)T * mb * R), 256>>>(MO1, MP, T, mb, R);
            cublas_nt(MP, (long)mb * R, R, M2, R, (long)mbk * R, MO2, m, mbk, T, mbk, R, mb);
            blr_monarch_perm_out<<<nblk((long)T * m), 256>>>(MO2, y, T, mb, mbk);
        });
        run_row(c, T, "monarch", "unfused-tiled", mparams, mflops, y, ref, [&] {
            cublas_nt(x, n, nbk, M1, nbk, (long)R * nbk, MO1, (long)mb * R, R, T, R, nbk, mb);
            dim3 g1((mb + 31) / 32, (R + 31) / 32, std::min(T, 65535));
            blr_batched_transpose<<<g1, dim3(32, 8)>>>(MO1, MP, T, R, mb);
            cublas_nt(MP, (long)mb * R, R, M2, R, (long)mbk * R, MO2, m, mbk, T, mbk, R, mb);
            dim3 g2((mbk + 31) / 32, (mb + 31) / 32, std::min(T, 65535));
            blr_batched_transpose<<<g2, dim3(32, 8)>>>(MO2, y, T, mb, mbk);
        });
        if (T <= 16) {
            run_row(c, T, "monarch", "decode", mparams, mflops, y, ref, [&] {
                launch_decode(x, M1, nullptr, M2, y, dwbuf, bar, T, n, m, 2, mb, R, nbk, mb, mbk, R, false);
            });
        }
    }
    void* ptrs[] = {x, y, ref, Wd, U, Vt, S, Sd, Zb, Wb, LU, LV, LZ, M1, M2, MO1, MP, MO2, dwbuf, bar, fz1, fz2, fz3};
    for (void* q2 : ptrs) CK(cudaFree(q2));
}

int main(int argc, char** argv) {
    bool small = false, tiny = false;
    std::string only;
    std::vector<int> tok_override;
    const char* json = nullptr;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--check-only")) g_check_only = true;
        else if (!strcmp(argv[i], "--small")) small = true;
        else if (!strcmp(argv[i], "--tiny")) small = tiny = true;
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) g_iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            for (char* tk = strtok(argv[++i], ","); tk; tk = strtok(nullptr, ",")) tok_override.push_back(atoi(tk));
        }
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    g_sms = prop.multiProcessorCount;
    CB(cublasCreate(&g_cublas));
    CB(cublasSetStream(g_cublas, cudaStreamPerThread));
    CK(cudaFuncSetAttribute(blr_gemm_nt_128x128, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            blr_gemm::Cfg<128, 128>::SMEM_BYTES));
    CK(cudaFuncSetAttribute(blr_gemm_nt_128x256, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            blr_gemm::Cfg<128, 256>::SMEM_BYTES));
    CK(cudaFuncSetAttribute(blr_blast_mix_tc, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            blr_mix::JP * blr_mix::PLANE * 2));
    CK(cudaFuncSetAttribute(blr_blast_mix_tc2, cudaFuncAttributeMaxDynamicSharedMemorySize, blr_mix2::SMEM_BYTES));
    CK(cudaFuncSetAttribute(blr_blast_mix_tc3, cudaFuncAttributeMaxDynamicSharedMemorySize, Mix2Cfg<32>::SMEM_BYTES));
    CK(cudaMalloc(&g_flush, FLUSH_BYTES));
    CK(cudaMemset(g_flush, 0, FLUSH_BYTES));
    if (!g_check_only) measure_ceilings();
    printf("device %s, %d SMs, L2 %d MB | copy BW %.2f TB/s | cuBLAS bf16 %.0f TFLOP/s\n", prop.name, g_sms,
           prop.l2CacheSize >> 20, g_bw / 1e12, g_peak / 1e12);
    if (g_check_only) {
        g_bw = 3e12;
        g_peak = 7e14;
    }
    printf("%-14s %5s %-8s %-15s %8s %8s %6s %7s %9s\n", "config", "T", "format", "strategy", "ms", "floor", "frac",
           "vsdense", "rel_err");
    // name, m, n, blast b_out, b_in, r, lr r, monarch b, R
    std::vector<Cfg> cfgs_small = {
        {"odd", 672, 640, 12, 16, 72, 72, 8, 72},
        {"gpt2s-fc", 3072, 768, 6, 6, 192, 192, 4, 192},
    };
    std::vector<Cfg> cfgs_big = {
        {"llama7b-qkvo", 4096, 4096, 16, 16, 1024, 1024, 16, 1024},
        {"llama7b-up", 11008, 4096, 16, 16, 1488, 1488, 16, 1536},
        {"llama7b-down", 4096, 11008, 16, 16, 1488, 1488, 16, 1536},
        {"llama3.2-1b-q", 2048, 2048, 16, 16, 256, 256, 16, 256},
    };
    auto pick = [&](const Cfg& c, std::vector<int> toks) {
        if (!only.empty() && only != c.name) return;
        run_config(c, tok_override.empty() ? toks : tok_override);
    };
    if (tiny)
        pick(cfgs_small[0], {1, 5, 77});
    else
        for (auto& c : cfgs_small) pick(c, {1, 5, 16, 77, 300});
    if (!small)
        for (auto& c : cfgs_big) pick(c, {1, 16, 128, 1024});
    if (json) {
        FILE* f = fopen(json, "w");
        if (f) {
            fprintf(f, "[\n");
            for (size_t i = 0; i < g_rows.size(); ++i) {
                auto& r = g_rows[i];
                fprintf(f,
                        "{\"device\":\"%s\",\"config\":\"%s\",\"m\":%d,\"n\":%d,\"tokens\":%d,\"format\":\"%s\","
                        "\"strategy\":\"%s\",\"params\":%.0f,\"ms\":%.5f,\"floor_ms\":%.5f,\"roofline_frac\":%.4f,"
                        "\"speedup_vs_dense\":%.3f,\"rel_error\":%.3e,\"graph\":%s}%s\n",
                        prop.name, r.config.c_str(), r.m, r.n, r.T, r.format.c_str(), r.strategy.c_str(), r.params,
                        r.ms, r.floor_ms, r.frac, r.speedup, r.rel, r.graph ? "true" : "false",
                        i + 1 < g_rows.size() ? "," : "");
            }
            fprintf(f, "]\n");
            fclose(f);
        }
    }
    printf("%d passed, %d failed\n", (int)g_rows.size() - g_failures, g_failures);
    return g_failures ? 1 : 0;
}
