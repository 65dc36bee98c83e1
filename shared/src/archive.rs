//! Session copies (`berth cp PATH SID:DEST`, `berth cp SID:PATH DEST`): a path checked
//! to stay inside a workspace, and the tar stream that carries files, directories,
//! modes and symlinks in and out of it. The client packs and unpacks local files, the
//! worker its workspaces; in both, nothing is ever read or written outside the tree
//! it was given.
//!
//! The checks are made on the tree as it stands while the copy runs: each parent is
//! looked at (never through a symlink) just before something is written under it, and
//! files are opened without following a symlink at their own name. A process that keeps
//! swapping directories for symlinks in the same tree while a copy runs is not defended
//! against beyond that; the worker copies into a workspace, not across users.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tar::{Builder, EntryType, Header, HeaderMode};

/// How many symlinks `resolve_in` follows before it calls the path a loop (as Linux
/// does with ELOOP).
const MAX_SYMLINK_HOPS: usize = 40;

/// Why a copy was refused or failed. Each message is one line naming the path; the
/// cause of an I/O failure is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The path a user gave would reach outside the workspace.
    #[error("the path {path} leaves the workspace ({reason}): give a path inside it")]
    Outside { path: String, reason: String },
    /// The path cannot be followed to an end (a symlink loop).
    #[error("the path {path} cannot be resolved: {reason}")]
    Unresolvable { path: String, reason: String },
    /// The name the entries are packed under is not a plain relative path.
    #[error("the archive name {name:?} is refused ({reason}): give a relative name such as \"proj\"")]
    Name { name: String, reason: String },
    /// An entry of the incoming archive would write outside the destination or is of a
    /// kind that is never extracted; nothing of it was written.
    #[error("the archive entry {entry} is refused: {reason}")]
    Refused { entry: String, reason: String },
    /// The destination given to `unpack` is not a directory.
    #[error("the destination {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// A file system operation failed.
    #[error("could not {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The incoming stream is not a readable tar archive (or the connection broke).
    #[error("could not read the tar stream")]
    Stream {
        #[source]
        source: io::Error,
    },
}

/// What `pack` put into the archive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file contents (not counting tar headers and padding).
    pub bytes: u64,
    /// Fifos, sockets and devices, which are never copied.
    pub skipped: u64,
}

/// What `unpack` created (directories it had to make for a deeper entry not counted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io { op, path: path.to_path_buf(), source }
}

/// One step of a walk: into a named child, or up to the parent (only symlink targets
/// have those; a user's path with `..` is refused before the walk).
enum Step {
    Name(OsString),
    Up,
}

/// The steps a symlink target (or the part of an absolute one inside the workspace)
/// takes, in order.
fn steps_of(target: &Path) -> Vec<Step> {
    target
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Step::Name(n.to_os_string())),
            Component::ParentDir => Some(Step::Up),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// The path `rel` (as a user wrote it, `/`-separated) inside the workspace `root`.
