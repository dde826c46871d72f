//! `export`: an image as an OCI image layout, each layer the exact layer tar (or that tar
//! compressed), rebuilt from the stream without re-serialising anything.
//!
//! ```text
//!  helper ─splitfdstream + fds─▶ worker (one helper each, layers in parallel)
//!                                  │ write_layer_tar: bodies read by position, diff_id checked
//!                                  │ [gzip (chunks on a pool of threads, see gzip.rs)
//!                                  │  | zstd (multi-threaded)]
//!                                  ▼
//!                 blobs/sha256/<digest>  (written to a temporary file, renamed to its digest)
//!  config (bytes as stored) ─▶ manifest ─▶ index.json entry with the tag (replaced atomically)
//! ```
//!
//! The manifest is the stored one, byte for byte, when it describes exactly the blobs written
//! (an OCI image exported uncompressed); otherwise a new OCI manifest with its annotations.
//!
//! A blob appears under its digest only once complete (ocidir writes each to an anonymous or
//! temporary file and renames it), so an interrupted export leaves no blob whose name is not
//! its digest. Uncompressed layers already present (by diff_id) are not read again.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail, ensure};
use oci_spec::image::{
    Descriptor, DescriptorBuilder, Digest, ImageConfiguration, ImageIndex, ImageIndexBuilder,
    ImageManifest, ImageManifestBuilder, MediaType, PlatformBuilder, SCHEMA_VERSION,
};
use ocidir::OciDir;
use ocidir::cap_std::{ambient_authority, fs::Dir};

use crate::client::{Proxy, ProxyConfig};
use crate::proto::rpc::{LayerSelector, OpenImageResult};
use crate::sink::{AtomicFile, write_layer_tar};

mod gzip;

/// Buffer between the layer tar and the blob file (or the compressor).
const WRITE_BUF: usize = 1 << 20;

