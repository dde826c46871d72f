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

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Backend, BackendError, LayerLocator, LayerSink, OpenedImage};
use crate::proto::rpc::LayerInfo;
use crate::proto::tar::Tracker;

/// Largest inline chunk sent to the sink: the codec's inline chunk limit (1 MiB).
pub const MAX_CHUNK: usize = 1 << 20;
/// Largest `index.json`, manifest or config read. Registries cap manifests at 4 MiB; configs
/// with long histories are larger but nowhere near this.
pub const MAX_JSON_LEN: u64 = 64 << 20;
/// The annotation naming a manifest in an OCI layout's index.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// `RESOLVE_*` flags for every path opened in the layout.
const RESOLVE_STRICT: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// The OCI layout backend for one layout directory.
#[derive(Debug)]
pub struct OciBackend {
    dir: PathBuf,
    /// The layout directory, opened `O_PATH`: every other path is resolved beneath it.
    root: OwnedFd,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Layer media types this backend reads (OCI, OCI non-distributable and Docker v2s2).
fn compression_of(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// Media types of image indexes, which this backend does not descend into.
const INDEX_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn digest_hex(digest: &str) -> anyhow::Result<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .with_context(|| format!("{digest:?} is not a sha256 digest"))
}

impl OciBackend {
    /// Open the layout at `dir`.
    ///
    /// # Errors
    /// `dir` cannot be opened or has no `oci-layout` file.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let root = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening OCI layout {}", dir.display()))?;
        let backend = OciBackend {
            dir: dir.to_owned(),
            root,
        };
        backend
            .open_file("oci-layout")
            .with_context(|| format!("{} is not an OCI layout", dir.display()))?;
        Ok(backend)
    }

    fn open_file(&self, rel: &str) -> anyhow::Result<File> {
        let fd = rustix::fs::openat2(
            &self.root,
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE_STRICT,
        )
        .with_context(|| format!("opening {}", self.dir.join(rel).display()))?;
        let st = rustix::fs::fstat(&fd)?;
        ensure!(
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile,
            "{} is not a regular file",
            self.dir.join(rel).display()
        );
        Ok(File::from(fd))
    }

    fn read_json_file(&self, rel: &str) -> anyhow::Result<Vec<u8>> {
        let mut data = Vec::new();
        self.open_file(rel)?
            .take(MAX_JSON_LEN + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("reading {}", self.dir.join(rel).display()))?;
        ensure!(
            data.len() as u64 <= MAX_JSON_LEN,
            "{} is larger than {MAX_JSON_LEN} bytes",
            self.dir.join(rel).display()
        );
        Ok(data)
    }

    /// Read a JSON blob (manifest, config) and check it against its descriptor.
    fn read_json_blob(&self, desc: &Descriptor) -> anyhow::Result<Vec<u8>> {
        let hex = digest_hex(&desc.digest)?;
        ensure!(
            desc.size <= MAX_JSON_LEN,
            "blob {} is {} bytes, more than the {MAX_JSON_LEN} accepted",
            desc.digest,
            desc.size
        );
        let data = self.read_json_file(&format!("blobs/sha256/{hex}"))?;
        let actual = hex::encode(Sha256::digest(&data));
        ensure!(
            actual == hex,
            "blob {} has digest sha256:{actual}",
            desc.digest
        );
        ensure!(
            data.len() as u64 == desc.size,
            "blob {} is {} bytes, its descriptor says {}",
            desc.digest,
            data.len(),
            desc.size
        );
        Ok(data)
    }

