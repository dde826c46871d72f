//! composefs splitstreams: a byte stream with large runs replaced by references to objects.
//!
//! File layout (all integers little-endian), as composefs-rs 0.9.4 writes it:
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | 32 | header: `"SplitStream"`, version u8 = 0, flags u16 = 0, algorithm u8 (1 sha256, 2 sha512), lg_blocksize u8 = 12, info range {u64 start, u64 end} |
//! | 32 | 80 | info: ranges of stream_refs, object_refs, stream, named_refs; content_type u64; stream_size u64 |
//! | 112 | 32/64 × n | stream_refs: raw digests (targets of named refs) |
//! | … | 32/64 × m | object_refs: raw digests, in order of first use |
//! | … | … | named_refs: zstd of `"<index>:<name>\0"` records sorted by name |
//! | … | … | stream: zstd of chunks: i64 < 0 → that many inline bytes follow; i64 ≥ 0 → object_refs index |
//!
//! Consecutive inline data is always one chunk, so the file depends only on the logical
//! content (inline bytes, external objects, named refs), never on how callers split writes.
//! Byte equality with composefs-rs also needs the same zstd (level 3, streaming, no pledged
//! size; libzstd 1.5.7 through zstd-sys 2.1.3 in both builds).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;

use anyhow::{Context, bail, ensure};

use super::objects::{ObjectWriter, read_full_at, write_all_at};
use super::{HashAlg, ObjectId, Repository};

/// `magic` of the splitstream header.
const MAGIC: [u8; 11] = *b"SplitStream";
/// Size of the fixed header.
const HEADER_SIZE: usize = 32;
/// Size of the info section this format version defines (readers accept larger ones).
const INFO_SIZE: usize = 80;
/// Largest info section accepted: it is read into memory before anything else is checked.
const MAX_INFO_SIZE: u64 = 4096;
/// Largest compressed or decompressed named-refs section accepted (it is held in memory).
const MAX_NAMED_REFS: u64 = 16 << 20;
/// zstd level composefs-rs uses (`0` selects libzstd's default, 3).
const ZSTD_LEVEL: i32 = 0;
/// Inline run buffered in memory before it spills to a scratch file. A run must be complete
/// before its length prefix can be written; a layer of only tiny files is one run of its
/// whole size, so the buffer has to be bounded.
const INLINE_MEM_MAX: usize = 4 << 20;
/// Copy buffer for moving scratch data around.
const COPY_CHUNK: usize = 1 << 20;

/// Digests in first-use order, each once.
#[derive(Default)]
struct RefTable {
    bytes: Vec<u8>,
    index: HashMap<ObjectId, usize>,
}

impl RefTable {
    fn ensure(&mut self, id: &ObjectId) -> usize {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let i = self.index.len();
        self.index.insert(id.clone(), i);
        self.bytes.extend_from_slice(id.as_bytes());
        i
    }
}

/// The pending run of inline bytes: memory first, then a scratch file.
struct InlineRun {
    mem: Vec<u8>,
    spill: Option<File>,
    spilled: u64,
}

impl InlineRun {
    fn len(&self) -> u64 {
        self.spilled + self.mem.len() as u64
    }
}

/// Writes one splitstream, streaming: zstd output goes to a scratch file, inline runs spill
/// to another beyond 4 MiB, so memory does not grow with the stream (only with
/// the number of distinct references: one digest and index entry each).
pub struct SplitStreamWriter<'r> {
    repo: &'r Repository,
    content_type: u64,
    stream_refs: RefTable,
    object_refs: RefTable,
    named_refs: BTreeMap<String, usize>,
    run: InlineRun,
    encoder: zstd::stream::write::Encoder<'static, BufWriter<File>>,
    total_size: u64,
}

impl std::fmt::Debug for SplitStreamWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitStreamWriter")
            .field("content_type", &self.content_type)
            .field("total_size", &self.total_size)
            .field("objects", &self.object_refs.index.len())
            .finish_non_exhaustive()
    }
}

impl<'r> SplitStreamWriter<'r> {
    /// Start a splitstream with `content_type` (e.g. `u64::from_le_bytes(*b"ocilayer")`).
    ///
    /// # Errors
    /// Scratch files cannot be created in the repository.
    pub fn new(repo: &'r Repository, content_type: u64) -> anyhow::Result<Self> {
        let out = repo.scratch_file()?;
        let encoder =
            zstd::stream::write::Encoder::new(BufWriter::with_capacity(64 << 10, out), ZSTD_LEVEL)
                .context("starting zstd")?;
        Ok(SplitStreamWriter {
            repo,
            content_type,
            stream_refs: RefTable::default(),
            object_refs: RefTable::default(),
            named_refs: BTreeMap::new(),
            run: InlineRun {
                mem: Vec::new(),
                spill: None,
                spilled: 0,
            },
            encoder,
            total_size: 0,
        })
    }

