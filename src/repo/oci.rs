//! OCI images in a composefs repository, as composefs-rs 0.9.4 (`cfsctl oci pull`) stores them.
//!
//! | stream | content type | content | named refs |
//! |---|---|---|---|
//! | `oci-layer-<diff_id>` | `ocilayer` | the layer tar; regular-file bodies > 64 bytes external | — |
//! | `oci-config-<digest>` | `ociconfg` | the config JSON as one object | `<diff_id>` → layer streams (config order); `composefs.image.v1` (V1) / `composefs.image` (V2) → EROFS image |
//! | `oci-manifest-<digest>` | `ocimanif` | the manifest JSON as one object | `config:<digest>` → config stream; `<diff_id>` → layer streams |
//!
//! Tags are `streams/refs/oci/<tag>` → `../../oci-manifest-<digest>`, with `%` → `%25` and
//! `/` → `%2F`. EROFS images are linked as `images/<hex>`.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::str::FromStr;
use std::sync::mpsc::{Receiver, TryRecvError};

use anyhow::{Context, ensure};
use oci_spec::image::{Digest, DigestAlgorithm, ImageConfiguration, ImageManifest, MediaType};
use sha2::Digest as _;

use super::objects::{ObjectWriter, read_full_at};
use super::pool::{Body, BodyPool, BodySource, Stored, store_batch};
use super::splitstream::SplitStreamWriter;
use super::tar::{Region, TarTracker};
use super::{ObjectId, Repository, SourceTrust, StoreMethod, check_link_name};

/// Content type of layer splitstreams.
pub const LAYER_CONTENT_TYPE: u64 = u64::from_le_bytes(*b"ocilayer");
/// Content type of config splitstreams.
pub const CONFIG_CONTENT_TYPE: u64 = u64::from_le_bytes(*b"ociconfg");
/// Content type of manifest splitstreams.
pub const MANIFEST_CONTENT_TYPE: u64 = u64::from_le_bytes(*b"ocimanif");

/// Config named ref to the V2 EROFS image.
pub const IMAGE_REF_V2: &str = "composefs.image";
/// Config named ref to the V1 EROFS image (the default format of new repositories).
pub const IMAGE_REF_V1: &str = "composefs.image.v1";

/// Largest small-file body read into memory from an fd (bodies stored inline are ≤ 64 bytes
/// for regular files; other entry types rarely carry data at all).
const INLINE_BODY_READ_CHUNK: usize = 64 << 10;

/// Largest body read into memory and stored in a batch (with the bodies around it, see
/// [`LayerImporter::file_batched`]). Larger ones are stored alone, streamed: their hashing
/// dwarfs the per-file costs that batches spread over cores.
const BATCH_MAX_BODY: u64 = 1 << 20;

/// A batch is handed on once it holds this many bytes…
const BATCH_BYTES: u64 = 1 << 20;

/// …or this many bodies.
const BATCH_FILES: usize = 64;

/// Most bytes of bodies read but not yet in the splitstream, per layer (bounds memory).
const WINDOW_BYTES: u64 = 4 << 20;

/// Most bodies read but not yet in the splitstream, per layer (bounds fds held open), unless
/// [`LayerImporter::set_window_files`] lowers it.
pub const WINDOW_FILES: usize = 256;

/// Most inline bytes queued behind bodies that are still being stored (per layer). Beyond
/// it the queue is written out first, so memory does not grow with the bytes that follow a
/// pending body (a layer of 1 MiB PAX headers after one small file, say).
const MAX_PENDING_INLINE: usize = 4 << 20;

/// Most splitstream entries queued behind bodies still being stored (per layer): bounds the
/// queue when large, streamed bodies follow a pending small one.
const MAX_PENDING_ENTRIES: usize = 4096;

/// Largest body buffer kept for reuse (at most [`BATCH_FILES`] of them per layer).
const SPARE_MAX_CAPACITY: usize = 64 << 10;

/// A splitstream entry that waits for an earlier body still being stored.
enum Pending {
    Inline(Vec<u8>),
    Object(ObjectId, u64),
    /// The next body of the batches, of this size.
    Body(u64),
}

/// A handed-on batch: stored already, or by the pool.
enum Batch {
    Ready(Vec<Stored>),
    Waiting(Receiver<Vec<Stored>>),
}

