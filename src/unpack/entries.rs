//! Tar entries read from a layer stream as it arrives, with their metadata as Go's
//! `archive/tar` gives it to containers/storage's applier (and so as podman's overlay mount
//! shows it).
//!
//! Headers and small bodies come inline; a regular file's body may instead arrive as one fd
//! (the file in the store), which the applier then clones. The framing is
//! [`crate::proto::tar`]'s: extension headers (`x`, `g`, `L`, `K`) whatever their magic, no
//! body for types `1`–`6` and directories whatever their size field, and the first zero block
//! ends the archive.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, bail, ensure};

use crate::client::{LayerItem, LayerStream};
pub(crate) use crate::proto::tar::header::Time;
use crate::proto::tar::header::{self, Extensions, field};
use crate::proto::tar::{
    self as ptar, BLOCK_LEN, MAX_EXTENSION_LEN, Pax1MapReader, SparseEntry, SparseFormat, SparseMap,
};

/// Old GNU sparse header: non-zero when an extension block follows.
const GNU_IS_EXTENDED: usize = 482;
/// Old GNU sparse extension block: non-zero when another one follows.
const GNU_EXT_IS_EXTENDED: usize = 504;
/// Most extension blocks of one old GNU sparse entry (21 segments each): as many as the
/// framer's segment limit allows, so a hostile chain cannot make us buffer without end.
const MAX_GNU_EXTENSIONS: usize = ptar::MAX_SPARSE_SEGMENTS / 21 + 1;

/// What an entry is.
#[derive(Debug)]
pub(crate) enum Kind {
    Directory,
    /// A regular file: its body follows (see [`Entries::body_fd`] and [`Entries::read_body`]).
    File(FileBody),
    /// Hard link to this tar path, as given.
    Hardlink(Vec<u8>),
    /// Symlink with this target, as given.
    Symlink(Vec<u8>),
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// How a regular file's content is laid out in the tar.
#[derive(Debug)]
pub(crate) enum FileBody {
    /// `size` bytes of content.
    Plain { size: u64 },
    /// A sparse file: the data segments of `map`, packed, in the body.
    Sparse { map: SparseMap },
}

/// One tar entry with its metadata resolved from its header and extension headers.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Tar path, as given.
    pub path: Vec<u8>,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: Time,
    /// PAX `atime`, when given.
    pub atime: Option<Time>,
    /// `SCHILY.xattr.*` records, in order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub kind: Kind,
}

/// Where the current entry's body is.
#[derive(Debug)]
enum BodySource {
    /// Not decided yet: the next stream item says.
    Unknown,
    Inline,
    /// One whole body as an fd, read from `offset` on (none taken while `offset` is 0).
    Fd {
        fd: Option<OwnedFd>,
        offset: u64,
    },
}

/// The rest of the current entry: body bytes not consumed, then padding.
#[derive(Debug)]
struct Pending {
    left: u64,
    padding: u64,
    source: BodySource,
}

/// The entries of one layer stream.
#[derive(Debug)]
pub(crate) struct Entries<'s, 'p> {
    stream: &'s mut LayerStream<'p>,
    /// Inline bytes received and not yet consumed (`buf[pos..]`).
    buf: Vec<u8>,
    pos: usize,
    /// Tar offset of `buf[pos]`, for error messages.
    offset: u64,
    pending: Option<Pending>,
    /// The stream has ended and was confirmed complete.
    ended: bool,
}

/// What the next stream item was.
enum Pulled {
    Inline,
    File(OwnedFd, u64),
    End,
}

impl<'s, 'p> Entries<'s, 'p> {
    pub(crate) fn new(stream: &'s mut LayerStream<'p>) -> Self {
        Entries {
            stream,
            buf: Vec::new(),
            pos: 0,
            offset: 0,
            pending: None,
            ended: false,
        }
    }

