#![no_main]
//! custos.toml as `custos config check` reads it: parse, jobs and schedules (each next
//! slot found), the Object Lock section. The CLI is a binary crate: its settings module
//! is included as it is.
#[allow(dead_code)]
#[path = "../../crates/cli/src/settings.rs"]
mod settings;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = settings::check_text(text);
    }
});
