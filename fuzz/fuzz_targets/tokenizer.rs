//! Arbitrary text through the real SmolLM2 tokenizer: encoding never panics, and byte-level
//! BPE is lossless, so decode(encode(text)) must give the text back exactly.
#![no_main]

use blr_models::gguf::GgufFile;
use blr_models::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = blr_models::smollm2_path()
            .unwrap_or_else(|e| panic!("the tokenizer target needs SmolLM2: {e}"));
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let tok = tokenizer();
    let ids = tok.encode(text, false).unwrap_or_else(|e| panic!("encode failed on {text:?}: {e}"));
    let back = tok.decode(&ids, false);
    assert_eq!(back, text, "round trip changed the text");
});
