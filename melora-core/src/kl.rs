//! KL terms: Me-LoRA's four variants, BLoB's closed form, the prior (with the
//! paper's optional prior noise) and the KL weighting schedules.
//!
//! Notation of `docs/derivations.md`: `M` (r x r) is the mean of `C`, `Omega`
//! (r x r) its entry-wise std, `A` (r x n); `P = M A`, `s = Omega |A|`,
//! `v = (Omega o Omega)(A o A)`, prior std `sigma`.
//!
//! | variant | formula |
//! |---|---|
//! | `paper` (Eq. 7) | `(|P|^2 + |s|^2) / (2 sigma^2) - sum ln Omega` |
//! | `exact_c` (i) | `(|M|^2 + |Omega|^2) / (2 sigma^2) - sum ln Omega + r^2 (ln sigma - 1/2)` |
//! | `matched` (ii) | `sum_ij [(v + P^2) / (2 sigma^2) - ln v / 2 + ln sigma - 1/2]` |
//! | `subspace` (iv) | `(|P|^2 + sum v) / (2 sigma^2) - sum ln Omega - (r/2) ln det(A A^T) + r^2 (ln sigma - 1/2)` |
//!
//! `paper` is not a KL (it is unbounded below along `(tM, tOmega, A/t)`);
//! it is here to reproduce the paper. `subspace` is the default.

use crate::adapter::safe_log;
use crate::error::check;
use crate::linalg::{logdet_gram, Mat};
use crate::noise::NoiseSource;
use burn::config::Config;
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Which KL Me-LoRA uses (docs/method.md section 2).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MeLoraKl {
    /// The paper's Eq. 7 (Eq. 8 with prior noise). Not a KL: for
    /// reproduction only.
    Paper,
    /// `KL[q(C) || N(0, sigma^2)]` per entry of `C`.
    ExactC,
    /// The exact KL of the true `q(C A)` against the prior restricted to its
    /// support; invariant to `(M, Omega, A) -> (tM, tOmega, A/t)`.
    Subspace,
    /// The KL of the moment-matched mean-field `q(C A)`.
    Matched,
}

impl std::str::FromStr for MeLoraKl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "paper" => Ok(Self::Paper),
            "exact_c" => Ok(Self::ExactC),
            "subspace" => Ok(Self::Subspace),
            "matched" => Ok(Self::Matched),
            _ => Err(format!(
                "unknown KL variant {s:?}: expected paper, exact_c, subspace or matched"
            )),
        }
    }
}

/// The prior `N(0, sigma^2)` per entry, with the paper's optional noise
/// `sigma = sigma_p + eps`, `eps ~ U(0, 1)` drawn once per step (Eq. 8).
#[derive(Config, Debug, PartialEq)]
pub struct PriorConfig {
    /// `sigma_p`.
    #[config(default = 0.2)]
    pub std: f64,
    /// Add `eps ~ U(0, 1)` to the prior std at every step.
    #[config(default = false)]
    pub noise: bool,
}

impl PriorConfig {
    /// Checks the prior std.
    pub fn validate(&self) -> crate::Result<()> {
        check(
            self.std.is_finite() && self.std > 0.0,
            "prior std",
            self.std,
            "must be finite and positive",
        )
    }

    /// The prior std for one step: `sigma_p`, or `sigma_p + eps` with prior noise.
    pub fn draw_std<B: Backend>(&self, noise: &mut NoiseSource, device: &B::Device) -> f64 {
        if self.noise {
            self.std + noise.uniform_scalar::<B>(device)
        } else {
            self.std
        }
    }
}

fn sum_sq<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 1> {
    t.clone().mul(t).sum()
}

/// Me-LoRA's KL term for `q(C) = N(M, Omega^2)` and the projection `A`.
///
/// # Shapes
///
/// - mean `M`: `[r, r]`, omega `Omega`: `[r, r]`, a `A`: `[r, n]`
/// - output: `[1]`
pub fn melora_kl<B: Backend>(
    variant: MeLoraKl,
    mean: Tensor<B, 2>,
    omega: Tensor<B, 2>,
    a: Tensor<B, 2>,
    prior_std: f64,
) -> Tensor<B, 1> {
    let logdet = (variant == MeLoraKl::Subspace).then(|| logdet_gram_term(a.clone()));
    melora_kl_given(variant, mean, omega, a, prior_std, logdet)
}

