//! Sparse entries: their maps, in the four GNU formats Go's `archive/tar` reads.
//!
//! The body a sparse entry has in the archive is not the file. It holds only the file's *data
//! segments*, packed one after the other, preceded (PAX 1.0 only) by the map itself. The map
//! says where each segment lies in the expanded file of `real_size` bytes; the rest of the file
//! is holes, which read as zeros.
//!
//! | format | marked by | map | real size |
//! |---|---|---|---|
//! | old GNU | typeflag `S`, GNU magic | header bytes 386..482: 4 entries of two 12-byte numeric fields (offset, length); while byte 482 (header) or 504 (extension block) is non-zero, a 512-byte extension block of 21 entries follows the header; an entry whose offset field starts with NUL ends its block's list | header bytes 483..495 |
//! | PAX 0.0 | `GNU.sparse.offset` / `GNU.sparse.numbytes` record pairs | those records, in order, and `GNU.sparse.numblocks` | `GNU.sparse.size` |
//! | PAX 0.1 | `GNU.sparse.map` | `"offset,length,offset,length,…"` and `GNU.sparse.numblocks` | `GNU.sparse.size` |
//! | PAX 1.0 | `GNU.sparse.major=1`, `GNU.sparse.minor=0` | decimal lines at the start of the body: the segment count, then offset and length of each segment, the block holding the last newline zero-padded to 512 bytes | `GNU.sparse.realsize` |
//!
//! Go's rules, which this module follows (`readGNUSparsePAXHeaders`, `readOldGNUSparseMap`,
//! `readGNUSparseMap0x1`, `readGNUSparseMap1x0`, `validateSparseEntries`):
//!
//! - A PAX entry is sparse when `GNU.sparse.major`/`minor` are `0`/`0`, `0`/`1` (0.x) or `1`/`0`
//!   (1.0), or, with neither record present, when it has a non-empty map (0.0 pairs or a
//!   `GNU.sparse.map` record). Any other version makes it a plain file. Empty values count as
//!   absent; a later record replaces an earlier one of the same key, except 0.0 pairs, which
//!   accumulate and win over a `GNU.sparse.map` record. `GNU.sparse.offset` and
//!   `GNU.sparse.numbytes` must alternate, starting with an offset, and contain no comma, or the
//!   whole PAX header is invalid.
//! - The real size is `GNU.sparse.size`, else `GNU.sparse.realsize`, else the entry's size.
//! - Numbers are decimal with an optional sign (`strconv.ParseInt`), or numeric header fields
//!   (octal or base-256) for old GNU. A 0.x map has exactly `2 × numblocks` numbers.
//! - Segments have non-negative offsets and lengths, do not overflow `i64`, are sorted and do not
//!   overlap (zero-length segments included), and end at or before the real size.
//! - The segments' lengths add up to the body's data: the whole body, or for 1.0 the body after
//!   the map (Go fails reading the entry otherwise, with "sparse file references non-existent
//!   data" or "contains unreferenced data").
//! - A header-only entry (typeflags `1`–`6`, or a `\0` directory) with a sparse map is invalid.
//!
//! So the packed data is always the last [`SparseMap::data_len`] bytes of the body.

use super::{BLOCK_LEN, PaxParser, is_gnu, parse_numeric};

/// Most segments a sparse map may have. Go's limits on the map text allow no more in a PAX map
/// (1 MiB of PAX records or of 1.0 map text, at least four bytes per segment: `"0\n0\n"`); an
/// old GNU map (unbounded in Go) is refused beyond it. It bounds what a tracker that keeps maps
/// stores per entry: 16 bytes a segment, 4 MiB.
pub const MAX_SPARSE_SEGMENTS: usize = 1 << 18;

/// Longest PAX 1.0 map (text and padding) at the start of a body. Go (since 1.25.2 / 1.24.8) and
/// tar-split (since 0.12.2) refuse longer ones (CVE-2025-58183), as they refuse PAX headers over
/// 1 MiB.
pub const MAX_PAX1_MAP_LEN: u64 = 1 << 20;

/// Old GNU header: first sparse entry.
const OLD_GNU_SPARSE: usize = 386;
/// Old GNU header: sparse entries in the header itself.
const OLD_GNU_HEADER_ENTRIES: usize = 4;
/// Old GNU extension block: sparse entries per block.
const OLD_GNU_EXT_ENTRIES: usize = 21;
/// One old GNU sparse entry: a 12-byte offset and a 12-byte length.
const OLD_GNU_ENTRY_LEN: usize = 24;
/// Old GNU header: non-zero when an extension block follows.
const OLD_GNU_IS_EXTENDED: usize = 482;
/// Old GNU header: the real size field.
const OLD_GNU_REAL_SIZE: std::ops::Range<usize> = 483..495;
/// Old GNU extension block: non-zero when another one follows.
const OLD_GNU_EXT_IS_EXTENDED: usize = 504;

