//! Reading an overlay store's metadata: the image and layer JSON, the big-data files, the
//! lock files, and resolving an image reference as podman does.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, ensure};
use base64::Engine;
use rustix::fs::{FlockOperation, Mode, OFlags, ResolveFlags};
use serde::Deserialize;

use crate::helper::BackendError;

/// Largest `images.json` / `layers.json` read. These grow with the store (a few hundred bytes
/// per image or layer); the bound keeps a corrupt or hostile file from exhausting memory.
pub const MAX_METADATA_LEN: u64 = 256 << 20;
/// Largest manifest or config read. Real ones are KiB; registries cap manifests at 4 MiB.
pub const MAX_BIG_DATA_LEN: u64 = 64 << 20;
/// Most layers followed from an image's top layer. The parent chain comes from the store's JSON,
/// so a cycle or an absurd depth must end in an error; real images have at most a few hundred.
pub const MAX_LAYER_DEPTH: usize = 4096;
/// Shortest image id prefix accepted as a reference; shorter hex strings match too much.
pub const MIN_ID_PREFIX: usize = 3;
/// Length of an image or layer id: hex sha256.
const ID_LEN: usize = 64;

/// `RESOLVE_*` flags for every path opened in the store: stay beneath the starting directory,
/// follow no symlink, cross no mount.
pub(crate) const RESOLVE_STRICT: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Is `s` an image or layer id (64 lowercase hex digits)?
pub fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Check an id read from the store's JSON before it becomes part of a path.
pub(crate) fn validate_id(kind: &str, id: &str) -> anyhow::Result<()> {
    ensure!(
        is_id(id),
        "{kind} id {id:?} in the store is not 64 lowercase hex digits"
    );
    Ok(())
}

/// One entry of `overlay-images/images.json` (the fields used here).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ImageRecord {
    pub id: String,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub digests: Vec<String>,
    /// Digests of the big-data items, by key. containers/storage keeps no list of an image's
    /// manifest digests in the file (its `Digests` is `json:"-"`): it derives them from
    /// `digest` and the digests of the items whose key starts with `manifest`.
    #[serde(default, rename = "big-data-digests")]
    pub big_data_digests: HashMap<String, String>,
    /// The top layer.
    #[serde(default)]
    pub layer: Option<String>,
    /// Index of the image store this record was read from, in search order.
    #[serde(skip)]
    pub store: usize,
}

impl ImageRecord {
    /// Is `digest` one of the image's manifest digests, as containers/storage computes them
    /// (`recomputeDigests`: `digest`, then every big-data item named `manifest…`)?
    pub fn has_manifest_digest(&self, digest: &str) -> bool {
        self.digest.as_deref() == Some(digest)
            || self.digests.iter().any(|d| d == digest)
            || self
                .big_data_digests
                .iter()
                .any(|(key, d)| key.starts_with("manifest") && d == digest)
    }
}

/// One entry of `overlay-layers/layers.json` (the fields used here).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct LayerRecord {
    pub id: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default, rename = "diff-digest")]
    pub diff_digest: Option<String>,
    #[serde(default, rename = "diff-size")]
    pub diff_size: Option<i64>,
    /// Digest of the blob the layer was made from, as it was presented (compressed or not).
    #[serde(default, rename = "compressed-diff-digest")]
    pub compressed_digest: Option<String>,
    #[serde(default, rename = "compressed-size")]
    pub compressed_size: Option<i64>,
    #[serde(default)]
    pub flags: HashMap<String, serde_json::Value>,
}

/// A fcntl (POSIX record) read lock on one of the store's lock files.
///
/// containers/storage locks with `F_SETLKW` on the whole file, which `flock` does not exclude.
/// POSIX locks belong to the process: closing *any* fd of the file drops them, so each lock file
/// is opened once per backend and shared between threads with a holder count.
#[derive(Debug)]
pub(crate) struct StoreLock {
    path: PathBuf,
    /// `None` when the lock file does not exist: then no containers/storage process can be
    /// writing the store (it creates the file before its first write), so nothing is locked.
    file: Option<OwnedFd>,
    holders: Mutex<usize>,
}

