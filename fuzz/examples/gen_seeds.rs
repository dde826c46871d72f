//! Write seed inputs for every fuzz target from real layers: the containers-storage store and
//! OCI layouts that `tests/fixtures/build-fixtures.sh` builds with buildah, podman and skopeo.
//!
//! ```text
//! cargo run --release --example gen_seeds -- FIXTURES [--extra]
//! ```
//!
//! FIXTURES is that script's output directory (`graph/`, `run/`, `oci-plain/`, …; `cargo test`
//! builds it as `target/tmp/fixtures`). Layers are read through the library's own backends, the
//! way the helper serves them, and only read.
//!
//! - `seeds/<target>/`: the committed seeds, each at most 16 KiB (layers are cut at an entry
//!   boundary and closed with end-of-archive blocks), plus synthetic ones that need no fixtures.
//! - `regressions/stream_reader/offset-overflow-1065`: the crafted input of issue 8.
//! - with `--extra`, `corpus/<target>/` (not committed) gets every layer of every image, each
//!   up to 1 MiB.
//!
//! Regular-file bodies keep their size but only their first 64 bytes: the targets fill the
//! rest, so a seed stays small whatever the file.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use splitfdstream::helper::cstor::CstorBackend;
use splitfdstream::helper::oci_layout::OciBackend;
use splitfdstream::helper::{Backend, LayerSink, OpenedImage};
use splitfdstream::proto::rpc::{self, OpenImageResult};
use splitfdstream::proto::source::Store;
use splitfdstream::proto::stream::Writer;
use splitfdstream::proto::tar::{Position, Tracker};
use splitfdstream_fuzz::archive::{self, BODY_CAP};
use splitfdstream_fuzz::header::{self, BLOCK, Checksum, Format, Header, SizeEncoding};
use splitfdstream_fuzz::ops::{self, Entry, Long, Op, Pax, Record, Sparse};

/// Largest committed seed: a few layers' worth of headers is plenty to start from, and the
/// repository stays small.
const SEED_MAX: usize = 16 << 10;
/// Largest extra (uncommitted) seed.
const EXTRA_MAX: usize = 1 << 20;
/// Bytes of each regular-file body kept.
const HEAD: usize = 64;
/// Inline threshold the helper is asked for (the RPC default).
const THRESHOLD: u64 = rpc::DEFAULT_INLINE_THRESHOLD;

/// Images of the store, and how many of their layers to commit seeds for.
const STORE_IMAGES: &[(&str, usize)] = &[
    ("localhost/basic:latest", 3),
    ("localhost/odd:latest", 3),
    ("localhost/old:latest", 1),
    ("localhost/big:latest", 1),
    ("localhost/many:latest", 1),
];

/// OCI layouts and tags for the `oci_layout` seeds, and how many of their layers to commit.
const LAYOUTS: &[(&str, &str, usize)] = &[
    ("oci-plain", "basic", 3),
    ("oci-gzip", "odd", 3),
    ("oci-zstd", "basic", 1),
    ("oci-plain", "odd", 0),
];

/// What the layer sink received.
#[derive(Debug)]
enum Seg {
    Bytes(Vec<u8>),
    Fd { size: u64, head: Vec<u8> },
}

/// A [`LayerSink`] that keeps inline bytes and the head of every body.
#[derive(Default)]
struct Capture {
    segs: Vec<Seg>,
}

impl LayerSink for Capture {
    fn inline(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self.segs.last_mut() {
            Some(Seg::Bytes(b)) => b.extend_from_slice(data),
            _ => self.segs.push(Seg::Bytes(data.to_vec())),
        }
        Ok(())
    }

    fn file(&mut self, fd: OwnedFd, size: u64, _crc64: Option<u64>) -> std::io::Result<()> {
        let mut head = vec![0u8; HEAD.min(size as usize)];
        File::from(fd).read_exact(&mut head)?;
        self.segs.push(Seg::Fd { size, head });
        Ok(())
    }
}

