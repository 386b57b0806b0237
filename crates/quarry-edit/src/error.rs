use std::path::PathBuf;

/// Everything editing can refuse, each naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("layer {layer} is outside the model's {n_layers} layers")]
    BadLayer { layer: usize, n_layers: usize },
    #[error(transparent)]
    Relation(#[from] quarry_relations::RelationError),
    #[error("entity \"{entity}\": {problem}")]
    BadEntity { entity: String, problem: String },
    #[error("target \"{target}\" tokenizes to nothing")]
    EmptyTarget { target: String },
    #[error("target \"{target}\" is {tokens} tokens; at most {max} are supported")]
    LongTarget {
        target: String,
        tokens: usize,
        max: usize,
    },
    #[error("no edge ({entity}, {relation}) in the patch")]
    NoSuchEdge { entity: String, relation: String },
    #[error("{}: {problem}", path.display())]
    Patch { path: PathBuf, problem: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Model(String),
    #[error("edit statistics: {0}")]
    Stats(String),
    #[error("editing a mixture-of-experts model ({architecture}) is not supported: edits are written into one dense FFN per layer")]
    Experts { architecture: String },
}

impl EditError {
    /// Every editing path starts here: the edits are deltas of a layer's one dense FFN.
    pub(crate) fn check_dense(model: &quarry_model::Model) -> Result<(), EditError> {
        match model.config().experts {
            Some(_) => Err(EditError::Experts {
                architecture: model.config().architecture.clone(),
            }),
            None => Ok(()),
        }
    }
}
