//! File bodies into the tree: cloned (`FICLONE`) when source and target share a reflink
//! filesystem, else copied in the kernel (`copy_file_range`), else read and written.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, ensure};
use rustix::io::Errno;

use super::entries::{Entries, pread};
use crate::proto::tar::SparseMap;

/// Copy buffer of the read-and-write fallback, and of inline bodies.
const COPY_BUF: usize = 1 << 20;

/// How bodies were written, counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BodyStats {
    /// Bodies cloned with `FICLONE` (no data copied).
    pub reflinked: u64,
    /// Bodies copied with `copy_file_range` (possibly shared by the filesystem too).
    pub copied_in_kernel: u64,
    /// Bodies read and written: inline ones, sparse ones, and fds no faster way took.
    pub written: u64,
    /// Bytes of regular-file content placed, all ways together.
    pub bytes: u64,
}

/// Writes bodies, remembering which fast paths failed so later bodies skip them.
#[derive(Debug)]
pub(crate) struct Copier {
    /// Source devices `FICLONE` failed from with an error meaning "never from here".
    no_reflink_from: HashSet<u64>,
    /// `copy_file_range` refused once (an old kernel, or filesystems it cannot join).
    no_copy_range: bool,
    buf: Vec<u8>,
    pub stats: BodyStats,
    /// Whether the last clone attempted worked (`None`: none attempted yet).
    pub reflinks: Option<bool>,
}

impl Copier {
    pub(crate) fn new() -> Self {
        Copier {
            no_reflink_from: HashSet::new(),
            no_copy_range: false,
            buf: Vec::new(),
            stats: BodyStats::default(),
            reflinks: None,
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0u8; COPY_BUF];
        }
        &mut self.buf
    }

    /// Make the new, empty file `dst` hold the `size` bytes of `src`.
    pub(crate) fn copy_fd(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        size: u64,
    ) -> anyhow::Result<()> {
        self.stats.bytes += size;
        let st = rustix::fs::fstat(src).context("inspecting a body fd")?;
        // A clone takes what the file holds when it is made: the size the tar gives must be
        // the one it has (checked when the fd arrived, and again here, just before).
        ensure!(
            st.st_size as u64 == size,
            "the source file has {} bytes, the layer says {size}",
            st.st_size
        );
        if !self.no_reflink_from.contains(&st.st_dev) {
            match rustix::fs::ioctl_ficlone(dst, src) {
                Ok(()) => {
                    self.stats.reflinked += 1;
                    self.reflinks = Some(true);
                    return Ok(());
                }
                // Not supported here (ext4, tmpfs) or not the same filesystem: remember.
                Err(
                    Errno::OPNOTSUPP | Errno::XDEV | Errno::NOTTY | Errno::INVAL | Errno::NOSYS,
                ) => {
                    self.no_reflink_from.insert(st.st_dev);
                    self.reflinks = Some(false);
                }
                // Anything else shows up again when the body is read.
                Err(_) => {}
            }
        }
        let mut done = 0u64;
        if !self.no_copy_range {
            while done < size {
                let mut off_in = done;
                let mut off_out = done;
                let want = usize::try_from((size - done).min(1 << 30)).expect("≤ 1 GiB");
                match rustix::fs::copy_file_range(
                    src,
                    Some(&mut off_in),
                    dst,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(0) => break,
                    Ok(n) => done += n as u64,
                    Err(Errno::INTR) => {}
                    Err(Errno::XDEV | Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS)
                        if done == 0 =>
                    {
                        self.no_copy_range = true;
                        break;
                    }
                    Err(e) => return Err(e).context("copy_file_range"),
                }
            }
            if done == size {
                self.stats.copied_in_kernel += 1;
                return Ok(());
            }
        }
        while done < size {
            let want = usize::try_from((size - done).min(COPY_BUF as u64)).expect("≤ buffer");
            let buf = &mut self.buf()[..want];
            let n = pread(src, buf, done).with_context(|| format!("reading at offset {done}"))?;
            ensure!(
                n > 0,
                "the source file ends after {done} of its {size} bytes"
            );
            write_all_at(dst, &self.buf[..n], done)?;
            done += n as u64;
        }
        self.stats.written += 1;
        Ok(())
    }

    /// Write the current entry's plain body of `size` bytes from the stream to `dst`.
    pub(crate) fn copy_stream(
        &mut self,
        entries: &mut Entries<'_, '_>,
        dst: BorrowedFd<'_>,
        size: u64,
    ) -> anyhow::Result<()> {
        if let Some(fd) = entries.body_fd()? {
            return self.copy_fd(fd.as_fd(), dst, size);
        }
        self.stats.bytes += size;
        let mut at = 0u64;
        loop {
            let n = entries.read_body(self.buf())?;
            if n == 0 {
                break;
            }
            write_all_at(dst, &self.buf[..n], at)?;
            at += n as u64;
        }
        ensure!(at == size, "the body ends after {at} of its {size} bytes");
        self.stats.written += 1;
        Ok(())
    }

    /// Write a sparse body: each data segment at its offset, holes left unwritten, and the
    /// file's size set to the map's real size.
    pub(crate) fn copy_sparse(
        &mut self,
        entries: &mut Entries<'_, '_>,
        dst: BorrowedFd<'_>,
        map: &SparseMap,
    ) -> anyhow::Result<()> {
        for seg in map.segments() {
            let mut done = 0u64;
            while done < seg.length {
                let want =
                    usize::try_from((seg.length - done).min(COPY_BUF as u64)).expect("≤ buffer");
                let buf = &mut self.buf()[..want];
                entries.read_body_exact(buf)?;
                write_all_at(dst, &self.buf[..want], seg.offset + done)?;
                done += want as u64;
            }
        }
        rustix::fs::ftruncate(dst, map.real_size()).context("setting a sparse file's size")?;
        self.stats.bytes += map.real_size();
        self.stats.written += 1;
        Ok(())
    }
}

/// `pwrite` all of `data` at `offset`.
fn write_all_at(fd: BorrowedFd<'_>, mut data: &[u8], mut offset: u64) -> anyhow::Result<()> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, offset) {
            Ok(0) => anyhow::bail!("writing at offset {offset}: no progress"),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e).with_context(|| format!("writing at offset {offset}")),
        }
    }
    Ok(())
}
