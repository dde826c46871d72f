//! `proto/rpc.md` §1 against `src/proto/fdpass.rs`: the literal framing and `sendmsg` sequence
//! examples go through the [`Framer`] and, over a real socketpair, through [`Transport`]; and
//! `Transport::send` produces exactly the documented `sendmsg` sequence.

use std::io::{IoSlice, IoSliceMut, Read, Seek, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{MemfdFlags, memfd_create};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType, socketpair,
};
use serde_json::Value;
use splitfdstream::proto::fdpass::{Framer, MAX_FDS_PER_SENDMSG, MAX_MESSAGE_LEN, Transport};

const SPEC: &str = include_str!("../proto/rpc.md");

/// `(kind, name, body)` of every block annotated `<!-- example: KIND NAME -->` of one of `kinds`.
fn examples(kinds: &[&str]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut annotation: Option<Vec<String>> = None;
    let mut lines = SPEC.lines();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("<!-- example:") {
            annotation = Some(
                rest.trim_end_matches("-->")
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
            );
        } else if line.starts_with("```") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            if let Some(words) = annotation.take()
                && kinds.contains(&words[0].as_str())
            {
                out.push((words[0].clone(), words[1].clone(), body.join("\n") + "\n"));
            }
        }
    }
    out
}

/// One `sendmsg` of a transport example: how many fds, which payload.
#[derive(Debug)]
struct Call {
    fds: usize,
    payload: Vec<u8>,
}

fn parse_calls(body: &str) -> Vec<Call> {
    body.lines()
        .map(|line| {
            let rest = line.strip_prefix("sendmsg fds=").expect("sendmsg line");
            let (n, payload) = rest.split_once(" bytes=").expect("bytes=");
            let payload = if payload == "0x20" {
                b" ".to_vec()
            } else {
                payload.as_bytes().to_vec()
            };
            Call {
                fds: n.trim().parse().expect("fd count"),
                payload,
            }
        })
        .collect()
}

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
    let fd = memfd_create("spec-transport", MemfdFlags::CLOEXEC).expect("memfd_create");
    let mut f = std::fs::File::from(fd);
    f.write_all(content.as_bytes()).expect("write memfd");
    f.into()
}

fn contents(fd: OwnedFd) -> String {
    let mut f = std::fs::File::from(fd);
    f.rewind().expect("rewind");
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read");
    s
}

fn raw_sendmsg(sock: BorrowedFd<'_>, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len())) + 8];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(payload)],
        &mut control,
        SendFlags::empty(),
    )
    .expect("sendmsg");
    assert_eq!(n, payload.len());
}

fn frame(stream: &[u8]) -> Vec<Value> {
    let mut framer = Framer::new(MAX_MESSAGE_LEN);
    framer.push(stream);
    let mut out = Vec::new();
    while let Some(v) = framer.next_message().expect("example frames cleanly") {
        out.push(v);
    }
    assert!(!framer.has_pending_bytes());
    out
}

#[test]
fn framing_examples() {
    let found = examples(&["framing"]);
    assert!(!found.is_empty());
    for (_, count, body) in found {
        let messages = frame(body.as_bytes());
        assert_eq!(messages.len(), count.parse::<usize>().unwrap(), "{body}");
        // Byte-at-a-time delivery frames identically.
        let mut framer = Framer::new(MAX_MESSAGE_LEN);
        let mut bytewise = Vec::new();
        for b in body.as_bytes() {
            framer.push(std::slice::from_ref(b));
            while let Some(v) = framer.next_message().unwrap() {
                bytewise.push(v);
            }
        }
        assert_eq!(bytewise, messages);
        assert_eq!(
            messages[1]["params"]["reference"],
            "quay.io/example/app:1 {not a brace}"
        );
    }
}

/// Replays an example's `sendmsg` calls with memfds reading "fd 0", "fd 1", … and returns the
/// receiving transport's results, up to the first error or the end of stream.
fn replay(calls: &[Call]) -> (Vec<(Value, Vec<String>)>, Option<String>) {
    let (a, b) = pair();
    let total: usize = calls.iter().map(|c| c.fds).sum();
    let files: Vec<OwnedFd> = (0..total).map(|i| memfd(&format!("fd {i}"))).collect();
    let mut received = Vec::new();
    let mut error = None;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut next = 0;
            for call in calls {
                let fds: Vec<_> = files[next..next + call.fds]
                    .iter()
                    .map(|f| f.as_fd())
                    .collect();
                raw_sendmsg(a.as_fd(), &call.payload, &fds);
                next += call.fds;
            }
            drop(a);
        });
        let mut rx = Transport::new(b);
        loop {
            match rx.recv() {
                Ok(Some((v, fds))) => received.push((v, fds.into_iter().map(contents).collect())),
                Ok(None) => break,
                Err(e) => {
                    assert!(e.is_framing(), "{e}");
                    error = Some(e.to_string());
                    break;
                }
            }
        }
    });
    (received, error)
}

