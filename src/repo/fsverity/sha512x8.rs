//! SHA-512 of eight 4096-byte Merkle-tree blocks at once, one block per 64-bit lane of an
//! AVX-512 register (or of two AVX2 registers, on CPUs without AVX-512).
//!
//! fs-verity hashes every 4 KiB block of a file separately, so the blocks of a file are
//! independent messages of the same length: the textbook case for multi-buffer hashing. One
//! scalar SHA-512 (the `sha2` crate, OpenSSL) runs at 0.6–0.8 GB/s on the machines we measure;
//! eight lanes with AVX-512's rotate and three-input logic instructions reach ~2.5 GB/s, and
//! SHA-512 of the data is the largest CPU cost of a pull into a sha512 repository. AVX2 has
//! neither instruction and half the width: four lanes, rotations from two shifts.
//!
//! The algorithm is FIPS 180-4 §6.4 unchanged; only the arithmetic is vectorised. Every message
//! is exactly 4096 bytes, so the final padding block is the same constant for all of them.
//! Tests compare each lane with the `sha2` crate.

/// Bytes of one Merkle-tree block (the only message length this module hashes).
const BLOCK: usize = super::BLOCK_SIZE;

/// Blocks hashed per call.
pub(crate) const LANES: usize = 8;

/// Bytes of one SHA-512 digest.
const DIGEST: usize = 64;

/// FIPS 180-4 §4.2.3.
#[rustfmt::skip]
const K: [u64; 80] = [
    0x428a2f98d728ae22, 0x7137449123ef65cd, 0xb5c0fbcfec4d3b2f, 0xe9b5dba58189dbbc,
    0x3956c25bf348b538, 0x59f111f1b605d019, 0x923f82a4af194f9b, 0xab1c5ed5da6d8118,
    0xd807aa98a3030242, 0x12835b0145706fbe, 0x243185be4ee4b28c, 0x550c7dc3d5ffb4e2,
    0x72be5d74f27b896f, 0x80deb1fe3b1696b1, 0x9bdc06a725c71235, 0xc19bf174cf692694,
    0xe49b69c19ef14ad2, 0xefbe4786384f25e3, 0x0fc19dc68b8cd5b5, 0x240ca1cc77ac9c65,
    0x2de92c6f592b0275, 0x4a7484aa6ea6e483, 0x5cb0a9dcbd41fbd4, 0x76f988da831153b5,
    0x983e5152ee66dfab, 0xa831c66d2db43210, 0xb00327c898fb213f, 0xbf597fc7beef0ee4,
    0xc6e00bf33da88fc2, 0xd5a79147930aa725, 0x06ca6351e003826f, 0x142929670a0e6e70,
    0x27b70a8546d22ffc, 0x2e1b21385c26c926, 0x4d2c6dfc5ac42aed, 0x53380d139d95b3df,
    0x650a73548baf63de, 0x766a0abb3c77b2a8, 0x81c2c92e47edaee6, 0x92722c851482353b,
    0xa2bfe8a14cf10364, 0xa81a664bbc423001, 0xc24b8b70d0f89791, 0xc76c51a30654be30,
    0xd192e819d6ef5218, 0xd69906245565a910, 0xf40e35855771202a, 0x106aa07032bbd1b8,
    0x19a4c116b8d2d0c8, 0x1e376c085141ab53, 0x2748774cdf8eeb99, 0x34b0bcb5e19b48a8,
    0x391c0cb3c5c95a63, 0x4ed8aa4ae3418acb, 0x5b9cca4f7763e373, 0x682e6ff3d6b2b8a3,
    0x748f82ee5defb2fc, 0x78a5636f43172f60, 0x84c87814a1f0ab72, 0x8cc702081a6439ec,
    0x90befffa23631e28, 0xa4506cebde82bde9, 0xbef9a3f7b2c67915, 0xc67178f2e372532b,
    0xca273eceea26619c, 0xd186b8c721c0c207, 0xeada7dd6cde0eb1e, 0xf57d4f7fee6ed178,
    0x06f067aa72176fba, 0x0a637dc5a2c898a6, 0x113f9804bef90dae, 0x1b710b35131c471b,
    0x28db77f523047d84, 0x32caab7b40c72493, 0x3c9ebe0a15c9bebc, 0x431d67c49c100d4c,
    0x4cc5d4becb3e42b6, 0x597f299cfc657e2a, 0x5fcb6fab3ad6faec, 0x6c44198c4a475817,
];

/// FIPS 180-4 §5.3.5: the initial hash value.
#[rustfmt::skip]
const H0: [u64; 8] = [
    0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
    0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
];

