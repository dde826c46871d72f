//! Pipes to the client and the threads that fill them: blobs (layers rebuilt from the store,
//! OCI layout files, bytes in memory), each verified before `FinishPipe` reports success.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256, Sha512};

use super::image::BlobSource;
use super::wire::Failure;
use crate::client::{LayerItem, Proxy, ProxyConfig};
use crate::proto::rpc::LayerSelector;
use crate::proto::source::Store;
use crate::repo::SourceTrust;

/// Pipe buffer asked for each blob pipe: fewer wakeups per megabyte than the default 64 KiB.
/// Only a request: an unprivileged user over `pipe-user-pages-soft` keeps the default.
const PIPE_SIZE: usize = 1 << 20;

/// Read buffer of the copy loops (as `sink::write_layer_tar`'s).
const COPY_BUF: usize = 1 << 20;

/// Idle helpers kept per store for later blobs; more are started as blobs run concurrently
/// (one per layer being streamed) and stopped when they finish.
const MAX_IDLE_HELPERS: usize = 4;

/// A helper and the images it has open (reference → handle).
#[derive(Debug)]
pub(crate) struct Helper {
    proxy: Proxy,
    images: HashMap<String, u64>,
}

impl Helper {
    /// The helper's handle for `reference`, opening it on first use.
    pub(crate) fn open(
        &mut self,
        reference: &str,
    ) -> anyhow::Result<crate::proto::rpc::OpenImageResult> {
        let opened = self.proxy.open_image(reference)?;
        if let Some(old) = self.images.insert(reference.to_owned(), opened.image) {
            let _ = self.proxy.close_image(old);
        }
        Ok(opened)
    }

    fn handle(&mut self, reference: &str) -> anyhow::Result<u64> {
        match self.images.get(reference) {
            Some(h) => Ok(*h),
            None => Ok(self.open(reference)?.image),
        }
    }
}

/// Helpers not streaming anything, per store. Helpers are started only on the thread that
/// serves requests: a helper's `PR_SET_PDEATHSIG` fires when the *thread* that started it ends,
/// so one started by a blob thread would die with that thread.
#[derive(Debug, Default)]
pub(crate) struct Helpers {
    idle: Mutex<HashMap<String, Vec<Helper>>>,
}

impl Helpers {
    /// An idle helper for `store`, or a new one. Call from the serving thread only.
    ///
    /// # Errors
    /// The helper cannot be started.
    pub(crate) fn take(&self, store: &Store) -> anyhow::Result<Helper> {
        let key = store.to_string();
        if let Some(h) = self.lock().get_mut(&key).and_then(Vec::pop) {
            return Ok(h);
        }
        let proxy = Proxy::spawn(&ProxyConfig::new(store.clone()))
            .with_context(|| format!("starting a helper for {store}"))?;
        Ok(Helper {
            proxy,
            images: HashMap::new(),
        })
    }

    /// Return a helper that finished its work cleanly; beyond the idle limit it is stopped.
    pub(crate) fn give(&self, store: &Store, helper: Helper) {
        let mut idle = self.lock();
        let list = idle.entry(store.to_string()).or_default();
        if list.len() < MAX_IDLE_HELPERS {
            list.push(helper);
        }
    }

    /// Stop every idle helper (busy ones end with their blob thread's `Proxy`).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Helper>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a pipe's thread hands back when it is done: the pipe's write end (closed only by
/// `FinishPipe`, so the client cannot see end-of-file before it asks for the verdict) and the
/// verdict.
pub(crate) type PipeOutcome = (OwnedFd, Result<(), Failure>);

/// A blob to write: where from, and what to check.
#[derive(Debug)]
pub(crate) struct BlobJob {
    pub(crate) source: BlobSource,
    /// The digest the client asked for.
    pub(crate) digest: String,
    /// The size the client announced, checked when verifying.
    pub(crate) size: Option<u64>,
    /// `GetBlob`: verify digest and size. `GetRawBlob`: move bytes only (layers are still
    /// checked against their diff_id, which costs nothing extra there).
    pub(crate) verify: bool,
    /// For a layer: the helper to stream it with (taken on the serving thread).
    pub(crate) helper: Option<Helper>,
}

/// A new pipe, close-on-exec, with a larger buffer where allowed: (read end, write end).
pub(crate) fn new_pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .context("creating a pipe for the client")?;
    let _ = rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE);
    Ok((r, w))
}

/// Start a thread writing `bytes` into `w` (manifests, configs, layer infos).
pub(crate) fn spawn_bytes(w: OwnedFd, bytes: Vec<u8>) -> anyhow::Result<JoinHandle<PipeOutcome>> {
    std::thread::Builder::new()
        .name("proxy-bytes".into())
        .spawn(move || {
            let r = (&File::from(w.try_clone().expect("dup of a pipe fd")))
                .write_all(&bytes)
                .context("writing to the client's pipe")
                .map_err(Failure::from);
            (w, r)
        })
        .context("starting a pipe thread")
}

