//! What a vindex directory contains: the `index.json` manifest and the names, element types
//! and shapes of its data files (documented for users in `docs/vindex.md`).
//!
//! Every data file is a flat little-endian array described by one [`FileEntry`]; a reader
//! trusts nothing in a file that its entry (size, shape, element type) does not vouch for.

use serde::{Deserialize, Serialize};

/// `format` field of every manifest.
pub const FORMAT: &str = "quarry-vindex";
/// Layout version this crate writes and reads. Bumped on any incompatible change.
pub const VERSION: u32 = 2;
/// The manifest's file name.
pub const INDEX: &str = "index.json";

/// Data files by role.
pub const TOKENIZER: &str = "tokenizer.gguf";
pub const EMBEDDINGS: &str = "embeddings.bin";
pub const GATE: &str = "gate.bin";
pub const UP: &str = "up.bin";
pub const NORMS: &str = "norms.bin";
pub const WRITES: &str = "writes.bin";
pub const FEATURE_STATS: &str = "feature_stats.bin";
pub const MODEL: &str = "model.gguf";
pub const DOWN: &str = "down.bin";
pub const RELATIONS: &str = "relations.json";
pub const ROUTER: &str = "router.bin";

/// How much of the model a vindex holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Enough to browse without running the model: tokenizer, embeddings, FFN gate and up
    /// vectors, the FFN input norms, and what each feature writes to the vocabulary.
    Browse,
    /// Browse plus the model's own weight file (quantized blocks kept as they are), so
    /// queries can run forward passes.
    Inference,
    /// Inference plus every feature's down (write) vector, which editing and compiling edits
    /// back into a model need.
    All,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Browse => "browse",
            Level::Inference => "inference",
            Level::All => "all",
        }
    }
}

/// Element type of the large float arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }
}

/// Element type of a data file, as recorded in its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Element {
    F16,
    F32,
    /// A feature's write record: `u32` token id then `f32` logit.
    TokenLogit,
    /// An opaque file with its own format (the GGUF files).
    Bytes,
}

impl Element {
    pub fn size(self) -> usize {
        match self {
            Element::Bytes => 1,
            Element::F16 => 2,
            Element::F32 => 4,
            Element::TokenLogit => 8,
        }
    }
}

impl From<Dtype> for Element {
    fn from(d: Dtype) -> Element {
        match d {
            Dtype::F16 => Element::F16,
            Dtype::F32 => Element::F32,
        }
    }
}

/// One data file: its size, digest and, for arrays, element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
    pub element: Element,
    /// Array dimensions, outermost first; empty for opaque files.
    pub shape: Vec<u64>,
}

/// The model facts queries need, copied from the source's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub ff_dim: usize,
    pub vocab_size: usize,
    /// `"silu"` or `"gelu_tanh"`.
    pub activation: String,
    pub norm_eps: f32,
    pub embed_scale: f32,
    /// The FFN reads the residual itself, with no norm before it (OLMo 2): browsing feeds it
    /// the input as it is, and the FFN rows of `norms.bin` are ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ffn_reads_residual: bool,
    /// A mixture of experts: `ff_dim` counts every expert's features one expert after
    /// another, then the shared expert's, and `router.bin` holds each layer's router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertInfo>,
}

/// How a mixture of experts routes (see `quarry_model::Router`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertInfo {
    /// Experts per layer.
    pub count: usize,
    /// Experts each token goes to.
    pub used: usize,
    /// Features (hidden units) of one expert.
    pub ff_dim: usize,
    /// Features of the shared expert every token also runs; 0: there is none.
    pub shared_ff_dim: usize,
    /// The shared expert's output is scaled by the sigmoid of a gate row, stored in
    /// `router.bin` after the experts' rows.
    pub shared_gate: bool,
    /// The chosen experts' softmax weights are renormalised to sum to 1.
    pub normalize: bool,
    /// Multiplier of every routing weight.
    pub scale: f32,
}

impl ExpertInfo {
    /// Rows of one layer's router in `router.bin`.
    pub fn router_rows(&self) -> usize {
        self.count + self.shared_gate as usize
    }

    /// The widths of a layer's feature blocks: each expert's, then the shared expert's.
    pub fn block_widths(&self) -> Vec<usize> {
        let mut widths = vec![self.ff_dim; self.count];
        if self.shared_ff_dim > 0 {
            widths.push(self.shared_ff_dim);
        }
        widths
    }
}

/// Where the vindex came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub source: String,
    pub source_sha256: String,
    pub source_bytes: u64,
    pub tool: String,
    pub tool_version: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// Inclusive layer ranges of the three bands DESCRIBE can be limited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bands {
    pub syntax: [usize; 2],
    pub knowledge: [usize; 2],
    pub output: [usize; 2],
}

impl Bands {
    /// The default split of `n_layers` (≥ 1): the first third for syntax, the last sixth for
    /// output, knowledge in between; a heuristic from how probing studies describe the depth
    /// of these roles, recorded in the manifest so a user can override it.
    pub fn default_for(n_layers: usize) -> Bands {
        if n_layers < 3 {
            let all = [0, n_layers.saturating_sub(1)];
            return Bands {
                syntax: all,
                knowledge: all,
                output: all,
            };
        }
        let syntax_last = n_layers / 3 - 1;
        let output_first = (n_layers - n_layers / 6)
            .min(n_layers - 1)
            .max(syntax_last + 2);
        Bands {
            syntax: [0, syntax_last],
            knowledge: [syntax_last + 1, output_first - 1],
            output: [output_first, n_layers - 1],
        }
    }
}

/// The manifest, `index.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub version: u32,
    pub level: Level,
    pub dtype: Dtype,
    pub model: ModelInfo,
    pub provenance: Provenance,
    pub bands: Bands,
    /// Tokens kept per feature at each end of its vocabulary projection.
    pub top_k: usize,
    /// Vocabulary tokens whose embeddings calibrated `feature_stats.bin`.
    pub calibration_tokens: usize,
    pub files: Vec<FileEntry>,
}

impl Index {
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_cover_every_layer_once_in_order() {
        for n in 1..80 {
            let b = Bands::default_for(n);
            if n < 3 {
                assert_eq!(b.syntax, [0, n - 1]);
                continue;
            }
            assert_eq!(b.syntax[0], 0, "{n}");
            assert_eq!(b.knowledge[0], b.syntax[1] + 1, "{n}");
            assert_eq!(b.output[0], b.knowledge[1] + 1, "{n}");
            assert_eq!(b.output[1], n - 1, "{n}");
            assert!(b.syntax[0] <= b.syntax[1] && b.knowledge[0] <= b.knowledge[1]);
        }
        assert_eq!(
            Bands::default_for(18),
            Bands {
                syntax: [0, 5],
                knowledge: [6, 14],
                output: [15, 17]
            }
        );
    }
}
