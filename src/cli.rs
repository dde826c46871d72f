//! Command-line parsing and the sinks of the binary. stdout carries only data.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{
    HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle,
};

use splitfdstream::client::{Proxy, ProxyConfig, UsernsMode};
use splitfdstream::export::{Compression, ExportOptions, export};
use splitfdstream::proto::rpc::LayerInfo;
use splitfdstream::proto::rpc::LayerSelector;
use splitfdstream::proto::source::{ImageRef, Store};
use splitfdstream::pull::{LayerStatus, Progress, PullOptions};
use splitfdstream::repo::{HashAlg, SourceTrust};
use splitfdstream::sink::{AtomicFile, write_layer_tar};
use splitfdstream::unpack::{UnpackOptions, UnpackProgress, WhiteoutFormat};

/// `--hash` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum HashArg {
    Sha256,
    Sha512,
}

impl HashArg {
    fn alg(self) -> HashAlg {
        match self {
            HashArg::Sha256 => HashAlg::Sha256,
            HashArg::Sha512 => HashAlg::Sha512,
        }
    }
}

/// How the helper that reads the store is started (`pull`, `tar`, `inspect`).
#[derive(Debug, Clone, clap::Args)]
struct HelperArgs {
    /// Run the helper under this command, split on whitespace: a privileged helper for an
    /// unprivileged caller, e.g. 'sudo -n', 'run0' or 'systemd-run --pipe --quiet'.
    #[arg(long, value_name = "'CMD ARGS'")]
    helper_prefix: Option<String>,
    /// Run the helper in a user namespace of its own, mapped from /etc/subuid and /etc/subgid
    /// (auto: for a non-root caller's own containers-storage store, as rootless podman).
    #[arg(long, value_enum, default_value_t = UsernsArg::Auto)]
    userns: UsernsArg,
}

/// `--whiteouts` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum WhiteoutArg {
    Overlay,
    Oci,
}

/// `--compress` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompressArg {
    None,
    Gzip,
    Zstd,
}

/// `--userns` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum UsernsArg {
    Auto,
    Never,
    Always,
}

impl HelperArgs {
    fn proxy_config(&self, store: &Store) -> ProxyConfig {
        ProxyConfig {
            command_prefix: self.command_prefix(),
            userns: self.userns(),
            ..ProxyConfig::new(store.clone())
        }
    }

    fn command_prefix(&self) -> Vec<std::ffi::OsString> {
        self.helper_prefix
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(Into::into)
            .collect()
    }

    fn userns(&self) -> UsernsMode {
        match self.userns {
            UsernsArg::Auto => UsernsMode::Auto,
            UsernsArg::Never => UsernsMode::Never,
            UsernsArg::Always => UsernsMode::Always,
        }
    }
}

/// Flags `containers-image-proxy` may pass to skopeo. They configure registry access, which
/// local images do not need: accepted so the command line parses, then ignored.
#[derive(Debug, Clone, clap::Args)]
struct SkopeoFlags {
    /// Ignored (registry credentials).
    #[arg(long, hide = true)]
    authfile: Option<PathBuf>,
    /// Ignored (registry credentials).
    #[arg(long, hide = true)]
    no_creds: bool,
    /// Ignored (registry TLS).
    #[arg(long, hide = true)]
    cert_dir: Option<PathBuf>,
    /// Ignored (encrypted layers are not served).
    #[arg(long, hide = true)]
    decryption_key: Vec<String>,
    /// Ignored (registry TLS).
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    tls_verify: Option<bool>,
    /// Ignored (signature policy; local images are served as stored).
    #[arg(long, hide = true)]
    insecure_policy: bool,
    /// Ignored (registry HTTP).
    #[arg(long, hide = true)]
    user_agent_prefix: Option<String>,
    /// Ignored.
    #[arg(long, hide = true)]
    debug: bool,
}

