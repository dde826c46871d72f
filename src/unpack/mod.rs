//! `unpack`: an image's root filesystem (or one layer's changes) in a directory, each body
//! reflinked from the store where the filesystem allows.
//!
//! ```text
//!  helper ──splitfdstream + fds──▶ Entries (tar headers parsed, bodies as fds)
//!                                    │ Applier: entries placed beneath DIR (openat2 BENEATH),
//!                                    │ whiteouts and opaque directories processed
//!                                    ▼
//!                   DIR  (bodies: FICLONE, else copy_file_range, else read + write)
//! ```
//!
//! Layers are applied in order, base first, as the OCI image spec's "Applying Changesets"
//! says. Nothing is written outside DIR: see `src/unpack/root.rs` for how paths are resolved. Directory
//! modes and times are set last, deepest first, so that creating their contents does not
//! change them.
//!
//! Bodies are not hashed: the layer's diff_id is not checked here (that would read every
//! byte a reflink avoids). The helper confirms every stream complete, and the bodies are the
//! store's own files.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::client::Proxy;
use crate::proto::rpc::{LayerInfo, LayerSelector};

mod apply;
mod body;
mod entries;
pub(crate) mod root;

pub use apply::ApplyStats;
pub use body::BodyStats;

/// How whiteouts of one layer's changes (`--layer`) are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhiteoutFormat {
    /// As overlayfs keeps them: a character device 0/0 for a removed path, and the xattr
    /// `trusted.overlay.opaque=y` (`user.overlay.opaque` when not root) on an opaque
    /// directory.
    #[default]
    Overlay,
    /// As the layer tar has them: `.wh.NAME` and `.wh..wh..opq` files.
    Oci,
}

/// Options of [`unpack`].
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Apply only this layer's changes (0 = base), keeping its whiteouts.
    pub layer: Option<usize>,
    /// How kept whiteouts look (with `layer` only).
    pub whiteouts: WhiteoutFormat,
    /// Unpack into a sibling of the directory and rename it into place only on success.
    pub atomic: bool,
    /// Apply owners; default: when running as root. Without it the files belong to the
    /// caller, and [`UnpackProgress::warning`] says so once.
    pub owners: Option<bool>,
    /// Bodies of at most this many bytes travel inline instead of as fds (default 64).
    pub inline_threshold: Option<u64>,
}

/// Receives progress reports of [`unpack`]; all methods default to nothing.
pub trait UnpackProgress {
    /// Layer `index` is about to be applied.
    fn layer_started(&self, _index: usize, _layer: &LayerInfo) {}
    /// Layer `index` was applied.
    fn layer_done(&self, _index: usize) {}
    /// Something was left out (owners, device nodes, xattrs); each kind is said once.
    fn warning(&self, _message: &str) {}
}

/// An [`UnpackProgress`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;
impl UnpackProgress for NoProgress {}

/// What [`unpack`] did.
#[derive(Debug, Clone)]
pub struct UnpackSummary {
    /// The image id.
    pub image_id: String,
    /// Indices of the layers applied, in order.
    pub layers: Vec<usize>,
    /// Whether owners were applied.
    pub owners: bool,
    /// Counts.
    pub stats: ApplyStats,
}

/// Unpack image `reference` of `proxy`'s store into `dir`, which must not exist or be an
/// empty directory.
///
/// # Errors
/// The image or a layer cannot be read, `dir` is not empty, or an entry cannot be applied
/// (the error names it and its layer). Without [`UnpackOptions::atomic`], `dir` then holds a
/// partial tree, which the error says; with it, `dir` is unchanged.
pub fn unpack(
    proxy: &mut Proxy,
    reference: &str,
    dir: &Path,
    opts: &UnpackOptions,
    progress: &dyn UnpackProgress,
) -> anyhow::Result<UnpackSummary> {
    check_target(dir)?;
    if !opts.atomic {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
        return unpack_into(proxy, reference, dir, opts, progress).map_err(|e| {
            e.context(format!(
                "unpacking into {} failed; it holds a partial tree, delete it",
                dir.display()
            ))
        });
    }
    let sibling = sibling_of(dir)?;
    std::fs::create_dir(&sibling).with_context(|| format!("creating {}", sibling.display()))?;
    let result = unpack_into(proxy, reference, &sibling, opts, progress).and_then(|summary| {
        // Renaming over an empty directory replaces it; over a non-empty one it fails.
        std::fs::rename(&sibling, dir)
            .with_context(|| format!("renaming {} to {}", sibling.display(), dir.display()))?;
        Ok(summary)
    });
    if result.is_err() {
        remove_tree(&sibling);
    }
    result
}

/// `dir` must be absent or an empty directory.
fn check_target(dir: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", dir.display())),
        Ok(md) if !md.is_dir() => bail!("{} exists and is not a directory", dir.display()),
        Ok(_) => {
            let mut it =
                std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
            if it.next().is_some() {
                bail!("{} is not empty", dir.display());
            }
            Ok(())
        }
    }
}

/// A hidden name beside `dir` for an atomic unpack.
fn sibling_of(dir: &Path) -> anyhow::Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} names no directory", dir.display()))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(parent.join(format!(
        ".{}.unpack-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Remove a tree we made, following no symlink in it; best effort.
fn remove_tree(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    if let Ok(root) = root::Root::open(parent) {
        use std::os::unix::ffi::OsStrExt;
        let _ = root::remove_all(root.fd(), name.as_bytes());
    }
}

fn unpack_into(
    proxy: &mut Proxy,
    reference: &str,
    dir: &Path,
    opts: &UnpackOptions,
    progress: &dyn UnpackProgress,
) -> anyhow::Result<UnpackSummary> {
    let image = proxy.open_image(reference)?;
    let layers: Vec<usize> = match opts.layer {
        Some(i) if i < image.layers.len() => vec![i],
        Some(i) => bail!(
            "image {reference} has {} layers; there is no layer {i}",
            image.layers.len()
        ),
        None => (0..image.layers.len()).collect(),
    };
    let owners = opts
        .owners
        .unwrap_or_else(|| rustix::process::geteuid().is_root());
    if !owners {
        progress.warning("not root: owners are not applied; every file belongs to you");
    }
    let target = match opts.layer {
        Some(_) => apply::Target::Diff(opts.whiteouts),
        None => apply::Target::RootFs,
    };
    let root = root::Root::open(dir)?;
    let mut applier = apply::Applier::new(&root, target, owners, progress);
    for &index in &layers {
        let info = &image.layers[index];
        progress.layer_started(index, info);
        let what = || format!("layer {index} ({})", info.diff_id);
        // A clone reads nothing: asking the kernel to read bodies ahead would only cost
        // I/O. Where bodies are copied, it keeps the disk busy.
        proxy.set_readahead(match applier.reflinks() {
            Some(false) => crate::client::DEFAULT_READAHEAD,
            _ => 0,
        });
        let mut stream = proxy
            .get_layer(
                image.image,
                LayerSelector::Index(index as u64),
                opts.inline_threshold,
            )
            .with_context(what)?;
        let mut entries = entries::Entries::new(&mut stream);
        applier.apply_layer(&mut entries).with_context(what)?;
        drop(stream);
        progress.layer_done(index);
    }
    applier
        .finish()
        .with_context(|| format!("setting directory metadata in {}", root.shown().display()))?;
    let stats = applier.stats();
    proxy.close_image(image.image)?;
    Ok(UnpackSummary {
        image_id: image.image_id,
        layers,
        owners,
        stats,
    })
}
