//! cgroups for process attempts. Each slot has a cgroup of its own in every hierarchy
//! in use; an attempt's processes are placed there before they exec, so nothing they
//! start can leave it; its limits are the attempt's CPUs, memory and pids; and the
//! attempt is ended by killing the cgroup, so a child that left the process group
//! (`setsid`, a double fork) dies with it.
//!
//! Two layouts are found on hosts:
//! - **unified** (cgroup v2 with the cpu, memory and pids controllers delegated): the
//!   worker moves itself into a leaf of its cgroup (`berth-<key>/worker`, as v2 allows
//!   no processes in a cgroup whose children have controllers) and the slots are
//!   `berth-<key>/slot-<n>`.
//! - **legacy** (cgroup v1 controllers, usually with the v2 hierarchy mounted beside
//!   them, "hybrid"): the slot's cgroup is made in the memory, pids and cpu hierarchies
//!   for the limits, and in the v2 hierarchy (when there) for `cgroup.kill` and for
//!   knowing when it is empty.
//!
//! Which one is used, or why none can be, is said at start and in `berth workers`.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the attempt in a slot may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Limits {
    /// CPUs in thousandths; 0: no limit.
    pub millicpus: u32,
    /// Memory in MiB; 0: no limit.
    pub mem_mib: u64,
    /// The most processes (and threads) at once.
    pub pids: u64,
}

/// The cgroup hierarchies this worker uses, found and prepared at start.
#[derive(Debug)]
pub struct Cgroups {
    layout: Layout,
}

#[derive(Debug)]
enum Layout {
    /// v2 with controllers: the slots' parent (`berth-<key>`).
    Unified { base: PathBuf },
    /// v1 controllers, each under this worker's own cgroup of that hierarchy, and the v2
    /// hierarchy (when mounted) for kill and emptiness.
    Legacy { memory: PathBuf, pids: PathBuf, cpu: Option<PathBuf>, unified: Option<PathBuf> },
}

/// A mounted cgroup hierarchy: where it is mounted, and the root of the mount within it.
#[derive(Debug, Clone)]
struct Mount {
    point: PathBuf,
    root: String,
    /// For v1: its controllers (`cpu`, `memory`, …); empty for v2.
    controllers: Vec<String>,
    v2: bool,
}

fn mounts() -> io::Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let v2 = match r[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers =
            if v2 { Vec::new() } else { r[2].split(',').filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('=')).map(str::to_string).collect() };
        out.push(Mount { point: PathBuf::from(unescape(l[4])), root: unescape(l[3]), controllers, v2 });
    }
    Ok(out)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup in each hierarchy: (controllers, path); v2 is the one with
/// hierarchy id 0 and no controllers.
fn own_cgroups() -> io::Result<Vec<(u32, Vec<String>, String)>> {
    cgroups_of("self")
}

/// A process's cgroups (`pid`: a number, or `self`), as `own_cgroups`.
fn cgroups_of(pid: &str) -> io::Result<Vec<(u32, Vec<String>, String)>> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let id = f.next()?.parse().ok()?;
            let ctl = f.next()?.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect();
            Some((id, ctl, f.next()?.to_string()))
        })
        .collect())
}

/// The directory of `path` (a cgroup path) in `m`.
fn dir_in(m: &Mount, path: &str) -> PathBuf {
    let rel = path.strip_prefix(m.root.trim_end_matches('/')).unwrap_or(path);
    m.point.join(rel.trim_start_matches('/'))
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    // One write(2) of the whole value: cgroup files take a value per write.
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes()).map_err(|e| io::Error::new(e.kind(), format!("cannot write `{}` to {}: {e}", value.trim(), path.display())))
}

fn read(path: &Path) -> io::Result<String> {
    fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))
}

/// `key N` from a flat-keyed cgroup file (`memory.events`, `memory.oom_control`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

