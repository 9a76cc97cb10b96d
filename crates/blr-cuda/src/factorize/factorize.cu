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

// *dst += weight * (the sum of acc over the thread block): shuffles within each warp, the warps'
// sums through shared memory, one atomic per block. Every thread of the block must call it
// (it has a barrier); blockDim.x a multiple of 32, at most 1024.
__device__ __forceinline__ void block_sum_add(double acc, double* dst, double weight) {
    __shared__ double part[32];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        acc = lane < nw ? part[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
        if (lane == 0) atomicAdd(dst, weight * acc);
    }
}

// scal[slot] += weight * sum_i x[i] y[i], accumulated in double (block reduction + one atomic
// per block).
extern "C" __global__ void dot_acc(const float* __restrict__ x, const float* __restrict__ y,
                                   long long n, double* __restrict__ scal, int slot, double weight) {
    double acc = 0.0;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        acc += (double)x[i] * (double)y[i];
    }
    block_sum_add(acc, scal + slot, weight);
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

// d[(i*b_in + j)*r + k] = (U_i^T A_ij V_j)_kk, one thread per (k, block), two ways:
// from_av = 0: sum_c UT_i[k, j q + c] V^T[k, j q + c], from x = UT_i = U_i^T A_i (r, n) stored
//   one after the other and y = V^T (r, n) (len = n, w = q);
// from_av = 1: sum_c TV_j[k, i p + c] U^T[k, i p + c], from x = TV_j = V_j^T A_j^T (r, m) and
//   y = U^T (r, m) (len = m, w = p): b_in r m floats read instead of b_out r n. The blocks of
//   one i are neighbours, so the y slice they share comes from L2.
extern "C" __global__ void blast_diag(float* __restrict__ d, const float* __restrict__ x,
                                      const float* __restrict__ y, int r, int len, int w,
                                      int b_in, int from_av) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= r) return;
    int ij = blockIdx.y;
    int i = ij / b_in, j = ij % b_in;
    int xi = from_av ? j : i, blk = from_av ? i : j;
    const float* u = x + (long long)xi * r * len + (long long)blk * w * r + k;
    const float* v = y + (long long)blk * w * r + k;
    float acc = 0.f;
    for (int c = 0; c < w; ++c) acc += u[(long long)c * r] * v[(long long)c * r];
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
    block_sum_add(acc, scal + slot, 1.0);
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

// dst_z (cols x rows, ld cols) = src_z^T for src_z (rows x cols, ld rows), z = blockIdx.z, the
// blocks rows * cols floats apart: V^T's blocks between the solver's column-major layout (ld r)
// and blr's row-major one, on the device instead of the host. 32 x 32 tiles through shared
// memory (padded: no bank conflicts), 32 x 8 threads.
extern "C" __global__ void transpose_blocks(float* __restrict__ dst, const float* __restrict__ src,
                                            int rows, int cols) {
    __shared__ float tile[32][33];
    long long off = (long long)blockIdx.z * rows * cols;
    int r0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    int tx = threadIdx.x, ty = threadIdx.y;
    for (int k = ty; k < 32; k += 8) {
        int rr = r0 + tx, cc = c0 + k;
        if (rr < rows && cc < cols) tile[k][tx] = src[off + (long long)cc * rows + rr];
    }
    __syncthreads();
    for (int k = ty; k < 32; k += 8) {
        int cc = c0 + tx, rr = r0 + k;
        if (rr < rows && cc < cols) dst[off + (long long)rr * cols + cc] = tile[tx][k];
    }
}

// ---------------------------------------------------------------- batched Cholesky

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

