//! The parent side: spawn a helper, talk to it, read layer streams.
//!
//! ```no_run
//! use splitfdstream::client::{LayerItem, Proxy, ProxyConfig};
//! use splitfdstream::proto::rpc::LayerSelector;
//!
//! let source: splitfdstream::proto::source::ImageRef = "oci:examples/hello-oci:hello".parse()?;
//! let mut proxy = Proxy::spawn(&ProxyConfig::new(source.store.clone()))?;
//! let image = proxy.open_image(&source.reference)?;
//! let mut layer = proxy.get_layer(image.image, LayerSelector::Index(0), None)?;
//! while let Some(item) = layer.next_item()? {
//!     match item {
//!         LayerItem::Inline(bytes) => { /* exact tar bytes */ let _ = bytes; }
//!         LayerItem::File { fd, size, .. } => { /* reflink or copy `size` bytes from `fd` */ let _ = (fd, size); }
//!     }
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Every blocking wait on the socket is raced against the helper's exit (a pidfd), so a helper
//! that dies mid-request is an error carrying its exit status and the tail of its stderr, never a
//! hang. Layer pipes need no such race: the helper holds their only write end, so its death is EOF.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::proto::fdpass::{Transport, TransportError};
use crate::proto::rpc::{
    self, LayerInfo, LayerSelector, OpenImageResult, Request, RpcError, StreamEnd,
};
use crate::proto::source::Store;
use crate::proto::stream::{self, Item};

/// How long a rootless helper may take to enter its user namespace.
const HANDSHAKE_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

/// Bytes of the helper's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// How long to wait for the helper's last stderr bytes after it exited.
const STDERR_GRACE: Duration = Duration::from_millis(300);

/// fds the client keeps free for itself (sockets, pipes, repository files) when sizing batches.
const RESERVED_FDS: u64 = 32;

/// How to start a helper.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The store the helper serves.
    pub store: Store,
    /// Program to run as the helper; default: the current executable.
    pub helper_exe: Option<PathBuf>,
    /// Command prefix that runs the helper with other privileges, e.g. `["sudo", "-n"]`,
    /// `["run0"]` or `["systemd-run", "--pipe", "--quiet"]`. The helper may be a grandchild
    /// then; it still ends with this process (see [`crate::helper::tie_to_parent`]).
    pub command_prefix: Vec<OsString>,
    /// Whether the helper runs in a user namespace of its own (rootless stores).
    pub userns: UsernsMode,
    /// How long the helper lets a layer stream wait for this client without progress before
    /// it cancels the stream (`proto/rpc.md` §4.6), at most a year; `None`: the helper's
    /// default (`helper::server::DEFAULT_IDLE_TIMEOUT`, 15 minutes).
    pub idle_timeout: Option<Duration>,
}

impl ProxyConfig {
    /// Run the current executable as helper for `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            helper_exe: None,
            command_prefix: Vec::new(),
            userns: UsernsMode::Auto,
            idle_timeout: None,
        }
    }
}

/// Whether a helper runs in a user namespace of its own, mapped from `/etc/subuid` and
/// `/etc/subgid` as podman maps a rootless store's ids (see [`crate::userns`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UsernsMode {
    /// When this process is not root, runs in the initial user namespace (not under `podman
    /// unshare`), starts the helper without a command prefix, and the store is a
    /// containers-storage store whose graph root it owns: a rootless store.
    #[default]
    Auto,
    /// Never: the helper reads the store with this process's ids.
    Never,
    /// Always (an error where user namespaces cannot be made).
    Always,
}

