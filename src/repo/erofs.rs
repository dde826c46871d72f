//! The composefs EROFS image of an OCI image's root filesystem, as composefs-rs 0.9.4 builds
//! it for `cfsctl oci pull` (and recomputes for `cfsctl oci compute-id`).
//!
//! Steps, each mirroring composefs-rs so the image id is the same:
//! 1. Read each layer splitstream back as tar entries with `tar-core` (the parser composefs
//!    itself uses, so accepted inputs and parsed metadata agree: PAX/GNU names, ids, mtime
//!    with PAX nanoseconds, `SCHILY.xattr.*`).
//! 2. Apply the layers in order to composefs's in-memory tree: `.wh.<name>` deletes,
//!    `.wh..wh..opq` clears the directory, a directory over a directory only updates its
//!    metadata, anything else replaces; hardlinks share the leaf.
//! 3. composefs's OCI transform: `/usr`'s metadata onto `/`, `/run` emptied, xattrs other
//!    than `security.capability` dropped.
//! 4. composefs's EROFS writer, once per format the repository asks for.
//!
//! The tree is held in memory (one node per file, plus inline bodies of ≤ 64 bytes); this
//! module is the boundary behind which a streaming writer could replace it.
//!
//! Known composefs 0.9.4 limits are reported, not fatal: no `/usr` (step 3 fails), pre-1970
//! PAX mtimes (step 1 fails), sparse files and other entry types it has no node for.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use composefs::erofs::format::FormatVersion;
use composefs::erofs::writer::{ValidatedFileSystem, mkfs_erofs_versioned};
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue, Sha512HashValue};
use composefs::generic_tree::OciTransformOptions;
use composefs::tree::{Directory, FileSystem, Inode, LeafContent, RegularFile, Stat};
use tar_core::EntryType;
use tar_core::parse::{ParseEvent, Parser};

use super::oci::LAYER_CONTENT_TYPE;
use super::splitstream::{Body, SplitStreamReader};
use super::tar::{BLOCK, INLINE_CONTENT_MAX};
use super::{HashAlg, ObjectId, Repository};

/// Why an image could not be built, in words for the user.
type Skip = String;

/// Built images: (EROFS format version, image bytes), in the order asked for.
pub(crate) type Images = Vec<(u8, Box<[u8]>)>;

/// An error while building: `Fatal` for our own I/O or a corrupt repository, `Skip` for
/// content composefs 0.9.4 cannot represent.
enum BuildError {
    Fatal(anyhow::Error),
    Skip(Skip),
}

impl From<anyhow::Error> for BuildError {
    fn from(e: anyhow::Error) -> Self {
        BuildError::Fatal(e)
    }
}

/// Build the EROFS image bytes for `layers` (layer splitstreams, base first) in each of
/// `versions` (1 or 2). `Ok(Err(reason))` when composefs cannot represent the image.
pub(crate) fn build_images(
    repo: &Repository,
    layers: &[ObjectId],
    versions: &[u8],
) -> anyhow::Result<Result<Images, Skip>> {
    let r = match repo.algorithm() {
        HashAlg::Sha256 => build::<Sha256HashValue>(repo, layers, versions),
        HashAlg::Sha512 => build::<Sha512HashValue>(repo, layers, versions),
    };
    match r {
        Ok(images) => Ok(Ok(images)),
        Err(BuildError::Skip(reason)) => Ok(Err(reason)),
        Err(BuildError::Fatal(e)) => Err(e),
    }
}

fn build<H: FsVerityHashValue>(
    repo: &Repository,
    layers: &[ObjectId],
    versions: &[u8],
) -> Result<Images, BuildError> {
    let mut fs = FileSystem::<H>::new(Stat::uninitialized());
    for (n, layer) in layers.iter().enumerate() {
        let mut reader = SplitStreamReader::open(repo, layer, Some(LAYER_CONTENT_TYPE))?;
        while let Some(entry) = next_entry::<H>(&mut reader)
            .map_err(|e| prefix(e, &format!("layer {n} (stream {layer})")))?
        {
            let path = entry.path.clone();
            process_entry(&mut fs, entry)
                .map_err(|e| BuildError::Skip(format!("layer {n}: applying {path:?}: {e}")))?;
        }
    }
    fs.transform_for_oci(&OciTransformOptions::default())
        .map_err(|e| BuildError::Skip(format!("composefs's OCI transform failed: {e}")))?;
    let fs = ValidatedFileSystem::new(fs)
        .map_err(|e| BuildError::Skip(format!("composefs rejected the tree: {e:#}")))?;
    Ok(versions
        .iter()
        .map(|&v| {
            let version = match v {
                2 => FormatVersion::V2,
                _ => FormatVersion::V1,
            };
            (v, mkfs_erofs_versioned(&fs, version))
        })
        .collect())
}

