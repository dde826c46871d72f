//! Building tar header blocks and PAX records field by field, valid or deliberately not.
//!
//! Field offsets follow `proto/splitfdstream.md` §4 (ustar layout; GNU reuses it with another
//! magic).

/// Size of a tar block.
pub const BLOCK: usize = 512;

/// Name field.
const NAME: std::ops::Range<usize> = 0..100;
/// Mode field.
const MODE: std::ops::Range<usize> = 100..108;
/// Size field.
pub const SIZE: std::ops::Range<usize> = 124..136;
/// Modification time.
const MTIME: std::ops::Range<usize> = 136..148;
/// Checksum field.
pub const CHKSUM: std::ops::Range<usize> = 148..156;
/// Typeflag byte.
pub const TYPEFLAG: usize = 156;
/// Magic and version.
const MAGIC: std::ops::Range<usize> = 257..265;
/// ustar name prefix.
const PREFIX: std::ops::Range<usize> = 345..500;
/// Old GNU sparse: "an extension block follows".
pub const GNU_IS_EXTENDED: usize = 482;
/// Old GNU sparse extension block: "another extension block follows".
pub const EXT_IS_EXTENDED: usize = 504;

/// Which header format the magic field claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `ustar\0` `00` (POSIX).
    Ustar,
    /// `ustar ` ` \0` (GNU).
    Gnu,
    /// No magic (V7).
    V7,
    /// A magic no reader knows.
    Garbage,
}

impl Format {
    /// From the low two bits of `b`.
    pub fn from_bits(b: u8) -> Format {
        [Format::Ustar, Format::Gnu, Format::V7, Format::Garbage][usize::from(b & 3)]
    }

    /// The bits [`Format::from_bits`] maps back to this format.
    pub fn bits(self) -> u8 {
        self as u8
    }

    fn magic(self) -> &'static [u8; 8] {
        match self {
            Format::Ustar => b"ustar\x0000",
            Format::Gnu => b"ustar  \0",
            Format::V7 => &[0; 8],
            Format::Garbage => b"ustaR\0xx",
        }
    }
}

/// How the checksum field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// Unsigned byte sum, `%06o\0 ` (what tar writers emit).
    Unsigned,
    /// Signed byte sum (historic tars); falls back to unsigned when the signed sum is negative.
    Signed,
    /// Unsigned sum as seven digits and a NUL (another valid spelling).
    UnsignedWide,
    /// The unsigned sum plus one: invalid.
    Wrong,
}

impl Checksum {
    /// From the low two bits of `b`.
    pub fn from_bits(b: u8) -> Checksum {
        [
            Checksum::Unsigned,
            Checksum::Signed,
            Checksum::UnsignedWide,
            Checksum::Wrong,
        ][usize::from(b & 3)]
    }

    /// The bits [`Checksum::from_bits`] maps back to this mode.
    pub fn bits(self) -> u8 {
        self as u8
    }

    /// Whether a reader must accept the result.
    pub fn is_valid(self) -> bool {
        self != Checksum::Wrong
    }
}

/// Sums of a block with the checksum field read as eight spaces: (unsigned, signed).
pub fn sums(block: &[u8; BLOCK]) -> (u64, i64) {
    let mut unsigned = 0u64;
    let mut signed = 0i64;
    for (i, &b) in block.iter().enumerate() {
        let b = if CHKSUM.contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    (unsigned, signed)
}

/// Write the checksum field of `block` as `mode` says.
pub fn set_checksum(block: &mut [u8; BLOCK], mode: Checksum) {
    let (unsigned, signed) = sums(block);
    let field = match mode {
        Checksum::Unsigned => format!("{unsigned:06o}\0 "),
        Checksum::Signed => match u64::try_from(signed) {
            Ok(s) => format!("{s:06o}\0 "),
            Err(_) => format!("{unsigned:06o}\0 "),
        },
        Checksum::UnsignedWide => format!("{unsigned:07o}\0"),
        Checksum::Wrong => format!("{:06o}\0 ", unsigned + 1),
    };
    block[CHKSUM].copy_from_slice(field.as_bytes());
}

/// How a size field is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeEncoding {
    /// Eleven octal digits and a NUL.
    Octal,
    /// Twelve octal digits, no NUL.
    OctalFull,
    /// Octal, right-aligned in spaces, then a space and a NUL.
    OctalSpaced,
    /// GNU base-256, positive.
    Base256,
    /// GNU base-256 of the value's negation.
    Base256Negative,
    /// All NULs (0).
    Empty,
    /// An `8` among octal digits: invalid.
    BadDigit,
    /// Base-256 with the value's top bit set, so at least 2^63: invalid.
    Base256TooBig,
}

impl SizeEncoding {
    /// From the low three bits of `b`.
    pub fn from_bits(b: u8) -> SizeEncoding {
        [
            SizeEncoding::Octal,
            SizeEncoding::OctalFull,
            SizeEncoding::OctalSpaced,
            SizeEncoding::Base256,
            SizeEncoding::Base256Negative,
            SizeEncoding::Empty,
            SizeEncoding::BadDigit,
            SizeEncoding::Base256TooBig,
        ][usize::from(b & 7)]
    }

    /// The bits [`SizeEncoding::from_bits`] maps back to this encoding.
    pub fn bits(self) -> u8 {
        self as u8
    }
}

