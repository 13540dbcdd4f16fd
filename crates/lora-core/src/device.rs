//! Where the model computes: `cpu`, `cuda`, `cuda:N` or `auto`, as given to
//! the CLI's `--device` (PyTorch's device strings).
//!
//! The CUDA devices exist only in a build with `--features cuda`
//! (docs/cuda.md); asking for one elsewhere is an error that says so, never a
//! silent fall-back to the CPU. `auto` is the first CUDA device when the build
//! has CUDA and a GPU answers, else the CPU.

use candle_core::Device;

/// What a device string asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Auto,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "auto" => Ok(Self::Auto),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("'{s}' is not a device: expected cpu, cuda, cuda:N or auto")),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => write!(f, "auto"),
        }
    }
}

/// Whether this binary was built with CUDA support.
pub fn cuda_built() -> bool {
    candle_core::utils::cuda_is_available()
}

impl DeviceSpec {
    /// Opens the device. Errors say why it cannot be used:
    /// a build without CUDA, or a GPU that does not answer (no driver, no
    /// such ordinal).
    pub fn open(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(if cuda_built() { Device::new_cuda(0).map(prepared).unwrap_or(Device::Cpu) } else { Device::Cpu }),
            Self::Cuda(_) if !cuda_built() => {
                Err("this binary was built without CUDA support (build it with scripts/build_cuda.sh, see docs/cuda.md)".into())
            }
            Self::Cuda(n) => Device::new_cuda(n)
                .map(prepared)
                .map_err(|e| format!("CUDA device {n} cannot be opened: {}", crate::weights::first_line(&e.to_string()))),
        }
    }
}

/// Sets a GPU up for training loops; returns it. candle allocates through
/// CUDA's stream-ordered pool (`cuMemAllocAsync`), whose release threshold
/// is 0 by default: at every synchronisation (each loss read, each copy of
/// the gradients to the host) the pool hands all freed memory back to the
/// driver, and the next step maps it again, page by page. On an H200 that
/// re-mapping cost a sixth of a training step (batch 128: 1114 samples/s
/// with it, 1346 without, docs/cuda.md). Here the pool keeps what it has (threshold:
/// unlimited), as PyTorch's caching allocator does; the process then holds
/// its peak GPU memory until it exits. `LORA_CUDA_POOL_RELEASE=1` keeps
/// CUDA's default (for A/B runs). Does nothing to the CPU.
pub fn prepared(d: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let candle_core::DeviceLocation::Cuda { gpu_id } = d.location() {
        if !std::env::var("LORA_CUDA_POOL_RELEASE").is_ok_and(|v| v == "1") {
            keep_freed_gpu_memory(gpu_id);
        }
    }
    d
}

#[cfg(feature = "cuda")]
fn keep_freed_gpu_memory(ordinal: usize) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    // SAFETY: the device handle comes from the driver for an ordinal that
    // candle has just opened; the attribute takes a pointer to a u64.
    unsafe {
        let Ok(dev) = result::device::get(ordinal as i32) else { return };
        let Ok(pool) = result::device::get_mem_pool(dev) else { return };
        let mut keep = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut std::ffi::c_void,
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            eprintln!("warning: cuda:{ordinal}: the memory pool keeps CUDA's default release threshold ({r:?})");
        }
    }
}

/// A device's name as the CLI prints it (`cpu`, `cuda:0`).
pub fn name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pytorch_style_strings() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda0"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda, cuda:N or auto"), "{bad}: {e}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn opens_the_cpu_and_refuses_cuda_without_it() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        assert_eq!(name(&DeviceSpec::Cpu.open().unwrap()), "cpu");
        if !cuda_built() {
            assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
            let e = DeviceSpec::Cuda(0).open().unwrap_err();
            assert!(e.contains("built without CUDA support") && e.contains("scripts/build_cuda.sh"), "{e}");
        }
    }
}
