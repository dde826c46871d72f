//! Images pulled from a registry: manifests that name gzip or zstd blobs, and containers-storage
//! records of compressed and uncompressed digests. The fixtures are pushed to a local
//! `docker-registry` with podman and pulled back into a store of their own; each image is then
//! pulled into composefs by name and by the digest podman reports, and compared with `cfsctl`'s
//! own pull of the same store, and read through our image proxy with the reference client.
//!
//! `cfsctl oci pull --local-fetch auto containers-storage:REF` ignores storage.conf and the
//! bracketed store syntax, but searches `$CONTAINERS_STORAGE_ROOT` before the default stores
//! (composefs-oci 0.9.4 `cstor::storage_search_paths`): that is how it is pointed at a test
//! store. Its default transport (skopeo's image proxy) cannot be used: Debian's skopeo 1.9.3
//! lacks the `GetLayerInfoPiped` method it needs for containers-storage.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{FixtureImage, PrivateStore};
use common::proxy_client;
use common::tools::{cfs, cfsctl, run};
use common::{Fixtures, fixtures};
use sha2::{Digest, Sha256};
use splitfdstream::repo::{RepoOptions, Repository, SplitStreamReader};

const BIN: &str = env!("CARGO_BIN_EXE_splitfdstream");
const REGISTRY: &str = "/usr/bin/docker-registry";
/// How long the registry may take to say where it listens.
const REGISTRY_START: Duration = Duration::from_secs(20);
/// The fixtures pushed: ordinary content, and tar oddities (xattrs, devices, long and
/// non-UTF-8 names, an empty layer).
const IMAGES: [&str; 2] = ["basic", "odd"];

