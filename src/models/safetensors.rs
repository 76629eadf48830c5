//! Hugging Face model directories: `config.json` plus one or more `*.safetensors` shards.
//!
//! A safetensors file is an 8-byte little-endian header length `N`, `N` bytes of JSON mapping
//! tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the byte
//! after the header), and the data. Only F32, F16 and BF16 tensors are accepted (what Llama
//! checkpoints use). Every header field is validated against the file before use.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use half::{bf16, f16};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use thiserror::Error;

/// Largest JSON header we accept; real headers are well under 1 MiB, and the limit bounds the
/// allocation a corrupt length could cause.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;
/// Name of the sharded-checkpoint index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Tensor element types this reader accepts.
/// Integer dtypes: such tensors are buffers (BERT's `position_ids`), skipped when a file is read.
const INTEGER_DTYPES: &[&str] = &["BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SafetensorsDtype {
    F32,
    F16,
    BF16,
}

impl SafetensorsDtype {
    /// Parse a safetensors dtype string (`"F32"`, `"F16"`, `"BF16"`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(SafetensorsDtype::F32),
            "F16" => Some(SafetensorsDtype::F16),
            "BF16" => Some(SafetensorsDtype::BF16),
            _ => None,
        }
    }

    /// The dtype string as written in headers.
    pub fn name(self) -> &'static str {
        match self {
            SafetensorsDtype::F32 => "F32",
            SafetensorsDtype::F16 => "F16",
            SafetensorsDtype::BF16 => "BF16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SafetensorsDtype::F32 => 4,
            SafetensorsDtype::F16 | SafetensorsDtype::BF16 => 2,
        }
    }
}

