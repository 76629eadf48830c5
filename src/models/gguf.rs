//! GGUF (v2 and v3) reader.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count,
//! the metadata key/value pairs, the tensor infos (name, `u32` n_dims, `u64` dims in ggml order,
//! `u32` type, `u64` offset), padding to the alignment, then the data section. v2 and v3 have the
//! same layout (v3 only allowed big-endian files, which we reject); v1 used 32-bit counts and is
//! not supported.
//!
//! Everything read from the file is validated before use: every length is checked against the
//! bytes that remain, so a corrupt file gives a [`GgufError`] naming the problem rather than a
//! panic or a huge allocation.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::quant::{dequantize, ggml_type_name, GgmlType, QuantError};

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most tensor dimensions ggml supports (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Metadata key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Deepest nesting of arrays inside arrays we accept; real files use at most 2, and the limit keeps
/// a hostile file from overflowing the stack through recursion.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Smallest possible encoding of one metadata pair: key length (8) + value type (4) + 1 byte.
const MIN_KV_BYTES: u64 = 13;
/// Smallest possible encoding of one tensor info: name length (8) + n_dims (4) + type (4) +
/// offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 24;

/// The type tag of a metadata value, with GGUF's numeric ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufValueType {
    /// The type for a GGUF value type id (0..=12).
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// GGUF's numeric id of the type.
    pub fn id(self) -> u32 {
        use GgufValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// Fewest bytes one value of this type takes in a file (a string: its length; an array: its
    /// element type and count). Bounds counts read from the file.
    pub fn min_encoded_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: all elements share one type; arrays may nest.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    /// The value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value, widened to `i128` (which holds every GGUF integer type).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits in `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer value that fits in `u32` (writers differ on which integer type they use).
    pub fn as_u32(&self) -> Option<u32> {
        self.as_i128().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|v| i64::try_from(v).ok())
    }

    /// An `F32` value, or an `F64` value narrowed to `f32`.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// A `Bool` value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A `String` value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An `Array` value.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl From<u8> for GgufValue {
    fn from(v: u8) -> Self {
        GgufValue::U8(v)
    }
}
impl From<i8> for GgufValue {
    fn from(v: i8) -> Self {
        GgufValue::I8(v)
    }
}
impl From<u16> for GgufValue {
    fn from(v: u16) -> Self {
        GgufValue::U16(v)
    }
}
impl From<i16> for GgufValue {
    fn from(v: i16) -> Self {
        GgufValue::I16(v)
    }
}
impl From<u32> for GgufValue {
    fn from(v: u32) -> Self {
        GgufValue::U32(v)
    }
}
impl From<i32> for GgufValue {
    fn from(v: i32) -> Self {
        GgufValue::I32(v)
    }
}
impl From<u64> for GgufValue {
    fn from(v: u64) -> Self {
        GgufValue::U64(v)
    }
}
impl From<i64> for GgufValue {
    fn from(v: i64) -> Self {
        GgufValue::I64(v)
    }
}
impl From<f32> for GgufValue {
    fn from(v: f32) -> Self {
        GgufValue::F32(v)
    }
}
impl From<f64> for GgufValue {
    fn from(v: f64) -> Self {
        GgufValue::F64(v)
    }
}
impl From<bool> for GgufValue {
    fn from(v: bool) -> Self {
        GgufValue::Bool(v)
    }
}
impl From<&str> for GgufValue {
    fn from(v: &str) -> Self {
        GgufValue::String(v.to_owned())
    }
}
impl From<String> for GgufValue {
    fn from(v: String) -> Self {
        GgufValue::String(v)
    }
}
impl From<GgufArray> for GgufValue {
    fn from(v: GgufArray) -> Self {
        GgufValue::Array(v)
    }
}

