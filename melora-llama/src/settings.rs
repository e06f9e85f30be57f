//! Settings files (training, Laplace): JSON laid over the defaults key by
//! key, then `key=value` overrides; every error names the file and the
//! setting (`serde_path_to_error` gives the path of a bad value inside the
//! JSON, for example `prior.std`).

use crate::error::LlamaError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// Reads the settings in `path` (the defaults when there is none), fills
/// in settings the file leaves out from `defaults` (for example ones added
/// after it was written), refuses keys the defaults lack (a misspelt
/// setting is not ignored) and applies `overrides` (`key=value`, dotted
/// keys reach nested settings; values are JSON, or strings). `what` names
/// the kind of settings in messages.
pub fn load<T: Serialize + DeserializeOwned>(path: Option<&Path>, overrides: &[String], defaults: T, what: &str) -> crate::Result<T> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
            parse(&text, path, overrides, defaults, what)
        }
        None => {
            let json = serde_json::to_value(defaults).map_err(|e| LlamaError::Config(e.to_string()))?;
            let json = apply_overrides(json, overrides).map_err(|m| LlamaError::Config(format!("{what}: {m}")))?;
            serde_path_to_error::deserialize(json).map_err(|e| LlamaError::Config(format!("{what}: setting {:?}: {}", e.path().to_string(), e.inner())))
        }
    }
}

/// [`load`] of the settings `text` read from `path` (named in errors).
pub fn parse<T: Serialize + DeserializeOwned>(text: &str, path: &Path, overrides: &[String], defaults: T, what: &str) -> crate::Result<T> {
    let fail = |message: String| LlamaError::format(path, message);
    let defaults = serde_json::to_value(defaults).map_err(|e| LlamaError::Config(e.to_string()))?;
    let json = serde_json::from_str::<Value>(text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
    let json = with_defaults(defaults, json, what).map_err(fail)?;
    let json = apply_overrides(json, overrides).map_err(fail)?;
    serde_path_to_error::deserialize(json).map_err(|e| fail(format!("{what}: setting {:?}: {}", e.path().to_string(), e.inner())))
}

/// `json` laid over `defaults`, key by key.
fn with_defaults(mut defaults: Value, json: Value, what: &str) -> Result<Value, String> {
    let (Some(base), Value::Object(file)) = (defaults.as_object_mut(), json) else {
        return Err(format!("{what} must be a JSON object"));
    };
    for (key, value) in file {
        if !base.contains_key(&key) {
            return Err(format!("{what}: unknown setting {key:?} (known: {})", base.keys().cloned().collect::<Vec<_>>().join(", ")));
        }
        base.insert(key, value);
    }
    Ok(defaults)
}

/// Applies `key=value` overrides to `json`.
pub fn apply_overrides(mut json: Value, overrides: &[String]) -> Result<Value, String> {
    for item in overrides {
        let (key, value) = item.split_once('=').ok_or_else(|| format!("override {item:?} is not key=value"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        let mut slot = &mut json;
        for part in key.split('.') {
            let object = slot.as_object_mut().ok_or_else(|| format!("override {key}: {part} is not inside an object"))?;
            let known = object.keys().cloned().collect::<Vec<_>>().join(", ");
            slot = object.get_mut(part).ok_or_else(|| format!("override {key}: unknown setting {part:?} (known: {known})"))?;
        }
        *slot = value;
    }
    Ok(json)
}
