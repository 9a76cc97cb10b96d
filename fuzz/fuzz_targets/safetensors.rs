//! Arbitrary bytes as a safetensors file and as a blr checkpoint: the reader must return an
//! error or a value, never panic, never read out of bounds, never allocate without bound.
#![no_main]

use blr_core::checkpoint::Checkpoint;
use blr_core::safetensors::SafeTensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(st) = SafeTensors::from_bytes("fuzz.safetensors", data.to_vec()) {
        let names: Vec<String> = st.names().map(str::to_string).collect();
        for n in &names {
            let _ = st.read_f32(n);
        }
        let _ = Checkpoint::inspect(&st);
        let _ = Checkpoint::from_safetensors(&st);
    }
});
