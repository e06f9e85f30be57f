//! Settings files (training, Laplace): JSON laid over the defaults key by
//! key, then `key=value` overrides; every error names the file and the
//! setting (`serde_path_to_error` gives the path of a bad value inside the
//! JSON, for example `prior.std`), and a key no setting has, at any depth,
//! is an error (`serde_ignored` reports what serde would skip).
//!
//! A file may name a base, nanoGPT-style: `"base": "base.json"` (a path
//! relative to the file) lays the file's keys over that file's settings
//! (itself resolved the same way), so an experiment is a few lines saying
//! what it changes:
//!
//! ```json
//! { "base": "base.json", "task": "arc-e", "method": "MeLora", "prior": { "noise": true } }
//! ```
//!
//! A nested object whose keys all exist in the base's object changes just
//! those keys (`prior.noise` above); any other value replaces the base's
//! (so `"kl_schedule": {"Linear": {...}}` replaces a `Constant` schedule).

use crate::error::LlamaError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// A kind of settings a file holds (a run's, Laplace's): its defaults, the
/// older spellings it still reads and its checks. [`Loader`] reads them.
pub trait Settings: Serialize + DeserializeOwned {
    /// What the settings are called in messages.
    const WHAT: &'static str;

    /// The values of the settings a file leaves out.
    fn defaults() -> Self;

    /// Rewrites older spellings in `json` as today's; applied to a file's
    /// JSON (after its bases) and again after the overrides. An older
    /// spelling that cannot be read as today's is an error.
    fn respell(_json: &mut Value) -> Result<(), String> {
        Ok(())
    }

    /// A `key=value` override with an older key spelt as today's.
    fn respell_override(item: &str) -> String {
        item.to_string()
    }

    /// Checks that every setting is in its range.
    fn validate(&self) -> crate::Result<()> {
        Ok(())
    }
}

/// Where settings are read from.
enum Source<'a> {
    /// None: the defaults.
    Defaults,
    /// A file.
    File(&'a Path),
    /// The text of a file at `path` (named in errors; its bases are read
    /// beside it).
    Text { text: &'a str, path: &'a Path },
}

/// The one way settings are read: a file (over its bases, or the
/// defaults when there is none), laid over the defaults key by key, older
/// spellings respelt, then `edit` (a program's typed flags), then the
/// `key=value` overrides (which win), then the checks. Errors name the file
/// and the setting.
///
/// ```no_run
/// # fn main() -> melora_llama::Result<()> {
/// use melora_llama::settings::Loader;
/// use melora_llama::train::{Method, TrainConfig};
///
/// let config: TrainConfig = Loader::file(Some("experiments/smollm2-135m/arc-e-melora.json".as_ref()))
///     .edit(|c| Method::Blob.preset(c))
///     .overrides(&["prior.std=0.1".into()])
///     .load()?;
/// # Ok(()) }
/// ```
pub struct Loader<'a, T> {
    source: Source<'a>,
    edit: Option<Box<dyn FnOnce(T) -> T + 'a>>,
    overrides: &'a [String],
}

impl<'a, T: Settings> Loader<'a, T> {
    /// The settings in `path`, or the defaults when there is none.
    pub fn file(path: Option<&'a Path>) -> Self {
        let source = path.map_or(Source::Defaults, Source::File);
        Self {
            source,
            edit: None,
            overrides: &[],
        }
    }

    /// The settings in `text`, a file read from `path` (named in errors;
    /// bases are read beside it).
    pub fn text(text: &'a str, path: &'a Path) -> Self {
        Self {
            source: Source::Text { text, path },
            edit: None,
            overrides: &[],
        }
    }

    /// Applies `edit` to the file's settings, before the overrides.
    pub fn edit(mut self, edit: impl FnOnce(T) -> T + 'a) -> Self {
        self.edit = Some(Box::new(edit));
        self
    }

    /// `key=value` overrides, applied last: dotted keys reach nested
    /// settings, values are JSON (or else strings).
    pub fn overrides(mut self, overrides: &'a [String]) -> Self {
        self.overrides = overrides;
        self
    }

