//! # splitfdstream
//!
//! Move container image layers out of local container storage without re-serialising their file
//! data. A layer travels as a **splitfdstream**: the original tar bytes with every regular-file
//! body replaced by a reference to an open file descriptor passed with `SCM_RIGHTS`. The receiver
//! can reflink (`FICLONE`) or `copy_file_range` each body, and still rebuild the exact layer tar.
//!
//! ```text
//!  parent process (CLI / library user)             helper process (same binary, re-exec'd)
//!  ┌──────────────────────────────┐  socketpair   ┌───────────────────────────────────────┐
//!  │ client::Proxy                │  SOCK_STREAM  │ helper: `splitfdstream helper`         │
//!  │  open_image / get_layer ─────────────────────▶│  containers-storage (overlay), OCI     │
//!  │   ◀── pipe: splitfdstream ───│ JSON-RPC 2.0 +│  tar-split → exact tar bytes inline,   │
//!  │   ◀── fds, ≤253 per batch ───│  SCM_RIGHTS   │  bodies opened with openat2(BENEATH…)  │
//!  │ sinks: repo (composefs), tar │               └───────────────────────────────────────┘
//!  └──────────────────────────────┘
//! ```
//!
//! Modules mirror that shape: [`proto`] holds the wire formats (and imports nothing else from
//! the crate), [`helper`] the serving side, [`client`] the parent side, [`repo`] the composefs
//! repository writer and [`pull`] the import pipeline that joins them. [`imageproxy`] serves
//! skopeo's image proxy protocol on top of [`client`].
// No `unsafe` but one audited block: the SIMD SHA-512 entry (`repo::fsverity::sha512x8`),
// which needs it only to enter code compiled for a CPU feature it has just detected.
#![deny(unsafe_code)]

pub mod client;
pub mod export;
pub mod helper;
pub mod imageproxy;
pub mod proto;
pub mod pull;
pub mod repo;
pub mod sink;
pub mod unpack;
pub mod userns;