fn prefix(e: BuildError, what: &str) -> BuildError {
    match e {
        BuildError::Fatal(e) => BuildError::Fatal(e.context(what.to_owned())),
        BuildError::Skip(s) => BuildError::Skip(format!("{what}: {s}")),
    }
}

/// What a tar entry puts into the tree.
enum Item<H: FsVerityHashValue> {
    Directory,
    Leaf(LeafContent<H>),
    /// Absolute path of the link target.
    Hardlink(OsString),
}

struct Entry<H: FsVerityHashValue> {
    path: PathBuf,
    stat: Stat,
    item: Item<H>,
}

/// `/` + the tar path without leading `/` and trailing `/`s; the root itself is the empty path.
fn absolute_path(tar_path: &[u8]) -> PathBuf {
    let p = tar_path.strip_prefix(b"/").unwrap_or(tar_path);
    let mut v = Vec::with_capacity(p.len() + 1);
    v.push(b'/');
    v.extend_from_slice(p);
    while v.len() > 1 && v.last() == Some(&b'/') {
        v.pop();
    }
    if v == b"/" {
        v.clear();
    }
    PathBuf::from(OsString::from_vec(v))
}

/// Nanoseconds of a PAX `mtime` ("<sec>.<frac>"): the first 9 fraction digits, scaled when
/// fewer; 0 when absent or unparsable.
fn pax_mtime_nsec(pax: &[u8]) -> u32 {
    for ext in tar_core::PaxExtensions::new(pax).flatten() {
        if ext.key_bytes() != b"mtime" {
            continue;
        }
        let Ok(value) = ext.value() else { return 0 };
        let Some((_, frac)) = value.split_once('.') else {
            return 0;
        };
        if frac.len() >= 9 {
            return frac.get(..9).and_then(|f| f.parse().ok()).unwrap_or(0);
        }
        return frac
            .parse::<u32>()
            .map_or(0, |v| v * 10u32.pow(9 - frac.len() as u32));
    }
    0
}

