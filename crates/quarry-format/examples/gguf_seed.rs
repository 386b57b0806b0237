//! Writes a small valid GGUF file, for seeding the fuzzer's corpus:
//!
//! ```text
//! cargo run -p quarry-format --example gguf_seed -- fuzz/corpus/gguf_reader/sample.gguf
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: gguf_seed OUTPUT.gguf");
        std::process::exit(2);
    };
    if let Err(e) = std::fs::write(&path, common::sample_file()) {
        eprintln!("cannot write {}: {e}", path.to_string_lossy());
        std::process::exit(1);
    }
}
