//! Resource arithmetic: what a worker has free, whether a task's resources fit it, and
//! which GPUs a task is given. Plain code shared by the worker (which sets resources
//! aside for its running tasks) and the coordinator's scheduler (which hands out only
//! what fits).

use serde::{Deserialize, Serialize};

use crate::job::Resources;
use crate::wire::GpuInfo;

/// A worker's free resources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeResources {
    pub millicpus: u32,
    pub mem_mib: u64,
    pub gpus: Vec<GpuInfo>,
}

/// Whether a GPU is one a job asks for (model substring, case-insensitive; memory).
pub fn gpu_matches(g: &GpuInfo, r: &Resources) -> bool {
    r.gpu_model.as_ref().is_none_or(|m| g.model.to_lowercase().contains(&m.to_lowercase())) && r.min_vram_mib.is_none_or(|v| g.vram_mib >= v)
}

impl FreeResources {
    /// Whether a task with these resources fits.
    pub fn fits(&self, r: &Resources) -> bool {
        r.millicpus <= self.millicpus && r.mem_mib <= self.mem_mib && self.gpus.iter().filter(|g| gpu_matches(g, r)).count() >= r.gpus as usize
    }

    /// Takes what a task with these resources needs (the lowest matching GPUs);
    /// `None`, and nothing taken, when it does not fit.
    pub fn take(&mut self, r: &Resources) -> Option<Vec<GpuInfo>> {
        if !self.fits(r) {
            return None;
        }
        self.millicpus -= r.millicpus;
        self.mem_mib -= r.mem_mib;
        let mut got = Vec::new();
        self.gpus.sort_by_key(|g| g.index);
        self.gpus.retain(|g| {
            if got.len() < r.gpus as usize && gpu_matches(g, r) {
                got.push(g.clone());
                false
            } else {
                true
            }
        });
        Some(got)
    }

    /// Gives back what `take` took.
    pub fn give_back(&mut self, r: &Resources, gpus: Vec<GpuInfo>) {
        self.millicpus += r.millicpus;
        self.mem_mib += r.mem_mib;
        self.gpus.extend(gpus);
        self.gpus.sort_by_key(|g| g.index);
    }
}