/// Move container image layers as tar metadata plus file descriptors.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show an image: id, digests, and per layer its diff_id, size and entry count.
    Inspect {
        /// `containers-storage:[DRIVER@GRAPHROOT+RUNROOT]REF` or `oci:DIR[:TAG]`.
        source: ImageRef,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        helper: HelperArgs,
    },
    /// Write the exact tar of one layer to stdout, verifying its diff_id.
    Tar {
        /// `containers-storage:[DRIVER@GRAPHROOT+RUNROOT]REF` or `oci:DIR[:TAG]`.
        source: ImageRef,
        /// Layer index (0 = base layer) or `sha256:…` diff_id.
        #[arg(long)]
        layer: String,
        /// Check every body against the CRC-64 recorded by tar-split.
        #[arg(long)]
        verify_crc: bool,
        /// Bodies of at most this many bytes travel inline instead of as fds.
        #[arg(long, default_value_t = splitfdstream::proto::rpc::DEFAULT_INLINE_THRESHOLD)]
        inline_threshold: u64,
        /// Write the tar to FILE instead of stdout; FILE appears (or is replaced) only once
        /// the tar's sha256 equals the diff_id.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        helper: HelperArgs,
    },
    /// Import an image into a composefs repository (reflinked, verified, atomic).
    Pull {
        /// `containers-storage:[DRIVER@GRAPHROOT+RUNROOT]REF` or `oci:DIR[:TAG]`.
        source: ImageRef,
        /// The repository (created if missing).
        #[arg(long)]
        repo: PathBuf,
        /// Tag to write; default: the source reference.
        #[arg(long)]
        tag: Option<String>,
        /// Digest for a new repository.
        #[arg(long, value_enum)]
        hash: Option<HashArg>,
        /// Create the repository without fs-verity if it does not exist (as `cfsctl init
        /// --insecure`); needed on filesystems without fs-verity. An existing repository
        /// keeps its mode.
        #[arg(long)]
        insecure: bool,
        /// Treat the source store as one others may rewrite: hash every object from its own
        /// bytes (cloned first, then read) instead of from the source before cloning it. The
        /// default does this only for files not owned by root or the repository's owner, or
        /// in a store whose root directory is not.
        #[arg(long)]
        untrusted_source: bool,
        /// Layers imported in parallel (default: cores, at most 8).
        #[arg(long)]
        jobs: Option<usize>,
        /// Print the summary as one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Bodies of at most this many bytes travel inline instead of as fds.
        #[arg(long)]
        inline_threshold: Option<u64>,
        #[command(flatten)]
        helper: HelperArgs,
    },
    /// Serve skopeo's image proxy protocol (0.2.8) for containers-storage: and oci: images on an
    /// inherited SOCK_SEQPACKET socket: a drop-in for `skopeo experimental-image-proxy`.
    /// The other flags are those the containers-image-proxy crate may append; they concern
    /// registries and are accepted and ignored (see proto/image-proxy.md).
    ExperimentalImageProxy {
        /// The inherited socket's fd number.
        #[arg(long, default_value_t = 0)]
        sockfd: i32,
        #[command(flatten)]
        ignored: SkopeoFlags,
    },
    /// Unpack an image's root filesystem (or one layer's changes) into a directory,
    /// reflinking file bodies from the store where the filesystem allows.
    Unpack {
        /// `containers-storage:[DRIVER@GRAPHROOT+RUNROOT]REF` or `oci:DIR[:TAG]`.
        source: ImageRef,
        /// The directory: created, or an existing empty one.
        dir: PathBuf,
        /// Apply only this layer's changes (0 = base layer), keeping its whiteouts.
        #[arg(long)]
        layer: Option<usize>,
        /// How `--layer` keeps whiteouts: overlay (character device 0/0, overlay.opaque
        /// xattr) or oci (`.wh.` files).
        #[arg(long, value_enum, default_value_t = WhiteoutArg::Overlay, requires = "layer")]
        whiteouts: WhiteoutArg,
        /// Unpack into a sibling directory and rename it into place only on success.
        #[arg(long)]
        atomic: bool,
        #[command(flatten)]
        helper: HelperArgs,
    },
    /// Write an image as an OCI image layout: each layer the exact layer tar, or that tar
    /// compressed.
    Export {
        /// `containers-storage:[DRIVER@GRAPHROOT+RUNROOT]REF` or `oci:DIR[:TAG]`.
        source: ImageRef,
        /// `oci:DIR[:TAG]`: the layout (created if missing) and the tag of the index entry.
        dest: ImageRef,
        /// Layer compression.
        #[arg(long, value_enum, default_value_t = CompressArg::None)]
        compress: CompressArg,
        /// Layers exported in parallel (default: cores, at most 8).
        #[arg(long)]
        jobs: Option<usize>,
        #[command(flatten)]
        helper: HelperArgs,
    },
    /// Serve the protocol on an inherited socket. Spawned by the client, not by people.
    #[command(hide = true)]
    Helper {
        /// The inherited socket's fd number.
        #[arg(long)]
        socket_fd: i32,
        /// The one store this helper serves.
        #[arg(long)]
        store: String,
        /// The spawning process: exit at once if it is already gone, and when it exits.
        #[arg(long)]
        parent_pid: Option<i32>,
        /// Enter a user namespace of its own first and wait for the parent to map its ids.
        #[arg(long)]
        userns: bool,
        /// Cancel a layer stream whose client makes no progress for this many seconds
        /// (default 900).
        #[arg(long, hide = true)]
        idle_timeout: Option<String>,
        /// For tests only: inject a fault (`producer-panic`).
        #[arg(long, hide = true)]
        inject_fault: Option<String>,
    },
}

