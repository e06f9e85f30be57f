//! The fast paths against Burn and the closed forms: products for every
//! layout and tracked input, reshape views, SiLU, softmax, RMSNorm, RoPE,
//! by value, gradient and central differences; and that a backend not
//! served never enters a fast path.

use super::gemm::gemm_split;
use super::*;
use std::cell::Cell;

thread_local! {
    /// How many times this thread entered a fast path ([`dispatch`]).
    pub(super) static FAST_PATHS: Cell<usize> = const { Cell::new(0) };
}
use crate::tests::NoiseSource;
use burn::tensor::module::linear as burn_linear;

/// Largest absolute difference, relative to the largest magnitude.
fn rel_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let scale: f64 = b.clone().abs().max().into_scalar().to_f64_lossy();
    let diff: f64 = a.sub(b).abs().max().into_scalar().to_f64_lossy();
    diff / scale.max(1e-30)
}

trait Lossy {
    fn to_f64_lossy(self) -> f64;
}
impl<T: burn::tensor::ElementConversion> Lossy for T {
    fn to_f64_lossy(self) -> f64 {
        self.elem::<f64>()
    }
}

/// `d loss / d x_i` at `x0` by central differences (step 1e-6).
fn central_difference(loss: &dyn Fn(&[f64]) -> f64, x0: &[f64], i: usize) -> f64 {
    let h = 1e-6;
    let (mut up, mut down) = (x0.to_vec(), x0.to_vec());
    up[i] += h;
    down[i] -= h;
    (loss(&up) - loss(&down)) / (2.0 * h)
}

/// Operands as the model produces them: `x` row-major or a transposed
/// view, `W` row-major or a transposed view.
fn operands<B: Backend>(noise: &mut NoiseSource, x_strided: bool, w_strided: bool) -> (Tensor<B, 3>, Tensor<B, 2>) {
    let device = Default::default();
    let x = match x_strided {
        false => noise.normal::<B, 3>([2, 7, 5], &device),
        true => noise.normal::<B, 3>([2, 5, 7], &device).swap_dims(1, 2),
    };
    let w = match w_strided {
        false => noise.normal::<B, 2>([5, 4], &device),
        true => noise.normal::<B, 2>([4, 5], &device).transpose(),
    };
    (x, w)
}

/// The GEMM split into blocks of rows or of columns (as with
/// `MATMUL_NUM_THREADS=1`) equals the naive triple loop, for every
/// layout, block count and a shape of each orientation.
#[test]
fn split_gemm_equals_the_naive_product() {
    let mut noise = NoiseSource::seeded(19);
    let mut matrix = |rows: usize, cols: usize| -> ndarray::Array2<f64> {
        let values: Vec<f64> = noise
            .normal::<NdArray<f64>, 1>([rows * cols], &Default::default())
            .into_data()
            .to_vec()
            .unwrap();
        ndarray::Array2::from_shape_vec((rows, cols), values).unwrap()
    };
    for (m, k, n) in [(37, 9, 70), (70, 9, 37), (16, 3, 16), (1, 4, 5), (33, 1, 2)] {
        let (a, a_t, b, b_t) = (matrix(m, k), matrix(k, m), matrix(k, n), matrix(n, k));
        for (a, b) in [
            (a.view(), b.view()),
            (a_t.t(), b.view()),
            (a.view(), b_t.t()),
            (a_t.t(), b_t.t()),
        ] {
            let naive =
                ndarray::Array2::from_shape_fn((m, n), |(i, j)| (0..k).map(|l| a[[i, l]] * b[[l, j]]).sum::<f64>());
            for parts in [1, 2, 3, 7] {
                let ours = gemm_split(a, b, parts);
                let diff = (&ours - &naive).iter().fold(0.0f64, |d, v| d.max(v.abs()));
                assert!(diff < 1e-12, "{m}x{k}x{n}, {parts} parts: {diff}");
            }
        }
    }
}

#[test]
fn the_plain_product_equals_burns_linear_for_every_layout() {
    fn check<B: Backend>(tol: f64) {
        let mut noise = NoiseSource::seeded(11);
        for (x_strided, w_strided) in [(false, false), (true, false), (false, true), (true, true)] {
            let (x, w) = operands::<B>(&mut noise, x_strided, w_strided);
            let expected = burn_linear(x.clone(), w.clone(), None);
            let ours = linear(x, w).unwrap_or_else(|_| panic!("ndarray takes the fast path"));
            let diff = rel_diff(ours, expected);
            assert!(diff < tol, "x strided {x_strided}, W strided {w_strided}: {diff}");
        }
    }
    // f64 only: a process that creates f32 ndarray tensors too switches
    // the device's default float type under the other tests (Burn 0.21);
    // the f32 path runs in melora-llama's f32 test binaries.
    check::<NdArray<f64>>(1e-14);
}

