//! A composefs repository writer, bit-compatible with composefs-rs 0.9.4 (`cfsctl`).
//!
//! ```text
//! REPO/                      (mode 0700; shared flock held while a Repository is open)
//! ├── meta.json              {"version":1,"algorithm":"fsverity-sha512-12",…}
//! ├── objects/XX/<rest>      content-addressed by fs-verity digest, mode 0400
//! ├── streams/<name>         → ../objects/XX/<rest>       (splitstreams)
//! │   └── refs/oci/<tag>     → ../../oci-manifest-sha256:…
//! └── images/<hex>           → ../objects/XX/<rest>       (EROFS images)
//! ```
//!
//! Layers are imported with [`oci::LayerImporter`] (tar bytes inline, file bodies as fds), made
//! visible with [`oci::publish_layer`], and an image is finished with [`oci::prepare_image`] +
//! [`oci::PreparedImage::publish`] (or [`oci::publish_image`]), which also builds the composefs
//! EROFS image (feature `erofs`) so that `cfsctl oci mount` works.
//!
//! # EROFS images
//!
//! The EROFS image is built from the layer splitstreams by a compact copy of composefs-rs's
//! tree and V1 writer (feature `erofs`), so its id equals `cfsctl oci compute-id` for every
//! image composefs 0.9.4 accepts. It is built for every image podman can mount, including
//! what composefs refuses: times before 1970, images without `/usr` (then `/` keeps the
//! metadata the layers give it), layers without their parent directories. An image that
//! still cannot be represented is an error of [`oci::prepare_image`], and `pull` tags
//! nothing. The tree is held in memory: about 150 bytes per file.
//!
//! # Durability
//!
//! Nothing here calls `fsync`/`syncfs` on its own (except once for `meta.json` on creation).
//! Objects are written first and made visible (symlinked from `streams/`, `images/`, tags)
//! only afterwards, so the crash-safe sequence is: store everything, [`Repository::sync`],
//! publish (symlinks only), [`Repository::sync`]. That is two `syncfs` per pull.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use anyhow::{Context, bail, ensure};
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, StatVfsMountFlags};
use rustix::io::Errno;

mod fsverity;
mod objects;
pub mod oci;
mod pool;
mod splitstream;
mod tar;

#[cfg(feature = "erofs")]
mod erofs;

pub use fsverity::FsVerityHasher;
pub use oci::{
    ImportStats, LayerImporter, PreparedImage, PublishedImage, prepare_image, publish_image,
    publish_layer,
};
pub use pool::{BodyPool, with_body_pool};
pub use splitstream::{Chunk, SplitStreamReader, SplitStreamWriter};

/// The fs-verity hash of a repository: `fsverity-sha256-12` or `fsverity-sha512-12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// SHA-256, 4 KiB Merkle blocks.
    Sha256,
    /// SHA-512, 4 KiB Merkle blocks (the default for new repositories, as in `cfsctl init`).
    Sha512,
}

impl HashAlg {
    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha512 => 64,
        }
    }

    /// The kernel's `FS_VERITY_HASH_ALG_*` number, also used in splitstream headers.
    pub fn kernel_id(self) -> u8 {
        match self {
            HashAlg::Sha256 => 1,
            HashAlg::Sha512 => 2,
        }
    }

    /// The `algorithm` string of `meta.json`.
    pub fn meta_name(self) -> &'static str {
        match self {
            HashAlg::Sha256 => "fsverity-sha256-12",
            HashAlg::Sha512 => "fsverity-sha512-12",
        }
    }

    fn from_meta_name(s: &str) -> Option<HashAlg> {
        match s {
            "fsverity-sha256-12" => Some(HashAlg::Sha256),
            "fsverity-sha512-12" => Some(HashAlg::Sha512),
            _ => None,
        }
    }
}

/// Longest digest of any [`HashAlg`].
const MAX_DIGEST_LEN: usize = 64;

/// An object's name: its fs-verity digest. `Display` is lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectId {
    alg: HashAlg,
    bytes: [u8; MAX_DIGEST_LEN],
}

