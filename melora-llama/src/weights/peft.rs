//! Adapter files in PEFT's format: a folder with `adapter_config.json` and
//! `adapter_model.safetensors`.
//!
//! LoRA files are PEFT's own: keys
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
//! (`[r, in]`) and `...lora_B.weight` (`[out, r]`), and a config with `r`,
//! `lora_alpha`, `lora_dropout`, `use_rslora`, `target_modules`; PEFT loads
//! them. BLoB and Me-LoRA use the same layout plus, per module:
//!
//! | key suffix | adapter | tensor |
//! |---|---|---|
//! | `lora_A.weight` | BLoB | `M_A`, the mean of `A` |
//! | `lora_A_std.weight` | BLoB | `G_A`, the raw std parameter (`Omega_A = G_A^2` or softplus) |
//! | `lora_M.weight` | Me-LoRA | `M`, the mean of `C` (`[r, r]`) |
//! | `lora_H.weight` | Me-LoRA | `H`, the raw std parameter of `C` (`[r, r]`) |
//!
//! and the full melora adapter configuration under the config's `"melora"`
//! key (PEFT ignores it).
//!
//! An adapter on the output projection is `base_model.model.lm_head.*`, as
//! in PEFT; the copy of the output layer's base weight PEFT saves beside it
//! (`lm_head.base_layer.weight`) is read and checked against the model's,
//! and not written.

use crate::assets::write_atomic;
use crate::error::{LlamaError, Result};
use crate::model::Llama;
use crate::model::Target;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::WeightSource;
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};
use melora_core::{Adapter, AdapterConfig, LoraLinearConfig, LowRankConfig};
use serde_json::json;
use std::path::Path;

const PREFIX: &str = "base_model.model.";

/// What an adapter folder holds besides the tensors.
#[derive(Debug)]
pub struct AdapterMeta {
    /// The adapter configuration.
    pub config: AdapterConfig,
    /// The adapted projections.
    pub targets: Vec<Target>,
}

/// Reads `adapter_config.json` of `dir`.
pub fn read_config(dir: &Path) -> Result<AdapterMeta> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LlamaError::io(&path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| LlamaError::format(&path, e.to_string()))?;
    let bad = |m: &str| LlamaError::format(&path, m.to_string());
    if let Some(v) = json.get("peft_type").filter(|v| v.as_str() != Some("LORA")) {
        return Err(bad(&format!("peft_type {v} is not supported (only \"LORA\")")));
    }
    let flag = |key: &str| -> Result<bool> {
        match json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(false),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad(&format!("{key} {v} is not true or false"))),
        }
    };
    for unsupported in ["use_dora", "fan_in_fan_out"] {
        if flag(unsupported)? {
            return Err(bad(&format!("{unsupported} = true is not supported")));
        }
    }
    let rslora = flag("use_rslora")?;
    let dropout = match json.get("lora_dropout") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| bad(&format!("lora_dropout {v} is not a number")))?,
    };
    if let Some(v) = json.get("bias").filter(|v| v.as_str() != Some("none")) {
        return Err(bad(&format!(
            "bias {v} is not supported (only \"none\": melora trains no biases)"
        )));
    }
    let in_file = |e: LlamaError| match e {
        LlamaError::Config(m) => bad(&format!("target_modules: {m}")),
        other => other,
    };
    let targets = match json.get("target_modules") {
        Some(serde_json::Value::Array(items)) => {
            let names: Vec<&str> = items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad(&format!("target_modules holds {v}, not a module name")))
                })
                .collect::<Result<_>>()?;
            Target::parse_list(&names.join(",")).map_err(in_file)?
        }
        Some(serde_json::Value::String(s)) => Target::parse_list(s).map_err(in_file)?,
        _ => return Err(bad("target_modules missing")),
    };
    let config = match json.get("melora") {
        Some(melora) => {
            let config: AdapterConfig = crate::settings::strict(with_posterior_section(melora.clone()))
                .map_err(|e| LlamaError::format(&path, format!("\"melora\" section: {e}")))?;
            // PEFT reads the top-level fields; they must say what the section says.
            let low_rank = config.low_rank();
            for (key, ours) in [
                ("r", low_rank.rank as f64),
                ("lora_alpha", low_rank.alpha),
                ("lora_dropout", low_rank.dropout),
            ] {
                if let Some(v) = json.get(key).filter(|v| v.as_f64() != Some(ours)) {
                    return Err(bad(&format!(
                        "{key} = {v} disagrees with the \"melora\" section ({ours})"
                    )));
                }
            }
            if json.get("use_rslora").is_some() && rslora != low_rank.rslora {
                return Err(bad(&format!(
                    "use_rslora = {rslora} disagrees with the \"melora\" section ({})",
                    low_rank.rslora
                )));
            }
            config
        }
        None => {
            let number = |key: &str| -> Result<&serde_json::Value> {
                json.get(key)
                    .filter(|v| v.is_number())
                    .ok_or_else(|| bad(&format!("{key} missing or not a number")))
            };
            let rank = number("r")?
                .as_u64()
                .ok_or_else(|| bad("r must be a positive integer"))? as usize;
            let alpha = number("lora_alpha")?.as_f64().expect("a number");
            AdapterConfig::Lora(
                LoraLinearConfig::new().with_low_rank(
                    LowRankConfig::new()
                        .with_rank(rank)
                        .with_alpha(alpha)
                        .with_dropout(dropout)
                        .with_rslora(rslora),
                ),
            )
        }
    };
    config
        .validate()
        .map_err(|e| LlamaError::format(&path, e.to_string()))?;
    Ok(AdapterMeta { config, targets })
}

