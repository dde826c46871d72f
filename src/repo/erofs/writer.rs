//! EROFS format V1 ("composefs_version 1", C mkcomposefs `--min-version=1` layout) from a
//! [`Tree`], byte-identical to composefs-rs 0.9.4's `mkfs_erofs_versioned(.., V1)`.
//!
//! Layout facts (all from composefs-rs 0.9.4 / C mkcomposefs): a 32-byte composefs header
//! padded to 1024 bytes, the 128-byte superblock, inodes in breadth-first order (compact
//! 32-byte headers when mtime equals the image's minimum and ids/nlink/size fit, extended
//! 64-byte ones otherwise), the shared xattr table in descending full-key order, then one
//! 4 KiB-aligned data region per inode in inode order. Hardlinks get one inode, at the first
//! occurrence in depth-first sorted order. Character devices 0:0 (whiteouts) are escaped to
//! regular files with overlay xattrs, except the 256 `00`..`ff` stubs at the root.
//!
//! Two passes over the same inode list: the first only measures and records offsets, the
//! second writes with every nid, block address and xattr reference known.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io;

use super::tree::{Content, Meta, NONE, Target, Tree, Unsupported};

/// EROFS block size: directory blocks, data blocks and the image length are multiples.
const BLOCK: u64 = 4096;
/// Inodes sit on 32-byte slots; a nid is an offset in slots.
const SLOT: u64 = 32;
/// Size of a compact inode header.
const COMPACT_HEADER: u64 = 32;
/// Size of an extended inode header.
const EXTENDED_HEADER: u64 = 64;
/// Size of the per-inode xattr header (`name_filter`, `shared_count`, reserved).
const XATTR_HEADER: u64 = 12;
/// Size of a directory entry header (`nid`, `nameoff`, `file_type`, reserved).
const DIRENT: u64 = 12;
/// Directory tails longer than this go to a block of their own (C mkcomposefs).
const MAX_DIR_TAIL: u64 = 2048;
/// The composefs header occupies the first 1024 bytes, before the EROFS superblock.
const SUPERBLOCK_OFFSET: u64 = 1024;
/// composefs header magic.
const COMPOSEFS_MAGIC: u32 = 0xd078_629a;
/// composefs header: EROFS format version field.
const COMPOSEFS_HEADER_VERSION: u32 = 1;
/// composefs header: the `composefs_version` of format V1.
const COMPOSEFS_VERSION_V1: u32 = 1;
/// composefs header flag: some inode has a POSIX ACL.
const COMPOSEFS_FLAGS_HAS_ACL: u32 = 1;
/// EROFS superblock magic.
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// `feature_compat`: MTIME | XATTR_FILTER.
const FEATURE_COMPAT: u32 = 0x2 | 0x4;
/// log2 of [`BLOCK`].
const BLOCK_BITS: u32 = 12;
/// Seed of the per-inode xattr bloom filter hash.
const XATTR_FILTER_SEED: u32 = 0x25BB_E08F;
/// Data-layout values of the inode `format` field.
const FLAT_PLAIN: u16 = 0;
const FLAT_INLINE: u16 = 4;
const CHUNK_BASED: u16 = 8;
/// Chunk indexes stored out of line for a promoted chunk-based inode (one block of "holes").
const NONINLINE_CHUNKS: usize = 1024;
/// Largest chunk-size exponent above the block size that the format can express.
const CHUNK_BLKBITS_MASK: u32 = 0x1f;

/// EROFS xattr name prefixes by index; index 5 (`lustre.`) is not used by V1.
const XATTR_PREFIXES: [&[u8]; 7] = [
    b"",
    b"user.",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
    b"trusted.",
    b"lustre.",
    b"security.",
];
/// Prefix index of `trusted.` (metacopy/redirect live under it).
const TRUSTED: u8 = 4;
/// Prefix indexes of POSIX ACLs (they set [`COMPOSEFS_FLAGS_HAS_ACL`]).
const ACL_ACCESS: u8 = 2;
const ACL_DEFAULT: u8 = 3;

/// EROFS directory-entry file types.
const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_CHR: u8 = 3;
const FT_BLK: u8 = 4;
const FT_FIFO: u8 = 5;
const FT_LNK: u8 = 7;

/// Inode flags: an escaped whiteout; a directory that holds one; the root.
const F_ESCAPED: u8 = 1;
const F_HAS_WHITEOUT: u8 = 2;

/// Marker xattrs composefs adds (escaped names, as it writes them).
const X_WHITEOUT: &[u8] = b"trusted.overlay.overlay.whiteout";
const X_USER_WHITEOUT: &[u8] = b"user.overlay.whiteout";
const X_WHITEOUTS: &[u8] = b"trusted.overlay.overlay.whiteouts";
const X_USER_WHITEOUTS: &[u8] = b"user.overlay.whiteouts";
const X_OPAQUE: &[u8] = b"trusted.overlay.overlay.opaque";
const X_USER_OPAQUE: &[u8] = b"user.overlay.opaque";
const X_ROOT_OPAQUE: &[u8] = b"trusted.overlay.opaque";
const X_OVERLAY_PREFIX: &[u8] = b"trusted.overlay.";
const X_OVERLAY_ESCAPED: &[u8] = b"trusted.overlay.overlay.";
const METACOPY_SUFFIX: &[u8] = b"overlay.metacopy";
const REDIRECT_SUFFIX: &[u8] = b"overlay.redirect";

/// One xattr of an inode: a stored one, or the metacopy/redirect pair of an object (rows
/// of the canonical object).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum XRef {
    Plain(u32),
    Meta(u32),
    Redir(u32),
}

