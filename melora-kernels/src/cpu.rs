//! The model's hot operations on the ndarray backend, without Burn's copies,
//! forward and backward.
//!
//! Burn 0.21's ndarray `matmul` reshapes both operands to 3-D and the result
//! back, and its `reshape` copies even a contiguous array (the reshaped view
//! is made owned); the backward pass of `linear` also materialises `W^T`.
//! Those copies ran on one thread while the GEMM threads waited: in a SmolLM2
//! training step they were a third of the main thread's time. Here:
//! - [`linear`] (`x W`, `g W^T`, `x^T g`) and [`matmul`] (batched, matching
//!   batch axes) are one strided GEMM per product (matrixmultiply, the kernel
//!   Burn's ndarray backend uses too), reading the operands where they lie
//!   and writing a fresh row-major result;
//! - [`reshape`] is a view of the same buffer when the tensor is row-major;
//! - [`unary`] runs a [`Unary`] kernel (SiLU, softmax, RMSNorm with a frozen
//!   scale, RoPE) in one pass split over rayon's threads, saving what its
//!   backward pass (one more pass) needs.
//!
//! Each takes this path when the backend is `NdArray<f32 | f64>` or
//! `Autodiff` of it, found by `TypeId`, so the model code stays generic over
//! `B: Backend`; any other backend gets `Err` back and the caller (the
//! crate's functions) composes Burn's ops. Values and gradients equal Burn's or
//! the closed forms (tests below), up to summation order.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};
use burn_ndarray::{NdArray, NdArrayTensor, SharedArray};
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, CowArray, Ix2, IxDyn};
use rayon::prelude::*;
use std::any::{Any, TypeId};

/// The backends served, found by `TypeId`.
enum Served {
    Plain32,
    Plain64,
    Tracked32,
    Tracked64,
    Other,
}

fn served<B: Backend>() -> Served {
    let id = TypeId::of::<B>();
    if id == TypeId::of::<NdArray<f32>>() {
        Served::Plain32
    } else if id == TypeId::of::<NdArray<f64>>() {
        Served::Plain64
    } else if id == TypeId::of::<Autodiff<NdArray<f32>>>() {
        Served::Tracked32
    } else if id == TypeId::of::<Autodiff<NdArray<f64>>>() {
        Served::Tracked64
    } else {
        Served::Other
    }
}

/// `x W` for `x` `[.., d_in]` and `W` `[d_in, d_out]`: `Ok` with the product
/// when `B` is one of the backends this module serves, otherwise `Err` with
/// the inputs untouched (the caller then uses Burn's `linear`).
#[allow(clippy::type_complexity)]
pub(crate) fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 2>)> {
    bilinear(x, weight, LinearProduct)
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
    bilinear(a, b, BatchedProduct)
}

/// A product of two tensors with its two gradients, on ndarray tensors
/// (`None` unless both operands are f32 or both f64).
trait Bilinear: Copy + Send + Sync + std::fmt::Debug + 'static {
    fn forward(self, a: &NdArrayTensor, b: &NdArrayTensor) -> Option<NdArrayTensor>;
    /// `dL/da` from the output gradient `g` and `b`.
    fn grad_a(self, g: &NdArrayTensor, b: &NdArrayTensor) -> Option<NdArrayTensor>;
    /// `dL/db` from `a` and the output gradient `g`.
    fn grad_b(self, a: &NdArrayTensor, g: &NdArrayTensor) -> Option<NdArrayTensor>;
}

/// A linear layer: `x W`, `dx = g W^T`, `dW = x^T g`.
#[derive(Debug, Clone, Copy)]
struct LinearProduct;

impl Bilinear for LinearProduct {
    fn forward(self, x: &NdArrayTensor, w: &NdArrayTensor) -> Option<NdArrayTensor> {
        Product::Forward.apply(x, w)
    }
    fn grad_a(self, g: &NdArrayTensor, w: &NdArrayTensor) -> Option<NdArrayTensor> {
        Product::GradInput.apply(g, w)
    }
    fn grad_b(self, x: &NdArrayTensor, g: &NdArrayTensor) -> Option<NdArrayTensor> {
        Product::GradWeight.apply(x, g)
    }
}

/// A batched product: `a b`, `da = g b^T`, `db = a^T g` per batch.
#[derive(Debug, Clone, Copy)]
struct BatchedProduct;

impl Bilinear for BatchedProduct {
    fn forward(self, a: &NdArrayTensor, b: &NdArrayTensor) -> Option<NdArrayTensor> {
        batched(a, b, false, false)
    }
    fn grad_a(self, g: &NdArrayTensor, b: &NdArrayTensor) -> Option<NdArrayTensor> {
        batched(g, b, false, true)
    }
    fn grad_b(self, a: &NdArrayTensor, g: &NdArrayTensor) -> Option<NdArrayTensor> {
        batched(a, g, true, false)
    }
}

