//! The launch convention shared by every CUDA op (inference and training): launch geometry,
//! the `launch!` macro, and the argument checks (lengths, int ranges, grid and shared-memory
//! limits) with errors that name the op and the argument.

use super::*;

/// Launch geometry of one kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub(crate) grid: (u32, u32, u32),
    pub(crate) block: (u32, u32, u32),
    pub(crate) smem: u32,
}

impl Geom {
    /// `grid` blocks of `block` threads (1-D blocks) with `smem` bytes of dynamic shared memory.
    pub(crate) fn new(grid: (u32, u32, u32), block: u32, smem: u32) -> Geom {
        Geom {
            grid,
            block: (block, 1, 1),
            smem,
        }
    }
}

/// Blocks of 256 threads covering `numel` elements, at most `cap` (grid-stride kernels loop).
pub(crate) fn stride_blocks(numel: usize, cap: usize) -> u32 {
    numel.div_ceil(256).clamp(1, cap) as u32
}

pub(crate) fn rows_geom(rows: usize, threads: u32) -> Geom {
    Geom {
        grid: (rows as u32, 1, 1),
        block: (threads, 1, 1),
        smem: 0,
    }
}

/// Grid-stride launch: enough blocks of 256 to cover `numel`, capped (the kernels loop).
pub(crate) fn stride_geom(numel: usize) -> Geom {
    Geom {
        grid: (stride_blocks(numel, 132 * 32), 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

/// `launch!(stream, name, function, geom; args...)`: launch `function` with `geom` on `stream`
/// (the one launch convention of inference and training). Each argument is an expression,
/// evaluated once and in order into a local that lives until the launch returns (the driver
/// reads the kernel's parameters through pointers to them).
macro_rules! launch {
    ($stream:expr, $name:expr, $f:expr, $g:expr; $($arg:expr),+ $(,)?) => {{
        let mut params: Vec<*mut std::ffi::c_void> = Vec::new();
        $(
            let a = $arg;
            params.push(&a as *const _ as *mut std::ffi::c_void);
        )+
        let g: $crate::backend::cuda::Geom = $g;
        // SAFETY: `$f` is a function of a module the backend keeps loaded; the argument list
        // matches the kernel's signature in kernels/ABI.md (checked by the parity tests); every
        // pointer argument is a live device allocation whose length the launcher validated; the
        // argument locals outlive the call (shadowed bindings live to the end of the block).
        unsafe {
            cudarc::driver::result::launch_kernel(
                $f,
                g.grid,
                g.block,
                g.smem,
                $stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| $crate::backend::cuda::driver_err(format!("{}: kernel launch failed", $name), e))
    }};
}
pub(crate) use launch;

/// `kernel_table!(Name { field: "symbol", ... })`: the struct of a backend's kernel handles and
/// its `load`, which looks every symbol up through `get` — one line per kernel, so a kernel's
/// field and symbol are declared once.
macro_rules! kernel_table {
    ($(#[$m:meta])* $name:ident { $($field:ident: $sym:literal),+ $(,)? }) => {
        $(#[$m])*
        pub(crate) struct $name {
            $(pub(crate) $field: cudarc::driver::sys::CUfunction,)+
        }

        impl $name {
            /// Every kernel of the table, looked up by `get` (whose error names a missing symbol).
            pub(crate) fn load(
                get: impl Fn(&str) -> anyhow::Result<cudarc::driver::sys::CUfunction>,
            ) -> anyhow::Result<Self> {
                Ok($name { $($field: get($sym)?,)+ })
            }
        }
    };
}
pub(crate) use kernel_table;

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

/// [`check_len`] over a table of `(argument, elements held, elements needed)`, in order.
pub(crate) fn check_lens(op: &str, args: &[(&str, usize, usize)]) -> Result<()> {
    for &(arg, have, need) in args {
        check_len(op, arg, have, need)?;
    }
    Ok(())
}

/// The checks of the norms: the weight holds exactly `C` elements, and each `(name, len)` of
/// `args` at least `N·C`.
pub(crate) fn check_norm(op: &str, w: &CudaWeight, s: Norm, args: &[(&str, usize)]) -> Result<()> {
    if w.numel() != s.c {
        bail!(
            "{op}: weight `{}` has {} elements, C = {}",
            w.name,
            w.numel(),
            s.c
        );
    }
    for &(arg, have) in args {
        check_len(op, arg, have, s.n * s.c)?;
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

/// Shared memory a block may use without an opt-in (static plus dynamic).
const SMEM_DEFAULT: usize = 48 * 1024;

/// `Err` naming `op` unless kernel `f` can be launched with `smem` bytes of dynamic shared
/// memory: 48 KiB less the kernel's static shared memory (`CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES`,
/// e.g. the block reductions' 256 bytes), or the function's raised limit
/// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`) when that is larger.
pub(crate) fn check_dyn_smem(
    op: &str,
    f: dsys::CUfunction,
    smem: usize,
    what: &str,
) -> Result<u32> {
    use dsys::CUfunction_attribute as A;
    let attr = |a: A| -> Result<usize> {
        // SAFETY: `f` is a function of a module the caller keeps loaded.
        let v = unsafe { dres::function::get_function_attribute(f, a) }
            .map_err(|e| anyhow!("{op}: querying the kernel's {a:?}: {e:?}"))?;
        Ok(usize::try_from(v).unwrap_or(0))
    };
    let static_smem = attr(A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
    let raised = attr(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)?;
    let max = SMEM_DEFAULT.saturating_sub(static_smem).max(raised);
    if smem > max {
        bail!(
            "{op}: {what} need {smem} bytes of dynamic shared memory, more than the kernel's \
             {max} ({static_smem} bytes of its shared memory are static)"
        );
    }
    Ok(smem as u32)
}

/// A size as the kernels' `int`, or an error naming it.
pub(crate) fn int(op: &str, arg: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| anyhow!("{op}: `{arg}` = {v} exceeds the kernels' 32-bit int range"))
}

impl CudaBackend {
    /// The device address of `s` on this backend's stream (a kernel argument).
    pub(crate) fn ptr<B: DevBuf>(&self, s: &B) -> u64 {
        s.dev_ptr(&self.stream)
    }

    /// The device address of `s`, which the kernel writes (an int buffer's host values are
    /// forgotten: [`DevInts`]).
    pub(crate) fn ptr_mut<B: DevBuf>(&self, s: &mut B) -> u64 {
        s.dev_ptr_mut(&self.stream)
    }
}

pub(crate) fn dptr<B: DevBuf>(s: &B, stream: &CudaStream) -> u64 {
    s.dev_ptr(stream)
}

pub(crate) fn dptr_mut<B: DevBuf>(s: &mut B, stream: &CudaStream) -> u64 {
    s.dev_ptr_mut(stream)
}
