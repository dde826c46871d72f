//! A layer stream's producer and the state it shares with the session: the splitfdstream
//! written into a non-blocking pipe, the content fds queued for `GetLayerFds`, and the one
//! cancellation path (`CloseLayer`, `Shutdown`, a hung-up client, the idle timeout) that every
//! wait of the producer observes. See the parent module for the orderings that keep it free
//! of deadlocks.

use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use super::super::{Backend, LayerSink, OpenedImage};
use super::*;
use crate::proto::rpc::StreamEnd;
use crate::proto::stream;

/// Why a stream was stopped before its producer finished.
#[derive(Debug, Clone, Copy)]
pub(super) enum Cancel {
    /// `CloseLayer` before `end`.
    Closed,
    /// The producer waited this long for the client without progress.
    Idle(Duration),
    /// `Shutdown`, or the client hung up.
    SessionEnded,
}

impl fmt::Display for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cancel::Closed => write!(f, "abandoned by the client (CloseLayer)"),
            Cancel::Idle(t) => write!(
                f,
                "cancelled after {t:?} idle: the client read neither the stream's pipe nor its \
                 descriptors for that long (idle timeout)"
            ),
            Cancel::SessionEnded => write!(f, "cancelled: the session ended"),
        }
    }
}

/// The error a cancelled producer's sink returns; the end status names the [`Cancel`] instead.
pub(super) fn cancelled_error() -> io::Error {
    // Not `ErrorKind::Interrupted`: `write_all` retries that kind.
    io::Error::other("layer stream cancelled")
}

#[derive(Debug)]
pub(super) struct StreamState {
    pub(super) queue: VecDeque<(OwnedFd, Option<u64>)>,
    /// Set by the producer thread as the last thing it does, after it dropped its pipe, files
    /// and store lock: `Some` means the producer has stopped.
    pub(super) end: Option<StreamEnd>,
    /// Set once; no fd is queued after it.
    pub(super) cancel: Option<Cancel>,
    /// When the client last received fds: counts as progress for the idle timeout.
    pub(super) last_fds_call: Instant,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) state: Mutex<StreamState>,
    pub(super) changed: Condvar,
    /// Mirrors `state.cancel.is_some()`, for checks between entries without the lock.
    pub(super) cancelled: AtomicBool,
    /// An eventfd, readable once the stream is cancelled: wakes a producer in `poll` on its pipe.
    pub(super) cancel_fd: OwnedFd,
}

impl Shared {
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            state: Mutex::new(StreamState {
                queue: VecDeque::new(),
                end: None,
                cancel: None,
                last_fds_call: Instant::now(),
            }),
            changed: Condvar::new(),
            cancelled: AtomicBool::new(false),
            cancel_fd: rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, StreamState> {
        // A poisoned lock means a producer panicked; the state is still consistent for our use
        // (a queue and flags), so keep serving and let `end` report the failure.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop the stream: the producer's next step (or current wait) fails, and every queued fd
    /// is closed here. Idempotent; the first reason stays.
    pub(super) fn cancel(&self, why: Cancel) {
        let queued = {
            let mut st = self.lock();
            st.cancel.get_or_insert(why);
            std::mem::take(&mut st.queue)
        };
        self.cancelled.store(true, Ordering::Release);
        // eventfd takes an 8-byte counter increment in host byte order (eventfd(2)). It cannot
        // fail short of overflowing the counter, which one write per cancel never reaches.
        let _ = rustix::io::write(&self.cancel_fd, &1u64.to_ne_bytes());
        self.changed.notify_all();
        drop(queued);
    }

    pub(super) fn check_cancelled(&self) -> io::Result<()> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(cancelled_error());
        }
        Ok(())
    }

    /// When a producer blocked since `since` gives up on its client: `idle` after the later of
    /// that and the client's last `GetLayerFds`.
    pub(super) fn idle_deadline(st: &StreamState, since: Instant, idle: Duration) -> Instant {
        since.max(st.last_fds_call) + idle
    }

    /// Cancel for idleness if `deadline` has passed; the producer then stops.
    pub(super) fn expire(&self, deadline: Instant, idle: Duration) -> io::Result<()> {
        if Instant::now() >= deadline {
            self.cancel(Cancel::Idle(idle));
            return Err(cancelled_error());
        }
        Ok(())
    }

    /// Wait until the producer has stopped (`end` set), at most `timeout`; true if it has.
    pub(super) fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.end.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub(super) fn stopped(&self) -> bool {
        self.lock().end.is_some()
    }
}