/// `kernel`'s product of `a` (rank `DA`, the output's rank) and `b`.
#[allow(clippy::type_complexity)]
fn bilinear<B: Backend, K: Bilinear, const DA: usize, const DB: usize>(
    a: Tensor<B, DA>,
    b: Tensor<B, DB>,
    kernel: K,
) -> Result<Tensor<B, DA>, (Tensor<B, DA>, Tensor<B, DB>)> {
    match served::<B>() {
        Served::Plain32 => bilinear_plain::<B, NdArray<f32>, K, DA, DB>(a, b, kernel),
        Served::Plain64 => bilinear_plain::<B, NdArray<f64>, K, DA, DB>(a, b, kernel),
        Served::Tracked32 => bilinear_tracked::<B, NdArray<f32>, K, DA, DB>(a, b, kernel),
        Served::Tracked64 => bilinear_tracked::<B, NdArray<f64>, K, DA, DB>(a, b, kernel),
        Served::Other => Err((a, b)),
    }
}

/// `B` is `NdArray<..>`, the backend `NB`.
#[allow(clippy::type_complexity)]
fn bilinear_plain<
    B: Backend,
    NB: Backend<FloatTensorPrimitive = NdArrayTensor>,
    K: Bilinear,
    const DA: usize,
    const DB: usize,
>(
    a: Tensor<B, DA>,
    b: Tensor<B, DB>,
    kernel: K,
) -> Result<Tensor<B, DA>, (Tensor<B, DA>, Tensor<B, DB>)> {
    let (ap, bp) = (
        primitive::<NB, DA>(cast(a.clone())),
        primitive::<NB, DB>(cast(b.clone())),
    );
    match kernel.forward(&ap, &bp) {
        Some(out) => Ok(cast(Tensor::<NB, DA>::from_primitive(TensorPrimitive::Float(out)))),
        None => Err((a, b)),
    }
}

/// `B` is `Autodiff<NB>`.
#[allow(clippy::type_complexity)]
fn bilinear_tracked<
    B: Backend,
    NB: Backend<FloatTensorPrimitive = NdArrayTensor>,
    K: Bilinear,
    const DA: usize,
    const DB: usize,
>(
    a: Tensor<B, DA>,
    b: Tensor<B, DB>,
    kernel: K,
) -> Result<Tensor<B, DA>, (Tensor<B, DA>, Tensor<B, DB>)> {
    let (ap, bp) = (
        primitive::<Autodiff<NB>, DA>(cast(a.clone())),
        primitive::<Autodiff<NB>, DB>(cast(b.clone())),
    );
    let Some(out) = kernel.forward(&ap.primitive, &bp.primitive) else {
        return Err((a, b));
    };
    let out = match BilinearBackward(kernel)
        .prepare::<NoCheckpointing>([ap.node.clone(), bp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            // a is needed for b's gradient only, and b for a's.
            let a_state = bp.is_tracked().then(|| prep.checkpoint(&ap));
            let b_state = ap.is_tracked().then(|| prep.checkpoint(&bp));
            prep.finish((a_state, b_state), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(cast(Tensor::<Autodiff<NB>, DA>::from_primitive(
        TensorPrimitive::Float(out),
    )))
}

/// The backward step of [`bilinear_tracked`].
#[derive(Debug)]
struct BilinearBackward<K>(K);

impl<NB: Backend<FloatTensorPrimitive = NdArrayTensor>, K: Bilinear> Backward<NB, 2> for BilinearBackward<K> {
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let grad = grads.consume::<NB>(&ops.node);
        let (a_state, b_state) = ops.state;
        // The gradient has the output's element type, which is the operands'.
        if let Some(node) = node_a {
            let b: NdArrayTensor = checkpointer.retrieve_node_output(b_state.expect("b is kept when a is tracked"));
            grads.register::<NB>(
                node.id,
                self.0.grad_a(&grad, &b).expect("operands and gradient of one dtype"),
            );
        }
        if let Some(node) = node_b {
            let a: NdArrayTensor = checkpointer.retrieve_node_output(a_state.expect("a is kept when b is tracked"));
            grads.register::<NB>(
                node.id,
                self.0.grad_b(&a, &grad).expect("operands and gradient of one dtype"),
            );
        }
    }
}

/// `op(a) op(b)` per batch, `op` transposing the last two axes when asked;
/// `None` unless both are f32 or both f64.
fn batched(a: &NdArrayTensor, b: &NdArrayTensor, ta: bool, tb: bool) -> Option<NdArrayTensor> {
    fn run<E: Elem>(a: ArrayViewD<'_, E>, b: ArrayViewD<'_, E>, ta: bool, tb: bool) -> ArrayD<E>
    where
        NdArrayTensor: From<SharedArray<E>>,
    {
        let nd = a.ndim();
        // (rows, cols, row stride, col stride) of each operand's matrices.
        let matrix = |v: &ArrayViewD<'_, E>, t: bool| {
            let (sh, st) = (v.shape(), v.strides());
            let m = (sh[nd - 2], sh[nd - 1], st[nd - 2], st[nd - 1]);
            if t {
                (m.1, m.0, m.3, m.2)
            } else {
                m
            }
        };
        let ((m, k, rsa, csa), (k2, n, rsb, csb)) = (matrix(&a, ta), matrix(&b, tb));
        assert_eq!(k, k2, "inner dimensions differ");
        let batch: Vec<usize> = a.shape()[..nd - 2].to_vec();
        let offset = |v: &ArrayViewD<'_, E>, mut i: usize| {
            let mut off = 0isize;
            for d in (0..nd - 2).rev() {
                off += (i % batch[d]) as isize * v.strides()[d];
                i /= batch[d];
            }
            off
        };
        let count: usize = batch.iter().product();
        let mut out = vec![E::ZERO; count * m * n];
        if m * n > 0 {
            out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
                if k == 0 {
                    return;
                }
                // SAFETY: the offsets and strides address elements of the
                // views (batch index i, then the matrix); `c` is one m x n
                // row-major block, written with beta = 0.
                unsafe {
                    E::gemm(
                        m,
                        k,
                        n,
                        a.as_ptr().offset(offset(&a, i)),
                        rsa,
                        csa,
                        b.as_ptr().offset(offset(&b, i)),
                        rsb,
                        csb,
                        c.as_mut_ptr(),
                        n as isize,
                    )
                }
            });
        }
        let mut shape = batch;
        shape.extend([m, n]);
        ArrayD::from_shape_vec(IxDyn(&shape), out).expect("sizes agree")
    }
    match (a, b) {
        (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) => {
            Some(NdArrayTensor::from(run(a.view(), b.view(), ta, tb).into_shared()))
        }
        (NdArrayTensor::F64(a), NdArrayTensor::F64(b)) => {
            Some(NdArrayTensor::from(run(a.view(), b.view(), ta, tb).into_shared()))
        }
        _ => None,
    }
}

