//! BLAST factorization (Lee et al., NeurIPS 2024; BRIEF section 3): preconditioned alternating
//! descent on `W_ij ≈ U_i diag(s_ij) V_j^T`, for any `b_out x b_in` grid and rectangular `W`.
//!
//! Notation (BRIEF section 2): `A (m, n)` is the (normalised) weight, blocks `A_ij (p, q)` with
//! `p = m / b_out`, `q = n / b_in`; `U_i (p, r)`, `V_j (q, r)` (stored transposed as `vt`),
//! `s_ij (r)`. `C̄_i = [diag(s_i1) V_1^T ... diag(s_ib) V_b^T]` (r, n) so that row block `i` of
//! `Â` is `U_i C̄_i`; `B̄_j = [U_1 diag(s_1j); ...]` (m, r) so that column block `j` is
//! `B̄_j V_j^T`.
//!
//! One loss covers both variants: `L = 1/2 tr(E G E^T)`, `E = A - Â`, with `G = I` data-free
//! (never formed: every product with it is skipped) and `G = G'` (the normalised damped Gram,
//! see `Gram::weight`) calibrated. With `T = A G` (the "target", computed once):
//! - `grad_Ui = U_i P_i - T_i C̄_i^T` with `P_i = C̄_i G C̄_i^T = sum_jj' (s_ij s_ij'^T) ⊙ V_j^T G_jj' V_j'`;
//! - `grad_Vj^T = sum_j' Q_jj' V_j'^T G_j'j - sum_i diag(s_ij) U_i^T T_ij`, `Q_jj' = sum_i (s_ij s_ij'^T) ⊙ U_i^T U_i`;
//! - `grad_sij = sum_j' ((U_i^T U_i) ⊙ (V_j^T G_jj' V_j')) s_ij' - diag(U_i^T T_ij V_j)`.
//!
//! Preconditioners are the Gauss-Newton matrices plus `eps I`, `eps = damping * ||E||`
//! (0.1 by default, recomputed before each sub-step): `(P_i + eps I)^-1` on the right of the U
//! gradient, `(Q_jj + eps I)^-1` on the left of the V gradient (and, calibrated,
//! `G'_jj^-1` on its right: the Kronecker factor of the V Hessian's diagonal block),
//! `((U_i^T U_i) ⊙ (V_j^T G_jj V_j) + eps I)^-1` for `s_ij`. Data-free these are exactly the
//! published updates and each sub-problem separates over blocks, so a step of length lr <= 1
//! never increases the loss. Calibrated, the V and S sub-problems couple blocks through the
//! off-diagonal Gram blocks; those two steps therefore get an exact line search (the loss is
//! quadratic in the block being updated, so one extra evaluation fixes the curvature along the
//! step) capped at the scheduled lr. The U step stays exact Gauss-Newton in both variants.
//!
//! Cost per iteration: two big GEMM families, `T V_j` and `U_i^T T` (2 m n r flops each), plus
//! `b_out + b_in + b_out b_in` Cholesky factorizations of r x r matrices. Calibrated adds
//! `G V` (2 n^2 r flops) per V evaluation.

use crate::error::{CompressError, Result};
use crate::linalg;
use crate::progress::Progress;
use crate::target::{Calibration, Target};
use blr_core::format::Shape;
use blr_core::rng::{NormalStream, Rng};
use blr_core::{Blast, FormatKind, Linear};
use faer::linalg::solvers::{Llt, Solve};
use faer::Mat;
use rayon::prelude::*;

/// How each alternating step moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlastMethod {
    /// The published preconditioned updates (default).
    Preconditioned,
    /// Plain gradient descent with the same alternation and lr schedule; each block's step is
    /// scaled by `1 / L` with `L` the Gershgorin bound of its Gauss-Newton matrix (the largest
    /// step guaranteed not to diverge). A baseline, to show what preconditioning buys.
    GradientDescent,
}

/// How the factors start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlastInit {
    /// The published initialisation: `U, V ~ N(0, 1) * 0.001 / sqrt(r)`, `S ~ N(0, 1)`.
    Random,
    /// Start from the rank-r truncated SVD `A ≈ X Y^T` written as BLAST: `U_i` = row block
    /// `i` of `X sqrt(S)`, `V_j` = row block `j` of `Y sqrt(S)`, `s_ij = 1`. Every iteration
    /// then only lowers the error, so the result is never worse than low-rank at the same r.
    /// With `restarts > 1` only the first start uses it; the others are random.
    LowRank,
    /// An algebraic start that is exact when `A` is exactly BLAST(b, r) with generic factors
    /// and `r <= min(p, q)`, `b_out, b_in >= 2` (otherwise the random start is used):
    /// `Ũ_i`, `Ṽ_j` = top-r singular vectors of block row `i` / block column `j`, so that
    /// `M_ij = Ũ_i^T A_ij Ṽ_j = R_i S_ij T_j^T` for unknown r x r mixings `R_i`, `T_j`. Then
    /// `M_00 M_i'0^-1 M_i'j' M_0j'^-1 = R_0 Λ R_0^-1` with `Λ` diagonal for every `i', j'`
    /// (a Jennrich-style simultaneous diagonalisation; a random combination of up to 8 such
    /// products averages out noise), so the eigenvectors give `R_0`; `T_j^T = R_0^-1 M_0j`
    /// and `R_i = M_i0 T_0^-T` follow (scales absorbed into S), and S is the least-squares fit.
    /// The published random start stalls in local minima on such matrices (docs/compression.md);
    /// this one lands on the answer and the iterations only polish it. On general weights the
    /// eigenvectors are noise (complex eigenvalues are truncated to their real parts): the
    /// start is kept only if it already has relative error <= 0.5, else the random start is
    /// used. With `restarts > 1` only the first start uses it.
    Spectral,
}

/// BLAST factorization settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlastOptions {
    /// Blocks along the outputs (must divide m).
    pub b_out: usize,
    /// Blocks along the inputs (must divide n).
    pub b_in: usize,
    pub rank: usize,
    /// Alternating iterations (one U, one V, one S step each); 300 by default.
    pub iterations: usize,
    /// Initial learning rate, decayed linearly to 0; 1.0 by default.
    pub lr: f64,
    /// Damping factor: eps = damping * ||A - Â||_F (normalised units); 0.1 by default.
    pub damping: f64,
    /// Seed of the random initialisation.
    pub seed: u64,
    pub method: BlastMethod,
    pub init: BlastInit,
    /// Starts to probe (1 = the published single run); see `blast_report`.
    pub restarts: usize,
}

