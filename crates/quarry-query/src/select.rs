//! SELECT over the vindex's virtual tables, with real projections, WHERE (AND / OR / NOT,
//! BETWEEN, IN, LIKE, comparisons on every column), ORDER BY and LIMIT.
//!
//! Tables (columns are typed; see `docs/lql.md`):
//! - `FEATURES`: one row per (layer, feature) with the tokens it pushes up and down most.
//! - `EDGES`: one row per (layer, feature, token) of every feature's vocabulary projection.
//! - `ENTITIES`: one row per vocabulary token.
//!
//! `NEAREST TO "e" AT LAYER n` restricts FEATURES and EDGES to layer `n` and adds the
//! entity's `gate` score and signed `activation` per feature (ordered by activation unless an
//! ORDER BY is given); for ENTITIES it adds the cosine `similarity` of each token's embedding
//! to the entity's (ordered by it).

use std::cmp::Ordering;

use quarry_lql::{CmpOp, Expr, Literal, Projection, Select, Source};
use quarry_vindex::Vindex;

use crate::browse::{band, entity_input, ffn_input, fire, Firing};
use crate::result::{Cell, ColumnType, ResultSet};

/// Runs `q`; errors are plain messages (the executor adds the statement).
pub(crate) fn select(v: &Vindex, q: &Select) -> Result<ResultSet, String> {
    let (table, default_order) = scan(v, q)?;
    refine(table, q, default_order)
}

/// `q`'s WHERE, ORDER BY (else `default_order`: column index, descending), LIMIT and
/// projection applied to `table`.
pub(crate) fn refine(
    table: ResultSet,
    q: &Select,
    default_order: Vec<(usize, bool)>,
) -> Result<ResultSet, String> {
    let mut table = filter(table, q.filter.as_ref())?;
    let keys: Vec<(usize, bool)> = if q.order_by.is_empty() {
        default_order
    } else {
        q.order_by
            .iter()
            .map(|k| Ok((column(&table, &k.field)?, k.descending)))
            .collect::<Result<_, String>>()?
    };
    if !keys.is_empty() {
        table.rows.sort_by(|a, b| {
            keys.iter()
                .map(|&(i, desc)| {
                    let o = compare_cells(&a[i], &b[i]);
                    if desc {
                        o.reverse()
                    } else {
                        o
                    }
                })
                .find(|o| *o != Ordering::Equal)
                .unwrap_or(Ordering::Equal)
        });
    }
    limit(&mut table, q.limit);
    if let Projection::Fields(fields) = &q.fields {
        let idx: Vec<usize> = fields
            .iter()
            .map(|f| column(&table, f))
            .collect::<Result<_, _>>()?;
        table.columns = idx.iter().map(|&i| table.columns[i].clone()).collect();
        table.rows = table
            .rows
            .into_iter()
            .map(|r| idx.iter().map(|&i| r[i].clone()).collect())
            .collect();
    }
    Ok(table)
}

/// The rows of `table` for which `condition` holds (all rows without one).
pub(crate) fn filter(mut table: ResultSet, condition: Option<&Expr>) -> Result<ResultSet, String> {
    if let Some(condition) = condition {
        check_fields(&table, condition)?;
        let mut kept = Vec::new();
        for row in std::mem::take(&mut table.rows) {
            if eval(&table, &row, condition)? {
                kept.push(row);
            }
        }
        table.rows = kept;
    }
    Ok(table)
}

