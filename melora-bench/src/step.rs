//! `melora-bench step`: the median time of a training step (or of an
//! inference forward with `S` samples) of a real model, after warm-up, with
//! tokens per second and peak memory. Random token ids, real weights (or
//! random ones for shape-only presets such as `llama2-7b`).

use crate::backend;
use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use melora_core::{AdapterKind, NoiseSource, Sampler, SamplingMode};
use melora_llama::assets::Assets;
use melora_llama::data::{collate, Encoded, Padding};
use melora_llama::model::scoring::{ScoreBatch, Scorer};
use melora_llama::model::Target;
use melora_llama::pretrained::Pretrained;
use melora_llama::train::{parallel, stable_adapter_ids, Cluster, Peer, Stepper, TrainConfig};
use melora_llama::weights::RandomSource;
use melora_llama::Llama;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use std::sync::Mutex;
use std::time::Instant;

/// What `step` measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub backend: String,
    pub dtype: String,
    pub model: String,
    pub method: String,
    pub mode: String,
    pub batch: usize,
    pub seq: usize,
    pub samples: usize,
    pub steps: usize,
    /// Data-parallel peers (threads on the CPU, one per GPU) the batch was
    /// split over.
    pub peers: usize,
    pub median_seconds: f64,
    pub min_seconds: f64,
    pub tokens_per_second: f64,
    /// The training loss of the last step: a sanity check (finite; for a
    /// real model such as SmolLM2, comparable across backends and dtypes).
    pub last_loss: Option<f64>,
    /// Peak resident memory of the process (CPU backends), in MiB.
    pub peak_rss_mib: Option<f64>,
}

/// The median of `xs` (the upper one of an even count), of a non-empty list.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub struct StepArgs {
    pub model: String,
    pub method: AdapterKind,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub rank: usize,
    pub targets: String,
    pub inference: bool,
    pub samples: usize,
    pub seed: u64,
    /// Floating-point type of weights and activations: f32, or bf16 / f16
    /// on the GPU backends.
    pub dtype: String,
    /// Data-parallel peers of a training step (`melora train --devices`).
    pub peers: usize,
    /// A random-weights preset cut to this many layers (the same shapes:
    /// e.g. warming an autotune cache, whose keys do not count layers).
    pub layers: Option<usize>,
}

/// Runs the measurement on the chosen backend in `args.dtype`.
pub fn run(args: &StepArgs) -> Result<StepReport> {
    match args.dtype.as_str() {
        "f32" => run_on::<backend::Train>(args),
        #[cfg(feature = "cuda")]
        "bf16" => run_on::<burn::backend::Autodiff<backend::Bf16>>(args),
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        "f16" => run_on::<burn::backend::Autodiff<backend::F16>>(args),
        other => bail!(
            "--dtype {other} is not available on {}: f32 everywhere, bf16 on cuda, f16 on cuda and wgpu",
            backend::NAME
        ),
    }
}

