//! How a batch of multiple-choice examples becomes class scores: label
//! scoring (the answer-label logits at the prompt's last position,
//! [`crate::classify`]) or answer scoring (each choice's log-likelihood as
//! a continuation of the question, method.md section 6.1).
//!
//! Answer scoring computes a question's shared prefix once and its `K`
//! continuations after it: one forward pass over the prefixes of the
//! batch's questions (left-padded, filling a [`KvCache`]), then one over
//! the continuations of every choice (right-padded), each row attending to
//! its question's cached keys and values, which gradients flow through.
//! The weight sample is the question's: the adapters' draws are shared
//! between the two passes through [`SharedDraws`] (one `C` per question
//! for Me-LoRA under per-example sampling, one `A` for BLoB, one draw per
//! batch under per-batch sampling and Flipout), and the prefix's dropout
//! masks and Flipout signs are drawn once because the prefix is computed
//! once. The continuation rows are sorted by length and cut into at most
//! three passes ([`MAX_PARTS`]) that each pad to their own longest row,
//! where that saves more padding than a pass costs ([`PASS_COST`]). The
//! score of choice `k` is `s_k = Σ_t log p(c_{k,t} | prompt,
//! c_{k,<t})` (full-vocabulary log-softmax), optionally divided by its
//! token or character count; the output layer runs at the scored
//! positions only.
//!
//! Reference: lm-eval-harness and OLMES (allenai/olmes) score choices the
//! same way, one full forward per choice; `tests/answer.rs` checks the
//! shared-prefix scores and their gradients against those.

use crate::cache::KvCache;
use crate::classify::{batch_of, MASKED_LOGIT};
use crate::data::{collate, Batch, Encoded, LengthNorm, Padding, Scoring};
use crate::model::Llama;
use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use melora_core::{Sampler, SharedDraws};

/// What turns examples into class scores: the scoring, the answer-label
/// tokens (label scoring), the pad token and the number of classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Scorer {
    /// Label or answer scoring.
    pub scoring: Scoring,
    /// Answer scoring's length normalisation.
    pub norm: LengthNorm,
    /// The answer-label tokens (label scoring; one per class).
    pub label_ids: Vec<u32>,
    /// The padding token.
    pub pad: u32,
    /// The number of classes (the most choices an example of the task has).
    pub classes: usize,
}

impl Scorer {
    /// Label scoring over `label_ids`.
    pub fn label(label_ids: Vec<u32>, pad: u32) -> Self {
        Self { scoring: Scoring::Label, norm: LengthNorm::None, classes: label_ids.len(), label_ids, pad }
    }

    /// Answer scoring with `classes` classes.
    pub fn answer(classes: usize, norm: LengthNorm, pad: u32) -> Self {
        Self { scoring: Scoring::Answer, norm, label_ids: Vec::new(), pad, classes }
    }

    /// A batch of the given examples (left padding for label scoring).
    pub fn batch(&self, examples: &[Encoded], indices: &[usize], padding: Padding) -> ScoreBatch {
        match self.scoring {
            Scoring::Label => ScoreBatch::Label(batch_of(examples, indices, self.pad, padding)),
            Scoring::Answer => {
                let refs: Vec<&Encoded> = indices.iter().map(|&i| &examples[i]).collect();
                ScoreBatch::Answer(ChoiceBatch::new(&refs, self.pad, self.norm))
            }
        }
    }

    /// Class scores `[batch, classes]` (logits under label scoring, choice
    /// log-likelihoods under answer scoring); classes an example lacks get
    /// [`MASKED_LOGIT`].
    pub fn scores<B: Backend>(&self, model: &Llama<B>, batch: &ScoreBatch, sampler: &mut Sampler, device: &B::Device) -> Tensor<B, 2> {
        match batch {
            ScoreBatch::Label(batch) => model.class_logits(batch, &self.label_ids, sampler, device),
            ScoreBatch::Answer(batch) => model.choice_scores(batch, self.classes, sampler, device),
        }
    }
}

