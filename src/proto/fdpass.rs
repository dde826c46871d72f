//! jsonrpc-fdpass transport: JSON-RPC 2.0 messages carrying file descriptors over an `AF_UNIX`
//! `SOCK_STREAM` socket. The normative description is `proto/rpc.md`, section "Transport".
//!
//! In short:
//! - Messages are self-delimiting JSON objects, back to back; whitespace between them is skipped.
//!   [`Framer`] finds their ends in one pass over the bytes.
//! - A top-level `"fds": N` says that the next N descriptors of the connection's fd FIFO belong
//!   to the message. Descriptors travel as `SCM_RIGHTS` with the message's bytes; more than
//!   [`MAX_FDS_PER_SENDMSG`] go in continuation `sendmsg` calls whose payload is one space byte,
//!   all before the first byte of the next message.
//! - Every framing or descriptor-count error is fatal for the connection (JSON-RPC code
//!   [`FRAMING`](crate::proto::rpc::code::FRAMING)); the receiver then closes every queued fd.
//!
//! ```
//! use splitfdstream::proto::fdpass::Transport;
//! use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
//! use std::os::fd::AsFd;
//!
//! let (a, b) = socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
//! let (mut a, mut b) = (Transport::new(a), Transport::new(b));
//! let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
//! a.send(&serde_json::json!({"jsonrpc": "2.0", "method": "m"}), &[r.as_fd(), w.as_fd()])?;
//! let (msg, fds) = b.recv()?.expect("a message");
//! assert_eq!(msg, serde_json::json!({"jsonrpc": "2.0", "method": "m"})); // "fds" consumed
//! assert_eq!(fds.len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use super::rpc;

/// Most fds one `sendmsg` carries: Linux's `SCM_MAX_FD`. The kernel refuses more with `EINVAL`,
/// and the receive side sizes its control buffer for exactly this many.
#[doc(alias = "SCM_MAX_FD")]
pub const MAX_FDS_PER_SENDMSG: usize = 253;

/// Largest message accepted or sent, in bytes. A peer that never closes its object would
/// otherwise make the receiver buffer without bound; the largest legitimate message (an
/// `OpenImage` result with manifest and config) is far below this.
pub const MAX_MESSAGE_LEN: usize = 16 << 20;

/// Top-level key holding a message's fd count.
pub const FDS_KEY: &str = "fds";

/// Bytes read per `recvmsg`: large enough that a typical message is one call, small enough to
/// keep per-connection memory trivial.
const RECV_CHUNK_LEN: usize = 64 << 10;

/// Payload of a continuation `sendmsg` (fds only): one JSON whitespace byte, because the kernel
/// does not deliver `SCM_RIGHTS` on a stream socket without at least one data byte.
const CONTINUATION_PAYLOAD: &[u8] = b" ";

/// Extra bytes for control buffers: rustix aligns the buffer start for `cmsghdr`, which can
/// skip up to this many bytes of an unaligned `Vec<MaybeUninit<u8>>`.
const CMSG_ALIGN_SLACK: usize = std::mem::align_of::<usize>();

/// Why a byte stream is not a sequence of jsonrpc-fdpass messages. Offsets count from the first
/// byte the [`Framer`] was given.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// A message must be a JSON object.
    #[error("message at byte offset {offset} starts with byte {byte:#04x}, not '{{'")]
    NotAnObject {
        /// Stream offset of the offending byte.
        offset: u64,
        /// The byte found.
        byte: u8,
    },
    /// The message grew past the size limit before it ended.
    #[error("message at byte offset {offset} exceeds {limit} bytes")]
    TooLarge {
        /// Stream offset of the message's first byte.
        offset: u64,
        /// The limit in bytes.
        limit: usize,
    },
    /// The delimited bytes are not valid JSON.
    #[error("message at byte offset {offset} is not valid JSON")]
    InvalidJson {
        /// Stream offset of the message's first byte.
        offset: u64,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
}