/// The 12-byte size field for `value` in `enc`, and the value a reader must see: `Some(v)` for
/// a valid field (negative for [`SizeEncoding::Base256Negative`]), `None` for an invalid one
/// (a size field outside `i64`). Octal encodings of values that do not fit fall back to
/// base-256.
pub fn size_field(value: u64, enc: SizeEncoding) -> ([u8; 12], Option<i128>) {
    let mut f = [0u8; 12];
    let base256 = |f: &mut [u8; 12], v: u64| {
        f[0] = 0x80;
        f[4..].copy_from_slice(&v.to_be_bytes());
    };
    match enc {
        SizeEncoding::Octal if value < 1 << 33 => {
            f.copy_from_slice(format!("{value:011o}\0").as_bytes());
        }
        SizeEncoding::OctalFull if value < 1 << 36 => {
            f.copy_from_slice(format!("{value:012o}").as_bytes());
        }
        SizeEncoding::OctalSpaced if value < 1 << 30 => {
            f.copy_from_slice(format!("{value:>10o} \0").as_bytes());
        }
        SizeEncoding::Empty => return (f, Some(0)),
        SizeEncoding::BadDigit => {
            f.copy_from_slice(b"00000000809\0");
            return (f, None);
        }
        SizeEncoding::Base256Negative => {
            // Twelve bytes of two's complement: 0xff sign extension, then the negative value
            // (magnitude 1..=i64::MAX, so that it is negative and fits).
            let neg = -((value & i64::MAX as u64).max(1) as i64);
            f = [0xff; 12];
            f[4..].copy_from_slice(&neg.to_be_bytes());
            return (f, Some(i128::from(neg)));
        }
        SizeEncoding::Base256TooBig => {
            base256(&mut f, value | 1 << 63);
            return (f, None);
        }
        _ => {
            base256(&mut f, value);
            return (f, (value < 1 << 63).then_some(i128::from(value)));
        }
    }
    (f, Some(i128::from(value)))
}

/// Fields of one header block.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    /// Name field (truncated to 100 bytes).
    pub name: &'a [u8],
    /// Typeflag byte.
    pub typeflag: u8,
    /// Size field.
    pub size: [u8; 12],
    /// Magic.
    pub format: Format,
    /// ustar prefix field, if any.
    pub prefix: &'a [u8],
    /// Checksum spelling.
    pub checksum: Checksum,
    /// Old GNU sparse: set the "extension block follows" byte.
    pub gnu_extended: bool,
}

impl Header<'_> {
    /// The 512-byte block.
    pub fn block(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        let name = &self.name[..self.name.len().min(NAME.len())];
        b[..name.len()].copy_from_slice(name);
        b[MODE].copy_from_slice(b"0000644\0");
        b[MTIME].copy_from_slice(b"14567301400\0");
        b[SIZE].copy_from_slice(&self.size);
        b[TYPEFLAG] = self.typeflag;
        b[MAGIC].copy_from_slice(self.format.magic());
        let prefix = &self.prefix[..self.prefix.len().min(PREFIX.len())];
        b[PREFIX.start..PREFIX.start + prefix.len()].copy_from_slice(prefix);
        b[GNU_IS_EXTENDED] = u8::from(self.gnu_extended);
        set_checksum(&mut b, self.checksum);
        b
    }
}

/// Whether the header's own name (name field, or for ustar `prefix/name`) ends in `/`, as §4
/// defines for `\0` entries.
pub fn block_name_is_dir(block: &[u8; BLOCK]) -> bool {
    let name = &block[NAME];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    match name.last() {
        Some(&b) => b == b'/',
        None => &block[257..263] == b"ustar\0" && block[PREFIX.start] != 0,
    }
}

/// Zero bytes after a body of `size` bytes, up to the next block boundary.
pub fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// One PAX record `"<len> <key>=<value>\n"` with the correct length.
pub fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = len.to_string().len() + body;
    }
    pax_record_with_len(len.to_string().as_bytes(), key, value)
}

/// A PAX record with the given length field, right or wrong.
pub fn pax_record_with_len(len: &[u8], key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(len.len() + key.len() + value.len() + 3);
    r.extend_from_slice(len);
    r.push(b' ');
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitfdstream::proto::tar::{parse_numeric, verify_checksum};

    #[test]
    fn fields_parse_as_the_library_parses_them() {
        for &v in &[
            0u64,
            1,
            511,
            512,
            4096,
            (1 << 33) - 1,
            1 << 40,
            (1 << 63) - 1,
        ] {
            for bits in 0..8 {
                let enc = SizeEncoding::from_bits(bits);
                let (f, want) = size_field(v, enc);
                let got = parse_numeric(&f).map(i128::from);
                assert_eq!(got, want, "{v} {enc:?}");
            }
        }
        for bits in 0..4 {
            let mode = Checksum::from_bits(bits);
            let h = Header {
                name: b"\xff\xfe-high-bytes",
                typeflag: b'0',
                size: size_field(5, SizeEncoding::Base256).0,
                format: Format::Gnu,
                prefix: b"",
                checksum: mode,
                gnu_extended: false,
            };
            assert_eq!(verify_checksum(&h.block()), mode.is_valid(), "{mode:?}");
        }
        assert_eq!(pax_record(b"size", b"600"), b"12 size=600\n");
        assert_eq!(pax_record(b"k", b"12345"), b"11 k=12345\n");
    }
}
