// BLAST stage 1 + mixing in one kernel (sm_90a, wgmma): W_i = sum_j s_ij . (X_j V_j) for a
// tile of tokens x ranks, Z never leaves the chip. Stage 3 (Y_i = W_i U_i^T) stays the cuBLASLt
// batched GEMM that reads W. Notation of BRIEF section 2: X (T, n), b_in input blocks of width
// q = n / b_in, V^T stored (b_in, r, q), S packed (r, 16, 16) [k][i][j] (layers::pack_blast_s),
// W (b_out, T, r) [i][t][k], exactly what blr_blast_mix_tc2/tc4 write.
//
// CTA tile: TT = 64 tokens x KC = 64 ranks, all b_in blocks j (grid: token tiles fastest, then
// rank tiles; one CTA per SM: 230 KB of shared memory). 256 threads = 2 warpgroups; warpgroup g
// computes Z_j for j = 2*jp + g, jp = 0..ceil(b_in/2)-1:
//   Z_j^T (64 ranks x 64 tokens) = V_j^T[k0.., :] (A, M = ranks) * X_j[t0.., :]^T (B, N = tokens)
// as wgmma m64n64k16 over K = q in stages of 64. A stage holds V_j, V_j+1, X_j, X_j+1 tiles
// (4 x 64 rows x 128 B, the canonical 128-byte-swizzle K-major layout of blr_monarch_stage1_wg:
// chunk c of row r at c ^ (r & 7), 1024-byte aligned; descriptor stride 1024 B, +32 B per k16
// step), loaded with cp.async two stages ahead, one pipeline per warpgroup (see the kernel).
// The stage after the last receives S for the tile's 64 ranks.
// After the last K stage of j the accumulators (rows = ranks, column pairs = tokens) go to
// shared memory as bf16 plane Zt[j][k][t] (64 x 64, 16-byte chunks swizzled by t-chunk ^ (k & 7)
// so the 4-byte fragment stores are conflict-free; planes 4104 elements apart, so the 8 j-rows
// of one ldmatrix phase fall in distinct bank groups). Planes j >= b_in are zero.
// Mixing (after the K loop, per half of 32 ranks): warp w takes tokens 16(w&3).. and 16 ranks;
// per rank k, W[t][i] (16 x 16) = Z[t][j] (ldmatrix.trans of the 16 planes) * S[k]^T, two
// m16n8k16 MMAs (the code of blr_blast_mix_tc2 on this layout); 8 consecutive ranks are packed
// into a 16-byte row piece, staged in the two free slots ([i][t][32 ranks], chunks swizzled by
// (i >> 1) & 3 for conflict-free 16-byte stores) and written as 64-byte row segments of W.
// Bytes through L2 per CTA: X tile 64 x n + V tile 64 x n (1 MB for llama7b q/k/v/o), so L2
// reads = (r/KC)|X| + (T/TT)|V| = 256 MB at q/k/v/o T=1024; DRAM: X and V once, W written
// (docs/perf/kernel-notes.md "BLAST stage 1 + mixing in one kernel" has prediction and outcome).
// Requirements (launcher checks): b_in, b_out <= 16; q, r, n multiples of 8; sm_90a.
// Measured (H100, llama7b q/k/v/o T=1024, same call as split): layer 73.1 us (81.3 for the
// first version) against 70.0 for cuBLASLt stage 1 + blr_blast_mix_tc4; ncu 62.2 (72.1) us for the
// kernel, 253 / 251 MB through L2 as predicted, but L2 throughput only 29-35%: one CTA per SM
// with 8 warps (0.65 eligible per scheduler) cannot keep the loads, the wgmmas and the
// epilogue's W burst in flight together. Not the default (layers/blast_s12.rs).
#include "common.cuh"