impl UsernsMode {
    /// Does a helper for `config` need its own user namespace? With it, the store to name to
    /// the helper. The helper resolves that store inside the namespace as this process would
    /// (its configuration files, drop-ins and additional image stores included): it is told
    /// this process's uid as podman tells its own re-executed child, through
    /// `_CONTAINERS_USERNS_CONFIGURED` and `_CONTAINERS_ROOTLESS_UID` (see
    /// [`StorageEnv::from_process`](crate::helper::cstor::config::StorageEnv::from_process)).
    fn decide(config: &ProxyConfig) -> anyhow::Result<Option<Store>> {
        let wanted = match config.userns {
            UsernsMode::Never => return Ok(None),
            UsernsMode::Always => true,
            UsernsMode::Auto => {
                !rustix::process::geteuid().is_root()
                    && config.command_prefix.is_empty()
                    && !crate::userns::in_user_namespace()
                    && std::env::var_os("_CONTAINERS_USERNS_CONFIGURED").is_none()
                    && matches!(config.store, Store::ContainersStorage { .. })
            }
        };
        if !wanted {
            return Ok(None);
        }
        let store = match &config.store {
            Store::ContainersStorage { .. } => {
                use crate::helper::cstor::config::{StorageEnv, resolve};
                let loc = resolve(&config.store, &StorageEnv::from_process())?;
                if config.userns == UsernsMode::Auto {
                    // Only the user's own store: anyone else's ids are not the user's to map.
                    let owner = rustix::fs::stat(&loc.graphroot).map(|st| st.st_uid);
                    if owner.ok() != Some(rustix::process::geteuid().as_raw()) {
                        return Ok(None);
                    }
                }
                // Not the resolved roots: a source naming its graph root is a store without
                // the configuration's additional image stores (see `cstor::config`).
                config.store.clone()
            }
            other => other.clone(),
        };
        Ok(Some(store))
    }
}

/// A connection to a helper, and the helper process when this client started it. Dropping it
/// kills and reaps that process.
#[derive(Debug)]
pub struct Proxy {
    transport: Transport,
    /// `None` for a connection made by someone else ([`Proxy::attach`]).
    process: Option<HelperProcess>,
    next_id: u64,
    fd_batch: u32,
    readahead: u64,
    info: rpc::InitializeResult,
}

/// Bytes at the start of each received body that the kernel is asked to read ahead
/// (`POSIX_FADV_WILLNEED`) when its fd arrives. Bodies arrive in batches before they are used,
/// so on a cold cache the reads of the next bodies overlap the hashing of the current one; the
/// kernel's own sequential readahead takes over beyond this.
pub const DEFAULT_READAHEAD: u64 = 2 << 20;

/// How many received bodies ahead of the consumer are being read ahead: enough to keep the
/// disk busy while one body is hashed, few enough that readahead never floods the device
/// queue or the page cache (at most `READAHEAD_FILES × readahead` bytes in flight).
const READAHEAD_FILES: usize = 8;

/// Ask the kernel to start reading the first `len` bytes of `fd`. Only advice: errors (a
/// filesystem without readahead) change nothing.
fn advise_willneed(fd: &OwnedFd, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(fd, 0, Some(len), rustix::fs::Advice::WillNeed);
    }
}

#[derive(Debug, Default)]
struct StderrTail {
    bytes: VecDeque<u8>,
    eof: bool,
}

/// Errors a caller may want to branch on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The helper answered with a JSON-RPC error.
    #[error("helper: {0}")]
    Rpc(RpcError),
    /// The helper process exited.
    #[error("helper exited ({status}){stderr}")]
    HelperExited {
        /// Its exit status.
        status: ExitStatus,
        /// The tail of its stderr, prefixed with ": " when non-empty.
        stderr: String,
    },
    /// The helper speaks an incompatible protocol version.
    #[error("helper speaks protocol {theirs}, this client {ours}")]
    VersionMismatch {
        /// The helper's version.
        theirs: String,
        /// Ours.
        ours: &'static str,
    },
}

