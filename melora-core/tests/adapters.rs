//! Adapter behaviour on ndarray (f64): identity at initialisation, `Mean`
//! forward equals the merged layer, gradients reach exactly the trainable
//! parameters, settings are checked, initialisation as documented (the
//! sampling modes are `sampling.rs`'s).

mod common;

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor};
use common::*;
use melora_core::params::trainable_per_layer;
use melora_core::{
    Adapter, AdapterKind, AnyAdapter, BlobLinearConfig, BlobPosteriorConfig, CoreError, LoraLinearConfig,
    LowRankConfig, MeLoraLinearConfig, MeLoraPosteriorConfig, NoiseSource, Sampler, SamplingMode,
};

#[test]
fn every_adapter_equals_its_base_layer_at_initialisation() {
    let x = normal::<B, 3>([3, 4, 7], 10, 1.0);
    for config in configs(2) {
        let base = base::<B>(7, 5, 3);
        let expected = host(base.forward(x.clone()));
        let adapter = config.init(base, &mut NoiseSource::seeded(0)).unwrap();
        for mode in MODES {
            let mut noise = NoiseSource::seeded(1);
            let mut sampler = Sampler::new(mode, &mut noise).with_dropout(true);
            let out = host(adapter.forward(x.clone(), &mut sampler));
            assert_eq!(
                out,
                expected,
                "{:?} in {mode:?} differs from its base at init",
                config.kind()
            );
        }
    }
}

#[test]
fn mean_forward_equals_the_merged_layer() {
    let x = normal::<B, 3>([2, 3, 6], 11, 1.0);
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let adapter = random_adapter::<B>(kind, 6, 4, 3, 20);
        let mut noise = NoiseSource::seeded(0);
        let out = host(adapter.forward(x.clone(), &mut Sampler::new(SamplingMode::Mean, &mut noise)));
        let merged = host(adapter.merge().unwrap().forward(x.clone()));
        let base = host(adapter.base().forward(x.clone()));
        let max_diff = out.iter().zip(&merged).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(max_diff < 1e-12, "{kind:?}: forward(Mean) vs merge: {max_diff}");
        let moved = out.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(moved > 1e-3, "{kind:?}: the random adapter should change the output");
    }
}

#[test]
fn merge_refuses_non_finite_weights() {
    let base = base::<B>(4, 3, 1);
    let a = Tensor::<B, 2>::full([2, 4], f64::INFINITY, &Default::default());
    let b = normal::<B, 2>([3, 2], 2, 1.0);
    let lora = LoraLinearConfig::new()
        .with_low_rank(low_rank(2))
        .init_with(base, a, b)
        .unwrap();
    assert_eq!(lora.merge().unwrap_err(), CoreError::NonFiniteMerge);
}

#[test]
fn gradients_reach_only_trainable_parameters() {
    let x = normal::<AD, 3>([2, 3, 6], 12, 1.0);
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let adapter = random_adapter::<AD>(kind, 6, 4, 2, 30);
        let mut noise = NoiseSource::seeded(0);
        let mut sampler = Sampler::new(SamplingMode::PerExample, &mut noise).with_dropout(true);
        let loss = adapter
            .forward(x.clone(), &mut sampler)
            .powi_scalar(2)
            .sum()
            .add(adapter.kl(0.2));
        let grads = loss.backward();
        let base = adapter.base();
        assert!(
            base.weight.val().grad(&grads).is_none(),
            "{kind:?}: base weight got a gradient"
        );
        assert!(
            base.bias.as_ref().unwrap().val().grad(&grads).is_none(),
            "{kind:?}: base bias got a gradient"
        );
        let trainable: Vec<(&str, &Param<Tensor<AD, 2>>)> = match &adapter {
            AnyAdapter::Lora(l) => vec![("A", &l.low_rank.lora_a), ("B", &l.low_rank.lora_b)],
            AnyAdapter::Blob(l) => vec![
                ("A", &l.low_rank.lora_a),
                ("G_A", &l.lora_a_std),
                ("B", &l.low_rank.lora_b),
            ],
            AnyAdapter::MeLora(l) => vec![
                ("A", &l.low_rank.lora_a),
                ("B", &l.low_rank.lora_b),
                ("M", &l.lora_m),
                ("H", &l.lora_h),
            ],
        };
        for (name, param) in &trainable {
            let grad = param
                .val()
                .grad(&grads)
                .unwrap_or_else(|| panic!("{kind:?}: no gradient for {name}"));
            let norm: f64 = grad.powi_scalar(2).sum().into_scalar();
            assert!(norm > 0.0, "{kind:?}: zero gradient for {name}");
        }
        // The groups name exactly these parameters, and the count agrees with the formula.
        let groups = adapter.param_groups();
        assert_eq!(groups.all().len(), trainable.len());
        for (_, param) in &trainable {
            assert!(groups.all().contains(&param.id));
        }
        assert_eq!(adapter.num_trainable(), trainable_per_layer(kind, 4, 6, 2));
        let std_ids: Vec<_> = match &adapter {
            AnyAdapter::Lora(_) => vec![],
            AnyAdapter::Blob(l) => vec![l.lora_a_std.id],
            AnyAdapter::MeLora(l) => vec![l.lora_h.id],
        };
        assert_eq!(groups.std, std_ids, "{kind:?}: std group");
    }
}

