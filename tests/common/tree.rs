//! Tree-walk comparison of two directory trees: every path's type, mode, owner, size,
//! content, link target, device number, hard-link group, xattrs and mtime.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Go's `time.Time` nanoseconds overflow after 2262-04-11; containers/storage applies such a
/// time (and any before 1970) as 0 (`pkg/system.Chtimes`). `unpack` keeps the layer's.
pub const PODMAN_MAX_MTIME: i64 = 9_223_372_036;

/// What the comparison looks at for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `d`, `f`, `l`, `c`, `b`, `p`, `s`.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// sha256 of a file's content, a symlink's target, a device's rdev.
    pub data: String,
    /// The first path (in walk order) of the inode's names: hard-link groups.
    pub link_group: String,
    pub mtime: (i64, i64),
    /// Every xattr but overlayfs's own.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every path beneath `root` (not `root` itself).
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let md = std::fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let ft = md.file_type();
            let (kind, data) = if ft.is_dir() {
                stack.push(path.clone());
                ('d', String::new())
            } else if ft.is_file() {
                let content = std::fs::read(&path).unwrap();
                ('f', hex::encode(Sha256::digest(&content)))
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&path).unwrap();
                (
                    'l',
                    String::from_utf8_lossy(t.as_os_str().as_bytes()).into_owned(),
                )
            } else if ft.is_char_device() {
                ('c', md.rdev().to_string())
            } else if ft.is_block_device() {
                ('b', md.rdev().to_string())
            } else if ft.is_fifo() {
                ('p', String::new())
            } else {
                ('s', String::new())
            };
            let link_group = if kind != 'd' && md.nlink() > 1 {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_insert_with(|| rel.clone())
                    .clone()
            } else {
                rel.clone()
            };
            out.insert(
                rel,
                Node {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if kind == 'd' { 0 } else { md.size() },
                    data,
                    link_group,
                    mtime: (md.mtime(), md.mtime_nsec()),
                    xattrs: xattrs(&path),
                },
            );
        }
    }
    out
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(path, &mut names) {
        Ok(n) => n,
        Err(_) => return BTreeMap::new(),
    };
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("trusted.overlay.") || name == "security.selinux" {
            continue;
        }
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, name.as_str(), &mut value).unwrap();
        value.truncate(len);
        out.insert(name, value);
    }
    out
}

/// Compare `ours` with podman's tree `theirs`, with podman's mtime clamping applied to ours.
pub fn assert_same_tree(name: &str, ours: &Path, theirs: &Path) {
    compare(name, ours, theirs, true);
}

/// [`assert_same_tree`] without owners: for a tree unpacked by a user who cannot give files
/// away, against podman's tree as seen from that user's namespace.
pub fn assert_same_tree_but_owners(name: &str, ours: &Path, theirs: &Path) {
    compare(name, ours, theirs, false);
}

fn compare(name: &str, ours: &Path, theirs: &Path, owners: bool) {
    let a = snapshot(ours);
    let b = snapshot(theirs);
    let only_ours: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_podman: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    assert!(
        only_ours.is_empty() && only_podman.is_empty(),
        "{name}: only ours {only_ours:?}, only podman {only_podman:?}"
    );
    for (k, v) in &a {
        let mut v = v.clone();
        if v.mtime.0 < 0 || v.mtime.0 > PODMAN_MAX_MTIME {
            v.mtime = (0, 0);
        }
        if !owners {
            (v.uid, v.gid) = (b[k].uid, b[k].gid);
        }
        assert_eq!(v, b[k], "{name}: {k}");
    }
    assert!(!a.is_empty(), "{name}: an empty tree");
}
