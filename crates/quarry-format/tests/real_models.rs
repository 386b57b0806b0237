//! The two real test models: known facts, and read → write → read giving identical metadata
//! and tensor bytes.

use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use quarry_fixtures::{model_path, TestModel};
use quarry_format::gguf::GgufWriter;
use quarry_format::{GgmlType, GgufFile};

/// Rewrites `file` into a temporary directory and checks the copy matches it exactly.
fn round_trip(file: &GgufFile) {
    let mut w = GgufWriter::new();
    // general.alignment, if present, comes along as metadata and sets the writer's alignment.
    for (key, value) in file.metadata() {
        w.add_metadata(key, value.clone()).unwrap();
    }
    for t in file.tensors() {
        let view = file.tensor(&t.name).unwrap();
        w.add_tensor(t.name.clone(), &t.dims, t.dtype, Cow::Borrowed(view.data))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.gguf");
    w.write(&path).unwrap();

    // Both models were written with the same layout rules (tensors in table order, each at the
    // next aligned offset, no trailing padding), so the copy is byte for byte the original.
    assert!(
        same_contents(Path::new(file.source()), &path),
        "the copy differs from the original"
    );

    let copy = GgufFile::open(&path).unwrap();
    assert_eq!(copy.alignment(), file.alignment());
    assert_eq!(
        copy.metadata().collect::<Vec<_>>(),
        file.metadata().collect::<Vec<_>>(),
        "metadata differs after the round trip"
    );
    assert_eq!(copy.tensors().len(), file.tensors().len());
    for (a, b) in file.tensors().iter().zip(copy.tensors()) {
        assert_eq!(
            (&a.name, &a.dims, a.dtype, a.n_bytes),
            (&b.name, &b.dims, b.dtype, b.n_bytes)
        );
        assert!(
            file.tensor(&a.name).unwrap().data == copy.tensor(&b.name).unwrap().data,
            "data of tensor {} differs after the round trip",
            a.name
        );
    }
}

/// Compares two files a chunk at a time, without holding either in memory.
fn same_contents(a: &Path, b: &Path) -> bool {
    let (mut a, mut b) = (File::open(a).unwrap(), File::open(b).unwrap());
    if a.metadata().unwrap().len() != b.metadata().unwrap().len() {
        return false;
    }
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut x).unwrap();
        if n == 0 {
            return true;
        }
        b.read_exact(&mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            return false;
        }
    }
}

#[test]
fn gemma3() {
    let file = GgufFile::open(model_path(TestModel::Gemma3)).unwrap();
    assert_eq!(file.architecture().unwrap(), "gemma3");
    assert_eq!(file.tensors().len(), 236);
    assert_eq!(file.get_u32("gemma3.embedding_length").unwrap(), 640);
    let embd = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.info.dtype, GgmlType::Q8_0);
    assert_eq!(embd.info.dims, [640, 262144]);
    assert_eq!(embd.data.len() as u64, 640 * 262144 / 32 * 34);
    assert!(file.get_array("tokenizer.ggml.tokens").unwrap().len() >= 262144);
    round_trip(&file);
}

#[test]
fn smollm2() {
    let file = GgufFile::open(model_path(TestModel::SmolLm2)).unwrap();
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.tensors().len(), 272);
    let q4_1 = file
        .tensors()
        .iter()
        .filter(|t| t.dtype == GgmlType::Q4_1)
        .count();
    assert_eq!(q4_1, 210);
    round_trip(&file);
}
