//! Feeds arbitrary bytes to the `relations.json` parser (against a fixed, valid manifest) and,
//! in the same run, to the manifest parser, so both files' contents are covered together. An
//! accepted relation table is then walked the way SHOW RELATIONS, SHOW ENTITIES and DESCRIBE
//! walk it; any panic, abort, out-of-memory or timeout is a bug.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use quarry_vindex::check::{parse_index, parse_relations};
use quarry_vindex::Index;

fn manifest() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        parse_index(include_bytes!("../seeds/index.json"), "seed.vindex")
            .expect("the seed manifest is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let index = manifest();
    let m = &index.model;
    if let Ok(relations) = parse_relations(data, index, "fuzz.vindex") {
        let mut labels = 0usize;
        for e in &relations.edges {
            assert!(e.layer < m.n_layers && e.feature < m.ff_dim);
            assert!((e.input as usize) < m.vocab_size && (e.output as usize) < m.vocab_size);
            labels += relations.relations[e.relation].label.len();
        }
        for (i, r) in relations.relations.iter().enumerate() {
            assert_eq!(r.id, i);
            labels += r.examples.iter().map(String::len).sum::<usize>();
        }
        let [first, last] = relations.layers;
        assert!(first <= last && last < m.n_layers);
        std::hint::black_box(labels);
    }
    let _ = parse_index(data, "fuzz.vindex");
});