/// A batch ready for [`Scorer::scores`].
#[derive(Debug, Clone, PartialEq)]
pub enum ScoreBatch {
    /// Label scoring: padded prompts.
    Label(Batch),
    /// Answer scoring: prefixes and continuations.
    Answer(ChoiceBatch),
}

/// One forward pass of a batch, as Laplace-LoRA's taps see it: which
/// tokens are real and which example each row belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct PassLayout {
    /// Per row, `true` for the real tokens of the pass's own positions.
    pub mask: Vec<Vec<bool>>,
    /// The example of each row.
    pub example: Vec<usize>,
}

impl ScoreBatch {
    /// The labels.
    pub fn labels(&self) -> &[usize] {
        match self {
            Self::Label(b) => &b.labels,
            Self::Answer(b) => &b.labels,
        }
    }

    /// Valid classes per example.
    pub fn n_choices(&self) -> &[usize] {
        match self {
            Self::Label(b) => &b.n_choices,
            Self::Answer(b) => &b.n_choices,
        }
    }

    /// The forward passes [`Scorer::scores`] runs, in order.
    pub fn passes(&self) -> Vec<PassLayout> {
        match self {
            Self::Label(b) => vec![PassLayout { mask: b.mask.clone(), example: (0..b.shape[0]).collect() }],
            Self::Answer(b) => {
                let mut passes = Vec::new();
                if b.prefix.shape[1] > 0 {
                    passes.push(PassLayout { mask: b.prefix.mask.clone(), example: (0..b.prefix.shape[0]).collect() });
                }
                let past = b.prefix.shape[1];
                passes.extend(b.parts.iter().map(|part| PassLayout {
                    mask: part.padding.iter().map(|row| row[past..].to_vec()).collect(),
                    example: part.rows.clone(),
                }));
                passes
            }
        }
    }

    /// Tokens the passes compute, padding included.
    pub fn padded_tokens(&self) -> usize {
        match self {
            Self::Label(b) => b.shape[0] * b.shape[1],
            Self::Answer(b) => b.prefix.shape[0] * b.prefix.shape[1] + b.parts.iter().map(|p| p.shape[0] * p.shape[1]).sum::<usize>(),
        }
    }
}

/// A batch of answer-scored questions: their shared prefixes (left-padded,
/// one row per question) and the continuations of all their choices (one
/// row per choice, right-padded), the rows sorted by length and cut into at
/// most [`MAX_PARTS`] parts, each a forward pass of its own padded to its
/// longest row (choices' lengths vary far more than prompts').
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceBatch {
    /// The prefixes; `shape[1]` is 0 when no question has one.
    pub prefix: Batch,
    /// The continuation passes.
    pub parts: Vec<ContinuationPart>,
    /// The scored positions, as indices into the parts' flattened outputs
    /// laid end to end (`[rows * seq]` of each part in turn).
    pub positions: Vec<i64>,
    /// The token each scored position predicts.
    pub targets: Vec<i64>,
    /// Each scored position's class slot, `question * classes + choice`
    /// once multiplied out: `(question, choice)`.
    pub slots: Vec<(usize, usize)>,
    /// The weight of each scored position's log-probability: 1, or one
    /// over its choice's token or character count.
    pub weights: Vec<f64>,
    /// Labels.
    pub labels: Vec<usize>,
    /// Choices per question.
    pub n_choices: Vec<usize>,
}

/// The most continuation passes a batch is cut into.
pub const MAX_PARTS: usize = 3;

/// One continuation pass of a [`ChoiceBatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct ContinuationPart {
    /// The question of each row.
    pub rows: Vec<usize>,
    /// Tokens, `[rows, seq]` row-major.
    pub tokens: Vec<i64>,
    /// `[rows, seq]`.
    pub shape: [usize; 2],
    /// Per row, `true` for the real keys over the prefix's and its own positions.
    pub padding: Vec<Vec<bool>>,
}

