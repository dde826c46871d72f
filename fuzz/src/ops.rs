//! The ops of a structured input (see [`crate::archive`]), decoded from and encoded to the byte
//! format of [`crate::input`]. Fields are raw bytes; what they mean is decided while building,
//! so every byte string decodes and every mutation is meaningful.
//!
//! The meaning of an input depends on this file and on the tables of [`crate::archive`] (tags,
//! typeflags, names, edge sizes, PAX keys). Changing them changes what committed inputs build:
//! regenerate the seeds (`examples/gen_seeds.rs`) and check that every input under
//! `regressions/` still shows its failure (`run.sh --regressions`), or find it again.

use crate::header::BLOCK;
use crate::input::{Cursor, Encoder};

/// Most ops decoded from one input.
const MAX_OPS: usize = 1024;

/// One step of building the archive and its stream. Fields are raw input bytes; what they mean
/// is decided while building, so every byte string decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A header (any typeflag), its body and padding.
    Entry(Entry),
    /// A PAX `x` or `g` header with records.
    Pax(Pax),
    /// A GNU `L` or `K` header with its name.
    Long(Long),
    /// An old GNU sparse `S` entry with extension blocks.
    Sparse(Sparse),
    /// End-of-archive zero blocks and trailing bytes.
    End {
        /// Low bit: one or two blocks.
        blocks: u8,
        /// Bytes after them.
        trailer: Vec<u8>,
    },
    /// A 512-byte block as given, its checksum fixed or not.
    RawBlock {
        /// 0 keep, 1 unsigned, 2 signed checksum (modulo 3).
        fix: u8,
        /// The block.
        block: Box<[u8; BLOCK]>,
    },
    /// A body of `size` bytes: `data`, then `fill` bytes; then padding.
    Body {
        /// Bit 0: as an fd reference; bit 1: no padding.
        flags: u8,
        /// Declared size.
        size: u64,
        /// Its first bytes.
        data: Vec<u8>,
        /// The rest of it.
        fill: u8,
    },
    /// Inline bytes.
    RawBytes(Vec<u8>),
    /// An fd reference here, whatever the tar says.
    FdRef {
        /// 0 the next index, 1 the one after, 2 index 0, 3 `i64::MAX` (modulo 4).
        index: u8,
        /// Size of the content fd behind it.
        size: u32,
    },
    /// A raw chunk prefix.
    Prefix(i64),
    /// End the current inline chunk.
    Cut,
    /// Cut inline chunks at this many bytes from now on (0: only at the limit).
    ChunkLen(u16),
    /// End the stream: 0 cleanly, 1 inside the last chunk, 2 inside a prefix (modulo 3).
    Truncate(u8),
    /// Do the last tar op (entry, PAX, long name, sparse) again, 1 + count % 8 times: many huge
    /// entries in a row, or many extension headers, are one mutation away.
    Repeat(u8),
}

/// Fields of [`Op::Entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// High bit clear: index into the common typeflags; set: the typeflag is the low 7 bits.
    pub typesel: u8,
    /// Bits 0–1 checksum, 2–3 format, 4 ustar prefix, 5 body as fd reference, 6–7 = 1: no padding.
    pub flags: u8,
    /// Bits 0–2 size encoding, 3–4 how `size` is read (small, medium, edge table, raw).
    pub size_sel: u8,
    /// Size value.
    pub size: u64,
    /// Index into the names.
    pub name: u8,
    /// Body byte.
    pub fill: u8,
}

/// Fields of [`Op::Pax`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pax {
    /// Bit 0 global (`g`), 1–2 checksum, 3 GNU format, 4–5 size field (2: one too many, 3: over
    /// the extension limit).
    pub flags: u8,
    /// The records (at most 7).
    pub records: Vec<Record>,
}

/// One PAX record of [`Pax`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    /// Index into the keys.
    pub key: u8,
    /// How the value is made from `val`.
    pub val_sel: u8,
    /// Value number.
    pub val: u64,
    /// Whether the length field is right (most values) or wrong.
    pub len_sel: u8,
}

/// Fields of [`Op::Long`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Long {
    /// Bit 0 `K` (else `L`), 1–2 checksum, 3 NUL-terminated, 4 ends in `/`, 5–6 size field (2:
    /// bytes after the NUL, 3: over the extension limit).
    pub flags: u8,
    /// Name length (modulo 4096).
    pub len: u16,
    /// Name byte (`a` + fill % 26).
    pub fill: u8,
}

/// Fields of [`Op::Sparse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sparse {
    /// Bit 0 GNU magic, 1 extended, 2–3 checksum, 4 body as fd reference, 5 the last extension
    /// block claims another.
    pub flags: u8,
    /// Extension blocks when extended: 1 + ext % 3.
    pub ext: u8,
    /// Body size (modulo [`BODY_CAP`](crate::archive::BODY_CAP) + 1).
    pub size: u32,
    /// Body byte.
    pub fill: u8,
}

