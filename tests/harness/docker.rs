//! Docker for the end-to-end tests and the bench: whether an engine is there (under
//! `CI=true` it must be), and a tiny test image made without any registry: Debian's
//! `busybox-static` in an empty root (applets linked, `/etc/passwd`, `/tmp` 1777, an
//! empty `/workspace`), imported with `docker import` and labelled `berth.test=1`.
//!
//! The image is made once per process and shared by the tests running at the same time;
//! the last one to let go of it removes it (the next one imports it again from the
//! cached root, which takes a tenth of a second). Images a killed test process left
//! behind are removed by the next run. Nothing without the `berth.test` label is touched.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::run_timeout;

/// The label on everything the tests make in the engine.
pub const TEST_LABEL: &str = "berth.test";
/// Which test process made an image (its pid), so a later run can tell leftovers.
const PID_LABEL: &str = "berth.test.pid";

/// `docker ARGS` with a deadline.
pub fn docker(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("docker");
    cmd.args(args).stdin(Stdio::null());
    run_timeout(cmd, Duration::from_secs(120)).with_context(|| format!("docker {args:?}"))
}

/// `docker ARGS`, which must succeed; its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> Result<String> {
    let out = docker(args)?;
    if !out.status.success() {
        bail!("docker {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether Docker tests can run. Under `CI=true` an engine that does not answer is a
/// failure (panics); elsewhere the test prints a skip line and returns.
pub fn available(test: &str) -> bool {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let up = UP.get_or_init(|| match docker(&["version", "--format", "{{.Server.Version}}"]) {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("{e:#}")),
    });
    match up {
        Ok(()) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("CI=true and the Docker engine does not answer (`docker version`): {e}"),
        Err(e) => {
            eprintln!("skipped {test}: no Docker engine answers (`docker version`: {e})");
            false
        }
    }
}

/// A root file system with busybox, as a tar (made once per process).
fn rootfs_tar() -> Result<&'static Path> {
    static TAR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TAR.get_or_init(|| make_rootfs_tar().map_err(|e| format!("{e:#}"))).as_deref().map_err(|e| anyhow::anyhow!("cannot make the test image's root: {e}"))
}

/// Debian's `busybox-static` package, downloaded once into the target dir
/// (`target/tmp/busybox-static`) and kept there between runs.
pub fn busybox_deb() -> Result<&'static Path> {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DEB.get_or_init(|| download_busybox_deb().map_err(|e| format!("{e:#}"))).as_deref().map_err(|e| anyhow::anyhow!("cannot get busybox-static: {e}"))
}

/// The cache directory for the package and the test roots.
fn busybox_cache() -> Result<PathBuf> {
    // target/tmp, next to target/<profile>/deps/<this test binary>.
    let exe = std::env::current_exe()?;
    let target = exe.ancestors().nth(3).context("no target dir above the test binary")?;
    let cache = target.join("tmp").join("busybox-static");
    std::fs::create_dir_all(&cache)?;
    Ok(cache)
}

