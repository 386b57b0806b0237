//! Every example in `docs/lql.md` parses, so the document cannot drift from the parser.

/// The statements of the ```sql blocks: a line that does not start with white space begins a
/// statement, and indented lines continue it.
fn examples(markdown: &str) -> Vec<String> {
    let mut examples: Vec<String> = Vec::new();
    let mut in_sql = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_sql = line == "```sql";
        } else if in_sql {
            match examples.last_mut() {
                Some(example) if line.starts_with(char::is_whitespace) => {
                    example.push('\n');
                    example.push_str(line);
                }
                _ => examples.push(line.to_owned()),
            }
        }
    }
    examples
}

#[test]
fn every_documented_example_parses() {
    let examples = examples(include_str!("../../../docs/lql.md"));
    assert!(
        examples.len() > 50,
        "found only {} examples",
        examples.len()
    );
    for example in examples {
        match quarry_lql::parse(&example) {
            Ok(statements) => assert_eq!(statements.len(), 1, "{example}"),
            Err(error) => panic!("{example}\n{error}"),
        }
    }
}