fn run_on<Train: AutodiffBackend>(args: &StepArgs) -> Result<StepReport> {
    anyhow::ensure!(
        args.batch > 0 && args.seq > 1 && args.steps > 0,
        "--batch, --seq (> 1) and --steps must be positive"
    );
    anyhow::ensure!(
        args.peers >= 1 && args.peers <= args.batch,
        "--peers must be in 1..=--batch"
    );
    anyhow::ensure!(
        args.peers == 1 || !args.inference,
        "--peers times training steps, not --inference"
    );
    let assets = Assets::from_env();
    let device: Train::Device = Default::default();
    let mut pretrained = Pretrained::open(&args.model, &assets).with_context(|| format!("opening {}", args.model))?;
    if let Some(layers) = args.layers {
        anyhow::ensure!(
            pretrained.device_seed.is_some() && layers > 0,
            "--layers cuts a random-weights preset (llama2-7b, ...) to one or more layers"
        );
        pretrained.config.num_hidden_layers = layers;
        pretrained.source = Box::new(RandomSource::new(&pretrained.config, 0).on_device());
    }
    let vocab = pretrained.config.vocab_size;
    let (base, _, _) = pretrained.build::<Train>(&device)?;
    let config = TrainConfig::new()
        .with_method(args.method.into())
        .with_rank(args.rank)
        .with_targets(Target::parse_list(&args.targets)?)
        .with_steps(args.warmup + args.steps)
        .with_batch_size(args.batch)
        .with_seed(args.seed)
        .with_train_sampling(if args.method == AdapterKind::Lora {
            SamplingMode::Mean
        } else {
            SamplingMode::PerExample
        });
    config.validate()?;
    // Adapters with ids from their names (as training gives them): the
    // peers' replicas below must list their gradients in the same order.
    let with_adapters = |base: Llama<Train>| -> Result<Llama<Train>> {
        Ok(stable_adapter_ids(base.with_adapters(
            &config.adapter(),
            &config.targets,
            &mut NoiseSource::seeded(args.seed),
        )?))
    };
    let mut model = with_adapters(base.clone())?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let label_ids: Vec<u32> = (0..4).map(|i| 10 + i).collect();
    let examples: Vec<Encoded> = (0..args.batch)
        .map(|_| {
            let ids = (0..args.seq).map(|_| rng.random_range(3..vocab as u32)).collect();
            Encoded::label_scored(ids, rng.random_range(0..4), 4)
        })
        .collect();
    let refs: Vec<&Encoded> = examples.iter().collect();
    let batch = collate(&refs, 0, Padding::Left);
    let mut times = Vec::new();
    let mut last_loss = None;
    let samples = if args.inference { args.samples.max(1) } else { 1 };
    if args.inference {
        let valid = model.valid();
        let repeated: Vec<&Encoded> = examples.iter().flat_map(|e| std::iter::repeat_n(e, samples)).collect();
        let batch = collate(&repeated, 0, Padding::Left);
        let mode = if args.method == AdapterKind::Lora || samples == 1 {
            SamplingMode::Mean
        } else {
            SamplingMode::PerExample
        };
        for i in 0..args.warmup + args.steps {
            let mut noise = NoiseSource::seeded(i as u64);
            let start = Instant::now();
            let logits = valid.class_logits(&batch, &label_ids, &mut Sampler::new(mode, &mut noise), &device);
            let _: Vec<f32> = logits.into_data().convert::<f32>().to_vec().expect("f32");
            Train::sync(&device).map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
            let seconds = start.elapsed().as_secs_f64();
            eprintln!(
                "{} pass {}/{}: {seconds:.3} s",
                if i < args.warmup { "warm-up" } else { "timed" },
                i + 1,
                args.warmup + args.steps
            );
            if i >= args.warmup {
                times.push(seconds);
            }
        }
    } else if args.peers > 1 {
        // The batch split over the peers, each on its device (threads
        // sharing the CPU on ndarray); the lead times each step, which ends
        // for every peer at the same all-reduces.
        let cluster = Cluster {
            devices: args.peers,
            nodes: None,
        };
        // Each replica gets adapters of its own (the same values, new
        // tensors): replicas sharing their trainable tensors would share
        // one autodiff graph, which two threads must not step at once.
        let replicas: Vec<Mutex<Option<Llama<Train>>>> = (0..args.peers)
            .map(|d| {
                let target = parallel::peer_device::<Train>(&device, d);
                let base = if target == device {
                    base.clone()
                } else {
                    base.clone().fork(&target)
                };
                Ok(Mutex::new(Some(with_adapters(base)?)))
            })
            .collect::<Result<_>>()?;
        let scorer = Scorer::label(label_ids.clone(), 0);
        let whole = ScoreBatch::Label(batch.clone());
        let body = |peer: Peer, device: Train::Device| -> melora_llama::Result<(Vec<f64>, Option<f64>)> {
            let mut model = replicas[peer.local]
                .lock()
                .expect("a replica")
                .take()
                .expect("taken once");
            let mut stepper = Stepper::<Train>::new(&config, &model, 10_000);
            let rows = peer.share(args.batch);
            let mine = whole.rows(rows.clone());
            let (mut times, mut last) = (Vec::new(), None);
            for i in 0..args.warmup + args.steps {
                let start = Instant::now();
                let outcome = stepper
                    .step_peer(&mut model, &mine, rows.start, args.batch, &scorer, i, &peer, &device)?
                    .map_err(|bad| melora_llama::LlamaError::Peers(format!("{bad} at step {i}")))?;
                let _ = Train::sync(&device);
                let seconds = start.elapsed().as_secs_f64();
                if peer.lead() {
                    eprintln!(
                        "{} step {}/{}: {seconds:.3} s ({} peers)",
                        if i < args.warmup { "warm-up" } else { "timed" },
                        i + 1,
                        args.warmup + args.steps,
                        peer.peers
                    );
                }
                if i >= args.warmup {
                    times.push(seconds);
                }
                last = Some(outcome.nll);
            }
            Ok((times, last))
        };
        let (t, l) = parallel::run_peers::<Train, _>(&cluster, args.batch, &device, &body, &body)?;
        times = t;
        last_loss = l;
    } else {
        let mut stepper = Stepper::<Train>::new(&config, &model, 10_000);
        let scorer = Scorer::label(label_ids.clone(), 0);
        for i in 0..args.warmup + args.steps {
            let start = Instant::now();
            let outcome = stepper
                .step(&mut model, &ScoreBatch::Label(batch.clone()), &scorer, i, &device)
                .map_err(|bad| anyhow::anyhow!("{bad} at step {i}"))?;
            // The step reads the loss back after the forward pass; the
            // backward pass and the update may still be queued on a GPU.
            Train::sync(&device).map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
            let seconds = start.elapsed().as_secs_f64();
            eprintln!(
                "{} step {}/{}: {seconds:.3} s",
                if i < args.warmup { "warm-up" } else { "timed" },
                i + 1,
                args.warmup + args.steps
            );
            if i >= args.warmup {
                times.push(seconds);
            }
            last_loss = Some(outcome.nll);
        }
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let median = median(times);
    Ok(StepReport {
        backend: backend::NAME.into(),
        dtype: args.dtype.clone(),
        model: match args.layers {
            Some(layers) => format!("{} ({layers} layers)", args.model),
            None => args.model.clone(),
        },
        method: format!("{:?}", args.method),
        mode: if args.inference {
            "inference".into()
        } else {
            "train".into()
        },
        batch: args.batch,
        seq: args.seq,
        samples,
        steps: args.steps,
        peers: args.peers,
        median_seconds: median,
        min_seconds: min,
        tokens_per_second: (args.batch * args.seq * samples) as f64 / median,
        last_loss,
        peak_rss_mib: peak_rss_mib(),
    })
}
