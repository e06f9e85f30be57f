//! The one-pass kernels: a [`Unary`] function of rows (SiLU, softmax,
//! RMSNorm with a frozen scale, RoPE) run over rayon's threads forward and
//! backward, and the copy-free reshape.

use super::gemm::Elem;
use burn_ndarray::{NdArrayTensor, SharedArray};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

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

pub(super) fn unary_forward<K: Unary>(
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

pub(super) fn unary_backward<K: Unary>(
    kernel: &K,
    saved: Option<&NdArrayTensor>,
    grad: &NdArrayTensor,
) -> Option<NdArrayTensor> {
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

/// `x` reshaped: the same buffer when row-major, else a row-major copy.
pub(super) fn reshaped(x: NdArrayTensor, shape: &[usize]) -> Option<NdArrayTensor> {
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
