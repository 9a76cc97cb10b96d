// Calibration Grams (gram.rs): the f64 running sum of fp32 GEMM partials.
//
// Each partial is one chunk's A^T B (at most CHUNK_ROWS tokens, fp32 accumulation in cuBLAS);
// adding it to the sum in f64 keeps the error of a long calibration run (~1e5 tokens) at that
// of one chunk. Memory-bound: n^2 * (4 + 16) bytes per partial (n = 1536: 47 MB, ~20 us on an
// H100), against 2 * CHUNK_ROWS * n^2 FLOPs of the GEMM it follows.
//
// Grid-stride: any n with any grid.

extern "C" __global__ void blr_gram_add_f64(double* __restrict__ sum,
                                            const float* __restrict__ part,
                                            unsigned long long n) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        sum[i] += (double)part[i];
    }
}
