//! A client must not be able to pin the helper or the store (`proto/rpc.md` §4.6): per-session
//! caps on images and streams, `CloseLayer`/`Shutdown`/hang-up cancelling producers wherever
//! they wait, the idle timeout, the stream lifecycle of §3.4/§3.5, and a panicking producer.
//!
//! The helper is the real binary on a raw transport, so that many streams can be open at once
//! (the library's `LayerStream` borrows its proxy). Every wait has a deadline: a regression
//! fails a test instead of hanging it.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use serde_json::Value;
use sha2::{Digest, Sha256};
use splitfdstream::client::{LayerItem, Proxy, ProxyConfig};
use splitfdstream::helper::server::{MAX_OPEN_IMAGES, MAX_OPEN_STREAMS};
use splitfdstream::proto::fdpass::Transport;
use splitfdstream::proto::rpc::{self, LayerSelector, Request, StreamEnd, code};
use splitfdstream::proto::source::Store;
use splitfdstream::proto::stream::{self, Item};

/// Longest wait for any reply or pipe read that should come at once.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// What the issue asks for: EOF and the store lock within this long after a cancel.
const PROMPT: Duration = Duration::from_secs(1);
/// How long a request or lock that must stay pending is watched.
const PENDING_CHECK: Duration = Duration::from_millis(500);
/// The idle timeout the idle tests give their helper.
const SHORT_IDLE: Duration = Duration::from_secs(1);
/// How many handles the cap tests ask for (the reproduction used 40).
const ASKED: usize = 40;

fn example_store() -> Store {
    Store::OciLayout {
        dir: concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello-oci").into(),
    }
}

/// A helper process on a raw transport; killed (if still running) on drop.
struct Helper {
    t: Transport,
    child: Child,
    next_id: u64,
}

impl Helper {
    /// Start `splitfdstream helper` for `store` with `extra` arguments and initialise it.
    fn start(store: &Store, extra: &[&str]) -> Helper {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_splitfdstream"))
            .args(["helper", "--socket-fd", "0", "--store", &store.to_string()])
            .args(extra)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            // Read only by the test that expects something there; helpers write little.
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut h = Helper {
            t: Transport::new(ours),
            child,
            next_id: 1,
        };
        let r = h.call(Request::Initialize(rpc::InitializeParams::default()));
        assert!(r["result"].is_object(), "{r}");
        h
    }

    fn send(&mut self, req: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.t.send(&rpc::request_message(id, &req), &[]).unwrap();
        id
    }

    /// The next reply, within `timeout`.
    fn recv(&mut self, id: u64, timeout: Duration) -> (Value, Vec<OwnedFd>) {
        let deadline = Instant::now() + timeout;
        let (reply, fds) = self
            .t
            .recv_with(&mut |sock| wait_fd(sock, PollFlags::IN, deadline))
            .unwrap_or_else(|e| panic!("reply to request {id}: {e}"))
            .unwrap_or_else(|| panic!("the helper closed the connection before replying to {id}"));
        assert_eq!(reply["id"], id, "{reply}");
        (reply, fds)
    }

    fn call_fds(&mut self, req: Request) -> (Value, Vec<OwnedFd>) {
        let id = self.send(req);
        self.recv(id, REPLY_TIMEOUT)
    }

    fn call(&mut self, req: Request) -> Value {
        let (reply, fds) = self.call_fds(req);
        assert!(fds.is_empty(), "{reply}");
        reply
    }

    fn open_image(&mut self, reference: &str) -> Value {
        self.call(Request::OpenImage(rpc::OpenImageParams {
            reference: reference.into(),
        }))
    }

    fn image(&mut self, reference: &str) -> u64 {
        let r = self.open_image(reference);
        r["result"]["image"]
            .as_u64()
            .unwrap_or_else(|| panic!("{r}"))
    }

    /// `GetLayer`: `Ok((stream, pipe))`, or the error object.
    fn get_layer(
        &mut self,
        image: u64,
        layer: u64,
        threshold: Option<u64>,
    ) -> Result<(u64, OwnedFd), Value> {
        let (r, mut fds) = self.call_fds(Request::GetLayer(rpc::GetLayerParams {
            image,
            layer: LayerSelector::Index(layer),
            inline_threshold: threshold,
        }));
        if let Some(err) = r.get("error") {
            assert!(fds.is_empty());
            return Err(err.clone());
        }
        assert_eq!(fds.len(), 1, "{r}");
        Ok((r["result"]["stream"].as_u64().unwrap(), fds.pop().unwrap()))
    }

