//! Explicit, seedable sources of randomness for the adapters.
//!
//! Every random draw an adapter makes (its initial weights, the Gaussian
//! noise of BLoB's `A` and of Me-LoRA's `C`, Flipout sign vectors, dropout
//! masks) comes from a [`NoiseSource`] passed to `init` or `forward`, never
//! from hidden global state. Two kinds exist:
//!
//! - [`NoiseSource::seeded`]: a ChaCha-based generator on the host. The same
//!   seed gives the same numbers on every backend, which makes runs and tests
//!   reproducible bit for bit. The numbers are copied to the device, which is
//!   cheap for Me-LoRA (`batch * r^2` normals) but not for large per-token
//!   draws on a GPU.
//! - [`NoiseSource::backend`]: the backend's own generator
//!   (`Tensor::random`), seeded with `B::seed`. Fast on GPUs; reproducible
//!   only on the same backend and device.
//!
//! Training and prediction pick one per step or pass through [`NoiseDevice`]:
//! by default the host generator on the CPU backend (ndarray) and the
//! backend's generator elsewhere, because a training step of a 7B model
//! draws ~3 * 10^8 dropout-mask entries, which on the host took most of a
//! GPU step (see `experiments/results/gpu-h100.md`).

use burn::config::Config;
use burn::tensor::{backend::Backend, Distribution, ElementConversion, Shape, Tensor, TensorData};
use chacha20::ChaCha12Rng;
use rand::{Rng, RngExt, SeedableRng};
use rayon::prelude::*;

/// Which generator draws a step's noise (dropout masks, Flipout signs, the
/// adapters' random weights).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum NoiseDevice {
    /// The host generator on the CPU backend (ndarray), the backend's
    /// generator on the others.
    Auto,
    /// Always the seeded host generator: the same draws on every backend,
    /// at the cost of drawing and copying every mask on a GPU.
    Host,
    /// Always the backend's generator.
    Backend,
}

// Written out: Burn's `Config` derive copies the variants' attributes
// into a type of its own, where `#[default]` is not understood.
#[allow(clippy::derivable_impls)]
impl Default for NoiseDevice {
    fn default() -> Self {
        Self::Auto
    }
}

impl NoiseDevice {
    /// The noise source for `seed` on `device`.
    pub fn source<B: Backend>(self, seed: u64, device: &B::Device) -> NoiseSource {
        let host = match self {
            Self::Host => true,
            Self::Backend => false,
            // Burn names the CPU backend `ndarray` (`autodiff<ndarray>` under autodiff).
            Self::Auto => B::name(device).contains("ndarray"),
        };
        if host {
            NoiseSource::seeded(seed)
        } else {
            NoiseSource::backend::<B>(seed, device)
        }
    }
}

impl std::str::FromStr for NoiseDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "host" => Ok(Self::Host),
            "backend" | "device" => Ok(Self::Backend),
            _ => Err(format!("unknown noise device {s:?}: expected auto, host or backend")),
        }
    }
}

/// Where random numbers come from. See the [module docs](self).
// A run holds one or two of them: the seeded generator's size is no cost.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum NoiseSource {
    /// A seeded host generator: identical draws on every backend. The same
    /// stream as `rand::rngs::StdRng` seeded alike (ChaCha12; tested), held
    /// as its own type because it can seek.
    Seeded(ChaCha12Rng),
    /// The backend's generator, seeded through `Backend::seed`.
    Backend,
}

impl NoiseSource {
    /// A host generator seeded with `seed`.
    pub fn seeded(seed: u64) -> Self {
        Self::Seeded(ChaCha12Rng::seed_from_u64(seed))
    }

    /// The backend's generator, seeded now with `seed` on `device`.
    pub fn backend<B: Backend>(seed: u64, device: &B::Device) -> Self {
        B::seed(device, seed);
        Self::Backend
    }

    /// Standard normal draws of the given shape.
    pub fn normal<B: Backend, const D: usize>(&mut self, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
        match self {
            Self::Seeded(rng) => {
                let values = standard_normals(rng, shape.iter().product());
                Tensor::from_data(TensorData::new(values, Shape::new(shape)), device)
            }
            Self::Backend => Tensor::random(shape, Distribution::Normal(0.0, 1.0), device),
        }
    }

    /// Random signs (+1 or -1 with equal probability) of the given shape.
    pub fn signs<B: Backend, const D: usize>(&mut self, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
        self.bernoulli::<B, D>(shape, 0.5, device)
            .mul_scalar(2.0)
            .sub_scalar(1.0)
    }

