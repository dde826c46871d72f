//! Sinks of a layer stream besides the repository: the exact layer tar, written to any
//! `Write`, and files that appear only once their content is verified.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::client::{LayerItem, LayerStream};
use crate::helper::tarsplit::crc64_iso;

/// Read buffer for bodies: large enough to amortise syscalls (coreutils uses 128 KiB+).
const BODY_BUF: usize = 1 << 20;

/// What [`write_layer_tar`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarStats {
    /// Bytes of tar written.
    pub bytes: u64,
    /// Bodies that arrived as fds.
    pub files: u64,
}

/// Write the exact tar of the layer `stream` carries to `out`, and check that its sha256 is the
/// layer's diff_id; with `verify_crc`, also check every body against the CRC-64 tar-split
/// recorded for it.
///
/// Every body is read by position (`pread`), never through the fd's file offset, which the
/// helper may share (`proto/splitfdstream.md` §2), and read once into one buffer that feeds the
/// hash, the CRC and `out`: what is hashed is what is written.
///
/// # Errors
/// A stream, helper or read error, a body that is shorter than announced or fails its CRC, or
/// a tar that does not hash to the diff_id. The bytes already written to `out` then are not a
/// verified layer: write to an [`AtomicFile`] to keep them from appearing.
pub fn write_layer_tar(
    stream: &mut LayerStream<'_>,
    out: &mut dyn Write,
    verify_crc: bool,
) -> anyhow::Result<TarStats> {
    let diff_id = stream.layer().diff_id.clone();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; BODY_BUF];
    let mut stats = TarStats { bytes: 0, files: 0 };
    while let Some(item) = stream.next_item()? {
        match item {
            LayerItem::Inline(bytes) => {
                sha.update(bytes);
                out.write_all(bytes)?;
                stats.bytes += bytes.len() as u64;
            }
            LayerItem::File { fd, size, crc64 } => {
                stats.files += 1;
                let crc = copy_body(fd.as_fd(), size, &mut buf, &mut sha, verify_crc, out)
                    .with_context(|| format!("layer {diff_id}: body {}", stats.files))?;
                stats.bytes += size;
                if let Some(expected) = crc64.filter(|e| verify_crc && *e != crc) {
                    bail!(
                        "layer {diff_id}: body {} has CRC-64 {crc:016x}, tar-split recorded \
                         {expected:016x}",
                        stats.files
                    );
                }
            }
        }
    }
    let actual = format!("sha256:{}", hex::encode(sha.finalize()));
    if actual != diff_id {
        bail!("layer {diff_id}: the stream hashes to {actual}; refusing it");
    }
    Ok(stats)
}

/// Copy the `size`-byte body behind `fd` to `out` by position, feeding `sha` (and a CRC-64,
/// returned, when `crc`) from the same buffer.
fn copy_body(
    fd: BorrowedFd<'_>,
    size: u64,
    buf: &mut [u8],
    sha: &mut Sha256,
    crc: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let mut offset = 0u64;
    let mut crc64 = 0u64;
    while offset < size {
        let want = usize::try_from((size - offset).min(buf.len() as u64)).expect("≤ buf.len()");
        let n = pread(fd, &mut buf[..want], offset)
            .with_context(|| format!("reading at offset {offset}"))?;
        if n == 0 {
            bail!("ended after {offset} of its {size} bytes");
        }
        let chunk = &buf[..n];
        sha.update(chunk);
        if crc {
            crc64 = crc64_iso(crc64, chunk);
        }
        out.write_all(chunk)?;
        offset += n as u64;
    }
    Ok(crc64)
}