    fn get_layer_fds(&mut self, stream: u64) -> (rpc::GetLayerFdsResult, Vec<OwnedFd>) {
        let (r, fds) = self.call_fds(fds_request(stream));
        let result: rpc::GetLayerFdsResult = serde_json::from_value(r["result"].clone())
            .unwrap_or_else(|e| panic!("GetLayerFds {stream}: {e}: {r}"));
        assert_eq!(fds.len(), result.count as usize, "{r}");
        assert_eq!(result.crc64.len(), fds.len(), "{r}");
        (result, fds)
    }

    fn close_layer(&mut self, stream: u64) -> Value {
        self.call(Request::CloseLayer(rpc::CloseLayerParams { stream }))
    }

    /// Close our end of the connection (the helper process stays ours to reap).
    fn hang_up(&mut self) {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
        // A connected socket whose peer is already closed stands in for the real one.
        let (stand_in, _) = socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        drop(std::mem::replace(&mut self.t, Transport::new(stand_in)));
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the helper wrote to stderr, once it has exited.
    fn stderr(&mut self) -> String {
        let mut text = String::new();
        self.child
            .stderr
            .take()
            .expect("stderr is piped")
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    /// Wait for the helper to exit, at most `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the helper did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fds_request(stream: u64) -> Request {
    Request::GetLayerFds(rpc::GetLayerFdsParams {
        stream,
        max: rpc::MAX_FDS_PER_REPLY,
    })
}

/// Wait until `fd` reports `events` (or an error/hang-up), failing at `deadline`.
fn wait_fd(
    fd: std::os::fd::BorrowedFd<'_>,
    events: PollFlags,
    deadline: Instant,
) -> std::io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ));
        }
        let timeout = Timespec::try_from(left).unwrap();
        let mut fds = [PollFd::from_borrowed_fd(fd, events)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A pipe read end whose reads fail instead of blocking past a deadline.
struct TimedPipe {
    fd: OwnedFd,
    deadline: Instant,
}

impl Read for TimedPipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        wait_fd(self.fd.as_fd(), PollFlags::IN, self.deadline)?;
        Ok(rustix::io::read(&self.fd, buf)?)
    }
}

/// Read `pipe` to EOF, which must come before `deadline`; returns the bytes read.
fn drain_to_eof(pipe: &OwnedFd, deadline: Instant, what: &str) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        if let Err(e) = wait_fd(pipe.as_fd(), PollFlags::IN, deadline) {
            panic!("{what}: no end of file on the layer pipe ({e}) after {total} bytes");
        }
        match rustix::io::read(pipe, &mut buf).unwrap() {
            0 => return total,
            n => total += n as u64,
        }
    }
}

/// Read a whole layer stream, pulling its fds as references come, then its `end`; returns
/// the `sha256:` of the rebuilt tar and the end.
fn read_layer(h: &mut Helper, stream: u64, pipe: OwnedFd) -> (String, StreamEnd) {
    read_layer_paced(h, stream, pipe, 0, Duration::ZERO)
}

/// [`read_layer`], pausing `pause` after each of the first `slow_bodies` fd bodies.
fn read_layer_paced(
    h: &mut Helper,
    stream: u64,
    pipe: OwnedFd,
    slow_bodies: u64,
    pause: Duration,
) -> (String, StreamEnd) {
    let mut reader = stream::Reader::new(TimedPipe {
        fd: pipe,
        deadline: Instant::now() + REPLY_TIMEOUT * 3,
    });
    let mut sha = Sha256::new();
    let mut fds = std::collections::VecDeque::new();
    let mut end = None;
    let mut body = Vec::new();
    while let Some(item) = reader.next_item().unwrap() {
        match item {
            Item::Inline(bytes) => sha.update(bytes),
            Item::FdRef { index, size } => {
                while fds.is_empty() {
                    assert!(end.is_none(), "fd {index} referenced after the end");
                    let (r, got) = h.get_layer_fds(stream);
                    fds.extend(got);
                    end = r.end;
                }
                body.clear();
                File::from(fds.pop_front().unwrap())
                    .read_to_end(&mut body)
                    .unwrap();
                assert_eq!(body.len() as u64, size, "fd {index}");
                sha.update(&body);
                if index < slow_bodies {
                    std::thread::sleep(pause);
                }
            }
        }
    }
    while end.is_none() {
        let (r, got) = h.get_layer_fds(stream);
        fds.extend(got);
        end = r.end;
    }
    assert!(fds.is_empty(), "{} fds never referenced", fds.len());
    (
        format!("sha256:{}", hex::encode(sha.finalize())),
        end.unwrap(),
    )
}