/// Holds a [`StoreLock`] for reading until dropped.
#[derive(Debug)]
pub(crate) struct ReadGuard<'a>(&'a StoreLock);

impl StoreLock {
    /// Open `rel` beneath `root` read-only (a read lock needs no more, and the store may be
    /// read-only); never creates it.
    pub fn open(root: impl AsFd, root_path: &Path, rel: &str) -> anyhow::Result<Self> {
        let path = root_path.join(rel);
        let file = match rustix::fs::openat2(
            root,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE_STRICT,
        ) {
            Ok(fd) => Some(fd),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        Ok(StoreLock {
            path,
            file,
            holders: Mutex::new(0),
        })
    }

    /// Take the read lock, waiting for a writer to finish.
    pub fn read(&self) -> anyhow::Result<ReadGuard<'_>> {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        if *holders == 0
            && let Some(fd) = &self.file
        {
            rustix::fs::fcntl_lock(fd, FlockOperation::LockShared)
                .with_context(|| format!("read-locking {}", self.path.display()))?;
        }
        *holders += 1;
        Ok(ReadGuard(self))
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let lock = self.0;
        let mut holders = lock.holders.lock().unwrap_or_else(|p| p.into_inner());
        *holders -= 1;
        if *holders == 0
            && let Some(fd) = &lock.file
        {
            // Failing to unlock leaves the lock until the fd closes with the backend; there is
            // nobody to report it to.
            let _ = rustix::fs::fcntl_lock(fd, FlockOperation::Unlock);
        }
    }
}

/// Open `rel` beneath `dir` for reading with [`RESOLVE_STRICT`].
pub(crate) fn open_beneath(dir: impl AsFd, rel: &str) -> rustix::io::Result<File> {
    rustix::fs::openat2(
        dir,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
        Mode::empty(),
        RESOLVE_STRICT,
    )
    .map(File::from)
}

/// Read a whole metadata file beneath the graph root, at most `limit` bytes.
pub(crate) fn read_file(
    root: impl AsFd,
    root_path: &Path,
    rel: &str,
    limit: u64,
) -> anyhow::Result<Option<Vec<u8>>> {
    let path = root_path.join(rel);
    let file = match open_beneath(root, rel) {
        Ok(f) => f,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("stat of {}", path.display()))?;
    ensure!(meta.is_file(), "{} is not a regular file", path.display());
    ensure!(
        meta.len() <= limit,
        "{} is {} bytes, more than the {limit} accepted",
        path.display(),
        meta.len()
    );
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        data.len() as u64 <= limit,
        "{} grew beyond {limit} bytes while being read",
        path.display()
    );
    Ok(Some(data))
}

/// Parse a JSON array of records from `rel` (absent file = empty).
pub(crate) fn read_records<T: for<'de> Deserialize<'de>>(
    root: impl AsFd,
    root_path: &Path,
    rel: &str,
) -> anyhow::Result<Vec<T>> {
    match read_file(root, root_path, rel, MAX_METADATA_LEN)? {
        None => Ok(Vec::new()),
        Some(data) => serde_json::from_slice(&data)
            .with_context(|| format!("parsing {}", root_path.join(rel).display())),
    }
}

/// The file name containers/storage gives a big-data item of an image: the key itself when it is
/// made of `[0-9a-z.]` only (like `manifest`), otherwise `=` + standard base64 of the key.
pub(crate) fn big_data_file_name(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b == b'.' || b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        key.to_owned()
    } else {
        format!(
            "={}",
            base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
        )
    }
}

