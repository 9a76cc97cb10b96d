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