impl Op {
    /// Decode one op.
    pub fn decode(c: &mut Cursor<'_>) -> Op {
        match c.u8() % 16 {
            0..=2 => Op::Entry(Entry {
                typesel: c.u8(),
                flags: c.u8(),
                size_sel: c.u8(),
                size: c.u64(),
                name: c.u8(),
                fill: c.u8(),
            }),
            3 => Op::Repeat(c.u8()),
            4 => {
                let flags = c.u8();
                let n = c.u8() % 8;
                let records = (0..n)
                    .map(|_| Record {
                        key: c.u8(),
                        val_sel: c.u8(),
                        val: c.u64(),
                        len_sel: c.u8(),
                    })
                    .collect();
                Op::Pax(Pax { flags, records })
            }
            5 => Op::Long(Long {
                flags: c.u8(),
                len: c.u16(),
                fill: c.u8(),
            }),
            6 => Op::Sparse(Sparse {
                flags: c.u8(),
                ext: c.u8(),
                size: c.u32(),
                fill: c.u8(),
            }),
            7 => {
                let blocks = c.u8();
                let n = usize::from(c.u8());
                Op::End {
                    blocks,
                    trailer: c.bytes(n).to_vec(),
                }
            }
            8 => Op::RawBlock {
                fix: c.u8(),
                block: Box::new(c.array()),
            },
            9 => {
                let flags = c.u8();
                let size = c.u64();
                let n = usize::from(c.u16());
                let data = c.bytes(n).to_vec();
                Op::Body {
                    flags,
                    size,
                    data,
                    fill: c.u8(),
                }
            }
            10 => {
                let n = usize::from(c.u16());
                Op::RawBytes(c.bytes(n).to_vec())
            }
            11 => Op::FdRef {
                index: c.u8(),
                size: c.u32(),
            },
            12 => Op::Prefix(c.u64() as i64),
            13 => Op::Cut,
            14 => Op::ChunkLen(c.u16()),
            _ => Op::Truncate(c.u8()),
        }
    }

    /// Decode ops until the input ends (or [`MAX_OPS`]).
    pub fn decode_all(c: &mut Cursor<'_>) -> Vec<Op> {
        let mut ops = Vec::new();
        while !c.is_empty() && ops.len() < MAX_OPS {
            ops.push(Op::decode(c));
        }
        ops
    }

    /// Encode as [`Op::decode`] reads it. Byte strings longer than their length field are cut.
    pub fn encode(&self, e: &mut Encoder) {
        match self {
            Op::Entry(x) => {
                e.u8(0);
                e.u8(x.typesel);
                e.u8(x.flags);
                e.u8(x.size_sel);
                e.u64(x.size);
                e.u8(x.name);
                e.u8(x.fill);
            }
            Op::Pax(x) => {
                e.u8(4);
                e.u8(x.flags);
                e.u8(x.records.len().min(7) as u8);
                for r in x.records.iter().take(7) {
                    e.u8(r.key);
                    e.u8(r.val_sel);
                    e.u64(r.val);
                    e.u8(r.len_sel);
                }
            }
            Op::Long(x) => {
                e.u8(5);
                e.u8(x.flags);
                e.u16(x.len);
                e.u8(x.fill);
            }
            Op::Sparse(x) => {
                e.u8(6);
                e.u8(x.flags);
                e.u8(x.ext);
                e.u32(x.size);
                e.u8(x.fill);
            }
            Op::End { blocks, trailer } => {
                let t = &trailer[..trailer.len().min(255)];
                e.u8(7);
                e.u8(*blocks);
                e.u8(t.len() as u8);
                e.bytes(t);
            }
            Op::RawBlock { fix, block } => {
                e.u8(8);
                e.u8(*fix);
                e.bytes(&block[..]);
            }
            Op::Body {
                flags,
                size,
                data,
                fill,
            } => {
                let d = &data[..data.len().min(u16::MAX as usize)];
                e.u8(9);
                e.u8(*flags);
                e.u64(*size);
                e.u16(d.len() as u16);
                e.bytes(d);
                e.u8(*fill);
            }
            Op::RawBytes(d) => {
                let d = &d[..d.len().min(u16::MAX as usize)];
                e.u8(10);
                e.u16(d.len() as u16);
                e.bytes(d);
            }
            Op::FdRef { index, size } => {
                e.u8(11);
                e.u8(*index);
                e.u32(*size);
            }
            Op::Prefix(p) => {
                e.u8(12);
                e.u64(*p as u64);
            }
            Op::Cut => e.u8(13),
            Op::ChunkLen(n) => {
                e.u8(14);
                e.u16(*n);
            }
            Op::Truncate(m) => {
                e.u8(15);
                e.u8(*m);
            }
            Op::Repeat(n) => {
                e.u8(3);
                e.u8(*n);
            }
        }
    }
}

/// Encode `ops` into one input.
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut e = Encoder::default();
    for op in ops {
        op.encode(&mut e);
    }
    e.out
}