/// Identity of a stored xattr: (prefix index, suffix, value).
type PlainKey = (u8, Box<[u8]>, Box<[u8]>);

struct Plain {
    prefix: u8,
    suffix: Box<[u8]>,
    value: Box<[u8]>,
}

/// Per-directory layout: how many full blocks, bytes of inline tail, nlink.
#[derive(Clone, Copy, Default)]
struct DirLayout {
    blocks: u32,
    tail: u32,
    nlink: u32,
}

/// Per-leaf-inode layout (composefs's `n_data_blocks` / `inline_tail_size`).
#[derive(Clone, Copy)]
struct LeafLayout {
    blocks: u32,
    tail: u64,
}

struct Writer<'t> {
    tree: &'t Tree,
    kernel_id: u8,
    /// Inodes in order: directory index, or leaf index | LEAF.
    inodes: Vec<u32>,
    flags: Vec<u8>,
    dir_inode: Vec<u32>,
    dir_parent_inode: Vec<u32>,
    leaf_inode: Vec<u32>,
    nlink: Vec<u32>,
    dir_layout: Vec<DirLayout>,
    plains: Vec<Plain>,
    /// Plain xattr ids for each tree xattr set (escaping applied).
    set_plains: Vec<Vec<u32>>,
    marks: [u32; 7],
    /// Object row → row of the first object with the same id.
    canon: Vec<u32>,
    /// Shared-table index of each plain xattr / object pair, or NONE.
    plain_shared: Vec<u32>,
    meta_shared: Vec<u32>,
    redir_shared: Vec<u32>,
    /// Shared xattrs in on-disk order.
    shared: Vec<XRef>,
    min_mtime: (u64, u32),
    header_flags: u32,
}

/// High bit of an inode table row: a leaf.
const LEAF: u32 = 1 << 31;

/// Offsets recorded by the measuring pass.
#[derive(Default)]
struct Layout {
    inodes: Vec<u64>,
    inodes_end: u64,
    xattrs: Vec<u64>,
    blocks: Vec<u64>,
    end: u64,
}

/// Where a pass writes: nowhere (measuring) or a sink (a buffer, or an object being stored).
/// The first sink error is kept and later writes are dropped, so the layout code stays
/// infallible; [`Prepared::write_to`] reports it.
struct Out<'s> {
    pos: u64,
    sink: Option<&'s mut Sink<'s>>,
    err: Option<io::Error>,
}

/// Receives an image's bytes in order.
type Sink<'s> = dyn FnMut(&[u8]) -> io::Result<()> + 's;

/// Zeros for padding, written in pieces of this size.
static ZEROS: [u8; 4096] = [0; 4096];

impl Out<'_> {
    fn write(&mut self, b: &[u8]) {
        self.pos += b.len() as u64;
        if let (Some(sink), None) = (&mut self.sink, &self.err)
            && let Err(e) = sink(b)
        {
            self.err = Some(e);
        }
    }
    fn zeros(&mut self, mut n: u64) {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..k]);
            n -= k as u64;
        }
    }
    fn pad(&mut self, to: u64) {
        let n = self.pos.next_multiple_of(to) - self.pos;
        self.zeros(n);
    }
}

/// Bytes from `pos` to the next block boundary, `None` when aligned.
fn to_boundary(pos: u64) -> Option<u64> {
    match pos % BLOCK {
        0 => None,
        r => Some(BLOCK - r),
    }
}

/// `ilog2(size - 1) + 1` clamped to [BLOCK_BITS, BLOCK_BITS + 31] (C mkcomposefs).
fn chunk_bits(size: u64) -> u32 {
    let bits = if size > 1 {
        64 - (size - 1).leading_zeros()
    } else {
        1
    };
    bits.clamp(BLOCK_BITS, BLOCK_BITS + CHUNK_BLKBITS_MASK)
}

fn chunk_count(size: u64) -> u64 {
    size.div_ceil(1u64 << chunk_bits(size))
}

/// xxHash32 (the EROFS xattr name filter hash).
pub(super) fn xxh32(input: &[u8], seed: u32) -> u32 {
    const P1: u32 = 0x9E37_79B1;
    const P2: u32 = 0x85EB_CA77;
    const P3: u32 = 0xC2B2_AE3D;
    const P4: u32 = 0x27D4_EB2F;
    const P5: u32 = 0x1656_67B1;
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let round = |acc: u32, w: u32| {
        acc.wrapping_add(w.wrapping_mul(P2))
            .rotate_left(13)
            .wrapping_mul(P1)
    };
    let mut rest = input;
    let mut h = if input.len() >= 16 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while rest.len() >= 16 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = round(*lane, word(&rest[i * 4..]));
            }
            rest = &rest[16..];
        }
        v[0].rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18))
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(input.len() as u32);
    while rest.len() >= 4 {
        h = h
            .wrapping_add(word(rest).wrapping_mul(P3))
            .rotate_left(17)
            .wrapping_mul(P4);
        rest = &rest[4..];
    }
    for &b in rest {
        h = h
            .wrapping_add(u32::from(b).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= h >> 15;
    h = h.wrapping_mul(P2);
    h ^= h >> 13;
    h = h.wrapping_mul(P3);
    h ^ (h >> 16)
}

/// Split a full xattr name into (prefix index, suffix) the way V1 does (longest listed
/// prefix wins by scanning from the end, `lustre.` skipped).
fn split_name(name: &[u8]) -> (u8, &[u8]) {
    for idx in (0..XATTR_PREFIXES.len()).rev() {
        if idx == 5 {
            continue;
        }
        if let Some(s) = name.strip_prefix(XATTR_PREFIXES[idx]) {
            return (idx as u8, s);
        }
    }
    unreachable!("the empty prefix matches everything")
}

/// Build the V1 image of `tree` (after the OCI transform). Adds the whiteout stubs to it.
/// An image laid out and ready to be written: everything composefs could refuse has been
/// checked, so writing can only fail in the sink.
pub(crate) struct Prepared<'t> {
    writer: Writer<'t>,
    layout: Layout,
}

