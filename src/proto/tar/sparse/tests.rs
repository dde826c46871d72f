//! Unit tests of the sparse map parsers.

use super::*;

fn seg(offset: u64, length: u64) -> SparseSegment {
    SparseSegment { offset, length }
}

fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 2;
        let mut n = body + 1;
        while n.to_string().len() + 1 + body != n {
            n = n.to_string().len() + 1 + body;
        }
        out.extend_from_slice(format!("{n} {k}={v}\n").as_bytes());
    }
    out
}

#[test]
fn decimal_like_go_parse_int() {
    let parse = |s: &[u8]| {
        let mut d = Decimal::default();
        s.iter().for_each(|&b| d.push(b));
        d.value()
    };
    assert_eq!(parse(b"0"), Some(0));
    assert_eq!(parse(b"+17"), Some(17));
    assert_eq!(parse(b"-17"), Some(-17));
    assert_eq!(parse(b"9223372036854775807"), Some(i64::MAX));
    assert_eq!(parse(b"-9223372036854775808"), Some(i64::MIN));
    assert_eq!(parse(b"9223372036854775808"), None);
    assert_eq!(parse(b"99999999999999999999999"), None);
    for bad in [
        &b""[..],
        b"+",
        b"-",
        b"1 ",
        b" 1",
        b"1-",
        b"0x10",
        b"1_000",
        b"--1",
    ] {
        assert_eq!(parse(bad), None, "{:?}", bad.escape_ascii().to_string());
    }
}

#[test]
fn map_rules() {
    let ok = SparseMap::new(100, [seg(0, 10), seg(10, 0), seg(50, 50), seg(100, 0)]).unwrap();
    assert_eq!(
        (ok.real_size(), ok.data_len(), ok.segments().len()),
        (100, 60, 4)
    );
    assert_eq!(SparseMap::new(0, []).unwrap().data_len(), 0);
    assert_eq!(
        SparseMap::new(100, [seg(0, 10), seg(5, 10)]),
        Err(SparseError::Unordered { index: 1 })
    );
    assert_eq!(
        SparseMap::new(100, [seg(50, 10), seg(0, 10)]),
        Err(SparseError::Unordered { index: 1 })
    );
    assert_eq!(
        SparseMap::new(100, [seg(90, 11)]),
        Err(SparseError::PastRealSize {
            end: 101,
            real_size: 100
        })
    );
    assert_eq!(
        SparseMap::new(u64::MAX, [seg(1 << 62, 1 << 62)]),
        Err(SparseError::Overflow { index: 0 })
    );
    assert_eq!(
        SparseMap::new(u64::MAX, [seg(u64::MAX, 0)]),
        Err(SparseError::Overflow { index: 0 })
    );
    let mut b = SegmentBuilder::new(false);
    assert_eq!(b.push(-1, 0), Err(SparseError::Negative { index: 0 }));
    assert_eq!(b.push(0, -1), Err(SparseError::Negative { index: 0 }));
    let mut b = SegmentBuilder::new(false);
    for i in 0..MAX_SPARSE_SEGMENTS as i64 {
        b.push(i, 0).unwrap();
    }
    assert_eq!(
        b.push(1 << 40, 0),
        Err(SparseError::TooManySegments {
            limit: MAX_SPARSE_SEGMENTS
        })
    );
}

#[test]
fn pax1_encoding_is_gnu_tars() {
    let map = SparseMap::new(790528, [seg(65536, 4096), seg(790528, 0)]).unwrap();
    let text = map.encode_pax1();
    assert_eq!(text.len(), 512);
    assert!(text.starts_with(b"2\n65536\n4096\n790528\n0\n\0"));
    assert!(text[23..].iter().all(|&b| b == 0));
    let (back, len) = SparseMap::from_pax1_prefix(&text, 790528, 512 + 4096).unwrap();
    assert_eq!((back, len), (map, 512));
}