/// Which sparse format an entry uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SparseFormat {
    /// Old GNU: typeflag `S`, the map in the header and its extension blocks.
    OldGnu,
    /// PAX 0.0: `GNU.sparse.offset` / `GNU.sparse.numbytes` record pairs.
    PaxV00,
    /// PAX 0.1: a `GNU.sparse.map` record.
    PaxV01,
    /// PAX 1.0: the map as decimal lines at the start of the body.
    PaxV10,
}

/// One data segment of a sparse file: `length` bytes at `offset` of the expanded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SparseSegment {
    /// Offset in the expanded file.
    pub offset: u64,
    /// Length in bytes (may be 0: GNU tar ends many maps with `(real_size, 0)`).
    pub length: u64,
}

impl SparseSegment {
    /// Where the segment ends in the expanded file.
    pub fn end(&self) -> u64 {
        // Cannot overflow in a validated map: every end is at most its real size.
        self.offset.saturating_add(self.length)
    }
}

/// A validated sparse map: sorted, non-overlapping segments within `real_size`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SparseMap {
    real_size: u64,
    segments: Vec<SparseSegment>,
    data_len: u64,
}

/// A sparse entry: its format, the size of the expanded file, and the map once known.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SparseEntry {
    /// The format.
    pub format: SparseFormat,
    /// Size of the expanded file.
    pub real_size: u64,
    /// The map: known from the headers for old GNU and PAX 0.x; for PAX 1.0 only once the start
    /// of the body has been read ([`Pax1MapReader`], or a tracker fed the body).
    pub map: Option<SparseMap>,
}

/// Why a sparse map is invalid (each is an `ErrHeader` or a read error in Go).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SparseError {
    /// The map has more than [`MAX_SPARSE_SEGMENTS`] segments.
    #[error("the map has more than {limit} segments")]
    TooManySegments {
        /// [`MAX_SPARSE_SEGMENTS`].
        limit: usize,
    },
    /// A number does not parse (decimal for PAX, a numeric field for old GNU), or is negative
    /// where a count or size must not be.
    #[error("{field} is not a valid number")]
    Number {
        /// Which number.
        field: &'static str,
    },
    /// The real size is negative.
    #[error("negative real size {size}")]
    NegativeRealSize {
        /// The real size declared.
        size: i64,
    },
    /// A segment has a negative offset or length.
    #[error("segment {index} has a negative offset or length")]
    Negative {
        /// Index of the segment in the map, from 0.
        index: u64,
    },
    /// A segment's end does not fit in `i64`.
    #[error("segment {index} ends past 2^63 - 1")]
    Overflow {
        /// Index of the segment in the map, from 0.
        index: u64,
    },
    /// A segment starts before the previous one ends.
    #[error("segment {index} starts before the previous segment ends")]
    Unordered {
        /// Index of the segment in the map, from 0.
        index: u64,
    },
    /// A segment ends past the real size.
    #[error("a segment ends at {end}, past the real size {real_size}")]
    PastRealSize {
        /// The largest segment end.
        end: u64,
        /// The real size.
        real_size: u64,
    },
    /// A 0.x map does not have `2 × GNU.sparse.numblocks` numbers.
    #[error("GNU.sparse.numblocks is {declared}, but the map has {values} numbers")]
    CountMismatch {
        /// `GNU.sparse.numblocks`.
        declared: u64,
        /// Numbers in the map.
        values: u64,
    },
    /// The segments' lengths do not add up to the body's data.
    #[error("the segments hold {map} bytes, the body {body}")]
    DataLen {
        /// Sum of the segments' lengths.
        map: u64,
        /// Data bytes in the body (after the map, for PAX 1.0).
        body: u64,
    },
    /// A PAX 1.0 map takes more than [`MAX_PAX1_MAP_LEN`] bytes.
    #[error("the PAX 1.0 map is longer than {limit} bytes")]
    MapTooLong {
        /// [`MAX_PAX1_MAP_LEN`].
        limit: u64,
    },
    /// The body ends before the PAX 1.0 map and its padding do.
    #[error("the body ({body_size} bytes) ends inside the PAX 1.0 map")]
    TruncatedMap {
        /// The body's size.
        body_size: u64,
    },
    /// `GNU.sparse.offset` and `GNU.sparse.numbytes` records do not alternate starting with an
    /// offset, or one has a comma in its value (Go rejects the whole PAX header).
    #[error("GNU.sparse.offset/numbytes records out of order or with a comma")]
    PairOrder,
    /// A header-only entry (typeflags `1`–`6`, or a `\0` directory) carries a sparse map.
    #[error("a header-only entry (typeflag {typeflag:#04x}) carries a sparse map")]
    HeaderOnly {
        /// Its typeflag.
        typeflag: u8,
    },
    /// The PAX records given to [`SparseEntry::from_pax_records`] do not parse.
    #[error("invalid PAX records: {reason}")]
    Records {
        /// What is wrong.
        reason: &'static str,
    },
    /// The header given to [`SparseEntry::from_old_gnu`] is not an old GNU sparse header.
    #[error("not an old GNU sparse header (typeflag S with the GNU magic)")]
    NotOldGnu,
    /// The extension blocks given to [`SparseEntry::from_old_gnu`] are not the chain the
    /// header announces.
    #[error("{given} extension blocks given, the header and blocks chain {chained}")]
    ExtensionChain {
        /// Blocks given.
        given: usize,
        /// Blocks the chain has (as far as the given blocks tell).
        chained: usize,
    },
}

