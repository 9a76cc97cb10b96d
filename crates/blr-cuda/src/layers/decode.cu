// Decode (T <= 16 tokens) forward for BLAST, low-rank and Monarch in ONE persistent launch.
//
// Every BLR format here is two weight-streaming stages with a tiny intermediate:
//   stage 1: z[t, j, k] = sum_c w1[j][k][c] * x[t, j*q1 + c]     (w1: BLAST V^T, LR V, Monarch w1)
//   mixing : w[blk][t][k] from z (BLAST: sum_j s[k][i][j] z[t,j,k]; LR: copy; Monarch: the
//            permutation P, (j, k) -> (l, s) = ((j*R + k) % b, (j*R + k) / b))
//   stage 2: y[t, out(blk, o)] = sum_k w2[blk][o][k] * w[blk][t][k] (w2: BLAST U, LR U, Monarch w2)
// At T <= 16 the layer is bound by streaming the weights once (BLAST llama7b qkvo: 17.3 MB,
// 5.8 us at 3 TB/s; dense 33.5 MB, 11 us).
//
// Two kernels, one body: blr_decode (up to 128 registers per thread, one block per SM) and
// blr_decode_half (64 registers, shared memory capped at half the SM: a second block, the next
// layer's, fits beside it). Structure (one block of 512 threads per SM, grid = SM count):
//  prologue  issued before griddepcontrol.wait, touches only weights (constant for the launch):
//            cp.async of BLAST's S rows for the block's first S_TASKS phase-1 tasks (group 1)
//            and of the phase-2 weight rows of its first `smem_tasks` phase-2 tasks into shared
//            memory (group 2); with PREFETCH_W1, an L2 prefetch of every phase-1 weight row the
//            block will read. Launched with programmatic dependent launch (PDL), this runs while
//            the previous kernel in the stream drains.
//  wait      griddepcontrol.wait: the previous grid has finished and its writes are visible
//            (a no-op for a launch without PDL). x, wbuf, y and the barrier words are only
//            touched after it, so layers that share a workspace may follow each other.
//  phase 1   stage 1 + mixing: task = 8 ranks x all input blocks (the mixing needs every j of a
//            rank, so it runs in the task's epilogue from shared memory), writes wbuf.
//  barrier   grid-wide; then griddepcontrol.launch_dependents (every block of this grid is
//            resident by then, so a dependent grid that starts early cannot starve it).
//  phase 2   stage 2, tasks of 16 output rows x all of K, P = 1, 2 or 4 tasks at a time per
//            block; rows staged in shared memory are read from there, the rest streamed (and
//            L2-prefetched before the barrier).
// Launch (layers/decode.rs): cooperative, or an ordinary launch with PDL allowed. Both need the
// grid co-resident: the occupancy query bounds it; a plain launch can then only be delayed,
// never deadlocked, by other work (blocks that wait at the barrier hold their SM, the missing
// ones start when the SMs of earlier kernels free up, and nothing later can start before every
// block has passed the barrier).
//
// Tensor cores do the dot products (M = 16 token rows, rows >= T zero): weights are the B
// operand, read straight from global or shared memory with 16-byte loads. The 8 consecutive k a
// thread loads (k = 32*s + 8c + e) are fed to two m16n8k16 MMAs as logical k {2c,2c+1,2c+8,2c+9}
// (e = 0..3) and then e = 4..7; activations are loaded with the same mapping, so the K order is
// permuted consistently and every load is 16 bytes, coalesced into 64-byte row segments.
// Intermediate wbuf: (nb2, 16, r2) bf16 (rows t >= T unused), written in phase 1, read from L2
// in phase 2 (ld.global.cg: L1 is not coherent across SMs).
// Requirements (launcher checks): T <= 16, q1, r2, n % 8 == 0, nb1 <= 16 in BLAST mode,
// grid <= co-resident blocks, barrier words zeroed once before first use.
// Dynamic shared memory: max(nb1*128, 1024)*4 + S_TASKS*4096 + smem_tasks * 16 * (r2 + 8) * 2 B.
#include "common.cuh"

