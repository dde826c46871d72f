//! The protocol server: one connection, one store, one thread owning the socket.
//!
//! Each `GetLayer` starts a producer thread that writes the layer's splitfdstream into a pipe
//! and queues the content fds; `GetLayerFds` hands queued fds to the client in stream order.
//!
//! Deadlock freedom rests on two orderings in the producer (see `proto/rpc.md` §4.4):
//! 1. an fd is queued **before** its reference is written into the pipe, so a client that has
//!    read reference `n` can always get fd `n` without waiting for the producer;
//! 2. the producer **flushes** the pipe before it waits for window space, so every queued fd's
//!    reference is readable and the client will come for those fds.
//!
//! A client must not be able to pin the helper or the store (`proto/rpc.md` §4.2, §4.6):
//! - a session holds at most [`MAX_OPEN_IMAGES`] images and [`MAX_OPEN_STREAMS`] streams;
//! - every wait of a producer for its client (a full pipe, a full fd window) can be cancelled:
//!   the pipe's write end is non-blocking and a blocked write `poll`s the pipe together with the
//!   stream's cancel eventfd, and window waits are condvar waits with a deadline. `CloseLayer`,
//!   `Shutdown`, the client hanging up and the idle timeout all cancel through that one path,
//!   after which the producer drops the pipe, its open files and the store's read lock;
//! - a producer that panics still ends its stream (`failed`), so no `GetLayerFds` waits forever.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::event::{PollFd, PollFlags, Timespec};
use serde::Serialize;
use serde_json::Value;

use super::{Backend, BackendError, OpenedImage};
use crate::proto::fdpass::Transport;
use crate::proto::rpc::{self, Request, RpcError, code};
use crate::proto::source::Store;

mod stream_producer;
use stream_producer::{Cancel, Producer, Shared};

/// Capabilities announced by `Initialize`.
pub const CAPABILITIES: &[&str] = &[
    "containers-storage",
    "oci-layout",
    "crc64",
    "inline-threshold",
];

/// Most images a session may hold open at once (`OpenImage` past it fails with
/// [`code::LIMIT_EXCEEDED`]). Each holds its manifest, config and layer list, which the store
/// bounds only by [`super::cstor::MAX_BIG_DATA_LEN`] each. `pull` holds one image per helper
/// and tools that compare images a few, so 8 never stands in a real client's way while it
/// caps what one session can make the helper keep.
pub const MAX_OPEN_IMAGES: usize = 8;

/// Most layer streams a session may hold at once, counted from `GetLayer` until `CloseLayer`
/// (an ended stream still holds its handle, its `end` and any fds not handed out), plus
/// closed streams whose producer has not stopped yet. Past it `GetLayer` fails with
/// [`code::LIMIT_EXCEEDED`]. Each stream costs a thread, a pipe buffer of up to 1 MiB
/// and up to one fd window of open files; `pull` uses one stream per helper at a time, so 8
/// leaves room for clients that overlap a few layers while keeping one session's cost under
/// 8 threads, 8 MiB of pipes and 8 windows of fds.
pub const MAX_OPEN_STREAMS: usize = 8;

/// How long a producer may wait for its client without any progress (no byte taken from the
/// pipe, no `GetLayerFds`) before the stream is cancelled with `failed`, unless the helper was
/// started with another time (`helper --idle-timeout`, [`ServeOptions::idle_timeout`]). Until
/// then an abandoned stream keeps the store's read lock, which stalls podman's pulls, commits
/// and removals. A live client leaves the pipe alone only while it handles one body it already
/// holds, so this must exceed the time to read the largest body on a slow disk: 15 minutes is
/// a 50 GiB body at 64 MiB/s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Longest idle timeout honoured (a year, which for a stream means never); longer ones are
/// cut to it, so that deadline arithmetic on `Instant` cannot overflow.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long `CloseLayer`, `Shutdown` and the end of a session wait for cancelled producers to
/// stop before they answer anyway. A cancelled producer stops within microseconds unless a
/// system call outside the protocol holds it (waiting for a store writer's lock, a hung
/// filesystem); it then stops by itself later, and still counts against [`MAX_OPEN_STREAMS`].
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How often a `GetLayerFds` waiting for its producer checks whether the client hung up, so a
/// vanished client ends the session even while its producers are busy.
const HANGUP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// How often, per idle time, a producer waiting for window space looks whether the client read
/// its pipe: the idle timeout then errs by at most this fraction of the idle time.
const PIPE_SAMPLES_PER_IDLE: u32 = 16;