// One diagonal block of the blocked Cholesky (chol.rs), for a batch of matrices: block b
// (blockIdx.x) factors the kb x kb block at (k0, k0) of its matrix a (lower, column-major, ld
// lda, matrices astride apart) in shared memory, writes L11 to the same place of l (lstride
// apart; l may be a), and writes L11^-1 (kb x kb, ld nb, zero above the diagonal) to linv[b]
// for the panel GEMMs and the group inverses. A pivot that is not positive and finite sets
// info[b] = 1 (the host reports it; the factor is then garbage). Shared memory: L and L^-1,
// kb x (kb + 1) floats each (+1: column walks hit distinct banks).
// The kernel is latency-bound (a chain of dependent steps, not arithmetic), so it is built to
// have few barriers: the columns go in panels of PW = 8. Per panel, (1) all threads apply the
// finished columns to it (left-looking, L[i][c] -= sum_{t<c0} L[i][t] L[c][t], one thread per
// entry, 4 independent sums), then (2) warp 0 factors the panel's 8 x 8 diagonal block
// redundantly in every lane's registers (no shuffles in the dependent chain, rsqrt for the
// pivots), each lane solves its own rows below it against that block, and the lanes write the
// block and its inverse D_I (into X). L^-1 is then built from the D_I by recursive doubling,
// lower-left block of [Xa 0; Lba Xc]^-1 = -Xc (Lba Xa), all pairs of a level at once (widths
// 8, 16, 32[, 64]). Barriers: 2 per panel and 2 per doubling level (22 at kb = 64, against 127
// for one column per barrier). Global loads are batched 8 per thread so their latencies
// overlap. n = the padded order (a power of two >= kb); R = rows per lane / 32 (kb <= 32 R).
template <int R>
__device__ __forceinline__ void chol_diag_q(const float* a, long long astride, float* l,
                                            long long lstride, int lda, int k0, int kb,
                                            float* __restrict__ linv, int nb,
                                            int* __restrict__ info) {
    constexpr int PW = 8;
    extern __shared__ float sm[];
    __shared__ int bad;
    __shared__ float rinv[32 * R];
    __shared__ float scr[(32 * R) * (32 * R) / 4];  // the pairs' L_ba X_a of one level
    int ld = kb + 1;
    float* L = sm;
    float* X = sm + kb * ld;
    const float* src = a + (long long)blockIdx.x * astride + (long long)k0 * lda + k0;
    float* dst = l + (long long)blockIdx.x * lstride + (long long)k0 * lda + k0;
    int tid = threadIdx.x, nt = blockDim.x;
    int kk2 = kb * kb;
    for (int base = 0; base < kk2; base += 8 * nt) {
        float v[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            int e = base + q * nt + tid;
            int row = e % kb, col = e / kb;
            v[q] = (e < kk2 && row >= col) ? src[(long long)col * lda + row] : 0.f;
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            int e = base + q * nt + tid;
            if (e < kk2) L[(e / kb) * ld + e % kb] = v[q];
        }
    }
    if (tid == 0) bad = 0;
    __syncthreads();
    int lane = tid & 31, warp = tid >> 5;
    for (int c0 = 0; c0 < kb; c0 += PW) {
        int w = min(PW, kb - c0);
        int rows = kb - c0;
        if (c0 > 0) {
            for (int e = tid; e < rows * w; e += nt) {
                int i = c0 + e % rows, c = c0 + e / rows;
                if (i < c) continue;
                float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
                int t = 0;
                for (; t + 4 <= c0; t += 4) {
                    s0 += L[t * ld + i] * L[t * ld + c];
                    s1 += L[(t + 1) * ld + i] * L[(t + 1) * ld + c];
                    s2 += L[(t + 2) * ld + i] * L[(t + 2) * ld + c];
                    s3 += L[(t + 3) * ld + i] * L[(t + 3) * ld + c];
                }
                for (; t < c0; ++t) s0 += L[t * ld + i] * L[t * ld + c];
                L[c * ld + i] -= (s0 + s1) + (s2 + s3);
            }
            __syncthreads();
        }
        if (warp == 0) {
            float d[PW][PW], rr[PW];
#pragma unroll
            for (int p = 0; p < PW; ++p)
#pragma unroll
                for (int q = 0; q <= p; ++q)
                    d[p][q] = (p < w) ? L[(c0 + q) * ld + c0 + p] : (p == q ? 1.f : 0.f);
#pragma unroll
            for (int j = 0; j < PW; ++j) {
                float dj = d[j][j];
                if (!(dj > 0.f) || !isfinite(dj)) {
                    if (lane == 0 && j < w) bad = 1;
                    dj = 1.f;
                }
                float rj = rsqrtf(dj);
                rr[j] = rj;
                d[j][j] = dj * rj;
#pragma unroll
                for (int p = j + 1; p < PW; ++p) d[p][j] *= rj;
#pragma unroll
                for (int p = j + 1; p < PW; ++p)
#pragma unroll
                    for (int q = j + 1; q <= p; ++q) d[p][q] -= d[p][j] * d[q][j];
            }
            // The rows below the block: x L_II^T = a, by substitution from registers.
#pragma unroll
            for (int k = 0; k < R; ++k) {
                int i = c0 + PW + lane + 32 * k;
                if (i < kb) {
                    float x[PW];
#pragma unroll
                    for (int c = 0; c < PW; ++c) x[c] = L[(c0 + c) * ld + i];
#pragma unroll
                    for (int j = 0; j < PW; ++j) {
                        float v = x[j];
#pragma unroll
                        for (int t = 0; t < j; ++t) v -= x[t] * d[j][t];
                        x[j] = v * rr[j];
                    }
#pragma unroll
                    for (int c = 0; c < PW; ++c) L[(c0 + c) * ld + i] = x[c];
                }
            }
            // D = L_II^-1, and both blocks stored by the lane that owns the row (after every
            // lane has read the block).
            __syncwarp();
            float dv[PW][PW];
#pragma unroll
            for (int c = 0; c < PW; ++c)
#pragma unroll
                for (int p = c; p < PW; ++p) {
                    float v = (p == c) ? 1.f : 0.f;
#pragma unroll
                    for (int t = c; t < p; ++t) v -= d[p][t] * dv[t][c];
                    dv[p][c] = v * rr[p];
                }
#pragma unroll
            for (int p = 0; p < PW; ++p) {
                if (lane == p && p < w) {
                    rinv[c0 + p] = rr[p];
#pragma unroll
                    for (int q = 0; q <= p; ++q) {
                        L[(c0 + q) * ld + c0 + p] = d[p][q];
                        X[(c0 + q) * ld + c0 + p] = dv[p][q];
                    }
                }
            }
        }
        __syncthreads();
    }
    for (int e = tid; e < kk2; e += nt) {
        int row = e % kb, col = e / kb;
        if (row >= col) dst[(long long)col * lda + row] = L[col * ld + row];
    }
    int n = PW;
    while (n < kb) n *= 2;
    for (int w = PW; w < n; w *= 2) {
        int ww = w * w, cnt = (n / (2 * w)) * ww;
        for (int e = tid; e < cnt; e += nt) {
            int pr = e / ww, rem = e % ww, i = rem % w, j = rem / w;
            int a0 = 2 * pr * w, b0 = a0 + w;
            float s0 = 0.f, s1 = 0.f;
            if (b0 + i < kb) {
                int kend = min(w, kb - a0);
                int k = j;
                for (; k + 2 <= kend; k += 2) {
                    s0 += L[(a0 + k) * ld + b0 + i] * X[(a0 + j) * ld + a0 + k];
                    s1 += L[(a0 + k + 1) * ld + b0 + i] * X[(a0 + j) * ld + a0 + k + 1];
                }
                if (k < kend) s0 += L[(a0 + k) * ld + b0 + i] * X[(a0 + j) * ld + a0 + k];
            }
            scr[pr * ww + j * w + i] = s0 + s1;
        }
        __syncthreads();
        for (int e = tid; e < cnt; e += nt) {
            int pr = e / ww, rem = e % ww, i = rem % w, j = rem / w;
            int a0 = 2 * pr * w, b0 = a0 + w;
            if (b0 + i >= kb || a0 + j >= kb) continue;
            const float* sp = scr + pr * ww + j * w;
            float s0 = 0.f, s1 = 0.f;
            int k = 0;
            for (; k + 2 <= i + 1; k += 2) {
                s0 += X[(b0 + k) * ld + b0 + i] * sp[k];
                s1 += X[(b0 + k + 1) * ld + b0 + i] * sp[k + 1];
            }
            if (k <= i) s0 += X[(b0 + k) * ld + b0 + i] * sp[k];
            X[(a0 + j) * ld + b0 + i] = -(s0 + s1);
        }
        __syncthreads();
    }
    float* inv = linv + (long long)blockIdx.x * nb * nb;
    for (int e = tid; e < kk2; e += nt) {
        int row = e % kb, col = e / kb;
        inv[col * nb + row] = row >= col ? X[col * ld + row] : 0.f;
    }
    if (tid == 0 && bad) info[blockIdx.x] = 1;
}

