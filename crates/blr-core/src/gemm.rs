//! f32 matrix products on strided views of flat slices, through faer.
//!
//! Every BLR forward is a handful of GEMMs over sub-blocks of row-major buffers (a block column
//! of X, a transposed factor, a strided output for Monarch's permutation). Describing each
//! operand as (offset, rows, cols, row stride, col stride) inside a slice lets all of them go
//! straight to one tuned GEMM without copies; the bounds are checked once here so that the
//! unsafe view construction below can never read or write outside its slice.

use crate::{Error, Result};
use faer::{Accum, MatMut, MatRef, Par};

/// A strided matrix inside a flat slice: element (i, j) is at
/// `offset + i * row_stride + j * col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Layout {
    /// A contiguous row-major (rows, cols) matrix at `offset`.
    pub fn row_major(offset: usize, rows: usize, cols: usize) -> Self {
        Layout {
            offset,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no data moves).
    pub fn t(self) -> Self {
        Layout {
            offset: self.offset,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// One past the largest index touched, or `offset` for an empty view.
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }

    fn check(&self, len: usize, what: &str) -> Result<()> {
        if self.end() > len {
            return Err(Error::shape(
                format!("gemm operand {what}"),
                format!("a buffer of at least {} elements", self.end()),
                len,
            ));
        }
        Ok(())
    }
}

/// Below this many multiply-adds a parallel GEMM costs more in synchronisation than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 21;

/// `c = a * b` (or `c += a * b` when `accumulate`), with `a` (M, K), `b` (K, N), `c` (M, N)
/// given as strided views into the three slices.
pub fn matmul(
    c: &mut [f32],
    cl: Layout,
    a: &[f32],
    al: Layout,
    b: &[f32],
    bl: Layout,
    accumulate: bool,
) -> Result<()> {
    if al.cols != bl.rows || al.rows != cl.rows || bl.cols != cl.cols {
        return Err(Error::shape(
            "gemm",
            format!(
                "a ({}, k) * b (k, {}) -> c ({}, {})",
                cl.rows, cl.cols, cl.rows, cl.cols
            ),
            format!(
                "a ({}, {}) * b ({}, {}) -> c ({}, {})",
                al.rows, al.cols, bl.rows, bl.cols, cl.rows, cl.cols
            ),
        ));
    }
    al.check(a.len(), "a")?;
    bl.check(b.len(), "b")?;
    cl.check(c.len(), "c")?;
    if cl.rows == 0 || cl.cols == 0 {
        return Ok(());
    }
    if al.cols == 0 {
        if !accumulate {
            for i in 0..cl.rows {
                for j in 0..cl.cols {
                    c[cl.offset + i * cl.row_stride + j * cl.col_stride] = 0.0;
                }
            }
        }
        return Ok(());
    }
    let work = cl.rows * cl.cols * al.cols;
    let par = if work >= PARALLEL_MIN_FLOPS {
        Par::rayon(0)
    } else {
        Par::Seq
    };
    // SAFETY: each view's extent was checked against its slice above; strides are
    // non-negative and fit in isize because the extents fit in the slices. `c` is borrowed
    // mutably and distinct from `a` and `b` by Rust's aliasing rules.
    unsafe {
        let a_ref = MatRef::<f32>::from_raw_parts(
            a.as_ptr().add(al.offset),
            al.rows,
            al.cols,
            al.row_stride as isize,
            al.col_stride as isize,
        );
        let b_ref = MatRef::<f32>::from_raw_parts(
            b.as_ptr().add(bl.offset),
            bl.rows,
            bl.cols,
            bl.row_stride as isize,
            bl.col_stride as isize,
        );
        let c_mut = MatMut::<f32>::from_raw_parts_mut(
            c.as_mut_ptr().add(cl.offset),
            cl.rows,
            cl.cols,
            cl.row_stride as isize,
            cl.col_stride as isize,
        );
        let beta = if accumulate {
            Accum::Add
        } else {
            Accum::Replace
        };
        faer::linalg::matmul::matmul(c_mut, beta, a_ref, b_ref, 1.0f32, par);
    }
    Ok(())
}

/// `Y (T, m) = X (T, n) * W^T` for a row-major `W (m, n)`: the dense linear layer.
pub fn linear(x: &[f32], w: &[f32], tokens: usize, m: usize, n: usize) -> Result<Vec<f32>> {
    let mut y = vec![0.0f32; tokens * m];
    matmul(
        &mut y,
        Layout::row_major(0, tokens, m),
        x,
        Layout::row_major(0, tokens, n),
        w,
        Layout::row_major(0, m, n).t(),
        false,
    )?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(a: &[f32], al: Layout, b: &[f32], bl: Layout) -> Vec<f32> {
        let mut c = vec![0.0f32; al.rows * bl.cols];
        for i in 0..al.rows {
            for j in 0..bl.cols {
                let mut s = 0.0f64;
                for k in 0..al.cols {
                    s += a[al.offset + i * al.row_stride + k * al.col_stride] as f64
                        * b[bl.offset + k * bl.row_stride + j * bl.col_stride] as f64;
                }
                c[i * bl.cols + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn strided_views_match_naive() {
        let mut rng = Rng::new(3);
        for &(m, k, n) in &[(1, 1, 1), (7, 13, 5), (33, 65, 17), (130, 70, 90)] {
            let a = rng.normal_vec(m * k * 2 + 3, 1.0);
            let b = rng.normal_vec(k * n + 1, 1.0);
            // a: every other column of a (m, 2k) matrix, offset 3.
            let al = Layout {
                offset: 3,
                rows: m,
                cols: k,
                row_stride: 2 * k,
                col_stride: 2,
            };
            // b: transposed view of a row-major (n, k) matrix at offset 1.
            let bl = Layout::row_major(1, n, k).t();
            let mut c = vec![f32::NAN; m * n];
            matmul(&mut c, Layout::row_major(0, m, n), &a, al, &b, bl, false).unwrap();
            let r = naive(&a, al, &b, bl);
            for (x, y) in c.iter().zip(&r) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn out_of_bounds_view_is_an_error() {
        let a = vec![0.0f32; 10];
        let b = vec![0.0f32; 10];
        let mut c = vec![0.0f32; 4];
        let err = matmul(
            &mut c,
            Layout::row_major(0, 2, 2),
            &a,
            Layout::row_major(0, 2, 6),
            &b,
            Layout::row_major(0, 6, 2),
            false,
        );
        assert!(err.is_err());
    }
}
