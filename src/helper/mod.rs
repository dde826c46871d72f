//! The helper: serves one store's images as splitfdstreams over jsonrpc-fdpass.
//!
//! [`server`] speaks the protocol; a [`Backend`] per store kind ([`cstor`] for containers-storage,
//! [`oci_layout`] for OCI layouts) resolves images and produces each layer as inline bytes plus
//! open files through a [`LayerSink`]. The helper may run with more privilege than its client:
//! every request is validated, files are opened only beneath the layer's diff dir, and nothing
//! in the store is ever written.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crate::proto::rpc::LayerInfo;
use crate::proto::source::Store;

pub mod cstor;
pub mod oci_layout;
pub mod server;
pub mod tarsplit;

/// Receives one layer, in tar order: exact tar bytes inline, and regular-file bodies as fds.
pub trait LayerSink {
    /// Bytes of the layer tar, verbatim (headers, padding, small bodies, end blocks).
    ///
    /// # Errors
    /// The consumer went away or the pipe broke.
    fn inline(&mut self, data: &[u8]) -> io::Result<()>;
    /// One whole regular-file body: `fd` is a regular file of exactly `size` (> 0) bytes;
    /// `crc64` is tar-split's CRC-64/ISO of the content when known.
    ///
    /// # Errors
    /// The consumer went away or the pipe broke.
    fn file(&mut self, fd: OwnedFd, size: u64, crc64: Option<u64>) -> io::Result<()>;
    /// Called by backends between tar entries, so that a layer the consumer abandoned stops
    /// promptly even while no bytes are due (a run of entries gathered into one inline batch).
    ///
    /// # Errors
    /// The consumer abandoned the layer; the backend stops and returns the error.
    fn checkpoint(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Errors a backend reports to the server, which maps them to JSON-RPC codes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The reference does not resolve (or resolves to more than one image).
    #[error("{0}")]
    ImageNotFound(String),
    /// Anything else: unreadable store metadata, I/O errors, hostile content.
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

/// Where a layer's content lives, private to the backend that produced it.
#[derive(Debug, Clone)]
pub enum LayerLocator {
    /// containers-storage: the layer id, then its parents' ids (for metacopy fallback), top first.
    Cstor {
        /// This layer's id (validated: 64 lowercase hex digits).
        layer_id: String,
        /// Parent layer ids, nearest first.
        parents: Vec<String>,
    },
    /// OCI layout: the layer's descriptor from the manifest.
    Oci {
        /// Digest (`sha256:…`), size and media type (which selects the decompressor) of the
        /// possibly compressed blob.
        blob: Box<oci_spec::image::Descriptor>,
    },
}

/// An image resolved by a backend.
#[derive(Debug, Clone)]
pub struct OpenedImage {
    /// Image id (hex sha256 of the config).
    pub image_id: String,
    /// The manifest bytes as stored.
    pub manifest: String,
    /// `sha256:…` of `manifest`.
    pub manifest_digest: String,
    /// The config bytes as stored.
    pub config: String,
    /// `sha256:…` of `config`.
    pub config_digest: String,
    /// Layers, base first.
    pub layers: Vec<LayerInfo>,
    /// One locator per entry of `layers`.
    pub locators: Vec<LayerLocator>,
}

/// A store kind the helper can serve.
pub trait Backend: Send + Sync {
    /// The directory images are served from (graph root, OCI layout), as resolved.
    fn root(&self) -> &std::path::Path;

    /// Resolve `reference` to an image.
    ///
    /// # Errors
    /// [`BackendError::ImageNotFound`] when it does not resolve.
    fn open_image(&self, reference: &str) -> Result<OpenedImage, BackendError>;

    /// [`open_image`](Self::open_image), and the directory the image is served from:
    /// [`root`](Self::root), unless the backend serves images from more than one (a
    /// containers-storage store with additional image stores).
    ///
    /// # Errors
    /// As [`open_image`](Self::open_image).
    fn open_image_at(
        &self,
        reference: &str,
    ) -> Result<(OpenedImage, std::path::PathBuf), BackendError> {
        Ok((self.open_image(reference)?, self.root().to_owned()))
    }

    /// Produce layer `index` of `image` into `sink`, bodies of at most `inline_threshold` bytes
    /// inline. Returns the number of tar entries written.
    ///
    /// # Errors
    /// Names the layer and the file at fault. The sink may have received part of the layer.
    fn stream_layer(
        &self,
        image: &OpenedImage,
        index: usize,
        inline_threshold: u64,
        sink: &mut dyn LayerSink,
    ) -> anyhow::Result<u64>;
}

/// Open the backend for `store`.
///
/// # Errors
/// The store cannot be found or read.
pub fn open_backend(store: &Store) -> anyhow::Result<Box<dyn Backend>> {
    match store {
        Store::ContainersStorage { .. } => Ok(Box::new(cstor::CstorBackend::open(store)?)),
        Store::OciLayout { dir } => Ok(Box::new(oci_layout::OciBackend::open(dir)?)),
    }
}

/// Make this helper process die with the client that spawned it. Only a backstop: the
/// client kills and reaps its helper itself, and the helper ends when the socket reaches end
/// of file.
///
/// - `PR_SET_PDEATHSIG`: the helper is killed when its parent dies. That parent may be a
///   wrapper (`sudo`, `runuser`, `systemd-run`, `timeout`) rather than the client.
/// - `parent_pid` (the client, as [`crate::client::Proxy::spawn`] passes it): watched through
///   a pidfd, so the helper exits when the client does even behind a wrapper that outlives
///   it; refused at once if the client is already gone (it may have died before the signal
///   was armed, and then none would come).
///
/// # Errors
/// The signal cannot be armed, or the client is gone.
pub fn tie_to_parent(parent_pid: Option<i32>) -> anyhow::Result<()> {
    use anyhow::Context;
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .context("setting PR_SET_PDEATHSIG")?;
    let Some(pid) = parent_pid else {
        return Ok(());
    };
    let gone = || anyhow::anyhow!("parent process {pid} is gone");
    let raw = rustix::process::Pid::from_raw(pid).ok_or_else(gone)?;
    let pidfd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Err(gone()),
        Err(e) => return Err(e).context(format!("watching parent process {pid}")),
    };
    std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            let mut fds = [rustix::event::PollFd::new(
                &pidfd,
                rustix::event::PollFlags::IN,
            )];
            // Readable once the process has exited; EINTR just polls again.
            while !matches!(rustix::event::poll(&mut fds, None), Ok(n) if n > 0) {}
            // The client is gone: nobody will read what we produce.
            std::process::exit(1);
        })
        .context("starting the parent watcher")?;
    Ok(())
}