/// A helper process this client started, with the reader of its stderr. Dropping it kills and
/// reaps the helper.
#[derive(Debug)]
pub(crate) struct HelperProcess {
    child: Child,
    /// Raced against every blocking wait, so a dead helper is an error, never a hang.
    pidfd: OwnedFd,
    stderr: Arc<Mutex<StderrTail>>,
    /// Reads the helper's stderr; joined on drop so no thread or pipe outlives the process.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl HelperProcess {
    fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_child(&self.child)
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        // PR_SET_PDEATHSIG in the helper is only a backstop; the parent ends the child itself.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // The reader sees EOF once the helper is gone, unless something the helper started
        // still holds its stderr; then it is left to finish on its own rather than block here.
        if let Some(reader) = self.stderr_reader.take() {
            let deadline = Instant::now() + STDERR_GRACE;
            while !reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }
}

impl Proxy {
    /// Start a helper for `config.store` and initialize the session.
    ///
    /// # Errors
    /// The helper cannot be started, dies, or speaks an incompatible protocol.
    pub fn spawn(config: &ProxyConfig) -> anyhow::Result<Proxy> {
        let mut proxy = Self::start(config)?;
        proxy.initialize()?;
        Ok(proxy)
    }

    /// Initialize a session on `sock`, a socket already connected to a helper that someone
    /// else started: the fd `OpenJSONRPCFdPass` of `splitfdstream experimental-image-proxy`
    /// returns (`proto/image-proxy.md`), or one end of a socketpair whose other end a helper
    /// was given as `--socket-fd`. Without a process to watch, a helper that dies is seen as
    /// the connection closing; [`helper_pid`](Self::helper_pid) is `None`.
    ///
    /// # Errors
    /// The peer does not answer `Initialize`, or speaks an incompatible protocol.
    pub fn attach(sock: OwnedFd) -> anyhow::Result<Proxy> {
        let mut proxy = Self::from_parts(sock, None);
        proxy
            .initialize()
            .context("initializing a session on an inherited helper socket")?;
        Ok(proxy)
    }

    /// Start a helper for `config.store` (its user namespace mapped where it has one) without
    /// initializing a session: the connected socket, for another process to
    /// [`attach`](Self::attach) to, and the process, which lives as long as the returned value.
    pub(crate) fn spawn_detached(config: &ProxyConfig) -> anyhow::Result<(OwnedFd, HelperProcess)> {
        let mut proxy = Self::start(config)?;
        let process = proxy
            .process
            .take()
            .expect("a started helper has a process");
        // A duplicate: this `Proxy`'s own descriptor closes with it. Nothing has been received
        // on the socket yet, so no buffered bytes are lost.
        let sock = proxy
            .transport
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the helper socket")?;
        Ok((sock, process))
    }

    /// `Initialize`, with the version check.
    fn initialize(&mut self) -> anyhow::Result<()> {
        let (info, _): (rpc::InitializeResult, _) =
            self.call(&Request::Initialize(rpc::InitializeParams {
                protocol_version: Some(rpc::PROTOCOL_VERSION.into()),
            }))?;
        if !rpc::version_compatible(&info.protocol_version) {
            return Err(ProxyError::VersionMismatch {
                theirs: info.protocol_version,
                ours: rpc::PROTOCOL_VERSION,
            }
            .into());
        }
        self.info = info;
        Ok(())
    }