impl BlastOptions {
    /// The published defaults with `blocks` on each side.
    pub fn new(blocks: usize, rank: usize) -> Self {
        BlastOptions {
            b_out: blocks,
            b_in: blocks,
            rank,
            iterations: 300,
            lr: 1.0,
            damping: 0.1,
            seed: 0,
            method: BlastMethod::Preconditioned,
            init: BlastInit::Random,
            restarts: 1,
        }
    }
}

/// The factorized layer with its error.
#[derive(Clone, Debug)]
pub struct BlastReport {
    pub layer: Linear,
    /// Relative error after each iteration of the continued run, in the norm minimised
    /// (Frobenius data-free, damped-Gram-weighted calibrated). It is computed from the factored
    /// quantities (`||A||^2 - 2 <A, Â> + ||Â||^2` with f32 GEMMs), so it cancels below ~1e-3;
    /// the first entries come from the probe of the start that was kept.
    pub history: Vec<f64>,
    /// The exact final relative error from the dense residual: `||W - Ŵ||_F / ||W||_F`, or
    /// calibrated `||(W - Ŵ) X||_F / ||W X||_F` with the raw Gram.
    pub rel_error: f64,
}

/// The factor `A = W / scale` is normalised by: the standard deviation of the entries (their
/// RMS when they are all equal; 0 only for `W = 0`). The damping rule and the init scale assume
/// unit-variance entries.
fn normalisation(target: &Target<'_>) -> f64 {
    use rayon::prelude::*;
    // Fixed chunks summed in order: the same value whatever the thread count.
    const CHUNK: usize = 1 << 16;
    let w = target.weight;
    let count = (target.m * target.n) as f64;
    let sums: Vec<f64> = w
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| v as f64).sum::<f64>())
        .collect();
    let mean = sums.iter().sum::<f64>() / count;
    let sq: Vec<(f64, f64)> = w
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter().fold((0.0, 0.0), |(d, s), &v| {
                let v = v as f64;
                (d + (v - mean).powi(2), s + v * v)
            })
        })
        .collect();
    let var = sq.iter().map(|t| t.0).sum::<f64>() / count;
    let rms = (sq.iter().map(|t| t.1).sum::<f64>() / count).sqrt();
    if var > 0.0 {
        var.sqrt()
    } else {
        rms
    }
}

/// The shape and option checks shared by [`blast_report`] and [`blast_start`].
fn validate(target: &Target<'_>, opts: &BlastOptions) -> Result<()> {
    let name = target.name;
    let (m, n, r) = (target.m, target.n, opts.rank);
    Shape {
        format: FormatKind::Blast,
        m,
        n,
        b_out: opts.b_out,
        b_in: opts.b_in,
        rank: r,
    }
    .validate()
    .map_err(|e| CompressError::input(name, e.to_string()))?;
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return Err(CompressError::input(
            name,
            format!("BLAST lr must be > 0, got {}", opts.lr),
        ));
    }
    if opts.iterations == 0 {
        return Err(CompressError::input(
            name,
            "BLAST needs at least 1 iteration (300 is the published default)",
        ));
    }
    if !(opts.damping >= 0.0 && opts.damping.is_finite()) {
        return Err(CompressError::input(
            name,
            format!("BLAST damping must be >= 0, got {}", opts.damping),
        ));
    }
    Ok(())
}

/// The starting point of start `k` of a data-free BLAST run, exactly as [`blast_report`] builds
/// it, for back ends that run the same iteration elsewhere (the GPU path in `blr-cuda`).
#[derive(Clone, Debug)]
pub struct BlastStart {
    /// `A = W / scale` is what the iterations factorize; `s` is multiplied back by it at the end.
    /// 0 only for `W = 0` (then the factors are all zero and no iteration is needed).
    pub scale: f64,
    /// `U (m, r)` row-major: block row `i` is `U_i`.
    pub u: Vec<f32>,
    /// `V_j^T (r, q)` row-major for `j` in `0..b_in`, one after the other (the layout of
    /// `blr_core::Blast`'s `vt`).
    pub vt: Vec<f32>,
    /// `s[(i * b_in + j) * r + k]`.
    pub s: Vec<f64>,
}

/// The data-free start of restart `k` (`0..opts.restarts`): the seeded random start, or for
/// `k = 0` the low-rank / spectral start `opts.init` asks for. Validates the shape and options
/// as [`blast_report`] does.
pub fn blast_start(target: &Target<'_>, opts: &BlastOptions, k: usize) -> Result<BlastStart> {
    validate(target, opts)?;
    let name = target.name;
    let (m, n, r) = (target.m, target.n, opts.rank);
    let (b_out, b_in) = (opts.b_out, opts.b_in);
    let (p, q) = (m / b_out, n / b_in);
    let scale = normalisation(target);
    let seed = opts.seed.wrapping_add(k as u64);
    if scale == 0.0 || k > 0 || opts.init == BlastInit::Random {
        // The seeded start straight in the output layouts (no matrices in between).
        let (u, vt, s) = random_factors(seed, b_out, b_in, p, q, r);
        return Ok(BlastStart { scale, u, vt, s });
    }
    let mut st = State::random(seed, b_out, b_in, p, q, r);
    let a = Mat::<f32>::from_fn(m, n, |i, j| {
        (target.weight[i * n + j] as f64 / scale) as f32
    });
    match opts.init {
        BlastInit::LowRank => lowrank_init(&a, &mut st, b_out, b_in, name)?,
        BlastInit::Spectral => spectral_init(&a, &mut st, b_out, b_in),
        BlastInit::Random => {}
    }
    let mut u = Vec::with_capacity(m * r);
    for ui in &st.u {
        u.extend(linalg::to_row_major(ui.as_ref()));
    }
    let mut vt = Vec::with_capacity(n * r);
    for vj in &st.v {
        vt.extend(linalg::to_row_major(vj.transpose()));
    }
    Ok(BlastStart {
        scale,
        u,
        vt,
        s: st.s,
    })
}

