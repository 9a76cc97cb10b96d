// Element-wise and reduction kernels of the GPU BLAST factorization (factorize/mod.rs has the
// algorithm and the notation: A (m, n), blocks p x q, rank r, b_out x b_in grid). Everything
// that is a real matrix product runs through cuBLAS; these kernels are the glue between the
// GEMMs: the per-block diagonal scalings by s_ij, the Hadamard mixings of r x r Grams, the
// loss terms (accumulated in double, since the loss is ||A||^2 - 2<A, Â> + ||Â||^2 and the
// three terms cancel), and the diagonal-block step of the batched Cholesky.
//
// Layouts are column-major (cuBLAS's): U (m, r) ld m, V^T (r, n) ld r, r x r matrices
// contiguous one after the other. All of them are memory-bound: each reads its operands once,
// with the fastest thread index on the contiguous dimension.

// rhs^T (r, m) = sum_j diag(s_ij) (V_j^T A_j^T) with i = column / p: the transposed data term
// T_i C̄_i^T of the U gradient, from TVt_j = V_j^T A_j^T (r, m) stored one after the other.
extern "C" __global__ void blast_u_rhs(float* __restrict__ rhs, const float* __restrict__ tv,
                                       const float* __restrict__ s, int m, int r, int p, int b_in) {
    long long total = (long long)m * r;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        int k = (int)(e % r);
        int a = (int)(e / r);
        int i = a / p;
        float acc = 0.f;
        for (int j = 0; j < b_in; ++j) {
            acc += tv[(long long)j * total + e] * s[((long long)i * b_in + j) * r + k];
        }
        rhs[e] = acc;
    }
}

// out_x (r, r) = sum_y (s_xy s_xy^T) ⊙ g_y for x in 0..nx, where s_xy = s[(x*sx + y*sy)*r ..].
// P_i = sum_j (s_ij s_ij^T) ⊙ V_j^T V_j (x = i, sx = b_in, sy = 1) and
// Q_j = sum_i (s_ij s_ij^T) ⊙ U_i^T U_i (x = j, sx = 1, sy = b_in).
// One thread per matrix entry and per group of MIX_X outputs, so each g_y entry is read
// nx / MIX_X times instead of nx times.
#define MIX_X 8
extern "C" __global__ void blast_mix(float* __restrict__ out, const float* __restrict__ g,
                                     const float* __restrict__ s, int r, int nx, int ny, int sx,
                                     int sy) {
    long long rr = (long long)r * r;
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= rr) return;
    int a = (int)(e % r);
    int b = (int)(e / r);
    int x0 = blockIdx.y * MIX_X;
    float acc[MIX_X];
#pragma unroll
    for (int t = 0; t < MIX_X; ++t) acc[t] = 0.f;
    for (int y = 0; y < ny; ++y) {
        float gv = g[(long long)y * rr + e];
#pragma unroll
        for (int t = 0; t < MIX_X; ++t) {
            int x = x0 + t;
            if (x < nx) {
                const float* sv = s + ((long long)x * sx + (long long)y * sy) * r;
                acc[t] += sv[a] * sv[b] * gv;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MIX_X; ++t) {
        int x = x0 + t;
        if (x < nx) out[(long long)x * rr + e] = acc[t];
    }
}

// scal[slot] += weight * sum_i x[i] y[i], accumulated in double (block reduction + one atomic
// per block).
extern "C" __global__ void dot_acc(const float* __restrict__ x, const float* __restrict__ y,
                                   long long n, double* __restrict__ scal, int slot, double weight) {
    __shared__ double part[32];
    double acc = 0.0;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        acc += (double)x[i] * (double)y[i];
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        acc = lane < nw ? part[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
        if (lane == 0) atomicAdd(scal + slot, weight * acc);
    }
}

// The damping of a sub-step, eps = damping * ||E||_F with ||E||^2 = norm_sq - 2 cross + quad
// (scal[base] = cross, scal[base + 1] = quad), computed on the device so that no iteration
// waits for the host.
__device__ __forceinline__ double blast_eps(const double* scal, int base, double norm_sq,
                                            double damping) {
    double e2 = norm_sq - 2.0 * scal[base] + scal[base + 1];
    return damping * sqrt(e2 > 0.0 ? e2 : 0.0);
}

// a_b += eps I for `batch` r x r matrices `stride` elements apart.
extern "C" __global__ void add_eps_diag(float* __restrict__ a, long long stride, int r, int batch,
                                        const double* __restrict__ scal, int base, double norm_sq,
                                        double damping) {
    float eps = (float)blast_eps(scal, base, norm_sq, damping);
    long long total = (long long)r * batch;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        long long b = e / r;
        long long k = e % r;
        a[b * stride + k * (r + 1)] += eps;
    }
}

