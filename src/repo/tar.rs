//! Just enough tar to split a layer the way composefs-rs 0.9.4 does.
//!
//! composefs stores every regular-file body (type `0`, `\0` or `7`) larger than
//! [`INLINE_CONTENT_MAX`] bytes as an external object and everything else (headers, extension
//! records, small bodies, padding, end-of-archive blocks and trailing bytes) inline. That
//! needs each entry's type and size, which is what [`TarTracker`] follows: it is fed the tar
//! stream and says, for each stretch of bytes, whether it is inline data or part of an
//! external body. It is lenient about everything else (names, times, ids), so a layer that
//! composefs's own importer rejects for an unparsable PAX `mtime` still imports here.
//!
//! Rules mirrored from composefs-rs (its `tar-core` parser):
//! - A zero block followed by another zero block ends the archive; a lone zero block is skipped.
//! - `L`, `K` and `x` are extension records only in ustar/GNU headers (magic check); `g`
//!   always is. PAX `size` overrides the header's size field (octal or GNU base-256).
//! - Header checksums are verified. Sparse entries are refused.

use anyhow::{bail, ensure};

/// composefs-rs `INLINE_CONTENT_MAX_V0`: regular files up to this size stay inline in
/// splitstreams and EROFS images. Changing it changes every object id downstream.
pub(crate) const INLINE_CONTENT_MAX: u64 = 64;

/// Tar block size.
pub(crate) const BLOCK: usize = 512;

/// Most extension-record bytes (PAX, GNU long names) accepted before one entry: they are held
/// in memory. Same limit as composefs-rs's parser.
const MAX_METADATA: u64 = 1 << 20;

/// Most extension records before one entry (composefs-rs's parser allows 16).
const MAX_PENDING_EXTENSIONS: usize = 16;

/// What the next bytes of the tar stream are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Region {
    /// Inline data: headers, extension records, small bodies, padding, trailer.
    Inline,
    /// Part of the body of a regular file stored as an external object.
    ExternalBody {
        /// The body's total size.
        size: u64,
        /// These bytes start the body.
        first: bool,
        /// These bytes complete the body.
        last: bool,
    },
}

#[derive(Debug)]
enum State {
    /// Collecting a 512-byte header block.
    Header { block: Vec<u8> },
    /// Saw one zero block; collecting the next to tell end-of-archive from a stray zero block.
    Zero { block: Vec<u8> },
    /// Inside an extension record's data (and padding).
    Extension {
        left: u64,
        pax: bool,
        data: Vec<u8>,
        data_left: u64,
    },
    /// Inline bytes to pass through (global PAX record, padding).
    Skip { left: u64 },
    /// An entry's body.
    Body {
        size: u64,
        left: u64,
        external: bool,
        padding: u64,
    },
    /// After the end-of-archive blocks: everything is inline.
    Trailer,
}

/// Extension records seen since the last entry.
#[derive(Debug, Default)]
struct Pending {
    pax_size: Option<u64>,
    sparse: bool,
    count: usize,
    metadata: u64,
}

/// Follows a tar stream's structure (see the module docs).
#[derive(Debug)]
pub(crate) struct TarTracker {
    state: State,
    pending: Pending,
    /// Bytes of tar consumed.
    offset: u64,
}

impl TarTracker {
    pub(crate) fn new() -> Self {
        TarTracker {
            state: State::Header {
                block: Vec::with_capacity(BLOCK),
            },
            pending: Pending::default(),
            offset: 0,
        }
    }

