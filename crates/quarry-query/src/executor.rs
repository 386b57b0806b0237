//! The executor: keeps the open vindex or model file (with its model, loaded once) and the
//! editing session over it, and turns each statement into a [`ResultSet`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use quarry_format::GgufFile;
use quarry_lql::{
    DescribeMethod, DescribeScope, Detail, LayerRange, ShowTarget, Source, Statement,
};
use quarry_model::ops::softmax;
use quarry_model::{FeatureOwner, FfnOverlay, Model};
use quarry_tokenize::Tokenizer;
use quarry_vindex::{Level, Vindex};

use crate::answers;
use crate::browse::{band, edges, entity_input, ffn_input, pushes, strongest};
use crate::edit::{Editing, Failure, Opened};
use crate::error::QueryError;
use crate::in_context;
use crate::relations;
use crate::result::{Cell, ColumnType, ResultSet};
use crate::select::{self, select};
use crate::trace::{attribute, ffn_feature_shares, run, top_n, Readout};
use quarry_relations::accuracy::{self, RelationAccuracy};
use quarry_relations::catalogue;
use quarry_relations::readout::Baseline;

/// Runs statements; state (the open vindex or model file, and its edits) carries from one to
/// the next, as in a REPL.
///
/// Clones share the open vindex (its maps, relations, tokenizer and model) and its editing
/// session until one of them opens another: a server runs one clone per concurrent statement,
/// and an edit made through one clone is seen by the statements of every other.
#[derive(Clone, Default)]
pub struct Executor {
    vindex: Option<Arc<Vindex>>,
    /// A GGUF file opened with `USE` (no vindex): INFER, TRACE and editing run on it.
    gguf: Option<Arc<ModelFile>>,
    /// The base model (without edits), loaded by the first statement that needs it
    /// (repacking the weights takes a while) and kept for every later one, in every clone.
    model: Arc<OnceLock<Model>>,
    /// What DESCRIBE's templates make the base model answer of an unknown entity, made by the
    /// first DESCRIBE and kept like the model.
    baseline: Arc<OnceLock<Baseline>>,
    /// How well the base model answers each catalogue relation, when the open vindex does not
    /// hold it: measured by the first SHOW RELATIONS and kept like the model.
    accuracy: Arc<OnceLock<Vec<RelationAccuracy>>>,
    edits: Arc<Editing>,
}

/// A model file opened without a vindex.
struct ModelFile {
    path: PathBuf,
    file: Arc<GgufFile>,
    tokenizer: Tokenizer,
}

impl Executor {
    pub fn new() -> Executor {
        Executor::default()
    }

    /// An executor with `path` already open, like `USE "path"`: a vindex directory or a GGUF
    /// model file.
    pub fn with_vindex(path: impl AsRef<Path>) -> Result<Executor, QueryError> {
        let mut e = Executor::new();
        e.open(path.as_ref(), "USE")?;
        Ok(e)
    }

    /// An executor over a vindex already open (and perhaps shared with other executors).
    pub fn with_shared(vindex: Arc<Vindex>) -> Executor {
        Executor {
            vindex: Some(vindex),
            ..Executor::default()
        }
    }

    pub fn vindex(&self) -> Option<&Vindex> {
        self.vindex.as_deref()
    }

    /// The overlay of the edits in effect (every applied patch and the open one); `None`
    /// without edits. A new `Arc` after every change: compare with [`Arc::ptr_eq`] or
    /// [`FfnOverlay::version`] to notice one.
    pub fn overlay(&self) -> Option<Arc<FfnOverlay>> {
        self.edits.current()
    }

    /// The open model with the edits in effect installed (loading it if no statement has):
    /// what INFER runs, and what a server generates with.
    pub fn model(&self) -> Result<Model, QueryError> {
        let statement = "(the open model)";
        let base = self.base_model(statement)?;
        base.with_overlay(self.overlay())
            .map_err(model_error(statement))
    }

    /// Parses and runs every statement of `script`, stopping at the first error.
    pub fn run_script(&mut self, script: &str) -> Result<Vec<ResultSet>, QueryError> {
        quarry_lql::parse(script)?
            .iter()
            .map(|s| self.execute(s))
            .collect()
    }

    /// [`Executor::execute`] that stops (failing with [`crate::INTERRUPTED`]) soon after
    /// `interrupt` is set: between chunks of a forward pass and between passes.
    pub fn execute_interruptible(
        &mut self,
        statement: &Statement,
        interrupt: &crate::Interrupt,
    ) -> Result<ResultSet, QueryError> {
        crate::interrupt::under(interrupt, || self.execute(statement))
    }

