//! The data-parallel ELBO step ([`ElboStep::step_reduced`]) on ndarray
//! (f64): two replicas, each on half of a batch with its NLL weighted by
//! its share and the data gradients summed between them, take the step one
//! replica takes on the whole batch; with an identity reduction it is the
//! plain step. The per-example noise comes from row streams
//! ([`RowNoise`]), so each example draws the same on either split.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param, ParamId};
use burn::nn::LinearConfig;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use melora_core::*;
use std::sync::mpsc::{channel, Receiver, Sender};

type Inner = NdArray<f64>;
type AD = Autodiff<Inner>;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    layer: AnyAdapter<B>,
}

impl<B: AutodiffBackend> Bayesian<B> for Net<B> {
    fn kl(&self, prior_std: f64) -> Tensor<B, 1> {
        self.layer.kl(prior_std)
    }
    fn param_groups(&self) -> ParamGroups {
        self.layer.param_groups()
    }
}

const BATCH: usize = 6;
const D_IN: usize = 5;
const CLASSES: usize = 3;

fn net(kind: AdapterKind) -> Net<AD> {
    let device = Default::default();
    // Seeded weights, no bias (the layer's own init uses the backend's
    // global generator, which tests running in parallel share).
    let mut base = LinearConfig::new(D_IN, CLASSES).with_bias(false).init::<AD>(&device);
    base.weight =
        Param::from_tensor(NoiseSource::seeded(1).normal::<AD, 2>([D_IN, CLASSES], &device)).set_require_grad(false);
    let low_rank = LowRankConfig::new().with_rank(2).with_dropout(0.2);
    let config = match kind {
        AdapterKind::Lora => AdapterConfig::Lora(LoraLinearConfig::new().with_low_rank(low_rank)),
        AdapterKind::Blob => AdapterConfig::Blob(BlobLinearConfig::new().with_low_rank(low_rank)),
        AdapterKind::MeLora => AdapterConfig::MeLora(MeLoraLinearConfig::new().with_low_rank(low_rank)),
    };
    let mut layer = config.init(base, &mut NoiseSource::seeded(2)).unwrap();
    // Ids from the parameters' places (every replica's alike, as melora's
    // named ids are), and a non-zero B (LoRA's starts at zero) so that
    // every parameter moves.
    for (i, (name, p)) in layer.named_params_mut().into_iter().enumerate() {
        let value = match name {
            "lora_B" => NoiseSource::seeded(3)
                .normal::<AD, 2>(p.val().dims(), &device)
                .mul_scalar(0.3),
            _ => p.val().detach(),
        };
        *p = Param::initialized(ParamId::from(1000 + i as u64), value.require_grad());
    }
    Net { layer }
}

fn inputs() -> (Vec<f64>, Vec<i64>) {
    let x: Vec<f64> = NoiseSource::seeded(4)
        .normal::<Inner, 1>([BATCH * D_IN], &Default::default())
        .into_data()
        .to_vec()
        .unwrap();
    let y = (0..BATCH as i64).map(|i| i % CLASSES as i64).collect();
    (x, y)
}

/// The NLL of rows `rows` (mean over them), weighted by `rows / BATCH`.
fn nll(model: &Net<AD>, rows: std::ops::Range<usize>, step: u64, mode: SamplingMode) -> Tensor<AD, 1> {
    let device = Default::default();
    let (x, y) = inputs();
    let n = rows.len();
    let x = Tensor::<AD, 3>::from_data(
        TensorData::new(x[rows.start * D_IN..rows.end * D_IN].to_vec(), [n, 1, D_IN]),
        &device,
    );
    let y = Tensor::<AD, 1, Int>::from_data(TensorData::new(y[rows.clone()].to_vec(), [n]), &device);
    let mut noise = NoiseSource::seeded(100 + step);
    let mut sampler = Sampler::new(mode, &mut noise)
        .with_dropout(true)
        .with_rows(RowNoise::new(100 + step, rows.start));
    let logits = model.layer.forward(x, &mut sampler).reshape([n, CLASSES]);
    let nll = burn::nn::loss::CrossEntropyLossConfig::new()
        .init(&device)
        .forward(logits, y);
    nll.mul_scalar(n as f64 / BATCH as f64)
}

fn values(model: &Net<AD>) -> Vec<(String, Vec<f64>)> {
    model
        .layer
        .named_params()
        .iter()
        .map(|p| (p.name.to_string(), p.param.val().into_data().to_vec().unwrap()))
        .collect()
}

fn config(split: OptimizerSplit) -> ElboConfig {
    ElboConfig::new()
        .with_optimizer(split)
        .with_grad_clip(Some(1.0))
        .with_weight_decay(0.01)
}

const KL: Option<KlTerm> = Some(KlTerm {
    prior_std: 0.3,
    weight: 0.05,
});
const RATES: Rates = Rates { lr: 1e-2, kl_lr: 1e-2 };
const SPLITS: [OptimizerSplit; 3] = [
    OptimizerSplit::TwoOptimizers,
    OptimizerSplit::Single,
    OptimizerSplit::StdAdam,
];

/// One replica on the whole batch, `steps` plain steps.
fn whole(kind: AdapterKind, split: OptimizerSplit, mode: SamplingMode, steps: u64) -> Vec<(String, Vec<f64>)> {
    let mut model = net(kind);
    let mut elbo = ElboStep::new(config(split), &model);
    for step in 0..steps {
        let loss = nll(&model, 0..BATCH, step, mode);
        elbo.step(&mut model, loss, RATES, KL).unwrap();
    }
    values(&model)
}

