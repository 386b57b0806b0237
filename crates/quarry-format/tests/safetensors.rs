//! The checkpoint reader on real and hostile safetensors files: a fixture's tensors read back
//! as stored, and no mutation of its header or truncation of its data panics (each is a
//! `FormatError` or a checkpoint whose every tensor is in bounds).

use proptest::prelude::*;
use quarry_fixtures::workspace_root;
use quarry_format::safetensors::Checkpoint;
use quarry_format::GgmlType;

fn fixture() -> Vec<u8> {
    std::fs::read(workspace_root().join("fixtures/families/qwen2/model.safetensors")).unwrap()
}

#[test]
fn a_fixture_reads_back_as_stored() {
    let dir = workspace_root().join("fixtures/families/qwen2");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let t = checkpoint
        .tensor("model.layers.0.self_attn.k_proj.bias")
        .unwrap();
    assert_eq!(
        (t.shape, t.dtype, t.data.len()),
        (&[32usize][..], GgmlType::F32, 128)
    );
    assert_eq!(checkpoint.names().len(), 27);
    let err = checkpoint.tensor("model.nope").unwrap_err().to_string();
    assert!(err.contains("no tensor named 'model.nope'"), "{err}");
}

fn walk(bytes: Vec<u8>) {
    if let Ok(checkpoint) = Checkpoint::from_bytes(bytes, "hostile.safetensors") {
        for name in checkpoint.names() {
            if let Ok(t) = checkpoint.tensor(name) {
                let n: usize = t.shape.iter().product();
                assert_eq!(n * t.dtype.type_size(), t.data.len(), "{name}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn header_mutations_never_panic(edits in prop::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let mut bytes = fixture();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (at, value) in edits {
            let at = at % header;
            bytes[at] = value;
        }
        walk(bytes);
    }

    #[test]
    fn truncations_never_panic(keep in 0usize..2048) {
        let mut bytes = fixture();
        bytes.truncate(keep);
        walk(bytes);
    }
}