impl Cgroups {
    /// Finds the hierarchies and prepares this worker's part of them (`berth-<key>` under
    /// its own cgroup in each; the key names one worker and work dir, so a restarted
    /// worker finds what its last run left). Err says why attempts cannot be put in cgroups.
    pub fn open(key: &str) -> Result<Cgroups, String> {
        let mounts = mounts().map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let own = own_cgroups().map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let leaf = format!("berth-{key}");
        let v2 = mounts.iter().find(|m| m.v2).and_then(|m| {
            let (_, _, path) = own.iter().find(|(id, ctl, _)| *id == 0 && ctl.is_empty())?;
            Some(dir_in(m, path))
        });
        let v1 = |name: &str| -> Option<PathBuf> {
            let m = mounts.iter().find(|m| !m.v2 && m.controllers.iter().any(|c| c == name))?;
            let (_, _, path) = own.iter().find(|(_, ctl, _)| ctl.iter().any(|c| c == name))?;
            Some(dir_in(m, path))
        };
        // v2 with every controller available: the whole job there.
        if let Some(own2) = &v2 {
            let available = fs::read_to_string(own2.join("cgroup.controllers")).unwrap_or_default();
            if CONTROLLERS.iter().all(|c| available.split_whitespace().any(|a| a == *c)) {
                return Self::unified(own2, &leaf).map(|base| Cgroups { layout: Layout::Unified { base } });
            }
        }
        let (Some(memory), Some(pids)) = (v1("memory"), v1("pids")) else {
            return Err(match v2 {
                Some(p) => {
                    format!("the cgroup v2 hierarchy at {} does not offer the cpu, memory and pids controllers, and no v1 hierarchy has them", p.display())
                }
                None => "no cgroup hierarchy with the memory and pids controllers is mounted".into(),
            });
        };
        let make = |dir: PathBuf| -> Result<PathBuf, String> {
            let d = dir.join(&leaf);
            match fs::create_dir(&d) {
                Ok(()) => Ok(d),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(d),
                Err(e) => Err(format!("cannot make cgroup {}: {e} (cgroups are not delegated to this worker)", d.display())),
            }
        };
        let memory = make(memory)?;
        let pids = make(pids)?;
        let cpu = match v1("cpu") {
            Some(c) => Some(make(c)?),
            None => None,
        };
        // The v2 hierarchy beside v1 kills a cgroup at once and says when it is empty;
        // without it (or where it is read-only), signals do.
        let unified = v2.and_then(|p| make(p).ok()).filter(|d| d.join("cgroup.procs").exists());
        Ok(Cgroups { layout: Layout::Legacy { memory, pids, cpu, unified } })
    }

