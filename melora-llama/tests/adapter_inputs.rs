//! Seeded corruption of adapter folders (PEFT's `adapter_config.json` and
//! `adapter_model.safetensors`): each corrupted folder must give an error
//! that names the file and the tensor or setting, or, where the corruption
//! does not change its meaning (keys melora does not read), load to exactly
//! what the intact folder loads to. Nothing may panic. Settings files, task
//! data and Laplace posteriors are `inputs.rs`'s; model weights
//! `corrupt.rs`'s.

mod common;

use burn::backend::NdArray;
use common::corrupt::{corruptions, leaves, set, Tally};
use common::fake_data::temp_dir;
use common::tiny_base;
use melora_core::{AdapterKind, NoiseSource};
use melora_llama::model::Target;
use melora_llama::train::TrainConfig;
use melora_llama::weights::peft::{load_adapter, save_adapter};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use std::path::Path;

type B = NdArray<f32>;

/// The tensors of a safetensors file, in order, as (name, shape, f32 values).
fn read_tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.shape().to_vec(),
                v.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// An adapter as loaded, saved again (tensor bytes and configuration),
/// for comparing two loads.
fn loaded(dir: &Path) -> Result<Vec<u8>, String> {
    let (model, meta) = load_adapter(tiny_base::<B>(), dir, &Default::default()).map_err(|e| e.to_string())?;
    let out = dir.with_extension("saved");
    save_adapter(&model, &meta.config, &out, "tiny").unwrap();
    let mut bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    bytes.extend(std::fs::read(out.join("adapter_config.json")).unwrap());
    std::fs::remove_dir_all(&out).ok();
    Ok(bytes)
}