#define CHOL_DIAG_Q(NAME, R)                                                                   \
    extern "C" __global__ void NAME(const float* a, long long astride, float* l,              \
                                    long long lstride, int lda, int k0, int kb,               \
                                    float* __restrict__ linv, int nb, int* __restrict__ info) { \
        chol_diag_q<R>(a, astride, l, lstride, lda, k0, kb, linv, nb, info);                  \
    }
CHOL_DIAG_Q(chol_diag_q8, 2)
CHOL_DIAG_Q(chol_diag_q8w, 4)


// ---------------------------------------------------------------- group inverse

// The inverse of a whole column group's diagonal block, X = L_GG^-1 (gw x gw, ld outer), in one
// launch from the 64-wide diagonal-block inverses (instead of combining them pairwise level by
// level: 2 GEMMs and a placement per pair and level). Column block j (blockIdx.x) of X is a
// block forward substitution of its own: X[j][j] = Li_j, X[k][j] = -Li_k sum_{t=j}^{k-1}
// L[k][t] X[t][j] for k > j, zero above; matrix blockIdx.y. 64 x 64 tiles, 256 threads. lfac: the factors (ld r, lstride apart); linv0: the 64-wide
// inverses of block g0/64 + k at linv0 + k lin_block (matrix b at b 4096); out: this group's
// slot of the top level (matrix b at b outer^2). X tiles written by this block are read back
// by it after a barrier (plain loads: never the read-only path for them).
// The 64 x 64 x 64 tile products come in three kinds (IG_MODE): fp32 multiply-adds on CUDA
// cores (chol_inv_group), TF32 tensor cores, mma.sync m16n8k8 (chol_inv_group_tc), or 3 TF32
// products of the operands' high and low parts, a_hi b_hi + a_hi b_lo + a_lo b_hi, about fp32
// accuracy (chol_inv_group_tc3). Each of the 8 warps owns a 32 x 16 part of a 64 x 64 result
// (2 x 2 m16n8 tiles; the fp32 kind computes the same entries per lane as the mma fragments).
// Shared layouts: As[kk * IG_SA + i] = A[i][kk], Bs[jj * IG_SB + kk] = B[kk][jj]; the paddings
// make the fragment loads free of bank conflicts (rows 8 t + g, columns 4 g + t).
#define IG_SA 72
#define IG_SB 68