/// Incremental splitter of a byte stream into JSON objects.
///
/// Each byte is scanned once: the framer tracks string, escape and nesting state across
/// [`push`](Self::push) calls, so a message arriving in many small reads costs linear time
/// (re-parsing the buffer from its start after each read would be quadratic). Only a complete
/// message is handed to `serde_json`, which validates it. After an error the stream cannot be
/// resynchronised; discard the framer.
#[derive(Debug)]
pub struct Framer {
    /// Bytes not yet returned as messages (and not skipped as whitespace).
    buf: Vec<u8>,
    /// Index in `buf` of the current message's first byte; equals `pos` between messages.
    start: usize,
    /// Index in `buf` of the next byte to scan.
    pos: usize,
    /// Open `{`/`[` outside strings; 0 = between messages.
    depth: usize,
    /// Inside a JSON string.
    in_string: bool,
    /// The previous byte was a backslash inside a string.
    escaped: bool,
    /// Stream offset of `buf[0]`.
    base: u64,
    /// Stream offset of the last message returned.
    last_offset: u64,
    /// Size limit per message.
    max_message_len: usize,
}

/// JSON insignificant whitespace (RFC 8259 §2).
fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Framer {
    /// A framer refusing messages longer than `max_message_len` bytes.
    pub fn new(max_message_len: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            start: 0,
            pos: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            base: 0,
            last_offset: 0,
            max_message_len,
        }
    }

    /// Append received bytes.
    pub fn push(&mut self, data: &[u8]) {
        // Drop what earlier messages consumed; this moves at most one partial message and
        // happens once per push, so it stays linear overall.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.base += self.start as u64;
            self.pos -= self.start;
            self.start = 0;
        }
        let mut data = data;
        if self.depth == 0 && self.buf.is_empty() {
            // Between messages: whitespace (e.g. continuation payloads) never needs buffering.
            let ws = data.iter().take_while(|&&b| is_json_ws(b)).count();
            self.base += ws as u64;
            data = &data[ws..];
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, or `None` until more bytes are pushed.
    ///
    /// # Errors
    /// A message that is not a JSON object, exceeds the size limit or is not valid JSON.
    pub fn next_message(&mut self) -> Result<Option<serde_json::Value>, FramingError> {
        while self.pos < self.buf.len() {
            if self.depth == 0 {
                let b = self.buf[self.pos];
                if is_json_ws(b) {
                    self.pos += 1;
                    self.start = self.pos;
                    continue;
                }
                if b != b'{' {
                    return Err(FramingError::NotAnObject {
                        offset: self.offset(self.pos),
                        byte: b,
                    });
                }
                self.start = self.pos;
                self.pos += 1;
                self.depth = 1;
                continue;
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    self.pos += 1;
                    continue;
                }
                // Skip ordinary string bytes in bulk: only a quote or backslash matters here.
                let rest = &self.buf[self.pos..];
                match rest.iter().position(|&b| b == b'"' || b == b'\\') {
                    None => self.pos = self.buf.len(),
                    Some(i) => {
                        if rest[i] == b'"' {
                            self.in_string = false;
                        } else {
                            self.escaped = true;
                        }
                        self.pos += i + 1;
                    }
                }
                continue;
            }
            let b = self.buf[self.pos];
            self.pos += 1;
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return self.finish().map(Some);
                    }
                }
                _ => {}
            }
        }
        if self.depth > 0 && self.pos - self.start > self.max_message_len {
            return Err(self.too_large());
        }
        Ok(None)
    }

    /// True while bytes of an unfinished (or not yet scanned) message are buffered. Whitespace
    /// between messages does not count.
    pub fn has_pending_bytes(&self) -> bool {
        self.depth > 0 || self.pos < self.buf.len()
    }

    /// Stream offset of the first byte of the message last returned by
    /// [`next_message`](Self::next_message).
    pub fn message_offset(&self) -> u64 {
        self.last_offset
    }

    /// Stream offset of the first pending byte (the unfinished message, if any).
    pub fn pending_offset(&self) -> u64 {
        self.offset(self.start)
    }

    fn offset(&self, index: usize) -> u64 {
        self.base + index as u64
    }

    fn too_large(&self) -> FramingError {
        FramingError::TooLarge {
            offset: self.offset(self.start),
            limit: self.max_message_len,
        }
    }

    /// The message `buf[start..pos]` just closed: parse it and skip the whitespace after it.
    fn finish(&mut self) -> Result<serde_json::Value, FramingError> {
        if self.pos - self.start > self.max_message_len {
            return Err(self.too_large());
        }
        let offset = self.offset(self.start);
        let parsed = serde_json::from_slice(&self.buf[self.start..self.pos]);
        while self.pos < self.buf.len() && is_json_ws(self.buf[self.pos]) {
            self.pos += 1;
        }
        self.start = self.pos;
        self.last_offset = offset;
        parsed.map_err(|source| FramingError::InvalidJson { offset, source })
    }
}