impl SparseMap {
    /// A map of `segments` in a file of `real_size` bytes.
    ///
    /// # Errors
    /// The segments break Go's rules (see the module docs), or there are more than
    /// [`MAX_SPARSE_SEGMENTS`].
    pub fn new(
        real_size: u64,
        segments: impl IntoIterator<Item = SparseSegment>,
    ) -> Result<Self, SparseError> {
        let mut b = SegmentBuilder::new(true);
        for s in segments {
            let (Ok(offset), Ok(length)) = (i64::try_from(s.offset), i64::try_from(s.length))
            else {
                return Err(SparseError::Overflow { index: b.count });
            };
            b.push(offset, length)?;
        }
        let data_len = b.data_len;
        b.finish(real_size, data_len)
    }

    /// Size of the expanded file.
    pub fn real_size(&self) -> u64 {
        self.real_size
    }

    /// The data segments, in file order.
    pub fn segments(&self) -> &[SparseSegment] {
        &self.segments
    }

    /// Bytes of data the archive holds: the sum of the segments' lengths, at most the real size.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// The map as PAX 1.0 puts it at the start of the body, the way GNU tar writes it: the
    /// segment count, then each segment's offset and length, in decimal, each followed by `\n`;
    /// zero-padded to a multiple of 512 bytes. (Readers refuse more than [`MAX_PAX1_MAP_LEN`]
    /// bytes; this does not check.)
    pub fn encode_pax1(&self) -> Vec<u8> {
        let mut out = format!("{}\n", self.segments.len()).into_bytes();
        for s in &self.segments {
            out.extend_from_slice(format!("{}\n{}\n", s.offset, s.length).as_bytes());
        }
        let padded = out.len().div_ceil(BLOCK_LEN) * BLOCK_LEN;
        out.resize(padded, 0);
        out
    }
}

impl SparseEntry {
    /// The sparse entry the records of a PAX `x` header (its body, `records`) make of the entry
    /// that follows, whose body has `body_size` bytes (its PAX `size` record, else its size
    /// field); `None` if that entry is not sparse. For PAX 1.0 the map is in the body: read it
    /// with [`Pax1MapReader`] or [`SparseMap::from_pax1_prefix`].
    ///
    /// The caller checks that the entry is not a header-only type (Go refuses sparse maps on
    /// those).
    ///
    /// # Errors
    /// The records do not parse, or the map breaks Go's rules.
    pub fn from_pax_records(records: &[u8], body_size: u64) -> Result<Option<Self>, SparseError> {
        let mut parser = PaxParser::new(true);
        let room = records.len() as u64;
        parser
            .feed(records, room)
            .and_then(|()| parser.finish())
            .map_err(|reason| SparseError::Records { reason })?;
        if let Some(e) = parser.sparse.pair_order_error() {
            return Err(e);
        }
        let Some(resolved) = parser.sparse.resolve(body_size)? else {
            return Ok(None);
        };
        Ok(Some(resolved.entry))
    }

    /// The sparse entry of an old GNU header (typeflag `S`) and the extension blocks that
    /// follow it (exactly the chain the header announces, possibly none), with a body of
    /// `body_size` bytes (its size field, or a PAX `size` record before it).
    ///
    /// # Errors
    /// Not an old GNU sparse header, a wrong number of extension blocks, or a map that breaks
    /// Go's rules.
    pub fn from_old_gnu(
        header: &[u8; BLOCK_LEN],
        extensions: &[[u8; BLOCK_LEN]],
        body_size: u64,
    ) -> Result<Self, SparseError> {
        if header[super::TYPEFLAG] != b'S' || !is_gnu(header) {
            return Err(SparseError::NotOldGnu);
        }
        let mut map = OldGnuMap::start(header, true)?;
        let mut more = header[OLD_GNU_IS_EXTENDED] != 0;
        let mut used = 0;
        while more {
            let Some(block) = extensions.get(used) else {
                return Err(SparseError::ExtensionChain {
                    given: extensions.len(),
                    chained: used + 1,
                });
            };
            more = map.extension(block)?;
            used += 1;
        }
        if used != extensions.len() {
            return Err(SparseError::ExtensionChain {
                given: extensions.len(),
                chained: used,
            });
        }
        map.finish(body_size)
    }
}

