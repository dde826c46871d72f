//! Tar entries read back from a layer splitstream, with their metadata as Go's `archive/tar`
//! gives it to containers/storage (and so as podman mounts the layer).
//!
//! composefs-rs reads layers with `tar-core`, which refuses some entries podman applies:
//! negative modification times (PAX `mtime=-302486400`, or a negative base-256 field),
//! duplicated extension headers, sparse files. This reader accepts what Go accepts and, for
//! every entry tar-core accepts, yields the same metadata (the image id of such layers stays
//! `cfsctl oci compute-id`'s, which the tests check), with one deliberate difference: a `\0`
//! entry whose name ends in `/` is a directory, as Go (and podman) take it; tar-core calls it
//! a regular file.
//!
//! The framing follows [`crate::proto::tar`]'s rules, which the importer applied when it
//! split the layer: extension headers (`x`, `g`, `L`, `K`) whatever their magic, no body for
//! types `1`–`6` and directories whatever their size field, and the first zero block ends the
//! archive.

use crate::proto::tar::header::{self, Extensions, HeaderError, field};
use crate::proto::tar::{
    self as ptar, BLOCK_LEN, MAX_EXTENSION_LEN, Pax1MapReader, SparseEntry, SparseFormat,
};

use super::super::splitstream::{Body, SplitStreamReader};
use super::super::tar::INLINE_CONTENT_MAX;
use super::super::{ObjectId, Repository};
use super::BuildError;

/// What a tar entry carries.
pub(super) enum RawItem {
    Directory,
    Inline(Vec<u8>),
    External(ObjectId, u64),
    /// Tar link target, as given.
    Hardlink(Vec<u8>),
    Symlink(Vec<u8>),
    Chr(u64),
    Blk(u64),
    Fifo,
}

/// One tar entry, its metadata resolved from its header and extension headers.
pub(super) struct RawEntry {
    /// Tar path, as given.
    pub path: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch, negative before 1970.
    pub mtime: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nsec: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub item: RawItem,
}

fn skip(what: impl Into<String>) -> BuildError {
    BuildError::Skip(what.into())
}

impl From<HeaderError> for BuildError {
    fn from(e: HeaderError) -> BuildError {
        skip(e.to_string())
    }
}

fn numeric(
    block: &[u8; BLOCK_LEN],
    f: std::ops::Range<usize>,
    what: &str,
) -> Result<i64, BuildError> {
    Ok(header::numeric(block, f, what)?)
}

/// The next entry of a layer stream, or `None` at its end.
pub(super) fn next_raw(
    repo: &Repository,
    reader: &mut SplitStreamReader,
) -> Result<Option<RawEntry>, BuildError> {
    let mut pending = Extensions::default();
    let mut block = [0u8; BLOCK_LEN];
    loop {
        if !reader.read_inline_exact(&mut block)? {
            return Ok(None);
        }
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if !ptar::verify_checksum(&block) {
            return Err(skip("a tar header with a bad checksum"));
        }
        let typeflag = block[field::TYPEFLAG];
        let size = u64::try_from(numeric(&block, field::SIZE, "size")?)
            .map_err(|_| skip("a negative size"))?;
        match typeflag {
            b'x' | b'g' | b'L' | b'K' => {
                if size > MAX_EXTENSION_LEN {
                    return Err(skip(format!("a {size}-byte extension header")));
                }
                let data = read_inline_body(reader, size)?;
                pending.add(typeflag, &data)?;
                continue;
            }
            _ => return entry(repo, reader, &block, size, pending).map(Some),
        }
    }
}

/// The map of an old GNU sparse entry: in its header and the extension blocks that follow it.
fn old_gnu_sparse(
    reader: &mut SplitStreamReader,
    header: &[u8; BLOCK_LEN],
    size: u64,
) -> Result<SparseEntry, BuildError> {
    /// Byte of the header that says an extension block follows.
    const IS_EXTENDED: usize = 482;
    /// The same byte in an extension block.
    const EXT_IS_EXTENDED: usize = 504;
    let mut exts: Vec<[u8; BLOCK_LEN]> = Vec::new();
    let mut more = header[IS_EXTENDED] != 0;
    while more {
        if exts.len() > ptar::MAX_SPARSE_SEGMENTS / 21 {
            return Err(skip("too many sparse extension blocks"));
        }
        let mut b = [0u8; BLOCK_LEN];
        if !reader.read_inline_exact(&mut b)? {
            return Err(skip("the stream ends in the sparse extension blocks"));
        }
        more = b[EXT_IS_EXTENDED] != 0;
        exts.push(b);
    }
    SparseEntry::from_old_gnu(header, &exts, size).map_err(|e| skip(e.to_string()))
}

