//! [`DevInts`]: the one int buffer of the CUDA code (token ids, rows, positions, selections),
//! inference's [`Backend::Ints`] and training's `TrainOps::Ints`, and [`check_ints`], the one
//! host-side bounds check every launcher runs on it before a launch.
//!
//! A buffer carries the values the host last wrote into it, so a launcher can check ids, rows
//! and positions against their bounds without reading the device. Once a kernel writes it
//! (`select`, top-k, `commit_select`: anything that takes its address through
//! [`DevBuf::dev_ptr_mut`]) its values are unknown on the host and are not checked.

use super::*;

/// An int buffer on the device and, when the host wrote it last, its values.
pub struct DevInts {
    buf: CudaSlice<i32>,
    /// Elements the buffer holds (the allocation has at least one).
    len: usize,
    /// The values the host wrote: `[..host.len()]` of the buffer when `known`. Kept when a
    /// kernel writes the buffer so the next host write reuses its capacity (no allocation).
    host: Vec<i32>,
    known: bool,
}

impl DevInts {
    /// `buf` holding `len` elements whose values the host does not know.
    pub(crate) fn unknown(buf: CudaSlice<i32>, len: usize) -> DevInts {
        DevInts {
            buf,
            len,
            host: Vec::new(),
            known: false,
        }
    }

    /// Elements the buffer holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values the host wrote (a prefix of the buffer), or `None` after a kernel wrote it.
    pub fn host(&self) -> Option<&[i32]> {
        self.known.then_some(&self.host[..])
    }

    /// The host's values of the first `n` elements, or an error naming `op` and `arg` when a
    /// kernel wrote the buffer or the host wrote fewer.
    pub(crate) fn host_values(&self, op: &str, arg: &str, n: usize) -> Result<&[i32]> {
        match self.host() {
            Some(h) if h.len() >= n => Ok(&h[..n]),
            Some(h) => bail!(
                "{op}: `{arg}` holds {} host-written values, needs {n}",
                h.len()
            ),
            None => bail!("{op}: `{arg}` was written by a kernel; its values are not on the host"),
        }
    }

    /// Record that the host wrote `src` into the first `src.len()` elements: the elements past
    /// it keep the values the host wrote before, if it knew them.
    fn record(&mut self, src: &[i32]) {
        if !self.known {
            self.host.clear();
            self.known = true;
        }
        if self.host.len() < src.len() {
            self.host.resize(src.len(), 0);
        }
        self.host[..src.len()].copy_from_slice(src);
    }
}

/// A device buffer whose address is a kernel argument.
pub(crate) trait DevBuf {
    /// The address of a buffer the kernel reads.
    fn dev_ptr(&self, stream: &CudaStream) -> u64;
    /// The address of a buffer the kernel writes.
    fn dev_ptr_mut(&mut self, stream: &CudaStream) -> u64;
}

impl<T> DevBuf for CudaSlice<T> {
    fn dev_ptr(&self, stream: &CudaStream) -> u64 {
        // Event tracking is disabled, so the returned SyncOnDrop records nothing.
        self.device_ptr(stream).0
    }

    fn dev_ptr_mut(&mut self, stream: &CudaStream) -> u64 {
        self.device_ptr_mut(stream).0
    }
}

impl DevBuf for DevInts {
    fn dev_ptr(&self, stream: &CudaStream) -> u64 {
        self.buf.dev_ptr(stream)
    }

    /// A kernel writes the buffer: its values are unknown on the host from now on.
    fn dev_ptr_mut(&mut self, stream: &CudaStream) -> u64 {
        self.known = false;
        self.buf.dev_ptr_mut(stream)
    }
}

/// `Err` naming `op` and `arg` unless `v` holds `n` elements and each of the first `n` values
/// the host knows lies in `[0, hi)` (`what` names the range). Values written by a kernel are
/// not checked.
pub(crate) fn check_ints(
    op: &str,
    arg: &str,
    v: &DevInts,
    n: usize,
    hi: usize,
    what: &str,
) -> Result<()> {
    check_len(op, arg, v.len(), n)?;
    if let Some((i, &x)) = v
        .host()
        .unwrap_or_default()
        .iter()
        .take(n)
        .enumerate()
        .find(|(_, &x)| x < 0 || x as usize >= hi)
    {
        bail!("{op}: {arg}[{i}] = {x} is outside {what} (0..{hi})");
    }
    Ok(())
}

impl CudaBackend {
    /// A zeroed int buffer of `len` elements (its values unknown to the host until it writes
    /// them, so nothing is checked against zeros a launcher never saw written).
    pub(crate) fn alloc_dev_ints(&self, len: usize) -> Result<DevInts> {
        Ok(DevInts::unknown(self.alloc("int buffer", len)?, len))
    }

    /// Copy `src` into the first `src.len()` elements of `dst` and keep it as `dst`'s host
    /// values (reusing their storage: no allocation once `dst` was written at this length).
    pub(crate) fn write_dev_ints(&self, dst: &mut DevInts, src: &[i32]) -> Result<()> {
        check_len("write_ints", "dst", dst.len(), src.len())?;
        let p = dst.buf.dev_ptr_mut(&self.stream);
        self.htod(p, src)?;
        dst.record(src);
        Ok(())
    }
}