/// A piece of a layer tar.
#[derive(Debug, Clone)]
enum Piece {
    /// A header block (checksum valid as it stands).
    Header(Box<[u8; BLOCK]>),
    /// An old GNU sparse extension block.
    SparseExt(Box<[u8; BLOCK]>),
    /// Other inline bytes (padding, extension records, trailer).
    Bytes(Vec<u8>),
    /// A regular-file body: its size, first bytes, and whether it came as an fd.
    Body { size: u64, head: Vec<u8>, fd: bool },
}

/// Split a captured layer into entries (each ending at an entry boundary; the trailer is the
/// last), following the tar with the library's tracker.
fn entries(segs: &[Seg]) -> anyhow::Result<Vec<Vec<Piece>>> {
    let mut t = Tracker::new();
    let mut groups = vec![Vec::new()];
    let push_bytes = |g: &mut Vec<Piece>, b: &[u8]| match g.last_mut() {
        Some(Piece::Bytes(v)) => v.extend_from_slice(b),
        _ => g.push(Piece::Bytes(b.to_vec())),
    };
    for seg in segs {
        match seg {
            Seg::Fd { size, head } => {
                ensure_body(&t, *size)?;
                t.skip_file_body()?;
                let g = groups.last_mut().expect("one group");
                g.push(Piece::Body {
                    size: *size,
                    head: head.clone(),
                    fd: true,
                });
            }
            Seg::Bytes(buf) => {
                let mut i = 0;
                while i < buf.len() {
                    let g = groups.last_mut().expect("one group");
                    let rest = &buf[i..];
                    if t.in_trailer() {
                        push_bytes(g, rest);
                        t.feed(rest)?;
                        i = buf.len();
                        continue;
                    }
                    let at_block = t.offset().is_multiple_of(BLOCK as u64);
                    if let Some(size) = t.file_body_start().filter(|&s| s <= rest.len() as u64) {
                        let size_usize = size as usize;
                        g.push(Piece::Body {
                            size,
                            head: rest[..size_usize.min(HEAD)].to_vec(),
                            fd: false,
                        });
                        t.skip_file_body()?;
                        i += size_usize;
                    } else if at_block
                        && rest.len() >= BLOCK
                        && matches!(
                            t.position(),
                            Position::Header | Position::AfterExtension | Position::SparseExtension
                        )
                    {
                        let block: [u8; BLOCK] = rest[..BLOCK].try_into().expect("a block");
                        let sparse = t.position() == Position::SparseExtension;
                        t.feed(&block)?;
                        g.push(if sparse {
                            Piece::SparseExt(Box::new(block))
                        } else if t.in_trailer() {
                            Piece::Bytes(block.to_vec())
                        } else {
                            Piece::Header(Box::new(block))
                        });
                        i += BLOCK;
                    } else {
                        t.feed(&rest[..1])?;
                        push_bytes(g, &rest[..1]);
                        i += 1;
                    }
                    if t.at_clean_end() && !t.in_trailer() {
                        groups.push(Vec::new());
                    }
                }
            }
        }
        if t.at_clean_end() && !t.in_trailer() && !groups.last().is_some_and(Vec::is_empty) {
            groups.push(Vec::new());
        }
    }
    groups.retain(|g| !g.is_empty());
    Ok(groups)
}

fn ensure_body(t: &Tracker, size: u64) -> anyhow::Result<()> {
    if t.file_body_start() != Some(size) {
        bail!("an fd of {size} bytes where the tar has no such body");
    }
    Ok(())
}

/// Whether a group is the trailer (end-of-archive blocks and what follows).
fn is_trailer(g: &[Piece]) -> bool {
    matches!(g.first(), Some(Piece::Bytes(b)) if b.len() >= BLOCK && b[..BLOCK].iter().all(|&x| x == 0))
}

