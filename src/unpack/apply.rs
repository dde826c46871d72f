//! Applying a layer's entries to the tree, as the OCI image spec's "Applying Changesets"
//! says: entries replace what is at their path (a directory over a directory keeps its
//! contents), `.wh.NAME` removes NAME from the layers below, `.wh..wh..opq` hides everything
//! the layers below put in its directory.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use anyhow::{Context, bail, ensure};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use super::body::{BodyStats, Copier};
use super::entries::{Entries, Entry, FileBody, Kind, Time};
use super::root::{Root, TarPath, list_dir, lstat_type, proc_path, remove_all, resolve_error};
use super::{UnpackProgress, WhiteoutFormat};

/// Prefix of a whiteout's name.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of AUFS metadata names (`.wh..wh.plnk`, …), which appliers skip.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// The opaque-directory marker.
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// What the layers are applied as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The image's root filesystem: whiteouts are processed.
    RootFs,
    /// One layer's changes: whiteouts are kept, in this format.
    Diff(WhiteoutFormat),
}

/// A directory's metadata, set once everything inside it is in place (creating entries
/// changes its mtime, and a mode without write permission would stop a non-root unpack).
#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    atime: Time,
    mtime: Time,
}

/// Counts of what was applied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries read from the layers.
    pub entries: u64,
    /// Whiteouts processed (or kept, for one layer's changes), opaque markers included.
    pub whiteouts: u64,
    /// How bodies were written.
    pub bodies: BodyStats,
}

/// Applies layers, in order, to a [`Root`].
pub(crate) struct Applier<'a> {
    root: &'a Root,
    target: Target,
    /// Whether owners are applied (root only).
    owners: bool,
    copier: Copier,
    /// Cleaned paths the current layer has placed.
    layer_paths: HashSet<Vec<u8>>,
    /// Every directory's metadata from the last layer that had an entry for it.
    dirs: BTreeMap<Vec<u8>, DirMeta>,
    entries: u64,
    whiteouts: u64,
    progress: &'a dyn UnpackProgress,
    /// Kinds of warnings already given (each is given once).
    warned: HashSet<&'static str>,
    /// The process's umask: what a new file's permission bits lose.
    umask: u32,
    /// The owner new files get (this process's effective ids).
    creator: (u64, u64),
    /// The target directory is setgid, so new files take its group: chown always. (The
    /// directories the unpack makes are not setgid until the end, see [`DirMeta`].)
    root_setgid: bool,
}

impl std::fmt::Debug for Applier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("root", &self.root)
            .field("target", &self.target)
            .field("owners", &self.owners)
            .finish_non_exhaustive()
    }
}

impl<'a> Applier<'a> {
    pub(crate) fn new(
        root: &'a Root,
        target: Target,
        owners: bool,
        progress: &'a dyn UnpackProgress,
    ) -> Self {
        Applier {
            root,
            target,
            owners,
            copier: Copier::new(),
            layer_paths: HashSet::new(),
            dirs: BTreeMap::new(),
            entries: 0,
            whiteouts: 0,
            progress,
            warned: HashSet::new(),
            umask: current_umask(),
            creator: (
                u64::from(rustix::process::geteuid().as_raw()),
                u64::from(rustix::process::getegid().as_raw()),
            ),
            root_setgid: rustix::fs::fstat(root.fd()).map_or(true, |st| st.st_mode & 0o2000 != 0),
        }
    }

    /// Whether bodies are being cloned (`None`: no body seen yet).
    pub(crate) fn reflinks(&self) -> Option<bool> {
        self.copier.reflinks
    }

    pub(crate) fn stats(&self) -> ApplyStats {
        ApplyStats {
            entries: self.entries,
            whiteouts: self.whiteouts,
            bodies: self.copier.stats,
        }
    }

    fn warn_once(&mut self, kind: &'static str, message: &str) {
        if self.warned.insert(kind) {
            self.progress.warning(message);
        }
    }

