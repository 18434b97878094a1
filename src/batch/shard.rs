//! See [`super`]: the `shard` part of offline batch generation.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Which input lines this process handles: lines whose `(line − 1) mod count == index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    /// Where the numbers came from (for the log).
    pub source: String,
}

impl Shard {
    pub fn new(index: usize, count: usize, source: impl Into<String>) -> Result<Shard> {
        if count == 0 || index >= count {
            bail!("bad shard {index}/{count}: need 0 <= index < count");
        }
        Ok(Shard {
            index,
            count,
            source: source.into(),
        })
    }

    /// `I/N` (0-based index).
    pub fn parse(s: &str) -> Result<Shard> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("bad --shard {s:?}: expected I/N, e.g. 0/4"))?;
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .with_context(|| format!("bad --shard {s:?}: {x:?} is not a number"))
        };
        Shard::new(num(i)?, num(n)?, "--shard")
    }

    /// The shard Slurm assigns, from `env` (normally `std::env::var`):
    /// array jobs (`SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`),
    /// `srun` tasks (`SLURM_PROCID` of `SLURM_NTASKS`), or both combined
    /// (`array_index · ntasks + procid`). `None` when neither is set or there is one shard.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match env(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .with_context(|| format!("environment {k}={v:?} is not a number")),
            }
        };
        let array = match (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            (Some(id), Some(count)) => {
                let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let idx = id.checked_sub(min).with_context(|| {
                    format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
                })?;
                if idx >= count {
                    bail!("SLURM_ARRAY_TASK_ID {id} − SLURM_ARRAY_TASK_MIN {min} = {idx} is not below SLURM_ARRAY_TASK_COUNT {count} (array steps like 0-15:4 are not supported; use --shard I/N)");
                }
                Some((idx, count))
            }
            _ => None,
        };
        let tasks = match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            (Some(p), Some(n)) if n > 1 => Some((p, n)),
            _ => None,
        };
        let s = match (array, tasks) {
            (None, None) => return Ok(None),
            (Some((i, n)), None) => Shard::new(i, n, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")?,
            (None, Some((p, n))) => Shard::new(p, n, "SLURM_PROCID/SLURM_NTASKS")?,
            (Some((i, n)), Some((p, m))) => Shard::new(
                i * m + p,
                n * m,
                "SLURM_ARRAY_TASK_ID·SLURM_NTASKS + SLURM_PROCID",
            )?,
        };
        Ok((s.count > 1).then_some(s))
    }

    /// Whether 1-based input line `line` belongs to this shard.
    pub fn owns(&self, line: usize) -> bool {
        (line - 1) % self.count == self.index
    }

    /// `results.jsonl` → `results.shard-00003-of-00008.jsonl`.
    pub fn output_path(&self, base: &Path) -> PathBuf {
        let (stem, ext) = stem_ext(base);
        base.with_file_name(format!(
            "{stem}.shard-{:05}-of-{:05}{ext}",
            self.index, self.count
        ))
    }
}

pub(super) fn stem_ext(p: &Path) -> (String, String) {
    let name = p
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rfind('.') {
        Some(i) if i > 0 => (name[..i].to_string(), name[i..].to_string()),
        _ => (name, String::new()),
    }
}

/// The errors file next to an output file: `results.jsonl` → `results.errors.jsonl`.
pub fn errors_path(output: &Path) -> PathBuf {
    let (stem, ext) = stem_ext(output);
    let ext = if ext.is_empty() { ".jsonl".into() } else { ext };
    output.with_file_name(format!("{stem}.errors{ext}"))
}
