//! An in-memory GGUF v3 writer, for test fixtures (tiny models) and round-trip tests.
//!
//! Layout matches ggml's and the Python `gguf` writer's: header, metadata, tensor infos, padding
//! to the alignment, then each tensor's data padded to the alignment (the last one included).

use std::path::Path;

use thiserror::Error;

use super::gguf::{GgufArray, GgufValue, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use super::quant::GgmlType;

/// Errors from adding a tensor to a [`GgufWriter`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GgufWriteError {
    /// The dims and bytes do not describe a valid tensor.
    #[error("tensor '{name}': {reason}")]
    BadTensor { name: String, reason: String },
    /// A tensor with this name was already added.
    #[error("duplicate tensor name '{0}'")]
    DuplicateTensor(String),
}

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    bytes: Vec<u8>,
}

/// Builds a GGUF file in memory.
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty GGUF v3 file.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Write this version number instead of 3 (v2 has the same layout; for compatibility tests).
    pub fn set_version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Add a metadata pair, replacing any earlier value for the same key. Setting
    /// `general.alignment` to a power of two changes the padding [`Self::to_bytes`] uses.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Add a tensor. `dims` are in ggml order (`dims[0]` innermost); `bytes` must be exactly the
    /// encoded size of that many `ty` elements.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<&mut Self, GgufWriteError> {
        let name = name.into();
        let bad = |reason: String| GgufWriteError::BadTensor {
            name: name.clone(),
            reason,
        };
        if dims.len() > MAX_DIMS {
            return Err(bad(format!(
                "{} dimensions, at most {MAX_DIMS}",
                dims.len()
            )));
        }
        if dims.contains(&0) {
            return Err(bad(format!("zero dimension in {dims:?}")));
        }
        if dims.first().copied().unwrap_or(1) % ty.block_elems() as u64 != 0 {
            return Err(bad(format!(
                "dims[0] of {dims:?} is not a multiple of the {ty} block size {}",
                ty.block_elems()
            )));
        }
        let n = dims
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad(format!("element count of {dims:?} overflows")))?;
        let expected = ty.row_bytes(n).map_err(|e| bad(e.to_string()))?;
        if bytes.len() != expected {
            return Err(bad(format!(
                "{n} {ty} elements need {expected} bytes, got {}",
                bytes.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufWriteError::DuplicateTensor(name));
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            bytes,
        });
        Ok(self)
    }

    /// The alignment the file will use: `general.alignment` if it is a valid power of two,
    /// otherwise 32.
    pub fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == ALIGNMENT_KEY)
            .and_then(|(_, v)| v.as_u32())
            .filter(|a| a.is_power_of_two())
            .map_or(DEFAULT_ALIGNMENT, u64::from)
    }

    /// Serialize the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_string(&mut out, k);
            out.extend_from_slice(&v.value_type().id().to_le_bytes());
            write_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + t.bytes.len()).next_multiple_of(align);
        }
        pad(&mut out, align);
        for t in &self.tensors {
            out.extend_from_slice(&t.bytes);
            pad(&mut out, align);
        }
        out
    }

    /// Serialize the file and write it to `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn pad(out: &mut Vec<u8>, align: usize) {
    out.resize(out.len().next_multiple_of(align), 0);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A value's payload (its type id is written by the caller, since array elements omit it).
fn write_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::Array(a) => write_array(out, a),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Element type id, count, then the elements (nested arrays repeat this for each element).
fn write_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => le!(v),
        GgufArray::U16(v) => le!(v),
        GgufArray::I16(v) => le!(v),
        GgufArray::U32(v) => le!(v),
        GgufArray::I32(v) => le!(v),
        GgufArray::F32(v) => le!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|b| u8::from(*b))),
        GgufArray::String(v) => v.iter().for_each(|s| write_string(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|inner| write_array(out, inner)),
        GgufArray::U64(v) => le!(v),
        GgufArray::I64(v) => le!(v),
        GgufArray::F64(v) => le!(v),
    }
}
