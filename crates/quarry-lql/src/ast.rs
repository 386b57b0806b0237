//! The syntax tree of LQL.
//!
//! The types mirror the grammar: one variant per statement form, an `Option` or `bool` per
//! optional clause. They carry no source positions, so two parses of differently formatted but
//! equivalent text compare equal. Strings hold their unescaped contents.

/// One LQL statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// `USE "path"`: selects the model to query.
    Use { path: String },
    /// `STATS`.
    Stats,
    /// `SHOW …`.
    Show(ShowTarget),
    /// `[EXPLAIN] WALK "prompt" [TOP n] [LAYERS a-b]`.
    Walk {
        prompt: String,
        top: Option<u32>,
        layers: Option<LayerRange>,
        explain: bool,
    },
    /// `DESCRIBE "entity" [scope] [BRIEF | VERBOSE] [RELATIONS ONLY] [VIA FEATURES | RAW]`.
    Describe {
        entity: String,
        scope: DescribeScope,
        detail: Detail,
        /// `RELATIONS ONLY`: only edges with a relation label (every edge of the default
        /// method has one; the feature methods also list unlabelled features).
        relations_only: bool,
        method: DescribeMethod,
    },
    /// `SELECT … FROM …`.
    Select(Select),
    /// `INFER "prompt" [TOP n]` or `EXPLAIN INFER "prompt" [TOP n] [LAYERS a-b]`; `layers` is only
    /// ever set when `explain` is.
    Infer {
        prompt: String,
        top: Option<u32>,
        explain: bool,
        layers: Option<LayerRange>,
    },
    /// `TRACE "prompt" [FOR "token"] [DECOMPOSE] [LAYERS a-b]`.
    Trace {
        prompt: String,
        target: Option<String>,
        decompose: bool,
        layers: Option<LayerRange>,
    },
    /// `INSERT INTO EDGES (entity, relation, target) VALUES (…), … [AT LAYER n | LAYERS a-b]
    /// [TEMPLATE "…{entity}…"] [MODE COMPOSE]`. `AT LAYER n` parses to `LAYERS n`.
    Insert {
        /// The rows in the order written; never empty and at most
        /// [`MAX_INSERT_ROWS`](crate::MAX_INSERT_ROWS) when parsed.
        edges: Vec<EdgeValue>,
        layers: Option<LayerRange>,
        /// A prompt template for every row; contains `{entity}` exactly once when parsed.
        template: Option<String>,
        mode: EditMode,
    },
    /// `UPDATE EDGES SET target = "t" WHERE entity = "e" AND relation = "r" [AT LAYER n |
    /// LAYERS a-b] [TEMPLATE "…{entity}…"]`; the two conditions may come in either order.
    Update {
        entity: String,
        relation: String,
        target: String,
        layers: Option<LayerRange>,
        /// As for [`Statement::Insert`].
        template: Option<String>,
    },
    /// `DELETE FROM EDGES WHERE entity = "e" AND relation = "r"` (either order).
    Delete { entity: String, relation: String },
    /// `BEGIN PATCH`, `SAVE PATCH`, `APPLY PATCH`, `REMOVE PATCH` or `DIFF`.
    Patch(PatchStatement),
    /// `COMPILE CURRENT INTO (VINDEX | MODEL | ADAPTER) "path" [FORMAT GGUF]`; `FORMAT` only
    /// with `MODEL`.
    Compile { target: CompileTarget, path: String },
}

/// One row of `INSERT … VALUES`: the fact `entity —relation→ target`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EdgeValue {
    pub entity: String,
    pub relation: String,
    pub target: String,
}

/// How `INSERT` writes its edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EditMode {
    /// No `MODE` clause: the engine's editing algorithm.
    #[default]
    Default,
    /// `MODE COMPOSE`: LARQL's method, kept to compare against.
    Compose,
}

/// The statements that manage patches (recorded sets of edits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PatchStatement {
    /// `BEGIN PATCH "path"`: record the following edits into a patch saved to `path`.
    Begin { path: String },
    /// `SAVE PATCH`: write the open patch to the path given at `BEGIN PATCH`.
    Save,
    /// `APPLY PATCH "path"`.
    Apply { path: String },
    /// `REMOVE PATCH "path"`.
    Remove { path: String },
    /// `DIFF "a" ["b"]`: patch `a` against patch `b`, or against the base without `b`.
    Diff { a: String, b: Option<String> },
}