///
/// Refused: an absolute path, a `..` component, a NUL byte, and a path whose existing
/// part goes through a symlink that points outside `root`. Symlinks are followed one
/// component at a time, only while they stay inside, so the result names the real
/// place (under `root`'s canonical path) and the caller never follows a link out. The
/// part of the path that does not exist yet is appended as written. `""` and `"."` are
/// `root` itself.
pub fn resolve_in(root: &Path, rel: &str) -> Result<PathBuf, ArchiveError> {
    let outside = |reason: String| ArchiveError::Outside { path: rel.to_string(), reason };
    if rel.contains('\0') {
        return Err(outside("it has a NUL byte".into()));
    }
    if rel.starts_with('/') {
        return Err(outside("it is absolute".into()));
    }
    let mut pending: VecDeque<Step> = VecDeque::new();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(outside("\"..\"".into())),
            p => pending.push_back(Step::Name(p.into())),
        }
    }
    let base = fs::canonicalize(root).map_err(io_err("open the workspace", root))?;
    let mut cur = base.clone();
    // Once a component is missing nothing below it exists, so no more links to follow.
    let mut exists = true;
    let mut hops = 0;
    // The symlink followed last, for the message when its target climbs out.
    let mut last_link = String::new();
    while let Some(step) = pending.pop_front() {
        let name = match step {
            Step::Up => {
                if cur == base {
                    return Err(outside(format!("the symlink {last_link} points outside it")));
                }
                cur.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let next = cur.join(&name);
        if !exists {
            cur = next;
            continue;
        }
        let meta = match fs::symlink_metadata(&next) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                exists = false;
                cur = next;
                continue;
            }
            Err(source) => return Err(ArchiveError::Io { op: "look at", path: next, source }),
        };
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(ArchiveError::Unresolvable {
                path: rel.to_string(),
                reason: format!("it goes through more than {MAX_SYMLINK_HOPS} symlinks (a loop?)"),
            });
        }
        let target = fs::read_link(&next).map_err(io_err("read the symlink", &next))?;
        last_link = next.strip_prefix(&base).unwrap_or(&next).display().to_string();
        let steps = if target.is_absolute() {
            // Inside only if it names the workspace by its real path or as it was given.
            let inside = target.strip_prefix(&base).ok().or_else(|| root.is_absolute().then(|| target.strip_prefix(root).ok()).flatten());
            let Some(inside) = inside else {
                return Err(outside(format!("the symlink {last_link} points outside it")));
            };
            let steps = steps_of(inside);
            cur = base.clone();
            steps
        } else {
            steps_of(&target)
        };
        for step in steps.into_iter().rev() {
            pending.push_front(step);
        }
    }
    Ok(cur)
}

/// Checks the name entries are packed under: relative, with at least one plain
/// component and no `..`; or `.`: a directory's contents, under `./`.
fn check_name(name: &str) -> Result<PathBuf, ArchiveError> {
    let refuse = |reason: &str| ArchiveError::Name { name: name.to_string(), reason: reason.to_string() };
    if name.contains('\0') {
        return Err(refuse("it has a NUL byte"));
    }
    if name.starts_with('/') {
        return Err(refuse("it is absolute"));
    }
    let mut out = PathBuf::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(refuse("\"..\"")),
            p => out.push(p),
        }
    }
    if out.as_os_str().is_empty() {
        if name.split('/').any(|p| p == ".") {
            return Ok(PathBuf::from("."));
        }
        return Err(refuse("it is empty"));
    }
    Ok(out)
}

/// The header for `meta` with its mode (permission bits only) and mtime kept.
fn header_for(meta: &fs::Metadata) -> Header {
    let mut h = Header::new_gnu();
    h.set_metadata_in_mode(meta, HeaderMode::Complete);
    h.set_mode(meta.mode() & 0o7777);
    h.set_mtime(meta.mtime().max(0) as u64);
    h
}

/// Reads exactly `left` bytes: a file that grew while packed is cut at the size its
/// header announced, one that shrank is padded with zeros, so the stream stays valid.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            buf[..want].fill(0);
            n = want;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes a tar stream of the file, directory or symlink `src` to `out`, its entries
