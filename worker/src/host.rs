//! Host detection: CPUs, memory, GPUs (through NVML when libnvidia-ml can be loaded,
//! else `nvidia-smi` when on PATH; neither is needed to build or run), a Docker engine
//! socket, `/dev/kvm`. Flags may restrict or override what was found.

use berth_shared::wire::{GpuInfo, HostInfo};

/// What the operator allows this worker to use (`--gpus 0,2`, `--cpus`, `--mem`).
#[derive(Clone, Debug, Default)]
pub struct HostLimits {
    pub gpus: Option<Vec<u32>>,
    pub cpus: Option<u32>,
    pub mem_mib: Option<u64>,
}

/// Where the GPU list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuSource {
    Nvml,
    NvidiaSmi,
    None,
}

pub fn detect(executors: &[String]) -> HostInfo {
    detect_with(executors, &HostLimits::default()).0
}

/// Detects the host and applies the limits; an index in `--gpus` that the host does
/// not have is an error.
pub fn detect_limited(executors: &[String], limits: &HostLimits) -> Result<(HostInfo, GpuSource), String> {
    let (host, source) = detect_with(executors, limits);
    if let Some(want) = &limits.gpus {
        let all = gpus().0;
        for i in want {
            if !all.iter().any(|g| g.index == *i) {
                let have: Vec<String> = all.iter().map(|g| g.index.to_string()).collect();
                return Err(format!("--gpus {i}: this host has no GPU {i} (it has {})", if have.is_empty() { "none".into() } else { have.join(", ") }));
            }
        }
    }
    Ok((host, source))
}

fn detect_with(executors: &[String], limits: &HostLimits) -> (HostInfo, GpuSource) {
    let (mut found, source) = gpus();
    if let Some(keep) = &limits.gpus {
        found.retain(|g| keep.contains(&g.index));
    }
    let host = HostInfo {
        hostname: hostname(),
        cpus: limits.cpus.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)),
        mem_mib: limits.mem_mib.unwrap_or_else(|| mem_total_mib().unwrap_or(0)),
        gpus: found,
        docker: std::path::Path::new("/var/run/docker.sock").exists(),
        kvm: std::path::Path::new("/dev/kvm").exists(),
        executors: executors.to_vec(),
        containment: Default::default(),
        secrets: Vec::new(),
    };
    (host, source)
}

/// GPUs by NVML, else by `nvidia-smi`, else none.
fn gpus() -> (Vec<GpuInfo>, GpuSource) {
    if let Some(g) = nvml_gpus() {
        return (g, GpuSource::Nvml);
    }
    match nvidia_smi_gpus() {
        Some(g) if !g.is_empty() => (g, GpuSource::NvidiaSmi),
        _ => (Vec::new(), GpuSource::None),
    }
}

/// GPUs through NVML, loaded at run time: `None` when the library is absent or has
/// no devices (the normal case on machines without NVIDIA drivers).
fn nvml_gpus() -> Option<Vec<GpuInfo>> {
    if std::env::var_os("BERTH_NO_NVML").is_some() {
        return None;
    }
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    let n = nvml.device_count().ok()?;
    let mut out = Vec::new();
    for i in 0..n {
        let d = nvml.device_by_index(i).ok()?;
        out.push(GpuInfo {
            index: d.index().unwrap_or(i),
            uuid: d.uuid().unwrap_or_default(),
            model: d.name().unwrap_or_default(),
            vram_mib: d.memory_info().map(|m| m.total / (1024 * 1024)).unwrap_or(0),
        });
    }
    (!out.is_empty()).then_some(out)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "worker".into())
}

fn mem_total_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// GPUs from `nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader`.
fn nvidia_smi_gpus() -> Option<Vec<GpuInfo>> {
    let out = std::process::Command::new("nvidia-smi").args(["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `nvidia-smi`'s CSV; malformed lines are skipped.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() < 4 {
                return None;
            }
            let mem = f[3].trim_end_matches("MiB").trim().parse().ok()?;
            Some(GpuInfo { index: f[0].parse().ok()?, uuid: f[1].to_string(), model: f[2].to_string(), vram_mib: mem })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_lines() {
        let g = parse_nvidia_smi(
            "0, GPU-11111111-aaaa-bbbb-cccc-000000000000, NVIDIA H100 80GB HBM3, 81559 MiB\n\
             1, GPU-22222222-aaaa-bbbb-cccc-000000000000, NVIDIA A10, 23028 MiB\ngarbage\n",
        );
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].model, "NVIDIA H100 80GB HBM3");
        assert_eq!(g[1].vram_mib, 23028);
    }
}
