//! The splitfdstream codec (normative spec: `proto/splitfdstream.md`).
//!
//! A splitfdstream is a layer tar with each regular-file body replaced by a reference to a
//! content fd passed alongside. On the wire it is a sequence of chunks, each starting with an
//! `i64` little-endian prefix: a negative prefix `-n` is followed by `n` inline tar bytes
//! (`1 ≤ n ≤` [`MAX_INLINE_LEN`]); a prefix `i ≥ 0` stands for the whole body of the regular
//! file whose header precedes it, found in content fd `i`. The `n`-th reference has index `n`.
//!
//! | limit | value | protects |
//! |---|---|---|
//! | [`MAX_INLINE_LEN`] | 1 MiB | reader memory: one inline chunk is buffered whole |
//! | [`READ_BUF_LEN`] | 64 KiB | read syscalls: small chunks are served from one read |
//! | [`MAX_EXTENSION_LEN`](super::tar::MAX_EXTENSION_LEN) | 1 MiB | PAX and GNU long name bodies (Go's own limit) |
//!
//! [`Reader`] follows the tar framing (see [`super::tar`]) so it can reject a reference anywhere but
//! at the start of a regular-file body of size > 0 and report that body's size; it never looks
//! at body bytes, and holds at most [`READ_BUF_LEN`] or one inline chunk, whichever is larger.
//!
//! ```
//! use splitfdstream::proto::stream::{Item, Reader, Writer};
//!
//! // A ustar header for "hello.txt", 5 bytes.
//! let mut header = [0u8; 512];
//! header[..9].copy_from_slice(b"hello.txt");
//! header[124..136].copy_from_slice(b"00000000005\0");
//! header[156] = b'0';
//! header[257..265].copy_from_slice(b"ustar\x0000");
//! header[148..156].fill(b' ');
//! let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
//! header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
//!
//! let mut w = Writer::new(Vec::new());
//! w.write_inline(&header)?;
//! w.write_fd_ref(0)?; // "hello" travels as content fd 0
//! w.write_inline(&[0u8; 507 + 1024])?; // padding, end-of-archive blocks
//! let stream = w.into_inner()?;
//!
//! let mut r = Reader::new(stream.as_slice());
//! assert!(matches!(r.next_item()?, Some(Item::Inline(h)) if h.len() == 512));
//! assert!(matches!(r.next_item()?, Some(Item::FdRef { index: 0, size: 5 })));
//! assert!(matches!(r.next_item()?, Some(Item::Inline(_))));
//! assert!(r.next_item()?.is_none());
//! assert_eq!((r.entries(), r.fd_refs(), r.tar_bytes()), (1, 1, 2048));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io::{BufWriter, Read, Write};
use std::os::fd::BorrowedFd;

use super::tar::{Position, TarError, Tracker};

/// Largest inline chunk a writer emits and a reader accepts (1 MiB). The reader buffers a whole
/// chunk before handing it out, so this bounds its memory whatever the peer declares.
pub const MAX_INLINE_LEN: u64 = 1 << 20;

/// Size of the reader's read buffer: prefixes and small chunks are parsed out of one `read`,
/// so a stream of many small chunks costs few syscalls. Larger chunks grow the buffer to the
/// chunk's size, at most [`MAX_INLINE_LEN`].
pub const READ_BUF_LEN: usize = 64 << 10;

/// Size of the writer's buffer: headers and fd references are small, batching them keeps the
/// number of `write` calls (on a pipe: wakeups of the reader) low.
const WRITE_BUF_LEN: usize = 64 << 10;

/// Bytes of a chunk prefix.
const PREFIX_LEN: usize = 8;

/// Errors of the codec. Offsets are byte offsets in the splitfdstream (the start of the chunk
/// prefix concerned unless said otherwise); `tar_offset`s are offsets in the reconstructed tar.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Reading the stream failed.
    #[error("reading splitfdstream at offset {offset}")]
    Io {
        /// Offset of the chunk being read.
        offset: u64,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The stream ends inside an 8-byte chunk prefix.
    #[error("splitfdstream ends inside the chunk prefix at offset {offset} ({got} of 8 bytes)")]
    TruncatedPrefix {
        /// Offset of the prefix.
        offset: u64,
        /// Bytes of it present.
        got: usize,
    },
    /// The prefix is `i64::MIN`, whose magnitude is no inline length.
    #[error("chunk prefix at offset {offset} is i64::MIN")]
    BadPrefix {
        /// Offset of the prefix.
        offset: u64,
    },
    /// An inline chunk longer than [`MAX_INLINE_LEN`].
    #[error("inline chunk at offset {offset} declares {len} bytes, limit {limit}", limit = MAX_INLINE_LEN)]
    InlineTooLong {
        /// Offset of the prefix.
        offset: u64,
        /// Declared length.
        len: u64,
    },
    /// The stream ends inside an inline chunk's data.
    #[error("splitfdstream ends inside the inline chunk at offset {offset} ({got} of {len} bytes)")]
    TruncatedChunk {
        /// Offset of the chunk's prefix.
        offset: u64,
        /// Declared length.
        len: u64,
        /// Bytes present.
        got: u64,
    },
    /// An fd reference whose index is not the number of references before it.
    #[error("fd reference at offset {offset} has index {index}, expected {expected}")]
    FdIndexOutOfOrder {
        /// Offset of the prefix.
        offset: u64,
        /// Index found.
        index: u64,
        /// Index required (references so far).
        expected: u64,
    },
    /// An fd reference for which no fd was received (raised by consumers that match references
    /// to received fds; the reader itself does not know the fds).
    #[error("fd reference {index} at offset {offset}, but only {count} fds received")]
    BadFdIndex {
        /// Offset of the prefix.
        offset: u64,
        /// Index found.
        index: u64,
        /// Fds received.
        count: u64,
    },
    /// An fd reference that is not at the start of a regular-file body of size > 0.
    #[error(
        "fd reference {index} at offset {offset} is not at the start of a regular-file body \
         (tar offset {tar_offset} is in {position})"
    )]
    UnexpectedFdRef {
        /// Offset of the prefix.
        offset: u64,
        /// Index found.
        index: u64,
        /// Tar offset where the reference stands.
        tar_offset: u64,
        /// What the tar has there.
        position: Position,
    },
    /// The inline bytes are not a valid tar (checksum, size field, PAX records…).
    #[error("invalid tar data in the chunk at offset {offset}")]
    BadTarHeader {
        /// Offset of the chunk's prefix in which the problem was found.
        offset: u64,
        /// What is wrong, with its tar offset.
        #[source]
        source: TarError,
    },
    /// The stream ends cleanly between chunks, but not at a tar entry boundary.
    #[error("splitfdstream ends at offset {offset} inside {position} (tar offset {tar_offset})")]
    TruncatedStream {
        /// Length of the stream.
        offset: u64,
        /// Length of the tar so far.
        tar_offset: u64,
        /// Where the tar was cut.
        position: Position,
    },
    /// A content fd is not a regular file.
    #[error(
        "content fd {index} (fd reference at offset {offset}) is a {file_type}, not a regular file"
    )]
    FdNotRegular {
        /// Offset of the reference.
        offset: u64,
        /// Its index.
        index: u64,
        /// What the fd is.
        file_type: &'static str,
    },
    /// A content fd's size differs from the body size in the tar header.
    #[error(
        "content fd {index} (fd reference at offset {offset}) has {actual} bytes, \
         the tar header says {expected}"
    )]
    FdSizeMismatch {
        /// Offset of the reference.
        offset: u64,
        /// Its index.
        index: u64,
        /// Body size from the tar header.
        expected: u64,
        /// The fd's size.
        actual: u64,
    },
    /// `fstat` of a content fd failed.
    #[error("fstat of content fd {index} (fd reference at offset {offset})")]
    FdStat {
        /// Offset of the reference.
        offset: u64,
        /// Its index.
        index: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// [`Reader::next_item`] was called again after it returned an error.
    #[error("splitfdstream reader already failed at offset {offset}")]
    Failed {
        /// Offset the reader had reached.
        offset: u64,
    },
}

