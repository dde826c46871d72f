//! OCI image layout backend.
//!
//! An image is picked from `index.json` by its `org.opencontainers.image.ref.name` annotation (or
//! by manifest digest, or as the only manifest for an empty reference). Layers are blobs that may
//! be compressed, so they cannot be passed as fds: the backend decompresses each one and sends the
//! whole tar inline, in chunks of at most [`MAX_CHUNK`], while it checks the blob's digest and the
//! layer's diff_id. The client never takes a stream without `complete` as a whole layer, so
//! failing at the end, after the data went out, is enough.
//!
//! The tar is framed as it goes by [`crate::proto::tar::Tracker`], the stream reader's own
//! framer: the entry count the helper reports is the one the client counts, and a tar the
//! client would reject (a bad header, a size past 2^64, a truncated entry) fails here first,
//! before its bad bytes are sent.
//!
//! # Types, layout and file access
//!
//! Index, manifests, descriptors and configs are `oci-spec` types, parsed from the bytes as
//! found for validation and field access only: the manifest and config travel on exactly as
//! read (their digests are over those bytes). The layout is an [`ocidir::OciDir`] whose two
//! directories, the layout and its `blobs/sha256`, this backend opens itself (the latter with
//! the `RESOLVE_*` flags of the last column below, so that a symlinked or mounted-over
//! `blobs/sha256` is refused too; both `O_PATH`, which serves the `*at` calls made here but
//! not ocidir's directory listings, none of which this backend uses). Every
//! file in them (`oci-layout`, `index.json`, blobs) is then opened beneath those directories
//! with this backend's own `openat2`, not with ocidir's readers (`OciRead::read_index`,
//! `read_blob`, `read_json_blob`), because of what those would let a hostile layout do:
//!
//! | guarantee | ocidir's readers (cap-std 4) | here |
//! |---|---|---|
//! | resolution stays beneath the directory opened from (the layout for `index.json`, `blobs/sha256` for blobs) | yes: `openat2(RESOLVE_BENEATH \| RESOLVE_NO_MAGICLINKS)`, or cap-std's user-space resolver where `openat2` fails with `ENOSYS` or `EPERM` | yes: `RESOLVE_BENEATH` |
//! | no symlink followed | no: a symlink that stays beneath is followed | `RESOLVE_NO_SYMLINKS`, `O_NOFOLLOW` |
//! | no magic link (`/proc/…/fd/N`) | yes: `RESOLVE_NO_MAGICLINKS` | yes: `RESOLVE_NO_MAGICLINKS` |
//! | no mount point crossed | no | `RESOLVE_NO_XDEV` |
//! | a FIFO cannot block the open | no: no `O_NONBLOCK`, so a FIFO blocks until a writer comes | `O_NONBLOCK`, then `fstat` must show a regular file |
//! | bounded before it is read | no: `read_index` reads `index.json` whole; `read_blob` compares the file's size with the descriptor's, which the same layout writes | `index.json`, manifests and configs at most [`MAX_JSON_LEN`] (checked by `fstat` and while reading) |
//! | digests checked | no: `read_blob` checks the size only | each manifest and config before it is parsed, each layer blob (and its diff_id) as it streams |
//! | the exact bytes | no: `read_json_blob` returns the parsed value | kept and passed on |
//!
//! Where cap-std's column comes from: `cap-primitives` 4.0.3, `rustix/linux/fs/open_impl.rs`
//! (`open_beneath` passes `ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS` and nothing
//! else; `open_impl` falls back to `manually::open` on `ENOSYS`, and on `EPERM` as seccomp
//! sandboxes report it) and `rustix/fs/oflags.rs` (`compute_oflags` adds `O_NOFOLLOW` only
//! for `FollowSymlinks::No` and `O_NONBLOCK` only when asked; `Dir::open` asks for neither).
//! `tests/oci_layout.rs` shows the difference on a symlinked blob.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, anyhow, bail, ensure};
use oci_spec::image::{
    ANNOTATION_REF_NAME, Descriptor, Digest, DigestAlgorithm, ImageConfiguration, ImageIndex,
    ImageManifest, MediaType, OciLayout,
};
use ocidir::OciDir;
use ocidir::cap_std::fs::Dir;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use sha2::{Digest as _, Sha256};

use super::{Backend, BackendError, LayerLocator, LayerSink, OpenedImage};
use crate::proto::rpc::LayerInfo;
use crate::proto::tar::Tracker;

