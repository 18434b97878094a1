//! Typed device errors at the backend boundary.
//!
//! Backends return `anyhow::Result` like the rest of the crate; the few failures a caller
//! branches on travel inside it as a [`DeviceError`], found again with [`DeviceError::of`]. The
//! batch runner's halve-and-retry (`crate::batch::run`) uses it: a smaller batch may fit after an
//! [`DeviceError::OutOfMemory`], while after a [`DeviceError::Fault`] the device context is
//! unusable and no retry can succeed. The message is the error's whole `Display`, so wrapping an
//! error in a `DeviceError` does not change what the user reads.

use std::fmt;

/// A device failure a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// An allocation failed, or was refused up front because the device has too little free
    /// memory: the same work in smaller pieces may succeed.
    OutOfMemory(String),
    /// A sticky device fault (illegal address, failed launch, uncorrectable ECC error, ...):
    /// every later call on this context fails the same way; only a new process recovers.
    Fault(String),
}

impl DeviceError {
    /// The [`DeviceError`] in `e`'s chain of causes, if any.
    pub fn of(e: &anyhow::Error) -> Option<&DeviceError> {
        e.chain().find_map(|c| c.downcast_ref::<DeviceError>())
    }

    /// `e` carries a sticky device fault.
    pub fn is_fault(e: &anyhow::Error) -> bool {
        matches!(DeviceError::of(e), Some(DeviceError::Fault(_)))
    }

    /// `e` carries an out-of-memory failure.
    pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
        matches!(DeviceError::of(e), Some(DeviceError::OutOfMemory(_)))
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::OutOfMemory(m) | DeviceError::Fault(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for DeviceError {}

#[cfg(test)]
mod tests {
    use super::DeviceError;
    use anyhow::{anyhow, Context};

    #[test]
    fn found_through_context_and_displayed_unchanged() {
        let e = anyhow::Error::new(DeviceError::Fault("illegal address".into()));
        let e = Err::<(), _>(e).context("generating batch 3").unwrap_err();
        assert!(DeviceError::is_fault(&e));
        assert!(!DeviceError::is_out_of_memory(&e));
        assert_eq!(format!("{:#}", e), "generating batch 3: illegal address");
        let oom = anyhow::Error::new(DeviceError::OutOfMemory("need 2 GiB".into()));
        assert!(DeviceError::is_out_of_memory(&oom) && !DeviceError::is_fault(&oom));
        let plain = anyhow!("bad shape");
        assert_eq!(DeviceError::of(&plain), None);
    }
}