/// The vector unit used, chosen once per process from what the CPU reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Avx512,
    Avx2,
    None,
}

fn unit() -> Unit {
    #[cfg(target_arch = "x86_64")]
    {
        // The standard library caches the CPUID answers.
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Unit::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Unit::Avx2;
        }
    }
    Unit::None
}

/// Whether this CPU can run [`hash_lanes`].
pub(crate) fn available() -> bool {
    unit() != Unit::None
}

/// The SHA-512 digests of the `LANES` consecutive 4096-byte blocks in `blocks`, in order, or
/// `None` when the CPU has no suitable vector unit (see [`available`]).
///
/// # Panics
/// `blocks` is not exactly `LANES × 4096` bytes.
pub(crate) fn hash_blocks(blocks: &[u8]) -> Option<[[u8; DIGEST]; LANES]> {
    assert_eq!(
        blocks.len(),
        LANES * BLOCK,
        "hash_blocks takes 8 whole blocks"
    );
    hash_lanes(std::array::from_fn(|i| &blocks[i * BLOCK..(i + 1) * BLOCK]))
}

/// The SHA-512 digests of eight 4096-byte blocks from anywhere (blocks of different files,
/// say), lane `i` = block `i`; `None` without a suitable vector unit.
///
/// # Panics
/// A block is not exactly 4096 bytes.
pub(crate) fn hash_lanes(lanes: [&[u8]; LANES]) -> Option<[[u8; DIGEST]; LANES]> {
    hash_lanes_with(unit(), lanes)
}

