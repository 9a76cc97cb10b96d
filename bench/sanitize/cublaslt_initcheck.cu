// Minimal reproduction for the compute-sanitizer initcheck findings that involve cuBLAS(Lt)
// (issue 8.3, docs/reliability.md). It makes the same cuBLASLt calls as blr's `Blas::gemm`
// (crates/blr-cuda/src/gemm.rs: column-major views A = W, B = X^T, D = Y^T, bf16 in and out,
// fp32 compute, heuristic #0 under the operand alignments blr passes) on buffers whose every
// byte we initialise ourselves, and checks each result against a CPU reference, so that what
// initcheck reports can be attributed:
//
//   write  GEMM into a fresh Y that nothing wrote before, then (a) a kernel of ours reads all of
//          Y, (b) Y is copied to the host. The values equal the CPU reference, so every element
//          was written by the GEMM; a report here means initcheck did not see the library's
//          stores. With --y-init the same after a cudaMemset of Y: no report expected.
//   odd    the self-test case "T=37 m=203 n=515, odd offsets" (operands at element offsets
//          3/1/5, 2-byte aligned, so cuBLASLt picks an align1 kernel), every buffer (X, W, Y
//          and, with --ws-init, the workspace) memset and then filled by us before the call. A
//          report inside the library's kernel then reads memory we never handed it
//          uninitialised: it is the library's own (workspace, when --ws-init is off).
//   legacy the bench/kernels harness's path: cublasGemmStridedBatchedEx into a fresh Z, then a
//          kernel of ours reads Z (like blr_blast_mix_naive).
//   selftest  every cuBLASLt case of `blr doctor --self-test`, allocated and run as blr does
//          (see `selftest` below); a report here is inside the library, on operands we wrote.
//
// Build and run on the GPU machine (scripts/sanitize.sh does both):
//   nvcc -std=c++17 -O2 -arch=sm_90a bench/sanitize/cublaslt_initcheck.cu -o /tmp/lt_repro -lcublasLt -lcublas
//   compute-sanitizer --tool initcheck /tmp/lt_repro write [--y-init]
//   compute-sanitizer --tool initcheck /tmp/lt_repro odd [--ws-init]
//   compute-sanitizer --tool initcheck /tmp/lt_repro legacy [--y-init]
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x)                                                                                   \
    do {                                                                                        \
        cudaError_t e_ = (x);                                                                   \
        if (e_ != cudaSuccess) {                                                                \
            fprintf(stderr, "CUDA error %s at line %d: %s\n", cudaGetErrorString(e_), __LINE__, \
                    #x);                                                                        \
            exit(2);                                                                            \
        }                                                                                       \
    } while (0)
#define CL(x)                                                                            \
    do {                                                                                 \
        cublasStatus_t s_ = (x);                                                         \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                               \
            fprintf(stderr, "cuBLAS status %d at line %d: %s\n", (int)s_, __LINE__, #x); \
            exit(2);                                                                     \
        }                                                                                \
    } while (0)

// Reads every element of p and accumulates them (so the loads cannot be optimised away).
__global__ void read_all(const __nv_bfloat16* p, long n, float* sum) {
    float acc = 0.f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        acc += __bfloat162float(p[i]);
    atomicAdd(sum, acc);
}

static std::vector<float> host_rand(size_t n, uint32_t seed) {
    std::vector<float> v(n);
    uint32_t s = seed * 2654435761u + 1;
    for (auto& x : v) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        // Round to bf16 so the CPU reference sees exactly what the GPU reads.
        x = __bfloat162float(__float2bfloat16(((s >> 8) * (1.0f / 16777216.0f)) * 2.f - 1.f));
    }
    return v;
}