fn tensor<B: Backend>(source: &mut SafetensorsSource, name: &str, device: &B::Device) -> Result<Tensor<B, 2>> {
    let t = source.load(name)?.ok_or_else(|| LlamaError::Missing {
        name: name.into(),
        source_name: source.describe(),
    })?;
    if t.shape.len() != 2 {
        return Err(LlamaError::Shape {
            name: name.into(),
            expected: vec![0, 0],
            found: t.shape,
        });
    }
    let bad = t.values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(LlamaError::format(
            source.describe(),
            format!(
                "{name}: {bad} of its {} values are NaN or infinite (a diverged run or a corrupt file)",
                t.values.len()
            ),
        ));
    }
    Ok(Tensor::from_data(
        TensorData::new(t.values, [t.shape[0], t.shape[1]]),
        device,
    ))
}

/// Puts the adapter saved in `dir` on `model`. Every tensor of the file must
/// be used; shapes are checked (the error names the tensor).
pub fn load_adapter<B: Backend>(model: Llama<B>, dir: &Path, device: &B::Device) -> Result<(Llama<B>, AdapterMeta)> {
    let meta = read_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    if !file.is_file() {
        for pickle in ["adapter_model.bin", "adapter_model.pt"] {
            if dir.join(pickle).exists() {
                return Err(crate::weights::safetensors::pickle_refusal(&dir.join(pickle)));
            }
        }
        return Err(LlamaError::format(&file, "missing"));
    }
    let mut source = SafetensorsSource::single(&file)?;
    let mut used = Vec::new();
    let config = meta.config.clone();
    let model = model.map_projections(&meta.targets, |path, base| {
        let tensors = config
            .param_names()
            .iter()
            .map(|suffix| {
                let name = format!("{PREFIX}{path}.{suffix}.weight");
                used.push(name.clone());
                tensor::<B>(&mut source, &name, device)
            })
            .collect::<Result<Vec<_>>>()?;
        // Shapes the model has no place for: the file and the module.
        config
            .init_named(base, tensors)
            .map_err(|e| LlamaError::format(&file, format!("{PREFIX}{path}: {e}")))
    })?;
    // PEFT saves the output layer's base weight beside an lm_head adapter
    // (`save_embedding_layers`, for a vocabulary it may have resized); it
    // must be the model's own output layer.
    let head_base = format!("{PREFIX}lm_head.base_layer.weight");
    if model.head_adapter.is_some() && source.names().contains(&head_base) {
        let saved = tensor::<B>(&mut source, &head_base, device)?;
        let ours = model.output_layer().weight.val().transpose();
        if saved.dims() != ours.dims() {
            return Err(LlamaError::format(
                &file,
                format!(
                    "{head_base} is {:?}, the model's output layer {:?}: another base model",
                    saved.dims(),
                    ours.dims()
                ),
            ));
        }
        let gap: f32 = saved.sub(ours).abs().max().into_scalar().elem();
        if gap > 1e-5 {
            return Err(LlamaError::format(
                &file,
                format!("{head_base} differs from the model's output layer (by up to {gap:e}): another base model"),
            ));
        }
        used.push(head_base);
    }
    let unused: Vec<String> = source.names().into_iter().filter(|n| !used.contains(n)).collect();
    if !unused.is_empty() {
        return Err(LlamaError::format(
            &file,
            format!("tensors the model has no place for: {}", unused.join(", ")),
        ));
    }
    Ok((model, meta))
}

