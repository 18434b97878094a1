//! cuBLASLt pieces shared by the FP8 GEMM (`fp8.rs`) and the opt-in bf16 inference GEMM
//! (`LLADA_GEMM=lt`): handle creation, RAII guards of descriptors/layouts/preferences, and the
//! bf16 matmul with one algorithm per shape chosen once by `cublasLtMatmulAlgoGetHeuristic`.
//!
//! **Status of `LLADA_GEMM=lt`: compiled, never run on a GPU.** The default (`cublas`) is the
//! `cublasGemmEx` path of `Gemm` (`gemm.rs`).
//!
//! The bf16 path has the cuBLAS path's semantics: bf16 A/B/C, `CUBLAS_COMPUTE_32F`, f32
//! alpha/beta, the same transposes and leading dimensions, and no reduced-precision reduction
//! (`CUBLASLT_REDUCTION_SCHEME_MASK` limited to `INPLACE | COMPUTE_TYPE`, the cuBLASLt spelling of
//! `CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION` set in `device.rs`: split-K partial sums
//! stay f32). Descriptors, layouts and the algorithm of a shape (with its operands' alignment)
//! live in a bounded cache ([`ShapeCache`], [`LT_SHAPES`] entries): a cache hit allocates
//! nothing and calls no heuristic.
//! A shape first seen while the stream is capturing a graph, or one that finds the cache full,
//! runs on cuBLAS instead (the heuristic never runs during a capture).

use std::cell::RefCell;
use std::ffi::c_void;

use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{sys as dsys, CudaSlice, CudaStream};

use super::launch::dptr_mut;

/// cuBLASLt workspace bytes (FP8 and bf16 GEMMs each own one, preallocated: capturable).
pub(crate) const LT_WORKSPACE: usize = 32 << 20;
/// Shapes the bf16 cuBLASLt cache holds (a model has ~6 GEMM shapes per sequence length).
pub const LT_SHAPES: usize = 64;

/// Which library runs the bf16 inference GEMMs (`LLADA_GEMM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmImpl {
    /// `cublasGemmEx` (the default: `LLADA_GEMM` unset or `cublas`).
    Cublas,
    /// cuBLASLt with a cached per-shape algorithm (`LLADA_GEMM=lt`).
    Lt,
}

impl GemmImpl {
    /// Parse a `LLADA_GEMM` value (`None`: unset).
    pub fn parse(v: Option<&str>) -> Result<GemmImpl> {
        match v {
            None | Some("") | Some("cublas") => Ok(GemmImpl::Cublas),
            Some("lt") => Ok(GemmImpl::Lt),
            Some(o) => bail!("LLADA_GEMM={o:?} is not known: use `cublas` (the default) or `lt`"),
        }
    }

    /// `LLADA_GEMM` from the environment.
    pub fn from_env() -> Result<GemmImpl> {
        match std::env::var("LLADA_GEMM") {
            Ok(v) => GemmImpl::parse(Some(&v)),
            Err(std::env::VarError::NotPresent) => Ok(GemmImpl::Cublas),
            Err(e) => bail!("LLADA_GEMM: {e}"),
        }
    }
}

/// A GEMM shape as cuBLAS sees it: (transa, transb, m, n, k, lda, ldb, ldc), and the byte
/// alignment of the A, B and C addresses ([`ShapeKey::align_of`]): the algorithm is chosen for
/// that alignment (cuBLASLt's heuristic assumes 256 bytes unless told).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShapeKey {
    pub ta: bool,
    pub tb: bool,
    pub mnk: [usize; 3],
    pub lds: [usize; 3],
    pub align: [u32; 3],
}

impl ShapeKey {
    /// The largest power of two up to 256 dividing the device address `a` (256 for 0).
    pub fn align_of(a: u64) -> u32 {
        if a == 0 {
            256
        } else {
            1u32 << a.trailing_zeros().min(8)
        }
    }
}

/// A map from shapes to values holding at most `cap` entries, its storage reserved up front:
/// lookups and inserts below the bound never allocate; an insert into a full cache is refused.
pub struct ShapeCache<V> {
    keys: Vec<ShapeKey>,
    vals: Vec<V>,
}

