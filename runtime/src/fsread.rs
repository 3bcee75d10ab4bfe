//! Reading files that a user names: the one capped reader every loader goes through.
//!
//! A checkpoint folder, a config, an eval data file, a training image folder or a plugin
//! path is untrusted input. `config.json` may be a link to `/dev/zero` (endless),
//! `tokenizer.model` a FIFO (an open that never returns), an image a 40 GB file, a folder a
//! link to its own parent (a walk that never ends). So:
//! - [`check_regular`] refuses anything but a regular file from its metadata, *before*
//!   opening it (a FIFO, a device, a socket, a folder), and names a symbolic-link loop
//!   (the kernel resolves at most 40 links, so resolution is bounded);
//! - [`open_regular`] opens without blocking and checks the *opened* handle again (a swap
//!   between the check and the open is refused, not followed);
//! - [`read_capped`] refuses a file over the cap of its kind before reading and never reads
//!   more than the cap even if the file grows meanwhile ([`MAX_CONFIG_BYTES`],
//!   [`MAX_IMAGE_FILE_BYTES`], …: one cap per kind of file);
//! - [`read_lines_capped`] reads a line-based file (JSONL) with a cap per line, so a 500 MB
//!   line is refused after reading its first cap + 1 bytes, and [`excerpt`] keeps what an
//!   error quotes of a line short;
//! - [`walk_files`] lists a folder tree with link loops detected, a depth and a count cap,
//!   and every listed file checked as regular.

use std::collections::HashSet;
use std::fs::{File, Metadata};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Cap for JSON configs (`config.json`, `manifest.json`, `scheduler_config.json`,
/// `generation_config.json`, training `state.json`, TOML configs): 16 MiB. Real ones are a
/// few KiB.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Cap for HF shard indexes (`*.index.json`): 64 MiB (a 70B model's is ~100 KiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Cap for a SentencePiece `tokenizer.model`: 64 MiB (LLaMA's is 500 KiB).
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;
/// Cap for an encoded image file read from disk: 64 MiB.
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;
/// Cap for a JSON-lines data file (eval sets, caption lists): 256 MiB.
pub const MAX_JSONL_BYTES: u64 = 256 << 20;
/// Cap for one line of a JSON-lines file: 1 MiB (an entry is a path and a few sentences).
pub const MAX_JSONL_LINE_BYTES: usize = 1 << 20;
/// Cap for a plugin library (`.so`): 1 GiB (a plugin linking libtorch statically is ~500 MB).
pub const MAX_PLUGIN_BYTES: u64 = 1 << 30;
/// Cap for a raw data file read whole (the demo's MNIST idx files, gzipped or not; a
/// gzipped one is also inflated to at most this): 256 MiB (MNIST's largest is 47 MB).
pub const MAX_DATA_FILE_BYTES: u64 = 256 << 20;
/// Most folder levels [`walk_files`] descends.
pub const MAX_WALK_DEPTH: usize = 64;
/// Most files [`walk_files`] lists.
pub const MAX_WALK_FILES: usize = 10_000_000;

/// The metadata of `path` (links followed) when it is a regular file; anything else — a
/// FIFO, a device, a socket, a folder, a link loop, a missing file — is refused by name
/// from the metadata alone, before any open.
pub fn check_regular(path: &Path) -> Result<Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    Ok(meta)
}

/// An I/O error on `path`, with a symbolic-link loop named as such.
fn io_error(path: &Path, e: std::io::Error) -> Error {
    #[cfg(unix)]
    if e.raw_os_error() == Some(libc::ELOOP) {
        return Error::ckpt(
            path,
            "a symbolic-link loop (or more than 40 links in a row): refused",
        );
    }
    Error::io(path, e)
}

fn not_regular(path: &Path, t: &std::fs::FileType) -> Error {
    Error::ckpt(
        path,
        format!("not a regular file ({}): refused", describe(t)),
    )
}

