//! Device setup: driver probes, the context, stream, kernel modules and cuBLAS handle, memory
//! (allocation, copies). Int buffers and their host-side bounds checks are in `ints`.

use super::*;

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
pub(crate) fn catch<T>(
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
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

/// A loaded module (unloaded on drop).
pub(crate) struct Module {
    pub(crate) stem: String,
    pub(crate) raw: dsys::CUmodule,
    pub(crate) ctx: Arc<CudaContext>,
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `raw` came from cuModuleLoadData and is unloaded exactly once, here.
        let _ = unsafe { dres::module::unload(self.raw) };
    }
}

pub(crate) const MIB: f64 = 1024.0 * 1024.0;

/// Elements per staging chunk when converting weights on upload (64 MiB of f32).
pub(crate) const CHUNK: usize = 16 << 20;

/// cuBLAS workspace, preallocated so GEMMs never allocate (required inside graph capture).
pub(crate) const BLAS_WORKSPACE: usize = 32 << 20;

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
        let k = Kernels::load(get)?;
        let fa2 = Fa2Kernels::load(&get, &ctx)?;
        let attn_impl = std::cell::Cell::new(AttnImpl::from_env()?);
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
            fp8: Default::default(),
            gemm_lt: RefCell::new(lt::LtBf16::for_impl(lt::GemmImpl::from_env()?, &stream)?),
            blas,
            _blas_workspace: ws,
            k,
            _modules: modules,
            stream,
            ctx,
            device_id,
            device_name,
            prof: RefCell::new(CudaProf::default()),
            attn_scratch,
            attn_impl,
            fa2,
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

    /// Error unless `bytes` more device bytes are likely to fit (checked for ≥ 16 MiB requests).
    pub(crate) fn ensure_free(&self, what: &str, bytes: usize) -> Result<()> {
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

    pub(crate) fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
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

    pub(crate) fn htod<T>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: callers pass a destination with room for `src.len()` elements; a copy from
        // pageable memory returns after the source has been staged.
        unsafe { dres::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| driver_err("host→device copy".into(), e))
    }

    pub(crate) fn dtoh<T: Clone + Default>(&self, src: u64, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.dtoh_into(src, &mut out)?;
        Ok(out)
    }

    /// Copy `dst.len()` elements from device address `src` into `dst`, then synchronize.
    pub(crate) fn dtoh_into<T>(&self, src: u64, dst: &mut [T]) -> Result<()> {
        if !dst.is_empty() {
            // SAFETY: callers checked the source holds `dst.len()` elements; we synchronize
            // before `dst` is used.
            unsafe { dres::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
                .map_err(|e| driver_err("device→host copy".into(), e))?;
        }
        self.synchronize()
    }

    /// A kernel function by symbol, looked up in the loaded modules (a driver hash lookup).
    pub(crate) fn kernel_fn(&self, sym: &str) -> Result<dsys::CUfunction> {
        let c = CString::new(sym).map_err(|_| anyhow!("bad symbol {sym:?}"))?;
        for m in &self._modules {
            // SAFETY: `m.raw` is a module this backend keeps loaded.
            if let Ok(f) = unsafe { dres::module::get_function(m.raw, c.clone()) } {
                return Ok(f);
            }
        }
        bail!("kernel symbol `{sym}` not found in the compiled modules")
    }

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
