//! Settings files (training, Laplace): JSON laid over the defaults key by
//! key, then `key=value` overrides; every error names the file and the
//! setting (`serde_path_to_error` gives the path of a bad value inside the
//! JSON, for example `prior.std`), and a key no setting has, at any depth,
//! is an error (`serde_ignored` reports what serde would skip).

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
            let json = serde_json::to_value(defaults).map_err(|e| LlamaError::serialize("the default settings", e))?;
            let json = apply_overrides(json, overrides).map_err(|m| LlamaError::Config(format!("{what}: {m}")))?;
            strict(json).map_err(|m| LlamaError::Config(format!("{what}: {m}")))
        }
    }
}

/// [`load`] of the settings `text` read from `path` (named in errors).
pub fn parse<T: Serialize + DeserializeOwned>(text: &str, path: &Path, overrides: &[String], defaults: T, what: &str) -> crate::Result<T> {
    let fail = |message: String| LlamaError::format(path, message);
    let defaults = serde_json::to_value(defaults).map_err(|e| LlamaError::serialize("the default settings", e))?;
    let json = serde_json::from_str::<Value>(text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
    let json = with_defaults(defaults, json, what).map_err(fail)?;
    let json = apply_overrides(json, overrides).map_err(fail)?;
    strict(json).map_err(|m| fail(format!("{what}: {m}")))
}

/// `json` as a `T`: a value of the wrong kind is an error naming its
/// setting (`setting "prior.std": invalid type ...`), and so is a key that
/// `T` has no setting for, at any depth.
pub fn strict<T: DeserializeOwned>(json: Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let value: T = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(json, &mut note))
        .map_err(|e| format!("setting {:?}: {}", e.path().to_string(), e.inner()))?;
    if !unknown.is_empty() {
        return Err(format!("unknown setting {}", unknown.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ")));
    }
    Ok(value)
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
