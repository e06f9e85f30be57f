//! A model as a Hugging Face folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`): the format [`crate::weights::safetensors`] reads and
//! transformers' `AutoModelForCausalLM.from_pretrained` loads (the family's
//! class: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
//! `Qwen3ForCausalLM`). Weights are
//! written in f32 under Hugging Face names, linear weights `[out, in]`.

use crate::assets::write_atomic;
use crate::error::{LlamaError, Result};
use crate::model::{Family, Llama, LlamaConfig, Proj, RopeScaling};
use crate::tokenizer::Tokenizer;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use std::path::Path;

/// `config`'s Hugging Face `config.json`; a GGUF's per-frequency rope
/// factors have no Hugging Face spelling and are refused.
pub fn hf_config(config: &LlamaConfig, tokenizer: Option<&Tokenizer>) -> Result<serde_json::Value> {
    let family = config.family;
    let mut json = serde_json::json!({
        "architectures": [family.architecture()],
        "model_type": family.model_type(),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    // The biases as each family's class reads them (see `model::hf`): a
    // configuration that family cannot say is refused.
    let says = match family {
        Family::Llama | Family::Qwen3 => config.qkv_bias == config.o_bias,
        Family::Qwen2 => config.qkv_bias && !config.o_bias,
        Family::Mistral => !config.qkv_bias && !config.o_bias,
    } && config.qk_norm == (family == Family::Qwen3)
        && (config.sliding_window.is_none() || family == Family::Mistral);
    if !says {
        return Err(LlamaError::Mismatch(format!(
            "a {} config.json cannot say this model's features (q/k/v biases {}, output bias {}, head norms {}, sliding window {:?})",
            family.model_type(),
            config.qkv_bias,
            config.o_bias,
            config.qk_norm,
            config.sliding_window
        )));
    }
    match family {
        Family::Llama => {
            json["attention_bias"] = config.o_bias.into();
            json["mlp_bias"] = false.into();
        }
        Family::Qwen3 => json["attention_bias"] = config.o_bias.into(),
        Family::Qwen2 => json["use_sliding_window"] = false.into(),
        Family::Mistral => json["sliding_window"] = config.sliding_window.into(),
    }
    if family == Family::Qwen3 {
        json["use_sliding_window"] = false.into();
    }
    json["rope_scaling"] = match &config.rope_scaling {
        RopeScaling::None => serde_json::Value::Null,
        RopeScaling::Factors { .. } => {
            return Err(LlamaError::Mismatch(
                "the model's rope scaling is a GGUF's per-frequency factors (rope_freqs), which a Hugging Face config.json cannot say: export from the Hugging Face folder".into(),
            ))
        }
        RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    if let Some(t) = tokenizer {
        for (key, id) in [
            ("bos_token_id", t.bos),
            ("eos_token_id", t.eos),
            ("pad_token_id", t.pad),
        ] {
            if let Some(id) = id {
                json[key] = id.into();
            }
        }
    }
    Ok(json)
}

/// The model's weights by Hugging Face name, `(name, shape, values)`, in
/// the order of the model; an adapted projection is an error (merge first,
/// [`Llama::merged`]).
pub fn hf_tensors<B: Backend>(model: &Llama<B>) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
        let shape = t.dims().to_vec();
        (
            shape,
            t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 values"),
        )
    }
    let mut out = Vec::new();
    let mut push = |name: String, (shape, values): (Vec<usize>, Vec<f32>)| out.push((name, shape, values));
    push(
        "model.embed_tokens.weight".into(),
        values(model.embed_tokens.weight.val()),
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, proj) in layer.projections() {
            let Proj::Base(linear) = proj else {
                return Err(LlamaError::Mismatch(format!(
                    "{p}.{name} still has an adapter: merge it before exporting"
                )));
            };
            // Burn keeps `[in, out]`; Hugging Face `[out, in]`.
            push(format!("{p}.{name}.weight"), values(linear.weight.val().transpose()));
            if let Some(bias) = &linear.bias {
                push(format!("{p}.{name}.bias"), values(bias.val()));
            }
        }
        let attn = &layer.self_attn;
        for (name, norm) in [("q_norm", &attn.q_norm), ("k_norm", &attn.k_norm)] {
            if let Some(norm) = norm {
                push(format!("{p}.self_attn.{name}.weight"), values(norm.gamma.val()));
            }
        }
        push(
            format!("{p}.input_layernorm.weight"),
            values(layer.input_layernorm.gamma.val()),
        );
        push(
            format!("{p}.post_attention_layernorm.weight"),
            values(layer.post_attention_layernorm.gamma.val()),
        );
    }
    push("model.norm.weight".into(), values(model.norm.gamma.val()));
    if let Some(head) = &model.lm_head {
        push("lm_head.weight".into(), values(head.weight.val().transpose()));
    }
    Ok(out)
}

/// Writes `model` (no adapters left) to `dir` as a Hugging Face folder:
/// `config.json`, `model.safetensors` and, when there is a tokenizer,
/// `tokenizer.json`. Every file is written atomically.
pub fn save_hf<B: Backend>(
    model: &Llama<B>,
    config: &LlamaConfig,
    tokenizer: Option<&Tokenizer>,
    dir: &Path,
) -> Result<()> {
    if config.tie_word_embeddings != model.lm_head.is_none() {
        return Err(LlamaError::Mismatch(
            "the configuration's tie_word_embeddings disagrees with the model's output layer".into(),
        ));
    }
    let hf = hf_config(config, tokenizer)?;
    let tensors = hf_tensors(model)?;
    if let Some((name, _, _)) = tensors.iter().find(|(_, _, v)| v.iter().any(|x| !x.is_finite())) {
        return Err(LlamaError::Numerical(format!(
            "{name} has a NaN or an infinity: not exported"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| LlamaError::write(dir, e))?;
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map_err(|e| LlamaError::serialize(name, e))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let data =
        safetensors::serialize(views, Some(metadata)).map_err(|e| LlamaError::serialize("model.safetensors", e))?;
    write_atomic(&dir.join("model.safetensors"), &data)?;
    let text = serde_json::to_string_pretty(&hf).map_err(|e| LlamaError::serialize("config.json", e))?;
    write_atomic(&dir.join("config.json"), text.as_bytes())?;
    if let Some(t) = tokenizer {
        let tmp = dir.join("tokenizer.json.tmp");
        t.save(&tmp)?;
        std::fs::rename(&tmp, dir.join("tokenizer.json"))
            .map_err(|e| LlamaError::write(dir.join("tokenizer.json"), e))?;
    }
    Ok(())
}
