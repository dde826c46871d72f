//! Layers whose tar framing is easy to get wrong, made and moved with the real tools: sparse
//! files (GNU tar `--sparse`, twelve data segments: old GNU `--format=gnu`, where an extension
//! block follows the header, and PAX `--format=posix --sparse-version=0.0|0.1|1.0`), and
//! old-style directories (typeflag NUL, name ending in `/`, written by Python's `tarfile`), once
//! with a size field Go ignores. Each tarball becomes an image through `podman import` into a
//! private store (podman refuses old GNU sparse entries; it takes the PAX ones, but its
//! tar-split keeps their expanded files, from which the helper rebuilds the bodies the tar
//! holds) and `skopeo copy` into OCI layouts (uncompressed and gzip); `splitfdstream tar` must
//! rebuild its diff_id from every source, and `splitfdstream pull` must import it so that
//! `cfsctl` checks and rebuilds it. Last, layers whose size fields are hostile must fail with a
//! clear error, not a panic.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures::PrivateStore;
use common::tools::{Unmount, cfs, cfsctl, run};
use common::{Fixtures, TarSink, fixtures};
use sha2::{Digest, Sha256};
use splitfdstream::helper::Backend;
use splitfdstream::helper::oci_layout::OciBackend;
use splitfdstream::repo::{FsVerityHasher, HashAlg};

const BIN: &str = env!("CARGO_BIN_EXE_splitfdstream");

/// Size of each data segment of the sparse file, and the distance between their starts.
const SEGMENT_STRIDE: u64 = 64 << 10;
/// Data segments of the sparse file: more than the four an old GNU header holds.
const SEGMENTS: u64 = 12;