/// A sparse file's body (`size` bytes, inline in the stream: for PAX 1.0 the map, then the
/// data segments packed) becomes its expanded content: an object of the real size whose holes
/// are zeros (inline content when it is that small).
fn sparse_file(
    repo: &Repository,
    reader: &mut SplitStreamReader,
    sparse: &SparseEntry,
    size: u64,
) -> Result<RawItem, BuildError> {
    let mut consumed = 0u64;
    let map = match (&sparse.map, sparse.format) {
        (Some(map), _) => map.clone(),
        (None, SparseFormat::PaxV10) => {
            let mut r = Pax1MapReader::new(sparse.real_size, size);
            let mut block = [0u8; BLOCK_LEN];
            while !r.is_done() {
                if consumed >= size || !reader.read_inline_span(&mut block)? {
                    return Err(skip("the body ends inside its PAX 1.0 sparse map"));
                }
                consumed += BLOCK_LEN as u64;
                let used = r.feed(&block).map_err(|e| skip(e.to_string()))?;
                if used != BLOCK_LEN {
                    return Err(skip("a PAX 1.0 sparse map not padded to a block"));
                }
            }
            r.into_map()
                .ok_or_else(|| skip("a PAX 1.0 sparse map that did not parse"))?
        }
        (None, _) => return Err(skip("a sparse entry without a map")),
    };
    if consumed.checked_add(map.data_len()) != Some(size) {
        return Err(skip(format!(
            "a sparse body of {size} bytes for {} bytes of map and {} of data",
            consumed,
            map.data_len()
        )));
    }
    let segments: Vec<(u64, u64)> = map
        .segments()
        .iter()
        .map(|s| (s.offset, s.length))
        .collect();
    let real_size = map.real_size();
    let item = if real_size <= INLINE_CONTENT_MAX {
        let mut content = vec![0u8; real_size as usize];
        for &(offset, length) in &segments {
            let at = offset as usize;
            if !reader.read_inline_span(&mut content[at..at + length as usize])? {
                return Err(skip("the stream ends in a sparse body"));
            }
        }
        RawItem::Inline(content)
    } else {
        let mut fill = |buf: &mut [u8]| -> anyhow::Result<()> {
            anyhow::ensure!(
                reader.read_inline_span(buf)?,
                "the stream ends in a sparse body"
            );
            Ok(())
        };
        let id = repo
            .store_sparse(real_size, &segments, &mut fill)
            .map_err(BuildError::Fatal)?;
        RawItem::External(id, real_size)
    };
    // The body's padding.
    let pad = (BLOCK_LEN as u64 - size % BLOCK_LEN as u64) % BLOCK_LEN as u64;
    let mut p = [0u8; BLOCK_LEN];
    if !reader.read_inline_span(&mut p[..pad as usize])? {
        return Err(skip("the stream ends in a sparse body's padding"));
    }
    Ok(item)
}

/// `e`, saying which entry (`path`) it is about.
fn prefix_skip(e: BuildError, path: &str) -> BuildError {
    match e {
        BuildError::Skip(s) => BuildError::Skip(format!("{path:?}: {s}")),
        fatal => fatal,
    }
}

/// Read a `size`-byte body that the importer kept inline, with its padding.
fn read_inline_body(reader: &mut SplitStreamReader, size: u64) -> Result<Vec<u8>, BuildError> {
    let padded = size
        .checked_next_multiple_of(BLOCK_LEN as u64)
        .ok_or_else(|| skip(format!("a size of {size} bytes overflows")))?;
    match reader.read_body(size, padded)? {
        Body::Inline(v) => Ok(v),
        Body::External(id) => Err(skip(format!(
            "an extension or entry body stored as object {id}"
        ))),
    }
}

