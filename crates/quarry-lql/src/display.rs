//! The canonical printer: `Display` for every syntax-tree type.
//!
//! Output is the canonical form of the statement: uppercase keywords, single spaces, strings in
//! double quotes, `!=` for inequality, `ASC` and default scopes left out, a layer range `n-n`
//! written `n`, and parentheses in a condition only where precedence requires them. Numbers use
//! Rust's shortest round-tripping decimal form, which never has an exponent, so the lexer (which
//! reads no exponents) reads back the same `f64`. A statement prints without a trailing `;`.
//!
//! Types whose canonical form is empty ([`DescribeScope::Default`], [`Detail::Normal`]) print
//! nothing; the statement printer leaves out their separating space.

use std::fmt::{self, Display, Formatter};

use crate::ast::{
    CmpOp, DescribeScope, Detail, Expr, LayerRange, Literal, Nearest, OrderKey, Projection, Select,
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
                raw,
            } => {
                write!(f, "DESCRIBE {}", Quoted(entity))?;
                if *scope != DescribeScope::Default {
                    write!(f, " {scope}")?;
                }
                if *detail != Detail::Normal {
                    write!(f, " {detail}")?;
                }
                if *raw {
                    f.write_str(" RAW")?;
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
        }
    }
}

impl Display for ShowTarget {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            ShowTarget::Layers => f.write_str("LAYERS"),
            ShowTarget::Features { layer } => write!(f, "FEATURES {layer}"),
            ShowTarget::Relations => f.write_str("RELATIONS"),
            ShowTarget::Entities => f.write_str("ENTITIES"),
            ShowTarget::Models => f.write_str("MODELS"),
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
