//! The jsonrpc-fdpass transport against the real kernel: thousands of fds, continuation batches,
//! fd closing on fatal errors (proved by pipe EOF), `MSG_NOSIGNAL` and `MSG_CTRUNC`.
//!
//! The last two run in a child process (this test binary re-executed for one test) because they
//! change process-wide state: the SIGPIPE disposition and `RLIMIT_NOFILE`.

use std::io::{IoSlice, Read, Seek, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::Command;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::{MemfdFlags, memfd_create};
use rustix::io::Errno;
use rustix::net::sockopt::Timeout;
use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
    socketpair,
};
use rustix::pipe::{PipeFlags, pipe_with};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use serde_json::{Value, json};
use splitfdstream::proto::fdpass::{Transport, TransportError};

/// Set in a re-executed child to the mode it should run.
const CHILD_ENV: &str = "SPLITFDSTREAM_FDPASS_TEST_CHILD";
/// Printed by a child that reached its verdict.
const CHILD_OK: &str = "FDPASS-CHILD-OK";
/// How long to wait for a pipe EOF that proves an fd was closed.
const EOF_TIMEOUT: Timespec = Timespec {
    tv_sec: 10,
    tv_nsec: 0,
};
/// Longest a child waits in `recvmsg` before failing instead of hanging.
const CHILD_RECV_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// fds one big test holds at once: both ends of a 1,000-fd message plus slack.
const NOFILE_NEEDED: u64 = 2500;
/// Soft limit asked for, so the big tests can run in parallel threads of this binary.
const NOFILE_WANTED: u64 = 8192;

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
    let fd = memfd_create("fdpass-it", MemfdFlags::CLOEXEC).expect("memfd_create");
    let mut f = std::fs::File::from(fd);
    f.write_all(content.as_bytes()).expect("write memfd");
    f.into()
}

fn contents(fd: &OwnedFd) -> String {
    let mut f = std::fs::File::from(fd.try_clone().expect("dup"));
    f.rewind().expect("rewind");
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read");
    s
}

/// Raise the soft fd limit towards [`NOFILE_WANTED`]; only ever upwards, so tests running in
/// parallel in this binary are not affected. Returns false when even [`NOFILE_NEEDED`] is
/// above the hard limit.
fn ensure_nofile() -> bool {
    let lim = getrlimit(Resource::Nofile);
    let target = lim
        .maximum
        .map_or(NOFILE_WANTED, |max| max.min(NOFILE_WANTED));
    if lim.current.is_some_and(|cur| cur < target) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: lim.maximum,
            },
        )
        .expect("raise RLIMIT_NOFILE soft limit");
    }
    target >= NOFILE_NEEDED
}