/// Sums gradients with the other replica over channels (both add in the
/// same order: mine + theirs is theirs + mine in floating point).
fn exchange(
    grads: GradientsParams,
    ids: &[ParamId],
    tx: &Sender<Vec<Vec<f64>>>,
    rx: &Receiver<Vec<Vec<f64>>>,
) -> GradientsParams {
    let mut grads = grads;
    let mine: Vec<Option<Tensor<Inner, 2>>> = ids.iter().map(|id| grads.remove::<Inner, 2>(*id)).collect();
    tx.send(
        mine.iter()
            .map(|g| g.as_ref().map_or(Vec::new(), |g| g.to_data().to_vec().unwrap()))
            .collect(),
    )
    .unwrap();
    let theirs = rx.recv().unwrap();
    let mut out = GradientsParams::new();
    for ((id, g), other) in ids.iter().zip(mine).zip(theirs) {
        if let Some(g) = g {
            let dims = g.dims();
            out.register(
                *id,
                g.add(Tensor::from_data(TensorData::new(other, dims), &Default::default())),
            );
        }
    }
    out
}

/// Two replicas on rows 0..2 and 2..6 (an uneven split), `steps` steps.
fn split(kind: AdapterKind, opt: OptimizerSplit, mode: SamplingMode, steps: u64) -> [Vec<(String, Vec<f64>)>; 2] {
    let (tx_a, rx_b) = channel();
    let (tx_b, rx_a) = channel();
    let (tx_na, rx_nb) = channel::<f64>();
    let (tx_nb, rx_na) = channel::<f64>();
    let replica = move |rows: std::ops::Range<usize>,
                        tx: Sender<Vec<Vec<f64>>>,
                        rx: Receiver<Vec<Vec<f64>>>,
                        ntx: Sender<f64>,
                        nrx: Receiver<f64>| {
        move || {
            let mut model = net(kind);
            let mut elbo = ElboStep::new(config(opt), &model);
            let ids = {
                let mut ids = model.param_groups().all();
                ids.sort();
                ids
            };
            for step in 0..steps {
                let loss = nll(&model, rows.clone(), step, mode);
                let part: f64 = loss.clone().into_scalar().elem();
                ntx.send(part).unwrap();
                let total = part + nrx.recv().unwrap();
                let mut reduce = |g: GradientsParams| Ok::<_, ()>(exchange(g, &ids, &tx, &rx));
                elbo.step_reduced(&mut model, loss, total, RATES, KL, &mut reduce)
                    .unwrap();
            }
            values(&model)
        }
    };
    let a = std::thread::spawn(replica(0..2, tx_a, rx_a, tx_na, rx_na));
    let b = std::thread::spawn(replica(2..BATCH, tx_b, rx_b, tx_nb, rx_nb));
    [a.join().unwrap(), b.join().unwrap()]
}

fn max_diff(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn two_replicas_on_halves_take_the_whole_batchs_steps() {
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        for opt in SPLITS {
            let mode = if kind == AdapterKind::Lora {
                SamplingMode::Mean
            } else {
                SamplingMode::PerExample
            };
            let reference = whole(kind, opt, mode, 5);
            let before = values(&net(kind));
            let [a, b] = split(kind, opt, mode, 5);
            assert_eq!(a, b, "{kind:?} {opt:?}: the replicas differ");
            // f64: the split sums each gradient in another order.
            let diff = max_diff(&a, &reference);
            assert!(
                diff < 1e-12,
                "{kind:?} {opt:?}: {diff:e} from one replica on the whole batch"
            );
            assert!(
                max_diff(&before, &reference) > 1e-3,
                "{kind:?} {opt:?}: the steps moved nothing"
            );
        }
    }
}

#[test]
fn an_identity_reduction_is_the_plain_step() {
    for kind in [AdapterKind::Blob, AdapterKind::MeLora] {
        for opt in SPLITS {
            let reference = whole(kind, opt, SamplingMode::PerExample, 3);
            let mut model = net(kind);
            let mut elbo = ElboStep::new(config(opt), &model);
            for step in 0..3 {
                let loss = nll(&model, 0..BATCH, step, SamplingMode::PerExample);
                let total: f64 = loss.clone().into_scalar().elem();
                elbo.step_reduced(&mut model, loss, total, RATES, KL, &mut |g| Ok::<_, ()>(g))
                    .unwrap();
            }
            let diff = max_diff(&values(&model), &reference);
            match opt {
                // The same backward passes: the same numbers.
                OptimizerSplit::TwoOptimizers => assert_eq!(diff, 0.0, "{kind:?}"),
                // Two backward passes summed instead of one of the sum.
                OptimizerSplit::Single | OptimizerSplit::StdAdam => assert!(diff < 1e-13, "{kind:?} {opt:?}: {diff:e}"),
            }
        }
    }
}

#[test]
fn a_non_finite_total_stops_every_replica_before_any_update() {
    let mut model = net(AdapterKind::MeLora);
    let before = values(&model);
    let mut elbo = ElboStep::new(config(OptimizerSplit::TwoOptimizers), &model);
    let loss = nll(&model, 0..3, 0, SamplingMode::PerExample);
    let err = elbo
        .step_reduced(&mut model, loss, f64::NAN, RATES, KL, &mut |g| Ok::<_, ()>(g))
        .unwrap_err();
    assert!(
        matches!(err, ReducedStepError::NonFinite(NonFinite { what: "NLL", .. })),
        "{err:?}"
    );
    assert_eq!(values(&model), before);
    let loss = nll(&model, 0..3, 0, SamplingMode::PerExample);
    let err = elbo
        .step_reduced(&mut model, loss, 1.0, RATES, KL, &mut |_| {
            Err::<GradientsParams, _>("peer gone")
        })
        .unwrap_err();
    assert!(matches!(err, ReducedStepError::Reduce("peer gone")), "{err:?}");
    assert_eq!(values(&model), before);
}