static __nv_bfloat16* upload(const std::vector<float>& h) {
    std::vector<__nv_bfloat16> b(h.size());
    for (size_t i = 0; i < h.size(); ++i) b[i] = __float2bfloat16(h[i]);
    __nv_bfloat16* d;
    CK(cudaMalloc(&d, b.size() * 2));
    CK(cudaMemset(d, 0, b.size() * 2));
    CK(cudaMemcpy(d, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    return d;
}

static void range(const char* what, const void* p, size_t bytes) {
    printf("  buffer %-10s [%p, %p) %zu bytes\n", what, p, (const char*)p + bytes, bytes);
}

// Y (T, m) = X (T, n) W^T, W (m, n) row-major, operands at element offsets (ox, ow, oy).
// Returns the relative error against the CPU (f64) reference.
static double lt_gemm(cublasLtHandle_t lt, int T, int m, int n, int ox, int ow, int oy, bool y_init, bool ws_init,
                      bool read_back_by_kernel) {
    auto xh = host_rand((size_t)ox + (size_t)T * n, 1);
    auto wh = host_rand((size_t)ow + (size_t)m * n, 2);
    __nv_bfloat16* x = upload(xh);
    __nv_bfloat16* w = upload(wh);
    size_t ylen = (size_t)oy + (size_t)T * m;
    __nv_bfloat16* y;
    CK(cudaMalloc(&y, ylen * 2));
    if (y_init) CK(cudaMemset(y, 0xFF, ylen * 2));  // NaN: every element must be overwritten
    size_t ws_bytes = 32u << 20;
    void* ws;
    CK(cudaMalloc(&ws, ws_bytes));
    if (ws_init) CK(cudaMemset(ws, 0, ws_bytes));
    range("X", x, ((size_t)ox + (size_t)T * n) * 2);
    range("W", w, ((size_t)ow + (size_t)m * n) * 2);
    range("Y", y, ylen * 2);
    range("workspace", ws, ws_bytes);

    cublasLtMatmulDesc_t desc;
    CL(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    int ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CL(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CL(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cublasLtMatrixLayout_t a, b, c;
    CL(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, n, m, n));  // stored W, (m, n) row-major
    CL(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, n, T, n));  // X^T
    CL(cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, m, T, m));  // Y^T
    cublasLtMatmulPreference_t pref;
    CL(cublasLtMatmulPreferenceCreate(&pref));
    CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                            sizeof ws_bytes));
    auto align = [](const void* p) {
        uint32_t a = 256;
        while (a > 1 && ((uintptr_t)p % a)) a /= 2;
        return a;
    };
    uint32_t al[3] = {align(w + ow), align(x + ox), align(y + oy)};
    CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], 4));
    CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], 4));
    CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], 4));
    CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[2], 4));
    cublasLtMatmulHeuristicResult_t h;
    int got = 0;
    CL(cublasLtMatmulAlgoGetHeuristic(lt, desc, a, b, c, c, pref, 1, &h, &got));
    if (got < 1) {
        fprintf(stderr, "no algorithm\n");
        exit(2);
    }
    printf("  alignments A/B/D %u/%u/%u bytes, algorithm workspace %zu bytes\n", al[0], al[1], al[2],
           h.workspaceSize);
    float alpha = 1.f, beta = 0.f;
    CL(cublasLtMatmul(lt, desc, &alpha, w + ow, a, x + ox, b, &beta, y + oy, c, y + oy, c, &h.algo, ws,
                      h.workspaceSize, 0));
    CK(cudaDeviceSynchronize());
    if (read_back_by_kernel) {
        float* sum;
        CK(cudaMalloc(&sum, 4));
        CK(cudaMemset(sum, 0, 4));
        read_all<<<8, 256>>>(y + oy, (long)T * m, sum);
        CK(cudaDeviceSynchronize());
        CK(cudaFree(sum));
    }
    std::vector<__nv_bfloat16> yb((size_t)T * m);
    CK(cudaMemcpy(yb.data(), y + oy, yb.size() * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < m; ++i) {
            double ref = 0;
            for (int k = 0; k < n; ++k) ref += (double)xh[ox + (size_t)t * n + k] * wh[ow + (size_t)i * n + k];
            double g = __bfloat162float(yb[(size_t)t * m + i]);
            if (!std::isfinite(g)) return INFINITY;
            num += (g - ref) * (g - ref);
            den += ref * ref;
        }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(c);
    cublasLtMatmulDescDestroy(desc);
    CK(cudaFree(x));
    CK(cudaFree(w));
    CK(cudaFree(y));
    CK(cudaFree(ws));
    return std::sqrt(num / den);
}

