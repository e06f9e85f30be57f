//! The Llama configuration: its shape, rope scaling and family features, and the presets
//! (Hugging Face `config.json`: [`super::hf`]; GGUF metadata: [`crate::weights::gguf`]).

use crate::error::LlamaError;
use burn::config::Config;

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
    /// The family, for the files melora writes (`model_type`,
    /// `architectures`); the features below say how the model computes.
    #[config(default = "Family::Llama")]
    pub family: Family,
    /// Biases on the query, key and value projections (Qwen2; Llama and
    /// Qwen3 with `attention_bias`).
    #[config(default = false)]
    pub qkv_bias: bool,
    /// A bias on the attention output projection (Llama and Qwen3 with
    /// `attention_bias`).
    #[config(default = false)]
    pub o_bias: bool,
    /// An RMSNorm over each query and key head before the rotary step
    /// (Qwen3's `q_norm`, `k_norm`).
    #[config(default = false)]
    pub qk_norm: bool,
    /// Each query sees only the last `sliding_window` positions, itself
    /// included (Mistral).
    #[config(default = "None")]
    pub sliding_window: Option<usize>,
}

/// The model families melora runs: the same decoder, told apart by the
/// features [`LlamaConfig`] lists and by the names their files use.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum Family {
    /// Llama 2 and 3.x, SmolLM2 (`llama`).
    Llama,
    /// Mistral (`mistral`): sliding-window attention.
    Mistral,
    /// Qwen2 and Qwen2.5 (`qwen2`): query, key and value biases.
    Qwen2,
    /// Qwen3 (`qwen3`): per-head query and key norms.
    Qwen3,
}

impl Family {
    /// Every family, in the order the guide lists them.
    pub const ALL: [Family; 4] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3];

    /// The `model_type` of its Hugging Face `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// Its transformers class (`architectures`).
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
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
            ..Self::plain_llama()
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
            ..Self::plain_llama()
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
            ..Self::plain_llama()
        }
    }

    /// Qwen2.5-7B (`Qwen/Qwen2.5-7B-Instruct`'s `config.json`): query, key
    /// and value biases, 4 key/value heads.
    pub fn qwen25_7b() -> Self {
        Self {
            vocab_size: 152064,
            hidden_size: 3584,
            intermediate_size: 18944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            head_dim: 128,
            rope_theta: 1000000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            max_position_embeddings: 32768,
            family: Family::Qwen2,
            qkv_bias: true,
            ..Self::plain_llama()
        }
    }

    /// The defaults of the fields a preset does not set: a Llama with no
    /// biases, head norms or window.
    fn plain_llama() -> Self {
        Self::new(1, 1, 1, 1, 1, 1, 2)
    }

    /// A preset by name: `llama2-7b`, `llama2-13b`, `llama3.1-8b`,
    /// `qwen2.5-7b`, `smollm2-135m`.
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama2-7b" | "llama-2-7b" => Some(Self::llama2_7b()),
            "llama2-13b" | "llama-2-13b" => Some(Self::llama2_13b()),
            "llama3.1-8b" | "llama-3.1-8b" => Some(Self::llama31_8b()),
            "qwen2.5-7b" | "qwen-2.5-7b" => Some(Self::qwen25_7b()),
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
        if self.sliding_window == Some(0) {
            return Err(LlamaError::Config(
                "sliding_window = 0 leaves a query nothing to see".into(),
            ));
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps >= 0.0) {
            return Err(LlamaError::Config(format!(
                "rope_theta = {} must be positive and rms_norm_eps = {} non-negative",
                self.rope_theta, self.rms_norm_eps
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for name in ["llama2-7b", "llama2-13b", "llama3.1-8b", "qwen2.5-7b", "smollm2-135m"] {
            LlamaConfig::preset(name).unwrap().validate().unwrap();
        }
    }
}
