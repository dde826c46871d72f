//! Writing objects: `objects/XX/<rest>`, named by fs-verity digest.
//!
//! Every object is written into an anonymous `O_TMPFILE` in `objects/` (mode 0400: objects
//! are image content, possibly from files that were not world-readable), hashed while it is
//! written, given fs-verity where the filesystem supports it, and only then linked under its
//! name. A crash leaves no partial object behind, and an existing object of the same name is
//! reused only after a cheap check (its size, and its kernel fs-verity digest when available).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;

use anyhow::{Context, bail, ensure};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::fsverity::{self, FsVerityHasher, KernelVerity};
use super::pool::BodySource;
use super::{
    LINK_EMPTY_PATH, LINK_PROC_PATH, LINK_UNKNOWN, ObjectId, Repository, SourceTrust, StoreMethod,
    proc_fd_path, tmp_name,
};

/// Read size when hashing and copying a source file. Large enough that syscall overhead
/// vanishes next to hashing, small enough to stay in L2/L3 while both hashes run over it.
pub(crate) const READ_CHUNK: usize = 1 << 20;

/// Permissions of object files: readable by the repository owner only. (composefs-rs uses
/// 0644, which leaks content of files that were private in the image's source.)
const OBJECT_MODE: u32 = 0o400;

/// A temporary file in `objects/` that becomes an object once its digest is known.
pub(crate) struct TmpObject {
    pub(crate) file: File,
    /// `Some(name)` when the filesystem lacked O_TMPFILE and a named file had to be used.
    pub(crate) name: Option<String>,
}

impl std::fmt::Debug for TmpObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TmpObject")
            .field("name", &self.name)
            .finish()
    }
}

/// An object written incrementally from memory (a body that arrived as tar bytes, a
/// splitstream being assembled).
pub(crate) struct ObjectWriter<'r> {
    repo: &'r Repository,
    tmp: TmpObject,
    hasher: FsVerityHasher,
    written: u64,
}

impl std::fmt::Debug for ObjectWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWriter")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl<'r> ObjectWriter<'r> {
    pub(crate) fn new(repo: &'r Repository) -> anyhow::Result<Self> {
        Ok(ObjectWriter {
            repo,
            tmp: repo.create_tmp_object()?,
            hasher: FsVerityHasher::new(repo.algorithm()),
            written: 0,
        })
    }

    pub(crate) fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        write_all_at(self.tmp.file.as_fd(), data, self.written)
            .with_context(|| format!("writing object tmpfile at offset {}", self.written))?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Name the object; returns its id and whether it was new.
    pub(crate) fn finish(self) -> anyhow::Result<(ObjectId, StoreMethod)> {
        let id = self.hasher.finish();
        let method = self.repo.commit_tmp_object(self.tmp, &id, self.written)?;
        Ok((id, method))
    }
}

