//! The Llama configuration: presets, Hugging Face `config.json`, GGUF metadata.

use crate::error::LlamaError;
use burn::config::Config;
use serde::Deserialize;
use std::path::Path;

/// The architecture of a Llama decoder.
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden (model) width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer).
    pub num_key_value_heads: usize,
    /// Width of one head (usually `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RoPE base frequency.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    /// Whether the output layer is the token embedding.
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for.
    #[config(default = 4096)]
    pub max_position_embeddings: usize,
    /// How the rotary frequencies are scaled (Llama 3.1 and later: `Llama3`).
    #[config(default = "RopeScaling::None")]
    pub rope_scaling: RopeScaling,
}

/// How the rotary frequencies are scaled for a longer context, as
/// transformers computes them (`modeling_rope_utils.py`:
/// `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`).
#[derive(Config, Debug, PartialEq)]
pub enum RopeScaling {
    /// None: frequency `i` of `d` is `theta^(-2i/d)`.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's: wavelengths longer than `original / low_freq_factor`
    /// divided by `factor`, shorter than `original / high_freq_factor`
    /// kept, the ones between interpolated.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Sets the longest wavelength kept whole: `original / low_freq_factor`.
        low_freq_factor: f64,
        /// Sets the shortest wavelength scaled: `original / high_freq_factor`.
        high_freq_factor: f64,
        /// The context the model was first trained for (`original`).
        original_max_position_embeddings: usize,
    },
    /// A divisor per frequency, as a GGUF stores Llama 3's scaling
    /// (`rope_freqs.weight`, written by llama.cpp's `convert_hf_to_gguf.py`
    /// from the `Llama3` settings).
    Factors {
        /// Frequency `i` is `theta^(-2i/d) / factors[i]`.
        factors: Vec<f64>,
    },
}

impl RopeScaling {
    /// The rotation period (in positions, over `2 pi`) of each of the
    /// `head_dim / 2` frequencies: a position `p` turns frequency `i` by
    /// `p / periods[i]`.
    pub fn periods(&self, theta: f64, head_dim: usize) -> Vec<f64> {
        let base = (0..head_dim / 2).map(|i| theta.powf(2.0 * i as f64 / head_dim as f64));
        match *self {
            Self::None => base.collect(),
            Self::Linear { factor } => base.map(|p| p * factor).collect(),
            Self::Factors { ref factors } => base.zip(factors).map(|(p, f)| p * f).collect(),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let original = original_max_position_embeddings as f64;
                let (low_wavelength, high_wavelength) = (original / low_freq_factor, original / high_freq_factor);
                base.map(|period| {
                    let (inv_freq, wavelength) = (1.0 / period, 2.0 * std::f64::consts::PI * period);
                    let scaled = if wavelength > low_wavelength {
                        inv_freq / factor
                    } else {
                        inv_freq
                    };
                    let medium = !(wavelength < high_wavelength) && !(wavelength > low_wavelength);
                    let inv_freq = if medium {
                        let smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                    1.0 / inv_freq
                })
                .collect()
            }
        }
    }

    /// Checks the factors.
    pub fn validate(&self) -> Result<(), LlamaError> {
        let ok = match *self {
            Self::None => true,
            Self::Factors { ref factors } => factors.iter().all(|f| f.is_finite() && *f > 0.0),
            Self::Linear { factor } => factor > 0.0,
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                factor > 0.0
                    && low_freq_factor > 0.0
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0
            }
        };
        match ok {
            true => Ok(()),
            false => Err(LlamaError::Config(format!(
                "rope scaling {self:?}: factors must be positive, high_freq_factor above low_freq_factor"
            ))),
        }
    }
}