/// What one more forward pass costs, in padded tokens: every pass packs
/// every weight matrix again (forward and backward), which on the CPU
/// costs about as much as a few dozen tokens' products.
pub const PASS_COST: usize = 32;

/// Cuts ascending lengths into at most `max` runs minimising the padded
/// total `Σ rows × longest` plus [`PASS_COST`] per run (dynamic
/// programming); the runs' ends.
fn cut_sorted(lengths: &[usize], max: usize) -> Vec<usize> {
    let n = lengths.len();
    let parts = max.max(1).min(n.max(1));
    // best[p][j]: the least cost of the first j rows in p runs.
    let mut best = vec![vec![usize::MAX; n + 1]; parts + 1];
    let mut from = vec![vec![0usize; n + 1]; parts + 1];
    best[0][0] = 0;
    for p in 1..=parts {
        for j in 1..=n {
            for i in (p - 1)..j {
                if best[p - 1][i] == usize::MAX {
                    continue;
                }
                let cost = best[p - 1][i] + (j - i) * lengths[j - 1];
                if cost < best[p][j] {
                    best[p][j] = cost;
                    from[p][j] = i;
                }
            }
        }
    }
    let p = (1..=parts).min_by_key(|&p| (best[p][n].saturating_add(p * PASS_COST), p)).unwrap_or(1);
    let mut ends = Vec::new();
    let (mut p, mut j) = (p, n);
    while p > 0 && j > 0 {
        ends.push(j);
        j = from[p][j];
        p -= 1;
    }
    ends.reverse();
    ends
}

impl ChoiceBatch {
    /// Collates answer-scored examples.
    ///
    /// # Panics
    ///
    /// If an example has no continuations (it was label-encoded).
    pub fn new(examples: &[&Encoded], pad: u32, norm: LengthNorm) -> Self {
        let prefix = collate(examples, pad, Padding::Left);
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (q, example) in examples.iter().enumerate() {
            assert!(!example.continuations.is_empty(), "an example without continuations under answer scoring");
            rows.extend((0..example.continuations.len()).map(|k| (q, k)));
        }
        let length = |&(q, k): &(usize, usize)| examples[q].continuations[k].input.len();
        rows.sort_by_key(|r| (length(r), r.0, r.1));
        let ends = cut_sorted(&rows.iter().map(length).collect::<Vec<_>>(), MAX_PARTS);
        let mut batch = ChoiceBatch {
            parts: Vec::new(),
            positions: Vec::new(),
            targets: Vec::new(),
            slots: Vec::new(),
            weights: Vec::new(),
            labels: prefix.labels.clone(),
            n_choices: examples.iter().map(|e| e.continuations.len()).collect(),
            prefix,
        };
        let (mut begin, mut offset) = (0, 0);
        for end in ends {
            let members = &rows[begin..end];
            let seq = members.iter().map(length).max().unwrap_or(0);
            let mut part = ContinuationPart { rows: Vec::new(), tokens: Vec::new(), shape: [members.len(), seq], padding: Vec::new() };
            for (row, &(q, k)) in members.iter().enumerate() {
                let c = &examples[q].continuations[k];
                let divisor = match norm {
                    LengthNorm::None => 1.0,
                    LengthNorm::PerToken => c.scored().max(1) as f64,
                    LengthNorm::PerChar => c.chars.max(1) as f64,
                };
                part.tokens.extend(c.input.iter().map(|&t| t as i64));
                part.tokens.extend(std::iter::repeat_n(pad as i64, seq - c.input.len()));
                let mut keys = batch.prefix.mask[q].clone();
                keys.extend((0..seq).map(|j| j < c.input.len()));
                part.padding.push(keys);
                part.rows.push(q);
                for (i, &target) in c.targets.iter().enumerate().skip(c.unscored) {
                    batch.positions.push((offset + row * seq + i) as i64);
                    batch.targets.push(target as i64);
                    batch.slots.push((q, k));
                    batch.weights.push(1.0 / divisor);
                }
            }
            offset += members.len() * seq;
            batch.parts.push(part);
            begin = end;
        }
        batch
    }

