// Kernels of calibrated (Gram-weighted) BLAST on the GPU (factorize/calibrated.rs has the
// algorithm and the notation: A (m, n), blocks p x q, rank r, b_out x b_in grid, G' the damped
// Gram). The matrix products run through cuBLAS; these are the glue: the Hadamard mixings of
// the r x r blocks VGV_jj' = V_j^T G'_jj' V_j' and J_i = U_i^T U_i with the scales s_ij, the
// coupled S-Hessian product, block copies and the scalar steps. Column-major, r x r matrices
// back to back; every kernel reads its operands once with the fastest thread index on the
// contiguous dimension.

// Outputs per thread in the mixings (each input entry is read once per group of CAL_X outputs).
#define CAL_X 8

// A thread's CAL_X accumulators, of which the first `count` (>= 1) exist: the group's t-th
// output or input is `stride` floats after its first.
__device__ __forceinline__ void cal_zero(float (&acc)[CAL_X]) {
#pragma unroll
    for (int t = 0; t < CAL_X; ++t) acc[t] = 0.f;
}

// acc[t] += v * x[t * stride] for t < count.
__device__ __forceinline__ void cal_axpy(float (&acc)[CAL_X], float v, const float* __restrict__ x,
                                         long long stride, int count) {
#pragma unroll
    for (int t = 0; t < CAL_X; ++t) {
        if (t < count) acc[t] += v * x[t * stride];
    }
}

// out[t * stride] = acc[t] for t < count.
__device__ __forceinline__ void cal_store(float* __restrict__ out, const float (&acc)[CAL_X],
                                          long long stride, int count) {
#pragma unroll
    for (int t = 0; t < CAL_X; ++t) {
        if (t < count) out[t * stride] = acc[t];
    }
}

// P_i = sum_{j, j'} (s_ij s_ij'^T) ⊙ VGV_jj' (the U-step Gauss-Newton matrices), for
// i = blockIdx.y * CAL_X + t. VGV_jj' lives at (j * b_in + j') r^2.
extern "C" __global__ void cal_mix_p(float* __restrict__ out, const float* __restrict__ vgv,
                                     const float* __restrict__ s, int r, int b_out, int b_in) {
    long long rr = (long long)r * r;
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= rr) return;
    int a = (int)(e % r);
    int b = (int)(e / r);
    int i0 = blockIdx.y * CAL_X;
    float acc[CAL_X];
    cal_zero(acc);
    for (int j = 0; j < b_in; ++j) {
        for (int j2 = 0; j2 < b_in; ++j2) {
            float v = vgv[((long long)j * b_in + j2) * rr + e];
#pragma unroll
            for (int t = 0; t < CAL_X; ++t) {
                int i = i0 + t;
                if (i < b_out) {
                    acc[t] += s[((long long)i * b_in + j) * r + a] *
                              s[((long long)i * b_in + j2) * r + b] * v;
                }
            }
        }
    }
    cal_store(out + (long long)i0 * rr + e, acc, rr, b_out - i0);
}

// Q_jj' = sum_i (s_ij s_ij'^T) ⊙ J_i for every pair (the V-step Gauss-Newton blocks), written
// at (j * b_in + j') r^2; j = blockIdx.y, j' = blockIdx.z * CAL_X + t.
extern "C" __global__ void cal_mix_q(float* __restrict__ out, const float* __restrict__ jm,
                                     const float* __restrict__ s, int r, int b_out, int b_in) {
    long long rr = (long long)r * r;
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= rr) return;
    int a = (int)(e % r);
    int b = (int)(e / r);
    int j = blockIdx.y;
    int j0 = blockIdx.z * CAL_X;
    float acc[CAL_X];
    cal_zero(acc);
    for (int i = 0; i < b_out; ++i) {
        float jv = jm[(long long)i * rr + e];
        float sa = s[((long long)i * b_in + j) * r + a] * jv;
        cal_axpy(acc, sa, s + ((long long)i * b_in + j0) * r + b, r, b_in - j0);
    }
    cal_store(out + ((long long)j * b_in + j0) * rr + e, acc, rr, b_in - j0);
}

