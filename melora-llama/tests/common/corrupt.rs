//! What the corrupted-input tests share: the tally of what became of each
//! corruption, and the corruptions of a JSON file's leaves.

use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What became of the corruptions of one kind of input.
#[derive(Default)]
pub struct Tally {
    pub tried: usize,
    pub rejected: usize,
    pub unchanged: usize,
    pub panics: Vec<String>,
    pub accepted: Vec<String>,
    pub vague: Vec<String>,
}

impl Tally {
    /// Runs one case: `load` reads the corrupted input; `Ok(true)` means it
    /// loaded to what the intact input loads to. An error must contain
    /// every string of `names`.
    pub fn case(&mut self, what: &str, names: &[&str], load: impl FnOnce() -> Result<bool, String>) {
        self.tried += 1;
        match catch_unwind(AssertUnwindSafe(load)) {
            Err(_) => self.panics.push(what.into()),
            Ok(Ok(true)) => {
                self.unchanged += 1;
                if std::env::var_os("MELORA_SHOW_UNCHANGED").is_some() {
                    println!("unchanged: {what}");
                }
            }
            Ok(Ok(false)) => self.accepted.push(what.into()),
            Ok(Err(message)) => {
                self.rejected += 1;
                if let Some(missing) = names.iter().find(|n| !message.contains(*n)) {
                    self.vague
                        .push(format!("{what}: the message lacks {missing:?}: {message}"));
                }
            }
        }
    }

    pub fn report(&self, kind: &str) -> String {
        format!(
            "| {kind} | {} | {} | {} | {} |",
            self.tried,
            self.rejected,
            self.unchanged,
            self.panics.len()
        )
    }

    pub fn check(&self, kind: &str) {
        assert!(self.panics.is_empty(), "{kind}: panics on {:?}", self.panics);
        assert!(
            self.accepted.is_empty(),
            "{kind}: accepted with a changed meaning: {:#?}",
            self.accepted
        );
        assert!(
            self.vague.is_empty(),
            "{kind}: messages that do not say where: {:#?}",
            self.vague
        );
        assert!(self.rejected > 0 && self.tried == self.rejected + self.unchanged);
    }
}

/// Every leaf of a JSON value with its dotted path.
pub fn leaves(value: &Value, path: String, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaves(
                    v,
                    if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    },
                    out,
                );
            }
        }
        _ => out.push((path, value.clone())),
    }
}

pub fn set(json: &mut Value, path: &str, value: Value) {
    let mut slot = json;
    for part in path.split('.') {
        slot = slot.get_mut(part).unwrap();
    }
    *slot = value;
}

/// Value corruptions of a leaf: other JSON types, a negative number, a
/// number beyond every numeric type, a name no enum has, null; and an
/// integer-valued float written as an integer (the same number).
pub fn corruptions(value: &Value) -> Vec<(&'static str, Value)> {
    let mut out = vec![("a string", json!("corrupt")), ("an object", json!({"x": 1}))];
    if !value.is_boolean() {
        out.push(("a boolean", json!(true)));
    }
    if !value.is_array() {
        out.push(("a list", json!(["corrupt"])));
    }
    match value {
        Value::Number(n) => {
            out.push(("negative", json!(-1)));
            out.push((
                "beyond u64",
                serde_json::from_str::<Value>("18446744073709551616").unwrap(),
            ));
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && n.is_f64()) {
                out.push(("the same number as an integer", json!(f as i64)));
            }
        }
        Value::String(_) => out.push(("an unknown name", json!("NoSuchThing"))),
        _ => {}
    }
    if !value.is_null() {
        out.push(("null", Value::Null));
    }
    out
}
