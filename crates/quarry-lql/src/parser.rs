//! A recursive-descent parser for LQL scripts.
//!
//! The grammar is LL(1): every decision looks at the next token only. Each statement's optional
//! clauses are accepted in one fixed order, each at most once, which keeps the grammar (and the
//! syntax tree) free of duplicate or conflicting clauses; a clause out of order is reported with
//! the right order as a hint.
//!
//! Messages name what was expected and what was found (`expected a quoted prompt after WALK,
//! found number 42`), and a hint offers either a close keyword (`did you mean DESCRIBE?`, for
//! words at most two edits away) or a correct example.
//!
//! Conditions nest at most [`MAX_EXPR_DEPTH`] deep, counting both the parser's recursion
//! (parentheses, `NOT`) and the height of the resulting tree (long `AND`/`OR` chains), because
//! printing and dropping a tree recurse over its height.

use std::str::FromStr;

use crate::ast::{
    CmpOp, CompileTarget, DescribeMethod, DescribeScope, Detail, EdgeValue, EditMode, Expr,
    LayerRange, Literal, ModelFormat, Nearest, OrderKey, PatchStatement, Projection, Select,
    ShowTarget, Source, Statement,
};
use crate::display::Quoted;
use crate::error::ParseError;
use crate::lexer::{shorten, tokenize, Kind, Pos, Sym, Token};

/// The deepest a `WHERE` condition may nest: at most this many operators (`NOT`, `AND`, `OR`)
/// on any path from the top of the condition down to a predicate, and at most this many
/// parentheses and `NOT`s inside each other. Deeper conditions are rejected rather than risking
/// the stack.
pub const MAX_EXPR_DEPTH: usize = 256;

/// The most rows one `INSERT` may carry. Every row is solved into the model together, so a
/// script should not be able to grow one statement without bound; larger sets of edits are
/// split over several `INSERT`s (in one patch).
pub const MAX_INSERT_ROWS: usize = 10_000;

const USE_EXAMPLE: &str = r#"USE "models/gemma-3-270m-it-Q4_K_M.gguf""#;
const SHOW_EXAMPLE: &str = "SHOW FEATURES 12";
const SHOW_RELATIONS_EXAMPLE: &str = "SHOW RELATIONS VIA FEATURES AT LAYER 12 WITH EXAMPLES";
const SHOW_ENTITIES_EXAMPLE: &str = "SHOW ENTITIES AT LAYER 12 LIMIT 20";
const WALK_EXAMPLE: &str = r#"WALK "The capital of France is" TOP 10"#;
const EXPLAIN_EXAMPLE: &str = r#"EXPLAIN WALK "The capital of France is" LAYERS 20-25"#;
const DESCRIBE_EXAMPLE: &str = r#"DESCRIBE "France" AT LAYER 20 VERBOSE"#;
const SELECT_EXAMPLE: &str = r#"SELECT * FROM EDGES WHERE relation = "capital" LIMIT 10"#;
const NEAREST_EXAMPLE: &str = r#"SELECT * FROM ENTITIES NEAREST TO "France" AT LAYER 20"#;
const ORDER_EXAMPLE: &str = "ORDER BY score DESC, layer";
const CONDITION_EXAMPLE: &str = r#"WHERE relation = "capital" AND score > 0.5"#;
const INFER_EXAMPLE: &str = r#"INFER "The capital of France is" TOP 5"#;
const EXPLAIN_INFER_EXAMPLE: &str = r#"EXPLAIN INFER "The capital of France is" LAYERS 20-25"#;
const TRACE_EXAMPLE: &str = r#"TRACE "The capital of France is" FOR " Paris" LAYERS 20-25"#;
const LAYERS_EXAMPLE: &str = "LAYERS 20-25, or LAYERS 20 for a single layer";
const INSERT_EXAMPLE: &str =
    r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Lyon")"#;
const UPDATE_EXAMPLE: &str =
    r#"UPDATE EDGES SET target = "Lyon" WHERE entity = "France" AND relation = "capital""#;
const DELETE_EXAMPLE: &str =
    r#"DELETE FROM EDGES WHERE entity = "France" AND relation = "capital""#;
const TEMPLATE_EXAMPLE: &str = r#"TEMPLATE "The capital of {entity} is""#;
const BEGIN_PATCH_EXAMPLE: &str = r#"BEGIN PATCH "capitals.vlp""#;
const APPLY_PATCH_EXAMPLE: &str = r#"APPLY PATCH "capitals.vlp""#;
const REMOVE_PATCH_EXAMPLE: &str = r#"REMOVE PATCH "capitals.vlp""#;
const DIFF_EXAMPLE: &str = r#"DIFF "a.vlp" "b.vlp", or DIFF "a.vlp" against the base"#;
const COMPILE_EXAMPLE: &str = r#"COMPILE CURRENT INTO MODEL "edited.gguf" FORMAT GGUF"#;

/// The columns of an `INSERT`, in the only order accepted: the row values are positional, so
/// a fixed list keeps a row from being read with its fields swapped.
const EDGE_COLUMNS: [&str; 3] = ["entity", "relation", "target"];
const EDGE_COLUMNS_HINT: &str = "the column list is exactly (entity, relation, target)";

/// The placeholder a `TEMPLATE` must contain once: where each row's entity goes.
const ENTITY_PLACEHOLDER: &str = "{entity}";

/// The words that start a statement.
#[derive(Debug, Clone, Copy)]
enum Command {
    Use,
    Stats,
    Show,
    Walk,
    Explain,
    Describe,
    Select,
    Infer,
    Trace,
    Insert,
    Update,
    Delete,
    Begin,
    Save,
    Apply,
    Remove,
    Diff,
    Compile,
}

const COMMANDS: &[(&str, Command)] = &[
    ("USE", Command::Use),
    ("STATS", Command::Stats),
    ("SHOW", Command::Show),
    ("WALK", Command::Walk),
    ("EXPLAIN", Command::Explain),
    ("DESCRIBE", Command::Describe),
    ("SELECT", Command::Select),
    ("INFER", Command::Infer),
    ("TRACE", Command::Trace),
    ("INSERT", Command::Insert),
    ("UPDATE", Command::Update),
    ("DELETE", Command::Delete),
    ("BEGIN", Command::Begin),
    ("SAVE", Command::Save),
    ("APPLY", Command::Apply),
    ("REMOVE", Command::Remove),
    ("DIFF", Command::Diff),
    ("COMPILE", Command::Compile),
];

/// What `SHOW` lists.
#[derive(Debug, Clone, Copy)]
enum ShowKind {
    Layers,
    Features,
    Relations,
    Entities,
    Models,
    Patches,
}

const SHOW_TARGETS: &[(&str, ShowKind)] = &[
    ("LAYERS", ShowKind::Layers),
    ("FEATURES", ShowKind::Features),
    ("RELATIONS", ShowKind::Relations),
    ("ENTITIES", ShowKind::Entities),
    ("MODELS", ShowKind::Models),
    ("PATCHES", ShowKind::Patches),
];

/// What `EXPLAIN` applies to; the flag is whether it is `INFER`.
const EXPLAINABLE: &[(&str, bool)] = &[("WALK", false), ("INFER", true)];

const SOURCES: &[(&str, Source)] = &[
    ("EDGES", Source::Edges),
    ("FEATURES", Source::Features),
    ("ENTITIES", Source::Entities),
];

