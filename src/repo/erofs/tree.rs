//! A compact in-memory image tree: one arena of directories and one of leaves, names and small
//! bodies in shared byte buffers, xattr sets deduplicated, object ids as fixed-width rows.
//!
//! It applies tar entries with the same semantics as composefs-rs 0.9.4's `FileSystem`
//! (whiteouts, opaque directories, directory-over-directory keeps the children, hardlinks
//! share the leaf) and its OCI transform. Anything whose outcome in composefs would be an
//! error is reported as [`Unsupported`] so the caller can let composefs itself produce the
//! exact reason.

use std::collections::HashMap;

/// Sentinel for "no such index" in `u32` index tables.
pub(super) const NONE: u32 = u32::MAX;

/// Top bit of an entry target: set for leaves, clear for directories.
const LEAF_BIT: u32 = 1 << 31;

/// Mode of a directory the tar does not describe (containers/storage's `MkdirAll(…, 0755)`).
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// The only xattr composefs 0.9.4's default OCI transform keeps (`CONTAINER_XATTR_ALLOWLIST`).
const KEPT_XATTR: &[u8] = b"security.capability";

/// The tree cannot be built the way composefs would: let composefs decide (and word the error).
#[derive(Debug)]
pub(crate) struct Unsupported(pub(crate) String);

/// Metadata of one inode (composefs's `Stat`, with xattrs as a set index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub nsec: u32,
    /// Index into [`Tree::xattr_sets`]; 0 is the empty set.
    pub xattrs: u32,
}

/// What a leaf holds. Offsets point into [`Tree::data`]; `obj` is a row of [`Tree::objects`].
#[derive(Clone, Copy, Debug)]
pub(super) enum Content {
    Inline { off: u32, len: u32 },
    External { obj: u32, size: u64 },
    Symlink { off: u32, len: u32 },
    Chr(u64),
    Blk(u64),
    Fifo,
}

#[derive(Debug)]
pub(super) struct Leaf {
    pub meta: Meta,
    pub content: Content,
}

/// A directory entry: name in [`Tree::names`], target a directory or (with [`LEAF_BIT`]) a leaf.
#[derive(Clone, Copy, Debug)]
pub(super) struct Entry {
    pub name_off: u32,
    pub name_len: u32,
    pub target: u32,
}

#[derive(Debug)]
pub(super) struct Dir {
    pub meta: Meta,
    /// Sorted by name bytes.
    pub entries: Vec<Entry>,
}

/// A resolved entry target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Dir(u32),
    Leaf(u32),
}

impl Entry {
    pub fn target(&self) -> Target {
        if self.target & LEAF_BIT != 0 {
            Target::Leaf(self.target & !LEAF_BIT)
        } else {
            Target::Dir(self.target)
        }
    }
}

