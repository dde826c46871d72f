//! The archive bytes of a sparse entry, rebuilt from the expanded file in a layer's diff dir.
//!
//! tar-split records what Go's `archive/tar` reader returns, and for a sparse entry that is the
//! *expanded* file (vbatts/tar-split#21), not the bytes the layer tar holds. What it keeps of a
//! PAX sparse entry, as podman imports one (`tar --format=posix --sparse` with GNU tar 1.34,
//! `podman import` with podman 4.3.1):
//!
//! | sparse version | tar-split segments | tar-split file record | the layer tar's body |
//! |---|---|---|---|
//! | 0.0, 0.1 | every header byte, the map in the PAX records included | the expanded file: real size, CRC-64 of the expanded content | the data segments |
//! | 1.0 | every header byte (the PAX records give the real size, not the map) | the same | the map (decimal lines, zero-padded to 512 bytes), then the data segments |
//!
//! The 1.0 map is in neither record: Go reads it through the entry's body reader, which
//! tar-split's raw accounting does not see, and the file record holds what comes out of the
//! sparse reader. Old GNU `S` entries never get here: podman refuses them ("unhandled tar header
//! type 83").
//!
//! So a sparse body is rebuilt, and sent inline: the map text (1.0), then each data segment
//! read by position from the expanded file, in map order. For 0.x the map is the one in the
//! headers. For 1.0 it is recovered: GNU tar takes a sparse file's segments from the
//! filesystem's allocation (`SEEK_DATA`/`SEEK_HOLE`, so whole filesystem blocks, clipped to the
//! file's size, and a final `(real_size, 0)` entry), or where that fails (no `SEEK_HOLE`, or a
//! file that has no holes but fewer blocks than its size, as with compression) from its
//! non-zero 512-byte blocks, with a final `(real_size, 0)` entry only after a hole. The expanded
//! file's non-zero bytes, rounded out to blocks of 512 bytes to 64 KiB, give the candidate
//! maps; the first whose map text and data fill the body's size exactly is taken (see
//! [`recover_pax1_map`]). Blocks the original file had allocated but zero cannot be told from
//! holes, so such a map is not recovered (a clear error). A map that only looks right would give
//! another tar: the client's diff_id check catches it, so nothing wrong is ever accepted.

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, bail, ensure};
use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::proto::tar::{
    BLOCK_LEN, MAX_PAX1_MAP_LEN, MAX_SPARSE_SEGMENTS, SparseEntry, SparseFormat, SparseMap,
    SparseSegment,
};

/// Bytes read from the expanded file at a time, and so the most a rebuilt body holds in memory.
const READ_CHUNK: usize = 256 << 10;

/// Block sizes the 1.0 map recovery rounds data out to: GNU tar's raw scan (512) up to the
/// largest filesystem block sizes in use (64 KiB pages).
const GRANULES: [u64; 8] = [
    512,
    1 << 10,
    2 << 10,
    4 << 10,
    8 << 10,
    16 << 10,
    32 << 10,
    64 << 10,
];

/// The candidate maps of [`recover_pax1_map`], in the order tried: GNU tar ≥ 1.29 with
/// `SEEK_HOLE` on filesystem blocks of 1 KiB or more, its raw scan, then the other combinations.
/// Within a kind, the finest blocks first: more data than the non-zero bytes need is only
/// assumed when less does not fit.
fn candidate_order() -> impl Iterator<Item = (u64, Tail)> {
    let seek = GRANULES[1..].iter().map(|&g| (g, Tail::Always));
    let raw = [(GRANULES[0], Tail::AfterHole), (GRANULES[0], Tail::Always)];
    let rest = GRANULES[1..].iter().map(|&g| (g, Tail::AfterHole));
    let never = GRANULES.iter().map(|&g| (g, Tail::Never));
    seek.chain(raw).chain(rest).chain(never)
}

/// How a candidate map ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// Always a final `(real_size, 0)` entry: GNU tar ≥ 1.29 on a filesystem with `SEEK_HOLE`.
    Always,
    /// A final `(real_size, 0)` entry only after a hole: GNU tar's raw scan.
    AfterHole,
    /// No final entry.
    Never,
}