impl GgufArray {
    /// The element type.
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements of a string array.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of any integer array, widened to `i128`.
    pub fn to_i128_vec(&self) -> Option<Vec<i128>> {
        fn w<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|x| (*x).into()).collect()
        }
        Some(match self {
            GgufArray::U8(v) => w(v),
            GgufArray::I8(v) => w(v),
            GgufArray::U16(v) => w(v),
            GgufArray::I16(v) => w(v),
            GgufArray::U32(v) => w(v),
            GgufArray::I32(v) => w(v),
            GgufArray::U64(v) => w(v),
            GgufArray::I64(v) => w(v),
            _ => return None,
        })
    }

    /// The elements of any integer array, if every one fits in `i32`.
    pub fn to_i32_vec(&self) -> Option<Vec<i32>> {
        if let GgufArray::I32(v) = self {
            return Some(v.clone());
        }
        self.to_i128_vec()?
            .into_iter()
            .map(|x| i32::try_from(x).ok())
            .collect()
    }

    /// The elements of an `F32` array, or an `F64` array narrowed to `f32`.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        match self {
            GgufArray::F32(v) => Some(v.clone()),
            GgufArray::F64(v) => Some(v.iter().map(|x| *x as f32).collect()),
            _ => None,
        }
    }
}

/// One tensor's description from the GGUF header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one, so a PyTorch
    /// `[rows, cols]` matrix is stored as `[cols, rows]`.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements (the product of `dims`; saturates instead of overflowing, which cannot
    /// happen for infos read by [`GgufFile`]).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, d| a.saturating_mul(*d))
    }

    /// Size of the tensor's data in bytes (saturating like [`Self::n_elements`]).
    pub fn n_bytes(&self) -> u64 {
        let be = self.ty.block_elems() as u64;
        (self.n_elements() / be).saturating_mul(self.ty.block_bytes() as u64)
    }

    /// Dimensions in row-major (PyTorch) order: the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|d| usize::try_from(*d).unwrap_or(usize::MAX))
            .collect()
    }
}

/// Errors from reading a GGUF file.
#[derive(Debug, Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error(
        "not a GGUF file: the first bytes are {found:02x?} ({found_text:?}), expected \"GGUF\""
    )]
    BadMagic { found: Vec<u8>, found_text: String },
    /// A version other than 2 or 3.
    #[error("GGUF version {version} is not supported (only v2 and v3 are){hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
    /// The file ends before a field it must contain.
    #[error("GGUF file truncated: {what} needs {needed} bytes at offset {offset}, but only {available} remain")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    /// A string or array length larger than the rest of the file could hold.
    #[error("{what} is {len} at offset {offset}, more than the {remaining} bytes left in the file could hold")]
    LengthTooLarge {
        what: String,
        len: u64,
        offset: u64,
        remaining: u64,
    },
    /// A tensor or metadata count larger than the file could hold.
    #[error("{what} {count} is impossible in a {file_len}-byte file (each entry takes at least {min_entry_bytes} bytes)")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        file_len: u64,
        min_entry_bytes: u64,
    },
    /// A string that is not UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    /// A metadata value type id outside 0..=12.
    #[error("unknown metadata value type {type_id} for {what} at offset {offset}")]
    UnknownValueType {
        what: String,
        type_id: u32,
        offset: u64,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("metadata key '{key}': arrays nested deeper than {max} levels")]
    ArrayTooDeep { key: String, max: usize },
    /// The same metadata key twice.
    #[error("duplicate metadata key '{0}'")]
    DuplicateKey(String),
    /// `general.alignment` that is not a nonzero power of two integer.
    #[error("general.alignment must be a nonzero power-of-two integer, got {0}")]
    BadAlignment(String),
    /// More than [`MAX_DIMS`] dimensions.
    #[error("tensor '{tensor}' has {n_dims} dimensions; at most {max} are supported", max = MAX_DIMS)]
    TooManyDims { tensor: String, n_dims: u32 },
    /// A dimension of size zero.
    #[error("tensor '{tensor}' has a zero dimension: {dims:?}")]
    ZeroDim { tensor: String, dims: Vec<u64> },
    /// Element count or byte size overflows 64 bits.
    #[error("tensor '{tensor}': the size of dims {dims:?} overflows")]
    ShapeOverflow { tensor: String, dims: Vec<u64> },
    /// A tensor type id this crate does not support.
    #[error("tensor '{tensor}' has type id {type_id} ({type_name}), which is not supported")]
    UnknownTensorType {
        tensor: String,
        type_id: u32,
        type_name: &'static str,
    },
    /// The row length is not a whole number of quantization blocks.
    #[error("tensor '{tensor}': row length {row} (dims[0]) is not a multiple of the {ty} block size {block}")]
    NotBlockMultiple {
        tensor: String,
        ty: GgmlType,
        row: u64,
        block: usize,
    },
    /// The header ends past the end of the file, so there is no data section.
    #[error("data section would start at offset {data_offset}, past the end of the {file_len}-byte file")]
    DataOffsetOutOfBounds { data_offset: u64, file_len: u64 },
    /// Tensor data extends past the end of the data section.
    #[error("tensor '{tensor}' data at offset {offset} with size {size} runs past the end of the {data_len}-byte data section")]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        size: u64,
        data_len: u64,
    },
    /// Tensor offset not a multiple of the alignment.
    #[error("tensor '{tensor}' offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    /// The same tensor name twice.
    #[error("duplicate tensor name '{0}'")]
    DuplicateTensor(String),
    /// Lookup of a tensor the file does not have.
    #[error("no tensor named '{0}' in the GGUF file")]
    TensorNotFound(String),
    /// A tensor whose data could not be dequantized.
    #[error("tensor '{tensor}': {source}")]
    Quant {
        tensor: String,
        #[source]
        source: QuantError,
    },
}