/// Largest inline chunk sent to the sink: the codec's inline chunk limit (1 MiB).
pub const MAX_CHUNK: usize = 1 << 20;
/// Largest `index.json`, manifest or config read. Registries cap manifests at 4 MiB; configs
/// with long histories are larger but nowhere near this.
pub const MAX_JSON_LEN: u64 = 64 << 20;
/// Largest `oci-layout` file read: it holds one short version string.
const MAX_LAYOUT_FILE_LEN: u64 = 4 << 10;
/// Where the layout keeps its blobs (only sha256 blobs are read).
const BLOBS_DIR: &str = "blobs/sha256";

/// `RESOLVE_*` flags for every path opened in the layout.
const RESOLVE_STRICT: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Docker v2s2 media types, which `oci-spec` has no variants for (they parse as
/// [`MediaType::Other`]).
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// The OCI layout backend for one layout directory.
#[derive(Debug)]
pub struct OciBackend {
    dir: PathBuf,
    /// The layout (opened `O_PATH` as the caller named it) and its `blobs/sha256` (opened
    /// `O_PATH` beneath it with [`RESOLVE_STRICT`]): every file is resolved beneath one of
    /// them.
    layout: OciDir,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Layer media types this backend reads (OCI, OCI non-distributable and Docker v2s2).
fn compression_of(media_type: &MediaType) -> Option<Compression> {
    match media_type {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Some(Compression::None),
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
            Some(Compression::Gzip)
        }
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => {
            Some(Compression::Zstd)
        }
        MediaType::Other(other) => match other.as_str() {
            DOCKER_LAYER => Some(Compression::None),
            DOCKER_LAYER_GZIP | DOCKER_FOREIGN_LAYER_GZIP => Some(Compression::Gzip),
            _ => None,
        },
        _ => None,
    }
}

/// Image indexes (OCI or Docker manifest lists), which this backend does not descend into.
fn is_index(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageIndex => true,
        MediaType::Other(other) => other == DOCKER_MANIFEST_LIST,
        _ => false,
    }
}

fn nested_index(digest: &Digest, media_type: &MediaType) -> BackendError {
    anyhow!("{digest} is an image index ({media_type}); nested indexes are not supported").into()
}

/// The hex part of a sha256 digest (which `oci-spec` checked is 64 lowercase hex digits).
fn sha256_hex(digest: &Digest) -> anyhow::Result<&str> {
    match digest.algorithm() {
        DigestAlgorithm::Sha256 => Ok(digest.digest()),
        _ => bail!("{digest:?} is not a sha256 digest"),
    }
}

impl OciBackend {
    /// Open the layout at `dir`.
    ///
    /// # Errors
    /// `dir` cannot be opened, or has no valid `oci-layout` file or no `blobs/sha256`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let root = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening OCI layout {}", dir.display()))?;
        let not_a_layout = || format!("{} is not an OCI layout", dir.display());
        let version = read_bounded(&root, "oci-layout", dir, MAX_LAYOUT_FILE_LEN)
            .with_context(not_a_layout)?;
        serde_json::from_slice::<OciLayout>(&version)
            .with_context(|| format!("parsing {}", dir.join("oci-layout").display()))
            .with_context(not_a_layout)?;
        let blobs = rustix::fs::openat2(
            &root,
            BLOBS_DIR,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE_STRICT,
        )
        .with_context(|| format!("opening {}", dir.join(BLOBS_DIR).display()))
        .with_context(not_a_layout)?;
        let layout = OciDir::open_with_external_blobs(Dir::from(root), Dir::from(blobs))
            .with_context(not_a_layout)?;
        Ok(OciBackend {
            dir: dir.to_owned(),
            layout,
        })
    }

    /// `index.json`, bounded by [`MAX_JSON_LEN`], and parsed.
    fn read_index(&self) -> anyhow::Result<ImageIndex> {
        let bytes = read_bounded(self.layout.dir(), "index.json", &self.dir, MAX_JSON_LEN)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", self.dir.join("index.json").display()))
    }

    /// Open the blob `desc` names: a regular file beneath `blobs/sha256`.
    fn open_blob(&self, desc: &Descriptor) -> anyhow::Result<File> {
        let hex = sha256_hex(desc.digest())?;
        open_regular(self.layout.blobs_dir(), hex, &self.dir.join(BLOBS_DIR))
    }

    /// Read a JSON blob (manifest, config) and check it against its descriptor; its bytes as
    /// stored.
    fn read_json_blob(&self, desc: &Descriptor) -> anyhow::Result<Vec<u8>> {
        let digest = desc.digest();
        let hex = sha256_hex(digest)?;
        ensure!(
            desc.size() <= MAX_JSON_LEN,
            "blob {digest} is {} bytes, more than the {MAX_JSON_LEN} accepted",
            desc.size()
        );
        let data = read_bounded(
            self.layout.blobs_dir(),
            hex,
            &self.dir.join(BLOBS_DIR),
            MAX_JSON_LEN,
        )?;
        let actual = hex::encode(Sha256::digest(&data));
        ensure!(actual == hex, "blob {digest} has digest sha256:{actual}");
        ensure!(
            data.len() as u64 == desc.size(),
            "blob {digest} is {} bytes, its descriptor says {}",
            data.len(),
            desc.size()
        );
        Ok(data)
    }

    fn select<'a>(
        &self,
        index: &'a ImageIndex,
        reference: &str,
    ) -> Result<&'a Descriptor, BackendError> {
        let not_found = |why: String| {
            BackendError::ImageNotFound(format!("{why} in OCI layout {}", self.dir.display()))
        };
        let ref_name = |m: &'a Descriptor| {
            m.annotations()
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_REF_NAME))
                .map(String::as_str)
        };
        let tags = || {
            let mut tags: Vec<&str> = index.manifests().iter().filter_map(ref_name).collect();
            tags.sort_unstable();
            tags.join(", ")
        };
        if reference.is_empty() {
            return match index.manifests().as_slice() {
                [one] => Ok(one),
                [] => Err(not_found("no image".into())),
                many => Err(not_found(format!(
                    "no reference given but {} images (tags: {})",
                    many.len(),
                    tags()
                ))),
            };
        }
        let bare = reference.strip_prefix('@').unwrap_or(reference);
        let found: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|m| ref_name(m) == Some(reference) || m.digest().as_ref() == bare)
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => Err(not_found(format!(
                "image {reference:?} not found (tags: {})",
                tags()
            ))),
            many => Err(not_found(format!(
                "image {reference:?} names {} manifests",
                many.len()
            ))),
        }
    }
}