/// fds kept open ahead of the client per stream when RLIMIT_NOFILE does not force fewer. Large
/// enough that the client rarely waits for the producer; small enough that many concurrent
/// streams stay far from any fd limit.
const MAX_WINDOW: usize = 512;

/// fds reserved for everything that is not a queued content fd (socket, pipes, store files,
/// tar-split readers, libc): the window is what is left of the soft limit, halved.
const RESERVED_FDS: u64 = 32;

/// Pipe buffer requested for layer streams: bigger pipes mean fewer context switches between
/// producer and client on inline-heavy layers.
const PIPE_SIZE: usize = 1 << 20;

/// The fd window for this process: half of what the soft RLIMIT_NOFILE leaves after 32 fds
/// reserved for everything else, at least 1, at most 512.
pub fn fd_window() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let usable = soft.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(usable)
        .unwrap_or(MAX_WINDOW)
        .clamp(1, MAX_WINDOW)
}

/// A fault the helper injects on purpose (`helper --inject-fault NAME`). **For tests only**:
/// it lets them check that the protocol survives helper bugs. Never use it in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// `producer-panic`: every layer producer panics at its first write, while it holds the
    /// store's lock and its pipe.
    ProducerPanic,
}

impl std::str::FromStr for Fault {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "producer-panic" => Ok(Fault::ProducerPanic),
            other => bail!("unknown fault {other:?} (known: producer-panic)"),
        }
    }
}

/// How a helper serves its session; [`Default`] is what production uses.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// See [`DEFAULT_IDLE_TIMEOUT`]; tests shorten it. At most [`MAX_IDLE_TIMEOUT`] is used.
    pub idle_timeout: Duration,
    /// A fault to inject, for tests only (see [`Fault`]).
    pub fault: Option<Fault>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            fault: None,
        }
    }
}

impl ServeOptions {
    /// Options from the `helper` command line: `--idle-timeout SECS` (decimal seconds, > 0,
    /// at most [`MAX_IDLE_TIMEOUT`]) and `--inject-fault NAME`, each optional.
    ///
    /// # Errors
    /// A value that is not a number of seconds in that range, or an unknown fault.
    pub fn from_helper_args(
        idle_timeout: Option<&str>,
        inject_fault: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut options = Self::default();
        if let Some(secs) = idle_timeout {
            options.idle_timeout = secs
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|t| *t <= MAX_IDLE_TIMEOUT)
                .with_context(|| {
                    format!(
                        "--idle-timeout {secs:?} is not a number of seconds above 0 and at most \
                         {}",
                        MAX_IDLE_TIMEOUT.as_secs()
                    )
                })?;
        }
        options.fault = inject_fault.map(str::parse).transpose()?;
        Ok(options)
    }
}

struct Session {
    store: Store,
    backend: Option<Arc<dyn Backend>>,
    initialized: bool,
    images: HashMap<u64, Arc<OpenedImage>>,
    streams: HashMap<u64, Arc<Shared>>,
    /// Streams closed before their producer stopped (it was stuck beyond [`STOP_GRACE`]):
    /// they still hold a thread, so they count against [`MAX_OPEN_STREAMS`] until it stops.
    stopping: Vec<Arc<Shared>>,
    next_handle: u64,
    window: usize,
    options: ServeOptions,
}

impl Drop for Session {
    fn drop(&mut self) {
        // The client hung up or the connection broke: abandon every stream, so no producer
        // keeps the store locked for a client that is gone.
        self.stop_all();
    }
}

/// Serve the protocol on `sock` for `store` until the client shuts down or hangs up, with the
/// default [`ServeOptions`].
///
/// # Errors
/// Fatal transport errors (the connection is unusable); request errors are replies.
pub fn serve(sock: OwnedFd, store: Store) -> anyhow::Result<()> {
    serve_with(sock, store, &ServeOptions::default())
}

