//! `pull`: import an image into a composefs repository.
//!
//! ```text
//!  helper ──splitfdstream + fds──▶ worker (one helper each, layers in parallel)
//!                                    │ LayerImporter: reflink each body, hash it once
//!                                    │ (fs-verity digest + the layer's sha256 from one buffer)
//!                                    ▼
//!                     layer splitstream object, diff_id verified
//!  syncfs ─▶ link oci-layer-<diff_id> ─▶ config/manifest streams + EROFS image ─▶ tag ─▶ syncfs
//! ```
//!
//! Nothing unverified becomes visible: a layer stream is linked only after its diff_id matched
//! and its objects exist and were synced; the tag is written last. A failure leaves only
//! unreferenced objects, and a re-run picks up where it stopped (present layers are skipped).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use oci_spec::image::{Digest, DigestAlgorithm, ImageConfiguration};
use sha2::{Digest as _, Sha256};

use crate::client::{LayerItem, Proxy, ProxyConfig, UsernsMode};
use crate::proto::rpc::{self, LayerInfo, LayerSelector};
use crate::proto::source::ImageRef;
use crate::repo::oci::{ImportStats, LayerImporter, prepare_image, publish_layer};
use crate::repo::{
    BodyPool, HashAlg, ObjectId, RepoError, RepoOptions, Repository, SourceTrust, with_body_pool,
};

/// Receives progress reports; the CLI draws progress bars from them. All methods default to
/// nothing. Layers are imported in parallel, so the methods are called from several threads;
/// each layer's calls come from one thread, in order: [`layer_started`](Self::layer_started),
/// [`advance`](Self::advance)…, [`layer_done`](Self::layer_done).
pub trait Progress: Sync {
    /// The image resolved (`layers`, base first); the layers at indices `todo` will be imported,
    /// in that order as far as workers allow (the others are present already).
    fn image(&self, _layers: &[LayerInfo], _todo: &[usize]) {}
    /// Layer `index` is being requested from the helper.
    fn layer_started(&self, _index: usize) {}
    /// `bytes` of layer `index` were imported, and `files` more bodies.
    fn advance(&self, _index: usize, _bytes: u64, _files: u64) {}
    /// Layer `index` finished (successfully or not).
    fn layer_done(&self, _index: usize) {}
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Options of [`pull`].
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Digest for a new repository (default sha512); must match an existing one.
    pub hash: Option<HashAlg>,
    /// Allow creating the repository without fs-verity (see [`RepoOptions::insecure`]).
    pub insecure: bool,
    /// Treat every source file as one that others may rewrite: each object is then hashed
    /// from its own bytes ([`SourceTrust::Untrusted`]). By default, files owned by root or by
    /// the repository's owner, in a store whose root directory is too, are hashed as they are
    /// read and reflinked afterwards (see [`SourceTrust::Owners`]).
    pub untrusted_source: bool,
    /// Tag to write (`streams/refs/oci/<tag>`); default: the source reference as given.
    pub tag: Option<String>,
    /// Layers imported in parallel (one helper each); default: available cores, at most 8.
    pub jobs: Option<usize>,
    /// Bodies of at most this many bytes travel inline (default 64, composefs's inline limit).
    pub inline_threshold: Option<u64>,
    /// Helper program; default: the current executable (see [`ProxyConfig::helper_exe`]).
    pub helper_exe: Option<PathBuf>,
    /// Command prefix for the helper (e.g. `sudo -n`).
    pub command_prefix: Vec<OsString>,
    /// Whether the helper runs in a user namespace of its own (rootless stores).
    pub userns: UsernsMode,
}

/// What happened to one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerStatus {
    /// Already in the repository; not read.
    Present,
    /// Imported and verified by this pull.
    Imported,
}

/// Per-layer outcome.
#[derive(Debug, Clone)]
pub struct LayerOutcome {
    /// The layer's diff_id.
    pub diff_id: String,
    /// What happened.
    pub status: LayerStatus,
    /// Bodies received as fds.
    pub files: u64,
    /// Bytes of layer tar processed.
    pub bytes: u64,
    /// Time spent importing it (zero when present).
    pub elapsed: Duration,
}