/// named under `name` (`pack("/w/proj", "proj", ..)` gives `proj`, `proj/a.txt`, ...).
///
/// Streams: one file's contents pass through at a time. Modes, mtimes and owners are
/// kept; symlinks (`src` itself included) are stored as symlinks and never followed;
/// fifos, sockets and devices are skipped and counted. Directory entries come sorted by
/// name, so the same tree gives the same stream.
pub fn pack(src: &Path, name: &str, out: impl Write) -> Result<PackStats, ArchiveError> {
    let top = check_name(name)?;
    if top == Path::new(".") && !fs::symlink_metadata(src).map_err(io_err("look at", src))?.is_dir() {
        return Err(ArchiveError::Name { name: name.to_string(), reason: "only a directory's contents are packed as `.`".into() });
    }
    let mut b = Builder::new(out);
    b.mode(HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut stats = PackStats::default();
    let mut stack = vec![(src.to_path_buf(), top)];
    while let Some((path, name)) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(io_err("look at", &path))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            let mut h = header_for(&meta);
            b.append_data(&mut h, &name, io::empty()).map_err(io_err("pack", &path))?;
            stats.dirs += 1;
            let mut children = Vec::new();
            for child in fs::read_dir(&path).map_err(io_err("list", &path))? {
                children.push(child.map_err(io_err("list", &path))?.file_name());
            }
            children.sort();
            for child in children.into_iter().rev() {
                stack.push((path.join(&child), name.join(&child)));
            }
        } else if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err("read the symlink", &path))?;
            let mut h = header_for(&meta);
            b.append_link(&mut h, &name, &target).map_err(io_err("pack", &path))?;
            stats.symlinks += 1;
        } else if kind.is_file() {
            // O_NOFOLLOW: a file swapped for a symlink since it was looked at is refused
            // rather than read through; O_NONBLOCK: one swapped for a fifo opens at once
            // (and is then skipped) instead of waiting for a writer.
            let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path).map_err(io_err("open", &path))?;
            let meta = file.metadata().map_err(io_err("look at", &path))?;
            if !meta.is_file() {
                stats.skipped += 1;
                continue;
            }
            let mut h = header_for(&meta);
            b.append_data(&mut h, &name, Exact { inner: file, left: meta.len() }).map_err(io_err("pack", &path))?;
            stats.files += 1;
            stats.bytes += meta.len();
        } else {
            stats.skipped += 1;
        }
    }
    let mut out = b.into_inner().map_err(io_err("finish the archive of", src))?;
    out.flush().map_err(io_err("finish the archive of", src))?;
    Ok(stats)
}

/// The plain components of an entry's path, or why it is refused.
fn entry_parts(raw: &[u8]) -> Result<Vec<OsString>, String> {
    if raw.contains(&0) {
        return Err("its path has a NUL byte".into());
    }
    if raw.starts_with(b"/") {
        return Err("its path is absolute".into());
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("its path has \"..\"".into()),
            p => parts.push(OsStr::from_bytes(p).to_os_string()),
        }
    }
    Ok(parts)
}

/// Changes the owner of something `unpack` created, never following a symlink.
fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), ArchiveError> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("change the owner of", path)),
        None => Ok(()),
    }
}

/// Where an entry with `parts` goes under `root`: each parent must be a real directory
/// (a missing one is made), never a symlink, so the write stays under `root`.
fn place(root: &Path, parts: &[OsString], entry: &str, owner: Option<(u32, u32)>) -> Result<PathBuf, ArchiveError> {
    let refuse = |reason: String| ArchiveError::Refused { entry: entry.to_string(), reason };
    let Some((last, parents)) = parts.split_last() else {
        return Err(refuse("its path is empty".into()));
    };
    let mut cur = root.to_path_buf();
    for part in parents {
        let next = cur.join(part);
        match fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                let shown = next.strip_prefix(root).unwrap_or(&next).display().to_string();
                return Err(refuse(format!("it would be written through the symlink {shown}")));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                let shown = next.strip_prefix(root).unwrap_or(&next).display().to_string();
                return Err(refuse(format!("{shown} is not a directory")));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // mkdir never follows a symlink at its own name: one made meanwhile fails it.
                fs::create_dir(&next).map_err(io_err("make the directory", &next))?;
                chown(&next, owner)?;
            }
            Err(source) => return Err(ArchiveError::Io { op: "look at", path: next, source }),
        }
        cur = next;
    }
    Ok(cur.join(last))
}

/// Makes room at `target` for a new file or symlink: a file or symlink there is removed
/// (the link itself, not what it points to); a directory is refused, never replaced.
fn clear_for_leaf(target: &Path, entry: &str) -> Result<(), ArchiveError> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => Err(ArchiveError::Refused { entry: entry.to_string(), reason: "a directory of that name is already there".into() }),
        Ok(_) => fs::remove_file(target).map_err(io_err("replace", target)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ArchiveError::Io { op: "look at", path: target.to_path_buf(), source }),
    }
}

fn mtime_of(secs: Option<u64>) -> Option<FileTimes> {
    secs.map(|s| FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(s)))
}

