//! A GGUF file as a weight source.
//!
//! GGUF lists dimensions innermost first (`[in, out]` for a linear weight);
//! [`GgufSource`] reverses them to PyTorch's `[out, in]`, renames tensors to
//! Hugging Face names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)
//! and un-permutes the Q/K rows (weights and biases) that llama.cpp's
//! converter interleaved for its RoPE in `llama` files, so the half-split
//! RoPE of transformers applies to both formats. Which architectures are
//! permuted is llama.cpp's `conversion/llama.py` (`LlamaModel.permute`,
//! `undo_permute = True`; Mistral is converted by that class too) and
//! `conversion/qwen.py` (`Qwen2Model`, `Qwen3Model`: no permutation).

use super::{HostTensor, WeightSource};
use crate::error::{LlamaError, Result};
use crate::gguf::{Gguf, GgufValue};
use crate::model::config::{Family, LlamaConfig, RopeScaling};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The tensor in which a GGUF stores Llama 3's rope scaling.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// A GGUF file as a [`WeightSource`] under Hugging Face names.
pub struct GgufSource {
    path: PathBuf,
    mmap: Mmap,
    gguf: Gguf,
    /// Hugging Face name -> index in the tensor table.
    names: BTreeMap<String, usize>,
}

/// The Hugging Face name of a GGUF tensor name, if it is one the model uses.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = match tail {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.bias" => "self_attn.o_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}"))
}

/// Undoes llama.cpp's Q/K row permutation of one `[heads * head_dim, cols]`
/// matrix: row `2j + s` of a head in GGUF is row `s * head_dim / 2 + j` in
/// Hugging Face's layout.
pub fn unpermute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for j in 0..half {
            for s in 0..2 {
                let src = (h * head_dim + 2 * j + s) * cols;
                let dst = (h * head_dim + s * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}

impl GgufSource {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| LlamaError::io(path, e))?;
        // SAFETY: read-only mapping of a file melora does not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LlamaError::io(path, e))?;
        let gguf = Gguf::parse(&mmap).map_err(|e| LlamaError::format(path, e.to_string()))?;
        let names = gguf
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| hf_name(&t.name).map(|n| (n, i)))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            gguf,
            names,
        })
    }

    /// The parsed header.
    pub fn gguf(&self) -> &Gguf {
        &self.gguf
    }

    fn arch(&self) -> &str {
        self.gguf
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .unwrap_or("llama")
    }

    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch())
    }

    /// Whether layer 0 holds the tensor of Hugging Face name suffix `tail`.
    fn has(&self, tail: &str) -> bool {
        self.names.contains_key(&format!("model.layers.0.{tail}"))
    }

    fn meta_u64(&self, key: &str) -> Result<usize> {
        let full = self.arch_key(key);
        self.gguf
            .get(&full)
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| LlamaError::format(&self.path, format!("metadata {full} missing or not an integer")))
    }

    /// Llama 3's rope scaling as a GGUF stores it: a divisor per frequency
    /// in the tensor [`ROPE_FREQS`] (none: no scaling).
    fn rope_factors(&self) -> Result<RopeScaling> {
        let Some(info) = self.gguf.tensors.iter().find(|t| t.name == ROPE_FREQS) else {
            return Ok(RopeScaling::None);
        };
        let factors = self
            .gguf
            .dequantize(info, &self.mmap)
            .map_err(|e| LlamaError::format(&self.path, e.to_string()))?;
        Ok(RopeScaling::Factors {
            factors: factors.into_iter().map(f64::from).collect(),
        })
    }

    /// The model configuration from the metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self
            .gguf
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .unwrap_or("?");
        let family = match arch {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => {
                return Err(LlamaError::format(
                    &self.path,
                    format!(
                        "general.architecture is {arch:?}, which is not supported (supported: llama, qwen2, qwen3)"
                    ),
                ))
            }
        };
        let scaling = self
            .gguf
            .get(&self.arch_key("rope.scaling.type"))
            .and_then(GgufValue::as_str);
        if let Some(kind) = scaling.filter(|k| *k != "none") {
            return Err(LlamaError::format(
                &self.path,
                format!(
                    "{} is {kind:?}: rope scaling is not supported (only the default rotary embedding)",
                    self.arch_key("rope.scaling.type")
                ),
            ));
        }
        let heads = self.meta_u64("attention.head_count")?;
        let hidden = self.meta_u64("embedding_length")?;
        let vocab = match self.meta_u64("vocab_size") {
            Ok(v) => v,
            Err(_) => self
                .gguf
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(|a| a.len())
                .ok_or_else(|| LlamaError::format(&self.path, "no vocab size and no tokenizer.ggml.tokens"))?,
        };
        // `attention.key_length` where the converter wrote the
        // configuration's head_dim (Qwen3), else the rotary width.
        let head_dim = self
            .meta_u64("attention.key_length")
            .or_else(|_| self.meta_u64("rope.dimension_count"))
            .unwrap_or(hidden / heads.max(1));
        let f = |key: &str, default: f64| {
            self.gguf
                .get(&self.arch_key(key))
                .and_then(GgufValue::as_f64)
                .unwrap_or(default)
        };
        let config = LlamaConfig::new(
            vocab,
            hidden,
            self.meta_u64("feed_forward_length")?,
            self.meta_u64("block_count")?,
            heads,
            self.meta_u64("attention.head_count_kv").unwrap_or(heads),
            head_dim,
        )
        .with_rope_theta(f("rope.freq_base", 10000.0))
        .with_rms_norm_eps(f("attention.layer_norm_rms_epsilon", 1e-5))
        .with_tie_word_embeddings(!self.names.contains_key("lm_head.weight"))
        .with_max_position_embeddings(self.meta_u64("context_length").unwrap_or(4096))
        .with_rope_scaling(self.rope_factors()?)
        .with_family(family)
        .with_qkv_bias(self.has("self_attn.q_proj.bias"))
        .with_o_bias(self.has("self_attn.o_proj.bias"))
        .with_qk_norm(self.has("self_attn.q_norm.weight"));
        config
            .validate()
            .map_err(|e| LlamaError::format(&self.path, e.to_string()))?;
        Ok(config)
    }
}