    /// Start a helper and connect to it; no session yet.
    fn start(config: &ProxyConfig) -> anyhow::Result<Proxy> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
        let userns_store = UsernsMode::decide(config)?;
        // Read before anything starts, so a missing range is the first and only error.
        let maps = match userns_store {
            Some(_) => Some(crate::userns::IdMaps::for_current_user()?),
            None => None,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .context("creating helper socketpair")?;
        let exe = match &config.helper_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("locating the current executable")?,
        };
        let mut cmd = match config.command_prefix.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        // The socket becomes the child's stdin: inheriting it needs no unsafe `pre_exec`, and the
        // fd number is still passed explicitly.
        cmd.arg("helper")
            .arg("--socket-fd")
            .arg("0")
            .arg("--store")
            .arg(userns_store.as_ref().unwrap_or(&config.store).to_string())
            .arg("--parent-pid")
            .arg(std::process::id().to_string());
        if let Some(idle) = config.idle_timeout {
            cmd.arg("--idle-timeout")
                .arg(idle.as_secs_f64().to_string());
        }
        cmd.stdin(Stdio::from(theirs)).stderr(Stdio::piped());
        // A rootless helper reports through its stdout that it entered its namespace.
        let entered = match maps {
            Some(_) => {
                let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                    .context("creating the user namespace handshake pipe")?;
                // The helper is uid 0 in its namespace; as under `podman unshare`, its store is
                // still this user's.
                cmd.arg("--userns")
                    .env("_CONTAINERS_USERNS_CONFIGURED", "done")
                    .env(
                        "_CONTAINERS_ROOTLESS_UID",
                        rustix::process::geteuid().as_raw().to_string(),
                    )
                    .stdout(Stdio::from(w));
                Some(r)
            }
            None => {
                cmd.stdout(Stdio::null());
                None
            }
        };
        let child = cmd
            .spawn()
            .with_context(|| format!("starting helper {}", exe.display()))?;
        // `cmd` holds the handshake pipe's write end; without it the read end sees EOF when
        // the helper dies.
        drop(cmd);
        let mut proxy = Proxy::adopt(child, ours)?;
        if let (Some(maps), Some(entered)) = (maps, entered) {
            proxy
                .map_user_namespace(&maps, entered)
                .context("starting a rootless helper")?;
        }
        Ok(proxy)
    }

    /// A `Proxy` for a freshly spawned helper: its pidfd, its stderr reader, the transport.
    fn adopt(mut child: Child, sock: OwnedFd) -> anyhow::Result<Proxy> {
        // Not reaped until we wait, so the pid cannot be reused before pidfd_open.
        let pid = rustix::process::Pid::from_child(&child);
        let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(anyhow::Error::new(e).context("pidfd_open on the helper"));
            }
        };
        let stderr = Arc::new(Mutex::new(StderrTail::default()));
        let mut stderr_reader = None;
        if let Some(pipe) = child.stderr.take() {
            match spawn_stderr_reader(pipe, stderr.clone()) {
                Ok(handle) => stderr_reader = Some(handle),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(anyhow::Error::new(e).context("starting helper stderr reader"));
                }
            }
        }
        let process = HelperProcess {
            child,
            pidfd,
            stderr,
            stderr_reader,
        };
        Ok(Self::from_parts(sock, Some(process)))
    }

    fn from_parts(sock: OwnedFd, process: Option<HelperProcess>) -> Proxy {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let fd_batch = u32::try_from(soft.saturating_sub(RESERVED_FDS) / 2)
            .unwrap_or(rpc::MAX_FDS_PER_REPLY)
            .clamp(1, rpc::MAX_FDS_PER_REPLY);
        Proxy {
            transport: Transport::new(sock),
            process,
            next_id: 1,
            fd_batch,
            readahead: DEFAULT_READAHEAD,
            info: rpc::InitializeResult {
                protocol_version: String::new(),
                helper_version: String::new(),
                capabilities: vec![],
            },
        }
    }

    /// The parent's half of the rootless handshake (see [`crate::userns`]): wait until the
    /// helper is in its new user namespace, write its id maps, let it go on.
    fn map_user_namespace(
        &mut self,
        maps: &crate::userns::IdMaps,
        entered: OwnedFd,
    ) -> anyhow::Result<()> {
        let process = self
            .process
            .as_ref()
            .expect("a started helper has a process");
        let pid = process.pid();
        let mut byte = [0u8; 1];
        let got = wait_readable(
            entered.as_fd(),
            Some(process.pidfd.as_fd()),
            HANDSHAKE_TIMEOUT,
        )
        .and_then(|()| Ok(rustix::io::read(&entered, &mut byte)?));
        match got {
            Ok(1) if byte[0] == crate::userns::ENTERED => {}
            Ok(_) | Err(_) => {
                let why = got.map_or_else(|e| e.to_string(), |_| "no handshake".to_owned());
                return Err(self
                    .exit_error()
                    .unwrap_or_else(|| anyhow!("the helper did not enter its namespace: {why}")));
            }
        }
        maps.apply(pid)?;
        rustix::net::send(
            &self.transport,
            &[crate::userns::MAPPED],
            rustix::net::SendFlags::NOSIGNAL,
        )
        .map_err(|e| {
            self.exit_error()
                .unwrap_or_else(|| anyhow::Error::new(e).context("releasing the helper"))
        })?;
        Ok(())
    }

    /// What the helper announced in `Initialize`.
    pub fn helper_info(&self) -> &rpc::InitializeResult {
        &self.info
    }

    /// The helper's process id (for diagnostics and tests); `None` for a helper this client did
    /// not start ([`attach`](Self::attach)).
    pub fn helper_pid(&self) -> Option<rustix::process::Pid> {
        self.process.as_ref().map(HelperProcess::pid)
    }

    /// Most fds asked for per `GetLayerFds`: half of this process's soft RLIMIT_NOFILE (less a
    /// reserve) by default, as if this proxy were the only one. A program that streams through
    /// several proxies at once must divide the limit among them with
    /// [`set_fd_batch`](Self::set_fd_batch), as [`crate::pull::pull`] does.
    pub fn fd_batch(&self) -> u32 {
        self.fd_batch
    }

    /// Bytes of each received body to read ahead as soon as its fd arrives (0: none). For
    /// consumers that never read the bodies (pure reflink copies) 0 saves the disk the work.
    pub fn set_readahead(&mut self, bytes: u64) {
        self.readahead = bytes;
    }

    /// Limit the fds asked for per `GetLayerFds` (1..=253).
    pub fn set_fd_batch(&mut self, n: u32) {
        self.fd_batch = n.clamp(1, rpc::MAX_FDS_PER_REPLY);
    }

    /// One request/response exchange; the reply's fds are returned with the typed result.
    fn call<T: DeserializeOwned>(&mut self, req: &Request) -> anyhow::Result<(T, Vec<OwnedFd>)> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = rpc::request_message(id, req);
        if let Err(e) = self.transport.send(&msg, &[]) {
            return Err(self
                .exit_error()
                .unwrap_or_else(|| anyhow::Error::new(e).context("sending request to helper")));
        }
        let pidfd = self.process.as_ref().map(|p| p.pidfd.as_fd());
        let received = self
            .transport
            .recv_with(&mut |sock| wait_readable(sock, pidfd, None));
        let (reply, fds) = match received {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(self
                    .exit_error()
                    .unwrap_or_else(|| anyhow!("helper closed the connection")));
            }
            Err(e) => {
                return Err(self.exit_error().unwrap_or_else(|| {
                    anyhow::Error::new(e).context("receiving reply from helper")
                }));
            }
        };
        if reply.get("id").and_then(Value::as_u64) != Some(id) {
            bail!(
                "helper replied to request {:?}, expected {id}",
                reply.get("id")
            );
        }
        if let Some(err) = reply.get("error") {
            let err: RpcError =
                serde_json::from_value(err.clone()).context("malformed error reply from helper")?;
            return Err(ProxyError::Rpc(err).into());
        }
        let result = reply
            .get("result")
            .cloned()
            .ok_or_else(|| anyhow!("helper reply has neither result nor error"))?;
        let typed = serde_json::from_value(result).context("malformed result from helper")?;
        Ok((typed, fds))
    }

    /// If the helper has exited, the error describing how (with its stderr tail).
    fn exit_error(&mut self) -> Option<anyhow::Error> {
        // Give a dying helper a moment: an EOF on the socket can precede the exit by microseconds.
        let process = self.process.as_mut()?;
        let deadline = Instant::now() + Duration::from_millis(500);
        let status = loop {
            match process.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return None,
            }
        };
        let deadline = Instant::now() + STDERR_GRACE;
        while !process.stderr.lock().unwrap_or_else(|e| e.into_inner()).eof
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let tail = process.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: Vec<u8> = tail.bytes.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        let stderr = if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        };
        Some(ProxyError::HelperExited { status, stderr }.into())
    }

    /// Resolve an image in the helper's store.
    ///
    /// # Errors
    /// The image does not exist ([`ProxyError::Rpc`] with code -32010) or the helper failed.
    pub fn open_image(&mut self, reference: &str) -> anyhow::Result<OpenImageResult> {
        let (r, _) = self
            .call(&Request::OpenImage(rpc::OpenImageParams {
                reference: reference.into(),
            }))
            .with_context(|| format!("opening image {reference:?}"))?;
        Ok(r)
    }

    /// Release an image handle.
    ///
    /// # Errors
    /// Unknown handle or helper failure.
    pub fn close_image(&mut self, image: u64) -> anyhow::Result<()> {
        let (_, _): (Value, _) =
            self.call(&Request::CloseImage(rpc::CloseImageParams { image }))?;
        Ok(())
    }

    /// Start streaming a layer. Bodies of at most `inline_threshold` bytes (default 64) arrive inline.
    ///
    /// # Errors
    /// Unknown image handle or layer, or helper failure.
    pub fn get_layer(
        &mut self,
        image: u64,
        layer: LayerSelector,
        inline_threshold: Option<u64>,
    ) -> anyhow::Result<LayerStream<'_>> {
        let what = format!("{layer:?}");
        let (r, mut fds): (rpc::GetLayerResult, _) = self
            .call(&Request::GetLayer(rpc::GetLayerParams {
                image,
                layer,
                inline_threshold,
            }))
            .with_context(|| format!("requesting layer {what}"))?;
        if fds.len() != 1 {
            bail!(
                "helper sent {} fds with GetLayer, expected 1 (the stream pipe)",
                fds.len()
            );
        }
        let pipe = File::from(fds.pop().expect("checked length"));
        Ok(LayerStream {
            proxy: self,
            stream: r.stream,
            layer: r.layer,
            reader: Some(stream::Reader::new(pipe)),
            fds: VecDeque::new(),
            received: 0,
            end: None,
        })
    }

    /// End the session cleanly and reap the helper (when this client started it).
    ///
    /// # Errors
    /// The helper failed to shut down cleanly.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        let (_, _): (Value, _) = self.call(&Request::Shutdown(rpc::ShutdownParams {}))?;
        let Some(process) = self.process.as_mut() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = process.child.try_wait().context("waiting for helper")? {
                if !status.success() {
                    bail!("helper exited with {status} after Shutdown");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("helper did not exit within 5 s of Shutdown");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Read the helper's stderr into `tail` until it closes.
fn spawn_stderr_reader(
    mut pipe: std::process::ChildStderr,
    tail: Arc<Mutex<StderrTail>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("helper-stderr".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                t.bytes.extend(&buf[..n]);
                let excess = t.bytes.len().saturating_sub(STDERR_TAIL);
                t.bytes.drain(..excess);
            }
            tail.lock().unwrap_or_else(|e| e.into_inner()).eof = true;
        })
}

