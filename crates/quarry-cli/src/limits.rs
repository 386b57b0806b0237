//! The sizes a user passes on the command line, checked once, where they enter, against the
//! model and the machine.
//!
//! Each command validates its arguments here before it allocates anything that depends on
//! them; a bad value fails with one line naming the flag, the value and the bound. What is
//! checked:
//!
//! - `--threads`: 1 to [`THREADS_PER_CPU`] per CPU this process may use, never more than
//!   [`MAX_THREADS`]; a worker the OS will not start is an error too (see
//!   `quarry_kernels::pool::set_global_threads`).
//! - context sizes (`--ctx` of run and chat, perplexity's window, bench's `--pp` and `--tg`):
//!   at most the model's trained context (`context_length`), and the KV cache plus one forward
//!   pass's activations must fit in the machine's memory.
//! - counts (`--batch`, `--reps`, `--chunks`, extract's `--top-k`): at least 1 and at most a bound
//!   given with each; `--batch` also by memory.
//! - files the CLI reads (an LQL script, a perplexity text): regular files only, capped at
//!   [`LQL_SCRIPT_MAX`] and [`PERPLEXITY_TEXT_MAX`]; the REPL's history only from a regular
//!   file of at most [`HISTORY_MAX`]; `quarry chat` reads stdin lines of at most
//!   [`CHAT_LINE_MAX`].
//!
//! Sizes that need no bound: `-n` (generation ends when the context is full, whatever `-n`
//! says), `--top-k` of sampling and `--repeat-last-n` (values past the vocabulary or the
//! history select everything; nothing is allocated from them).

use std::path::Path;

use anyhow::{bail, Result};
use quarry_format::input::{human_bytes, read_text_capped};
use quarry_model::{ModelConfig, KV_BYTES_PER_VALUE};

/// Worker threads per CPU at most: the pool's workers spin on their cores between dispatches,
/// so threads beyond the CPUs only take turns; a few per CPU still allows deliberate
/// oversubscription experiments.
pub const THREADS_PER_CPU: usize = 4;
/// Threads at most on any machine: each costs a stack and a slot in every dispatch.
pub const MAX_THREADS: usize = 512;
/// Largest LQL script (`quarry lql -f`): statements are a few hundred bytes each, so this is
/// tens of thousands of them; a larger file is not a script.
pub const LQL_SCRIPT_MAX: u64 = 4 << 20;
/// Largest perplexity text: about 64 M tokens of ordinary text (~4 bytes per token), ~200 times
/// wikitext-2's test set (the usual perplexity text, 1.3 MB) and days of evaluation on a CPU.
/// Memory stays bounded: the text plus at most one 4-byte token id per byte (1.25 GiB in the
/// worst case, ~0.5 GiB for ordinary text).
pub const PERPLEXITY_TEXT_MAX: u64 = 256 << 20;
/// Largest REPL history file loaded (`~/.quarry_lql_history`): rustyline keeps 100 entries by
/// default, a few KiB; anything far larger is not a history this REPL wrote, and is skipped.
pub const HISTORY_MAX: u64 = 16 << 20;
/// Longest line `quarry chat` reads from stdin: a turn must fit in the context, and the largest
/// trained contexts (128 K tokens) hold about 512 KiB of text at 4 bytes per token; a longer
/// line (or stdin from a device that never sends a newline) is refused, not read without end.
pub const CHAT_LINE_MAX: u64 = 1 << 20;
/// Most repetitions of a bench test: the median of more does not move.
pub const MAX_BENCH_REPS: usize = 1000;
/// Most tokens extract keeps at each end of a feature's vocabulary projection: a summary of the
/// feature, not a copy of the projection (the file grows by layers × features × 16 bytes per
/// token kept).
pub const MAX_EXTRACT_TOP_K: usize = 1000;

/// The CPUs this process may use (affinity and cgroup quotas honoured).
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most `--threads` accepts on this machine.
pub fn max_threads() -> usize {
    cpus().saturating_mul(THREADS_PER_CPU).clamp(1, MAX_THREADS)
}