fn entry(
    repo: &Repository,
    reader: &mut SplitStreamReader,
    block: &[u8; BLOCK_LEN],
    header_size: u64,
    pending: Extensions,
) -> Result<RawEntry, BuildError> {
    let typeflag = block[field::TYPEFLAG];
    let (ustar, gnu) = (header::is_ustar(block), header::is_gnu(block));
    let mut path = pending.path(block);
    let link = pending.link_path(block);
    let mode = numeric(block, field::MODE, "mode")? as u32;
    let mut uid = numeric(block, field::UID, "uid")? as u64;
    let mut gid = numeric(block, field::GID, "gid")? as u64;
    let mut mtime = numeric(block, field::MTIME, "mtime")?;
    let mut nsec = 0u32;
    if let Some(v) = pending.pax_u64(b"uid")? {
        uid = v;
    }
    if let Some(v) = pending.pax_u64(b"gid")? {
        gid = v;
    }
    if let Some(t) = pending.pax_time(b"mtime")? {
        (mtime, nsec) = (t.sec, t.nsec);
    }
    let size = pending.pax_u64(b"size")?.unwrap_or(header_size);
    let xattrs = pending.xattrs();
    if let Some(name) = pending.pax(b"GNU.sparse.name") {
        path = name.to_vec();
    }
    let show = String::from_utf8_lossy(&path).into_owned();
    let sparse = match typeflag {
        b'S' if gnu => {
            Some(old_gnu_sparse(reader, block, size).map_err(|e| prefix_skip(e, &show))?)
        }
        b'0' | 0 | b'7' | b'S' => SparseEntry::from_pax_records(&pending.pax_raw, size)
            .map_err(|e| skip(format!("{show:?}: {e}")))?,
        _ => None,
    };
    if let Some(sparse) = sparse {
        let item = sparse_file(repo, reader, &sparse, size).map_err(|e| prefix_skip(e, &show))?;
        return Ok(RawEntry {
            path,
            mode,
            uid: uid as u32,
            gid: gid as u32,
            mtime,
            nsec,
            xattrs,
            item,
        });
    }
    let device = |kind: &str| -> Result<u64, BuildError> {
        if !(ustar || gnu) {
            return Err(skip(format!(
                "{show:?}: a {kind} device without device numbers"
            )));
        }
        let major = ptar::parse_octal(&block[field::DEVMAJOR]);
        let minor = ptar::parse_octal(&block[field::DEVMINOR]);
        match (major, minor) {
            (Some(ma), Some(mi)) => Ok(rustix::fs::makedev(ma as u32, mi as u32)),
            _ => Err(skip(format!("{show:?}: invalid device numbers"))),
        }
    };
    // Types without a body in Go's reader, whatever their size field says.
    let dir_by_name = typeflag == 0 && path.ends_with(b"/");
    let item = match typeflag {
        b'5' => RawItem::Directory,
        0 if dir_by_name => RawItem::Directory,
        b'1' => RawItem::Hardlink(link),
        b'2' => RawItem::Symlink(link),
        b'3' => RawItem::Chr(device("character")?),
        b'4' => RawItem::Blk(device("block")?),
        b'6' => RawItem::Fifo,
        b'0' | 0 | b'7' => {
            let padded = size
                .checked_next_multiple_of(BLOCK_LEN as u64)
                .ok_or_else(|| skip(format!("{show:?}: a size of {size} bytes overflows")))?;
            match reader.read_body(size, padded)? {
                Body::External(id) if size > INLINE_CONTENT_MAX => RawItem::External(id, size),
                Body::External(_) => {
                    return Err(skip(format!(
                        "{show:?}: a {size}-byte file stored externally"
                    )));
                }
                Body::Inline(content) if content.len() as u64 <= INLINE_CONTENT_MAX => {
                    RawItem::Inline(content)
                }
                Body::Inline(content) => {
                    return Err(skip(format!(
                        "{show:?}: a {}-byte file stored inline",
                        content.len()
                    )));
                }
            }
        }
        other => {
            return Err(skip(format!(
                "{show:?}: tar entry type {:?} has no file type (containers/storage refuses it too)",
                other as char
            )));
        }
    };
    Ok(RawEntry {
        path,
        mode,
        uid: uid as u32,
        gid: gid as u32,
        mtime,
        nsec,
        xattrs,
        item,
    })
}
