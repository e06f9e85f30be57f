//! Seeded corruption of every input a user hands melora besides the model
//! weights (those are `corrupt.rs`'s) and adapter folders
//! (`adapter_inputs.rs`'s): run and Laplace settings files, task data
//! files, Laplace posterior folders. Each
//! corrupted input must give an error that names the file and what is
//! wrong, or, where the corruption does not change its meaning (PEFT keys
//! melora does not read, an integer where a float is expected), load to
//! exactly what the intact input loads to. Nothing may panic, nothing may
//! be accepted with a changed meaning. The counts are printed per kind
//! (`--nocapture`).

mod common;

use common::corrupt::{corruptions, leaves, set, Tally};
use common::fake_data::{arc_doc, fake_olmo_data, requests, temp_dir, write_gz};
use melora_core::ElboConfig;
use melora_llama::data::{load_task, Task};
use melora_llama::eval::EnsembleConfig;
use melora_llama::laplace::{Block, Factor, LaplaceConfig, LaplaceDir, LaplaceMeta};
use melora_llama::settings::Loader;
use melora_llama::train::{Method, TrainConfig};
use nalgebra::DMatrix;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Settings whose value is any text (a model preset, folder or file, read
/// when the model is opened, where a wrong one is an error naming it).
const FREE_TEXT: [&str; 1] = ["model"];

/// Settings files: every leaf of the intact file corrupted in every way,
/// an unknown key at every level, and the file cut at seeded points.
fn settings_cases<T>(
    tally: &mut Tally,
    dir: &Path,
    name: &str,
    intact: &Value,
    load: impl Fn(&Path) -> Result<T, String>,
) where
    T: PartialEq + std::fmt::Debug,
{
    let path = dir.join(name);
    std::fs::write(&path, intact.to_string()).unwrap();
    let original = load(&path).expect("the intact settings load");
    let mut all = Vec::new();
    leaves(intact, String::new(), &mut all);
    let file = path.file_name().unwrap().to_str().unwrap().to_string();
    for (key, value) in all.iter().filter(|(k, _)| !FREE_TEXT.contains(&k.as_str())) {
        for (what, bad) in corruptions(value) {
            let mut json = intact.clone();
            set(&mut json, key, bad.clone());
            std::fs::write(&path, json.to_string()).unwrap();
            if bad.is_null() && load(&path).is_ok() {
                // An optional setting: null means none, a valid setting.
                continue;
            }
            let leaf = key.rsplit('.').next().unwrap();
            tally.case(&format!("{file}: {key} = {bad} ({what})"), &[&file, leaf], || {
                load(&path).map(|c| c == original)
            });
        }
    }
    // Unknown keys, at the top and inside every object.
    let mut objects = vec![String::new()];
    for (key, _) in &all {
        let mut prefix = String::new();
        for part in key.split('.').collect::<Vec<_>>().split_last().unwrap().1 {
            prefix = if prefix.is_empty() {
                part.to_string()
            } else {
                format!("{prefix}.{part}")
            };
            if !objects.contains(&prefix) {
                objects.push(prefix.clone());
            }
        }
    }
    for object in objects {
        let mut json = intact.clone();
        let mut slot = &mut json;
        for part in object.split('.').filter(|p| !p.is_empty()) {
            slot = slot.get_mut(part).unwrap();
        }
        // An enum's object (one key: the variant) with a second key is
        // named by its setting.
        let enum_like = slot.as_object().unwrap().len() == 1
            && slot
                .as_object()
                .unwrap()
                .keys()
                .all(|k| k.starts_with(char::is_uppercase));
        slot.as_object_mut().unwrap().insert("typo_setting".into(), json!(1));
        std::fs::write(&path, json.to_string()).unwrap();
        let name = if enum_like {
            object.rsplit('.').next().unwrap()
        } else {
            "typo_setting"
        };
        tally.case(&format!("{file}: unknown key in {object:?}"), &[&file, name], || {
            load(&path).map(|c| c == original)
        });
    }
    // Not a number JSON can hold.
    for (key, _) in all.iter().filter(|(_, v)| v.is_number()) {
        let mut json = intact.clone();
        set(&mut json, key, json!("@@"));
        for bad in ["NaN", "Infinity", "1e999"] {
            std::fs::write(&path, json.to_string().replace("\"@@\"", bad)).unwrap();
            tally.case(
                &format!("{file}: {key} = {bad}"),
                &[&file, if bad == "1e999" { "column" } else { "JSON" }],
                || load(&path).map(|c| c == original),
            );
        }
    }
    // Cut short.
    let text = intact.to_string();
    let mut rng = StdRng::seed_from_u64(name.len() as u64);
    for _ in 0..20 {
        let cut = rng.random_range(0..text.len());
        std::fs::write(&path, &text[..cut]).unwrap();
        tally.case(&format!("{file}: cut at byte {cut}"), &[&file], || {
            load(&path).map(|c| c == original)
        });
    }
    std::fs::write(&path, intact.to_string()).unwrap();
}

#[test]
fn corrupt_settings_files_are_errors_naming_the_file_and_setting() {
    let dir = temp_dir("settings");
    let mut tally = Tally::default();
    for config in [
        TrainConfig::new(),
        TrainConfig::new()
            .with_method(Method::Ens)
            .with_ensemble(EnsembleConfig::new().with_members(2).with_seeds(Some(vec![4, 5])))
            .with_elbo(ElboConfig::new().with_grad_clip(Some(1.0))),
    ] {
        let intact = serde_json::to_value(&config).unwrap();
        settings_cases(&mut tally, &dir, "config.json", &intact, |p| {
            Loader::<TrainConfig>::file(Some(p))
                .load()
                .map(|c| serde_json::to_value(c).unwrap())
                .map_err(|e| e.to_string())
        });
    }
    // Four of the experiment files as shipped (a seeded choice), resolved
    // over their bases (a copy elsewhere has no base beside it).
    let mut shipped: Vec<PathBuf> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments/smollm2-135m"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != "laplace.json" && p.extension().is_some_and(|e| e == "json"))
            .collect();
    shipped.sort();
    let mut rng = StdRng::seed_from_u64(16);
    for _ in 0..4 {
        let path = shipped.swap_remove(rng.random_range(0..shipped.len()));
        let intact = serde_json::to_value(Loader::<TrainConfig>::file(Some(&path)).load().unwrap()).unwrap();
        settings_cases(&mut tally, &dir, "shipped.json", &intact, |p| {
            Loader::<TrainConfig>::file(Some(p))
                .load()
                .map(|c| serde_json::to_value(c).unwrap())
                .map_err(|e| e.to_string())
        });
    }
    let laplace = serde_json::to_value(LaplaceConfig::new()).unwrap();
    settings_cases(&mut tally, &dir, "laplace.json", &laplace, |p| {
        Loader::<LaplaceConfig>::file(Some(p))
            .load()
            .map(|c| serde_json::to_value(c).unwrap())
            .map_err(|e| e.to_string())
    });
    println!(
        "| input | tried | rejected with a message | accepted, meaning unchanged | panics |\n|---|---:|---:|---:|---:|"
    );
    println!("{}", tally.report("settings files (run, Laplace)"));
    std::fs::remove_dir_all(&dir).ok();
    tally.check("settings");
}

#[test]
fn corrupt_task_data_is_an_error_naming_the_file() {
    let mut tally = Tally::default();
    let mut rng = StdRng::seed_from_u64(6);
    let root = fake_olmo_data("inputs");
    let file = root.join("oe_eval_tasks/arc_easy/train_rc_5shot/requests.jsonl.gz");
    let intact_gz = std::fs::read(&file).unwrap();
    let original = format!("{:?}", load_task(Task::ArcE, &root).unwrap());
    let load = || {
        load_task(Task::ArcE, &root)
            .map(|d| format!("{d:?}") == original)
            .map_err(|e| e.to_string())
    };
    let docs: Vec<Value> = (0..30).map(|i| arc_doc(i, if i == 0 { 3 } else { 4 })).collect();
    let lines = requests(&docs, 4);
    // The gzip stream cut short or with a flipped bit.
    for _ in 0..25 {
        let cut = rng.random_range(0..intact_gz.len());
        std::fs::write(&file, &intact_gz[..cut]).unwrap();
        tally.case(
            &format!("gzip cut at {cut}"),
            &["train_rc_5shot/requests.jsonl.gz"],
            load,
        );
    }
    for _ in 0..25 {
        let mut b = intact_gz.clone();
        let at = rng.random_range(10..b.len());
        b[at] ^= 1 << rng.random_range(0..8);
        std::fs::write(&file, &b).unwrap();
        tally.case(
            &format!("gzip bit flipped at {at}"),
            &["train_rc_5shot/requests.jsonl.gz"],
            load,
        );
    }
    // A JSON line cut, or a character replaced, at a seeded place.
    for _ in 0..25 {
        let mut l = lines.clone();
        let i = rng.random_range(0..l.len());
        let cut = rng.random_range(1..l[i].len() - 1);
        l[i].truncate(cut);
        write_gz(&file, &l);
        tally.case(
            &format!("line {} cut at {cut}", i + 1),
            &["train_rc_5shot/requests.jsonl.gz", &format!("line {}", i + 1)],
            load,
        );
    }
    // Every field of a doc and of a request missing or of the wrong type;
    // a gold answer outside the choices.
    for field in ["id", "query", "choices", "gold"] {
        for bad in [None, Some(json!({"x": 1})), Some(json!(null))] {
            let mut d = docs.clone();
            match &bad {
                None => {
                    d[7].as_object_mut().unwrap().remove(field);
                }
                Some(v) => d[7][field] = v.clone(),
            }
            write_gz(&file, &requests(&d, 4));
            tally.case(
                &format!(
                    "doc field {field} {}",
                    bad.map_or("missing".into(), |v| format!("= {v}"))
                ),
                &["train_rc_5shot/requests.jsonl.gz", field],
                load,
            );
        }
    }
    for gold in [json!(4), json!(-1), json!("B")] {
        let mut d = docs.clone();
        d[3]["gold"] = gold.clone();
        write_gz(&file, &requests(&d, 4));
        tally.case(
            &format!("gold = {gold}"),
            &["train_rc_5shot/requests.jsonl.gz", "gold"],
            load,
        );
    }
    for field in ["doc", "doc_id"] {
        let mut l: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        l[5].as_object_mut().unwrap().remove(field);
        write_gz(&file, &l.iter().map(|v| v.to_string()).collect::<Vec<_>>());
        tally.case(
            &format!("request field {field} missing"),
            &["train_rc_5shot/requests.jsonl.gz", field],
            load,
        );
    }
    // An empty split, and a missing file.
    write_gz(&file, &[]);
    tally.case("an empty split", &["train_rc_5shot/requests.jsonl.gz", "empty"], load);
    std::fs::remove_file(&file).unwrap();
    tally.case("a missing file", &["train_rc_5shot/requests.jsonl.gz"], load);
    std::fs::write(&file, &intact_gz).unwrap();
    // MMLU's Arrow files cut short.
    let arrow = root.join("hf_datasets/hails/mmlu_no_train/college_physics/test/data-00000-of-00001.arrow");
    let intact_arrow = std::fs::read(&arrow).unwrap();
    let physics = format!("{:?}", load_task(Task::MmluPhys, &root).unwrap());
    for _ in 0..20 {
        let cut = rng.random_range(0..intact_arrow.len());
        std::fs::write(&arrow, &intact_arrow[..cut]).unwrap();
        tally.case(&format!("arrow cut at {cut}"), &["college_physics/test"], || {
            load_task(Task::MmluPhys, &root)
                .map(|d| format!("{d:?}") == physics)
                .map_err(|e| e.to_string())
        });
    }
    println!("{}", tally.report("task data files"));
    std::fs::remove_dir_all(root.parent().unwrap()).ok();
    tally.check("task data");
}

#[test]
fn corrupt_laplace_folders_are_errors_naming_the_file() {
    let root = temp_dir("laplace");
    let mut tally = Tally::default();
    let mut rng = StdRng::seed_from_u64(7);
    let factor = |dim: usize, k: usize, seed: usize| Factor {
        vectors: DMatrix::from_fn(dim, k, |r, c| ((r * 7 + c * 3 + seed) % 5) as f64 / 5.0 - 0.4),
        values: (0..k).map(|i| 1.0 / (i + 1) as f64).collect(),
    };
    let blocks: Vec<Block> = (0..2)
        .flat_map(|l| {
            [
                Block {
                    name: format!("model.layers.{l}.self_attn.q_proj.lora_A"),
                    output: factor(4, 3, l),
                    input: factor(6, 3, l + 1),
                },
                Block {
                    name: format!("model.layers.{l}.self_attn.q_proj.lora_B"),
                    output: factor(5, 2, l + 2),
                    input: factor(4, 2, l + 3),
                },
            ]
        })
        .collect();
    let meta = LaplaceMeta {
        run: root.join("run"),
        config: LaplaceConfig::new(),
        prior_precision: 0.5,
        n_train: 100,
        curvature_examples: 50,
        curvature_tokens: 900,
        train_nll: 12.5,
        search: vec![(0.1, -3.0), (0.5, -2.0)],
        seconds: (1.0, 2.0),
    };
    let intact = LaplaceDir {
        dir: root.join("intact"),
    };
    intact.save(&meta, &blocks).unwrap();
    let case = LaplaceDir { dir: root.join("case") };
    let describe = |(m, b): (LaplaceMeta, Vec<Block>)| format!("{:?} {:?}", serde_json::to_string(&m).unwrap(), b);
    let original = describe(intact.load().unwrap());
    let fresh = || {
        std::fs::remove_dir_all(&case.dir).ok();
        std::fs::create_dir_all(&case.dir).unwrap();
        for f in ["laplace.json", "factors.safetensors"] {
            std::fs::copy(intact.dir.join(f), case.dir.join(f)).unwrap();
        }
    };
    let load = || case.load().map(|l| describe(l) == original).map_err(|e| e.to_string());
    // laplace.json: every leaf corrupted, cut short, missing.
    let json: Value = serde_json::from_str(&std::fs::read_to_string(intact.meta()).unwrap()).unwrap();
    let mut all = Vec::new();
    leaves(&json, String::new(), &mut all);
    // `run` is the path of the MAP run it came from, any text (the folder
    // holds its own copy of the adapter).
    for (key, value) in all.iter().filter(|(k, _)| k != "run") {
        for (what, bad) in corruptions(value) {
            fresh();
            let mut j = json.clone();
            set(&mut j, key, bad.clone());
            std::fs::write(case.meta(), j.to_string()).unwrap();
            if bad.is_null() && load().is_ok() {
                continue;
            }
            tally.case(
                &format!("laplace.json: {key} = {bad} ({what})"),
                &["laplace.json"],
                load,
            );
        }
    }
    let text = json.to_string();
    for _ in 0..15 {
        fresh();
        let cut = rng.random_range(0..text.len());
        std::fs::write(case.meta(), &text[..cut]).unwrap();
        tally.case(&format!("laplace.json cut at {cut}"), &["laplace.json"], load);
    }
    for file in ["laplace.json", "factors.safetensors"] {
        fresh();
        std::fs::remove_file(case.dir.join(file)).unwrap();
        tally.case(&format!("{file} missing"), &[file], load);
    }
    // factors.safetensors: cut short, header bits flipped, NaN / Inf /
    // negative eigenvalues, a missing tensor.
    let bytes = std::fs::read(intact.factors()).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
    for _ in 0..25 {
        fresh();
        let cut = rng.random_range(0..bytes.len());
        std::fs::write(case.factors(), &bytes[..cut]).unwrap();
        tally.case(&format!("factors cut at {cut}"), &["factors.safetensors"], load);
    }
    for _ in 0..25 {
        fresh();
        let mut b = bytes.clone();
        let at = rng.random_range(0..header);
        b[at] ^= 1 << rng.random_range(0..8);
        std::fs::write(case.factors(), &b).unwrap();
        tally.case(
            &format!("factors header bit flipped at {at}"),
            &["factors.safetensors"],
            load,
        );
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header_meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let names: Vec<String> = {
        let mut n: Vec<String> = st.names().into_iter().map(String::from).collect();
        n.sort();
        n
    };
    let rewrite = |edit: &dyn Fn(&str, &mut Vec<f64>, &mut Vec<usize>) -> bool| {
        let mut buffers: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
        for name in &names {
            let view = st.tensor(name).unwrap();
            let mut values: Vec<f64> = view
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let mut shape = view.shape().to_vec();
            if edit(name, &mut values, &mut shape) {
                buffers.insert(
                    name.clone(),
                    (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
                );
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = buffers
            .iter()
            .map(|(n, (s, b))| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F64, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(
            case.factors(),
            safetensors::serialize(views, header_meta.metadata().clone()).unwrap(),
        )
        .unwrap();
    };
    for name in names.iter().step_by(3) {
        fresh();
        rewrite(&|n, _, _| n != name);
        tally.case(&format!("{name} missing"), &["factors.safetensors", name], load);
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            if bad == -1.0 && !name.ends_with("values") {
                continue;
            }
            fresh();
            rewrite(&|n, v, _| {
                if n == name {
                    v[0] = bad;
                }
                true
            });
            tally.case(
                &format!("{name}[0] = {bad}"),
                &["factors.safetensors", name.rsplit_once('.').unwrap().0],
                load,
            );
        }
        if name.ends_with("vectors") {
            fresh();
            rewrite(&|n, v, s| {
                if n == name {
                    s[1] += 1;
                    v.extend(std::iter::repeat_n(0.0, s[0]));
                }
                true
            });
            tally.case(
                &format!("{name} with one more column"),
                &["factors.safetensors", name.rsplit_once('.').unwrap().0],
                load,
            );
        }
    }
    println!("{}", tally.report("Laplace posterior folders"));
    std::fs::remove_dir_all(&root).ok();
    tally.check("Laplace folders");
}
