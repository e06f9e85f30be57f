//! Sampling modes and the per-forward context the adapters read.
//!
//! docs/method.md section 1: `Mean` (no noise), `PerBatch` (one draw per forward
//! pass, BLoB's code), `PerExample` (one draw per sequence; Me-LoRA's
//! default, derivations.md section 4), `Flipout` (per-token random signs,
//! BLoB's official code).

use crate::noise::{NoiseSource, RowNoise};
use burn::config::Config;
use burn::module::ParamId;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use std::any::Any;
use std::collections::HashMap;

/// How an adapter draws its random weights in a forward pass.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum SamplingMode {
    /// No noise: the mean weights (the MAP prediction, BLoB's "N = 0").
    Mean,
    /// One draw of the random matrix shared by the whole batch.
    PerBatch,
    /// One draw per example (per sequence) in the batch.
    PerExample,
    /// Flipout: one draw per batch, decorrelated per token by random signs
    /// on the input and on the rank dimension (BLoB's official code).
    Flipout,
}

impl std::str::FromStr for SamplingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "mean" => Ok(Self::Mean),
            "perbatch" => Ok(Self::PerBatch),
            "perexample" => Ok(Self::PerExample),
            "flipout" => Ok(Self::Flipout),
            _ => Err(format!(
                "unknown sampling mode {s:?}: expected mean, per-batch, per-example or flipout"
            )),
        }
    }
}

/// What one forward pass of an adapter should do with randomness.
#[derive(Debug)]
pub struct Sampler<'a> {
    /// How to draw the random weights.
    pub mode: SamplingMode,
    /// Whether input dropout on the adapter path is active (training, or
    /// MC dropout at evaluation).
    pub dropout: bool,
    /// Where the random numbers come from.
    pub noise: &'a mut NoiseSource,
    /// When set, LoRA layers record their inputs and add a zero probe to
    /// their outputs (see [`LoraTap`]): Laplace-LoRA's curvature and
    /// Jacobians need the per-token inputs and output gradients.
    pub taps: Option<&'a mut Taps>,
    /// When set, the weight draws of this forward pass are shared with
    /// other passes over the same groups (several forward passes that must
    /// see one weight sample per group): see [`SharedDraws`].
    pub shared: Option<&'a mut SharedDraws>,
    /// When set (training steps), the per-row noise (per-example weight
    /// draws, dropout masks, Flipout signs) comes from each example's own
    /// stream instead of the shared source, when that source is the seeded
    /// host generator: see [`RowNoise`]. The backend's generator has no
    /// streams and keeps drawing everything.
    pub rows: Option<RowNoise>,
}

/// The weight draws of one batch of groups, shared by several forward
/// passes over them.
///
/// For computations that split one group (a question) over several
/// passes or rows that must see the same weights: the same `C` (Me-LoRA)
/// or `A` (BLoB) per group under per-example sampling, the same draw for
/// the whole batch under per-batch sampling and Flipout. (Answer scoring
/// puts a question in one row and needs none of this; the tests' reference
/// scores each choice in a forward pass of its own and shares the
/// question's draw between them this way.) Each adapter asks for its draws
/// under a key (its own parameter id and what the draw is for); the first
/// pass that asks draws one per group and keeps it, later passes reuse it,
/// expanded to their rows by [`SharedDraws::set_rows`]. Per-token noise
/// (dropout masks, Flipout signs) is not shared.
#[derive(Default)]
pub struct SharedDraws {
    groups: usize,
    rows: Option<Vec<usize>>,
    draws: HashMap<(ParamId, u8), Box<dyn Any>>,
}

impl std::fmt::Debug for SharedDraws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedDraws({} groups, {} draws)", self.groups, self.draws.len())
    }
}

impl SharedDraws {
    /// Draws for `groups` groups; the passes' rows are the groups until
    /// [`Self::set_rows`] says otherwise.
    pub fn new(groups: usize) -> Self {
        Self {
            groups,
            rows: None,
            draws: HashMap::new(),
        }
    }

