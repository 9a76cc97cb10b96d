// BLAST stage 2 (the b_out x b_in mixing per rank index) for the prefill strategies.
// Notation (BRIEF section 2): X (T, n), b_in x b_out blocks, q = n/b_in, p = m/b_out, rank r.
//   Z_j = X_j V_j        stage 1, (T x r) per input block j   -- a batched GEMM
//   W_i = sum_j s_ij . Z_j  stage 2, elementwise in k            -- THIS FILE
//   Y_i = W_i U_i^T      stage 3, (T x p) per output block i   -- a batched GEMM
//
// blast_mix_tc: tensor-core mixing. For a fixed rank k, W[:, :, k] (T x b_out) =
// Z[:, :, k] (T x b_in) * S[k]^T (b_in x b_out): one m16n8k16 MMA per 16 tokens x 8 outputs with
// K = b_in (padded to 16). Stage 2 is only b_out*b_in/(m+n) of the FLOPs (~3% for llama7b qkvo)
// but on CUDA cores in fp32 it would cost ~8 us at T=1024; on tensor cores it is free next to
// the memory traffic, which is what this kernel is bound by (reads Z once, writes W once).
//
// Layouts (chosen so that no transpose copy is ever made):
//   Zt  (b_in, r, ldz)  Z transposed per block: Zt[j][k][t], tokens contiguous, ldz = T rounded
//                       up to 8. Stage 1 writes it directly as Zt_j = V_j^T X_j^T (an NT GEMM
//                       with the operands swapped), and ldmatrix.trans then delivers the
//                       (tokens x j) A fragment for a fixed k straight from shared memory.
//   S   (r, 16, 16)     S[k][i][j], zero-padded to 16 x 16, K (= j) contiguous: the B fragment.
//   W   (b_out, T, r)   W[i][t][k]: exactly the A operand of stage 3 (K = r contiguous).
//                       Each thread collects 8 consecutive k's of its C fragments and stores 16
//                       bytes, so W is written with 16-byte stores and no shared-memory staging.
// Block tile: 64 tokens x 32 ranks, all j (16 planes in shared memory: 16 x 32 x 64 bf16 +
// 16 B pad per plane so the 8 j-rows of one ldmatrix phase fall in distinct bank groups);
// 4 warps, warp w owns tokens [16w, 16w+16) for all 32 ranks and all 16 outputs.
// Bytes per W element: 2 (Z read, b_in/b_out of it) + 2 (W write) -> roofline = memory.
// Requirements (launcher checks): b_in <= 16, b_out <= 16, r % 8 == 0, ldz % 8 == 0.
#include "common.cuh"

namespace blr_mix {
constexpr int BT = 64;
constexpr int BKR = 32;
constexpr int JP = 16;
constexpr int PLANE = BKR * BT + 8;  // elements; +16 B pad
}  // namespace blr_mix

extern "C" __global__ void __launch_bounds__(128) blr_blast_mix_tc(const bf16* __restrict__ Zt,
                                                                   const bf16* __restrict__ S,
                                                                   bf16* __restrict__ W, int T, int ldz,
                                                                   int r, int b_in, int b_out) {
    using namespace blr_mix;
    extern __shared__ __align__(128) unsigned char blr_mix_smem[];
    bf16* zs = reinterpret_cast<bf16*>(blr_mix_smem);

    const int t0 = blockIdx.x * BT;
    const int k0 = blockIdx.y * BKR;
    // 16 planes x 32 ranks x 8 chunks of 16 B.
    for (int idx = threadIdx.x; idx < JP * BKR * (BT / 8); idx += blockDim.x) {
        int ch = idx % (BT / 8);
        int k = (idx / (BT / 8)) % BKR;
        int j = idx / (BT / 8 * BKR);
        int gt = t0 + ch * 8;
        bool pred = (j < b_in) && (k0 + k < r) && (gt < ldz);
        const bf16* src = pred ? Zt + ((long)j * r + k0 + k) * ldz + gt : Zt;
        cp_async16(smem_addr(zs + j * PLANE + k * BT + ch * 8), src, pred);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int c = lane & 3;
    const int tw = warp * 16;
    // ldmatrix.trans row address: matrix (lane/8): 0 -> (t 0-7, j 0-7), 1 -> (t 8-15, j 0-7),
    // 2 -> (t 0-7, j 8-15), 3 -> (t 8-15, j 8-15); memory rows are j, 8 tokens each.
    const int lj = (lane & 7) + ((lane >> 4) << 3);
    const int lt = tw + (((lane >> 3) & 1) << 3);

    for (int kb = 0; kb < BKR; kb += 8) {
        float out[2][4][8];
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            const int k = kb + kk;
            blr_u32 a0, a1, a2, a3;
            ldmatrix_x4_trans(smem_addr(zs + lj * PLANE + k * BT + lt), a0, a1, a2, a3);
            const int gk = min(k0 + k, r - 1);
            const blr_u32* srow = reinterpret_cast<const blr_u32*>(S + (long)gk * 256);
#pragma unroll
            for (int it = 0; it < 2; ++it) {
                // B fragment: S[k][i = it*8 + g][j = 2c, 2c+1] and [j = 2c+8, 2c+9].
                blr_u32 b0 = __ldg(srow + (it * 8 + g) * 8 + c);
                blr_u32 b1 = __ldg(srow + (it * 8 + g) * 8 + 4 + c);
                float d[4] = {0.f, 0.f, 0.f, 0.f};
                mma_bf16(d, a0, a1, a2, a3, b0, b1);
#pragma unroll
                for (int e = 0; e < 4; ++e) out[it][e][kk] = d[e];
            }
        }
        const int gk = k0 + kb;
        if (gk + 8 <= r) {
#pragma unroll
            for (int it = 0; it < 2; ++it) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int i = it * 8 + 2 * c + (e & 1);
                    int t = t0 + tw + g + ((e >> 1) << 3);
                    if (i < b_out && t < T) {
                        uint4 v;
                        v.x = pack_bf16x2(out[it][e][0], out[it][e][1]);
                        v.y = pack_bf16x2(out[it][e][2], out[it][e][3]);
                        v.z = pack_bf16x2(out[it][e][4], out[it][e][5]);
                        v.w = pack_bf16x2(out[it][e][6], out[it][e][7]);
                        *reinterpret_cast<uint4*>(W + ((long)i * T + t) * r + gk) = v;
                    }
                }
            }
        }
    }
}

