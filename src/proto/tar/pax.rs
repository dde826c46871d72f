//! The PAX record parser of the tar framer: records are parsed as bytes arrive, one byte looked
//! at once, keeping only what framing and sparse maps need (the `size` and `path` records and
//! `GNU.sparse.*`), so an extension header costs no buffer of its size.

use super::*;

/// Which key a PAX record has, as far as framing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PaxKey {
    /// `size`: replaces the entry's size.
    Size,
    /// `path`: replaces the entry's name (and may make a `\0` entry a directory).
    Path,
    /// `linkpath`, `uname`, `gname`: values must not contain NUL.
    NoNulValue,
    /// `GNU.sparse.*`: may make the entry a PAX sparse file (its key must not contain NUL
    /// either).
    GnuSparse(SparseKey),
    /// Anything else: the key must not contain NUL.
    Other,
}

/// Where a PAX record parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PaxState {
    /// Reading the decimal record length.
    Length,
    /// Reading the key, up to `=`.
    Key,
    /// Reading the value, up to the record's final `\n`.
    Value,
}

/// Longest decimal record length accepted; 19 digits cannot overflow a u64.
pub(super) const PAX_MAX_LEN_DIGITS: u32 = 19;
/// Longest key prefix kept for comparison (`GNU.sparse.numblocks`); longer keys are only
/// counted.
pub(super) const PAX_KEY_KEEP: usize = SPARSE_KEY_MAX;

/// Streaming parser of PAX records (`"%d %s=%s\n"`), following Go's `parsePAXRecord`: the
/// length counts the whole record, is at least 5 and fits in what is left of the body; the key
/// ends at the first `=` and is not empty; the record ends in `\n`; `path`, `linkpath`,
/// `uname`, `gname` values and all other keys contain no NUL. Keeps only `size`, whether
/// `path` ends in `/` and what the `GNU.sparse.*` records say, so memory is constant whatever
/// the record sizes (apart from the sparse segments a keeping parser stores).
#[derive(Debug, Clone)]
pub(super) struct PaxParser {
    pub(super) state: PaxState,
    /// Record length being parsed.
    pub(super) len: u64,
    /// Digits of `len` so far.
    pub(super) digits: u32,
    /// Body bytes left (including the current one) when the record started.
    pub(super) record_room: u64,
    /// Bytes of the record still to come after the length and space (including the `\n`).
    pub(super) rec_left: u64,
    pub(super) key: [u8; PAX_KEY_KEEP],
    pub(super) key_len: u64,
    pub(super) key_has_nul: bool,
    pub(super) which: PaxKey,
    pub(super) val_len: u64,
    pub(super) val_has_nul: bool,
    pub(super) val_last: u8,
    /// Decimal value of a `size` record; `None` once a non-digit or overflow is seen.
    pub(super) val_num: Option<u64>,
    /// Result: the last `size` record (`None` if absent or empty).
    pub(super) size: Option<u64>,
    /// Result: whether the last `path` record ends in `/` (`None` if absent or empty).
    pub(super) path_is_dir: Option<bool>,
    /// Result: the `GNU.sparse.*` records.
    pub(super) sparse: SparseRecords,
}

impl PaxParser {
    /// A parser; `keep_sparse`: store sparse map segments, not only check them.
    pub(super) fn new(keep_sparse: bool) -> Self {
        PaxParser {
            state: PaxState::Length,
            len: 0,
            digits: 0,
            record_room: 0,
            rec_left: 0,
            key: [0; PAX_KEY_KEEP],
            key_len: 0,
            key_has_nul: false,
            which: PaxKey::Other,
            val_len: 0,
            val_has_nul: false,
            val_last: 0,
            val_num: Some(0),
            size: None,
            path_is_dir: None,
            sparse: SparseRecords::new(keep_sparse),
        }
    }

