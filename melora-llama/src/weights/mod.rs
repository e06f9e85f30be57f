//! Building a [`Llama`] from named weights.
//!
//! Every source (a Hugging Face folder of safetensors, a GGUF file, random
//! numbers) answers by Hugging Face tensor name, in the `[out, in]` layout of
//! PyTorch, as f32. The builder asks for each tensor the model needs, checks
//! its shape (the error names the tensor and both shapes), and reports the
//! keys it did not use. Candle's `VarBuilder` is the model for this design.

pub mod export;
pub mod gguf;
pub mod peft;
pub mod safetensors;

use crate::error::{LlamaError, Result};
use crate::model::config::LlamaConfig;
use crate::model::{Attention, DecoderLayer, Llama, Mlp, Proj};
use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm, RmsNormConfig};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use std::collections::BTreeSet;

/// A tensor read from a source: its shape and its values as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape, PyTorch order (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Somewhere named weights come from.
pub trait WeightSource {
    /// A short description for messages (usually the path).
    fn describe(&self) -> String;
    /// Every tensor name the source holds (Hugging Face names).
    fn names(&self) -> Vec<String>;
    /// The tensor called `name`, or `None` if the source has no such tensor.
    fn load(&mut self, name: &str) -> Result<Option<HostTensor>>;
    /// For sources of random weights: the standard deviation of a zero-mean
    /// normal to draw matrix `name` from on the device itself, instead of
    /// drawing it on the host and copying it over (minutes for a 7B model).
    /// `None` (the default) loads it with [`load`](Self::load).
    fn device_normal(&self, _name: &str) -> Option<f64> {
        None
    }
}

/// Tensors a source may hold that the model does not need: buffers that
/// follow from the configuration (older Hugging Face checkpoints save the
/// rotary inverse frequencies).
const IGNORABLE: [&str; 1] = ["rotary_emb.inv_freq"];

/// What a load did not use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Tensors in the source that the model did not use (only buffers it
    /// does not need: any other leftover tensor is an error).
    pub unused: Vec<String>,
}

struct Loader<'a, S: WeightSource + ?Sized> {
    source: &'a mut S,
    used: BTreeSet<String>,
}

impl<S: WeightSource + ?Sized> Loader<'_, S> {
    fn get(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let tensor = self.source.load(name)?.ok_or_else(|| LlamaError::Missing {
            name: name.to_string(),
            source_name: self.source.describe(),
        })?;
        if tensor.shape != expected {
            return Err(LlamaError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: tensor.shape,
            });
        }
        self.used.insert(name.to_string());
        Ok(tensor)
    }

    fn frozen<B: Backend, const D: usize>(
        values: Vec<f32>,
        shape: [usize; D],
        device: &B::Device,
    ) -> Param<Tensor<B, D>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device)).set_require_grad(false)
    }

    /// A weight drawn on the device, when the source asks for that.
    fn device_random<B: Backend>(
        &mut self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Option<Param<Tensor<B, 2>>> {
        let std = self.source.device_normal(name)?;
        self.used.insert(name.to_string());
        let tensor = Tensor::random(shape, Distribution::Normal(0.0, std), device);
        Some(Param::from_tensor(tensor).set_require_grad(false))
    }

    /// A linear layer from an `[out, in]` weight (transposed on the host to
    /// Burn's `[in, out]`) and, with `bias`, its `[out]` bias.
    fn linear<B: Backend>(
        &mut self,
        name: &str,
        d_out: usize,
        d_in: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Linear<B>> {
        let bias = match bias {
            true => Some(Self::frozen(
                self.get(&format!("{name}.bias"), &[d_out])?.values,
                [d_out],
                device,
            )),
            false => None,
        };
        let name = format!("{name}.weight");
        if let Some(weight) = self.device_random(&name, [d_in, d_out], device) {
            return Ok(Linear { weight, bias });
        }
        let w = self.get(&name, &[d_out, d_in])?;
        let mut t = vec![0f32; w.values.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                t[i * d_out + o] = w.values[o * d_in + i];
            }
        }
        Ok(Linear {
            weight: Self::frozen(t, [d_in, d_out], device),
            bias,
        })
    }

    fn norm<B: Backend>(&mut self, name: &str, d: usize, eps: f64, device: &B::Device) -> Result<RmsNorm<B>> {
        let w = self.get(&format!("{name}.weight"), &[d])?;
        let mut norm: RmsNorm<B> = RmsNormConfig::new(d).with_epsilon(eps).init(device);
        norm.gamma = Self::frozen(w.values, [d], device);
        Ok(norm)
    }
}

