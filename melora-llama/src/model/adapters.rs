//! Where adapters are placed: the projections a run adapts ([`Target`]) and
//! putting fresh adapters on them.
//!
//! The output projection (`lm_head`, BLoB's `--apply-classhead-lora`) is a
//! target too. Its adapter wraps the output layer as it is, or, with tied
//! embeddings, a frozen view of the embedding matrix: the update applies
//! to the output only, the input embedding stays the base one (PEFT's
//! `lm_head` LoRA on a tied model does the same).

use super::{Llama, Proj};
use crate::error::{LlamaError, Result};
use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use melora_core::{Adapter, AdapterConfig, AnyAdapter, NoiseSource};
use serde::{Deserialize, Serialize};

/// Which projections get an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    /// `self_attn.q_proj`
    #[serde(rename = "q_proj")]
    Q,
    /// `self_attn.k_proj`
    #[serde(rename = "k_proj")]
    K,
    /// `self_attn.v_proj`
    #[serde(rename = "v_proj")]
    V,
    /// `self_attn.o_proj`
    #[serde(rename = "o_proj")]
    O,
    /// `mlp.gate_proj`
    #[serde(rename = "gate_proj")]
    Gate,
    /// `mlp.up_proj`
    #[serde(rename = "up_proj")]
    Up,
    /// `mlp.down_proj`
    #[serde(rename = "down_proj")]
    Down,
    /// The output projection, `lm_head`.
    #[serde(rename = "lm_head")]
    LmHead,
}

impl Target {
    /// Every target, with its Hugging Face module name.
    pub const ALL: [(Target, &'static str); 8] = [
        (Target::Q, "q_proj"),
        (Target::K, "k_proj"),
        (Target::V, "v_proj"),
        (Target::O, "o_proj"),
        (Target::Gate, "gate_proj"),
        (Target::Up, "up_proj"),
        (Target::Down, "down_proj"),
        (Target::LmHead, "lm_head"),
    ];

    /// The module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    /// Parses a comma-separated list such as `q_proj,v_proj`.
    pub fn parse_list(list: &str) -> Result<Vec<Target>> {
        let mut out = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let target = Self::ALL.iter().find(|(_, n)| *n == item).map(|(t, _)| *t).ok_or_else(|| {
                LlamaError::Config(format!(
                    "unknown adapter target {item:?}: expected some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"
                ))
            })?;
            if !out.contains(&target) {
                out.push(target);
            }
        }
        if out.is_empty() {
            return Err(LlamaError::Config(format!("no adapter target in {list:?}")));
        }
        Ok(out)
    }
}

impl<B: Backend> Llama<B> {
    /// Puts a fresh adapter of `config` on every `targets` projection, in
    /// layer order, with initial weights drawn from `noise`.
    pub fn with_adapters(self, config: &AdapterConfig, targets: &[Target], noise: &mut NoiseSource) -> Result<Self> {
        self.map_projections(targets, |_, base| Ok(config.init(base, noise)?))
    }

    /// The model with each adapter's mean update merged into its base
    /// weight: a plain Llama that computes what the adapted one computes
    /// with the mean weights. A merge with a NaN or an infinity is an error
    /// naming the projection.
    pub fn merged(mut self) -> Result<Self> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, slot) in layer.projections_mut() {
                if let Proj::Adapted(adapter) = &*slot {
                    let base = adapter
                        .merge()
                        .map_err(|e| LlamaError::Numerical(format!("model.layers.{i}.{name}: {e}")))?;
                    *slot = Proj::Base(base);
                }
            }
        }
        // An output adapter unties a tied output layer: the merged output
        // weight differs from the input embedding.
        if let Some(head) = self.head_adapter.take() {
            self.lm_head = Some(
                head.merge()
                    .map_err(|e| LlamaError::Numerical(format!("lm_head: {e}")))?,
            );
        }
        Ok(self)
    }

    /// The output layer as a linear layer: `lm_head`, or with tied
    /// embeddings a frozen `[hidden, vocab]` view of the embedding matrix.
    pub fn output_layer(&self) -> Linear<B> {
        match &self.lm_head {
            Some(head) => head.clone(),
            None => Linear {
                weight: Param::from_tensor(self.embed_tokens.weight.val().transpose().set_require_grad(false)),
                bias: None,
            },
        }
    }

    /// Replaces every `targets` projection that has no adapter yet by
    /// `make(module_path, base)`, e.g. `make("model.layers.0.self_attn.q_proj", base)`,
    /// in layer order, then the output projection (`make("lm_head", output)`)
    /// when [`Target::LmHead`] is a target.
    pub fn map_projections(
        mut self,
        targets: &[Target],
        mut make: impl FnMut(&str, Linear<B>) -> Result<AnyAdapter<B>>,
    ) -> Result<Self> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, slot) in layer.projections_mut() {
                let wanted = targets.iter().any(|t| name.ends_with(t.name()));
                if let (true, Proj::Base(base)) = (wanted, &*slot) {
                    let adapter = make(&format!("model.layers.{i}.{name}"), base.clone())?;
                    *slot = Proj::Adapted(adapter);
                }
            }
        }
        if targets.contains(&Target::LmHead) && self.head_adapter.is_none() {
            let output = self.output_layer();
            self.head_adapter = Some(make("lm_head", output)?);
        }
        Ok(self)
    }
}
