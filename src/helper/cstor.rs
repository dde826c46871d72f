//! containers-storage backend (overlay driver).
//!
//! Images and layers come from `overlay-images/images.json` and `overlay-layers/layers.json`
//! (plus `volatile-layers.json`), read under fcntl read locks on the store's lock files, which is
//! what podman and skopeo take too. A layer is produced from its tar-split file: the recorded
//! segments travel inline verbatim, and each file body is opened in the layer's diff dir with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` and
//! passed as an fd (or read and inlined when small). So the client rebuilds the exact layer tar,
//! and checks its diff_id, without the helper reading any body it sends as an fd. The segments
//! are framed on the way by [`crate::proto::tar::Tracker`], the stream reader's framer, which
//! decides where a body belongs and how large it is; tar-split's file records only name it.
//!
//! Nothing in the store is created or written: the lock files are opened read-only.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, bail, ensure};
use oci_spec::image::ImageConfiguration;
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use super::tarsplit::{self, Entry, TarSplitReader};
use super::{Backend, BackendError, LayerLocator, LayerSink, OpenedImage};
use crate::proto::rpc::{LayerInfo, MAX_INLINE_THRESHOLD};
use crate::proto::source::Store;
use crate::proto::tar::{Position, Tracker};

pub mod config;
mod store;

use store::{
    ImageRecord, LayerRecord, RESOLVE_STRICT, StoreLock, big_data_file_name, layer_chain,
    open_beneath, read_file, read_records, resolve_reference, validate_id,
};
pub use store::{MAX_BIG_DATA_LEN, MAX_LAYER_DEPTH, MAX_METADATA_LEN, MIN_ID_PREFIX, is_id};

/// Inline bytes (tar headers, padding, small bodies) are gathered up to this size before they go
/// to the sink, so a layer of tiny files is not one sink call per 512-byte header. It bounds the
/// memory a stream holds beyond one inline body.
pub const INLINE_BATCH: usize = 256 << 10;

/// xattrs marking an overlayfs metacopy stub: the file's data lives in a lower layer
/// (`trusted.` for a root store, `user.` for a rootless one mounted with `userxattr`).
const METACOPY_XATTRS: [&str; 2] = ["trusted.overlay.metacopy", "user.overlay.metacopy"];

/// The containers-storage backend for one overlay store.
#[derive(Debug)]
pub struct CstorBackend {
    location: config::StoreLocation,
    /// The graph root, opened `O_PATH`: every other path is resolved beneath it.
    root: OwnedFd,
    images_lock: StoreLock,
    layers_lock: StoreLock,
}

impl CstorBackend {
    /// Open the store `store` names, with defaults from `storage.conf` and the environment.
    ///
    /// # Errors
    /// The configuration cannot be read, the driver is not overlay, or the graph root cannot be
    /// opened.
    pub fn open(store: &Store) -> anyhow::Result<Self> {
        Self::open_with_env(store, &config::StorageEnv::from_process())
    }

    /// [`open`](Self::open) with an explicit environment.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_with_env(store: &Store, env: &config::StorageEnv) -> anyhow::Result<Self> {
        let location = config::resolve(store, env)?;
        let graphroot = &location.graphroot;
        let root = rustix::fs::open(
            graphroot,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening graph root {}", graphroot.display()))?;
        let images_lock = StoreLock::open(&root, graphroot, "overlay-images/images.lock")?;
        let layers_lock = StoreLock::open(&root, graphroot, "overlay-layers/layers.lock")?;
        Ok(CstorBackend {
            location,
            root,
            images_lock,
            layers_lock,
        })
    }

    /// Where the store is.
    pub fn location(&self) -> &config::StoreLocation {
        &self.location
    }

    fn graphroot(&self) -> &Path {
        &self.location.graphroot
    }

    fn describe(&self) -> String {
        format!(
            "containers-storage:[overlay@{}+{}]",
            self.graphroot().display(),
            self.location.runroot.display()
        )
    }

    /// Resolve the reference and read the image's manifest and config, under the images lock.
    fn read_image(&self, reference: &str) -> Result<(ImageRecord, Vec<u8>, Vec<u8>), BackendError> {
        let _guard = self.images_lock.read()?;
        let images: Vec<ImageRecord> =
            read_records(&self.root, self.graphroot(), "overlay-images/images.json")?;
        let image = resolve_reference(&images, reference, &self.describe())?.clone();
        validate_id("image", &image.id)?;
        let dir = format!("overlay-images/{}", image.id);
        let big_data = |key: &str| -> anyhow::Result<Vec<u8>> {
            let rel = format!("{dir}/{}", big_data_file_name(key));
            read_file(&self.root, self.graphroot(), &rel, MAX_BIG_DATA_LEN)?
                .with_context(|| format!("image {} has no {key} (no {rel})", image.id))
        };
        let manifest = big_data("manifest")?;
        let config = big_data(&format!("sha256:{}", image.id))?;
        Ok((image, manifest, config))
    }

