//! Worker threads that store file bodies while the layer tar is processed in order.
//!
//! A layer's tar must be consumed in order: its sha256 (the diff_id) runs over every byte in
//! sequence, and the splitstream lists entries in tar order. Storing a body — its fs-verity
//! digest, the O_TMPFILE, the reflink, the link — is independent per file and is most of the
//! work for small files. So the importer reads each body once (feeding the sha256 from that
//! buffer), hands buffer and fd to this pool, and writes the splitstream entry when the
//! object id comes back, keeping a bounded window of bodies in flight.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use anyhow::anyhow;

use super::objects::TmpObject;
use super::{ObjectId, Repository, StoreMethod};

/// Where the object of a body read by the importer comes from.
pub(crate) enum BodySource {
    /// The source file, trusted (see [`super::SourceTrust`]) and on device `dev`: reflinked
    /// after its bytes were read and hashed.
    Trusted {
        /// The source file.
        fd: OwnedFd,
        /// Its device.
        dev: u64,
    },
    /// A clone of the source made before the bytes were read, from the clone: it becomes the
    /// object as it is.
    Clone(TmpObject),
    /// Written from the bytes read (the source could not be cloned, or may not be).
    Copy,
}

/// A body read by the importer: where its object comes from, and its bytes.
pub(crate) struct Body {
    pub(crate) source: BodySource,
    pub(crate) data: Vec<u8>,
}

/// A stored body: the outcome, and the buffer back for reuse.
pub(crate) struct Stored {
    pub(crate) result: anyhow::Result<(ObjectId, StoreMethod)>,
    pub(crate) data: Vec<u8>,
}

/// A batch of bodies to store, and where to send the outcomes (same order).
struct Job {
    bodies: Vec<Body>,
    reply: SyncSender<Vec<Stored>>,
}

/// Store a batch here and now (the importer without a pool, and the pool's threads).
pub(crate) fn store_batch(repo: &Repository, bodies: Vec<Body>) -> Vec<Stored> {
    let (sources, data): (Vec<BodySource>, Vec<Vec<u8>>) =
        bodies.into_iter().map(|b| (b.source, b.data)).unzip();
    let results = {
        let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        repo.store_read_bodies(sources, &slices)
    };
    results
        .into_iter()
        .zip(data)
        .map(|(result, data)| Stored { result, data })
        .collect()
}

/// Threads storing bodies into one repository; see [`with_body_pool`].
pub struct BodyPool<'r> {
    repo: &'r Repository,
    jobs: SyncSender<Job>,
}

impl std::fmt::Debug for BodyPool<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyPool").finish_non_exhaustive()
    }
}

impl<'r> BodyPool<'r> {
    /// The repository the pool stores into.
    pub(crate) fn repo(&self) -> &'r Repository {
        self.repo
    }

    /// Queue a batch of bodies for storing; the outcomes arrive, in order, on the returned
    /// receiver. Blocks while the pool is busy.
    pub(crate) fn submit(&self, bodies: Vec<Body>) -> anyhow::Result<Receiver<Vec<Stored>>> {
        let (reply, rx) = sync_channel(1);
        self.jobs
            .send(Job { bodies, reply })
            .map_err(|_| anyhow!("the body-storing threads have stopped"))?;
        Ok(rx)
    }
}

/// Run `f` with a pool of `threads` threads storing bodies into `repo`; the pool ends when
/// `f` returns (queued bodies are finished first).
pub fn with_body_pool<R>(
    repo: &Repository,
    threads: usize,
    f: impl FnOnce(&BodyPool<'_>) -> R,
) -> R {
    let threads = threads.max(1);
    // A short queue: enough to keep every thread busy, and back-pressure beyond that.
    let (tx, rx) = sync_channel::<Job>(threads * 2);
    let rx = Arc::new(Mutex::new(rx));
    std::thread::scope(|s| {
        for _ in 0..threads {
            // Only the threads hold the receiver: if they all stop, `submit` fails at once.
            let rx = Arc::clone(&rx);
            s.spawn(move || {
                loop {
                    let job = {
                        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                        rx.recv()
                    };
                    let Ok(job) = job else { break };
                    let stored = store_batch(repo, job.bodies);
                    // The importer may have given up on this layer; nothing to tell then.
                    let _ = job.reply.send(stored);
                }
            });
        }
        drop(rx);
        let pool = BodyPool { repo, jobs: tx };
        f(&pool)
        // `pool` (the only sender) drops here: the threads drain the queue and exit.
    })
}
