//! Arbitrary bytes as a GGUF file: parse, dequantise every tensor, build the tokenizer.
#![no_main]

use blr_models::gguf::GgufFile;
use blr_models::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) {
        let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
        for n in &names {
            let _ = f.tensor_f32(n);
        }
        let _ = Tokenizer::from_gguf(&f);
    }
});