    pub fn execute(&mut self, statement: &Statement) -> Result<ResultSet, QueryError> {
        let text = statement.to_string();
        let invalid = |message: String| QueryError::Invalid {
            statement: text.clone(),
            message,
        };
        match statement {
            Statement::Use { path } => self.open(Path::new(path), &text),
            Statement::Show(ShowTarget::Models) => Ok(show_models()),
            Statement::Insert { .. }
            | Statement::Update { .. }
            | Statement::Delete { .. }
            | Statement::Patch(_)
            | Statement::Compile { .. }
            | Statement::Show(ShowTarget::Patches) => self.edit(statement, &text),
            Statement::Infer {
                prompt,
                top,
                explain: false,
                ..
            } => {
                let top = top.unwrap_or(10) as usize;
                self.with_model(&text, |_, tok, model| infer(tok, model, prompt, top))
            }
            Statement::Trace {
                prompt,
                target,
                decompose,
                layers,
            } => self.with_model(&text, |_, tok, model| {
                trace(tok, model, prompt, target.as_deref(), *decompose, *layers)
            }),
            Statement::Describe {
                entity,
                detail,
                relations_only,
                method: DescribeMethod::Answers,
                ..
            } if self.has_model() => {
                let baseline = self.baseline(&text)?;
                let mut r = self.with_model(&text, |_, tok, model| {
                    answers::describe(tok, model, baseline, entity, *detail)
                })?;
                if *relations_only {
                    r.notes
                        .push("RELATIONS ONLY: every answer is an edge of a relation".into());
                }
                Ok(r)
            }
            Statement::Show(ShowTarget::Relations {
                features: false,
                layer: None,
                examples,
            }) => {
                let (measured, note) = self.relation_accuracy(&text)?;
                let mut r = relations::catalogue_relations(measured, *examples);
                r.notes.extend(note);
                Ok(r)
            }
            Statement::Select(q) if q.from == Source::Edges => {
                match select::entities(q.filter.as_ref()).map_err(invalid)? {
                    Some(entities) => {
                        if q.nearest.is_some() {
                            return Err(invalid(
                                "NEAREST TO ranks the features of EDGES; the edges of an entity \
                                 are read without it"
                                    .into(),
                            ));
                        }
                        if !self.has_model() {
                            return Err(self.needs_model(&text));
                        }
                        let baseline = self.baseline(&text)?;
                        self.with_model(&text, |_, tok, model| {
                            let table = answers::entity_edges(tok, model, baseline, &entities)?;
                            select::refine(table, q, Vec::new())
                        })
                    }
                    None => select(self.vindex_for(&text)?, q).map_err(invalid),
                }
            }
            _ => {
                let v = self.vindex_for(&text)?;
                match statement {
                    Statement::Stats => Ok(stats(v)),
                    Statement::Show(target) => show(v, target).map_err(invalid),
                    Statement::Describe {
                        entity,
                        scope,
                        detail,
                        relations_only,
                        method,
                    } => {
                        let raw = *method == DescribeMethod::Raw;
                        let mut r = if raw || v.index().level < Level::Inference {
                            let mut r =
                                describe(v, None, entity, *scope, *detail, raw).map_err(invalid)?;
                            if *method == DescribeMethod::Answers {
                                r.notes.push(
                                    "this vindex holds no model (browse level), so DESCRIBE \
                                     reads its features instead of asking the model"
                                        .into(),
                                );
                            }
                            r
                        } else {
                            let (entity, scope, detail) = (entity.clone(), *scope, *detail);
                            self.with_model(&text, |v, _, model| {
                                let v = v.expect("a vindex is open");
                                describe(v, Some(model), &entity, scope, detail, false)
                            })?
                        };
                        if *relations_only {
                            let at = r.column("relation").expect("DESCRIBE lists relations");
                            r.rows.retain(|row| row[at] != Cell::Null);
                            r.notes.push(
                                "RELATIONS ONLY: the features in no cluster of feature edges \
                                 are left out"
                                    .into(),
                            );
                        }
                        Ok(r)
                    }
                    Statement::Walk {
                        prompt,
                        top,
                        layers,
                        explain,
                    } => walk(v, prompt, top.unwrap_or(5), *layers, *explain).map_err(invalid),
                    Statement::Infer {
                        prompt,
                        top,
                        layers,
                        ..
                    } => {
                        let top = top.unwrap_or(10) as usize;
                        self.with_model(&text, |v, _, model| {
                            let v = v.expect("a vindex is open");
                            explain_infer(v, model, prompt, top, *layers)
                        })
                    }
                    Statement::Select(q) => select(v, q).map_err(invalid),
                    Statement::Use { .. }
                    | Statement::Trace { .. }
                    | Statement::Insert { .. }
                    | Statement::Update { .. }
                    | Statement::Delete { .. }
                    | Statement::Patch(_)
                    | Statement::Compile { .. } => unreachable!("handled above"),
                }
            }
        }
    }

