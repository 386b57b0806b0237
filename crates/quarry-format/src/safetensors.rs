//! Hugging Face checkpoints: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` lists, memory-mapped and validated.
//!
//! The header of each file is parsed and checked by the `safetensors` crate (offsets contiguous
//! and inside the file, byte sizes equal to shape × dtype) before any tensor is handed out; the
//! index may only name plain file names beside it, and every tensor it maps must be in the shard
//! it names. Tensors are borrowed from the maps, row-major as stored (the last dimension
//! contiguous, GGUF's `dims[0]`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::input::{open_regular, read_text_capped};
use crate::{FormatError, GgmlType};

/// The single-file checkpoint's name.
pub const SINGLE: &str = "model.safetensors";
/// The shard index's name.
pub const INDEX: &str = "model.safetensors.index.json";
/// Most bytes of a shard index (real ones are well under 1 MiB).
const MAX_INDEX_BYTES: u64 = 16 << 20;

/// One tensor of a checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointTensor<'a> {
    /// Row-major shape, as stored.
    pub shape: &'a [usize],
    pub dtype: GgmlType,
    pub data: &'a [u8],
}

struct Entry {
    shard: usize,
    shape: Vec<usize>,
    dtype: Result<GgmlType, Dtype>,
    range: std::ops::Range<usize>,
}

/// Where a shard's bytes live: its memory map, or a buffer (fuzzing, tests).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Owned(bytes) => bytes,
        }
    }
}

/// A checkpoint's tensors over its memory-mapped files.
pub struct Checkpoint {
    source: String,
    shards: Vec<(PathBuf, Bytes)>,
    tensors: HashMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("source", &self.source)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens the checkpoint in directory `dir`: its shard index if there is one, otherwise
    /// `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Checkpoint, FormatError> {
        let source = dir.display().to_string();
        let index = dir.join(INDEX);
        let files: Vec<(String, Vec<String>)> = if index.exists() {
            shards_of(&index)?
        } else {
            vec![(SINGLE.to_string(), Vec::new())]
        };
        let mut checkpoint = Checkpoint {
            source,
            shards: Vec::new(),
            tensors: HashMap::new(),
        };
        for (name, expected) in files {
            let path = dir.join(&name);
            checkpoint.add_shard(&path)?;
            for tensor in expected {
                match checkpoint.tensors.get(&tensor) {
                    Some(e) if checkpoint.shards[e.shard].0 == path => {}
                    _ => {
                        return Err(bad(
                            &index,
                            format!("maps tensor '{tensor}' to {name}, which does not hold it"),
                        ))
                    }
                }
            }
        }
        Ok(checkpoint)
    }

    /// A single-file checkpoint held in memory; `name` stands for its path in errors.
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<Checkpoint, FormatError> {
        let mut checkpoint = Checkpoint {
            source: name.to_string(),
            shards: Vec::new(),
            tensors: HashMap::new(),
        };
        checkpoint.add(Path::new(name), Bytes::Owned(bytes))?;
        Ok(checkpoint)
    }

    fn add_shard(&mut self, path: &Path) -> Result<(), FormatError> {
        let file = path.display().to_string();
        let io = |action, source| FormatError::Io {
            file: file.clone(),
            action,
            source,
        };
        let handle = open_regular(path).map_err(|e| io("open", e))?;
        // SAFETY: read-only and private to this value; as for GGUF files, the checkpoint must
        // not be truncated or rewritten while it is open.
        let map = unsafe { Mmap::map(&handle) }.map_err(|e| io("map", e))?;
        self.add(path, Bytes::Mapped(map))
    }

    fn add(&mut self, path: &Path, map: Bytes) -> Result<(), FormatError> {
        let (header, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| bad(path, format!("not a valid safetensors file: {e}")))?;
        let start = 8 + header;
        let shard = self.shards.len();
        for (name, info) in metadata.tensors() {
            let (s, e) = info.data_offsets;
            let entry = Entry {
                shard,
                shape: info.shape.clone(),
                dtype: match info.dtype {
                    Dtype::F32 => Ok(GgmlType::F32),
                    Dtype::F16 => Ok(GgmlType::F16),
                    Dtype::BF16 => Ok(GgmlType::BF16),
                    other => Err(other),
                },
                range: start + s..start + e,
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(bad(
                    path,
                    format!("tensor '{name}' is also in another shard"),
                ));
            }
        }
        self.shards.push((path.to_path_buf(), map));
        Ok(())
    }

    /// The directory the checkpoint was opened from, as used in errors.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The names of every tensor, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Tensor `name`, which must be stored as `f32`, `f16` or `bf16`.
    pub fn tensor(&self, name: &str) -> Result<CheckpointTensor<'_>, FormatError> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| FormatError::MissingTensor {
                file: self.source.clone(),
                tensor: name.to_string(),
            })?;
        let (path, map) = &self.shards[entry.shard];
        let dtype = entry.dtype.map_err(|dtype| {
            bad(
                path,
                format!("tensor '{name}' is {dtype:?}; weights must be F32, F16 or BF16"),
            )
        })?;
        Ok(CheckpointTensor {
            shape: &entry.shape,
            dtype,
            data: &map[entry.range.clone()],
        })
    }
}

/// The shard files an index names, each with the tensors it should hold, in file order.
fn shards_of(index: &Path) -> Result<Vec<(String, Vec<String>)>, FormatError> {
    let text = read_text_capped(index, MAX_INDEX_BYTES, "a shard index").map_err(|source| {
        FormatError::Io {
            file: index.display().to_string(),
            action: "read",
            source,
        }
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad(index, "has no \"weight_map\" object".into()))?;
    let mut files: Vec<(String, Vec<String>)> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(index, format!("weight_map.{tensor} is not a file name")))?;
        // Shards sit beside the index: a path elsewhere is not one of them.
        if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(bad(
                index,
                format!("weight_map.{tensor} = \"{file}\" is not a file name beside the index"),
            ));
        }
        match files.iter_mut().find(|(f, _)| f == file) {
            Some((_, tensors)) => tensors.push(tensor.clone()),
            None => files.push((file.to_string(), vec![tensor.clone()])),
        }
    }
    if files.is_empty() {
        return Err(bad(index, "maps no tensors".into()));
    }
    Ok(files)
}

fn bad(path: &Path, problem: String) -> FormatError {
    FormatError::Checkpoint {
        file: path.display().to_string(),
        problem,
    }
}