// hs_ij = sum_j' (J_i ⊙ VGV_jj') s_ij' (the coupled S-Hessian times s), with
// (A ⊙ B) x = rowsum(A ⊙ (B diag(x))): thread a of block row j sums over columns b, forming
// sum_j' VGV_jj'[a, b] s_ij'[b] once per i of its group. j = blockIdx.y,
// i = blockIdx.z * CAL_X + t.
extern "C" __global__ void cal_hs(float* __restrict__ hs, const float* __restrict__ jm,
                                  const float* __restrict__ vgv, const float* __restrict__ s,
                                  int r, int b_out, int b_in) {
    int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= r) return;
    long long rr = (long long)r * r;
    int j = blockIdx.y;
    int i0 = blockIdx.z * CAL_X;
    int count = b_out - i0;
    long long s_stride = (long long)b_in * r;
    float acc[CAL_X];
    cal_zero(acc);
    for (int b = 0; b < r; ++b) {
        float tmp[CAL_X];
        cal_zero(tmp);
        for (int j2 = 0; j2 < b_in; ++j2) {
            float v = vgv[((long long)j * b_in + j2) * rr + (long long)b * r + a];
            cal_axpy(tmp, v, s + ((long long)i0 * b_in + j2) * r + b, s_stride, count);
        }
#pragma unroll
        for (int t = 0; t < CAL_X; ++t) {
            int i = i0 + t;
            if (i < b_out) acc[t] += jm[(long long)i * rr + (long long)b * r + a] * tmp[t];
        }
    }
    cal_store(hs + ((long long)i0 * b_in + j) * r + a, acc, s_stride, count);
}

// dst_b = src_(b * src_stride) (+ eps I when base >= 0, eps = damping * ||E|| from the loss
// terms scal[base], scal[base + 1] as in factorize.cu's add_eps_diag), b in 0..batch, r x r
// each; dst contiguous. Copies the diagonal blocks Q_jj, VGV_jj out of the b_in^2 grids.
extern "C" __global__ void cal_copy_blocks(float* __restrict__ dst, const float* __restrict__ src,
                                           int r, long long src_stride, int batch,
                                           const double* __restrict__ scal, int base,
                                           double norm_sq, double damping) {
    float eps = 0.f;
    if (base >= 0) {
        double e2 = norm_sq - 2.0 * scal[base] + scal[base + 1];
        eps = (float)(damping * sqrt(e2 > 0.0 ? e2 : 0.0));
    }
    long long rr = (long long)r * r;
    long long total = rr * batch;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        long long bi = e / rr;
        long long k = e % rr;
        float v = src[bi * src_stride + k];
        if (k % r == k / r) v += eps;
        dst[e] = v;
    }
}

// The diagonal blocks G'_jj (q x q) of G' (n x n, ld n) gathered into dst (b_in of them,
// contiguous), and the identity in eye (same layout): the V preconditioner's right factor
// G'_jj^-1 is then one batched Cholesky and one solve.
extern "C" __global__ void cal_gather_diag(float* __restrict__ dst, float* __restrict__ eye,
                                           const float* __restrict__ g, int n, int q, int b_in) {
    long long qq = (long long)q * q;
    long long total = qq * b_in;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        long long j = e / qq;
        int row = (int)((e % qq) % q), col = (int)((e % qq) / q);
        dst[e] = g[(j * q + col) * (long long)n + j * q + row];
        eye[e] = row == col ? 1.f : 0.f;
    }
}

// y = x - alpha * d (y may alias x): the U, V and S updates at a step the host chose (the line
// searches need the loss on the host anyway).
extern "C" __global__ void cal_axpby(float* y, const float* x, const float* __restrict__ d,
                                     float alpha, long long n) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        y[e] = x[e] - alpha * d[e];
    }
}

// a[k, k] += v for one n x n matrix (ld n): recovers the raw Gram's direction G' - damping I
// (up to its positive scale, which the final relative error does not see).
extern "C" __global__ void cal_add_diag(float* __restrict__ a, int n, float v) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        a[k * n + k] += v;
    }
}
