//! `cfsctl oci mount` of an image written by our repository writer shows the merged tree.
//!
//! Needs root, the real cfsctl 0.9.4 and kernel EROFS + overlayfs; skips with a reason when a
//! piece is missing.

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::tools::cfsctl;
use sha2::{Digest, Sha256};
use splitfdstream::repo::{HashAlg, LayerImporter, RepoOptions, Repository, prepare_image};

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn octal(f: &[u8]) -> u64 {
    let s: String = f
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    u64::from_str_radix(s.trim(), 8).unwrap_or(0)
}

/// Feed a GNU-format tar to the importer: regular-file bodies as memfds, the rest inline.
fn import(repo: &Repository, tar: &[u8]) -> splitfdstream::repo::ObjectId {
    let mut imp = LayerImporter::new(repo).unwrap();
    let mut pos = 0;
    let mut inline_from = 0;
    while pos + 512 <= tar.len() {
        let h = &tar[pos..pos + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let size = octal(&h[124..136]) as usize;
        let body = pos + 512;
        if matches!(h[156], b'0' | 0) && size > 0 {
            imp.inline(&tar[inline_from..body]).unwrap();
            let fd = rustix::fs::memfd_create("body", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
            let mut f = fs::File::from(fd);
            f.write_all(&tar[body..body + size]).unwrap();
            let fd = OwnedFd::from(f);
            imp.file(fd.as_fd(), size as u64).unwrap();
            inline_from = body + size;
        }
        pos = body + size.div_ceil(512) * 512;
    }
    imp.inline(&tar[inline_from..]).unwrap();
    imp.finish(&sha256_digest(tar)).unwrap()
}

fn make_tar(src: &Path) -> Vec<u8> {
    run(Command::new("tar")
        .args(["--format=gnu", "--sort=name", "-C"])
        .arg(src)
        .args(["-cf", "-", "."]))
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn cfsctl_oci_mount_shows_the_merged_tree() {
    let Some(cfsctl) = cfsctl() else {
        eprintln!("SKIP: cfsctl not found (set CFSCTL or install composefs-ctl 0.9.4)");
        return;
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP: mounting composefs needs root");
        return;
    }
    let fss = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fss.contains("erofs") || !fss.contains("overlay") {
        eprintln!("SKIP: the kernel lacks erofs or overlay support");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("repo-erofs-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let t = tmp.path();

    // Base layer.
    let base = t.join("base");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    fs::create_dir_all(base.join("usr/bin")).unwrap();
    fs::create_dir_all(base.join("etc")).unwrap();
    fs::create_dir_all(base.join("opt/old")).unwrap();
    fs::write(base.join("usr/bin/tool"), &big).unwrap();
    fs::set_permissions(base.join("usr/bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::hard_link(base.join("usr/bin/tool"), base.join("usr/bin/tool2")).unwrap();
    std::os::unix::fs::symlink("tool", base.join("usr/bin/sym")).unwrap();
    fs::write(base.join("etc/small"), b"tiny\n").unwrap();
    fs::write(base.join("etc/gone"), b"deleted by layer 2\n").unwrap();
    fs::write(base.join("opt/old/file"), vec![3u8; 100]).unwrap();
    // Top layer: whiteout, opaque dir, replacement.
    let top = t.join("top");
    fs::create_dir_all(top.join("etc")).unwrap();
    fs::write(top.join("etc/.wh.gone"), b"").unwrap();
    fs::create_dir_all(top.join("opt/old")).unwrap();
    fs::write(top.join("opt/old/.wh..wh..opq"), b"").unwrap();
    fs::write(top.join("opt/old/new"), vec![9u8; 5000]).unwrap();
    fs::write(top.join("etc/small"), b"replaced\n").unwrap();
    let layers = [make_tar(&base), make_tar(&top)];

    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256_digest(&config), "size": config.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": sha256_digest(l), "size": l.len()})).collect::<Vec<_>>(),
    }))
    .unwrap();

    let repo_path = t.join("repo");
    let repo = Repository::open_or_create(&repo_path, &insecure(None)).unwrap();
    let refs: Vec<_> = layers
        .iter()
        .map(|l| (sha256_digest(l), import(&repo, l)))
        .collect();
    let prepared = prepare_image(
        &repo,
        &manifest,
        &sha256_digest(&manifest),
        &config,
        &sha256_digest(&config),
        &refs,
    )
    .unwrap();
    repo.sync().unwrap();
    let published = prepared.publish(&repo, Some("mnt-test")).unwrap();
    repo.sync().unwrap();
    assert!(
        published.erofs_image.is_some(),
        "{:?}",
        published.erofs_skipped
    );
    drop(repo);

    let mnt = t.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(&cfsctl)
        .arg("--repo")
        .arg(&repo_path)
        .args(["oci", "mount", "--fuse", "no", "mnt-test"])
        .arg(&mnt)
        .output()
        .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // Only a kernel that cannot mount composefs at all is a reason to skip.
        if err.contains("Operation not supported") || err.contains("No such device") {
            eprintln!("SKIP: the kernel cannot mount composefs: {err}");
            return;
        }
        panic!("cfsctl oci mount failed: {err}");
    }
    let _guard = Unmount(mnt.clone());

    assert_eq!(fs::read(mnt.join("usr/bin/tool")).unwrap(), big);
    let md = fs::metadata(mnt.join("usr/bin/tool")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        md.ino(),
        fs::metadata(mnt.join("usr/bin/tool2")).unwrap().ino(),
        "hardlink shares the inode"
    );
    assert_eq!(
        fs::read_link(mnt.join("usr/bin/sym")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(fs::read(mnt.join("etc/small")).unwrap(), b"replaced\n");
    assert!(!mnt.join("etc/gone").exists(), "whiteout removed it");
    assert!(!mnt.join("etc/.wh.gone").exists());
    let mut old: Vec<String> = fs::read_dir(mnt.join("opt/old"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    old.sort();
    assert_eq!(old, ["new"], "opaque directory hides the lower layer");
    assert_eq!(fs::read(mnt.join("opt/old/new")).unwrap(), vec![9u8; 5000]);
}

/// Options for a repository on the test filesystems, which have no fs-verity here (as
/// `cfsctl init --insecure`).
fn insecure(hash: Option<HashAlg>) -> RepoOptions {
    RepoOptions {
        hash,
        insecure: true,
    }
}