impl<V> ShapeCache<V> {
    pub fn new(cap: usize) -> ShapeCache<V> {
        ShapeCache {
            keys: Vec::with_capacity(cap),
            vals: Vec::with_capacity(cap),
        }
    }

    pub fn get(&self, k: &ShapeKey) -> Option<&V> {
        let i = self.keys.iter().position(|x| x == k)?;
        self.vals.get(i)
    }

    /// Whether another shape fits.
    pub fn has_room(&self) -> bool {
        self.keys.len() < self.keys.capacity()
    }

    /// Store `v` for `k` (the caller checked it is absent); `false` (and `v` dropped) when full.
    pub fn insert(&mut self, k: ShapeKey, v: V) -> bool {
        if !self.has_room() {
            return false;
        }
        self.keys.push(k);
        self.vals.push(v);
        true
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// RAII guards: each owns one cuBLASLt object and destroys it once on drop.
macro_rules! guard {
    ($($(#[$doc:meta])* $name:ident($t:ty) = $destroy:path;)*) => {$(
        $(#[$doc])*
        pub(crate) struct $name(pub $t);
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created once by the matching `create_*` call, destroyed once here.
                let _ = unsafe { $destroy(self.0) };
            }
        }
    )*};
}
guard! {
    /// A cuBLASLt handle.
    Handle(ltsys::cublasLtHandle_t) = lt::destroy_handle;
}
impl Handle {
    pub fn new() -> Result<Handle> {
        // SAFETY: dlopen probe only.
        if !unsafe { ltsys::is_culib_present() } {
            bail!("cuBLASLt (libcublasLt.so.13) was not found on the library path");
        }
        let h = lt::create_handle().map_err(|e| anyhow!("creating the cuBLASLt handle: {e:?}"))?;
        Ok(Handle(h))
    }
}
guard! {
    /// A matmul descriptor.
    Desc(ltsys::cublasLtMatmulDesc_t) = lt::destroy_matmul_desc;
    /// A matrix layout.
    Layout(ltsys::cublasLtMatrixLayout_t) = lt::destroy_matrix_layout;
    /// A matmul preference.
    Pref(ltsys::cublasLtMatmulPreference_t) = lt::destroy_matmul_pref;
}

/// Set one attribute of a cuBLASLt object with its `set_*_attribute` call.
fn set_attr<H, A: std::fmt::Debug + Copy, T>(
    set: unsafe fn(H, A, *const c_void, usize) -> Result<(), lt::CublasError>,
    h: H,
    attr: A,
    v: &T,
) -> Result<()> {
    // SAFETY: `h` is a live object (its guard), `v` a live value of the attribute's type and size.
    unsafe {
        set(
            h,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| anyhow!("cuBLASLt: setting {attr:?}: {e:?}"))
}

/// Set one attribute of a matmul descriptor.
pub(crate) fn set_desc<T>(d: &Desc, a: ltsys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    set_attr(lt::set_matmul_desc_attribute, d.0, a, v)
}

/// An f32-compute (`CUBLAS_COMPUTE_32F`, f32 scale) descriptor with the given transposes.
pub(crate) fn desc_32f(ta: bool, tb: bool) -> Result<Desc> {
    use cudarc::cublas::sys::cublasOperation_t as Op;
    use ltsys::cublasLtMatmulDescAttributes_t as A;
    let desc = Desc(
        lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ltsys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| anyhow!("cuBLASLt matmul descriptor: {e:?}"))?,
    );
    let t = |x: bool| if x { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
    set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &t(ta))?;
    set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &t(tb))?;
    Ok(desc)
}

/// A column-major `rows × cols` layout of type `t`, leading dimension `ld`.
pub(crate) fn layout(
    t: ltsys::cudaDataType_t,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<Layout> {
    Ok(Layout(
        lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
            .map_err(|e| anyhow!("cuBLASLt layout: {e:?}"))?,
    ))
}

/// Set one attribute of a matmul preference.
fn set_pref<T>(p: &Pref, a: ltsys::cublasLtMatmulPreferenceAttributes_t, v: &T) -> Result<()> {
    set_attr(lt::set_matmul_pref_attribute, p.0, a, v)
}

/// The first algorithm `cublasLtMatmulAlgoGetHeuristic` proposes within [`LT_WORKSPACE`] bytes
/// of workspace and the further u32 preferences `prefs` (reduction schemes, alignments).
pub(crate) fn heuristic(
    handle: ltsys::cublasLtHandle_t,
    desc: &Desc,
    [la, lb, lc]: [&Layout; 3],
    prefs: &[(ltsys::cublasLtMatmulPreferenceAttributes_t, u32)],
) -> Result<ltsys::cublasLtMatmulAlgo_t> {
    use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
    let pref = Pref(lt::create_matmul_pref().map_err(|e| anyhow!("cuBLASLt preference: {e:?}"))?);
    set_pref(
        &pref,
        P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
        &(LT_WORKSPACE as u64),
    )?;
    for (attr, v) in prefs {
        set_pref(&pref, *attr, v)?;
    }
    // SAFETY: every descriptor is live (guards).
    let h =
        unsafe { lt::get_matmul_algo_heuristic(handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0) }
            .map_err(|e| {
                anyhow!("cuBLASLt proposes no algorithm for this GEMM on this GPU: {e:?}")
            })?;
    Ok(h.algo)
}

/// One `cublasLtMatmul` `D = alpha·op(A)·op(B) + beta·C` with `C = D` in place, on the device
/// addresses `[a, b, d]` and a workspace of [`LT_WORKSPACE`] bytes at `ws`.
///
/// # Safety
/// The addresses must be live device allocations of the sizes the layouts describe.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    handle: ltsys::cublasLtHandle_t,
    desc: &Desc,
    [la, lb, ld]: [&Layout; 3],
    [a, b, d]: [u64; 3],
    [alpha, beta]: [f32; 2],
    algo: &ltsys::cublasLtMatmulAlgo_t,
    ws: u64,
    stream: &CudaStream,
) -> Result<()> {
    lt::matmul(
        handle,
        desc.0,
        &alpha as *const f32 as *const c_void,
        &beta as *const f32 as *const c_void,
        a as *const c_void,
        la.0,
        b as *const c_void,
        lb.0,
        d as *const c_void,
        ld.0,
        d as *mut c_void,
        ld.0,
        algo,
        ws as *mut c_void,
        LT_WORKSPACE,
        stream.cu_stream() as ltsys::cudaStream_t,
    )
    .map_err(|e| anyhow!("cublasLtMatmul failed: {e:?}"))
}

/// One cached shape: its descriptor, layouts (A, B, C = D) and algorithm.
struct Plan {
    desc: Desc,
    layouts: [Layout; 3],
    algo: ltsys::cublasLtMatmulAlgo_t,
}

/// The bf16 cuBLASLt GEMM state of a backend (`LLADA_GEMM=lt`). Field order is drop order: the
/// cached descriptors before the handle.
pub(crate) struct LtBf16 {
    plans: RefCell<ShapeCache<Plan>>,
    ws: RefCell<CudaSlice<u8>>,
    handle: Handle,
}

impl LtBf16 {
    pub fn new(stream: &std::sync::Arc<CudaStream>) -> Result<LtBf16> {
        let handle = Handle::new()?;
        let ws = stream
            .alloc_zeros::<u8>(LT_WORKSPACE)
            .map_err(|e| anyhow!("allocating the cuBLASLt workspace: {e:?}"))?;
        Ok(LtBf16 {
            plans: RefCell::new(ShapeCache::new(LT_SHAPES)),
            ws: RefCell::new(ws),
            handle,
        })
    }

