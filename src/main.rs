//! The `splitfdstream` command line (see `splitfdstream --help`).
#![deny(unsafe_code)]

use std::os::fd::OwnedFd;
use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    cli::main()
}

/// Take ownership of the socket inherited as `--socket-fd N`.
///
/// The binary's one `unsafe` block (the library has one more, for SIMD SHA-512): an fd
/// number received on the command line can only
/// become an `OwnedFd` through `from_raw_fd`. It is checked first to be open and a socket, and
/// nothing else in the helper process uses that number (the library never touches stdin).
#[allow(unsafe_code)]
pub(crate) fn adopt_socket_fd(n: i32) -> anyhow::Result<OwnedFd> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    anyhow::ensure!(n >= 0, "--socket-fd {n}: not a file descriptor number");
    // SAFETY: `n` is only borrowed for the duration of these checks; fcntl/fstat on a closed
    // number fail with EBADF rather than touching another object.
    let borrowed = unsafe { BorrowedFd::borrow_raw(n) };
    rustix::io::fcntl_getfd(borrowed).map_err(|e| anyhow::anyhow!("--socket-fd {n}: {e}"))?;
    let st = rustix::fs::fstat(borrowed).map_err(|e| anyhow::anyhow!("--socket-fd {n}: {e}"))?;
    anyhow::ensure!(
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket,
        "--socket-fd {n}: not a socket"
    );
    // SAFETY: the fd is open (checked above), was inherited for exactly this purpose, and no
    // other owner exists in this process, so taking ownership cannot double-close it.
    let owned = unsafe { OwnedFd::from_raw_fd(n) };
    // Make sure the socket does not leak into anything the helper might execute.
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}
