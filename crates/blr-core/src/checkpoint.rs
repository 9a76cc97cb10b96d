//! The `blr` checkpoint: one safetensors file in which every linear layer is stored as its
//! factors, described in the header metadata, next to any other tensors (norms, embeddings)
//! stored as they are.
//!
//! Metadata keys: `blr.version` = "1"; `blr.dtype` = "F32" | "BF16" (of the factors);
//! `blr.layers` = a JSON list of `{"name","format","m","n","b_out","b_in","rank"}`; any other
//! key the caller passes (model architecture, provenance) is kept as-is. Factor tensors are
//! named `<layer>.<factor>` with the factor names and shapes of
//! [`Linear::factor_shapes`](crate::Linear::factor_shapes). Loading checks every layer's shape,
//! then that each factor is present with exactly the shape and dtype the metadata implies.

use crate::format::{FormatKind, Linear, Shape};
use crate::safetensors::{self, Dtype, SafeTensors, TensorToWrite};
use crate::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub const VERSION: &str = "1";
const KEY_VERSION: &str = "blr.version";
const KEY_DTYPE: &str = "blr.dtype";
const KEY_LAYERS: &str = "blr.layers";

/// A tensor that is not a factorised linear layer (norm weight, embedding, bias...).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A model or a single layer in BLR form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// Linear layers in file order.
    pub layers: Vec<(String, Linear)>,
    /// Other tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// Free-form metadata (architecture, provenance); `blr.*` keys are reserved.
    pub metadata: BTreeMap<String, String>,
}

/// Refuses tensors holding NaN or infinity: one such weight poisons every output it touches,
/// and the failure would otherwise surface far away (a NaN perplexity, garbage text). The
/// error names the tensor and the first bad element so the producer can be found.
fn finite(st: &SafeTensors, name: &str, data: Vec<f32>) -> Result<Vec<f32>> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(data),
        Some(i) => Err(Error::Tensor {
            path: st.path().to_path_buf(),
            tensor: name.to_string(),
            detail: format!(
                "element {i} is {} (non-finite weights are refused: re-create the checkpoint from finite weights)",
                data[i]
            ),
        }),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LayerMeta {
    name: String,
    format: FormatKind,
    m: usize,
    n: usize,
    b_out: usize,
    b_in: usize,
    rank: usize,
}

impl Checkpoint {
    pub fn layer(&self, name: &str) -> Option<&Linear> {
        self.layers.iter().find(|(n, _)| n == name).map(|(_, l)| l)
    }

    /// Writes the checkpoint atomically with factors stored as `dtype` (F32 or BF16).
    pub fn save(&self, path: &Path, dtype: Dtype) -> Result<()> {
        if !matches!(dtype, Dtype::F32 | Dtype::BF16) {
            return Err(Error::Unknown {
                what: "checkpoint dtype",
                got: dtype.to_string(),
                expected: "F32, BF16",
            });
        }
        let mut meta = self.metadata.clone();
        meta.retain(|k, _| !k.starts_with("blr."));
        meta.insert(KEY_VERSION.into(), VERSION.into());
        meta.insert(KEY_DTYPE.into(), dtype.name().into());
        let layer_meta: Vec<LayerMeta> = self
            .layers
            .iter()
            .map(|(name, l)| {
                let s = l.shape();
                LayerMeta {
                    name: name.clone(),
                    format: s.format,
                    m: s.m,
                    n: s.n,
                    b_out: s.b_out,
                    b_in: s.b_in,
                    rank: s.rank,
                }
            })
            .collect();
        meta.insert(
            KEY_LAYERS.into(),
            serde_json::to_string(&layer_meta)
                .map_err(|e| Error::shape("layer metadata", "JSON", e))?,
        );
        let mut out = Vec::new();
        for (name, l) in &self.layers {
            for (factor, shape, data) in l.factors() {
                out.push(TensorToWrite {
                    name: format!("{name}.{factor}"),
                    dtype,
                    shape,
                    data,
                });
            }
        }
        for (name, t) in &self.tensors {
            out.push(TensorToWrite {
                name: name.clone(),
                dtype,
                shape: t.shape.clone(),
                data: &t.data,
            });
        }
        safetensors::write(path, &out, &meta)
    }