    /// The matrix `[questions * classes, positions]` that sums the weighted
    /// log-probabilities into their class slots.
    fn weight_matrix(&self, classes: usize) -> Vec<f64> {
        let n = self.positions.len();
        let mut w = vec![0f64; self.prefix.shape[0] * classes * n];
        for (p, (&(q, k), &weight)) in self.slots.iter().zip(&self.weights).enumerate() {
            w[(q * classes + k) * n + p] = weight;
        }
        w
    }
}

impl<B: Backend> Llama<B> {
    /// Answer scores `[questions, classes]` of a [`ChoiceBatch`]: each
    /// choice's (normalised) log-likelihood, [`MASKED_LOGIT`] for the
    /// classes a question lacks. See the [module docs](self).
    pub fn choice_scores(&self, batch: &ChoiceBatch, classes: usize, sampler: &mut Sampler, device: &B::Device) -> Tensor<B, 2> {
        let questions = batch.prefix.shape[0];
        assert!(batch.n_choices.iter().all(|&n| n <= classes), "a question has more choices than classes");
        let mut own = SharedDraws::new(questions);
        let mut sampler = Sampler {
            mode: sampler.mode,
            dropout: sampler.dropout,
            noise: &mut *sampler.noise,
            taps: sampler.taps.as_deref_mut(),
            shared: Some(&mut own),
        };
        // The prefix pass: its keys and values are all that is read (the
        // last layer computes its attention output and MLP at one position,
        // unless the LoRA taps of Laplace's curvature record every position).
        let mut cache = KvCache::new(self.n_layers());
        let [_, past] = batch.prefix.shape;
        if past > 0 {
            let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.prefix.tokens.clone(), batch.prefix.shape), device);
            let padded = batch.prefix.mask.iter().any(|row| row.iter().any(|m| !m));
            let last = vec![past - 1; questions];
            let rows = sampler.taps.is_none().then_some(last.as_slice());
            self.prefill(tokens, padded.then_some(batch.prefix.mask.as_slice()), &mut cache, rows, &mut sampler);
        }
        // The continuation passes, every row after its question's prefix.
        let mut outputs = Vec::with_capacity(batch.parts.len());
        for part in &batch.parts {
            if let Some(shared) = sampler.shared.as_deref_mut() {
                shared.set_rows(part.rows.clone());
            }
            let mut cache = cache.select_rows(&part.rows);
            let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(part.tokens.clone(), part.shape), device);
            let hidden = self.hidden(tokens, Some(part.padding.as_slice()), (past > 0).then_some(&mut cache), &mut sampler);
            let [rows, seq, d] = hidden.dims();
            outputs.push(hidden.reshape([rows * seq, d]));
        }
        let n = batch.positions.len();
        let positions = Tensor::<B, 1, Int>::from_data(TensorData::new(batch.positions.clone(), [n]), device);
        let at = Tensor::cat(outputs, 0).select(0, positions);
        let logp = log_softmax(self.logits_rows(at), 1);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), [n, 1]), device);
        let picked = logp.gather(1, targets);
        let weights = Tensor::<B, 2>::from_data(TensorData::new(batch.weight_matrix(classes), [questions * classes, n]), device);
        let scores = weights.matmul(picked).reshape([questions, classes]);
        if batch.n_choices.iter().all(|&k| k == classes) {
            return scores;
        }
        let mask: Vec<f64> =
            batch.n_choices.iter().flat_map(|&k| (0..classes).map(move |j| if j < k { 0.0 } else { MASKED_LOGIT as f64 })).collect();
        scores.add(Tensor::from_data(TensorData::new(mask, [questions, classes]), device))
    }
}