/// [`serve`] with explicit options.
///
/// # Errors
/// As [`serve`].
pub fn serve_with(sock: OwnedFd, store: Store, options: &ServeOptions) -> anyhow::Result<()> {
    let mut transport = Transport::new(sock);
    let mut session = Session {
        store,
        backend: None,
        initialized: false,
        images: HashMap::new(),
        streams: HashMap::new(),
        stopping: Vec::new(),
        next_handle: 1,
        window: fd_window(),
        options: ServeOptions {
            idle_timeout: options.idle_timeout.min(MAX_IDLE_TIMEOUT),
            ..options.clone()
        },
    };
    loop {
        let (msg, fds) = match transport.recv() {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => {
                if let Some(code) = e.rpc_code() {
                    // Best effort: tell the peer why before closing.
                    let err = RpcError::new(code, format!("{:#}", anyhow::Error::new(e)));
                    let _ = transport.send(&rpc::error_message(&Value::Null, &err), &[]);
                    anyhow::bail!("{}", err.message);
                }
                return Err(anyhow::Error::new(e).context("receiving request"));
            }
        };
        // A message without a usable id is answered with id null (proto/rpc.md §2).
        let id = msg
            .get("id")
            .filter(|id| id.is_u64() || id.is_i64() || id.is_string())
            .cloned()
            .unwrap_or(Value::Null);
        let outcome = session.handle(&msg, fds, transport.as_fd());
        let shutdown = matches!(outcome, Outcome::Shutdown);
        let (reply, reply_fds) = match outcome {
            Outcome::Reply(result, fds) => (rpc::result_message(&id, &result), fds),
            Outcome::Shutdown => (rpc::result_message(&id, &serde_json::json!({})), Vec::new()),
            Outcome::Error(err) => (rpc::error_message(&id, &err), Vec::new()),
            // Nobody to answer; dropping the session abandons every stream.
            Outcome::HungUp => return Ok(()),
        };
        let borrowed: Vec<BorrowedFd<'_>> = reply_fds.iter().map(|f| f.as_fd()).collect();
        transport.send(&reply, &borrowed).context("sending reply")?;
        drop(reply_fds);
        if shutdown {
            return Ok(());
        }
    }
}

enum Outcome {
    Reply(Value, Vec<OwnedFd>),
    Error(RpcError),
    Shutdown,
    /// The client closed the connection while a request waited.
    HungUp,
}

fn reply(result: &impl Serialize, fds: Vec<OwnedFd>) -> Outcome {
    Outcome::Reply(
        serde_json::to_value(result).expect("results always serialise"),
        fds,
    )
}

fn empty_reply() -> Outcome {
    reply(&rpc::EmptyResult {}, Vec::new())
}

/// Has the peer of `sock` closed its end? (`POLLHUP` is reported without being asked for.)
fn hung_up(sock: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(sock, PollFlags::empty())];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
}

impl Session {
    fn handle(&mut self, msg: &Value, fds: Vec<OwnedFd>, sock: BorrowedFd<'_>) -> Outcome {
        let req = match rpc::parse_request(msg) {
            Ok(r) => r,
            Err(e) => return Outcome::Error(e),
        };
        // No request carries fds (proto/rpc.md §2); any that came are closed here.
        if !fds.is_empty() {
            drop(fds);
            return Outcome::Error(RpcError::new(
                code::INVALID_PARAMS,
                format!("{} does not take file descriptors", req.method()),
            ));
        }
        if !self.initialized && !matches!(req, Request::Initialize(_) | Request::Shutdown(_)) {
            return Outcome::Error(RpcError::new(
                code::NOT_INITIALIZED,
                "Initialize must be the first call",
            ));
        }
        match req {
            Request::Initialize(p) => self.initialize(p),
            Request::OpenImage(p) => self.open_image(&p.reference),
            Request::GetLayer(p) => self.get_layer(p),
            Request::GetLayerFds(p) => self.get_layer_fds(p, sock),
            Request::CloseLayer(p) => self.close_layer(p.stream),
            Request::CloseImage(p) => match self.images.remove(&p.image) {
                Some(_) => empty_reply(),
                None => bad_handle("image", p.image),
            },
            Request::Shutdown(_) => {
                self.stop_all();
                Outcome::Shutdown
            }
        }
    }

    fn initialize(&mut self, p: rpc::InitializeParams) -> Outcome {
        if self.initialized {
            return Outcome::Error(RpcError::new(
                code::NOT_INITIALIZED,
                "Initialize called twice",
            ));
        }
        if let Some(v) = p
            .protocol_version
            .as_deref()
            .filter(|v| !rpc::version_compatible(v))
        {
            return Outcome::Error(RpcError::new(
                code::VERSION_MISMATCH,
                format!(
                    "client protocol {v} is incompatible with helper protocol {}",
                    rpc::PROTOCOL_VERSION
                ),
            ));
        }
        self.initialized = true;
        reply(
            &rpc::InitializeResult {
                protocol_version: rpc::PROTOCOL_VERSION.into(),
                helper_version: env!("CARGO_PKG_VERSION").into(),
                capabilities: CAPABILITIES.iter().map(|c| (*c).into()).collect(),
            },
            Vec::new(),
        )
    }