/// `named_params` is the one list of an adapter's tensors: it holds every
/// parameter the module has apart from the frozen base, under the names of
/// `AdapterConfig::param_names`, and `init_named` rebuilds the adapter from it.
#[test]
fn named_params_list_every_trainable_tensor_and_rebuild_the_adapter() {
    use burn::module::{Module, ModuleVisitor, ParamId};
    struct Ids(Vec<ParamId>);
    impl<Bk: Backend> ModuleVisitor<Bk> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
            self.0.push(param.id);
        }
    }
    for (kind, config) in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora]
        .into_iter()
        .zip(configs(2))
    {
        let adapter = random_adapter::<B>(kind, 6, 4, 2, 40);
        let named = adapter.named_params();
        let names: Vec<&str> = named.iter().map(|p| p.name).collect();
        assert_eq!(names, config.param_names(), "{kind:?}: names");
        let mut visited = Ids(Vec::new());
        adapter.visit(&mut visited);
        let base = adapter.base();
        let frozen = [Some(base.weight.id), base.bias.as_ref().map(|b| b.id)];
        let mut expected: Vec<ParamId> = visited
            .0
            .into_iter()
            .filter(|id| !frozen.contains(&Some(*id)))
            .collect();
        let mut listed: Vec<ParamId> = named.iter().map(|p| p.param.id).collect();
        expected.sort_by_key(|id| id.val());
        listed.sort_by_key(|id| id.val());
        assert_eq!(
            listed, expected,
            "{kind:?}: named_params lists exactly the module's trainable parameters"
        );
        // The mutable list names the same tensors in the same order.
        let mut copy = random_adapter::<B>(kind, 6, 4, 2, 40);
        let copy_ids: Vec<(&str, ParamId)> = copy.named_params_mut().into_iter().map(|(n, p)| (n, p.id)).collect();
        assert_eq!(copy_ids.iter().map(|(n, _)| *n).collect::<Vec<_>>(), names);
        // Rebuilt from its own tensors, the adapter computes the same update.
        let tensors: Vec<Tensor<B, 2>> = named.iter().map(|p| p.param.val()).collect();
        let rebuilt = config.init_named(adapter.base().clone(), tensors.clone()).unwrap();
        let same = |a: Tensor<B, 2>, b: Tensor<B, 2>| {
            a.into_data().to_vec::<f64>().unwrap() == b.into_data().to_vec::<f64>().unwrap()
        };
        assert!(
            same(rebuilt.delta_weight(), adapter.delta_weight()),
            "{kind:?}: delta weight"
        );
        for (p, q) in rebuilt.named_params().iter().zip(&named) {
            assert!(same(p.param.val(), q.param.val()), "{kind:?}: {}", p.name);
        }
        // One tensor short: refused, naming the tensors it takes.
        let short = config
            .init_named(adapter.base().clone(), tensors[1..].to_vec())
            .unwrap_err();
        assert!(
            matches!(short, CoreError::TensorCount { found, .. } if found == names.len() - 1),
            "{kind:?}: {short}"
        );
        assert!(short.to_string().contains(names[0]), "{kind:?}: {short}");
    }
}

