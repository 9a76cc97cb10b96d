// L2 flush by READING a buffer several times the size of L2, for the layer benchmarks.
// A flush that writes (memset) leaves the whole L2 full of dirty lines whose write-back then
// lands inside the next timed region: measured on H100, dense cuBLAS at T=1 read 23.9 us after a
// memset flush and 19.5 us after this one. Clean lines are evicted for free.
#include "common.cuh"

extern "C" __global__ void blr_flush_read(const uint4* __restrict__ p, unsigned long long n16,
                                          unsigned* __restrict__ sink) {
    unsigned acc = 0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        uint4 v = __ldcg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    // Never true for the zero-filled buffer; keeps the loads alive.
    if (acc == 0x9e3779b9u) *sink = acc;
}