    /// Bytes of tar consumed so far.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Consume a prefix of `data`: returns its length (≥ 1 when `data` is not empty) and what
    /// it is.
    pub(crate) fn advance(&mut self, data: &[u8]) -> anyhow::Result<(usize, Region)> {
        if data.is_empty() {
            return Ok((0, Region::Inline));
        }
        let start = self.offset;
        let (n, region) = match &mut self.state {
            State::Header { block } | State::Zero { block } => {
                let n = (BLOCK - block.len()).min(data.len());
                block.extend_from_slice(&data[..n]);
                if block.len() == BLOCK {
                    self.offset += n as u64;
                    self.on_block()?;
                    return Ok((n, Region::Inline));
                }
                (n, Region::Inline)
            }
            State::Extension {
                left,
                pax,
                data: collected,
                data_left,
            } => {
                let n = (*left).min(data.len() as u64) as usize;
                if *pax && *data_left > 0 {
                    let take = (*data_left).min(n as u64) as usize;
                    collected.extend_from_slice(&data[..take]);
                    *data_left -= take as u64;
                }
                *left -= n as u64;
                if *left == 0 {
                    let (pax, collected) = (*pax, std::mem::take(collected));
                    if pax {
                        self.on_pax(&collected, start)?;
                    }
                    self.state = State::Header {
                        block: Vec::with_capacity(BLOCK),
                    };
                }
                (n, Region::Inline)
            }
            State::Skip { left } => {
                let n = (*left).min(data.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    self.state = State::Header {
                        block: Vec::with_capacity(BLOCK),
                    };
                }
                (n, Region::Inline)
            }
            State::Body {
                size,
                left,
                external,
                padding,
            } => {
                let n = (*left).min(data.len() as u64) as usize;
                let region = if *external {
                    Region::ExternalBody {
                        size: *size,
                        first: *left == *size,
                        last: *left == n as u64,
                    }
                } else {
                    Region::Inline
                };
                *left -= n as u64;
                if *left == 0 {
                    self.state = after_body(*padding);
                }
                (n, region)
            }
            State::Trailer => (data.len(), Region::Inline),
        };
        self.offset += n as u64;
        Ok((n, region))
    }

    /// A whole body of `size` bytes arrives at once (as a file). Returns whether it is stored
    /// externally.
    pub(crate) fn take_body(&mut self, size: u64) -> anyhow::Result<bool> {
        match self.state {
            State::Body {
                size: want,
                left,
                external,
                padding,
            } if left == want => {
                ensure!(
                    size == want,
                    "a {size}-byte file body at tar offset {}, but the header says {want}",
                    self.offset
                );
                self.offset += size;
                self.state = after_body(padding);
                Ok(external)
            }
            State::Body { .. } => bail!(
                "a file body at tar offset {}, in the middle of an entry's body",
                self.offset
            ),
            _ => bail!(
                "a file body at tar offset {}, where no entry body starts",
                self.offset
            ),
        }
    }

    /// The stream may end here: at a header boundary (composefs accepts a tar without
    /// end-of-archive blocks) or after the end-of-archive blocks.
    pub(crate) fn check_complete(&self) -> anyhow::Result<()> {
        match &self.state {
            State::Trailer => Ok(()),
            State::Header { block } if block.is_empty() => {
                ensure!(
                    self.pending.count == 0,
                    "tar ends after an extension record at offset {}",
                    self.offset
                );
                Ok(())
            }
            s => bail!("tar truncated at offset {} ({})", self.offset, describe(s)),
        }
    }

