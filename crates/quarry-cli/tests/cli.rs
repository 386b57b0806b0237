//! The `quarry` binary end to end: real-model runs and the one-line errors of bad input.

use std::borrow::Cow;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use quarry_fixtures::{ids, model_goldens, model_path, TestModel};
use quarry_format::{gguf::GgufWriter, GgmlType, Value};

fn quarry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args(args)
        .output()
        .expect("run quarry")
}

/// Runs quarry, requires success, and parses its stdout as JSON.
fn quarry_json(args: &[&str]) -> serde_json::Value {
    let out = quarry(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit code 1 and a single `error:` line on stderr containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{stderr}"
    );
}

#[test]
fn missing_file_is_a_one_line_error() {
    let out = quarry(&["run", "/nonexistent/model.gguf", "hi"]);
    assert_one_line_error(&out, "/nonexistent/model.gguf");
}

#[test]
fn a_file_that_is_not_gguf_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "this is not a model, just some text").unwrap();
    let out = quarry(&["run", path_str(&p), "hi"]);
    assert_one_line_error(&out, "notes.txt");
}

#[test]
fn unknown_architecture_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mamba.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("mamba".into()))
        .unwrap();
    w.add_tensor(
        "token_embd.weight",
        &[4],
        GgmlType::F32,
        Cow::Owned(vec![0u8; 16]),
    )
    .unwrap();
    w.write(&p).unwrap();
    let out = quarry(&["run", path_str(&p), "hi"]);
    assert_one_line_error(&out, "unsupported architecture 'mamba'");
}

#[test]
fn prompt_longer_than_the_context_is_a_one_line_error() {
    let model = model_path(TestModel::SmolLm2);
    let prompt = "word ".repeat(40);
    let out = quarry(&["run", path_str(&model), &prompt, "--ctx", "16", "-n", "4"]);
    assert_one_line_error(&out, "context holds 16");
}

#[test]
fn bad_sampling_parameter_is_a_one_line_error() {
    let model = model_path(TestModel::SmolLm2);
    let out = quarry(&["run", path_str(&model), "hi", "--top-p", "1.5"]);
    assert_one_line_error(&out, "top_p");
}

#[test]
fn zero_threads_is_a_one_line_error() {
    let model = model_path(TestModel::SmolLm2);
    let out = quarry(&["run", path_str(&model), "hi", "--threads", "0"]);
    assert_one_line_error(&out, "--threads 0");
}

#[test]
fn zero_batch_is_a_one_line_error() {
    let model = model_path(TestModel::SmolLm2);
    let out = quarry(&[
        "bench",
        path_str(&model),
        "--pp",
        "0",
        "--tg",
        "2",
        "--batch",
        "1,0",
    ]);
    assert_one_line_error(&out, "--batch [1, 0]");
}

/// `bench --batch 1,3` adds a row of three sequences decoding together, reported as their
/// aggregate rate, without the one-token weight bandwidth.
#[test]
fn bench_batch_adds_an_aggregate_row() {
    let model = model_path(TestModel::SmolLm2);
    let v = quarry_json(&[
        "bench",
        path_str(&model),
        "--pp",
        "0",
        "--tg",
        "4",
        "--reps",
        "1",
        "--batch",
        "1,3",
        "--no-bandwidth",
        "--json",
    ]);
    let tests = v["tests"].as_array().unwrap();
    let names: Vec<&str> = tests.iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(names, ["tg4", "tg4 ×3"]);
    assert!(tests
        .iter()
        .all(|t| t["tok_s_median"].as_f64().unwrap() > 0.0));
    assert!(tests[0]["weights_gb_s"].as_f64().is_some());
    assert!(tests[1].get("weights_gb_s").is_none());
}

