//! The tracker's sparse maps, against archives GNU tar writes in every sparse format and against
//! hand-made bad ones.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use super::*;

/// Distance between the starts of data runs in the test files.
const STRIDE: u64 = 64 << 10;
/// Data runs per test file: more than an old GNU header holds, so extension blocks follow.
const RUNS: u64 = 12;

fn have_tar() -> bool {
    let ok = Command::new("tar")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: no `tar` command");
    }
    ok
}

/// Write a sparse file: [`RUNS`] data runs of different lengths (one spans several filesystem
/// blocks) `STRIDE` apart; the file starts with a hole when `hole_first`, and ends with a hole
/// unless `data_last`. Returns its content.
fn sparse_file(path: &Path, hole_first: bool, data_last: bool) -> Vec<u8> {
    let size = RUNS * STRIDE + if data_last { 0 } else { 5000 };
    let file = std::fs::File::create(path).unwrap();
    // The full size first: writes that extend a file make some filesystems preallocate.
    file.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    for i in 0..RUNS {
        let len = 100 + i * 1000;
        let mut at = i * STRIDE + (i % 3) * 1536;
        if i == 0 && hole_first {
            continue;
        }
        if i == RUNS - 1 && data_last {
            at = size - len;
        }
        let data: Vec<u8> = (0..len).map(|j| (j % 251 + 1) as u8).collect();
        file.write_all_at(&data, at).unwrap();
        content[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    content
}

/// `tar --sparse` of two sparse files, `a` (holes first and last) and `b` (data first and
/// last), with extra `args` choosing the format.
fn gnu_tar(dir: &Path, args: &[&str]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let a = sparse_file(&root.join("a"), true, false);
    let b = sparse_file(&root.join("b"), false, true);
    let archive = dir.join("sparse.tar");
    let out = Command::new("tar")
        .args(args)
        .args([
            "--sparse",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
        ])
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&root)
        .args(["a", "b"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tar {args:?}: {out:?}");
    (std::fs::read(&archive).unwrap(), vec![a, b])
}

/// What a keeping tracker saw of one sparse body.
#[derive(Debug)]
struct SeenBody {
    /// Tar offset of the body.
    start: usize,
    size: u64,
    /// The entry at the start of the body.
    at_start: SparseEntry,
    /// The map, once known (for 1.0: after its bytes were fed).
    map: SparseMap,
}

/// Feed `tar` to a keeping tracker in `piece`-byte pieces; every sparse body it saw.
fn track(tar: &[u8], piece: usize) -> Vec<SeenBody> {
    let mut t = Tracker::with_sparse_maps();
    let mut seen = Vec::new();
    let mut pos = 0;
    while pos < tar.len() {
        let end = (pos + piece).min(tar.len());
        pos += t.advance(&tar[pos..end]).unwrap();
        let (Some(size), Some(at_start)) = (t.file_body_start(), t.sparse_entry().cloned()) else {
            continue;
        };
        // The body, but its last byte (its map is gone once it ends), in pieces.
        let start = pos;
        let last = start + size as usize - 1;
        let mut map = at_start.map.clone();
        while pos < last {
            let end = (pos + piece).min(last);
            t.feed(&tar[pos..end]).unwrap();
            pos = end;
            map = map.or_else(|| t.sparse_entry().unwrap().map.clone());
        }
        seen.push(SeenBody {
            start,
            size,
            at_start,
            map: map.expect("the map, known before the body ends"),
        });
    }
    assert!(t.at_clean_end());
    seen
}

/// The expanded file of a sparse body.
fn expand(body: &[u8], map: &SparseMap) -> Vec<u8> {
    let mut out = vec![0u8; map.real_size() as usize];
    let mut packed = body.len() - map.data_len() as usize;
    for s in map.segments() {
        let len = s.length as usize;
        out[s.offset as usize..s.offset as usize + len]
            .copy_from_slice(&body[packed..packed + len]);
        packed += len;
    }
    out
}

/// The header blocks before a body at `start`: an old GNU header and its extension blocks, or
/// the PAX records of the `x` header before the entry's header.
fn headers_before(tar: &[u8], start: usize) -> (Vec<[u8; BLOCK_LEN]>, Option<Vec<u8>>) {
    let mut pos = 0;
    let mut records = None;
    loop {
        let h: [u8; BLOCK_LEN] = tar[pos..pos + BLOCK_LEN].try_into().unwrap();
        let size = parse_numeric(&h[SIZE]).unwrap() as usize;
        let mut blocks = vec![h];
        let mut next = pos + BLOCK_LEN;
        if h[TYPEFLAG] == b'S' {
            let mut more = h[GNU_SPARSE_IS_EXTENDED] != 0;
            while more {
                let ext: [u8; BLOCK_LEN] = tar[next..next + BLOCK_LEN].try_into().unwrap();
                more = ext[SPARSE_EXT_IS_EXTENDED] != 0;
                blocks.push(ext);
                next += BLOCK_LEN;
            }
        }
        if next == start {
            return (blocks, records);
        }
        records = (h[TYPEFLAG] == b'x').then(|| tar[next..next + size].to_vec());
        pos = next + size.div_ceil(BLOCK_LEN) * BLOCK_LEN;
    }
}

fn check_format(args: &[&str], format: SparseFormat) {
    if !have_tar() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (tar, files) = gnu_tar(dir.path(), args);
    for piece in [tar.len(), 512, 7] {
        let seen = track(&tar, piece);
        assert_eq!(seen.len(), 2, "{args:?}: sparse bodies");
        for (body, content) in seen.iter().zip(&files) {
            assert_eq!(body.at_start.format, format, "{args:?}");
            assert_eq!(body.at_start.real_size, content.len() as u64);
            // The map is known from the headers, except PAX 1.0's, which is in the body.
            let from_headers = body.at_start.map.as_ref();
            if format == SparseFormat::PaxV10 {
                assert_eq!(from_headers, None);
            } else {
                assert_eq!(from_headers, Some(&body.map));
            }
            assert!(body.map.segments().len() >= 10, "{:?}", body.map);
            let bytes = &tar[body.start..body.start + body.size as usize];
            assert!(expand(bytes, &body.map) == *content, "{args:?}: expansion");

            // The standalone parsers agree with the tracker.
            let (blocks, records) = headers_before(&tar, body.start);
            let standalone = match format {
                SparseFormat::OldGnu => {
                    let header = &blocks[0];
                    SparseEntry::from_old_gnu(header, &blocks[1..], body.size).unwrap()
                }
                _ => SparseEntry::from_pax_records(&records.unwrap(), body.size)
                    .unwrap()
                    .unwrap(),
            };
            assert_eq!(standalone, body.at_start);
            if format == SparseFormat::PaxV10 {
                let (map, map_len) =
                    SparseMap::from_pax1_prefix(bytes, body.at_start.real_size, body.size).unwrap();
                assert_eq!(map, body.map);
                assert_eq!(map_len, body.size - map.data_len());
                // GNU tar writes the map the way `encode_pax1` does.
                assert!(map.encode_pax1() == bytes[..map_len as usize]);
            }
        }
    }
    // A plain tracker frames the archive the same way and marks the same bodies.
    let mut plain = Tracker::new();
    let mut keeping = Tracker::with_sparse_maps();
    let mut pos = 0;
    while pos < tar.len() {
        let n = plain.advance(&tar[pos..]).unwrap();
        assert_eq!(keeping.advance(&tar[pos..]).unwrap(), n);
        pos += n;
        assert_eq!(plain.file_body(), keeping.file_body());
        assert_eq!(plain.sparse_entry(), None);
    }
    assert_eq!(plain.entries(), keeping.entries());
}

#[test]
fn gnu_tar_old_gnu() {
    check_format(&["--format=gnu"], SparseFormat::OldGnu);
}

#[test]
fn gnu_tar_pax_0_0() {
    check_format(
        &["--format=posix", "--sparse-version=0.0"],
        SparseFormat::PaxV00,
    );
}

#[test]
fn gnu_tar_pax_0_1() {
    check_format(
        &["--format=posix", "--sparse-version=0.1"],
        SparseFormat::PaxV01,
    );
}

#[test]
fn gnu_tar_pax_1_0() {
    check_format(
        &["--format=posix", "--sparse-version=1.0"],
        SparseFormat::PaxV10,
    );
}

/// Build a header block with a valid checksum.
fn header(name: &[u8], typeflag: u8, size: u64, magic: &[u8; 8]) -> [u8; BLOCK_LEN] {
    let mut b = [0u8; BLOCK_LEN];
    b[..name.len()].copy_from_slice(name);
    b[100..108].copy_from_slice(b"0000644\0");
    b[SIZE].copy_from_slice(format!("{size:011o}\0").as_bytes());
    b[TYPEFLAG] = typeflag;
    b[257..265].copy_from_slice(magic);
    set_checksum(&mut b);
    b
}

fn set_checksum(b: &mut [u8; BLOCK_LEN]) {
    b[CHKSUM].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[CHKSUM].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

const USTAR: &[u8; 8] = b"ustar\x0000";
const GNU: &[u8; 8] = b"ustar  \0";

/// An `x` header with `records` (`key=value`), padded.
fn pax_header(records: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    for r in records {
        let mut n = r.len() + 3;
        while n.to_string().len() + 2 + r.len() != n {
            n = n.to_string().len() + 2 + r.len();
        }
        body.extend_from_slice(format!("{n} {r}\n").as_bytes());
    }
    let mut out = header(b"PaxHeaders/f", b'x', body.len() as u64, USTAR).to_vec();
    let padded = body.len().div_ceil(BLOCK_LEN) * BLOCK_LEN;
    body.resize(padded, 0);
    out.extend(body);
    out
}

/// The first error of a keeping tracker fed `tar`, which a plain tracker must accept.
fn keeping_error(tar: &[u8]) -> TarError {
    Tracker::new().feed(tar).expect("a plain tracker frames it");
    Tracker::with_sparse_maps().feed(tar).unwrap_err()
}

#[test]
fn bad_maps_are_tar_errors() {
    let sparse = |offset, source| TarError::Sparse { offset, source };
    // 0.1: the map holds 10 bytes, the body 20.
    let mut tar = pax_header(&[
        "GNU.sparse.size=100",
        "GNU.sparse.numblocks=1",
        "GNU.sparse.map=0,10",
    ]);
    tar.extend(header(b"f", b'0', 20, USTAR));
    assert_eq!(
        keeping_error(&tar),
        sparse(1024, SparseError::DataLen { map: 10, body: 20 })
    );
    // A directory with a sparse map.
    let mut tar = pax_header(&["GNU.sparse.numblocks=1", "GNU.sparse.map=0,10"]);
    tar.extend(header(b"d", b'5', 0, USTAR));
    assert_eq!(
        keeping_error(&tar),
        sparse(1024, SparseError::HeaderOnly { typeflag: b'5' })
    );
    // 0.0 pairs out of order: the `x` header itself is refused.
    let tar = pax_header(&["GNU.sparse.numbytes=1"]);
    assert_eq!(keeping_error(&tar), sparse(0, SparseError::PairOrder));
    // Old GNU: the map past the real size (header) and unordered (extension block).
    let mut h = header(b"s", b'S', 10, GNU);
    h[386..398].copy_from_slice(b"00000000000\0");
    h[398..410].copy_from_slice(b"00000000012\0");
    h[483..495].copy_from_slice(b"00000000005\0");
    set_checksum(&mut h);
    // An empty file before it: the error names the `S` header's offset.
    let mut tar = header(b"x", b'0', 0, USTAR).to_vec();
    tar.extend(h);
    assert_eq!(
        keeping_error(&tar),
        sparse(
            512,
            SparseError::PastRealSize {
                end: 10,
                real_size: 5
            }
        )
    );
    h[483..495].copy_from_slice(b"00000000100\0");
    h[GNU_SPARSE_IS_EXTENDED] = 1;
    set_checksum(&mut h);
    let mut ext = [0u8; BLOCK_LEN];
    ext[..12].copy_from_slice(b"00000000005\0");
    ext[12..24].copy_from_slice(b"00000000001\0");
    let mut tar = h.to_vec();
    tar.extend(ext);
    assert_eq!(
        keeping_error(&tar),
        sparse(0, SparseError::Unordered { index: 1 })
    );
    // 1.0: a bad count, a map that does not fit, a body that ends inside the map.
    let pax1 = [
        "GNU.sparse.major=1",
        "GNU.sparse.minor=0",
        "GNU.sparse.realsize=10",
    ];
    let with_body = |size: u64, body: &[u8]| {
        let mut tar = pax_header(&pax1);
        tar.extend(header(b"f", b'0', size, USTAR));
        tar.extend(body);
        tar
    };
    let count = SparseError::Number {
        field: "the PAX 1.0 segment count",
    };
    assert_eq!(
        keeping_error(&with_body(600, b"one\n")),
        sparse(1024, count)
    );
    let mut map = b"1\n0\n10\n".to_vec();
    map.resize(512, 0);
    assert_eq!(
        keeping_error(&with_body(600, &map)),
        sparse(1024, SparseError::DataLen { map: 10, body: 88 })
    );
    assert_eq!(
        keeping_error(&with_body(0, b"")),
        sparse(1024, SparseError::TruncatedMap { body_size: 0 })
    );
    let mut unfinished = b"1\n0\n".to_vec();
    unfinished.resize(512, b'0');
    assert_eq!(
        keeping_error(&with_body(512, &unfinished)),
        sparse(1024, SparseError::TruncatedMap { body_size: 512 })
    );
    // Skipped, a 1.0 body is not read: no error, no map.
    let mut t = Tracker::with_sparse_maps();
    t.feed(&with_body(600, b"")).unwrap();
    let entry = t.sparse_entry().unwrap();
    assert_eq!((entry.format, entry.real_size), (SparseFormat::PaxV10, 10));
    assert_eq!(entry.map, None);
    t.skip_file_body().unwrap();
    assert_eq!(t.sparse_entry(), None);
    t.feed(&[0u8; 424 + 1024]).unwrap(); // padding and end of archive
    assert!(t.in_trailer());
}