    /// Delegation in v2: the worker moves into `<own>/<leaf>/worker` and enables the
    /// controllers for `<own>/<leaf>`'s children, the slots.
    fn unified(own: &Path, leaf: &str) -> Result<PathBuf, String> {
        let base = own.join(leaf);
        let me = base.join("worker");
        let fail = |what: String, e: io::Error| format!("{what}: {e} (cgroups are not delegated to this worker; under systemd, set Delegate=yes)");
        for d in [&base, &me] {
            match fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail(format!("cannot make cgroup {}", d.display()), e)),
            }
        }
        let ctl = "+cpu +memory +pids";
        // Our own cgroup must hold no process for its children to get controllers: move
        // this worker's process down, which works when it is the only one there.
        write(&me.join("cgroup.procs"), &std::process::id().to_string()).map_err(|e| fail("cannot move the worker into its cgroup".into(), e))?;
        write(&own.join("cgroup.subtree_control"), ctl).map_err(|e| fail(format!("cannot enable {ctl} in {}", own.display()), e))?;
        write(&base.join("cgroup.subtree_control"), ctl).map_err(|e| fail(format!("cannot enable {ctl} in {}", base.display()), e))?;
        Ok(base)
    }

    /// What `berth workers` and the start-up log say of it.
    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::Unified { base } => format!("cgroup v2 ({}): cpu, memory and pids limits enforced", base.display()),
            Layout::Legacy { unified, cpu, .. } => format!(
                "cgroup v1 {}: memory and pids{} limits enforced",
                if unified.is_some() { "with v2 for kill" } else { "(no v2 hierarchy: killed by signals)" },
                if cpu.is_some() { ", cpu" } else { "" }
            ),
        }
    }

    /// The cgroup of slot `n`, made if missing and emptied of what a crashed run of this
    /// worker left in it. Returns it and how many left-over processes were killed.
    pub fn slot(&self, n: usize) -> Result<(SlotCgroup, usize), String> {
        let name = format!("slot-{n}");
        let made = |d: PathBuf| -> Result<PathBuf, String> {
            match fs::create_dir(&d) {
                Ok(()) => Ok(d),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(d),
                Err(e) => Err(format!("cannot make cgroup {}: {e}", d.display())),
            }
        };
        let mut cg = match &self.layout {
            Layout::Unified { base } => {
                let d = made(base.join(&name))?;
                SlotCgroup {
                    memory: d.clone(),
                    pids: d.clone(),
                    cpu: Some(d.clone()),
                    unified: Some(d.clone()),
                    v2: true,
                    procs: Vec::new(),
                    last: Default::default(),
                    owned: vec![d],
                }
            }
            Layout::Legacy { memory, pids, cpu, unified } => SlotCgroup {
                memory: made(memory.join(&name))?,
                pids: made(pids.join(&name))?,
                cpu: cpu.as_ref().map(|c| made(c.join(&name))).transpose()?,
                unified: match unified {
                    Some(u) => Some(made(u.join(&name))?),
                    None => None,
                },
                v2: false,
                procs: Vec::new(),
                last: Default::default(),
                owned: Vec::new(),
            },
        };
        let mut dirs: Vec<PathBuf> = vec![cg.memory.clone()];
        for d in [Some(&cg.pids), cg.cpu.as_ref(), cg.unified.as_ref()].into_iter().flatten() {
            if !dirs.contains(d) {
                dirs.push(d.clone());
            }
        }
        cg.procs = open_procs(&dirs)?;
        if cg.owned.is_empty() {
            cg.owned = dirs;
        }
        let left = cg.members().len();
        if left > 0 {
            cg.kill();
        }
        Ok((cg, left))
    }
}

impl Drop for Cgroups {
    /// A worker that stops removes its (empty) part of the hierarchies.
    fn drop(&mut self) {
        match &self.layout {
            Layout::Unified { base } => {
                let _ = fs::remove_dir(base);
            }
            Layout::Legacy { memory, pids, cpu, unified } => {
                for d in [Some(memory), Some(pids), cpu.as_ref(), unified.as_ref()].into_iter().flatten() {
                    let _ = fs::remove_dir(d);
                }
            }
        }
    }
}

/// `cgroup.procs` of each directory, open for writing.
fn open_procs(dirs: &[PathBuf]) -> Result<Vec<OwnedFd>, String> {
    dirs.iter()
        .map(|d| {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
                .map_err(|e| format!("cannot open {}: {e}", d.join("cgroup.procs").display()))?;
            Ok(OwnedFd::from(f))
        })
        .collect()
}

impl Drop for SlotCgroup {
    /// Removed when the worker stops (a slot's) or its exec ends (an exec's), if empty
    /// (a populated cgroup cannot be).
    fn drop(&mut self) {
        self.procs.clear();
        for d in &self.owned {
            let _ = fs::remove_dir(d);
        }
    }
}

/// One slot's cgroup (a directory in each hierarchy in use).
#[derive(Debug)]
pub struct SlotCgroup {
    memory: PathBuf,
    pids: PathBuf,
    cpu: Option<PathBuf>,
    /// The v2 directory, for `cgroup.kill` and `cgroup.events`.
    unified: Option<PathBuf>,
    /// Everything is in the v2 directory.
    v2: bool,
    /// `cgroup.procs` of each directory, open for the child to write itself in.
    procs: Vec<OwnedFd>,
    /// The limits last written, so an attempt like the last costs no writes.
    last: std::sync::Mutex<Option<Limits>>,
    /// The directories it made and removes when dropped.
    owned: Vec<PathBuf>,
}