// Baseline stage 2 (what the PyTorch reference does: broadcast multiply + sum over j), one
// thread per (t, k), fp32 math, Z in the natural (b_in, T, r) layout that a plain batched GEMM
// writes. Used by the `unfused` strategy only.
extern "C" __global__ void blr_blast_mix_naive(const bf16* __restrict__ Z, const bf16* __restrict__ S,
                                               bf16* __restrict__ W, int T, int r, int b_in, int b_out) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * r) return;
    int k = (int)(idx % r);
    long t = idx / r;
    float z[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) z[j] = j < b_in ? __bfloat162float(Z[((long)j * T + t) * r + k]) : 0.f;
    for (int i = 0; i < b_out; ++i) {
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j)
            // The packed S holds 16 x 16 per rank index; entries past b_in are padding that
            // must never be read (padding is not guaranteed to be written, and 0 * NaN = NaN).
            if (j < b_in) acc += __bfloat162float(S[((long)k * 16 + i) * 16 + j]) * z[j];
        W[((long)i * T + t) * r + k] = __float2bfloat16(acc);
    }
}

// v2 of the tensor-core mixing (v1 above measured 104 us for llama7b qkvo at T=1024, 1 TB/s):
// 8 warps instead of 4, S for the block's 32 ranks staged in shared memory with the Z planes
// (one cp.async wave), and W written through a shared staging tile so that every (i, t) row
// segment of 32 ranks (64 B, two full sectors) leaves in one coalesced store wave instead of 32
// scattered 16-byte pieces per warp instruction.
// Staging layout Ws[i][t][k]: 40-element (80 B) rows, 16 B pad per i-plane: the 16-byte stores
// of one phase (lanes with i = 2c, t = g) then fall in 8 distinct bank groups.
template <int BT>
struct Mix2Cfg {
    static constexpr int BKR = 32;
    static constexpr int JP = 16;
    static constexpr int PLANE = BKR * BT + 8;
    static constexpr int WROW = BKR + 8;
    static constexpr int WPLANE = BT * WROW + 8;
    static constexpr int Z_BYTES = JP * PLANE * 2;
    static constexpr int W_BYTES = 16 * WPLANE * 2;
    static constexpr int ZW_BYTES = Z_BYTES > W_BYTES ? Z_BYTES : W_BYTES;
    static constexpr int S_BYTES = BKR * 256 * 2;
    static constexpr int SMEM_BYTES = ZW_BYTES + S_BYTES;
    static constexpr int NT16 = BT / 16;        // token tiles of 16
    static constexpr int KGROUPS = 8 / NT16;    // warps along the ranks
    static constexpr int KBW = BKR / 8 / KGROUPS;  // 8-rank blocks per warp
};

// Kept for the harness and the Rust launcher: the BT = 64 configuration.
namespace blr_mix2 {
constexpr int BT = 64;
constexpr int BKR = 32;
constexpr int SMEM_BYTES = Mix2Cfg<64>::SMEM_BYTES;
}  // namespace blr_mix2

