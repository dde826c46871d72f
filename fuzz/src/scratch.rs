//! Content fds and scratch directories for the targets.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::MemfdFlags;
use rustix::pipe::PipeFlags;

/// A memfd holding `data`, then cut or zero-extended to `size` bytes.
///
/// # Panics
/// When the kernel refuses the memfd (out of memory or fds): not the library's fault, but no
/// input can be tested without it.
pub fn memfd(data: &[u8], size: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("fuzz-body", MemfdFlags::CLOEXEC).expect("memfd_create");
    let mut file = File::from(fd);
    let n = data.len().min(usize::try_from(size).unwrap_or(usize::MAX));
    file.write_all(&data[..n]).expect("writing a memfd");
    file.set_len(size).expect("sizing a memfd");
    file.into()
}

/// The read end of a pipe holding up to 4 KiB of `data`, its write end closed (reads end at
/// EOF instead of blocking).
///
/// # Panics
/// When no pipe can be made.
pub fn pipe_with(data: &[u8]) -> OwnedFd {
    let (rd, wr) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).expect("pipe");
    // A pipe buffers at least 4 KiB, so this never blocks.
    let n = data.len().min(4096);
    let mut w = File::from(wr);
    w.write_all(&data[..n]).expect("writing a pipe");
    rd
}

/// A directory removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A new, empty directory on tmpfs (`/dev/shm`) when there is one, else in the temporary
    /// directory; named by `tag`, the process id and a counter, so concurrent fuzzers never
    /// share one.
    ///
    /// # Panics
    /// When the directory cannot be made.
    pub fn new(tag: &str) -> ScratchDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_owned()
        } else {
            std::env::temp_dir()
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!(
            "splitfdstream-fuzz-{tag}-{}-{n}",
            std::process::id()
        ));
        // A leftover of an earlier process with the same pid (killed before its drop ran).
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("creating a scratch directory");
        ScratchDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Objects are made read-only by the repository; removal needs only the directories'
        // write permission, which root and the owner have.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
