//! The canonical printer: `Display` for every syntax-tree type.
//!
//! Output is the canonical form of the statement: uppercase keywords, single spaces, strings in
//! double quotes, `!=` for inequality, `ASC`, default scopes and the default `MODE` left out, a
//! layer range `n-n` written `n` (so an edit's `AT LAYER n` prints as `LAYERS n`), and
//! parentheses in a condition only where precedence requires them. Numbers use Rust's shortest
//! round-tripping decimal form, which never has an exponent, so the lexer (which reads no
//! exponents) reads back the same `f64`. A statement prints without a trailing `;`.
//!
//! Types whose canonical form is empty ([`DescribeScope::Default`], [`Detail::Normal`]) print
//! nothing; the statement printer leaves out their separating space.

use std::fmt::{self, Display, Formatter};

use crate::ast::{
    CmpOp, CompileTarget, DescribeMethod, DescribeScope, Detail, EdgeValue, EditMode, Expr,
    LayerRange, Literal, ModelFormat, Nearest, OrderKey, PatchStatement, Projection, Select,
    ShowTarget, Source, Statement,
};

/// A string printed as a double-quoted LQL string literal (also used in error messages).
pub(crate) struct Quoted<'a>(pub(crate) &'a str);

impl Display for Quoted<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                _ => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

/// Writes `" TOP n"` when a top count is present.
fn write_top(f: &mut Formatter<'_>, top: Option<u32>) -> fmt::Result {
    match top {
        Some(n) => write!(f, " TOP {n}"),
        None => Ok(()),
    }
}

/// Writes `" LAYERS a-b"` when a range is present.
fn write_layers(f: &mut Formatter<'_>, layers: Option<LayerRange>) -> fmt::Result {
    match layers {
        Some(range) => write!(f, " LAYERS {range}"),
        None => Ok(()),
    }
}

/// Writes `" TEMPLATE \"…\""` when a template is present.
fn write_template(f: &mut Formatter<'_>, template: Option<&str>) -> fmt::Result {
    match template {
        Some(template) => write!(f, " TEMPLATE {}", Quoted(template)),
        None => Ok(()),
    }
}

/// Writes the `WHERE` clause that picks one edge in `UPDATE` and `DELETE`.
fn write_edge_key(f: &mut Formatter<'_>, entity: &str, relation: &str) -> fmt::Result {
    write!(
        f,
        " WHERE entity = {} AND relation = {}",
        Quoted(entity),
        Quoted(relation)
    )
}

fn write_explain(f: &mut Formatter<'_>, explain: bool) -> fmt::Result {
    if explain {
        f.write_str("EXPLAIN ")?;
    }
    Ok(())
}

impl Display for Statement {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Statement::Use { path } => write!(f, "USE {}", Quoted(path)),
            Statement::Stats => f.write_str("STATS"),
            Statement::Show(target) => write!(f, "SHOW {target}"),
            Statement::Walk {
                prompt,
                top,
                layers,
                explain,
            } => {
                write_explain(f, *explain)?;
                write!(f, "WALK {}", Quoted(prompt))?;
                write_top(f, *top)?;
                write_layers(f, *layers)
            }
            Statement::Describe {
                entity,
                scope,
                detail,
                relations_only,
                method,
            } => {
                write!(f, "DESCRIBE {}", Quoted(entity))?;
                if *scope != DescribeScope::Default {
                    write!(f, " {scope}")?;
                }
                if *detail != Detail::Normal {
                    write!(f, " {detail}")?;
                }
                if *relations_only {
                    f.write_str(" RELATIONS ONLY")?;
                }
                match method {
                    DescribeMethod::Answers => {}
                    DescribeMethod::Features => f.write_str(" VIA FEATURES")?,
                    DescribeMethod::Raw => f.write_str(" RAW")?,
                }
                Ok(())
            }
            Statement::Select(select) => write!(f, "{select}"),
            Statement::Infer {
                prompt,
                top,
                explain,
                layers,
            } => {
                write_explain(f, *explain)?;
                write!(f, "INFER {}", Quoted(prompt))?;
                write_top(f, *top)?;
                write_layers(f, *layers)
            }
            Statement::Trace {
                prompt,
                target,
                decompose,
                layers,
            } => {
                write!(f, "TRACE {}", Quoted(prompt))?;
                if let Some(token) = target {
                    write!(f, " FOR {}", Quoted(token))?;
                }
                if *decompose {
                    f.write_str(" DECOMPOSE")?;
                }
                write_layers(f, *layers)
            }
            Statement::Insert {
                edges,
                layers,
                template,
                mode,
            } => {
                f.write_str("INSERT INTO EDGES (entity, relation, target) VALUES ")?;
                write_list(f, edges)?;
                write_layers(f, *layers)?;
                write_template(f, template.as_deref())?;
                match mode {
                    EditMode::Default => Ok(()),
                    EditMode::Compose => f.write_str(" MODE COMPOSE"),
                }
            }
            Statement::Update {
                entity,
                relation,
                target,
                layers,
                template,
            } => {
                write!(f, "UPDATE EDGES SET target = {}", Quoted(target))?;
                write_edge_key(f, entity, relation)?;
                write_layers(f, *layers)?;
                write_template(f, template.as_deref())
            }
            Statement::Delete { entity, relation } => {
                f.write_str("DELETE FROM EDGES")?;
                write_edge_key(f, entity, relation)
            }
            Statement::Patch(patch) => write!(f, "{patch}"),
            Statement::Compile { target, path } => {
                write!(
                    f,
                    "COMPILE CURRENT INTO {} {}",
                    target.keyword(),
                    Quoted(path)
                )?;
                match target {
                    CompileTarget::Model {
                        format: Some(format),
                    } => write!(f, " FORMAT {format}"),
                    _ => Ok(()),
                }
            }
        }
    }
}

