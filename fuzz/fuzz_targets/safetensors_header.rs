//! Feeds arbitrary bytes to the safetensors checkpoint reader. Any panic, abort,
//! out-of-memory or timeout is a bug: a hostile header (offsets, shapes, dtypes that lie)
//! must only ever produce a `FormatError`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quarry_format::safetensors::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(checkpoint) = Checkpoint::from_bytes(data.to_vec(), "fuzz.safetensors") else {
        return;
    };
    let mut sum = 0u64;
    for name in checkpoint.names() {
        let Ok(tensor) = checkpoint.tensor(name) else {
            continue;
        };
        let elements: usize = tensor.shape.iter().product();
        assert_eq!(elements * tensor.dtype.type_size(), tensor.data.len());
        sum = sum.wrapping_add(tensor.data.iter().map(|&b| u64::from(b)).sum::<u64>());
    }
    std::hint::black_box(sum);
});
