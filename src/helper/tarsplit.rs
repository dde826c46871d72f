//! Reader of containers-storage's tar-split files (`overlay-layers/<layer-id>.tar-split.gz`).
//!
//! A tar-split file is gzip-compressed NDJSON, one entry per line (vbatts/tar-split `storage.Entry`):
//!
//! | `type` | meaning | fields |
//! |---|---|---|
//! | 2 | segment: raw tar bytes, copied verbatim | `payload` (base64) |
//! | 1 | file: the body of the preceding header | `name` or `name_raw` (base64), `size`, `payload` = CRC-64/ISO, big-endian, base64 |
//!
//! Every line carries `position`, counting entries from 0. Concatenating the segments and the
//! file bodies in order gives back the exact layer tar.

use std::io::{BufRead, BufReader, Read};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

/// Longest accepted NDJSON line. A line holds one segment (a tar header with its PAX/GNU extension
/// blocks and the previous body's padding) or one file record; this bounds the memory one line
/// may make the reader allocate, far above what real layers need (PAX records of a few KiB).
pub const MAX_LINE_LEN: usize = 32 << 20;

/// Longest accepted file name in a file record, in bytes. Linux paths stop at 4096 bytes; tar
/// names beyond that could never be opened, so they are rejected before any lookup.
pub const MAX_NAME_LEN: usize = 4096;

/// tar-split entry type of a file record.
const TYPE_FILE: i64 = 1;
/// tar-split entry type of a raw segment.
const TYPE_SEGMENT: i64 = 2;

/// One tar-split entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Raw tar bytes, to be copied verbatim (may be empty).
    Segment(Vec<u8>),
    /// A tar header's body: `size` bytes of the file `name`.
    File(FileEntry),
}

/// A file record: the body that follows a tar header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// The name as recorded (the tar header's name, raw bytes; never empty, never with NUL).
    pub name: Vec<u8>,
    /// Body size in bytes.
    pub size: u64,
    /// CRC-64/ISO of the body, when recorded (tar-split omits it for empty bodies).
    pub crc64: Option<u64>,
    /// The entry's `position` in the tar-split stream.
    pub position: u64,
}

/// One NDJSON line as tar-split writes it (Go `storage.Entry`).
#[derive(Debug, Deserialize)]
struct RawEntry {
    #[serde(rename = "type")]
    kind: i64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    name_raw: Option<String>,
    #[serde(default)]
    size: Option<i64>,
    #[serde(default)]
    payload: Option<String>,
    position: i64,
}

/// Streaming reader of tar-split NDJSON entries.
#[derive(Debug)]
pub struct TarSplitReader<R> {
    inner: R,
    line: Vec<u8>,
    /// 1-based number of the last line read.
    line_no: u64,
    /// The `position` the next entry must carry.
    next_position: u64,
}

impl<R: Read> TarSplitReader<BufReader<flate2::read::MultiGzDecoder<R>>> {
    /// Read a gzip-compressed tar-split file (the `.tar-split.gz` of a layer).
    pub fn from_gzip(compressed: R) -> Self {
        TarSplitReader::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            compressed,
        )))
    }
}

impl<R: BufRead> TarSplitReader<R> {
    /// Read uncompressed NDJSON.
    pub fn new(inner: R) -> Self {
        TarSplitReader {
            inner,
            line: Vec::new(),
            line_no: 0,
            next_position: 0,
        }
    }

    /// The next entry, or `None` at the end.
    ///
    /// # Errors
    /// I/O or decompression errors, a line longer than [`MAX_LINE_LEN`], invalid JSON, an unknown
    /// type, an out-of-order position, bad base64 or an invalid name; each names the line.
    pub fn next_entry(&mut self) -> anyhow::Result<Option<Entry>> {
        if !self.read_line()? {
            return Ok(None);
        }
        let line_no = self.line_no;
        self.parse_line()
            .with_context(|| format!("tar-split line {line_no}"))
            .map(Some)
    }

