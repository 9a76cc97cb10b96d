//! A validating reader and an atomic writer for the safetensors format.
//!
//! Layout: an 8-byte little-endian header length `N`, `N` bytes of JSON
//! (`{"__metadata__": {..}, "name": {"dtype", "shape", "data_offsets": [begin, end]}}`),
//! then the data section; offsets are relative to the data section. Every size, offset and
//! dtype is checked before any tensor byte is touched, and every error names the file and the
//! tensor or byte range at fault, so a truncated download or a hand-edited header is reported
//! precisely instead of surfacing later as garbage weights. The reader is also used for
//! Hugging Face checkpoints (F16/BF16/F32).

use crate::{Error, Result};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest header we accept: real headers are kilobytes; this only stops a corrupt length
/// field from making us allocate gigabytes.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Element types of the format (those we can meet in model files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where one tensor lives inside the data section.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
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

/// An opened, fully validated safetensors file.
pub struct SafeTensors {
    path: PathBuf,
    storage: Storage,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn malformed(path: &Path, detail: impl Into<String>) -> Error {
    Error::Malformed {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn tensor_err(path: &Path, tensor: &str, detail: impl Into<String>) -> Error {
    Error::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        detail: detail.into(),
    }
}

impl SafeTensors {
    /// Opens and validates a file (memory-mapped: only the tensors read are paged in).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the mapping is read-only; if another process truncates the file while it is
        // mapped, reads could fault. We accept that, as every mmap-based model loader does, in
        // exchange for not copying multi-gigabyte checkpoints.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_storage(path, Storage::Mapped(map))
    }

    /// Validates an in-memory file; `path` is only used in error messages.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        Self::from_storage(path.as_ref(), Storage::Owned(bytes))
    }

    fn from_storage(path: &Path, storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let file_len = bytes.len() as u64;
        if file_len < 8 {
            return Err(malformed(
                path,
                format!("file is {file_len} bytes, shorter than the 8-byte header length: truncated or not a safetensors file"),
            ));
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&bytes[..8]);
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(malformed(
                path,
                format!("header length field says {header_len} bytes (over the {MAX_HEADER_BYTES}-byte limit): corrupt or not a safetensors file"),
            ));
        }
        if 8 + header_len > file_len {
            return Err(malformed(
                path,
                format!(
                    "header needs bytes 8..{} but the file has {file_len} bytes: truncated",
                    8 + header_len
                ),
            ));
        }
        let header_end = 8 + header_len as usize;
        let header_text = std::str::from_utf8(&bytes[8..header_end]).map_err(|e| {
            malformed(
                path,
                format!("header (bytes 8..{header_end}) is not UTF-8: {e}"),
            )
        })?;
        let header: serde_json::Value = serde_json::from_str(header_text.trim_end_matches(' '))
            .map_err(|e| {
                malformed(
                    path,
                    format!("header (bytes 8..{header_end}) is not valid JSON: {e}"),
                )
            })?;
        let obj = header
            .as_object()
            .ok_or_else(|| malformed(path, "header JSON is not an object"))?;
        let data_len = bytes.len() - header_end;

