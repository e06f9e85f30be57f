//! Padding encoded examples into batches.

use super::Encoded;
use serde::{Deserialize, Serialize};

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

impl Batch {
    /// Rows `rows` of the batch, with the whole batch's padded length.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Batch {
        let seq = self.shape[1];
        assert!(
            rows.start <= rows.end && rows.end <= self.shape[0],
            "rows {rows:?} of a batch of {}",
            self.shape[0]
        );
        Batch {
            tokens: self.tokens[rows.start * seq..rows.end * seq].to_vec(),
            shape: [rows.len(), seq],
            mask: self.mask[rows.clone()].to_vec(),
            last: self.last[rows.clone()].to_vec(),
            labels: self.labels[rows.clone()].to_vec(),
            n_choices: self.n_choices[rows].to_vec(),
        }
    }
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

/// Groups example indices into batches of similar length (less padding),
/// in a deterministic order.
pub fn length_batches(examples: &[Encoded], indices: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut sorted = indices.to_vec();
    sorted.sort_by_key(|&i| (examples[i].tokens(), i));
    sorted.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect()
}

/// A padded batch of the given examples.
pub fn batch_of(examples: &[Encoded], indices: &[usize], pad: u32, padding: Padding) -> Batch {
    let refs: Vec<&Encoded> = indices.iter().map(|&i| &examples[i]).collect();
    collate(&refs, pad, padding)
}