    /// Append inline bytes; consecutive calls form one inline chunk.
    ///
    /// # Errors
    /// Spilling to the scratch file failed.
    pub fn write_inline(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.total_size += data.len() as u64;
        if self.run.mem.len() + data.len() <= INLINE_MEM_MAX {
            self.run.mem.extend_from_slice(data);
            return Ok(());
        }
        let mem = std::mem::take(&mut self.run.mem);
        self.spill(&mem)?;
        self.run.mem = mem;
        self.run.mem.clear();
        if data.len() <= INLINE_MEM_MAX {
            self.run.mem.extend_from_slice(data);
            Ok(())
        } else {
            self.spill(data)
        }
    }

    fn spill(&mut self, data: &[u8]) -> anyhow::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.run.spill.is_none() {
            self.run.spill = Some(self.repo.scratch_file()?);
        }
        let f = self.run.spill.as_ref().expect("just created");
        write_all_at(f.as_fd(), data, self.run.spilled).context("spilling inline data")?;
        self.run.spilled += data.len() as u64;
        Ok(())
    }

    fn flush_inline(&mut self) -> anyhow::Result<()> {
        let len = self.run.len();
        if len == 0 {
            return Ok(());
        }
        let tag = -i64::try_from(len).context("inline run too long")?;
        self.encoder
            .write_all(&tag.to_le_bytes())
            .context("compressing")?;
        if self.run.spilled > 0 {
            let f = self
                .run
                .spill
                .as_ref()
                .expect("spilled implies a spill file");
            let mut buf = vec![0u8; COPY_CHUNK];
            let mut off = 0;
            while off < self.run.spilled {
                let want = (self.run.spilled - off).min(COPY_CHUNK as u64) as usize;
                let n = read_full_at(f.as_fd(), &mut buf[..want], off)
                    .context("reading spilled inline data")?;
                ensure!(n == want, "spilled inline data truncated at offset {off}");
                self.encoder.write_all(&buf[..n]).context("compressing")?;
                off += n as u64;
            }
            self.run.spilled = 0;
        }
        self.encoder
            .write_all(&self.run.mem)
            .context("compressing")?;
        self.run.mem.clear();
        Ok(())
    }

    /// Append a reference to object `id`, whose size is looked up in the repository.
    ///
    /// # Errors
    /// The object is missing or belongs to another algorithm.
    pub fn write_external(&mut self, id: &ObjectId) -> anyhow::Result<()> {
        let st = rustix::fs::statat(
            self.repo.objects_dir(),
            id.object_path(),
            rustix::fs::AtFlags::empty(),
        )
        .with_context(|| format!("object {id} referenced from a splitstream"))?;
        self.write_external_sized(id, st.st_size as u64)
    }

    /// Append a reference to object `id` of `size` bytes (counted in the stream size).
    ///
    /// # Errors
    /// `id` belongs to another algorithm than the repository.
    pub fn write_external_sized(&mut self, id: &ObjectId, size: u64) -> anyhow::Result<()> {
        ensure!(
            id.alg() == self.repo.algorithm(),
            "object {id} is not a {} digest",
            self.repo.algorithm().meta_name()
        );
        self.flush_inline()?;
        let idx = self.object_refs.ensure(id) as i64;
        self.encoder
            .write_all(&idx.to_le_bytes())
            .context("compressing")?;
        self.total_size += size;
        Ok(())
    }

    /// Add the named reference `name` → stream (or image) `stream`; it keeps `stream` alive
    /// through `cfsctl gc`. Setting a name twice keeps the last target.
    ///
    /// # Errors
    /// `name` contains NUL, or `stream` belongs to another algorithm.
    pub fn add_named_ref(&mut self, name: &str, stream: &ObjectId) -> anyhow::Result<()> {
        ensure!(!name.contains('\0'), "named ref {name:?} contains NUL");
        ensure!(
            stream.alg() == self.repo.algorithm(),
            "named ref {name:?}: {stream} is not a {} digest",
            self.repo.algorithm().meta_name()
        );
        let idx = self.stream_refs.ensure(stream);
        self.named_refs.insert(name.to_owned(), idx);
        Ok(())
    }

    /// Bytes of the logical stream so far (inline plus external).
    pub fn stream_size(&self) -> u64 {
        self.total_size
    }

    /// Complete the splitstream and store it as an object (not linked anywhere).
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self) -> anyhow::Result<ObjectId> {
        self.flush_inline()?;
        let stream_file = self
            .encoder
            .finish()
            .context("finishing zstd")?
            .into_inner()
            .map_err(|e| e.into_error())
            .context("flushing the compressed stream")?;
        let stream_len = rustix::fs::fstat(&stream_file)
            .context("sizing the compressed stream")?
            .st_size as u64;

        let mut named = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
        for (name, idx) in &self.named_refs {
            write!(named, "{idx}:{name}\0")?;
        }
        let named = named.finish()?;

        let info_start = HEADER_SIZE as u64;
        let info_end = info_start + INFO_SIZE as u64;
        let stream_refs = (info_end, info_end + self.stream_refs.bytes.len() as u64);
        let object_refs = (
            stream_refs.1,
            stream_refs.1 + self.object_refs.bytes.len() as u64,
        );
        let named_refs = (object_refs.1, object_refs.1 + named.len() as u64);
        let stream = (named_refs.1, named_refs.1 + stream_len);

        let mut head = Vec::with_capacity(HEADER_SIZE + INFO_SIZE);
        head.extend_from_slice(&MAGIC);
        head.push(0); // version
        head.extend_from_slice(&0u16.to_le_bytes()); // flags
        head.push(self.repo.algorithm().kernel_id());
        head.push(super::fsverity::LG_BLOCK_SIZE);
        head.extend_from_slice(&info_start.to_le_bytes());
        head.extend_from_slice(&info_end.to_le_bytes());
        debug_assert_eq!(head.len(), HEADER_SIZE);
        for (start, end) in [stream_refs, object_refs, stream, named_refs] {
            head.extend_from_slice(&start.to_le_bytes());
            head.extend_from_slice(&end.to_le_bytes());
        }
        head.extend_from_slice(&self.content_type.to_le_bytes());
        head.extend_from_slice(&self.total_size.to_le_bytes());
        debug_assert_eq!(head.len(), HEADER_SIZE + INFO_SIZE);

        let mut out = ObjectWriter::new(self.repo)?;
        out.write(&head)?;
        out.write(&self.stream_refs.bytes)?;
        out.write(&self.object_refs.bytes)?;
        out.write(&named)?;
        let mut buf = vec![0u8; COPY_CHUNK.min(stream_len.max(1) as usize)];
        let mut off = 0;
        while off < stream_len {
            let want = (stream_len - off).min(buf.len() as u64) as usize;
            let n = read_full_at(stream_file.as_fd(), &mut buf[..want], off)
                .context("reading the compressed stream")?;
            ensure!(n == want, "compressed stream truncated at offset {off}");
            out.write(&buf[..n])?;
            off += n as u64;
        }
        debug_assert_eq!(out.written(), stream.1);
        let (id, _) = out.finish()?;
        Ok(id)
    }
}