impl SparseMap {
    /// Parse the PAX 1.0 map at the start of a body of `body_size` bytes, given its first bytes
    /// (`body`, which may be the whole body), for a file of `real_size` bytes (the entry's
    /// `GNU.sparse.realsize`). Returns the map and the bytes it takes (a multiple of 512); the
    /// data follows.
    ///
    /// # Errors
    /// The map breaks Go's rules, or `body` ends before the map and its padding do.
    pub fn from_pax1_prefix(
        body: &[u8],
        real_size: u64,
        body_size: u64,
    ) -> Result<(SparseMap, u64), SparseError> {
        let mut reader = Pax1MapReader::new(real_size, body_size);
        reader.feed(body)?;
        let map_len = reader
            .map_len()
            .ok_or(SparseError::TruncatedMap { body_size })?;
        let map = reader
            .into_map()
            .ok_or(SparseError::TruncatedMap { body_size })?;
        Ok((map, map_len))
    }
}

/// A number as Go's `strconv.ParseInt(s, 10, 64)` reads it, fed a byte at a time: an optional
/// sign, then at least one decimal digit, within `i64`. Constant size whatever the input.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Decimal {
    len: u64,
    negative: bool,
    digits: u64,
    magnitude: u64,
    bad: bool,
}

impl Decimal {
    pub(super) fn push(&mut self, b: u8) {
        match b {
            b'+' | b'-' if self.len == 0 => self.negative = b == b'-',
            b'0'..=b'9' => {
                self.digits += 1;
                match self
                    .magnitude
                    .checked_mul(10)
                    .and_then(|m| m.checked_add(u64::from(b - b'0')))
                {
                    Some(m) => self.magnitude = m,
                    None => self.bad = true,
                }
            }
            _ => self.bad = true,
        }
        self.len = self.len.saturating_add(1);
    }

    /// No bytes were pushed (an empty PAX value: the record counts as absent).
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn value(&self) -> Option<i64> {
        if self.bad || self.digits == 0 {
            return None;
        }
        if self.negative {
            0i64.checked_sub_unsigned(self.magnitude)
        } else {
            i64::try_from(self.magnitude).ok()
        }
    }
}

/// Collects segments as they are parsed, checking Go's rules on the way with constant state;
/// stores them only when `keep`.
#[derive(Debug, Clone)]
pub(super) struct SegmentBuilder {
    keep: bool,
    segments: Vec<SparseSegment>,
    count: u64,
    /// End of the last segment (the largest, as they are sorted).
    end: u64,
    data_len: u64,
}

impl SegmentBuilder {
    pub(super) fn new(keep: bool) -> Self {
        SegmentBuilder {
            keep,
            segments: Vec::new(),
            count: 0,
            end: 0,
            data_len: 0,
        }
    }

    pub(super) fn push(&mut self, offset: i64, length: i64) -> Result<(), SparseError> {
        let index = self.count;
        if index >= MAX_SPARSE_SEGMENTS as u64 {
            return Err(SparseError::TooManySegments {
                limit: MAX_SPARSE_SEGMENTS,
            });
        }
        let (Ok(offset), Ok(length)) = (u64::try_from(offset), u64::try_from(length)) else {
            return Err(SparseError::Negative { index });
        };
        let end = offset
            .checked_add(length)
            .filter(|&e| i64::try_from(e).is_ok())
            .ok_or(SparseError::Overflow { index })?;
        if offset < self.end {
            return Err(SparseError::Unordered { index });
        }
        // Sorted, non-overlapping segments below 2^63 cannot add up past it.
        self.data_len = self
            .data_len
            .checked_add(length)
            .ok_or(SparseError::Overflow { index })?;
        self.end = end;
        if self.keep {
            self.segments.push(SparseSegment { offset, length });
        }
        self.count += 1;
        Ok(())
    }

    /// The map, for a file of `real_size` bytes whose body holds `body_data` bytes of data.
    pub(super) fn finish(self, real_size: u64, body_data: u64) -> Result<SparseMap, SparseError> {
        if self.end > real_size {
            return Err(SparseError::PastRealSize {
                end: self.end,
                real_size,
            });
        }
        if self.data_len != body_data {
            return Err(SparseError::DataLen {
                map: self.data_len,
                body: body_data,
            });
        }
        Ok(SparseMap {
            real_size,
            segments: self.segments,
            data_len: self.data_len,
        })
    }
}