/// How far [`LayerImporter::settle`] goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// Write what is ready; never wait.
    Ready,
    /// Wait until at least one body has been written.
    OneBody,
    /// Write everything.
    All,
}

/// What one layer import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Bytes of the layer tar.
    pub tar_bytes: u64,
    /// Bytes kept inline in the splitstream.
    pub inline_bytes: u64,
    /// External objects created by reflink.
    pub objects_reflinked: u64,
    /// External objects created by copying.
    pub objects_copied: u64,
    /// External objects that already existed.
    pub objects_present: u64,
    /// Bytes of reflinked objects.
    pub bytes_reflinked: u64,
    /// Bytes of copied objects.
    pub bytes_copied: u64,
    /// Bodies hashed from their trusted source before being cloned (see [`SourceTrust`]);
    /// every other external body was hashed from its object's own bytes.
    pub bodies_hashed_from_source: u64,
}

impl ImportStats {
    fn count(&mut self, method: StoreMethod, size: u64) {
        match method {
            StoreMethod::Reflinked => {
                self.objects_reflinked += 1;
                self.bytes_reflinked += size;
            }
            StoreMethod::Copied => {
                self.objects_copied += 1;
                self.bytes_copied += size;
            }
            StoreMethod::AlreadyPresent => self.objects_present += 1,
        }
    }
}

/// Imports one layer tar into a splitstream, exactly as `cfsctl` splits it, while computing
/// the tar's sha256 from the same buffers.
///
/// Feed the tar in order: [`inline`](Self::inline) for tar bytes, [`file`](Self::file) for a
/// whole regular-file body. Bodies larger than 64 bytes become objects whichever way they
/// arrive; smaller ones stay inline. [`finish`](Self::finish) checks the diff_id and stores
/// the splitstream; nothing is linked (see [`publish_layer`]).
pub struct LayerImporter<'r> {
    repo: &'r Repository,
    writer: SplitStreamWriter<'r>,
    tracker: TarTracker,
    sha: sha2::Sha256,
    /// An external body arriving as inline bytes.
    body: Option<ObjectWriter<'r>>,
    stats: ImportStats,
    /// Splitstream entries queued behind a batched body, in tar order.
    pending: VecDeque<Pending>,
    /// Bytes of the `Pending::Inline` entries in `pending`.
    pending_inline: usize,
    /// The batch being filled, and its bytes.
    open: (Vec<Body>, u64),
    /// Batches handed on, oldest first.
    batches: VecDeque<Batch>,
    /// Outcomes of the oldest batch not yet written.
    results: VecDeque<Stored>,
    /// Bodies read but not yet written to the splitstream, and their bytes.
    in_flight: (usize, u64),
    /// Buffers for the next bodies.
    spare: Vec<Vec<u8>>,
    /// Most bodies in flight (each holds its file open).
    window_files: usize,
    /// Whose source files may be hashed before they are cloned.
    trust: SourceTrust,
}

