// Batched "NT" tensor-core GEMM: C[z] (M x N) = A[z] (M x K) * B[z] (N x K)^T, bf16 in, fp32
// accumulate, bf16 out, all row-major with K contiguous in both operands.
//
// Why NT: y = x W^T with x (T, n) and W (m, n) row-major is exactly this shape, and so is every
// block stage of the BLR formats once the factors are stored K-contiguous (BLAST V^T (b_in, r, q),
// U (b_out, p, r); LR V (r, n), U (m, r); Monarch w1 (b, R, n/b), w2 (b, m/b, R)). Both operands
// are then fed with ldmatrix (non-transposed), and a block stage becomes one launch with
// blockIdx.z = block index and plain batch strides (no copies, no permutes).
//
// Tiles: BM x BN x 32 per block, 8 warps as 2 (M) x 4 (N); 4-stage cp.async pipeline.
//   blr_gemm_nt_128x128: warp tile 64x32, smem 64 KiB, acc 64 fp32/thread.
//   blr_gemm_nt_128x256: warp tile 64x64, smem 96 KiB, acc 128 fp32/thread.
// Why 64x64 warp tiles: on H100 one ldmatrix.x4 (512 B) costs 4 clk of the SM's 128 B/clk
// shared-memory port while an m16n8k16 costs ~1.5 clk of mma.sync issue; a 64x32 warp tile needs
// 6 ldmatrix per 16 mma (smem-bound), 64x64 needs 8 per 32 (tensor-bound).
// Shared layout: 64-byte rows (32 bf16), 16-byte chunk c of row r stored at chunk c ^ ((r>>1)&3):
// the 8 rows of one ldmatrix phase then hit 8 distinct 16-byte bank groups.
// Edges: rows/cols beyond M/N and K beyond K are zero-filled by cp.async (src-size 0), stores
// are guarded. Requirements (checked by the launcher): K, lda, ldb, ldc multiples of 8 and
// 16-byte aligned base pointers.
// Bytes per output element: K*2*(1/BN + 1/BM) from L2 (128x256: K*0.023 B), roofline = tensor.
#include "common.cuh"

namespace blr_gemm {

constexpr int BK = 32;
constexpr int STAGES = 4;
constexpr int THREADS = 256;

template <int BM, int BN>
struct Cfg {
    static constexpr int WARPS_M = 2;
    static constexpr int WARPS_N = 4;
    static constexpr int WTM = BM / WARPS_M;  // warp tile rows
    static constexpr int WTN = BN / WARPS_N;  // warp tile cols
    static constexpr int MI = WTM / 16;
    static constexpr int NI = WTN / 8;
    static constexpr int A_STAGE = BM * BK;  // elements
    static constexpr int B_STAGE = BN * BK;
    static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) * 2;
};

static __device__ __forceinline__ int swz(int row, int chunk) {
    return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3);
}

template <int ROWS>
static __device__ __forceinline__ void load_tile(bf16* s, const bf16* g, long ld, int row0, int rows,
                                                 int k0, int K) {
    constexpr int CHUNKS = ROWS * (BK / 8);
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        int idx = threadIdx.x + i * THREADS;
        int r = idx >> 2;
        int c = idx & 3;
        int gr = row0 + r;
        int gk = k0 + c * 8;
        bool pred = (gr < rows) && (gk < K);
        const bf16* src = pred ? g + (long)gr * ld + gk : g;
        cp_async16(smem_addr(s + swz(r, c)), src, pred);
    }
}

template <int BM, int BN>
static __device__ __forceinline__ void gemm_nt_block(const bf16* __restrict__ A, const bf16* __restrict__ B,
                                                     bf16* __restrict__ C, int M, int N, int K, long lda,
                                                     long ldb, long ldc) {
    using G = Cfg<BM, BN>;
    extern __shared__ __align__(128) unsigned char blr_gemm_smem[];
    bf16* As = reinterpret_cast<bf16*>(blr_gemm_smem);
    bf16* Bs = As + STAGES * G::A_STAGE;

    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int wm = warp / G::WARPS_N;
    const int wn = warp % G::WARPS_N;

    float acc[G::MI][G::NI][4];
#pragma unroll
    for (int i = 0; i < G::MI; ++i)
#pragma unroll
        for (int j = 0; j < G::NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int ktiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) {
            load_tile<BM>(As + s * G::A_STAGE, A, lda, m0, M, s * BK, K);
            load_tile<BN>(Bs + s * G::B_STAGE, B, ldb, n0, N, s * BK, K);
        }
        cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            int nk = kt + STAGES - 1;
            if (nk < ktiles) {
                int slot = nk % STAGES;
                load_tile<BM>(As + slot * G::A_STAGE, A, lda, m0, M, nk * BK, K);
                load_tile<BN>(Bs + slot * G::B_STAGE, B, ldb, n0, N, nk * BK, K);
            }
            cp_async_commit();
        }
        const bf16* as = As + (kt % STAGES) * G::A_STAGE;
        const bf16* bs = Bs + (kt % STAGES) * G::B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            blr_u32 af[G::MI][4];
            blr_u32 bfr[G::NI][2];
#pragma unroll
            for (int mi = 0; mi < G::MI; ++mi) {
                int r = wm * G::WTM + mi * 16 + (lane & 15);
                int c = kk * 2 + (lane >> 4);
                ldmatrix_x4(smem_addr(as + swz(r, c)), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
            }
#pragma unroll
            for (int ni = 0; ni < G::NI; ni += 2) {
                int r = wn * G::WTN + ni * 8 + (lane & 7) + ((lane >> 4) << 3);
                int c = kk * 2 + ((lane >> 3) & 1);
                ldmatrix_x4(smem_addr(bs + swz(r, c)), bfr[ni][0], bfr[ni][1], bfr[ni + 1][0], bfr[ni + 1][1]);
            }
#pragma unroll
            for (int mi = 0; mi < G::MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < G::NI; ++ni)
                    mma_bf16(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bfr[ni][0], bfr[ni][1]);
        }
    }
    cp_async_wait<0>();

    const int g = lane >> 2;
    const int c = lane & 3;
#pragma unroll
    for (int mi = 0; mi < G::MI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < G::NI; ++ni) {
            int col = n0 + wn * G::WTN + ni * 8 + 2 * c;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                int row = m0 + wm * G::WTM + mi * 16 + g + h * 8;
                if (row < M) {
                    bf16* dst = C + (long)row * ldc + col;
                    if (col + 1 < N) {
                        *reinterpret_cast<__nv_bfloat162*>(dst) =
                            __floats2bfloat162_rn(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
                    } else if (col < N) {
                        *dst = __float2bfloat16(acc[mi][ni][2 * h]);
                    }
                }
            }
        }
    }
}

}  // namespace blr_gemm

#define BLR_GEMM_ENTRY(NAME, BM, BN)                                                                   \
    extern "C" __global__ void __launch_bounds__(blr_gemm::THREADS, 1)                                 \
        NAME(const bf16* __restrict__ A, const bf16* __restrict__ B, bf16* __restrict__ C, int M, int N, \
             int K, long long lda, long long ldb, long long ldc, long long strideA, long long strideB,     \
             long long strideC) {                                                                      \
        long long z = blockIdx.z;                                                                      \
        blr_gemm::gemm_nt_block<BM, BN>(A + z * strideA, B + z * strideB, C + z * strideC, M, N, K,    \
                                        (long)lda, (long)ldb, (long)ldc);                              \
    }

BLR_GEMM_ENTRY(blr_gemm_nt_128x128, 128, 128)
BLR_GEMM_ENTRY(blr_gemm_nt_128x256, 128, 256)
