//! `unpack` of the user's image, as the user: outside any namespace (owners cannot be given
//! away, every other attribute is the image's) and inside `podman unshare` (owners too).
//!
//! podman's tree is `podman image mount` inside `podman unshare` (a rootless mount exists only
//! in that namespace), copied with `cp -a` there into a directory the test, as root, can walk:
//! the copy has the mount's names, modes, owners (host ids, as an unpack in the namespace
//! writes them), times, xattrs and hard links.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::common::tree::{assert_same_tree, assert_same_tree_but_owners, snapshot};
use super::{Setup, assert_ok, chown_user, serial, setup, stderr, user_id};

const IMAGE: &str = "localhost/rl-app:1";

/// podman's tree of the user's image, copied into `into` (made here).
fn podman_tree(s: &Setup, into: &Path) {
    std::fs::create_dir(into).unwrap();
    chown_user(into, s.uid);
    let script = format!(
        "set -eu; m=$(podman image mount {IMAGE}); cp -a \"$m\"/. '{}'/; \
         podman image unmount {IMAGE} >/dev/null",
        into.display()
    );
    let out = s.as_user(
        &["podman", "unshare", "sh", "-c"],
        &[&script],
        "/usr/sbin:/usr/bin:/sbin:/bin",
    );
    assert_ok(&out, "copying podman's mount of the user's image");
}

/// The entries a user outside the namespace cannot open in the store: a tree that holds them
/// shows that unpack made them with the image's modes.
fn assert_odd_modes(tree: &Path) {
    for (path, mode) in [
        ("etc/shadow", 0o000),
        ("home/app", 0o700),
        ("home/app/secret", 0o600),
        ("srv/shared", 0o750),
        ("srv/shared/group-file", 0o640),
    ] {
        let md = std::fs::symlink_metadata(tree.join(path)).unwrap();
        assert_eq!(md.mode() & 0o7777, mode, "{path}");
    }
}

#[test]
fn rootless_unpack_as_the_user_outside_a_namespace() {
    let Some(s) = setup() else { return };
    let _serial = serial();
    let dir = s.user_dir("unpack");
    let theirs = dir.path().join("podman");
    podman_tree(s, &theirs);
    let ours = dir.path().join("ours");
    let out = s.sfds(
        &[
            "unpack",
            &format!("containers-storage:{IMAGE}"),
            ours.to_str().unwrap(),
        ],
        &s.tools_path(),
    );
    assert_ok(&out, "unpack as the user");
    let err = stderr(&out);
    assert_eq!(err.matches("owners are not applied").count(), 1, "{err}");
    assert_odd_modes(&ours);
    // Owners: every file is the user's; the store's subordinate owners are not.
    let gid = user_id("-g").unwrap();
    for (path, node) in snapshot(&ours) {
        assert_eq!((node.uid, node.gid), (s.uid, gid), "{path}");
    }
    let secret = std::fs::symlink_metadata(theirs.join("home/app/secret")).unwrap();
    assert_ne!(
        secret.uid(),
        s.uid,
        "podman's tree keeps the container owner"
    );
    assert_same_tree_but_owners("unpack as the user", &ours, &theirs);
}

#[test]
fn rootless_unpack_inside_podman_unshare() {
    let Some(s) = setup() else { return };
    let _serial = serial();
    let dir = s.user_dir("unpack-unshare");
    let theirs = dir.path().join("podman");
    podman_tree(s, &theirs);
    let ours = dir.path().join("ours");
    let out = s.as_user(
        &["podman", "unshare", s.bin.to_str().unwrap()],
        &[
            "unpack",
            &format!("containers-storage:{IMAGE}"),
            ours.to_str().unwrap(),
        ],
        "/usr/sbin:/usr/bin:/sbin:/bin",
    );
    assert_ok(&out, "unpack inside podman unshare");
    let err = stderr(&out);
    assert!(!err.contains("owners are not applied"), "{err}");
    assert_odd_modes(&ours);
    // Root of the namespace applies the image's owners, mapped as podman's own mount has them.
    assert_same_tree("unpack inside podman unshare", &ours, &theirs);
}