/// Start a thread writing the blob of `job` into `w`; its verdict comes back on join.
pub(crate) fn spawn_blob(
    w: OwnedFd,
    job: BlobJob,
    helpers: Arc<Helpers>,
) -> anyhow::Result<JoinHandle<PipeOutcome>> {
    std::thread::Builder::new()
        .name("proxy-blob".into())
        .spawn(move || {
            let r = write_blob(&w, job, &helpers).map_err(Failure::from);
            (w, r)
        })
        .context("starting a blob thread")
}

/// Start a `GetRawBlob` thread: data into `w`, and on failure one JSON error object into
/// `errw`; both close when it ends (no `FinishPipe`).
pub(crate) fn spawn_raw(
    w: OwnedFd,
    errw: OwnedFd,
    job: BlobJob,
    helpers: Arc<Helpers>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("proxy-raw-blob".into())
        .spawn(move || {
            if let Err(e) = write_blob(&w, job, &helpers) {
                drop(w);
                let f = Failure::from_error(&e);
                let msg = serde_json::json!({"code": f.code, "message": f.message});
                // The client may have gone: nothing more to tell anyone then.
                let _ = (&File::from(errw)).write_all(msg.to_string().as_bytes());
            }
        })
        .context("starting a blob thread")?;
    Ok(())
}

fn write_blob(w: &OwnedFd, job: BlobJob, helpers: &Helpers) -> anyhow::Result<()> {
    let out = File::from(w.try_clone().context("duplicating the pipe's write end")?);
    let digest = job.digest.clone();
    let written = match job.source {
        BlobSource::Layer {
            store,
            reference,
            diff_id,
            trust,
        } => {
            let mut helper = job.helper.context("no helper for a layer blob")?;
            let n = write_layer(&mut helper, &reference, &diff_id, &out, trust)?;
            // Only a helper whose stream ended cleanly is reused.
            helpers.give(&store, helper);
            n
        }
        BlobSource::Bytes(bytes) => {
            let mut check = Verifier::new(&digest, job.verify)?;
            check.update(&bytes);
            (&out)
                .write_all(&bytes)
                .context("writing to the client's pipe")?;
            check.finish(&digest)?;
            bytes.len() as u64
        }
        BlobSource::File(path) => {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            if job.verify {
                copy_verified(&file, &out, &digest)
                    .with_context(|| format!("blob {digest} ({})", path.display()))?
            } else {
                splice_all(&file, &out)
                    .with_context(|| format!("blob {digest} ({})", path.display()))?
            }
        }
    };
    if let Some(size) = job.size.filter(|_| job.verify)
        && size != written
    {
        bail!("expected {size} bytes in blob {digest}, got {written}");
    }
    Ok(())
}

/// Stream the layer `diff_id` through `helper` as its exact tar into `out`, hashing every byte
/// and checking the tar against the diff_id. Returns the bytes written.
///
/// Headers, padding and small bodies arrive inline and are written from the buffer that was
/// hashed. A body whose file `trust` trusts is hashed by `pread` and then moved into the pipe
/// with `splice`, never copied through user space; any other body is copied through the buffer
/// that feeds the hash, so an untrusted file changed meanwhile cannot reach the client unhashed.
fn write_layer(
    helper: &mut Helper,
    reference: &str,
    diff_id: &str,
    out: &File,
    trust: SourceTrust,
) -> anyhow::Result<u64> {
    let image = helper.handle(reference)?;
    let mut stream = helper
        .proxy
        .get_layer(image, LayerSelector::DiffId(diff_id.to_owned()), None)
        .with_context(|| format!("layer {diff_id} of {reference:?}"))?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; COPY_BUF];
    let (mut written, mut bodies) = (0u64, 0u64);
    while let Some(item) = stream.next_item()? {
        match item {
            LayerItem::Inline(bytes) => {
                sha.update(bytes);
                (&*out)
                    .write_all(bytes)
                    .context("writing to the client's pipe")?;
                written += bytes.len() as u64;
            }
            LayerItem::File { fd, size, .. } => {
                bodies += 1;
                let file = File::from(fd);
                let trusted = rustix::fs::fstat(&file).is_ok_and(|st| trust.trusts(&st));
                let moved = if trusted {
                    hash_range(&file, size, &mut buf, &mut sha)
                        .and_then(|()| splice_range(&file, size, out))
                } else {
                    copy_range(&file, size, &mut buf, &mut sha, out)
                };
                moved.with_context(|| {
                    format!("layer {diff_id}: body {bodies} (tar offset {written})")
                })?;
                written += size;
            }
        }
    }
    drop(stream);
    let actual = format!("sha256:{}", hex::encode(sha.finalize()));
    if actual != diff_id {
        bail!("layer {diff_id}: the rebuilt tar hashes to {actual}; refusing it");
    }
    Ok(written)
}

