//! Older spellings of a run's settings, read as today's: run folders
//! written before the adapters had sections of their own, and the short
//! `--set` keys.

use melora_core::{LowRankConfig, MeLoraLinearConfig};
use serde_json::Value;

/// Settings that moved into the adapters' own configurations: the old
/// top-level key and the section that holds it now.
const MOVED: [(&str, &str); 5] = [
    ("rank", "low_rank"),
    ("alpha", "low_rank"),
    ("dropout", "low_rank"),
    ("kl", "melora"),
    ("std_init", "melora"),
];

/// A `key=value` override with an old key ([`MOVED`]) spelt as today's
/// (`rank=4` is `low_rank.rank=4`).
pub(super) fn alias(item: &str) -> String {
    match item.split_once('=') {
        Some((key, value)) => match MOVED.iter().find(|(old, _)| *old == key) {
            Some((old, section)) => format!("{section}.{old}={value}"),
            None => item.to_string(),
        },
        None => item.to_string(),
    }
}

/// Older spellings of a training configuration's JSON read as today's:
/// `targets` as a comma-separated string becomes a list, and the keys of
/// [`MOVED`] go into their sections (laid over the section's defaults, or
/// over what the file already has there).
pub(super) fn legacy(json: &mut Value) {
    let Some(map) = json.as_object_mut() else { return };
    if let Some(Value::String(list)) = map.get("targets") {
        let items = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_string()))
            .collect();
        map.insert("targets".into(), Value::Array(items));
    }
    for (old, section) in MOVED {
        let Some(value) = map.remove(old) else { continue };
        let defaults = match section {
            "low_rank" => serde_json::to_value(LowRankConfig::new()),
            _ => serde_json::to_value(MeLoraLinearConfig::new()),
        };
        let slot = map
            .entry(section.to_string())
            .or_insert_with(|| defaults.unwrap_or(Value::Null));
        if let Some(section) = slot.as_object_mut() {
            section.insert(old.to_string(), value);
        }
    }
}