    /// Read one line (without its newline) into `self.line`; false at EOF.
    fn read_line(&mut self) -> anyhow::Result<bool> {
        self.line.clear();
        let line_no = self.line_no + 1;
        loop {
            let buf = self
                .inner
                .fill_buf()
                .with_context(|| format!("reading tar-split line {line_no}"))?;
            if buf.is_empty() {
                break;
            }
            let (take, done) = match memchr_newline(buf) {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            ensure!(
                self.line.len() + take <= MAX_LINE_LEN,
                "tar-split line {line_no} is longer than {MAX_LINE_LEN} bytes"
            );
            self.line.extend_from_slice(&buf[..take]);
            self.inner.consume(if done { take + 1 } else { take });
            if done {
                self.line_no = line_no;
                return Ok(true);
            }
        }
        if self.line.is_empty() {
            return Ok(false);
        }
        // A last line without its newline is still a line (Go's json.Encoder always writes one,
        // but a reader that insists would gain nothing).
        self.line_no = line_no;
        Ok(true)
    }

    fn parse_line(&mut self) -> anyhow::Result<Entry> {
        let raw: RawEntry = serde_json::from_slice(&self.line).context("invalid JSON")?;
        ensure!(
            u64::try_from(raw.position).ok() == Some(self.next_position),
            "position {} where {} was expected",
            raw.position,
            self.next_position
        );
        self.next_position += 1;
        let payload = raw
            .payload
            .as_deref()
            .map(|p| BASE64.decode(p).context("payload is not valid base64"))
            .transpose()?;
        match raw.kind {
            TYPE_SEGMENT => Ok(Entry::Segment(payload.unwrap_or_default())),
            TYPE_FILE => {
                let name = match (raw.name_raw, raw.name) {
                    // tar-split keeps non-UTF-8 names in name_raw, which wins when both are set.
                    (Some(raw_name), _) if !raw_name.is_empty() => BASE64
                        .decode(raw_name)
                        .context("name_raw is not valid base64")?,
                    (_, Some(name)) => name.into_bytes(),
                    _ => bail!("file entry without a name"),
                };
                ensure!(!name.is_empty(), "file entry with an empty name");
                ensure!(
                    name.len() <= MAX_NAME_LEN,
                    "file name longer than {MAX_NAME_LEN} bytes"
                );
                ensure!(
                    !name.contains(&0),
                    "file name {} contains a NUL byte",
                    name.escape_ascii()
                );
                let size = raw.size.unwrap_or(0);
                let size = u64::try_from(size)
                    .with_context(|| format!("file {} has size {size}", name.escape_ascii()))?;
                let crc64 = match payload.as_deref() {
                    None | Some([]) => None,
                    Some(p) => Some(u64::from_be_bytes(p.try_into().map_err(|_| {
                        anyhow::anyhow!(
                            "file {} has a {}-byte checksum, expected 8",
                            name.escape_ascii(),
                            p.len()
                        )
                    })?)),
                };
                Ok(Entry::File(FileEntry {
                    name,
                    size,
                    crc64,
                    position: self.next_position - 1,
                }))
            }
            other => bail!("unknown entry type {other}"),
        }
    }
}

impl<R: BufRead> Iterator for TarSplitReader<R> {
    type Item = anyhow::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_entry().transpose()
    }
}