impl WeightSource for GgufSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    /// The weights' names; [`ROPE_FREQS`] is not one of them: it is read
    /// with the configuration ([`GgufSource::config`]).
    fn names(&self) -> Vec<String> {
        self.gguf
            .tensors
            .iter()
            .filter(|t| t.name != ROPE_FREQS)
            .map(|t| hf_name(&t.name).unwrap_or_else(|| t.name.clone()))
            .collect()
    }
    fn load(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some(&i) = self.names.get(name) else {
            return Ok(None);
        };
        let info = &self.gguf.tensors[i];
        let mut values = self
            .gguf
            .dequantize(info, &self.mmap)
            .map_err(|e| LlamaError::format(&self.path, e.to_string()))?;
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        let permuted = self.arch() == "llama";
        let heads = if !permuted {
            None
        } else if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") {
            Some(self.meta_u64("attention.head_count")?)
        } else if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") {
            Some(
                self.meta_u64("attention.head_count_kv")
                    .or_else(|_| self.meta_u64("attention.head_count"))?,
            )
        } else {
            None
        };
        if let Some(heads) = heads {
            // A bias is one column.
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            if shape.is_empty() || shape.len() > 2 || heads == 0 || shape[0] % (2 * heads) != 0 {
                return Err(LlamaError::Shape {
                    name: name.to_string(),
                    expected: vec![heads, cols],
                    found: shape,
                });
            }
            values = unpermute_rows(&values, heads, cols);
        }
        Ok(Some(HostTensor { shape, values }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Two heads of head_dim 4, one column: HF rows 0..8.
        let hf: Vec<f32> = (0..8).map(|v| v as f32).collect();
        // llama.cpp: reshape(heads, 2, hd/2).swapaxes(1, 2): head 0 -> [0, 2, 1, 3].
        let gguf = vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        assert_eq!(unpermute_rows(&gguf, 2, 1), hf);
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
