//! fs-verity digests: computed in userspace, and enabled/measured through the kernel.
//!
//! A composefs object is named by its fs-verity digest: the hash of a 256-byte
//! `fsverity_descriptor` whose `root_hash` is the top of a Merkle tree over 4096-byte blocks
//! (no salt). See the kernel's `Documentation/filesystems/fsverity.rst`, "File digest
//! computation". `fsverity digest --hash-alg=sha256|sha512 --block-size=4096` computes the same.

use std::os::fd::AsFd;

use composefs_ioctls::fsverity::{
    EnableVerityError, MeasureVerityError, fs_ioc_enable_verity, fs_ioc_measure_verity,
};
use sha2::{Digest, Sha256, Sha512};

use super::{HashAlg, ObjectId};

mod sha512x8;

/// The Merkle tree block size, log2. composefs repositories always use 4 KiB
/// (`fsverity-*-12`), and so does the `lg_blocksize` field of every splitstream header.
pub(crate) const LG_BLOCK_SIZE: u8 = 12;

/// The Merkle tree block size in bytes.
pub(crate) const BLOCK_SIZE: usize = 1 << LG_BLOCK_SIZE;

/// Size of the `fsverity_descriptor` that is hashed to give the file digest.
const DESCRIPTOR_SIZE: usize = 256;

/// Tree levels needed for any `u64` file size: each level divides the block count by at least
/// 128 (4096 / 32), so 2^64 bytes need ceil((64 - 12) / 7) = 8 levels; 12 leaves margin.
const MAX_LEVELS: usize = 12;

