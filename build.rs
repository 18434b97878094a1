//! Compiles `kernels/*.cu` into fatbins with `nvcc` and embeds them in the crate.
//!
//! Generates `$OUT_DIR/kernels.rs` with
//! `pub const KERNELS: &[(&str, &[u8])]` (file stem, fatbin bytes) and `pub const KERNELS_BUILT: bool`.
//!
//! nvcc is looked up in order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `nvcc` on
//! `PATH`, then the project-local `.tools/cuda/nvidia/cu13/bin/nvcc` (installed by
//! `.ci/install-nvcc.sh`). Without nvcc the build succeeds with no kernels (one warning);
//! `LLADA_REQUIRE_KERNELS=1` turns a missing nvcc or a failed compile into a build error.
//!
//! Targets: SASS for sm_80, sm_86, sm_89, sm_90a plus PTX for compute_90, overridable with
//! `LLADA_CUDA_ARCHS` (comma-separated, e.g. `90a` or `80,90a`; PTX is emitted for the newest,
//! without the `a` suffix since arch-specific PTX does not run on later GPUs).
//! The ptxas resource report (registers, shared memory, spills) is written to
//! `$OUT_DIR/ptxas-report.txt` and copied to `target/<profile>/kernels-report.txt`; a warning names
//! it only when a kernel spills.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

const DEFAULT_ARCHS: &str = "80,86,89,90a";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "LLADA_CUDA_ARCHS",
        "LLADA_REQUIRE_KERNELS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let local_nvcc = manifest.join(".tools/cuda/nvidia/cu13/bin/nvcc");
    if local_nvcc.exists() {
        println!("cargo:rerun-if-changed={}", local_nvcc.display());
    }
    let require = env::var("LLADA_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let result = find_nvcc(&local_nvcc)
        .ok_or_else(|| {
            "nvcc not found (set NVCC or CUDA_HOME, or run .ci/install-nvcc.sh); building without CUDA kernels"
                .to_string()
        })
        .and_then(|nvcc| build_all(&nvcc, &manifest, &out_dir));
    let kernels = match result {
        Ok(k) => Some(k),
        Err(e) => {
            if require {
                panic!("LLADA_REQUIRE_KERNELS=1: {e}");
            }
            println!(
                "cargo:warning={}",
                e.lines().next().unwrap_or("kernel build failed")
            );
            None
        }
    };
    write_kernels_rs(&out_dir, kernels.as_deref());
    build_nvtx(&manifest, find_nvcc(&local_nvcc).as_deref());
}

