//! Malformed scripts: the exact position of each error, its message and its hint.

use quarry_lql::{parse, ParseError};

/// Parses `src`, which must fail, and returns the error.
fn parse_error(src: &str) -> ParseError {
    match parse(src) {
        Ok(statements) => panic!("{src:?} parsed to {statements:?}"),
        Err(error) => error,
    }
}

/// Checks the position and that the message and hint contain the given fragments (`None`: no
/// hint at all).
fn check(src: &str, line: usize, column: usize, message: &str, hint: Option<&str>) {
    let error = parse_error(src);
    assert_eq!(
        (error.line, error.column),
        (line, column),
        "{src:?}: {error}"
    );
    assert!(
        error.message.contains(message),
        "{src:?}: message {:?} lacks {message:?}",
        error.message
    );
    match (hint, &error.hint) {
        (Some(want), Some(got)) => {
            assert!(got.contains(want), "{src:?}: hint {got:?} lacks {want:?}")
        }
        (None, None) => {}
        (want, got) => panic!("{src:?}: hint {got:?}, wanted {want:?}"),
    }
}

#[test]
fn display_shows_position_message_and_hint() {
    let error = parse_error("WALK 42");
    assert_eq!(
        error.to_string(),
        "line 1, column 6: expected a quoted prompt after WALK, found number 42\n  \
         hint: WALK \"The capital of France is\" TOP 10"
    );
    let error = parse_error("USE \"x");
    assert_eq!(
        error.hint.as_deref(),
        Some("close the string with a matching \"")
    );
    let error = parse_error("SELECT * FROM EDGES WHERE a = 1 OR x = 1e5");
    assert_eq!(
        error.hint,
        Some("names start with a letter or _; put a space between a number and a word".into())
    );
    let without_hint = ParseError {
        line: 2,
        column: 3,
        message: "oops".into(),
        hint: None,
    };
    assert_eq!(without_hint.to_string(), "line 2, column 3: oops");
}

#[test]
fn statement_keywords() {
    check(
        "DESCRIBEE \"France\"",
        1,
        1,
        "expected USE, STATS, SHOW, WALK, EXPLAIN, DESCRIBE, SELECT, INFER or TRACE to start a \
         statement, found identifier DESCRIBEE",
        Some("did you mean DESCRIBE?"),
    );
    check(
        "slect * from edges",
        1,
        1,
        "found identifier slect",
        Some("did you mean SELECT?"),
    );
    check(
        "wakl 'x'",
        1,
        1,
        "to start a statement",
        Some("did you mean WALK?"),
    );
    check(
        "banana",
        1,
        1,
        "found identifier banana",
        Some("every statement starts with a keyword"),
    );
    check(
        "\"x\"",
        1,
        1,
        "found string \"x\"",
        Some("every statement starts with a keyword"),
    );
    check(
        "LIMIT 5",
        1,
        1,
        "found keyword LIMIT",
        Some("every statement starts"),
    );
    check(
        "EXPLAIN SELECT * FROM EDGES",
        1,
        9,
        "expected WALK or INFER after EXPLAIN, found keyword SELECT",
        Some("EXPLAIN WALK"),
    );
    check(
        "EXPLAIN INFR 'x'",
        1,
        9,
        "WALK or INFER",
        Some("did you mean INFER?"),
    );
}

