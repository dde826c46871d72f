//! The user namespace of a rootless helper: the parent's half ([`IdMaps`]) and the helper's
//! ([`enter_and_wait`]).
//!
//! A rootless podman store holds files owned by the user's subordinate ids (container uids
//! ≥ 1) and files the user owns but cannot open (mode 000, 0600 under a 0700 directory of a
//! subordinate id). podman reaches them from a user namespace that maps the user's uid to 0
//! and the ranges of `/etc/subuid` and `/etc/subgid` after it, set up with the setuid helpers
//! `newuidmap`/`newgidmap` (containers/storage `pkg/unshare`). The helper enters the same kind
//! of namespace: it calls `unshare(CLONE_NEWUSER)` first thing and says so; the parent, still
//! outside, writes the maps with `newuidmap`/`newgidmap` and releases it. Every fd the helper
//! opens inside stays readable outside (access is checked at open), so bodies still travel as
//! fds and the parent writes the repository as the user.
//!
//! The handshake uses what the helper already has, so no descriptor beyond the usual three
//! is inherited: the helper writes one byte ([`ENTERED`]) to its stdout, a pipe the parent
//! reads; the parent maps the ids and then sends one space byte ([`MAPPED`]) on the protocol
//! socket before its first request (JSON whitespace between messages is skipped anyway,
//! `proto/rpc.md` §1.2). If the parent dies or gives up instead, the socket reaches end of
//! file and the helper exits.
//!
//! ```text
//! ids inside the namespace     ids outside (what the disk stores)
//! 0                            the user's uid / gid
//! 1 .. 1+n₁                    first /etc/subuid (/etc/subgid) range of the user
//! 1+n₁ .. 1+n₁+n₂              second range, …
//! ```

use std::io::Write;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

/// Where the subordinate id ranges are.
pub const SUBUID_FILE: &str = "/etc/subuid";
/// Where the subordinate gid ranges are.
pub const SUBGID_FILE: &str = "/etc/subgid";
/// The user database, for the user's name (the ranges file names users by name or uid).
const PASSWD_FILE: &str = "/etc/passwd";
/// Largest `/etc/subuid`, `/etc/subgid` or `/etc/passwd` read.
const MAX_ID_FILE: u64 = 16 << 20;
/// Where the setuid helpers are looked for when `$PATH` is unset.
const ID_TOOL_DIRS: [&str; 2] = ["/usr/bin", "/usr/sbin"];

/// One line of a namespace's id map: `count` ids from `inside` map to ids from `outside`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id inside the namespace.
    pub inside: u32,
    /// First id outside.
    pub outside: u32,
    /// How many.
    pub count: u32,
}

/// The maps a rootless helper's namespace gets, as podman's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMaps {
    /// Name of the user (for messages), or its uid when it has none.
    pub user: String,
    /// uid map: the user's uid at 0, then its subordinate ranges.
    pub uids: Vec<IdRange>,
    /// gid map: the user's gid at 0, then its subordinate ranges.
    pub gids: Vec<IdRange>,
}

impl IdMaps {
    /// The maps for the calling user, from `/etc/subuid` and `/etc/subgid`.
    ///
    /// # Errors
    /// A file cannot be read, or it has no range for the user: the message names the file
    /// and the line to add.
    pub fn for_current_user() -> anyhow::Result<IdMaps> {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let name = read_small(Path::new(PASSWD_FILE))
            .ok()
            .and_then(|text| user_name(&text, uid));
        let subuid = read_small(Path::new(SUBUID_FILE))?;
        let subgid = read_small(Path::new(SUBGID_FILE))?;
        Self::from_files(uid, gid, name.as_deref(), &subuid, &subgid)
    }