// Issues (does not commit or wait for) the cp.async copies of one (BT tokens x 32 ranks) tile:
// the 16 Z planes into zs and S for the 32 ranks into ss.
template <int BT>
static __device__ __forceinline__ void mix2_load_tile(bf16* zs, bf16* ss, const bf16* __restrict__ Zt,
                                                      const bf16* __restrict__ S, int t0, int k0, int ldz, int r,
                                                      int b_in) {
    using C = Mix2Cfg<BT>;
    constexpr int BKR = C::BKR, JP = C::JP, PLANE = C::PLANE;
    for (int idx = threadIdx.x; idx < JP * BKR * (BT / 8); idx += 256) {
        int ch = idx % (BT / 8);
        int k = (idx / (BT / 8)) % BKR;
        int j = idx / (BT / 8 * BKR);
        int gt = t0 + ch * 8;
        bool pred = (j < b_in) && (k0 + k < r) && (gt < ldz);
        const bf16* src = pred ? Zt + ((long)j * r + k0 + k) * ldz + gt : Zt;
        cp_async16(smem_addr(zs + j * PLANE + k * BT + ch * 8), src, pred);
    }
    for (int idx = threadIdx.x; idx < BKR * 32; idx += 256) {
        int k = idx >> 5;
        bool pred = k0 + k < r;
        const bf16* src = pred ? S + (long)(k0 + k) * 256 + (idx & 31) * 8 : S;
        cp_async16(smem_addr(ss + idx * 8), src, pred);
    }
}

// Mixes the tile in zs/ss (loaded and visible to every thread) and writes W[i][t][k0..k0+32]
// through a staging tile that reuses zs. Ends with every thread past its shared-memory reads
// of the staging tile only after the caller's next __syncthreads.
template <int BT>
static __device__ __forceinline__ void mix2_compute_store(bf16* zs, const bf16* ss, bf16* __restrict__ W, int t0,
                                                          int k0, int T, int r, int b_out, long ldwi) {
    using C = Mix2Cfg<BT>;
    constexpr int BKR = C::BKR, PLANE = C::PLANE, WROW = C::WROW, WPLANE = C::WPLANE;

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int c = lane & 3;
    const int tw = (warp % C::NT16) * 16;
    const int kh = (warp / C::NT16) * (C::KBW * 8);
    const int lj = (lane & 7) + ((lane >> 4) << 3);
    const int lt = tw + (((lane >> 3) & 1) << 3);

    blr_u32 res[C::KBW][2][4][4];
#pragma unroll
    for (int kbi = 0; kbi < C::KBW; ++kbi) {
        float out[2][4][8];
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            const int k = kh + kbi * 8 + kk;
            blr_u32 a0, a1, a2, a3;
            ldmatrix_x4_trans(smem_addr(zs + lj * PLANE + k * BT + lt), a0, a1, a2, a3);
            const blr_u32* srow = reinterpret_cast<const blr_u32*>(ss + k * 256);
#pragma unroll
            for (int it = 0; it < 2; ++it) {
                blr_u32 b0 = srow[(it * 8 + g) * 8 + c];
                blr_u32 b1 = srow[(it * 8 + g) * 8 + 4 + c];
                float d[4] = {0.f, 0.f, 0.f, 0.f};
                mma_bf16(d, a0, a1, a2, a3, b0, b1);
#pragma unroll
                for (int e = 0; e < 4; ++e) out[it][e][kk] = d[e];
            }
        }
#pragma unroll
        for (int it = 0; it < 2; ++it)
#pragma unroll
            for (int e = 0; e < 4; ++e)
#pragma unroll
                for (int h = 0; h < 4; ++h) res[kbi][it][e][h] = pack_bf16x2(out[it][e][2 * h], out[it][e][2 * h + 1]);
    }
    __syncthreads();  // every warp is done reading zs: reuse it as the W staging tile
    bf16* ws = zs;
#pragma unroll
    for (int kbi = 0; kbi < C::KBW; ++kbi)
#pragma unroll
        for (int it = 0; it < 2; ++it)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int i = it * 8 + 2 * c + (e & 1);
                int t = tw + g + ((e >> 1) << 3);
                uint4 v = make_uint4(res[kbi][it][e][0], res[kbi][it][e][1], res[kbi][it][e][2], res[kbi][it][e][3]);
                *reinterpret_cast<uint4*>(ws + i * WPLANE + t * WROW + kh + kbi * 8) = v;
            }
    __syncthreads();
    // 16 i x BT t rows of 4 chunks (16 B): consecutive threads take consecutive chunks.
    for (int idx = threadIdx.x; idx < 16 * BT * 4; idx += 256) {
        int ch = idx & 3;
        int t = (idx >> 2) % BT;
        int i = idx / (BT * 4);
        int gt = t0 + t;
        int gk = k0 + ch * 8;
        if (i < b_out && gt < T && gk < r)
            *reinterpret_cast<uint4*>(W + (long)i * ldwi + (long)gt * r + gk) =
                *reinterpret_cast<const uint4*>(ws + i * WPLANE + t * WROW + ch * 8);
    }
}