#[test]
fn missing_or_wrong_arguments() {
    check(
        "USE gemma",
        1,
        5,
        "expected a quoted model path after USE, found identifier gemma",
        Some("USE \""),
    );
    check(
        "SHOW",
        1,
        5,
        "expected LAYERS, FEATURES, RELATIONS, ENTITIES or MODELS after SHOW, found end of input",
        Some("SHOW FEATURES 12"),
    );
    check(
        "SHOW LAYRS",
        1,
        6,
        "found identifier LAYRS",
        Some("did you mean LAYERS?"),
    );
    check(
        "SHOW FEATURES x",
        1,
        15,
        "expected a layer number after SHOW FEATURES, found identifier x",
        Some("SHOW FEATURES 12"),
    );
    check(
        "SHOW FEATURES 1.5",
        1,
        15,
        "a layer number after SHOW FEATURES must be a whole number, found 1.5",
        Some("SHOW FEATURES 12"),
    );
    check(
        "WALK",
        1,
        5,
        "expected a quoted prompt after WALK, found end of input",
        Some("WALK \""),
    );
    check(
        "WALK France",
        1,
        6,
        "found identifier France",
        Some("WALK \"The capital of France is\" TOP 10"),
    );
    check(
        "WALK 'x' TOP",
        1,
        13,
        "expected a result count after TOP, found end of input",
        Some("TOP 10"),
    );
    check(
        "WALK 'x' TOP -3",
        1,
        14,
        "a result count after TOP cannot be negative",
        Some("TOP 10"),
    );
    check(
        "WALK 'x' TOP 4294967296",
        1,
        14,
        "a result count after TOP is too large: 4294967296",
        Some("TOP 10"),
    );
    check(
        "INFER 42",
        1,
        7,
        "expected a quoted prompt after INFER, found number 42",
        Some("INFER \""),
    );
    check(
        "DESCRIBE France",
        1,
        10,
        "expected a quoted entity name after DESCRIBE",
        Some("DESCRIBE \"France\""),
    );
    check(
        "DESCRIBE 'x' AT 3",
        1,
        17,
        "expected LAYER after AT, found number 3",
        Some("AT LAYER 20"),
    );
    check(
        "DESCRIBE 'x' AT LAYR 3",
        1,
        17,
        "expected LAYER after AT",
        Some("did you mean LAYER?"),
    );
    check(
        "DESCRIBE 'x' ALL",
        1,
        17,
        "expected LAYERS after ALL, found end of input",
        Some("ALL LAYERS"),
    );
    check(
        "TRACE 'x' FOR Paris",
        1,
        15,
        "expected a quoted token after FOR, found identifier Paris",
        Some("FOR \" Paris\""),
    );
}

#[test]
fn layer_ranges() {
    check(
        "WALK 'x' LAYERS 9-3",
        1,
        17,
        "layer range 9-3 is reversed",
        Some("write LAYERS 3-9"),
    );
    check(
        "TRACE 'x' LAYERS 4-",
        1,
        20,
        "expected the last layer after LAYERS 4-, found end of input",
        Some("LAYERS 20-25"),
    );
    check(
        "TRACE 'x' LAYERS",
        1,
        17,
        "expected a layer number after LAYERS, found end of input",
        Some("LAYERS 20-25"),
    );
    check(
        "EXPLAIN WALK 'x' LAYERS -2",
        1,
        25,
        "a layer number after LAYERS cannot be negative",
        Some("LAYERS 20-25"),
    );
    check(
        "INFER 'x' LAYERS 3",
        1,
        11,
        "LAYERS is only available with EXPLAIN INFER",
        Some("EXPLAIN INFER"),
    );
}