/// Errors from reading or writing safetensors.
#[derive(Debug, Error)]
pub enum SafetensorsError {
    /// A file could not be read, listed or written.
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` or the index is not valid JSON.
    #[error("invalid JSON in {path}: {source}")]
    BadJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The index file is not shaped as expected or names a file outside the directory.
    #[error("invalid index {path}: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    /// The directory has no safetensors files.
    #[error("no *.safetensors files in {0}")]
    NoShards(PathBuf),
    /// The file is shorter than the 8-byte header length.
    #[error("{path}: file is {len} bytes, too short for the 8-byte header length")]
    TooShort { path: PathBuf, len: u64 },
    /// The header length exceeds the file or the size limit.
    #[error("{path}: header length {header_len} is too large (file is {file_len} bytes, limit {limit})", limit = MAX_HEADER_BYTES)]
    HeaderTooLarge {
        path: PathBuf,
        header_len: u64,
        file_len: u64,
    },
    /// The header is not valid JSON.
    #[error("{path}: invalid JSON header: {source}")]
    BadHeaderJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A header entry is missing fields or has the wrong types.
    #[error("{path}: bad header entry for tensor '{tensor}': {reason}")]
    BadEntry {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// A float dtype other than F32, F16 or BF16 (integer tensors are buffers and skipped).
    #[error("{path}: tensor '{tensor}' has unsupported dtype {dtype} (only F32, F16, BF16)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// The shape's element count or byte size overflows.
    #[error("{path}: tensor '{tensor}' shape {shape:?} overflows")]
    ShapeOverflow {
        path: PathBuf,
        tensor: String,
        shape: Vec<u64>,
    },
    /// Data offsets out of order, past the data, or not matching shape × dtype size.
    #[error("{path}: tensor '{tensor}' data_offsets [{begin}, {end}] are invalid: {reason}")]
    BadOffsets {
        path: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
        reason: String,
    },
    /// The same tensor in two places.
    #[error("tensor '{tensor}' appears twice: in {first} and {second}")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    /// Lookup of a tensor the directory does not have.
    #[error("no tensor named '{0}'")]
    TensorNotFound(String),
    /// Bad arguments to [`write_safetensors`].
    #[error("cannot write tensor '{tensor}': {reason}")]
    BadWrite { tensor: String, reason: String },
}

/// One tensor's location.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: SafetensorsDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    start: usize,
    len: usize,
}

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

/// A Hugging Face model directory, with every shard's header parsed and its data mmapped.
pub struct HfModelDir {
    dir: PathBuf,
    config: serde_json::Value,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

impl fmt::Debug for HfModelDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfModelDir")
            .field("dir", &self.dir)
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SafetensorsError + '_ {
    move |source| SafetensorsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl HfModelDir {
    /// Open a model directory: parse `config.json`, then the shards listed in
    /// `model.safetensors.index.json` if present, otherwise every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<HfModelDir, SafetensorsError> {
        let config_path = dir.join("config.json");
        let config_bytes = std::fs::read(&config_path).map_err(io_err(&config_path))?;
        let config: serde_json::Value =
            serde_json::from_slice(&config_bytes).map_err(|source| SafetensorsError::BadJson {
                path: config_path.clone(),
                source,
            })?;

        let index_path = dir.join(INDEX_FILE);
        let (shard_names, weight_map) = if index_path.is_file() {
            let (names, map) = read_index(&index_path)?;
            (names, Some(map))
        } else {
            (list_shards(dir)?, None)
        };
        if shard_names.is_empty() {
            return Err(SafetensorsError::NoShards(dir.to_path_buf()));
        }

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
        for name in &shard_names {
            let path = dir.join(name);
            let (mmap, entries) = open_shard(&path)?;
            let shard = shards.len();
            for (tname, mut e) in entries {
                if let Some(prev) = tensors.get(&tname) {
                    return Err(SafetensorsError::DuplicateTensor {
                        tensor: tname,
                        first: shards
                            .get(prev.shard)
                            .map_or_else(|| path.clone(), |s: &Shard| s.path.clone()),
                        second: path,
                    });
                }
                e.shard = shard;
                tensors.insert(tname, e);
            }
            shards.push(Shard { path, mmap });
        }

        // Every tensor the index promises must be in the shard it names.
        if let Some(map) = weight_map {
            for (tname, file) in map {
                let found = tensors
                    .get(&tname)
                    .and_then(|e| shards.get(e.shard))
                    .is_some_and(|s| s.path.file_name() == Some(std::ffi::OsStr::new(&file)));
                if !found {
                    return Err(SafetensorsError::BadIndex {
                        path: index_path,
                        reason: format!("tensor '{tname}' is not in {file}"),
                    });
                }
            }
        }

        Ok(HfModelDir {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
        })
    }

    /// The directory this was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Paths of the shard files, in the order they were read.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor's shape (row-major, as in PyTorch).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// A tensor's stored dtype.
    pub fn dtype(&self, name: &str) -> Option<SafetensorsDtype> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    /// A tensor's raw little-endian bytes (validated when the directory was opened).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], SafetensorsError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| SafetensorsError::TensorNotFound(name.to_owned()))?;
        // Ranges were checked against the mapping at open time; `get` keeps this panic-free.
        self.shards
            .get(e.shard)
            .and_then(|s| s.mmap.get(e.start..e.start + e.len))
            .ok_or_else(|| SafetensorsError::TensorNotFound(name.to_owned()))
    }

    /// A tensor's shape and values converted to f32.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), SafetensorsError> {
        let bytes = self.tensor_bytes(name)?;
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| SafetensorsError::TensorNotFound(name.to_owned()))?;
        let values = match e.dtype {
            SafetensorsDtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            SafetensorsDtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            SafetensorsDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        Ok((e.shape.clone(), values))
    }
}

/// Shard file names from the index's `weight_map`, plus the map itself.
#[allow(clippy::type_complexity)]
fn read_index(path: &Path) -> Result<(Vec<String>, BTreeMap<String, String>), SafetensorsError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let index: Index =
        serde_json::from_slice(&bytes).map_err(|source| SafetensorsError::BadJson {
            path: path.to_path_buf(),
            source,
        })?;
    let files: BTreeSet<&String> = index.weight_map.values().collect();
    for f in &files {
        // A shard must be a plain file name in this directory, never a path that escapes it.
        let mut comps = Path::new(f.as_str()).components();
        let plain = matches!(comps.next(), Some(Component::Normal(_))) && comps.next().is_none();
        if !plain {
            return Err(SafetensorsError::BadIndex {
                path: path.to_path_buf(),
                reason: format!("shard name {f:?} is not a plain file name"),
            });
        }
    }
    let names = files.into_iter().cloned().collect();
    Ok((names, index.weight_map))
}

/// Every `*.safetensors` file in `dir`, sorted by name.
fn list_shards(dir: &Path) -> Result<Vec<String>, SafetensorsError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
            if let Some(n) = path.file_name().and_then(|n| n.to_str()) {
                names.push(n.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The header's top-level entries in file order, keeping duplicates (which a map would hide).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = m.next_entry::<String, serde_json::Value>()? {
                    v.push(kv);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Map a shard and parse its header (entries' `shard` field is filled in by the caller).
fn open_shard(path: &Path) -> Result<(memmap2::Mmap, Vec<(String, Entry)>), SafetensorsError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only private mapping; the checkpoint must not be modified while open, as with
    // any mmap-based loader.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    let entries = parse_header(path, &mmap)?;
    Ok((mmap, entries))
}

fn parse_header(path: &Path, buf: &[u8]) -> Result<Vec<(String, Entry)>, SafetensorsError> {
    let file_len = buf.len() as u64;
    let len_bytes: [u8; 8] = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| SafetensorsError::TooShort {
            path: path.to_path_buf(),
            len: file_len,
        })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(SafetensorsError::HeaderTooLarge {
            path: path.to_path_buf(),
            header_len,
            file_len,
        });
    }
    // Both bounds checked above, so these fit in usize and in the buffer.
    let data_start = 8 + header_len as usize;
    let header = buf.get(8..data_start).unwrap_or(&[]);
    let data_len = file_len - 8 - header_len;
    let raw = serde_json::from_slice::<Entries>(header)
        .map_err(|source| SafetensorsError::BadHeaderJson {
            path: path.to_path_buf(),
            source,
        })?
        .0;

    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(SafetensorsError::DuplicateTensor {
                tensor: name,
                first: path.to_path_buf(),
                second: path.to_path_buf(),
            });
        }
        let e: RawEntry =
            serde_json::from_value(value).map_err(|err| SafetensorsError::BadEntry {
                path: path.to_path_buf(),
                tensor: name.clone(),
                reason: err.to_string(),
            })?;
        let Some(dtype) = SafetensorsDtype::parse(&e.dtype) else {
            if INTEGER_DTYPES.contains(&e.dtype.as_str()) {
                continue; // a buffer (position ids, masks), not a weight: not loaded
            }
            return Err(SafetensorsError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: name,
                dtype: e.dtype,
            });
        };
        let overflow = || SafetensorsError::ShapeOverflow {
            path: path.to_path_buf(),
            tensor: name.clone(),
            shape: e.shape.clone(),
        };
        let n_bytes = e
            .shape
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .ok_or_else(overflow)?;
        let shape = e
            .shape
            .iter()
            .map(|d| usize::try_from(*d))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| overflow())?;
        let [begin, end] = e.data_offsets;
        let bad = |reason: String| SafetensorsError::BadOffsets {
            path: path.to_path_buf(),
            tensor: name.clone(),
            begin,
            end,
            reason,
        };
        if begin > end {
            return Err(bad("begin is after end".into()));
        }
        if end > data_len {
            return Err(bad(format!("end is past the {data_len}-byte data section")));
        }
        if end - begin != n_bytes {
            return Err(bad(format!(
                "{} bytes, but shape {:?} of {} needs {n_bytes}",
                end - begin,
                e.shape,
                dtype.name()
            )));
        }
        out.push((
            name,
            Entry {
                shard: 0,
                dtype,
                shape,
                // end <= data_len, so both fit in the (usize-sized) buffer.
                start: data_start + begin as usize,
                len: (end - begin) as usize,
            },
        ));
    }
    Ok(out)
}

/// Write `tensors` (name, row-major shape, values) to a safetensors file with one `dtype`
/// (`"F32"`, `"F16"` or `"BF16"`; f16/bf16 round to nearest even). For tests and fixtures.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: &str,
) -> Result<(), SafetensorsError> {
    let dt = SafetensorsDtype::parse(dtype).ok_or_else(|| SafetensorsError::BadWrite {
        tensor: String::new(),
        reason: format!("unsupported dtype {dtype:?}"),
    })?;
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let numel = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
        if numel != Some(values.len()) {
            return Err(SafetensorsError::BadWrite {
                tensor: name.clone(),
                reason: format!("shape {shape:?} does not match {} values", values.len()),
            });
        }
        if name == "__metadata__" || header.contains_key(name) {
            return Err(SafetensorsError::BadWrite {
                tensor: name.clone(),
                reason: "duplicate or reserved name".into(),
            });
        }
        let begin = data.len();
        match dt {
            SafetensorsDtype::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            SafetensorsDtype::F16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            SafetensorsDtype::BF16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dt.name(),
                "shape": shape,
                "data_offsets": [begin, data.len()],
            }),
        );
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    std::fs::write(path, out).map_err(io_err(path))
}
