//! The formulas of `docs/derivations.md`, each proven on ndarray in f64:
//! closed form vs Monte Carlo, closed form vs an independent dense Gaussian
//! KL, autodiff gradient vs finite differences, invariances.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use melora_core::kl::{blob_kl, melora_kl};
use melora_core::linalg::{gaussian_kl, Mat};
use melora_core::{KlSchedule, LowRankConfig, MeLoraKl, MeLoraLinearConfig, NoiseSource, PriorConfig};

type B = NdArray<f64>;
type AD = Autodiff<NdArray<f64>>;

const VARIANTS: [MeLoraKl; 4] = [MeLoraKl::Paper, MeLoraKl::ExactC, MeLoraKl::Subspace, MeLoraKl::Matched];

fn random_mat(rows: usize, cols: usize, seed: u64, scale: f64) -> Mat {
    let t = NoiseSource::seeded(seed).normal::<B, 2>([rows, cols], &Default::default());
    Mat::new(
        rows,
        cols,
        t.into_data()
            .to_vec::<f64>()
            .unwrap()
            .iter()
            .map(|v| v * scale)
            .collect(),
    )
}

fn tensor<Bk: Backend>(m: &Mat) -> Tensor<Bk, 2> {
    Tensor::from_data(TensorData::new(m.data.clone(), [m.rows, m.cols]), &Default::default())
}

fn map(m: &Mat, f: impl Fn(f64) -> f64) -> Mat {
    Mat::new(m.rows, m.cols, m.data.iter().map(|v| f(*v)).collect())
}

fn kl_value(variant: MeLoraKl, m: &Mat, omega: &Mat, a: &Mat, sigma: f64) -> f64 {
    melora_kl::<B>(variant, tensor(m), tensor(omega), tensor(a), sigma).into_scalar()
}

/// A problem of the size derivations.md uses: r = 3, n = 5.
struct Problem {
    m: Mat,
    omega: Mat,
    a: Mat,
}

fn problem(seed: u64) -> Problem {
    let r = 3;
    let h = random_mat(r, r, seed, 0.8);
    Problem {
        m: random_mat(r, r, seed + 1, 0.7),
        omega: map(&h, |v| v * v + 0.05),
        a: random_mat(r, 5, seed + 2, 0.6),
    }
}

// ---------------------------------------------------------------- Section 1

/// Monte Carlo over 100k draws of C (m = 6, n = 5, r = 3): the sample
/// covariance of vec(W), W = B C A, matches the exact
/// (A^T (x) B) diag(vec Omega^2) (A (x) B^T) and is far from the paper's
/// (I (x) B) diag(vec s^2) (I (x) B^T), s = Omega |A|.
#[test]
fn covariance_of_w_is_exact_formula_not_papers() {
    let (m, n, r) = (6, 5, 3);
    let device = Default::default();
    let a = random_mat(r, n, 1, 1.0);
    let b = random_mat(m, r, 2, 1.0);
    let mean = random_mat(r, r, 3, 1.0);
    let h = random_mat(r, r, 4, 1.0);
    let base = burn::nn::LinearConfig::new(n, m).init::<B>(&device);
    let adapter = MeLoraLinearConfig::new()
        .with_low_rank(LowRankConfig::new().with_rank(r))
        .init_with(base, tensor(&a), tensor(&b), tensor(&mean), tensor(&h))
        .unwrap();
    let draws = 100_000;
    let c = adapter.sample_c(draws, &mut NoiseSource::seeded(5));
    let w = tensor::<B>(&b)
        .unsqueeze::<3>()
        .matmul(c)
        .matmul(tensor::<B>(&a).unsqueeze::<3>());
    let w: Vec<f64> = w.into_data().to_vec().unwrap();
    let k = m * n;
    // vec stacks columns: entry (i, j) of W goes to j * m + i.
    let mut mu = vec![0.0; k];
    let mut second = Mat::zeros(k, k);
    let mut v = vec![0.0; k];
    for sample in w.chunks(k) {
        for i in 0..m {
            for j in 0..n {
                v[j * m + i] = sample[i * n + j];
            }
        }
        for p in 0..k {
            mu[p] += v[p];
            for q in 0..k {
                second.data[p * k + q] += v[p] * v[q];
            }
        }
    }
    let nd = draws as f64;
    let empirical = Mat::new(
        k,
        k,
        (0..k * k)
            .map(|pq| {
                let (p, q) = (pq / k, pq % k);
                (second.data[pq] - mu[p] * mu[q] / nd) / (nd - 1.0)
            })
            .collect(),
    );

    let omega = adapter.omega().into_data().to_vec::<f64>().unwrap();
    let omega = Mat::new(r, r, omega);
    let d_omega = Mat::diag(&omega.vec().iter().map(|o| o * o).collect::<Vec<_>>());
    let exact = a.t().kron(&b).matmul(&d_omega).matmul(&a.kron(&b.t()));
    let s = omega.matmul(&map(&a, f64::abs));
    let ib = Mat::identity(n).kron(&b);
    let paper = ib
        .matmul(&Mat::diag(&s.vec().iter().map(|x| x * x).collect::<Vec<_>>()))
        .matmul(&ib.t());

    let err_exact = empirical.sub(&exact).frobenius() / exact.frobenius();
    let err_paper = empirical.sub(&paper).frobenius() / paper.frobenius();
    println!("rel. Frobenius error of Cov(vec W): exact {err_exact:.4}, paper {err_paper:.3}");
    println!(
        "trace: empirical {:.3}, exact {:.3}, paper {:.3}",
        empirical.trace(),
        exact.trace(),
        paper.trace()
    );
    assert!(err_exact < 0.02, "exact covariance off by {err_exact}");
    assert!(
        err_paper > 0.5,
        "the paper's covariance should be far off, got {err_paper}"
    );
}

