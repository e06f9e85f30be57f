//! Forward + backward of one adapted layer at Llama-2-7B's attention shape
//! (4096 x 4096, r = 8) on a batch of 4 x 300 tokens, ndarray backend:
//! LoRA, BLoB and Me-LoRA in their training sampling modes, and the frozen
//! base layer alone for reference. As inside a model, the input needs its
//! gradient (earlier layers train), so every case pays the base layer's
//! backward too. The loss is read back to the host, so every timed
//! iteration includes the whole computation.

use burn::backend::{Autodiff, NdArray};
use burn::nn::LinearConfig;
use burn::tensor::backend::Backend;
use criterion::{criterion_group, criterion_main, Criterion};
use melora_core::{
    Adapter, AdapterConfig, BlobLinearConfig, LoraLinearConfig, LowRankConfig, MeLoraLinearConfig, NoiseSource,
    Sampler, SamplingMode,
};

type B = Autodiff<NdArray<f32>>;

fn bench(c: &mut Criterion) {
    // The binaries' process set-up: the GEMMs split over rayon's threads.
    melora_cli::backend::tune_process();
    let device = Default::default();
    B::seed(&device, 0);
    let (d, r, batch, seq) = (4096, 8, 4, 300);
    let base = LinearConfig::new(d, d).with_bias(false).init::<B>(&device);
    let x = NoiseSource::seeded(1)
        .normal::<B, 3>([batch, seq, d], &device)
        .require_grad();
    let low_rank = LowRankConfig::new().with_rank(r);
    let cases = [
        (
            "lora",
            AdapterConfig::Lora(LoraLinearConfig::new().with_low_rank(low_rank.clone())),
            SamplingMode::Mean,
        ),
        (
            "blob per-example",
            AdapterConfig::Blob(BlobLinearConfig::new().with_low_rank(low_rank.clone())),
            SamplingMode::PerExample,
        ),
        (
            "blob flipout",
            AdapterConfig::Blob(BlobLinearConfig::new().with_low_rank(low_rank.clone())),
            SamplingMode::Flipout,
        ),
        (
            "melora per-example",
            AdapterConfig::MeLora(MeLoraLinearConfig::new().with_low_rank(low_rank.clone())),
            SamplingMode::PerExample,
        ),
    ];
    let mut group = c.benchmark_group("adapter forward+backward 4096x4096 r8, 4x300 tokens");
    group.sample_size(10);
    group.bench_function("base layer only", |b| {
        let frozen = burn::module::Module::no_grad(base.clone());
        b.iter(|| {
            let loss = melora_kernels::linear_forward(&frozen, x.clone()).powi_scalar(2).mean();
            let value: f32 = loss.clone().into_scalar();
            let grads = loss.backward();
            let _ = x.grad(&grads);
            value
        })
    });
    for (name, config, mode) in cases {
        let adapter = config.init(base.clone(), &mut NoiseSource::seeded(0)).unwrap();
        let mut noise = NoiseSource::seeded(2);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut sampler = Sampler::new(mode, &mut noise).with_dropout(true);
                let loss = adapter
                    .forward(x.clone(), &mut sampler)
                    .powi_scalar(2)
                    .mean()
                    .add(adapter.kl(0.2).mul_scalar(1e-4));
                let value: f32 = loss.clone().into_scalar();
                let grads = loss.backward();
                let _ = x.grad(&grads);
                value
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