impl ObjectId {
    /// Build from raw digest bytes; `None` if the length does not fit `alg`.
    pub fn from_bytes(alg: HashAlg, bytes: &[u8]) -> Option<ObjectId> {
        if bytes.len() != alg.digest_len() {
            return None;
        }
        let mut b = [0u8; MAX_DIGEST_LEN];
        b[..bytes.len()].copy_from_slice(bytes);
        Some(ObjectId { alg, bytes: b })
    }

    /// Parse lowercase or uppercase hex; the length selects the algorithm (64 digits: sha256,
    /// 128: sha512).
    ///
    /// # Errors
    /// Wrong length or a non-hex digit.
    pub fn from_hex(hex: &str) -> anyhow::Result<ObjectId> {
        let alg = match hex.len() {
            64 => HashAlg::Sha256,
            128 => HashAlg::Sha512,
            n => bail!("object id {hex:?}: {n} hex digits, expected 64 or 128"),
        };
        let mut b = [0u8; MAX_DIGEST_LEN];
        hex::decode_to_slice(hex, &mut b[..alg.digest_len()])
            .with_context(|| format!("object id {hex:?}"))?;
        Ok(ObjectId { alg, bytes: b })
    }

    /// The digest algorithm.
    pub fn alg(&self) -> HashAlg {
        self.alg
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.alg.digest_len()]
    }

    /// `XX/<rest>`: the path below `objects/`.
    pub fn object_path(&self) -> String {
        let b = self.as_bytes();
        let mut s = String::with_capacity(b.len() * 2 + 1);
        push_hex(&mut s, &b[..1]);
        s.push('/');
        push_hex(&mut s, &b[1..]);
        s
    }

    /// Parse the target of a `streams/` or `images/` symlink (`…/objects/XX/<rest>`).
    fn from_link_target(alg: HashAlg, target: &[u8]) -> Option<ObjectId> {
        let hex_len = alg.digest_len() * 2;
        let tail_len = hex_len + 1; // "XX/" + rest
        if target.len() < tail_len + "objects/".len() {
            return None;
        }
        let (head, tail) = target.split_at(target.len() - tail_len);
        if !head.ends_with(b"objects/") || tail[2] != b'/' {
            return None;
        }
        let mut hex = Vec::with_capacity(hex_len);
        hex.extend_from_slice(&tail[..2]);
        hex.extend_from_slice(&tail[3..]);
        let mut b = [0u8; MAX_DIGEST_LEN];
        hex::decode_to_slice(&hex, &mut b[..alg.digest_len()]).ok()?;
        Some(ObjectId { alg, bytes: b })
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::with_capacity(MAX_DIGEST_LEN * 2);
        push_hex(&mut s, self.as_bytes());
        f.write_str(&s)
    }
}

/// Append `bytes` as lowercase hex. (Object names are formatted once or twice per file of an
/// image; `write!("{:02x}")` per byte showed up in profiles.)
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

impl std::fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

/// How [`Repository::store_file`] got the bytes into the object store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMethod {
    /// `FICLONE`: the object shares the source's extents, no data copied.
    Reflinked,
    /// The bytes were written (the source was read once for hashing and copying).
    Copied,
    /// An intact object with this digest was already there.
    AlreadyPresent,
}

/// How [`Repository::open_or_create`] creates a repository that does not exist yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepoOptions {
    /// Digest of a new repository (default SHA-512, as `cfsctl init`); an existing repository
    /// must use the same one when this is given.
    pub hash: Option<HashAlg>,
    /// Create a new repository without fs-verity (`cfsctl init --insecure`): object digests
    /// are then computed in userspace only and nothing but file permissions protects objects
    /// from being changed. Without it, creating a repository on a filesystem that lacks
    /// fs-verity fails. An existing repository keeps the mode its `meta.json` records.
    pub insecure: bool,
}

/// Repository errors a caller may branch on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// A new repository would need fs-verity, which its filesystem lacks.
    #[error(
        "cannot create repository {}: its filesystem ({filesystem}) has no fs-verity; \
         pass --insecure to create it without (as `cfsctl init --insecure` does)",
        path.display()
    )]
    NoFsVerity {
        /// The repository directory.
        path: PathBuf,
        /// The filesystem type, as `stat -f` names it (`xfs`, `ext4`, …).
        filesystem: String,
    },
}

