//! Helpers shared by the integration tests: the fixture folders, the tiny
//! model and random prompts for training tests, and a small reader for
//! NumPy `.npy` / `.npz` files.
#![allow(dead_code)]

pub mod corrupt;
pub mod fake_data;
pub mod gguf_writer;
pub mod parallel;
pub mod train;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

/// The tied tiny-llama fixture as a model of backend `B`.
pub fn tiny_base<B: burn::tensor::backend::Backend>() -> melora_llama::Llama<B> {
    use melora_llama::weights::{build, safetensors::SafetensorsSource};
    let dir = fixture("tied");
    let config = melora_llama::LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    build::<B, _>(
        &config,
        &mut SafetensorsSource::open(&dir).unwrap(),
        &Default::default(),
    )
    .unwrap()
    .0
}

/// `n` random prompts of 6 to 12 tokens; the label (of 2) is whether the
/// first token is odd.
pub fn parity_examples(n: usize, seed: u64) -> Vec<melora_llama::data::Encoded> {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(6..=12);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(3..256)).collect();
            melora_llama::data::Encoded::label_scored(ids.clone(), (ids[0] % 2) as usize, 2)
        })
        .collect()
}

/// Training progress that goes nowhere.
pub struct Quiet;
impl melora_llama::train::Progress for Quiet {
    fn step(&mut self, _: usize, _: usize, _: &str) {}
    fn line(&mut self, _: &str) {}
}

/// The tiny-llama fixtures written by transformers + PEFT (in melora-llama;
/// melora-cli's tests share this module).
pub fn fixture(which: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../melora-llama/tests/fixtures/tiny-llama")
        .join(which)
}

/// A NumPy array: shape and values (`f32` for f4 arrays, `f64` for f8
/// arrays, `i64` for i8 arrays).
#[derive(Debug, Clone)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub f64: Vec<f64>,
    pub i64: Vec<i64>,
}

pub fn parse_npy(bytes: &[u8]) -> Npy {
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not an npy file");
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{header}");
    let descr = header.split("'descr': '").nth(1).unwrap().split('\'').next().unwrap();
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_text.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data = &bytes[start + header_len..];
    let mut out = Npy {
        shape,
        f32: vec![],
        f64: vec![],
        i64: vec![],
    };
    match descr {
        "<f4" => {
            out.f32 = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }
        "<f8" => {
            out.f64 = data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }
        "<i8" => {
            out.i64 = data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }
        other => panic!("unsupported npy dtype {other}"),
    }
    out
}

