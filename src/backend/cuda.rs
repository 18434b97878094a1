//! CUDA backend: the hand-written kernels of `kernels/*.cu` (contract: `kernels/ABI.md`) plus
//! cuBLAS for the GEMMs, driven through cudarc's driver API.
//!
//! - Storage and compute dtype is always bf16 ([`Backend::compute_dtype`]); f32/f16 checkpoints are
//!   converted on upload (RNE, by the `convert` kernels), random and constant weights are generated
//!   on the device by the `init` kernels with the same formula as [`WeightSource::read_range`].
//! - Everything runs on one non-default stream (capturable into a CUDA graph, see
//!   [`CudaBackend::capture`]); cudarc's per-buffer event tracking is disabled (single stream).
//! - Every launcher validates its buffers' lengths and sizes and returns an error naming the op
//!   and the argument; kernels only hold bounds guards.
//! - Kernel launches are asynchronous: a fault inside a kernel surfaces at the next
//!   [`Backend::synchronize`] or read-back.
//!
//! Construction never panics on a machine without CUDA: the driver and cuBLAS libraries are
//! probed before the first call into them (cudarc panics on a missing library).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    result as dres, sys as dsys, CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream,
    DevicePtr, DevicePtrMut, DriverError,
};
use half::bf16;

use super::{AttnShape, Backend, CachedAttnShape, DeviceError, GraphExec, OpClass};
use crate::checkpoint::WeightSource;
use crate::dtype::DType;
use crate::head::{Remasking, SelectParams};

// `KERNELS: &[(&str, &[u8])]` (file stem, fatbin) and `KERNELS_BUILT: bool`, written by build.rs.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The error text when the binary carries no compiled kernels.
pub const NO_KERNELS_MSG: &str =
    "this binary was built without CUDA kernels (install nvcc: bash .ci/install-nvcc.sh, then rebuild)";

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no CUDA call is made.
    unsafe { dsys::is_culib_present() }
}

/// Number of CUDA devices, or why it cannot be known (no driver, cuInit failed).
pub fn device_count() -> std::result::Result<usize, String> {
    if !driver_present() {
        return Err("the CUDA driver library (libcuda.so.1) was not found".to_string());
    }
    catch(|| {
        dres::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        dres::device::get_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))
    })
}

/// The driver's CUDA version as (major, minor), e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32)> {
    if !driver_present() {
        bail!("the CUDA driver library (libcuda.so.1) was not found");
    }
    let mut v = 0i32;
    // SAFETY: writes one int.
    unsafe { dsys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| anyhow!("cuDriverGetVersion failed: {e:?}"))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// Run `f`, turning a panic inside cudarc (a symbol missing from an old driver) into an error.
fn catch<T>(f: impl FnOnce() -> std::result::Result<T, String>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(format!("the CUDA driver API failed: {msg} (this build targets CUDA 13.0 drivers, r580 or newer)"))
        }
    }
}

/// A weight resident on the device: `[rows, cols]` bf16, row-major (a norm weight is `[1, cols]`).
pub struct CudaWeight {
    pub buf: CudaSlice<bf16>,
    pub rows: usize,
    pub cols: usize,
    /// The first checkpoint tensor's name (plus `+N` when merged), for error messages.
    pub name: String,
}

impl CudaWeight {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// A captured sequence of launches, replayed with [`CudaBackend::replay`].
pub struct Graph(CudaGraph);

// SAFETY: the graph holds driver handles (valid in any thread once the context is bound, which
// `CudaGraph::launch` does) and an `Arc<CudaStream>`; it is only launched through the backend
// that captured it, like `CudaBackend` itself (Send).
unsafe impl Send for Graph {}

/// Per-op-class device timing ([`Backend::prof_mark`]): timing events recorded on the stream in
/// order, each opening the interval of its class; folded into totals on `prof_take` or when many
/// are pending (events are recycled, so a long profile does not grow without bound).
#[derive(Default)]
struct CudaProf {
    on: bool,
    pool: Vec<CudaEvent>,
    marks: Vec<(Option<OpClass>, CudaEvent)>,
    totals: [f64; OpClass::ALL.len()],
    seen: [bool; OpClass::ALL.len()],
}

/// Pending marks that trigger a fold (a stream synchronize) at the next interval close.
const PROF_FOLD: usize = 4096;

/// Device-side timer: two timing events around queued work.
pub struct Timer {
    start: CudaEvent,
    stop: CudaEvent,
    stream: Arc<CudaStream>,
}

impl Timer {
    /// Record the start event on the backend's stream.
    pub fn start(&self) -> Result<()> {
        self.start
            .record(&self.stream)
            .context("recording the start event")
    }
    /// Record the stop event, wait for it, and return the milliseconds since [`Timer::start`].
    pub fn stop_ms(&self) -> Result<f32> {
        self.stop
            .record(&self.stream)
            .context("recording the stop event")?;
        self.start
            .elapsed_ms(&self.stop)
            .context("reading the event timer")
    }
}

/// A loaded module (unloaded on drop).
struct Module {
    stem: String,
    raw: dsys::CUmodule,
    ctx: Arc<CudaContext>,
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `raw` came from cuModuleLoadData and is unloaded exactly once, here.
        let _ = unsafe { dres::module::unload(self.raw) };
    }
}

/// Function handles of every kernel in the ABI.
struct Kernels {
    embedding: dsys::CUfunction,
    rms_norm: dsys::CUfunction,
    add_rms_norm: dsys::CUfunction,
    add: dsys::CUfunction,
    rope: dsys::CUfunction,
    attention: dsys::CUfunction,
    attention_cached: dsys::CUfunction,
    attention_split: dsys::CUfunction,
    attention_combine: dsys::CUfunction,
    kv_store: dsys::CUfunction,
    swiglu: dsys::CUfunction,
    gather_rows: dsys::CUfunction,
    head_select: dsys::CUfunction,
    topk_select: dsys::CUfunction,
    threshold_select: dsys::CUfunction,
    fill_random: dsys::CUfunction,
    fill_const: dsys::CUfunction,
    f32_to_bf16: dsys::CUfunction,
    f16_to_bf16: dsys::CUfunction,
}

/// Launch geometry of one kernel.
#[derive(Clone, Copy)]
struct Geom {
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
}

fn rows_geom(rows: usize, threads: u32) -> Geom {
    Geom {
        grid: (rows as u32, 1, 1),
        block: (threads, 1, 1),
        smem: 0,
    }
}

