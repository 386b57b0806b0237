//! Feeds arbitrary bytes to the vindex manifest parser as `index.json`. Any panic, abort,
//! out-of-memory or timeout is a bug; a manifest that is accepted must keep the promises the
//! checks make, which are asserted here (they are what queries index with).

#![no_main]

use libfuzzer_sys::fuzz_target;
use quarry_vindex::check::parse_index;

fuzz_target!(|data: &[u8]| {
    let Ok(index) = parse_index(data, "fuzz.vindex") else {
        return;
    };
    let m = &index.model;
    for [first, last] in [
        index.bands.syntax,
        index.bands.knowledge,
        index.bands.output,
    ] {
        assert!(first <= last && last < m.n_layers, "band {first}-{last}");
    }
    assert!(m.norm_eps.is_finite() && m.norm_eps > 0.0);
    assert!(m.embed_scale.is_finite() && m.embed_scale > 0.0);
    assert!(index.top_k >= 1 && index.top_k <= m.vocab_size);
    for entry in &index.files {
        assert!(!entry.name.contains('/') && entry.name != ".." && !entry.name.is_empty());
        assert!(index.file(&entry.name).is_some());
    }
    // What a reader computes from an accepted manifest must not overflow or allocate wildly.
    let sizes: u64 = index
        .files
        .iter()
        .map(|f| f.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d)))
        .fold(0, u64::saturating_add);
    std::hint::black_box(sizes);
});