// d[(i*b_in + j)*r + k] = (U_i^T A_ij V_j)_kk = sum_c UT_i[k, j q + c] V^T[k, j q + c], from
// UT_i = U_i^T A_i (r, n) stored one after the other and V^T (r, n). One thread per (k, block).
extern "C" __global__ void blast_diag(float* __restrict__ d, const float* __restrict__ ut,
                                      const float* __restrict__ vt, int r, int n, int q, int b_in) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= r) return;
    int ij = blockIdx.y;
    int i = ij / b_in, j = ij % b_in;
    const float* u = ut + (long long)i * r * n + (long long)j * q * r + k;
    const float* v = vt + (long long)j * q * r + k;
    float acc = 0.f;
    for (int c = 0; c < q; ++c) acc += u[(long long)c * r] * v[(long long)c * r];
    d[(long long)ij * r + k] = acc;
}

// g (r, n) = -sum_i diag(s_ij) UT_i with j = column / q: minus the V-gradient's data term.
extern "C" __global__ void blast_v_rhs(float* __restrict__ g, const float* __restrict__ ut,
                                       const float* __restrict__ s, int r, int n, int q, int b_out,
                                       int b_in) {
    long long total = (long long)r * n;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        int k = (int)(e % r);
        int j = (int)((e / r) / q);
        float acc = 0.f;
        for (int i = 0; i < b_out; ++i) {
            acc += s[((long long)i * b_in + j) * r + k] * ut[(long long)i * total + e];
        }
        g[e] = -acc;
    }
}

// h_ij = J_i ⊙ K_j (the S-step Gauss-Newton matrices), block (i, j) at (i*b_in + j) r^2, and
// hs_ij = h_ij s_ij in the same pass (H is written once and not read back). One thread per row
// a of one block: it walks the columns, so each warp reads and writes 32 consecutive floats.
extern "C" __global__ void hadamard_blocks(float* __restrict__ h, float* __restrict__ hs,
                                           const float* __restrict__ jm, const float* __restrict__ km,
                                           const float* __restrict__ s, int r, int b_in) {
    int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= r) return;
    long long rr = (long long)r * r;
    int ij = blockIdx.y;
    int i = ij / b_in, j = ij % b_in;
    const float* jr = jm + (long long)i * rr + a;
    const float* kr = km + (long long)j * rr + a;
    const float* sv = s + (long long)ij * r;
    float* hr = h + (long long)ij * rr + a;
    float acc = 0.f;
    for (int b = 0; b < r; ++b) {
        float v = jr[(long long)b * r] * kr[(long long)b * r];
        hr[(long long)b * r] = v;
        acc += v * sv[b];
    }
    hs[(long long)ij * r + a] = acc;
}

// S gradient: g = H s - d, saved twice (the solve overwrites one copy with the direction).
extern "C" __global__ void blast_s_grad(float* __restrict__ g, float* __restrict__ g_keep,
                                        const float* __restrict__ hs, const float* __restrict__ d,
                                        long long n) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        float v = hs[e] - d[e];
        g[e] = v;
        g_keep[e] = v;
    }
}

// s <- s - step dir, and the loss after it without forming H again: (H + eps I) dir = g gives
// H dir = g - eps dir, so H s_new = H s - step (g - eps dir). Accumulates
// sum s_new . (H s_new - 2 d) = ||E||^2 - norm_sq into scal[slot].
// The step is steps[*itp] (the schedule lives on the device, so one captured iteration
// replays for every iteration).
extern "C" __global__ void blast_s_update(float* __restrict__ s, const float* __restrict__ dir,
                                          const float* __restrict__ g, const float* __restrict__ hs,
                                          const float* __restrict__ d, long long n,
                                          const float* __restrict__ steps,
                                          const int* __restrict__ itp,
                                          const double* __restrict__ scal_eps, int base,
                                          double norm_sq, double damping, double* __restrict__ scal,
                                          int slot) {
    __shared__ double part[32];
    double eps = blast_eps(scal_eps, base, norm_sq, damping);
    float step = steps[*itp];
    double acc = 0.0;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        double sn = (double)s[e] - (double)step * dir[e];
        double hn = (double)hs[e] - (double)step * ((double)g[e] - eps * dir[e]);
        acc += sn * (hn - 2.0 * (double)d[e]);
        s[e] = (float)sn;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        acc = lane < nw ? part[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
        if (lane == 0) atomicAdd(scal + slot, acc);
    }
}

