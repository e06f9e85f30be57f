//! Text generation (greedy, or temperature with nucleus sampling) with a KV
//! cache, and perplexity.

use crate::error::{LlamaError, Result};
use crate::model::cache::KvCache;
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor, TensorData};
use melora_core::{NoiseSource, Sampler, SamplingMode};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches `top_p` (1 keeps all).
    pub top_p: f64,
    /// Seed of the token sampler.
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

fn pick(logits: &[f32], options: &GenerateOptions, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32
    };
    if options.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / options.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let cut = probs.iter().position(|p| {
        kept += p.1;
        kept >= options.top_p
    });
    probs.truncate(cut.map_or(probs.len(), |c| c + 1));
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * mass;
    for (id, p) in &probs {
        if u < *p {
            return *id;
        }
        u -= p;
    }
    probs.last().map_or_else(argmax, |p| p.0)
}

fn last_logits<B: Backend>(model: &Llama<B>, hidden: Tensor<B, 3>) -> Vec<f32> {
    let [_, seq, d] = hidden.dims();
    let last = hidden.slice([0..1, seq - 1..seq, 0..d]);
    model
        .logits(last)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 logits")
}

/// Continues `prompt`; calls `on_text` with each new piece of text as it
/// is produced. Stops at `max_new_tokens` or the end-of-sequence token.
/// Returns the generated text.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    prompt: &str,
    options: &GenerateOptions,
    device: &B::Device,
    mut on_text: impl FnMut(&str),
) -> Result<String> {
    let ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        return Err(LlamaError::Tokenizer("the prompt encodes to no tokens".into()));
    }
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut noise = NoiseSource::seeded(options.seed);
    let mut sampler = Sampler::new(SamplingMode::Mean, &mut noise);
    let mut cache = KvCache::new(model.n_layers());
    let tokens = |ids: &[u32]| {
        let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, ids.len()]), device)
    };
    let mut logits = last_logits(model, model.hidden(tokens(&ids), None, Some(&mut cache), &mut sampler));
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    for _ in 0..options.max_new_tokens {
        let next = pick(&logits, options, &mut rng);
        if Some(next) == tokenizer.eos {
            break;
        }
        generated.push(next);
        let text = tokenizer.decode(&generated)?;
        // Print only whole characters: a partial UTF-8 sequence decodes to U+FFFD.
        if !text.ends_with('\u{fffd}') && text.len() > printed {
            on_text(&text[printed..]);
            printed = text.len();
        }
        logits = last_logits(
            model,
            model.hidden(tokens(&[next]), None, Some(&mut cache), &mut sampler),
        );
    }
    tokenizer.decode(&generated)
}

/// The perplexity of a token sequence under the model: `exp` of the mean
/// next-token negative log-likelihood.
pub fn perplexity<B: Backend>(model: &Llama<B>, ids: &[u32], device: &B::Device) -> Result<f64> {
    if ids.len() < 2 {
        return Err(LlamaError::Tokenizer(
            "perplexity needs a text of at least two tokens".into(),
        ));
    }
    let n = ids.len();
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(data.clone(), [1, n]), device);
    let mut noise = NoiseSource::seeded(0);
    let hidden = model.hidden(tokens, None, None, &mut Sampler::new(SamplingMode::Mean, &mut noise));
    let [_, _, d] = hidden.dims();
    let logits = model.logits(hidden.slice([0..1, 0..n - 1, 0..d]));
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(data[1..].to_vec(), [1, n - 1, 1]), device);
    let nll: f64 = log_softmax(logits, 2)
        .gather(2, targets)
        .mean()
        .neg()
        .into_scalar()
        .elem();
    Ok(nll.exp())
}
