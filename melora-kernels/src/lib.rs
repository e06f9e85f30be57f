#![warn(missing_docs)]
//! # melora-kernels
//!
//! The CPU fast paths of melora's adapters and Llama, in one place: each
//! function here is a Burn operation (`x W`, `matmul`, `reshape`, SiLU,
//! softmax over the last axis, RMSNorm, RoPE) that, with the `ndarray`
//! feature and on Burn's ndarray backend (plain or `Autodiff`, `f32` or
//! `f64`, found by `TypeId`), runs a kernel of its own (`src/cpu/`; its
//! module docs say why: Burn 0.21's ndarray ops copy their operands and compose
//! these functions from several passes). On every other backend, and
//! without the feature, it is the Burn composition written beside it, so
//! the callers stay generic over `B: Backend`. Values and gradients equal
//! Burn's or the closed forms, up to summation order (tests here and in
//! the `cpu` module).
//!
//! Process set-up is the binaries' job, not this crate's: a binary that
//! makes matrixmultiply single-threaded (`MATMUL_NUM_THREADS=1`, read by
//! matrixmultiply at its first product) should call [`split_products`]
//! so that each product is split over rayon's threads instead
//! (`melora_cli::backend::tune_process` does both).

#[cfg(feature = "ndarray")]
mod cpu;

use burn::nn::Linear;
use burn::tensor::module::linear;
use burn::tensor::{backend::Backend, Tensor};

use std::sync::atomic::{AtomicBool, Ordering};

static SPLIT_PRODUCTS: AtomicBool = AtomicBool::new(false);

/// Whether the ndarray products are split into one block per rayon thread
/// (each packing its own share of the operands). Turn it on only when
/// matrixmultiply runs single-threaded (`MATMUL_NUM_THREADS=1`), which a
/// library cannot know and only the process can arrange: 8% less time over
/// the SmolLM2 step's GEMM shapes on 2 cores
/// (`experiments/results/compare-cpu.md`). Off by default, and then
/// matrixmultiply splits the work itself. The blocks split rows or
/// columns of the product, never the summed axis.
pub fn split_products(on: bool) {
    SPLIT_PRODUCTS.store(on, Ordering::Relaxed);
}

/// See [`split_products`].
#[cfg_attr(not(feature = "ndarray"), allow(dead_code))]
pub(crate) fn products_split() -> bool {
    SPLIT_PRODUCTS.load(Ordering::Relaxed)
}

/// `x W (+ b)` for `x` `[batch, seq, d_in]` and `W` `[d_in, d_out]`, computed
/// as one `[batch * seq, d_in] x [d_in, d_out]` product.
///
/// Burn's `linear` broadcasts `W` over the batch and multiplies each
/// sequence separately; on ndarray that packs `W` (and, in the backward
/// pass, `W^T`) once per sequence and runs `batch` small GEMMs. One tall
/// product packs it once and keeps the GEMM kernel busy (a training step of
/// SmolLM2 spends most of its time here). The result is the same up to
/// summation order.
///
/// On the ndarray backend (plain or autodiff) the product goes through
/// the `cpu` module, which reads the operands in place instead of copying
/// them as Burn's ndarray matmul does.
pub fn flat_linear<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
    #[cfg(feature = "ndarray")]
    let (x, weight) = match bias {
        None => match crate::cpu::linear(x, weight) {
            Ok(out) => return out,
            Err(inputs) => inputs,
        },
        Some(_) => (x, weight),
    };
    let [batch, seq, d_in] = x.dims();
    let out = linear(x.reshape([batch * seq, d_in]), weight, bias);
    let d_out = out.dims()[1];
    out.reshape([batch, seq, d_out])
}

/// [`flat_linear`] through a [`Linear`] module (what `layer.forward(x)` does).
pub fn linear_forward<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    flat_linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// SiLU, `y = x s` with `s = sigmoid(x) = 1 / (1 + e^-x)`: the same function
/// and gradient as Burn's `silu`, in fewer passes over the tensor.
///
/// Burn's sigmoid runs `exp(-log(1 + exp(-x)))` (six passes) and its
/// backward pass runs it again (a sizeable share of a SmolLM2 training step
/// on ndarray: `melora-bench`'s step benchmarks). Here `s` takes five passes, and the
/// derivative `dy/dx = s + x s (1 - s) = s + y (1 - s)` is computed in the
/// forward pass, outside the graph, and attached as the slope of a term that
/// is zero in value: `y + (x - x̄) · slope`, where `x̄` is `x` detached. So
/// the backward pass is a single product, and the graph keeps one tensor
/// (the slope) where Burn's keeps two (input and sigmoid).
///
/// On the ndarray backend (plain or autodiff) the same function and
/// derivative are one parallel pass each (the `cpu` module); elsewhere
/// [`silu_composed`] builds them from Burn's tensor ops.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    let x = match crate::cpu::unary(x, || crate::cpu::Silu) {
        Ok(y) => return y,
        Err(x) => x,
    };
    silu_composed(x)
}