/// [`melora_kl`] with `ln det(A A^T)` already computed (by
/// [`logdet_gram_terms`], for many adapters in one host round trip); the
/// `Subspace` variant needs it, the others ignore it.
///
/// # Panics
///
/// If the variant is `Subspace` and `logdet` is `None`.
pub fn melora_kl_given<B: Backend>(
    variant: MeLoraKl,
    mean: Tensor<B, 2>,
    omega: Tensor<B, 2>,
    a: Tensor<B, 2>,
    prior_std: f64,
    logdet: Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let [r, n] = a.dims();
    let two_var = 2.0 * prior_std * prior_std;
    let log_const = prior_std.ln() - 0.5;
    let sum_log_omega = || safe_log(omega.clone()).sum();
    let p = || mean.clone().matmul(a.clone());
    let v = || omega.clone().powi_scalar(2).matmul(a.clone().powi_scalar(2));
    match variant {
        MeLoraKl::Paper => {
            let s = omega.clone().matmul(a.clone().abs());
            sum_sq(p()).add(sum_sq(s)).div_scalar(two_var).sub(sum_log_omega())
        }
        MeLoraKl::ExactC => sum_sq(mean.clone())
            .add(sum_sq(omega.clone()))
            .div_scalar(two_var)
            .sub(sum_log_omega())
            .add_scalar((r * r) as f64 * log_const),
        MeLoraKl::Matched => {
            let v = v();
            v.clone()
                .add(p().powi_scalar(2))
                .div_scalar(two_var)
                .sub(safe_log(v).mul_scalar(0.5))
                .sum()
                .add_scalar((r * n) as f64 * log_const)
        }
        MeLoraKl::Subspace => sum_sq(p())
            .add(v().sum())
            .div_scalar(two_var)
            .sub(sum_log_omega())
            .sub(
                logdet
                    .expect("the Subspace KL needs ln det(A A^T)")
                    .mul_scalar(r as f64 / 2.0),
            )
            .add_scalar((r * r) as f64 * log_const),
    }
}

/// `ln det(A A^T)` as a tensor whose value and gradient (`2 (A A^T)^-1 A`)
/// are computed in f64 on the host: `value + <grad, A - stopgrad(A)>`.
/// Infinite (`-inf`) if `A` has rank below `r`.
pub fn logdet_gram_term<B: Backend>(a: Tensor<B, 2>) -> Tensor<B, 1> {
    logdet_gram_terms(vec![a]).pop().expect("one term per matrix")
}

/// [`logdet_gram_term`] of several matrices (of any shapes) with one copy
/// to the host and one back: on a GPU each copy waits for the device, so a
/// model's Me-LoRA adapters are done together (one round trip per step,
/// not one per adapter).
pub fn logdet_gram_terms<B: Backend>(matrices: Vec<Tensor<B, 2>>) -> Vec<Tensor<B, 1>> {
    let Some(first) = matrices.first() else {
        return Vec::new();
    };
    let device = first.device();
    let flat: Vec<Tensor<B, 1>> = matrices
        .iter()
        .map(|a| a.clone().detach().reshape([a.shape().num_elements()]))
        .collect();
    let host = Tensor::cat(flat, 0)
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("f64 data after convert");
    let mut grads = Vec::with_capacity(host.len());
    let mut values = Vec::with_capacity(matrices.len());
    let mut offset = 0;
    for a in &matrices {
        let [r, n] = a.dims();
        let block = Mat::new(r, n, host[offset..offset + r * n].to_vec());
        offset += r * n;
        match logdet_gram(&block) {
            Some((value, grad)) => {
                values.push(value);
                grads.extend_from_slice(&grad.data);
            }
            None => {
                values.push(f64::NEG_INFINITY);
                grads.extend(std::iter::repeat_n(0.0, r * n));
            }
        }
    }
    let grads = Tensor::<B, 1>::from_data(TensorData::new(grads, [offset]), &device);
    let mut offset = 0;
    matrices
        .into_iter()
        .zip(values)
        .map(|(a, value)| {
            let [r, n] = a.dims();
            let grad = grads.clone().narrow(0, offset, r * n).reshape([r, n]);
            offset += r * n;
            if value.is_finite() {
                a.clone().sub(a.detach()).mul(grad).sum().add_scalar(value)
            } else {
                Tensor::<B, 1>::full([1], f64::NEG_INFINITY, &device)
            }
        })
        .collect()
}