/// The layer chain of an image, base first, from its top layer.
pub(crate) fn layer_chain<'a>(
    layers: &'a HashMap<String, LayerRecord>,
    image_id: &str,
    top: Option<&str>,
) -> anyhow::Result<Vec<&'a LayerRecord>> {
    let mut chain = Vec::new();
    let mut seen = HashSet::new();
    let mut next = top;
    while let Some(id) = next {
        validate_id("layer", id).with_context(|| format!("image {image_id}"))?;
        ensure!(
            chain.len() < MAX_LAYER_DEPTH,
            "image {image_id} has more than {MAX_LAYER_DEPTH} layers"
        );
        ensure!(
            seen.insert(id),
            "image {image_id}: layer {id} is its own ancestor"
        );
        let layer = layers
            .get(id)
            .with_context(|| format!("image {image_id}: layer {id} is not in the store"))?;
        ensure!(
            !layer.flags.get("incomplete").is_some_and(|v| v == true),
            "image {image_id}: layer {id} is incomplete (still being written or left by a crash)"
        );
        chain.push(layer);
        next = layer.parent.as_deref().filter(|p| !p.is_empty());
    }
    chain.reverse();
    Ok(chain)
}

/// Split `name[:tag]` into name and tag (`latest` when absent); a `:` before the last `/` is a
/// registry port, not a tag.
fn split_tag(name: &str) -> (&str, &str) {
    match name.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') && !n.is_empty() => (n, t),
        _ => (name, "latest"),
    }
}

/// Does the first component of `name` name a registry (`host.domain`, `host:port`, `localhost`)?
fn has_domain(name: &str) -> bool {
    match name.split_once('/') {
        Some((first, _)) => first.contains('.') || first.contains(':') || first == "localhost",
        None => false,
    }
}

/// The fully qualified repositories a short name stands for, in podman's preference order.
fn qualified_candidates(repo: &str) -> Vec<String> {
    if has_domain(repo) {
        return vec![repo.to_owned()];
    }
    let mut out = vec![format!("localhost/{repo}")];
    if repo.contains('/') {
        out.push(format!("docker.io/{repo}"));
    } else {
        out.push(format!("docker.io/library/{repo}"));
    }
    out
}

/// The repository part of a stored name (`reg/repo:tag` or `reg/repo@sha256:…`).
fn stored_repo(name: &str) -> &str {
    let name = name.split_once('@').map_or(name, |(n, _)| n);
    split_tag(name).0
}

/// The images of `found` with distinct ids, the first of each kept: the same image in more than
/// one store is one image (served from the first store that has it).
fn distinct<'a>(found: impl Iterator<Item = &'a ImageRecord>) -> Vec<&'a ImageRecord> {
    let mut seen = HashSet::new();
    found.filter(|i| seen.insert(i.id.as_str())).collect()
}