/// Run the command line; errors are printed once, as `splitfdstream: {:#}`.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Like ripgrep: a reader that went away (`| head`) is not our failure.
            if e.chain().any(|c| {
                c.downcast_ref::<io::Error>()
                    .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("splitfdstream: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Inspect {
            source,
            json,
            helper,
        } => inspect(&helper.proxy_config(&source.store), &source, json),
        Cmd::Tar {
            source,
            layer,
            verify_crc,
            inline_threshold,
            output,
            helper,
        } => tar(
            &helper.proxy_config(&source.store),
            &source,
            &layer,
            verify_crc,
            inline_threshold,
            output.as_deref(),
        ),
        Cmd::Pull {
            source,
            repo,
            tag,
            hash,
            insecure,
            untrusted_source,
            jobs,
            json,
            inline_threshold,
            helper,
        } => {
            let opts = PullOptions {
                command_prefix: helper.command_prefix(),
                userns: helper.userns(),
                hash: hash.map(HashArg::alg),
                insecure,
                untrusted_source,
                tag,
                jobs,
                inline_threshold,
                ..PullOptions::default()
            };
            pull(&source, &repo, &opts, json)
        }
        Cmd::ExperimentalImageProxy { sockfd, ignored: _ } => {
            splitfdstream::imageproxy::serve(crate::adopt_socket_fd(sockfd)?)
        }
        Cmd::Unpack {
            source,
            dir,
            layer,
            whiteouts,
            atomic,
            helper,
        } => {
            let opts = UnpackOptions {
                layer,
                whiteouts: match whiteouts {
                    WhiteoutArg::Overlay => WhiteoutFormat::Overlay,
                    WhiteoutArg::Oci => WhiteoutFormat::Oci,
                },
                atomic,
                ..UnpackOptions::default()
            };
            unpack(&helper.proxy_config(&source.store), &source, &dir, &opts)
        }
        Cmd::Export {
            source,
            dest,
            compress,
            jobs,
            helper,
        } => {
            let Store::OciLayout { dir } = &dest.store else {
                anyhow::bail!("the destination must be oci:DIR[:TAG]");
            };
            let opts = ExportOptions {
                compression: match compress {
                    CompressArg::None => Compression::None,
                    CompressArg::Gzip => Compression::Gzip,
                    CompressArg::Zstd => Compression::Zstd,
                },
                jobs,
                tag: Some(dest.reference.clone()).filter(|t| !t.is_empty()),
            };
            let config = helper.proxy_config(&source.store);
            let summary = export(&config, &source.reference, dir, &opts)?;
            writeln!(io::stdout().lock(), "{}", summary.manifest.digest())?;
            Ok(())
        }
        Cmd::Helper {
            socket_fd,
            store,
            parent_pid,
            userns,
            idle_timeout,
            inject_fault,
        } => {
            let options = splitfdstream::helper::server::ServeOptions::from_helper_args(
                idle_timeout.as_deref(),
                inject_fault.as_deref(),
            )?;
            helper(socket_fd, &store, parent_pid, userns, &options)
        }
    }
}

