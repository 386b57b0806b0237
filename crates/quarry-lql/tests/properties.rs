//! Properties over generated input (random text, random token sequences, valid statements with
//! one edit): the parser never panics, whatever it accepts prints back to itself, and every syntax tree the parser could produce round-trips through `Display`.
//!
//! Generated field names come from `[A-Za-z_][A-Za-z0-9_]*` minus the reserved words (the parser
//! itself is asked which are reserved), so the generators cover exactly the trees the parser can
//! produce: the printer needs no quoting for names.

use proptest::prelude::*;
use quarry_lql::{
    parse, CmpOp, CompileTarget, DescribeMethod, DescribeScope, Detail, EdgeValue, EditMode, Expr,
    LayerRange, Literal, ModelFormat, Nearest, OrderKey, PatchStatement, Projection, Select,
    ShowTarget, Source, Statement,
};

/// Asserts that every statement of an accepted script prints to text that parses back to it.
fn assert_statements_round_trip(statements: &[Statement]) -> Result<(), TestCaseError> {
    for statement in statements {
        let printed = statement.to_string();
        prop_assert_eq!(parse(&printed), Ok(vec![statement.clone()]), "{}", printed);
    }
    Ok(())
}

/// Pieces of LQL, valid and not, for building near-miss scripts.
const TOKENS: &[&str] = &[
    "USE",
    "STATS",
    "SHOW",
    "LAYERS",
    "FEATURES",
    "RELATIONS",
    "ENTITIES",
    "MODELS",
    "WALK",
    "EXPLAIN",
    "DESCRIBE",
    "AT",
    "LAYER",
    "ALL",
    "SYNTAX",
    "KNOWLEDGE",
    "OUTPUT",
    "BRIEF",
    "VERBOSE",
    "RAW",
    "SELECT",
    "FROM",
    "EDGES",
    "NEAREST",
    "TO",
    "WHERE",
    "ORDER",
    "BY",
    "ASC",
    "DESC",
    "LIMIT",
    "INFER",
    "TOP",
    "TRACE",
    "FOR",
    "DECOMPOSE",
    "AND",
    "OR",
    "NOT",
    "BETWEEN",
    "IN",
    "LIKE",
    "INSERT",
    "INTO",
    "VALUES",
    "UPDATE",
    "SET",
    "DELETE",
    "TEMPLATE",
    "MODE",
    "COMPOSE",
    "BEGIN",
    "SAVE",
    "APPLY",
    "REMOVE",
    "PATCH",
    "PATCHES",
    "DIFF",
    "COMPILE",
    "CURRENT",
    "VINDEX",
    "MODEL",
    "ADAPTER",
    "FORMAT",
    "GGUF",
    "SAFETENSORS",
    "entity",
    "relation",
    "target",
    "\"{entity}\"",
    "(entity, relation, target)",
    "(\"e\", \"r\", \"t\")",
    "select",
    "walk",
    "score",
    "layer",
    "x",
    "\"prompt\"",
    "'it''s'",
    "\"\\n\"",
    "\"open",
    "0",
    "7",
    "12",
    "3.5",
    "-",
    "-1",
    "4294967296",
    "1.",
    ";",
    ",",
    "(",
    ")",
    "*",
    "=",
    "!=",
    "<>",
    "<",
    "<=",
    ">",
    ">=",
    "--",
    "\n",
    "é",
    "!",
    "\\",
    ".",
];

fn token_soup() -> impl Strategy<Value = String> {
    let piece = (
        prop::sample::select(TOKENS),
        prop::sample::select(&[" ", " ", "\n", ""][..]),
    );
    prop::collection::vec(piece, 0..24).prop_map(|pieces| {
        pieces
            .into_iter()
            .flat_map(|(token, separator)| [token, separator])
            .collect()
    })
}

/// A valid statement with one edit: a token from [`TOKENS`] inserted, or a span deleted.
fn near_miss() -> impl Strategy<Value = String> {
    let edit = prop::option::of(prop::sample::select(TOKENS));
    (
        statement(),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        edit,
    )
        .prop_map(|(statement, start, length, insert)| {
            let chars: Vec<char> = statement.to_string().chars().collect();
            let start = start.index(chars.len() + 1);
            let (before, after) = chars.split_at(start);
            let mut edited: String = before.iter().collect();
            match insert {
                Some(token) => {
                    edited.push_str(token);
                    edited.extend(after);
                }
                None => edited.extend(&after[length.index(after.len() + 1)..]),
            }
            edited
        })
}

