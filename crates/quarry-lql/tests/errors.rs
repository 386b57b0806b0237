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
        "expected USE, STATS, SHOW, WALK, EXPLAIN, DESCRIBE, SELECT, INFER, TRACE, INSERT, \
         UPDATE, DELETE, BEGIN, SAVE, APPLY, REMOVE, DIFF or COMPILE to start a statement, found \
         identifier DESCRIBEE",
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
        "expected LAYERS, FEATURES, RELATIONS, ENTITIES, MODELS or PATCHES after SHOW, found end \
         of input",
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
        "DESCRIBE 'x' VIA RAW",
        1,
        18,
        "expected FEATURES after VIA",
        Some("DESCRIBE \"France\" VIA FEATURES"),
    );
    check(
        "DESCRIBE 'x' BRIEF VERBOSE",
        1,
        20,
        "VERBOSE cannot come here",
        Some("then VIA FEATURES or RAW"),
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
fn insert_structure() {
    check(
        "INSERT EDGES (entity, relation, target) VALUES ('a', 'b', 'c')",
        1,
        8,
        "expected INTO after INSERT, found keyword EDGES",
        Some("INSERT INTO EDGES (entity, relation, target) VALUES"),
    );
    check(
        "INSERT INTO EDGE (entity, relation, target) VALUES ('a', 'b', 'c')",
        1,
        13,
        "expected EDGES after INSERT INTO, found identifier EDGE",
        Some("did you mean EDGES?"),
    );
    check(
        "INSERT INTO EDGES VALUES ('a', 'b', 'c')",
        1,
        19,
        "expected '(' and the column list after INSERT INTO EDGES, found keyword VALUES",
        Some("(entity, relation, target) VALUES"),
    );
    check(
        "INSERT INTO EDGES (entity, relation, target) ('a', 'b', 'c')",
        1,
        46,
        "expected VALUES after the column list, found '('",
        Some("VALUES (\"France\", \"capital\", \"Lyon\")"),
    );
    check(
        "INSERT INTO EDGES (entity, relation, target) VALUES",
        1,
        52,
        "expected '(' to start row 1 of VALUES, found end of input",
        Some("INSERT INTO EDGES"),
    );
    check(
        "INSERT INTO EDGES (entity, relation, target) VALUES ('a', 'b', 'c'),",
        1,
        69,
        "expected '(' to start row 2 of VALUES, found end of input",
        Some("INSERT INTO EDGES"),
    );
}

#[test]
fn insert_columns_are_exactly_entity_relation_target() {
    check(
        "INSERT INTO EDGES (entity, target, relation) VALUES ('a', 'b', 'c')",
        1,
        28,
        "expected column relation in the column list, found identifier target",
        Some("the column list is exactly (entity, relation, target)"),
    );
    // Column names are identifiers, so they are case-sensitive.
    check(
        "INSERT INTO EDGES (Entity, relation, target) VALUES ('a', 'b', 'c')",
        1,
        20,
        "expected column entity in the column list, found identifier Entity",
        Some("exactly (entity, relation, target)"),
    );
    check(
        "INSERT INTO EDGES (entity, relation) VALUES ('a', 'b')",
        1,
        36,
        "expected ',' and column target in the column list, found ')'",
        Some("exactly (entity, relation, target)"),
    );
    check(
        "INSERT INTO EDGES (entity, relation, target, score) VALUES ('a', 'b', 'c', 1)",
        1,
        44,
        "expected ')' after column target, found ','",
        Some("exactly (entity, relation, target)"),
    );
}

#[test]
fn insert_rows() {
    check(
        "INSERT INTO EDGES (entity, relation, target) VALUES ('a', 'b', 'c'), ('d', 'e')",
        1,
        79,
        "expected ',' after the relation in row 2, found ')'",
        Some("a row holds three quoted strings: entity, relation, target"),
    );
    check(
        "INSERT INTO EDGES (entity, relation, target) VALUES ('a', 'b', c)",
        1,
        64,
        "expected a quoted target in row 1 of VALUES, found identifier c",
        Some("INSERT INTO EDGES"),
    );
    check(
        "INSERT INTO EDGES (entity, relation, target) VALUES ('a' 'b', 'c')",
        1,
        58,
        "expected ',' after the entity in row 1, found string \"b\"",
        Some("three quoted strings"),
    );
    check(
        "INSERT INTO EDGES (entity, relation, target) VALUES ('a', 'b', 'c', 'd')",
        1,
        67,
        "expected ')' after the target in row 1, found ','",
        Some("three quoted strings"),
    );
}

#[test]
fn insert_row_limit() {
    let max = quarry_lql::MAX_INSERT_ROWS;
    let rows = vec!["('e', 'r', 't')"; max + 1].join(",\n");
    let error = parse_error(&format!(
        "INSERT INTO EDGES (entity, relation, target) VALUES\n{rows}"
    ));
    // The first row past the limit is reported, on its own line.
    assert_eq!((error.line, error.column), (max + 2, 1), "{error}");
    assert_eq!(error.message, format!("INSERT takes at most {max} rows"));
    assert_eq!(
        error.hint.as_deref(),
        Some("split the edges over several INSERT statements")
    );
}

#[test]
fn edit_clauses() {
    let insert = "INSERT INTO EDGES (entity, relation, target) VALUES ('a', 'b', 'c')";
    let after_insert = |clauses: &str, column: usize, message: &str, hint: Option<&str>| {
        check(
            &format!("{insert} {clauses}"),
            1,
            insert.len() + 1 + column,
            message,
            hint,
        );
    };
    after_insert(
        "MODE FAST",
        6,
        "expected COMPOSE after MODE, found identifier FAST",
        Some("no MODE clause for the default algorithm"),
    );
    after_insert(
        "MODE COMPOSE LAYERS 3",
        14,
        "LAYERS cannot come here: the optional clauses of INSERT go in a fixed order",
        Some(r#"the order is: AT LAYER n or LAYERS a-b, TEMPLATE "…{entity}…", MODE COMPOSE"#),
    );
    after_insert(
        "AT LAYER 3 LAYERS 4",
        12,
        "LAYERS cannot come here",
        Some("AT LAYER n or LAYERS a-b"),
    );
    after_insert(
        "AT 3",
        4,
        "expected LAYER after AT, found number 3",
        Some("INSERT INTO EDGES"),
    );
    after_insert(
        "LAYERS 5-2",
        8,
        "layer range 5-2 is reversed",
        Some("write LAYERS 2-5"),
    );
    after_insert("TEMPLATE {entity}", 10, "unexpected character '{'", None);
    after_insert(
        "TEMPLATE",
        9,
        "expected a quoted prompt template after TEMPLATE, found end of input",
        Some(r#"TEMPLATE "The capital of {entity} is""#),
    );
    let update = "UPDATE EDGES SET target = 'x' WHERE entity = 'a' AND relation = 'b'";
    check(
        &format!("{update} MODE COMPOSE"),
        1,
        69,
        "expected ';' or end of input after UPDATE, found keyword MODE",
        Some(r#"UPDATE may end with: AT LAYER n or LAYERS a-b, TEMPLATE "…{entity}…""#),
    );
    check(
        &format!("{update} TEMPLATE '{{entity}}' AT LAYER 2"),
        1,
        89,
        "AT cannot come here: the optional clauses of UPDATE go in a fixed order",
        Some("the order is: AT LAYER n or LAYERS a-b, TEMPLATE"),
    );
}

#[test]
fn templates_need_the_entity_placeholder_once() {
    let insert = "INSERT INTO EDGES (entity, relation, target) VALUES ('a', 'b', 'c') TEMPLATE";
    check(
        &format!("{insert} 'The capital is'"),
        1,
        78,
        r#"TEMPLATE "The capital is" must contain {entity} exactly once (it has none)"#,
        Some(
            r#"{entity} marks where each row's entity goes, e.g. TEMPLATE "The capital of {entity} is""#,
        ),
    );
    check(
        &format!("{insert} '{{entity}} and {{entity}}'"),
        1,
        78,
        r#"TEMPLATE "{entity} and {entity}" must contain {entity} exactly once (it has 2)"#,
        Some("{entity} marks where"),
    );
    // The placeholder is exact: no other spelling counts.
    check(
        &format!("{insert} 'The capital of {{Entity}} is'"),
        1,
        78,
        "(it has none)",
        Some("{entity} marks where"),
    );
    check(
        "UPDATE EDGES SET target = 'x' WHERE entity = 'a' AND relation = 'b' TEMPLATE 'no entity'",
        1,
        78,
        r#"TEMPLATE "no entity" must contain {entity} exactly once (it has none)"#,
        Some("{entity} marks where"),
    );
}

#[test]
fn update_and_delete_structure() {
    check(
        "UPDATE SET target = 'x' WHERE entity = 'a' AND relation = 'b'",
        1,
        8,
        "expected EDGES after UPDATE, found keyword SET",
        Some("UPDATE EDGES SET target = \"Lyon\""),
    );
    check(
        "UPDATE EDGES target = 'x' WHERE entity = 'a' AND relation = 'b'",
        1,
        14,
        "expected SET after UPDATE EDGES, found identifier target",
        Some("UPDATE EDGES SET"),
    );
    check(
        "UPDATE EDGES SET relation = 'x' WHERE entity = 'a' AND relation = 'b'",
        1,
        18,
        "expected target after SET, found identifier relation",
        Some("only the target of an edge can be set"),
    );
    check(
        "UPDATE EDGES SET target 'x' WHERE entity = 'a' AND relation = 'b'",
        1,
        25,
        "expected '=' after SET target, found string \"x\"",
        Some("UPDATE EDGES SET"),
    );
    check(
        "UPDATE EDGES SET target = 'x' entity = 'a' AND relation = 'b'",
        1,
        31,
        "expected WHERE after the new target, found identifier entity",
        Some("UPDATE EDGES SET"),
    );
    check(
        "DELETE EDGES WHERE entity = 'a' AND relation = 'b'",
        1,
        8,
        "expected FROM after DELETE, found keyword EDGES",
        Some("DELETE FROM EDGES WHERE"),
    );
    check(
        "DELETE FROM EDGES",
        1,
        18,
        "expected WHERE after DELETE FROM EDGES, found end of input",
        Some("DELETE FROM EDGES WHERE entity = \"France\" AND relation = \"capital\""),
    );
    check(
        "DELETE FROM EDGES WHERE entity = 'a' AND relation = 'b' LAYERS 3",
        1,
        57,
        "expected ';' or end of input after DELETE, found keyword LAYERS",
        None,
    );
}

#[test]
fn edit_conditions_name_one_edge() {
    check(
        "UPDATE EDGES SET target = 'x' WHERE entity = 'a'",
        1,
        49,
        "expected AND and a condition on relation after the condition on entity, found end of \
         input",
        Some("UPDATE needs both the entity and the relation: UPDATE EDGES"),
    );
    check(
        "DELETE FROM EDGES WHERE relation = 'b'",
        1,
        39,
        "expected AND and a condition on entity after the condition on relation",
        Some("DELETE needs both the entity and the relation: DELETE FROM EDGES"),
    );
    check(
        "UPDATE EDGES SET target = 'x' WHERE relation = 'b' OR entity = 'a'",
        1,
        52,
        "expected AND and a condition on entity after the condition on relation, found keyword \
         OR",
        Some("needs both the entity and the relation"),
    );
    check(
        "UPDATE EDGES SET target = 'x' WHERE entity = 'a' AND entity = 'b'",
        1,
        54,
        "the condition on entity is given twice; relation is missing",
        Some("UPDATE EDGES SET"),
    );
    check(
        "DELETE FROM EDGES WHERE relation = 'b' AND relation = 'c'",
        1,
        44,
        "the condition on relation is given twice; entity is missing",
        Some("DELETE FROM EDGES"),
    );
    check(
        "DELETE FROM EDGES WHERE target = 'a'",
        1,
        25,
        "expected entity or relation in the WHERE of DELETE, found identifier target",
        Some("DELETE picks one edge by its entity and relation"),
    );
    check(
        "DELETE FROM EDGES WHERE entity > 'a' AND relation = 'b'",
        1,
        32,
        "expected '=' after entity, found '>'",
        Some("DELETE FROM EDGES"),
    );
    check(
        "DELETE FROM EDGES WHERE entity = 1 AND relation = 'b'",
        1,
        34,
        "expected a quoted entity after entity =, found number 1",
        Some("DELETE FROM EDGES"),
    );
    check(
        "DELETE FROM EDGES WHERE entity = 'a' AND relation = 'b' AND target = 'c'",
        1,
        57,
        "expected ';' or end of input after DELETE, found keyword AND",
        None,
    );
}

#[test]
fn patch_statements() {
    check(
        "BEGIN 'p.vlp'",
        1,
        7,
        "expected PATCH after BEGIN, found string \"p.vlp\"",
        Some("BEGIN PATCH \"capitals.vlp\""),
    );
    check(
        "BEGIN PATCH",
        1,
        12,
        "expected a quoted patch path after BEGIN PATCH, found end of input",
        Some("BEGIN PATCH \""),
    );
    check(
        "SAVE",
        1,
        5,
        "expected PATCH after SAVE, found end of input",
        Some("it writes to the path given at BEGIN PATCH"),
    );
    check(
        "SAVE PATCH 'p.vlp'",
        1,
        12,
        "expected ';' or end of input after SAVE PATCH, found string \"p.vlp\"",
        None,
    );
    check(
        "APPLY PATCH p",
        1,
        13,
        "expected a quoted patch path after APPLY PATCH, found identifier p",
        Some("APPLY PATCH \"capitals.vlp\""),
    );
    check(
        "REMOVE PATCHES 'p.vlp'",
        1,
        8,
        "expected PATCH after REMOVE, found keyword PATCHES",
        Some("did you mean PATCH?"),
    );
    check(
        "DIFF",
        1,
        5,
        "expected a quoted patch path after DIFF, found end of input",
        Some("or DIFF \"a.vlp\" against the base"),
    );
    check(
        "DIFF 'a' 'b' 'c'",
        1,
        14,
        "expected ';' or end of input after DIFF, found string \"c\"",
        None,
    );
    check(
        "DIFF 'a' TO 'b'",
        1,
        10,
        "expected ';' or end of input after DIFF, found keyword TO",
        None,
    );
    check(
        "SHOW PATCH",
        1,
        6,
        "found keyword PATCH",
        Some("did you mean PATCHES?"),
    );
}

#[test]
fn compile_targets_and_formats() {
    check(
        "COMPILE INTO MODEL 'x.gguf'",
        1,
        9,
        "expected CURRENT after COMPILE, found keyword INTO",
        Some("COMPILE CURRENT INTO MODEL \"edited.gguf\" FORMAT GGUF"),
    );
    check(
        "COMPILE CURRENT MODEL 'x.gguf'",
        1,
        17,
        "expected INTO after COMPILE CURRENT, found keyword MODEL",
        Some("COMPILE CURRENT INTO"),
    );
    check(
        "COMPILE CURRENT INTO MODELS 'x.gguf'",
        1,
        22,
        "expected VINDEX, MODEL or ADAPTER after COMPILE CURRENT INTO, found keyword MODELS",
        Some("did you mean MODEL?"),
    );
    check(
        "COMPILE CURRENT INTO MODEL x",
        1,
        28,
        "expected a quoted output path after INTO MODEL, found identifier x",
        Some("COMPILE CURRENT INTO"),
    );
    for spelling in ["SAFETENSORS", "safetensors"] {
        check(
            &format!("COMPILE CURRENT INTO MODEL 'x' FORMAT {spelling}"),
            1,
            39,
            "safetensors export is not supported yet",
            Some("write FORMAT GGUF, or leave FORMAT out"),
        );
    }
    check(
        "COMPILE CURRENT INTO MODEL 'x' FORMAT GGFU",
        1,
        39,
        "expected GGUF or SAFETENSORS after FORMAT, found identifier GGFU",
        Some("did you mean GGUF?"),
    );
    check(
        "COMPILE CURRENT INTO MODEL 'x' FORMAT",
        1,
        38,
        "expected GGUF or SAFETENSORS after FORMAT, found end of input",
        Some("FORMAT GGUF"),
    );
    check(
        "COMPILE CURRENT INTO MODEL 'x' FORMAT GGUF FORMAT GGUF",
        1,
        44,
        "FORMAT cannot come here: the optional clauses of COMPILE go in a fixed order",
        Some("the order is: FORMAT GGUF"),
    );
    check(
        "COMPILE CURRENT INTO ADAPTER 'x' FORMAT GGUF",
        1,
        34,
        "FORMAT only applies to COMPILE CURRENT INTO MODEL",
        Some("COMPILE CURRENT INTO MODEL"),
    );
    check(
        "COMPILE CURRENT INTO VINDEX 'x' LAYERS 3",
        1,
        33,
        "expected ';' or end of input after COMPILE, found keyword LAYERS",
        None,
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

/// The clauses LARQL's SHOW and DESCRIBE forms add: each in its place, each keyword pair
/// complete.
#[test]
fn show_and_describe_clauses_in_their_order() {
    check(
        "SHOW ENTITIES LIMIT 3 AT LAYER 2",
        1,
        23,
        "AT cannot come here",
        Some("AT LAYER n, LIMIT n"),
    );
    check(
        "SHOW RELATIONS WITH EXAMPLES VIA FEATURES",
        1,
        30,
        "VIA cannot come here",
        Some("VIA FEATURES, AT LAYER n, WITH EXAMPLES"),
    );
    check(
        "SHOW RELATIONS WITH",
        1,
        20,
        "expected EXAMPLES after WITH, found end of input",
        Some("SHOW RELATIONS VIA FEATURES AT LAYER 12 WITH EXAMPLES"),
    );
    check(
        "SHOW FEATURES 3 LIMIT 2 WHERE a = 1",
        1,
        25,
        "WHERE cannot come here",
        Some("WHERE condition, LIMIT n"),
    );
    check(
        "SHOW LAYERS LIMIT 2",
        1,
        13,
        "expected ';' or end of input after SHOW, found keyword LIMIT",
        None,
    );
    check(
        "DESCRIBE 'France' RELATIONS",
        1,
        28,
        "expected ONLY after RELATIONS",
        Some("RELATIONS ONLY"),
    );
    check(
        "DESCRIBE 'France' RAW RELATIONS ONLY",
        1,
        23,
        "RELATIONS cannot come here",
        Some("then RELATIONS ONLY; then VIA FEATURES or RAW"),
    );
}
