//! NCCL, loaded at run time: the GPU gradient all-reduce of data-parallel training.
//!
//! A small binding of its own rather than cudarc's `nccl` module: cudarc's loader looks for
//! `libnccl.so` and `libnccl.so.<CUDA major>`, but NCCL's soname is `libnccl.so.2` — the only
//! file that pip's `nvidia-nccl-cu12`/`-cu13` wheels and most distributions' runtime packages
//! install — and a missing library or a failed destroy panics there. Here every failure is an
//! error that names the library or the call. The library is found by `LLADA_NCCL_LIB` (a path),
//! then `libnccl.so.2` and `libnccl.so` on the loader's search path (`LD_LIBRARY_PATH`).
//!
//! Only what training needs: the version, a unique id (rank 0 makes it, [`super::dist`] hands it
//! out), one communicator per process, grouped in-place f32 sum all-reduces on the training
//! stream, the collectives of sharded optimizer state (ZeRO-1, [`super::zero`]: reduce-scatter
//! and all-gather of flat buffers, and per-range reduce / broadcast for tensors split unevenly,
//! in `nccl_shard.rs`), and destroy.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Result};

type NcclResult = c_int;
type Comm = *mut c_void;

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
}

const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
const NCCL_SUCCESS: NcclResult = 0;
const NCCL_IN_PROGRESS: NcclResult = 7;

/// `ncclAllReduce`: send, receive, count, dtype, op, comm, stream.
type RedFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> NcclResult;
/// `ncclBroadcast`: send, receive, count, dtype, root, comm, stream (the all-reduce's shape).
type BcastFn = RedFn;
/// `ncclReduce`: send, receive, count, dtype, op, root, comm, stream.
type RootRedFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> NcclResult;

/// The NCCL entry points, each declared once (field, C signature, symbol): the [`Api`] table
/// and `bind`, which looks every symbol up in the loaded library.
macro_rules! nccl_api {
    ($($field:ident: $ty:ty = $sym:literal;)*) => {
        struct Api {
            _lib: libloading::Library,
            path: String,
            $($field: $ty,)*
        }

        fn bind(lib: libloading::Library, path: String) -> std::result::Result<Api, String> {
            let missing = |name: &[u8], e: libloading::Error| {
                let name = String::from_utf8_lossy(&name[..name.len() - 1]);
                format!("{path} has no {name}: {e} (not NCCL 2?)")
            };
            $(
                // SAFETY: the signature is NCCL's (nccl.h, stable since 2.x).
                let $field: $ty = *unsafe { lib.get($sym) }.map_err(|e| missing($sym, e))?;
            )*
            Ok(Api {
                $($field,)*
                path,
                _lib: lib,
            })
        }
    };
}

nccl_api! {
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult = b"ncclGetVersion\0";
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult = b"ncclGetUniqueId\0";
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult =
        b"ncclCommInitRank\0";
    all_reduce: RedFn = b"ncclAllReduce\0";
    reduce: RootRedFn = b"ncclReduce\0";
    broadcast: BcastFn = b"ncclBroadcast\0";
    group_start: unsafe extern "C" fn() -> NcclResult = b"ncclGroupStart\0";
    group_end: unsafe extern "C" fn() -> NcclResult = b"ncclGroupEnd\0";
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult = b"ncclCommDestroy\0";
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult = b"ncclCommAbort\0";
    get_async_error: unsafe extern "C" fn(Comm, *mut NcclResult) -> NcclResult =
        b"ncclCommGetAsyncError\0";
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char = b"ncclGetErrorString\0";
}

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

fn load() -> std::result::Result<Api, String> {
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("LLADA_NCCL_LIB") {
        if !p.trim().is_empty() {
            candidates.push(p);
        }
    }
    candidates.push("libnccl.so.2".into());
    candidates.push("libnccl.so".into());
    for c in candidates {
        // SAFETY: loading NCCL runs its (trusted, system-installed) initialisers only.
        match unsafe { libloading::Library::new(&c) } {
            Ok(lib) => return bind(lib, c),
            Err(e) => tried.push(format!("{c}: {e}")),
        }
    }
    Err(format!(
        "NCCL is not available ({}). Install it (e.g. `pip install nvidia-nccl-cu13` and add its \
         nvidia/nccl/lib to LD_LIBRARY_PATH) or point LLADA_NCCL_LIB at libnccl.so.2",
        tried.join("; ")
    ))
}

// The sharded collectives (ZeRO-1).
#[path = "nccl_shard.rs"]
mod shard;
pub use shard::RangeOp;

fn api() -> Result<&'static Api> {
    API.get_or_init(load).as_ref().map_err(|e| anyhow!("{e}"))
}