fn helper(
    socket_fd: i32,
    store: &str,
    parent_pid: Option<i32>,
    userns: bool,
    options: &splitfdstream::helper::server::ServeOptions,
) -> anyhow::Result<()> {
    let store = Store::parse_arg(store)?;
    let sock = crate::adopt_socket_fd(socket_fd)?;
    // First, while this process has one thread (the kernel requires it).
    if userns {
        splitfdstream::userns::enter_and_wait(sock.as_fd())?;
    }
    splitfdstream::helper::tie_to_parent(parent_pid)?;
    let client = splitfdstream::helper::client_uid(&sock);
    splitfdstream::helper::check_store_for_client(&store, client)?;
    splitfdstream::helper::server::serve_with(sock, store, options)
}

/// Warnings of `unpack` on stderr.
struct UnpackWarnings;

impl UnpackProgress for UnpackWarnings {
    fn warning(&self, message: &str) {
        eprintln!("splitfdstream: warning: {message}");
    }
}

fn unpack(
    config: &ProxyConfig,
    source: &ImageRef,
    dir: &Path,
    opts: &UnpackOptions,
) -> anyhow::Result<()> {
    let mut proxy = Proxy::spawn(config)?;
    splitfdstream::unpack::unpack(&mut proxy, &source.reference, dir, opts, &UnpackWarnings)?;
    proxy.shutdown()
}

fn inspect(config: &ProxyConfig, source: &ImageRef, json: bool) -> anyhow::Result<()> {
    let mut proxy = Proxy::spawn(config)?;
    let image = proxy.open_image(&source.reference)?;
    let mut out = io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "imageId": image.image_id,
            "manifestDigest": image.manifest_digest,
            "configDigest": image.config_digest,
            "layers": image.layers,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "image id:  {}", image.image_id)?;
        writeln!(out, "manifest:  {}", image.manifest_digest)?;
        writeln!(out, "config:    {}", image.config_digest)?;
        writeln!(out, "layers:    {} (base first)", image.layers.len())?;
        for (i, l) in image.layers.iter().enumerate() {
            let size = l.size.map_or("-".to_string(), |s| s.to_string());
            let entries = l.entries.map_or("-".to_string(), |s| s.to_string());
            writeln!(
                out,
                "  {i:>3}  {}  size {size}  entries {entries}",
                l.diff_id
            )?;
        }
    }
    out.flush()?;
    proxy.shutdown()
}

fn tar(
    config: &ProxyConfig,
    source: &ImageRef,
    layer: &str,
    verify_crc: bool,
    inline_threshold: u64,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let selector = match layer.parse::<u64>() {
        Ok(i) => LayerSelector::Index(i),
        Err(_) => LayerSelector::DiffId(layer.to_owned()),
    };
    let mut proxy = Proxy::spawn(config)?;
    let image = proxy.open_image(&source.reference)?;
    let mut stream = proxy.get_layer(image.image, selector, Some(inline_threshold))?;
    match output {
        // Appears only once verified: a failure leaves no file (nor changes an existing one).
        Some(path) => {
            let file = AtomicFile::create(path)?;
            let mut out = io::BufWriter::with_capacity(256 << 10, file);
            write_layer_tar(&mut stream, &mut out, verify_crc)?;
            let file = out
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("writing {}", path.display()))?;
            file.commit()?;
        }
        // A pipe cannot take bytes back: a failed verification is the exit status and message.
        None => {
            let mut out = io::BufWriter::with_capacity(256 << 10, io::stdout().lock());
            write_layer_tar(&mut stream, &mut out, verify_crc)?;
            out.flush()?;
        }
    }
    drop(stream);
    proxy.shutdown()
}

/// Progress of `pull` on stderr (only when it is a terminal and without `--json`): one line per
/// layer being imported (bytes, files, rate, and a bar where the layer's size is known), then a
/// total line (layers, bytes, files, rate, and a bar and ETA where every size is known).
/// Finished layers leave the display; all of it is cleared before the summary is printed.
struct PullBars {
    multi: MultiProgress,
    /// Bodies imported so far, all layers.
    files: Arc<AtomicU64>,
    /// Layers finished so far.
    done: Arc<AtomicU64>,
    /// The total line and one entry per layer of the image, set by `image`.
    image: OnceLock<(ProgressBar, Vec<LayerBar>)>,
}