template <int BT>
static __device__ __forceinline__ void blast_mix_tc2_block(const bf16* __restrict__ Zt, const bf16* __restrict__ S,
                                                           bf16* __restrict__ W, int T, int ldz, int r, int b_in,
                                                           int b_out) {
    using C = Mix2Cfg<BT>;
    extern __shared__ __align__(128) unsigned char blr_mix2_smem[];
    bf16* zs = reinterpret_cast<bf16*>(blr_mix2_smem);
    bf16* ss = reinterpret_cast<bf16*>(blr_mix2_smem + C::ZW_BYTES);
    const int t0 = blockIdx.x * BT;
    const int k0 = blockIdx.y * C::BKR;
    mix2_load_tile<BT>(zs, ss, Zt, S, t0, k0, ldz, r, b_in);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    mix2_compute_store<BT>(zs, ss, W, t0, k0, T, r, b_out, (long)T * r);
}

// v4: persistent and double-buffered. One block per SM (2 x (82 + 16) KB of shared memory) walks
// the (token tile, rank tile) grid with stride gridDim.x, copying tile i+1 into the other stage
// while it mixes and stores tile i, so loads, math and stores of consecutive tiles overlap inside
// the block (v2 relies on 2 resident blocks per SM being out of phase). Tiles are ordered token
// tile fastest, so the blocks in flight together read the same 32 ranks of S and adjacent Zt
// row segments. Shared memory: 2 * Mix2Cfg<64>::SMEM_BYTES.
// W[i] planes are `ldwi` elements apart (T*r for a whole pass; the full T*r when the launcher
// mixes a chunk of T tokens into a larger W, with W pointing at the chunk's first row).
extern "C" __global__ void __launch_bounds__(256, 1) blr_blast_mix_tc4(const bf16* __restrict__ Zt,
                                                                       const bf16* __restrict__ S,
                                                                       bf16* __restrict__ W, int T, int ldz,
                                                                       int r, int b_in, int b_out,
                                                                       long long ldwi) {
    using C = Mix2Cfg<64>;
    extern __shared__ __align__(128) unsigned char blr_mix2_smem[];
    const int ntt = (T + 63) / 64;
    const int ntiles = ntt * ((r + C::BKR - 1) / C::BKR);
    int tile = blockIdx.x;
    if (tile >= ntiles) return;
    auto zs_of = [&](int st) { return reinterpret_cast<bf16*>(blr_mix2_smem + st * C::SMEM_BYTES); };
    auto ss_of = [&](int st) { return reinterpret_cast<bf16*>(blr_mix2_smem + st * C::SMEM_BYTES + C::ZW_BYTES); };
    mix2_load_tile<64>(zs_of(0), ss_of(0), Zt, S, (tile % ntt) * 64, (tile / ntt) * C::BKR, ldz, r, b_in);
    cp_async_commit();
    for (int it = 0; tile < ntiles; ++it, tile += gridDim.x) {
        const int cur = it & 1;
        const int next = tile + gridDim.x;
        __syncthreads();  // the other stage's staging tile (iteration it-1) is fully read
        if (next < ntiles)
            mix2_load_tile<64>(zs_of(cur ^ 1), ss_of(cur ^ 1), Zt, S, (next % ntt) * 64, (next / ntt) * C::BKR, ldz,
                               r, b_in);
        cp_async_commit();
        cp_async_wait<1>();  // this tile's group is complete (the newest may still be in flight)
        __syncthreads();
        mix2_compute_store<64>(zs_of(cur), ss_of(cur), W, (tile % ntt) * 64, (tile / ntt) * C::BKR, T, r, b_out,
                               (long)ldwi);
    }
}

extern "C" __global__ void __launch_bounds__(256) blr_blast_mix_tc2(const bf16* __restrict__ Zt,
                                                                    const bf16* __restrict__ S,
                                                                    bf16* __restrict__ W, int T, int ldz,
                                                                    int r, int b_in, int b_out) {
    blast_mix_tc2_block<64>(Zt, S, W, T, ldz, r, b_in, b_out);
}

// v3: 32-token tiles, 57 KB of shared memory -> 3-4 blocks per SM instead of 2, so one block's
// loads overlap another's math and stores (v2 ran one load->compute->store wave per block at
// 12% occupancy).
extern "C" __global__ void __launch_bounds__(256) blr_blast_mix_tc3(const bf16* __restrict__ Zt,
                                                                    const bf16* __restrict__ S,
                                                                    bf16* __restrict__ W, int T, int ldz,
                                                                    int r, int b_in, int b_out) {
    blast_mix_tc2_block<32>(Zt, S, W, T, ldz, r, b_in, b_out);
}