fn check(a: &Api, r: NcclResult, call: &str) -> Result<()> {
    if r == NCCL_SUCCESS {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static C string for any code.
    let msg = unsafe {
        let p = (a.error_string)(r);
        if p.is_null() {
            "unknown error".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    bail!("{call} failed: NCCL error {r} ({msg}); NCCL_DEBUG=WARN says more")
}

/// Whether NCCL loads, and its version (`major·10000 + minor·100 + patch`) and path.
pub fn version() -> Result<(u32, String)> {
    let a = api()?;
    let mut v: c_int = 0;
    // SAFETY: a valid out-pointer.
    check(a, unsafe { (a.get_version)(&mut v) }, "ncclGetVersion")?;
    Ok((v as u32, a.path.clone()))
}

/// A new unique id (rank 0; needs no GPU).
pub fn unique_id() -> Result<UniqueId> {
    let a = api()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: a valid out-pointer.
    check(a, unsafe { (a.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
    Ok(id)
}

impl UniqueId {
    pub fn to_bytes(&self) -> Vec<u8> {
        self.internal.iter().map(|&c| c as u8).collect()
    }

    pub fn from_bytes(b: &[u8]) -> Result<UniqueId> {
        ensure!(
            b.len() == 128,
            "an NCCL unique id is 128 bytes, got {}",
            b.len()
        );
        let mut id = UniqueId { internal: [0; 128] };
        for (d, &s) in id.internal.iter_mut().zip(b) {
            *d = s as c_char;
        }
        Ok(id)
    }
}

/// One rank's communicator. The CUDA context of its device must be current on the calling
/// thread when it is made and used (the training code binds it first).
pub struct NcclComm {
    comm: Comm,
    pub rank: usize,
    pub world: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time (&mut / owned).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// `ncclCommInitRank`: blocks until all `world` ranks have called it with the same `id`.
    pub fn init(id: &UniqueId, rank: usize, world: usize) -> Result<NcclComm> {
        ensure!(rank < world, "NCCL: rank {rank} of a world of {world}");
        let a = api()?;
        let mut comm: Comm = std::ptr::null_mut();
        let (w, r) = (
            c_int::try_from(world).map_err(|_| anyhow!("world size {world} too large"))?,
            c_int::try_from(rank).map_err(|_| anyhow!("rank {rank} too large"))?,
        );
        // ncclCommInitRank blocks until every rank has called it: a rank that never comes would
        // hold this one forever. It gets the all-reduce's limit (LLADA_DIST_TIMEOUT): a watchdog
        // ends the process with an error when the call has not returned by then (the call
        // cannot be cancelled from outside, and the device context stays on this thread).
        let (limit, _) = super::dist::timeouts()?;
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                eprintln!(
                    "error: ncclCommInitRank (rank {rank} of {world}) did not finish within \
                     {:.0} s (LLADA_DIST_TIMEOUT): a rank is missing or stuck",
                    limit.as_secs_f64()
                );
                // SAFETY: ends the process at once; nothing of it is used afterwards.
                unsafe { libc::_exit(1) }
            }
        });
        // SAFETY: a valid out-pointer; the id is passed by value as nccl.h declares.
        let r = unsafe { (a.comm_init_rank)(&mut comm, w, *id, r) };
        drop(done);
        let _ = watchdog.join();
        check(a, r, &format!("ncclCommInitRank (rank {rank} of {world})"))?;
        ensure!(!comm.is_null(), "ncclCommInitRank returned no communicator");
        Ok(NcclComm { comm, rank, world })
    }

    /// In-place f32 sum all-reduce of every `(device pointer, length)` buffer, grouped into one
    /// NCCL launch, on `stream` (a `CUstream`). Asynchronous like any launch on the stream.
    ///
    /// # Safety
    /// Every pointer must be a live device allocation of at least its length in f32 on this
    /// communicator's device, not used by other streams until `stream` has passed this point.
    pub unsafe fn all_reduce_sum_f32(
        &self,
        bufs: &[(u64, usize)],
        stream: *mut c_void,
    ) -> Result<()> {
        let a = api()?;
        check(a, (a.group_start)(), "ncclGroupStart")?;
        let mut first_err = Ok(());
        for &(ptr, len) in bufs {
            if len == 0 {
                continue;
            }
            let r = (a.all_reduce)(
                ptr as *const c_void,
                ptr as *mut c_void,
                len,
                NCCL_FLOAT32,
                NCCL_SUM,
                self.comm,
                stream,
            );
            if r != NCCL_SUCCESS && first_err.is_ok() {
                first_err = check(a, r, "ncclAllReduce");
            }
        }
        let end = (a.group_end)();
        first_err?;
        if end == NCCL_IN_PROGRESS {
            return Ok(());
        }
        check(a, end, "ncclGroupEnd (the gradient all-reduce)")
    }

    /// An error NCCL hit asynchronously (a peer died, a network failure), if any.
    pub fn async_error(&self) -> Result<()> {
        let a = api()?;
        let mut r: NcclResult = 0;
        // SAFETY: a live communicator and a valid out-pointer.
        check(
            a,
            unsafe { (a.get_async_error)(self.comm, &mut r) },
            "ncclCommGetAsyncError",
        )?;
        if r == NCCL_IN_PROGRESS {
            return Ok(());
        }
        check(a, r, "an earlier NCCL operation")
    }
}

impl NcclComm {
    /// Abandon the communicator (after an error or a timeout: outstanding operations are
    /// cancelled, nothing waits for the peers).
    pub fn abort(self) {
        if let Ok(a) = api() {
            // SAFETY: a live communicator, released here and never again (no Drop below).
            unsafe {
                let _ = (a.comm_abort)(self.comm);
            }
        }
        std::mem::forget(self);
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            let mut r: NcclResult = 0;
            // SAFETY: a live communicator, released once. After an asynchronous error (a peer
            // gone) destroy could wait for it forever, so such a communicator is aborted.
            // Neither result can be reported from a destructor.
            unsafe {
                let ok = (a.get_async_error)(self.comm, &mut r) == NCCL_SUCCESS
                    && (r == NCCL_SUCCESS || r == NCCL_IN_PROGRESS);
                if ok {
                    let _ = (a.comm_destroy)(self.comm);
                } else {
                    let _ = (a.comm_abort)(self.comm);
                }
            }
        }
    }
}
