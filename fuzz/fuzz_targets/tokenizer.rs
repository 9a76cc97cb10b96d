//! Arbitrary text through the real SmolLM2 tokenizer: encoding never fails or panics, and
//! byte-level BPE is lossless except for the bytes the vocabulary has no token for (SmolLM2
//! lacks 21, e.g. 0x1d and the UTF-8 lead byte 0xf1), which are dropped as HF tokenizers and
//! llama.cpp drop them: decode(encode(text)) must equal the text's bytes without those, decoded
//! (lossily, since a dropped lead byte leaves stray continuation bytes).
#![no_main]

use blr_models::gguf::GgufFile;
use blr_models::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The tokenizer and, per byte, whether the vocabulary has a token for it alone.
fn tokenizer() -> &'static (Tokenizer, [bool; 256]) {
    static TOK: OnceLock<(Tokenizer, [bool; 256])> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = blr_models::smollm2_path()
            .unwrap_or_else(|e| panic!("the tokenizer target needs SmolLM2: {e}"));
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let tok = Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{e}"));
        let mut known = [false; 256];
        for id in 0..tok.vocab_size() as u32 {
            if let [b] = tok.token_bytes(id) {
                if !tok.is_special(id) {
                    known[*b as usize] = true;
                }
            }
        }
        (tok, known)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (tok, known) = tokenizer();
    let ids = tok.encode(text, false).unwrap_or_else(|e| panic!("encode failed on {text:?}: {e}"));
    let back = tok.decode(&ids, false);
    let kept: Vec<u8> = text.bytes().filter(|b| known[*b as usize]).collect();
    let expected = String::from_utf8_lossy(&kept);
    assert_eq!(back, expected, "round trip changed the text");
});
