// Attention of the CUDA model backend: a flash-style tensor-core kernel for prefill, and a
// split-over-keys kernel for decode (and for head sizes the tensor-core kernel does not take).
//
// Layouts (see backend.rs): q and out are (T, heads * hd) row-major. Keys and values are read
// through two strides, so the same kernels serve the KV cache (stored per kv head,
// cache[h][pos][d]: head stride capacity * hd, row stride hd) and plain (T, kv_heads * hd)
// tensors (head stride hd, row stride kv_heads * hd). Query row t sits at absolute position
// pos0 + t and, when causal, sees keys 0 ..= pos0 + t; otherwise all L keys. Grouped-query
// attention: query head h reads kv head h / group.
//
// Softmax runs in base 2 (scores pre-multiplied by scale * log2 e), fp32 throughout, with the
// online (running max / running sum) rescaling of FlashAttention, so no (T, L) score matrix is
// ever written.

#include <cuda_bf16.h>

typedef unsigned int u32;
#define NEG_INF (-__int_as_float(0x7f800000))

static __device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// ------------------------------------------------------------------------------------------
// Prefill: blr_flash_attn_{64,128}
//
// Tiles: a block of 4 warps owns 64 query rows of one head (grid: ceil(T/64) x heads); each
// warp owns 16 rows, kept as mma A fragments in registers for the whole kernel. Keys and values
// stream through shared memory 64 positions at a time: K as Ks[key][d] (the B operand of
// S = Q K^T, K-contiguous) and V transposed, Vt[d][key] (the B operand of O = P V). Both rows
// are padded by 8 bf16 so the fragment reads hit 32 distinct banks. S (16 x 64 per warp) lives
// in registers; after the online-softmax update it is re-packed in place as the bf16 A fragments
// of P V (the C layout of two adjacent n-tiles is exactly one A k-step). Causal blocks stop at
// the last key their last row can see, skipping the masked upper triangle.
// Bytes: Q read once, K and V read once per 64-row query block (L2-resident across the
// ceil(T/64) blocks of a head), O written once: per head ~2 * L * hd * 2 * ceil(T/64) bytes.
// Roofline: compute-bound at prefill sizes, 4 * T * L * hd FLOPs per head (halved when
// causal), on mma.sync (~660 TFLOP/s dense bf16 on H100 at best; this version does not
// double-buffer the K/V tiles, so it reaches a fraction of that).
// ------------------------------------------------------------------------------------------

#define FA_BQ 64
#define FA_BK 64
#define FA_THREADS 128

