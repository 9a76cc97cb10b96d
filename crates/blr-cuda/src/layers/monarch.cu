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