/// Resolve `reference` among `images` (every store's, in search order) as podman does: a full id (optionally `sha256:` or `@`
/// prefixed), then names (`name[:tag]`, short names qualified with `localhost/` and
/// `docker.io/library/` or matched on their last path components), `name@sha256:…` by image
/// digest, and finally a unique id prefix of at least [`MIN_ID_PREFIX`] hex digits. An exact
/// id or name takes the first store's match, as containers/storage looks in each image store in
/// turn; the other rules see the images of all stores at once, as libimage lists them.
pub(crate) fn resolve_reference<'a>(
    images: &'a [ImageRecord],
    reference: &str,
    store_desc: &str,
) -> Result<&'a ImageRecord, BackendError> {
    let not_found =
        || BackendError::ImageNotFound(format!("image {reference:?} not found in {store_desc}"));
    let ambiguous = |what: &str, found: &[&ImageRecord]| {
        let mut list: Vec<String> = found
            .iter()
            .map(|i| match i.names.first() {
                Some(n) => format!("{} ({n})", i.id),
                None => i.id.clone(),
            })
            .collect();
        list.sort();
        BackendError::ImageNotFound(format!(
            "{what} {reference:?} is ambiguous in {store_desc}: {}",
            list.join(", ")
        ))
    };
    if reference.is_empty() || reference.chars().any(|c| c.is_whitespace() || c == '\0') {
        return Err(BackendError::ImageNotFound(format!(
            "invalid image reference {reference:?}"
        )));
    }
    let bare = reference.strip_prefix('@').unwrap_or(reference);
    let bare = bare.strip_prefix("sha256:").unwrap_or(bare);
    if is_id(bare)
        && let Some(image) = images.iter().find(|i| i.id == bare)
    {
        return Ok(image);
    }

    if let Some((name, digest)) = reference.split_once('@') {
        // name[:tag]@sha256:… — the tag is ignored, as podman does when a digest is given.
        let (repo, _tag) = split_tag(name);
        let found = distinct(
            images
                .iter()
                .filter(|i| i.has_manifest_digest(digest))
                .filter(|i| repo.is_empty() || names_match_repo(i, repo)),
        );
        return match found.as_slice() {
            [one] => Ok(one),
            [] => Err(not_found()),
            many => Err(ambiguous("digest reference", many)),
        };
    }

    let (repo, tag) = split_tag(reference);
    for candidate in qualified_candidates(repo) {
        let full = format!("{candidate}:{tag}");
        if let Some(image) = images.iter().find(|i| i.names.contains(&full)) {
            return Ok(image);
        }
    }
    if !has_domain(repo) {
        let suffix = format!("/{repo}");
        let found = distinct(images.iter().filter(|i| {
            i.names.iter().any(|n| {
                let (r, t) = split_tag(n.split_once('@').map_or(n.as_str(), |(n, _)| n));
                t == tag && r.ends_with(&suffix)
            })
        }));
        match found.as_slice() {
            [one] => return Ok(one),
            [] => {}
            many => return Err(ambiguous("short name", many)),
        }
    }

    if bare.len() >= MIN_ID_PREFIX
        && bare.len() < ID_LEN
        && bare.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        let found = distinct(images.iter().filter(|i| i.id.starts_with(bare)));
        return match found.as_slice() {
            [one] => Ok(one),
            [] => Err(not_found()),
            many => Err(ambiguous("id prefix", many)),
        };
    }
    Err(not_found())
}