template <int HD>
static __device__ __forceinline__ void flash_attn(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                                  const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out,
                                                  long long kv_head_stride, int kv_row_stride, int T, int L, int pos0,
                                                  int causal, int heads, int group, float scale_log2) {
    __shared__ __align__(16) __nv_bfloat16 Ks[FA_BK][HD + 8];
    __shared__ __align__(16) __nv_bfloat16 Vt[HD][FA_BK + 8];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, kvh = h / group;
    const int q0 = blockIdx.x * FA_BQ;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const int q_stride = heads * HD;

    u32 qf[HD / 16][4];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
        const int col = h * HD + ks * 16 + 2 * tq;
        const __nv_bfloat16* p0 = q + (size_t)r0 * q_stride + col;
        const __nv_bfloat16* p1 = q + (size_t)r1 * q_stride + col;
        qf[ks][0] = r0 < T ? *reinterpret_cast<const u32*>(p0) : 0u;
        qf[ks][1] = r1 < T ? *reinterpret_cast<const u32*>(p1) : 0u;
        qf[ks][2] = r0 < T ? *reinterpret_cast<const u32*>(p0 + 8) : 0u;
        qf[ks][3] = r1 < T ? *reinterpret_cast<const u32*>(p1 + 8) : 0u;
    }

    float o[HD / 8][4];
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    const int lim0 = causal ? min(L, pos0 + r0 + 1) : L;
    const int lim1 = causal ? min(L, pos0 + r1 + 1) : L;
    const int kend = causal ? min(L, pos0 + min(T, q0 + FA_BQ)) : L;

    const __nv_bfloat16* kb = k + (size_t)kvh * kv_head_stride;
    const __nv_bfloat16* vb = v + (size_t)kvh * kv_head_stride;

    for (int k0 = 0; k0 < kend; k0 += FA_BK) {
        // Consecutive threads take consecutive key rows: the transposed V stores then fall in
        // distinct banks (one column of Vt per warp), and the K stores in distinct 16 B slots.
        for (int c = threadIdx.x; c < FA_BK * (HD / 8); c += FA_THREADS) {
            const int r = c % FA_BK, col = (c / FA_BK) * 8, j = k0 + r;
            uint4 kv4 = make_uint4(0u, 0u, 0u, 0u), vv4 = make_uint4(0u, 0u, 0u, 0u);
            if (j < kend) {
                kv4 = *reinterpret_cast<const uint4*>(kb + (size_t)j * kv_row_stride + col);
                vv4 = *reinterpret_cast<const uint4*>(vb + (size_t)j * kv_row_stride + col);
            }
            *reinterpret_cast<uint4*>(&Ks[r][col]) = kv4;
            const __nv_bfloat16* ve = reinterpret_cast<const __nv_bfloat16*>(&vv4);
#pragma unroll
            for (int e = 0; e < 8; ++e) Vt[col + e][r] = ve[e];
        }
        __syncthreads();

        float s[FA_BK / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_BK / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
#pragma unroll
            for (int nt = 0; nt < FA_BK / 8; ++nt) {
                const u32 b0 = *reinterpret_cast<const u32*>(&Ks[nt * 8 + g][ks * 16 + 2 * tq]);
                const u32 b1 = *reinterpret_cast<const u32*>(&Ks[nt * 8 + g][ks * 16 + 8 + 2 * tq]);
                mma16816(s[nt], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], b0, b1);
            }
        }

        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < FA_BK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = k0 + nt * 8 + 2 * tq + (e & 1);
                const bool live = j < (e < 2 ? lim0 : lim1);
                const float val = live ? s[nt][e] * scale_log2 : NEG_INF;
                s[nt][e] = val;
                if (e < 2) mx0 = fmaxf(mx0, val);
                else mx1 = fmaxf(mx1, val);
            }
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row that has seen no key yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
        const float base0 = mn0 == NEG_INF ? 0.0f : mn0, base1 = mn1 == NEG_INF ? 0.0f : mn1;
        const float a0 = exp2f(m0 - base0), a1 = exp2f(m1 - base1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < FA_BK / 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - base0);
            s[nt][1] = exp2f(s[nt][1] - base0);
            s[nt][2] = exp2f(s[nt][2] - base1);
            s[nt][3] = exp2f(s[nt][3] - base1);
            ps0 += s[nt][0] + s[nt][1];
            ps1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt) {
            o[dt][0] *= a0;
            o[dt][1] *= a0;
            o[dt][2] *= a1;
            o[dt][3] *= a1;
        }
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; ++kk) {
            const u32 pa0 = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            const u32 pa1 = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            const u32 pa2 = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const u32 pa3 = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dt = 0; dt < HD / 8; ++dt) {
                const u32 b0 = *reinterpret_cast<const u32*>(&Vt[dt * 8 + g][kk * 16 + 2 * tq]);
                const u32 b1 = *reinterpret_cast<const u32*>(&Vt[dt * 8 + g][kk * 16 + 8 + 2 * tq]);
                mma16816(o[dt], pa0, pa1, pa2, pa3, b0, b1);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
        const int col = h * HD + dt * 8 + 2 * tq;
        if (r0 < T) *reinterpret_cast<u32*>(out + (size_t)r0 * q_stride + col) = pack_bf16(o[dt][0] * inv0, o[dt][1] * inv0);
        if (r1 < T) *reinterpret_cast<u32*>(out + (size_t)r1 * q_stride + col) = pack_bf16(o[dt][2] * inv1, o[dt][3] * inv1);
    }
}