        let mut metadata = BTreeMap::new();
        let mut tensors = BTreeMap::new();
        for (name, value) in obj {
            if name == "__metadata__" {
                let meta = value
                    .as_object()
                    .ok_or_else(|| malformed(path, "__metadata__ is not an object"))?;
                for (k, v) in meta {
                    let v = v.as_str().ok_or_else(|| {
                        malformed(
                            path,
                            format!("__metadata__ value for '{k}' is not a string"),
                        )
                    })?;
                    metadata.insert(k.clone(), v.to_string());
                }
                continue;
            }
            let entry = value
                .as_object()
                .ok_or_else(|| tensor_err(path, name, "header entry is not an object"))?;
            let dtype_str = entry
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| tensor_err(path, name, "missing 'dtype'"))?;
            let dtype = Dtype::parse(dtype_str).ok_or_else(|| {
                tensor_err(path, name, format!("unsupported dtype '{dtype_str}'"))
            })?;
            let shape = entry
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| tensor_err(path, name, "missing 'shape'"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| tensor_err(path, name, "shape has a non-integer dimension"))?;
            let offsets = entry
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
                .ok_or_else(|| {
                    tensor_err(
                        path,
                        name,
                        "missing or malformed 'data_offsets' (need [begin, end])",
                    )
                })?;
            let (begin, end) = offsets;
            let elements = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| tensor_err(path, name, format!("shape {shape:?} overflows")))?;
            let want = elements
                .checked_mul(dtype.size())
                .ok_or_else(|| tensor_err(path, name, format!("shape {shape:?} overflows")))?;
            if begin > end {
                return Err(tensor_err(
                    path,
                    name,
                    format!("data_offsets [{begin}, {end}] are reversed"),
                ));
            }
            if end - begin != want {
                return Err(tensor_err(
                    path,
                    name,
                    format!(
                        "data_offsets [{begin}, {end}] hold {} bytes but shape {shape:?} of {dtype} needs {want}",
                        end - begin
                    ),
                ));
            }
            if end > data_len {
                return Err(tensor_err(
                    path,
                    name,
                    format!(
                        "data bytes {}..{} lie past the end of the file ({} bytes): truncated",
                        header_end + begin,
                        header_end + end,
                        bytes.len()
                    ),
                ));
            }
            tensors.insert(
                name.clone(),
                TensorInfo {
                    dtype,
                    shape,
                    begin,
                    end,
                },
            );
        }
        // Overlapping tensors mean a corrupt or malicious header.
        let mut ranges: Vec<(&String, &TensorInfo)> =
            tensors.iter().filter(|(_, t)| t.end > t.begin).collect();
        ranges.sort_by_key(|(_, t)| t.begin);
        for pair in ranges.windows(2) {
            if pair[1].1.begin < pair[0].1.end {
                return Err(malformed(
                    path,
                    format!(
                        "tensors '{}' (bytes {}..{}) and '{}' (bytes {}..{}) overlap",
                        pair[0].0,
                        pair[0].1.begin,
                        pair[0].1.end,
                        pair[1].0,
                        pair[1].1.begin,
                        pair[1].1.end
                    ),
                ));
            }
        }
        Ok(SafeTensors {
            path: path.to_path_buf(),
            storage,
            data_start: header_end,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| tensor_err(&self.path, name, "missing from the file"))
    }

    /// The raw bytes of a tensor.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info_or_err(name)?;
        Ok(&self.storage.bytes()[self.data_start + info.begin..self.data_start + info.end])
    }

    /// A floating-point tensor converted to f32.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info_or_err(name)?;
        let raw = self.bytes(name)?;
        decode_f32(raw, info.dtype).ok_or_else(|| {
            tensor_err(
                &self.path,
                name,
                format!("dtype {} is not a floating-point type", info.dtype),
            )
        })
    }

    /// Like [`read_f32`](Self::read_f32), after checking the shape.
    pub fn read_f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let info = self.info_or_err(name)?;
        if info.shape != shape {
            return Err(tensor_err(
                &self.path,
                name,
                format!("has shape {:?}, expected {shape:?}", info.shape),
            ));
        }
        self.read_f32(name)
    }
}

fn decode_f32(raw: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F64 => raw
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
        _ => return None,
    })
}

/// One tensor to write: f32 values stored as `dtype` (F32, F16 or BF16; round to nearest even).
pub struct TensorToWrite<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

fn encode(data: &[f32], dtype: Dtype, out: &mut Vec<u8>) -> bool {
    match dtype {
        Dtype::F32 => data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => data
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes())),
        Dtype::BF16 => data
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes())),
        _ => return false,
    }
    true
}