impl LlamaConfig {
    /// Llama-2-7B (Touvron et al. 2023), the paper's first model
    /// (`meta-llama/Llama-2-7b-hf`'s `config.json`).
    pub fn llama2_7b() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            max_position_embeddings: 4096,
            rope_scaling: RopeScaling::None,
        }
    }

    /// Llama-2-13B (`meta-llama/Llama-2-13b-hf`).
    pub fn llama2_13b() -> Self {
        Self {
            hidden_size: 5120,
            intermediate_size: 13824,
            num_hidden_layers: 40,
            num_attention_heads: 40,
            num_key_value_heads: 40,
            ..Self::llama2_7b()
        }
    }

    /// Llama-3.1-8B (`meta-llama/Llama-3.1-8B`'s `config.json`): grouped-query
    /// attention with 8 key/value heads and Llama 3's rope scaling.
    pub fn llama31_8b() -> Self {
        Self {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            max_position_embeddings: 131072,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        }
    }

    /// SmolLM2-135M, the CPU default (`HuggingFaceTB/SmolLM2-135M`).
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rope_theta: 100000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            rope_scaling: RopeScaling::None,
        }
    }

    /// A preset by name: `llama2-7b`, `llama2-13b`, `llama3.1-8b`,
    /// `smollm2-135m`.
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama2-7b" | "llama-2-7b" => Some(Self::llama2_7b()),
            "llama2-13b" | "llama-2-13b" => Some(Self::llama2_13b()),
            "llama3.1-8b" | "llama-3.1-8b" => Some(Self::llama31_8b()),
            "smollm2-135m" => Some(Self::smollm2_135m()),
            _ => None,
        }
    }

    /// Checks that the sizes are consistent.
    pub fn validate(&self) -> Result<(), LlamaError> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(LlamaError::Config(format!("{name} must be positive")));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(LlamaError::Config(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(LlamaError::Config(format!(
                "head_dim = {} must be even for RoPE",
                self.head_dim
            )));
        }
        self.rope_scaling.validate()?;
        if let RopeScaling::Factors { factors } = &self.rope_scaling {
            if factors.len() != self.head_dim / 2 {
                return Err(LlamaError::Config(format!(
                    "{} rope factors for head_dim = {} (one per frequency: {})",
                    factors.len(),
                    self.head_dim,
                    self.head_dim / 2
                )));
            }
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps >= 0.0) {
            return Err(LlamaError::Config(format!(
                "rope_theta = {} must be positive and rms_norm_eps = {} non-negative",
                self.rope_theta, self.rms_norm_eps
            )));
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` (a top-level `rope_theta` or the
    /// newer `rope_parameters.rope_theta`). A model melora would run wrongly
    /// is refused, naming the key: another `model_type` or architecture,
    /// rope scaling, biases, another activation ([`HfConfig::unsupported`]).
    pub fn from_hf_json(path: &Path) -> Result<Self, LlamaError> {
        let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| LlamaError::format(path, e.to_string()))?;
        if let Some(why) = hf.unsupported() {
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
        let config = Self::new(
            hf.vocab_size,
            hf.hidden_size,
            hf.intermediate_size,
            hf.num_hidden_layers,
            heads,
            hf.num_key_value_heads.unwrap_or(heads),
            hf.head_dim.unwrap_or(hf.hidden_size / heads),
        )
        .with_rope_theta(rope_theta)
        .with_rms_norm_eps(hf.rms_norm_eps.unwrap_or(1e-6))
        .with_tie_word_embeddings(hf.tie_word_embeddings.unwrap_or(false))
        .with_max_position_embeddings(max_position_embeddings)
        .with_rope_scaling(rope_scaling);
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

/// The model families melora runs (`model_type`).
const MODEL_TYPES: [&str; 1] = ["llama"];

/// Their architectures (`architectures`).
const ARCHITECTURES: [&str; 1] = ["LlamaForCausalLM"];

impl HfConfig {
    /// Why melora cannot run this model as its configuration says, if it
    /// cannot: a setting it does not implement would give wrong logits
    /// without a word.
    fn unsupported(&self) -> Option<String> {
        if let Some(t) = self.model_type.as_deref().filter(|t| !MODEL_TYPES.contains(t)) {
            return Some(format!(
                "model_type {t:?} is not supported (supported: {})",
                MODEL_TYPES.join(", ")
            ));
        }
        let architectures = self.architectures.iter().flatten();
        if let Some(a) = architectures.into_iter().find(|a| !ARCHITECTURES.contains(&a.as_str())) {
            return Some(format!(
                "architectures names {a:?}, which is not supported (supported: {})",
                ARCHITECTURES.join(", ")
            ));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Some(format!("hidden_act {act:?} is not supported (the MLP is SwiGLU: silu)"));
        }
        for (key, flag) in [("attention_bias", self.attention_bias), ("mlp_bias", self.mlp_bias)] {
            if flag == Some(true) {
                return Some(format!("{key} is true: biases are not supported"));
            }
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
        read(
            "default-rope",
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}"#,
        )
        .unwrap();
        for (name, extra, expected) in [
            (
                "qwen2",
                r#""model_type": "qwen2""#,
                r#"model_type "qwen2" is not supported (supported: llama)"#,
            ),
            (
                "arch",
                r#""architectures": ["MistralForCausalLM"]"#,
                r#"architectures names "MistralForCausalLM""#,
            ),
            (
                "act",
                r#""hidden_act": "gelu""#,
                r#"hidden_act "gelu" is not supported"#,
            ),
            ("attn-bias", r#""attention_bias": true"#, "attention_bias is true"),
            ("mlp-bias", r#""mlp_bias": true"#, "mlp_bias is true"),
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

    /// Llama 3's frequencies in each regime, by hand: head_dim 16, theta
    /// 10000, original 64, factors (8, 1, 4): the wavelengths 2 pi 10^(i/2)
    /// below 16 are kept, above 64 divided by 8, between interpolated.
    #[test]
    fn llama3_periods_by_regime() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let plain = RopeScaling::None.periods(10000.0, 16);
        let scaled = scaling.periods(10000.0, 16);
        assert_eq!(scaled[0], plain[0], "wavelength 6.3 < 16: kept");
        for i in 3..8 {
            assert!(
                (scaled[i] / plain[i] - 8.0).abs() < 1e-12,
                "wavelength > 64: divided by 8"
            );
        }
        // Wavelength 2 pi sqrt(10) = 19.87: smooth = (64 / 19.87 - 1) / 3.
        let smooth = (64.0 / (2.0 * std::f64::consts::PI * 10f64.sqrt()) - 1.0) / 3.0;
        let inv = 1.0 / plain[1];
        let expected = 1.0 / ((1.0 - smooth) * inv / 8.0 + smooth * inv);
        assert!((scaled[1] - expected).abs() < 1e-12 * expected);
        let linear = RopeScaling::Linear { factor: 2.0 }.periods(10000.0, 16);
        assert!(linear.iter().zip(&plain).all(|(l, p)| *l == 2.0 * p));
    }

    #[test]
    fn presets_are_valid() {
        for name in ["llama2-7b", "llama2-13b", "llama3.1-8b", "smollm2-135m"] {
            LlamaConfig::preset(name).unwrap().validate().unwrap();
        }
    }
}
