//! Older spellings of a run's settings, read as today's: run folders and
//! experiment files written before the settings had sections of their
//! own, and the short `--set` keys.

use melora_core::LowRankConfig;
use serde_json::{Map, Value};

/// Settings that moved into a section: the old top-level key, the section
/// and the key there.
pub(super) const MOVED: [(&str, &str, &str); 14] = [
    ("rank", "low_rank", "rank"),
    ("alpha", "low_rank", "alpha"),
    ("dropout", "low_rank", "dropout"),
    ("kl", "melora", "kl"),
    ("std_init", "melora", "std_init"),
    ("optimizer", "elbo", "optimizer"),
    ("weight_decay", "elbo", "weight_decay"),
    ("grad_clip", "elbo", "grad_clip"),
    ("adam_epsilon", "elbo", "epsilon"),
    ("eval_samples", "predict", "samples"),
    ("eval_batch_size", "predict", "batch_size"),
    ("members", "ensemble", "members"),
    ("member_seeds", "ensemble", "seeds"),
    ("ensemble_average", "ensemble", "average"),
];

/// A `key=value` override with an old key ([`MOVED`]) spelt as today's
/// (`rank=4` is `low_rank.rank=4`, `weight_decay=0.01` is
/// `elbo.weight_decay=0.01`).
pub(super) fn respell_override(item: &str) -> String {
    match item.split_once('=') {
        Some((key, value)) => match MOVED.iter().find(|(old, _, _)| *old == key) {
            Some((_, section, new)) => format!("{section}.{new}={value}"),
            None => item.to_string(),
        },
        None => item.to_string(),
    }
}

/// Older spellings of a training configuration's JSON read as today's:
/// `targets` as a comma-separated string becomes a list; the keys of
/// [`MOVED`] go into their sections (over what the file has there, the
/// rest of the section keeping its defaults); and the copy of `low_rank`
/// the adapter sections once held is dropped when it says what `low_rank`
/// (or the default) says, an error otherwise, since it was never the one
/// a run used.
pub(super) fn respell(json: &mut Value) -> Result<(), String> {
    let Some(map) = json.as_object_mut() else { return Ok(()) };
    if let Some(Value::String(list)) = map.get("targets") {
        let items = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_string()))
            .collect();
        map.insert("targets".into(), Value::Array(items));
    }
    for (old, section, new) in MOVED {
        let Some(value) = map.remove(old) else { continue };
        let slot = map
            .entry(section.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(section) = slot.as_object_mut() else {
            return Err(format!("{old} moved into {section:?}, which is not an object here"));
        };
        section.insert(new.to_string(), value);
    }
    let defaults = serde_json::to_value(LowRankConfig::new()).map_err(|e| e.to_string())?;
    let shared = map.get("low_rank").cloned();
    for name in ["blob", "melora"] {
        let Some(section) = map.get_mut(name).and_then(Value::as_object_mut) else {
            continue;
        };
        let Some(copy) = section.remove("low_rank") else {
            continue;
        };
        let agrees = |reference: &Value| match (reference.as_object(), copy.as_object()) {
            (Some(reference), Some(copy)) => copy.iter().all(|(k, v)| reference.get(k) == Some(v)),
            _ => false,
        };
        let same = agrees(&defaults)
            || shared
                .as_ref()
                .is_some_and(|shared| agrees(&overlaid(&defaults, shared)));
        if !same {
            return Err(format!(
                "{name}.low_rank is set: rank, alpha, rslora and dropout go in low_rank, which every adapter uses"
            ));
        }
    }
    Ok(())
}

/// `top`'s keys laid over `base`'s (one level).
fn overlaid(base: &Value, top: &Value) -> Value {
    let mut out = base.clone();
    if let (Some(out), Some(top)) = (out.as_object_mut(), top.as_object()) {
        for (k, v) in top {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}