/// The write end of a layer pipe, non-blocking, written by the producer: a write that finds
/// the pipe full waits in `poll` for pipe space or cancellation, and gives up (cancelling the
/// stream) after the idle timeout without progress.
pub(super) struct PipeWriter<'a> {
    pub(super) pipe: BorrowedFd<'a>,
    pub(super) shared: &'a Shared,
    pub(super) idle: Duration,
}

impl PipeWriter<'_> {
    /// Wait until the pipe is writable (or broken), the stream is cancelled, or the client has
    /// made no progress for the idle time since `since`.
    pub(super) fn wait_writable(&self, since: Instant) -> io::Result<()> {
        loop {
            self.shared.check_cancelled()?;
            let deadline = Shared::idle_deadline(&self.shared.lock(), since, self.idle);
            self.shared.expire(deadline, self.idle)?;
            let left = deadline.saturating_duration_since(Instant::now());
            // Saturates at an absurd idle time rather than failing.
            let timeout = Timespec::try_from(left).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            });
            let mut fds = [
                PollFd::from_borrowed_fd(self.pipe, PollFlags::OUT),
                PollFd::new(&self.shared.cancel_fd, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            // POLLERR (the client closed the read end) counts as writable: the write reports it.
            if !fds[0].revents().is_empty() {
                return self.shared.check_cancelled();
            }
        }
    }
}

impl Write for PipeWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A producer unwinding from a panic flushes its buffer on the way out; it must not wait
        // for a client that may not be reading, or the panic's `end` would wait with it.
        if std::thread::panicking() {
            return Err(cancelled_error());
        }
        let since = Instant::now();
        loop {
            self.shared.check_cancelled()?;
            match rustix::io::write(self.pipe, buf) {
                Ok(n) => return Ok(n),
                Err(Errno::AGAIN) => self.wait_writable(since)?,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes one layer into the pipe and the fd queue.
pub(super) struct PipeSink<'a> {
    pub(super) writer: stream::Writer<PipeWriter<'a>>,
    /// The pipe `writer` writes, to see the client read it while the producer waits for the
    /// window.
    pub(super) pipe: BorrowedFd<'a>,
    pub(super) shared: &'a Shared,
    pub(super) window: usize,
    pub(super) idle: Duration,
    pub(super) fault: Option<Fault>,
    pub(super) fds: u64,
    pub(super) bytes: u64,
}

impl PipeSink<'_> {
    pub(super) fn inject_fault(&self) {
        if self.fault == Some(Fault::ProducerPanic) {
            panic!("injected fault producer-panic (helper --inject-fault, for tests only)");
        }
    }

    /// Wait for room in the fd window. The caller has flushed (ordering 2), so the client can
    /// read every queued fd's reference and will come for them.
    pub(super) fn wait_for_window<'s>(
        &'s self,
        mut st: MutexGuard<'s, StreamState>,
    ) -> io::Result<MutexGuard<'s, StreamState>> {
        // The client reads the references (and the entries between them) of fds it already
        // holds before it asks for more, which can take a while per body: bytes leaving the
        // pipe are progress too. The producer is not writing now, so the pipe only drains.
        let unread = || rustix::io::ioctl_fionread(self.pipe).ok();
        let mut since = Instant::now();
        let mut last_unread = unread();
        while st.queue.len() >= self.window && st.cancel.is_none() {
            let deadline = Shared::idle_deadline(&st, since, self.idle);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                self.shared.cancel(Cancel::Idle(self.idle));
                return Err(cancelled_error());
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(self.idle / PIPE_SAMPLES_PER_IDLE))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            let now_unread = unread();
            if now_unread != last_unread {
                last_unread = now_unread;
                since = Instant::now();
            }
        }
        Ok(st)
    }
}