impl Repository {
    /// An anonymous scratch file on the repository's filesystem (gone when closed).
    pub(crate) fn scratch_file(&self) -> anyhow::Result<File> {
        let super::objects::TmpObject { file, name } = self.create_tmp_object()?;
        if let Some(name) = name {
            rustix::fs::unlinkat(
                self.objects_dir(),
                name.as_str(),
                rustix::fs::AtFlags::empty(),
            )
            .with_context(|| format!("unlinking scratch file objects/{name}"))?;
        }
        Ok(file)
    }
}

/// One chunk header of a splitstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// This many inline bytes follow (read them with [`SplitStreamReader::read_inline`]).
    Inline(u64),
    /// The whole content of an object.
    External(ObjectId),
}

/// A body read by [`SplitStreamReader::read_body`].
#[derive(Debug)]
#[cfg_attr(not(feature = "erofs"), allow(dead_code))]
pub(crate) enum Body {
    Inline(Vec<u8>),
    External(ObjectId),
}

/// Reads a splitstream (ours or composefs-rs's, including its pre-`repr(C)` header layout).
pub struct SplitStreamReader {
    content_type: u64,
    stream_size: u64,
    object_refs: Vec<ObjectId>,
    named_refs: Vec<(String, ObjectId)>,
    decoder: zstd::stream::read::Decoder<'static, BufReader<std::io::Take<File>>>,
    /// Inline bytes left in the current chunk.
    inline_left: u64,
    /// Position in the logical stream, for messages.
    pos: u64,
}