/// Whole entries from the start while they fit `max` (less room for end blocks), then the
/// layer's own trailer, or two zero blocks when it was cut. `size` is an entry's encoded size
/// on its own (exact for ops, which encode one by one; an upper bound for streams, whose
/// inline chunks merge across entries).
fn cut(groups: &[Vec<Piece>], max: usize, size: impl Fn(&[Piece]) -> usize) -> Vec<Vec<Piece>> {
    let room = max - 2 * BLOCK - 64;
    let mut out = Vec::new();
    let mut used = 0;
    for g in groups {
        if is_trailer(g) {
            break;
        }
        used += size(g);
        if used > room {
            break;
        }
        out.push(g.clone());
    }
    match groups.last() {
        Some(t) if is_trailer(t) && out.len() + 1 == groups.len() && used + size(t) <= max => {
            out.push(t.clone())
        }
        _ => out.push(vec![Piece::Bytes(vec![0; 2 * BLOCK])]),
    }
    out
}

/// The splitfdstream of `groups`: bodies that came as fds as references.
fn to_stream(groups: &[Vec<Piece>]) -> Vec<u8> {
    let mut w = Writer::new(Vec::new());
    let mut refs = 0;
    let mut pending = Vec::new();
    for p in groups.iter().flatten() {
        match p {
            Piece::Header(b) | Piece::SparseExt(b) => pending.extend_from_slice(&b[..]),
            Piece::Bytes(b) => pending.extend_from_slice(b),
            Piece::Body { size, head, fd } => {
                if *fd {
                    w.write_inline(&pending).expect("writing to a Vec");
                    pending.clear();
                    w.write_fd_ref(refs).expect("in order");
                    refs += 1;
                } else {
                    let mut body = head.clone();
                    body.resize(*size as usize, 0);
                    pending.extend_from_slice(&body);
                }
            }
        }
    }
    w.write_inline(&pending).expect("writing to a Vec");
    w.into_inner().expect("writing to a Vec")
}

/// The archive ops of `groups`; `as_fd` decides which bodies become references.
fn to_ops(groups: &[Vec<Piece>], as_fd: impl Fn(bool) -> bool) -> Vec<Op> {
    let mut ops = Vec::new();
    for p in groups.iter().flatten() {
        match p {
            Piece::Header(b) => ops.push(Op::RawBlock {
                fix: 1,
                block: b.clone(),
            }),
            Piece::SparseExt(b) => ops.push(Op::RawBlock {
                fix: 0,
                block: b.clone(),
            }),
            Piece::Bytes(b) => {
                for c in b.chunks(u16::MAX as usize) {
                    ops.push(Op::RawBytes(c.to_vec()));
                }
            }
            Piece::Body { size, head, fd } => ops.push(Op::Body {
                // Bit 1: the padding is in the bytes that follow.
                flags: 2 | u8::from(as_fd(*fd)),
                size: *size,
                data: head.clone(),
                fill: 0,
            }),
        }
    }
    ops
}

/// Drop entries whose body is too large for a target to make (it makes bodies up to
/// [`BODY_CAP`]), so that the tar stays whole.
fn small_bodies(groups: &[Vec<Piece>]) -> Vec<Vec<Piece>> {
    groups
        .iter()
        .filter(|g| {
            g.iter()
                .all(|p| !matches!(p, Piece::Body { size, .. } if *size > BODY_CAP))
        })
        .cloned()
        .collect()
}

struct Out {
    root: PathBuf,
    extra: bool,
    written: usize,
}

impl Out {
    fn seed(&mut self, target: &str, name: &str, data: &[u8]) -> anyhow::Result<()> {
        assert!(
            data.len() <= SEED_MAX,
            "seed {target}/{name} is {} bytes",
            data.len()
        );
        self.write(&self.root.join("seeds").join(target), name, data)
    }

    fn extra(&mut self, target: &str, name: &str, data: &[u8]) -> anyhow::Result<()> {
        if self.extra {
            self.write(&self.root.join("corpus").join(target), name, data)?;
        }
        Ok(())
    }

    fn write(&mut self, dir: &Path, name: &str, data: &[u8]) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
        self.written += 1;
        Ok(())
    }
}

/// Options prefix of the `importer` target: through the reader, batched, SHA-512, no skew.
const IMPORTER_PLAIN: [u8; 2] = [0, 0];