/// Keeps the first `limit` rows.
pub(crate) fn limit(table: &mut ResultSet, limit: Option<u64>) {
    if let Some(limit) = limit {
        table
            .rows
            .truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
}

/// The entities a condition on EDGES names with `entity = "…"` or `entity IN (…)` among its
/// top-level AND terms: `Some` (never empty) when it names any, `None` when no term mentions
/// `entity`; an error when `entity` appears only elsewhere (under OR or NOT, or compared
/// otherwise), since then no list of entities to ask about follows from it.
pub(crate) fn entities(condition: Option<&Expr>) -> Result<Option<Vec<String>>, String> {
    fn terms<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
        match e {
            Expr::And(a, b) => {
                terms(a, out);
                terms(b, out);
            }
            other => out.push(other),
        }
    }
    fn mentions(e: &Expr) -> bool {
        match e {
            Expr::Or(a, b) | Expr::And(a, b) => mentions(a) || mentions(b),
            Expr::Not(a) => mentions(a),
            Expr::Compare { field, .. }
            | Expr::Between { field, .. }
            | Expr::In { field, .. }
            | Expr::Like { field, .. } => field == "entity",
        }
    }
    let Some(condition) = condition else {
        return Ok(None);
    };
    let mut all = Vec::new();
    terms(condition, &mut all);
    let mut named: Option<Vec<String>> = None;
    for term in all {
        let values: Vec<&Literal> = match term {
            Expr::Compare {
                field,
                op: CmpOp::Eq,
                value,
            } if field == "entity" => vec![value],
            Expr::In {
                field,
                values,
                negated: false,
            } if field == "entity" => values.iter().collect(),
            _ => continue,
        };
        let mut texts = Vec::new();
        for value in values {
            match value {
                Literal::Str(s) => texts.push(s.clone()),
                Literal::Num(n) => {
                    return Err(format!(
                        "column entity is text, but it is compared with the number {n}"
                    ))
                }
            }
        }
        // Two terms on entity ask about the entities both name.
        named = Some(match named {
            None => texts,
            Some(before) => before.into_iter().filter(|e| texts.contains(e)).collect(),
        });
    }
    match named {
        Some(list) if !list.is_empty() => Ok(Some(list)),
        Some(_) => Err("the conditions on entity name no entity in common".into()),
        None if mentions(condition) => Err(
            "the edges of EDGES are read per entity: name them with entity = \"…\" or entity \
             IN (\"…\", …), joined to the rest of the condition by AND"
                .into(),
        ),
        None => Ok(None),
    }
}

fn column(t: &ResultSet, name: &str) -> Result<usize, String> {
    t.column(name).ok_or_else(|| {
        let names: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
        format!("no column {name:?}; the columns are {}", names.join(", "))
    })
}

fn token_text(v: &Vindex, id: u32) -> String {
    v.tokenizer().decode(&[id])
}