fn memchr_newline(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// Split a tar entry name into the components of a path relative to the layer root.
///
/// `./usr/bin/x`, `usr/bin/x` and `usr//bin/./x` all give `["usr", "bin", "x"]`; the root itself
/// (`./`) gives no components.
///
/// # Errors
/// Absolute names, `..` components and NUL bytes: such a name cannot come from a layer the
/// store unpacked, so it is hostile and never resolved.
pub fn relative_components(name: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    ensure!(
        !name.contains(&0),
        "name {} contains a NUL byte",
        name.escape_ascii()
    );
    ensure!(
        !name.starts_with(b"/"),
        "name {} is absolute",
        name.escape_ascii()
    );
    let mut out = Vec::new();
    for component in name.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => bail!("name {} contains '..'", name.escape_ascii()),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The reversed ISO 3309 polynomial (x^64 + x^4 + x^3 + x + 1), as Go's `crc64.ISO`.
const CRC64_ISO_POLY: u64 = 0xD800_0000_0000_0000;

/// Slicing-by-8 tables: `CRC64_TABLES[0]` is the classic byte table; table `k` advances a byte
/// through `k` further zero bytes, so eight input bytes fold in with eight lookups.
static CRC64_TABLES: [[u64; 256]; 8] = crc64_tables();

const fn crc64_tables() -> [[u64; 256]; 8] {
    let mut tables = [[0u64; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ CRC64_ISO_POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        tables[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[k - 1][i];
            tables[k][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    tables
}

/// CRC-64/ISO (Go `hash/crc64` with the ISO table), as tar-split records it.
///
/// `crc` is the checksum of the data before `data` (0 to start), so
/// `crc64_iso(crc64_iso(0, a), b) == crc64_iso(0, a ++ b)`.
pub fn crc64_iso(crc: u64, data: &[u8]) -> u64 {
    let t = &CRC64_TABLES;
    let mut crc = !crc;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let word = crc ^ u64::from_le_bytes(chunk.try_into().expect("chunks_exact(8)"));
        let b = word.to_le_bytes();
        crc = t[7][b[0] as usize]
            ^ t[6][b[1] as usize]
            ^ t[5][b[2] as usize]
            ^ t[4][b[3] as usize]
            ^ t[3][b[4] as usize]
            ^ t[2][b[5] as usize]
            ^ t[1][b[6] as usize]
            ^ t[0][b[7] as usize];
    }
    for &byte in chunks.remainder() {
        crc = t[0][((crc ^ u64::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Bit-at-a-time reference implementation.
    fn crc64_naive(data: &[u8]) -> u64 {
        let mut crc = !0u64;
        for &b in data {
            crc ^= u64::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ CRC64_ISO_POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn crc64_iso_check_value() {
        assert_eq!(crc64_iso(0, b"123456789"), 0xB909_56C7_75A4_1001);
        assert_eq!(crc64_iso(0, b""), 0);
    }

    #[test]
    fn crc64_iso_matches_naive_and_is_incremental() {
        let data: Vec<u8> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 999, 1000] {
            assert_eq!(
                crc64_iso(0, &data[..len]),
                crc64_naive(&data[..len]),
                "{len}"
            );
        }
        for split in [0, 1, 5, 8, 333, 1000] {
            let (a, b) = data.split_at(split);
            assert_eq!(crc64_iso(crc64_iso(0, a), b), crc64_naive(&data));
        }
    }

    fn gz(text: &str) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn reads_segments_and_files() {
        let crc = crc64_iso(0, b"hello");
        let text = format!(
            concat!(
                r#"{{"type":2,"payload":"AAEC","position":0}}"#,
                "\n",
                r#"{{"type":1,"name":"./etc/x","size":5,"payload":"{}","position":1}}"#,
                "\n",
                r#"{{"type":1,"name_raw":"//4=","payload":null,"position":2}}"#,
                "\n",
                r#"{{"type":2,"payload":"","position":3}}"#,
                "\n"
            ),
            BASE64.encode(crc.to_be_bytes())
        );
        let entries: Vec<Entry> = TarSplitReader::from_gzip(&gz(&text)[..])
            .collect::<anyhow::Result<_>>()
            .unwrap();
        assert_eq!(
            entries,
            vec![
                Entry::Segment(vec![0, 1, 2]),
                Entry::File(FileEntry {
                    name: b"./etc/x".to_vec(),
                    size: 5,
                    crc64: Some(crc),
                    position: 1
                }),
                Entry::File(FileEntry {
                    name: vec![0xff, 0xfe],
                    size: 0,
                    crc64: None,
                    position: 2
                }),
                Entry::Segment(vec![]),
            ]
        );
    }

    fn first_error(text: &str) -> String {
        let err = TarSplitReader::new(text.as_bytes())
            .find_map(Result::err)
            .expect("an error");
        format!("{err:#}")
    }

    #[test]
    fn rejects_bad_lines() {
        assert_eq!(
            first_error(
                "{\"type\":2,\"payload\":\"\",\"position\":0}\n{\"type\":3,\"position\":1}\n"
            ),
            "tar-split line 2: unknown entry type 3"
        );
        assert_eq!(
            first_error("{\"type\":2,\"position\":1}\n"),
            "tar-split line 1: position 1 where 0 was expected"
        );
        assert!(
            first_error("{\"type\":1,\"name\":\"a\\u0000b\",\"position\":0}")
                .contains("contains a NUL byte")
        );
        assert!(first_error("{\"type\":1,\"position\":0}").contains("without a name"));
        assert!(
            first_error("{\"type\":1,\"name\":\"a\",\"size\":-1,\"position\":0}")
                .contains("has size -1")
        );
        assert!(
            first_error(
                "{\"type\":1,\"name\":\"a\",\"size\":1,\"payload\":\"AAE=\",\"position\":0}"
            )
            .contains("2-byte checksum")
        );
        assert!(first_error("not json\n").starts_with("tar-split line 1: invalid JSON"));
        let long = format!("\"{}\"", "x".repeat(MAX_LINE_LEN));
        assert!(first_error(&long).contains("longer than"));
    }

    #[test]
    fn relative_components_normalise_and_reject() {
        assert_eq!(
            relative_components(b"./usr//bin/./x").unwrap(),
            vec![&b"usr"[..], b"bin", b"x"]
        );
        assert!(relative_components(b"./").unwrap().is_empty());
        for bad in [&b"/etc/passwd"[..], b"a/../../b", b"..", b"a\0b"] {
            assert!(relative_components(bad).is_err(), "{}", bad.escape_ascii());
        }
    }
}
