//! Hugging Face safetensors checkpoints: single file or sharded, memory-mapped, zero-copy.
//!
//! [`Checkpoint::open`] reads `model.safetensors`, or `model.safetensors.index.json` and the
//! shards its `weight_map` names, maps every file once, parses the safetensors headers itself
//! and hands out one [`WeightSource::Mapped`] per tensor: no tensor is copied or converted here.
//! Everything a stranger's folder could get wrong is checked and reported with the file and the
//! tensor: header length against the file size, data offsets, dtypes, the names and shapes the
//! config implies (reference §2.1), and shard names that would leave the folder.
//!
//! The writers ([`write_safetensors`](super::write::write_safetensors),
//! [`write_hf_folder`](super::write::write_hf_folder)) produce the same layout, for tests
//! and the presets.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

// The folder's text files are read through the bounded readers of `fsio` (re-exported for the
// callers that open a folder's files beside the weights).
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
pub use crate::hf::fsio::{read_text_file, MAX_CONFIG_BYTES, MAX_INDEX_BYTES, MAX_TOKENIZER_BYTES};
use crate::hf::safetensors::*;

/// Where the values of one weight tensor come from. Backends turn these into resident weights.
#[derive(Clone, Debug)]
pub enum WeightSource {
    /// A tensor inside a memory-mapped safetensors file (little-endian, row-major).
    Mapped {
        mmap: Arc<memmap2::Mmap>,
        /// Byte range of the tensor's data inside `mmap`.
        start: usize,
        end: usize,
        dtype: DType,
        shape: Vec<usize>,
        /// Tensor name, for error messages.
        name: String,
    },
    /// Pseudo-random values for the random-weight presets, generated identically on every
    /// backend: element `i` is `std · √3 · (2u − 1)` with
    /// `u = rng::uniform(rng::bits(rng::cell_key(seed, rng::STREAM_WEIGHTS, 0, 0, 0), i))`,
    /// rounded to `dtype` (uniform with standard deviation `std`).
    Random {
        seed: u64,
        std: f32,
        dtype: DType,
        shape: Vec<usize>,
        name: String,
    },
    /// Every element equal to `value` (norm weights of presets).
    Const {
        value: f32,
        dtype: DType,
        shape: Vec<usize>,
        name: String,
    },
    /// Host values (tests), already representable in `dtype`.
    Host {
        data: Arc<Vec<f32>>,
        dtype: DType,
        shape: Vec<usize>,
        name: String,
    },
    /// `base` with a LoRA update merged in as it is read ([`crate::hf::lowrank::Delta`]): element
    /// `(i, j)` is `W[i, j] + scale·Σ_k B[i, k]·A[k, j]` in f32, rounded once to `base`'s dtype.
    /// Nothing is materialised until a backend (or a writer) reads it.
    Lora {
        base: Box<WeightSource>,
        delta: Arc<crate::hf::lowrank::Delta>,
    },
}

impl WeightSource {
    /// Shape, dtype and name (a LoRA-merged tensor's are its base's).
    fn meta(&self) -> (&[usize], DType, &str) {
        match self {
            WeightSource::Mapped {
                shape, dtype, name, ..
            }
            | WeightSource::Random {
                shape, dtype, name, ..
            }
            | WeightSource::Const {
                shape, dtype, name, ..
            }
            | WeightSource::Host {
                shape, dtype, name, ..
            } => (shape, *dtype, name),
            WeightSource::Lora { base, .. } => base.meta(),
        }
    }
    pub fn shape(&self) -> &[usize] {
        self.meta().0
    }
    pub fn dtype(&self) -> DType {
        self.meta().1
    }
    pub fn name(&self) -> &str {
        self.meta().2
    }
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    /// Decode elements `[from, to)` (flat, row-major) into f32 on the host.
    pub fn read_range(&self, from: usize, to: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), to - from);
        match self {
            WeightSource::Mapped {
                mmap, start, dtype, ..
            } => {
                let s = dtype.size();
                dtype.decode_into(&mmap[start + from * s..start + to * s], out);
            }
            WeightSource::Random {
                seed, std, dtype, ..
            } => {
                let key = crate::rng::cell_key(*seed, crate::rng::STREAM_WEIGHTS, 0, 0, 0);
                let a = std * 3f32.sqrt();
                for (o, i) in out.iter_mut().zip(from..to) {
                    let u = crate::rng::uniform(crate::rng::bits(key, i as u64)) as f32;
                    *o = dtype.round(a * (2.0 * u - 1.0));
                }
            }
            WeightSource::Const { value, dtype, .. } => out.fill(dtype.round(*value)),
            WeightSource::Host { data, .. } => out.copy_from_slice(&data[from..to]),
            WeightSource::Lora { base, delta } => {
                base.read_range(from, to, out);
                delta.merge_into(base.dtype(), from, out);
            }
        }
    }
}