/// Seeds of one captured layer for the tar-level targets.
fn layer_seeds(out: &mut Out, name: &str, segs: &[Seg], commit: bool) -> anyhow::Result<()> {
    let groups = entries(segs).with_context(|| format!("splitting {name}"))?;
    let ops_size = |g: &[Piece]| ops::encode_ops(&to_ops(&[g.to_vec()], |fd| fd)).len();
    let stream_size = |g: &[Piece]| to_stream(&[g.to_vec()]).len();
    let small = small_bodies(&groups);
    for (max, keep) in [(SEED_MAX, commit), (EXTRA_MAX, false)] {
        let write = |out: &mut Out, target: &str, data: &[u8]| {
            if keep {
                out.seed(target, name, data)
            } else if max == EXTRA_MAX {
                out.extra(target, name, data)
            } else {
                Ok(())
            }
        };
        let stream = to_stream(&cut(&groups, max, stream_size));
        write(out, "stream_reader", &stream)?;
        let tar_ops = ops::encode_ops(&to_ops(&cut(&groups, max, ops_size), |fd| fd));
        write(out, "tar_stream", &tar_ops)?;
        let imp = cut(&small, max - 2, ops_size);
        let mut input = IMPORTER_PLAIN.to_vec();
        input.extend(ops::encode_ops(&to_ops(&imp, |fd| fd)));
        write(out, "importer", &input)?;
    }
    Ok(())
}

fn store_seeds(out: &mut Out, fixtures: &Path) -> anyhow::Result<Option<OpenedImage>> {
    let store = Store::ContainersStorage {
        driver: Some("overlay".into()),
        graphroot: Some(fixtures.join("graph")),
        runroot: Some(fixtures.join("run")),
    };
    let backend = CstorBackend::open(&store)?;
    let mut basic = None;
    for &(reference, commit_layers) in STORE_IMAGES {
        let image = backend
            .open_image(reference)
            .with_context(|| format!("opening {reference}"))?;
        let short = reference
            .trim_start_matches("localhost/")
            .trim_end_matches(":latest");
        for index in 0..image.layers.len() {
            let mut cap = Capture::default();
            backend.stream_layer(&image, index, THRESHOLD, &mut cap)?;
            let name = format!("{short}-{index}");
            layer_seeds(out, &name, &cap.segs, index < commit_layers)?;
        }
        if short == "basic" {
            basic = Some(image);
        }
    }
    Ok(basic)
}

fn layout_seeds(out: &mut Out, fixtures: &Path) -> anyhow::Result<()> {
    for &(dir, tag, commit_layers) in LAYOUTS {
        let backend = OciBackend::open(&fixtures.join(dir))?;
        let image = backend
            .open_image(tag)
            .with_context(|| format!("opening {dir}:{tag}"))?;
        for index in 0..image.layers.len() {
            let mut cap = Capture::default();
            backend.stream_layer(&image, index, THRESHOLD, &mut cap)?;
            let groups = small_bodies(&entries(&cap.segs)?);
            let compression = match dir {
                "oci-gzip" => 1,
                "oci-zstd" => 2,
                _ => 0,
            };
            // Reference by tag; everything else right.
            let prefix = [compression | 1 << 4, 0, 0];
            let ops_size = |g: &[Piece]| ops::encode_ops(&to_ops(&[g.to_vec()], |_| false)).len();
            for (max, commit) in [(SEED_MAX, index < commit_layers), (EXTRA_MAX, false)] {
                let mut input = prefix.to_vec();
                input.extend(ops::encode_ops(&to_ops(
                    &cut(&groups, max - prefix.len(), ops_size),
                    |_| false,
                )));
                let name = format!("{dir}-{tag}-{index}");
                if commit {
                    out.seed("oci_layout", &name, &input)?;
                } else if max == EXTRA_MAX {
                    out.extra("oci_layout", &name, &input)?;
                }
            }
        }
    }
    Ok(())
}

/// A ustar header of a regular file whose size field is `size` in base-256.
fn base256_file(name: &[u8], size: u64) -> [u8; BLOCK] {
    Header {
        name,
        typeflag: b'0',
        size: header::size_field(size, SizeEncoding::Base256).0,
        format: Format::Ustar,
        prefix: b"",
        checksum: Checksum::Unsigned,
        gnu_extended: false,
    }
    .block()
}