    fn backend(&mut self) -> Result<Arc<dyn Backend>, RpcError> {
        if self.backend.is_none() {
            let backend = super::open_backend(&self.store).map_err(|e| {
                RpcError::new(
                    code::STORE_ERROR,
                    format!("opening store {}: {e:#}", self.store),
                )
            })?;
            self.backend = Some(Arc::from(backend));
        }
        Ok(self.backend.clone().expect("set above"))
    }

    fn open_image(&mut self, reference: &str) -> Outcome {
        // Before any store access: a refused request costs the helper nothing.
        if self.images.len() >= MAX_OPEN_IMAGES {
            return Outcome::Error(RpcError::new(
                code::LIMIT_EXCEEDED,
                format!(
                    "cannot open image {reference:?}: {} images are open, the most a session \
                     may hold (CloseImage releases one)",
                    self.images.len()
                ),
            ));
        }
        let backend = match self.backend() {
            Ok(b) => b,
            Err(e) => return Outcome::Error(e),
        };
        // The store the image was found in: with additional image stores, not always the
        // backend's root.
        let (opened, store_root) = match backend.open_image_at(reference) {
            Ok((o, root)) => (o, root.to_str().map(str::to_owned)),
            Err(BackendError::ImageNotFound(m)) => {
                return Outcome::Error(RpcError::new(code::IMAGE_NOT_FOUND, m));
            }
            Err(e) => {
                return Outcome::Error(RpcError::new(
                    code::STORE_ERROR,
                    format!("opening image {reference:?}: {:#}", anyhow::Error::new(e)),
                ));
            }
        };
        let handle = self.handle_id();
        let result = rpc::OpenImageResult {
            image: handle,
            image_id: opened.image_id.clone(),
            manifest: opened.manifest.clone(),
            manifest_digest: opened.manifest_digest.clone(),
            config: opened.config.clone(),
            config_digest: opened.config_digest.clone(),
            layers: opened.layers.clone(),
            store_root,
        };
        self.images.insert(handle, Arc::new(opened));
        reply(&result, Vec::new())
    }