/// The bytes of an open file: a read-only mapping, or a buffer (tests, in-memory files).
enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Tensor data stays in the file (mmapped) until asked for.
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/value pairs.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Data-section alignment in bytes.
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    by_name: HashMap<String, usize>,
    backing: Backing,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.backing.bytes().len())
            .finish()
    }
}

impl GgufFile {
    /// Open and validate a GGUF file, mapping it read-only.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process; as with any mmap-based
        // model loader, the file must not be truncated or rewritten while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_backing(Backing::Mmap(mmap))
    }

    /// Parse and validate a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::from_backing(Backing::Owned(bytes))
    }

    fn from_backing(backing: Backing) -> Result<GgufFile, GgufError> {
        let h = parse(backing.bytes())?;
        Ok(GgufFile {
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            alignment: h.alignment,
            data_offset: h.data_offset,
            by_name: h.by_name,
            backing,
        })
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    /// The tensor info with this name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).and_then(|i| self.tensors.get(*i))
    }

    /// The raw bytes of a tensor, exactly [`GgufTensorInfo::n_bytes`] long. Infos from this file
    /// were bounds-checked when it was opened; an info that does not fit this file (one built by
    /// hand or taken from another file) gives an empty slice rather than a panic.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> &[u8] {
        let range = (|| {
            let start = usize::try_from(self.data_offset.checked_add(info.offset)?).ok()?;
            let len = usize::try_from(info.n_bytes()).ok()?;
            Some(start..start.checked_add(len)?)
        })();
        range.and_then(|r| self.bytes().get(r)).unwrap_or(&[])
    }

    /// Tells the OS that a tensor's pages of the mapping are not needed now (they are read from
    /// the file again if they are). A no-op for in-memory files, or where unsupported.
    pub fn release_tensor(&self, info: &GgufTensorInfo) {
        #[cfg(unix)]
        if let Backing::Mmap(m) = &self.backing {
            let start = usize::try_from(self.data_offset.saturating_add(info.offset)).ok();
            let len = usize::try_from(info.n_bytes()).ok();
            if let (Some(start), Some(len)) = (start, len) {
                if start.saturating_add(len) <= m.len() {
                    // SAFETY: the mapping is read-only and private and the file is not
                    // modified while open (as `open` requires): dropped pages are read back
                    // from the file with the same bytes, so no reader sees a change. Failure
                    // only means the pages stay resident.
                    let _ = unsafe {
                        m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                    };
                }
            }
        }
    }

    /// A tensor's values as f32 (dequantized if needed), in ggml order (`dims[0]` fastest).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_owned()))?;
        let n = usize::try_from(info.n_elements()).map_err(|_| GgufError::ShapeOverflow {
            tensor: info.name.clone(),
            dims: info.dims.clone(),
        })?;
        let mut out = vec![0.0f32; n];
        dequantize(info.ty, self.tensor_data(info), &mut out).map_err(|source| {
            GgufError::Quant {
                tensor: info.name.clone(),
                source,
            }
        })?;
        Ok(out)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// An integer value of any GGUF integer type, if it fits in `u32`.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u32()
    }

    /// An integer value of any GGUF integer type, if it fits in `u64`.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// An integer value of any GGUF integer type, if it fits in `i64`.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// An `F32` value (or `F64` narrowed).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// A `Bool` value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// A string array.
    pub fn get_str_array(&self, key: &str) -> Option<&[String]> {
        self.get(key)?.as_array()?.as_strings()
    }

    /// An integer array of any integer type whose elements all fit in `i32`.
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get(key)?.as_array()?.to_i32_vec()
    }

    /// An `F32` array (or `F64` narrowed).
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get(key)?.as_array()?.to_f32_vec()
    }

    /// `general.architecture`, e.g. `"llama"`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }
}

