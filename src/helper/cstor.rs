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
//! Sparse entries are the exception: tar-split records the expanded file, not the body the tar
//! holds, so the helper rebuilds that body (the PAX 1.0 map, then the data segments read from
//! the expanded file) and sends it inline (`proto/splitfdstream.md` §4.1).
//!
//! Nothing in the store is created or written: the lock files are opened read-only.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

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
mod manifest;
mod sparse;
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

/// Image records of an image store, beneath its root.
const IMAGES_JSON: &str = "overlay-images/images.json";
/// The lock of an image store, beneath its root.
const IMAGES_LOCK: &str = "overlay-images/images.lock";
/// Layer records of a layer store, beneath its root.
const LAYERS_JSON: &str = "overlay-layers/layers.json";
/// Layer records of containers' `--transient` layers, read after [`LAYERS_JSON`].
const VOLATILE_LAYERS_JSON: &str = "overlay-layers/volatile-layers.json";
/// The lock of a layer store, beneath its root.
const LAYERS_LOCK: &str = "overlay-layers/layers.lock";

/// The containers-storage backend for one overlay store, and the additional image stores it
/// reads images from.
///
/// Lookups follow containers/storage (`store.go`): an image is searched in the primary image
/// store, then in each additional one in order; a layer in the primary layer store, then in
/// each additional image store's own `overlay-layers/` in order, wherever its image was found;
/// a diff dir in the graph root's `overlay/`, then the image store's, then each additional
/// store's. Every store searched is read-locked (fcntl `F_RDLCK` on its lock file, opened
/// read-only and never created, so a store on a read-only filesystem is served as it is).
#[derive(Debug)]
pub struct CstorBackend {
    location: config::StoreLocation,
    /// Every directory read from, each opened `O_PATH` once: the graph root first, then the
    /// image store and the additional image stores. Paths are resolved beneath the root they
    /// belong to, never across roots.
    roots: Vec<Root>,
    /// Image stores, in search order.
    image_stores: Vec<ImageStore>,
    /// Layer stores, in search order.
    layer_stores: Vec<LayerStore>,
    /// Roots whose `overlay/` holds diff dirs, in the order the overlay driver looks.
    diff_roots: Vec<usize>,
}

/// A directory the backend reads from.
#[derive(Debug)]
struct Root {
    path: PathBuf,
    dir: OwnedFd,
}

/// `overlay-images/` of one root.
#[derive(Debug)]
struct ImageStore {
    root: usize,
    lock: StoreLock,
}

