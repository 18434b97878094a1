//! Device selection: `auto | cpu | cuda | cuda:N`.
//!
//! [`resolve`] turns the user's choice into a concrete device. `auto` picks CUDA device 0 when
//! [`cuda_available`] says yes and falls back to the CPU otherwise, with a one-line notice saying
//! why; an explicit `cuda` choice never falls back (the error says what is missing). Nothing here
//! panics on a machine without CUDA: the driver library is probed before any CUDA call.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

use crate::backend::cuda;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when usable, the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => match n.parse::<usize>() {
                    Ok(i) => Ok(DeviceChoice::Cuda(i)),
                    Err(_) => bail!("bad device {s:?}: the ordinal after `cuda:` must be a non-negative integer"),
                },
                None => bail!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N"),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A concrete device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resolved::Cpu => f.write_str("cpu"),
            Resolved::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// `Ok(())` when this binary can run on a CUDA device: the driver library loads, it reports at
/// least one device, and the kernels were compiled into the binary. Otherwise a sentence naming
/// every missing piece.
pub fn cuda_available() -> Result<(), String> {
    let mut missing = Vec::new();
    match cuda::device_count() {
        Ok(0) => missing.push("the CUDA driver reports no device".to_string()),
        Ok(_) => {}
        Err(e) => missing.push(e),
    }
    if !cuda::KERNELS_BUILT {
        missing.push(cuda::NO_KERNELS_MSG.to_string());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// Turn a choice into a device. Returns the device and, when `auto` fell back to the CPU, a
/// one-line notice saying why. An explicit `cuda[:N]` is checked (driver, device count, kernels)
/// and fails with the reason instead of falling back.
pub fn resolve(choice: DeviceChoice) -> Result<(Resolved, Option<String>)> {
    match choice {
        DeviceChoice::Cpu => Ok((Resolved::Cpu, None)),
        DeviceChoice::Auto => match cuda_available() {
            Ok(()) => Ok((Resolved::Cuda(0), None)),
            Err(why) => Ok((
                Resolved::Cpu,
                Some(format!("running on the CPU (no usable CUDA device: {why})")),
            )),
        },
        DeviceChoice::Cuda(i) => {
            if let Err(why) = cuda_available() {
                bail!("device cuda:{i} requested but CUDA is not usable: {why}");
            }
            let n = cuda::device_count().map_err(anyhow::Error::msg)?;
            if i >= n {
                bail!("device cuda:{i} requested but only {n} CUDA device(s) present (ordinals 0..{n})");
            }
            Ok((Resolved::Cuda(i), None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda3"] {
            let e = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2)] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
    }

    #[test]
    fn auto_never_fails_and_cpu_is_cpu() {
        assert_eq!(resolve(DeviceChoice::Cpu).unwrap(), (Resolved::Cpu, None));
        let (r, notice) = resolve(DeviceChoice::Auto).unwrap();
        match (r, cuda_available()) {
            (Resolved::Cpu, Err(why)) => assert!(notice.unwrap().contains(&why)),
            (Resolved::Cuda(0), Ok(())) => assert!(notice.is_none()),
            other => panic!("inconsistent resolution {other:?}"),
        }
    }

    #[test]
    fn explicit_cuda_explains_itself() {
        match resolve(DeviceChoice::Cuda(1 << 20)) {
            Ok(r) => panic!("absurd ordinal resolved to {r:?}"),
            Err(e) => assert!(e.to_string().contains("cuda:1048576"), "{e}"),
        }
    }
}