// The harness's stage 1: Z_j (T, r) = X_j V_j^T through cublasGemmStridedBatchedEx, then a
// kernel of ours reads all of Z.
static double legacy(bool z_init) {
    const int T = 1, b = 3, q = 40, r = 24;
    auto xh = host_rand((size_t)T * b * q, 3);
    auto vh = host_rand((size_t)b * r * q, 4);
    __nv_bfloat16* x = upload(xh);
    __nv_bfloat16* v = upload(vh);
    __nv_bfloat16* z;
    size_t zlen = (size_t)b * T * r;
    CK(cudaMalloc(&z, zlen * 2));
    if (z_init) CK(cudaMemset(z, 0xFF, zlen * 2));
    range("Z", z, zlen * 2);
    cublasHandle_t h;
    CL(cublasCreate(&h));
    float alpha = 1.f, beta = 0.f;
    // Row-major Z_j (T, r) = X_j (T, q) V_j^T, V_j (r, q): column-major Z^T = V X^T.
    CL(cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, r, T, q, &alpha, v, CUDA_R_16BF, q, (long)r * q, x,
                                  CUDA_R_16BF, b * q, q, &beta, z, CUDA_R_16BF, r, (long)T * r, b, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
    float* sum;
    CK(cudaMalloc(&sum, 4));
    CK(cudaMemset(sum, 0, 4));
    read_all<<<4, 128>>>(z, (long)zlen, sum);
    CK(cudaDeviceSynchronize());
    std::vector<__nv_bfloat16> zb(zlen);
    CK(cudaMemcpy(zb.data(), z, zlen * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (int j = 0; j < b; ++j)
        for (int t = 0; t < T; ++t)
            for (int k = 0; k < r; ++k) {
                double ref = 0;
                for (int e = 0; e < q; ++e) ref += (double)xh[(size_t)t * b * q + j * q + e] * vh[((size_t)j * r + k) * q + e];
                double g = __bfloat162float(zb[((size_t)j * T + t) * r + k]);
                if (!std::isfinite(g)) return INFINITY;
                num += (g - ref) * (g - ref);
                den += ref * ref;
            }
    cublasDestroy(h);
    CK(cudaFree(sum));
    CK(cudaFree(x));
    CK(cudaFree(v));
    CK(cudaFree(z));
    return std::sqrt(num / den);
}

// ---- `selftest`: every cuBLASLt case of `blr doctor --self-test` (crates/blr-cuda/src/selftest.rs
// gemm_cases, odd element offsets 3/1/5 on every other case), run the way blr runs them: buffers
// from the stream-ordered pool (freed blocks kept in it), every operand byte written by us
// (X, W uploaded; Y memset), one 32 MiB workspace (memset with --ws-init) made after the first
// case's operands, heuristic #0 under the alignments blr computes.
struct Case {
    const char* name;
    int rows, cols, inner;
    bool out_in;  // W stored (cols, inner) and Y = X W^T; else W (inner, cols), Y = X W
    int batch;
    long ld_x, ld_w, ld_y, stride_x, stride_w, stride_y;
};

static Case linear(const char* name, int t, int m, int n) {
    return Case{name, t, m, n, true, 1, n, n, m, (long)t * n, (long)m * n, (long)t * m};
}

static long extent(int batch, long stride, long rows, long ld, long width) {
    return (batch - 1) * stride + (rows - 1) * ld + width;
}

static uint32_t align_of(uint64_t a) {
    if (!a) return 256;
    uint32_t r = 1;
    while (r < 256 && !(a & r)) r <<= 1;
    return r;
}

static int selftest(bool ws_init) {
    std::vector<Case> cases = {
        linear("T=1 m=97 n=131", 1, 97, 131),
        linear("T=37 m=203 n=515", 37, 203, 515),
        linear("T=129 m=64 n=1000", 129, 64, 1000),
        Case{"X W, W (n,m): T=33 m=45 n=71", 33, 45, 71, false, 1, 71, 45, 45, 33 * 71, 45 * 71, 33 * 45},
        Case{"batched 3x T=17 m=45 n=33", 17, 45, 33, true, 3, 33, 33, 45, 17 * 33, 45 * 33, 17 * 45},
        Case{"batched 5x shared W T=9 m=31 n=40", 9, 31, 40, true, 5, 40, 40, 31, 9 * 40, 0, 9 * 31},
        Case{"BLAST stage 1 b=6 q=40 r=24 T=23", 23, 24, 40, true, 6, 240, 40, 24, 40, 24 * 40, 23 * 24},
    };
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    cudaMemPool_t pool;
    CK(cudaDeviceGetDefaultMemPool(&pool, 0));
    uint64_t keep = ~0ull;
    CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    cublasLtHandle_t lt;
    CL(cublasLtCreate(&lt));
    void* ws = nullptr;
    const size_t ws_bytes = 32u << 20;
    int failures = 0;
    for (size_t ci = 0; ci < cases.size(); ++ci) {
        const Case& c = cases[ci];
        const bool odd = ci % 2 == 1;
        const long ox = odd ? 3 : 0, ow = odd ? 1 : 0, oy = odd ? 5 : 0;
        const long w_rows = c.out_in ? c.cols : c.inner, w_cols = c.out_in ? c.inner : c.cols;
        const long nx = ox + extent(c.batch, c.stride_x, c.rows, c.ld_x, c.inner);
        const long nw = ow + extent(c.batch, c.stride_w, w_rows, c.ld_w, w_cols);
        const long ny = oy + extent(c.batch, c.stride_y, c.rows, c.ld_y, c.cols);
        auto xh = host_rand(nx, 10 + ci), wh = host_rand(nw, 20 + ci);
        std::vector<__nv_bfloat16> xb(nx), wb(nw);
        for (long i = 0; i < nx; ++i) xb[i] = __float2bfloat16(xh[i]);
        for (long i = 0; i < nw; ++i) wb[i] = __float2bfloat16(wh[i]);
        __nv_bfloat16 *x, *w, *y;
        CK(cudaMallocAsync((void**)&x, nx * 2, st));
        CK(cudaMallocAsync((void**)&w, nw * 2, st));
        CK(cudaMallocAsync((void**)&y, ny * 2, st));
        CK(cudaMemcpyAsync(x, xb.data(), nx * 2, cudaMemcpyHostToDevice, st));
        CK(cudaMemcpyAsync(w, wb.data(), nw * 2, cudaMemcpyHostToDevice, st));
        CK(cudaMemsetAsync(y, 0xFF, ny * 2, st));
        if (!ws) {
            CK(cudaMallocAsync(&ws, ws_bytes, st));
            if (ws_init) CK(cudaMemsetAsync(ws, 0, ws_bytes, st));
            range("workspace", ws, ws_bytes);
        }
        printf("case %zu %s%s\n", ci, c.name, odd ? ", odd offsets" : "");
        range("X", x, nx * 2);
        range("W", w, nw * 2);
        range("Y", y, ny * 2);
        cublasLtMatmulDesc_t desc;
        CL(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        int ta = c.out_in ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
        CL(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
        CL(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
        auto layout = [&](long r, long cc, long ld, long stride) {
            cublasLtMatrixLayout_t l;
            CL(cublasLtMatrixLayoutCreate(&l, CUDA_R_16BF, r, cc, ld));
            if (c.batch > 1) {
                int32_t n = c.batch;
                int64_t s64 = stride;
                CL(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &n, sizeof n));
                CL(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &s64, sizeof s64));
            }
            return l;
        };
        cublasLtMatrixLayout_t la = layout(w_cols, w_rows, c.ld_w, c.stride_w);
        cublasLtMatrixLayout_t lb = layout(c.inner, c.rows, c.ld_x, c.stride_x);
        cublasLtMatrixLayout_t lc = layout(c.cols, c.rows, c.ld_y, c.stride_y);
        auto sb = [&](long stride) { return c.batch > 1 ? (uint64_t)stride * 2 : 0ull; };
        uint32_t al[3] = {align_of((uint64_t)(w + ow) | sb(c.stride_w) | (uint64_t)c.ld_w * 2),
                          align_of((uint64_t)(x + ox) | sb(c.stride_x) | (uint64_t)c.ld_x * 2),
                          align_of((uint64_t)(y + oy) | sb(c.stride_y) | (uint64_t)c.ld_y * 2)};
        cublasLtMatmulPreference_t pref;
        CL(cublasLtMatmulPreferenceCreate(&pref));
        CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                sizeof ws_bytes));
        CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], 4));
        CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], 4));
        CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], 4));
        CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[2], 4));
        cublasLtMatmulHeuristicResult_t h;
        int got = 0;
        CL(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &h, &got));
        if (got < 1) {
            printf("  no algorithm\n");
            ++failures;
            continue;
        }
        printf("  alignments A/B/D %u/%u/%u, workspace %zu\n", al[0], al[1], al[2], h.workspaceSize);
        float alpha = 1.f, beta = 0.f;
        CL(cublasLtMatmul(lt, desc, &alpha, w + ow, la, x + ox, lb, &beta, y + oy, lc, y + oy, lc, &h.algo, ws,
                          h.workspaceSize, st));
        std::vector<__nv_bfloat16> yb(ny);
        CK(cudaMemcpyAsync(yb.data(), y, ny * 2, cudaMemcpyDeviceToHost, st));
        CK(cudaStreamSynchronize(st));
        double num = 0, den = 0;
        for (int b = 0; b < c.batch; ++b)
            for (int t = 0; t < c.rows; ++t)
                for (int i = 0; i < c.cols; ++i) {
                    double ref = 0;
                    for (int k = 0; k < c.inner; ++k) {
                        double xv = xh[ox + b * c.stride_x + t * c.ld_x + k];
                        double wv = c.out_in ? wh[ow + b * c.stride_w + (long)i * c.ld_w + k]
                                             : wh[ow + b * c.stride_w + (long)k * c.ld_w + i];
                        ref += xv * wv;
                    }
                    double g = __bfloat162float(yb[oy + b * c.stride_y + t * c.ld_y + i]);
                    num += (g - ref) * (g - ref);
                    den += ref * ref;
                }
        double err = std::sqrt(num / den);
        bool ok = std::isfinite(err) && err < 1e-2;
        failures += !ok;
        printf("  rel err %.2e %s\n", err, ok ? "ok" : "FAIL");
        cublasLtMatmulPreferenceDestroy(pref);
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatmulDescDestroy(desc);
        CK(cudaFreeAsync(x, st));
        CK(cudaFreeAsync(w, st));
        CK(cudaFreeAsync(y, st));
    }
    CK(cudaStreamSynchronize(st));
    cublasLtDestroy(lt);
    printf("  selftest cases: %d failed; result vs CPU reference: rel err %s\n", failures,
           failures ? "1.0e+00 FAIL" : "0.00e+00 ok");
    return failures ? 1 : 0;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s write|odd|legacy|selftest [--y-init] [--ws-init]\n", argv[0]);
        return 2;
    }
    bool y_init = false, ws_init = false;
    for (int i = 2; i < argc; ++i) {
        if (!strcmp(argv[i], "--y-init")) y_init = true;
        else if (!strcmp(argv[i], "--ws-init")) ws_init = true;
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!strcmp(argv[1], "selftest")) return selftest(ws_init);
    cublasLtHandle_t lt;
    CL(cublasLtCreate(&lt));
    double err;
    if (!strcmp(argv[1], "write")) {
        // The parity suite's dense linear, T=13 m=40 n=24 (the 1,040-byte downloads).
        printf("write: Y (13, 40) = X (13, 24) W^T into a %s Y\n", y_init ? "memset" : "fresh");
        err = lt_gemm(lt, 13, 40, 24, 0, 0, 0, y_init, true, true);
    } else if (!strcmp(argv[1], "odd")) {
        printf("odd: T=37 m=203 n=515 at offsets 3/1/5, X/W/Y initialised, workspace %s\n",
               ws_init ? "memset" : "not initialised");
        err = lt_gemm(lt, 37, 203, 515, 3, 1, 5, true, ws_init, false);
    } else if (!strcmp(argv[1], "legacy")) {
        printf("legacy: cublasGemmStridedBatchedEx into a %s Z, read by our kernel\n", y_init ? "memset" : "fresh");
        err = legacy(y_init);
    } else {
        fprintf(stderr, "unknown case %s\n", argv[1]);
        return 2;
    }
    cublasLtDestroy(lt);
    bool ok = std::isfinite(err) && err < 1e-2;
    printf("  result vs CPU reference: rel err %.2e %s\n", err, ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}