/// Streaming writer. Buffers internally (64 KiB); `flush` pushes everything written
/// so far.
pub struct Writer<W: Write> {
    inner: BufWriter<W>,
    /// References written, i.e. the index the next one must have.
    fd_refs: u64,
}

impl<W: Write> fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("fd_refs", &self.fd_refs)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Writer<W> {
    /// A writer emitting the stream into `inner`.
    pub fn new(inner: W) -> Self {
        Writer {
            inner: BufWriter::with_capacity(WRITE_BUF_LEN, inner),
            fd_refs: 0,
        }
    }

    /// Append inline bytes (split into chunks of at most [`MAX_INLINE_LEN`]; empty input writes
    /// nothing). Large data bypasses the buffer, so it is copied once.
    ///
    /// # Errors
    /// Errors of the underlying writer.
    pub fn write_inline(&mut self, data: &[u8]) -> std::io::Result<()> {
        for chunk in data.chunks(MAX_INLINE_LEN as usize) {
            let prefix = -(chunk.len() as i64); // ≤ MAX_INLINE_LEN, cannot overflow
            self.inner.write_all(&prefix.to_le_bytes())?;
            self.inner.write_all(chunk)?;
        }
        Ok(())
    }

    /// Append a reference to content fd `index` (the n-th reference must have index n).
    ///
    /// # Errors
    /// [`std::io::ErrorKind::InvalidInput`] when `index` is not the number of references
    /// written before; errors of the underlying writer.
    pub fn write_fd_ref(&mut self, index: u64) -> std::io::Result<()> {
        if index != self.fd_refs {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "fd reference index {index} out of order, expected {}",
                    self.fd_refs
                ),
            ));
        }
        let prefix = i64::try_from(index).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("fd reference index {index} exceeds i64::MAX"),
            )
        })?;
        self.inner.write_all(&prefix.to_le_bytes())?;
        self.fd_refs += 1;
        Ok(())
    }

    /// Write out everything buffered and flush the underlying writer.
    ///
    /// # Errors
    /// Errors of the underlying writer.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }

    /// Flush and return the underlying writer.
    ///
    /// # Errors
    /// Errors of the final flush.
    pub fn into_inner(self) -> std::io::Result<W> {
        self.inner.into_inner().map_err(|e| e.into_error())
    }
}

/// One item read from a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// Inline bytes (a borrowed view of the reader's buffer).
    Inline(&'a [u8]),
    /// Reference to content fd `index`; the tar header says the body is `size` bytes.
    FdRef {
        /// Index among the content fds (0-based, consecutive).
        index: u64,
        /// Body size (> 0) from the tar header or its PAX `size` record.
        size: u64,
    },
}

/// What [`Reader::step`] produced; owned, so the borrow of the buffer starts only in
/// [`Reader::next_item`].
enum Step {
    Inline { start: usize, len: usize },
    FdRef { index: u64, size: u64 },
    End,
}

/// Whether the reader can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Reading,
    Done,
    Failed,
}

/// Streaming, tar-aware reader. Reads from a blocking source; at most [`READ_BUF_LEN`] or one
/// inline chunk is buffered, whichever is larger.
pub struct Reader<R: Read> {
    inner: R,
    /// Read buffer; `buf[start..end]` is read but not consumed. Allocated on first read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream bytes consumed (offset of the next prefix).
    offset: u64,
    fd_refs: u64,
    tar: Tracker,
    status: Status,
    /// `buf` range of the most recent inline item, for [`Reader::last_inline`].
    last_inline: (usize, usize),
}