/// `kernel` applied to `x` in one parallel pass (and its backward pass in
/// one more): `Ok` on the backends served, otherwise `Err(x)`.
pub(crate) fn unary<B: Backend, K: Unary, const D: usize>(
    x: Tensor<B, D>,
    kernel: K,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    match served::<B>() {
        Served::Plain32 => unary_plain::<B, NdArray<f32>, K, D>(x, kernel),
        Served::Plain64 => unary_plain::<B, NdArray<f64>, K, D>(x, kernel),
        Served::Tracked32 => unary_tracked::<B, NdArray<f32>, K, D>(x, kernel),
        Served::Tracked64 => unary_tracked::<B, NdArray<f64>, K, D>(x, kernel),
        Served::Other => Err(x),
    }
}

fn unary_plain<B: Backend, NB: Backend<FloatTensorPrimitive = NdArrayTensor>, K: Unary, const D: usize>(
    x: Tensor<B, D>,
    kernel: K,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let xp = primitive::<NB, D>(cast(x.clone()));
    match unary_forward(&kernel, &xp, false) {
        Some((out, _)) => Ok(cast(Tensor::<NB, D>::from_primitive(TensorPrimitive::Float(out)))),
        None => Err(x),
    }
}

fn unary_tracked<B: Backend, NB: Backend<FloatTensorPrimitive = NdArrayTensor>, K: Unary, const D: usize>(
    x: Tensor<B, D>,
    kernel: K,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let xp = primitive::<Autodiff<NB>, D>(cast(x.clone()));
    let Some((out, saved)) = unary_forward(
        &kernel,
        &xp.primitive,
        kernel.saves() != Saves::Nothing && xp.is_tracked(),
    ) else {
        return Err(x);
    };
    let out = match UnaryBackward(kernel)
        .prepare::<NoCheckpointing>([xp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(saved, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(cast(Tensor::<Autodiff<NB>, D>::from_primitive(TensorPrimitive::Float(
        out,
    ))))
}

/// `x` with a new shape of the same size: a view of the same buffer when
/// `x` is row-major (Burn's ndarray `reshape` copies even then); `Ok` on the
/// backends served, otherwise `Err(x)`.
pub(crate) fn reshape<B: Backend, const D1: usize, const D2: usize>(
    x: Tensor<B, D1>,
    shape: [usize; D2],
) -> Result<Tensor<B, D2>, Tensor<B, D1>> {
    fn plain<B: Backend, NB: Backend<FloatTensorPrimitive = NdArrayTensor>, const D1: usize, const D2: usize>(
        x: Tensor<B, D1>,
        shape: [usize; D2],
    ) -> Result<Tensor<B, D2>, Tensor<B, D1>> {
        match reshaped(primitive::<NB, D1>(cast(x.clone())), &shape) {
            Some(out) => Ok(cast(Tensor::<NB, D2>::from_primitive(TensorPrimitive::Float(out)))),
            None => Err(x),
        }
    }
    fn tracked<B: Backend, NB: Backend<FloatTensorPrimitive = NdArrayTensor>, const D1: usize, const D2: usize>(
        x: Tensor<B, D1>,
        shape: [usize; D2],
    ) -> Result<Tensor<B, D2>, Tensor<B, D1>> {
        let xp = primitive::<Autodiff<NB>, D1>(cast(x.clone()));
        let input_shape = xp.primitive.shape().to_vec();
        let Some(out) = reshaped(xp.primitive.clone(), &shape) else {
            return Err(x);
        };
        let out = match ReshapeBackward
            .prepare::<NoCheckpointing>([xp.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(input_shape, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Ok(cast(Tensor::<Autodiff<NB>, D2>::from_primitive(
            TensorPrimitive::Float(out),
        )))
    }
    assert_eq!(
        x.shape().num_elements(),
        shape.iter().product::<usize>(),
        "reshape {:?} to {shape:?}: sizes differ",
        x.dims()
    );
    match served::<B>() {
        Served::Plain32 => plain::<B, NdArray<f32>, D1, D2>(x, shape),
        Served::Plain64 => plain::<B, NdArray<f64>, D1, D2>(x, shape),
        Served::Tracked32 => tracked::<B, NdArray<f32>, D1, D2>(x, shape),
        Served::Tracked64 => tracked::<B, NdArray<f64>, D1, D2>(x, shape),
        Served::Other => Err(x),
    }
}

/// `x` reshaped: the same buffer when row-major, else a row-major copy.
fn reshaped(x: NdArrayTensor, shape: &[usize]) -> Option<NdArrayTensor> {
    fn run<E: Elem>(a: SharedArray<E>, shape: &[usize]) -> NdArrayTensor
    where
        NdArrayTensor: From<SharedArray<E>>,
    {
        let a = match a.is_standard_layout() {
            true => a,
            false => a.as_standard_layout().into_owned().into_shared(),
        };
        NdArrayTensor::from(a.into_shape_with_order(IxDyn(shape)).expect("row-major, same size"))
    }
    match x {
        NdArrayTensor::F32(x) => Some(run(x.into_shared(), shape)),
        NdArrayTensor::F64(x) => Some(run(x.into_shared(), shape)),
        _ => None,
    }
}

/// The backward step of [`reshape`]: the gradient reshaped back.
#[derive(Debug)]
struct ReshapeBackward;

impl<NB: Backend<FloatTensorPrimitive = NdArrayTensor>> Backward<NB, 1> for ReshapeBackward {
    type State = Vec<usize>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<NB>(&ops.node);
        if let Some(node) = node {
            let dx = match reshaped(grad.clone(), &ops.state) {
                Some(dx) => dx,
                None => NB::float_reshape(grad, ops.state.into()),
            };
            grads.register::<NB>(node.id, dx);
        }
    }
}

/// The backward step of [`unary_tracked`]; its state is what the kernel saved.
#[derive(Debug)]
struct UnaryBackward<K>(K);

impl<NB: Backend<FloatTensorPrimitive = NdArrayTensor>, K: Unary> Backward<NB, 1> for UnaryBackward<K> {
    type State = Option<NdArrayTensor>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<NB>(&ops.node);
        if let Some(node) = node {
            let dx = unary_backward(&self.0, ops.state.as_ref(), &grad).expect("the gradient has the forward's dtype");
            grads.register::<NB>(node.id, dx);
        }
    }
}

/// A function applied row by row (a row may be one element), with its
/// derivative, on contiguous slices of whole rows.
pub(crate) trait Unary: Send + Sync + std::fmt::Debug + 'static {
    /// Elements per independent row (1 for an element-wise function).
    fn row(&self, shape: &[usize]) -> usize;
    /// What the backward pass needs from the forward pass.
    fn saves(&self) -> Saves {
        Saves::Buffer
    }
    /// `y = f(x)` on the rows `first_row ..` of the tensor; fills `saved`
    /// (same length; given when [`Unary::saves`] is `Buffer` and the input
    /// is tracked) with what [`Unary::backward`] needs.
    fn forward<E: Elem>(&self, row: usize, first_row: usize, x: &[E], y: &mut [E], saved: Option<&mut [E]>);
    /// `dx` from the output gradient `g` (and the saved rows, if any).
    fn backward<E: Elem>(&self, row: usize, first_row: usize, saved: Option<&[E]>, g: &[E], dx: &mut [E]);
}

/// What a [`Unary`] kernel keeps for its backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Saves {
    /// Nothing (the backward pass needs only the gradient).
    Nothing,
    /// A buffer the size of the input, filled by the forward pass.
    Buffer,
    /// The output itself (shared, not copied).
    Output,
}

/// A multiple of `row`, so that every task gets whole rows.
fn block(len: usize, row: usize) -> usize {
    let row = row.max(1);
    ((65536 / row).max(1) * row).min(len.max(row))
}

fn unary_forward<K: Unary>(
    kernel: &K,
    x: &NdArrayTensor,
    save: bool,
) -> Option<(NdArrayTensor, Option<NdArrayTensor>)> {
    fn run<E: Elem, K: Unary>(kernel: &K, x: ArrayViewD<'_, E>, save: bool) -> (NdArrayTensor, Option<NdArrayTensor>)
    where
        NdArrayTensor: From<SharedArray<E>>,
    {
        let shape = x.shape().to_vec();
        let x = x.as_standard_layout();
        let x = x.as_slice().expect("row-major");
        let row = kernel.row(&shape);
        let block = block(x.len(), row);
        let mut y = vec![E::ZERO; x.len()];
        let saved = match save {
            true => {
                let mut saved = vec![E::ZERO; x.len()];
                y.par_chunks_mut(block)
                    .zip(saved.par_chunks_mut(block))
                    .zip(x.par_chunks(block))
                    .enumerate()
                    .for_each(|(i, ((y, saved), x))| kernel.forward(row, i * block / row, x, y, Some(saved)));
                Some(saved)
            }
            false => {
                y.par_chunks_mut(block)
                    .zip(x.par_chunks(block))
                    .enumerate()
                    .for_each(|(i, (y, x))| kernel.forward(row, i * block / row, x, y, None));
                None
            }
        };
        let wrap = |v: Vec<E>| {
            NdArrayTensor::from(
                ArrayD::from_shape_vec(IxDyn(&shape), v)
                    .expect("sizes agree")
                    .into_shared(),
            )
        };
        (wrap(y), saved.map(wrap))
    }
    // Whether the forward pass fills a buffer for the backward pass.
    let buffer = save && kernel.saves() == Saves::Buffer;
    let (y, saved) = match x {
        NdArrayTensor::F32(x) => run(kernel, x.view(), buffer),
        NdArrayTensor::F64(x) => run(kernel, x.view(), buffer),
        _ => return None,
    };
    let saved = match save && kernel.saves() == Saves::Output {
        true => Some(y.clone()),
        false => saved,
    };
    Some((y, saved))
}

fn unary_backward<K: Unary>(kernel: &K, saved: Option<&NdArrayTensor>, grad: &NdArrayTensor) -> Option<NdArrayTensor> {
    fn run<E: Elem, K: Unary>(kernel: &K, saved: Option<ArrayViewD<'_, E>>, g: ArrayViewD<'_, E>) -> NdArrayTensor
    where
        NdArrayTensor: From<SharedArray<E>>,
    {
        let shape = g.shape().to_vec();
        let g = g.as_standard_layout();
        let g = g.as_slice().expect("row-major");
        let saved = saved.as_ref().map(|s| s.as_standard_layout());
        let saved = saved.as_ref().map(|s| s.as_slice().expect("row-major"));
        let row = kernel.row(&shape);
        let block = block(g.len(), row);
        let mut dx = vec![E::ZERO; g.len()];
        dx.par_chunks_mut(block)
            .zip(g.par_chunks(block))
            .enumerate()
            .for_each(|(i, (dx, g))| {
                let saved = saved.map(|s| &s[i * block..i * block + g.len()]);
                kernel.backward(row, i * block / row, saved, g, dx)
            });
        NdArrayTensor::from(
            ArrayD::from_shape_vec(IxDyn(&shape), dx)
                .expect("sizes agree")
                .into_shared(),
        )
    }
    match (saved, grad) {
        (Some(NdArrayTensor::F32(s)), NdArrayTensor::F32(g)) => Some(run(kernel, Some(s.view()), g.view())),
        (Some(NdArrayTensor::F64(s)), NdArrayTensor::F64(g)) => Some(run(kernel, Some(s.view()), g.view())),
        (None, NdArrayTensor::F32(g)) if kernel.saves() == Saves::Nothing => {
            Some(run::<f32, K>(kernel, None, g.view()))
        }
        (None, NdArrayTensor::F64(g)) if kernel.saves() == Saves::Nothing => {
            Some(run::<f64, K>(kernel, None, g.view()))
        }
        _ => None,
    }
}

/// SiLU, `y = x s` with `s = 1 / (1 + e^-x)`; saves `dy/dx = s + y (1 - s)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Silu;

impl Unary for Silu {
    fn row(&self, _shape: &[usize]) -> usize {
        1
    }
    fn forward<E: Elem>(&self, _row: usize, _first_row: usize, x: &[E], y: &mut [E], saved: Option<&mut [E]>) {
        match saved {
            Some(slope) => {
                for ((y, slope), &x) in y.iter_mut().zip(slope.iter_mut()).zip(x) {
                    let s = E::ONE / (E::ONE + (-x).exp());
                    *y = x * s;
                    *slope = s + *y * (E::ONE - s);
                }
            }
            None => {
                // The same rounding as above: training and evaluation agree.
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * (E::ONE / (E::ONE + (-x).exp()));
                }
            }
        }
    }
    fn backward<E: Elem>(&self, _row: usize, _first_row: usize, slope: Option<&[E]>, g: &[E], dx: &mut [E]) {
        let slope = slope.expect("SiLU saves its slope");
        for ((dx, &slope), &g) in dx.iter_mut().zip(slope).zip(g) {
            *dx = g * slope;
        }
    }
}

/// Softmax over the last axis; keeps the output `y` (shared), and the backward pass
/// is `dx = y (g - sum(g y))` per row. The same arithmetic as Burn's
/// `softmax` (`exp(x - max) / sum`), so a row that is all `-inf` gives NaN
/// as Burn's does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Softmax;

impl Unary for Softmax {
    fn row(&self, shape: &[usize]) -> usize {
        *shape.last().unwrap_or(&1)
    }
    fn saves(&self) -> Saves {
        Saves::Output
    }
    fn forward<E: Elem>(&self, row: usize, _first_row: usize, x: &[E], y: &mut [E], _saved: Option<&mut [E]>) {
        for (y, x) in y.chunks_mut(row).zip(x.chunks(row)) {
            let max = x.iter().fold(E::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            let mut sum = E::ZERO;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum = sum + *y;
            }
            for y in y.iter_mut() {
                *y = *y / sum;
            }
        }
    }
    fn backward<E: Elem>(&self, row: usize, _first_row: usize, y: Option<&[E]>, g: &[E], dx: &mut [E]) {
        let y = y.expect("softmax saves its output");
        for ((dx, y), g) in dx.chunks_mut(row).zip(y.chunks(row)).zip(g.chunks(row)) {
            let dot = y.iter().zip(g).fold(E::ZERO, |acc, (&y, &g)| acc + y * g);
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
            }
        }
    }
}

/// RMSNorm over the last axis with a frozen scale: `y = x / r * gamma`,
/// `r = sqrt(mean(x^2) + eps)` (the mean accumulated in f64); saves `x`.
/// Backward: `dx = (gamma g - x̂ mean(gamma g x̂)) / r` with `x̂ = x / r`.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    pub gamma: std::sync::Arc<[f64]>,
    pub epsilon: f64,
}