/// Send the body the layer tar has for a sparse entry: `body_size` bytes (the tar header's),
/// rebuilt from `expanded` (the expanded file, `entry.real_size` bytes) and passed to `emit` in
/// pieces of at most [`READ_CHUNK`] bytes.
///
/// # Errors
/// The map cannot be recovered (1.0), does not fill the body, or the file cannot be read.
pub(super) fn send_body(
    expanded: BorrowedFd<'_>,
    entry: &SparseEntry,
    body_size: u64,
    emit: &mut dyn FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (prefix, map) = match (&entry.map, entry.format) {
        (Some(map), _) => (Vec::new(), map.clone()),
        (None, SparseFormat::PaxV10) => {
            let map = recover_pax1_map(expanded, entry.real_size, body_size)?;
            (map.encode_pax1(), map)
        }
        (None, format) => bail!("a {format:?} sparse entry without its map"),
    };
    let total = (prefix.len() as u64).checked_add(map.data_len());
    ensure!(
        total == Some(body_size),
        "the sparse map holds {} bytes of data after {} bytes of map, the tar header's body {}",
        map.data_len(),
        prefix.len(),
        body_size
    );
    if !prefix.is_empty() {
        emit(&prefix)?;
    }
    let mut buf = vec![0u8; READ_CHUNK.min(usize::try_from(map.data_len()).unwrap_or(READ_CHUNK))];
    for segment in map.segments() {
        let mut at = segment.offset;
        let end = segment.end();
        while at < end {
            let want = usize::try_from(end - at).map_or(buf.len(), |n| n.min(buf.len()));
            let piece = &mut buf[..want];
            read_exact_at(expanded, piece, at)?;
            emit(piece)?;
            at += want as u64;
        }
    }
    Ok(())
}

/// Fill `buf` from `fd` at `offset`.
fn read_exact_at(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match rustix::io::pread(fd, &mut buf[done..], at) {
            Ok(0) => bail!("the expanded file ends at {at}, before its real size"),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e).with_context(|| format!("reading at offset {at}")),
        }
    }
    Ok(())
}

/// Recover the PAX 1.0 map of a body of `body_size` bytes from its expanded file of `real_size`
/// bytes, as GNU tar would have written it: the file's non-zero bytes rounded out to a block
/// size (clipped to the real size), with or without a final `(real_size, 0)` entry, make a
/// candidate ([`candidate_order`]); the first whose map text, zero-padded to 512 bytes, and
/// data add up to `body_size` is the map.
///
/// # Errors
/// The file cannot be read, has more than [`MAX_SPARSE_SEGMENTS`] runs of data, or no
/// candidate fits the body.
pub(super) fn recover_pax1_map(
    expanded: impl AsFd,
    real_size: u64,
    body_size: u64,
) -> anyhow::Result<SparseMap> {
    let runs = data_runs(expanded.as_fd(), real_size)?;
    for (granule, tail) in candidate_order() {
        let Some(segments) = candidate(&runs, granule, real_size, tail) else {
            continue;
        };
        let data: u64 = segments.iter().map(|s| s.length).sum();
        let map_len = pax1_map_len(&segments);
        if map_len <= MAX_PAX1_MAP_LEN && map_len.checked_add(data) == Some(body_size) {
            return SparseMap::new(real_size, segments)
                .context("a recovered sparse map is invalid");
        }
    }
    let data: u64 = runs.iter().map(|(start, end)| end - start).sum();
    bail!(
        "tar-split does not record a PAX 1.0 sparse map, and no map GNU tar would write for this \
         file ({real_size} bytes, {} runs and {data} bytes of non-zero 512-byte blocks) fills the \
         tar's body of {body_size} bytes",
        runs.len()
    )
}

/// The runs of non-zero 512-byte blocks of the file (`[start, end)`, the last clipped to
/// `real_size`). Regions the filesystem reports as holes are not read.
fn data_runs(fd: BorrowedFd<'_>, real_size: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let block = BLOCK_LEN as u64;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pos = 0u64;
    while pos < real_size {
        // Where the filesystem says data starts and ends; without SEEK_DATA, everything is.
        let start = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(at) if at >= real_size => break,
            Ok(at) => at,
            Err(Errno::NXIO) => break,
            Err(_) => pos,
        };
        let stop = match rustix::fs::seek(fd, SeekFrom::Hole(start)) {
            Ok(at) if at > start => at,
            _ => real_size,
        };
        // Whole 512-byte blocks, as GNU tar's raw scan sees them; `at` < `stop` as
        // `start` < `real_size` and `start` < the hole.
        let mut at = start / block * block;
        let stop = stop.div_ceil(block).saturating_mul(block).min(real_size);
        while at < stop {
            let len = usize::try_from(stop - at).map_or(buf.len(), |n| n.min(buf.len()));
            let piece = &mut buf[..len];
            read_exact_at(fd, piece, at)?;
            for (i, chunk) in piece.chunks(BLOCK_LEN).enumerate() {
                if chunk.iter().all(|&b| b == 0) {
                    continue;
                }
                let begin = at + (i * BLOCK_LEN) as u64;
                let end = begin + chunk.len() as u64;
                match runs.last_mut() {
                    Some(last) if last.1 == begin => last.1 = end,
                    _ => {
                        ensure!(
                            runs.len() < MAX_SPARSE_SEGMENTS,
                            "the expanded file has more than {MAX_SPARSE_SEGMENTS} runs of data"
                        );
                        runs.push((begin, end));
                    }
                }
            }
            at += len as u64;
        }
        pos = stop;
    }
    Ok(runs)
}

