//! Rootless: an unprivileged user pulls from their own podman store, the helper in a user
//! namespace of its own (no podman on PATH, no root); the same inside `podman unshare`; the
//! errors a broken setup gets; process hygiene through the namespace; and a privileged helper
//! (`sudo -n`, `runuser`, `timeout`) for a parent that is not; and the image proxy as the user:
//! the reference client (`containers-image-proxy`) and `cfsctl oci pull` through it.
//!
//! Everything is made here, as root, with the real tools: a user with subordinate id ranges
//! (`useradd`, `usermod --add-subuids`), a rootless overlay store built by podman *as that
//! user* (`podman import`, then `podman build` with `COPY --chown`), and a root store holding
//! the same image (copied with skopeo) to compare with.

#[path = "../common/mod.rs"]
mod common;
mod unpack;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::proxy_client;
use common::tools::{cfs, cfsctl, run};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_splitfdstream");

/// The test user.
const USER: &str = "sfds-rootless";

/// Subordinate ids given to the test user when `useradd` gave none.
const SUB_RANGE: &str = "400000-465535";

/// The rootless setup, made once per test binary.
struct Setup {
    /// Everything of the user's lives below this world-traversable directory (a clone's
    /// `target/` may be under a directory the user cannot enter).
    base: PathBuf,
    uid: u32,
    /// The binary under test, copied where the user can run it.
    bin: PathBuf,
    /// A `PATH` directory holding only `newuidmap` and `newgidmap` (no podman).
    tools: PathBuf,
    /// The rootless store's `storage.conf` (`CONTAINERS_STORAGE_CONF`).
    conf: PathBuf,
    graphroot: PathBuf,
    /// `XDG_RUNTIME_DIR` of the user (its run root is `containers/` in it).
    runtime: PathBuf,
    /// The same `rl-app:1` image in a root store (`containers-storage:[…]` prefix).
    root_store: String,
    cfsctl: PathBuf,
}

/// Tests here change system state the others rely on (`/etc/subuid`, sudoers): one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn setup() -> Option<&'static Setup> {
    static SETUP: OnceLock<Option<Setup>> = OnceLock::new();
    SETUP
        .get_or_init(|| {
            if !rustix::process::geteuid().is_root() {
                println!("SKIP: rootless tests need root to create their user");
                return None;
            }
            for tool in [
                "podman",
                "skopeo",
                "useradd",
                "usermod",
                "runuser",
                "newuidmap",
                "newgidmap",
                "python3",
            ] {
                if !have(tool) {
                    println!("SKIP: {tool} is not installed");
                    return None;
                }
            }
            let Some(cfsctl) = cfsctl() else {
                println!("SKIP: cfsctl not found");
                return None;
            };
            Some(build(cfsctl))
        })
        .as_ref()
}

fn user_id(flag: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, USER]).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

fn has_range(file: &str) -> bool {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with(&format!("{USER}:")))
}

