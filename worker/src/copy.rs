//! Copies into and out of the workspaces of the sessions this worker holds: the
//! coordinator opens a bi stream per copy (`CopyRequest`), the worker answers `Ready`
//! and the tar stream's bytes follow, raw, to the end of the stream. Every path is
//! resolved inside the session's workspace (`berth_shared::archive::resolve_in`:
//! absolute paths, `..` and symlinks pointing out are refused), and what is unpacked
//! is owned by the session's user.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_shared::archive::{self, resolve_in};
use berth_shared::codec::{read_frame, write_frame};
use berth_shared::ids::LeaseId;
use berth_shared::wire::{CopyReply, CopyRequest};
use tokio_util::io::SyncIoBridge;

/// The workspace of a session this worker holds, and whose its files are.
#[derive(Clone, Debug)]
pub struct SessionDir {
    pub slot: usize,
    pub workspace: PathBuf,
    pub owner: Option<(u32, u32)>,
}

/// The sessions open here, by lease (kept by the run loop).
pub type Sessions = Arc<Mutex<HashMap<LeaseId, SessionDir>>>;

/// Serves the copy streams the coordinator opens on this connection.
pub async fn accept(conn: quinn::Connection, sessions: Sessions) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve(send, recv, sessions.clone()));
    }
}

/// Answers a copy that cannot be made, with why, and ends the stream.
async fn refuse(send: &mut quinn::SendStream, why: String) {
    let _ = write_frame(send, &CopyReply::Failed(why)).await;
    let _ = send.finish();
}

async fn serve(mut send: quinn::SendStream, mut recv: quinn::RecvStream, sessions: Sessions) {
    let req = match read_frame::<_, CopyRequest>(&mut recv).await {
        Ok(Some(r)) => r,
        _ => return,
    };
    let lease = match &req {
        CopyRequest::In { lease, .. } | CopyRequest::Out { lease, .. } => *lease,
    };
    let Some(dir) = sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&lease).cloned() else {
        refuse(&mut send, "the session is not open on this worker".into()).await;
        return;
    };
    match req {
        CopyRequest::In { dest, name, .. } => {
            let target = match target_in(&dir.workspace, &dest, &name) {
                Ok(t) => t,
                Err(why) => {
                    refuse(&mut send, why).await;
                    return;
                }
            };
            if write_frame(&mut send, &CopyReply::Ready).await.is_err() {
                return;
            }
            let input = SyncIoBridge::new(recv);
            let owner = dir.owner;
            let done = tokio::task::spawn_blocking(move || target.unpack(input, owner)).await;
            let reply = match done {
                Ok(Ok(s)) => CopyReply::Done { files: s.files, dirs: s.dirs, symlinks: s.symlinks, bytes: s.bytes },
                Ok(Err(why)) => CopyReply::Failed(why),
                Err(e) => CopyReply::Failed(format!("the copy stopped: {e}")),
            };
            let _ = write_frame(&mut send, &reply).await;
            let _ = send.finish();
        }
        CopyRequest::Out { path, .. } => {
            let src = match resolve_in(&dir.workspace, &path) {
                Ok(p) if std::fs::symlink_metadata(&p).is_ok() => Ok(p),
                Ok(_) => Err(format!("{}: no such file or directory in the session's workspace", berth_shared::text::escape(&path))),
                Err(e) => Err(e.to_string()),
            };
            let src = match src {
                Ok(p) => p,
                Err(why) => {
                    refuse(&mut send, why).await;
                    return;
                }
            };
            if write_frame(&mut send, &CopyReply::Ready).await.is_err() {
                return;
            }
            let name = entry_name(&path);
            let out = SyncIoBridge::new(send);
            let packed = tokio::task::spawn_blocking(move || {
                let mut out = out;
                let r = archive::pack(&src, &name, &mut out).map_err(|e| e.to_string());
                (r, out.into_inner())
            })
            .await;
            match packed {
                Ok((Ok(_), mut send)) => {
                    let _ = send.finish();
                }
                Ok((Err(why), mut send)) => {
                    tracing::warn!(lease = %lease, reason = %why, "a copy out of a session failed midway");
                    let _ = send.reset(1u32.into());
                }
                Err(_) => {}
            }
        }
    }
}

/// What the entries of a copy out of `path` are named under: its last component (`.`
/// for the workspace itself: its contents).
pub fn entry_name(path: &str) -> String {
    match path.trim_end_matches('/').rsplit('/').next() {
        None | Some("") | Some(".") => ".".into(),
        Some(n) => n.to_string(),
    }
}

/// Where a copy in goes: into an existing directory, or saved under a new name.
enum Target {
    /// Unpacked into this directory (the entries bring their name).
    Into(PathBuf),
    /// Unpacked into a scratch directory beside `to`, then `name` is moved to `to`.
    As { scratch: PathBuf, name: String, to: PathBuf },
}

fn target_in(workspace: &Path, dest: &str, name: &str) -> Result<Target, String> {
    let resolved = resolve_in(workspace, dest).map_err(|e| e.to_string())?;
    if resolved.is_dir() || name == "." {
        if !resolved.is_dir() {
            return Err(format!("{}: no such directory in the session's workspace", berth_shared::text::escape(dest)));
        }
        return Ok(Target::Into(resolved));
    }
    let parent = resolved.parent().filter(|p| p.starts_with(workspace.canonicalize().unwrap_or_else(|_| workspace.to_path_buf())) && p.is_dir());
    let Some(parent) = parent else {
        return Err(format!("{}: its directory does not exist in the session's workspace", berth_shared::text::escape(dest)));
    };
    let scratch = parent.join(format!(".berth-copy-{}", uuid::Uuid::new_v4().simple()));
    Ok(Target::As { scratch, name: name.to_string(), to: resolved })
}

impl Target {
    fn unpack(self, input: impl std::io::Read, owner: Option<(u32, u32)>) -> Result<archive::UnpackStats, String> {
        match self {
            Target::Into(dir) => archive::unpack(&dir, input, owner).map_err(|e| e.to_string()),
            Target::As { scratch, name, to } => {
                std::fs::create_dir(&scratch).map_err(|e| format!("cannot copy into the workspace: {e}"))?;
                let r = archive::unpack(&scratch, input, owner).map_err(|e| e.to_string()).and_then(|stats| {
                    std::fs::rename(scratch.join(&name), &to).map_err(|e| format!("cannot save the copy as {}: {e}", to.display()))?;
                    Ok(stats)
                });
                let _ = std::fs::remove_dir_all(&scratch);
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_out_are_named_by_their_last_component() {
        assert_eq!(entry_name("."), ".");
        assert_eq!(entry_name(""), ".");
        assert_eq!(entry_name("src/"), "src");
        assert_eq!(entry_name("a/b/c.txt"), "c.txt");
    }

    #[test]
    fn a_copy_in_goes_into_a_directory_or_under_a_new_name() {
        let w = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(w.path().join("d")).expect("mkdir");
        assert!(matches!(target_in(w.path(), "d", "x"), Ok(Target::Into(_))));
        assert!(matches!(target_in(w.path(), "new", "x"), Ok(Target::As { .. })));
        assert!(target_in(w.path(), "missing/new", "x").is_err());
        assert!(target_in(w.path(), "../out", "x").is_err());
    }
}