/// One hash function behind [`HashAlg`].
#[derive(Clone)]
enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    fn new(alg: HashAlg) -> Self {
        match alg {
            HashAlg::Sha256 => Hasher::Sha256(Sha256::new()),
            HashAlg::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    /// Hash `parts` in one go and append the digest to `out`.
    fn digest_into(alg: HashAlg, parts: &[&[u8]], out: &mut Vec<u8>) {
        let mut h = Hasher::new(alg);
        for p in parts {
            h.update(p);
        }
        h.finish_into(out);
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish_into(self, out: &mut Vec<u8>) {
        match self {
            Hasher::Sha256(h) => out.extend_from_slice(&h.finalize()),
            Hasher::Sha512(h) => out.extend_from_slice(&h.finalize()),
        }
    }
}

/// Streaming fs-verity digest computation (4096-byte Merkle blocks, no salt).
///
/// Memory is bounded: one partial block per tree level.
///
/// ```
/// use splitfdstream::repo::{FsVerityHasher, HashAlg};
/// let mut h = FsVerityHasher::new(HashAlg::Sha256);
/// h.update(b"hello\n");
/// // printf 'hello\n' > f; fsverity digest --hash-alg=sha256 --block-size=4096 f
/// assert_eq!(
///     h.finish().to_string(),
///     "9c76eecc7b76fcb46199cb27b90cf59a660e10575bb0412128905129d5b1c2aa"
/// );
/// ```
#[derive(Clone)]
pub struct FsVerityHasher {
    alg: HashAlg,
    /// Bytes of the current, incomplete data block.
    block: Vec<u8>,
    /// `levels[i]`: concatenated digests of level-i blocks not yet folded into level i+1.
    levels: Vec<Vec<u8>>,
    /// Total data bytes seen.
    size: u64,
}

impl std::fmt::Debug for FsVerityHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsVerityHasher")
            .field("alg", &self.alg)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FsVerityHasher {
    /// A hasher for an empty file.
    pub fn new(alg: HashAlg) -> Self {
        FsVerityHasher {
            alg,
            block: Vec::with_capacity(BLOCK_SIZE),
            levels: Vec::new(),
            size: 0,
        }
    }

    /// The fs-verity digest of `data`.
    pub fn digest(alg: HashAlg, data: &[u8]) -> ObjectId {
        let mut h = FsVerityHasher::new(alg);
        h.update(data);
        h.finish()
    }

    /// The fs-verity digests of several files at once. With SHA-512 on a CPU with AVX-512 or
    /// AVX2, the data blocks of all of them are hashed eight at a time, whatever file each
    /// block belongs to: small files (a few blocks each) then get the multi-buffer speed too.
    pub fn digest_many(alg: HashAlg, files: &[&[u8]]) -> Vec<ObjectId> {
        if alg != HashAlg::Sha512 || !sha512x8::available() {
            return files.iter().map(|f| Self::digest(alg, f)).collect();
        }
        const ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
        // The last partial block of each file, zero-padded as the Merkle tree requires, all in
        // one buffer (one allocation per batch, not per file).
        let partial = |f: &[u8]| !f.len().is_multiple_of(BLOCK_SIZE);
        let mut tails = vec![0u8; files.iter().filter(|f| partial(f)).count() * BLOCK_SIZE];
        let mut free = tails.chunks_exact_mut(BLOCK_SIZE);
        for f in files.iter().filter(|f| partial(f)) {
            let rem = f.chunks_exact(BLOCK_SIZE).remainder();
            free.next().expect("one slot per partial file")[..rem.len()].copy_from_slice(rem);
        }
        let mut tail_blocks = tails.chunks_exact(BLOCK_SIZE);
        let mut blocks: Vec<&[u8]> = Vec::new();
        for f in files {
            blocks.extend(f.chunks_exact(BLOCK_SIZE));
            if partial(f) {
                blocks.push(tail_blocks.next().expect("one slot per partial file"));
            }
        }
        let mut digests: Vec<u8> = Vec::with_capacity(blocks.len() * 64);
        for group in blocks.chunks(sha512x8::LANES) {
            // A short last group fills its spare lanes with a zero block: one 8-lane pass
            // costs about as much as two scalar blocks.
            let lanes = std::array::from_fn(|i| group.get(i).copied().unwrap_or(&ZERO));
            let d = sha512x8::hash_lanes(lanes).expect("available() said yes");
            for digest in &d[..group.len()] {
                digests.extend_from_slice(digest);
            }
        }
        let mut at = 0;
        files
            .iter()
            .map(|f| {
                let n = f.len().div_ceil(BLOCK_SIZE);
                let mut h = FsVerityHasher::new(alg);
                h.size = f.len() as u64;
                for d in digests[at * 64..(at + n) * 64].chunks(64) {
                    h.push_digest(0, d);
                }
                at += n;
                h.finish()
            })
            .collect()
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Feed the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        while !data.is_empty() {
            if self.block.is_empty() && data.len() >= BLOCK_SIZE {
                // Whole blocks straight from the caller's buffer: no copy. Eight at a time
                // where the CPU can hash them side by side.
                if self.alg == HashAlg::Sha512 && data.len() >= sha512x8::LANES * BLOCK_SIZE {
                    let (group, rest) = data.split_at(sha512x8::LANES * BLOCK_SIZE);
                    if let Some(digests) = sha512x8::hash_blocks(group) {
                        for d in &digests {
                            self.push_digest(0, d);
                        }
                        data = rest;
                        continue;
                    }
                }
                let (blk, rest) = data.split_at(BLOCK_SIZE);
                self.push_hash_of(0, blk);
                data = rest;
                continue;
            }
            let take = (BLOCK_SIZE - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == BLOCK_SIZE {
                let blk = std::mem::take(&mut self.block);
                self.push_hash_of(0, &blk);
                self.block = blk;
                self.block.clear();
            }
        }
    }

    /// Hash one full block of level `level` (0 = data) into level `level + 1`.
    fn push_hash_of(&mut self, level: usize, block: &[u8]) {
        self.ensure_level(level);
        Hasher::digest_into(self.alg, &[block], &mut self.levels[level]);
        self.fold_if_full(level);
    }

    /// Append the digest of one level-`level` block computed elsewhere.
    fn push_digest(&mut self, level: usize, digest: &[u8]) {
        self.ensure_level(level);
        self.levels[level].extend_from_slice(digest);
        self.fold_if_full(level);
    }

    fn ensure_level(&mut self, level: usize) {
        debug_assert!(level < MAX_LEVELS);
        if self.levels.len() <= level {
            self.levels
                .resize_with(level + 1, || Vec::with_capacity(BLOCK_SIZE));
        }
    }

    /// A level whose pending digests fill a block hashes it into the level above.
    fn fold_if_full(&mut self, level: usize) {
        if self.levels[level].len() == BLOCK_SIZE {
            let full = std::mem::take(&mut self.levels[level]);
            self.push_hash_of(level + 1, &full);
            self.levels[level] = full;
            self.levels[level].clear();
        }
    }

    /// The root hash of the Merkle tree (all zeros for an empty file).
    fn root_hash(mut self) -> Vec<u8> {
        let len = self.alg.digest_len();
        if self.size == 0 {
            return vec![0; len];
        }
        if !self.block.is_empty() {
            let mut blk = std::mem::take(&mut self.block);
            blk.resize(BLOCK_SIZE, 0);
            self.push_hash_of(0, &blk);
        }
        // Fold each level's partial block upwards until one digest remains on top. A level
        // that has never emitted a full block and holds exactly one digest is the top.
        let mut level = 0;
        loop {
            let pending = std::mem::take(&mut self.levels[level]);
            let is_top = self.levels.len() == level + 1;
            if is_top && pending.len() == len {
                return pending;
            }
            if !pending.is_empty() {
                let mut blk = pending;
                blk.resize(BLOCK_SIZE, 0);
                self.push_hash_of(level + 1, &blk);
            }
            level += 1;
        }
    }

    /// The fs-verity digest of everything fed so far.
    pub fn finish(self) -> ObjectId {
        let alg = self.alg;
        let size = self.size;
        let root = self.root_hash();
        // struct fsverity_descriptor (include/uapi/linux/fsverity.h, "File digest computation")
        let mut desc = [0u8; DESCRIPTOR_SIZE];
        desc[0] = 1; // version
        desc[1] = alg.kernel_id(); // hash_algorithm
        desc[2] = LG_BLOCK_SIZE; // log_blocksize
        desc[3] = 0; // salt_size
        // desc[4..8]: reserved; desc[8..16]: data_size (le64)
        desc[8..16].copy_from_slice(&size.to_le_bytes());
        desc[16..16 + root.len()].copy_from_slice(&root); // root_hash[64]
        // salt[32] and reserved[144] stay zero.
        let mut out = Vec::with_capacity(alg.digest_len());
        Hasher::digest_into(alg, &[&desc], &mut out);
        ObjectId::from_bytes(alg, &out).expect("digest length matches its algorithm")
    }
}

/// Outcome of asking the kernel to protect a file with fs-verity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelVerity {
    /// Enabled now (or was already enabled).
    Enabled,
    /// The filesystem has no fs-verity support.
    Unsupported,
}

/// How often to retry `FS_IOC_ENABLE_VERITY` when it fails with `ETXTBSY`. A concurrent
/// `fork()` elsewhere in the process briefly holds a copy of our writable tmpfile fd until the
/// child execs (every fd is CLOEXEC); the window is short, so a few short waits suffice.
const ENABLE_VERITY_RETRIES: u32 = 50;

/// Wait between `ETXTBSY` retries.
const ENABLE_VERITY_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// Enable fs-verity on `fd` (opened read-only, no writable fd open anywhere).
pub(crate) fn enable(fd: impl AsFd, alg: HashAlg) -> std::io::Result<KernelVerity> {
    let mut attempt = 0;
    loop {
        match fs_ioc_enable_verity(fd.as_fd(), alg.kernel_id(), BLOCK_SIZE as u32) {
            Ok(()) | Err(EnableVerityError::AlreadyEnabled) => return Ok(KernelVerity::Enabled),
            Err(EnableVerityError::FilesystemNotSupported) => {
                return Ok(KernelVerity::Unsupported);
            }
            Err(EnableVerityError::FileOpenedForWrite) if attempt < ENABLE_VERITY_RETRIES => {
                attempt += 1;
                std::thread::sleep(ENABLE_VERITY_RETRY_WAIT);
            }
            Err(EnableVerityError::FileOpenedForWrite) => {
                return Err(std::io::Error::from(rustix::io::Errno::TXTBSY));
            }
            Err(EnableVerityError::Io(e)) => return Err(e),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
}

/// The kernel's fs-verity digest of `fd`, or `None` when verity is not enabled on it or the
/// filesystem does not support it.
pub(crate) fn measure(fd: impl AsFd, alg: HashAlg) -> std::io::Result<Option<ObjectId>> {
    let r = match alg {
        HashAlg::Sha256 => fs_ioc_measure_verity::<32>(fd, alg.kernel_id()).map(|d| d.to_vec()),
        HashAlg::Sha512 => fs_ioc_measure_verity::<64>(fd, alg.kernel_id()).map(|d| d.to_vec()),
    };
    match r {
        Ok(d) => Ok(Some(
            ObjectId::from_bytes(alg, &d).expect("kernel returned the requested digest size"),
        )),
        Err(MeasureVerityError::VerityMissing | MeasureVerityError::FilesystemNotSupported) => {
            Ok(None)
        }
        Err(MeasureVerityError::Io(e)) => Err(e),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain, non-streaming reference: build every level in memory.
    fn reference(alg: HashAlg, data: &[u8]) -> ObjectId {
        let len = alg.digest_len();
        let root = if data.is_empty() {
            vec![0; len]
        } else {
            let mut level: Vec<u8> = data.to_vec();
            let mut first = true;
            loop {
                if !first && level.len() == len {
                    break level;
                }
                first = false;
                let mut next = Vec::new();
                for chunk in level.chunks(BLOCK_SIZE) {
                    let mut blk = chunk.to_vec();
                    blk.resize(BLOCK_SIZE, 0);
                    Hasher::digest_into(alg, &[&blk], &mut next);
                }
                level = next;
            }
        };
        let mut desc = [0u8; DESCRIPTOR_SIZE];
        desc[0] = 1;
        desc[1] = alg.kernel_id();
        desc[2] = LG_BLOCK_SIZE;
        desc[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        desc[16..16 + len].copy_from_slice(&root);
        let mut out = Vec::new();
        Hasher::digest_into(alg, &[&desc], &mut out);
        ObjectId::from_bytes(alg, &out).unwrap()
    }

    #[test]
    fn streaming_matches_reference_at_level_boundaries() {
        for alg in [HashAlg::Sha256, HashAlg::Sha512] {
            let per_block = BLOCK_SIZE / alg.digest_len();
            let sizes = [
                0,
                1,
                BLOCK_SIZE - 1,
                BLOCK_SIZE,
                BLOCK_SIZE + 1,
                BLOCK_SIZE * per_block,
                BLOCK_SIZE * per_block + 1,
                BLOCK_SIZE * (per_block + 1),
                // Several level-1 blocks, and groups of eight data blocks plus a remainder.
                BLOCK_SIZE * (3 * per_block + 13) + 5,
            ];
            for size in sizes {
                let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
                let want = reference(alg, &data);
                assert_eq!(
                    FsVerityHasher::digest(alg, &data),
                    want,
                    "{alg:?} size {size}"
                );
                // Odd feeding patterns: small pieces (never a whole block at once), and a
                // partial block first, so whole-block groups start at every alignment of the
                // pending digests.
                let mut h = FsVerityHasher::new(alg);
                for c in data.chunks(1000) {
                    h.update(c);
                }
                assert_eq!(h.finish(), want, "{alg:?} size {size} chunked");
                for head in [100, BLOCK_SIZE, 3 * BLOCK_SIZE + 7] {
                    let head = head.min(data.len());
                    let mut h = FsVerityHasher::new(alg);
                    h.update(&data[..head]);
                    h.update(&data[head..]);
                    assert_eq!(h.finish(), want, "{alg:?} size {size} head {head}");
                }
            }
        }
    }

    #[test]
    fn digest_many_matches_one_by_one() {
        for alg in [HashAlg::Sha256, HashAlg::Sha512] {
            let sizes = [
                0usize,
                1,
                65,
                4095,
                4096,
                4097,
                12_000,
                8 * 4096,
                70 * 4096 + 3,
                5,
            ];
            let files: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(k, &n)| {
                    (0..n)
                        .map(|i| (i * 13 + k * 101 + i / 4096) as u8)
                        .collect()
                })
                .collect();
            let refs: Vec<&[u8]> = files.iter().map(|f| f.as_slice()).collect();
            let many = FsVerityHasher::digest_many(alg, &refs);
            for ((f, got), size) in files.iter().zip(many).zip(sizes) {
                assert_eq!(got, reference(alg, f), "{alg:?} size {size}");
            }
        }
    }

    #[test]
    fn empty_file_known_digest() {
        // `fsverity digest --hash-alg=sha256 --block-size=4096 /dev/null` (empty regular file)
        assert_eq!(
            FsVerityHasher::digest(HashAlg::Sha256, b"").to_string(),
            "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
        );
    }
}