/// Block until `sock` is readable (at most `timeout`, if given); error if the helper exits
/// first.
fn wait_readable(
    sock: BorrowedFd<'_>,
    pidfd: Option<BorrowedFd<'_>>,
    timeout: Option<Duration>,
) -> std::io::Result<()> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut fds = vec![PollFd::new(&sock, PollFlags::IN)];
        fds.extend(pidfd.as_ref().map(|p| PollFd::new(p, PollFlags::IN)));
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out waiting for the helper",
            ));
        }
        let ts = left.map(|d| Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        match poll(&mut fds, ts.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        // Data already sent by a helper that then exited is still read first.
        if !fds[0].revents().is_empty() {
            return Ok(());
        }
        if fds.get(1).is_some_and(|p| !p.revents().is_empty()) {
            return Err(std::io::Error::other("helper exited"));
        }
    }
}

/// One item of a layer, in tar order.
#[derive(Debug)]
pub enum LayerItem<'a> {
    /// Exact tar bytes (headers, padding, small bodies).
    Inline(&'a [u8]),
    /// One whole regular-file body: a regular file of exactly `size` bytes (checked).
    File {
        /// The file, opened read-only by the helper.
        fd: OwnedFd,
        /// Body size from the tar header.
        size: u64,
        /// tar-split's CRC-64/ISO of the body, when the helper knows it.
        crc64: Option<u64>,
    },
}