/// The published start, `U, V ~ N(0, 1) * 0.001 / sqrt(r)`, `S ~ N(0, 1)`, in the layouts of
/// [`BlastStart`] (`U (m, r)` row-major, the `V_j^T (r, q)` row-major one after the other, `s`).
/// Every entry is a function of (seed, factor, position) only ([`NormalStream`]: U stream 0,
/// V stream 1, S stream 2, the index its position in these layouts), so the 23 M draws at
/// 4096 x 11008, r = 1488 fill in parallel, and the CPU and GPU paths start from the same
/// factors.
fn random_factors(
    seed: u64,
    b_out: usize,
    b_in: usize,
    p: usize,
    q: usize,
    r: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
    use rayon::prelude::*;
    let init = 0.001 / (r as f64).sqrt();
    let mut u = vec![0f32; b_out * p * r];
    NormalStream::new(seed, 0).fill(&mut u, 0, init);
    let mut vt = vec![0f32; b_in * q * r];
    NormalStream::new(seed, 1).fill(&mut vt, 0, init);
    let ss = NormalStream::new(seed, 2);
    let s = (0..(b_out * b_in * r) as u64)
        .into_par_iter()
        .map(|e| ss.at(e))
        .collect();
    (u, vt, s)
}

/// Factorizes `target` into BLAST form (data-free when `calib` is `None`).
pub fn blast(
    target: &Target<'_>,
    opts: &BlastOptions,
    calib: Option<&Calibration<'_>>,
    progress: &dyn Progress,
) -> Result<Linear> {
    Ok(blast_report(target, opts, calib, progress)?.layer)
}

/// Like [`blast`], also returning the per-iteration error history.
pub fn blast_report(
    target: &Target<'_>,
    opts: &BlastOptions,
    calib: Option<&Calibration<'_>>,
    progress: &dyn Progress,
) -> Result<BlastReport> {
    validate(target, opts)?;
    let name = target.name;
    let (m, n, r) = (target.m, target.n, opts.rank);
    let (b_out, b_in) = (opts.b_out, opts.b_in);
    let (p, q) = (m / b_out, n / b_in);

    let scale = normalisation(target);
    if scale == 0.0 {
        // W = 0 is exactly BLAST with zero factors.
        let layer = Blast::new(
            m,
            n,
            b_out,
            b_in,
            r,
            vec![0.0; m * r],
            vec![0.0; r * n],
            vec![0.0; b_out * b_in * r],
        )?;
        return Ok(BlastReport {
            layer: Linear::Blast(layer),
            history: vec![0.0; opts.iterations],
            rel_error: 0.0,
        });
    }
    let a = Mat::<f32>::from_fn(m, n, |i, j| {
        (target.weight[i * n + j] as f64 / scale) as f32
    });
    let weight = match calib {
        Some(c) => Some(c.weight_for(target)?),
        None => None,
    };
    let a_copy = if opts.init != BlastInit::Random {
        a.clone()
    } else {
        Mat::zeros(0, 0)
    };
    let prob = Problem::new(name, a, weight.as_ref(), b_out, b_in, r)?;

    // Local minima are real for this CP-like problem: from the published random start,
    // exactly-BLAST test matrices are recovered from half to all of the seeds depending on the
    // shape, the others stall at 2-15% error (docs/compression.md has the table). Restarts run
    // a short probe (a tenth of the iterations, on the same lr schedule) from several starts
    // and continue the best one.
    let restarts = opts.restarts.max(1);
    let probe = if restarts > 1 {
        (opts.iterations / 10).clamp(1, opts.iterations.max(1))
    } else {
        0
    };
    progress.begin("blast", opts.iterations + (restarts - 1) * probe);
    let done = std::cell::Cell::new(0usize);
    let run =
        |st: &mut State, iters: std::ops::Range<usize>, history: &mut Vec<f64>| -> Result<()> {
            let mut cache = Cache {
                j: prob.u_gram(&st.u),
                vgv: prob.vgv(&st.v),
            };
            for it in iters {
                let lr = opts.lr * (1.0 - it as f64 / opts.iterations as f64);
                // The published updates descend on ||E||_F^2, whose gradient is twice that of our
                // 1/2-scaled loss, while the preconditioner is the Gauss-Newton matrix of the
                // latter: a preconditioned step at lr is 2 lr Newton steps (over-relaxed early,
                // under-relaxed once lr < 0.5).
                let step = match opts.method {
                    BlastMethod::Preconditioned => 2.0 * lr,
                    BlastMethod::GradientDescent => lr,
                };
                let ctx = Step {
                    step,
                    damping: opts.damping,
                    method: opts.method,
                };
                prob.step_u(st, &ctx, &mut cache)?;
                let ut = prob.step_v(st, &ctx, &mut cache)?;
                let loss = prob.step_s(st, &ut, &ctx, &cache)?;
                let rel = prob.relative(loss);
                if !rel.is_finite() {
                    return Err(CompressError::numerical(
                        name,
                        "BLAST factorization",
                        format!(
                        "error became {rel} at iteration {it}; lower the lr or raise the damping"
                    ),
                    ));
                }
                history.push(rel);
                done.set(done.get() + 1);
                progress.advance(done.get(), Some(rel));
            }
            Ok(())
        };
    let mut best: Option<(State, Vec<f64>)> = None;
    for k in 0..restarts {
        let mut st = State::random(opts.seed.wrapping_add(k as u64), b_out, b_in, p, q, r);
        if k == 0 && opts.init == BlastInit::LowRank {
            match calib {
                // Calibrated: start from the optimum of the same (damped-Gram) loss among
                // rank-r matrices, the whitened SVD, so BLAST never ends worse than calibrated
                // low-rank at equal rank (the plain SVD is far from it in that norm).
                Some(c) => calibrated_lowrank_init(target, c, scale, &mut st, b_out, b_in)?,
                None => lowrank_init(&a_copy, &mut st, b_out, b_in, name)?,
            }
        }
        if k == 0 && opts.init == BlastInit::Spectral {
            spectral_init(&a_copy, &mut st, b_out, b_in);
        }
        let mut history = Vec::with_capacity(opts.iterations);
        run(&mut st, 0..probe, &mut history)?;
        let better = match &best {
            None => true,
            Some((_, h)) => history.last() < h.last(),
        };
        if better {
            best = Some((st, history));
        }
    }
    let Some((mut st, mut history)) = best else {
        return Err(CompressError::input(name, "BLAST needs at least one start"));
    };
    run(&mut st, probe..opts.iterations, &mut history)?;

    let mut u = Vec::with_capacity(m * r);
    for ui in &st.u {
        u.extend(linalg::to_row_major(ui.as_ref()));
    }
    let mut vt = Vec::with_capacity(n * r);
    for vj in &st.v {
        vt.extend(linalg::to_row_major(vj.transpose()));
    }
    let s: Vec<f32> = st.s.iter().map(|&v| (v * scale) as f32).collect();
    let layer = Linear::Blast(Blast::new(m, n, b_out, b_in, r, u, vt, s)?);
    let rel_error = crate::target::relative_error(target, &layer, calib.map(|c| c.gram))?;
    Ok(BlastReport {
        layer,
        history,
        rel_error,
    })
}