    /// All layer records, by id, under the layers lock.
    fn read_layers(&self) -> anyhow::Result<HashMap<String, LayerRecord>> {
        let _guard = self.layers_lock.read()?;
        let mut by_id = HashMap::new();
        for rel in [
            "overlay-layers/layers.json",
            "overlay-layers/volatile-layers.json",
        ] {
            for layer in read_records::<LayerRecord>(&self.root, self.graphroot(), rel)? {
                by_id.insert(layer.id.clone(), layer);
            }
        }
        Ok(by_id)
    }
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(is_id)
}

impl Backend for CstorBackend {
    fn root(&self) -> &Path {
        self.graphroot()
    }

    fn open_image(&self, reference: &str) -> Result<OpenedImage, BackendError> {
        let (image, manifest, config) = self.read_image(reference)?;
        let id = &image.id;
        let config_digest = sha256_digest(&config);
        if config_digest != format!("sha256:{id}") {
            return Err(
                anyhow::anyhow!("the config of image {id} has digest {config_digest}").into(),
            );
        }
        let manifest = String::from_utf8(manifest)
            .map_err(|_| anyhow::anyhow!("the manifest of image {id} is not UTF-8"))?;
        let config = String::from_utf8(config)
            .map_err(|_| anyhow::anyhow!("the config of image {id} is not UTF-8"))?;
        let parsed: ImageConfiguration = serde_json::from_str(&config)
            .with_context(|| format!("parsing the config of image {id}"))?;

        let layers = self.read_layers()?;
        let chain = layer_chain(&layers, id, image.layer.as_deref())?;
        let diff_ids = parsed.rootfs().diff_ids().clone();
        if diff_ids.len() != chain.len() {
            return Err(anyhow::anyhow!(
                "image {id}: its config lists {} layers, the store {}",
                diff_ids.len(),
                chain.len()
            )
            .into());
        }
        let mut infos = Vec::with_capacity(chain.len());
        let mut locators = Vec::with_capacity(chain.len());
        for (i, (layer, diff_id)) in chain.iter().zip(diff_ids).enumerate() {
            if !is_digest(&diff_id) {
                return Err(
                    anyhow::anyhow!("image {id}: diff_id {diff_id:?} is not sha256").into(),
                );
            }
            if let Some(stored) = layer.diff_digest.as_deref().filter(|d| !d.is_empty())
                && stored != diff_id
            {
                return Err(anyhow::anyhow!(
                    "image {id}: layer {} has diff digest {stored}, the config says {diff_id}",
                    layer.id
                )
                .into());
            }
            infos.push(LayerInfo {
                id: layer.id.clone(),
                diff_id,
                size: layer.diff_size.and_then(|s| u64::try_from(s).ok()),
                entries: None,
            });
            locators.push(LayerLocator::Cstor {
                layer_id: layer.id.clone(),
                parents: chain[..i].iter().rev().map(|l| l.id.clone()).collect(),
            });
        }
        Ok(OpenedImage {
            image_id: id.clone(),
            manifest_digest: sha256_digest(manifest.as_bytes()),
            manifest,
            config_digest,
            config,
            layers: infos,
            locators,
        })
    }