/// Open `path` for reading, refusing anything but a regular file (after following
/// links): checked from the metadata before the open, and again on the opened handle,
/// which must be the very file checked. The open does not block on a FIFO.
pub fn open_regular(path: &Path) -> Result<File> {
    let before = check_regular(path)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: a FIFO swapped in after the check opens at once instead of hanging
        // (and is refused below); O_NOCTTY: a terminal never becomes ours. Neither changes
        // reads of a regular file.
        opts.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let f = opts.open(path).map_err(|e| io_error(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if (meta.dev(), meta.ino()) != (before.dev(), before.ino()) {
            return Err(Error::ckpt(
                path,
                "the file changed between its check and its open: refused",
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = before;
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

/// The lines of a text file of at most `file_cap` bytes, each at most `line_cap` bytes
/// (without its end of line), with their 1-based numbers; blank lines are skipped. A longer
/// line is refused by number after reading `line_cap + 1` of its bytes — it is never read
/// whole, nor quoted.
pub fn read_lines_capped(
    path: &Path,
    file_cap: u64,
    line_cap: usize,
) -> Result<Vec<(usize, String)>> {
    let f = open_regular(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > file_cap {
        return Err(too_big(path, len, file_cap));
    }
    let mut r = BufReader::new(f.take(file_cap.saturating_add(1)));
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut total = 0u64;
    for number in 1.. {
        buf.clear();
        // +2: the cap, the byte that shows a line is longer, and a '\r' before the '\n'.
        let n = (&mut r)
            .take(line_cap as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > file_cap {
            return Err(too_big(path, total, file_cap));
        }
        let ended = buf.last() == Some(&b'\n');
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        if buf.len() > line_cap || (!ended && n == line_cap + 2) {
            return Err(Error::ckpt(
                path,
                format!("line {number} is longer than the {line_cap}-byte cap for a line"),
            ));
        }
        let line = std::str::from_utf8(&buf).map_err(|e| {
            Error::ckpt(
                path,
                format!(
                    "line {number} is not UTF-8 text (invalid byte at column {})",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        if !line.trim().is_empty() {
            out.push((number, line.to_string()));
        }
    }
    Ok(out)
}

/// At most `max_chars` characters of `s` (then `…`), for quoting user data in an error.
pub fn excerpt(s: &str, max_chars: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The files under `root` (its subfolders too, down to `max_depth` levels; 0 = `root`
/// only) whose name `keep` accepts, sorted. Links to folders are followed, but a folder
/// reached twice (a link loop, or two links to one folder) is refused by name, as is a
/// kept entry that is not a regular file (a FIFO named `x.png`, a link to `/dev/zero`);
/// more than [`MAX_WALK_FILES`] kept files are refused, and folders deeper than
/// `max_depth` (at most [`MAX_WALK_DEPTH`]) are not entered.
pub fn walk_files(
    root: &Path,
    max_depth: usize,
    keep: impl Fn(&Path) -> bool,
) -> Result<Vec<PathBuf>> {
    let max_depth = max_depth.min(MAX_WALK_DEPTH);
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut files = Vec::new();
    let meta = std::fs::metadata(root).map_err(|e| io_error(root, e))?;
    if !meta.is_dir() {
        return Err(Error::ckpt(
            root,
            format!("not a folder ({})", describe_any(&meta.file_type())),
        ));
    }
    seen.insert(file_id(&meta));
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| io_error(&dir, e))?;
        for e in rd {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let p = e.path();
            // Links followed: the type of what the entry leads to.
            let meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                // A dangling link or a link loop among files nobody asked for is skipped;
                // one with a kept name is refused by name.
                Err(err) if keep(&p) => return Err(io_error(&p, err)),
                Err(_) => continue,
            };
            if meta.is_dir() {
                if depth >= max_depth {
                    continue;
                }
                if !seen.insert(file_id(&meta)) {
                    return Err(Error::ckpt(
                        &p,
                        "this folder is reached a second time through links (a link loop?): \
                         refused",
                    ));
                }
                stack.push((p, depth + 1));
            } else if keep(&p) {
                if !meta.file_type().is_file() {
                    return Err(not_regular(&p, &meta.file_type()));
                }
                if files.len() >= MAX_WALK_FILES {
                    return Err(Error::ckpt(
                        root,
                        format!("more than {MAX_WALK_FILES} files: refused"),
                    ));
                }
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn describe_any(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else {
        describe(t)
    }
}

#[cfg(unix)]
fn file_id(m: &Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn file_id(_m: &Metadata) -> (u64, u64) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    (0, NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Whether `p` has one of `exts` (lower case, no dot) as its extension, in any case.
pub fn has_extension(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.contains(&e.to_ascii_lowercase().as_str()))
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
            // Refused from the metadata: check_regular never opens it.
            let e = check_regular(&fifo).unwrap_err().to_string();
            assert!(e.contains("FIFO"), "{e}");
            let a = dir.path().join("loop-a");
            let b = dir.path().join("loop-b");
            std::os::unix::fs::symlink(&b, &a).unwrap();
            std::os::unix::fs::symlink(&a, &b).unwrap();
            let e = read_capped(&a, 10).unwrap_err().to_string();
            assert!(e.contains("symbolic-link loop"), "{e}");
        }
    }

    #[test]
    fn lines_are_capped_one_by_one_and_never_quoted_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"a\": 1}\r\n\n  \n{\"b\": 2}").unwrap();
        let lines = read_lines_capped(&p, 1 << 20, 16).unwrap();
        assert_eq!(
            lines,
            vec![(1, "{\"a\": 1}".to_string()), (4, "{\"b\": 2}".to_string())]
        );
        // A line of exactly the cap passes, one byte more is refused by number.
        std::fs::write(&p, format!("{}\n{}\n", "x".repeat(16), "y".repeat(17))).unwrap();
        let e = read_lines_capped(&p, 1 << 20, 16).unwrap_err().to_string();
        assert!(e.contains("line 2 is longer than the 16-byte cap"), "{e}");
        assert!(!e.contains("yyyy"), "{e}");
        // The same without an end of line, and a file over its cap.
        std::fs::write(&p, "z".repeat(40)).unwrap();
        let e = read_lines_capped(&p, 1 << 20, 16).unwrap_err().to_string();
        assert!(e.contains("line 1 is longer"), "{e}");
        let e = read_lines_capped(&p, 39, 64).unwrap_err().to_string();
        assert!(e.contains("over the 39-byte cap"), "{e}");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(excerpt(" ab ", 3), "ab");
    }

    #[cfg(unix)]
    #[test]
    fn walks_refuse_link_loops_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("imgs");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(root.join("a.png"), b"x").unwrap();
        std::fs::write(root.join("sub/b.PNG"), b"x").unwrap();
        std::fs::write(root.join("sub/deeper/c.jpg"), b"x").unwrap();
        std::fs::write(root.join("sub/notes.txt"), b"x").unwrap();
        let imgs = |p: &Path| has_extension(p, &["png", "jpg"]);
        let all = walk_files(&root, 8, imgs).unwrap();
        let names: Vec<_> = all
            .iter()
            .map(|p| p.strip_prefix(&root).unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["a.png", "sub/b.PNG", "sub/deeper/c.jpg"]);
        assert_eq!(walk_files(&root, 0, imgs).unwrap().len(), 1);
        // A link back to the root: refused by name instead of walking forever.
        std::os::unix::fs::symlink(&root, root.join("sub/deeper/up")).unwrap();
        let e = walk_files(&root, 8, imgs).unwrap_err().to_string();
        assert!(e.contains("up") && e.contains("link loop"), "{e}");
        std::fs::remove_file(root.join("sub/deeper/up")).unwrap();
        // A device with an image name.
        std::os::unix::fs::symlink("/dev/zero", root.join("zero.jpg")).unwrap();
        let e = walk_files(&root, 8, imgs).unwrap_err().to_string();
        assert!(
            e.contains("zero.jpg") && e.contains("character device"),
            "{e}"
        );
    }
}