/// See [`BlastInit::Spectral`]. Leaves `st` untouched when the shape does not allow it or any
/// step is numerically singular (the random start then stands).
fn spectral_init(a: &Mat<f32>, st: &mut State, b_out: usize, b_in: usize) {
    use faer::linalg::solvers::Solve as _;
    let (m, n) = (a.nrows(), a.ncols());
    let (p, q) = (m / b_out, n / b_in);
    let r = st.u.first().map_or(0, |u| u.ncols());
    if b_out < 2 || b_in < 2 || r == 0 || r > p || r > q {
        return;
    }
    let a64 = linalg::mat_to_f64(a.as_ref());
    let mut u_basis = Vec::with_capacity(b_out);
    for i in 0..b_out {
        let Ok(svd) = a64.as_ref().submatrix(i * p, 0, p, n).thin_svd() else {
            return;
        };
        u_basis.push(svd.U().submatrix(0, 0, p, r).to_owned());
    }
    let mut v_basis = Vec::with_capacity(b_in);
    for j in 0..b_in {
        let Ok(svd) = a64.as_ref().submatrix(0, j * q, m, q).thin_svd() else {
            return;
        };
        v_basis.push(svd.V().submatrix(0, 0, q, r).to_owned());
    }
    let core = |i: usize, j: usize| -> Mat<f64> {
        let blk = a64.as_ref().submatrix(i * p, j * q, p, q);
        linalg::mul64(
            linalg::mul64(u_basis[i].transpose(), blk).as_ref(),
            v_basis[j].as_ref(),
        )
    };
    // X = sum over sampled (i', j') of w * M_00 M_i'0^-1 M_i'j' M_0j'^-1: every term is
    // R_0 (diagonal) R_0^-1, so a random combination keeps the eigenvectors R_0 and averages
    // the noise of single blocks (Jennrich). At most 8 terms bound the cost to ~8 * 4 r^3.
    let m00 = core(0, 0);
    let pairs: Vec<(usize, usize)> = (1..b_out)
        .flat_map(|i2| (1..b_in).map(move |j2| (i2, j2)))
        .collect();
    let stride = pairs.len().div_ceil(8).max(1);
    let mut weights = Rng::new(0x5eed_b1a5);
    let mut x = Mat::<f64>::zeros(r, r);
    for &(i2, j2) in pairs.iter().step_by(stride) {
        let left = linalg::mul64(
            m00.as_ref(),
            core(i2, 0)
                .partial_piv_lu()
                .solve(core(i2, j2).as_ref())
                .as_ref(),
        );
        let term = core(0, j2)
            .partial_piv_lu()
            .solve_transpose(left.transpose())
            .transpose()
            .to_owned();
        let w = weights.normal();
        for c in 0..r {
            for (o, &t) in x.col_as_slice_mut(c).iter_mut().zip(term.col_as_slice(c)) {
                *o += w * t;
            }
        }
    }
    let Ok(eig) = x.eigen() else {
        return;
    };
    let r0 = Mat::from_fn(r, r, |i, j| eig.U()[(i, j)].re);
    let r0_lu = r0.partial_piv_lu();
    // T_j^T = R_0^-1 M_0j; R_i = M_i0 T_0^-T.
    let tt: Vec<Mat<f64>> = (0..b_in)
        .map(|j| r0_lu.solve(core(0, j).as_ref()))
        .collect();
    let t0_lu = tt[0].transpose().to_owned().partial_piv_lu();
    let rs: Vec<Mat<f64>> = (0..b_out)
        .map(|i| t0_lu.solve(core(i, 0).transpose()).transpose().to_owned())
        .collect();
    let us: Vec<Mat<f64>> = (0..b_out)
        .map(|i| linalg::mul64(u_basis[i].as_ref(), rs[i].as_ref()))
        .collect();
    let vs: Vec<Mat<f64>> = (0..b_in)
        .map(|j| linalg::mul64(v_basis[j].as_ref(), tt[j].transpose()))
        .collect();
    // S by least squares per block: ((U^T U) ⊙ (V^T V)) s = diag(U^T A_ij V).
    let mut s = vec![0.0f64; b_out * b_in * r];
    for i in 0..b_out {
        let ji = linalg::mul64(us[i].transpose(), us[i].as_ref());
        for j in 0..b_in {
            let kj = linalg::mul64(vs[j].transpose(), vs[j].as_ref());
            let h = linalg::hadamard(&ji, &kj);
            let blk = a64.as_ref().submatrix(i * p, j * q, p, q);
            let uav = linalg::mul64(
                linalg::mul64(us[i].transpose(), blk).as_ref(),
                vs[j].as_ref(),
            );
            let rhs = Mat::from_fn(r, 1, |k, _| uav[(k, k)]);
            let Ok(sol) = linalg::spd_solve(h.as_ref(), 0.0, rhs.as_ref(), "", "") else {
                return;
            };
            for k in 0..r {
                s[(i * b_in + j) * r + k] = sol[(k, 0)];
            }
        }
    }
    let finite = s.iter().all(|v| v.is_finite())
        && us
            .iter()
            .chain(&vs)
            .all(|f| (0..f.ncols()).all(|c| f.col_as_slice(c).iter().all(|v| v.is_finite())));
    if !finite {
        return;
    }
    // Keep the start only if it already explains most of A (relative error <= 0.5, i.e. 75%
    // of the energy): on unstructured weights the eigenvectors are noise, the inverses blow
    // up, and the published random start does better.
    let (mut err, mut total) = (0.0f64, 0.0f64);
    for i in 0..b_out {
        for j in 0..b_in {
            let scaled = Mat::from_fn(p, r, |a_, k| us[i][(a_, k)] * s[(i * b_in + j) * r + k]);
            let approx = linalg::mul64(scaled.as_ref(), vs[j].transpose());
            let blk = a64.as_ref().submatrix(i * p, j * q, p, q);
            for c in 0..q {
                for a_ in 0..p {
                    err += (blk[(a_, c)] - approx[(a_, c)]).powi(2);
                    total += blk[(a_, c)].powi(2);
                }
            }
        }
    }
    if !(err.is_finite() && err <= 0.25 * total) {
        return;
    }
    st.u = us.iter().map(|u| linalg::mat_to_f32(u.as_ref())).collect();
    st.v = vs.iter().map(|v| linalg::mat_to_f32(v.as_ref())).collect();
    st.s = s;
}

