//! Freezing: a stopped container committed with a copy of its workspace into
//! `berth-frozen:TAG` (through an untagged intermediate image and a helper container),
//! and the reverse, a workspace filled from a frozen image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use berth_shared::job::FROZEN_REPO;
use bollard::models::{ContainerConfig, ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;

use super::spec::{frozen_labels, helper_labels};
use super::{message, ContainerSpec, Engine};
use crate::executor::Launch;

/// Creates (never starts) a helper container from `image`, without mounts or network.
async fn create_helper(docker: &Docker, name: &str, image: &str, labels: HashMap<String, String>) -> Result<(), String> {
    let body = ContainerCreateBody {
        image: Some(image.into()),
        // Never run; a command is only needed for an image that has none.
        cmd: Some(vec!["true".into()]),
        labels: Some(labels),
        host_config: Some(HostConfig { network_mode: Some("none".into()), ..Default::default() }),
        ..Default::default()
    };
    docker.create_container(Some(CreateContainerOptionsBuilder::new().name(name).build()), body).await.map(|_| ()).map_err(|e| message(&e))
}

/// Commits the stopped container, with a copy of its workspace, to `berth-frozen:TAG`,
/// with `launch.argv` as its command and, when given, `entrypoint` as its entrypoint
/// (a session's container runs berth's agent, which must not stay in the image).
pub(super) async fn freeze_into(
    engine: &Engine,
    c: &ContainerSpec,
    launch: &Launch,
    tag: &str,
    env: Vec<String>,
    entrypoint: Option<Vec<String>>,
) -> Result<String, String> {
    let docker = engine.client();
    berth_shared::job::validate_tag(tag)?;
    let image = format!("{FROZEN_REPO}:{tag}");
    let workspace_dir = format!("/.berth/ws/{}", c.lease());
    // 1. The container as it is, untagged: the final image builds on it.
    let opts = CommitContainerOptionsBuilder::new().container(&c.name).pause(false).comment("berth freeze (intermediate)").build();
    let config = ContainerConfig { env: Some(env.clone()), entrypoint: entrypoint.clone(), labels: Some(frozen_labels(c, false, "")), ..Default::default() };
    let stage = docker.commit_container(opts, config).await.map_err(|e| format!("cannot commit the container: {}", message(&e)))?.id;
    let helper = format!("{}-freeze", c.name);
    let tar = launch.workspace.with_extension("freeze.tar");
    let r = async {
        // 2. The workspace, into a helper made from it (no mount hides the directory).
        create_helper(docker, &helper, &stage, helper_labels(c, "freeze")).await.map_err(|e| format!("cannot create the freeze helper: {e}"))?;
        let (dir, src, out) = (workspace_dir.trim_start_matches('/').to_string(), launch.workspace.clone(), tar.clone());
        tokio::task::spawn_blocking(move || write_tar(&out, &dir, &src))
            .await
            .map_err(|e| format!("the workspace archive task failed: {e}"))?
            .map_err(|e| format!("cannot archive the workspace: {e}"))?;
        let file = tokio::fs::File::open(&tar).await.map_err(|e| format!("cannot read the workspace archive: {e}"))?;
        let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
        docker
            .upload_to_container(&helper, Some(UploadToContainerOptionsBuilder::new().path("/").build()), body)
            .await
            .map_err(|e| format!("cannot copy the workspace into the image: {}", message(&e)))?;
        // 3. The whole, tagged, with the job's command as its own.
        let opts = CommitContainerOptionsBuilder::new().container(&helper).repo(FROZEN_REPO).tag(tag).pause(false).comment("berth freeze").build();
        let config = ContainerConfig {
            env: Some(env),
            cmd: Some(launch.argv.clone()),
            entrypoint,
            labels: Some(frozen_labels(c, true, &workspace_dir)),
            ..Default::default()
        };
        docker.commit_container(opts, config).await.map_err(|e| format!("cannot commit the frozen image: {}", message(&e)))?;
        Ok::<(), String>(())
    }
    .await;
    let _ = tokio::fs::remove_file(&tar).await;
    if let Err(e) = engine.remove_container(&helper).await {
        tracing::warn!(container = %helper, error = %e, "cannot remove the freeze helper; the next sweep removes it");
    }
    if let Err(e) = r {
        // The intermediate image is of no use on its own.
        let _ = engine.remove_image_id(&stage).await;
        return Err(e);
    }
    Ok(image)
}

/// Archives `src` as the directory `dir` (symlinks kept as links, not followed).
fn write_tar(out: &Path, dir: &str, src: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(out)?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(dir, src)?;
    b.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Fills `workspace` with the directory `dir` of `image` (a frozen image's workspace).
pub(super) async fn seed_workspace(engine: &Engine, c: &ContainerSpec, dir: &str, workspace: &Path) -> Result<(), String> {
    let docker = engine.client();
    let helper = format!("{}-seed", c.name);
    let tar = workspace.with_extension("seed.tar");
    let unpacked = workspace.with_extension("seed");
    let r = async {
        create_helper(docker, &helper, &c.image, helper_labels(c, "seed")).await?;
        let mut stream = docker.download_from_container(&helper, Some(DownloadFromContainerOptionsBuilder::new().path(dir).build()));
        let mut file = tokio::fs::File::create(&tar).await.map_err(|e| e.to_string())?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| message(&e))?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await.map_err(|e| e.to_string())?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| e.to_string())?;
        drop(file);
        let (tar, unpacked, workspace) = (tar.clone(), unpacked.clone(), workspace.to_path_buf());
        let base = Path::new(dir).file_name().map(PathBuf::from).ok_or_else(|| format!("`{dir}` names no directory"))?;
        tokio::task::spawn_blocking(move || unpack_into(&tar, &unpacked, &base, &workspace)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    }
    .await;
    let _ = tokio::fs::remove_file(&tar).await;
    let _ = tokio::fs::remove_dir_all(&unpacked).await;
    if let Err(e) = engine.remove_container(&helper).await {
        tracing::warn!(container = %helper, error = %e, "cannot remove the seed helper; the next sweep removes it");
    }
    r
}

/// Unpacks `tar` (safely: nothing lands outside `scratch`) and puts its directory
/// `base` in the place of `workspace`.
fn unpack_into(tar: &Path, scratch: &Path, base: &Path, workspace: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch)?;
    let mut a = tar::Archive::new(std::io::BufReader::new(std::fs::File::open(tar)?));
    a.set_preserve_permissions(true);
    a.set_overwrite(true);
    a.unpack(scratch)?;
    let from = scratch.join(base);
    if !from.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the image's workspace directory is not in the archive"));
    }
    match std::fs::remove_dir_all(workspace) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::rename(from, workspace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_archives_round_trip_without_escaping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("sub")).expect("mkdir");
        std::fs::write(ws.join("sub/f"), b"state\n").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", ws.join("link")).expect("symlink");
        let tar = dir.path().join("a.tar");
        write_tar(&tar, ".berth/ws/x", &ws).expect("archive");
        let target = dir.path().join("slot");
        std::fs::create_dir_all(&target).expect("mkdir");
        std::fs::write(target.join("stale"), b"old").expect("write");
        // The archive holds `.berth/ws/x/...`; what the engine sends back for that path
        // holds `x/...`, so unpack a re-rooted copy.
        let rerooted = dir.path().join("b.tar");
        write_tar(&rerooted, "x", &ws).expect("archive");
        unpack_into(&rerooted, &dir.path().join("scratch"), Path::new("x"), &target).expect("unpack");
        assert_eq!(std::fs::read_to_string(target.join("sub/f")).expect("read"), "state\n");
        assert!(!target.join("stale").exists(), "the workspace is replaced, not merged");
        assert_eq!(std::fs::read_link(target.join("link")).expect("a link"), Path::new("/etc/passwd"));
        assert!(unpack_into(&rerooted, &dir.path().join("scratch2"), Path::new("y"), &target).is_err());
    }
}