    /// `USE`: a directory is opened as a vindex (or, holding a `config.json` and no vindex
    /// manifest, as a Hugging Face model), anything else as a GGUF model file. The editing
    /// session starts afresh (patches applied to the previous model do not follow).
    fn open(&mut self, path: &Path, statement: &str) -> Result<ResultSet, QueryError> {
        let mut r = ResultSet::new(&[("key", ColumnType::Text), ("value", ColumnType::Text)]);
        let hf_model = quarry_model::hf::is_hf_dir(path);
        if path.is_dir() && !hf_model {
            let v = Vindex::open(path).map_err(|source| QueryError::Vindex {
                statement: statement.to_string(),
                source: Box::new(source),
            })?;
            let i = v.index();
            for (k, val) in [
                ("vindex", path.display().to_string()),
                ("model", i.model.name.clone()),
                ("level", i.level.name().to_string()),
                ("layers", i.model.n_layers.to_string()),
                ("features per layer", i.model.ff_dim.to_string()),
            ] {
                r.push(vec![Cell::Text(k.into()), Cell::Text(val)]);
            }
            self.vindex = Some(Arc::new(v));
            self.gguf = None;
        } else {
            let file = match hf_model {
                true => quarry_model::hf::gguf_from_hf_dir(path, None)
                    .map_err(model_error(statement))?,
                false => GgufFile::open(path).map_err(|e| model_error(statement)(e.into()))?,
            };
            let config =
                quarry_model::ModelConfig::from_gguf(&file).map_err(model_error(statement))?;
            let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| QueryError::Invalid {
                statement: statement.to_string(),
                message: format!("{}: tokenizer: {e}", path.display()),
            })?;
            for (k, val) in [
                ("model file", path.display().to_string()),
                ("architecture", config.architecture.clone()),
                ("layers", config.n_layers.to_string()),
                ("features per layer", config.ff_dim.to_string()),
            ] {
                r.push(vec![Cell::Text(k.into()), Cell::Text(val)]);
            }
            r.notes.push(
                "a model file without a vindex: INFER, TRACE and the editing statements run on it"
                    .into(),
            );
            self.gguf = Some(Arc::new(ModelFile {
                path: path.to_path_buf(),
                file: Arc::new(file),
                tokenizer,
            }));
            self.vindex = None;
        }
        self.model = Arc::default();
        self.baseline = Arc::default();
        self.accuracy = Arc::default();
        self.edits = Arc::default();
        Ok(r)
    }

    /// The open vindex, for a statement that reads one.
    fn vindex_for(&self, statement: &str) -> Result<&Vindex, QueryError> {
        self.vindex.as_deref().ok_or_else(|| match self.gguf {
            Some(_) => QueryError::Invalid {
                statement: statement.to_string(),
                message: "this statement reads a vindex, and a model file is open: INFER, \
                          TRACE, DESCRIBE, SHOW RELATIONS, SELECT … FROM EDGES WHERE entity = \
                          … and the editing statements run on a model file; USE a vindex \
                          (quarry extract MODEL --level inference -o NAME.vindex) for the rest"
                    .into(),
            },
            None => QueryError::NoVindex {
                statement: statement.to_string(),
            },
        })
    }

    /// The error for a statement that asks the model when the open vindex holds none.
    fn needs_model(&self, statement: &str) -> QueryError {
        match self.vindex {
            Some(_) => QueryError::Invalid {
                statement: statement.to_string(),
                message: "this asks the model, and this vindex holds none (browse level); \
                          extract it with --level inference, or USE the model file"
                    .into(),
            },
            None => QueryError::NoVindex {
                statement: statement.to_string(),
            },
        }
    }

    /// The base model's accuracy per catalogue relation: the open vindex's (measured at
    /// extraction), else measured now on the model and kept; with a note when measured now.
    fn relation_accuracy(
        &self,
        statement: &str,
    ) -> Result<(&[RelationAccuracy], Option<String>), QueryError> {
        if let Some(v) = &self.vindex {
            if !v.relations().catalogue.is_empty() {
                return Ok((&v.relations().catalogue, None));
            }
        }
        if let Some(measured) = self.accuracy.get() {
            return Ok((measured, None));
        }
        if !self.has_model() {
            return Err(QueryError::Invalid {
                statement: statement.to_string(),
                message: "this vindex was extracted before Quarry measured relation accuracy \
                          and holds no model to measure it with; extract it again (SHOW \
                          RELATIONS VIA FEATURES lists its feature clusters)"
                    .into(),
            });
        }
        let model = self.base_model(statement)?;
        let tok = self.tokenizer().expect("a model is open");
        let start = std::time::Instant::now();
        let measured = accuracy::measure(model, tok).map_err(model_error(statement))?;
        let note = format!(
            "measured now in {:.1} s and kept for this session; a vindex keeps it from extraction",
            start.elapsed().as_secs_f64()
        );
        Ok((self.accuracy.get_or_init(|| measured), Some(note)))
    }

    /// Whether a model can run: a model file, or a vindex that holds one.
    fn has_model(&self) -> bool {
        self.gguf.is_some()
            || self
                .vindex
                .as_ref()
                .is_some_and(|v| v.index().level >= Level::Inference)
    }

    /// DESCRIBE's baseline on the base model, made if no statement has yet.
    fn baseline(&self, statement: &str) -> Result<&Baseline, QueryError> {
        if let Some(b) = self.baseline.get() {
            return Ok(b);
        }
        let model = self.base_model(statement)?;
        let tok = self.tokenizer().expect("a model is open");
        let b = Baseline::new(model, tok, &answers::asks()).map_err(model_error(statement))?;
        Ok(self.baseline.get_or_init(|| b))
    }

    /// The base model (no edits), loading it if no statement has yet.
    fn base_model(&self, statement: &str) -> Result<&Model, QueryError> {
        if let Some(model) = self.model.get() {
            return Ok(model);
        }
        let file = match (&self.vindex, &self.gguf) {
            (Some(v), _) => v.model_file().map_err(|source| QueryError::Vindex {
                statement: statement.to_string(),
                source: Box::new(source),
            })?,
            (None, Some(g)) => Arc::clone(&g.file),
            (None, None) => {
                return Err(QueryError::NoVindex {
                    statement: statement.to_string(),
                })
            }
        };
        let model = Model::load(file).map_err(model_error(statement))?;
        // A clone that loaded it meanwhile wins; this copy is dropped.
        Ok(self.model.get_or_init(|| model))
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        match (&self.vindex, &self.gguf) {
            (Some(v), _) => Some(v.tokenizer()),
            (None, Some(g)) => Some(&g.tokenizer),
            (None, None) => None,
        }
    }

    /// Runs `f` with the open vindex (if any), the tokenizer and the model with the edits in
    /// effect.
    fn with_model(
        &self,
        statement: &str,
        f: impl FnOnce(Option<&Vindex>, &Tokenizer, &Model) -> Result<ResultSet, String>,
    ) -> Result<ResultSet, QueryError> {
        let base = self.base_model(statement)?;
        let model = base
            .with_overlay(self.overlay())
            .map_err(model_error(statement))?;
        let tok = self.tokenizer().expect("a model is open");
        f(self.vindex.as_deref(), tok, &model).map_err(|message| QueryError::Invalid {
            statement: statement.to_string(),
            message,
        })
    }

    /// An editing statement, on the base model.
    fn edit(&self, statement: &Statement, text: &str) -> Result<ResultSet, QueryError> {
        let model = self.base_model(text)?;
        let path = match (&self.vindex, &self.gguf) {
            (Some(v), _) => v.model_path().map_err(|source| QueryError::Vindex {
                statement: text.to_string(),
                source: Box::new(source),
            })?,
            (None, Some(g)) => g.path.clone(),
            (None, None) => unreachable!("base_model needs an open model"),
        };
        let opened = Opened {
            model,
            tokenizer: self.tokenizer().expect("a model is open"),
            path: &path,
            vindex: self.vindex.as_deref(),
        };
        self.edits
            .execute(&opened, statement)
            .map_err(|failure| match failure {
                Failure::Edit(source) => QueryError::Edit {
                    statement: text.to_string(),
                    source: Box::new(source),
                },
                Failure::Message(message) => QueryError::Invalid {
                    statement: text.to_string(),
                    message,
                },
            })
    }
}