/// Grid-stride launch: enough blocks of 256 to cover `numel`, capped (the kernels loop).
fn stride_geom(numel: usize) -> Geom {
    let blocks = numel.div_ceil(256).clamp(1, 132 * 32);
    Geom {
        grid: (blocks as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

/// Launch `$f` with the given geometry; every argument must be a local variable (the kernel
/// receives pointers to them, which must live until cuLaunchKernel returns).
macro_rules! launch {
    ($self:expr, $name:expr, $f:expr, $g:expr, $($arg:ident),+ $(,)?) => {{
        let mut params: Vec<*mut c_void> = vec![$( &$arg as *const _ as *mut c_void ),+];
        let g: Geom = $g;
        // SAFETY: `$f` is a function of a module this backend keeps loaded; the parameter list
        // matches the kernel's signature in kernels/ABI.md (checked by the parity tests); every
        // pointer argument is a live device allocation whose length the caller validated.
        unsafe { dres::launch_kernel($f, g.grid, g.block, g.smem, $self.stream.cu_stream(), &mut params) }
            .map_err(|e| driver_err(format!("{}: kernel launch failed", $name), e))
    }};
}

/// A driver error with `msg` (which should say what was being done), typed where a caller
/// branches on it: out of memory, or a sticky fault that leaves the context unusable.
pub(crate) fn driver_err(msg: String, e: DriverError) -> anyhow::Error {
    use dsys::cudaError_enum as E;
    let text = format!("{msg}: {e:?}");
    match e.0 {
        E::CUDA_ERROR_OUT_OF_MEMORY => DeviceError::OutOfMemory(text).into(),
        E::CUDA_ERROR_ILLEGAL_ADDRESS
        | E::CUDA_ERROR_LAUNCH_FAILED
        | E::CUDA_ERROR_LAUNCH_TIMEOUT
        | E::CUDA_ERROR_ILLEGAL_INSTRUCTION
        | E::CUDA_ERROR_MISALIGNED_ADDRESS
        | E::CUDA_ERROR_INVALID_ADDRESS_SPACE
        | E::CUDA_ERROR_INVALID_PC
        | E::CUDA_ERROR_HARDWARE_STACK_ERROR
        | E::CUDA_ERROR_ASSERT
        | E::CUDA_ERROR_ECC_UNCORRECTABLE => DeviceError::Fault(text).into(),
        _ => anyhow!(text),
    }
}

/// `Err` naming `op` and `arg` unless `have >= need`.
pub(crate) fn check_len(op: &str, arg: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        bail!("{op}: buffer `{arg}` holds {have} elements, needs at least {need}");
    }
    Ok(())
}

/// A norm weight must hold exactly `C` elements.
fn check_norm_weight(op: &str, w: &CudaWeight, c: usize) -> Result<()> {
    if w.numel() != c {
        bail!(
            "{op}: weight `{}` has {} elements, C = {c}",
            w.name,
            w.numel()
        );
    }
    Ok(())
}

/// CUDA's limit on `gridDim.y` and `gridDim.z` (`gridDim.x` allows 2³¹ − 1).
pub(crate) const GRID_YZ_MAX: usize = 65_535;

/// A grid's y or z extent, or an error naming what it counts.
pub(crate) fn grid_yz(op: &str, arg: &str, v: usize) -> Result<u32> {
    if v > GRID_YZ_MAX {
        bail!("{op}: `{arg}` = {v} exceeds CUDA's grid limit of {GRID_YZ_MAX} blocks in y and z");
    }
    Ok(v as u32)
}

/// `Err` naming `op` unless kernel `f` can be launched with `smem` bytes of dynamic shared
/// memory: the driver's own limit for the function (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`,
/// 48 KiB less the kernel's static shared memory unless raised), so the check is the kernel's.
pub(crate) fn check_dyn_smem(
    op: &str,
    f: dsys::CUfunction,
    smem: usize,
    what: &str,
) -> Result<u32> {
    // SAFETY: `f` is a function of a module the caller keeps loaded.
    let max = unsafe {
        dres::function::get_function_attribute(
            f,
            dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        )
    }
    .map_err(|e| anyhow!("{op}: querying the kernel's shared-memory limit: {e:?}"))?;
    let max = usize::try_from(max).unwrap_or(0);
    if smem > max {
        bail!(
            "{op}: {what} need {smem} bytes of dynamic shared memory, more than the kernel's {max}"
        );
    }
    Ok(smem as u32)
}

/// A size as the kernels' `int`, or an error naming it.
pub(crate) fn int(op: &str, arg: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| anyhow!("{op}: `{arg}` = {v} exceeds the kernels' 32-bit int range"))
}

fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    // Event tracking is disabled, so the returned SyncOnDrop records nothing.
    s.device_ptr(stream).0
}

fn dptr_mut<T>(s: &mut CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr_mut(stream).0
}

const MIB: f64 = 1024.0 * 1024.0;
/// Elements per staging chunk when converting weights on upload (64 MiB of f32).
const CHUNK: usize = 16 << 20;
/// cuBLAS workspace, preallocated so GEMMs never allocate (required inside graph capture).
const BLAS_WORKSPACE: usize = 32 << 20;

pub struct CudaBackend {
    // Field order is drop order: handles before the modules, modules before the context.
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    k: Kernels,
    _modules: Vec<Module>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    device_id: usize,
    device_name: String,
    /// Host copies of int buffers written with `write_ints` (device pointer → values), so the
    /// launchers can check ids, rows and positions against their bounds without reading the
    /// device. Buffers written by kernels (`select`, top-k) have no entry and are not checked.
    shadow: RefCell<HashMap<u64, Vec<i32>>>,
    prof: RefCell<CudaProf>,
    /// Scratch of the split-KV attention path (partial outputs, row maxima and sums, f32),
    /// allocated once at construction so captured graphs never see it move.
    attn_scratch: CudaSlice<f32>,
}