/// Make sure the user exists and has subordinate ranges in both files.
fn ensure_user() -> u32 {
    if user_id("-u").is_none() {
        run(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", USER]));
    }
    if !has_range("/etc/subuid") || !has_range("/etc/subgid") {
        run(Command::new("usermod").args([
            "--add-subuids",
            SUB_RANGE,
            "--add-subgids",
            SUB_RANGE,
            USER,
        ]));
    }
    user_id("-u").expect("the test user exists")
}

fn chown_user(path: &Path, uid: u32) {
    let gid = user_id("-g").unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

fn build(cfsctl: PathBuf) -> Setup {
    let uid = ensure_user();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let tag = hex::encode(&Sha256::digest(tmp.as_os_str().as_encoded_bytes())[..8]);
    let base = Path::new("/var/tmp/splitfdstream-rootless").join(tag);
    let lock_path = tmp.join("rootless.lock");
    std::fs::create_dir_all(tmp).unwrap();
    let lock = std::fs::File::create(&lock_path).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();

    std::fs::create_dir_all(&base).unwrap();
    for dir in [Path::new("/var/tmp/splitfdstream-rootless"), &base] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bin_dir = base.join("bin");
    let tools = base.join("tools");
    for d in [&bin_dir, &tools] {
        std::fs::create_dir_all(d).unwrap();
    }
    let bin = bin_dir.join("splitfdstream");
    let _ = std::fs::remove_file(&bin);
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    for t in ["newuidmap", "newgidmap"] {
        let link = tools.join(t);
        if !link.exists() {
            std::os::unix::fs::symlink(which(t), &link).unwrap();
        }
    }
    let user_dir = base.join("user");
    let graphroot = user_dir.join("storage");
    let runtime = user_dir.join("runtime");
    let conf = user_dir.join("storage.conf");
    let stamp = base.join("built-v2");
    if !stamp.exists() {
        let _ = Command::new("rm").arg("-rf").arg(&user_dir).status();
        std::fs::create_dir_all(&runtime).unwrap();
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(
            &conf,
            format!(
                "[storage]\ndriver = \"overlay\"\nrootless_storage_path = \"{}\"\n",
                graphroot.display()
            ),
        )
        .unwrap();
        for p in [&user_dir, &runtime, &conf] {
            chown_user(p, uid);
        }
        build_images(&user_dir, uid);
        std::fs::write(&stamp, b"").unwrap();
    }
    let root_graph = base.join("root-graph");
    let root_run = base.join("root-run");
    let root_store = format!(
        "containers-storage:[overlay@{}+{}]",
        root_graph.display(),
        root_run.display()
    );
    let setup = Setup {
        base,
        uid,
        bin,
        tools,
        conf,
        graphroot,
        runtime,
        root_store,
        cfsctl,
    };
    if !setup.base.join("root-built-v1").exists() {
        // The same image content in a root store: saved out of the rootless store by the
        // user's podman, copied in by root's skopeo (same layers, so the same diff_ids).
        let export = setup.base.join("export");
        let _ = std::fs::remove_dir_all(&export);
        std::fs::create_dir(&export).unwrap();
        chown_user(&export, uid);
        let layout = export.join("app");
        let out = setup.as_user(
            &["podman", "save", "--quiet", "--format", "oci-dir", "-o"],
            &[layout.to_str().unwrap(), "localhost/rl-app:1"],
            "/usr/sbin:/usr/bin:/sbin:/bin",
        );
        assert_ok(&out, "podman save out of the rootless store");
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &format!("oci:{}", layout.display()),
            &format!("{}localhost/rl-app:1", setup.root_store),
        ]));
        std::fs::write(setup.base.join("root-built-v1"), b"").unwrap();
    }
    drop(lock);
    setup
}

/// The tarballs and images of the rootless store, made as the user with podman.
fn build_images(user_dir: &Path, uid: u32) {
    let ctx = user_dir.join("context");
    std::fs::create_dir_all(&ctx).unwrap();
    // Base layer: made with GNU tar by root with numeric owners, imported by the user.
    let script = format!(
        r#"set -eu
cd {ctx}
mkdir -p base/etc base/usr/bin base/usr/share/doc base/opt
head -c 300 /dev/urandom > base/etc/shadow && chmod 000 base/etc/shadow
head -c 100000 /dev/urandom > base/usr/bin/tool && chmod 755 base/usr/bin/tool
printf 'a readable file, long enough to travel as a file descriptor: %080d\n' 0 > base/usr/share/doc/README
head -c 3000000 /dev/urandom > base/opt/blob
tar --numeric-owner --owner=0 --group=0 --sort=name -C base -cf base.tar .
mkdir -p copy/home/app copy/srv/shared
head -c 5000 /dev/urandom > copy/home/app/secret
chmod 600 copy/home/app/secret && chmod 700 copy/home/app
head -c 2000 /dev/urandom > copy/srv/shared/group-file
chmod 640 copy/srv/shared/group-file && chmod 750 copy/srv/shared
printf 'FROM localhost/rl-base:1\nCOPY --chown=1000:1000 copy/home/ /home/\nCOPY --chown=0:1500 copy/srv/ /srv/\n' > Containerfile
# Many files and a large one, for a pull that takes long enough to be killed mid-layer.
mkdir -p many/d
i=0; while [ $i -lt 40 ]; do head -c 1000000 /dev/urandom > many/d/big$i; i=$((i+1)); done
seq 1 20000 | sed 's|^|many/d/f|' | xargs touch
tar --numeric-owner --owner=0 --group=0 --sort=name -C many -cf many.tar .
mkdir -p foreign
head -c 500 /dev/urandom > foreign/foreign-file && chmod 600 foreign/foreign-file
tar --numeric-owner --owner=0 --group=0 -C foreign -cf foreign.tar .
chown -R {uid} .
"#,
        ctx = ctx.display()
    );
    run(Command::new("sh").args(["-c", &script]));
    let podman = format!(
        "set -eu; cd {ctx}; podman import -q base.tar localhost/rl-base:1 >/dev/null; \
         podman build -q --pull=never --isolation chroot -t localhost/rl-app:1 . >/dev/null; \
         podman import -q many.tar localhost/rl-many:1 >/dev/null; \
         podman import -q foreign.tar localhost/rl-foreign:1 >/dev/null",
        ctx = ctx.display()
    );
    let conf = user_dir.join("storage.conf");
    let runtime = user_dir.join("runtime");
    let out = Command::new("runuser")
        .args(["-u", USER, "--", "env", "-i"])
        .arg(format!("HOME=/home/{USER}"))
        .arg(format!("XDG_RUNTIME_DIR={}", runtime.display()))
        .arg(format!("CONTAINERS_STORAGE_CONF={}", conf.display()))
        .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
        .args(["sh", "-c", &podman])
        .output()
        .unwrap();
    assert_ok(&out, "building the rootless images with podman");
}