/// Wraps a model error with the statement that met it.
fn model_error(statement: &str) -> impl FnOnce(quarry_model::ModelError) -> QueryError + '_ {
    move |source| QueryError::Model {
        statement: statement.to_string(),
        source: Box::new(source),
    }
}

fn token(tok: &Tokenizer, id: u32) -> Cell {
    Cell::Text(tok.decode(&[id]))
}

/// A token's text in double quotes, for lists of tokens in one cell.
/// The expert column of queries that list features, in a mixture-of-experts vindex: a
/// feature's expert number, or "shared".
fn expert_column(v: &Vindex) -> Option<(&'static str, ColumnType)> {
    v.index().model.experts.as_ref()?;
    Some(("expert", ColumnType::Text))
}

/// The expert cell of feature `feature` (see [`expert_column`]); nothing in a dense vindex.
fn expert_cell(v: &Vindex, feature: usize) -> Option<Cell> {
    v.index().model.experts.as_ref()?;
    Some(match v.feature_owner(feature) {
        Some(FeatureOwner::Expert { expert, .. }) => Cell::Text(expert.to_string()),
        Some(FeatureOwner::Shared { .. }) => Cell::Text("shared".into()),
        _ => Cell::Null,
    })
}

pub(crate) fn quoted(v: &Vindex, id: u32) -> String {
    format!("\"{}\"", v.tokenizer().decode(&[id]))
}

