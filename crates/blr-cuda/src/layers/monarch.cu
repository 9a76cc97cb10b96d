// Monarch kernels. `unfused` (what the reference PyTorch code does: a materialised transpose copy
// between the two block-diagonal GEMMs and after the second) and `partial` (an own stage-1 GEMM
// that writes the permuted intermediate directly, then cuBLAS stage 2 and a per-token output
// transpose; see blr_monarch_stage1 below).
// Notation (BRIEF section 2): b blocks, total rank R, out1 (T, b, R) flattened to (T, b*R).
//   blr_monarch_perm_mid: P[t][l][s] = out1_flat[t][s*b + l]      (P: (T, b, R))
//   blr_monarch_perm_out: y[t][s*b + l] = out2[t][l][s]          (out2: (T, b, m/b))
// One thread per element; bound by 2 x 2 bytes per element of memory traffic.
#include "common.cuh"

extern "C" __global__ void blr_monarch_perm_mid(const bf16* __restrict__ flat, bf16* __restrict__ P, int T,
                                                int b, int R) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long total = (long)T * b * R;
    if (idx >= total) return;
    int s = (int)(idx % R);
    long rest = idx / R;
    int l = (int)(rest % b);
    long t = rest / b;
    P[idx] = flat[t * b * R + (long)s * b + l];
}

extern "C" __global__ void blr_monarch_perm_out(const bf16* __restrict__ out2, bf16* __restrict__ y, int T,
                                                int b, int mb) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long total = (long)T * b * mb;
    if (idx >= total) return;
    int s = (int)(idx % mb);
    long rest = idx / mb;
    int l = (int)(rest % b);
    long t = rest / b;
    y[t * b * mb + (long)s * b + l] = out2[idx];
}