impl Display for EdgeValue {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "({}, {}, {})",
            Quoted(&self.entity),
            Quoted(&self.relation),
            Quoted(&self.target)
        )
    }
}

impl CompileTarget {
    /// The word after `COMPILE CURRENT INTO`.
    pub(crate) fn keyword(self) -> &'static str {
        match self {
            CompileTarget::Vindex => "VINDEX",
            CompileTarget::Model { .. } => "MODEL",
            CompileTarget::Adapter => "ADAPTER",
        }
    }
}

impl Display for PatchStatement {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            PatchStatement::Begin { path } => write!(f, "BEGIN PATCH {}", Quoted(path)),
            PatchStatement::Save => f.write_str("SAVE PATCH"),
            PatchStatement::Apply { path } => write!(f, "APPLY PATCH {}", Quoted(path)),
            PatchStatement::Remove { path } => write!(f, "REMOVE PATCH {}", Quoted(path)),
            PatchStatement::Diff { a, b } => {
                write!(f, "DIFF {}", Quoted(a))?;
                match b {
                    Some(b) => write!(f, " {}", Quoted(b)),
                    None => Ok(()),
                }
            }
        }
    }
}

impl Display for ModelFormat {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFormat::Gguf => "GGUF",
        })
    }
}

impl Display for ShowTarget {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            ShowTarget::Layers => f.write_str("LAYERS"),
            ShowTarget::Features {
                layer,
                filter,
                limit,
            } => {
                write!(f, "FEATURES {layer}")?;
                if let Some(filter) = filter {
                    write!(f, " WHERE {filter}")?;
                }
                if let Some(limit) = limit {
                    write!(f, " LIMIT {limit}")?;
                }
                Ok(())
            }
            ShowTarget::Relations {
                features,
                layer,
                examples,
            } => {
                f.write_str("RELATIONS")?;
                if *features {
                    f.write_str(" VIA FEATURES")?;
                }
                if let Some(layer) = layer {
                    write!(f, " AT LAYER {layer}")?;
                }
                if *examples {
                    f.write_str(" WITH EXAMPLES")?;
                }
                Ok(())
            }
            ShowTarget::Entities { layer, limit } => {
                f.write_str("ENTITIES")?;
                if let Some(layer) = layer {
                    write!(f, " AT LAYER {layer}")?;
                }
                if let Some(limit) = limit {
                    write!(f, " LIMIT {limit}")?;
                }
                Ok(())
            }
            ShowTarget::Models => f.write_str("MODELS"),
            ShowTarget::Patches => f.write_str("PATCHES"),
        }
    }
}

impl Display for LayerRange {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Display for DescribeScope {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            DescribeScope::Default => Ok(()),
            DescribeScope::AtLayer(layer) => write!(f, "AT LAYER {layer}"),
            DescribeScope::AllLayers => f.write_str("ALL LAYERS"),
            DescribeScope::Syntax => f.write_str("SYNTAX"),
            DescribeScope::Knowledge => f.write_str("KNOWLEDGE"),
            DescribeScope::Output => f.write_str("OUTPUT"),
        }
    }
}

