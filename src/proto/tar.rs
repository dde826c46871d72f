//! The tar rules the splitfdstream codec relies on.
//!
//! A splitfdstream is a layer tar with regular-file bodies elided, so its reader has to know where
//! tar bodies start and end. The layer tars come from tar-split, which reads them with (a fork of)
//! Go's `archive/tar`; this module follows that reader's framing rules so that every archive Go
//! accepts frames the same way here:
//!
//! - Headers are 512-byte blocks whose checksum (field at 148..156, parsed as octal) equals the
//!   unsigned or the signed byte sum of the block with the checksum field read as spaces.
//! - Numeric fields are octal (leading/trailing spaces and NULs ignored) or, when the first byte
//!   has its high bit set, big-endian two's-complement base-256.
//! - Bodies follow the header and are padded with zeros to a multiple of 512 bytes.
//! - Typeflags `1`–`6` (hard link, symlink, char/block device, directory, FIFO) have no body,
//!   whatever their size field says; a `\0` (old regular file) entry whose name ends in `/` is a
//!   directory and has no body either. Every other entry has a body of its size.
//! - `x` (PAX) headers carry records for the next entry; a `size` record replaces that entry's
//!   size, a `path` record its name. A later `x` replaces the records of an earlier one. `g`
//!   (PAX global) headers are entries of their own (Go's `Reader.Next` returns them) and do not
//!   change the next entry's size.
//! - `L`/`K` (GNU long name/link) headers carry the next entry's name/link target.
//! - `S` (old GNU sparse) headers may be followed by extension blocks (while byte 504 of the
//!   previous block, or byte 482 of the header, is non-zero), then the body. A body of a sparse
//!   entry (`S`, or PAX `GNU.sparse.*` records that make it sparse by Go's rule, see
//!   [`sparse`]) is the archive's map and data segments, not the expanded file;
//!   [`Tracker::file_body`] says which bodies are sparse, in which format.
//! - Every entry, with its body and padding, ends below tar offset 2^64; sizes that would take
//!   the archive past it are errors ([`TarError::SizeOverflow`]), never wrapped.
//! - A zero block ends the archive. Go also wants a second zero block; this tracker is lenient and
//!   treats everything after the first zero block as trailer (tar-split keeps trailing bytes).
//!
//! [`Tracker`] applies these rules incrementally to bytes fed in arbitrary pieces, looks only at
//! header bytes, and never buffers more than one 512-byte block. It is the crate's one tar
//! framer: the stream reader, the OCI layout backend (which counts entries with it) and the
//! repository importer (which decides with it which bodies become objects) all use it, so they
//! cannot disagree about where an entry starts.
//!
//! A tracker made with [`Tracker::with_sparse_maps`] also reads and checks sparse maps as Go
//! does (from the PAX records, the old GNU header and extension blocks, or the start of a PAX
//! 1.0 body it is fed), rejects invalid ones ([`TarError::Sparse`]), and keeps the current
//! entry's map ([`Tracker::sparse_entry`]): at most [`MAX_SPARSE_SEGMENTS`] segments. The
//! framing is the same either way.

use std::fmt;
use std::ops::Range;

pub mod header;
mod pax;
pub mod sparse;
use pax::PaxParser;

pub use sparse::{
    MAX_PAX1_MAP_LEN, MAX_SPARSE_SEGMENTS, Pax1MapReader, SparseEntry, SparseError, SparseFormat,
    SparseMap, SparseSegment,
};
use sparse::{OldGnuMap, SPARSE_KEY_MAX, SparseKey, SparseRecords};

/// Size of a tar block: headers are one block, bodies are padded to a multiple of it.
pub const BLOCK_LEN: usize = 512;

/// Largest body of a PAX (`x`, `g`) or GNU long name/link (`L`, `K`) header. Go's
/// `archive/tar` refuses larger ones (`maxSpecialFileSize`), so tar-split never produces them;
/// rejecting them here keeps a hostile stream from making us parse megabytes of records.
pub const MAX_EXTENSION_LEN: u64 = 1 << 20;

/// Name field (NUL-terminated unless it fills the field).
const NAME: Range<usize> = 0..100;
/// Size field, octal or base-256.
const SIZE: Range<usize> = 124..136;
/// Checksum field, octal; counted as eight spaces when computing the checksum.
const CHKSUM: Range<usize> = 148..156;
/// Typeflag byte.
const TYPEFLAG: usize = 156;
/// Magic field of the ustar family.
const MAGIC: Range<usize> = 257..263;
/// Version field following the magic.
const VERSION: Range<usize> = 263..265;
/// Start of the ustar (and star) name prefix.
const PREFIX_START: usize = 345;
/// Old GNU sparse header: non-zero when a sparse extension block follows.
const GNU_SPARSE_IS_EXTENDED: usize = 482;
/// Old GNU sparse extension block: non-zero when another extension block follows.
const SPARSE_EXT_IS_EXTENDED: usize = 504;

/// POSIX ustar magic (`ustar\0`); such headers have a name prefix field.
const MAGIC_USTAR: &[u8; 6] = b"ustar\0";
/// GNU magic (`ustar `), followed by [`VERSION_GNU`].
const MAGIC_GNU: &[u8; 6] = b"ustar ";
/// GNU version field.
const VERSION_GNU: &[u8; 2] = b" \0";

/// Typeflag of a PAX extended header for the next entry.
const TYPE_PAX: u8 = b'x';
/// Typeflag of a PAX global extended header.
const TYPE_PAX_GLOBAL: u8 = b'g';
/// Typeflag of a GNU long name header.
const TYPE_GNU_LONG_NAME: u8 = b'L';
/// Typeflag of a GNU long link header.
const TYPE_GNU_LONG_LINK: u8 = b'K';
/// Typeflag of an old GNU sparse file.
const TYPE_GNU_SPARSE: u8 = b'S';
/// Old regular file typeflag; a directory when the name ends in `/`.
const TYPE_REG_OLD: u8 = b'\0';