/// `src` as a source of `to` values (`--dtype`): the values the checkpoint holds, rounded to
/// `to`. A mapped tensor stays mapped (no host copy of a whole checkpoint): every backend decodes
/// any stored dtype and rounds it to its compute dtype while uploading, which is this same
/// rounding. Random and host tensors become host tensors already in `to`; constants are rounded.
pub fn cast_source(src: &WeightSource, to: DType) -> WeightSource {
    if src.dtype() == to {
        return src.clone();
    }
    match src {
        // A merged LoRA reads like a mapped tensor (merged values in the base's dtype), and is
        // rounded to `to` by the backend while uploading, like a mapped one.
        WeightSource::Mapped { .. } | WeightSource::Lora { .. } => src.clone(),
        WeightSource::Const {
            value,
            dtype,
            shape,
            name,
        } => WeightSource::Const {
            value: to.round(dtype.round(*value)),
            dtype: to,
            shape: shape.clone(),
            name: name.clone(),
        },
        WeightSource::Random { shape, name, .. } | WeightSource::Host { shape, name, .. } => {
            let n = src.numel();
            let mut data = vec![0f32; n];
            src.read_range(0, n, &mut data);
            to.round_slice(&mut data);
            WeightSource::Host {
                data: Arc::new(data),
                dtype: to,
                shape: shape.clone(),
                name: name.clone(),
            }
        }
    }
}

/// Name of the token embedding, `[V, C]`.
pub const WTE: &str = "model.transformer.wte.weight";
/// Name of the final RMSNorm weight, `[C]`.
pub const LN_F: &str = "model.transformer.ln_f.weight";
/// Name of the (untied) LM head, `[V, C]`.
pub const LM_HEAD: &str = "model.transformer.ff_out.weight";
/// The nine per-block tensors, in the order of reference §2.1.
pub const BLOCK_PARTS: [&str; 9] = [
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attn_out",
    "ff_norm",
    "ff_proj",
    "up_proj",
    "ff_out",
];

/// Full name of a per-block tensor: `model.transformer.blocks.{layer}.{part}.weight`.
pub fn block_tensor(layer: usize, part: &str) -> String {
    format!("model.transformer.blocks.{layer}.{part}.weight")
}

/// Every tensor the forward pass reads, with the shape the config implies (reference §2.1;
/// `nn.Linear` weights are `[out, in]`): `wte` and the LM head `[V, C]`, per block
/// `attn_norm`/`ff_norm` `[C]`, `q_proj` `[NH·HD, C]`, `k_proj`/`v_proj` `[NKV·HD, C]`,
/// `attn_out` `[C, NH·HD]`, `ff_proj`/`up_proj` `[F, C]`, `ff_out` `[C, F]`, and `ln_f` `[C]`.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let c = cfg.d_model;
    let q = cfg.n_heads * cfg.head_dim();
    let kv = cfg.n_kv_heads * cfg.head_dim();
    let f = cfg.mlp_hidden_size;
    let v = cfg.embedding_size;
    let mut out = vec![(WTE.to_string(), vec![v, c])];
    for i in 0..cfg.n_layers {
        for part in BLOCK_PARTS {
            let shape = match part {
                "attn_norm" | "ff_norm" => vec![c],
                "q_proj" => vec![q, c],
                "k_proj" | "v_proj" => vec![kv, c],
                "attn_out" => vec![c, q],
                "ff_proj" | "up_proj" => vec![f, c],
                _ => vec![c, f], // ff_out
            };
            out.push((block_tensor(i, part), shape));
        }
    }
    out.push((LN_F.to_string(), vec![c]));
    out.push((LM_HEAD.to_string(), vec![v, c]));
    out
}

/// The safetensors dtype string of a supported dtype.
pub fn safetensors_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
    }
}

