//! An entry's metadata as Go's `archive/tar` reads it, and so as containers/storage applies it
//! and podman shows it: header fields, the extension records that apply to the next entry (GNU
//! long names, PAX records merged as Go merges them) and PAX times.
//!
//! Shared by the readers that turn a layer back into entries (`unpack`, the EROFS builder);
//! how the archive is framed is [`super::Tracker`]'s.

use std::fmt;

use super::{BLOCK_LEN, parse_numeric};

/// Offsets of the ustar header fields.
pub mod field {
    use std::ops::Range;
    /// Name (ustar: its last part, after `PREFIX`).
    pub const NAME: Range<usize> = 0..100;
    /// Permission and special bits.
    pub const MODE: Range<usize> = 100..108;
    /// Owner.
    pub const UID: Range<usize> = 108..116;
    /// Group.
    pub const GID: Range<usize> = 116..124;
    /// Body size.
    pub const SIZE: Range<usize> = 124..136;
    /// Modification time, whole seconds.
    pub const MTIME: Range<usize> = 136..148;
    /// Entry type.
    pub const TYPEFLAG: usize = 156;
    /// Link target.
    pub const LINKNAME: Range<usize> = 157..257;
    /// `ustar\0` (POSIX) or `ustar ` (GNU).
    pub const MAGIC: Range<usize> = 257..263;
    /// `00` (POSIX) or ` \0` (GNU).
    pub const VERSION: Range<usize> = 263..265;
    /// Device major number.
    pub const DEVMAJOR: Range<usize> = 329..337;
    /// Device minor number.
    pub const DEVMINOR: Range<usize> = 337..345;
    /// ustar: the directory part of the name.
    pub const PREFIX: Range<usize> = 345..500;
}

/// Metadata that cannot be read as Go reads it: the message says which record or field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError(String);

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeaderError {}

/// A point in time as tar gives it: seconds since the epoch (negative before 1970) and
/// nanoseconds `0..1e9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    /// Whole seconds; the instant is `sec + nsec / 1e9`.
    pub sec: i64,
    /// Nanoseconds, `0..1e9`.
    pub nsec: u32,
}

/// The bytes of a NUL-terminated field up to its first NUL.
pub fn c_str(field: &[u8]) -> &[u8] {
    field
        .iter()
        .position(|&b| b == 0)
        .map_or(field, |n| &field[..n])
}

/// A numeric header field (octal or base-256).
///
/// # Errors
/// The field holds neither, named by `what`.
pub fn numeric(
    block: &[u8; BLOCK_LEN],
    f: std::ops::Range<usize>,
    what: &str,
) -> Result<i64, HeaderError> {
    parse_numeric(&block[f]).ok_or_else(|| HeaderError(format!("an invalid {what} field")))
}

/// Whether the header is POSIX ustar (whose `PREFIX` field is part of the name).
pub fn is_ustar(block: &[u8; BLOCK_LEN]) -> bool {
    &block[field::MAGIC] == b"ustar\0" && &block[field::VERSION] == b"00"
}

/// Whether the header is GNU's (old GNU sparse entries carry their map in it).
pub fn is_gnu(block: &[u8; BLOCK_LEN]) -> bool {
    &block[field::MAGIC] == b"ustar " && &block[field::VERSION] == b" \0"
}

/// Parse PAX records (`"<len> <key>=<value>\n"`) into `out`, a later value of a key replacing
/// an earlier one.
///
/// # Errors
/// A record whose length, newline or `=` is missing or wrong.
pub fn parse_pax_records(
    mut data: &[u8],
    out: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<(), HeaderError> {
    let bad = |what: &str| HeaderError(format!("a PAX record {what}"));
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("without a length"))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= data.len())
            .ok_or_else(|| bad("with a bad length"))?;
        let record = data[sp + 1..len]
            .strip_suffix(b"\n")
            .ok_or_else(|| bad("not ending in a newline"))?;
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("without `=`"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        out.retain(|(k, _)| k != key);
        out.push((key.to_vec(), value.to_vec()));
        data = &data[len..];
    }
    Ok(())
}

