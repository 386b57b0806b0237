//! Building GGUF version 3 files.
//!
//! [`GgufWriter`] validates every entry as it is added, with the reader's rules, so that
//! whatever it writes reads back identically. Tensors are laid out in the order added, each at
//! the next aligned offset; the file ends with the last tensor's last byte (no trailing padding),
//! which makes any truncation of a file with tensor data detectable.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::GgmlType;

use super::{
    align_up, tensor_size, FormatError, Value, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC,
    MAX_ARRAY_NESTING, WRITER_SOURCE,
};

/// The version this writer produces.
const VERSION: u32 = 3;

struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    dtype: GgmlType,
    data: Cow<'a, [u8]>,
    /// Offset relative to the data section, kept in step with the alignment.
    offset: u64,
}

/// Collects metadata and tensors, then writes them as one GGUF v3 file.
///
/// Tensor data may be borrowed (for instance from another [`GgufFile`](super::GgufFile)'s
/// views) to avoid copying it.
pub struct GgufWriter<'a> {
    alignment: u64,
    metadata: Vec<(String, Value)>,
    keys: HashMap<String, usize>,
    tensors: Vec<PendingTensor<'a>>,
    names: HashMap<String, usize>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl<'a> GgufWriter<'a> {
    /// An empty file with the default alignment (32).
    pub fn new() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashMap::new(),
            tensors: Vec::new(),
            names: HashMap::new(),
        }
    }

    /// Sets the data alignment, a power of two that fits in a `u32`. Recorded as
    /// `general.alignment` when it differs from the default or when that key already exists.
    pub fn set_alignment(&mut self, alignment: u64) -> Result<(), FormatError> {
        let value = u32::try_from(alignment)
            .ok()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| FormatError::BadAlignment {
                file: WRITER_SOURCE.to_owned(),
                found: format!("{alignment}"),
            })?;
        let offsets = layout(&self.tensors, alignment)?;
        for (t, offset) in self.tensors.iter_mut().zip(offsets) {
            t.offset = offset;
        }
        self.alignment = alignment;
        match self
            .keys
            .get(ALIGNMENT_KEY)
            .and_then(|&i| self.metadata.get_mut(i))
        {
            Some((_, v)) => *v = Value::U32(value),
            None if alignment != DEFAULT_ALIGNMENT => {
                self.push_metadata(ALIGNMENT_KEY.to_owned(), Value::U32(value));
            }
            None => {}
        }
        Ok(())
    }

    /// Adds a metadata entry. Arrays must be homogeneous and nest at most
    /// [`MAX_ARRAY_NESTING`] deep; `general.alignment` must be a power-of-two `u32` and also
    /// sets the alignment.
    pub fn add_metadata(
        &mut self,
        key: impl Into<String>,
        value: Value,
    ) -> Result<(), FormatError> {
        let key = key.into();
        if self.keys.contains_key(&key) {
            return Err(FormatError::DuplicateKey {
                file: WRITER_SOURCE.to_owned(),
                key,
            });
        }
        check_value(&key, &value, 0)?;
        if key == ALIGNMENT_KEY {
            match value {
                Value::U32(a) if a.is_power_of_two() => self.set_alignment(a.into())?,
                ref other => {
                    return Err(FormatError::BadAlignment {
                        file: WRITER_SOURCE.to_owned(),
                        found: other.describe(),
                    })
                }
            }
            // set_alignment may have recorded the key already when the value is not 32.
            if self.keys.contains_key(&key) {
                return Ok(());
            }
        }
        self.push_metadata(key, value);
        Ok(())
    }

    fn push_metadata(&mut self, key: String, value: Value) {
        self.keys.insert(key.clone(), self.metadata.len());
        self.metadata.push((key, value));
    }

    /// Adds a tensor; `data` must be exactly the bytes its shape and type call for.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        dtype: GgmlType,
        data: Cow<'a, [u8]>,
    ) -> Result<(), FormatError> {
        let name = name.into();
        if self.names.contains_key(&name) {
            return Err(FormatError::DuplicateTensor {
                file: WRITER_SOURCE.to_owned(),
                tensor: name,
            });
        }
        let n_bytes = tensor_size(WRITER_SOURCE, &name, dims, dtype)?;
        if data.len() as u64 != n_bytes {
            return Err(FormatError::DataSizeMismatch {
                file: WRITER_SOURCE.to_owned(),
                tensor: name,
                expected: n_bytes,
                found: data.len() as u64,
            });
        }
        let mut tensor = PendingTensor {
            name,
            dims: dims.to_vec(),
            dtype,
            data,
            offset: 0,
        };
        if let Some(last) = self.tensors.last() {
            tensor.offset = end_of(last)
                .and_then(|end| align_up(end, self.alignment))
                .ok_or_else(|| overflow(&tensor))?;
        }
        self.names.insert(tensor.name.clone(), self.tensors.len());
        self.tensors.push(tensor);
        Ok(())
    }

    /// The complete file in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.header();
        for (padding, data) in self.data_pieces() {
            out.resize(out.len() + padding, 0);
            out.extend_from_slice(data);
        }
        out
    }

    /// Writes the file to `path` atomically: into a temporary file in the same directory,
    /// synced, then renamed over `path`, so readers never see a partial file.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), FormatError> {
        self.write_via(path.as_ref(), |tmp, path| {
            fs::rename(tmp, path).map_err(|e| ("rename the temporary file into place", e))
        })
    }

    /// Like [`write`](Self::write), but never replaces an existing file: when `path` exists
    /// (or appears while the data is being written) nothing is changed there and the error's
    /// source has kind [`io::ErrorKind::AlreadyExists`]. The finished temporary file is
    /// published with a hard link, which the kernel refuses atomically when the name is
    /// taken (a check before a rename would leave a window in which another writer's file is
    /// replaced); the temporary name is then removed.
    pub fn write_new(&self, path: impl AsRef<Path>) -> Result<(), FormatError> {
        let path = path.as_ref();
        // Refused up front too, so an existing file costs no temporary copy of the data.
        if fs::symlink_metadata(path).is_ok() {
            return Err(FormatError::Io {
                file: path.display().to_string(),
                action: "create the file (it already exists and is never replaced)",
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        self.write_via(path, |tmp, path| {
            fs::hard_link(tmp, path).map_err(|e| {
                let action = if e.kind() == io::ErrorKind::AlreadyExists {
                    "create the file (it already exists and is never replaced)"
                } else {
                    "link the temporary file into place"
                };
                (action, e)
            })?;
            // The file is published under `path` by now, so this cannot fail the write: at
            // worst a second name of the same data is left beside it.
            let _ = fs::remove_file(tmp);
            Ok(())
        })
    }

    /// Writes a synced temporary file next to `path` and hands it to `publish`; the
    /// temporary file is removed when anything fails.
    fn write_via(
        &self,
        path: &Path,
        publish: impl FnOnce(&Path, &Path) -> Result<(), (&'static str, io::Error)>,
    ) -> Result<(), FormatError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let err = |action, source| FormatError::Io {
            file: path.display().to_string(),
            action,
            source,
        };
        let file_name = path.file_name().ok_or_else(|| {
            err(
                "write",
                io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
            )
        })?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut tmp_name = file_name.to_owned();
        tmp_name.push(format!(
            ".tmp.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);

        let result = self.write_synced(&tmp).and_then(|()| publish(&tmp, path));
        if let Err((action, source)) = result {
            // Best effort: the temporary file may not exist, and the original error matters more.
            let _ = fs::remove_file(&tmp);
            return Err(err(action, source));
        }
        // Make the rename itself durable. Best effort: not every platform can sync a directory.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn write_synced(&self, tmp: &Path) -> Result<(), (&'static str, io::Error)> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| ("create a temporary file", e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let write = |w: &mut BufWriter<File>| -> io::Result<()> {
            w.write_all(&self.header())?;
            for (padding, data) in self.data_pieces() {
                io::copy(&mut io::repeat(0).take(padding as u64), w)?;
                w.write_all(data)?;
            }
            w.flush()
        };
        write(&mut w).map_err(|e| ("write the temporary file", e))?;
        let file = w
            .into_inner()
            .map_err(|e| ("write the temporary file", e.into_error()))?;
        file.sync_all().map_err(|e| ("sync the temporary file", e))
    }

    /// Everything before the first tensor's data: header, metadata, tensor table and the
    /// padding that aligns the data section.
    fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut out, value);
        }
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.id().to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
        }
        // Without tensors there is no data section to align.
        if !self.tensors.is_empty() {
            let len = out.len() as u64;
            let padded = len.next_multiple_of(self.alignment);
            out.resize(out.len() + (padded - len) as usize, 0);
        }
        out
    }

    /// Each tensor's data with the zero padding that precedes it.
    fn data_pieces(&self) -> impl Iterator<Item = (usize, &[u8])> {
        let mut end = 0u64;
        self.tensors.iter().map(move |t| {
            // Offsets are increasing and were checked against overflow when assigned.
            let padding = (t.offset - end) as usize;
            end = t.offset + t.data.len() as u64;
            (padding, &t.data[..])
        })
    }
}