/// Ask for a writer's lock (`F_SETLKW`, `F_WRLCK`, whole file) on `path` from a thread of this
/// process, as podman does before it changes the store; the receiver gets the moment it was
/// granted. The lock is dropped right after.
fn request_write_lock(path: &Path) -> mpsc::Receiver<Instant> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        rustix::fs::fcntl_lock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let _ = tx.send(Instant::now());
    });
    rx
}

/// Wait until the producer has written into `pipe` (so it holds the store lock), then a little
/// longer so it is blocked on the client.
fn wait_until_streaming(pipe: &OwnedFd) {
    wait_fd(pipe.as_fd(), PollFlags::IN, Instant::now() + REPLY_TIMEOUT)
        .expect("the producer never wrote into the pipe");
    std::thread::sleep(Duration::from_millis(300));
}

/// Wait until the producer stopped filling `pipe` (it is blocked on the full pipe: the kernel
/// counts a pipe full by its pages, so the byte count stops a little short of the capacity);
/// returns when the pipe last grew, which is when the producer blocked.
fn wait_until_pipe_stops_growing(pipe: &OwnedFd) -> Instant {
    /// Unchanged for this long counts as blocked; the producer writes far more often.
    const STABLE: Duration = Duration::from_millis(100);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let (mut last, mut changed) = (0, Instant::now());
    loop {
        let queued = rustix::io::ioctl_fionread(pipe).unwrap();
        if queued != last {
            (last, changed) = (queued, Instant::now());
        } else if queued > 0 && changed.elapsed() >= STABLE {
            return changed;
        }
        assert!(
            Instant::now() < deadline,
            "the producer kept writing for {REPLY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a Threads: line")
}

fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Poll `f` until it is true, at most `timeout`.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn failed_message(end: &StreamEnd) -> &str {
    match end {
        StreamEnd::Failed { message } => message,
        other => panic!("expected a failed end, got {other:?}"),
    }
}

#[test]
fn streams_past_the_cap_are_refused_and_the_accepted_ones_stream() {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    let mut h = Helper::start(&f.store(), &[]);
    let image = h.image(&many.reference);
    // Inline threshold 1 MiB: the 20 MB layer is all inline, so every producer blocks on its
    // full pipe and stays alive.
    let mut accepted = Vec::new();
    for i in 0..ASKED {
        match h.get_layer(image, 0, Some(rpc::MAX_INLINE_THRESHOLD)) {
            Ok(s) => accepted.push(s),
            Err(e) => {
                assert!(i >= MAX_OPEN_STREAMS, "request {i} refused: {e}");
                assert_eq!(e["code"], code::LIMIT_EXCEEDED, "{e}");
                assert_eq!(e["code"], -32014);
                assert_eq!(
                    e["message"],
                    format!(
                        "cannot stream layer {}: {MAX_OPEN_STREAMS} layer streams are open, the \
                         most a session may hold (CloseLayer releases one)",
                        many.diff_ids[0]
                    ),
                );
            }
        }
    }
    assert_eq!(accepted.len(), MAX_OPEN_STREAMS);
    // One thread per producer and the one serving the socket; nothing for refused requests.
    let threads = threads_of(h.pid());
    assert!(
        threads <= MAX_OPEN_STREAMS + 1,
        "{threads} helper threads with {MAX_OPEN_STREAMS} streams"
    );
    // Each accepted stream is the exact layer, read one after the other.
    let mut handles = Vec::new();
    for (stream, pipe) in accepted {
        let (digest, end) = read_layer(&mut h, stream, pipe);
        assert_eq!(digest, many.diff_ids[0], "stream {stream}");
        assert!(matches!(end, StreamEnd::Complete { .. }), "{end:?}");
        handles.push(stream);
    }
    // Ended streams still count until CloseLayer; closing one makes room for one.
    let e = h
        .get_layer(image, 0, None)
        .expect_err("ended streams still count");
    assert_eq!(e["code"], code::LIMIT_EXCEEDED, "{e}");
    assert_eq!(h.close_layer(handles[0])["result"], serde_json::json!({}));
    let (stream, pipe) = h.get_layer(image, 0, None).expect("a free slot");
    let (digest, _) = read_layer(&mut h, stream, pipe);
    assert_eq!(digest, many.diff_ids[0]);
    let e = h.get_layer(image, 0, None).expect_err("full again");
    assert_eq!(e["code"], code::LIMIT_EXCEEDED, "{e}");
}

#[test]
fn images_past_the_cap_are_refused_and_the_accepted_ones_stream() {
    let Some(f) = common::fixtures() else { return };
    let basic = f.image("basic");
    let mut h = Helper::start(&f.store(), &[]);
    let mut accepted = Vec::new();
    for i in 0..ASKED {
        let r = h.open_image(&basic.reference);
        match r.get("error") {
            None => accepted.push(r["result"]["image"].as_u64().unwrap()),
            Some(e) => {
                assert!(i >= MAX_OPEN_IMAGES, "request {i} refused: {e}");
                assert_eq!(e["code"], code::LIMIT_EXCEEDED, "{e}");
                assert_eq!(
                    e["message"],
                    format!(
                        "cannot open image {:?}: {MAX_OPEN_IMAGES} images are open, the most a \
                         session may hold (CloseImage releases one)",
                        basic.reference
                    ),
                );
            }
        }
    }
    assert_eq!(accepted.len(), MAX_OPEN_IMAGES);
    // Every accepted image streams its layers exactly (bodies over 64 bytes as fds).
    for (i, &image) in accepted.iter().enumerate() {
        let layer = i % basic.diff_ids.len();
        let (stream, pipe) = h.get_layer(image, layer as u64, None).unwrap();
        let (digest, end) = read_layer(&mut h, stream, pipe);
        assert_eq!(digest, basic.diff_ids[layer], "image {image} layer {layer}");
        assert!(
            matches!(end, StreamEnd::Complete { fds, .. } if fds > 0),
            "{end:?}"
        );
        assert_eq!(h.close_layer(stream)["result"], serde_json::json!({}));
    }
    let r = h.call(Request::CloseImage(rpc::CloseImageParams {
        image: accepted[3],
    }));
    assert!(r["result"].is_object(), "{r}");
    let r = h.open_image(&basic.reference);
    assert!(
        r["result"]["image"].is_u64(),
        "a free slot after CloseImage: {r}"
    );
    let r = h.open_image(&basic.reference);
    assert_eq!(r["error"]["code"], code::LIMIT_EXCEEDED, "{r}");
}

/// `CloseLayer` on an unread stream of a private copy of the store: EOF and the writer's lock
/// within [`PROMPT`], all of the helper's fds for the stream closed.
fn close_layer_releases_everything(threshold: u64) {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    let private = f.private_store(&["many"]);
    let mut h = Helper::start(&private.store(), &[]);
    let image = h.image(&many.reference);
    let baseline_fds = fds_of(h.pid());
    let (stream, pipe) = h.get_layer(image, 0, Some(threshold)).unwrap();
    wait_until_streaming(&pipe);
    let granted = request_write_lock(&private.graphroot.join("overlay-layers/layers.lock"));
    assert!(
        granted.recv_timeout(PENDING_CHECK).is_err(),
        "a writer got the store while a stream was open"
    );
    let closed = Instant::now();
    assert_eq!(h.close_layer(stream)["result"], serde_json::json!({}));
    drain_to_eof(&pipe, closed + PROMPT, "after CloseLayer");
    let at = granted
        .recv_timeout((closed + PROMPT).saturating_duration_since(Instant::now()))
        .unwrap_or_else(|_| panic!("the writer's lock was not granted within {PROMPT:?}"));
    assert!(at - closed < PROMPT, "lock granted after {:?}", at - closed);
    // The queued fds, the pipe's write end and the cancel eventfd are all closed.
    assert!(
        eventually(PROMPT, || fds_of(h.pid()) <= baseline_fds),
        "helper holds {} fds, {baseline_fds} before the stream",
        fds_of(h.pid())
    );
    let r = h.close_layer(stream);
    assert_eq!(r["error"]["code"], code::BAD_HANDLE, "{r}");
    let r = h.call(fds_request(stream));
    assert_eq!(r["error"]["code"], code::BAD_HANDLE, "{r}");
}

#[test]
fn close_layer_stops_a_producer_blocked_on_a_full_pipe() {
    close_layer_releases_everything(rpc::MAX_INLINE_THRESHOLD);
}

#[test]
fn close_layer_stops_a_producer_waiting_for_window_space() {
    // Threshold 0: ~20,000 bodies as fds, far more than the fd window.
    close_layer_releases_everything(0);
}

#[test]
fn an_idle_stream_is_cancelled_and_releases_the_store() {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    let private = f.private_store(&["many"]);
    let idle = SHORT_IDLE.as_secs().to_string();
    let mut h = Helper::start(&private.store(), &["--idle-timeout", &idle]);
    let image = h.image(&many.reference);
    let (stream, pipe) = h
        .get_layer(image, 0, Some(rpc::MAX_INLINE_THRESHOLD))
        .unwrap();
    // From here on the producer waits for this client, which reads nothing.
    let blocked = wait_until_pipe_stops_growing(&pipe);
    let granted = request_write_lock(&private.graphroot.join("overlay-layers/layers.lock"));
    // Not before the idle time has passed (the producer blocked within a few ms of `blocked`).
    let early = (blocked + SHORT_IDLE - Duration::from_millis(100))
        .saturating_duration_since(Instant::now());
    assert!(
        granted.recv_timeout(early).is_err(),
        "the lock was released before the idle time"
    );
    let at = granted
        .recv_timeout(SHORT_IDLE + PROMPT)
        .expect("the idle stream kept the store locked");
    let after = at - blocked;
    assert!(
        after < SHORT_IDLE + PROMPT,
        "lock released {after:?} after the producer blocked"
    );
    drain_to_eof(&pipe, Instant::now() + PROMPT, "after the idle timeout");
    let (r, _) = h.get_layer_fds(stream);
    assert_eq!(r.count, 0);
    let end = r.end.expect("an end after the idle timeout");
    let message = failed_message(&end);
    assert_eq!(
        message,
        format!(
            "layer {} ({}): cancelled after 1s idle: the client read neither the stream's pipe \
             nor its descriptors for that long (idle timeout)",
            many.diff_ids[0], many.layer_ids[0]
        )
    );
    // The end is kept until CloseLayer.
    let (again, _) = h.get_layer_fds(stream);
    assert_eq!(again.end.as_ref(), Some(&end));
    assert_eq!(h.close_layer(stream)["result"], serde_json::json!({}));
}

#[test]
fn a_slow_but_live_consumer_is_not_cut_off() {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    // Pauses of a quarter of the idle time between reads of 2 MiB, about 2.5 idle times in
    // all; the margin is for a machine so loaded that a pause overruns.
    let idle = SHORT_IDLE * 2;
    let pause = idle / 4;
    let mut h = Helper::start(&f.store(), &["--idle-timeout", &idle.as_secs().to_string()]);
    let image = h.image(&many.reference);
    let (stream, pipe) = h
        .get_layer(image, 0, Some(rpc::MAX_INLINE_THRESHOLD))
        .unwrap();
    let started = Instant::now();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 2 << 20];
    let mut pipe = TimedPipe {
        fd: pipe,
        deadline: Instant::now() + REPLY_TIMEOUT * 3,
    };
    loop {
        std::thread::sleep(pause);
        let mut filled = 0;
        while filled < buf.len() {
            match pipe.read(&mut buf[filled..]).unwrap() {
                0 => break,
                n => filled += n,
            }
        }
        // The raw stream bytes; compared below with a full-speed read, which is decoded.
        sha.update(&buf[..filled]);
        if filled < buf.len() {
            break;
        }
    }
    assert!(
        started.elapsed() > idle * 2,
        "the layer was read too fast to test anything: {:?}",
        started.elapsed()
    );
    let (r, _) = h.get_layer_fds(stream);
    assert!(
        matches!(r.end, Some(StreamEnd::Complete { .. })),
        "{:?}",
        r.end
    );
    // And the same layer read at full speed gives the same stream bytes.
    let (stream2, pipe2) = h
        .get_layer(image, 0, Some(rpc::MAX_INLINE_THRESHOLD))
        .unwrap();
    let mut all = Vec::new();
    TimedPipe {
        fd: pipe2,
        deadline: Instant::now() + REPLY_TIMEOUT,
    }
    .read_to_end(&mut all)
    .unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&all)),
        hex::encode(sha.finalize())
    );
    let mut reader = stream::Reader::new(&all[..]);
    let mut tar = Sha256::new();
    while let Some(item) = reader.next_item().unwrap() {
        match item {
            Item::Inline(b) => tar.update(b),
            Item::FdRef { .. } => panic!("threshold 1 MiB sends no fds here"),
        }
    }
    assert_eq!(
        format!("sha256:{}", hex::encode(tar.finalize())),
        many.diff_ids[0]
    );
    let _ = h.get_layer_fds(stream2);
}

