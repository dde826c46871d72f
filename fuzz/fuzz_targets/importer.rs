//! A hostile splitfdstream and its content fds into `LayerImporter`, on a fresh insecure
//! repository per input (on tmpfs, removed afterwards, so inputs stay independent).
//!
//! Input: a mode byte, a size-skew byte, then the ops of `splitfdstream_fuzz::archive`. The
//! mode picks the path: through `Reader` and `check_file_fd` as `pull` does, or straight into
//! the importer (its own tar tracker and size checks are then the only defence); `file` or
//! `file_batched`, with or without a body pool, trusted or untrusted sources, a small window,
//! SHA-256 or SHA-512, a pipe in place of a memfd, a wrong diff_id. The skew byte gives one
//! content fd a wrong size.
//!
//! Checks: no panic, no hang. An import succeeds only with the diff_id this target computed
//! itself over the bytes it fed (inline bytes and each content fd's first `size` bytes), only
//! when every content fd was a regular file of exactly the announced size, and the stored
//! splitstream then reads back as exactly that tar.
#![no_main]

use std::os::fd::{AsFd, OwnedFd};

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use splitfdstream::proto::stream;
use splitfdstream::repo::oci::LAYER_CONTENT_TYPE;
use splitfdstream::repo::{
    BodyPool, HashAlg, LayerImporter, RepoOptions, Repository, SourceTrust, SplitStreamReader,
    with_body_pool,
};
use splitfdstream_fuzz::archive::{self, Built};
use splitfdstream_fuzz::check::{self, End, Event};
use splitfdstream_fuzz::input::Cursor;
use splitfdstream_fuzz::ops::Op;
use splitfdstream_fuzz::scratch::{self, ScratchDir};

/// Mode bits.
const DIRECT: u8 = 1;
const PLAIN_FILE: u8 = 2;
const TRUSTED: u8 = 4;
const WRONG_DIFF_ID: u8 = 8;
const SHA256_REPO: u8 = 16;
const POOL: u8 = 32;
const SMALL_WINDOW: u8 = 64;
const PIPE: u8 = 128;

/// One content fd as handed to the importer.
struct Content {
    fd: OwnedFd,
    /// What a positional read of `[0, size)` returns, when the fd holds that many bytes.
    bytes: Vec<u8>,
    /// Whether the fd is a regular file of exactly the size the stream announces.
    exact: bool,
}

/// Make the content fd of every reference: a memfd of the body (one of them resized by the
/// skew byte, or a pipe).
fn contents(built: &Built, mode: u8, skew: u8, trusted: bool) -> Vec<Content> {
    let skewed = (skew & 0x80 != 0).then_some(u64::from(skew & 7));
    let pipe = (mode & PIPE != 0).then_some(skewed.unwrap_or(0));
    built
        .bodies
        .iter()
        .map(|b| {
            let data = b.data.as_deref().unwrap_or_default();
            if pipe == Some(b.index) {
                return Content {
                    fd: scratch::pipe_with(data),
                    bytes: Vec::new(),
                    exact: false,
                };
            }
            let mut len = data.len() as u64;
            if skewed == Some(b.index) {
                len = if skew & 0x40 != 0 {
                    len + 1
                } else {
                    len.saturating_sub(1)
                };
            }
            let fd = scratch::memfd(data, len);
            if trusted {
                // Owned by us and writable by nobody else: a source the importer may hash
                // before cloning.
                rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o644)).expect("fchmod");
            }
            let mut bytes = data[..data.len().min(len as usize)].to_vec();
            bytes.resize(len as usize, 0);
            Content {
                fd,
                bytes,
                exact: len == b.size,
            }
        })
        .collect()
}

/// What feeding the importer produced.
struct Fed {
    /// The tar as this target saw it: inline bytes and content fd bytes.
    tar: Vec<u8>,
    /// A content fd was short, long or not a regular file.
    inexact: bool,
    /// The stream ended and the importer took every item; `finish` may be called.
    complete: bool,
}

/// Through the reader, as `pull` does: inline items to `inline`, references checked with
/// `check_file_fd`, then to `file`/`file_batched`.
fn through_reader(
    built: &Built,
    fds: &[Content],
    importer: &mut LayerImporter<'_>,
    mode: u8,
    pool: Option<&BodyPool<'_>>,
) -> Fed {
    let mut fed = Fed {
        tar: Vec::new(),
        inexact: false,
        complete: false,
    };
    let drained = check::drain(&built.stream, Some(built), |event| match event {
        Event::Inline(d) => {
            fed.tar.extend_from_slice(d);
            importer.inline(d).is_ok()
        }
        Event::Fd { index, size } => {
            let Some(c) = fds.get(index as usize) else {
                return false; // no such fd received: the client stops here
            };
            if stream::check_file_fd(c.fd.as_fd(), index, size, 0).is_err() {
                return false;
            }
            assert_eq!(
                c.bytes.len() as u64,
                size,
                "check_file_fd let a bad fd through"
            );
            fed.tar.extend_from_slice(&c.bytes);
            feed_file(importer, c, size, mode, pool)
        }
    });
    fed.complete = matches!(drained.end, End::Clean);
    fed
}