pub fn read_npy(path: PathBuf) -> Npy {
    parse_npy(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Every array of an `.npz`, by name (without `.npy`).
pub fn read_npz(path: PathBuf) -> BTreeMap<String, Npy> {
    let file = std::fs::File::open(&path).unwrap();
    let mut archive = zip::ZipArchive::new(file).unwrap();
    let mut out = BTreeMap::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        out.insert(name, parse_npy(&bytes));
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// An answer-scored example from whole choice sequences: `shared` tokens
/// every choice starts with, then per choice its own context tokens and its
/// continuation (the scored tokens).
pub fn cloze_example(shared: &[u32], choices: &[(&[u32], &[u32])], label: usize) -> melora_llama::data::Encoded {
    use melora_llama::data::{split_shared_prefix, ChoiceSequence};
    let sequences: Vec<ChoiceSequence> = choices
        .iter()
        .map(|(context, continuation)| {
            let ids: Vec<u32> = shared
                .iter()
                .chain(context.iter())
                .chain(continuation.iter())
                .copied()
                .collect();
            ChoiceSequence {
                first_target: shared.len() + context.len(),
                chars: 3 * continuation.len() + 1,
                ids,
            }
        })
        .collect();
    split_shared_prefix(&sequences, label, 0, 300)
}

/// Varied answer-scored questions over the tiny vocabulary: shared
/// prefixes of different lengths (one empty), 2 to 4 choices of 1 to 5
/// tokens, WinoGrande-like choices with their own context tokens.
pub fn cloze_examples() -> Vec<melora_llama::data::Encoded> {
    vec![
        cloze_example(
            &[5, 9, 120, 44, 7],
            &[(&[], &[17]), (&[], &[42, 3]), (&[], &[99, 100, 101])],
            1,
        ),
        cloze_example(&[88, 2], &[(&[], &[60, 61, 62, 63, 64]), (&[], &[70])], 0),
        // WinoGrande: the options differ (context), the continuation is shared.
        cloze_example(&[30, 31, 32], &[(&[40], &[50, 51, 52]), (&[41, 45], &[50, 51, 52])], 1),
        // No common first token: an empty shared prefix.
        cloze_example(
            &[],
            &[
                (&[11, 12], &[13]),
                (&[14], &[15, 16]),
                (&[17, 18, 19], &[20]),
                (&[21], &[22]),
            ],
            3,
        ),
        // One long choice among short ones: the other rows are padded.
        cloze_example(&[7, 8], &[(&[], &[9]), (&[], &(60..105).collect::<Vec<u32>>())], 1),
    ]
}

/// The answer scores `[1, K]` of `e` from one full forward per choice of
/// its whole sequence (no shared prefix, no cache), summing the
/// log-probabilities of the scored tokens as lm-eval does; `norm` divides
/// each sum (per token or per character).
pub fn full_forward_scores<B: burn::tensor::backend::Backend>(
    model: &melora_llama::Llama<B>,
    e: &melora_llama::data::Encoded,
    norm: melora_llama::data::LengthNorm,
    sampler: &mut melora_core::Sampler,
) -> burn::tensor::Tensor<B, 2> {
    use burn::tensor::{activation::log_softmax, Int, Tensor, TensorData};
    use melora_llama::data::LengthNorm;
    let device = Default::default();
    let scores: Vec<Tensor<B, 1>> = e
        .continuations
        .iter()
        .map(|c| {
            let mut ids: Vec<i64> = e.ids.iter().chain(&c.input).map(|&t| t as i64).collect();
            ids.push(*c.targets.last().unwrap() as i64);
            let n = ids.len();
            let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device);
            let logits = model.forward(tokens, None, sampler);
            let vocab = logits.dims()[2];
            let start = e.ids.len() + c.unscored;
            // Every position's log-softmax, the scored ones picked by a gather.
            let logp = log_softmax(logits.reshape([n, vocab]), 1);
            let rows: Vec<i64> = (start..n - 1).map(|i| (i * vocab) as i64 + ids[i + 1]).collect();
            let picked = logp.reshape([n * vocab]).select(
                0,
                Tensor::<B, 1, Int>::from_data(TensorData::new(rows.clone(), [rows.len()]), &device),
            );
            let terms = vec![picked];
            let sum = Tensor::cat(terms, 0).sum();
            match norm {
                LengthNorm::None => sum,
                LengthNorm::PerToken => sum.div_scalar(c.scored() as f64),
                LengthNorm::PerChar => sum.div_scalar(c.chars as f64),
            }
        })
        .collect();
    let k = scores.len();
    Tensor::cat(scores, 0).reshape([1, k])
}

/// `n` random answer-scored questions: a prompt of 4 to 8 tokens, two or
/// three choices, each a marker token (200 + choice) and 1 to 3 random
/// tokens; the right choice is the first prompt token modulo the number of
/// choices.
pub fn answer_examples(n: usize, seed: u64) -> Vec<melora_llama::data::Encoded> {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(4..=8);
            let prompt: Vec<u32> = (0..len).map(|_| rng.random_range(3..200)).collect();
            let k = rng.random_range(2..=3);
            let choices: Vec<Vec<u32>> = (0..k)
                .map(|c| {
                    std::iter::once(200 + c as u32)
                        .chain((0..rng.random_range(1..=3)).map(|_| rng.random_range(3..200)))
                        .collect()
                })
                .collect();
            let refs: Vec<(&[u32], &[u32])> = choices.iter().map(|c| (&[][..], c.as_slice())).collect();
            cloze_example(&prompt, &refs, prompt[0] as usize % k)
        })
        .collect()
}

/// Every file a run folder holds but its log (which has step times),
/// relative to `dir`, sorted.
#[allow(dead_code)]
pub fn run_files(dir: &std::path::Path) -> Vec<PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.file_name().unwrap() != "log.txt" {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    let mut out: Vec<PathBuf> = out
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_path_buf())
        .collect();
    out.sort();
    out
}

/// The files of `run_files(a)` whose bytes differ in `b` (all of them
/// must exist in both).
#[allow(dead_code)]
pub fn differing_files(a: &std::path::Path, b: &std::path::Path) -> Vec<String> {
    let files = run_files(a);
    assert_eq!(
        files,
        run_files(b),
        "{} and {} hold different files",
        a.display(),
        b.display()
    );
    files
        .iter()
        .filter(|p| std::fs::read(a.join(p)).unwrap() != std::fs::read(b.join(p)).unwrap())
        .map(|p| p.display().to_string())
        .collect()
}

/// `config` with `method` and the settings its `--method` preset sets (MAP's
/// weight decay, MC dropout's samples), as the binary applies them.
#[allow(dead_code)]
pub fn with_method_preset(
    config: melora_llama::train::TrainConfig,
    method: melora_llama::train::Method,
) -> melora_llama::train::TrainConfig {
    method.preset(config)
}
