//! Hugging Face folders: `config.json` plus `model.safetensors`, or shards
//! listed in `model.safetensors.index.json`. f32, f16 and bf16 tensors are
//! read (memory-mapped) and converted to f32.

use super::{HostTensor, WeightSource};
use crate::error::{LlamaError, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The error for a PyTorch pickle checkpoint, which melora refuses to load.
pub fn pickle_refusal(path: &Path) -> LlamaError {
    LlamaError::format(
        path,
        "PyTorch pickle checkpoints (.bin, .pt) are refused: unpickling can run arbitrary code. \
         Convert the checkpoint to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)` in transformers)",
    )
}

/// One memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
}

impl SafetensorsFile {
    /// Maps `path` and checks its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| LlamaError::io(path, e))?;
        // SAFETY: the file is only read; melora does not write to weight files
        // while they are mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LlamaError::io(path, e))?;
        let this = Self {
            path: path.to_path_buf(),
            mmap,
        };
        this.parse()?;
        Ok(this)
    }

    /// Parses a safetensors file held in memory (for tests and small files).
    pub fn parse_bytes(bytes: &[u8]) -> std::result::Result<Vec<(String, Vec<usize>)>, String> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        Ok(st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect())
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|e| LlamaError::format(&self.path, format!("not a valid safetensors file: {e}")))
    }

    /// The tensor names.
    pub fn names(&self) -> Vec<String> {
        self.parse()
            .map(|st| st.names().into_iter().map(String::from).collect())
            .unwrap_or_default()
    }

    /// The tensor `name` as f32, or `None`.
    pub fn load(&self, name: &str) -> Result<Option<HostTensor>> {
        let st = self.parse()?;
        let view = match st.tensor(name) {
            Ok(view) => view,
            Err(_) => return Ok(None),
        };
        let values = decode(view.dtype(), view.data()).ok_or_else(|| LlamaError::Dtype {
            name: name.to_string(),
            dtype: format!("{:?}", view.dtype()),
            supported: "F32, F16, BF16",
        })?;
        Ok(Some(HostTensor {
            shape: view.shape().to_vec(),
            values,
        }))
    }
}

/// Little-endian f32/f16/bf16 bytes to f32; `None` for other types.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// A Hugging Face folder of safetensors files.
pub struct SafetensorsSource {
    folder: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index in `files`.
    index: BTreeMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens `folder`: `model.safetensors`, or the shards of
    /// `model.safetensors.index.json`. Refuses pickle-only folders.
    pub fn open(folder: &Path) -> Result<Self> {
        let single = folder.join("model.safetensors");
        let index_path = folder.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| LlamaError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LlamaError::format(&index_path, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LlamaError::format(&index_path, "no \"weight_map\" object"))?;
            let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            shards
        } else if single.is_file() {
            vec!["model.safetensors".into()]
        } else {
            for pickle in ["pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json"] {
                if folder.join(pickle).exists() {
                    return Err(pickle_refusal(&folder.join(pickle)));
                }
            }
            return Err(LlamaError::format(
                folder,
                "no model.safetensors or model.safetensors.index.json in this folder",
            ));
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, shard) in shard_names.iter().enumerate() {
            if shard.contains('/') || shard.contains("..") {
                return Err(LlamaError::format(
                    &index_path,
                    format!("shard name {shard:?} leaves the folder"),
                ));
            }
            let file = SafetensorsFile::open(&folder.join(shard))?;
            for name in file.names() {
                index.insert(name, i);
            }
            files.push(file);
        }
        Ok(Self {
            folder: folder.to_path_buf(),
            files,
            index,
        })
    }
}

impl SafetensorsSource {
    /// A source over one safetensors file.
    pub fn single(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let index = file.names().into_iter().map(|n| (n, 0)).collect();
        Ok(Self {
            folder: path.to_path_buf(),
            files: vec![file],
            index,
        })
    }
}

impl WeightSource for SafetensorsSource {
    fn describe(&self) -> String {
        self.folder.display().to_string()
    }
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }
    fn load(&mut self, name: &str) -> Result<Option<HostTensor>> {
        match self.index.get(name) {
            Some(&i) => self.files[i].load(name),
            None => Ok(None),
        }
    }
}