fn layer_list(n: usize, range: Option<LayerRange>) -> Result<Vec<usize>, String> {
    match range {
        None => Ok((0..n).collect()),
        Some(r) if r.last as usize >= n => Err(format!(
            "LAYERS {}-{}: the model has layers 0-{}",
            r.first,
            r.last,
            n - 1
        )),
        Some(r) => Ok((r.first as usize..=r.last as usize).collect()),
    }
}

fn stats(v: &Vindex) -> ResultSet {
    let i = v.index();
    let mut r = ResultSet::new(&[("key", ColumnType::Text), ("value", ColumnType::Text)]);
    let bytes: u64 = i.files.iter().map(|f| f.bytes).sum();
    let band = |b: [usize; 2]| format!("{}-{}", b[0], b[1]);
    for (k, val) in [
        ("model", i.model.name.clone()),
        ("architecture", i.model.architecture.clone()),
        ("layers", i.model.n_layers.to_string()),
        ("d_model", i.model.d_model.to_string()),
        ("features per layer", i.model.ff_dim.to_string()),
        ("features", (i.model.ff_dim * i.model.n_layers).to_string()),
        (
            "experts",
            i.model
                .experts
                .as_ref()
                .map_or("none (dense FFN)".into(), |e| {
                    let shared = match e.shared_ff_dim {
                        0 => String::new(),
                        n => format!(", a shared expert of {n}"),
                    };
                    format!(
                        "{} of {} features, {} per token{shared}",
                        e.count, e.ff_dim, e.used
                    )
                }),
        ),
        ("vocabulary", i.model.vocab_size.to_string()),
        ("activation", i.model.activation.clone()),
        ("level", i.level.name().into()),
        ("dtype", format!("{:?}", i.dtype).to_lowercase()),
        ("tokens per feature end", i.top_k.to_string()),
        ("files", i.files.len().to_string()),
        ("bytes", bytes.to_string()),
        ("syntax layers", band(i.bands.syntax)),
        ("knowledge layers", band(i.bands.knowledge)),
        ("output layers", band(i.bands.output)),
        ("source sha256", i.provenance.source_sha256.clone()),
    ] {
        r.push(vec![Cell::Text(k.into()), Cell::Text(val)]);
    }
    r
}

fn show_models() -> ResultSet {
    let mut r = ResultSet::new(&[
        ("vindex", ColumnType::Text),
        ("model", ColumnType::Text),
        ("level", ColumnType::Text),
        ("layers", ColumnType::Int),
    ]);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(".")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(quarry_vindex::layout::INDEX).is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        if let Ok(v) = Vindex::open(&dir) {
            let i = v.index();
            r.push(vec![
                Cell::Text(dir.display().to_string()),
                Cell::Text(i.model.name.clone()),
                Cell::Text(i.level.name().into()),
                Cell::Int(i.model.n_layers as i64),
            ]);
        }
    }
    r.notes
        .push("vindexes in the current directory (USE one to query it)".into());
    r
}

