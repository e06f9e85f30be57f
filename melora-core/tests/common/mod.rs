//! What the adapter tests share: seeded base layers and inputs, and
//! adapters with every tensor random.
#![allow(dead_code)]

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor};
use melora_core::{
    AdapterConfig, AdapterKind, AnyAdapter, BlobLinearConfig, LoraLinearConfig, LowRankConfig, MeLoraLinearConfig,
    NoiseSource, SamplingMode,
};

pub type B = NdArray<f64>;
pub type AD = Autodiff<NdArray<f64>>;

pub const MODES: [SamplingMode; 4] = [
    SamplingMode::Mean,
    SamplingMode::PerBatch,
    SamplingMode::PerExample,
    SamplingMode::Flipout,
];

/// A base layer with seeded weights (not the backend's global generator,
/// which tests running in parallel share).
pub fn base<Bk: Backend>(d_in: usize, d_out: usize, seed: u64) -> Linear<Bk> {
    let mut linear = LinearConfig::new(d_in, d_out).init(&Default::default());
    let scale = 1.0 / (d_in as f64).sqrt();
    linear.weight = Param::from_tensor(normal::<Bk, 2>([d_in, d_out], seed + 100, scale));
    linear.bias = Some(Param::from_tensor(normal::<Bk, 1>([d_out], seed + 101, scale)));
    linear
}

pub fn normal<Bk: Backend, const D: usize>(shape: [usize; D], seed: u64, scale: f64) -> Tensor<Bk, D> {
    NoiseSource::seeded(seed)
        .normal::<Bk, D>(shape, &Default::default())
        .mul_scalar(scale)
}

pub fn host(t: Tensor<impl Backend, 3>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

pub fn low_rank(rank: usize) -> LowRankConfig {
    LowRankConfig::new().with_rank(rank).with_dropout(0.1)
}

pub fn configs(rank: usize) -> Vec<AdapterConfig> {
    vec![
        AdapterConfig::Lora(LoraLinearConfig::new().with_low_rank(low_rank(rank))),
        AdapterConfig::Blob(BlobLinearConfig::new().with_low_rank(low_rank(rank))),
        AdapterConfig::MeLora(MeLoraLinearConfig::new().with_low_rank(low_rank(rank))),
    ]
}

/// An adapter with every trainable tensor random (B != 0, sizeable stds).
pub fn random_adapter<Bk: Backend>(
    kind: AdapterKind,
    d_in: usize,
    d_out: usize,
    r: usize,
    seed: u64,
) -> AnyAdapter<Bk> {
    let base = base::<Bk>(d_in, d_out, seed);
    let a = normal::<Bk, 2>([r, d_in], seed + 1, 0.5);
    let b = normal::<Bk, 2>([d_out, r], seed + 2, 0.5);
    match kind {
        AdapterKind::Lora => AnyAdapter::Lora(
            LoraLinearConfig::new()
                .with_low_rank(low_rank(r))
                .init_with(base, a, b)
                .unwrap(),
        ),
        AdapterKind::Blob => {
            let g = normal::<Bk, 2>([r, d_in], seed + 3, 0.5);
            AnyAdapter::Blob(
                BlobLinearConfig::new()
                    .with_low_rank(low_rank(r))
                    .init_with(base, a, g, b)
                    .unwrap(),
            )
        }
        AdapterKind::MeLora => {
            let m = normal::<Bk, 2>([r, r], seed + 4, 1.0);
            let h = normal::<Bk, 2>([r, r], seed + 5, 0.7);
            AnyAdapter::MeLora(
                MeLoraLinearConfig::new()
                    .with_low_rank(low_rank(r))
                    .init_with(base, a, b, m, h)
                    .unwrap(),
            )
        }
    }
}