/// An invalid tar construct, found at tar offset `offset` (the start of the header concerned).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TarError {
    /// The header's checksum field does not match its signed or unsigned byte sum.
    #[error("tar header at tar offset {offset}: checksum mismatch")]
    Checksum {
        /// Tar offset of the header.
        offset: u64,
    },
    /// The size field is neither valid octal nor valid base-256 (or overflows 63 bits).
    #[error(
        "tar header at tar offset {offset}: invalid size field (neither octal nor a base-256 \
         number below 2^63)"
    )]
    SizeField {
        /// Tar offset of the header.
        offset: u64,
    },
    /// An entry with a body declares a negative size.
    #[error("tar header at tar offset {offset}: negative size {size}")]
    NegativeSize {
        /// Tar offset of the header.
        offset: u64,
        /// The size the header declares.
        size: i64,
    },
    /// A PAX or GNU long name/link header's body exceeds [`MAX_EXTENSION_LEN`].
    #[error("tar extension header at tar offset {offset}: {size} bytes, limit {limit}")]
    ExtensionTooLong {
        /// Tar offset of the header.
        offset: u64,
        /// The size the header declares.
        size: u64,
        /// [`MAX_EXTENSION_LEN`].
        limit: u64,
    },
    /// A PAX header's records do not parse.
    #[error("PAX header at tar offset {offset}: {reason}")]
    PaxRecord {
        /// Tar offset of the PAX header.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// An old GNU sparse (`S`) entry whose header lacks the GNU magic (Go rejects it, and the
    /// extension block layout would be unknown).
    #[error("tar header at tar offset {offset}: GNU sparse entry without GNU magic")]
    SparseNotGnu {
        /// Tar offset of the header.
        offset: u64,
    },
    /// An entry's body, with its padding, would end past tar offset `u64::MAX`: its size (from
    /// the header's base-256 size field or a PAX `size` record) cannot be a real body there.
    #[error(
        "tar entry at tar offset {offset}: a body of {size} bytes would end past the largest \
         tar offset (2^64 - 1)"
    )]
    SizeOverflow {
        /// Tar offset of the header (for old GNU sparse entries: of the block the body follows).
        offset: u64,
        /// The body size declared.
        size: u64,
    },
    /// More tar bytes arrived than fit below tar offset `u64::MAX` (after entries whose
    /// declared sizes reached near it).
    #[error("tar offset {offset}: {len} more bytes would pass the largest tar offset (2^64 - 1)")]
    OffsetOverflow {
        /// Tar offset reached.
        offset: u64,
        /// Bytes that did not fit.
        len: u64,
    },
    /// A sparse entry's map is invalid (checked only by a tracker made with
    /// [`Tracker::with_sparse_maps`]).
    #[error("sparse entry at tar offset {offset}")]
    Sparse {
        /// Tar offset of the entry's header (for a PAX header's own records: of that header).
        offset: u64,
        /// What is wrong.
        #[source]
        source: SparseError,
    },
    /// [`Tracker::skip_file_body`] was called elsewhere than at the start of a regular-file body.
    #[error("tar offset {offset} is in {position}, not at the start of a regular-file body")]
    NotAtFileBody {
        /// Current tar offset.
        offset: u64,
        /// Where the tracker is.
        position: Position,
    },
}

/// Where in the archive a [`Tracker`] is; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Position {
    /// At or inside a header block.
    Header,
    /// At or inside an old GNU sparse extension block.
    SparseExtension,
    /// Inside the body of a regular file.
    FileBody,
    /// Inside the body of another entry type.
    EntryBody,
    /// Inside the body of a PAX or GNU long name/link header.
    ExtensionBody,
    /// Inside the zero padding after a body.
    Padding,
    /// Between an extension header (PAX `x`, GNU `L`/`K`) and the entry it belongs to.
    AfterExtension,
    /// After the first end-of-archive zero block.
    Trailer,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Position::Header => "a tar header",
            Position::SparseExtension => "a GNU sparse extension block",
            Position::FileBody => "a regular-file body",
            Position::EntryBody => "an entry body",
            Position::ExtensionBody => "an extension header body",
            Position::Padding => "body padding",
            Position::AfterExtension => "the header after an extension header",
            Position::Trailer => "the end-of-archive trailer",
        })
    }
}

/// Parse an octal numeric field the way Go's `archive/tar` does: leading and trailing spaces
/// and NULs are ignored, the value ends at the next NUL, an empty field is 0.
///
/// Returns `None` for a non-octal digit or a value above `u64::MAX`.
pub fn parse_octal(field: &[u8]) -> Option<u64> {
    let is_pad = |b: &u8| *b == b' ' || *b == 0;
    let Some(start) = field.iter().position(|b| !is_pad(b)) else {
        return Some(0);
    };
    // A first non-padding byte exists, so a last one does too.
    let end = field.iter().rposition(|b| !is_pad(b)).unwrap_or(start) + 1;
    let digits = &field[start..end];
    let digits = match digits.iter().position(|&b| b == 0) {
        Some(nul) => &digits[..nul],
        None => digits,
    };
    digits.iter().try_fold(0u64, |acc, &b| {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        acc.checked_mul(8)?.checked_add(u64::from(b - b'0'))
    })
}

/// Parse a numeric header field: base-256 (big-endian two's complement, flagged by the high bit
/// of the first byte) or octal as in [`parse_octal`].
///
/// Returns `None` for a malformed field or a value outside `i64` (Go reports those as
/// `ErrHeader`; for octal values above `i64::MAX` Go wraps to a negative number, which it then
/// rejects as a size, so refusing them here changes nothing for sizes).
pub fn parse_numeric(field: &[u8]) -> Option<i64> {
    let Some(&first) = field.first() else {
        return Some(0);
    };
    if first & 0x80 == 0 {
        return parse_octal(field).and_then(|v| i64::try_from(v).ok());
    }
    // Base-256: bit 7 of the first byte flags the encoding, bit 6 is the sign. Negative values
    // are read as their bitwise inverse (-a-1 == !a) so the accumulator stays unsigned.
    let inv = if first & 0x40 != 0 { 0xff } else { 0x00 };
    let mut x: u64 = 0;
    for (i, &b) in field.iter().enumerate() {
        let mut c = b ^ inv;
        if i == 0 {
            c &= 0x7f;
        }
        if x >> 56 != 0 {
            return None;
        }
        x = (x << 8) | u64::from(c);
    }
    if x >> 63 != 0 {
        return None;
    }
    let x = x as i64; // < 2^63, checked above
    Some(if inv == 0xff { !x } else { x })
}

/// Whether a header block's checksum is valid: the octal checksum field equals the sum of all
/// 512 bytes with the checksum field counted as spaces, summing bytes either unsigned (POSIX) or
/// signed (some historic tars); Go accepts both.
pub fn verify_checksum(block: &[u8; BLOCK_LEN]) -> bool {
    let Some(stored) = parse_octal(&block[CHKSUM]) else {
        return false;
    };
    // Sum everything, then swap the checksum field's bytes for spaces: two simple loops the
    // compiler vectorises, instead of a per-byte range test.
    let unsigned_all: u64 = block.iter().map(|&b| u64::from(b)).sum();
    let signed_all: i64 = block.iter().map(|&b| i64::from(b as i8)).sum();
    let unsigned_chk: u64 = block[CHKSUM].iter().map(|&b| u64::from(b)).sum();
    let signed_chk: i64 = block[CHKSUM].iter().map(|&b| i64::from(b as i8)).sum();
    let spaces = CHKSUM.len() as i64 * i64::from(b' ');
    let unsigned = unsigned_all - unsigned_chk + spaces as u64;
    let signed = signed_all - signed_chk + spaces;
    // Go compares the parsed field, cast to int64, with both sums.
    let stored = stored as i64;
    stored == unsigned as i64 || stored == signed
}

