//! What every adapter shares: the low-rank settings, the std
//! parameterisation, and the [`Adapter`] trait the model uses.

use crate::error::{check, CoreError};
use crate::sampling::Sampler;
use burn::config::Config;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, ElementConversion, Tensor};
use std::collections::HashSet;

/// The settings every low-rank adapter has (PEFT's `LoraConfig` subset).
#[derive(Config, Debug, PartialEq)]
pub struct LowRankConfig {
    /// The rank `r` of the update.
    #[config(default = 8)]
    pub rank: usize,
    /// The scale numerator: the update is multiplied by `alpha / r`.
    #[config(default = 16.0)]
    pub alpha: f64,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    #[config(default = false)]
    pub rslora: bool,
    /// Dropout probability on the adapter's input.
    #[config(default = 0.1)]
    pub dropout: f64,
}

impl LowRankConfig {
    /// Checks every field; the error names the field and the value.
    pub fn validate(&self) -> crate::Result<()> {
        check(self.rank > 0, "rank", self.rank, "must be at least 1")?;
        // Up to 1e4: far beyond any scaling in use (alpha = 2r or 16), short
        // of the values only a typo or a corrupt file gives.
        check(
            self.alpha > 0.0 && self.alpha <= 1e4,
            "alpha",
            self.alpha,
            "must be in (0, 1e4]",
        )?;
        check(
            (0.0..1.0).contains(&self.dropout),
            "dropout",
            self.dropout,
            "must be in [0, 1)",
        )
    }

    /// The factor applied to the low-rank update.
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Checks that the rank fits a base layer of the given sizes.
    pub(crate) fn validate_for(&self, d_input: usize, d_output: usize) -> crate::Result<()> {
        self.validate()?;
        check(
            self.rank <= d_input.min(d_output),
            "rank",
            format!("{} for a {d_input} -> {d_output} layer", self.rank),
            "must not exceed min(d_input, d_output)",
        )
    }
}

/// How a standard deviation is obtained from its unconstrained parameter.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum StdParam {
    /// `std = g^2` (BLoB's and the paper's choice).
    Square,
    /// `std = ln(1 + e^g)`.
    Softplus,
}

/// The smallest standard deviation whose logarithm is taken: keeps `ln std`
/// finite (and its gradient bounded) when a std collapses to zero.
pub const MIN_STD: f64 = 1e-30;

impl StdParam {
    /// The standard deviation from its parameter.
    pub fn std<B: Backend, const D: usize>(&self, g: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Square => g.clone().mul(g),
            Self::Softplus => burn::tensor::activation::softplus(g, 1.0),
        }
    }

    /// The parameter that gives the standard deviation `std` (inverse map;
    /// for `Square` the positive root).
    pub fn inverse<B: Backend, const D: usize>(&self, std: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Square => std.sqrt(),
            Self::Softplus => std.exp().sub_scalar(1.0).log(),
        }
    }
}

/// `ln std`, computed safely: the std is clamped at [`MIN_STD`] first.
pub fn safe_log<B: Backend, const D: usize>(std: Tensor<B, D>) -> Tensor<B, D> {
    std.clamp_min(MIN_STD).log()
}

/// The parameter ids of an adapter, split into the two groups the
/// optimisers of docs/method.md section 2 step apart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamGroups {
    /// Mean parameters (`A`, `B`, `M`, `M_A`): AdamW's.
    pub mean: Vec<ParamId>,
    /// Standard-deviation parameters (`H`, `G_A`): the second optimiser's
    /// (Adam under `StdAdam`, SGD under `TwoOptimizers`).
    pub std: Vec<ParamId>,
}

impl ParamGroups {
    /// All trainable parameter ids.
    pub fn all(&self) -> Vec<ParamId> {
        self.mean.iter().chain(&self.std).copied().collect()
    }

    /// Appends another group's ids (for a model with many adapters).
    pub fn extend(&mut self, other: ParamGroups) {
        self.mean.extend(other.mean);
        self.std.extend(other.std);
    }
}

/// Which of the two groups of docs/method.md section 2 a parameter is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// A mean parameter (`A`, `B`, `M`, `M_A`).
    Mean,
    /// A standard-deviation parameter (`H`, `G_A`).
    Std,
}

/// One of an adapter's tensors, as [`Adapter::named_params`] lists it.
#[derive(Debug)]
pub struct NamedParam<'a, B: Backend> {
    /// Its name in adapter files: PEFT's key suffix (`lora_A`, `lora_B`,
    /// and melora's `lora_A_std`, `lora_M`, `lora_H`).
    pub name: &'static str,
    /// Mean or std parameter.
    pub role: ParamRole,
    /// The parameter.
    pub param: &'a Param<Tensor<B, 2>>,
}

