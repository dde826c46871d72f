//! The composefs EROFS image of an OCI image's root filesystem, as composefs-rs 0.9.4 builds
//! it for `cfsctl oci pull` (and recomputes for `cfsctl oci compute-id`), for every image
//! podman can mount.
//!
//! Steps, each mirroring composefs-rs so the image id is the same for every image it accepts:
//! 1. Read each layer splitstream back as tar entries ([`entries`]): metadata as Go's
//!    `archive/tar` gives it to containers/storage, which equals what composefs's `tar-core`
//!    gives wherever `tar-core` accepts the entry (PAX/GNU names, ids, mtime with PAX
//!    nanoseconds, `SCHILY.xattr.*`), and also takes times before 1970.
//! 2. Apply the layers in order to a compact copy of composefs's tree ([`tree`]): `.wh.<name>`
//!    deletes, `.wh..wh..opq` clears the directory, a directory over a directory only updates
//!    its metadata, anything else replaces; hardlinks share the leaf; missing parent
//!    directories are made as containers/storage makes them.
//! 3. composefs's OCI transform: `/usr`'s metadata onto `/`, `/run` emptied, xattrs other
//!    than `security.capability` dropped; without `/usr`, `/` keeps its own metadata
//!    ([`tree::Tree::transform_for_oci`] says which).
//! 4. Our EROFS V1 writer ([`writer`]), byte for byte composefs's; repositories that ask for
//!    format V2 go through composefs-rs's own tree and writer (which keep its limits).
//!
//! The tree is held in memory (one node per file, plus inline bodies of ≤ 64 bytes). What
//! still cannot be represented (a file name longer than an EROFS block, more than 4 GiB of
//! inline data, an entry type containers/storage refuses too) is an error: the caller must
//! not publish the image.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use composefs::erofs::format::FormatVersion;
use composefs::erofs::writer::{ValidatedFileSystem, mkfs_erofs_versioned};
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue, Sha512HashValue};
use composefs::generic_tree::OciTransformOptions;
use composefs::tree::{Directory, FileSystem, Inode, LeafContent, RegularFile, Stat};

use super::oci::LAYER_CONTENT_TYPE;
use super::splitstream::SplitStreamReader;
use super::{HashAlg, ObjectId, Repository};

mod entries;
mod tree;
mod writer;

use entries::{RawItem, next_raw};

use tree::{Item as TreeItem, Meta, Tree};

/// Why an image could not be built, in words for the user.
type Skip = String;

/// Built images: (EROFS format version, image), in the order asked for.
pub(crate) type Images = Vec<(u8, Image)>;

/// One built image: bytes still to be stored, or already stored as an object (the compact
/// writer streams its image straight into the repository).
pub(crate) enum Image {
    /// The image bytes (composefs's writer returns them whole).
    Bytes(Box<[u8]>),
    /// Already an object of the repository.
    Stored(ObjectId),
}

/// An error while building: `Fatal` for our own I/O or a corrupt repository, `Skip` for
/// content that cannot be represented (the image gets no composefs image).
#[derive(Debug)]
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
/// `versions` (1 or 2). `Ok(Err(reason))` when the image cannot be represented.
pub(crate) fn build_images(
    repo: &Repository,
    layers: &[ObjectId],
    versions: &[u8],
) -> anyhow::Result<Result<Images, Skip>> {
    let r = if versions.iter().all(|&v| v == 1) {
        match build_compact(repo, layers) {
            Ok(Ok(id)) => Ok(versions
                .iter()
                .map(|&v| (v, Image::Stored(id.clone())))
                .collect()),
            // The compact tree takes every image podman can mount; what it cannot represent
            // (a name longer than a block, …) composefs cannot either.
            Ok(Err(tree::Unsupported(reason))) => Err(BuildError::Skip(reason)),
            Err(e) => Err(e),
        }
    } else {
        build_composefs(repo, layers, versions)
    };
    match r {
        Ok(images) => Ok(Ok(images)),
        Err(BuildError::Skip(reason)) => Ok(Err(reason)),
        Err(BuildError::Fatal(e)) => Err(e),
    }
}

/// composefs-rs's own tree and writer: the reference, used for what the compact path
/// does not handle (format V2, paths composefs rejects, ...).
fn build_composefs(
    repo: &Repository,
    layers: &[ObjectId],
    versions: &[u8],
) -> Result<Images, BuildError> {
    match repo.algorithm() {
        HashAlg::Sha256 => build::<Sha256HashValue>(repo, layers, versions),
        HashAlg::Sha512 => build::<Sha512HashValue>(repo, layers, versions),
    }
}