/// The next entry of a layer stream, or `None` at its end.
fn next_entry<H: FsVerityHashValue>(
    reader: &mut SplitStreamReader,
) -> Result<Option<Entry<H>>, BuildError> {
    let mut parser = Parser::with_defaults();
    let mut header = Vec::new();
    let mut block = [0u8; BLOCK];
    loop {
        if !reader.read_inline_exact(&mut block)? {
            return Ok(None);
        }
        header.extend_from_slice(&block);
        loop {
            let event = parser
                .parse(&header)
                .map_err(|e| BuildError::Skip(format!("tar: {e}")))?;
            match event {
                ParseEvent::NeedData { .. } => break,
                ParseEvent::GlobalExtensions { consumed, .. } => {
                    header.drain(..consumed);
                }
                ParseEvent::End { .. } => return Ok(None),
                ParseEvent::SparseEntry { .. } => {
                    return Err(BuildError::Skip(
                        "sparse tar entries are not supported".into(),
                    ));
                }
                ParseEvent::Entry { entry, .. } => {
                    let size = entry.size;
                    let padded = size.next_multiple_of(BLOCK as u64);
                    let path = absolute_path(&entry.path);
                    let skip = |what: String| BuildError::Skip(format!("{path:?}: {what}"));
                    let link_target = entry.link_target.as_deref().unwrap_or_default();
                    let item = match reader.read_body(size, padded)? {
                        Body::External(id) => match entry.entry_type {
                            EntryType::Regular | EntryType::Continuous => {
                                if size <= INLINE_CONTENT_MAX {
                                    return Err(skip(format!(
                                        "a {size}-byte file stored externally"
                                    )));
                                }
                                let h = H::from_hex(id.to_string()).map_err(|e| {
                                    BuildError::Fatal(anyhow::anyhow!("object id {id}: {e}"))
                                })?;
                                Item::Leaf(LeafContent::Regular(RegularFile::External(h, size)))
                            }
                            t => return Err(skip(format!("{t:?} entry with an external body"))),
                        },
                        Body::Inline(content) => match entry.entry_type {
                            EntryType::Directory => Item::Directory,
                            EntryType::Regular | EntryType::Continuous => {
                                if content.len() as u64 > INLINE_CONTENT_MAX {
                                    return Err(skip(format!(
                                        "a {}-byte file stored inline",
                                        content.len()
                                    )));
                                }
                                Item::Leaf(LeafContent::Regular(RegularFile::Inline(
                                    content.into_boxed_slice(),
                                )))
                            }
                            EntryType::Link => {
                                Item::Hardlink(absolute_path(link_target).into_os_string())
                            }
                            EntryType::Symlink => Item::Leaf(LeafContent::Symlink(Box::from(
                                OsStr::from_bytes(link_target),
                            ))),
                            EntryType::Block | EntryType::Char => {
                                let (Some(major), Some(minor)) = (entry.dev_major, entry.dev_minor)
                                else {
                                    return Err(skip("device entry without device numbers".into()));
                                };
                                let dev = rustix::fs::makedev(major, minor);
                                if entry.entry_type == EntryType::Block {
                                    Item::Leaf(LeafContent::BlockDevice(dev))
                                } else {
                                    Item::Leaf(LeafContent::CharacterDevice(dev))
                                }
                            }
                            EntryType::Fifo => Item::Leaf(LeafContent::Fifo),
                            t => return Err(skip(format!("unsupported entry type {t:?}"))),
                        },
                    };
                    let xattrs = entry
                        .xattrs
                        .iter()
                        .map(|(k, v)| (Box::from(OsStr::from_bytes(k)), Box::from(v.as_ref())))
                        .collect();
                    let stat = Stat {
                        st_uid: entry.uid as u32,
                        st_gid: entry.gid as u32,
                        st_mode: entry.mode,
                        st_mtim_sec: entry.mtime as i64,
                        st_mtim_nsec: entry.pax.map_or(0, pax_mtime_nsec),
                        xattrs,
                    };
                    return Ok(Some(Entry { path, stat, item }));
                }
            }
        }
    }
}

/// Apply one entry to the tree, with overlayfs whiteout semantics.
fn process_entry<H: FsVerityHashValue>(
    fs: &mut FileSystem<H>,
    entry: Entry<H>,
) -> anyhow::Result<()> {
    if entry.path.file_name().is_none() {
        anyhow::ensure!(
            matches!(entry.item, Item::Directory),
            "the root entry is not a directory"
        );
        fs.set_root_stat(entry.stat);
        return Ok(());
    }
    let inode = match entry.item {
        Item::Directory => Inode::Directory(Box::new(Directory::new(entry.stat))),
        Item::Leaf(content) => Inode::leaf(fs.push_leaf(entry.stat, content)),
        Item::Hardlink(target) => {
            let (dir, name) = fs.root.split(&target)?;
            Inode::leaf(dir.leaf_id(name)?)
        }
    };
    let (dir, name) = fs.root.split_mut(entry.path.as_os_str())?;
    match name.as_bytes().strip_prefix(b".wh.") {
        Some(b".wh..opq") => dir.clear(),
        Some(target) => dir.remove(OsStr::from_bytes(target)),
        None => dir.merge(name, inode),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_paths_become_absolute() {
        for (input, want) in [
            (&b"foo/bar"[..], "/foo/bar"),
            (b"/foo/bar", "/foo/bar"),
            (b"dir//", "/dir"),
            (b"./", "/."),
            (b"/", ""),
            (b"", ""),
        ] {
            assert_eq!(absolute_path(input), PathBuf::from(want), "{input:?}");
        }
    }

    #[test]
    fn pax_nanoseconds() {
        assert_eq!(
            pax_mtime_nsec(b"30 mtime=1234567890.123456789\n"),
            123_456_789
        );
        assert_eq!(pax_mtime_nsec(b"22 mtime=1234567890.5\n"), 500_000_000);
        assert_eq!(
            pax_mtime_nsec(b"31 mtime=1234567890.1234567899\n"),
            123_456_789
        );
        assert_eq!(pax_mtime_nsec(b"20 mtime=1234567890\n"), 0);
        assert_eq!(pax_mtime_nsec(b""), 0);
    }
}