/// Errors of a [`Transport`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// `sendmsg`/`recvmsg` failed (a dead peer shows as `EPIPE` or `ECONNRESET`).
    #[error("jsonrpc-fdpass socket I/O")]
    Io(#[source] std::io::Error),
    /// The `wait` callback of [`Transport::recv_with`] failed.
    #[error("waiting for the jsonrpc-fdpass socket")]
    Wait(#[source] std::io::Error),
    /// The byte stream is not a sequence of JSON objects.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// A message's `"fds"` is not a non-negative integer.
    #[error("message at byte offset {offset} has \"fds\": {value}, not a count")]
    InvalidFdCount {
        /// Stream offset of the message.
        offset: u64,
        /// The value found, as JSON.
        value: String,
    },
    /// A message's fds did not arrive before the next message's bytes or the end of stream.
    #[error(
        "message at byte offset {offset} announces {expected} fds, but only {received} arrived \
         before {before} (mismatched count)"
    )]
    MismatchedCount {
        /// Stream offset of the message.
        offset: u64,
        /// Its `"fds"` value.
        expected: usize,
        /// fds queued when the mismatch was detected.
        received: usize,
        /// `"the next message"` or `"end of stream"`.
        before: &'static str,
    },
    /// The peer closed the connection with fds no message claimed.
    #[error("end of stream with {count} fds that no message claimed")]
    UnclaimedFds {
        /// Number of such fds.
        count: usize,
    },
    /// The kernel dropped fds (`MSG_CTRUNC`), typically because this process hit
    /// `RLIMIT_NOFILE`.
    #[error(
        "recvmsg dropped fds (MSG_CTRUNC) after installing {installed}; is RLIMIT_NOFILE too low?"
    )]
    FdsTruncated {
        /// fds that did arrive in that `recvmsg`.
        installed: usize,
    },
    /// The peer closed the connection in the middle of a message.
    #[error("end of stream inside the message at byte offset {offset}")]
    UnexpectedEof {
        /// Stream offset of the unfinished message.
        offset: u64,
    },
    /// An earlier fatal error ended this connection's receive side.
    #[error("connection already failed with a framing error")]
    Failed,
    /// [`Transport::send`] was given something other than a JSON object.
    #[error("only JSON objects can be sent as messages")]
    NotAnObject,
    /// [`Transport::send`] was given a message the peer would refuse as too large.
    #[error("message of {len} bytes exceeds the {MAX_MESSAGE_LEN}-byte limit")]
    MessageTooLarge {
        /// Encoded size.
        len: usize,
    },
}

impl TransportError {
    /// True for fatal framing/fd errors (JSON-RPC code -32050).
    pub fn is_framing(&self) -> bool {
        matches!(
            self,
            Self::Framing(_)
                | Self::InvalidFdCount { .. }
                | Self::MismatchedCount { .. }
                | Self::UnclaimedFds { .. }
                | Self::FdsTruncated { .. }
                | Self::UnexpectedEof { .. }
                | Self::Failed
        )
    }

    /// The JSON-RPC error code a peer is told about a fatal receive error before the
    /// connection closes: [`PARSE_ERROR`](rpc::code::PARSE_ERROR) for invalid JSON,
    /// [`FRAMING`](rpc::code::FRAMING) for the other framing errors, `None` for the rest.
    pub fn rpc_code(&self) -> Option<i64> {
        match self {
            Self::Framing(FramingError::InvalidJson { .. }) => Some(rpc::code::PARSE_ERROR),
            e if e.is_framing() => Some(rpc::code::FRAMING),
            _ => None,
        }
    }
}

/// A parsed message waiting for its fds.
#[derive(Debug)]
struct Pending {
    value: serde_json::Value,
    fds: usize,
    offset: u64,
}

