//! Decodes every ```` ```hex ```` example of `proto/splitfdstream.md` with the real reader and
//! checks the `expect:` and `fd-check:` lines that follow it (notation: §9 of that file).

use std::os::fd::{AsFd, OwnedFd};

use splitfdstream::proto::stream::{Item, Reader, StreamError, check_file_fd};
use splitfdstream::proto::tar::TarError;

const SPEC: &str = include_str!("../proto/splitfdstream.md");

/// One example: its bytes and expectations, with the spec line of its block for messages.
#[derive(Debug)]
struct Example {
    line: usize,
    bytes: Vec<u8>,
    expect: String,
    fd_checks: Vec<String>,
}

/// Parse the hex notation: `hh`, `hh*N`, `"text"`, `#` comments.
fn parse_hex(text: &str, line: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '#' {
            while chars.next_if(|&c| c != '\n').is_some() {}
        } else if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(c) if c.is_ascii() => out.push(c as u8),
                    other => panic!("spec line {line}: bad string literal at {other:?}"),
                }
            }
        } else {
            let mut token = String::new();
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                token.push(c);
            }
            let (byte, count) = match token.split_once('*') {
                Some((b, n)) => (b, n.parse::<usize>().expect("repeat count")),
                None => (token.as_str(), 1),
            };
            assert_eq!(byte.len(), 2, "spec line {line}: bad token {token:?}");
            let byte = u8::from_str_radix(byte, 16)
                .unwrap_or_else(|_| panic!("spec line {line}: bad token {token:?}"));
            out.extend(std::iter::repeat_n(byte, count));
        }
    }
    out
}

fn examples() -> Vec<Example> {
    let lines: Vec<&str> = SPEC.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```hex" {
            i += 1;
            continue;
        }
        let start = i + 1;
        let end = start
            + lines[start..]
                .iter()
                .position(|l| l.trim_end() == "```")
                .expect("closing fence");
        let bytes = parse_hex(&lines[start..end].join("\n"), start + 1);
        let expect = lines
            .get(end + 1)
            .and_then(|l| l.strip_prefix("expect: "))
            .unwrap_or_else(|| panic!("spec line {}: no `expect:` after the block", end + 2))
            .to_string();
        let mut k = end + 2;
        let mut fd_checks = Vec::new();
        while let Some(check) = lines.get(k).and_then(|l| l.strip_prefix("fd-check: ")) {
            fd_checks.push(check.to_string());
            k += 1;
        }
        found.push(Example {
            line: start,
            bytes,
            expect,
            fd_checks,
        });
        i = k;
    }
    found
}

/// Variant name and fields of an error, as the spec writes them.
fn describe(e: &StreamError) -> (&'static str, Vec<(&'static str, String)>) {
    use StreamError as E;
    let s = |v: &dyn ToString| v.to_string();
    match e {
        E::TruncatedPrefix { offset, got } => (
            "TruncatedPrefix",
            vec![("offset", s(offset)), ("got", s(got))],
        ),
        E::BadPrefix { offset } => ("BadPrefix", vec![("offset", s(offset))]),
        E::InlineTooLong { offset, len } => (
            "InlineTooLong",
            vec![("offset", s(offset)), ("len", s(len))],
        ),
        E::TruncatedChunk { offset, len, got } => (
            "TruncatedChunk",
            vec![("offset", s(offset)), ("len", s(len)), ("got", s(got))],
        ),
        E::FdIndexOutOfOrder {
            offset,
            index,
            expected,
        } => (
            "FdIndexOutOfOrder",
            vec![
                ("offset", s(offset)),
                ("index", s(index)),
                ("expected", s(expected)),
            ],
        ),
        E::UnexpectedFdRef {
            offset,
            index,
            tar_offset,
            position,
        } => (
            "UnexpectedFdRef",
            vec![
                ("offset", s(offset)),
                ("index", s(index)),
                ("tar_offset", s(tar_offset)),
                ("position", format!("{position:?}")),
            ],
        ),
        E::BadTarHeader { offset, source } => {
            let (kind, tar_offset) = match source {
                TarError::Checksum { offset } => ("Checksum", offset),
                TarError::SizeField { offset } => ("SizeField", offset),
                TarError::NegativeSize { offset, .. } => ("NegativeSize", offset),
                TarError::ExtensionTooLong { offset, .. } => ("ExtensionTooLong", offset),
                TarError::PaxRecord { offset, .. } => ("PaxRecord", offset),
                TarError::SparseNotGnu { offset } => ("SparseNotGnu", offset),
                TarError::SizeOverflow { offset, .. } => ("SizeOverflow", offset),
                TarError::OffsetOverflow { offset, .. } => ("OffsetOverflow", offset),
                other => panic!("unexpected tar error {other:?}"),
            };
            (
                "BadTarHeader",
                vec![
                    ("offset", s(offset)),
                    ("kind", kind.to_string()),
                    ("tar_offset", s(tar_offset)),
                ],
            )
        }
        E::TruncatedStream {
            offset,
            tar_offset,
            position,
        } => (
            "TruncatedStream",
            vec![
                ("offset", s(offset)),
                ("tar_offset", s(tar_offset)),
                ("position", format!("{position:?}")),
            ],
        ),
        E::FdNotRegular {
            offset,
            index,
            file_type,
        } => (
            "FdNotRegular",
            vec![
                ("offset", s(offset)),
                ("index", s(index)),
                ("file_type", file_type.to_string()),
            ],
        ),
        E::FdSizeMismatch {
            offset,
            index,
            expected,
            actual,
        } => (
            "FdSizeMismatch",
            vec![
                ("offset", s(offset)),
                ("index", s(index)),
                ("expected", s(expected)),
                ("actual", s(actual)),
            ],
        ),
        other => panic!("error without a spec description: {other:?}"),
    }
}