__device__ __forceinline__ unsigned ig_tf32(float x) {
    unsigned v;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(v) : "f"(x));
    return v;
}

__device__ __forceinline__ void ig_mma(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#define IG_FP32 0
#define IG_TF32 1
#define IG_TF32X3 2

// acc (this warp's 32 x 16 part, rows wm*32.., columns wn*16..) += A B over the 64-wide k.
// acc[mi][ni] holds the m16n8 tile's entries (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
template <int MODE>
__device__ __forceinline__ void ig_tile(float (&acc)[2][2][4], const float* As, const float* Bs,
                                        int wm, int wn, int g, int t) {
    if (MODE == IG_FP32) {
#pragma unroll 8
        for (int kk = 0; kk < 64; ++kk) {
            float av[2][2], bv[2][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                int m0 = wm * 32 + mi * 16 + g;
                av[mi][0] = As[kk * IG_SA + m0];
                av[mi][1] = As[kk * IG_SA + m0 + 8];
            }
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
                int n0 = wn * 16 + ni * 8 + 2 * t;
                bv[ni][0] = Bs[n0 * IG_SB + kk];
                bv[ni][1] = Bs[(n0 + 1) * IG_SB + kk];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 2; ++ni) {
                    acc[mi][ni][0] += av[mi][0] * bv[ni][0];
                    acc[mi][ni][1] += av[mi][0] * bv[ni][1];
                    acc[mi][ni][2] += av[mi][1] * bv[ni][0];
                    acc[mi][ni][3] += av[mi][1] * bv[ni][1];
                }
        }
        return;
    }
    const bool split = MODE == IG_TF32X3;
#pragma unroll 2
    for (int k0 = 0; k0 < 64; k0 += 8) {
        unsigned ah[2][4], al[2][4], bh[2][2], bl[2][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            int m0 = wm * 32 + mi * 16 + g;
            float x[4] = {As[(k0 + t) * IG_SA + m0], As[(k0 + t) * IG_SA + m0 + 8],
                          As[(k0 + t + 4) * IG_SA + m0], As[(k0 + t + 4) * IG_SA + m0 + 8]};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                ah[mi][e] = ig_tf32(x[e]);
                if (split) al[mi][e] = ig_tf32(x[e] - __uint_as_float(ah[mi][e]));
            }
        }
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
            int n0 = wn * 16 + ni * 8 + g;
            float y[2] = {Bs[n0 * IG_SB + k0 + t], Bs[n0 * IG_SB + k0 + t + 4]};
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                bh[ni][e] = ig_tf32(y[e]);
                if (split) bl[ni][e] = ig_tf32(y[e] - __uint_as_float(bh[ni][e]));
            }
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
                if (split) {
                    ig_mma(acc[mi][ni], al[mi], bh[ni]);
                    ig_mma(acc[mi][ni], ah[mi], bl[ni]);
                }
                ig_mma(acc[mi][ni], ah[mi], bh[ni]);
            }
    }
}