/// A layer store: its record files (the first record of an id wins) and locks, and the root
/// whose `overlay-layers/` holds its tar-split files.
#[derive(Debug)]
struct LayerStore {
    root: usize,
    records: Vec<(usize, &'static str)>,
    locks: Vec<StoreLock>,
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
    /// As [`open`](Self::open), and an image store or additional image store that cannot be
    /// opened (containers/storage refuses to start without one too).
    pub fn open_with_env(store: &Store, env: &config::StorageEnv) -> anyhow::Result<Self> {
        let location = config::resolve(store, env)?;
        let mut roots: Vec<Root> = Vec::new();
        let mut seen = HashSet::new();
        // `None` for a directory that is one already opened (by another path): searching it
        // twice finds nothing new, and two fds of one lock file would let one guard's unlock
        // drop the other's fcntl lock.
        let mut open_root = |path: &Path, what: &str| -> anyhow::Result<Option<usize>> {
            let dir = rustix::fs::open(
                path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .with_context(|| format!("opening {what} {}", path.display()))?;
            let st = rustix::fs::fstat(&dir)
                .with_context(|| format!("inspecting {what} {}", path.display()))?;
            if !seen.insert((st.st_dev, st.st_ino)) {
                return Ok(None);
            }
            roots.push(Root {
                path: path.to_owned(),
                dir,
            });
            Ok(Some(roots.len() - 1))
        };
        // The first root opened is never one already opened: index 0.
        let graph = open_root(&location.graphroot, "graph root")?.unwrap_or_default();
        let image_root = match &location.imagestore {
            Some(path) => open_root(path, "image store")?,
            None => None,
        };
        let mut additional = Vec::new();
        for path in &location.additional_image_stores {
            additional.extend(open_root(path, "additional image store")?);
        }

        let lock = |root: usize, rel: &str| {
            let r: &Root = &roots[root];
            StoreLock::open(&r.dir, &r.path, rel)
        };
        // With an image store, it is the primary image store and the graph root's images come
        // next (`store.load`); its layers' records are part of the primary layer store
        // (`newLayerStore`), whose tar-split files stay in the graph root.
        let image_order: Vec<usize> = image_root
            .into_iter()
            .chain([graph])
            .chain(additional.iter().copied())
            .collect();
        let image_stores = image_order
            .iter()
            .map(|&root| {
                Ok(ImageStore {
                    root,
                    lock: lock(root, IMAGES_LOCK)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut primary_records = vec![(graph, LAYERS_JSON)];
        primary_records.extend(image_root.map(|r| (r, LAYERS_JSON)));
        primary_records.push((graph, VOLATILE_LAYERS_JSON));
        let mut layer_stores = vec![LayerStore {
            root: graph,
            records: primary_records,
            locks: [graph]
                .into_iter()
                .chain(image_root)
                .map(|r| lock(r, LAYERS_LOCK))
                .collect::<anyhow::Result<_>>()?,
        }];
        for &root in &additional {
            layer_stores.push(LayerStore {
                root,
                records: vec![(root, LAYERS_JSON), (root, VOLATILE_LAYERS_JSON)],
                locks: vec![lock(root, LAYERS_LOCK)?],
            });
        }
        let diff_roots = [graph]
            .into_iter()
            .chain(image_root)
            .chain(additional.iter().copied())
            .collect();
        Ok(CstorBackend {
            location,
            roots,
            image_stores,
            layer_stores,
            diff_roots,
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
        let mut out = format!(
            "containers-storage:[overlay@{}+{}]",
            self.graphroot().display(),
            self.location.runroot.display()
        );
        let others: Vec<String> = self.roots[1..]
            .iter()
            .map(|r| r.path.display().to_string())
            .collect();
        if !others.is_empty() {
            out.push_str(&format!(" (and {})", others.join(", ")));
        }
        out
    }

    /// The directory image store `store` lives in.
    fn image_store_root(&self, store: usize) -> &Root {
        &self.roots[self.image_stores[store].root]
    }

    /// Resolve the reference and read the image's config and the manifest it is served with
    /// (see [`manifest::select`]), under the image stores' locks.
    fn read_image(
        &self,
        reference: &str,
    ) -> Result<(ImageRecord, manifest::StoredManifest, Vec<u8>), BackendError> {
        // Every image store read-locked in search order and held until the big data is read,
        // as containers/storage's `readAllImageStores` holds the ones it has searched.
        let _guards = self
            .image_stores
            .iter()
            .map(|s| s.lock.read())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut images: Vec<ImageRecord> = Vec::new();
        for (index, store) in self.image_stores.iter().enumerate() {
            let root = &self.roots[store.root];
            for mut image in read_records::<ImageRecord>(&root.dir, &root.path, IMAGES_JSON)? {
                image.store = index;
                images.push(image);
            }
        }
        let image = resolve_reference(&images, reference, &self.describe())?.clone();
        validate_id("image", &image.id)?;
        let root = self.image_store_root(image.store);
        let dir = format!("overlay-images/{}", image.id);
        let big_data = |key: &str| -> anyhow::Result<Option<Vec<u8>>> {
            let rel = format!("{dir}/{}", big_data_file_name(key));
            read_file(&root.dir, &root.path, &rel, MAX_BIG_DATA_LEN)
        };
        let config_key = format!("sha256:{}", image.id);
        let config = big_data(&config_key)?.with_context(|| {
            format!(
                "image {} has no config (no big-data item {config_key})",
                image.id
            )
        })?;
        let wanted = manifest::requested_digest(reference, &image.id);
        let manifest = manifest::select(&image, wanted, &big_data)?;
        Ok((image, manifest, config))
    }

    /// Read-lock every layer store, in search order.
    fn lock_layer_stores(&self) -> anyhow::Result<Vec<store::ReadGuard<'_>>> {
        self.layer_stores
            .iter()
            .flat_map(|s| &s.locks)
            .map(StoreLock::read)
            .collect()
    }

    /// The records of layer store `index`, in the order read (the caller holds its locks).
    fn layer_records(&self, index: usize) -> anyhow::Result<Vec<LayerRecord>> {
        let mut out = Vec::new();
        for &(root, rel) in &self.layer_stores[index].records {
            let root = &self.roots[root];
            out.extend(read_records::<LayerRecord>(&root.dir, &root.path, rel)?);
        }
        Ok(out)
    }

    /// All layer records, by id, the first store's record of an id winning, under the layer
    /// stores' locks.
    fn read_layers(&self) -> anyhow::Result<HashMap<String, LayerRecord>> {
        let _guards = self.lock_layer_stores()?;
        let mut by_id = HashMap::new();
        for index in 0..self.layer_stores.len() {
            for layer in self.layer_records(index)? {
                by_id.entry(layer.id.clone()).or_insert(layer);
            }
        }
        Ok(by_id)
    }

    /// The layer store that holds `layer_id` now (the caller holds the layer stores' locks):
    /// the first that records it, as containers/storage looks a layer up each time it reads
    /// one. With one layer store there is nothing to choose.
    fn layer_store_of(&self, layer_id: &str) -> anyhow::Result<usize> {
        if self.layer_stores.len() == 1 {
            return Ok(0);
        }
        for index in 0..self.layer_stores.len() {
            if self.layer_records(index)?.iter().any(|l| l.id == layer_id) {
                return Ok(index);
            }
        }
        bail!("layer {layer_id} is no longer in {}", self.describe())
    }

    /// The `overlay/` directories that may hold diff dirs, in search order. Only this one step
    /// may cross a mount: containers-storage bind-mounts `overlay` onto itself while anything
    /// is mounted; everything beneath it must not.
    fn overlay_dirs(&self) -> anyhow::Result<Vec<OverlayDir<'_>>> {
        let mut out = Vec::new();
        for &index in &self.diff_roots {
            let root = &self.roots[index];
            let dir = match rustix::fs::openat2(
                &root.dir,
                "overlay",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(dir) => Some(dir),
                // A store that holds no layer yet (containers/storage makes it on first use,
                // which a reader must not), or whose images' layers all live elsewhere.
                Err(Errno::NOENT) => None,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("opening {}", root.path.join("overlay").display())
                    });
                }
            };
            out.push(OverlayDir { root, dir });
        }
        Ok(out)
    }
}

/// The `overlay/` directory of a root, `None` where it has none.
struct OverlayDir<'a> {
    root: &'a Root,
    dir: Option<OwnedFd>,
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
        self.open_image_at(reference).map(|(image, _)| image)
    }

    fn open_image_at(&self, reference: &str) -> Result<(OpenedImage, PathBuf), BackendError> {
        let (image, stored_manifest, config) = self.read_image(reference)?;
        let store_root = self.image_store_root(image.store).path.clone();
        let id = &image.id;
        let config_digest = sha256_digest(&config);
        if config_digest != format!("sha256:{id}") {
            return Err(
                anyhow::anyhow!("the config of image {id} has digest {config_digest}").into(),
            );
        }
        let manifest = String::from_utf8(stored_manifest.bytes)
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
        for (i, (layer, diff_id)) in chain.iter().zip(&diff_ids).enumerate() {
            if !is_digest(diff_id) {
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
                diff_id: diff_id.clone(),
                size: layer.diff_size.and_then(|s| u64::try_from(s).ok()),
                entries: None,
            });
            locators.push(LayerLocator::Cstor {
                layer_id: layer.id.clone(),
                parents: chain[..i].iter().rev().map(|l| l.id.clone()).collect(),
            });
        }
        manifest::check_layers(id, &stored_manifest.parsed, &chain, &diff_ids, &layers)?;
        let opened = OpenedImage {
            image_id: id.clone(),
            manifest_digest: stored_manifest.digest,
            manifest,
            config_digest,
            config,
            layers: infos,
            locators,
        };
        Ok((opened, store_root))
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
        // Held for the whole stream, as podman's own readers hold them, so the layer cannot be
        // deleted while its files are being opened (fds already handed out stay valid anyway).
        let _guards = self.lock_layer_stores()?;
        let home = &self.roots[self.layer_stores[self.layer_store_of(layer_id)?].root];
        let tar_split_rel = format!("overlay-layers/{layer_id}.tar-split.gz");
        let tar_split = match open_beneath(&home.dir, &tar_split_rel) {
            Ok(f) => f,
            // containers/storage then rebuilds a tar from the diff dir, which is not the
            // layer's original tar and does not hash to its diff_id.
            Err(Errno::NOENT) => bail!(
                "layer {layer_id} has no tar-split ({tar_split_rel} is missing, as after \
                 some partial zstd:chunked or eStargz pulls), so its original tar cannot be \
                 rebuilt; pull the image again with partial pulls disabled"
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("opening {}", home.path.join(&tar_split_rel).display())
                });
            }
        };
        let overlays = self.overlay_dirs()?;
        let mut files = LayerFiles {
            layer_id,
            diff: open_diff(&overlays, layer_id)?,
            parents: parents.iter().map(|p| (p.as_str(), None)).collect(),
            overlays,
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
        // and their sizes are input a hostile store chooses. The tracker also reads and checks
        // sparse maps, which a sparse body is rebuilt from.
        let mut tar = Tracker::with_sparse_maps();
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
                    let size = match body {
                        Some(body) if body.sparse => {
                            send_sparse_body(&mut files, &mut tar, &mut out, &file, body.size)
                                .with_context(|| format!("layer {layer_id}: {}", name()))?;
                            continue;
                        }
                        Some(body) => body.size,
                        // Go reads no body for this entry: there is nothing to send, whatever
                        // size tar-split recorded.
                        None if tar.position() == Position::Header => continue,
                        // A record with no bytes places nothing: tar-split writes one for a
                        // PAX global header, whose padding Go reads only at the next header.
                        None if file.size == 0 => continue,
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
                        "layer {layer_id}: {}: tar-split records {} bytes, the tar header {size}",
                        name(),
                        file.size,
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
        if let Some(size) = image.layers.get(index).and_then(|l| l.size) {
            ensure!(
                tar.offset() == size,
                "layer {layer_id}: {tar_split_rel} rebuilds a tar of {} bytes, layers.json \
                 records {size} (diff-size)",
                tar.offset()
            );
        }
        out.flush().with_context(|| sending(layer_id))?;
        Ok(entries)
    }
}

