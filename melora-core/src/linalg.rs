//! Small dense linear algebra in `f64` on the host.
//!
//! Used where the adapters need an `r x r` determinant (the `subspace` KL's
//! `ln det(A A^T)`), and by the tests to compute Gaussian KLs independently of
//! the closed forms. Matrices are row-major `Vec<f64>` with explicit sizes;
//! they are tiny (`r x r`, or a few dozen rows in tests), so clarity beats
//! speed here.

/// A dense row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Entries, row-major: `data[i * cols + j]`.
    pub data: Vec<f64>,
}

impl Mat {
    /// A matrix from row-major data. Panics if the length does not match.
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "Mat::new: {rows}x{cols} needs {} values",
            rows * cols
        );
        Self { rows, cols, data }
    }

    /// The zero matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self::new(rows, cols, vec![0.0; rows * cols])
    }

    /// The identity matrix.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// A diagonal matrix.
    pub fn diag(values: &[f64]) -> Self {
        let n = values.len();
        let mut m = Self::zeros(n, n);
        for (i, v) in values.iter().enumerate() {
            m.data[i * n + i] = *v;
        }
        m
    }

    /// Entry `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// Mutable entry `(i, j)`.
    pub fn at_mut(&mut self, i: usize, j: usize) -> &mut f64 {
        &mut self.data[i * self.cols + j]
    }

    /// The transpose.
    pub fn t(&self) -> Self {
        let mut out = Self::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                *out.at_mut(j, i) = self.at(i, j);
            }
        }
        out
    }

    /// The matrix product `self * other`.
    pub fn matmul(&self, other: &Self) -> Self {
        assert_eq!(self.cols, other.rows, "Mat::matmul: inner dimensions differ");
        let mut out = Self::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.at(i, k);
                if a == 0.0 {
                    continue;
                }
                for j in 0..other.cols {
                    out.data[i * other.cols + j] += a * other.at(k, j);
                }
            }
        }
        out
    }

    /// The Kronecker product `self (x) other`.
    pub fn kron(&self, other: &Self) -> Self {
        let rows = self.rows * other.rows;
        let cols = self.cols * other.cols;
        let mut out = Self::zeros(rows, cols);
        for i in 0..self.rows {
            for j in 0..self.cols {
                let a = self.at(i, j);
                for k in 0..other.rows {
                    for l in 0..other.cols {
                        *out.at_mut(i * other.rows + k, j * other.cols + l) = a * other.at(k, l);
                    }
                }
            }
        }
        out
    }

    /// `vec(self)`: the columns stacked (the convention of `derivations.md`).
    pub fn vec(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for j in 0..self.cols {
            for i in 0..self.rows {
                out.push(self.at(i, j));
            }
        }
        out
    }

    /// Entry-wise difference.
    pub fn sub(&self, other: &Self) -> Self {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        Self::new(
            self.rows,
            self.cols,
            self.data.iter().zip(&other.data).map(|(a, b)| a - b).collect(),
        )
    }

    /// Frobenius norm.
    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    /// The trace.
    pub fn trace(&self) -> f64 {
        (0..self.rows.min(self.cols)).map(|i| self.at(i, i)).sum()
    }

    /// The lower Cholesky factor `L` with `self = L L^T`, or `None` when the
    /// matrix is not (numerically) symmetric positive definite.
    pub fn cholesky(&self) -> Option<Self> {
        assert_eq!(self.rows, self.cols, "Mat::cholesky: square matrix expected");
        let n = self.rows;
        let mut l = Self::zeros(n, n);
        for j in 0..n {
            let mut d = self.at(j, j);
            for k in 0..j {
                d -= l.at(j, k) * l.at(j, k);
            }
            if !(d > 0.0) || !d.is_finite() {
                return None;
            }
            let d = d.sqrt();
            *l.at_mut(j, j) = d;
            for i in (j + 1)..n {
                let mut s = self.at(i, j);
                for k in 0..j {
                    s -= l.at(i, k) * l.at(j, k);
                }
                *l.at_mut(i, j) = s / d;
            }
        }
        Some(l)
    }

    /// `ln det` of a symmetric positive definite matrix (through Cholesky).
    pub fn logdet_spd(&self) -> Option<f64> {
        let l = self.cholesky()?;
        Some((0..self.rows).map(|i| 2.0 * l.at(i, i).ln()).sum())
    }

    /// The inverse of a symmetric positive definite matrix.
    pub fn inverse_spd(&self) -> Option<Self> {
        let l = self.cholesky()?;
        let n = self.rows;
        let mut inv = Self::zeros(n, n);
        for col in 0..n {
            // Solve L y = e_col, then L^T x = y.
            let mut y = vec![0.0; n];
            for i in 0..n {
                let mut s = if i == col { 1.0 } else { 0.0 };
                for k in 0..i {
                    s -= l.at(i, k) * y[k];
                }
                y[i] = s / l.at(i, i);
            }
            let mut x = vec![0.0; n];
            for i in (0..n).rev() {
                let mut s = y[i];
                for k in (i + 1)..n {
                    s -= l.at(k, i) * x[k];
                }
                x[i] = s / l.at(i, i);
            }
            for i in 0..n {
                *inv.at_mut(i, col) = x[i];
            }
        }
        Some(inv)
    }
}