    /// The maps for `uid`/`gid` (user `name`) from the texts of the two range files.
    ///
    /// # Errors
    /// No range for the user in one of them.
    pub fn from_files(
        uid: u32,
        gid: u32,
        name: Option<&str>,
        subuid: &str,
        subgid: &str,
    ) -> anyhow::Result<IdMaps> {
        let user = name.map_or_else(|| uid.to_string(), str::to_owned);
        let ranges = |text: &str, own: u32, file: &str| -> anyhow::Result<Vec<IdRange>> {
            let sub = subordinate_ranges(text, uid, name);
            if sub.is_empty() {
                bail!(
                    "{file} has no subordinate id range for user {user} (uid {uid}): a rootless \
                     store needs one; add a line such as `{user}:100000:65536` (for example with \
                     `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`)"
                );
            }
            let mut map = vec![IdRange {
                inside: 0,
                outside: own,
                count: 1,
            }];
            let mut next = 1u32;
            for (start, count) in sub {
                map.push(IdRange {
                    inside: next,
                    outside: start,
                    count,
                });
                next = next.checked_add(count).with_context(|| {
                    format!("{file}: the ranges of user {user} add up to more than 2^32 ids")
                })?;
            }
            Ok(map)
        };
        Ok(IdMaps {
            uids: ranges(subuid, uid, SUBUID_FILE)?,
            gids: ranges(subgid, gid, SUBGID_FILE)?,
            user,
        })
    }

    /// Write the maps of process `pid` (which has just entered its new user namespace) with
    /// `newuidmap` and `newgidmap`.
    ///
    /// # Errors
    /// A tool is missing or not privileged (the message names the package), or refused.
    pub fn apply(&self, pid: rustix::process::Pid) -> anyhow::Result<()> {
        for (tool, map) in [("newuidmap", &self.uids), ("newgidmap", &self.gids)] {
            let path = find_id_tool(tool)?;
            let mut cmd = Command::new(&path);
            cmd.arg(pid.as_raw_nonzero().to_string());
            for r in map {
                cmd.args([
                    r.inside.to_string(),
                    r.outside.to_string(),
                    r.count.to_string(),
                ]);
            }
            let out = cmd
                .output()
                .with_context(|| format!("running {}", path.display()))?;
            ensure!(
                out.status.success(),
                "{} {} for the rootless helper failed ({}): {}",
                path.display(),
                cmd.get_args()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Read one of the small system files.
fn read_small(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_ID_FILE).read_to_string(&mut text))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(text)
}

/// The name of `uid` in a passwd-format text.
fn user_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

/// The `(start, count)` ranges a subuid/subgid text gives the user (by name or by uid), in
/// file order, as shadow-utils reads it: `owner:start:count` per line.
fn subordinate_ranges(text: &str, uid: u32, name: Option<&str>) -> Vec<(u32, u32)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut f = line.split(':');
            let owner = f.next()?;
            let start: u32 = f.next()?.trim().parse().ok()?;
            let count: u32 = f.next()?.trim().parse().ok()?;
            let mine = Some(owner) == name || owner.parse::<u32>().ok() == Some(uid);
            (mine && count > 0).then_some((start, count))
        })
        .collect()
}

/// `newuidmap` or `newgidmap`, checked to be able to do its job: set-user-ID root or carrying
/// file capabilities (some distributions ship it with `cap_setuid`/`cap_setgid` instead).
fn find_id_tool(name: &str) -> anyhow::Result<PathBuf> {
    let dirs: Vec<PathBuf> = match std::env::var_os("PATH").filter(|p| !p.is_empty()) {
        Some(p) => std::env::split_paths(&p).collect(),
        None => ID_TOOL_DIRS.iter().map(PathBuf::from).collect(),
    };
    let Some(path) = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()) else {
        bail!(
            "{name} not found: a rootless helper needs newuidmap and newgidmap (Debian and \
             Ubuntu package `uidmap`, Fedora `shadow-utils`)"
        );
    };
    let st = rustix::fs::stat(&path).with_context(|| format!("inspecting {}", path.display()))?;
    let setuid_root = st.st_uid == 0 && st.st_mode & 0o4000 != 0;
    let has_caps = rustix::fs::getxattr(&path, "security.capability", &mut [0u8; 64]).is_ok();
    ensure!(
        setuid_root || has_caps,
        "{} is neither set-user-ID root nor given capabilities, so it cannot map the rootless \
         helper's ids; reinstall the package that provides it (`uidmap` on Debian and Ubuntu)",
        path.display()
    );
    Ok(path)
}

