//! The products: one strided GEMM (matrixmultiply) per product, reading
//! the operands where they lie, for a linear layer's three products and a
//! batched `matmul`'s, split over rayon's threads.

use burn_ndarray::{NdArrayTensor, SharedArray};
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, CowArray, Ix2, IxDyn};
use rayon::prelude::*;

/// A product of two tensors with its two gradients, on ndarray tensors
/// (`None` unless both operands are f32 or both f64).
pub(super) trait Bilinear: Copy + Send + Sync + std::fmt::Debug + 'static {
    fn forward(self, a: &NdArrayTensor, b: &NdArrayTensor) -> Option<NdArrayTensor>;
    /// `dL/da` from the output gradient `g` and `b`.
    fn grad_a(self, g: &NdArrayTensor, b: &NdArrayTensor) -> Option<NdArrayTensor>;
    /// `dL/db` from `a` and the output gradient `g`.
    fn grad_b(self, a: &NdArrayTensor, g: &NdArrayTensor) -> Option<NdArrayTensor>;
}

/// A linear layer: `x W`, `dx = g W^T`, `dW = x^T g`.
#[derive(Debug, Clone, Copy)]
pub(super) struct LinearProduct;

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
pub(super) struct BatchedProduct;

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
pub(super) fn gemm_split<E: Elem>(a: ArrayView2<'_, E>, b: ArrayView2<'_, E>, parts: usize) -> Array2<E> {
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