/// The `GNU.sparse.*` keys Go reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SparseKey {
    Major,
    Minor,
    Size,
    RealSize,
    NumBlocks,
    Map,
    Offset,
    NumBytes,
    /// Another `GNU.sparse.*` key (`name`, …): no effect on the map.
    Other,
}

/// Prefix of the PAX keys of GNU sparse files.
const GNU_SPARSE_PREFIX: &[u8] = b"GNU.sparse.";
/// Longest `GNU.sparse.*` key Go reads (`GNU.sparse.numblocks`): how much of a key the PAX
/// parser keeps.
pub(super) const SPARSE_KEY_MAX: usize = 20;

impl SparseKey {
    /// The key whose first bytes (up to [`SPARSE_KEY_MAX`]) are `kept` and whose length is
    /// `len`; `None` unless it starts with `GNU.sparse.`.
    pub(super) fn from_key(kept: &[u8], len: u64) -> Option<SparseKey> {
        if !kept.starts_with(GNU_SPARSE_PREFIX) || len <= GNU_SPARSE_PREFIX.len() as u64 {
            return None;
        }
        if len != kept.len() as u64 {
            return Some(SparseKey::Other);
        }
        Some(match &kept[GNU_SPARSE_PREFIX.len()..] {
            b"major" => SparseKey::Major,
            b"minor" => SparseKey::Minor,
            b"size" => SparseKey::Size,
            b"realsize" => SparseKey::RealSize,
            b"numblocks" => SparseKey::NumBlocks,
            b"map" => SparseKey::Map,
            b"offset" => SparseKey::Offset,
            b"numbytes" => SparseKey::NumBytes,
            _ => SparseKey::Other,
        })
    }
}

/// A `GNU.sparse.major`/`minor` value, as far as Go compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Version {
    #[default]
    Absent,
    Zero,
    One,
    Other,
}

/// Numbers of a 0.x map as they stream by (the values of a `GNU.sparse.map` record, or of the
/// 0.0 pair records), paired into segments.
#[derive(Debug, Clone)]
struct MapNumbers {
    builder: SegmentBuilder,
    /// Numbers seen (tokens of the map, or pair records).
    values: u64,
    /// The offset waiting for its length.
    offset: i64,
    /// The first error; Go reports it only if the entry turns out to be a 0.x sparse file.
    error: Option<SparseError>,
}

impl MapNumbers {
    fn new(keep: bool) -> Self {
        MapNumbers {
            builder: SegmentBuilder::new(keep),
            values: 0,
            offset: 0,
            error: None,
        }
    }

    fn number(&mut self, n: Decimal, field: &'static str) {
        let index = self.values;
        self.values = self.values.saturating_add(1);
        if self.error.is_some() {
            return;
        }
        let Some(v) = n.value() else {
            self.error = Some(SparseError::Number { field });
            return;
        };
        if index.is_multiple_of(2) {
            self.offset = v;
        } else if let Err(e) = self.builder.push(self.offset, v) {
            self.error = Some(e);
        }
    }
}

/// The `GNU.sparse.*` records of one PAX header, gathered as they stream by: constant memory
/// apart from the segments a keeping tracker stores.
#[derive(Debug, Clone)]
pub(super) struct SparseRecords {
    keep: bool,
    major: Version,
    minor: Version,
    size: Decimal,
    realsize: Decimal,
    numblocks: Decimal,
    /// The last `GNU.sparse.map` record; `None` if absent or empty.
    map: Option<MapNumbers>,
    /// The 0.0 pairs.
    pairs: MapNumbers,
    /// The record being read.
    current: Option<SparseKey>,
    /// The current record's value so far, for numeric keys (and a map's current token).
    number: Decimal,
    /// Bytes of the current value.
    value_len: u64,
    /// First byte of the current value (for versions).
    value_first: u8,
    /// Go's PAX-level error: 0.0 pairs out of order, or a comma in one.
    pair_order: bool,
}

impl SparseRecords {
    pub(super) fn new(keep: bool) -> Self {
        SparseRecords {
            keep,
            major: Version::Absent,
            minor: Version::Absent,
            size: Decimal::default(),
            realsize: Decimal::default(),
            numblocks: Decimal::default(),
            map: None,
            pairs: MapNumbers::new(keep),
            current: None,
            number: Decimal::default(),
            value_len: 0,
            value_first: 0,
            pair_order: false,
        }
    }