/// Lay out the V1 image of `tree` (measuring pass) without producing its bytes.
pub(crate) fn prepare_v1(tree: &mut Tree, kernel_id: u8) -> Result<Prepared<'_>, Unsupported> {
    tree.add_overlay_whiteouts();
    let mut w = Writer::new(tree, kernel_id)?;
    w.collect()?;
    w.share_xattrs();
    let mut measure = Out {
        pos: 0,
        sink: None,
        err: None,
    };
    let mut layout = Layout::default();
    w.write(&mut measure, &mut layout, true);
    Ok(Prepared { writer: w, layout })
}

impl Prepared<'_> {
    /// Write the image front to back into `sink`; returns its size.
    pub(crate) fn write_to(
        mut self,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<u64> {
        let mut out = Out {
            pos: 0,
            sink: Some(sink),
            err: None,
        };
        self.writer.write(&mut out, &mut self.layout, false);
        debug_assert_eq!(out.pos, self.layout.end);
        match out.err {
            Some(e) => Err(e),
            None => Ok(out.pos),
        }
    }
}

impl<'t> Writer<'t> {
    fn new(tree: &'t Tree, kernel_id: u8) -> Result<Self, Unsupported> {
        let mut plains = Vec::new();
        let mut index: HashMap<PlainKey, u32> = HashMap::new();
        let mut intern = |name: &[u8], value: &[u8]| -> u32 {
            let (prefix, suffix) = split_name(name);
            let key = (prefix, Box::<[u8]>::from(suffix), Box::<[u8]>::from(value));
            *index.entry(key).or_insert_with(|| {
                plains.push(Plain {
                    prefix,
                    suffix: Box::from(suffix),
                    value: Box::from(value),
                });
                (plains.len() - 1) as u32
            })
        };
        let set_plains: Vec<Vec<u32>> = tree
            .xattr_sets
            .iter()
            .map(|set| {
                set.iter()
                    .map(|(k, v)| match k.strip_prefix(X_OVERLAY_PREFIX) {
                        Some(rest) => intern(&[X_OVERLAY_ESCAPED, rest].concat(), v),
                        None => intern(k, v),
                    })
                    .collect()
            })
            .collect();
        let marks = [
            intern(X_WHITEOUT, b""),
            intern(X_USER_WHITEOUT, b""),
            intern(X_WHITEOUTS, b""),
            intern(X_USER_WHITEOUTS, b""),
            intern(X_OPAQUE, b"x"),
            intern(X_USER_OPAQUE, b"x"),
            intern(X_ROOT_OPAQUE, b"y"),
        ];
        // Identical object ids give identical metacopy/redirect xattrs: map each row to the
        // first row with the same id.
        let rows = tree.objects.len() / tree.digest_len.max(1);
        let mut order: Vec<u32> = (0..rows as u32).collect();
        order.sort_by(|&a, &b| tree.object(a).cmp(tree.object(b)).then(a.cmp(&b)));
        let mut canon = vec![0u32; rows];
        let mut first = NONE;
        for (i, &r) in order.iter().enumerate() {
            if i == 0 || tree.object(order[i - 1]) != tree.object(r) {
                first = r;
            }
            canon[r as usize] = first;
        }
        drop(order);
        Ok(Writer {
            tree,
            kernel_id,
            inodes: Vec::new(),
            flags: Vec::new(),
            dir_inode: vec![NONE; tree.dirs.len()],
            dir_parent_inode: vec![NONE; tree.dirs.len()],
            leaf_inode: vec![NONE; tree.leaves.len()],
            nlink: vec![0; tree.leaves.len()],
            dir_layout: vec![DirLayout::default(); tree.dirs.len()],
            plain_shared: vec![NONE; plains.len()],
            plains,
            set_plains,
            marks,
            meta_shared: vec![NONE; rows],
            redir_shared: vec![NONE; rows],
            canon,
            shared: Vec::new(),
            min_mtime: (0, 0),
            header_flags: 0,
        })
    }

    fn meta_of(&self, inode: u32) -> &Meta {
        let row = self.inodes[inode as usize];
        if row & LEAF != 0 {
            &self.tree.leaves[(row & !LEAF) as usize].meta
        } else {
            &self.tree.dirs[row as usize].meta
        }
    }

    fn push(&mut self, row: u32) -> u32 {
        self.inodes.push(row);
        self.flags.push(0);
        (self.inodes.len() - 1) as u32
    }