    /// Reads, edits, overrides and checks the settings.
    pub fn load(self) -> crate::Result<T> {
        let what = T::WHAT;
        let (path, text) = match self.source {
            Source::Defaults => (None, None),
            Source::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
                (Some(path), Some(text))
            }
            Source::Text { text, path } => (Some(path), Some(text.to_string())),
        };
        let fail = |message: String| match path {
            Some(path) => LlamaError::format(path, message),
            None => LlamaError::Config(message),
        };
        let defaults =
            serde_json::to_value(T::defaults()).map_err(|e| LlamaError::serialize("the default settings", e))?;
        let file: T = match (path, text) {
            (Some(path), Some(text)) => {
                let json = serde_json::from_str::<Value>(&text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
                let mut json = with_bases(path, json, 0).map_err(fail)?;
                T::respell(&mut json).map_err(|m| fail(format!("{what}: {m}")))?;
                let json = with_defaults(defaults, json, what).map_err(fail)?;
                strict(json).map_err(|m| fail(format!("{what}: {m}")))?
            }
            _ => strict(defaults).map_err(|m| fail(format!("{what}: {m}")))?,
        };
        let edited = match self.edit {
            Some(edit) => edit(file),
            None => file,
        };
        let json = serde_json::to_value(edited).map_err(|e| LlamaError::serialize("the settings", e))?;
        let overrides: Vec<String> = self.overrides.iter().map(|o| T::respell_override(o)).collect();
        let mut json = apply_overrides(json, &overrides).map_err(|m| fail(format!("{what}: {m}")))?;
        T::respell(&mut json).map_err(|m| fail(format!("{what}: {m}")))?;
        let settings: T = strict(json).map_err(|m| fail(format!("{what}: {m}")))?;
        settings.validate().map_err(|e| match (path, e) {
            (Some(path), e) => LlamaError::format(path, e.to_string()),
            (None, e) => e,
        })?;
        Ok(settings)
    }
}

