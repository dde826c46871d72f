//! Integrity against a hostile store: an object's name is always the digest of the bytes it
//! holds, whatever the source does meanwhile, and the fast path that hashes a source before
//! cloning it is taken only where nobody but root and the repository's owner can change it.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::fixtures;
use common::tools::{cfs, cfsctl};
use splitfdstream::repo::{FsVerityHasher, HashAlg};

const BIN: &str = env!("CARGO_BIN_EXE_splitfdstream");

/// The uid and gid of `nobody`: the owner of the "hostile" stores.
const NOBODY: u32 = 65534;

fn tools() -> Option<(&'static common::Fixtures, PathBuf)> {
    let f = fixtures()?;
    let Some(c) = cfsctl() else {
        println!("SKIP: cfsctl not found (set CFSCTL or install composefs-ctl 0.9.4)");
        return None;
    };
    Some((f, c))
}

/// A fresh repository path on the fixtures' filesystem (XFS with reflink, like the store).
fn repo_dir(f: &common::Fixtures, what: &str) -> (tempfile::TempDir, PathBuf) {
    let base = f.out.join("repos");
    std::fs::create_dir_all(&base).unwrap();
    let t = tempfile::Builder::new()
        .prefix(what)
        .tempdir_in(&base)
        .unwrap();
    let repo = t.path().join("repo");
    (t, repo)
}

/// `splitfdstream pull … --json --insecure EXTRA…`: the summary, or the stderr.
fn pull(source: &str, repo: &Path, extra: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(BIN)
        .args(["pull", source, "--repo"])
        .arg(repo)
        .args(["--tag", "t", "--json", "--insecure"])
        .args(extra)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Every object of the repository holds the bytes its name is the fs-verity digest of.
fn assert_objects_match_names(repo: &Path) -> usize {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("meta.json")).unwrap()).unwrap();
    let alg = match meta["algorithm"].as_str() {
        Some("fsverity-sha512-12") => HashAlg::Sha512,
        Some("fsverity-sha256-12") => HashAlg::Sha256,
        other => panic!("algorithm {other:?}"),
    };
    let mut n = 0;
    for fanout in std::fs::read_dir(repo.join("objects")).unwrap() {
        let fanout = fanout.unwrap();
        if !fanout.file_type().unwrap().is_dir() {
            continue;
        }
        for object in std::fs::read_dir(fanout.path()).unwrap() {
            let object = object.unwrap();
            let name = format!(
                "{}{}",
                fanout.file_name().to_string_lossy(),
                object.file_name().to_string_lossy()
            );
            let digest = FsVerityHasher::digest(alg, &std::fs::read(object.path()).unwrap());
            assert_eq!(
                digest.to_string(),
                name,
                "object {} holds other bytes than its name says",
                object.path().display()
            );
            n += 1;
        }
    }
    n
}

/// Rewrite `path` with `byte`s (same size) as soon as something reads it (`IN_ACCESS`): a
/// store owner who changes a file right after the importer looked at it. Returns whether it
/// fired.
fn rewrite_on_access(path: &Path, byte: u8) -> (std::thread::JoinHandle<()>, Arc<AtomicBool>) {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&fd, path, inotify::WatchFlags::ACCESS).unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    let done = fired.clone();
    let path = path.to_owned();
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    let thread = std::thread::spawn(move || {
        let mut buf = [std::mem::MaybeUninit::uninit(); 1024];
        let mut reader = inotify::Reader::new(&fd, &mut buf);
        // Blocks until the first read of the file (the helper opens it; only a read or a
        // clone of its data counts as an access).
        reader.next().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&vec![byte; len], 0).unwrap();
        done.store(true, Ordering::SeqCst);
    });
    (thread, fired)
}

/// A store owned by another user, whose owner rewrites a body from "A"×8192 to "B"×8192 right
/// after it is first read (reproduced before the fix: the pull then published an object named
/// after A holding B). Whatever the timing, the pull must fail or publish only objects whose
/// content has their name's digest.
#[test]
fn body_rewritten_after_it_is_read_never_gives_a_mismatched_object() {
    let Some((f, cfsctl)) = tools() else { return };
    let store = f.private_store(&[]);
    let work = tempfile::tempdir_in(&f.out).unwrap();
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("a-victim"), vec![b'A'; 8192]).unwrap();
    // A large body after the victim keeps the importer busy between its read of the victim
    // and the moment a batch of small bodies would be stored.
    let big: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("b-big"), big).unwrap();
    let tarball = work.path().join("layer.tar");
    common::tools::run(
        Command::new("tar")
            .args([
                "--sort=name",
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "-cf",
            ])
            .arg(&tarball)
            .arg("-C")
            .arg(&root)
            .args(["a-victim", "b-big"]),
    );
    store.podman(&["import", tarball.to_str().unwrap(), "localhost/victim:1"]);
    // The store now belongs to an unprivileged user (as a rootless store would).
    common::tools::run(
        Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(&store.graphroot),
    );
    let victim = find_file(&store.graphroot.join("overlay"), "a-victim");
    let (watcher, fired) = rewrite_on_access(&victim, b'B');

    let (_t, repo) = repo_dir(f, "rewritten");
    let source = format!(
        "containers-storage:[overlay@{}+{}]localhost/victim:1",
        store.graphroot.display(),
        store.runroot.display()
    );
    let result = pull(&source, &repo, &[]);
    // The helper has read or cloned the victim by now, so the watcher fired (or will, if the
    // pull failed before it got there).
    if result.is_ok() {
        watcher.join().unwrap();
        assert!(fired.load(Ordering::SeqCst));
    }
    match result {
        Ok(s) => {
            println!("the pull succeeded; the store's file was rewritten after it was cloned");
            let n = assert_objects_match_names(&repo);
            assert!(n >= 2, "only {n} objects");
            assert_eq!(s["sourceTrust"], "untrusted", "{s}");
            assert_eq!(s["objects"]["hashedFromSource"], 0, "{s}");
            cfs(&cfsctl, &repo, &["fsck"]);
            cfs(&cfsctl, &repo, &["oci", "fsck"]);
            // The object of "A"×8192 exists and holds A.
            let a = FsVerityHasher::digest(HashAlg::Sha512, &[b'A'; 8192]).to_string();
            let path = repo.join("objects").join(&a[..2]).join(&a[2..]);
            assert_eq!(std::fs::read(path).unwrap(), vec![b'A'; 8192]);
        }
        Err(stderr) => {
            println!("the pull failed: {stderr}");
            assert!(stderr.contains("the tar's sha256 is"), "{stderr}");
            assert!(
                !repo.join("streams/refs/oci/t").exists(),
                "tagged after a failure"
            );
            assert_objects_match_names(&repo);
        }
    }
}