#[test]
fn a_consumer_slow_between_fd_batches_is_not_cut_off() {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    let idle = SHORT_IDLE.as_secs().to_string();
    let mut h = Helper::start(&f.store(), &["--idle-timeout", &idle]);
    let image = h.image(&many.reference);
    // Threshold 0: some 20,000 bodies as fds, so the producer keeps waiting for window space
    // while this client works through each batch of 253 fds for longer than the idle time; it
    // reads the pipe all along, which is progress.
    let pause = Duration::from_millis(6);
    let slow = 3 * u64::from(rpc::MAX_FDS_PER_REPLY);
    assert!(pause * rpc::MAX_FDS_PER_REPLY > SHORT_IDLE);
    let (stream, pipe) = h.get_layer(image, 0, Some(0)).unwrap();
    let (digest, end) = read_layer_paced(&mut h, stream, pipe, slow, pause);
    assert!(matches!(end, StreamEnd::Complete { .. }), "{end:?}");
    assert_eq!(digest, many.diff_ids[0]);
}

#[test]
fn proxy_config_idle_timeout_reaches_the_helper() {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    let config = ProxyConfig {
        helper_exe: Some(env!("CARGO_BIN_EXE_splitfdstream").into()),
        idle_timeout: Some(SHORT_IDLE),
        ..ProxyConfig::new(f.store())
    };
    let mut proxy = Proxy::spawn(&config).unwrap();
    let image = proxy.open_image(&many.reference).unwrap();
    let mut layer = proxy
        .get_layer(image.image, LayerSelector::Index(0), Some(0))
        .unwrap();
    // Take the first item, then stop reading for twice the idle time.
    assert!(matches!(
        layer.next_item().unwrap(),
        Some(LayerItem::Inline(_))
    ));
    std::thread::sleep(SHORT_IDLE * 2 + Duration::from_millis(500));
    let err = loop {
        match layer.next_item() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the layer completed despite the idle client"),
            Err(e) => break format!("{e:#}"),
        }
    };
    assert!(
        err.contains("cancelled after 1s idle") && err.contains("(idle timeout)"),
        "{err}"
    );
}