/// Greedy `quarry run --json` on llama.cpp's prompts: the first tokens, which llama.cpp chose
/// by a wide margin, must be the same.
#[test]
fn greedy_run_starts_like_llamacpp() {
    for model in TestModel::ALL {
        let path = model_path(model);
        let g = &model_goldens(model)["greedy_fa_on"]["The capital of France is"]["model_default"];
        let expected = ids(&g["greedy_ids"]);
        let v = quarry_json(&[
            "run",
            path_str(&path),
            "The capital of France is",
            "--temperature",
            "0",
            "-n",
            "8",
            "--json",
        ]);
        assert_eq!(
            ids(&v["prompt_ids"]),
            ids(&g["prompt_ids"]),
            "{model:?} prompt tokens"
        );
        let got = ids(&v["ids"]);
        let gaps = g["step_top1_minus_top2"].as_array().unwrap();
        // Free-running greedy may part ways only after a near tie; up to then it must agree.
        for (step, (a, b)) in got.iter().zip(&expected).enumerate() {
            if a != b {
                assert!(
                    gaps[step].as_f64().unwrap() < 0.5,
                    "{model:?} step {step}: {a} vs {b}"
                );
                break;
            }
        }
        assert_eq!(v["finish_reason"], "length");
        assert!(v["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn same_seed_same_text() {
    let model = model_path(TestModel::SmolLm2);
    let run = |seed: &str| {
        let v = quarry_json(&[
            "run",
            path_str(&model),
            "Once upon a time",
            "-n",
            "12",
            "--seed",
            seed,
            "--json",
        ]);
        ids(&v["ids"])
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(
        run("7"),
        run("8"),
        "different seeds should (almost surely) differ in 12 tokens"
    );
}

#[test]
fn chat_answers_each_turn_from_stdin() {
    let model = model_path(TestModel::SmolLm2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_quarry"))
        // A terse system message keeps the answers clear of near ties, where f32 and 8-bit
        // activation paths may legitimately pick different words.
        .args([
            "chat",
            path_str(&model),
            "--system",
            "You are a geography assistant. Answer in one short sentence.",
            "--temperature",
            "0",
            "-n",
            "24",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(b"What is the capital of France?\nAnd of Germany?\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Paris"), "first answer: {stdout}");
    assert!(
        stdout.contains("Berlin"),
        "second answer uses the history: {stdout}"
    );
    assert!(
        !stdout.contains("<|im_end|>"),
        "end-of-turn is not printed: {stdout}"
    );
}

#[test]
fn tokenize_json_matches_llamacpp() {
    let model = model_path(TestModel::Gemma3);
    let v = quarry_json(&[
        "tokenize",
        path_str(&model),
        "The capital of France is",
        "--json",
    ]);
    let golden = &model_goldens(TestModel::Gemma3)["tokenize"]["The capital of France is"];
    assert_eq!(
        ids(&v["ids"]),
        ids(&golden["add_special=true,parse_special=true"])
    );
}

#[test]
fn info_reports_the_architecture() {
    let model = model_path(TestModel::Gemma3);
    let v = quarry_json(&["info", path_str(&model), "--json"]);
    assert_eq!(v["architecture"], "gemma3");
    assert_eq!(v["n_layers"], 18);
    assert_eq!(v["tensor_types"]["Q5_0"]["tensors"], 81);
    assert_eq!(v["global_layers"], serde_json::json!([5, 11, 17]));
}

#[test]
fn extract_verify_and_query_a_vindex() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2.vindex");
    let model = model_path(TestModel::SmolLm2);
    let extracted = quarry_json(&["extract", path_str(&model), "-o", path_str(&out), "--json"]);
    assert_eq!(extracted["level"], "browse");
    assert!(extracted["files"].as_array().unwrap().len() >= 6);
    let verified = quarry_json(&["verify", path_str(&out), "--json"]);
    assert_eq!(verified["ok"], true);

    let run = quarry(&[
        "lql",
        "--vindex",
        path_str(&out),
        "--json",
        "STATS; DESCRIBE \"France\" BRIEF",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["columns"][1]["name"], "token");
    assert_eq!(lines[1]["rows"].as_array().unwrap().len(), 10);

    // A query that needs the model file names the level to extract at.
    let infer = quarry(&["lql", "--vindex", path_str(&out), "INFER \"Hi\""]);
    assert_one_line_error(&infer, "--level inference");
    // Extracting over an existing vindex is refused and leaves it intact.
    let again = quarry(&["extract", path_str(&model), "-o", path_str(&out)]);
    assert_one_line_error(&again, "already exists");
    assert_eq!(
        quarry_json(&["verify", path_str(&out), "--json"])["ok"],
        true
    );
}

#[test]
fn malformed_lql_reports_line_and_column() {
    let out = quarry(&["lql", "STATS;\nWALK 42"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: line 2, column 6: expected a quoted prompt after WALK"),
        "{stderr}"
    );
    let no_vindex = quarry(&["lql", "STATS"]);
    assert_one_line_error(&no_vindex, "USE \"path/to/model.vindex\"");
}