/// `--threads`: the pool size to use (default: one per physical core).
pub fn threads(requested: Option<usize>) -> Result<usize> {
    let Some(n) = requested else {
        return Ok(quarry_kernels::pool::default_threads());
    };
    if n == 0 {
        bail!("invalid --threads 0: must be at least 1");
    }
    let max = max_threads();
    if n > max {
        bail!(
            "invalid --threads {n}: at most {max} on this machine ({THREADS_PER_CPU} per CPU, \
             {} CPUs, never more than {MAX_THREADS})",
            cpus()
        );
    }
    Ok(n)
}

/// The memory this process can have, in bytes: the machine's (`/proc/meminfo`), each capped by
/// a cgroup's limit when that is lower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// `MemTotal`: what one command may use at most (the CLI's checks).
    pub total: u64,
    /// `MemAvailable`: what a long-lived allocation may take without pushing out other
    /// processes' memory (`quarry serve`'s KV cache).
    pub available: u64,
}

/// [`Memory`] of this machine and cgroup; `None` where neither can be read (then memory is not
/// checked).
pub fn memory() -> Option<Memory> {
    let info = std::fs::read_to_string("/proc/meminfo").ok();
    let field = |name: &str| -> Option<u64> {
        info.as_deref()?
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    };
    // cgroup v2, then v1 ("max" or a huge number when unlimited).
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|s| s.trim().parse::<u64>().ok());
    let capped = |machine: Option<u64>| match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    };
    Some(Memory {
        total: capped(field("MemTotal"))?,
        available: capped(field("MemAvailable").or(field("MemTotal")))?,
    })
}

/// Memory this process can have: the physical memory (`MemTotal`), or a cgroup's limit when
/// lower; `None` where neither can be read.
pub fn memory_limit() -> Option<u64> {
    memory().map(|m| m.total)
}

/// Bytes of KV cache for `positions` positions of one sequence.
pub fn kv_bytes(cfg: &ModelConfig, positions: usize) -> u128 {
    cfg.n_layers as u128 * 2 * cfg.kv_dim() as u128 * KV_BYTES_PER_VALUE as u128 * positions as u128
}

/// Bytes of activations a forward pass over `tokens` tokens holds at once (`f32` buffers of the
/// residual, norms, Q/K/V, attention output and the two FFN halves, their 8-bit copies), plus
/// `logit_rows` rows of logits.
pub fn forward_bytes(cfg: &ModelConfig, tokens: usize, logit_rows: usize) -> u128 {
    let per_token =
        4 * (3 * cfg.d_model + 4 * cfg.q_dim() + 2 * cfg.kv_dim() + 3 * cfg.ff_dim) + cfg.ff_dim;
    per_token as u128 * tokens as u128 + 4 * cfg.vocab_size as u128 * logit_rows as u128
}

/// Fails when `bytes` exceed the machine's memory; `what` says for what ("--ctx 100000: the KV
/// cache and a forward pass").
pub fn check_memory(what: &str, bytes: u128) -> Result<()> {
    let Some(limit) = memory_limit() else {
        return Ok(());
    };
    if bytes > limit as u128 {
        bail!(
            "invalid {what} would need {}, more than the {} of memory on this machine",
            human_bytes(u64::try_from(bytes).unwrap_or(u64::MAX)),
            human_bytes(limit)
        );
    }
    Ok(())
}

/// A context size `flag` = `value` for `cfg`: at least `min`, at most the trained context.
///
/// llama.cpp only warns when a context exceeds `n_ctx_train`; Quarry refuses, since it applies
/// no context extension beyond the file's own RoPE scaling, so positions past the trained
/// context degrade the output, and the trained context is the bound the model itself gives.
pub fn context(flag: &str, value: usize, min: usize, cfg: &ModelConfig) -> Result<usize> {
    if value < min {
        bail!("invalid {flag} {value}: must be at least {min}");
    }
    if value > cfg.context_length {
        bail!(
            "invalid {flag} {value}: the model's context is {} tokens (context_length)",
            cfg.context_length
        );
    }
    Ok(value)
}

/// A count `flag` = `value` in `1..=max`.
pub fn count(flag: &str, value: usize, max: usize, why: &str) -> Result<usize> {
    if value == 0 {
        bail!("invalid {flag} 0: must be at least 1");
    }
    if value > max {
        bail!("invalid {flag} {value}: at most {max} ({why})");
    }
    Ok(value)
}