#[test]
fn end_is_repeated_until_close_layer_and_close_after_end_answers_empty() {
    let mut h = Helper::start(&example_store(), &[]);
    let opened = h.open_image("hello");
    let image = opened["result"]["image"].as_u64().unwrap();
    let (stream, pipe) = h.get_layer(image, 1, None).unwrap();
    let (digest, end) = read_layer(&mut h, stream, pipe);
    assert_eq!(digest, opened["result"]["layers"][1]["diffId"], "{opened}");
    assert!(matches!(end, StreamEnd::Complete { .. }), "{end:?}");
    for _ in 0..3 {
        let (r, fds) = h.get_layer_fds(stream);
        assert_eq!((r.count, fds.len()), (0, 0));
        assert!(r.crc64.is_empty());
        assert_eq!(
            r.end.as_ref(),
            Some(&end),
            "§3.4: the same end until CloseLayer"
        );
    }
    let r = h.close_layer(stream);
    assert_eq!(
        r["result"],
        serde_json::json!({}),
        "§3.5: {{}} after end: {r}"
    );
    let r = h.close_layer(stream);
    assert_eq!(r["error"]["code"], code::BAD_HANDLE, "{r}");
    assert_eq!(
        r["error"]["message"],
        format!("unknown stream handle {stream}")
    );
    let r = h.call(fds_request(stream));
    assert_eq!(r["error"]["code"], code::BAD_HANDLE, "{r}");
    // An end that was never asked for is dropped with the handle too.
    let (stream, pipe) = h.get_layer(image, 0, None).unwrap();
    drain_to_eof(&pipe, Instant::now() + REPLY_TIMEOUT, "a complete layer");
    assert_eq!(h.close_layer(stream)["result"], serde_json::json!({}));
    let r = h.call(Request::Shutdown(rpc::ShutdownParams {}));
    assert!(r["result"].is_object(), "{r}");
    assert!(h.wait_exit(REPLY_TIMEOUT).success());
}

