//! Malformed and hostile GGUF input: each case must give a clear error naming the file and the
//! field, key or tensor concerned, never a panic or a huge allocation.

mod common;

use std::borrow::Cow;

use quarry_format::gguf::{GgufWriter, MAX_ARRAY_NESTING};
use quarry_format::{FormatError, GgmlType, GgufFile, Value, ValueType};

const NAME: &str = "hostile.gguf";

/// Raw little-endian GGUF bytes, for building files the writer refuses to produce.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    /// Magic, version and counts.
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        Raw::default()
            .bytes(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(self, v: u8) -> Raw {
        self.bytes(&[v])
    }
    fn u32(self, v: u32) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    fn str(self, s: &[u8]) -> Raw {
        self.u64(s.len() as u64).bytes(s)
    }
    /// A key followed by a value type id (the value is up to the caller).
    fn key(self, key: &str, ty: ValueType) -> Raw {
        self.str(key.as_bytes()).u32(ty.id())
    }
    fn kv_u32(self, key: &str, v: u32) -> Raw {
        self.key(key, ValueType::U32).u32(v)
    }
    fn tensor(self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Raw {
        let mut r = self.str(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(type_id).u64(offset)
    }
    /// Zero padding to a multiple of `alignment`, then `n` data bytes.
    fn data(self, alignment: usize, n: usize) -> Raw {
        let pad = self.0.len().next_multiple_of(alignment) - self.0.len();
        self.bytes(&vec![0; pad]).bytes(&vec![0xAB; n])
    }
    fn parse(self) -> Result<GgufFile, FormatError> {
        GgufFile::from_bytes(self.0, NAME)
    }
}

/// Parses, expects an error, checks it is one line naming the file and containing `needles`.
fn expect_err(raw: Raw, needles: &[&str]) -> FormatError {
    let err = raw.parse().expect_err("hostile input was accepted");
    check_message(&err, needles);
    err
}

fn check_message(err: &FormatError, needles: &[&str]) {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "message is not one line: {msg}");
    assert!(
        msg.starts_with(err.file()),
        "message does not start with the file: {msg}"
    );
    for needle in needles {
        assert!(
            msg.contains(needle),
            "message {msg:?} does not mention {needle:?}"
        );
    }
}

/// A one-tensor file with the given tensor entry and `data` bytes in the data section.
fn one_tensor(dims: &[u64], type_id: u32, offset: u64, data: usize) -> Raw {
    Raw::header(3, 1, 0)
        .tensor("w", dims, type_id, offset)
        .data(32, data)
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = common::sample_file();
    assert!(GgufFile::from_bytes(bytes.clone(), NAME).is_ok());
    for len in 0..bytes.len() {
        match GgufFile::from_bytes(bytes[..len].to_vec(), NAME) {
            Ok(_) => panic!("prefix of {len} of {} bytes was accepted", bytes.len()),
            Err(e) => check_message(&e, &[NAME]),
        }
    }
}

#[test]
fn truncation_messages_name_field_and_offset() {
    let bytes = common::sample_file();
    let err = GgufFile::from_bytes(bytes[..10].to_vec(), NAME).unwrap_err();
    check_message(&err, &["truncated", "header tensor count", "offset 8"]);
    let err = GgufFile::from_bytes(bytes[..30].to_vec(), NAME).unwrap_err();
    check_message(&err, &["header metadata count"]);
    let empty = expect_err(
        Raw::default(),
        &["header magic", "needs 4 bytes, only 0 remain"],
    );
    assert!(matches!(empty, FormatError::Truncated { .. }));
}

#[test]
fn bad_magic() {
    let err = expect_err(Raw::default().bytes(b"GGML").u32(3), &["not a GGUF file"]);
    assert!(matches!(err, FormatError::BadMagic { found, .. } if &found == b"GGML"));
}

#[test]
fn versions_2_and_3_are_accepted_others_are_not() {
    for version in [2, 3] {
        let file = Raw::header(version, 0, 1).kv_u32("a", 1).parse().unwrap();
        assert_eq!(file.version(), version);
    }
    // 1 had u32 counts; 0x03000000 is a big-endian version 3.
    for version in [0, 1, 4, 0x0300_0000, u32::MAX] {
        let err = expect_err(
            Raw::header(version, 0, 0),
            &["unsupported GGUF version", &version.to_string()],
        );
        assert!(matches!(err, FormatError::UnsupportedVersion { version: v, .. } if v == version));
    }
}

#[test]
fn counts_larger_than_the_file_are_rejected_before_allocating() {
    for n in [2, 1 << 40, u64::MAX] {
        let err = expect_err(
            Raw::header(3, 0, n).kv_u32("a", 1),
            &["header metadata count", &n.to_string()],
        );
        assert!(matches!(err, FormatError::CountTooLarge { .. }));
        let err = expect_err(
            Raw::header(3, n, 0).tensor("w", &[1], 0, 0).data(32, 4),
            &["header tensor count"],
        );
        assert!(matches!(err, FormatError::CountTooLarge { .. }));
    }
}

#[test]
fn array_lengths_larger_than_the_file_are_rejected_before_allocating() {
    // u64 elements take 8 bytes each: 3 of them cannot fit in 16 bytes.
    let raw = Raw::header(3, 0, 1)
        .key("tokens", ValueType::Array)
        .u32(ValueType::U64.id())
        .u64(3)
        .u64(1)
        .u64(2);
    let err = expect_err(
        raw,
        &[
            "value of metadata key 'tokens'",
            "3 entries of at least 8 bytes",
        ],
    );
    assert!(matches!(err, FormatError::CountTooLarge { .. }));
    // count * element size overflows u64.
    for elem in [
        ValueType::U8,
        ValueType::String,
        ValueType::Array,
        ValueType::F64,
    ] {
        let raw = Raw::header(3, 0, 1)
            .key("tokens", ValueType::Array)
            .u32(elem.id())
            .u64(u64::MAX);
        let err = expect_err(raw, &["'tokens'"]);
        assert!(matches!(err, FormatError::CountTooLarge { .. }), "{err}");
    }
}

#[test]
fn string_lengths_larger_than_the_file_are_rejected() {
    for len in [100, u64::MAX] {
        let raw = Raw::header(3, 0, 1)
            .key("name", ValueType::String)
            .u64(len)
            .bytes(b"abc");
        let err = expect_err(raw, &["truncated", "value of metadata key 'name'"]);
        assert!(matches!(err, FormatError::Truncated { needed, .. } if needed == len));
        let raw = Raw::header(3, 0, 1).u64(len).bytes(b"key + value");
        expect_err(raw, &["key of metadata entry #0"]);
        // Enough bytes follow for one table entry, just not for this name.
        let raw = Raw::header(3, 1, 0).u64(len).bytes(&[b'w'; 40]);
        expect_err(raw, &["name of tensor #0"]);
    }
}

/// A metadata entry whose value is `levels` arrays nested in one another, the innermost empty.
fn nested(levels: usize) -> Raw {
    let mut raw = Raw::header(3, 0, 1).key("deep", ValueType::Array);
    for _ in 1..levels {
        raw = raw.u32(ValueType::Array.id()).u64(1);
    }
    raw.u32(ValueType::U8.id()).u64(0)
}

#[test]
fn nested_arrays_are_limited_in_depth() {
    let file = nested(MAX_ARRAY_NESTING).parse().unwrap();
    let mut v = file.get("deep").unwrap();
    let mut levels = 0;
    while let Value::Array(_, items) = v {
        levels += 1;
        match items.first() {
            Some(inner) => v = inner,
            None => break,
        }
    }
    assert_eq!(levels, MAX_ARRAY_NESTING);
    let err = expect_err(
        nested(MAX_ARRAY_NESTING + 1),
        &["'deep'", "nested more than 16"],
    );
    assert!(matches!(err, FormatError::NestingTooDeep { .. }));
    // Far deeper than any stack could recurse: still a clean error.
    expect_err(nested(1_000_000), &["nested more than 16"]);
}

#[test]
fn unknown_value_types_are_rejected() {
    let raw = Raw::header(3, 0, 1).str(b"odd").u32(13).u32(0);
    let err = expect_err(raw, &["'odd'", "unknown metadata value type 13"]);
    assert!(matches!(err, FormatError::UnknownValueType { id: 13, .. }));
    let raw = Raw::header(3, 0, 1)
        .key("odd", ValueType::Array)
        .u32(u32::MAX)
        .u64(0);
    expect_err(
        raw,
        &[
            "'odd'",
            &format!("unknown metadata value type {}", u32::MAX),
        ],
    );
}

#[test]
fn invalid_bools_are_rejected() {
    let raw = Raw::header(3, 0, 1).key("flag", ValueType::Bool).u8(2);
    let err = expect_err(raw, &["'flag'", "byte 2"]);
    assert!(matches!(err, FormatError::InvalidBool { byte: 2, .. }));
}

#[test]
fn non_utf8_strings_are_rejected_naming_the_key() {
    let bad = b"a\xffb";
    let raw = Raw::header(3, 0, 1)
        .key("general.name", ValueType::String)
        .str(bad);
    let err = expect_err(raw, &["'general.name'", "not valid UTF-8"]);
    assert!(matches!(err, FormatError::InvalidUtf8 { offset, .. } if offset > 0));
    let raw = Raw::header(3, 0, 1)
        .key("tokenizer.ggml.tokens", ValueType::Array)
        .u32(ValueType::String.id())
        .u64(2)
        .str(b"ok")
        .str(bad);
    expect_err(raw, &["'tokenizer.ggml.tokens'", "not valid UTF-8"]);
    let raw = Raw::header(3, 0, 1).str(bad).u32(ValueType::U8.id()).u8(0);
    expect_err(raw, &["key of metadata entry #0", "not valid UTF-8"]);
    let raw = Raw::header(3, 1, 0).str(bad).bytes(&[0; 40]);
    expect_err(raw, &["name of tensor #0", "not valid UTF-8"]);
}

#[test]
fn duplicate_metadata_keys_are_rejected() {
    let raw = Raw::header(3, 0, 2).kv_u32("a.b", 1).kv_u32("a.b", 2);
    let err = expect_err(raw, &["duplicate metadata key 'a.b'"]);
    assert!(matches!(err, FormatError::DuplicateKey { .. }));
}

#[test]
fn bad_alignment_is_rejected() {
    for (value, found) in [(0, "u32 0"), (48, "u32 48"), (3, "u32 3")] {
        let raw = Raw::header(3, 0, 1).kv_u32("general.alignment", value);
        let err = expect_err(raw, &["general.alignment", found]);
        assert!(matches!(err, FormatError::BadAlignment { .. }));
    }
    let raw = Raw::header(3, 0, 1)
        .key("general.alignment", ValueType::U64)
        .u64(32);
    expect_err(raw, &["general.alignment", "u64 32"]);
    let raw = Raw::header(3, 0, 1)
        .key("general.alignment", ValueType::String)
        .str(b"32");
    expect_err(raw, &["general.alignment", "string"]);
}

#[test]
fn custom_alignment_is_honoured() {
    let raw = Raw::header(3, 2, 1)
        .kv_u32("general.alignment", 8)
        .tensor("a", &[2], 0, 0)
        .tensor("b", &[2], 0, 8)
        .data(8, 16);
    let file = raw.parse().unwrap();
    assert_eq!(file.alignment(), 8);
    assert_eq!(file.data_offset() % 8, 0);
    assert_eq!(file.tensor("b").unwrap().data, &[0xAB; 8]);
    // Offset 8 is misaligned under the default of 32.
    let raw = Raw::header(3, 2, 0)
        .tensor("a", &[2], 0, 0)
        .tensor("b", &[2], 0, 8)
        .data(32, 16);
    expect_err(raw, &["tensor 'b' offset 8", "alignment 32"]);
}

#[test]
fn tensor_data_out_of_bounds_is_rejected() {
    // 4 f32 need 16 bytes; 15 are present.
    let err = expect_err(
        one_tensor(&[4], 0, 0, 15),
        &["tensor 'w'", "16 bytes", "15-byte data section"],
    );
    assert!(matches!(err, FormatError::TensorOutOfBounds { .. }));
    expect_err(
        one_tensor(&[4], 0, 32, 40),
        &["tensor 'w'", "data offset 32"],
    );
    expect_err(one_tensor(&[4], 0, u64::MAX - 31, 40), &["tensor 'w'"]);
    // The table ends mid-padding: the data section would start past the end of the file.
    let mut raw = one_tensor(&[4], 0, 0, 0);
    raw.0.pop();
    expect_err(raw, &["tensor 'w'", "0-byte data section"]);
}

#[test]
fn overlapping_tensors_are_rejected() {
    let raw = Raw::header(3, 2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[16], 0, 32)
        .data(32, 128);
    let err = expect_err(raw, &["'a'", "'b'", "overlap"]);
    assert!(matches!(err, FormatError::OverlappingTensors { .. }));
    let raw = Raw::header(3, 2, 0)
        .tensor("a", &[1], 0, 0)
        .tensor("b", &[1], 0, 0)
        .data(32, 4);
    expect_err(raw, &["overlap"]);
}

#[test]
fn misaligned_tensor_offsets_are_rejected() {
    let err = expect_err(
        one_tensor(&[4], 0, 4, 64),
        &["tensor 'w' offset 4", "alignment 32"],
    );
    assert!(matches!(
        err,
        FormatError::MisalignedTensor {
            offset: 4,
            alignment: 32,
            ..
        }
    ));
}

#[test]
fn unknown_ggml_types_name_tensor_and_id() {
    for id in [4, 5, 31, u32::MAX] {
        let err = expect_err(
            one_tensor(&[4], id, 0, 64),
            &["tensor 'w'", &format!("ggml type id {id}")],
        );
        assert!(matches!(err, FormatError::UnknownGgmlType { id: i, .. } if i == id));
    }
}

#[test]
fn dimension_counts_outside_1_to_4_are_rejected() {
    for n_dims in [0u32, 5, u32::MAX] {
        let raw = Raw::header(3, 1, 0).str(b"w").u32(n_dims).bytes(&[0; 64]);
        let err = expect_err(raw, &["tensor 'w'", &format!("{n_dims} dimensions")]);
        assert!(matches!(err, FormatError::BadDimCount { .. }));
    }
}

#[test]
fn zero_dimensions_are_rejected() {
    let err = expect_err(
        one_tensor(&[4, 0], 0, 0, 64),
        &["tensor 'w'", "zero dimension"],
    );
    assert!(matches!(err, FormatError::ZeroDim { .. }));
}

#[test]
fn overflowing_sizes_are_rejected() {
    // The element count overflows u64.
    let err = expect_err(
        one_tensor(&[1 << 32, 1 << 32], 0, 0, 64),
        &["tensor 'w'", "overflows"],
    );
    assert!(matches!(err, FormatError::SizeOverflow { .. }));
    // The count fits, the byte size (x4 for f32) does not.
    expect_err(
        one_tensor(&[1 << 62, 2], 0, 0, 64),
        &["tensor 'w'", "F32", "overflows"],
    );
    expect_err(one_tensor(&[u64::MAX], 0, 0, 64), &["overflows"]);
}

#[test]
fn rows_must_be_whole_blocks() {
    // 48 Q4_0 values in one row are 1.5 blocks, although the 96 values in total are 3.
    let err = expect_err(
        one_tensor(&[48, 2], GgmlType::Q4_0.id(), 0, 64),
        &["tensor 'w'", "row length 48", "Q4_0 block size 32"],
    );
    assert!(matches!(err, FormatError::RowNotBlockMultiple { .. }));
}

#[test]
fn duplicate_tensor_names_are_rejected() {
    let raw = Raw::header(3, 2, 0)
        .tensor("w", &[1], 0, 0)
        .tensor("w", &[1], 0, 32)
        .data(32, 64);
    let err = expect_err(raw, &["duplicate tensor name 'w'"]);
    assert!(matches!(err, FormatError::DuplicateTensor { .. }));
}

#[test]
fn a_file_without_tensors_may_end_after_its_metadata() {
    let file = Raw::header(3, 0, 1).kv_u32("a", 7).parse().unwrap();
    assert_eq!(file.get_u32("a").unwrap(), 7);
    assert!(file.tensors().is_empty());
}

#[test]
fn getters_name_the_key_and_the_file() {
    let raw = Raw::header(3, 0, 3)
        .kv_u32("n", 7)
        .key("big", ValueType::U64)
        .u64(1 << 40)
        .key("s", ValueType::String)
        .str(b"text");
    let file = raw.parse().unwrap();
    assert_eq!(file.source(), NAME);
    assert_eq!(file.get_u64("big").unwrap(), 1 << 40);
    assert_eq!(file.get_f32("n").unwrap(), 7.0);
    let err = file.get_u32("missing").unwrap_err();
    check_message(&err, &[NAME, "'missing'", "missing"]);
    assert!(matches!(err, FormatError::MissingKey { .. }));
    check_message(
        &file.get_u32("big").unwrap_err(),
        &["'big'", "u32 range", "u64 1099511627776"],
    );
    check_message(
        &file.get_str("n").unwrap_err(),
        &["'n'", "a string", "u32 7"],
    );
    check_message(
        &file.get_bool("s").unwrap_err(),
        &["'s'", "a bool", "string of 4 bytes"],
    );
    check_message(&file.get_array("n").unwrap_err(), &["'n'", "an array"]);
    check_message(&file.get_f32("s").unwrap_err(), &["'s'", "a number"]);
    check_message(
        &file.architecture().unwrap_err(),
        &["'general.architecture'"],
    );
}

#[test]
fn missing_tensors_name_tensor_and_file() {
    let file = GgufFile::from_bytes(common::sample_file(), NAME).unwrap();
    let err = file.tensor("nope").unwrap_err();
    check_message(&err, &[NAME, "no tensor named 'nope'"]);
}

#[test]
fn open_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    check_message(&err, &["absent.gguf", "cannot open"]);
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let err = GgufFile::open(&empty).unwrap_err();
    check_message(&err, &["empty.gguf", "truncated"]);
}

