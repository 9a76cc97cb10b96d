//! The on-disk autotune cache: the fastest measured [`Strategy`] per (device, layer shape, T).
//!
//! Why: which strategy wins depends on the device and the shape more than a heuristic can say
//! (on the H100, docs/perf/layers-h100.md: two or three cuBLASLt launches beat blr's decode
//! kernel for every low-rank and Monarch layer at T <= 16, while BLAST's decode kernel wins for
//! llama7b q/k/v/o at T=1). `blr bench layer` measures every strategy and records the winner
//! here; [`AutotuneCache::choose`] then answers from measurement and falls back to
//! [`auto_strategy`] for shapes it has not seen.
//!
//! Format: plain text, one `<key><TAB><strategy>` line per entry (`#` starts a comment), key =
//! `device|format|m x n|b_out x b_in|rank|T`: easy to read, diff and edit by hand. Default
//! location: `$BLR_AUTOTUNE`, else `$XDG_CACHE_HOME/blr/autotune.tsv`, else
//! `~/.cache/blr/autotune.tsv`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blr_core::format::Shape;

use super::{auto_strategy, check_strategy, Strategy};
use crate::error::{Error, Result};

/// Measured best strategies, keyed by device, shape and token count.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AutotuneCache {
    pub entries: BTreeMap<String, Strategy>,
}

impl AutotuneCache {
    /// The cache key of a layer on a device at `tokens` tokens.
    pub fn key(device: &str, shape: &Shape, tokens: usize) -> String {
        format!(
            "{device}|{}|{}x{}|{}x{}|{}|{tokens}",
            shape.format, shape.m, shape.n, shape.b_out, shape.b_in, shape.rank
        )
    }

    /// `$BLR_AUTOTUNE`, else `$XDG_CACHE_HOME/blr/autotune.tsv`, else
    /// `~/.cache/blr/autotune.tsv`; `None` if none of those can be formed.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("BLR_AUTOTUNE").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(p));
        }
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("blr").join("autotune.tsv"))
    }

    /// Reads `path`; a missing file is an empty cache.
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(Error::Shape(format!(
                    "cannot read the autotune cache {}: {e}",
                    path.display()
                )))
            }
        };
        let mut entries = BTreeMap::new();
        for (no, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = line.split_once('\t').and_then(|(k, v)| {
                v.trim()
                    .parse::<Strategy>()
                    .ok()
                    .map(|s| (k.to_string(), s))
            });
            let Some((key, strategy)) = parsed else {
                return Err(Error::Shape(format!(
                    "the autotune cache {} is not valid at line {}: expected `<key><TAB><strategy>`, \
                     got '{line}'; delete it and run `blr bench layer` again",
                    path.display(),
                    no + 1
                )));
            };
            entries.insert(key, strategy);
        }
        Ok(Self { entries })
    }

    /// Writes the cache (creating its directory), atomically via a temporary file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |what: &str, e: std::io::Error| {
            Error::Shape(format!(
                "cannot {what} the autotune cache {}: {e}",
                path.display()
            ))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
        }
        let mut text = String::from(
            "# blr autotune cache: fastest measured strategy per device|format|m x n|blocks|rank|T\n",
        );
        for (k, v) in &self.entries {
            text.push_str(&format!("{k}\t{v}\n"));
        }
        blr_core::safetensors::write_atomic(path, text.as_bytes())
            .map_err(|e| Error::Shape(format!("cannot write the autotune cache: {e}")))
    }

    pub fn insert(&mut self, device: &str, shape: &Shape, tokens: usize, best: Strategy) {
        self.entries.insert(Self::key(device, shape, tokens), best);
    }

    pub fn get(&self, device: &str, shape: &Shape, tokens: usize) -> Option<Strategy> {
        self.entries.get(&Self::key(device, shape, tokens)).copied()
    }

    /// The measured best strategy if the cache has one that still applies, else the heuristic.
    pub fn choose(&self, device: &str, shape: &Shape, tokens: usize) -> Strategy {
        self.get(device, shape, tokens)
            .filter(|&s| check_strategy(shape, s, tokens).is_ok())
            .unwrap_or_else(|| auto_strategy(shape, tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blr_core::FormatKind;

    fn blast() -> Shape {
        Shape {
            format: FormatKind::Blast,
            m: 4096,
            n: 4096,
            b_out: 16,
            b_in: 16,
            rank: 1024,
        }
    }

    #[test]
    fn choose_prefers_measurement_then_heuristic() {
        let mut c = AutotuneCache::default();
        assert_eq!(c.choose("H100", &blast(), 1), Strategy::Partial);
        c.insert("H100", &blast(), 1, Strategy::Decode);
        assert_eq!(c.choose("H100", &blast(), 1), Strategy::Decode);
        // Another device or T falls back to the heuristic.
        assert_eq!(c.choose("A100", &blast(), 1), Strategy::Partial);
        assert_eq!(c.choose("H100", &blast(), 2), Strategy::Partial);
        // A cached strategy that no longer applies (decode at T > 16) is ignored.
        c.insert("H100", &blast(), 64, Strategy::Decode);
        assert_eq!(c.choose("H100", &blast(), 64), Strategy::Partial);
    }

    #[test]
    fn save_load_round_trip_and_missing_file_is_empty() {
        let dir = std::env::temp_dir().join(format!("blr-autotune-test-{}", std::process::id()));
        let path = dir.join("sub").join("autotune.tsv");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            AutotuneCache::load(&path).expect("missing file is fine"),
            AutotuneCache::default()
        );
        let mut c = AutotuneCache::default();
        c.insert("H100", &blast(), 16, Strategy::Unfused);
        c.save(&path).expect("save");
        assert_eq!(AutotuneCache::load(&path).expect("load"), c);
        std::fs::write(&path, "key-without-tab partial\n").expect("write");
        let err = AutotuneCache::load(&path)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
