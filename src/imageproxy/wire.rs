//! Packets of skopeo's image proxy protocol: one JSON request per `SOCK_SEQPACKET` packet, one
//! reply packet with up to two fds (`proto/image-proxy.md` §1).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::Serialize;
use serde_json::Value;

/// Largest packet either side sends (skopeo's `maxMsgSize`; the Rust client's receive buffer).
/// A reply that would be longer is replaced by an error reply.
pub(crate) const MAX_MSG_SIZE: usize = 32 * 1024;

/// Largest integer a request may carry: skopeo decodes numbers as float64 and refuses anything
/// above JavaScript's `Number.MAX_SAFE_INTEGER`.
const MAX_SAFE_INTEGER: f64 = ((1u64 << 53) - 1) as f64;

/// `error_code` of a failed reply (protocol 0.2.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum ErrorCode {
    /// Writing to a pipe the client owns failed with `EPIPE`: the client closed it.
    #[serde(rename = "EPIPE")]
    Pipe,
    /// Everything else. Nothing local is worth retrying, so `"retryable"` is never sent.
    #[serde(rename = "other")]
    Other,
}

/// A failed request: its message and code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl Failure {
    /// An `"other"` failure.
    pub(crate) fn other(message: impl Into<String>) -> Self {
        Failure {
            code: ErrorCode::Other,
            message: message.into(),
        }
    }

    /// The failure for an error chain: `EPIPE` when any cause is a broken pipe.
    pub(crate) fn from_error(err: &anyhow::Error) -> Self {
        let epipe = err.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.raw_os_error() == Some(Errno::PIPE.raw_os_error()))
                || c.downcast_ref::<Errno>() == Some(&Errno::PIPE)
        });
        Failure {
            code: if epipe {
                ErrorCode::Pipe
            } else {
                ErrorCode::Other
            },
            message: format!("{err:#}"),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::from_error(&err)
    }
}

/// A successful reply: its value, the pipe id for `FinishPipe` (0: none) and its fds.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub(crate) value: Value,
    pub(crate) pipeid: u32,
    pub(crate) fds: Vec<OwnedFd>,
}

impl Reply {
    /// A reply carrying only `value`.
    pub(crate) fn value(value: impl Into<Value>) -> Self {
        Reply {
            value: value.into(),
            ..Reply::default()
        }
    }
}

/// The reply packet, with skopeo's member order.
#[derive(Serialize)]
struct Packet<'a> {
    success: bool,
    value: &'a Value,
    pipeid: u32,
    error_code: &'a str,
    error: &'a str,
}

/// The bytes of the reply to send for `result`; a reply over [`MAX_MSG_SIZE`] becomes an
/// error reply (and loses its fds, which the caller then closes).
pub(crate) fn encode(result: &Result<Reply, Failure>) -> (Vec<u8>, bool) {
    let bytes = match result {
        Ok(r) => serde_json::to_vec(&Packet {
            success: true,
            value: &r.value,
            pipeid: r.pipeid,
            error_code: "",
            error: "",
        }),
        Err(f) => {
            let code = serde_json::to_value(f.code).expect("a unit variant serialises");
            serde_json::to_vec(&Packet {
                success: false,
                value: &Value::Null,
                pipeid: 0,
                error_code: code.as_str().expect("renamed to a string"),
                error: &truncate(&f.message, MAX_MSG_SIZE / 2),
            })
        }
    }
    .expect("a JSON value serialises");
    if bytes.len() <= MAX_MSG_SIZE {
        return (bytes, true);
    }
    let f = Failure::other(format!(
        "the reply is {} bytes, over the protocol's limit of {MAX_MSG_SIZE} (use the piped variant of this method)",
        bytes.len()
    ));
    (encode(&Err(f)).0, false)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Send one reply packet with `fds` attached.
pub(crate) fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        let pushed = control.push(SendAncillaryMessage::ScmRights(&borrowed));
        assert!(pushed, "at most two fds per reply");
    }
    loop {
        match rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(std::io::Error::other(format!(
                    "short send of a reply packet: {n} of {} bytes",
                    bytes.len()
                )));
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One received request packet.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// The packet's bytes (fds sent with it are closed: no request carries any).
    Packet(Vec<u8>),
    /// A packet longer than [`MAX_MSG_SIZE`], or one whose fds the kernel dropped.
    Oversized,
    /// The client closed its end.
    Closed,
}

