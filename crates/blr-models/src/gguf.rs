//! GGUF (v2 and v3) reader, validating every length, offset and type before any tensor data is
//! touched, plus a small writer used to build test files.
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count; then the metadata key/value pairs (key: `u64` length + UTF-8 bytes; value: `u32` type
//! and payload, arrays as `u32` element type, `u64` count, elements); then one info per tensor
//! (name, `u32` n_dims, `n_dims` × `u64` dims with the fastest-varying first, `u32` ggml type,
//! `u64` offset relative to the data section); then padding to `general.alignment` (default 32)
//! and the data section.
//!
//! Validation happens once in [`GgufFile::parse`]: every count is bounded by the bytes that
//! remain (so a corrupt count cannot trigger a huge allocation), every tensor's byte range is
//! checked to lie inside the file, be aligned, and not overlap another tensor. After that,
//! reading a tensor cannot go out of bounds.

use crate::quant::{self, GgmlType};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is any integer type holding a value >= 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn short(&self) -> String {
        match self {
            Value::Str(s) if s.chars().count() > 60 => {
                format!("{:?}...", s.chars().take(60).collect::<String>())
            }
            Value::Array(a) => format!("[{} elements]", a.len()),
            v => format!("{v:?}"),
        }
    }
}

/// Where a tensor lives in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (row length).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the first byte in the file.
    pub start: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    /// Row-major (PyTorch) shape: the ggml dims reversed, so a linear weight with ggml dims
    /// `[n, m]` is `(m, n)`, the layout of `nn.Linear.weight`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file. Tensor data stays in the (memory-mapped) file until asked for.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    pub version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, offset: usize, detail: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.to_path_buf(),
            offset: offset as u64,
            detail: detail.into(),
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(
                self.pos,
                format!(
                    "{what} needs {n} bytes but only {} remain (file is {} bytes): truncated or corrupt file",
                    self.remaining(),
                    self.bytes.len()
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item_bytes` long: rejected when the rest of the file
    /// could not possibly hold them, before anything is allocated.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().filter(|&n| {
            n.checked_mul(min_item_bytes.max(1))
                .is_some_and(|b| b <= self.remaining())
        });
        fits.ok_or_else(|| {
            self.err(
                at,
                format!(
                    "{what} = {n} cannot fit in the {} bytes that remain: corrupt file",
                    self.remaining()
                ),
            )
        })
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.err(at, format!("{what} is not valid UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        let at = self.pos;
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(at, format!("'{key}': bool byte is {b}, not 0 or 1"))),
            },
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(self.err(at, format!("'{key}': nested arrays are not supported")));
                }
                let elem_ty = self.u32(key)?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 1,
                };
                let n = self.count(key, min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            t => {
                return Err(self.err(
                    at,
                    format!("'{key}': unknown metadata value type {t} (GGUF defines 0..=12)"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Memory-maps and validates a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process. A file truncated or
        // rewritten by another process while mapped is undefined behaviour; model files are
        // not modified while a model runs, which is the same assumption every mmap-based
        // loader (llama.cpp, safetensors) makes.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_path_buf(), Storage::Mapped(map))
    }

    /// Validates GGUF bytes held in memory; `name` stands for the path in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let mut c = Cursor {
            bytes,
            pos: 0,
            path: &path,
        };
        let magic = c.array::<4>("magic")?;
        if &magic != MAGIC {
            return Err(c.err(
                0,
                format!("magic is {magic:?}, not \"GGUF\": not a GGUF file"),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(
                4,
                format!("version {version} is not supported (this reader handles GGUF v2 and v3)"),
            ));
        }
        // A tensor info is at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes; a
        // key/value at least 8 (key len) + 4 (type) + 1.
        let n_tensors = c.count("tensor count", 24)?;
        let n_kv = c.count("metadata count", 13)?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let at = c.pos;
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.err(at, format!("metadata key '{key}' appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let a = metadata[i].1.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    return Err(c.err(
                        0,
                        format!(
                            "general.alignment is {}, not a power of two",
                            metadata[i].1.short()
                        ),
                    ));
                }
                a
            }
        };

        struct RawInfo {
            name: String,
            dims: Vec<u64>,
            ty: GgmlType,
            offset: u64,
            at: usize,
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let at = c.pos;
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.err(
                    at,
                    format!("tensor '{name}' has {n_dims} dimensions (ggml allows 1..={MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ty_at = c.pos;
            let ty_id = c.u32(&name)?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
                c.err(
                    ty_at,
                    format!("tensor '{name}' has unknown ggml type id {ty_id}"),
                )
            })?;
            let offset = c.u64(&name)?;
            raw.push(RawInfo {
                name,
                dims,
                ty,
                offset,
                at,
            });
        }

        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        if data_start > file_len && !raw.is_empty() {
            return Err(c.err(
                c.pos,
                format!("data section would start at {data_start}, past the end of the {file_len}-byte file"),
            ));
        }

        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::with_capacity(raw.len());
        for r in raw {
            let bad = |detail: String| Error::Gguf {
                path: path.clone(),
                offset: r.at as u64,
                detail: format!("tensor '{}' ({} {:?}): {detail}", r.name, r.ty, r.dims),
            };
            let elements = r
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad("element count overflows u64".into()))?;
            if !r.dims[0].is_multiple_of(r.ty.block_size() as u64) {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {} block size {}",
                    r.dims[0],
                    r.ty,
                    r.ty.block_size()
                )));
            }
            let size =
                r.ty.bytes_for(elements)
                    .ok_or_else(|| bad("byte size overflows".into()))?;
            if !r.offset.is_multiple_of(alignment) {
                return Err(bad(format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    r.offset
                )));
            }
            let start = data_start
                .checked_add(r.offset)
                .ok_or_else(|| bad("data offset overflows".into()))?;
            let end = start
                .checked_add(size)
                .ok_or_else(|| bad("data end overflows".into()))?;
            if end > file_len {
                return Err(bad(format!(
                    "data bytes {start}..{end} lie past the end of the {file_len}-byte file: truncated file"
                )));
            }
            if tensor_index.insert(r.name.clone(), tensors.len()).is_some() {
                return Err(bad("tensor name appears twice".into()));
            }
            tensors.push(TensorInfo {
                name: r.name,
                dims: r.dims,
                ty: r.ty,
                start,
                size,
            });
        }

        let mut by_start: Vec<&TensorInfo> = tensors.iter().filter(|t| t.size > 0).collect();
        by_start.sort_by_key(|t| t.start);
        for pair in by_start.windows(2) {
            if pair[0].start + pair[0].size > pair[1].start {
                return Err(Error::Gguf {
                    path: path.clone(),
                    offset: pair[1].start,
                    detail: format!(
                        "tensor '{}' (bytes {}..{}) overlaps tensor '{}' (bytes {}..{})",
                        pair[0].name,
                        pair[0].start,
                        pair[0].start + pair[0].size,
                        pair[1].name,
                        pair[1].start,
                        pair[1].start + pair[1].size
                    ),
                });
            }
        }

        Ok(GgufFile {
            path,
            storage,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_err(&self, key: &str, detail: impl Into<String>) -> Error {
        Error::Metadata {
            source_name: self.path.display().to_string(),
            key: key.to_string(),
            detail: detail.into(),
        }
    }

    /// A required metadata value.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.meta_err(key, "missing from the file"))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| {
            self.meta_err(
                key,
                format!("expected an unsigned integer, found {}", v.short()),
            )
        })
    }

    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get_u64(key)?;
        usize::try_from(v).map_err(|_| self.meta_err(key, format!("{v} does not fit in usize")))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| self.meta_err(key, format!("expected a float, found {}", v.short())))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.meta_err(key, format!("expected a string, found {}", v.short())))
    }

    /// A required array whose every element is a string.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.require(key)?;
        let arr = v.as_array().ok_or_else(|| {
            self.meta_err(
                key,
                format!("expected an array of strings, found {}", v.short()),
            )
        })?;
        arr.iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_str().ok_or_else(|| {
                    self.meta_err(key, format!("element {i} is {}, not a string", e.short()))
                })
            })
            .collect()
    }

    /// A required array whose every element is an integer.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.require(key)?;
        let arr = v.as_array().ok_or_else(|| {
            self.meta_err(
                key,
                format!("expected an array of integers, found {}", v.short()),
            )
        })?;
        arr.iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_i64().ok_or_else(|| {
                    self.meta_err(key, format!("element {i} is {}, not an integer", e.short()))
                })
            })
            .collect()
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn tensor_err(&self, name: &str, detail: impl Into<String>) -> Error {
        Error::Tensor {
            source_name: self.path.display().to_string(),
            tensor: name.to_string(),
            detail: detail.into(),
        }
    }

    /// The raw bytes of a tensor (bounds were validated at open).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| self.tensor_err(name, "not in the file"))?;
        // In range: checked against the file length in `parse`.
        Ok(&self.storage.bytes()[t.start as usize..(t.start + t.size) as usize])
    }

    /// A tensor dequantised to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| self.tensor_err(name, "not in the file"))?;
        if !quant::is_dequantisable(t.ty) {
            return Err(self.tensor_err(
                name,
                format!(
                    "type {} cannot be dequantised (supported: {})",
                    t.ty,
                    quant::DEQUANTISABLE
                ),
            ));
        }
        let bytes = self.tensor_bytes(name)?;
        let data = quant::dequantize(t.ty, bytes, t.elements() as usize).ok_or_else(|| {
            self.tensor_err(
                name,
                format!(
                    "{} bytes do not hold {} {} elements",
                    bytes.len(),
                    t.elements(),
                    t.ty
                ),
            )
        })?;
        Ok((t.shape(), data))
    }

    /// A tensor dequantised to f32 whose row-major shape must equal `shape`.
    pub fn tensor_f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (got, data) = self.tensor_f32(name)?;
        if got != shape {
            return Err(self.tensor_err(
                name,
                format!("shape is {got:?} (row-major), the model expects {shape:?}"),
            ));
        }
        Ok(data)
    }
}

/// Builds GGUF v3 files in memory: what tests use to make small, exact inputs, and a way to
/// write random-weight models for other tools.
#[derive(Default)]
pub struct GgufBuilder {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::Str(s) => put_str(out, s),
        Value::Array(items) => {
            let ty = items.first().map_or(4, Value::type_id);
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl GgufBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor from raw bytes; `dims` in ggml order (fastest first).
    pub fn tensor_raw(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    /// Adds an F32 tensor with a row-major `shape`.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor_raw(name, &dims, GgmlType::F32, bytes)
    }

    /// Serialises to GGUF v3 with 32-byte alignment.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.id().to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        let data_start = (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        out.resize(data_start as usize, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn sample() -> GgufBuilder {
        let mut b = GgufBuilder::new();
        b.meta("general.architecture", Value::Str("llama".into()))
            .meta("llama.block_count", Value::U32(3))
            .meta("llama.rope.freq_base", Value::F32(1e5))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::Str("a".into()), Value::Str("Ġb".into())]),
            )
            .meta("flag", Value::Bool(true));
        // A (3, 5) f32 matrix, then a Q8_0 tensor of 2 rows x 32.
        let w: Vec<f32> = (0..15).map(|i| i as f32 * 0.5 - 2.0).collect();
        b.tensor_f32("w", &[3, 5], &w);
        let mut q = Vec::new();
        for row in 0..2 {
            q.extend(f16::from_f32(0.25 * (row + 1) as f32).to_le_bytes());
            q.extend((0..32).map(|i| (i as i8 - 10) as u8));
        }
        b.tensor_raw("q", &[32, 2], GgmlType::Q8_0, q);
        b
    }

    #[test]
    fn round_trip_metadata_and_tensors() {
        let f = GgufFile::from_bytes("mem.gguf", sample().build()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_usize("llama.block_count").unwrap(), 3);
        assert_eq!(f.get_f64("llama.rope.freq_base").unwrap(), 1e5);
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap(),
            vec!["a", "Ġb"]
        );
        assert_eq!(f.get("flag").and_then(Value::as_bool), Some(true));
        let (shape, w) = f.tensor_f32("w").unwrap();
        assert_eq!(shape, vec![3, 5]);
        assert_eq!(w[7], 7.0 * 0.5 - 2.0);
        let q = f.tensor_f32_shaped("q", &[2, 32]).unwrap();
        assert_eq!(q[0], 0.25 * -10.0);
        assert_eq!(q[32 + 31], 0.5 * 21.0);
        for t in f.tensors() {
            assert_eq!(t.start % 32, 0);
        }
    }

    #[test]
    fn wrong_types_and_missing_things_are_named() {
        let f = GgufFile::from_bytes("mem.gguf", sample().build()).unwrap();
        let e = f.get_usize("general.architecture").unwrap_err().to_string();
        assert!(
            e.contains("general.architecture") && e.contains("unsigned"),
            "{e}"
        );
        let e = f.get_str("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("missing"), "{e}");
        let e = f.tensor_f32("nope").unwrap_err().to_string();
        assert!(e.contains("'nope'"), "{e}");
        let e = f.tensor_f32_shaped("w", &[5, 3]).unwrap_err().to_string();
        assert!(e.contains("[3, 5]") && e.contains("[5, 3]"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().build();
        for len in 0..bytes.len() {
            let r = GgufFile::from_bytes("cut.gguf", bytes[..len].to_vec());
            assert!(
                r.is_err(),
                "a file cut to {len} of {} bytes was accepted",
                bytes.len()
            );
        }
    }

    #[test]
    fn corrupt_fields_are_rejected() {
        let good = sample().build();
        // Bad magic.
        let mut b = good.clone();
        b[0] = b'X';
        assert!(GgufFile::from_bytes("m", b)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        // Version 1.
        let mut b = good.clone();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(GgufFile::from_bytes("m", b)
            .unwrap_err()
            .to_string()
            .contains("version 1"));
        // Absurd tensor count: refused before allocating.
        let mut b = good.clone();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(GgufFile::from_bytes("m", b)
            .unwrap_err()
            .to_string()
            .contains("tensor count"));
        // Flip random bytes of the header: never a panic.
        let mut rng = blr_core::rng::Rng::new(99);
        for _ in 0..500 {
            let mut b = good.clone();
            let i = rng.below(400.min(b.len()));
            b[i] = rng.next_u64() as u8;
            let _ = GgufFile::from_bytes("m", b);
        }
    }

    #[test]
    fn tensor_past_end_and_overlap_are_rejected() {
        let mut b = GgufBuilder::new();
        b.tensor_f32("a", &[4], &[1.0; 4]);
        let bytes = b.build();
        let cut = bytes[..bytes.len() - 1].to_vec();
        let e = GgufFile::from_bytes("m", cut).unwrap_err().to_string();
        assert!(e.contains("'a'") && e.contains("past the end"), "{e}");

        // Two tensors pointing at the same offset.
        let mut b = GgufBuilder::new();
        b.tensor_f32("a", &[8], &[1.0; 8])
            .tensor_f32("b", &[8], &[2.0; 8]);
        let mut bytes = b.build();
        // The second tensor's offset field is the last 8 bytes of the tensor infos; find it
        // by its value (32) and set it to 0.
        let pos = bytes
            .windows(8)
            .rposition(|w| w == 32u64.to_le_bytes())
            .unwrap();
        bytes[pos..pos + 8].copy_from_slice(&0u64.to_le_bytes());
        let e = GgufFile::from_bytes("m", bytes).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
    }

    #[test]
    fn misaligned_rows_and_unknown_types_are_rejected() {
        let mut b = GgufBuilder::new();
        b.tensor_raw("q", &[31, 1], GgmlType::Q8_0, vec![0; 34]);
        let e = GgufFile::from_bytes("m", b.build())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'q'") && e.contains("block size"), "{e}");

        let mut b = GgufBuilder::new();
        b.tensor_raw("k", &[256], GgmlType::Q8K, vec![0; 292]);
        let f = GgufFile::from_bytes("m", b.build()).unwrap();
        let e = f.tensor_f32("k").unwrap_err().to_string();
        assert!(
            e.contains("Q8_K") && e.contains("cannot be dequantised"),
            "{e}"
        );
    }
}
