//! `melora-bench params`: trainable parameters and adapter sizes of LoRA,
//! BLoB and Me-LoRA on Llama-2-7B, Llama-2-13B and SmolLM2-135M, counted by
//! a visitor over adapters built on layers of the real shapes, beside the
//! paper's Table 1 with every disagreement flagged and explained
//! (docs/derivations.md section 6).

use crate::backend::Inner;
use burn::nn::LinearConfig;
use melora_core::{Adapter, AdapterKind, NoiseSource};
use melora_llama::model::Target;
use melora_llama::train::TrainConfig;
use melora_llama::LlamaConfig;
use serde::Serialize;

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct ParamRow {
    pub model: String,
    pub rank: usize,
    pub method: String,
    pub trainable: usize,
    pub mib_f32: f64,
    pub mib_bf16: f64,
    /// The paper's Table 1 (millions, MB), where it has the row.
    pub paper: Option<(f64, f64)>,
    /// Why our count and the paper's differ, if they do.
    pub note: Option<String>,
}

/// The shape `(d_out, d_in)` of a projection.
fn shape(config: &LlamaConfig, target: Target) -> (usize, usize) {
    let (h, q, kv, f) = (
        config.hidden_size,
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
        config.intermediate_size,
    );
    match target {
        Target::Q => (q, h),
        Target::K | Target::V => (kv, h),
        Target::O => (h, q),
        Target::Gate | Target::Up => (f, h),
        Target::Down => (h, f),
        Target::LmHead => (config.vocab_size, h),
    }
}

/// Trainable values of the adapters on `targets` of every layer (and of
/// the output projection for `lm_head`): one
/// adapter is built per distinct shape (on a base layer of that shape) and
/// its parameters counted by a module visitor.
pub fn count(config: &LlamaConfig, kind: AdapterKind, rank: usize, targets: &[Target]) -> anyhow::Result<usize> {
    let device = Default::default();
    let mut total = 0;
    for &target in targets {
        let (d_out, d_in) = shape(config, target);
        let base = LinearConfig::new(d_in, d_out).with_bias(false).init::<Inner>(&device);
        let adapter = TrainConfig::new()
            .with_method(kind.into())
            .with_rank(rank)
            .adapter()
            .init(base, &mut NoiseSource::seeded(0))?;
        // One output projection; one of the others per layer.
        let copies = if target == Target::LmHead {
            1
        } else {
            config.num_hidden_layers
        };
        total += adapter.num_trainable() * copies;
    }
    Ok(total)
}

/// The paper's Table 1 (trainable parameters in millions, size in MB), q and v.
fn paper(model: &str, rank: usize, kind: AdapterKind) -> Option<(f64, f64)> {
    Some(match (model, rank, kind) {
        ("llama2-7b", 8, AdapterKind::Lora) => (4.19, 15.98),
        ("llama2-7b", 8, AdapterKind::Blob) => (6.29, 23.99),
        ("llama2-7b", 8, AdapterKind::MeLora) => (4.20, 16.02),
        ("llama2-7b", 64, AdapterKind::Lora) => (33.55, 127.79),
        ("llama2-7b", 64, AdapterKind::Blob) => (50.33, 191.99),
        ("llama2-7b", 64, AdapterKind::MeLora) => (34.08, 130.00),
        ("llama2-13b", 8, AdapterKind::Lora) => (6.55, 24.99),
        ("llama2-13b", 8, AdapterKind::Blob) => (9.84, 37.54),
        ("llama2-13b", 8, AdapterKind::MeLora) => (6.56, 25.02),
        ("llama2-13b", 64, AdapterKind::Lora) => (52.43, 200.00),
        ("llama2-13b", 64, AdapterKind::Blob) => (78.97, 301.25),
        ("llama2-13b", 64, AdapterKind::MeLora) => (53.08, 202.48),
        _ => return None,
    })
}