/// `pread` into `buf`, retrying on `EINTR`; an early end of file is an error.
fn pread_some(file: &File, buf: &mut [u8], offset: u64, size: u64) -> anyhow::Result<usize> {
    loop {
        match rustix::io::pread(file, &mut *buf, offset) {
            Ok(0) => bail!("ended after {offset} of its {size} bytes"),
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context(format!("reading at offset {offset}")),
        }
    }
}

/// Feed the first `size` bytes of `file` to `sha`, read by position (the helper may share the
/// fd's file offset).
fn hash_range(file: &File, size: u64, buf: &mut [u8], sha: &mut Sha256) -> anyhow::Result<()> {
    let mut offset = 0u64;
    while offset < size {
        let want = usize::try_from((size - offset).min(buf.len() as u64)).expect("≤ buf.len()");
        let n = pread_some(file, &mut buf[..want], offset, size)?;
        sha.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(())
}

/// Copy the first `size` bytes of `file` to `out` through `buf`, which also feeds `sha`.
fn copy_range(
    file: &File,
    size: u64,
    buf: &mut [u8],
    sha: &mut Sha256,
    out: &File,
) -> anyhow::Result<()> {
    let mut offset = 0u64;
    while offset < size {
        let want = usize::try_from((size - offset).min(buf.len() as u64)).expect("≤ buf.len()");
        let n = pread_some(file, &mut buf[..want], offset, size)?;
        sha.update(&buf[..n]);
        (&*out)
            .write_all(&buf[..n])
            .context("writing to the client's pipe")?;
        offset += n as u64;
    }
    Ok(())
}

/// Move the first `size` bytes of `file` into the pipe `out` with `splice`, by position.
fn splice_range(file: &File, size: u64, out: &File) -> anyhow::Result<()> {
    let mut offset = 0u64;
    while offset < size {
        let want = usize::try_from((size - offset).min(COPY_BUF as u64)).expect("≤ COPY_BUF");
        match rustix::pipe::splice(
            file.as_fd(),
            Some(&mut offset),
            out.as_fd(),
            None,
            want,
            rustix::pipe::SpliceFlags::MOVE,
        ) {
            Ok(0) => bail!("ended after {offset} of its {size} bytes"),
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(e).context(format!("splicing at offset {offset} to the client's pipe"));
            }
        }
    }
    Ok(())
}

/// A running digest of one of the algorithms OCI digests use.
enum Verifier {
    Off,
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Verifier {
    fn new(digest: &str, on: bool) -> anyhow::Result<Self> {
        if !on {
            return Ok(Verifier::Off);
        }
        match digest.split_once(':').map(|(a, _)| a) {
            Some("sha256") => Ok(Verifier::Sha256(Sha256::new())),
            Some("sha512") => Ok(Verifier::Sha512(Sha512::new())),
            _ => bail!("unsupported digest {digest:?}"),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Verifier::Off => {}
            Verifier::Sha256(h) => h.update(bytes),
            Verifier::Sha512(h) => h.update(bytes),
        }
    }

    fn finish(self, digest: &str) -> anyhow::Result<()> {
        let actual = match self {
            Verifier::Off => return Ok(()),
            Verifier::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Verifier::Sha512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        };
        if actual != digest {
            bail!("corrupted blob, expecting {digest}, got {actual}");
        }
        Ok(())
    }
}

/// Copy `file` into `out`, hashing what is written. Returns the bytes copied.
fn copy_verified(file: &File, out: &File, digest: &str) -> anyhow::Result<u64> {
    let mut check = Verifier::new(digest, true)?;
    let mut buf = vec![0u8; COPY_BUF];
    let mut offset = 0u64;
    loop {
        let n = match rustix::io::pread(file, &mut buf[..], offset) {
            Ok(0) => break,
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e).context(format!("reading at offset {offset}")),
        };
        check.update(&buf[..n]);
        (&*out)
            .write_all(&buf[..n])
            .context("writing to the client's pipe")?;
        offset += n as u64;
    }
    check.finish(digest)?;
    Ok(offset)
}

/// Move `file` into the pipe `out` with `splice`: the bytes never enter user space.
fn splice_all(file: &File, out: &File) -> anyhow::Result<u64> {
    let mut offset = 0u64;
    loop {
        match rustix::pipe::splice(
            file.as_fd(),
            Some(&mut offset),
            out.as_fd(),
            None,
            COPY_BUF,
            rustix::pipe::SpliceFlags::MOVE,
        ) {
            Ok(0) => return Ok(offset),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context(format!("splicing at offset {offset}")),
        }
    }
}