    /// A record with key `key` starts.
    pub(super) fn begin(&mut self, key: SparseKey) {
        self.current = Some(key);
        self.number = Decimal::default();
        self.value_len = 0;
        match key {
            SparseKey::Map => self.map = Some(MapNumbers::new(self.keep)),
            SparseKey::Offset if !self.pairs.values.is_multiple_of(2) => self.pair_order = true,
            SparseKey::NumBytes if self.pairs.values.is_multiple_of(2) => self.pair_order = true,
            _ => {}
        }
    }

    /// One byte of the current record's value.
    pub(super) fn value_byte(&mut self, b: u8) {
        if self.value_len == 0 {
            self.value_first = b;
        }
        self.value_len = self.value_len.saturating_add(1);
        match self.current {
            Some(SparseKey::Map) => {
                if b == b',' {
                    let token = std::mem::take(&mut self.number);
                    if let Some(map) = &mut self.map {
                        map.number(token, "a GNU.sparse.map number");
                    }
                } else {
                    self.number.push(b);
                }
            }
            Some(SparseKey::Offset | SparseKey::NumBytes) if b == b',' => self.pair_order = true,
            Some(
                SparseKey::Size
                | SparseKey::RealSize
                | SparseKey::NumBlocks
                | SparseKey::Offset
                | SparseKey::NumBytes,
            ) => self.number.push(b),
            _ => {}
        }
    }

    /// The current record is complete.
    pub(super) fn end(&mut self) {
        let version = match (self.value_len, self.value_first) {
            (0, _) => Version::Absent,
            (1, b'0') => Version::Zero,
            (1, b'1') => Version::One,
            _ => Version::Other,
        };
        let number = std::mem::take(&mut self.number);
        match self.current.take() {
            Some(SparseKey::Major) => self.major = version,
            Some(SparseKey::Minor) => self.minor = version,
            Some(SparseKey::Size) => self.size = number,
            Some(SparseKey::RealSize) => self.realsize = number,
            Some(SparseKey::NumBlocks) => self.numblocks = number,
            Some(SparseKey::Map) => {
                if self.value_len == 0 {
                    // An empty record clears an earlier one.
                    self.map = None;
                } else if let Some(map) = &mut self.map {
                    map.number(number, "a GNU.sparse.map number");
                }
            }
            Some(SparseKey::Offset) => self.pairs.number(number, "GNU.sparse.offset"),
            Some(SparseKey::NumBytes) => self.pairs.number(number, "GNU.sparse.numbytes"),
            Some(SparseKey::Other) | None => {}
        }
    }

    /// Go's PAX-level error, raised for any `x` or `g` header whatever follows.
    pub(super) fn pair_order_error(&self) -> Option<SparseError> {
        self.pair_order.then_some(SparseError::PairOrder)
    }

    /// Whether (and how) the entry these records belong to is sparse, by Go's rule.
    pub(super) fn format(&self) -> Option<SparseFormat> {
        let has_map = self.pairs.values > 0 || self.map.is_some();
        let zero_x = match (self.major, self.minor) {
            (Version::Zero, Version::Zero | Version::One) => true,
            (Version::One, Version::Zero) => return Some(SparseFormat::PaxV10),
            (Version::Absent, Version::Absent) if has_map => true,
            _ => false,
        };
        if !zero_x {
            return None;
        }
        if self.pairs.values > 0 || (self.map.is_none() && self.minor == Version::Zero) {
            Some(SparseFormat::PaxV00)
        } else {
            Some(SparseFormat::PaxV01)
        }
    }

    /// The sparse entry these records make of an entry with a body of `body_size` bytes:
    /// `None` if it is not sparse; for 1.0, a reader for the map at the start of the body.
    ///
    /// # Errors
    /// Go's rules are broken.
    pub(super) fn resolve(self, body_size: u64) -> Result<Option<ResolvedPax>, SparseError> {
        let Some(format) = self.format() else {
            return Ok(None);
        };
        let (field, number) = if !self.size.is_empty() {
            ("GNU.sparse.size", self.size)
        } else {
            ("GNU.sparse.realsize", self.realsize)
        };
        let real_size = if number.is_empty() {
            body_size
        } else {
            let size = number.value().ok_or(SparseError::Number { field })?;
            u64::try_from(size).map_err(|_| SparseError::NegativeRealSize { size })?
        };
        if format == SparseFormat::PaxV10 {
            return Ok(Some(ResolvedPax {
                entry: SparseEntry {
                    format,
                    real_size,
                    map: None,
                },
                pax1: Some(Pax1MapReader::with_keep(real_size, body_size, self.keep)),
            }));
        }
        let declared = self
            .numblocks
            .value()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or(SparseError::Number {
                field: "GNU.sparse.numblocks",
            })?;
        let numbers = if self.pairs.values > 0 {
            self.pairs
        } else {
            self.map.unwrap_or_else(|| MapNumbers::new(false))
        };
        if declared.checked_mul(2) != Some(numbers.values) {
            return Err(SparseError::CountMismatch {
                declared,
                values: numbers.values,
            });
        }
        if let Some(e) = numbers.error {
            return Err(e);
        }
        let map = numbers.builder.finish(real_size, body_size)?;
        Ok(Some(ResolvedPax {
            entry: SparseEntry {
                format,
                real_size,
                map: Some(map),
            },
            pax1: None,
        }))
    }
}

