// Monarch permutation kernels for the `unfused` strategy (what the reference PyTorch code does:
// a materialised transpose copy between the two block-diagonal GEMMs and after the second).
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
// `partial` strategy (no per-element permutation pass). Notation as above, rb = R / b (R % b == 0).
// The product uploads w1 with its rows reordered inside each block, w1p[k][l*rb + a] =
// w1[k][a*b + l], so the ordinary batched stage-1 GEMM writes out1p (T, k, l, a) in which every
// (t, k, l) run of rb outputs is one contiguous piece of the row P[t][l] that stage 2 reads:
//   P[t][l][k*rb + a] = out1p[t][k][l*rb + a].
// The middle permutation is then a copy of contiguous rb-element chunks (rb*2 bytes: 128 B for
// llama7b q/k/v/o), not of single elements.

// P[t][l][k][:] = out1p[t][k][l][:], chunks of rb elements moved as 16-byte vectors (rb % 8 == 0).
// One thread per vector, indexed in destination order: writes are fully coalesced, reads are
// runs of rb/8 vectors. Bytes: 2 x 2 x T*b*R, no reuse.
extern "C" __global__ void __launch_bounds__(256) blr_monarch_chunk_perm(const bf16* __restrict__ out1p,
                                                                         bf16* __restrict__ P, int T, int b,
                                                                         int rb) {
    const int nv = rb >> 3;
    const long total = (long)T * b * b * nv;
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        const int v = (int)(idx % nv);
        long rest = idx / nv;
        const int k = (int)(rest % b);
        rest /= b;
        const int l = (int)(rest % b);
        const long t = rest / b;
        const long row = t * b * b * rb;
        const uint4 val = ld_ro16(out1p + row + ((long)k * b + l) * rb + v * 8);
        *reinterpret_cast<uint4*>(P + row + ((long)l * b + k) * rb + v * 8) = val;
    }
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