fn field() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,8}".prop_filter("reserved word", |name| {
        parse(&format!("SELECT {name} FROM EDGES")).is_ok()
    })
}

/// Any text, weighted towards the characters the printer must escape.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z \"'\\\\\n\t\r-]{0,12}"]
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |v| v.is_finite()),
        (-1000i32..1000).prop_map(|n| f64::from(n) / 8.0),
    ]
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        text().prop_map(Literal::Str),
        number().prop_map(Literal::Num)
    ]
}

fn cmp_op() -> impl Strategy<Value = CmpOp> {
    prop::sample::select(
        &[
            CmpOp::Eq,
            CmpOp::Ne,
            CmpOp::Lt,
            CmpOp::Le,
            CmpOp::Gt,
            CmpOp::Ge,
        ][..],
    )
}

fn predicate() -> impl Strategy<Value = Expr> {
    prop_oneof![
        (field(), cmp_op(), literal()).prop_map(|(field, op, value)| Expr::Compare {
            field,
            op,
            value
        }),
        (field(), literal(), literal(), any::<bool>()).prop_map(|(field, low, high, negated)| {
            Expr::Between {
                field,
                low,
                high,
                negated,
            }
        }),
        (
            field(),
            prop::collection::vec(literal(), 1..4),
            any::<bool>()
        )
            .prop_map(|(field, values, negated)| Expr::In {
                field,
                values,
                negated
            }),
        (field(), text(), any::<bool>()).prop_map(|(field, pattern, negated)| Expr::Like {
            field,
            pattern,
            negated
        }),
    ]
}

fn expr() -> impl Strategy<Value = Expr> {
    predicate().prop_recursive(5, 24, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Expr::Or(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Expr::And(Box::new(a), Box::new(b))),
            inner.prop_map(|a| Expr::Not(Box::new(a))),
        ]
    })
}

fn layer_range() -> impl Strategy<Value = LayerRange> {
    prop_oneof![(0u32..64, 0u32..64), (any::<u32>(), any::<u32>())].prop_map(|(a, b)| LayerRange {
        first: a.min(b),
        last: a.max(b),
    })
}

/// A `TEMPLATE`: text around exactly one `{entity}`.
fn template() -> impl Strategy<Value = String> {
    (text(), text())
        .prop_map(|(before, after)| format!("{before}{{entity}}{after}"))
        .prop_filter("one placeholder", |t| t.matches("{entity}").count() == 1)
}

fn edge_value() -> impl Strategy<Value = EdgeValue> {
    (text(), text(), text()).prop_map(|(entity, relation, target)| EdgeValue {
        entity,
        relation,
        target,
    })
}

fn patch() -> impl Strategy<Value = PatchStatement> {
    prop_oneof![
        text().prop_map(|path| PatchStatement::Begin { path }),
        Just(PatchStatement::Save),
        text().prop_map(|path| PatchStatement::Apply { path }),
        text().prop_map(|path| PatchStatement::Remove { path }),
        (text(), prop::option::of(text())).prop_map(|(a, b)| PatchStatement::Diff { a, b }),
    ]
}

fn compile_target() -> impl Strategy<Value = CompileTarget> {
    prop::sample::select(
        &[
            CompileTarget::Vindex,
            CompileTarget::Model { format: None },
            CompileTarget::Model {
                format: Some(ModelFormat::Gguf),
            },
            CompileTarget::Adapter,
        ][..],
    )
}

/// The statements that edit the model.
fn edit() -> impl Strategy<Value = Statement> {
    prop_oneof![
        (
            prop::collection::vec(edge_value(), 1..4),
            prop::option::of(layer_range()),
            prop::option::of(template()),
            prop::sample::select(&[EditMode::Default, EditMode::Compose][..]),
        )
            .prop_map(|(edges, layers, template, mode)| Statement::Insert {
                edges,
                layers,
                template,
                mode
            }),
        (
            text(),
            text(),
            text(),
            prop::option::of(layer_range()),
            prop::option::of(template())
        )
            .prop_map(
                |(entity, relation, target, layers, template)| Statement::Update {
                    entity,
                    relation,
                    target,
                    layers,
                    template
                }
            ),
        (text(), text()).prop_map(|(entity, relation)| Statement::Delete { entity, relation }),
        patch().prop_map(Statement::Patch),
        (compile_target(), text()).prop_map(|(target, path)| Statement::Compile { target, path }),
    ]
}

fn top() -> impl Strategy<Value = Option<u32>> {
    prop::option::of(any::<u32>())
}