/// `pread` once, retrying on `EINTR`.
fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    loop {
        match rustix::io::pread(fd, &mut *buf, offset) {
            Err(Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// A file that appears at its path only when [`commit`](Self::commit)ted: written as an
/// anonymous `O_TMPFILE` in the target's directory (or, where the filesystem has none, a
/// hidden temporary name removed on drop), then linked to a temporary name and renamed over
/// the target. A failure or a kill before the commit leaves nothing (and an existing file at
/// the path untouched).
///
/// A path that is a symlink stands for the file it points to (that file is replaced, the
/// link stays). A path naming something that is not a regular file — a device such as
/// `/dev/null`, a FIFO, a socket — is written in place, since nothing may be renamed over it:
/// then there is no atomicity, as with any pipe.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    /// The target's directory, or `None` when the target is written in place.
    dir: Option<File>,
    path: PathBuf,
    /// The temporary name when the filesystem lacks `O_TMPFILE`.
    named: Option<String>,
}

impl AtomicFile {
    /// Start a file that will become `path` (mode 0644 less the umask).
    ///
    /// # Errors
    /// The directory cannot be opened or written.
    pub fn create(path: &Path) -> anyhow::Result<AtomicFile> {
        let resolved;
        let path = match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_symlink() => {
                resolved = std::fs::canonicalize(path)
                    .with_context(|| format!("resolving the symlink {}", path.display()))?;
                resolved.as_path()
            }
            _ => path,
        };
        if let Ok(md) = std::fs::metadata(path)
            && !md.is_file()
        {
            anyhow::ensure!(!md.is_dir(), "{} is a directory", path.display());
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            return Ok(AtomicFile {
                file,
                dir: None,
                path: path.to_owned(),
                named: None,
            });
        }
        let name = path
            .file_name()
            .with_context(|| format!("{} names no file", path.display()))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = File::from(
            rustix::fs::open(
                parent,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .with_context(|| format!("opening directory {}", parent.display()))?,
        );
        let mode = Mode::from_raw_mode(0o644);
        let (fd, named) = match rustix::fs::openat(
            &dir,
            ".",
            OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => (fd, None),
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                let tmp = temp_name(name.as_encoded_bytes());
                let fd = rustix::fs::openat(
                    &dir,
                    tmp.as_str(),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                    mode,
                )
                .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
                (fd, Some(tmp))
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating a temporary file in {}", parent.display()));
            }
        };
        Ok(AtomicFile {
            file: File::from(fd),
            dir: Some(dir),
            path: path.to_owned(),
            named,
        })
    }

    /// Make the written content appear at the path, replacing whatever was there.
    ///
    /// # Errors
    /// Linking or renaming failed; the path is then unchanged.
    pub fn commit(mut self) -> anyhow::Result<()> {
        let ctx = || format!("writing {}", self.path.display());
        self.file.flush().with_context(ctx)?;
        let Some(dir) = self.dir.as_ref() else {
            return Ok(());
        };
        let name = self.path.file_name().expect("checked in create").to_owned();
        let tmp = match self.named.take() {
            Some(tmp) => tmp,
            None => {
                let tmp = temp_name(name.as_encoded_bytes());
                let proc_path = format!("/proc/self/fd/{}", {
                    use std::os::fd::AsRawFd;
                    self.file.as_raw_fd()
                });
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    proc_path.as_str(),
                    dir,
                    tmp.as_str(),
                    AtFlags::SYMLINK_FOLLOW,
                )
                .with_context(ctx)?;
                tmp
            }
        };
        if let Err(e) = rustix::fs::renameat(dir, tmp.as_str(), dir, name.as_os_str()) {
            let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
            return Err(e).with_context(ctx);
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let (Some(tmp), Some(dir)) = (&self.named, &self.dir) {
            let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        }
    }
}

/// A hidden name beside the target that no concurrent writer picks.
fn temp_name(target: &[u8]) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        ".{}.{}-{n}.tmp",
        String::from_utf8_lossy(target).replace('/', "_"),
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom};

    use super::*;

    /// A content fd may share its file offset with the producer: wherever that offset is,
    /// the whole body is copied from its start.
    #[test]
    fn bodies_are_read_by_position() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        for offset in [0, 1000, data.len() as u64] {
            file.seek(SeekFrom::Start(offset)).unwrap();
            let mut out = Vec::new();
            let mut sha = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            let crc = copy_body(
                file.as_fd(),
                data.len() as u64,
                &mut buf,
                &mut sha,
                true,
                &mut out,
            )
            .unwrap();
            assert_eq!(out, data, "file offset {offset}");
            assert_eq!(crc, crc64_iso(0, &data));
            assert_eq!(sha.finalize().as_slice(), Sha256::digest(&data).as_slice());
            // The shared offset is left where it was.
            assert_eq!(file.stream_position().unwrap(), offset);
        }
        let mut sha = Sha256::new();
        let err = copy_body(
            file.as_fd(),
            400_000,
            &mut [0; 4096],
            &mut sha,
            false,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "ended after 300000 of its 400000 bytes");
    }

    #[test]
    fn atomic_file_appears_on_commit_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"first").unwrap();
        assert!(!path.exists());
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"abandoned").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out"]);

        // Through a symlink: the file it points to is replaced, the link stays.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("out", &link).unwrap();
        let mut f = AtomicFile::create(&link).unwrap();
        f.write_all(b"second").unwrap();
        f.commit().unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
    }

    /// A device (or FIFO) is written in place: renaming a file over `/dev/null` would break it.
    #[test]
    fn devices_are_written_in_place() {
        let mut f = AtomicFile::create(Path::new("/dev/null")).unwrap();
        f.write_all(b"discarded").unwrap();
        f.commit().unwrap();
        let md = std::fs::metadata("/dev/null").unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(
            md.file_type().is_char_device(),
            "/dev/null is no longer a device"
        );
    }
}