/// Result of a successful pull.
#[derive(Debug, Clone)]
pub struct PullSummary {
    /// Image id (hex sha256 of the config).
    pub image_id: String,
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// `sha256:…` of the config.
    pub config_digest: String,
    /// The tag written.
    pub tag: String,
    /// Layers, base first.
    pub layers: Vec<LayerOutcome>,
    /// The composefs EROFS image id, when one could be built (see `repo::oci::prepare_image`).
    pub erofs_image: Option<String>,
    /// Why no EROFS image was built, when none was.
    pub erofs_skipped: Option<String>,
    /// Objects by how they were stored.
    pub objects: ObjectCounts,
    /// Whose source files were trusted (see [`PullOptions::untrusted_source`]).
    pub source_trust: SourceTrust,
    /// Wall time.
    pub elapsed: Duration,
    /// Of that, the time after the last layer: EROFS image, config and manifest, syncs, links.
    pub finalize: Duration,
}

/// Objects of a pull by how they were stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectCounts {
    /// Created by reflink (no data copied).
    pub reflinked: u64,
    /// Created by copying (the filesystem cannot reflink from the source).
    pub copied: u64,
    /// Already in the repository.
    pub reused: u64,
    /// Of the new and reused objects, those named from their trusted source's bytes, read
    /// before the object was made (the rest were named from the object's own bytes).
    pub hashed_from_source: u64,
}

impl ObjectCounts {
    fn add(&mut self, s: &ImportStats) {
        self.reflinked += s.objects_reflinked;
        self.copied += s.objects_copied;
        self.reused += s.objects_present;
        self.hashed_from_source += s.bodies_hashed_from_source;
    }
}

/// A layer's stream object, bodies and bytes, or why it failed.
type LayerResult = anyhow::Result<(ObjectId, u64, u64, Duration)>;

/// Most layers worked on at once by default (`pull`, `export`): each runs its own helper and
/// keeps about a core busy.
const MAX_DEFAULT_JOBS: usize = 8;

/// How many layers to work on at once: `requested`, or one per core up to
/// [`MAX_DEFAULT_JOBS`]; never more than there are layers, never none.
pub(crate) fn layer_jobs(requested: Option<usize>, layers: usize) -> usize {
    requested
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_DEFAULT_JOBS)
        })
        .clamp(1, layers.max(1))
}