    /// The group of each row of the passes that follow (`rows[j] < groups`).
    pub fn set_rows(&mut self, rows: Vec<usize>) {
        assert!(
            rows.iter().all(|&g| g < self.groups),
            "a row names a group that does not exist"
        );
        self.rows = Some(rows);
    }

    /// The number of groups.
    pub fn groups(&self) -> usize {
        self.groups
    }

    fn get_or_draw<B: Backend, const D: usize>(
        &mut self,
        key: (ParamId, u8),
        draw: impl FnOnce(usize) -> Tensor<B, D>,
    ) -> Tensor<B, D> {
        let groups = self.groups;
        let stored = self.draws.entry(key).or_insert_with(|| Box::new(draw(groups)));
        stored
            .downcast_ref::<Tensor<B, D>>()
            .expect("a shared draw of this backend and rank")
            .clone()
    }

    /// The stored per-group draw expanded to the current rows.
    fn expand<B: Backend, const D: usize>(&self, per_group: Tensor<B, D>) -> Tensor<B, D> {
        match &self.rows {
            None => per_group,
            Some(rows) => {
                let device = per_group.device();
                let index: Vec<i64> = rows.iter().map(|&g| g as i64).collect();
                per_group.select(
                    0,
                    Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows.len()]), &device),
                )
            }
        }
    }
}

/// What a shared draw is for (part of its key), so one adapter can keep
/// several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawKind {
    /// One draw per example (per group when shared).
    PerExample = 0,
    /// One draw for the whole batch.
    PerBatch = 1,
}

/// What a LoRA layer records in a tapped forward pass.
#[derive(Debug, Clone)]
pub struct LoraTap<B: Backend> {
    /// The layer's input, `[batch, seq, d_input]` (after dropout, if on).
    pub input: Tensor<B, 3>,
    /// A zero tensor added to the layer's output, `[batch, seq, d_output]`,
    /// marked as requiring a gradient: its gradient is the gradient of the
    /// loss with respect to the layer's output, token by token.
    pub probe: Tensor<B, 3>,
}

/// The records of a tapped forward pass, one per LoRA layer in the order
/// the layers ran (each a [`LoraTap`] of the pass's backend).
#[derive(Default)]
pub struct Taps {
    /// The records.
    pub records: Vec<Box<dyn std::any::Any>>,
}

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Taps({} records)", self.records.len())
    }
}

impl Taps {
    /// The records as [`LoraTap`]s of backend `B`; `None` if any is not.
    pub fn lora<B: Backend>(&self) -> Option<Vec<&LoraTap<B>>> {
        self.records.iter().map(|r| r.downcast_ref::<LoraTap<B>>()).collect()
    }
}

impl<'a> Sampler<'a> {
    /// A sampler with the given mode; dropout off.
    pub fn new(mode: SamplingMode, noise: &'a mut NoiseSource) -> Self {
        Self {
            mode,
            dropout: false,
            noise,
            taps: None,
            shared: None,
            rows: None,
        }
    }