/// Send the body the tar has for a sparse entry whose header the tracker has just read.
/// tar-split's record is what Go's reader returns for it, the expanded file (see [`sparse`]):
/// the body is rebuilt from that file in the diff dir, sent inline, and fed to the tracker,
/// which checks it (a PAX 1.0 map included) against the header's map and size.
fn send_sparse_body(
    files: &mut LayerFiles<'_>,
    tar: &mut Tracker,
    out: &mut InlineBatch<'_>,
    file: &tarsplit::FileEntry,
    size: u64,
) -> anyhow::Result<()> {
    let entry = tar
        .sparse_entry()
        .cloned()
        .context("a sparse body whose map the tracker does not know")?;
    ensure!(
        file.size == entry.real_size,
        "tar-split records {} bytes, the sparse entry's real size is {}",
        file.size,
        entry.real_size
    );
    let fd = files.open_body(&file.name, entry.real_size)?;
    sparse::send_body(fd.as_fd(), &entry, size, &mut |bytes| {
        tar.feed(bytes).context("the rebuilt sparse body")?;
        out.push(bytes).context("sending")?;
        Ok(())
    })
    .with_context(|| {
        format!(
            "rebuilding the {:?} sparse body of {size} bytes",
            entry.format
        )
    })?;
    ensure!(
        tar.file_body().is_none(),
        "the rebuilt sparse body ends at tar offset {}, inside the body",
        tar.offset()
    );
    Ok(())
}