/// `forward(x) = base(x) + code(x) B^T` with the same draws, in every
/// sampling mode and with dropout on: an output layer can take the update
/// at a few rows only.
#[test]
fn forward_is_the_base_plus_the_code_times_b() {
    let x = normal::<B, 3>([3, 4, 6], 17, 1.0);
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let adapter = random_adapter::<B>(kind, 6, 5, 3, 50);
        for mode in MODES {
            let mut noise = NoiseSource::seeded(9);
            let whole = host(adapter.forward(x.clone(), &mut Sampler::new(mode, &mut noise).with_dropout(true)));
            let mut noise = NoiseSource::seeded(9);
            let code = adapter.code(x.clone(), &mut Sampler::new(mode, &mut noise).with_dropout(true));
            assert_eq!(code.dims(), [3, 4, 3]);
            let b = adapter.lora_b().transpose().unsqueeze::<3>();
            let parts = host(melora_kernels::linear_forward(adapter.base(), x.clone()).add(code.matmul(b)));
            let gap = whole.iter().zip(&parts).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(gap < 1e-12, "{kind:?} {mode:?}: {gap:e}");
        }
    }
}

#[test]
fn invalid_configs_name_the_setting() {
    let err = LoraLinearConfig::new()
        .with_low_rank(LowRankConfig::new().with_rank(0))
        .init(base::<B>(4, 4, 0), &mut NoiseSource::seeded(0))
        .unwrap_err();
    assert!(err.to_string().contains("rank = 0"), "{err}");
    let err = LoraLinearConfig::new()
        .with_low_rank(LowRankConfig::new().with_dropout(1.0))
        .init(base::<B>(16, 16, 0), &mut NoiseSource::seeded(0))
        .unwrap_err();
    assert!(err.to_string().contains("dropout = 1"), "{err}");
    let err = MeLoraLinearConfig::new()
        .with_low_rank(LowRankConfig::new().with_rank(8))
        .init(base::<B>(4, 16, 0), &mut NoiseSource::seeded(0))
        .unwrap_err();
    assert!(err.to_string().contains("rank = 8 for a 4 -> 16 layer"), "{err}");
    let err = BlobLinearConfig::new()
        .with_posterior(BlobPosteriorConfig::new().with_init_eps(-1.0))
        .init(base::<B>(16, 16, 0), &mut NoiseSource::seeded(0))
        .unwrap_err();
    assert!(err.to_string().contains("init_eps = -1"), "{err}");
    let a = normal::<B, 2>([2, 5], 1, 1.0);
    let b = normal::<B, 2>([3, 2], 1, 1.0);
    let err = LoraLinearConfig::new()
        .with_low_rank(low_rank(2))
        .init_with(base::<B>(4, 3, 0), a, b)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "shape mismatch for lora_A: expected [2, 4], found [2, 5]"
    );
}

#[test]
fn initial_stds_lie_in_blobs_range() {
    let blob = BlobLinearConfig::new()
        .init(base::<B>(64, 32, 0), &mut NoiseSource::seeded(0))
        .unwrap();
    let absolute = MeLoraLinearConfig::new()
        .with_posterior(MeLoraPosteriorConfig::new().with_std_init(melora_core::StdInit::Blob));
    let melora = absolute
        .init(base::<B>(64, 32, 0), &mut NoiseSource::seeded(0))
        .unwrap();
    for std in [
        blob.omega().into_data().to_vec::<f64>().unwrap(),
        melora.omega().into_data().to_vec::<f64>().unwrap(),
    ] {
        assert!(
            std.iter().all(|s| (0.00125 - 1e-12..=0.0025 + 1e-12).contains(s)),
            "{std:?}"
        );
    }
    // The default: the same draws times sqrt(3 n / r) (n = 64, r = 8).
    let relative = MeLoraLinearConfig::new()
        .init(base::<B>(64, 32, 0), &mut NoiseSource::seeded(0))
        .unwrap();
    let scaled: Vec<f64> = relative.omega().into_data().to_vec().unwrap();
    let plain: Vec<f64> = melora.omega().into_data().to_vec().unwrap();
    for (s, p) in scaled.iter().zip(&plain) {
        assert!((s / p - (3.0f64 * 64.0 / 8.0).sqrt()).abs() < 1e-12, "{s} vs {p}");
    }
    let m: Vec<f64> = melora.lora_m.val().into_data().to_vec().unwrap();
    let eye: Vec<f64> = Tensor::<B, 2>::eye(8, &Default::default())
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(m, eye, "M starts at the identity");
}