#[test]
fn corrupt_adapter_folders_are_errors_naming_the_file_and_tensor() {
    let root = temp_dir("adapters");
    let mut tally = Tally::default();
    let mut rng = StdRng::seed_from_u64(5);
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let config = TrainConfig::new().with_method(kind.into()).with_rank(4).adapter();
        let model = tiny_base::<B>()
            .with_adapters(
                &config,
                &Target::parse_list("q_proj,v_proj").unwrap(),
                &mut NoiseSource::seeded(1),
            )
            .unwrap();
        let intact = root.join(format!("{kind:?}"));
        save_adapter(&model, &config, &intact, "tiny").unwrap();
        let original = loaded(&intact).unwrap();
        let case_dir = root.join(format!("{kind:?}-case"));
        let fresh = || {
            std::fs::remove_dir_all(&case_dir).ok();
            std::fs::create_dir_all(&case_dir).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(intact.join(f), case_dir.join(f)).unwrap();
            }
        };
        let check = |tally: &mut Tally, what: String, names: &[&str]| {
            tally.case(&format!("{kind:?}: {what}"), names, || {
                loaded(&case_dir).map(|v| v == original)
            });
        };
        let tensors = read_tensors(&intact.join("adapter_model.safetensors"));
        let st = case_dir.join("adapter_model.safetensors");
        for i in 0..tensors.len() {
            let name = tensors[i].0.clone();
            // Missing.
            fresh();
            let mut t = tensors.clone();
            t.remove(i);
            write_tensors(&st, &t);
            check(&mut tally, format!("{name} missing"), &[&name]);
            // A shape for another model (one more row; transposed).
            for shape in [
                vec![tensors[i].1[0] + 1, tensors[i].1[1]],
                vec![tensors[i].1[1], tensors[i].1[0]],
            ] {
                if shape == tensors[i].1 {
                    continue;
                }
                fresh();
                let mut t = tensors.clone();
                t[i].1 = shape.clone();
                t[i].2 = vec![0.01; shape.iter().product()];
                write_tensors(&st, &t);
                let (module, suffix) = name.split_once(".lora_").unwrap();
                check(
                    &mut tally,
                    format!("{name} of shape {shape:?}"),
                    &[
                        "adapter_model.safetensors",
                        module,
                        &format!("lora_{}", suffix.trim_end_matches(".weight")),
                    ],
                );
            }
            // NaN and infinities at a seeded entry.
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                fresh();
                let mut t = tensors.clone();
                let at = rng.random_range(0..t[i].2.len());
                t[i].2[at] = bad;
                write_tensors(&st, &t);
                check(
                    &mut tally,
                    format!("{name}[{at}] = {bad}"),
                    &["adapter_model.safetensors", &name],
                );
            }
        }
        // An extra tensor.
        fresh();
        let mut t = tensors.clone();
        t.push((
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
            vec![4, 64],
            vec![0.0; 256],
        ));
        write_tensors(&st, &t);
        check(
            &mut tally,
            "an extra tensor".into(),
            &["adapter_model.safetensors", "up_proj"],
        );
        // The file cut short, or bytes flipped, at seeded points.
        let bytes = std::fs::read(intact.join("adapter_model.safetensors")).unwrap();
        for _ in 0..30 {
            fresh();
            let cut = rng.random_range(0..bytes.len());
            std::fs::write(&st, &bytes[..cut]).unwrap();
            check(
                &mut tally,
                format!("safetensors cut at {cut}"),
                &["adapter_model.safetensors"],
            );
        }
        for _ in 0..30 {
            fresh();
            let mut b = bytes.clone();
            let header = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize + 8;
            let at = rng.random_range(0..header);
            b[at] ^= 1 << rng.random_range(0..8);
            std::fs::write(&st, &b).unwrap();
            check(
                &mut tally,
                format!("safetensors header bit flipped at {at}"),
                &["adapter_model.safetensors"],
            );
        }
        // adapter_config.json: missing; every leaf corrupted; another
        // method named; the melora section dropped (a plain PEFT LoRA).
        fresh();
        std::fs::remove_file(case_dir.join("adapter_config.json")).unwrap();
        check(
            &mut tally,
            "adapter_config.json missing".into(),
            &["adapter_config.json"],
        );
        fresh();
        std::fs::remove_file(&st).unwrap();
        check(
            &mut tally,
            "adapter_model.safetensors missing".into(),
            &["adapter_model.safetensors"],
        );
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(intact.join("adapter_config.json")).unwrap()).unwrap();
        let mut all = Vec::new();
        leaves(&json, String::new(), &mut all);
        for (key, value) in &all {
            for (what, bad) in corruptions(value) {
                fresh();
                let mut j = json.clone();
                set(&mut j, key, bad.clone());
                std::fs::write(case_dir.join("adapter_config.json"), j.to_string()).unwrap();
                check(
                    &mut tally,
                    format!("adapter_config.json: {key} = {bad} ({what})"),
                    &["adapter_config.json"],
                );
            }
        }
        for other in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora]
            .into_iter()
            .filter(|k| *k != kind)
        {
            fresh();
            let other_config = TrainConfig::new().with_method(other.into()).with_rank(4).adapter();
            let mut j = json.clone();
            j["melora"] = serde_json::to_value(&other_config).unwrap();
            std::fs::write(case_dir.join("adapter_config.json"), j.to_string()).unwrap();
            check(
                &mut tally,
                format!("adapter_config.json names {other:?}"),
                &["adapter_model.safetensors"],
            );
        }
        if kind != AdapterKind::Lora {
            fresh();
            let mut j = json.clone();
            j.as_object_mut().unwrap().remove("melora");
            std::fs::write(case_dir.join("adapter_config.json"), j.to_string()).unwrap();
            check(
                &mut tally,
                "adapter_config.json without its melora section".into(),
                &["adapter_model.safetensors"],
            );
        }
        let text = json.to_string();
        for _ in 0..10 {
            fresh();
            let cut = rng.random_range(0..text.len());
            std::fs::write(case_dir.join("adapter_config.json"), &text[..cut]).unwrap();
            check(
                &mut tally,
                format!("adapter_config.json cut at {cut}"),
                &["adapter_config.json"],
            );
        }
    }
    println!("{}", tally.report("adapter folders"));
    std::fs::remove_dir_all(&root).ok();
    tally.check("adapter folders");
}