/// [`BlastInit::LowRank`] with a calibration: the calibrated low-rank factors `W ≈ U V`
/// (whitened SVD) written as BLAST (`U_i` = row block i of U, `V_j` = column block j of V,
/// `s_ij = 1`), in the normalised units (`A = W / scale`) the iterations work in.
fn calibrated_lowrank_init(
    target: &Target<'_>,
    calib: &Calibration<'_>,
    scale: f64,
    st: &mut State,
    b_out: usize,
    b_in: usize,
) -> Result<()> {
    let (m, n) = (target.m, target.n);
    let (p, q) = (m / b_out, n / b_in);
    let r = st.u.first().map_or(0, |u| u.ncols());
    let keep = r.min(m.min(n));
    let Linear::LowRank(lr) = crate::lowrank::lowrank(target, keep, Some(calib))? else {
        return Err(CompressError::input(
            target.name,
            "low-rank start did not give low-rank factors",
        ));
    };
    let f = (1.0 / scale).sqrt();
    for (i, ui) in st.u.iter_mut().enumerate() {
        for a in 0..p {
            for k in 0..r {
                ui[(a, k)] = if k < keep {
                    (lr.u[(i * p + a) * keep + k] as f64 * f) as f32
                } else {
                    0.0
                };
            }
        }
    }
    for (j, vj) in st.v.iter_mut().enumerate() {
        for c in 0..q {
            for k in 0..r {
                vj[(c, k)] = if k < keep {
                    (lr.v[k * n + j * q + c] as f64 * f) as f32
                } else {
                    0.0
                };
            }
        }
    }
    for ij in 0..b_out * b_in {
        for k in 0..r {
            st.s[ij * r + k] = if k < keep { 1.0 } else { 0.0 };
        }
    }
    Ok(())
}

/// See [`BlastInit::LowRank`].
fn lowrank_init(a: &Mat<f32>, st: &mut State, b_out: usize, b_in: usize, name: &str) -> Result<()> {
    let (m, n) = (a.nrows(), a.ncols());
    let (p, q) = (m / b_out, n / b_in);
    let r = st.u.first().map_or(0, |u| u.ncols());
    let a64 = linalg::mat_to_f64(a.as_ref());
    let svd = a64
        .thin_svd()
        .map_err(|e| CompressError::numerical(name, "SVD (BLAST init)", format!("{e:?}")))?;
    let keep = r.min(m.min(n));
    let sigma = svd.S().column_vector();
    for k in 0..keep {
        let root = sigma[k].max(0.0).sqrt();
        for (i, ui) in st.u.iter_mut().enumerate() {
            for a in 0..p {
                ui[(a, k)] = (svd.U()[(i * p + a, k)] * root) as f32;
            }
        }
        for (j, vj) in st.v.iter_mut().enumerate() {
            for c in 0..q {
                vj[(c, k)] = (svd.V()[(j * q + c, k)] * root) as f32;
            }
        }
    }
    for ij in 0..b_out * b_in {
        for k in 0..keep {
            st.s[ij * r + k] = 1.0;
        }
    }
    Ok(())
}

struct Step {
    /// Step length along the (preconditioned) direction of the 1/2-scaled loss.
    step: f64,
    damping: f64,
    method: BlastMethod,
}

struct State {
    u: Vec<Mat<f32>>,
    v: Vec<Mat<f32>>,
    /// `s[(i * b_in + j) * r + k]`.
    s: Vec<f64>,
}

impl State {
    /// The published start: `U, V ~ N(0, 1) * 0.001 / sqrt(r)`, `S ~ N(0, 1)`. The tiny
    /// factors make the first steps (where eps dominates the preconditioner) act like power
    /// iterations that grow the factors along the dominant directions of A.
    fn random(seed: u64, b_out: usize, b_in: usize, p: usize, q: usize, r: usize) -> Self {
        let (u, vt, s) = random_factors(seed, b_out, b_in, p, q, r);
        State {
            u: (0..b_out)
                .map(|i| Mat::from_fn(p, r, |a, k| u[(i * p + a) * r + k]))
                .collect(),
            v: (0..b_in)
                .map(|j| Mat::from_fn(q, r, |c, k| vt[(j * r + k) * q + c]))
                .collect(),
            s,
        }
    }
}

/// `U_i^T U_i` and the `V^T G V` blocks of the current factors. Each changes only when its
/// factor does, so one iteration computes each once (after the U and V steps) instead of in
/// every sub-step: at 4096 x 4096, b = 16, r = 1024 that saves ~5e10 flops per iteration.
struct Cache {
    j: Vec<Mat<f64>>,
    vgv: Vgv,
}

/// The calibrated weight split the way the updates use it.
struct Weight {
    g: Mat<f32>,
    /// Cholesky of each diagonal block `G'_jj` (the V preconditioner's right factor).
    diag: Vec<Llt<f64>>,
    /// Gershgorin bound of each `G'_jj` (gradient-descent step scale).
    diag_bound: Vec<f64>,
}

/// `V_j^T G_jj' V_j'` for all pairs (only `j == j'` data-free), and `G[:, j'] V_j'` (n, r)
/// calibrated.
struct Vgv {
    blocks: Vec<Option<Mat<f64>>>,
    gv: Vec<Mat<f32>>,
}

impl Vgv {
    fn get(&self, b_in: usize, j: usize, j2: usize) -> Option<&Mat<f64>> {
        self.blocks[j * b_in + j2].as_ref()
    }
}

struct Problem<'a> {
    name: &'a str,
    b_out: usize,
    b_in: usize,
    p: usize,
    q: usize,
    r: usize,
    /// `T = A G` (just `A` data-free).
    target: Mat<f32>,
    /// `tr(A G A^T)`.
    norm_sq: f64,
    weight: Option<Weight>,
}

