//! Replays every input the fuzzers ever crashed on (fuzz/regressions/<target>/), through the
//! same calls the fuzz targets make. A fixed bug stays fixed.

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).ok()?,
            ))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn safetensors_regressions() {
    for (name, data) in inputs("safetensors") {
        if let Ok(st) = blr_core::safetensors::SafeTensors::from_bytes(&name, data) {
            let names: Vec<String> = st.names().map(str::to_string).collect();
            for n in &names {
                let _ = st.read_f32(n);
            }
            let _ = blr_core::checkpoint::Checkpoint::from_safetensors(&st);
        }
    }
}

#[test]
fn gguf_regressions() {
    for (name, data) in inputs("gguf") {
        if let Ok(f) = blr_models::gguf::GgufFile::from_bytes(&name, data) {
            let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
            for n in &names {
                let _ = f.tensor_f32(n);
            }
            let _ = blr_models::tokenizer::Tokenizer::from_gguf(&f);
        }
    }
}

/// The tokenizer inputs need the real SmolLM2 vocabulary; without the cached file this test
/// says so and checks nothing (CI fetches nothing 98 MB large).
#[test]
fn tokenizer_regressions() {
    let Ok(path) = blr_models::smollm2_path() else {
        println!("SKIP tokenizer_regressions: SmolLM2 not cached (scripts/fetch-smollm2.sh)");
        return;
    };
    let f = blr_models::gguf::GgufFile::open(&path).unwrap();
    let tok = blr_models::tokenizer::Tokenizer::from_gguf(&f).unwrap();
    let mut known = [false; 256];
    for id in 0..tok.vocab_size() as u32 {
        if let [b] = tok.token_bytes(id) {
            if !tok.is_special(id) {
                known[*b as usize] = true;
            }
        }
    }
    for (name, data) in inputs("tokenizer") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        let ids = tok
            .encode(text, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let kept: Vec<u8> = text.bytes().filter(|b| known[*b as usize]).collect();
        assert_eq!(
            tok.decode(&ids, false),
            String::from_utf8_lossy(&kept),
            "{name}"
        );
    }
}
