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
use crate::proto::tar::{
    self as ptar, BLOCK_LEN, MAX_EXTENSION_LEN, Pax1MapReader, SparseEntry, SparseFormat, SparseMap,
};

/// Offsets of the ustar header fields read here.
mod field {
    use std::ops::Range;
    pub const NAME: Range<usize> = 0..100;
    pub const MODE: Range<usize> = 100..108;
    pub const UID: Range<usize> = 108..116;
    pub const GID: Range<usize> = 116..124;
    pub const SIZE: Range<usize> = 124..136;
    pub const MTIME: Range<usize> = 136..148;
    pub const TYPEFLAG: usize = 156;
    pub const LINKNAME: Range<usize> = 157..257;
    pub const MAGIC: Range<usize> = 257..263;
    pub const VERSION: Range<usize> = 263..265;
    pub const DEVMAJOR: Range<usize> = 329..337;
    pub const DEVMINOR: Range<usize> = 337..345;
    pub const PREFIX: Range<usize> = 345..500;
}

/// Old GNU sparse header: non-zero when an extension block follows.
const GNU_IS_EXTENDED: usize = 482;
/// Old GNU sparse extension block: non-zero when another one follows.
const GNU_EXT_IS_EXTENDED: usize = 504;
/// Most extension blocks of one old GNU sparse entry (21 segments each): as many as the
/// framer's segment limit allows, so a hostile chain cannot make us buffer without end.
const MAX_GNU_EXTENSIONS: usize = ptar::MAX_SPARSE_SEGMENTS / 21 + 1;

/// A point in time as tar gives it: seconds since the epoch (negative before 1970) and
/// nanoseconds `0..1e9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Time {
    pub sec: i64,
    pub nsec: u32,
}

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

/// Records of the extension headers that apply to the next entry.
#[derive(Debug, Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    /// Merged as Go merges them: a later `x` header's key replaces an earlier one.
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// The PAX records as they came (sparse maps repeat keys, which merging would lose).
    pax_raw: Vec<u8>,
}

impl Extensions {
    fn pax(&self, key: &[u8]) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    fn pax_u64(&self, key: &[u8]) -> anyhow::Result<Option<u64>> {
        self.pax(key)
            .map(|v| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .with_context(|| {
                        format!(
                            "PAX record {} has value {:?}",
                            String::from_utf8_lossy(key),
                            String::from_utf8_lossy(v)
                        )
                    })
            })
            .transpose()
    }

    /// The `SCHILY.xattr.*` records, in order.
    fn xattrs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.pax
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(b"SCHILY.xattr.")
                    .map(|name| (name.to_vec(), v.clone()))
            })
            .collect()
    }

    fn pax_time(&self, key: &[u8]) -> anyhow::Result<Option<Time>> {
        self.pax(key)
            .map(|v| {
                parse_pax_time(v).with_context(|| {
                    format!(
                        "PAX {} {:?} is not a time",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(v)
                    )
                })
            })
            .transpose()
    }
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
                match typeflag {
                    b'x' => {
                        parse_pax(&data, &mut ext.pax)
                            .with_context(|| format!("PAX header at offset {at}"))?;
                        ext.pax_raw.extend_from_slice(&data);
                    }
                    b'L' => ext.long_name = Some(c_str(&data).to_vec()),
                    b'K' => ext.long_link = Some(c_str(&data).to_vec()),
                    // A global header is an entry of its own; Go's applier ignores it.
                    _ => {}
                }
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
        let ustar = &block[field::MAGIC] == b"ustar\0" && &block[field::VERSION] == b"00";
        let gnu = &block[field::MAGIC] == b"ustar " && &block[field::VERSION] == b" \0";
        let mut path = entry_path(block, &ext, ustar);
        let mut link = ext
            .long_link
            .clone()
            .unwrap_or_else(|| c_str(&block[field::LINKNAME]).to_vec());
        if let Some(l) = ext.pax(b"linkpath") {
            link = l.to_vec();
        }
        let show = String::from_utf8_lossy(&path).into_owned();
        let ctx = |e: anyhow::Error| e.context(format!("tar entry {show:?} at offset {at}"));
        let mode = numeric(block, field::MODE, "mode", at)? as u32 & 0o7777;
        let (uid, gid, mtime, atime) = owner_and_times(block, &ext, at).map_err(ctx)?;
        let size = ext.pax_u64(b"size").map_err(ctx)?.unwrap_or(header_size);
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

/// An entry's path: its name field (with the ustar prefix), replaced by a GNU long name, then
/// by a PAX `path` record, as Go's reader resolves it.
fn entry_path(block: &[u8; BLOCK_LEN], ext: &Extensions, ustar: bool) -> Vec<u8> {
    if let Some(p) = ext.pax(b"path") {
        return p.to_vec();
    }
    if let Some(n) = &ext.long_name {
        return n.clone();
    }
    let name = c_str(&block[field::NAME]);
    let prefix = c_str(&block[field::PREFIX]);
    if !ustar || prefix.is_empty() {
        return name.to_vec();
    }
    let mut full = prefix.to_vec();
    full.push(b'/');
    full.extend_from_slice(name);
    full
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
    ptar::parse_numeric(&block[f])
        .with_context(|| format!("tar header at offset {at}: invalid {what} field"))
}

/// The bytes of a NUL-terminated field up to its first NUL.
fn c_str(field: &[u8]) -> &[u8] {
    field
        .iter()
        .position(|&b| b == 0)
        .map_or(field, |n| &field[..n])
}

/// Parse PAX records (`"<len> <key>=<value>\n"`) into `out`, a later value of a key
/// replacing an earlier one.
fn parse_pax(mut data: &[u8], out: &mut Vec<(Vec<u8>, Vec<u8>)>) -> anyhow::Result<()> {
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .context("a PAX record without a length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= data.len())
            .context("a PAX record with a bad length")?;
        let record = data[sp + 1..len]
            .strip_suffix(b"\n")
            .context("a PAX record not ending in a newline")?;
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .context("a PAX record without `=`")?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        out.retain(|(k, _)| k != key);
        out.push((key.to_vec(), value.to_vec()));
        data = &data[len..];
    }
    Ok(())
}

/// A PAX time (`[-]sec[.frac]`) as Go's `parsePAXTime` reads it: at most nine fraction digits
/// count, and a negative time's fraction counts back from the second before.
fn parse_pax_time(value: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(value).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let negative = int.starts_with('-');
    let digits = int.strip_prefix('-').unwrap_or(int);
    if digits.is_empty() && frac.is_empty() {
        return None;
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: i64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let mut nsec = 0u32;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(match (negative, nsec) {
        (false, _) => Time { sec, nsec },
        (true, 0) => Time { sec: -sec, nsec: 0 },
        (true, _) => Time {
            sec: -sec - 1,
            nsec: 1_000_000_000 - nsec,
        },
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_as_go_reads_them() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.sec, t.nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(t("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t(".5"), Some((0, 500_000_000)));
        for bad in ["", "-", "1e5", "1.x", "--1", " 1"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn pax_records_merge_later_over_earlier() {
        let mut out = Vec::new();
        parse_pax(b"11 path=a/\n12 mtime=-5\n", &mut out).unwrap();
        parse_pax(b"11 path=bb\n", &mut out).unwrap();
        assert_eq!(out[1], (b"path".to_vec(), b"bb".to_vec()));
        assert!(parse_pax(b"99 path=a\n", &mut out).is_err());
    }
}