#[test]
fn the_writer_refuses_what_the_reader_would_reject() {
    let mut w = GgufWriter::new();
    w.add_metadata("k", Value::U8(1)).unwrap();
    check_message(
        &w.add_metadata("k", Value::U8(2)).unwrap_err(),
        &["duplicate metadata key 'k'"],
    );
    let mixed = Value::Array(ValueType::U8, vec![Value::U8(1), Value::I8(1)]);
    check_message(
        &w.add_metadata("mixed", mixed).unwrap_err(),
        &["'mixed'", "array of u8 holds a i8"],
    );
    let mut deep = Value::Array(ValueType::U8, vec![]);
    for _ in 0..MAX_ARRAY_NESTING {
        deep = Value::Array(ValueType::Array, vec![deep]);
    }
    check_message(
        &w.add_metadata("deep", deep).unwrap_err(),
        &["'deep'", "nested more than 16"],
    );
    for bad in [0, 3, 48, 1 << 32] {
        check_message(
            &w.set_alignment(bad).unwrap_err(),
            &["general.alignment", &bad.to_string()],
        );
    }
    check_message(
        &w.add_metadata("general.alignment", Value::U64(64))
            .unwrap_err(),
        &["general.alignment", "u64 64"],
    );
    check_message(
        &w.add_metadata("general.alignment", Value::U32(12))
            .unwrap_err(),
        &["general.alignment", "u32 12"],
    );

    let f32s = |n: usize| Cow::Owned(vec![0u8; 4 * n]);
    w.add_tensor("t", &[2], GgmlType::F32, f32s(2)).unwrap();
    check_message(
        &w.add_tensor("t", &[2], GgmlType::F32, f32s(2)).unwrap_err(),
        &["duplicate tensor name 't'"],
    );
    check_message(
        &w.add_tensor("e", &[], GgmlType::F32, f32s(1)).unwrap_err(),
        &["'e'", "0 dimensions"],
    );
    check_message(
        &w.add_tensor("f", &[1; 5], GgmlType::F32, f32s(1))
            .unwrap_err(),
        &["'f'", "5 dimensions"],
    );
    check_message(
        &w.add_tensor("z", &[0], GgmlType::F32, f32s(0)).unwrap_err(),
        &["'z'", "zero dimension"],
    );
    check_message(
        &w.add_tensor("s", &[3], GgmlType::F32, f32s(2)).unwrap_err(),
        &["'s'", "needs 12 bytes of data, got 8"],
    );
    check_message(
        &w.add_tensor("q", &[16], GgmlType::Q8_0, Cow::Owned(vec![0; 17]))
            .unwrap_err(),
        &["'q'", "row length 16"],
    );
    check_message(
        &w.add_tensor("o", &[u64::MAX, 2], GgmlType::F32, f32s(1))
            .unwrap_err(),
        &["'o'", "overflows"],
    );
    // The refused calls left the writer usable and unchanged.
    let file = GgufFile::from_bytes(w.to_bytes(), NAME).unwrap();
    assert_eq!(file.metadata().len(), 1);
    assert_eq!(file.tensors().len(), 1);
}