fn tools() -> Option<(&'static Fixtures, PathBuf)> {
    let f = fixtures()?;
    let Some(c) = cfsctl() else {
        println!("SKIP: cfsctl not found (set CFSCTL or install composefs-ctl 0.9.4)");
        return None;
    };
    if !Path::new(REGISTRY).exists() {
        println!("SKIP: {REGISTRY} not found (Debian package docker-registry)");
        return None;
    }
    Some((f, c))
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A `docker-registry` listening on 127.0.0.1 only, on a port the kernel chose, with its
/// storage in a temporary directory; killed and reaped when dropped, also when a test fails.
struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yml");
        // Port 0: the kernel picks a free port, and the registry logs the address it got,
        // so no other process can take the port between choosing and binding it.
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  \
                 filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log_path = dir.path().join("registry.log");
        let log = File::create(&log_path).unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {REGISTRY}: {e}"));
        let mut registry = Registry {
            child,
            addr: String::new(),
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .and_then(|rest| rest.split(['"', ' ']).next())
            {
                assert!(addr.starts_with("127.0.0.1:"), "{text}");
                registry.addr = addr.to_owned();
                return registry;
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("{REGISTRY} exited ({status}) before listening:\n{text}");
            }
            assert!(
                started.elapsed() < REGISTRY_START,
                "{REGISTRY} did not listen within {REGISTRY_START:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Unmounts (lazily) everything mounted beneath a directory on drop: podman leaves the
/// overlay driver's bind mount of `GRAPHROOT/overlay` behind, which would keep the
/// temporary store from being removed.
struct UnmountBeneath(PathBuf);

impl Drop for UnmountBeneath {
    fn drop(&mut self) {
        let prefix = format!("{}/", self.0.display());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut targets: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|t| t.starts_with(&prefix))
            .collect();
        targets.sort_unstable_by(|a, b| b.cmp(a));
        targets.dedup();
        for t in targets {
            let _ = Command::new("umount").arg("-l").arg(t).status();
        }
    }
}

/// `podman` on the store at `graphroot`/`runroot`, which must succeed.
fn podman(graphroot: &Path, runroot: &Path, args: &[&str]) -> Output {
    let out = Command::new("podman")
        .arg("--storage-driver=overlay")
        .arg("--root")
        .arg(graphroot)
        .arg("--runroot")
        .arg(runroot)
        .arg("--tmpdir")
        .arg(runroot.join("libpod-tmp"))
        .args(args)
        .output()
        .expect("running podman");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A store of its own on the fixtures' filesystem, removed on drop.
struct Store {
    graphroot: PathBuf,
    runroot: PathBuf,
    _unmount: UnmountBeneath,
    _dir: tempfile::TempDir,
    _run_dir: tempfile::TempDir,
}

impl Store {
    fn new(f: &Fixtures) -> Store {
        let base = f.out.join("registry-stores");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::TempDir::new_in(&base).unwrap();
        let graphroot = dir.path().join("graph");
        std::fs::create_dir(&graphroot).unwrap();
        // podman refuses a run root longer than 50 bytes.
        let run_dir = tempfile::TempDir::new().unwrap();
        Store {
            runroot: run_dir.path().to_owned(),
            _unmount: UnmountBeneath(graphroot.clone()),
            graphroot,
            _dir: dir,
            _run_dir: run_dir,
        }
    }

    /// A copy of this store (reflinked where the filesystem can), to damage.
    fn copy(&self, f: &Fixtures) -> Store {
        let copy = Store::new(f);
        run(Command::new("cp")
            .args(["-a", "--reflink=auto", "--no-target-directory"])
            .arg(&self.graphroot)
            .arg(&copy.graphroot));
        copy
    }

    fn podman(&self, args: &[&str]) -> Output {
        podman(&self.graphroot, &self.runroot, args)
    }

    /// `containers-storage:[overlay@GRAPHROOT+RUNROOT]REF`.
    fn source(&self, reference: &str) -> String {
        format!(
            "containers-storage:[overlay@{}+{}]{reference}",
            self.graphroot.display(),
            self.runroot.display()
        )
    }

    /// The manifest digest podman reports for `reference` (images.json `digest`).
    fn podman_digest(&self, reference: &str) -> String {
        let out = self.podman(&["image", "inspect", "--format", "{{.Digest}}", reference]);
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn records(&self, rel: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.graphroot.join(rel)).unwrap()).unwrap()
    }

    fn edit_records(&self, rel: &str, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut v = self.records(rel);
        edit(&mut v);
        std::fs::write(self.graphroot.join(rel), serde_json::to_vec(&v).unwrap()).unwrap();
    }

    /// The big-data item `manifest` of image `id`.
    fn manifest_path(&self, id: &str) -> PathBuf {
        self.graphroot
            .join("overlay-images")
            .join(id)
            .join("manifest")
    }
}

/// The fixtures' source store, copied so that podman's pushes write nothing into the shared
/// one (it creates its database and mounts there).
struct Source {
    store: PrivateStore,
    _unmount: UnmountBeneath,
}

impl Source {
    fn new(f: &Fixtures) -> Source {
        let store = f.private_store(&IMAGES);
        Source {
            _unmount: UnmountBeneath(store.graphroot.clone()),
            store,
        }
    }

    /// Push `localhost/NAME:latest` as `DEST` with layers compressed as `compression`;
    /// returns the digest of the manifest the registry holds.
    fn push(&self, name: &str, dest: &str, compression: &str) -> String {
        let digest_file = tempfile::NamedTempFile::new().unwrap();
        let digest_path = digest_file.path().to_str().unwrap();
        self.store.podman(&[
            "push",
            "--quiet",
            "--tls-verify=false",
            "--compression-format",
            compression,
            "--digestfile",
            digest_path,
            &format!("localhost/{name}:latest"),
            &format!("docker://{dest}"),
        ]);
        std::fs::read_to_string(digest_path)
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// The record with id `id` in an array of images.json or layers.json records.
fn record<'a>(records: &'a mut serde_json::Value, id: &str) -> &'a mut serde_json::Value {
    records
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no record {id}"))
}

/// `splitfdstream pull SOURCE --repo REPO --tag TAG --json --insecure`: the summary, or the
/// stderr.
fn pull(source: &str, repo: &Path, tag: &str) -> Result<serde_json::Value, String> {
    let out = Command::new(BIN)
        .args(["pull", source, "--repo"])
        .arg(repo)
        .args(["--tag", tag, "--json", "--insecure"])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout))))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `cfsctl oci pull` of `source` into a new repository at `repo` (insecure where the
/// filesystem has no fs-verity, as ours are), with `env`: its stderr on failure.
fn cfsctl_pull(
    cfsctl: &Path,
    env: &[(&str, &Path)],
    source: &[&str],
    repo: &Path,
    tag: &str,
) -> Result<(), String> {
    let init = |extra: &[&str]| {
        let _ = std::fs::remove_dir_all(repo);
        Command::new(cfsctl)
            .arg("--repo")
            .arg(repo)
            .arg("init")
            .args(extra)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(init(&[]) || init(&["--insecure"]), "cfsctl init failed");
    let out = Command::new(cfsctl)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .arg("--repo")
        .arg(repo)
        .args(["oci", "pull"])
        .args(source)
        .arg(tag)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// cfsctl's own pull of `reference` from `store` (see the module docs for how it finds it).
fn cfsctl_pull_store(
    cfsctl: &Path,
    store: &Store,
    reference: &str,
    repo: &Path,
    tag: &str,
) -> Result<(), String> {
    cfsctl_pull(
        cfsctl,
        &[("CONTAINERS_STORAGE_ROOT", &store.graphroot)],
        &[
            "--local-fetch",
            "auto",
            &format!("containers-storage:{reference}"),
        ],
        repo,
        tag,
    )
}

fn fsck_ok(cfsctl: &Path, repo: &Path) {
    cfs(cfsctl, repo, &["fsck"]);
    cfs(cfsctl, repo, &["oci", "fsck"]);
}

/// A repository's `streams/` and `images/` links, by name.
fn links(repo: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for dir in ["streams", "streams/refs/oci", "images"] {
        for entry in std::fs::read_dir(repo.join(dir)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_symlink() {
                let name = format!("{dir}/{}", entry.file_name().to_string_lossy());
                out.insert(name, std::fs::read_link(entry.path()).unwrap());
            }
        }
    }
    out
}

/// What a splitstream says, whatever order its writer added the referenced streams in: content
/// type, size, named refs (sorted) and object refs.
fn stream_meaning(repo: &Path, link: &Path) -> String {
    let repo = Repository::open_or_create(
        repo,
        &RepoOptions {
            hash: None,
            insecure: true,
        },
    )
    .unwrap();
    let target = link.to_str().unwrap();
    let hex: String = target
        .trim_start_matches("../objects/")
        .chars()
        .filter(|c| *c != '/')
        .collect();
    let id = splitfdstream::repo::ObjectId::from_hex(&hex).unwrap();
    let r = SplitStreamReader::open(&repo, &id, None).unwrap();
    let refs: Vec<String> = r
        .named_refs()
        .iter()
        .map(|(n, id)| format!("{n}={id}"))
        .collect();
    let objects: Vec<String> = r.object_refs().iter().map(|o| o.to_string()).collect();
    format!(
        "type {:016x} size {} named {refs:?} objects {objects:?}",
        r.content_type(),
        r.stream_size()
    )
}

/// Our repository against cfsctl's, both tagged `tag`: the same composefs image id, the same
/// `oci images` and `oci inspect` output, the same links, and the same stream objects, except
/// that cfsctl 0.9.4 writes a manifest splitstream's layer refs in `HashMap` order
/// (`ensure_oci_composefs_erofs` → `rewrite_manifest`), so that object differs from run to run
/// while its named refs and content are ours; for it the meaning is compared.
///
/// With `same_manifest` false, cfsctl pulled the image under another manifest (from an OCI
/// layout): then only the manifest, its stream and the tag may differ.
fn same_as_cfsctl(cfsctl: &Path, ours: &Path, theirs: &Path, tag: &str, same_manifest: bool) {
    let id = |r: &Path| cfs(cfsctl, r, &["oci", "compute-id", tag]);
    assert_eq!(id(ours), id(theirs), "composefs image ids differ");
    if same_manifest {
        for args in [
            &["oci", "images", "--json"][..],
            &["oci", "images"][..],
            &["oci", "inspect", tag][..],
        ] {
            assert_eq!(
                cfs(cfsctl, ours, args),
                cfs(cfsctl, theirs, args),
                "cfsctl {args:?} differs"
            );
        }
    } else {
        let inspect = |r: &Path| -> serde_json::Value {
            serde_json::from_str(&cfs(cfsctl, r, &["oci", "inspect", tag])).unwrap()
        };
        let (a, b) = (inspect(ours), inspect(theirs));
        for key in ["config", "composefs_erofs"] {
            assert_eq!(a[key], b[key], "cfsctl oci inspect: {key} differs");
        }
    }
    let manifest_only =
        |name: &str| name.starts_with("streams/oci-manifest-") || name.starts_with("streams/refs/");
    let keep = |m: BTreeMap<String, PathBuf>| -> BTreeMap<String, PathBuf> {
        m.into_iter()
            .filter(|(name, _)| same_manifest || !manifest_only(name))
            .collect()
    };
    let (a, b) = (keep(links(ours)), keep(links(theirs)));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the repositories link different names"
    );
    for (name, target) in &a {
        if target == &b[name] {
            continue;
        }
        assert!(
            name.starts_with("streams/oci-manifest-"),
            "{name}: ours {target:?}, cfsctl's {:?}",
            b[name]
        );
        assert_eq!(
            stream_meaning(ours, target),
            stream_meaning(theirs, &b[name]),
            "{name}"
        );
        println!(
            "NOTE: {name}: another object than cfsctl's, with the same named refs and content"
        );
    }
}

/// The stored manifest's layers name blobs compressed as `compression`, the blobs that
/// layers.json records the layers were made from (so the test exercises what it claims).
fn check_compressed(store: &Store, image_id: &str, compression: &str) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.manifest_path(image_id)).unwrap()).unwrap();
    let layers = store.records("overlay-layers/layers.json");
    for blob in manifest["layers"].as_array().unwrap() {
        let media_type = blob["mediaType"].as_str().unwrap();
        assert!(
            media_type.ends_with(&format!("+{compression}")),
            "{media_type}"
        );
        let record = layers
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["compressed-diff-digest"] == blob["digest"])
            .unwrap_or_else(|| panic!("no layer made from {}", blob["digest"]));
        assert_ne!(record["compressed-diff-digest"], record["diff-digest"]);
        assert_eq!(record["compressed-size"], blob["size"]);
    }
}