    /// Opens and validates a checkpoint.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let st = SafeTensors::open(path)?;
        Self::from_safetensors(&st)
    }

    /// Validates a checkpoint's header without decoding any tensor: the factor dtype and every
    /// layer's shape, with each factor checked present with the right shape and dtype. This is
    /// what `blr info` reads, so that inspecting a multi-gigabyte model costs milliseconds.
    pub fn inspect(st: &SafeTensors) -> Result<(Dtype, Vec<(String, Shape)>)> {
        let path = st.path();
        let malformed = |detail: String| Error::Malformed {
            path: path.to_path_buf(),
            detail,
        };
        let meta = st.metadata();
        let version = meta.get(KEY_VERSION).ok_or_else(|| {
            malformed(format!(
                "no '{KEY_VERSION}' in the header metadata: not a blr checkpoint (use `blr compress` to make one)"
            ))
        })?;
        if version != VERSION {
            return Err(malformed(format!(
                "checkpoint version '{version}' is not supported by this blr (which reads version {VERSION})"
            )));
        }
        let dtype_name = meta
            .get(KEY_DTYPE)
            .ok_or_else(|| malformed(format!("no '{KEY_DTYPE}' in the header metadata")))?;
        let dtype = match Dtype::parse(dtype_name) {
            Some(d @ (Dtype::F32 | Dtype::BF16)) => d,
            _ => {
                return Err(malformed(format!(
                    "'{KEY_DTYPE}' is '{dtype_name}'; expected F32 or BF16"
                )))
            }
        };
        let layers_json = meta
            .get(KEY_LAYERS)
            .ok_or_else(|| malformed(format!("no '{KEY_LAYERS}' in the header metadata")))?;
        let layer_meta: Vec<LayerMeta> = serde_json::from_str(layers_json).map_err(|e| {
            malformed(format!(
                "'{KEY_LAYERS}' metadata is not a valid layer list: {e}"
            ))
        })?;
        let mut out = Vec::with_capacity(layer_meta.len());
        for lm in layer_meta {
            let rank = if lm.format == FormatKind::Dense {
                lm.m.min(lm.n)
            } else {
                lm.rank
            };
            let shape = Shape {
                format: lm.format,
                m: lm.m,
                n: lm.n,
                b_out: lm.b_out,
                b_in: lm.b_in,
                rank,
            };
            shape.validate().map_err(|e| Error::Tensor {
                path: path.to_path_buf(),
                tensor: lm.name.clone(),
                detail: format!("layer metadata is invalid: {e}"),
            })?;
            for (factor, want_shape) in Linear::factor_shapes(&shape) {
                let name = format!("{}.{factor}", lm.name);
                let info = st.info(&name).ok_or_else(|| Error::Tensor {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    detail: format!(
                        "missing: the metadata declares layer '{}' as {}",
                        lm.name, lm.format
                    ),
                })?;
                if info.dtype != dtype {
                    return Err(Error::Tensor {
                        path: path.to_path_buf(),
                        tensor: name,
                        detail: format!("dtype {} but the checkpoint declares {dtype}", info.dtype),
                    });
                }
                if info.shape != want_shape {
                    return Err(Error::Tensor {
                        path: path.to_path_buf(),
                        tensor: name,
                        detail: format!("has shape {:?}, expected {want_shape:?}", info.shape),
                    });
                }
            }
            out.push((lm.name, shape));
        }
        Ok((dtype, out))
    }

    pub fn from_safetensors(st: &SafeTensors) -> Result<Checkpoint> {
        let path = st.path();
        let malformed = |detail: String| Error::Malformed {
            path: path.to_path_buf(),
            detail,
        };
        let (_, shapes) = Self::inspect(st)?;
        let mut used = BTreeSet::new();
        let mut layers = Vec::with_capacity(shapes.len());
        for (name, shape) in shapes {
            let mut factors = Vec::new();
            for (factor, want_shape) in Linear::factor_shapes(&shape) {
                let tensor = format!("{name}.{factor}");
                factors.push(finite(
                    st,
                    &tensor,
                    st.read_f32_shaped(&tensor, &want_shape)?,
                )?);
                used.insert(tensor);
            }
            layers.push((name, Linear::from_factors(&shape, factors)?));
        }
        let mut tensors = BTreeMap::new();
        for name in st.names() {
            if used.contains(name) {
                continue;
            }
            let info = st
                .info(name)
                .ok_or_else(|| malformed(format!("tensor '{name}' vanished")))?;
            tensors.insert(
                name.to_string(),
                Tensor {
                    shape: info.shape.clone(),
                    data: finite(st, name, st.read_f32(name)?)?,
                },
            );
        }
        let metadata = st
            .metadata()
            .iter()
            .filter(|(k, _)| !k.starts_with("blr."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Checkpoint {
            layers,
            tensors,
            metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("blr-ckpt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("model.safetensors")
    }

    fn sample() -> Checkpoint {
        let shapes = [
            Shape {
                format: FormatKind::Dense,
                m: 5,
                n: 7,
                b_out: 1,
                b_in: 1,
                rank: 5,
            },
            Shape {
                format: FormatKind::LowRank,
                m: 9,
                n: 6,
                b_out: 1,
                b_in: 1,
                rank: 2,
            },
            Shape {
                format: FormatKind::Monarch,
                m: 12,
                n: 9,
                b_out: 3,
                b_in: 3,
                rank: 6,
            },
            Shape {
                format: FormatKind::Blast,
                m: 10,
                n: 12,
                b_out: 2,
                b_in: 3,
                rank: 3,
            },
        ];
        let mut ck = Checkpoint::default();
        for (i, s) in shapes.iter().enumerate() {
            ck.layers.push((
                format!("layers.{i}.{}", s.format),
                Linear::random(s, i as u64).unwrap(),
            ));
        }
        ck.tensors.insert(
            "norm.weight".into(),
            Tensor {
                shape: vec![7],
                data: Rng::new(9).normal_vec(7, 1.0),
            },
        );
        ck.metadata.insert("arch".into(), "test".into());
        ck
    }

    #[test]
    fn f32_round_trip_is_bit_exact() {
        let path = tmp("f32");
        let ck = sample();
        ck.save(&path, Dtype::F32).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back, ck);
        // And the bytes themselves are reproducible.
        let first = std::fs::read(&path).unwrap();
        back.save(&path, Dtype::F32).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn bf16_round_trip_is_bit_exact_after_rounding() {
        let path = tmp("bf16");
        sample().save(&path, Dtype::BF16).unwrap();
        let once = Checkpoint::load(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        once.save(&path, Dtype::BF16).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let twice = Checkpoint::load(&path).unwrap();
        assert_eq!(once, twice);
        // Values are the bf16 roundings of the originals.
        let (Linear::Blast(a), Linear::Blast(b)) = (&sample().layers[3].1, &once.layers[3].1)
        else {
            panic!("layer 3 is BLAST")
        };
        for (x, y) in a.u.iter().zip(&b.u) {
            assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
        }
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    fn rewrite(
        path: &Path,
        edit: impl Fn(&mut BTreeMap<String, String>, &mut Vec<(String, Vec<usize>, Vec<f32>)>),
    ) {
        let st = SafeTensors::open(path).unwrap();
        let mut meta = st.metadata().clone();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
            .names()
            .map(|n| {
                (
                    n.to_string(),
                    st.info(n).unwrap().shape.clone(),
                    st.read_f32(n).unwrap(),
                )
            })
            .collect();
        drop(st);
        edit(&mut meta, &mut tensors);
        let tw: Vec<TensorToWrite> = tensors
            .iter()
            .map(|(n, s, d)| TensorToWrite {
                name: n.clone(),
                dtype: Dtype::F32,
                shape: s.clone(),
                data: d,
            })
            .collect();
        safetensors::write(path, &tw, &meta).unwrap();
    }

    #[test]
    fn malformed_checkpoints_give_named_errors() {
        let path = tmp("bad");
        type Edit =
            Box<dyn Fn(&mut BTreeMap<String, String>, &mut Vec<(String, Vec<usize>, Vec<f32>)>)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|_, t| t.retain(|(n, _, _)| n != "layers.3.blast.s")),
                "layers.3.blast.s",
            ),
            (
                Box::new(|_, t| {
                    for e in t.iter_mut().filter(|e| e.0 == "layers.1.lowrank.u") {
                        e.1 = vec![6, 3];
                    }
                }),
                "has shape [6, 3]",
            ),
            (
                Box::new(|m, _| {
                    m.remove("blr.version");
                }),
                "not a blr checkpoint",
            ),
            (
                Box::new(|m, _| {
                    m.insert("blr.layers".into(), "[{".into());
                }),
                "not a valid layer list",
            ),
            (
                Box::new(|m, _| {
                    let v = m["blr.layers"].replace("\"b_out\":2", "\"b_out\":4");
                    m.insert("blr.layers".into(), v);
                }),
                "do not divide",
            ),
            (
                Box::new(|m, _| {
                    let v = m["blr.layers"].replace("\"rank\":3", "\"rank\":0");
                    m.insert("blr.layers".into(), v);
                }),
                "rank must be",
            ),
        ];
        for (edit, want) in cases {
            sample().save(&path, Dtype::F32).unwrap();
            rewrite(&path, edit);
            let err = Checkpoint::load(&path).unwrap_err().to_string();
            assert!(err.contains(want), "expected '{want}' in: {err}");
        }
        // Wrong dtype: the metadata says BF16 but tensors are F32.
        sample().save(&path, Dtype::F32).unwrap();
        rewrite(&path, |m, _| {
            m.insert("blr.dtype".into(), "BF16".into());
        });
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("dtype F32"), "{err}");
        // Non-finite weights are refused, naming the tensor and element.
        for bad in [f32::NAN, f32::INFINITY] {
            let mut ck = sample();
            if let Linear::LowRank(l) = &mut ck.layers[1].1 {
                l.v[5] = bad;
            }
            ck.save(&path, Dtype::F32).unwrap();
            let err = Checkpoint::load(&path).unwrap_err().to_string();
            assert!(
                err.contains("layers.1.lowrank.v") && err.contains("element 5"),
                "{err}"
            );
        }
        // Truncated file.
        sample().save(&path, Dtype::F32).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
