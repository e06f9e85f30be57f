//! One configuration and one module type for "any adapter", so the model can
//! hold LoRA, BLoB or Me-LoRA layers chosen at run time.

use crate::adapter::{Adapter, LowRankConfig, NamedParam, ParamGroups};
use crate::blob::{BlobLinear, BlobLinearConfig};

use crate::lora::{LoraLinear, LoraLinearConfig};
use crate::melora::{MeLoraLinear, MeLoraLinearConfig};
use crate::noise::NoiseSource;
use crate::sampling::Sampler;
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

/// The three adapter families.
#[derive(Config, Debug, Copy, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    /// LoRA.
    Lora,
    /// BLoB.
    Blob,
    /// Me-LoRA.
    MeLora,
}

impl std::str::FromStr for AdapterKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "lora" => Ok(Self::Lora),
            "blob" => Ok(Self::Blob),
            "melora" => Ok(Self::MeLora),
            _ => Err(format!("unknown adapter {s:?}: expected lora, blob or melora")),
        }
    }
}

/// The configuration of one of the three adapters.
#[derive(Config, Debug)]
pub enum AdapterConfig {
    /// LoRA.
    Lora(LoraLinearConfig),
    /// BLoB.
    Blob(BlobLinearConfig),
    /// Me-LoRA.
    MeLora(MeLoraLinearConfig),
}

impl AdapterConfig {
    /// Which family this is.
    pub fn kind(&self) -> AdapterKind {
        match self {
            Self::Lora(_) => AdapterKind::Lora,
            Self::Blob(_) => AdapterKind::Blob,
            Self::MeLora(_) => AdapterKind::MeLora,
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> crate::Result<()> {
        match self {
            Self::Lora(c) => c.low_rank.validate(),
            Self::Blob(c) => c.validate(),
            Self::MeLora(c) => c.validate(),
        }
    }

    /// Rank, scaling and dropout.
    pub fn low_rank(&self) -> &LowRankConfig {
        match self {
            Self::Lora(c) => &c.low_rank,
            Self::Blob(c) => &c.low_rank,
            Self::MeLora(c) => &c.low_rank,
        }
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        match self {
            Self::Lora(c) => c.low_rank.rank,
            Self::Blob(c) => c.low_rank.rank,
            Self::MeLora(c) => c.low_rank.rank,
        }
    }

    /// The names of the adapter's tensors ([`Adapter::named_params`]'s), in
    /// the order [`AdapterConfig::init_named`] takes them.
    pub fn param_names(&self) -> &'static [&'static str] {
        match self {
            Self::Lora(_) => &crate::lora::LORA_PARAMS,
            Self::Blob(_) => &crate::blob::BLOB_PARAMS,
            Self::MeLora(_) => &crate::melora::MELORA_PARAMS,
        }
    }

    /// Wraps `base` with an adapter of this configuration holding the given
    /// tensors, one per name of [`AdapterConfig::param_names`] in that
    /// order (shapes checked; the error names the tensor).
    pub fn init_named<B: Backend>(&self, base: Linear<B>, tensors: Vec<Tensor<B, 2>>) -> crate::Result<AnyAdapter<B>> {
        let names = self.param_names();
        if tensors.len() != names.len() {
            return Err(crate::CoreError::TensorCount {
                expected: names.join(", "),
                found: tensors.len(),
            });
        }
        let mut t = tensors.into_iter();
        let mut next = || t.next().expect("counted above");
        Ok(match self {
            Self::Lora(c) => AnyAdapter::Lora(c.init_with(base, next(), next())?),
            Self::Blob(c) => AnyAdapter::Blob(c.init_with(base, next(), next(), next())?),
            Self::MeLora(c) => AnyAdapter::MeLora(c.init_with(base, next(), next(), next(), next())?),
        })
    }

    /// Wraps `base` with a fresh adapter of this configuration, drawn from `noise`.
    pub fn init<B: Backend>(&self, base: Linear<B>, noise: &mut NoiseSource) -> crate::Result<AnyAdapter<B>> {
        Ok(match self {
            Self::Lora(c) => AnyAdapter::Lora(c.init(base, noise)?),
            Self::Blob(c) => AnyAdapter::Blob(c.init(base, noise)?),
            Self::MeLora(c) => AnyAdapter::MeLora(c.init(base, noise)?),
        })
    }
}

/// Any of the three adapters, as one module type.
#[derive(Module, Debug)]
pub enum AnyAdapter<B: Backend> {
    /// LoRA.
    Lora(LoraLinear<B>),
    /// BLoB.
    Blob(BlobLinear<B>),
    /// Me-LoRA.
    MeLora(MeLoraLinear<B>),
}

/// The sum of the adapters' KL terms, shape `[1]` (0 without adapters).
///
/// Equal to summing [`Adapter::kl`], but the `ln det(A A^T)` terms of the
/// Me-LoRA adapters (the `Subspace` KL, computed on the host) take one copy
/// to the host and one back for all adapters, not one per adapter: on a GPU
/// each copy waits for the device.
pub fn total_kl<'a, B: Backend>(
    adapters: impl IntoIterator<Item = &'a AnyAdapter<B>>,
    prior_std: f64,
    device: &B::Device,
) -> Tensor<B, 1> {
    let adapters: Vec<&AnyAdapter<B>> = adapters.into_iter().collect();
    let inputs: Vec<Tensor<B, 2>> = adapters
        .iter()
        .filter_map(|a| match a {
            AnyAdapter::MeLora(m) => m.logdet_input(),
            _ => None,
        })
        .collect();
    let mut logdets = crate::kl::logdet_gram_terms(inputs).into_iter();
    adapters.into_iter().fold(Tensor::zeros([1], device), |total, adapter| {
        let kl = match adapter {
            AnyAdapter::MeLora(m) => {
                let logdet = m
                    .logdet_input()
                    .map(|_| logdets.next().expect("one ln det per Subspace adapter"));
                m.kl_given(prior_std, logdet)
            }
            other => other.kl(prior_std),
        };
        total.add(kl)
    })
}

macro_rules! dispatch {
    ($self:ident, $a:ident => $e:expr) => {
        match $self {
            AnyAdapter::Lora($a) => $e,
            AnyAdapter::Blob($a) => $e,
            AnyAdapter::MeLora($a) => $e,
        }
    };
}

impl<B: Backend> Adapter<B> for AnyAdapter<B> {
    fn forward_seq(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        dispatch!(self, a => a.forward_seq(x, sampler))
    }
    fn code(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        dispatch!(self, a => a.code(x, sampler))
    }
    fn lora_b(&self) -> Tensor<B, 2> {
        dispatch!(self, a => a.lora_b())
    }
    fn kl(&self, prior_std: f64) -> Tensor<B, 1> {
        dispatch!(self, a => a.kl(prior_std))
    }
    fn delta_weight(&self) -> Tensor<B, 2> {
        dispatch!(self, a => a.delta_weight())
    }
    fn base(&self) -> &Linear<B> {
        dispatch!(self, a => a.base())
    }
    fn named_params(&self) -> Vec<NamedParam<'_, B>> {
        dispatch!(self, a => a.named_params())
    }
    fn named_params_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        dispatch!(self, a => a.named_params_mut())
    }
    fn param_groups(&self) -> ParamGroups {
        dispatch!(self, a => a.param_groups())
    }
}
