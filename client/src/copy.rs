//! Copies in and out of a session's workspace: a tar stream (`berth_shared::archive`)
//! sent after `CopyIn` or read after `CopyOut`, relayed raw by the coordinator. The
//! CLI's `berth cp`, `session open --workdir` and `close --sync-out`, and the Python
//! client's upload, download and syncs all go through here.

use berth_shared::ids::JobSelector;
use berth_shared::wire::{Request, Response};

use crate::api::{unexpected, Client};
use crate::exit::{Fail, EXIT_FAILURE};

/// The name a copy's entries are under: the path's last component (`.` for a
/// directory's contents: `DIR/.`, or the workspace itself).
fn last_name(path: &str) -> String {
    match path.trim_end_matches('/').rsplit('/').next() {
        None | Some("") | Some(".") => ".".into(),
        Some(n) => n.to_string(),
    }
}

/// Sends `from` (a file or directory) into a session: saved as `dest`, or in it when
/// `dest` is a directory there. Returns files, directories, links, bytes.
pub async fn copy_in(client: &Client, from: &std::path::Path, session: JobSelector, dest: &str) -> Result<(u64, u64, u64, u64), Fail> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| Fail::usage(format!("{}: {e}", from.display())))?;
    let name = if meta.is_dir() && from.to_string_lossy().trim_end_matches('/').ends_with("/.") {
        ".".to_string()
    } else {
        match from.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => ".".to_string(),
        }
    };
    let req = Request::CopyIn { session, dest: dest.to_string(), name: name.clone() };
    let (mut r, send) = client.open_with_input(&req).await?;
    let Some(send) = send else { return Err(Fail::new(EXIT_FAILURE, "no stream to send the copy on")) };
    match r.next().await? {
        Some(Response::CopyReady) => {}
        Some(other) => return Err(unexpected(other)),
        None => return Err(Fail::lost("the coordinator ended the copy before it began")),
    }
    let from = from.to_path_buf();
    let packing = tokio::task::spawn_blocking(move || {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, tokio_util::io::SyncIoBridge::new(send));
        let r = berth_shared::archive::pack(&from, &name, &mut out).map_err(|e| e.to_string());
        let r = r.and_then(|s| std::io::Write::flush(&mut out).map(|()| s).map_err(|e| format!("cannot send the copy: {e}")));
        if let Ok(bridge) = out.into_inner() {
            let mut send = bridge.into_inner();
            let _ = send.finish();
        }
        r
    });
    let packed = packing.await.map_err(|e| Fail::new(EXIT_FAILURE, format!("the copy stopped: {e}")))?;
    packed.map_err(|e| Fail::usage(format!("cannot copy: {e}")))?;
    match r.next().await? {
        Some(Response::Copied { files, dirs, symlinks, bytes }) => Ok((files, dirs, symlinks, bytes)),
        Some(other) => Err(unexpected(other)),
        None => Err(Fail::lost("the coordinator ended the copy before it was unpacked")),
    }
}

/// Fetches `path` of a session into `to`: saved as `to`, or in it when `to` is a
/// directory (`.`, the workspace, fills `to` with its contents).
pub async fn copy_out(client: &Client, session: JobSelector, path: &str, to: &std::path::Path) -> Result<berth_shared::archive::UnpackStats, Fail> {
    let name = last_name(path);
    let mut r = client.open(&Request::CopyOut { session, path: path.to_string() }).await?;
    match r.next().await? {
        Some(Response::CopyReady) => {}
        Some(other) => return Err(unexpected(other)),
        None => return Err(Fail::lost("the coordinator ended the copy before it began")),
    }
    let recv = r.into_raw();
    let to = to.to_path_buf();
    let unpacking = tokio::task::spawn_blocking(move || -> Result<berth_shared::archive::UnpackStats, String> {
        let input = std::io::BufReader::with_capacity(1 << 20, tokio_util::io::SyncIoBridge::new(recv));
        if to.is_dir() {
            return berth_shared::archive::unpack(&to, input, None).map_err(|e| e.to_string());
        }
        // Saved under a new name: unpacked beside it first, then moved into place.
        let parent = match to.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let scratch = parent.join(format!(".berth-copy-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&scratch).map_err(|e| format!("cannot write into {}: {e}", parent.display()))?;
        let r = berth_shared::archive::unpack(&scratch, input, None).map_err(|e| e.to_string()).and_then(|s| {
            let from = if name == "." { scratch.clone() } else { scratch.join(&name) };
            std::fs::rename(&from, &to).map_err(|e| format!("cannot save the copy as {}: {e}", to.display()))?;
            Ok(s)
        });
        let _ = std::fs::remove_dir_all(&scratch);
        r
    });
    unpacking.await.map_err(|e| Fail::new(EXIT_FAILURE, format!("the copy stopped: {e}")))?.map_err(|e| Fail::lost(format!("the copy failed: {e}")))
}
