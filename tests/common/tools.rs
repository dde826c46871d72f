//! The reference tools: finding `cfsctl`, running commands, snapshotting mounted trees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Snapshot of a mounted tree (root metadata excluded: composefs's OCI transform rewrites it):
/// [`super::tree::snapshot`]'s walk, seen as `stat -c %Y` sees times and without sizes and
/// xattrs, which a composefs mount and podman's overlay mount present differently.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    super::tree::snapshot(root)
        .into_iter()
        .map(|(path, n)| {
            let node = Node {
                kind: n.kind,
                mode: n.mode,
                uid: n.uid,
                gid: n.gid,
                data: n.data,
                link_group: n.link_group,
                mtime: n.mtime.0,
            };
            (path, node)
        })
        .collect()
}

/// Unmounts (lazily) on drop.
#[derive(Debug)]
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