#[test]
fn gradients_equal_burns_for_every_combination_of_tracked_inputs() {
    fn check<B: burn::tensor::backend::AutodiffBackend>(tol: f64) {
        let mut noise = NoiseSource::seeded(12);
        for (x_strided, w_strided) in [(false, false), (true, true)] {
            for (x_tracked, w_tracked) in [(true, true), (true, false), (false, true), (false, false)] {
                let (x0, w0) = operands::<B>(&mut noise, x_strided, w_strided);
                let weights = noise.normal::<B, 3>([2, 7, 4], &Default::default());
                let run = |fast: bool| {
                    // Inputs as leaves (tracked or not) behind a first op, so
                    // the product's parents are intermediate nodes as in a model.
                    let (x, w) = (x0.clone(), w0.clone());
                    let x = if x_tracked { x.require_grad() } else { x };
                    let w = if w_tracked { w.require_grad() } else { w };
                    let (xi, wi) = (x.clone().mul_scalar(1.5), w.clone().mul_scalar(0.5));
                    let y = match fast {
                        true => linear(xi, wi).unwrap_or_else(|_| panic!("ndarray takes the fast path")),
                        false => burn_linear(xi, wi, None),
                    };
                    let value = y.clone().inner();
                    let grads = match x_tracked || w_tracked {
                        true => Some(y.mul(weights.clone()).sum().backward()),
                        false => None,
                    };
                    let dx = grads.as_ref().and_then(|g| x.grad(g));
                    let dw = grads.as_ref().and_then(|g| w.grad(g));
                    (value, dx, dw)
                };
                let ((v, dx, dw), (ev, edx, edw)) = (run(true), run(false));
                let case =
                    format!("x strided {x_strided} tracked {x_tracked}, W strided {w_strided} tracked {w_tracked}");
                assert!(rel_diff(v, ev) < tol, "value, {case}");
                assert_eq!(dx.is_some(), x_tracked, "dx present, {case}");
                assert_eq!(dw.is_some(), w_tracked, "dW present, {case}");
                if let (Some(dx), Some(edx)) = (dx, edx) {
                    assert!(rel_diff(dx, edx) < tol, "dx, {case}");
                }
                if let (Some(dw), Some(edw)) = (dw, edw) {
                    assert!(rel_diff(dw, edw) < tol, "dW, {case}");
                }
            }
        }
    }
    check::<Autodiff<NdArray<f64>>>(1e-14);
}

#[test]
fn the_gradient_of_x_matches_central_differences() {
    // Independent of Burn: d/dx_ij sum(R * (x W)) = (R W^T)_ij.
    type AD = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let mut noise = NoiseSource::seeded(13);
    let (x, w) = operands::<NdArray<f64>>(&mut noise, false, false);
    let r = noise.normal::<NdArray<f64>, 3>([2, 7, 4], &device);
    let loss = |v: &[f64]| -> f64 {
        let x = Tensor::<NdArray<f64>, 3>::from_data(burn::tensor::TensorData::new(v.to_vec(), [2, 7, 5]), &device);
        linear(x, w.clone()).unwrap().mul(r.clone()).sum().into_scalar()
    };
    let xa = Tensor::<AD, 3>::from_inner(x.clone()).require_grad();
    let wa = Tensor::<AD, 2>::from_inner(w.clone());
    let grads = linear(xa.clone(), wa)
        .unwrap()
        .mul(Tensor::from_inner(r.clone()))
        .sum()
        .backward();
    let dx: Vec<f64> = xa.grad(&grads).unwrap().into_data().to_vec().unwrap();
    let flat: Vec<f64> = x.clone().into_data().to_vec().unwrap();
    for i in [0, 9, 33, 69] {
        let numeric = central_difference(&loss, &flat, i);
        assert!((numeric - dx[i]).abs() < 1e-7, "element {i}: {numeric} vs {}", dx[i]);
    }
}