// Tiled variant of the two permutations above, kept for the harness comparison only: on the H100
// it measured no faster than the per-element kernels for llama7b (b = 16: 32x16 half-empty
// tiles, 32-byte row segments) and 2.7x slower for gpt2s-fc (b = 4: 32x4 tiles, ~24K mostly idle
// blocks per launch). A version that keeps whole (R x b) token matrices in shared memory and
// moves 16-byte vectors on both sides is what the permutation needs.
// Both permutations are a transpose per token: P[t] (b x R) = out1[t] (R x b)^T and
// y[t] (m/b x b) = out2[t] (b x m/b)^T. 32x32 tiles through shared memory (34-element rows: the
// column reads of the second half hit distinct banks), 32x8 threads, so both the reads and the
// writes are row segments; grid z strides over tokens.
extern "C" __global__ void __launch_bounds__(256) blr_batched_transpose(const bf16* __restrict__ in,
                                                                        bf16* __restrict__ out, int T, int rows,
                                                                        int cols) {
    __shared__ bf16 tile[32][34];
    const int c0 = blockIdx.x * 32;
    const int r0 = blockIdx.y * 32;
    const long mat = (long)rows * cols;
    for (int t = blockIdx.z; t < T; t += gridDim.z) {
        const bf16* src = in + (long)t * mat;
        bf16* dst = out + (long)t * mat;
        for (int i = threadIdx.y; i < 32; i += 8) {
            const int r = r0 + i;
            const int c = c0 + threadIdx.x;
            if (r < rows && c < cols) tile[i][threadIdx.x] = src[(long)r * cols + c];
        }
        __syncthreads();
        for (int i = threadIdx.y; i < 32; i += 8) {
            const int c = c0 + i;
            const int r = r0 + threadIdx.x;
            if (c < cols && r < rows) dst[(long)c * rows + r] = tile[threadIdx.x][i];
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// `partial` strategy: stage 1 writes the permuted intermediate P (T, b, R) directly.
//
// blr_monarch_stage1: for input block k, out1[t][k][c] = sum_i w1[k][c][i] x[t][k*nb + i]
// (a tensor-core NT GEMM, M = T tokens, N = R, K = nb = n/b), and each output lands where stage 2
// reads it: flat index f = k*R + c of out1 (T, b*R) goes to P[t][f % b][f / b] (BRIEF section 2).
// Nothing but P is written: no out1, no permutation pass, and w1 stays in its one canonical
// layout (the row order is chosen when the B tile is loaded, not by a reordered copy of w1).
//
// Two epilogues (seg is uniform per launch, chosen by the launcher):
//   seg = 1 (R % b == 0 and rb = R/b a multiple of 8): the tile's column j stands for weight row
//     c = (j % rb)*b + j / rb (rows gathered while loading B), so that column j lands at
//     P[t][j / rb][k*rb + j % rb]: every run of rb tile columns is one contiguous piece of a P row
//     (adjacent column pairs stored as 4 bytes).
//   seg = 0 (any shape): column j is weight row j, each element goes to P[t][f % b][f / b] with a
//     2-byte store (odd shapes only; correctness, not speed).
// Tiles: 128 (tokens) x 128 (columns) x 64 (K) per block, 8 warps as 2 x 4 with 64x32 warp tiles,
// 3-stage cp.async pipeline, 96 KB of shared memory, 128 registers: two blocks (16 warps) per SM.
// Measured on the H100 (qkvo T=1024, ncu): 4 warps with 64x64 warp tiles (224 registers, 8 warps
// per SM) 42.4 us, 57% of issue cycles with no eligible warp; 8 warps 41.1 us, 48%. Shared rows are 128 bytes with the
// 16-byte chunk c of row r at c ^ (r & 7) (the 8 rows of an ldmatrix phase hit 8 bank groups).
// Bytes: x and w1 from L2 (each x tile is read by R/128 blocks, each w1 block by T/128), P
// written once: for llama7b q/k/v/o T=1024, 8 + 8 MB read, 32 MB written; 8.6 GFLOP.
// Edges: rows past T, columns past R and K past nb are zero-filled by cp.async and not stored.
// Requirements (checked by the launcher): nb % 8 == 0 (16-byte rows), 16-byte aligned buffers.
namespace blr_mon1 {

// Warps along N: 4 (8 warps, 64x32 warp tiles; the product) or 2 (4 warps, 64x64 warp tiles;
// measured slower, see above). The launcher's thread count follows it (monarch.rs).
#ifndef BLR_MON1_WARPS_N
#define BLR_MON1_WARPS_N 4
#endif
constexpr int BM = 128;
constexpr int BN = 128;
constexpr int BK = 64;
constexpr int STAGES = 3;
constexpr int WARPS_M = 2;
constexpr int WARPS_N = BLR_MON1_WARPS_N;
constexpr int THREADS = 32 * WARPS_M * WARPS_N;
constexpr int WTM = BM / WARPS_M;
constexpr int WTN = BN / WARPS_N;
constexpr int MI = WTM / 16;
constexpr int NI = WTN / 8;
constexpr int A_STAGE = BM * BK;
constexpr int B_STAGE = BN * BK;
constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) * 2;
// 16-byte chunks each thread copies per operand and stage.
constexpr int CHUNKS = BM * BK / 8 / THREADS;
constexpr int ROW_STEP = THREADS / 8;
// Epilogue: the bf16 tile in shared memory, rows padded by 8 elements (272 B: the fragment
// stores of one warp hit 32 distinct banks, 16-byte reads stay aligned).
constexpr int CLD = BN + 8;
static_assert(BM * CLD * 2 <= SMEM_BYTES, "epilogue tile must fit in the pipeline buffers");
static_assert(BM == BN && CHUNKS * THREADS * 8 == BM * BK, "whole chunks per thread");

static __device__ __forceinline__ int swz(int row, int chunk) {
    return row * BK + ((chunk ^ (row & 7)) << 3);
}

}  // namespace blr_mon1

// wgmma (sm_90a) for the variant blr_monarch_stage1_wg: one warpgroup computes 64 rows x 128
// columns of the tile per instruction group, A and B straight from the swizzled shared tiles.
// Measured on the H100 (qkvo T=1024, same run): ncu (its base clocks) 50.6 us mma.sync -> 39.6
// us wgmma; layer 71.3 -> 62.6 us. Each k-tile's wgmmas are waited for before the next loads
// may overwrite a stage (3 stages), so MMAs and the epilogue of one block overlap only with the
// other block on the SM: still ~2x cuBLASLt's 21 us stage 1 (kernel-notes, "Monarch partial v3").
// A persistent warp-specialised version (one block per SM, cp.async producer warpgroup, two
// wgmma consumer warpgroups, an mbarrier stage ring across tiles; 128x128 and 128x256 tiles)
// measured slower: 47.3 / 46.1 us against this kernel's 40.0 (ncu), layer 67.9 / 66.4 against
// 61.7 us (kernel-notes, "Monarch stage 1: persistent warp-specialised wgmma"; code in commit
// 07db148).
// The tiles' layout (128-byte rows, 16-byte chunk c of row r at c ^ (r & 7), 1024-byte aligned
// stages) is the canonical 128-byte-swizzle K-major layout, so the descriptors are: start address
// >> 4, leading byte offset unused (1), stride byte offset 1024 B (8 rows) >> 4 = 64, layout type
// 1 (128-byte swizzle) in bits 62-63; the k-th 16-element step starts 32 bytes further.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BLR_MON1_HAVE_WGMMA 1
static __device__ __forceinline__ unsigned long long wg_desc(blr_u32 saddr) {
    return (unsigned long long)((saddr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
static __device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
static __device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
static __device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// D (64 x 128, f32, the m16n8 fragment layout per warp and n8 block: d[j][0..3]) += A B^T.
static __device__ __forceinline__ void wg_mma_m64n128k16(float (&d)[16][4], unsigned long long da,
                                                         unsigned long long db) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
        "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
        "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
        "%56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
          "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),
          "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),
          "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),
          "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]),
          "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(da), "l"(db), "r"(1));
}
#endif

// The epilogue's stores of the bf16 C tile (shared memory, rows of CLD) into P (see above), by
// `threads` threads of which this is number `tid`.
static __device__ __forceinline__ void mon1_store(const bf16* Cs, bf16* __restrict__ P, int T, int b, int R,
                                                  int m0, int n0, int k, int seg, int tid, int threads) {
    using namespace blr_mon1;
    const int rb = seg ? R / b : 1;
    const long ldp = (long)b * R;
    if (seg) {
        // 16 vectors of 8 columns per tile row; a vector never straddles a run (rb % 8 == 0).
        for (int idx = tid; idx < BM * (BN / 8); idx += threads) {
            const int r = idx / (BN / 8);
            const int v = idx % (BN / 8);
            const int t = m0 + r;
            const int j = n0 + v * 8;
            if (t < T && j < R) {
                const int l = j / rb;
                const int a = j - l * rb;
                const uint4 val = *reinterpret_cast<const uint4*>(Cs + r * CLD + v * 8);
                *reinterpret_cast<uint4*>(P + (long)t * ldp + (long)l * R + (long)k * rb + a) = val;
            }
        }
    } else {
        for (int idx = tid; idx < BM * BN; idx += threads) {
            const int r = idx / BN;
            const int jj = idx % BN;
            const int t = m0 + r;
            const int j = n0 + jj;
            if (t < T && j < R) {
                const long f = (long)k * R + j;
                P[(long)t * ldp + (f % b) * R + f / b] = Cs[r * CLD + jj];
            }
        }
    }
}

// MMA = 0: mma.sync m16n8k16 (8 warps as 2 x 4, 64x32 warp tiles; any sm_80+).
// MMA = 1: wgmma m64n128k16 (2 warpgroups, each 64 rows x all 128 columns; sm_90a only).
// Both keep 64 fp32 accumulators per thread and share the loads and the epilogue.
template <int MMA>
static __device__ __forceinline__ void mon1_body(const bf16* __restrict__ x, const bf16* __restrict__ w1,
                                                 bf16* __restrict__ P, int T, int b, int R, int nb, int seg,
                                                 unsigned char* smem) {
    using namespace blr_mon1;
    bf16* As = reinterpret_cast<bf16*>(smem);
    bf16* Bs = As + STAGES * A_STAGE;

    const int k = blockIdx.z;
    const int n0 = blockIdx.x * BN;
    const int m0 = blockIdx.y * BM;
    const long n = (long)b * nb;
    const int rb = seg ? R / b : 1;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int wm = warp / WARPS_N;
    const int wn = warp % WARPS_N;

    // This thread copies 16-byte chunk `lc` of tile rows r0 + ROW_STEP*i (i < CHUNKS) of both
    // operands.
    const int lc = tid & 7;
    const int r0 = tid >> 3;
    const bf16* xk = x + (long)k * nb + lc * 8;
    const bf16* wk = w1 + (long)k * R * nb + lc * 8;
    int brow[CHUNKS];
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
        const int j = n0 + r0 + ROW_STEP * i;
        brow[i] = j < R ? (seg ? (j % rb) * b + j / rb : j) : -1;
    }
    auto load_stage = [&](int slot, int k0) {
        const bool kin = k0 + lc * 8 < nb;
        bf16* as = As + slot * A_STAGE;
        bf16* bs = Bs + slot * B_STAGE;
#pragma unroll
        for (int i = 0; i < CHUNKS; ++i) {
            const int r = r0 + ROW_STEP * i;
            const int t = m0 + r;
            const bool pa = kin && t < T;
            cp_async16(smem_addr(as + swz(r, lc)), pa ? xk + (long)t * n + k0 : x, pa);
            const bool pb = kin && brow[i] >= 0;
            cp_async16(smem_addr(bs + swz(r, lc)), pb ? wk + (long)brow[i] * nb + k0 : w1, pb);
        }
    };

    // The accumulators: mma.sync MI x NI fragments of the warp's 64x32 tile, or the warp's 16 rows
    // x 128 columns of its warpgroup's wgmma tile (same 64 floats, same fragment layout per n8).
    constexpr int EMI = MMA ? 1 : MI;
    constexpr int ENI = MMA ? BN / 8 : NI;
    float acc[EMI][ENI][4];
#pragma unroll
    for (int i = 0; i < EMI; ++i)
#pragma unroll
        for (int j = 0; j < ENI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int ktiles = (nb + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s * BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        if constexpr (MMA == 1) {
            // cp.async wrote the stage through the generic proxy; wgmma reads it through the
            // async proxy.
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        }
        __syncthreads();
        const int nk = kt + STAGES - 1;
        if (nk < ktiles) load_stage(nk % STAGES, nk * BK);
        cp_async_commit();
        const bf16* as = As + (kt % STAGES) * A_STAGE;
        const bf16* bs = Bs + (kt % STAGES) * B_STAGE;
        if constexpr (MMA == 1) {
#if defined(BLR_MON1_HAVE_WGMMA)
            // Warpgroup g owns tile rows 64g..64g+63 (8 x 1024-byte swizzle atoms).
            const blr_u32 a0 = smem_addr(as + (warp >> 2) * 64 * BK);
            const blr_u32 b0 = smem_addr(bs);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk)
                wg_mma_m64n128k16(acc[0], wg_desc(a0 + kk * 32), wg_desc(b0 + kk * 32));
            wg_commit();
            // The stage is overwritten by the loads of iteration kt + 1: finish reading it first.
            wg_wait0();
#endif
        } else {
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                blr_u32 af[MI][4];
                blr_u32 bfr[NI][2];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    const int r = wm * WTM + mi * 16 + (lane & 15);
                    const int c = kk * 2 + (lane >> 4);
                    ldmatrix_x4(smem_addr(as + swz(r, c)), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
                }
#pragma unroll
                for (int ni = 0; ni < NI; ni += 2) {
                    const int r = wn * WTN + ni * 8 + (lane & 7) + ((lane >> 4) << 3);
                    const int c = kk * 2 + ((lane >> 3) & 1);
                    ldmatrix_x4(smem_addr(bs + swz(r, c)), bfr[ni][0], bfr[ni][1], bfr[ni + 1][0],
                                bfr[ni + 1][1]);
                }
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni)
                        mma_bf16(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bfr[ni][0],
                                 bfr[ni][1]);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // The tile, rounded to bf16, into shared memory (the pipeline buffers are free now).
    bf16* Cs = reinterpret_cast<bf16*>(smem);
    {
        const int g = lane >> 2;
        const int c4 = lane & 3;
        const int wrow = MMA ? warp * 16 : wm * WTM;
        const int wcol = MMA ? 0 : wn * WTN;
#pragma unroll
        for (int mi = 0; mi < EMI; ++mi)
#pragma unroll
            for (int ni = 0; ni < ENI; ++ni)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = wrow + mi * 16 + g + h * 8;
                    const int col = wcol + ni * 8 + 2 * c4;
                    *reinterpret_cast<__nv_bfloat162*>(Cs + row * CLD + col) =
                        __floats2bfloat162_rn(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
                }
    }
    __syncthreads();

    mon1_store(Cs, P, T, b, R, m0, n0, k, seg, threadIdx.x, THREADS);
}

// Grid (ceil(R/128), ceil(T/128), b): block (x, y, z) computes columns 128x.. of tokens 128y..
// for input block k = z. Dynamic shared memory: blr_mon1::SMEM_BYTES.
extern "C" __global__ void __launch_bounds__(blr_mon1::THREADS, 2)
    blr_monarch_stage1(const bf16* __restrict__ x, const bf16* __restrict__ w1, bf16* __restrict__ P, int T,
                       int b, int R, int nb, int seg) {
    extern __shared__ __align__(128) unsigned char blr_mon1_smem[];
    mon1_body<0>(x, w1, P, T, b, R, nb, seg, blr_mon1_smem);
}

// The same on wgmma (sm_90a; launched only there: elsewhere the body is empty). Dynamic shared
// memory: blr_mon1::SMEM_BYTES + 1024 (the stages start at the next 1024-byte boundary, which the
// 128-byte swizzle mode of the descriptors needs).
extern "C" __global__ void __launch_bounds__(blr_mon1::THREADS, 2)
    blr_monarch_stage1_wg(const bf16* __restrict__ x, const bf16* __restrict__ w1, bf16* __restrict__ P, int T,
                          int b, int R, int nb, int seg) {
#if defined(BLR_MON1_HAVE_WGMMA)
    extern __shared__ __align__(1024) unsigned char blr_mon1wg_smem[];
    const blr_u32 base = smem_addr(blr_mon1wg_smem);
    unsigned char* aligned = blr_mon1wg_smem + (((base + 1023u) & ~1023u) - base);
    mon1_body<1>(x, w1, P, T, b, R, nb, seg, aligned);
#endif
}

// ---------------------------------------------------------------------------------------------
// blr_monarch_stage1_tma: blr_monarch_stage1_wg with its loads on the tensor memory accelerator
// (sm_90a). Same grid, tiles (128 x 128 x 64), 3 stages, 256 threads (2 wgmma warpgroups, each
// 64 rows x 128 columns), 2 blocks per SM and the same epilogue. What changes: thread 0 issues a
// stage as a few `cp.async.bulk.tensor` copies that complete on the stage's mbarrier (armed with
// the stage's byte count by `mbarrier.arrive.expect_tx`); the other threads only wait on that
// barrier. In the cp.async kernel every thread computed a 64-bit address and a predicate per
// 16-byte chunk (~5M of its 14.9M instructions at llama7b q/k/v/o T=1024, kernel-notes) and
// waited for its own copies before a block-wide barrier.
// Tensor maps (built on the host, monarch.rs; passed by value as __grid_constant__ parameters),
// both bf16 with the 128-byte swizzle, so a box lands in shared memory in exactly the canonical
// K-major layout the wgmma descriptors read (128-byte rows, chunk c of row r at c ^ (r & 7),
// stages 1024-byte aligned):
//   xmap: x viewed (T, b, nb), dims {nb, b, T}, box {64, 1, 128}: the A tile of input block k is
//     the box at {k0, k, m0}; tokens past T and K past nb (its own dimension, so the next block's
//     columns are never read) are zero-filled by the copy engine.
//   wmap: w1 viewed (b, rbm, bl, nb), dims {nb, bl, rbm, b}, box {64, 1, g, 1}: with
//     seg = 1 (bl = b, rbm = rb = R/b) weight row c = a*b + l is element (k, a, l), and tile
//     columns j = l*rb + a .. + g - 1 (g = gcd(rb, 128), so a box never crosses a run) are the
//     box at {k0, l, a, k}: the seg-mode row gather of the cp.async kernel becomes 128/g boxes per
//     stage. With seg = 0 (bl = 1, rbm = R, g = 128) the box at {k0, 0, n0, k} is the plain
//     row block; rows past R are zero-filled. Boxes wholly past R (seg = 1) are not issued: their
//     tile columns are never stored, and the expected byte count leaves them out.
// Arguments: rbm and g as above (the box height of wmap; the launcher builds the map with it).
// Measured on the H100 (kernel-notes, "Monarch stage 1 on TMA"): at llama7b q/k/v/o T=1024 ncu
// 38.6 -> 37.5 us against the cp.async kernel, instructions 14.9M -> 8.7M, registers 128 -> 90,
// but eligible warps per scheduler 1.05 -> 0.55: the loads' latency, not the producers'
// instructions, bounds the kernel. Layer 61.8 / 62.1 -> 60.5 / 60.1 us there; slower with 32-row
// w1 boxes (gate/up T=1024 122.4 -> 125.6) and long K (down, 11 k-tiles: 130.8 -> 143.5), so
// blr's rule (monarch.rs, Stage1Mma::resolve) picks it only for 64-row boxes and n/b <= 256.
struct __align__(64) blr_tmap {
    unsigned long long w[16];
};

#if defined(BLR_MON1_HAVE_WGMMA)
static __device__ __forceinline__ void tma_bar_init(blr_u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
static __device__ __forceinline__ void tma_bar_expect(blr_u32 bar, blr_u32 bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
static __device__ __forceinline__ void tma_bar_wait(blr_u32 bar, int parity) {
    blr_u32 done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
static __device__ __forceinline__ void tma_load3(blr_u32 dst, const blr_tmap* map, blr_u32 bar, int c0, int c1,
                                                 int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
static __device__ __forceinline__ void tma_load4(blr_u32 dst, const blr_tmap* map, blr_u32 bar, int c0, int c1,
                                                 int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
        "%5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
// Queues one stage: the A box (x, 128 tokens x 64 K) at `sa`, the B boxes of tile columns below
// R (g rows each) at `sb`, all completing on `bar`, which is armed with their byte count.
static __device__ __forceinline__ void mon1_tma_issue(blr_u32 sa, blr_u32 sb, blr_u32 bar, const blr_tmap* xmap,
                                                      const blr_tmap* wmap, int k0, int k, int m0, int n0, int R,
                                                      int rbm, int g) {
    using namespace blr_mon1;
    const int nbox = BN / g;
    int boxes = 0;
    for (int s = 0; s < nbox; ++s) boxes += (n0 + s * g < R) ? 1 : 0;
    tma_bar_expect(bar, (blr_u32)(A_STAGE * 2 + boxes * g * BK * 2));
    tma_load3(sa, xmap, bar, k0, k, m0);
    for (int s = 0; s < nbox; ++s) {
        const int j = n0 + s * g;
        if (j >= R) break;
        tma_load4(sb + s * g * BK * 2, wmap, bar, k0, j / rbm, j % rbm, k);
    }
}
#endif

// Grid and arguments after (xmap, wmap) as blr_monarch_stage1_wg (x and w1 are reached through
// the maps), plus rbm and g. Dynamic shared memory: blr_mon1::SMEM_BYTES + 1024 (alignment) +
// 64 (three mbarriers).
extern "C" __global__ void __launch_bounds__(blr_mon1::THREADS, 2)
    blr_monarch_stage1_tma(const __grid_constant__ blr_tmap xmap, const __grid_constant__ blr_tmap wmap,
                           bf16* __restrict__ P, int T, int b, int R, int nb, int seg, int rbm, int g) {
#if defined(BLR_MON1_HAVE_WGMMA)
    using namespace blr_mon1;
    extern __shared__ __align__(1024) unsigned char blr_mon1tma_smem[];
    const blr_u32 base = smem_addr(blr_mon1tma_smem);
    unsigned char* smem = blr_mon1tma_smem + (((base + 1023u) & ~1023u) - base);
    const blr_u32 sA = smem_addr(smem);
    const blr_u32 sB = sA + STAGES * A_STAGE * 2;
    const blr_u32 bar0 = sA + SMEM_BYTES;

    const int k = blockIdx.z;
    const int n0 = blockIdx.x * BN;
    const int m0 = blockIdx.y * BM;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int ktiles = (nb + BK - 1) / BK;

    // Thread 0 queues stage `slot` with k-tile kt.
    auto issue = [&](int slot, int kt) {
        mon1_tma_issue(sA + slot * A_STAGE * 2, sB + slot * B_STAGE * 2, bar0 + slot * 8, &xmap, &wmap, kt * BK, k,
                       m0, n0, R, rbm, g);
    };

    if (tid == 0) {
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&xmap)) : "memory");
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&wmap)) : "memory");
#pragma unroll
        for (int s = 0; s < STAGES; ++s) tma_bar_init(bar0 + s * 8, 1);
        // The barriers' initialisation must be visible to the copy engine (async proxy).
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        for (int s = 0; s < STAGES && s < ktiles; ++s) issue(s, s);
    }
    __syncthreads();

    float acc[1][BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][j][e] = 0.f;

    for (int kt = 0; kt < ktiles; ++kt) {
        const int slot = kt % STAGES;
        tma_bar_wait(bar0 + slot * 8, (kt / STAGES) & 1);
        // Warpgroup w owns tile rows 64w..64w+63 (8 x 1024-byte swizzle atoms).
        const blr_u32 a0 = sA + slot * A_STAGE * 2 + (warp >> 2) * 64 * BK * 2;
        const blr_u32 b0 = sB + slot * B_STAGE * 2;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wg_mma_m64n128k16(acc[0], wg_desc(a0 + kk * 32), wg_desc(b0 + kk * 32));
        wg_commit();
        wg_wait0();
        if (kt + STAGES < ktiles) {
            // Every warp has finished reading this stage before the copy engine refills it.
            __syncthreads();
            if (tid == 0) issue(slot, kt + STAGES);
        }
    }
    // Both warpgroups' MMAs are done before the C tile overwrites the stages; every issued copy
    // has completed (each k-tile's barrier was waited for).
    __syncthreads();

    bf16* Cs = reinterpret_cast<bf16*>(smem);
    {
        const int gq = lane >> 2;
        const int c4 = lane & 3;
#pragma unroll
        for (int ni = 0; ni < BN / 8; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = warp * 16 + gq + h * 8;
                const int col = ni * 8 + 2 * c4;
                *reinterpret_cast<__nv_bfloat162*>(Cs + row * CLD + col) =
                    __floats2bfloat162_rn(acc[0][ni][2 * h], acc[0][ni][2 * h + 1]);
            }
    }
    __syncthreads();
    mon1_store(Cs, P, T, b, R, m0, n0, k, seg, threadIdx.x, THREADS);
#endif
}

// y[t][u*b + l] = out2[t][l*mb + u]: a (b x mb) -> (mb x b) transpose per token through shared
// memory, 16-byte loads and 16-byte stores on both sides (m = b*mb must be a multiple of 8).
// Shared rows are padded by 2 elements so the 8 rows one thread gathers from spread over banks.
// Dynamic shared memory: b * (mb + 2) * 2 bytes. One token per block iteration.
extern "C" __global__ void __launch_bounds__(256) blr_monarch_out_transpose(const bf16* __restrict__ out2,
                                                                            bf16* __restrict__ y, int T, int b,
                                                                            int mb) {
    extern __shared__ __align__(16) unsigned char blr_mot_smem[];
    bf16* tile = reinterpret_cast<bf16*>(blr_mot_smem);
    const int m = b * mb;
    const int ld = mb + 2;
    const int nv = m >> 3;
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const bf16* src = out2 + (long)t * m;
        for (int v = threadIdx.x; v < nv; v += blockDim.x) {
            const uint4 val = ld_ro16(src + v * 8);
            const bf16* e = reinterpret_cast<const bf16*>(&val);
            int j = v * 8;
            int l = j / mb;
            int u = j - l * mb;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                tile[l * ld + u] = e[i];
                if (++u == mb) {
                    u = 0;
                    ++l;
                }
            }
        }
        __syncthreads();
        bf16* dst = y + (long)t * m;
        for (int v = threadIdx.x; v < nv; v += blockDim.x) {
            int j = v * 8;
            int u = j / b;
            int l = j - u * b;
            __align__(16) bf16 e[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                e[i] = tile[l * ld + u];
                if (++l == b) {
                    l = 0;
                    ++u;
                }
            }
            *reinterpret_cast<uint4*>(dst + j) = *reinterpret_cast<const uint4*>(e);
        }
        __syncthreads();
    }
}

// P[t][l][s] = out1[t][s*b + l] (BRIEF section 2's permutation; P (T, b, R)) where Monarch
// `partial` runs stage 1 on cuBLASLt (n/b > 256, llama7b down). Per token an (R x b) -> (b x R)
// transpose through shared memory, laid out so that neither phase pays for bank conflicts:
// - shared rows of ld = b + 1 elements (b + 2 for odd b): ld is odd, so in the gather phase
//   lane p's element of row 2p sits in word p*ld + l/2 and 32 consecutive lanes hit 32 banks
//   (and likewise for row 2p + 1);
// - load phase: 16-byte loads of the token's b*R elements (4 in flight per thread) where
//   b*R % 8 == 0, else 2-byte loads; scattered as 2-byte stores (b = 16: lanes' rows 8.5 words
//   apart, at most 2-way conflicts);
// - gather phase: thread p of output row l reads rows 2p and 2p + 1 of column l and stores the
//   pair as one 4-byte word (R even; two 2-byte stores otherwise): a warp writes 128 contiguous
//   bytes of P.
// It replaces blr_monarch_out_transpose(rows = R, cols = b) on this path, whose gather phase
// read 8 rows per thread at a lane stride of 8 rows (an 8-way conflict: 52 us in situ at
// llama7b down, T = 1024; docs/perf/kernel-notes.md, "Monarch partial v2").
// Memory: 2 x 2 bytes per element (read once, written once): 96 KB per token at b*R = 24576;
// floor at T = 1024 ~ 100 MB / 3 TB/s = 33 us (less where out1 is still in L2).
// Dynamic shared memory: R * ld * 2 bytes (R = 1536, b = 16: 52 KB, 4 blocks per SM).
// Blocks stride over tokens.
extern "C" __global__ void __launch_bounds__(256) blr_monarch_mid_transpose(const bf16* __restrict__ in,
                                                                            bf16* __restrict__ P, int T, int R,
                                                                            int b) {
    extern __shared__ __align__(16) unsigned char blr_mmt_smem[];
    bf16* tile = reinterpret_cast<bf16*>(blr_mmt_smem);
    const int ld = b + 1 + (b & 1);
    const int n = R * b;
    const int hp = (R + 1) >> 1;  // pairs per output row
    const int np = b * hp;
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const bf16* src = in + (long)t * n;
        if ((n & 7) == 0) {
            const int nv = n >> 3;
            for (int v0 = threadIdx.x; v0 < nv; v0 += 4 * blockDim.x) {
                uint4 val[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int v = v0 + u * blockDim.x;
                    if (v < nv) val[u] = ld_ro16(src + (long)v * 8);
                }
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int v = v0 + u * blockDim.x;
                    if (v < nv) {
                        const bf16* e = reinterpret_cast<const bf16*>(&val[u]);
                        int s = (v * 8) / b;
                        int l = v * 8 - s * b;
#pragma unroll
                        for (int i = 0; i < 8; ++i) {
                            tile[s * ld + l] = e[i];
                            if (++l == b) {
                                l = 0;
                                ++s;
                            }
                        }
                    }
                }
            }
        } else {
            for (int j = threadIdx.x; j < n; j += blockDim.x) {
                const int s = j / b;
                tile[s * ld + (j - s * b)] = src[j];
            }
        }
        __syncthreads();
        bf16* dst = P + (long)t * n;
        for (int idx = threadIdx.x; idx < np; idx += blockDim.x) {
            const int l = idx / hp;
            const int s = 2 * (idx - l * hp);
            const bf16 lo = tile[s * ld + l];
            bf16* o = dst + (long)l * R + s;
            if ((R & 1) == 0) {
                *reinterpret_cast<__nv_bfloat162*>(o) = __halves2bfloat162(lo, tile[(s + 1) * ld + l]);
            } else {
                o[0] = lo;
                if (s + 1 < R) o[1] = tile[(s + 1) * ld + l];
            }
        }
        __syncthreads();
    }
}