/// The uid of the process that made the client's end of `sock`, as the kernel recorded it
/// (`SO_PEERCRED`), when it can be read: the client of a socketpair is its creator whatever
/// wrapper started the helper, and cannot pretend otherwise. `None` outside the initial pid
/// namespace, where the creator may be invisible.
pub fn client_uid(sock: impl AsFd) -> Option<u32> {
    // An invisible creator's pid reads as 0, which rustix's `UCred` cannot hold; only the
    // initial pid namespace (one `NSpid` entry) sees every process.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    if nspid.split_whitespace().count() != 1 {
        return None;
    }
    rustix::net::sockopt::socket_peercred(sock)
        .ok()
        .map(|c| c.uid.as_raw())
}

/// Is this process privileged on the host: uid 0 in the initial user namespace?
pub fn is_privileged() -> bool {
    rustix::process::geteuid().is_root() && !crate::userns::in_user_namespace()
}

/// A privileged helper serving an unprivileged client (through `sudo`, `run0`, …) serves only
/// stores whose root directories belong to root (for containers-storage: the graph root, the
/// image store and every additional image store): in a store an unprivileged user owns, hard
/// links planted by that user could make the helper open files the client may not read.
///
/// # Errors
/// The store belongs to another user, or cannot be found.
pub fn check_store_for_client(store: &Store, client_uid: Option<u32>) -> anyhow::Result<()> {
    use anyhow::Context;
    if !is_privileged() || client_uid == Some(0) {
        return Ok(());
    }
    let roots: Vec<std::path::PathBuf> = match store {
        Store::ContainersStorage { .. } => {
            cstor::config::resolve(store, &cstor::config::StorageEnv::from_process())?
                .roots()
                .map(std::path::Path::to_owned)
                .collect()
        }
        Store::OciLayout { dir } => vec![dir.clone()],
    };
    let client = client_uid.map_or_else(|| "an unknown uid".to_owned(), |u| format!("uid {u}"));
    for root in roots {
        let st =
            rustix::fs::stat(&root).with_context(|| format!("inspecting {}", root.display()))?;
        anyhow::ensure!(
            st.st_uid == 0,
            "refusing to serve {} as a privileged helper for {client}: it belongs to uid {}, an \
             unprivileged user, whose hard links could expose files the client may not read; \
             read a user's own store without a privileged helper (rootless)",
            root.display(),
            st.st_uid
        );
    }
    Ok(())
}

/// Serve as a helper on the socket inherited as stdin, the way [`crate::client::Proxy::spawn`]
/// starts helpers (`helper --socket-fd 0 --store STORE --parent-pid PID`, plus
/// `--idle-timeout SECS` when [`crate::client::ProxyConfig::idle_timeout`] is set, and the
/// test-only `--inject-fault NAME`, see [`server::ServeOptions::from_helper_args`]). For
/// programs that embed the library and are their own helper (see `examples/pull.rs`); needs no
/// `unsafe`, because stdin is duplicated rather than adopted.
///
/// # Errors
/// The arguments are not the ones `Proxy::spawn` passes, stdin is not a socket, or serving failed.
pub fn serve_stdin_from_args(args: &[String]) -> anyhow::Result<()> {
    use anyhow::{bail, ensure};
    let mut store = None;
    let mut parent = None;
    let mut userns = false;
    let mut idle_timeout = None;
    let mut inject_fault = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--userns" {
            userns = true;
            continue;
        }
        match (a.as_str(), it.next()) {
            ("--socket-fd", Some(n)) => {
                ensure!(n == "0", "only --socket-fd 0 (stdin) is supported here")
            }
            ("--store", Some(s)) => store = Some(Store::parse_arg(s)?),
            ("--parent-pid", Some(p)) => parent = Some(p.parse::<i32>()?),
            ("--idle-timeout", Some(t)) => idle_timeout = Some(t.as_str()),
            ("--inject-fault", Some(f)) => inject_fault = Some(f.as_str()),
            (other, _) => bail!("unexpected helper argument {other:?}"),
        }
    }
    let Some(store) = store else {
        bail!("helper needs --store")
    };
    let options = server::ServeOptions::from_helper_args(idle_timeout, inject_fault)?;
    let sock = std::io::stdin().as_fd().try_clone_to_owned()?;
    let st = rustix::fs::fstat(&sock)?;
    ensure!(
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket,
        "stdin is not a socket"
    );
    // First, while the process has one thread (the kernel requires it).
    if userns {
        crate::userns::enter_and_wait(sock.as_fd())?;
    }
    tie_to_parent(parent)?;
    check_store_for_client(&store, client_uid(&sock))?;
    server::serve_with(sock, store, &options)
}