/// The parsed header.
struct Header {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian cursor. `what` closures build error context only on failure.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        let avail = self.remaining();
        let buf = self.buf;
        match self
            .pos
            .checked_add(n)
            .and_then(|end| buf.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n as u64,
                available: avail as u64,
            }),
        }
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed UTF-8 string; the length is checked against the remaining bytes first.
    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len_off = self.pos as u64;
        let len = self.u64(|| format!("length of {}", what()))?;
        let n = self.len_within(len, 1, len_off, || format!("length of {}", what()))?;
        let start = self.pos as u64;
        let bytes = self.take(n, &what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            what: what(),
            offset: start,
        })
    }

    /// Check that `count` items of at least `min_size` bytes each can fit in what remains.
    fn len_within(
        &self,
        count: u64,
        min_size: u64,
        offset: u64,
        what: impl FnOnce() -> String,
    ) -> Result<usize, GgufError> {
        let remaining = self.remaining() as u64;
        if count > remaining / min_size.max(1) {
            return Err(GgufError::LengthTooLarge {
                what: what(),
                len: count,
                offset,
                remaining,
            });
        }
        // Fits: count <= remaining, which is a usize.
        Ok(count as usize)
    }
}

fn parse(buf: &[u8]) -> Result<Header, GgufError> {
    let mut r = Reader { buf, pos: 0 };
    let file_len = buf.len() as u64;

    // Too short for the magic: truncated if what is there is a prefix of it, else not GGUF.
    let magic = match buf.get(..4) {
        Some(m) => m,
        None if GGUF_MAGIC.starts_with(buf) => {
            return Err(GgufError::Truncated {
                what: "magic".into(),
                offset: 0,
                needed: 4,
                available: file_len,
            })
        }
        None => return Err(bad_magic(buf)),
    };
    if magic != GGUF_MAGIC {
        return Err(bad_magic(magic));
    }
    r.pos = 4;

    let version = r.u32(|| "version".into())?;
    if version != 2 && version != 3 {
        let hint = if version == 1 {
            " (v1 used 32-bit counts; re-convert the model with a current llama.cpp)"
        } else if matches!(version.swap_bytes(), 2 | 3) {
            " (this looks like a big-endian GGUF, which is not supported)"
        } else {
            ""
        };
        return Err(GgufError::UnsupportedVersion { version, hint });
    }

    let tensor_count = r.u64(|| "tensor count".into())?;
    let kv_count = r.u64(|| "metadata count".into())?;
    let remaining = r.remaining() as u64;
    if kv_count > remaining / MIN_KV_BYTES {
        return Err(GgufError::CountTooLarge {
            what: "metadata count",
            count: kv_count,
            file_len,
            min_entry_bytes: MIN_KV_BYTES,
        });
    }
    if tensor_count > remaining / MIN_TENSOR_INFO_BYTES {
        return Err(GgufError::CountTooLarge {
            what: "tensor count",
            count: tensor_count,
            file_len,
            min_entry_bytes: MIN_TENSOR_INFO_BYTES,
        });
    }

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(|| format!("key of metadata entry {i}"))?;
        let ty_off = r.pos as u64;
        let type_id = r.u32(|| format!("value type of metadata key '{key}'"))?;
        let ty = GgufValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            what: format!("metadata key '{key}'"),
            type_id,
            offset: ty_off,
        })?;
        let value = read_value(&mut r, ty, &key, 0)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u32() {
            Some(a) if a.is_power_of_two() => a as u64,
            _ => return Err(GgufError::BadAlignment(format!("{v:?}"))),
        },
    };

    // Bounded by the count check above.
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut by_name = HashMap::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let info = read_tensor_info(&mut r, i, alignment)?;
        if by_name.contains_key(&info.name) {
            return Err(GgufError::DuplicateTensor(info.name));
        }
        by_name.insert(info.name.clone(), tensors.len());
        tensors.push(info);
    }

    let header_end = r.pos as u64;
    let data_offset =
        header_end
            .checked_next_multiple_of(alignment)
            .ok_or(GgufError::DataOffsetOutOfBounds {
                data_offset: u64::MAX,
                file_len,
            })?;
    if !tensors.is_empty() && data_offset > file_len {
        return Err(GgufError::DataOffsetOutOfBounds {
            data_offset,
            file_len,
        });
    }
    let data_len = file_len.saturating_sub(data_offset);
    for t in &tensors {
        let size = t.n_bytes();
        if t.offset.checked_add(size).is_none_or(|end| end > data_len) {
            return Err(GgufError::TensorOutOfBounds {
                tensor: t.name.clone(),
                offset: t.offset,
                size,
                data_len,
            });
        }
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        by_name,
        alignment,
        data_offset,
    })
}