impl RmsNorm {
    fn rms<E: Elem>(&self, x: &[E]) -> f64 {
        let ms = x.iter().map(|&v| v.to_f64() * v.to_f64()).sum::<f64>() / x.len() as f64;
        (ms + self.epsilon).sqrt()
    }
}

impl Unary for RmsNorm {
    fn row(&self, shape: &[usize]) -> usize {
        *shape.last().unwrap_or(&1)
    }
    fn forward<E: Elem>(&self, row: usize, _first_row: usize, x: &[E], y: &mut [E], saved: Option<&mut [E]>) {
        for (x, y) in x.chunks(row).zip(y.chunks_mut(row)) {
            let r = E::from_f64(self.rms(x));
            for ((y, &x), &gamma) in y.iter_mut().zip(x).zip(self.gamma.iter()) {
                *y = x / r * E::from_f64(gamma);
            }
        }
        if let Some(saved) = saved {
            saved.copy_from_slice(x);
        }
    }
    fn backward<E: Elem>(&self, row: usize, _first_row: usize, x: Option<&[E]>, g: &[E], dx: &mut [E]) {
        let x = x.expect("RMSNorm saves its input");
        for ((x, g), dx) in x.chunks(row).zip(g.chunks(row)).zip(dx.chunks_mut(row)) {
            let r = self.rms(x);
            let dot = x
                .iter()
                .zip(g)
                .zip(self.gamma.iter())
                .map(|((&x, &g), &gamma)| gamma * g.to_f64() * x.to_f64() / r)
                .sum::<f64>()
                / row as f64;
            for (((dx, &x), &g), &gamma) in dx.iter_mut().zip(x).zip(g).zip(self.gamma.iter()) {
                *dx = E::from_f64((gamma * g.to_f64() - x.to_f64() / r * dot) / r);
            }
        }
    }
}