/// A layer's line, shown while it is imported.
struct LayerBar {
    /// `layer N <first 12 hex digits of the diff_id>`.
    label: String,
    /// The uncompressed size, where the store records it.
    size: Option<u64>,
    /// Bodies imported so far.
    files: Arc<AtomicU64>,
    bar: OnceLock<ProgressBar>,
}

/// Line templates. `{files}` and `{layers}` are keys of our own (see [`counter_key`]).
const LAYER_KNOWN: &str = "{prefix}  {bytes:>10} / {total_bytes:<10}  {files:>6} files  \
                           {binary_bytes_per_sec:>12}  [{wide_bar}]";
const LAYER_UNKNOWN: &str = "{prefix}  {bytes:>10}  {files:>6} files  {binary_bytes_per_sec:>12}";
const TOTAL_KNOWN: &str = "total {layers} layers  {bytes:>10} / {total_bytes:<10}  {files:>6} \
                           files  {binary_bytes_per_sec:>12}  ETA {eta:<4} [{wide_bar}]";
const TOTAL_UNKNOWN: &str =
    "total {layers} layers  {bytes:>10}  {files:>6} files  {binary_bytes_per_sec:>12}";

/// Every line is redrawn this often, by indicatif's ticker threads; increments only count
/// (with a ticker, `ProgressBar::inc` does not draw, so the importing threads never wait for
/// the terminal). A layer busy with one large body still shows its rate falling. indicatif's
/// stderr target writes at most 20 frames a second, whatever the number of lines.
const TICK: Duration = Duration::from_millis(100);

/// A template key that prints `counter` (and, with `of`, `/of`).
fn counter_key(
    counter: Arc<AtomicU64>,
    of: Option<u64>,
) -> impl Fn(&ProgressState, &mut dyn std::fmt::Write) + Clone + Send + Sync + 'static {
    move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = write!(w, "{}", counter.load(Ordering::Relaxed));
        if let Some(of) = of {
            let _ = write!(w, "/{of}");
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("the progress templates are valid")
        .progress_chars("=> ")
}

impl PullBars {
    fn new() -> Self {
        PullBars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            files: Arc::new(AtomicU64::new(0)),
            done: Arc::new(AtomicU64::new(0)),
            image: OnceLock::new(),
        }
    }

    /// Remove every line (before the summary or an error is printed).
    fn clear(&self) {
        if let Some((total, layers)) = self.image.get() {
            for bar in layers.iter().filter_map(|l| l.bar.get()) {
                bar.finish_and_clear();
            }
            total.finish_and_clear();
        }
        let _ = self.multi.clear();
    }

    fn layer(&self, index: usize) -> Option<&LayerBar> {
        self.image.get().and_then(|(_, layers)| layers.get(index))
    }
}