/// The paper's per-entry variance s^2 is at least the true v, at most r v.
#[test]
fn paper_variance_inflation_lies_between_one_and_r() {
    let p = problem(7);
    let r = 3.0;
    let s = p.omega.matmul(&map(&p.a, f64::abs));
    let v = map(&p.omega, |x| x * x).matmul(&map(&p.a, |x| x * x));
    for (s, v) in s.data.iter().zip(&v.data) {
        let ratio = s * s / v;
        assert!((1.0 - 1e-12..=r + 1e-12).contains(&ratio), "s^2 / v = {ratio}");
    }
    // All terms equal: the ratio is exactly r (Cauchy-Schwarz equality).
    let ones = Mat::new(3, 3, vec![0.5; 9]);
    let a = Mat::new(3, 2, vec![1.0; 6]);
    let s = ones.matmul(&a);
    let v = map(&ones, |x| x * x).matmul(&a);
    assert!((s.data[0] * s.data[0] / v.data[0] - r).abs() < 1e-12);
}

// ---------------------------------------------------------------- Section 2

/// KL of N(mu, diag(var)) against N(0, sigma^2 I), through the dense formula.
fn dense_kl_diag(mu: &[f64], var: &[f64], sigma: f64) -> f64 {
    let k = mu.len();
    gaussian_kl(mu, &Mat::diag(var), &vec![0.0; k], &Mat::diag(&vec![sigma * sigma; k])).unwrap()
}

#[test]
fn exact_c_equals_dense_gaussian_kl() {
    for (seed, sigma) in [(10, 0.2), (11, 1.3)] {
        let p = problem(seed);
        let dense = dense_kl_diag(&p.m.vec(), &map(&p.omega, |o| o * o).vec(), sigma);
        let closed = kl_value(MeLoraKl::ExactC, &p.m, &p.omega, &p.a, sigma);
        assert!(
            (dense - closed).abs() < 1e-6,
            "exact_c: dense {dense} vs closed {closed}"
        );
    }
}

#[test]
fn matched_equals_dense_kl_of_the_moment_matched_gaussian() {
    for (seed, sigma) in [(12, 0.2), (13, 0.9)] {
        let p = problem(seed);
        let r = p.m.rows;
        // v from the exact covariance of vec Q = vec(C A): (A^T (x) I) D (A (x) I).
        let d = Mat::diag(&map(&p.omega, |o| o * o).vec());
        let cov_q =
            p.a.t()
                .kron(&Mat::identity(r))
                .matmul(&d)
                .matmul(&p.a.kron(&Mat::identity(r)));
        let var: Vec<f64> = (0..cov_q.rows).map(|i| cov_q.at(i, i)).collect();
        let dense = dense_kl_diag(&p.m.matmul(&p.a).vec(), &var, sigma);
        let closed = kl_value(MeLoraKl::Matched, &p.m, &p.omega, &p.a, sigma);
        assert!(
            (dense - closed).abs() < 1e-6,
            "matched: dense {dense} vs closed {closed}"
        );
    }
}