impl std::fmt::Debug for LayerImporter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerImporter")
            .field("offset", &self.tracker.offset())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<'r> LayerImporter<'r> {
    /// Start importing a layer into `repo`.
    ///
    /// # Errors
    /// Scratch files cannot be created.
    pub fn new(repo: &'r Repository) -> anyhow::Result<Self> {
        Ok(LayerImporter {
            repo,
            writer: SplitStreamWriter::new(repo, LAYER_CONTENT_TYPE)?,
            tracker: TarTracker::new(),
            sha: sha2::Sha256::new(),
            body: None,
            stats: ImportStats::default(),
            pending: VecDeque::new(),
            pending_inline: 0,
            open: (Vec::new(), 0),
            batches: VecDeque::new(),
            results: VecDeque::new(),
            in_flight: (0, 0),
            spare: Vec::new(),
            window_files: WINDOW_FILES,
            trust: SourceTrust::Untrusted,
        })
    }

    /// Inline bytes for the splitstream, after whatever is queued. Queued inline bytes are
    /// capped: past [`MAX_PENDING_INLINE`] everything queued is written first (the bodies it
    /// waits for are stored, here if they are not with the pool yet), so a layer of huge
    /// headers behind one small body cannot make the importer hold them all.
    fn emit_inline(&mut self, data: &[u8]) -> anyhow::Result<()> {
        if !self.pending.is_empty() && self.pending_inline + data.len() > MAX_PENDING_INLINE {
            self.settle(Until::All, None)?;
        }
        if self.pending.is_empty() {
            return self.writer.write_inline(data);
        }
        self.pending_inline += data.len();
        if let Some(Pending::Inline(v)) = self.pending.back_mut() {
            v.extend_from_slice(data);
        } else {
            self.pending.push_back(Pending::Inline(data.to_vec()));
        }
        Ok(())
    }

    /// An object reference for the splitstream, after whatever is queued (at most
    /// [`MAX_PENDING_ENTRIES`] entries are queued, as for inline bytes).
    fn emit_object(&mut self, id: ObjectId, size: u64) -> anyhow::Result<()> {
        if self.pending.len() >= MAX_PENDING_ENTRIES {
            self.settle(Until::All, None)?;
        }
        if self.pending.is_empty() {
            return self.writer.write_external_sized(&id, size);
        }
        self.pending.push_back(Pending::Object(id, size));
        Ok(())
    }

    /// Whose source files may be hashed before they become objects (default
    /// [`SourceTrust::Untrusted`]: every object is hashed from its own bytes).
    pub fn set_source_trust(&mut self, trust: SourceTrust) {
        self.trust = trust;
    }

    /// Hold at most `files` batched bodies, and so their fds, at a time (default
    /// [`WINDOW_FILES`]): for a caller that shares an fd budget among several importers.
    pub fn set_window_files(&mut self, files: usize) {
        self.window_files = files.clamp(1, WINDOW_FILES);
    }

    /// Hand on the batch being filled: to `pool`, or stored right here without one.
    fn submit(&mut self, pool: Option<&BodyPool<'_>>) -> anyhow::Result<()> {
        if self.open.0.is_empty() {
            return Ok(());
        }
        let bodies = std::mem::take(&mut self.open.0);
        self.open.1 = 0;
        let batch = match pool {
            Some(pool) => Batch::Waiting(pool.submit(bodies)?),
            None => Batch::Ready(store_batch(self.repo, bodies)),
        };
        self.batches.push_back(batch);
        Ok(())
    }

    /// Write queued splitstream entries, in order, as far as their bodies are stored.
    fn settle(&mut self, until: Until, pool: Option<&BodyPool<'_>>) -> anyhow::Result<()> {
        let died = || anyhow::anyhow!("a body-storing thread died");
        while let Some(front) = self.pending.front() {
            let Pending::Body(size) = *front else {
                match self.pending.pop_front().expect("front exists") {
                    Pending::Inline(v) => {
                        self.pending_inline -= v.len();
                        self.writer.write_inline(&v)?
                    }
                    Pending::Object(id, size) => self.writer.write_external_sized(&id, size)?,
                    Pending::Body(_) => unreachable!("matched above"),
                }
                continue;
            };
            if self.results.is_empty() {
                if self.batches.is_empty() {
                    if until == Until::Ready {
                        return Ok(());
                    }
                    // The body is in the batch being filled.
                    self.submit(pool)?;
                }
                let stored = match self.batches.front().expect("submitted above") {
                    Batch::Ready(_) => match self.batches.pop_front() {
                        Some(Batch::Ready(v)) => v,
                        _ => unreachable!("front was Ready"),
                    },
                    Batch::Waiting(rx) => {
                        let v = if until == Until::Ready {
                            match rx.try_recv() {
                                Ok(v) => v,
                                Err(TryRecvError::Empty) => return Ok(()),
                                Err(TryRecvError::Disconnected) => return Err(died()),
                            }
                        } else {
                            rx.recv().map_err(|_| died())?
                        };
                        self.batches.pop_front();
                        v
                    }
                };
                self.results.extend(stored);
            }
            let Stored { result, data } = self.results.pop_front().ok_or_else(died)?;
            self.pending.pop_front();
            self.in_flight.0 -= 1;
            self.in_flight.1 -= size;
            // Keep small buffers for reuse; a large one would keep its capacity for every
            // later small body, so its memory goes back at once.
            if self.spare.len() < BATCH_FILES && data.capacity() <= SPARE_MAX_CAPACITY {
                self.spare.push(data);
            }
            let (id, method) = result?;
            self.stats.count(method, size);
            self.writer.write_external_sized(&id, size)?;
            if until == Until::OneBody {
                return Ok(());
            }
        }
        Ok(())
    }

    /// [`file`](Self::file) for bodies that are stored in batches: the body is read once,
    /// here, feeding the layer's sha256, and stored later with the bodies around it (their
    /// fs-verity digests computed together; by `pool`'s threads when given, while this
    /// thread goes on with the tar). Splitstream entries are written in tar order as their
    /// objects are stored, from a window of at most 256 bodies / 4 MiB. Bodies over 1 MiB are
    /// stored at once, streamed. Errors of a batched body surface at a later call or at
    /// [`finish`](Self::finish).
    ///
    /// # Errors
    /// As [`file`](Self::file); the pool belongs to another repository.
    pub fn file_batched(
        &mut self,
        fd: OwnedFd,
        size: u64,
        pool: Option<&BodyPool<'_>>,
    ) -> anyhow::Result<()> {
        if let Some(pool) = pool {
            ensure!(
                std::ptr::eq(pool.repo(), self.repo),
                "the body pool stores into another repository"
            );
        }
        if size > BATCH_MAX_BODY {
            return self.file(fd.as_fd(), size).map(drop);
        }
        let at = self.tracker.offset();
        let external = self.tracker.take_body(size)?;
        self.stats.tar_bytes += size;
        if !external {
            return self.small_body(fd.as_fd(), at, size);
        }
        let st = rustix::fs::fstat(&fd)
            .with_context(|| format!("inspecting the file body at tar offset {at}"))?;
        ensure!(
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
                && st.st_size as u64 == size,
            "the file for the body at tar offset {at} is not a regular file of {size} bytes \
             (mode {:o}, {} bytes)",
            st.st_mode,
            st.st_size
        );
        // Resized, not cleared: the read below overwrites every byte (or fails), so only
        // growth needs zeroing.
        let mut data = self.spare.pop().unwrap_or_default();
        data.resize(size as usize, 0);
        // The bytes hashed must be the object's: from a trusted source they are read first
        // (its page cache) and cloned later; otherwise the clone is made first and read.
        let clone = if self.trust.trusts(&st) {
            None
        } else {
            self.repo
                .clone_source(fd.as_fd(), st.st_dev, size)
                .with_context(|| format!("cloning the file body at tar offset {at}"))?
        };
        let from = clone.as_ref().map_or(fd.as_fd(), |tmp| tmp.file.as_fd());
        let n = read_full_at(from, &mut data, 0)
            .with_context(|| format!("reading the file body at tar offset {at}"))?;
        ensure!(
            n as u64 == size,
            "the file for the body at tar offset {at} ended after {n} of {size} bytes"
        );
        self.sha.update(&data);
        let source = match clone {
            Some(tmp) => BodySource::Clone(tmp),
            None if self.trust.trusts(&st) => {
                self.stats.bodies_hashed_from_source += 1;
                BodySource::Trusted { fd, dev: st.st_dev }
            }
            None => BodySource::Copy,
        };
        while self.in_flight.0 >= self.window_files
            || (self.in_flight.0 > 0 && self.in_flight.1 + size > WINDOW_BYTES)
        {
            self.settle(Until::OneBody, pool)?;
        }
        self.open.0.push(Body { source, data });
        self.open.1 += size;
        self.pending.push_back(Pending::Body(size));
        self.in_flight.0 += 1;
        self.in_flight.1 += size;
        if self.open.0.len() >= BATCH_FILES || self.open.1 >= BATCH_BYTES {
            self.submit(pool)?;
        }
        self.settle(Until::Ready, pool)
    }

    /// The next bytes of the tar, verbatim.
    ///
    /// # Errors
    /// Malformed tar (checksum, sparse entry, …) or I/O errors; the message names the offset.
    pub fn inline(&mut self, mut data: &[u8]) -> anyhow::Result<()> {
        self.sha.update(data);
        self.stats.tar_bytes += data.len() as u64;
        while !data.is_empty() {
            let (n, region) = self.tracker.advance(data)?;
            let (now, rest) = data.split_at(n);
            match region {
                Region::Inline => {
                    self.stats.inline_bytes += n as u64;
                    self.emit_inline(now)?;
                }
                Region::ExternalBody { size, first, last } => {
                    if first {
                        self.body = Some(ObjectWriter::new(self.repo)?);
                    }
                    let body = self.body.as_mut().expect("body started by its first bytes");
                    body.write(now)?;
                    if last {
                        let body = self.body.take().expect("checked above");
                        let (id, method) = body.finish()?;
                        self.stats.count(method, size);
                        self.emit_object(id, size)?;
                    }
                }
            }
            data = rest;
        }
        Ok(())
    }

    /// One whole regular-file body of `size` bytes, at the point of the tar where it belongs.
    /// Returns how it was stored (`None`: kept inline).
    ///
    /// # Errors
    /// No body starts here, `size` disagrees with the header or the file, or I/O errors.
    pub fn file(&mut self, fd: BorrowedFd<'_>, size: u64) -> anyhow::Result<Option<StoreMethod>> {
        let at = self.tracker.offset();
        let external = self.tracker.take_body(size)?;
        self.stats.tar_bytes += size;
        if !external {
            return self.small_body(fd, at, size).map(|()| None);
        }
        if rustix::fs::fstat(fd).is_ok_and(|st| self.trust.trusts(&st)) {
            self.stats.bodies_hashed_from_source += 1;
        }
        let sha = &mut self.sha;
        let (id, method) = self
            .repo
            .store_file(fd, size, self.trust, &mut |chunk| sha.update(chunk))
            .with_context(|| format!("storing the file body at tar offset {at}"))?;
        self.stats.count(method, size);
        self.emit_object(id, size)?;
        Ok(Some(method))
    }

    /// A body that stays inline in the splitstream (≤ 64 bytes, or any size for entry types
    /// whose data composefs keeps inline).
    fn small_body(&mut self, fd: BorrowedFd<'_>, at: u64, size: u64) -> anyhow::Result<()> {
        let st = rustix::fs::fstat(fd)
            .with_context(|| format!("inspecting the file body at tar offset {at}"))?;
        ensure!(
            st.st_size as u64 == size,
            "the file for the body at tar offset {at} has {} bytes, the header says {size}",
            st.st_size
        );
        let mut buf = vec![0u8; (size as usize).min(INLINE_BODY_READ_CHUNK)];
        let mut off = 0u64;
        while off < size {
            let want = (size - off).min(buf.len() as u64) as usize;
            let n = read_full_at(fd, &mut buf[..want], off)
                .with_context(|| format!("reading the file body at tar offset {}", at + off))?;
            ensure!(
                n == want,
                "the file for the body at tar offset {at} ended after {} of {size} bytes",
                off + n as u64
            );
            self.sha.update(&buf[..n]);
            self.emit_inline(&buf[..n])?;
            self.stats.inline_bytes += n as u64;
            off += n as u64;
        }
        Ok(())
    }

    /// Counters so far (batched bodies count once stored; see
    /// [`finish_with_stats`](Self::finish_with_stats)).
    pub fn stats(&self) -> &ImportStats {
        &self.stats
    }

    /// Check that the tar is complete and its sha256 is `diff_id` (`sha256:<hex>`), then store
    /// the layer splitstream and return its object id. Nothing is linked: a failed check
    /// leaves only unreferenced objects behind.
    ///
    /// # Errors
    /// Truncated tar, diff_id mismatch (the message names both digests), or I/O errors.
    pub fn finish(self, diff_id: &str) -> anyhow::Result<ObjectId> {
        self.finish_with_stats(diff_id).map(|(id, _)| id)
    }

    /// [`finish`](Self::finish), also returning the final counters: batched bodies are only
    /// counted once stored, so [`stats`](Self::stats) before the end can be short.
    ///
    /// # Errors
    /// As [`finish`](Self::finish).
    pub fn finish_with_stats(mut self, diff_id: &str) -> anyhow::Result<(ObjectId, ImportStats)> {
        self.settle(Until::All, None)
            .with_context(|| format!("layer {diff_id}"))?;
        check_digest(diff_id).with_context(|| format!("layer {diff_id}"))?;
        self.tracker
            .check_complete()
            .with_context(|| format!("layer {diff_id}"))?;
        let got = format!("sha256:{}", hex::encode(self.sha.finalize()));
        ensure!(
            got == diff_id,
            "layer {diff_id}: the tar's sha256 is {got}; refusing to store it under that diff_id"
        );
        let id = self
            .writer
            .finish()
            .with_context(|| format!("storing the splitstream of layer {diff_id}"))?;
        Ok((id, self.stats))
    }
}

