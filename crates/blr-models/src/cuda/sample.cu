// Next-token sampling on the device: greedy (argmax) and temperature + top-p (nucleus) with a
// uniform number drawn on the host, so that only the token id (4 bytes) comes back instead of
// the whole logits row (98 KB for SmolLM2's 49152 tokens).
//
// It computes exactly what the host reference `blr_models::lm::choose` computes, bit for bit:
// - weights are integers, w_i = floor(exp((l_i - max) / T) * 2^40), with exp evaluated by the
//   same sequence of IEEE-rounded +, -, * as `lm::sampling_exp` (every op written as an
//   explicit _rn intrinsic, so the compiler cannot fuse a multiply-add and change a bit);
// - every sum is an integer sum, exact and independent of the order the threads add in;
// - tokens are ordered by the 61-bit key ((2^41 - 1 - w) << 20 | index): weight descending,
//   index ascending on ties. The nucleus cut ("shortest prefix reaching ceil(top_p * total)")
//   and the draw ("first token whose running weight exceeds floor(u * nucleus)") are both
//   "the smallest key whose prefix weight exceeds a threshold", found by a radix select over
//   the key, 8 bits per pass (8 passes), with a weighted 256-bucket histogram in shared memory.
//
// One block of 1024 threads (the work is ~V log V bits of selection; a decode step has nothing
// else running beside it). Per pass each thread reads its V/1024 weights (u64, L1/L2-resident:
// 393 KB for V = 49152) and adds them into the histogram, coalescing runs of the same bucket in
// a register first so the heavily shared top-level buckets do not serialise on atomics.
// Greedy reads the bf16 row once (98 KB): a few microseconds.
//
// out[0] = token id; out[1] = 0 ok, 1 NaN or +Inf logit, 2 every logit -Inf.
// Vocabularies up to 2^20 tokens (the key's index field); the launcher checks.

#include <cuda_bf16.h>

#define SAMPLE_THREADS 1024
#define KEY_INDEX_BITS 20
#define WEIGHT_BITS 40
#define NEG_INF (__int_as_float(0xff800000))
#define POS_INF (__int_as_float(0x7f800000))

typedef unsigned long long u64;

// Deterministic exp for x <= 0: the same operations, in the same order, as lm::sampling_exp.
static __device__ double sampling_exp(double x) {
    if (x < -30.0 || x != x) return 0.0;
    x = fmin(x, 0.0);
    const double log2e = __longlong_as_double(0x3ff71547652b82feLL);
    const double ln2_hi = __longlong_as_double(0x3fe62e42fee00000LL);
    const double ln2_lo = __longlong_as_double(0x3dea39ef35793c76LL);
    const long long inv_fact[13] = {
        0x3de6124613a86d09LL, 0x3e21eed8eff8d898LL, 0x3e5ae64567f544e4LL, 0x3e927e4fb7789f5cLL,
        0x3ec71de3a556c734LL, 0x3efa01a01a01a01aLL, 0x3f2a01a01a01a01aLL, 0x3f56c16c16c16c17LL,
        0x3f81111111111111LL, 0x3fa5555555555555LL, 0x3fc5555555555555LL, 0x3fe0000000000000LL,
        0x3ff0000000000000LL,
    };
    double n = floor(__dadd_rn(__dmul_rn(x, log2e), 0.5));
    double r = __dsub_rn(__dsub_rn(x, __dmul_rn(n, ln2_hi)), __dmul_rn(n, ln2_lo));
    double p = __longlong_as_double(inv_fact[0]);
#pragma unroll
    for (int k = 1; k < 13; ++k) p = __dadd_rn(__dmul_rn(p, r), __longlong_as_double(inv_fact[k]));
    p = __dadd_rn(__dmul_rn(p, r), 1.0);
    double scale = __longlong_as_double((long long)(1023 + (long long)n) << 52);
    return __dmul_rn(p, scale);
}

static __device__ __forceinline__ u64 weight_of(float l, float mx, double inv_t) {
    if (l == NEG_INF) return 0ull;
    double d = __dmul_rn(__dsub_rn((double)l, (double)mx), inv_t);
    return (u64)__dmul_rn(sampling_exp(d), (double)(1ull << WEIGHT_BITS));
}

static __device__ __forceinline__ u64 key_of(u64 w, int i) {
    return ((((1ull << (WEIGHT_BITS + 1)) - 1ull) - w) << KEY_INDEX_BITS) | (u64)i;
}

struct SelectState {
    u64 prefix;   // key bits decided so far
    u64 below;    // total weight of keys below the current candidate range
    u64 last_w;   // weight of the chosen bucket at the last level (= the chosen token's weight)
};