#[test]
fn initialisation_comes_from_the_noise_source_alone() {
    let init = |seed: u64| -> Vec<f64> {
        let adapter = MeLoraLinearConfig::new()
            .with_posterior(MeLoraPosteriorConfig::new().with_mean_init(melora_core::MeanInit::KaimingUniform))
            .init(base::<B>(64, 32, 0), &mut NoiseSource::seeded(seed))
            .unwrap();
        [
            adapter.low_rank.lora_a.val(),
            adapter.lora_m.val(),
            adapter.lora_h.val(),
        ]
        .into_iter()
        .flat_map(|t| t.into_data().to_vec::<f64>().unwrap())
        .collect()
    };
    // The backend's global generator plays no part.
    B::seed(&Default::default(), 1);
    let first = init(5);
    B::seed(&Default::default(), 2);
    assert_eq!(init(5), first, "same noise seed, same adapter");
    assert_ne!(init(6), first, "another seed, another adapter");
    // PEFT's Kaiming-uniform bound 1 / sqrt(fan_in) for A (64 inputs).
    let a = &first[..8 * 64];
    assert!(a.iter().all(|v| v.abs() <= 1.0 / 8.0), "A outside U(-1/8, 1/8)");
    assert!(
        a.iter().any(|v| v.abs() > 0.1),
        "A far inside its bound: not the Kaiming range"
    );
}

/// `total_kl` (the Me-LoRA `ln det(A A^T)` terms of all adapters in one
/// host round trip) equals the sum of the adapters' own KL terms, in value
/// and in the gradient of every parameter, for adapters of mixed kinds,
/// shapes and KL variants.
#[test]
fn total_kl_equals_the_sum_of_the_adapters_kls() {
    use melora_core::{total_kl, MeLoraKl};
    let mut adapters = vec![
        random_adapter::<AD>(AdapterKind::MeLora, 7, 5, 2, 40),
        random_adapter::<AD>(AdapterKind::Lora, 6, 4, 2, 41),
        random_adapter::<AD>(AdapterKind::MeLora, 9, 3, 3, 42),
        random_adapter::<AD>(AdapterKind::Blob, 5, 5, 2, 43),
        random_adapter::<AD>(AdapterKind::MeLora, 4, 6, 2, 44),
    ];
    if let AnyAdapter::MeLora(m) = &mut adapters[4] {
        m.kl = MeLoraKl::ExactC;
    }
    let device = Default::default();
    let batched = total_kl(adapters.iter(), 0.3, &device);
    let separate = adapters
        .iter()
        .fold(Tensor::<AD, 1>::zeros([1], &device), |acc, a| acc.add(a.kl(0.3)));
    let (b, s): (f64, f64) = (batched.clone().into_scalar(), separate.clone().into_scalar());
    assert!((b - s).abs() < 1e-10 * s.abs().max(1.0), "{b} vs {s}");
    let (gb, gs) = (batched.backward(), separate.backward());
    let mut compared = 0;
    for adapter in &adapters {
        for (name, t) in match adapter {
            AnyAdapter::MeLora(m) => vec![
                ("A", m.low_rank.lora_a.val()),
                ("M", m.lora_m.val()),
                ("H", m.lora_h.val()),
            ],
            AnyAdapter::Blob(b) => vec![("A", b.low_rank.lora_a.val()), ("A std", b.lora_a_std.val())],
            AnyAdapter::Lora(_) => vec![],
        } {
            let (x, y) = (t.grad(&gb), t.grad(&gs));
            assert_eq!(x.is_some(), y.is_some(), "{name}");
            if let (Some(x), Some(y)) = (x, y) {
                let (x, y): (Vec<f64>, Vec<f64>) = (x.into_data().to_vec().unwrap(), y.into_data().to_vec().unwrap());
                for (p, q) in x.iter().zip(&y) {
                    assert!((p - q).abs() < 1e-10 * q.abs().max(1.0), "{name}: {p} vs {q}");
                }
                compared += 1;
            }
        }
    }
    // A, M, H of the two Subspace adapters; M, H of the ExactC one (its KL
    // does not involve A); BLoB's A and its std.
    assert_eq!(compared, 6 + 2 + 2, "every gradient of the KL compared");
}