/// `sha256:<64 hex>` or `sha512:<128 hex>`, lowercase (as `oci-spec` checks the encoding of
/// those algorithms): safe to embed in a file name.
fn check_digest(digest: &str) -> anyhow::Result<()> {
    let ok = Digest::from_str(digest).is_ok_and(|d| {
        matches!(
            d.algorithm(),
            DigestAlgorithm::Sha256 | DigestAlgorithm::Sha512
        )
    });
    ensure!(ok, "{digest:?} is not a sha256:/sha512: digest");
    Ok(())
}

/// Check that `data` has `digest`.
fn verify_digest(data: &[u8], digest: &str, what: &str) -> anyhow::Result<()> {
    check_digest(digest).with_context(|| what.to_owned())?;
    let got = if digest.starts_with("sha256:") {
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
    } else {
        format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)))
    };
    ensure!(
        got == digest,
        "{what}: content has digest {got}, expected {digest}"
    );
    Ok(())
}

/// `streams/<name>` → the object, relative.
fn stream_target(id: &ObjectId) -> String {
    format!("../objects/{}", id.object_path())
}

/// Make layer stream `stream_id` visible as `streams/oci-layer-<diff_id>` (atomic).
///
/// # Errors
/// Invalid diff_id, or I/O errors.
pub fn publish_layer(repo: &Repository, diff_id: &str, stream_id: &ObjectId) -> anyhow::Result<()> {
    check_digest(diff_id).with_context(|| format!("layer {diff_id}"))?;
    let name = format!("oci-layer-{diff_id}");
    repo.symlink(&format!("streams/{name}"), &stream_target(stream_id))
        .with_context(|| format!("publishing layer {diff_id}"))
}