/// Compile the NVTX3 shim (`src/nvtx/shim.c`) when NVTX3 headers are found next to nvcc (the
/// pinned `nvidia-nvtx` wheel) or in a CUDA toolkit; emits `--cfg llada_nvtx`. Without headers
/// the ranges compile to nothing. Never fails the build.
fn build_nvtx(manifest: &Path, nvcc: Option<&Path>) {
    println!("cargo::rustc-check-cfg=cfg(llada_nvtx)");
    println!("cargo:rerun-if-changed=src/nvtx/shim.c");
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(root) = nvcc.and_then(Path::parent).and_then(Path::parent) {
        candidates.push(root.join("include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = env::var(var) {
            candidates.push(PathBuf::from(v).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let Some(inc) = candidates
        .into_iter()
        .find(|d| d.join("nvtx3/nvToolsExt.h").is_file())
    else {
        return;
    };
    let ok = cc::Build::new()
        .file(manifest.join("src/nvtx/shim.c"))
        .include(&inc)
        .warnings(false)
        .try_compile("llada_nvtx_shim");
    if ok.is_ok() {
        println!("cargo:rustc-link-lib=dl");
        println!("cargo:rustc-cfg=llada_nvtx");
    }
}

fn find_nvcc(local: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|p| !p.is_empty()) {
            let p = PathBuf::from(home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    local.is_file().then(|| local.to_path_buf())
}

/// `-gencode` flags for the requested archs ("80,86,89,90a").
fn gencode_flags(archs: &str) -> Result<Vec<String>, String> {
    let mut flags = Vec::new();
    let mut newest: Option<(u32, String)> = None;
    for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let a = a.trim_start_matches("sm_").trim_start_matches("compute_");
        let digits: String = a.chars().take_while(|c| c.is_ascii_digit()).collect();
        let suffix = &a[digits.len()..];
        let num: u32 = digits
            .parse()
            .map_err(|_| format!("LLADA_CUDA_ARCHS: bad arch {a:?} (expected e.g. 80, 86, 90a)"))?;
        if !matches!(suffix, "" | "a" | "f") {
            return Err(format!("LLADA_CUDA_ARCHS: bad arch suffix in {a:?}"));
        }
        flags.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
        if newest.as_ref().map_or(true, |(n, _)| num > *n) {
            newest = Some((num, digits.clone()));
        }
    }
    let (_, ptx) = newest.ok_or_else(|| "LLADA_CUDA_ARCHS is empty".to_string())?;
    flags.push(format!("-gencode=arch=compute_{ptx},code=compute_{ptx}"));
    Ok(flags)
}

/// Compiles every kernels/*.cu; returns (stem, fatbin path) sorted by stem.
fn build_all(
    nvcc: &Path,
    manifest: &Path,
    out_dir: &Path,
) -> Result<Vec<(String, PathBuf)>, String> {
    let kdir = manifest.join("kernels");
    let mut sources: Vec<PathBuf> = fs::read_dir(&kdir)
        .map_err(|e| format!("cannot read {}: {e}", kdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let archs = env::var("LLADA_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let gencode = gencode_flags(&archs)?;

    // Include dirs for the pip-wheel layout (nvcc.profile already covers a system toolkit).
    let mut includes = vec![kdir.clone()];
    if let Some(root) = nvcc.parent().and_then(Path::parent) {
        for sub in ["include", "include/cccl"] {
            let d = root.join(sub);
            if d.is_dir() {
                includes.push(d);
            }
        }
    }

    let jobs: Arc<Mutex<Vec<PathBuf>>> =
        Arc::new(Mutex::new(sources.iter().rev().cloned().collect()));
    type Done = Vec<(String, PathBuf, Result<String, String>)>;
    let done: Arc<Mutex<Done>> = Arc::new(Mutex::new(Vec::new()));
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(sources.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (jobs, done, gencode, includes) = (&jobs, &done, &gencode, &includes);
            s.spawn(move || loop {
                let Some(src) = jobs.lock().ok().and_then(|mut j| j.pop()) else {
                    return;
                };
                let stem = src
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let fatbin = out_dir.join(format!("{stem}.fatbin"));
                let mut cmd = Command::new(nvcc);
                cmd.args([
                    "--fatbin",
                    "-O3",
                    "-std=c++17",
                    "-lineinfo",
                    "-Xptxas",
                    "-v",
                ])
                .args(gencode)
                .args(includes.iter().map(|d| format!("-I{}", d.display())))
                .arg("-o")
                .arg(&fatbin)
                .arg(&src);
                let r = match cmd.output() {
                    Ok(o) if o.status.success() => {
                        Ok(String::from_utf8_lossy(&o.stderr).into_owned())
                    }
                    Ok(o) => Err(format!(
                        "nvcc failed on {}:\n{}{}",
                        src.display(),
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )),
                    Err(e) => Err(format!("cannot run {}: {e}", nvcc.display())),
                };
                if let Ok(mut d) = done.lock() {
                    d.push((stem, fatbin, r));
                }
            });
        }
    });
    let mut done = Arc::try_unwrap(done)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .ok_or("kernel build worker panicked")?;
    done.sort_by(|a, b| a.0.cmp(&b.0));

    let mut report = format!("nvcc: {}\narchs: {archs}\n", nvcc.display());
    let mut errors = String::new();
    let mut out = Vec::new();
    let mut spills = false;
    for (stem, fatbin, r) in done {
        match r {
            Ok(log) => {
                let _ = write!(report, "\n=== {stem}.cu\n{log}");
                spills |= log.lines().any(|l| {
                    l.contains("spill stores")
                        && l.split(',').any(|part| {
                            let part = part.trim();
                            (part.ends_with("spill stores") || part.ends_with("spill loads"))
                                && !part.starts_with("0 bytes")
                        })
                });
                out.push((stem, fatbin));
            }
            Err(e) => errors.push_str(&e),
        }
    }
    let report_path = out_dir.join("ptxas-report.txt");
    let _ = fs::write(&report_path, &report);
    // OUT_DIR = target/<profile>/build/<pkg>-<hash>/out: keep a copy at target/<profile>/.
    let stable = out_dir
        .ancestors()
        .nth(3)
        .map(|p| p.join("kernels-report.txt"));
    if let Some(p) = &stable {
        let _ = fs::write(p, &report);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if spills {
        let p = stable.unwrap_or(report_path);
        println!(
            "cargo:warning=a CUDA kernel spills registers: see {}",
            p.display()
        );
    }
    Ok(out)
}

fn write_kernels_rs(out_dir: &Path, kernels: Option<&[(String, PathBuf)]>) {
    let mut s = String::from("// Generated by build.rs.\n");
    let _ = writeln!(s, "/// Whether nvcc compiled the kernels into this build.");
    let _ = writeln!(s, "pub const KERNELS_BUILT: bool = {};", kernels.is_some());
    let _ = writeln!(s, "/// (file stem of `kernels/<stem>.cu`, fatbin bytes).");
    let _ = writeln!(s, "pub const KERNELS: &[(&str, &[u8])] = &[");
    for (stem, path) in kernels.unwrap_or(&[]) {
        let _ = writeln!(
            s,
            "    ({stem:?}, include_bytes!({:?})),",
            path.display().to_string()
        );
    }
    s.push_str("];\n");
    let path = out_dir.join("kernels.rs");
    if let Err(e) = fs::write(&path, s) {
        panic!("cannot write {}: {e}", path.display());
    }
}
