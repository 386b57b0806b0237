//! Writer/reader round trips (random metadata of all thirteen types, random tensors, random
//! alignments) and random corruption of a valid file, which must never panic.

mod common;

use std::borrow::Cow;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use quarry_format::gguf::GgufWriter;
use quarry_format::{GgmlType, GgufFile, Value, ValueType};

/// Equality that compares floats by their bits, so NaNs round-trip too.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(ta, xs), Value::Array(tb, ys)) => {
            ta == tb && xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same(x, y))
        }
        _ => a == b,
    }
}

fn scalar(ty: ValueType) -> BoxedStrategy<Value> {
    match ty {
        ValueType::U8 => any::<u8>().prop_map(Value::U8).boxed(),
        ValueType::I8 => any::<i8>().prop_map(Value::I8).boxed(),
        ValueType::U16 => any::<u16>().prop_map(Value::U16).boxed(),
        ValueType::I16 => any::<i16>().prop_map(Value::I16).boxed(),
        ValueType::U32 => any::<u32>().prop_map(Value::U32).boxed(),
        ValueType::I32 => any::<i32>().prop_map(Value::I32).boxed(),
        ValueType::F32 => any::<u32>()
            .prop_map(|b| Value::F32(f32::from_bits(b)))
            .boxed(),
        ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ValueType::String => "\\PC{0,12}".prop_map(Value::String).boxed(),
        ValueType::U64 => any::<u64>().prop_map(Value::U64).boxed(),
        ValueType::I64 => any::<i64>().prop_map(Value::I64).boxed(),
        ValueType::F64 => any::<u64>()
            .prop_map(|b| Value::F64(f64::from_bits(b)))
            .boxed(),
        // Arrays are built by `value`; an empty one stands in here.
        ValueType::Array => Just(Value::Array(ValueType::U8, vec![])).boxed(),
    }
}

fn scalar_type() -> impl Strategy<Value = ValueType> {
    proptest::sample::select(
        ValueType::ALL
            .into_iter()
            .filter(|t| *t != ValueType::Array)
            .collect::<Vec<_>>(),
    )
}

/// Any value: scalars, homogeneous arrays of scalars, and arrays of arrays.
fn value() -> impl Strategy<Value = Value> {
    scalar_type()
        .prop_flat_map(scalar)
        .prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                scalar_type()
                    .prop_flat_map(|t| vec(scalar(t), 0..6).prop_map(move |v| Value::Array(t, v))),
                vec(inner, 0..4).prop_map(|items| {
                    // Elements of an array of arrays must be arrays: wrap scalars.
                    let items = items
                        .into_iter()
                        .map(|v| match v {
                            a @ Value::Array(..) => a,
                            s => Value::Array(s.value_type(), vec![s]),
                        })
                        .collect();
                    Value::Array(ValueType::Array, items)
                }),
            ]
        })
}

/// A tensor's shape and type, with a seed for its bytes.
fn tensor() -> impl Strategy<Value = (Vec<u64>, GgmlType, u8)> {
    let dtype = proptest::sample::select(GgmlType::ALL.to_vec());
    (dtype, 1u64..3, vec(1u64..4, 0..4), any::<u8>()).prop_map(|(dtype, blocks, rest, seed)| {
        let mut dims = vec![blocks * dtype.block_size() as u64];
        dims.extend(rest.into_iter().take(3));
        (dims, dtype, seed)
    })
}

fn bytes_of(dims: &[u64], dtype: GgmlType, seed: u8) -> Vec<u8> {
    let n = dtype.bytes_for(dims.iter().product()).unwrap() as usize;
    (0..n)
        .map(|j| seed.wrapping_add((j * 31 % 251) as u8))
        .collect()
}

/// Reads every metadata value and every tensor byte of `file`.
fn touch_everything(file: &GgufFile) -> u64 {
    fn walk(v: &Value) -> u64 {
        match v.as_array() {
            Some(items) => items.iter().map(walk).sum(),
            None => v.as_u64().unwrap_or(1),
        }
    }
    let meta: u64 = file
        .metadata()
        .map(|(_, v)| walk(v))
        .fold(0, u64::wrapping_add);
    let data: u64 = file
        .tensors()
        .iter()
        .map(|t| {
            file.tensor(&t.name)
                .unwrap()
                .data
                .iter()
                .map(|&b| u64::from(b))
                .sum::<u64>()
        })
        .sum();
    meta.wrapping_add(data)
}

