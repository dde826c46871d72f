//! Structure-aware inputs: a sequence of [`Op`]s that build a tar archive (headers with correct
//! checksums unless asked otherwise) and encode it as a splitfdstream at the same time.
//!
//! Random bytes almost never make a tar header with a valid checksum, so a byte-level fuzzer
//! stops at the first header. Here the checksum is computed, and the fuzzer mutates fields:
//! typeflags, octal and base-256 sizes (huge and negative ones too), PAX records, GNU long
//! names, old GNU sparse extension blocks, end blocks. The encoding is chosen by the input as
//! well: inline chunks cut anywhere, bodies as fd references or inline, references where none
//! may stand, raw prefixes, truncation.
//!
//! While building, a small model of `proto/splitfdstream.md` §4 follows what a reader must see.
//! As long as every op was well-formed it predicts the reader's result exactly ([`Expect`]);
//! any op outside the model (raw bytes, a wrong checksum, a misplaced reference…) only turns the
//! prediction off, so the model can never claim too much.

use crate::header::{
    self, BLOCK, Checksum, EXT_IS_EXTENDED, Format, Header, SizeEncoding, padding, pax_record,
    pax_record_with_len,
};
use crate::ops::{Entry, Long, Op, Pax, Sparse};
use splitfdstream::proto::stream::MAX_INLINE_LEN;
use splitfdstream::proto::tar::MAX_EXTENSION_LEN;

/// Largest body whose bytes are made (so that it can travel inline or fill a content fd): just
/// above the importer's 1 MiB batching limit, so both of its paths are reached.
pub const BODY_CAP: u64 = (1 << 20) + 4096;

/// Most body bytes made per input, to keep executions fast (above [`BODY_CAP`]).
const MATERIAL_CAP: u64 = 3 << 20;

/// Inline chunks cut at the [`Op::ChunkLen`] length per flush; the rest of the pending bytes
/// go in chunks of the limit.
const MAX_SMALL_CUTS: usize = 32;

/// Largest reconstructed tar kept for comparisons.
const TAR_CAP: usize = 16 << 20;

/// Largest stream built; ops after it are ignored.
const STREAM_CAP: usize = 16 << 20;

/// Typeflags an entry picks from when the high bit of its selector is clear.
const TYPEFLAGS: &[u8] = b"00\x007123456DVMNA";

/// Names an entry picks from: files, directories, empty, non-UTF-8, a full 100-byte field.
const NAMES: &[&[u8]] = &[
    b"file",
    b"dir/",
    b"",
    b"usr/lib/libx.so.1",
    b"./",
    b"\xff\xfe-not-utf8",
    b"a/",
    &[b'n'; 100],
];

/// Size values that sit on edges: block boundaries, the 64-byte inline limit of composefs, the
/// 1 MiB batching limit, octal field limits, `i64::MAX` and `u64::MAX`.
const SPECIAL_SIZES: &[u64] = &[
    0,
    1,
    64,
    65,
    511,
    512,
    513,
    1 << 20,
    (1 << 20) + 1,
    (1 << 33) - 1,
    1 << 33,
    (1 << 36) - 1,
    i64::MAX as u64,
    i64::MAX as u64 - 511,
    i64::MAX as u64 - 512,
    (1 << 63) - (1 << 20),
    3 << 61,
    1 << 62,
    1 << 63,
    // Beyond `i64`: invalid for the reader, but another parser may take them (the largest
    // that rounds up to a block without overflow, and the one after).
    u64::MAX - 1023,
    u64::MAX - 511,
    u64::MAX,
];

/// PAX record keys: the ones framing cares about, others, and invalid ones.
const PAX_KEYS: &[&[u8]] = &[
    b"size",
    b"path",
    b"linkpath",
    b"uname",
    b"gname",
    b"mtime",
    b"comment",
    b"GNU.sparse.major",
    b"SCHILY.xattr.user.k",
    b"",
    b"si\0ze",
    b"size ",
];