// SAFETY: the raw CUfunction/CUmodule handles are plain driver handles valid in any thread once
// the context is bound (every entry point binds it); cudarc's own types are Send.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// Open CUDA device `device_id`: context, one non-blocking stream, every kernel module, a
    /// cuBLAS handle bound to the stream. Errors say what is missing (driver, device, kernels,
    /// cuBLAS).
    pub fn new(device_id: usize) -> Result<CudaBackend> {
        if !KERNELS_BUILT {
            bail!("{NO_KERNELS_MSG}");
        }
        let n = device_count().map_err(|e| anyhow!("CUDA unavailable: {e}"))?;
        if n == 0 {
            bail!("CUDA unavailable: the driver reports no device");
        }
        if device_id >= n {
            bail!(
                "CUDA device {device_id} does not exist: {n} device(s) present (ordinals 0..{n})"
            );
        }
        // SAFETY: dlopen probe only.
        if !unsafe { cublas::sys::is_culib_present() } {
            bail!("cuBLAS (libcublas.so.13) was not found on the library path");
        }
        let ctx = catch(|| CudaContext::new(device_id).map_err(|e| format!("{e:?}")))
            .map_err(|e| anyhow!("creating a context on CUDA device {device_id}: {e}"))?;
        // SAFETY: called before any buffer or stream exists; this engine uses one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("creating a CUDA stream: {e:?}"))?;
        let device_name = ctx
            .name()
            .unwrap_or_else(|_| "unknown CUDA device".to_string());

        let mut modules = Vec::new();
        for (stem, image) in KERNELS {
            // The driver reads the fatbin header with 8-byte loads: copy into aligned storage.
            let mut aligned = vec![0u64; image.len().div_ceil(8) + 1];
            bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..image.len()].copy_from_slice(image);
            // SAFETY: `aligned` holds a complete fatbin image produced by nvcc (build.rs).
            let raw = unsafe { dres::module::load_data(aligned.as_ptr() as *const c_void) }.map_err(|e| {
                anyhow!("loading kernel module `{stem}` on {device_name}: {e:?} (compiled for another architecture or a newer CUDA than this driver?)")
            })?;
            modules.push(Module {
                stem: stem.to_string(),
                raw,
                ctx: ctx.clone(),
            });
        }
        let get = |sym: &str| -> Result<dsys::CUfunction> {
            let c = CString::new(sym).map_err(|_| anyhow!("bad symbol {sym:?}"))?;
            for m in &modules {
                // SAFETY: `m.raw` is a loaded module.
                if let Ok(f) = unsafe { dres::module::get_function(m.raw, c.clone()) } {
                    return Ok(f);
                }
            }
            let stems: Vec<&str> = modules.iter().map(|m| m.stem.as_str()).collect();
            bail!("kernel symbol `{sym}` not found in the compiled modules {stems:?}")
        };
        let k = Kernels {
            embedding: get("embedding_bf16")?,
            rms_norm: get("rms_norm_bf16")?,
            add_rms_norm: get("add_rms_norm_bf16")?,
            add: get("add_bf16")?,
            rope: get("rope_bf16")?,
            attention: get("attention_fwd_bf16")?,
            attention_cached: get("attention_cached_fwd_bf16")?,
            attention_split: get("attention_split_bf16")?,
            attention_combine: get("attention_combine_bf16")?,
            kv_store: get("kv_store_bf16")?,
            swiglu: get("swiglu_bf16")?,
            gather_rows: get("gather_rows_bf16")?,
            head_select: get("head_select_bf16")?,
            topk_select: get("topk_select_f32")?,
            threshold_select: get("threshold_select_f32")?,
            fill_random: get("fill_random_bf16")?,
            fill_const: get("fill_const_bf16")?,
            f32_to_bf16: get("f32_to_bf16")?,
            f16_to_bf16: get("f16_to_bf16")?,
        };
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| anyhow!("creating the cuBLAS handle: {e:?}"))?;
        // SAFETY: allocation on our stream; the buffer outlives the handle (field order).
        let mut ws = unsafe { stream.alloc::<u8>(BLAS_WORKSPACE) }
            .map_err(|e| anyhow!("allocating the cuBLAS workspace: {e:?}"))?;
        let wsp = dptr_mut(&mut ws, &stream);
        // SAFETY: the workspace is a live device allocation of BLAS_WORKSPACE bytes.
        unsafe {
            cublas::sys::cublasSetWorkspace_v2(*blas.handle(), wsp as *mut c_void, BLAS_WORKSPACE)
        }
        .result()
        .map_err(|e| anyhow!("setting the cuBLAS workspace: {e:?}"))?;
        // Reductions (split-K) in f32, never in the bf16 output type: keeps GEMMs within the
        // f32-accumulation error bound of the CPU reference.
        // SAFETY: valid handle.
        unsafe {
            cublas::sys::cublasSetMathMode(
                *blas.handle(),
                cublas::sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
            )
        }
        .result()
        .map_err(|e| anyhow!("setting the cuBLAS math mode: {e:?}"))?;
        let attn_scratch = stream
            .alloc_zeros::<f32>(ATTN_SCRATCH)
            .map_err(|e| anyhow!("allocating the attention scratch: {e:?}"))?;
        Ok(CudaBackend {
            blas,
            _blas_workspace: ws,
            k,
            _modules: modules,
            stream,
            ctx,
            device_id,
            device_name,
            shadow: RefCell::new(HashMap::new()),
            prof: RefCell::new(CudaProf::default()),
            attn_scratch,
        })
    }

    pub fn device_id(&self) -> usize {
        self.device_id
    }
    /// The device's marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.device_name
    }
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))
    }
    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| anyhow!("cuMemGetInfo failed: {e:?}"))
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A timer whose events are recorded on this backend's stream (timing-enabled events).
    pub fn timer(&self) -> Result<Timer> {
        let mk = || {
            self.ctx
                .new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))
        };
        Ok(Timer {
            start: mk().map_err(|e| anyhow!("creating a timing event: {e:?}"))?,
            stop: mk().map_err(|e| anyhow!("creating a timing event: {e:?}"))?,
            stream: self.stream.clone(),
        })
    }

    /// Capture every launch `f` queues on this backend into a CUDA graph (nothing executes
    /// during capture). `f` must not read back, synchronize, allocate or copy from host memory:
    /// buffers are allocated and host inputs written before capture, and the graph replays on
    /// exactly the captured buffers and sizes. Scalars (sizes, `SelectParams.step`, ...) are baked
    /// in. Replay with [`CudaBackend::replay`].
    pub fn capture(&self, f: impl FnOnce(&Self) -> Result<()>) -> Result<Graph> {
        self.stream
            .begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow!("beginning graph capture: {e:?}"))?;
        let body = f(self);
        // Always end the capture, so the stream is usable again even when `f` failed.
        let ended = self.stream.end_capture(dsys::CUgraphInstantiate_flags(0));
        body.context("while capturing a CUDA graph")?;
        match ended {
            Ok(Some(g)) => Ok(Graph(g)),
            Ok(None) => bail!("graph capture produced an empty graph"),
            Err(e) => bail!("ending graph capture: {e:?} (a captured op synchronized or copied from pageable memory?)"),
        }
    }

    /// Fold the recorded marks into per-class totals (ms); the last mark stays (its interval
    /// may still be open), the others go back to the pool.
    fn prof_fold(&self, p: &mut CudaProf) -> Result<()> {
        if p.marks.len() < 2 {
            return Ok(());
        }
        self.synchronize()?;
        for i in 0..p.marks.len() - 1 {
            if let Some(c) = p.marks[i].0 {
                let ms = p.marks[i]
                    .1
                    .elapsed_ms(&p.marks[i + 1].1)
                    .map_err(|e| anyhow!("reading a profiling event: {e:?}"))?;
                p.totals[c as usize] += ms as f64;
                p.seen[c as usize] = true;
            }
        }
        let last = p.marks.pop();
        let done = std::mem::take(&mut p.marks);
        p.pool.extend(done.into_iter().map(|(_, e)| e));
        p.marks.extend(last);
        Ok(())
    }

    /// Launch a captured graph on this backend's stream (asynchronous).
    pub fn replay(&self, g: &Graph) -> Result<()> {
        g.0.launch()
            .map_err(|e| driver_err("launching a CUDA graph".into(), e))
    }

    /// Check the first `n` values of `buf` lie in `[0, hi)` when the host wrote them.
    fn check_ints(
        &self,
        op: &str,
        arg: &str,
        buf: &CudaSlice<i32>,
        n: usize,
        hi: usize,
        what: &str,
    ) -> Result<()> {
        let key = dptr(buf, &self.stream);
        if let Some(vals) = self.shadow.borrow().get(&key) {
            if let Some((i, &v)) = vals
                .iter()
                .take(n)
                .enumerate()
                .find(|(_, &v)| v < 0 || v as usize >= hi)
            {
                bail!("{op}: {arg}[{i}] = {v} is outside {what} (0..{hi})");
            }
        }
        Ok(())
    }

    /// Forget the host copy of an int buffer a kernel is about to overwrite.
    fn forget_ints(&self, buf: &CudaSlice<i32>) {
        let key = dptr(buf, &self.stream);
        self.shadow.borrow_mut().remove(&key);
    }

    /// Error unless `bytes` more device bytes are likely to fit (checked for ≥ 16 MiB requests).
    fn ensure_free(&self, what: &str, bytes: usize) -> Result<()> {
        if bytes < (16 << 20) {
            return Ok(());
        }
        let (free, total) = self.mem_info()?;
        if bytes > free {
            return Err(DeviceError::OutOfMemory(format!(
                "out of GPU memory for {what}: need {:.1} MiB, {:.1} MiB free of {:.1} MiB on {}",
                bytes as f64 / MIB,
                free as f64 / MIB,
                total as f64 / MIB,
                self.device_name
            ))
            .into());
        }
        Ok(())
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        what: &str,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        self.ensure_free(what, bytes)?;
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(|e| {
            driver_err(
                format!(
                    "allocating {what} ({len} elements, {:.1} MiB)",
                    bytes as f64 / MIB
                ),
                e,
            )
        })
    }

    fn htod<T>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: callers pass a destination with room for `src.len()` elements; a copy from
        // pageable memory returns after the source has been staged.
        unsafe { dres::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| driver_err("host→device copy".into(), e))
    }

    fn dtoh<T: Clone + Default>(&self, src: u64, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.dtoh_into(src, &mut out)?;
        Ok(out)
    }

    /// Copy `dst.len()` elements from device address `src` into `dst`, then synchronize.
    fn dtoh_into<T>(&self, src: u64, dst: &mut [T]) -> Result<()> {
        if !dst.is_empty() {
            // SAFETY: callers checked the source holds `dst.len()` elements; we synchronize
            // before `dst` is used.
            unsafe { dres::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
                .map_err(|e| driver_err("device→host copy".into(), e))?;
        }
        self.synchronize()
    }

    /// Fill `n` bf16 at `dst` from one weight source (see [`WeightSource`]).
    fn upload_part(&self, dst: u64, part: &WeightSource) -> Result<()> {
        let n = part.numel();
        let name = part.name();
        match part {
            WeightSource::Mapped {
                mmap,
                start,
                end,
                dtype,
                ..
            } => {
                let bytes = mmap.get(*start..*end).ok_or_else(|| {
                    anyhow!("weight `{name}`: byte range {start}..{end} lies outside its file")
                })?;
                if bytes.len() != n * dtype.size() {
                    bail!(
                        "weight `{name}`: {} bytes for {n} {dtype} elements",
                        bytes.len()
                    );
                }
                match dtype {
                    // Zero host copy: the mapped bytes go straight to the device.
                    DType::BF16 => {
                        for (i, c) in bytes.chunks(CHUNK * 2).enumerate() {
                            self.htod(dst + (i * CHUNK * 2) as u64, c)?;
                        }
                    }
                    DType::F32 | DType::F16 => {
                        let es = dtype.size();
                        let mut stage =
                            self.alloc::<u8>("weight conversion staging", CHUNK.min(n) * es)?;
                        let sp = dptr_mut(&mut stage, &self.stream);
                        for (i, c) in bytes.chunks(CHUNK * es).enumerate() {
                            self.htod(sp, c)?;
                            let out = dst + (i * CHUNK * 2) as u64;
                            let inp = sp;
                            let cnt = (c.len() / es) as i64;
                            let f = if *dtype == DType::F32 {
                                self.k.f32_to_bf16
                            } else {
                                self.k.f16_to_bf16
                            };
                            launch!(
                                self,
                                "load_weight(convert)",
                                f,
                                stride_geom(cnt as usize),
                                out,
                                inp,
                                cnt
                            )?;
                        }
                        // The staging buffer is freed on drop: finish the conversions first.
                        self.synchronize()?;
                    }
                }
            }
            WeightSource::Host { data, .. } if data.len() != n => {
                bail!(
                    "weight `{name}`: host data holds {} values, its shape {:?} needs {n}",
                    data.len(),
                    part.shape()
                )
            }
            WeightSource::Random {
                seed, std, dtype, ..
            } if *dtype != DType::F16 => {
                // bf16(a·(2u−1)) computed in f32: one rounding, as read_range (f32 or bf16 source)
                // followed by the bf16 rounding of the CPU reference.
                let key = crate::rng::cell_key(*seed, crate::rng::STREAM_WEIGHTS, 0, 0, 0);
                let a = std * 3f32.sqrt();
                let out = dst;
                let cnt = n as i64;
                launch!(
                    self,
                    "load_weight(fill_random)",
                    self.k.fill_random,
                    stride_geom(n),
                    out,
                    cnt,
                    key,
                    a
                )?;
            }
            WeightSource::Const { value, dtype, .. } => {
                let v = dtype.round(*value);
                let out = dst;
                let cnt = n as i64;
                launch!(
                    self,
                    "load_weight(fill_const)",
                    self.k.fill_const,
                    stride_geom(n),
                    out,
                    cnt,
                    v
                )?;
            }
            // Host values and f16 random weights (double rounding f16→bf16): convert on the host.
            _ => {
                let mut f = vec![0f32; CHUNK.min(n)];
                let mut h = vec![bf16::ZERO; CHUNK.min(n)];
                let mut from = 0;
                while from < n {
                    let to = (from + CHUNK).min(n);
                    let (fs, hs) = (&mut f[..to - from], &mut h[..to - from]);
                    part.read_range(from, to, fs);
                    for (o, &x) in hs.iter_mut().zip(fs.iter()) {
                        *o = bf16::from_f32(x);
                    }
                    self.htod(dst + (from * 2) as u64, hs)?;
                    from = to;
                }
                self.synchronize()?;
            }
        }
        Ok(())
    }

    /// Per row, the `k[row]` best columns of `conf` `[nrows, ncols]` (confidence descending, ties
    /// to the lowest column, NaN = −∞) written in order into `sel` `[nrows, ncols]`, the rest -1.
    pub fn topk_select(
        &self,
        sel: &mut CudaSlice<i32>,
        conf: &CudaSlice<f32>,
        k: &CudaSlice<i32>,
        nrows: usize,
        ncols: usize,
    ) -> Result<()> {
        let op = "topk_select";
        check_len(op, "sel", sel.len(), nrows * ncols)?;
        check_len(op, "conf", conf.len(), nrows * ncols)?;
        check_len(op, "k", k.len(), nrows)?;
        if nrows == 0 || ncols == 0 {
            return Ok(());
        }
        self.forget_ints(sel);
        let (selp, confp, kp) = (
            dptr_mut(sel, &self.stream),
            dptr(conf, &self.stream),
            dptr(k, &self.stream),
        );
        let (nr, nc) = (int(op, "nrows", nrows)?, int(op, "ncols", ncols)?);
        launch!(
            self,
            op,
            self.k.topk_select,
            rows_geom(nrows, TOPK_THREADS),
            selp,
            confp,
            kp,
            nr,
            nc
        )
    }

    /// Per row, the best column plus every column with `conf ≥ threshold`, in the order of
    /// [`CudaBackend::topk_select`], the rest of the row -1.
    pub fn threshold_select(
        &self,
        sel: &mut CudaSlice<i32>,
        conf: &CudaSlice<f32>,
        threshold: f32,
        nrows: usize,
        ncols: usize,
    ) -> Result<()> {
        let op = "threshold_select";
        check_len(op, "sel", sel.len(), nrows * ncols)?;
        check_len(op, "conf", conf.len(), nrows * ncols)?;
        if nrows == 0 || ncols == 0 {
            return Ok(());
        }
        self.forget_ints(sel);
        let (selp, confp) = (dptr_mut(sel, &self.stream), dptr(conf, &self.stream));
        let (nr, nc) = (int(op, "nrows", nrows)?, int(op, "ncols", ncols)?);
        launch!(
            self,
            op,
            self.k.threshold_select,
            rows_geom(nrows, TOPK_THREADS),
            selp,
            confp,
            threshold,
            nr,
            nc
        )
    }
}