/// One end of a jsonrpc-fdpass connection (blocking). Owned by one thread.
///
/// The socket must be a blocking `AF_UNIX` `SOCK_STREAM` socket.
pub struct Transport {
    sock: OwnedFd,
    framer: Framer,
    /// Received fds not yet handed out, in arrival order.
    fds: VecDeque<OwnedFd>,
    pending: Option<Pending>,
    /// Current fds per `sendmsg`; lowered for good when the kernel says `EINVAL`.
    send_batch: usize,
    recv_buf: Vec<u8>,
    cmsg_buf: Vec<MaybeUninit<u8>>,
    failed: bool,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("sock", &self.sock)
            .field("queued_fds", &self.fds.len())
            .field("pending", &self.pending)
            .field("send_batch", &self.send_batch)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Wrap a connected socket.
    pub fn new(sock: OwnedFd) -> Self {
        Self {
            sock,
            framer: Framer::new(MAX_MESSAGE_LEN),
            fds: VecDeque::new(),
            pending: None,
            send_batch: MAX_FDS_PER_SENDMSG,
            recv_buf: vec![0; RECV_CHUNK_LEN],
            cmsg_buf: vec![
                MaybeUninit::uninit();
                rustix::cmsg_space!(ScmRights(MAX_FDS_PER_SENDMSG)) + CMSG_ALIGN_SLACK
            ],
            failed: false,
        }
    }