// history[*itp] = sqrt(max(norm_sq + scal[slot], 0) / norm_sq): the relative error after the
// iteration, in the same norm and from the same factored terms as the CPU path; then moves the
// device's iteration counter *itp on (the last launch of an iteration).
extern "C" __global__ void blast_record(double* __restrict__ history, int* __restrict__ itp,
                                        const double* __restrict__ scal, int slot, double norm_sq) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double e2 = norm_sq + scal[slot];
        int it = *itp;
        history[it] = sqrt((e2 > 0.0 ? e2 : 0.0) / norm_sq);
        *itp = it + 1;
    }
}

// y -= steps[*itp] x (the U and V updates).
extern "C" __global__ void axpy_step(float* __restrict__ y, const float* __restrict__ x,
                                     const float* __restrict__ steps, const int* __restrict__ itp,
                                     long long n) {
    float alpha = -steps[*itp];
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        y[e] += alpha * x[e];
    }
}

// us[(i*b_in + j)] (r, p) = diag(s_ij) U_i^T, from U^T (r, m): for the exact residual at the end.
extern "C" __global__ void blast_scale_u(float* __restrict__ us, const float* __restrict__ ut,
                                         const float* __restrict__ s, int r, int p, int b_in) {
    long long per = (long long)p * r;
    int ij = blockIdx.y;
    int i = ij / b_in;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < per;
         e += (long long)gridDim.x * blockDim.x) {
        int k = (int)(e % r);
        us[(long long)ij * per + e] = ut[(long long)i * per + e] * s[(long long)ij * r + k];
    }
}

// ---------------------------------------------------------------- batched Cholesky