    /// Tar offset of the next byte to be read.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    fn pull(&mut self) -> anyhow::Result<Pulled> {
        if self.ended {
            return Ok(Pulled::End);
        }
        match self.stream.next_item()? {
            None => {
                self.ended = true;
                Ok(Pulled::End)
            }
            Some(LayerItem::Inline(bytes)) => {
                // Headers arrive one piece each, so the buffer stays about a block long.
                self.buf.drain(..self.pos);
                self.pos = 0;
                self.buf.extend_from_slice(bytes);
                Ok(Pulled::Inline)
            }
            Some(LayerItem::File { fd, size, .. }) => Ok(Pulled::File(fd, size)),
        }
    }

    /// Fill `out` from inline bytes; returns how many were read (fewer only at the end of
    /// the stream).
    fn read_inline(&mut self, out: &mut [u8]) -> anyhow::Result<usize> {
        let mut done = 0;
        while done < out.len() {
            if self.pos == self.buf.len() {
                match self.pull()? {
                    Pulled::Inline => {}
                    Pulled::End => break,
                    Pulled::File(_, size) => bail!(
                        "a {size}-byte body fd at tar offset {} where tar bytes were expected",
                        self.offset
                    ),
                }
            }
            let n = (out.len() - done).min(self.buf.len() - self.pos);
            out[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            self.offset += n as u64;
            done += n;
        }
        Ok(done)
    }

    fn read_inline_exact(&mut self, out: &mut [u8], what: &str) -> anyhow::Result<()> {
        let n = self.read_inline(out)?;
        ensure!(
            n == out.len(),
            "the stream ends at tar offset {} inside {what}",
            self.offset
        );
        Ok(())
    }

    fn skip_inline(&mut self, mut len: u64, what: &str) -> anyhow::Result<()> {
        let mut scratch = [0u8; BLOCK_LEN];
        while len > 0 {
            let n = len.min(BLOCK_LEN as u64) as usize;
            self.read_inline_exact(&mut scratch[..n], what)?;
            len -= n as u64;
        }
        Ok(())
    }

    /// Decide where the current body is, from the next stream item if nothing is buffered.
    fn resolve_body(&mut self) -> anyhow::Result<()> {
        let Some(p) = self.pending.as_mut() else {
            return Ok(());
        };
        if !matches!(p.source, BodySource::Unknown) || p.left == 0 {
            return Ok(());
        }
        if self.pos < self.buf.len() {
            p.source = BodySource::Inline;
            return Ok(());
        }
        let left = p.left;
        match self.pull()? {
            Pulled::Inline => {
                self.pending.as_mut().expect("checked").source = BodySource::Inline;
            }
            Pulled::End => bail!(
                "the stream ends at tar offset {} before a {left}-byte body",
                self.offset
            ),
            Pulled::File(fd, size) => {
                ensure!(
                    size == left,
                    "a {size}-byte body fd at tar offset {} for a {left}-byte body",
                    self.offset
                );
                self.pending.as_mut().expect("checked").source = BodySource::Fd {
                    fd: Some(fd),
                    offset: 0,
                };
            }
        }
        Ok(())
    }

    /// The current entry's whole body as an fd of exactly its size, when it came as one and
    /// nothing of it was read yet. Taking it consumes the body.
    pub(crate) fn body_fd(&mut self) -> anyhow::Result<Option<OwnedFd>> {
        self.resolve_body()?;
        let Some(p) = self.pending.as_mut() else {
            return Ok(None);
        };
        if let BodySource::Fd { fd, offset: 0 } = &mut p.source {
            let fd = fd.take();
            if fd.is_some() {
                self.offset += p.left;
                p.left = 0;
            }
            return Ok(fd);
        }
        Ok(None)
    }

    /// Read the next bytes of the current entry's body into `out`; returns how many (0 once
    /// the body is consumed).
    pub(crate) fn read_body(&mut self, out: &mut [u8]) -> anyhow::Result<usize> {
        self.resolve_body()?;
        let Some(p) = self.pending.as_mut() else {
            return Ok(0);
        };
        let want = usize::try_from(p.left.min(out.len() as u64)).expect("≤ out.len()");
        if want == 0 {
            return Ok(0);
        }
        let n = match &mut p.source {
            BodySource::Unknown => unreachable!("resolved above"),
            BodySource::Inline => {
                let n = self.read_inline(&mut out[..want])?;
                ensure!(
                    n == want,
                    "the stream ends at tar offset {} inside a body",
                    self.offset
                );
                self.pending.as_mut().expect("present").left -= n as u64;
                return Ok(n);
            }
            BodySource::Fd { fd: None, .. } => bail!("the body fd was already taken"),
            BodySource::Fd {
                fd: Some(fd),
                offset,
            } => {
                // By position: the helper may share the fd's file offset.
                let n = pread(fd.as_fd(), &mut out[..want], *offset)
                    .with_context(|| format!("reading a body fd at offset {offset}"))?;
                ensure!(n > 0, "a body fd ends after {offset} bytes");
                *offset += n as u64;
                n
            }
        };
        p.left -= n as u64;
        self.offset += n as u64;
        Ok(n)
    }

    /// Fill `out` from the body exactly.
    pub(crate) fn read_body_exact(&mut self, out: &mut [u8]) -> anyhow::Result<()> {
        let mut done = 0;
        while done < out.len() {
            let n = self.read_body(&mut out[done..])?;
            ensure!(n > 0, "the body ends before the sparse map says");
            done += n;
        }
        Ok(())
    }

    /// Skip what is left of the current entry (body and padding).
    fn finish_entry(&mut self) -> anyhow::Result<()> {
        let Some(p) = self.pending.as_ref() else {
            return Ok(());
        };
        if p.left > 0 {
            if matches!(p.source, BodySource::Unknown | BodySource::Fd { .. }) {
                // An untaken fd body is dropped whole (it is one stream item).
                self.resolve_body()?;
                let p = self.pending.as_mut().expect("present");
                if let BodySource::Fd { .. } = p.source {
                    self.offset += p.left;
                    p.left = 0;
                }
            }
            let left = self.pending.as_ref().expect("present").left;
            self.skip_inline(left, "a body")?;
        }
        let padding = self.pending.take().expect("present").padding;
        self.skip_inline(padding, "a body's padding")
    }

    /// The next entry, or `None` at the end of the archive (after which the rest of the
    /// stream, the end-of-archive blocks, is read and the stream's completeness confirmed).
    ///
    /// # Errors
    /// A malformed tar, an entry type containers/storage refuses, or a stream failure.
    pub(crate) fn next_entry(&mut self) -> anyhow::Result<Option<Entry>> {
        self.finish_entry()?;
        let mut ext = Extensions::default();
        let mut block = [0u8; BLOCK_LEN];
        loop {
            let at = self.offset;
            let n = self.read_inline(&mut block)?;
            if n == 0 {
                return Ok(None);
            }
            ensure!(n == BLOCK_LEN, "the stream ends inside the header at {at}");
            if block.iter().all(|&b| b == 0) {
                self.drain()?;
                return Ok(None);
            }
            ensure!(
                ptar::verify_checksum(&block),
                "tar header at offset {at}: bad checksum"
            );
            let typeflag = block[field::TYPEFLAG];
            let size = numeric(&block, field::SIZE, "size", at)?;
            let size = u64::try_from(size)
                .ok()
                .with_context(|| format!("tar header at offset {at}: negative size"))?;
            if let b'x' | b'g' | b'L' | b'K' = typeflag {
                ensure!(
                    size <= MAX_EXTENSION_LEN,
                    "tar header at offset {at}: a {size}-byte extension header"
                );
                let mut data = vec![0u8; size as usize];
                self.read_inline_exact(&mut data, "an extension header")?;
                self.skip_inline(padding(size), "an extension header's padding")?;
                ext.add(typeflag, &data)
                    .with_context(|| format!("extension header at offset {at}"))?;
                continue;
            }
            return self.entry(&block, size, ext, at).map(Some);
        }
    }

    /// Read the rest of the stream (end-of-archive blocks, trailing bytes) so the helper's
    /// end status is checked.
    fn drain(&mut self) -> anyhow::Result<()> {
        self.pos = self.buf.len();
        loop {
            match self.pull()? {
                Pulled::End => return Ok(()),
                Pulled::Inline => self.pos = self.buf.len(),
                Pulled::File(_, size) => {
                    bail!("a {size}-byte body fd after the end of the archive")
                }
            }
        }
    }

    fn entry(
        &mut self,
        block: &[u8; BLOCK_LEN],
        header_size: u64,
        ext: Extensions,
        at: u64,
    ) -> anyhow::Result<Entry> {
        let typeflag = block[field::TYPEFLAG];
        let (ustar, gnu) = (header::is_ustar(block), header::is_gnu(block));
        let mut path = ext.path(block);
        let link = ext.link_path(block);
        let show = String::from_utf8_lossy(&path).into_owned();
        let ctx = |e: anyhow::Error| e.context(format!("tar entry {show:?} at offset {at}"));
        let mode = numeric(block, field::MODE, "mode", at)? as u32 & 0o7777;
        let (uid, gid, mtime, atime) = owner_and_times(block, &ext, at).map_err(ctx)?;
        let size = ext
            .pax_u64(b"size")
            .map_err(|e| ctx(e.into()))?
            .unwrap_or(header_size);
        let xattrs = ext.xattrs();
        if let Some(name) = ext.pax(b"GNU.sparse.name") {
            path = name.to_vec();
        }
        let device = |kind: &str| -> anyhow::Result<(u32, u32)> {
            ensure!(ustar || gnu, "a {kind} device without device numbers");
            let major = ptar::parse_octal(&block[field::DEVMAJOR]);
            let minor = ptar::parse_octal(&block[field::DEVMINOR]);
            match (
                major.and_then(|m| u32::try_from(m).ok()),
                minor.and_then(|m| u32::try_from(m).ok()),
            ) {
                (Some(major), Some(minor)) => Ok((major, minor)),
                _ => bail!("invalid device numbers"),
            }
        };
        let dir_by_name = typeflag == 0 && path.ends_with(b"/");
        let show = String::from_utf8_lossy(&path).into_owned();
        let ctx = |e: anyhow::Error| e.context(format!("tar entry {show:?} at offset {at}"));
        // Types without a body in Go's reader, whatever their size field says.
        let kind = match typeflag {
            b'5' => Kind::Directory,
            0 if dir_by_name => Kind::Directory,
            b'1' => Kind::Hardlink(link),
            b'2' => Kind::Symlink(link),
            b'3' => {
                let (major, minor) = device("character").map_err(ctx)?;
                Kind::Char { major, minor }
            }
            b'4' => {
                let (major, minor) = device("block").map_err(ctx)?;
                Kind::Block { major, minor }
            }
            b'6' => Kind::Fifo,
            b'S' if gnu => {
                let sparse = self.old_gnu_sparse(block, size).map_err(ctx)?;
                Kind::File(self.sparse_body(sparse, size).map_err(ctx)?)
            }
            b'0' | 0 | b'7' | b'S' => match SparseEntry::from_pax_records(&ext.pax_raw, size)
                .map_err(|e| ctx(e.into()))?
            {
                Some(sparse) => Kind::File(self.sparse_body(sparse, size).map_err(ctx)?),
                None => {
                    self.pending = Some(Pending {
                        left: size,
                        padding: padding(size),
                        source: BodySource::Unknown,
                    });
                    Kind::File(FileBody::Plain { size })
                }
            },
            other => {
                return Err(ctx(anyhow::anyhow!(
                    "tar entry type {:?} has no file type (containers/storage refuses it too)",
                    other as char
                )));
            }
        };
        Ok(Entry {
            path,
            mode,
            uid,
            gid,
            mtime,
            atime,
            xattrs,
            kind,
        })
    }

    /// The extension blocks of an old GNU sparse header and its map.
    fn old_gnu_sparse(
        &mut self,
        header: &[u8; BLOCK_LEN],
        size: u64,
    ) -> anyhow::Result<SparseEntry> {
        let mut exts: Vec<[u8; BLOCK_LEN]> = Vec::new();
        let mut more = header[GNU_IS_EXTENDED] != 0;
        while more {
            ensure!(
                exts.len() < MAX_GNU_EXTENSIONS,
                "too many sparse extension blocks"
            );
            let mut b = [0u8; BLOCK_LEN];
            self.read_inline_exact(&mut b, "the sparse extension blocks")?;
            more = b[GNU_EXT_IS_EXTENDED] != 0;
            exts.push(b);
        }
        Ok(SparseEntry::from_old_gnu(header, &exts, size)?)
    }

    /// Set up the body of a sparse entry whose tar body has `size` bytes: read its PAX 1.0
    /// map if it has one; the data segments follow, packed.
    fn sparse_body(&mut self, sparse: SparseEntry, size: u64) -> anyhow::Result<FileBody> {
        self.pending = Some(Pending {
            left: size,
            padding: padding(size),
            source: BodySource::Unknown,
        });
        let mut consumed = 0u64;
        let map = match (sparse.map, sparse.format) {
            (Some(map), _) => map,
            (None, SparseFormat::PaxV10) => {
                let mut r = Pax1MapReader::new(sparse.real_size, size);
                let mut block = [0u8; BLOCK_LEN];
                while !r.is_done() {
                    ensure!(
                        consumed < size,
                        "the body ends inside its PAX 1.0 sparse map"
                    );
                    self.read_body_exact(&mut block)?;
                    consumed += BLOCK_LEN as u64;
                    let used = r.feed(&block)?;
                    ensure!(
                        used == BLOCK_LEN,
                        "a PAX 1.0 sparse map not padded to a block"
                    );
                }
                r.into_map()
                    .context("a PAX 1.0 sparse map that did not parse")?
            }
            (None, _) => bail!("a sparse entry without a map"),
        };
        ensure!(
            consumed.checked_add(map.data_len()) == Some(size),
            "a sparse body of {size} bytes for {consumed} bytes of map and {} of data",
            map.data_len()
        );
        Ok(FileBody::Sparse { map })
    }
}

