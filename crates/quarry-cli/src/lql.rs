//! `quarry lql` and `quarry repl`: LQL from the command line and interactively.

use std::time::Instant;

use anyhow::Result;
use quarry_query::{Executor, ResultSet};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;

use crate::commands::init_threads;
use crate::{LqlArgs, ReplArgs};

fn executor(vindex: Option<&std::path::Path>) -> Result<Executor> {
    Ok(match vindex {
        Some(dir) => Executor::with_vindex(dir)?,
        None => Executor::new(),
    })
}

fn print(result: &ResultSet, json: bool) {
    if json {
        println!("{}", result.to_json());
    } else {
        print!("{}", result.render_table());
    }
}

pub fn run(a: LqlArgs) -> Result<()> {
    init_threads(a.threads)?;
    let script = match (&a.statements, &a.file) {
        (_, Some(path)) => crate::limits::read_text(
            path,
            crate::limits::LQL_SCRIPT_MAX,
            "LQL script",
            "an LQL script",
        )?,
        (Some(s), None) => s.clone(),
        (None, None) => unreachable!("clap requires statements or --file"),
    };
    let mut exec = executor(a.vindex.as_deref())?;
    let statements = quarry_lql::parse(&script)?;
    for (i, statement) in statements.iter().enumerate() {
        let result = exec.execute(statement)?;
        if i > 0 && !a.json {
            println!();
        }
        print(&result, a.json);
    }
    Ok(())
}

const HELP: &str = "\
Statements end with ';' and may span lines. Examples:
  USE \"gemma3.vindex\";
  STATS;  SHOW LAYERS;  SHOW FEATURES 12;
  DESCRIBE \"France\";  DESCRIBE \"France\" ALL LAYERS VERBOSE RAW;
  WALK \"The capital of France is\" TOP 5 LAYERS 6-14;
  SELECT layer, feature, top_token FROM FEATURES WHERE top_token LIKE 'Par%' LIMIT 10;
  INFER \"The capital of France is\" TOP 5;  TRACE \"The capital of France is\" FOR \" Paris\";
Commands: \\help  \\timing (toggle timings)  \\json (toggle JSON output)  \\quit
Full reference: docs/lql.md";

pub fn repl(a: ReplArgs) -> Result<()> {
    init_threads(a.threads)?;
    let mut exec = executor(a.vindex.as_deref())?;
    let mut editor = DefaultEditor::new()?;
    let history =
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".quarry_lql_history"));
    // The history is loaded only from a regular file of reasonable size: a FIFO there would
    // block the REPL before its prompt, a device or a huge file would be read without end.
    if let Some(h) = history.as_ref().filter(|h| {
        std::fs::metadata(h).is_ok_and(|m| m.is_file() && m.len() <= crate::limits::HISTORY_MAX)
    }) {
        let _ = editor.load_history(h);
    }
    let (mut timing, mut json) = (false, false);
    let mut buffer = String::new();
    println!("Quarry LQL. \\help for help, \\quit to leave.");
    loop {
        let prompt = if buffer.is_empty() { "lql> " } else { "...> " };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                buffer.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let trimmed = line.trim();
        if buffer.is_empty() && trimmed.starts_with('\\') {
            let _ = editor.add_history_entry(trimmed);
            match trimmed {
                "\\help" | "\\h" | "\\?" => println!("{HELP}"),
                "\\timing" => {
                    timing = !timing;
                    println!("timing {}", if timing { "on" } else { "off" });
                }
                "\\json" => {
                    json = !json;
                    println!("JSON output {}", if json { "on" } else { "off" });
                }
                "\\quit" | "\\q" => break,
                other => println!("unknown command {other}; \\help lists them"),
            }
            continue;
        }
        buffer.push_str(&line);
        buffer.push('\n');
        if !trimmed.ends_with(';') {
            continue;
        }
        let script = std::mem::take(&mut buffer);
        let _ = editor.add_history_entry(script.trim());
        let t0 = Instant::now();
        match quarry_lql::parse(&script) {
            Err(e) => eprintln!("error: {e}"),
            Ok(statements) => {
                for statement in &statements {
                    match exec.execute(statement) {
                        Ok(result) => print(&result, json),
                        Err(e) => {
                            eprintln!("error: {e}");
                            break;
                        }
                    }
                }
            }
        }
        if timing {
            println!("time: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}
