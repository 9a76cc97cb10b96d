// Rotary position embedding, half-split convention (HF `rotate_half`): in each head of
// `head_dim = 2 * half`, the pair (i, i + half) of the row at position p turns by p * inv_freq[i].
//
// Tiles: one thread per (row, frequency) pair index, looping over the heads so the angle's
// sin/cos is computed once per (row, frequency) and reused by every head. The angle is formed
// and reduced in fp64 (p * f reaches ~1e5 rad at long contexts, where fp32 keeps only ~1e-2 rad),
// matching the CPU reference; the rotation itself is fp32.
// Bytes per element: 2 read + 2 written, in place. Memory-bound; a (1024, 4096) q moves 16 MiB.

#include <cuda_bf16.h>

extern "C" __global__ void blr_rope(__nv_bfloat16* __restrict__ x, const float* __restrict__ inv_freq, int rows,
                                    int heads, int half, int pos0) {
    size_t n = (size_t)rows * half;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(i / half), f = (int)(i % half);
        double angle = (double)(pos0 + t) * (double)inv_freq[f];
        double s, c;
        sincos(angle, &s, &c);
        float sf = (float)s, cf = (float)c;
        __nv_bfloat16* row = x + (size_t)t * heads * 2 * half;
        for (int h = 0; h < heads; ++h) {
            __nv_bfloat16* hd = row + (size_t)h * 2 * half;
            float x0 = __bfloat162float(hd[f]), x1 = __bfloat162float(hd[f + half]);
            hd[f] = __float2bfloat16_rn(x0 * cf - x1 * sf);
            hd[f + half] = __float2bfloat16_rn(x0 * sf + x1 * cf);
        }
    }
}
