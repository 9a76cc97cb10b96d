//! Host-side model weights, in one shape whatever the source: a [`blr_core::checkpoint::Checkpoint`]
//! (linear layers by name in any BLR format, other tensors by name, metadata with the model
//! config). GGUF files, HF safetensors and random initialisation are all turned into one, with
//! HF tensor names; a model then takes its tensors out by name and shape, and a compressor can
//! swap any layer's format in between and save the result as a BLR checkpoint.

use crate::{Error, Result};
use blr_core::checkpoint::{Checkpoint, Tensor};
use blr_core::Linear;

/// Metadata key holding the architecture name ("llama", "gpt2", ...).
pub const KEY_ARCH: &str = "model.architecture";
/// Metadata key holding the model config as JSON.
pub const KEY_CONFIG: &str = "model.config";

fn source(ck: &Checkpoint) -> String {
    ck.metadata
        .get("model.source")
        .cloned()
        .unwrap_or_else(|| "weights".into())
}

/// Removes and returns the linear layer `name`, checking it is `(m, n)`. A dense tensor stored
/// under `name.weight` (as HF files store everything) is accepted too.
pub fn take_linear(ck: &mut Checkpoint, name: &str, m: usize, n: usize) -> Result<Linear> {
    let layer = if let Some(i) = ck.layers.iter().position(|(l, _)| l == name) {
        ck.layers.swap_remove(i).1
    } else if let Some(t) = ck.tensors.remove(&format!("{name}.weight")) {
        if t.shape != [m, n] {
            return Err(Error::Tensor {
                source_name: source(ck),
                tensor: format!("{name}.weight"),
                detail: format!(
                    "shape {:?}, the model expects [{m}, {n}] (out, in)",
                    t.shape
                ),
            });
        }
        Linear::Dense(blr_core::Dense::new(m, n, t.data)?)
    } else {
        return Err(Error::Tensor {
            source_name: source(ck),
            tensor: name.to_string(),
            detail: format!("missing: the model needs a linear layer of shape ({m}, {n}) here"),
        });
    };
    if (layer.out_features(), layer.in_features()) != (m, n) {
        return Err(Error::Tensor {
            source_name: source(ck),
            tensor: name.to_string(),
            detail: format!(
                "layer is ({}, {}), the model expects ({m}, {n}) (out, in)",
                layer.out_features(),
                layer.in_features()
            ),
        });
    }
    Ok(layer)
}

/// Removes and returns tensor `name`, checking its shape.
pub fn take_tensor(ck: &mut Checkpoint, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = ck.tensors.remove(name).ok_or_else(|| Error::Tensor {
        source_name: source(ck),
        tensor: name.to_string(),
        detail: format!("missing: the model needs a tensor of shape {shape:?}"),
    })?;
    if t.shape != shape {
        return Err(Error::Tensor {
            source_name: source(ck),
            tensor: name.to_string(),
            detail: format!("shape {:?}, the model expects {shape:?}", t.shape),
        });
    }
    Ok(t.data)
}

/// Adds a tensor.
pub fn put_tensor(ck: &mut Checkpoint, name: &str, shape: Vec<usize>, data: Vec<f32>) {
    ck.tensors.insert(name.to_string(), Tensor { shape, data });
}

/// Records in `ck`'s metadata the architecture `arch` ("llama", "gpt2", ...), its config as
/// JSON, and, when given, where the weights came from.
pub fn put_config<C: serde::Serialize>(
    ck: &mut Checkpoint,
    arch: &'static str,
    cfg: &C,
    source: Option<String>,
) -> Result<()> {
    let json = serde_json::to_string(cfg)
        .map_err(|e| Error::config(arch, format!("config to JSON: {e}")))?;
    ck.metadata.insert(KEY_ARCH.into(), arch.into());
    ck.metadata.insert(KEY_CONFIG.into(), json);
    if let Some(source) = source {
        ck.metadata.insert("model.source".into(), source);
    }
    Ok(())
}

/// Reads the config [`put_config`] recorded; `what` names the model in the error ("Llama").
pub fn config_from<C: serde::de::DeserializeOwned>(ck: &Checkpoint, what: &str) -> Result<C> {
    let json = ck.metadata.get(KEY_CONFIG).ok_or_else(|| Error::Metadata {
        source_name: "checkpoint".into(),
        key: KEY_CONFIG.into(),
        detail: "missing: this checkpoint does not record its model config".into(),
    })?;
    serde_json::from_str(json).map_err(|e| Error::Metadata {
        source_name: "checkpoint".into(),
        key: KEY_CONFIG.into(),
        detail: format!("not a {what} config: {e}"),
    })
}

/// The architecture recorded in a checkpoint's metadata.
pub fn architecture(ck: &Checkpoint) -> Option<&str> {
    ck.metadata.get(KEY_ARCH).map(String::as_str)
}