fn end_of(t: &PendingTensor<'_>) -> Option<u64> {
    t.offset.checked_add(t.data.len() as u64)
}

/// The error for a tensor whose offset in the data section would not fit in a `u64`.
fn overflow(t: &PendingTensor<'_>) -> FormatError {
    FormatError::SizeOverflow {
        file: WRITER_SOURCE.to_owned(),
        tensor: t.name.clone(),
        dims: t.dims.clone(),
        dtype: t.dtype,
    }
}

/// Offsets of `tensors` laid out in order at `alignment`.
fn layout(tensors: &[PendingTensor<'_>], alignment: u64) -> Result<Vec<u64>, FormatError> {
    let mut end = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        let offset = align_up(end, alignment).ok_or_else(|| overflow(t))?;
        end = offset
            .checked_add(t.data.len() as u64)
            .ok_or_else(|| overflow(t))?;
        offsets.push(offset);
    }
    Ok(offsets)
}

/// Checks that arrays are homogeneous and not nested too deep; `depth` counts enclosing arrays.
fn check_value(key: &str, value: &Value, depth: usize) -> Result<(), FormatError> {
    let Value::Array(elem, items) = value else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_NESTING {
        return Err(FormatError::NestingTooDeep {
            file: WRITER_SOURCE.to_owned(),
            field: format!("value of metadata key '{key}'"),
            max: MAX_ARRAY_NESTING,
        });
    }
    for item in items {
        if item.value_type() != *elem {
            return Err(FormatError::ArrayTypeMismatch {
                file: WRITER_SOURCE.to_owned(),
                key: key.to_owned(),
                expected: *elem,
                found: item.value_type(),
            });
        }
        check_value(key, item, depth + 1)?;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value without its type tag (the caller or the enclosing array wrote it).
fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_str(out, s),
        Value::Array(elem, items) => {
            out.extend_from_slice(&elem.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}
