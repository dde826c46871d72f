//! Which bytes of a layer tar become objects, the way composefs-rs 0.9.4 splits a layer.
//!
//! composefs stores every regular-file body (type `0`, `\0` or `7`) larger than
//! [`INLINE_CONTENT_MAX`] bytes as an external object and everything else (headers, extension
//! records, small bodies, padding, end-of-archive blocks and trailing bytes) inline. That needs
//! each entry's type and size; [`TarTracker`] takes them from [`crate::proto::tar::Tracker`],
//! the framer the splitfdstream reader uses. So the importer frames a layer exactly as the
//! stream that carries it is framed (as Go's `archive/tar`, and so tar-split and podman, frame
//! it), and a body the reader announces as an fd is always one the importer expects.
//!
//! Where composefs-rs has no rule the Go framing decides:
//! - Sparse entries (old GNU `S`, PAX `GNU.sparse.*`), which composefs-rs refuses, are
//!   imported with their body (the archive's map and data segments, not the file) inline, so
//!   the layer and its diff_id are kept; composefs builds no image of such a layer.
//! - Header-only types (`1`–`6`, and `\0` with a name ending in `/`) have no body whatever
//!   their size field says.
//! - One zero block ends the archive; what follows is kept inline as trailer.
//! - `x`, `L` and `K` are extension headers whatever the header's magic (tar-core, composefs's
//!   parser, wants ustar or GNU magic), each at most 1 MiB; as the framer keeps none of their
//!   data, their number before an entry is not limited.
//!
//! It looks at nothing else (names, times, ids), so a layer that composefs's own importer
//! rejects for an unparsable PAX `mtime` still imports here.

use anyhow::{bail, ensure};

use crate::proto::tar::Tracker;

/// composefs-rs `INLINE_CONTENT_MAX_V0`: regular files up to this size stay inline in
/// splitstreams and EROFS images. Changing it changes every object id downstream.
pub(crate) const INLINE_CONTENT_MAX: u64 = 64;

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

/// Follows a tar stream's structure (see the module docs).
#[derive(Debug)]
pub(crate) struct TarTracker {
    framer: Tracker,
}

/// Whether a regular-file body is stored as an object: composefs's size rule, and never the
/// archive bytes of a sparse entry (they are not the file's content).
fn is_external(size: u64, sparse: bool) -> bool {
    size > INLINE_CONTENT_MAX && !sparse
}

impl TarTracker {
    pub(crate) fn new() -> Self {
        TarTracker {
            framer: Tracker::new(),
        }
    }

    /// Bytes of tar consumed so far.
    pub(crate) fn offset(&self) -> u64 {
        self.framer.offset()
    }

    /// Consume a prefix of `data`: returns its length (≥ 1 when `data` is not empty) and what
    /// it is.
    ///
    /// # Errors
    /// Invalid tar (checksum, size field, sizes past 2^64, PAX records…), naming the offset.
    pub(crate) fn advance(&mut self, data: &[u8]) -> anyhow::Result<(usize, Region)> {
        if let Some(body) = self.framer.file_body()
            && is_external(body.size, body.sparse)
        {
            // `n` ≤ what is left of the body, so the framer stops at its end.
            let n = body.remaining.min(data.len() as u64);
            self.framer.feed(&data[..n as usize])?;
            let region = Region::ExternalBody {
                size: body.size,
                first: body.remaining == body.size,
                last: n == body.remaining,
            };
            return Ok((n as usize, region));
        }
        // Up to the next header that starts a regular-file body (the framer stops there).
        let n = self.framer.advance(data)?;
        Ok((n, Region::Inline))
    }

    /// A whole body of `size` bytes arrives at once (as a file). Returns whether it is stored
    /// externally.
    ///
    /// # Errors
    /// No regular-file body starts here, or the header declares another size.
    pub(crate) fn take_body(&mut self, size: u64) -> anyhow::Result<bool> {
        let offset = self.framer.offset();
        match self.framer.file_body() {
            Some(body) if body.remaining == body.size => {
                ensure!(
                    size == body.size,
                    "a {size}-byte file body at tar offset {offset}, but the header says {}",
                    body.size
                );
                self.framer.skip_file_body()?;
                Ok(is_external(body.size, body.sparse))
            }
            Some(_) => {
                bail!("a file body at tar offset {offset}, in the middle of an entry's body")
            }
            None => bail!("a file body at tar offset {offset}, where no entry body starts"),
        }
    }