/// BLoB's KL of `q(A) = N(M_A, Omega_A^2)` against `N(0, sigma^2)` per entry:
/// `sum [(Omega_A^2 + M_A^2) / (2 sigma^2) - ln Omega_A + ln sigma - 1/2]`.
///
/// # Shapes
///
/// - mean `M_A`, omega `Omega_A`: `[r, n]`
/// - output: `[1]`
pub fn blob_kl<B: Backend>(mean: Tensor<B, 2>, omega: Tensor<B, 2>, prior_std: f64) -> Tensor<B, 1> {
    let count = mean.shape().num_elements() as f64;
    sum_sq(mean)
        .add(sum_sq(omega.clone()))
        .div_scalar(2.0 * prior_std * prior_std)
        .sub(safe_log(omega).sum())
        .add_scalar(count * (prior_std.ln() - 0.5))
}

/// How the KL term is weighted at each step: [`KlSchedule::weight`] is the
/// weight the summed KL enters a step's loss with, beside the batch's mean
/// NLL.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum KlSchedule {
    /// BLoB's cycle, averaging to the per-example ELBO: within each cycle
    /// of `period` steps, counted over the whole run, step `i` (0-based)
    /// has weight `2^i / (2^period - 1) * period / N`; a cycle's weights sum
    /// to `period / N`.
    Blob {
        /// The cycle length.
        period: usize,
    },
    /// The weighting of BLoB's code (bayesian-peft, `modelwrappers/blob.py`,
    /// `BLoB.fit` with `--bayes-klreweighting`): the 0-based step `t`,
    /// counted over the whole run, has weight `2^i / (2^(M+1) - 1)` with
    /// `i = t mod M + 1`, on the summed KL (not divided by `N`). With
    /// `gamma` (`--bayes-datasetrescaling`, as every script of theirs runs)
    /// `M = floor(100 N^(pi / gamma) / batch)`, `batch` the examples per
    /// step over all devices (their `num_processes * batch_size`); without,
    /// `M` is the number of steps per epoch, `ceil(N / batch)`.
    BlobCode {
        /// `--bayes-gamma` (8 in their scripts), or `None` for no dataset
        /// rescaling.
        gamma: Option<f64>,
    },
    /// A constant weight on the per-example ELBO: `weight / N`.
    Constant {
        /// The weight (1: the ELBO).
        weight: f64,
    },
}

impl KlSchedule {
    /// Checks the schedule's parameters.
    pub fn validate(&self) -> crate::Result<()> {
        match *self {
            Self::Blob { period } => check(period > 0, "KL schedule period", period, "must be at least 1"),
            Self::BlobCode { gamma: Some(gamma) } => check(
                gamma.is_finite() && gamma > 0.0,
                "KL schedule gamma",
                gamma,
                "must be finite and positive",
            ),
            Self::BlobCode { gamma: None } => Ok(()),
            Self::Constant { weight } => check(
                weight.is_finite() && weight >= 0.0,
                "KL weight",
                weight,
                "must be finite and >= 0",
            ),
        }
    }

    /// The cycle length of the BLoB schedules for `n_train` examples and
    /// `batch` examples per step (`None` for a constant weight).
    pub fn period(&self, n_train: usize, batch: usize) -> Option<usize> {
        match *self {
            Self::Blob { period } => Some(period),
            Self::BlobCode { gamma: Some(gamma) } => {
                let m = 100.0 * (n_train as f64).powf(std::f64::consts::PI / gamma) / batch.max(1) as f64;
                Some((m.floor() as usize).max(1))
            }
            Self::BlobCode { gamma: None } => Some(n_train.div_ceil(batch.max(1)).max(1)),
            Self::Constant { .. } => None,
        }
    }

    /// The weight of the summed KL at 0-based training step `step` (counted
    /// over the whole run), for `n_train` training examples and `batch`
    /// examples per step.
    pub fn weight(&self, step: usize, n_train: usize, batch: usize) -> f64 {
        let n = n_train.max(1) as f64;
        match *self {
            Self::Blob { period } => {
                let (i, m) = ((step % period) as f64, period as f64);
                // 2^i / (2^M - 1) = 2^(i - M) / (1 - 2^-M): no overflow for any M.
                (i - m).exp2() / (1.0 - (-m).exp2()) * m / n
            }
            Self::BlobCode { .. } => {
                let period = self.period(n_train, batch).expect("a cycle");
                let (i, m) = ((step % period + 1) as f64, period as f64);
                // 2^i / (2^(M+1) - 1), written without overflow.
                (i - m - 1.0).exp2() / (1.0 - (-m - 1.0).exp2())
            }
            Self::Constant { weight } => weight / n,
        }
    }
}