    /// Apply every entry of one layer.
    ///
    /// # Errors
    /// The first entry that cannot be applied (named), or a stream failure.
    pub(crate) fn apply_layer(&mut self, entries: &mut Entries<'_, '_>) -> anyhow::Result<()> {
        self.layer_paths.clear();
        while let Some(entry) = entries.next_entry()? {
            self.entries += 1;
            let shown = String::from_utf8_lossy(&entry.path).into_owned();
            let at = entries.offset();
            self.apply(entries, entry)
                .with_context(|| format!("entry {shown:?} (tar offset {at})"))?;
        }
        Ok(())
    }

    fn apply(&mut self, entries: &mut Entries<'_, '_>, e: Entry) -> anyhow::Result<()> {
        let path = TarPath::parse(&e.path)?;
        let Some(name) = path.name() else {
            ensure!(
                matches!(e.kind, Kind::Directory),
                "an entry for the root directory that is not a directory"
            );
            let root = self.root.open_dir(&[]).map_err(|e| resolve_error(e, &[]))?;
            self.set_owner(root.as_fd(), b".", &e)?;
            self.set_xattrs_fd(root.as_fd(), &e)?;
            self.record_dir(Vec::new(), &e);
            return Ok(());
        };
        if name.starts_with(WHITEOUT_PREFIX) {
            match self.target {
                Target::RootFs => return self.whiteout(&path),
                Target::Diff(WhiteoutFormat::Overlay) => return self.keep_whiteout(&path, &e),
                // Kept as the files they are.
                Target::Diff(WhiteoutFormat::Oci) => {}
            }
        }
        let name = name.to_vec();
        let parent = self.root.open_or_create_dir(path.parent())?;
        let parent = parent.as_fd();
        let joined = path.joined();
        if let Kind::Hardlink(target) = &e.kind
            && TarPath::parse(target)?.joined() == joined
        {
            // A link to itself: removing the path first would lose the file.
            return Ok(());
        }
        match lstat_type(parent, &name)? {
            Some(FileType::Directory) if matches!(e.kind, Kind::Directory) => {}
            Some(_) => {
                remove_all(parent, &name).context("removing what the entry replaces")?;
                self.forget(&joined);
            }
            None => {}
        }
        self.layer_paths.insert(joined.clone());
        self.create(entries, parent, &name, joined, &e)
    }