    /// Run the bf16 GEMM `g` (bf16 A/B/C, f32 compute) with cuBLASLt. `Ok(false)`: not run (a
    /// shape first seen during a graph capture, or the cache is full): the caller runs cuBLAS.
    pub fn run(&self, op: &str, g: &super::gemm::Gemm, stream: &CudaStream) -> Result<bool> {
        let key = ShapeKey {
            ta: g.ta,
            tb: g.tb,
            mnk: [g.m, g.n, g.k],
            lds: [g.lda.max(1), g.ldb.max(1), g.ldc.max(1)],
            align: [g.a, g.b, g.c].map(ShapeKey::align_of),
        };
        let mut plans = self.plans.borrow_mut();
        if plans.get(&key).is_none() {
            let capturing = stream
                .capture_status()
                .map_err(|e| anyhow!("{op}: querying the stream's capture status: {e:?}"))?;
            if capturing != dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
                || !plans.has_room()
            {
                return Ok(false);
            }
            let plan = self
                .plan(&key)
                .map_err(|e| anyhow!("{op}: cuBLASLt bf16 GEMM {key:?}: {e}"))?;
            plans.insert(key, plan);
        }
        let plan = plans
            .get(&key)
            .ok_or_else(|| anyhow!("{op}: cuBLASLt plan missing after insert"))?;
        let mut ws = self.ws.borrow_mut();
        let wsp = dptr_mut(&mut *ws, stream);
        let [la, lb, lc] = &plan.layouts;
        // SAFETY: the caller validated the operands against (m, n, k) and the leading dimensions
        // the layouts describe; the workspace holds LT_WORKSPACE bytes.
        unsafe {
            matmul(
                self.handle.0,
                &plan.desc,
                [la, lb, lc],
                [g.a, g.b, g.c],
                [g.alpha, g.beta],
                &plan.algo,
                wsp,
                stream,
            )
        }
        .map_err(|e| anyhow!("{op}: bf16 m {} n {} k {}: {e}", g.m, g.n, g.k))?;
        Ok(true)
    }

