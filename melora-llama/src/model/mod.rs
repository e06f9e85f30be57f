//! A Llama decoder (RMSNorm, rotary embeddings, grouped-query attention,
//! SwiGLU MLP, tied or untied output) whose projections can carry any
//! melora adapter.
//!
//! Weights are named as in Hugging Face transformers
//! (`model.layers.3.self_attn.q_proj.weight`): see [`crate::weights`].
//! RoPE is the half-split form of transformers; GGUF checkpoints, whose Q/K
//! rows llama.cpp permutes for interleaved RoPE, are un-permuted on load.

mod adapters;
mod attention;
pub mod cache;
pub mod classify;
pub mod config;
mod hf;
mod mlp;
pub mod scoring;

pub use adapters::Target;
pub use attention::{attention_mask, grouped_attention, Attention, Rope};
pub use config::{Family, LlamaConfig, RopeScaling};
pub use mlp::Mlp;

use burn::module::Module;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::module::linear;
use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor, TensorData};
use cache::KvCache;
use melora_core::{Adapter, AnyAdapter, NoiseSource, ParamGroups, Sampler, SamplingMode};
use melora_kernels::{flat_linear, linear_forward, rms_norm};

/// A projection: a frozen base linear layer, or one with an adapter.
// A model holds a few hundred: the adapters' size beside a bare `Linear`
// costs nothing worth a box (and a box in every forward).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Proj<B: Backend> {
    /// No adapter.
    Base(Linear<B>),
    /// An adapter around the frozen base layer.
    Adapted(AnyAdapter<B>),
}

impl<B: Backend> Proj<B> {
    /// # Shapes
    ///
    /// - x: `[batch, seq, d_input]`, output: `[batch, seq, d_output]`
    pub fn forward(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        match self {
            Self::Base(linear) => linear_forward(linear, x),
            Self::Adapted(adapter) => adapter.forward_seq(x, sampler),
        }
    }

    /// The adapter, if any.
    pub fn adapter(&self) -> Option<&AnyAdapter<B>> {
        match self {
            Self::Base(_) => None,
            Self::Adapted(a) => Some(a),
        }
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// MLP.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

/// The Llama decoder.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Output layer; `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    /// An adapter on the output projection ([`Target::LmHead`]): the
    /// logits are the output layer's plus its update.
    pub head_adapter: Option<AnyAdapter<B>>,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled.
    #[module(skip)]
    pub rope_scaling: RopeScaling,
    /// Sliding-window attention: each query sees the last this many
    /// positions, itself included (Mistral).
    #[module(skip)]
    pub sliding_window: Option<usize>,
}

/// Row `rows[b]` of axis `dim` for each batch entry `b` (axis 0), keeping
/// the axis (size 1). One slice when every row is the same (left padding:
/// the last position), a gather otherwise.
pub fn pick_rows<B: Backend, const D: usize>(t: Tensor<B, D>, dim: usize, rows: &[usize]) -> Tensor<B, D> {
    let dims = t.dims();
    assert_eq!(rows.len(), dims[0], "one row per batch entry");
    if let Some(&first) = rows.first() {
        if rows.iter().all(|&r| r == first) {
            return t.narrow(dim, first, 1);
        }
    }
    let mut shape = dims;
    shape[dim] = 1;
    let per_batch: usize = shape[1..].iter().product();
    let index: Vec<i64> = rows
        .iter()
        .flat_map(|&r| std::iter::repeat_n(r as i64, per_batch))
        .collect();
    let device = t.device();
    t.gather(
        dim,
        Tensor::<B, D, Int>::from_data(TensorData::new(index, shape), &device),
    )
}

/// The sliding window over a laid-out batch, as an additive bias `[batch,
/// 1, seq, seq]`: `-inf` where the key's rotary position is `window` or
/// more before the query's (in a laid-out row, positions, not columns,
/// say how far back a token is), 0 elsewhere.
fn window_bias<B: Backend>(
    positions: &[usize],
    batch: usize,
    seq: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let mut values = Vec::with_capacity(batch * seq * seq);
    for row in positions.chunks(seq) {
        for &q in row {
            values.extend(row.iter().map(|&k| match q >= k + window {
                true => f32::NEG_INFINITY,
                false => 0.0,
            }));
        }
    }
    Tensor::from_data(TensorData::new(values, [batch, 1, seq, seq]), device)
}

/// The seven projections of a layer with their paths inside it.
macro_rules! projections {
    ($layer:expr, $($ref:tt)+) => {
        [
            ("self_attn.q_proj", $($ref)+ $layer.self_attn.q_proj),
            ("self_attn.k_proj", $($ref)+ $layer.self_attn.k_proj),
            ("self_attn.v_proj", $($ref)+ $layer.self_attn.v_proj),
            ("self_attn.o_proj", $($ref)+ $layer.self_attn.o_proj),
            ("mlp.gate_proj", $($ref)+ $layer.mlp.gate_proj),
            ("mlp.up_proj", $($ref)+ $layer.mlp.up_proj),
            ("mlp.down_proj", $($ref)+ $layer.mlp.down_proj),
        ]
    };
}

impl<B: Backend> DecoderLayer<B> {
    /// The projections with their paths inside the layer (`self_attn.q_proj`, ...).
    pub fn projections(&self) -> [(&'static str, &Proj<B>); 7] {
        projections!(self, &)
    }

    /// The same, mutable.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Proj<B>); 7] {
        projections!(self, &mut)
    }
}

impl<B: Backend> Llama<B> {
    /// The last hidden states (after the final norm).
    ///
    /// `padding[b][j]` is `true` where token `j` of example `b` is real (over
    /// the cached and the new positions). With a cache, the new tokens follow
    /// the cached ones.
    ///
    /// # Shapes
    ///
    /// - tokens: `[batch, seq]`, output: `[batch, seq, hidden]`
    pub fn hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        padding: Option<&[Vec<bool>]>,
        cache: Option<&mut KvCache<B>>,
        sampler: &mut Sampler,
    ) -> Tensor<B, 3> {
        self.run(tokens, padding, cache, None, sampler)
    }

