//! A Hugging Face `config.json` read into a [`LlamaConfig`]: the family
//! from `model_type` (or `architectures`), the features each family's
//! transformers class reads (`modeling_llama.py`, `modeling_mistral.py`,
//! `modeling_qwen2.py`, `modeling_qwen3.py`), and a refusal, naming the file
//! and the key, of anything melora would otherwise run wrongly.

use super::config::{Family, LlamaConfig, RopeScaling};
use crate::error::LlamaError;
use serde::Deserialize;
use std::path::Path;

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` (a top-level `rope_theta` or the
    /// newer `rope_parameters.rope_theta`). A model melora would run wrongly
    /// is refused, naming the key: another `model_type` or architecture,
    /// rope scaling, an MLP bias, another activation, per-layer windows
    /// ([`HfConfig::unsupported`]).
    pub fn from_hf_json(path: &Path) -> Result<Self, LlamaError> {
        let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| LlamaError::format(path, e.to_string()))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LlamaError::format(path, e.to_string()))?;
        let family = hf.family().map_err(|m| LlamaError::format(path, m))?;
        if let Some(why) = hf.unsupported(family) {
            return Err(LlamaError::format(path, why));
        }
        let heads = hf.num_attention_heads;
        if heads == 0 {
            return Err(LlamaError::format(path, "num_attention_heads is 0"));
        }
        let rope_theta = hf
            .rope_theta
            .or(hf.rope_parameters.as_ref().and_then(|r| r.get("rope_theta")?.as_f64()))
            .unwrap_or(10000.0);
        let max_position_embeddings = hf.max_position_embeddings.unwrap_or(4096);
        let rope_scaling = hf
            .rope_scaling(max_position_embeddings)
            .map_err(|m| LlamaError::format(path, m))?;
        // Which projections carry biases, as each family's attention class
        // builds them: Qwen2's q, k, v always (o never); Llama's and
        // Qwen3's all four when `attention_bias`; Mistral's none.
        let attention_bias = hf.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Llama | Family::Qwen3 => (attention_bias, attention_bias),
            Family::Qwen2 => (true, false),
            Family::Mistral => (false, false),
        };
        // Mistral's window: `MistralConfig` defaults it to 4096 when the key
        // is absent; `null` is none.
        let sliding_window =
            match (family, raw.get("sliding_window")) {
                (Family::Mistral, None) => Some(4096),
                (Family::Mistral, Some(v)) if v.is_null() => None,
                (Family::Mistral, Some(v)) => Some(v.as_u64().ok_or_else(|| {
                    LlamaError::format(path, format!("sliding_window = {v} is not a number of positions"))
                })? as usize),
                _ => None,
            };
        let config = Self::new(
            hf.vocab_size,
            hf.hidden_size,
            hf.intermediate_size,
            hf.num_hidden_layers,
            heads,
            hf.num_key_value_heads.unwrap_or(heads),
            hf.head_dim.filter(|d| *d > 0).unwrap_or(hf.hidden_size / heads),
        )
        .with_rope_theta(rope_theta)
        .with_rms_norm_eps(hf.rms_norm_eps.unwrap_or(1e-6))
        .with_tie_word_embeddings(hf.tie_word_embeddings.unwrap_or(false))
        .with_max_position_embeddings(max_position_embeddings)
        .with_rope_scaling(rope_scaling)
        .with_family(family)
        .with_qkv_bias(qkv_bias)
        .with_o_bias(o_bias)
        .with_qk_norm(family == Family::Qwen3)
        .with_sliding_window(sliding_window);
        config.validate().map_err(|e| LlamaError::format(path, e.to_string()))?;
        Ok(config)
    }
}

/// The keys of a Hugging Face `config.json` melora reads.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
}

/// The rope scaling types melora implements (besides `default`).
const ROPE_TYPES: [&str; 2] = ["linear", "llama3"];

impl HfConfig {
    /// The family: `model_type`, else the first of `architectures`, else
    /// Llama; every architecture named must be that family's class.
    fn family(&self) -> Result<Family, String> {
        let supported = || {
            Family::ALL
                .iter()
                .map(|f| f.model_type())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let by_type = match self.model_type.as_deref() {
            Some(t) => Some(
                Family::ALL
                    .into_iter()
                    .find(|f| f.model_type() == t)
                    .ok_or_else(|| format!("model_type {t:?} is not supported (supported: {})", supported()))?,
            ),
            None => None,
        };
        let mut family = by_type;
        for a in self.architectures.iter().flatten() {
            let Some(f) = Family::ALL.into_iter().find(|f| f.architecture() == a) else {
                let known: Vec<&str> = Family::ALL.iter().map(|f| f.architecture()).collect();
                return Err(format!(
                    "architectures names {a:?}, which is not supported (supported: {})",
                    known.join(", ")
                ));
            };
            match family {
                Some(g) if g != f => {
                    return Err(format!(
                        "architectures names {a:?} but model_type is {:?}: which model is it?",
                        g.model_type()
                    ))
                }
                _ => family = Some(f),
            }
        }
        Ok(family.unwrap_or(Family::Llama))
    }

    /// Why melora cannot run this model as its configuration says, if it
    /// cannot: a setting it does not implement would give wrong logits
    /// without a word.
    fn unsupported(&self, family: Family) -> Option<String> {
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Some(format!("hidden_act {act:?} is not supported (the MLP is SwiGLU: silu)"));
        }
        // Only Llama's MLP reads `mlp_bias`.
        if family == Family::Llama && self.mlp_bias == Some(true) {
            return Some("mlp_bias is true: MLP biases are not supported".into());
        }
        // Qwen's windows are per layer (`max_window_layers`, `layer_types`).
        if matches!(family, Family::Qwen2 | Family::Qwen3) && self.use_sliding_window == Some(true) {
            return Some(
                "use_sliding_window is true: per-layer sliding windows are not supported (Mistral's, on every layer, is)"
                    .into(),
            );
        }
        if let Some((key, _, kind)) = self
            .rope_dict()
            .filter(|(_, _, k)| k != "default" && !ROPE_TYPES.contains(&k.as_str()))
        {
            return Some(format!(
                "{key} is {kind:?}: that rope scaling is not supported (supported: default, {})",
                ROPE_TYPES.join(", ")
            ));
        }
        None
    }

    /// The rope scaling settings, where they are (`rope_scaling`, or
    /// transformers 5's `rope_parameters`), and their type (`rope_type`,
    /// or the older `type`; `default` when neither is given).
    fn rope_dict(&self) -> Option<(&'static str, &serde_json::Value, String)> {
        let (key, dict) = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(d), _) if !d.is_null() => ("rope_scaling", d),
            (_, Some(d)) if !d.is_null() => ("rope_parameters.rope_type", d),
            _ => return None,
        };
        let kind = ["rope_type", "type"]
            .iter()
            .find_map(|k| dict.get(k).and_then(|t| t.as_str()))
            .unwrap_or("default");
        Some((key, dict, kind.to_string()))
    }

    /// The rope scaling (`original_max_position_embeddings` defaults to
    /// `max_positions`, as transformers' `standardize_rope_params`).
    fn rope_scaling(&self, max_positions: usize) -> Result<RopeScaling, String> {
        let Some((key, dict, kind)) = self.rope_dict() else {
            return Ok(RopeScaling::None);
        };
        let number = |name: &str| {
            dict.get(name)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| format!("{key} {kind:?} needs a number {name}"))
        };
        let scaling = match kind.as_str() {
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: dict
                    .get("original_max_position_embeddings")
                    .and_then(|v| v.as_u64())
                    .map_or(max_positions, |v| v as usize),
            },
            _ => RopeScaling::None,
        };
        Ok(scaling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_rope_theta_layouts_are_read() {
        let dir = std::env::temp_dir().join(format!("melora-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1"#;
        let old = dir.join("old.json");
        std::fs::write(&old, format!("{{{base}, \"rope_theta\": 500000.0}}")).unwrap();
        let new = dir.join("new.json");
        std::fs::write(
            &new,
            format!("{{{base}, \"rope_parameters\": {{\"rope_theta\": 1234.0, \"rope_type\": \"default\"}}}}"),
        )
        .unwrap();
        assert_eq!(LlamaConfig::from_hf_json(&old).unwrap().rope_theta, 500000.0);
        let c = LlamaConfig::from_hf_json(&new).unwrap();
        assert_eq!((c.rope_theta, c.head_dim, c.num_key_value_heads), (1234.0, 4, 1));
        let bad = dir.join("bad.json");
        let three_heads = r#"{"vocab_size": 10, "hidden_size": 12, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2}"#;
        std::fs::write(&bad, three_heads).unwrap();
        let err = LlamaConfig::from_hf_json(&bad).unwrap_err().to_string();
        assert!(err.contains("not a multiple"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A configuration melora would run wrongly is refused, naming the file,
    /// the key and what is supported; the keys a Llama folder carries at
    /// their Llama values are accepted.
    #[test]
    fn what_melora_cannot_run_is_refused() {
        let dir = std::env::temp_dir().join(format!("melora-refuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1"#;
        let read = |name: &str, extra: &str| {
            let path = dir.join(format!("{name}.json"));
            std::fs::write(&path, format!("{{{base}, {extra}}}")).unwrap();
            LlamaConfig::from_hf_json(&path).map_err(|e| e.to_string())
        };
        let llama = r#""model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "attention_bias": false, "mlp_bias": false, "rope_scaling": null"#;
        read("llama", llama).unwrap();
        // The families' own keys, at values melora runs.
        let family = |extra: &str| read("family", extra).unwrap();
        let c = family(r#""model_type": "llama", "attention_bias": true"#);
        assert_eq!((c.family, c.qkv_bias, c.o_bias), (Family::Llama, true, true));
        let c = family(r#""architectures": ["Qwen2ForCausalLM"], "use_sliding_window": false, "sliding_window": 4096"#);
        assert_eq!(
            (c.family, c.qkv_bias, c.o_bias, c.sliding_window),
            (Family::Qwen2, true, false, None)
        );
        let c = family(r#""model_type": "qwen3", "head_dim": 16, "attention_bias": false"#);
        assert_eq!(
            (c.family, c.qk_norm, c.head_dim, c.qkv_bias),
            (Family::Qwen3, true, 16, false)
        );
        // Mistral's window: absent is MistralConfig's default, null none.
        assert_eq!(family(r#""model_type": "mistral""#).sliding_window, Some(4096));
        assert_eq!(
            family(r#""model_type": "mistral", "sliding_window": null, "head_dim": null"#).sliding_window,
            None
        );
        assert_eq!(
            family(r#""model_type": "mistral", "sliding_window": 7"#).sliding_window,
            Some(7)
        );
        read(
            "default-rope",
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}"#,
        )
        .unwrap();
        for (name, extra, expected) in [
            (
                "gemma",
                r#""model_type": "gemma2""#,
                r#"model_type "gemma2" is not supported (supported: llama, mistral, qwen2, qwen3)"#,
            ),
            (
                "arch",
                r#""architectures": ["MixtralForCausalLM"]"#,
                r#"architectures names "MixtralForCausalLM", which is not supported"#,
            ),
            (
                "disagree",
                r#""model_type": "qwen2", "architectures": ["LlamaForCausalLM"]"#,
                r#"architectures names "LlamaForCausalLM" but model_type is "qwen2""#,
            ),
            (
                "act",
                r#""hidden_act": "gelu""#,
                r#"hidden_act "gelu" is not supported"#,
            ),
            ("mlp-bias", r#""mlp_bias": true"#, "mlp_bias is true"),
            (
                "qwen-window",
                r#""model_type": "qwen2", "use_sliding_window": true"#,
                "use_sliding_window is true: per-layer sliding windows are not supported",
            ),
            (
                "window",
                r#""model_type": "mistral", "sliding_window": "long""#,
                "sliding_window = \"long\" is not a number",
            ),
            (
                "dynamic",
                r#""rope_scaling": {"type": "dynamic", "factor": 2.0}"#,
                r#"rope_scaling is "dynamic": that rope scaling is not supported (supported: default, linear, llama3)"#,
            ),
            (
                "llama3-partial",
                r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
                r#"rope_scaling "llama3" needs a number low_freq_factor"#,
            ),
            (
                "parameters",
                r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0}"#,
                r#"rope_parameters.rope_type is "yarn""#,
            ),
        ] {
            let err = read(name, extra).unwrap_err();
            assert!(
                err.contains(&format!("{name}.json")) && err.contains(expected),
                "{name}: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Both spellings of Llama 3's rope scaling and of linear scaling are
    /// read; `original_max_position_embeddings` defaults to the context.
    #[test]
    fn rope_scaling_in_both_spellings() {
        let dir = std::env::temp_dir().join(format!("melora-rope-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "max_position_embeddings": 128,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1"#;
        let read = |name: &str, extra: &str| {
            let path = dir.join(format!("{name}.json"));
            std::fs::write(&path, format!("{{{base}, {extra}}}")).unwrap();
            LlamaConfig::from_hf_json(&path).unwrap()
        };
        let llama3 = r#""factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0"#;
        let old = read(
            "old",
            &format!(
                r#""rope_theta": 500000.0, "rope_scaling": {{"rope_type": "llama3", {llama3}, "original_max_position_embeddings": 64}}"#
            ),
        );
        let new = read(
            "new",
            &format!(
                r#""rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, {llama3}, "original_max_position_embeddings": 64}}"#
            ),
        );
        let expected = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        assert_eq!((old.rope_theta, &old.rope_scaling), (500000.0, &expected));
        assert_eq!(old, new);
        let unset = read(
            "unset",
            &format!(r#""rope_scaling": {{"rope_type": "llama3", {llama3}}}"#),
        );
        assert!(matches!(
            unset.rope_scaling,
            RopeScaling::Llama3 {
                original_max_position_embeddings: 128,
                ..
            }
        ));
        let linear = read("linear", r#""rope_scaling": {"type": "linear", "factor": 2.0}"#);
        assert_eq!(linear.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        std::fs::remove_dir_all(&dir).ok();
    }
}