/// Issue 8's input: two ustar headers with base-256 size 2^63 − 1, each followed by an fd
/// reference (1,065 bytes). The tar offset after the second reference exceeds `u64`.
fn offset_overflow() -> Vec<u8> {
    let huge = i64::MAX as u64;
    let mut w = Writer::new(Vec::new());
    w.write_inline(&base256_file(b"a", huge)).expect("Vec");
    w.write_fd_ref(0).expect("in order");
    w.write_inline(&[0]).expect("Vec"); // padding: (2^63 - 1) % 512 = 511
    w.write_inline(&base256_file(b"b", huge)).expect("Vec");
    w.write_fd_ref(1).expect("in order");
    let s = w.into_inner().expect("Vec");
    assert_eq!(s.len(), 1065);
    s
}

/// Seeds made from ops alone: one of each construct, well-formed.
fn synthetic() -> Vec<(&'static str, Vec<Op>)> {
    let file = |size_sel: u8, size: u64, flags: u8| {
        Op::Entry(Entry {
            typesel: 0,
            flags,
            size_sel,
            size,
            name: 0,
            fill: b'f',
        })
    };
    let end = Op::End {
        blocks: 1,
        trailer: Vec::new(),
    };
    let pax = |flags: u8, records: Vec<Record>| Op::Pax(Pax { flags, records });
    let record = |key: u8, val_sel: u8, val: u64| Record {
        key,
        val_sel,
        val,
        len_sel: 0,
    };
    vec![
        (
            "files",
            vec![
                file(3 << 3, 5, 0x20),
                file(3 << 3, 0, 0),
                file(3 << 3 | 3, 700, 0x20),
                file(3 << 3 | 2, 70, 0),
                end.clone(),
            ],
        ),
        (
            "types",
            (0..16u8)
                .map(|t| {
                    Op::Entry(Entry {
                        typesel: t,
                        flags: 0,
                        size_sel: 3 << 3,
                        size: 100,
                        name: t,
                        fill: b't',
                    })
                })
                .chain([end.clone()])
                .collect(),
        ),
        (
            "pax",
            vec![
                pax(1, vec![record(6, 0, 5)]),
                pax(
                    0,
                    vec![record(0, 0, 600), record(1, 4, 0), record(5, 0, 17)],
                ),
                file(3 << 3, 0, 0x20),
                pax(0, vec![record(1, 4, 1)]),
                Op::Entry(Entry {
                    typesel: 2, // '\0' named by the PAX path "some/dir/": a directory
                    flags: 0,
                    size_sel: 3 << 3,
                    size: 600,
                    name: 0,
                    fill: 0,
                }),
                end.clone(),
            ],
        ),
        (
            "gnu-long",
            vec![
                Op::Long(Long {
                    flags: 8,
                    len: 150,
                    fill: 1,
                }),
                Op::Long(Long {
                    flags: 9,
                    len: 120,
                    fill: 2,
                }),
                file(3 << 3, 100, 0x24),
                end.clone(),
            ],
        ),
        (
            "sparse",
            vec![
                Op::Sparse(Sparse {
                    flags: 0x13,
                    ext: 1,
                    size: 2000,
                    fill: 3,
                }),
                Op::Sparse(Sparse {
                    flags: 0x01,
                    ext: 0,
                    size: 10,
                    fill: 4,
                }),
                end.clone(),
            ],
        ),
        (
            "sizes",
            vec![
                // Octal, full-width octal, spaced octal, base-256, base-256 edge values.
                file(0, 513, 0x20),
                file(1, 511, 0x20),
                file(2, 512, 0),
                file(2 << 3 | 3, 8, 0x20), // (1 << 20) + 1 in base-256
                file(2 << 3 | 4, 0, 0x20), // negative
                end.clone(),
            ],
        ),
        (
            "chunks",
            vec![
                Op::ChunkLen(100),
                file(3 << 3, 1000, 0),
                Op::ChunkLen(1),
                file(3 << 3, 3, 0x20),
                Op::Cut,
                Op::ChunkLen(0),
                Op::End {
                    blocks: 0,
                    trailer: b"trailing bytes".to_vec(),
                },
            ],
        ),
        (
            "huge-fd",
            vec![file(2 << 3 | 3, 12, 0x20), file(3 << 3, 5, 0x20), end],
        ),
    ]
}