    /// Draws equal to 1 with probability `p` and 0 otherwise.
    pub fn bernoulli<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        p: f64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        match self {
            Self::Seeded(rng) => {
                let values = bernoulli_draws(rng, shape.iter().product(), p);
                Tensor::from_data(TensorData::new(values, Shape::new(shape)), device)
            }
            Self::Backend => Tensor::random(shape, Distribution::Bernoulli(p), device),
        }
    }

    /// Uniform draws in `[low, high)` of the given shape.
    pub fn uniform<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        low: f64,
        high: f64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        match self {
            Self::Seeded(rng) => {
                let n: usize = shape.iter().product();
                let values: Vec<f64> = (0..n).map(|_| low + (high - low) * rng.random::<f64>()).collect();
                Tensor::from_data(TensorData::new(values, Shape::new(shape)), device)
            }
            Self::Backend => Tensor::random(shape, Distribution::Uniform(low, high), device),
        }
    }

    /// One uniform draw in `[0, 1)` on the host (used for the prior noise of
    /// the KL term). The backend variant uses a generator seeded from the
    /// backend's random stream so that it stays reproducible with `B::seed`.
    pub fn uniform_scalar<B: Backend>(&mut self, device: &B::Device) -> f64 {
        match self {
            Self::Seeded(rng) => rng.random::<f64>(),
            Self::Backend => Tensor::<B, 1>::random([1], Distribution::Default, device)
                .into_scalar()
                .elem::<f64>(),
        }
    }
}

/// `n` draws of `[u < p]` (1 or 0), `u = rng.random::<f64>()`, in bulk:
/// the same numbers as drawing `u` one at a time, and the generator left
/// where that would leave it. rand's `u` is the top 53 bits of one `u64`
/// (two consecutive 32-bit words of the stream) times 2^-53, so `u < p` iff
/// those bits, as a float, are below `p * 2^53` (both exact). Chunks of the
/// stream are generated on rayon's threads, each by a generator with the
/// same seed and stream moved to its chunk's word position (dropout masks:
/// ~18 M entries per SmolLM2 step).
/// Per-example noise streams: row `j` of a batch whose first example has
/// index `first` draws from stream `first + j + 1` of a ChaCha generator
/// seeded with `seed` (stream 0 is the step's shared [`NoiseSource`]).
///
/// A training step sets one (through [`crate::Sampler::with_rows`]) so
/// that an example's dropout masks, Flipout signs and per-example weight
/// draws depend on `(seed, step, example index)` only: the rows of a batch
/// split over several data-parallel peers draw exactly what one device
/// drawing the whole batch draws. Row `j` reads its stream in order, so
/// its `t`-th token gets the same draw whatever the batch's padded length,
/// as long as the rows keep their length.
#[derive(Debug)]
pub struct RowNoise {
    seed: u64,
    first: u64,
    streams: Vec<ChaCha12Rng>,
}

impl RowNoise {
    /// Streams for rows `first, first + 1, ...` under `seed`.
    pub fn new(seed: u64, first: usize) -> Self {
        Self {
            seed,
            first: first as u64,
            streams: Vec::new(),
        }
    }

    fn streams(&mut self, rows: usize) -> &mut [ChaCha12Rng] {
        while self.streams.len() < rows {
            let mut rng = ChaCha12Rng::seed_from_u64(self.seed);
            rng.set_stream(self.first + self.streams.len() as u64 + 1);
            self.streams.push(rng);
        }
        &mut self.streams[..rows]
    }

    /// Standard normals `[rows, ...]`, row `j` from its own stream.
    pub fn normal<B: Backend, const D: usize>(&mut self, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
        let per_row: usize = shape[1..].iter().product();
        let rows: Vec<Vec<f32>> = self
            .streams(shape[0])
            .par_iter_mut()
            .map(|rng| standard_normals(rng, per_row))
            .collect();
        Tensor::from_data(TensorData::new(rows.concat(), Shape::new(shape)), device)
    }

    /// Draws equal to 1 with probability `p`, `[rows, ...]`, row `j` from
    /// its own stream (the same numbers as [`NoiseSource::bernoulli`] on
    /// that stream).
    pub fn bernoulli<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        p: f64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let per_row: usize = shape[1..].iter().product();
        let mut values = Vec::with_capacity(shape.iter().product());
        for rng in self.streams(shape[0]) {
            values.extend(bernoulli_draws(rng, per_row, p));
        }
        Tensor::from_data(TensorData::new(values, Shape::new(shape)), device)
    }

    /// Random signs, `[rows, ...]`.
    pub fn signs<B: Backend, const D: usize>(&mut self, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
        self.bernoulli::<B, D>(shape, 0.5, device)
            .mul_scalar(2.0)
            .sub_scalar(1.0)
    }
}

fn bernoulli_draws(rng: &mut ChaCha12Rng, n: usize, p: f64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let start = rng.get_word_pos();
    let threshold = p * (1u64 << 53) as f64;
    let (seed, stream) = (rng.get_seed(), rng.get_stream());
    let mut values = vec![0f32; n];
    values.par_chunks_mut(CHUNK).enumerate().for_each(|(i, out)| {
        let mut local = ChaCha12Rng::from_seed(seed);
        local.set_stream(stream);
        local.set_word_pos(start + 2 * (i * CHUNK) as u128);
        let mut words = vec![0u64; out.len()];
        local.fill(&mut words[..]);
        for (o, w) in out.iter_mut().zip(words) {
            *o = if ((w >> 11) as f64) < threshold { 1.0 } else { 0.0 };
        }
    });
    rng.set_word_pos(start + 2 * n as u128);
    values
}

