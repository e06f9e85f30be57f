//! The adapters' sampling modes on ndarray (f64): per-example draws,
//! unbiased Monte Carlo means, LoRA deterministic in every mode, and any
//! input rank drawn as its sequence form draws.

mod common;

use burn::tensor::Tensor;
use common::*;
use melora_core::{Adapter, AdapterKind, AnyAdapter, NoiseSource, Sampler, SamplingMode};

#[test]
fn per_example_draws_differ_across_examples_and_repeat_with_the_seed() {
    // Two identical sequences in one batch.
    let one = normal::<B, 3>([1, 3, 6], 13, 1.0);
    let x = Tensor::cat(vec![one.clone(), one], 0);
    for kind in [AdapterKind::Blob, AdapterKind::MeLora] {
        let adapter = random_adapter::<B>(kind, 6, 4, 3, 40);
        let run = |mode, seed| {
            let mut noise = NoiseSource::seeded(seed);
            host(adapter.forward(x.clone(), &mut Sampler::new(mode, &mut noise)))
        };
        let half = 3 * 4;
        let per_example = run(SamplingMode::PerExample, 5);
        let gap = per_example[..half]
            .iter()
            .zip(&per_example[half..])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(gap > 1e-3, "{kind:?}: PerExample gave the same draw to both examples");
        assert_eq!(
            per_example,
            run(SamplingMode::PerExample, 5),
            "{kind:?}: same seed, different output"
        );
        assert_ne!(
            per_example,
            run(SamplingMode::PerExample, 6),
            "{kind:?}: different seeds, same output"
        );
        let per_batch = run(SamplingMode::PerBatch, 5);
        assert_eq!(
            per_batch[..half],
            per_batch[half..],
            "{kind:?}: PerBatch should share the draw"
        );
    }
}

#[test]
fn lora_is_deterministic_in_every_mode() {
    let x = normal::<B, 3>([2, 3, 6], 14, 1.0);
    let adapter = random_adapter::<B>(AdapterKind::Lora, 6, 4, 3, 50);
    let mut noise = NoiseSource::seeded(0);
    let mean = host(adapter.forward(x.clone(), &mut Sampler::new(SamplingMode::Mean, &mut noise)));
    for mode in MODES {
        assert_eq!(
            host(adapter.forward(x.clone(), &mut Sampler::new(mode, &mut noise))),
            mean
        );
    }
}

/// Monte Carlo mean of `passes` stochastic forwards against the mean-weight
/// output: every entry within 5 standard errors.
fn assert_unbiased(kind: AdapterKind, mode: SamplingMode, passes: usize) {
    let x = normal::<B, 3>([2, 3, 6], 15, 1.0);
    let adapter = random_adapter::<B>(kind, 6, 4, 3, 60);
    let mut noise = NoiseSource::seeded(9);
    let target = host(adapter.forward(x.clone(), &mut Sampler::new(SamplingMode::Mean, &mut noise)));
    let mut sum = vec![0.0; target.len()];
    let mut sum_sq = vec![0.0; target.len()];
    for _ in 0..passes {
        let out = host(adapter.forward(x.clone(), &mut Sampler::new(mode, &mut noise)));
        for (i, v) in out.iter().enumerate() {
            sum[i] += v;
            sum_sq[i] += v * v;
        }
    }
    let n = passes as f64;
    let mut max_z: f64 = 0.0;
    for i in 0..target.len() {
        let mean = sum[i] / n;
        let sd = (sum_sq[i] / n - mean * mean).max(0.0).sqrt();
        assert!(sd > 1e-3, "{kind:?} {mode:?}: output {i} does not vary");
        max_z = max_z.max((mean - target[i]).abs() / (sd / n.sqrt()));
    }
    assert!(
        max_z < 5.0,
        "{kind:?} {mode:?}: Monte Carlo mean is {max_z:.1} standard errors off"
    );
}

#[test]
fn blob_flipout_has_the_mean_weight_output_as_its_monte_carlo_mean() {
    assert_unbiased(AdapterKind::Blob, SamplingMode::Flipout, 4000);
}

#[test]
fn stochastic_modes_are_unbiased() {
    assert_unbiased(AdapterKind::Blob, SamplingMode::PerExample, 2000);
    assert_unbiased(AdapterKind::MeLora, SamplingMode::PerExample, 2000);
    assert_unbiased(AdapterKind::MeLora, SamplingMode::Flipout, 2000);
}

/// `forward` takes any rank, as Burn's `Linear` does: on `[n, d]` (each
/// row an example), `[d]` and `[2, 2, 3, d]` it equals the sequence form
/// on the same values laid out `[examples, seq, d]`, draw for draw, in
/// every sampling mode; at initialisation it is the base `Linear`'s
/// output on that rank.
#[test]
fn forward_takes_any_rank_like_burns_linear() {
    fn check<const D: usize>(adapter: &AnyAdapter<B>, x: Tensor<B, D>, seq: [usize; 3], kind: AdapterKind) {
        let out_dims = {
            let mut d = x.dims();
            d[D - 1] = 4;
            d
        };
        for mode in MODES {
            let run_any = {
                let mut noise = NoiseSource::seeded(7);
                adapter.forward(x.clone(), &mut Sampler::new(mode, &mut noise).with_dropout(true))
            };
            assert_eq!(run_any.dims(), out_dims);
            let run_seq = {
                let mut noise = NoiseSource::seeded(7);
                let mut sampler = Sampler::new(mode, &mut noise).with_dropout(true);
                adapter.forward_seq(x.clone().reshape(seq), &mut sampler)
            };
            assert_eq!(
                host(run_any.reshape([seq[0], seq[1], 4])),
                host(run_seq),
                "{kind:?} in {mode:?}, rank {D}"
            );
        }
    }
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let adapter = random_adapter::<B>(kind, 6, 4, 3, 60);
        let x = normal::<B, 3>([2, 6, 6], 61, 1.0);
        check::<2>(&adapter, x.clone().reshape([12, 6]), [12, 1, 6], kind);
        check::<1>(&adapter, x.clone().reshape([72]).narrow(0, 0, 6), [1, 1, 6], kind);
        check::<4>(&adapter, x.reshape([2, 2, 3, 6]), [2, 6, 6], kind);
    }
    for config in configs(2) {
        let base = base::<B>(6, 4, 62);
        let x = normal::<B, 2>([5, 6], 63, 1.0);
        let expected: Vec<f64> = base.forward(x.clone()).into_data().to_vec().unwrap();
        let adapter = config.init(base, &mut NoiseSource::seeded(0)).unwrap();
        let mut noise = NoiseSource::seeded(1);
        let out: Vec<f64> = adapter
            .forward(x, &mut Sampler::new(SamplingMode::Mean, &mut noise))
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(out, expected, "{:?}: a drop-in for the Linear it wraps", config.kind());
    }
}
