//! The protocol server: one connection, one store, one thread owning the socket.
//!
//! Each `GetLayer` starts a producer thread that writes the layer's splitfdstream into a pipe
//! and queues the content fds; `GetLayerFds` hands queued fds to the client in stream order.
//!
//! Deadlock freedom rests on two orderings in the producer (see `proto/rpc.md`):
//! 1. an fd is queued **before** its reference is written into the pipe, so a client that has
//!    read reference `n` can always get fd `n` without waiting for the producer;
//! 2. the producer **flushes** the pipe before it waits for window space, so every queued fd's
//!    reference is readable and the client will come for those fds.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use super::{Backend, BackendError, LayerSink, OpenedImage};
use crate::proto::fdpass::Transport;
use crate::proto::rpc::{self, Request, RpcError, StreamEnd, code};
use crate::proto::source::Store;
use crate::proto::stream;

/// Capabilities announced by `Initialize`.
pub const CAPABILITIES: &[&str] = &[
    "containers-storage",
    "oci-layout",
    "crc64",
    "inline-threshold",
];

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

#[derive(Debug, Default)]
struct StreamState {
    queue: VecDeque<(OwnedFd, Option<u64>)>,
    end: Option<StreamEnd>,
    /// The client abandoned the stream: the producer stops at its next step.
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<StreamState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        // A poisoned lock means a producer panicked; the state is still consistent for our use
        // (a queue and flags), so keep serving and let `end` report the failure.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes one layer into the pipe and the fd queue.
struct PipeSink<'a> {
    writer: stream::Writer<File>,
    shared: &'a Shared,
    window: usize,
    fds: u64,
    bytes: u64,
}

impl LayerSink for PipeSink<'_> {
    fn inline(&mut self, data: &[u8]) -> io::Result<()> {
        self.bytes += data.len() as u64;
        self.writer.write_inline(data)
    }

    fn file(&mut self, fd: OwnedFd, size: u64, crc64: Option<u64>) -> io::Result<()> {
        let mut st = self.shared.lock();
        if st.queue.len() >= self.window && !st.closed {
            drop(st);
            // Ordering 2: everything referenced so far must be readable before we wait.
            self.writer.flush()?;
            st = self.shared.lock();
            while st.queue.len() >= self.window && !st.closed {
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        if st.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "layer stream closed by the client",
            ));
        }
        // Ordering 1: queue the fd, then write its reference.
        st.queue.push_back((fd, crc64));
        drop(st);
        self.shared.changed.notify_all();
        self.writer.write_fd_ref(self.fds)?;
        self.fds += 1;
        self.bytes += size;
        Ok(())
    }
}

struct Session {
    store: Store,
    backend: Option<Arc<dyn Backend>>,
    initialized: bool,
    images: HashMap<u64, Arc<OpenedImage>>,
    streams: HashMap<u64, Arc<Shared>>,
    next_handle: u64,
    window: usize,
}