    /// Parse `data`; `room` is the number of body bytes left including `data[0]`.
    pub(super) fn feed(&mut self, data: &[u8], room: u64) -> Result<(), &'static str> {
        for (i, &b) in data.iter().enumerate() {
            match self.state {
                PaxState::Length => {
                    if b.is_ascii_digit() {
                        if self.digits == 0 {
                            self.record_room = room - i as u64;
                        }
                        self.digits += 1;
                        if self.digits > PAX_MAX_LEN_DIGITS {
                            return Err("record length too long");
                        }
                        self.len = self.len * 10 + u64::from(b - b'0');
                    } else if b == b' ' && self.digits > 0 {
                        if self.len < 5 || self.len > self.record_room {
                            return Err("record length out of range");
                        }
                        let header = u64::from(self.digits) + 1;
                        if self.len <= header {
                            return Err("record length out of range");
                        }
                        self.rec_left = self.len - header;
                        self.state = PaxState::Key;
                        self.key_len = 0;
                        self.key_has_nul = false;
                    } else {
                        return Err("record length is not a decimal number");
                    }
                }
                PaxState::Key => {
                    // The `=` must come before the record's last byte (its newline).
                    if self.rec_left == 1 {
                        return Err("record without '='");
                    }
                    self.rec_left -= 1;
                    if b == b'=' {
                        if self.key_len == 0 {
                            return Err("empty record key");
                        }
                        let key = &self.key[..(self.key_len as usize).min(PAX_KEY_KEEP)];
                        let whole = self.key_len as usize == key.len();
                        self.which = match (whole, key) {
                            (true, b"size") => PaxKey::Size,
                            (true, b"path") => PaxKey::Path,
                            (true, b"linkpath" | b"uname" | b"gname") => PaxKey::NoNulValue,
                            _ => match SparseKey::from_key(key, self.key_len) {
                                Some(k) => PaxKey::GnuSparse(k),
                                None => PaxKey::Other,
                            },
                        };
                        if let PaxKey::GnuSparse(k) = self.which {
                            self.sparse.begin(k);
                        }
                        self.state = PaxState::Value;
                        self.val_len = 0;
                        self.val_has_nul = false;
                        self.val_num = Some(0);
                    } else {
                        if (self.key_len as usize) < PAX_KEY_KEEP {
                            self.key[self.key_len as usize] = b;
                        }
                        self.key_len += 1;
                        self.key_has_nul |= b == 0;
                    }
                }
                PaxState::Value => {
                    if self.rec_left == 1 {
                        if b != b'\n' {
                            return Err("record does not end in a newline");
                        }
                        self.end_record()?;
                        self.state = PaxState::Length;
                        self.len = 0;
                        self.digits = 0;
                    } else {
                        self.rec_left -= 1;
                        self.val_len += 1;
                        self.val_has_nul |= b == 0;
                        self.val_last = b;
                        if let PaxKey::GnuSparse(_) = self.which {
                            self.sparse.value_byte(b);
                        }
                        if self.which == PaxKey::Size {
                            self.val_num = self.val_num.and_then(|n| {
                                if !b.is_ascii_digit() {
                                    return None;
                                }
                                n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Check and apply a complete record. An empty value keeps the header's own field (Go's
    /// `mergePAX` skips empty values), so it clears an earlier record of the same key.
    pub(super) fn end_record(&mut self) -> Result<(), &'static str> {
        match self.which {
            PaxKey::Path | PaxKey::NoNulValue if self.val_has_nul => {
                return Err("NUL in a path, linkpath, uname or gname value");
            }
            PaxKey::Size | PaxKey::GnuSparse(_) | PaxKey::Other if self.key_has_nul => {
                return Err("NUL in a key");
            }
            _ => {}
        }
        match self.which {
            PaxKey::Size if self.val_len == 0 => self.size = None,
            PaxKey::Size => match self.val_num {
                Some(n) if i64::try_from(n).is_ok() => self.size = Some(n),
                _ => return Err("size record is not a decimal number below 2^63"),
            },
            PaxKey::Path if self.val_len == 0 => self.path_is_dir = None,
            PaxKey::Path => self.path_is_dir = Some(self.val_last == b'/'),
            PaxKey::GnuSparse(_) => self.sparse.end(),
            _ => {}
        }
        Ok(())
    }

    /// The body ended: it must end between records.
    pub(super) fn finish(&self) -> Result<(), &'static str> {
        if self.state == PaxState::Length && self.digits == 0 {
            Ok(())
        } else {
            Err("body ends inside a record")
        }
    }
}