#define FLASH_ENTRY(HD)                                                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                         \
        blr_flash_attn_##HD(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,                \
                            const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out,                    \
                            long long kv_head_stride, int kv_row_stride, int T, int L, int pos0, int causal,         \
                            int heads, int group, float scale_log2) {                                                \
        flash_attn<HD>(q, k, v, out, kv_head_stride, kv_row_stride, T, L, pos0, causal, heads, group, scale_log2); \
    }
FLASH_ENTRY(64)
FLASH_ENTRY(128)

// ------------------------------------------------------------------------------------------
// Decode (and any head size): blr_attn_rows + blr_attn_combine
//
// Tiles: grid (T * heads, splits); a block of 4 warps owns one (query row, head) and one chunk
// of `chunk` key positions; warp w takes keys w, w + 4, ... of the chunk. Lane l holds query
// and output dims l, l + 32, ... (hd <= 256), so each key is one coalesced row read of K and of
// V, a 5-step shuffle reduction for the score, and an online-softmax update. The 4 warps merge
// in shared memory and write one partial (max, sum, o[hd]) in fp32 per split; blr_attn_combine
// (one warp per (row, head)) merges the splits. Splitting the cache length is what keeps all
// SMs busy at batch 1: 32 heads x ceil(L / chunk) blocks.
// Bytes: K and V of the visible positions read once per query head (the kv head's rows are
// shared by `group` query heads through L2), partials (hd + 2) * 4 B per split.
// Roofline: memory-bound, ~2 * L * kv_heads * hd * 2 bytes per layer and token (Llama-7B at
// L = 1024: 16 MiB, ~5.5 us at 3 TB/s).
// ------------------------------------------------------------------------------------------

#define AR_WARPS 4
#define AR_MAXV 8

// Warp 0 merges the AR_WARPS per-warp online-softmax states (max m, sum l, unnormalised o rows
// of `stride` floats) of one block into the block's partial: dst = [M, sum l, o (hd)].
static __device__ __forceinline__ void write_partial(const float* sm_m, const float* sm_l, const float* sm_o,
                                                     int stride, int hd, int lane, float* dst) {
    float M = NEG_INF;
    for (int w = 0; w < AR_WARPS; ++w) M = fmaxf(M, sm_m[w]);
    float scale_w[AR_WARPS];
    float lsum = 0.0f;
    for (int w = 0; w < AR_WARPS; ++w) {
        scale_w[w] = (M == NEG_INF || sm_m[w] == NEG_INF) ? 0.0f : exp2f(sm_m[w] - M);
        lsum += scale_w[w] * sm_l[w];
    }
    for (int d = lane; d < hd; d += 32) {
        float acc = 0.0f;
        for (int w = 0; w < AR_WARPS; ++w) acc += scale_w[w] * sm_o[w * stride + d];
        dst[2 + d] = acc;
    }
    if (lane == 0) {
        dst[0] = M;
        dst[1] = lsum;
    }
}