template <int MODE>
__device__ __forceinline__ void chol_inv_group_impl(const float* __restrict__ lfac,
                                                       long long lstride, int r, int g0, int gw,
                                                       const float* __restrict__ linv0,
                                                       long long lin_block, float* out,
                                                       int outer) {
    __shared__ float As[64 * IG_SA];
    __shared__ float Bs[64 * IG_SB];
    int j = blockIdx.x;
    long long b = blockIdx.y;
    int tid = threadIdx.x;
    int lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, t = lane & 3;
    int wm = warp & 1, wn = warp >> 1;
    int nbk = (gw + 63) / 64;
    int tiles = outer / 64;
    const float* L = lfac + b * lstride;
    float* X = out + b * (long long)outer * outer;
    for (int k = 0; k < tiles; ++k) {
        if (k > j && k < nbk) continue;
        const float* li = linv0 + (long long)(g0 / 64 + j) * lin_block + b * 4096;
        for (int e = tid; e < 4096; e += 256) {
            int i = e & 63, jj = e >> 6;
            X[(long long)(j * 64 + jj) * outer + k * 64 + i] = (k == j) ? li[jj * 64 + i] : 0.f;
        }
    }
    __syncthreads();
    for (int k = j + 1; k < nbk; ++k) {
        float acc[2][2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 2; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
        int row0 = g0 + k * 64;
        for (int tt = j; tt < k; ++tt) {
            int col0 = g0 + tt * 64;
#pragma unroll
            for (int q0 = 0; q0 < 16; q0 += 8) {
                float va[8], vb[8];
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    int e = (q0 + q) * 256 + tid;
                    int i = e & 63, kk = e >> 6;
                    int row = row0 + i, col = col0 + kk;
                    va[q] = (row < r && col < r) ? L[(long long)col * r + row] : 0.f;
                    vb[q] = X[(long long)(j * 64 + kk) * outer + tt * 64 + i];
                }
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    int e = (q0 + q) * 256 + tid;
                    As[(e >> 6) * IG_SA + (e & 63)] = va[q];
                    Bs[(e >> 6) * IG_SB + (e & 63)] = vb[q];
                }
            }
            __syncthreads();
            ig_tile<MODE>(acc, As, Bs, wm, wn, g, t);
            __syncthreads();
        }
        // T = acc becomes the right operand of -Li_k T: Bs[col * IG_SB + row] = T[row][col].
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
                int m0 = wm * 32 + mi * 16 + g, n0 = wn * 16 + ni * 8 + 2 * t;
                Bs[n0 * IG_SB + m0] = acc[mi][ni][0];
                Bs[(n0 + 1) * IG_SB + m0] = acc[mi][ni][1];
                Bs[n0 * IG_SB + m0 + 8] = acc[mi][ni][2];
                Bs[(n0 + 1) * IG_SB + m0 + 8] = acc[mi][ni][3];
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
            }
        const float* li = linv0 + (long long)(g0 / 64 + k) * lin_block + b * 4096;