fn which(tool: &str) -> PathBuf {
    PathBuf::from(run(Command::new("sh").args(["-c", &format!("command -v {tool}")])).trim())
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Setup {
    /// `PATH` with only the id-mapping tools.
    fn tools_path(&self) -> String {
        self.tools.display().to_string()
    }

    /// Run `program args…` as the test user with a clean environment and `path` as `PATH`.
    fn as_user(&self, program: &[&str], args: &[&str], path: &str) -> Output {
        self.user_command(program, args, path).output().unwrap()
    }

    fn user_command(&self, program: &[&str], args: &[&str], path: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", USER, "--", "env", "-i"])
            .arg(format!("HOME=/home/{USER}"))
            .arg(format!("XDG_RUNTIME_DIR={}", self.runtime.display()))
            .arg(format!("CONTAINERS_STORAGE_CONF={}", self.conf.display()))
            .arg(format!("PATH={path}"))
            .args(program)
            .args(args);
        cmd
    }

    /// `splitfdstream ARGS…` as the user.
    fn sfds(&self, args: &[&str], path: &str) -> Output {
        self.as_user(&[self.bin.to_str().unwrap()], args, path)
    }

    /// A fresh directory owned by the user for a repository.
    fn user_dir(&self, what: &str) -> tempfile::TempDir {
        let d = tempfile::Builder::new()
            .prefix(what)
            .tempdir_in(&self.base)
            .unwrap();
        chown_user(d.path(), self.uid);
        d
    }
}

fn json(out: &Output) -> serde_json::Value {
    assert_ok(out, "splitfdstream");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The root pull of the same image content: its composefs image id.
fn root_image_id(s: &Setup) -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let dir = tempfile::tempdir_in(&s.base).unwrap();
        let repo = dir.path().join("repo");
        let out = Command::new(BIN)
            .args([
                "pull",
                &format!("{}localhost/rl-app:1", s.root_store),
                "--insecure",
                "--json",
                "--tag",
                "app",
                "--repo",
            ])
            .arg(&repo)
            .output()
            .unwrap();
        let summary = json(&out);
        cfs(&s.cfsctl, &repo, &["oci", "compute-id", "app"])
            .trim()
            .to_owned()
            + if summary["erofsImage"].is_null() {
                " (no image)"
            } else {
                ""
            }
    })
    .clone()
}