fn download_busybox_deb() -> Result<PathBuf> {
    let cache = busybox_cache()?;
    let has_deb = |d: &Path| -> Option<PathBuf> { std::fs::read_dir(d).ok()?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "deb")) };
    Ok(match has_deb(&cache) {
        Some(d) => d,
        None => {
            // Into a directory of this process's, then renamed into place: test processes
            // that start together (nextest) never read a half-written package.
            let dl = cache.join(format!("dl-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dl);
            std::fs::create_dir_all(&dl)?;
            let download = || {
                let mut cmd = Command::new("apt-get");
                cmd.args(["download", "-qq", "busybox-static"]).current_dir(&dl).stdin(Stdio::null());
                run_timeout(cmd, Duration::from_secs(120))
            };
            let first = download()?;
            if !first.status.success() {
                // A fresh machine may have no package lists yet.
                let mut update = Command::new("apt-get");
                update.args(["update", "-qq"]).stdin(Stdio::null());
                run_timeout(update, Duration::from_secs(300))?;
                let again = download()?;
                if !again.status.success() {
                    bail!("apt-get download busybox-static failed: {}", String::from_utf8_lossy(&again.stderr).trim());
                }
            }
            let got = has_deb(&dl).context("apt-get download left no .deb")?;
            let deb = cache.join(got.file_name().context("a file name")?);
            std::fs::rename(&got, &deb)?;
            let _ = std::fs::remove_dir_all(&dl);
            deb
        }
    })
}

fn make_rootfs_tar() -> Result<PathBuf> {
    let cache = busybox_cache()?;
    let deb = busybox_deb()?;
    // Roots of earlier test processes that are gone.
    for e in std::fs::read_dir(&cache)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("root-").or_else(|| name.strip_prefix("dl-"));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let work = cache.join(format!("root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let unpacked = work.join("deb");
    let root = work.join("root");
    std::fs::create_dir_all(&unpacked)?;
    let mut x = Command::new("dpkg-deb");
    x.arg("-x").arg(deb).arg(&unpacked);
    let out = run_timeout(x, Duration::from_secs(60))?;
    if !out.status.success() {
        bail!("dpkg-deb -x {} failed: {}", deb.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    for d in ["bin", "etc", "tmp", "root", "workspace"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(unpacked.join("bin/busybox"), root.join("bin/busybox"))?;
    let list = Command::new(root.join("bin/busybox")).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let tar = work.join("root.tar");
    let mut t = Command::new("tar");
    t.args(["--numeric-owner", "--owner=0", "--group=0", "-C"]).arg(&root).args(["-cf"]).arg(&tar).arg(".");
    let out = run_timeout(t, Duration::from_secs(60))?;
    if !out.status.success() {
        bail!("tar of the test root failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(tar)
}

struct Shared {
    users: usize,
    tag: Option<String>,
}

static SHARED: Mutex<Shared> = Mutex::new(Shared { users: 0, tag: None });

/// The test image, while held; the last holder removes it.
pub struct TestImage {
    pub name: String,
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let mut s = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        s.users -= 1;
        if s.users == 0 {
            if let Some(tag) = s.tag.take() {
                // Refused while a container still uses it; the next run removes it then.
                let _ = docker(&["rmi", &tag]);
            }
        }
    }
}

/// Holds the test image (importing it if no test holds it now).
pub fn test_image() -> Result<TestImage> {
    let tar = rootfs_tar()?;
    let mut s = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if s.tag.is_none() {
        remove_leftovers();
        let tag = format!("berth-test-busybox:{}", std::process::id());
        let tar_file = std::fs::File::open(tar)?;
        let mut cmd = Command::new("docker");
        cmd.args([
            "import",
            "-c",
            "ENV PATH=/bin",
            "-c",
            "CMD [\"/bin/sh\"]",
            "-c",
            &format!("LABEL {TEST_LABEL}=1 {PID_LABEL}={}", std::process::id()),
            "-",
            &tag,
        ])
        .stdin(tar_file);
        let out = run_timeout(cmd, Duration::from_secs(120))?;
        if !out.status.success() {
            bail!("docker import failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        s.tag = Some(tag);
    }
    s.users += 1;
    Ok(TestImage { name: s.tag.clone().unwrap_or_default() })
}

/// Removes test images whose process is gone (a killed test run). Never forced: an
/// image a container still uses stays.
fn remove_leftovers() {
    let Ok(list) = docker_ok(&["images", "--filter", &format!("label={TEST_LABEL}=1"), "--format", "{{.ID}} {{.Repository}}:{{.Tag}}"]) else { return };
    for line in list.lines() {
        let Some((id, name)) = line.split_once(' ') else { continue };
        let pid = docker_ok(&["image", "inspect", id, "--format", &format!("{{{{index .Config.Labels \"{PID_LABEL}\"}}}}")]).ok();
        let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid == std::process::id() as i32 || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = docker(&["rmi", name]);
    }
}

/// Containers carrying a label `KEY=VALUE` (running or not): their ids.
pub fn containers_with(label: &str) -> Result<Vec<String>> {
    Ok(docker_ok(&["ps", "-aq", "--filter", &format!("label={label}")])?.lines().map(String::from).collect())
}