/// Pull `source` into the repository at `repo_path` (created if missing).
///
/// # Errors
/// Names the layer at fault. Layers verified before the failure stay in the repository (they
/// are complete and correct); nothing of a failed layer, and no tag, is published.
pub fn pull(
    source: &ImageRef,
    repo_path: &Path,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> anyhow::Result<PullSummary> {
    let start = Instant::now();
    let repo_opts = RepoOptions {
        hash: opts.hash,
        insecure: opts.insecure,
    };
    let repo = Repository::open_or_create(repo_path, &repo_opts).map_err(|e| {
        if e.downcast_ref::<RepoError>().is_some() {
            e
        } else {
            e.context(format!("opening repository {}", repo_path.display()))
        }
    })?;
    let proxy_config = ProxyConfig {
        store: source.store.clone(),
        helper_exe: opts.helper_exe.clone(),
        command_prefix: opts.command_prefix.clone(),
        userns: opts.userns,
        idle_timeout: None,
    };
    let mut proxy = Proxy::spawn(&proxy_config)?;
    let image = proxy.open_image(&source.reference)?;
    check_image(&image)?;
    let trust = if opts.untrusted_source {
        SourceTrust::Untrusted
    } else {
        store_trust(&repo, image.store_root.as_deref())?
    };
    let tag = opts.tag.clone().unwrap_or_else(|| source.reference.clone());
    anyhow::ensure!(
        !tag.is_empty(),
        "no tag given and the source has no reference to use as one"
    );

    let mut outcomes: Vec<LayerOutcome> = Vec::with_capacity(image.layers.len());
    let mut streams: Vec<Option<ObjectId>> = Vec::with_capacity(image.layers.len());
    let mut todo = Vec::new();
    for (i, layer) in image.layers.iter().enumerate() {
        let present = repo.has_stream(&format!("oci-layer-{}", layer.diff_id))?;
        if present.is_none() {
            todo.push(i);
        }
        outcomes.push(LayerOutcome {
            diff_id: layer.diff_id.clone(),
            status: if present.is_some() {
                LayerStatus::Present
            } else {
                LayerStatus::Imported
            },
            files: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
        });
        streams.push(present);
    }
    // Largest first: the biggest layer bounds the wall time, so it must not start last
    // (longest-processing-time-first scheduling over the workers).
    todo.sort_by_key(|&i| std::cmp::Reverse(image.layers[i].size.unwrap_or(0)));
    progress.image(&image.layers, &todo);

    let threshold = opts
        .inline_threshold
        .unwrap_or(rpc::DEFAULT_INLINE_THRESHOLD);
    let jobs = layer_jobs(opts.jobs, todo.len());
    let (jobs, fds) = fd_budget(jobs);
    proxy.set_fd_batch(fds.batch);
    // Layer workers keep every core busy while there are at least as many of them as cores.
    // When fewer remain (an image of one big layer, or the last layer of a pull), the bodies
    // of a layer go to a pool of one thread per core: small files cost mostly per-file work
    // (digest, tmpfile, reflink, link) that the pool spreads over all cores. (Pooling while
    // every core already has a layer only adds hand-offs: measured 15 % slower.)
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let live = AtomicUsize::new(jobs);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, LayerResult)>> = Mutex::new(Vec::new());
    let counts = Mutex::new(ObjectCounts::default());
    with_body_pool(&repo, cores, |pool| {
        let work = |proxy: &mut Proxy, handle: u64| loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(&index) = todo.get(k) else {
                live.fetch_sub(1, Ordering::Relaxed);
                break;
            };
            let layer = &image.layers[index];
            let bodies = Bodies {
                pool,
                live: &live,
                cores,
                window_files: fds.window,
            };
            progress.layer_started(index);
            let r = import_layer(
                &repo, &bodies, proxy, handle, index, layer, threshold, trust, progress, &counts,
            )
            .with_context(|| format!("layer {index} ({})", layer.diff_id));
            progress.layer_done(index);
            results
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((index, r));
        };
        let (work, proxy_config, image_ref, live) = (&work, &proxy_config, &image, &live);
        std::thread::scope(|s| {
            for _ in 1..jobs {
                s.spawn(move || {
                    // Each worker has its own helper, so layers stream independently.
                    let spawned = Proxy::spawn(proxy_config).and_then(|mut p| {
                        p.set_fd_batch(fds.batch);
                        let img = p.open_image(&source.reference)?;
                        if img.image_id != image_ref.image_id {
                            bail!(
                                "image {:?} changed during the pull ({} → {})",
                                source.reference,
                                image_ref.image_id,
                                img.image_id
                            );
                        }
                        Ok((p, img.image))
                    });
                    match spawned {
                        Ok((mut p, handle)) => {
                            work(&mut p, handle);
                            let _ = p.shutdown();
                        }
                        // The other workers still drain the queue.
                        Err(e) => {
                            live.fetch_sub(1, Ordering::Relaxed);
                            eprintln_worker_failure(&e);
                        }
                    }
                });
            }
            work(&mut proxy, image_ref.image);
        });
    });
    let _ = proxy.shutdown();

    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    let mut first_error = None;
    for (index, r) in results {
        match r {
            Ok((id, files, bytes, elapsed)) => {
                streams[index] = Some(id);
                outcomes[index].files = files;
                outcomes[index].bytes = bytes;
                outcomes[index].elapsed = elapsed;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // Verified layers are worth keeping even when the image fails: durable first, then visible.
    let publish_verified = |streams: &[Option<ObjectId>]| -> anyhow::Result<()> {
        repo.sync()?;
        for (index, layer) in image.layers.iter().enumerate() {
            if let (LayerStatus::Imported, Some(id)) = (&outcomes[index].status, &streams[index]) {
                publish_layer(&repo, &layer.diff_id, id)?;
            }
        }
        Ok(())
    };
    if let Some(e) = first_error {
        publish_verified(&streams)?;
        return Err(e.context(format!("pulling {source}; nothing was tagged")));
    }
    let layer_streams: Vec<(String, ObjectId)> = image
        .layers
        .iter()
        .zip(streams.iter().cloned())
        .map(|(l, s)| {
            s.map(|s| (l.diff_id.clone(), s))
                .ok_or_else(|| anyhow!("layer {} missing", l.diff_id))
        })
        .collect::<anyhow::Result<_>>()?;
    // Config, manifest and EROFS image become objects; nothing is linked yet.
    let layers_done = start.elapsed();
    let prepared = match prepare_image(
        &repo,
        image.manifest.as_bytes(),
        &image.manifest_digest,
        image.config.as_bytes(),
        &image.config_digest,
        &layer_streams,
    ) {
        Ok(p) => p,
        Err(e) => {
            publish_verified(&streams)?;
            return Err(e.context(format!(
                "pulling {source}; nothing was tagged: preparing image {}",
                image.image_id
            )));
        }
    };
    // Durability point 1: every object is on disk before any link names it.
    publish_verified(&streams)?;
    let published = prepared
        .publish(&repo, Some(&tag))
        .with_context(|| format!("publishing image {}", image.image_id))?;
    // Durability point 2: the links, the tag last among them.
    repo.sync()?;
    Ok(PullSummary {
        image_id: image.image_id,
        manifest_digest: image.manifest_digest,
        config_digest: image.config_digest,
        tag,
        layers: outcomes,
        erofs_image: published.erofs_image.map(|id| id.to_string()),
        erofs_skipped: published.erofs_skipped,
        objects: counts.into_inner().unwrap_or_else(|e| e.into_inner()),
        source_trust: trust,
        elapsed: start.elapsed(),
        finalize: start.elapsed().saturating_sub(layers_done),
    })
}

#[allow(clippy::print_stderr)]
fn eprintln_worker_failure(e: &anyhow::Error) {
    eprintln!("splitfdstream: a pull worker could not start its helper: {e:#}");
}

/// Whose source files may be hashed before they are cloned: the repository owner's and
/// root's when the store's root directory (as the helper reports it) belongs to one of them and
/// nobody else may write to it, so that nobody who could not rewrite the repository anyway can
/// change a source file between its read and its clone; otherwise nobody's. The per-file check
/// of [`SourceTrust::Owners`] still applies to each body, so a helper that misreports its
/// root gains nothing.
fn store_trust(repo: &Repository, store_root: Option<&str>) -> anyhow::Result<SourceTrust> {
    let owner = repo.owner()?;
    let trusted = store_root
        .and_then(|root| rustix::fs::stat(root).ok())
        .is_some_and(|st| (st.st_uid == 0 || st.st_uid == owner) && st.st_mode & 0o022 == 0);
    Ok(if trusted {
        SourceTrust::Owners { uid: owner }
    } else {
        SourceTrust::Untrusted
    })
}

/// The manifest and config must hash to their digests, and the config's diff_ids must be the
/// layers served: those names are what the repository publishes.
fn check_image(image: &rpc::OpenImageResult) -> anyhow::Result<()> {
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    if sha(image.config.as_bytes()) != image.config_digest {
        bail!(
            "image {}: config does not hash to {}",
            image.image_id,
            image.config_digest
        );
    }
    if sha(image.manifest.as_bytes()) != image.manifest_digest {
        bail!(
            "image {}: manifest does not hash to {}",
            image.image_id,
            image.manifest_digest
        );
    }
    let config: ImageConfiguration = serde_json::from_str(&image.config)
        .with_context(|| format!("image {}: parsing its config", image.image_id))?;
    let diff_ids: Vec<&str> = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(String::as_str)
        .collect();
    let served: Vec<&str> = image.layers.iter().map(|l| l.diff_id.as_str()).collect();
    if diff_ids != served {
        bail!(
            "image {}: config lists diff_ids {diff_ids:?}, the store has {served:?}",
            image.image_id
        );
    }
    for l in &image.layers {
        let sha256 =
            Digest::from_str(&l.diff_id).is_ok_and(|d| *d.algorithm() == DigestAlgorithm::Sha256);
        if !sha256 {
            bail!(
                "image {}: layer diff_id {:?} is not a sha256 digest",
                image.image_id,
                l.diff_id
            );
        }
    }
    Ok(())
}

/// Where a layer's bodies are stored (in batches either way): by the importing thread, or by
/// the pool when fewer layer workers than cores are left.
struct Bodies<'a, 'r> {
    pool: &'a BodyPool<'r>,
    live: &'a AtomicUsize,
    cores: usize,
    /// Bodies (open fds) a layer may hold in its batching window.
    window_files: usize,
}

/// fds held per layer worker: received but not yet used (`batch`), and read but not yet
/// stored (`window`).
#[derive(Debug, Clone, Copy)]
struct FdShare {
    batch: u32,
    window: usize,
}

/// fds this process keeps for everything but bodies: the repository, each helper's socket,
/// pipes and pidfd, the pool threads' tmpfiles, the standard streams.
const RESERVED_FDS: u64 = 64;

/// Split the soft RLIMIT_NOFILE among `jobs` layer workers, running fewer when each would get
/// too few fds: a worker holds up to `batch + window` bodies open at once, and running past
/// the limit makes the kernel drop received fds (EMFILE surfaces as MSG_CTRUNC).
fn fd_budget(jobs: usize) -> (usize, FdShare) {
    /// Fewest fds worth giving a worker.
    const MIN_PER_WORKER: u64 = 8;
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let usable = soft.saturating_sub(RESERVED_FDS + 8 * jobs as u64);
    let jobs = jobs.min(usize::try_from((usable / MIN_PER_WORKER).max(1)).unwrap_or(jobs));
    let per_worker = (usable / jobs as u64).max(2);
    let batch = u32::try_from(per_worker / 2)
        .unwrap_or(u32::MAX)
        .clamp(1, rpc::MAX_FDS_PER_REPLY);
    let window = usize::try_from(per_worker / 2)
        .unwrap_or(usize::MAX)
        .clamp(1, crate::repo::oci::WINDOW_FILES);
    (jobs, FdShare { batch, window })
}

impl Bodies<'_, '_> {
    fn pooled(&self) -> bool {
        self.live.load(Ordering::Relaxed) < self.cores
    }
}

#[allow(clippy::too_many_arguments)]
fn import_layer(
    repo: &Repository,
    bodies: &Bodies<'_, '_>,
    proxy: &mut Proxy,
    handle: u64,
    index: usize,
    layer: &LayerInfo,
    threshold: u64,
    trust: SourceTrust,
    progress: &dyn Progress,
    counts: &Mutex<ObjectCounts>,
) -> LayerResult {
    let started = Instant::now();
    let mut stream =
        proxy.get_layer(handle, LayerSelector::Index(index as u64), Some(threshold))?;
    let mut importer = LayerImporter::new(repo)?;
    importer.set_window_files(bodies.window_files);
    importer.set_source_trust(trust);
    let (mut files, mut bytes) = (0u64, 0u64);
    while let Some(item) = stream.next_item()? {
        match item {
            LayerItem::Inline(b) => {
                importer.inline(b)?;
                bytes += b.len() as u64;
                progress.advance(index, b.len() as u64, 0);
            }
            LayerItem::File { fd, size, .. } => {
                importer.file_batched(fd, size, bodies.pooled().then_some(bodies.pool))?;
                files += 1;
                bytes += size;
                progress.advance(index, size, 1);
            }
        }
    }
    drop(stream);
    let (id, local) = importer.finish_with_stats(&layer.diff_id)?;
    counts.lock().unwrap_or_else(|e| e.into_inner()).add(&local);
    Ok((id, files, bytes, started.elapsed()))
}