/// At initialisation the default Me-LoRA std gives the rank-`r` intermediate
/// `C A x` the relative noise BLoB's `A x` has (derivations.md section 1).
/// Closed forms, each checked by Monte Carlo over the weights' draws for one
/// input: Me-LoRA's `E||C u - u||^2 / ||u||^2 = r mean(Omega^2)` (`M = I`),
/// BLoB's `E||A x - M_A x||^2 = Σ_j x_j^2 Σ_i Omega_ij^2` against its
/// expected signal `E||M_A x||^2 = r ||x||^2 / (3 n)` (Kaiming-uniform);
/// the two relative noises agree within the spread of the uniform std draws.
#[test]
fn melora_starts_with_blobs_relative_noise() {
    let (n, r, draws) = (256, 8, 1000);
    let device = Default::default();
    let values = |t: Tensor<B, 2>| -> Vec<f64> { t.into_data().to_vec().unwrap() };
    let x = normal::<B, 2>([1, n], 3, 1.0);
    let xs = values(x.clone());
    let blob = BlobLinearConfig::new()
        .with_low_rank(low_rank(r))
        .init(base::<B>(n, 16, 0), &mut NoiseSource::seeded(4))
        .unwrap();
    let melora = MeLoraLinearConfig::new()
        .with_low_rank(low_rank(r))
        .init(base::<B>(n, 16, 0), &mut NoiseSource::seeded(4))
        .unwrap();
    let mut noise = NoiseSource::seeded(9);
    let sq = |v: &[f64], m: &[f64]| -> f64 { v.iter().zip(m).map(|(a, b)| (a - b).powi(2)).sum() };

    let blob_mean = values(x.clone().matmul(blob.low_rank.lora_a.val().transpose()));
    let blob_noise: f64 = (0..draws)
        .map(|_| {
            let a = blob
                .low_rank
                .lora_a
                .val()
                .add(blob.omega().mul(noise.normal::<B, 2>([r, n], &device)));
            sq(&values(x.clone().matmul(a.transpose())), &blob_mean)
        })
        .sum::<f64>()
        / draws as f64;
    let omega_b = values(blob.omega());
    let blob_closed: f64 = (0..r)
        .map(|i| (0..n).map(|j| xs[j] * xs[j] * omega_b[i * n + j].powi(2)).sum::<f64>())
        .sum();
    assert!(
        (blob_noise / blob_closed - 1.0).abs() < 0.1,
        "BLoB noise: Monte Carlo {blob_noise} vs {blob_closed}"
    );
    let x_sq: f64 = xs.iter().map(|v| v * v).sum();
    let blob_relative = blob_closed / (r as f64 * x_sq / (3.0 * n as f64));

    let u = x.matmul(melora.low_rank.lora_a.val().transpose());
    let us = values(u.clone());
    let melora_noise: f64 = (0..draws)
        .map(|_| {
            sq(
                &values(
                    u.clone()
                        .matmul(melora.sample_c(1, &mut noise).reshape([r, r]).transpose()),
                ),
                &us,
            )
        })
        .sum::<f64>()
        / draws as f64;
    let omega_m = values(melora.omega());
    let melora_closed: f64 = (0..r)
        .map(|i| (0..r).map(|j| us[j] * us[j] * omega_m[i * r + j].powi(2)).sum::<f64>())
        .sum();
    assert!(
        (melora_noise / melora_closed - 1.0).abs() < 0.1,
        "Me-LoRA noise: Monte Carlo {melora_noise} vs {melora_closed}"
    );
    let melora_relative = melora_closed / us.iter().map(|v| v * v).sum::<f64>();
    let mean_sq = omega_m.iter().map(|w| w * w).sum::<f64>() / omega_m.len() as f64;
    assert!(
        (melora_relative / (r as f64 * mean_sq) - 1.0).abs() < 0.35,
        "Me-LoRA relative noise {melora_relative} vs r mean(Omega^2)"
    );

    assert!(
        (melora_relative / blob_relative - 1.0).abs() < 0.35,
        "relative noise at init: Me-LoRA {melora_relative:.5} vs BLoB {blob_relative:.5}"
    );
    assert!(
        blob_relative > 1e-3,
        "BLoB's relative noise {blob_relative} is not negligible"
    );
}