/// The fast path (hash the source, clone it afterwards) is taken for a store whose root is
/// owned by root, and then only for files owned by root (or the repository's owner) that
/// nobody else may write; never for a store owned by another user.
#[test]
fn source_trust_follows_ownership() {
    let Some((f, cfsctl)) = tools() else { return };
    let image = f.image("basic");
    let store = f.private_store(&["basic"]);
    let source = format!(
        "containers-storage:[overlay@{}+{}]{}",
        store.graphroot.display(),
        store.runroot.display(),
        image.reference
    );
    let external_bodies = |s: &serde_json::Value| {
        let o = &s["objects"];
        o["reflinked"].as_u64().unwrap()
            + o["copied"].as_u64().unwrap()
            + o["reused"].as_u64().unwrap()
    };

    let (_t1, repo) = repo_dir(f, "trusted");
    let s = pull(&source, &repo, &[]).unwrap();
    assert_eq!(s["sourceTrust"], "owners", "{s}");
    let all = external_bodies(&s);
    assert!(all > 0);
    assert_eq!(s["objects"]["hashedFromSource"], all, "{s}");
    assert_objects_match_names(&repo);

    // One file of the root-owned store given to another user, one made group-writable: only
    // those two take the verified path.
    let l0 = store.diff_dir(&image.layer_ids[0]);
    let chown = l0.join("data/hundred-k");
    std::os::unix::fs::chown(&chown, Some(NOBODY), None).unwrap();
    let chmod = l0.join("data/page");
    let mode = std::fs::metadata(&chmod).unwrap().mode();
    std::fs::set_permissions(
        &chmod,
        std::os::unix::fs::PermissionsExt::from_mode(mode | 0o020),
    )
    .unwrap();
    let (_t2, repo) = repo_dir(f, "mixed");
    let s = pull(&source, &repo, &[]).unwrap();
    assert_eq!(s["sourceTrust"], "owners", "{s}");
    assert_eq!(
        s["objects"]["hashedFromSource"].as_u64().unwrap(),
        external_bodies(&s) - 2,
        "{s}"
    );
    assert_objects_match_names(&repo);

    // Asked for, or with the store's root owned by someone else: no file is trusted.
    let (_t3, repo) = repo_dir(f, "forced");
    let s = pull(&source, &repo, &["--untrusted-source"]).unwrap();
    assert_eq!(s["sourceTrust"], "untrusted", "{s}");
    assert_eq!(s["objects"]["hashedFromSource"], 0, "{s}");
    assert_eq!(external_bodies(&s), all);
    assert!(s["objects"]["reflinked"].as_u64().unwrap() > 0, "{s}");
    assert_objects_match_names(&repo);
    cfs(&cfsctl, &repo, &["fsck"]);

    std::os::unix::fs::chown(&store.graphroot, Some(NOBODY), Some(NOBODY)).unwrap();
    let (_t4, repo) = repo_dir(f, "foreign");
    let s = pull(&source, &repo, &[]).unwrap();
    assert_eq!(s["sourceTrust"], "untrusted", "{s}");
    assert_eq!(s["objects"]["hashedFromSource"], 0, "{s}");
    assert_eq!(s["imageId"], image.id.as_str());
    assert_objects_match_names(&repo);
    cfs(&cfsctl, &repo, &["oci", "fsck"]);
}

/// The one regular file called `name` beneath `dir`.
fn find_file(dir: &Path, name: &str) -> PathBuf {
    let out = common::tools::run(
        Command::new("find")
            .arg(dir)
            .args(["-type", "f", "-name", name]),
    );
    let found: Vec<&str> = out.lines().collect();
    assert_eq!(found.len(), 1, "{found:?}");
    PathBuf::from(found[0])
}