    /// Link counts, canonical hardlink directories (depth-first), then inodes breadth-first.
    fn collect(&mut self) -> Result<(), Unsupported> {
        let tree = self.tree;
        // Depth-first, sorted: link counts and the directory of each leaf's first occurrence.
        let mut first_dir = vec![NONE; tree.leaves.len()];
        let mut stack: Vec<(u32, usize)> = vec![(0, 0)];
        while let Some((d, i)) = stack.last_mut() {
            let dir = &tree.dirs[*d as usize];
            let Some(e) = dir.entries.get(*i) else {
                stack.pop();
                continue;
            };
            *i += 1;
            let d = *d;
            match e.target() {
                Target::Dir(sub) => stack.push((sub, 0)),
                Target::Leaf(l) => {
                    self.nlink[l as usize] += 1;
                    if first_dir[l as usize] == NONE {
                        first_dir[l as usize] = d;
                    }
                }
            }
        }
        for (l, leaf) in tree.leaves.iter().enumerate() {
            if matches!(leaf.content, Content::Chr(0)) && self.nlink[l] > 1 {
                return Err(Unsupported("a hardlinked whiteout".into()));
            }
        }

        let root_meta = tree.dirs[0].meta;
        let root_selinux = tree.xattr_sets[root_meta.xattrs as usize]
            .iter()
            .find(|(k, _)| &**k == b"security.selinux")
            .map(|(_, v)| v);
        let root = self.push(0);
        self.dir_inode[0] = root;
        self.dir_parent_inode[0] = root;
        let mut queue = VecDeque::from([0u32]);
        while let Some(d) = queue.pop_front() {
            let me = self.dir_inode[d as usize];
            let mut has_whiteout = false;
            for e in &tree.dirs[d as usize].entries {
                match e.target() {
                    Target::Dir(sub) => {
                        let child = self.push(sub);
                        self.dir_inode[sub as usize] = child;
                        self.dir_parent_inode[sub as usize] = me;
                        queue.push_back(sub);
                    }
                    Target::Leaf(l) => {
                        let leaf = &tree.leaves[l as usize];
                        let canonical = self.nlink[l as usize] <= 1 || first_dir[l as usize] == d;
                        if !canonical {
                            continue;
                        }
                        if self.leaf_inode[l as usize] == NONE {
                            self.leaf_inode[l as usize] = self.push(l | LEAF);
                        }
                        let child = self.leaf_inode[l as usize];
                        if matches!(leaf.content, Content::Chr(0))
                            && self.flags[child as usize] & F_ESCAPED == 0
                        {
                            let name = tree.name(e);
                            let set = &tree.xattr_sets[leaf.meta.xattrs as usize];
                            let want = usize::from(root_selinux.is_some());
                            let xattrs_match = set.len() == want
                                && (want == 0
                                    || set
                                        .iter()
                                        .find(|(k, _)| &**k == b"security.selinux")
                                        .map(|(_, v)| v)
                                        == root_selinux);
                            let m = &leaf.meta;
                            let stub = d == 0
                                && name.len() == 2
                                && name
                                    .iter()
                                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
                                && m.mode == 0o644
                                && m.uid == root_meta.uid
                                && m.gid == root_meta.gid
                                && m.mtime == root_meta.mtime
                                && m.nsec == root_meta.nsec
                                && xattrs_match;
                            if !stub {
                                self.flags[child as usize] |= F_ESCAPED;
                                has_whiteout = true;
                            }
                        }
                    }
                }
            }
            if has_whiteout {
                self.flags[me as usize] |= F_HAS_WHITEOUT;
            }
        }
        // Directory layouts (need the children's file types, known now).
        for d in 0..tree.dirs.len() {
            if self.dir_inode[d] == NONE {
                continue;
            }
            let mut lay = DirLayout::default();
            let mut bytes = 0u64;
            let mut err = None;
            self.for_dirents(d as u32, |name, _, ft| {
                let size = DIRENT + name.len() as u64;
                if size > BLOCK {
                    err = Some(Unsupported("a file name longer than a block".into()));
                }
                if ft == FT_DIR {
                    lay.nlink += 1;
                }
                bytes += size;
                if bytes > BLOCK {
                    lay.blocks += 1;
                    bytes = size;
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
            if bytes > MAX_DIR_TAIL {
                lay.blocks += 1;
                bytes = 0;
            }
            lay.tail = bytes as u32;
            self.dir_layout[d] = lay;
        }
        for l in 0..tree.leaves.len() {
            if self.leaf_inode[l] == NONE {
                continue;
            }
            if let Content::Chr(r) | Content::Blk(r) = tree.leaves[l].content
                && r > u64::from(u32::MAX)
            {
                return Err(Unsupported("a device number beyond 32 bits".into()));
            }
        }
        self.min_mtime = (0..self.inodes.len() as u32)
            .map(|i| {
                let m = self.meta_of(i);
                (m.mtime as u64, m.nsec)
            })
            .min()
            .unwrap_or((0, 0));
        if self.inodes.len() > u32::MAX as usize / 2 {
            return Err(Unsupported("too many inodes".into()));
        }
        Ok(())
    }

    fn file_type(&self, inode: u32) -> u8 {
        if self.flags[inode as usize] & F_ESCAPED != 0 {
            return FT_REG;
        }
        let row = self.inodes[inode as usize];
        if row & LEAF == 0 {
            return FT_DIR;
        }
        match self.tree.leaves[(row & !LEAF) as usize].content {
            Content::Inline { .. } | Content::External { .. } => FT_REG,
            Content::Symlink { .. } => FT_LNK,
            Content::Chr(_) => FT_CHR,
            Content::Blk(_) => FT_BLK,
            Content::Fifo => FT_FIFO,
        }
    }

    /// The entries of directory `d` as written: `.` and `..` merged into the sorted names.
    fn for_dirents(&self, d: u32, mut f: impl FnMut(&'t [u8], u32, u8)) {
        let tree = self.tree;
        let me = self.dir_inode[d as usize];
        let specials: [(&'t [u8], u32); 2] =
            [(b".", me), (b"..", self.dir_parent_inode[d as usize])];
        let mut sp = specials.iter().peekable();
        for e in &tree.dirs[d as usize].entries {
            let name = tree.name(e);
            while let Some(&&(sname, sino)) = sp.peek() {
                if sname < name {
                    f(sname, sino, FT_DIR);
                    sp.next();
                } else {
                    break;
                }
            }
            let ino = match e.target() {
                Target::Dir(s) => self.dir_inode[s as usize],
                Target::Leaf(l) => self.leaf_inode[l as usize],
            };
            f(name, ino, self.file_type(ino));
        }
        for &(sname, sino) in sp {
            f(sname, sino, FT_DIR);
        }
    }

    /// The xattrs of an inode in composefs's V1 order (sorted by full name, then value
    /// length, then value).
    fn xattrs(&self, inode: u32) -> Vec<XRef> {
        let row = self.inodes[inode as usize];
        let meta = self.meta_of(inode);
        let mut v = Vec::new();
        if row & LEAF != 0
            && let Content::External { obj, .. } = self.tree.leaves[(row & !LEAF) as usize].content
        {
            let c = self.canon[obj as usize];
            v.push(XRef::Meta(c));
            v.push(XRef::Redir(c));
        }
        v.extend(
            self.set_plains[meta.xattrs as usize]
                .iter()
                .map(|&p| XRef::Plain(p)),
        );
        let flags = self.flags[inode as usize];
        if flags & F_ESCAPED != 0 {
            v.push(XRef::Plain(self.marks[0]));
            v.push(XRef::Plain(self.marks[1]));
        }
        if flags & F_HAS_WHITEOUT != 0 {
            v.extend(self.marks[2..6].iter().map(|&p| XRef::Plain(p)));
        }
        if inode == 0 {
            v.push(XRef::Plain(self.marks[6]));
        }
        v.sort_by(|a, b| self.cmp_xattr(*a, *b));
        v
    }

    fn parts(&self, x: XRef) -> (u8, Cow<'_, [u8]>, Cow<'_, [u8]>) {
        match x {
            XRef::Plain(p) => {
                let p = &self.plains[p as usize];
                (p.prefix, Cow::Borrowed(&p.suffix), Cow::Borrowed(&p.value))
            }
            XRef::Meta(o) => {
                let id = self.tree.object(o);
                let mut v = vec![0u8, (4 + id.len()) as u8, 0, self.kernel_id];
                v.extend_from_slice(id);
                (TRUSTED, Cow::Borrowed(METACOPY_SUFFIX), Cow::Owned(v))
            }
            XRef::Redir(o) => {
                let id = self.tree.object(o);
                let mut v = String::with_capacity(2 * id.len() + 2);
                v.push('/');
                crate::repo::push_hex(&mut v, &id[..1]);
                v.push('/');
                crate::repo::push_hex(&mut v, &id[1..]);
                (
                    TRUSTED,
                    Cow::Borrowed(REDIRECT_SUFFIX),
                    Cow::Owned(v.into_bytes()),
                )
            }
        }
    }

    fn cmp_xattr(&self, a: XRef, b: XRef) -> std::cmp::Ordering {
        match (a, b) {
            (XRef::Meta(x), XRef::Meta(y)) | (XRef::Redir(x), XRef::Redir(y)) => {
                return self.tree.object(x).cmp(self.tree.object(y));
            }
            _ => {}
        }
        // Names first, without building values: an inode's xattrs have distinct names, so
        // the values (which for object xattrs means formatting a digest) are rarely needed.
        let (pa, sa) = self.name(a);
        let (pb, sb) = self.name(b);
        let ka = XATTR_PREFIXES[pa as usize].iter().chain(sa.iter());
        let kb = XATTR_PREFIXES[pb as usize].iter().chain(sb.iter());
        ka.cmp(kb).then_with(|| {
            let (_, _, va) = self.parts(a);
            let (_, _, vb) = self.parts(b);
            va.len().cmp(&vb.len()).then_with(|| va.cmp(&vb))
        })
    }

    /// The name of an xattr: prefix index and suffix, as [`parts`](Self::parts) gives them.
    fn name(&self, x: XRef) -> (u8, &[u8]) {
        match x {
            XRef::Plain(p) => {
                let p = &self.plains[p as usize];
                (p.prefix, &p.suffix)
            }
            XRef::Meta(_) => (TRUSTED, METACOPY_SUFFIX),
            XRef::Redir(_) => (TRUSTED, REDIRECT_SUFFIX),
        }
    }

    /// Share every xattr (name and value) used by more than one inode; note ACLs.
    fn share_xattrs(&mut self) {
        let mut plain_count = vec![0u32; self.plains.len()];
        let mut obj_count = vec![0u32; self.canon.len()];
        let mut acl = false;
        for i in 0..self.inodes.len() as u32 {
            for x in self.xattrs(i) {
                match x {
                    XRef::Plain(p) => {
                        plain_count[p as usize] += 1;
                        let prefix = self.plains[p as usize].prefix;
                        acl |= prefix == ACL_ACCESS || prefix == ACL_DEFAULT;
                    }
                    XRef::Meta(o) => obj_count[o as usize] += 1,
                    XRef::Redir(_) => {}
                }
            }
        }
        self.header_flags = if acl { COMPOSEFS_FLAGS_HAS_ACL } else { 0 };
        let mut shared: Vec<XRef> = Vec::new();
        for (p, &c) in plain_count.iter().enumerate() {
            if c > 1 {
                shared.push(XRef::Plain(p as u32));
            }
        }
        for (o, &c) in obj_count.iter().enumerate() {
            if c > 1 {
                shared.push(XRef::Meta(o as u32));
                shared.push(XRef::Redir(o as u32));
            }
        }
        shared.sort_by(|a, b| self.cmp_xattr(*a, *b));
        let n = shared.len() as u32;
        for (i, x) in shared.iter().enumerate() {
            let idx = n - 1 - i as u32;
            match *x {
                XRef::Plain(p) => self.plain_shared[p as usize] = idx,
                XRef::Meta(o) => self.meta_shared[o as usize] = idx,
                XRef::Redir(o) => self.redir_shared[o as usize] = idx,
            }
        }
        shared.reverse();
        self.shared = shared;
    }

    fn shared_index(&self, x: XRef) -> u32 {
        match x {
            XRef::Plain(p) => self.plain_shared[p as usize],
            XRef::Meta(o) => self.meta_shared[o as usize],
            XRef::Redir(o) => self.redir_shared[o as usize],
        }
    }

    fn xattr_entry_size(&self, x: XRef) -> u64 {
        // Sizes only: building the values would format a digest per object xattr.
        let value_len = match x {
            XRef::Plain(p) => self.plains[p as usize].value.len(),
            // 0, 4 + digest length, 0, algorithm, digest (as `parts` builds it)
            XRef::Meta(o) => 4 + self.tree.object(o).len(),
            // "/XX/" + the rest of the digest in hex
            XRef::Redir(o) => 2 + 2 * self.tree.object(o).len(),
        };
        (4 + self.name(x).1.len() as u64 + value_len as u64).next_multiple_of(4)
    }

    /// Byte size of the inode's xattr area.
    fn xattr_size(&self, xs: &[XRef]) -> u64 {
        if xs.is_empty() {
            return 0;
        }
        XATTR_HEADER
            + xs.iter()
                .map(|&x| {
                    if self.shared_index(x) != NONE {
                        4
                    } else {
                        self.xattr_entry_size(x)
                    }
                })
                .sum::<u64>()
    }

    fn fits_compact(&self, meta: &Meta, size: u64, nlink: u64) -> bool {
        (meta.mtime as u64, meta.nsec) == self.min_mtime
            && nlink <= u64::from(u16::MAX)
            && meta.uid <= u32::from(u16::MAX)
            && meta.gid <= u32::from(u16::MAX)
            && size <= u64::from(u32::MAX)
    }

    /// composefs's `n_data_blocks` / `inline_tail_size` for a leaf inode, after its
    /// promotion rules (symlinks that fill a block, chunk indexes that would overflow).
    fn leaf_layout(&self, inode: u32, xattr_size: u64) -> LeafLayout {
        let row = self.inodes[inode as usize];
        let leaf = &self.tree.leaves[(row & !LEAF) as usize];
        let nlink = u64::from(self.nlink[(row & !LEAF) as usize]);
        match leaf.content {
            Content::Inline { len, .. } => {
                let len = u64::from(len);
                let (mut blocks, mut tail) = (len / BLOCK, len % BLOCK);
                if tail > BLOCK / 2 {
                    blocks += 1;
                    tail = 0;
                }
                LeafLayout {
                    blocks: blocks as u32,
                    tail,
                }
            }
            Content::Symlink { len, .. } => {
                let len = u64::from(len);
                let header = if self.fits_compact(&leaf.meta, len, nlink) {
                    COMPACT_HEADER
                } else {
                    EXTENDED_HEADER
                };
                if len > 0 && header + xattr_size + len >= BLOCK {
                    LeafLayout { blocks: 1, tail: 0 }
                } else {
                    LeafLayout {
                        blocks: 0,
                        tail: len,
                    }
                }
            }
            Content::External { size, .. } if size > 0 => {
                let tail = chunk_count(size) * 4;
                if tail > 0 && tail + xattr_size % SLOT > BLOCK {
                    LeafLayout { blocks: 1, tail: 0 }
                } else {
                    LeafLayout { blocks: 0, tail }
                }
            }
            _ => LeafLayout { blocks: 0, tail: 0 },
        }
    }

    fn write(&self, out: &mut Out, layout: &mut Layout, measure: bool) {
        let nid = |layout: &Layout, i: u32| -> u64 {
            if measure {
                0
            } else {
                layout.inodes[i as usize] / SLOT
            }
        };
        // composefs header
        let mut h = Vec::with_capacity(32);
        h.extend_from_slice(&COMPOSEFS_MAGIC.to_le_bytes());
        h.extend_from_slice(&COMPOSEFS_HEADER_VERSION.to_le_bytes());
        h.extend_from_slice(&self.header_flags.to_le_bytes());
        h.extend_from_slice(&COMPOSEFS_VERSION_V1.to_le_bytes());
        h.resize(32, 0);
        out.write(&h);
        out.pad(SUPERBLOCK_OFFSET);
        // superblock
        let mut sb = Vec::with_capacity(128);
        sb.extend_from_slice(&EROFS_MAGIC.to_le_bytes());
        sb.extend_from_slice(&0u32.to_le_bytes());
        sb.extend_from_slice(&FEATURE_COMPAT.to_le_bytes());
        sb.push(BLOCK_BITS as u8);
        sb.push(0);
        sb.extend_from_slice(&(nid(layout, 0) as u16).to_le_bytes());
        sb.extend_from_slice(&(self.inodes.len() as u64).to_le_bytes());
        sb.extend_from_slice(&self.min_mtime.0.to_le_bytes());
        sb.extend_from_slice(&self.min_mtime.1.to_le_bytes());
        let blocks = if measure { 0 } else { layout.end / BLOCK };
        sb.extend_from_slice(&(blocks as u32).to_le_bytes());
        sb.extend_from_slice(&0u32.to_le_bytes());
        let xattr_blkaddr = if measure {
            0
        } else {
            layout.inodes_end / BLOCK
        };
        sb.extend_from_slice(&(xattr_blkaddr as u32).to_le_bytes());
        sb.resize(128, 0);
        out.write(&sb);

        for i in 0..self.inodes.len() as u32 {
            self.write_inode(out, layout, measure, i);
        }
        out.pad(SLOT);
        if measure {
            layout.inodes_end = out.pos;
        }
        for x in &self.shared {
            if measure {
                layout.xattrs.push(out.pos);
            }
            self.write_xattr(out, *x);
        }
        out.pad(BLOCK);
        for i in 0..self.inodes.len() as u32 {
            if measure {
                layout.blocks.push(out.pos);
            }
            self.write_blocks(out, layout, measure, i);
        }
        if measure {
            layout.end = out.pos;
        }
    }

    fn write_xattr(&self, out: &mut Out, x: XRef) {
        let (p, s, v) = self.parts(x);
        out.write(&[s.len() as u8, p]);
        out.write(&(v.len() as u16).to_le_bytes());
        out.write(&s);
        out.write(&v);
        out.pad(4);
    }

    fn write_inode(&self, out: &mut Out, layout: &mut Layout, measure: bool, i: u32) {
        let tree = self.tree;
        let row = self.inodes[i as usize];
        let meta = *self.meta_of(i);
        let xs = self.xattrs(i);
        let xattr_size = self.xattr_size(&xs);
        let block_start = if measure {
            0
        } else {
            layout.blocks[i as usize]
        };
        let blkaddr = (block_start / BLOCK) as u32;
        let is_symlink;
        let mut leaf_lay = LeafLayout { blocks: 0, tail: 0 };
        let mut chunk_based = false;
        let (data_layout, u, size, nlink) = if row & LEAF == 0 {
            is_symlink = false;
            let lay = self.dir_layout[row as usize];
            let size = u64::from(lay.blocks) * BLOCK + u64::from(lay.tail);
            let (dl, u) = if lay.tail == 0 {
                (FLAT_PLAIN, blkaddr)
            } else if lay.blocks > 0 {
                (FLAT_INLINE, blkaddr)
            } else {
                (FLAT_INLINE, 0)
            };
            (dl, u, size, u64::from(lay.nlink))
        } else {
            let l = (row & !LEAF) as usize;
            let leaf = &tree.leaves[l];
            leaf_lay = self.leaf_layout(i, xattr_size);
            let nlink = u64::from(self.nlink[l]);
            is_symlink = matches!(leaf.content, Content::Symlink { .. });
            let (dl, u, size) = match leaf.content {
                Content::Inline { len, .. } => {
                    if len == 0 {
                        (FLAT_PLAIN, 0, 0)
                    } else if leaf_lay.blocks > 0 {
                        if leaf_lay.tail > 0 {
                            (FLAT_INLINE, blkaddr, u64::from(len))
                        } else {
                            (FLAT_PLAIN, blkaddr, u64::from(len))
                        }
                    } else {
                        (FLAT_INLINE, 0, u64::from(len))
                    }
                }
                Content::External { size, .. } => {
                    chunk_based = true;
                    let format = chunk_bits(size) - BLOCK_BITS;
                    let u = if leaf_lay.blocks > 0 {
                        (blkaddr & 0xFFFF_0000) | format
                    } else {
                        format
                    };
                    (CHUNK_BASED, u, size)
                }
                Content::Chr(r) | Content::Blk(r) => (FLAT_PLAIN, r as u32, 0),
                Content::Fifo => (FLAT_PLAIN, 0, 0),
                Content::Symlink { len, .. } => {
                    if leaf_lay.blocks > 0 {
                        (FLAT_PLAIN, blkaddr, u64::from(len))
                    } else {
                        (FLAT_INLINE, 0, u64::from(len))
                    }
                }
            };
            (dl, u, size, nlink)
        };
        let compact = self.fits_compact(&meta, size, nlink);
        let header = if compact {
            COMPACT_HEADER
        } else {
            EXTENDED_HEADER
        };
        out.pad(SLOT);
        if is_symlink && data_layout == FLAT_PLAIN {
            let pos = out.pos;
            let total = header + xattr_size + size;
            if pos / BLOCK != (pos + total - 1) / BLOCK
                && let Some(p) = to_boundary(pos)
            {
                out.zeros(p);
            }
        }
        if chunk_based
            && leaf_lay.tail == 0
            && leaf_lay.blocks > 0
            && let Some(p) = to_boundary(out.pos)
        {
            out.zeros(p);
        }
        if chunk_based
            && leaf_lay.tail > 0
            && let Some(rem) = to_boundary(out.pos + header + xattr_size)
            && rem < leaf_lay.tail
        {
            out.zeros(rem.next_multiple_of(SLOT));
        }
        if data_layout == FLAT_INLINE {
            let inline = size % BLOCK;
            if is_symlink {
                if out.pos % BLOCK + header + xattr_size + inline > BLOCK
                    && let Some(p) = to_boundary(out.pos)
                {
                    out.zeros(p);
                }
            } else if let Some(rem) = to_boundary(out.pos + header + xattr_size)
                && rem < inline
            {
                out.zeros(rem.next_multiple_of(SLOT));
            }
        }
        let icount: u16 = if xattr_size == 0 {
            0
        } else {
            (1 + (xattr_size - XATTR_HEADER) / 4) as u16
        };
        if measure {
            layout.inodes.push(out.pos);
        }
        let ft = self.file_type(i);
        let ifmt: u16 = match ft {
            FT_REG => 0o100000,
            FT_DIR => 0o040000,
            FT_CHR => 0o020000,
            FT_BLK => 0o060000,
            FT_FIFO => 0o010000,
            _ => 0o120000,
        };
        let mode = ifmt | (meta.mode as u16 & 0o7777);
        let mut h = Vec::with_capacity(64);
        if compact {
            h.extend_from_slice(&data_layout.to_le_bytes());
            h.extend_from_slice(&icount.to_le_bytes());
            h.extend_from_slice(&mode.to_le_bytes());
            h.extend_from_slice(&(nlink as u16).to_le_bytes());
            h.extend_from_slice(&(size as u32).to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&u.to_le_bytes());
            h.extend_from_slice(&i.to_le_bytes());
            h.extend_from_slice(&(meta.uid as u16).to_le_bytes());
            h.extend_from_slice(&(meta.gid as u16).to_le_bytes());
            h.resize(32, 0);
        } else {
            h.extend_from_slice(&(1 | data_layout).to_le_bytes());
            h.extend_from_slice(&icount.to_le_bytes());
            h.extend_from_slice(&mode.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&u.to_le_bytes());
            h.extend_from_slice(&i.to_le_bytes());
            h.extend_from_slice(&meta.uid.to_le_bytes());
            h.extend_from_slice(&meta.gid.to_le_bytes());
            h.extend_from_slice(&(meta.mtime as u64).to_le_bytes());
            h.extend_from_slice(&meta.nsec.to_le_bytes());
            h.extend_from_slice(&(nlink as u32).to_le_bytes());
            h.resize(64, 0);
        }
        out.write(&h);
        if !xs.is_empty() {
            let mut filter = 0u32;
            for &x in &xs {
                let (p, s, _) = self.parts(x);
                filter |= 1 << (xxh32(&s, XATTR_FILTER_SEED + u32::from(p)) % 32);
            }
            let shared: Vec<u32> = xs
                .iter()
                .map(|&x| self.shared_index(x))
                .filter(|&s| s != NONE)
                .collect();
            let mut xh = [0u8; XATTR_HEADER as usize];
            xh[..4].copy_from_slice(&(!filter).to_le_bytes());
            xh[4] = shared.len() as u8;
            out.write(&xh);
            for s in shared {
                let r = if measure {
                    0
                } else {
                    let end = layout.inodes_end;
                    ((end % BLOCK + (layout.xattrs[s as usize] - end)) / 4) as u32
                };
                out.write(&r.to_le_bytes());
            }
            for &x in &xs {
                if self.shared_index(x) == NONE {
                    self.write_xattr(out, x);
                }
            }
        }
        if row & LEAF == 0 {
            let lay = self.dir_layout[row as usize];
            if lay.tail > 0 {
                self.write_dir_block(out, layout, measure, row, lay.blocks as usize);
            }
        } else {
            let leaf = &tree.leaves[(row & !LEAF) as usize];
            match leaf.content {
                Content::Inline { off, len } => {
                    let data = tree.bytes(off, len);
                    out.write(&data[data.len() - leaf_lay.tail as usize..]);
                }
                Content::External { .. } => {
                    for _ in 0..leaf_lay.tail / 4 {
                        out.write(&[0xff; 4]);
                    }
                }
                Content::Symlink { off, len } if leaf_lay.blocks == 0 => {
                    out.write(tree.bytes(off, len));
                }
                _ => {}
            }
        }
        out.pad(SLOT);
    }

    /// Write block number `which` of directory `d` (the last one is the inline tail).
    fn write_dir_block(&self, out: &mut Out, layout: &Layout, measure: bool, d: u32, which: usize) {
        // Re-split the entries exactly as the layout pass did and emit the chosen block.
        let mut current: Vec<(&'t [u8], u32, u8)> = Vec::new();
        let mut bytes = 0u64;
        let mut block = 0usize;
        let mut done = false;
        let emit = |out: &mut Out, ents: &[(&[u8], u32, u8)]| {
            let mut nameoff = DIRENT * ents.len() as u64;
            for &(name, ino, ft) in ents {
                let nid = if measure {
                    0
                } else {
                    layout.inodes[ino as usize] / SLOT
                };
                out.write(&nid.to_le_bytes());
                out.write(&(nameoff as u16).to_le_bytes());
                out.write(&[ft, 0]);
                nameoff += name.len() as u64;
            }
            for &(name, _, _) in ents {
                out.write(name);
            }
        };
        self.for_dirents(d, |name, ino, ft| {
            if done {
                return;
            }
            let size = DIRENT + name.len() as u64;
            bytes += size;
            if bytes > BLOCK {
                if block == which {
                    emit(out, &current);
                    done = true;
                    return;
                }
                block += 1;
                current.clear();
                bytes = size;
            }
            current.push((name, ino, ft));
        });
        if !done && block == which {
            emit(out, &current);
        }
    }

    fn write_blocks(&self, out: &mut Out, layout: &Layout, measure: bool, i: u32) {
        let tree = self.tree;
        let row = self.inodes[i as usize];
        if row & LEAF == 0 {
            let lay = self.dir_layout[row as usize];
            // A tail too big to inline was counted as one more block.
            for b in 0..lay.blocks as usize {
                self.write_dir_block(out, layout, measure, row, b);
                out.pad(BLOCK);
            }
            return;
        }
        let leaf = &tree.leaves[(row & !LEAF) as usize];
        let xs = self.xattrs(i);
        let lay = self.leaf_layout(i, self.xattr_size(&xs));
        if lay.blocks == 0 {
            return;
        }
        match leaf.content {
            Content::Inline { off, len } => {
                let data = tree.bytes(off, len);
                for b in 0..lay.blocks as usize {
                    let start = b * BLOCK as usize;
                    if start < data.len() {
                        out.write(&data[start..(start + BLOCK as usize).min(data.len())]);
                    }
                    out.pad(BLOCK);
                }
            }
            Content::Symlink { off, len } => {
                let data = tree.bytes(off, len);
                out.write(&data[..data.len().min(BLOCK as usize)]);
                out.pad(BLOCK);
            }
            Content::External { .. } => {
                for _ in 0..NONINLINE_CHUNKS {
                    out.write(&[0xff; 4]);
                }
            }
            _ => {}
        }
    }
}
