//! The containers-storage and OCI layout fixtures, built once by `tests/fixtures/build-fixtures.sh`
//! (per test binary, and once across test binaries running at the same time: a `flock` on a lock
//! file beside the output directory serialises the builders, and the script's stamp makes every
//! later call return at once).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use splitfdstream::proto::source::Store;

/// The build script.
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/build-fixtures.sh"
);

/// Everything the fixtures hold, read back from `fixtures.json` (written by the build script from
/// what podman and skopeo report, not by hand).
#[derive(Debug, Deserialize)]
pub struct Fixtures {
    /// The output directory (an XFS reflink mount when the script could make one).
    #[serde(skip)]
    pub out: PathBuf,
    /// The store's graph root.
    #[serde(skip)]
    pub graphroot: PathBuf,
    /// The store's run root.
    #[serde(skip)]
    pub runroot: PathBuf,
    /// Images in the store: basic, odd, old, big, many, times, scratch.
    pub images: Vec<FixtureImage>,
    /// Tags of the OCI layouts.
    pub layouts: Vec<FixtureLayout>,
}

/// One image of the store.
#[derive(Debug, Clone, Deserialize)]
pub struct FixtureImage {
    /// Short name (`basic`).
    pub name: String,
    /// Full reference (`localhost/basic:latest`).
    pub reference: String,
    /// Image id.
    pub id: String,
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// Layer diff_ids, base first.
    pub diff_ids: Vec<String>,
    /// containers-storage layer ids, base first.
    pub layer_ids: Vec<String>,
    /// Uncompressed layer sizes, base first.
    pub layer_sizes: Vec<u64>,
}

/// One tag of an OCI layout.
#[derive(Debug, Clone, Deserialize)]
pub struct FixtureLayout {
    /// Directory name under the fixtures dir (`oci-plain`, `oci-gzip`, `oci-zstd`).
    pub dir: String,
    /// The tag.
    pub tag: String,
    /// Layer diff_ids, base first.
    pub diff_ids: Vec<String>,
    /// Layer media types.
    pub media_types: Vec<String>,
    /// Layer blob digests.
    pub blobs: Vec<String>,
}

/// The fixtures, built on first use; `None` (after printing `SKIP: …`) only when the tools or
/// root privileges they need are truly absent.
pub fn fixtures() -> Option<&'static Fixtures> {
    static FIXTURES: OnceLock<Option<Fixtures>> = OnceLock::new();
    FIXTURES.get_or_init(build).as_ref()
}