    /// Make the entry `e` as `name` in `parent` (where nothing is in its way), with its
    /// metadata.
    fn create(
        &mut self,
        entries: &mut Entries<'_, '_>,
        parent: BorrowedFd<'_>,
        name: &[u8],
        joined: Vec<u8>,
        e: &Entry,
    ) -> anyhow::Result<()> {
        let name = name.to_vec();
        match &e.kind {
            Kind::Directory => {
                match rustix::fs::mkdirat(parent, name.as_slice(), Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(err) => return Err(err).context("creating the directory"),
                }
                let dir = rustix::fs::openat(
                    parent,
                    name.as_slice(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .context("opening the directory")?;
                self.set_owner(parent, &name, e)?;
                self.set_xattrs_fd(dir.as_fd(), e)?;
                self.record_dir(joined, e);
            }
            Kind::File(body) => {
                let file = rustix::fs::openat(
                    parent,
                    name.as_slice(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    // The permission bits now, so that most files need no chmod; setuid,
                    // setgid and sticky only once the owner is set (chown clears them, and
                    // they must never be set for the wrong owner).
                    Mode::from_raw_mode(e.mode & 0o777),
                )
                .context("creating the file")?;
                match body {
                    FileBody::Plain { size } => {
                        self.copier.copy_stream(entries, file.as_fd(), *size)?
                    }
                    FileBody::Sparse { map } => {
                        self.copier.copy_sparse(entries, file.as_fd(), map)?
                    }
                }
                self.set_new_owner(parent, &name, e)?;
                if e.mode & 0o7000 != 0 || e.mode & 0o777 & self.umask != 0 {
                    rustix::fs::fchmod(&file, Mode::from_raw_mode(e.mode)).context("chmod")?;
                }
                self.set_xattrs_fd(file.as_fd(), e)?;
                set_times(parent, &name, e)?;
            }
            Kind::Hardlink(target) => self.hardlink(parent, &name, target)?,
            Kind::Symlink(target) => {
                rustix::fs::symlinkat(target.as_slice(), parent, name.as_slice())
                    .context("creating the symlink")?;
                self.set_new_owner(parent, &name, e)?;
                self.set_xattrs_path(parent, &name, e)?;
                set_times(parent, &name, e)?;
            }
            Kind::Char { major, minor } | Kind::Block { major, minor } => {
                let ft = if matches!(e.kind, Kind::Char { .. }) {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                let dev = rustix::fs::makedev(*major, *minor);
                if !self.mknod(parent, &name, ft, dev)? {
                    return Ok(());
                }
                self.set_special_meta(parent, &name, e)?;
            }
            Kind::Fifo => {
                if !self.mknod(parent, &name, FileType::Fifo, 0)? {
                    return Ok(());
                }
                self.set_special_meta(parent, &name, e)?;
            }
        }
        Ok(())
    }

    /// `mknodat`; `false` (with a warning once) where this process may not make devices.
    fn mknod(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        ft: FileType,
        dev: u64,
    ) -> anyhow::Result<bool> {
        match rustix::fs::mknodat(parent, name, ft, Mode::from_raw_mode(0o600), dev) {
            Ok(()) => Ok(true),
            Err(Errno::PERM) if !self.owners => {
                self.warn_once(
                    "devices",
                    "not root: device nodes are skipped (only root may make them)",
                );
                Ok(false)
            }
            Err(e) => Err(e).context("creating the special file"),
        }
    }

    fn set_special_meta(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
    ) -> anyhow::Result<()> {
        self.set_owner(parent, name, e)?;
        // Not a symlink (just made by us), so following the name is safe.
        rustix::fs::chmodat(parent, name, Mode::from_raw_mode(e.mode), AtFlags::empty())
            .context("chmod")?;
        self.set_xattrs_path(parent, name, e)?;
        set_times(parent, name, e)
    }

    fn hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        target: &[u8],
    ) -> anyhow::Result<()> {
        let target_path = TarPath::parse(target)
            .with_context(|| format!("hard link target {:?}", String::from_utf8_lossy(target)))?;
        let Some(target_name) = target_path.name() else {
            bail!("a hard link to the root directory");
        };
        let target_dir = self
            .root
            .open_dir(target_path.parent())
            .map_err(|e| resolve_error(e, &target_path.components))
            .with_context(|| format!("hard link target {:?}", String::from_utf8_lossy(target)))?;
        // Flags 0: a symlink target is linked itself, not followed.
        rustix::fs::linkat(&target_dir, target_name, parent, name, AtFlags::empty()).with_context(
            || {
                format!(
                    "linking to {:?}",
                    String::from_utf8_lossy(&target_path.joined())
                )
            },
        )
    }

    fn record_dir(&mut self, joined: Vec<u8>, e: &Entry) {
        self.dirs.insert(
            joined,
            DirMeta {
                mode: e.mode,
                atime: atime(e),
                mtime: e.mtime,
            },
        );
    }

    /// Drop the recorded metadata of `joined` and of everything beneath it: removed.
    fn forget(&mut self, joined: &[u8]) {
        let gone: Vec<Vec<u8>> = self
            .dirs
            .range(joined.to_vec()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(joined))
            .filter(|k| k.len() == joined.len() || k[joined.len()] == b'/' || joined.is_empty())
            .cloned()
            .collect();
        for k in gone {
            self.dirs.remove(&k);
        }
    }

    /// Process a whiteout of the image's root filesystem.
    fn whiteout(&mut self, path: &TarPath) -> anyhow::Result<()> {
        self.whiteouts += 1;
        let name = path.name().expect("whiteouts have a name");
        let parent = path.parent();
        if name == WHITEOUT_OPAQUE {
            let dir = match self.root.open_dir(parent) {
                Ok(fd) => fd,
                Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
                Err(e) => return Err(resolve_error(e, parent)),
            };
            let base = parent.join(&b'/');
            return self
                .clear_lower(dir.as_fd(), &base, 0)
                .context("emptying the opaque directory");
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            return Ok(());
        }
        let hidden = &name[WHITEOUT_PREFIX.len()..];
        ensure!(
            !matches!(hidden, b"" | b"." | b".."),
            "a whiteout of {:?}",
            String::from_utf8_lossy(hidden)
        );
        let mut joined = parent.join(&b'/');
        if !joined.is_empty() {
            joined.push(b'/');
        }
        joined.extend_from_slice(hidden);
        // Whiteouts apply to the layers below only.
        if self.layer_paths.contains(&joined) {
            return Ok(());
        }
        let dir = match self.root.open_dir(parent) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(resolve_error(e, parent)),
        };
        remove_all(dir.as_fd(), hidden).context("removing the whited-out path")?;
        self.forget(&joined);
        Ok(())
    }

    /// Remove from `dir` (at `base`) everything the current layer did not place, keeping
    /// what it placed in directories it placed.
    fn clear_lower(
        &mut self,
        dir: BorrowedFd<'_>,
        base: &[u8],
        depth: usize,
    ) -> anyhow::Result<()> {
        ensure!(depth < 4096, "directories nested too deep");
        for child in list_dir(dir)? {
            let mut joined = base.to_vec();
            if !joined.is_empty() {
                joined.push(b'/');
            }
            joined.extend_from_slice(&child);
            if !self.layer_paths.contains(&joined) {
                remove_all(dir, &child)?;
                self.forget(&joined);
            } else if lstat_type(dir, &child)? == Some(FileType::Directory) {
                let sub = open_subdir(dir, &child)?;
                self.clear_lower(sub.as_fd(), &joined, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Keep a whiteout of one layer's changes as overlayfs stores it: a 0/0 character
    /// device for `.wh.NAME`, the `overlay.opaque` xattr for `.wh..wh..opq`.
    fn keep_whiteout(&mut self, path: &TarPath, e: &Entry) -> anyhow::Result<()> {
        self.whiteouts += 1;
        let name = path.name().expect("whiteouts have a name");
        let parent = self.root.open_or_create_dir(path.parent())?;
        if name == WHITEOUT_OPAQUE {
            let key = if self.owners {
                "trusted.overlay.opaque"
            } else {
                "user.overlay.opaque"
            };
            return rustix::fs::fsetxattr(&parent, key, b"y", XattrFlags::empty())
                .with_context(|| format!("setting {key} on the opaque directory"));
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            return Ok(());
        }
        let hidden = name[WHITEOUT_PREFIX.len()..].to_vec();
        ensure!(
            !matches!(hidden.as_slice(), b"" | b"." | b".."),
            "a whiteout of {:?}",
            String::from_utf8_lossy(&hidden)
        );
        remove_all(parent.as_fd(), &hidden)?;
        if !self.mknod(parent.as_fd(), &hidden, FileType::CharacterDevice, 0)? {
            return Ok(());
        }
        self.set_owner(parent.as_fd(), &hidden, e)?;
        set_times(parent.as_fd(), &hidden, e)
    }

    /// [`Self::set_owner`] of something this unpack has just created: nothing to do when
    /// the entry's owner is the one it was created with.
    fn set_new_owner(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
    ) -> anyhow::Result<()> {
        if !self.root_setgid && (e.uid, e.gid) == self.creator {
            return Ok(());
        }
        self.set_owner(parent, name, e)
    }

    fn set_owner(&mut self, parent: BorrowedFd<'_>, name: &[u8], e: &Entry) -> anyhow::Result<()> {
        if !self.owners {
            return Ok(());
        }
        let (Ok(uid), Ok(gid)) = (u32::try_from(e.uid), u32::try_from(e.gid)) else {
            bail!("owner {}:{} is beyond 32 bits", e.uid, e.gid);
        };
        // SAFETY-free: from_raw is a plain conversion in rustix.
        let (uid, gid) = (
            rustix::fs::Uid::from_raw(uid),
            rustix::fs::Gid::from_raw(gid),
        );
        let name: &[u8] = if name == b"." { b"" } else { name };
        let flags = if name.is_empty() {
            AtFlags::EMPTY_PATH
        } else {
            AtFlags::SYMLINK_NOFOLLOW
        };
        rustix::fs::chownat(parent, name, Some(uid), Some(gid), flags)
            .with_context(|| format!("chown {}:{}", e.uid, e.gid))
    }

    fn set_xattrs_fd(&mut self, fd: BorrowedFd<'_>, e: &Entry) -> anyhow::Result<()> {
        for (k, v) in &e.xattrs {
            let r = rustix::fs::fsetxattr(fd, OsStr::from_bytes(k), v, XattrFlags::empty());
            self.xattr_result(r, k)?;
        }
        Ok(())
    }

    fn set_xattrs_path(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
    ) -> anyhow::Result<()> {
        if e.xattrs.is_empty() {
            return Ok(());
        }
        let path = proc_path(parent, name);
        for (k, v) in &e.xattrs {
            let r = rustix::fs::lsetxattr(
                OsStr::from_bytes(&path),
                OsStr::from_bytes(k),
                v,
                XattrFlags::empty(),
            );
            self.xattr_result(r, k)?;
        }
        Ok(())
    }

    /// Like containers/storage's applier, a filesystem or a caller that cannot take an
    /// xattr is not an error; it is said once.
    fn xattr_result(&mut self, r: Result<(), Errno>, key: &[u8]) -> anyhow::Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(Errno::OPNOTSUPP | Errno::PERM) => {
                let msg = format!(
                    "xattrs this filesystem or user cannot set are skipped (first: {})",
                    String::from_utf8_lossy(key)
                );
                self.warn_once("xattrs", &msg);
                Ok(())
            }
            Err(e) => {
                Err(e).with_context(|| format!("setting xattr {}", String::from_utf8_lossy(key)))
            }
        }
    }

    /// Set every directory's mode and times, now that nothing more goes into them.
    pub(crate) fn finish(&mut self) -> anyhow::Result<()> {
        let dirs = std::mem::take(&mut self.dirs);
        // Deepest first: nothing set on a directory may change its parent afterwards.
        for (joined, meta) in dirs.iter().rev() {
            let comps: Vec<Vec<u8>> = if joined.is_empty() {
                Vec::new()
            } else {
                joined.split(|&b| b == b'/').map(<[u8]>::to_vec).collect()
            };
            let shown = String::from_utf8_lossy(joined);
            let dir = match self.root.open_dir(&comps) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => continue,
                Err(e) => {
                    return Err(resolve_error(e, &comps))
                        .with_context(|| format!("directory {shown:?}"));
                }
            };
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(meta.mode))
                .with_context(|| format!("chmod of directory {shown:?}"))?;
            rustix::fs::futimens(&dir, &timestamps(meta.atime, meta.mtime))
                .with_context(|| format!("setting the times of directory {shown:?}"))?;
        }
        Ok(())
    }
}

/// The process's umask, from `/proc/self/status` (reading it with umask(2) would change it
/// for a moment under other threads); the common 022 where that cannot be read.
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn open_subdir(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Into::into)
}

/// The access time containers/storage gives an entry: its PAX atime unless that is before
/// its mtime.
fn atime(e: &Entry) -> Time {
    match e.atime {
        Some(a) if (a.sec, a.nsec) >= (e.mtime.sec, e.mtime.nsec) => a,
        _ => e.mtime,
    }
}

fn timestamps(atime: Time, mtime: Time) -> Timestamps {
    let ts = |t: Time| Timespec {
        tv_sec: t.sec,
        tv_nsec: i64::from(t.nsec),
    };
    Timestamps {
        last_access: ts(atime),
        last_modification: ts(mtime),
    }
}

fn set_times(parent: BorrowedFd<'_>, name: &[u8], e: &Entry) -> anyhow::Result<()> {
    rustix::fs::utimensat(
        parent,
        name,
        &timestamps(atime(e), e.mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .context("setting the times")
}