/// Threads per block of the row-wise kernels (norms, embedding, gather).
const ROW_THREADS: u32 = 256;
/// Threads per block of `head_select` (ABI: block 1024).
const HEAD_THREADS: u32 = 1024;
/// Threads per block of the top-k kernels.
const TOPK_THREADS: u32 = 1024;

impl Backend for CudaBackend {
    type Act = CudaSlice<bf16>;
    type Weight = CudaWeight;
    type Ints = CudaSlice<i32>;
    type F32s = CudaSlice<f32>;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.device_id, self.device_name)
    }

    fn compute_dtype(&self) -> DType {
        DType::BF16
    }

    fn load_weight(&self, parts: &[WeightSource]) -> Result<CudaWeight> {
        let first = parts
            .first()
            .ok_or_else(|| anyhow!("load_weight: no parts given"))?;
        let name = if parts.len() > 1 {
            format!("{}+{}", first.name(), parts.len() - 1)
        } else {
            first.name().to_string()
        };
        let (rows, cols) = match first.shape() {
            [c] if parts.len() == 1 => (1, *c),
            [_, c] => {
                let mut rows = 0;
                for p in parts {
                    match p.shape() {
                        [r, pc] if pc == c => rows += r,
                        s => bail!(
                            "load_weight: `{}` has shape {s:?}, expected [rows, {c}] to stack with `{}`",
                            p.name(),
                            first.name()
                        ),
                    }
                }
                (rows, *c)
            }
            s => bail!(
                "load_weight: `{}` has shape {s:?}: expected [rows, cols] (or [cols], alone)",
                first.name()
            ),
        };
        let mut buf = self.alloc::<bf16>(&format!("weight `{name}`"), rows * cols)?;
        let base = dptr_mut(&mut buf, &self.stream);
        let mut off = 0usize;
        for p in parts {
            self.upload_part(base + (off * 2) as u64, p)
                .with_context(|| format!("uploading weight `{}`", p.name()))?;
            off += p.numel();
        }
        Ok(CudaWeight {
            buf,
            rows,
            cols,
            name,
        })
    }

    fn alloc_act(&self, len: usize) -> Result<Self::Act> {
        self.alloc("activation buffer", len)
    }
    fn alloc_ints(&self, len: usize) -> Result<Self::Ints> {
        let b = self.alloc("int buffer", len)?;
        self.forget_ints(&b);
        Ok(b)
    }
    fn alloc_f32s(&self, len: usize) -> Result<Self::F32s> {
        self.alloc("f32 buffer", len)
    }

    fn write_ints(&self, dst: &mut Self::Ints, src: &[i32]) -> Result<()> {
        check_len("write_ints", "dst", dst.len(), src.len())?;
        let p = dptr_mut(dst, &self.stream);
        self.htod(p, src)?;
        let mut sh = self.shadow.borrow_mut();
        let vals = sh.entry(p).or_default();
        if vals.len() < src.len() {
            vals.resize(src.len(), 0);
        }
        vals[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn write_f32s(&self, dst: &mut Self::F32s, src: &[f32]) -> Result<()> {
        check_len("write_f32s", "dst", dst.len(), src.len())?;
        let p = dptr_mut(dst, &self.stream);
        self.htod(p, src)
    }
    fn read_act(&self, src: &Self::Act, n: usize) -> Result<Vec<f32>> {
        check_len("read_act", "src", src.len(), n)?;
        let h: Vec<bf16> = self.dtoh(dptr(src, &self.stream), n)?;
        Ok(h.into_iter().map(|x| x.to_f32()).collect())
    }
    fn read_ints(&self, src: &Self::Ints, n: usize) -> Result<Vec<i32>> {
        check_len("read_ints", "src", src.len(), n)?;
        self.dtoh(dptr(src, &self.stream), n)
    }
    fn read_f32s(&self, src: &Self::F32s, n: usize) -> Result<Vec<f32>> {
        check_len("read_f32s", "src", src.len(), n)?;
        self.dtoh(dptr(src, &self.stream), n)
    }
    fn read_ints_into(&self, src: &Self::Ints, dst: &mut [i32]) -> Result<()> {
        check_len("read_ints_into", "src", src.len(), dst.len())?;
        self.dtoh_into(dptr(src, &self.stream), dst)
    }
    fn read_f32s_into(&self, src: &Self::F32s, dst: &mut [f32]) -> Result<()> {
        check_len("read_f32s_into", "src", src.len(), dst.len())?;
        self.dtoh_into(dptr(src, &self.stream), dst)
    }

    fn embedding(
        &self,
        out: &mut Self::Act,
        wte: &CudaWeight,
        ids: &Self::Ints,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "embedding";
        if wte.cols != c {
            bail!("{op}: `{}` has {} columns, C = {c}", wte.name, wte.cols);
        }
        check_len(op, "out", out.len(), n * c)?;
        check_len(op, "ids", ids.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        self.check_ints(
            op,
            "ids",
            ids,
            n,
            wte.rows,
            &format!("the vocabulary of `{}`", wte.name),
        )?;
        let (o, w, i) = (
            dptr_mut(out, &self.stream),
            dptr(&wte.buf, &self.stream),
            dptr(ids, &self.stream),
        );
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(
            self,
            op,
            self.k.embedding,
            rows_geom(n, ROW_THREADS),
            o,
            w,
            i,
            n_,
            c_
        )
    }

    fn rms_norm(
        &self,
        out: &mut Self::Act,
        x: &Self::Act,
        w: &CudaWeight,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "rms_norm";
        check_norm_weight(op, w, c)?;
        check_len(op, "out", out.len(), n * c)?;
        check_len(op, "x", x.len(), n * c)?;
        if n == 0 {
            return Ok(());
        }
        let (o, xp, wp) = (
            dptr_mut(out, &self.stream),
            dptr(x, &self.stream),
            dptr(&w.buf, &self.stream),
        );
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(
            self,
            op,
            self.k.rms_norm,
            rows_geom(n, ROW_THREADS),
            o,
            xp,
            wp,
            n_,
            c_,
            eps
        )
    }

    fn add_rms_norm(
        &self,
        out: &mut Self::Act,
        x: &mut Self::Act,
        d: &Self::Act,
        w: &CudaWeight,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "add_rms_norm";
        check_norm_weight(op, w, c)?;
        check_len(op, "out", out.len(), n * c)?;
        check_len(op, "x", x.len(), n * c)?;
        check_len(op, "d", d.len(), n * c)?;
        if n == 0 {
            return Ok(());
        }
        let (o, xp, dp, wp) = (
            dptr_mut(out, &self.stream),
            dptr_mut(x, &self.stream),
            dptr(d, &self.stream),
            dptr(&w.buf, &self.stream),
        );
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(
            self,
            op,
            self.k.add_rms_norm,
            rows_geom(n, ROW_THREADS),
            o,
            xp,
            dp,
            wp,
            n_,
            c_,
            eps
        )
    }

    fn add(&self, x: &mut Self::Act, d: &Self::Act, n: usize, c: usize) -> Result<()> {
        let op = "add";
        check_len(op, "x", x.len(), n * c)?;
        check_len(op, "d", d.len(), n * c)?;
        if n * c == 0 {
            return Ok(());
        }
        let (xp, dp) = (dptr_mut(x, &self.stream), dptr(d, &self.stream));
        let numel = (n * c) as i64;
        launch!(self, op, self.k.add, stride_geom(n * c), xp, dp, numel)
    }

    /// Row-major `out[N, M] = x[N, K] · W[M, K]ᵀ`. cuBLAS is column-major: the row-major buffers
    /// read as column-major are `outᵀ` (M×N, ld M), `xᵀ` (K×N, ld K) and `Wᵀ` (K×M, ld K), so
    /// `outᵀ = W · xᵀ = op(A)·B` with `A = W` transposed (`transa = T`, lda = K) and `B = x` as is
    /// (`transb = N`, ldb = K), `m = M`, `n = N`, `k = K`, ldc = M.
    fn matmul(
        &self,
        out: &mut Self::Act,
        x: &Self::Act,
        w: &CudaWeight,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let op = "matmul";
        if w.rows != m || w.cols != k {
            bail!(
                "{op}: weight `{}` is [{}, {}], expected [M={m}, K={k}]",
                w.name,
                w.rows,
                w.cols
            );
        }
        check_len(op, "out", out.len(), n * m)?;
        check_len(op, "x", x.len(), n * k)?;
        if n == 0 || m == 0 {
            return Ok(());
        }
        let (m_, n_, k_) = (int(op, "m", m)?, int(op, "n", n)?, int(op, "k", k)?);
        let (o, xp, wp) = (
            dptr_mut(out, &self.stream),
            dptr(x, &self.stream),
            dptr(&w.buf, &self.stream),
        );
        let (alpha, beta) = (1.0f32, 0.0f32);
        use cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
        };
        // SAFETY: the three buffers are live device allocations of at least M·K, N·K and N·M
        // bf16 (checked above); alpha/beta are host f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m_,
                n_,
                k_,
                &alpha as *const f32 as *const c_void,
                wp as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                k_,
                xp as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                k_,
                &beta as *const f32 as *const c_void,
                o as *mut c_void,
                cudaDataType_t::CUDA_R_16BF,
                m_,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("{op}: cuBLAS GEMM [N={n}, K={k}] x [M={m}, K={k}]^T failed: {e:?}"))
    }

    fn rope(
        &self,
        qkv: &mut Self::Act,
        pos: &Self::Ints,
        cos: &Self::F32s,
        sin: &Self::F32s,
        n: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> Result<()> {
        let op = "rope";
        if hd == 0 || hd % 2 != 0 {
            bail!("{op}: head dim {hd} must be even and positive");
        }
        check_len(op, "qkv", qkv.len(), n * (nh + 2 * nkv) * hd)?;
        check_len(op, "pos", pos.len(), n)?;
        if cos.len() != sin.len() || cos.len() < hd / 2 {
            bail!(
                "{op}: tables `cos` ({}) and `sin` ({}) must be [max_pos, HD/2 = {}]",
                cos.len(),
                sin.len(),
                hd / 2
            );
        }
        if n == 0 {
            return Ok(());
        }
        let max_pos = cos.len() / (hd / 2);
        self.check_ints(op, "pos", pos, n, max_pos, "the RoPE tables")?;
        let (q, c, s, p) = (
            dptr_mut(qkv, &self.stream),
            dptr(cos, &self.stream),
            dptr(sin, &self.stream),
            dptr(pos, &self.stream),
        );
        let (n_, nh_, nkv_, hd_) = (
            int(op, "n", n)?,
            int(op, "nh", nh)?,
            int(op, "nkv", nkv)?,
            int(op, "hd", hd)?,
        );
        let threads = ((nh + nkv) * hd / 2).clamp(32, 1024).next_multiple_of(32) as u32;
        launch!(
            self,
            op,
            self.k.rope,
            rows_geom(n, threads.min(1024)),
            q,
            c,
            s,
            p,
            n_,
            nh_,
            nkv_,
            hd_
        )
    }

    fn attention(
        &self,
        out: &mut Self::Act,
        qkv: &Self::Act,
        key_valid: Option<&Self::Ints>,
        s: AttnShape,
    ) -> Result<()> {
        let op = "attention";
        let AttnShape { b, t, nh, nkv, hd } = s;
        if !ATTN_HEAD_DIMS.contains(&hd) {
            bail!("{op}: head dim {hd} is not supported by the CUDA attention kernel (supported: {ATTN_HEAD_DIMS:?})");
        }
        if nkv == 0 || nh % nkv != 0 {
            bail!("{op}: NH = {nh} must be a positive multiple of NKV = {nkv}");
        }
        let rows = b * t;
        check_len(op, "out", out.len(), rows * nh * hd)?;
        check_len(op, "qkv", qkv.len(), rows * (nh + 2 * nkv) * hd)?;
        if let Some(kv) = key_valid {
            check_len(op, "key_valid", kv.len(), rows)?;
        }
        if rows == 0 || nh == 0 {
            return Ok(());
        }
        let o = dptr_mut(out, &self.stream);
        let q = dptr(qkv, &self.stream);
        let kv: u64 = key_valid.map(|k| dptr(k, &self.stream)).unwrap_or(0);
        if let Some(chunk) = attn_split_chunk(t) {
            let stride = (nh + 2 * nkv) * hd;
            let (k, v) = (q + (nh * hd * 2) as u64, q + ((nh + nkv) * hd * 2) as u64);
            let a = SplitArgs {
                q,
                k,
                v,
                key_valid: kv,
                qstride: stride,
                kvstride: stride,
                b,
                tq: t,
                l: t,
                nh,
                nkv,
                hd,
                chunk,
            };
            return self.attention_split(op, o, a);
        }
        let (b_, t_, nh_, nkv_, hd_) = (
            int(op, "b", b)?,
            int(op, "t", t)?,
            int(op, "nh", nh)?,
            int(op, "nkv", nkv)?,
            int(op, "hd", hd)?,
        );
        launch!(
            self,
            op,
            self.k.attention,
            attention_geom(op, b, t, nh)?,
            o,
            q,
            kv,
            b_,
            t_,
            nh_,
            nkv_,
            hd_
        )
    }

    fn kv_store(
        &self,
        k_cache: &mut Self::Act,
        v_cache: &mut Self::Act,
        qkv: &Self::Act,
        q0: usize,
        s: CachedAttnShape,
    ) -> Result<()> {
        let op = "kv_store";
        let CachedAttnShape {
            b,
            tq,
            l,
            nh,
            nkv,
            hd,
        } = s;
        if q0 + tq > l {
            bail!(
                "{op}: query rows [{q0}, {}) exceed the cache length {l}",
                q0 + tq
            );
        }
        check_len(op, "qkv", qkv.len(), b * tq * (nh + 2 * nkv) * hd)?;
        check_len(op, "k_cache", k_cache.len(), b * l * nkv * hd)?;
        check_len(op, "v_cache", v_cache.len(), b * l * nkv * hd)?;
        if b * tq == 0 || nkv * hd == 0 {
            return Ok(());
        }
        let kc = dptr_mut(k_cache, &self.stream);
        let vc = dptr_mut(v_cache, &self.stream);
        let q = dptr(qkv, &self.stream);
        let (b_, tq_, l_, q0_, nh_, nkv_, hd_) = (
            int(op, "b", b)?,
            int(op, "tq", tq)?,
            int(op, "l", l)?,
            int(op, "q0", q0)?,
            int(op, "nh", nh)?,
            int(op, "nkv", nkv)?,
            int(op, "hd", hd)?,
        );
        int(op, "b·tq", b * tq)?;
        launch!(
            self,
            op,
            self.k.kv_store,
            rows_geom(b * tq, 256),
            kc,
            vc,
            q,
            b_,
            tq_,
            l_,
            q0_,
            nh_,
            nkv_,
            hd_
        )
    }

    fn attention_cached(
        &self,
        out: &mut Self::Act,
        qkv: &Self::Act,
        k_cache: &Self::Act,
        v_cache: &Self::Act,
        key_valid: Option<&Self::Ints>,
        s: CachedAttnShape,
    ) -> Result<()> {
        let op = "attention_cached";
        let CachedAttnShape {
            b,
            tq,
            l,
            nh,
            nkv,
            hd,
        } = s;
        if !ATTN_HEAD_DIMS.contains(&hd) {
            bail!("{op}: head dim {hd} is not supported by the CUDA attention kernel (supported: {ATTN_HEAD_DIMS:?})");
        }
        if nkv == 0 || nh % nkv != 0 {
            bail!("{op}: NH = {nh} must be a positive multiple of NKV = {nkv}");
        }
        if tq > l {
            bail!("{op}: {tq} queries per row exceed the {l} cached keys");
        }
        check_len(op, "out", out.len(), b * tq * nh * hd)?;
        check_len(op, "qkv", qkv.len(), b * tq * (nh + 2 * nkv) * hd)?;
        check_len(op, "k_cache", k_cache.len(), b * l * nkv * hd)?;
        check_len(op, "v_cache", v_cache.len(), b * l * nkv * hd)?;
        if let Some(kv) = key_valid {
            check_len(op, "key_valid", kv.len(), b * l)?;
        }
        if b * tq == 0 || nh == 0 {
            return Ok(());
        }
        let o = dptr_mut(out, &self.stream);
        let q = dptr(qkv, &self.stream);
        let kc = dptr(k_cache, &self.stream);
        let vc = dptr(v_cache, &self.stream);
        let kv: u64 = key_valid.map(|k| dptr(k, &self.stream)).unwrap_or(0);
        if let Some(chunk) = attn_split_chunk(l) {
            let a = SplitArgs {
                q,
                k: kc,
                v: vc,
                key_valid: kv,
                qstride: (nh + 2 * nkv) * hd,
                kvstride: nkv * hd,
                b,
                tq,
                l,
                nh,
                nkv,
                hd,
                chunk,
            };
            return self.attention_split(op, o, a);
        }
        let (b_, tq_, l_, nh_, nkv_, hd_) = (
            int(op, "b", b)?,
            int(op, "tq", tq)?,
            int(op, "l", l)?,
            int(op, "nh", nh)?,
            int(op, "nkv", nkv)?,
            int(op, "hd", hd)?,
        );
        launch!(
            self,
            op,
            self.k.attention_cached,
            attention_geom(op, b, tq, nh)?,
            o,
            q,
            kc,
            vc,
            kv,
            b_,
            tq_,
            l_,
            nh_,
            nkv_,
            hd_
        )
    }

    fn swiglu(&self, out: &mut Self::Act, gate_up: &Self::Act, n: usize, f: usize) -> Result<()> {
        let op = "swiglu";
        check_len(op, "out", out.len(), n * f)?;
        check_len(op, "gate_up", gate_up.len(), n * 2 * f)?;
        if n * f == 0 {
            return Ok(());
        }
        let (o, g) = (dptr_mut(out, &self.stream), dptr(gate_up, &self.stream));
        // The kernel indexes elements in 64 bits: only n and f themselves are ints.
        let (n_, f_) = (int(op, "n", n)?, int(op, "f", f)?);
        launch!(self, op, self.k.swiglu, stride_geom(n * f), o, g, n_, f_)
    }

    fn gather_rows(
        &self,
        out: &mut Self::Act,
        x: &Self::Act,
        rows: &Self::Ints,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        let op = "gather_rows";
        check_len(op, "out", out.len(), nrows * c)?;
        check_len(op, "rows", rows.len(), nrows)?;
        check_len(op, "x", x.len(), c)?;
        if nrows == 0 || c == 0 {
            return Ok(());
        }
        self.check_ints(op, "rows", rows, nrows, x.len() / c, "the rows of `x`")?;
        let (o, xp, r) = (
            dptr_mut(out, &self.stream),
            dptr(x, &self.stream),
            dptr(rows, &self.stream),
        );
        let (nr, c_) = (int(op, "nrows", nrows)?, int(op, "c", c)?);
        launch!(
            self,
            op,
            self.k.gather_rows,
            rows_geom(nrows, ROW_THREADS),
            o,
            xp,
            r,
            nr,
            c_
        )
    }

    fn select(
        &self,
        tok: &mut Self::Ints,
        conf: &mut Self::F32s,
        logits: &mut Self::Act,
        keys: &Self::Ints,
        r: usize,
        v: usize,
        p: &SelectParams,
    ) -> Result<()> {
        let op = "select";
        if p.dtype != DType::BF16 {
            bail!(
                "{op}: SelectParams.dtype is {} but the CUDA backend computes in bf16",
                p.dtype
            );
        }
        let lrows = if p.cfg_scale > 0.0 { 2 * r } else { r };
        check_len(op, "tok", tok.len(), r)?;
        check_len(op, "conf", conf.len(), r)?;
        check_len(op, "logits", logits.len(), lrows * v)?;
        check_len(op, "keys", keys.len(), 2 * r)?;
        // The kernel offsets logit rows in 64 bits; it indexes `keys` at 2·row in int.
        int(op, "2·r", 2 * r)?;
        if r == 0 {
            return Ok(());
        }
        self.forget_ints(tok);
        let opt = |o: Option<u32>, what: &str| -> Result<i32> {
            match o {
                None => Ok(-1),
                Some(t) if (t as usize) < v => Ok(t as i32),
                Some(t) => bail!("{op}: {what} token {t} is outside the vocabulary (V = {v})"),
            }
        };
        let forbid = opt(p.forbid, "forbidden")?;
        let sup0 = opt(p.conf_suppress[0], "suppressed")?;
        let sup1 = opt(p.conf_suppress[1], "suppressed")?;
        let (tp, cp, lp, kp) = (
            dptr_mut(tok, &self.stream),
            dptr_mut(conf, &self.stream),
            dptr_mut(logits, &self.stream),
            dptr(keys, &self.stream),
        );
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        let (temperature, cfg_scale) = (p.temperature, p.cfg_scale);
        let remasking: i32 = match p.remasking {
            Remasking::LowConfidence => 0,
            Remasking::Random => 1,
        };
        let (seed, step) = (p.seed, p.step);
        launch!(
            self,
            op,
            self.k.head_select,
            rows_geom(r, HEAD_THREADS),
            tp,
            cp,
            lp,
            kp,
            r_,
            v_,
            temperature,
            cfg_scale,
            remasking,
            seed,
            step,
            forbid,
            sup0,
            sup1
        )
    }

    fn log_prob(
        &self,
        out: &mut Self::F32s,
        logits: &Self::Act,
        targets: &Self::Ints,
        r: usize,
        v: usize,
        cfg_scale: f64,
    ) -> Result<()> {
        self.launch_log_prob(out, logits, targets, r, v, cfg_scale)
    }

    fn graphs_supported(&self) -> bool {
        true
    }

    fn graph_capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<GraphExec> {
        let g = self.capture(|_| f())?;
        // Upload now so the first replay does not pay for it.
        g.0.upload()
            .map_err(|e| anyhow!("uploading a CUDA graph: {e:?}"))?;
        Ok(GraphExec(Box::new(g)))
    }

    fn graph_replay(&self, g: &GraphExec) -> Result<()> {
        match g.0.downcast_ref::<Graph>() {
            Some(g) => self.replay(g),
            None => bail!("graph_replay: the graph was not captured by the CUDA backend"),
        }
    }

    fn prof_enable(&self, on: bool) {
        let mut p = self.prof.borrow_mut();
        p.on = on;
        let marks = std::mem::take(&mut p.marks);
        p.pool.extend(marks.into_iter().map(|(_, e)| e));
    }

    fn prof_enabled(&self) -> bool {
        self.prof.borrow().on
    }

    fn prof_mark(&self, class: Option<OpClass>) {
        let mut p = self.prof.borrow_mut();
        if !p.on {
            return;
        }
        let ev = match p.pool.pop() {
            Some(e) => e,
            None => match self
                .ctx
                .new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))
            {
                Ok(e) => e,
                // Profiling is best effort: a missing mark merges two intervals.
                Err(_) => return,
            },
        };
        if ev.record(&self.stream).is_err() {
            p.pool.push(ev);
            return;
        }
        p.marks.push((class, ev));
        if class.is_none() && p.marks.len() >= PROF_FOLD {
            let _ = self.prof_fold(&mut p);
        }
    }

    fn prof_take(&self) -> Result<Vec<(OpClass, f64)>> {
        let mut p = self.prof.borrow_mut();
        self.prof_fold(&mut p)?;
        let out = OpClass::ALL
            .iter()
            .filter(|&&c| p.seen[c as usize])
            .map(|&c| (c, p.totals[c as usize]))
            .collect();
        p.totals = Default::default();
        p.seen = Default::default();
        Ok(out)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            driver_err(
                "CUDA stream synchronize failed (an earlier kernel faulted?)".into(),
                e,
            )
        })
    }

    fn memory_in_use(&self) -> Option<usize> {
        self.mem_info()
            .ok()
            .map(|(free, total)| total.saturating_sub(free))
    }

    fn memory_free(&self) -> Option<usize> {
        self.mem_info().ok().map(|(free, _)| free)
    }

    fn driver(&self) -> String {
        match driver_version() {
            Ok((a, b)) => format!("CUDA {a}.{b}"),
            Err(_) => "CUDA (version unknown)".to_string(),
        }
    }
}