impl Display for Detail {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Detail::Normal => Ok(()),
            Detail::Brief => f.write_str("BRIEF"),
            Detail::Verbose => f.write_str("VERBOSE"),
        }
    }
}

impl Display for Select {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "SELECT {} FROM {}", self.fields, self.from)?;
        if let Some(nearest) = &self.nearest {
            write!(f, " {nearest}")?;
        }
        if let Some(filter) = &self.filter {
            write!(f, " WHERE {filter}")?;
        }
        if !self.order_by.is_empty() {
            f.write_str(" ORDER BY ")?;
            write_list(f, &self.order_by)?;
        }
        if let Some(limit) = self.limit {
            write!(f, " LIMIT {limit}")?;
        }
        Ok(())
    }
}

/// Writes items separated by `", "`.
fn write_list<T: Display>(f: &mut Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

impl Display for Projection {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Projection::All => f.write_str("*"),
            Projection::Fields(fields) => write_list(f, fields),
        }
    }
}

impl Display for Source {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Edges => "EDGES",
            Source::Features => "FEATURES",
            Source::Entities => "ENTITIES",
        })
    }
}

impl Display for Nearest {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NEAREST TO {} AT LAYER {}",
            Quoted(&self.entity),
            self.layer
        )
    }
}

impl Display for OrderKey {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(&self.field)?;
        if self.descending {
            f.write_str(" DESC")?;
        }
        Ok(())
    }
}

/// Binding strength of an expression's top operator; higher binds tighter.
fn precedence(expr: &Expr) -> u8 {
    match expr {
        Expr::Or(..) => 1,
        Expr::And(..) => 2,
        Expr::Not(..) => 3,
        Expr::Compare { .. } | Expr::Between { .. } | Expr::In { .. } | Expr::Like { .. } => 4,
    }
}

/// An operand printed inside parentheses when its operator binds less tightly than `min`.
///
/// Binary operators are left-associative, so a right operand needs one level more than its
/// parent (`a OR (b OR c)` keeps its parentheses, `(a OR b) OR c` loses them).
struct Operand<'a> {
    expr: &'a Expr,
    min: u8,
}

impl Display for Operand<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if precedence(self.expr) < self.min {
            write!(f, "({})", self.expr)
        } else {
            write!(f, "{}", self.expr)
        }
    }
}

/// Writes a left-associative binary operation whose operator binds at `level`.
fn write_binary(
    f: &mut Formatter<'_>,
    lhs: &Expr,
    keyword: &str,
    rhs: &Expr,
    level: u8,
) -> fmt::Result {
    let left = Operand {
        expr: lhs,
        min: level,
    };
    let right = Operand {
        expr: rhs,
        min: level + 1,
    };
    write!(f, "{left} {keyword} {right}")
}

/// `" NOT"` for a negated predicate, else nothing.
fn not_word(negated: bool) -> &'static str {
    if negated {
        " NOT"
    } else {
        ""
    }
}

impl Display for Expr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let level = precedence(self);
        match self {
            Expr::Or(lhs, rhs) => write_binary(f, lhs, "OR", rhs, level),
            Expr::And(lhs, rhs) => write_binary(f, lhs, "AND", rhs, level),
            Expr::Not(inner) => write!(
                f,
                "NOT {}",
                Operand {
                    expr: inner,
                    min: level,
                }
            ),
            Expr::Compare { field, op, value } => write!(f, "{field} {op} {value}"),
            Expr::Between {
                field,
                low,
                high,
                negated,
            } => write!(f, "{field}{} BETWEEN {low} AND {high}", not_word(*negated)),
            Expr::In {
                field,
                values,
                negated,
            } => {
                write!(f, "{field}{} IN (", not_word(*negated))?;
                write_list(f, values)?;
                f.write_str(")")
            }
            Expr::Like {
                field,
                pattern,
                negated,
            } => write!(f, "{field}{} LIKE {}", not_word(*negated), Quoted(pattern)),
        }
    }
}

impl Display for CmpOp {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        })
    }
}

impl Display for Literal {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Str(s) => write!(f, "{}", Quoted(s)),
            Literal::Num(n) => write!(f, "{n}"),
        }
    }
}