// The same permutation as blr_monarch_mid_transpose for b % 8 == 0 and R % 8 == 0 (llama7b
// down: b = 16, R = 1536), with every access 16 bytes wide and fewer instructions per element.
// The shared tile is P's token row itself, transposed on the way in: tile row l (4-byte words)
// holds at word k the pair (out1 row 2k col l, out1 row 2k + 1 col l) = P[t][l][2k..2k+1].
// - load phase: item (k, q) reads columns 8q..8q+7 of out1 rows 2k and 2k + 1 (two 16-byte
//   loads; q runs fastest, so a warp's loads cover whole 32-byte sectors; 3 items = 6 loads in
//   flight per thread), packs them into 8 words (byte permutes) and stores word i at row
//   8q + i, column k. Rows are ldw = R/2 + 4 words apart, and the rows of group q = l / 8 start
//   `sk` = (32 / (b/8)) & ~3 words further (b = 16: 16), so the b/8 groups of consecutive k one
//   warp stores fall into disjoint banks;
// - store phase: each P row l is tile row l, copied with 16-byte shared loads and 16-byte global
//   stores (ldw and sk are multiples of 4 words: rows stay 16-byte aligned).
// Instructions per 16 bytes: ~2 in the store phase, ~10 in the load phase, against ~8 x (a 2-byte
// shared access + index update) in each phase of the kernel above.
// Dynamic shared memory: (b * (R/2 + 4) + (b/8) * sk) * 4 bytes (b = 16, R = 1536: 49.5 KB,
// 4 blocks per SM). Blocks stride over tokens.
namespace blr_mmt2 {
constexpr int U = 3;  // items per thread in flight
}
extern "C" __global__ void __launch_bounds__(256) blr_monarch_mid_transpose_packed(const bf16* __restrict__ in,
                                                                                   bf16* __restrict__ P, int T,
                                                                                   int R, int b) {
    using blr_mmt2::U;
    extern __shared__ __align__(16) unsigned char blr_mmt2_smem[];
    blr_u32* tile = reinterpret_cast<blr_u32*>(blr_mmt2_smem);
    const int hk = R >> 1;  // row pairs = P words per row
    const int ldw = hk + 4;
    const int b8 = b >> 3;
    const int sk = (32 / b8) & ~3;
    const int n = R * b;
    const int items = hk * b8;
    const int nv = n >> 3;
    const int rv = R >> 3;  // 16-byte vectors per P row
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const bf16* src = in + (long)t * n;
        for (int i0 = threadIdx.x; i0 < items; i0 += U * blockDim.x) {
            uint4 lo[U], hi[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int it = i0 + u * blockDim.x;
                if (it < items) {
                    const int k = it / b8;
                    const int q = it - k * b8;
                    const bf16* p = src + (long)(2 * k) * b + 8 * q;
                    lo[u] = ld_ro16(p);
                    hi[u] = ld_ro16(p + b);
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int it = i0 + u * blockDim.x;
                if (it < items) {
                    const int k = it / b8;
                    const int q = it - k * b8;
                    blr_u32* d = tile + (8 * q) * ldw + q * sk + k;
                    const blr_u32 a[4] = {lo[u].x, lo[u].y, lo[u].z, lo[u].w};
                    const blr_u32 c[4] = {hi[u].x, hi[u].y, hi[u].z, hi[u].w};
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        d[(2 * e) * ldw] = __byte_perm(a[e], c[e], 0x5410);
                        d[(2 * e + 1) * ldw] = __byte_perm(a[e], c[e], 0x7632);
                    }
                }
            }
        }
        __syncthreads();
        bf16* dst = P + (long)t * n;
        for (int v = threadIdx.x; v < nv; v += blockDim.x) {
            const int l = v / rv;
            const int c = v - l * rv;
            const uint4 val = *reinterpret_cast<const uint4*>(tile + l * ldw + (l >> 3) * sk + 4 * c);
            *reinterpret_cast<uint4*>(dst + (long)l * R + 8 * c) = val;
        }
        __syncthreads();
    }
}
