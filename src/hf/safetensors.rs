//! The safetensors header, parsed defensively: bounded size, known dtypes, data offsets inside
//! the file, no overlaps, no duplicate names (the format's rules; a hostile file gets an error).

use crate::hf::dtype::DType;
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

pub(crate) fn parse_safetensors_dtype(s: &str) -> Option<DType> {
    match s {
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        "F32" => Some(DType::F32),
        _ => None,
    }
}

/// Largest header accepted (the safetensors format itself caps it at 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One header entry, offsets already absolute inside the mapped file and checked in range.
pub(crate) struct HeaderEntry {
    pub(crate) dtype: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

impl HeaderEntry {
    /// The data bytes must be the shape's element count times `elem_size` (error names the
    /// tensor `name` of file `path`).
    pub(crate) fn check_bytes(&self, path: &Path, name: &str, elem_size: usize) -> Result<()> {
        let numel = self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel.and_then(|n| n.checked_mul(elem_size)) != Some(self.end - self.start) {
            bail!(
                "{}: tensor `{name}`: {} data bytes do not match shape {:?} of {}",
                path.display(),
                self.end - self.start,
                self.shape,
                self.dtype
            );
        }
        Ok(())
    }
}

/// Parse and check the header of a mapped safetensors file.
pub(crate) fn parse_header(path: &Path, bytes: &[u8]) -> Result<HashMap<String, HeaderEntry>> {
    let file = path.display();
    let len = bytes.len() as u64;
    if len < 8 {
        bail!(
            "{file}: truncated safetensors file ({len} bytes, the 8-byte header length is missing)"
        );
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES || n > len - 8 {
        bail!(
            "{file}: header length {n} does not fit the file ({len} bytes): truncated or not a \
             safetensors file"
        );
    }
    let data_start = 8 + n as usize;
    let data_len = bytes.len() - data_start;
    // Read the top-level object as a list of entries, so a name given twice (which a JSON map
    // would silently collapse to its last value) is refused, as the format requires.
    let entries: HeaderEntries = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| anyhow!("{file}: malformed safetensors header JSON: {e}"))?;
    let mut out: HashMap<String, HeaderEntry> = HashMap::with_capacity(entries.0.len());
    let mut seen = std::collections::HashSet::with_capacity(entries.0.len());
    for (name, v) in &entries.0 {
        if !seen.insert(name.as_str()) {
            bail!("{file}: tensor `{name}` appears twice in the safetensors header");
        }
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| anyhow!("{file}: tensor `{name}`: {what} in the header entry {v}");
        let dtype = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing or non-string `dtype`"))?
            .to_string();
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing `shape`"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("non-integer dimension in `shape`"))?;
        let offs = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("missing `data_offsets` [begin, end]"))?;
        let (b, e) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(b), Some(e)) => (b, e),
            _ => return Err(bad("non-integer `data_offsets`")),
        };
        if b > e || e > data_len as u64 {
            bail!(
                "{file}: tensor `{name}`: data_offsets [{b}, {e}] lie outside the data section \
                 ({data_len} bytes): truncated or corrupt file"
            );
        }
        out.insert(
            name.clone(),
            HeaderEntry {
                dtype,
                shape,
                start: data_start + b as usize,
                end: data_start + e as usize,
            },
        );
    }
    // No two tensors may share bytes (the format lays them out back to back); empty tensors
    // occupy nothing and may sit anywhere.
    let mut spans: Vec<(usize, usize, &str)> = out
        .iter()
        .filter(|(_, e)| e.end > e.start)
        .map(|(n, e)| (e.start, e.end, n.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            bail!(
                "{file}: tensors `{}` and `{}` have overlapping data_offsets (bytes {}..{} and \
                 {}..{} of the data section): corrupt or hostile file",
                w[0].2,
                w[1].2,
                w[0].0 - data_start,
                w[0].1 - data_start,
                w[1].0 - data_start,
                w[1].1 - data_start
            );
        }
    }
    Ok(out)
}

/// The top-level object of a safetensors header as its entries in file order, duplicates kept
/// (so that [`parse_header`] can refuse them).
struct HeaderEntries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object (the safetensors header)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, Value>()? {
                    v.push(e);
                }
                Ok(HeaderEntries(v))
            }
        }
        d.deserialize_map(V)
    }
}