impl<'a> Problem<'a> {
    fn new(
        name: &'a str,
        a: Mat<f32>,
        g: Option<&Mat<f64>>,
        b_out: usize,
        b_in: usize,
        r: usize,
    ) -> Result<Self> {
        let (m, n) = (a.nrows(), a.ncols());
        let (p, q) = (m / b_out, n / b_in);
        let (target, weight) = match g {
            None => (a.clone(), None),
            Some(g) => {
                let diag = (0..b_in)
                    .map(|j| {
                        linalg::damped_llt(
                            g.as_ref().submatrix(j * q, j * q, q, q),
                            0.0,
                            name,
                            "Cholesky of a calibration Gram block",
                        )
                    })
                    .collect::<Result<_>>()?;
                let diag_bound = (0..b_in)
                    .map(|j| linalg::gershgorin(g.as_ref().submatrix(j * q, j * q, q, q)))
                    .collect();
                let g32 = linalg::mat_to_f32(g.as_ref());
                (
                    linalg::mul32(a.as_ref(), g32.as_ref()),
                    Some(Weight {
                        g: g32,
                        diag,
                        diag_bound,
                    }),
                )
            }
        };
        let norm_sq = linalg::dot32(target.as_ref(), a.as_ref());
        Ok(Problem {
            name,
            b_out,
            b_in,
            p,
            q,
            r,
            target,
            norm_sq,
            weight,
        })
    }

    fn relative(&self, loss: f64) -> f64 {
        if self.norm_sq > 0.0 {
            (2.0 * loss.max(0.0) / self.norm_sq).sqrt()
        } else {
            0.0
        }
    }

    fn eps(&self, loss: f64, ctx: &Step) -> f64 {
        ctx.damping * (2.0 * loss.max(0.0)).sqrt()
    }

    fn s_of(&self, i: usize, j: usize) -> std::ops::Range<usize> {
        let r = self.r;
        (i * self.b_in + j) * r..(i * self.b_in + j + 1) * r
    }

    fn vgv(&self, v: &[Mat<f32>]) -> Vgv {
        let (b, q) = (self.b_in, self.q);
        match &self.weight {
            None => Vgv {
                blocks: (0..b * b)
                    .map(|jj| {
                        let (j, j2) = (jj / b, jj % b);
                        (j == j2).then(|| {
                            linalg::mat_to_f64(
                                linalg::mul32(v[j].transpose(), v[j].as_ref()).as_ref(),
                            )
                        })
                    })
                    .collect(),
                gv: Vec::new(),
            },
            Some(w) => {
                let n = w.g.nrows();
                let gv: Vec<Mat<f32>> = (0..b)
                    .map(|j2| {
                        linalg::mul32(w.g.as_ref().submatrix(0, j2 * q, n, q), v[j2].as_ref())
                    })
                    .collect();
                let blocks = (0..b * b)
                    .map(|jj| {
                        let (j, j2) = (jj / b, jj % b);
                        Some(linalg::mat_to_f64(
                            linalg::mul32(
                                v[j].transpose(),
                                gv[j2].as_ref().submatrix(j * q, 0, q, self.r),
                            )
                            .as_ref(),
                        ))
                    })
                    .collect();
                Vgv { blocks, gv }
            }
        }
    }

    /// `P_i = sum_jj' (s_ij s_ij'^T) ⊙ VGV_jj'`.
    fn p_matrix(&self, s: &[f64], i: usize, vgv: &Vgv) -> Mat<f64> {
        let r = self.r;
        let mut pm = Mat::<f64>::zeros(r, r);
        for j in 0..self.b_in {
            for j2 in 0..self.b_in {
                let Some(blk) = vgv.get(self.b_in, j, j2) else {
                    continue;
                };
                let (sa, sb) = (&s[self.s_of(i, j)], &s[self.s_of(i, j2)]);
                linalg::add_scaled_hadamard(&mut pm, blk, sa, sb);
            }
        }
        pm
    }

    fn u_gram(&self, u: &[Mat<f32>]) -> Vec<Mat<f64>> {
        u.iter()
            .map(|ui| linalg::mat_to_f64(linalg::mul32(ui.transpose(), ui.as_ref()).as_ref()))
            .collect()
    }

    /// One U step; exact Gauss-Newton per block row (separable in both variants).
    fn step_u(&self, st: &mut State, ctx: &Step, cache: &mut Cache) -> Result<()> {
        let (m, p, q, r) = (self.target.nrows(), self.p, self.q, self.r);
        let tv: Vec<Mat<f32>> = (0..self.b_in)
            .map(|j| {
                linalg::mul32(
                    self.target.as_ref().submatrix(0, j * q, m, q),
                    st.v[j].as_ref(),
                )
            })
            .collect();
        let (vgv, j_mats) = (&cache.vgv, &cache.j);
        let per_row: Vec<(Mat<f64>, Mat<f64>)> = (0..self.b_out)
            .into_par_iter()
            .map(|i| {
                let mut rhs = Mat::<f64>::zeros(p, r);
                for (j, tvj) in tv.iter().enumerate() {
                    let sij = &st.s[self.s_of(i, j)];
                    for (k, &sk) in sij.iter().enumerate() {
                        let src = &tvj.col_as_slice(k)[i * p..(i + 1) * p];
                        for (o, &t) in rhs.col_as_slice_mut(k).iter_mut().zip(src) {
                            *o += t as f64 * sk;
                        }
                    }
                }
                (rhs, self.p_matrix(&st.s, i, vgv))
            })
            .collect();
        let mut cross = 0.0;
        let mut quad = 0.0;
        for (i, (rhs, pm)) in per_row.iter().enumerate() {
            cross += linalg::dot64(linalg::mat_to_f64(st.u[i].as_ref()).as_ref(), rhs.as_ref());
            quad += linalg::dot64(j_mats[i].as_ref(), pm.as_ref());
        }
        let loss = 0.5 * (self.norm_sq - 2.0 * cross + quad);
        let eps = self.eps(loss, ctx);
        let updates: Vec<Mat<f32>> = per_row
            .par_iter()
            .enumerate()
            .map(|(i, (rhs, pm))| -> Result<Mat<f32>> {
                let ui = linalg::mat_to_f64(st.u[i].as_ref());
                let grad = &linalg::mul64(ui.as_ref(), pm.as_ref()) - rhs;
                let dir = match ctx.method {
                    BlastMethod::Preconditioned => {
                        // grad (P + eps I)^-1 = ((P + eps I)^-1 grad^T)^T, P symmetric.
                        linalg::spd_solve(
                            pm.as_ref(),
                            eps,
                            grad.transpose(),
                            self.name,
                            "BLAST U preconditioner",
                        )?
                        .transpose()
                        .to_owned()
                    }
                    BlastMethod::GradientDescent => {
                        let bound = linalg::gershgorin(pm.as_ref()).max(f64::MIN_POSITIVE);
                        Mat::from_fn(p, r, |a, k| grad[(a, k)] / bound)
                    }
                };
                Ok(Mat::from_fn(p, r, |a, k| {
                    (ui[(a, k)] - ctx.step * dir[(a, k)]) as f32
                }))
            })
            .collect::<Result<_>>()?;
        st.u = updates;
        cache.j = self.u_gram(&st.u);
        Ok(())
    }