/// What `COMPILE CURRENT INTO` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompileTarget {
    /// `VINDEX`: a vindex with the edits built in.
    Vindex,
    /// `MODEL [FORMAT f]`: a model file; without `FORMAT` the engine picks the format.
    Model { format: Option<ModelFormat> },
    /// `ADAPTER`: the edits alone, as a LoRA adapter.
    Adapter,
}

/// The file format of `COMPILE … INTO MODEL … FORMAT f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFormat {
    Gguf,
}

/// What `SHOW` lists.
#[derive(Debug, Clone, PartialEq)]
pub enum ShowTarget {
    Layers,
    /// `SHOW FEATURES n [WHERE condition] [LIMIT n]`.
    Features {
        layer: u32,
        filter: Option<Expr>,
        limit: Option<u64>,
    },
    /// `SHOW RELATIONS [VIA FEATURES] [AT LAYER n] [WITH EXAMPLES]`: the catalogue relations
    /// the model answers; with `VIA FEATURES` or `AT LAYER n`, the clusters of feature edges
    /// (of layer `n`).
    Relations {
        features: bool,
        layer: Option<u32>,
        examples: bool,
    },
    /// `SHOW ENTITIES [AT LAYER n] [LIMIT n]`.
    Entities {
        layer: Option<u32>,
        limit: Option<u64>,
    },
    Models,
    /// The patches applied to the open model.
    Patches,
}

/// An inclusive range of layers; the parser guarantees `first <= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerRange {
    pub first: u32,
    pub last: u32,
}

/// Which layers or aspect of an entity `DESCRIBE` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DescribeScope {
    /// No scope clause: the engine's default.
    #[default]
    Default,
    AtLayer(u32),
    AllLayers,
    Syntax,
    Knowledge,
    Output,
}

/// How `DESCRIBE` finds an entity's edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DescribeMethod {
    /// No method clause: ask the model each catalogue relation and keep what it answers (the
    /// scope does not apply).
    #[default]
    Answers,
    /// `VIA FEATURES`: the feature-level readout over the scope's layers.
    Features,
    /// `RAW`: LARQL's readout, |embedding · gate| times each feature's top writes.
    Raw,
}

/// How much `DESCRIBE` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Detail {
    /// Neither `BRIEF` nor `VERBOSE`.
    #[default]
    Normal,
    Brief,
    Verbose,
}

/// A `SELECT` statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    pub fields: Projection,
    pub from: Source,
    pub nearest: Option<Nearest>,
    pub filter: Option<Expr>,
    /// Sort keys, most significant first; empty without `ORDER BY`.
    pub order_by: Vec<OrderKey>,
    pub limit: Option<u64>,
}

/// The columns a `SELECT` returns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Projection {
    /// `*`.
    All,
    /// Named fields in the order written; never empty when parsed.
    Fields(Vec<String>),
}

/// The table a `SELECT` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Edges,
    Features,
    Entities,
}

/// `NEAREST TO "entity" AT LAYER n`: rank rows by closeness to an entity at one layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nearest {
    pub entity: String,
    pub layer: u32,
}

/// One `ORDER BY` key; ascending unless `descending`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderKey {
    pub field: String,
    pub descending: bool,
}

/// A `WHERE` condition. `Or` and `And` are left-associative as parsed: `a OR b OR c` is
/// `Or(Or(a, b), c)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    /// `field op value`.
    Compare {
        field: String,
        op: CmpOp,
        value: Literal,
    },
    /// `field [NOT] BETWEEN low AND high` (inclusive).
    Between {
        field: String,
        low: Literal,
        high: Literal,
        negated: bool,
    },
    /// `field [NOT] IN (v, …)`; `values` is never empty when parsed.
    In {
        field: String,
        values: Vec<Literal>,
        negated: bool,
    },
    /// `field [NOT] LIKE "pattern"`; the pattern's syntax is the engine's business.
    Like {
        field: String,
        pattern: String,
        negated: bool,
    },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    /// `!=`, also written `<>`.
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A constant in a condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    /// Always finite when parsed.
    Num(f64),
}