/// The type of the filesystem holding `fd`, by name for the common ones (`statfs` magic).
fn filesystem_name(fd: impl AsFd) -> String {
    const NAMES: &[(u64, &str)] = &[
        (0x5846_5342, "xfs"),
        (0xef53, "ext2/ext3/ext4"),
        (0x9123_683e, "btrfs"),
        (0xf2f5_2010, "f2fs"),
        (0x0102_1994, "tmpfs"),
        (0x794c_7630, "overlay"),
        (0x6969, "nfs"),
        (0x6573_5546, "fuse"),
        (0x2fc1_2fc1, "zfs"),
        (0x5346_544e, "ntfs"),
        (0x4d44, "vfat"),
    ];
    match rustix::fs::fstatfs(fd) {
        Ok(st) => {
            // `f_type` is signed on some targets; the magic numbers are 32-bit.
            let magic = st.f_type as u64 & 0xffff_ffff;
            NAMES
                .iter()
                .find(|(m, _)| *m == magic)
                .map_or_else(|| format!("type {magic:#x}"), |(_, n)| (*n).to_owned())
        }
        Err(e) => format!("unknown: {e}"),
    }
}

/// Who else may change a source file's bytes during and after its import, and so whether an
/// object may be named from bytes read out of the source before the object is made from it.
///
/// A reflink (`FICLONE`) copies whatever the source holds *when it is cloned*. Naming the
/// object from an earlier read of the source is only sound when nobody who could rewrite the
/// source in between could not rewrite the repository anyway. Otherwise an object is named by
/// hashing its own bytes: it is cloned first and the clone is read (and fed to the layer's
/// sha256), or it is written from the very buffer that was hashed.
///
/// With fs-verity (a secure repository) the kernel measures every object after it is made
/// and the measurement must equal the name, so either way no mismatched object is linked;
/// without it (an insecure repository) this choice is what keeps names true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceTrust {
    /// Source files owned by root or by `uid` (the repository's owner, who could rewrite the
    /// repository anyway) and writable by nobody else (no group or other write bit, so no ACL
    /// grants it either) are hashed as they are read and reflinked afterwards: one read, from
    /// the source's page cache. Every other file is treated as [`SourceTrust::Untrusted`].
    Owners {
        /// The repository owner's uid.
        uid: u32,
    },
    /// Every object is hashed from its own bytes.
    Untrusted,
}

impl SourceTrust {
    /// May the file with status `st` be hashed before it is cloned?
    pub(crate) fn trusts(self, st: &rustix::fs::Stat) -> bool {
        match self {
            SourceTrust::Owners { uid } => {
                (st.st_uid == 0 || st.st_uid == uid) && st.st_mode & 0o022 == 0
            }
            SourceTrust::Untrusted => false,
        }
    }
}

/// The EROFS image formats a repository asks for (`meta.json` `erofs_formats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErofsFormats {
    /// The format named by the `composefs.image[.v1]` ref `cfsctl oci mount` follows.
    pub(crate) default: u8,
    /// Further formats generated alongside.
    pub(crate) extra: Vec<u8>,
}

impl ErofsFormats {
    /// Formats in generation order: `default` first, then `extra` sorted, without duplicates.
    #[cfg_attr(not(feature = "erofs"), allow(dead_code))]
    pub(crate) fn versions(&self) -> Vec<u8> {
        let mut v = vec![self.default];
        let mut extra = self.extra.clone();
        extra.sort_unstable();
        extra.dedup();
        v.extend(extra.into_iter().filter(|e| *e != self.default));
        v
    }
}

