//! NVTX ranges (step, layer, op) so `nsys` timelines read naturally.
//!
//! Built from the header-only NVTX3 API when its headers are found at build time (the pinned
//! `nvidia-nvtx` wheel that `.ci/install-nvcc.sh` installs, or a CUDA toolkit); otherwise every
//! call is an empty inline function. Either way a range costs at most a function call when no
//! profiler is attached, and never fails. Names are `&'static CStr` (no allocation per call).

use std::ffi::CStr;

#[cfg(llada_nvtx)]
mod ffi {
    use std::os::raw::c_char;
    extern "C" {
        pub fn llada_nvtx_push(name: *const c_char);
        pub fn llada_nvtx_pop();
    }
}

/// Whether this binary was built with NVTX support.
pub const ENABLED: bool = cfg!(llada_nvtx);

/// Open a range; close it with [`pop`] (or use [`range`]).
#[inline]
pub fn push(name: &CStr) {
    #[cfg(llada_nvtx)]
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call; NVTX copies it.
    unsafe {
        ffi::llada_nvtx_push(name.as_ptr())
    };
    #[cfg(not(llada_nvtx))]
    let _ = name;
}

/// Close the innermost open range.
#[inline]
pub fn pop() {
    #[cfg(llada_nvtx)]
    // SAFETY: no arguments; NVTX tolerates unbalanced pops.
    unsafe {
        ffi::llada_nvtx_pop()
    };
}

/// A range closed when the guard drops.
pub struct Range(());

impl Drop for Range {
    #[inline]
    fn drop(&mut self) {
        pop();
    }
}

/// Open a range that closes at the end of the scope.
#[inline]
#[must_use]
pub fn range(name: &CStr) -> Range {
    push(name);
    Range(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_are_harmless_without_a_profiler() {
        for _ in 0..1000 {
            let _r = super::range(c"step");
            super::push(c"op");
            super::pop();
        }
    }
}