fn bad_magic(found: &[u8]) -> GgufError {
    GgufError::BadMagic {
        found: found.to_vec(),
        found_text: String::from_utf8_lossy(found).into_owned(),
    }
}

fn read_tensor_info(
    r: &mut Reader<'_>,
    index: u64,
    alignment: u64,
) -> Result<GgufTensorInfo, GgufError> {
    let name = r.string(|| format!("name of tensor {index}"))?;
    let n_dims = r.u32(|| format!("n_dims of tensor '{name}'"))?;
    if n_dims as usize > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            tensor: name,
            n_dims,
        });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(r.u64(|| format!("dimension {d} of tensor '{name}'"))?);
    }
    let type_id = r.u32(|| format!("type of tensor '{name}'"))?;
    let offset = r.u64(|| format!("data offset of tensor '{name}'"))?;

    if dims.contains(&0) {
        return Err(GgufError::ZeroDim { tensor: name, dims });
    }
    let ty = match GgmlType::from_id(type_id) {
        Some(t) => t,
        None => {
            return Err(GgufError::UnknownTensorType {
                tensor: name,
                type_id,
                type_name: ggml_type_name(type_id).unwrap_or("unknown"),
            })
        }
    };
    let n_elems = dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
    // ggml requires a whole number of blocks per row (dims[0]); a 0-d tensor has one element.
    let row = dims.first().copied().unwrap_or(1);
    let block = ty.block_elems();
    if row % block as u64 != 0 {
        return Err(GgufError::NotBlockMultiple {
            tensor: name,
            ty,
            row,
            block,
        });
    }
    let size = n_elems.and_then(|n| (n / block as u64).checked_mul(ty.block_bytes() as u64));
    // Byte sizes must also be addressable on this machine.
    if size.is_none_or(|s| usize::try_from(s).is_err()) {
        return Err(GgufError::ShapeOverflow { tensor: name, dims });
    }
    if offset % alignment != 0 {
        return Err(GgufError::MisalignedTensor {
            tensor: name,
            offset,
            alignment,
        });
    }
    Ok(GgufTensorInfo {
        name,
        dims,
        ty,
        offset,
    })
}

