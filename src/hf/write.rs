//! Writing weights: safetensors files (atomically, from host values or streamed from any
//! [`RangeSource`]), sharded weight sets with their index, and complete Hugging Face folders
//! (`init`, training checkpoints, `merge-lora`, `quantize`).

use super::checkpoint::*;
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// A tensor on the host for the writers: name, dtype to store, shape, values (rounded to the
/// dtype when written).
pub type HostTensor = (String, DType, Vec<usize>, Vec<f32>);

/// Write `bytes` to `path` through a temporary file in the same folder and a rename, so that a
/// reader never sees a half-written file. A target that exists and is not a regular file is
/// never replaced: a FIFO or a device (`/dev/stdout`) is written through, anything else refused
/// ([`crate::hf::fsio::create_output`]).
fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    if crate::hf::fsio::output_is_special(path) {
        let mut f = crate::hf::fsio::create_output(path, "output")?;
        return write(&mut f).with_context(|| format!("cannot write {}", path.display()));
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable once the directory is synced.
        crate::hf::fsio::sync_parent_dir(path).map_err(std::io::Error::other)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Write a text file atomically (temporary file, then rename).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, |f| f.write_all(text.as_bytes()))
}

/// Write one safetensors file: header (with `__metadata__ {"format": "pt"}`, padded with spaces
/// to a multiple of 8 bytes), then the tensors' data in the given order, each value rounded to
/// its dtype (RNE). Returns the number of data bytes.
pub fn write_safetensors(path: &Path, tensors: &[HostTensor]) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, dtype, shape, values) in tensors {
        let numel: usize = shape.iter().product();
        if values.len() != numel {
            bail!(
                "{}: tensor `{name}` has {} values for shape {shape:?}",
                path.display(),
                values.len()
            );
        }
        if header.contains_key(name) {
            bail!("{}: tensor `{name}` given twice", path.display());
        }
        let end = offset + numel * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": safetensors_dtype_name(*dtype),
                "shape": shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut h = serde_json::to_string(&Value::Object(header))?.into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut data = Vec::with_capacity(offset);
    for (_, dtype, _, values) in tensors {
        for &x in values {
            match dtype {
                DType::BF16 => data.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                DType::F16 => data.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                DType::F32 => data.extend_from_slice(&x.to_le_bytes()),
            }
        }
    }
    write_atomic(path, |f| {
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        f.write_all(&data)
    })?;
    Ok(offset as u64)
}

/// Write a complete Hugging Face model folder: `config.json` and either `model.safetensors`
/// (`shards == 1`) or `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`
/// (`metadata.total_size` and `weight_map`). Tensors are split into `shards` contiguous runs in
/// the given order. Stale weight files of the other layout are removed.
pub fn write_hf_folder(
    dir: &Path,
    cfg: &ModelConfig,
    tensors: &[HostTensor],
    shards: usize,
) -> Result<()> {
    let parts = contiguous_parts(tensors, shards)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_text_atomic(&dir.join("config.json"), &cfg.to_json())?;
    write_weight_layout(dir, &parts, |t| &t.0, write_safetensors)
}

/// Append `values` encoded in `dtype` (little-endian, RNE rounding) to `out`.
fn encode_values(dtype: DType, values: &[f32], out: &mut Vec<u8>) {
    for &x in values {
        match dtype {
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
}

/// What the streaming writers read: a tensor's shape, stored dtype and values by flat ranges
/// (a [`WeightSource`], or a freshly initialised tensor of [`crate::hf::init`]). `read_range`
/// must be a pure function of the range, so chunks can be read in parallel.
pub trait RangeSource: Sync {
    fn shape(&self) -> &[usize];
    fn dtype(&self) -> DType;
    /// Decode elements `[from, to)` (flat, row-major) into `out`.
    fn read_range(&self, from: usize, to: usize, out: &mut [f32]);
    fn numel(&self) -> usize {
        self.shape().iter().product()
    }
}

impl RangeSource for WeightSource {
    fn shape(&self) -> &[usize] {
        WeightSource::shape(self)
    }
    fn dtype(&self) -> DType {
        WeightSource::dtype(self)
    }
    fn read_range(&self, from: usize, to: usize, out: &mut [f32]) {
        WeightSource::read_range(self, from, to, out)
    }
}

/// Write `(name, source)` pairs into one safetensors file without holding the tensors in
/// memory: the header (as [`write_safetensors`] writes it), then every tensor read through
/// [`RangeSource::read_range`] (a chunk at a time, the chunk's pieces on all cores) and encoded
/// in the source's own dtype (atomically: temporary file, then rename). Returns the number of
/// data bytes.
pub fn write_safetensors_sources<S: RangeSource + ?Sized>(
    path: &Path,
    tensors: &[(String, &S)],
) -> Result<u64> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 22;
    const PIECE: usize = 1 << 16;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, src) in tensors {
        if header.contains_key(name) {
            bail!("{}: tensor `{name}` given twice", path.display());
        }
        let end = offset + src.numel() * src.dtype().size();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": safetensors_dtype_name(src.dtype()),
                "shape": src.shape(),
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut h = serde_json::to_string(&Value::Object(header))?.into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    write_atomic(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        let mut vals = Vec::new();
        let mut bytes = Vec::new();
        for (_, src) in tensors {
            let n = src.numel();
            let mut from = 0;
            while from < n {
                let to = (from + CHUNK).min(n);
                vals.resize(to - from, 0.0);
                vals.par_chunks_mut(PIECE)
                    .enumerate()
                    .for_each(|(j, piece)| {
                        let a = from + j * PIECE;
                        src.read_range(a, a + piece.len(), piece);
                    });
                bytes.clear();
                encode_values(src.dtype(), &vals, &mut bytes);
                w.write_all(&bytes)?;
                from = to;
            }
        }
        w.flush()
    })?;
    Ok(offset as u64)
}