    /// A complete 512-byte block has been collected.
    fn on_block(&mut self) -> anyhow::Result<()> {
        let block_start = self.offset - BLOCK as u64;
        let (was_zero, block) = match std::mem::replace(&mut self.state, State::Trailer) {
            State::Header { block } => (false, block),
            State::Zero { block } => (true, block),
            _ => unreachable!("on_block outside header states"),
        };
        let h: &[u8; BLOCK] = block.as_slice().try_into().expect("a full block");
        if h.iter().all(|&b| b == 0) {
            if was_zero {
                // Two zero blocks: end of archive. Whatever follows is kept verbatim.
                self.state = State::Trailer;
            } else {
                self.state = State::Zero {
                    block: Vec::with_capacity(BLOCK),
                };
            }
            return Ok(());
        }
        // (A lone zero block before this one is simply skipped.)
        let stored = octal(&h[148..156]).ok_or_else(|| {
            anyhow::anyhow!("tar header at offset {block_start}: unparsable checksum field")
        })?;
        let computed: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    u64::from(b' ')
                } else {
                    u64::from(b)
                }
            })
            .sum();
        ensure!(
            stored == computed,
            "tar header at offset {block_start}: checksum {stored}, computed {computed}"
        );
        let typeflag = h[156];
        let size = numeric(&h[124..136]).ok_or_else(|| {
            anyhow::anyhow!("tar header at offset {block_start}: unparsable size field")
        })?;
        let ustar = &h[257..263] == b"ustar\0" && &h[263..265] == b"00";
        let gnu = &h[257..263] == b"ustar " && &h[263..265] == b" \0";
        let extension_format = ustar || gnu;
        let padded = size.checked_next_multiple_of(BLOCK as u64).ok_or_else(|| {
            anyhow::anyhow!("tar header at offset {block_start}: size {size} overflows")
        })?;
        match typeflag {
            b'L' | b'K' | b'x' if extension_format => {
                self.pending.count += 1;
                self.pending.metadata += size;
                ensure!(
                    self.pending.count <= MAX_PENDING_EXTENSIONS,
                    "tar header at offset {block_start}: more than {MAX_PENDING_EXTENSIONS} \
                     extension records in a row"
                );
                ensure!(
                    self.pending.metadata <= MAX_METADATA,
                    "tar header at offset {block_start}: more than {MAX_METADATA} bytes of \
                     extension records for one entry"
                );
                let pax = typeflag == b'x';
                self.state = if padded == 0 {
                    if pax {
                        self.on_pax(&[], block_start)?;
                    }
                    State::Header {
                        block: Vec::with_capacity(BLOCK),
                    }
                } else {
                    State::Extension {
                        left: padded,
                        pax,
                        data: Vec::new(),
                        data_left: if pax { size } else { 0 },
                    }
                };
            }
            b'g' => {
                self.state = if padded == 0 {
                    State::Header {
                        block: Vec::with_capacity(BLOCK),
                    }
                } else {
                    State::Skip { left: padded }
                };
            }
            b'S' if extension_format => {
                bail!("tar entry at offset {block_start}: sparse files are not supported")
            }
            _ => {
                let pending = std::mem::take(&mut self.pending);
                ensure!(
                    !pending.sparse,
                    "tar entry at offset {block_start}: sparse files are not supported"
                );
                let size = pending.pax_size.unwrap_or(size);
                let padded = size.checked_next_multiple_of(BLOCK as u64).ok_or_else(|| {
                    anyhow::anyhow!("tar entry at offset {block_start}: size {size} overflows")
                })?;
                let is_file = matches!(typeflag, b'0' | 0 | b'7');
                let external = is_file && size > INLINE_CONTENT_MAX;
                self.state = if size == 0 {
                    after_body(padded)
                } else {
                    State::Body {
                        size,
                        left: size,
                        external,
                        padding: padded - size,
                    }
                };
            }
        }
        Ok(())
    }

    /// Interpret a PAX extended header's records: `size` and sparse markers matter here.
    fn on_pax(&mut self, data: &[u8], at: u64) -> anyhow::Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            // "<len> <key>=<value>\n", len counting the whole record.
            let sp = rest
                .iter()
                .position(|&b| b == b' ')
                .ok_or_else(|| anyhow::anyhow!("PAX header at offset {at}: malformed record"))?;
            let len: usize = std::str::from_utf8(&rest[..sp])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("PAX header at offset {at}: bad record length"))?;
            ensure!(
                len > sp + 1 && len <= rest.len() && rest[len - 1] == b'\n',
                "PAX header at offset {at}: record length {len} out of range"
            );
            let rec = &rest[sp + 1..len - 1];
            let eq = rec
                .iter()
                .position(|&b| b == b'=')
                .ok_or_else(|| anyhow::anyhow!("PAX header at offset {at}: record without '='"))?;
            let (key, value) = (&rec[..eq], &rec[eq + 1..]);
            if key == b"size" {
                let v = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "PAX header at offset {at}: invalid size {:?}",
                            String::from_utf8_lossy(value)
                        )
                    })?;
                self.pending.pax_size = Some(v);
            } else if key.starts_with(b"GNU.sparse.") {
                self.pending.sparse = true;
            }
            rest = &rest[len..];
        }
        Ok(())
    }
}

fn after_body(padding: u64) -> State {
    if padding == 0 {
        State::Header {
            block: Vec::with_capacity(BLOCK),
        }
    } else {
        State::Skip { left: padding }
    }
}

fn describe(s: &State) -> String {
    match s {
        State::Header { block } => format!("inside a header block, {} of 512 bytes", block.len()),
        State::Zero { .. } => "after a single zero block".to_owned(),
        State::Extension { left, .. } => format!("{left} bytes short in an extension record"),
        State::Skip { left } => format!("{left} bytes of padding missing"),
        State::Body { left, .. } => format!("{left} bytes of an entry body missing"),
        State::Trailer => "after the end".to_owned(),
    }
}