/// Does this process already run in a user namespace other than the initial one (`podman
/// unshare`, a rootless container)? Then it already has whatever ids it can get.
pub fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

/// The byte the helper writes once it is in its new namespace.
pub const ENTERED: u8 = b'u';
/// The byte the parent sends on the socket once the maps are written.
pub const MAPPED: u8 = b' ';

/// Enter a new user namespace, tell the parent through stdout, and wait on `sock` until it
/// has mapped our ids. Afterwards this process is uid and gid 0 of the namespace, with every
/// capability there: it can open the files of the ids mapped into it, whatever their modes.
///
/// Must be called while the process has one thread: the kernel refuses `unshare
/// (CLONE_NEWUSER)` to a multithreaded process.
///
/// # Errors
/// The kernel refused the namespace (unprivileged user namespaces disabled, or threads),
/// the parent went away, or the maps it wrote do not make us root of the namespace.
pub fn enter_and_wait(sock: BorrowedFd<'_>) -> anyhow::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: `unshare_unsafe` is unsafe because `CLONE_FILES` would let threads see different
    // fd tables; only `CLONE_NEWUSER` is asked for, which leaves the fd table shared.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER) }.context(
        "creating a user namespace (are unprivileged user namespaces enabled? see \
         /proc/sys/user/max_user_namespaces)",
    )?;
    let mut out = std::io::stdout().lock();
    out.write_all(&[ENTERED])
        .and_then(|()| out.flush())
        .context("telling the parent the user namespace exists")?;
    drop(out);
    let mut byte = [0u8; 1];
    let n = loop {
        match rustix::net::recv(sock, &mut byte, rustix::net::RecvFlags::empty()) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.context("waiting for the parent to map our ids")?.0,
        }
    };
    if n == 0 {
        bail!("the parent went away before it mapped the helper's ids");
    }
    ensure!(
        byte[0] == MAPPED,
        "unexpected byte {:#04x} from the parent while waiting for the id maps",
        byte[0]
    );
    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    ensure!(
        uid.is_root() && gid.is_root(),
        "the user namespace's maps do not make the helper root in it (uid {}, gid {})",
        uid.as_raw(),
        gid.as_raw()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_like_podman() {
        let subuid = "# comment\nother:200000:65536\nalice:100000:65536\n1000:300000:1000\n";
        let subgid = "alice:100000:65536\n";
        let m = IdMaps::from_files(1000, 1001, Some("alice"), subuid, subgid).unwrap();
        assert_eq!(m.user, "alice");
        let r = |inside, outside, count| IdRange {
            inside,
            outside,
            count,
        };
        assert_eq!(
            m.uids,
            [r(0, 1000, 1), r(1, 100000, 65536), r(65537, 300000, 1000)]
        );
        assert_eq!(m.gids, [r(0, 1001, 1), r(1, 100000, 65536)]);
    }

    #[test]
    fn a_missing_range_names_the_file_and_the_line() {
        let err = IdMaps::from_files(1000, 1000, Some("bob"), "alice:100000:65536\n", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/subuid has no subordinate id range for user bob (uid 1000)"),
            "{err}"
        );
        assert!(err.contains("`bob:100000:65536`"), "{err}");
        let err = IdMaps::from_files(1000, 1000, Some("bob"), "bob:1:2\n", "")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/subgid has no"), "{err}");
    }

    #[test]
    fn names_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_name(passwd, 7), None);
    }
}