/// A PAX time (`[-]sec[.frac]`) as Go's `parsePAXTime` reads it: at most nine fraction digits
/// count, and a negative time's fraction counts back from the second before.
pub fn parse_pax_time(value: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(value).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let negative = int.starts_with('-');
    let digits = int.strip_prefix('-').unwrap_or(int);
    if digits.is_empty() && frac.is_empty() {
        return None;
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: i64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let mut nsec = 0u32;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(match (negative, nsec) {
        (false, _) => Time { sec, nsec },
        (true, 0) => Time { sec: -sec, nsec: 0 },
        // -1.25 s as a timespec: seconds -2, nanoseconds 0.75e9.
        (true, _) => Time {
            sec: -sec - 1,
            nsec: 1_000_000_000 - nsec,
        },
    })
}

/// The extension records that apply to the next entry.
#[derive(Debug, Default)]
pub struct Extensions {
    /// A GNU `L` header's name.
    pub long_name: Option<Vec<u8>>,
    /// A GNU `K` header's link target.
    pub long_link: Option<Vec<u8>>,
    /// PAX records, merged as Go merges them: a later `x` header's key replaces an earlier one.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// The PAX records as they came (sparse maps repeat keys, which merging would lose).
    pub pax_raw: Vec<u8>,
}

impl Extensions {
    /// Take the body of an extension header (`x`, `L` or `K`; a global `g` header is an entry
    /// of its own, which Go's applier ignores, and changes nothing here).
    ///
    /// # Errors
    /// Malformed PAX records.
    pub fn add(&mut self, typeflag: u8, data: &[u8]) -> Result<(), HeaderError> {
        match typeflag {
            b'x' => {
                parse_pax_records(data, &mut self.pax)?;
                self.pax_raw.extend_from_slice(data);
            }
            b'L' => self.long_name = Some(c_str(data).to_vec()),
            b'K' => self.long_link = Some(c_str(data).to_vec()),
            _ => {}
        }
        Ok(())
    }

    /// A PAX record's value.
    pub fn pax(&self, key: &[u8]) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// A PAX record holding a decimal number.
    ///
    /// # Errors
    /// The record is there and holds something else.
    pub fn pax_u64(&self, key: &[u8]) -> Result<Option<u64>, HeaderError> {
        self.pax(key)
            .map(|v| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| {
                        HeaderError(format!(
                            "PAX record {} has value {:?}",
                            String::from_utf8_lossy(key),
                            String::from_utf8_lossy(v)
                        ))
                    })
            })
            .transpose()
    }

    /// A PAX record holding a time.
    ///
    /// # Errors
    /// The record is there and holds something else.
    pub fn pax_time(&self, key: &[u8]) -> Result<Option<Time>, HeaderError> {
        self.pax(key)
            .map(|v| {
                parse_pax_time(v).ok_or_else(|| {
                    HeaderError(format!(
                        "PAX {} {:?} is not a time",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(v)
                    ))
                })
            })
            .transpose()
    }

    /// The `SCHILY.xattr.*` records, in order.
    pub fn xattrs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.pax
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(b"SCHILY.xattr.")
                    .map(|name| (name.to_vec(), v.clone()))
            })
            .collect()
    }

    /// The entry's path: its name field (with the ustar prefix), replaced by a GNU long name,
    /// then by a PAX `path` record, as Go's reader resolves it.
    pub fn path(&self, block: &[u8; BLOCK_LEN]) -> Vec<u8> {
        if let Some(p) = self.pax(b"path") {
            return p.to_vec();
        }
        if let Some(n) = &self.long_name {
            return n.clone();
        }
        let name = c_str(&block[field::NAME]);
        let prefix = c_str(&block[field::PREFIX]);
        if !is_ustar(block) || prefix.is_empty() {
            return name.to_vec();
        }
        let mut full = prefix.to_vec();
        full.push(b'/');
        full.extend_from_slice(name);
        full
    }

    /// The entry's link target: its link field, replaced by a GNU long link, then by a PAX
    /// `linkpath` record.
    pub fn link_path(&self, block: &[u8; BLOCK_LEN]) -> Vec<u8> {
        if let Some(l) = self.pax(b"linkpath") {
            return l.to_vec();
        }
        self.long_link
            .clone()
            .unwrap_or_else(|| c_str(&block[field::LINKNAME]).to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_as_go_reads_them() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.sec, t.nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(t("-302486400"), Some((-302_486_400, 0)));
        assert_eq!(t("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t("-0.5"), Some((-1, 500_000_000)));
        assert_eq!(t(".5"), Some((0, 500_000_000)));
        for bad in ["", "-", "1e5", "1.x", "--1", " 1"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn pax_records_merge_later_over_earlier() {
        let mut out = Vec::new();
        parse_pax_records(b"11 path=a/\n12 mtime=-5\n", &mut out).unwrap();
        parse_pax_records(b"11 path=bb\n", &mut out).unwrap();
        assert_eq!(
            out,
            [
                (b"mtime".to_vec(), b"-5".to_vec()),
                (b"path".to_vec(), b"bb".to_vec())
            ]
        );
        assert!(parse_pax_records(b"99 path=a\n", &mut out).is_err());
        assert!(parse_pax_records(b"9 path=a", &mut out).is_err());
    }

    #[test]
    fn paths_resolve_pax_over_long_name_over_fields() {
        let mut block = [0u8; BLOCK_LEN];
        block[field::NAME][..4].copy_from_slice(b"name");
        block[field::PREFIX][..3].copy_from_slice(b"dir");
        block[field::LINKNAME][..6].copy_from_slice(b"target");
        let mut ext = Extensions::default();
        // Not ustar: the prefix field is not part of the name.
        assert_eq!(ext.path(&block), b"name");
        block[field::MAGIC].copy_from_slice(b"ustar\0");
        block[field::VERSION].copy_from_slice(b"00");
        assert_eq!(ext.path(&block), b"dir/name");
        ext.add(b'L', b"long\0junk").unwrap();
        ext.add(b'K', b"longlink\0").unwrap();
        assert_eq!(ext.path(&block), b"long");
        assert_eq!(ext.link_path(&block), b"longlink");
        ext.add(b'x', b"12 path=pax\n15 linkpath=pl\n").unwrap();
        assert_eq!(ext.path(&block), b"pax");
        assert_eq!(ext.link_path(&block), b"pl");
        ext.add(b'g', b"garbage").unwrap();
        assert_eq!(ext.pax_raw, b"12 path=pax\n15 linkpath=pl\n");
    }
}