/// An entry's owner, group, mtime and atime: PAX records where given, else the header's.
fn owner_and_times(
    block: &[u8; BLOCK_LEN],
    ext: &Extensions,
    at: u64,
) -> anyhow::Result<(u64, u64, Time, Option<Time>)> {
    let uid = match ext.pax_u64(b"uid")? {
        Some(v) => v,
        None => numeric(block, field::UID, "uid", at)? as u64,
    };
    let gid = match ext.pax_u64(b"gid")? {
        Some(v) => v,
        None => numeric(block, field::GID, "gid", at)? as u64,
    };
    let mtime = match ext.pax_time(b"mtime")? {
        Some(t) => t,
        None => Time {
            sec: numeric(block, field::MTIME, "mtime", at)?,
            nsec: 0,
        },
    };
    Ok((uid, gid, mtime, ext.pax_time(b"atime")?))
}

/// Zero bytes after a body of `size` bytes, up to the next block.
fn padding(size: u64) -> u64 {
    (BLOCK_LEN as u64 - size % BLOCK_LEN as u64) % BLOCK_LEN as u64
}

fn numeric(
    block: &[u8; BLOCK_LEN],
    f: std::ops::Range<usize>,
    what: &str,
    at: u64,
) -> anyhow::Result<i64> {
    header::numeric(block, f, what).with_context(|| format!("tar header at offset {at}"))
}

/// `pread` once, retrying on `EINTR`.
pub(crate) fn pread(
    fd: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<usize> {
    loop {
        match rustix::io::pread(fd, &mut *buf, offset) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}
