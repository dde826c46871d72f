//! `splitfdstream unpack`: the unpacked tree equals podman's mount of the image, and hostile
//! layers cannot write outside the target directory.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use common::tree::{assert_same_tree, snapshot};

const BIN: &str = env!("CARGO_BIN_EXE_splitfdstream");

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn unpack(source: &str, dir: &Path, extra: &[&str]) -> std::process::Output {
    run(Command::new(BIN)
        .arg("unpack")
        .arg(source)
        .arg(dir)
        .args(extra))
}

fn ok(out: std::process::Output, what: &str) -> std::process::Output {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn every_fixture_unpacks_as_podman_mounts_it() {
    let Some(f) = fixtures() else { return };
    // On the fixtures' filesystem (XFS with reflink where the build could mount one): bodies
    // are cloned from the store.
    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    for image in &f.images {
        let name = image.name.as_str();
        let private = f.private_store(&[name]);
        let store = format!(
            "containers-storage:[overlay@{}+{}]",
            private.graphroot.display(),
            private.runroot.display()
        );
        let dir = work.path().join(name);
        let out = ok(
            unpack(&format!("{store}{}", image.reference), &dir, &[]),
            name,
        );
        assert!(
            out.stderr.is_empty(),
            "{name}: unexpected warnings: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = String::from_utf8(private.podman(&["image", "mount", &image.reference]).stdout)
            .unwrap();
        let mnt = PathBuf::from(mnt.trim());
        let result = std::panic::catch_unwind(|| assert_same_tree(name, &dir, &mnt));
        private.podman(&["image", "unmount", &image.reference]);
        // The store bind-mounts its overlay dir on itself; undo it so the copy can go.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(private.graphroot.join("overlay"))
            .output();
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        if name == "basic" {
            // Whiteouts and the opaque directory of layer 2 were processed, not kept.
            assert!(!dir.join("data/to-delete").exists());
            assert!(!dir.join("deldir").exists());
            assert!(!dir.join("opaque/old-1").exists());
            assert!(!dir.join("opaque/sub").exists());
            assert!(dir.join("opaque/new-1").exists());
            let names = snapshot(&dir);
            assert!(
                names.keys().all(|k| !k.contains(".wh.")),
                "a whiteout left as a file"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// On tmpfs nothing can be cloned: bodies go through `copy_file_range` or a copy, and the
/// tree is the same.
#[test]
fn unpack_to_tmpfs_copies_the_same_tree() {
    let Some(f) = fixtures() else { return };
    let image = f.image("basic");
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        println!("SKIP: no /dev/shm tmpfs");
        return;
    }
    let work = tempfile::TempDir::new_in(shm).unwrap();
    let source = format!("{}{}", f.store_arg(), image.reference);
    let copied = work.path().join("copied");
    ok(unpack(&source, &copied, &[]), "tmpfs");
    let reflinked = tempfile::TempDir::new_in(&f.out).unwrap();
    let dir = reflinked.path().join("r");
    ok(unpack(&source, &dir, &["--atomic"]), "atomic");
    assert_eq!(snapshot(&copied), snapshot(&dir));
    // Neither leaves a sibling behind.
    let names: Vec<_> = std::fs::read_dir(reflinked.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

/// `--layer N` gives that layer's changes: whiteouts as overlay keeps them, or as `.wh.`
/// files.
#[test]
fn one_layer_keeps_its_whiteouts() {
    let Some(f) = fixtures() else { return };
    let image = f.image("basic");
    let source = format!("{}{}", f.store_arg(), image.reference);
    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    let overlay = work.path().join("overlay");
    ok(
        unpack(&source, &overlay, &["--layer", "1"]),
        "overlay whiteouts",
    );
    let md = std::fs::symlink_metadata(overlay.join("data/to-delete")).unwrap();
    assert!(md.file_type().is_char_device() && md.rdev() == 0);
    assert!(
        std::fs::symlink_metadata(overlay.join("deldir"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(
        rustix::fs::getxattr(
            overlay.join("opaque"),
            "trusted.overlay.opaque",
            &mut [0u8; 8]
        ),
        Ok(1)
    );
    assert!(overlay.join("opaque/new-1").is_file());
    // Not in this layer.
    assert!(!overlay.join("usr/bin/hello").exists());

    let oci = work.path().join("oci");
    ok(
        unpack(&source, &oci, &["--layer", "1", "--whiteouts", "oci"]),
        "oci whiteouts",
    );
    assert!(oci.join("data/.wh.to-delete").is_file());
    assert!(oci.join("opaque/.wh..wh..opq").is_file());
    assert!(oci.join(".wh.deldir").is_file());

    // The layer's own diff dir in the store is what overlay whiteouts look like.
    let diff = f
        .graphroot
        .join("overlay")
        .join(&image.layer_ids[1])
        .join("diff");
    let a = snapshot(&overlay);
    let b = snapshot(&diff);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "layer 1 differs from its diff dir"
    );
}

#[test]
fn a_non_empty_target_is_refused() {
    let Some(f) = fixtures() else { return };
    let source = format!("{}{}", f.store_arg(), f.image("basic").reference);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("keep"), "mine").unwrap();
    let out = unpack(&source, work.path(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(std::fs::read(work.path().join("keep")).unwrap(), b"mine");
}

/// Writes an OCI layout with one image of uncompressed layers made by Python's `tarfile`.
/// Input (stdin): `{"dir": …, "tag": …, "layers": [[entry, …], …]}`; an entry is
/// `{"name", "type": "file"|"dir"|"symlink"|"hardlink", "link"?, "data"?}`.
const MAKE_LAYOUT: &str = r#"
import hashlib, io, json, os, sys, tarfile
spec = json.load(sys.stdin)
out = spec["dir"]
os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out, "blobs", "sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)
kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
         "hardlink": tarfile.LNKTYPE}
layers, diff_ids = [], []
for entries in spec["layers"]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            ti = tarfile.TarInfo(e["name"])
            ti.type = kinds[e["type"]]
            ti.mode = e.get("mode", 0o755 if e["type"] == "dir" else 0o644)
            ti.mtime = 1700000000
            ti.uid = ti.gid = e.get("uid", 0)
            ti.linkname = e.get("link", "")
            data = e.get("data", "").encode()
            ti.size = len(data) if e["type"] == "file" else 0
            t.addfile(ti, io.BytesIO(data) if e["type"] == "file" else None)
    digest, size = blob(buf.getvalue())
    diff_ids.append(digest)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                   "digest": digest, "size": size})
config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                     "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
cdigest, csize = blob(config)
manifest = json.dumps({"schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": cdigest, "size": csize},
    "layers": layers}).encode()
mdigest, msize = blob(manifest)
with open(os.path.join(out, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
        "size": msize, "annotations": {"org.opencontainers.image.ref.name": spec["tag"]}}]}, f)
"#;

fn make_layout(dir: &Path, layers: serde_json::Value) {
    use std::io::Write;
    let spec = serde_json::json!({"dir": dir, "tag": "t", "layers": layers});
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(MAKE_LAYOUT)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("running python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "making the OCI layout");
}

/// Every path beneath `dir` with its content (files) or target (symlinks).
fn listing(dir: &Path) -> BTreeMap<String, String> {
    snapshot(dir)
        .into_iter()
        .map(|(k, v)| (k, format!("{}{:o}{}", v.kind, v.mode, v.data)))
        .collect()
}

#[test]
fn hostile_layers_cannot_write_outside() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIP: python3 not found (the hostile layers are made with its tarfile)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("canary"), "untouched").unwrap();
    let abs = outside.to_str().unwrap().to_owned();
    let file = |name: &str| serde_json::json!({"name": name, "type": "file", "data": "pwned"});
    let symlink =
        |name: &str, to: &str| serde_json::json!({"name": name, "type": "symlink", "link": to});
    let hardlink =
        |name: &str, to: &str| serde_json::json!({"name": name, "type": "hardlink", "link": to});
    let dir = |name: &str| serde_json::json!({"name": name, "type": "dir"});
    // (case, layers, the entry the error must name)
    let cases = [
        (
            "symlink to / then a file through it",
            serde_json::json!([[symlink("etc", "/")], [file("etc/passwd")]]),
            "etc/passwd",
        ),
        (
            "absolute symlink used as a path",
            serde_json::json!([[symlink("abs", &abs), file("abs/canary")]]),
            "abs/canary",
        ),
        (
            "relative symlink out, then a file through it",
            serde_json::json!([[dir("a"), symlink("a/up", "../../outside"), file("a/up/new")]]),
            "a/up/new",
        ),
        (
            "a ../ name",
            serde_json::json!([[file("../outside/canary")]]),
            "../outside/canary",
        ),
        (
            "a ../ name created",
            serde_json::json!([[file("../outside/new")]]),
            "../outside/new",
        ),
        (
            "hard link to a path outside",
            serde_json::json!([[hardlink("stolen", "../outside/canary")]]),
            "stolen",
        ),
        (
            "hard link through an absolute symlink",
            serde_json::json!([[symlink("abs", &abs), hardlink("stolen", "abs/canary")]]),
            "stolen",
        ),
        (
            "whiteout of ..",
            serde_json::json!([[dir("d"), file("d/.wh..")]]),
            "d/.wh..",
        ),
        (
            "whiteout of .. at the root",
            serde_json::json!([[file(".wh..")]]),
            ".wh..",
        ),
        (
            "whiteout through an absolute symlink",
            serde_json::json!([[symlink("abs", &abs)], [file("abs/.wh.canary")]]),
            "abs/.wh.canary",
        ),
        (
            "opaque directory through a symlink",
            serde_json::json!([[symlink("abs", &abs)], [file("abs/.wh..wh..opq")]]),
            "abs/.wh..wh..opq",
        ),
    ];
    let before = listing(work.path());
    for (i, (case, layers, entry)) in cases.into_iter().enumerate() {
        let layout = work.path().join(format!("layout-{i}"));
        make_layout(&layout, layers);
        let target = work.path().join("dir");
        for atomic in [false, true] {
            let extra: &[&str] = if atomic { &["--atomic"] } else { &[] };
            let out = unpack(&format!("oci:{}:t", layout.display()), &target, extra);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{case}: succeeded");
            assert!(
                err.contains(&format!("{entry:?}")),
                "{case}: the error does not name {entry:?}: {err}"
            );
            if atomic {
                assert!(!target.exists(), "{case}: --atomic left the target");
            } else {
                assert!(err.contains("delete it"), "{case}: {err}");
                std::fs::remove_dir_all(&target).unwrap();
            }
            // Nothing outside the target changed or appeared (the layouts aside).
            let now: BTreeMap<_, _> = listing(work.path())
                .into_iter()
                .filter(|(k, _)| !k.starts_with("layout-"))
                .collect();
            assert_eq!(now, before, "{case}: something outside the target changed");
        }
        std::fs::remove_dir_all(&layout).unwrap();
    }
    assert_eq!(std::fs::read(outside.join("canary")).unwrap(), b"untouched");
    assert!(!Path::new("/passwd").exists());
}

/// Legitimate symlinks inside the tree are followed as containers/storage follows them.
#[test]
fn symlinks_inside_the_tree_are_followed() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    make_layout(
        &layout,
        serde_json::json!([
            [
                {"name": "usr/", "type": "dir"},
                {"name": "usr/lib/", "type": "dir"},
                {"name": "lib", "type": "symlink", "link": "usr/lib"},
                {"name": "usr/lib/old", "type": "file", "data": "old"},
            ],
            [
                {"name": "lib/new", "type": "file", "data": "new"},
                {"name": "lib/.wh.old", "type": "file"},
                {"name": "usr/lib/link", "type": "hardlink", "link": "lib/new"},
            ]
        ]),
    );
    let target = work.path().join("dir");
    ok(
        unpack(&format!("oci:{}:t", layout.display()), &target, &[]),
        "inside links",
    );
    assert_eq!(std::fs::read(target.join("usr/lib/new")).unwrap(), b"new");
    assert!(!target.join("usr/lib/old").exists());
    let a = std::fs::metadata(target.join("usr/lib/new")).unwrap();
    let b = std::fs::metadata(target.join("usr/lib/link")).unwrap();
    assert_eq!(a.ino(), b.ino());
}

/// Not root: owners are not applied (said once), everything else is, including modes that
/// deny the owner what creating the tree needs (a mode-000 directory with contents, a
/// read-only directory a later layer adds to and removes from, a link to a mode-000 file).
#[test]
fn not_root_owners_are_left_out_once() {
    if !rustix::process::geteuid().is_root()
        || Command::new("setpriv").arg("--help").output().is_err()
    {
        println!("SKIP: needs root and setpriv to run unpack as another user");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    make_layout(
        &layout,
        serde_json::json!([
            [
                {"name": "d/", "type": "dir", "uid": 1234},
                {"name": "d/f", "type": "file", "data": "owned by 1234", "uid": 1234},
                {"name": "d/g", "type": "file", "data": "and this", "uid": 1234},
                {"name": "locked/", "type": "dir", "mode": 0},
                {"name": "locked/inner/", "type": "dir", "mode": 0o500},
                {"name": "locked/inner/secret", "type": "file", "data": "s", "mode": 0},
                {"name": "locked/gone", "type": "file", "data": "x", "mode": 0o400},
                {"name": "ro/", "type": "dir", "mode": 0o555},
                {"name": "ro/old", "type": "file", "data": "old", "mode": 0o444},
            ],
            [
                {"name": "locked/", "type": "dir", "mode": 0},
                {"name": "locked/.wh.gone", "type": "file"},
                {"name": "locked/link", "type": "hardlink", "link": "locked/inner/secret"},
                {"name": "ro/", "type": "dir", "mode": 0o555},
                {"name": "ro/old", "type": "file", "data": "new", "mode": 0o444},
                {"name": "ro/added", "type": "file", "data": "added", "mode": 0o400},
            ],
        ]),
    );
    let nobody = 65534;
    let dir = work.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    rustix::fs::chown(
        &dir,
        Some(rustix::fs::Uid::from_raw(nobody)),
        Some(rustix::fs::Gid::from_raw(nobody)),
    )
    .unwrap();
    rustix::fs::chmod(work.path(), rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
    let out = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "unpack",
        ])
        .arg(format!("oci:{}:t", layout.display()))
        .arg(&dir));
    let out = ok(out, "as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("owners are not applied").count(), 1, "{err}");
    let md = std::fs::metadata(dir.join("d/f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (nobody, nobody));
    assert_eq!(std::fs::read(dir.join("d/g")).unwrap(), b"and this");
    let tree = listing(&dir);
    let expected = [
        ("locked", "d0"),
        ("locked/inner", "d500"),
        ("locked/inner/secret", "f0"),
        ("locked/link", "f0"),
        ("ro", "d555"),
        ("ro/old", "f444"),
        ("ro/added", "f400"),
    ];
    for (path, kind_mode) in expected {
        assert!(tree[path].starts_with(kind_mode), "{path}: {}", tree[path]);
    }
    assert!(!tree.contains_key("locked/gone"), "{tree:?}");
    assert_eq!(std::fs::read(dir.join("ro/old")).unwrap(), b"new");
    let (a, b) = (dir.join("locked/link"), dir.join("locked/inner/secret"));
    assert_eq!(
        std::fs::metadata(a).unwrap().ino(),
        std::fs::metadata(b).unwrap().ino()
    );
}