fn sending(layer_id: &str) -> String {
    format!("sending layer {layer_id}")
}

/// The diff dir of `layer_id`: the first of `overlays` that has it, as the overlay driver's
/// `dir2` looks.
fn open_diff(overlays: &[OverlayDir<'_>], layer_id: &str) -> anyhow::Result<OwnedFd> {
    for overlay in overlays {
        let Some(dir) = &overlay.dir else { continue };
        match rustix::fs::openat2(
            dir,
            format!("{layer_id}/diff"),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE_STRICT,
        ) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "opening the diff dir of layer {layer_id} in {}",
                        overlay.root.path.join("overlay").display()
                    )
                });
            }
        }
    }
    let searched: Vec<String> = overlays
        .iter()
        .map(|o| o.root.path.join("overlay").display().to_string())
        .collect();
    bail!(
        "layer {layer_id} has no diff dir in {}",
        searched.join(" or ")
    )
}

/// A layer's diff dir and, opened on demand, its parents' (for metacopy stubs).
struct LayerFiles<'a> {
    layer_id: &'a str,
    diff: OwnedFd,
    /// Parent layer ids, nearest first, with their diff dirs once opened.
    parents: Vec<(&'a str, Option<OwnedFd>)>,
    overlays: Vec<OverlayDir<'a>>,
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
                None => parent_diff.insert(open_diff(&self.overlays, parent_id)?),
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
