// Test kernel for kernel_source!(..., headers: [...]): compiles only if probe.cuh is found.
#include "probe.cuh"
extern "C" __global__ void probe_scale(float* y, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] *= PROBE_SCALE;
}
