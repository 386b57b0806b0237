//! Every statement form and clause combination parses to the expected tree, prints canonically,
//! and parses back to the same tree.

use quarry_lql::{
    parse, CmpOp, CompileTarget, DescribeMethod, DescribeScope, Detail, EdgeValue, EditMode, Expr,
    LayerRange, Literal, ModelFormat, Nearest, OrderKey, PatchStatement, Projection, Select,
    ShowTarget, Source, Statement,
};

/// Parses `src` as one statement, checks that it equals `expected` and that its canonical form
/// parses back to it and is a fixed point; returns the canonical form.
fn check(src: &str, expected: &Statement) -> String {
    let parsed = parse(src).unwrap_or_else(|e| panic!("{src:?} does not parse: {e}"));
    assert_eq!(parsed, std::slice::from_ref(expected), "{src:?}");
    let canonical = expected.to_string();
    let reparsed =
        parse(&canonical).unwrap_or_else(|e| panic!("{canonical:?} does not parse: {e}"));
    assert_eq!(reparsed, std::slice::from_ref(expected), "{canonical:?}");
    assert_eq!(reparsed[0].to_string(), canonical);
    canonical
}

/// The ways to write an optional layer range: source suffix and parsed value.
fn layer_options() -> [(&'static str, Option<LayerRange>); 3] {
    [
        ("", None),
        (" LAYERS 3-17", Some(LayerRange { first: 3, last: 17 })),
        (" layers 9", Some(LayerRange { first: 9, last: 9 })),
    ]
}

fn top_options() -> [(&'static str, Option<u32>); 2] {
    [("", None), (" TOP 7", Some(7))]
}

#[test]
fn use_and_stats() {
    let canonical = check(
        r#"use 'models/x.gguf'"#,
        &Statement::Use {
            path: "models/x.gguf".into(),
        },
    );
    assert_eq!(canonical, r#"USE "models/x.gguf""#);
    assert_eq!(check("stats", &Statement::Stats), "STATS");
}

#[test]
fn show_every_target() {
    let cases = [
        ("SHOW LAYERS", ShowTarget::Layers),
        (
            "SHOW FEATURES 12",
            ShowTarget::Features {
                layer: 12,
                filter: None,
                limit: None,
            },
        ),
        (
            r#"SHOW FEATURES 26 WHERE relation = "capital" LIMIT 5"#,
            ShowTarget::Features {
                layer: 26,
                filter: Some(Expr::Compare {
                    field: "relation".into(),
                    op: CmpOp::Eq,
                    value: Literal::Str("capital".into()),
                }),
                limit: Some(5),
            },
        ),
        (
            "SHOW RELATIONS",
            ShowTarget::Relations {
                features: false,
                layer: None,
                examples: false,
            },
        ),
        (
            "SHOW RELATIONS VIA FEATURES AT LAYER 26 WITH EXAMPLES",
            ShowTarget::Relations {
                features: true,
                layer: Some(26),
                examples: true,
            },
        ),
        (
            "SHOW RELATIONS AT LAYER 3",
            ShowTarget::Relations {
                features: false,
                layer: Some(3),
                examples: false,
            },
        ),
        (
            "SHOW ENTITIES",
            ShowTarget::Entities {
                layer: None,
                limit: None,
            },
        ),
        (
            "SHOW ENTITIES AT LAYER 26 LIMIT 20",
            ShowTarget::Entities {
                layer: Some(26),
                limit: Some(20),
            },
        ),
        (
            "SHOW ENTITIES LIMIT 50",
            ShowTarget::Entities {
                layer: None,
                limit: Some(50),
            },
        ),
        ("SHOW MODELS", ShowTarget::Models),
        ("SHOW PATCHES", ShowTarget::Patches),
    ];
    for (src, target) in cases {
        assert_eq!(check(src, &Statement::Show(target)), src);
    }
}

#[test]
fn walk_every_combination() {
    for explain in [false, true] {
        for (top_src, top) in top_options() {
            for (layers_src, layers) in layer_options() {
                let prefix = if explain { "explain " } else { "" };
                let src =
                    format!(r#"{prefix}walk "The capital of France is"{top_src}{layers_src}"#);
                let walk = Statement::Walk {
                    prompt: "The capital of France is".into(),
                    top,
                    layers,
                    explain,
                };
                check(&src, &walk);
            }
        }
    }
    let walk = Statement::Walk {
        prompt: "p".into(),
        top: Some(3),
        layers: Some(LayerRange { first: 5, last: 5 }),
        explain: true,
    };
    assert_eq!(
        check("Explain Walk 'p' Top 3 Layers 5-5", &walk),
        r#"EXPLAIN WALK "p" TOP 3 LAYERS 5"#
    );
}

#[test]
fn describe_every_combination() {
    let scopes = [
        ("", DescribeScope::Default),
        (" AT LAYER 20", DescribeScope::AtLayer(20)),
        (" ALL LAYERS", DescribeScope::AllLayers),
        (" SYNTAX", DescribeScope::Syntax),
        (" KNOWLEDGE", DescribeScope::Knowledge),
        (" OUTPUT", DescribeScope::Output),
    ];
    let details = [
        ("", Detail::Normal),
        (" BRIEF", Detail::Brief),
        (" VERBOSE", Detail::Verbose),
    ];
    for (scope_src, scope) in scopes {
        for (detail_src, detail) in details {
            for (method_src, method) in [
                ("", DescribeMethod::Answers),
                (" VIA FEATURES", DescribeMethod::Features),
                (" RAW", DescribeMethod::Raw),
            ] {
                for (only_src, relations_only) in [("", false), (" RELATIONS ONLY", true)] {
                    let src = format!(
                        r#"DESCRIBE "France"{scope_src}{detail_src}{only_src}{method_src}"#
                    );
                    let describe = Statement::Describe {
                        entity: "France".into(),
                        scope,
                        detail,
                        relations_only,
                        method,
                    };
                    assert_eq!(check(&src, &describe), src);
                }
            }
        }
    }
}

#[test]
fn infer_every_combination() {
    for (top_src, top) in top_options() {
        let infer = Statement::Infer {
            prompt: "Q".into(),
            top,
            explain: false,
            layers: None,
        };
        check(&format!(r#"INFER "Q"{top_src}"#), &infer);
        for (layers_src, layers) in layer_options() {
            let infer = Statement::Infer {
                prompt: "Q".into(),
                top,
                explain: true,
                layers,
            };
            check(
                &format!(r#"EXPLAIN INFER "Q"{top_src}{layers_src}"#),
                &infer,
            );
        }
    }
}

#[test]
fn trace_every_combination() {
    for (target_src, target) in [("", None), (r#" FOR " Paris""#, Some(" Paris"))] {
        for (decompose_src, decompose) in [("", false), (" DECOMPOSE", true)] {
            for (layers_src, layers) in layer_options() {
                let src = format!(r#"TRACE "x"{target_src}{decompose_src}{layers_src}"#);
                let trace = Statement::Trace {
                    prompt: "x".into(),
                    target: target.map(String::from),
                    decompose,
                    layers,
                };
                check(&src, &trace);
            }
        }
    }
}

#[test]
fn select_every_combination() {
    let projections = [
        ("*", Projection::All),
        ("relation", Projection::Fields(vec!["relation".into()])),
        (
            "relation,Score , layer",
            Projection::Fields(vec!["relation".into(), "Score".into(), "layer".into()]),
        ),
    ];
    let sources = [
        ("edges", Source::Edges),
        ("FEATURES", Source::Features),
        ("Entities", Source::Entities),
    ];
    let nearests = [
        ("", None),
        (
            r#" NEAREST TO "France" AT LAYER 20"#,
            Some(Nearest {
                entity: "France".into(),
                layer: 20,
            }),
        ),
    ];
    let filters = [
        ("", None),
        (
            " WHERE score > 0.5",
            Some(Expr::Compare {
                field: "score".into(),
                op: CmpOp::Gt,
                value: Literal::Num(0.5),
            }),
        ),
    ];
    let orders = [
        ("", vec![]),
        (
            " ORDER BY score",
            vec![OrderKey {
                field: "score".into(),
                descending: false,
            }],
        ),
        (
            " ORDER BY score DESC, relation ASC",
            vec![
                OrderKey {
                    field: "score".into(),
                    descending: true,
                },
                OrderKey {
                    field: "relation".into(),
                    descending: false,
                },
            ],
        ),
    ];
    let limits = [("", None), (" LIMIT 25", Some(25))];
    for (fields_src, fields) in &projections {
        for (from_src, from) in &sources {
            for (nearest_src, nearest) in &nearests {
                for (filter_src, filter) in &filters {
                    for (order_src, order_by) in &orders {
                        for (limit_src, limit) in &limits {
                            let src = format!(
                                "SELECT {fields_src} FROM {from_src}{nearest_src}{filter_src}\
                                 {order_src}{limit_src}"
                            );
                            let select = Select {
                                fields: fields.clone(),
                                from: *from,
                                nearest: nearest.clone(),
                                filter: filter.clone(),
                                order_by: order_by.clone(),
                                limit: *limit,
                            };
                            check(&src, &Statement::Select(select));
                        }
                    }
                }
            }
        }
    }
}

/// The ways to write an edit's optional layer clause: source suffix and parsed value.
fn edit_layer_options() -> [(&'static str, Option<LayerRange>); 4] {
    [
        ("", None),
        (" AT LAYER 5", Some(LayerRange { first: 5, last: 5 })),
        (" layers 3-17", Some(LayerRange { first: 3, last: 17 })),
        (" LAYERS 9", Some(LayerRange { first: 9, last: 9 })),
    ]
}

fn template_options() -> [(&'static str, Option<String>); 2] {
    [
        ("", None),
        (
            r#" template 'The capital of {entity} is'"#,
            Some("The capital of {entity} is".into()),
        ),
    ]
}

fn edge(entity: &str, relation: &str, target: &str) -> EdgeValue {
    EdgeValue {
        entity: entity.into(),
        relation: relation.into(),
        target: target.into(),
    }
}

#[test]
fn insert_every_combination() {
    let rows = [
        (
            r#"("France", "capital", "Lyon")"#,
            vec![edge("France", "capital", "Lyon")],
        ),
        (
            r#"('France','capital','Lyon'),("Japan" , "language", 'Korean')"#,
            vec![
                edge("France", "capital", "Lyon"),
                edge("Japan", "language", "Korean"),
            ],
        ),
    ];
    let modes = [
        ("", EditMode::Default),
        (" mode compose", EditMode::Compose),
    ];
    for (rows_src, edges) in &rows {
        for (layers_src, layers) in edit_layer_options() {
            for (template_src, template) in template_options() {
                for (mode_src, mode) in modes {
                    let src = format!(
                        "insert into edges (entity, relation, target) values \
                         {rows_src}{layers_src}{template_src}{mode_src}"
                    );
                    let insert = Statement::Insert {
                        edges: edges.clone(),
                        layers,
                        template: template.clone(),
                        mode,
                    };
                    check(&src, &insert);
                }
            }
        }
    }
    let insert = Statement::Insert {
        edges: vec![edge("France", "capital", "Lyon"), edge("a\"b", "", "\n")],
        layers: Some(LayerRange { first: 4, last: 4 }),
        template: Some("Q: {entity}?".into()),
        mode: EditMode::Compose,
    };
    assert_eq!(
        check(
            r#"INSERT INTO EDGES (entity,relation,target) VALUES ("France","capital","Lyon"),
               ('a"b', '', '\n') AT LAYER 4 TEMPLATE 'Q: {entity}?' MODE COMPOSE"#,
            &insert
        ),
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Lyon"), ("a\"b", "", "\n") LAYERS 4 TEMPLATE "Q: {entity}?" MODE COMPOSE"#
    );
}

#[test]
fn update_every_combination() {
    let keys = [
        r#"entity = "France" and relation = 'capital'"#,
        r#"relation = "capital" AND entity = "France""#,
    ];
    for key in keys {
        for (layers_src, layers) in edit_layer_options() {
            for (template_src, template) in template_options() {
                let src = format!(
                    r#"update edges set target = "Lyon" where {key}{layers_src}{template_src}"#
                );
                let update = Statement::Update {
                    entity: "France".into(),
                    relation: "capital".into(),
                    target: "Lyon".into(),
                    layers,
                    template,
                };
                check(&src, &update);
            }
        }
    }
    let update = Statement::Update {
        entity: "France".into(),
        relation: "capital".into(),
        target: "Lyon".into(),
        layers: Some(LayerRange { first: 2, last: 6 }),
        template: None,
    };
    assert_eq!(
        check(
            "UPDATE EDGES SET target='Lyon' WHERE relation='capital' AND entity='France' \
             LAYERS 2-6",
            &update
        ),
        r#"UPDATE EDGES SET target = "Lyon" WHERE entity = "France" AND relation = "capital" LAYERS 2-6"#
    );
}

#[test]
fn delete_either_condition_order() {
    let delete = Statement::Delete {
        entity: "France".into(),
        relation: "capital".into(),
    };
    let canonical = r#"DELETE FROM EDGES WHERE entity = "France" AND relation = "capital""#;
    assert_eq!(
        check(
            "delete from edges where entity = 'France' and relation = 'capital'",
            &delete
        ),
        canonical
    );
    assert_eq!(
        check(
            "DELETE FROM EDGES WHERE relation = \"capital\" AND entity = \"France\"",
            &delete
        ),
        canonical
    );
}

#[test]
fn patch_statements() {
    let cases = [
        (
            "begin patch 'p.vlp'",
            PatchStatement::Begin {
                path: "p.vlp".into(),
            },
            r#"BEGIN PATCH "p.vlp""#,
        ),
        ("save patch", PatchStatement::Save, "SAVE PATCH"),
        (
            "Apply Patch \"dir/p.vlp\"",
            PatchStatement::Apply {
                path: "dir/p.vlp".into(),
            },
            r#"APPLY PATCH "dir/p.vlp""#,
        ),
        (
            "REMOVE PATCH 'p.vlp'",
            PatchStatement::Remove {
                path: "p.vlp".into(),
            },
            r#"REMOVE PATCH "p.vlp""#,
        ),
        (
            "diff 'a.vlp'",
            PatchStatement::Diff {
                a: "a.vlp".into(),
                b: None,
            },
            r#"DIFF "a.vlp""#,
        ),
        (
            "DIFF 'a.vlp' 'b.vlp'",
            PatchStatement::Diff {
                a: "a.vlp".into(),
                b: Some("b.vlp".into()),
            },
            r#"DIFF "a.vlp" "b.vlp""#,
        ),
    ];
    for (src, patch, canonical) in cases {
        assert_eq!(check(src, &Statement::Patch(patch)), canonical);
    }
}

#[test]
fn compile_every_target() {
    let cases = [
        (
            "compile current into vindex 'out.vindex'",
            CompileTarget::Vindex,
            "out.vindex",
            r#"COMPILE CURRENT INTO VINDEX "out.vindex""#,
        ),
        (
            "COMPILE CURRENT INTO MODEL 'out.gguf'",
            CompileTarget::Model { format: None },
            "out.gguf",
            r#"COMPILE CURRENT INTO MODEL "out.gguf""#,
        ),
        (
            "COMPILE CURRENT INTO MODEL 'out.gguf' format gguf",
            CompileTarget::Model {
                format: Some(ModelFormat::Gguf),
            },
            "out.gguf",
            r#"COMPILE CURRENT INTO MODEL "out.gguf" FORMAT GGUF"#,
        ),
        (
            "Compile Current Into Adapter \"out-lora.gguf\"",
            CompileTarget::Adapter,
            "out-lora.gguf",
            r#"COMPILE CURRENT INTO ADAPTER "out-lora.gguf""#,
        ),
    ];
    for (src, target, path, canonical) in cases {
        let compile = Statement::Compile {
            target,
            path: path.into(),
        };
        assert_eq!(check(src, &compile), canonical);
    }
}

#[test]
fn editing_script() {
    let script = "\
        BEGIN PATCH 'capitals.vlp';\n\
        INSERT INTO EDGES (entity, relation, target) VALUES ('France', 'capital', 'Lyon');\n\
        DELETE FROM EDGES WHERE entity = 'Japan' AND relation = 'capital';\n\
        SAVE PATCH;\n\
        SHOW PATCHES\n";
    let statements = parse(script).unwrap();
    assert_eq!(
        statements,
        [
            Statement::Patch(PatchStatement::Begin {
                path: "capitals.vlp".into()
            }),
            Statement::Insert {
                edges: vec![edge("France", "capital", "Lyon")],
                layers: None,
                template: None,
                mode: EditMode::Default,
            },
            Statement::Delete {
                entity: "Japan".into(),
                relation: "capital".into(),
            },
            Statement::Patch(PatchStatement::Save),
            Statement::Show(ShowTarget::Patches),
        ]
    );
}

#[test]
fn insert_takes_up_to_the_row_limit() {
    let rows = vec![r#"("e", "r", "t")"#; quarry_lql::MAX_INSERT_ROWS].join(", ");
    let src = format!("INSERT INTO EDGES (entity, relation, target) VALUES {rows}");
    let statements = parse(&src).unwrap();
    let [Statement::Insert { edges, .. }] = &statements[..] else {
        panic!("not one INSERT: {statements:?}");
    };
    assert_eq!(edges.len(), quarry_lql::MAX_INSERT_ROWS);
    assert!(edges.iter().all(|e| *e == edge("e", "r", "t")));
    assert_eq!(statements[0].to_string(), src);
}

#[test]
fn canonical_forms() {
    let cases = [
        (
            "select a,b from edges where x <> 1 order by a asc, b desc limit 5",
            "SELECT a, b FROM EDGES WHERE x != 1 ORDER BY a, b DESC LIMIT 5",
        ),
        (
            "SELECT * FROM FEATURES WHERE ((a = 1 AND b = 2)) OR NOT (c <= -3)",
            "SELECT * FROM FEATURES WHERE a = 1 AND b = 2 OR NOT c <= -3",
        ),
        (
            "select * from edges where name not like 'Fran%' and x not between -1.5 and 0002.50",
            r#"SELECT * FROM EDGES WHERE name NOT LIKE "Fran%" AND x NOT BETWEEN -1.5 AND 2.5"#,
        ),
        (
            r#"select * from edges where r in ('a',"b",3) and s not in (1)"#,
            r#"SELECT * FROM EDGES WHERE r IN ("a", "b", 3) AND s NOT IN (1)"#,
        ),
        (
            r#"USE 'it\'s "q" \\ \n	\t'"#,
            r#"USE "it's \"q\" \\ \n\t\t""#,
        ),
        (
            "select * from edges where a >= 1000000000000000000000 and b < 0.000001",
            "SELECT * FROM EDGES WHERE a >= 1000000000000000000000 AND b < 0.000001",
        ),
        ("trace 't' decompose", r#"TRACE "t" DECOMPOSE"#),
    ];
    for (src, canonical) in cases {
        let statements = parse(src).unwrap_or_else(|e| panic!("{src:?}: {e}"));
        assert_eq!(statements.len(), 1);
        assert_eq!(statements[0].to_string(), canonical);
        assert_eq!(parse(canonical), Ok(statements));
    }
}

#[test]
fn keywords_are_case_insensitive_but_fields_keep_their_case() {
    let statements = parse("sElEcT Layer FrOm EdGeS oRdEr By TOP dEsC").unwrap();
    let select = Statement::Select(Select {
        fields: Projection::Fields(vec!["Layer".into()]),
        from: Source::Edges,
        nearest: None,
        filter: None,
        order_by: vec![OrderKey {
            field: "TOP".into(),
            descending: true,
        }],
        limit: None,
    });
    assert_eq!(statements, [select]);
}

#[test]
fn scripts_separate_statements_with_semicolons() {
    assert_eq!(parse(""), Ok(vec![]));
    assert_eq!(parse("  -- only a comment\n;;  ; "), Ok(vec![]));
    let script = "\
        USE \"m.gguf\"; -- pick the model\n\
        STATS;\n\
        ;\n\
        SHOW MODELS -- no semicolon before the end\n";
    assert_eq!(
        parse(script),
        Ok(vec![
            Statement::Use {
                path: "m.gguf".into()
            },
            Statement::Stats,
            Statement::Show(ShowTarget::Models),
        ])
    );
    assert_eq!(
        parse("STATS;STATS;"),
        Ok(vec![Statement::Stats, Statement::Stats])
    );
}

#[test]
fn strings_keep_comment_markers_and_newlines() {
    let statements = parse("WALK \"a -- b\nc\" -- trailing\n").unwrap();
    let walk = Statement::Walk {
        prompt: "a -- b\nc".into(),
        top: None,
        layers: None,
        explain: false,
    };
    assert_eq!(statements, std::slice::from_ref(&walk));
    assert_eq!(walk.to_string(), r#"WALK "a -- b\nc""#);
}

#[test]
fn numbers_print_back_exactly() {
    for value in [
        0.1,
        -0.0,
        1e-7,
        123_456_789.125,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        -2.5e300,
    ] {
        let select = Statement::Select(Select {
            fields: Projection::All,
            from: Source::Edges,
            nearest: None,
            filter: Some(Expr::Compare {
                field: "x".into(),
                op: CmpOp::Eq,
                value: Literal::Num(value),
            }),
            order_by: vec![],
            limit: None,
        });
        let printed = select.to_string();
        let [Statement::Select(Select {
            filter:
                Some(Expr::Compare {
                    value: Literal::Num(back),
                    ..
                }),
            ..
        })] = parse(&printed).unwrap()[..]
        else {
            panic!("{printed} did not parse back to a comparison");
        };
        assert_eq!(back.to_bits(), value.to_bits(), "{printed}");
    }
}

#[test]
fn extreme_counts_fit() {
    let statements = parse(&format!(
        "SHOW FEATURES {}; SELECT * FROM EDGES LIMIT {}",
        u32::MAX,
        u64::MAX
    ))
    .unwrap();
    assert_eq!(
        statements[0],
        Statement::Show(ShowTarget::Features {
            layer: u32::MAX,
            filter: None,
            limit: None
        })
    );
    assert!(matches!(
        &statements[1],
        Statement::Select(Select {
            limit: Some(u64::MAX),
            ..
        })
    ));
}