#[test]
fn reshape_shares_a_row_major_buffer_and_its_gradient_flows_back() {
    type AD = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let mut noise = NoiseSource::seeded(15);
    let x0 = noise.normal::<NdArray<f64>, 3>([2, 3, 4], &device);
    // Row-major: the same buffer.
    let y = reshape(x0.clone(), [6, 4]).expect("served");
    let ptr = |t: NdArrayTensor| match t {
        NdArrayTensor::F64(s) => s.view().as_ptr() as usize,
        _ => unreachable!(),
    };
    assert_eq!(
        ptr(y.clone().into_primitive().tensor()),
        ptr(x0.clone().into_primitive().tensor())
    );
    assert_eq!(y.into_data(), x0.clone().reshape([6, 4]).into_data());
    // A transposed view: copied into row-major order, as Burn does.
    let t = x0.clone().swap_dims(1, 2);
    assert_eq!(
        reshape(t.clone(), [2, 12]).expect("served").into_data(),
        t.reshape([2, 12]).into_data()
    );
    // Gradients through both layouts equal Burn's.
    let w = noise.normal::<AD, 2>([8, 6], &device);
    for transposed in [false, true] {
        let run = |fast: bool| {
            let x = Tensor::<AD, 3>::from_inner(x0.clone()).require_grad();
            let xi = if transposed {
                x.clone().mul_scalar(2.0).swap_dims(1, 2)
            } else {
                x.clone().mul_scalar(2.0)
            };
            let y: Tensor<AD, 2> = if fast {
                reshape(xi, [8, 3]).expect("served")
            } else {
                xi.reshape([8, 3])
            };
            let y = y.exp();
            let grads = y.clone().mul(w.clone().narrow(1, 0, 3)).sum().backward();
            let dx: Vec<f64> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            (y.into_data().to_vec::<f64>().unwrap(), dx)
        };
        assert_eq!(run(true), run(false), "transposed {transposed}");
    }
}