#[test]
fn pax1_reader_rules() {
    // Fed a byte at a time, the map spans two blocks.
    let many: Vec<_> = (0..60u64).map(|i| seg(i * 1_000_000, 1)).collect();
    let map = SparseMap::new(60_000_000, many).unwrap();
    assert_eq!(map.data_len(), 60);
    let text = map.encode_pax1();
    assert_eq!(text.len(), 1024);
    let mut body = text.clone();
    body.extend([1u8; 60]);
    let mut r = Pax1MapReader::new(60_000_000, body.len() as u64);
    let mut used = 0;
    for b in &body {
        used += r.feed(std::slice::from_ref(b)).unwrap();
    }
    assert_eq!((used, r.map_len()), (1024, Some(1024)));
    assert_eq!(r.into_map(), Some(map));

    let check = |text: &[u8], real: u64, body: u64| {
        let mut t = text.to_vec();
        t.resize(t.len().div_ceil(512) * 512, 0);
        SparseMap::from_pax1_prefix(&t, real, body).map(|(m, len)| (m.data_len(), len))
    };
    assert_eq!(check(b"0\n", 0, 512), Ok((0, 512)));
    assert_eq!(check(b"+1\n0\n+5\n", 5, 517), Ok((5, 512)));
    // Bytes after the last newline of the map's block are not looked at.
    assert_eq!(check(b"1\n0\n5\ngarbage", 5, 517), Ok((5, 512)));
    for (text, real, body, err) in [
        (
            &b"x\n"[..],
            0,
            512,
            SparseError::Number {
                field: "the PAX 1.0 segment count",
            },
        ),
        (
            b"-1\n",
            0,
            512,
            SparseError::Number {
                field: "the PAX 1.0 segment count",
            },
        ),
        (
            b"1\n0\n5 \n",
            5,
            517,
            SparseError::Number {
                field: "a PAX 1.0 map number",
            },
        ),
        (
            b"262145\n",
            0,
            512,
            SparseError::TooManySegments {
                limit: MAX_SPARSE_SEGMENTS,
            },
        ),
        (
            b"1\n0\n5\n",
            5,
            516,
            SparseError::DataLen { map: 5, body: 4 },
        ),
        (
            b"1\n0\n5\n",
            5,
            100,
            SparseError::TruncatedMap { body_size: 100 },
        ),
        (
            b"1\n0\n5\n",
            5,
            518,
            SparseError::DataLen { map: 5, body: 6 },
        ),
        (
            b"1\n0\n5\n",
            4,
            517,
            SparseError::PastRealSize {
                end: 5,
                real_size: 4,
            },
        ),
        (
            b"2\n5\n1\n0\n1\n",
            5,
            514,
            SparseError::Unordered { index: 1 },
        ),
    ] {
        assert_eq!(check(text, real, body), Err(err), "{}", text.escape_ascii());
    }
    // The map ends inside the body's first block, which the body does not hold.
    assert_eq!(
        SparseMap::from_pax1_prefix(b"1\n0\n5\n", 5, 517),
        Err(SparseError::TruncatedMap { body_size: 517 })
    );
    // Longer than 1 MiB: refused as soon as the first byte past it arrives.
    let mut r = Pax1MapReader::new(0, 4 << 20);
    let mut long = b"1\n".to_vec();
    long.resize(MAX_PAX1_MAP_LEN as usize + 1, b'0');
    assert_eq!(
        r.feed(&long),
        Err(SparseError::MapTooLong {
            limit: MAX_PAX1_MAP_LEN
        })
    );
}

#[test]
fn pax_0x_records() {
    // 0.0: pairs, as GNU tar writes them.
    let recs = pax(&[
        ("GNU.sparse.size", "300"),
        ("GNU.sparse.numblocks", "3"),
        ("GNU.sparse.offset", "0"),
        ("GNU.sparse.numbytes", "10"),
        ("GNU.sparse.offset", "100"),
        ("GNU.sparse.numbytes", "20"),
        ("GNU.sparse.offset", "300"),
        ("GNU.sparse.numbytes", "0"),
        ("atime", "1"),
    ]);
    let e = SparseEntry::from_pax_records(&recs, 30).unwrap().unwrap();
    assert_eq!((e.format, e.real_size), (SparseFormat::PaxV00, 300));
    let map = e.map.unwrap();
    assert_eq!(map.segments(), [seg(0, 10), seg(100, 20), seg(300, 0)]);
    assert_eq!(
        SparseEntry::from_pax_records(&recs, 31),
        Err(SparseError::DataLen { map: 30, body: 31 })
    );
    // 0.1: a map record.
    let recs = pax(&[
        ("GNU.sparse.size", "300"),
        ("GNU.sparse.numblocks", "2"),
        ("GNU.sparse.name", "f"),
        ("GNU.sparse.map", "0,10,100,20"),
    ]);
    let e = SparseEntry::from_pax_records(&recs, 30).unwrap().unwrap();
    assert_eq!(e.format, SparseFormat::PaxV01);
    assert_eq!(e.map.unwrap().segments(), [seg(0, 10), seg(100, 20)]);
    // A later map record replaces an earlier one; 0.0 pairs win over both.
    let recs = pax(&[
        ("GNU.sparse.numblocks", "1"),
        ("GNU.sparse.map", "0,10,100,20"),
        ("GNU.sparse.map", "0,7"),
    ]);
    let e = SparseEntry::from_pax_records(&recs, 7).unwrap().unwrap();
    assert_eq!(e.real_size, 7, "no size record: the body size");
    assert_eq!(e.map.unwrap().segments(), [seg(0, 7)]);
    let recs = pax(&[
        ("GNU.sparse.numblocks", "1"),
        ("GNU.sparse.map", "0,10,100,20"),
        ("GNU.sparse.offset", "3"),
        ("GNU.sparse.numbytes", "4"),
        ("GNU.sparse.realsize", "9"),
    ]);
    let e = SparseEntry::from_pax_records(&recs, 4).unwrap().unwrap();
    assert_eq!((e.format, e.real_size), (SparseFormat::PaxV00, 9));
    assert_eq!(e.map.unwrap().segments(), [seg(3, 4)]);
    // Explicit 0.1 version with an empty map.
    let recs = pax(&[
        ("GNU.sparse.major", "0"),
        ("GNU.sparse.minor", "1"),
        ("GNU.sparse.numblocks", "0"),
        ("GNU.sparse.size", "10"),
    ]);
    let e = SparseEntry::from_pax_records(&recs, 0).unwrap().unwrap();
    assert_eq!(
        (e.format, e.map.unwrap().data_len()),
        (SparseFormat::PaxV01, 0)
    );
}