/// Whether a header has the GNU magic and version.
fn is_gnu(block: &[u8; BLOCK_LEN]) -> bool {
    &block[MAGIC] == MAGIC_GNU && &block[VERSION] == VERSION_GNU
}

/// The bytes of a NUL-terminated field up to its first NUL.
fn c_str(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(nul) => &field[..nul],
        None => field,
    }
}

/// Whether the name in the header block itself (ignoring extensions) ends in `/`. ustar and
/// star headers join a non-empty prefix as `prefix + "/" + name`, which ends in `/` also when
/// the name field is empty.
fn block_name_is_dir(block: &[u8; BLOCK_LEN]) -> bool {
    let name = c_str(&block[NAME]);
    let has_prefix = &block[MAGIC] == MAGIC_USTAR && block[PREFIX_START] != 0;
    match name.last() {
        Some(&last) => last == b'/',
        None => has_prefix,
    }
}

/// Padding after a body of `size` bytes.
fn padding(size: u64) -> u64 {
    (BLOCK_LEN as u64 - size % BLOCK_LEN as u64) % BLOCK_LEN as u64
}

/// Extension data pending for the next real entry.
#[derive(Debug, Clone, Default)]
struct Pending {
    /// An `x`, `L` or `K` header was read and its entry has not come yet.
    active: bool,
    /// PAX `size` record of the last `x` header.
    pax_size: Option<u64>,
    /// Whether the PAX `path` record of the last `x` header ends in `/`.
    pax_path_is_dir: Option<bool>,
    /// The `GNU.sparse.*` records of the last `x` header.
    pax_sparse: Option<SparseRecords>,
    /// Whether the last GNU long name ends in `/`.
    long_name_is_dir: Option<bool>,
}

/// Feed body bytes of a sparse entry to the reader of its PAX 1.0 map while the map is being
/// read; `last`: `piece` ends the body.
fn feed_pax1_map(sparse: &mut SparseState, piece: &[u8], last: bool) -> Result<(), TarError> {
    let Some(reader) = &mut sparse.pax1 else {
        return Ok(());
    };
    let offset = sparse.offset;
    let error = |source| TarError::Sparse { offset, source };
    reader.feed(piece).map_err(error)?;
    if reader.is_done() {
        sparse.entry.map = sparse.pax1.take().and_then(Pax1MapReader::into_map);
    } else if last {
        reader.finish().map_err(error)?;
    }
    Ok(())
}

/// Tracks the end of a NUL-terminated GNU long name: only whether it ends in `/` matters.
#[derive(Debug, Clone, Copy, Default)]
struct NameTail {
    last: Option<u8>,
    terminated: bool,
}

impl NameTail {
    fn feed(&mut self, data: &[u8]) {
        if self.terminated {
            return;
        }
        let name = c_str(data);
        if let Some(&b) = name.last() {
            self.last = Some(b);
        }
        self.terminated = name.len() < data.len();
    }
}

/// What a body is.
#[derive(Debug, Clone)]
enum BodyKind {
    /// A regular file (`0`, `\0`, `7`, `S`): may be elided as an fd reference. `sparse` for an
    /// old GNU sparse (`S`) or PAX sparse entry, whose body is the archive's map and segments.
    File { sparse: Option<SparseFormat> },
    /// Any other entry with a body (e.g. GNU dumpdir, unknown typeflags): must travel inline.
    Data,
    /// PAX records (`x` when `!global`, `g` when `global`). The parser is boxed: it is large,
    /// and most bodies are files.
    Pax {
        global: bool,
        parser: Box<PaxParser>,
    },
    /// GNU long name.
    LongName(NameTail),
    /// GNU long link target (only skipped).
    LongLink,
}

/// Tracker state between bytes.
#[derive(Debug, Clone)]
enum State {
    /// Collecting a header block (`fill` bytes so far).
    Header,
    /// Collecting an old GNU sparse extension block; the body of `body` bytes follows the last.
    SparseExt { body: u64 },
    /// Inside a body of `size` bytes with `remaining` left.
    Body {
        kind: BodyKind,
        size: u64,
        remaining: u64,
    },
    /// Inside padding, `remaining` bytes left.
    Padding { remaining: u64 },
    /// After the first zero block: anything goes.
    Trailer,
}

/// The regular-file body a [`Tracker`] is in, from [`Tracker::file_body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileBody {
    /// The body's size in bytes (> 0).
    pub size: u64,
    /// Bytes of it not consumed yet (`size` at its start).
    pub remaining: u64,
    /// The entry is sparse (old GNU `S`, or PAX `GNU.sparse.*` records that make it sparse by
    /// Go's rule): the body holds the archive's sparse map (PAX 1.0) and data segments, not the
    /// file's content.
    pub sparse: bool,
    /// The sparse format, when `sparse`.
    pub sparse_format: Option<SparseFormat>,
}

/// The sparse entry a keeping tracker is in.
#[derive(Debug, Clone)]
struct SparseState {
    /// Tar offset of the entry's header, for errors.
    offset: u64,
    entry: SparseEntry,
    /// PAX 1.0: the reader of the map at the start of the body, until it is read.
    pax1: Option<Pax1MapReader>,
}

/// Incremental tar framing tracker: feed it the archive's bytes in any pieces; it checks
/// headers, follows bodies without looking at them, and can elide a regular-file body.
///
/// ```
/// use splitfdstream::proto::tar::Tracker;
/// let mut t = Tracker::new();
/// // An empty archive: two zero blocks.
/// t.feed(&[0u8; 1024]).unwrap();
/// assert!(t.in_trailer() && t.at_clean_end());
/// ```
#[derive(Debug, Clone)]
pub struct Tracker {
    state: State,
    /// Partial header or sparse extension block.
    block: [u8; BLOCK_LEN],
    /// Bytes of `block` filled.
    fill: usize,
    /// Tar bytes consumed (fed plus elided bodies).
    offset: u64,
    /// Tar offset of the last header started.
    header_offset: u64,
    /// Real entries (every header except `x`, `L`, `K` and the end zero block).
    entries: u64,
    pending: Pending,
    /// Read, check and keep sparse maps.
    keep_sparse: bool,
    /// An old GNU map whose extension blocks are being read, with its header's offset.
    old_gnu: Option<(u64, OldGnuMap)>,
    /// The sparse entry whose body the tracker is in (keeping trackers only).
    sparse: Option<SparseState>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// A tracker at the start of an archive. It marks sparse bodies but does not read their
    /// maps.
    pub fn new() -> Self {
        Tracker {
            state: State::Header,
            block: [0; BLOCK_LEN],
            fill: 0,
            offset: 0,
            header_offset: 0,
            entries: 0,
            pending: Pending::default(),
            keep_sparse: false,
            old_gnu: None,
            sparse: None,
        }
    }

