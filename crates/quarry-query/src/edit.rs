//! The editing statements: INSERT, UPDATE, DELETE, the patch statements, SHOW PATCHES, DIFF
//! and COMPILE (issue 15; semantics in docs/lql.md, "Editing").
//!
//! Edits are solved by [`quarry_edit::Editor`] against the base model (never against other
//! patches' edits), one editor per value layer and spread (`AT LAYER n`, `LAYERS a-b`), made
//! when a statement first needs it and kept for the session (each holds dense copies of the
//! layers above its value layer); every change re-solves each editor's edits together. Every edit
//! goes into the *open patch*: the one `BEGIN PATCH` named, or an unnamed session patch.
//! What the model runs under is the sum of every applied patch and the open one, their
//! low-rank deltas side by side per layer; it is rebuilt after every change and published
//! for the other statements (and the server) to pick up.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use quarry_edit::catalogue::{self, fill};
use quarry_edit::compose::Composer;
use quarry_edit::patch::{file_sha256, stack};
use quarry_edit::{
    key_stats, Base, Earlier, Edit, EditError, EditKind, EditRequest, Editor, Hyper, Patch,
};
use quarry_format::GgufFile;
use quarry_lql::{CompileTarget, EdgeValue, EditMode, LayerRange, PatchStatement, Statement};
use quarry_model::{write_adapter, write_patched_model, FfnOverlay, Model};
use quarry_tokenize::Tokenizer;
use quarry_vindex::{extract, Dtype, ExtractOptions, Level, Vindex};

use crate::result::{Cell, ColumnType, ResultSet};
use crate::trace::{run, top_n};

/// The environment variable naming the directory of cached key statistics.
pub const STATS_DIR_VAR: &str = "QUARRY_EDIT_STATS_DIR";
/// The key-statistics text's file name in the models directory (written by
/// `scripts/fetch-models corpus`).
pub const CORPUS_FILE: &str = "edit-corpus.txt";

/// The editing state of one open model, shared by every clone of its executor.
#[derive(Default)]
pub(crate) struct Editing {
    session: Mutex<Session>,
    /// The overlay every statement runs under; swapped whole, so a statement (or a request
    /// in flight) keeps the one it started with.
    current: Mutex<Option<Arc<FfnOverlay>>>,
}

#[derive(Default)]
struct Session {
    /// The open model's identity, hashed when first needed.
    base: Option<Base>,
    /// Editors by the layer their values are found at and the layers they spread over.
    editors: HashMap<(usize, usize), Editor>,
    /// Facts written with `MODE COMPOSE` (LARQL's method, for comparison): this session only.
    composer: Option<Composer>,
    open: Option<Open>,
    applied: Vec<Applied>,
}

/// The patch edits go into.
struct Open {
    /// `None`: the unnamed session patch (edits made before any `BEGIN PATCH`).
    name: Option<Name>,
    patch: Patch,
    /// Edits not yet written by `SAVE PATCH`.
    unsaved: bool,
}

struct Applied {
    name: Name,
    patch: Patch,
    overlay: FfnOverlay,
}

/// A patch file: as the statement wrote it, and as compared (absolute, links resolved).
#[derive(Clone)]
struct Name {
    shown: String,
    id: PathBuf,
}

impl Name {
    fn new(path: &str) -> Name {
        let p = Path::new(path);
        // The file may not exist yet (BEGIN PATCH) or any more (REMOVE PATCH).
        let id = std::fs::canonicalize(p)
            .or_else(|_| {
                let parent = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                std::fs::canonicalize(parent).map(|d| d.join(p.file_name().unwrap_or_default()))
            })
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf());
        Name {
            shown: path.to_string(),
            id,
        }
    }
}

/// The open model, as the editing statements need it.
pub(crate) struct Opened<'a> {
    /// The base model (no overlay).
    pub model: &'a Model,
    pub tokenizer: &'a Tokenizer,
    /// The model's file on disk (hashed when a GGUF was opened without a vindex).
    pub path: &'a Path,
    pub vindex: Option<&'a Vindex>,
}

impl Opened<'_> {
    fn n_layers(&self) -> usize {
        self.model.config().n_layers
    }

    fn base_file(&self) -> &GgufFile {
        self.model.file()
    }
}

/// What went wrong in an editing statement: the editor's error or a message.
pub(crate) enum Failure {
    Edit(EditError),
    Message(String),
}

