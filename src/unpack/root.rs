//! Paths resolved beneath the target directory, never outside it.
//!
//! Every tar path is checked lexically first ([`TarPath::parse`]: no `..` component, no empty
//! name), then its parent directory is opened with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)` relative to the target directory's fd. Symlinks the image planted
//! are followed only while they stay beneath the directory (as containers/storage's applier
//! follows them "in scope"); one that leaves it (`etc -> /`, `x -> ../..`) fails the
//! resolution with `EXDEV` instead of being re-rooted, so a layer that tries is refused and
//! names the entry. The final component is never followed: every operation on it is an `*at`
//! call on the parent fd with `AT_SYMLINK_NOFOLLOW` / `O_NOFOLLOW`, or an unlink.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How parent directories are resolved: beneath the root, through no `/proc` magic link.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// Deepest directory nesting removed recursively; a guard against a stack overflow in
/// [`remove_all`] (Linux paths cannot nest deeper than PATH_MAX / 2 components anyway).
const MAX_REMOVE_DEPTH: usize = 4096;

/// A tar path, cleaned: its components without `.` and empty ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TarPath {
    /// The components, none empty, `.` or `..`.
    pub components: Vec<Vec<u8>>,
}

impl TarPath {
    /// Clean a tar path (leading `/` and `./`, `//` and trailing `/` dropped). The empty
    /// path (`./`) is the root.
    ///
    /// # Errors
    /// A `..` component: no image tool writes one, and it could only aim outside.
    pub(crate) fn parse(path: &[u8]) -> anyhow::Result<TarPath> {
        let mut components = Vec::new();
        for c in path.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => bail!("the path has a `..` component"),
                c => components.push(c.to_vec()),
            }
        }
        Ok(TarPath { components })
    }

    /// The path joined with `/`, without a leading one (empty for the root).
    pub(crate) fn joined(&self) -> Vec<u8> {
        self.components.join(&b'/')
    }

    /// The last component, `None` for the root.
    pub(crate) fn name(&self) -> Option<&[u8]> {
        self.components.last().map(Vec::as_slice)
    }

    /// The parent's components.
    pub(crate) fn parent(&self) -> &[Vec<u8>] {
        &self.components[..self.components.len().saturating_sub(1)]
    }
}

/// The target directory: an fd everything is resolved from.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
    shown: PathBuf,
}

