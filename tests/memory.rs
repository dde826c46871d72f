//! Peak RSS of `tar` on a layer of 100,000 tiny files stays under 32 MiB (helper included), and
//! of `pull` under 64 MiB on layers built to make an importer hoard: huge headers queued behind
//! a small body, and 200,000 entries without bodies.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

/// Files in the layer.
const FILES: usize = 100_000;
/// The limit from the issue.
const LIMIT_KIB: u64 = 32 * 1024;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn tar_of_100k_tiny_files_stays_small() {
    if !rustix::process::geteuid().is_root()
        || !have("buildah")
        || !Path::new("/usr/bin/time").exists()
    {
        println!("SKIP: needs root, buildah and /usr/bin/time");
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memory-100k");
    let run_dir = short_run_root();
    let (graph, run) = (dir.join("graph"), run_dir.path().to_owned());
    if !dir.join("built").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            r#"set -eu
b="buildah --root {g} --runroot {r} --storage-driver overlay"
c=$($b from scratch)
m=$($b mount "$c")
mkdir -p "$m/d"
cd "$m/d"
# 100,000 files of 1..40 bytes, in 100 directories.
i=0; while [ $i -lt 100 ]; do mkdir $i; i=$((i+1)); done
seq 0 {last} | awk '{{ printf "%s", substr("0123456789abcdefghijklmnopqrstuvwxyz0123", 1, 1 + $1 % 40) > (($1 % 100) "/f" $1); close(($1 % 100) "/f" $1) }}'
cd /
$b umount "$c" >/dev/null
$b commit -q "$c" localhost/many100k >/dev/null
$b rm "$c" >/dev/null
"#,
            g = graph.display(),
            r = run.display(),
            last = FILES - 1
        );
        let st = Command::new("sh").args(["-c", &script]).status().unwrap();
        assert!(st.success(), "building the 100k-file image");
        std::fs::write(dir.join("built"), b"").unwrap();
    }
    let source = format!(
        "containers-storage:[overlay@{}+{}]localhost/many100k",
        graph.display(),
        run.display()
    );
    let kib = common::tools::peak_rss_kib(
        Command::new(env!("CARGO_BIN_EXE_splitfdstream")).args(["tar", &source, "--layer", "0"]),
    );
    println!(
        "peak RSS of `splitfdstream tar` on {FILES} files: {:.1} MiB",
        kib as f64 / 1024.0
    );
    assert!(kib < LIMIT_KIB, "peak RSS {kib} KiB ≥ {LIMIT_KIB} KiB");
}

/// The limit for `pull` from the issue.
const PULL_LIMIT_KIB: u64 = 64 * 1024;

/// A store under the test's temp dir holding `localhost/<name>:1`, imported by podman from
/// the tarball that `python` (a Python program given the output path as `argv[1]`, using the
/// `tarfile` module) writes. Built once; `None` (after printing why) without root or podman.
fn imported_store(name: &str, python: &str) -> Option<(String, tempfile::TempDir)> {
    if !rustix::process::geteuid().is_root()
        || !have("podman")
        || !have("python3")
        || !Path::new("/usr/bin/time").exists()
    {
        println!("SKIP: needs root, podman, python3 and /usr/bin/time");
        return None;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("memory-{name}"));
    let run_dir = short_run_root();
    let (graph, run) = (dir.join("graph"), run_dir.path().to_owned());
    if !dir.join("built").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tarball = dir.join("layer.tar");
        common::tools::run(Command::new("python3").args(["-c", python]).arg(&tarball));
        common::tools::run(
            Command::new("podman")
                .args(["--storage-driver", "overlay", "--root"])
                .arg(&graph)
                .arg("--runroot")
                .arg(&run)
                .arg("import")
                .arg(&tarball)
                .arg(format!("localhost/{name}:1")),
        );
        std::fs::remove_file(&tarball).unwrap();
        std::fs::write(dir.join("built"), b"").unwrap();
    }
    let source = format!(
        "containers-storage:[overlay@{}+{}]localhost/{name}:1",
        graph.display(),
        run.display()
    );
    Some((source, run_dir))
}