impl SlotCgroup {
    /// The cgroup another process is in (a container's: its limits can be set here
    /// without a round trip through the engine). Never removed by this side.
    pub fn of_process(pid: i32) -> Result<SlotCgroup, String> {
        let found = cgroups_of(&pid.to_string()).map_err(|e| format!("cannot read process {pid}'s cgroups: {e}"))?;
        let mounts = mounts().map_err(|e| format!("cannot read the cgroup mounts: {e}"))?;
        let v2_path = found.iter().find(|(id, ctl, _)| *id == 0 && ctl.is_empty()).map(|(_, _, p)| p.clone());
        let unified = v2_path.as_ref().and_then(|p| mounts.iter().find(|m| m.v2).map(|m| dir_in(m, p)));
        // A v1 controller's directory, if that controller is mounted as v1.
        let v1 = |name: &str| {
            let (_, _, path) = found.iter().find(|(id, ctl, _)| *id != 0 && ctl.iter().any(|c| c == name))?;
            let m = mounts.iter().find(|m| !m.v2 && m.controllers.iter().any(|c| c == name))?;
            Some(dir_in(m, path))
        };
        let (memory, pids, cpu, v2) = match (v1("memory"), v1("pids")) {
            (Some(memory), Some(pids)) => (memory, pids, v1("cpu"), false),
            _ => {
                let d = unified.clone().ok_or_else(|| format!("process {pid} has no cgroup with the memory and pids controllers"))?;
                let cpu = d.join("cpu.max").exists().then(|| d.clone());
                (d.clone(), d, cpu, true)
            }
        };
        Ok(SlotCgroup { memory, pids, cpu, unified, v2, procs: Vec::new(), last: Default::default(), owned: Vec::new() })
    }