impl<R: Read> fmt::Debug for Reader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("offset", &self.offset)
            .field("fd_refs", &self.fd_refs)
            .field("tar", &self.tar)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Reader<R> {
    /// A reader of the stream in `inner`. Allocates nothing until the first read.
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
            offset: 0,
            fd_refs: 0,
            tar: Tracker::new(),
            status: Status::Reading,
            last_inline: (0, 0),
        }
    }

    /// Next item; `Ok(None)` only at a clean end (at a tar entry boundary or after the end
    /// blocks), and again on every later call.
    ///
    /// # Errors
    /// The first violation of the spec, or a read error. Every later call returns
    /// [`StreamError::Failed`].
    pub fn next_item(&mut self) -> Result<Option<Item<'_>>, StreamError> {
        match self.status {
            Status::Reading => {}
            Status::Done => return Ok(None),
            Status::Failed => {
                return Err(StreamError::Failed {
                    offset: self.offset,
                });
            }
        }
        let at = self.offset;
        match self.step() {
            Ok(Step::Inline { start, len }) => {
                self.last_inline = (start, len);
                Ok(Some(Item::Inline(&self.buf[start..start + len])))
            }
            Ok(Step::FdRef { index, size }) => Ok(Some(Item::FdRef { index, size })),
            Ok(Step::End) => {
                self.status = Status::Done;
                Ok(None)
            }
            Err(e) => {
                // Report later calls at the chunk that failed, not part-way into it.
                self.offset = at;
                self.status = Status::Failed;
                Err(e)
            }
        }
    }

    /// The bytes of the most recent [`Item::Inline`], valid until the next `next_item` call
    /// (empty before any). Lets a caller that matched on the item's kind re-borrow the bytes.
    pub fn last_inline(&self) -> &[u8] {
        let (start, len) = self.last_inline;
        self.buf.get(start..start + len).unwrap_or_default()
    }

    /// Byte offset in the splitfdstream of the next chunk prefix (after an error: of the
    /// chunk that failed).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// tar entries (headers) seen so far: every header except PAX `x`, GNU `L`/`K` and the
    /// end-of-archive blocks (see [`Tracker::entries`]).
    pub fn entries(&self) -> u64 {
        self.tar.entries()
    }

    /// fd references seen so far.
    pub fn fd_refs(&self) -> u64 {
        self.fd_refs
    }

    /// Bytes of the reconstructed tar so far (inline bytes + referenced body sizes).
    pub fn tar_bytes(&self) -> u64 {
        self.tar.offset()
    }

    /// Whether the end-of-archive zero block has been read. A stream may also end cleanly at
    /// an entry boundary without it (as Go's `archive/tar` allows); consumers that need a
    /// complete archive check this after `next_item` returned `Ok(None)`.
    pub fn saw_end_of_archive(&self) -> bool {
        self.tar.in_trailer()
    }

    /// The underlying reader. Bytes read ahead into the buffer are lost.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Make `n` unconsumed bytes available in `buf[start..]`; `Ok(false)` on EOF before that.
    /// Callers check `n` against the limits first: the buffer grows to `n`.
    fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.end - self.start < n {
            if self.buf.len() - self.start < n {
                // Not enough room after `start`: move the unread tail to the front, into a
                // bigger buffer only when `n` exceeds the current one.
                let unread = self.end - self.start;
                let want = n.max(READ_BUF_LEN);
                if self.buf.len() < want {
                    let mut bigger = vec![0u8; want];
                    bigger[..unread].copy_from_slice(&self.buf[self.start..self.end]);
                    self.buf = bigger;
                } else {
                    self.buf.copy_within(self.start..self.end, 0);
                }
                self.start = 0;
                self.end = unread;
            }
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Decode one chunk.
    fn step(&mut self) -> Result<Step, StreamError> {
        let at = self.offset;
        let io = |source| StreamError::Io { offset: at, source };
        if !self.fill(PREFIX_LEN).map_err(io)? {
            let got = self.end - self.start;
            if got > 0 {
                return Err(StreamError::TruncatedPrefix { offset: at, got });
            }
            if self.tar.at_clean_end() {
                return Ok(Step::End);
            }
            return Err(StreamError::TruncatedStream {
                offset: at,
                tar_offset: self.tar.offset(),
                position: self.tar.position(),
            });
        }
        let prefix_bytes = &self.buf[self.start..self.start + PREFIX_LEN];
        let prefix = i64::from_le_bytes(prefix_bytes.try_into().expect("PREFIX_LEN bytes"));
        self.start += PREFIX_LEN;
        self.offset += PREFIX_LEN as u64;

        if prefix >= 0 {
            let index = prefix as u64;
            if index != self.fd_refs {
                return Err(StreamError::FdIndexOutOfOrder {
                    offset: at,
                    index,
                    expected: self.fd_refs,
                });
            }
            if self.tar.file_body_start().is_none() {
                return Err(StreamError::UnexpectedFdRef {
                    offset: at,
                    index,
                    tar_offset: self.tar.offset(),
                    position: self.tar.position(),
                });
            }
            let size = self
                .tar
                .skip_file_body()
                .map_err(|source| StreamError::BadTarHeader { offset: at, source })?;
            self.fd_refs += 1;
            return Ok(Step::FdRef { index, size });
        }

        if prefix == i64::MIN {
            return Err(StreamError::BadPrefix { offset: at });
        }
        let len = prefix.unsigned_abs();
        if len > MAX_INLINE_LEN {
            return Err(StreamError::InlineTooLong { offset: at, len });
        }
        let len = len as usize; // ≤ MAX_INLINE_LEN
        if !self.fill(len).map_err(io)? {
            return Err(StreamError::TruncatedChunk {
                offset: at,
                len: len as u64,
                got: (self.end - self.start) as u64,
            });
        }
        let start = self.start;
        self.tar
            .feed(&self.buf[start..start + len])
            .map_err(|source| StreamError::BadTarHeader { offset: at, source })?;
        self.start += len;
        self.offset += len as u64;
        Ok(Step::Inline { start, len })
    }
}

/// Name of a non-regular file type, for [`StreamError::FdNotRegular`].
fn file_type_name(t: rustix::fs::FileType) -> &'static str {
    use rustix::fs::FileType;
    match t {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "file of unknown type",
    }
}

