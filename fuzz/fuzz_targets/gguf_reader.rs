//! Feeds arbitrary bytes to the GGUF reader. Any panic, abort, out-of-memory or timeout is a
//! bug: hostile files must only ever produce a `FormatError`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quarry_format::{GgufFile, Value};

/// Visits a value and everything nested in it through every accessor.
fn touch(value: &Value) -> u64 {
    let scalar = value.as_u64().unwrap_or(0)
        ^ value.as_i64().unwrap_or(0) as u64
        ^ u64::from(value.as_f32().unwrap_or(0.0).to_bits())
        ^ u64::from(value.as_bool().unwrap_or(false))
        ^ value.as_str().map_or(0, |s| s.len() as u64)
        ^ value.value_type().id() as u64;
    let nested: u64 = value
        .as_array()
        .unwrap_or(&[])
        .iter()
        .map(touch)
        .fold(0, u64::wrapping_add);
    scalar.wrapping_add(nested)
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else {
        return;
    };
    let mut sum = file.version() as u64 ^ file.alignment() ^ file.data_offset();
    for (key, value) in file.metadata() {
        sum = sum.wrapping_add(touch(value));
        // Typed getters on every key exercise the lookup and conversion paths.
        let _ = file.get_u32(key);
        let _ = file.get_f32(key);
        let _ = file.get_str(key);
    }
    let _ = file.architecture();
    for info in file.tensors() {
        let view = file
            .tensor(&info.name)
            .expect("every listed tensor has a view");
        assert_eq!(view.data.len() as u64, info.n_bytes);
        sum = sum.wrapping_add(view.data.iter().map(|&b| u64::from(b)).sum::<u64>());
        sum = sum.wrapping_add(info.n_elements());
    }
    std::hint::black_box(sum);
});
