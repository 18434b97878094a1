//! See [`super`]: the `merge` part of offline batch generation.

use super::{output::*, shard::*};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What [`merge`] did.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    pub records: usize,
    /// (file, bytes) of torn last lines that were left out.
    pub torn: Vec<(PathBuf, usize)>,
}

/// The shard files of `output` in its folder (`results.shard-*-of-N.jsonl`), checked to be one
/// complete set (same `N`, every index present).
pub fn find_shards(output: &Path) -> Result<Vec<PathBuf>> {
    let (stem, ext) = stem_ext(output);
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{stem}.shard-");
    let mut found: Vec<(usize, usize, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(&ext))
        else {
            continue;
        };
        let Some((i, n)) = rest.split_once("-of-") else {
            continue;
        };
        if let (Ok(i), Ok(n)) = (i.parse::<usize>(), n.parse::<usize>()) {
            found.push((i, n, e.path()));
        }
    }
    if found.is_empty() {
        bail!("no shard files {}/{prefix}*-of-*{ext} found", dir.display());
    }
    found.sort();
    let n = found[0].1;
    if let Some(f) = found.iter().find(|f| f.1 != n) {
        bail!(
            "shard files of different runs: {} has {} shards, {} has {n}",
            f.2.display(),
            f.1,
            found[0].2.display()
        );
    }
    let have: HashSet<usize> = found.iter().map(|f| f.0).collect();
    let missing: Vec<String> = (0..n)
        .filter(|i| !have.contains(i))
        .map(|i| i.to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "shards missing from {}: {} of {n} (indices {})",
            dir.display(),
            missing.len(),
            missing.join(", ")
        );
    }
    Ok(found.into_iter().map(|f| f.2).collect())
}

/// Join result files into `output`: every id at most once (an id in two files is an error
/// naming both), ordered by input line (`line`), written to a temporary file and renamed into
/// place. Torn last lines (a killed run) are left out and reported.
pub fn merge(inputs: &[PathBuf], output: &Path) -> Result<MergeReport> {
    let mut report = MergeReport::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    // (input line or MAX, file index, line index, text)
    let mut rows: Vec<(usize, usize, usize, String)> = Vec::new();
    for (fi, path) in inputs.iter().enumerate() {
        let text = crate::hf::fsio::read_input_text(path, "batch merge", MAX_RESULTS_BYTES)?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            report.torn.push((path.clone(), text.len() - complete));
        }
        for (li, l) in text[..complete].split('\n').enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not valid JSON", path.display(), li + 1))?;
            let key = v
                .get("id")
                .map(Value::to_string)
                .with_context(|| format!("{} line {}: no `id`", path.display(), li + 1))?;
            if let Some(&other) = seen.get(&key) {
                bail!(
                    "id {key} appears in both {} and {} (line {}): shards overlap",
                    inputs[other].display(),
                    path.display(),
                    li + 1
                );
            }
            seen.insert(key, fi);
            let line = v
                .get("line")
                .and_then(Value::as_u64)
                .map_or(usize::MAX, |x| x as usize);
            rows.push((line, fi, li, l.to_string()));
        }
    }
    rows.sort_by_key(|r| (r.0, r.1, r.2));
    let mut body = String::with_capacity(rows.iter().map(|r| r.3.len() + 1).sum());
    for r in &rows {
        body.push_str(&r.3);
        body.push('\n');
    }
    write_atomic(output, body.as_bytes())?;
    report.records = rows.len();
    Ok(report)
}

/// Write `bytes` to a temporary file next to `path`, sync it, and rename it over `path`.
/// The directory is synced after the rename, so the new file survives a crash. A target that
/// exists and is not a regular file (a FIFO, `/dev/stdout`) is written through, never replaced
/// ([`crate::hf::fsio::create_output`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if crate::hf::fsio::output_is_special(path) {
        let mut f = crate::hf::fsio::create_output(path, "output")?;
        return f
            .write_all(bytes)
            .with_context(|| format!("writing {}", path.display()));
    }
    let (stem, ext) = stem_ext(path);
    let tmp = path.with_file_name(format!(".{stem}{ext}.tmp-{}", std::process::id()));
    let r = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        crate::hf::fsio::sync_parent_dir(path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}
