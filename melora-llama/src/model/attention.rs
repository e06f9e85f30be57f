//! Grouped-query self-attention with rotary position embeddings and the
//! key/value cache.

use super::{pick_rows, Proj};
use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use melora_core::Sampler;
use melora_kernels::{matmul, reshape, rms_norm, rotary, softmax_last};
use std::sync::Arc;

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection.
    pub q_proj: Proj<B>,
    /// Key projection.
    pub k_proj: Proj<B>,
    /// Value projection.
    pub v_proj: Proj<B>,
    /// Output projection.
    pub o_proj: Proj<B>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// An RMSNorm over each query head before the rotary step (Qwen3).
    pub q_norm: Option<RmsNorm<B>>,
    /// The same over each key head.
    pub k_norm: Option<RmsNorm<B>>,
}

/// Rotary tables: `cos` and `sin`, `[1, 1, seq, head_dim]` for a run of
/// positions every example shares, or `[batch, 1, seq, head_dim]` for a
/// position per token; the first half of `sin` is negated, so that
/// rotating is `x * cos + [x2, x1] * sin` with no negation pass. The same
/// angles are kept as `[seq, head_dim / 2]` (or `[batch * seq, head_dim /
/// 2]`) f64 tables for the one-pass kernel ([`melora_kernels::rotary`])
/// that the ndarray backend uses.
pub struct Rope<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    cos_half: Arc<[f64]>,
    sin_half: Arc<[f64]>,
    head_dim: usize,
}

impl<B: Backend> Rope<B> {
    /// Tables for positions `start .. start + seq` (half-split layout:
    /// frequency `i` at columns `i` and `i + head_dim / 2`); `periods[i]` is
    /// the rotation period of frequency `i` in positions over `2 pi`
    /// ([`crate::model::RopeScaling::periods`]).
    pub fn new(periods: &[f64], head_dim: usize, start: usize, seq: usize, device: &B::Device) -> Self {
        Self::build(
            periods,
            head_dim,
            &(start..start + seq).collect::<Vec<_>>(),
            [1, seq],
            device,
        )
    }

    /// Tables for a position per token: `positions`, `[batch * seq]`
    /// row-major, is the position of token `j` of example `b` at `b * seq + j`.
    ///
    /// # Panics
    ///
    /// If `positions` does not hold `batch * seq` entries.
    pub fn per_token(
        periods: &[f64],
        head_dim: usize,
        positions: &[usize],
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> Self {
        assert_eq!(positions.len(), batch * seq, "one rotary position per token");
        Self::build(periods, head_dim, positions, [batch, seq], device)
    }

    fn build(
        periods: &[f64],
        head_dim: usize,
        positions: &[usize],
        [batch, seq]: [usize; 2],
        device: &B::Device,
    ) -> Self {
        let half = head_dim / 2;
        assert_eq!(periods.len(), half, "one rotary period per frequency");
        let angles: Vec<f64> = positions
            .iter()
            .flat_map(|&pos| periods.iter().map(move |p| pos as f64 / p))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for row in angles.chunks(half.max(1)).take(positions.len()) {
            for sign in [-1.0, 1.0] {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| sign * a.sin()));
            }
        }
        let shape = [batch, 1, seq, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            cos_half: angles.iter().map(|a| a.cos()).collect(),
            sin_half: angles.iter().map(|a| a.sin()).collect(),
            head_dim,
        }
    }

    /// Rotates `x`, `[batch, heads, seq, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, _, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let swapped = Tensor::cat(vec![x2, x1], 3);
        x.mul(self.cos.clone()).add(swapped.mul(self.sin.clone()))
    }

    /// Splits a projection's output, `[batch, seq, heads * head_dim]`, into
    /// rotated heads, `[batch, heads, seq, head_dim]`: one pass on ndarray,
    /// [`Rope::apply`] on the split heads elsewhere.
    pub fn rotate_heads(&self, x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
        let [batch, seq, _] = x.dims();
        let split = |t: Tensor<B, 3>| reshape(t, [batch, seq, heads, self.head_dim]).swap_dims(1, 2);
        match rotary(x, &self.cos_half, &self.sin_half, self.head_dim) {
            Ok(rotated) => split(rotated),
            Err(x) => self.apply(split(x)),
        }
    }
}