/// The interface the model uses for any adapted linear layer.
pub trait Adapter<B: Backend>: Module<B> {
    /// The adapted layer's output on a batch of sequences (the form the
    /// model calls).
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, d_input]`
    /// - output: `[batch, seq, d_output]`
    fn forward_seq(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3>;

    /// The adapted layer's output on any rank, as Burn's `Linear::forward`
    /// takes it, so an adapter goes where a `Linear` went: `[.., d_input]`
    /// to `[.., d_output]`. The first axis (of two or more) holds the
    /// examples, each with its own draw under per-example sampling; the
    /// axes between the first and the last are its sequence.
    fn forward<const D: usize>(&self, x: Tensor<B, D>, sampler: &mut Sampler) -> Tensor<B, D>
    where
        Self: Sized,
    {
        let dims = x.dims();
        let d_input = dims[D - 1];
        let (examples, seq) = match D {
            1 => (1, 1),
            _ => (dims[0], dims[1..D - 1].iter().product()),
        };
        let y = self.forward_seq(melora_kernels::reshape(x, [examples, seq, d_input]), sampler);
        let mut out = dims;
        out[D - 1] = y.dims()[2];
        melora_kernels::reshape(y, out)
    }

    /// The update's rank-`r` code of `x`, drawn as `forward` draws it and
    /// scaled: `scaling * A dropout(x)` (LoRA), with `A` sampled (BLoB),
    /// `scaling * C A dropout(x)` with `C` sampled (Me-LoRA). The update
    /// is `code B^T`, so `forward(x) = base(x) + code(x) B^T`; a caller
    /// that needs the update at a few rows only (an output layer's logits
    /// at the scored positions) multiplies those rows by [`Adapter::lora_b`].
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, d_input]`
    /// - output: `[batch, seq, r]`
    fn code(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3>;

    /// `B`, `[d_output, r]`.
    fn lora_b(&self) -> Tensor<B, 2>;

    /// The KL term of this layer against its prior with standard deviation
    /// `prior_std` (zero for deterministic adapters). Shape `[1]`.
    fn kl(&self, prior_std: f64) -> Tensor<B, 1>;

    /// The mean update `scaling * B X A` in `[d_output, d_input]` layout
    /// (PEFT's `get_delta_weight`).
    fn delta_weight(&self) -> Tensor<B, 2>;

    /// The frozen base layer.
    fn base(&self) -> &Linear<B>;

    /// Every trainable tensor of the adapter with its file name and role:
    /// the one list of an adapter's tensors that saving, loading, stable
    /// parameter ids and the optimiser groups walk. Its order is the order
    /// of the tensors in the adapter's `init_with`.
    fn named_params(&self) -> Vec<NamedParam<'_, B>>;

    /// The same tensors as [`Adapter::named_params`], in the same order, to
    /// replace.
    fn named_params_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)>;

    /// The mean parameters and the std parameters, in
    /// [`Adapter::named_params`] order.
    fn param_groups(&self) -> ParamGroups {
        let mut groups = ParamGroups::default();
        for p in self.named_params() {
            match p.role {
                ParamRole::Mean => groups.mean.push(p.param.id),
                ParamRole::Std => groups.std.push(p.param.id),
            }
        }
        groups
    }

    /// A plain linear layer with the mean update merged into the base weight.
    /// Fails if the result has a NaN or an infinity.
    fn merge(&self) -> crate::Result<Linear<B>> {
        let base = self.base();
        let weight = base.weight.val().add(self.delta_weight().transpose());
        let non_finite: i64 = weight.clone().is_finite().bool_not().int().sum().into_scalar().elem();
        if non_finite != 0 {
            return Err(CoreError::NonFiniteMerge);
        }
        Ok(Linear {
            weight: Param::from_tensor(weight.set_require_grad(false)),
            bias: base.bias.clone(),
        })
    }

    /// The number of trainable values, counted by visiting the module's
    /// parameters and keeping those of [`Adapter::param_groups`].
    fn num_trainable(&self) -> usize {
        count_params(self, &self.param_groups().all())
    }
}

/// The number of values in the parameters of `module` whose id is in `ids`,
/// counted by visiting the module.
pub fn count_params<B: Backend, M: Module<B>>(module: &M, ids: &[ParamId]) -> usize {
    struct Counter<'a> {
        ids: &'a HashSet<ParamId>,
        total: usize,
    }
    impl<B: Backend> ModuleVisitor<B> for Counter<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.ids.contains(&param.id) {
                self.total += param.shape().num_elements();
            }
        }
    }
    let ids: HashSet<ParamId> = ids.iter().copied().collect();
    let mut counter = Counter { ids: &ids, total: 0 };
    module.visit(&mut counter);
    counter.total
}

/// Checks a tensor's shape against the expected one.
pub(crate) fn expect_shape(name: &str, found: &[usize], expected: &[usize]) -> crate::Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(CoreError::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }
}
