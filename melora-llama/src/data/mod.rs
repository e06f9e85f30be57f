//! Benchmark tasks as multiple-choice next-token prediction (docs/method.md
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

mod batch;
mod encode;
pub mod files;
mod load;
pub mod own;
pub mod readers;
pub mod template;

pub use batch::{batch_of, collate, length_batches, Batch, Padding};
pub use encode::{
    encode, encode_cloze, encode_prompt, encode_requests, label_tokens, split_shared_prefix, ChoiceSequence,
    Continuation, Encoded,
};
pub use load::{load_task, read_questions, seeded_shuffle, TaskData};

use serde::{Deserialize, Serialize};

/// The seed of every fixed subset and split division.
pub const SPLIT_SEED: u64 = 20240917;
/// Longest prompt in tokens (docs/method.md section 6).
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
    /// A user's own questions, read from the files a run's `data` names
    /// ([`files::DataFiles`]); not one of [`Task::ALL`].
    #[serde(rename = "files")]
    Files,
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
    pub const ALL: [Task; 9] = [
        Task::ArcE,
        Task::ArcC,
        Task::Obqa,
        Task::Boolq,
        Task::WgS,
        Task::WgM,
        Task::MmluChem,
        Task::MmluPhys,
        Task::MmluMath,
    ];

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
            Task::Files => "files",
        }
    }

    /// Its name in prose and tables.
    pub fn title(self) -> &'static str {
        match self {
            Task::ArcE => "ARC-Easy",
            Task::ArcC => "ARC-Challenge",
            Task::Obqa => "OpenBookQA",
            Task::Boolq => "BoolQ",
            Task::WgS => "WinoGrande-S",
            Task::WgM => "WinoGrande-M",
            Task::MmluChem => "MMLU college chemistry",
            Task::MmluPhys => "MMLU college physics",
            Task::MmluMath => "MMLU college mathematics",
            Task::Files => "your questions",
        }
    }

    /// The answer labels, as they appear after "Answer:" (without the space).
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Task::Boolq => &["True", "False"],
            Task::WgS | Task::WgM => &["A", "B"],
            Task::ArcC | Task::ArcE => &["A", "B", "C", "D", "E"],
            // As many as a file's questions have (up to Z).
            Task::Files => &[
                "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O", "P", "Q", "R", "S", "T",
                "U", "V", "W", "X", "Y", "Z",
            ],
            _ => &["A", "B", "C", "D"],
        }
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Task::ALL
            .iter()
            .copied()
            .chain([Task::Files])
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown task {s:?}: expected one of {}, or files (a run's own questions)",
                    Task::ALL.map(|t| t.name()).join(", ")
                )
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

    /// The prompt of docs/method.md section 6 (choices as "A) text").
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

/// How multiple choice is scored (docs/method.md sections 6 and 6.1).
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
            _ => Err(format!(
                "unknown length normalisation {s:?}: expected none, per-token or per-char"
            )),
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
                    .map(|option| Cloze {
                        context: format!("{before}{option}"),
                        continuation: format!(" {after}"),
                    })
                    .collect()
            }
            Item::Choice { question, choices, .. } => choices
                .iter()
                .map(|choice| Cloze {
                    context: format!("Question: {question}\nAnswer:"),
                    continuation: format!(" {choice}"),
                })
                .collect(),
            Item::YesNo { passage, question, .. } => ["yes", "no"]
                .iter()
                .map(|answer| Cloze {
                    context: format!("{passage}\nQuestion: {question}?\nAnswer:"),
                    continuation: format!(" {answer}"),
                })
                .collect(),
        }
    }
}
