//! The GGUF v3 (llama.cpp) container: metadata, tensor infos, and
//! dequantisation of its tensors ([`GgmlType`]: F32, F16, BF16, the 32-value
//! blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K that
//! most published GGUFs use). Both the weights ([`crate::weights::gguf`])
//! and the tokenizer read it.
//!
//! Every size and offset read from the file is checked against the bytes
//! that remain before anything is allocated, so a truncated or corrupt file
//! gives an error, never a panic or a huge allocation.

use std::collections::BTreeMap;

mod quants;
pub use quants::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_DIMS: u32 = 4;
const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// array
    Array(Vec<GgufValue>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) if v >= 0 => Some(v as u64),
            Self::I16(v) if v >= 0 => Some(v as u64),
            Self::I32(v) if v >= 0 => Some(v as u64),
            Self::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // The shortest decimal that round-trips the f32 (1e-5, not 9.9999997e-6).
            Self::F32(v) => v.to_string().parse().ok(),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, if a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's entry in the file's table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<usize>,
    /// GGML type id.
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: usize,
    /// Number of values.
    pub elements: usize,
}

/// A parsed GGUF header: metadata and tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor table.
    pub tensors: Vec<GgufTensorInfo>,
    /// Byte offset of the data section.
    pub data_start: usize,
}

/// What is wrong with a GGUF file (its path is added by the loader).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    /// The file does not start with GGUF's magic bytes.
    #[error("not a GGUF file (bad magic)")]
    NotGguf,
    /// A GGUF version other than 2 and 3.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    Version(u32),
    /// A tensor of a GGML type melora cannot dequantise.
    #[error(
        "tensor {tensor}: GGML type {} (id {type_id}) is not supported (supported: {})",
        GgmlType::name_of(*type_id),
        GgmlType::supported()
    )]
    Type {
        /// The tensor's GGUF name.
        tensor: String,
        /// The GGML type id.
        type_id: u32,
    },
    /// The file ends before something it declares.
    #[error("truncated: {0}")]
    Truncated(String),
    /// A value no valid file holds.
    #[error("corrupt: {0}")]
    Corrupt(String),
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                GgufError::Truncated(format!(
                    "{what} needs {n} bytes at offset {}, the file has {}",
                    self.pos,
                    self.bytes.len()
                ))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn u8(&mut self) -> std::result::Result<u8, GgufError> {
        Ok(self.take(1, "u8")?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.take(2, "u16")?.try_into().unwrap()))
    }
    fn u32(&mut self) -> std::result::Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4, "u32")?.try_into().unwrap()))
    }
    fn u64(&mut self) -> std::result::Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8, "u64")?.try_into().unwrap()))
    }
    /// A count that must fit in the remaining bytes at `min_size` bytes each.
    fn count(&mut self, what: &str, min_size: usize) -> std::result::Result<usize, GgufError> {
        let n = self.u64()?;
        if n > (self.remaining() / min_size.max(1)) as u64 {
            return Err(GgufError::Corrupt(format!(
                "{what} count {n} exceeds what the remaining {} bytes can hold",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> std::result::Result<String, GgufError> {
        let n = self.count("string length", 1)?;
        let bytes = self.take(n, "string")?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError::Corrupt(format!("invalid UTF-8 in a string at offset {}", self.pos - n)))
    }
    fn value(&mut self, type_id: u32, depth: usize) -> std::result::Result<GgufValue, GgufError> {
        Ok(match type_id {
            0 => GgufValue::U8(self.u8()?),
            1 => GgufValue::I8(self.u8()? as i8),
            2 => GgufValue::U16(self.u16()?),
            3 => GgufValue::I16(self.u16()? as i16),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(self.u32()? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32()?)),
            7 => match self.u8()? {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(GgufError::Corrupt(format!("bool value {b}"))),
            },
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Corrupt("arrays nested too deeply".into()));
                }
                let inner = self.u32()?;
                let n = self.count("array", 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            t => return Err(GgufError::Corrupt(format!("unknown metadata value type {t}"))),
        })
    }
}

impl Gguf {
    /// Parses the header of a GGUF file held in `bytes` and checks that
    /// every tensor of a supported type lies inside the file.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(4, "magic")? != MAGIC {
            return Err(GgufError::NotGguf);
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = r.count("tensor", 24)?;
        let n_kv = r.count("metadata", 12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let type_id = r.u32()?;
            let value = r.value(type_id, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Corrupt(format!("tensor {name} has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            let mut elements: usize = 1;
            for _ in 0..n_dims {
                let d = usize::try_from(r.u64()?)
                    .map_err(|_| GgufError::Corrupt(format!("tensor {name} dimension too large")))?;
                elements = elements
                    .checked_mul(d)
                    .ok_or_else(|| GgufError::Corrupt(format!("tensor {name} has too many elements")))?;
                dims.push(d);
            }
            let type_id = r.u32()?;
            let offset =
                usize::try_from(r.u64()?).map_err(|_| GgufError::Corrupt(format!("tensor {name} offset too large")))?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                type_id,
                offset,
                elements,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::Corrupt(format!("general.alignment = {alignment}")));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let gguf = Self {
            version,
            metadata,
            tensors,
            data_start,
        };
        for info in &gguf.tensors {
            if GgmlType::from_id(info.type_id).is_some() {
                gguf.byte_range(info, bytes.len())?;
            }
        }
        Ok(gguf)
    }

    /// The byte range of a tensor of a supported type inside a file of `len` bytes.
    fn byte_range(&self, info: &GgufTensorInfo, len: usize) -> std::result::Result<std::ops::Range<usize>, GgufError> {
        let ty = GgmlType::from_id(info.type_id).ok_or_else(|| GgufError::Type {
            tensor: info.name.clone(),
            type_id: info.type_id,
        })?;
        let (per_block, block_bytes) = ty.block();
        if info.dims[0] % per_block != 0 {
            return Err(GgufError::Corrupt(format!(
                "tensor {} has a row of {} values, not a multiple of {per_block}",
                info.name, info.dims[0]
            )));
        }
        let size = (info.elements / per_block)
            .checked_mul(block_bytes)
            .ok_or_else(|| GgufError::Corrupt(format!("tensor {} too large", info.name)))?;
        let start = self
            .data_start
            .checked_add(info.offset)
            .ok_or_else(|| GgufError::Corrupt(format!("tensor {} offset", info.name)))?;
        let end = start.checked_add(size).filter(|&e| e <= len).ok_or_else(|| {
            GgufError::Truncated(format!(
                "tensor {} needs bytes up to {} but the file has {len}",
                info.name,
                start.saturating_add(size)
            ))
        })?;
        Ok(start..end)
    }

    /// Dequantises the tensor `info` from the whole file `bytes` to f32.
    pub fn dequantize(&self, info: &GgufTensorInfo, bytes: &[u8]) -> std::result::Result<Vec<f32>, GgufError> {
        let ty = GgmlType::from_id(info.type_id).ok_or_else(|| GgufError::Type {
            tensor: info.name.clone(),
            type_id: info.type_id,
        })?;
        let data = &bytes[self.byte_range(info, bytes.len())?];
        let mut out = Vec::with_capacity(info.elements);
        ty.dequantize(data, &mut out);
        Ok(out)
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
}
