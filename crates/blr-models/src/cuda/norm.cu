// Row normalisations of the CUDA model backend: RMSNorm (Llama) and LayerNorm (GPT-2, ViT, DiT).
//
// Tiles: one block of 256 threads per row; each thread strides over the row's columns (any
// width), sums in fp32, the block reduces through warp shuffles and 8 floats of shared memory.
// LayerNorm makes two passes over the row for the mean and the centred variance (the one-pass
// E[x^2] - E[x]^2 form loses digits when |mean| >> std). Rows of up to ~8K bf16 stay in L1
// between the passes, so DRAM sees each element read once and written once.
// Bytes per output element: 2 read + 2 written (+ the weight row, shared by all rows via L2).
// Roofline: memory-bound; 1024 x 4096 bf16 moves 16 MiB, ~5.5 us at 3 TB/s (H100).

#include <cuda_bf16.h>

#define NORM_THREADS 256

static __device__ __forceinline__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // `red` may still be read by a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < NORM_THREADS / 32; ++w) s += red[w];
    return s;
}

// y = x / sqrt(mean(x^2) + eps) * w, per row of x (rows, cols).
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    blr_rms_norm(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                 __nv_bfloat16* __restrict__ y, int cols, float eps) {
    __shared__ float red[NORM_THREADS / 32];
    const __nv_bfloat16* xr = x + (size_t)blockIdx.x * cols;
    __nv_bfloat16* yr = y + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += NORM_THREADS) {
        float v = __bfloat162float(xr[c]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, red) / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += NORM_THREADS) {
        yr[c] = __float2bfloat16_rn(__bfloat162float(xr[c]) * inv * __bfloat162float(w[c]));
    }
}

// y = (x - mean) / sqrt(var + eps) * w + b, per row.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    blr_layer_norm(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                   const __nv_bfloat16* __restrict__ b, __nv_bfloat16* __restrict__ y, int cols,
                   float eps) {
    __shared__ float red[NORM_THREADS / 32];
    const __nv_bfloat16* xr = x + (size_t)blockIdx.x * cols;
    __nv_bfloat16* yr = y + (size_t)blockIdx.x * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += NORM_THREADS) s += __bfloat162float(xr[c]);
    float mean = block_sum(s, red) / (float)cols;
    float v2 = 0.0f;
    for (int c = threadIdx.x; c < cols; c += NORM_THREADS) {
        float d = __bfloat162float(xr[c]) - mean;
        v2 += d * d;
    }
    float inv = rsqrtf(block_sum(v2, red) / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += NORM_THREADS) {
        float d = (__bfloat162float(xr[c]) - mean) * inv;
        yr[c] = __float2bfloat16_rn(d * __bfloat162float(w[c]) + __bfloat162float(b[c]));
    }
}
