//! Host detection: CPUs, memory, GPUs (`nvidia-smi` when on PATH), a Docker engine
//! socket, `/dev/kvm`.

use berth_shared::wire::{GpuInfo, HostInfo};

pub fn detect(executors: &[String]) -> HostInfo {
    HostInfo {
        hostname: hostname(),
        cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        mem_mib: mem_total_mib().unwrap_or(0),
        gpus: nvidia_smi_gpus().unwrap_or_default(),
        docker: std::path::Path::new("/var/run/docker.sock").exists(),
        kvm: std::path::Path::new("/dev/kvm").exists(),
        executors: executors.to_vec(),
    }
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