/// Straight into the importer: chunks decoded by prefix alone, references resolved to the
/// content fds by index with the size the stream was built with.
fn direct(
    built: &Built,
    fds: &[Content],
    importer: &mut LayerImporter<'_>,
    mode: u8,
    pool: Option<&BodyPool<'_>>,
) -> Fed {
    let mut fed = Fed {
        tar: Vec::new(),
        inexact: false,
        complete: false,
    };
    let mut s = built.stream.as_slice();
    while !s.is_empty() {
        let Some((prefix, rest)) = s.split_first_chunk::<8>() else {
            return fed;
        };
        s = rest;
        let prefix = i64::from_le_bytes(*prefix);
        if prefix < 0 {
            let len = usize::try_from(prefix.unsigned_abs()).unwrap_or(usize::MAX);
            if len > s.len() {
                return fed;
            }
            let (data, rest) = s.split_at(len);
            s = rest;
            fed.tar.extend_from_slice(data);
            if importer.inline(data).is_err() {
                return fed;
            }
        } else {
            let Some(body) = built.bodies.get(prefix as usize) else {
                return fed;
            };
            let c = &fds[prefix as usize];
            if !c.exact {
                fed.inexact = true;
            }
            let have = c.bytes.len().min(body.size as usize);
            fed.tar.extend_from_slice(&c.bytes[..have]);
            if !feed_file(importer, c, body.size, mode, pool) {
                return fed;
            }
        }
    }
    fed.complete = true;
    fed
}

/// Hand one content fd to the importer; whether it took it.
fn feed_file(
    importer: &mut LayerImporter<'_>,
    c: &Content,
    size: u64,
    mode: u8,
    pool: Option<&BodyPool<'_>>,
) -> bool {
    if mode & PLAIN_FILE != 0 {
        importer.file(c.fd.as_fd(), size).is_ok()
    } else {
        let fd = c.fd.try_clone().expect("dup of a content fd");
        importer.file_batched(fd, size, pool).is_ok()
    }
}

/// Import, finish, and check the outcome.
fn import(repo: &Repository, built: &Built, mode: u8, skew: u8, pool: Option<&BodyPool<'_>>) {
    let trusted = mode & TRUSTED != 0;
    let fds = contents(built, mode, skew, trusted);
    let mut importer = LayerImporter::new(repo).expect("a new importer");
    if trusted {
        importer.set_source_trust(SourceTrust::Owners {
            uid: rustix::process::getuid().as_raw(),
        });
    }
    if mode & SMALL_WINDOW != 0 {
        importer.set_window_files(1 + usize::from(skew >> 3 & 3));
    }
    let fed = if mode & DIRECT != 0 {
        direct(built, &fds, &mut importer, mode, pool)
    } else {
        through_reader(built, &fds, &mut importer, mode, pool)
    };
    if !fed.complete {
        return;
    }
    let sha = format!("sha256:{}", hex::encode(Sha256::digest(&fed.tar)));
    let diff_id = if mode & WRONG_DIFF_ID != 0 {
        format!("sha256:{}", hex::encode(Sha256::digest(sha.as_bytes())))
    } else {
        sha
    };
    let Ok((id, stats)) = importer.finish_with_stats(&diff_id) else {
        return;
    };
    assert!(mode & WRONG_DIFF_ID == 0, "imported under a wrong diff_id");
    assert!(
        !fed.inexact,
        "imported although a content fd had the wrong size or type"
    );
    assert_eq!(stats.tar_bytes, fed.tar.len() as u64, "tar bytes counted");
    let mut back = Vec::new();
    SplitStreamReader::open(repo, &id, Some(LAYER_CONTENT_TYPE))
        .expect("the stored splitstream opens")
        .cat(repo, &mut back)
        .expect("the stored splitstream reads back");
    assert!(
        back == fed.tar,
        "the stored layer is not the tar that was verified"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let mode = c.u8();
    let skew = c.u8();
    let ops = Op::decode_all(&mut c);
    let built = archive::build(&ops);
    let dir = ScratchDir::new("importer");
    let hash = if mode & SHA256_REPO != 0 {
        HashAlg::Sha256
    } else {
        HashAlg::Sha512
    };
    let repo = Repository::open_or_create(
        &dir.path().join("repo"),
        &RepoOptions {
            hash: Some(hash),
            insecure: true,
        },
    )
    .expect("a scratch repository");
    if mode & POOL != 0 {
        with_body_pool(&repo, 2, |pool| {
            import(&repo, &built, mode, skew, Some(pool))
        });
    } else {
        import(&repo, &built, mode, skew, None);
    }
});
