// Fully fused BLAST prefill: all three stages in one kernel, every intermediate on chip.
// Notation (BRIEF section 2): X (T, n), b_in x b_out blocks, q = n/b_in, p = m/b_out, rank r.
//   Z_j = X_j V_j             stage 1 (K = q)
//   W_i = sum_j s_ij . Z_j    stage 2 (per rank index a b_out x b_in mixing)
//   Y_i = W_i U_i^T           stage 3 (K = r)
//
// One thread-block cluster of B = max(b_in, b_out) CTAs owns one tile of TT = 128 tokens and one
// pass of up to PW = 256 columns of every output block (layers with p > 256 run ceil(p/256)
// passes as separate clusters; each recomputes stages 1-2). CTA `me` of the cluster:
//   - keeps X_me's tile (TT x q) in shared memory for the whole kernel (stage 1's B operand);
//   - walks the rank in chunks of RC = 64. Per chunk:
//       S1: Zt_me chunk (RC x TT) = V_me chunk (RC x q) * X_me tile^T, fp32 in registers, then
//           bf16 into a local staging tile zst[k][t] (tokens contiguous);
//       push Z: the chunk's 16 rank units of 4 ranks each are spread round-robin over the B
//           CTAs (unit u -> CTA u % B). Every CTA sends each unit's 4 rows of zst (4 x 256 B)
//           into the owner's zg[j = me][k][t] with 16-byte st.shared::cluster stores;
//       cluster barrier B1;
//       MIX: the owner mixes its units on tensor cores: per rank k and 16 tokens one
//           m16n8k16 pair, A = S[k] (i x j, 16 x 16, from L2), B = zg[j][k][t] via
//           ldmatrix.trans; the result W[i][k][t] goes to a local staging tile wst;
//       push W: rows wst[i][k] go to CTA i's wfull[buf][k][t] (16-byte remote stores);
//       cluster barrier B2;
//       S3: Y_me tile (TT x PW) += W_me chunk (TT x RC) * U_me chunk^T, fp32 accumulators in
//           registers for the whole kernel (128 per thread), A via ldmatrix.trans from wfull.
//     Software pipelined so that each barrier's wait has a stage GEMM in front of it:
//       S1(c); wait B2(c-1); push Z(c); arrive B1(c); S3(c-1); wait B1(c); MIX(c); push W(c);
//       arrive B2(c)   ... wfull is double-buffered for that.
//     Buffer reuse (why two cluster barriers per chunk suffice): push Z(c) rewrites the owners'
//     zg only after B2(c-1), which each owner passes after MIX(c-1) read zg; push W(c) rewrites
//     wfull[c & 1] of CTA i only after B1(c), which CTA i passes after S3(c-2) read it; the
//     local staging tile (Z rows, then W rows) is separated by __syncthreads or a barrier.
//   - at the end writes its Y tile once.
// DSMEM traffic per CTA and chunk: TT*RC*2 B out for Z and the same for W (16 KB each at
// TT = 128), b times less than exchanging whole Z chunks (what a CTA-per-output-block mixing
// would need). Weights V_me, U_me (and the owned rows of S) stream from L2 through a 2-slot
// cp.async ring of 32 KB tiles in consumption order V(0), V(1), U(0), V(2), U(1), ..., U(NC-1).
// DRAM traffic: X and Y once, weights once per token tile from L2 (they stay resident there).
// Roofline (llama7b q/k/v/o b=16 r=1024, T=1024): 17.7 GFLOP, 33 MB -> 25 us floor on H100.
//
// Warp layouts (8 warps): S1 2 (k, 32 each) x 4 (t, 32 each); S3 2 (t, 64 each) x 4 (p, 64
// each). Shared-memory rows are padded by 16 B (row strides = 4 words mod 32): the 8 rows of
// one ldmatrix phase fall in distinct bank groups.
// Requirements (launcher checks): b_in, b_out <= 16, q, p, r multiples of 8, sm_90 (clusters),
// the shared-memory total of `blr_fused_smem_bytes` within the device's opt-in limit.
#include "common.cuh"