/// The compact tree and our own V1 writer. `Ok(Err(_))` when composefs should decide.
fn build_compact(
    repo: &Repository,
    layers: &[ObjectId],
) -> Result<Result<ObjectId, tree::Unsupported>, BuildError> {
    let alg = repo.algorithm();
    let mut tree = Tree::new(alg.digest_len());
    for (n, layer) in layers.iter().enumerate() {
        let mut reader = SplitStreamReader::open(repo, layer, Some(LAYER_CONTENT_TYPE))?;
        while let Some(raw) = next_raw(repo, &mut reader)
            .map_err(|e| prefix(e, &format!("layer {n} (stream {layer})")))?
        {
            let xattrs: Vec<tree::XattrPair<'_>> =
                raw.xattrs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            let meta = Meta {
                mode: raw.mode,
                uid: raw.uid,
                gid: raw.gid,
                mtime: raw.mtime,
                nsec: raw.nsec,
                xattrs: tree.intern_xattrs(&xattrs),
            };
            let item = match &raw.item {
                RawItem::Directory => TreeItem::Directory,
                RawItem::Inline(b) => TreeItem::Inline(b),
                RawItem::External(id, size) => TreeItem::External(id.as_bytes(), *size),
                RawItem::Symlink(t) => TreeItem::Symlink(t),
                RawItem::Hardlink(t) => TreeItem::Hardlink(t),
                RawItem::Chr(d) => TreeItem::Chr(*d),
                RawItem::Blk(d) => TreeItem::Blk(*d),
                RawItem::Fifo => TreeItem::Fifo,
            };
            if let Err(u) = tree.apply(&raw.path, meta, item) {
                return Ok(Err(u));
            }
        }
    }
    if let Err(u) = tree.transform_for_oci() {
        return Ok(Err(u));
    }
    let prepared = match writer::prepare_v1(&mut tree, alg.kernel_id()) {
        Ok(p) => p,
        Err(u) => return Ok(Err(u)),
    };
    let id = repo
        .store_streamed(|sink| prepared.write_to(sink))
        .map_err(|e| BuildError::Fatal(e.context("storing the EROFS image")))?;
    Ok(Ok(id))
}