/// The checks every rootless pull must pass: the repository is sound, its image is the root
/// pull's, every object belongs to the user and is readable by them.
fn check_rootless_repo(s: &Setup, repo: &Path, summary: &serde_json::Value) {
    cfs(&s.cfsctl, repo, &["fsck"]);
    cfs(&s.cfsctl, repo, &["oci", "fsck"]);
    let id = cfs(&s.cfsctl, repo, &["oci", "compute-id", "app"]);
    assert_eq!(id.trim(), root_image_id(s));
    assert_eq!(summary["erofsImage"].as_str(), Some(id.trim()));
    let mut objects = 0;
    for entry in walk(&repo.join("objects")) {
        let md = std::fs::symlink_metadata(&entry).unwrap();
        if md.is_file() {
            assert_eq!(md.uid(), s.uid, "{} is not the user's", entry.display());
            objects += 1;
        }
    }
    assert!(objects > 0);
    let out = s.as_user(
        &["/bin/sh", "-c"],
        &[&format!(
            "find {} -type f -exec cat {{}} + > /dev/null",
            repo.join("objects").display()
        )],
        "/usr/bin:/bin",
    );
    assert_ok(&out, "reading every object as the user");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn rootless_pull_tar_and_inspect_as_the_user() {
    let Some(s) = setup() else { return };
    let _serial = serial();
    // The store really holds what a plain user cannot open.
    let shadow = walk(&s.graphroot.join("overlay"))
        .into_iter()
        .find(|p| p.ends_with("diff/etc/shadow"))
        .expect("the base layer's etc/shadow");
    assert_eq!(std::fs::metadata(&shadow).unwrap().mode() & 0o777, 0);
    let secret = walk(&s.graphroot.join("overlay"))
        .into_iter()
        .find(|p| p.ends_with("diff/home/app/secret"))
        .expect("home/app/secret");
    let md = std::fs::metadata(&secret).unwrap();
    assert_eq!(md.mode() & 0o777, 0o600);
    assert_ne!(md.uid(), s.uid, "the secret belongs to a subordinate id");
    let app = std::fs::metadata(secret.parent().unwrap()).unwrap();
    assert_eq!(app.mode() & 0o777, 0o700);
    let shared = walk(&s.graphroot.join("overlay"))
        .into_iter()
        .find(|p| p.ends_with("diff/srv/shared/group-file"))
        .expect("srv/shared/group-file");
    let shared_dir = std::fs::metadata(shared.parent().unwrap()).unwrap();
    assert_eq!(shared_dir.mode() & 0o777, 0o750);
    assert_ne!(shared_dir.gid(), user_id("-g").unwrap());

    let dir = s.user_dir("pull");
    let repo = dir.path().join("repo");
    let out = s.sfds(
        &[
            "pull",
            "containers-storage:localhost/rl-app:1",
            "--repo",
            repo.to_str().unwrap(),
            "--tag",
            "app",
            "--insecure",
            "--json",
        ],
        &s.tools_path(),
    );
    let summary = json(&out);
    let files: u64 = summary["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["files"].as_u64().unwrap())
        .sum();
    // tool, README, blob, shadow, secret, group-file: every body travelled as an fd.
    assert_eq!(files, 6, "{summary}");
    check_rootless_repo(s, &repo, &summary);

    // `tar` of every layer, as the user: the exact layer.
    let inspect = s.sfds(
        &["inspect", "containers-storage:localhost/rl-app:1", "--json"],
        &s.tools_path(),
    );
    let image = json(&inspect);
    let layers = image["layers"].as_array().unwrap();
    // The imported base and one layer per COPY.
    assert_eq!(layers.len(), 3);
    for (i, layer) in layers.iter().enumerate() {
        let out = s.sfds(
            &[
                "tar",
                "containers-storage:localhost/rl-app:1",
                "--layer",
                &i.to_string(),
            ],
            &s.tools_path(),
        );
        assert_ok(&out, "tar as the user");
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&out.stdout))),
            layer["diffId"].as_str().unwrap()
        );
    }
}

#[test]
fn rootless_pull_inside_podman_unshare() {
    let Some(s) = setup() else { return };
    let _serial = serial();
    let dir = s.user_dir("unshare");
    let repo = dir.path().join("repo");
    let out = s.as_user(
        &["podman", "unshare", s.bin.to_str().unwrap()],
        &[
            "pull",
            "containers-storage:localhost/rl-app:1",
            "--repo",
            repo.to_str().unwrap(),
            "--tag",
            "app",
            "--insecure",
            "--json",
        ],
        "/usr/sbin:/usr/bin:/sbin:/bin",
    );
    let summary = json(&out);
    // Inside podman's namespace the objects belong to its root, which is the user outside.
    check_rootless_repo(s, &repo, &summary);
}

/// Restores `/etc/subuid` on drop.
struct Restore(PathBuf, Vec<u8>);
impl Drop for Restore {
    fn drop(&mut self) {
        std::fs::write(&self.0, &self.1).unwrap();
    }
}