/// Check `e` against `error NAME key=value…`; returns NAME.
fn check_error(e: &StreamError, want: &str, ctx: &str) -> String {
    let mut words = want.split_whitespace();
    let name = words.next().expect("error name");
    let (got_name, fields) = describe(e);
    assert_eq!(got_name, name, "{ctx}: got {e:?}");
    let mut listed = 0;
    for kv in words {
        let (k, v) = kv.split_once('=').expect("key=value");
        let got = fields
            .iter()
            .find(|(f, _)| *f == k)
            .unwrap_or_else(|| panic!("{ctx}: {name} has no field {k}"));
        assert_eq!(got.1, v, "{ctx}: field {k} of {e:?}");
        listed += 1;
    }
    assert_eq!(listed, fields.len(), "{ctx}: list every field of {e:?}");
    // Messages name the stream offset.
    let offset = &fields
        .iter()
        .find(|(f, _)| *f == "offset")
        .expect("offset")
        .1;
    assert!(
        e.to_string().contains(&format!("offset {offset}")),
        "{ctx}: message {e} does not name offset {offset}"
    );
    name.to_string()
}

fn memfd(len: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("spec-body", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    fd
}

/// A decoded item with the stream offset of its prefix.
struct Decoded {
    offset: u64,
    text: String,
    fd: Option<(u64, u64)>,
}

#[test]
fn spec_examples_decode_as_documented() {
    let examples = examples();
    assert!(examples.len() >= 10, "only {} examples", examples.len());
    let mut errors_shown = std::collections::BTreeSet::new();
    for ex in &examples {
        let ctx = format!("example at spec line {}", ex.line);
        let mut r = Reader::new(ex.bytes.as_slice());
        let mut items = Vec::new();
        let result = loop {
            let offset = r.offset();
            match r.next_item() {
                Ok(Some(Item::Inline(d))) => items.push(Decoded {
                    offset,
                    text: format!("inline {}", d.len()),
                    fd: None,
                }),
                Ok(Some(Item::FdRef { index, size })) => items.push(Decoded {
                    offset,
                    text: format!("fd {index} size {size}"),
                    fd: Some((index, size)),
                }),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };

        if let Some(want) = ex.expect.strip_prefix("error ") {
            let e = result.expect_err(&ctx);
            errors_shown.insert(check_error(&e, want, &ctx));
        } else {
            let want = ex.expect.strip_prefix("ok").expect("ok or error");
            result.unwrap_or_else(|e| panic!("{ctx}: {e:?}"));
            let (want_items, counters) = want.split_once(';').expect("';' before counters");
            let got: Vec<&str> = items.iter().map(|i| i.text.as_str()).collect();
            let want_items: Vec<&str> = want_items
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            assert_eq!(got, want_items, "{ctx}");
            let got_counters = format!(
                "entries={} fd_refs={} tar_bytes={} end_of_archive={}",
                r.entries(),
                r.fd_refs(),
                r.tar_bytes(),
                if r.saw_end_of_archive() { "yes" } else { "no" }
            );
            assert_eq!(got_counters, counters.trim(), "{ctx}");
            // Every reference passes the content fd check with a body of the right size.
            for item in &items {
                if let Some((index, size)) = item.fd {
                    check_file_fd(memfd(size).as_fd(), index, size, item.offset)
                        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                }
            }
        }

        for check in &ex.fd_checks {
            let ctx = format!("{ctx}, fd-check {check:?}");
            let (args, want) = check.split_once(" -> ").expect("' -> '");
            let mut args = args.split_whitespace();
            let index: u64 = args
                .next()
                .and_then(|a| a.strip_prefix("index="))
                .and_then(|i| i.parse().ok())
                .expect("index=I");
            let item = items
                .iter()
                .find(|i| i.fd.is_some_and(|(idx, _)| idx == index))
                .unwrap_or_else(|| panic!("{ctx}: no fd item {index}"));
            let size = item.fd.expect("fd item").1;
            let (fd, _keep) = match args.next().expect("memfd=N or pipe") {
                "pipe" => {
                    let (rd, wr) =
                        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
                    (rd, Some(wr))
                }
                m => (
                    memfd(m.strip_prefix("memfd=").unwrap().parse().unwrap()),
                    None,
                ),
            };
            let got = check_file_fd(fd.as_fd(), index, size, item.offset);
            match want.strip_prefix("error ") {
                Some(want) => {
                    errors_shown.insert(check_error(&got.expect_err(&ctx), want, &ctx));
                }
                None => {
                    assert_eq!(want, "ok", "{ctx}");
                    got.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                }
            }
        }
    }
    // Every error of the spec's rejection table that the reader or `check_file_fd` raises has an
    // example.
    for name in [
        "TruncatedPrefix",
        "BadPrefix",
        "InlineTooLong",
        "TruncatedChunk",
        "FdIndexOutOfOrder",
        "UnexpectedFdRef",
        "BadTarHeader",
        "TruncatedStream",
        "FdNotRegular",
        "FdSizeMismatch",
    ] {
        assert!(errors_shown.contains(name), "no example of {name}");
    }
}

#[test]
fn hex_notation() {
    assert_eq!(
        parse_hex("00 ff*3 # comment \"x\"\n\"a b\" 0a", 1),
        [0, 255, 255, 255, b'a', b' ', b'b', 10]
    );
}