/// Check that `name` is a plain file name and that `dir/name` stays inside `dir` once symlinks
/// are resolved. The one exception is the Hugging Face hub cache, where
/// `<repo>/snapshots/<rev>/<file>` is a symlink to `<repo>/blobs/<sha>`.
pub fn resolve_in_folder(dir: &Path, name: &str, listed_in: &Path) -> Result<PathBuf> {
    let mut comps = Path::new(name).components();
    let plain = matches!(
        (comps.next(), comps.next()),
        (Some(Component::Normal(_)), None)
    ) && !name.contains(['/', '\\', '\0'])
        && name != "."
        && name != "..";
    if !plain {
        bail!(
            "{}: shard file name {name:?} is not a plain file name inside the model folder \
             (absolute paths, `..` and path separators are refused)",
            listed_in.display()
        );
    }
    let path = dir.join(name);
    let canon_dir = dir
        .canonicalize()
        .with_context(|| format!("cannot open model folder {}", dir.display()))?;
    let canon = path.canonicalize().with_context(|| {
        format!(
            "cannot open {} (listed in {})",
            path.display(),
            listed_in.display()
        )
    })?;
    let inside = canon.parent() == Some(canon_dir.as_path());
    let hub_blob = canon_dir
        .parent()
        .filter(|s| s.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .is_some_and(|repo| canon.parent() == Some(repo.join("blobs").as_path()));
    if !(inside || hub_blob) {
        bail!(
            "{}: refusing to follow a symlink that leaves the model folder (resolves to {})",
            path.display(),
            canon.display()
        );
    }
    if !canon.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    Ok(path)
}

fn map_file(path: &Path) -> Result<Arc<memmap2::Mmap>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the map is read-only. Like every safetensors loader we rely on nobody truncating or
    // rewriting the checkpoint file while it is mapped.
    let m = unsafe { memmap2::Mmap::map(&f) }
        .with_context(|| format!("cannot memory-map {}", path.display()))?;
    Ok(Arc::new(m))
}

/// An `F8_E4M3` tensor of a quantized checkpoint (see [`crate::quant`]): memory-mapped codes,
/// byte length checked against the shape. Its per-row scales are the tensor `<name>_scale`.
#[derive(Clone, Debug)]
pub struct Fp8Tensor {
    pub mmap: Arc<memmap2::Mmap>,
    pub start: usize,
    pub end: usize,
    pub shape: Vec<usize>,
    pub name: String,
}

/// The safetensors dtype of E4M3 tensors.
pub const F8_E4M3: &str = "F8_E4M3";

/// The linear-layer parts of a block (the tensors FP8 quantization applies to).
pub const LINEAR_PARTS: [&str; 7] = [
    "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out",
];

/// Whether `name` is a block's linear-layer weight (`model.transformer.blocks.N.<part>.weight`,
/// part in [`LINEAR_PARTS`]).
pub fn is_linear_weight(name: &str) -> bool {
    name.strip_prefix("model.transformer.blocks.")
        .and_then(|r| r.split_once('.'))
        .is_some_and(|(layer, rest)| {
            layer.parse::<usize>().is_ok()
                && LINEAR_PARTS
                    .iter()
                    .any(|p| rest.strip_prefix(p) == Some(".weight"))
        })
}

/// A set of named weight tensors: a loaded checkpoint or a preset.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    tensors: HashMap<String, WeightSource>,
    /// `F8_E4M3` tensors (quantized checkpoints).
    fp8: HashMap<String, Fp8Tensor>,
    /// File each mapped tensor lives in (for messages).
    origin: HashMap<String, PathBuf>,
    files: Vec<PathBuf>,
    ignored: Vec<String>,
}