fn host<B: Backend>(t: Tensor<B, 2>) -> (Vec<usize>, Vec<u8>) {
    let dims = t.dims().to_vec();
    let values: Vec<f32> = t.into_data().convert::<f32>().to_vec().expect("f32");
    (dims, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// A `"melora"` section as written before BLoB's and Me-LoRA's own
/// settings had a section of their own (`{"Blob": {"low_rank": ..,
/// "init_eps": .., "std_param": ..}}`), spelt as today's (those settings
/// under `"posterior"`); today's sections pass unchanged.
fn with_posterior_section(mut section: serde_json::Value) -> serde_json::Value {
    for kind in ["Blob", "MeLora"] {
        let Some(config) = section.get_mut(kind).and_then(|c| c.as_object_mut()) else {
            continue;
        };
        let own: Vec<String> = config
            .keys()
            .filter(|k| *k != "low_rank" && *k != "posterior")
            .cloned()
            .collect();
        if own.is_empty() {
            continue;
        }
        let mut posterior = serde_json::Map::new();
        for key in own {
            posterior.insert(key.clone(), config.remove(&key).expect("listed above"));
        }
        config.insert("posterior".into(), serde_json::Value::Object(posterior));
    }
    section
}

/// Saves the model's adapters in `dir` (created if needed; files written
/// atomically). `base_model` is recorded as `base_model_name_or_path`.
pub fn save_adapter<B: Backend>(model: &Llama<B>, config: &AdapterConfig, dir: &Path, base_model: &str) -> Result<()> {
    let adapters = model.adapters();
    if adapters.is_empty() {
        return Err(LlamaError::Mismatch("the model has no adapter to save".into()));
    }
    let mut targets: Vec<&str> = Vec::new();
    let mut tensors: Vec<(String, (Vec<usize>, Vec<u8>))> = Vec::new();
    for (path, adapter) in &adapters {
        let module = path.rsplit('.').next().unwrap_or("");
        if !targets.contains(&module) {
            targets.push(module);
        }
        for p in adapter.named_params() {
            tensors.push((format!("{PREFIX}{path}.{}.weight", p.name), host(p.param.val())));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|e| LlamaError::serialize(name, e))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::serialize(views, None).map_err(|e| LlamaError::serialize("adapter_model.safetensors", e))?;
    write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
    let low_rank = match config {
        AdapterConfig::Lora(c) => &c.low_rank,
        AdapterConfig::Blob(c) => &c.low_rank,
        AdapterConfig::MeLora(c) => &c.low_rank,
    };
    let mut json = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": low_rank.rank,
        "lora_alpha": low_rank.alpha,
        "lora_dropout": low_rank.dropout,
        "use_rslora": low_rank.rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
    });
    if !matches!(config, AdapterConfig::Lora(_)) {
        json["melora"] =
            serde_json::to_value(config).map_err(|e| LlamaError::serialize("the adapter configuration", e))?;
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| LlamaError::serialize("adapter_config.json", e))?;
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}