impl LayerSink for PipeSink<'_> {
    fn inline(&mut self, data: &[u8]) -> io::Result<()> {
        self.inject_fault();
        self.shared.check_cancelled()?;
        self.bytes += data.len() as u64;
        self.writer.write_inline(data)
    }

    fn file(&mut self, fd: OwnedFd, size: u64, crc64: Option<u64>) -> io::Result<()> {
        self.inject_fault();
        self.shared.check_cancelled()?;
        let mut st = self.shared.lock();
        if st.queue.len() >= self.window {
            drop(st);
            // Ordering 2: everything referenced so far must be readable before we wait.
            self.writer.flush()?;
            st = self.wait_for_window(self.shared.lock())?;
        }
        if st.cancel.is_some() {
            // `fd` closes here; the queue was emptied by the cancel.
            return Err(cancelled_error());
        }
        // Ordering 1: queue the fd, then write its reference.
        st.queue.push_back((fd, crc64));
        drop(st);
        self.shared.changed.notify_all();
        self.writer.write_fd_ref(self.fds)?;
        self.fds += 1;
        self.bytes += size;
        Ok(())
    }

    fn checkpoint(&mut self) -> io::Result<()> {
        self.shared.check_cancelled()
    }
}

/// Everything a producer thread needs.
pub(super) struct Producer {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) image: Arc<OpenedImage>,
    pub(super) index: usize,
    pub(super) threshold: u64,
    pub(super) pipe: OwnedFd,
    pub(super) shared: Arc<Shared>,
    pub(super) window: usize,
    pub(super) idle: Duration,
    pub(super) fault: Option<Fault>,
}

impl Producer {
    /// Produce the layer and publish its end status; never unwinds.
    pub(super) fn run(self) {
        let Producer {
            backend,
            image,
            index,
            threshold,
            pipe,
            shared,
            window,
            idle,
            fault,
        } = self;
        // Everything the producer holds (the pipe's write end, open files, the store's read
        // lock) lives inside this closure, so it is released, by return or by unwinding,
        // before the end is published: a client that sees `end` also sees EOF, and a panic
        // cannot leave `GetLayerFds` waiting for an end that never comes.
        let produced = std::panic::catch_unwind(AssertUnwindSafe(|| {
            // Moved in, so the write end closes when the closure returns or unwinds.
            let pipe = pipe;
            let mut sink = PipeSink {
                writer: stream::Writer::new(PipeWriter {
                    pipe: pipe.as_fd(),
                    shared: &shared,
                    idle,
                }),
                pipe: pipe.as_fd(),
                shared: &shared,
                window,
                idle,
                fault,
                fds: 0,
                bytes: 0,
            };
            let entries = backend
                .stream_layer(&image, index, threshold, &mut sink)
                .and_then(|entries| {
                    sink.writer
                        .flush()
                        .map(|()| entries)
                        .context("writing layer stream")
                });
            entries.map(|entries| (entries, sink.fds, sink.bytes))
        }));
        let layer = &image.layers[index];
        let failed = |why: String| StreamEnd::Failed {
            message: format!("layer {} ({}): {why}", layer.diff_id, layer.id),
        };
        let mut st = shared.lock();
        let end = match (st.cancel, produced) {
            (Some(why), _) => failed(why.to_string()),
            (None, Ok(Ok((entries, fds, bytes)))) => StreamEnd::Complete {
                entries,
                fds,
                bytes,
            },
            (None, Ok(Err(e))) => failed(format!("{e:#}")),
            (None, Err(panic)) => failed(format!(
                "the helper's producer panicked: {}",
                panic_message(panic.as_ref())
            )),
        };
        if matches!(end, StreamEnd::Failed { .. }) {
            // fds queued before a failure are useless to the client, which must not commit the
            // layer; close them now rather than when the handle is closed.
            st.queue.clear();
        }
        st.end = Some(end);
        drop(st);
        shared.changed.notify_all();
    }
}

pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