extern "C" __global__ void __launch_bounds__(AR_WARPS * 32)
    blr_attn_rows(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                  const __nv_bfloat16* __restrict__ v, float* __restrict__ part, long long kv_head_stride,
                  int kv_row_stride, int T, int L, int pos0, int causal, int heads, int group, int hd,
                  float scale_log2, int chunk) {
    __shared__ float sm_m[AR_WARPS], sm_l[AR_WARPS];
    __shared__ float sm_o[AR_WARPS][AR_MAXV * 32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rh = blockIdx.x, t = rh / heads, h = rh % heads, kvh = h / group;
    const int splits = gridDim.y, split = blockIdx.y;
    const int vis = causal ? min(L, pos0 + t + 1) : L;
    const int j0 = split * chunk, j1 = min(vis, j0 + chunk);

    float qv[AR_MAXV], o[AR_MAXV];
#pragma unroll
    for (int i = 0; i < AR_MAXV; ++i) {
        const int d = lane + 32 * i;
        qv[i] = d < hd ? __bfloat162float(q[(size_t)t * heads * hd + h * hd + d]) * scale_log2 : 0.0f;
        o[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    const __nv_bfloat16* kb = k + (size_t)kvh * kv_head_stride;
    const __nv_bfloat16* vb = v + (size_t)kvh * kv_head_stride;
    for (int j = j0 + warp; j < j1; j += AR_WARPS) {
        const __nv_bfloat16* kr = kb + (size_t)j * kv_row_stride;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < AR_MAXV; ++i) {
            const int d = lane + 32 * i;
            if (d < hd) s += qv[i] * __bfloat162float(kr[d]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const float mn = fmaxf(m, s);
        const float a = exp2f(m - mn), p = exp2f(s - mn);
        l = l * a + p;
        const __nv_bfloat16* vr = vb + (size_t)j * kv_row_stride;
#pragma unroll
        for (int i = 0; i < AR_MAXV; ++i) {
            const int d = lane + 32 * i;
            o[i] = o[i] * a + (d < hd ? p * __bfloat162float(vr[d]) : 0.0f);
        }
        m = mn;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < AR_MAXV; ++i) sm_o[warp][lane + 32 * i] = o[i];
    __syncthreads();
    if (warp == 0)
        write_partial(sm_m, sm_l, &sm_o[0][0], AR_MAXV * 32, hd, lane,
                      part + ((size_t)rh * splits + split) * (hd + 2));
}

// ------------------------------------------------------------------------------------------
// Decode at head_dim 64/128: blr_attn_decode_{64,128} (+ blr_attn_combine)
//
// The same grid and partials as blr_attn_rows, but each key is owned by a group of 4 lanes
// (lane holds hd/4 dims, read as 16-byte vectors), so a warp scores 8 keys per step and a block
// has 32 keys' K and V rows in flight: the loop is bound by DRAM bandwidth, not by the latency
// of one row read + shuffle reduction per key. Groups merge their online-softmax state with
// 3 xor-shuffle rounds, warps through shared memory.
// Bytes: as blr_attn_rows. Roofline: ~2 * L * kv_heads * hd * 2 bytes per layer and token.
// ------------------------------------------------------------------------------------------

#define AD_GROUP 4

template <int HD>
static __device__ __forceinline__ void attn_decode(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                                   const __nv_bfloat16* __restrict__ v, float* __restrict__ part,
                                                   long long kv_head_stride, int kv_row_stride, int L, int pos0,
                                                   int causal, int heads, int group, float scale_log2, int chunk) {
    constexpr int DPL = HD / AD_GROUP;  // dims per lane
    constexpr int VEC = DPL / 8;        // 16-byte vectors per lane per row
    constexpr int KEYS = 32 / AD_GROUP; // keys per warp step
    __shared__ float sm_m[AR_WARPS], sm_l[AR_WARPS];
    __shared__ float sm_o[AR_WARPS][HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane % AD_GROUP, grp = lane / AD_GROUP;
    const int rh = blockIdx.x, t = rh / heads, h = rh % heads, kvh = h / group;
    const int splits = gridDim.y, split = blockIdx.y;
    const int vis = causal ? min(L, pos0 + t + 1) : L;
    const int j0 = split * chunk, j1 = min(vis, j0 + chunk);

    float qv[DPL], o[DPL];
    const __nv_bfloat16* qrow = q + (size_t)t * heads * HD + h * HD + sub * DPL;
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
        uint4 u = *reinterpret_cast<const uint4*>(qrow + 8 * c);
        const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&u);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            qv[8 * c + i] = __bfloat162float(e[i]) * scale_log2;
            o[8 * c + i] = 0.0f;
        }
    }
    float m = NEG_INF, l = 0.0f;
    const __nv_bfloat16* kb = k + (size_t)kvh * kv_head_stride + sub * DPL;
    const __nv_bfloat16* vb = v + (size_t)kvh * kv_head_stride + sub * DPL;
    // Warp-uniform trip count: every lane reaches every shuffle; lanes past the end idle.
    for (int base = j0 + warp * KEYS; base < j1; base += AR_WARPS * KEYS) {
        const int j = base + grp;
        const bool valid = j < j1;
        uint4 kk[VEC], vv[VEC];
#pragma unroll
        for (int c = 0; c < VEC; ++c) {
            kk[c] = valid ? *reinterpret_cast<const uint4*>(kb + (size_t)j * kv_row_stride + 8 * c) : make_uint4(0u, 0u, 0u, 0u);
            vv[c] = valid ? *reinterpret_cast<const uint4*>(vb + (size_t)j * kv_row_stride + 8 * c) : make_uint4(0u, 0u, 0u, 0u);
        }
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < VEC; ++c) {
            const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&kk[c]);
#pragma unroll
            for (int i = 0; i < 8; ++i) s += qv[8 * c + i] * __bfloat162float(e[i]);
        }
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (valid) {
            const float mn = fmaxf(m, s);
            const float a = exp2f(m - mn), p = exp2f(s - mn);
            l = l * a + p;
#pragma unroll
            for (int c = 0; c < VEC; ++c) {
                const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&vv[c]);
#pragma unroll
                for (int i = 0; i < 8; ++i) o[8 * c + i] = o[8 * c + i] * a + p * __bfloat162float(e[i]);
            }
            m = mn;
        }
    }
    // Merge the 8 key groups of the warp (lanes sub, sub + 4, ... hold the same dims).