/// The rows of the table (restricted by NEAREST), and the default order.
fn scan(v: &Vindex, q: &Select) -> Result<(ResultSet, Vec<(usize, bool)>), String> {
    let m = &v.index().model;
    let layers: Vec<usize> = match &q.nearest {
        Some(n) if n.layer as usize >= m.n_layers => {
            return Err(format!(
                "AT LAYER {}: the model has layers 0-{}",
                n.layer,
                m.n_layers - 1
            ))
        }
        Some(n) => vec![n.layer as usize],
        None => (0..m.n_layers).collect(),
    };
    let firings: Option<Vec<Firing>> = match (&q.nearest, q.from) {
        (Some(n), Source::Features | Source::Edges) => {
            let e = entity_input(v, &n.entity)
                .ok_or_else(|| format!("{:?} has no tokens", n.entity))?;
            let layer = n.layer as usize;
            Some(fire(v, layer, &ffn_input(v, layer, &e.input)))
        }
        _ => None,
    };
    let with_firing = firings.is_some();
    let mut cols: Vec<(&str, ColumnType)> = match q.from {
        Source::Features => vec![
            ("layer", ColumnType::Int),
            ("feature", ColumnType::Int),
            ("band", ColumnType::Text),
            ("top_token", ColumnType::Text),
            ("top_logit", ColumnType::Float),
            ("bottom_token", ColumnType::Text),
            ("bottom_logit", ColumnType::Float),
        ],
        Source::Edges => vec![
            ("layer", ColumnType::Int),
            ("feature", ColumnType::Int),
            ("direction", ColumnType::Text),
            ("rank", ColumnType::Int),
            ("token", ColumnType::Text),
            ("token_id", ColumnType::Int),
            ("logit", ColumnType::Float),
        ],
        Source::Entities => vec![("id", ColumnType::Int), ("token", ColumnType::Text)],
    };
    if with_firing {
        cols.extend([
            ("gate", ColumnType::Float),
            ("activation", ColumnType::Float),
        ]);
    }
    let entity_sim = match (&q.nearest, q.from) {
        (Some(n), Source::Entities) => {
            cols.push(("similarity", ColumnType::Float));
            let e = entity_input(v, &n.entity)
                .ok_or_else(|| format!("{:?} has no tokens", n.entity))?;
            Some(e.input)
        }
        _ => None,
    };
    let mut t = ResultSet::new(&cols);
    let firing_cells = |f: usize| -> Vec<Cell> {
        firings.as_ref().map_or(Vec::new(), |fs| {
            vec![
                Cell::Float(fs[f].gate as f64),
                Cell::Float(fs[f].activation as f64),
            ]
        })
    };
    match q.from {
        Source::Features => {
            for &layer in &layers {
                for f in 0..m.ff_dim {
                    let (top, bottom) = v.writes(layer, f);
                    let mut row = vec![
                        Cell::Int(layer as i64),
                        Cell::Int(f as i64),
                        Cell::Text(band(v, layer).into()),
                        Cell::Text(token_text(v, top[0].token)),
                        Cell::Float(top[0].logit as f64),
                        Cell::Text(token_text(v, bottom[0].token)),
                        Cell::Float(bottom[0].logit as f64),
                    ];
                    row.extend(firing_cells(f));
                    t.push(row);
                }
            }
        }
        Source::Edges => {
            for &layer in &layers {
                for f in 0..m.ff_dim {
                    let (top, bottom) = v.writes(layer, f);
                    for (direction, side) in [("up", top), ("down", bottom)] {
                        for (rank, r) in side.iter().enumerate() {
                            let mut row = vec![
                                Cell::Int(layer as i64),
                                Cell::Int(f as i64),
                                Cell::Text(direction.into()),
                                Cell::Int(rank as i64 + 1),
                                Cell::Text(token_text(v, r.token)),
                                Cell::Int(r.token as i64),
                                Cell::Float(r.logit as f64),
                            ];
                            row.extend(firing_cells(f));
                            t.push(row);
                        }
                    }
                }
            }
        }
        Source::Entities => {
            let norm = |x: &[f32]| x.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
            let target_norm = entity_sim.as_deref().map(norm);
            for id in 0..m.vocab_size as u32 {
                let mut row = vec![Cell::Int(id as i64), Cell::Text(token_text(v, id))];
                if let (Some(x), Some(xn)) = (&entity_sim, target_norm) {
                    let e = v.embedding(id);
                    let dot: f32 = e.iter().zip(x).map(|(a, b)| a * b).sum();
                    row.push(Cell::Float((dot / (norm(&e) * xn)) as f64));
                }
                t.push(row);
            }
        }
    }
    let default_order = if let Some(i) = t.column("activation") {
        vec![(i, true)]
    } else if let Some(i) = t.column("similarity") {
        vec![(i, true)]
    } else {
        Vec::new()
    };
    Ok((t, default_order))
}

/// Every field a filter names must be a column.
fn check_fields(t: &ResultSet, e: &Expr) -> Result<(), String> {
    match e {
        Expr::Or(a, b) | Expr::And(a, b) => {
            check_fields(t, a)?;
            check_fields(t, b)
        }
        Expr::Not(a) => check_fields(t, a),
        Expr::Compare { field, .. }
        | Expr::Between { field, .. }
        | Expr::In { field, .. }
        | Expr::Like { field, .. } => column(t, field).map(|_| ()),
    }
}

fn eval(t: &ResultSet, row: &[Cell], e: &Expr) -> Result<bool, String> {
    Ok(match e {
        Expr::Or(a, b) => eval(t, row, a)? || eval(t, row, b)?,
        Expr::And(a, b) => eval(t, row, a)? && eval(t, row, b)?,
        Expr::Not(a) => !eval(t, row, a)?,
        Expr::Compare { field, op, value } => {
            let o = compare_literal(t, row, field, value)?;
            match op {
                CmpOp::Eq => o == Ordering::Equal,
                CmpOp::Ne => o != Ordering::Equal,
                CmpOp::Lt => o == Ordering::Less,
                CmpOp::Le => o != Ordering::Greater,
                CmpOp::Gt => o == Ordering::Greater,
                CmpOp::Ge => o != Ordering::Less,
            }
        }
        Expr::Between {
            field,
            low,
            high,
            negated,
        } => {
            let inside = compare_literal(t, row, field, low)? != Ordering::Less
                && compare_literal(t, row, field, high)? != Ordering::Greater;
            inside != *negated
        }
        Expr::In {
            field,
            values,
            negated,
        } => {
            let mut found = false;
            for value in values {
                found |= compare_literal(t, row, field, value)? == Ordering::Equal;
            }
            found != *negated
        }
        Expr::Like {
            field,
            pattern,
            negated,
        } => {
            let i = column(t, field)?;
            let text = match &row[i] {
                Cell::Text(s) => s.clone(),
                other => other.as_f64().map_or(String::new(), |f| f.to_string()),
            };
            like(&text, pattern) != *negated
        }
    })
}