fn raw_send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) {
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

/// Block until `read_end` reports EOF, i.e. every write end of its pipe is closed.
fn assert_pipe_eof(read_end: &OwnedFd, what: &str) {
    let mut pfd = [PollFd::new(read_end, PollFlags::IN)];
    let ready = poll(&mut pfd, Some(&EOF_TIMEOUT)).expect("poll");
    assert_eq!(
        ready, 1,
        "{what}: write end still open after {EOF_TIMEOUT:?}"
    );
    let mut byte = [0u8; 1];
    let n = rustix::io::read(read_end, &mut byte).expect("read");
    assert_eq!(n, 0, "{what}: expected EOF");
}

/// Re-run test `name` of this binary alone in a child with `CHILD_ENV=mode`.
fn run_child(name: &str, mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .output()
        .expect("spawn test child")
}

fn child_mode() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

#[test]
fn ten_thousand_fds_in_batches() {
    if !ensure_nofile() {
        eprintln!("skipping: RLIMIT_NOFILE hard limit below {NOFILE_NEEDED}");
        return;
    }
    // Sizes around the 253-fd sendmsg limit and its multiples, then 250s up to 10,000.
    let mut sizes = vec![1, 252, 253, 254, 0, 505, 506, 507, 759, 1000];
    while sizes.iter().sum::<usize>() < 10_000 {
        let left = 10_000 - sizes.iter().sum::<usize>();
        sizes.push(left.min(250));
    }
    assert_eq!(sizes.iter().sum::<usize>(), 10_000);
    let (a, b) = pair();
    std::thread::scope(|s| {
        let sizes = &sizes;
        s.spawn(move || {
            let mut tx = Transport::new(a);
            let mut next = 0;
            for (m, &n) in sizes.iter().enumerate() {
                let files: Vec<OwnedFd> = (next..next + n)
                    .map(|i| memfd(&format!("fd {i}")))
                    .collect();
                let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
                tx.send(
                    &json!({"jsonrpc": "2.0", "method": "batch", "params": {"m": m}}),
                    &fds,
                )
                .unwrap();
                // Our copies close here; the receiver's are the only ones left.
                next += n;
            }
        });
        let mut rx = Transport::new(b);
        let mut next = 0;
        for (m, &n) in sizes.iter().enumerate() {
            let (msg, fds) = rx.recv().unwrap().expect("message");
            assert_eq!(msg["params"]["m"], m);
            assert_eq!(fds.len(), n, "message {m}");
            for (i, fd) in fds.iter().enumerate() {
                assert_eq!(contents(fd), format!("fd {}", next + i), "message {m}");
            }
            next += n;
        }
        assert!(
            rx.recv().unwrap().is_none(),
            "clean end after the last message"
        );
    });
}

#[test]
fn message_with_1000_fds_each_way() {
    if !ensure_nofile() {
        eprintln!("skipping: RLIMIT_NOFILE hard limit below {NOFILE_NEEDED}");
        return;
    }
    let (a, b) = pair();
    let files: Vec<OwnedFd> = (0..1000).map(|i| memfd(&format!("file {i}"))).collect();
    std::thread::scope(|s| {
        let echo = s.spawn(move || {
            // Echo every fd back in reverse order, then say goodbye without fds.
            let mut t = Transport::new(b);
            let (msg, mut fds) = t.recv().unwrap().unwrap();
            assert_eq!(msg, json!({"id": 1}));
            fds.reverse();
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            t.send(&json!({"id": 2}), &borrowed).unwrap();
            t.send(&json!({"id": 3}), &[]).unwrap();
        });
        let mut t = Transport::new(a);
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        t.send(&json!({"id": 1}), &borrowed).unwrap();
        let (msg, back) = t.recv().unwrap().unwrap();
        assert_eq!(msg, json!({"id": 2}));
        assert_eq!(back.len(), 1000);
        for (i, fd) in back.iter().enumerate() {
            assert_eq!(contents(fd), format!("file {}", 999 - i));
            // The very same open file came back, not just equal contents.
            let ours = rustix::fs::fstat(&files[999 - i]).unwrap();
            let theirs = rustix::fs::fstat(fd).unwrap();
            assert_eq!((ours.st_dev, ours.st_ino), (theirs.st_dev, theirs.st_ino));
        }
        let (msg, none) = t.recv().unwrap().unwrap();
        assert_eq!(msg, json!({"id": 3}));
        assert!(none.is_empty());
        echo.join().unwrap();
    });
}

/// Send `data` with the write ends of fresh pipes, drop our write ends, and return the read
/// ends: each reads EOF exactly when the receiver has closed its copy.
fn send_pipe_write_ends(sock: &OwnedFd, data: &[u8], n: usize) -> Vec<OwnedFd> {
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..n)
        .map(|_| pipe_with(PipeFlags::CLOEXEC).expect("pipe"))
        .collect();
    let write_ends: Vec<_> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
    raw_send(sock.as_fd(), data, &write_ends);
    pipes.into_iter().map(|(r, _)| r).collect()
}