/// A PAX sparse entry, and for 1.0 the reader of its map.
#[derive(Debug)]
pub(super) struct ResolvedPax {
    pub(super) entry: SparseEntry,
    pub(super) pax1: Option<Pax1MapReader>,
}

/// An old GNU map being read from a header and its extension blocks.
#[derive(Debug, Clone)]
pub(super) struct OldGnuMap {
    real_size: u64,
    builder: SegmentBuilder,
}

impl OldGnuMap {
    /// Read the real size and the entries of an `S` header (already known to be GNU).
    pub(super) fn start(header: &[u8; BLOCK_LEN], keep: bool) -> Result<Self, SparseError> {
        let size = parse_numeric(&header[OLD_GNU_REAL_SIZE]).ok_or(SparseError::Number {
            field: "the old GNU real size",
        })?;
        let real_size = u64::try_from(size).map_err(|_| SparseError::NegativeRealSize { size })?;
        let mut map = OldGnuMap {
            real_size,
            builder: SegmentBuilder::new(keep),
        };
        map.entries(&header[OLD_GNU_SPARSE..], OLD_GNU_HEADER_ENTRIES)?;
        Ok(map)
    }

    /// Read an extension block; returns whether another follows.
    pub(super) fn extension(&mut self, block: &[u8; BLOCK_LEN]) -> Result<bool, SparseError> {
        self.entries(block, OLD_GNU_EXT_ENTRIES)?;
        Ok(block[OLD_GNU_EXT_IS_EXTENDED] != 0)
    }

    fn entries(&mut self, area: &[u8], count: usize) -> Result<(), SparseError> {
        for entry in area.chunks_exact(OLD_GNU_ENTRY_LEN).take(count) {
            // GNU, BSD and Go tar all end a block's list at an offset field starting with NUL.
            if entry[0] == 0 {
                break;
            }
            let field = "an old GNU sparse entry";
            let offset = parse_numeric(&entry[..12]).ok_or(SparseError::Number { field })?;
            let length = parse_numeric(&entry[12..]).ok_or(SparseError::Number { field })?;
            self.builder.push(offset, length)?;
        }
        Ok(())
    }

    /// The entry, for a body of `body_size` bytes (all of it data).
    pub(super) fn finish(self, body_size: u64) -> Result<SparseEntry, SparseError> {
        let map = self.builder.finish(self.real_size, body_size)?;
        Ok(SparseEntry {
            format: SparseFormat::OldGnu,
            real_size: self.real_size,
            map: Some(map),
        })
    }
}

/// Where a [`Pax1MapReader`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pax1State {
    /// Reading newline-terminated numbers.
    Lines,
    /// After the last newline, up to the end of its block.
    Padding,
    /// The map and its padding are complete.
    Done,
}

/// Incremental reader of a PAX 1.0 map at the start of a body, as Go's `readGNUSparseMap1x0`
/// reads it: the segment count, then an offset and a length per segment, each a decimal number
/// ending in `\n`; the map ends with the 512-byte block that holds its last newline (the rest
/// of that block is not looked at). Memory: the segments, at most [`MAX_SPARSE_SEGMENTS`].
///
/// ```
/// use splitfdstream::proto::tar::{Pax1MapReader, SparseSegment};
/// let mut body = b"2\n0\n512\n4096\n0\n".to_vec();
/// body.resize(512, 0); // the map's padding
/// body.extend([7u8; 512]); // the data of the first segment
/// let mut r = Pax1MapReader::new(4096, body.len() as u64);
/// assert_eq!(r.feed(&body).unwrap(), 512); // the rest is data
/// assert_eq!(r.map_len(), Some(512));
/// let map = r.into_map().unwrap();
/// assert_eq!(map.segments()[0], SparseSegment { offset: 0, length: 512 });
/// assert_eq!(map.data_len(), 512);
/// ```
#[derive(Debug, Clone)]
pub struct Pax1MapReader {
    real_size: u64,
    body_size: u64,
    state: Pax1State,
    builder: Option<SegmentBuilder>,
    token: Decimal,
    /// Numbers read (the count included).
    numbers: u64,
    /// Segments announced by the first line.
    count: u64,
    offset: i64,
    /// Body bytes consumed.
    consumed: u64,
    map: Option<SparseMap>,
}