    /// A tracker at the start of an archive that also reads and checks every sparse map as Go
    /// does ([`sparse`]), and keeps the current entry's ([`Self::sparse_entry`]). A PAX 1.0 map
    /// is read from the body's first bytes when they are fed; a skipped body's map stays
    /// unknown. Memory: the current map, at most [`MAX_SPARSE_SEGMENTS`] segments.
    pub fn with_sparse_maps() -> Self {
        Tracker {
            keep_sparse: true,
            ..Self::new()
        }
    }

    /// Tar bytes consumed so far (fed bytes plus elided bodies).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Entries seen: headers Go's `Reader.Next` returns, i.e. every header except PAX `x`, GNU
    /// `L`/`K` and the end-of-archive zero block (a PAX global `g` header counts).
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Whether the first end-of-archive zero block has been seen.
    pub fn in_trailer(&self) -> bool {
        matches!(self.state, State::Trailer)
    }

    /// Whether the archive may end here: at an entry boundary (no partial header, no extension
    /// header waiting for its entry) or in the trailer.
    pub fn at_clean_end(&self) -> bool {
        match self.state {
            State::Header => self.fill == 0 && !self.pending.active,
            State::Trailer => true,
            _ => false,
        }
    }

    /// Where the tracker is.
    pub fn position(&self) -> Position {
        match &self.state {
            State::Header if self.fill == 0 && self.pending.active => Position::AfterExtension,
            State::Header => Position::Header,
            State::SparseExt { .. } => Position::SparseExtension,
            State::Body { kind, .. } => match kind {
                BodyKind::File { .. } => Position::FileBody,
                BodyKind::Data => Position::EntryBody,
                _ => Position::ExtensionBody,
            },
            State::Padding { .. } => Position::Padding,
            State::Trailer => Position::Trailer,
        }
    }

    /// `Some(size)` when positioned exactly at the start of a regular-file body of `size > 0`
    /// bytes, the only place a body may be elided.
    pub fn file_body_start(&self) -> Option<u64> {
        self.file_body()
            .filter(|b| b.remaining == b.size)
            .map(|b| b.size)
    }

    /// The regular-file body (size > 0) the tracker is at the start or inside of, if any.
    pub fn file_body(&self) -> Option<FileBody> {
        match self.state {
            State::Body {
                kind: BodyKind::File { sparse },
                size,
                remaining,
            } => Some(FileBody {
                size,
                remaining,
                sparse: sparse.is_some(),
                sparse_format: sparse,
            }),
            _ => None,
        }
    }

    /// The sparse entry of the regular-file body the tracker is in, for a tracker made with
    /// [`Self::with_sparse_maps`]. Its map is known from the headers (old GNU, PAX 0.x), or for
    /// PAX 1.0 once the map at the start of the body has been fed. The packed data is the
    /// body's last [`SparseMap::data_len`] bytes.
    pub fn sparse_entry(&self) -> Option<&SparseEntry> {
        self.file_body()?;
        self.sparse.as_ref().map(|s| &s.entry)
    }

    /// Elide the regular-file body that starts here, as if its bytes had been fed; returns its
    /// size. (A PAX 1.0 map in it stays unknown.)
    ///
    /// # Errors
    /// [`TarError::NotAtFileBody`] unless [`Self::file_body_start`] is `Some`.
    pub fn skip_file_body(&mut self) -> Result<u64, TarError> {
        let Some(body) = self.file_body().filter(|b| b.remaining == b.size) else {
            return Err(TarError::NotAtFileBody {
                offset: self.offset,
                position: self.position(),
            });
        };
        // Cannot fail: `enter_body` checked that the body and its padding fit.
        self.consume(body.size)?;
        self.end_body(
            BodyKind::File {
                sparse: body.sparse_format,
            },
            body.size,
        )?;
        Ok(body.size)
    }

    /// Count `len` more tar bytes.
    fn consume(&mut self, len: u64) -> Result<(), TarError> {
        self.offset = self
            .offset
            .checked_add(len)
            .ok_or(TarError::OffsetOverflow {
                offset: self.offset,
                len,
            })?;
        Ok(())
    }