/// A layer being received. Dropping it before the end abandons the stream.
#[derive(Debug)]
pub struct LayerStream<'p> {
    proxy: &'p mut Proxy,
    stream: u64,
    layer: LayerInfo,
    reader: Option<stream::Reader<File>>,
    fds: VecDeque<(OwnedFd, Option<u64>)>,
    received: u64,
    end: Option<StreamEnd>,
}

impl LayerStream<'_> {
    /// The layer being streamed.
    pub fn layer(&self) -> &LayerInfo {
        &self.layer
    }

    /// Next item, or `None` once the helper confirmed the layer complete and every count matched.
    ///
    /// # Errors
    /// A malformed stream, a bad fd, a helper-side failure (its message), or a helper that died.
    /// After an error the stream is unusable.
    pub fn next_item(&mut self) -> anyhow::Result<Option<LayerItem<'_>>> {
        let Some(reader) = self.reader.as_mut() else {
            bail!("layer {} stream already ended", self.layer.diff_id);
        };
        let item = match reader.next_item() {
            Ok(Some(Item::Inline(_))) => None,
            Ok(Some(Item::FdRef { index, size })) => Some((index, size, reader.offset())),
            Ok(None) => {
                let (entries, fd_refs, bytes) =
                    (reader.entries(), reader.fd_refs(), reader.tar_bytes());
                self.reader = None;
                return self.finish(entries, fd_refs, bytes).map(|()| None);
            }
            Err(e) => return Err(self.fail(anyhow::Error::new(e))),
        };
        // Inline bytes are re-borrowed here so the returned slice borrows `self` as a whole.
        let Some(item) = item else {
            return Ok(Some(LayerItem::Inline(
                self.reader.as_ref().expect("present").last_inline(),
            )));
        };
        let (index, size, offset) = item;
        if self.fds.is_empty() {
            if let Err(e) = self.fetch_fds() {
                return Err(self.fail(e));
            }
            if self.fds.is_empty() {
                let e = anyhow!(
                    "stream references fd {index} but the helper ended the stream without sending it"
                );
                return Err(self.fail(e));
            }
        }
        let (fd, crc64) = self.fds.pop_front().expect("checked non-empty");
        // Keep the readahead window READAHEAD_FILES bodies ahead of the consumer.
        if let Some((next, _)) = self.fds.get(READAHEAD_FILES - 1) {
            advise_willneed(next, self.proxy.readahead);
        }
        // The n-th reference must be the n-th fd received (the reader checks the order of indices).
        if let Err(e) = stream::check_file_fd(fd.as_fd(), index, size, offset) {
            return Err(self.fail(anyhow::Error::new(e)));
        }
        Ok(Some(LayerItem::File { fd, size, crc64 }))
    }

    fn fetch_fds(&mut self) -> anyhow::Result<()> {
        let max = self.proxy.fd_batch;
        let (r, fds): (rpc::GetLayerFdsResult, _) =
            self.proxy
                .call(&Request::GetLayerFds(rpc::GetLayerFdsParams {
                    stream: self.stream,
                    max,
                }))?;
        if fds.len() != r.count as usize || r.crc64.len() != fds.len() || r.count > max {
            bail!(
                "GetLayerFds reply says {} fds ({} CRCs), {} attached, {max} asked",
                r.count,
                r.crc64.len(),
                fds.len()
            );
        }
        for (fd, crc) in fds.into_iter().zip(r.crc64) {
            if self.fds.len() < READAHEAD_FILES {
                advise_willneed(&fd, self.proxy.readahead);
            }
            let crc = match crc {
                Some(hex) => Some(
                    u64::from_str_radix(&hex, 16)
                        .with_context(|| format!("bad crc64 {hex:?} from helper"))?,
                ),
                None => None,
            };
            self.fds.push_back((fd, crc));
        }
        self.received += self.fds.len() as u64;
        if let Some(end) = r.end {
            self.end = Some(end);
        }
        Ok(())
    }

    /// Clean end of the pipe: the helper must confirm the layer complete with matching counts.
    fn finish(&mut self, entries: u64, fd_refs: u64, bytes: u64) -> anyhow::Result<()> {
        while self.end.is_none() {
            self.fetch_fds().with_context(|| {
                format!(
                    "layer {} incomplete: no end status from the helper",
                    self.layer.diff_id
                )
            })?;
        }
        if !self.fds.is_empty() {
            bail!(
                "layer {}: helper sent {} fds that the stream never referenced",
                self.layer.diff_id,
                self.fds.len()
            );
        }
        match self.end.as_ref().expect("loop above") {
            StreamEnd::Complete {
                entries: e,
                fds: f,
                bytes: b,
            } if (*e, *f, *b) == (entries, fd_refs, bytes) => Ok(()),
            StreamEnd::Complete {
                entries: e,
                fds: f,
                bytes: b,
            } => bail!(
                "layer {}: helper reports {e} entries, {f} fds, {b} bytes; stream had {entries}, {fd_refs}, {bytes}",
                self.layer.diff_id
            ),
            StreamEnd::Failed { message } => bail!("helper failed to produce {message}"),
        }
    }

    /// Turn a reader or transport error into the most telling error: the helper's own failure
    /// message or its exit, when there is one.
    fn fail(&mut self, err: anyhow::Error) -> anyhow::Error {
        // Close our end first: a producer blocked on a full pipe then fails and reports.
        self.reader = None;
        let err = err.context(format!("reading layer {}", self.layer.diff_id));
        // A dead helper shows up here: `call` races every wait against its exit.
        let mut tries = 0;
        while self.end.is_none() && tries < 100_000 {
            tries += 1;
            self.fds.clear();
            if let Err(e) = self.fetch_fds() {
                // A broken connection fails every later call the same way; then the first
                // error is the telling one (MSG_CTRUNC from EMFILE, say). Otherwise the new
                // error may be the helper's exit, with its stderr.
                let first_was_transport = err
                    .chain()
                    .any(|c| c.downcast_ref::<TransportError>().is_some());
                let err = if first_was_transport { err } else { e };
                return err.context(format!("layer {} incomplete", self.layer.diff_id));
            }
        }
        match &self.end {
            Some(StreamEnd::Failed { message }) => {
                err.context(format!("helper failed to produce {message}"))
            }
            _ => err,
        }
    }
}

impl Drop for LayerStream<'_> {
    fn drop(&mut self) {
        // Close the pipe first so a producer still writing stops, then release the stream
        // (after a complete layer too: the helper keeps its end status until CloseLayer).
        self.reader = None;
        let _ = self
            .proxy
            .call::<Value>(&Request::CloseLayer(rpc::CloseLayerParams {
                stream: self.stream,
            }));
    }
}
