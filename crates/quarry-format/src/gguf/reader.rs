//! Parsing a GGUF file into metadata, a tensor table and borrowed views of tensor data.
//!
//! The whole file is validated when it is opened (see the invariants in the parent module), so
//! queries afterwards only look things up. Reads go through [`Cursor`], which checks every
//! length against the bytes left and names the field being read when it fails.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use memmap2::{Mmap, UncheckedAdvice};

use crate::GgmlType;

use super::{
    align_up, tensor_size, FormatError, Value, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC,
    MAX_ARRAY_NESTING, MAX_DIMS,
};

/// Fewest bytes of one metadata entry: key length, value type and a one-byte value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Fewest bytes of one tensor-table entry: name length, dimension count, one dimension, type
/// and offset.
const MIN_TENSOR_SIZE: u64 = 8 + 4 + 8 + 4 + 8;

/// Most array elements reserved up front; longer arrays grow as they are read.
const MAX_PREALLOCATED_ELEMENTS: usize = 4096;

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the length of a contiguous row.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Offset of the first byte relative to the data section.
    pub offset: u64,
    /// Size of the tensor's data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (product of the dimensions). Saturates at `u64::MAX` for shapes that
    /// overflow, which no tensor read from a file has.
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .unwrap_or(u64::MAX)
    }
}

/// A tensor's description and its bytes, borrowed from the file without copying.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub data: &'a [u8],
}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The data can be hundreds of megabytes; show its size only.
        f.debug_struct("TensorView")
            .field("info", self.info)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// Where the file's bytes live.
enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(map) => map,
            Backing::Owned(bytes) => bytes,
        }
    }
}

/// Arrays at least this long (a vocabulary's tokens, scores and types, a BPE model's merges)
/// are validated when the file is opened but not kept decoded: a tokenizer reads them once,
/// through [`GgufFile::array_items`], into tables of its own, and as [`Value`]s Gemma 3's three
/// 262 144-entry arrays alone take ~33 MB.
const LONG_ARRAY: u64 = 4096;

/// A metadata value as the file keeps it.
enum Stored {
    Value(Value),
    /// A long array of scalars or strings, by where its value (element type, count, items)
    /// lies in the file; decoded, and kept, only if [`GgufFile::get`] asks for it.
    Long {
        bytes: Range<usize>,
        decoded: OnceLock<Option<Value>>,
    },
}

/// What [`GgufFile::metadata`] shows for a long array that no longer decodes: only possible
/// if the file was rewritten in place while open, which the map cannot guard against.
static UNREADABLE: Value = Value::Array(ValueType::U8, Vec::new());

/// The elements of one metadata array, in order ([`GgufFile::array_items`]).
pub struct ArrayItems<'f> {
    inner: Items<'f>,
}

enum Items<'f> {
    Decoded(std::slice::Iter<'f, Value>),
    Streamed {
        file: &'f GgufFile,
        /// The array's value in the file, whose pages are let go when the stream is dropped.
        bytes: Range<usize>,
        cursor: Cursor<'f>,
        key: &'f str,
        elem: ValueType,
        left: u64,
    },
}

impl Drop for ArrayItems<'_> {
    /// A long array is read once, by a caller building tables of its own: the pages it
    /// went through go again (they come back from the file if it is read a second time).
    fn drop(&mut self) {
        if let Items::Streamed { file, bytes, .. } = &self.inner {
            file.release(&file.backing.bytes()[bytes.clone()]);
        }
    }
}

