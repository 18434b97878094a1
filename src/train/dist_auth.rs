//! The job secret of a data-parallel run and the HMAC-SHA256 it signs the rendezvous handshake
//! with (re-exported by [`super::dist`], which runs the handshake).

use anyhow::{anyhow, bail, ensure, Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::{Path, PathBuf};

/// Shortest secret accepted (bytes).
pub const MIN_SECRET_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// The key every rank of a job shares (see the module documentation).
#[derive(Clone)]
pub struct JobKey {
    pub(crate) key: [u8; 32],
    /// Where it came from (for messages).
    pub source: String,
}

impl std::fmt::Debug for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobKey(from {})", self.source)
    }
}

pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

pub(crate) fn hmac_verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let Ok(mut m) = <HmacSha256 as Mac>::new_from_slice(key) else {
        return false;
    };
    for p in parts {
        m.update(p);
    }
    // Constant-time comparison.
    m.verify_slice(tag).is_ok()
}

impl JobKey {
    /// A key from secret bytes and an optional job id (the key differs per job).
    pub fn from_secret(secret: &[u8], job: Option<&str>) -> JobKey {
        let key = hmac(
            secret,
            &[
                b"llada data-parallel job key v1\0",
                job.unwrap_or("").as_bytes(),
            ],
        );
        JobKey {
            key,
            source: "a given secret".into(),
        }
    }

    /// The job's key from the process environment.
    pub fn from_env() -> Result<JobKey> {
        JobKey::from_vars(&|k| std::env::var(k).ok())
    }

    /// [`JobKey::from_env`] over any variable lookup (tests): `LLADA_DIST_SECRET`, else the file
    /// `LLADA_DIST_SECRET_FILE`, else under SLURM `$HOME/.llada/dist-secret`; with
    /// `SLURM_JOB_ID` set the job id is mixed in.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<JobKey> {
        let job = get("SLURM_JOB_ID").filter(|s| !s.trim().is_empty());
        let job = job.as_deref().map(str::trim);
        if let Some(s) = get("LLADA_DIST_SECRET").filter(|s| !s.is_empty()) {
            ensure!(
                s.len() >= MIN_SECRET_BYTES,
                "LLADA_DIST_SECRET has {} bytes; give at least {MIN_SECRET_BYTES} (e.g. \
                 `export LLADA_DIST_SECRET=$(head -c 32 /dev/urandom | base64)`)",
                s.len()
            );
            let mut k = JobKey::from_secret(s.as_bytes(), job);
            k.source = "LLADA_DIST_SECRET".into();
            return Ok(k);
        }
        let (path, why) = match get("LLADA_DIST_SECRET_FILE").filter(|s| !s.is_empty()) {
            Some(p) => (PathBuf::from(p), "LLADA_DIST_SECRET_FILE"),
            None => match (job, get("HOME").filter(|h| !h.is_empty())) {
                (Some(_), Some(home)) => (
                    Path::new(&home).join(".llada").join("dist-secret"),
                    "the per-user secret file (under SLURM)",
                ),
                _ => bail!(
                    "data-parallel training needs a job secret, so that nobody else who can reach \
                     the rendezvous port can join the job: set LLADA_DIST_SECRET (the same value, \
                     at least {MIN_SECRET_BYTES} bytes, on every rank) or LLADA_DIST_SECRET_FILE \
                     (a file only you can read, on a file system every rank sees); under SLURM, \
                     ~/.llada/dist-secret is used by default"
                ),
            },
        };
        let secret =
            read_secret_file(&path).with_context(|| format!("{why}: {}", path.display()))?;
        let mut k = JobKey::from_secret(&secret, job);
        k.source = format!("{why} {}", path.display());
        Ok(k)
    }
}

/// Read a secret file: a regular file of the current user, mode without group/other bits,
/// 16 bytes to 64 KiB.
fn read_secret_file(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let create_hint = "create it with `mkdir -p ~/.llada && (umask 077; head -c 32 /dev/urandom \
                       | base64 > ~/.llada/dist-secret)`";
    let m = std::fs::metadata(path).with_context(|| format!("cannot read it; {create_hint}"))?;
    ensure!(m.is_file(), "not a regular file");
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    ensure!(
        m.uid() == me,
        "owned by uid {}, not by this user (uid {me})",
        m.uid()
    );
    ensure!(
        m.mode() & 0o077 == 0,
        "mode {:o} lets other users read or write it; run `chmod 600` on it",
        m.mode() & 0o777
    );
    ensure!(
        m.len() <= 1 << 16,
        "{} bytes, more than a secret needs",
        m.len()
    );
    let bytes = std::fs::read(path)?;
    let trimmed = bytes.trim_ascii();
    ensure!(
        trimmed.len() >= MIN_SECRET_BYTES,
        "holds {} bytes; a secret needs at least {MIN_SECRET_BYTES}; {create_hint}",
        trimmed.len()
    );
    Ok(trimmed.to_vec())
}

/// 32 fresh random bytes.
pub(crate) fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(|e| anyhow!("cannot draw a random nonce: {e}"))?;
    Ok(n)
}