/// [`silu`] from Burn's tensor ops, for every backend.
pub fn silu_composed<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let input = x.clone().detach();
    // `1 / d` as a division: ndarray's SIMD `recip` is an approximation
    // (relative error ~5e-5, and which elements get it depends on alignment).
    let d = input.clone().neg().exp().add_scalar(1.0);
    let s = d.ones_like().div(d);
    let y = input.clone().mul(s.clone());
    // Only an autodiff backend needs the slope. (Intermediate tensors do
    // not answer `is_require_grad`, which is true for leaves alone.)
    if !B::ad_enabled(&x.device()) {
        return y;
    }
    let slope = y.clone().mul(s.clone().neg().add_scalar(1.0)).add(s);
    y.add(x.sub(input).mul(slope))
}

/// `a.matmul(b)`. On the ndarray backend, when the batch axes match, each
/// product is one GEMM reading the operands in place (a transposed view
/// included), forward and backward; Burn's ndarray matmul copies both
/// operands and the result.
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    let (a, b) = match crate::cpu::matmul(a, b) {
        Ok(y) => return y,
        Err(inputs) => inputs,
    };
    a.matmul(b)
}

/// `x.reshape(shape)`. On the ndarray backend a row-major `x` is reshaped
/// in place (a view of the same buffer, forward and backward); Burn's
/// ndarray `reshape` copies every time.
pub fn reshape<B: Backend, const D1: usize, const D2: usize>(x: Tensor<B, D1>, shape: [usize; D2]) -> Tensor<B, D2> {
    #[cfg(feature = "ndarray")]
    let x = match crate::cpu::reshape(x, shape) {
        Ok(y) => return y,
        Err(x) => x,
    };
    x.reshape(shape)
}

/// `norm.forward(x)`. On the ndarray backend, when the scale is frozen
/// (as in every adapter method here), the norm is one parallel pass forward
/// and one backward (the `cpu` module); Burn's composes it from
/// six tensor operations, each a pass of its own.
pub fn rms_norm<B: Backend, const D: usize>(norm: &burn::nn::RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    let x = {
        let gamma = norm.gamma.val();
        match gamma.is_require_grad() || gamma.dims()[0] != x.dims()[D - 1] {
            true => x,
            // The scale is read back only once the fast path is taken (an
            // ndarray backend, where that is a copy in memory).
            false => match crate::cpu::unary(x, || crate::cpu::RmsNorm {
                gamma: gamma
                    .into_data()
                    .convert::<f64>()
                    .to_vec::<f64>()
                    .expect("f64 scale")
                    .into(),
                epsilon: norm.epsilon,
            }) {
                Ok(y) => return y,
                Err(x) => x,
            },
        }
    };
    norm.forward(x)
}

/// Rotary position embedding (Llama's half-split layout) of `x`,
/// `[batch, seq, heads * head_dim]`: in each head, `(x1, x2) -> (x1 c - x2 s,
/// x2 c + x1 s)`, where `cos` and `sin` hold `c` and `s` for the `seq`
/// positions, `[seq, head_dim / 2]` row-major (every example at the same
/// positions), or for every token, `[batch * seq, head_dim / 2]` (each
/// example at positions of its own). On the ndarray backend this is one
/// parallel pass forward and one backward: `Ok`. Elsewhere `Err(x)`, and
/// the caller composes it from tensor ops.
pub fn rotary<B: Backend>(
    x: Tensor<B, 3>,
    cos: &std::sync::Arc<[f64]>,
    sin: &std::sync::Arc<[f64]>,
    head_dim: usize,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    let [batch, seq, width] = x.dims();
    assert!(
        head_dim % 2 == 0 && width % head_dim == 0,
        "rotary: width {width} is not whole heads of even size {head_dim}"
    );
    let rows = cos.len() / (head_dim / 2).max(1);
    assert!(
        cos.len() == rows * head_dim / 2 && (rows == seq || rows == batch * seq),
        "rotary: a table of {} values for {batch} x {seq} positions",
        cos.len()
    );
    assert_eq!(sin.len(), cos.len(), "rotary: table size");
    #[cfg(feature = "ndarray")]
    {
        crate::cpu::unary(x, || crate::cpu::Rotary {
            cos: cos.clone(),
            sin: sin.clone(),
            seq: rows,
            head_dim,
        })
    }
    #[cfg(not(feature = "ndarray"))]
    Err(x)
}