    fn plan(&self, key: &ShapeKey) -> Result<Plan> {
        use ltsys::cublasLtReductionScheme_t as R;
        let bf = ltsys::cudaDataType_t::CUDA_R_16BF;
        let ([m, n, k], [lda, ldb, ldc]) = (key.mnk, key.lds);
        // op(A) is m×k: A is stored k×m when transposed.
        let (ar, ac) = if key.ta { (k, m) } else { (m, k) };
        let (br, bc) = if key.tb { (n, k) } else { (k, n) };
        let desc = desc_32f(key.ta, key.tb)?;
        let layouts = [
            layout(bf, ar, ac, lda)?,
            layout(bf, br, bc, ldb)?,
            layout(bf, m, n, ldc)?,
        ];
        // Split-K reductions in place or in the f32 compute type, never in bf16 output.
        let mask = R::CUBLASLT_REDUCTION_SCHEME_INPLACE as u32
            | R::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
        use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
        let [aa, ab, ac] = key.align;
        let prefs = [
            (P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, mask),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aa),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ab),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ac),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ac),
        ];
        let [la, lb, lc] = &layouts;
        let algo = heuristic(self.handle.0, &desc, [la, lb, lc], &prefs)?;
        Ok(Plan {
            desc,
            layouts,
            algo,
        })
    }
}

impl LtBf16 {
    /// The state `i` needs: `Some` for [`GemmImpl::Lt`], `None` for cuBLAS.
    pub fn for_impl(i: GemmImpl, stream: &std::sync::Arc<CudaStream>) -> Result<Option<LtBf16>> {
        match i {
            GemmImpl::Cublas => Ok(None),
            GemmImpl::Lt => LtBf16::new(stream).map(Some),
        }
    }
}

impl super::CudaBackend {
    /// Select the library of the bf16 inference GEMMs (default: `LLADA_GEMM`, read at
    /// construction). Switching to `Lt` starts an empty algorithm cache. Call it before capturing
    /// graphs: a captured graph keeps the GEMMs it was captured with.
    pub fn set_gemm_impl(&self, i: GemmImpl) -> Result<()> {
        if i != self.gemm_impl() {
            *self.gemm_lt.borrow_mut() = LtBf16::for_impl(i, self.stream())?;
        }
        Ok(())
    }

    /// The library running the bf16 inference GEMMs.
    pub fn gemm_impl(&self) -> GemmImpl {
        if self.gemm_lt.borrow().is_some() {
            GemmImpl::Lt
        } else {
            GemmImpl::Cublas
        }
    }

    /// Shapes in the bf16 cuBLASLt algorithm cache (0 under cuBLAS).
    pub fn gemm_lt_shapes(&self) -> usize {
        self.gemm_lt
            .borrow()
            .as_ref()
            .map_or(0, |l| l.plans.borrow().len())
    }
}