/// `meta.json` as composefs-rs 0.9.4 writes it (field order matters for byte equality).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Meta {
    version: u32,
    algorithm: String,
    #[serde(default)]
    features: Features,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    erofs_formats: Option<MetaErofsFormats>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Features {
    #[serde(default)]
    compatible: Vec<String>,
    #[serde(default)]
    read_only_compatible: Vec<String>,
    #[serde(default)]
    incompatible: Vec<String>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct MetaErofsFormats {
    default: u8,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    extra: Vec<u8>,
}

/// The repository format version we understand (`meta.json` `version`).
const REPO_FORMAT_VERSION: u32 = 1;

/// The read-only-compatible feature composefs-rs 0.9.4 knows: "V1 EROFS images".
const FEATURE_V1_EROFS: &str = "v1_erofs";

/// EROFS format composefs-rs 0.9.4 uses for new repositories (`cfsctl init` default).
const DEFAULT_EROFS_FORMAT: u8 = 1;

/// EROFS format of repositories that predate `erofs_formats` and lack `v1_erofs`.
const LEGACY_EROFS_FORMAT: u8 = 2;

/// Largest `meta.json` we read; the real one is ~200 bytes.
const MAX_META_JSON: u64 = 64 << 10;

/// Name of the repository metadata file.
const META_JSON: &str = "meta.json";

impl Meta {
    fn new(alg: HashAlg) -> Meta {
        Meta {
            version: REPO_FORMAT_VERSION,
            algorithm: alg.meta_name().to_owned(),
            features: Features {
                read_only_compatible: vec![FEATURE_V1_EROFS.to_owned()],
                ..Features::default()
            },
            erofs_formats: Some(MetaErofsFormats {
                default: DEFAULT_EROFS_FORMAT,
                extra: Vec::new(),
            }),
        }
    }

    /// The effective EROFS formats, with composefs-rs's fallback for repositories written
    /// before `erofs_formats` existed (absent or `{default: 2}` → decided by `v1_erofs`).
    fn erofs_formats(&self) -> ErofsFormats {
        match &self.erofs_formats {
            Some(f) if !(f.default == LEGACY_EROFS_FORMAT && f.extra.is_empty()) => ErofsFormats {
                default: f.default,
                extra: f.extra.clone(),
            },
            _ if self
                .features
                .read_only_compatible
                .iter()
                .any(|f| f == FEATURE_V1_EROFS) =>
            {
                ErofsFormats {
                    default: DEFAULT_EROFS_FORMAT,
                    extra: Vec::new(),
                }
            }
            _ => ErofsFormats {
                default: LEGACY_EROFS_FORMAT,
                extra: Vec::new(),
            },
        }
    }
}

/// An open composefs repository, writable, holding composefs's shared repository lock.
///
/// `cfsctl` takes a shared `flock` on the repository directory for every operation and an
/// exclusive one for garbage collection, so holding the shared lock keeps `cfsctl gc` from
/// deleting objects we have written but not yet linked.
pub struct Repository {
    path: PathBuf,
    /// The repository directory, opened read-only; carries the shared flock.
    dir: OwnedFd,
    /// `objects/`.
    objects: OwnedFd,
    alg: HashAlg,
    insecure: bool,
    erofs_formats: ErofsFormats,
    /// Source devices on which `FICLONE` into this repository failed as unsupported.
    no_reflink_from: Mutex<HashSet<u64>>,
    /// Source devices from which `FICLONE` into this repository has worked.
    reflink_ok_from: Mutex<HashSet<u64>>,
    /// Reusable read buffers for [`Repository::store_file`].
    buffers: Mutex<Vec<Vec<u8>>>,
    /// Round-robin counter choosing the `objects/XX/` of a tmpfile made before its object's
    /// name is known (a clone that is hashed afterwards).
    next_fanout: AtomicU8,
    /// `objects/` has been seen to lack fs-verity (insecure repositories only): objects are
    /// then linked straight from their tmpfile, without the read-only reopen that enabling
    /// fs-verity needs.
    no_verity: AtomicBool,
    /// Whether `linkat(fd, "", …, AT_EMPTY_PATH)` works here ([`LINK_UNKNOWN`], …): it needs
    /// `CAP_DAC_READ_SEARCH`; otherwise tmpfiles are linked by their `/proc/self/fd` path,
    /// which costs a path walk through procfs per object.
    link_empty_path: AtomicU8,
}

/// [`Repository::link_empty_path`]: not tried yet.
pub(crate) const LINK_UNKNOWN: u8 = 0;
/// [`Repository::link_empty_path`]: works.
pub(crate) const LINK_EMPTY_PATH: u8 = 1;
/// [`Repository::link_empty_path`]: refused; use `/proc/self/fd/N`.
pub(crate) const LINK_PROC_PATH: u8 = 2;

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("path", &self.path)
            .field("alg", &self.alg)
            .field("insecure", &self.insecure)
            .field("erofs_formats", &self.erofs_formats)
            .finish_non_exhaustive()
    }
}