#[test]
fn a_panicking_producer_ends_its_stream_failed() {
    let Some(f) = common::fixtures() else { return };
    let basic = f.image("basic");
    let private = f.private_store(&["basic"]);
    let mut h = Helper::start(&private.store(), &["--inject-fault", "producer-panic"]);
    let image = h.image(&basic.reference);
    for layer in 0..2u64 {
        let (stream, pipe) = h.get_layer(image, layer, None).unwrap();
        drain_to_eof(
            &pipe,
            Instant::now() + REPLY_TIMEOUT,
            "after the producer panicked",
        );
        let (r, fds) = h.get_layer_fds(stream);
        assert_eq!((r.count, fds.len()), (0, 0));
        let end = r.end.expect("an end after the panic");
        let i = layer as usize;
        assert_eq!(
            failed_message(&end),
            format!(
                "layer {} ({}): the helper's producer panicked: injected fault producer-panic \
                 (helper --inject-fault, for tests only)",
                basic.diff_ids[i], basic.layer_ids[i]
            )
        );
        let (again, _) = h.get_layer_fds(stream);
        assert_eq!(again.end.as_ref(), Some(&end));
        assert_eq!(h.close_layer(stream)["result"], serde_json::json!({}));
    }
    // The panics released the store's lock on the way out.
    let granted = request_write_lock(&private.graphroot.join("overlay-layers/layers.lock"));
    granted
        .recv_timeout(PROMPT)
        .expect("a panicked producer kept the store locked");
    // And the helper still serves.
    let r = h.call(Request::Shutdown(rpc::ShutdownParams {}));
    assert!(r["result"].is_object(), "{r}");
    assert!(h.wait_exit(REPLY_TIMEOUT).success());
    // The panics were reported where a client's error messages look (its stderr tail).
    let stderr = h.stderr();
    assert_eq!(
        stderr
            .matches("injected fault producer-panic (helper --inject-fault, for tests only)")
            .count(),
        2,
        "{stderr}"
    );
}