/// Runs `cases` cases, keeping failing seeds beside this file (the default location needs a
/// `lib.rs`, which integration tests lack).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/round_trip.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn written_files_read_back_identically(
        metadata in vec(("[a-z]{1,8}", value()), 0..8),
        tensors in vec(tensor(), 0..6),
        align_shift in 0u32..9,
    ) {
        let alignment = 1u64 << align_shift;
        let mut w = GgufWriter::new();
        w.set_alignment(alignment).unwrap();
        let mut expected = Vec::new();
        if alignment != 32 {
            expected.push(("general.alignment".to_owned(), Value::U32(alignment as u32)));
        }
        for (i, (suffix, value)) in metadata.into_iter().enumerate() {
            let key = format!("k{i}.{suffix}");
            w.add_metadata(key.clone(), value.clone()).unwrap();
            expected.push((key, value));
        }
        let mut datas = Vec::new();
        for (i, (dims, dtype, seed)) in tensors.iter().enumerate() {
            let data = bytes_of(dims, *dtype, *seed);
            w.add_tensor(format!("t{i}"), dims, *dtype, Cow::Owned(data.clone())).unwrap();
            datas.push(data);
        }

        let file = GgufFile::from_bytes(w.to_bytes(), "prop.gguf").unwrap();
        prop_assert_eq!(file.version(), 3);
        prop_assert_eq!(file.alignment(), alignment);
        prop_assert_eq!(file.data_offset() % alignment, 0);
        prop_assert_eq!(file.metadata().len(), expected.len());
        for ((k, v), (ek, ev)) in file.metadata().zip(&expected) {
            prop_assert_eq!(k, ek);
            prop_assert!(same(v, ev), "{k}: {v:?} != {ev:?}");
            prop_assert!(same(file.get(k).unwrap(), ev));
        }
        prop_assert_eq!(file.tensors().len(), tensors.len());
        for (i, ((dims, dtype, _), data)) in tensors.iter().zip(&datas).enumerate() {
            let info = &file.tensors()[i];
            prop_assert_eq!(&info.name, &format!("t{i}"));
            prop_assert_eq!(&info.dims, dims);
            prop_assert_eq!(info.dtype, *dtype);
            prop_assert_eq!(info.n_bytes, data.len() as u64);
            prop_assert_eq!(info.n_elements(), dims.iter().product::<u64>());
            prop_assert_eq!(info.offset % alignment, 0);
            let view = file.tensor(&info.name).unwrap();
            prop_assert_eq!(view.info, info);
            prop_assert_eq!(view.data, &data[..]);
        }
    }
}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn random_mutations_never_panic(
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = common::sample_file();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(file) = GgufFile::from_bytes(bytes, "mutated.gguf") {
            touch_everything(&file);
        }
    }
}

#[test]
fn the_sample_reads_back() {
    let file = GgufFile::from_bytes(common::sample_file(), "sample.gguf").unwrap();
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(file.get_u64("test.u64").unwrap(), u64::MAX);
    assert_eq!(file.get("test.i64").unwrap().as_i64(), Some(i64::MIN));
    assert_eq!(file.get_f32("test.f64").unwrap(), -0.25);
    assert!(file.get_bool("test.bool").unwrap());
    assert_eq!(
        file.get_array("test.strings").unwrap()[1].as_str(),
        Some("ü")
    );
    let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["f32", "q4_0", "q8_0", "f16"]);
    let q4 = file.tensor("q4_0").unwrap();
    assert_eq!(q4.info.dims, [32, 2]);
    assert_eq!(q4.data.len(), 2 * 18);
    assert!(touch_everything(&file) > 0);
}

