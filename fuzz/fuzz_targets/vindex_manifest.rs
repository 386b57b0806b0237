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
        // Plain names inside the directory: nothing that could lead outside it.
        let name = entry.name.as_str();
        assert!(!name.is_empty() && !name.contains('/') && !name.starts_with('.'), "{name:?}");
    }
});