    /// The last hidden state at position `rows[b]` of each example only:
    /// equal to `hidden` there, but the last layer computes its query,
    /// attention output and MLP for that position alone (its keys and values
    /// for all), which is all a classifier reading one position needs.
    ///
    /// # Shapes
    ///
    /// - tokens: `[batch, seq]`, output: `[batch, 1, hidden]`
    pub fn hidden_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        padding: Option<&[Vec<bool>]>,
        rows: &[usize],
        sampler: &mut Sampler,
    ) -> Tensor<B, 3> {
        self.run(tokens, padding, None, Some(rows), sampler)
    }

    /// The last hidden states of a batch laid out by the caller: the
    /// rotary position of every token (`positions`, `[batch * seq]`
    /// row-major) and the attention bias `mask`, `[batch, 1, seq, seq]`
    /// (0 where a query may look, `-inf` elsewhere; every query must see
    /// at least itself). How answer scoring runs a question's choices side
    /// by side in one row, each restarting at its prefix's end and blind
    /// to the others.
    ///
    /// # Shapes
    ///
    /// - tokens: `[batch, seq]`, output: `[batch, seq, hidden]`
    pub fn hidden_laid_out(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: &[usize],
        mask: Tensor<B, 4>,
        sampler: &mut Sampler,
    ) -> Tensor<B, 3> {
        let [batch, seq] = tokens.dims();
        let first = &self.layers[0].self_attn;
        let periods = self.rope_scaling.periods(self.rope_theta, first.head_dim);
        let rope = Rope::per_token(&periods, first.head_dim, positions, batch, seq, &tokens.device());
        let mask = match self.sliding_window {
            Some(window) => mask.add(window_bias(positions, batch, seq, window, &tokens.device())),
            None => mask,
        };
        self.layers_forward(tokens, &rope, Some(mask), None, None, sampler)
    }

    fn run(
        &self,
        tokens: Tensor<B, 2, Int>,
        padding: Option<&[Vec<bool>]>,
        cache: Option<&mut KvCache<B>>,
        rows: Option<&[usize]>,
        sampler: &mut Sampler,
    ) -> Tensor<B, 3> {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let first = &self.layers[0].self_attn;
        let periods = self.rope_scaling.periods(self.rope_theta, first.head_dim);
        let rope = Rope::new(&periods, first.head_dim, past, seq, &device);
        let window = self.sliding_window.filter(|w| past + seq > *w);
        let mask = (seq > 1 || padding.is_some() || window.is_some())
            .then(|| attention_mask::<B>(batch, past, seq, padding, window, &device));
        self.layers_forward(tokens, &rope, mask, cache, rows, sampler)
    }

    fn layers_forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        rope: &Rope<B>,
        mask: Option<Tensor<B, 4>>,
        mut cache: Option<&mut KvCache<B>>,
        rows: Option<&[usize]>,
        sampler: &mut Sampler,
    ) -> Tensor<B, 3> {
        let seq = tokens.dims()[1];
        let mut x = self.embed_tokens.forward(tokens);
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| c.layer(i));
            let rows = rows.filter(|_| i == last);
            let attn = layer.self_attn.forward(
                rms_norm(&layer.input_layernorm, x.clone()),
                rope,
                mask.clone(),
                layer_cache,
                rows,
                sampler,
            );
            x = match rows {
                Some(rows) => pick_rows(x, 1, rows),
                None => x,
            }
            .add(attn);
            let mlp = layer
                .mlp
                .forward(rms_norm(&layer.post_attention_layernorm, x.clone()), sampler);
            x = x.add(mlp);
        }
        if let Some(c) = cache {
            c.advance(seq);
        }
        rms_norm(&self.norm, x)
    }

    /// Logits from hidden states, `[batch, seq, hidden] -> [batch, seq,
    /// vocab]`, with an output adapter's mean weights.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let mut noise = NoiseSource::seeded(0);
        self.logits_sampled(hidden, &mut Sampler::new(SamplingMode::Mean, &mut noise))
    }

    /// [`Llama::logits`] with an output adapter drawn by `sampler`.
    pub fn logits_sampled(&self, hidden: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let code = self
            .head_adapter
            .as_ref()
            .map(|head| (head.code(hidden.clone(), sampler), head.lora_b()));
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => linear(hidden, self.embed_tokens.weight.val().transpose(), None),
        };
        match code {
            Some((code, b)) => logits.add(flat_linear(code, b.transpose(), None)),
            None => logits,
        }
    }

    /// The output adapter's update at some positions: `code` is its code
    /// ([`Adapter::code`]) at those positions, `[rows, r]`; the update of
    /// the vocabulary entries `ids` (all of them with `None`), `[rows, ids]`.
    pub fn head_update(&self, code: Tensor<B, 2>, ids: Option<Tensor<B, 1, Int>>) -> Option<Tensor<B, 2>> {
        let head = self.head_adapter.as_ref()?;
        let b = match ids {
            Some(ids) => head.lora_b().select(0, ids),
            None => head.lora_b(),
        };
        Some(code.matmul(b.transpose()))
    }

    /// Logits of a set of hidden states, `[rows, hidden] -> [rows, vocab]`,
    /// as one product that reads the (tied) output weight in place.
    pub fn logits_rows(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        let weight = match &self.lm_head {
            Some(head) => return linear_forward(head, hidden.unsqueeze::<3>()).squeeze_dim::<2>(0),
            None => self.embed_tokens.weight.val().transpose(),
        };
        flat_linear(hidden.unsqueeze::<3>(), weight, None).squeeze_dim::<2>(0)
    }

    /// Logits for every position, `[batch, seq, vocab]`.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        padding: Option<&[Vec<bool>]>,
        sampler: &mut Sampler,
    ) -> Tensor<B, 3> {
        let hidden = self.hidden(tokens, padding, None, sampler);
        self.logits_sampled(hidden, sampler)
    }

    /// Every adapted projection, with its Hugging Face module path
    /// (`model.layers.0.self_attn.q_proj`), in layer order, then the output
    /// projection's (`lm_head`).
    pub fn adapters(&self) -> Vec<(String, &AnyAdapter<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, proj) in layer.projections() {
                if let Some(adapter) = proj.adapter() {
                    out.push((format!("model.layers.{i}.{name}"), adapter));
                }
            }
        }
        if let Some(head) = &self.head_adapter {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// The sum of the adapters' KL terms, shape `[1]`.
    pub fn kl(&self, prior_std: f64) -> Tensor<B, 1> {
        let device = self.embed_tokens.weight.device();
        melora_core::total_kl(self.adapters().into_iter().map(|(_, a)| a), prior_std, &device)
    }

    /// The adapters' parameter ids, split into mean and std groups.
    pub fn param_groups(&self) -> ParamGroups {
        let mut groups = ParamGroups::default();
        for (_, adapter) in self.adapters() {
            groups.extend(adapter.param_groups());
        }
        groups
    }

    /// Trainable values (every adapter parameter), counted by a visitor.
    pub fn num_trainable(&self) -> usize {
        melora_core::count_params(self, &self.param_groups().all())
    }

    /// The mean posterior standard deviation of the adapters' random
    /// matrices (every entry of Me-LoRA's `Omega`, BLoB's `Omega_A`);
    /// `None` when no adapter has random weights.
    pub fn posterior_std(&self) -> Option<f64> {
        // Summed on the device and read back once (training reads it every
        // step; on a GPU each read waits for the device).
        let (mut sum, mut count): (Option<Tensor<B, 1>>, usize) = (None, 0);
        for (_, adapter) in self.adapters() {
            let omega = match adapter {
                AnyAdapter::MeLora(a) => a.omega(),
                AnyAdapter::Blob(a) => a.omega(),
                AnyAdapter::Lora(_) => continue,
            };
            count += omega.shape().num_elements();
            let part = omega.detach().sum();
            sum = Some(match sum {
                Some(total) => total.add(part),
                None => part,
            });
        }
        sum.map(|total| total.into_scalar().elem::<f64>() / count as f64)
    }

    /// The number of decoder layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }
}

/// The Llama trains with melora-core's ELBO step.
impl<B: burn::tensor::backend::AutodiffBackend> melora_core::Bayesian<B> for Llama<B> {
    fn kl(&self, prior_std: f64) -> Tensor<B, 1> {
        Llama::kl(self, prior_std)
    }

    fn param_groups(&self) -> ParamGroups {
        Llama::param_groups(self)
    }
}