/// Rotary position embedding (Llama's half-split layout) on rows of
/// `[.., seq, heads * head_dim]`: in each head, `(x1, x2) -> (x1 c - x2 s,
/// x2 c + x1 s)` with `c`, `s` the cosines and sines of the row's position
/// (`[seq, head_dim / 2]`, row-major, the same for every example; or
/// `[batch * seq, head_dim / 2]`, one row per token, with `seq` set to
/// `batch * seq`). The backward pass is the inverse rotation of the
/// gradient; nothing is saved.
#[derive(Debug, Clone)]
pub(crate) struct Rotary {
    pub cos: std::sync::Arc<[f64]>,
    pub sin: std::sync::Arc<[f64]>,
    pub seq: usize,
    pub head_dim: usize,
}

impl Rotary {
    /// Calls `f(x1, x2, out1, out2, c, s)` for every head of every row.
    fn each_head<E: Elem>(
        &self,
        row: usize,
        first_row: usize,
        x: &[E],
        out: &mut [E],
        f: impl Fn(E, E, E, E) -> (E, E),
    ) {
        let half = self.head_dim / 2;
        for (r, (x, out)) in x.chunks(row).zip(out.chunks_mut(row)).enumerate() {
            let p = (first_row + r) % self.seq;
            let (cos, sin) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
            for (x, out) in x.chunks(self.head_dim).zip(out.chunks_mut(self.head_dim)) {
                let (x1, x2) = x.split_at(half);
                let (o1, o2) = out.split_at_mut(half);
                for i in 0..half {
                    (o1[i], o2[i]) = f(x1[i], x2[i], E::from_f64(cos[i]), E::from_f64(sin[i]));
                }
            }
        }
    }
}