/// The tag's file name below `streams/refs/oci/`.
fn encode_tag(tag: &str) -> String {
    tag.replace('%', "%25").replace('/', "%2F")
}

/// What [`publish_image`] (or [`PreparedImage::publish`]) made visible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedImage {
    /// `streams/oci-config-<digest>`.
    pub config_stream: ObjectId,
    /// `streams/oci-manifest-<digest>`.
    pub manifest_stream: ObjectId,
    /// The EROFS image of the repository's default format (`images/<hex>`), or `None` when it
    /// could not be built (see `erofs_skipped`).
    pub erofs_image: Option<ObjectId>,
    /// Why there is no EROFS image, when there is none.
    pub erofs_skipped: Option<String>,
}

/// An image whose objects are all stored but nothing is linked yet. Call
/// [`Repository::sync`], then [`publish`](Self::publish), for a crash-safe import.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    manifest_digest: String,
    config_digest: String,
    layers: Vec<(String, ObjectId)>,
    config_stream: ObjectId,
    manifest_stream: ObjectId,
    /// (EROFS format version, image id), default format first.
    erofs_images: Vec<(u8, ObjectId)>,
    erofs_skipped: Option<String>,
}

impl PreparedImage {
    /// The config splitstream.
    pub fn config_stream(&self) -> &ObjectId {
        &self.config_stream
    }

