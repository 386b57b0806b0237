//! `quarry serve` refuses degenerate flags at start with one line naming the flag, before it
//! listens: an empty API key, zero or absurd timeouts, limits of zero, a context beyond the
//! model's, KV memory (asked for, or implied by --parallel × --ctx) beyond the machine's, an
//! adapter with edits, and an edits directory that is not one.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quarry_fixtures::{model_path, TestModel};

const QUARRY: &str = env!("CARGO_BIN_EXE_quarry");

/// Runs `quarry serve SMOLLM2 --port 0 ARGS`, which must fail within 60 s; its stderr.
fn refused(args: &[&str]) -> String {
    let mut child = Command::new(QUARRY)
        .arg("serve")
        .arg(model_path(TestModel::SmolLm2))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            panic!("quarry serve {args:?} was not refused: it is still running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!status.success(), "{args:?}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("listening"),
        "{args:?}: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr}");
    lines[0].to_string()
}

#[test]
fn degenerate_serve_flags_are_refused_in_one_line() {
    for (args, flag) in [
        (&["--api-key", ""][..], "--api-key"),
        (&["--api-key", "   "], "--api-key"),
        (&["--api-key", "two words"], "--api-key"),
        (&["--timeout", "0"], "--timeout"),
        (&["--timeout", "18446744073709551615"], "--timeout"),
        (&["--queue-timeout", "0"], "--queue-timeout"),
        (&["--header-timeout", "0"], "--header-timeout"),
        (&["--parallel", "0"], "--parallel"),
        (&["--parallel", "100000"], "--parallel"),
        (&["--knowledge-parallel", "0"], "--knowledge-parallel"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--max-connections", "100000000"], "--max-connections"),
        (&["--kv-mem", "0"], "--kv-mem"),
        (&["--ctx", "99999999"], "--ctx"),
        (&["--ctx", "1"], "--ctx"),
        (&["--allow-edits", "--lora", "edit-lora.gguf"], "--lora"),
        (
            &["--allow-edits", "--edits-dir", "/nonexistent/edits"],
            "--edits-dir",
        ),
        (
            &["--allow-edits", "--edits-dir", "/etc/hostname"],
            "--edits-dir",
        ),
    ] {
        let line = refused(args);
        assert!(line.contains(flag), "{args:?}: {line}");
    }
}

/// `MemAvailable` of this machine in bytes (what `quarry serve` checks its KV cache against,
/// or less under a cgroup limit).
fn available_memory() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("MemAvailable in /proc/meminfo");
    kib * 1024
}

#[test]
fn kv_memory_beyond_the_machine_is_refused() {
    // SmolLM2 keeps 23 040 bytes of KV per position, ~180 MiB per sequence of 8192: a quarter
    // more sequences than this machine's available memory holds (within --parallel's bound of
    // 1024, so that the memory check refuses it, not the bound).
    let per_sequence = 8192 * 23_040;
    let parallel = available_memory() / per_sequence * 5 / 4 + 2;
    if parallel <= 1024 {
        let parallel = parallel.to_string();
        let line = refused(&["--parallel", &parallel, "--ctx", "8192"]);
        assert!(
            line.contains(&format!("--parallel {parallel} × --ctx 8192"))
                && line.contains("GiB available"),
            "{line}"
        );
    } else {
        eprintln!("skipped --parallel × --ctx: this machine has memory for 1024 sequences");
    }
    // 2^40 MiB is beyond any machine's memory.
    let line = refused(&["--kv-mem", "1099511627776"]);
    assert!(
        line.contains("--kv-mem 1099511627776 asks for") && line.contains("GiB available"),
        "{line}"
    );
}
