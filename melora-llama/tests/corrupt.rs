//! Corrupt and truncated weight files give errors, never panics: thousands
//! of seeded cases that truncate real files or flip their bytes, for GGUF
//! (the fixture written as GGUF with every supported type, and SmolLM2's
//! real file when fetched) and safetensors (the fixture's model file).

mod common;

use common::fixture;
use common::gguf_writer::{fixture_as_gguf, Quant};
use melora_llama::assets::Assets;
use melora_llama::gguf::Gguf;
use melora_llama::weights::gguf::GgufSource;
use melora_llama::weights::safetensors::{decode, SafetensorsFile, SafetensorsSource};
use melora_llama::weights::WeightSource;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Parses and, if that succeeds, dequantises every tensor: must not panic.
fn exercise_gguf(bytes: &[u8]) -> bool {
    match Gguf::parse(bytes) {
        Ok(gguf) => {
            for info in &gguf.tensors {
                let _ = gguf.dequantize(info, bytes);
            }
            true
        }
        Err(error) => {
            assert!(!error.to_string().is_empty());
            false
        }
    }
}

/// A corrupted copy: truncated at a random point, or 1 to 8 random bytes
/// flipped (half of the time within the first `hot` bytes: the header).
fn corrupt(bytes: &[u8], rng: &mut StdRng, hot: usize) -> Vec<u8> {
    if rng.random::<f64>() < 0.4 {
        let cut = rng.random_range(0..bytes.len());
        return bytes[..cut].to_vec();
    }
    let mut out = bytes.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let limit = if rng.random::<bool>() {
            hot.min(out.len())
        } else {
            out.len()
        };
        let at = rng.random_range(0..limit);
        out[at] ^= 1 << rng.random_range(0..8);
    }
    out
}

#[test]
fn corrupt_gguf_files_give_errors_not_panics() {
    let mixed = fixture_as_gguf("untied", |name| match name {
        n if n.contains("embed") => Quant::Q8_0,
        n if n.contains("q_proj") => Quant::Q4_1,
        n if n.contains("k_proj") => Quant::Q4_0,
        n if n.contains("v_proj") => Quant::F16,
        n if n.contains("o_proj") => Quant::Bf16,
        _ => Quant::F32,
    });
    let header = Gguf::parse(&mixed).unwrap().data_start;
    let mut rng = StdRng::seed_from_u64(1);
    let (mut ok, mut errors) = (0, 0);
    for _ in 0..3000 {
        if exercise_gguf(&corrupt(&mixed, &mut rng, header)) {
            ok += 1;
        } else {
            errors += 1;
        }
    }
    println!("GGUF fixture: {errors} corrupt cases rejected, {ok} parsed (data bytes flipped)");
    assert!(errors > 1000, "most corruptions should be detected, got {errors}");
    // Every truncation inside the header or the data is an error.
    for cut in (0..mixed.len()).step_by(97) {
        assert!(
            Gguf::parse(&mixed[..cut]).is_err(),
            "truncation at {cut} of {} accepted",
            mixed.len()
        );
    }
    // Through a file, the error names the file.
    let path = std::env::temp_dir().join(format!("melora-{}-truncated.gguf", std::process::id()));
    std::fs::write(&path, &mixed[..mixed.len() / 2]).unwrap();
    let err = GgufSource::open(&path).err().unwrap().to_string();
    assert!(err.contains("truncated.gguf") && err.contains("truncated"), "{err}");
    std::fs::remove_file(&path).ok();
}

#[test]
#[ignore = "needs the fetched model and data: run `melora fetch`, then `cargo test --workspace -- --ignored`"]
fn corrupt_real_smollm2_gguf_gives_errors_not_panics() {
    let path = Assets::from_env().smollm2_gguf();
    assert!(path.is_file(), "{} is absent: run `melora fetch` first", path.display());
    let bytes = std::fs::read(&path).unwrap();
    let header = Gguf::parse(&bytes).unwrap().data_start;
    let mut rng = StdRng::seed_from_u64(2);
    // Truncations anywhere (slices: no copy of the 98 MB file).
    for _ in 0..1000 {
        let cut = rng.random_range(0..bytes.len());
        assert!(Gguf::parse(&bytes[..cut]).is_err(), "truncation at {cut} accepted");
    }
    // Bit flips in the header (metadata, tokenizer, tensor table).
    let prefix = &bytes[..header];
    let mut rejected = 0;
    for _ in 0..1000 {
        let mut copy = prefix.to_vec();
        for _ in 0..rng.random_range(1..=4) {
            let at = rng.random_range(0..copy.len());
            copy[at] ^= 1 << rng.random_range(0..8);
        }
        copy.extend_from_slice(&bytes[header..header + 64]);
        if Gguf::parse(&copy).is_err() {
            rejected += 1;
        }
    }
    println!("SmolLM2 GGUF: 1000 truncations rejected, {rejected} of 1000 header corruptions rejected");
}

#[test]
fn corrupt_safetensors_files_give_errors_not_panics() {
    let original = std::fs::read(fixture("tied/model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let mut rng = StdRng::seed_from_u64(3);
    let mut errors = 0;
    for _ in 0..3000 {
        let bytes = corrupt(&original, &mut rng, header);
        match SafetensorsFile::parse_bytes(&bytes) {
            Ok(tensors) => {
                for (_, shape) in tensors {
                    assert!(shape.iter().product::<usize>() < 1 << 32);
                }
            }
            Err(_) => errors += 1,
        }
    }
    println!("safetensors fixture: {errors} of 3000 corruptions rejected");
    assert!(errors > 1000);
    // Loading through the folder API names the file.
    let dir = std::env::temp_dir().join(format!("melora-{}-bad-st", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), &original[..original.len() - 10]).unwrap();
    let err = SafetensorsSource::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
    // A pickle checkpoint is refused with advice.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not really a pickle").unwrap();
    let err = SafetensorsSource::open(&dir).err().unwrap().to_string();
    assert!(err.contains("refused") && err.contains("safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    // Unsupported dtypes are named.
    assert!(decode(safetensors::Dtype::I64, &[0; 8]).is_none());
    let mut source = SafetensorsSource::open(&fixture("tied")).unwrap();
    assert!(source.load("no.such.tensor").unwrap().is_none());
}