/// Source of unique suffixes for temporary names in the repository.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name for a temporary directory entry that no concurrent writer (in this or another
/// process) picks: pid, a process-wide counter and the clock.
pub(crate) fn tmp_name(prefix: &str) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}-{n}-{nanos:08x}", std::process::id())
}

/// `/proc/self/fd/N`, for `linkat`/`open` of an fd that has no name (O_TMPFILE).
pub(crate) fn proc_fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

impl Repository {
    /// Open the repository at `path`, creating it (and its directory, mode 0700) if missing.
    ///
    /// A new repository uses `opts.hash` (default SHA-512) and V1 EROFS images, like
    /// `cfsctl init`. It requires fs-verity, like `cfsctl init`, unless `opts.insecure` asks
    /// for a repository without it (`cfsctl init --insecure`: digests computed in userspace
    /// only); on a filesystem without fs-verity, creating a secure repository fails with
    /// [`RepoError::NoFsVerity`] before anything is written. An existing repository keeps the
    /// mode its `meta.json` records and its algorithm; `opts.hash`, when given, must agree.
    ///
    /// # Errors
    /// No fs-verity for a new secure repository, conflicting algorithm, unknown incompatible
    /// or read-only-compatible features, a newer format version, a read-only repository, an
    /// old-format repository without `meta.json`, or I/O errors.
    pub fn open_or_create(path: &Path, opts: &RepoOptions) -> anyhow::Result<Repository> {
        let hash = opts.hash;
        let created = match rustix::fs::mkdir(path, Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating repository directory {}", path.display()));
            }
        };
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening repository {}", path.display()))?;
        // Blocks while `cfsctl gc` holds the exclusive lock, as cfsctl itself does.
        rustix::fs::flock(&dir, FlockOperation::LockShared)
            .with_context(|| format!("locking repository {}", path.display()))?;

        let st = rustix::fs::fstatvfs(&dir)
            .with_context(|| format!("checking repository {}", path.display()))?;
        ensure!(
            !st.f_flag.contains(StatVfsMountFlags::RDONLY),
            "repository {} is on a read-only filesystem",
            path.display()
        );
        rustix::fs::accessat(&dir, ".", rustix::fs::Access::WRITE_OK, AtFlags::empty())
            .with_context(|| format!("repository {} is not writable", path.display()))?;

