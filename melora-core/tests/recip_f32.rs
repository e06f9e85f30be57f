//! burn-ndarray's f32 reciprocal, and so the gradient of `log` (Burn's
//! autodiff computes `d log x / dx` as `recip(x)`, and `div`'s backward
//! the same way), is exact at every buffer alignment. With burn-ndarray's
//! `simd` feature it was a 12-bit approximation (`_mm256_rcp_ps`) on the
//! aligned middle of each buffer: gradients off by up to 1e-4, different
//! between processes, which broke bit-exact resume (Cargo.toml turns the
//! feature off).
//!
//! A test binary of its own: f32 and f64 ndarray tensors do not share a
//! test process here (the backend's default float type is global).

use burn::backend::{Autodiff, NdArray};
use burn::tensor::Tensor;

type F = NdArray<f32>;
type AD = Autodiff<F>;

#[test]
fn the_f32_reciprocal_and_log_gradient_are_exact() {
    let device = Default::default();
    let x: Vec<f32> = (0..1000).map(|i| 0.37 + i as f32 * 0.011).collect();
    let want: Vec<f32> = x.iter().map(|v| 1.0 / v).collect();
    // Sliced at every offset, so the buffers start at every alignment.
    // Burn's `slice` takes one range per dimension: a one-element array.
    #[allow(clippy::single_range_in_vec_init)]
    for offset in 0..8 {
        let t = Tensor::<F, 1>::from_floats(&x[..], &device).slice([offset..1000]);
        let data = (t.clone() + 0.0).recip().into_data();
        assert_eq!(data.dtype, burn::tensor::DType::F32, "an f32 computation");
        let got: Vec<f32> = data.to_vec().unwrap();
        assert_eq!(got, want[offset..], "recip at offset {offset}");
        let leaf = Tensor::<AD, 1>::from_inner(t + 0.0).require_grad();
        let grads = leaf.clone().log().sum().backward();
        let dx: Vec<f32> = leaf.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert_eq!(dx, want[offset..], "d log x / dx at offset {offset}");
    }
}