/// `json` as a `T`: a value of the wrong kind is an error naming its
/// setting (`setting "prior.std": invalid type ...`), and so is a key that
/// `T` has no setting for, at any depth.
pub(crate) fn strict<T: DeserializeOwned>(json: Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let value: T = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(json, &mut note))
        .map_err(|e| format!("setting {:?}: {}", e.path().to_string(), e.inner()))?;
    if !unknown.is_empty() {
        return Err(format!(
            "unknown setting {}",
            unknown.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(value)
}

/// The key that names a settings file's base.
pub const BASE: &str = "base";

/// Bases deeper than this are refused (a cycle).
const MAX_BASES: usize = 8;

/// `json`, read from `path`, laid over its base (if it names one), the
/// base resolved first.
fn with_bases(path: &Path, json: Value, depth: usize) -> Result<Value, String> {
    let Value::Object(mut file) = json else { return Ok(json) };
    let Some(base) = file.remove(BASE) else {
        return Ok(Value::Object(file));
    };
    let Value::String(name) = base else {
        return Err(format!("{BASE:?} must name a settings file, found {base}"));
    };
    if depth >= MAX_BASES {
        return Err(format!(
            "more than {MAX_BASES} nested bases (does a base name itself?) at {name:?}"
        ));
    }
    let base_path = path.parent().unwrap_or(Path::new("")).join(&name);
    let text = std::fs::read_to_string(&base_path)
        .map_err(|e| format!("cannot read its base {}: {e}", base_path.display()))?;
    let base = serde_json::from_str::<Value>(&text)
        .map_err(|e| format!("its base {}: not valid JSON: {e}", base_path.display()))?;
    if !base.is_object() {
        return Err(format!("its base {} is not a JSON object", base_path.display()));
    }
    let Value::Object(mut merged) = with_bases(&base_path, base, depth + 1)? else {
        unreachable!("an object stays an object")
    };
    // Every key of the file, new ones included, is laid over the base.
    for (key, value) in file {
        let value = match merged.remove(&key) {
            Some(base) => overlay(base, value),
            None => value,
        };
        merged.insert(key, value);
    }
    Ok(Value::Object(merged))
}

/// A nested value `top` laid over `base`: an object whose keys all exist
/// in `base`'s object changes those keys (recursively); anything else
/// replaces.
fn overlay(base: Value, top: Value) -> Value {
    match (base, top) {
        (Value::Object(mut base), Value::Object(top)) if top.keys().all(|k| base.contains_key(k)) => {
            for (key, value) in top {
                let merged = overlay(base.remove(&key).expect("checked above"), value);
                base.insert(key, merged);
            }
            Value::Object(base)
        }
        (_, top) => top,
    }
}

/// `json` laid over `defaults`, key by key; a nested object is laid over
/// the default's as a base's is ([`overlay`]), so `"prior": {"noise": true}`
/// keeps the prior's other defaults.
fn with_defaults(mut defaults: Value, json: Value, what: &str) -> Result<Value, String> {
    let (Some(base), Value::Object(file)) = (defaults.as_object_mut(), json) else {
        return Err(format!("{what} must be a JSON object"));
    };
    for (key, value) in file {
        let Some(default) = base.remove(&key) else {
            return Err(format!(
                "{what}: unknown setting {key:?} (known: {})",
                base.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        };
        base.insert(key, overlay(default, value));
    }
    Ok(defaults)
}

/// Applies `key=value` overrides to `json`.
fn apply_overrides(mut json: Value, overrides: &[String]) -> Result<Value, String> {
    for item in overrides {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("override {item:?} is not key=value"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        let mut slot = &mut json;
        for part in key.split('.') {
            let object = slot
                .as_object_mut()
                .ok_or_else(|| format!("override {key}: {part} is not inside an object"))?;
            let known = object.keys().cloned().collect::<Vec<_>>().join(", ");
            slot = object
                .get_mut(part)
                .ok_or_else(|| format!("override {key}: unknown setting {part:?} (known: {known})"))?;
        }
        *slot = value;
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Inner {
        std: f64,
        noise: bool,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Schedule {
        Constant { weight: f64 },
        Linear { steps: usize },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Settings {
        task: String,
        lr: f64,
        prior: Inner,
        schedule: Schedule,
    }

    impl super::Settings for Settings {
        const WHAT: &'static str = "settings";
        fn defaults() -> Self {
            Settings {
                task: "arc-e".into(),
                lr: 1e-4,
                prior: Inner { std: 0.2, noise: false },
                schedule: Schedule::Constant { weight: 1.0 },
            }
        }
    }

    fn load(path: &Path, overrides: &[String]) -> crate::Result<Settings> {
        Loader::file(Some(path)).overrides(overrides).load()
    }

    fn parse(text: &str) -> Settings {
        Loader::text(text, Path::new("a.json")).load().unwrap()
    }

    fn folder(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("melora-settings-{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn a_file_is_laid_over_its_base_chain() {
        let dir = folder(
            "chain",
            &[
                ("base.json", r#"{"lr": 0.001, "prior": {"std": 0.5, "noise": false}}"#),
                ("sub/mid.json", r#"{"base": "../base.json", "task": "boolq"}"#),
                // A nested object with known keys changes those; one with a
                // key the base's lacks (another enum variant) replaces it.
                (
                    "sub/run.json",
                    r#"{"base": "mid.json", "prior": {"noise": true}, "schedule": {"Linear": {"steps": 7}}}"#,
                ),
            ],
        );
        let s = load(&dir.join("sub/run.json"), &["lr=0.002".into()]).unwrap();
        assert_eq!(
            s,
            Settings {
                task: "boolq".into(),
                lr: 0.002,
                prior: Inner { std: 0.5, noise: true },
                schedule: Schedule::Linear { steps: 7 }
            }
        );
        // Without the file's own keys, the base's values.
        let s = load(&dir.join("sub/mid.json"), &[]).unwrap();
        assert_eq!(s.lr, 0.001);
        assert_eq!(s.prior, Inner { std: 0.5, noise: false });
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn bad_bases_are_refused_naming_the_files() {
        let dir = folder(
            "bad",
            &[
                ("missing.json", r#"{"base": "nowhere.json"}"#),
                ("number.json", r#"{"base": 3}"#),
                ("loop.json", r#"{"base": "loop.json", "lr": 0.1}"#),
                ("list.json", r#"[1]"#),
                ("over-list.json", r#"{"base": "list.json"}"#),
                (
                    "typo.json",
                    r#"{"lr": 0.1, "prior": {"std": 1.0, "noise": false, "sd": 1.0}}"#,
                ),
                ("over-typo.json", r#"{"base": "typo.json"}"#),
            ],
        );
        let err = |file: &str| load(&dir.join(file), &[]).unwrap_err().to_string();
        let e = err("missing.json");
        assert!(e.contains("missing.json") && e.contains("nowhere.json"), "{e}");
        assert!(
            err("number.json").contains("\"base\" must name a settings file"),
            "{}",
            err("number.json")
        );
        assert!(err("loop.json").contains("nested bases"), "{}", err("loop.json"));
        assert!(
            err("over-list.json").contains("is not a JSON object"),
            "{}",
            err("over-list.json")
        );
        // A base's misspelt key is refused like the file's own.
        let e = err("over-typo.json");
        assert!(e.contains("over-typo.json") && e.contains("sd"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }

    /// A nested object in a file changes just its keys of the defaults'.
    #[test]
    fn a_nested_object_keeps_the_defaults_it_leaves_out() {
        let got = parse(r#"{"prior": {"noise": true}}"#);
        assert_eq!(got.prior, Inner { std: 0.2, noise: true });
        // Another enum variant replaces the default's.
        let got = parse(r#"{"schedule": {"Linear": {"steps": 3}}}"#);
        assert_eq!(got.schedule, Schedule::Linear { steps: 3 });
    }
}
