//! Reading files that come from a user's folder: one place that refuses what is not a
//! regular file and caps the size before reading.
//!
//! A checkpoint folder is untrusted input. `config.json` may be a link to `/dev/zero`
//! (endless), `tokenizer.model` a FIFO (an open that never returns), an image a 40 GB
//! file. Every read of such a file goes through [`read_capped`] (or [`open_regular`] for
//! the readers that stream or map a file): the file is opened without blocking, its
//! *opened* handle must be a regular file (so a swap between a check and the open cannot
//! slip a FIFO in), its size must be under the caller's cap, and no more than the cap is
//! ever read even if the file grows meanwhile.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Cap for JSON configs (`config.json`, `manifest.json`, `scheduler_config.json`,
/// `generation_config.json`, training `state.json`): 16 MiB. Real ones are a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Cap for HF shard indexes (`*.index.json`): 64 MiB (a 70B model's is ~100 KiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Cap for a SentencePiece `tokenizer.model`: 64 MiB (LLaMA's is 500 KiB).
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;
/// Cap for an encoded image file read from disk: 64 MiB.
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;

/// Open `path` for reading, refusing anything but a regular file (after following
/// links). The open does not block on a FIFO; the type is checked on the opened handle.
pub fn open_regular(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO with no writer returns at once instead of hanging;
        // it changes nothing for reads of a regular file.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::ckpt(
            path,
            format!(
                "not a regular file ({}): refused",
                describe(&meta.file_type())
            ),
        ));
    }
    Ok(f)
}

fn describe(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "a special file"
    }
}

/// Read all of `path`, a regular file of at most `cap` bytes; a larger file is refused
/// before anything is read.
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let f = open_regular(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > cap {
        return Err(too_big(path, len, cap));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // Read at most cap + 1 bytes: a file that grew past the cap since the check is seen.
    f.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > cap {
        return Err(too_big(path, buf.len() as u64, cap));
    }
    Ok(buf)
}

/// [`read_capped`] for a UTF-8 text file.
pub fn read_to_string_capped(path: &Path, cap: u64) -> Result<String> {
    let bytes = read_capped(path, cap)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::ckpt(
            path,
            format!(
                "not UTF-8 text (invalid byte at {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// [`read_to_string_capped`] with [`MAX_CONFIG_BYTES`], for JSON/TOML configs.
pub fn read_config(path: &Path) -> Result<String> {
    read_to_string_capped(path, MAX_CONFIG_BYTES)
}

fn too_big(path: &Path, len: u64, cap: u64) -> Error {
    Error::ckpt(
        path,
        format!("file of {len} bytes is over the {cap}-byte cap for this kind of file"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_fifos_and_oversized_files() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("a.json");
        std::fs::write(&ok, b"{}").unwrap();
        assert_eq!(read_capped(&ok, 2).unwrap(), b"{}");
        let e = read_capped(&ok, 1).unwrap_err().to_string();
        assert!(e.contains("over the 1-byte cap"), "{e}");
        let e = read_capped(dir.path(), 10).unwrap_err().to_string();
        assert!(
            e.contains("not a regular file") || e.contains("directory"),
            "{e}"
        );
        #[cfg(unix)]
        {
            let link = dir.path().join("zero.json");
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            let e = read_capped(&link, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("character device"), "{e}");
            let fifo = dir.path().join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = read_capped(&fifo, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("FIFO"), "{e}");
        }
    }
}
