// Shared device helpers for the BLR layer kernels (mma.sync, ldmatrix, cp.async, 16-byte loads).
//
// NVRTC-compatible: no standard library, only <cuda_bf16.h>; every tensor-core and copy
// instruction is inline PTX so the same source builds under NVRTC (the product) and nvcc (the
// bench/kernels harness). The Rust loader splices this file in place of `#include "common.cuh"`.
//
// Fragment layouts used everywhere (PTX ISA, mma.m16n8k16 .bf16, g = lane / 4, c = lane % 4):
//   A (16x16, row-major):  a0a1 = (g, 2c..2c+1)   a2a3 = (g+8, 2c..)  a4a5 = (g, 2c+8..)  a6a7 = (g+8, 2c+8..)
//   B (16x8, "col" = stored N-major with K contiguous): b0b1 = (k 2c..2c+1, n g)  b2b3 = (k 2c+8.., n g)
//   C (16x8, fp32):        c0c1 = (g, 2c..2c+1)   c2c3 = (g+8, 2c..2c+1)
#ifndef BLR_LAYERS_COMMON_CUH
#define BLR_LAYERS_COMMON_CUH

#include <cuda_bf16.h>

typedef unsigned int blr_u32;
typedef __nv_bfloat16 bf16;

static __device__ __forceinline__ blr_u32 smem_addr(const void* p) {
    return (blr_u32)__cvta_generic_to_shared(p);
}

// 16-byte global->shared copy that bypasses L1; zero-fills the destination when !pred
// (src-size 0), which is how every kernel here handles ragged edges (T, p, q, r not multiples
// of a tile) without branches in the main loop.
static __device__ __forceinline__ void cp_async16(blr_u32 dst, const void* src, bool pred) {
    int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
static __device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
static __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

static __device__ __forceinline__ void ldmatrix_x4(blr_u32 addr, blr_u32& r0, blr_u32& r1, blr_u32& r2,
                                                   blr_u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
static __device__ __forceinline__ void ldmatrix_x4_trans(blr_u32 addr, blr_u32& r0, blr_u32& r1,
                                                         blr_u32& r2, blr_u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// D = A * B + D, bf16 inputs, fp32 accumulators.
static __device__ __forceinline__ void mma_bf16(float* d, blr_u32 a0, blr_u32 a1, blr_u32 a2, blr_u32 a3,
                                                blr_u32 b0, blr_u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ blr_u32 pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<blr_u32*>(&v);
}

// Streaming 16-byte weight load: read-only path, no L1 allocation (each weight is used once).
static __device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
// 16-byte load served from L2 only: for data written earlier in the same launch by other
// blocks (L1 is not coherent across SMs).
static __device__ __forceinline__ uint4 ld_cg16(const void* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
static __device__ __forceinline__ uint4 ld_ro16(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}
static __device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

static __device__ __forceinline__ float bf16_lo(blr_u32 v) {
    return __uint_as_float(v << 16);
}
static __device__ __forceinline__ float bf16_hi(blr_u32 v) {
    return __uint_as_float(v & 0xffff0000u);
}

#endif  // BLR_LAYERS_COMMON_CUH
