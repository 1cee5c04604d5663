#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos_ops::fuzzing::copy_rows(data));