fn names_match_repo(image: &ImageRecord, repo: &str) -> bool {
    let candidates = qualified_candidates(repo);
    let suffix = format!("/{repo}");
    image.names.iter().any(|n| {
        let r = stored_repo(n);
        candidates.iter().any(|c| c == r) || (!has_domain(repo) && r.ends_with(&suffix))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: char, names: &[&str], digest: &str) -> ImageRecord {
        ImageRecord {
            id: id.to_string().repeat(64),
            names: names.iter().map(|s| s.to_string()).collect(),
            digest: Some(digest.to_owned()),
            digests: vec![],
            big_data_digests: HashMap::new(),
            layer: None,
            store: 0,
        }
    }

    #[test]
    fn resolves_like_podman() {
        let d1 = format!("sha256:{}", "1".repeat(64));
        let d2 = format!("sha256:{}", "2".repeat(64));
        let mut images = vec![
            image('a', &["localhost/app:latest", "localhost/app:v1"], &d1),
            image('b', &["docker.io/library/app:latest"], &d2),
            image('c', &["quay.io/org/tool:1.0"], &d2),
            image('d', &["registry.example.com:5000/org/tool:1.0"], &d1),
            image('e', &[], &d1),
        ];
        images[4].id = format!("aaa{}", "e".repeat(61));
        let id_of = |r: &str| resolve_reference(&images, r, "test store").map(|i| &i.id[..1]);
        assert_eq!(id_of("app").unwrap(), "a");
        assert_eq!(id_of("app:v1").unwrap(), "a");
        assert_eq!(id_of("localhost/app").unwrap(), "a");
        assert_eq!(id_of("docker.io/library/app:latest").unwrap(), "b");
        assert_eq!(id_of("quay.io/org/tool:1.0").unwrap(), "c");
        assert_eq!(
            id_of("registry.example.com:5000/org/tool:1.0").unwrap(),
            "d"
        );
        assert_eq!(id_of(&"c".repeat(64)).unwrap(), "c");
        assert_eq!(id_of(&format!("sha256:{}", "c".repeat(64))).unwrap(), "c");
        assert_eq!(id_of("ccc").unwrap(), "c");
        assert_eq!(id_of(&format!("localhost/app@{d1}")).unwrap(), "a");
        assert_eq!(id_of(&format!("quay.io/org/tool@{d2}")).unwrap(), "c");
        for missing in ["nope", "app:v2", "localhost/tool:1.0", "aa", "fff", ""] {
            assert!(
                matches!(
                    resolve_reference(&images, missing, "test store"),
                    Err(BackendError::ImageNotFound(_))
                ),
                "{missing}"
            );
        }
        let err = resolve_reference(&images, "tool:1.0", "test store")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("short name \"tool:1.0\" is ambiguous in test store: "),
            "{err}"
        );
        assert!(err.contains("quay.io/org/tool:1.0") && err.contains("registry.example.com"));
        let err = resolve_reference(&images, "aaa", "test store")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(resolve_reference(&images, &format!("app@{d2}"), "s").is_ok());
        // A second manifest of an image (the same image pulled with other compression) is known
        // only by its big-data item's digest.
        let d3 = format!("sha256:{}", "3".repeat(64));
        images[2]
            .big_data_digests
            .insert(format!("manifest-{d3}"), d3.clone());
        images[2]
            .big_data_digests
            .insert(format!("sha256:{}", "c".repeat(64)), d1.clone());
        let found = resolve_reference(&images, &format!("quay.io/org/tool@{d3}"), "s");
        assert_eq!(found.unwrap().id, "c".repeat(64));
        // Only manifests count: a config (or any other item) with that digest does not.
        assert!(resolve_reference(&images, &format!("quay.io/org/tool@{d1}"), "s").is_err());
    }

    #[test]
    fn resolves_across_stores_in_search_order() {
        let d1 = format!("sha256:{}", "1".repeat(64));
        let in_store = |store, id, names: &[&str]| ImageRecord {
            store,
            ..image(id, names, &d1)
        };
        let images = vec![
            in_store(0, 'a', &["docker.io/library/app:latest"]),
            in_store(0, 'b', &[]),
            in_store(1, 'c', &["localhost/app:latest"]),
            // The same image in two stores: the name only the second store gives it finds it
            // there; otherwise it is one image, not two.
            in_store(1, 'b', &["quay.io/org/b:1"]),
            in_store(2, 'a', &["docker.io/library/app:latest"]),
        ];
        let found = |r: &str| {
            resolve_reference(&images, r, "s")
                .map(|i| (i.id[..1].to_owned(), i.store))
                .unwrap_or_else(|e| panic!("{r}: {e}"))
        };
        // localhost/ is the first candidate of a short name, whatever store has it.
        assert_eq!(found("app"), ("c".into(), 1));
        assert_eq!(found("docker.io/library/app"), ("a".into(), 0));
        assert_eq!(found(&"a".repeat(64)), ("a".into(), 0));
        assert_eq!(found("quay.io/org/b:1"), ("b".into(), 1));
        assert_eq!(found("b:1"), ("b".into(), 1));
        assert_eq!(found("bbb"), ("b".into(), 0));
        assert_eq!(found(&format!("org/b@{d1}")), ("b".into(), 1));
    }

    #[test]
    fn big_data_names() {
        assert_eq!(big_data_file_name("manifest"), "manifest");
        assert_eq!(
            big_data_file_name(
                "sha256:15b2c3d9788d989550ff58799fe812f9c6b41430b7d65198bee1c37b4ca10a47"
            ),
            "=c2hhMjU2OjE1YjJjM2Q5Nzg4ZDk4OTU1MGZmNTg3OTlmZTgxMmY5YzZiNDE0MzBiN2Q2NTE5OGJlZTFjMzdiNGNhMTBhNDc="
        );
    }
}