fn select() -> impl Strategy<Value = Select> {
    let projection = prop_oneof![
        Just(Projection::All),
        prop::collection::vec(field(), 1..4).prop_map(Projection::Fields),
    ];
    let source = prop::sample::select(&[Source::Edges, Source::Features, Source::Entities][..]);
    let nearest = prop::option::of(
        (text(), any::<u32>()).prop_map(|(entity, layer)| Nearest { entity, layer }),
    );
    let order_key =
        (field(), any::<bool>()).prop_map(|(field, descending)| OrderKey { field, descending });
    (
        projection,
        source,
        nearest,
        prop::option::of(expr()),
        prop::collection::vec(order_key, 0..3),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(fields, from, nearest, filter, order_by, limit)| Select {
            fields,
            from,
            nearest,
            filter,
            order_by,
            limit,
        })
}

fn statement() -> impl Strategy<Value = Statement> {
    let show = prop_oneof![
        Just(ShowTarget::Layers),
        (
            any::<u32>(),
            prop::option::of(expr()),
            prop::option::of(any::<u64>())
        )
            .prop_map(|(layer, filter, limit)| ShowTarget::Features {
                layer,
                filter,
                limit
            }),
        (any::<bool>(), prop::option::of(any::<u32>()), any::<bool>()).prop_map(
            |(features, layer, examples)| ShowTarget::Relations {
                features,
                layer,
                examples
            }
        ),
        (
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u64>())
        )
            .prop_map(|(layer, limit)| ShowTarget::Entities { layer, limit }),
        Just(ShowTarget::Models),
        Just(ShowTarget::Patches),
    ];
    let scope = prop_oneof![
        Just(DescribeScope::Default),
        any::<u32>().prop_map(DescribeScope::AtLayer),
        Just(DescribeScope::AllLayers),
        Just(DescribeScope::Syntax),
        Just(DescribeScope::Knowledge),
        Just(DescribeScope::Output),
    ];
    let detail = prop::sample::select(&[Detail::Normal, Detail::Brief, Detail::Verbose][..]);
    prop_oneof![
        text().prop_map(|path| Statement::Use { path }),
        Just(Statement::Stats),
        show.prop_map(Statement::Show),
        (
            text(),
            top(),
            prop::option::of(layer_range()),
            any::<bool>()
        )
            .prop_map(|(prompt, top, layers, explain)| Statement::Walk {
                prompt,
                top,
                layers,
                explain
            }),
        (
            text(),
            scope,
            detail,
            any::<bool>(),
            prop_oneof![
                Just(DescribeMethod::Answers),
                Just(DescribeMethod::Features),
                Just(DescribeMethod::Raw)
            ]
        )
            .prop_map(|(entity, scope, detail, relations_only, method)| {
                Statement::Describe {
                    entity,
                    scope,
                    detail,
                    relations_only,
                    method,
                }
            }),
        select().prop_map(Statement::Select),
        // Only EXPLAIN INFER takes LAYERS.
        (
            text(),
            top(),
            any::<bool>(),
            prop::option::of(layer_range())
        )
            .prop_map(|(prompt, top, explain, layers)| Statement::Infer {
                prompt,
                top,
                explain,
                layers: layers.filter(|_| explain),
            }),
        (
            text(),
            prop::option::of(text()),
            any::<bool>(),
            prop::option::of(layer_range())
        )
            .prop_map(|(prompt, target, decompose, layers)| Statement::Trace {
                prompt,
                target,
                decompose,
                layers
            }),
        edit(),
    ]
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(src in any::<String>()) {
        if let Ok(statements) = parse(&src) {
            assert_statements_round_trip(&statements)?;
        }
    }

    #[test]
    fn token_soup_never_panics(src in token_soup()) {
        match parse(&src) {
            Ok(statements) => assert_statements_round_trip(&statements)?,
            Err(error) => {
                prop_assert!(error.line >= 1 && error.column >= 1);
                prop_assert!(error.line <= src.lines().count().max(1) + 1, "{}", error);
            }
        }
    }

    #[test]
    fn near_misses_never_panic(src in near_miss()) {
        if let Ok(statements) = parse(&src) {
            assert_statements_round_trip(&statements)?;
        }
    }

    #[test]
    fn generated_statements_round_trip(statement in statement()) {
        let printed = statement.to_string();
        prop_assert_eq!(parse(&printed), Ok(vec![statement]), "{}", printed);
    }

    #[test]
    fn generated_scripts_round_trip(statements in prop::collection::vec(statement(), 0..4)) {
        let script: String = statements.iter().map(|s| format!("{s};\n")).collect();
        prop_assert_eq!(parse(&script), Ok(statements));
    }
}