/// Push the fixtures with `compression`, pull them into a store of their own, and pull each
/// into composefs by name and by digest, checked against cfsctl's pull of the same store.
fn round_trip(compression: &str) {
    let Some((f, cfsctl)) = tools() else { return };
    let start = Instant::now();
    let registry = Registry::start();
    let source = Source::new(f);
    let store = Store::new(f);
    let pushed: Vec<(&FixtureImage, String, String)> = IMAGES
        .iter()
        .map(|name| {
            let reference = format!("{}/fixtures/{name}:latest", registry.addr);
            let digest = source.push(name, &reference, compression);
            store.podman(&["pull", "--quiet", "--tls-verify=false", &reference]);
            (f.image(name), reference, digest)
        })
        .collect();
    println!("{compression}: pushed and pulled in {:?}", start.elapsed());

    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    for (image, reference, pushed_digest) in &pushed {
        let started = Instant::now();
        check_compressed(&store, &image.id, compression);
        let digest = store.podman_digest(reference);
        assert_eq!(&digest, pushed_digest, "{reference}");
        // The registry-pulled image through our image proxy, with the reference client: the
        // pulled manifest, the layers as their uncompressed tars, every digest checked.
        let read = proxy_client::runtime().block_on(proxy_client::read_image(
            Path::new(BIN),
            &store.source(reference),
        ));
        assert_eq!(
            read.manifest_digest, digest,
            "{reference}: through the proxy"
        );
        let served: Vec<&str> = read.layers.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(served, image.diff_ids, "{reference}: layer infos");
        assert_eq!(read.diff_ids, image.diff_ids, "{reference}: config");
        let name = reference.rsplit_once(':').unwrap().0;
        let by_digest = format!("{name}@{digest}");
        let dir = work.path().join(&image.name);
        std::fs::create_dir(&dir).unwrap();
        let (ours, ours_by_digest, theirs) =
            (dir.join("ours"), dir.join("by-digest"), dir.join("theirs"));
        for (source, repo) in [(reference, &ours), (&by_digest, &ours_by_digest)] {
            let s = pull(&store.source(source), repo, "img")
                .unwrap_or_else(|e| panic!("{source}: {e}"));
            assert_eq!(s["imageId"], image.id.as_str(), "{source}");
            assert_eq!(s["manifestDigest"], digest.as_str(), "{source}");
            // The layers are the fixtures', whatever compression carried them.
            let diff_ids: Vec<&str> = s["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["diffId"].as_str().unwrap())
                .collect();
            assert_eq!(diff_ids, image.diff_ids, "{source}");
            assert!(s["erofsImage"].is_string(), "{source}: {s}");
            fsck_ok(&cfsctl, repo);
        }
        let same_manifest = match cfsctl_pull_store(&cfsctl, &store, reference, &theirs, "img") {
            Ok(()) => true,
            // cfsctl 0.9.4's own containers-storage import stops at the layer entry whose name
            // is not UTF-8 (tar-split `name_raw`), stores the truncated tar under the layer's
            // diff_id unchecked, and then fails to read it back. Its pull of the same image
            // from the fixtures' OCI layout (through skopeo) is compared instead.
            Err(e) if image.name == "odd" && e.contains("Unexpected EOF in splitstream") => {
                println!(
                    "NOTE: cfsctl cannot pull odd from containers-storage: {}",
                    e.trim().replace('\n', " ")
                );
                let layout = format!("oci:{}:odd", f.layout_dir("oci-gzip").display());
                cfsctl_pull(&cfsctl, &[], &[&layout], &theirs, "img")
                    .unwrap_or_else(|e| panic!("cfsctl oci pull {layout}: {e}"));
                false
            }
            Err(e) => panic!("cfsctl oci pull {reference}: {e}"),
        };
        // `unpack` of the registry-pulled image gives the tree podman mounts.
        let unpacked = dir.join("unpacked");
        let out = Command::new(BIN)
            .args(["unpack", &store.source(reference)])
            .arg(&unpacked)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "unpack {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = store.podman(&["image", "mount", reference]);
        let mnt = PathBuf::from(String::from_utf8(mnt.stdout).unwrap().trim());
        let same =
            std::panic::catch_unwind(|| common::tree::assert_same_tree(reference, &unpacked, &mnt));
        store.podman(&["image", "unmount", reference]);
        if let Err(p) = same {
            std::panic::resume_unwind(p);
        }
        same_as_cfsctl(&cfsctl, &ours, &theirs, "img", same_manifest);
        same_as_cfsctl(&cfsctl, &ours_by_digest, &theirs, "img", same_manifest);
        println!(
            "{compression}: {} checked in {:?}",
            image.name,
            started.elapsed()
        );
    }
}

#[test]
fn gzip_images_pull_like_cfsctl() {
    round_trip("gzip");
}

#[test]
fn zstd_images_pull_like_cfsctl() {
    round_trip("zstd");
}

/// One image under three manifests in one store: a manifest list (whose instance names gzip
/// blobs) from one registry, then the same image with zstd blobs from another (a registry of
/// its own: pushing zstd where gzip blobs of the same layers exist reuses those). containers/image
/// then reuses the layers, so layers.json keeps the gzip blobs while the default manifest names
/// zstd ones; and each manifest stays reachable by its digest.
#[test]
fn one_image_under_several_manifests() {
    let Some((f, cfsctl)) = tools() else { return };
    let start = Instant::now();
    let (gzip_registry, zstd_registry) = (Registry::start(), Registry::start());
    let source = Source::new(f);
    let image = f.image("basic");
    let list = format!("{}/fixtures/basic-list:latest", gzip_registry.addr);
    let zstd = format!("{}/fixtures/basic:latest", zstd_registry.addr);
    source
        .store
        .podman(&["manifest", "create", "localhost/basic-list"]);
    source.store.podman(&[
        "manifest",
        "add",
        "localhost/basic-list",
        "containers-storage:localhost/basic:latest",
    ]);
    source.store.podman(&[
        "manifest",
        "push",
        "--all",
        "--quiet",
        "--tls-verify=false",
        "localhost/basic-list",
        &format!("docker://{list}"),
    ]);
    let zstd_digest = source.push("basic", &zstd, "zstd");
    let store = Store::new(f);
    for reference in [&list, &zstd] {
        store.podman(&["pull", "--quiet", "--tls-verify=false", reference]);
    }
    println!("pushed and pulled in {:?}", start.elapsed());

    // podman reports the list's digest (images.json `digest`, the first manifest stored).
    let list_digest = store.podman_digest(&zstd);
    let list_bytes = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{list}"),
    ]));
    assert_eq!(sha256(list_bytes.as_bytes()), list_digest);
    let listed: serde_json::Value = serde_json::from_str(&list_bytes).unwrap();
    let instance_digest = listed["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(instance_digest, zstd_digest);
    // layers.json keeps the gzip blobs of the instance; the default manifest is the zstd one,
    // whose blobs it does not know.
    let list_name = list.rsplit_once(':').unwrap().0;
    let zstd_name = zstd.rsplit_once(':').unwrap().0;
    let instance = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{list_name}@{instance_digest}"),
    ]));
    let default = std::fs::read(store.manifest_path(&image.id)).unwrap();
    assert_eq!(sha256(&default), zstd_digest);
    let recorded = store.records("overlay-layers/layers.json");
    let known = |blob: &serde_json::Value| {
        recorded
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["compressed-diff-digest"] == blob["digest"])
    };
    let blobs = |manifest: &[u8]| -> Vec<serde_json::Value> {
        let m: serde_json::Value = serde_json::from_slice(manifest).unwrap();
        m["layers"].as_array().unwrap().clone()
    };
    assert!(blobs(instance.as_bytes()).iter().all(known));
    assert!(!blobs(&default).iter().any(known));

    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    let ours = work.path().join("ours");
    for (reference, manifest_digest) in [
        // By name, the default manifest, whichever name (as cfsctl and containers/image).
        (zstd.clone(), &zstd_digest),
        (list.clone(), &zstd_digest),
        // By digest, the manifest stored under it; a list stands for its instance.
        (format!("{zstd_name}@{zstd_digest}"), &zstd_digest),
        (format!("{list_name}@{instance_digest}"), &instance_digest),
        (format!("{list_name}@{list_digest}"), &instance_digest),
    ] {
        let s = pull(&store.source(&reference), &ours, &reference)
            .unwrap_or_else(|e| panic!("{reference}: {e}"));
        assert_eq!(s["imageId"], image.id.as_str(), "{reference}");
        assert_eq!(s["manifestDigest"], manifest_digest.as_str(), "{reference}");
        let inspected: serde_json::Value =
            serde_json::from_str(&cfs(&cfsctl, &ours, &["oci", "inspect", &reference])).unwrap();
        assert_eq!(
            sha256(inspected["manifest"].as_str().unwrap().as_bytes()),
            *manifest_digest,
            "{reference}"
        );
    }
    fsck_ok(&cfsctl, &ours);

    let (by_name, theirs) = (work.path().join("by-name"), work.path().join("theirs"));
    pull(&store.source(&zstd), &by_name, "img").unwrap();
    cfsctl_pull_store(&cfsctl, &store, &zstd, &theirs, "img").unwrap();
    same_as_cfsctl(&cfsctl, &by_name, &theirs, "img", true);
    println!("checked in {:?}", start.elapsed());
}

