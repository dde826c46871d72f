//! The reference tools: finding `cfsctl`, running commands, snapshotting mounted trees.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// `cfsctl` 0.9.4: `$CFSCTL`, the CI cache, or PATH.
pub fn cfsctl() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CFSCTL") {
        return Some(PathBuf::from(p));
    }
    let default = Path::new("/var/cache/splitfdstream-ci/cfsctl/bin/cfsctl");
    if default.exists() {
        return Some(default.to_owned());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("cfsctl"))
            .find(|p| p.exists())
    })
}

/// Run `cmd` under `/usr/bin/time`, which must exist; `cmd` must succeed.
/// Its peak RSS in KiB: the largest of the process and the children it waited for (helpers).
pub fn peak_rss_kib(cmd: &Command) -> u64 {
    let rss = tempfile::NamedTempFile::new().unwrap();
    run(Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(rss.path())
        .arg(cmd.get_program())
        .args(cmd.get_args()));
    // time(1) prefixes a "Command exited…" line when the command fails; the figure is last.
    std::fs::read_to_string(rss.path())
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Run `cmd`, which must succeed; its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cfsctl --repo REPO ARGS…`, which must succeed; its stdout.
pub fn cfs(cfsctl: &Path, repo: &Path, args: &[&str]) -> String {
    run(Command::new(cfsctl).arg("--repo").arg(repo).args(args))
}

/// What a tree comparison looks at for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `d`, `f`, `l`, `c`, `b`, `p`, `s`.
    pub kind: char,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// sha256 of a regular file's content, a symlink's target, or a device's rdev.
    pub data: String,
    /// Inode group: paths sharing an inode get the same first path here (hardlinks).
    pub link_group: String,
    /// Modification time, whole seconds (`stat -c %Y`), negative before 1970.
    pub mtime: i64,
}

/// Snapshot of a mounted tree (root metadata excluded: composefs's OCI transform rewrites it).
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
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
                (
                    'l',
                    std::fs::read_link(&path)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
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
                    data,
                    link_group,
                    mtime: md.mtime(),
                },
            );
        }
    }
    out
}

/// Unmounts (lazily) on drop.
#[derive(Debug)]
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