impl Pax1MapReader {
    /// A reader for the map at the start of a body of `body_size` bytes, of a file of
    /// `real_size` bytes (`GNU.sparse.realsize`).
    pub fn new(real_size: u64, body_size: u64) -> Self {
        Self::with_keep(real_size, body_size, true)
    }

    pub(super) fn with_keep(real_size: u64, body_size: u64, keep: bool) -> Self {
        Pax1MapReader {
            real_size,
            body_size,
            state: Pax1State::Lines,
            builder: Some(SegmentBuilder::new(keep)),
            token: Decimal::default(),
            numbers: 0,
            count: 0,
            offset: 0,
            consumed: 0,
            map: None,
        }
    }

    /// Feed the next bytes of the body; returns how many of them belong to the map (its padding
    /// included). When that is less than `data.len()`, or once [`Self::is_done`], the rest is
    /// data.
    ///
    /// # Errors
    /// The map breaks Go's rules, is longer than [`MAX_PAX1_MAP_LEN`], or does not fit in the
    /// body. The reader is then unusable.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, SparseError> {
        let mut used = 0;
        for &b in data {
            match self.state {
                Pax1State::Done => break,
                Pax1State::Lines => {
                    self.take_byte()?;
                    if b == b'\n' {
                        self.end_line()?;
                    } else {
                        self.token.push(b);
                    }
                }
                Pax1State::Padding => self.take_byte()?,
            }
            used += 1;
            if self.state == Pax1State::Padding && self.consumed.is_multiple_of(BLOCK_LEN as u64) {
                self.complete()?;
            }
        }
        Ok(used)
    }

    /// Count one more byte of the map.
    fn take_byte(&mut self) -> Result<(), SparseError> {
        if self.consumed >= MAX_PAX1_MAP_LEN {
            return Err(SparseError::MapTooLong {
                limit: MAX_PAX1_MAP_LEN,
            });
        }
        // Go reads the map a whole block at a time: the block being read must fit in the body.
        if self.consumed.is_multiple_of(BLOCK_LEN as u64)
            && self.consumed.saturating_add(BLOCK_LEN as u64) > self.body_size
        {
            return Err(SparseError::TruncatedMap {
                body_size: self.body_size,
            });
        }
        self.consumed += 1;
        Ok(())
    }

    fn end_line(&mut self) -> Result<(), SparseError> {
        let token = std::mem::take(&mut self.token);
        let index = self.numbers;
        self.numbers += 1;
        if index == 0 {
            let count =
                token
                    .value()
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or(SparseError::Number {
                        field: "the PAX 1.0 segment count",
                    })?;
            if count > MAX_SPARSE_SEGMENTS as u64 {
                return Err(SparseError::TooManySegments {
                    limit: MAX_SPARSE_SEGMENTS,
                });
            }
            self.count = count;
        } else {
            let field = "a PAX 1.0 map number";
            let v = token.value().ok_or(SparseError::Number { field })?;
            if index % 2 == 1 {
                self.offset = v;
            } else if let Some(builder) = &mut self.builder {
                builder.push(self.offset, v)?;
            }
        }
        // count ≤ MAX_SPARSE_SEGMENTS: no overflow.
        if self.numbers == 1 + 2 * self.count {
            self.state = Pax1State::Padding;
            if self.consumed.is_multiple_of(BLOCK_LEN as u64) {
                self.complete()?;
            }
        }
        Ok(())
    }

    /// The map and its padding are read: check it against the body's data.
    fn complete(&mut self) -> Result<(), SparseError> {
        self.state = Pax1State::Done;
        let builder = self.builder.take().expect("the builder is only taken once");
        // `take_byte` checked that the map's last block fits in the body.
        let data = self.body_size - self.consumed;
        self.map = Some(builder.finish(self.real_size, data)?);
        Ok(())
    }

    /// The body has ended (after everything was fed): the map must be complete.
    ///
    /// # Errors
    /// [`SparseError::TruncatedMap`] unless [`Self::is_done`].
    pub fn finish(&self) -> Result<(), SparseError> {
        if self.is_done() {
            Ok(())
        } else {
            Err(SparseError::TruncatedMap {
                body_size: self.body_size,
            })
        }
    }

    /// Whether the map and its padding have been read.
    pub fn is_done(&self) -> bool {
        self.state == Pax1State::Done
    }

    /// Bytes the map takes at the start of the body (a multiple of 512), once read.
    pub fn map_len(&self) -> Option<u64> {
        self.is_done().then_some(self.consumed)
    }

    /// The map, once read.
    pub fn map(&self) -> Option<&SparseMap> {
        self.map.as_ref()
    }

    /// The map, once read.
    pub fn into_map(self) -> Option<SparseMap> {
        self.map
    }
}

#[cfg(test)]
mod tests;