fn hash_lanes_with(unit: Unit, lanes: [&[u8]; LANES]) -> Option<[[u8; DIGEST]; LANES]> {
    assert!(
        lanes.iter().all(|l| l.len() == BLOCK),
        "hash_lanes takes 4096-byte blocks"
    );
    let mut digests = [[0u8; DIGEST]; LANES];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: each function only requires the CPU features it is compiled for, which `unit()`
    // has detected (tests pass a unit only when `unit()` allows it); they take no pointers.
    #[allow(unsafe_code)]
    unsafe {
        match unit {
            Unit::Avx512 => x86::avx512::hash(lanes, &mut digests),
            Unit::Avx2 => {
                let (lo, hi) = digests.split_at_mut(4);
                x86::avx2::hash([lanes[0], lanes[1], lanes[2], lanes[3]], lo);
                x86::avx2::hash([lanes[4], lanes[5], lanes[6], lanes[7]], hi);
            }
            Unit::None => return None,
        }
        Some(digests)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (unit, digests);
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, DIGEST, H0, K};

    /// SHA-512 words are big-endian.
    #[inline]
    fn word(block: &[u8], i: usize) -> i64 {
        let b: [u8; 8] = block[i * 8..i * 8 + 8].try_into().expect("8 bytes");
        u64::from_be_bytes(b) as i64
    }

    /// The compression function over vectors of lanes, written once for both units. The
    /// invoking module provides `add`, `splat`, the σ/Σ functions, `ch` and `maj`, all
    /// `#[target_feature]` functions of the same feature.
    macro_rules! compress_fn {
        ($feature:literal, $v:ty) => {
            /// One SHA-512 compression of every lane: `state` absorbs the 16-word message
            /// block in `w` (the schedule is expanded in place, so `w` is clobbered).
            #[target_feature(enable = $feature)]
            fn compress(state: &mut [$v; 8], w: &mut [$v; 16]) {
                let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
                for (t, &k) in K.iter().enumerate() {
                    let wt = if t < 16 {
                        w[t]
                    } else {
                        // σ0(W[t-15]) and σ1(W[t-2]); W[t-16] and W[t-7] are still in the ring.
                        let next = add(
                            add(w[t & 15], small_sigma0(w[(t + 1) & 15])),
                            add(w[(t + 9) & 15], small_sigma1(w[(t + 14) & 15])),
                        );
                        w[t & 15] = next;
                        next
                    };
                    let t1 = add(add(h, big_sigma1(e)), add(ch(e, f, g), add(splat(k), wt)));
                    let t2 = add(big_sigma0(a), maj(a, b, c));
                    h = g;
                    g = f;
                    f = e;
                    e = add(d, t1);
                    d = c;
                    c = b;
                    b = a;
                    a = add(t1, t2);
                }
                for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
                    *s = add(*s, v);
                }
            }
        };
    }

    /// The 32 message blocks of each lane's 4096 bytes, then the constant padding block:
    /// 0x80, zeros, the length in bits (128-bit big-endian).
    macro_rules! hash_fn {
        ($feature:literal, $v:ty, $n:literal) => {
            #[target_feature(enable = $feature)]
            pub(in super::super) fn hash(lane: [&[u8]; $n], out: &mut [[u8; DIGEST]]) {
                let mut state = [splat(0); 8];
                for (s, &h) in state.iter_mut().zip(&H0) {
                    *s = splat(h);
                }
                let mut w = [splat(0); 16];
                for chunk in 0..BLOCK / 128 {
                    for (t, wt) in w.iter_mut().enumerate() {
                        *wt = load(lane, chunk * 16 + t);
                    }
                    compress(&mut state, &mut w);
                }
                w = [splat(0); 16];
                w[0] = splat(0x8000_0000_0000_0000);
                w[15] = splat((BLOCK * 8) as u64);
                compress(&mut state, &mut w);
                for (k, s) in state.iter().enumerate() {
                    for (digest, v) in out.iter_mut().zip(lanes(*s)) {
                        digest[k * 8..k * 8 + 8].copy_from_slice(&v.to_be_bytes());
                    }
                }
            }
        };
    }

    pub(super) mod avx512 {
        use std::arch::x86_64::{
            __m256i, __m512i, _mm256_extract_epi64, _mm512_add_epi64, _mm512_extracti64x4_epi64,
            _mm512_ror_epi64, _mm512_set_epi64, _mm512_set1_epi64, _mm512_srli_epi64,
            _mm512_ternarylogic_epi64,
        };

        use super::{BLOCK, DIGEST, H0, K, word};

        /// `vpternlogq` truth tables (bit `4a + 2b + c` of the immediate is f(a, b, c)).
        const XOR3: i32 = 0x96;
        /// (e AND f) XOR (NOT e AND g)
        const CH: i32 = 0xca;
        /// majority of a, b, c
        const MAJ: i32 = 0xe8;

        #[inline]
        #[target_feature(enable = "avx512f")]
        fn add(a: __m512i, b: __m512i) -> __m512i {
            _mm512_add_epi64(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn splat(x: u64) -> __m512i {
            _mm512_set1_epi64(x as i64)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn xor3(x: __m512i, y: __m512i, z: __m512i) -> __m512i {
            _mm512_ternarylogic_epi64::<XOR3>(x, y, z)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn ch(e: __m512i, f: __m512i, g: __m512i) -> __m512i {
            _mm512_ternarylogic_epi64::<CH>(e, f, g)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn maj(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
            _mm512_ternarylogic_epi64::<MAJ>(a, b, c)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn big_sigma0(a: __m512i) -> __m512i {
            xor3(
                _mm512_ror_epi64::<28>(a),
                _mm512_ror_epi64::<34>(a),
                _mm512_ror_epi64::<39>(a),
            )
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn big_sigma1(e: __m512i) -> __m512i {
            xor3(
                _mm512_ror_epi64::<14>(e),
                _mm512_ror_epi64::<18>(e),
                _mm512_ror_epi64::<41>(e),
            )
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn small_sigma0(w: __m512i) -> __m512i {
            xor3(
                _mm512_ror_epi64::<1>(w),
                _mm512_ror_epi64::<8>(w),
                _mm512_srli_epi64::<7>(w),
            )
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn small_sigma1(w: __m512i) -> __m512i {
            xor3(
                _mm512_ror_epi64::<19>(w),
                _mm512_ror_epi64::<61>(w),
                _mm512_srli_epi64::<6>(w),
            )
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn load(lane: [&[u8]; 8], i: usize) -> __m512i {
            // _mm512_set_epi64 takes the highest lane first.
            _mm512_set_epi64(
                word(lane[7], i),
                word(lane[6], i),
                word(lane[5], i),
                word(lane[4], i),
                word(lane[3], i),
                word(lane[2], i),
                word(lane[1], i),
                word(lane[0], i),
            )
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn lanes(v: __m512i) -> [u64; 8] {
            let quarters = |q: __m256i| {
                [
                    _mm256_extract_epi64::<0>(q) as u64,
                    _mm256_extract_epi64::<1>(q) as u64,
                    _mm256_extract_epi64::<2>(q) as u64,
                    _mm256_extract_epi64::<3>(q) as u64,
                ]
            };
            let (lo, hi) = (
                quarters(_mm512_extracti64x4_epi64::<0>(v)),
                quarters(_mm512_extracti64x4_epi64::<1>(v)),
            );
            [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
        }

        compress_fn!("avx512f", __m512i);
        hash_fn!("avx512f", __m512i, 8);
    }

    pub(super) mod avx2 {
        use std::arch::x86_64::{
            __m256i, _mm256_add_epi64, _mm256_and_si256, _mm256_extract_epi64, _mm256_or_si256,
            _mm256_set_epi64x, _mm256_set1_epi64x, _mm256_slli_epi64, _mm256_srli_epi64,
            _mm256_xor_si256,
        };

        use super::{BLOCK, DIGEST, H0, K, word};

        #[inline]
        #[target_feature(enable = "avx2")]
        fn add(a: __m256i, b: __m256i) -> __m256i {
            _mm256_add_epi64(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn splat(x: u64) -> __m256i {
            _mm256_set1_epi64x(x as i64)
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn xor(a: __m256i, b: __m256i) -> __m256i {
            _mm256_xor_si256(a, b)
        }
        /// Rotate right by `R`; `L` must be `64 - R` (no rotate instruction before AVX-512).
        #[inline]
        #[target_feature(enable = "avx2")]
        fn rotr<const R: i32, const L: i32>(x: __m256i) -> __m256i {
            _mm256_or_si256(_mm256_srli_epi64::<R>(x), _mm256_slli_epi64::<L>(x))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn ch(e: __m256i, f: __m256i, g: __m256i) -> __m256i {
            // g XOR (e AND (f XOR g)) = (e AND f) XOR (NOT e AND g)
            xor(g, _mm256_and_si256(e, xor(f, g)))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn maj(a: __m256i, b: __m256i, c: __m256i) -> __m256i {
            // (a AND b) OR (c AND (a OR b))
            _mm256_or_si256(
                _mm256_and_si256(a, b),
                _mm256_and_si256(c, _mm256_or_si256(a, b)),
            )
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn big_sigma0(a: __m256i) -> __m256i {
            xor(xor(rotr::<28, 36>(a), rotr::<34, 30>(a)), rotr::<39, 25>(a))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn big_sigma1(e: __m256i) -> __m256i {
            xor(xor(rotr::<14, 50>(e), rotr::<18, 46>(e)), rotr::<41, 23>(e))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn small_sigma0(w: __m256i) -> __m256i {
            xor(
                xor(rotr::<1, 63>(w), rotr::<8, 56>(w)),
                _mm256_srli_epi64::<7>(w),
            )
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn small_sigma1(w: __m256i) -> __m256i {
            xor(
                xor(rotr::<19, 45>(w), rotr::<61, 3>(w)),
                _mm256_srli_epi64::<6>(w),
            )
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn load(lane: [&[u8]; 4], i: usize) -> __m256i {
            _mm256_set_epi64x(
                word(lane[3], i),
                word(lane[2], i),
                word(lane[1], i),
                word(lane[0], i),
            )
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        fn lanes(v: __m256i) -> [u64; 4] {
            [
                _mm256_extract_epi64::<0>(v) as u64,
                _mm256_extract_epi64::<1>(v) as u64,
                _mm256_extract_epi64::<2>(v) as u64,
                _mm256_extract_epi64::<3>(v) as u64,
            ]
        }

        compress_fn!("avx2", __m256i);
        hash_fn!("avx2", __m256i, 4);
    }
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    #[test]
    fn every_lane_of_every_unit_matches_scalar_sha512() {
        // Distinct, non-repeating content per lane, and the all-zero and all-ones extremes
        // (carries in every adder) in two lanes.
        let mut data: Vec<u8> = (0..LANES * BLOCK)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        data[2 * BLOCK..3 * BLOCK].fill(0);
        data[5 * BLOCK..6 * BLOCK].fill(0xff);
        let lanes = std::array::from_fn(|i| &data[i * BLOCK..(i + 1) * BLOCK]);
        let best = unit();
        // Every unit this CPU can run: the best one, and AVX2 below AVX-512.
        let units: &[Unit] = match best {
            Unit::Avx512 => &[Unit::Avx512, Unit::Avx2],
            Unit::Avx2 => &[Unit::Avx2],
            Unit::None => {
                eprintln!("SKIP: no AVX2 or AVX-512 on this CPU; the scalar path is used instead");
                return;
            }
        };
        for &u in units {
            let out = hash_lanes_with(u, lanes).expect("a detected unit");
            for (lane, (block, digest)) in data.chunks(BLOCK).zip(out).enumerate() {
                assert_eq!(
                    &digest[..],
                    &sha2::Sha512::digest(block)[..],
                    "{u:?} lane {lane}"
                );
            }
        }
        assert_eq!(hash_blocks(&data), hash_lanes_with(best, lanes));
    }
}