/// Stop strings (`--stop`): each non-empty (an empty one would stop before the first token),
/// in the server's words.
pub fn stop_strings(stops: &[String]) -> Result<()> {
    if stops.iter().any(String::is_empty) {
        bail!("invalid --stop \"\": stop strings must not be empty");
    }
    Ok(())
}

/// The next line of `input` without its line ending, `None` at the end of input; a line longer
/// than [`CHAT_LINE_MAX`] bytes or not UTF-8 is an error.
pub fn read_line(input: &mut impl std::io::BufRead) -> Result<Option<String>> {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    input
        .take(CHAT_LINE_MAX + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| anyhow::anyhow!("reading stdin: {e}"))?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    } else if line.len() as u64 > CHAT_LINE_MAX {
        bail!(
            "stdin: a line is longer than {}, the most one chat turn may be",
            human_bytes(CHAT_LINE_MAX)
        );
    }
    String::from_utf8(line).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "stdin: a line is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Reads a text file the user named: a regular file of at most `max` bytes of UTF-8 (one
/// already larger is refused from its size, without reading it). Errors start with `label`
/// and the path ("LQL script x.lql: ..."); `what` names the limit ("an LQL script").
pub fn read_text(path: &Path, max: u64, label: &str, what: &str) -> Result<String> {
    read_text_capped(path, max, what)
        .map_err(|e| anyhow::anyhow!("{label} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_bounds() {
        assert!(threads(Some(0))
            .unwrap_err()
            .to_string()
            .contains("at least 1"));
        assert_eq!(threads(Some(1)).unwrap(), 1);
        assert_eq!(threads(Some(max_threads())).unwrap(), max_threads());
        let err = threads(Some(max_threads() + 1)).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("invalid --threads {}", max_threads() + 1)),
            "{err}"
        );
        assert!(threads(Some(usize::MAX)).is_err());
        assert!(max_threads() <= MAX_THREADS);
        assert!(threads(None).unwrap() >= 1);
    }

    #[test]
    fn counts_and_stops() {
        assert!(count("--reps", 0, 10, "x").is_err());
        assert_eq!(count("--reps", 10, 10, "x").unwrap(), 10);
        let err = count("--reps", 11, 10, "why").unwrap_err().to_string();
        assert_eq!(err, "invalid --reps 11: at most 10 (why)");
        assert!(stop_strings(&["a".into()]).is_ok());
        let err = stop_strings(&["a".into(), String::new()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --stop \"\": stop strings must not be empty"
        );
    }

    #[test]
    fn lines_are_capped() {
        let mut input = std::io::Cursor::new(b"one\r\ntwo\nthree".to_vec());
        assert_eq!(read_line(&mut input).unwrap().as_deref(), Some("one"));
        assert_eq!(read_line(&mut input).unwrap().as_deref(), Some("two"));
        assert_eq!(read_line(&mut input).unwrap().as_deref(), Some("three"));
        assert_eq!(read_line(&mut input).unwrap(), None);
        let at_cap = vec![b'a'; CHAT_LINE_MAX as usize];
        let mut input = std::io::Cursor::new(at_cap.clone());
        assert_eq!(read_line(&mut input).unwrap().unwrap().len(), at_cap.len());
        let mut input = std::io::Cursor::new(vec![b'a'; CHAT_LINE_MAX as usize + 1]);
        let err = read_line(&mut input).unwrap_err().to_string();
        assert_eq!(
            err,
            "stdin: a line is longer than 1 MiB, the most one chat turn may be"
        );
        let mut input = std::io::Cursor::new(vec![b'a', 0xff, b'\n']);
        assert!(read_line(&mut input)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
    }

    #[test]
    fn memory_is_checked_against_the_machine() {
        let limit = memory_limit().expect("Linux has /proc/meminfo");
        assert!(limit > 1 << 20);
        let m = memory().unwrap();
        assert!(m.available <= m.total && m.available > 0, "{m:?}");
        assert!(check_memory("--x 1", 1024).is_ok());
        let err = check_memory("--x 1", limit as u128 + 1)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid --x 1 would need"), "{err}");
        assert!(check_memory("--x 1", u128::MAX).is_err());
    }
}
