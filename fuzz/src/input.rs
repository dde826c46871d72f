//! The byte format of structured fuzz inputs: a [`Cursor`] that decodes fields and an
//! [`Encoder`] that writes them, so that the seed generator can turn real data into inputs the
//! targets decode back field for field.
//!
//! Every byte string decodes: a read past the end yields zeros (and a shorter slice), so any
//! mutation of an input is still a valid input. Integers are little-endian.

/// Reads fields from a fuzz input.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    /// The next byte, 0 past the end.
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// The next `N` bytes, zero-padded past the end.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        out
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Writes fields in the format [`Cursor`] reads.
#[derive(Debug, Clone, Default)]
pub struct Encoder {
    /// The encoded input.
    pub out: Vec<u8>,
}

impl Encoder {
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// Raw bytes (the reader must know their length).
    pub fn bytes(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_zero_padding() {
        let mut e = Encoder::default();
        e.u8(7);
        e.u16(0x1234);
        e.u64(u64::MAX - 1);
        e.bytes(b"abc");
        let mut c = Cursor::new(&e.out);
        assert_eq!(c.u8(), 7);
        assert_eq!(c.u16(), 0x1234);
        assert_eq!(c.u64(), u64::MAX - 1);
        assert_eq!(c.bytes(5), b"abc");
        assert!(c.is_empty());
        assert_eq!((c.u8(), c.u32()), (0, 0));
        let mut short = Cursor::new(&[1]);
        assert_eq!(short.u16(), 1);
    }
}