    fn stream_layer(
        &self,
        image: &OpenedImage,
        index: usize,
        inline_threshold: u64,
        sink: &mut dyn LayerSink,
    ) -> anyhow::Result<u64> {
        ensure!(
            inline_threshold <= MAX_INLINE_THRESHOLD,
            "inline threshold {inline_threshold} is above {MAX_INLINE_THRESHOLD}"
        );
        let Some(LayerLocator::Cstor { layer_id, parents }) = image.locators.get(index) else {
            bail!(
                "image {} has no containers-storage layer {index}",
                image.image_id
            );
        };
        validate_id("layer", layer_id)?;
        for parent in parents {
            validate_id("layer", parent)?;
        }
        // Held for the whole stream, as podman's own readers hold it, so the layer cannot be
        // deleted while its files are being opened (fds already handed out stay valid anyway).
        let _guard = self.layers_lock.read()?;
        let tar_split_rel = format!("overlay-layers/{layer_id}.tar-split.gz");
        let tar_split = open_beneath(&self.root, &tar_split_rel).with_context(|| {
            format!(
                "opening {}",
                self.graphroot().join(&tar_split_rel).display()
            )
        })?;
        // containers-storage bind-mounts `overlay` onto itself while anything is mounted, so
        // this one step must cross a mount; everything beneath it must not.
        let overlay = rustix::fs::openat2(
            &self.root,
            "overlay",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .with_context(|| format!("opening {}", self.graphroot().join("overlay").display()))?;
        let mut files = LayerFiles {
            layer_id,
            diff: open_diff(&overlay, layer_id)?,
            parents: parents.iter().map(|p| (p.as_str(), None)).collect(),
            overlay,
        };
        let mut out = InlineBatch {
            sink,
            buf: Vec::new(),
        };
        let mut entries = 0u64;
        // The tar is framed as it is rebuilt, by the stream reader's own framer: a body is
        // sent only where the tar has a regular-file body, of the size its header declares.
        // tar-split's file records alone would not do: they carry Go's `Header.Size` (the
        // size field even of entries that have no body, such as a `\0` entry named `dir/`),
        // and their sizes are input a hostile store chooses.
        let mut tar = Tracker::new();
        for entry in TarSplitReader::from_gzip(tar_split) {
            out.sink.checkpoint().with_context(|| sending(layer_id))?;
            let entry = entry.with_context(|| format!("reading {tar_split_rel}"))?;
            match entry {
                Entry::Segment(bytes) => {
                    tar.feed(&bytes).with_context(|| {
                        format!("layer {layer_id}: invalid tar in {tar_split_rel}")
                    })?;
                    out.push(&bytes).with_context(|| sending(layer_id))?
                }
                Entry::File(file) => {
                    entries += 1;
                    let name = || file.name.escape_ascii();
                    let body = tar.file_body().filter(|b| b.remaining == b.size);
                    let (size, sparse) = match body {
                        Some(body) => (body.size, body.sparse),
                        // Go reads no body for this entry: there is nothing to send, whatever
                        // size tar-split recorded.
                        None if tar.position() == Position::Header => continue,
                        None => bail!(
                            "layer {layer_id}: {}: tar-split records a {}-byte body at tar \
                             offset {}, in {}",
                            name(),
                            file.size,
                            tar.offset(),
                            tar.position()
                        ),
                    };
                    ensure!(
                        file.size == size,
                        "layer {layer_id}: {}: tar-split records {} bytes, the tar header {size}{}",
                        name(),
                        file.size,
                        if sparse {
                            " (a sparse file: tar-split keeps the expanded file, not the \
                             archive's segments)"
                        } else {
                            ""
                        }
                    );
                    tar.skip_file_body()
                        .with_context(|| format!("layer {layer_id}: {}", name()))?;
                    let fd = files
                        .open_body(&file.name, size)
                        .with_context(|| format!("layer {layer_id}: {}", name()))?;
                    if size <= inline_threshold {
                        out.push_body(fd, size, file.crc64)
                            .with_context(|| format!("layer {layer_id}: {}", name()))?;
                    } else {
                        out.flush().with_context(|| sending(layer_id))?;
                        out.sink
                            .file(fd, size, file.crc64)
                            .with_context(|| sending(layer_id))?;
                    }
                }
            }
        }
        ensure!(
            tar.at_clean_end(),
            "layer {layer_id}: {tar_split_rel} ends at tar offset {} inside {}",
            tar.offset(),
            tar.position()
        );
        out.flush().with_context(|| sending(layer_id))?;
        Ok(entries)
    }
}

fn sending(layer_id: &str) -> String {
    format!("sending layer {layer_id}")
}

fn open_diff(overlay: &OwnedFd, layer_id: &str) -> anyhow::Result<OwnedFd> {
    rustix::fs::openat2(
        overlay,
        format!("{layer_id}/diff"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE_STRICT,
    )
    .with_context(|| format!("opening the diff dir of layer {layer_id}"))
}

/// A layer's diff dir and, opened on demand, its parents' (for metacopy stubs).
struct LayerFiles<'a> {
    layer_id: &'a str,
    diff: OwnedFd,
    /// Parent layer ids, nearest first, with their diff dirs once opened.
    parents: Vec<(&'a str, Option<OwnedFd>)>,
    overlay: OwnedFd,
}

impl LayerFiles<'_> {
    /// Open the body of tar entry `name`: a regular file of exactly `size` bytes holding data
    /// (not a metacopy stub), beneath this layer's diff dir or, for a stub, a parent's.
    fn open_body(&mut self, name: &[u8], size: u64) -> anyhow::Result<OwnedFd> {
        let components = tarsplit::relative_components(name)?;
        ensure!(
            !components.is_empty(),
            "the layer root cannot have a body of {size} bytes"
        );
        let rel = components.join(&b'/');
        let fd = open_file(&self.diff, &rel)?
            .with_context(|| format!("missing from the diff dir of layer {}", self.layer_id))?;
        check_regular(&fd, size)?;
        if !is_metacopy(&fd)? {
            return Ok(fd);
        }
        for (parent_id, parent_diff) in &mut self.parents {
            let dir = match parent_diff {
                Some(d) => d,
                None => parent_diff.insert(open_diff(&self.overlay, parent_id)?),
            };
            let Some(lower) = open_file(dir, &rel)? else {
                continue;
            };
            check_regular(&lower, size)
                .with_context(|| format!("the copy in lower layer {parent_id}"))?;
            if !is_metacopy(&lower)? {
                return Ok(lower);
            }
        }
        bail!("a metacopy stub whose data is in no lower layer")
    }
}

/// Open a regular file beneath `dir` without following anything; `None` if it does not exist.
/// `O_NONBLOCK` so that a FIFO planted in the store cannot block the open.
fn open_file(dir: impl AsFd, rel: &[u8]) -> anyhow::Result<Option<OwnedFd>> {
    match rustix::fs::openat2(
        &dir,
        rel,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE_STRICT,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::LOOP) => bail!("is a symlink or lies beneath one"),
        Err(Errno::XDEV) => bail!("lies beyond a mount point"),
        Err(e @ (Errno::ACCESS | Errno::PERM)) => Err(e).context(denied_why(dir.as_fd(), rel)),
        Err(e) => Err(e).context("opening"),
    }
}

