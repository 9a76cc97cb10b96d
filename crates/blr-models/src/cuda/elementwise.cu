// Element-wise ops of the CUDA model backend: residual adds, per-column (broadcast row) ops,
// activations, embedding gather, 2-D slices and the KV-cache append.
//
// Tiles: grid-stride loops, one element per thread per step, 256 threads per block, the grid
// sized by the launcher (enough blocks to cover the tensor, capped at a few waves). Nothing is
// staged in shared memory: each element is touched once.
// Bytes per output element: 2 (bf16) per operand read + 2 written; per-column operands
// (`row`, `shift`, `scale`, `gate`) are one row shared by every row and stay in L1/L2.
// Roofline: memory-bound, ~3 TB/s on H100 (a (1024, 11008) silu_mul moves 64 MiB: ~22 us).
// All math in fp32; one rounding to bf16 per output.

#include <cuda_bf16.h>

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

static __device__ __forceinline__ float ld(const __nv_bfloat16* p, size_t i) {
    return __bfloat162float(p[i]);
}
static __device__ __forceinline__ float silu_f(float v) { return v / (1.0f + __expf(-v)); }

// x += y
extern "C" __global__ void blr_add(__nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ y,
                                   size_t n) {
    GRID_STRIDE(i, n) { x[i] = __float2bfloat16_rn(ld(x, i) + ld(y, i)); }
}

// x[r, c] += row[c]
extern "C" __global__ void blr_add_row(__nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ row,
                                       size_t n, int cols) {
    GRID_STRIDE(i, n) { x[i] = __float2bfloat16_rn(ld(x, i) + ld(row, i % cols)); }
}

// x = x * (1 + scale[c]) + shift[c]
extern "C" __global__ void blr_modulate(__nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ shift,
                                        const __nv_bfloat16* __restrict__ scale, size_t n, int cols) {
    GRID_STRIDE(i, n) {
        size_t c = i % cols;
        x[i] = __float2bfloat16_rn(ld(x, i) * (1.0f + ld(scale, c)) + ld(shift, c));
    }
}

// x += gate[c] * y
extern "C" __global__ void blr_add_gated(__nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ y,
                                         const __nv_bfloat16* __restrict__ gate, size_t n, int cols) {
    GRID_STRIDE(i, n) { x[i] = __float2bfloat16_rn(ld(x, i) + ld(gate, i % cols) * ld(y, i)); }
}

// out = silu(gate) * up (SwiGLU)
extern "C" __global__ void blr_silu_mul(const __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ up,
                                        __nv_bfloat16* __restrict__ out, size_t n) {
    GRID_STRIDE(i, n) { out[i] = __float2bfloat16_rn(silu_f(ld(gate, i)) * ld(up, i)); }
}

// GELU in place: tanh approximation (tanh_approx != 0) or the exact erf form.
extern "C" __global__ void blr_gelu(__nv_bfloat16* __restrict__ x, size_t n, int tanh_approx) {
    GRID_STRIDE(i, n) {
        float v = ld(x, i), g;
        if (tanh_approx) {
            const float k = 0.7978845608028654f;  // sqrt(2 / pi)
            g = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
        } else {
            g = 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
        }
        x[i] = __float2bfloat16_rn(g);
    }
}

// SiLU in place.
extern "C" __global__ void blr_silu(__nv_bfloat16* __restrict__ x, size_t n) {
    GRID_STRIDE(i, n) { x[i] = __float2bfloat16_rn(silu_f(ld(x, i))); }
}

// out[t, :] = table[ids[t], :]; ids were range-checked on the host.
extern "C" __global__ void blr_embedding(const __nv_bfloat16* __restrict__ table, const unsigned int* __restrict__ ids,
                                         __nv_bfloat16* __restrict__ out, size_t n, int cols) {
    GRID_STRIDE(i, n) {
        size_t t = i / cols, c = i % cols;
        out[i] = table[(size_t)ids[t] * cols + c];
    }
}

// The same for up to 8 ids passed as kernel arguments (decode): no host-to-device copy and no
// id buffer, so a decode step is one self-contained launch sequence that a CUDA graph can capture
// (a copy from pageable host memory synchronises the stream, which capture forbids).
extern "C" __global__ void blr_embedding_few(const __nv_bfloat16* __restrict__ table, __nv_bfloat16* __restrict__ out,
                                             size_t n, int cols, unsigned int i0, unsigned int i1, unsigned int i2,
                                             unsigned int i3, unsigned int i4, unsigned int i5, unsigned int i6,
                                             unsigned int i7) {
    GRID_STRIDE(i, n) {
        size_t t = i / cols, c = i % cols;
        unsigned int id = t == 0 ? i0 : t == 1 ? i1 : t == 2 ? i2 : t == 3 ? i3 : t == 4 ? i4 : t == 5 ? i5 : t == 6 ? i6 : i7;
        out[i] = table[(size_t)id * cols + c];
    }
}

// dst (rows, cols) = src[row0 + r, col0 + c] of a row-major source `src_cols` wide
// (slice_rows and slice_cols are both this copy).
extern "C" __global__ void blr_copy2d(const __nv_bfloat16* __restrict__ src, __nv_bfloat16* __restrict__ dst,
                                      size_t n, int cols, int src_cols, int row0, int col0) {
    GRID_STRIDE(i, n) {
        size_t r = i / cols, c = i % cols;
        dst[i] = src[(row0 + r) * (size_t)src_cols + col0 + c];
    }
}

// Appends x (T, kv_heads * head_dim) to a cache stored per kv head, cache[h][pos][d] with
// `capacity` positions per head, at positions pos0 .. pos0 + T.
extern "C" __global__ void blr_kv_append(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ cache,
                                         size_t n, int kv_heads, int head_dim, int capacity, int pos0) {
    GRID_STRIDE(i, n) {
        int width = kv_heads * head_dim;
        size_t t = i / width;
        int c = (int)(i % width), h = c / head_dim, d = c % head_dim;
        cache[((size_t)h * capacity + pos0 + t) * head_dim + d] = x[i];
    }
}