#[test]
fn write_is_atomic_and_replaces_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.gguf");
    std::fs::write(&path, b"old contents").unwrap();
    let original = GgufFile::from_bytes(common::sample_file(), "sample.gguf").unwrap();

    let mut w = GgufWriter::new();
    for (k, v) in original.metadata() {
        w.add_metadata(k, v.clone()).unwrap();
    }
    for t in original.tensors() {
        let view = original.tensor(&t.name).unwrap();
        w.add_tensor(t.name.clone(), &t.dims, t.dtype, Cow::Borrowed(view.data))
            .unwrap();
    }
    w.write(&path).unwrap();

    assert_eq!(std::fs::read(&path).unwrap(), common::sample_file());
    let reread = GgufFile::open(&path).unwrap();
    assert_eq!(reread.source(), path.display().to_string());
    assert_eq!(
        reread.metadata().collect::<Vec<_>>(),
        original.metadata().collect::<Vec<_>>()
    );
    assert_eq!(reread.tensors(), original.tensors());
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "temporary files were left behind");

    let err = w.write(dir.path().join("missing/out.gguf")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("missing/out.gguf") && msg.contains("temporary file"),
        "{msg}"
    );
}

#[test]
fn an_empty_writer_writes_a_valid_file() {
    let file = GgufFile::from_bytes(GgufWriter::default().to_bytes(), "empty.gguf").unwrap();
    assert_eq!(file.metadata().len(), 0);
    assert!(file.tensors().is_empty());
    assert_eq!(file.alignment(), 32);
}

#[test]
fn files_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<GgufFile>();
}

/// Released pages read back unchanged (from the page cache); slices from elsewhere and files
/// held in memory are left alone.
#[test]
fn released_tensor_pages_read_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.gguf");
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut w = GgufWriter::new();
    w.add_tensor("t", &[16 * 1024], GgmlType::F32, Cow::Borrowed(&data))
        .unwrap();
    w.write(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let view = file.tensor("t").unwrap();
    assert_eq!(view.data, &data[..]);
    file.release(view.data);
    assert_eq!(view.data, &data[..]);
    file.release(&data);
    file.release(&view.data[..100]);
    assert_eq!(file.tensor("t").unwrap().data, &data[..]);

    let in_memory = GgufFile::from_bytes(std::fs::read(&path).unwrap(), "big.gguf").unwrap();
    let held = in_memory.tensor("t").unwrap().data;
    in_memory.release(held);
    assert_eq!(held, &data[..]);
}

/// `write_new` publishes a complete file, refuses an existing path without touching it (file
/// or dangling symlink alike), and leaves no temporary files either way.
#[test]
fn write_new_never_replaces_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let original = GgufFile::from_bytes(common::sample_file(), "sample.gguf").unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in original.metadata() {
        w.add_metadata(k, v.clone()).unwrap();
    }
    for t in original.tensors() {
        let view = original.tensor(&t.name).unwrap();
        w.add_tensor(t.name.clone(), &t.dims, t.dtype, Cow::Borrowed(view.data))
            .unwrap();
    }

    let fresh = dir.path().join("new.gguf");
    w.write_new(&fresh).unwrap();
    assert_eq!(std::fs::read(&fresh).unwrap(), common::sample_file());

    let taken = dir.path().join("taken.gguf");
    std::fs::write(&taken, b"keep me").unwrap();
    let err = w.write_new(&taken).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("taken.gguf") && msg.contains("already exists"),
        "{msg}"
    );
    assert!(
        matches!(&err, quarry_format::FormatError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists)
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");

    #[cfg(unix)]
    {
        let link = dir.path().join("dangling.gguf");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert!(w.write_new(&link).is_err());
        assert!(!dir.path().join("nowhere").exists());
    }

    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let expected: &[&str] = if cfg!(unix) {
        &["dangling.gguf", "new.gguf", "taken.gguf"]
    } else {
        &["new.gguf", "taken.gguf"]
    };
    assert_eq!(names, expected, "temporary files were left behind");
}