    fn select<'a>(
        &self,
        index: &'a Index,
        reference: &str,
    ) -> Result<&'a Descriptor, BackendError> {
        let not_found = |why: String| {
            BackendError::ImageNotFound(format!("{why} in OCI layout {}", self.dir.display()))
        };
        let tags = || {
            let mut tags: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|m| m.annotations.get(REF_NAME_ANNOTATION).map(String::as_str))
                .collect();
            tags.sort_unstable();
            tags.join(", ")
        };
        if reference.is_empty() {
            return match index.manifests.as_slice() {
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
            .manifests
            .iter()
            .filter(|m| {
                m.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some(reference)
                    || m.digest == bare
            })
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

fn is_digest(s: &str) -> bool {
    digest_hex(s).is_ok()
}

impl Backend for OciBackend {
    fn root(&self) -> &Path {
        &self.dir
    }

    fn open_image(&self, reference: &str) -> Result<OpenedImage, BackendError> {
        let index_bytes = self.read_json_file("index.json")?;
        let index: Index = serde_json::from_slice(&index_bytes)
            .with_context(|| format!("parsing {}", self.dir.join("index.json").display()))?;
        let desc = self.select(&index, reference)?;
        if let Some(mt) = desc.media_type.as_deref()
            && INDEX_MEDIA_TYPES.contains(&mt)
        {
            return Err(anyhow::anyhow!(
                "{} is an image index ({mt}); nested indexes are not supported",
                desc.digest
            )
            .into());
        }
        let manifest_bytes = self.read_json_blob(desc)?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .with_context(|| format!("parsing manifest {}", desc.digest))?;
        if let Some(mt) = manifest.media_type.as_deref()
            && INDEX_MEDIA_TYPES.contains(&mt)
        {
            return Err(anyhow::anyhow!(
                "{} is an image index ({mt}); nested indexes are not supported",
                desc.digest
            )
            .into());
        }
        let config_bytes = self.read_json_blob(&manifest.config)?;
        let config_digest = manifest.config.digest.clone();
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .with_context(|| format!("parsing config {config_digest}"))?;
        let diff_ids = config.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(anyhow::anyhow!(
                "manifest {} lists {} layers, its config {} diff_ids",
                desc.digest,
                manifest.layers.len(),
                diff_ids.len()
            )
            .into());
        }
        let mut layers = Vec::with_capacity(diff_ids.len());
        let mut locators = Vec::with_capacity(diff_ids.len());
        for (layer, diff_id) in manifest.layers.iter().zip(diff_ids) {
            digest_hex(&layer.digest)?;
            if !is_digest(&diff_id) {
                return Err(anyhow::anyhow!(
                    "config {config_digest}: diff_id {diff_id:?} is not sha256"
                )
                .into());
            }
            let media_type = layer.media_type.clone().unwrap_or_default();
            if compression_of(&media_type).is_none() {
                return Err(anyhow::anyhow!(
                    "layer {} has unsupported media type {media_type:?}",
                    layer.digest
                )
                .into());
            }
            layers.push(LayerInfo {
                id: layer.digest.clone(),
                diff_id,
                size: None,
                entries: None,
            });
            locators.push(LayerLocator::Oci {
                digest: layer.digest.clone(),
                media_type,
            });
        }
        let manifest = String::from_utf8(manifest_bytes).context("the manifest is not UTF-8")?;
        let config = String::from_utf8(config_bytes).context("the config is not UTF-8")?;
        Ok(OpenedImage {
            image_id: digest_hex(&config_digest)?.to_owned(),
            manifest,
            manifest_digest: desc.digest.clone(),
            config,
            config_digest,
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
        let (Some(LayerLocator::Oci { digest, media_type }), Some(info)) =
            (image.locators.get(index), image.layers.get(index))
        else {
            bail!("image {} has no OCI layer {index}", image.image_id);
        };
        self.stream_blob(digest, media_type, &info.diff_id, sink)
            .with_context(|| format!("layer blob {digest}"))
    }
}

impl OciBackend {
    fn stream_blob(
        &self,
        digest: &str,
        media_type: &str,
        diff_id: &str,
        sink: &mut dyn LayerSink,
    ) -> anyhow::Result<u64> {
        let hex = digest_hex(digest)?;
        let compression = compression_of(media_type)
            .with_context(|| format!("unsupported media type {media_type:?}"))?;
        let file = self.open_file(&format!("blobs/sha256/{hex}"))?;
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