const DESCRIBE_SCOPES: &[(&str, DescribeScope)] = &[
    ("SYNTAX", DescribeScope::Syntax),
    ("KNOWLEDGE", DescribeScope::Knowledge),
    ("OUTPUT", DescribeScope::Output),
];

const DETAILS: &[(&str, Detail)] = &[("BRIEF", Detail::Brief), ("VERBOSE", Detail::Verbose)];

/// The columns that pick one edge in the `WHERE` of `UPDATE` and `DELETE`; the flag is whether
/// it is `relation`.
const EDGE_KEYS: &[(&str, bool)] = &[("entity", false), ("relation", true)];

/// What `COMPILE CURRENT INTO` writes; `None` is `MODEL`, which may go on with `FORMAT`.
const COMPILE_TARGETS: &[(&str, Option<CompileTarget>)] = &[
    ("VINDEX", Some(CompileTarget::Vindex)),
    ("MODEL", None),
    ("ADAPTER", Some(CompileTarget::Adapter)),
];

/// The formats `FORMAT` names; `None` is one recognised but not written yet.
const MODEL_FORMATS: &[(&str, Option<ModelFormat>)] =
    &[("GGUF", Some(ModelFormat::Gguf)), ("SAFETENSORS", None)];

/// Sort directions; the flag is whether the order is descending.
const DIRECTIONS: &[(&str, bool)] = &[("ASC", false), ("DESC", true)];

/// The predicate forms introduced by a keyword after the field.
#[derive(Debug, Clone, Copy)]
enum PredicateKind {
    Between,
    In,
    Like,
}

const PREDICATE_KINDS: &[(&str, PredicateKind)] = &[
    ("BETWEEN", PredicateKind::Between),
    ("IN", PredicateKind::In),
    ("LIKE", PredicateKind::Like),
];

const COMPARISONS: &[(Sym, CmpOp)] = &[
    (Sym::Eq, CmpOp::Eq),
    (Sym::Ne, CmpOp::Ne),
    (Sym::Lt, CmpOp::Lt),
    (Sym::Le, CmpOp::Le),
    (Sym::Gt, CmpOp::Gt),
    (Sym::Ge, CmpOp::Ge),
];

/// Words that cannot name a field: those that begin or separate `SELECT` clauses and the
/// condition operators. Everything else (`layer`, `top`, …) is a field where a field is expected.
const RESERVED: &[&str] = &[
    "SELECT", "FROM", "NEAREST", "WHERE", "ORDER", "BY", "ASC", "DESC", "LIMIT", "AND", "OR",
    "NOT", "BETWEEN", "IN", "LIKE",
];

/// Keywords not covered by the tables above; only used to describe tokens in messages.
const OTHER_KEYWORDS: &[&str] = &[
    "TOP",
    "LAYERS",
    "LAYER",
    "AT",
    "ALL",
    "RAW",
    "VIA",
    "FEATURES",
    "TO",
    "FOR",
    "DECOMPOSE",
    "INTO",
    "VALUES",
    "SET",
    "TEMPLATE",
    "MODE",
    "COMPOSE",
    "PATCH",
    "CURRENT",
    "FORMAT",
    "WITH",
    "EXAMPLES",
    "ONLY",
    "RELATIONS",
];

/// The optional clauses that may follow a statement, for the message when something else does.
struct Tail {
    statement: &'static str,
    /// Clause keywords, to recognise one out of order.
    clauses: &'static [&'static str],
    /// The clauses in their required order, for hints; empty when there are none.
    order: &'static str,
    /// A hint for a stray word that is no clause keyword, when a likelier one than the order is
    /// known.
    stray_word_hint: Option<&'static str>,
}

impl Tail {
    const fn bare(statement: &'static str) -> Tail {
        Tail {
            statement,
            clauses: &[],
            order: "",
            stray_word_hint: None,
        }
    }
}

const USE_TAIL: Tail = Tail::bare("USE");
const STATS_TAIL: Tail = Tail::bare("STATS");
const SHOW_TAIL: Tail = Tail::bare("SHOW");
const SHOW_FEATURES_TAIL: Tail = Tail {
    statement: "SHOW FEATURES",
    clauses: &["WHERE", "LIMIT"],
    order: "WHERE condition, LIMIT n",
    stray_word_hint: None,
};
const SHOW_RELATIONS_TAIL: Tail = Tail {
    statement: "SHOW RELATIONS",
    clauses: &["VIA", "AT", "WITH"],
    order: "VIA FEATURES, AT LAYER n, WITH EXAMPLES",
    stray_word_hint: None,
};
const SHOW_ENTITIES_TAIL: Tail = Tail {
    statement: "SHOW ENTITIES",
    clauses: &["AT", "LIMIT"],
    order: "AT LAYER n, LIMIT n",
    stray_word_hint: None,
};
const WALK_TAIL: Tail = Tail {
    statement: "WALK",
    clauses: &["TOP", "LAYERS"],
    order: "TOP n, LAYERS a-b",
    stray_word_hint: None,
};
const EXPLAIN_WALK_TAIL: Tail = Tail {
    statement: "EXPLAIN WALK",
    ..WALK_TAIL
};
const INFER_TAIL: Tail = Tail {
    statement: "INFER",
    clauses: &["TOP"],
    order: "TOP n",
    stray_word_hint: None,
};
const EXPLAIN_INFER_TAIL: Tail = Tail {
    statement: "EXPLAIN INFER",
    ..WALK_TAIL
};
const DESCRIBE_TAIL: Tail = Tail {
    statement: "DESCRIBE",
    clauses: &[
        "AT",
        "ALL",
        "SYNTAX",
        "KNOWLEDGE",
        "OUTPUT",
        "BRIEF",
        "VERBOSE",
        "RELATIONS",
        "VIA",
        "RAW",
    ],
    order: "one of AT LAYER n, ALL LAYERS, SYNTAX, KNOWLEDGE or OUTPUT; then BRIEF or VERBOSE; \
            then RELATIONS ONLY; then VIA FEATURES or RAW",
    stray_word_hint: None,
};
const SELECT_TAIL: Tail = Tail {
    statement: "SELECT",
    clauses: &["NEAREST", "WHERE", "ORDER", "LIMIT"],
    order: r#"NEAREST TO "entity" AT LAYER n, WHERE condition, ORDER BY fields, LIMIT n"#,
    stray_word_hint: None,
};
/// A `SELECT` that ended with its condition, where a stray word most likely lacks an operator.
const SELECT_AFTER_WHERE_TAIL: Tail = Tail {
    stray_word_hint: Some("join conditions with AND or OR"),
    ..SELECT_TAIL
};
const TRACE_TAIL: Tail = Tail {
    statement: "TRACE",
    clauses: &["FOR", "DECOMPOSE", "LAYERS"],
    order: r#"FOR "token", DECOMPOSE, LAYERS a-b"#,
    stray_word_hint: None,
};
const INSERT_TAIL: Tail = Tail {
    statement: "INSERT",
    clauses: &["AT", "LAYERS", "TEMPLATE", "MODE"],
    order: r#"AT LAYER n or LAYERS a-b, TEMPLATE "…{entity}…", MODE COMPOSE"#,
    stray_word_hint: None,
};
const UPDATE_TAIL: Tail = Tail {
    statement: "UPDATE",
    clauses: &["AT", "LAYERS", "TEMPLATE"],
    order: r#"AT LAYER n or LAYERS a-b, TEMPLATE "…{entity}…""#,
    stray_word_hint: None,
};
const DELETE_TAIL: Tail = Tail::bare("DELETE");
const BEGIN_PATCH_TAIL: Tail = Tail::bare("BEGIN PATCH");
const SAVE_PATCH_TAIL: Tail = Tail::bare("SAVE PATCH");
const APPLY_PATCH_TAIL: Tail = Tail::bare("APPLY PATCH");
const REMOVE_PATCH_TAIL: Tail = Tail::bare("REMOVE PATCH");
const DIFF_TAIL: Tail = Tail::bare("DIFF");
const COMPILE_TAIL: Tail = Tail::bare("COMPILE");
const COMPILE_MODEL_TAIL: Tail = Tail {
    statement: "COMPILE",
    clauses: &["FORMAT"],
    order: "FORMAT GGUF",
    stray_word_hint: None,
};