/// Compares a row's `field` with a literal of the column's kind.
fn compare_literal(
    t: &ResultSet,
    row: &[Cell],
    field: &str,
    value: &Literal,
) -> Result<Ordering, String> {
    let i = column(t, field)?;
    match (t.columns[i].ty, value) {
        (ColumnType::Text, Literal::Str(s)) => Ok(row[i].as_str().unwrap_or("").cmp(s.as_str())),
        (ColumnType::Int | ColumnType::Float, Literal::Num(n)) => {
            Ok(row[i].as_f64().map_or(Ordering::Less, |x| x.total_cmp(n)))
        }
        (ty, lit) => Err(format!(
            "column {field} is {}, but it is compared with {}",
            ty.name(),
            match lit {
                Literal::Str(s) => format!("the string {s:?}"),
                Literal::Num(n) => format!("the number {n}"),
            }
        )),
    }
}

fn compare_cells(a: &Cell, b: &Cell) -> Ordering {
    match (a, b) {
        (Cell::Text(x), Cell::Text(y)) => x.cmp(y),
        _ => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => Ordering::Greater,
            (None, Some(_)) => Ordering::Less,
            (None, None) => Ordering::Equal,
        },
    }
}

/// SQL LIKE: `%` matches any run of characters, `_` exactly one; case-sensitive.
pub(crate) fn like(text: &str, pattern: &str) -> bool {
    let t: Vec<char> = text.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    // Iterative matching with one backtrack point for the last `%` (linear in practice).
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '%')
}

#[cfg(test)]
mod tests {
    use super::{entities, like};

    fn condition(text: &str) -> quarry_lql::Expr {
        match quarry_lql::parse(&format!("SELECT * FROM EDGES WHERE {text}"))
            .unwrap()
            .remove(0)
        {
            quarry_lql::Statement::Select(q) => q.filter.unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_entities_of_an_edges_condition() {
        let named = |text: &str| entities(Some(&condition(text)));
        assert_eq!(
            named(r#"entity = "France" AND relation = "capital""#).unwrap(),
            Some(vec!["France".to_string()])
        );
        assert_eq!(
            named(r#"entity IN ("France", "Japan") AND score > 0.1 AND entity != "x""#).unwrap(),
            Some(vec!["France".to_string(), "Japan".to_string()])
        );
        assert_eq!(
            named(r#"entity IN ("France", "Japan") AND entity = "Japan""#).unwrap(),
            Some(vec!["Japan".to_string()])
        );
        assert_eq!(named("layer = 2").unwrap(), None);
        assert_eq!(entities(None).unwrap(), None);
        for (text, needle) in [
            (r#"entity = "France" OR layer = 2"#, "entity IN"),
            (r#"NOT entity = "France""#, "entity IN"),
            ("entity = 3", "compared with the number 3"),
            (
                r#"entity = "France" AND entity = "Japan""#,
                "no entity in common",
            ),
        ] {
            let err = named(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn like_matches_sql_semantics() {
        assert!(like("Paris", "Par%"));
        assert!(like("Paris", "%is"));
        assert!(like("Paris", "P_r_s"));
        assert!(like("Paris", "%"));
        assert!(like("", "%"));
        assert!(!like("Paris", "par%"));
        assert!(!like("Paris", "P_s"));
        assert!(like("a%b", "a%b"));
        assert!(like("abcabc", "%bc%bc"));
        assert!(!like("abcab", "%bc%bc"));
    }
}