/// The segments of `runs` rounded out to `granule`-byte blocks (clipped to `real_size`,
/// touching ones merged), with the final entry `tail` asks for; `None` if more than
/// [`MAX_SPARSE_SEGMENTS`].
fn candidate(
    runs: &[(u64, u64)],
    granule: u64,
    real_size: u64,
    tail: Tail,
) -> Option<Vec<SparseSegment>> {
    let mut out: Vec<SparseSegment> = Vec::new();
    for &(start, end) in runs {
        let begin = start / granule * granule;
        let end = end.div_ceil(granule).saturating_mul(granule).min(real_size);
        match out.last_mut() {
            Some(last) if begin <= last.end() => last.length = end.max(last.end()) - last.offset,
            _ => out.push(SparseSegment {
                offset: begin,
                length: end - begin,
            }),
        }
    }
    let ends_in_hole = out.last().is_none_or(|last| last.end() < real_size);
    if tail == Tail::Always || (tail == Tail::AfterHole && ends_in_hole) {
        out.push(SparseSegment {
            offset: real_size,
            length: 0,
        });
    }
    (out.len() <= MAX_SPARSE_SEGMENTS).then_some(out)
}

/// Length of the PAX 1.0 map text of `segments`, zero-padded to a multiple of 512 bytes (what
/// [`SparseMap::encode_pax1`] makes of them, without allocating it).
fn pax1_map_len(segments: &[SparseSegment]) -> u64 {
    let digits = |n: u64| u64::from(n.checked_ilog10().unwrap_or(0)) + 1;
    let text = segments
        .iter()
        .fold(digits(segments.len() as u64) + 1, |sum, s| {
            sum + digits(s.offset) + digits(s.length) + 2
        });
    text.div_ceil(BLOCK_LEN as u64) * BLOCK_LEN as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, length: u64) -> SparseSegment {
        SparseSegment { offset, length }
    }

    /// A memfd holding `content`.
    fn memfd(content: &[u8]) -> std::os::fd::OwnedFd {
        let fd = rustix::fs::memfd_create("expanded", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::io::pwrite(&fd, content, 0).unwrap();
        fd
    }

    #[test]
    fn map_len_matches_the_encoding() {
        for segments in [
            vec![],
            vec![seg(0, 0)],
            vec![seg(9, 10), seg(99, 100), seg(12345678901, 0)],
            (0..100).map(|i| seg(i * 100_000, 7)).collect(),
        ] {
            let real = segments.last().map_or(0, SparseSegment::end);
            let map = SparseMap::new(real, segments.clone()).unwrap();
            assert_eq!(pax1_map_len(&segments), map.encode_pax1().len() as u64);
        }
    }

    #[test]
    fn candidates_round_out_and_end_as_asked() {
        // As `data_runs` makes them: whole 512-byte blocks, the last clipped to the file.
        let runs = [(512, 1024), (4096, 4608), (8704, 9100)];
        // Blocks that touch make one segment, as a filesystem extent would.
        assert_eq!(
            candidate(&runs, 4096, 9100, Tail::Always).unwrap(),
            [seg(0, 9100), seg(9100, 0)]
        );
        assert_eq!(
            candidate(&runs, 4096, 9100, Tail::AfterHole).unwrap(),
            [seg(0, 9100)]
        );
        assert_eq!(
            candidate(&runs, 1024, 9100, Tail::Always).unwrap(),
            [seg(0, 1024), seg(4096, 1024), seg(8192, 908), seg(9100, 0)]
        );
        assert_eq!(
            candidate(&runs, 512, 20000, Tail::AfterHole).unwrap(),
            [seg(512, 512), seg(4096, 512), seg(8704, 512), seg(20000, 0)]
        );
        assert_eq!(candidate(&[], 512, 100, Tail::Never).unwrap(), []);
        assert_eq!(
            candidate(&[], 512, 100, Tail::AfterHole).unwrap(),
            [seg(100, 0)]
        );
    }

    /// The map GNU tar writes for a file on a 4 KiB-block filesystem: short data in some blocks.
    #[test]
    fn recovers_block_aligned_maps() {
        let real = 12 * 65536 + 4096;
        let mut content = vec![0u8; real];
        let mut want = Vec::new();
        for i in 1..12 {
            let at = i * 65536;
            content[at..at + 640].fill(b'd');
            want.push(seg(at as u64, 4096));
        }
        // A block whose only non-zero byte is its last.
        content[3 * 65536 + 4095] = 1;
        want.push(seg(real as u64, 0));
        let map = SparseMap::new(real as u64, want).unwrap();
        let body = map.encode_pax1().len() as u64 + map.data_len();
        let fd = memfd(&content);
        assert_eq!(recover_pax1_map(&fd, real as u64, body).unwrap(), map);

        // What GNU tar's raw scan writes for a file ending in data: 512-byte blocks, no final
        // entry. A final entry would fit the body too; the raw scan's habit is tried first.
        content[3 * 65536 + 4095] = 0;
        content[real - 1] = 1;
        let raw = SparseMap::new(
            real as u64,
            (1..12)
                .map(|i| seg(i * 65536, 1024))
                .chain([seg(real as u64 - 512, 512)]),
        )
        .unwrap();
        let body = raw.encode_pax1().len() as u64 + raw.data_len();
        let fd = memfd(&content);
        assert_eq!(recover_pax1_map(&fd, real as u64, body).unwrap(), raw);

        // Nothing fits: a clear error.
        let err = recover_pax1_map(&fd, real as u64, body + 1).unwrap_err();
        assert!(
            format!("{err:#}").contains("tar-split does not record a PAX 1.0 sparse map"),
            "{err:#}"
        );
    }

    /// Against GNU tar on the test's filesystem: files with holes first or data first, ending
    /// in a hole or in data, with runs shorter and longer than a filesystem block.
    #[test]
    fn recovers_what_gnu_tar_writes() {
        use std::os::unix::fs::FileExt;

        use crate::proto::tar::Tracker;

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let cases = [(true, false), (false, true), (true, true), (false, false)];
        for (i, (hole_first, data_last)) in cases.iter().enumerate() {
            let size = 40 * 65536 + if *data_last { 0 } else { 3000 };
            let file = std::fs::File::create(root.join(format!("f{i}"))).unwrap();
            file.set_len(size).unwrap();
            for run in 0..40u64 {
                let len = 300 + run * 397;
                let at = match run {
                    0 if *hole_first => continue,
                    39 if *data_last => size - len,
                    _ => run * 65536 + run * 1000,
                };
                let data: Vec<u8> = (0..len).map(|j| (j % 253 + 1) as u8).collect();
                file.write_all_at(&data, at).unwrap();
            }
        }
        let archive = dir.path().join("sparse.tar");
        let out = std::process::Command::new("tar")
            .args(["--format=posix", "--sparse", "--sparse-version=1.0", "-cf"])
            .arg(&archive)
            .arg("-C")
            .arg(&root)
            .args(["f0", "f1", "f2", "f3"])
            .output();
        let Ok(out) = out else {
            eprintln!("skipping: no `tar` command");
            return;
        };
        assert!(out.status.success(), "{out:?}");
        let tar = std::fs::read(&archive).unwrap();
        let mut t = Tracker::with_sparse_maps();
        let mut pos = 0;
        let mut checked = 0;
        while pos < tar.len() {
            pos += t.advance(&tar[pos..]).unwrap();
            let (Some(size), Some(entry)) = (t.file_body_start(), t.sparse_entry()) else {
                continue;
            };
            let body = &tar[pos..pos + size as usize];
            let (map, _) = SparseMap::from_pax1_prefix(body, entry.real_size, size).unwrap();
            let name = format!("f{checked}");
            let file = std::fs::File::open(root.join(&name)).unwrap();
            let got = recover_pax1_map(&file, entry.real_size, size).unwrap();
            assert_eq!(got, map, "{name}");
            checked += 1;
        }
        assert_eq!(checked, cases.len());
    }

    #[test]
    fn sends_the_archive_bytes() {
        let mut content = vec![0u8; 3 << 20];
        content[100..200].fill(1);
        content[(2 << 20)..(3 << 20)].fill(2);
        let fd = memfd(&content);
        let map = SparseMap::new(3 << 20, [seg(0, 512), seg(2 << 20, 1 << 20)]).unwrap();
        let body_size = map.data_len();
        let mut records = Vec::new();
        for (key, value) in [
            ("GNU.sparse.size", "3145728"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.map", "0,512,2097152,1048576"),
        ] {
            // The length counts the whole record, its own digits too (all two-digit here).
            let len = key.len() + value.len() + 5;
            records.extend_from_slice(format!("{len} {key}={value}\n").as_bytes());
        }
        let entry = SparseEntry::from_pax_records(&records, body_size)
            .unwrap()
            .unwrap();
        assert_eq!(entry.map.as_ref(), Some(&map));
        let mut sent = Vec::new();
        let mut largest = 0;
        send_body(fd.as_fd(), &entry, body_size, &mut |b| {
            largest = largest.max(b.len());
            sent.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(sent.len() as u64, body_size);
        assert!(sent[..512] == content[..512]);
        assert!(sent[512..] == content[2 << 20..]);
        assert_eq!(largest, READ_CHUNK);
        let err = send_body(fd.as_fd(), &entry, body_size + 1, &mut |_| Ok(())).unwrap_err();
        assert!(format!("{err}").contains("the tar header's body"), "{err}");
    }
}
