//! `storage.conf`, its drop-ins and `$STORAGE_OPTS` as containers/storage reads them: an image
//! of an additional image store — copied into a store of its own by skopeo, then served from a
//! read-only bind mount of it, where any write fails — is found by its plain name, rebuilt
//! layer by layer to its diff_ids by `splitfdstream tar` and pulled into a repository that
//! `cfsctl fsck` accepts, while the primary store is empty or another store. Also: the
//! primary store is searched first, a graph root in the source name takes no additional
//! stores, and a malformed file is named with its line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::tools::{Unmount, cfs, cfsctl, run};
use common::{Fixtures, TarSink, fixtures};
use sha2::{Digest, Sha256};
use splitfdstream::helper::Backend;
use splitfdstream::helper::cstor::CstorBackend;
use splitfdstream::helper::cstor::config::StorageEnv;
use splitfdstream::proto::source::Store;

const BIN: &str = env!("CARGO_BIN_EXE_splitfdstream");

/// The fixture image copied into the additional store.
const SOURCE_IMAGE: &str = "basic";
/// Its name there, which no fixture image has.
const EXTRA_NAME: &str = "localhost/extra-basic:1";
/// A second copy there, under the name of another fixture image of the primary store.
const SHADOWED: &str = "old";

/// The additional image store, built once (across test binaries too) beside the fixtures.
struct Extra {
    graphroot: PathBuf,
}

fn extra(f: &Fixtures) -> &'static Extra {
    static EXTRA: OnceLock<Extra> = OnceLock::new();
    EXTRA.get_or_init(|| {
        let dir = f.out.join("extra-store");
        let graphroot = dir.join("graph");
        let stamp = dir.join("built-v1");
        let lock = std::fs::File::create(f.out.join("extra-store.lock")).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
        if !stamp.exists() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let to = format!(
                "containers-storage:[overlay@{}+{}]",
                graphroot.display(),
                dir.join("run").display()
            );
            let from = format!("{}{}", f.store_arg(), f.image(SOURCE_IMAGE).reference);
            for name in [EXTRA_NAME, &f.image(SHADOWED).reference] {
                run(Command::new("skopeo").args([
                    "copy",
                    "--quiet",
                    &from,
                    &format!("{to}{name}"),
                ]));
            }
            std::fs::write(&stamp, b"").unwrap();
        }
        Extra { graphroot }
    })
}

/// A read-only bind mount of the additional store, and the scratch directory of one test.
struct Scratch {
    /// The read-only view of the additional store.
    ro: PathBuf,
    /// An empty primary store's graph root.
    empty: PathBuf,
    dir: tempfile::TempDir,
    _unmount: Unmount,
}