// One diagonal block of the blocked Cholesky (chol.rs), for a batch of matrices: block b
// (blockIdx.x) factors the kb x kb block at (k0, k0) of its matrix a (lower, column-major, ld
// lda, matrices astride apart) in shared memory, writes L11 to the same place of l (lstride
// apart; l may be a), and writes L11^-1 (kb x kb, ld nb, zero above the diagonal) to linv[b]
// for the panel GEMMs, the wider inverses and the blocked triangular solves. A pivot that is
// not positive and finite sets info[b] = 1 (the host reports it; the factor is then garbage).
// Shared memory: L and L^-1, kb x (kb + 1) floats each (+1: column walks hit distinct banks).
// 512 threads = 16 warps. The kernel is latency-bound (2 kb dependent steps, one barrier
// each), which is why the batch runs as one grid.
extern "C" __global__ void chol_diag(const float* a, long long astride, float* l,
                                     long long lstride, int lda, int k0, int kb,
                                     float* __restrict__ linv, int nb, int* __restrict__ info) {
    extern __shared__ float sm[];
    __shared__ int bad;
    __shared__ float rinv[128];
    int ld = kb + 1;
    float* L = sm;
    float* X = sm + kb * ld;
    const float* src = a + (long long)blockIdx.x * astride + (long long)k0 * lda + k0;
    float* dst = l + (long long)blockIdx.x * lstride + (long long)k0 * lda + k0;
    for (int e = threadIdx.x; e < kb * kb; e += blockDim.x) {
        int row = e % kb, col = e / kb;
        L[col * ld + row] = row >= col ? src[(long long)col * lda + row] : 0.f;
        X[col * ld + row] = row == col ? 1.f : 0.f;
    }
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    // Right-looking in shared memory with one barrier per column: step j subtracts
    // a_j a_j^T / d_j (a_j = column j below the diagonal, still unscaled, d_j its pivot) from
    // the trailing block; column j is never written again, so scaling it by 1/sqrt(d_j) is
    // left to one parallel pass at the end. Every thread reads the pivot itself.
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = 0; j < kb; ++j) {
        float dj = L[j * ld + j];
        if (!(dj > 0.f) || !isfinite(dj)) {
            if (threadIdx.x == 0) bad = 1;
            dj = 1.f;
        }
        float inv_d = 1.f / dj;
        for (int col = j + 1 + warp; col < kb; col += warps) {
            float lc = L[j * ld + col] * inv_d;
            for (int row = col + lane; row < kb; row += 32) L[col * ld + row] -= L[j * ld + row] * lc;
        }
        __syncthreads();
    }
    for (int e = threadIdx.x; e < kb * kb; e += blockDim.x) {
        int row = e % kb, col = e / kb;
        if (row > col) {
            float dc = L[col * ld + col];
            dc = (dc > 0.f && isfinite(dc)) ? dc : 1.f;
            L[col * ld + row] *= rsqrtf(dc);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kb; e += blockDim.x) {
        float dc = L[e * ld + e];
        float v = (dc > 0.f && isfinite(dc)) ? sqrtf(dc) : 1.f;
        L[e * ld + e] = v;
        rinv[e] = 1.f / v;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kb * kb; e += blockDim.x) {
        int row = e % kb, col = e / kb;
        if (row >= col) dst[(long long)col * lda + row] = L[col * ld + row];
    }
    // X = L^-1 by column-oriented substitution on I, one barrier per step: after step u - 1,
    // row u of X holds x_u L[u][u] (x_u the final row), so step u subtracts
    // L[i][u] (X[u][c] / L[u][u]) from every row i > u, columns c <= u, all (i, c) pairs in
    // parallel; the rows are divided by their pivots at the end.
    for (int u = 0; u + 1 < kb; ++u) {
        int rows = kb - 1 - u;
        int pairs = rows * (u + 1);
        float ru = rinv[u];
        for (int e = threadIdx.x; e < pairs; e += blockDim.x) {
            int i = u + 1 + e % rows, c = e / rows;
            X[c * ld + i] -= L[u * ld + i] * (X[c * ld + u] * ru);
        }
        __syncthreads();
    }
    float* inv = linv + (long long)blockIdx.x * nb * nb;
    for (int e = threadIdx.x; e < kb * kb; e += blockDim.x) {
        int row = e % kb, col = e / kb;
        inv[col * nb + row] = row >= col ? X[col * ld + row] * rinv[row] : 0.f;
    }
    if (threadIdx.x == 0 && bad) info[blockIdx.x] = 1;
}

// Wider diagonal-block inverses from narrower ones: for the pairs t = t0 + blockIdx.y of
// width-w diagonal blocks (block 2t of order w1, block 2t+1 of order w2, possibly 0) of matrix
// b = blockIdx.z, writes the parts of
//   [L_a 0; L_ba L_c]^-1 = [L_a^-1 0; -L_c^-1 L_ba L_a^-1  L_c^-1]   (2w x 2w, ld 2w)
// that need no arithmetic: both inverses copied from lin, zeros elsewhere (also where an order
// is short of w). The lower-left block is two GEMMs afterwards (chol.rs).
// lin: [block][matrix][w x w], blocks lin_block floats apart; lout likewise at width 2w.
extern "C" __global__ void chol_inv_place(const float* __restrict__ lin, float* __restrict__ lout,
                                          int w, int r, int t0, long long lin_block,
                                          long long lout_block) {
    int t = t0 + blockIdx.y;
    long long b = blockIdx.z;
    int w2x = 2 * w;
    int k0 = 2 * t * w;
    int w1 = min(w, r - k0);
    int w2 = min(w, max(0, r - k0 - w));
    const float* A = lin + (long long)(2 * t) * lin_block + b * w * w;
    const float* C = lin + (long long)(2 * t + 1) * lin_block + b * w * w;
    float* X = lout + (long long)t * lout_block + b * w2x * w2x;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < w2x * w2x; e += gridDim.x * blockDim.x) {
        int row = e % w2x, col = e / w2x;
        float v = 0.f;
        if (row < w && col < w) {
            if (row < w1 && col < w1) v = A[col * w + row];
        } else if (row >= w && col >= w) {
            int rr = row - w, cc = col - w;
            if (rr < w2 && cc < w2) v = C[cc * w + rr];
        }
        X[e] = v;
    }
}