/// One chunk of the built stream, as a reader must return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Inline data: `stream[start..start + len]`.
    Inline {
        /// Offset of the data in the stream.
        start: usize,
        /// Its length.
        len: usize,
    },
    /// An fd reference with this index; `size` is the body size the tar gives it, when the
    /// model knows it.
    Fd {
        /// Index written.
        index: u64,
        /// Body size, if known.
        size: Option<u64>,
    },
    /// Something the reader cannot be expected to split like the builder (a raw prefix, a
    /// truncated chunk): nothing from here on is predicted.
    Opaque,
}

/// The content behind one fd reference of the stream, in reference order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdBody {
    /// The reference's index.
    pub index: u64,
    /// Body size the stream stands for.
    pub size: u64,
    /// The body's bytes, when made (`None`: too large to make).
    pub data: Option<Vec<u8>>,
}

/// What a reader must report for a well-formed input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// The stream ends where the tar may end: `Ok(None)`; otherwise `TruncatedStream`.
    pub clean: bool,
    /// Entries counted.
    pub entries: u64,
    /// Bytes of the reconstructed tar.
    pub tar_bytes: u64,
    /// Whether the end-of-archive block was seen.
    pub end_of_archive: bool,
}

/// The result of building.
#[derive(Debug, Clone, Default)]
pub struct Built {
    /// The splitfdstream.
    pub stream: Vec<u8>,
    /// Its chunks in order.
    pub chunks: Vec<Chunk>,
    /// Contents of its fd references, in order.
    pub bodies: Vec<FdBody>,
    /// The reconstructed tar (inline bytes and bodies), when every byte of it is known.
    pub tar: Option<Vec<u8>>,
    /// The model's prediction, when every op was well-formed.
    pub expect: Option<Expect>,
}

/// Extension data pending for the next entry (the model's copy of the reader's).
#[derive(Debug, Clone, Copy, Default)]
struct Pending {
    active: bool,
    pax_size: Option<u64>,
    pax_path_is_dir: Option<bool>,
    long_name_is_dir: Option<bool>,
}

/// What the archive built so far must look like to a reader.
#[derive(Debug, Clone, Default)]
struct Model {
    /// Every op so far was well-formed (else nothing is predicted).
    ok: bool,
    in_trailer: bool,
    entries: u64,
    /// Tar bytes; may exceed `u64` with huge elided bodies.
    tar_len: u128,
    pending: Pending,
}

/// Builds the stream and the tar together.
struct Builder {
    out: Built,
    /// Inline bytes not yet written as chunks.
    pending: Vec<u8>,
    /// Largest inline chunk to cut.
    chunk_len: usize,
    /// References written.
    fd_refs: u64,
    /// Body bytes made so far.
    material: u64,
    model: Model,
}

impl Builder {
    fn new() -> Self {
        Builder {
            out: Built {
                tar: Some(Vec::new()),
                ..Built::default()
            },
            pending: Vec::new(),
            chunk_len: MAX_INLINE_LEN as usize,
            fd_refs: 0,
            material: 0,
            model: Model {
                ok: true,
                ..Model::default()
            },
        }
    }

    /// Nothing from here on is predicted.
    fn unmodelled(&mut self) {
        self.model.ok = false;
    }

    fn tar_extend(&mut self, data: &[u8]) {
        if let Some(tar) = &mut self.out.tar {
            if tar.len() + data.len() > TAR_CAP {
                self.out.tar = None;
            } else {
                tar.extend_from_slice(data);
            }
        }
    }

    /// Tar bytes that travel inline.
    fn inline(&mut self, data: &[u8]) {
        self.model.tar_len += data.len() as u128;
        self.tar_extend(data);
        self.pending.extend_from_slice(data);
        if self.pending.len() >= MAX_INLINE_LEN as usize {
            self.flush();
        }
    }