#[test]
fn pax_records_that_are_not_sparse() {
    for recs in [
        pax(&[("path", "x")]),
        pax(&[("GNU.sparse.name", "x"), ("GNU.sparse.size", "10")]),
        // An unknown version makes a plain file, whatever the map says.
        pax(&[("GNU.sparse.major", "2"), ("GNU.sparse.map", "x")]),
        pax(&[("GNU.sparse.major", "0"), ("GNU.sparse.map", "0,1")]),
        pax(&[("GNU.sparse.major", "1"), ("GNU.sparse.minor", "00")]),
        // An empty map record clears the map.
        pax(&[("GNU.sparse.map", "0,1"), ("GNU.sparse.map", "")]),
        pax(&[("GNU.sparsely", "1")]),
    ] {
        assert_eq!(
            SparseEntry::from_pax_records(&recs, 5),
            Ok(None),
            "{}",
            recs.escape_ascii()
        );
    }
}

#[test]
fn bad_pax_maps() {
    let base = [("GNU.sparse.size", "100"), ("GNU.sparse.numblocks", "2")];
    for (extra, err) in [
        (
            vec![("GNU.sparse.map", "0,10,50")],
            SparseError::CountMismatch {
                declared: 2,
                values: 3,
            },
        ),
        (
            vec![("GNU.sparse.map", "0,10,50,x")],
            SparseError::Number {
                field: "a GNU.sparse.map number",
            },
        ),
        (
            vec![("GNU.sparse.map", "0,10,,5")],
            SparseError::Number {
                field: "a GNU.sparse.map number",
            },
        ),
        (
            vec![("GNU.sparse.map", "50,10,0,5")],
            SparseError::Unordered { index: 1 },
        ),
        (
            vec![("GNU.sparse.map", "0,10,95,10")],
            SparseError::PastRealSize {
                end: 105,
                real_size: 100,
            },
        ),
        (
            vec![("GNU.sparse.map", "0,10,50,-5")],
            SparseError::Negative { index: 1 },
        ),
        (
            vec![("GNU.sparse.size", "-1"), ("GNU.sparse.map", "0,1,2,3")],
            SparseError::NegativeRealSize { size: -1 },
        ),
        (
            vec![("GNU.sparse.size", "1e3"), ("GNU.sparse.map", "0,1,2,3")],
            SparseError::Number {
                field: "GNU.sparse.size",
            },
        ),
        (
            vec![("GNU.sparse.numblocks", ""), ("GNU.sparse.map", "0,1,2,3")],
            SparseError::Number {
                field: "GNU.sparse.numblocks",
            },
        ),
    ] {
        let mut records = base.to_vec();
        records.extend(extra);
        assert_eq!(
            SparseEntry::from_pax_records(&pax(&records), 15),
            Err(err),
            "{records:?}"
        );
    }
    // 0.0 pairs out of order or with commas: the tracker rejects the whole header.
    for records in [
        vec![("GNU.sparse.numbytes", "1")],
        vec![("GNU.sparse.offset", "1"), ("GNU.sparse.offset", "2")],
        vec![("GNU.sparse.offset", "1,2")],
    ] {
        let mut p = PaxParser::new(true);
        let recs = pax(&records);
        p.feed(&recs, recs.len() as u64).unwrap();
        assert_eq!(
            p.sparse.pair_order_error(),
            Some(SparseError::PairOrder),
            "{records:?}"
        );
    }
    assert_eq!(
        SparseEntry::from_pax_records(b"5 a=b", 0),
        Err(SparseError::Records {
            reason: "record does not end in a newline"
        })
    );
}