    /// The stream may end here: at an entry boundary (composefs accepts a tar without
    /// end-of-archive blocks) or after the first end-of-archive block.
    ///
    /// # Errors
    /// The tar is cut inside an entry, or between an extension header and its entry.
    pub(crate) fn check_complete(&self) -> anyhow::Result<()> {
        ensure!(
            self.framer.at_clean_end(),
            "tar truncated at offset {} (inside {})",
            self.framer.offset(),
            self.framer.position()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::tar::BLOCK_LEN as BLOCK;

    fn header(name: &str, typeflag: u8, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        checksum(&mut h);
        h
    }

    fn gnu_header(name: &str, typeflag: u8, size: u64) -> [u8; BLOCK] {
        let mut h = header(name, typeflag, size);
        h[257..265].copy_from_slice(b"ustar  \0");
        checksum(&mut h);
        h
    }

    fn checksum(h: &mut [u8; BLOCK]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }

    /// Feed `tar` in `step`-byte pieces and collect (region, len) runs.
    fn regions(tar: &[u8], step: usize) -> Vec<(Region, usize)> {
        let mut t = TarTracker::new();
        let mut out: Vec<(Region, usize)> = Vec::new();
        for piece in tar.chunks(step) {
            let mut p = piece;
            while !p.is_empty() {
                let (n, r) = t.advance(p).unwrap();
                assert!(n > 0);
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

    fn external(size: u64) -> Region {
        Region::ExternalBody {
            size,
            first: false,
            last: false,
        }
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
        let want = vec![
            (Region::Inline, 512 * 3),
            (external(65), 65),
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
        assert_eq!(r[1], (external(1000), 1000));

        let mut bad = header("f", b'0', 5);
        bad[0] = b'g';
        let err = TarTracker::new().advance(&bad).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn header_only_types_and_old_style_directories_have_no_body() {
        let mut tar = Vec::new();
        // Size fields Go ignores: a hard link, a directory, a '\0' entry named "d/".
        tar.extend_from_slice(&header("hl", b'1', 4096));
        tar.extend_from_slice(&header("dir", b'5', 4096));
        tar.extend_from_slice(&header("d/", 0, 4096));
        // A '\0' entry with a plain name is a regular file.
        tar.extend_from_slice(&header("d/f", 0, 100));
        tar.extend_from_slice(&[5u8; 512]);
        tar.extend_from_slice(&[0u8; 1024]);
        assert_eq!(
            regions(&tar, 512),
            vec![
                (Region::Inline, 512 * 4),
                (external(100), 100),
                (Region::Inline, 412 + 1024)
            ]
        );
    }

    #[test]
    fn sparse_bodies_stay_inline() {
        // Old GNU sparse with one extension block, then a PAX sparse (1.0) entry.
        let mut tar = Vec::new();
        let mut s = gnu_header("s", b'S', 8192);
        s[482] = 1;
        checksum(&mut s);
        tar.extend_from_slice(&s);
        tar.extend_from_slice(&[0u8; 512]);
        tar.extend_from_slice(&[6u8; 8192]);
        let recs = b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n";
        tar.extend_from_slice(&header("p", b'x', recs.len() as u64));
        let mut data = recs.to_vec();
        data.resize(512, 0);
        tar.extend_from_slice(&data);
        tar.extend_from_slice(&header("GNUSparseFile.0/q", b'0', 1024));
        tar.extend_from_slice(&[7u8; 1024]);
        tar.extend_from_slice(&[0u8; 1024]);
        assert_eq!(regions(&tar, 1000), vec![(Region::Inline, tar.len())]);
        // Arriving as a file, a sparse body is not stored as an object either.
        let mut t = TarTracker::new();
        assert_eq!(t.advance(&tar).unwrap(), (1024, Region::Inline));
        assert!(!t.take_body(8192).unwrap());
    }

    #[test]
    fn one_zero_block_ends_the_archive_and_truncation_is_detected() {
        let mut tar = vec![0u8; 512];
        tar.extend_from_slice(&header("f", b'0', 100));
        assert_eq!(regions(&tar, 100), vec![(Region::Inline, 1024)]);

        let mut t = TarTracker::new();
        let tar = header("f", b'0', 100);
        let mut p = &tar[..];
        while !p.is_empty() {
            let (n, _) = t.advance(p).unwrap();
            p = &p[n..];
        }
        let err = t.check_complete().unwrap_err();
        assert_eq!(
            err.to_string(),
            "tar truncated at offset 512 (inside a regular-file body)"
        );
        let err = t.take_body(99).unwrap_err();
        assert!(err.to_string().contains("the header says 100"), "{err}");
        assert!(t.take_body(100).unwrap());
        t.check_complete().unwrap_err();
        let err = t.take_body(100).unwrap_err();
        assert!(
            err.to_string().contains("where no entry body starts"),
            "{err}"
        );
    }

    #[test]
    fn sizes_past_2_pow_64_are_errors() {
        // Two bodies of 2^63 - 1 bytes (base-256 size fields), each taken as a file: the
        // second would end past tar offset 2^64 - 1.
        let mut h = header("f", b'0', 0);
        h[124..136].copy_from_slice(&[
            0x80, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        checksum(&mut h);
        let size = i64::MAX as u64;
        let mut t = TarTracker::new();
        assert_eq!(t.advance(&h).unwrap(), (512, Region::Inline));
        assert!(t.take_body(size).unwrap());
        assert_eq!(t.advance(&[0]).unwrap(), (1, Region::Inline));
        let err = t.advance(&h).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "tar entry at tar offset {}: a body of {size} bytes would end past the largest \
                 tar offset (2^64 - 1)",
                size + 513
            )
        );
    }
}