impl Unary for Rotary {
    fn row(&self, shape: &[usize]) -> usize {
        *shape.last().unwrap_or(&1)
    }
    fn saves(&self) -> Saves {
        Saves::Nothing
    }
    fn forward<E: Elem>(&self, row: usize, first_row: usize, x: &[E], y: &mut [E], _saved: Option<&mut [E]>) {
        self.each_head(row, first_row, x, y, |x1, x2, c, s| (x1 * c - x2 * s, x2 * c + x1 * s));
    }
    fn backward<E: Elem>(&self, row: usize, first_row: usize, _saved: Option<&[E]>, g: &[E], dx: &mut [E]) {
        self.each_head(row, first_row, g, dx, |g1, g2, c, s| (g1 * c + g2 * s, g2 * c - g1 * s));
    }
}

/// Moves `value` to the type it is known (by `TypeId`) to have.
fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<U>()
        .expect("the TypeId was checked")
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

/// The three products of a linear layer, on `[.., k]` activations and
/// `[k, n]` weights.
#[derive(Debug, Clone, Copy)]
enum Product {
    /// `x W`: `[.., k] x [k, n] -> [.., n]`.
    Forward,
    /// `g W^T`: `[.., n] x [k, n] -> [.., k]`.
    GradInput,
    /// `x^T g` summed over the leading axes: `[.., k] x [.., n] -> [k, n]`.
    GradWeight,
}