    /// Consume all of `data`.
    ///
    /// # Errors
    /// The first invalid construct; the tracker is then in an unspecified state.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TarError> {
        while !data.is_empty() {
            let n = self.advance(data)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Consume a prefix of `data` and return its length. Stops early right after a header that
    /// starts a regular-file body of size > 0, so a producer can elide that body with
    /// [`Self::skip_file_body`] (or keep feeding it).
    ///
    /// # Errors
    /// The first invalid construct; the tracker is then in an unspecified state.
    pub fn advance(&mut self, data: &[u8]) -> Result<usize, TarError> {
        let mut pos = 0;
        while pos < data.len() {
            let avail = &data[pos..];
            match &mut self.state {
                State::Trailer => {
                    self.consume(avail.len() as u64)?;
                    pos = data.len();
                }
                State::Header | State::SparseExt { .. } => {
                    let copied: [u8; BLOCK_LEN];
                    let full: &[u8; BLOCK_LEN] = if self.fill == 0 && avail.len() >= BLOCK_LEN {
                        // Common case: the whole block is in `data`; look at it in place.
                        self.header_offset = self.offset;
                        self.consume(BLOCK_LEN as u64)?;
                        pos += BLOCK_LEN;
                        avail[..BLOCK_LEN]
                            .try_into()
                            .expect("slice of BLOCK_LEN bytes")
                    } else {
                        if self.fill == 0 {
                            self.header_offset = self.offset;
                        }
                        let n = (BLOCK_LEN - self.fill).min(avail.len());
                        self.consume(n as u64)?;
                        self.block[self.fill..self.fill + n].copy_from_slice(&avail[..n]);
                        self.fill += n;
                        pos += n;
                        if self.fill < BLOCK_LEN {
                            continue;
                        }
                        self.fill = 0;
                        copied = self.block;
                        &copied
                    };
                    let stop = match self.state {
                        State::SparseExt { body } => self.on_sparse_ext(full, body)?,
                        _ => self.on_header(full)?,
                    };
                    if stop {
                        return Ok(pos);
                    }
                }
                State::Body {
                    kind, remaining, ..
                } => {
                    // No overflow check: `enter_body` checked that the body and its padding
                    // end below u64::MAX.
                    let n = (*remaining).min(avail.len() as u64) as usize;
                    let piece = &avail[..n];
                    match kind {
                        BodyKind::Pax { parser, .. } => {
                            parser.feed(piece, *remaining).map_err(|reason| {
                                TarError::PaxRecord {
                                    offset: self.header_offset,
                                    reason,
                                }
                            })?
                        }
                        BodyKind::LongName(tail) => tail.feed(piece),
                        BodyKind::File { .. } | BodyKind::Data | BodyKind::LongLink => {}
                    }
                    if let Some(sparse) = &mut self.sparse {
                        feed_pax1_map(sparse, piece, *remaining == n as u64)?;
                    }
                    *remaining -= n as u64;
                    pos += n;
                    self.offset += n as u64;
                    if *remaining == 0 {
                        let State::Body { kind, size, .. } =
                            std::mem::replace(&mut self.state, State::Header)
                        else {
                            unreachable!("matched State::Body above")
                        };
                        self.end_body(kind, size)?;
                    }
                }
                State::Padding { remaining } => {
                    // Within the entry `enter_body` checked: no overflow.
                    let n = (*remaining).min(avail.len() as u64);
                    *remaining -= n;
                    pos += n as usize;
                    self.offset += n;
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                }
            }
        }
        Ok(pos)
    }

    /// A header block is complete. Returns whether a regular-file body of size > 0 starts now.
    fn on_header(&mut self, block: &[u8; BLOCK_LEN]) -> Result<bool, TarError> {
        let offset = self.header_offset;
        if block.iter().all(|&b| b == 0) {
            self.pending = Pending::default();
            self.state = State::Trailer;
            return Ok(false);
        }
        if !verify_checksum(block) {
            return Err(TarError::Checksum { offset });
        }
        let typeflag = block[TYPEFLAG];
        let raw_size = parse_numeric(&block[SIZE]).ok_or(TarError::SizeField { offset })?;
        match typeflag {
            TYPE_PAX | TYPE_PAX_GLOBAL | TYPE_GNU_LONG_NAME | TYPE_GNU_LONG_LINK => {
                // Extension bodies are sized by their own header; PAX records do not apply.
                let size = u64::try_from(raw_size).map_err(|_| TarError::NegativeSize {
                    offset,
                    size: raw_size,
                })?;
                if size > MAX_EXTENSION_LEN {
                    return Err(TarError::ExtensionTooLong {
                        offset,
                        size,
                        limit: MAX_EXTENSION_LEN,
                    });
                }
                let kind = match typeflag {
                    TYPE_PAX => BodyKind::Pax {
                        global: false,
                        parser: Box::new(PaxParser::new(self.keep_sparse)),
                    },
                    TYPE_PAX_GLOBAL => BodyKind::Pax {
                        global: true,
                        parser: Box::new(PaxParser::new(self.keep_sparse)),
                    },
                    TYPE_GNU_LONG_NAME => BodyKind::LongName(NameTail::default()),
                    _ => BodyKind::LongLink,
                };
                if typeflag == TYPE_PAX_GLOBAL {
                    // Go returns a global header as an entry and forgets extension headers
                    // read before it.
                    self.entries += 1;
                    self.pending = Pending::default();
                } else {
                    self.pending.active = true;
                }
                self.enter_body(kind, size)
            }
            _ => {
                self.entries += 1;
                let pending = std::mem::take(&mut self.pending);
                let size = match pending.pax_size {
                    Some(s) => s as i64, // < 2^63, checked when parsed
                    None => raw_size,
                };
                let is_dir_name = pending
                    .long_name_is_dir
                    .or(pending.pax_path_is_dir)
                    .unwrap_or_else(|| block_name_is_dir(block));
                let header_only =
                    matches!(typeflag, b'1'..=b'6') || (typeflag == TYPE_REG_OLD && is_dir_name);
                let body = if header_only {
                    0
                } else {
                    u64::try_from(size).map_err(|_| TarError::NegativeSize { offset, size })?
                };
                // Go reads an `S` entry's map from its header whatever PAX records say.
                let pax_sparse = pending.pax_sparse.filter(|_| typeflag != TYPE_GNU_SPARSE);
                let sparse = match &pax_sparse {
                    _ if typeflag == TYPE_GNU_SPARSE => Some(SparseFormat::OldGnu),
                    Some(records) => records.format(),
                    None => None,
                };
                let kind = match typeflag {
                    b'0' | TYPE_REG_OLD | b'7' | TYPE_GNU_SPARSE => BodyKind::File { sparse },
                    _ => BodyKind::Data,
                };
                let sparse_error = |source| TarError::Sparse { offset, source };
                self.sparse = None;
                if typeflag == TYPE_GNU_SPARSE {
                    if !is_gnu(block) {
                        return Err(TarError::SparseNotGnu { offset });
                    }
                    let map = if self.keep_sparse {
                        Some(OldGnuMap::start(block, true).map_err(sparse_error)?)
                    } else {
                        None
                    };
                    if block[GNU_SPARSE_IS_EXTENDED] != 0 {
                        self.old_gnu = map.map(|m| (offset, m));
                        self.state = State::SparseExt { body };
                        return Ok(false);
                    }
                    if let Some(map) = map {
                        self.start_sparse(offset, map.finish(body).map_err(sparse_error)?);
                    }
                } else if let Some(records) = pax_sparse.filter(|_| self.keep_sparse) {
                    if sparse.is_some() && header_only {
                        return Err(sparse_error(SparseError::HeaderOnly { typeflag }));
                    }
                    if let Some(resolved) = records.resolve(body).map_err(sparse_error)? {
                        if resolved.pax1.is_some() && body == 0 {
                            // Go's map reader finds no block to read.
                            return Err(sparse_error(SparseError::TruncatedMap { body_size: 0 }));
                        }
                        self.sparse = Some(SparseState {
                            offset,
                            entry: resolved.entry,
                            pax1: resolved.pax1,
                        });
                    }
                }
                self.enter_body(kind, body)
            }
        }
    }

    /// A sparse entry whose map is complete starts (keeping trackers only).
    fn start_sparse(&mut self, offset: u64, entry: SparseEntry) {
        self.sparse = Some(SparseState {
            offset,
            entry,
            pax1: None,
        });
    }

    /// An old GNU sparse extension block is complete.
    fn on_sparse_ext(&mut self, block: &[u8; BLOCK_LEN], body: u64) -> Result<bool, TarError> {
        let more = block[SPARSE_EXT_IS_EXTENDED] != 0;
        if let Some((offset, map)) = &mut self.old_gnu {
            let offset = *offset;
            map.extension(block)
                .map_err(|source| TarError::Sparse { offset, source })?;
        }
        if more {
            return Ok(false); // another extension block follows; stay
        }
        if let Some((offset, map)) = self.old_gnu.take() {
            let entry = map
                .finish(body)
                .map_err(|source| TarError::Sparse { offset, source })?;
            self.start_sparse(offset, entry);
        }
        self.enter_body(
            BodyKind::File {
                sparse: Some(SparseFormat::OldGnu),
            },
            body,
        )
    }

    /// Start a body; returns whether it is a regular-file body of size > 0.
    ///
    /// The body and its padding must end below tar offset `u64::MAX`, so that nothing inside
    /// the entry needs an overflow check (a base-256 size field or a PAX `size` record can
    /// declare up to 2^63 - 1 bytes, and two such bodies pass 2^64).
    fn enter_body(&mut self, kind: BodyKind, size: u64) -> Result<bool, TarError> {
        let fits = self
            .offset
            .checked_add(size)
            .and_then(|end| end.checked_add(padding(size)))
            .is_some();
        if !fits {
            return Err(TarError::SizeOverflow {
                offset: self.header_offset,
                size,
            });
        }
        if size == 0 {
            self.state = State::Header;
            self.end_body(kind, 0)?;
            return Ok(false);
        }
        let is_file = matches!(kind, BodyKind::File { .. });
        self.state = State::Body {
            kind,
            size,
            remaining: size,
        };
        Ok(is_file)
    }

    /// A body of `size` bytes ended: apply extension data, then expect padding or a header.
    fn end_body(&mut self, kind: BodyKind, size: u64) -> Result<(), TarError> {
        match kind {
            BodyKind::Pax { global, parser } => {
                parser.finish().map_err(|reason| TarError::PaxRecord {
                    offset: self.header_offset,
                    reason,
                })?;
                if self.keep_sparse
                    && let Some(source) = parser.sparse.pair_order_error()
                {
                    return Err(TarError::Sparse {
                        offset: self.header_offset,
                        source,
                    });
                }
                if !global {
                    // A later `x` header replaces all records of an earlier one.
                    self.pending.pax_size = parser.size;
                    self.pending.pax_path_is_dir = parser.path_is_dir;
                    self.pending.pax_sparse = Some(parser.sparse);
                }
            }
            BodyKind::LongName(tail) => {
                // An empty long name is ignored by Go, and clears an earlier one.
                self.pending.long_name_is_dir = tail.last.map(|b| b == b'/');
            }
            BodyKind::File { .. } | BodyKind::Data => self.sparse = None,
            BodyKind::LongLink => {}
        }
        let pad = padding(size);
        self.state = if pad == 0 {
            State::Header
        } else {
            State::Padding { remaining: pad }
        };
        Ok(())
    }
}

#[cfg(test)]
mod sparse_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a header block with the given fields and a valid unsigned checksum.
    fn header(name: &[u8], typeflag: u8, size: u64, magic: &[u8; 8]) -> [u8; BLOCK_LEN] {
        let mut b = [0u8; BLOCK_LEN];
        b[..name.len()].copy_from_slice(name);
        b[100..108].copy_from_slice(b"0000644\0");
        b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        b[TYPEFLAG] = typeflag;
        b[257..265].copy_from_slice(magic);
        set_checksum(&mut b);
        b
    }