/// Write the weight files of a Hugging Face folder from sources, streamed: `model.safetensors`
/// when everything fits in `max_shard_bytes`, else `model-0000k-of-0000n.safetensors` shards of
/// at most that size (a larger tensor gets a shard of its own) plus
/// `model.safetensors.index.json`. Stale weight files of the other layout are removed.
pub fn write_weight_files<S: RangeSource + ?Sized>(
    dir: &Path,
    tensors: &[(String, &S)],
    max_shard_bytes: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut shards: Vec<Vec<(String, &S)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, src) in tensors {
        let bytes = (src.numel() * src.dtype().size()) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name.clone(), *src));
        }
    }
    let parts: Vec<&[(String, &S)]> = shards.iter().map(Vec::as_slice).collect();
    write_weight_layout(dir, &parts, |t| &t.0, write_safetensors_sources)
}

/// Write the weight files of a Hugging Face folder from sources, streamed, as `shards` files of
/// contiguous runs of equally many tensors (the split [`write_hf_folder`] makes): one
/// `model.safetensors`, or `model-0000k-of-0000n.safetensors` plus the index. Stale weight
/// files of the other layout are removed.
pub fn write_weight_shards<S: RangeSource + ?Sized>(
    dir: &Path,
    tensors: &[(String, &S)],
    shards: usize,
) -> Result<()> {
    let parts = contiguous_parts(tensors, shards)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_weight_layout(dir, &parts, |t| &t.0, write_safetensors_sources)
}

/// `items` split into `shards` contiguous runs of equally many (± 1) items.
fn contiguous_parts<T>(items: &[T], shards: usize) -> Result<Vec<&[T]>> {
    if shards == 0 || shards > items.len().max(1) {
        bail!("cannot split {} tensors into {shards} shards", items.len());
    }
    Ok((0..shards)
        .map(|k| &items[k * items.len() / shards..(k + 1) * items.len() / shards])
        .collect())
}

/// Writes the weight files of a folder: `model.safetensors` for one part, else
/// `model-0000k-of-0000n.safetensors` per part plus `model.safetensors.index.json`
/// (`metadata.total_size` and `weight_map`), each file through `write` (which returns its bytes);
/// removes the stale file of the other layout.
fn write_weight_layout<T>(
    dir: &Path,
    parts: &[&[T]],
    name: impl Fn(&T) -> &String,
    write: impl Fn(&Path, &[T]) -> Result<u64>,
) -> Result<()> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let remove_stale = |p: &Path| -> Result<()> {
        if p.exists() {
            std::fs::remove_file(p)
                .with_context(|| format!("cannot remove stale {}", p.display()))?;
        }
        Ok(())
    };
    if let [one] = parts {
        write(&single, one)?;
        return remove_stale(&index);
    }
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (k, part) in parts.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, parts.len());
        total += write(&dir.join(&file), part)?;
        for t in part.iter() {
            weight_map.insert(name(t).clone(), Value::String(file.clone()));
        }
    }
    let idx = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    write_text_atomic(&index, &(serde_json::to_string_pretty(&idx)? + "\n"))?;
    remove_stale(&single)
}