impl Root {
    /// Open `dir` (which must exist) as the root.
    pub(crate) fn open(dir: &Path) -> anyhow::Result<Root> {
        let fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening {}", dir.display()))?;
        Ok(Root {
            fd,
            shown: dir.to_owned(),
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn shown(&self) -> &Path {
        &self.shown
    }

    /// Open the directory made of `components` beneath the root.
    pub(crate) fn open_dir(&self, components: &[Vec<u8>]) -> Result<OwnedFd, Errno> {
        if components.is_empty() {
            return rustix::fs::openat(
                &self.fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            );
        }
        let rel = components.join(&b'/');
        loop {
            match rustix::fs::openat2(
                &self.fd,
                rel.as_slice(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            ) {
                // The kernel asks for a retry when a rename raced the resolution.
                Err(Errno::AGAIN | Errno::INTR) => continue,
                r => return r,
            }
        }
    }

    /// Open the directory made of `components`, creating missing ones (mode 0755, as
    /// containers/storage's applier does for parents a layer leaves out).
    ///
    /// # Errors
    /// A component resolves outside the root or is not a directory.
    pub(crate) fn open_or_create_dir(&self, components: &[Vec<u8>]) -> anyhow::Result<OwnedFd> {
        match self.open_dir(components) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(resolve_error(e, components)),
        }
        let mut dir = self.open_dir(&[]).map_err(|e| resolve_error(e, &[]))?;
        for i in 0..components.len() {
            match self.open_dir(&components[..=i]) {
                Ok(fd) => dir = fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(
                        &dir,
                        components[i].as_slice(),
                        Mode::from_raw_mode(0o755),
                    ) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(resolve_error(e, &components[..=i])),
                    }
                    dir = self
                        .open_dir(&components[..=i])
                        .map_err(|e| resolve_error(e, &components[..=i]))?;
                }
                Err(e) => return Err(resolve_error(e, &components[..=i])),
            }
        }
        Ok(dir)
    }
}

/// The error of resolving `components`, saying when it is an escape.
pub(crate) fn resolve_error(e: Errno, components: &[Vec<u8>]) -> anyhow::Error {
    let shown = String::from_utf8_lossy(&components.join(&b'/')).into_owned();
    match e {
        Errno::XDEV => anyhow::anyhow!(
            "resolving {shown:?} leaves the target directory (through a symlink the image \
             planted); refusing it"
        ),
        Errno::LOOP => anyhow::anyhow!("resolving {shown:?}: too many symlinks"),
        e => anyhow::Error::new(std::io::Error::from(e)).context(format!("resolving {shown:?}")),
    }
}

/// The file type at `name` in `dir`, not following a symlink; `None` when absent.
pub(crate) fn lstat_type(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Remove `name` in `dir` and, if it is a directory, everything beneath it, following no
/// symlink. An absent `name` is fine.
pub(crate) fn remove_all(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<()> {
    remove_all_at(dir, name, 0)
}

fn remove_all_at(dir: BorrowedFd<'_>, name: &[u8], depth: usize) -> std::io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        // EISDIR from Linux, EPERM where POSIX says so.
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    if lstat_type(dir, name)? != Some(FileType::Directory) {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(Into::into);
    }
    if depth > MAX_REMOVE_DEPTH {
        return Err(std::io::Error::other(
            "directories nested too deep to remove",
        ));
    }
    empty_dir(dir, name, depth)?;
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Remove everything in the directory `name` of `dir`, keeping the directory.
fn empty_dir(dir: BorrowedFd<'_>, name: &[u8], depth: usize) -> std::io::Result<()> {
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for child in list_dir(sub.as_fd())? {
        remove_all_at(sub.as_fd(), &child, depth + 1)?;
    }
    Ok(())
}

/// The names in directory `dir` (without `.` and `..`).
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> std::io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(e) = d.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    Ok(names)
}

/// `/proc/self/fd/N/name`: a path naming `name` in `dir` for the calls that have no `*at`
/// form (the `l*xattr` family). The fd is already resolved, and the `l*` calls do not follow
/// `name` if it is a symlink, so this stays as contained as the fd.
pub(crate) fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_paths_are_cleaned_and_dotdot_refused() {
        let c = |p: &str| TarPath::parse(p.as_bytes()).map(|t| t.joined());
        assert_eq!(c("./usr/bin/").unwrap(), b"usr/bin");
        assert_eq!(c("/etc//passwd").unwrap(), b"etc/passwd");
        assert_eq!(c("./").unwrap(), b"");
        assert!(c("../x").is_err());
        assert!(c("a/../../x").is_err());
        assert!(c("a/..").is_err());
    }

    #[test]
    fn an_escaping_symlink_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let inner = tmp.path().join("root");
        std::fs::create_dir_all(inner.join("real")).unwrap();
        std::os::unix::fs::symlink("/", inner.join("etc")).unwrap();
        std::os::unix::fs::symlink("../..", inner.join("up")).unwrap();
        std::os::unix::fs::symlink("real", inner.join("rel")).unwrap();
        let root = Root::open(&inner).unwrap();
        let comps = |p: &str| TarPath::parse(p.as_bytes()).unwrap().components;
        assert_eq!(root.open_dir(&comps("etc")).unwrap_err(), Errno::XDEV);
        assert_eq!(root.open_dir(&comps("up")).unwrap_err(), Errno::XDEV);
        root.open_dir(&comps("rel")).unwrap();
        let err = root.open_or_create_dir(&comps("etc/new")).unwrap_err();
        assert!(
            format!("{err:#}").contains("leaves the target directory"),
            "{err:#}"
        );
        root.open_or_create_dir(&comps("a/b/c")).unwrap();
        assert!(inner.join("a/b/c").is_dir());
    }

    #[test]
    fn remove_all_follows_no_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("canary"), "x").unwrap();
        let inner = tmp.path().join("root");
        std::fs::create_dir_all(inner.join("d/e")).unwrap();
        std::os::unix::fs::symlink(&outside, inner.join("d/link")).unwrap();
        std::fs::write(inner.join("d/e/f"), "y").unwrap();
        let root = Root::open(&inner).unwrap();
        remove_all(root.fd(), b"d").unwrap();
        assert!(!inner.join("d").exists());
        assert!(outside.join("canary").exists());
        remove_all(root.fd(), b"absent").unwrap();
    }
}