/// `KL[N(mu_q, cov_q) || N(mu_p, cov_p)]` for dense covariances, in `f64`.
///
/// `1/2 [tr(cov_p^-1 cov_q) + d^T cov_p^-1 d - k + ln det cov_p - ln det cov_q]`
/// with `d = mu_p - mu_q`. `None` if a covariance is not positive definite.
pub fn gaussian_kl(mu_q: &[f64], cov_q: &Mat, mu_p: &[f64], cov_p: &Mat) -> Option<f64> {
    let k = mu_q.len();
    assert!(mu_p.len() == k && cov_q.rows == k && cov_p.rows == k);
    let p_inv = cov_p.inverse_spd()?;
    let trace = p_inv.matmul(cov_q).trace();
    let d: Vec<f64> = mu_p.iter().zip(mu_q).map(|(p, q)| p - q).collect();
    let dm = Mat::new(k, 1, d.clone());
    let quad = dm.t().matmul(&p_inv).matmul(&dm).at(0, 0);
    Some(0.5 * (trace + quad - k as f64 + cov_p.logdet_spd()? - cov_q.logdet_spd()?))
}

/// `ln det(A A^T)` of a wide `r x n` matrix `A` (row-major) and its gradient
/// `2 (A A^T)^-1 A` with respect to `A`. `None` if `A` has rank below `r`.
pub fn logdet_gram(a: &Mat) -> Option<(f64, Mat)> {
    let gram = a.matmul(&a.t());
    let logdet = gram.logdet_spd()?;
    let mut grad = gram.inverse_spd()?.matmul(a);
    grad.data.iter_mut().for_each(|v| *v *= 2.0);
    Some((logdet, grad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_inverse_and_logdet_known_values() {
        // [[4, 2], [2, 3]]: det 8, inverse [[3, -2], [-2, 4]] / 8.
        let m = Mat::new(2, 2, vec![4.0, 2.0, 2.0, 3.0]);
        assert!((m.logdet_spd().unwrap() - 8f64.ln()).abs() < 1e-14);
        let inv = m.inverse_spd().unwrap();
        let expected = Mat::new(2, 2, vec![0.375, -0.25, -0.25, 0.5]);
        assert!(inv.sub(&expected).frobenius() < 1e-14);
        assert!(Mat::new(2, 2, vec![1.0, 2.0, 2.0, 1.0]).cholesky().is_none());
    }

    #[test]
    fn kron_and_vec_follow_the_column_convention() {
        // vec(B C A) = (A^T (x) B) vec(C).
        let b = Mat::new(3, 2, vec![1.0, -2.0, 0.5, 3.0, -1.0, 2.0]);
        let c = Mat::new(2, 2, vec![0.3, -0.7, 1.1, 0.2]);
        let a = Mat::new(2, 4, vec![1.0, 0.0, -1.0, 2.0, 0.5, 1.5, -0.5, 1.0]);
        let lhs = b.matmul(&c).matmul(&a).vec();
        let rhs = a.t().kron(&b).matmul(&Mat::new(4, 1, c.vec())).data;
        for (l, r) in lhs.iter().zip(&rhs) {
            assert!((l - r).abs() < 1e-12);
        }
    }

    #[test]
    fn gaussian_kl_of_univariate_case() {
        // KL[N(1, 0.5^2) || N(0, 2^2)] = ln(2/0.5) + (0.25 + 1)/(2*4) - 1/2.
        let kl = gaussian_kl(&[1.0], &Mat::diag(&[0.25]), &[0.0], &Mat::diag(&[4.0])).unwrap();
        let expected = 4f64.ln() + 1.25 / 8.0 - 0.5;
        assert!((kl - expected).abs() < 1e-14);
    }

    #[test]
    fn logdet_gram_gradient_matches_finite_differences() {
        let a = Mat::new(2, 3, vec![1.0, 0.2, -0.4, 0.3, -1.2, 0.8]);
        let (_, grad) = logdet_gram(&a).unwrap();
        let h = 1e-6;
        for idx in 0..a.data.len() {
            let mut plus = a.clone();
            plus.data[idx] += h;
            let mut minus = a.clone();
            minus.data[idx] -= h;
            let fd = (logdet_gram(&plus).unwrap().0 - logdet_gram(&minus).unwrap().0) / (2.0 * h);
            assert!(
                (fd - grad.data[idx]).abs() < 1e-7,
                "entry {idx}: {fd} vs {}",
                grad.data[idx]
            );
        }
    }
}