/// Serve the protocol on `sock` for `store` until the client shuts down or hangs up.
///
/// # Errors
/// Fatal transport errors (the connection is unusable); request errors are replies.
pub fn serve(sock: OwnedFd, store: Store) -> anyhow::Result<()> {
    let mut transport = Transport::new(sock);
    let mut session = Session {
        store,
        backend: None,
        initialized: false,
        images: HashMap::new(),
        streams: HashMap::new(),
        next_handle: 1,
        window: fd_window(),
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
        let outcome = session.handle(&msg, fds);
        let shutdown = matches!(outcome, Outcome::Shutdown);
        let (reply, reply_fds) = match outcome {
            Outcome::Reply(result, fds) => (rpc::result_message(&id, &result), fds),
            Outcome::Shutdown => (rpc::result_message(&id, &serde_json::json!({})), Vec::new()),
            Outcome::Error(err) => (rpc::error_message(&id, &err), Vec::new()),
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
}

fn reply(result: &impl Serialize, fds: Vec<OwnedFd>) -> Outcome {
    Outcome::Reply(
        serde_json::to_value(result).expect("results always serialise"),
        fds,
    )
}

impl Session {
    fn handle(&mut self, msg: &Value, fds: Vec<OwnedFd>) -> Outcome {
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
            Request::GetLayerFds(p) => self.get_layer_fds(p),
            Request::CloseLayer(p) => match self.streams.remove(&p.stream) {
                Some(shared) => {
                    shared.lock().closed = true;
                    shared.changed.notify_all();
                    reply(&serde_json::json!({}), Vec::new())
                }
                None => bad_handle("stream", p.stream),
            },
            Request::CloseImage(p) => match self.images.remove(&p.image) {
                Some(_) => reply(&serde_json::json!({}), Vec::new()),
                None => bad_handle("image", p.image),
            },
            Request::Shutdown(_) => {
                for shared in self.streams.values() {
                    shared.lock().closed = true;
                    shared.changed.notify_all();
                }
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
        let backend = match self.backend() {
            Ok(b) => b,
            Err(e) => return Outcome::Error(e),
        };
        let store_root = backend.root().to_str().map(str::to_owned);
        let opened = match backend.open_image(reference) {
            Ok(o) => o,
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
        let (read_end, write_end) = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        {
            Ok(p) => p,
            Err(e) => {
                return Outcome::Error(RpcError::new(
                    code::INTERNAL_ERROR,
                    format!("creating layer pipe: {e}"),
                ));
            }
        };
        // Larger pipes are an optimisation; the default size works.
        let _ = rustix::pipe::fcntl_setpipe_size(&write_end, PIPE_SIZE);
        let shared = Arc::new(Shared::default());
        let handle = self.handle_id();
        self.streams.insert(handle, shared.clone());
        let layer = image.layers[index].clone();
        let window = self.window;
        let spawned = std::thread::Builder::new()
            .name(format!("layer-{index}"))
            .spawn(move || {
                let mut sink = PipeSink {
                    writer: stream::Writer::new(File::from(write_end)),
                    shared: &shared,
                    window,
                    fds: 0,
                    bytes: 0,
                };
                let result = backend
                    .stream_layer(&image, index, threshold, &mut sink)
                    .and_then(|entries| {
                        sink.writer
                            .flush()
                            .map(|()| entries)
                            .context("writing layer stream")
                    });
                let (fds, bytes) = (sink.fds, sink.bytes);
                // Close the pipe before publishing the end, so a client that sees `end` also sees EOF.
                drop(sink);
                let end = match result {
                    Ok(entries) => StreamEnd::Complete {
                        entries,
                        fds,
                        bytes,
                    },
                    Err(e) => StreamEnd::Failed {
                        message: format!(
                            "layer {} ({}): {e:#}",
                            image.layers[index].diff_id, image.layers[index].id
                        ),
                    },
                };
                shared.lock().end = Some(end);
                shared.changed.notify_all();
            });
        if let Err(e) = spawned {
            self.streams.remove(&handle);
            return Outcome::Error(RpcError::new(
                code::INTERNAL_ERROR,
                format!("starting layer producer: {e}"),
            ));
        }
        reply(
            &rpc::GetLayerResult {
                stream: handle,
                layer,
            },
            vec![read_end],
        )
    }

    fn get_layer_fds(&mut self, p: rpc::GetLayerFdsParams) -> Outcome {
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
        while st.queue.is_empty() && st.end.is_none() {
            st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let n = st.queue.len().min(p.max as usize);
        let batch: Vec<(OwnedFd, Option<u64>)> = st.queue.drain(..n).collect();
        let end = if st.queue.is_empty() {
            st.end.clone()
        } else {
            None
        };
        drop(st);
        shared.changed.notify_all();
        if end.is_some() {
            self.streams.remove(&p.stream);
        }
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
}

fn bad_handle(kind: &str, handle: u64) -> Outcome {
    Outcome::Error(RpcError::new(
        code::BAD_HANDLE,
        format!("unknown {kind} handle {handle}"),
    ))
}