#pragma unroll
    for (int off = AD_GROUP; off < 32; off <<= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, m, off);
        const float lo = __shfl_xor_sync(0xffffffffu, l, off);
        const float mm = fmaxf(m, mo);
        const float as = m == NEG_INF ? 0.0f : exp2f(m - mm);
        const float ao = mo == NEG_INF ? 0.0f : exp2f(mo - mm);
        l = l * as + lo * ao;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const float oo = __shfl_xor_sync(0xffffffffu, o[i], off);
            o[i] = o[i] * as + oo * ao;
        }
        m = mm;
    }
    if (grp == 0) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) sm_o[warp][sub * DPL + i] = o[i];
        if (sub == 0) {
            sm_m[warp] = m;
            sm_l[warp] = l;
        }
    }
    __syncthreads();
    if (warp == 0)
        write_partial(sm_m, sm_l, &sm_o[0][0], HD, HD, lane, part + ((size_t)rh * splits + split) * (HD + 2));
}

#define DECODE_ENTRY(HD)                                                                                           \
    extern "C" __global__ void __launch_bounds__(AR_WARPS * 32)                                                    \
        blr_attn_decode_##HD(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,             \
                             const __nv_bfloat16* __restrict__ v, float* __restrict__ part, long long kv_head_stride, \
                             int kv_row_stride, int T, int L, int pos0, int causal, int heads, int group, int hd,   \
                             float scale_log2, int chunk) {                                                        \
        (void)T;                                                                                                   \
        (void)hd;                                                                                                  \
        attn_decode<HD>(q, k, v, part, kv_head_stride, kv_row_stride, L, pos0, causal, heads, group, scale_log2,  \
                        chunk);                                                                                    \
    }
DECODE_ENTRY(64)
DECODE_ENTRY(128)

// out[t, h*hd + d] = sum_s e^(m_s - M) o_s[d] / sum_s e^(m_s - M) l_s; one warp per (row, head).
extern "C" __global__ void blr_attn_combine(const float* __restrict__ part, __nv_bfloat16* __restrict__ out,
                                            int heads, int hd, int splits) {
    const int rh = blockIdx.x, t = rh / heads, h = rh % heads, lane = threadIdx.x;
    const float* base = part + (size_t)rh * splits * (hd + 2);
    float M = NEG_INF;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, base[(size_t)s * (hd + 2)]);
    float lsum = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float ms = base[(size_t)s * (hd + 2)];
        if (ms != NEG_INF) lsum += exp2f(ms - M) * base[(size_t)s * (hd + 2) + 1];
    }
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    for (int d = lane; d < hd; d += 32) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = base[(size_t)s * (hd + 2)];
            if (ms != NEG_INF) acc += exp2f(ms - M) * base[(size_t)s * (hd + 2) + 2 + d];
        }
        out[(size_t)t * heads * hd + h * hd + d] = __float2bfloat16_rn(acc * inv);
    }
}
