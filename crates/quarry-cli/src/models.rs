//! Resolving the MODEL argument: a path to a GGUF file, or the alias of a test model that is
//! fetched into the cache on first use (through the project's `scripts/fetch-models`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Aliases accepted in place of a path, and the name `scripts/fetch-models` knows them by.
const ALIASES: &[(&str, &str)] = &[
    ("gemma3", "gemma"),
    ("gemma3-270m", "gemma"),
    ("smollm2", "smollm2"),
    ("smollm2-135m", "smollm2"),
];

/// The GGUF file `arg` names. A path that exists is returned as it is (opening it checks that
/// it is a regular file); one that cannot be looked up for another reason than its absence (a
/// symbolic link loop, a denied directory) is that error, not "no such file".
pub fn resolve(arg: &str) -> Result<PathBuf> {
    let path = Path::new(arg);
    match std::fs::metadata(path) {
        Ok(_) => return Ok(path.to_path_buf()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => bail!("{arg}: {e}"),
        Err(_) => {}
    }
    let Some((_, fetch_name)) = ALIASES.iter().find(|(alias, _)| *alias == arg) else {
        let names: Vec<&str> = ALIASES.iter().map(|(a, _)| *a).collect();
        bail!(
            "{arg}: no such file (nor a known model alias: {})",
            names.join(", ")
        );
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-models");
    if !script.is_file() {
        bail!(
            "model alias '{arg}' needs scripts/fetch-models from the Quarry source tree, \
             which is not at {}; pass a path to a GGUF file instead",
            script.display()
        );
    }
    let out = Command::new("bash")
        .arg(&script)
        .arg(fetch_name)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("fetching model '{arg}' failed (see the messages above)");
    }
    let fetched = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !fetched.is_file() {
        bail!(
            "fetching model '{arg}' produced no file at {}",
            fetched.display()
        );
    }
    Ok(fetched)
}