#[test]
fn rootless_setup_errors_are_clear() {
    let Some(s) = setup() else { return };
    let _serial = serial();
    let dir = s.user_dir("errors");
    let repo = dir.path().join("repo");
    let pull = |path: &str| {
        s.sfds(
            &[
                "pull",
                "containers-storage:localhost/rl-app:1",
                "--repo",
                repo.to_str().unwrap(),
                "--insecure",
            ],
            path,
        )
    };

    // No newuidmap on PATH.
    let empty = s.user_dir("empty-path");
    let out = pull(empty.path().to_str().unwrap());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("newuidmap not found") && err.contains("package `uidmap`"),
        "{err}"
    );

    // A newuidmap that is not set-user-ID.
    let fake = s.user_dir("fake-path");
    for t in ["newuidmap", "newgidmap"] {
        std::fs::copy(which(t), fake.path().join(t)).unwrap();
        std::fs::set_permissions(fake.path().join(t), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    let out = pull(fake.path().to_str().unwrap());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("is neither set-user-ID root nor given capabilities"),
        "{err}"
    );

    // No range in /etc/subuid.
    let subuid = std::fs::read("/etc/subuid").unwrap();
    let restore = Restore("/etc/subuid".into(), subuid.clone());
    let kept: String = String::from_utf8(subuid)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with(&format!("{USER}:")))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write("/etc/subuid", kept).unwrap();
    let out = pull(&s.tools_path());
    drop(restore);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "/etc/subuid has no subordinate id range for user {USER} (uid {})",
            s.uid
        )) && err.contains(&format!("`{USER}:100000:65536`")),
        "{err}"
    );
    assert!(!repo.join("objects").exists() || walk(&repo.join("objects")).is_empty());

    // A file owned by an id outside the user's ranges.
    let foreign = walk(&s.graphroot.join("overlay"))
        .into_iter()
        .find(|p| p.ends_with("diff/foreign-file"))
        .expect("the foreign image's file");
    std::os::unix::fs::chown(&foreign, Some(900_000), Some(900_000)).unwrap();
    let layer_id = foreign
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let out = s.sfds(
        &[
            "tar",
            "containers-storage:localhost/rl-foreign:1",
            "--layer",
            "0",
        ],
        &s.tools_path(),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&layer_id)
            && err.contains("foreign-file")
            && err.contains("outside this helper's user namespace"),
        "{err}"
    );
}