impl<B: Backend> Attention<B> {
    /// With `rows`, only the query at position `rows[b]` of each example
    /// (keys and values still cover every position): `[batch, 1, hidden]`.
    pub(super) fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<Tensor<B, 4>>,
        cache: Option<&mut (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>)>,
        rows: Option<&[usize]>,
        sampler: &mut Sampler,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let split = |t: Tensor<B, 3>, heads: usize| reshape(t, [batch, seq, heads, hd]).swap_dims(1, 2);
        let q = rope.rotate_heads(
            head_norm(self.q_norm.as_ref(), self.q_proj.forward(x.clone(), sampler), hd),
            h,
        );
        let k = head_norm(self.k_norm.as_ref(), self.k_proj.forward(x.clone(), sampler), hd);
        let mut k = rope.rotate_heads(k, kvh);
        let mut v = split(self.v_proj.forward(x, sampler), kvh);
        if let Some((cache_k, cache_v)) = cache {
            if let Some(past) = cache_k.take() {
                k = Tensor::cat(vec![past, k], 2);
            }
            if let Some(past) = cache_v.take() {
                v = Tensor::cat(vec![past, v], 2);
            }
            *cache_k = Some(k.clone());
            *cache_v = Some(v.clone());
        }
        let (q, mask) = match rows {
            Some(rows) => (pick_rows(q, 2, rows), mask.map(|m| pick_rows(m, 2, rows))),
            None => (q, mask),
        };
        let queries = q.dims()[2];
        let out = grouped_attention(q, k, v, mask);
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([batch, queries, h * hd]), sampler)
    }
}

/// `norm` over each head of a projection's output, `[batch, seq, heads *
/// head_dim]` (every head normed over its own `head_dim` values, with the
/// same weights); the output itself without a norm.
fn head_norm<B: Backend>(norm: Option<&RmsNorm<B>>, x: Tensor<B, 3>, head_dim: usize) -> Tensor<B, 3> {
    let Some(norm) = norm else { return x };
    let [batch, seq, width] = x.dims();
    let heads = reshape(x, [batch, seq * width / head_dim, head_dim]);
    reshape(rms_norm(norm, heads), [batch, seq, width])
}

/// Scaled dot-product attention with grouped key/value heads.
///
/// `q`: `[b, h, s, d]`; `k`, `v`: `[b, kvh, t, d]` with `h` a multiple of
/// `kvh` (query head `j` reads key/value head `j / (h / kvh)`); `mask`: an
/// additive bias broadcast over heads, `[b, 1, s, t]` (0 or -inf).
///
/// The `h / kvh` query heads of a group are stacked into one matrix
/// (`[b, kvh, (h / kvh) * s, d]`), so keys and values are never copied per
/// query head and each product is one larger GEMM; the scale is applied to
/// `q` (smaller than the scores when `t > d`), and the mask is added, which
/// costs the backward pass nothing. The same function as Burn's `attention`
/// with a boolean mask and `repeat_kv`, in fewer passes over the scores
/// (tested against the transformers fixtures).
pub fn grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let [b, h, s, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    let group = h / kvh;
    let q = reshape(q.mul_scalar(1.0 / (d as f64).sqrt()), [b, kvh, group * s, d]);
    let scores = reshape(matmul(q, k.swap_dims(2, 3)), [b, h, s, t]);
    let scores = match mask {
        Some(bias) => scores.add(bias),
        None => scores,
    };
    let probs = reshape(softmax_last(scores), [b, kvh, group * s, t]);
    reshape(matmul(probs, v), [b, h, s, d])
}

/// The attention mask for `seq` new queries after `past` cached positions,
/// as an additive bias `[batch, 1, seq, past + seq]`: `-inf` where a query
/// may not look (later keys, keys `window` or more positions back, and
/// padded keys other than itself), 0 elsewhere. A padded query still sees
/// itself, so no row is fully masked.
///
/// `padding`: per example, `true` for real tokens, over all `past + seq` keys.
/// `window`: a sliding window (transformers' `sliding_window_overlay`: key
/// `k` is seen by query `q` when `k > q - window`).
pub fn attention_mask<B: Backend>(
    batch: usize,
    past: usize,
    seq: usize,
    padding: Option<&[Vec<bool>]>,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let total = past + seq;
    let mut values = Vec::with_capacity(batch * seq * total);
    for b in 0..batch {
        for i in 0..seq {
            let query = past + i;
            for key in 0..total {
                let padded = padding.is_some_and(|p| !p[b][key]);
                let far = window.is_some_and(|w| query >= key + w);
                let hidden = key > query || far || (padded && key != query);
                values.push(if hidden { f32::NEG_INFINITY } else { 0.0 });
            }
        }
    }
    Tensor::from_data(TensorData::new(values, [batch, 1, seq, total]), device)
}