/// What a tar entry adds, already in the tree's own terms.
pub(crate) enum Item<'a> {
    Directory,
    Inline(&'a [u8]),
    External(&'a [u8], u64),
    Symlink(&'a [u8]),
    Hardlink(&'a [u8]),
    Chr(u64),
    Blk(u64),
    Fifo,
}

/// One stored xattr (name, value).
pub(super) type OwnedXattr = (Box<[u8]>, Box<[u8]>);

/// A deduplicated set of xattrs, sorted by name.
pub(super) type XattrSet = Box<[OwnedXattr]>;

/// One xattr as the tar gave it.
pub(crate) type XattrPair<'a> = (&'a [u8], &'a [u8]);

/// The whole image tree.
pub(crate) struct Tree {
    pub(super) dirs: Vec<Dir>,
    pub(super) leaves: Vec<Leaf>,
    pub(super) names: Vec<u8>,
    pub(super) data: Vec<u8>,
    /// Object ids, `digest_len` bytes per row.
    pub(super) objects: Vec<u8>,
    pub(super) digest_len: usize,
    /// Distinct xattr sets (name, value) sorted by name; set 0 is empty.
    pub(super) xattr_sets: Vec<XattrSet>,
    xattr_index: HashMap<XattrSet, u32>,
    /// A layer had an entry for the root itself.
    root_set: bool,
}

impl Tree {
    /// An empty tree whose root has composefs's "uninitialized" metadata (all zero).
    pub(crate) fn new(digest_len: usize) -> Tree {
        let empty: XattrSet = Box::new([]);
        let mut xattr_index = HashMap::new();
        xattr_index.insert(empty.clone(), 0);
        Tree {
            dirs: vec![Dir {
                meta: Meta {
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                    nsec: 0,
                    xattrs: 0,
                },
                entries: Vec::new(),
            }],
            leaves: Vec::new(),
            names: Vec::new(),
            data: Vec::new(),
            objects: Vec::new(),
            digest_len,
            xattr_sets: vec![empty],
            xattr_index,
            root_set: false,
        }
    }

    pub(super) fn name(&self, e: &Entry) -> &[u8] {
        &self.names[e.name_off as usize..(e.name_off + e.name_len) as usize]
    }

    pub(super) fn object(&self, obj: u32) -> &[u8] {
        let start = obj as usize * self.digest_len;
        &self.objects[start..start + self.digest_len]
    }

    pub(super) fn bytes(&self, off: u32, len: u32) -> &[u8] {
        &self.data[off as usize..(off + len) as usize]
    }

    /// Intern the xattrs the OCI transform keeps (it drops all others from every inode, so
    /// dropping them on the way in is the same).
    pub(crate) fn intern_xattrs(&mut self, xattrs: &[XattrPair<'_>]) -> u32 {
        let mut kept: Vec<OwnedXattr> = xattrs
            .iter()
            .filter(|(k, _)| *k == KEPT_XATTR)
            .map(|(k, v)| (Box::from(*k), Box::from(*v)))
            .collect();
        if kept.is_empty() {
            return 0;
        }
        // Stable, so repeated names stay in tar order and the last one wins below.
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        // A map keeps the last value of a repeated name.
        kept.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                std::mem::swap(&mut later.1, &mut earlier.1);
                true
            } else {
                false
            }
        });
        let set = kept.into_boxed_slice();
        if let Some(&i) = self.xattr_index.get(&set) {
            return i;
        }
        let i = self.xattr_sets.len() as u32;
        self.xattr_sets.push(set.clone());
        self.xattr_index.insert(set, i);
        i
    }

    fn lookup(&self, dir: u32, name: &[u8]) -> Result<usize, usize> {
        let d = &self.dirs[dir as usize];
        d.entries.binary_search_by(|e| self.name(e).cmp(name))
    }

    /// Resolve `components` as directories from the root (composefs `get_directory_mut`).
    fn walk(&self, components: &[&[u8]]) -> Result<u32, Unsupported> {
        let mut dir = 0u32;
        for c in components {
            match self.lookup(dir, c) {
                Ok(i) => match self.dirs[dir as usize].entries[i].target() {
                    Target::Dir(d) => dir = d,
                    Target::Leaf(_) => {
                        return Err(Unsupported(format!(
                            "{:?} is not a directory",
                            String::from_utf8_lossy(c)
                        )));
                    }
                },
                Err(_) => {
                    return Err(Unsupported(format!(
                        "{:?} not found",
                        String::from_utf8_lossy(c)
                    )));
                }
            }
        }
        Ok(dir)
    }

    /// [`walk`](Self::walk), creating missing directories as containers/storage does when it
    /// applies a layer whose tar lacks an entry's parents (`MkdirAll`, mode 0755, owned by
    /// root; podman's get the time of the pull, ours the time of the entry that needed them,
    /// `mtime`/`nsec`, so that images stay reproducible). composefs-rs refuses such layers,
    /// so this changes no image it builds.
    fn walk_creating(
        &mut self,
        components: &[&[u8]],
        mtime: i64,
        nsec: u32,
    ) -> Result<u32, Unsupported> {
        let mut dir = 0u32;
        for c in components {
            dir = match self.lookup(dir, c) {
                Ok(i) => match self.dirs[dir as usize].entries[i].target() {
                    Target::Dir(d) => d,
                    Target::Leaf(_) => {
                        return Err(Unsupported(format!(
                            "{:?} is not a directory",
                            String::from_utf8_lossy(c)
                        )));
                    }
                },
                Err(_) => {
                    if self.dirs.len() >= (LEAF_BIT - 1) as usize {
                        return Err(Unsupported("too many inodes".into()));
                    }
                    let d = self.dirs.len() as u32;
                    self.dirs.push(Dir {
                        meta: Meta {
                            mode: IMPLICIT_DIR_MODE,
                            uid: 0,
                            gid: 0,
                            mtime,
                            nsec,
                            xattrs: 0,
                        },
                        entries: Vec::new(),
                    });
                    self.insert(dir, c, d);
                    d
                }
            };
        }
        Ok(dir)
    }

    fn insert(&mut self, dir: u32, name: &[u8], target: u32) {
        match self.lookup(dir, name) {
            Ok(i) => self.dirs[dir as usize].entries[i].target = target,
            Err(i) => {
                let name_off = self.names.len() as u32;
                self.names.extend_from_slice(name);
                self.dirs[dir as usize].entries.insert(
                    i,
                    Entry {
                        name_off,
                        name_len: name.len() as u32,
                        target,
                    },
                );
            }
        }
    }

    fn push_data(&mut self, bytes: &[u8]) -> Result<u32, Unsupported> {
        let off = u32::try_from(self.data.len())
            .ok()
            .filter(|o| o.checked_add(bytes.len() as u32).is_some())
            .ok_or_else(|| Unsupported("more than 4 GiB of inline data".into()))?;
        self.data.extend_from_slice(bytes);
        Ok(off)
    }

    /// Apply one tar entry at `path` (tar path bytes), with overlayfs whiteout semantics.
    pub(crate) fn apply(
        &mut self,
        path: &[u8],
        meta: Meta,
        item: Item<'_>,
    ) -> Result<(), Unsupported> {
        let parts = components(path)?;
        let Some((name, parent)) = parts.split_last() else {
            if !matches!(item, Item::Directory) {
                return Err(Unsupported("the root entry is not a directory".into()));
            }
            self.dirs[0].meta = meta;
            self.root_set = true;
            return Ok(());
        };
        if self.leaves.len() >= (LEAF_BIT - 1) as usize
            || self.dirs.len() >= (LEAF_BIT - 1) as usize
        {
            return Err(Unsupported("too many inodes".into()));
        }
        // Build the node first, as composefs does (a bad hardlink fails even under a whiteout
        // name).
        let node = match item {
            Item::Directory => None,
            Item::Hardlink(target) => {
                let tparts = components(target)?;
                let Some((tname, tparent)) = tparts.split_last() else {
                    return Err(Unsupported("hardlink to the root".into()));
                };
                let tdir = self.walk(tparent)?;
                match self.lookup(tdir, tname) {
                    Ok(i) => match self.dirs[tdir as usize].entries[i].target() {
                        Target::Leaf(l) => Some(l | LEAF_BIT),
                        Target::Dir(_) => {
                            return Err(Unsupported("hardlink to a directory".into()));
                        }
                    },
                    Err(_) => return Err(Unsupported("hardlink target not found".into())),
                }
            }
            other => {
                let content = match other {
                    Item::Inline(b) => {
                        let len = b.len() as u32;
                        Content::Inline {
                            off: self.push_data(b)?,
                            len,
                        }
                    }
                    Item::Symlink(b) => {
                        let len = b.len() as u32;
                        Content::Symlink {
                            off: self.push_data(b)?,
                            len,
                        }
                    }
                    Item::External(id, size) => {
                        if id.len() != self.digest_len {
                            return Err(Unsupported("object id of the wrong length".into()));
                        }
                        let obj = (self.objects.len() / self.digest_len) as u32;
                        self.objects.extend_from_slice(id);
                        Content::External { obj, size }
                    }
                    Item::Chr(d) => Content::Chr(d),
                    Item::Blk(d) => Content::Blk(d),
                    Item::Fifo => Content::Fifo,
                    Item::Directory | Item::Hardlink(_) => unreachable!("handled above"),
                };
                let l = self.leaves.len() as u32;
                self.leaves.push(Leaf { meta, content });
                Some(l | LEAF_BIT)
            }
        };
        let dir = self.walk_creating(parent, meta.mtime, meta.nsec)?;
        match name.strip_prefix(b".wh.") {
            Some(b".wh..opq") => self.dirs[dir as usize].entries.clear(),
            Some(victim) => {
                if let Ok(i) = self.lookup(dir, victim) {
                    self.dirs[dir as usize].entries.remove(i);
                }
            }
            None => match node {
                Some(target) => self.insert(dir, name, target),
                None => {
                    if let Ok(i) = self.lookup(dir, name)
                        && let Target::Dir(d) = self.dirs[dir as usize].entries[i].target()
                    {
                        self.dirs[d as usize].meta = meta;
                    } else {
                        let d = self.dirs.len() as u32;
                        self.dirs.push(Dir {
                            meta,
                            entries: Vec::new(),
                        });
                        self.insert(dir, name, d);
                    }
                }
            },
        }
        Ok(())
    }

    /// composefs's OCI transform: `/usr`'s metadata onto `/`, `/run` emptied with `/usr`'s
    /// mtime. (The xattr filter already happened in [`Tree::intern_xattrs`]; orphaned
    /// leaves are never reached by the writer.)
    ///
    /// composefs-rs fails without a `/usr` directory (a `FROM scratch` image of one static
    /// binary, say). Here `/` then keeps the metadata the layers gave it (their root entries,
    /// the last one winning), or, when none did, that of a directory containers/storage
    /// creates: mode 0755, owned by root, mtime 0; and a `/run` directory is emptied with
    /// that mtime. A `/run` that is not a directory stays as it is (composefs fails there too).
    pub(crate) fn transform_for_oci(&mut self) -> Result<(), Unsupported> {
        let usr = match self.lookup(0, b"usr") {
            Ok(i) => match self.dirs[0].entries[i].target() {
                Target::Dir(d) => Some(d),
                Target::Leaf(_) => None,
            },
            Err(_) => None,
        };
        let root_meta = match usr {
            Some(d) => self.dirs[d as usize].meta,
            None if self.root_set => self.dirs[0].meta,
            None => Meta {
                mode: IMPLICIT_DIR_MODE,
                uid: 0,
                gid: 0,
                mtime: 0,
                nsec: 0,
                xattrs: 0,
            },
        };
        self.dirs[0].meta = root_meta;
        if let Ok(i) = self.lookup(0, b"run")
            && let Target::Dir(d) = self.dirs[0].entries[i].target()
        {
            let run = &mut self.dirs[d as usize];
            run.meta.mtime = root_meta.mtime;
            run.meta.nsec = root_meta.nsec;
            run.entries = Vec::new();
        }
        Ok(())
    }

    /// composefs's `add_overlay_whiteouts`: `00`..`ff` character devices 0:0 at the root,
    /// where no entry of that name exists, with the root's owner and mtime and only its
    /// `security.selinux` xattr.
    pub(super) fn add_overlay_whiteouts(&mut self) {
        let root = self.dirs[0].meta;
        let selinux: Vec<OwnedXattr> = self.xattr_sets[root.xattrs as usize]
            .iter()
            .filter(|(k, _)| &**k == b"security.selinux")
            .cloned()
            .collect();
        let xattrs = if selinux.is_empty() {
            0
        } else {
            let set = selinux.into_boxed_slice();
            match self.xattr_index.get(&set) {
                Some(&i) => i,
                None => {
                    let i = self.xattr_sets.len() as u32;
                    self.xattr_sets.push(set.clone());
                    self.xattr_index.insert(set, i);
                    i
                }
            }
        };
        let meta = Meta {
            mode: 0o644,
            uid: root.uid,
            gid: root.gid,
            mtime: root.mtime,
            nsec: root.nsec,
            xattrs,
        };
        for i in 0..=255u8 {
            let name = format!("{i:02x}");
            if self.lookup(0, name.as_bytes()).is_ok() {
                continue;
            }
            let l = self.leaves.len() as u32;
            self.leaves.push(Leaf {
                meta,
                content: Content::Chr(0),
            });
            self.insert(0, name.as_bytes(), l | LEAF_BIT);
        }
    }
}

/// Path components as composefs's `Path` handling sees them: empty and `.` components
/// vanish; `..` is something composefs rejects or treats specially, so it is unsupported.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, Unsupported> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Unsupported("a path with a `..` component".into())),
            c => out.push(c),
        }
    }
    Ok(out)
}
