//! GGUF: the tiny transformers fixture written as GGUF (llama.cpp naming and
//! Q/K permutation) gives transformers' logits; dequantisation of each type
//! against known values and, block format by block format, against the
//! `gguf` Python package's dequantisers; unsupported types are clear errors.

mod common;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use common::gguf_writer::{encode, fixture_as_gguf, write, Meta, Quant};
use common::{fixture, max_abs_diff, read_npy};
use melora_core::{NoiseSource, Sampler, SamplingMode};
use melora_llama::gguf::{GgmlType, Gguf};
use melora_llama::weights::build;
use melora_llama::weights::gguf::GgufSource;
use melora_llama::LlamaConfig;

type B = NdArray<f32>;

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("melora-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn logits_of(source: &mut GgufSource, config: &LlamaConfig, ids: &[i64], shape: [usize; 2]) -> Vec<f32> {
    let (model, report) = build::<B, _>(config, source, &Default::default()).unwrap();
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), shape), &Default::default());
    let mut noise = NoiseSource::seeded(0);
    model
        .forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise))
        .into_data()
        .to_vec()
        .unwrap()
}

#[test]
fn gguf_of_the_fixture_matches_transformers() {
    for which in ["tied", "untied"] {
        let path = temp_file(&format!("{which}.gguf"), &fixture_as_gguf(which, |_| Quant::F32));
        let mut source = GgufSource::open(&path).unwrap();
        let config = source.config().unwrap();
        let hf = LlamaConfig::from_hf_json(&fixture(which).join("config.json")).unwrap();
        assert_eq!(config.tie_word_embeddings, hf.tie_word_embeddings);
        assert_eq!(
            (config.num_hidden_layers, config.head_dim, config.rope_theta),
            (hf.num_hidden_layers, hf.head_dim, hf.rope_theta)
        );
        let ids = read_npy(fixture(which).join("input_ids.npy"));
        let expected = read_npy(fixture(which).join("logits.npy"));
        let logits = logits_of(&mut source, &config, &ids.i64, [ids.shape[0], ids.shape[1]]);
        let diff = max_abs_diff(&logits, &expected.f32);
        println!("{which} via GGUF: max |logit diff| {diff:.2e}");
        assert!(diff < 1e-4, "{which}: GGUF logits differ by {diff}");
        std::fs::remove_file(&path).ok();
    }
}

#[test]
fn quantised_gguf_stays_close_to_the_f32_model() {
    let ids = read_npy(fixture("untied").join("input_ids.npy"));
    let expected = read_npy(fixture("untied").join("logits.npy"));
    let bytes = fixture_as_gguf("untied", |name| match name {
        n if n.contains("embed") => Quant::Q8_0,
        n if n.contains("q_proj") || n.contains("up_proj") => Quant::Q4_1,
        n if n.contains("k_proj") || n.contains("down_proj") => Quant::Q4_0,
        n if n.contains("lm_head") => Quant::F16,
        _ => Quant::Bf16,
    });
    let path = temp_file("quant.gguf", &bytes);
    let mut source = GgufSource::open(&path).unwrap();
    let config = source.config().unwrap();
    let logits = logits_of(&mut source, &config, &ids.i64, [ids.shape[0], ids.shape[1]]);
    let diff = max_abs_diff(&logits, &expected.f32);
    let scale = expected.f32.iter().fold(0f32, |m, v| m.max(v.abs()));
    println!("mixed-quantisation logits: max diff {diff:.3} (max |logit| {scale:.2})");
    assert!(diff < 0.25 * scale, "quantised model too far off: {diff}");
    assert!(diff > 1e-5, "quantisation should change the logits a little");
    std::fs::remove_file(&path).ok();
}

#[test]
fn dequantisation_of_known_blocks() {
    let meta = vec![("general.architecture", Meta::Str("llama".into()))];
    let tensors = vec![("t".to_string(), vec![32], vec![0f32; 32], Quant::F32)];
    let template = write(&meta, &tensors);
    let gguf = Gguf::parse(&template).unwrap();
    let start = gguf.data_start;
    let dequant = |type_id: u32, block: &[u8]| {
        let mut bytes = template[..start].to_vec();
        bytes.extend(block);
        let mut info = gguf.tensors[0].clone();
        info.type_id = type_id;
        gguf.dequantize(&info, &bytes).unwrap()
    };
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    // Q8_0: d = 0.5, q_i = i - 16.
    let mut block = f16(0.5).to_vec();
    block.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let values = dequant(8, &block);
    assert_eq!(values, (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect::<Vec<_>>());
    // Q4_0: d = 2, byte j = low nibble j % 16 (element j), high nibble 15 - j (element j + 16).
    let mut block = f16(2.0).to_vec();
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let values = dequant(2, &block);
    let expected: Vec<f32> = (0..16)
        .map(|j| 2.0 * (j as f32 - 8.0))
        .chain((0..16).map(|j| 2.0 * (7.0 - j as f32)))
        .collect();
    assert_eq!(values, expected);
    // Q4_1: d = 0.25, m = -1.
    let mut block = f16(0.25).to_vec();
    block.extend(f16(-1.0));
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let values = dequant(3, &block);
    let expected: Vec<f32> = (0..16)
        .map(|j| 0.25 * j as f32 - 1.0)
        .chain((0..16).map(|j| 0.25 * (15 - j) as f32 - 1.0))
        .collect();
    assert_eq!(values, expected);
    // F16 and BF16.
    let values = dequant(1, &encode(&[1.5; 32], Quant::F16));
    assert_eq!(values, vec![1.5; 32]);
    let values = dequant(30, &encode(&[-2.0; 32], Quant::Bf16));
    assert_eq!(values, vec![-2.0; 32]);
    // IQ2_XXS (id 16) is not supported: a clear error naming the tensor,
    // the type and what is.
    let mut info = gguf.tensors[0].clone();
    info.type_id = 16;
    let err = gguf.dequantize(&info, &template).unwrap_err();
    assert_eq!(
        err,
        melora_llama::gguf::GgufError::Type {
            tensor: "t".into(),
            type_id: 16
        }
    );
    let message = err.to_string();
    assert!(
        message.contains("tensor t: GGML type IQ2_XXS (id 16) is not supported") && message.contains("Q6_K"),
        "{message}"
    );
}

/// Every block format against the `gguf` Python package's reference
/// dequantisers, on random blocks (`fixtures/ggml-quants/make.py`): the
/// same values to the bit.
#[test]
fn block_formats_match_the_reference_dequantisers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml-quants");
    let mut checked = Vec::new();
    for ty in GgmlType::ALL.into_iter().filter(|t| t.block().0 > 1) {
        let blocks = std::fs::read(dir.join(format!("{}.blocks", ty.name()))).unwrap();
        let expected: Vec<f32> = std::fs::read(dir.join(format!("{}.f32", ty.name())))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (per_block, size) = ty.block();
        assert_eq!(blocks.len() % size, 0, "{}", ty.name());
        assert_eq!(expected.len(), blocks.len() / size * per_block, "{}", ty.name());
        let mut values = Vec::new();
        ty.dequantize(&blocks, &mut values);
        for (i, (v, e)) in values.iter().zip(&expected).enumerate() {
            assert_eq!(
                v.to_bits(),
                e.to_bits(),
                "{} value {i} (block {}): {v} against {e}",
                ty.name(),
                i / per_block
            );
        }
        checked.push(format!("{} x {} blocks", ty.name(), blocks.len() / size));
    }
    println!("checked against gguf-py: {}", checked.join(", "));
    assert_eq!(checked.len(), 8);
}