    /// The manifest splitstream.
    pub fn manifest_stream(&self) -> &ObjectId {
        &self.manifest_stream
    }

    /// The default-format EROFS image, if built.
    pub fn erofs_image(&self) -> Option<&ObjectId> {
        self.erofs_images.first().map(|(_, id)| id)
    }

    /// Why no EROFS image was built.
    pub fn erofs_skipped(&self) -> Option<&str> {
        self.erofs_skipped.as_deref()
    }

    /// Link everything: `images/<hex>`, the layer, config and manifest streams, and the tag
    /// `streams/refs/oci/<tag>` last. Each link is atomic; no sync.
    ///
    /// # Errors
    /// Invalid tag, or I/O errors.
    pub fn publish(&self, repo: &Repository, tag: Option<&str>) -> anyhow::Result<PublishedImage> {
        let tag_name = tag
            .map(|t| {
                ensure!(
                    !t.starts_with('@'),
                    "tag {t:?}: a leading '@' is reserved for digests"
                );
                let enc = encode_tag(t);
                check_link_name(&enc).with_context(|| format!("tag {t:?}"))?;
                Ok(enc)
            })
            .transpose()?;
        for (_, id) in &self.erofs_images {
            repo.symlink(&format!("images/{id}"), &stream_target(id))
                .with_context(|| format!("linking EROFS image {id}"))?;
        }
        for (diff_id, id) in &self.layers {
            publish_layer(repo, diff_id, id)?;
        }
        let config_name = format!("oci-config-{}", self.config_digest);
        repo.symlink(
            &format!("streams/{config_name}"),
            &stream_target(&self.config_stream),
        )
        .with_context(|| format!("publishing config {}", self.config_digest))?;
        let manifest_name = format!("oci-manifest-{}", self.manifest_digest);
        repo.symlink(
            &format!("streams/{manifest_name}"),
            &stream_target(&self.manifest_stream),
        )
        .with_context(|| format!("publishing manifest {}", self.manifest_digest))?;
        if let Some(enc) = tag_name {
            repo.symlink(
                &format!("streams/refs/oci/{enc}"),
                &format!("../../{manifest_name}"),
            )
            .with_context(|| format!("tagging {}", tag.unwrap_or_default()))?;
        }
        Ok(PublishedImage {
            config_stream: self.config_stream.clone(),
            manifest_stream: self.manifest_stream.clone(),
            erofs_image: self.erofs_image().cloned(),
            erofs_skipped: self.erofs_skipped.clone(),
        })
    }
}