fn framing_seeds(
    out: &mut Out,
    repo_root: &Path,
    basic: Option<&OpenedImage>,
) -> anyhow::Result<()> {
    // Every message example of the RPC spec, one seed each, split in the middle.
    let spec = std::fs::read_to_string(repo_root.join("proto/rpc.md"))?;
    let mut n = 0;
    let mut in_block = false;
    let mut block = String::new();
    for line in spec.lines() {
        if in_block {
            if line.starts_with("```") {
                in_block = false;
                if block.trim_start().starts_with('{') {
                    let mut seed = vec![(block.len() / 2).min(255) as u8];
                    seed.extend_from_slice(block.as_bytes());
                    out.seed("framing", &format!("rpc-md-{n:02}"), &seed)?;
                    n += 1;
                }
            } else {
                block.push_str(line);
                block.push('\n');
            }
        } else if line == "```json" || line == "```text" {
            in_block = true;
            block.clear();
        }
    }
    // A real OpenImage reply (without the store path), with fds in the next message.
    if let Some(image) = basic {
        let result = OpenImageResult {
            image: 1,
            image_id: image.image_id.clone(),
            manifest: image.manifest.clone(),
            manifest_digest: image.manifest_digest.clone(),
            config: image.config.clone(),
            config_digest: image.config_digest.clone(),
            layers: image.layers.clone(),
            store_root: None,
        };
        let mut msg = serde_json::to_vec(&rpc::result_message(&serde_json::json!(2), &result))?;
        msg.extend_from_slice(br#" {"jsonrpc":"2.0","id":3,"result":{"count":2,"crc64":[null,"00ff"],"end":null},"fds":2}"#);
        let mut seed = vec![200];
        seed.extend_from_slice(&msg);
        out.seed("framing", "open-image-reply", &seed)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let mut fixtures = None;
    let mut extra = false;
    for a in args.by_ref() {
        if a == "--extra" {
            extra = true;
        } else if fixtures.is_none() {
            fixtures = Some(PathBuf::from(a));
        } else {
            bail!("usage: gen_seeds FIXTURES [--extra]");
        }
    }
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Out {
        root: fuzz_dir.to_owned(),
        extra,
        written: 0,
    };

    std::fs::create_dir_all(fuzz_dir.join("regressions/stream_reader"))?;
    std::fs::write(
        fuzz_dir.join("regressions/stream_reader/offset-overflow-1065"),
        offset_overflow(),
    )?;
    for (name, ops) in synthetic() {
        let input = ops::encode_ops(&ops);
        out.seed("tar_stream", &format!("synthetic-{name}"), &input)?;
        let mut imp = vec![0, 0];
        imp.extend_from_slice(&input);
        out.seed("importer", &format!("synthetic-{name}"), &imp)?;
        out.seed(
            "stream_reader",
            &format!("synthetic-{name}"),
            &archive::build(&ops).stream,
        )?;
        // The OCI backend miscounts old GNU sparse entries (regressions/oci_layout): a seed
        // that fails at once would stop every run.
        if name != "sparse" {
            let mut oci = vec![1 << 4, 0, 0];
            oci.extend_from_slice(&input);
            out.seed("oci_layout", &format!("synthetic-{name}"), &oci)?;
        }
    }

    let basic = match &fixtures {
        Some(f) => {
            let basic = store_seeds(&mut out, f).context("reading the containers-storage store")?;
            layout_seeds(&mut out, f).context("reading the OCI layouts")?;
            basic
        }
        None => {
            eprintln!("gen_seeds: no FIXTURES directory given; writing synthetic seeds only");
            None
        }
    };
    let repo_root = fuzz_dir
        .parent()
        .context("the fuzz directory has a parent")?;
    framing_seeds(&mut out, repo_root, basic.as_ref())?;
    eprintln!("gen_seeds: wrote {} files", out.written);
    Ok(())
}
