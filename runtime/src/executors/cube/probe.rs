//! Which device a run uses: `--device cuda | wgpu | host | auto`, probed without panicking.

use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::Runtime;
use std::sync::OnceLock;

/// A backend as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Auto,
    Host,
    Wgpu,
    Cuda,
}

/// The backend a run uses, and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chosen {
    Host,
    Wgpu { adapter: String },
    Cuda { device: String },
}

impl Chosen {
    /// A wgpu adapter that runs on the CPU (Mesa's lavapipe): kernels are checked there, not
    /// timed, so products take the first kernel that runs instead of the fastest.
    pub fn is_cpu_adapter(&self) -> bool {
        matches!(self, Chosen::Wgpu { .. }) && wgpu_adapter().is_ok_and(|a| a.cpu)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Chosen::Host => "host",
            Chosen::Wgpu { .. } => "wgpu",
            Chosen::Cuda { .. } => "cuda",
        }
    }
}

impl std::fmt::Display for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chosen::Host => write!(f, "host (CPU)"),
            Chosen::Wgpu { adapter } => write!(f, "wgpu ({adapter})"),
            Chosen::Cuda { device } => write!(f, "cuda ({device})"),
        }
    }
}

/// What the wgpu probe found: the adapter's name and whether it is a CPU (lavapipe, WARP).
#[derive(Debug, Clone)]
pub struct WgpuAdapter {
    pub name: String,
    pub cpu: bool,
}

/// The number of CUDA devices, or why there are none. Never panics: the driver library is
/// looked for before cubecl touches it (cubecl panics when libcuda is missing).
pub fn cuda_devices() -> Result<usize, String> {
    static PROBE: OnceLock<Result<usize, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // SAFETY: only checks whether the driver library can be loaded.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("no CUDA driver library (libcuda) found".into());
            }
            let run = std::panic::catch_unwind(|| {
                cudarc::driver::result::init()
                    .map_err(|e| format!("CUDA driver failed to initialize: {e:?}"))?;
                cudarc::driver::result::device::get_count()
                    .map(|n| n as usize)
                    .map_err(|e| format!("CUDA device count failed: {e:?}"))
            });
            match run {
                Ok(Ok(0)) => Err("the CUDA driver reports no device".into()),
                Ok(r) => r,
                Err(_) => Err("the CUDA driver probe panicked".into()),
            }
        })
        .clone()
}

/// The default wgpu adapter (registering cubecl's client for it), or why there is none.
pub fn wgpu_adapter() -> Result<WgpuAdapter, String> {
    static PROBE: OnceLock<Result<WgpuAdapter, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let setup = std::panic::catch_unwind(|| {
                cubecl::wgpu::init_setup::<cubecl::wgpu::AutoGraphicsApi>(
                    &WgpuDevice::DefaultDevice,
                    Default::default(),
                )
            })
            .map_err(|e| {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                format!("no wgpu adapter ({msg}); on Linux without a GPU install Mesa's lavapipe: apt-get install mesa-vulkan-drivers")
            })?;
            let info = setup.adapter.get_info();
            Ok(WgpuAdapter {
                name: format!("{} [{:?}, {:?}]", info.name, info.backend, info.device_type),
                cpu: info.device_type == wgpu::DeviceType::Cpu,
            })
        })
        .clone()
}

/// Resolve `--device`: `auto` picks CUDA when a driver and device exist, else a wgpu adapter
/// that is a real GPU, else the host (a wgpu CPU adapter such as lavapipe is for checking
/// kernels only: it runs GEMMs 10–20× slower than the host backend).
pub fn choose(kind: DeviceKind) -> Result<Chosen, String> {
    match kind {
        DeviceKind::Host => Ok(Chosen::Host),
        DeviceKind::Cuda => {
            cuda_devices().map_err(|e| format!("--device cuda: {e}"))?;
            Ok(Chosen::Cuda {
                device: cuda_name(),
            })
        }
        DeviceKind::Wgpu => {
            let a = wgpu_adapter().map_err(|e| format!("--device wgpu: {e}"))?;
            Ok(Chosen::Wgpu { adapter: a.name })
        }
        DeviceKind::Auto => {
            if cuda_devices().is_ok() {
                return Ok(Chosen::Cuda {
                    device: cuda_name(),
                });
            }
            match wgpu_adapter() {
                Ok(a) if !a.cpu => Ok(Chosen::Wgpu { adapter: a.name }),
                _ => Ok(Chosen::Host),
            }
        }
    }
}

/// Name of CUDA device 0 (after a successful probe).
fn cuda_name() -> String {
    cudarc::driver::result::device::get(0)
        .and_then(cudarc::driver::result::device::get_name)
        .map(|n| format!("device 0: {n}"))
        .unwrap_or_else(|_| "device 0".to_string())
}

/// The cubecl client of the default wgpu adapter (after [`wgpu_adapter`] succeeded).
pub fn wgpu_client() -> cubecl::prelude::ComputeClient<WgpuRuntime> {
    WgpuRuntime::client(&WgpuDevice::DefaultDevice)
}

/// The cubecl client of CUDA device 0 (after [`cuda_devices`] succeeded).
pub fn cuda_client() -> cubecl::prelude::ComputeClient<CudaRuntime> {
    CudaRuntime::client(&CudaDevice::new(0))
}

/// The device of `kind` for a test, or `None` to skip it where the device is absent. Tests of
/// a GPU backend call this, so one policy holds for every test crate:
/// - `SNFC_REQUIRE_GPU` (comma-separated: `wgpu`, `cuda`) names backends whose absence is a
///   failure, not a skip (`.ci/run` sets `wgpu`: lavapipe is installed there, so a broken
///   probe must not pass silently);
/// - a skip is said on stderr and, when `SNFC_SKIP_LOG` names a file, appended to it, so that a
///   run of many test binaries can list what it skipped in one line at the end.
pub fn device_for_test(kind: DeviceKind, test: &str) -> Option<Chosen> {
    let e = match choose(kind) {
        Ok(c) => return Some(c),
        Err(e) => e,
    };
    let name = match kind {
        DeviceKind::Wgpu => "wgpu",
        DeviceKind::Cuda => "cuda",
        DeviceKind::Host | DeviceKind::Auto => {
            panic!("{test}: no {kind:?} device: {e}")
        }
    };
    let required = std::env::var("SNFC_REQUIRE_GPU").unwrap_or_default();
    if required.split(',').any(|r| r.trim() == name) {
        panic!("{test}: SNFC_REQUIRE_GPU={required} requires the {name} backend, but: {e}");
    }
    eprintln!("skipped {test} on {name}: {e}");
    if let Ok(path) = std::env::var("SNFC_SKIP_LOG") {
        use std::io::Write;
        // One line per skip, written by one `write` to a file opened for appending, so that
        // test processes running at once do not interleave their lines.
        let line = format!("{name}: {e}\n");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
    None
}