/// Head dims the attention kernel is instantiated for.
pub const ATTN_HEAD_DIMS: [usize; 2] = [64, 128];

/// Attention launch geometry, as documented in `kernels/attention.cu`: grid (⌈T/64⌉, NH, B),
/// block 128 (4 warps × 16 query rows), static shared memory only. NH and B are grid y and z.
fn attention_geom(op: &str, b: usize, t: usize, nh: usize) -> Result<Geom> {
    const BLOCK_Q: usize = 64;
    Ok(Geom {
        grid: (
            t.div_ceil(BLOCK_Q) as u32,
            grid_yz(op, "nh", nh)?,
            grid_yz(op, "b", b)?,
        ),
        block: (128, 1, 1),
        smem: 0,
    })
}

/// Keys per split of the split-KV attention path.
pub const ATTN_SPLIT_CHUNK: usize = 96;
/// Split-KV is used for more than this many keys (fewer: the single-pass kernel).
pub const ATTN_SPLIT_MIN_KEYS: usize = 2 * ATTN_SPLIT_CHUNK;
/// f32 elements of the split-KV scratch (64 MiB, allocated once per backend).
const ATTN_SCRATCH: usize = 16 << 20;

/// The split-KV chunk for `l` keys, or `None` for the single-pass kernel. A function of `l`
/// alone: a query row's result must not depend on how many other rows share the call (the
/// cached span rows equal the full pass's rows bit for bit, reference §7 / tests/cache.rs).
pub fn attn_split_chunk(l: usize) -> Option<usize> {
    (l > ATTN_SPLIT_MIN_KEYS).then_some(ATTN_SPLIT_CHUNK)
}