type Parsed<T> = Result<T, ParseError>;

/// Parses a whole script; see [`crate::parse`].
pub(crate) fn parse_script(src: &str) -> Parsed<Vec<Statement>> {
    let mut parser = Parser::new(src);
    let mut statements = Vec::new();
    loop {
        match &parser.peek().kind {
            Kind::End => return Ok(statements),
            Kind::Bad(error) => return Err(error.clone()),
            Kind::Sym(Sym::Semicolon) => {
                parser.next();
            }
            _ => {
                let (statement, tail) = parser.statement()?;
                parser.finish_statement(tail)?;
                statements.push(statement);
            }
        }
    }
}

struct Parser {
    /// The unread tokens in reverse order, so that `pop` yields the next one.
    rest: Vec<Token>,
    /// The token ending the stream, returned forever once `rest` is empty.
    end: Token,
}

impl Parser {
    fn new(src: &str) -> Parser {
        let (mut tokens, end) = tokenize(src);
        tokens.reverse();
        Parser { rest: tokens, end }
    }

    fn peek(&self) -> &Token {
        self.rest.last().unwrap_or(&self.end)
    }

    fn next(&mut self) -> Token {
        self.rest.pop().unwrap_or_else(|| self.end.clone())
    }

    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(&self.peek().kind, Kind::Word(word) if word.eq_ignore_ascii_case(keyword))
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        let found = self.peek_keyword(keyword);
        if found {
            self.next();
        }
        found
    }

    /// Consumes the identifier `name`, matched exactly: column names are identifiers, which are
    /// case-sensitive, not keywords.
    fn eat_identifier(&mut self, name: &str) -> bool {
        let found = matches!(&self.peek().kind, Kind::Word(word) if word == name);
        if found {
            self.next();
        }
        found
    }

    fn peek_sym(&self, sym: Sym) -> bool {
        self.peek().kind == Kind::Sym(sym)
    }

    fn eat_sym(&mut self, sym: Sym) -> bool {
        let found = self.peek_sym(sym);
        if found {
            self.next();
        }
        found
    }

    /// The error for the next token when it is not `expected`.
    fn unexpected_here(&self, expected: &str, hint: Option<String>) -> ParseError {
        unexpected(self.peek(), expected, hint)
    }

    /// Consumes a keyword from `choices` and returns its value, or fails with a message listing
    /// the choices followed by `context`.
    fn expect_choice<T: Copy>(
        &mut self,
        choices: &[(&'static str, T)],
        context: &str,
        example: &str,
    ) -> Parsed<T> {
        if let Some(value) = self.eat_choice(choices) {
            return Ok(value);
        }
        let names: Vec<&str> = choices.iter().map(|&(name, _)| name).collect();
        let expected = format!("{} {context}", one_of(&names));
        Err(self.unexpected_here(&expected, hint_for(self.peek(), &names, example)))
    }

    /// Consumes a keyword from `choices` if the next token is one.
    fn eat_choice<T: Copy>(&mut self, choices: &[(&'static str, T)]) -> Option<T> {
        let value = choices
            .iter()
            .find(|&&(name, _)| self.peek_keyword(name))
            .map(|&(_, value)| value)?;
        self.next();
        Some(value)
    }

    /// Consumes `keyword` or fails with "expected KEYWORD {context}".
    fn expect_keyword(
        &mut self,
        keyword: &'static str,
        context: &str,
        example: &str,
    ) -> Parsed<()> {
        self.expect_choice(&[(keyword, ())], context, example)
    }

    fn expect_sym(&mut self, sym: Sym, expected: &str, hint: &str) -> Parsed<()> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            Err(self.unexpected_here(expected, Some(hint.to_owned())))
        }
    }

    /// Consumes a string literal; `what` describes it with its context ("a quoted prompt after
    /// WALK").
    fn expect_string(&mut self, what: &str, example: &str) -> Parsed<String> {
        match self.next() {
            Token {
                kind: Kind::Str(contents),
                ..
            } => Ok(contents),
            other => Err(unexpected(&other, what, Some(example.to_owned()))),
        }
    }

    /// Consumes a non-negative whole number that fits `T`; `what` describes it with its context
    /// ("a row count after LIMIT").
    fn expect_whole<T: FromStr>(&mut self, what: &str, example: &str) -> Parsed<T> {
        let token = self.next();
        let hint = Some(example.to_owned());
        match &token.kind {
            Kind::Number(text) if text.contains('.') => Err(token.pos.error(
                format!("{what} must be a whole number, found {}", shorten(text)),
                hint,
            )),
            // The text is all digits, so parsing fails only on overflow.
            Kind::Number(text) => text.parse().map_err(|_| {
                token
                    .pos
                    .error(format!("{what} is too large: {}", shorten(text)), hint)
            }),
            Kind::Sym(Sym::Minus) => {
                Err(token.pos.error(format!("{what} cannot be negative"), hint))
            }
            _ => Err(unexpected(&token, what, hint)),
        }
    }

    /// Consumes a field name: an identifier that is not reserved.
    fn expect_field(&mut self, what: &str, example: &str) -> Parsed<String> {
        match self.next() {
            Token {
                kind: Kind::Word(word),
                ..
            } if !is_reserved(&word) => Ok(word),
            other => {
                let hint = match &other.kind {
                    Kind::Word(word) => format!(
                        "{} is a reserved word, not a field name; for example: {example}",
                        word.to_ascii_uppercase()
                    ),
                    Kind::Str(_) => format!("field names are not quoted; for example: {example}"),
                    _ => example.to_owned(),
                };
                Err(unexpected(&other, what, Some(hint)))
            }
        }
    }

    /// Fails unless the statement ends here (at `;` or the end of the script).
    fn finish_statement(&self, tail: &Tail) -> Parsed<()> {
        let token = self.peek();
        if matches!(token.kind, Kind::End | Kind::Sym(Sym::Semicolon)) {
            return Ok(());
        }
        let statement = tail.statement;
        let hint = match &token.kind {
            Kind::Word(word) => {
                if let Some(clause) = tail.clauses.iter().find(|c| c.eq_ignore_ascii_case(word)) {
                    return Err(token.pos.error(
                        format!(
                            "{clause} cannot come here: the optional clauses of {statement} \
                             go in a fixed order, each at most once"
                        ),
                        Some(format!("the order is: {}", tail.order)),
                    ));
                }
                if is_command(word) {
                    Some("separate statements with ';'".to_owned())
                } else if let Some(clause) = suggest(word, tail.clauses) {
                    Some(format!("did you mean {clause}?"))
                } else {
                    tail.stray_word_hint.map(str::to_owned)
                }
            }
            _ => None,
        };
        let hint = hint.or_else(|| {
            (!tail.order.is_empty()).then(|| format!("{statement} may end with: {}", tail.order))
        });
        Err(unexpected(
            token,
            &format!("';' or end of input after {statement}"),
            hint,
        ))
    }

    fn statement(&mut self) -> Parsed<(Statement, &'static Tail)> {
        let command = self.expect_choice(
            COMMANDS,
            "to start a statement",
            r#"every statement starts with a keyword, e.g. WALK "The capital of France is""#,
        )?;
        match command {
            Command::Use => {
                let path = self.expect_string("a quoted model path after USE", USE_EXAMPLE)?;
                Ok((Statement::Use { path }, &USE_TAIL))
            }
            Command::Stats => Ok((Statement::Stats, &STATS_TAIL)),
            Command::Show => {
                let (target, tail) = self.show()?;
                Ok((Statement::Show(target), tail))
            }
            Command::Walk => self.walk(false),
            Command::Explain => {
                if self.expect_choice(EXPLAINABLE, "after EXPLAIN", EXPLAIN_EXAMPLE)? {
                    self.infer(true)
                } else {
                    self.walk(true)
                }
            }
            Command::Describe => self.describe(),
            Command::Select => self.select(),
            Command::Infer => self.infer(false),
            Command::Trace => self.trace(),
            Command::Insert => self.insert(),
            Command::Update => self.update(),
            Command::Delete => self.delete(),
            Command::Begin => {
                self.expect_keyword("PATCH", "after BEGIN", BEGIN_PATCH_EXAMPLE)?;
                let path = self
                    .expect_string("a quoted patch path after BEGIN PATCH", BEGIN_PATCH_EXAMPLE)?;
                Ok((
                    Statement::Patch(PatchStatement::Begin { path }),
                    &BEGIN_PATCH_TAIL,
                ))
            }
            Command::Save => {
                self.expect_keyword(
                    "PATCH",
                    "after SAVE",
                    "SAVE PATCH (it writes to the path given at BEGIN PATCH)",
                )?;
                Ok((Statement::Patch(PatchStatement::Save), &SAVE_PATCH_TAIL))
            }
            Command::Apply => {
                self.expect_keyword("PATCH", "after APPLY", APPLY_PATCH_EXAMPLE)?;
                let path = self
                    .expect_string("a quoted patch path after APPLY PATCH", APPLY_PATCH_EXAMPLE)?;
                Ok((
                    Statement::Patch(PatchStatement::Apply { path }),
                    &APPLY_PATCH_TAIL,
                ))
            }
            Command::Remove => {
                self.expect_keyword("PATCH", "after REMOVE", REMOVE_PATCH_EXAMPLE)?;
                let path = self.expect_string(
                    "a quoted patch path after REMOVE PATCH",
                    REMOVE_PATCH_EXAMPLE,
                )?;
                Ok((
                    Statement::Patch(PatchStatement::Remove { path }),
                    &REMOVE_PATCH_TAIL,
                ))
            }
            Command::Diff => {
                let a = self.expect_string("a quoted patch path after DIFF", DIFF_EXAMPLE)?;
                // A second string is the other patch; without one the diff is against the base.
                let b = match self.peek().kind {
                    Kind::Str(_) => Some(self.expect_string("a second patch path", DIFF_EXAMPLE)?),
                    _ => None,
                };
                Ok((Statement::Patch(PatchStatement::Diff { a, b }), &DIFF_TAIL))
            }
            Command::Compile => self.compile(),
        }
    }

    fn show(&mut self) -> Parsed<(ShowTarget, &'static Tail)> {
        Ok(
            match self.expect_choice(SHOW_TARGETS, "after SHOW", SHOW_EXAMPLE)? {
                ShowKind::Layers => (ShowTarget::Layers, &SHOW_TAIL),
                ShowKind::Models => (ShowTarget::Models, &SHOW_TAIL),
                ShowKind::Patches => (ShowTarget::Patches, &SHOW_TAIL),
                ShowKind::Features => {
                    let layer =
                        self.expect_whole("a layer number after SHOW FEATURES", SHOW_EXAMPLE)?;
                    let filter = if self.eat_keyword("WHERE") {
                        Some(self.condition()?)
                    } else {
                        None
                    };
                    let limit = self.limit()?;
                    let target = ShowTarget::Features {
                        layer,
                        filter,
                        limit,
                    };
                    (target, &SHOW_FEATURES_TAIL)
                }
                ShowKind::Relations => {
                    let features = self.eat_keyword("VIA");
                    if features {
                        self.expect_keyword("FEATURES", "after VIA", SHOW_RELATIONS_EXAMPLE)?;
                    }
                    let layer = if self.eat_keyword("AT") {
                        Some(self.layer_after_at(SHOW_RELATIONS_EXAMPLE)?)
                    } else {
                        None
                    };
                    let examples = self.eat_keyword("WITH");
                    if examples {
                        self.expect_keyword("EXAMPLES", "after WITH", SHOW_RELATIONS_EXAMPLE)?;
                    }
                    let target = ShowTarget::Relations {
                        features,
                        layer,
                        examples,
                    };
                    (target, &SHOW_RELATIONS_TAIL)
                }
                ShowKind::Entities => {
                    let layer = if self.eat_keyword("AT") {
                        Some(self.layer_after_at(SHOW_ENTITIES_EXAMPLE)?)
                    } else {
                        None
                    };
                    let limit = self.limit()?;
                    (ShowTarget::Entities { layer, limit }, &SHOW_ENTITIES_TAIL)
                }
            },
        )
    }

    /// An optional `LIMIT n` clause.
    fn limit(&mut self) -> Parsed<Option<u64>> {
        if self.eat_keyword("LIMIT") {
            Ok(Some(
                self.expect_whole("a row count after LIMIT", "LIMIT 10")?,
            ))
        } else {
            Ok(None)
        }
    }

    fn top(&mut self, example: &str) -> Parsed<Option<u32>> {
        if self.eat_keyword("TOP") {
            Ok(Some(
                self.expect_whole("a result count after TOP", example)?,
            ))
        } else {
            Ok(None)
        }
    }

    /// An optional `LAYERS a-b` or `LAYERS n` clause.
    fn layers(&mut self) -> Parsed<Option<LayerRange>> {
        if !self.eat_keyword("LAYERS") {
            return Ok(None);
        }
        let start = self.peek().pos;
        let first = self.expect_whole("a layer number after LAYERS", LAYERS_EXAMPLE)?;
        let last = if self.eat_sym(Sym::Minus) {
            self.expect_whole(
                &format!("the last layer after LAYERS {first}-"),
                LAYERS_EXAMPLE,
            )?
        } else {
            first
        };
        if first > last {
            return Err(start.error(
                format!(
                    "layer range {first}-{last} is reversed: the first layer must not exceed \
                     the last"
                ),
                Some(format!("write LAYERS {last}-{first}")),
            ));
        }
        Ok(Some(LayerRange { first, last }))
    }

    /// The rest of `AT LAYER n`, after `AT`.
    fn layer_after_at(&mut self, example: &str) -> Parsed<u32> {
        self.expect_keyword("LAYER", "after AT", example)?;
        self.expect_whole("a layer number after AT LAYER", example)
    }

    /// The optional layer clause of an edit: `AT LAYER n`, which is `LAYERS n`, or
    /// `LAYERS a-b`.
    fn edit_layers(&mut self, example: &str) -> Parsed<Option<LayerRange>> {
        if self.eat_keyword("AT") {
            let layer = self.layer_after_at(example)?;
            return Ok(Some(LayerRange {
                first: layer,
                last: layer,
            }));
        }
        self.layers()
    }

    /// An optional `TEMPLATE "…{entity}…"` clause. The placeholder is checked here, not by the
    /// engine, so that a template without a place for the entity fails before anything is
    /// edited.
    fn template(&mut self) -> Parsed<Option<String>> {
        if !self.eat_keyword("TEMPLATE") {
            return Ok(None);
        }
        let at = self.peek().pos;
        let template =
            self.expect_string("a quoted prompt template after TEMPLATE", TEMPLATE_EXAMPLE)?;
        let found = match template.matches(ENTITY_PLACEHOLDER).count() {
            1 => return Ok(Some(template)),
            0 => "it has none".to_owned(),
            n => format!("it has {n}"),
        };
        Err(at.error(
            format!(
                "TEMPLATE {} must contain {ENTITY_PLACEHOLDER} exactly once ({found})",
                Quoted(&shorten(&template))
            ),
            Some(format!(
                "{ENTITY_PLACEHOLDER} marks where each row's entity goes, e.g. {TEMPLATE_EXAMPLE}"
            )),
        ))
    }

    fn insert(&mut self) -> Parsed<(Statement, &'static Tail)> {
        self.expect_keyword("INTO", "after INSERT", INSERT_EXAMPLE)?;
        self.expect_keyword("EDGES", "after INSERT INTO", INSERT_EXAMPLE)?;
        self.edge_columns()?;
        self.expect_keyword("VALUES", "after the column list", INSERT_EXAMPLE)?;
        let mut edges = Vec::new();
        loop {
            if edges.len() == MAX_INSERT_ROWS {
                return Err(self.peek().pos.error(
                    format!("INSERT takes at most {MAX_INSERT_ROWS} rows"),
                    Some("split the edges over several INSERT statements".to_owned()),
                ));
            }
            edges.push(self.edge_row(edges.len() + 1)?);
            if !self.eat_sym(Sym::Comma) {
                break;
            }
        }
        let layers = self.edit_layers(INSERT_EXAMPLE)?;
        let template = self.template()?;
        let mode = if self.eat_keyword("MODE") {
            self.expect_keyword(
                "COMPOSE",
                "after MODE",
                "MODE COMPOSE, or no MODE clause for the default algorithm",
            )?;
            EditMode::Compose
        } else {
            EditMode::Default
        };
        let insert = Statement::Insert {
            edges,
            layers,
            template,
            mode,
        };
        Ok((insert, &INSERT_TAIL))
    }

    /// `(entity, relation, target)`, exactly.
    fn edge_columns(&mut self) -> Parsed<()> {
        self.expect_sym(
            Sym::LParen,
            "'(' and the column list after INSERT INTO EDGES",
            INSERT_EXAMPLE,
        )?;
        for (i, column) in EDGE_COLUMNS.into_iter().enumerate() {
            if i > 0 {
                self.expect_sym(
                    Sym::Comma,
                    &format!("',' and column {column} in the column list"),
                    EDGE_COLUMNS_HINT,
                )?;
            }
            if !self.eat_identifier(column) {
                return Err(self.unexpected_here(
                    &format!("column {column} in the column list"),
                    Some(EDGE_COLUMNS_HINT.to_owned()),
                ));
            }
        }
        self.expect_sym(Sym::RParen, "')' after column target", EDGE_COLUMNS_HINT)
    }

    /// `("entity", "relation", "target")`, the `row`-th (from 1) of `VALUES`.
    fn edge_row(&mut self, row: usize) -> Parsed<EdgeValue> {
        self.expect_sym(
            Sym::LParen,
            &format!("'(' to start row {row} of VALUES"),
            INSERT_EXAMPLE,
        )?;
        let value = |parser: &mut Parser, column: &str, before: Option<&str>| {
            if let Some(before) = before {
                parser.expect_sym(
                    Sym::Comma,
                    &format!("',' after the {before} in row {row}"),
                    "a row holds three quoted strings: entity, relation, target",
                )?;
            }
            parser.expect_string(
                &format!("a quoted {column} in row {row} of VALUES"),
                INSERT_EXAMPLE,
            )
        };
        let entity = value(self, "entity", None)?;
        let relation = value(self, "relation", Some("entity"))?;
        let target = value(self, "target", Some("relation"))?;
        self.expect_sym(
            Sym::RParen,
            &format!("')' after the target in row {row}"),
            "a row holds three quoted strings: entity, relation, target",
        )?;
        Ok(EdgeValue {
            entity,
            relation,
            target,
        })
    }

    fn update(&mut self) -> Parsed<(Statement, &'static Tail)> {
        self.expect_keyword("EDGES", "after UPDATE", UPDATE_EXAMPLE)?;
        self.expect_keyword("SET", "after UPDATE EDGES", UPDATE_EXAMPLE)?;
        if !self.eat_identifier("target") {
            return Err(self.unexpected_here(
                "target after SET",
                Some(format!(
                    "only the target of an edge can be set: {UPDATE_EXAMPLE}"
                )),
            ));
        }
        self.expect_sym(Sym::Eq, "'=' after SET target", UPDATE_EXAMPLE)?;
        let target = self.expect_string("a quoted target after SET target =", UPDATE_EXAMPLE)?;
        let (entity, relation) = self.edge_key("UPDATE", "after the new target", UPDATE_EXAMPLE)?;
        let layers = self.edit_layers(UPDATE_EXAMPLE)?;
        let template = self.template()?;
        let update = Statement::Update {
            entity,
            relation,
            target,
            layers,
            template,
        };
        Ok((update, &UPDATE_TAIL))
    }

    fn delete(&mut self) -> Parsed<(Statement, &'static Tail)> {
        self.expect_keyword("FROM", "after DELETE", DELETE_EXAMPLE)?;
        self.expect_keyword("EDGES", "after DELETE FROM", DELETE_EXAMPLE)?;
        let (entity, relation) =
            self.edge_key("DELETE", "after DELETE FROM EDGES", DELETE_EXAMPLE)?;
        Ok((Statement::Delete { entity, relation }, &DELETE_TAIL))
    }

    /// `WHERE entity = "e" AND relation = "r"`, in either order: the one edge that `UPDATE`
    /// or `DELETE` changes. Returns the entity and the relation. `after` names what precedes the `WHERE`, for the message when it is missing.
    fn edge_key(
        &mut self,
        statement: &str,
        after: &str,
        example: &str,
    ) -> Parsed<(String, String)> {
        self.expect_keyword("WHERE", after, example)?;
        let (first_is_relation, first) = self.edge_key_condition(statement, example)?;
        let (missing, other) = if first_is_relation {
            ("entity", "relation")
        } else {
            ("relation", "entity")
        };
        if !self.eat_keyword("AND") {
            return Err(self.unexpected_here(
                &format!("AND and a condition on {missing} after the condition on {other}"),
                Some(format!(
                    "{statement} needs both the entity and the relation: {example}"
                )),
            ));
        }
        let at = self.peek().pos;
        let (second_is_relation, second) = self.edge_key_condition(statement, example)?;
        if second_is_relation == first_is_relation {
            return Err(at.error(
                format!("the condition on {other} is given twice; {missing} is missing"),
                Some(example.to_owned()),
            ));
        }
        Ok(if first_is_relation {
            (second, first)
        } else {
            (first, second)
        })
    }

    /// `entity = "e"` or `relation = "r"`; the flag is whether it is `relation`.
    fn edge_key_condition(&mut self, statement: &str, example: &str) -> Parsed<(bool, String)> {
        let is_relation = EDGE_KEYS
            .iter()
            .find(|&&(name, _)| self.eat_identifier(name))
            .map(|&(_, is_relation)| is_relation);
        let Some(is_relation) = is_relation else {
            return Err(self.unexpected_here(
                &format!("entity or relation in the WHERE of {statement}"),
                Some(format!(
                    "{statement} picks one edge by its entity and relation: {example}"
                )),
            ));
        };
        let column = if is_relation { "relation" } else { "entity" };
        self.expect_sym(Sym::Eq, &format!("'=' after {column}"), example)?;
        let value = self.expect_string(&format!("a quoted {column} after {column} ="), example)?;
        Ok((is_relation, value))
    }

    fn compile(&mut self) -> Parsed<(Statement, &'static Tail)> {
        self.expect_keyword("CURRENT", "after COMPILE", COMPILE_EXAMPLE)?;
        self.expect_keyword("INTO", "after COMPILE CURRENT", COMPILE_EXAMPLE)?;
        let kind = self.expect_choice(
            COMPILE_TARGETS,
            "after COMPILE CURRENT INTO",
            COMPILE_EXAMPLE,
        )?;
        let into = kind
            .unwrap_or(CompileTarget::Model { format: None })
            .keyword();
        let path = self.expect_string(
            &format!("a quoted output path after INTO {into}"),
            COMPILE_EXAMPLE,
        )?;
        let Some(target) = kind else {
            let format = if self.eat_keyword("FORMAT") {
                let at = self.peek().pos;
                match self.expect_choice(MODEL_FORMATS, "after FORMAT", COMPILE_EXAMPLE)? {
                    Some(format) => Some(format),
                    None => {
                        return Err(at.error(
                            "safetensors export is not supported yet",
                            Some("write FORMAT GGUF, or leave FORMAT out".to_owned()),
                        ))
                    }
                }
            } else {
                None
            };
            let compile = Statement::Compile {
                target: CompileTarget::Model { format },
                path,
            };
            return Ok((compile, &COMPILE_MODEL_TAIL));
        };
        if self.peek_keyword("FORMAT") {
            return Err(self.peek().pos.error(
                "FORMAT only applies to COMPILE CURRENT INTO MODEL",
                Some(COMPILE_EXAMPLE.to_owned()),
            ));
        }
        Ok((Statement::Compile { target, path }, &COMPILE_TAIL))
    }

    fn walk(&mut self, explain: bool) -> Parsed<(Statement, &'static Tail)> {
        let (example, tail) = if explain {
            (EXPLAIN_EXAMPLE, &EXPLAIN_WALK_TAIL)
        } else {
            (WALK_EXAMPLE, &WALK_TAIL)
        };
        let prompt = self.expect_string("a quoted prompt after WALK", example)?;
        let top = self.top(example)?;
        let layers = self.layers()?;
        let walk = Statement::Walk {
            prompt,
            top,
            layers,
            explain,
        };
        Ok((walk, tail))
    }

    fn infer(&mut self, explain: bool) -> Parsed<(Statement, &'static Tail)> {
        let example = if explain {
            EXPLAIN_INFER_EXAMPLE
        } else {
            INFER_EXAMPLE
        };
        let prompt = self.expect_string("a quoted prompt after INFER", example)?;
        let top = self.top(example)?;
        let (layers, tail) = if explain {
            (self.layers()?, &EXPLAIN_INFER_TAIL)
        } else if self.peek_keyword("LAYERS") {
            return Err(self.peek().pos.error(
                "LAYERS is only available with EXPLAIN INFER",
                Some(EXPLAIN_INFER_EXAMPLE.to_owned()),
            ));
        } else {
            (None, &INFER_TAIL)
        };
        let infer = Statement::Infer {
            prompt,
            top,
            explain,
            layers,
        };
        Ok((infer, tail))
    }

    fn describe(&mut self) -> Parsed<(Statement, &'static Tail)> {
        let entity = self.expect_string("a quoted entity name after DESCRIBE", DESCRIBE_EXAMPLE)?;
        let scope = if self.eat_keyword("AT") {
            DescribeScope::AtLayer(self.layer_after_at(DESCRIBE_EXAMPLE)?)
        } else if self.eat_keyword("ALL") {
            self.expect_keyword("LAYERS", "after ALL", r#"DESCRIBE "France" ALL LAYERS"#)?;
            DescribeScope::AllLayers
        } else {
            self.eat_choice(DESCRIBE_SCOPES).unwrap_or_default()
        };
        let detail = self.eat_choice(DETAILS).unwrap_or_default();
        let relations_only = self.eat_keyword("RELATIONS");
        if relations_only {
            self.expect_keyword(
                "ONLY",
                "after RELATIONS",
                r#"DESCRIBE "France" RELATIONS ONLY"#,
            )?;
        }
        let method = if self.eat_keyword("VIA") {
            self.expect_keyword("FEATURES", "after VIA", r#"DESCRIBE "France" VIA FEATURES"#)?;
            DescribeMethod::Features
        } else if self.eat_keyword("RAW") {
            DescribeMethod::Raw
        } else {
            DescribeMethod::Answers
        };
        let describe = Statement::Describe {
            entity,
            scope,
            detail,
            relations_only,
            method,
        };
        Ok((describe, &DESCRIBE_TAIL))
    }

    fn select(&mut self) -> Parsed<(Statement, &'static Tail)> {
        let fields = self.projection()?;
        self.expect_keyword("FROM", "after the field list", SELECT_EXAMPLE)?;
        let from = self.expect_choice(SOURCES, "after FROM", SELECT_EXAMPLE)?;
        let nearest = if self.eat_keyword("NEAREST") {
            Some(self.nearest()?)
        } else {
            None
        };
        let filter = if self.eat_keyword("WHERE") {
            Some(self.condition()?)
        } else {
            None
        };
        let order_by = if self.eat_keyword("ORDER") {
            self.expect_keyword("BY", "after ORDER", ORDER_EXAMPLE)?;
            self.order_keys()?
        } else {
            Vec::new()
        };
        let limit = self.limit()?;
        let tail = if filter.is_some() && order_by.is_empty() && limit.is_none() {
            &SELECT_AFTER_WHERE_TAIL
        } else {
            &SELECT_TAIL
        };
        let select = Select {
            fields,
            from,
            nearest,
            filter,
            order_by,
            limit,
        };
        Ok((Statement::Select(select), tail))
    }

    fn projection(&mut self) -> Parsed<Projection> {
        if self.eat_sym(Sym::Star) {
            if self.peek_sym(Sym::Comma) {
                return Err(self.peek().pos.error(
                    "* cannot be combined with named fields",
                    Some("write either SELECT * or SELECT relation, score".to_owned()),
                ));
            }
            return Ok(Projection::All);
        }
        if self.peek_keyword("FROM") {
            return Err(self.unexpected_here(
                "* or a field name after SELECT",
                Some("name the fields to return, or * for all: SELECT * FROM EDGES".to_owned()),
            ));
        }
        let mut fields = vec![self.expect_field("* or a field name after SELECT", SELECT_EXAMPLE)?];
        while self.eat_sym(Sym::Comma) {
            fields.push(self.expect_field("a field name after ','", SELECT_EXAMPLE)?);
        }
        Ok(Projection::Fields(fields))
    }

    /// The rest of `NEAREST TO "entity" AT LAYER n`, after `NEAREST`.
    fn nearest(&mut self) -> Parsed<Nearest> {
        self.expect_keyword("TO", "after NEAREST", NEAREST_EXAMPLE)?;
        let entity =
            self.expect_string("a quoted entity name after NEAREST TO", NEAREST_EXAMPLE)?;
        self.expect_keyword("AT", "after the entity of NEAREST TO", NEAREST_EXAMPLE)?;
        let layer = self.layer_after_at(NEAREST_EXAMPLE)?;
        Ok(Nearest { entity, layer })
    }

    fn order_keys(&mut self) -> Parsed<Vec<OrderKey>> {
        let mut keys = Vec::new();
        let mut what = "a field name after ORDER BY";
        loop {
            let field = self.expect_field(what, ORDER_EXAMPLE)?;
            let descending = self.eat_choice(DIRECTIONS).unwrap_or(false);
            keys.push(OrderKey { field, descending });
            if !self.eat_sym(Sym::Comma) {
                return Ok(keys);
            }
            what = "a field name after ','";
        }
    }

    fn trace(&mut self) -> Parsed<(Statement, &'static Tail)> {
        let prompt = self.expect_string("a quoted prompt after TRACE", TRACE_EXAMPLE)?;
        let target = if self.eat_keyword("FOR") {
            Some(self.expect_string("a quoted token after FOR", TRACE_EXAMPLE)?)
        } else {
            None
        };
        let decompose = self.eat_keyword("DECOMPOSE");
        let layers = self.layers()?;
        let trace = Statement::Trace {
            prompt,
            target,
            decompose,
            layers,
        };
        Ok((trace, &TRACE_TAIL))
    }

    /// A `WHERE` condition.
    fn condition(&mut self) -> Parsed<Expr> {
        self.or_expr(0).map(|(expr, _height)| expr)
    }

    // The condition parsers take the current nesting depth (parentheses and NOTs around them)
    // and return the expression with its height (operators on its longest path down to a
    // predicate), both bounded by MAX_EXPR_DEPTH.

    fn or_expr(&mut self, nesting: usize) -> Parsed<(Expr, usize)> {
        self.chain(nesting, "OR", Parser::and_expr, Expr::Or)
    }

    fn and_expr(&mut self, nesting: usize) -> Parsed<(Expr, usize)> {
        self.chain(nesting, "AND", Parser::not_expr, Expr::And)
    }

    /// `operand { keyword operand }`, folded to the left.
    fn chain(
        &mut self,
        nesting: usize,
        keyword: &str,
        operand: fn(&mut Parser, usize) -> Parsed<(Expr, usize)>,
        combine: fn(Box<Expr>, Box<Expr>) -> Expr,
    ) -> Parsed<(Expr, usize)> {
        let (mut expr, mut height) = operand(self, nesting)?;
        while self.peek_keyword(keyword) {
            let at = self.next().pos;
            let (rhs, rhs_height) = operand(self, nesting)?;
            height = within_depth(height.max(rhs_height) + 1, at)?;
            expr = combine(Box::new(expr), Box::new(rhs));
        }
        Ok((expr, height))
    }

    fn not_expr(&mut self, nesting: usize) -> Parsed<(Expr, usize)> {
        if !self.peek_keyword("NOT") {
            return self.primary(nesting);
        }
        let at = self.next().pos;
        let (inner, height) = self.not_expr(within_depth(nesting + 1, at)?)?;
        Ok((Expr::Not(Box::new(inner)), within_depth(height + 1, at)?))
    }

    fn primary(&mut self, nesting: usize) -> Parsed<(Expr, usize)> {
        if !self.peek_sym(Sym::LParen) {
            return Ok((self.predicate()?, 0));
        }
        let open = self.next().pos;
        let inner = self.or_expr(within_depth(nesting + 1, open)?)?;
        let expected = format!(
            "')' to close the '(' at line {}, column {}",
            open.line, open.column
        );
        let hint = if matches!(self.peek().kind, Kind::Word(_)) {
            "join conditions with AND or OR"
        } else {
            "add the missing ')'"
        };
        self.expect_sym(Sym::RParen, &expected, hint)?;
        Ok(inner)
    }

    /// `field op value`, `field [NOT] BETWEEN a AND b`, `field [NOT] IN (…)` or
    /// `field [NOT] LIKE "pattern"`.
    fn predicate(&mut self) -> Parsed<Expr> {
        let field =
            self.expect_field("a condition (a field name, NOT or '(')", CONDITION_EXAMPLE)?;
        let op = COMPARISONS
            .iter()
            .find(|&&(sym, _)| self.peek_sym(sym))
            .map(|&(_, op)| op);
        if let Some(op) = op {
            self.next();
            let value = self.literal(&format!("a string or number after {field} {op}"))?;
            return Ok(Expr::Compare { field, op, value });
        }
        let negated = self.eat_keyword("NOT");
        let Some(kind) = self.eat_choice(PREDICATE_KINDS) else {
            let (expected, candidates): (String, &[&str]) = if negated {
                (
                    format!("BETWEEN, IN or LIKE after {field} NOT"),
                    &["BETWEEN", "IN", "LIKE"],
                )
            } else {
                (
                    format!("an operator after {field}: =, !=, <, <=, >, >=, BETWEEN, IN or LIKE"),
                    &["BETWEEN", "LIKE"],
                )
            };
            let example = format!(r#"{field} = "capital""#);
            return Err(
                self.unexpected_here(&expected, hint_for(self.peek(), candidates, &example))
            );
        };
        match kind {
            PredicateKind::Between => {
                let example = format!("{field} BETWEEN 0.2 AND 0.8");
                let low = self.literal(&format!("a lower bound after {field} BETWEEN"))?;
                self.expect_keyword("AND", "between the bounds of BETWEEN", &example)?;
                let high = self.literal("an upper bound after AND")?;
                Ok(Expr::Between {
                    field,
                    low,
                    high,
                    negated,
                })
            }
            PredicateKind::In => {
                let values = self.in_list(&field)?;
                Ok(Expr::In {
                    field,
                    values,
                    negated,
                })
            }
            PredicateKind::Like => {
                let pattern = self.expect_string(
                    &format!("a quoted pattern after {field} LIKE"),
                    &format!(r#"{field} LIKE "Fran%""#),
                )?;
                Ok(Expr::Like {
                    field,
                    pattern,
                    negated,
                })
            }
        }
    }

    /// `( value, … )` after `field IN`.
    fn in_list(&mut self, field: &str) -> Parsed<Vec<Literal>> {
        let example = format!(r#"{field} IN ("capital", "language")"#);
        self.expect_sym(Sym::LParen, &format!("'(' after {field} IN"), &example)?;
        if self.peek_sym(Sym::RParen) {
            return Err(self
                .peek()
                .pos
                .error("an IN list needs at least one value", Some(example)));
        }
        let mut values = Vec::new();
        loop {
            values.push(self.literal("a string or number in the IN list")?);
            if self.eat_sym(Sym::RParen) {
                return Ok(values);
            }
            self.expect_sym(Sym::Comma, "',' or ')' in the IN list", &example)?;
        }
    }

    /// A string, or a number with an optional `-`.
    fn literal(&mut self, what: &str) -> Parsed<Literal> {
        let negative = self.eat_sym(Sym::Minus);
        match self.next() {
            Token {
                kind: Kind::Number(text),
                pos,
            } => match text.parse::<f64>() {
                Ok(value) if value.is_finite() => {
                    Ok(Literal::Num(if negative { -value } else { value }))
                }
                _ => Err(pos.error(format!("number {} is too large", shorten(&text)), None)),
            },
            Token {
                kind: Kind::Str(contents),
                ..
            } if !negative => Ok(Literal::Str(contents)),
            other => {
                let hint = match &other.kind {
                    Kind::Word(word) => format!(r#"put text in quotes: "{word}""#),
                    Kind::Sym(Sym::Eq) => "compare with a single =".to_owned(),
                    _ => r#"a value is a quoted string or a number, e.g. "capital" or 0.5"#
                        .to_owned(),
                };
                let what = if negative { "a number after '-'" } else { what };
                Err(unexpected(&other, what, Some(hint)))
            }
        }
    }
}

/// Checks a nesting depth or tree height reached at `at` against [`MAX_EXPR_DEPTH`].
fn within_depth(depth: usize, at: Pos) -> Parsed<usize> {
    if depth <= MAX_EXPR_DEPTH {
        Ok(depth)
    } else {
        Err(at.error(
            format!("condition nested too deeply (more than {MAX_EXPR_DEPTH} levels)"),
            Some(
                "use IN (…) instead of a long chain of OR, or drop redundant parentheses"
                    .to_owned(),
            ),
        ))
    }
}

/// The error for `token` when something else was `expected`; a malformed token reports its own
/// error instead.
fn unexpected(token: &Token, expected: &str, hint: Option<String>) -> ParseError {
    match &token.kind {
        Kind::Bad(error) => error.clone(),
        kind => token.pos.error(
            format!("expected {expected}, found {}", describe(kind)),
            hint,
        ),
    }
}

/// A hint for an unexpected `token`: a close keyword from `candidates` if there is one,
/// else `example`.
fn hint_for(token: &Token, candidates: &[&str], example: &str) -> Option<String> {
    let close = match &token.kind {
        Kind::Word(word) => suggest(word, candidates),
        _ => None,
    };
    Some(match close {
        Some(keyword) => format!("did you mean {keyword}?"),
        None => example.to_owned(),
    })
}

/// How a token is named in messages.
fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Word(word) if is_keyword(word) => format!("keyword {}", word.to_ascii_uppercase()),
        Kind::Word(word) => format!("identifier {}", shorten(word)),
        Kind::Str(contents) => format!("string {}", Quoted(&shorten(contents))),
        Kind::Number(text) => format!("number {}", shorten(text)),
        Kind::Sym(sym) => format!("'{}'", sym.text()),
        Kind::End => "end of input".to_owned(),
        Kind::Bad(error) => error.message.clone(),
    }
}

/// "A", "A or B", "A, B or C".
fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn is_reserved(word: &str) -> bool {
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(word))
}

fn is_command(word: &str) -> bool {
    COMMANDS
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case(word))
}

fn is_keyword(word: &str) -> bool {
    let matches = |name: &str| name.eq_ignore_ascii_case(word);
    is_reserved(word)
        || is_command(word)
        || OTHER_KEYWORDS.iter().any(|&name| matches(name))
        || SHOW_TARGETS.iter().any(|&(name, _)| matches(name))
        || SOURCES.iter().any(|&(name, _)| matches(name))
        || DESCRIBE_SCOPES.iter().any(|&(name, _)| matches(name))
        || DETAILS.iter().any(|&(name, _)| matches(name))
        || COMPILE_TARGETS.iter().any(|&(name, _)| matches(name))
        || MODEL_FORMATS.iter().any(|&(name, _)| matches(name))
}

/// The candidate keyword closest to `word` if it is a likely misspelling: one or two edits away
/// (a swap of neighbours counts as one) and fewer edits than `word` has characters.
fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word: Vec<char> = word.chars().map(|c| c.to_ascii_uppercase()).collect();
    candidates
        .iter()
        .filter_map(|&candidate| {
            let candidate_chars: Vec<char> = candidate.chars().collect();
            if candidate_chars.len().abs_diff(word.len()) > 2 {
                return None;
            }
            let distance = edit_distance(&word, &candidate_chars);
            (1..=2)
                .contains(&distance)
                .then_some((distance, candidate))
                .filter(|_| distance < word.len())
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of
/// adjacent characters each cost one.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    // Three rows of the dynamic-programming table: two back, previous, current.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current: Vec<usize> = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            let mut best = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
            let swapped = i > 0 && j > 0 && a.get(i - 1) == Some(&cb) && b.get(j - 1) == Some(&ca);
            if swapped {
                best = best.min(before[j - 1] + 1);
            }
            current[j + 1] = best;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distance(a: &str, b: &str) -> usize {
        let a: Vec<char> = a.chars().collect();
        let b: Vec<char> = b.chars().collect();
        edit_distance(&a, &b)
    }

    #[test]
    fn edit_distance_counts_edits_and_swaps() {
        assert_eq!(distance("", ""), 0);
        assert_eq!(distance("WALK", "WALK"), 0);
        assert_eq!(distance("", "USE"), 3);
        assert_eq!(distance("DESCRIBEE", "DESCRIBE"), 1);
        assert_eq!(distance("DESRCIBE", "DESCRIBE"), 1);
        assert_eq!(distance("SLECT", "SELECT"), 1);
        assert_eq!(distance("WLAKS", "WALK"), 2);
        assert_eq!(distance("ABC", "XYZ"), 3);
    }

    #[test]
    fn suggestions_need_a_close_match() {
        let commands: Vec<&str> = COMMANDS.iter().map(|&(name, _)| name).collect();
        assert_eq!(suggest("describee", &commands), Some("DESCRIBE"));
        assert_eq!(suggest("SLECT", &commands), Some("SELECT"));
        assert_eq!(suggest("ues", &commands), Some("USE"));
        assert_eq!(suggest("x", &commands), None);
        assert_eq!(suggest("banana", &commands), None);
        assert_eq!(suggest("WALK", &commands), None);
    }

    #[test]
    fn one_of_joins_with_or() {
        assert_eq!(one_of(&[]), "");
        assert_eq!(one_of(&["A"]), "A");
        assert_eq!(one_of(&["A", "B"]), "A or B");
        assert_eq!(one_of(&["A", "B", "C"]), "A, B or C");
    }
}