namespace blr_fused {
constexpr int TT = 128;      // tokens per cluster
constexpr int RC = 64;       // ranks per chunk
constexpr int PW = 256;      // output columns per CTA and pass
constexpr int THREADS = 256;
constexpr int ZLD = TT + 8;  // row stride (elements) of zst / zg / wst / wfull
constexpr int ULD = RC + 8;  // row stride of a U tile
}  // namespace blr_fused

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
static __device__ __forceinline__ blr_u32 cluster_ctarank() {
    blr_u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
static __device__ __forceinline__ void cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
static __device__ __forceinline__ void cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The shared::cluster address of `local` (a shared::cta address) in CTA `rank` of the cluster.
static __device__ __forceinline__ blr_u32 map_remote(blr_u32 local, blr_u32 rank) {
    blr_u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(local), "r"(rank));
    return r;
}
static __device__ __forceinline__ void st_cluster16(blr_u32 addr, uint4 v) {
    asm volatile("st.shared::cluster.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}
#endif

// Shared-memory carve-up, identical on host (blast_fused.rs mirrors it) and device.
struct FusedSmem {
    int q16, xld, kown;
    int x_off, slot_off, slot_main, slot_elems, st_off, zg_off, wf_off, zero_off, total_bytes;
    __device__ FusedSmem(int q, int b_in, int b_out, int B) {
        using namespace blr_fused;
        q16 = (q + 15) / 16 * 16;
        xld = q16 + 8;
        kown = 4 * ((16 + B - 1) / B);
        const int v_el = RC * xld, u_el = PW * ULD;
        slot_main = v_el > u_el ? v_el : u_el;
        slot_elems = slot_main + kown * 256;  // + S (16 x 16 per rank) of the owned rank units
        const int st_rows = RC > b_out * kown ? RC : b_out * kown;
        x_off = 0;
        slot_off = x_off + TT * xld;
        st_off = slot_off + 2 * slot_elems;
        zg_off = st_off + st_rows * ZLD;
        wf_off = zg_off + b_in * kown * ZLD;
        zero_off = wf_off + 2 * RC * ZLD;
        total_bytes = (zero_off + 8) * 2;
    }
};

extern "C" __global__ void __launch_bounds__(256, 1)
    blr_blast_fused(const bf16* __restrict__ X, const bf16* __restrict__ U, const bf16* __restrict__ Vt,
                    const bf16* __restrict__ S, bf16* __restrict__ Y, int T, int n, int m, int r, int b_in,
                    int b_out, int B, int npass, int ablate) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    using namespace blr_fused;
    extern __shared__ __align__(128) unsigned char blr_fused_smem[];
    bf16* sm = reinterpret_cast<bf16*>(blr_fused_smem);
    const int q = n / b_in, p = m / b_out;
    const FusedSmem L(q, b_in, b_out, B);
    const int xld = L.xld, q16 = L.q16, kown = L.kown;
    bf16* xs = sm + L.x_off;
    bf16* zst = sm + L.st_off;  // Z^T staging, then (aliased) W staging
    bf16* zg = sm + L.zg_off;
    bf16* wf = sm + L.wf_off;
    bf16* zero = sm + L.zero_off;

    const int me = (int)cluster_ctarank();
    const int cid = blockIdx.x / B;
    const int pass = cid % npass;
    const int t0 = (cid / npass) * TT;
    const int pcol0 = pass * PW;
    const int pw = min(PW, p - pcol0);
    const bool has_in = me < b_in, has_out = me < b_out;
    const int nc = (r + RC - 1) / RC;
    const int ntiles = 2 * nc;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;

    if (tid < 8) zero[tid] = __float2bfloat16(0.f);

    // --- cp.async producers -------------------------------------------------------------------
    auto issue_x = [&]() {
        const int vec = q16 / 8;
        for (int idx = tid; idx < TT * vec; idx += THREADS) {
            const int t = idx / vec, col = (idx % vec) * 8;
            const bool pred = has_in && (t0 + t < T) && (col < q);
            const bf16* src = pred ? X + (long)(t0 + t) * n + (long)me * q + col : X;
            cp_async16(smem_addr(xs + t * xld + col), src, pred);
        }
    };
    // Tile n of the consumption order V(0), V(1), U(0), V(2), U(1), ..., V(nc-1), U(nc-2), U(nc-1).
    auto issue_tile = [&](int tn) {
        bf16* slot = sm + L.slot_off + (tn & 1) * L.slot_elems;
        bool is_v;
        int ch;
        if (tn == 0) {
            is_v = true, ch = 0;
        } else if (tn == ntiles - 1) {
            is_v = false, ch = nc - 1;
        } else {
            ch = (tn + 1) / 2;
            is_v = tn & 1;
            if (!is_v) ch -= 1;
        }
        // S of chunk c rides with odd tile 2c + 1 (V(c + 1), or U(nc - 1) for the last chunk):
        // MIX(c) waits for that tile right before it, and the slot is refilled only after tile
        // 2c + 1 itself is consumed, later.
        if (tn & 1) {
            const int sc = (tn - 1) / 2;
            bf16* ss = slot + L.slot_main;
            for (int idx = tid; idx < kown * 32; idx += THREADS) {
                const int kl = idx >> 5;
                const int u = me + (kl >> 2) * B;
                const int gk = sc * RC + u * 4 + (kl & 3);
                const bool pred = u < 16 && gk < r;
                const bf16* src = pred ? S + (long)gk * 256 + (idx & 31) * 8 : S;
                cp_async16(smem_addr(ss + idx * 8), src, pred);
            }
        }
        if (is_v) {
            const int vec = q16 / 8;
            for (int idx = tid; idx < RC * vec; idx += THREADS) {
                const int k = idx / vec, col = (idx % vec) * 8;
                const int gk = ch * RC + k;
                const bool pred = has_in && gk < r && col < q;
                const bf16* src = pred ? Vt + ((long)me * r + gk) * q + col : Vt;
                cp_async16(smem_addr(slot + k * xld + col), src, pred);
            }
        } else {
            for (int idx = tid; idx < PW * (RC / 8); idx += THREADS) {
                const int pp = idx >> 3, kv = (idx & 7) * 8;
                const int gk = ch * RC + kv;
                const bool pred = has_out && pp < pw && gk < r;
                const bf16* src = pred ? U + ((long)me * p + pcol0 + pp) * r + gk : U;
                cp_async16(smem_addr(slot + pp * ULD + kv), src, pred);
            }
        }
    };
    // Tiles tn and tn + 1 are in flight when tile tn is acquired; release(tn) refills its
    // slot with tile tn + 2 once every warp is done with it (one commit group per tile).
    auto acquire = [&](int tn) -> const bf16* {
        cp_async_wait<1>();
        __syncthreads();
        return sm + L.slot_off + (tn & 1) * L.slot_elems;
    };
    auto release = [&](int tn) {
        __syncthreads();
        if (tn + 2 < ntiles && !(ablate & 64)) issue_tile(tn + 2);
        cp_async_commit();
    };

    // --- accumulators -------------------------------------------------------------------------
    float yacc[4][8][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) yacc[a][b][e] = 0.f;

    // S3 for chunk ch from tile tn: Y (TT x PW) += wfull[ch & 1] (as TT x RC) * U tile^T.
    const int s3_t = (warp >> 2) * 64, s3_p = (warp & 3) * 64;
    auto stage3 = [&](int tn, int ch) {
        const bf16* ut = acquire(tn);
        if (s3_p < pw && !(ablate & 16)) {
            const bf16* wb = wf + (ch & 1) * RC * ZLD;
#pragma unroll
            for (int kk = 0; kk < RC; kk += 16) {
                blr_u32 a[4][4];
#pragma unroll
                for (int mt = 0; mt < 4; ++mt) {
                    const int mi = lane >> 3;
                    const int k = kk + ((mi >> 1) << 3) + (lane & 7);
                    const int t = s3_t + mt * 16 + ((mi & 1) << 3);
                    ldmatrix_x4_trans(smem_addr(wb + k * ZLD + t), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
                }
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    const int mi = lane >> 3;
                    const int pp = s3_p + np * 16 + ((mi >> 1) << 3) + (lane & 7);
                    const int k = kk + ((mi & 1) << 3);
                    blr_u32 b0, b1, b2, b3;
                    ldmatrix_x4(smem_addr(ut + pp * ULD + k), b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < 4; ++mt) {
                        mma_bf16(yacc[mt][2 * np], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
                        mma_bf16(yacc[mt][2 * np + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
                    }
                }
            }
        }
        release(tn);
    };

    // Start: every CTA of the cluster is running before anyone writes into its shared memory.
    cluster_arrive();
    cluster_wait();
    if (ablate & 512) return;
    issue_x();
    issue_tile(0);
    cp_async_commit();
    if (ntiles > 1) issue_tile(1);
    cp_async_commit();

    const int s1_k = (warp >> 2) * 32, s1_t = (warp & 3) * 32;
    bool pending_b2 = false;
    if (ablate & 1024) {  // measurement: launch, start barrier and the first loads only
        cp_async_wait<0>();
        __syncthreads();
        cluster_arrive();
        cluster_wait();
        return;
    }
    for (int ch = 0; ch < nc; ++ch) {
        // ---- S1: Zt chunk (RC x TT) = V chunk (RC x q) * X^T --------------------------------
        float zacc[2][4][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) zacc[a][b][e] = 0.f;
        {
            const int tn = ch == 0 ? 0 : 2 * ch - 1;
            const bf16* vt = acquire(tn);
            for (int kq = 0; kq < ((ablate & 8) ? 0 : q16); kq += 16) {
                blr_u32 a[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    const int row = s1_k + mt * 16 + (lane & 15);
                    const int col = kq + ((lane >> 4) << 3);
                    ldmatrix_x4(smem_addr(vt + row * xld + col), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
                }
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    const int mi = lane >> 3;
                    const int t = s1_t + np * 16 + ((mi >> 1) << 3) + (lane & 7);
                    const int col = kq + ((mi & 1) << 3);
                    blr_u32 b0, b1, b2, b3;
                    ldmatrix_x4(smem_addr(xs + t * xld + col), b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < 2; ++mt) {
                        mma_bf16(zacc[mt][2 * np], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
                        mma_bf16(zacc[mt][2 * np + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
                    }
                }
            }
            release(tn);
        }
        // zst[k][t] = bf16(Zt); zst's previous reader (push W of ch-1) finished before the trailing
        // __syncthreads of S1.
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int k = s1_k + mt * 16 + g;
                const int t = s1_t + nt * 8 + 2 * c4;
                *reinterpret_cast<blr_u32*>(zst + k * ZLD + t) = pack_bf16x2(zacc[mt][nt][0], zacc[mt][nt][1]);
                *reinterpret_cast<blr_u32*>(zst + (k + 8) * ZLD + t) =
                    pack_bf16x2(zacc[mt][nt][2], zacc[mt][nt][3]);
            }
        __syncthreads();
        if (pending_b2) {  // late mode: B2(ch-1) arrives after S1(ch)
            cluster_arrive();
            pending_b2 = false;
        }
        if (ch > 0 && !(ablate & 4)) cluster_wait();  // B2(ch-1): every owner is done mixing chunk ch-1 (zg free)
        // ---- push Z: unit u (ranks 4u..4u+3 of the chunk) -> CTA u % B, slot u / B ----------
        // Unit order rotated by `me`: the CTAs of the cluster write to different owners at once.
        if (has_in && !(ablate & 1)) {
            for (int idx = tid; idx < RC * (TT / 8); idx += THREADS) {
                const int tv = (idx % (TT / 8)) * 8;
                const int u = (idx / (TT / 2) + ((ablate & 128) ? 0 : me)) % 16;
                const int k = u * 4 + (idx / (TT / 8)) % 4;
                const int owner = u % B, kl = (u / B) * 4 + (k & 3);
                const uint4 v = *reinterpret_cast<const uint4*>(zst + k * ZLD + tv);
                const blr_u32 dst = smem_addr(zg + (me * kown + kl) * ZLD + tv);
                st_cluster16(map_remote(dst, owner), v);
            }
        }
        const bool late = ablate & 256;
        if (!(ablate & 4) && !late) cluster_arrive();  // B1(ch)
        if (ch > 0) stage3(2 * ch, ch - 1);
        if (!(ablate & 4) && late) cluster_arrive();
        if (!(ablate & 4)) cluster_wait();  // B1(ch): zg holds every input block's rows of my units
        cp_async_wait<1>();  // tile 2ch + 1 (carrying S of this chunk) has landed
        __syncthreads();
        // ---- MIX: W[i][k][t] = sum_j S[k][i][j] Z[j][k][t] for my units --------------------
        const int nunits = (16 - me + B - 1) / B;  // units me, me + B, ... < 16
        const int items = (ablate & 32) ? 0 : nunits * 4 * (TT / 16);
        // S rows of my units for this chunk (zero past r), loaded with tile 2 * ch.
        const bf16* ss_mix = sm + L.slot_off + ((2 * ch + 1) & 1) * L.slot_elems + L.slot_main;
        // Four items per warp and round, loads first: each item is a short dependent chain
        // (ldmatrix -> mma -> store), so issuing four side by side hides most of its latency.
        for (int base = warp; base < items; base += 4 * (THREADS / 32)) {
            blr_u32 fa[4][4], fb[4][4];
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const int it = min(base + x * (THREADS / 32), items - 1);
                const int kl = it / (TT / 16), tt = (it % (TT / 16)) * 16;
                ldmatrix_x4(smem_addr(ss_mix + kl * 256 + (lane & 15) * 16 + ((lane >> 4) << 3)), fa[x][0], fa[x][1],
                            fa[x][2], fa[x][3]);
                const int mi = lane >> 3;
                const int j = ((mi & 1) << 3) + (lane & 7);
                const int t = tt + ((mi >> 1) << 3);
                const bf16* row = j < b_in ? zg + (j * kown + kl) * ZLD + t : zero;
                ldmatrix_x4_trans(smem_addr(row), fb[x][0], fb[x][1], fb[x][2], fb[x][3]);
            }
            float d[4][2][4];
#pragma unroll
            for (int x = 0; x < 4; ++x) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) d[x][h][e] = 0.f;
                    mma_bf16(d[x][h], fa[x][0], fa[x][1], fa[x][2], fa[x][3], fb[x][2 * h], fb[x][2 * h + 1]);
                }
            }
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const int it = base + x * (THREADS / 32);
                if (it >= items) break;
                const int kl = it / (TT / 16), tt = (it % (TT / 16)) * 16;
                // d[x][h]: (i = g, t = tt + 8h + 2c4, +1), (i = g + 8, same t).
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if (g < b_out)
                        *reinterpret_cast<blr_u32*>(zst + (g * kown + kl) * ZLD + tt + 8 * h + 2 * c4) =
                            pack_bf16x2(d[x][h][0], d[x][h][1]);
                    if (g + 8 < b_out)
                        *reinterpret_cast<blr_u32*>(zst + ((g + 8) * kown + kl) * ZLD + tt + 8 * h + 2 * c4) =
                            pack_bf16x2(d[x][h][2], d[x][h][3]);
                }
            }
        }
        __syncthreads();
        // ---- push W: wst[i][kl] -> CTA i's wfull[ch & 1][4u + (kl & 3)] ----------------------
        {
            const int rows = nunits * 4;
            for (int idx = tid; idx < ((ablate & 2) ? 0 : b_out * rows * (TT / 8)); idx += THREADS) {
                const int tv = (idx % (TT / 8)) * 8;
                const int kl = (idx / (TT / 8)) % rows;
                const int i = (idx / (TT / 8) / rows + ((ablate & 128) ? 0 : me)) % b_out;
                const int k = (me + (kl >> 2) * B) * 4 + (kl & 3);
                const uint4 v = *reinterpret_cast<const uint4*>(zst + (i * kown + kl) * ZLD + tv);
                const blr_u32 dst = smem_addr(wf + ((ch & 1) * RC + k) * ZLD + tv);
                st_cluster16(map_remote(dst, i), v);
            }
        }
        if ((!(ablate & 4) && !late) || ch == nc - 1) cluster_arrive();  // B2(ch)
        if (late && !(ablate & 4) && ch + 1 < nc) pending_b2 = true;
    }
    cluster_wait();  // B2(nc-1): wfull of the last chunk is complete; no more remote stores
    stage3(ntiles - 1, nc - 1);

    // ---- Y tile: rows t0 + t, columns me*p + pcol0 + col --------------------------------------
    if (has_out && s3_p < pw && !(ablate & 2048)) {
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const int col = s3_p + nt * 8 + 2 * c4;
                if (col >= pw) continue;
                bf16* ybase = Y + (long)me * p + pcol0 + col;
                const int ta = t0 + s3_t + mt * 16 + g;
                if (ta < T)
                    *reinterpret_cast<blr_u32*>(ybase + (long)ta * m) = pack_bf16x2(yacc[mt][nt][0], yacc[mt][nt][1]);
                if (ta + 8 < T)
                    *reinterpret_cast<blr_u32*>(ybase + (long)(ta + 8) * m) =
                        pack_bf16x2(yacc[mt][nt][2], yacc[mt][nt][3]);
            }
    }
#else
    // Thread-block clusters need sm_90; the launcher never launches this on older devices.
    __trap();
#endif
}