namespace blr_s12 {
constexpr int TT = 64;
constexpr int KC = 64;
constexpr int BK = 64;
constexpr int JP = 16;
constexpr int THREADS = 256;
constexpr int TILE_BYTES = 64 * BK * 2;        // 8 KB: one 64-row operand tile
constexpr int SLOT_BYTES = 4 * TILE_BYTES;     // V_j, V_j+1, X_j, X_j+1 (= S for 64 ranks)
constexpr int SLOTS = 3;
constexpr int PLANE = KC * TT + 8;             // elements per Zt plane (+16 B)
constexpr int Z_OFF = SLOTS * SLOT_BYTES;      // bytes
constexpr int SMEM_BYTES = Z_OFF + JP * PLANE * 2;
static_assert(KC * 256 * 2 == SLOT_BYTES, "S for the tile's ranks fills one slot");
static_assert(8 * TT * 32 * 2 == SLOT_BYTES, "half a W staging tile fills one slot");

static __device__ __forceinline__ int swz(int row, int chunk) {
    return row * BK + ((chunk ^ (row & 7)) << 3);
}
// Element offset of (k, t) inside a Zt plane.
static __device__ __forceinline__ int zoff(int k, int t) {
    return k * TT + ((((t >> 3) ^ (k & 7)) << 3) | (t & 7));
}
}  // namespace blr_s12

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BLR_S12_HAVE_WGMMA 1
static __device__ __forceinline__ unsigned long long s12_desc(blr_u32 saddr) {
    return (unsigned long long)((saddr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
// D (64 x 64, f32; per warp 16 rows, d[n8 block][0..3] in the m16n8 C layout) += A B^T.
static __device__ __forceinline__ void s12_mma_m64n64k16(float (&d)[8][4], unsigned long long da,
                                                         unsigned long long db) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
        "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
          "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),
          "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),
          "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(da), "l"(db), "r"(1));
}
#endif

// The mixing and W stores of one tile (both kernels): Zt planes in zs (visible to every thread),
// S rows of ranks 0-31 at s_lo and 32-63 at s_hi (256 elements each), four free 16 KB staging
// areas st0..st3 (i-planes 4q..4q+3 in st_q). Per half of 32 ranks, warp w mixes tokens
// 16(w&3).. x ranks 16(w>>2).., stages, and the block writes 64-byte W row segments.
static __device__ __forceinline__ bf16* s12_pick(int q, bf16* a, bf16* b, bf16* c, bf16* d) {
    return q == 0 ? a : q == 1 ? b : q == 2 ? c : d;
}
static __device__ __forceinline__ void s12_mix_store(const bf16* zs, const bf16* s_lo, const bf16* s_hi, bf16* st0,
                                                     bf16* st1, bf16* st2, bf16* st3, bf16* __restrict__ W, int t0,
                                                     int k0, int T, int r, int b_out) {
    using namespace blr_s12;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int wg = warp >> 2;
    const int g8 = lane >> 2;
    const int c4 = lane & 3;
    const int tw = (warp & 3) * 16;
    const int lj = (lane & 7) + ((lane >> 4) << 3);
    const int lt = tw + (((lane >> 3) & 1) << 3);
    const long ldwi = (long)T * r;
#pragma unroll 1
    for (int hf = 0; hf < 2; ++hf) {
        const bf16* ss = hf ? s_hi : s_lo;
        const int kh = wg * 16;  // within the half
        blr_u32 res[2][2][4][4];
#pragma unroll
        for (int kbi = 0; kbi < 2; ++kbi) {
            float out[2][4][8];
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                const int k = kh + kbi * 8 + kk;
                blr_u32 a0, a1, a2, a3;
                ldmatrix_x4_trans(smem_addr(zs + lj * PLANE + zoff(hf * 32 + k, lt)), a0, a1, a2, a3);
                const blr_u32* srow = reinterpret_cast<const blr_u32*>(ss + k * 256);
#pragma unroll
                for (int it = 0; it < 2; ++it) {
                    const blr_u32 b0 = srow[(it * 8 + g8) * 8 + c4];
                    const blr_u32 b1 = srow[(it * 8 + g8) * 8 + 4 + c4];
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
                    for (int h = 0; h < 4; ++h)
                        res[kbi][it][e][h] = pack_bf16x2(out[it][e][2 * h], out[it][e][2 * h + 1]);
        }
        // Staging [i][t][32 ranks]; 16-byte chunk ch of a row at ch ^ ((i >> 1) & 3), so the
        // 8 lanes of each store phase hit 8 distinct bank groups.
#pragma unroll
        for (int kbi = 0; kbi < 2; ++kbi)
#pragma unroll
            for (int it = 0; it < 2; ++it)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = it * 8 + 2 * c4 + (e & 1);
                    const int t = tw + g8 + ((e >> 1) << 3);
                    const int ch = wg * 2 + kbi;
                    bf16* st = s12_pick(i >> 2, st0, st1, st2, st3) + (i & 3) * (TT * 32) + t * 32 +
                               ((ch ^ ((i >> 1) & 3)) << 3);
                    *reinterpret_cast<uint4*>(st) =
                        make_uint4(res[kbi][it][e][0], res[kbi][it][e][1], res[kbi][it][e][2], res[kbi][it][e][3]);
                }
        __syncthreads();
        for (int idx = tid; idx < 16 * TT * 4; idx += THREADS) {
            const int ch = idx & 3;
            const int t = (idx >> 2) & (TT - 1);
            const int i = idx >> 8;
            const int gt = t0 + t;
            const int gk = k0 + hf * 32 + ch * 8;
            if (i < b_out && gt < T && gk < r) {
                const bf16* st = s12_pick(i >> 2, st0, st1, st2, st3) + (i & 3) * (TT * 32) + t * 32 +
                                 ((ch ^ ((i >> 1) & 3)) << 3);
                *reinterpret_cast<uint4*>(W + (long)i * ldwi + (long)gt * r + gk) =
                    *reinterpret_cast<const uint4*>(st);
            }
        }
        __syncthreads();  // the staging areas are rewritten by the next half
    }
}

// Grid (ceil(T/64), ceil(r/64)); 256 threads; dynamic shared memory blr_s12::SMEM_BYTES + 1024
// (the slots start at the next 1024-byte boundary). W planes are ldwi = T*r elements apart.
// `ablate` (0 in the product; BLR_S12_ABLATE for measurements, the output is then wrong): bit 0
// skips the wgmmas, bit 1 the Z stores, mixing and W stores, bit 2 the stage loads, bit 3 the
// proxy fence.
// One load pipeline per warpgroup. Warpgroup g loads
// only its own operands (V_j and X_j, j = 2*jp + g: 16 KB per stage, 3 slots of its own at
// g * 48 KB) and synchronises with named barriers among its 128 threads, so the two warpgroups
// drift instead of meeting at a block barrier every stage; its wgmmas stay in flight while it
// waits for the next stage (wgmma.wait_group 1; 0 only where Z_j is complete). The slot of stage
// s - 1 is refilled (stage s + 2) only after a second named barrier that follows every warp's
// wait for stage s - 1's wgmmas. The stage after the last loads S rows 32g..32g+31 of the tile.
// The first version (one block-wide pipeline, every stage's wgmmas waited for before its slot
// was refilled: 81.3 against 73.1 us) is in git history (commit e8f5d91) and
// docs/perf/kernel-notes.md ("BLAST stage 1 + mixing in one kernel").
extern "C" __global__ void __launch_bounds__(256, 1)
    blr_blast_s12_wg2(const bf16* __restrict__ X, const bf16* __restrict__ Vt, const bf16* __restrict__ S,
                      bf16* __restrict__ W, int T, int n, int q, int r, int b_in, int b_out, int ablate) {
#if defined(BLR_S12_HAVE_WGMMA)
    using namespace blr_s12;
    constexpr int HSLOT = SLOT_BYTES / 2;  // 16 KB: V_j tile, X_j tile
    extern __shared__ __align__(1024) unsigned char blr_s12b_smem[];
    const blr_u32 base0 = smem_addr(blr_s12b_smem);
    unsigned char* smem = blr_s12b_smem + (((base0 + 1023u) & ~1023u) - base0);
    bf16* zs = reinterpret_cast<bf16*>(smem + Z_OFF);

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int wg = warp >> 2;
    const int tg = tid & 127;
    const int t0 = blockIdx.x * TT;
    const int k0 = blockIdx.y * KC;
    const int kt_n = (q + BK - 1) / BK;
    const int pairs = (b_in + 1) >> 1;
    const int ns = pairs * kt_n;

    for (int idx = tid; idx < (JP - 2 * pairs) * (PLANE / 8); idx += THREADS)
        reinterpret_cast<uint4*>(zs + 2 * pairs * PLANE)[idx] = make_uint4(0u, 0u, 0u, 0u);

    // Thread tg copies chunk lc of rows r0 + 16 * rr (rr < 4) of both operand tiles.
    const int lc = tg & 7;
    const int r0 = tg >> 3;
    const blr_u32 region = smem_addr(smem) + wg * 3 * HSLOT;
    blr_u32 so[4];
    bool vrow[4], xrow[4];
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
        so[rr] = swz(r0 + 16 * rr, lc) * 2;
        vrow[rr] = k0 + r0 + 16 * rr < r;
        xrow[rr] = t0 + r0 + 16 * rr < T;
    }
    const bf16* vp = Vt + ((long)wg * r + k0 + r0) * q + lc * 8;
    const bf16* xp = X + (long)(t0 + r0) * n + (long)wg * q + lc * 8;
    const long vstep = 16L * q, xstep = 16L * n;
    int ld_v = 0, ld_jp = 0, ld_kt = 0, ld_slot = 0;
    auto load_next = [&]() {
        const blr_u32 sl = region + ld_slot * HSLOT;
        if (ld_v < ns) {
            if (!(ablate & 4)) {
                const int kq = ld_kt * BK;
                const bool jok = kq + lc * 8 < q && 2 * ld_jp + wg < b_in;
                const bf16* va = vp + (long)(2 * ld_jp) * r * q + kq;
                const bf16* xa = xp + (long)(2 * ld_jp) * q + kq;
#pragma unroll
                for (int rr = 0; rr < 4; ++rr) {
                    const bool pa = jok && vrow[rr];
                    const bool pb = jok && xrow[rr];
                    cp_async16(sl + so[rr], pa ? va + rr * vstep : Vt, pa);
                    cp_async16(sl + TILE_BYTES + so[rr], pb ? xa + rr * xstep : X, pb);
                }
            }
        } else if (ld_v == ns) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int idx = tg + 128 * i;
                const int k = k0 + 32 * wg + (idx >> 5);
                const bool p = k < r;
                cp_async16(sl + idx * 16, p ? S + (long)k * 256 + (idx & 31) * 8 : S, p);
            }
        }
        ++ld_v;
        if (++ld_kt == kt_n) {
            ld_kt = 0;
            ++ld_jp;
        }
        if (++ld_slot == SLOTS) ld_slot = 0;
    };
    auto wg_bar = [&]() { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); };

    load_next();
    cp_async_commit();
    load_next();
    cp_async_commit();

    float acc[8][4];
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][e] = 0.f;

    const int g8 = lane >> 2;
    const int c4 = lane & 3;
    const int wl = warp & 3;
    int jp = 0, kt = 0, cslot = 0;
    for (int s = 0; s < ns; ++s) {
        cp_async_wait<1>();
        if (!(ablate & 8)) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        wg_bar();  // stage s is in this warpgroup's slot cslot
        const blr_u32 a0 = region + cslot * HSLOT;
        const blr_u32 b0 = a0 + TILE_BYTES;
        const bool last = kt == kt_n - 1;
        if (!(ablate & 1)) {
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk)
                s12_mma_m64n64k16(acc, s12_desc(a0 + kk * 32), s12_desc(b0 + kk * 32));
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            if (last)
                asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            else
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        }
        wg_bar();  // every warp's wgmmas of stage s - 1 are done: its slot may be refilled
        load_next();
        cp_async_commit();
        if (last && !(ablate & 2)) {
            bf16* plane = zs + (2 * jp + wg) * PLANE;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int k = wl * 16 + g8 + 8 * h;
                    *reinterpret_cast<blr_u32*>(plane + zoff(k, nb * 8 + 2 * c4)) =
                        pack_bf16x2(acc[nb][2 * h], acc[nb][2 * h + 1]);
                    acc[nb][2 * h] = 0.f;
                    acc[nb][2 * h + 1] = 0.f;
                }
        }
        if (++kt == kt_n) {
            kt = 0;
            ++jp;
        }
        if (++cslot == SLOTS) cslot = 0;
    }
    cp_async_wait<0>();
    __syncthreads();
    if (ablate & 2) return;

    // S rows 0-31 came with warpgroup 0's stream, 32-63 with warpgroup 1's; the two other slots
    // of each region are free for the W staging.
    auto slot_ptr = [&](int g, int sl) { return reinterpret_cast<bf16*>(smem + g * 3 * HSLOT + sl * HSLOT); };
    const int ssl = ns % SLOTS;
    const int f1 = (ns + 1) % SLOTS, f2 = (ns + 2) % SLOTS;
    s12_mix_store(zs, slot_ptr(0, ssl), slot_ptr(1, ssl), slot_ptr(0, f1), slot_ptr(0, f2), slot_ptr(1, f1),
                  slot_ptr(1, f2), W, t0, k0, T, r, b_out);
#endif
}
