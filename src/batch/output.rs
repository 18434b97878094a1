//! See [`super`]: the `output` part of offline batch generation.

use super::request::*;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// How [`OutputLog`] rewrites a record before writing it (the OpenAI batch format,
/// [`super::openai`]); it must keep the record's `id`.
pub type RecordWrap = Box<dyn Fn(&Value) -> Value>;

/// Largest result file `merge` reads.
pub const MAX_RESULTS_BYTES: u64 = 16 << 30;

/// The output file as an append-only log of whole lines.
pub struct OutputLog {
    file: File,
    path: PathBuf,
    /// `id` keys of the results already in the file.
    pub done: HashSet<String>,
    /// The `params` recorded with each done `id` (`null` when the line has none), so a resumed
    /// run can check them against its request ([`split_done`]).
    pub done_params: HashMap<String, Value>,
    /// Bytes of a torn last line that opening cut off (0 when the file ended cleanly).
    pub truncated: usize,
    /// Rewrites each record before it is written (the OpenAI batch format,
    /// [`crate::batch::openai`]); it must keep the record's `id`.
    pub wrap: Option<RecordWrap>,
}

impl OutputLog {
    /// Open (or create) `path` for appending. Every complete line must be a JSON object with an
    /// `id`; its id counts as done. A last line without its newline (a write cut short by a
    /// killed process) is not a result: it is cut off here so the next append starts clean.
    pub fn open(path: &Path) -> Result<OutputLog> {
        if crate::hf::fsio::output_is_special(path) {
            bail!(
                "{}: the output must be a regular file (results are appended to it, locked and \
                 resumed), not a directory, FIFO or device",
                path.display()
            );
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening the output file {}", path.display()))?;
        // One writer per output: an advisory lock held as long as this log is open, so two runs
        // on the same output (or shard) can never both generate the same ids.
        // (`flock` through libc: `File::try_lock` needs Rust 1.89, above this crate's MSRV.)
        crate::hf::fsio::try_lock_exclusive(&file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                anyhow::anyhow!(
                    "{}: another llada batch is writing this output (it holds its lock); wait \
                     for it or give another --output",
                    path.display()
                )
            } else {
                anyhow::anyhow!("locking the output file {}: {e}", path.display())
            }
        })?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let truncated = buf.len() - complete;
        if truncated > 0 {
            file.set_len(complete as u64)
                .with_context(|| format!("cutting the torn last line of {}", path.display()))?;
            file.seek(SeekFrom::End(0))?;
        }
        let mut done = HashSet::new();
        let mut done_params = HashMap::new();
        for (i, line) in buf[..complete].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v = serde_json::from_slice::<Value>(line).ok();
            let key = v
                .as_ref()
                .and_then(|v| v.get("id").map(Value::to_string))
                .with_context(|| {
                    format!(
                        "{} line {}: not a result line (a JSON object with an `id`); refusing to append to a file this tool did not write",
                        path.display(),
                        i + 1
                    )
                })?;
            // Native lines carry `params`; OpenAI-format lines carry them in the response body.
            let params = v
                .as_ref()
                .and_then(|v| {
                    v.get("params")
                        .or_else(|| v.pointer("/response/body/params"))
                })
                .cloned()
                .unwrap_or(Value::Null);
            done_params.insert(key.clone(), params);
            done.insert(key);
        }
        Ok(OutputLog {
            file,
            path: path.to_path_buf(),
            done,
            done_params,
            truncated,
            wrap: None,
        })
    }

    /// Append one record as one whole line: a single `write` of the serialized line and its
    /// newline, then a flush.
    pub fn append(&mut self, record: &Value) -> Result<()> {
        let wrapped = self.wrap.as_ref().map(|w| w(record));
        let mut line = serde_json::to_vec(wrapped.as_ref().unwrap_or(record))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing to {}", self.path.display()))
    }

    /// Ask the OS to put the file on disk (once per batch).
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// Split `requests` for a resumed run: those still to generate, the number already done with
/// the same parameters, and an error for each request whose id is done with different recorded
/// parameters (a changed request is reported, neither silently trusted nor generated twice).
pub fn split_done(
    requests: Vec<Request>,
    log: &OutputLog,
) -> (Vec<Request>, usize, Vec<LineError>) {
    let mut todo = Vec::with_capacity(requests.len());
    let (mut same, mut changed) = (0, Vec::new());
    for r in requests {
        if !log.done.contains(&r.id_key) {
            todo.push(r);
            continue;
        }
        let want = r.opts.to_json();
        match log.done_params.get(&r.id_key) {
            Some(got) if *got == want => same += 1,
            got => changed.push(LineError {
                line: r.line,
                id: Some(r.id.clone()),
                message: format!(
                    "id already done in {} with parameters {} but this request asks {want}; \
                     not regenerated (remove that line, or use another --output)",
                    log.path.display(),
                    got.unwrap_or(&Value::Null)
                ),
            }),
        }
    }
    (todo, same, changed)
}