    /// Write the pending inline bytes as chunks.
    fn flush(&mut self) {
        let limit = self.chunk_len.clamp(1, MAX_INLINE_LEN as usize);
        let pending = std::mem::take(&mut self.pending);
        let mut rest = pending.as_slice();
        let mut cuts = 0;
        while !rest.is_empty() {
            // Small chunks only for the first few: a megabyte cut into bytes would cost a
            // million items and teach the fuzzer nothing new after the first ones.
            let n = if cuts < MAX_SMALL_CUTS {
                limit
            } else {
                MAX_INLINE_LEN as usize
            };
            let (piece, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            cuts += 1;
            self.out
                .stream
                .extend_from_slice(&(-(piece.len() as i64)).to_le_bytes());
            let start = self.out.stream.len();
            self.out.stream.extend_from_slice(piece);
            self.out.chunks.push(Chunk::Inline {
                start,
                len: piece.len(),
            });
        }
    }

    /// A chunk the builder does not split like a reader.
    fn opaque(&mut self, raw: &[u8]) {
        self.flush();
        self.out.stream.extend_from_slice(raw);
        self.out.chunks.push(Chunk::Opaque);
        self.out.tar = None;
        self.unmodelled();
    }

    /// Body bytes: `head` then `fill` up to `size`, if allowed to make that many.
    fn make_body(&mut self, size: u64, head: &[u8], fill: u8) -> Option<Vec<u8>> {
        if size > BODY_CAP || self.material + size > MATERIAL_CAP {
            return None;
        }
        self.material += size;
        let mut v = head[..head.len().min(size as usize)].to_vec();
        v.resize(size as usize, fill);
        Some(v)
    }

    /// A body of `size` bytes; `file` when a reference may stand for it (a regular file whose
    /// size the model knows).
    fn body(&mut self, size: u64, data: Option<Vec<u8>>, as_fd: bool, file: bool) {
        if size == 0 {
            if as_fd {
                // A reference where a body of size 0 would start: misplaced.
                self.fd_ref(self.fd_refs, 0, None, None);
                self.unmodelled();
            }
            return;
        }
        if as_fd {
            let known = (file && self.model.ok && !self.model.in_trailer).then_some(size);
            if known.is_none() {
                self.unmodelled();
            }
            self.fd_ref(self.fd_refs, size, data, known);
            return;
        }
        match data {
            Some(d) => self.inline(&d),
            None => {
                // Too large to send inline: the stream goes on without it.
                self.out.tar = None;
                self.unmodelled();
            }
        }
    }

    /// Write fd reference `index` for a body of `size` bytes.
    fn fd_ref(&mut self, index: u64, size: u64, data: Option<Vec<u8>>, known: Option<u64>) {
        self.flush();
        let prefix = index.min(i64::MAX as u64) as i64;
        self.out.stream.extend_from_slice(&prefix.to_le_bytes());
        self.out.chunks.push(Chunk::Fd { index, size: known });
        self.model.tar_len += u128::from(size);
        match &data {
            Some(d) => self.tar_extend(d),
            None => self.out.tar = None,
        }
        if index == self.fd_refs {
            self.out.bodies.push(FdBody { index, size, data });
            self.fd_refs += 1;
        }
    }

    fn padding(&mut self, size: u64) {
        let pad = padding(size) as usize;
        self.inline(&[0u8; BLOCK][..pad]);
    }

    /// The next entry's pending extension data, consumed (the model's `on_header`).
    fn take_pending(&mut self) -> Pending {
        std::mem::take(&mut self.model.pending)
    }

    fn entry(&mut self, x: &Entry) {
        let typeflag = if x.typesel & 0x80 == 0 {
            TYPEFLAGS[usize::from(x.typesel) % TYPEFLAGS.len()]
        } else {
            x.typesel & 0x7f
        };
        let checksum = Checksum::from_bits(x.flags);
        let format = Format::from_bits(x.flags >> 2);
        let as_fd = x.flags & 0x20 != 0;
        let no_padding = x.flags >> 6 == 1;
        let value = pick_size(x.size_sel, x.size);
        let (field, parsed) = header::size_field(value, SizeEncoding::from_bits(x.size_sel));
        let name = NAMES[usize::from(x.name) % NAMES.len()];
        let block = Header {
            name,
            typeflag,
            size: field,
            format,
            prefix: if x.flags & 0x10 != 0 {
                b"usr/share"
            } else {
                b""
            },
            checksum,
            gnu_extended: false,
        }
        .block();
        self.inline(&block);
        if !checksum.is_valid() || parsed.is_none() || matches!(typeflag, b'x' | b'g' | b'L' | b'K')
        {
            self.unmodelled();
        }
        if typeflag == b'S' && format != Format::Gnu {
            self.unmodelled();
        }
        let trailer = self.model.in_trailer;
        let pending = if trailer {
            Pending::default()
        } else {
            self.model.entries += 1;
            self.take_pending()
        };
        let is_dir = pending
            .long_name_is_dir
            .or(pending.pax_path_is_dir)
            .unwrap_or_else(|| header::block_name_is_dir(&block));
        let header_only = matches!(typeflag, b'1'..=b'6') || (typeflag == 0 && is_dir);
        if header_only && !trailer {
            if as_fd {
                self.fd_ref(self.fd_refs, 0, None, None);
                self.unmodelled();
            }
            return;
        }
        let size = match (pending.pax_size, parsed) {
            (Some(s), _) => i128::from(s),
            (None, Some(v)) => v,
            (None, None) => i128::from(value),
        };
        let size = match u64::try_from(size) {
            Ok(s) => s,
            Err(_) => {
                self.unmodelled(); // a negative size
                value
            }
        };
        let file = matches!(typeflag, b'0' | 0 | b'7' | b'S');
        let data = self.make_body(size, &[], x.fill);
        self.body(size, data, as_fd, file);
        if no_padding {
            if padding(size) != 0 {
                self.unmodelled();
            }
        } else {
            self.padding(size);
        }
    }

    fn pax(&mut self, x: &Pax) {
        let global = x.flags & 1 != 0;
        let mut body = Vec::new();
        let mut valid = true;
        let (mut size, mut path_is_dir) = (None, None);
        for r in &x.records {
            let key = PAX_KEYS[usize::from(r.key) % PAX_KEYS.len()];
            let (value, value_ok) = pax_value(key, r.val_sel, r.val);
            let good_len = r.len_sel % 8 < 5;
            let rec = match r.len_sel % 8 {
                0..=4 => pax_record(key, &value),
                5 | 6 => {
                    let right = pax_record(key, &value);
                    let digits = right.iter().position(|&b| b == b' ').unwrap_or(0);
                    let n: usize = std::str::from_utf8(&right[..digits])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let n = if r.len_sel % 8 == 5 { n + 1 } else { n - 1 };
                    pax_record_with_len(n.to_string().as_bytes(), key, &value)
                }
                _ => pax_record_with_len(b"99999999999999999999", key, &value),
            };
            valid &= good_len && value_ok;
            match key {
                b"size" if value.is_empty() => size = None,
                b"size" => {
                    size = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                }
                b"path" if value.is_empty() => path_is_dir = None,
                b"path" => path_is_dir = value.last().map(|&b| b == b'/'),
                _ => {}
            }
            body.extend_from_slice(&rec);
        }
        let declared = match (x.flags >> 4) & 3 {
            2 => {
                valid = false;
                body.len() as u64 + 1
            }
            3 => {
                valid = false;
                MAX_EXTENSION_LEN + 1
            }
            _ => body.len() as u64,
        };
        let checksum = Checksum::from_bits(x.flags >> 1);
        let block = Header {
            name: if global {
                b"PaxHeaders/global"
            } else {
                b"PaxHeaders/entry"
            },
            typeflag: if global { b'g' } else { b'x' },
            size: header::size_field(declared, SizeEncoding::Octal).0,
            format: if x.flags & 8 != 0 {
                Format::Gnu
            } else {
                Format::Ustar
            },
            prefix: b"",
            checksum,
            gnu_extended: false,
        }
        .block();
        self.inline(&block);
        self.inline(&body);
        self.padding(body.len() as u64);
        if !valid || !checksum.is_valid() {
            self.unmodelled();
        } else if !self.model.in_trailer {
            if global {
                // Go returns a global header as an entry and forgets pending extensions.
                self.model.entries += 1;
                self.model.pending = Pending::default();
            } else {
                let p = &mut self.model.pending;
                p.active = true;
                p.pax_size = size;
                p.pax_path_is_dir = path_is_dir;
            }
        }
    }

    fn long(&mut self, x: &Long) {
        let link = x.flags & 1 != 0;
        let terminated = x.flags & 8 != 0;
        let mut name = vec![b'a' + x.fill % 26; usize::from(x.len % 4096)];
        if x.flags & 0x10 != 0 {
            name.push(b'/');
        }
        let mut body = name.clone();
        if terminated {
            body.push(0);
        }
        let mode = (x.flags >> 5) & 3;
        if mode == 2 && terminated {
            body.extend_from_slice(b"zz");
        }
        let declared = if mode == 3 {
            MAX_EXTENSION_LEN + 1
        } else {
            body.len() as u64
        };
        let checksum = Checksum::from_bits(x.flags >> 1);
        let block = Header {
            name: b"././@LongLink",
            typeflag: if link { b'K' } else { b'L' },
            size: header::size_field(declared, SizeEncoding::Octal).0,
            format: Format::Gnu,
            prefix: b"",
            checksum,
            gnu_extended: false,
        }
        .block();
        self.inline(&block);
        self.inline(&body);
        self.padding(body.len() as u64);
        if mode == 3 || !checksum.is_valid() {
            self.unmodelled();
        } else if !self.model.in_trailer {
            let p = &mut self.model.pending;
            p.active = true;
            if !link {
                // An empty long name is ignored, and clears an earlier one.
                p.long_name_is_dir = name.last().map(|&b| b == b'/');
            }
        }
    }

    fn sparse(&mut self, x: &Sparse) {
        let gnu = x.flags & 1 != 0;
        let extended = x.flags & 2 != 0;
        let checksum = Checksum::from_bits(x.flags >> 2);
        let as_fd = x.flags & 0x10 != 0;
        let size = u64::from(x.size) % (BODY_CAP + 1);
        let block = Header {
            name: b"sparse",
            typeflag: b'S',
            size: header::size_field(size, SizeEncoding::Octal).0,
            format: if gnu { Format::Gnu } else { Format::Ustar },
            prefix: b"",
            checksum,
            gnu_extended: extended,
        }
        .block();
        self.inline(&block);
        if !gnu || !checksum.is_valid() {
            self.unmodelled();
        }
        if extended {
            let n = 1 + x.ext % 3;
            for i in 0..n {
                let mut ext = [0u8; BLOCK];
                // A sparse map entry (offset, length), as GNU tar writes them.
                ext[..12].copy_from_slice(b"00000001000\0");
                ext[12..24].copy_from_slice(b"00000000012\0");
                let last = i + 1 == n;
                ext[EXT_IS_EXTENDED] = u8::from(!last || x.flags & 0x20 != 0);
                self.inline(&ext);
            }
            if x.flags & 0x20 != 0 {
                self.unmodelled();
            }
        }
        let pending = if self.model.in_trailer {
            Pending::default()
        } else {
            self.model.entries += 1;
            self.take_pending()
        };
        let size = pending.pax_size.unwrap_or(size);
        let data = self.make_body(size, b"sparse data", x.fill);
        self.body(size, data, as_fd, true);
        self.padding(size);
    }

    fn op(&mut self, op: &Op) -> bool {
        match op {
            Op::Entry(x) => self.entry(x),
            Op::Pax(x) => self.pax(x),
            Op::Long(x) => self.long(x),
            Op::Sparse(x) => self.sparse(x),
            Op::End { blocks, trailer } => {
                let n = 1 + usize::from(blocks & 1);
                self.inline(&[0u8; 2 * BLOCK][..n * BLOCK]);
                self.model.in_trailer = true;
                self.model.pending = Pending::default();
                self.inline(trailer);
            }
            Op::RawBlock { fix, block } => {
                let mut block = **block;
                match fix % 3 {
                    1 => header::set_checksum(&mut block, Checksum::Unsigned),
                    2 => header::set_checksum(&mut block, Checksum::Signed),
                    _ => {}
                }
                self.inline(&block);
                self.unmodelled();
            }
            Op::Body {
                flags,
                size,
                data,
                fill,
            } => {
                let body = self.make_body(*size, data, *fill);
                self.body(*size, body, flags & 1 != 0, false);
                if flags & 2 == 0 {
                    self.padding(*size);
                }
                self.unmodelled();
            }
            Op::RawBytes(d) => {
                self.inline(d);
                if !self.model.in_trailer {
                    self.unmodelled();
                }
            }
            Op::FdRef { index, size } => {
                let index = match index % 4 {
                    0 => self.fd_refs,
                    1 => self.fd_refs + 1,
                    2 => 0,
                    _ => i64::MAX as u64,
                };
                let size = u64::from(*size) % (BODY_CAP + 1);
                let data = self.make_body(size, b"misplaced", 0x5a);
                self.fd_ref(index, size, data, None);
                self.unmodelled();
            }
            Op::Prefix(p) => self.opaque(&p.to_le_bytes()),
            Op::Cut => self.flush(),
            Op::ChunkLen(n) => {
                self.flush();
                self.chunk_len = if *n == 0 {
                    MAX_INLINE_LEN as usize
                } else {
                    usize::from(*n)
                };
            }
            Op::Repeat(_) => {} // expanded by `build`
            Op::Truncate(m) => {
                match m % 3 {
                    0 => self.flush(),
                    1 => {
                        // The last chunk declares one byte more than follows.
                        let data = std::mem::take(&mut self.pending);
                        let mut raw = (-(data.len() as i64) - 1).to_le_bytes().to_vec();
                        raw.extend_from_slice(&data);
                        self.opaque(&raw);
                    }
                    _ => {
                        let n = 1 + usize::from(m / 3) % 7;
                        self.opaque(&(-512i64).to_le_bytes()[..n]);
                    }
                }
                return false;
            }
        }
        self.out.stream.len() + self.pending.len() < STREAM_CAP
    }

    fn finish(mut self) -> Built {
        self.flush();
        let m = &self.model;
        if m.ok
            && let Ok(tar_bytes) = u64::try_from(m.tar_len)
        {
            self.out.expect = Some(Expect {
                clean: m.in_trailer || !m.pending.active,
                entries: m.entries,
                tar_bytes,
                end_of_archive: m.in_trailer,
            });
        }
        self.out
    }
}

/// The size value an entry's `size_sel` and `size` stand for.
fn pick_size(sel: u8, raw: u64) -> u64 {
    match (sel >> 3) & 3 {
        0 => raw % 1100,
        // Sizes up to 64 KiB keep most executions fast; the edge table has the larger ones.
        1 => raw % (64 << 10),
        2 => SPECIAL_SIZES[(raw % SPECIAL_SIZES.len() as u64) as usize],
        _ => raw,
    }
}

/// A PAX value for `key`, and whether the record is valid for framing.
fn pax_value(key: &[u8], sel: u8, val: u64) -> (Vec<u8>, bool) {
    let key_ok = !key.is_empty() && !key.contains(&0) && !key.contains(&b'=');
    let decimal = |v: u64| v.to_string().into_bytes();
    let (value, number) = match sel % 8 {
        0 => (decimal(val % 100_000), true),
        1 => {
            let v = SPECIAL_SIZES[(val % SPECIAL_SIZES.len() as u64) as usize];
            (decimal(v), v <= i64::MAX as u64)
        }
        2 => (Vec::new(), true),
        3 => (format!("-{}", val % 1000).into_bytes(), false),
        4 => (
            if val & 1 != 0 {
                b"some/dir/".to_vec()
            } else {
                b"some/file".to_vec()
            },
            false,
        ),
        5 => (b"nul\0inside".to_vec(), false),
        6 => (decimal(val), val <= i64::MAX as u64),
        _ => (b"a=b\nc".to_vec(), false),
    };
    let has_nul = value.contains(&0);
    let ok = key_ok
        && match key {
            b"size" => number,
            b"path" | b"linkpath" | b"uname" | b"gname" => !has_nul,
            _ => true,
        };
    (value, ok)
}

/// Build the archive and stream that `ops` describe.
pub fn build(ops: &[Op]) -> Built {
    let mut b = Builder::new();
    let mut last = None;
    for op in ops {
        let (op, times) = match op {
            Op::Repeat(n) => match last {
                Some(last) => (last, 1 + usize::from(n % 8)),
                None => continue,
            },
            Op::Entry(_) | Op::Pax(_) | Op::Long(_) | Op::Sparse(_) => {
                last = Some(op);
                (op, 1)
            }
            _ => (op, 1),
        };
        for _ in 0..times {
            if !b.op(op) {
                return b.finish();
            }
        }
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Cursor;
    use crate::ops::{Record, encode_ops};
    use splitfdstream::proto::stream::{Item, Reader};

    fn file(size: u64, as_fd: bool) -> Op {
        Op::Entry(Entry {
            typesel: 0,
            flags: if as_fd { 0x20 } else { 0 },
            size_sel: 3 << 3,
            size,
            name: 0,
            fill: b'x',
        })
    }

    #[test]
    fn encode_decode_round_trip() {
        let ops = vec![
            file(5, true),
            Op::Pax(Pax {
                flags: 1,
                records: vec![Record {
                    key: 0,
                    val_sel: 0,
                    val: 700,
                    len_sel: 0,
                }],
            }),
            Op::Long(Long {
                flags: 0x18,
                len: 3,
                fill: 1,
            }),
            Op::Sparse(Sparse {
                flags: 3,
                ext: 1,
                size: 10,
                fill: 0,
            }),
            Op::RawBlock {
                fix: 1,
                block: Box::new([7; BLOCK]),
            },
            Op::Body {
                flags: 1,
                size: 9,
                data: b"abc".to_vec(),
                fill: 1,
            },
            Op::RawBytes(b"xyz".to_vec()),
            Op::FdRef { index: 1, size: 9 },
            Op::Prefix(i64::MIN),
            Op::Cut,
            Op::ChunkLen(100),
            Op::End {
                blocks: 1,
                trailer: b"t".to_vec(),
            },
            Op::Repeat(9),
            Op::Truncate(2),
        ];
        let bytes = encode_ops(&ops);
        assert_eq!(Op::decode_all(&mut Cursor::new(&bytes)), ops);
    }

    #[test]
    fn well_formed_archive_is_predicted() {
        let ops = vec![
            file(5, true),
            Op::Pax(Pax {
                flags: 0,
                records: vec![Record {
                    key: 0,
                    val_sel: 0,
                    val: 700,
                    len_sel: 0,
                }],
            }),
            Op::ChunkLen(77),
            file(0, true),
            Op::Sparse(Sparse {
                flags: 0x13,
                ext: 2,
                size: 1000,
                fill: 3,
            }),
            Op::End {
                blocks: 1,
                trailer: b"tail".to_vec(),
            },
        ];
        let built = build(&ops);
        let expect = built.expect.expect("well-formed");
        assert!(expect.clean && expect.end_of_archive);
        assert_eq!(expect.entries, 3);
        let tar = built.tar.as_ref().expect("all bytes known");
        assert_eq!(expect.tar_bytes, tar.len() as u64);
        let mut r = Reader::new(built.stream.as_slice());
        let mut k = 0;
        while let Some(item) = r.next_item().unwrap() {
            match (item, &built.chunks[k]) {
                (Item::Inline(d), Chunk::Inline { start, len }) => {
                    assert_eq!(d, &built.stream[*start..start + len])
                }
                (Item::FdRef { index, size }, Chunk::Fd { index: i, size: s }) => {
                    assert_eq!((index, Some(size)), (*i, *s))
                }
                other => panic!("{other:?}"),
            }
            k += 1;
        }
        assert_eq!(k, built.chunks.len());
        assert_eq!(
            (r.entries(), r.tar_bytes(), r.saw_end_of_archive()),
            (3, expect.tar_bytes, true)
        );
        assert_eq!(
            built.bodies.iter().map(|b| b.size).collect::<Vec<_>>(),
            [5, 700, 1000]
        );
    }
}
