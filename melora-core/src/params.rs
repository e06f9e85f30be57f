//! Trainable-parameter accounting (the data behind the paper's Table 1,
//! `docs/derivations.md` section 3).

use crate::config::AdapterKind;

/// Trainable values of one adapted `d_output x d_input` layer at rank `r`:
/// LoRA `r (m + n)`, BLoB `r (m + 2n)` (plus `G_A`), Me-LoRA `r (m + n) + 2 r^2`
/// (plus `M` and `H`).
pub fn trainable_per_layer(kind: AdapterKind, d_output: usize, d_input: usize, rank: usize) -> usize {
    let lora = rank * (d_output + d_input);
    match kind {
        AdapterKind::Lora => lora,
        AdapterKind::Blob => lora + rank * d_input,
        AdapterKind::MeLora => lora + 2 * rank * rank,
    }
}

/// Trainable values of a set of adapted layers, each `(d_output, d_input)`.
pub fn trainable_total(kind: AdapterKind, layers: &[(usize, usize)], rank: usize) -> usize {
    layers.iter().map(|&(m, n)| trainable_per_layer(kind, m, n, rank)).sum()
}

/// Size in MiB of `values` numbers of `bytes_per_value` bytes.
pub fn mib(values: usize, bytes_per_value: usize) -> f64 {
    (values * bytes_per_value) as f64 / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// q_proj and v_proj of every layer: 2 L square d x d modules.
    fn qv(layers: usize, d: usize) -> Vec<(usize, usize)> {
        vec![(d, d); 2 * layers]
    }

    #[test]
    fn llama2_counts_of_derivations_section_3() {
        let seven = qv(32, 4096);
        let thirteen = qv(40, 5120);
        assert_eq!(trainable_total(AdapterKind::Lora, &seven, 8), 4_194_304);
        assert_eq!(trainable_total(AdapterKind::Blob, &seven, 8), 6_291_456);
        assert_eq!(trainable_total(AdapterKind::MeLora, &seven, 8), 4_202_496);
        assert_eq!(trainable_total(AdapterKind::Lora, &seven, 64), 33_554_432);
        assert_eq!(trainable_total(AdapterKind::Blob, &seven, 64), 50_331_648);
        assert_eq!(trainable_total(AdapterKind::MeLora, &seven, 64), 34_078_720);
        assert_eq!(trainable_total(AdapterKind::Lora, &thirteen, 8), 6_553_600);
        assert_eq!(trainable_total(AdapterKind::Blob, &thirteen, 8), 9_830_400);
        assert_eq!(trainable_total(AdapterKind::MeLora, &thirteen, 8), 6_563_840);
        assert_eq!(trainable_total(AdapterKind::MeLora, &thirteen, 64), 53_084_160);
        assert!((mib(4_194_304, 4) - 16.0).abs() < 1e-12);
    }
}
