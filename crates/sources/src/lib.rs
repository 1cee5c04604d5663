//! Backup sources: what is read, never how it is stored. Sources walk folder trees and run
//! commands; they do not chunk, encrypt or decide retention.

pub mod direct;
pub mod files;
pub mod postgres;
pub mod stream;