/// Serialises tensors + metadata to bytes (tensors in the order given).
pub fn serialize(
    tensors: &[TensorToWrite<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".to_string(),
            serde_json::Value::Object(
                metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
            ),
        );
    }
    let mut data = Vec::new();
    for t in tensors {
        let elements: usize = t.shape.iter().product();
        if elements != t.data.len() {
            return Err(Error::shape(
                format!("tensor '{}' to write", t.name),
                format!("{elements} elements for shape {:?}", t.shape),
                t.data.len(),
            ));
        }
        let begin = data.len();
        if !encode(t.data, t.dtype, &mut data) {
            return Err(Error::Unknown {
                what: "dtype to write",
                got: t.dtype.to_string(),
                expected: "F32, F16, BF16",
            });
        }
        if header.contains_key(&t.name) {
            return Err(Error::shape(
                "tensor names to write",
                "unique names",
                format!("'{}' twice", t.name),
            ));
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::shape("safetensors header", "serialisable JSON", e))?;
    // Pad so the data section starts 8-byte aligned (lets readers cast in place).
    while (8 + header_bytes.len()) % 8 != 0 {
        header_bytes.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header_bytes.len() + data.len());
    out.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&header_bytes);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, then rename, so a
/// crash or Ctrl-C never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| malformed(path, "output path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Serialises and writes atomically.
pub fn write(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_atomic(path, &serialize(tensors, metadata)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let a = [1.0f32, -2.5, 3.25];
        let b = [0.5f32, 1.5, -7.0, 8.0];
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        serialize(
            &[
                TensorToWrite {
                    name: "a".into(),
                    dtype: Dtype::F32,
                    shape: vec![3],
                    data: &a,
                },
                TensorToWrite {
                    name: "b".into(),
                    dtype: Dtype::BF16,
                    shape: vec![2, 2],
                    data: &b,
                },
            ],
            &meta,
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let st = SafeTensors::from_bytes("x.safetensors", sample()).unwrap();
        assert_eq!(st.read_f32("a").unwrap(), vec![1.0, -2.5, 3.25]);
        assert_eq!(
            st.read_f32_shaped("b", &[2, 2]).unwrap(),
            vec![0.5, 1.5, -7.0, 8.0]
        );
        assert_eq!(st.metadata().get("k").map(String::as_str), Some("v"));
        assert!(st.read_f32_shaped("b", &[4]).is_err());
        let err = st.read_f32("nope").unwrap_err().to_string();
        assert!(err.contains("'nope'") && err.contains("missing"), "{err}");
    }

    #[test]
    fn truncated_file_names_the_byte_range() {
        let bytes = sample();
        let cut = bytes[..bytes.len() - 3].to_vec();
        let err = SafeTensors::from_bytes("t.safetensors", cut)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated") && err.contains("'b'"), "{err}");
        let err = SafeTensors::from_bytes("t.safetensors", bytes[..5].to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("shorter than the 8-byte header"), "{err}");
        let err = SafeTensors::from_bytes("t.safetensors", bytes[..20].to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("header needs bytes"), "{err}");
    }

    fn with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    }

    #[test]
    fn bad_headers_are_reported() {
        let cases = [
            ("{not json", "not valid JSON"),
            ("[1,2]", "not an object"),
            (
                r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}"#,
                "unsupported dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                "needs 8",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                "reversed",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
                "data_offsets",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                "past the end",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                "overlap",
            ),
        ];
        for (header, want) in cases {
            let err = SafeTensors::from_bytes("h.safetensors", with_header(header, 12))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{header}: {err}");
        }
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(SafeTensors::from_bytes("h", huge)
            .unwrap_err()
            .to_string()
            .contains("corrupt"));
    }

    #[test]
    fn atomic_write_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("blr-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        write_atomic(&path, &sample()).unwrap();
        let st = SafeTensors::open(&path).unwrap();
        assert_eq!(st.read_f32("a").unwrap().len(), 3);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(leftovers.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