/// Open `rel` beneath `dir` (`shown` names `dir` in messages) with [`RESOLVE_STRICT`],
/// `O_NOFOLLOW` and `O_NONBLOCK` (a FIFO cannot block the open); it must be a regular file.
fn open_regular(dir: impl AsFd, rel: &str, shown: &Path) -> anyhow::Result<File> {
    let path = || shown.join(rel).display().to_string();
    let fd = rustix::fs::openat2(
        dir,
        rel,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE_STRICT,
    )
    .with_context(|| format!("opening {}", path()))?;
    let st = rustix::fs::fstat(&fd).with_context(|| format!("inspecting {}", path()))?;
    ensure!(
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile,
        "{} is not a regular file",
        path()
    );
    Ok(File::from(fd))
}

/// Read `rel` beneath `dir` whole, refusing more than `max` bytes without holding them.
fn read_bounded(dir: impl AsFd, rel: &str, shown: &Path, max: u64) -> anyhow::Result<Vec<u8>> {
    let path = || shown.join(rel).display().to_string();
    let file = open_regular(dir, rel, shown)?;
    let len = file
        .metadata()
        .with_context(|| format!("inspecting {}", path()))?
        .len();
    ensure!(len <= max, "{} is larger than {max} bytes", path());
    let mut data = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path()))?;
    // The file may have grown since the fstat.
    ensure!(
        data.len() as u64 <= max,
        "{} is larger than {max} bytes",
        path()
    );
    Ok(data)
}

/// A diff_id from a config: a well-formed sha256 digest.
fn check_diff_id(config_digest: &Digest, diff_id: &str) -> anyhow::Result<()> {
    match Digest::from_str(diff_id) {
        Ok(d) if *d.algorithm() == DigestAlgorithm::Sha256 => Ok(()),
        _ => bail!("config {config_digest}: diff_id {diff_id:?} is not sha256"),
    }
}

impl Backend for OciBackend {
    fn root(&self) -> &Path {
        &self.dir
    }

