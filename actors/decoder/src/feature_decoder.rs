//! Feature decoders (`VQDecoder`, `HighresVQDecoder`): owned by the tokenizer work.