/// An old GNU header with the given entries (octal), real size and extension flag.
fn old_gnu(entries: &[(u64, u64)], real: u64, extended: bool) -> [u8; BLOCK_LEN] {
    let mut b = [0u8; BLOCK_LEN];
    b[..4].copy_from_slice(b"file");
    b[crate::proto::tar::TYPEFLAG] = b'S';
    b[257..265].copy_from_slice(b"ustar  \0");
    for (i, (o, l)) in entries.iter().enumerate() {
        let at = OLD_GNU_SPARSE + i * OLD_GNU_ENTRY_LEN;
        b[at..at + 12].copy_from_slice(format!("{o:011o}\0").as_bytes());
        b[at + 12..at + 24].copy_from_slice(format!("{l:011o}\0").as_bytes());
    }
    b[OLD_GNU_IS_EXTENDED] = u8::from(extended);
    b[OLD_GNU_REAL_SIZE].copy_from_slice(format!("{real:011o}\0").as_bytes());
    b
}

fn old_gnu_ext(entries: &[(u64, u64)], extended: bool) -> [u8; BLOCK_LEN] {
    let mut b = [0u8; BLOCK_LEN];
    for (i, (o, l)) in entries.iter().enumerate() {
        let at = i * OLD_GNU_ENTRY_LEN;
        b[at..at + 12].copy_from_slice(format!("{o:011o}\0").as_bytes());
        b[at + 12..at + 24].copy_from_slice(format!("{l:011o}\0").as_bytes());
    }
    b[OLD_GNU_EXT_IS_EXTENDED] = u8::from(extended);
    b
}

#[test]
fn old_gnu_maps() {
    let h = old_gnu(&[(0, 512), (1024, 512)], 4096, false);
    let e = SparseEntry::from_old_gnu(&h, &[], 1024).unwrap();
    assert_eq!((e.format, e.real_size), (SparseFormat::OldGnu, 4096));
    assert_eq!(e.map.unwrap().segments(), [seg(0, 512), seg(1024, 512)]);
    // Four in the header, then two extension blocks; the first ends its list early.
    let h = old_gnu(&[(0, 1), (2, 1), (4, 1), (6, 1)], 100, true);
    let ext1 = old_gnu_ext(&[(8, 1)], true);
    let ext2 = old_gnu_ext(&[(10, 1), (100, 0)], false);
    let e = SparseEntry::from_old_gnu(&h, &[ext1, ext2], 6).unwrap();
    let map = e.map.unwrap();
    assert_eq!(map.segments().len(), 7);
    assert_eq!(map.data_len(), 6);
    assert_eq!(
        SparseEntry::from_old_gnu(&h, &[ext1], 6),
        Err(SparseError::ExtensionChain {
            given: 1,
            chained: 2
        })
    );
    assert_eq!(
        SparseEntry::from_old_gnu(&h, &[ext1, ext2, ext2], 6),
        Err(SparseError::ExtensionChain {
            given: 3,
            chained: 2
        })
    );
    let mut bad = h;
    bad[OLD_GNU_SPARSE + 2] = b'9';
    assert_eq!(
        SparseEntry::from_old_gnu(&bad, &[ext1, ext2], 6),
        Err(SparseError::Number {
            field: "an old GNU sparse entry"
        })
    );
    let mut ustar = h;
    ustar[257..265].copy_from_slice(b"ustar\x0000");
    assert_eq!(
        SparseEntry::from_old_gnu(&ustar, &[], 6),
        Err(SparseError::NotOldGnu)
    );
    let h = old_gnu(&[(0, 10), (5, 10)], 100, false);
    assert_eq!(
        SparseEntry::from_old_gnu(&h, &[], 20),
        Err(SparseError::Unordered { index: 1 })
    );
    let h = old_gnu(&[(0, 10)], 5, false);
    assert_eq!(
        SparseEntry::from_old_gnu(&h, &[], 10),
        Err(SparseError::PastRealSize {
            end: 10,
            real_size: 5
        })
    );
}