#[test]
fn subspace_equals_dense_kl_against_the_a_dependent_prior() {
    for (seed, sigma) in [(14, 0.2), (15, 2.0)] {
        let p = problem(seed);
        let r = p.m.rows;
        // Row i of C: q = N(M_i, diag Omega_i^2); prior N(0, sigma^2 (A A^T)^-1).
        let prior = p.a.matmul(&p.a.t()).inverse_spd().unwrap();
        let prior = map(&prior, |x| x * sigma * sigma);
        let dense: f64 = (0..r)
            .map(|i| {
                let mu: Vec<f64> = (0..r).map(|k| p.m.at(i, k)).collect();
                let var: Vec<f64> = (0..r).map(|k| p.omega.at(i, k).powi(2)).collect();
                gaussian_kl(&mu, &Mat::diag(&var), &vec![0.0; r], &prior).unwrap()
            })
            .sum();
        let closed = kl_value(MeLoraKl::Subspace, &p.m, &p.omega, &p.a, sigma);
        assert!(
            (dense - closed).abs() < 1e-6,
            "subspace: dense {dense} vs closed {closed}"
        );
    }
}

#[test]
fn blob_kl_equals_dense_gaussian_kl() {
    let mean = random_mat(3, 5, 16, 0.5);
    let omega = map(&random_mat(3, 5, 17, 0.4), |g| g * g + 0.01);
    let dense = dense_kl_diag(&mean.vec(), &map(&omega, |o| o * o).vec(), 0.2);
    let closed: f64 = blob_kl::<B>(tensor(&mean), tensor(&omega), 0.2).into_scalar();
    assert!((dense - closed).abs() < 1e-6, "blob: dense {dense} vs closed {closed}");
}

/// K_paper = K_iv + (|s|^2 - sum v) / (2 sigma^2) + (r/2) ln det A A^T - r^2 (ln sigma - 1/2).
#[test]
fn paper_expression_relates_to_subspace_kl_as_derived() {
    let p = problem(18);
    let (r, sigma) = (3.0, 0.2);
    let s = p.omega.matmul(&map(&p.a, f64::abs));
    let v = map(&p.omega, |x| x * x).matmul(&map(&p.a, |x| x * x));
    let s2: f64 = s.data.iter().map(|x| x * x).sum();
    let v_sum: f64 = v.data.iter().sum();
    let logdet = p.a.matmul(&p.a.t()).logdet_spd().unwrap();
    let expected = kl_value(MeLoraKl::Subspace, &p.m, &p.omega, &p.a, sigma)
        + (s2 - v_sum) / (2.0 * sigma * sigma)
        + r / 2.0 * logdet
        - r * r * (sigma.ln() - 0.5);
    let paper = kl_value(MeLoraKl::Paper, &p.m, &p.omega, &p.a, sigma);
    assert!((paper - expected).abs() < 1e-6, "paper {paper} vs derived {expected}");
}

/// Under (M, Omega, A) -> (tM, tOmega, A/t), i.e. H -> sqrt(t) H:
/// subspace and matched are unchanged, the paper's expression moves by
/// exactly -r^2 ln t.
#[test]
fn rescaling_orbit_leaves_exact_kls_invariant_and_shifts_the_papers() {
    let p = problem(19);
    let r = 3.0;
    let sigma = 0.2;
    let at = |variant, t: f64| {
        kl_value(
            variant,
            &map(&p.m, |x| x * t),
            &map(&p.omega, |x| x * t),
            &map(&p.a, |x| x / t),
            sigma,
        )
    };
    for t in [0.1, 10.0, 100.0] {
        for variant in [MeLoraKl::Subspace, MeLoraKl::Matched] {
            let (before, after) = (at(variant, 1.0), at(variant, t));
            assert!(
                (after - before).abs() < 1e-9 * before.abs().max(1.0),
                "{variant:?} at t = {t}: {before} -> {after}"
            );
        }
        let shift = at(MeLoraKl::Paper, t) - at(MeLoraKl::Paper, 1.0);
        assert!(
            (shift + r * r * t.ln()).abs() < 1e-8,
            "paper at t = {t}: shift {shift}, expected {}",
            -r * r * t.ln()
        );
        // exact_c is a KL of C, not of W: it is not invariant.
        assert!((at(MeLoraKl::ExactC, t) - at(MeLoraKl::ExactC, 1.0)).abs() > 1.0);
    }
}