/// Builds the model from `source`; every weight frozen, no adapters.
pub fn build<B: Backend, S: WeightSource + ?Sized>(
    config: &LlamaConfig,
    source: &mut S,
    device: &B::Device,
) -> Result<(Llama<B>, LoadReport)> {
    config.validate()?;
    let c = config;
    let mut loader = Loader {
        source,
        used: BTreeSet::new(),
    };
    let embed_name = "model.embed_tokens.weight";
    let embed_shape = [c.vocab_size, c.hidden_size];
    let embed_tokens = match loader.device_random(embed_name, embed_shape, device) {
        Some(weight) => Embedding { weight },
        None => Embedding {
            weight: Loader::<S>::frozen(loader.get(embed_name, &embed_shape)?.values, embed_shape, device),
        },
    };
    let (q_dim, kv_dim) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, d_out, d_in, bias| -> Result<Proj<B>> {
            Ok(Proj::Base(loader.linear(
                &format!("{p}.{name}"),
                d_out,
                d_in,
                bias,
                device,
            )?))
        };
        let (q_proj, k_proj, v_proj, o_proj) = (
            lin("self_attn.q_proj", q_dim, c.hidden_size, c.qkv_bias)?,
            lin("self_attn.k_proj", kv_dim, c.hidden_size, c.qkv_bias)?,
            lin("self_attn.v_proj", kv_dim, c.hidden_size, c.qkv_bias)?,
            lin("self_attn.o_proj", c.hidden_size, q_dim, c.o_bias)?,
        );
        let mlp = Mlp {
            gate_proj: lin("mlp.gate_proj", c.intermediate_size, c.hidden_size, false)?,
            up_proj: lin("mlp.up_proj", c.intermediate_size, c.hidden_size, false)?,
            down_proj: lin("mlp.down_proj", c.hidden_size, c.intermediate_size, false)?,
        };
        let mut head_norm = |which: &str| match c.qk_norm {
            true => loader
                .norm(&format!("{p}.self_attn.{which}"), c.head_dim, c.rms_norm_eps, device)
                .map(Some),
            false => Ok(None),
        };
        let self_attn = Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            q_norm: head_norm("q_norm")?,
            k_norm: head_norm("k_norm")?,
        };
        layers.push(DecoderLayer {
            self_attn,
            mlp,
            input_layernorm: loader.norm(&format!("{p}.input_layernorm"), c.hidden_size, c.rms_norm_eps, device)?,
            post_attention_layernorm: loader.norm(
                &format!("{p}.post_attention_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
                device,
            )?,
        });
    }
    let norm = loader.norm("model.norm", c.hidden_size, c.rms_norm_eps, device)?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(loader.linear("lm_head", c.vocab_size, c.hidden_size, false, device)?)
    };
    let used = loader.used;
    let unused: Vec<String> = source.names().into_iter().filter(|n| !used.contains(n)).collect();
    let left: Vec<&String> = unused
        .iter()
        .filter(|n| !IGNORABLE.iter().any(|s| n.ends_with(s)))
        .collect();
    if !left.is_empty() {
        let shown: Vec<&str> = left.iter().take(6).map(|n| n.as_str()).collect();
        return Err(LlamaError::Format {
            path: source.describe().into(),
            message: format!(
                "{} tensor(s) a Llama has no place for ({}{}): biases, norms or rope frequencies of a model melora does not run, whose logits would be wrong without them",
                left.len(),
                shown.join(", "),
                if left.len() > shown.len() { ", ..." } else { "" }
            ),
        });
    }
    let model = Llama {
        embed_tokens,
        layers,
        norm,
        lm_head,
        head_adapter: None,
        rope_theta: c.rope_theta,
        rope_scaling: c.rope_scaling.clone(),
        sliding_window: c.sliding_window,
    };
    Ok((model.no_grad(), LoadReport { unused }))
}

/// Random weights `N(0, 0.02^2)` (norms 1, biases 0) of the right shapes, generated on
/// demand: for shape-only presets and benchmarks.
pub struct RandomSource {
    config: LlamaConfig,
    rng: rand::rngs::StdRng,
    on_device: bool,
}

/// The standard deviation of random weights.
const RANDOM_STD: f32 = 0.02;

impl RandomSource {
    /// A source for `config`, drawn on the host from a generator seeded with
    /// `seed` (the same weights on every backend).
    pub fn new(config: &LlamaConfig, seed: u64) -> Self {
        Self {
            config: config.clone(),
            rng: rand::SeedableRng::seed_from_u64(seed),
            on_device: false,
        }
    }

    /// The same shapes, with the matrices drawn on the device by the
    /// backend's own generator (seed it with `Backend::seed`): fast for 7B
    /// and 13B shapes, where the host would spend minutes.
    pub fn on_device(mut self) -> Self {
        self.on_device = true;
        self
    }
}

impl WeightSource for RandomSource {
    fn describe(&self) -> String {
        "random weights".into()
    }
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    fn load(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let c = &self.config;
        let (q_dim, kv_dim) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let shape: Vec<usize> = if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
            return Ok(Some(HostTensor {
                shape: vec![c.head_dim],
                values: vec![1.0; c.head_dim],
            }));
        } else if let Some(d_out) = [
            ("q_proj.bias", q_dim),
            ("k_proj.bias", kv_dim),
            ("v_proj.bias", kv_dim),
            ("o_proj.bias", c.hidden_size),
        ]
        .iter()
        .find_map(|(suffix, d)| name.ends_with(suffix).then_some(*d))
        {
            return Ok(Some(HostTensor {
                shape: vec![d_out],
                values: vec![0.0; d_out],
            }));
        } else if name.ends_with("norm.weight") {
            return Ok(Some(HostTensor {
                shape: vec![c.hidden_size],
                values: vec![1.0; c.hidden_size],
            }));
        } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            vec![c.vocab_size, c.hidden_size]
        } else if name.ends_with("q_proj.weight") {
            vec![q_dim, c.hidden_size]
        } else if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
            vec![kv_dim, c.hidden_size]
        } else if name.ends_with("o_proj.weight") {
            vec![c.hidden_size, q_dim]
        } else if name.ends_with("down_proj.weight") {
            vec![c.hidden_size, c.intermediate_size]
        } else if name.ends_with("gate_proj.weight") || name.ends_with("up_proj.weight") {
            vec![c.intermediate_size, c.hidden_size]
        } else {
            return Ok(None);
        };
        let n: usize = shape.iter().product();
        let values = melora_core::noise::standard_normals(&mut self.rng, n)
            .into_iter()
            .map(|v| RANDOM_STD * v)
            .collect();
        Ok(Some(HostTensor { shape, values }))
    }
    fn device_normal(&self, name: &str) -> Option<f64> {
        (self.on_device && !name.ends_with("norm.weight")).then_some(RANDOM_STD as f64)
    }
}