#[test]
fn mismatched_count_before_next_message_closes_queued_fds() {
    let (a, b) = pair();
    let mut rx = Transport::new(b);
    // Announces 4, delivers 3, then starts the next message.
    let reads = send_pipe_write_ends(&a, br#"{"jsonrpc":"2.0","id":1,"result":{},"fds":4}"#, 3);
    raw_send(a.as_fd(), br#" {"jsonrpc":"2.0","id":2,"result":{}}"#, &[]);
    let e = rx.recv().unwrap_err();
    assert!(e.is_framing());
    assert_eq!(
        e.to_string(),
        "message at byte offset 0 announces 4 fds, but only 3 arrived before the next message \
         (mismatched count)"
    );
    // The transport is still alive: only the error path can have closed the fds.
    for (i, r) in reads.iter().enumerate() {
        assert_pipe_eof(r, &format!("queued fd {i}"));
    }
    assert!(matches!(rx.recv(), Err(TransportError::Failed)));
    // The peer's socket is still open: the failure came from the framing, not a hang-up.
    drop(a);
}

#[test]
fn end_of_stream_before_fds_closes_queued_fds() {
    let (a, b) = pair();
    let mut rx = Transport::new(b);
    // A good message, then one whose continuation batch never comes, then a hang-up.
    let first = send_pipe_write_ends(&a, br#"{"id":1,"fds":1}"#, 1);
    let second = send_pipe_write_ends(&a, br#"{"id":2,"fds":300}"#, 253);
    drop(a);
    let (msg, kept) = rx.recv().unwrap().unwrap();
    assert_eq!(msg, json!({"id": 1}));
    let e = rx.recv().unwrap_err();
    assert!(e.is_framing());
    assert_eq!(
        e.to_string(),
        "message at byte offset 16 announces 300 fds, but only 253 arrived before end of stream \
         (mismatched count)"
    );
    for (i, r) in second.iter().enumerate() {
        assert_pipe_eof(r, &format!("queued fd {i}"));
    }
    // The fd handed out before the error is the caller's and stays open.
    let mut pfd = [PollFd::new(&first[0], PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    assert_eq!(
        poll(&mut pfd, Some(&zero)).unwrap(),
        0,
        "delivered fd still open"
    );
    drop(kept);
    assert_pipe_eof(&first[0], "delivered fd after drop");
}

#[test]
fn send_to_closed_peer_is_epipe_not_sigpipe() {
    const NAME: &str = "send_to_closed_peer_is_epipe_not_sigpipe";
    match child_mode().as_deref() {
        None => {}
        Some(mode) => {
            sigpipe_default();
            let (a, b) = pair();
            drop(b);
            if mode == "control" {
                // Without MSG_NOSIGNAL this kills the process: proves the disposition is default.
                let r = rustix::net::send(&a, b"{}", SendFlags::empty());
                panic!("send without MSG_NOSIGNAL returned {r:?} instead of raising SIGPIPE");
            }
            let memfd = memfd("x");
            let mut t = Transport::new(a);
            for fds in [&[][..], &[memfd.as_fd()][..]] {
                match t.send(&json!({"jsonrpc": "2.0", "method": "m"}), fds) {
                    Err(TransportError::Io(e))
                        if e.raw_os_error() == Some(Errno::PIPE.raw_os_error()) => {}
                    other => panic!("expected EPIPE, got {other:?}"),
                }
            }
            println!("{CHILD_OK}");
            return;
        }
    }
    use std::os::unix::process::ExitStatusExt;
    let control = run_child(NAME, "control");
    assert_eq!(
        control.status.signal(),
        Some(libc::SIGPIPE),
        "control child should die of SIGPIPE: {control:?}"
    );
    let out = run_child(NAME, "transport");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(CHILD_OK),
        "child: {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restore the default SIGPIPE action, which the Rust runtime replaced with "ignore" before
/// `main`; a C program or a Rust program built with `-Zon-broken-pipe=kill` runs like this.
#[allow(unsafe_code)]
fn sigpipe_default() {
    // SAFETY: `signal` with SIG_DFL installs no handler; this child process runs only the
    // calling test, so no other thread depends on the old disposition.
    let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    assert_ne!(old, libc::SIG_ERR);
}

#[test]
fn fds_dropped_at_low_nofile_are_a_fatal_error() {
    const NAME: &str = "fds_dropped_at_low_nofile_are_a_fatal_error";
    /// fds the child can still open after lowering its limit.
    const HEADROOM: u64 = 8;
    /// fds in the message: far more than the headroom.
    const SENT: usize = 100;
    if child_mode().is_some() {
        let (a, b) = pair();
        // Should the fds be lost silently, the receiver would wait for them forever; time out
        // into a test failure instead.
        rustix::net::sockopt::set_socket_timeout(&b, Timeout::Recv, Some(CHILD_RECV_TIMEOUT))
            .expect("SO_RCVTIMEO");
        let file = memfd("x");
        let mut tx = Transport::new(a);
        let mut rx = Transport::new(b);
        // The lowest free descriptor number tells how many are in use.
        let probe = file.try_clone().expect("dup");
        let in_use = std::os::fd::AsRawFd::as_raw_fd(&probe) as u64;
        drop(probe);
        let lim = getrlimit(Resource::Nofile);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(in_use + HEADROOM),
                maximum: lim.maximum,
            },
        )
        .expect("lower RLIMIT_NOFILE");
        // The same file 100 times: sending needs no new descriptors, receiving needs 100.
        tx.send(
            &json!({"jsonrpc": "2.0", "method": "m"}),
            &vec![file.as_fd(); SENT],
        )
        .unwrap();
        match rx.recv() {
            Err(e @ TransportError::FdsTruncated { installed }) => {
                assert!(e.is_framing());
                assert!((installed as u64) <= HEADROOM, "{installed} installed");
                assert!(e.to_string().contains("MSG_CTRUNC"), "{e}");
            }
            other => panic!("expected MSG_CTRUNC error, got {other:?}"),
        }
        assert!(matches!(rx.recv(), Err(TransportError::Failed)));
        println!("{CHILD_OK}");
        return;
    }
    let out = run_child(NAME, "ctrunc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(CHILD_OK),
        "child: {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn whitespace_and_pretty_printed_messages_from_a_raw_peer() {
    let (a, b) = pair();
    let mut rx = Transport::new(b);
    let file = memfd("pretty");
    // Pretty printing with the fd count in the middle, split mid-string across writes.
    raw_send(
        a.as_fd(),
        b"\n\n{\n  \"fds\": 1,\n  \"s\": \"a}b",
        &[file.as_fd()],
    );
    raw_send(a.as_fd(), b"\\\"c\"\n}\r\n\t", &[]);
    raw_send(a.as_fd(), b"{}", &[]);
    drop(a);
    let (msg, fds) = rx.recv().unwrap().unwrap();
    assert_eq!(msg, json!({"s": "a}b\"c"}));
    assert_eq!(contents(&fds[0]), "pretty");
    assert_eq!(
        rx.recv().unwrap().unwrap().0,
        Value::Object(Default::default())
    );
    assert!(rx.recv().unwrap().is_none());
}
