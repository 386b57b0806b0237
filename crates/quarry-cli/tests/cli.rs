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

/// `--device gpu` (lavapipe in CI): `run` follows llama.cpp's greedy path as on the CPU, `bench`
/// reports the device, `info --devices` lists adapters, and the vindex commands, which do not
/// run on a GPU, refuse the flag.
#[test]
fn device_gpu_runs_and_says_where() {
    let listed = quarry_json(&["info", "--devices", "--json"]);
    let adapters = listed["adapters"].as_array().unwrap();
    if adapters.is_empty() {
        assert_eq!(
            std::env::var("QUARRY_GPU_TESTS").as_deref(),
            Ok("skip"),
            "no GPU adapter (scripts/install-vulkan installs lavapipe)"
        );
        return;
    }
    let path = model_path(TestModel::SmolLm2);
    let g = &model_goldens(TestModel::SmolLm2)["greedy_fa_on"]["The capital of France is"]
        ["model_default"];
    let expected = ids(&g["greedy_ids"]);
    let out = quarry(&[
        "--device",
        "gpu",
        "run",
        path_str(&path),
        "The capital of France is",
        "--temperature",
        "0",
        "-n",
        "6",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("device: gpu"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gaps = g["step_top1_minus_top2"].as_array().unwrap();
    for (step, (a, b)) in ids(&v["ids"]).iter().zip(&expected).enumerate() {
        if a != b {
            assert!(
                gaps[step].as_f64().unwrap() < 0.5,
                "step {step}: {a} vs {b}"
            );
            break;
        }
    }
    let bench = quarry_json(&[
        "--device",
        "gpu",
        "bench",
        path_str(&path),
        "--pp",
        "8",
        "--tg",
        "2",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(bench["device"].as_str().unwrap().starts_with("gpu"));
    assert!(bench["read_bandwidth_gb_s"].is_null());
    let refused = quarry(&["--device", "gpu", "verify", "x.vindex"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--device gpu applies to"));
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

    // A vindex file that exists but is a directory or a FIFO is reported as what it is, never
    // as missing, and verify does not wait on the FIFO; a deleted file is missing.
    let name = extracted["files"][0]["name"].as_str().unwrap();
    let copy = tmp.path().join("copy.vindex");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(&out).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let target = copy.join(name);
    for (make, problem) in [
        (
            &(|p: &Path| std::fs::create_dir(p).unwrap()) as &dyn Fn(&Path),
            "is a directory, not a regular file",
        ),
        (
            &|p: &Path| mkfifo(p),
            "is a FIFO (named pipe), not a regular file",
        ),
        (&|_: &Path| {}, "is missing"),
    ] {
        let _ = std::fs::remove_file(&target);
        let _ = std::fs::remove_dir(&target);
        make(&target);
        let out = quarry_within(&["verify", path_str(&copy)], 60);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("{name} ")), "{stderr}");
        assert!(stderr.contains(problem), "{problem}: {stderr}");
        if problem != "is missing" {
            assert!(!stderr.contains("is missing"), "{stderr}");
        }
    }
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

/// Runs quarry, killing it after `secs` seconds (a FIFO must not hang it): a test that would
/// hang fails instead.
fn quarry_within(args: &[&str], secs: u64) -> Output {
    quarry_within_input(args, secs, Stdio::null())
}

/// [`quarry_within`] reading `stdin`.
fn quarry_within_input(args: &[&str], secs: u64, stdin: Stdio) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run quarry");
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= secs {
            child.kill().unwrap();
            panic!("quarry {args:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

/// Sizes beyond what the model defines are refused before anything is allocated: contexts
/// and bench sizes past the trained context, windows and counts out of range.
#[test]
fn sizes_beyond_the_model_are_one_line_errors() {
    let model = model_path(TestModel::SmolLm2);
    let m = path_str(&model);
    let text = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(text.path(), "Some text to score. ".repeat(50)).unwrap();
    let t = path_str(text.path());
    for (args, needle) in [
        (
            vec!["run", m, "hi", "--ctx", "99999999"],
            "invalid --ctx 99999999: the model's context is 8192 tokens",
        ),
        (vec!["run", m, "hi", "--ctx", "8193"], "invalid --ctx 8193"),
        (
            vec!["run", m, "hi", "--ctx", "1"],
            "invalid --ctx 1: must be at least 2",
        ),
        (
            vec!["chat", m, "--ctx", "18446744073709551615"],
            "invalid --ctx 18446744073709551615",
        ),
        (
            vec!["bench", m, "--pp", "1000000", "--tg", "0"],
            "invalid --pp 1000000: the model's context is 8192 tokens",
        ),
        (
            vec!["bench", m, "--pp", "0", "--tg", "100000"],
            "invalid --tg 100000: the model's context is 8192 tokens",
        ),
        (vec!["bench", m, "--reps", "0"], "invalid --reps 0"),
        (
            vec!["bench", m, "--reps", "1000001"],
            "invalid --reps 1000001: at most 1000",
        ),
        (
            vec!["perplexity", m, t, "--ctx", "100000"],
            "invalid --ctx 100000",
        ),
        (
            vec!["perplexity", m, t, "--ctx", "3"],
            "invalid --ctx 3: must be at least 4",
        ),
        (
            vec!["perplexity", m, t, "--chunks", "0"],
            "invalid --chunks 0",
        ),
        (
            vec!["extract", m, "-o", "/nonexistent/x.vindex", "--top-k", "0"],
            "invalid --top-k 0",
        ),
        (
            vec![
                "extract",
                m,
                "-o",
                "/nonexistent/x.vindex",
                "--top-k",
                "100000",
            ],
            "invalid --top-k 100000: at most 1000",
        ),
    ] {
        assert_one_line_error(&quarry(&args), needle);
    }
}

/// Reads `model`'s GGUF and writes a copy with `key` set to `value`.
fn copy_with_metadata(model: &Path, out: &Path, key: &str, value: Value) {
    let file = quarry_format::GgufFile::open(model).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in file.metadata() {
        let v = if k == key { value.clone() } else { v.clone() };
        w.add_metadata(k, v).unwrap();
    }
    for info in file.tensors() {
        let view = file.tensor(&info.name).unwrap();
        w.add_tensor(
            info.name.clone(),
            &info.dims,
            info.dtype,
            Cow::Borrowed(view.data),
        )
        .unwrap();
    }
    w.write(out).unwrap();
}

/// A context the model allows but the machine cannot hold is refused with the memory it would
/// take, before the KV cache is allocated (it used to abort in the allocator); the default
/// context of the same model still runs.
#[test]
fn sizes_beyond_the_machine_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge-context.gguf");
    // The largest context a GGUF may declare (2^24), whose KV cache takes 360 GiB for this
    // model: 30 layers × (K and V) × 192 values × 2 bytes per position.
    let context: u64 = 1 << 24;
    copy_with_metadata(
        &model_path(TestModel::SmolLm2),
        &huge,
        "llama.context_length",
        Value::U32(context as u32),
    );
    let m = path_str(&huge);
    let ctx = context.to_string();
    let kv_bytes = 30 * 2 * 192 * 2 * context;
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    if mem_total > kv_bytes {
        eprintln!("skipped: this machine has memory for a {kv_bytes}-byte KV cache");
    } else {
        for args in [
            vec!["run", m, "hi", "--ctx", &ctx],
            vec!["bench", m, "--pp", &ctx, "--tg", "0"],
            vec!["bench", m, "--pp", "0", "--tg", &ctx],
        ] {
            let out = quarry(&args);
            assert_one_line_error(&out, "of memory on this machine");
            assert_one_line_error(&out, "would need");
        }
    }
    let model = model_path(TestModel::SmolLm2);
    let out = quarry(&[
        "bench",
        path_str(&model),
        "--pp",
        "0",
        "--tg",
        "8000",
        "--batch",
        "1,1000000",
    ]);
    assert_one_line_error(&out, "invalid --tg 8000 with --batch 1000000");
    let v = quarry_json(&["run", m, "hi", "-n", "1", "--temperature", "0", "--json"]);
    assert_eq!(v["finish_reason"], "length");
}

/// `--threads` is bounded by the machine (4 per CPU, at most 512), and a thread the operating
/// system refuses to start is an error, not a panic.
#[test]
fn threads_are_bounded_and_spawn_failures_are_errors() {
    let model = model_path(TestModel::SmolLm2);
    let m = path_str(&model);
    let cpus = std::thread::available_parallelism().unwrap().get();
    let max = (4 * cpus).min(512);
    for n in ["5000", "18446744073709551615", &(max + 1).to_string()] {
        let out = quarry(&["run", m, "hi", "-n", "1", "--threads", n]);
        assert_one_line_error(&out, &format!("invalid --threads {n}: at most {max}"));
    }
    // Under a small address-space limit the pool's thread stacks do not fit. Where that
    // window of limits lies depends on the binary and the CPU count, so it is searched for:
    // below some limit the binary cannot start at all (the loader fails); from `started` on
    // it runs and, up to `past_pool`, fails to start a worker, which must be a one-line error
    // (a panic there would count as not starting, and leave no window).
    let run_under = |kib: u64| -> Output {
        let script = format!(
            "ulimit -v {kib}; exec {} run {m} hi -n 1 --threads {max}",
            env!("CARGO_BIN_EXE_quarry")
        );
        Command::new("sh").arg("-c").arg(&script).output().unwrap()
    };
    let runs = |out: &Output| {
        out.status.success() || String::from_utf8_lossy(&out.stderr).starts_with("error: ")
    };
    let pool_error =
        |out: &Output| String::from_utf8_lossy(&out.stderr).contains("starting the thread pool");
    // The smallest limit (to 256 KiB) at which `holds` does, from `low`, where it does not.
    let smallest = |low: u64, holds: &dyn Fn(&Output) -> bool| -> u64 {
        let (mut low, mut high) = (low, low * 2);
        while !holds(&run_under(high)) {
            low = high;
            high *= 2;
            assert!(high < 1 << 26, "no limit up to 64 GiB");
        }
        while high - low > 256 {
            let mid = (low + high) / 2;
            if holds(&run_under(mid)) {
                high = mid;
            } else {
                low = mid;
            }
        }
        high
    };
    let started = smallest(1_000, &runs);
    let past_pool = smallest(started, &|out| runs(out) && !pool_error(out));
    // Near the limit any allocation may fail, also in code the program does not run: the
    // standard library aborts with "memory allocation of N bytes failed", glibc with "Fatal
    // glibc error", and a thread that did start panics inside the standard library when its
    // signal stack cannot be mapped, each racing the main thread's own error. Such a run says
    // nothing about the pool and is left out. Every other run in the window must succeed or
    // end in one `error:` line, and at least one must be the pool's error.
    let outside_the_program = |stderr: &str| {
        stderr.contains("memory allocation of")
            || stderr.contains("Fatal glibc error")
            || stderr.contains("/library/std/src/")
    };
    let mut pool_errors = Vec::new();
    for kib in [started, (started + past_pool) / 2, past_pool] {
        for _ in 0..3 {
            let out = run_under(kib);
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if outside_the_program(&stderr) {
                continue;
            }
            assert!(!stderr.contains("panicked"), "{kib} KiB: {stderr}");
            if !out.status.success() {
                assert_one_line_error(&out, "");
            }
            if pool_error(&out) {
                pool_errors.push(stderr);
            }
        }
    }
    assert!(
        !pool_errors.is_empty(),
        "no run between {started} and {past_pool} KiB failed to start a worker thread"
    );
    for stderr in &pool_errors {
        assert!(
            stderr.contains(&format!("of the {max} asked for")),
            "{stderr}"
        );
    }
}

/// A model path that is not a regular file says what it is: a directory, a FIFO (without
/// waiting for a writer), a symbolic link loop; only a missing file is "no such file".
#[test]
fn model_paths_that_are_not_files_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    mkfifo(&fifo);
    let looped = dir.path().join("loop.gguf");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let missing = dir.path().join("missing.gguf");
    let dangling = dir.path().join("dangling.gguf");
    std::os::unix::fs::symlink(&missing, &dangling).unwrap();
    for (path, needle) in [
        (dir.path(), "is a directory, not a regular file"),
        (fifo.as_path(), "is a FIFO (named pipe), not a regular file"),
        (looped.as_path(), "Too many levels of symbolic links"),
        (missing.as_path(), "no such file"),
        (dangling.as_path(), "no such file"),
    ] {
        for args in [
            vec!["run", path_str(path), "hi"],
            vec!["info", path_str(path)],
        ] {
            let out = quarry_within(&args, 30);
            assert_one_line_error(&out, needle);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(path_str(path)), "{stderr}");
            assert!(!stderr.contains("No such device"), "{stderr}");
            if !needle.contains("no such file") {
                assert!(!stderr.contains("no such file"), "{stderr}");
            }
        }
    }
}

/// The LQL script and the perplexity text are opened as regular files only and read up to a
/// cap; devices, FIFOs and directories are refused at once.
#[test]
fn input_files_are_regular_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("script.lql");
    mkfifo(&fifo);
    let big = dir.path().join("big.lql");
    std::fs::write(&big, "STATS;\n".repeat(700_000)).unwrap();
    let huge_text = dir.path().join("huge.txt");
    std::fs::File::create(&huge_text)
        .unwrap()
        .set_len(257 << 20)
        .unwrap();
    let d = path_str(dir.path());
    for (args, needle) in [
        (vec!["lql", "-f", d], "LQL script"),
        (vec!["lql", "-f", d], "is a directory, not a regular file"),
        (vec!["lql", "-f", path_str(&fifo)], "is a FIFO (named pipe)"),
        (vec!["lql", "-f", "/dev/urandom"], "is a character device"),
        (
            vec!["lql", "-f", path_str(&big)],
            "is larger than 4 MiB, the most an LQL script may be",
        ),
        (
            vec!["lql", "-f", "/nonexistent/x.lql"],
            "/nonexistent/x.lql",
        ),
    ] {
        assert_one_line_error(&quarry_within(&args, 30), needle);
    }
    let model = model_path(TestModel::SmolLm2);
    let m = path_str(&model);
    for (file, needle) in [
        (d, "is a directory, not a regular file"),
        (path_str(&fifo), "is a FIFO (named pipe)"),
        ("/dev/zero", "is a character device"),
        (
            path_str(&huge_text),
            "is larger than 256 MiB, the most a perplexity text may be",
        ),
    ] {
        let out = quarry_within(&["perplexity", m, file], 60);
        assert_one_line_error(&out, needle);
        assert_one_line_error(&out, &format!("perplexity text {file}"));
    }
}

/// `--stop ""` would stop before the first token; it is refused in the server's words.
#[test]
fn empty_stop_string_is_refused() {
    let model = model_path(TestModel::SmolLm2);
    for command in ["run", "chat"] {
        let mut args = vec![command, path_str(&model)];
        if command == "run" {
            args.push("hi");
        }
        args.extend(["--stop", "x", "--stop", ""]);
        let out = quarry(&args);
        assert_one_line_error(&out, "invalid --stop \"\": stop strings must not be empty");
    }
}

/// An error whose causes repeat one another prints each cause once.
#[test]
fn each_cause_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.vindex");
    for args in [
        vec!["lql", "--vindex", path_str(&missing), "STATS"],
        vec!["verify", path_str(&missing)],
        vec!["run", path_str(dir.path()), "hi"],
    ] {
        let out = quarry(&args);
        assert_one_line_error(&out, path_str(dir.path()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Every ": "-separated part of the message appears once.
        let parts: Vec<&str> = stderr.trim().split(": ").collect();
        for part in &parts {
            assert_eq!(
                parts.iter().filter(|p| p == &part).count(),
                1,
                "{part:?} repeated in {stderr}"
            );
        }
    }
}

/// `quarry chat` reads stdin a line at a time up to 1 MiB: a longer line, or a device that
/// never sends a newline, is a one-line error instead of memory growing without end.
#[test]
fn chat_lines_are_capped() {
    let model = model_path(TestModel::SmolLm2);
    let long = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(long.path(), "word ".repeat(300_000) + "\n").unwrap();
    for input in [long.path(), Path::new("/dev/zero")] {
        // Killed (and failed) rather than left to hang should the cap regress.
        let out = quarry_within_input(
            &["chat", path_str(&model), "-n", "1"],
            60,
            Stdio::from(std::fs::File::open(input).unwrap()),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap();
        assert!(
            last.ends_with(
                "error: stdin: a line is longer than 1 MiB, the most one chat turn may be"
            ),
            "{stderr}"
        );
    }
}

/// Every family of `fixtures/families/` generates from the command line, from GGUF and from
/// its Hugging Face directory, and extracts into a vindex that WALK browses; editing a
/// mixture of experts, which edits do not handle, says so in one line.
#[test]
fn every_family_runs_extracts_and_says_what_it_cannot_edit() {
    let fixture = |family: &str| quarry_fixtures::family_dir(family).join("model-f32.gguf");
    for family in quarry_fixtures::FAMILIES {
        let hf = fixture(family).parent().unwrap().to_path_buf();
        for model in [fixture(family), hf] {
            let out = quarry(&["run", path_str(&model), "The model", "-n", "4"]);
            assert!(
                out.status.success(),
                "{family}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("generated"),
                "{family}"
            );
        }
    }
    // A Hugging Face directory runs like its GGUF: the same greedy tokens, also quantized at
    // load; --quantize on a GGUF file, or of a type not offered, is refused.
    let dir = quarry_fixtures::family_dir("qwen2");
    let tokens = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["The model", "-n", "8", "--json"]);
        quarry_json(&all)["ids"].clone()
    };
    let from_gguf = tokens(&[path_str(&fixture("qwen2"))]);
    assert_eq!(tokens(&[path_str(&dir)]), from_gguf);
    assert_eq!(
        tokens(&[path_str(&dir), "--quantize", "q8_0"])
            .as_array()
            .unwrap()
            .len(),
        8
    );
    let out = quarry(&[
        "run",
        path_str(&fixture("qwen2")),
        "x",
        "--quantize",
        "q8_0",
    ]);
    assert_one_line_error(&out, "is a GGUF file, whose types are its own");
    let out = quarry(&["run", path_str(&dir), "x", "--quantize", "q3_k"]);
    assert_one_line_error(&out, "--quantize q3_k: not offered (q8_0 or q4_k)");

    // Every family extracts into a vindex that browses (mixtures of experts per expert,
    // OLMo 2 without a pre-FFN norm).
    let dir = tempfile::tempdir().unwrap();
    for family in quarry_fixtures::FAMILIES {
        let vindex = dir.path().join(format!("{family}.vindex"));
        let out = quarry(&[
            "extract",
            path_str(&fixture(family)),
            "-o",
            path_str(&vindex),
        ]);
        assert!(
            out.status.success(),
            "{family}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = quarry(&[
            "lql",
            "--vindex",
            path_str(&vindex),
            "WALK \"The model\" TOP 2",
        ]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("(4 rows)"),
            "{family}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let moe = fixture("qwen2_moe");
    let statements = [(
        "INSERT INTO EDGES (entity, relation, target) VALUES (\"France\", \"capital\", \"Rome\")",
        "editing a mixture-of-experts model (qwen2moe) is not supported",
    )];
    for (statement, needle) in statements {
        let script = format!("USE \"{}\"; {statement}", path_str(&moe));
        assert_one_line_error(&quarry(&["lql", &script]), needle);
    }
}