#[test]
fn clauses_out_of_order_or_unknown() {
    check(
        "WALK 'x' LAYERS 1-2 TOP 5",
        1,
        21,
        "TOP cannot come here: the optional clauses of WALK go in a fixed order, each at most once",
        Some("the order is: TOP n, LAYERS a-b"),
    );
    check(
        "WALK 'x' TOP 1 TOP 2",
        1,
        16,
        "TOP cannot come here",
        Some("TOP n, LAYERS a-b"),
    );
    check(
        "EXPLAIN WALK 'x' TOPP 5",
        1,
        18,
        "expected ';' or end of input after EXPLAIN WALK, found identifier TOPP",
        Some("did you mean TOP?"),
    );
    check(
        "DESCRIBE 'x' VERBOSE ALL LAYERS",
        1,
        22,
        "ALL cannot come here",
        Some("then BRIEF or VERBOSE"),
    );
    check(
        "DESCRIBE 'x' BRIEF VERBOSE",
        1,
        20,
        "VERBOSE cannot come here",
        Some("then RAW"),
    );
    check(
        "TRACE 'x' DECOMPOSE FOR 'y'",
        1,
        21,
        "FOR cannot come here",
        Some(r#"FOR "token", DECOMPOSE, LAYERS a-b"#),
    );
    check(
        "SELECT * FROM EDGES LIMIT 3 WHERE a = 1",
        1,
        29,
        "WHERE cannot come here",
        Some("NEAREST TO"),
    );
    check(
        "SELECT * FROM EDGES foo",
        1,
        21,
        "expected ';' or end of input after SELECT, found identifier foo",
        Some("SELECT may end with: NEAREST"),
    );
    check(
        "STATS SHOW LAYERS",
        1,
        7,
        "expected ';' or end of input after STATS, found keyword SHOW",
        Some("separate statements with ';'"),
    );
    check("STATS 5", 1, 7, "after STATS, found number 5", None);
    check(
        "INFER 'x' TOP 3 )",
        1,
        17,
        "after INFER, found ')'",
        Some("INFER may end with: TOP n"),
    );
}

#[test]
fn select_structure() {
    check(
        "SELECT * EDGES",
        1,
        10,
        "expected FROM after the field list, found keyword EDGES",
        Some("SELECT * FROM EDGES"),
    );
    check(
        "SELECT a b FROM EDGES",
        1,
        10,
        "expected FROM after the field list, found identifier b",
        Some("FROM"),
    );
    check(
        "SELECT FROM EDGES",
        1,
        8,
        "expected * or a field name after SELECT, found keyword FROM",
        Some("SELECT * FROM EDGES"),
    );
    check(
        "SELECT",
        1,
        7,
        "expected * or a field name after SELECT, found end of input",
        Some("SELECT *"),
    );
    check(
        "SELECT *, a FROM EDGES",
        1,
        9,
        "* cannot be combined with named fields",
        Some("SELECT *"),
    );
    check(
        "SELECT a, FROM EDGES",
        1,
        11,
        "expected a field name after ',', found keyword FROM",
        Some("FROM is a reserved word"),
    );
    check(
        "SELECT \"a\" FROM EDGES",
        1,
        8,
        "found string \"a\"",
        Some("field names are not quoted"),
    );
    check(
        "SELECT order FROM EDGES",
        1,
        8,
        "found keyword ORDER",
        Some("ORDER is a reserved word, not a field name"),
    );
    check(
        "SELECT * FROM EDGE",
        1,
        15,
        "expected EDGES, FEATURES or ENTITIES after FROM, found identifier EDGE",
        Some("did you mean EDGES?"),
    );
    check(
        "SELECT * FROM",
        1,
        14,
        "found end of input",
        Some("SELECT * FROM EDGES"),
    );
    check(
        "SELECT * FROM ENTITIES NEAREST 'x'",
        1,
        32,
        "expected TO after NEAREST",
        Some("NEAREST TO \"France\" AT LAYER 20"),
    );
    check(
        "SELECT * FROM ENTITIES NEAREST TO x",
        1,
        35,
        "expected a quoted entity name after NEAREST TO",
        Some("NEAREST TO"),
    );
    check(
        "SELECT * FROM ENTITIES NEAREST TO 'x' LAYER 3",
        1,
        39,
        "expected AT after the entity of NEAREST TO, found keyword LAYER",
        Some("AT LAYER 20"),
    );
    check(
        "SELECT * FROM ENTITIES NEAREST TO 'x' AT 3",
        1,
        42,
        "expected LAYER after AT",
        Some("AT LAYER 20"),
    );
    check(
        "SELECT * FROM EDGES ORDER score",
        1,
        27,
        "expected BY after ORDER, found identifier score",
        Some("ORDER BY score DESC"),
    );
    check(
        "SELECT * FROM EDGES ORDER BY",
        1,
        29,
        "expected a field name after ORDER BY, found end of input",
        Some("ORDER BY"),
    );
    check(
        "SELECT * FROM EDGES ORDER BY a,",
        1,
        32,
        "expected a field name after ',', found end of input",
        Some("ORDER BY"),
    );
    check(
        "SELECT * FROM EDGES LIMIT -1",
        1,
        27,
        "a row count after LIMIT cannot be negative",
        Some("LIMIT 10"),
    );
    check(
        "SELECT * FROM EDGES LIMIT 2.5",
        1,
        27,
        "a row count after LIMIT must be a whole number, found 2.5",
        Some("LIMIT 10"),
    );
    check(
        "SELECT * FROM EDGES LIMIT 18446744073709551616",
        1,
        27,
        "a row count after LIMIT is too large",
        Some("LIMIT 10"),
    );
    check(
        "SELECT * FROM EDGES LIMIT ten",
        1,
        27,
        "expected a row count after LIMIT, found identifier ten",
        Some("LIMIT 10"),
    );
}

#[test]
fn conditions() {
    let at = |column: usize| column + "SELECT * FROM EDGES WHERE ".len();
    let check_where = |condition: &str, column: usize, message: &str, hint: Option<&str>| {
        check(
            &format!("SELECT * FROM EDGES WHERE {condition}"),
            1,
            at(column),
            message,
            hint,
        );
    };
    check(
        "SELECT * FROM EDGES WHERE",
        1,
        26,
        "expected a condition (a field name, NOT or '('), found end of input",
        Some("WHERE relation = \"capital\""),
    );
    check_where(
        "a = 1 b = 2",
        7,
        "expected ';' or end of input after SELECT, found identifier b",
        Some("join conditions with AND or OR"),
    );
    check_where(
        "a == 1",
        4,
        "expected a string or number after a =, found '='",
        Some("compare with a single ="),
    );
    check_where(
        "relation = capital",
        12,
        "expected a string or number after relation =, found identifier capital",
        Some("put text in quotes: \"capital\""),
    );
    check_where(
        "a = -'x'",
        6,
        "expected a number after '-', found string \"x\"",
        Some("a value is a quoted string or a number"),
    );
    check_where(
        "a = 1 AND",
        10,
        "expected a condition",
        Some("WHERE relation"),
    );
    check_where(
        "a 1",
        3,
        "expected an operator after a: =, !=, <, <=, >, >=, BETWEEN, IN or LIKE, found number 1",
        Some("a = \"capital\""),
    );
    check_where(
        "a LIK 'x'",
        3,
        "expected an operator after a",
        Some("did you mean LIKE?"),
    );
    check_where(
        "a NOT = 1",
        7,
        "expected BETWEEN, IN or LIKE after a NOT, found '='",
        Some("a = \"capital\""),
    );
    check_where(
        "a BETWEEN 1 OR 2",
        13,
        "expected AND between the bounds of BETWEEN, found keyword OR",
        Some("a BETWEEN 0.2 AND 0.8"),
    );
    check_where(
        "a BETWEEN 1 AND",
        16,
        "expected an upper bound after AND, found end of input",
        Some("quoted string or a number"),
    );
    check_where(
        "a IN 1, 2",
        6,
        "expected '(' after a IN, found number 1",
        Some("a IN (\"capital\", \"language\")"),
    );
    check_where(
        "a IN ()",
        7,
        "an IN list needs at least one value",
        Some("a IN ("),
    );
    check_where(
        "a IN (1 2)",
        9,
        "expected ',' or ')' in the IN list, found number 2",
        Some("a IN ("),
    );
    check_where(
        "a IN (1,",
        9,
        "expected a string or number in the IN list, found end of input",
        Some("quoted string or a number"),
    );
    check_where(
        "a LIKE Fran",
        8,
        "expected a quoted pattern after a LIKE, found identifier Fran",
        Some("a LIKE \"Fran%\""),
    );
    check_where(
        "(a = 1",
        7,
        "expected ')' to close the '(' at line 1, column 27, found end of input",
        Some("add the missing ')'"),
    );
    check_where(
        "(a = 1 b = 2)",
        8,
        "expected ')' to close the '('",
        Some("join conditions with AND or OR"),
    );
    check_where(
        "a = 1 && b = 2",
        7,
        "unexpected character '&'",
        Some("write AND"),
    );
    check_where(
        "a = 1 || b = 2",
        7,
        "unexpected character '|'",
        Some("write OR"),
    );
    check_where(
        "a ! 1",
        3,
        "unexpected character '!'",
        Some("write != for not-equal"),
    );
    check_where(
        "a = .5",
        5,
        "unexpected character '.'",
        Some("leading zero"),
    );
    check_where(
        "a = 5.",
        5,
        "malformed number 5.: expected digits after the decimal point",
        Some("write 5.0 or 5"),
    );
    check_where(
        "a = 1e400",
        5,
        "malformed number 1e400",
        Some("put a space"),
    );
    check_where(
        &format!("a = 1{}", "0".repeat(400)),
        5,
        "is too large",
        None,
    );
    check_where(
        "été = 1",
        1,
        "unexpected character 'é'",
        Some("ASCII letters"),
    );
    check_where(
        "limit > 3",
        1,
        "expected a condition (a field name, NOT or '('), found keyword LIMIT",
        Some("LIMIT is a reserved word"),
    );
}

#[test]
fn strings() {
    check(
        "WALK 'never closed",
        1,
        6,
        "unterminated string",
        Some("matching '"),
    );
    check(
        "SHOW LAYERS;\n  WALK \"never\n closed",
        2,
        8,
        "unterminated string",
        Some("matching \""),
    );
    check(
        "WALK 'bad \\x escape'",
        1,
        11,
        "unknown escape sequence \\x in a string",
        Some(r#"\" \' \\ \n \t"#),
    );
    check(
        "WALK 'ends in \\",
        1,
        6,
        "unterminated string (it ends in a lone backslash)",
        None,
    );
}

#[test]
fn positions_in_multi_line_scripts() {
    let script = "USE \"m.gguf\";\n-- a comment; WALK 42\n\nSHOW LAYERS;\n   WALK 42;\n";
    check(
        script,
        5,
        9,
        "expected a quoted prompt after WALK, found number 42",
        Some("WALK \""),
    );
    // Columns count characters, not bytes.
    check(
        "WALK \"日本語\";\nSTATS; DESCRIBE \"é\" AT LAYER x",
        2,
        30,
        "expected a layer number after AT LAYER, found identifier x",
        Some("DESCRIBE"),
    );
    check(
        "STATS;\r\nSTATS STATS",
        2,
        7,
        "after STATS, found keyword STATS",
        Some("separate statements"),
    );
    // Tabs are one column.
    check("\tSTATS\t?", 1, 8, "unexpected character '?'", None);
}

#[test]
fn errors_are_reported_in_source_order() {
    // The WALK error comes before the unterminated string, so it is the one reported.
    check(
        "WALK 42; DESCRIBE \"unterminated",
        1,
        6,
        "quoted prompt after WALK",
        Some("WALK \""),
    );
    check("STATS; WALK 'x' @", 1, 17, "unexpected character '@'", None);
    // A malformed token where a specific one is expected reports the token's own problem.
    check(
        "WALK 'x' TOP 3abc",
        1,
        14,
        "malformed number 3abc",
        Some("put a space"),
    );
}

#[test]
fn long_tokens_are_shortened_in_messages() {
    let long = "x".repeat(100);
    let error = parse_error(&format!("WALK {long}"));
    assert!(
        error
            .message
            .ends_with(&format!("found identifier {}…", "x".repeat(31))),
        "{error}"
    );
    let error = parse_error(&format!("{} \"{long}\"", "STATS"));
    assert!(
        error
            .message
            .ends_with(&format!("found string \"{}…\"", "x".repeat(31))),
        "{error}"
    );
}