impl Iterator for ArrayItems<'_> {
    type Item = Value;

    fn next(&mut self) -> Option<Value> {
        match &mut self.inner {
            Items::Decoded(items) => items.next().cloned(),
            Items::Streamed {
                cursor,
                key,
                elem,
                left,
                ..
            } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                // Validated at open; an error means the file changed under the map: stop.
                let item = cursor.value(*elem, Field::Value(key), 1);
                if item.is_err() {
                    *left = 0;
                }
                item.ok()
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.inner {
            Items::Decoded(items) => items.len(),
            Items::Streamed { left, .. } => *left as usize,
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for ArrayItems<'_> {}

/// An opened, fully validated GGUF file.
pub struct GgufFile {
    source: String,
    backing: Backing,
    version: u32,
    alignment: u64,
    metadata: Vec<(String, Stored)>,
    keys: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    names: HashMap<String, usize>,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("source", &self.source)
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, FormatError> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let io_err = |action, source_err| FormatError::Io {
            file: source.clone(),
            action,
            source: source_err,
        };
        let file = crate::input::open_regular(path).map_err(|e| io_err("open", e))?;
        let len = file.metadata().map_err(|e| io_err("stat", e))?.len();
        // Mapping zero bytes fails on some platforms; an empty file is simply truncated.
        let backing = if len == 0 {
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this value. Like every mmap-based
            // reader we rely on nobody truncating or rewriting the file while it is open;
            // GgufWriter never does (it replaces files by renaming a new one over them).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err("map", e))?;
            // Pages a model keeps reading (a Q6_K matrix's rows) sit between tensors whose
            // pages it lets go (`release`). Where the page cache holds the file in 2 MiB
            // folios, a read fault would map a whole folio back with those neighbours (Gemma
            // 3, Linux 6.18: 27 MB of them); without huge mappings a fault maps a few pages.
            // Failing to advise only costs that memory.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::NoHugePage);
            Backing::Mapped(map)
        };
        GgufFile::parse(source, backing)
    }

    /// Validates a file held in memory; `name` stands for the path in errors.
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<GgufFile, FormatError> {
        GgufFile::parse(name.to_owned(), Backing::Owned(bytes))
    }

    fn parse(source: String, backing: Backing) -> Result<GgufFile, FormatError> {
        // `Parsed::read` keeps only offsets of long arrays, so the bytes can move with `backing`.
        let parsed = Parsed::read(&source, backing.bytes())?;
        let file = GgufFile {
            source,
            backing,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            keys: parsed.keys,
            tensors: parsed.tensors,
            names: parsed.names,
            data_offset: parsed.data_offset,
        };
        // Validating went through every metadata value; what is kept decoded now lives on
        // the heap, and the long arrays are read again only by whoever streams them (a
        // tokenizer, once): the metadata's pages (6.5 MB for Gemma 3's vocabulary) can go.
        let bytes = file.backing.bytes();
        file.release(&bytes[..bytes.len().min(file.data_offset as usize)]);
        Ok(file)
    }

    /// The path or name the file was opened with, as used in error messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and of each tensor's offset.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata entries in file order (long arrays decoded, and kept, as they are met).
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> + '_ {
        self.metadata.iter().map(|(k, stored)| {
            let value = self.stored(k, stored);
            (k.as_str(), value.unwrap_or(&UNREADABLE))
        })
    }

    /// Whether the file has the key (without decoding its value).
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        let (k, stored) = self.metadata.get(*self.keys.get(key)?)?;
        self.stored(k, stored)
    }

    fn stored<'s>(&'s self, key: &str, stored: &'s Stored) -> Option<&'s Value> {
        match stored {
            Stored::Value(v) => Some(v),
            Stored::Long { bytes, decoded } => decoded
                .get_or_init(|| {
                    let mut cur = self.cursor(bytes.start);
                    let value = cur.value(ValueType::Array, Field::Value(key), 0).ok();
                    // Kept decoded from now on: the file's pages of it are not read again.
                    self.release(&self.backing.bytes()[bytes.clone()]);
                    value
                })
                .as_ref(),
        }
    }

    fn cursor(&self, pos: usize) -> Cursor<'_> {
        Cursor {
            file: &self.source,
            buf: self.backing.bytes(),
            pos,
        }
    }

    /// The elements of the array `key`, each decoded as it is reached (a long array is read
    /// from the file again, never kept): what a caller that builds tables of its own reads.
    pub fn array_items(&self, key: &str) -> Result<ArrayItems<'_>, FormatError> {
        let Some((k, stored)) = self.keys.get(key).and_then(|&i| self.metadata.get(i)) else {
            return Err(FormatError::MissingKey {
                file: self.source.clone(),
                key: key.to_owned(),
            });
        };
        match stored {
            Stored::Value(Value::Array(_, items)) => Ok(ArrayItems {
                inner: Items::Decoded(items.iter()),
            }),
            Stored::Value(other) => Err(FormatError::WrongType {
                file: self.source.clone(),
                key: key.to_owned(),
                expected: "an array",
                found: other.describe(),
            }),
            Stored::Long { bytes, .. } => {
                let mut cursor = self.cursor(bytes.start);
                let field = Field::Value(k);
                // Validated at open: the header reads again as it did then.
                let header = cursor
                    .value_type(field)
                    .and_then(|elem| Ok((elem, cursor.u64(field)?)));
                let (elem, count) = header.map_err(|_| FormatError::MissingKey {
                    file: self.source.clone(),
                    key: key.to_owned(),
                })?;
                Ok(ArrayItems {
                    inner: Items::Streamed {
                        file: self,
                        bytes: bytes.clone(),
                        cursor,
                        key: k,
                        elem,
                        left: count,
                    },
                })
            }
        }
    }

    /// The value of `key` converted by `convert`, or an error naming the key and the file.
    fn typed<'s, T>(
        &'s self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&'s Value) -> Option<T>,
    ) -> Result<T, FormatError> {
        let value = self.get(key).ok_or_else(|| FormatError::MissingKey {
            file: self.source.clone(),
            key: key.to_owned(),
        })?;
        convert(value).ok_or_else(|| FormatError::WrongType {
            file: self.source.clone(),
            key: key.to_owned(),
            expected,
            found: value.describe(),
        })
    }

    /// Any integer value that fits in a `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32, FormatError> {
        self.typed(key, "an integer in u32 range", |v| {
            v.as_u64().and_then(|n| u32::try_from(n).ok())
        })
    }

    /// Any non-negative integer value.
    pub fn get_u64(&self, key: &str) -> Result<u64, FormatError> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// Any numeric value, rounded to `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32, FormatError> {
        self.typed(key, "a number", Value::as_f32)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, FormatError> {
        self.typed(key, "a bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<&str, FormatError> {
        self.typed(key, "a string", Value::as_str)
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], FormatError> {
        self.typed(key, "an array", Value::as_array)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, FormatError> {
        self.get_str("general.architecture")
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name` with its data.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, FormatError> {
        let info = self
            .names
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .ok_or_else(|| FormatError::MissingTensor {
                file: self.source.clone(),
                tensor: name.to_owned(),
            })?;
        // Bounds were validated when opening; `get` keeps this path panic-free regardless.
        let data = self
            .data_offset
            .checked_add(info.offset)
            .and_then(|start| {
                Some((
                    usize::try_from(start).ok()?,
                    usize::try_from(info.n_bytes).ok()?,
                ))
            })
            .and_then(|(start, len)| self.backing.bytes().get(start..start.checked_add(len)?))
            .ok_or_else(|| FormatError::TensorOutOfBounds {
                file: self.source.clone(),
                tensor: info.name.clone(),
                offset: info.offset,
                n_bytes: info.n_bytes,
                data_len: self.data_len(),
            })?;
        Ok(TensorView { info, data })
    }

    /// Lets the pages holding `bytes` (a slice of this file's map, such as a tensor a model
    /// has copied into a layout of its own) leave this process's memory: they come back from
    /// the page cache, unchanged, if read again. Only whole pages inside `bytes` go; a file
    /// held in memory, or a slice from elsewhere, is left alone.
    pub fn release(&self, bytes: &[u8]) {
        const PAGE: usize = 4096;
        let Backing::Mapped(map) = &self.backing else {
            return;
        };
        let (base, start) = (map.as_ptr() as usize, bytes.as_ptr() as usize);
        if start < base || start + bytes.len() > base + map.len() {
            return;
        }
        let first = (start - base).next_multiple_of(PAGE);
        let end = (start - base + bytes.len()) / PAGE * PAGE;
        if end > first {
            // SAFETY: the map is read-only and backed by the file, so dropping its pages
            // loses nothing: any later read faults the same bytes back in from the file. A
            // failure (say, a larger page size) only means the pages stay.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, first, end - first)
            };
        }
    }

    /// Absolute offset of the data section (aligned). Past the end of the file only when the
    /// file has no tensors.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    fn data_len(&self) -> u64 {
        (self.backing.bytes().len() as u64).saturating_sub(self.data_offset)
    }
}

/// The field being read, for error messages. Kept as borrowed parts and formatted only when
/// an error occurs, because the hot path reads hundreds of thousands of vocabulary strings.
#[derive(Clone, Copy)]
enum Field<'k> {
    Header(&'static str),
    Key(u64),
    Value(&'k str),
    TensorName(u64),
    Tensor(&'k str, &'static str),
}

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Header(what) => write!(f, "header {what}"),
            Field::Key(i) => write!(f, "key of metadata entry #{i}"),
            Field::Value(key) => write!(f, "value of metadata key '{key}'"),
            Field::TensorName(i) => write!(f, "name of tensor #{i}"),
            Field::Tensor(name, what) => write!(f, "{what} of tensor '{name}'"),
        }
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'b> {
    file: &'b str,
    buf: &'b [u8],
    pos: usize,
}

impl<'b> Cursor<'b> {
    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, field: Field<'_>) -> Result<&'b [u8], FormatError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n));
        match end.and_then(|end| self.buf.get(self.pos..end)) {
            Some(bytes) => {
                self.pos += bytes.len();
                Ok(bytes)
            }
            None => Err(FormatError::Truncated {
                file: self.file.to_owned(),
                field: field.to_string(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, field: Field<'_>) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, field)?);
        Ok(out)
    }

    fn u32(&mut self, field: Field<'_>) -> Result<u32, FormatError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: Field<'_>) -> Result<u64, FormatError> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn string(&mut self, field: Field<'_>) -> Result<String, FormatError> {
        let len = self.u64(field)?;
        let start = self.pos as u64;
        let bytes = self.take(len, field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(FormatError::InvalidUtf8 {
                file: self.file.to_owned(),
                field: field.to_string(),
                offset: start,
            }),
        }
    }

    /// Checks that `count` entries of at least `min_size` bytes fit in the rest of the file, so
    /// that allocating `count` slots is bounded by the file's size.
    fn count(&self, count: u64, min_size: u64, field: Field<'_>) -> Result<usize, FormatError> {
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|n| n <= self.remaining());
        match usize::try_from(count) {
            Ok(n) if fits => Ok(n),
            _ => Err(FormatError::CountTooLarge {
                file: self.file.to_owned(),
                field: field.to_string(),
                count,
                min_size,
                available: self.remaining(),
            }),
        }
    }

    fn value_type(&mut self, field: Field<'_>) -> Result<ValueType, FormatError> {
        let id = self.u32(field)?;
        ValueType::from_id(id).ok_or_else(|| FormatError::UnknownValueType {
            file: self.file.to_owned(),
            field: field.to_string(),
            id,
        })
    }

    /// Reads a metadata entry's value of type `ty`: decoded, or, for a long array of scalars
    /// or strings, validated element by element (each dropped at once) and kept as its
    /// offset.
    fn stored(&mut self, ty: ValueType, field: Field<'_>) -> Result<Stored, FormatError> {
        let at = self.pos;
        if ty == ValueType::Array {
            let elem = self.value_type(field)?;
            let count = self.u64(field)?;
            if count >= LONG_ARRAY && elem != ValueType::Array {
                let n = self.count(count, elem.min_encoded_size(), field)?;
                for _ in 0..n {
                    self.value(elem, field, 1)?;
                }
                return Ok(Stored::Long {
                    bytes: at..self.pos,
                    decoded: OnceLock::new(),
                });
            }
            self.pos = at;
        }
        self.value(ty, field, 0).map(Stored::Value)
    }

    /// Reads one value of type `ty`; `depth` is the number of arrays enclosing it.
    fn value(
        &mut self,
        ty: ValueType,
        field: Field<'_>,
        depth: usize,
    ) -> Result<Value, FormatError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(field)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(field)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(field)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(field)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(field)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(field)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(field)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(field)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(field)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(field)?)),
            ValueType::Bool => {
                let offset = self.pos as u64;
                match self.array::<1>(field)? {
                    [0] => Value::Bool(false),
                    [1] => Value::Bool(true),
                    [byte] => {
                        return Err(FormatError::InvalidBool {
                            file: self.file.to_owned(),
                            field: field.to_string(),
                            offset,
                            byte,
                        })
                    }
                }
            }
            ValueType::String => Value::String(self.string(field)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(FormatError::NestingTooDeep {
                        file: self.file.to_owned(),
                        field: field.to_string(),
                        max: MAX_ARRAY_NESTING,
                    });
                }
                let elem = self.value_type(field)?;
                let count = self.u64(field)?;
                let n = self.count(count, elem.min_encoded_size(), field)?;
                // The count fits the rest of the file, but nested arrays each check against the
                // same remaining bytes; capping the reservation keeps memory proportional to
                // what is actually decoded.
                let mut items = Vec::with_capacity(n.min(MAX_PREALLOCATED_ELEMENTS));
                for _ in 0..n {
                    items.push(self.value(elem, field, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

/// Everything read from a file, before it is attached to its backing bytes.
struct Parsed {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, Stored)>,
    keys: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    names: HashMap<String, usize>,
    data_offset: u64,
}

impl Parsed {
    fn read(file: &str, buf: &[u8]) -> Result<Parsed, FormatError> {
        let mut cur = Cursor { file, buf, pos: 0 };

        let magic = cur.array::<4>(Field::Header("magic"))?;
        if magic != MAGIC {
            return Err(FormatError::BadMagic {
                file: file.to_owned(),
                found: magic,
            });
        }
        let version = cur.u32(Field::Header("version"))?;
        // Version 1 had u32 counts; 2 and 3 differ only in allowing big-endian files, which
        // announce themselves with a byte-swapped (hence unsupported) version number.
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion {
                file: file.to_owned(),
                version,
            });
        }
        let n_tensors = cur.u64(Field::Header("tensor count"))?;
        let n_kv = cur.u64(Field::Header("metadata count"))?;

        let n_kv = cur.count(n_kv, MIN_KV_SIZE, Field::Header("metadata count"))?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut keys = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = cur.string(Field::Key(i as u64))?;
            if keys.contains_key(&key) {
                return Err(FormatError::DuplicateKey {
                    file: file.to_owned(),
                    key,
                });
            }
            let ty = cur.value_type(Field::Value(&key))?;
            let stored = cur.stored(ty, Field::Value(&key))?;
            keys.insert(key.clone(), i);
            metadata.push((key, stored));
        }

        let alignment = match keys.get(ALIGNMENT_KEY).and_then(|&i| metadata.get(i)) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Stored::Value(Value::U32(a)))) if a.is_power_of_two() => u64::from(*a),
            Some((_, other)) => {
                return Err(FormatError::BadAlignment {
                    file: file.to_owned(),
                    found: match other {
                        Stored::Value(v) => v.describe(),
                        Stored::Long { .. } => "a long array".to_owned(),
                    },
                })
            }
        };

        let n_tensors = cur.count(n_tensors, MIN_TENSOR_SIZE, Field::Header("tensor count"))?;
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut names = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let info = read_tensor_info(&mut cur, i as u64, alignment)?;
            if names.contains_key(&info.name) {
                return Err(FormatError::DuplicateTensor {
                    file: file.to_owned(),
                    tensor: info.name,
                });
            }
            names.insert(info.name.clone(), i);
            tensors.push(info);
        }

        // An unrepresentable start only arises with no room for data, so it reads as "past the
        // end", which every tensor then fails.
        let data_offset = align_up(cur.pos as u64, alignment).unwrap_or(u64::MAX);
        let data_len = (buf.len() as u64).saturating_sub(data_offset);
        check_layout(file, &tensors, data_len)?;

        Ok(Parsed {
            version,
            alignment,
            metadata,
            keys,
            tensors,
            names,
            data_offset,
        })
    }
}

fn read_tensor_info(
    cur: &mut Cursor<'_>,
    index: u64,
    alignment: u64,
) -> Result<TensorInfo, FormatError> {
    let file = cur.file;
    let name = cur.string(Field::TensorName(index))?;
    let n_dims = cur.u32(Field::Tensor(&name, "dimension count"))?;
    // Checked before reading so a huge count allocates nothing.
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(FormatError::BadDimCount {
            file: file.to_owned(),
            tensor: name,
            n_dims: n_dims.into(),
        });
    }
    let mut dims = Vec::with_capacity(MAX_DIMS);
    for _ in 0..n_dims {
        dims.push(cur.u64(Field::Tensor(&name, "dimensions"))?);
    }
    let type_id = cur.u32(Field::Tensor(&name, "type"))?;
    let Some(dtype) = GgmlType::from_id(type_id) else {
        return Err(FormatError::UnknownGgmlType {
            file: file.to_owned(),
            tensor: name,
            id: type_id,
        });
    };
    let offset = cur.u64(Field::Tensor(&name, "offset"))?;
    let n_bytes = tensor_size(file, &name, &dims, dtype)?;
    if offset % alignment != 0 {
        return Err(FormatError::MisalignedTensor {
            file: file.to_owned(),
            tensor: name,
            offset,
            alignment,
        });
    }
    Ok(TensorInfo {
        name,
        dims,
        dtype,
        offset,
        n_bytes,
    })
}

/// Checks that every tensor lies inside the data section and that no two overlap.
fn check_layout(file: &str, tensors: &[TensorInfo], data_len: u64) -> Result<(), FormatError> {
    for t in tensors {
        if t.offset
            .checked_add(t.n_bytes)
            .is_none_or(|end| end > data_len)
        {
            return Err(FormatError::TensorOutOfBounds {
                file: file.to_owned(),
                tensor: t.name.clone(),
                offset: t.offset,
                n_bytes: t.n_bytes,
                data_len,
            });
        }
    }
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if let [a, b] = pair {
            // Both ends are within data_len, so the sum cannot overflow.
            if a.offset + a.n_bytes > b.offset {
                return Err(FormatError::OverlappingTensors {
                    file: file.to_owned(),
                    tensor: a.name.clone(),
                    other: b.name.clone(),
                });
            }
        }
    }
    Ok(())
}
