// Utility kernels of the runtime layer: random fill (benchmarks and tests need random data,
// never zeros, and generating it on the device avoids a host upload: 1 GiB of bf16 fills in
// well under a millisecond on H100 instead of ~40 ms over PCIe), a 16-byte-vector copy (the
// bandwidth ceiling `blr doctor` reports), and a scaled add (used by the graph self-test).
//
// All loops are grid-stride: launched with a grid sized from the SM count (Gpu::persistent_grid),
// each thread handles elements i, i + stride, ... so any n works with any grid.
//
// Random numbers: element i gets splitmix64(seed + i * golden), its top 24 bits as a uniform
// in [0, 1), mapped to [-scale, scale). The host mirror is blr_cuda::util::uniform_at; the
// self-test checks the two agree bit for bit.

#include <cuda_bf16.h>

__device__ __forceinline__ unsigned long long blr_splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float blr_uniform(unsigned long long seed, unsigned long long i, float scale) {
    unsigned long long u = blr_splitmix64(seed + i * 0x9E3779B97F4A7C15ull);
    float unit = (float)(u >> 40) * (1.0f / 16777216.0f);  // exact: 24-bit integer * 2^-24
    float centred = __fsub_rn(__fmul_rn(2.0f, unit), 1.0f); // exact in f32
    return __fmul_rn(scale, centred);                       // one rounding, same as the host
}

extern "C" __global__ void fill_uniform_bf16(__nv_bfloat16* __restrict__ out, unsigned long long n,
                                             unsigned long long seed, float scale) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __float2bfloat16_rn(blr_uniform(seed, i, scale));
    }
}

extern "C" __global__ void fill_uniform_f32(float* __restrict__ out, unsigned long long n,
                                            unsigned long long seed, float scale) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = blr_uniform(seed, i, scale);
    }
}

// dst[i] = src[i] for n16 16-byte vectors. Each thread keeps 4 independent 16-byte loads in
// flight before its first store, which is what it takes to saturate HBM3 (H100: ~3.35 TB/s
// datasheet) with one resident wave of blocks.
extern "C" __global__ void copy_vec16(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                      unsigned long long n16) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = src[i];
        uint4 b = src[i + stride];
        uint4 c = src[i + 2 * stride];
        uint4 d = src[i + 3 * stride];
        dst[i] = a;
        dst[i + stride] = b;
        dst[i + 2 * stride] = c;
        dst[i + 3 * stride] = d;
    }
    for (; i < n16; i += stride) {
        dst[i] = src[i];
    }
}

// y[i] += alpha * x[i]
extern "C" __global__ void axpy_f32(float* __restrict__ y, const float* __restrict__ x, float alpha,
                                    unsigned long long n) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] += alpha * x[i];
    }
}

// Self-test of cooperative launch: every block publishes a value, all blocks meet at a
// grid-wide barrier (a counter in global memory, zeroed before the launch), then each block
// reads its neighbour's value. Only correct (and only terminates) if all blocks are resident
// at once, which is what a cooperative launch guarantees and checks.
extern "C" __global__ void coop_neighbour(unsigned* __restrict__ published, unsigned* __restrict__ out,
                                          unsigned* __restrict__ barrier) {
    if (threadIdx.x == 0) {
        published[blockIdx.x] = blockIdx.x * 3u + 1u;
        __threadfence();
        atomicAdd(barrier, 1u);
        while (atomicAdd(barrier, 0u) < gridDim.x) {
        }
        __threadfence();
        out[blockIdx.x] = ((volatile unsigned*)published)[(blockIdx.x + 1u) % gridDim.x];
    }
    __syncthreads();
}