fn show(v: &Vindex, target: &ShowTarget) -> Result<ResultSet, String> {
    let m = &v.index().model;
    match target {
        ShowTarget::Layers => {
            let mut r = ResultSet::new(&[
                ("layer", ColumnType::Int),
                ("band", ColumnType::Text),
                ("features", ColumnType::Int),
            ]);
            for l in 0..m.n_layers {
                r.push(vec![
                    Cell::Int(l as i64),
                    Cell::Text(band(v, l).into()),
                    Cell::Int(m.ff_dim as i64),
                ]);
            }
            Ok(r)
        }
        ShowTarget::Features {
            layer,
            filter,
            limit,
        } => {
            let layer = *layer as usize;
            if layer >= m.n_layers {
                return Err(format!("the model has layers 0-{}", m.n_layers - 1));
            }
            let mut cols = vec![
                ("feature", ColumnType::Int),
                ("pushes_up", ColumnType::Text),
                ("top_logit", ColumnType::Float),
                ("pushes_down", ColumnType::Text),
                ("bottom_logit", ColumnType::Float),
                ("relation", ColumnType::Text),
            ];
            cols.extend(expert_column(v));
            let mut r = ResultSet::new(&cols);
            let list = |recs: &[quarry_vindex::TokenLogit]| {
                recs.iter()
                    .take(3)
                    .map(|t| quoted(v, t.token))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            for f in 0..m.ff_dim {
                let (top, bottom) = v.writes(layer, f);
                let mut row = vec![
                    Cell::Int(f as i64),
                    Cell::Text(list(top)),
                    Cell::Float(top[0].logit as f64),
                    Cell::Text(list(bottom)),
                    Cell::Float(bottom[0].logit as f64),
                    catalogue::answered_by(&v.tokenizer().decode(&[top[0].token]))
                        .map_or(Cell::Null, |r| Cell::Text(r.name.into())),
                ];
                row.extend(expert_cell(v, f));
                r.push(row);
            }
            let mut r = select::filter(r, filter.as_ref())?;
            select::limit(&mut r, *limit);
            r.notes.push(
                "relation: the catalogue relation one of whose known objects is the word the \
                 feature pushes up most"
                    .into(),
            );
            Ok(r)
        }
        ShowTarget::Relations {
            layer, examples, ..
        } => relations::feature_clusters(v, *layer, *examples),
        ShowTarget::Entities { layer, limit } => relations::entities(v, *layer, *limit),
        ShowTarget::Models => Ok(show_models()),
        ShowTarget::Patches => unreachable!("an editing statement, run in Executor::edit"),
    }
}

/// DESCRIBE: with `model` (an inference-level vindex, not RAW) by the in-context method,
/// otherwise from the vindex alone.
fn describe(
    v: &Vindex,
    model: Option<&Model>,
    entity: &str,
    scope: DescribeScope,
    detail: Detail,
    raw: bool,
) -> Result<ResultSet, String> {
    let n_layers = v.index().model.n_layers;
    let bands = v.index().bands;
    let range = |b: [usize; 2]| (b[0]..=b[1]).collect::<Vec<_>>();
    let layers = match scope {
        DescribeScope::Default | DescribeScope::Knowledge => range(bands.knowledge),
        DescribeScope::Syntax => range(bands.syntax),
        DescribeScope::Output => range(bands.output),
        DescribeScope::AllLayers => (0..n_layers).collect(),
        DescribeScope::AtLayer(l) if (l as usize) < n_layers => vec![l as usize],
        DescribeScope::AtLayer(l) => {
            return Err(format!(
                "AT LAYER {l}: the model has layers 0-{}",
                n_layers - 1
            ))
        }
    };
    let e = entity_input(v, entity).ok_or_else(|| format!("{entity:?} has no tokens"))?;
    let limit = match detail {
        Detail::Brief => 10,
        Detail::Normal => 20,
        Detail::Verbose => 50,
    };
    let (found, method) = match model {
        Some(model) => {
            let (found, near) = in_context::edges(v, model, &e, entity, &layers, limit)?;
            let shown: Vec<String> = near
                .iter()
                .take(5)
                .map(|&id| v.tokenizer().decode(&[id]).trim().to_string())
                .collect();
            let method = format!(
                "in-context (FFN writes at the entity in a forward pass minus those of its {} nearest words: {}, …)",
                near.len(),
                shown.join(", ")
            );
            (found, method)
        }
        None => {
            let found = edges(v, &e.input, &e.raw_sum, layers.iter().copied(), raw);
            let method = if raw {
                "RAW (|raw embedding · gate|, top tokens)"
            } else {
                "contribution (normalized input; activation z-score against its baseline × logit)"
            };
            (found, method.to_string())
        }
    };
    let mut r = ResultSet::new(&[
        ("rank", ColumnType::Int),
        ("token", ColumnType::Text),
        ("token_id", ColumnType::Int),
        ("score", ColumnType::Float),
        ("features", ColumnType::Int),
        ("best_layer", ColumnType::Int),
        ("best_feature", ColumnType::Int),
        ("relation", ColumnType::Text),
    ]);
    let relation_of: HashMap<(usize, usize), &str> = v
        .relations()
        .edges
        .iter()
        .map(|e| {
            (
                (e.layer, e.feature),
                v.relations().relations[e.relation].label.as_str(),
            )
        })
        .collect();
    for (rank, e) in found
        .iter()
        .filter(|e| e.score > 0.0)
        .take(limit)
        .enumerate()
    {
        r.push(vec![
            Cell::Int(rank as i64 + 1),
            token(v.tokenizer(), e.token),
            Cell::Int(e.token as i64),
            Cell::Float(e.score as f64),
            Cell::Int(e.features as i64),
            Cell::Int(e.best.0 as i64),
            Cell::Int(e.best.1 as i64),
            relation_of
                .get(&(e.best.0, e.best.1))
                .map_or(Cell::Null, |l| Cell::Text(l.to_string())),
        ]);
    }
    let pieces: Vec<String> = e
        .ids
        .iter()
        .map(|&id| format!("{:?}", v.tokenizer().decode(&[id])))
        .collect();
    r.notes.push(format!(
        "{entity:?} = tokens [{}], layers {}-{}, {} mode",
        pieces.join(", "),
        layers.first().copied().unwrap_or(0),
        layers.last().copied().unwrap_or(0),
        method
    ));
    Ok(r)
}

fn walk(
    v: &Vindex,
    prompt: &str,
    top: u32,
    layers: Option<LayerRange>,
    explain: bool,
) -> Result<ResultSet, String> {
    let ids = v.tokenizer().encode(prompt, false, true);
    let last = *ids.last().ok_or("the prompt has no tokens")?;
    let d = v.index().model.d_model;
    let scale = v.index().model.embed_scale;
    let x: Vec<f32> = v.embedding(last).iter().map(|a| a * scale).collect();
    debug_assert_eq!(x.len(), d);
    let mut cols = vec![
        ("layer", ColumnType::Int),
        ("feature", ColumnType::Int),
        ("activation", ColumnType::Float),
        ("pushes", ColumnType::Text),
        ("effect", ColumnType::Float),
    ];
    cols.extend(expert_column(v));
    if explain {
        cols.extend([("gate", ColumnType::Float), ("up", ColumnType::Float)]);
    }
    let mut r = ResultSet::new(&cols);
    for layer in layer_list(v.index().model.n_layers, layers)? {
        let xn = ffn_input(v, layer, &x);
        for (firing, effect) in strongest(v, layer, &xn, top as usize) {
            let pushed: Vec<String> = pushes(v, &firing)
                .iter()
                .take(3)
                .map(|&(t, _)| quoted(v, t))
                .collect();
            let mut row = vec![
                Cell::Int(layer as i64),
                Cell::Int(firing.feature as i64),
                Cell::Float(firing.activation as f64),
                Cell::Text(pushed.join(" ")),
                Cell::Float(effect as f64),
            ];
            row.extend(expert_cell(v, firing.feature));
            if explain {
                row.extend([
                    Cell::Float(firing.gate as f64),
                    Cell::Float(firing.up as f64),
                ]);
            }
            r.push(row);
        }
    }
    r.notes.push(format!(
        "last token {:?}: its embedding through each layer's pre-FFN norm, no forward pass",
        v.tokenizer().decode(&[last])
    ));
    if explain {
        r.notes.push(
            "activation = act(gate) × up; effect = its z-score against the feature's baseline × logit of the token it pushes most"
                .into(),
        );
    }
    Ok(r)
}

fn infer(tok: &Tokenizer, model: &Model, prompt: &str, top: usize) -> Result<ResultSet, String> {
    let result = run(model, tok, prompt)?;
    let probs = softmax(&result.logits);
    let mut r = ResultSet::new(&[
        ("rank", ColumnType::Int),
        ("token", ColumnType::Text),
        ("token_id", ColumnType::Int),
        ("probability", ColumnType::Float),
        ("logit", ColumnType::Float),
    ]);
    for (rank, id) in top_n(&result.logits, top).into_iter().enumerate() {
        r.push(vec![
            Cell::Int(rank as i64 + 1),
            token(tok, id as u32),
            Cell::Int(id as i64),
            Cell::Float(probs[id]),
            Cell::Float(result.logits[id] as f64),
        ]);
    }
    r.notes
        .push(format!("{} prompt tokens", result.tokens.len()));
    Ok(r)
}

fn explain_infer(
    v: &Vindex,
    model: &Model,
    prompt: &str,
    top: usize,
    layers: Option<LayerRange>,
) -> Result<ResultSet, String> {
    let result = run(model, v.tokenizer(), prompt)?;
    let mut cols = vec![
        ("layer", ColumnType::Int),
        ("feature", ColumnType::Int),
        ("activation", ColumnType::Float),
        ("pushes", ColumnType::Text),
        ("effect", ColumnType::Float),
    ];
    cols.extend(expert_column(v));
    let mut r = ResultSet::new(&cols);
    for layer in layer_list(v.index().model.n_layers, layers)? {
        let acts = &result.pieces.activations[layer];
        let mut ranked: Vec<(usize, Vec<(u32, f32)>)> = (0..acts.len())
            .map(|f| {
                let firing = crate::browse::Firing {
                    layer,
                    feature: f,
                    gate: f32::NAN,
                    up: f32::NAN,
                    activation: acts[f],
                    weight: acts[f],
                };
                (f, pushes(v, &firing))
            })
            .collect();
        let effect = |p: &[(u32, f32)]| p.first().map_or(0.0, |&(_, e)| e);
        ranked.sort_by(|a, b| effect(&b.1).total_cmp(&effect(&a.1)));
        for (f, pushed) in ranked.into_iter().take(top) {
            let names: Vec<String> = pushed.iter().take(3).map(|&(t, _)| quoted(v, t)).collect();
            let mut row = vec![
                Cell::Int(layer as i64),
                Cell::Int(f as i64),
                Cell::Float(acts[f] as f64),
                Cell::Text(names.join(" ")),
                Cell::Float(effect(&pushed) as f64),
            ];
            row.extend(expert_cell(v, f));
            r.push(row);
        }
    }
    let best = top_n(&result.logits, 1)[0];
    r.notes.push(format!(
        "features firing on the real residual at the last of {} tokens; the model predicts {:?}",
        result.tokens.len(),
        v.tokenizer().decode(&[best as u32])
    ));
    Ok(r)
}

fn trace(
    tok: &Tokenizer,
    model: &Model,
    prompt: &str,
    target: Option<&str>,
    decompose: bool,
    layers: Option<LayerRange>,
) -> Result<ResultSet, String> {
    // An empty target would otherwise match whatever " " encodes to and trace that.
    if target == Some("") {
        return Err("FOR \"\" names no token; give the token to trace, e.g. FOR \" Paris\"".into());
    }
    let result = run(model, tok, prompt)?;
    let target = match target {
        None => top_n(&result.logits, 1)[0] as u32,
        Some(text) => tok
            .token_id(text)
            .or_else(|| single(&tok.encode(&format!(" {text}"), false, false)))
            .or_else(|| single(&tok.encode(text, false, false)))
            .ok_or_else(|| {
                format!(
                    "FOR {text:?} is not a single token (it encodes as {:?}); trace one token",
                    tok.encode(text, false, false)
                )
            })?,
    };
    let readout = Readout::new(model, &result.pieces.final_residual, target);
    let a = attribute(model, &result, &readout);
    let shown = layer_list(model.config().n_layers, layers)?;
    let mut r = if decompose {
        ResultSet::new(&[
            ("layer", ColumnType::Int),
            ("part", ColumnType::Text),
            ("feature", ColumnType::Int),
            ("contribution", ColumnType::Float),
        ])
    } else {
        ResultSet::new(&[
            ("layer", ColumnType::Int),
            ("attention", ColumnType::Float),
            ("ffn", ColumnType::Float),
            ("cumulative", ColumnType::Float),
            ("lens_top", ColumnType::Text),
            ("lens_target_logit", ColumnType::Float),
        ])
    };
    let mut cumulative = a.embedding;
    if decompose {
        r.push(vec![
            Cell::Null,
            Cell::Text("embedding".into()),
            Cell::Null,
            Cell::Float(a.embedding),
        ]);
    }
    for layer in 0..a.attention.len() {
        cumulative += a.attention[layer] + a.ffn[layer];
        if !shown.contains(&layer) {
            continue;
        }
        if decompose {
            r.push(vec![
                Cell::Int(layer as i64),
                Cell::Text("attention".into()),
                Cell::Null,
                Cell::Float(a.attention[layer]),
            ]);
            let shares = ffn_feature_shares(model, &result, &readout, layer);
            let features = model.ffn_features(layer);
            let mut order: Vec<usize> = (0..shares.len()).collect();
            order.sort_by(|&x, &y| shares[y].abs().total_cmp(&shares[x].abs()));
            let mut rest = a.ffn[layer];
            for &f in order.iter().take(5) {
                rest -= shares[f];
                let part = match features.owner(f) {
                    Some(FeatureOwner::Expert { expert, .. }) => {
                        format!("ffn feature of expert {expert}")
                    }
                    Some(FeatureOwner::Shared { .. }) => "ffn feature of the shared expert".into(),
                    _ => "ffn feature".into(),
                };
                r.push(vec![
                    Cell::Int(layer as i64),
                    Cell::Text(part),
                    Cell::Int(f as i64),
                    Cell::Float(shares[f]),
                ]);
            }
            r.push(vec![
                Cell::Int(layer as i64),
                Cell::Text("ffn other features".into()),
                Cell::Null,
                Cell::Float(rest),
            ]);
        } else {
            let (lens_top, lens_logit) = a.lens[layer];
            r.push(vec![
                Cell::Int(layer as i64),
                Cell::Float(a.attention[layer]),
                Cell::Float(a.ffn[layer]),
                Cell::Float(cumulative),
                token(tok, lens_top),
                Cell::Float(lens_logit as f64),
            ]);
        }
    }
    let total = a.embedding + a.attention.iter().sum::<f64>() + a.ffn.iter().sum::<f64>();
    r.notes.push(format!(
        "target {:?} (id {target}): embedding {:.4} + attention {:.4} + ffn {:.4} = {:.4}; final logit {:.4} (sampled logit {:.4})",
        tok.decode(&[target]),
        a.embedding,
        a.attention.iter().sum::<f64>(),
        a.ffn.iter().sum::<f64>(),
        total,
        a.logit,
        result.logits[target as usize]
    ));
    Ok(r)
}

fn single(ids: &[u32]) -> Option<u32> {
    match ids {
        [id] => Some(*id),
        _ => None,
    }
}
