//! gzip on every core: a layer tar cut into chunks that a pool of threads compresses, each
//! chunk one gzip member, the members written in order.
//!
//! RFC 1952 §2.2: "A gzip file consists of a series of members", and a decompressor reads
//! them as one stream (gzip(1), Go's `compress/gzip` in its default multistream mode, which
//! skopeo and containers/storage use, and flate2's `MultiGzDecoder`). Each member starts a
//! fresh deflate window, which costs well under 1 % of the ratio at 1 MiB chunks.
//!
//! ```text
//!  write_layer_tar ─▶ ParallelGzip (1 MiB chunks) ─job─▶ Pool threads ─member─┐
//!                        ▲  in order, at most `in_flight` chunks per layer     │
//!                        └───────────────── blob file ◀────────────────────────┘
//! ```

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes of layer tar per gzip member: large enough that a member's header, trailer and
/// fresh window cost nothing measurable, small enough that a few in flight per core is
/// little memory.
const CHUNK: usize = 1 << 20;

/// Most chunks one layer has in flight (queued, being compressed or waiting to be written),
/// which bounds its memory to about twice this many chunks.
const MAX_IN_FLIGHT: usize = 16;

/// A chunk to compress and where its member goes.
struct Job {
    data: Vec<u8>,
    reply: SyncSender<io::Result<Vec<u8>>>,
}

/// Threads shared by every layer's [`ParallelGzip`] of one export.
pub(crate) struct Pool {
    jobs: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Pool {
    /// A pool of `threads` compressing threads (at least one).
    pub(crate) fn new(threads: usize) -> io::Result<Self> {
        let threads = threads.max(1);
        // A job queued per thread keeps every thread busy while writers wait on members.
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..threads)
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("gzip-{i}"))
                    .spawn(move || work(&rx))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Pool {
            jobs: Some(tx),
            threads: handles,
            // Enough to keep every thread busy for one layer, and some members ready to write.
            in_flight: (threads + 2).min(MAX_IN_FLIGHT),
        })
    }

    /// A gzip writer into `inner` whose chunks this pool compresses.
    pub(crate) fn writer<W: Write>(&self, inner: W) -> ParallelGzip<W> {
        ParallelGzip {
            inner,
            jobs: self.jobs.clone(),
            buf: Vec::with_capacity(CHUNK),
            pending: VecDeque::new(),
            in_flight: self.in_flight,
            members: 0,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The threads end when the queue is closed and empty.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn work(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(job) = job else { return };
        // The writer is gone when its export failed: its member is not wanted.
        let _ = job.reply.send(compress(&job.data));
    }
}

fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::default(),
    );
    gz.write_all(data)?;
    gz.finish()
}

/// A [`Write`] that gzips into `inner` as concatenated members, compressed by a [`Pool`].
/// Call [`ParallelGzip::finish`]: dropped without it, the output is cut short.
pub(crate) struct ParallelGzip<W: Write> {
    inner: W,
    jobs: Option<SyncSender<Job>>,
    buf: Vec<u8>,
    /// One receiver per chunk sent and not yet written, oldest first.
    pending: VecDeque<Receiver<io::Result<Vec<u8>>>>,
    in_flight: usize,
    members: u64,
}

impl<W: Write> std::fmt::Debug for ParallelGzip<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelGzip")
            .field("pending", &self.pending.len())
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl<W: Write> ParallelGzip<W> {
    /// Compress what is buffered, write every member, and return the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        // An empty input still makes one (empty) member: zero members is not gzip.
        if !self.buf.is_empty() || self.members == 0 {
            self.submit()?;
        }
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        Ok(self.inner)
    }

    /// Send the buffered chunk to the pool, first writing members until fewer than
    /// `in_flight` chunks are out.
    fn submit(&mut self) -> io::Result<()> {
        while self.pending.len() >= self.in_flight {
            self.write_oldest()?;
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let (reply, rx) = sync_channel(1);
        self.jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("the gzip pool is closed"))?
            .send(Job { data, reply })
            .map_err(|_| io::Error::other("the gzip threads have exited"))?;
        self.pending.push_back(rx);
        self.members += 1;
        // Write what is already done, so that finished members do not wait for `finish`.
        while let Some(rx) = self.pending.front() {
            match rx.try_recv() {
                Ok(member) => {
                    self.pending.pop_front();
                    self.inner.write_all(&member?)?;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(thread_died()),
            }
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some(rx) = self.pending.pop_front() else {
            return Ok(());
        };
        let member = rx.recv().map_err(|_| thread_died())??;
        self.inner.write_all(&member)
    }
}

/// A pool thread dropped a job without replying: it panicked.
fn thread_died() -> io::Error {
    io::Error::other("a gzip thread stopped without compressing its chunk")
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.submit()?;
        }
        Ok(n)
    }

    /// Flushes `inner` only: a partial chunk waits for more (a member per flush would make
    /// the ratio depend on the caller's buffering).
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(input: &[u8], threads: usize) -> (Vec<u8>, usize) {
        let pool = Pool::new(threads).unwrap();
        let mut w = pool.writer(Vec::new());
        // Odd write sizes, so chunks straddle writes.
        for part in input.chunks(333_333) {
            w.write_all(part).unwrap();
        }
        let members = usize::try_from(w.members).unwrap();
        let out = w.finish().unwrap();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(out.as_slice())
            .read_to_end(&mut back)
            .unwrap();
        (back, members.max(1))
    }

    #[test]
    fn members_decompress_to_the_input_in_order() {
        let input: Vec<u8> = (0..5 * CHUNK + 12_345)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for threads in [1, 3] {
            let (back, members) = roundtrip(&input, threads);
            assert!(members >= 5, "{members}");
            assert!(back == input, "{threads} threads");
        }
    }

    #[test]
    fn empty_input_is_one_valid_member() {
        let (back, _) = roundtrip(&[], 2);
        assert!(back.is_empty());
        let pool = Pool::new(1).unwrap();
        let out = pool.writer(Vec::new()).finish().unwrap();
        assert_eq!(&out[..2], &[0x1f, 0x8b]);
    }
}