/// Softmax over the last axis: Burn's `softmax(x, D - 1)`. On the ndarray
/// backend it is one parallel pass over the rows, and its backward pass
/// (`dx = y (g - sum(g y))`) another (the `cpu` module); Burn's
/// composes it from several tensor operations, each a pass of its own.
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    let x = match crate::cpu::unary(x, || crate::cpu::Softmax) {
        Ok(y) => return y,
        Err(x) => x,
    };
    burn::tensor::activation::softmax(x, D - 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// The kernels are tested in f64 on ndarray (and in f32 where a test says so).
    pub type TestBackend = burn::backend::NdArray<f64>;

    /// Seeded standard normal test inputs (melora-core's `NoiseSource`
    /// lives above this crate).
    pub struct NoiseSource(rand::rngs::StdRng);

    impl NoiseSource {
        pub fn seeded(seed: u64) -> Self {
            Self(rand::rngs::StdRng::seed_from_u64(seed))
        }

        /// Box-Muller normals of the given shape.
        pub fn normal<B: burn::tensor::backend::Backend, const D: usize>(
            &mut self,
            shape: [usize; D],
            device: &B::Device,
        ) -> Tensor<B, D> {
            let n: usize = shape.iter().product();
            let values: Vec<f64> = (0..n)
                .map(|_| {
                    let (u, v): (f64, f64) = (self.0.random(), self.0.random());
                    (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
                })
                .collect();
            Tensor::from_data(burn::tensor::TensorData::new(values, shape), device)
        }
    }
    use burn::nn::LinearConfig;

    #[test]
    fn silu_value_and_gradient_match_the_closed_form_and_burn() {
        // The one-pass ndarray kernel and the composition of Burn ops.
        check_silu("fast", &|x| silu(x), &|x| silu(x));
        check_silu("composed", &|x| silu_composed(x), &|x| silu_composed(x));
    }

    type AD = burn::backend::Autodiff<TestBackend>;

    fn check_silu(
        name: &str,
        f: &dyn Fn(Tensor<AD, 1>) -> Tensor<AD, 1>,
        f_plain: &dyn Fn(Tensor<TestBackend, 1>) -> Tensor<TestBackend, 1>,
    ) {
        let device = Default::default();
        // Typical values and the tails, where exp(-x) overflows or vanishes.
        let mut values: Vec<f64> = NoiseSource::seeded(3)
            .normal::<TestBackend, 1>([200], &device)
            .mul_scalar(4.0)
            .into_data()
            .to_vec()
            .unwrap();
        values.extend([-800.0, -60.0, -20.0, 0.0, 20.0, 60.0, 800.0]);
        let n = values.len();
        let weights = NoiseSource::seeded(4).normal::<AD, 1>([n], &device);
        let run = |f: &dyn Fn(Tensor<AD, 1>) -> Tensor<AD, 1>| {
            let x =
                Tensor::<AD, 1>::from_data(burn::tensor::TensorData::new(values.clone(), [n]), &device).require_grad();
            let y = f(x.clone());
            let grads = y.clone().mul(weights.clone()).sum().backward();
            let grad: Vec<f64> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let y: Vec<f64> = y.into_data().to_vec().unwrap();
            (y, grad)
        };
        let (ours, ours_grad) = run(f);
        let (burn, burn_grad) = run(&|x| burn::tensor::activation::silu(x));
        let w: Vec<f64> = weights.clone().into_data().to_vec().unwrap();
        let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1.0);
        for i in 0..n {
            // The closed forms in f64.
            let (x, s) = (values[i], 1.0 / (1.0 + (-values[i]).exp()));
            let (y, slope) = (x * s, s + x * s * (1.0 - s));
            assert!(close(ours[i], y, 1e-12), "{name}: y({x}) {} vs {y}", ours[i]);
            assert!(
                close(ours_grad[i], w[i] * slope, 1e-12),
                "{name}: dy/dx({x}) {} vs {}",
                ours_grad[i],
                w[i] * slope
            );
            // Burn's sigmoid runs in f32 whatever the backend's precision.
            assert!(
                close(burn[i], y, 1e-6) && close(ours_grad[i], burn_grad[i], 1e-6),
                "{name}: Burn's silu at {x}"
            );
        }
        // Central differences at a few points (the closed form, independently of Burn).
        for &x0 in &[-3.0f64, -0.5, 0.0, 0.7, 2.5] {
            let closed = |x: f64| x / (1.0 + (-x).exp());
            let h = 1e-5;
            let numeric = (closed(x0 + h) - closed(x0 - h)) / (2.0 * h);
            let x = Tensor::<AD, 1>::from_data(burn::tensor::TensorData::new(vec![x0], [1]), &device).require_grad();
            let grads = f(x.clone()).sum().backward();
            let analytic: f64 = x.grad(&grads).unwrap().into_scalar();
            assert!(
                (numeric - analytic).abs() < 1e-8,
                "{name}: x = {x0}: {numeric} vs {analytic}"
            );
        }
        // A chain: the gradient flows through an intermediate tensor too.
        let x = Tensor::<AD, 1>::from_data(burn::tensor::TensorData::new(values.clone(), [n]), &device).require_grad();
        let grads = f(x.clone().mul_scalar(2.0)).mul(weights.clone()).sum().backward();
        let chained: Vec<f64> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        for i in 0..n {
            let (x, s) = (2.0 * values[i], 1.0 / (1.0 + (-2.0 * values[i]).exp()));
            let expected = 2.0 * w[i] * (s + x * s * (1.0 - s));
            assert!(
                close(chained[i], expected, 1e-12),
                "{name}: chained dy/dx at {x}: {} vs {expected}",
                chained[i]
            );
        }
        // Without autodiff, the value alone.
        let plain: Vec<f64> = f_plain(Tensor::<TestBackend, 1>::from_data(
            burn::tensor::TensorData::new(values.clone(), [n]),
            &device,
        ))
        .into_data()
        .to_vec()
        .unwrap();
        assert_eq!(plain, ours);
    }

    #[test]
    fn softmax_last_matches_burns_softmax_value_and_gradient() {
        let device = Default::default();
        let mut noise = NoiseSource::seeded(21);
        // Scores as attention makes them: a transposed view, some entries
        // masked with -inf (never a whole row).
        let x0 = noise
            .normal::<TestBackend, 3>([2, 6, 5], &device)
            .mul_scalar(3.0)
            .swap_dims(1, 2);
        let mask: Vec<f64> = (0..60)
            .map(|i| if i % 7 == 3 { f64::NEG_INFINITY } else { 0.0 })
            .collect();
        let x0 = x0.add(Tensor::from_data(
            burn::tensor::TensorData::new(mask, [2, 5, 6]),
            &device,
        ));
        let weights = noise.normal::<AD, 3>([2, 5, 6], &device);
        let run = |fast: bool| {
            let x = Tensor::<AD, 3>::from_inner(x0.clone()).require_grad();
            let y = match fast {
                true => softmax_last(x.clone().mul_scalar(1.0)),
                false => burn::tensor::activation::softmax(x.clone().mul_scalar(1.0), 2),
            };
            let grads = y.clone().mul(weights.clone()).sum().backward();
            let dx: Vec<f64> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let y: Vec<f64> = y.into_data().to_vec().unwrap();
            (y, dx)
        };
        let ((y, dx), (ey, edx)) = (run(true), run(false));
        for i in 0..y.len() {
            assert!((y[i] - ey[i]).abs() < 1e-12, "y[{i}]: {} vs {}", y[i], ey[i]);
            assert!((dx[i] - edx[i]).abs() < 1e-12, "dx[{i}]: {} vs {}", dx[i], edx[i]);
        }
        // Rows sum to one; masked entries are exactly zero.
        for row in y.chunks(6) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert!(y
            .iter()
            .zip(x0.into_data().to_vec::<f64>().unwrap())
            .all(|(&y, x)| x.is_finite() || y == 0.0));
        // Without autodiff, the same values.
        let plain: Vec<f64> = softmax_last(
            Tensor::<TestBackend, 3>::from_data(burn::tensor::TensorData::new(ey.clone(), [2, 5, 6]), &device).log(),
        )
        .into_data()
        .to_vec()
        .unwrap();
        for i in 0..y.len() {
            assert!((plain[i] - ey[i]).abs() < 1e-12, "plain y[{i}]");
        }
    }

    #[test]
    fn flat_linear_equals_the_module_forward() {
        let device = Default::default();
        let layer = LinearConfig::new(6, 5).init::<TestBackend>(&device);
        let x = NoiseSource::seeded(1).normal::<TestBackend, 3>([3, 4, 6], &device);
        let ours: Vec<f64> = linear_forward(&layer, x.clone()).into_data().to_vec().unwrap();
        let burn: Vec<f64> = layer.forward(x).into_data().to_vec().unwrap();
        assert_eq!(ours.len(), 3 * 4 * 5);
        for (a, b) in ours.iter().zip(&burn) {
            assert!((a - b).abs() < 1e-12 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
