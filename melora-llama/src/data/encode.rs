//! Tokenizing examples: label-scored prompts and answer-scored (cloze)
//! choice sequences with their shared prefix.

use super::{Item, Task};
use crate::error::{LlamaError, Result};
use crate::tokenizer::Tokenizer;

/// A tokenized example: prompt ids (at most [`MAX_TOKENS`](super::MAX_TOKENS)), its label and
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
        Self {
            ids,
            label,
            n_choices,
            continuations: Vec::new(),
        }
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
    /// Characters of the scored text (for [`LengthNorm::PerChar`](super::LengthNorm::PerChar)).
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
    encode_requests(&item.cloze(task), item.label(), task.name(), tokenizer, max_tokens)
}

/// [`encode_cloze`] of given requests (`what` names the task in errors).
pub fn encode_requests(
    requests: &[super::Cloze],
    label: usize,
    what: &str,
    tokenizer: &Tokenizer,
    max_tokens: usize,
) -> Result<Encoded> {
    let mut sequences = Vec::with_capacity(requests.len());
    for request in requests {
        let mut ids = tokenizer.encode(&request.context)?;
        let first_target = ids.len();
        let continuation = tokenizer.encode_plain(&request.continuation)?;
        if continuation.is_empty() {
            return Err(LlamaError::Data {
                task: what.to_string(),
                message: format!(
                    "the continuation {:?} of an example has no tokens",
                    request.continuation
                ),
            });
        }
        ids.extend(continuation);
        sequences.push(ChoiceSequence {
            ids,
            first_target,
            chars: request.continuation.chars().count(),
        });
    }
    let keep =
        usize::from(tokenizer.bos.is_some() && sequences.first().and_then(|s| s.ids.first()) == tokenizer.bos.as_ref());
    Ok(split_shared_prefix(&sequences, label, keep, max_tokens))
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
    assert!(
        sequences
            .iter()
            .all(|s| s.first_target >= 1 && s.first_target < s.ids.len()),
        "a choice needs context and continuation"
    );
    let common = sequences
        .iter()
        .map(|s| s.ids.iter().zip(&sequences[0].ids).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(0);
    // The prefix ends before the last context token of the shortest
    // context, so that every scored token is predicted inside the
    // continuation pass.
    let shared = sequences
        .iter()
        .map(|s| s.first_target - 1)
        .min()
        .unwrap_or(0)
        .min(common);
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
    Encoded {
        ids: prefix,
        label,
        n_choices: sequences.len(),
        continuations,
    }
}

/// The label tokens of `task`: `" A"`, `" B"`, ... each a single token (an
/// error naming the label otherwise).
pub fn label_tokens(task: Task, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    task.labels()
        .iter()
        .map(|l| tokenizer.single_token(&format!(" {l}")))
        .collect()
}

/// Tokenizes `item`; a prompt longer than `max_tokens` loses tokens from its
/// start (after a leading BOS), so the answer position, the last token, is
/// always kept.
pub fn encode(item: &Item, tokenizer: &Tokenizer, max_tokens: usize) -> Result<Encoded> {
    encode_prompt(&item.render(), item.label(), item.n_choices(), tokenizer, max_tokens)
}

/// [`encode`] of a given prompt, its label and number of choices.
pub fn encode_prompt(
    prompt: &str,
    label: usize,
    n_choices: usize,
    tokenizer: &Tokenizer,
    max_tokens: usize,
) -> Result<Encoded> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.len() > max_tokens {
        let keep_bos = tokenizer.bos.is_some() && ids.first() == tokenizer.bos.as_ref();
        let head = usize::from(keep_bos);
        let cut = ids.len() - max_tokens;
        ids.drain(head..head + cut);
    }
    Ok(Encoded::label_scored(ids, label, n_choices))
}