/// Media type of a Docker v2s2 image config.
const DOCKER_IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";

/// Fields of the manifest and config that matter here (parsed for validation only: the bytes
/// are stored as given).
struct ImageJson {
    config_digest_in_manifest: String,
    is_image_config: bool,
    diff_ids: Vec<String>,
}

fn parse_image_json(manifest: &[u8], config: &[u8]) -> anyhow::Result<ImageJson> {
    let m: ImageManifest = serde_json::from_slice(manifest).context("parsing the manifest")?;
    let mut c: ImageConfiguration = serde_json::from_slice(config).context("parsing the config")?;
    Ok(ImageJson {
        config_digest_in_manifest: m.config().digest().to_string(),
        // composefs 0.9.4 treats every other config type as an artifact (no EROFS image), even
        // Docker's: most images pulled from Docker Hub are Docker v2s2, and podman runs them, so
        // they get their composefs image here.
        is_image_config: match m.config().media_type() {
            MediaType::ImageConfig => true,
            MediaType::Other(t) => t == DOCKER_IMAGE_CONFIG_MEDIA_TYPE,
            _ => false,
        },
        diff_ids: std::mem::take(c.rootfs_mut().diff_ids_mut()),
    })
}

/// Store everything an image needs besides its layers: the EROFS image(s) of the merged
/// rootfs (feature `erofs`), the config and manifest objects and their splitstreams. Nothing
/// is linked. `layers` are the layer streams by diff_id, in the config's `rootfs.diff_ids`
/// order.
///
/// An image whose config is not an OCI image config is an artifact for composefs: it gets no
/// EROFS image, and [`PreparedImage::erofs_skipped`] says so.
///
/// # Errors
/// Digest mismatches, `layers` disagreeing with the config, an image whose tree cannot be
/// represented as an EROFS image, or I/O errors.
pub fn prepare_image(
    repo: &Repository,
    manifest: &[u8],
    manifest_digest: &str,
    config: &[u8],
    config_digest: &str,
    layers: &[(String, ObjectId)],
) -> anyhow::Result<PreparedImage> {
    verify_digest(manifest, manifest_digest, "manifest")?;
    verify_digest(config, config_digest, "config")?;
    let json =
        parse_image_json(manifest, config).with_context(|| format!("image {manifest_digest}"))?;
    ensure!(
        json.config_digest_in_manifest == config_digest,
        "manifest {manifest_digest} names config {}, not {config_digest}",
        json.config_digest_in_manifest
    );
    let given: Vec<&str> = layers.iter().map(|(d, _)| d.as_str()).collect();
    let want: Vec<&str> = json.diff_ids.iter().map(String::as_str).collect();
    ensure!(
        given == want,
        "image {manifest_digest}: layers {given:?} differ from the config's diff_ids {want:?}"
    );
    for (d, id) in layers {
        check_digest(d).with_context(|| format!("layer {d}"))?;
        ensure!(
            id.alg() == repo.algorithm(),
            "layer {d}: stream {id} is not a {} digest",
            repo.algorithm().meta_name()
        );
    }

    let (erofs_images, erofs_skipped) = if !json.is_image_config {
        (
            Vec::new(),
            Some(
                "the config media type is not an image config (OCI or Docker): an artifact"
                    .to_owned(),
            ),
        )
    } else {
        build_erofs(repo, layers)?
    };

    let config_obj = repo
        .store_bytes(config)
        .with_context(|| format!("storing config {config_digest}"))?;
    let mut w = SplitStreamWriter::new(repo, CONFIG_CONTENT_TYPE)?;
    for (diff_id, id) in layers {
        w.add_named_ref(diff_id, id)?;
    }
    for (version, id) in &erofs_images {
        match version {
            2 => w.add_named_ref(IMAGE_REF_V2, id)?,
            1 => w.add_named_ref(IMAGE_REF_V1, id)?,
            _ => {}
        }
    }
    w.write_external_sized(&config_obj, config.len() as u64)?;
    let config_stream = w
        .finish()
        .with_context(|| format!("storing the config splitstream of {config_digest}"))?;

    let manifest_obj = repo
        .store_bytes(manifest)
        .with_context(|| format!("storing manifest {manifest_digest}"))?;
    let mut w = SplitStreamWriter::new(repo, MANIFEST_CONTENT_TYPE)?;
    w.add_named_ref(&format!("config:{config_digest}"), &config_stream)?;
    for (diff_id, id) in layers {
        w.add_named_ref(diff_id, id)?;
    }
    w.write_external_sized(&manifest_obj, manifest.len() as u64)?;
    let manifest_stream = w
        .finish()
        .with_context(|| format!("storing the manifest splitstream of {manifest_digest}"))?;

    Ok(PreparedImage {
        manifest_digest: manifest_digest.to_owned(),
        config_digest: config_digest.to_owned(),
        layers: layers.to_vec(),
        config_stream,
        manifest_stream,
        erofs_images,
        erofs_skipped,
    })
}