    /// The same sampler sharing its weight draws through `shared`.
    pub fn with_shared(mut self, shared: &'a mut SharedDraws) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The same sampler drawing its per-row noise from the examples' own
    /// streams ([`RowNoise`]).
    pub fn with_rows(mut self, rows: RowNoise) -> Self {
        self.rows = Some(rows);
        self
    }

    /// The per-row streams, when set and the source is the host generator.
    fn row_streams(&mut self) -> Option<&mut RowNoise> {
        match self.noise {
            NoiseSource::Seeded(_) => self.rows.as_mut(),
            NoiseSource::Backend => None,
        }
    }

    /// Random signs `[batch, seq, n]` for Flipout: per row.
    pub fn row_signs<B: Backend, const D: usize>(&mut self, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
        match self.row_streams() {
            Some(rows) => rows.signs::<B, D>(shape, device),
            None => self.noise.signs::<B, D>(shape, device),
        }
    }

    /// Standard normals `[batch, ...]` for per-example weight draws: every
    /// row independent; under [`SharedDraws`], rows of one group equal
    /// (drawn once per group under `key`, the adapter's parameter id).
    pub fn example_normals<B: Backend, const D: usize>(
        &mut self,
        key: ParamId,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        if self.shared.is_none() {
            if let Some(rows) = self.row_streams() {
                return rows.normal::<B, D>(shape, device);
            }
        }
        match self.shared.as_deref_mut() {
            None => self.noise.normal::<B, D>(shape, device),
            Some(shared) => {
                let noise = &mut *self.noise;
                let per_group = shared.get_or_draw::<B, D>((key, DrawKind::PerExample as u8), |groups| {
                    let mut grouped = shape;
                    grouped[0] = groups;
                    noise.normal::<B, D>(grouped, device)
                });
                let out = shared.expand(per_group);
                assert_eq!(
                    out.dims()[0],
                    shape[0],
                    "a shared per-example draw for a pass with other rows"
                );
                out
            }
        }
    }

    /// Standard normals of `shape` drawn once per forward pass (per-batch
    /// sampling, Flipout's weight draw); under [`SharedDraws`], once for
    /// all the passes that share it.
    pub fn batch_normals<B: Backend, const D: usize>(
        &mut self,
        key: ParamId,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        match self.shared.as_deref_mut() {
            None => self.noise.normal::<B, D>(shape, device),
            Some(shared) => {
                let noise = &mut *self.noise;
                shared.get_or_draw::<B, D>((key, DrawKind::PerBatch as u8), |_| noise.normal::<B, D>(shape, device))
            }
        }
    }

    /// The same sampler recording LoRA layers into `taps`.
    pub fn with_taps(mut self, taps: &'a mut Taps) -> Self {
        self.taps = Some(taps);
        self
    }

    /// The same sampler with dropout switched on or off.
    pub fn with_dropout(mut self, dropout: bool) -> Self {
        self.dropout = dropout;
        self
    }

    /// Input dropout with drop probability `p`, when active; the identity
    /// otherwise. Kept entries are scaled by `1 / (1 - p)`.
    pub fn dropout<B: Backend, const D: usize>(&mut self, x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
        if !self.dropout || p <= 0.0 {
            return x;
        }
        let (dims, device) = (x.dims(), x.device());
        let keep = match self.row_streams() {
            Some(rows) => rows.bernoulli::<B, D>(dims, 1.0 - p, &device),
            None => self.noise.bernoulli::<B, D>(dims, 1.0 - p, &device),
        };
        x.mul(keep).div_scalar(1.0 - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f64>;

    fn rows(t: Tensor<B, 3>) -> Vec<Vec<f64>> {
        let [n, a, b] = t.dims();
        let v: Vec<f64> = t.into_data().to_vec().unwrap();
        (0..n).map(|i| v[i * a * b..(i + 1) * a * b].to_vec()).collect()
    }

    #[test]
    fn shared_draws_give_each_group_one_draw_in_every_pass() {
        let device = Default::default();
        let key = ParamId::from(7);
        let mut noise = NoiseSource::seeded(1);
        let mut shared = SharedDraws::new(2);
        let mut sampler = Sampler::new(SamplingMode::PerExample, &mut noise).with_shared(&mut shared);
        // The first pass (one row per group) draws; the second expands.
        let first = rows(sampler.example_normals::<B, 3>(key, [2, 3, 3], &device));
        assert_ne!(first[0], first[1], "two groups got one draw");
        sampler.shared.as_deref_mut().unwrap().set_rows(vec![1, 0, 0, 1, 1]);
        let second = rows(sampler.example_normals::<B, 3>(key, [5, 3, 3], &device));
        for (row, group) in [1, 0, 0, 1, 1].into_iter().enumerate() {
            assert_eq!(second[row], first[group], "row {row} of group {group}");
        }
        // Another key draws anew; the batch draw is one for every pass.
        let other = rows(sampler.example_normals::<B, 3>(ParamId::from(8), [5, 3, 3], &device));
        assert_ne!(other[1], second[1]);
        let batch_a: Vec<f64> = sampler
            .batch_normals::<B, 2>(key, [3, 3], &device)
            .into_data()
            .to_vec()
            .unwrap();
        let batch_b: Vec<f64> = sampler
            .batch_normals::<B, 2>(key, [3, 3], &device)
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(batch_a, batch_b);
        // Without sharing, every call draws anew and the stream is the
        // plain generator's.
        let mut plain = NoiseSource::seeded(1);
        let direct: Vec<f64> = plain.normal::<B, 3>([2, 3, 3], &device).into_data().to_vec().unwrap();
        assert_eq!(
            direct,
            first.concat(),
            "the first shared draw is the generator's next draw"
        );
        let mut unshared = Sampler::new(SamplingMode::PerExample, &mut plain);
        let a = rows(unshared.example_normals::<B, 3>(key, [2, 3, 3], &device));
        let b = rows(unshared.example_normals::<B, 3>(key, [2, 3, 3], &device));
        assert_ne!(a, b);
    }

    #[test]
    fn row_streams_split_a_batch_as_one_device_draws_it() {
        let device = Default::default();
        let key = ParamId::from(3);
        // One sampler over rows 0..5, and two over rows 0..2 and 2..5: a
        // step's draws (dropout, per-example normals, Flipout signs, a
        // per-batch draw) in the order a forward pass makes them.
        let draws = |first: usize, rows: usize| {
            let mut noise = NoiseSource::seeded(11);
            let mut sampler = Sampler::new(SamplingMode::PerExample, &mut noise)
                .with_dropout(true)
                .with_rows(RowNoise::new(11, first));
            let x = Tensor::<B, 3>::ones([rows, 4, 6], &device);
            let dropped: Vec<f64> = sampler.dropout(x, 0.3).into_data().to_vec().unwrap();
            let eps: Vec<f64> = sampler
                .example_normals::<B, 3>(key, [rows, 2, 2], &device)
                .into_data()
                .to_vec()
                .unwrap();
            let signs: Vec<f64> = sampler
                .row_signs::<B, 3>([rows, 4, 2], &device)
                .into_data()
                .to_vec()
                .unwrap();
            let batch: Vec<f64> = sampler
                .batch_normals::<B, 2>(key, [2, 2], &device)
                .into_data()
                .to_vec()
                .unwrap();
            (dropped, eps, signs, batch)
        };
        let whole = draws(0, 5);
        let (a, b) = (draws(0, 2), draws(2, 3));
        assert_eq!(whole.0, [a.0.clone(), b.0].concat(), "dropout masks");
        assert_eq!(whole.1, [a.1.clone(), b.1].concat(), "per-example normals");
        assert_eq!(whole.2, [a.2.clone(), b.2].concat(), "Flipout signs");
        // The per-batch draw is the shared source's: the same on every peer.
        assert_eq!(whole.3, a.3);
        assert_eq!(whole.3, b.3);
        assert!(whole.1.iter().any(|&v| v != 0.0) && whole.0.contains(&0.0));
        // Rows differ from one another and from the shared stream.
        let mut plain = NoiseSource::seeded(11);
        let shared: Vec<f64> = plain.normal::<B, 3>([5, 2, 2], &device).into_data().to_vec().unwrap();
        assert_ne!(shared, whole.1);
        assert_ne!(whole.1[..4], whole.1[4..8]);
    }

    #[test]
    fn a_rows_tokens_keep_their_draws_whatever_the_padded_length() {
        let device = Default::default();
        let short: Vec<f64> = RowNoise::new(5, 7)
            .bernoulli::<B, 3>([2, 3, 4], 0.5, &device)
            .into_data()
            .to_vec()
            .unwrap();
        let long: Vec<f64> = RowNoise::new(5, 7)
            .bernoulli::<B, 3>([2, 9, 4], 0.5, &device)
            .into_data()
            .to_vec()
            .unwrap();
        for row in 0..2 {
            assert_eq!(
                short[row * 12..row * 12 + 12],
                long[row * 36..row * 36 + 12],
                "row {row}"
            );
        }
    }

    #[test]
    fn the_backend_generator_ignores_row_streams() {
        let device = Default::default();
        let mut noise = NoiseSource::Backend;
        let mut sampler = Sampler::new(SamplingMode::PerExample, &mut noise).with_rows(RowNoise::new(1, 0));
        assert!(sampler.row_streams().is_none());
        assert_eq!(sampler.row_signs::<B, 3>([2, 3, 4], &device).dims(), [2, 3, 4]);
    }
}