    fn handle_id(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    /// Streams that count against [`MAX_OPEN_STREAMS`]: open handles, and closed ones whose
    /// producer is still running.
    fn live_streams(&mut self) -> usize {
        self.stopping.retain(|s| !s.stopped());
        self.streams.len() + self.stopping.len()
    }

    fn get_layer(&mut self, p: rpc::GetLayerParams) -> Outcome {
        let Some(image) = self.images.get(&p.image).cloned() else {
            return bad_handle("image", p.image);
        };
        let index = match &p.layer {
            rpc::LayerSelector::Index(i) => {
                usize::try_from(*i).ok().filter(|i| *i < image.layers.len())
            }
            rpc::LayerSelector::DiffId(d) => image.layers.iter().position(|l| &l.diff_id == d),
        };
        let Some(index) = index else {
            return Outcome::Error(RpcError::new(
                code::LAYER_NOT_FOUND,
                format!(
                    "image {} has no layer {:?} ({} layers)",
                    image.image_id,
                    p.layer,
                    image.layers.len()
                ),
            ));
        };
        let threshold = p.inline_threshold.unwrap_or(rpc::DEFAULT_INLINE_THRESHOLD);
        if threshold > rpc::MAX_INLINE_THRESHOLD {
            return Outcome::Error(RpcError::new(
                code::INVALID_PARAMS,
                format!(
                    "inlineThreshold {threshold} exceeds {}",
                    rpc::MAX_INLINE_THRESHOLD
                ),
            ));
        }
        let live = self.live_streams();
        if live >= MAX_OPEN_STREAMS {
            let stopping = self.stopping.len();
            return Outcome::Error(RpcError::new(
                code::LIMIT_EXCEEDED,
                format!(
                    "cannot stream layer {}: {live} layer streams are open{}, the most a session \
                     may hold (CloseLayer releases one)",
                    image.layers[index].diff_id,
                    if stopping > 0 {
                        format!(" ({stopping} of them closed but still stopping)")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        let backend = match self.backend() {
            Ok(b) => b,
            Err(e) => return Outcome::Error(e),
        };
        self.start_producer(backend, image, index, threshold)
    }

    fn start_producer(
        &mut self,
        backend: Arc<dyn Backend>,
        image: Arc<OpenedImage>,
        index: usize,
        threshold: u64,
    ) -> Outcome {
        let internal = |what: &str, e: &dyn fmt::Display| {
            Outcome::Error(RpcError::new(code::INTERNAL_ERROR, format!("{what}: {e}")))
        };
        let (read_end, write_end) = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        {
            Ok(p) => p,
            Err(e) => return internal("creating layer pipe", &e),
        };
        // Only the helper's end is non-blocking (the client's is another open file
        // description), so a producer blocked on a full pipe can also watch for cancellation.
        if let Err(e) = rustix::fs::fcntl_setfl(&write_end, rustix::fs::OFlags::NONBLOCK) {
            return internal("making the layer pipe non-blocking", &e);
        }
        // Larger pipes are an optimisation; the default size works.
        let _ = rustix::pipe::fcntl_setpipe_size(&write_end, PIPE_SIZE);
        let shared = match Shared::new() {
            Ok(s) => Arc::new(s),
            Err(e) => return internal("creating the stream's cancel eventfd", &e),
        };
        let layer = image.layers[index].clone();
        let producer = Producer {
            backend,
            image,
            index,
            threshold,
            pipe: write_end,
            shared: shared.clone(),
            window: self.window,
            idle: self.options.idle_timeout,
            fault: self.options.fault,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("layer-{index}"))
            .spawn(move || producer.run());
        if let Err(e) = spawned {
            return internal("starting layer producer", &e);
        }
        let handle = self.handle_id();
        self.streams.insert(handle, shared);
        reply(
            &rpc::GetLayerResult {
                stream: handle,
                layer,
            },
            vec![read_end],
        )
    }

    fn get_layer_fds(&mut self, p: rpc::GetLayerFdsParams, sock: BorrowedFd<'_>) -> Outcome {
        let Some(shared) = self.streams.get(&p.stream).cloned() else {
            return bad_handle("stream", p.stream);
        };
        if p.max == 0 || p.max > rpc::MAX_FDS_PER_REPLY {
            return Outcome::Error(RpcError::new(
                code::INVALID_PARAMS,
                format!("max must be 1..={}, not {}", rpc::MAX_FDS_PER_REPLY, p.max),
            ));
        }
        let mut st = shared.lock();
        // Every producer wait ends (progress, cancel, idle timeout, or a panic caught into
        // `end`), so this loop ends too; the slices only let a hung-up client end the session
        // sooner.
        while st.queue.is_empty() && st.end.is_none() {
            st = shared
                .changed
                .wait_timeout(st, HANGUP_CHECK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if st.queue.is_empty() && st.end.is_none() && hung_up(sock) {
                return Outcome::HungUp;
            }
        }
        st.last_fds_call = Instant::now();
        let n = st.queue.len().min(p.max as usize);
        let batch: Vec<(OwnedFd, Option<u64>)> = st.queue.drain(..n).collect();
        // Once delivered, `end` is repeated to every later call until CloseLayer (§3.4).
        let end = if st.queue.is_empty() {
            st.end.clone()
        } else {
            None
        };
        drop(st);
        shared.changed.notify_all();
        let crc64 = batch
            .iter()
            .map(|(_, c)| c.map(|c| format!("{c:016x}")))
            .collect();
        let fds = batch.into_iter().map(|(fd, _)| fd).collect::<Vec<_>>();
        reply(
            &rpc::GetLayerFdsResult {
                count: fds.len() as u32,
                crc64,
                end,
            },
            fds,
        )
    }

    /// Release a stream; before its end, abandon it (§3.5) and wait briefly for the producer to
    /// stop, so that when the reply arrives the pipe is at EOF and the store lock is released.
    fn close_layer(&mut self, stream: u64) -> Outcome {
        let Some(shared) = self.streams.remove(&stream) else {
            return bad_handle("stream", stream);
        };
        shared.cancel(Cancel::Closed);
        if !shared.wait_stopped(STOP_GRACE) {
            self.stopping.push(shared);
        }
        empty_reply()
    }

    /// Abandon every stream and wait (at most [`STOP_GRACE`] in all) for their producers.
    fn stop_all(&mut self) {
        let all: Vec<Arc<Shared>> = self
            .streams
            .drain()
            .map(|(_, s)| s)
            .chain(self.stopping.drain(..))
            .collect();
        for shared in &all {
            shared.cancel(Cancel::SessionEnded);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for shared in &all {
            shared.wait_stopped(deadline.saturating_duration_since(Instant::now()));
        }
    }
}

fn bad_handle(kind: &str, handle: u64) -> Outcome {
    Outcome::Error(RpcError::new(
        code::BAD_HANDLE,
        format!("unknown {kind} handle {handle}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::stream_producer::*;
    use super::*;
    use std::io::Write;

    #[test]
    fn helper_args_parse_into_options() {
        let o = ServeOptions::from_helper_args(None, None).unwrap();
        assert_eq!(o.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(o.fault, None);
        let o = ServeOptions::from_helper_args(Some("1"), Some("producer-panic")).unwrap();
        assert_eq!(o.idle_timeout, Duration::from_secs(1));
        assert_eq!(o.fault, Some(Fault::ProducerPanic));
        let o = ServeOptions::from_helper_args(Some("0.25"), None).unwrap();
        assert_eq!(o.idle_timeout, Duration::from_millis(250));
        for bad in ["0", "-1", "", "1s", "NaN", "inf", "1e300", "31536001"] {
            let err = ServeOptions::from_helper_args(Some(bad), None).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "--idle-timeout {bad:?} is not a number of seconds above 0 and at most \
                     31536000"
                )
            );
        }
        let err = ServeOptions::from_helper_args(None, Some("crash")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown fault \"crash\" (known: producer-panic)"
        );
    }

    #[test]
    fn the_window_is_large_enough_for_a_full_reply() {
        // `proto/rpc.md` §4.2: at least one full GetLayerFds reply, unless RLIMIT_NOFILE is
        // below what that needs (the test process runs with a normal limit).
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        if soft >= 2 * u64::from(rpc::MAX_FDS_PER_REPLY) + RESERVED_FDS {
            assert!(fd_window() >= rpc::MAX_FDS_PER_REPLY as usize);
        }
    }

    #[test]
    fn cancelling_closes_the_queue_and_wakes_pollers() {
        let shared = Shared::new().unwrap();
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        shared.lock().queue.push_back((w, None));
        shared.cancel(Cancel::Closed);
        shared.cancel(Cancel::SessionEnded);
        assert!(shared.check_cancelled().is_err());
        assert!(
            matches!(shared.lock().cancel, Some(Cancel::Closed)),
            "first reason kept"
        );
        // The queued write end is closed: the read end sees EOF.
        assert_eq!(rustix::io::read(&r, &mut [0u8; 1]).unwrap(), 0);
        // The eventfd is readable.
        let mut fds = [PollFd::new(&shared.cancel_fd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(rustix::event::poll(&mut fds, Some(&zero)).unwrap(), 1);
    }

    /// A non-blocking pipe of the smallest size (one page), and a writer on it.
    fn small_pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        rustix::fs::fcntl_setfl(&w, rustix::fs::OFlags::NONBLOCK).unwrap();
        let _ = rustix::pipe::fcntl_setpipe_size(&w, 4096);
        (r, w)
    }

    #[test]
    fn a_writer_on_an_unread_pipe_gives_up_after_the_idle_time() {
        let shared = Shared::new().unwrap();
        let (_r, w) = small_pipe();
        let idle = Duration::from_millis(200);
        let mut writer = PipeWriter {
            pipe: w.as_fd(),
            shared: &shared,
            idle,
        };
        let started = Instant::now();
        let err = writer.write_all(&vec![0u8; 1 << 20]).unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.to_string(), "layer stream cancelled");
        assert!(took >= idle && took < idle * 5, "gave up after {took:?}");
        assert!(matches!(shared.lock().cancel, Some(Cancel::Idle(t)) if t == idle));
    }

    #[test]
    fn a_blocked_writer_stops_when_cancelled() {
        let shared = Shared::new().unwrap();
        let (_r, w) = small_pipe();
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut writer = PipeWriter {
                    pipe: w.as_fd(),
                    shared: &shared,
                    idle: Duration::from_secs(3600),
                };
                writer.write_all(&vec![0u8; 1 << 20])
            });
            std::thread::sleep(Duration::from_millis(100));
            let cancelled = Instant::now();
            shared.cancel(Cancel::Closed);
            let result = writer.join().unwrap();
            assert!(result.is_err());
            assert!(cancelled.elapsed() < Duration::from_millis(500));
        });
    }
}