impl Product {
    /// The product in the operands' element type (f32 or f64, both alike);
    /// `None` for any other pair.
    fn apply(self, a: &NdArrayTensor, b: &NdArrayTensor) -> Option<NdArrayTensor> {
        match (a, b) {
            (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) => {
                Some(NdArrayTensor::from(self.run(a.view(), b.view()).into_shared()))
            }
            (NdArrayTensor::F64(a), NdArrayTensor::F64(b)) => {
                Some(NdArrayTensor::from(self.run(a.view(), b.view()).into_shared()))
            }
            _ => None,
        }
    }

    fn run<E: Elem>(self, a: ArrayViewD<'_, E>, b: ArrayViewD<'_, E>) -> ArrayD<E> {
        let with_last = |shape: &[usize], last: usize| {
            let mut shape = shape.to_vec();
            *shape.last_mut().expect("at least one dimension") = last;
            shape
        };
        match self {
            Product::Forward => {
                let w = as_matrix(b);
                let shape = with_last(a.shape(), w.ncols());
                gemm(rows(a).view(), w)
                    .into_shape_with_order(IxDyn(&shape))
                    .expect("row-major")
            }
            Product::GradInput => {
                let w = as_matrix(b);
                let shape = with_last(a.shape(), w.nrows());
                gemm(rows(a).view(), w.t())
                    .into_shape_with_order(IxDyn(&shape))
                    .expect("row-major")
            }
            Product::GradWeight => gemm(rows(a).view().t(), rows(b).view()).into_dyn(),
        }
    }
}

