//! Statements that parse but that the engine cannot run yet fail with
//! [`QueryError::Unsupported`], naming the statement, whether or not a vindex is open.

use quarry_query::{Executor, QueryError};

#[test]
fn editing_statements_are_not_available_yet() {
    let scripts = [
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Lyon")"#,
        r#"UPDATE EDGES SET target = "Lyon" WHERE entity = "France" AND relation = "capital""#,
        r#"DELETE FROM EDGES WHERE entity = "France" AND relation = "capital""#,
        r#"BEGIN PATCH "p.vlp""#,
        "SAVE PATCH",
        r#"APPLY PATCH "p.vlp""#,
        r#"REMOVE PATCH "p.vlp""#,
        r#"DIFF "a.vlp" "b.vlp""#,
        "SHOW PATCHES",
        r#"COMPILE CURRENT INTO ADAPTER "out-lora.gguf""#,
    ];
    for script in scripts {
        // No vindex is open, so anything else would fail with NoVindex instead.
        let error = Executor::new().run_script(script).unwrap_err();
        match &error {
            QueryError::Unsupported { statement } => assert_eq!(statement, script),
            other => panic!("{script}: {other:?}"),
        }
        assert!(
            error.to_string().starts_with(&format!("{script}: ")),
            "{error}"
        );
        assert!(error.to_string().contains("not available yet"), "{error}");
    }
}
