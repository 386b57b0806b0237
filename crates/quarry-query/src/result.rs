//! Typed result sets: named, typed columns and rows of cells, rendered as an aligned text
//! table or as JSON (`{"columns": [{"name", "type"}], "rows": [[...]], "notes": [...]}`).

use std::fmt::Write;

use serde_json::{json, Value};

/// The type of a column; every non-null cell of the column has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    Int,
    Float,
    Text,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Int => "int",
            ColumnType::Float => "float",
            ColumnType::Text => "text",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Int(i64),
    Float(f64),
    Text(String),
    Null,
}

impl Cell {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Cell::Int(i) => Some(*i as f64),
            Cell::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Cell::Int(i) => json!(i),
            Cell::Float(f) if f.is_finite() => json!(f),
            Cell::Float(f) => json!(f.to_string()),
            Cell::Text(s) => json!(s),
            Cell::Null => Value::Null,
        }
    }

    fn render(&self) -> String {
        match self {
            Cell::Int(i) => i.to_string(),
            Cell::Float(f) if f.abs() >= 1e-3 || *f == 0.0 => format!("{f:.4}"),
            Cell::Float(f) => format!("{f:.3e}"),
            // Control characters (a token may be "\n") would break the table's lines.
            Cell::Text(s) => s
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
            Cell::Null => String::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
}

/// The answer to one statement.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ResultSet {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Cell>>,
    /// Lines shown under the table (totals, what was computed and how).
    pub notes: Vec<String>,
}

impl ResultSet {
    pub fn new(columns: &[(&str, ColumnType)]) -> ResultSet {
        ResultSet {
            columns: columns
                .iter()
                .map(|&(name, ty)| Column {
                    name: name.into(),
                    ty,
                })
                .collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Appends a row; panics if its width differs from the columns' (a bug in the executor).
    pub fn push(&mut self, row: Vec<Cell>) {
        assert_eq!(row.len(), self.columns.len(), "row width");
        self.rows.push(row);
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "columns": self.columns.iter().map(|c| json!({"name": c.name, "type": c.ty.name()})).collect::<Vec<_>>(),
            "rows": self.rows.iter().map(|r| r.iter().map(Cell::to_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }

    /// An aligned table: numbers right-aligned, text left-aligned, then the notes.
    pub fn render_table(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(Cell::render).collect())
            .collect();
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([c.name.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        if !self.columns.is_empty() {
            let line = |out: &mut String, values: &[String], header: bool| {
                let parts: Vec<String> = values
                    .iter()
                    .zip(&self.columns)
                    .zip(&widths)
                    .map(|((v, c), &w)| {
                        let pad = w - v.chars().count();
                        if c.ty == ColumnType::Text || header {
                            format!("{v}{}", " ".repeat(pad))
                        } else {
                            format!("{}{v}", " ".repeat(pad))
                        }
                    })
                    .collect();
                let _ = writeln!(out, "{}", parts.join("  ").trim_end());
            };
            let names: Vec<String> = self.columns.iter().map(|c| c.name.clone()).collect();
            line(&mut out, &names, true);
            let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
            let _ = writeln!(out, "{}", rule.join("  "));
            for row in &cells {
                line(&mut out, row, false);
            }
            let _ = writeln!(
                out,
                "({} row{})",
                self.rows.len(),
                if self.rows.len() == 1 { "" } else { "s" }
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "{note}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_json_keeps_types() {
        let mut r = ResultSet::new(&[("token", ColumnType::Text), ("p", ColumnType::Float)]);
        r.push(vec![Cell::Text("Paris".into()), Cell::Float(0.5)]);
        r.push(vec![Cell::Text("a\nb".into()), Cell::Float(12.25)]);
        r.notes.push("done".into());
        let table = r.render_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "token  p");
        assert_eq!(lines[2], "Paris   0.5000");
        assert_eq!(lines[3], "a\\nb   12.2500");
        assert_eq!(lines[4], "(2 rows)");
        assert_eq!(lines[5], "done");
        let j = r.to_json();
        assert_eq!(j["columns"][1]["type"], "float");
        assert_eq!(j["rows"][0][0], "Paris");
        assert_eq!(j["rows"][1][1], 12.25);
    }
}