/// Long arrays (a vocabulary's size) are kept as offsets and decoded on demand: `get`,
/// `array_items` and `metadata` all give back what was written; one bad element among many
/// is still refused when the file is opened.
#[test]
fn long_arrays_read_back_on_demand_and_are_validated_at_open() {
    let n = 5000;
    let texts = Value::Array(
        ValueType::String,
        (0..n).map(|i| Value::String(format!("tok{i}"))).collect(),
    );
    let scores = Value::Array(
        ValueType::F32,
        (0..n).map(|i| Value::F32(i as f32)).collect(),
    );
    let mut w = GgufWriter::new();
    w.add_metadata("t", texts.clone()).unwrap();
    w.add_metadata("s", scores.clone()).unwrap();
    w.add_metadata("short", Value::U32(7)).unwrap();
    let bytes = w.to_bytes();
    let file = GgufFile::from_bytes(bytes.clone(), "long.gguf").unwrap();
    assert_eq!(file.array_items("t").unwrap().len(), n);
    assert_eq!(
        file.array_items("s").unwrap().collect::<Vec<_>>(),
        scores.as_array().unwrap()
    );
    assert_eq!(file.get("t"), Some(&texts));
    assert!(file
        .array_items("t")
        .unwrap()
        .eq(texts.as_array().unwrap().iter().cloned()));
    let listed: Vec<_> = file.metadata().map(|(k, _)| k.to_owned()).collect();
    assert_eq!(listed, ["t", "s", "short"]);
    assert!(file.array_items("short").is_err());
    assert!(file.array_items("missing").is_err());

    // "tok4321" → an invalid UTF-8 byte in its place.
    let at = bytes.windows(7).position(|w| w == b"tok4321").unwrap();
    let mut bad = bytes;
    bad[at + 3] = 0xFF;
    let err = GgufFile::from_bytes(bad, "bad.gguf").err().unwrap();
    assert!(
        matches!(err, quarry_format::FormatError::InvalidUtf8 { .. }),
        "{err}"
    );
}

/// Pages of the map of `path` this process has mapped in (`/proc/self/pagemap`'s present bit).
#[cfg(target_os = "linux")]
fn resident_pages(path: &std::path::Path) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = path.to_str().unwrap();
    let mut pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut resident = 0;
    for line in maps.lines().filter(|l| l.ends_with(name)) {
        let range = line.split_whitespace().next().unwrap();
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).unwrap() / 4096,
            usize::from_str_radix(hi, 16).unwrap() / 4096,
        );
        let mut entries = vec![0u8; (hi - lo) * 8];
        pagemap.seek(SeekFrom::Start(lo as u64 * 8)).unwrap();
        pagemap.read_exact(&mut entries).unwrap();
        resident += entries
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
            .count();
    }
    resident
}

/// Metadata is read once: after opening, and after a long array is streamed or decoded, its
/// pages leave the process (at most the two pages a run shares with its neighbours stay),
/// and every value still reads back as written.
#[cfg(target_os = "linux")]
#[test]
fn metadata_pages_are_let_go_once_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.gguf");
    let n = 50_000;
    let texts = Value::Array(
        ValueType::String,
        (0..n)
            .map(|i| Value::String(format!("token{i:08}")))
            .collect(),
    );
    let mut w = GgufWriter::new();
    w.add_metadata("t", texts.clone()).unwrap();
    w.write(&path).unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > 200 * 4096);

    let file = GgufFile::open(&path).unwrap();
    assert!(
        resident_pages(&path) <= 2,
        "{} pages after open",
        resident_pages(&path)
    );
    let mut items = file.array_items("t").unwrap();
    assert_eq!(items.by_ref().take(n / 2).count(), n / 2);
    assert!(resident_pages(&path) > 50, "the stream reads the file");
    drop(items);
    assert!(
        resident_pages(&path) <= 2,
        "{} pages after a stream",
        resident_pages(&path)
    );

    assert!(file
        .array_items("t")
        .unwrap()
        .eq(texts.as_array().unwrap().iter().cloned()));
    assert_eq!(file.get("t"), Some(&texts));
    assert!(
        resident_pages(&path) <= 2,
        "{} pages after get",
        resident_pages(&path)
    );
    assert_eq!(file.get("t"), Some(&texts));
}