// The smallest key whose prefix weight (sum of weights of keys <= it) exceeds thr; requires
// thr < total weight. Writes the key to st->prefix and its prefix weight to st->below.
static __device__ void select_key(const u64* __restrict__ weights, int V, u64 thr, u64* hist, SelectState* st) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    __syncthreads();  // every thread has read the previous selection's result
    if (tid == 0) {
        st->prefix = 0ull;
        st->below = 0ull;
    }
    for (int shift = 56; shift >= 0; shift -= 8) {
        if (tid < 256) hist[tid] = 0ull;
        __syncthreads();
        // Read the state once here, between two barriers: warp 0 rewrites it below, and lanes
        // of one warp are not ordered by the ballot (racecheck flags a read of st->below by one
        // lane racing the write by another).
        const u64 prefix = st->prefix;
        const u64 below = st->below;
        const int hi = shift + 8;  // bits at and above `hi` are decided
        int run_bucket = -1;
        u64 run = 0ull;
        for (int i = tid; i < V; i += SAMPLE_THREADS) {
            u64 w = weights[i];
            if (w == 0ull) continue;
            u64 key = key_of(w, i);
            if (hi < 64 && (key >> hi) != (prefix >> hi)) continue;
            int b = (int)((key >> shift) & 255ull);
            if (b != run_bucket) {
                if (run) atomicAdd(&hist[run_bucket], run);
                run_bucket = b;
                run = 0ull;
            }
            run += w;
        }
        if (run) atomicAdd(&hist[run_bucket], run);
        __syncthreads();
        if (warp == 0) {
            u64 local[8];
            u64 sum = 0ull;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                local[j] = hist[lane * 8 + j];
                sum += local[j];
            }
            u64 incl = sum;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                u64 v = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += v;
            }
            unsigned hit = __ballot_sync(0xffffffffu, below + incl > thr);
            int first = hit ? __ffs(hit) - 1 : 31;
            if (lane == first) {
                u64 cum = below + (incl - sum);
                int b = lane * 8 + 7;
                u64 wb = local[7];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (cum + local[j] > thr) {
                        b = lane * 8 + j;
                        wb = local[j];
                        break;
                    }
                    cum += local[j];
                }
                st->prefix = prefix | ((u64)b << shift);
                st->below = cum;
                st->last_w = wb;
            }
        }
        __syncthreads();
    }
    if (tid == 0) st->below += st->last_w;  // prefix weight up to and including the key
    __syncthreads();
}

// logits: one row of V bf16 values. weights: V u64 of scratch (unused when greedy).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    blr_sample(const __nv_bfloat16* __restrict__ logits, int V, int greedy, double inv_t, float top_p, double u,
               u64* __restrict__ weights, unsigned* __restrict__ out) {
    __shared__ float s_max[32];
    __shared__ int s_idx[32];
    __shared__ int s_bad[32];
    __shared__ u64 s_sum[32];
    __shared__ u64 hist[256];
    __shared__ SelectState st;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // Pass 1: maximum (first index on ties) and NaN / +Inf.
    float best = NEG_INF;
    int best_i = 0x7fffffff;
    int bad = 0;
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
        float l = __bfloat162float(logits[i]);
        if (l != l || l == POS_INF) bad = 1;
        if (l > best || (l == best && i < best_i)) {
            best = l;
            best_i = i;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, off);
        int oi = __shfl_xor_sync(0xffffffffu, best_i, off);
        if (ob > best || (ob == best && oi < best_i)) {
            best = ob;
            best_i = oi;
        }
        bad |= __shfl_xor_sync(0xffffffffu, bad, off);
    }
    if (lane == 0) {
        s_max[warp] = best;
        s_idx[warp] = best_i;
        s_bad[warp] = bad;
    }
    __syncthreads();
    if (warp == 0) {
        best = s_max[lane];
        best_i = s_idx[lane];
        bad = s_bad[lane];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            float ob = __shfl_xor_sync(0xffffffffu, best, off);
            int oi = __shfl_xor_sync(0xffffffffu, best_i, off);
            if (ob > best || (ob == best && oi < best_i)) {
                best = ob;
                best_i = oi;
            }
            bad |= __shfl_xor_sync(0xffffffffu, bad, off);
        }
        if (lane == 0) {
            s_max[0] = best;
            s_idx[0] = best_i;
            s_bad[0] = bad;
        }
    }
    __syncthreads();
    const float mx = s_max[0];
    if (s_bad[0] || greedy || mx == NEG_INF) {
        if (tid == 0) {
            out[0] = s_bad[0] ? 0u : (unsigned)s_idx[0];
            out[1] = s_bad[0] ? 1u : (greedy ? 0u : 2u);
        }
        return;
    }

    // Pass 2: integer weights and their total.
    u64 part = 0ull;
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
        u64 w = weight_of(__bfloat162float(logits[i]), mx, inv_t);
        weights[i] = w;
        part += w;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
    if (lane == 0) s_sum[warp] = part;
    __syncthreads();
    if (warp == 0) {
        part = s_sum[lane];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        if (lane == 0) s_sum[0] = part;
    }
    __syncthreads();
    const u64 total = s_sum[0];

    // Nucleus: the shortest prefix reaching ceil(top_p * total) (lm::nucleus_target).
    u64 mass = total;
    if (top_p < 1.0f) {
        u64 target = (u64)ceil(__dmul_rn((double)top_p, __ull2double_rn(total)));
        target = target < 1ull ? 1ull : (target > total ? total : target);
        select_key(weights, V, target - 1ull, hist, &st);
        mass = st.below;
    }
    // Draw: the first token whose running weight exceeds floor(u * mass) (lm::draw_threshold).
    double uu = u > 0.0 ? u : 0.0;
    u64 r = (u64)__dmul_rn(uu, __ull2double_rn(mass));
    if (r > mass - 1ull) r = mass - 1ull;
    select_key(weights, V, r, hist, &st);
    if (tid == 0) {
        out[0] = (unsigned)(st.prefix & ((1ull << KEY_INDEX_BITS) - 1ull));
        out[1] = 0u;
    }
}
