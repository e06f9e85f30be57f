//! Helpers shared by the integration tests: the fixture folders, the tiny
//! model and random prompts for training tests, and a small reader for
//! NumPy `.npy` / `.npz` files.
#![allow(dead_code)]

pub mod gguf_writer;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

/// The tied tiny-llama fixture as a model of backend `B`.
pub fn tiny_base<B: burn::tensor::backend::Backend>() -> melora_llama::Llama<B> {
    use melora_llama::weights::{build, safetensors::SafetensorsSource};
    let dir = fixture("tied");
    let config = melora_llama::LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    build::<B, _>(&config, &mut SafetensorsSource::open(&dir).unwrap(), &Default::default()).unwrap().0
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
            melora_llama::data::Encoded { label: (ids[0] % 2) as usize, ids, n_choices: 2 }
        })
        .collect()
}

/// Training progress that goes nowhere.
pub struct Quiet;
impl melora_llama::train::Progress for Quiet {
    fn step(&mut self, _: usize, _: usize, _: &str) {}
    fn line(&mut self, _: &str) {}
}

/// The tiny-llama fixtures written by transformers + PEFT.
pub fn fixture(which: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama").join(which)
}

/// A NumPy array: shape and values (as f64 for floats, i64 for ints).
#[derive(Debug, Clone)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
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
    let mut out = Npy { shape, f32: vec![], i64: vec![] };
    match descr {
        "<f4" => out.f32 = data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        "<i8" => out.i64 = data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
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
