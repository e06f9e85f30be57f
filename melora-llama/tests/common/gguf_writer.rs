//! A minimal GGUF v3 writer for tests: metadata, tensors in F32, F16, BF16,
//! Q8_0, Q4_0 or Q4_1, and llama.cpp's Q/K permutation.
#![allow(dead_code)]

use super::fixture;
use melora_llama::model::Family;
use melora_llama::weights::safetensors::SafetensorsSource;
use melora_llama::weights::WeightSource;
use melora_llama::LlamaConfig;

pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    Bool(bool),
}

#[derive(Clone, Copy, Debug)]
pub enum Quant {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Quant {
    fn id(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q4_0 => 2,
            Quant::Q4_1 => 3,
            Quant::Q8_0 => 8,
            Quant::Bf16 => 30,
        }
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Encodes values (a multiple of 32 for the block types).
pub fn encode(values: &[f32], q: Quant) -> Vec<u8> {
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let mut out = Vec::new();
    match q {
        Quant::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        Quant::F16 => values.iter().for_each(|v| out.extend(f16(*v))),
        Quant::Bf16 => values
            .iter()
            .for_each(|v| out.extend(half::bf16::from_f32(*v).to_le_bytes())),
        Quant::Q8_0 => {
            for block in values.chunks(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                out.extend(f16(d));
                let d = half::f16::from_f32(d).to_f32();
                out.extend(block.iter().map(|v| {
                    if d == 0.0 {
                        0u8
                    } else {
                        (v / d).round().clamp(-127.0, 127.0) as i8 as u8
                    }
                }));
            }
        }
        Quant::Q4_0 => {
            for block in values.chunks(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 7.0;
                out.extend(f16(d));
                let d = half::f16::from_f32(d).to_f32();
                let q: Vec<u8> = block
                    .iter()
                    .map(|v| {
                        if d == 0.0 {
                            8
                        } else {
                            ((v / d).round() + 8.0).clamp(0.0, 15.0) as u8
                        }
                    })
                    .collect();
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            }
        }
        Quant::Q4_1 => {
            for block in values.chunks(32) {
                let min = block.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = block.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                out.extend(f16(d));
                out.extend(f16(min));
                let (d, m) = (half::f16::from_f32(d).to_f32(), half::f16::from_f32(min).to_f32());
                let q: Vec<u8> = block
                    .iter()
                    .map(|v| {
                        if d == 0.0 {
                            0
                        } else {
                            ((v - m) / d).round().clamp(0.0, 15.0) as u8
                        }
                    })
                    .collect();
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            }
        }
    }
    out
}

/// llama.cpp's permutation of Q/K rows, `[heads * head_dim, cols]`.
pub fn permute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let head_dim = values.len() / cols / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let src = (h * head_dim + s * half + j) * cols;
                let dst = (h * head_dim + 2 * j + s) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}

/// A GGUF file: `tensors` are (name, PyTorch shape `[out, in]`, values, type).
pub fn write<K: AsRef<str>>(meta: &[(K, Meta)], tensors: &[(String, Vec<usize>, Vec<f32>, Quant)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        string(&mut out, key.as_ref());
        match value {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(*v as u8);
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Meta::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|s| string(&mut out, s));
            }
            Meta::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|v| out.extend(v.to_le_bytes()));
            }
        }
    }
    let mut data = Vec::new();
    for (name, shape, values, q) in tensors {
        string(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        shape.iter().rev().for_each(|d| out.extend((*d as u64).to_le_bytes()));
        out.extend(q.id().to_le_bytes());
        out.extend((data.len() as u64).to_le_bytes());
        data.extend(encode(values, *q));
        while data.len() % 32 != 0 {
            data.push(0);
        }
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    out.extend(data);
    out
}

/// The GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let module = match module {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        other => panic!("unexpected {other}"),
    };
    format!("blk.{layer}.{module}")
}

/// The fixture as GGUF bytes; `quant` picks each matrix's type.
pub fn fixture_as_gguf(which: &str, quant: impl Fn(&str) -> Quant) -> Vec<u8> {
    folder_as_gguf(&fixture(which), quant, Vec::new())
}

/// A Hugging Face folder as GGUF bytes, with `extra` tensors (GGUF names)
/// after the model's, written as llama.cpp's converter writes its family:
/// architecture `llama` (Llama and Mistral, `conversion/llama.py`: Q/K rows
/// and biases permuted) or `qwen2` / `qwen3` (`conversion/qwen.py`: not
/// permuted; the head width as `attention.key_length`).
pub fn folder_as_gguf(
    dir: &std::path::Path,
    quant: impl Fn(&str) -> Quant,
    extra: Vec<(String, Vec<usize>, Vec<f32>, Quant)>,
) -> Vec<u8> {
    let config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let arch = match config.family {
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
    };
    let mut source = SafetensorsSource::open(dir).unwrap();
    let mut tensors = Vec::new();
    for name in source.names() {
        let t = source.load(&name).unwrap().unwrap();
        let mut values = t.values;
        let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
        if arch == "llama" && name.contains("q_proj.") {
            values = permute_rows(&values, config.num_attention_heads, cols);
        } else if arch == "llama" && name.contains("k_proj.") {
            values = permute_rows(&values, config.num_key_value_heads, cols);
        }
        let q = if t.shape.len() == 1 { Quant::F32 } else { quant(&name) };
        tensors.push((gguf_name(&name), t.shape, values, q));
    }
    tensors.extend(extra);
    let key = |k: &str| format!("{arch}.{k}");
    let meta = vec![
        ("general.architecture".to_string(), Meta::Str(arch.into())),
        ("general.alignment".to_string(), Meta::U32(32)),
        (key("block_count"), Meta::U32(config.num_hidden_layers as u32)),
        (key("embedding_length"), Meta::U32(config.hidden_size as u32)),
        (key("feed_forward_length"), Meta::U32(config.intermediate_size as u32)),
        (
            key("attention.head_count"),
            Meta::U32(config.num_attention_heads as u32),
        ),
        (
            key("attention.head_count_kv"),
            Meta::U32(config.num_key_value_heads as u32),
        ),
        (key("attention.key_length"), Meta::U32(config.head_dim as u32)),
        (key("rope.freq_base"), Meta::F32(config.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Meta::F32(config.rms_norm_eps as f32),
        ),
        (key("context_length"), Meta::U32(config.max_position_embeddings as u32)),
        (key("vocab_size"), Meta::U32(config.vocab_size as u32)),
        ("tokenizer.ggml.model".to_string(), Meta::Str("gpt2".into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            Meta::Strs(vec!["a".into(), "b".into(), "ab".into()]),
        ),
        ("tokenizer.ggml.merges".to_string(), Meta::Strs(vec!["a b".into()])),
        ("tokenizer.ggml.token_type".to_string(), Meta::I32s(vec![1, 1, 1])),
        ("tokenizer.ggml.add_bos_token".to_string(), Meta::Bool(false)),
    ];
    write(&meta, &tensors)
}