    fn set_checksum(b: &mut [u8; BLOCK_LEN]) {
        b[CHKSUM].fill(b' ');
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[CHKSUM].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    const USTAR: &[u8; 8] = b"ustar\x0000";
    const GNU: &[u8; 8] = b"ustar  \0";

    fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 2;
            // The length counts its own digits.
            let mut n = body + 1;
            while n.to_string().len() + 1 + body != n {
                n = n.to_string().len() + 1 + body;
            }
            out.extend_from_slice(format!("{n} {k}=").as_bytes());
            out.extend_from_slice(v);
            out.push(b'\n');
        }
        out
    }

    fn body(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.resize(data.len() + padding(data.len() as u64) as usize, 0);
        v
    }

    #[test]
    fn octal_and_base256() {
        assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
        assert_eq!(parse_octal(b"  644 \0\0"), Some(0o644));
        assert_eq!(parse_octal(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_octal(b"12\0 34"), Some(0o12));
        assert_eq!(parse_octal(b"0009"), None);
        assert_eq!(parse_octal(b"-1"), None);
        assert_eq!(parse_octal(b"7777777777777777777777"), None);
        assert_eq!(parse_numeric(b"00000000005\0"), Some(5));
        // 8 GiB does not fit 11 octal digits: GNU tar writes base-256.
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[4..].copy_from_slice(&(8u64 << 30).to_be_bytes());
        assert_eq!(parse_numeric(&f), Some(8 << 30));
        // Negative base-256 (used for pre-1970 mtimes): -1 is all ones.
        assert_eq!(parse_numeric(&[0xff; 12]), Some(-1));
        let mut f = [0xffu8; 12];
        f[11] = 0xfe;
        assert_eq!(parse_numeric(&f), Some(-2));
        // 2^63 does not fit.
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[4] = 0x80;
        assert_eq!(parse_numeric(&f), None);
        // Too many significant bytes.
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[3] = 1;
        assert_eq!(parse_numeric(&f), None);
        assert_eq!(parse_numeric(b"777777777777"), Some(0o777777777777));
    }

    #[test]
    fn checksum_signed_and_unsigned() {
        let mut b = header(b"caf\xe9", b'0', 0, USTAR);
        assert!(verify_checksum(&b));
        b[0] = b'd';
        assert!(!verify_checksum(&b));
        // A historic signed sum: bytes >= 0x80 counted negative.
        let mut b = header(b"caf\xe9\xe9", b'0', 0, USTAR);
        b[CHKSUM].fill(b' ');
        let signed: i64 = b.iter().map(|&x| i64::from(x as i8)).sum();
        b[CHKSUM].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
        assert!(verify_checksum(&b));
        // An all-spaces checksum field parses as 0 and matches nothing.
        b[CHKSUM].fill(b' ');
        assert!(!verify_checksum(&b));
    }

    #[test]
    fn regular_file_and_end() {
        let mut tar = header(b"a", b'0', 5, USTAR).to_vec();
        tar.extend(body(b"hello"));
        tar.extend([0u8; 1024]);
        let mut t = Tracker::new();
        let n = t.advance(&tar).unwrap();
        assert_eq!(n, 512);
        assert_eq!(t.file_body_start(), Some(5));
        assert_eq!(t.position(), Position::FileBody);
        assert_eq!(t.skip_file_body().unwrap(), 5);
        assert_eq!(t.file_body_start(), None);
        t.feed(&tar[517..]).unwrap();
        assert!(t.in_trailer() && t.at_clean_end());
        assert_eq!((t.entries(), t.offset()), (1, tar.len() as u64));
        // Byte by byte gives the same result.
        let mut t = Tracker::new();
        for b in &tar {
            t.feed(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!((t.entries(), t.offset(), t.in_trailer()), (1, 2048, true));
    }

    #[test]
    fn header_only_types_ignore_size() {
        for flag in b'1'..=b'6' {
            let mut t = Tracker::new();
            t.feed(&header(b"x", flag, 100, USTAR)).unwrap();
            assert!(t.at_clean_end(), "typeflag {}", flag as char);
        }
        // Old regular file typeflag with a trailing slash is a directory.
        let mut t = Tracker::new();
        t.feed(&header(b"dir/", 0, 100, USTAR)).unwrap();
        assert!(t.at_clean_end());
        // ... also when only the ustar prefix is set.
        let mut b = header(b"", 0, 100, USTAR);
        b[PREFIX_START] = b'p';
        set_checksum(&mut b);
        let mut t = Tracker::new();
        t.feed(&b).unwrap();
        assert!(t.at_clean_end());
        // But '0' with a trailing slash has a body.
        let mut t = Tracker::new();
        t.feed(&header(b"dir/", b'0', 100, USTAR)).unwrap();
        assert_eq!(t.file_body_start(), Some(100));
        // Other types with a body are not files.
        let mut t = Tracker::new();
        t.feed(&header(b"d", b'D', 3, GNU)).unwrap();
        assert_eq!(
            (t.file_body_start(), t.position()),
            (None, Position::EntryBody)
        );
        assert!(matches!(
            t.skip_file_body(),
            Err(TarError::NotAtFileBody { offset: 512, .. })
        ));
    }

    #[test]
    fn pax_size_and_path() {
        let recs = pax(&[("size", b"700"), ("path", b"some/dir/")]);
        let mut tar = header(b"PaxHeaders/x", b'x', recs.len() as u64, USTAR).to_vec();
        tar.extend(body(&recs));
        tar.extend(header(b"x", b'0', 3, USTAR));
        let mut t = Tracker::new();
        t.feed(&tar).unwrap();
        assert_eq!(t.file_body_start(), Some(700));
        assert_eq!(t.entries(), 1);
        // The path makes a '\0' entry a directory.
        let mut tar2 = tar[..tar.len() - 512].to_vec();
        tar2.extend(header(b"x", 0, 3, USTAR));
        let mut t = Tracker::new();
        t.feed(&tar2).unwrap();
        assert!(t.at_clean_end());
        // A GNU long name wins over the PAX path.
        let mut tar3 = tar[..tar.len() - 512].to_vec();
        tar3.extend(header(b"././@LongLink", b'L', 4, GNU));
        tar3.extend(body(b"file"));
        tar3.extend(header(b"x", 0, 3, GNU));
        let mut t = Tracker::new();
        t.feed(&tar3).unwrap();
        assert_eq!(t.file_body_start(), Some(700));
        // An empty size record keeps the header's size.
        let recs = pax(&[("size", b"700"), ("size", b"")]);
        let mut tar = header(b"p", b'x', recs.len() as u64, USTAR).to_vec();
        tar.extend(body(&recs));
        tar.extend(header(b"x", b'0', 3, USTAR));
        let mut t = Tracker::new();
        t.feed(&tar).unwrap();
        assert_eq!(t.file_body_start(), Some(3));
    }

    #[test]
    fn pax_global_counts_and_does_not_resize() {
        let recs = pax(&[("size", b"700"), ("comment", b"x=y\nz")]);
        let mut tar = header(b"pax_global_header", b'g', recs.len() as u64, USTAR).to_vec();
        tar.extend(body(&recs));
        tar.extend(header(b"x", b'0', 3, USTAR));
        let mut t = Tracker::new();
        t.feed(&tar).unwrap();
        assert_eq!((t.file_body_start(), t.entries()), (Some(3), 2));
    }

    #[test]
    fn pax_record_errors() {
        for (recs, reason) in [
            (&b"3 a=\n"[..], "record length out of range"),
            (b"5 =a\n", "empty record key"),
            (b"6 ab=x", "record does not end in a newline"),
            (b"6 abc\n", "record without '='"),
            (b"x ab=\n", "record length is not a decimal number"),
            (b"7 a=b\n", "record length out of range"),
            (b"6 a=b\n1", "body ends inside a record"),
            (
                b"9 size=x\n",
                "size record is not a decimal number below 2^63",
            ),
            (b"8 a\0b=c\n", "NUL in a key"),
            (
                b"11 path=a\0\n",
                "NUL in a path, linkpath, uname or gname value",
            ),
            (b"99 a=b\n", "record length out of range"),
        ] {
            let mut tar = header(b"p", b'x', recs.len() as u64, USTAR).to_vec();
            tar.extend(body(recs));
            let err = Tracker::new().feed(&tar).unwrap_err();
            assert_eq!(err, TarError::PaxRecord { offset: 0, reason }, "{recs:?}");
        }
        // NUL is fine in values of other keys (xattrs).
        let recs = pax(&[("SCHILY.xattr.user.x", b"a\0b")]);
        let mut tar = header(b"p", b'x', recs.len() as u64, USTAR).to_vec();
        tar.extend(body(&recs));
        Tracker::new().feed(&tar).unwrap();
    }

    #[test]
    fn extension_limits_and_bad_headers() {
        let b = header(b"p", b'x', MAX_EXTENSION_LEN + 1, USTAR);
        assert_eq!(
            Tracker::new().feed(&b).unwrap_err(),
            TarError::ExtensionTooLong {
                offset: 0,
                size: MAX_EXTENSION_LEN + 1,
                limit: MAX_EXTENSION_LEN
            }
        );
        let mut b = header(b"p", b'0', 0, USTAR);
        b[SIZE].copy_from_slice(b"0000000009\0\0");
        set_checksum(&mut b);
        assert_eq!(
            Tracker::new().feed(&b).unwrap_err(),
            TarError::SizeField { offset: 0 }
        );
        let mut b = header(b"p", b'0', 0, USTAR);
        b[SIZE].fill(0xff);
        set_checksum(&mut b);
        assert_eq!(
            Tracker::new().feed(&b).unwrap_err(),
            TarError::NegativeSize {
                offset: 0,
                size: -1
            }
        );
        // A negative size is fine for a symlink (Go ignores it).
        b[TYPEFLAG] = b'2';
        set_checksum(&mut b);
        Tracker::new().feed(&b).unwrap();
        // After a zero block, even a valid header is trailer.
        let mut t = Tracker::new();
        t.feed(&[0u8; 512]).unwrap();
        t.feed(&header(b"p", b'0', 0, USTAR)).unwrap();
        assert!(t.in_trailer());
        assert_eq!(t.entries(), 0);
        let mut b = header(b"p", b'0', 0, USTAR);
        b[200] = 1;
        let mut t = Tracker::new();
        t.feed(&header(b"q", b'0', 0, USTAR)).unwrap();
        assert_eq!(t.feed(&b).unwrap_err(), TarError::Checksum { offset: 512 });
    }

    #[test]
    fn gnu_sparse_extension_blocks() {
        let mut h = header(b"sparse", b'S', 1000, GNU);
        h[GNU_SPARSE_IS_EXTENDED] = 1;
        set_checksum(&mut h);
        let mut ext1 = [0u8; BLOCK_LEN];
        ext1[SPARSE_EXT_IS_EXTENDED] = 1;
        let ext2 = [0u8; BLOCK_LEN];
        let mut tar = h.to_vec();
        tar.extend(ext1);
        tar.extend(ext2);
        let mut t = Tracker::new();
        assert_eq!(t.advance(&tar).unwrap(), 1536);
        assert_eq!(t.file_body_start(), Some(1000));
        // Not GNU: rejected.
        let mut h = header(b"sparse", b'S', 1000, USTAR);
        set_checksum(&mut h);
        assert_eq!(
            Tracker::new().feed(&h).unwrap_err(),
            TarError::SparseNotGnu { offset: 0 }
        );
    }

    #[test]
    fn sparse_bodies_are_marked() {
        let body_of = |tar: &[u8]| {
            let mut t = Tracker::new();
            t.feed(tar).unwrap();
            t.file_body()
        };
        let mut h = header(b"s", b'S', 1000, GNU);
        h[GNU_SPARSE_IS_EXTENDED] = 1;
        set_checksum(&mut h);
        let mut tar = h.to_vec();
        tar.extend([0u8; BLOCK_LEN]);
        let want = FileBody {
            size: 1000,
            remaining: 1000,
            sparse: true,
            sparse_format: Some(SparseFormat::OldGnu),
        };
        assert_eq!(body_of(&tar), Some(want));
        // PAX sparse: records that make it sparse by Go's rule; a later `x` header replaces
        // them.
        let recs = pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")]);
        let mut tar = header(b"p", b'x', recs.len() as u64, USTAR).to_vec();
        tar.extend(body(&recs));
        let mut with_file = tar.clone();
        with_file.extend(header(b"GNUSparseFile.0/f", b'0', 1000, USTAR));
        let pax1 = FileBody {
            sparse_format: Some(SparseFormat::PaxV10),
            ..want
        };
        assert_eq!(body_of(&with_file), Some(pax1));
        for (recs, format) in [
            (
                pax(&[("GNU.sparse.map", b"0,1")]),
                Some(SparseFormat::PaxV01),
            ),
            (
                pax(&[("GNU.sparse.offset", b"0"), ("GNU.sparse.numbytes", b"1")]),
                Some(SparseFormat::PaxV00),
            ),
            // No map and no version, or an unknown version: Go reads a plain file.
            (pax(&[("GNU.sparse.name", b"f")]), None),
            (
                pax(&[("GNU.sparse.major", b"2"), ("GNU.sparse.map", b"0,1")]),
                None,
            ),
        ] {
            let mut tar = header(b"p", b'x', recs.len() as u64, USTAR).to_vec();
            tar.extend(body(&recs));
            tar.extend(header(b"f", b'0', 1000, USTAR));
            let got = body_of(&tar).unwrap();
            assert_eq!((got.sparse, got.sparse_format), (format.is_some(), format));
        }
        let recs = pax(&[("GNU.sparsely", b"1")]);
        tar.extend(header(b"p", b'x', recs.len() as u64, USTAR));
        tar.extend(body(&recs));
        tar.extend(header(b"f", b'0', 1000, USTAR));
        let plain = FileBody {
            sparse: false,
            sparse_format: None,
            ..want
        };
        assert_eq!(body_of(&tar), Some(plain));
        let mut t = Tracker::new();
        t.feed(&tar).unwrap();
        t.feed(&[1; 10]).unwrap();
        assert_eq!(
            t.file_body(),
            Some(FileBody {
                remaining: 990,
                ..plain
            })
        );
        assert_eq!(t.file_body_start(), None);
    }

    #[test]
    fn sizes_past_2_pow_64_are_errors() {
        // A PAX size record of 2^63 - 1 after 2^63 bytes of archive.
        let recs = pax(&[("size", i64::MAX.to_string().as_bytes())]);
        let mut tar = header(b"p", b'x', recs.len() as u64, USTAR).to_vec();
        tar.extend(body(&recs));
        tar.extend(header(b"f", b'0', 0, USTAR));
        let mut t = Tracker::new();
        t.feed(&tar).unwrap();
        assert_eq!(t.skip_file_body().unwrap(), i64::MAX as u64);
        t.feed(&[0]).unwrap();
        let at = t.offset();
        assert_eq!(at, 1 << 63 | 1536);
        assert_eq!(
            t.feed(&tar).unwrap_err(),
            TarError::SizeOverflow {
                offset: at + 1024,
                size: i64::MAX as u64
            }
        );
    }

    #[test]
    fn clean_end_rules() {
        let mut t = Tracker::new();
        assert!(t.at_clean_end());
        t.feed(&header(b"././@LongLink", b'L', 4, GNU)[..100])
            .unwrap();
        assert_eq!((t.at_clean_end(), t.position()), (false, Position::Header));
        let mut t = Tracker::new();
        t.feed(&header(b"././@LongLink", b'L', 4, GNU)).unwrap();
        t.feed(&body(b"name")).unwrap();
        assert_eq!(
            (t.at_clean_end(), t.position()),
            (false, Position::AfterExtension)
        );
        t.feed(&header(b"x", b'5', 0, GNU)).unwrap();
        assert!(t.at_clean_end());
        t.feed(&header(b"x", b'0', 1, GNU)).unwrap();
        t.skip_file_body().unwrap();
        assert_eq!((t.at_clean_end(), t.position()), (false, Position::Padding));
        t.feed(&[0; 511]).unwrap();
        assert!(t.at_clean_end());
        // Lenient trailer: one zero block, then anything.
        t.feed(&[0; 512]).unwrap();
        t.feed(b"garbage").unwrap();
        assert!(t.at_clean_end() && t.in_trailer());
        assert_eq!(t.entries(), 2);
    }
}