/// Why opening `rel` beneath `dir` was denied, as far as we can tell: inside a user namespace
/// (a rootless helper), a file or directory owned by an id the namespace does not map shows
/// as the overflow id, and no capability applies to it.
fn denied_why(dir: BorrowedFd<'_>, rel: &[u8]) -> String {
    let overflow = |what: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/overflow{what}"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(65534)
    };
    let (ouid, ogid) = (overflow("uid"), overflow("gid"));
    if !crate::userns::in_user_namespace() {
        return "opening".to_owned();
    }
    // The file itself and every directory above it within the diff dir.
    let mut path: &[u8] = rel;
    loop {
        if let Ok(st) = rustix::fs::statat(dir, path, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            && (st.st_uid == ouid || st.st_gid == ogid)
        {
            return format!(
                "opening: {} is owned by an id outside this helper's user namespace (it shows \
                 as {}:{}): the store's files must belong to the user or to its ranges in \
                 /etc/subuid and /etc/subgid",
                path.escape_ascii(),
                st.st_uid,
                st.st_gid
            );
        }
        match path.iter().rposition(|&b| b == b'/') {
            Some(i) => path = &path[..i],
            None => return "opening".to_owned(),
        }
    }
}

fn check_regular(fd: impl AsFd, size: u64) -> anyhow::Result<()> {
    let st = rustix::fs::fstat(fd).context("fstat")?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::RegularFile {
        bail!("is a {}, not a regular file", describe_type(kind));
    }
    let actual = st.st_size as u64;
    ensure!(
        actual == size,
        "is {actual} bytes, the layer's tar-split says {size}"
    );
    Ok(())
}

fn describe_type(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "file of unknown type",
    }
}

/// Does `fd` carry an overlayfs metacopy xattr?
fn is_metacopy(fd: impl AsFd) -> anyhow::Result<bool> {
    for name in METACOPY_XATTRS {
        match rustix::fs::fgetxattr_query(&fd, name) {
            Ok(_) => return Ok(true),
            Err(Errno::NODATA | Errno::NOTSUP) => {}
            Err(e) => return Err(e).with_context(|| format!("reading xattr {name}")),
        }
    }
    Ok(false)
}

/// Inline bytes on their way to the sink, gathered into batches of up to [`INLINE_BATCH`].
struct InlineBatch<'a> {
    sink: &'a mut dyn LayerSink,
    buf: Vec<u8>,
}

impl InlineBatch<'_> {
    fn push(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + data.len() > INLINE_BATCH {
            self.flush()?;
        }
        if data.len() >= INLINE_BATCH {
            return self.sink.inline(data);
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Append the `size`-byte body behind `fd`, checking its CRC when known.
    fn push_body(&mut self, fd: OwnedFd, size: u64, crc64: Option<u64>) -> anyhow::Result<()> {
        let size = usize::try_from(size).context("body size")?;
        if self.buf.len() + size > INLINE_BATCH {
            self.flush()?;
        }
        let start = self.buf.len();
        self.buf.resize(start + size, 0);
        let body = &mut self.buf[start..];
        let result = File::from(fd).read_exact(body);
        if let Err(e) = result {
            self.buf.truncate(start);
            return Err(e).context("reading the body");
        }
        if let Some(expected) = crc64 {
            let actual = tarsplit::crc64_iso(0, body);
            if actual != expected {
                self.buf.truncate(start);
                bail!(
                    "content has CRC-64 {actual:016x}, the layer's tar-split says {expected:016x}"
                );
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.sink.inline(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}