fn build<H: FsVerityHashValue>(
    repo: &Repository,
    layers: &[ObjectId],
    versions: &[u8],
) -> Result<Images, BuildError> {
    let mut fs = FileSystem::<H>::new(Stat::uninitialized());
    for (n, layer) in layers.iter().enumerate() {
        let mut reader = SplitStreamReader::open(repo, layer, Some(LAYER_CONTENT_TYPE))?;
        while let Some(entry) = next_entry::<H>(repo, &mut reader)
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
            (v, Image::Bytes(mkfs_erofs_versioned(&fs, version)))
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

/// The next entry of a layer stream for composefs's tree, or `None` at its end.
fn next_entry<H: FsVerityHashValue>(
    repo: &Repository,
    reader: &mut SplitStreamReader,
) -> Result<Option<Entry<H>>, BuildError> {
    let Some(raw) = next_raw(repo, reader)? else {
        return Ok(None);
    };
    let item = match raw.item {
        RawItem::Directory => Item::Directory,
        RawItem::Inline(b) => Item::Leaf(LeafContent::Regular(RegularFile::Inline(
            b.into_boxed_slice(),
        ))),
        RawItem::External(id, size) => {
            let h = H::from_hex(id.to_string())
                .map_err(|e| BuildError::Fatal(anyhow::anyhow!("object id {id}: {e}")))?;
            Item::Leaf(LeafContent::Regular(RegularFile::External(h, size)))
        }
        RawItem::Hardlink(t) => Item::Hardlink(absolute_path(&t).into_os_string()),
        RawItem::Symlink(t) => Item::Leaf(LeafContent::Symlink(Box::from(OsStr::from_bytes(&t)))),
        RawItem::Chr(d) => Item::Leaf(LeafContent::CharacterDevice(d)),
        RawItem::Blk(d) => Item::Leaf(LeafContent::BlockDevice(d)),
        RawItem::Fifo => Item::Leaf(LeafContent::Fifo),
    };
    let xattrs = raw
        .xattrs
        .into_iter()
        .map(|(k, v)| (Box::from(OsStr::from_bytes(&k)), v.into_boxed_slice()))
        .collect();
    let stat = Stat {
        st_uid: raw.uid,
        st_gid: raw.gid,
        st_mode: raw.mode,
        st_mtim_sec: raw.mtime,
        st_mtim_nsec: raw.nsec,
        xattrs,
    };
    Ok(Some(Entry {
        path: absolute_path(&raw.path),
        stat,
        item,
    }))
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

    /// A PAX tar entry: (path, type flag, mode, uid, mtime "sec[.frac]", link, body, xattrs,
    /// device numbers).
    struct T<'a> {
        path: &'a str,
        kind: u8,
        mode: u32,
        uid: u64,
        mtime: &'a str,
        link: &'a str,
        body: &'a [u8],
        xattrs: &'a [(&'a str, &'a [u8])],
        dev: (u32, u32),
    }

    fn t<'a>(path: &'a str, kind: u8) -> T<'a> {
        T {
            path,
            kind,
            mode: 0o755,
            uid: 0,
            mtime: "1700000000",
            link: "",
            body: b"",
            xattrs: &[],
            dev: (0, 0),
        }
    }

    fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
        let base = key.len() + value.len() + 3;
        let mut len = base + 1;
        while len != base + len.to_string().len() {
            len = base + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        name: &[u8],
        kind: u8,
        mode: u32,
        uid: u64,
        size: u64,
        mtime: u64,
        link: &[u8],
        dev: (u32, u32),
    ) -> [u8; 512] {
        let mut h = [0u8; 512];
        let n = name.len().min(99);
        h[..n].copy_from_slice(&name[..n]);
        let oct = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
            let s = format!("{:0w$o}", v, w = len - 1);
            h[at..at + len - 1].copy_from_slice(&s.as_bytes()[s.len() - (len - 1)..]);
        };
        oct(&mut h, 100, 8, u64::from(mode));
        oct(&mut h, 108, 8, uid.min(0o7777777));
        oct(&mut h, 116, 8, 0);
        oct(&mut h, 124, 12, size);
        oct(&mut h, 136, 12, mtime);
        h[156] = kind;
        let l = link.len().min(99);
        h[157..157 + l].copy_from_slice(&link[..l]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        oct(&mut h, 329, 8, u64::from(dev.0));
        oct(&mut h, 337, 8, u64::from(dev.1));
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }

    fn tar(entries: &[T<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            let mut pax = Vec::new();
            pax_record(&mut pax, "path", e.path.as_bytes());
            if !e.link.is_empty() {
                pax_record(&mut pax, "linkpath", e.link.as_bytes());
            }
            pax_record(&mut pax, "uid", e.uid.to_string().as_bytes());
            pax_record(&mut pax, "mtime", e.mtime.as_bytes());
            for (k, v) in e.xattrs {
                pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
            }
            out.extend_from_slice(&header(
                b"pax",
                b'x',
                0o644,
                0,
                pax.len() as u64,
                0,
                b"",
                (0, 0),
            ));
            out.extend_from_slice(&pax);
            out.resize(out.len().next_multiple_of(512), 0);
            let sec: u64 = e.mtime.split('.').next().unwrap().parse().unwrap();
            out.extend_from_slice(&header(
                e.path.as_bytes(),
                e.kind,
                e.mode,
                e.uid,
                e.body.len() as u64,
                sec,
                e.link.as_bytes(),
                e.dev,
            ));
            out.extend_from_slice(e.body);
            out.resize(out.len().next_multiple_of(512), 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn import(repo: &Repository, tar: &[u8]) -> ObjectId {
        use sha2::Digest;
        let mut imp = super::super::LayerImporter::new(repo).unwrap();
        imp.inline(tar).unwrap();
        imp.finish(&format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(tar))
        ))
        .unwrap()
    }

    #[test]
    fn compact_writer_matches_composefs_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(
            &tmp.path().join("repo"),
            &crate::repo::RepoOptions {
                insecure: true,
                ..Default::default()
            },
        )
        .unwrap();
        let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let other: Vec<u8> = vec![7u8; 70_000];
        let cap: &[u8] =
            b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
        let long_name = format!("usr/{}", "n".repeat(200));
        let long_target = "t".repeat(4090);
        let many: Vec<String> = (0..400)
            .map(|i| format!("big/entry-with-a-longish-name-{i:05}"))
            .collect();
        let x_tool: [(&str, &[u8]); 2] = [("security.capability", cap), ("user.foo", b"bar")];
        let x_etc: [(&str, &[u8]); 2] = [("user.dir", b"1"), ("security.capability", cap)];
        let x_kept: [(&str, &[u8]); 1] = [("security.capability", cap)];
        let mut l1 = vec![
            t("./", b'5'),
            t("usr/", b'5'),
            T {
                mtime: "1600000000.25",
                ..t("usr/bin/", b'5')
            },
            T {
                body: &big,
                xattrs: &x_tool,
                ..t("usr/bin/tool", b'0')
            },
            T {
                link: "usr/bin/tool",
                ..t("usr/bin/tool2", b'1')
            },
            T {
                body: &big,
                mode: 0o4755,
                ..t("usr/bin/copy", b'0')
            },
            T {
                body: &other,
                uid: 100_000,
                mtime: "1700000001.123456789",
                ..t("usr/bin/large-uid", b'0')
            },
            T {
                link: "tool",
                ..t("usr/bin/sym", b'2')
            },
            T {
                link: &long_target,
                ..t("usr/bin/longsym", b'2')
            },
            T {
                body: b"tiny\n",
                mode: 0o644,
                ..t(&long_name, b'0')
            },
            T {
                mode: 0o644,
                ..t("usr/empty", b'0')
            },
            t("dev/", b'5'),
            T {
                dev: (1, 3),
                ..t("dev/null", b'3')
            },
            T {
                dev: (8, 1),
                ..t("dev/sda1", b'4')
            },
            T {
                dev: (0, 0),
                ..t("dev/wh", b'3')
            },
            t("dev/fifo", b'6'),
            t("a/", b'5'),
            t("a/deep/", b'5'),
            T {
                body: b"shared by a hardlink",
                ..t("a/deep/x", b'0')
            },
            t("b/", b'5'),
            T {
                link: "a/deep/x",
                ..t("b/y", b'1')
            },
            T {
                xattrs: &x_etc,
                ..t("etc/", b'5')
            },
            T {
                body: b"deleted by layer 2\n",
                ..t("etc/gone", b'0')
            },
            T {
                body: b"kept\n",
                xattrs: &x_kept,
                ..t("etc/kept", b'0')
            },
            t("opt/", b'5'),
            T {
                body: b"hidden by opaque\n",
                ..t("opt/old", b'0')
            },
            t("run/", b'5'),
            T {
                body: b"cleared\n",
                ..t("run/x", b'0')
            },
            t("big/", b'5'),
        ];
        for name in &many {
            l1.push(T {
                body: b"m",
                ..t(name, b'0')
            });
        }
        let l2 = vec![
            T {
                mtime: "1800000000",
                mode: 0o700,
                ..t("usr/", b'5')
            },
            T {
                mode: 0o644,
                ..t("etc/.wh.gone", b'0')
            },
            T {
                mode: 0o644,
                ..t("opt/.wh..wh..opq", b'0')
            },
            T {
                body: b"new\n",
                ..t("opt/new", b'0')
            },
            T {
                body: &big,
                ..t("opt/again", b'0')
            },
        ];
        let layers = [import(&repo, &tar(&l1)), import(&repo, &tar(&l2))];
        let ours = match build_compact(&repo, &layers) {
            Ok(Ok(id)) => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut repo.open_object(&id).unwrap(), &mut bytes)
                    .unwrap();
                bytes
            }
            Ok(Err(u)) => panic!("compact writer declined: {}", u.0),
            Err(_) => panic!("compact build failed"),
        };
        let theirs = match build_composefs(&repo, &layers, &[1]) {
            Ok(mut images) => match images.remove(0).1 {
                Image::Bytes(b) => b,
                Image::Stored(_) => panic!("composefs's writer returns bytes"),
            },
            Err(BuildError::Skip(s)) => panic!("composefs skipped: {s}"),
            Err(BuildError::Fatal(e)) => panic!("{e:#}"),
        };
        assert_eq!(ours.len(), theirs.len());
        if let Some(at) = ours.iter().zip(theirs.iter()).position(|(a, b)| a != b) {
            panic!("images differ first at byte {at} of {}", ours.len());
        }
    }

    #[test]
    fn xxh32_known_values() {
        assert_eq!(writer::xxh32(b"", 0), 0x02CC_5D05);
        assert_eq!(writer::xxh32(b"a", 0), 0x550D_7456);
        assert_eq!(writer::xxh32(b"abc", 0), 0x32D1_53FF);
        assert_eq!(
            writer::xxh32(b"Nobody inspects the spammish repetition", 0),
            0xE229_3B2F
        );
    }

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
}