/// Autodiff gradients (through Omega = H^2) against central differences.
#[test]
fn every_kl_gradient_matches_finite_differences() {
    let p = problem(20);
    let h = map(&p.omega, f64::sqrt);
    let sigma = 0.3;
    let eval = |variant, m: &Mat, h: &Mat, a: &Mat| kl_value(variant, m, &map(h, |x| x * x), a, sigma);
    for variant in VARIANTS {
        let (m_t, h_t, a_t) = (
            tensor::<AD>(&p.m).require_grad(),
            tensor::<AD>(&h).require_grad(),
            tensor::<AD>(&p.a).require_grad(),
        );
        let grads = melora_kl(variant, m_t.clone(), h_t.clone().powi_scalar(2), a_t.clone(), sigma).backward();
        // A parameter the KL does not depend on (A for exact_c) has no gradient: zero.
        let grad_of = |t: &Tensor<AD, 2>| match t.grad(&grads) {
            Some(g) => g.into_data().to_vec::<f64>().unwrap(),
            None => vec![0.0; t.shape().num_elements()],
        };
        let autodiff = [grad_of(&m_t), grad_of(&h_t), grad_of(&a_t)];
        let step = 1e-6;
        for (which, grad) in autodiff.iter().enumerate() {
            for idx in 0..grad.len() {
                let shifted = |delta: f64| {
                    let (mut m, mut h, mut a) = (p.m.clone(), h.clone(), p.a.clone());
                    [&mut m, &mut h, &mut a][which].data[idx] += delta;
                    eval(variant, &m, &h, &a)
                };
                let fd = (shifted(step) - shifted(-step)) / (2.0 * step);
                let tol = 1e-6 * fd.abs().max(1.0);
                assert!(
                    (fd - grad[idx]).abs() < tol,
                    "{variant:?} d/d{}[{idx}]: autodiff {} vs fd {fd}",
                    ["M", "H", "A"][which],
                    grad[idx]
                );
            }
        }
    }
}

#[test]
fn blob_kl_gradient_matches_finite_differences() {
    let mean = random_mat(2, 4, 21, 0.5);
    let g = random_mat(2, 4, 22, 0.4);
    let eval =
        |mean: &Mat, g: &Mat| -> f64 { blob_kl::<B>(tensor(mean), tensor(&map(g, |x| x * x)), 0.2).into_scalar() };
    let (m_t, g_t) = (tensor::<AD>(&mean).require_grad(), tensor::<AD>(&g).require_grad());
    let grads = blob_kl(m_t.clone(), g_t.clone().powi_scalar(2), 0.2).backward();
    let autodiff = [
        m_t.grad(&grads).unwrap().into_data().to_vec::<f64>().unwrap(),
        g_t.grad(&grads).unwrap().into_data().to_vec::<f64>().unwrap(),
    ];
    for (which, grad) in autodiff.iter().enumerate() {
        for idx in 0..grad.len() {
            let shifted = |delta: f64| {
                let (mut m, mut g) = (mean.clone(), g.clone());
                [&mut m, &mut g][which].data[idx] += delta;
                eval(&m, &g)
            };
            let fd = (shifted(1e-6) - shifted(-1e-6)) / 2e-6;
            assert!(
                (fd - grad[idx]).abs() < 1e-6 * fd.abs().max(1.0),
                "blob grad {which}[{idx}]: {} vs {fd}",
                grad[idx]
            );
        }
    }
}

/// A collapsed std keeps every KL finite (the log is clamped).
#[test]
fn kls_stay_finite_for_tiny_stds() {
    let p = problem(23);
    let tiny = map(&p.omega, |_| 1e-40);
    for variant in VARIANTS {
        let v = kl_value(variant, &p.m, &tiny, &p.a, 0.2);
        assert!(v.is_finite(), "{variant:?} gave {v}");
    }
}

/// E[1 / (2 (sigma_p + eps)^2)], eps ~ U(0, 1), is 1 / (2 sigma_p (1 + sigma_p)).
#[test]
fn prior_noise_quadratic_weight_matches_closed_form() {
    let prior = PriorConfig::new().with_std(0.2).with_noise(true);
    let mut noise = NoiseSource::seeded(24);
    let draws = 1_000_000;
    let mean = (0..draws)
        .map(|_| {
            let s = prior.draw_std::<B>(&mut noise, &Default::default());
            1.0 / (2.0 * s * s)
        })
        .sum::<f64>()
        / draws as f64;
    let closed = 1.0 / (2.0 * 0.2 * 1.2);
    println!("E[1/(2 s^2)]: Monte Carlo {mean:.4}, closed form {closed:.4}");
    assert!((mean - closed).abs() / closed < 0.01, "{mean} vs {closed}");
    assert_eq!(PriorConfig::new().draw_std::<B>(&mut noise, &Default::default()), 0.2);
}