fn read_value(
    r: &mut Reader<'_>,
    ty: GgufValueType,
    key: &str,
    depth: usize,
) -> Result<GgufValue, GgufError> {
    let what = || format!("value of metadata key '{key}'");
    Ok(match ty {
        GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(r.array(what)?)),
        GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(r.array(what)?)),
        GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(r.array(what)?)),
        GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(r.array(what)?)),
        GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(r.array(what)?)),
        GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(r.array(what)?)),
        GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(r.array(what)?)),
        GgufValueType::Bool => GgufValue::Bool(r.array::<1>(what)?[0] != 0),
        GgufValueType::String => GgufValue::String(r.string(what)?),
        GgufValueType::Array => GgufValue::Array(read_array(r, key, depth + 1)?),
        GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(r.array(what)?)),
        GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(r.array(what)?)),
        GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(r.array(what)?)),
    })
}

/// Decode `n` fixed-size little-endian elements (`n * N` bytes were bounds-checked by the caller's
/// `len_within`, and `take` checks again).
fn fixed<const N: usize, T>(
    r: &mut Reader<'_>,
    n: usize,
    key: &str,
    f: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, GgufError> {
    let bytes = r.take(n.saturating_mul(N), || {
        format!("array data of metadata key '{key}'")
    })?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect())
}

fn read_array(r: &mut Reader<'_>, key: &str, depth: usize) -> Result<GgufArray, GgufError> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::ArrayTooDeep {
            key: key.to_owned(),
            max: MAX_ARRAY_DEPTH,
        });
    }
    let ty_off = r.pos as u64;
    let type_id = r.u32(|| format!("array element type of metadata key '{key}'"))?;
    let et = GgufValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
        what: format!("array elements of metadata key '{key}'"),
        type_id,
        offset: ty_off,
    })?;
    let len_off = r.pos as u64;
    let count = r.u64(|| format!("array length of metadata key '{key}'"))?;
    let n = r.len_within(count, et.min_encoded_size(), len_off, || {
        format!("array length of metadata key '{key}'")
    })?;
    Ok(match et {
        GgufValueType::U8 => GgufArray::U8(fixed(r, n, key, u8::from_le_bytes)?),
        GgufValueType::I8 => GgufArray::I8(fixed(r, n, key, i8::from_le_bytes)?),
        GgufValueType::U16 => GgufArray::U16(fixed(r, n, key, u16::from_le_bytes)?),
        GgufValueType::I16 => GgufArray::I16(fixed(r, n, key, i16::from_le_bytes)?),
        GgufValueType::U32 => GgufArray::U32(fixed(r, n, key, u32::from_le_bytes)?),
        GgufValueType::I32 => GgufArray::I32(fixed(r, n, key, i32::from_le_bytes)?),
        GgufValueType::F32 => GgufArray::F32(fixed(r, n, key, f32::from_le_bytes)?),
        GgufValueType::Bool => GgufArray::Bool(fixed(r, n, key, |[b]: [u8; 1]| b != 0)?),
        GgufValueType::U64 => GgufArray::U64(fixed(r, n, key, u64::from_le_bytes)?),
        GgufValueType::I64 => GgufArray::I64(fixed(r, n, key, i64::from_le_bytes)?),
        GgufValueType::F64 => GgufArray::F64(fixed(r, n, key, f64::from_le_bytes)?),
        GgufValueType::String => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(r.string(|| format!("element {i} of metadata key '{key}'"))?);
            }
            GgufArray::String(v)
        }
        GgufValueType::Array => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(r, key, depth + 1)?);
            }
            GgufArray::Array(v)
        }
    })
}
