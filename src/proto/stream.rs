//! The splitfdstream codec (spec: `proto/splitfdstream.md`). STUB: API contract only.
#![allow(missing_docs, unused)]
use std::io::{Read, Write};
use std::os::fd::BorrowedFd;

/// Largest inline chunk a writer emits and a reader accepts (1 MiB).
pub const MAX_INLINE_LEN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("reading splitfdstream at offset {offset}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Streaming writer. Buffers internally; `flush` pushes everything written so far.
#[derive(Debug)]
pub struct Writer<W: Write> {
    inner: W,
}
impl<W: Write> Writer<W> {
    pub fn new(inner: W) -> Self {
        todo!()
    }
    /// Append inline bytes (split into chunks of at most MAX_INLINE_LEN; empty input writes nothing).
    pub fn write_inline(&mut self, data: &[u8]) -> std::io::Result<()> {
        todo!()
    }
    /// Append a reference to content fd `index` (the n-th reference must have index n).
    pub fn write_fd_ref(&mut self, index: u64) -> std::io::Result<()> {
        todo!()
    }
    pub fn flush(&mut self) -> std::io::Result<()> {
        todo!()
    }
    pub fn into_inner(self) -> std::io::Result<W> {
        todo!()
    }
}

/// One item read from a stream.
#[derive(Debug)]
pub enum Item<'a> {
    /// Inline bytes (a borrowed view of the reader's buffer).
    Inline(&'a [u8]),
    /// Reference to content fd `index`; the tar header says the body is `size` bytes.
    FdRef { index: u64, size: u64 },
}

/// Streaming, tar-aware reader.
#[derive(Debug)]
pub struct Reader<R: Read> {
    inner: R,
}
impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        todo!()
    }
    /// Next item; `Ok(None)` only at a clean end (at a tar entry boundary or after the end blocks).
    pub fn next_item(&mut self) -> Result<Option<Item<'_>>, StreamError> {
        todo!()
    }
    /// The bytes of the most recent `Item::Inline` (empty before any).
    pub fn last_inline(&self) -> &[u8] {
        todo!()
    }
    /// Byte offset in the splitfdstream of the next chunk prefix.
    pub fn offset(&self) -> u64 {
        todo!()
    }
    /// tar entries (headers) seen so far.
    pub fn entries(&self) -> u64 {
        todo!()
    }
    /// fd references seen so far.
    pub fn fd_refs(&self) -> u64 {
        todo!()
    }
    /// Bytes of the reconstructed tar so far (inline bytes + referenced body sizes).
    pub fn tar_bytes(&self) -> u64 {
        todo!()
    }
}

/// Check that a received content fd is a regular file of exactly `size` bytes.
pub fn check_file_fd(
    fd: BorrowedFd<'_>,
    index: u64,
    size: u64,
    offset: u64,
) -> Result<(), StreamError> {
    todo!()
}
