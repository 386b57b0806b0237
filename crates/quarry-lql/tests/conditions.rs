//! `WHERE` conditions: precedence (NOT over AND over OR), left associativity, parentheses, every
//! predicate form, minimal parentheses when printing, and the nesting limit.

use quarry_lql::{parse, CmpOp, Expr, Literal, Select, Statement, MAX_EXPR_DEPTH};

/// The condition of `SELECT * FROM EDGES WHERE {condition}`.
fn condition(condition: &str) -> Expr {
    let src = format!("SELECT * FROM EDGES WHERE {condition}");
    match parse(&src) {
        Ok(statements) => match &statements[..] {
            [Statement::Select(Select {
                filter: Some(expr), ..
            })] => expr.clone(),
            other => panic!("{src:?} parsed to {other:?}"),
        },
        Err(e) => panic!("{src:?}: {e}"),
    }
}

/// `name = 1`.
fn p(name: &str) -> Expr {
    Expr::Compare {
        field: name.into(),
        op: CmpOp::Eq,
        value: Literal::Num(1.0),
    }
}

fn or(a: Expr, b: Expr) -> Expr {
    Expr::Or(Box::new(a), Box::new(b))
}

fn and(a: Expr, b: Expr) -> Expr {
    Expr::And(Box::new(a), Box::new(b))
}

fn not(a: Expr) -> Expr {
    Expr::Not(Box::new(a))
}

#[test]
fn and_binds_tighter_than_or() {
    assert_eq!(
        condition("a = 1 OR b = 1 AND c = 1"),
        or(p("a"), and(p("b"), p("c")))
    );
    assert_eq!(
        condition("a = 1 AND b = 1 OR c = 1"),
        or(and(p("a"), p("b")), p("c"))
    );
}

#[test]
fn not_binds_tighter_than_and() {
    assert_eq!(condition("NOT a = 1 AND b = 1"), and(not(p("a")), p("b")));
    assert_eq!(
        condition("a = 1 OR NOT b = 1 AND c = 1"),
        or(p("a"), and(not(p("b")), p("c")))
    );
    assert_eq!(condition("NOT NOT a = 1"), not(not(p("a"))));
}

#[test]
fn binary_operators_associate_to_the_left() {
    assert_eq!(
        condition("a = 1 OR b = 1 OR c = 1"),
        or(or(p("a"), p("b")), p("c"))
    );
    assert_eq!(
        condition("a = 1 AND b = 1 AND c = 1"),
        and(and(p("a"), p("b")), p("c"))
    );
}

#[test]
fn parentheses_override_precedence() {
    assert_eq!(
        condition("(a = 1 OR b = 1) AND c = 1"),
        and(or(p("a"), p("b")), p("c"))
    );
    assert_eq!(
        condition("a = 1 OR (b = 1 OR c = 1)"),
        or(p("a"), or(p("b"), p("c")))
    );
    assert_eq!(condition("NOT (a = 1 AND b = 1)"), not(and(p("a"), p("b"))));
    assert_eq!(condition("(((a = 1)))"), p("a"));
}

#[test]
fn printing_uses_minimal_parentheses() {
    let cases = [
        (or(p("a"), and(p("b"), p("c"))), "a = 1 OR b = 1 AND c = 1"),
        (
            and(or(p("a"), p("b")), p("c")),
            "(a = 1 OR b = 1) AND c = 1",
        ),
        (or(or(p("a"), p("b")), p("c")), "a = 1 OR b = 1 OR c = 1"),
        (or(p("a"), or(p("b"), p("c"))), "a = 1 OR (b = 1 OR c = 1)"),
        (
            and(p("a"), and(p("b"), p("c"))),
            "a = 1 AND (b = 1 AND c = 1)",
        ),
        (not(and(p("a"), p("b"))), "NOT (a = 1 AND b = 1)"),
        (not(not(p("a"))), "NOT NOT a = 1"),
        (
            and(not(p("a")), not(or(p("b"), p("c")))),
            "NOT a = 1 AND NOT (b = 1 OR c = 1)",
        ),
    ];
    for (expr, printed) in cases {
        assert_eq!(expr.to_string(), printed);
        assert_eq!(condition(printed), expr, "{printed}");
    }
}