#ifdef BLR_DEC_TIMING
// Development only: phase boundaries (globaltimer ns): [0] first block start (min), [1] last
// block done with phase 1, [2] last block past the barrier, [3] last block done, [4] last block
// with its phase-1 loads+MMAs done.
__device__ unsigned long long blr_dec_times[8];
static __device__ __forceinline__ void blr_dec_mark(int which, bool is_min) {
    if (threadIdx.x == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (is_min)
            atomicMin(&blr_dec_times[which], t);
        else
            atomicMax(&blr_dec_times[which], t);
    }
}
#define BLR_DEC_MARK(w, m) blr_dec_mark(w, m)
#else
#define BLR_DEC_MARK(w, m)
#endif

namespace blr_dec {
constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;
constexpr int S_TASKS = 4;  // phase-1 tasks per block whose S rows are staged in smem
constexpr int PREFETCH_W1 = 1;  // flags bit: L2-prefetch the block's phase-1 rows in the prologue
}  // namespace blr_dec

// Programmatic dependent launch (sm_90+); both are no-ops for a grid launched without it.
static __device__ __forceinline__ void blr_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
static __device__ __forceinline__ void blr_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Generation barrier: bar[0] counts arrivals, bar[1] is the generation. The last block to arrive
// resets the count before bumping the generation, so the words are ready for the next launch
// (graph replays included). One fence per block: thread 0 publishes the block's writes (ordered
// before it by __syncthreads) and acquires everyone else's.
static __device__ __forceinline__ void blr_grid_barrier(unsigned* bar, unsigned nblocks) {
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile unsigned* vgen = bar + 1;
        unsigned gen = *vgen;
        __threadfence();
        unsigned arrived = atomicAdd(bar, 1u);
        if (arrived == nblocks - 1) {
            atomicExch(bar, 0u);
            __threadfence();
            atomicAdd(bar + 1, 1u);
        } else {
            while (*vgen == gen) {
            }
        }
        __threadfence();
    }
    __syncthreads();
}

// Adds a warp's m16n8 accumulator (rows t = g, g+8; ranks 2c, 2c+1) into zj[t][8].
static __device__ __forceinline__ void dec_flush_acc(float* zj, float* acc, int g, int c) {
    atomicAdd(zj + g * 8 + 2 * c, acc[0]);
    atomicAdd(zj + g * 8 + 2 * c + 1, acc[1]);
    atomicAdd(zj + (g + 8) * 8 + 2 * c, acc[2]);
    atomicAdd(zj + (g + 8) * 8 + 2 * c + 1, acc[3]);
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
}

// Stage 1 of one phase-1 task (ranks rank0..rank0+7, every input block): the warp runs items
// [it_begin, it_end) of the (j, 32-wide k step) list, U1 in flight, and adds its sums into
// zs[j][t][kk] (zeroed by the caller).
template <int U1>
static __device__ __forceinline__ void dec_stage1(const bf16* __restrict__ x, const bf16* __restrict__ w1,
                                                  float* zs, int T, int n, int r1, int q1, int nk1, int rank0,
                                                  int it_begin, int it_end) {
    using namespace blr_dec;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int c = lane & 3;
    const bool tg_ok = g < T;
    const bool tg8_ok = g + 8 < T;
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    const int rank = rank0 + g;
    const bool rank_ok = rank < r1;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int cur_j = it_begin < it_end ? it_begin / nk1 : 0;
    for (int ib = it_begin; ib < it_end; ib += U1) {
        uint4 bw[U1], xa[U1], xb[U1];
#pragma unroll
        for (int u = 0; u < U1; ++u) {
            const int it = ib + u;
            const int j = it / nk1;
            const int kof = (it - j * nk1) * 32 + 8 * c;
            const bool kok = (it < it_end) && (kof < q1);
            bw[u] = (kok && rank_ok) ? ld_stream16(w1 + ((long)j * r1 + rank) * q1 + kof) : zero4;
            const bf16* xp = x + (long)j * q1 + kof;
            xa[u] = (kok && tg_ok) ? ld_ro16(xp + (long)g * n) : zero4;
            xb[u] = (kok && tg8_ok) ? ld_ro16(xp + (long)(g + 8) * n) : zero4;
        }
#pragma unroll
        for (int u = 0; u < U1; ++u) {
            const int it = ib + u;
            if (it < it_end) {
                const int j = it / nk1;
                if (j != cur_j) {
                    dec_flush_acc(zs + cur_j * 128, acc, g, c);
                    cur_j = j;
                }
                mma_bf16(acc, xa[u].x, xb[u].x, xa[u].y, xb[u].y, bw[u].x, bw[u].y);
                mma_bf16(acc, xa[u].z, xb[u].z, xa[u].w, xb[u].w, bw[u].z, bw[u].w);
            }
        }
    }
    if (it_begin < it_end) dec_flush_acc(zs + cur_j * 128, acc, g, c);
}