    /// A cgroup inside this one for one exec of a session (`name`): its processes are
    /// held by this slot's limits and can be killed, and waited for, apart from the
    /// slot's other processes. Made in the v2 hierarchy (or, without one, in the v1
    /// pids hierarchy); the slot's other v1 controllers hold it as they hold the slot.
    pub fn child(&self, name: &str) -> Result<SlotCgroup, String> {
        let parent = self.unified.as_ref().unwrap_or(&self.pids);
        let d = parent.join(name);
        match fs::create_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot make cgroup {}: {e}", d.display())),
        }
        let mut dirs = vec![d.clone()];
        if !self.v2 {
            // The v1 controllers' slot directories, but the one the child is made in.
            for c in [Some(&self.memory), Some(&self.pids), self.cpu.as_ref()].into_iter().flatten() {
                if c != parent && !dirs.contains(c) {
                    dirs.push(c.clone());
                }
            }
        }
        let (unified, pids) = match &self.unified {
            Some(_) => (Some(d.clone()), self.pids.clone()),
            None => (None, d.clone()),
        };
        Ok(SlotCgroup {
            memory: self.memory.clone(),
            pids,
            cpu: self.cpu.clone(),
            unified,
            v2: self.v2,
            procs: open_procs(&dirs)?,
            last: Default::default(),
            owned: vec![d],
        })
    }

    /// The descriptors a child writes `0` to (itself) before it execs.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Sets the limits for the next attempt.
    pub fn limit(&self, l: Limits) -> io::Result<()> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last == Some(l) {
            return Ok(());
        }
        // Until every write below is done, the limits are no one's.
        *last = None;
        let bytes = (l.mem_mib > 0).then(|| (l.mem_mib * 1024 * 1024).to_string());
        if self.v2 {
            write(&self.memory.join("memory.max"), bytes.as_deref().unwrap_or("max"))?;
            // No swap beyond the limit: OOM is OOM, not a slow crawl.
            let _ = write(&self.memory.join("memory.swap.max"), if bytes.is_some() { "0" } else { "max" });
            write(&self.pids.join("pids.max"), &l.pids.to_string())?;
            if let Some(cpu) = &self.cpu {
                let quota = if l.millicpus > 0 { (u64::from(l.millicpus) * 100).to_string() } else { "max".into() };
                write(&cpu.join("cpu.max"), &format!("{quota} 100000"))?;
            }
        } else {
            // memsw (memory + swap) may never be below the memory limit: lift it first.
            let memsw = self.memory.join("memory.memsw.limit_in_bytes");
            let has_memsw = memsw.exists();
            if has_memsw {
                write(&memsw, "-1")?;
            }
            write(&self.memory.join("memory.limit_in_bytes"), bytes.as_deref().unwrap_or("-1"))?;
            if has_memsw && bytes.is_some() {
                write(&memsw, bytes.as_deref().unwrap_or("-1"))?;
            }
            write(&self.pids.join("pids.max"), &l.pids.to_string())?;
            if let Some(cpu) = &self.cpu {
                write(&cpu.join("cpu.cfs_period_us"), "100000")?;
                let quota = if l.millicpus > 0 { (u64::from(l.millicpus) * 100).to_string() } else { "-1".into() };
                write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
            }
        }
        *last = Some(l);
        Ok(())
    }

    /// How many processes of this cgroup the kernel has killed for memory so far.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 { ("memory.events", "oom_kill") } else { ("memory.oom_control", "oom_kill") };
        read(&self.memory.join(file)).ok().and_then(|t| keyed(&t, key)).unwrap_or(0)
    }

    /// The processes in it now.
    pub fn members(&self) -> Vec<i32> {
        let dir = self.unified.as_ref().unwrap_or(&self.pids);
        read(&dir.join("cgroup.procs")).map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect()).unwrap_or_default()
    }

    /// Sends `sig` to every process in it.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        for pid in self.members() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// Kills every process in it: at once with `cgroup.kill` (v2), else SIGKILL to each
    /// member until none is left (pids.max bounds how many there can be).
    pub fn kill(&self) {
        if let Some(u) = &self.unified {
            if write(&u.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for _ in 0..64 {
            let m = self.members();
            if m.is_empty() {
                return;
            }
            for pid in m {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Whether a process is still in it.
    pub fn populated(&self) -> bool {
        match &self.unified {
            Some(u) => read(&u.join("cgroup.events")).ok().and_then(|t| keyed(&t, "populated")).map_or_else(|| !self.members().is_empty(), |p| p > 0),
            None => !self.members().is_empty(),
        }
    }

    /// Waits until no process is left in it, or `within` passes (false). With the v2
    /// hierarchy the kernel says when (`cgroup.events` changes, seen through inotify, on
    /// a blocking thread); without it, the members are looked at again each few ms.
    pub async fn emptied(&self, within: Duration) -> bool {
        if !self.populated() {
            return true;
        }
        match &self.unified {
            Some(u) => {
                let events = u.join("cgroup.events");
                tokio::task::spawn_blocking(move || wait_unpopulated(&events, within)).await.unwrap_or(false)
            }
            None => {
                // Only on hosts without the v2 hierarchy.
                let deadline = tokio::time::Instant::now() + within;
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if !self.populated() {
                        return true;
                    }
                }
                !self.populated()
            }
        }
    }
}

fn events_populated(events: &Path) -> bool {
    read(events).ok().and_then(|t| keyed(&t, "populated")).is_none_or(|p| p > 0)
}

/// Blocks until `cgroup.events` says `populated 0`, or `within` passes (false).
fn wait_unpopulated(events: &Path, within: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + within;
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).and_then(|i| i.add_watch(events, AddWatchFlags::IN_MODIFY).map(|_| i));
    loop {
        // Looked at after the watch exists, so a change in between is not missed.
        if !events_populated(events) {
            return true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        match &watch {
            Ok(i) => {
                let mut fds = [PollFd::new(i.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, ms);
                let _ = i.read_events();
            }
            // No inotify (out of watches): look again shortly.
            Err(_) => std::thread::sleep(Duration::from_millis(5).min(left)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_and_escapes() {
        assert_eq!(keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(keyed("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n", "oom"), Some(1));
        assert_eq!(keyed("populated 0\nfrozen 0\n", "populated"), Some(0));
        assert_eq!(unescape("/a\\040b"), "/a b");
        let m = Mount { point: "/sys/fs/cgroup/memory".into(), root: "/".into(), controllers: vec!["memory".into()], v2: false };
        assert_eq!(dir_in(&m, "/x/y"), PathBuf::from("/sys/fs/cgroup/memory/x/y"));
        let m = Mount { point: "/sys/fs/cgroup".into(), root: "/x".into(), controllers: vec![], v2: true };
        assert_eq!(dir_in(&m, "/x/y"), PathBuf::from("/sys/fs/cgroup/y"));
    }
}