/// `Blob`: cycle weights `2^i / (2^M - 1)` times `M / N`, on a counter
/// that runs over the whole run (no restart at an epoch boundary).
#[test]
fn blob_schedule_cycles_average_to_the_elbo_without_overflow() {
    // N = 10 examples, batch 4: an epoch is 3 steps, the cycle 4.
    let small = KlSchedule::Blob { period: 4 };
    for i in 0..4 {
        assert!((small.weight(i, 10, 4) - 2f64.powi(i as i32) / 15.0 * 4.0 / 10.0).abs() < 1e-15);
        assert_eq!(
            small.weight(i, 10, 4),
            small.weight(i + 4, 10, 4),
            "the schedule repeats"
        );
    }
    // Step 3 opens the second epoch and is still the cycle's heaviest step.
    assert!((small.weight(3, 10, 4) - 8.0 / 15.0 * 0.4).abs() < 1e-15);
    for period in [1, 10, 1024, 5000, 1_000_000] {
        let schedule = KlSchedule::Blob { period };
        let total: f64 = (0..period).map(|i| schedule.weight(i, 1000, 4)).sum();
        assert!(
            (total - period as f64 / 1000.0).abs() < 1e-9 * period as f64,
            "period {period}: cycle sums to {total}"
        );
        assert!((0..period).all(|i| schedule.weight(i, 1000, 4).is_finite()));
    }
    assert_eq!(KlSchedule::Constant { weight: 0.25 }.weight(17, 10, 4), 0.025);
    assert!(KlSchedule::Blob { period: 0 }.validate().is_err());
}

/// `BlobCode`: bayesian-peft's `pi = 2^i / (2^(M+1) - 1)` with `i` running
/// 1..=M over a global step counter (`self.i` in `modelwrappers/blob.py`),
/// on the summed KL, and `M = int(100 * N^(pi / gamma) / batch)`; values
/// worked out by hand.
#[test]
fn blob_code_schedule_matches_bayesian_peft_by_hand() {
    // No rescaling: M = ceil(10 / 4) = 3 steps per epoch; 2^4 - 1 = 15.
    let epoch = KlSchedule::BlobCode { gamma: None };
    assert_eq!(epoch.period(10, 4), Some(3));
    let expected = [2.0 / 15.0, 4.0 / 15.0, 8.0 / 15.0, 2.0 / 15.0, 4.0 / 15.0];
    for (t, w) in expected.iter().enumerate() {
        assert!((epoch.weight(t, 10, 4) - w).abs() < 1e-15, "step {t}");
    }
    // ARC-Easy (N = 2251) at batch 4, gamma 8: 100 * 2251^(pi/8) / 4 =
    // 518.10, M = 518; their two-GPU scripts (2 x 4 per step) give 259.
    let arc = KlSchedule::BlobCode { gamma: Some(8.0) };
    assert_eq!(arc.period(2251, 4), Some(518));
    assert_eq!(arc.period(2251, 8), Some(259));
    assert_eq!(arc.period(640, 4), Some(316));
    // The first step weighs 2 / (2^519 - 1), the cycle's last 2^518 / (2^519 - 1),
    // just over one half; the next cycle starts over.
    assert!((arc.weight(0, 2251, 4) / (2.0 / (2f64.powi(519) - 1.0)) - 1.0).abs() < 1e-12);
    assert!((arc.weight(517, 2251, 4) - 2f64.powi(518) / (2f64.powi(519) - 1.0)).abs() < 1e-15);
    assert_eq!(arc.weight(518, 2251, 4), arc.weight(0, 2251, 4));
    // A cycle longer than an epoch: N = 16, batch 4 is 4 steps an epoch, and
    // gamma 4 gives 100 * 16^(pi/4) / 4 = 220.6, M = 220; the epoch
    // boundary at step 4 does not restart the cycle (i = 5 there).
    let long = KlSchedule::BlobCode { gamma: Some(4.0) };
    assert_eq!(long.period(16, 4), Some(220));
    assert!((long.weight(4, 16, 4) / (32.0 / (2f64.powi(221) - 1.0)) - 1.0).abs() < 1e-12);
    assert!((long.weight(219, 16, 4) - 2f64.powi(220) / (2f64.powi(221) - 1.0)).abs() < 1e-15);
    // A cycle's weights sum to (2^(M+1) - 2) / (2^(M+1) - 1), finite for any M.
    for gamma in [4.0, 8.0, 16.0] {
        let schedule = KlSchedule::BlobCode { gamma: Some(gamma) };
        let m = schedule.period(100_000, 4).unwrap();
        let total: f64 = (0..m).map(|t| schedule.weight(t, 100_000, 4)).sum();
        assert!((total - 1.0).abs() < 1e-9, "gamma {gamma}, M {m}: {total}");
    }
    assert!(KlSchedule::BlobCode { gamma: Some(0.0) }.validate().is_err());
}