/// Opens a directory `unpack` made without following a symlink at its name.
fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY).open(path)
}

/// Extracts the tar stream `input` into the existing directory `dest`.
///
/// Every write stays under `dest`: an entry whose path is absolute or has `..`, a hard
/// link, a device or fifo, and an entry that would be written through a symlink (one
/// from earlier in the same stream or one already in `dest`) stop the extraction with an
/// error, that entry unwritten (entries before it stay). A symlink entry is stored as
/// it is, pointing anywhere, and nothing is written through it. Modes are kept without
/// setuid and setgid (`& 0o1777`), mtimes are kept (a symlink's own mtime is not);
/// `owner`, when given, owns everything created (the archive's owners are ignored).
/// Files and symlinks already there are replaced, directories merged into; a directory
/// is never replaced by a file or symlink.
pub fn unpack(dest: &Path, input: impl Read, owner: Option<(u32, u32)>) -> Result<UnpackStats, ArchiveError> {
    let root = fs::canonicalize(dest).map_err(io_err("open the destination", dest))?;
    if !fs::metadata(&root).map_err(io_err("look at", &root))?.is_dir() {
        return Err(ArchiveError::NotADirectory { path: dest.to_path_buf() });
    }
    let mut stats = UnpackStats::default();
    // Directories get their modes and mtimes last: writing into one changes its mtime,
    // and a read-only one would refuse what goes in it.
    let mut dirs: Vec<(PathBuf, u32, Option<u64>)> = Vec::new();
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries().map_err(|source| ArchiveError::Stream { source })? {
        let mut entry = entry.map_err(|source| ArchiveError::Stream { source })?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: &str| ArchiveError::Refused { entry: shown.clone(), reason: reason.to_string() };
        let parts = entry_parts(&raw).map_err(|r| refuse(&r))?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o1777;
        let mtime = header.mtime().ok();
        match kind {
            EntryType::XGlobalHeader => continue,
            EntryType::Link => return Err(refuse("it is a hard link, which is never copied")),
            EntryType::Char | EntryType::Block => return Err(refuse("it is a device, which is never copied")),
            EntryType::Fifo => return Err(refuse("it is a fifo, which is never copied")),
            EntryType::Directory => {
                if parts.is_empty() {
                    // The archive's own top (`./`): that is `dest`, which stays as it is.
                    continue;
                }
                let target = place(&root, &parts, &shown, owner)?;
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        fs::remove_file(&target).map_err(io_err("replace", &target))?;
                        fs::create_dir(&target).map_err(io_err("make the directory", &target))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir(&target).map_err(io_err("make the directory", &target))?;
                    }
                    Err(source) => return Err(ArchiveError::Io { op: "look at", path: target, source }),
                }
                chown(&target, owner)?;
                dirs.push((target, mode, mtime));
                stats.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let target = place(&root, &parts, &shown, owner)?;
                clear_for_leaf(&target, &shown)?;
                // create_new (O_EXCL) never follows a symlink at the name.
                let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&target).map_err(io_err("create", &target))?;
                let n = io::copy(&mut entry, &mut file).map_err(|source| ArchiveError::Stream { source })?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io_err("change the owner of", &target))?;
                }
                file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err("set the mode of", &target))?;
                if let Some(times) = mtime_of(mtime) {
                    file.set_times(times).map_err(io_err("set the mtime of", &target))?;
                }
                stats.files += 1;
                stats.bytes += n;
            }
            EntryType::Symlink => {
                let link = match entry.link_name_bytes() {
                    Some(l) if !l.is_empty() => OsStr::from_bytes(&l).to_os_string(),
                    _ => return Err(refuse("it is a symlink without a target")),
                };
                let target = place(&root, &parts, &shown, owner)?;
                clear_for_leaf(&target, &shown)?;
                std::os::unix::fs::symlink(&link, &target).map_err(io_err("make the symlink", &target))?;
                chown(&target, owner)?;
                stats.symlinks += 1;
            }
            other => return Err(refuse(&format!("its entry type {:?} is not supported", other.as_byte() as char))),
        }
    }
    for (path, mode, mtime) in dirs.iter().rev() {
        let dir = open_dir(path).map_err(io_err("open the directory", path))?;
        dir.set_permissions(fs::Permissions::from_mode(*mode)).map_err(io_err("set the mode of", path))?;
        if let Some(times) = mtime_of(*mtime) {
            dir.set_times(times).map_err(io_err("set the mtime of", path))?;
        }
    }
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// A tar with one entry whose name bytes are written straight into the header, as
    /// `Builder` refuses `..` and absolute names.
    fn raw_archive(name: &[u8], kind: EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
        let mut h = Header::new_gnu();
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        let mut b = Builder::new(Vec::new());
        b.append(&h, data).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn a_tree_round_trips_with_modes_symlinks_and_empty_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("proj");
        fs::create_dir_all(src.join("nested/deep")).unwrap();
        fs::create_dir(src.join("empty")).unwrap();
        fs::write(src.join("a.txt"), b"hello").unwrap();
        fs::write(src.join("nested/deep/b.txt"), b"deep").unwrap();
        fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(src.join("secret"), b"s3cret").unwrap();
        fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink("a.txt", src.join("link")).unwrap();
        symlink("nested", src.join("dirlink")).unwrap();
        let when = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        File::options().write(true).open(src.join("a.txt")).unwrap().set_times(FileTimes::new().set_modified(when)).unwrap();

        let mut tar = Vec::new();
        let packed = pack(&src, "proj", &mut tar).unwrap();
        assert_eq!(packed, PackStats { files: 4, dirs: 4, symlinks: 2, bytes: 5 + 4 + 18 + 6, skipped: 0 });

        let dest = tmp.path().join("out");
        fs::create_dir(&dest).unwrap();
        let unpacked = unpack(&dest, &tar[..], None).unwrap();
        assert_eq!(unpacked, UnpackStats { files: 4, dirs: 4, symlinks: 2, bytes: 33 });
        let got = dest.join("proj");
        assert_eq!(fs::read(got.join("a.txt")).unwrap(), b"hello");
        assert_eq!(fs::read(got.join("nested/deep/b.txt")).unwrap(), b"deep");
        assert_eq!(mode_of(&got.join("run.sh")), 0o755);
        assert_eq!(mode_of(&got.join("secret")), 0o600);
        assert_eq!(fs::read_link(got.join("link")).unwrap(), Path::new("a.txt"));
        assert_eq!(fs::read_link(got.join("dirlink")).unwrap(), Path::new("nested"));
        assert!(fs::symlink_metadata(got.join("dirlink")).unwrap().file_type().is_symlink());
        assert!(got.join("empty").is_dir());
        assert_eq!(fs::read_dir(got.join("empty")).unwrap().count(), 0);
        assert_eq!(fs::metadata(got.join("a.txt")).unwrap().modified().unwrap(), when);
        assert_eq!(mode_of(&got.join("nested")), mode_of(&src.join("nested")));
    }

    #[test]
    fn entries_are_named_under_the_name_given() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("w");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("a.txt"), b"a").unwrap();
        let mut tar = Vec::new();
        pack(&src, "proj", &mut tar).unwrap();
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<String> = ar.entries().unwrap().map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap()).collect();
        assert_eq!(names.iter().map(|n| n.trim_end_matches('/')).collect::<Vec<_>>(), ["proj", "proj/a.txt"]);
        assert!(matches!(pack(&src, "../x", Vec::new()), Err(ArchiveError::Name { .. })));
        assert!(matches!(pack(&src, "/x", Vec::new()), Err(ArchiveError::Name { .. })));
        assert!(matches!(pack(&src, "", Vec::new()), Err(ArchiveError::Name { .. })));
        // A directory's contents, under `./`.
        let mut tar = Vec::new();
        pack(&src, ".", &mut tar).unwrap();
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<String> = ar.entries().unwrap().map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap()).collect();
        assert_eq!(names.iter().map(|n| n.trim_end_matches('/')).collect::<Vec<_>>(), [".", "a.txt"]);
        assert!(matches!(pack(&src.join("a.txt"), ".", Vec::new()), Err(ArchiveError::Name { .. })));
    }

    #[test]
    fn a_symlink_given_to_pack_is_stored_as_a_symlink_and_sockets_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        symlink("/etc/passwd", tmp.path().join("l")).unwrap();
        let mut tar = Vec::new();
        let stats = pack(&tmp.path().join("l"), "l", &mut tar).unwrap();
        assert_eq!(stats, PackStats { symlinks: 1, ..Default::default() });
        let dest = tmp.path().join("d");
        fs::create_dir(&dest).unwrap();
        unpack(&dest, &tar[..], None).unwrap();
        assert_eq!(fs::read_link(dest.join("l")).unwrap(), Path::new("/etc/passwd"));

        let dir = tmp.path().join("s");
        fs::create_dir(&dir).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
        let stats = pack(&dir, "s", Vec::new()).unwrap();
        assert_eq!(stats, PackStats { dirs: 1, skipped: 1, ..Default::default() });
    }

    #[test]
    fn a_four_mib_file_round_trips_byte_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 4 << 20];
        let mut x: u32 = 0x1234_5678;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        fs::write(tmp.path().join("big"), &data).unwrap();
        let mut tar = Vec::new();
        let stats = pack(&tmp.path().join("big"), "big", &mut tar).unwrap();
        assert_eq!(stats.bytes, 4 << 20);
        let dest = tmp.path().join("d");
        fs::create_dir(&dest).unwrap();
        let stats = unpack(&dest, &tar[..], None).unwrap();
        assert_eq!(stats, UnpackStats { files: 1, bytes: 4 << 20, ..Default::default() });
        assert!(fs::read(dest.join("big")).unwrap() == data);
    }

    #[test]
    fn resolve_in_refuses_paths_that_leave_the_workspace() {
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path().join("w");
        fs::create_dir(&w).unwrap();
        let e = resolve_in(&w, "../x").unwrap_err();
        assert_eq!(e.to_string(), "the path ../x leaves the workspace (\"..\"): give a path inside it");
        assert!(matches!(resolve_in(&w, "a/../../x"), Err(ArchiveError::Outside { .. })));
        assert!(matches!(resolve_in(&w, "/etc"), Err(ArchiveError::Outside { .. })));
        assert!(matches!(resolve_in(&w, "a\0b"), Err(ArchiveError::Outside { .. })));
        symlink("/etc", w.join("out")).unwrap();
        let e = resolve_in(&w, "out/passwd").unwrap_err();
        assert_eq!(e.to_string(), "the path out/passwd leaves the workspace (the symlink out points outside it): give a path inside it");
        assert!(matches!(resolve_in(&w, "out"), Err(ArchiveError::Outside { .. })));
        symlink("..", w.join("up")).unwrap();
        assert!(matches!(resolve_in(&w, "up/w/x"), Err(ArchiveError::Outside { .. })));
        symlink("loop", w.join("loop")).unwrap();
        assert!(matches!(resolve_in(&w, "loop/x"), Err(ArchiveError::Unresolvable { .. })));
    }

    #[test]
    fn resolve_in_follows_symlinks_that_stay_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path().join("w");
        fs::create_dir_all(w.join("sub/deeper")).unwrap();
        let base = fs::canonicalize(&w).unwrap();
        assert_eq!(resolve_in(&w, "").unwrap(), base);
        assert_eq!(resolve_in(&w, ".").unwrap(), base);
        assert_eq!(resolve_in(&w, "./sub//deeper/").unwrap(), base.join("sub/deeper"));
        symlink("sub", w.join("in")).unwrap();
        assert_eq!(resolve_in(&w, "in/f").unwrap(), base.join("sub/f"));
        symlink(base.join("sub"), w.join("abs")).unwrap();
        assert_eq!(resolve_in(&w, "abs/deeper").unwrap(), base.join("sub/deeper"));
        symlink("../../sub", w.join("sub/deeper/back")).unwrap();
        assert_eq!(resolve_in(&w, "sub/deeper/back/x").unwrap(), base.join("sub/x"));
        assert_eq!(resolve_in(&w, "new/dir/file").unwrap(), base.join("new/dir/file"));
    }

    #[test]
    fn unpack_refuses_a_dotdot_entry_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("d");
        fs::create_dir(&dest).unwrap();
        let tar = raw_archive(b"../evil", EntryType::Regular, None, b"evil");
        let e = unpack(&dest, &tar[..], None).unwrap_err();
        assert_eq!(e.to_string(), "the archive entry ../evil is refused: its path has \"..\"");
        assert!(!tmp.path().join("evil").exists());
        let tar = raw_archive(b"/tmp/evil-berth", EntryType::Regular, None, b"evil");
        assert!(matches!(unpack(&dest, &tar[..], None), Err(ArchiveError::Refused { .. })));
        assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
    }

    #[test]
    fn unpack_never_writes_through_a_symlink_from_the_archive_or_the_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let dest = tmp.path().join("d");
        fs::create_dir(&dest).unwrap();

        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "l", &outside).unwrap();
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, "l/x", &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let e = unpack(&dest, &tar[..], None).unwrap_err();
        assert_eq!(e.to_string(), "the archive entry l/x is refused: it would be written through the symlink l");
        assert!(!outside.join("x").exists());
        assert_eq!(fs::read_link(dest.join("l")).unwrap(), outside);

        // The same link already in the destination: a later archive cannot use it either.
        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, "l/y", &b"y"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        assert!(matches!(unpack(&dest, &tar[..], None), Err(ArchiveError::Refused { .. })));
        assert!(!outside.join("y").exists());

        // A file entry at the link's own name replaces the link, not its target.
        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(3);
        b.append_data(&mut h, "l", &b"new"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        unpack(&dest, &tar[..], None).unwrap();
        assert_eq!(fs::read(dest.join("l")).unwrap(), b"new");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn unpack_refuses_hard_links_devices_and_fifos() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("d");
        fs::create_dir(&dest).unwrap();
        let tar = raw_archive(b"h", EntryType::Link, Some("/etc/passwd"), b"");
        let e = unpack(&dest, &tar[..], None).unwrap_err();
        assert_eq!(e.to_string(), "the archive entry h is refused: it is a hard link, which is never copied");
        for kind in [EntryType::Fifo, EntryType::Char, EntryType::Block] {
            let tar = raw_archive(b"dev", kind, None, b"");
            assert!(matches!(unpack(&dest, &tar[..], None), Err(ArchiveError::Refused { .. })));
        }
        assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
    }

    #[test]
    fn unpack_drops_setuid_replaces_files_merges_dirs_and_sets_the_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("d");
        fs::create_dir_all(dest.join("proj/keep")).unwrap();
        fs::write(dest.join("proj/a.txt"), b"old").unwrap();
        let tar = raw_archive(b"proj/a.txt", EntryType::Regular, None, b"new!");
        let me = fs::metadata(&dest).unwrap();
        let stats = unpack(&dest, &tar[..], Some((me.uid(), me.gid()))).unwrap();
        assert_eq!(stats, UnpackStats { files: 1, bytes: 4, ..Default::default() });
        assert_eq!(fs::read(dest.join("proj/a.txt")).unwrap(), b"new!");
        assert!(dest.join("proj/keep").is_dir());

        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o6755);
        h.set_size(0);
        let mut b = Builder::new(Vec::new());
        b.append_data(&mut h, "suid", io::empty()).unwrap();
        let tar = b.into_inner().unwrap();
        unpack(&dest, &tar[..], None).unwrap();
        assert_eq!(mode_of(&dest.join("suid")), 0o755);

        // A file cannot take a directory's place.
        let tar = raw_archive(b"proj", EntryType::Regular, None, b"x");
        assert!(matches!(unpack(&dest, &tar[..], None), Err(ArchiveError::Refused { .. })));
        assert!(dest.join("proj/keep").is_dir());
        assert!(matches!(unpack(&dest.join("proj/a.txt"), &tar[..], None), Err(ArchiveError::NotADirectory { .. })));
    }
}