/// Whitespace tar numeric fields are padded with.
fn is_tar_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// An octal field: up to the first NUL, surrounding whitespace trimmed, empty = 0.
fn octal(field: &[u8]) -> Option<u64> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let f = &field[..end];
    let start = f.iter().position(|&b| !is_tar_space(b)).unwrap_or(f.len());
    let stop = f
        .iter()
        .rposition(|&b| !is_tar_space(b))
        .map_or(start, |p| p + 1);
    let digits = &f[start..stop.max(start)];
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok()
}

/// A numeric field: GNU base-256 when the top bit of the first byte is set, else octal.
fn numeric(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(&b0) if b0 & 0x80 != 0 => {
            let mut v: u64 = 0;
            for (i, &b) in field.iter().enumerate() {
                let b = if i == 0 { b & 0x7f } else { b };
                if v > u64::MAX >> 8 {
                    return None;
                }
                v = (v << 8) | u64::from(b);
            }
            Some(v)
        }
        _ => octal(field),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, typeflag: u8, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    /// Feed `tar` in `step`-byte pieces and collect (region, len) runs.
    fn regions(tar: &[u8], step: usize) -> Vec<(Region, usize)> {
        let mut t = TarTracker::new();
        let mut out: Vec<(Region, usize)> = Vec::new();
        for piece in tar.chunks(step) {
            let mut p = piece;
            while !p.is_empty() {
                let (n, r) = t.advance(p).unwrap();
                let r = match r {
                    Region::ExternalBody { size, .. } => Region::ExternalBody {
                        size,
                        first: false,
                        last: false,
                    },
                    r => r,
                };
                match out.last_mut() {
                    Some((lr, ln)) if *lr == r => *ln += n,
                    _ => out.push((r, n)),
                }
                p = &p[n..];
            }
        }
        t.check_complete().unwrap();
        out
    }

    #[test]
    fn small_inline_large_external_regardless_of_feeding() {
        let mut tar = Vec::new();
        tar.extend_from_slice(&header("small", b'0', 64));
        tar.extend_from_slice(&[1u8; 512]);
        tar.extend_from_slice(&header("big", b'0', 65));
        tar.extend_from_slice(&[2u8; 65]);
        tar.extend_from_slice(&[0u8; 512 - 65]);
        tar.extend_from_slice(&header("link", b'1', 0));
        tar.extend_from_slice(&[0u8; 1024 + 512 * 3]);
        let ext = Region::ExternalBody {
            size: 65,
            first: false,
            last: false,
        };
        let want = vec![
            (Region::Inline, 512 * 3),
            (ext, 65),
            (Region::Inline, 512 - 65 + 512 + 1024 + 512 * 3),
        ];
        for step in [1, 7, 512, 100000] {
            assert_eq!(regions(&tar, step), want, "step {step}");
        }
    }

    #[test]
    fn pax_size_overrides_and_checksum_is_checked() {
        let rec = b"13 size=1000\n";
        let mut tar = Vec::new();
        tar.extend_from_slice(&header("pax", b'x', rec.len() as u64));
        let mut data = rec.to_vec();
        data.resize(512, 0);
        tar.extend_from_slice(&data);
        tar.extend_from_slice(&header("f", b'0', 5));
        tar.extend_from_slice(&vec![3u8; 1024]);
        let r = regions(&tar, 300);
        assert_eq!(
            r[1],
            (
                Region::ExternalBody {
                    size: 1000,
                    first: false,
                    last: false
                },
                1000
            )
        );

        let mut bad = header("f", b'0', 5);
        bad[0] = b'g';
        let err = TarTracker::new().advance(&bad).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn lone_zero_block_is_skipped_and_truncation_detected() {
        let mut tar = vec![0u8; 512];
        tar.extend_from_slice(&header("f", b'0', 100));
        let mut t = TarTracker::new();
        let mut p = &tar[..];
        while !p.is_empty() {
            let (n, _) = t.advance(p).unwrap();
            p = &p[n..];
        }
        let err = t.check_complete().unwrap_err();
        assert!(
            err.to_string().contains("tar truncated at offset 1024"),
            "{err}"
        );
        assert!(t.take_body(100).unwrap());
    }

    #[test]
    fn base256_size() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 0x42;
        assert_eq!(numeric(&f), Some(0x42));
        assert_eq!(numeric(b"00000000017\0"), Some(15));
        assert_eq!(numeric(b"     17 \0\0\0\0"), Some(15));
    }
}
