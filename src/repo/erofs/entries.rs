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

/// Offsets of the ustar header fields used here.
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

/// The extension records that apply to the next entry.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    /// PAX records, merged as Go merges them: a later `x` header's key replaces an earlier one.
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// The PAX records as they came (sparse maps repeat keys, which merging would lose).
    pax_raw: Vec<u8>,
}

impl Pending {
    fn pax(&self, key: &[u8]) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

fn skip(what: impl Into<String>) -> BuildError {
    BuildError::Skip(what.into())
}

/// The bytes of a NUL-terminated field up to its first NUL.
fn c_str(field: &[u8]) -> &[u8] {
    field
        .iter()
        .position(|&b| b == 0)
        .map_or(field, |n| &field[..n])
}

/// Parse PAX records (`"<len> <key>=<value>\n"`) into `out`, replacing earlier values of the
/// same key.
fn parse_pax(mut data: &[u8], out: &mut Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), BuildError> {
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| skip("a PAX record without a length"))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= data.len())
            .ok_or_else(|| skip("a PAX record with a bad length"))?;
        let record = &data[sp + 1..len];
        let record = record
            .strip_suffix(b"\n")
            .ok_or_else(|| skip("a PAX record not ending in a newline"))?;
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| skip("a PAX record without `=`"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        out.retain(|(k, _)| k != key);
        out.push((key.to_vec(), value.to_vec()));
        data = &data[len..];
    }
    Ok(())
}

/// A PAX time (`[-]sec[.frac]`) as seconds and nanoseconds (`0..1e9`), as Go's `parsePAXTime`
/// reads it (at most nine fraction digits count).
pub(super) fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(value).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let negative = int.starts_with('-');
    let digits = int.strip_prefix('-').unwrap_or(int);
    if digits.is_empty() && frac.is_empty() {
        return None;
    }
    let secs: i64 = if digits.is_empty() {
        0
    } else {
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())??
    };
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos = 0u32;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(if !negative {
        (secs, nanos)
    } else if nanos == 0 {
        (-secs, 0)
    } else {
        // -1.25 s is 1.75 s before -1 s... as a timespec: seconds -2, nanoseconds 0.75e9.
        (-secs - 1, 1_000_000_000 - nanos)
    })
}

fn numeric(
    block: &[u8; BLOCK_LEN],
    f: std::ops::Range<usize>,
    what: &str,
) -> Result<i64, BuildError> {
    ptar::parse_numeric(&block[f]).ok_or_else(|| skip(format!("an invalid {what} field")))
}

fn pax_u64(pending: &Pending, key: &[u8]) -> Result<Option<u64>, BuildError> {
    pending
        .pax(key)
        .map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    skip(format!(
                        "PAX record {} has value {:?}",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(v)
                    ))
                })
        })
        .transpose()
}

/// The next entry of a layer stream, or `None` at its end.
pub(super) fn next_raw(
    repo: &Repository,
    reader: &mut SplitStreamReader,
) -> Result<Option<RawEntry>, BuildError> {
    let mut pending = Pending::default();
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
                match typeflag {
                    b'x' => {
                        parse_pax(&data, &mut pending.pax)?;
                        pending.pax_raw.extend_from_slice(&data);
                    }
                    b'L' => pending.long_name = Some(c_str(&data).to_vec()),
                    b'K' => pending.long_link = Some(c_str(&data).to_vec()),
                    // A global header is an entry of its own and changes nothing here.
                    _ => {}
                }
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
    pending: Pending,
) -> Result<RawEntry, BuildError> {
    let typeflag = block[field::TYPEFLAG];
    let ustar = &block[field::MAGIC] == b"ustar\0" && &block[field::VERSION] == b"00";
    let gnu = &block[field::MAGIC] == b"ustar " && &block[field::VERSION] == b" \0";
    let mut path = c_str(&block[field::NAME]).to_vec();
    if ustar {
        let prefix = c_str(&block[field::PREFIX]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&path);
            path = full;
        }
    }
    if let Some(n) = &pending.long_name {
        path.clone_from(n);
    }
    if let Some(p) = pending.pax(b"path") {
        path = p.to_vec();
    }
    let mut link = pending
        .long_link
        .clone()
        .unwrap_or_else(|| c_str(&block[field::LINKNAME]).to_vec());
    if let Some(l) = pending.pax(b"linkpath") {
        link = l.to_vec();
    }
    let mode = numeric(block, field::MODE, "mode")? as u32;
    let mut uid = numeric(block, field::UID, "uid")? as u64;
    let mut gid = numeric(block, field::GID, "gid")? as u64;
    let mut mtime = numeric(block, field::MTIME, "mtime")?;
    let mut nsec = 0u32;
    if let Some(v) = pax_u64(&pending, b"uid")? {
        uid = v;
    }
    if let Some(v) = pax_u64(&pending, b"gid")? {
        gid = v;
    }
    if let Some(t) = pending.pax(b"mtime") {
        (mtime, nsec) = parse_pax_time(t).ok_or_else(|| {
            skip(format!(
                "PAX mtime {:?} is not a time",
                String::from_utf8_lossy(t)
            ))
        })?;
    }
    let size = pax_u64(&pending, b"size")?.unwrap_or(header_size);
    let xattrs: Vec<(Vec<u8>, Vec<u8>)> = pending
        .pax
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(b"SCHILY.xattr.")
                .map(|name| (name.to_vec(), v.clone()))
        })
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_as_go_reads_them() {
        let t = |s: &str| parse_pax_time(s.as_bytes());
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(t("-302486400"), Some((-302_486_400, 0)));
        assert_eq!(t("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t("-0.5"), Some((-1, 500_000_000)));
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
        assert_eq!(
            out,
            [
                (b"mtime".to_vec(), b"-5".to_vec()),
                (b"path".to_vec(), b"bb".to_vec())
            ]
        );
        assert!(parse_pax(b"99 path=a\n", &mut out).is_err());
        assert!(parse_pax(b"9 path=a", &mut out).is_err());
    }
}