/// Stored EROFS images (format version, id), default format first, or why there are none.
type ErofsOutcome = (Vec<(u8, ObjectId)>, Option<String>);

#[cfg(feature = "erofs")]
fn build_erofs(repo: &Repository, layers: &[(String, ObjectId)]) -> anyhow::Result<ErofsOutcome> {
    let streams: Vec<ObjectId> = layers.iter().map(|(_, id)| id.clone()).collect();
    let versions = repo.erofs_formats().versions();
    if let Some(v) = versions.iter().find(|v| !matches!(v, 1 | 2)) {
        return Ok((
            Vec::new(),
            Some(format!(
                "the repository asks for EROFS format {v}, which is not supported here"
            )),
        ));
    }
    match super::erofs::build_images(repo, &streams, &versions)? {
        Ok(images) => {
            let mut out = Vec::new();
            for (version, image) in images {
                let id = match image {
                    super::erofs::Image::Stored(id) => id,
                    super::erofs::Image::Bytes(bytes) => repo
                        .store_bytes(&bytes)
                        .with_context(|| format!("storing the EROFS image (format {version})"))?,
                };
                out.push((version, id));
            }
            Ok((out, None))
        }
        // An image that cannot be mounted must not be published as one (the caller tags
        // nothing): cfsctl's `oci mount` of it would fail.
        Err(reason) => {
            anyhow::bail!("the image cannot be represented as a composefs image: {reason}")
        }
    }
}

#[cfg(not(feature = "erofs"))]
fn build_erofs(_repo: &Repository, _layers: &[(String, ObjectId)]) -> anyhow::Result<ErofsOutcome> {
    Ok((
        Vec::new(),
        Some("built without the `erofs` feature".to_owned()),
    ))
}

/// [`prepare_image`] then [`PreparedImage::publish`], without a sync between them: objects
/// stored here become visible before they are known durable. Prefer the two-step form with
/// [`Repository::sync`] in between when crash safety matters.
///
/// # Errors
/// As [`prepare_image`] and [`PreparedImage::publish`].
pub fn publish_image(
    repo: &Repository,
    manifest: &[u8],
    manifest_digest: &str,
    config: &[u8],
    config_digest: &str,
    layers: &[(String, ObjectId)],
    tag: Option<&str>,
) -> anyhow::Result<PublishedImage> {
    prepare_image(
        repo,
        manifest,
        manifest_digest,
        config,
        config_digest,
        layers,
    )?
    .publish(repo, tag)
}