// The epilogue of a phase-1 task: zs[j][t][kk] (complete) -> wbuf[blk][t][k] per format.
// BLAST reads S_dev[k][i][0..16) from `ss` (staged, 8 ranks x 16 x 16) when non-null, else
// from global memory.
static __device__ __forceinline__ void dec_mix(const float* zs, const bf16* __restrict__ s, const bf16* ss,
                                               bf16* wbuf, int mode, int T, int nb1, int r1, int nb2, int r2,
                                               int rank0) {
    using namespace blr_dec;
    const int tid = threadIdx.x;
    if (mode == 0) {
        // BLAST: w[i][t][k] = sum_j s[k][i][j] z[t][j][k].
        for (int pidx = tid; pidx < nb2 * 8; pidx += THREADS) {
            const int i = pidx >> 3;
            const int kk = pidx & 7;
            const int k = rank0 + kk;
            if (k >= r1) continue;
            uint4 s0, s1;
            if (ss) {
                const bf16* sp = ss + (kk * 16 + i) * 16;
                s0 = *reinterpret_cast<const uint4*>(sp);
                s1 = *reinterpret_cast<const uint4*>(sp + 8);
            } else {
                const bf16* sp = s + ((long)k * 16 + i) * 16;
                s0 = ld_ro16(sp);
                s1 = ld_ro16(sp + 8);
            }
            const float sv[16] = {bf16_lo(s0.x), bf16_hi(s0.x), bf16_lo(s0.y), bf16_hi(s0.y),
                                  bf16_lo(s0.z), bf16_hi(s0.z), bf16_lo(s0.w), bf16_hi(s0.w),
                                  bf16_lo(s1.x), bf16_hi(s1.x), bf16_lo(s1.y), bf16_hi(s1.y),
                                  bf16_lo(s1.z), bf16_hi(s1.z), bf16_lo(s1.w), bf16_hi(s1.w)};
            for (int t = 0; t < T; ++t) {
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < 16; ++j)
                    if (j < nb1) sum += sv[j] * zs[(j * 16 + t) * 8 + kk];
                wbuf[((long)i * 16 + t) * r2 + k] = __float2bfloat16(sum);
            }
        }
    } else if (mode == 1) {
        // Low-rank: one block, a copy.
        for (int pidx = tid; pidx < 128; pidx += THREADS) {
            const int t = pidx >> 3;
            const int k = rank0 + (pidx & 7);
            if (t < T && k < r1) wbuf[(long)t * r2 + k] = __float2bfloat16(zs[pidx]);
        }
    } else {
        // Monarch: flat index f = j*R + k of out1 (T, b, R) goes to P[l = f % b][t][s = f / b].
        for (int pidx = tid; pidx < nb1 * 128; pidx += THREADS) {
            const int kk = pidx & 7;
            const int t = (pidx >> 3) & 15;
            const int j = pidx >> 7;
            const int k = rank0 + kk;
            if (t < T && k < r1) {
                const long f = (long)j * r1 + k;
                const int l = (int)(f % nb2);
                const long sidx = f / nb2;
                wbuf[((long)l * 16 + t) * r2 + sidx] = __float2bfloat16(zs[pidx]);
            }
        }
    }
}

