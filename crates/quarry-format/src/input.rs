//! Opening files a user or another file names: regular files only, reads capped.
//!
//! Every path that enters Quarry from outside (a model, a vindex file, a script, a text) is
//! opened here. A FIFO would block `open` until a writer appears, and a device such as
//! `/dev/zero` never ends; neither is a file Quarry can use, so both are refused before any
//! read. The file is opened without blocking and checked through its descriptor, so a path
//! swapped for a FIFO between a check and the open cannot hang the process either.
//!
//! Errors are `io::Error`s whose text says what the file is ("is a directory, not a regular
//! file"); callers wrap them with the path and what they were doing, as for any I/O error.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// `O_NONBLOCK` on Linux: opening a FIFO for reading returns at once instead of waiting for a
/// writer. It has no effect on regular files, the only kind kept open.
const O_NONBLOCK: i32 = 0o4000;

/// Opens `path` for reading if it is a regular file (symbolic links followed).
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {what}, not a regular file"),
    ))
}

/// Reads the whole regular file at `path`, refusing one of more than `max` bytes; `what` names
/// the limit in the error ("an LQL script").
pub fn read_capped(path: &Path, max: u64, what: &str) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "is larger than {}, the most {what} may be",
                human_bytes(max)
            ),
        )
    };
    // A file already over the cap is refused from its size, without reading it.
    if file.metadata()?.len() > max {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    // One byte past the cap tells a file at the limit from a longer one, even if the file
    // grows while it is read.
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// [`read_capped`] for UTF-8 text.
pub fn read_text_capped(path: &Path, max: u64, what: &str) -> io::Result<String> {
    let bytes = read_capped(path, max, what)?;
    String::from_utf8(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// `bytes` in the largest binary unit that keeps it whole or one decimal ("64 MiB").
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_regular(dir.path()).unwrap_err();
        assert_eq!(err.to_string(), "is a directory, not a regular file");

        let fifo = dir.path().join("pipe");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // Would block forever without O_NONBLOCK: nobody writes to this pipe.
        let err = open_regular(&fifo).unwrap_err();
        assert_eq!(
            err.to_string(),
            "is a FIFO (named pipe), not a regular file"
        );

        let err = read_capped(Path::new("/dev/zero"), 1 << 20, "a test").unwrap_err();
        assert_eq!(err.to_string(), "is a character device, not a regular file");

        let missing = open_regular(&dir.path().join("none")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);

        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let err = open_regular(&looped).unwrap_err();
        assert!(!err.to_string().contains("No such file"), "{err}");
    }

    #[test]
    fn caps_reads_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![b'a'; 100]).unwrap();
        assert_eq!(read_capped(&path, 100, "x").unwrap().len(), 100);
        let err = read_capped(&path, 99, "a test file").unwrap_err();
        assert_eq!(
            err.to_string(),
            "is larger than 99 bytes, the most a test file may be"
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let err = read_text_capped(&path, 100, "x").unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1024), "1 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
    }
}