/// Compares our count with the paper's and explains a difference.
fn explain(
    trainable: usize,
    mib: f64,
    paper: (f64, f64),
    kind: AdapterKind,
    rank: usize,
    layers: usize,
    d: usize,
) -> Option<String> {
    let millions = (trainable as f64 / 1e6 * 100.0).round() / 100.0;
    let mut notes = Vec::new();
    if (millions - paper.0).abs() > 0.005 {
        let k = 2 * layers;
        let blob_13b = k * (3 * d + rank) * rank;
        if kind == AdapterKind::Blob && (blob_13b as f64 / 1e6 - paper.0).abs() < 0.005 {
            notes.push(format!(
                "count: the paper's {} M is K(3d+r)r = {blob_13b}, not BLoB's 3Kdr",
                paper.0
            ));
        } else {
            notes.push(format!("count: paper {} M vs exact {millions} M", paper.0));
        }
    }
    let from_rounded = paper.0 * 1e6 * 4.0 / (1u64 << 20) as f64;
    if (mib - paper.1).abs() > 0.005 {
        if (from_rounded - paper.1).abs() < 0.006 {
            notes.push(format!(
                "size: the paper's {} MB is its rounded count x 4 B / 2^20, exact {mib:.2} MiB",
                paper.1
            ));
        } else {
            notes.push(format!("size: the paper's {} MB matches neither the exact {mib:.2} MiB nor {from_rounded:.2} from its count (a typo)", paper.1));
        }
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

pub fn table(ranks: &[usize], targets: &[Target]) -> anyhow::Result<Vec<ParamRow>> {
    let mut rows = Vec::new();
    for model in ["llama2-7b", "llama2-13b", "llama3.1-8b", "qwen2.5-7b", "smollm2-135m"] {
        let config = LlamaConfig::preset(model).expect("preset");
        for &rank in ranks {
            for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
                let trainable = count(&config, kind, rank, targets)?;
                let mib_f32 = melora_core::params::mib(trainable, 4);
                let qv = targets == [Target::Q, Target::V];
                let paper = if qv { paper(model, rank, kind) } else { None };
                let note = paper.and_then(|p| {
                    explain(
                        trainable,
                        mib_f32,
                        p,
                        kind,
                        rank,
                        config.num_hidden_layers,
                        config.hidden_size,
                    )
                });
                rows.push(ParamRow {
                    model: model.into(),
                    rank,
                    method: format!("{kind:?}"),
                    trainable,
                    mib_f32,
                    mib_bf16: melora_core::params::mib(trainable, 2),
                    paper,
                    note,
                });
            }
        }
    }
    Ok(rows)
}

pub fn markdown(rows: &[ParamRow]) -> String {
    let mut out = String::from("| model | r | method | trainable | MiB (f32) | MiB (bf16) | paper (M / MB) | note |\n|---|---:|---|---:|---:|---:|---|---|\n");
    for r in rows {
        let paper = r.paper.map_or("-".into(), |(m, mb)| format!("{m} / {mb}"));
        let flag = r.note.as_ref().map_or(String::new(), |n| format!("**differs**: {n}"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {} | {} |\n",
            r.model, r.rank, r.method, r.trainable, r.mib_f32, r.mib_bf16, paper, flag
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The visitor counts equal the exact counts of derivations.md section 3.
    #[test]
    fn counted_parameters_equal_the_exact_counts() {
        let qv = [Target::Q, Target::V];
        let seven = LlamaConfig::llama2_7b();
        assert_eq!(count(&seven, AdapterKind::Lora, 8, &qv).unwrap(), 4_194_304);
        assert_eq!(count(&seven, AdapterKind::Blob, 8, &qv).unwrap(), 6_291_456);
        assert_eq!(count(&seven, AdapterKind::MeLora, 8, &qv).unwrap(), 4_202_496);
        let thirteen = LlamaConfig::llama2_13b();
        assert_eq!(count(&thirteen, AdapterKind::MeLora, 64, &qv).unwrap(), 53_084_160);
        assert_eq!(count(&thirteen, AdapterKind::Blob, 8, &qv).unwrap(), 9_830_400);
        // Llama-3.1-8B's grouped-query v_proj is 4096 -> 1024 (8 heads of 128).
        let llama3 = LlamaConfig::llama31_8b();
        assert_eq!(
            count(&llama3, AdapterKind::Lora, 8, &qv).unwrap(),
            32 * 8 * ((4096 + 4096) + (4096 + 1024))
        );
        // Qwen2.5-7B's: 3584 -> 512 (4 heads of 128).
        let qwen = LlamaConfig::qwen25_7b();
        assert_eq!(
            count(&qwen, AdapterKind::Lora, 8, &qv).unwrap(),
            28 * 8 * ((3584 + 3584) + (3584 + 512))
        );
        // SmolLM2's grouped-query v_proj is 576 -> 192.
        let smol = LlamaConfig::smollm2_135m();
        assert_eq!(
            count(&smol, AdapterKind::MeLora, 8, &qv).unwrap(),
            30 * (8 * (576 + 576) + 8 * (576 + 192) + 2 * 2 * 64)
        );
        let rows = table(&[8], &qv).unwrap();
        let flagged: Vec<_> = rows
            .iter()
            .filter(|r| r.note.is_some())
            .map(|r| (r.model.as_str(), r.method.as_str()))
            .collect();
        assert!(
            flagged.contains(&("llama2-13b", "Blob")),
            "the paper's 13B BLoB count must be flagged"
        );
    }
}