    fn open_image(&self, reference: &str) -> Result<OpenedImage, BackendError> {
        let index = self.read_index()?;
        let desc = self.select(&index, reference)?;
        if is_index(desc.media_type()) {
            return Err(nested_index(desc.digest(), desc.media_type()));
        }
        let manifest_bytes = self.read_json_blob(desc)?;
        let manifest: ImageManifest = match serde_json::from_slice(&manifest_bytes) {
            Ok(m) => m,
            // An index whose descriptor did not say so (no manifest has no `config`).
            Err(_) if serde_json::from_slice::<ImageIndex>(&manifest_bytes).is_ok() => {
                return Err(nested_index(desc.digest(), &MediaType::ImageIndex));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("parsing manifest {}", desc.digest()))
                    .into());
            }
        };
        if let Some(mt) = manifest.media_type()
            && is_index(mt)
        {
            return Err(nested_index(desc.digest(), mt));
        }
        let config_desc = manifest.config();
        let config_digest = config_desc.digest();
        let config_bytes = self.read_json_blob(config_desc)?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .with_context(|| format!("parsing config {config_digest}"))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(anyhow!(
                "manifest {} lists {} layers, its config {} diff_ids",
                desc.digest(),
                manifest.layers().len(),
                diff_ids.len()
            )
            .into());
        }
        let mut layers = Vec::with_capacity(diff_ids.len());
        let mut locators = Vec::with_capacity(diff_ids.len());
        for (layer, diff_id) in manifest.layers().iter().zip(diff_ids) {
            sha256_hex(layer.digest())?;
            check_diff_id(config_digest, diff_id)?;
            let compression = compression_of(layer.media_type()).ok_or_else(|| {
                anyhow!(
                    "layer {} has unsupported media type {:?}",
                    layer.digest(),
                    layer.media_type().as_ref()
                )
            })?;
            layers.push(LayerInfo {
                id: layer.digest().to_string(),
                diff_id: diff_id.clone(),
                // An uncompressed blob is the layer tar: its descriptor records the tar's size
                // (checked against the blob before it streams).
                size: (compression == Compression::None).then_some(layer.size()),
                entries: None,
            });
            locators.push(LayerLocator::Oci {
                blob: Box::new(layer.clone()),
            });
        }
        let manifest = String::from_utf8(manifest_bytes).context("the manifest is not UTF-8")?;
        let config = String::from_utf8(config_bytes).context("the config is not UTF-8")?;
        Ok(OpenedImage {
            image_id: sha256_hex(config_digest)?.to_owned(),
            manifest,
            manifest_digest: desc.digest().to_string(),
            config,
            config_digest: config_digest.to_string(),
            layers,
            locators,
        })
    }

    fn stream_layer(
        &self,
        image: &OpenedImage,
        index: usize,
        _inline_threshold: u64,
        sink: &mut dyn LayerSink,
    ) -> anyhow::Result<u64> {
        let (Some(LayerLocator::Oci { blob }), Some(info)) =
            (image.locators.get(index), image.layers.get(index))
        else {
            bail!("image {} has no OCI layer {index}", image.image_id);
        };
        self.stream_blob(blob, &info.diff_id, sink)
            .with_context(|| format!("layer blob {}", blob.digest()))
    }
}

impl OciBackend {
    fn stream_blob(
        &self,
        blob: &Descriptor,
        diff_id: &str,
        sink: &mut dyn LayerSink,
    ) -> anyhow::Result<u64> {
        let hex = sha256_hex(blob.digest())?;
        let compression = compression_of(blob.media_type())
            .with_context(|| format!("unsupported media type {:?}", blob.media_type().as_ref()))?;
        let file = self.open_blob(blob)?;
        let len = file.metadata().context("inspecting the blob")?.len();
        ensure!(
            len == blob.size(),
            "the blob is {len} bytes, its descriptor says {}",
            blob.size()
        );
        let mut compressed = BufReader::with_capacity(
            MAX_CHUNK,
            HashingReader {
                inner: file,
                hasher: Sha256::new(),
            },
        );
        let mut tar = Tracker::new();
        let mut diff_hasher = Sha256::new();
        match compression {
            Compression::None => {
                send_all(&mut compressed, sink, &mut diff_hasher, &mut tar)?;
            }
            Compression::Gzip => {
                // Multi-member, as Go reads gzip; anything after the last member that is not
                // another gzip member fails here.
                let mut dec = flate2::bufread::MultiGzDecoder::new(&mut compressed);
                send_all(&mut dec, sink, &mut diff_hasher, &mut tar)
                    .context("decompressing gzip")?;
            }
            Compression::Zstd => {
                let mut dec = zstd::stream::read::Decoder::with_buffer(&mut compressed)
                    .context("starting zstd")?;
                send_all(&mut dec, sink, &mut diff_hasher, &mut tar)
                    .context("decompressing zstd")?;
            }
        }
        ensure!(
            tar.at_clean_end(),
            "the layer tar ends at tar offset {} inside {}",
            tar.offset(),
            tar.position()
        );
        ensure!(
            compressed.fill_buf()?.is_empty(),
            "trailing data after the compressed stream"
        );
        let actual = hex::encode(compressed.into_inner().hasher.finalize());
        ensure!(actual == hex, "the blob has digest sha256:{actual}");
        let actual_diff = format!("sha256:{}", hex::encode(diff_hasher.finalize()));
        ensure!(
            actual_diff == diff_id,
            "the uncompressed layer has digest {actual_diff}, the config says {diff_id}"
        );
        Ok(tar.entries())
    }
}