#[test]
fn transport_ok_examples() {
    let found = examples(&["transport-ok"]);
    assert!(!found.is_empty());
    for (_, name, body) in found {
        let calls = parse_calls(&body);
        // Shape rules of §1.3: batches ≤ 253, continuations are one space byte.
        for c in &calls {
            assert!(c.fds <= MAX_FDS_PER_SENDMSG, "{name}");
            assert!(!c.payload.is_empty());
        }
        let stream: Vec<u8> = calls.iter().flat_map(|c| c.payload.clone()).collect();
        let framed = frame(&stream);
        let announced: u64 = framed
            .iter()
            .map(|m| m.get("fds").map_or(0, |n| n.as_u64().unwrap()))
            .sum();
        assert_eq!(
            announced as usize,
            calls.iter().map(|c| c.fds).sum::<usize>()
        );

        let (received, error) = replay(&calls);
        assert_eq!(error, None, "{name}");
        assert_eq!(received.len(), framed.len());
        let mut next = 0;
        for ((value, fds), mut expected) in received.into_iter().zip(framed) {
            let n = expected
                .as_object_mut()
                .unwrap()
                .remove("fds")
                .map_or(0, |n| n.as_u64().unwrap() as usize);
            assert_eq!(value, expected, "the transport consumes \"fds\"");
            let want: Vec<String> = (next..next + n).map(|i| format!("fd {i}")).collect();
            assert_eq!(fds, want, "positional fds of {value}");
            next += n;
        }
    }
}

#[test]
fn transport_fatal_examples() {
    let found = examples(&["transport-fatal"]);
    assert!(!found.is_empty());
    for (_, name, body) in found {
        let (received, error) = replay(&parse_calls(&body));
        assert!(received.is_empty(), "{name}: {received:?}");
        let error = error.unwrap_or_else(|| panic!("{name} must be fatal"));
        assert!(error.contains(&name.replace('-', " ")), "{name}: {error}");
    }
}

/// `Transport::send` of the continuation example's first message makes exactly the documented
/// calls: the JSON with 253 fds, then one space byte with 47.
#[test]
fn send_produces_the_documented_sendmsg_sequence() {
    let (_, _, body) = examples(&["transport-ok"])
        .into_iter()
        .find(|(_, name, _)| name == "continuation")
        .expect("continuation example");
    let calls = parse_calls(&body);
    let first: Value = serde_json::from_slice(&calls[0].payload).unwrap();
    let n = first["fds"].as_u64().unwrap() as usize;
    let mut message = first.clone();
    message.as_object_mut().unwrap().remove("fds");

    let (a, b) = pair();
    let file = memfd("x");
    let fds = vec![file.as_fd(); n];
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut tx = Transport::new(a);
            tx.send(&message, &fds).unwrap();
        });
        // A stream recvmsg stops after the first segment that carries fds, so each call
        // returns one of the sender's sendmsg payloads with its batch.
        let mut buf = vec![0u8; 1 << 16];
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_SENDMSG)) + 8];
        assert_eq!(calls[1].payload, b" ", "second call is the continuation");
        for want in &calls[..2] {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let r = rustix::net::recvmsg(
                &b,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .unwrap();
            let got: usize = control
                .drain()
                .map(|m| match m {
                    RecvAncillaryMessage::ScmRights(fds) => fds.count(),
                    _ => 0,
                })
                .sum();
            assert_eq!(got, want.fds);
            let payload = &buf[..r.bytes];
            if want.payload == b" " {
                assert_eq!(payload, b" ");
            } else {
                assert_eq!(serde_json::from_slice::<Value>(payload).unwrap(), first);
            }
        }
    });
    // The example's batches add up to the announced count.
    assert_eq!(calls[0].fds + calls[1].fds, n);
}

#[test]
fn framer_rejects_what_the_spec_rejects() {
    let cases: &[(&[u8], &str)] = &[
        (b"[1,2]", "starts with byte 0x5b"),
        (b"  42 ", "starts with byte 0x34"),
        (b"{\"a\":tru}", "not valid JSON"),
    ];
    for (bytes, text) in cases {
        let mut framer = Framer::new(MAX_MESSAGE_LEN);
        framer.push(bytes);
        let e = framer.next_message().unwrap_err().to_string();
        assert!(e.contains(text), "{e}");
    }
    // The size limit counts from '{' to '}'.
    let mut framer = Framer::new(MAX_MESSAGE_LEN);
    let big = format!("{{\"s\":\"{}\"}}", "x".repeat(MAX_MESSAGE_LEN - 8));
    assert_eq!(big.len(), MAX_MESSAGE_LEN);
    framer.push(big.as_bytes());
    assert!(framer.next_message().unwrap().is_some());
    framer.push(format!("{{\"s\":\"{}\"}}", "x".repeat(MAX_MESSAGE_LEN - 7)).as_bytes());
    let e = framer.next_message().unwrap_err().to_string();
    assert_eq!(
        e,
        format!("message at byte offset {MAX_MESSAGE_LEN} exceeds {MAX_MESSAGE_LEN} bytes")
    );
}