/// A GGUF of another architecture, or with rope scaling, is refused
/// naming the file and the key; `none` scaling is a plain Llama.
#[test]
fn other_architectures_and_rope_scaling_are_refused() {
    let tensors = vec![("t".to_string(), vec![32], vec![0f32; 32], Quant::F32)];
    let config_of = |name: &str, meta: Vec<(&str, Meta)>| {
        let path = temp_file(name, &write(&meta, &tensors));
        let result = GgufSource::open(&path)
            .and_then(|s| s.config())
            .map_err(|e| e.to_string());
        std::fs::remove_file(&path).ok();
        (path, result)
    };
    let (path, result) = config_of(
        "gemma3.gguf",
        vec![("general.architecture", Meta::Str("gemma3".into()))],
    );
    let err = result.unwrap_err();
    assert!(
        err.contains(&path.display().to_string())
            && err.contains(
                "general.architecture is \"gemma3\", which is not supported (supported: llama, qwen2, qwen3)"
            ),
        "{err}"
    );
    let llama = || ("general.architecture", Meta::Str("llama".into()));
    let (_, result) = config_of(
        "linear.gguf",
        vec![llama(), ("llama.rope.scaling.type", Meta::Str("linear".into()))],
    );
    let err = result.unwrap_err();
    assert!(err.contains("llama.rope.scaling.type is \"linear\""), "{err}");
    // `none` passes the check (and the file then lacks its sizes).
    let (_, result) = config_of(
        "none.gguf",
        vec![llama(), ("llama.rope.scaling.type", Meta::Str("none".into()))],
    );
    let err = result.unwrap_err();
    assert!(err.contains("attention.head_count missing"), "{err}");
}

/// A GGUF tokenizer whose `tokenizer.ggml.pre` is `qwen2` splits and
/// normalises as Qwen2's `tokenizer.json` does: the ids of
/// `fixtures/qwen2-tokenizer/cases.json` (written by the `tokenizers`
/// package with transformers' `Qwen2Tokenizer` pre-tokenizer, its
/// `make.py`); with SmolLM2's pre-tokenizer instead some ids differ (the
/// control), and a pre-tokenizer melora does not know is refused.
#[test]
fn the_qwen2_pre_tokenizer_gives_the_reference_ids() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2-tokenizer");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let strings = |key: &str| -> Vec<String> {
        cases[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let tokens = strings("tokens");
    let tokenizer_with = |pre: &str| {
        let meta = vec![
            ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Meta::Str(pre.into())),
            ("tokenizer.ggml.tokens", Meta::Strs(tokens.clone())),
            ("tokenizer.ggml.merges", Meta::Strs(strings("merges"))),
        ];
        let path = temp_file(&format!("tokenizer-{pre}.gguf"), &write(&meta, &[]));
        let gguf = Gguf::parse(&std::fs::read(&path).unwrap()).unwrap();
        let result = melora_llama::tokenizer::Tokenizer::from_gguf(&gguf, &path).map_err(|e| e.to_string());
        std::fs::remove_file(&path).ok();
        result
    };
    let qwen2 = tokenizer_with("qwen2").unwrap();
    let smollm = tokenizer_with("smollm").unwrap();
    let mut differ = 0;
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(qwen2.encode_plain(text).unwrap(), expected, "{text:?}");
        differ += usize::from(smollm.encode_plain(text).unwrap() != expected);
    }
    println!(
        "qwen2 pre-tokenizer: {} cases equal; SmolLM2's gives other ids in {differ}",
        cases["cases"].as_array().unwrap().len()
    );
    assert!(differ > 0, "the control: SmolLM2's pre-tokenizer gives the same ids");
    let err = tokenizer_with("llama-bpe").err().unwrap();
    assert!(
        err.contains("tokenizer.ggml.pre = \"llama-bpe\": that pre-tokenizer is not supported"),
        "{err}"
    );
}
