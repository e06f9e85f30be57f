//! The model's hot operations on the ndarray backend, without Burn's copies,
//! forward and backward.
//!
//! Burn 0.21's ndarray `matmul` reshapes both operands to 3-D and the result
//! back, and its `reshape` copies even a contiguous array (the reshaped view
//! is made owned); the backward pass of `linear` also materialises `W^T`.
//! Those copies run on one thread while the GEMM threads wait, a large share
//! of a SmolLM2 training step on the CPU (`melora-bench`'s step
//! benchmarks measure it). Here:
//! - [`linear`] (`x W`, `g W^T`, `x^T g`) and [`matmul`] (batched, matching
//!   batch axes) are one strided GEMM per product (matrixmultiply, the kernel
//!   Burn's ndarray backend uses too), reading the operands where they lie
//!   and writing a fresh row-major result (`gemm`);
//! - [`reshape`] is a view of the same buffer when the tensor is row-major;
//! - [`unary`] runs a [`Unary`] kernel (SiLU, softmax, RMSNorm with a frozen
//!   scale, RoPE) in one pass split over rayon's threads, saving what its
//!   backward pass (one more pass) needs (`elementwise`).
//!
//! Each is a [`FastPath`], taken through [`dispatch`] when the backend is
//! `NdArray<f32 | f64>` or `Autodiff` of it, found by `TypeId`, so the model
//! code stays generic over `B: Backend`; any other backend gets `Err` back
//! with its inputs untouched, before anything is read, and the caller (the
//! crate's functions) composes Burn's ops. The `autodiff` module holds each
//! operation's plain and tracked forms and its backward step. Values and
//! gradients equal Burn's or the closed forms (`tests`), up to summation
//! order.

mod autodiff;
mod elementwise;
mod gemm;
#[cfg(test)]
mod tests;

pub(crate) use elementwise::{RmsNorm, Rotary, Silu, Softmax, Unary};

use autodiff::{BilinearOp, ReshapeOp, UnaryOp};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_ndarray::{NdArray, NdArrayTensor};
use gemm::{BatchedProduct, LinearProduct};
use std::any::{Any, TypeId};

/// A backend whose float tensors are ndarray's: `NdArray<E>` itself, the
/// inner backend of `Autodiff<NdArray<E>>`.
pub(crate) trait NdBackend: Backend<FloatTensorPrimitive = NdArrayTensor> {}

impl<NB: Backend<FloatTensorPrimitive = NdArrayTensor>> NdBackend for NB {}

/// An operation with a fast path on `B` when `B` is one of the backends
/// served. `Input` comes back untouched when the path is not taken.
pub(crate) trait FastPath<B: Backend> {
    type Input;
    type Output;
    /// `B` is `NB`, a plain ndarray backend.
    fn plain<NB: NdBackend>(self, input: Self::Input) -> Result<Self::Output, Self::Input>;
    /// `B` is `Autodiff<NB>`.
    fn tracked<NB: NdBackend>(self, input: Self::Input) -> Result<Self::Output, Self::Input>;
}

/// `op` on `input`: its plain or tracked form for the four backends served,
/// `Err(input)` for every other, the operation not touched.
fn dispatch<B: Backend, F: FastPath<B>>(op: F, input: F::Input) -> Result<F::Output, F::Input> {
    let id = TypeId::of::<B>();
    let served = if id == TypeId::of::<NdArray<f32>>() {
        op.plain::<NdArray<f32>>(input)
    } else if id == TypeId::of::<NdArray<f64>>() {
        op.plain::<NdArray<f64>>(input)
    } else if id == TypeId::of::<Autodiff<NdArray<f32>>>() {
        op.tracked::<NdArray<f32>>(input)
    } else if id == TypeId::of::<Autodiff<NdArray<f64>>>() {
        op.tracked::<NdArray<f64>>(input)
    } else {
        return Err(input);
    };
    #[cfg(test)]
    tests::FAST_PATHS.with(|n| n.set(n.get() + 1));
    served
}

/// `x W` for `x` `[.., d_in]` and `W` `[d_in, d_out]`: `Ok` with the product
/// when `B` is one of the backends served, otherwise `Err` with the inputs
/// untouched (the caller then uses Burn's `linear`).
#[allow(clippy::type_complexity)]
pub(crate) fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 2>)> {
    dispatch(BilinearOp(LinearProduct), (x, weight))
}

/// `a b` over matching batch axes, `[.., m, k] x [.., k, n]`, each product
/// one strided GEMM (the batches split over rayon's threads): `Ok` on the
/// backends served, `Err` with the inputs when the batch axes differ
/// (broadcasting is left to Burn) or the backend is another.
#[allow(clippy::type_complexity)]
pub(crate) fn matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    let (da, db) = (a.dims(), b.dims());
    if D < 2 || da[..D - 2] != db[..D - 2] || da[D - 1] != db[D - 2] {
        return Err((a, b));
    }
    dispatch(BilinearOp(BatchedProduct), (a, b))
}

/// The kernel `kernel()` builds, applied to `x` in one parallel pass (and
/// its backward pass in one more): `Ok` on the backends served, otherwise
/// `Err(x)`. `kernel` runs only on the path taken, so what it reads (a
/// frozen scale, copied to the host) is never read on another backend.
pub(crate) fn unary<B: Backend, K: Unary, const D: usize>(
    x: Tensor<B, D>,
    kernel: impl FnOnce() -> K,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    dispatch(UnaryOp::new(kernel), x)
}

/// `x` with a new shape of the same size: a view of the same buffer when
/// `x` is row-major (Burn's ndarray `reshape` copies even then); `Ok` on the
/// backends served, otherwise `Err(x)`.
pub(crate) fn reshape<B: Backend, const D1: usize, const D2: usize>(
    x: Tensor<B, D1>,
    shape: [usize; D2],
) -> Result<Tensor<B, D2>, Tensor<B, D1>> {
    assert_eq!(
        x.shape().num_elements(),
        shape.iter().product::<usize>(),
        "reshape {:?} to {shape:?}: sizes differ",
        x.dims()
    );
    dispatch(ReshapeOp(shape), x)
}

/// Moves `value` to the type it is known (by `TypeId`) to have.
fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<U>()
        .expect("the TypeId was checked")
}

/// `t`, whose backend is known to be `T`, as `T`'s float primitive.
fn into_primitive<B: Backend, T: Backend, const D: usize>(t: Tensor<B, D>) -> T::FloatTensorPrimitive {
    cast::<_, Tensor<T, D>>(t).into_primitive().tensor()
}

/// `T`'s float primitive as a tensor of `B`, known to be `T`.
fn from_primitive<B: Backend, T: Backend, const D: usize>(p: T::FloatTensorPrimitive) -> Tensor<B, D> {
    cast(Tensor::<T, D>::from_primitive(TensorPrimitive::Float(p)))
}