/// Receive the next request packet.
pub(crate) fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Incoming> {
    let mut buf = vec![0u8; MAX_MSG_SIZE];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let r = match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(r) => r,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        // Close whatever fds came along: no request takes any.
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                fds.for_each(drop);
            }
        }
        if r.bytes == 0 {
            return Ok(Incoming::Closed);
        }
        if r.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
            return Ok(Incoming::Oversized);
        }
        buf.truncate(r.bytes);
        return Ok(Incoming::Packet(buf));
    }
}

/// A parsed request: method and arguments.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) args: Vec<Value>,
}

/// Parse a request packet as skopeo does (`args` may be absent or null: no arguments).
pub(crate) fn parse(bytes: &[u8]) -> Result<Request, Failure> {
    #[derive(serde::Deserialize)]
    struct Raw {
        #[serde(default)]
        method: String,
        #[serde(default)]
        args: Option<Vec<Value>>,
    }
    let raw: Raw = serde_json::from_slice(bytes)
        .map_err(|e| Failure::other(format!("invalid request: {e}")))?;
    Ok(Request {
        method: raw.method,
        args: raw.args.unwrap_or_default(),
    })
}

/// Check the argument count of `req`.
pub(crate) fn arity(req: &Request, n: usize, shape: &str) -> Result<(), Failure> {
    if req.args.len() == n {
        return Ok(());
    }
    Err(Failure::other(format!(
        "invalid request: {} takes {n} arguments {shape}, got {}",
        req.method,
        req.args.len()
    )))
}

/// A non-negative integer argument (a JSON number of at most 2^53 − 1, as skopeo accepts it).
pub(crate) fn uint_arg(v: &Value, what: &str) -> Result<u64, Failure> {
    let f = v
        .as_f64()
        .ok_or_else(|| Failure::other(format!("expecting numeric {what}, not {v}")))?;
    if !(0.0..=MAX_SAFE_INTEGER).contains(&f) || f.fract() != 0.0 {
        return Err(Failure::other(format!(
            "out of range integer for {what}: {v}"
        )));
    }
    Ok(f as u64)
}

/// A string argument.
pub(crate) fn str_arg<'v>(v: &'v Value, what: &str) -> Result<&'v str, Failure> {
    v.as_str()
        .ok_or_else(|| Failure::other(format!("expecting string {what}, not {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_have_skopeos_shape() {
        let (ok, _) = encode(&Ok(Reply::value("0.2.8")));
        assert_eq!(
            ok,
            br#"{"success":true,"value":"0.2.8","pipeid":0,"error_code":"","error":""}"#
        );
        let (err, _) = encode(&Err(Failure::other("no image 7")));
        assert_eq!(
            err,
            br#"{"success":false,"value":null,"pipeid":0,"error_code":"other","error":"no image 7"}"#
        );
        let big = Reply::value("x".repeat(MAX_MSG_SIZE));
        let (bytes, kept) = encode(&Ok(big));
        assert!(!kept && bytes.len() < MAX_MSG_SIZE);
        assert!(
            String::from_utf8(bytes)
                .unwrap()
                .contains("over the protocol's limit")
        );
    }

    #[test]
    fn integer_arguments_are_checked() {
        assert_eq!(uint_arg(&serde_json::json!(7), "imageid").unwrap(), 7);
        for bad in [
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!("7"),
        ] {
            assert!(uint_arg(&bad, "imageid").is_err(), "{bad}");
        }
    }
}