// L2 prefetch of the 128-byte lines covering bytes [p, p + len), spread over the block.
static __device__ __forceinline__ void dec_prefetch_range(const void* p, long len) {
    const unsigned long long a0 = reinterpret_cast<unsigned long long>(p) & ~127ull;
    const unsigned long long a1 = reinterpret_cast<unsigned long long>(p) + len;
    const long lines = (long)((a1 - a0 + 127) >> 7);
    for (long li = threadIdx.x; li < lines; li += blr_dec::THREADS)
        prefetch_l2(reinterpret_cast<const void*>(a0 + (unsigned long long)li * 128));
}

// The kernel body; U1 phase-1 items and U2 phase-2 k steps in flight per warp.
template <int U1, int U2>
static __device__ __forceinline__ void blr_decode_body(const bf16* __restrict__ x, const bf16* __restrict__ w1,
                                                       const bf16* __restrict__ s, const bf16* __restrict__ w2,
                                                       bf16* __restrict__ y, bf16* wbuf, unsigned* bar, int T,
                                                       int n, int m, int mode, int nb1, int r1, int q1, int nb2,
                                                       int p2, int r2, int smem_tasks, int flags) {
    using namespace blr_dec;
    extern __shared__ __align__(16) unsigned char blr_dec_smem[];
    float* zs = reinterpret_cast<float*>(blr_dec_smem);
    const int zs_floats = max(nb1 * 128, 1024);  // phase 2 uses 4 x 256
    bf16* ss = reinterpret_cast<bf16*>(blr_dec_smem + zs_floats * 4);
    bf16* us = reinterpret_cast<bf16*>(blr_dec_smem + zs_floats * 4 + S_TASKS * 4096);
    const int urow = r2 + 8;  // padded row (elements): the 8 rows of one 16-byte load phase hit distinct banks
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int c = lane & 3;
    BLR_DEC_MARK(0, true);

    const int tasks1 = (r1 + 7) >> 3;
    const int otiles = (p2 + 15) >> 4;
    const int tasks2 = nb2 * otiles;

    // ---------------- prologue: weights only ----------------
    if (flags & PREFETCH_W1) {
        for (int task = blockIdx.x; task < tasks1; task += gridDim.x) {
            const int rows = min(8, r1 - task * 8);
            for (int j = 0; j < nb1; ++j)
                dec_prefetch_range(w1 + ((long)j * r1 + task * 8) * q1, (long)rows * q1 * 2);
        }
    }
    // cp.async group 1: BLAST's S rows for this block's first phase-1 tasks (needed first).
    if (mode == 0) {
        int sslot = 0;
        for (int task = blockIdx.x; task < tasks1 && sslot < S_TASKS; task += gridDim.x, ++sslot) {
            for (int idx = tid; idx < 8 * 32; idx += THREADS) {
                const int k = task * 8 + (idx >> 5);
                const bool ok = k < r1;
                const bf16* src = ok ? s + (long)k * 256 + (idx & 31) * 8 : s;
                cp_async16(smem_addr(ss + sslot * 2048 + idx * 8), src, ok);
            }
        }
    }
    cp_async_commit();
    // cp.async group 2: the phase-2 weights of the block's first smem_tasks tasks.
    {
        const int chunks_per_row = r2 >> 3;
        const int per_task = 16 * chunks_per_row;
        int slot = 0;
        for (int task = blockIdx.x; task < tasks2 && slot < smem_tasks; task += gridDim.x, ++slot) {
            const int blk = task / otiles;
            const int o0 = (task - blk * otiles) * 16;
            for (int idx = tid; idx < per_task; idx += THREADS) {
                const int rr = idx / chunks_per_row;
                const int ch = idx - rr * chunks_per_row;
                const bool ok = o0 + rr < p2;
                const bf16* src = ok ? w2 + ((long)blk * p2 + o0 + rr) * r2 + ch * 8 : w2;
                cp_async16(smem_addr(us + ((long)slot * 16 + rr) * urow + ch * 8), src, ok);
            }
        }
        cp_async_commit();
    }

    blr_pdl_wait();

    // ---------------- phase 1: stage 1 + mixing ----------------
    const int nk1 = (q1 + 31) >> 5;
    const int items = nb1 * nk1;
    const int per = (items + WARPS - 1) / WARPS;
    const int it_begin = warp * per;
    const int it_end = min(items, it_begin + per);
    int p1slot = 0;
    for (int task = blockIdx.x; task < tasks1; task += gridDim.x, ++p1slot) {
        const int rank0 = task * 8;
        for (int i = tid; i < nb1 * 128; i += THREADS) zs[i] = 0.f;
        __syncthreads();
        dec_stage1<U1>(x, w1, zs, T, n, r1, q1, nk1, rank0, it_begin, it_end);
        BLR_DEC_MARK(4, false);
        // The staged S (group 1) must have landed; the phase-2 weights (group 2) may still fly.
        const bool staged = mode == 0 && p1slot < S_TASKS;
        if (staged) cp_async_wait<1>();
        __syncthreads();
        dec_mix(zs, s, staged ? ss + p1slot * 2048 : nullptr, wbuf, mode, T, nb1, r1, nb2, r2, rank0);
        __syncthreads();
    }
    BLR_DEC_MARK(1, false);

    // L2 prefetch for the phase-2 tasks that do not fit in shared memory.
    {
        const int lines_per_row = (int)(((long)r2 * 2 + 127) / 128);
        int slot = 0;
        for (int task = blockIdx.x; task < tasks2; task += gridDim.x, ++slot) {
            if (slot < smem_tasks) continue;
            const int blk = task / otiles;
            const int o0 = (task - blk * otiles) * 16;
            for (int li = tid; li < 16 * lines_per_row; li += THREADS) {
                const int rr = li / lines_per_row;
                const int ln = li - rr * lines_per_row;
                if (o0 + rr < p2)
                    prefetch_l2(reinterpret_cast<const char*>(w2 + ((long)blk * p2 + o0 + rr) * r2) + ln * 128);
            }
        }
    }

    blr_grid_barrier(bar, gridDim.x);
    blr_pdl_launch_dependents();
    cp_async_wait<0>();
    __syncthreads();
    BLR_DEC_MARK(2, false);

    // ---------------- phase 2: stage 2 ----------------
    // The block's tasks run P at a time (P = 1, 2 or 4 groups of 16/P warps), so a block with
    // several tasks pays one load round trip per P tasks instead of one per task.
    const bool tg_ok = g < T;
    const bool tg8_ok = g + 8 < T;
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    const int nk2 = (r2 + 31) >> 5;
    const int max_slots = (tasks2 + gridDim.x - 1) / gridDim.x;
    const int P = max_slots >= 4 ? 4 : (max_slots >= 2 ? 2 : 1);
    const int WG = WARPS / P;
    const int group = warp / WG;
    const int wig = warp - group * WG;
    const int gtid = tid - group * WG * 32;
    const int gthreads = WG * 32;
    float* ys = zs + group * 256;
    const int rounds = (max_slots + P - 1) / P;
    for (int round = 0; round < rounds; ++round) {
        const int slot = round * P + group;
        const int task = blockIdx.x + slot * gridDim.x;
        const bool valid = task < tasks2;
        const int blk = valid ? task / otiles : 0;
        const int o0 = valid ? (task - blk * otiles) * 16 : 0;
        for (int i = gtid; i < 256; i += gthreads) ys[i] = 0.f;
        __syncthreads();
        if (valid) {
            float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            const int rowA = o0 + g;
            const int rowB = o0 + 8 + g;
            const bool okA = rowA < p2;
            const bool okB = rowB < p2;
            const bool in_smem = slot < smem_tasks;
            const bf16* wa = in_smem ? us + ((long)slot * 16 + g) * urow : w2 + ((long)blk * p2 + rowA) * r2;
            const bf16* wb = in_smem ? us + ((long)slot * 16 + 8 + g) * urow : w2 + ((long)blk * p2 + rowB) * r2;
            const bf16* za = wbuf + ((long)blk * 16 + g) * r2;
            const bf16* zb = wbuf + ((long)blk * 16 + g + 8) * r2;
            for (int ks0 = wig; ks0 < nk2; ks0 += WG * U2) {
                uint4 ba[U2], bb[U2], xa[U2], xb[U2];
#pragma unroll
                for (int u = 0; u < U2; ++u) {
                    const int ks = ks0 + u * WG;
                    const int kof = ks * 32 + 8 * c;
                    const bool ok = (ks < nk2) && (kof < r2);
                    if (in_smem) {
                        // Rows past p2 were zero-filled by cp.async.
                        ba[u] = ok ? *reinterpret_cast<const uint4*>(wa + kof) : zero4;
                        bb[u] = ok ? *reinterpret_cast<const uint4*>(wb + kof) : zero4;
                    } else {
                        ba[u] = (ok && okA) ? ld_stream16(wa + kof) : zero4;
                        bb[u] = (ok && okB) ? ld_stream16(wb + kof) : zero4;
                    }
                    xa[u] = (ok && tg_ok) ? ld_cg16(za + kof) : zero4;
                    xb[u] = (ok && tg8_ok) ? ld_cg16(zb + kof) : zero4;
                }
#pragma unroll
                for (int u = 0; u < U2; ++u) {
                    mma_bf16(acc[0], xa[u].x, xb[u].x, xa[u].y, xb[u].y, ba[u].x, ba[u].y);
                    mma_bf16(acc[0], xa[u].z, xb[u].z, xa[u].w, xb[u].w, ba[u].z, ba[u].w);
                    mma_bf16(acc[1], xa[u].x, xb[u].x, xa[u].y, xb[u].y, bb[u].x, bb[u].y);
                    mma_bf16(acc[1], xa[u].z, xb[u].z, xa[u].w, xb[u].w, bb[u].z, bb[u].w);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    atomicAdd(ys + (g + ((e >> 1) << 3)) * 16 + nt * 8 + 2 * c + (e & 1), acc[nt][e]);
        }
        __syncthreads();
        if (valid) {
            for (int i = gtid; i < 256; i += gthreads) {
                const int t = i >> 4;
                const int o = o0 + (i & 15);
                if (t < T && o < p2) {
                    const long col = mode == 2 ? (long)o * nb2 + blk : (long)blk * p2 + o;
                    y[(long)t * m + col] = __float2bfloat16(ys[i]);
                }
            }
        }
        __syncthreads();
    }
    BLR_DEC_MARK(3, false);
}

// One block per SM with up to 128 registers per thread: the most loads in flight.
extern "C" __global__ void __launch_bounds__(blr_dec::THREADS, 1)
    blr_decode(const bf16* __restrict__ x, const bf16* __restrict__ w1, const bf16* __restrict__ s,
               const bf16* __restrict__ w2, bf16* __restrict__ y, bf16* wbuf, unsigned* bar, int T, int n, int m,
               int mode, int nb1, int r1, int q1, int nb2, int p2, int r2, int smem_tasks, int flags) {
    blr_decode_body<8, 4>(x, w1, s, w2, y, wbuf, bar, T, n, m, mode, nb1, r1, q1, nb2, p2, r2, smem_tasks, flags);
}

// Half an SM (64 registers per thread; the launcher keeps shared memory under half the SM's):
// two blocks fit on one SM, so with PDL the next layer's block becomes resident and issues its
// weight copies while this layer's block is still in its barrier or phase 2.
extern "C" __global__ void __launch_bounds__(blr_dec::THREADS, 2)
    blr_decode_half(const bf16* __restrict__ x, const bf16* __restrict__ w1, const bf16* __restrict__ s,
                    const bf16* __restrict__ w2, bf16* __restrict__ y, bf16* wbuf, unsigned* bar, int T, int n,
                    int m, int mode, int nb1, int r1, int q1, int nb2, int p2, int r2, int smem_tasks, int flags) {
    blr_decode_body<4, 2>(x, w1, s, w2, y, wbuf, bar, T, n, m, mode, nb1, r1, q1, nb2, p2, r2, smem_tasks, flags);
}