/// One split-KV attention call (device addresses in bytes, strides in elements).
#[derive(Clone, Copy)]
struct SplitArgs {
    q: u64,
    k: u64,
    v: u64,
    key_valid: u64,
    qstride: usize,
    kvstride: usize,
    b: usize,
    tq: usize,
    l: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    chunk: usize,
}

/// Threads per block of `log_prob_bf16`.
const LOG_PROB_THREADS: u32 = 1024;

impl CudaBackend {
    /// Split-KV attention (kernels/attention.cu): partials into the fixed scratch, then the
    /// combine kernel into `out` (`[B·TQ, NH·HD]` at address `out`). Calls whose partials
    /// exceed the scratch run as several launches over groups of batch rows or query rows
    /// (rows are independent, so the result is the same).
    fn attention_split(&self, op: &str, out: u64, a: SplitArgs) -> Result<()> {
        let splits = a.l.div_ceil(a.chunk);
        let per_row = splits * a.nh * (a.hd + 2);
        let cap_rows = ATTN_SCRATCH / per_row;
        if cap_rows == 0 {
            bail!(
                "{op}: one query row needs {per_row} f32 of split-KV scratch, more than the {ATTN_SCRATCH} available (L = {}, NH = {}, HD = {})",
                a.l,
                a.nh,
                a.hd
            );
        }
        // Blocks (qt, h, b·splits + s): NH and (batch rows)·splits are grid y and z.
        grid_yz(op, "nh", a.nh)?;
        let max_b = GRID_YZ_MAX / splits;
        if max_b == 0 {
            bail!(
                "{op}: {splits} key splits (L = {}) exceed CUDA's grid limit of {GRID_YZ_MAX}",
                a.l
            );
        }
        let scratch = dptr(&self.attn_scratch, &self.stream);
        let esz = 2u64; // bf16 bytes
                        // Groups: (first batch row, batch rows, first query row, query rows).
        let launch_group = |b0: usize, nb: usize, i0: usize, nq: usize| -> Result<()> {
            let rows = nb * nq;
            let q = a.q + ((b0 * a.tq + i0) * a.qstride) as u64 * esz;
            let k = a.k + (b0 * a.l * a.kvstride) as u64 * esz;
            let v = a.v + (b0 * a.l * a.kvstride) as u64 * esz;
            let kv = if a.key_valid == 0 {
                0
            } else {
                a.key_valid + (b0 * a.l * 4) as u64
            };
            let o_out = out + ((b0 * a.tq + i0) * a.nh * a.hd) as u64 * esz;
            let part_o = scratch;
            let part_ml = scratch + (splits * rows * a.nh * a.hd * 4) as u64;
            let (qs, ks) = (a.qstride as i64, a.kvstride as i64);
            let (b_, tq_, l_, nh_, nkv_, hd_, ch_, sp_) = (
                int(op, "b", nb)?,
                int(op, "tq", nq)?,
                int(op, "l", a.l)?,
                int(op, "nh", a.nh)?,
                int(op, "nkv", a.nkv)?,
                int(op, "hd", a.hd)?,
                int(op, "chunk", a.chunk)?,
                int(op, "splits", splits)?,
            );
            let g = Geom {
                grid: (
                    nq.div_ceil(64) as u32,
                    grid_yz(op, "nh", a.nh)?,
                    grid_yz(op, "b·splits", nb * splits)?,
                ),
                block: (128, 1, 1),
                smem: 0,
            };
            let (po, pm) = (part_o, part_ml);
            launch!(
                self,
                op,
                self.k.attention_split,
                g,
                po,
                pm,
                q,
                k,
                v,
                kv,
                qs,
                ks,
                b_,
                tq_,
                l_,
                nh_,
                nkv_,
                hd_,
                ch_,
                sp_
            )?;
            let rows_ = int(op, "rows", rows)?;
            let cg = Geom {
                grid: (rows as u32, grid_yz(op, "nh", a.nh)?, 1),
                block: (a.hd as u32, 1, 1),
                smem: 0,
            };
            launch!(
                self,
                op,
                self.k.attention_combine,
                cg,
                o_out,
                po,
                pm,
                rows_,
                nh_,
                hd_,
                sp_
            )
        };
        if cap_rows >= a.b * a.tq && a.b <= max_b {
            launch_group(0, a.b, 0, a.tq)
        } else if cap_rows >= a.tq {
            let per = (cap_rows / a.tq).min(max_b);
            let mut b0 = 0;
            while b0 < a.b {
                let nb = per.min(a.b - b0);
                launch_group(b0, nb, 0, a.tq)?;
                b0 += nb;
            }
            Ok(())
        } else {
            for b0 in 0..a.b {
                let mut i0 = 0;
                while i0 < a.tq {
                    let nq = cap_rows.min(a.tq - i0);
                    launch_group(b0, 1, i0, nq)?;
                    i0 += nq;
                }
            }
            Ok(())
        }
    }