    /// One V step. Returns `U_i^T T_i` (r, n) per block row, reused by the S step.
    fn step_v(&self, st: &mut State, ctx: &Step, cache: &mut Cache) -> Result<Vec<Mat<f32>>> {
        let (n, p, q, r, b_in) = (self.target.ncols(), self.p, self.q, self.r, self.b_in);
        let ut: Vec<Mat<f32>> = (0..self.b_out)
            .map(|i| {
                linalg::mul32(
                    st.u[i].transpose(),
                    self.target.as_ref().submatrix(i * p, 0, p, n),
                )
            })
            .collect();
        let j_mats = &cache.j;
        let calibrated = self.weight.is_some();
        // Q_jj' = sum_i (s_ij s_ij'^T) ⊙ J_i; only j == j' data-free.
        let q_mats: Vec<Option<Mat<f64>>> = (0..b_in * b_in)
            .into_par_iter()
            .map(|jj| {
                let (j, j2) = (jj / b_in, jj % b_in);
                if !calibrated && j != j2 {
                    return None;
                }
                let mut qm = Mat::<f64>::zeros(r, r);
                for (i, ji) in j_mats.iter().enumerate() {
                    let (sa, sb) = (&st.s[self.s_of(i, j)], &st.s[self.s_of(i, j2)]);
                    linalg::add_scaled_hadamard(&mut qm, ji, sa, sb);
                }
                Some(qm)
            })
            .collect();
        let q_get = |j: usize, j2: usize| q_mats[j * b_in + j2].as_ref();
        // Loss as a function of V given U, S: cross = sum_ij s_ij . diag(U_i^T T_ij V_j),
        // quad = sum_jj' <Q_jj', VGV_jj'>.
        let loss_of = |v: &[Mat<f32>], vgv: &Vgv| -> f64 {
            let d = diag_products(&ut, v, r);
            let cross: f64 = d.iter().zip(&st.s).map(|(a, b)| a * b).sum();
            let mut quad = 0.0;
            for j in 0..b_in {
                for j2 in 0..b_in {
                    if let (Some(qm), Some(blk)) = (q_get(j, j2), vgv.get(b_in, j, j2)) {
                        quad += linalg::dot64(qm.as_ref(), blk.as_ref());
                    }
                }
            }
            0.5 * (self.norm_sq - 2.0 * cross + quad)
        };
        let vgv = &cache.vgv;
        let loss0 = loss_of(&st.v, vgv);
        let eps = self.eps(loss0, ctx);
        let steps: Vec<(Mat<f64>, Mat<f64>)> = (0..b_in)
            .into_par_iter()
            .map(|j| -> Result<(Mat<f64>, Mat<f64>)> {
                // grad_Vj^T (r, q).
                let mut grad = Mat::<f64>::zeros(r, q);
                for j2 in 0..b_in {
                    let Some(qm) = q_get(j, j2) else { continue };
                    let vg = match &self.weight {
                        // V_j'^T G_j'j = (G_jj' V_j')^T.
                        Some(_) => linalg::mat_to_f64(
                            vgv.gv[j2].as_ref().submatrix(j * q, 0, q, r).transpose(),
                        ),
                        None => linalg::mat_to_f64(st.v[j].transpose()),
                    };
                    grad += linalg::mul64(qm.as_ref(), vg.as_ref());
                }
                for (i, uti) in ut.iter().enumerate() {
                    let sij = &st.s[self.s_of(i, j)];
                    for c in 0..q {
                        let src = uti.col_as_slice(j * q + c);
                        let dst = grad.col_as_slice_mut(c);
                        for ((g, &u), &sk) in dst.iter_mut().zip(src).zip(sij) {
                            *g -= sk * u as f64;
                        }
                    }
                }
                let qjj = q_get(j, j).ok_or_else(|| {
                    CompressError::numerical(self.name, "BLAST V step", "missing Q block")
                })?;
                let dir = match ctx.method {
                    BlastMethod::Preconditioned => {
                        let left = linalg::spd_solve(
                            qjj.as_ref(),
                            eps,
                            grad.as_ref(),
                            self.name,
                            "BLAST V preconditioner",
                        )?;
                        match &self.weight {
                            Some(w) => w.diag[j].solve(left.transpose()).transpose().to_owned(),
                            None => left,
                        }
                    }
                    BlastMethod::GradientDescent => {
                        let g_bound = self.weight.as_ref().map_or(1.0, |w| w.diag_bound[j]);
                        let bound =
                            (linalg::gershgorin(qjj.as_ref()) * g_bound).max(f64::MIN_POSITIVE);
                        Mat::from_fn(r, q, |k, c| grad[(k, c)] / bound)
                    }
                };
                Ok((grad, dir))
            })
            .collect::<Result<_>>()?;
        let gd: f64 = steps
            .iter()
            .map(|(g, d)| linalg::dot64(g.as_ref(), d.as_ref()))
            .sum();
        let old = st.v.clone();
        let apply = |alpha: f64| -> Vec<Mat<f32>> {
            old.iter()
                .zip(&steps)
                .map(|(vj, (_, dir))| {
                    Mat::from_fn(q, r, |c, k| {
                        (vj[(c, k)] as f64 - alpha * dir[(k, c)]) as f32
                    })
                })
                .collect()
        };
        st.v = apply(ctx.step);
        let mut new_vgv = self.vgv(&st.v);
        if calibrated {
            let alpha = line_search(loss0, loss_of(&st.v, &new_vgv), gd, ctx.step);
            if alpha != ctx.step {
                st.v = apply(alpha);
                new_vgv = self.vgv(&st.v);
            }
        }
        cache.vgv = new_vgv;
        Ok(ut)
    }

