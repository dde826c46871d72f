//! jsonrpc-fdpass transport. STUB: API contract only.
#![allow(missing_docs, unused)]
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub const MAX_FDS_PER_SENDMSG: usize = 253;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("socket I/O")]
    Io(#[source] std::io::Error),
}
impl TransportError {
    /// True for fatal framing/fd errors (JSON-RPC code -32050).
    pub fn is_framing(&self) -> bool {
        todo!()
    }
}

/// One end of a jsonrpc-fdpass connection (blocking). Owned by one thread.
#[derive(Debug)]
pub struct Transport {
    sock: OwnedFd,
}
impl Transport {
    pub fn new(sock: OwnedFd) -> Self {
        todo!()
    }
    /// Send one message (a JSON object); sets its top-level `"fds"` to `fds.len()` when non-zero.
    pub fn send(
        &mut self,
        msg: &serde_json::Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        todo!()
    }
    /// Receive one message and its fds. `Ok(None)` = peer closed cleanly between messages.
    pub fn recv(&mut self) -> Result<Option<(serde_json::Value, Vec<OwnedFd>)>, TransportError> {
        todo!()
    }
    /// Like `recv`, but calls `wait(socket)` before each blocking `recvmsg`, so the caller can
    /// poll the socket together with something else (a child's pidfd) and return an error.
    pub fn recv_with(
        &mut self,
        wait: &mut dyn FnMut(BorrowedFd<'_>) -> std::io::Result<()>,
    ) -> Result<Option<(serde_json::Value, Vec<OwnedFd>)>, TransportError> {
        todo!()
    }
}
impl AsFd for Transport {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