#[test]
fn rotary_matches_the_rotation_composed_from_tensor_ops() {
    type AD = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let mut noise = NoiseSource::seeded(16);
    let (batch, seq, heads, head_dim) = (2, 5, 3, 4);
    let half = head_dim / 2;
    // One table for every example (`[seq, half]`), or one per example
    // and position (`[batch * seq, half]`, answer scoring's layout).
    for per_example in [false, true] {
        let tables = if per_example { batch } else { 1 };
        let angles: Vec<f64> = noise
            .normal::<NdArray<f64>, 1>([tables * seq * half], &device)
            .mul_scalar(3.0)
            .into_data()
            .to_vec()
            .unwrap();
        let kernel = Rotary {
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            seq: tables * seq,
            head_dim,
        };
        // The reference: [x1, x2] cos + [-x2, x1] sin per head, from Burn ops.
        let table = |f: fn(f64) -> f64, sign: f64| {
            let v: Vec<f64> = (0..tables * seq)
                .flat_map(|p| (0..head_dim).map(move |i| (p, i)))
                .map(|(p, i)| {
                    let a = angles[p * half + i % half];
                    if i < half {
                        sign * f(a)
                    } else {
                        f(a)
                    }
                })
                .collect();
            Tensor::<AD, 4>::from_data(burn::tensor::TensorData::new(v, [tables, seq, 1, head_dim]), &device)
        };
        let (cos, sin) = (table(f64::cos, 1.0), table(f64::sin, -1.0));
        let x0 = noise.normal::<NdArray<f64>, 3>([batch, seq, heads * head_dim], &device);
        let weights = noise.normal::<AD, 3>([batch, seq, heads * head_dim], &device);
        let run = |fast: bool| {
            let x = Tensor::<AD, 3>::from_inner(x0.clone()).require_grad();
            let xi = x.clone().mul_scalar(1.5);
            let y = match fast {
                true => unary(xi, || kernel.clone()).expect("served"),
                false => {
                    let x4 = xi.reshape([batch, seq, heads, head_dim]);
                    let swapped = Tensor::cat(vec![x4.clone().narrow(3, half, half), x4.clone().narrow(3, 0, half)], 3);
                    x4.mul(cos.clone())
                        .add(swapped.mul(sin.clone()))
                        .reshape([batch, seq, heads * head_dim])
                }
            };
            let grads = y.clone().mul(weights.clone()).sum().backward();
            let dx: Vec<f64> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            (y.into_data().to_vec::<f64>().unwrap(), dx)
        };
        let ((y, dx), (ey, edx)) = (run(true), run(false));
        for i in 0..y.len() {
            assert!(
                (y[i] - ey[i]).abs() < 1e-12,
                "per example {per_example}: y[{i}]: {} vs {}",
                y[i],
                ey[i]
            );
            assert!(
                (dx[i] - edx[i]).abs() < 1e-12,
                "per example {per_example}: dx[{i}]: {} vs {}",
                dx[i],
                edx[i]
            );
        }
        // A rotation keeps each pair's norm.
        let x: Vec<f64> = x0.clone().into_data().to_vec().unwrap();
        let y: Vec<f64> = unary(x0, || kernel).expect("served").into_data().to_vec().unwrap();
        for (x, y) in x.chunks(head_dim).zip(y.chunks(head_dim)) {
            for i in 0..half {
                let (nx, ny) = (x[i].hypot(x[i + half]), y[i].hypot(y[i + half]));
                assert!((nx - ny).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn rms_norm_matches_the_closed_form_and_central_differences() {
    type AD = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let mut noise = NoiseSource::seeded(17);
    let (rows, d) = (6, 7);
    let gamma: Vec<f64> = noise
        .normal::<NdArray<f64>, 1>([d], &device)
        .into_data()
        .to_vec()
        .unwrap();
    let kernel = RmsNorm {
        gamma: gamma.clone().into(),
        epsilon: 1e-5,
    };
    let x0: Vec<f64> = noise
        .normal::<NdArray<f64>, 1>([rows * d], &device)
        .into_data()
        .to_vec()
        .unwrap();
    let w: Vec<f64> = noise
        .normal::<NdArray<f64>, 1>([rows * d], &device)
        .into_data()
        .to_vec()
        .unwrap();
    // Closed form, row by row, in f64.
    let loss = |x: &[f64]| -> f64 {
        x.chunks(d)
            .zip(w.chunks(d))
            .map(|(x, w)| {
                let r = (x.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-5).sqrt();
                x.iter()
                    .zip(&gamma)
                    .zip(w)
                    .map(|((x, g), w)| x / r * g * w)
                    .sum::<f64>()
            })
            .sum()
    };
    let x = Tensor::<AD, 2>::from_data(burn::tensor::TensorData::new(x0.clone(), [rows, d]), &device).require_grad();
    let y = unary(x.clone().mul_scalar(1.0), || kernel).expect("served");
    let weights = Tensor::<AD, 2>::from_data(burn::tensor::TensorData::new(w.clone(), [rows, d]), &device);
    let value: f64 = y.clone().mul(weights).sum().into_scalar();
    assert!((value - loss(&x0)).abs() < 1e-12, "{value} vs {}", loss(&x0));
    let grads = y
        .mul(Tensor::from_data(
            burn::tensor::TensorData::new(w.clone(), [rows, d]),
            &device,
        ))
        .sum()
        .backward();
    let dx: Vec<f64> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
    for i in 0..rows * d {
        let numeric = central_difference(&loss, &x0, i);
        assert!((numeric - dx[i]).abs() < 1e-7, "dx[{i}]: {numeric} vs {}", dx[i]);
    }
}

#[test]
fn batched_matmul_equals_burns_with_strided_operands() {
    type AD = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let mut noise = NoiseSource::seeded(18);
    // As in attention: q [2, 3, 4, 5] times k^T, a transposed view.
    let a0 = noise.normal::<NdArray<f64>, 4>([2, 3, 4, 5], &device);
    let b0 = noise.normal::<NdArray<f64>, 4>([2, 3, 6, 5], &device);
    let weights = noise.normal::<AD, 4>([2, 3, 4, 6], &device);
    for (a_tracked, b_tracked) in [(true, true), (true, false), (false, true)] {
        let run = |fast: bool| {
            let a = Tensor::<AD, 4>::from_inner(a0.clone());
            let b = Tensor::<AD, 4>::from_inner(b0.clone());
            let a = if a_tracked { a.require_grad() } else { a };
            let b = if b_tracked { b.require_grad() } else { b };
            let (ai, bi) = (a.clone().mul_scalar(1.5), b.clone().mul_scalar(0.5).swap_dims(2, 3));
            let y = match fast {
                true => matmul(ai, bi).expect("served"),
                false => ai.matmul(bi),
            };
            let grads = y.clone().mul(weights.clone()).sum().backward();
            let get = |t: &Tensor<AD, 4>| t.grad(&grads).map(|g| g.into_data().to_vec::<f64>().unwrap());
            (y.into_data().to_vec::<f64>().unwrap(), get(&a), get(&b))
        };
        let ((y, da, db), (ey, eda, edb)) = (run(true), run(false));
        let close = |x: &[f64], y: &[f64]| x.len() == y.len() && x.iter().zip(y).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(&y, &ey), "value, a {a_tracked} b {b_tracked}");
        assert_eq!((da.is_some(), db.is_some()), (a_tracked, b_tracked));
        if let (Some(da), Some(eda)) = (da, eda) {
            assert!(close(&da, &eda), "da");
        }
        if let (Some(db), Some(edb)) = (db, edb) {
            assert!(close(&db, &edb), "db");
        }
    }
    // Broadcast batch axes are left to Burn.
    let c = noise.normal::<NdArray<f64>, 4>([1, 3, 5, 2], &device);
    assert!(matmul(a0, c).is_err());
}

#[test]
fn other_backends_fall_back() {
    // Same crate, other integer type: not served, the inputs come back.
    type Other = NdArray<f64, i32>;
    let (x, w) = operands::<Other>(&mut NoiseSource::seeded(14), false, false);
    let (x2, w2) = linear(x.clone(), w.clone()).expect_err("falls back");
    assert_eq!(x2.into_data(), x.into_data());
    assert_eq!(w2.into_data(), w.into_data());
}

/// Every public function of the crate on a backend that is not served
/// (plain and autodiff): no fast path is entered, so nothing (the RMSNorm
/// scale included) is read back to the host, and the values equal those
/// of the served backend (`rotary` leaves the composition to its caller:
/// `Err` there). The same calls on the served backend enter one fast path
/// each, so the count does see them.
#[test]
fn a_backend_not_served_never_reaches_a_fast_path() {
    fn run<B: Backend>() -> (usize, Vec<Option<Vec<f64>>>) {
        let device = Default::default();
        let mut noise = NoiseSource::seeded(23);
        let (x, w) = operands::<B>(&mut noise, false, false);
        let mut norm = burn::nn::RmsNormConfig::new(5).init::<B>(&device);
        norm.gamma = norm.gamma.map(|g| g.mul_scalar(1.5).set_require_grad(false));
        let table: std::sync::Arc<[f64]> = (0..7 * 2).map(|i| (i as f64 * 0.3).cos()).collect();
        let a = noise.normal::<B, 3>([2, 7, 3], &device);
        let b = noise.normal::<B, 3>([2, 3, 4], &device);
        let before = FAST_PATHS.with(Cell::get);
        let outputs = [
            Some(crate::flat_linear(x.clone(), w, None)),
            Some(crate::silu(x.clone())),
            Some(crate::softmax_last(x.clone())),
            Some(crate::rms_norm(&norm, x.clone())),
            crate::rotary(x.clone().slice([0..2, 0..7, 0..4]), &table, &table, 4).ok(),
            Some(crate::matmul(a, b)),
            Some(crate::reshape::<B, 2, 3>(
                crate::reshape::<B, 3, 2>(x, [14, 5]),
                [2, 7, 5],
            )),
        ];
        let entered = FAST_PATHS.with(Cell::get) - before;
        let values = outputs
            .into_iter()
            .map(|y| y.map(|y| y.into_data().convert::<f64>().to_vec().unwrap()))
            .collect();
        (entered, values)
    }
    type Other = NdArray<f64, i32>;
    let (served, expected) = run::<NdArray<f64>>();
    assert_eq!(served, 8, "each call on the served backend enters its fast path");
    let (_, expected_ad) = run::<Autodiff<NdArray<f64>>>();
    assert_eq!(expected, expected_ad, "plain and autodiff agree");
    for (name, (entered, values)) in [("plain", run::<Other>()), ("autodiff", run::<Autodiff<Other>>())] {
        assert_eq!(entered, 0, "{name}: a fast path was entered on a backend not served");
        for (i, (ours, theirs)) in values.iter().zip(&expected).enumerate() {
            let Some(ours) = ours else {
                assert_eq!(i, 4, "{name}: only rotary leaves the composition to its caller");
                continue;
            };
            // Burn's RMSNorm takes its mean square in f32 whatever the
            // backend's precision (burn-nn `modules/norm/rms.rs`).
            let tol = if i == 3 { 1e-6 } else { 1e-12 };
            for (a, b) in ours.iter().zip(theirs.as_ref().expect("served")) {
                assert!((a - b).abs() < tol * b.abs().max(1.0), "{name}, output {i}: {a} vs {b}");
            }
        }
    }
}
