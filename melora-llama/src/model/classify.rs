//! Multiple choice as next-token prediction: the logits of the answer-label
//! tokens at each example's answer position (BLoB, Laplace-LoRA).

use crate::data::Batch;
use crate::model::Llama;
use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use melora_core::{Adapter, Sampler};

/// Logit given to labels an example does not have (e.g. "E" for a
/// four-choice question): its probability is 0 after the softmax.
pub const MASKED_LOGIT: f32 = -1.0e4;

impl<B: Backend> Llama<B> {
    /// The logits of the `label_ids` tokens at `positions[b]` of each row
    /// (an output adapter drawn by `sampler`).
    ///
    /// # Shapes
    ///
    /// - hidden: `[batch, seq, hidden]`, output: `[batch, labels]`
    pub fn label_logits(
        &self,
        hidden: Tensor<B, 3>,
        positions: &[usize],
        label_ids: &[u32],
        sampler: &mut Sampler,
    ) -> Tensor<B, 2> {
        let [batch, _, d] = hidden.dims();
        let device = hidden.device();
        let index: Vec<i64> = positions
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p as i64, d))
            .collect();
        let index = Tensor::<B, 3, Int>::from_data(TensorData::new(index, [batch, 1, d]), &device);
        let last = hidden.gather(1, index).reshape([batch, d]);
        let ids: Vec<i64> = label_ids.iter().map(|&i| i as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [label_ids.len()]), &device);
        let rows = match &self.lm_head {
            // Burn's linear weight is [hidden, vocab]: pick the label columns.
            Some(head) => head.weight.val().select(1, ids.clone()),
            None => self.embed_tokens.weight.val().select(0, ids.clone()).transpose(),
        };
        let code = self.head_adapter.as_ref().map(|head| {
            let code = head.code(last.clone().unsqueeze_dim::<3>(1), sampler);
            let r = code.dims()[2];
            code.reshape([batch, r])
        });
        let logits = last.matmul(rows);
        match code.and_then(|code| self.head_update(code, Some(ids))) {
            Some(update) => logits.add(update),
            None => logits,
        }
    }

    /// Class logits of a padded batch, labels an example lacks masked out.
    ///
    /// # Shapes
    ///
    /// - output: `[batch, labels]`
    pub fn class_logits(
        &self,
        batch: &Batch,
        label_ids: &[u32],
        sampler: &mut Sampler,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.tokens.clone(), batch.shape), device);
        let padded = batch.mask.iter().any(|row| row.iter().any(|m| !m));
        let padding = padded.then_some(batch.mask.as_slice());
        // Only the answer position is read: the last layer computes it alone,
        // unless the LoRA taps (Laplace's curvature) record every position.
        let logits = if sampler.taps.is_none() {
            let hidden = self.hidden_at(tokens, padding, &batch.last, sampler);
            self.label_logits(hidden, &vec![0; batch.last.len()], label_ids, sampler)
        } else {
            let hidden = self.hidden(tokens, padding, None, sampler);
            self.label_logits(hidden, &batch.last, label_ids, sampler)
        };
        let k = label_ids.len();
        if batch.n_choices.iter().all(|&n| n >= k) {
            return logits;
        }
        let mask: Vec<f32> = batch
            .n_choices
            .iter()
            .flat_map(|&n| (0..k).map(move |j| if j < n { 0.0 } else { MASKED_LOGIT }))
            .collect();
        logits.add(Tensor::from_data(TensorData::new(mask, [batch.shape[0], k]), device))
    }
}

/// Mean cross-entropy of `logits` `[batch, labels]` against `labels`.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, labels: &[usize]) -> Tensor<B, 1> {
    let device = logits.device();
    let targets: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [labels.len(), 1]), &device);
    log_softmax(logits, 1).gather(1, targets).mean().neg()
}
