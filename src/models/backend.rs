//! Choosing where the model runs: burn's wgpu backend (Vulkan, Metal, DX12: any GPU vendor)
//! when a real GPU adapter exists, else burn's `flex` CPU backend.
//!
//! A software Vulkan driver (Mesa's lavapipe) is an adapter too, but it is slower than flex,
//! so `auto` treats it as "no GPU"; `--backend wgpu` still uses it (CI runs the wgpu path on
//! it so that path cannot rot).

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, DeviceKind};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Wgpu,
    Cpu,
}

impl FromStr for BackendChoice {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "wgpu" | "gpu" => Ok(Self::Wgpu),
            "cpu" | "flex" => Ok(Self::Cpu),
            other => Err(BackendError::UnknownChoice(other.to_string())),
        }
    }
}

/// What the model runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Wgpu,
    Cpu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wgpu => "wgpu",
            Self::Cpu => "cpu",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend {0:?}: use auto, wgpu or cpu")]
    UnknownChoice(String),
    #[error(
        "no wgpu adapter found (no Vulkan, Metal or DX12 driver); install one (on Debian: \
         mesa-vulkan-drivers) or use --backend cpu"
    )]
    NoAdapter,
}

/// A wgpu adapter as the system reports it.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub api: String,
    pub device_type: String,
    pub driver: String,
    /// A real GPU (discrete, integrated or virtual), not a software rasteriser.
    pub is_gpu: bool,
}

/// The chosen device and a line describing it for start-up logs.
#[derive(Clone, Debug)]
pub struct SelectedBackend {
    pub device: Device,
    pub kind: BackendKind,
    pub description: String,
}

/// Lists wgpu adapters without creating a device (cheap; safe to call at start-up).
pub fn wgpu_adapters() -> Vec<AdapterSummary> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    // Vulkan, Metal and DX12 only: burn's kernels need features the OpenGL path lacks (it
    // fails on subgroup and atomic kernels), and probing EGL floods stderr on headless hosts.
    let future = instance.enumerate_adapters(wgpu::Backends::PRIMARY);
    let adapters = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt.block_on(future),
        Err(_) => return Vec::new(),
    };
    adapters
        .into_iter()
        .map(|a| {
            let info = a.get_info();
            let is_gpu = matches!(
                info.device_type,
                wgpu::DeviceType::DiscreteGpu
                    | wgpu::DeviceType::IntegratedGpu
                    | wgpu::DeviceType::VirtualGpu
            );
            AdapterSummary {
                name: info.name,
                api: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: format!("{} {}", info.driver, info.driver_info)
                    .trim()
                    .to_string(),
                is_gpu,
            }
        })
        .collect()
}

/// Resolves the choice to a device. `threads` sizes the CPU thread pool (reported only).
pub fn select(choice: BackendChoice, threads: usize) -> Result<SelectedBackend, BackendError> {
    let cpu = || SelectedBackend {
        device: Device::flex(),
        kind: BackendKind::Cpu,
        description: format!("cpu (burn flex, {threads} threads)"),
    };
    match choice {
        BackendChoice::Cpu => Ok(cpu()),
        BackendChoice::Auto => {
            let adapters = wgpu_adapters();
            match adapters.iter().find(|a| a.is_gpu) {
                Some(gpu) => Ok(wgpu_backend(gpu)),
                None => {
                    let mut s = cpu();
                    let seen: Vec<String> = adapters.iter().map(|a| a.name.clone()).collect();
                    s.description = if seen.is_empty() {
                        format!("{} — no GPU adapter found", s.description)
                    } else {
                        format!(
                            "{} — only software adapters found ({})",
                            s.description,
                            seen.join(", ")
                        )
                    };
                    Ok(s)
                }
            }
        }
        BackendChoice::Wgpu => {
            let adapters = wgpu_adapters();
            let best = adapters
                .iter()
                .find(|a| a.is_gpu)
                .or_else(|| adapters.first())
                .ok_or(BackendError::NoAdapter)?;
            Ok(wgpu_backend(best))
        }
    }
}

fn wgpu_backend(adapter: &AdapterSummary) -> SelectedBackend {
    // DefaultDevice lets wgpu pick its preferred adapter: the high-power GPU when there is
    // one, the software driver otherwise — the same one listed first above.
    SelectedBackend {
        device: Device::wgpu(DeviceKind::DefaultDevice),
        kind: BackendKind::Wgpu,
        description: format!(
            "wgpu on {} ({}, {}{})",
            adapter.name,
            adapter.api,
            adapter.device_type,
            if adapter.driver.is_empty() {
                String::new()
            } else {
                format!(", {}", adapter.driver)
            }
        ),
    }
}