/// pids of the user's processes whose command line contains `pattern`.
fn user_processes(uid: u32, pattern: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap() {
        let Ok(pid) = e.unwrap().file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(md) = std::fs::metadata(format!("/proc/{pid}")) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if md.uid() == uid && cmdline.contains(pattern) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn sigkill_of_a_rootless_pull_leaves_no_helper() {
    let Some(s) = setup() else { return };
    let _serial = serial();
    let dir = s.user_dir("killed");
    let repo = dir.path().join("repo");
    let args = [
        "pull",
        "containers-storage:localhost/rl-many:1",
        "--repo",
        repo.to_str().unwrap(),
        "--insecure",
    ];
    let mut child = s
        .user_command(&[s.bin.to_str().unwrap()], &args, &s.tools_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the helper streams, then kill the pull itself (not runuser).
    let start = Instant::now();
    let puller = loop {
        let helpers = user_processes(s.uid, "splitfdstream helper");
        let pullers = user_processes(s.uid, "splitfdstream pull");
        if !helpers.is_empty() && !pullers.is_empty() && repo.join("objects").exists() {
            break pullers[0];
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the pull never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_millis(50));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(puller as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let _ = child.wait();
    let killed = Instant::now();
    while !user_processes(s.uid, "splitfdstream").is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "processes left 1 s after SIGKILL: {:?}",
            user_processes(s.uid, "splitfdstream")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = s.sfds(&args, &s.tools_path());
    assert_ok(&out, "the pull after a SIGKILL");
    cfs(&s.cfsctl, &repo, &["fsck"]);
}

/// Adds a sudoers drop-in for the test user while alive.
struct Sudoers(PathBuf);
impl Sudoers {
    fn allow(s: &Setup) -> Sudoers {
        let path = PathBuf::from("/etc/sudoers.d/splitfdstream-rootless-test");
        std::fs::write(
            &path,
            // Only the helper subcommand, as the README advises.
            format!("{USER} ALL=(root) NOPASSWD: {} helper *\n", s.bin.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
        Sudoers(path)
    }
}
impl Drop for Sudoers {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn privileged_helper_for_an_unprivileged_parent() {
    let Some(s) = setup() else { return };
    if !have("sudo") {
        println!("SKIP: sudo is not installed");
        return;
    }
    let _serial = serial();
    let _sudoers = Sudoers::allow(s);
    let source = format!("{}localhost/rl-app:1", s.root_store);
    // The user reads root's store through `sudo -n`.
    let dir = s.user_dir("sudo");
    let repo = dir.path().join("repo");
    let out = s.sfds(
        &[
            "pull",
            &source,
            "--repo",
            repo.to_str().unwrap(),
            "--tag",
            "app",
            "--insecure",
            "--json",
            "--helper-prefix",
            "sudo -n",
        ],
        "/usr/sbin:/usr/bin:/sbin:/bin",
    );
    let summary = json(&out);
    check_rootless_repo(s, &repo, &summary);

    // Wrappers that fork (the helper is not the parent's child): runuser and timeout.
    for prefix in ["runuser -u root --", "timeout 60"] {
        let dir = tempfile::tempdir_in(&s.base).unwrap();
        let repo = dir.path().join("repo");
        let out = Command::new(BIN)
            .args(["pull", &source, "--insecure", "--json", "--tag", "app"])
            .args(["--helper-prefix", prefix, "--repo"])
            .arg(&repo)
            .output()
            .unwrap();
        let summary = json(&out);
        assert_eq!(
            summary["erofsImage"].as_str(),
            Some(root_image_id(s).as_str())
        );
        cfs(&s.cfsctl, &repo, &["fsck"]);
    }

    // A privileged helper refuses a store the user owns.
    let own = format!(
        "containers-storage:[overlay@{}+{}]localhost/rl-app:1",
        s.graphroot.display(),
        s.runtime.join("containers").display()
    );
    let out = s.sfds(
        &["inspect", &own, "--helper-prefix", "sudo -n"],
        "/usr/sbin:/usr/bin:/sbin:/bin",
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "refusing to serve {} as a privileged helper for uid {}",
            s.graphroot.display(),
            s.uid
        )),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The image proxy (`experimental-image-proxy`) as the user.

/// Environment of the client half of [`the_reference_client_reads_the_users_store`]: the proxy
/// program and the image to read.
const CLIENT_PROGRAM: &str = "SFDS_PROXY_CLIENT_PROGRAM";
const CLIENT_IMAGE: &str = "SFDS_PROXY_CLIENT_IMAGE";

/// The line of the client half's stdout that carries its result.
const CLIENT_RESULT: &str = "PROXY-CLIENT-RESULT ";

/// Not a test of its own: the client half of [`the_reference_client_reads_the_users_store`],
/// run *as the user* by re-executing this test binary with [`CLIENT_PROGRAM`] set (the reference
/// client spawns the proxy itself, so the whole client process must be the user's). Without
/// that variable it does nothing.
#[test]
fn proxy_client_half() {
    let (Some(program), Ok(name)) = (
        std::env::var_os(CLIENT_PROGRAM),
        std::env::var(CLIENT_IMAGE),
    ) else {
        return;
    };
    assert!(
        !rustix::process::geteuid().is_root(),
        "the client half runs as the rootless user"
    );
    let read =
        proxy_client::runtime().block_on(proxy_client::read_image(Path::new(&program), &name));
    let result = serde_json::json!({
        "manifestDigest": read.manifest_digest,
        "layers": read.layers,
        "diffIds": read.diff_ids,
    });
    println!("{CLIENT_RESULT}{result}");
}

/// The user's own `containers-storage:` image through our proxy, with the reference client in a
/// process of the user's (no podman on PATH, only the id-mapping tools): manifest, full config,
/// layer infos and every blob, each digest checked by the proxy and by the client.
#[test]
fn the_reference_client_reads_the_users_store() {
    let Some(s) = setup() else { return };
    let _serial = serial();
    // This test binary, where the user can run it.
    let client = s.base.join("bin").join("rootless-proxy-client");
    let staged = client.with_extension("new");
    std::fs::copy(std::env::current_exe().unwrap(), &staged).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, &client).unwrap();
    let image = "containers-storage:localhost/rl-app:1";
    let out = s.as_user(
        &[
            &format!("{CLIENT_PROGRAM}={}", s.bin.display()),
            &format!("{CLIENT_IMAGE}={image}"),
            client.to_str().unwrap(),
        ],
        &[
            "--exact",
            "proxy_client_half",
            "--nocapture",
            "--test-threads=1",
        ],
        &s.tools_path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the reference client as the user: {}\n{stdout}\n{}",
        out.status,
        stderr(&out)
    );
    let result: serde_json::Value = stdout
        .lines()
        // The harness prints "test NAME ... " before the line.
        .find_map(|l| l.split_once(CLIENT_RESULT).map(|(_, json)| json))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or_else(|| panic!("no result from the client half: {stdout}"));
    // The same image as `splitfdstream inspect` sees it as the user.
    let inspect = json(&s.sfds(&["inspect", image, "--json"], &s.tools_path()));
    let diff_ids: Vec<&serde_json::Value> = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["diffId"])
        .collect();
    assert_eq!(diff_ids.len(), 3, "{inspect}");
    let served: Vec<&serde_json::Value> = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l[0])
        .collect();
    assert_eq!(served, diff_ids, "{result}");
    assert_eq!(
        result["diffIds"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        diff_ids
    );
}

/// `cfsctl oci pull containers-storage:IMG` as the user (its default path, through `skopeo
/// experimental-image-proxy`) with a `skopeo` first on PATH that runs our proxy: it succeeds
/// where skopeo's own proxy cannot open a rootless store, and `cfsctl oci compute-id` equals the
/// id of `splitfdstream pull` of the same image as the user.
#[test]
fn cfsctl_pulls_through_our_proxy_as_the_user() {
    let Some(s) = setup() else { return };
    let _serial = serial();
    let image = "containers-storage:localhost/rl-app:1";
    let dir = s.user_dir("cfsctl-proxy");
    // cfsctl run by a non-root user spawns `podman unshare skopeo experimental-image-proxy …`
    // (composefs-oci 0.9.4), so the user gets a `podman` that, for exactly that, runs our
    // proxy, which needs no namespace made for it; and a `skopeo` for the root form.
    let wrappers = dir.path().join("bin");
    std::fs::create_dir(&wrappers).unwrap();
    let proxy = format!(
        "exec '{}' experimental-image-proxy \"$@\"\n",
        s.bin.display()
    );
    let scripts = [
        (
            "skopeo",
            format!("#!/bin/sh\n[ \"$1\" = experimental-image-proxy ] && shift\n{proxy}"),
        ),
        (
            "podman",
            format!(
                "#!/bin/sh\n[ \"$1 $2 $3\" = 'unshare skopeo experimental-image-proxy' ] || \
                 {{ echo \"podman shim: $*\" >&2; exit 2; }}\nshift 3\n{proxy}"
            ),
        ),
    ];
    chown_user(&wrappers, s.uid);
    for (name, text) in scripts {
        let script = wrappers.join(name);
        std::fs::write(&script, text).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        chown_user(&script, s.uid);
    }
    let ours = dir.path().join("ours");
    let summary = json(&s.sfds(
        &[
            "pull",
            image,
            "--repo",
            ours.to_str().unwrap(),
            "--tag",
            "app",
            "--insecure",
            "--json",
        ],
        &s.tools_path(),
    ));
    let theirs = dir.path().join("theirs");
    let path = format!("{}:{}", wrappers.display(), s.tools_path());
    let cfsctl = |args: &[&str]| {
        let mut all = vec!["--repo", theirs.to_str().unwrap()];
        all.extend_from_slice(args);
        s.as_user(&[s.cfsctl.to_str().unwrap()], &all, &path)
    };
    if !cfsctl(&["init"]).status.success() {
        assert_ok(&cfsctl(&["init", "--insecure"]), "cfsctl init as the user");
    }
    let started = Instant::now();
    assert_ok(
        &cfsctl(&["oci", "pull", image, "app"]),
        "cfsctl oci pull through our proxy as the user",
    );
    println!(
        "cfsctl oci pull as the user through our proxy: {:?}",
        started.elapsed()
    );
    let id = cfsctl(&["oci", "compute-id", "app"]);
    assert_ok(&id, "cfsctl oci compute-id as the user");
    assert_eq!(
        String::from_utf8_lossy(&id.stdout).trim(),
        summary["erofsImage"].as_str().unwrap(),
        "composefs image ids differ"
    );
    assert_eq!(
        summary["erofsImage"].as_str(),
        Some(root_image_id(s).as_str())
    );
}