    /// One S step; returns the loss after it.
    fn step_s(&self, st: &mut State, ut: &[Mat<f32>], ctx: &Step, cache: &Cache) -> Result<f64> {
        let (r, b_in) = (self.r, self.b_in);
        let (vgv, j_mats) = (&cache.vgv, &cache.j);
        // d_ij = diag(U_i^T T_ij V_j).
        let d = diag_products(ut, &st.v, r);
        // H s for the current s: (J_i ⊙ VGV_jj') s_ij' summed over j'.
        let h_times = |s: &[f64], i: usize, j: usize| -> Vec<f64> {
            let mut out = vec![0.0f64; r];
            for j2 in 0..b_in {
                let Some(blk) = vgv.get(b_in, j, j2) else {
                    continue;
                };
                linalg::add_hadamard_matvec(&mut out, &j_mats[i], blk, &s[self.s_of(i, j2)]);
            }
            out
        };
        let loss_of = |s: &[f64]| -> f64 {
            let parts: Vec<f64> = (0..self.b_out * b_in)
                .into_par_iter()
                .map(|ij| {
                    let (i, j) = (ij / b_in, ij % b_in);
                    let range = self.s_of(i, j);
                    let hs = h_times(s, i, j);
                    s[range.clone()]
                        .iter()
                        .zip(&hs)
                        .zip(&d[range])
                        .map(|((sv, h), dv)| sv * h - 2.0 * sv * dv)
                        .sum()
                })
                .collect();
            0.5 * (self.norm_sq + parts.iter().sum::<f64>())
        };
        let loss0 = loss_of(&st.s);
        let eps = self.eps(loss0, ctx);
        let steps: Vec<(Vec<f64>, Vec<f64>)> = (0..self.b_out * b_in)
            .into_par_iter()
            .map(|ij| -> Result<(Vec<f64>, Vec<f64>)> {
                let (i, j) = (ij / b_in, ij % b_in);
                let range = self.s_of(i, j);
                let hs = h_times(&st.s, i, j);
                let grad: Vec<f64> = hs.iter().zip(&d[range]).map(|(h, dv)| h - dv).collect();
                let blk = vgv.get(b_in, j, j).ok_or_else(|| {
                    CompressError::numerical(self.name, "BLAST S step", "missing VGV block")
                })?;
                let h = linalg::hadamard(&j_mats[i], blk);
                let dir = match ctx.method {
                    BlastMethod::Preconditioned => {
                        let rhs = Mat::from_fn(r, 1, |k, _| grad[k]);
                        let sol = linalg::spd_solve(
                            h.as_ref(),
                            eps,
                            rhs.as_ref(),
                            self.name,
                            "BLAST S preconditioner",
                        )?;
                        (0..r).map(|k| sol[(k, 0)]).collect()
                    }
                    BlastMethod::GradientDescent => {
                        let bound = linalg::gershgorin(h.as_ref()).max(f64::MIN_POSITIVE);
                        grad.iter().map(|g| g / bound).collect()
                    }
                };
                Ok((grad, dir))
            })
            .collect::<Result<_>>()?;
        let gd: f64 = steps
            .iter()
            .map(|(g, dd)| g.iter().zip(dd).map(|(a, b)| a * b).sum::<f64>())
            .sum();
        let old = st.s.clone();
        let apply = |alpha: f64| -> Vec<f64> {
            let mut s = old.clone();
            for (ij, (_, dir)) in steps.iter().enumerate() {
                for (k, dk) in dir.iter().enumerate() {
                    s[ij * r + k] -= alpha * dk;
                }
            }
            s
        };
        st.s = apply(ctx.step);
        let mut loss = loss_of(&st.s);
        if self.weight.is_some() {
            let alpha = line_search(loss0, loss, gd, ctx.step);
            if alpha != ctx.step {
                st.s = apply(alpha);
                loss = loss_of(&st.s);
            }
        }
        Ok(loss)
    }
}

/// `d[(i * b_in + j) * r + k] = (U_i^T T_ij V_j)_kk` from `ut[i] = U_i^T T_i.` (r, n) and
/// `V_j` (q, r): the S-gradient's data term and, dotted with `s`, the cross term `<T, Â>`.
/// `V_j` is transposed once so both operands are read down contiguous columns.
fn diag_products(ut: &[Mat<f32>], v: &[Mat<f32>], r: usize) -> Vec<f64> {
    let b_in = v.len();
    let vts: Vec<Mat<f32>> = v.iter().map(|vj| vj.transpose().to_owned()).collect();
    (0..ut.len() * b_in)
        .into_par_iter()
        .flat_map_iter(|ij| {
            let (i, j) = (ij / b_in, ij % b_in);
            let (uti, vtj) = (&ut[i], &vts[j]);
            let q = vtj.ncols();
            let mut d = vec![0.0f64; r];
            for c in 0..q {
                let (u_col, v_col) = (uti.col_as_slice(j * q + c), vtj.col_as_slice(c));
                for ((dk, &a), &b) in d.iter_mut().zip(u_col).zip(v_col) {
                    *dk += a as f64 * b as f64;
                }
            }
            d
        })
        .collect()
}

/// Exact line search on a quadratic: with `L(a) = L0 - a g.d + a^2 c / 2` and one measured
/// `L(lr)`, the curvature is `c = 2 (L(lr) - L0 + lr g.d) / lr^2` and the minimiser `g.d / c`,
/// capped to `[0, lr]` so the schedule still bounds the step. Public so that the GPU path
/// (blr-cuda's calibrated BLAST) takes exactly the same steps.
pub fn line_search(loss0: f64, loss_at_lr: f64, gd: f64, lr: f64) -> f64 {
    if gd.is_nan() || gd <= 0.0 || !loss_at_lr.is_finite() {
        return if loss_at_lr <= loss0 { lr } else { 0.0 };
    }
    let curvature = 2.0 * (loss_at_lr - loss0 + lr * gd) / (lr * lr);
    if curvature <= 0.0 {
        return lr;
    }
    (gd / curvature).clamp(0.0, lr)
}
