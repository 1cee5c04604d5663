#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos_repo::fuzzing::meta(data));
