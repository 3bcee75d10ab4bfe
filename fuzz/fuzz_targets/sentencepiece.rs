//! The SentencePiece model reader, then normalise / encode / decode.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sp) = lavit_llm::sentencepiece::SentencePiece::from_bytes(data) {
        let text = String::from_utf8_lossy(&data[data.len().saturating_sub(48)..]).into_owned();
        for t in [text.as_str(), "café au lait", "  a  b "] {
            let ids = sp.encode(t);
            let _ = sp.decode(&ids);
        }
    }
});