        let (meta, meta_fd) = match read_meta(&dir, path)? {
            Some(found) => found,
            None => {
                match rustix::fs::statat(&dir, "objects", AtFlags::empty()) {
                    Ok(_) => bail!(
                        "repository {} has objects/ but no {META_JSON} (an old-format \
                         repository); open it once with cfsctl to upgrade it",
                        path.display()
                    ),
                    Err(Errno::NOENT) => {}
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("checking {}/objects", path.display()));
                    }
                }
                if let Err(e) =
                    create_meta(&dir, path, hash.unwrap_or(HashAlg::Sha512), opts.insecure)
                {
                    // Refused before anything was written: leave no empty repository behind.
                    if created {
                        let _ = rustix::fs::rmdir(path);
                    }
                    return Err(e);
                }
                read_meta(&dir, path)?.with_context(|| {
                    format!("{}/{META_JSON} vanished after creation", path.display())
                })?
            }
        };

        ensure!(
            meta.version <= REPO_FORMAT_VERSION,
            "repository {} has format version {}, this program knows {REPO_FORMAT_VERSION}",
            path.display(),
            meta.version
        );
        ensure!(
            meta.features.incompatible.is_empty(),
            "repository {} needs unknown incompatible features {:?}",
            path.display(),
            meta.features.incompatible
        );
        let unknown_ro: Vec<&String> = meta
            .features
            .read_only_compatible
            .iter()
            .filter(|f| f.as_str() != FEATURE_V1_EROFS)
            .collect();
        ensure!(
            unknown_ro.is_empty(),
            "repository {} has unknown read-only-compatible features {unknown_ro:?}; \
             refusing to write to it",
            path.display()
        );
        let alg = HashAlg::from_meta_name(&meta.algorithm).with_context(|| {
            format!(
                "repository {} uses unsupported algorithm {:?}",
                path.display(),
                meta.algorithm
            )
        })?;
        if let Some(want) = hash {
            ensure!(
                want == alg,
                "repository {} uses {}, but {} was requested",
                path.display(),
                alg.meta_name(),
                want.meta_name()
            );
        }
        // composefs-rs: fs-verity on meta.json means "every object must have fs-verity".
        let insecure = fsverity::measure(&meta_fd, alg)
            .with_context(|| format!("measuring {}/{META_JSON}", path.display()))?
            .is_none();

        let objects = open_or_mkdir(&dir, "objects", 0o755)
            .with_context(|| format!("opening {}/objects", path.display()))?;

        Ok(Repository {
            path: path.to_owned(),
            dir,
            objects,
            alg,
            insecure,
            erofs_formats: meta.erofs_formats(),
            no_reflink_from: Mutex::new(HashSet::new()),
            reflink_ok_from: Mutex::new(HashSet::new()),
            buffers: Mutex::new(Vec::new()),
            next_fanout: AtomicU8::new(0),
            no_verity: AtomicBool::new(false),
            link_empty_path: AtomicU8::new(LINK_UNKNOWN),
        })
    }

    /// The repository's fs-verity algorithm.
    pub fn algorithm(&self) -> HashAlg {
        self.alg
    }

    /// True when `meta.json` has no fs-verity: objects are not required to have it, and
    /// digests are computed in userspace (`cfsctl init --insecure`).
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// The repository directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The uid owning the repository directory: who can rewrite it anyway (besides root).
    ///
    /// # Errors
    /// `fstat` failed.
    pub fn owner(&self) -> anyhow::Result<u32> {
        let st = rustix::fs::fstat(&self.dir)
            .with_context(|| format!("inspecting repository {}", self.path.display()))?;
        Ok(st.st_uid)
    }

    #[cfg_attr(not(feature = "erofs"), allow(dead_code))]
    pub(crate) fn erofs_formats(&self) -> &ErofsFormats {
        &self.erofs_formats
    }

    pub(crate) fn objects_dir(&self) -> BorrowedFd<'_> {
        self.objects.as_fd()
    }

    /// The object `streams/<name>` points to, if the link exists and its object is present.
    ///
    /// # Errors
    /// `name` is not a plain stream name, the link is not a stream link, or I/O errors.
    pub fn has_stream(&self, name: &str) -> anyhow::Result<Option<ObjectId>> {
        check_link_name(name)?;
        let link = format!("streams/{name}");
        let target = match rustix::fs::readlinkat(&self.dir, &link, Vec::new()) {
            Ok(t) => t,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.rel(&link))),
        };
        let id = ObjectId::from_link_target(self.alg, target.as_bytes())
            .with_context(|| format!("{} points to {target:?}, not an object", self.rel(&link)))?;
        match rustix::fs::statat(&self.objects, id.object_path(), AtFlags::empty()) {
            Ok(_) => Ok(Some(id)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("checking object {id}")),
        }
    }

    /// One `syncfs` of the repository's filesystem.
    ///
    /// # Errors
    /// I/O errors from writeback.
    pub fn sync(&self) -> anyhow::Result<()> {
        rustix::fs::syncfs(&self.dir).with_context(|| format!("syncing {}", self.path.display()))
    }

    /// Open an object read-only.
    ///
    /// # Errors
    /// The object is missing, or (in a secure repository) its fs-verity digest differs.
    pub fn open_object(&self, id: &ObjectId) -> anyhow::Result<File> {
        let fd = rustix::fs::openat(
            &self.objects,
            id.object_path(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening object {id}"))?;
        if !self.insecure {
            let got = fsverity::measure(&fd, self.alg)
                .with_context(|| format!("measuring object {id}"))?;
            ensure!(
                got.as_ref() == Some(id),
                "object {id} has fs-verity digest {got:?}"
            );
        }
        Ok(File::from(fd))
    }

    /// `path/rel` for messages.
    pub(crate) fn rel(&self, rel: &str) -> String {
        format!("{}/{rel}", self.path.display())
    }

    /// Make `link` (relative to the repository) a symlink to `target`, atomically replacing
    /// what was there; parents are created (0755).
    pub(crate) fn symlink(&self, link: &str, target: &str) -> anyhow::Result<()> {
        let (parent, _) = link.rsplit_once('/').unwrap_or(("", link));
        if !parent.is_empty() {
            mkdir_p(&self.dir, parent).with_context(|| format!("creating {}", self.rel(parent)))?;
        }
        match rustix::fs::symlinkat(target, &self.dir, link) {
            Ok(()) => return Ok(()),
            Err(Errno::EXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", self.rel(link))),
        }
        if let Ok(cur) = rustix::fs::readlinkat(&self.dir, link, Vec::new())
            && cur.as_bytes() == target.as_bytes()
        {
            return Ok(());
        }
        let tmp = match parent {
            "" => tmp_name(".symlink-"),
            p => format!("{p}/{}", tmp_name(".symlink-")),
        };
        rustix::fs::symlinkat(target, &self.dir, &tmp)
            .with_context(|| format!("creating {}", self.rel(&tmp)))?;
        if let Err(e) = rustix::fs::renameat(&self.dir, &tmp, &self.dir, link) {
            let _ = rustix::fs::unlinkat(&self.dir, &tmp, AtFlags::empty());
            return Err(e).with_context(|| format!("replacing {}", self.rel(link)));
        }
        Ok(())
    }

    /// Take a reusable read buffer of at least `want` bytes (capped at [`objects::READ_CHUNK`]).
    pub(crate) fn take_buffer(&self, want: usize) -> Vec<u8> {
        let mut pool = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = pool.pop().unwrap_or_default();
        let want = want.clamp(1, objects::READ_CHUNK);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        buf
    }

    pub(crate) fn give_buffer(&self, buf: Vec<u8>) {
        /// Pooled buffers beyond this many are freed: one per concurrent importer is enough.
        const MAX_POOLED_BUFFERS: usize = 8;
        let mut pool = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < MAX_POOLED_BUFFERS {
            pool.push(buf);
        }
    }
}

/// Reject names that would escape `streams/` or address something else: `/`, `..`, NUL, empty.
pub(crate) fn check_link_name(name: &str) -> anyhow::Result<()> {
    ensure!(
        !name.is_empty()
            && !name.contains('/')
            && !name.contains('\0')
            && name != "."
            && name != "..",
        "invalid stream name {name:?}"
    );
    Ok(())
}

/// Open `name` below `dir` as a directory, creating it with `mode` if missing.
fn open_or_mkdir(dir: impl AsFd, name: &str, mode: u32) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
        Err(Errno::NOENT) => {}
        r => return r,
    }
    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    rustix::fs::openat(&dir, name, flags, Mode::empty())
}