/// Copy `reader` to the sink in chunks of up to [`MAX_CHUNK`], hashing and framing them; a
/// chunk the framer rejects is not sent.
fn send_all(
    reader: &mut dyn Read,
    sink: &mut dyn LayerSink,
    hasher: &mut Sha256,
    tar: &mut Tracker,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        let chunk = &buf[..filled];
        hasher.update(chunk);
        tar.feed(chunk).context("invalid layer tar")?;
        sink.inline(chunk).context("sending the layer")?;
    }
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;

    /// A header with a valid checksum; `magic` is ustar (`ustar\0` `00`) or GNU (`ustar ` ` \0`).
    fn header(name: &str, kind: u8, size: u64, gnu: bool) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = kind;
        h[257..265].copy_from_slice(if gnu { b"ustar  \0" } else { b"ustar\x0000" });
        checksum(&mut h);
        h
    }

    fn checksum(h: &mut [u8]) {
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn body(len: usize) -> Vec<u8> {
        let mut b = vec![7u8; len];
        b.resize(len.div_ceil(512) * 512, 0);
        b
    }

    /// Collects what `send_all` sends.
    #[derive(Default)]
    struct Collect(Vec<u8>);

    impl LayerSink for Collect {
        fn inline(&mut self, data: &[u8]) -> std::io::Result<()> {
            self.0.extend_from_slice(data);
            Ok(())
        }
        fn file(&mut self, _: OwnedFd, _: u64, _: Option<u64>) -> std::io::Result<()> {
            unreachable!("the OCI backend sends no fds")
        }
    }

    fn send(tar: &[u8]) -> (anyhow::Result<()>, Tracker, Vec<u8>) {
        let mut sink = Collect::default();
        let mut tracker = Tracker::new();
        let r = send_all(&mut &tar[..], &mut sink, &mut Sha256::new(), &mut tracker);
        (r, tracker, sink.0)
    }

    #[test]
    fn counts_entries_as_the_stream_reader_does() {
        let mut tar = Vec::new();
        tar.extend(header("a", b'0', 5, false));
        tar.extend(body(5));
        // A directory in the old style: typeflag NUL, name ending in '/', and a size field
        // Go ignores (no body follows).
        tar.extend(header("d/", 0, 700, false));
        // A PAX header overriding the size of the next entry.
        let rec = "13 size=1000\n";
        tar.extend(header("pax", b'x', rec.len() as u64, false));
        tar.extend({
            let mut b = rec.as_bytes().to_vec();
            b.resize(512, 0);
            b
        });
        tar.extend(header("big", b'0', 0, false));
        tar.extend(body(1000));
        tar.extend(header("././@LongLink", b'L', 600, true));
        tar.extend(body(600));
        tar.extend(header("hl", b'1', 99, true));
        // Old GNU sparse with one extension block: 1024 bytes of segments after it.
        let mut sparse = header("s", b'S', 1024, true);
        sparse[482] = 1;
        checksum(&mut sparse);
        tar.extend(sparse);
        tar.extend([0u8; 512]);
        tar.extend(body(1024));
        tar.extend([0u8; 1024]);
        tar.extend([1u8; 100]); // trailing bytes after the end are kept
        let (r, tracker, sent) = send(&tar);
        r.unwrap();
        assert_eq!(tracker.entries(), 5);
        assert!(tracker.at_clean_end() && tracker.in_trailer());
        assert_eq!(sent, tar);
    }

    #[test]
    fn a_size_past_2_pow_63_is_an_error_and_is_not_sent() {
        let mut h = header("big", b'0', 0, true);
        h[124] = 0x80;
        h[125..136].fill(0xff);
        checksum(&mut h);
        let (r, _, sent) = send(&h);
        let err = format!("{:#}", r.unwrap_err());
        assert_eq!(
            err,
            "invalid layer tar: tar header at tar offset 0: invalid size field (neither octal \
             nor a base-256 number below 2^63)"
        );
        assert!(sent.is_empty());
    }
}