impl From<EditError> for Failure {
    fn from(e: EditError) -> Failure {
        Failure::Edit(e)
    }
}

impl From<quarry_relations::RelationError> for Failure {
    fn from(e: quarry_relations::RelationError) -> Failure {
        Failure::Edit(e.into())
    }
}

impl From<String> for Failure {
    fn from(m: String) -> Failure {
        Failure::Message(m)
    }
}

impl From<&str> for Failure {
    fn from(m: &str) -> Failure {
        Failure::Message(m.to_string())
    }
}

type Outcome = Result<ResultSet, Failure>;

impl Editing {
    /// The overlay of every applied patch and the open one; `None` without edits.
    pub fn current(&self) -> Option<Arc<FfnOverlay>> {
        lock(&self.current).clone()
    }

    /// Runs one editing statement.
    pub fn execute(&self, m: &Opened<'_>, statement: &Statement) -> Outcome {
        let mut s = lock(&self.session);
        let result = match statement {
            Statement::Insert {
                edges,
                layers,
                template,
                mode: EditMode::Compose,
            } => s.compose(m, edges, *layers, template.as_deref()),
            Statement::Insert {
                edges,
                layers,
                template,
                ..
            } => {
                let (layer, spread) = pick_layers(m, *layers)?;
                let puts = edges
                    .iter()
                    .map(|e| {
                        let prompt = rewrite_prompt(&e.relation, template.as_deref(), &e.entity)?;
                        Ok(Put {
                            entity: e.entity.clone(),
                            relation: e.relation.clone(),
                            target: e.target.clone(),
                            prompt,
                            kind: EditKind::Insert,
                            layer,
                            spread,
                        })
                    })
                    .collect::<Result<Vec<_>, Failure>>()?;
                s.put(m, puts)
            }
            Statement::Update {
                entity,
                relation,
                target,
                layers,
                template,
            } => {
                // An edge of the open patch keeps its prompt and layer unless the statement
                // gives others; any other edge is inserted.
                let existing = s.find(entity, relation).cloned();
                let prompt = match (template, &existing) {
                    (None, Some(e)) => e.prompt.clone(),
                    _ => rewrite_prompt(relation, template.as_deref(), entity)?,
                };
                let (layer, spread) = match (layers, &existing) {
                    (None, Some(e)) => (e.layer, e.spread),
                    _ => pick_layers(m, *layers)?,
                };
                s.put(
                    m,
                    vec![Put {
                        entity: entity.clone(),
                        relation: relation.clone(),
                        target: target.clone(),
                        prompt,
                        kind: EditKind::Insert,
                        layer,
                        spread,
                    }],
                )
            }
            Statement::Delete { entity, relation } => s.delete(m, entity, relation),
            Statement::Patch(p) => match p {
                PatchStatement::Begin { path } => s.begin(m, path),
                PatchStatement::Save => s.save(),
                PatchStatement::Apply { path } => s.apply(m, path),
                PatchStatement::Remove { path } => s.remove(path),
                PatchStatement::Diff { a, b } => s.diff(m, a, b.as_deref()),
            },
            Statement::Show(quarry_lql::ShowTarget::Patches) => Ok(s.show()),
            Statement::Compile { target, path } => {
                let overlay = lock(&self.current).clone();
                compile(m, overlay.as_deref(), *target, path, s.edit_count())
            }
            other => unreachable!("not an editing statement: {other}"),
        };
        // Published while the session is still locked, so two statements cannot publish out
        // of order.
        let overlay = s.overlay(m.n_layers()).map(Arc::new);
        *lock(&self.current) = overlay;
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A statement that panicked leaves the state as it was before its commit point.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The layer an edit's value is found at and how many layers ending there it is spread
/// over: `AT LAYER n` is `(n, 1)`, `LAYERS a-b` is `(b, b − a + 1)`, neither is the editor's
/// default.
fn pick_layers(m: &Opened<'_>, layers: Option<LayerRange>) -> Result<(usize, usize), Failure> {
    let n = m.n_layers();
    match layers {
        None => {
            let h = Hyper::for_model(m.model);
            Ok((h.layer, h.spread))
        }
        Some(r) if r.first > r.last => Err(format!(
            "LAYERS {}-{}: the first layer is above the last",
            r.first, r.last
        )
        .into()),
        Some(r) if r.last as usize >= n => Err(EditError::BadLayer {
            layer: r.last as usize,
            n_layers: n,
        }
        .into()),
        Some(r) => Ok((r.last as usize, (r.last - r.first) as usize + 1)),
    }
}

/// The prompt an edit of `relation` is made on: template 0 with the entity filled in.
fn rewrite_prompt(relation: &str, template: Option<&str>, entity: &str) -> Result<String, Failure> {
    let templates = catalogue::templates(relation, template)?;
    Ok(fill(&templates[0], entity))
}

/// Whether `e` is the edge (`entity`, `relation`): the entity exactly, the relation up to case
/// and spacing.
fn same_edge(e: &Edit, entity: &str, relation: &str) -> bool {
    e.entity == entity && same_relation(&e.relation, relation)
}

fn same_relation(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    norm(a) == norm(b)
}

/// One edit to solve.
struct Put {
    entity: String,
    relation: String,
    target: String,
    prompt: String,
    kind: EditKind,
    layer: usize,
    spread: usize,
}

fn edit_columns() -> ResultSet {
    ResultSet::new(&[
        ("action", ColumnType::Text),
        ("entity", ColumnType::Text),
        ("relation", ColumnType::Text),
        ("target", ColumnType::Text),
        ("layer", ColumnType::Int),
        ("loss", ColumnType::Float),
        ("seconds", ColumnType::Float),
    ])
}

impl Session {
    /// `INSERT … MODE COMPOSE`: LARQL's method, one neuron per fact at one layer (docs/editing.md).
    fn compose(
        &mut self,
        m: &Opened<'_>,
        edges: &[EdgeValue],
        layers: Option<LayerRange>,
        template: Option<&str>,
    ) -> Outcome {
        if template.is_some() {
            return Err(
                "MODE COMPOSE prompts with LARQL's fixed \"The {relation} of {entity} is\"; \
                 TEMPLATE does not apply to it"
                    .into(),
            );
        }
        let layer = match layers {
            Some(r) if r.first != r.last => {
                return Err(format!(
                    "LAYERS {}-{}: COMPOSE writes one layer; name it with AT LAYER n",
                    r.first, r.last
                )
                .into())
            }
            r => r
                .map(|r| pick_layers(m, Some(r)).map(|(l, _)| l))
                .transpose()?,
        };
        if self.composer.is_none() {
            let tokenizer =
                Tokenizer::from_gguf(m.base_file()).map_err(|e| Failure::Message(e.to_string()))?;
            self.composer = Some(Composer::new(m.model.clone(), tokenizer, layer)?);
        }
        let composer = self.composer.as_mut().expect("made above");
        if let Some(l) = layer.filter(|&l| l != composer.layer()) {
            return Err(format!(
                "AT LAYER {l}: this session's COMPOSE facts are at layer {} (COMPOSE writes one layer)",
                composer.layer()
            )
            .into());
        }
        let mut r = edit_columns();
        for e in edges {
            let t = Instant::now();
            let p = composer.insert(&e.entity, &e.relation, &e.target)?;
            r.push(vec![
                Cell::Text("composed".into()),
                Cell::Text(e.entity.clone()),
                Cell::Text(e.relation.clone()),
                Cell::Text(e.target.clone()),
                Cell::Int(composer.layer() as i64),
                Cell::Float(-(p.max(1e-12) as f64).ln()),
                Cell::Float(t.elapsed().as_secs_f64()),
            ]);
        }
        r.notes.push(
            "MODE COMPOSE (LARQL's method, for comparison): loss is −ln P(target) on \
             \"The {relation} of {entity} is\"; the facts live in this session only (not in \
             patches) and cannot be compiled"
                .into(),
        );
        Ok(r)
    }

    fn base(&mut self, m: &Opened<'_>) -> Result<Base, Failure> {
        if let Some(b) = &self.base {
            return Ok(b.clone());
        }
        let recorded = m
            .vindex
            .and_then(|v| v.index().file(quarry_vindex::layout::MODEL))
            .map(|f| f.sha256.clone());
        let sha = match recorded {
            Some(sha) => sha,
            None => file_sha256(m.path)?,
        };
        let base = Base::of(m.model.config(), &sha);
        self.base = Some(base.clone());
        Ok(base)
    }

    fn open(&mut self, m: &Opened<'_>) -> Result<&mut Open, Failure> {
        if self.open.is_none() {
            let base = self.base(m)?;
            self.open = Some(Open {
                name: None,
                patch: Patch::new(base),
                unsaved: false,
            });
        }
        Ok(self.open.as_mut().expect("set above"))
    }

    fn find(&self, entity: &str, relation: &str) -> Option<&Edit> {
        self.open
            .as_ref()?
            .patch
            .edits
            .iter()
            .find(|e| same_edge(e, entity, relation))
    }

    fn edit_count(&self) -> usize {
        let open = self.open.as_ref().map_or(0, |o| o.patch.edits.len());
        open + self
            .applied
            .iter()
            .map(|a| a.patch.edits.len())
            .sum::<usize>()
    }

    /// The editor of values at `layer` spread over `spread` layers, made on first use: the
    /// key statistics of those layers (cached on disk per base and layer) and dense copies of
    /// the layers above `layer`.
    fn editor(&mut self, m: &Opened<'_>, layer: usize, spread: usize) -> Result<&Editor, Failure> {
        if !self.editors.contains_key(&(layer, spread)) {
            let n = m.n_layers();
            if layer >= n {
                return Err(EditError::BadLayer { layer, n_layers: n }.into());
            }
            let base = self.base(m)?;
            let corpus_path = models_dir().join(CORPUS_FILE);
            let corpus = std::fs::read_to_string(&corpus_path).map_err(|e| {
                format!(
                    "cannot read the key-statistics text {} ({e}): scripts/fetch-models corpus writes it \
                     (into $QUARRY_MODELS_DIR, default ~/.cache/quarry/models)",
                    corpus_path.display()
                )
            })?;
            let tokenizer =
                Tokenizer::from_gguf(m.base_file()).map_err(|e| format!("tokenizer: {e}"))?;
            let mut hyper = Hyper::for_model(m.model);
            hyper.layer = layer;
            hyper.spread = spread;
            let layers: Vec<usize> = hyper.layers().collect();
            let stats = key_stats(
                m.model,
                &tokenizer,
                &base.sha256,
                &layers,
                &corpus,
                Some(&stats_dir()),
            )?;
            let editor = Editor::new(m.model.clone(), tokenizer, hyper, &stats)?;
            self.editors.insert((layer, spread), editor);
        }
        Ok(&self.editors[&(layer, spread)])
    }

    /// Solves `puts` and makes them the open patch's edges (replacing edges of the same entity
    /// and relation), then re-solves every layer whose edits changed. Every row is checked
    /// before any is solved, and the patch changes only once all are: a bad row changes nothing.
    fn put(&mut self, m: &Opened<'_>, puts: Vec<Put>) -> Outcome {
        for (i, p) in puts.iter().enumerate() {
            if let Some(j) = puts[..i]
                .iter()
                .position(|q| q.entity == p.entity && same_relation(&q.relation, &p.relation))
            {
                return Err(format!(
                    "rows {} and {} both set ({:?}, {:?}); give each edge once",
                    j + 1,
                    i + 1,
                    p.entity,
                    p.relation
                )
                .into());
            }
        }
        for p in &puts {
            let editor = self.editor(m, p.layer, p.spread)?;
            editor.locate(&p.prompt, &p.entity)?;
            editor.target_tokens(&p.target)?;
        }
        let mut solved = Vec::with_capacity(puts.len());
        for p in &puts {
            let start = Instant::now();
            let edit = self.editor(m, p.layer, p.spread)?.solve(&EditRequest {
                entity: p.entity.clone(),
                relation: p.relation.clone(),
                target: p.target.clone(),
                prompt: p.prompt.clone(),
                kind: p.kind,
            })?;
            solved.push((edit, start.elapsed().as_secs_f64()));
        }
        let old = &self.open(m)?.patch.edits;
        let replaced: Vec<&Edit> = old
            .iter()
            .filter(|e| puts.iter().any(|p| same_edge(e, &p.entity, &p.relation)))
            .collect();
        let mut r = edit_columns();
        for (edit, seconds) in &solved {
            let action = if replaced
                .iter()
                .any(|e| same_edge(e, &edit.entity, &edit.relation))
            {
                "replaced"
            } else if edit.kind == EditKind::Suppress {
                "suppressed"
            } else {
                "inserted"
            };
            r.push(vec![
                Cell::Text(action.into()),
                Cell::Text(edit.entity.clone()),
                Cell::Text(edit.relation.clone()),
                Cell::Text(edit.target.clone()),
                Cell::Int(edit.layer as i64),
                Cell::Float(edit.loss as f64),
                Cell::Float(*seconds),
            ]);
        }
        let mut edits: Vec<Edit> = old
            .iter()
            .filter(|e| !puts.iter().any(|p| same_edge(e, &p.entity, &p.relation)))
            .cloned()
            .collect();
        edits.extend(solved.into_iter().map(|(e, _)| e));
        self.commit(m, edits)?;
        r.notes.push(self.open_note());
        Ok(r)
    }

    /// Makes `edits` the open patch's, with its deltas solved again: each editor's edits
    /// together, the deltas of editors that write the same layer side by side, all on top of
    /// the applied patches (their edits keep their outputs; see [`Editor::deltas_after`]).
    fn commit(&mut self, m: &Opened<'_>, edits: Vec<Edit>) -> Result<(), Failure> {
        let n = m.n_layers();
        let groups: BTreeSet<(usize, usize)> = edits.iter().map(|e| (e.layer, e.spread)).collect();
        let applied_edits: Vec<Edit> = self
            .applied
            .iter()
            .flat_map(|a| a.patch.edits.iter().cloned())
            .collect();
        let applied = stack(n, self.applied.iter().map(|a| &a.overlay));
        let mut solved = Vec::with_capacity(groups.len());
        for (layer, spread) in groups {
            let earlier = Earlier {
                edits: &applied_edits,
                overlay: applied.as_ref(),
            };
            let deltas = self
                .editor(m, layer, spread)?
                .deltas_after(&edits, &earlier);
            solved.push(FfnOverlay::new(n, deltas));
        }
        let deltas: Vec<_> = stack(n, &solved)
            .map(|o| o.deltas().map(|(l, d)| (l, d.clone())).collect())
            .unwrap_or_default();
        let open = self.open(m)?;
        open.patch.edits = edits;
        open.patch.deltas = deltas;
        open.unsaved = true;
        Ok(())
    }

    fn open_note(&self) -> String {
        match &self.open {
            Some(o) => format!(
                "{} ({} edits{})",
                o.name.as_ref().map_or_else(
                    || "the unnamed session patch (BEGIN PATCH \"file.vlp\" names it)".to_string(),
                    |n| format!("patch {}", n.shown)
                ),
                o.patch.edits.len(),
                if o.unsaved { ", unsaved" } else { "" }
            ),
            None => "no patch is open".into(),
        }
    }

    /// DELETE: an edge of the open patch is dropped; an edge the model knows natively is
    /// suppressed (its current greedy answer to the relation's rewrite prompt).
    fn delete(&mut self, m: &Opened<'_>, entity: &str, relation: &str) -> Outcome {
        if let Some(found) = self.find(entity, relation).cloned() {
            let edits: Vec<Edit> = self.open(m)?.patch.edits.clone();
            let edits = edits
                .into_iter()
                .filter(|e| !same_edge(e, entity, relation))
                .collect();
            self.commit(m, edits)?;
            let mut r = edit_columns();
            r.push(vec![
                Cell::Text("dropped".into()),
                Cell::Text(found.entity),
                Cell::Text(found.relation),
                Cell::Text(found.target),
                Cell::Int(found.layer as i64),
                Cell::Null,
                Cell::Null,
            ]);
            r.notes.push(self.open_note());
            return Ok(r);
        }
        if let Some(a) = self
            .applied
            .iter()
            .find(|a| a.patch.edits.iter().any(|e| same_edge(e, entity, relation)))
        {
            return Err(format!(
                "({entity:?}, {relation:?}) is an edge of the applied patch {}: BEGIN PATCH {:?} to edit it, or REMOVE PATCH {:?}",
                a.name.shown, a.name.shown, a.name.shown
            )
            .into());
        }
        let prompt = rewrite_prompt(relation, None, entity)?;
        let (layer, spread) = pick_layers(m, None)?;
        let answer = run(m.model, m.tokenizer, &prompt)?;
        let id = top_n(&answer.logits, 1)[0] as u32;
        let word = m.tokenizer.decode(&[id]);
        let target = word.trim().to_string();
        let editor = self.editor(m, layer, spread)?;
        // The edit suppresses its target's first token, which must be the token the model says.
        if target.is_empty()
            || editor
                .target_tokens(&target)
                .ok()
                .and_then(|t| t.first().copied())
                != Some(id)
        {
            return Err(format!(
                "the model answers {prompt:?} with the token {word:?}, which is not a word of its own; \
                 there is no fact to suppress (INSERT the edge with the target you want instead)"
            )
            .into());
        }
        self.put(
            m,
            vec![Put {
                entity: entity.to_string(),
                relation: relation.to_string(),
                target,
                prompt,
                kind: EditKind::Suppress,
                layer,
                spread,
            }],
        )
    }

    fn begin(&mut self, m: &Opened<'_>, path: &str) -> Outcome {
        let name = Name::new(path);
        if let Some(o) = &self.open {
            if o.name.as_ref().is_some_and(|n| n.id == name.id) {
                return Ok(patch_summary("open", &name.shown, &o.patch));
            }
            match &o.name {
                Some(n) if o.unsaved => {
                    return Err(format!(
                        "{} has unsaved edits: SAVE PATCH first ({} edits would be lost)",
                        n.shown,
                        o.patch.edits.len()
                    )
                    .into())
                }
                // An existing file is continued as it is; it cannot take the edits over.
                None if !o.patch.edits.is_empty() && name.id.exists() => {
                    return Err(format!(
                        "{path} exists, and the unnamed session patch has {} edits that would be \
                         lost: BEGIN PATCH a file that does not exist yet to keep them",
                        o.patch.edits.len()
                    )
                    .into())
                }
                _ => {}
            }
        }
        let base = self.base(m)?;
        let patch = if name.id.exists() {
            // Continue an existing patch: it leaves the applied list (if there) for the open slot.
            let patch = Patch::load(Path::new(path))?;
            patch.check_base(&base, Path::new(path))?;
            self.applied.retain(|a| a.name.id != name.id);
            Some(patch)
        } else {
            None
        };
        // A saved named patch stays in effect, as if applied; an unnamed one's edits move
        // into the new patch.
        let carried = match self.open.take() {
            Some(o) => match o.name {
                Some(n) => {
                    let overlay = o.patch.overlay();
                    self.applied.push(Applied {
                        name: n,
                        patch: o.patch,
                        overlay,
                    });
                    None
                }
                None if !o.patch.edits.is_empty() => Some(o.patch),
                None => None,
            },
            None => None,
        };
        let unsaved = carried.is_some();
        let patch = patch.or(carried).unwrap_or_else(|| Patch::new(base));
        let r = patch_summary(if unsaved { "open, unsaved" } else { "open" }, path, &patch);
        self.open = Some(Open {
            name: Some(name),
            patch,
            unsaved,
        });
        Ok(r)
    }

    fn save(&mut self) -> Outcome {
        let open = self
            .open
            .as_mut()
            .ok_or("no patch is open: BEGIN PATCH \"file.vlp\", make edits, then SAVE PATCH")?;
        let name = open.name.as_ref().ok_or_else(|| {
            format!(
                "the {} edits so far are in the unnamed session patch: BEGIN PATCH \"file.vlp\" names it, then SAVE PATCH",
                open.patch.edits.len()
            )
        })?;
        let bytes = open.patch.save(Path::new(&name.shown))?;
        open.unsaved = false;
        let mut r = patch_summary("saved", &name.shown, &open.patch);
        r.notes.push(format!("{bytes} bytes written"));
        Ok(r)
    }

    fn apply(&mut self, m: &Opened<'_>, path: &str) -> Outcome {
        let name = Name::new(path);
        if self.applied.iter().any(|a| a.name.id == name.id)
            || self
                .open
                .as_ref()
                .is_some_and(|o| o.name.as_ref().is_some_and(|n| n.id == name.id))
        {
            return Err(format!("{path} is already applied (SHOW PATCHES lists what is)").into());
        }
        let patch = Patch::load(Path::new(path))?;
        patch.check_base(&self.base(m)?, Path::new(path))?;
        let r = patch_summary("applied", path, &patch);
        let overlay = patch.overlay();
        self.applied.push(Applied {
            name,
            patch,
            overlay,
        });
        Ok(r)
    }

    fn remove(&mut self, path: &str) -> Outcome {
        let name = Name::new(path);
        if let Some(i) = self.applied.iter().position(|a| a.name.id == name.id) {
            let a = self.applied.remove(i);
            return Ok(patch_summary("removed", path, &a.patch));
        }
        match &self.open {
            Some(o) if o.name.as_ref().is_some_and(|n| n.id == name.id) => {
                if o.unsaved {
                    return Err(format!(
                        "{path} is the open patch and has unsaved edits: SAVE PATCH first (its edits would be lost)"
                    )
                    .into());
                }
                let o = self.open.take().expect("matched above");
                Ok(patch_summary("removed", path, &o.patch))
            }
            _ => Err(format!("{path} is not applied (SHOW PATCHES lists what is)").into()),
        }
    }

    fn show(&self) -> ResultSet {
        let mut r = summary_columns();
        for a in &self.applied {
            push_summary(&mut r, "applied", &a.name.shown, &a.patch);
        }
        if let Some(o) = &self.open {
            let state = if o.unsaved { "open, unsaved" } else { "open" };
            let shown = o
                .name
                .as_ref()
                .map_or("(unnamed session patch)", |n| n.shown.as_str());
            push_summary(&mut r, state, shown, &o.patch);
        }
        r
    }

    /// DIFF a b: the edges that differ between two patch files; DIFF a: each edge of `a`
    /// beside what the base model says on its prompt (its greedy next token).
    fn diff(&mut self, m: &Opened<'_>, a: &str, b: Option<&str>) -> Outcome {
        let pa = Patch::load(Path::new(a))?;
        let mut r = ResultSet::new(&[
            ("change", ColumnType::Text),
            ("entity", ColumnType::Text),
            ("relation", ColumnType::Text),
            ("a", ColumnType::Text),
            ("b", ColumnType::Text),
        ]);
        let shown = |e: &Edit| match e.kind {
            EditKind::Insert => e.target.clone(),
            EditKind::Suppress => format!("not {}", e.target),
        };
        match b {
            Some(b) => {
                let pb = Patch::load(Path::new(b))?;
                if pa.base.sha256 != pb.base.sha256 {
                    r.notes.push(format!(
                        "the patches were made on different models ({} and {})",
                        pa.base.sha256, pb.base.sha256
                    ));
                }
                for e in &pa.edits {
                    let other = pb
                        .edits
                        .iter()
                        .find(|f| same_edge(f, &e.entity, &e.relation));
                    let (change, b_cell) = match other {
                        None => ("only in a", Cell::Null),
                        Some(f)
                            if shown(f) != shown(e)
                                || f.layers() != e.layers()
                                || f.prompt != e.prompt =>
                        {
                            ("differs", Cell::Text(shown(f)))
                        }
                        Some(_) => continue,
                    };
                    r.push(vec![
                        Cell::Text(change.into()),
                        Cell::Text(e.entity.clone()),
                        Cell::Text(e.relation.clone()),
                        Cell::Text(shown(e)),
                        b_cell,
                    ]);
                }
                for f in pb.edits.iter().filter(|f| {
                    !pa.edits
                        .iter()
                        .any(|e| same_edge(e, &f.entity, &f.relation))
                }) {
                    r.push(vec![
                        Cell::Text("only in b".into()),
                        Cell::Text(f.entity.clone()),
                        Cell::Text(f.relation.clone()),
                        Cell::Null,
                        Cell::Text(shown(f)),
                    ]);
                }
            }
            None => {
                pa.check_base(&self.base(m)?, Path::new(a))?;
                for e in &pa.edits {
                    let said = run(m.model, m.tokenizer, &e.prompt)?;
                    let id = top_n(&said.logits, 1)[0] as u32;
                    r.push(vec![
                        Cell::Text(match e.kind {
                            EditKind::Insert => "insert".into(),
                            EditKind::Suppress => "suppress".into(),
                        }),
                        Cell::Text(e.entity.clone()),
                        Cell::Text(e.relation.clone()),
                        Cell::Text(shown(e)),
                        Cell::Text(m.tokenizer.decode(&[id]).trim().to_string()),
                    ]);
                }
                r.notes
                    .push("b: the base model's greedy next token on each edit's prompt".into());
            }
        }
        Ok(r)
    }

    /// The open and applied patches, their deltas side by side.
    fn overlay(&self, n_layers: usize) -> Option<FfnOverlay> {
        let open = self.open.as_ref().map(|o| o.patch.overlay());
        let composed = self.composer.as_ref().and_then(Composer::overlay);
        stack(
            n_layers,
            self.applied
                .iter()
                .map(|a| &a.overlay)
                .chain(open.as_ref())
                .chain(composed.as_deref()),
        )
    }
}

fn summary_columns() -> ResultSet {
    ResultSet::new(&[
        ("patch", ColumnType::Text),
        ("state", ColumnType::Text),
        ("edits", ColumnType::Int),
        ("layers", ColumnType::Text),
        ("base_sha256", ColumnType::Text),
    ])
}

fn push_summary(r: &mut ResultSet, state: &str, shown: &str, p: &Patch) {
    let layers: BTreeSet<usize> = p.edits.iter().flat_map(|e| e.layers()).collect();
    r.push(vec![
        Cell::Text(shown.into()),
        Cell::Text(state.into()),
        Cell::Int(p.edits.len() as i64),
        Cell::Text(
            layers
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ),
        Cell::Text(p.base.sha256.clone()),
    ]);
}

fn patch_summary(state: &str, shown: &str, p: &Patch) -> ResultSet {
    let mut r = summary_columns();
    push_summary(&mut r, state, shown, p);
    r
}

/// COMPILE CURRENT INTO …: the overlay in effect, written as an adapter, a model file or a
/// vindex. Nothing is written when `path` exists (checked first) or anything fails.
fn compile(
    m: &Opened<'_>,
    overlay: Option<&FfnOverlay>,
    target: CompileTarget,
    path: &str,
    edits: usize,
) -> Outcome {
    let out = Path::new(path);
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(format!("{path} already exists; COMPILE never replaces a file").into());
    }
    let overlay = overlay.ok_or(
        "there are no edits to compile: INSERT, UPDATE or DELETE edges, or APPLY PATCH, first",
    )?;
    let model_error = |e: quarry_model::ModelError| Failure::Message(e.to_string());
    let what = match target {
        CompileTarget::Adapter => {
            write_adapter(overlay, m.model.config(), out).map_err(model_error)?;
            "LoRA adapter (GGUF)"
        }
        CompileTarget::Model { .. } => {
            write_patched_model(m.base_file(), overlay, None, out).map_err(model_error)?;
            "model (GGUF, edited down projections in Q8_0)"
        }
        CompileTarget::Vindex => {
            compile_vindex(m, overlay, out)?;
            "vindex (extracted from the compiled model)"
        }
    };
    let mut r = ResultSet::new(&[("key", ColumnType::Text), ("value", ColumnType::Text)]);
    let layers: Vec<String> = overlay.deltas().map(|(l, _)| l.to_string()).collect();
    for (k, v) in [
        ("written", path.to_string()),
        ("as", what.to_string()),
        ("edits", edits.to_string()),
        ("layers", layers.join(",")),
    ] {
        r.push(vec![Cell::Text(k.into()), Cell::Text(v)]);
    }
    Ok(r)
}

/// A vindex of the edited model: the model compiled to a temporary GGUF next to `out`, then
/// extracted (its feature tables are those of the edited weights) at the open vindex's level,
/// element type and tokens per feature (inference, f16, 10 for a GGUF opened alone).
fn compile_vindex(m: &Opened<'_>, overlay: &FfnOverlay, out: &Path) -> Result<(), Failure> {
    let options = match m.vindex {
        Some(v) => ExtractOptions {
            level: v.index().level,
            dtype: v.index().dtype,
            top_k: v.index().top_k,
        },
        None => ExtractOptions {
            level: Level::Inference,
            dtype: Dtype::F16,
            top_k: 10,
        },
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(out.file_name().unwrap_or_default());
    tmp_name.push(format!(".model-{}.gguf", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let result = write_patched_model(m.base_file(), overlay, None, &tmp)
        .map_err(|e| e.to_string())
        .and_then(|()| extract(&tmp, out, &options, &mut |_| {}).map_err(|e| e.to_string()));
    let _ = std::fs::remove_file(&tmp);
    result.map(|_| ()).map_err(Failure::Message)
}

/// `$QUARRY_MODELS_DIR`, default `~/.cache/quarry/models` (as `scripts/fetch-models`).
fn models_dir() -> PathBuf {
    match std::env::var_os("QUARRY_MODELS_DIR") {
        Some(d) => PathBuf::from(d),
        None => home().join(".cache/quarry/models"),
    }
}

/// `$QUARRY_EDIT_STATS_DIR`, default `edit-stats` beside the models directory.
fn stats_dir() -> PathBuf {
    match std::env::var_os(STATS_DIR_VAR) {
        Some(d) => PathBuf::from(d),
        None => {
            let models = models_dir();
            models
                .parent()
                .map_or_else(|| models.join("edit-stats"), |p| p.join("edit-stats"))
        }
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from)
}