/// `mkdir -p` of a relative path below `dir` (mode 0755, like composefs-rs).
fn mkdir_p(dir: impl AsFd, rel: &str) -> rustix::io::Result<()> {
    let mut prefix = String::new();
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(comp);
        match rustix::fs::mkdirat(&dir, prefix.as_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read and parse `meta.json`, returning it with its open fd (for the fs-verity probe).
fn read_meta(dir: &OwnedFd, path: &Path) -> anyhow::Result<Option<(Meta, OwnedFd)>> {
    let fd = match rustix::fs::openat(
        dir,
        META_JSON,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}/{META_JSON}", path.display())),
    };
    let mut data = Vec::new();
    use std::io::Read;
    File::from(fd.try_clone()?)
        .take(MAX_META_JSON + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}/{META_JSON}", path.display()))?;
    ensure!(
        data.len() as u64 <= MAX_META_JSON,
        "{}/{META_JSON} is larger than {MAX_META_JSON} bytes",
        path.display()
    );
    let meta: Meta = serde_json::from_slice(&data)
        .with_context(|| format!("parsing {}/{META_JSON}", path.display()))?;
    Ok(Some((meta, fd)))
}

/// Write a fresh `meta.json` (pretty JSON plus newline, as composefs-rs writes it): into a
/// temporary file, fsync, fs-verity enabled unless `insecure` (fs-verity on `meta.json` is
/// what marks a repository secure), then linked into place without replacing, so a concurrent
/// creator sees either nothing or a whole file.
fn create_meta(dir: &OwnedFd, path: &Path, alg: HashAlg, insecure: bool) -> anyhow::Result<()> {
    let mut json = serde_json::to_vec_pretty(&Meta::new(alg)).context("serializing meta.json")?;
    json.push(b'\n');
    let ctx = || format!("creating {}/{META_JSON}", path.display());
    // An anonymous O_TMPFILE where possible; a named temporary file otherwise.
    let (fd, tmp) = match rustix::fs::openat(
        dir,
        ".",
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    ) {
        Ok(fd) => (fd, None),
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
            let name = tmp_name(".meta.json-");
            let fd = rustix::fs::openat(
                dir,
                name.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            )
            .with_context(ctx)?;
            (fd, Some(name))
        }
        Err(e) => return Err(e).with_context(ctx),
    };
    let r = (|| -> anyhow::Result<()> {
        let mut f = File::from(fd);
        f.write_all(&json)?;
        f.sync_all()?;
        let ro = match &tmp {
            None => rustix::fs::open(
                proc_fd_path(f.as_fd()).as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?,
            Some(name) => rustix::fs::openat(
                dir,
                name.as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?,
        };
        drop(f);
        if !insecure && fsverity::enable(&ro, alg)? == fsverity::KernelVerity::Unsupported {
            return Err(RepoError::NoFsVerity {
                path: path.to_owned(),
                filesystem: filesystem_name(&ro),
            }
            .into());
        }
        let linked = match &tmp {
            None => rustix::fs::linkat(
                rustix::fs::CWD,
                proc_fd_path(ro.as_fd()).as_str(),
                dir,
                META_JSON,
                AtFlags::SYMLINK_FOLLOW,
            ),
            Some(name) => rustix::fs::renameat_with(
                dir,
                name.as_str(),
                dir,
                META_JSON,
                rustix::fs::RenameFlags::NOREPLACE,
            ),
        };
        match linked {
            // EEXIST: another process created the repository first; its meta.json wins.
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    })();
    if let Some(name) = &tmp {
        // Gone after a successful rename; a leftover after a lost race or an error.
        let _ = rustix::fs::unlinkat(dir, name.as_str(), AtFlags::empty());
    }
    match r {
        // Already names the repository; a context would only repeat it.
        Err(e) if e.downcast_ref::<RepoError>().is_some() => Err(e),
        r => r.with_context(ctx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secure_repository_needs_fs_verity() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("repo");
        let probe = rustix::fs::open(tmp.path(), OFlags::RDONLY, Mode::empty()).unwrap();
        let fs = filesystem_name(&probe);
        match Repository::open_or_create(&path, &RepoOptions::default()) {
            Err(e) => {
                let Some(RepoError::NoFsVerity {
                    path: p,
                    filesystem,
                }) = e.downcast_ref()
                else {
                    panic!("unexpected error: {e:#}");
                };
                assert_eq!((p, filesystem), (&path, &fs));
                assert!(e.to_string().contains("pass --insecure"), "{e}");
                assert!(!path.exists(), "the refused repository's directory is left");
            }
            // This filesystem has fs-verity: the repository is a secure one.
            Ok(repo) => assert!(!repo.insecure(), "{fs} has fs-verity"),
        }
        let insecure = RepoOptions {
            insecure: true,
            ..RepoOptions::default()
        };
        let repo = Repository::open_or_create(&path, &insecure).unwrap();
        let was_insecure = repo.insecure();
        drop(repo);
        // Reopened without the flag, it keeps its mode.
        let repo = Repository::open_or_create(&path, &RepoOptions::default()).unwrap();
        assert_eq!(repo.insecure(), was_insecure);
    }
}