/// A 2-D view of a 2-D array, strides as they are.
fn as_matrix<E>(a: ArrayViewD<'_, E>) -> ArrayView2<'_, E> {
    a.into_dimensionality::<Ix2>().expect("a matrix")
}

/// `a` as a matrix of its last axis against all the others: a view when
/// `a` is row-major (the usual case), otherwise a row-major copy.
fn rows<E: Elem>(a: ArrayViewD<'_, E>) -> CowArray<'_, E, Ix2> {
    let k = *a.shape().last().expect("at least one dimension");
    let m = a.len().checked_div(k).unwrap_or(0);
    if a.is_standard_layout() {
        CowArray::from(a.into_shape_with_order((m, k)).expect("row-major"))
    } else {
        CowArray::from(
            a.as_standard_layout()
                .into_owned()
                .into_shape_with_order((m, k))
                .expect("row-major"),
        )
    }
}

/// `a b` into a fresh row-major matrix: one GEMM over the operands' own
/// strides.
fn gemm<E: Elem>(a: ArrayView2<'_, E>, b: ArrayView2<'_, E>) -> Array2<E> {
    let ((m, k), (_, n)) = (a.dim(), b.dim());
    gemm_split(a, b, gemm_parts(m, k, n))
}

/// [`gemm`] as `parts` blocks computed in parallel.
fn gemm_split<E: Elem>(a: ArrayView2<'_, E>, b: ArrayView2<'_, E>, parts: usize) -> Array2<E> {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert_eq!(k, k2, "inner dimensions differ");
    if k == 0 {
        return Array2::from_elem((m, n), E::ZERO);
    }
    let mut out = Array2::<E>::uninit((m, n));
    if m > 0 && n > 0 {
        let (sa, sb) = (a.strides(), b.strides());
        let parts = parts.max(1);
        let out_ptr = Shared(out.as_mut_ptr().cast::<E>());
        let (a_ptr, b_ptr) = (Shared(a.as_ptr().cast_mut()), Shared(b.as_ptr().cast_mut()));
        // Split the larger of m and n into `parts` blocks (multiples of 16):
        // each thread packs its block of that operand and all of the other,
        // so the smaller operand is the one packed twice.
        let split_n = m <= n;
        let len = if split_n { n } else { m };
        let block = len.div_ceil(parts).next_multiple_of(16).min(len);
        (0..len.div_ceil(block)).into_par_iter().for_each(|i| {
            let (start, size) = (i * block, block.min(len - i * block));
            let (a_ptr, b_ptr, out_ptr) = (&a_ptr, &b_ptr, &out_ptr);
            // SAFETY: the pointers and strides describe the views' elements;
            // `out` is m x n row-major and each block writes (beta = 0, no
            // read) its own rows or columns of it.
            unsafe {
                if split_n {
                    let b = b_ptr.0.offset(start as isize * sb[1]);
                    E::gemm(
                        m,
                        k,
                        size,
                        a_ptr.0,
                        sa[0],
                        sa[1],
                        b,
                        sb[0],
                        sb[1],
                        out_ptr.0.add(start),
                        n as isize,
                    )
                } else {
                    let a = a_ptr.0.offset(start as isize * sa[0]);
                    E::gemm(
                        size,
                        k,
                        n,
                        a,
                        sa[0],
                        sa[1],
                        b_ptr.0,
                        sb[0],
                        sb[1],
                        out_ptr.0.add(start * n),
                        n as isize,
                    )
                }
            }
        });
    }
    // SAFETY: every element was written by the GEMM (or there are none).
    unsafe { out.assume_init() }
}

/// A raw pointer that may cross threads: the blocks of [`gemm`] read the
/// shared operands and write disjoint parts of the output.
struct Shared<E>(*mut E);
// SAFETY: see the type's docs; the pointees outlive the parallel loop.
unsafe impl<E> Send for Shared<E> {}
// SAFETY: as above.
unsafe impl<E> Sync for Shared<E> {}

/// Into how many blocks [`gemm`] splits an `m x k x n` product: one per
/// rayon thread (at most one per 2^17 multiply-adds) when matrixmultiply
/// runs single-threaded (the process said so with [`crate::split_products`]),
/// else 1 and matrixmultiply splits the work itself (its own pool, with
/// the packing of one operand on the calling thread: the other waits).
fn gemm_parts(m: usize, k: usize, n: usize) -> usize {
    if !crate::products_split() {
        return 1;
    }
    let work = (m * k * n) >> 17;
    rayon::current_num_threads().min(work).min(m.max(n).div_ceil(16)).max(1)
}

/// The element types served: f32 and f64.
pub(crate) trait Elem:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `c = a b` (alpha 1, beta 0) through matrixmultiply.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        c: *mut Self,
        rsc: isize,
    );
}

macro_rules! gemm_element {
    ($ty:ty, $gemm:path) => {
        impl Elem for $ty {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$ty>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$ty>::exp(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $ty
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            unsafe fn gemm(
                m: usize,
                k: usize,
                n: usize,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                c: *mut Self,
                rsc: isize,
            ) {
                // SAFETY: forwarded from the caller.
                unsafe { $gemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, 1) }
            }
        }
    };
}
gemm_element!(f32, matrixmultiply::sgemm);
gemm_element!(f64, matrixmultiply::dgemm);

#[cfg(test)]
mod tests {
    use super::*;
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
                    true => unary(xi, kernel.clone()).expect("served"),
                    false => {
                        let x4 = xi.reshape([batch, seq, heads, head_dim]);
                        let swapped =
                            Tensor::cat(vec![x4.clone().narrow(3, half, half), x4.clone().narrow(3, 0, half)], 3);
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
            let y: Vec<f64> = unary(x0, kernel).expect("served").into_data().to_vec().unwrap();
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
        let x =
            Tensor::<AD, 2>::from_data(burn::tensor::TensorData::new(x0.clone(), [rows, d]), &device).require_grad();
        let y = unary(x.clone().mul_scalar(1.0), kernel).expect("served");
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
            let close =
                |x: &[f64], y: &[f64]| x.len() == y.len() && x.iter().zip(y).all(|(x, y)| (x - y).abs() < 1e-12);
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
}