#[test]
fn shutdown_abandons_a_blocked_stream() {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    let private = f.private_store(&["many"]);
    let mut h = Helper::start(&private.store(), &[]);
    let image = h.image(&many.reference);
    let (_stream, pipe) = h.get_layer(image, 0, Some(0)).unwrap();
    wait_until_streaming(&pipe);
    let granted = request_write_lock(&private.graphroot.join("overlay-layers/layers.lock"));
    assert!(granted.recv_timeout(PENDING_CHECK).is_err());
    let asked = Instant::now();
    let r = h.call(Request::Shutdown(rpc::ShutdownParams {}));
    assert!(r["result"].is_object(), "{r}");
    assert!(h.wait_exit(PROMPT).success());
    drain_to_eof(&pipe, asked + PROMPT, "after Shutdown");
    granted
        .recv_timeout(PROMPT)
        .expect("the lock after Shutdown");
}

#[test]
fn hanging_up_during_get_layer_fds_ends_the_session() {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    let private = f.private_store(&["many"]);
    let mut h = Helper::start(&private.store(), &[]);
    let image = h.image(&many.reference);
    // All inline: the producer blocks on the unread pipe and never queues an fd, so a
    // GetLayerFds waits (the client breaks §4.3's rule, and then gives up).
    let (stream, pipe) = h
        .get_layer(image, 0, Some(rpc::MAX_INLINE_THRESHOLD))
        .unwrap();
    wait_until_streaming(&pipe);
    let granted = request_write_lock(&private.graphroot.join("overlay-layers/layers.lock"));
    let id = h.send(fds_request(stream));
    assert!(
        h.t.recv_with(&mut |sock| wait_fd(sock, PollFlags::IN, Instant::now() + PENDING_CHECK))
            .is_err(),
        "GetLayerFds of request {id} answered while the producer is blocked"
    );
    let hung_up = Instant::now();
    h.hang_up();
    let status = h.wait_exit(PROMPT);
    assert!(status.success(), "{status}");
    drain_to_eof(&pipe, hung_up + PROMPT, "after the client hung up");
    granted
        .recv_timeout(PROMPT)
        .expect("the lock after the client hung up");
}