impl Progress for PullBars {
    fn image(&self, layers: &[LayerInfo], todo: &[usize]) {
        let bars = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let hex = l.diff_id.strip_prefix("sha256:").unwrap_or(&l.diff_id);
                LayerBar {
                    label: format!("layer {i} {}", hex.get(..12).unwrap_or(hex)),
                    size: l.size,
                    files: Arc::new(AtomicU64::new(0)),
                    bar: OnceLock::new(),
                }
            })
            .collect();
        // A bar and an ETA only when every layer to import has a known size.
        let known: Option<u64> = todo
            .iter()
            .map(|&i| layers.get(i).and_then(|l| l.size))
            .sum();
        let (total, template) = match known {
            Some(bytes) => (ProgressBar::new(bytes), TOTAL_KNOWN),
            None => (ProgressBar::no_length(), TOTAL_UNKNOWN),
        };
        let total = self.multi.add(
            total.with_style(
                style(template)
                    .with_key("files", counter_key(self.files.clone(), None))
                    .with_key(
                        "layers",
                        counter_key(self.done.clone(), Some(todo.len() as u64)),
                    ),
            ),
        );
        total.enable_steady_tick(TICK);
        let _ = self.image.set((total, bars));
    }

    fn layer_started(&self, index: usize) {
        let Some((total, layers)) = self.image.get() else {
            return;
        };
        let Some(layer) = layers.get(index) else {
            return;
        };
        let (bar, template) = match layer.size {
            Some(size) => (ProgressBar::new(size), LAYER_KNOWN),
            None => (ProgressBar::no_length(), LAYER_UNKNOWN),
        };
        let bar = self.multi.insert_before(
            total,
            bar.with_style(
                style(template).with_key("files", counter_key(layer.files.clone(), None)),
            )
            .with_prefix(layer.label.clone()),
        );
        bar.enable_steady_tick(TICK);
        let _ = layer.bar.set(bar);
    }

    fn advance(&self, index: usize, bytes: u64, files: u64) {
        let Some((total, layers)) = self.image.get() else {
            return;
        };
        if let Some(layer) = layers.get(index) {
            if files > 0 {
                layer.files.fetch_add(files, Ordering::Relaxed);
            }
            if let Some(bar) = layer.bar.get() {
                bar.inc(bytes);
            }
        }
        if files > 0 {
            self.files.fetch_add(files, Ordering::Relaxed);
        }
        total.inc(bytes);
    }

    fn layer_done(&self, index: usize) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if let Some(bar) = self.layer(index).and_then(|l| l.bar.get()) {
            bar.finish_and_clear();
            self.multi.remove(bar);
        }
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit, as podman does: a pull holds hundreds of
/// received fds per layer worker, and many systems start programs at a soft limit of 1024
/// (the helpers inherit the raised limit). Best effort; the pull sizes itself to whatever
/// limit remains.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (lim.current, lim.maximum)
        && cur < max
    {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

fn pull(source: &ImageRef, repo: &Path, opts: &PullOptions, json: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    raise_fd_limit();
    // Progress only for a person watching: not for `--json` (a program reads the result) and
    // not when stderr is a file or a pipe.
    let result = if !json && io::stderr().is_terminal() {
        let bars = PullBars::new();
        let result = splitfdstream::pull::pull(source, repo, opts, &bars);
        bars.clear();
        result
    } else {
        splitfdstream::pull::pull(source, repo, opts, &splitfdstream::pull::NoProgress)
    };
    let s = result?;
    let imported = s
        .layers
        .iter()
        .filter(|l| l.status == LayerStatus::Imported)
        .count();
    let bytes: u64 = s.layers.iter().map(|l| l.bytes).sum();
    let files: u64 = s.layers.iter().map(|l| l.files).sum();
    if json {
        let v = serde_json::json!({
            "type": "pull",
            "imageId": s.image_id,
            "manifestDigest": s.manifest_digest,
            "configDigest": s.config_digest,
            "tag": s.tag,
            "erofsImage": s.erofs_image,
            "erofsSkipped": s.erofs_skipped,
            "layers": s.layers.iter().map(|l| serde_json::json!({
                "diffId": l.diff_id,
                "status": match l.status { LayerStatus::Present => "present", LayerStatus::Imported => "imported" },
                "files": l.files,
                "bytes": l.bytes,
                "seconds": l.elapsed.as_secs_f64(),
            })).collect::<Vec<_>>(),
            "objects": {
                "reflinked": s.objects.reflinked,
                "copied": s.objects.copied,
                "reused": s.objects.reused,
                "hashedFromSource": s.objects.hashed_from_source,
            },
            "sourceTrust": match s.source_trust {
                SourceTrust::Owners { .. } => "owners",
                SourceTrust::Untrusted => "untrusted",
            },
            "seconds": s.elapsed.as_secs_f64(),
            "finalizeSeconds": s.finalize.as_secs_f64(),
        });
        let mut out = io::stdout().lock();
        writeln!(out, "{v}")?;
        out.flush()?;
    }
    eprintln!(
        "pulled {} as {}: {imported} of {} layers imported, {} ({files} bodies passed as fds); objects {} reflinked, {} copied, {} reused; {:.2} s{}",
        source,
        s.tag,
        s.layers.len(),
        HumanBytes(bytes),
        s.objects.reflinked,
        s.objects.copied,
        s.objects.reused,
        s.elapsed.as_secs_f64(),
        s.erofs_skipped
            .as_ref()
            .map(|r| format!(" (no composefs image: {r})"))
            .unwrap_or_default()
    );
    Ok(())
}