/// A scratch directory on the fixtures' filesystem.
fn scratch(f: &Fixtures, what: &str) -> tempfile::TempDir {
    let base = f.out.join("tar-framing");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(what)
        .tempdir_in(&base)
        .unwrap()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A regular file that becomes an object (over composefs's 64-byte inline limit).
fn regular_content() -> Vec<u8> {
    (0..5000u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// A tree with `sparse`, a file of [`SEGMENTS`] data segments (written with `dd` into a file
/// `truncate` made, so holes lie between them and after the last, and before the first when
/// `hole_first`), `sparse-tail`, a sparse file whose data runs span filesystem blocks and whose
/// last one ends the file, and a regular file.
fn sparse_tree(dir: &Path, hole_first: bool) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let sparse = root.join("sparse");
    // Full size first: writes that extend a file make XFS preallocate past its end, which
    // fills the holes that should lie between the segments.
    run(Command::new("truncate")
        .arg(format!("-s{}", SEGMENTS * SEGMENT_STRIDE + 4096))
        .arg(&sparse));
    let first = if hole_first { 1 } else { 0 };
    for i in first..SEGMENTS {
        let data = dir.join(format!("segment-{i}"));
        std::fs::write(&data, format!("data segment {i}\n").repeat(40)).unwrap();
        run(Command::new("dd")
            .arg(format!("if={}", data.display()))
            .arg(format!("of={}", sparse.display()))
            .args(["bs=512", "conv=notrunc", "status=none"])
            .arg(format!("seek={}", i * SEGMENT_STRIDE / 512)));
    }
    let tail_size = SEGMENTS * SEGMENT_STRIDE;
    let tail = std::fs::File::create(root.join("sparse-tail")).unwrap();
    tail.set_len(tail_size).unwrap();
    for i in 0..SEGMENTS {
        let len = 1000 + i * 1500;
        let at = if i == SEGMENTS - 1 {
            tail_size - len
        } else {
            i * SEGMENT_STRIDE + 3000
        };
        let data: Vec<u8> = (0..len).map(|j| (j % 251 + 1) as u8).collect();
        tail.write_all_at(&data, at).unwrap();
    }
    std::fs::write(root.join("regular"), regular_content()).unwrap();
    root
}

/// `tar --sparse` with `format_args` of [`sparse_tree`]`(dir, hole_first)`.
fn sparse_tar(dir: &Path, format_args: &[&str], hole_first: bool) -> PathBuf {
    let root = sparse_tree(dir, hole_first);
    let tar = dir.join("sparse.tar");
    run(Command::new("tar")
        .args(format_args)
        .args([
            "--sparse",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-cf",
        ])
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg("."));
    tar
}

/// `tar --format=gnu --sparse` of [`sparse_tree`].
fn gnu_sparse_tar(dir: &Path) -> PathBuf {
    let tar = sparse_tar(dir, &["--format=gnu"], false);
    // The framing under test really is there: an `S` header with an extension block.
    let bytes = std::fs::read(&tar).unwrap();
    let header = bytes
        .chunks(512)
        .find(|b| b.starts_with(b"./sparse\0"))
        .expect("a header for ./sparse");
    assert_eq!(header[156], b'S', "GNU tar wrote no old GNU sparse entry");
    assert_ne!(
        header[482], 0,
        "no sparse extension block follows the header"
    );
    tar
}

/// `tar --format=posix --sparse --sparse-version=VERSION` of [`sparse_tree`]; checks that GNU
/// tar wrote that version for both sparse files.
fn pax_sparse_tar(dir: &Path, version: &str, hole_first: bool) -> PathBuf {
    let tar = sparse_tar(
        dir,
        &["--format=posix", &format!("--sparse-version={version}")],
        hole_first,
    );
    let bytes = std::fs::read(&tar).unwrap();
    let marker: &[u8] = match version {
        "0.0" => b" GNU.sparse.offset=",
        "0.1" => b" GNU.sparse.map=",
        _ => b" GNU.sparse.major=1\n",
    };
    let found = bytes.windows(marker.len()).filter(|w| *w == marker).count();
    let want = if version == "0.0" {
        2 * SEGMENTS as usize
    } else {
        2
    };
    assert!(
        found >= want,
        "GNU tar wrote no PAX {version} sparse entries"
    );
    tar
}

/// Python's `tarfile` (ustar): a directory entry of typeflag NUL (`AREGTYPE`) named `olddir/`
/// whose size field says `dir_size` (no body follows: Go reads none), and a file inside it.
fn old_style_dir_tar(dir: &Path, dir_size: u64) -> PathBuf {
    let tar = dir.join("old-style-dir.tar");
    let script = r#"
import io, sys, tarfile
out, dir_size = sys.argv[1], int(sys.argv[2])
data = bytes(i * 7 % 251 for i in range(5000))
with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as t:
    d = tarfile.TarInfo("olddir/")
    d.type = tarfile.AREGTYPE
    d.mode = 0o755
    d.size = dir_size
    t.addfile(d)  # no data: only the header, with its size field
    f = tarfile.TarInfo("olddir/file")
    f.size = len(data)
    f.mode = 0o644
    t.addfile(f, io.BytesIO(data))
"#;
    run(Command::new("python3")
        .args(["-c", script])
        .arg(&tar)
        .arg(dir_size.to_string()));
    let bytes = std::fs::read(&tar).unwrap();
    assert_eq!((&bytes[..8], bytes[156]), (&b"olddir/\0"[..], 0));
    tar
}

/// `podman` on `store`, not asserting success.
fn podman(store: &PrivateStore, args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--storage-driver=overlay")
        .arg("--root")
        .arg(&store.graphroot)
        .arg("--runroot")
        .arg(&store.runroot)
        .arg("--tmpdir")
        .arg(store.runroot.join("libpod-tmp"))
        .args(args)
        .output()
        .expect("running podman")
}

fn cstor_source(store: &PrivateStore, reference: &str) -> String {
    format!(
        "containers-storage:[overlay@{}+{}]{reference}",
        store.graphroot.display(),
        store.runroot.display()
    )
}

/// `skopeo copy SRC oci:DIR:TAG`, uncompressed or gzip; the error text when skopeo fails.
fn skopeo_to_oci(src: &str, layout: &Path, tag: &str, gzip: bool) -> Result<(), String> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet"]);
    if gzip {
        cmd.args(["--dest-compress-format", "gzip"]);
    } else {
        cmd.arg("--dest-oci-accept-uncompressed-layers");
    }
    let out = cmd
        .arg(src)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The image's sources: containers-storage when podman can import the tarball, and OCI
/// layouts (uncompressed, gzip) copied by skopeo from there, or from the tarball itself
/// (skopeo's `tarball:` transport) when containers-storage cannot hold or rebuild the layer.
fn sources(dir: &Path, store: &PrivateStore, tar: &Path, name: &str) -> Vec<String> {
    let reference = format!("localhost/{name}:latest");
    let mut out = Vec::new();
    let imported = podman(store, &["import", &tar.display().to_string(), &reference]);
    let from = if imported.status.success() {
        out.push(cstor_source(store, &reference));
        cstor_source(store, &reference)
    } else {
        println!(
            "{name}: containers-storage cannot hold this layer (podman import: {}); \
             OCI layouts come from the tarball",
            String::from_utf8_lossy(&imported.stderr).trim()
        );
        format!("tarball:{}", tar.display())
    };
    for gzip in [false, true] {
        let layout = dir.join(if gzip { "oci-gzip" } else { "oci-plain" });
        if let Err(e) = skopeo_to_oci(&from, &layout, name, gzip) {
            println!(
                "{name}: skopeo cannot copy it out of containers-storage ({}); this OCI layout \
                 comes from the tarball",
                e.trim()
            );
            skopeo_to_oci(&format!("tarball:{}", tar.display()), &layout, name, gzip).unwrap();
        }
        out.push(format!("oci:{}:{name}", layout.display()));
    }
    out
}

/// `splitfdstream tar SOURCE --layer 0`: must succeed; its stdout.
fn layer_tar(source: &str) -> Vec<u8> {
    let out = Command::new(BIN)
        .args(["tar", source, "--layer", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Pull `source` into a new repository and check it with cfsctl: fsck, oci fsck, and the layer
/// it rebuilds from the repository is `tar`. Returns the pull's JSON summary.
///
/// Every image gets its composefs image; each of `files` (the tree the layer was made from)
/// must be an object of the repository, named by the fs-verity digest of its whole content
/// (for a sparse file: its expanded content, holes as zeros).
fn pull_and_check(
    f: &Fixtures,
    cfsctl: &Path,
    source: &str,
    tar: &[u8],
    files: &[PathBuf],
) -> serde_json::Value {
    let tmp = scratch(f, "repo");
    let repo = tmp.path().join("repo");
    let out = Command::new(BIN)
        .args(["pull", source, "--repo"])
        .arg(&repo)
        .args(["--tag", "t", "--json", "--insecure"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pull {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    cfs(cfsctl, &repo, &["fsck"]);
    cfs(cfsctl, &repo, &["oci", "fsck"]);
    let diff_id = sha256(tar);
    let rebuilt = Command::new(cfsctl)
        .arg("--repo")
        .arg(&repo)
        .args(["oci", "layer", &diff_id])
        .output()
        .unwrap();
    assert!(rebuilt.status.success(), "cfsctl oci layer {diff_id}");
    assert!(
        rebuilt.stdout == tar,
        "{source}: cfsctl rebuilds another layer"
    );
    // The regular file became an object, whichever way its body came; nothing else did.
    let objects: u64 = ["reflinked", "copied", "reused"]
        .iter()
        .map(|k| summary["objects"][*k].as_u64().unwrap())
        .sum();
    assert_eq!(objects, 1, "{source}: {summary}");
    // composefs 0.9.4 cannot represent these (no /usr, sparse files, a size field Go
    // ignores); podman can mount them, and so they get their image here.
    assert!(summary["erofsImage"].is_string(), "{source}: {summary}");
    for file in files {
        let id = FsVerityHasher::digest(HashAlg::Sha512, &std::fs::read(file).unwrap()).to_string();
        let object = repo.join("objects").join(&id[..2]).join(&id[2..]);
        assert!(
            object.exists(),
            "{source}: no object holds {} as its expanded content",
            file.display()
        );
    }
    summary
}

/// Every source of the image made from `tar` rebuilds its diff_id and pulls; the sources
/// (none when skipped).
fn check_layer(f: &Fixtures, name: &str, make: impl FnOnce(&Path) -> PathBuf) -> Vec<String> {
    let Some(cfsctl) = cfsctl() else {
        println!("SKIP: cfsctl not found (set CFSCTL or install composefs-ctl 0.9.4)");
        return Vec::new();
    };
    let dir = scratch(f, name);
    let tar_path = make(dir.path());
    let tar = std::fs::read(&tar_path).unwrap();
    let diff_id = sha256(&tar);
    let store = f.private_store(&[]);
    // podman bind-mounts the driver's directory onto itself; undone before the store goes.
    let _unmount = Unmount(store.graphroot.join("overlay"));
    let sources = sources(dir.path(), &store, &tar_path, name);
    for source in &sources {
        assert_eq!(sha256(&layer_tar(source)), diff_id, "{source}");
        let root = dir.path().join("root");
        let files: Vec<PathBuf> = ["sparse", "sparse-tail"]
            .iter()
            .map(|n| root.join(n))
            .filter(|p| p.exists())
            .collect();
        pull_and_check(f, &cfsctl, source, &tar, &files);
    }
    sources
}

#[test]
fn gnu_sparse_layer() {
    let Some(f) = fixtures() else { return };
    check_layer(f, "gnu-sparse", gnu_sparse_tar);
}

/// A PAX sparse layer of `version`: containers-storage must hold it (and so be among the
/// sources checked).
fn check_pax_sparse_layer(version: &str, hole_first: bool) {
    let Some(f) = fixtures() else { return };
    let name = format!("pax-sparse-{version}");
    let sources = check_layer(f, &name, |dir| pax_sparse_tar(dir, version, hole_first));
    if let Some(first) = sources.first() {
        assert!(
            first.starts_with("containers-storage:"),
            "podman did not import the PAX {version} sparse layer"
        );
    }
}

/// PAX sparse layers: podman imports them, and its tar-split records their expanded files; the
/// helper rebuilds the bodies the tar holds (for 1.0 the map too, which tar-split drops).
#[test]
fn pax_sparse_0_0_layer() {
    check_pax_sparse_layer("0.0", true);
}

#[test]
fn pax_sparse_0_1_layer() {
    check_pax_sparse_layer("0.1", false);
}

#[test]
fn pax_sparse_1_0_layer() {
    check_pax_sparse_layer("1.0", true);
}

#[test]
fn old_style_directory_layer() {
    let Some(f) = fixtures() else { return };
    check_layer(f, "old-style-dir", |dir| old_style_dir_tar(dir, 0));
}

/// The directory's size field says 4096: Go, and so podman, reads no body for it. tar-split
/// still records a 4096-byte file there, which podman cannot rebuild (skopeo copy from
/// containers-storage fails); the helper follows the tar instead.
#[test]
fn old_style_directory_with_a_size_field() {
    let Some(f) = fixtures() else { return };
    check_layer(f, "old-style-dir-sized", |dir| old_style_dir_tar(dir, 4096));
}

/// A ustar header for a regular file whose 12-byte size field is `size_field`, with a valid
/// checksum, then the end-of-archive blocks.
fn hostile_tar(size_field: [u8; 12]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"evil");
    h[100..108].copy_from_slice(b"0000644\0");
    h[124..136].copy_from_slice(&size_field);
    h[156] = b'0';
    h[257..265].copy_from_slice(b"ustar\x0000");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h.extend_from_slice(&[0u8; 1024]);
    h
}

#[test]
fn hostile_size_fields_in_an_oci_layout_are_clear_errors() {
    let Some(f) = fixtures() else { return };
    let mut too_big = [0xffu8; 12];
    too_big[0] = 0x80;
    let mut largest = [0u8; 12];
    largest[0] = 0x80;
    largest[4..].copy_from_slice(&i64::MAX.to_be_bytes());
    let cases = [
        // 2^88 - 1: no size at all (the old entry counter computed `n.div_ceil(512) * 512`
        // on it and overflowed).
        (
            "too-big",
            too_big,
            "tar header at tar offset 0: invalid size field",
        ),
        // 2^63 - 1 is a size, but the tar ends 1024 bytes into the body.
        (
            "largest",
            largest,
            "the layer tar ends at tar offset 1536 inside a regular-file body",
        ),
    ];
    for (name, field, want) in cases {
        let dir = scratch(f, name);
        let tar_path = dir.path().join("layer.tar");
        std::fs::write(&tar_path, hostile_tar(field)).unwrap();
        let layout = dir.path().join("oci");
        skopeo_to_oci(
            &format!("tarball:{}", tar_path.display()),
            &layout,
            name,
            false,
        )
        .unwrap();

        let backend = OciBackend::open(&layout).unwrap();
        let image = backend.open_image(name).unwrap();
        let mut sink = TarSink::default();
        let err = backend
            .stream_layer(&image, 0, 64, &mut sink)
            .expect_err("a hostile layer streamed");
        let err = format!("{err:#}");
        assert!(err.contains(want), "{name}: {err}");

        let source = format!("oci:{}:{name}", layout.display());
        let repo = dir.path().join("repo");
        let mut tar = Command::new(BIN);
        tar.args(["tar", &source, "--layer", "0"]);
        let mut pull = Command::new(BIN);
        pull.args(["pull", &source, "--insecure", "--tag", name, "--repo"])
            .arg(&repo);
        for (what, cmd) in [("tar", &mut tar), ("pull", &mut pull)] {
            let out = cmd.output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{name} {what}: {stderr}");
            assert!(stderr.contains(want), "{name} {what}: {stderr}");
            assert!(!stderr.contains("panicked"), "{name} {what}: {stderr}");
        }
    }
}