/// Check that a received content fd is a regular file of exactly `size` bytes. `index` and
/// `offset` (of the fd reference) only name the fd in errors.
///
/// # Errors
/// [`StreamError::FdNotRegular`], [`StreamError::FdSizeMismatch`], or
/// [`StreamError::FdStat`] when `fstat` fails.
pub fn check_file_fd(
    fd: BorrowedFd<'_>,
    index: u64,
    size: u64,
    offset: u64,
) -> Result<(), StreamError> {
    let st = rustix::fs::fstat(fd).map_err(|e| StreamError::FdStat {
        offset,
        index,
        source: e.into(),
    })?;
    let file_type = rustix::fs::FileType::from_raw_mode(st.st_mode);
    if file_type != rustix::fs::FileType::RegularFile {
        return Err(StreamError::FdNotRegular {
            offset,
            index,
            file_type: file_type_name(file_type),
        });
    }
    // st_size of a regular file is never negative.
    let actual = u64::try_from(st.st_size).unwrap_or(0);
    if actual != size {
        return Err(StreamError::FdSizeMismatch {
            offset,
            index,
            expected: size,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::ops::Range;
    use std::os::fd::AsFd;
    use std::path::Path;
    use std::process::Command;

    /// A piece of a tar: bytes that must travel inline, or a regular-file body that may be
    /// elided as an fd reference.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Piece {
        Inline(Range<usize>),
        Body(Range<usize>),
    }

    // ---------------------------------------------------------------------------------------
    // Reference splitter for archives written by GNU tar: whole-buffer, independent of
    // `tar::Tracker`.

    fn ref_octal(field: &[u8]) -> usize {
        let s: String = field
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| b as char)
            .collect();
        usize::from_str_radix(s.trim(), 8).expect("octal field")
    }

    fn ref_pax_size(body: &[u8]) -> Option<usize> {
        let mut rest = body;
        let mut size = None;
        while !rest.is_empty() {
            let sp = rest.iter().position(|&b| b == b' ').unwrap();
            let n: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
            let rec = &rest[sp + 1..n - 1];
            if let Some(v) = rec.strip_prefix(b"size=") {
                size = Some(std::str::from_utf8(v).unwrap().parse().unwrap());
            }
            rest = &rest[n..];
        }
        size
    }

    /// Returns the pieces and the entry count.
    fn reference_split(tar: &[u8]) -> (Vec<Piece>, u64) {
        let pad = |n: usize| n.div_ceil(512) * 512;
        let (mut off, mut from, mut entries) = (0, 0, 0);
        let mut pax_size = None;
        let mut pieces = Vec::new();
        while off + 512 <= tar.len() {
            let h = &tar[off..off + 512];
            if h.iter().all(|&b| b == 0) {
                break;
            }
            let size = ref_octal(&h[124..136]);
            let flag = h[156];
            off += 512;
            let (body, elide) = match flag {
                b'x' => {
                    pax_size = ref_pax_size(&tar[off..off + size]);
                    (size, false)
                }
                b'g' | b'L' | b'K' => (size, false),
                b'1'..=b'6' => (0, false),
                b'S' => {
                    let mut more = h[482] != 0;
                    while more {
                        more = tar[off + 504] != 0;
                        off += 512;
                    }
                    (pax_size.unwrap_or(size), true)
                }
                b'0' | b'7' => (pax_size.unwrap_or(size), true),
                _ => (pax_size.unwrap_or(size), false),
            };
            if !matches!(flag, b'x' | b'L' | b'K') {
                entries += 1;
                pax_size = None;
            }
            if elide && body > 0 {
                pieces.push(Piece::Inline(from..off));
                pieces.push(Piece::Body(off..off + body));
                from = off + body;
            }
            off += pad(body);
        }
        pieces.push(Piece::Inline(from..tar.len()));
        pieces.retain(|p| !matches!(p, Piece::Inline(r) if r.is_empty()));
        (pieces, entries)
    }

    /// Encode `pieces` with bodies as fd references; returns the stream and the bodies.
    fn encode(tar: &[u8], pieces: &[Piece]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut w = Writer::new(Vec::new());
        let mut bodies = Vec::new();
        let mut pending = Vec::new();
        for p in pieces {
            match p {
                Piece::Inline(r) => pending.extend_from_slice(&tar[r.clone()]),
                Piece::Body(r) => {
                    w.write_inline(&pending).unwrap();
                    pending.clear();
                    w.write_fd_ref(bodies.len() as u64).unwrap();
                    bodies.push(tar[r.clone()].to_vec());
                }
            }
        }
        w.write_inline(&pending).unwrap();
        (w.into_inner().unwrap(), bodies)
    }

    /// Decode a stream, rebuilding the tar from inline bytes and `bodies`.
    fn decode<'a>(
        stream: &'a [u8],
        bodies: &[Vec<u8>],
    ) -> Result<(Vec<u8>, Reader<&'a [u8]>), StreamError> {
        let mut r = Reader::new(stream);
        let mut out = Vec::new();
        while let Some(item) = r.next_item()? {
            match item {
                Item::Inline(d) => {
                    assert!(!d.is_empty() && d.len() as u64 <= MAX_INLINE_LEN);
                    out.extend_from_slice(d);
                }
                Item::FdRef { index, size } => {
                    let body = &bodies[index as usize];
                    assert_eq!(size, body.len() as u64, "fd {index}");
                    out.extend_from_slice(body);
                }
            }
        }
        Ok((out, r))
    }

    /// Split with the tracker the way a producer would (`advance` stops at each body start).
    fn tracker_split(tar: &[u8]) -> Vec<Piece> {
        let mut t = Tracker::new();
        let (mut pos, mut from) = (0, 0);
        let mut pieces = Vec::new();
        while pos < tar.len() {
            pos += t.advance(&tar[pos..]).unwrap();
            if let Some(size) = t.file_body_start() {
                pieces.push(Piece::Inline(from..pos));
                t.skip_file_body().unwrap();
                pieces.push(Piece::Body(pos..pos + size as usize));
                pos += size as usize;
                from = pos;
            }
        }
        pieces.push(Piece::Inline(from..tar.len()));
        pieces.retain(|p| !matches!(p, Piece::Inline(r) if r.is_empty()));
        pieces
    }

    fn have_tar() -> bool {
        let ok = Command::new("tar")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("skipping: no `tar` command");
        }
        ok
    }

    /// A tree with the entry kinds layers have; `long_basename` adds names GNU tar can only
    /// store with extensions.
    fn make_tree(root: &Path, long_basename: bool) {
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir(root).unwrap();
        std::fs::create_dir(root.join("dir")).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("small"), b"hello").unwrap();
        let five_k: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(root.join("five-k"), &five_k).unwrap();
        // Bigger than MAX_INLINE_LEN, so inline it spans chunks.
        let big: Vec<u8> = (0..(3 << 19) as u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(root.join("big"), &big).unwrap();
        std::fs::hard_link(root.join("five-k"), root.join("hardlink")).unwrap();
        std::os::unix::fs::symlink("five-k", root.join("symlink")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        // A long path the ustar prefix field can hold.
        let deep = root.join("d".repeat(60));
        std::fs::create_dir(&deep).unwrap();
        std::fs::write(deep.join("f".repeat(60)), b"deep").unwrap();
        // Holes: GNU tar writes old GNU sparse ('S', here with extension blocks) or PAX sparse.
        let sparse = std::fs::File::create(root.join("sparse")).unwrap();
        for i in 0..10u64 {
            rustix::io::pwrite(&sparse, b"data", i * (256 << 10)).unwrap();
        }
        if long_basename {
            std::fs::write(root.join("n".repeat(150)), b"long name").unwrap();
            std::os::unix::fs::symlink("t".repeat(150), root.join("long-target")).unwrap();
            let name = std::ffi::OsStr::from_bytes(b"caf\xe9-not-utf8");
            std::fs::write(root.join(name), b"latin-1 name").unwrap();
        }
    }

    fn run_tar(args: &[&str]) -> Vec<u8> {
        let out = Command::new("tar").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tar {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn check_real_tar(format: &str, long_basename: bool) {
        if !have_tar() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        make_tree(&root, long_basename);
        let archive = tmp.path().join("layer.tar");
        let archive_s = archive.to_str().unwrap();
        let root_s = root.to_str().unwrap();
        let format_arg = format!("--format={format}");
        let mut args = vec![
            format_arg.as_str(),
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-cf",
            archive_s,
            "-C",
            root_s,
            ".",
        ];
        if format != "ustar" {
            // ustar cannot describe holes; gnu writes 'S' entries, pax GNU.sparse records.
            args.insert(1, "--sparse");
        }
        run_tar(&args);
        let tar = std::fs::read(&archive).unwrap();
        let listed = run_tar(&["-tf", archive_s]);
        let listed = listed.iter().filter(|&&b| b == b'\n').count() as u64;

        let (pieces, entries) = reference_split(&tar);
        assert_eq!(entries, listed, "{format}: entries");
        assert_eq!(tracker_split(&tar), pieces, "{format}: tracker split");
        let (stream, bodies) = encode(&tar, &pieces);
        // small, five-k, big, deep, sparse (+ long name, non-UTF-8); no body for the empty
        // file, and none for hardlinks.
        let files = if long_basename { 7 } else { 5 };
        assert_eq!(bodies.len(), files, "{format}: bodies");
        let (out, r) = decode(&stream, &bodies).unwrap();
        assert!(out == tar, "{format}: reconstructed tar differs");
        assert_eq!(r.entries(), listed);
        assert_eq!(r.fd_refs(), bodies.len() as u64);
        assert_eq!(r.tar_bytes(), tar.len() as u64);
        assert_eq!(r.offset(), stream.len() as u64);
        assert!(r.saw_end_of_archive());

        // All inline: the writer cuts at MAX_INLINE_LEN, bodies travel as tar bytes.
        let mut w = Writer::new(Vec::new());
        w.write_inline(&tar).unwrap();
        let stream = w.into_inner().unwrap();
        assert_eq!(
            stream.len(),
            tar.len() + 8 * tar.len().div_ceil(MAX_INLINE_LEN as usize)
        );
        let (out, r) = decode(&stream, &[]).unwrap();
        assert!(out == tar);
        assert_eq!((r.entries(), r.fd_refs()), (listed, 0));
    }

    #[test]
    fn real_tar_gnu() {
        check_real_tar("gnu", true);
    }

    #[test]
    fn real_tar_pax() {
        check_real_tar("pax", true);
    }

    #[test]
    fn real_tar_ustar() {
        check_real_tar("ustar", false);
    }

    // ---------------------------------------------------------------------------------------
    // Synthetic archives for targeted cases and proptests.

    const USTAR: &[u8; 8] = b"ustar\x0000";
    const GNU: &[u8; 8] = b"ustar  \0";

    #[derive(Debug, Clone)]
    enum Size {
        Octal(u64),
        Base256(u64),
    }

    /// A small reference tar builder that records which ranges are elidable bodies.
    #[derive(Debug, Default)]
    struct Builder {
        tar: Vec<u8>,
        pieces: Vec<Piece>,
        entries: u64,
    }

    impl Builder {
        fn inline(&mut self, data: &[u8]) {
            let start = self.tar.len();
            self.tar.extend_from_slice(data);
            self.pieces.push(Piece::Inline(start..self.tar.len()));
        }

        fn header(&mut self, name: &[u8], typeflag: u8, size: Size, magic: &[u8; 8]) {
            let mut b = [0u8; 512];
            b[..name.len()].copy_from_slice(name);
            b[100..108].copy_from_slice(b"0000644\0");
            match size {
                Size::Octal(s) => b[124..136].copy_from_slice(format!("{s:011o}\0").as_bytes()),
                Size::Base256(s) => {
                    b[124] = 0x80;
                    b[128..136].copy_from_slice(&s.to_be_bytes());
                }
            }
            b[156] = typeflag;
            b[257..265].copy_from_slice(magic);
            b[148..156].fill(b' ');
            let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
            b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            if !matches!(typeflag, b'x' | b'L' | b'K') {
                self.entries += 1;
            }
            self.inline(&b);
        }

        fn body(&mut self, data: &[u8], elidable: bool) {
            if data.is_empty() {
                return;
            }
            if elidable {
                let start = self.tar.len();
                self.tar.extend_from_slice(data);
                self.pieces.push(Piece::Body(start..self.tar.len()));
            } else {
                self.inline(data);
            }
            let pad = (512 - data.len() % 512) % 512;
            self.inline(&vec![0; pad]);
        }

        fn pax(&mut self, typeflag: u8, records: &[(&str, &str)]) {
            let mut recs = Vec::new();
            for (k, v) in records {
                let body = k.len() + v.len() + 2;
                let mut n = body + 1;
                while n.to_string().len() + 1 + body != n {
                    n = n.to_string().len() + 1 + body;
                }
                recs.extend_from_slice(format!("{n} {k}={v}\n").as_bytes());
            }
            self.header(
                b"PaxHeaders/x",
                typeflag,
                Size::Octal(recs.len() as u64),
                USTAR,
            );
            self.body(&recs, false);
        }

        fn file(&mut self, name: &[u8], data: &[u8]) {
            self.header(name, b'0', Size::Octal(data.len() as u64), USTAR);
            self.body(data, true);
        }

        fn end(&mut self) {
            self.inline(&[0; 1024]);
        }
    }

    /// Stream `b`'s pieces with every body as an fd reference.
    fn stream_of(b: &Builder) -> Vec<u8> {
        encode(&b.tar, &b.pieces).0
    }

    fn read_all(stream: &[u8]) -> Result<Vec<String>, StreamError> {
        let mut r = Reader::new(stream);
        let mut items = Vec::new();
        while let Some(item) = r.next_item()? {
            items.push(match item {
                Item::Inline(d) => format!("inline {}", d.len()),
                Item::FdRef { index, size } => format!("fd {index} size {size}"),
            });
        }
        Ok(items)
    }

    fn inline_prefix(len: u64) -> [u8; 8] {
        (-(len as i64)).to_le_bytes()
    }

    #[test]
    fn writer_chunking() {
        let mut w = Writer::new(Vec::new());
        w.write_inline(b"").unwrap();
        w.flush().unwrap();
        assert!(w.into_inner().unwrap().is_empty());

        let data = vec![7u8; (2 * MAX_INLINE_LEN + 3) as usize];
        let mut w = Writer::new(Vec::new());
        w.write_inline(&data).unwrap();
        w.write_fd_ref(0).unwrap();
        w.write_fd_ref(1).unwrap();
        let err = w.write_fd_ref(3).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            "fd reference index 3 out of order, expected 2"
        );
        let out = w.into_inner().unwrap();
        let m = MAX_INLINE_LEN as usize;
        assert_eq!(&out[..8], &inline_prefix(MAX_INLINE_LEN));
        assert_eq!(&out[8 + m..16 + m], &inline_prefix(MAX_INLINE_LEN));
        assert_eq!(&out[16 + 2 * m..24 + 2 * m], &inline_prefix(3));
        assert_eq!(
            &out[27 + 2 * m..],
            &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn empty_stream_is_clean() {
        let mut r = Reader::new(&b""[..]);
        assert!(r.next_item().unwrap().is_none());
        assert!(r.next_item().unwrap().is_none());
        assert!(!r.saw_end_of_archive());
    }

    #[test]
    fn framing_errors() {
        let err = read_all(&[0xfb, 0xff, 0xff]).unwrap_err();
        assert!(matches!(
            err,
            StreamError::TruncatedPrefix { offset: 0, got: 3 }
        ));
        assert_eq!(
            err.to_string(),
            "splitfdstream ends inside the chunk prefix at offset 0 (3 of 8 bytes)"
        );
        let err = read_all(&i64::MIN.to_le_bytes()).unwrap_err();
        assert!(matches!(err, StreamError::BadPrefix { offset: 0 }));
        let err = read_all(&inline_prefix(MAX_INLINE_LEN + 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "inline chunk at offset 0 declares 1048577 bytes, limit 1048576"
        );
        let mut s = inline_prefix(16).to_vec();
        s.extend([0; 4]);
        let err = read_all(&s).unwrap_err();
        assert!(matches!(
            err,
            StreamError::TruncatedChunk {
                offset: 0,
                len: 16,
                got: 4
            }
        ));
        // The largest chunk is fine (zeros: the end of the archive).
        let mut s = inline_prefix(MAX_INLINE_LEN).to_vec();
        s.resize(8 + MAX_INLINE_LEN as usize, 0);
        assert_eq!(read_all(&s).unwrap(), ["inline 1048576"]);
    }

    #[test]
    fn fd_ref_placement() {
        let mut b = Builder::default();
        b.file(b"a", b"hello");
        b.header(b"link", b'2', Size::Octal(100), USTAR);
        b.file(b"b", &[1; 600]);
        b.end();
        let stream = stream_of(&b);
        assert_eq!(
            read_all(&stream).unwrap(),
            [
                "inline 512",
                "fd 0 size 5",
                "inline 1531",
                "fd 1 size 600",
                "inline 1448"
            ]
        );

        // A reference at the very start (a header position).
        let err = read_all(&0i64.to_le_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "fd reference 0 at offset 0 is not at the start of a regular-file body \
             (tar offset 0 is in a tar header)"
        );
        // Out of order.
        let mut s = stream[..520].to_vec();
        s.extend(1i64.to_le_bytes());
        let err = read_all(&s).unwrap_err();
        assert!(matches!(
            err,
            StreamError::FdIndexOutOfOrder {
                offset: 520,
                index: 1,
                expected: 0
            }
        ));
        // Twice for the same body: the second is in the padding.
        let mut s = stream[..528].to_vec();
        s.extend(1i64.to_le_bytes());
        let err = read_all(&s).unwrap_err();
        assert!(matches!(
            err,
            StreamError::UnexpectedFdRef {
                offset: 528,
                index: 1,
                tar_offset: 517,
                position: Position::Padding
            }
        ));
        // After a symlink header whose size field says 100: no body there.
        let mut s = stream[..528].to_vec();
        let mut w = Writer::new(Vec::new());
        w.write_inline(&b.tar[517..1536]).unwrap();
        s.extend(w.into_inner().unwrap());
        s.extend(1i64.to_le_bytes());
        let err = read_all(&s).unwrap_err();
        assert!(matches!(
            err,
            StreamError::UnexpectedFdRef {
                tar_offset: 1536,
                position: Position::Header,
                ..
            }
        ));
        // Half a body inline, then a reference: not at the body start.
        let mut s = stream[..520].to_vec();
        s.extend(inline_prefix(2));
        s.extend(b"he");
        s.extend(0i64.to_le_bytes());
        let err = read_all(&s).unwrap_err();
        assert!(matches!(
            err,
            StreamError::UnexpectedFdRef {
                offset: 530,
                tar_offset: 514,
                position: Position::FileBody,
                ..
            }
        ));
        // In the trailer.
        let mut s = inline_prefix(512).to_vec();
        s.extend([0; 512]);
        s.extend(0i64.to_le_bytes());
        let err = read_all(&s).unwrap_err();
        assert!(matches!(
            err,
            StreamError::UnexpectedFdRef {
                position: Position::Trailer,
                ..
            }
        ));
        // A body of size 0 has no reference.
        let mut b0 = Builder::default();
        b0.file(b"empty", b"");
        let mut s = stream_of(&b0);
        s.extend(0i64.to_le_bytes());
        assert!(matches!(
            read_all(&s).unwrap_err(),
            StreamError::UnexpectedFdRef {
                position: Position::Header,
                ..
            }
        ));
    }

    #[test]
    fn truncation_is_detected() {
        let mut b = Builder::default();
        b.file(b"a", b"hello");
        b.end();
        let stream = stream_of(&b);
        // Clean ends: empty, after the entry, in the trailer.
        let cuts_ok = [0, stream.len()];
        for cut in cuts_ok {
            read_all(&stream[..cut]).unwrap();
        }
        // Chunk boundaries inside the entry.
        let err = read_all(&stream[..528]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "splitfdstream ends at offset 528 inside body padding (tar offset 517)"
        );
        let err = read_all(&stream[..520]).unwrap_err();
        assert!(matches!(
            err,
            StreamError::TruncatedStream {
                offset: 520,
                tar_offset: 512,
                position: Position::FileBody
            }
        ));
        // A header cut across chunks.
        let mut w = Writer::new(Vec::new());
        w.write_inline(&b.tar[..100]).unwrap();
        let s = w.into_inner().unwrap();
        assert!(matches!(
            read_all(&s).unwrap_err(),
            StreamError::TruncatedStream {
                position: Position::Header,
                tar_offset: 100,
                ..
            }
        ));
        // An extension header without its entry.
        let mut b = Builder::default();
        b.pax(b'x', &[("path", "x")]);
        let s = stream_of(&b);
        assert!(matches!(
            read_all(&s).unwrap_err(),
            StreamError::TruncatedStream {
                position: Position::AfterExtension,
                ..
            }
        ));
        // Entry boundary without end blocks: clean (Go accepts it), but no end of archive.
        let mut b = Builder::default();
        b.file(b"a", b"hello");
        let s = stream_of(&b);
        let mut r = Reader::new(s.as_slice());
        while r.next_item().unwrap().is_some() {}
        assert!(!r.saw_end_of_archive());
    }

    #[test]
    fn bad_tar_and_poisoning() {
        let mut b = Builder::default();
        b.file(b"a", b"hello");
        let mut tar = b.tar.clone();
        tar[0] = b'b';
        let mut w = Writer::new(Vec::new());
        w.write_inline(&tar[..300]).unwrap();
        w.write_inline(&tar[300..512]).unwrap();
        let s = w.into_inner().unwrap();
        let mut r = Reader::new(s.as_slice());
        assert!(r.next_item().unwrap().is_some());
        let err = r.next_item().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid tar data in the chunk at offset 308"
        );
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "tar header at tar offset 0: checksum mismatch"
        );
        assert!(matches!(
            r.next_item().unwrap_err(),
            StreamError::Failed { offset: 308 }
        ));
    }

    #[test]
    fn pax_size_and_trailer() {
        let mut b = Builder::default();
        b.pax(b'g', &[("size", "99"), ("comment", "global")]);
        b.pax(b'x', &[("size", "700"), ("mtime", "1.5")]);
        b.header(b"big", b'0', Size::Octal(0), USTAR);
        b.body(&[3; 700], true);
        b.header(b"huge", b'0', Size::Base256(513), GNU);
        b.body(&[4; 513], true);
        b.end();
        b.inline(b"trailing bytes tar-split keeps");
        let (stream, bodies) = encode(&b.tar, &b.pieces);
        let (out, r) = decode(&stream, &bodies).unwrap();
        assert_eq!(out, b.tar);
        assert_eq!((r.entries(), r.fd_refs()), (3, 2));
    }

    /// A ustar header for a regular file whose size field is base-256 `size`.
    fn base256_header(name: &[u8], size: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
        h[156] = b'0';
        h[257..265].copy_from_slice(USTAR);
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&x| u32::from(x)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    /// Two regular files of 2^63 - 1 bytes (the largest base-256 size), each body an fd
    /// reference: 1,065 bytes of stream. The second body would end past tar offset 2^64 - 1;
    /// the reader says so instead of overflowing (a panic with overflow checks, a wrapped
    /// offset without).
    #[test]
    fn bodies_past_2_pow_64_are_an_error() {
        let size = i64::MAX as u64;
        let mut stream = Vec::new();
        stream.extend_from_slice(&(-512i64).to_le_bytes());
        stream.extend_from_slice(&base256_header(b"a", size));
        stream.extend_from_slice(&0i64.to_le_bytes());
        // One byte pads the first body to 2^63 bytes.
        stream.extend_from_slice(&(-1i64).to_le_bytes());
        stream.push(0);
        let second = stream.len() as u64;
        stream.extend_from_slice(&(-512i64).to_le_bytes());
        stream.extend_from_slice(&base256_header(b"b", size));
        stream.extend_from_slice(&1i64.to_le_bytes());
        assert_eq!(stream.len(), 1065);

        let mut r = Reader::new(stream.as_slice());
        assert!(matches!(r.next_item(), Ok(Some(Item::Inline(h))) if h.len() == 512));
        assert_eq!(r.next_item().unwrap(), Some(Item::FdRef { index: 0, size }));
        assert!(matches!(r.next_item(), Ok(Some(Item::Inline([0])))));
        let err = r.next_item().unwrap_err();
        let tar_offset = size + 513;
        match &err {
            StreamError::BadTarHeader {
                offset,
                source:
                    TarError::SizeOverflow {
                        offset: at,
                        size: s,
                    },
            } => assert_eq!((*offset, *at, *s), (second, tar_offset, size)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            format!(
                "tar entry at tar offset {tar_offset}: a body of {size} bytes would end past \
                 the largest tar offset (2^64 - 1)"
            )
        );
        assert!(matches!(
            r.next_item().unwrap_err(),
            StreamError::Failed { offset } if offset == second
        ));
    }

    /// An entry that ends just below tar offset 2^64 - 1 is fine; the end-of-archive blocks
    /// after it are not.
    #[test]
    fn trailer_past_2_pow_64_is_an_error() {
        let size = i64::MAX as u64;
        let mut w = Writer::new(Vec::new());
        w.write_inline(&base256_header(b"a", size)).unwrap();
        w.write_fd_ref(0).unwrap();
        w.write_inline(&[0]).unwrap();
        // Its body ends at u64::MAX - 512, its one byte of padding at u64::MAX - 511.
        w.write_inline(&base256_header(b"b", size - 1536)).unwrap();
        w.write_fd_ref(1).unwrap();
        w.write_inline(&[0u8; 1024]).unwrap();
        let stream = w.into_inner().unwrap();
        let mut r = Reader::new(stream.as_slice());
        for _ in 0..5 {
            r.next_item().unwrap().unwrap();
        }
        assert_eq!(r.tar_bytes(), u64::MAX - 512);
        match r.next_item().unwrap_err() {
            StreamError::BadTarHeader {
                source: TarError::OffsetOverflow { offset, len },
                ..
            } => assert_eq!((offset, len), (u64::MAX - 511, 512)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn check_file_fd_kinds() {
        let memfd = rustix::fs::memfd_create("body", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&memfd, 5).unwrap();
        check_file_fd(memfd.as_fd(), 0, 5, 520).unwrap();
        let err = check_file_fd(memfd.as_fd(), 3, 6, 520).unwrap_err();
        assert_eq!(
            err.to_string(),
            "content fd 3 (fd reference at offset 520) has 5 bytes, the tar header says 6"
        );
        let (rd, _wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let err = check_file_fd(rd.as_fd(), 1, 5, 8).unwrap_err();
        assert_eq!(
            err.to_string(),
            "content fd 1 (fd reference at offset 8) is a FIFO, not a regular file"
        );
        let dir = tempfile::tempdir().unwrap();
        let dirfd = std::fs::File::open(dir.path()).unwrap();
        assert!(matches!(
            check_file_fd(dirfd.as_fd(), 0, 0, 0).unwrap_err(),
            StreamError::FdNotRegular {
                file_type: "directory",
                ..
            }
        ));
    }

    // ---------------------------------------------------------------------------------------
    // Property tests.

    #[derive(Debug, Clone)]
    enum Spec {
        File {
            size: usize,
            typeflag: u8,
            pax_size: bool,
            long_name: bool,
            base256: bool,
        },
        HeaderOnly {
            typeflag: u8,
            size_field: u64,
        },
        OldDir {
            size_field: u64,
        },
        Data {
            size: usize,
        },
        Global,
        LongLink,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        let size = prop_oneof![0usize..3, 1usize..1100, 510usize..515];
        prop_oneof![
            4 => (size.clone(), prop::sample::select(vec![b'0', 0, b'7']), any::<bool>(),
                  any::<bool>(), any::<bool>())
                .prop_map(|(size, typeflag, pax_size, long_name, base256)| Spec::File {
                    size, typeflag, pax_size, long_name, base256
                }),
            1 => (b'1'..=b'6', 0u64..5000)
                .prop_map(|(typeflag, size_field)| Spec::HeaderOnly { typeflag, size_field }),
            1 => (0u64..5000).prop_map(|size_field| Spec::OldDir { size_field }),
            1 => size.prop_map(|size| Spec::Data { size }),
            1 => Just(Spec::Global),
            1 => Just(Spec::LongLink),
        ]
    }

    fn build(specs: &[Spec], trailing: &[u8]) -> Builder {
        let mut b = Builder::default();
        for (i, s) in specs.iter().enumerate() {
            let data: Vec<u8> = (0..5000).map(|j| (i * 31 + j * 7) as u8).collect();
            match *s {
                Spec::File {
                    size,
                    typeflag,
                    pax_size,
                    long_name,
                    base256,
                } => {
                    if long_name {
                        b.header(b"././@LongLink", b'L', Size::Octal(151), GNU);
                        let mut name = vec![b'n'; 150];
                        name.push(0);
                        b.body(&name, false);
                    }
                    let field = if pax_size {
                        b.pax(b'x', &[("size", &size.to_string()), ("path", "p")]);
                        0
                    } else {
                        size as u64
                    };
                    let field = if base256 {
                        Size::Base256(field)
                    } else {
                        Size::Octal(field)
                    };
                    b.header(b"file", typeflag, field, USTAR);
                    b.body(&data[..size], true);
                }
                Spec::HeaderOnly {
                    typeflag,
                    size_field,
                } => b.header(b"special", typeflag, Size::Octal(size_field), USTAR),
                Spec::OldDir { size_field } => b.header(b"dir/", 0, Size::Octal(size_field), USTAR),
                Spec::Data { size } => {
                    b.header(b"dumpdir", b'D', Size::Octal(size as u64), GNU);
                    b.body(&data[..size], false);
                }
                Spec::Global => b.pax(b'g', &[("size", "1234"), ("comment", "g")]),
                Spec::LongLink => {
                    b.header(b"././@LongLink", b'K', Size::Octal(5), GNU);
                    b.body(b"tgt\0\0", false);
                }
            }
        }
        b.end();
        b.inline(trailing);
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any archive, cut into any inline chunks, each body inline or as a reference, reads
        /// back as exactly the chunks written, and rebuilds the archive.
        #[test]
        fn round_trip(
            specs in prop::collection::vec(spec(), 0..8),
            trailing in prop::collection::vec(any::<u8>(), 0..40),
            cuts in prop::collection::vec(1usize..1500, 1..8),
            as_fd in prop::collection::vec(any::<bool>(), 1..8),
        ) {
            let b = build(&specs, &trailing);
            let mut w = Writer::new(Vec::new());
            let mut expect = Vec::new();
            let mut bodies = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            let (mut cut_i, mut body_i) = (0, 0);
            let mut flush = |pending: &mut Vec<u8>, w: &mut Writer<Vec<u8>>, expect: &mut Vec<String>| {
                let mut rest = &pending[..];
                while !rest.is_empty() {
                    let n = cuts[cut_i % cuts.len()].min(rest.len());
                    cut_i += 1;
                    w.write_inline(&rest[..n]).unwrap();
                    expect.push(format!("inline {n}"));
                    rest = &rest[n..];
                }
                pending.clear();
            };
            for p in &b.pieces {
                match p {
                    Piece::Inline(r) => pending.extend_from_slice(&b.tar[r.clone()]),
                    Piece::Body(r) => {
                        body_i += 1;
                        if as_fd[body_i % as_fd.len()] {
                            flush(&mut pending, &mut w, &mut expect);
                            expect.push(format!("fd {} size {}", bodies.len(), r.len()));
                            w.write_fd_ref(bodies.len() as u64).unwrap();
                            bodies.push(b.tar[r.clone()].to_vec());
                        } else {
                            pending.extend_from_slice(&b.tar[r.clone()]);
                        }
                    }
                }
            }
            flush(&mut pending, &mut w, &mut expect);
            let stream = w.into_inner().unwrap();
            prop_assert_eq!(read_all(&stream).unwrap(), expect);
            let (out, r) = decode(&stream, &bodies).unwrap();
            prop_assert!(out == b.tar);
            prop_assert_eq!(r.entries(), b.entries);
            prop_assert_eq!(r.fd_refs(), bodies.len() as u64);
            prop_assert_eq!(r.tar_bytes(), b.tar.len() as u64);
            prop_assert!(r.saw_end_of_archive());
        }

        /// Garbage never panics; the reader ends with an error or a clean end.
        #[test]
        fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = read_all(&data);
        }

        /// Corrupted and truncated valid streams never panic, and stop at the first error.
        #[test]
        fn mutations_never_panic(
            specs in prop::collection::vec(spec(), 0..6),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let b = build(&specs, b"");
            let mut stream = stream_of(&b);
            for (at, byte) in &flips {
                let i = at.index(stream.len());
                stream[i] = *byte;
            }
            stream.truncate(cut.index(stream.len() + 1));
            let mut r = Reader::new(stream.as_slice());
            loop {
                match r.next_item() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        let poisoned = matches!(r.next_item(), Err(StreamError::Failed { .. }));
                        prop_assert!(poisoned);
                        break;
                    }
                }
            }
            prop_assert!(r.offset() <= stream.len() as u64);
        }
    }
}