/// A run root for one test: podman refuses one longer than 50 bytes (its sockets live there),
/// which a run root beneath a checkout's target directory can be, so it goes in the temporary
/// directory. The graph root keeps nothing that refers to it.
fn short_run_root() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sfds-run")
        .tempdir_in("/tmp")
        .expect("creating a run root in /tmp")
}

/// Peak RSS of `splitfdstream pull SOURCE` into a fresh repository (helpers included), and
/// the repository.
fn pull_peak_kib(source: &str) -> (u64, tempfile::TempDir) {
    let repo = tempfile::tempdir().unwrap();
    let kib = common::tools::peak_rss_kib(
        Command::new(env!("CARGO_BIN_EXE_splitfdstream"))
            .args(["pull", source, "--insecure", "--repo"])
            .arg(repo.path().join("repo")),
    );
    (kib, repo)
}

/// One 100-byte file, then 256 PAX global headers of 1 MiB each: the inline bytes after the
/// small body, which waits in a batch, were all queued (268 MB peak before the fix).
#[test]
fn pull_of_huge_headers_behind_a_small_body_stays_small() {
    let python = r#"
import io, sys, tarfile
def record(key, value):
    body = " %s=%s\n" % (key, value)
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return ("%d%s" % (n, body)).encode()
with open(sys.argv[1], "wb") as f:
    t = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)
    small = tarfile.TarInfo("small"); small.size = 100; small.mtime = 1700000000
    t.addfile(small, io.BytesIO(b"s" * 100))
    for i in range(256):
        data = record("comment", "%03d" % i + "x" * ((1 << 20) - 64))
        g = tarfile.TarInfo("global-%03d" % i); g.type = tarfile.XGLTYPE
        g.size = len(data); g.mtime = 1700000000
        t.addfile(g, io.BytesIO(data))
    t.close()
"#;
    let Some((source, _run)) = imported_store("pax-globals", python) else {
        return;
    };
    let (kib, _repo) = pull_peak_kib(&source);
    println!(
        "peak RSS of `splitfdstream pull` of 256 MiB of PAX global headers: {:.1} MiB",
        kib as f64 / 1024.0
    );
    assert!(
        kib < PULL_LIMIT_KIB,
        "peak RSS {kib} KiB ≥ {PULL_LIMIT_KIB} KiB"
    );
}

/// 200,000 entries without a body (`usr/` and 999 more directories of 199 empty files), and
/// their composefs image.
#[test]
fn pull_of_200k_headers_only_entries_stays_small() {
    let python = r#"
import sys, tarfile
with open(sys.argv[1], "wb") as f:
    t = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)
    u = tarfile.TarInfo("usr"); u.type = tarfile.DIRTYPE; u.mode = 0o755; u.mtime = 1700000000
    t.addfile(u)
    for d in range(999):
        e = tarfile.TarInfo("d%03d" % d); e.type = tarfile.DIRTYPE; e.mode = 0o755
        e.mtime = 1700000000
        t.addfile(e)
    for i in range(199000):
        e = tarfile.TarInfo("d%03d/e%06d" % (i % 999, i)); e.mtime = 1700000000
        t.addfile(e)
    t.close()
"#;
    let Some((source, _run)) = imported_store("headers-200k", python) else {
        return;
    };
    let (kib, repo) = pull_peak_kib(&source);
    let images = std::fs::read_dir(repo.path().join("repo/images")).map_or(0, |d| d.count());
    assert!(images > 0, "no composefs image was built");
    println!(
        "peak RSS of `splitfdstream pull` of 200,000 entries without bodies: {:.1} MiB",
        kib as f64 / 1024.0
    );
    assert!(
        kib < PULL_LIMIT_KIB,
        "peak RSS {kib} KiB ≥ {PULL_LIMIT_KIB} KiB"
    );
}