#pragma unroll
        for (int q0 = 0; q0 < 16; q0 += 8) {
            float va[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) va[q] = li[(q0 + q) * 256 + tid];
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                int e = (q0 + q) * 256 + tid;
                As[(e >> 6) * IG_SA + (e & 63)] = va[q];
            }
        }
        __syncthreads();
        ig_tile<MODE>(acc, As, Bs, wm, wn, g, t);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
                int m0 = k * 64 + wm * 32 + mi * 16 + g;
                long long c0 = (long long)(j * 64 + wn * 16 + ni * 8 + 2 * t) * outer;
                X[c0 + m0] = -acc[mi][ni][0];
                X[c0 + outer + m0] = -acc[mi][ni][1];
                X[c0 + m0 + 8] = -acc[mi][ni][2];
                X[c0 + outer + m0 + 8] = -acc[mi][ni][3];
            }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(256, 2)
    chol_inv_group(const float* __restrict__ lfac, long long lstride, int r, int g0, int gw,
                   const float* __restrict__ linv0, long long lin_block, float* out, int outer) {
    chol_inv_group_impl<IG_FP32>(lfac, lstride, r, g0, gw, linv0, lin_block, out, outer);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    chol_inv_group_tc(const float* __restrict__ lfac, long long lstride, int r, int g0, int gw,
                      const float* __restrict__ linv0, long long lin_block, float* out,
                      int outer) {
    chol_inv_group_impl<IG_TF32>(lfac, lstride, r, g0, gw, linv0, lin_block, out, outer);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    chol_inv_group_tc3(const float* __restrict__ lfac, long long lstride, int r, int g0, int gw,
                       const float* __restrict__ linv0, long long lin_block, float* out,
                       int outer) {
    chol_inv_group_impl<IG_TF32X3>(lfac, lstride, r, g0, gw, linv0, lin_block, out, outer);
}

// ---------------------------------------------------------------- V step: rhs and diagonal

// blast_v_rhs and blast_diag in one pass over UT (both read all of U^T A, b_out (r, n)
// matrices): g (r, n) = -sum_i diag(s_ij) UT_i as blast_v_rhs (same order of the sum), and
// d[(i*b_in + j)*r + k] = sum_c UT_i[k, j q + c] V^T[k, j q + c] as blast_diag. Thread block
// (32 rows k, column block j): warp w walks the columns c = w, w + 8, .. of block j, each lane
// keeps the b_out partial sums of d in registers; the 8 warps' partials are added in a fixed
// order at the end. b_out <= VD_MAXB (the caller falls back to the two kernels otherwise).
#define VD_MAXB 16
extern "C" __global__ void __launch_bounds__(256)
    blast_v_rhs_diag(float* __restrict__ g, float* __restrict__ d, const float* __restrict__ ut,
                     const float* __restrict__ vt, const float* __restrict__ s, int r, int n,
                     int q, int b_out, int b_in) {
    __shared__ float part[8][VD_MAXB][33];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int k = blockIdx.x * 32 + lane;
    int j = blockIdx.y;
    bool ok = k < r;
    long long total = (long long)r * n;
    float sv[VD_MAXB], dacc[VD_MAXB];
#pragma unroll
    for (int i = 0; i < VD_MAXB; ++i) {
        sv[i] = (ok && i < b_out) ? s[((long long)i * b_in + j) * r + k] : 0.f;
        dacc[i] = 0.f;
    }
    if (ok) {
        for (int c = w; c < q; c += 8) {
            long long e = (long long)(j * q + c) * r + k;
            float v = vt[e];
            float u[VD_MAXB];
#pragma unroll
            for (int i = 0; i < VD_MAXB; ++i) u[i] = i < b_out ? ut[i * total + e] : 0.f;
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < VD_MAXB; ++i) {
                if (i < b_out) {
                    acc += sv[i] * u[i];
                    dacc[i] += u[i] * v;
                }
            }
            g[e] = -acc;
        }
    }
#pragma unroll
    for (int i = 0; i < VD_MAXB; ++i) part[w][i][lane] = dacc[i];
    __syncthreads();
    for (int idx = threadIdx.x; idx < b_out * 32; idx += blockDim.x) {
        int i = idx >> 5, l = idx & 31;
        int kk = blockIdx.x * 32 + l;
        if (kk < r) {
            float acc = 0.f;
#pragma unroll
            for (int ww = 0; ww < 8; ++ww) acc += part[ww][i][l];
            d[((long long)i * b_in + j) * r + kk] = acc;
        }
    }
}