/// How layer blobs are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// The exact layer tar: the blob's digest is the diff_id.
    #[default]
    None,
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`), as concatenated members
    /// compressed on every core.
    Gzip,
    /// zstd, multi-threaded (`application/vnd.oci.image.layer.v1.tar+zstd`).
    Zstd,
}

impl Compression {
    fn media_type(self) -> MediaType {
        match self {
            Compression::None => MediaType::ImageLayer,
            Compression::Gzip => MediaType::ImageLayerGzip,
            Compression::Zstd => MediaType::ImageLayerZstd,
        }
    }
}

/// Options of [`export`].
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Layer compression.
    pub compression: Compression,
    /// Layers exported in parallel (one helper each); default: cores, at most 8.
    pub jobs: Option<usize>,
    /// The tag of the index entry (`org.opencontainers.image.ref.name`); none: untagged.
    pub tag: Option<String>,
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The manifest's descriptor as the index has it.
    pub manifest: Descriptor,
    /// Layers whose blob was already there and was not read.
    pub reused: usize,
    /// Bytes of uncompressed layer tar written.
    pub tar_bytes: u64,
}

/// Export image `reference` of the store `config` serves into the OCI layout at `dir`
/// (created if missing).
///
/// # Errors
/// The image or a layer cannot be read, a layer does not hash to its diff_id, the config does
/// not hash to its digest, or the layout cannot be written. Blobs completed before the
/// failure stay (each under its digest); `index.json` is unchanged.
pub fn export(
    config: &ProxyConfig,
    reference: &str,
    dir: &Path,
    opts: &ExportOptions,
) -> anyhow::Result<ExportSummary> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let root = Dir::open_ambient_dir(dir, ambient_authority())
        .with_context(|| format!("opening {}", dir.display()))?;
    let oci =
        OciDir::ensure(root).with_context(|| format!("opening OCI layout {}", dir.display()))?;

    let mut proxy = Proxy::spawn(config)?;
    let image = proxy.open_image(reference)?;
    let image_config: ImageConfiguration = serde_json::from_str(&image.config)
        .with_context(|| format!("image {}: parsing its config", image.image_id))?;
    let diff_ids = image_config.rootfs().diff_ids();
    let served: Vec<&str> = image.layers.iter().map(|l| l.diff_id.as_str()).collect();
    ensure!(
        diff_ids
            .iter()
            .map(String::as_str)
            .eq(served.iter().copied()),
        "image {}: config lists diff_ids {diff_ids:?}, the store has {served:?}",
        image.image_id
    );

    let config_desc = write_config(&oci, &image)?;
    let jobs = crate::pull::layer_jobs(opts.jobs, image.layers.len());
    let layers = export_layers(
        config,
        &mut proxy,
        reference,
        &image,
        &oci,
        opts.compression,
        jobs,
    )?;
    proxy.shutdown()?;

    let reused = layers.iter().filter(|l| l.reused).count();
    let tar_bytes = layers.iter().map(|l| l.tar_bytes).sum();
    let layers: Vec<Descriptor> = layers.into_iter().map(|l| l.descriptor).collect();
    let manifest_bytes = manifest_bytes(&image, &config_desc, layers)?;
    let mut w = oci.create_blob()?;
    w.write_all(&manifest_bytes)?;
    let blob = w.complete()?;
    let platform = PlatformBuilder::default()
        .architecture(image_config.architecture().clone())
        .os(image_config.os().clone())
        .build()
        .context("building the platform")?;
    let mut manifest = DescriptorBuilder::default()
        .media_type(MediaType::ImageManifest)
        .digest(parse_digest(&format!("sha256:{}", blob.sha256().digest()))?)
        .size(blob.size())
        .platform(platform)
        .build()?;
    if let Some(tag) = &opts.tag {
        manifest.set_annotations(Some(
            [(TAG_ANNOTATION.to_owned(), tag.clone())]
                .into_iter()
                .collect(),
        ));
    }
    write_index_entry(dir, &manifest, opts.tag.as_deref())?;
    Ok(ExportSummary {
        manifest,
        reused,
        tar_bytes,
    })
}

/// The annotation of an index entry that names its tag.
const TAG_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Largest `index.json` read back: it lists manifests, not content.
const MAX_INDEX_LEN: u64 = 16 << 20;

/// The manifest to write: the stored one byte for byte when it describes exactly the blobs
/// written (an OCI image exported uncompressed), so its digest stays the source's; otherwise
/// a new OCI manifest, with the stored one's annotations.
fn manifest_bytes(
    image: &OpenImageResult,
    config: &Descriptor,
    layers: Vec<Descriptor>,
) -> anyhow::Result<Vec<u8>> {
    let stored: Option<ImageManifest> = serde_json::from_str(&image.manifest).ok();
    let key = |d: &Descriptor| (d.media_type().clone(), d.digest().clone(), d.size());
    if let Some(m) = &stored
        && m.media_type().as_ref() == Some(&MediaType::ImageManifest)
        && key(m.config()) == key(config)
        && m.layers().iter().map(key).eq(layers.iter().map(key))
    {
        return Ok(image.manifest.as_bytes().to_vec());
    }
    let mut manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(config.clone())
        .layers(layers)
        .build()
        .context("building the manifest")?;
    if let Some(annotations) = stored.as_ref().and_then(|m| m.annotations().clone()) {
        manifest.set_annotations(Some(annotations));
    }
    Ok(serde_json::to_vec(&manifest)?)
}

/// Add `manifest` to the layout's `index.json` (replaced atomically), replacing the entry that
/// had `tag`.
fn write_index_entry(dir: &Path, manifest: &Descriptor, tag: Option<&str>) -> anyhow::Result<()> {
    let path = dir.join("index.json");
    let mut index = match std::fs::File::open(&path) {
        Ok(f) => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_INDEX_LEN + 1), &mut bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            ensure!(
                bytes.len() as u64 <= MAX_INDEX_LEN,
                "{} is larger than {MAX_INDEX_LEN} bytes",
                path.display()
            );
            serde_json::from_slice::<ImageIndex>(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ImageIndexBuilder::default()
            .schema_version(SCHEMA_VERSION)
            .manifests(Vec::new())
            .build()?,
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut manifests = index.manifests().clone();
    if let Some(tag) = tag {
        manifests.retain(|d| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(TAG_ANNOTATION))
                .map(String::as_str)
                != Some(tag)
        });
    }
    manifests.push(manifest.clone());
    index.set_manifests(manifests);
    let mut out = AtomicFile::create(&path)?;
    serde_json::to_writer(&mut out, &index)?;
    out.commit()
}

/// The config blob, its bytes exactly as stored (so its digest stays the image id).
fn write_config(oci: &OciDir, image: &OpenImageResult) -> anyhow::Result<Descriptor> {
    let bytes = image.config.as_bytes();
    let mut w = oci.create_blob()?;
    w.write_all(bytes)?;
    let blob = w.complete()?;
    let digest = format!("sha256:{}", blob.sha256().digest());
    ensure!(
        digest == image.config_digest,
        "image {}: its config hashes to {digest}, not {}",
        image.image_id,
        image.config_digest
    );
    Ok(DescriptorBuilder::default()
        .media_type(MediaType::ImageConfig)
        .digest(parse_digest(&digest)?)
        .size(blob.size())
        .build()?)
}

fn parse_digest(s: &str) -> anyhow::Result<Digest> {
    s.parse::<Digest>()
        .with_context(|| format!("{s:?} is not a digest"))
}

/// One exported layer.
#[derive(Debug)]
struct Exported {
    descriptor: Descriptor,
    reused: bool,
    tar_bytes: u64,
}

/// Export every layer, `jobs` at a time: the first worker uses `proxy`, the others spawn a
/// helper each (a helper streams one layer at a time).
fn export_layers(
    config: &ProxyConfig,
    proxy: &mut Proxy,
    reference: &str,
    image: &OpenImageResult,
    oci: &OciDir,
    compression: Compression,
    jobs: usize,
) -> anyhow::Result<Vec<Exported>> {
    let n = image.layers.len();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Exported>>> = Mutex::new((0..n).map(|_| None).collect());
    // Threads each compressor may use: the cores not taken by other layers.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let zstd_workers = u32::try_from((cores / jobs).max(1)).unwrap_or(1);
    // One pool for every layer: a dominant layer gets every core once the others are done.
    let pool = match compression {
        Compression::Gzip => {
            Some(gzip::Pool::new(cores).context("starting the gzip compression threads")?)
        }
        _ => None,
    };
    let codec = Codec {
        compression,
        zstd_workers,
        pool: pool.as_ref(),
    };
    let work = |proxy: &mut Proxy, handle: u64| -> anyhow::Result<()> {
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= n {
                return Ok(());
            }
            let info = &image.layers[index];
            let exported = export_layer(proxy, handle, index, oci, &codec)
                .with_context(|| format!("layer {index} ({})", info.diff_id))?;
            results.lock().unwrap_or_else(|e| e.into_inner())[index] = Some(exported);
        }
    };
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (1..jobs)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    let mut p = Proxy::spawn(config)?;
                    let opened = p.open_image(reference)?;
                    ensure!(
                        opened.image_id == image.image_id,
                        "{reference} changed while it was exported (now image {})",
                        opened.image_id
                    );
                    work(&mut p, opened.image)?;
                    p.shutdown()
                })
            })
            .collect();
        let mine = work(proxy, image.image);
        let mut first_err = mine.err();
        for w in workers {
            let r = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            if let (None, Err(e)) = (&first_err, r) {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    })?;
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("layer {i} was not exported")))
        .collect()
}

/// How layer tars become blobs.
#[derive(Debug, Clone, Copy)]
struct Codec<'a> {
    compression: Compression,
    /// Threads of each layer's zstd encoder.
    zstd_workers: u32,
    /// The gzip threads (with [`Compression::Gzip`]).
    pool: Option<&'a gzip::Pool>,
}

fn export_layer(
    proxy: &mut Proxy,
    image: u64,
    index: usize,
    oci: &OciDir,
    codec: &Codec<'_>,
) -> anyhow::Result<Exported> {
    let compression = codec.compression;
    let mut stream = proxy.get_layer(image, LayerSelector::Index(index as u64), None)?;
    let diff_id = stream.layer().diff_id.clone();
    let hex = diff_id
        .strip_prefix("sha256:")
        .with_context(|| format!("diff_id {diff_id} is not sha256"))?
        .to_owned();
    if compression == Compression::None
        && let Ok(md) = oci.blobs_dir().symlink_metadata(&hex)
        && md.is_file()
    {
        // Written under its digest only once complete, by us or another tool.
        drop(stream);
        return Ok(Exported {
            descriptor: DescriptorBuilder::default()
                .media_type(MediaType::ImageLayer)
                .digest(parse_digest(&diff_id)?)
                .size(md.len())
                .build()?,
            reused: true,
            tar_bytes: 0,
        });
    }
    let blob_writer = oci.create_blob()?;
    let (blob, stats) = match compression {
        Compression::None => {
            let mut out = std::io::BufWriter::with_capacity(WRITE_BUF, blob_writer);
            let stats = write_layer_tar(&mut stream, &mut out, false)?;
            let w = out.into_inner().map_err(|e| e.into_error())?;
            (w.complete()?, stats)
        }
        Compression::Gzip => {
            let pool = codec.pool.context("gzip export without its threads")?;
            // No BufWriter: the writer buffers a whole chunk itself.
            let mut gz = pool.writer(blob_writer);
            let stats = write_layer_tar(&mut stream, &mut gz, false)?;
            (gz.finish()?.complete()?, stats)
        }
        Compression::Zstd => {
            let mut z = zstd::Encoder::new(blob_writer, 0)?;
            z.multithread(codec.zstd_workers)
                .context("starting zstd's worker threads")?;
            let mut out = std::io::BufWriter::with_capacity(WRITE_BUF, z);
            let stats = write_layer_tar(&mut stream, &mut out, false)?;
            let z = out.into_inner().map_err(|e| e.into_error())?;
            (z.finish()?.complete()?, stats)
        }
    };
    drop(stream);
    let digest = format!("sha256:{}", blob.sha256().digest());
    if compression == Compression::None && digest != diff_id {
        // write_layer_tar checked the tar against the diff_id; this is what reached the file.
        bail!("the blob written hashes to {digest}, not the diff_id");
    }
    Ok(Exported {
        descriptor: DescriptorBuilder::default()
            .media_type(compression.media_type())
            .digest(parse_digest(&digest)?)
            .size(blob.size())
            .build()?,
        reused: false,
        tar_bytes: stats.bytes,
    })
}