    /// Send one message (a JSON object); sets its top-level `"fds"` to `fds.len()` when
    /// non-zero and leaves any `"fds"` out otherwise.
    ///
    /// Sent with `MSG_NOSIGNAL`, so a closed peer is an `EPIPE` error, never `SIGPIPE`.
    ///
    /// # Errors
    /// [`TransportError::Io`] from `sendmsg`; [`TransportError::NotAnObject`] and
    /// [`TransportError::MessageTooLarge`] for messages the peer must refuse.
    pub fn send(
        &mut self,
        msg: &serde_json::Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let data = encode(msg, fds.len())?;
        let mut sent_bytes = 0;
        let mut sent_fds = 0;
        // The first batch rides with the message's bytes; the rest follow in continuation
        // calls, all before anything else is sent on this socket.
        while sent_bytes < data.len() || sent_fds < fds.len() {
            let batch = &fds[sent_fds..fds.len().min(sent_fds + self.send_batch)];
            let payload = if sent_bytes < data.len() {
                &data[sent_bytes..]
            } else {
                CONTINUATION_PAYLOAD
            };
            match self.sendmsg(payload, batch) {
                Ok(0) => {
                    return Err(TransportError::Io(std::io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => {
                    if sent_bytes < data.len() {
                        sent_bytes += n;
                    }
                    // A partial send still carried the whole batch (the kernel attaches it
                    // to the first byte).
                    sent_fds += batch.len();
                }
                Err(Errno::INTR) => {}
                // Some kernels carry fewer fds per call than SCM_MAX_FD; nothing was sent, so
                // retry with half and keep that size for the rest of the connection.
                Err(Errno::INVAL) if batch.len() > 1 => self.send_batch = batch.len() / 2,
                Err(e) => return Err(TransportError::Io(e.into())),
            }
        }
        Ok(())
    }

    fn sendmsg(&mut self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> rustix::io::Result<usize> {
        let iov = [IoSlice::new(payload)];
        if fds.is_empty() {
            return rustix::net::sendmsg(
                &self.sock,
                &iov,
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            );
        }
        let space = rustix::cmsg_space!(ScmRights(fds.len())) + CMSG_ALIGN_SLACK;
        if self.cmsg_buf.len() < space {
            self.cmsg_buf.resize(space, MaybeUninit::uninit());
        }
        let mut control = SendAncillaryBuffer::new(&mut self.cmsg_buf);
        let pushed = control.push(SendAncillaryMessage::ScmRights(fds));
        assert!(pushed, "control buffer was sized for this batch");
        rustix::net::sendmsg(&self.sock, &iov, &mut control, SendFlags::NOSIGNAL)
    }

    /// Receive one message and its fds. `Ok(None)` = peer closed cleanly between messages.
    ///
    /// The returned message no longer has its `"fds"` key: the fds are the `Vec`, in order.
    ///
    /// # Errors
    /// Errors for which [`TransportError::is_framing`] is true are fatal: every queued fd is
    /// closed and later calls fail with [`TransportError::Failed`].
    pub fn recv(&mut self) -> Result<Option<(serde_json::Value, Vec<OwnedFd>)>, TransportError> {
        self.recv_with(&mut |_| Ok(()))
    }

    /// Like `recv`, but calls `wait(socket)` before each blocking `recvmsg`, so the caller can
    /// poll the socket together with something else (a child's pidfd) and return an error.
    ///
    /// # Errors
    /// As [`recv`](Self::recv), plus [`TransportError::Wait`] with `wait`'s error (not fatal).
    pub fn recv_with(
        &mut self,
        wait: &mut dyn FnMut(BorrowedFd<'_>) -> std::io::Result<()>,
    ) -> Result<Option<(serde_json::Value, Vec<OwnedFd>)>, TransportError> {
        if self.failed {
            return Err(TransportError::Failed);
        }
        let result = self.recv_inner(wait);
        if let Err(e) = &result
            && e.is_framing()
        {
            self.failed = true;
            self.pending = None;
            // Closing them matters: they may be pipe ends or locks the peer waits on.
            self.fds.clear();
            self.framer = Framer::new(0);
        }
        result
    }

    fn recv_inner(
        &mut self,
        wait: &mut dyn FnMut(BorrowedFd<'_>) -> std::io::Result<()>,
    ) -> Result<Option<(serde_json::Value, Vec<OwnedFd>)>, TransportError> {
        loop {
            if let Some(ready) = self.take_ready()? {
                return Ok(Some(ready));
            }
            wait(self.sock.as_fd()).map_err(TransportError::Wait)?;
            let (bytes, flags, installed) = {
                let mut iov = [IoSliceMut::new(&mut self.recv_buf)];
                let mut control = RecvAncillaryBuffer::new(&mut self.cmsg_buf);
                let received = loop {
                    match rustix::net::recvmsg(
                        &self.sock,
                        &mut iov,
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC,
                    ) {
                        Ok(r) => break r,
                        Err(Errno::INTR) => {}
                        Err(e) => return Err(TransportError::Io(e.into())),
                    }
                };
                let before = self.fds.len();
                for msg in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(fds) = msg {
                        self.fds.extend(fds);
                    }
                }
                (received.bytes, received.flags, self.fds.len() - before)
            };
            if flags.contains(ReturnFlags::CTRUNC) {
                return Err(TransportError::FdsTruncated { installed });
            }
            if bytes == 0 {
                return self.end_of_stream();
            }
            self.framer.push(&self.recv_buf[..bytes]);
        }
    }

    /// The next message whose fds have all arrived, if any.
    fn take_ready(&mut self) -> Result<Option<(serde_json::Value, Vec<OwnedFd>)>, TransportError> {
        let pending = match self.pending.take() {
            Some(pending) => pending,
            None => {
                let Some(mut value) = self.framer.next_message()? else {
                    return Ok(None);
                };
                let offset = self.framer.message_offset();
                let obj = value
                    .as_object_mut()
                    .expect("the framer only yields objects");
                let fds = match obj.remove(FDS_KEY) {
                    None => 0,
                    Some(n) => n
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| TransportError::InvalidFdCount {
                            offset,
                            value: n.to_string(),
                        })?,
                };
                Pending { value, fds, offset }
            }
        };
        if self.fds.len() >= pending.fds {
            let fds = self.fds.drain(..pending.fds).collect();
            return Ok(Some((pending.value, fds)));
        }
        if self.framer.has_pending_bytes() {
            return Err(TransportError::MismatchedCount {
                offset: pending.offset,
                expected: pending.fds,
                received: self.fds.len(),
                before: "the next message",
            });
        }
        self.pending = Some(pending);
        Ok(None)
    }

    fn end_of_stream(
        &mut self,
    ) -> Result<Option<(serde_json::Value, Vec<OwnedFd>)>, TransportError> {
        if let Some(pending) = &self.pending {
            return Err(TransportError::MismatchedCount {
                offset: pending.offset,
                expected: pending.fds,
                received: self.fds.len(),
                before: "end of stream",
            });
        }
        if self.framer.has_pending_bytes() {
            return Err(TransportError::UnexpectedEof {
                offset: self.framer.pending_offset(),
            });
        }
        if !self.fds.is_empty() {
            return Err(TransportError::UnclaimedFds {
                count: self.fds.len(),
            });
        }
        Ok(None)
    }
}

impl AsFd for Transport {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Serialise `msg` with `"fds": nfds` (or without `"fds"` when zero), without cloning it.
fn encode(msg: &serde_json::Value, nfds: usize) -> Result<Vec<u8>, TransportError> {
    let obj = msg.as_object().ok_or(TransportError::NotAnObject)?;
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    for (key, value) in obj.iter().filter(|(k, _)| *k != FDS_KEY) {
        if out.len() > 1 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key).expect("strings serialise into memory");
        out.push(b':');
        serde_json::to_writer(&mut out, value).expect("JSON values serialise into memory");
    }
    if nfds > 0 {
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(format!("\"{FDS_KEY}\":{nfds}").as_bytes());
    }
    out.push(b'}');
    if out.len() > MAX_MESSAGE_LEN {
        return Err(TransportError::MessageTooLarge { len: out.len() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{MemfdFlags, memfd_create};
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    use serde_json::json;
    use std::io::{Read, Seek, Write};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair")
    }

    fn memfd(content: &str) -> OwnedFd {
        let fd = memfd_create("fdpass-test", MemfdFlags::CLOEXEC).expect("memfd_create");
        let mut f = std::fs::File::from(fd);
        f.write_all(content.as_bytes()).expect("write memfd");
        f.into()
    }

    fn read_fd(fd: OwnedFd) -> String {
        let mut f = std::fs::File::from(fd);
        f.rewind().expect("rewind");
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read");
        s
    }

    /// Send raw bytes with fds, bypassing `Transport::send`, to craft protocol violations.
    fn raw_send(sock: &OwnedFd, data: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len())) + 8];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let n = rustix::net::sendmsg(
            sock,
            &[IoSlice::new(data)],
            &mut control,
            SendFlags::empty(),
        )
        .expect("sendmsg");
        assert_eq!(n, data.len());
    }

    fn frame_all(framer: &mut Framer) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Some(v) = framer.next_message().expect("valid stream") {
            out.push(v);
        }
        out
    }

    #[test]
    fn framer_splits_at_every_boundary() {
        let stream = concat!(
            " \n{\"a\":\"}{[\\\"\\\\\",\"b\":[1,{\"c\":null}]}\t\r\n",
            "{\"s\":\"\u{e9}\u{1F600}\\u0041\"}",
            "{}  "
        )
        .as_bytes();
        let expected = vec![
            json!({"a": "}{[\"\\", "b": [1, {"c": null}]}),
            json!({"s": "\u{e9}\u{1F600}A"}),
            json!({}),
        ];
        let mut whole = Framer::new(1024);
        whole.push(stream);
        assert_eq!(frame_all(&mut whole), expected);
        assert!(!whole.has_pending_bytes());
        for split in 0..=stream.len() {
            let mut f = Framer::new(1024);
            f.push(&stream[..split]);
            let mut got = frame_all(&mut f);
            f.push(&stream[split..]);
            got.extend(frame_all(&mut f));
            assert_eq!(got, expected, "split at {split}");
            assert!(!f.has_pending_bytes());
        }
        let mut bytewise = Framer::new(1024);
        let mut got = Vec::new();
        for b in stream {
            bytewise.push(std::slice::from_ref(b));
            got.extend(frame_all(&mut bytewise));
        }
        assert_eq!(got, expected);
        assert_eq!(bytewise.message_offset(), stream.len() as u64 - 4);
    }

    #[test]
    fn framer_errors() {
        let mut f = Framer::new(1024);
        f.push(b"{} [1]");
        assert_eq!(f.next_message().unwrap(), Some(json!({})));
        let e = f.next_message().unwrap_err();
        assert!(matches!(
            e,
            FramingError::NotAnObject {
                offset: 3,
                byte: b'['
            }
        ));
        assert_eq!(
            e.to_string(),
            "message at byte offset 3 starts with byte 0x5b, not '{'"
        );

        let mut f = Framer::new(10);
        f.push(b"  {\"a\":\"0123");
        assert_eq!(f.next_message().unwrap(), None);
        f.push(b"4567\"}");
        let e = f.next_message().unwrap_err();
        assert_eq!(e.to_string(), "message at byte offset 2 exceeds 10 bytes");

        // Exactly at the limit is fine.
        let mut f = Framer::new(10);
        f.push(b"{\"a\":\"12\"}");
        assert_eq!(f.next_message().unwrap(), Some(json!({"a": "12"})));

        let mut f = Framer::new(10);
        f.push(b"{\"a\":\"0123456789");
        assert!(matches!(
            f.next_message(),
            Err(FramingError::TooLarge {
                offset: 0,
                limit: 10
            })
        ));

        for bad in [&b"{\"a\" 1}"[..], b"{]", b"{\"a\":[}}", b"{\"\xff\":1}"] {
            let mut f = Framer::new(1024);
            f.push(bad);
            let e = f.next_message().unwrap_err();
            assert!(
                matches!(e, FramingError::InvalidJson { offset: 0, .. }),
                "{bad:?}: {e}"
            );
        }
        let mut f = Framer::new(1024);
        f.push(b"{\"a\":");
        assert_eq!(f.next_message().unwrap(), None);
        assert!(f.has_pending_bytes());
        assert_eq!(f.pending_offset(), 0);
    }

    #[test]
    fn framer_is_linear_on_bytewise_input() {
        // 4 MiB message delivered one byte per push: a re-parsing framer needs ~8e12 steps.
        let body = "x".repeat(4 << 20);
        let msg = format!("{{\"k\":\"{body}\",\"n\":[{{}},[]]}}");
        let mut f = Framer::new(MAX_MESSAGE_LEN);
        let mut got = None;
        for chunk in msg.as_bytes().chunks(1) {
            f.push(chunk);
            if let Some(v) = f.next_message().unwrap() {
                got = Some(v);
            }
        }
        assert_eq!(got.unwrap()["k"].as_str().unwrap().len(), 4 << 20);
    }

    #[test]
    fn roundtrip_memfds_and_fds_key() {
        let (a, b) = pair();
        let (mut a, mut b) = (Transport::new(a), Transport::new(b));
        let files: Vec<OwnedFd> = (0..3).map(|i| memfd(&format!("file {i}"))).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        a.send(&json!({"jsonrpc": "2.0", "id": 1, "fds": 99}), &borrowed)
            .unwrap();
        // A stale "fds" is stripped when nothing is attached.
        a.send(&json!({"jsonrpc": "2.0", "id": 2, "fds": 5}), &[])
            .unwrap();
        let (m, fds) = b.recv().unwrap().unwrap();
        assert_eq!(m, json!({"jsonrpc": "2.0", "id": 1}));
        let contents: Vec<String> = fds.into_iter().map(read_fd).collect();
        assert_eq!(contents, ["file 0", "file 1", "file 2"]);
        let (m, fds) = b.recv().unwrap().unwrap();
        assert_eq!(m, json!({"jsonrpc": "2.0", "id": 2}));
        assert!(fds.is_empty());
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }

    #[test]
    fn encode_sets_fds_last() {
        let v = json!({"b": 1, "a": "x", "fds": 7});
        assert_eq!(encode(&v, 0).unwrap(), br#"{"a":"x","b":1}"#);
        assert_eq!(encode(&v, 3).unwrap(), br#"{"a":"x","b":1,"fds":3}"#);
        assert_eq!(encode(&json!({}), 2).unwrap(), br#"{"fds":2}"#);
        assert!(matches!(
            encode(&json!([1]), 0),
            Err(TransportError::NotAnObject)
        ));
    }

    #[test]
    fn continuation_batches_and_einval_halving() {
        let (a, b) = pair();
        let (mut a, mut b) = (Transport::new(a), Transport::new(b));
        let file = memfd("same");
        // Pretend the kernel allowed more: it answers EINVAL above SCM_MAX_FD, and the sender
        // must halve and remember the size that works.
        a.send_batch = 600;
        let many = vec![file.as_fd(); 700];
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| {
                a.send(&json!({"m": 1}), &many).unwrap();
                a.send(&json!({"m": 2}), &many[..1]).unwrap();
                a.send_batch
            });
            let (m, fds) = b.recv().unwrap().unwrap();
            assert_eq!(m, json!({"m": 1}));
            assert_eq!(fds.len(), 700);
            let (m, fds) = b.recv().unwrap().unwrap();
            assert_eq!(m, json!({"m": 2}));
            assert_eq!(read_fd(fds.into_iter().next().unwrap()), "same");
            h.join().unwrap()
        });
        assert_eq!(sender, 150);
    }

    #[test]
    fn raw_continuation_sequence_is_accepted() {
        let (a, b) = pair();
        let mut b = Transport::new(b);
        let (f0, f1, f2) = (memfd("0"), memfd("1"), memfd("2"));
        raw_send(&a, br#"{"x":1,"fds":3}"#, &[f0.as_fd()]);
        raw_send(&a, b" ", &[f1.as_fd()]);
        raw_send(&a, b" ", &[f2.as_fd()]);
        raw_send(&a, b"\n{\"x\":2}", &[]);
        let (m, fds) = b.recv().unwrap().unwrap();
        assert_eq!(m, json!({"x": 1}));
        let contents: Vec<String> = fds.into_iter().map(read_fd).collect();
        assert_eq!(contents, ["0", "1", "2"]);
        assert_eq!(b.recv().unwrap().unwrap().0, json!({"x": 2}));
    }

    #[test]
    fn fatal_errors() {
        // (bytes, fds to attach, close after, expected error text)
        let cases: &[(&[u8], usize, &str)] = &[
            (
                br#"{"fds":2}{"next":1}"#,
                1,
                "message at byte offset 0 announces 2 fds, but only 1 arrived before the next \
                 message (mismatched count)",
            ),
            (
                br#"  {"fds":2}  "#,
                1,
                "message at byte offset 2 announces 2 fds, but only 1 arrived before end of \
                 stream (mismatched count)",
            ),
            (
                br#"{"a":1}{"b":"#,
                0,
                "end of stream inside the message at byte offset 7",
            ),
            (
                br#"{"a":1}"#,
                2,
                "end of stream with 2 fds that no message claimed",
            ),
            (
                br#"{"fds":-1}"#,
                0,
                "message at byte offset 0 has \"fds\": -1, not a count",
            ),
            (
                br#"{"fds":"1"}"#,
                1,
                "message at byte offset 0 has \"fds\": \"1\", not a count",
            ),
            (
                b"\"str\"",
                0,
                "message at byte offset 0 starts with byte 0x22, not '{'",
            ),
        ];
        for &(bytes, nfds, text) in cases {
            let (a, b) = pair();
            let mut b = Transport::new(b);
            let file = memfd("x");
            raw_send(&a, bytes, &vec![file.as_fd(); nfds]);
            drop(a);
            let mut first = b.recv();
            if bytes.starts_with(br#"{"a":1}"#) {
                assert_eq!(first.unwrap().unwrap().0, json!({"a": 1}));
                first = b.recv();
            }
            let e = first.unwrap_err();
            assert!(e.is_framing(), "{e}");
            assert_eq!(e.rpc_code(), Some(rpc::code::FRAMING), "{e}");
            assert_eq!(e.to_string(), text);
            assert!(b.fds.is_empty(), "queued fds closed");
            assert!(matches!(b.recv(), Err(TransportError::Failed)));
        }
    }

    #[test]
    fn invalid_json_is_a_parse_error() {
        let (a, b) = pair();
        let mut b = Transport::new(b);
        raw_send(&a, b"{\"a\":1}\n{\"b\":tru}", &[]);
        assert_eq!(b.recv().unwrap().unwrap().0, json!({"a": 1}));
        let e = b.recv().unwrap_err();
        assert_eq!(e.to_string(), "message at byte offset 8 is not valid JSON");
        assert_eq!(e.rpc_code(), Some(rpc::code::PARSE_ERROR));
        let io = TransportError::Io(std::io::ErrorKind::BrokenPipe.into());
        assert_eq!(io.rpc_code(), None);
    }

    #[test]
    fn send_refuses_oversized_message() {
        let (a, _b) = pair();
        let mut a = Transport::new(a);
        let big = json!({"s": "x".repeat(MAX_MESSAGE_LEN)});
        let e = a.send(&big, &[]).unwrap_err();
        assert!(matches!(e, TransportError::MessageTooLarge { .. }));
        assert!(!e.is_framing());
    }

    #[test]
    fn large_message_and_wait_callback() {
        let (a, b) = pair();
        let (mut a, mut b) = (Transport::new(a), Transport::new(b));
        let big = "y".repeat(3 << 20);
        let mut waits = 0;
        std::thread::scope(|s| {
            s.spawn(|| a.send(&json!({"big": big}), &[]).unwrap());
            let (m, _) = b
                .recv_with(&mut |fd| {
                    waits += 1;
                    assert_eq!(
                        rustix::net::sockopt::socket_type(fd).unwrap(),
                        SocketType::STREAM
                    );
                    Ok(())
                })
                .unwrap()
                .unwrap();
            assert_eq!(m["big"].as_str().unwrap().len(), 3 << 20);
        });
        assert!(waits >= (3 << 20) / RECV_CHUNK_LEN, "{waits} waits");
        // A failing wait is reported and leaves the connection usable.
        let e = b
            .recv_with(&mut |_| Err(std::io::Error::other("helper exited")))
            .unwrap_err();
        assert!(matches!(e, TransportError::Wait(_)) && !e.is_framing());
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }
}