impl std::fmt::Debug for SplitStreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitStreamReader")
            .field("content_type", &self.content_type)
            .field("stream_size", &self.stream_size)
            .field("object_refs", &self.object_refs.len())
            .field("named_refs", &self.named_refs)
            .finish_non_exhaustive()
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl SplitStreamReader {
    /// Open the splitstream object `id`; with `expected_content_type`, refuse other types.
    ///
    /// # Errors
    /// Missing object, malformed splitstream, or another content type.
    pub fn open(
        repo: &Repository,
        id: &ObjectId,
        expected_content_type: Option<u64>,
    ) -> anyhow::Result<Self> {
        let file = repo.open_object(id)?;
        Self::from_file(file, repo.algorithm(), expected_content_type)
            .with_context(|| format!("reading splitstream {id}"))
    }

    /// Parse a splitstream from `file` (positioned anywhere; it is read with `pread`).
    ///
    /// # Errors
    /// Malformed splitstream, another algorithm or content type.
    pub fn from_file(
        file: File,
        alg: HashAlg,
        expected_content_type: Option<u64>,
    ) -> anyhow::Result<Self> {
        let file_size = rustix::fs::fstat(&file)?.st_size as u64;
        let mut h = [0u8; HEADER_SIZE];
        ensure!(
            read_full_at(file.as_fd(), &mut h, 0)? == HEADER_SIZE,
            "shorter than a splitstream header"
        );
        // (version, algorithm, lg_blocksize, info range)
        let (version, algorithm, lg, info) = if h[..11] == MAGIC {
            (h[11], h[14], h[15], (le64(&h, 16), le64(&h, 24)))
        } else if h[18..29] == MAGIC {
            // Written by composefs-rs before its header was repr(C): info first, magic at 18.
            (h[29], h[30], h[31], (le64(&h, 0), le64(&h, 8)))
        } else {
            bail!("not a splitstream (bad magic)");
        };
        ensure!(version == 0, "splitstream version {version} unknown");
        ensure!(
            algorithm == alg.kernel_id(),
            "splitstream algorithm {algorithm}, repository uses {}",
            alg.kernel_id()
        );
        ensure!(
            lg == super::fsverity::LG_BLOCK_SIZE,
            "splitstream block size 2^{lg} unsupported"
        );
        let read_range =
            |(start, end): (u64, u64), max: u64, what: &str| -> anyhow::Result<Vec<u8>> {
                ensure!(
                    start <= end && end <= file_size && end - start <= max,
                    "{what} range {start}..{end} invalid in a {file_size}-byte file"
                );
                let mut v = vec![0u8; (end - start) as usize];
                ensure!(
                    read_full_at(file.as_fd(), &mut v, start)? == v.len(),
                    "{what} truncated"
                );
                Ok(v)
            };
        let info_bytes = read_range(info, MAX_INFO_SIZE, "info section")?;
        ensure!(
            info_bytes.len() >= INFO_SIZE,
            "info section has {} bytes, needs {INFO_SIZE}",
            info_bytes.len()
        );
        let range = |i: usize| (le64(&info_bytes, i * 16), le64(&info_bytes, i * 16 + 8));
        let (stream_refs_r, object_refs_r, stream_r, named_refs_r) =
            (range(0), range(1), range(2), range(3));
        let content_type = le64(&info_bytes, 64);
        let stream_size = le64(&info_bytes, 72);
        if let Some(want) = expected_content_type {
            ensure!(
                content_type == want,
                "content type {:?}, expected {:?}",
                String::from_utf8_lossy(&content_type.to_le_bytes()),
                String::from_utf8_lossy(&want.to_le_bytes())
            );
        }
        let digests = |bytes: Vec<u8>, what: &str| -> anyhow::Result<Vec<ObjectId>> {
            ensure!(
                bytes.len().is_multiple_of(alg.digest_len()),
                "{what}: {} bytes is not a whole number of digests",
                bytes.len()
            );
            Ok(bytes
                .chunks(alg.digest_len())
                .map(|c| ObjectId::from_bytes(alg, c).expect("chunk of digest length"))
                .collect())
        };
        let stream_refs = digests(
            read_range(stream_refs_r, file_size, "stream refs")?,
            "stream refs",
        )?;
        let object_refs = digests(
            read_range(object_refs_r, file_size, "object refs")?,
            "object refs",
        )?;
        let named_raw = read_range(named_refs_r, MAX_NAMED_REFS, "named refs")?;
        let mut named_text = Vec::new();
        zstd::stream::read::Decoder::new(&named_raw[..])
            .context("named refs")?
            .take(MAX_NAMED_REFS + 1)
            .read_to_end(&mut named_text)
            .context("decompressing named refs")?;
        ensure!(
            named_text.len() as u64 <= MAX_NAMED_REFS,
            "named refs larger than {MAX_NAMED_REFS} bytes"
        );
        let mut named_refs = Vec::new();
        let mut rest = &named_text[..];
        while !rest.is_empty() {
            let end = rest
                .iter()
                .position(|&b| b == 0)
                .context("named refs: unterminated record")?;
            let rec = std::str::from_utf8(&rest[..end]).context("named refs: not UTF-8")?;
            let (idx, name) = rec
                .split_once(':')
                .with_context(|| format!("named ref {rec:?} has no ':'"))?;
            let idx: usize = idx
                .parse()
                .with_context(|| format!("named ref {rec:?}: bad index"))?;
            let target = stream_refs
                .get(idx)
                .with_context(|| format!("named ref {rec:?}: index out of range"))?;
            named_refs.push((name.to_owned(), target.clone()));
            rest = &rest[end + 1..];
        }
        named_refs.sort_by(|a, b| a.0.cmp(&b.0));

        ensure!(
            stream_r.0 <= stream_r.1 && stream_r.1 <= file_size,
            "stream range {}..{} invalid in a {file_size}-byte file",
            stream_r.0,
            stream_r.1
        );
        let mut f = file;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(stream_r.0))?;
        let decoder = zstd::stream::read::Decoder::new(f.take(stream_r.1 - stream_r.0))
            .context("starting zstd on the stream")?;
        Ok(SplitStreamReader {
            content_type,
            stream_size,
            object_refs,
            named_refs,
            decoder,
            inline_left: 0,
            pos: 0,
        })
    }

    /// The content type.
    pub fn content_type(&self) -> u64 {
        self.content_type
    }

    /// The size of the logical stream recorded in the info section.
    pub fn stream_size(&self) -> u64 {
        self.stream_size
    }

    /// Referenced objects in first-use order.
    pub fn object_refs(&self) -> &[ObjectId] {
        &self.object_refs
    }

    /// Named references, sorted by name.
    pub fn named_refs(&self) -> &[(String, ObjectId)] {
        &self.named_refs
    }

    /// The target of named reference `name`.
    pub fn named_ref(&self, name: &str) -> Option<&ObjectId> {
        self.named_refs
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.named_refs[i].1)
    }

    /// The next chunk; `None` at the end. Unread inline bytes of the current chunk are an error.
    ///
    /// # Errors
    /// Malformed stream.
    pub fn next_chunk(&mut self) -> anyhow::Result<Option<Chunk>> {
        ensure!(
            self.inline_left == 0,
            "{} inline bytes at stream offset {} not consumed",
            self.inline_left,
            self.pos
        );
        let mut tag = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            let n = self
                .decoder
                .read(&mut tag[got..])
                .with_context(|| format!("decompressing at stream offset {}", self.pos))?;
            if n == 0 {
                ensure!(
                    got == 0,
                    "stream ends inside a chunk header at offset {}",
                    self.pos
                );
                return Ok(None);
            }
            got += n;
        }
        let tag = i64::from_le_bytes(tag);
        if tag < 0 {
            self.inline_left = tag.unsigned_abs();
            Ok(Some(Chunk::Inline(self.inline_left)))
        } else {
            let id = usize::try_from(tag)
                .ok()
                .and_then(|i| self.object_refs.get(i))
                .with_context(|| {
                    format!(
                        "object reference {tag} out of range at stream offset {}",
                        self.pos
                    )
                })?
                .clone();
            Ok(Some(Chunk::External(id)))
        }
    }

    /// Read exactly `buf.len()` bytes of the current inline chunk.
    ///
    /// # Errors
    /// The chunk has fewer bytes left, or the stream is truncated.
    pub fn read_inline(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        ensure!(
            buf.len() as u64 <= self.inline_left,
            "inline chunk has {} bytes left at stream offset {}, {} needed",
            self.inline_left,
            self.pos,
            buf.len()
        );
        self.decoder
            .read_exact(buf)
            .with_context(|| format!("truncated inline data at stream offset {}", self.pos))?;
        self.inline_left -= buf.len() as u64;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Read `buf.len()` inline bytes that must lie within one inline chunk (composefs-rs's
    /// rule for tar headers). `false` at the clean end of the stream.
    #[cfg_attr(not(feature = "erofs"), allow(dead_code))]
    pub(crate) fn read_inline_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<bool> {
        if self.inline_left == 0 {
            match self.next_chunk()? {
                None => return Ok(false),
                Some(Chunk::Inline(_)) => {}
                Some(Chunk::External(id)) => {
                    bail!(
                        "object {id} where inline tar data was expected (stream offset {})",
                        self.pos
                    )
                }
            }
        }
        self.read_inline(buf)?;
        Ok(true)
    }

    /// Read `buf.len()` inline bytes, across inline chunk boundaries (a long inline body). `false`
    /// when the stream ends first.
    ///
    /// # Errors
    /// An object reference where inline bytes were expected, or a malformed stream.
    #[cfg_attr(not(feature = "erofs"), allow(dead_code))]
    pub(crate) fn read_inline_span(&mut self, mut buf: &mut [u8]) -> anyhow::Result<bool> {
        while !buf.is_empty() {
            if self.inline_left == 0 {
                match self.next_chunk()? {
                    None => return Ok(false),
                    Some(Chunk::Inline(_)) => {}
                    Some(Chunk::External(id)) => bail!(
                        "object {id} where inline tar data was expected (stream offset {})",
                        self.pos
                    ),
                }
            }
            let n = (self.inline_left.min(buf.len() as u64)) as usize;
            let (now, rest) = std::mem::take(&mut buf).split_at_mut(n);
            self.read_inline(now)?;
            buf = rest;
        }
        Ok(true)
    }

    /// Read an entry body of `size` bytes stored in `padded` bytes (composefs-rs's rule: either
    /// one external object followed by inline padding, or all of it inline in one chunk).
    #[cfg_attr(not(feature = "erofs"), allow(dead_code))]
    pub(crate) fn read_body(&mut self, size: u64, padded: u64) -> anyhow::Result<Body> {
        // Both come from a tar header in the stream: check them rather than trust them.
        let pad = padded
            .checked_sub(size)
            .filter(|&pad| pad < 512)
            .with_context(|| {
                format!(
                    "a {size}-byte body padded to {padded} bytes at stream offset {}",
                    self.pos
                )
            })? as usize;
        if self.inline_left == 0 {
            match self.next_chunk()? {
                None => bail!("stream ends where a {size}-byte body was expected"),
                Some(Chunk::External(id)) => {
                    self.pos = self.pos.checked_add(size).with_context(|| {
                        format!(
                            "a {size}-byte body at stream offset {} ends past 2^64 - 1",
                            self.pos
                        )
                    })?;
                    if pad > 0 {
                        let mut p = [0u8; 512];
                        ensure!(
                            self.read_inline_exact(&mut p[..pad])?,
                            "stream ends in padding"
                        );
                    }
                    return Ok(Body::External(id));
                }
                Some(Chunk::Inline(_)) => {}
            }
        }
        let len = usize::try_from(padded).context("body size")?;
        ensure!(
            padded <= self.inline_left,
            "inline chunk has {} bytes left at stream offset {}, body needs {padded}",
            self.inline_left,
            self.pos
        );
        let mut v = vec![0u8; len];
        self.read_inline(&mut v)?;
        v.truncate(size as usize);
        Ok(Body::Inline(v))
    }

    /// Write the logical stream (inline bytes and object contents) to `out`; returns its size.
    ///
    /// # Errors
    /// Malformed stream, missing objects, or write errors.
    pub fn cat(&mut self, repo: &Repository, out: &mut dyn Write) -> anyhow::Result<u64> {
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut total = 0u64;
        while let Some(chunk) = self.next_chunk()? {
            match chunk {
                Chunk::Inline(mut left) => {
                    while left > 0 {
                        let n = left.min(COPY_CHUNK as u64) as usize;
                        self.read_inline(&mut buf[..n])?;
                        out.write_all(&buf[..n])?;
                        left -= n as u64;
                        total += n as u64;
                    }
                }
                Chunk::External(id) => {
                    let mut f = repo.open_object(&id)?;
                    let n = std::io::copy(&mut f, out)
                        .with_context(|| format!("copying object {id}"))?;
                    self.pos += n;
                    total += n;
                }
            }
        }
        Ok(total)
    }
}
