//! How a batch of multiple-choice examples becomes class scores: label
//! scoring (the answer-label logits at the prompt's last position,
//! [`crate::model::classify`]) or answer scoring (each choice's log-likelihood as
//! a continuation of the question, docs/method.md section 6.1).
//!
//! Answer scoring computes a question's shared prefix once and its `K`
//! continuations after it, in one forward pass of one row per question:
//! the prefix, then each choice's continuation in turn (then padding).
//! The attention mask lets a continuation see its question's prefix and
//! its own earlier tokens, never another choice's, and its rotary
//! positions restart at the prefix's end, so each choice is scored as a
//! forward pass of the prefix and that choice alone would score it
//! ([`Llama::hidden_laid_out`]). A question is one row, so the weight
//! sample is the question's: one `C` per question for Me-LoRA under
//! per-example sampling, one `A` for BLoB, and the prefix's dropout masks
//! and Flipout signs are drawn once because the prefix is computed once.
//! The score of choice `k` is `s_k = Σ_t log p(c_{k,t} | prompt,
//! c_{k,<t})` (full-vocabulary log-softmax), optionally divided by its
//! token or character count; the output layer runs at the scored
//! positions only.
//!
//! Reference: lm-eval-harness and OLMES (allenai/olmes) score choices the
//! same way, one full forward per choice; `tests/answer.rs` checks the
//! shared-prefix scores and their gradients against those.

use crate::data::batch_of;
use crate::data::{Batch, Encoded, LengthNorm, Padding, Scoring};
use crate::model::classify::MASKED_LOGIT;
use crate::model::Llama;
use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use melora_core::{Adapter, Sampler};

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
        Self {
            scoring: Scoring::Label,
            norm: LengthNorm::None,
            classes: label_ids.len(),
            label_ids,
            pad,
        }
    }

    /// Answer scoring with `classes` classes.
    pub fn answer(classes: usize, norm: LengthNorm, pad: u32) -> Self {
        Self {
            scoring: Scoring::Answer,
            norm,
            label_ids: Vec::new(),
            pad,
            classes,
        }
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
    pub fn scores<B: Backend>(
        &self,
        model: &Llama<B>,
        batch: &ScoreBatch,
        sampler: &mut Sampler,
        device: &B::Device,
    ) -> Tensor<B, 2> {
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
    /// Answer scoring: each question's prefix and continuations in a row.
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

    /// The forward passes [`Scorer::scores`] runs, in order (one).
    pub fn passes(&self) -> Vec<PassLayout> {
        match self {
            Self::Label(b) => vec![PassLayout {
                mask: b.mask.clone(),
                example: (0..b.shape[0]).collect(),
            }],
            Self::Answer(b) => vec![PassLayout {
                mask: b.real(),
                example: (0..b.shape[0]).collect(),
            }],
        }
    }

    /// Rows `rows` of the batch, padded as the whole batch is (a
    /// data-parallel peer's share: each row's tokens keep their positions,
    /// so each example computes and draws what it does in the whole batch).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> ScoreBatch {
        match self {
            Self::Label(b) => ScoreBatch::Label(b.rows(rows)),
            Self::Answer(b) => ScoreBatch::Answer(b.rows(rows)),
        }
    }

    /// Tokens the passes compute, padding included.
    pub fn padded_tokens(&self) -> usize {
        match self {
            Self::Label(b) => b.shape[0] * b.shape[1],
            Self::Answer(b) => b.shape[0] * b.shape[1],
        }
    }
}

/// A batch of answer-scored questions, one row per question: its shared
/// prefix, then the continuation of each choice in turn, right-padded to
/// the batch's longest row.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceBatch {
    /// Tokens, `[questions, seq]` row-major.
    pub tokens: Vec<i64>,
    /// `[questions, seq]`.
    pub shape: [usize; 2],
    /// The rotary position of every token, `[questions * seq]`: the
    /// prefix from 0, each continuation from the prefix's length.
    pub rope: Vec<usize>,
    /// What each token of each row belongs to.
    pub segments: Vec<Vec<Segment>>,
    /// The scored positions, as indices into the flattened output
    /// `[questions * seq]`.
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

/// The part of a [`ChoiceBatch`] row a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// The question's shared prefix.
    Prefix,
    /// The continuation of a choice.
    Choice(usize),
    /// Padding.
    Padding,
}

impl ChoiceBatch {
    /// Collates answer-scored examples.
    ///
    /// # Panics
    ///
    /// If an example has no continuations (it was label-encoded).
    pub fn new(examples: &[&Encoded], pad: u32, norm: LengthNorm) -> Self {
        let seq = examples.iter().map(|e| e.tokens()).max().unwrap_or(0);
        let mut batch = ChoiceBatch {
            tokens: Vec::with_capacity(examples.len() * seq),
            shape: [examples.len(), seq],
            rope: Vec::with_capacity(examples.len() * seq),
            segments: Vec::with_capacity(examples.len()),
            positions: Vec::new(),
            targets: Vec::new(),
            slots: Vec::new(),
            weights: Vec::new(),
            labels: examples.iter().map(|e| e.label).collect(),
            n_choices: examples.iter().map(|e| e.continuations.len()).collect(),
        };
        for (q, example) in examples.iter().enumerate() {
            assert!(
                !example.continuations.is_empty(),
                "an example without continuations under answer scoring"
            );
            let prefix = example.ids.len();
            let mut segments = vec![Segment::Prefix; prefix];
            batch.tokens.extend(example.ids.iter().map(|&t| t as i64));
            batch.rope.extend(0..prefix);
            for (k, c) in example.continuations.iter().enumerate() {
                let divisor = match norm {
                    LengthNorm::None => 1.0,
                    LengthNorm::PerToken => c.scored().max(1) as f64,
                    LengthNorm::PerChar => c.chars.max(1) as f64,
                };
                let start = q * seq + segments.len();
                for (i, &target) in c.targets.iter().enumerate().skip(c.unscored) {
                    batch.positions.push((start + i) as i64);
                    batch.targets.push(target as i64);
                    batch.slots.push((q, k));
                    batch.weights.push(1.0 / divisor);
                }
                batch.tokens.extend(c.input.iter().map(|&t| t as i64));
                batch.rope.extend(prefix..prefix + c.input.len());
                segments.extend(std::iter::repeat_n(Segment::Choice(k), c.input.len()));
            }
            let fill = seq - segments.len();
            batch.tokens.extend(std::iter::repeat_n(pad as i64, fill));
            batch.rope.extend(std::iter::repeat_n(0, fill));
            segments.extend(std::iter::repeat_n(Segment::Padding, fill));
            batch.segments.push(segments);
        }
        batch
    }