/// `n` standard normal draws from `rng` (Box-Muller: two per pair of uniforms).
pub fn standard_normals<R: Rng + ?Sized>(rng: &mut R, n: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        values.push((radius * angle.cos()) as f32);
        if values.len() < n {
            values.push((radius * angle.sin()) as f32);
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::TestBackend;

    /// `NoiseSource::Seeded`'s ChaCha12 stream is rand's `StdRng` stream for
    /// the same `u64` seed, so earlier seeded results still reproduce.
    #[test]
    fn the_seeded_generator_is_rands_std_rng() {
        use rand::rngs::StdRng;
        for seed in [0, 1, 42, u64::MAX] {
            let (mut ours, mut std) = (ChaCha12Rng::seed_from_u64(seed), StdRng::seed_from_u64(seed));
            let a: Vec<u64> = (0..100).map(|_| ours.random()).collect();
            let b: Vec<u64> = (0..100).map(|_| std.random()).collect();
            assert_eq!(a, b, "seed {seed}");
        }
    }

    /// The bulk Bernoulli draws equal one `random::<f64>() < p` per entry,
    /// and leave the generator where those would (also from an odd word
    /// position, after a `u32`).
    #[test]
    fn bulk_bernoulli_draws_equal_one_at_a_time() {
        // Sizes below, at and across the parallel chunks (2^16 entries).
        for (n, p, skip_u32) in [
            (1000, 0.9, false),
            (37, 0.5, true),
            (4099, 0.1, true),
            (0, 0.5, false),
            (64, 1.0, false),
            (64, 0.0, true),
            (65536, 0.9, true),
            (200_003, 0.3, true),
            (131_072, 0.5, false),
        ] {
            let (mut bulk, mut single) = (ChaCha12Rng::seed_from_u64(3), ChaCha12Rng::seed_from_u64(3));
            if skip_u32 {
                let _: u32 = bulk.random();
                let _: u32 = single.random();
            }
            let expected: Vec<f32> = (0..n)
                .map(|_| if single.random::<f64>() < p { 1.0 } else { 0.0 })
                .collect();
            assert_eq!(bernoulli_draws(&mut bulk, n, p), expected, "n = {n}, p = {p}");
            assert_eq!(
                bulk.random::<u64>(),
                single.random::<u64>(),
                "the generators continue alike"
            );
        }
    }

    #[test]
    fn noise_device_picks_the_host_generator_on_ndarray() {
        let device = Default::default();
        type Train = burn::backend::Autodiff<TestBackend>;
        assert!(matches!(
            NoiseDevice::Auto.source::<TestBackend>(1, &device),
            NoiseSource::Seeded(_)
        ));
        assert!(matches!(
            NoiseDevice::Auto.source::<Train>(1, &device),
            NoiseSource::Seeded(_)
        ));
        assert!(matches!(
            NoiseDevice::Host.source::<Train>(1, &device),
            NoiseSource::Seeded(_)
        ));
        assert!(matches!(
            NoiseDevice::Backend.source::<Train>(1, &device),
            NoiseSource::Backend
        ));
        // Auto on the CPU is the seeded stream itself.
        let auto = NoiseDevice::Auto
            .source::<TestBackend>(5, &device)
            .normal::<TestBackend, 1>([64], &device);
        let seeded = NoiseSource::seeded(5).normal::<TestBackend, 1>([64], &device);
        assert_eq!(auto.to_data(), seeded.to_data());
        assert_eq!("device".parse::<NoiseDevice>(), Ok(NoiseDevice::Backend));
        assert!("gpu".parse::<NoiseDevice>().is_err());
    }

    #[test]
    fn seeded_source_is_reproducible_and_standard_normal() {
        let device = Default::default();
        let a = NoiseSource::seeded(7).normal::<TestBackend, 2>([200, 250], &device);
        let b = NoiseSource::seeded(7).normal::<TestBackend, 2>([200, 250], &device);
        let c = NoiseSource::seeded(8).normal::<TestBackend, 2>([200, 250], &device);
        assert_eq!(a.to_data(), b.to_data());
        assert_ne!(a.to_data(), c.to_data());
        let values: Vec<f64> = a.to_data().to_vec().unwrap();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        // 50k draws: the standard error of the mean is 0.0045, of the variance 0.0063.
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn signs_are_plus_minus_one_and_balanced() {
        let device = Default::default();
        let s = NoiseSource::seeded(1).signs::<TestBackend, 1>([10_000], &device);
        let values: Vec<f64> = s.to_data().to_vec().unwrap();
        assert!(values.iter().all(|v| *v == 1.0 || *v == -1.0));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!(mean.abs() < 0.05, "mean sign {mean}");
    }
}