/// `pwrite` all of `data` at `offset`.
pub(crate) fn write_all_at(
    fd: BorrowedFd<'_>,
    mut data: &[u8],
    mut offset: u64,
) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = rustix::io::pwrite(fd, data, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

/// `pread` until `buf` is full or EOF; returns the bytes read.
pub(crate) fn read_full_at(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    mut offset: u64,
) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::pread(fd, &mut buf[got..], offset) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                offset += n as u64;
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

impl Repository {
    /// An anonymous `O_TMPFILE` in `objects/<dir>`.
    fn open_tmpfile_in(&self, dir: &str) -> rustix::io::Result<TmpObject> {
        let fd = rustix::fs::openat(
            &self.objects,
            dir,
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(OBJECT_MODE),
        )?;
        Ok(TmpObject {
            file: File::from(fd),
            name: None,
        })
    }

    /// Create the fan-out directory `objects/<dir>` if it is missing.
    fn make_fanout_dir(&self, dir: &str) -> anyhow::Result<()> {
        match rustix::fs::mkdirat(&self.objects, dir, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("creating objects/{dir}")),
        }
    }

    /// A fresh temporary object file in `objects/`.
    pub(crate) fn create_tmp_object(&self) -> anyhow::Result<TmpObject> {
        match self.open_tmpfile_in(".") {
            Ok(tmp) => return Ok(tmp),
            // Filesystems without O_TMPFILE (some FUSE ones): fall back to a named file.
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating a tmpfile in {}", self.rel("objects")));
            }
        }
        let name = tmp_name(".tmp-object-");
        let fd = rustix::fs::openat(
            &self.objects,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(OBJECT_MODE),
        )
        .with_context(|| format!("creating {}", self.rel(&format!("objects/{name}"))))?;
        Ok(TmpObject {
            file: File::from(fd),
            name: Some(name),
        })
    }

    /// A fresh temporary file for object `id`, made in the object's own fan-out directory
    /// `objects/XX/` when possible. XFS allocates an inode in the allocation group of its
    /// directory, and both creating a tmpfile and linking it lock that group's inode header:
    /// with every tmpfile in `objects/`, parallel importers queued on one lock (seen as
    /// wake-ups from `xfs_buf_unlock` in profiles); the 256 fan-out directories are spread
    /// over all groups.
    pub(crate) fn create_tmp_object_for(&self, id: &ObjectId) -> anyhow::Result<TmpObject> {
        let path = id.object_path();
        self.create_tmp_object_in(&path[..2])
    }

    /// A fresh temporary file for an object whose name is not known yet (a clone that is
    /// hashed afterwards): in the fan-out directories in turn, for the reason given at
    /// [`create_tmp_object_for`](Self::create_tmp_object_for).
    pub(crate) fn create_tmp_object_anywhere(&self) -> anyhow::Result<TmpObject> {
        let n = self.next_fanout.fetch_add(1, Ordering::Relaxed);
        let mut dir = String::with_capacity(2);
        super::push_hex(&mut dir, &[n]);
        self.create_tmp_object_in(&dir)
    }

    fn create_tmp_object_in(&self, dir: &str) -> anyhow::Result<TmpObject> {
        for attempt in 0..2 {
            match self.open_tmpfile_in(dir) {
                Ok(tmp) => return Ok(tmp),
                Err(Errno::NOENT) if attempt == 0 => self.make_fanout_dir(dir)?,
                // Anything else (no O_TMPFILE here, say): the general path decides.
                Err(_) => break,
            }
        }
        self.create_tmp_object()
    }

    /// Is the object `id` present and intact enough to reuse? Checks its size, and its kernel
    /// fs-verity digest when it has one; a secure repository requires one.
    fn existing_object_ok(&self, id: &ObjectId, size: u64) -> anyhow::Result<bool> {
        let fd = match rustix::fs::openat(
            &self.objects,
            id.object_path(),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(false),
            // A symlink or other junk under an object's name: replace it.
            Err(Errno::LOOP) => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("opening object {id}")),
        };
        let st = rustix::fs::fstat(&fd).with_context(|| format!("checking object {id}"))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_size as u64 != size
        {
            return Ok(false);
        }
        match fsverity::measure(&fd, self.alg).with_context(|| format!("measuring object {id}"))? {
            Some(got) => Ok(&got == id),
            None => Ok(self.insecure),
        }
    }

    /// Turn a fully written temporary file into object `id` (`size` bytes): fs-verity where
    /// supported (required in a secure repository, and the kernel's digest must equal `id`),
    /// then link it in, unless an intact object of that name already exists.
    pub(crate) fn commit_tmp_object(
        &self,
        tmp: TmpObject,
        id: &ObjectId,
        size: u64,
    ) -> anyhow::Result<StoreMethod> {
        let cleanup = |tmp: &TmpObject| {
            if let Some(name) = &tmp.name {
                let _ = rustix::fs::unlinkat(&self.objects, name.as_str(), AtFlags::empty());
            }
        };
        if self.existing_object_ok(id, size)? {
            cleanup(&tmp);
            return Ok(StoreMethod::AlreadyPresent);
        }
        self.link_tmp_object(tmp, id)
    }

    /// [`Repository::commit_tmp_object`] for a caller that has just found no intact object
    /// `id`: skips that check (a writer racing us is still caught, at `linkat`'s EEXIST).
    fn link_tmp_object(&self, tmp: TmpObject, id: &ObjectId) -> anyhow::Result<StoreMethod> {
        let ctx = || format!("storing object {id}");
        if tmp.name.is_none() && self.insecure && self.no_verity.load(Ordering::Relaxed) {
            // Nothing to enable, so no read-only reopen: link the tmpfile as it is.
            return self
                .link_into_place(tmp.file.as_fd(), None, id)
                .with_context(ctx);
        }
        // fs-verity refuses files with a writable fd open: reopen read-only, drop the writer.
        let ro: OwnedFd = match &tmp.name {
            None => rustix::fs::open(
                proc_fd_path(tmp.file.as_fd()).as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            ),
            Some(name) => rustix::fs::openat(
                &self.objects,
                name.as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            ),
        }
        .with_context(ctx)?;
        let TmpObject { file, name } = tmp;
        drop(file);
        let r = self.protect_and_link(&ro, name.as_deref(), id);
        if r.is_err()
            && let Some(name) = &name
        {
            let _ = rustix::fs::unlinkat(&self.objects, name.as_str(), AtFlags::empty());
        }
        r.with_context(ctx)
    }

    fn protect_and_link(
        &self,
        ro: &OwnedFd,
        name: Option<&str>,
        id: &ObjectId,
    ) -> anyhow::Result<StoreMethod> {
        match fsverity::enable(ro, self.alg).context("enabling fs-verity")? {
            KernelVerity::Enabled => {
                let got = fsverity::measure(ro, self.alg).context("measuring fs-verity")?;
                ensure!(
                    got.as_ref() == Some(id),
                    "the kernel measured fs-verity digest {got:?}: the content changed while it \
                     was being imported"
                );
            }
            KernelVerity::Unsupported if self.insecure => {
                self.no_verity.store(true, Ordering::Relaxed);
            }
            KernelVerity::Unsupported => bail!(
                "the filesystem has no fs-verity, but the repository requires it (its meta.json \
                 has fs-verity)"
            ),
        }
        self.link_into_place(ro.as_fd(), name, id)
    }

    /// Give the finished object file `fd` (anonymous, or the tmp file `name`) its name.
    fn link_into_place(
        &self,
        fd: BorrowedFd<'_>,
        name: Option<&str>,
        id: &ObjectId,
    ) -> anyhow::Result<StoreMethod> {
        let path = id.object_path();
        let dir = &path[..2];
        for attempt in 0..2 {
            let r = match name {
                None => self.link_anonymous(fd, &path),
                Some(name) => rustix::fs::renameat_with(
                    &self.objects,
                    name,
                    &self.objects,
                    path.as_str(),
                    rustix::fs::RenameFlags::NOREPLACE,
                ),
            };
            match r {
                Ok(()) => return Ok(StoreMethod::Copied),
                Err(Errno::NOENT) if attempt == 0 => self.make_fanout_dir(dir)?,
                Err(Errno::EXIST) => {
                    // A concurrent writer, or a damaged object we decided not to trust.
                    if self.existing_object_ok(id, rustix::fs::fstat(fd)?.st_size as u64)? {
                        if let Some(name) = name {
                            let _ = rustix::fs::unlinkat(&self.objects, name, AtFlags::empty());
                        }
                        return Ok(StoreMethod::AlreadyPresent);
                    }
                    return self.replace_object(fd, name, &path);
                }
                Err(e) => return Err(e).with_context(|| format!("linking objects/{path}")),
            }
        }
        bail!("objects/{dir} disappeared while linking objects/{path}")
    }

    /// `linkat` the anonymous file `fd` to `objects/<path>`: by `AT_EMPTY_PATH` where we may
    /// (no path walk), else through `/proc/self/fd`. `ENOENT` means the fan-out directory is
    /// missing.
    fn link_anonymous(&self, fd: BorrowedFd<'_>, path: &str) -> rustix::io::Result<()> {
        let state = self.link_empty_path.load(Ordering::Relaxed);
        if state != LINK_PROC_PATH {
            match rustix::fs::linkat(fd, "", &self.objects, path, AtFlags::EMPTY_PATH) {
                Ok(()) => {
                    self.link_empty_path
                        .store(LINK_EMPTY_PATH, Ordering::Relaxed);
                    return Ok(());
                }
                // Without CAP_DAC_READ_SEARCH the kernel answers ENOENT, as it does for a
                // missing directory: the /proc path below tells the two apart.
                Err(Errno::NOENT) if state == LINK_UNKNOWN => {}
                Err(e) => return Err(e),
            }
        }
        let r = rustix::fs::linkat(
            rustix::fs::CWD,
            proc_fd_path(fd).as_str(),
            &self.objects,
            path,
            AtFlags::SYMLINK_FOLLOW,
        );
        if state == LINK_UNKNOWN && r.is_ok() {
            self.link_empty_path
                .store(LINK_PROC_PATH, Ordering::Relaxed);
        }
        r
    }

    /// Atomically put `ro` in place of a damaged object at `path`.
    fn replace_object(
        &self,
        ro: BorrowedFd<'_>,
        name: Option<&str>,
        path: &str,
    ) -> anyhow::Result<StoreMethod> {
        let tmp;
        let from = match name {
            Some(n) => n,
            None => {
                tmp = tmp_name(".tmp-object-");
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    proc_fd_path(ro).as_str(),
                    &self.objects,
                    tmp.as_str(),
                    AtFlags::SYMLINK_FOLLOW,
                )
                .with_context(|| format!("linking a replacement for objects/{path}"))?;
                tmp.as_str()
            }
        };
        if let Err(e) = rustix::fs::renameat(&self.objects, from, &self.objects, path) {
            let _ = rustix::fs::unlinkat(&self.objects, from, AtFlags::empty());
            return Err(e).with_context(|| format!("replacing damaged objects/{path}"));
        }
        Ok(StoreMethod::Copied)
    }

    /// Store `data` as an object.
    ///
    /// # Errors
    /// I/O errors, or fs-verity failures in a secure repository.
    pub fn store_bytes(&self, data: &[u8]) -> anyhow::Result<ObjectId> {
        let id = FsVerityHasher::digest(self.alg, data);
        if self.existing_object_ok(&id, data.len() as u64)? {
            return Ok(id);
        }
        let tmp = self.create_tmp_object_for(&id)?;
        write_all_at(tmp.file.as_fd(), data, 0).with_context(|| format!("writing object {id}"))?;
        // Just found absent: link without asking again (a racing writer shows as EEXIST).
        self.link_tmp_object(tmp, &id)?;
        Ok(id)
    }

    /// Store an object that `produce` writes front to back through the sink it is given
    /// (an EROFS image, say): hashed and written as it comes, so nothing of it is held in
    /// memory beyond one write buffer.
    ///
    /// # Errors
    /// `produce` failed, or I/O errors.
    #[cfg_attr(not(feature = "erofs"), allow(dead_code))]
    pub(crate) fn store_streamed(
        &self,
        produce: impl FnOnce(&mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<u64>,
    ) -> anyhow::Result<ObjectId> {
        /// Write buffer of a streamed object: large writes, bounded memory.
        const STREAM_BUF: usize = 1 << 20;
        let tmp = self.create_tmp_object()?;
        let mut hasher = FsVerityHasher::new(self.alg);
        let mut buf: Vec<u8> = Vec::with_capacity(STREAM_BUF);
        let mut offset = 0u64;
        let file = tmp.file.as_fd();
        // Hashed a buffer (or a large piece) at a time, not per piece: producers write many
        // small pieces, and whole runs of blocks are what the hasher does eight at a time.
        let out = |b: &[u8], hasher: &mut FsVerityHasher, offset: &mut u64| {
            hasher.update(b);
            write_all_at(file, b, *offset)?;
            *offset += b.len() as u64;
            std::io::Result::Ok(())
        };
        let size = produce(&mut |b: &[u8]| {
            if buf.len() + b.len() > STREAM_BUF {
                out(&buf, &mut hasher, &mut offset)?;
                buf.clear();
            }
            if b.len() >= STREAM_BUF {
                out(b, &mut hasher, &mut offset)
            } else {
                buf.extend_from_slice(b);
                Ok(())
            }
        })
        .context("writing a streamed object")?;
        out(&buf, &mut hasher, &mut offset).context("writing a streamed object")?;
        ensure!(
            size == offset,
            "a streamed object reported {size} bytes but wrote {offset}"
        );
        let id = hasher.finish();
        self.commit_tmp_object(tmp, &id, size)?;
        Ok(id)
    }

    /// Store the expanded content of a sparse file as an object: `real_size` bytes, zero
    /// except for `segments` (offset, length; sorted, not overlapping, within `real_size`),
    /// whose bytes `fill` supplies in order, a buffer at a time. Holes are hashed but never
    /// written, so the object is as sparse on disk as the filesystem allows.
    ///
    /// # Errors
    /// `fill` failed, a segment lies outside the file, or I/O errors.
    #[cfg_attr(not(feature = "erofs"), allow(dead_code))]
    pub(crate) fn store_sparse(
        &self,
        real_size: u64,
        segments: &[(u64, u64)],
        fill: &mut dyn FnMut(&mut [u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<ObjectId> {
        /// A buffer of zeros for hashing holes, and the largest piece of data read at once.
        const PIECE: usize = 256 << 10;
        static ZEROS: [u8; PIECE] = [0; PIECE];
        let tmp = self.create_tmp_object_anywhere()?;
        let mut hasher = FsVerityHasher::new(self.alg);
        let hash_zeros = |hasher: &mut FsVerityHasher, mut n: u64| {
            while n > 0 {
                let k = n.min(PIECE as u64) as usize;
                hasher.update(&ZEROS[..k]);
                n -= k as u64;
            }
        };
        let mut buf = vec![0u8; PIECE];
        let mut pos = 0u64;
        for &(offset, length) in segments {
            let end = offset
                .checked_add(length)
                .filter(|&e| offset >= pos && e <= real_size)
                .with_context(|| {
                    format!("sparse segment {offset}+{length} outside a {real_size}-byte file")
                })?;
            hash_zeros(&mut hasher, offset - pos);
            let mut at = offset;
            while at < end {
                let k = (end - at).min(PIECE as u64) as usize;
                fill(&mut buf[..k])?;
                write_all_at(tmp.file.as_fd(), &buf[..k], at)
                    .with_context(|| format!("writing a sparse object at offset {at}"))?;
                hasher.update(&buf[..k]);
                at += k as u64;
            }
            pos = end;
        }
        hash_zeros(&mut hasher, real_size - pos);
        rustix::fs::ftruncate(&tmp.file, real_size).context("sizing a sparse object")?;
        let id = hasher.finish();
        self.commit_tmp_object(tmp, &id, real_size)?;
        Ok(id)
    }

    /// Store a regular-file body of `size` bytes from `src` as an object.
    ///
    /// The data path is `FICLONE` (a reflink: no data copied) when source and repository share
    /// a filesystem that supports it, and otherwise a copy from the same buffer that is read for
    /// hashing. The object's bytes are read exactly once, front to back, and every chunk is
    /// passed to `feed` in order (the caller hashes the layer tar from the same buffer): the
    /// source's bytes when `trust` trusts `src` (it is hashed first, then cloned), else the
    /// clone's (see [`SourceTrust`]), so what `feed` saw is what the object holds.
    ///
    /// # Errors
    /// `src` is not a regular file of exactly `size` bytes, it changed while being read (caught
    /// by the kernel's fs-verity digest where available, or as a size change), or I/O errors.
    pub fn store_file(
        &self,
        src: BorrowedFd<'_>,
        size: u64,
        trust: SourceTrust,
        feed: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<(ObjectId, StoreMethod)> {
        let st = rustix::fs::fstat(src).context("inspecting the source file")?;
        ensure!(
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile,
            "the source is not a regular file (mode {:o})",
            st.st_mode
        );
        ensure!(
            st.st_size as u64 == size,
            "the source file has {} bytes, but {size} were announced",
            st.st_size
        );
        if !trust.trusts(&st) {
            return self.store_file_verified(src, st.st_dev, size, feed);
        }
        let known_reflink = self
            .reflink_ok_from
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&st.st_dev);
        if known_reflink {
            // Cloning needs no data, so hash first: an object that already exists then costs
            // no temporary file at all (creating and discarding a reflinked O_TMPFILE costs
            // more than the hashing of a small body).
            let id = self.hash_source(src, size, feed, None)?;
            let tmp = match self.reuse_or_clone(src, st.st_dev, &id, size)? {
                Ok(method) => return Ok((id, method)),
                Err(tmp) => tmp,
            };
            // The filesystem changed its mind (e.g. out of space for clone metadata): copy,
            // reading the source a second time, which only this rare path does.
            let copied = self.hash_source(src, size, &mut |_| {}, Some(&tmp))?;
            ensure!(
                copied == id,
                "the source file changed while it was imported"
            );
            let method = self.link_tmp_object(tmp, &id)?;
            return Ok((id, method));
        }
        let tmp = self.create_tmp_object()?;
        let reflinked = self.try_reflink(src, st.st_dev, &tmp)?;
        let id = self.hash_source(src, size, feed, (!reflinked).then_some(&tmp))?;
        if reflinked {
            self.reflink_ok_from
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(st.st_dev);
            self.check_clone_size(&tmp, size)?;
        }
        self.commit_stored(tmp, &id, size, reflinked)
    }

    /// [`store_file`](Self::store_file) for a source that others may change: the object is
    /// made first (cloned, or copied from the buffer that is hashed) and named from its own
    /// bytes, so the name holds whatever the source does meanwhile.
    fn store_file_verified(
        &self,
        src: BorrowedFd<'_>,
        src_dev: u64,
        size: u64,
        feed: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<(ObjectId, StoreMethod)> {
        let (tmp, id, reflinked) = match self.clone_source(src, src_dev, size)? {
            Some(tmp) => {
                let id = self.hash_source(tmp.file.as_fd(), size, feed, None)?;
                (tmp, id, true)
            }
            None => {
                let tmp = self.create_tmp_object_anywhere()?;
                let id = self.hash_source(src, size, feed, Some(&tmp))?;
                (tmp, id, false)
            }
        };
        self.commit_stored(tmp, &id, size, reflinked)
    }

    /// Link a tmpfile holding object `id`, made by reflink or by copying.
    fn commit_stored(
        &self,
        tmp: TmpObject,
        id: &ObjectId,
        size: u64,
        reflinked: bool,
    ) -> anyhow::Result<(ObjectId, StoreMethod)> {
        let method = self.commit_tmp_object(tmp, id, size)?;
        Ok((
            id.clone(),
            match method {
                StoreMethod::AlreadyPresent => StoreMethod::AlreadyPresent,
                _ if reflinked => StoreMethod::Reflinked,
                m => m,
            },
        ))
    }

    /// Clone `src` (`size` bytes, on device `src_dev`) into a fresh tmpfile, for an object that
    /// is named afterwards by reading the clone. `None` when this filesystem cannot clone from
    /// `src`: the caller then copies from a buffer it hashes.
    ///
    /// # Errors
    /// The clone does not have `size` bytes (the source changed size), or I/O errors.
    pub(crate) fn clone_source(
        &self,
        src: BorrowedFd<'_>,
        src_dev: u64,
        size: u64,
    ) -> anyhow::Result<Option<TmpObject>> {
        let tmp = self.create_tmp_object_anywhere()?;
        if !self.try_reflink(src, src_dev, &tmp)? {
            self.discard_tmp(&tmp);
            return Ok(None);
        }
        if let Err(e) = self.check_clone_size(&tmp, size) {
            self.discard_tmp(&tmp);
            return Err(e);
        }
        Ok(Some(tmp))
    }

    /// Remove a named tmpfile that will not become an object (anonymous ones vanish on close).
    pub(crate) fn discard_tmp(&self, tmp: &TmpObject) {
        if let Some(name) = &tmp.name {
            let _ = rustix::fs::unlinkat(&self.objects, name.as_str(), AtFlags::empty());
        }
    }

    /// Store bodies whose bytes were already read (by the caller, which hashed the layer tar
    /// from them): each `data[i]` with where its object comes from, `sources[i]`. Each object is
    /// named from its `data` (all digests computed together, see
    /// [`FsVerityHasher::digest_many`]) and made by reflinking a trusted source where possible,
    /// by linking the clone the bytes were read from, or by writing `data`. One result per
    /// body, in order: errors are the source having changed size since it was read, or I/O
    /// errors.
    pub(crate) fn store_read_bodies(
        &self,
        sources: Vec<BodySource>,
        data: &[&[u8]],
    ) -> Vec<anyhow::Result<(ObjectId, StoreMethod)>> {
        let ids = FsVerityHasher::digest_many(self.alg, data);
        sources
            .into_iter()
            .zip(ids)
            .zip(data)
            .map(|((source, id), data)| match source {
                BodySource::Trusted { fd, dev } => {
                    self.store_hashed_body(Some((fd.as_fd(), dev)), data, id)
                }
                BodySource::Clone(tmp) => {
                    let size = data.len() as u64;
                    self.commit_stored(tmp, &id, size, true)
                        .map(|(_, m)| (id, m))
                }
                BodySource::Copy => self.store_hashed_body(None, data, id),
            })
            .collect()
    }

    /// Object `id` (`size` bytes, the content of `src`) is wanted: reuse an intact existing
    /// one, or make it by reflinking `src`. When the filesystem cannot clone from `src`, the
    /// fresh tmpfile comes back for the caller to copy into.
    fn reuse_or_clone(
        &self,
        src: BorrowedFd<'_>,
        src_dev: u64,
        id: &ObjectId,
        size: u64,
    ) -> anyhow::Result<Result<StoreMethod, TmpObject>> {
        if self.existing_object_ok(id, size)? {
            return Ok(Ok(StoreMethod::AlreadyPresent));
        }
        let tmp = self.create_tmp_object_for(id)?;
        if !self.try_reflink(src, src_dev, &tmp)? {
            return Ok(Err(tmp));
        }
        if let Err(e) = self.check_clone_size(&tmp, size) {
            self.discard_tmp(&tmp);
            return Err(e);
        }
        Ok(Ok(match self.link_tmp_object(tmp, id)? {
            StoreMethod::AlreadyPresent => StoreMethod::AlreadyPresent,
            _ => StoreMethod::Reflinked,
        }))
    }

    /// [`store_read_bodies`](Self::store_read_bodies) for one body whose object id is known:
    /// reflinked from its trusted source `(fd, dev)` where possible, else written from `data`.
    fn store_hashed_body(
        &self,
        src: Option<(BorrowedFd<'_>, u64)>,
        data: &[u8],
        id: ObjectId,
    ) -> anyhow::Result<(ObjectId, StoreMethod)> {
        let tmp = match src {
            Some((fd, dev)) => match self.reuse_or_clone(fd, dev, &id, data.len() as u64)? {
                Ok(method) => return Ok((id, method)),
                Err(tmp) => tmp,
            },
            None if self.existing_object_ok(&id, data.len() as u64)? => {
                return Ok((id, StoreMethod::AlreadyPresent));
            }
            None => self.create_tmp_object_for(&id)?,
        };
        write_all_at(tmp.file.as_fd(), data, 0).with_context(|| format!("writing object {id}"))?;
        let method = self.link_tmp_object(tmp, &id)?;
        Ok((id, method))
    }

    /// Read `src` once (`size` bytes) into the fs-verity hasher and `feed`, and into `copy_to`
    /// when given (the copy path: written from the same buffer).
    fn hash_source(
        &self,
        src: BorrowedFd<'_>,
        size: u64,
        feed: &mut dyn FnMut(&[u8]),
        copy_to: Option<&TmpObject>,
    ) -> anyhow::Result<ObjectId> {
        let mut hasher = FsVerityHasher::new(self.alg);
        let mut buf = self.take_buffer(usize::try_from(size).unwrap_or(usize::MAX));
        let mut offset = 0u64;
        let r = (|| -> anyhow::Result<()> {
            while offset < size {
                let want = (size - offset).min(buf.len() as u64) as usize;
                let n = read_full_at(src, &mut buf[..want], offset)
                    .with_context(|| format!("reading the source file at offset {offset}"))?;
                ensure!(
                    n == want,
                    "the source file ended at offset {} of {size} announced bytes",
                    offset + n as u64
                );
                let chunk = &buf[..n];
                if let Some(tmp) = copy_to {
                    write_all_at(tmp.file.as_fd(), chunk, offset)
                        .with_context(|| format!("writing object tmpfile at offset {offset}"))?;
                }
                hasher.update(chunk);
                feed(chunk);
                offset += n as u64;
            }
            Ok(())
        })();
        self.give_buffer(buf);
        r?;
        Ok(hasher.finish())
    }

    /// The clone took whatever the source held at that moment; make sure it is what was
    /// hashed, at least by size (the kernel digest check catches the rest where fs-verity
    /// exists).
    fn check_clone_size(&self, tmp: &TmpObject, size: u64) -> anyhow::Result<()> {
        let now = rustix::fs::fstat(&tmp.file).context("inspecting the reflinked object")?;
        ensure!(
            now.st_size as u64 == size,
            "the source file changed size while it was imported ({} bytes cloned, {size} hashed)",
            now.st_size
        );
        Ok(())
    }

    /// `FICLONE` `src` into `tmp`, unless this source device is known not to support it.
    /// Returns whether the clone happened.
    fn try_reflink(
        &self,
        src: BorrowedFd<'_>,
        src_dev: u64,
        tmp: &TmpObject,
    ) -> anyhow::Result<bool> {
        {
            let no = self
                .no_reflink_from
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if no.contains(&src_dev) {
                return Ok(false);
            }
        }
        match rustix::fs::ioctl_ficlone(&tmp.file, src) {
            Ok(()) => Ok(true),
            // Not supported by the filesystem (ext4, tmpfs), or not the same filesystem:
            // remember, so later files from this device skip the attempt.
            Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::NOTTY | Errno::INVAL | Errno::NOSYS) => {
                self.no_reflink_from
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(src_dev);
                Ok(false)
            }
            // Anything else (EBADF: source not readable, …) shows up again when we read it.
            Err(_) => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::HashAlg;

    #[test]
    fn proc_fd_links_when_empty_path_links_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = crate::repo::RepoOptions {
            hash: Some(HashAlg::Sha256),
            insecure: true,
        };
        let repo = Repository::open_or_create(&tmp.path().join("r"), &opts).unwrap();
        // As after a kernel refused AT_EMPTY_PATH (before 6.10, without CAP_DAC_READ_SEARCH).
        repo.link_empty_path
            .store(LINK_PROC_PATH, Ordering::Relaxed);
        let data = b"linked by its /proc/self/fd path".repeat(10);
        let id = repo.store_bytes(&data).unwrap();
        let stored = std::fs::read(tmp.path().join("r/objects").join(id.object_path())).unwrap();
        assert_eq!(stored, data);
        assert_eq!(repo.link_empty_path.load(Ordering::Relaxed), LINK_PROC_PATH);
    }
}
