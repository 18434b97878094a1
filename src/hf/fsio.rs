//! Reading inputs and writing outputs that a user names on the command line, safely.
//!
//! - Inputs ([`read_input_text`]): a regular file is read whole, up to a size limit checked
//!   before reading. Anything else that is not a directory (a FIFO, a pipe such as `/dev/stdin`
//!   or `<(cmd)`, a character device) is opened without blocking (a FIFO with no writer would
//!   block `open` forever) and read with the same size limit and a timeout on every wait for
//!   data ([`input_timeout`], `LLADA_INPUT_TIMEOUT`, default 600 s): `/dev/zero` ends at the
//!   limit, a writer that never writes ends at the timeout.
//! - Outputs ([`create_output`], [`output_is_special`]): a target that exists and is not a
//!   regular file is never replaced by a rename. A directory is refused; a FIFO or a character
//!   device (`/dev/stdout`, `/dev/null`) is written through, opened without blocking so that a
//!   FIFO without a reader is an error instead of a hang; `/dev/stdout` redirected to a file is
//!   appended to.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// How long a read from a FIFO, pipe or device waits for data (`LLADA_INPUT_TIMEOUT` seconds,
/// default 600).
pub fn input_timeout() -> Result<Duration> {
    match std::env::var("LLADA_INPUT_TIMEOUT") {
        Ok(s) => {
            let v: f64 = s
                .trim()
                .parse()
                .map_err(|_| anyhow!("LLADA_INPUT_TIMEOUT={s:?} is not a number of seconds"))?;
            if !(v > 0.0 && v <= 1e7) {
                bail!("LLADA_INPUT_TIMEOUT={s:?} must be between 0 and 10^7 seconds");
            }
            Ok(Duration::from_secs_f64(v))
        }
        Err(_) => Ok(Duration::from_secs(600)),
    }
}

/// Clear `O_NONBLOCK` on an open file (set to open a FIFO without waiting for its peer).
fn set_blocking(f: &File) -> std::io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Wait until `f` has data (or its writer hung up), at most `timeout`.
fn wait_readable(f: &File, timeout: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Read the text file `path` (`what` names it in errors: "--input", "--data") of at most
/// `max_bytes`: see the module documentation for what happens with FIFOs and devices.
pub fn read_input_text(path: &Path, what: &str, max_bytes: u64) -> Result<String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("{what}: cannot read {shown}"))?;
    if meta.is_dir() {
        bail!("{what}: {shown} is a directory, not a file");
    }
    if meta.is_file() {
        if meta.len() > max_bytes {
            bail!(
                "{what}: {shown} has {} bytes, more than the {max_bytes} accepted",
                meta.len()
            );
        }
        return std::fs::read_to_string(path)
            .with_context(|| format!("{what}: cannot read {shown}"));
    }
    // A FIFO, a pipe or a device: open without waiting for a writer, then read with a bound and
    // a timeout on every wait.
    let timeout = input_timeout()?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("{what}: cannot open {shown}"))?;
    // The descriptor stays non-blocking: a read returns at once, with data, with end of file
    // (a FIFO without a writer), or with WouldBlock, when we wait for data at most `timeout`.
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut f = f;
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let ready = wait_readable(&f, timeout)
                    .with_context(|| format!("{what}: waiting for {shown}"))?;
                if !ready {
                    bail!(
                        "{what}: no data from {shown} (not a regular file) within {:.0} s \
                         (LLADA_INPUT_TIMEOUT)",
                        timeout.as_secs_f64()
                    );
                }
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("{what}: reading {shown}")),
        };
        if n == 0 {
            break;
        }
        if out.len() as u64 + n as u64 > max_bytes {
            bail!(
                "{what}: {shown} (not a regular file) gave more than the {max_bytes} bytes accepted"
            );
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).map_err(|_| anyhow!("{what}: {shown} is not UTF-8 text"))
}

/// Whether `path` exists and is something other than a regular file (after following
/// symlinks): such a target is written through ([`create_output`]), never replaced.
pub fn output_is_special(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file()) || is_fd_alias(path)
}

/// `/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N` and the like: names of already-open files,
/// which must be written through (a temporary file cannot be created, or renamed, beside them).
fn is_fd_alias(path: &Path) -> bool {
    (path.starts_with("/dev") || path.starts_with("/proc")) && path.exists()
}

/// Open `path` for writing (`what` names it in errors). A missing path or a regular file is
/// created or truncated; a directory or a socket is refused; a FIFO or a character device is
/// written through (opened without blocking: a FIFO without a reader is an error).
pub fn create_output(path: &Path, what: &str) -> Result<File> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => bail!("{what}: {shown} is a directory"),
        Ok(m) if m.file_type().is_fifo() || m.file_type().is_char_device() => {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::ENXIO) {
                        anyhow!("{what}: {shown} is a FIFO that nobody reads")
                    } else {
                        anyhow!("{what}: cannot open {shown}: {e}")
                    }
                })?;
            set_blocking(&f).with_context(|| format!("{what}: {shown}"))?;
            Ok(f)
        }
        Ok(m) if !m.is_file() => {
            bail!("{what}: {shown} exists and is not a regular file, a FIFO or a device")
        }
        // `/dev/stdout` redirected to a file: append, so `>>` keeps what is there and `>` (the
        // shell truncated already) is unchanged.
        Ok(_) if is_fd_alias(path) => OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("{what}: cannot open {shown}")),
        _ => File::create(path).with_context(|| format!("{what}: cannot create {shown}")),
    }
}

/// Sync the directory holding `path`, so that a rename into it survives a crash.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))
}

/// Take an exclusive advisory lock (`flock`) on `f` without waiting: `WouldBlock` when another
/// open file description holds it. Released when the file is closed.
pub fn try_lock_exclusive(f: &File) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Read a small text file (JSON, a template) of a model folder: it must be a regular file (a
/// FIFO or a device would block or never end) of at most `max_bytes`, so a hostile folder can
/// neither hang the loader nor exhaust memory.
pub fn read_text_file(path: &Path, max_bytes: u64) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    if meta.len() > max_bytes {
        bail!(
            "{}: {} bytes, more than the {max_bytes} this file may have",
            path.display(),
            meta.len()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Size limits of the text files of a model folder.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;