    /// Rows `rows` of the batch, with the whole batch's padded length.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> ChoiceBatch {
        let seq = self.shape[1];
        let (start, end) = (rows.start, rows.end);
        assert!(
            start <= end && end <= self.shape[0],
            "rows {start}..{end} of a batch of {}",
            self.shape[0]
        );
        let mut batch = ChoiceBatch {
            tokens: self.tokens[start * seq..end * seq].to_vec(),
            shape: [end - start, seq],
            rope: self.rope[start * seq..end * seq].to_vec(),
            segments: self.segments[rows.clone()].to_vec(),
            positions: Vec::new(),
            targets: Vec::new(),
            slots: Vec::new(),
            weights: Vec::new(),
            labels: self.labels[rows.clone()].to_vec(),
            n_choices: self.n_choices[rows.clone()].to_vec(),
        };
        for (p, &(q, k)) in self.slots.iter().enumerate() {
            if rows.contains(&q) {
                batch.positions.push(self.positions[p] - (start * seq) as i64);
                batch.targets.push(self.targets[p]);
                batch.slots.push((q - start, k));
                batch.weights.push(self.weights[p]);
            }
        }
        batch
    }

    /// Per row, `true` for the real tokens.
    pub fn real(&self) -> Vec<Vec<bool>> {
        self.segments
            .iter()
            .map(|row| row.iter().map(|&s| s != Segment::Padding).collect())
            .collect()
    }

    /// The attention bias `[questions, 1, seq, seq]`, row-major: a token
    /// sees the earlier tokens of its own segment and, in a continuation,
    /// the whole prefix; padding sees itself only.
    pub fn attention_bias(&self) -> Vec<f32> {
        let seq = self.shape[1];
        let mut bias = Vec::with_capacity(self.shape[0] * seq * seq);
        for row in &self.segments {
            for (i, &query) in row.iter().enumerate() {
                bias.extend(row.iter().enumerate().map(|(j, &key)| {
                    let visible =
                        j == i || (j < i && query != Segment::Padding && (key == query || key == Segment::Prefix));
                    if visible {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        bias
    }

    /// The matrix `[questions * classes, positions]` that sums the weighted
    /// log-probabilities into their class slots.
    fn weight_matrix(&self, classes: usize) -> Vec<f64> {
        let n = self.positions.len();
        let mut w = vec![0f64; self.shape[0] * classes * n];
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
    pub fn choice_scores(
        &self,
        batch: &ChoiceBatch,
        classes: usize,
        sampler: &mut Sampler,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let [questions, seq] = batch.shape;
        assert!(
            batch.n_choices.iter().all(|&n| n <= classes),
            "a question has more choices than classes"
        );
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.tokens.clone(), batch.shape), device);
        let bias = Tensor::<B, 4>::from_data(
            TensorData::new(batch.attention_bias(), [questions, 1, seq, seq]),
            device,
        );
        let hidden = self.hidden_laid_out(tokens, &batch.rope, bias, sampler);
        let d = hidden.dims()[2];
        let n = batch.positions.len();
        let positions = Tensor::<B, 1, Int>::from_data(TensorData::new(batch.positions.clone(), [n]), device);
        // An output adapter draws its code over the whole batch (one draw
        // per question under per-example sampling), then takes its update
        // at the scored positions only.
        let head = self.head_adapter.as_ref().map(|head| {
            let code = head.code(hidden.clone(), sampler);
            let r = code.dims()[2];
            code.reshape([questions * seq, r]).select(0, positions.clone())
        });
        let at = hidden.reshape([questions * seq, d]).select(0, positions);
        let mut logits = self.logits_rows(at);
        if let Some(update) = head.and_then(|code| self.head_update(code, None)) {
            logits = logits.add(update);
        }
        let logp = log_softmax(logits, 1);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), [n, 1]), device);
        let picked = logp.gather(1, targets);
        let weights = Tensor::<B, 2>::from_data(
            TensorData::new(batch.weight_matrix(classes), [questions * classes, n]),
            device,
        );
        let scores = weights.matmul(picked).reshape([questions, classes]);
        if batch.n_choices.iter().all(|&k| k == classes) {
            return scores;
        }
        let mask: Vec<f64> = batch
            .n_choices
            .iter()
            .flat_map(|&k| (0..classes).map(move |j| if j < k { 0.0 } else { MASKED_LOGIT as f64 }))
            .collect();
        scores.add(Tensor::from_data(TensorData::new(mask, [questions, classes]), device))
    }
}