impl Checkpoint {
    /// Open the Hugging Face checkpoint in `dir` (`model.safetensors`, or
    /// `model.safetensors.index.json` plus shards) and check it against `cfg`.
    ///
    /// Every file is mapped once and shared by its tensors; nothing is copied. Tensors the
    /// model does not use (e.g. rotary buffers some exports add) are ignored and listed by
    /// [`Checkpoint::ignored`].
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        // file name -> tensors to take from it (None: all of them).
        let mut plan: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
        let listed_in: PathBuf;
        if single.exists() {
            plan.insert("model.safetensors".into(), None);
            listed_in = single.clone();
        } else if index.exists() {
            let index = resolve_in_folder(dir, "model.safetensors.index.json", &index)?;
            let text = read_text_file(&index, MAX_INDEX_BYTES)?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: malformed JSON: {e}", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: weight_map entry `{name}` = {file} is not a file name",
                        index.display()
                    )
                })?;
                plan.entry(file.to_string())
                    .or_insert_with(|| Some(Vec::new()))
                    .get_or_insert_with(Vec::new)
                    .push(name.clone());
            }
            listed_in = index.clone();
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json in the model folder",
                dir.display()
            );
        }

        let mut ck = Checkpoint::default();
        // Tensors present with a dtype this engine does not read: name -> (dtype, file).
        let mut unsupported: HashMap<String, (String, PathBuf)> = HashMap::new();
        for (file, names) in &plan {
            let path = resolve_in_folder(dir, file, &listed_in)?;
            let mmap = map_file(&path)?;
            let mut header = parse_header(&path, &mmap)?;
            let take: Vec<String> = match names {
                Some(ns) => ns.clone(),
                None => header.keys().cloned().collect(),
            };
            for name in take {
                let Some(e) = header.remove(&name) else {
                    bail!(
                        "{}: tensor `{name}` is listed for shard {file} but {} does not contain it",
                        listed_in.display(),
                        path.display()
                    );
                };
                // FP8 tensors are kept apart (`dtype` None): one byte an element.
                let dtype = if e.dtype == F8_E4M3 {
                    None
                } else if let Some(d) = parse_safetensors_dtype(&e.dtype) {
                    Some(d)
                } else {
                    unsupported.insert(name, (e.dtype, path.clone()));
                    continue;
                };
                e.check_bytes(&path, &name, dtype.map_or(1, |d| d.size()))?;
                ck.origin.insert(name.clone(), path.clone());
                let (mmap, start, end, shape) = (mmap.clone(), e.start, e.end, e.shape);
                if let Some(dtype) = dtype {
                    let w = WeightSource::Mapped {
                        mmap,
                        start,
                        end,
                        dtype,
                        shape,
                        name: name.clone(),
                    };
                    ck.tensors.insert(name, w);
                } else {
                    let w = Fp8Tensor {
                        mmap,
                        start,
                        end,
                        shape,
                        name: name.clone(),
                    };
                    ck.fp8.insert(name, w);
                }
            }
            ck.files.push(path);
        }

        for (name, _) in expected_tensors(cfg) {
            if let Some((dtype, path)) = unsupported.get(&name) {
                bail!(
                    "{}: tensor `{name}` has dtype {dtype}; only BF16, F16 and F32 are supported (and F8_E4M3 for the linear layers of an FP8 folder)",
                    path.display()
                );
            }
        }
        let origin = ck.origin.clone();
        ck.check_against_with(cfg, |name| match origin.get(name) {
            Some(p) => p.display().to_string(),
            None => listed_in.display().to_string(),
        })?;
        Ok(ck)
    }

    /// A checkpoint from sources built in code (presets, tests). Call
    /// [`Checkpoint::check_against`] to validate it against a config.
    pub fn from_sources(map: HashMap<String, WeightSource>) -> Checkpoint {
        Checkpoint {
            tensors: map,
            ..Checkpoint::default()
        }
    }

    /// Check that every tensor of [`expected_tensors`] is present with the right shape, and
    /// record the others as ignored.
    pub fn check_against(&mut self, cfg: &ModelConfig) -> Result<()> {
        self.check_against_with(cfg, |_| "checkpoint".to_string())
    }

    fn check_against_with(
        &mut self,
        cfg: &ModelConfig,
        locate: impl Fn(&str) -> String,
    ) -> Result<()> {
        let expected = expected_tensors(cfg);
        let mut scales: Vec<String> = Vec::new();
        for (name, shape) in &expected {
            if let (None, Some(q)) = (self.tensors.get(name), self.fp8.get(name)) {
                if !is_linear_weight(name) {
                    bail!(
                        "{}: tensor `{name}` is {F8_E4M3}; only the linear layers ({}) may be FP8 \
                         (embeddings, norms and the LM head stay in bf16/f16/f32)",
                        locate(name),
                        LINEAR_PARTS.join(", ")
                    );
                }
                if q.shape != *shape {
                    bail!(
                        "{}: tensor `{name}` has shape {:?}, but config.json implies {shape:?}",
                        locate(name),
                        q.shape
                    );
                }
                let sname = format!("{name}_scale");
                let Some(s) = self.tensors.get(&sname) else {
                    bail!(
                        "{}: tensor `{name}` is {F8_E4M3} but its per-channel scale `{sname}` \
                         (F32, shape [{}, 1]) is missing",
                        locate(name),
                        shape[0]
                    );
                };
                if s.shape() != [shape[0], 1] && s.shape() != [shape[0]] {
                    bail!(
                        "{}: tensor `{sname}` has shape {:?}; a per-output-channel scale of \
                         `{name}` must be [{}, 1]",
                        locate(&sname),
                        s.shape(),
                        shape[0]
                    );
                }
                scales.push(sname);
                continue;
            }
            let Some(t) = self.tensors.get(name) else {
                bail!(
                    "{}: missing tensor `{name}` (expected shape {shape:?})",
                    locate(name)
                );
            };
            if t.shape() != shape.as_slice() {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, but config.json implies {shape:?} \
                     (d_model {}, n_heads {}, n_kv_heads {}, mlp_hidden_size {}, embedding_size {})",
                    locate(name),
                    t.shape(),
                    cfg.d_model,
                    cfg.n_heads,
                    cfg.n_kv_heads,
                    cfg.mlp_hidden_size,
                    cfg.embedding_size
                );
            }
        }
        let used: std::collections::HashSet<&str> = expected
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(scales.iter().map(String::as_str))
            .collect();
        let mut ignored: Vec<String> = self
            .tensors
            .keys()
            .chain(self.fp8.keys())
            .filter(|n| !used.contains(n.as_str()))
            .cloned()
            .collect();
        ignored.sort();
        self.ignored = ignored;
        Ok(())
    }

    /// Replace (or add) the source of tensor `name`: how a LoRA adapter is merged in
    /// ([`crate::lora::Adapter::apply`]). Call [`Checkpoint::check_against`] again after adding
    /// tensors.
    pub fn set(&mut self, name: &str, src: WeightSource) {
        self.tensors.insert(name.to_string(), src);
    }

    /// The `F8_E4M3` tensor `name`, if the checkpoint stores it quantized.
    pub fn fp8_tensor(&self, name: &str) -> Option<&Fp8Tensor> {
        self.fp8.get(name)
    }

    /// Whether any tensor is stored as `F8_E4M3` (a quantized checkpoint).
    pub fn has_fp8(&self) -> bool {
        !self.fp8.is_empty()
    }

    /// The source of tensor `name`.
    pub fn get(&self, name: &str) -> Result<&WeightSource> {
        self.tensors.get(name).ok_or_else(|| {
            if self.fp8.contains_key(name) {
                anyhow!(
                    "tensor `{name}` is stored as {F8_E4M3} (an FP8-quantized folder); only \
                     inference (generate, forward, batch, loglik, eval, llada-bench) reads it: use the \
                     bf16 folder for this command"
                )
            } else {
                anyhow!("tensor `{name}` is not in the checkpoint")
            }
        })
    }

    /// The weights' dtype: that of `wte` when present, else the most common one (F32 when empty).
    pub fn dtype(&self) -> DType {
        if let Some(t) = self.tensors.get(WTE) {
            return t.dtype();
        }
        let mut counts: Vec<(DType, usize)> = Vec::new();
        for t in self.tensors.values() {
            match counts.iter_mut().find(|(d, _)| *d == t.dtype()) {
                Some((_, n)) => *n += 1,
                None => counts.push((t.dtype(), 1)),
            }
        }
        counts
            .into_iter()
            .max_by_key(|&(d, n)| (n, d.size()))
            .map_or(DType::F32, |(d, _)| d)
    }

    /// The safetensors files mapped (empty for presets).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The file tensor `name` was mapped from, if it came from a file.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.origin.get(name).map(PathBuf::as_path)
    }

    /// Tensors present but not used by the model (sorted), as of the last check.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// All tensor names (unsorted).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Decode a whole tensor to f32 on the host (tests and small models only).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        let mut out = vec![0.0; t.numel()];
        t.read_range(0, t.numel(), &mut out);
        Ok(out)
    }
}

/// Map one safetensors file (an adapter, a side file) and return its tensors sorted by name,
/// each checked as [`Checkpoint::open`] checks a shard's: header length, data offsets, a
/// supported dtype and a byte count that matches the shape, with the file and tensor named.
pub fn open_safetensors(path: &Path) -> Result<Vec<WeightSource>> {
    let mmap = map_file(path)?;
    let header = parse_header(path, &mmap)?;
    let mut names: Vec<&String> = header.keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let e = &header[name];
        let Some(dtype) = parse_safetensors_dtype(&e.dtype) else {
            bail!(
                "{}: tensor `{name}` has dtype {}; only BF16, F16 and F32 are supported",
                path.display(),
                e.dtype
            );
        };
        e.check_bytes(path, name, dtype.size())?;
        out.push(WeightSource::Mapped {
            mmap: mmap.clone(),
            start: e.start,
            end: e.end,
            dtype,
            shape: e.shape.clone(),
            name: name.clone(),
        });
    }
    Ok(out)
}