impl Scratch {
    fn new(f: &Fixtures) -> Scratch {
        let extra = extra(f);
        let base = f.out.join("conf-tests");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::TempDir::new_in(&base).unwrap();
        let ro = dir.path().join("ro-store");
        let empty = dir.path().join("empty-graph");
        for d in [&ro, &empty] {
            std::fs::create_dir(d).unwrap();
        }
        run(Command::new("mount")
            .arg("--bind")
            .arg(&extra.graphroot)
            .arg(&ro));
        let unmount = Unmount(ro.clone());
        run(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(&ro));
        Scratch {
            ro,
            empty,
            dir,
            _unmount: unmount,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Write `rel` (and its directories) with `text`.
    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A `storage.conf` whose primary store is `graphroot`, with `extra` after it.
    fn conf(&self, rel: &str, graphroot: &Path, extra: &str) -> PathBuf {
        self.write(
            rel,
            &format!(
                "# written by tests/storage_conf.rs\n[storage]\ndriver = \"overlay\"\n\
                 graphroot = \"{}\"\nrunroot = \"{}\"\n{extra}",
                graphroot.display(),
                self.path("run").display()
            ),
        )
    }

    /// `splitfdstream ARGS…` with none of the configuration variables of this process, and
    /// `vars` set.
    fn sfds(&self, args: &[&str], vars: &[(&str, &Path)]) -> Output {
        let mut cmd = Command::new(BIN);
        for var in [
            "CONTAINERS_STORAGE_CONF",
            "CONTAINERS_STORAGE_CONF_OVERRIDE",
            "STORAGE_OPTS",
            "STORAGE_DRIVER",
        ] {
            cmd.env_remove(var);
        }
        // A user configuration directory of the test's own, unless a test names one.
        cmd.env("XDG_CONFIG_HOME", self.path("no-config"));
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.args(args).output().unwrap()
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every layer of `source`, rebuilt by `splitfdstream tar`, hashes to its diff_id; and
/// `splitfdstream pull` makes a repository `cfsctl fsck` accepts.
fn check_tar_and_pull(s: &Scratch, source: &str, diff_ids: &[String], vars: &[(&str, &Path)]) {
    for (i, diff_id) in diff_ids.iter().enumerate() {
        let out = s.path(&format!("layer{i}.tar"));
        let args = [
            "tar",
            source,
            "--layer",
            &i.to_string(),
            "-o",
            out.to_str().unwrap(),
        ];
        ok(&s.sfds(&args, vars), &format!("tar {source} layer {i}"));
        let digest = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(std::fs::read(&out).unwrap()))
        );
        assert_eq!(&digest, diff_id, "{source} layer {i}");
    }
    let Some(cfsctl) = cfsctl() else {
        println!("SKIP: cfsctl not found; pull not checked");
        return;
    };
    let repo = s.path("repo");
    let repo_arg = repo.to_str().unwrap();
    let args = [
        "pull",
        source,
        "--repo",
        repo_arg,
        "--tag",
        "t",
        "--insecure",
    ];
    ok(&s.sfds(&args, vars), &format!("pull {source}"));
    cfs(&cfsctl, &repo, &["fsck"]);
    cfs(&cfsctl, &repo, &["oci", "fsck"]);
}

fn source(name: &str) -> String {
    format!("containers-storage:{name}")
}

#[test]
fn additionalimagestores_in_storage_conf() {
    let Some(f) = fixtures() else { return };
    let s = Scratch::new(f);
    let conf = s.conf(
        "storage.conf",
        &s.empty,
        &format!(
            "[storage.options]\nadditionalimagestores = [\"{}\"]\n",
            s.ro.display()
        ),
    );
    // By its short name, as podman resolves it.
    check_tar_and_pull(
        &s,
        &source("extra-basic:1"),
        &f.image(SOURCE_IMAGE).diff_ids,
        &[("CONTAINERS_STORAGE_CONF", &conf)],
    );
}

#[test]
fn a_drop_in_adds_the_store() {
    let Some(f) = fixtures() else { return };
    let s = Scratch::new(f);
    // The user's configuration directory; for root too.
    let config = s.path("config");
    s.conf("config/containers/storage.conf", &s.empty, "");
    s.write(
        "config/containers/storage.conf.d/50-extra.conf",
        &format!(
            "[storage.options]\nadditionalimagestores = [\"{}\", {{append = true}}]\n",
            s.ro.display()
        ),
    );
    // Not a drop-in: the wrong suffix.
    s.write(
        "config/containers/storage.conf.d/60-broken.conf.disabled",
        "not toml at all [",
    );
    check_tar_and_pull(
        &s,
        &source(EXTRA_NAME),
        &f.image(SOURCE_IMAGE).diff_ids,
        &[("XDG_CONFIG_HOME", &config)],
    );
    // Without the drop-in the image is nowhere.
    std::fs::remove_file(s.path("config/containers/storage.conf.d/50-extra.conf")).unwrap();
    let out = s.sfds(
        &["inspect", &source(EXTRA_NAME)],
        &[("XDG_CONFIG_HOME", &config)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn storage_opts_adds_the_store_after_another_primary_store() {
    let Some(f) = fixtures() else { return };
    let s = Scratch::new(f);
    // The primary store is the fixtures' own, which has images of its own.
    let conf = s.conf("storage.conf", &f.graphroot, "");
    let opts = PathBuf::from(format!("additionalimagestore={}", s.ro.display()));
    let vars = [
        ("CONTAINERS_STORAGE_CONF", conf.as_path()),
        ("STORAGE_OPTS", opts.as_path()),
    ];
    check_tar_and_pull(
        &s,
        &source(EXTRA_NAME),
        &f.image(SOURCE_IMAGE).diff_ids,
        &vars,
    );
    // A name in both stores is the primary store's image.
    let shadowed = f.image(SHADOWED);
    let out = ok(
        &s.sfds(&["inspect", "--json", &source(&shadowed.reference)], &vars),
        "inspect",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["imageId"], shadowed.id.as_str());
    // The driver-qualified form, as containers/storage parses it.
    let opts = PathBuf::from(format!("overlay.imagestore={}", s.ro.display()));
    // `-o` renames the verified file over its path: a scratch file, never a device node.
    let layer0 = s.path("qualified-layer0.tar");
    let out = s.sfds(
        &[
            "tar",
            &source(EXTRA_NAME),
            "--layer",
            "0",
            "-o",
            layer0.to_str().unwrap(),
        ],
        &[
            ("CONTAINERS_STORAGE_CONF", conf.as_path()),
            ("STORAGE_OPTS", opts.as_path()),
        ],
    );
    ok(&out, "tar with overlay.imagestore=");
}

#[test]
fn the_image_is_served_from_the_store_it_was_found_in() {
    let Some(f) = fixtures() else { return };
    let s = Scratch::new(f);
    let conf = s.conf(
        "storage.conf",
        &f.graphroot,
        &format!(
            "[storage.options]\nadditionalimagestores = [\"{}\"]\n",
            s.ro.display()
        ),
    );
    let env = StorageEnv {
        uid: 0,
        conf_override: Some(conf),
        ..StorageEnv::default()
    };
    let default_store = Store::ContainersStorage {
        driver: None,
        graphroot: None,
        runroot: None,
    };
    let b = CstorBackend::open_with_env(&default_store, &env).unwrap();
    assert_eq!(
        b.location().additional_image_stores,
        std::slice::from_ref(&s.ro)
    );
    let (image, root) = b.open_image_at(EXTRA_NAME).unwrap();
    assert_eq!(root, s.ro);
    assert_eq!(image.image_id, f.image(SOURCE_IMAGE).id);
    for (i, layer) in image.layers.iter().enumerate() {
        let mut sink = TarSink::default();
        b.stream_layer(&image, i, 64, &mut sink).unwrap();
        assert_eq!(sink.digest(), layer.diff_id);
    }
    let (image, root) = b.open_image_at(&f.image(SHADOWED).reference).unwrap();
    assert_eq!(root, f.graphroot);
    assert_eq!(image.image_id, f.image(SHADOWED).id);
    // Not found anywhere: the message names every store searched.
    let err = b.open_image_at("nowhere:1").unwrap_err().to_string();
    assert!(err.contains(&s.ro.display().to_string()), "{err}");
}

#[test]
fn a_graph_root_in_the_source_takes_no_additional_stores() {
    let Some(f) = fixtures() else { return };
    let s = Scratch::new(f);
    let conf = s.conf(
        "storage.conf",
        &s.empty,
        &format!(
            "[storage.options]\nadditionalimagestores = [\"{}\"]\n",
            s.ro.display()
        ),
    );
    // As containers/image's `GetStore` with the source's own options only.
    let explicit = format!(
        "containers-storage:[overlay@{}+{}]{EXTRA_NAME}",
        s.empty.display(),
        s.path("run").display()
    );
    let out = s.sfds(
        &["inspect", &explicit],
        &[("CONTAINERS_STORAGE_CONF", &conf)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not found"), "{err}");
    let out = s.sfds(
        &["inspect", &source(EXTRA_NAME)],
        &[("CONTAINERS_STORAGE_CONF", &conf)],
    );
    ok(&out, "the same image without a graph root in the source");
}

#[test]
fn a_malformed_storage_conf_is_named_with_its_line() {
    let Some(f) = fixtures() else { return };
    let s = Scratch::new(f);
    let bad = s.write(
        "bad/storage.conf",
        "[storage]\ndriver = \"overlay\"\ngraphroot = /var/lib/containers/storage\n",
    );
    let out = s.sfds(
        &["inspect", &source(EXTRA_NAME)],
        &[("CONTAINERS_STORAGE_CONF", &bad)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3: ", bad.display())), "{err}");
    // A drop-in too.
    let config = s.path("config");
    s.conf("config/containers/storage.conf", &s.empty, "");
    let drop_in = s.write(
        "config/containers/storage.conf.d/10.conf",
        "[storage.options]\nadditionalimagestores = [\n  \"/a\",\n  7,\n]\n",
    );
    let out = s.sfds(
        &["inspect", &source(EXTRA_NAME)],
        &[("XDG_CONFIG_HOME", &config)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4: ", drop_in.display())), "{err}");
}