    /// A kernel function by symbol, looked up in the loaded modules (a driver hash lookup).
    fn kernel_fn(&self, sym: &str) -> Result<dsys::CUfunction> {
        let c = CString::new(sym).map_err(|_| anyhow!("bad symbol {sym:?}"))?;
        for m in &self._modules {
            // SAFETY: `m.raw` is a module this backend keeps loaded.
            if let Ok(f) = unsafe { dres::module::get_function(m.raw, c.clone()) } {
                return Ok(f);
            }
        }
        bail!("kernel symbol `{sym}` not found in the compiled modules")
    }

    /// Launcher of `kernels/log_prob.cu` ([`Backend::log_prob`]).
    fn launch_log_prob(
        &self,
        out: &mut CudaSlice<f32>,
        logits: &CudaSlice<bf16>,
        targets: &CudaSlice<i32>,
        r: usize,
        v: usize,
        cfg_scale: f64,
    ) -> Result<()> {
        let op = "log_prob";
        if !(cfg_scale.is_finite() && cfg_scale >= 0.0) {
            bail!("{op}: cfg_scale must be finite and >= 0, got {cfg_scale}");
        }
        let lrows = if cfg_scale > 0.0 { 2 * r } else { r };
        check_len(op, "out", out.len(), r)?;
        check_len(op, "logits", logits.len(), lrows * v)?;
        check_len(op, "targets", targets.len(), r)?;
        // The kernel offsets logit rows (up to 2·r with CFG) in 64 bits: only r, v are ints.
        int(op, "rows", lrows)?;
        self.check_ints(op, "targets", targets, r, v, "the vocabulary")?;
        if r == 0 {
            return Ok(());
        }
        let f = self.kernel_fn("log_prob_bf16")?;
        let (op_, lp, tp) = (
            dptr_mut(out, &self.stream),
            dptr(logits, &self.stream),
            dptr(targets, &self.stream),
        );
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        launch!(
            self,
            op,
            f,
            rows_geom(r, LOG_PROB_THREADS),
            op_,
            lp,
            tp,
            r_,
            v_,
            cfg_scale
        )
    }
}

// Accessors for the training path (`crate::train::cuda`), which launches its own f32 kernels
// on this backend's context, stream and cuBLAS handle.
impl CudaBackend {
    /// A kernel of the compiled modules by symbol (e.g. `rms_norm_bwd_f32`).
    pub fn function(&self, sym: &str) -> Result<dsys::CUfunction> {
        self.kernel_fn(sym)
    }

    /// The cuBLAS handle bound to [`CudaBackend::stream`] (workspace set, reduced-precision
    /// reductions disallowed).
    pub fn blas_handle(&self) -> cublas::sys::cublasHandle_t {
        *self.blas.handle()
    }
}