fn missing_capability() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not running as root".into());
    }
    for tool in ["podman", "buildah", "skopeo", "setcap", "setfattr", "jq"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn build() -> Option<Fixtures> {
    if let Some(reason) = missing_capability() {
        eprintln!("SKIP: containers-storage fixtures unavailable: {reason}");
        return None;
    }
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmp).expect("creating CARGO_TARGET_TMPDIR");
    let out = tmp.join("fixtures");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(tmp.join("fixtures.lock"))
        .expect("opening the fixtures lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .expect("locking the fixtures lock file");
    let status = Command::new("bash")
        .arg(SCRIPT)
        .arg(&out)
        .status()
        .expect("running build-fixtures.sh");
    assert!(status.success(), "build-fixtures.sh failed: {status}");
    drop(lock);
    let json = std::fs::read(out.join("fixtures.json")).expect("reading fixtures.json");
    let mut f: Fixtures = serde_json::from_slice(&json).expect("parsing fixtures.json");
    f.graphroot = out.join("graph");
    f.runroot = out.join("run");
    f.out = out;
    Some(f)
}

impl Fixtures {
    /// `containers-storage:[overlay@GRAPHROOT+RUNROOT]`.
    pub fn store_arg(&self) -> String {
        format!(
            "containers-storage:[overlay@{}+{}]",
            self.graphroot.display(),
            self.runroot.display()
        )
    }

    /// The store as the library names it.
    pub fn store(&self) -> Store {
        cstor_store(&self.graphroot, &self.runroot)
    }

    /// The image called `name`.
    pub fn image(&self, name: &str) -> &FixtureImage {
        self.images
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no fixture image {name}"))
    }

    /// The OCI layout directory `dir` (`oci-plain`, `oci-gzip`, `oci-zstd`).
    pub fn layout_dir(&self, dir: &str) -> PathBuf {
        self.out.join(dir)
    }

    /// A private copy of the store, for a test that changes it. Only the diff dirs of the layers
    /// of `images` are copied (reflinked where the filesystem can); all metadata is. Overlay
    /// `merged` and `work` dirs are skipped, so another process mounting images in the shared
    /// store meanwhile does not disturb the copy.
    pub fn private_store(&self, images: &[&str]) -> PrivateStore {
        let base = self.out.join("private");
        std::fs::create_dir_all(&base).expect("creating the private stores dir");
        let dir = tempfile::TempDir::new_in(&base).expect("creating a private store dir");
        let graphroot = dir.path().join("graph");
        // podman refuses a run root longer than 50 bytes.
        let run_dir = tempfile::TempDir::new().expect("creating a private run root");
        let runroot = run_dir.path().to_owned();
        std::fs::create_dir(&graphroot).unwrap();

        let mut sources: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(&self.graphroot).unwrap() {
            let name = entry.unwrap().file_name();
            // podman's libpod database records the store's paths and refuses another one.
            if name != "overlay" && name != "libpod" {
                sources.push(name.into());
            }
        }
        sources.push("overlay/l".into());
        let mut layer_dirs = Vec::new();
        for name in images {
            for id in &self.image(name).layer_ids {
                let rel = Path::new("overlay").join(id);
                for entry in std::fs::read_dir(self.graphroot.join(&rel)).unwrap() {
                    let child = entry.unwrap().file_name();
                    if child != "merged" && child != "work" {
                        sources.push(rel.join(child));
                    }
                }
                layer_dirs.push(rel);
            }
        }
        let status = Command::new("cp")
            .args(["-a", "--reflink=auto", "--parents"])
            .args(&sources)
            .arg(&graphroot)
            .current_dir(&self.graphroot)
            .status()
            .expect("running cp");
        assert!(status.success(), "copying the store: cp {status}");
        for rel in layer_dirs {
            // The overlay driver expects each layer's (empty) work dir.
            std::fs::create_dir_all(graphroot.join(rel).join("work")).unwrap();
        }
        PrivateStore {
            graphroot,
            runroot,
            _dir: dir,
            _run_dir: run_dir,
        }
    }
}

/// A store copied for one test; removed on drop.
#[derive(Debug)]
pub struct PrivateStore {
    /// Graph root of the copy.
    pub graphroot: PathBuf,
    /// Run root of the copy (starts empty).
    pub runroot: PathBuf,
    _dir: tempfile::TempDir,
    _run_dir: tempfile::TempDir,
}

impl PrivateStore {
    /// The copy as the library names it.
    pub fn store(&self) -> Store {
        cstor_store(&self.graphroot, &self.runroot)
    }

    /// The diff dir of layer `layer_id`.
    pub fn diff_dir(&self, layer_id: &str) -> PathBuf {
        self.graphroot.join("overlay").join(layer_id).join("diff")
    }

    /// `podman` with this store's roots, and `args`.
    pub fn podman(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new("podman")
            .arg("--storage-driver=overlay")
            .arg("--root")
            .arg(&self.graphroot)
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--tmpdir")
            .arg(self.runroot.join("libpod-tmp"))
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
}

fn cstor_store(graphroot: &Path, runroot: &Path) -> Store {
    Store::ContainersStorage {
        driver: Some("overlay".into()),
        graphroot: Some(graphroot.to_owned()),
        runroot: Some(runroot.to_owned()),
    }
}
