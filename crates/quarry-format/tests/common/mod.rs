//! A small GGUF file exercising every value type and several tensor types, shared by the tests
//! and by the fuzz-seed example.

use std::borrow::Cow;

use quarry_format::gguf::GgufWriter;
use quarry_format::{GgmlType, Value, ValueType};

/// Bytes of a valid file: every metadata value type (with a nested array), four tensors of
/// different types and ranks, and a non-default alignment so that padding is exercised.
pub fn sample_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set_alignment(64).unwrap();
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("test.u8", Value::U8(200)),
        ("test.i8", Value::I8(-100)),
        ("test.u16", Value::U16(60000)),
        ("test.i16", Value::I16(-30000)),
        ("test.u32", Value::U32(4_000_000_000)),
        ("test.i32", Value::I32(-2_000_000_000)),
        ("test.f32", Value::F32(1.5)),
        ("test.bool", Value::Bool(true)),
        ("test.u64", Value::U64(u64::MAX)),
        ("test.i64", Value::I64(i64::MIN)),
        ("test.f64", Value::F64(-0.25)),
        (
            "test.strings",
            Value::Array(
                ValueType::String,
                vec![Value::String("a".into()), Value::String("ü".into())],
            ),
        ),
        (
            "test.nested",
            Value::Array(
                ValueType::Array,
                vec![
                    Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(-2)]),
                    Value::Array(ValueType::Bool, vec![]),
                ],
            ),
        ),
    ];
    for (key, value) in metadata {
        w.add_metadata(key, value).unwrap();
    }
    let tensors: [(&str, &[u64], GgmlType); 4] = [
        ("f32", &[4, 2], GgmlType::F32),
        ("q4_0", &[32, 2], GgmlType::Q4_0),
        ("q8_0", &[64], GgmlType::Q8_0),
        ("f16", &[3, 1, 1, 2], GgmlType::F16),
    ];
    for (i, (name, dims, dtype)) in tensors.into_iter().enumerate() {
        let n = dtype.bytes_for(dims.iter().product()).unwrap() as usize;
        let data: Vec<u8> = (0..n).map(|j| (j * 7 + i) as u8).collect();
        w.add_tensor(name, dims, dtype, Cow::Owned(data)).unwrap();
    }
    w.to_bytes()
}