/// A store whose records disagree with each other or with the layers is refused, naming the
/// layer, and nothing is tagged.
#[test]
fn hostile_records_are_refused_by_layer() {
    let Some((f, cfsctl)) = tools() else { return };
    let registry = Registry::start();
    let source = Source::new(f);
    let image = f.image("basic");
    let reference = format!("{}/fixtures/basic:latest", registry.addr);
    source.push("basic", &reference, "gzip");
    let store = Store::new(f);
    store.podman(&["pull", "--quiet", "--tls-verify=false", &reference]);
    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    let [l0, l1, l2] = &image.layer_ids[..] else {
        panic!("basic has three layers")
    };
    let refused = |what: &str, damaged: &Store, expected: &[&str]| {
        let repo = work.path().join(what);
        let err =
            pull(&damaged.source(&reference), &repo, "img").expect_err(&format!("{what}: pulled"));
        for e in expected {
            assert!(err.contains(e), "{what}: {err}");
        }
        println!("{what}: {}", err.trim());
        assert!(
            !repo.join("streams/refs/oci/img").exists(),
            "{what}: tagged"
        );
        if repo.join("meta.json").exists() {
            fsck_ok(&cfsctl, &repo);
        }
    };

    // The size of a compressed blob, forged in layers.json.
    let damaged = store.copy(f);
    damaged.edit_records("overlay-layers/layers.json", |v| {
        let l = record(v, l1);
        l["compressed-size"] = (l["compressed-size"].as_u64().unwrap() + 1).into();
    });
    refused(
        "compressed-size",
        &damaged,
        &[l1, "bytes, layers.json records"],
    );

    // The manifest rewritten, its recorded digest with it, naming layer 1's blob for layer 0.
    let damaged = store.copy(f);
    let path = damaged.manifest_path(&image.id);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["layers"].as_array_mut().unwrap().swap(0, 1);
    let bytes = serde_json::to_vec(&manifest).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    damaged.edit_records("overlay-images/images.json", |v| {
        record(v, &image.id)["big-data-digests"]["manifest"] = sha256(&bytes).into();
    });
    refused(
        "swapped-blobs",
        &damaged,
        &[
            &format!("layer 0 ({l0}"),
            &format!("layer {l1} was made from"),
        ],
    );

    // The manifest changed behind the store's back.
    let damaged = store.copy(f);
    let path = damaged.manifest_path(&image.id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.push(b'\n');
    std::fs::write(&path, &bytes).unwrap();
    refused(
        "manifest-digest",
        &damaged,
        &["big-data item manifest has digest", "the store recorded"],
    );

    // The uncompressed size of a layer, forged in layers.json (only the rebuilt tar shows it).
    let damaged = store.copy(f);
    damaged.edit_records("overlay-layers/layers.json", |v| {
        let l = record(v, l2);
        l["diff-size"] = (l["diff-size"].as_u64().unwrap() + 512).into();
    });
    refused("diff-size", &damaged, &[l2, "(diff-size)"]);

    // No tar-split, as after some partial pulls: nothing to rebuild the original tar from.
    let damaged = store.copy(f);
    std::fs::remove_file(
        damaged
            .graphroot
            .join(format!("overlay-layers/{l1}.tar-split.gz")),
    )
    .unwrap();
    refused("no-tar-split", &damaged, &[l1, "has no tar-split"]);
}