#[test]
fn every_predicate_form() {
    let ops = [
        ("=", CmpOp::Eq),
        ("!=", CmpOp::Ne),
        ("<>", CmpOp::Ne),
        ("<", CmpOp::Lt),
        ("<=", CmpOp::Le),
        (">", CmpOp::Gt),
        (">=", CmpOp::Ge),
    ];
    for (text, op) in ops {
        let expected = Expr::Compare {
            field: "score".into(),
            op,
            value: Literal::Num(-0.25),
        };
        assert_eq!(condition(&format!("score {text} -0.25")), expected);
    }
    for negated in [false, true] {
        let not_word = if negated { " not" } else { "" };
        assert_eq!(
            condition(&format!("layer{not_word} between 2 and 'z'")),
            Expr::Between {
                field: "layer".into(),
                low: Literal::Num(2.0),
                high: Literal::Str("z".into()),
                negated,
            }
        );
        assert_eq!(
            condition(&format!(r#"relation{not_word} in ("capital", 4.5, -1)"#)),
            Expr::In {
                field: "relation".into(),
                values: vec![
                    Literal::Str("capital".into()),
                    Literal::Num(4.5),
                    Literal::Num(-1.0),
                ],
                negated,
            }
        );
        assert_eq!(
            condition(&format!("entity{not_word} like 'Fr_n%'")),
            Expr::Like {
                field: "entity".into(),
                pattern: "Fr_n%".into(),
                negated,
            }
        );
    }
}

#[test]
fn between_takes_the_first_and() {
    assert_eq!(
        condition("x BETWEEN 1 AND 2 AND y = 1"),
        and(
            Expr::Between {
                field: "x".into(),
                low: Literal::Num(1.0),
                high: Literal::Num(2.0),
                negated: false,
            },
            p("y")
        )
    );
}

#[test]
fn a_prefix_not_and_a_negated_predicate_combine() {
    assert_eq!(
        condition("NOT x NOT IN (1)"),
        not(Expr::In {
            field: "x".into(),
            values: vec![Literal::Num(1.0)],
            negated: true,
        })
    );
}

#[test]
fn nesting_is_limited() {
    let nots = |n: usize| format!("{}a = 1", "NOT ".repeat(n));
    let parens = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
    let chain = |n: usize| vec!["a = 1"; n].join(" OR ");

    // The limit counts operators and parentheses, not predicates. The deepest trees also print
    // and parse back (printing recurses over the tree's height).
    for src in [
        nots(MAX_EXPR_DEPTH),
        parens(MAX_EXPR_DEPTH),
        chain(MAX_EXPR_DEPTH + 1),
    ] {
        let deepest = condition(&src);
        assert_eq!(condition(&deepest.to_string()), deepest);
    }

    // Each error points at the first operator or parenthesis past the limit.
    for (src, column) in [
        (nots(MAX_EXPR_DEPTH + 1), 4 * MAX_EXPR_DEPTH + 1),
        (parens(MAX_EXPR_DEPTH + 1), MAX_EXPR_DEPTH + 1),
        (chain(MAX_EXPR_DEPTH + 2), 9 * MAX_EXPR_DEPTH + 7),
        // Far past the limit: an error, not a stack overflow.
        (parens(100_000), MAX_EXPR_DEPTH + 1),
    ] {
        let error = parse(&format!("SELECT * FROM EDGES WHERE {src}")).unwrap_err();
        let prefix = "SELECT * FROM EDGES WHERE ".len();
        assert_eq!((error.line, error.column - prefix), (1, column), "{error}");
        assert!(error.message.contains("nested too deeply"), "{error}");
    }
}
